#!/usr/bin/env python3
"""exec, forward and shell: runctl against ssh to a private sshd, in one run, on loopback.

- exec: time from starting the command to its first output line, for `runctl exec RUN --
  echo` (a new CLI process each time; the daemon and the agent's session are up, as they
  are while a run goes on), against `ssh host echo` cold (a new connection each time) and
  with a ControlMaster (the connection kept).
- forward: throughput of one download of --mb MB through `runctl forward` against
  `ssh -N -L`, from the same `python3 -m http.server` on the instance side.
- shell: keystroke round trip (one byte typed, its echo seen) through `runctl shell`
  against `ssh -tt`, both driven from a PTY here, with the remote side in `stty raw
  -echo; cat`.

Usage: bench/access_vs_ssh.py [--runs N] [--mb N] [--bin-dir DIR]

Needs Debian's `openssh-server` and `curl` (installed with apt-get when missing) and the
binaries (`cargo build --release --workspace --bins`, then --bin-dir to their directory).
Prints medians, the ratios, and whether issue 16's targets are met: exec at most 0.5x a
cold ssh; forward at least 1.0x ssh -L (below 0.7x is a defect)."""

import argparse
import json
import os
import pty
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sync_vs_rsync as base  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_line(cmd, env=None):
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    proc.stdout.read()
    err = proc.stderr.read()
    if proc.wait() != 0 or b"first" not in line:
        raise SystemExit(f"{cmd[0]} failed: {err.decode()}")
    return elapsed


def download(url):
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    size, seconds = int(out[0]), float(out[1])
    return size / seconds / 1e6, size


def wait_port(port, bound=20):
    import socket
    deadline = time.time() + bound
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


