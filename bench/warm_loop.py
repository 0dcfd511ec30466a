#!/usr/bin/env python3
"""The edit-run loop on a kept instance, in one run on the same tree (loopback, tmpfs):
runctl against `rsync -az` into the same directory plus `ssh python3 ...` (what
`sky exec` does). Run 1, edit three files, run 2; for run 2: bytes on the wire and the
time from the command to its first output line; and run 2's setup time with an
unchanged requirements.txt. Run 1's figures are what every run cost before the
instance kept a store (each new run synced its whole tree and set up from nothing).

Usage: bench/warm_loop.py [DIR] [--runs N] [--bin-dir DIR] [--files N] [--mb N]

Without DIR it generates --files files (default 5,000) of about --mb MB (default 80).
Needs `openssh-server`, `rsync` and `zstd` (installed when missing) and the binaries
(`cargo build --release --bins`, or --bin-dir). Prints the figures, the ratios and
whether each target of issue 14 is met: run 2 sends at most 2x the zstd size of the
changed files plus 4 KB; its first output comes in at most 0.5x rsync+ssh's time; setup
with an unchanged key takes under 1 s."""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sync_vs_rsync as base  # noqa: E402

PROGRAM = "print('first line', flush=True)\n"


def first_line_after(cmd, env=None, want="first line"):
    """Runs `cmd`; returns (seconds to the first stdout line containing `want`, stderr)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    elapsed = None
    for line in proc.stdout:
        if want in line and elapsed is None:
            elapsed = time.perf_counter() - start
    err = proc.stderr.read()
    if proc.wait() != 0 or elapsed is None:
        raise SystemExit(f"{cmd[0]} failed: {err}")
    return elapsed, err


def wire_of(stderr):
    line = next(l for l in stderr.splitlines() if "synced " in l and "on the wire" in l)
    value, unit = line.split(" on the wire")[0].rsplit("(", 1)[1].split()
    return float(value) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit], line


def setup_seconds(cli, env, run):
    """From the run's first event to its process start: its setup (or the reuse)."""
    out = subprocess.run([cli, "--output", "json", "logs", run], env=env, capture_output=True, text=True, check=True)
    events = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    times = [e["at_ms"] for e in events if "at_ms" in e]
    started = next(e["at_ms"] for e in events if "started" in e.get("kind", {}))
    return (started - min(times)) / 1000


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", nargs="?")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--mb", type=int, default=80)
    p.add_argument("--bin-dir", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target", "release"))
    args = p.parse_args()
    base.ensure_tools()
    scratch = tempfile.mkdtemp(prefix="warm-", dir="/dev/shm")
    tree = os.path.join(scratch, "tree")
    if args.dir:
        shutil.copytree(args.dir, tree, symlinks=True)
    else:
        os.makedirs(tree)
        base.generate(tree, args.files, args.mb)
    with open(os.path.join(tree, "main.py"), "w") as f:
        f.write(PROGRAM)
    with open(os.path.join(tree, "requirements.txt"), "w") as f:
        f.write("# the environment: nothing beyond the image here\n")
    editable = base.text_files(tree)
    sshd = base.Sshd(scratch)
    args.bin_dir = os.path.abspath(args.bin_dir)
    cli = os.path.join(args.bin_dir, "runctl-controller")
    env = dict(os.environ, RUNCTL_HOME=os.path.join(scratch, "home"), RUNCTL_AGENT_BIN=os.path.join(args.bin_dir, "runctl-agent"))
    subprocess.run([cli, "--output", "json", "launch", "--name", "kept"], env=env, check=True, capture_output=True)
    run_cmd = [cli, "--output", "json", "run", "--on", "kept", "--workdir", tree, "--", "python3", "main.py"]
    dst = os.path.join(scratch, "remote")
    ssh_cmd = [*sshd.ssh.split(), "root@127.0.0.1", f"cd {dst} && python3 main.py"]
    rows = []
    try:
        for round_ in range(args.runs):
            # Run 1. Only the first round's is a tree from nothing: later rounds' run 1
            # finds the tree in the store too, so it is not counted as one.
            t1, err1 = first_line_after(run_cmd, env)
            w1, _ = wire_of(err1)
            if round_ > 0:
                t1 = w1 = None
            r1 = next(json.loads(l) for l in reversed(subprocess.run([cli, "--output", "json", "list"], env=env, capture_output=True, text=True).stdout.splitlines()) if l.startswith("{"))["runs"]
            run1 = max(r1, key=lambda r: r["created_ms"])["id"]
            s_start = time.perf_counter()
            base.rsync(sshd, tree, dst, False)
            rs1 = time.perf_counter() - s_start
            changed = editable[round_ * 3:(round_ + 1) * 3]
            for path in changed:
                with open(path, "a") as f:
                    f.write(f"# edited in round {round_}\n")
            zstd = base.zstd_size(changed)
            t2, err2 = first_line_after(run_cmd, env)
            w2, line2 = wire_of(err2)
            r2 = next(json.loads(l) for l in reversed(subprocess.run([cli, "--output", "json", "list"], env=env, capture_output=True, text=True).stdout.splitlines()) if l.startswith("{"))["runs"]
            run2 = max(r2, key=lambda r: r["created_ms"])["id"]
            start = time.perf_counter()
            _, rsync_bytes = base.rsync(sshd, tree, dst, False)
            ts, _ = first_line_after(ssh_cmd)
            t_rsync = time.perf_counter() - start
            rows.append(dict(
                wire1=w1, t1=t1, setup1=setup_seconds(cli, env, run1) if round_ == 0 else None,
                wire2=w2, t2=t2, setup2=setup_seconds(cli, env, run2), zstd=zstd,
                rsync_bytes=rsync_bytes, t_rsync=t_rsync, rsync_first=rs1, line2=line2,
            ))
    finally:
        subprocess.run([cli, "terminate", "--force", "kept"], env=env, capture_output=True)
        subprocess.run([cli, "shutdown"], env=env, capture_output=True)
        sshd.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    med = lambda k: statistics.median(r[k] for r in rows if r[k] is not None)  # noqa: E731
    fb = base.fmt_bytes
    print(f"tree: {args.files if not args.dir else args.dir} files, {args.runs} rounds (medians)")
    print(f"run 1 (a tree from nothing, first round only: what every run cost before the store): {fb(med('wire1'))} on the wire, first output {med('t1'):.2f} s, setup {med('setup1'):.2f} s")
    print(f"run 2 after 3 edits: {fb(med('wire2'))} on the wire (zstd of the changes {fb(med('zstd'))}), first output {med('t2'):.2f} s, setup {med('setup2'):.3f} s")
    print(f"  e.g. {rows[-1]['line2']}")
    print(f"rsync -az + ssh python3: {fb(med('rsync_bytes'))} (rsync's own count), first output {med('t_rsync'):.2f} s")
    bound = 2 * med("zstd") + 4096
    print(f"run 2 wire / (2x zstd + 4 KB): {med('wire2') / bound:.2f}  [target <= 1: {'met' if med('wire2') <= bound else 'NOT met'}]")
    ratio = med("t2") / med("t_rsync")
    print(f"run 2 first output / rsync+ssh: {ratio:.2f}  [target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'}]")
    print(f"run 2 setup: {med('setup2'):.3f} s  [target < 1 s: {'met' if med('setup2') < 1 else 'NOT met'}]")
    print(f"run 2 vs run 1: {med('wire1') / max(med('wire2'), 1):.0f}x fewer bytes, {med('t1') / med('t2'):.1f}x sooner to first output")


if __name__ == "__main__":
    main()
