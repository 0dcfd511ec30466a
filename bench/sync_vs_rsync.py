#!/usr/bin/env python3
"""Code sync: runctl against `rsync -az` over ssh and `tar | zstd | ssh`, in one run, on
the same tree, all on loopback to tmpfs (/dev/shm), so the transports are compared and not
the disk. Prints wall time and bytes on the wire for a first sync, a no-op sync and a
20-file change, the ratios, and whether each target of issue 3 is met.

Usage: bench/sync_vs_rsync.py [DIR] [--runs N] [--bin-dir DIR] [--files N] [--mb N]

Without DIR it generates a tree of --files files (default 10,000) totalling about --mb MB
(default 100): source-like text plus a few random binaries. With DIR it uses that tree;
rsync then honours .gitignore files (`--filter=':- .gitignore'`) and tar uses
`--exclude-vcs --exclude-vcs-ignores`, so all three send comparable sets.

Needs Debian's `openssh-server` and `rsync` (installed with apt-get when missing) and the
release binaries (`cargo build --release --bins`, or --bin-dir). Bytes: runctl's are UDP
bytes both ways on the agent's QUIC connection during the sync (headers, TLS and ACKs
included); rsync's are its own `--stats` totals (payload inside ssh, so ssh's overhead is
not counted against it); tar's are the compressed stream's size."""

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "def class return import from self model loss batch tensor optimizer step epoch "
    "grad layer weight bias train eval config data loader sample index value key "
    "None True False if else for while in range len print yield async await with as "
    "lambda numpy torch float int str list dict tuple shape dim mean std norm relu"
).split()


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def ensure_tools():
    missing = [p for p, b in (("rsync", "/usr/bin/rsync"), ("openssh-server", "/usr/sbin/sshd")) if not os.path.exists(b)]
    if missing:
        print(f"installing {' '.join(missing)} ...", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sh(["apt-get", "install", "-y", "-q", *missing], env=env)


def generate(dest, files, total_mb, seed=1):
    """Source-like text files in nested packages, plus binaries making up about half."""
    rng = random.Random(seed)
    binaries = max(1, files // 500)
    text_files = files - binaries
    text_bytes = total_mb * 1_000_000 // 2
    per_text = max(64, text_bytes // text_files)
    for i in range(text_files):
        pkg = os.path.join(dest, f"pkg{i // 1000:02d}", f"mod{(i // 100) % 10}")
        os.makedirs(pkg, exist_ok=True)
        lines, size = [], 0
        while size < per_text:
            indent = "    " * rng.randint(0, 3)
            line = indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            lines.append(line)
            size += len(line) + 1
        with open(os.path.join(pkg, f"file_{i:05d}.py"), "w") as f:
            f.write("\n".join(lines) + "\n")
    bin_bytes = total_mb * 1_000_000 - text_bytes
    os.makedirs(os.path.join(dest, "assets"), exist_ok=True)
    for i in range(binaries):
        with open(os.path.join(dest, "assets", f"blob_{i:03d}.bin"), "wb") as f:
            f.write(rng.randbytes(bin_bytes // binaries))


def text_files(tree):
    out = []
    for dirpath, _, names in os.walk(tree):
        out += [os.path.join(dirpath, n) for n in names if n.endswith((".py", ".txt", ".md", ".yaml", ".toml", ".rs", ".c", ".h", ".js", ".ts", ".go", ".sh", ".json", ".cfg"))]
    return sorted(out)


def change_20(tree, files, round_):
    for path in files[round_ * 20:(round_ + 1) * 20]:
        with open(path, "a") as f:
            f.write(f"# edited in round {round_}: {random.random()}\n")
    return files[round_ * 20:(round_ + 1) * 20]


def zstd_size(paths):
    data = b"".join(open(p, "rb").read() for p in paths)
    return len(subprocess.run(["zstd", "-3", "-q", "-c"], input=data, capture_output=True, check=True).stdout)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    def __init__(self, scratch):
        self.dir = os.path.join(scratch, "ssh")
        os.makedirs(self.dir)
        self.port = free_port()
        for name in ("host", "client"):
            sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(self.dir, name)])
        shutil.copy(os.path.join(self.dir, "client.pub"), os.path.join(self.dir, "authorized_keys"))
        config = os.path.join(self.dir, "sshd_config")
        with open(config, "w") as f:
            f.write(
                f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir}/host\n"
                f"PidFile {self.dir}/sshd.pid\nAuthorizedKeysFile {self.dir}/authorized_keys\n"
                "PasswordAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin yes\n"
                # A bare HOME: root's shell start-up here runs pyenv, adding ~0.5 s per command.
                f"SetEnv HOME={self.dir}\n"
            )
        os.makedirs("/run/sshd", exist_ok=True)
        sh(["/usr/sbin/sshd", "-f", config, "-E", os.path.join(self.dir, "sshd.log")])
        self.ssh = (
            f"ssh -p {self.port} -i {self.dir}/client -o StrictHostKeyChecking=no "
            "-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR"
        )
        deadline = time.time() + 10
        while subprocess.run([*self.ssh.split(), "root@127.0.0.1", "true"], capture_output=True).returncode != 0:
            if time.time() > deadline:
                raise SystemExit(f"sshd did not come up: {open(os.path.join(self.dir, 'sshd.log')).read()}")
            time.sleep(0.1)

    def stop(self):
        try:
            pid = int(open(os.path.join(self.dir, "sshd.pid")).read())
            os.kill(pid, 15)
        except (OSError, ValueError):
            pass


def rsync(sshd, src, dst, given_dir):
    cmd = ["rsync", "-az", "--stats", "-e", sshd.ssh]
    if given_dir:
        cmd += ["--exclude=.git", "--filter=:- .gitignore"]
    start = time.perf_counter()
    out = sh([*cmd, src + "/", f"root@127.0.0.1:{dst}/"]).stdout.decode()
    elapsed = time.perf_counter() - start
    total = 0
    for line in out.splitlines():
        if line.startswith(("Total bytes sent:", "Total bytes received:")):
            total += int(line.split(":")[1].strip().replace(",", ""))
    return elapsed, total


def tar_zstd_ssh(sshd, src, dst, given_dir):
    excludes = "--exclude-vcs --exclude-vcs-ignores" if given_dir else ""
    pipeline = (
        f"tar -C {src} {excludes} -cf - . | zstd -3 -q -c | "
        f"{sshd.ssh} root@127.0.0.1 'mkdir -p {dst} && zstd -d -q -c | tar -C {dst} -xf -'"
    )
    start = time.perf_counter()
    subprocess.run(pipeline, shell=True, check=True)
    elapsed = time.perf_counter() - start
    size = subprocess.run(f"tar -C {src} {excludes} -cf - . | zstd -3 -q -c | wc -c", shell=True, check=True, capture_output=True)
    return elapsed, int(size.stdout)


class Runctl:
    def __init__(self, bin_dir, scratch):
        self.cli = os.path.join(bin_dir, "runctl-controller")
        self.env = dict(
            os.environ,
            RUNCTL_HOME=os.path.join(scratch, "runctl-home"),
            RUNCTL_AGENT_BIN=os.path.join(bin_dir, "runctl-agent"),
        )
        self.empty = os.path.join(scratch, "empty")
        os.makedirs(self.empty)
        self.call("launch", "--name", "bench")

    def call(self, *args):
        out = sh([self.cli, "--output", "json", *args], env=self.env).stdout.decode()
        return json.loads(out.strip().splitlines()[-1])

    def new_run(self):
        row = self.call("run", "--on", "bench", "--detach", "--workdir", self.empty, "--", "sleep", "100000")
        return row["id"]

    def sync(self, run, src):
        start = time.perf_counter()
        report = self.call("sync", "--root", src, run)
        return time.perf_counter() - start, report["wire_bytes"], report

    def stop(self):
        subprocess.run([self.cli, "terminate", "--force", "bench"], env=self.env, capture_output=True)
        subprocess.run([self.cli, "shutdown"], env=self.env, capture_output=True)


def fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", help="sync this tree instead of a generated one")
    parser.add_argument("--runs", type=int, default=3, help="repetitions per case (median shown)")
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=100)
    target_dir = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    parser.add_argument("--bin-dir", default=os.path.join(target_dir, "release"))
    opts = parser.parse_args()
    for b in ("runctl-controller", "runctl-agent"):
        if not os.path.exists(os.path.join(opts.bin_dir, b)):
            raise SystemExit(f"{opts.bin_dir}/{b} is missing: cargo build --release --bins (or pass --bin-dir)")
    ensure_tools()
    scratch = tempfile.mkdtemp(prefix="runctl-bench-", dir="/dev/shm")
    sshd = runctl = None
    try:
        if opts.dir:
            src = os.path.abspath(opts.dir)
            work = os.path.join(scratch, "src")
            shutil.copytree(src, work, symlinks=True)
            src = work
        else:
            src = os.path.join(scratch, "src")
            generate(src, opts.files, opts.mb)
        nfiles = sum(len(n) for _, _, n in os.walk(src))
        size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(src) for n in ns if not os.path.islink(os.path.join(d, n)))
        print(f"tree: {nfiles} files, {size / 1e6:.1f} MB ({'given' if opts.dir else 'generated'}), {opts.runs} runs per case, medians\n")
        sshd = Sshd(scratch)
        runctl = Runctl(opts.bin_dir, scratch)
        editable = text_files(src)
        results = {k: {"runctl": [], "rsync": [], "tar": [], "runctl_b": [], "rsync_b": [], "tar_b": [], "zstd_changed": []} for k in ("first", "noop", "change20")}
        for r in range(opts.runs):
            run = runctl.new_run()
            rdst = os.path.join(scratch, f"rsync-dst-{r}")
            tdst = os.path.join(scratch, f"tar-dst-{r}")
            tools = {
                "runctl": lambda: runctl.sync(run, src)[:2],
                "rsync": lambda: rsync(sshd, src, rdst, bool(opts.dir)),
                "tar": lambda: tar_zstd_ssh(sshd, src, tdst, bool(opts.dir)),
            }

            def measure(case):
                for name, sync in tools.items():
                    t, b = sync()
                    results[case][name].append(t)
                    results[case][name + "_b"].append(b)

            measure("first")  # into empty destinations
            measure("noop")
            changed = change_20(src, editable, r)
            results["change20"]["zstd_changed"].append(zstd_size(changed))
            measure("change20")
            shutil.rmtree(rdst, ignore_errors=True)
            shutil.rmtree(tdst, ignore_errors=True)

        med = lambda xs: statistics.median(xs)
        print(f"{'case':<10} {'runctl':>9} {'rsync':>9} {'tar|zstd':>9} {'runctl B':>10} {'rsync B':>10} {'tar B':>10} {'time ×rsync':>12} {'bytes ×rsync':>13}")
        verdicts = []
        for case in ("first", "noop", "change20"):
            c = results[case]
            rt, st, tt = med(c["runctl"]), med(c["rsync"]), med(c["tar"])
            rb, sb, tb = med(c["runctl_b"]), med(c["rsync_b"]), med(c["tar_b"])
            print(f"{case:<10} {rt:>8.3f}s {st:>8.3f}s {tt:>8.3f}s {fmt_bytes(rb):>10} {fmt_bytes(sb):>10} {fmt_bytes(tb):>10} {rt / st:>11.2f}× {rb / sb:>12.2f}×")
            if case == "first":
                verdicts.append(("first sync: time ≤ 0.5× rsync", rt <= 0.5 * st))
                verdicts.append(("first sync: bytes ≤ rsync", rb <= sb))
            elif case == "noop":
                verdicts.append(("no-op sync: time ≤ 0.25× rsync", rt <= 0.25 * st))
                verdicts.append(("no-op sync: under 1 KB on the wire", rb < 1000))
            else:
                bound = 2 * med(c["zstd_changed"]) + 1000
                verdicts.append(("20-file change: time ≤ 0.5× rsync", rt <= 0.5 * st))
                verdicts.append((f"20-file change: bytes ≤ 2× zstd of the changed files + 1 KB ({fmt_bytes(bound)})", rb <= bound))
        print()
        for what, ok in verdicts:
            print(f"  {'PASS' if ok else 'FAIL'}  {what}")
    finally:
        if runctl:
            runctl.stop()
        if sshd:
            sshd.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
