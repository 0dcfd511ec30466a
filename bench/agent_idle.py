#!/usr/bin/env python3
"""Measures what an idle agent costs its host: resident memory and CPU over a window
(60 s by default) while it samples stats at 1 Hz and sends them to a connected controller.
Optionally a second window with a run active (a sleeping trainer), so the per-run process
scan is included. Prints the figures against the targets (RSS <= 25 MiB, CPU <= 1 % of a
core) and PASS/FAIL.

Usage: bench/agent_idle.py [--seconds N] [--with-run] [--bin-dir DIR]
Build first: cargo build --release --workspace --bins (then --bin-dir .../release)."""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

from procstat import cpu_seconds, rss_mib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RSS_TARGET_MIB = 25.0
CPU_TARGET_PERCENT = 1.0


def window(pid, seconds):
    """RSS once a second and CPU time over the whole window."""
    rss = []
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    for _ in range(seconds):
        time.sleep(1)
        rss.append(rss_mib(pid))
    cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100.0
    return {"rss_mib_median": statistics.median(rss), "rss_mib_max": max(rss), "cpu_percent": cpu}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--with-run", action="store_true")
    parser.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/runctl-target")), "release"))
    opts = parser.parse_args()
    cli = os.path.join(opts.bin_dir, "runctl-controller")
    results = {}
    with tempfile.TemporaryDirectory(prefix="rcb", dir="/tmp") as home:
        with open(os.path.join(home, "config.toml"), "w") as f:
            f.write("[local.agent]\nstats_interval_ms = 1000\n")
        env = dict(os.environ, RUNCTL_HOME=home, RUNCTL_AGENT_BIN=os.path.join(opts.bin_dir, "runctl-agent"))
        run = lambda *a: subprocess.run([cli, *a], env=env, check=True, capture_output=True, cwd=ROOT)
        try:
            run("launch", "--name", "idle")
            listing = json.loads(run("--output", "json", "list").stdout)
            pid = next(i["instance"]["pid"] for i in listing["instances"] if i["instance"]["name"] == "idle")
            time.sleep(5)  # past enrollment and the first samples
            results["idle"] = window(pid, opts.seconds)
            if opts.with_run:
                workdir = os.path.join(ROOT, "examples", "quickstart")
                row = json.loads(run("--output", "json", "run", "--detach", "--on", "idle", "--workdir", workdir, "--root", workdir, "--", "sleep", str(opts.seconds + 30)).stdout.splitlines()[-1])
                time.sleep(3)
                results["one run active"] = window(pid, opts.seconds)
                run("stop", "--grace", "1", row["id"])
        finally:
            subprocess.run([cli, "terminate", "--force", "idle"], env=env, capture_output=True)
            subprocess.run([cli, "shutdown"], env=env, capture_output=True)
    ok = True
    print(f"agent ({opts.bin_dir}), stats sampled at 1 Hz and sent to a connected controller, {opts.seconds} s windows")
    print(f"{'case':<16} {'RSS median':>11} {'RSS max':>9} {'CPU':>7}   targets: RSS <= {RSS_TARGET_MIB:.0f} MiB, CPU <= {CPU_TARGET_PERCENT:.0f} %")
    for case, r in results.items():
        passed = r["rss_mib_max"] <= RSS_TARGET_MIB and r["cpu_percent"] <= CPU_TARGET_PERCENT
        ok &= passed
        print(f"{case:<16} {r['rss_mib_median']:>7.1f} MiB {r['rss_mib_max']:>5.1f} MiB {r['cpu_percent']:>6.2f}%   {'PASS' if passed else 'FAIL'}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
