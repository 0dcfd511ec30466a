#!/usr/bin/env python3
"""Measures, on loopback, the time from starting `runctl-controller run` to the first line
of remote output arriving on its stdout, and the idle resident memory of the daemon and of
an agent. Usage: bench/first_output.py [--runs N] [--bin-dir DIR]

Cases: `run` on a fresh local instance (launch + enroll + upload + start), and `run --on`
an instance that is already connected (upload + start). Each uses a private RUNCTL_HOME
and the daemon is warm (already started) before timing."""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def time_to_first_line(cli, env, args):
    start = time.perf_counter()
    proc = subprocess.Popen([cli, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    first = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    proc.stdout.read()
    proc.wait()
    assert first.strip() == b"first", first
    return elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/runctl-target")), "debug"))
    opts = parser.parse_args()
    cli = os.path.join(opts.bin_dir, "runctl-controller")
    with tempfile.TemporaryDirectory(prefix="rcb", dir="/tmp") as home:
        env = dict(os.environ, RUNCTL_HOME=home, RUNCTL_AGENT_BIN=os.path.join(opts.bin_dir, "runctl-agent"))
        workdir = os.path.join(ROOT, "examples", "quickstart")
        run = lambda *a: subprocess.run([cli, *a], env=env, check=True, capture_output=True, cwd=ROOT)
        status = json.loads(run("--output", "json", "status").stdout)
        run("launch", "--name", "warm")
        cmd = ["--", "sh", "-c", "echo first"]
        fresh = [time_to_first_line(cli, env, ["run", "--workdir", workdir, "--root", workdir, *cmd]) for _ in range(opts.runs)]
        warm = [time_to_first_line(cli, env, ["run", "--on", "warm", "--workdir", workdir, "--root", workdir, *cmd]) for _ in range(opts.runs)]
        time.sleep(12)  # let both sides settle into idle (a heartbeat or two)
        listing = json.loads(run("--output", "json", "list").stdout)
        agent_pid = next(i["instance"]["pid"] for i in listing["instances"] if i["instance"]["name"] == "warm")
        daemon_rss, agent_rss = rss_kib(status["pid"]), rss_kib(agent_pid)
        run("terminate", "warm")
        run("shutdown")
    ms = lambda xs: f"median {statistics.median(xs) * 1000:.0f} ms (min {min(xs) * 1000:.0f}, max {max(xs) * 1000:.0f})"
    print(f"binaries: {opts.bin_dir}")
    print(f"run -> first remote line, fresh local instance: {ms(fresh)} over {opts.runs} runs")
    print(f"run -> first remote line, connected instance:   {ms(warm)} over {opts.runs} runs")
    print(f"idle RSS: daemon {daemon_rss / 1024:.1f} MiB, agent {agent_rss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
