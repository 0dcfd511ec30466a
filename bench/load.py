#!/usr/bin/env python3
"""Load on one daemon: N agents (1,000 by default) sending stats at 1 Hz, then R runs
(100) each streaming L lines a second (1,000), all from one agent-swarm process speaking
the real protocol (each agent enrolls with its own single-use token and holds its own
mutual-TLS QUIC session; see tests/src/bin/agent-swarm.rs). The daemon starts each agent
as a local instance, so launches go through the daemon's real path.

Measures the daemon's CPU and RSS in each phase, the rate of rows written to its SQLite
database, `list` and `status` latency (the CLI, end to end) under load, and, after every
run has ended, lines lost or repeated (the database against what the swarm sent; must be
0). Prints the figures against the targets (1,000 agents at <= 0.5 core and <= 300 MiB;
`status` within 200 ms under the full load) and PASS/FAIL.

Usage: bench/load.py [--agents N] [--runs R] [--rate L] [--seconds S] [--bin-dir DIR]
Build first: cargo build --release -p controller -p tests --bins
(then --bin-dir .../release; the default is $CARGO_TARGET_DIR/release)."""

import argparse
import concurrent.futures
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

from procstat import cpu_seconds, rss_mib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_TARGET_CORES = 0.5
RSS_TARGET_MIB = 300.0
STATUS_TARGET_MS = 200.0
# A run's states once it is over (`list --output json`).
ENDED = ("succeeded", "failed", "stopped", "interrupted", "budget_exceeded")


def event_rows(db):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT COUNT(*) FROM run_events").fetchone()[0]
    finally:
        con.close()


class Env:
    def __init__(self, home, bin_dir):
        self.home = home
        self.cli = os.path.join(bin_dir, "runctl-controller")
        self.env = dict(
            os.environ,
            RUNCTL_HOME=home,
            RUNCTL_AGENT_BIN=os.path.join(bin_dir, "agent-swarm"),
            RUNCTL_SWARM_SOCKET=os.path.join(home, "swarm.sock"),
        )

    def run(self, *args, check=True):
        return subprocess.run([self.cli, *args], env=self.env, check=check, capture_output=True, text=True, cwd=ROOT)

    def timed(self, *args):
        t0 = time.monotonic()
        self.run(*args)
        return (time.monotonic() - t0) * 1000.0

    def daemon_pid(self):
        with open(os.path.join(self.home, "daemon.pid")) as f:
            return int(f.read().split()[0])

    def report(self):
        try:
            with open(os.path.join(self.home, "swarm.json")) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None


def window(env, seconds, probe=None):
    """CPU, RSS and database rows over `seconds`; `probe` runs once a second and its
    latencies are collected."""
    pid = env.daemon_pid()
    db = os.path.join(env.home, "state.db")
    rss, latencies = [], {}
    cpu0, rows0, t0 = cpu_seconds(pid), event_rows(db), time.monotonic()
    while time.monotonic() - t0 < seconds:
        tick = time.monotonic()
        rss.append(rss_mib(pid))
        if probe:
            for name, ms in probe().items():
                latencies.setdefault(name, []).append(ms)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    elapsed = time.monotonic() - t0
    return {
        "cpu_cores": (cpu_seconds(pid) - cpu0) / elapsed,
        "rss_mib_median": statistics.median(rss),
        "rss_mib_max": max(rss),
        "event_rows_per_s": (event_rows(db) - rows0) / elapsed,
        "latency_ms": {k: {"median": statistics.median(v), "max": max(v)} for k, v in latencies.items()},
    }


def check_runs(env, runs):
    """Lines lost and repeated: every run's events in the database against the swarm's."""
    report = env.report()
    con = sqlite3.connect(f"file:{os.path.join(env.home, 'state.db')}?mode=ro", uri=True)
    lost = repeated = 0
    for run in runs:
        sent = report["runs"][run]
        rows = con.execute(
            "SELECT seq FROM run_events WHERE run_id = ? ORDER BY seq", (run,)
        ).fetchall()
        seqs = [r[0] for r in rows]
        want = set(range(1, sent["last_seq"] + 1))
        lost += len(want - set(seqs))
        repeated += len(seqs) - len(set(seqs))
    con.close()
    return lost, repeated


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rate", type=int, default=1000, help="lines a second per run")
    parser.add_argument("--seconds", type=int, default=60, help="length of each measured window")
    parser.add_argument("--parallel", type=int, default=8, help="launches at once")
    target_dir = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    parser.add_argument("--bin-dir", default=os.path.join(target_dir, "release"))
    opts = parser.parse_args()
    for b in ("runctl-controller", "agent-swarm"):
        if not os.path.exists(os.path.join(opts.bin_dir, b)):
            raise SystemExit(f"{opts.bin_dir}/{b} is missing: cargo build --release -p controller -p tests --bins (or pass --bin-dir)")
    with tempfile.TemporaryDirectory(prefix="rcload", dir="/tmp") as home:
        env = Env(home, opts.bin_dir)
        # Each run's lines, at its rate, last past the measured window.
        lines = opts.rate * (opts.seconds + 30)
        swarm = subprocess.Popen(
            [os.path.join(opts.bin_dir, "agent-swarm"), "serve", "--socket", env.env["RUNCTL_SWARM_SOCKET"],
             "--report", os.path.join(home, "swarm.json"), "--lines", str(lines), "--rate", str(opts.rate)],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(home, "swarm.log"), "w"))
        try:
            results = measure(env, opts)
        finally:
            env.run("shutdown", check=False)
            swarm.terminate()
            swarm.wait(30)
    return print_results(opts, results)