class Pty:
    """A command on a PTY here, read without blocking."""

    def __init__(self, argv, env=None):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execvpe(argv[0], argv, env or os.environ)
        self.seen = b""

    def write(self, data):
        os.write(self.fd, data)

    def wait_for(self, needle, bound=20):
        deadline = time.time() + bound
        while needle not in self.seen:
            left = deadline - time.time()
            if left <= 0:
                raise SystemExit(f"no {needle!r} in {self.seen[-300:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.fd, 65536)
                except OSError:
                    raise SystemExit(f"the pty closed: {self.seen[-300:]!r}")

    def round_trips(self, n):
        """Types one byte at a time and times its echo, `n` times."""
        times = []
        for i in range(n):
            byte = bytes([ord("a") + i % 26])
            start = time.perf_counter()
            os.write(self.fd, byte)
            got = b""
            while byte not in got:
                select.select([self.fd], [], [], 5)
                got += os.read(self.fd, 4096)
            times.append(time.perf_counter() - start)
        return times

    def close(self):
        try:
            os.kill(self.pid, 9)
        except OSError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except OSError:
            pass


def keystrokes(argv, env, n):
    term = Pty(argv, env)
    try:
        term.write(b"stty raw -echo; echo READY; exec cat\r")
        term.wait_for(b"READY\n", 30)
        time.sleep(0.3)
        term.seen = b""
        return term.round_trips(n)
    finally:
        term.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    args = parser.parse_args()
    base.ensure_tools()
    if not shutil.which("curl"):
        base.sh(["apt-get", "install", "-y", "-q", "curl"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))

    scratch = tempfile.mkdtemp(prefix="rc-access-", dir="/dev/shm")
    sshd = base.Sshd(scratch)
    runctl = base.Runctl(os.path.abspath(args.bin_dir), scratch)
    served = os.path.join(scratch, "served")
    os.makedirs(served)
    with open(os.path.join(served, "big.bin"), "wb") as f:
        f.write(os.urandom(args.mb * 1_000_000))
    http_port = base.free_port()
    http = subprocess.Popen(
        ["python3", "-m", "http.server", str(http_port), "--bind", "127.0.0.1"],
        cwd=served, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    procs = [http]
    try:
        run = runctl.new_run()
        cli = [runctl.cli]
        ssh = sshd.ssh.split()
        control = os.path.join(scratch, "cm.sock")
        ssh_cm = [*ssh, "-o", "ControlMaster=auto", "-o", f"ControlPath={control}", "-o", "ControlPersist=120"]
        subprocess.run([*ssh_cm, "root@127.0.0.1", "true"], check=True)

        # exec: first output.
        ours = [first_line([*cli, "exec", run, "--", "echo", "first"], runctl.env) for _ in range(args.runs)]
        cold = [first_line([*ssh, "root@127.0.0.1", "echo first"]) for _ in range(args.runs)]
        master = [first_line([*ssh_cm, "root@127.0.0.1", "echo first"]) for _ in range(args.runs)]

        # forward: throughput.
        wait_port(http_port)
        local_ours, local_ssh = base.free_port(), base.free_port()
        fwd = subprocess.Popen([*cli, "forward", run, f"{local_ours}:{http_port}"], env=runctl.env, stderr=subprocess.PIPE)
        procs.append(fwd)
        fwd.stderr.readline()
        tunnel = subprocess.Popen([*ssh, "-N", "-L", f"{local_ssh}:127.0.0.1:{http_port}", "root@127.0.0.1"])
        procs.append(tunnel)
        wait_port(local_ssh)
        rounds = max(3, args.runs // 5)
        direct = [download(f"http://127.0.0.1:{http_port}/big.bin")[0] for _ in range(2)]
        fwd_ours, fwd_ssh = [], []
        for _ in range(rounds):
            fwd_ours.append(download(f"http://127.0.0.1:{local_ours}/big.bin")[0])
            fwd_ssh.append(download(f"http://127.0.0.1:{local_ssh}/big.bin")[0])

        # shell: keystroke round trip.
        keys_ours = keystrokes([*cli, "shell", run], dict(runctl.env, TERM="dumb"), 100)
        keys_ssh = keystrokes([*ssh, "-tt", "root@127.0.0.1"], dict(os.environ, TERM="dumb"), 100)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        runctl.stop()
        sshd.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    mbs = statistics.median
    exec_ratio = ms(ours) / ms(cold)
    fwd_ratio = mbs(fwd_ours) / mbs(fwd_ssh)
    print(f"exec first output, median of {args.runs}:")
    print(f"  runctl exec            {ms(ours):7.1f} ms")
    print(f"  ssh (cold)             {ms(cold):7.1f} ms   runctl/ssh = {exec_ratio:.2f}x (target <= 0.5x: {'met' if exec_ratio <= 0.5 else 'NOT met'})")
    print(f"  ssh (ControlMaster)    {ms(master):7.1f} ms   runctl/ssh = {ms(ours) / ms(master):.2f}x")
    print(f"forward, one {args.mb} MB download, median of {rounds}:")
    print(f"  direct (no forward)    {mbs(direct):7.0f} MB/s")
    print(f"  runctl forward         {mbs(fwd_ours):7.0f} MB/s")
    print(f"  ssh -L                 {mbs(fwd_ssh):7.0f} MB/s   runctl/ssh = {fwd_ratio:.2f}x (aim >= 1.0x: {'met' if fwd_ratio >= 1.0 else 'not met'}; below 0.7x is a defect: {'no' if fwd_ratio >= 0.7 else 'YES'})")
    print("shell keystroke round trip, median of 100:")
    print(f"  runctl shell           {ms(keys_ours):7.2f} ms")
    print(f"  ssh -tt                {ms(keys_ssh):7.2f} ms   runctl/ssh = {ms(keys_ours) / ms(keys_ssh):.2f}x")
    print(json.dumps({
        "exec_ms": ms(ours), "ssh_cold_ms": ms(cold), "ssh_master_ms": ms(master),
        "forward_mb_s": mbs(fwd_ours), "ssh_l_mb_s": mbs(fwd_ssh), "direct_mb_s": mbs(direct),
        "key_ms": ms(keys_ours), "ssh_key_ms": ms(keys_ssh),
    }))


if __name__ == "__main__":
    main()