def measure(env, opts):
    results = {}
    names = [f"sim-{i:04d}" for i in range(opts.agents)]
    t0 = time.monotonic()
    env.run("list")  # starts the daemon
    with concurrent.futures.ThreadPoolExecutor(opts.parallel) as pool:
        for out in pool.map(lambda n: env.run("launch", "--name", n, check=False), names):
            if out.returncode != 0:
                with open(os.path.join(env.home, "swarm.log")) as f:
                    swarm_log = f.read()[-2000:]
                logs = []
                for name in sorted(os.listdir(os.path.join(env.home, "local"))):
                    log = os.path.join(env.home, "local", name, "agent.log")
                    if name in out.stderr and os.path.exists(log):
                        with open(log) as f:
                            logs.append(f"{name}: {f.read()[-500:]}")
                kept = tempfile.mkdtemp(prefix="rcload-failed-", dir="/tmp")
                shutil.copytree(env.home, kept, ignore=shutil.ignore_patterns("*.sock"), dirs_exist_ok=True)
                raise SystemExit(f"launch failed: {out.stderr.strip()}\nswarm log: {swarm_log}\nagent log: {logs}\nthe home is kept in {kept}")
    results["launch_s"] = time.monotonic() - t0
    deadline = time.monotonic() + 120
    while (env.report() or {}).get("connected", 0) < opts.agents:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {env.report()} agents connected")
        time.sleep(1)
    time.sleep(3)
    list_probe = lambda: {"list": env.timed("list")}
    results["stats"] = window(env, opts.seconds, list_probe)

    project = tempfile.mkdtemp(prefix="rcloadproj", dir=env.home)
    with open(os.path.join(project, "train.py"), "w") as f:
        f.write("print('simulated')\n")
    def start(name):
        out = env.run("--output", "json", "run", "--detach", "--on", name, "--root", project, "--workdir", project,
                      "--setup", "none", "--no-checkpoints", "--", "python3", "train.py")
        return json.loads(out.stdout.splitlines()[-1])["id"]
    with concurrent.futures.ThreadPoolExecutor(opts.parallel) as pool:
        runs = list(pool.map(start, names[: opts.runs]))
    time.sleep(3)
    probe = lambda: {"status": env.timed("status"), "list": env.timed("list")}
    results["full"] = window(env, opts.seconds, probe)
    # Every run ends by itself once its lines are out; then the database must hold them all.
    deadline = time.monotonic() + 180
    while True:
        report = env.report()
        ended = sum(1 for r in runs if report["runs"].get(r, {}).get("ended"))
        listed = json.loads(env.run("--output", "json", "list", "--all").stdout) if ended == len(runs) else None
        if listed is not None:
            states = {r["id"]: r["state"] for r in listed.get("runs", [])}
            if all(states.get(r) in ENDED for r in runs):
                break
        if time.monotonic() > deadline:
            raise SystemExit(f"runs did not all end: {ended} of {len(runs)}")
        time.sleep(2)
    time.sleep(2)
    results["lost"], results["repeated"] = check_runs(env, runs)
    results["lines_sent"] = sum(env.report()["runs"][r]["lines"] for r in runs)
    results["swarm_failures"] = env.report()["failures"]
    results["swarm_errors"] = env.report()["errors"][:5]
    return results


def print_results(opts, r):
    stats, full = r["stats"], r["full"]
    print(f"daemon under {opts.agents} simulated agents (stats at 1 Hz), then {opts.runs} runs at {opts.rate} lines/s each; {opts.seconds} s windows")
    print(f"  {opts.agents} launches and enrollments: {r['launch_s']:.1f} s")
    print(f"  stats only: CPU {stats['cpu_cores']:.3f} cores, RSS {stats['rss_mib_median']:.1f} MiB median, {stats['rss_mib_max']:.1f} max; list {stats['latency_ms']['list']['median']:.0f} ms median")
    print(f"  full load: CPU {full['cpu_cores']:.3f} cores, RSS {full['rss_mib_median']:.1f} MiB median, {full['rss_mib_max']:.1f} max; "
          f"{full['event_rows_per_s']:.0f} event rows/s written")
    for name, lat in full["latency_ms"].items():
        print(f"  {name} under full load: {lat['median']:.0f} ms median, {lat['max']:.0f} ms max")
    print(f"  lines sent {r['lines_sent']}, lost {r['lost']}, repeated {r['repeated']}; swarm failures {r['swarm_failures']} {r['swarm_errors']}")
    checks = [
        ("stats-only CPU <= 0.5 core", stats["cpu_cores"] <= CPU_TARGET_CORES),
        ("stats-only RSS <= 300 MiB", stats["rss_mib_max"] <= RSS_TARGET_MIB),
        ("status <= 200 ms under full load", full["latency_ms"]["status"]["max"] <= STATUS_TARGET_MS),
        ("no line lost or repeated", r["lost"] == 0 and r["repeated"] == 0),
    ]
    ok = True
    for name, passed in checks:
        print(f"  {'PASS' if passed else 'FAIL'}: {name}")
        ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
