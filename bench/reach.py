#!/usr/bin/env python3
"""Code sync and time to first output over every carrier, next to rsync over ssh, in one
run on the same tree (loopback, tmpfs): UDP direct, UDP via relay, TCP direct, TCP via
relay. Then the relay alone: CPU seconds per GiB forwarded, with a registered "daemon"
that only reads and an "agent" that only sends datagrams (so QUIC's own cost, which
would saturate both cores first, is not in the figure).

Usage: bench/reach.py [--runs N] [--files N] [--mb N] [--bin-dir DIR] [--gib N] [--relay-only]

Needs the release binaries (`cargo build --release --bins`, or --bin-dir) and Debian's
`openssh-server` and `rsync` (installed when missing). Prints the ratios and whether each
target of issue 13 is met: via relay, no-op sync and a 20-file change at most 0.5x
rsync-over-ssh's time; over TCP, a first sync at most 1.5x UDP direct's; the relay
forwards at least 200 MB/s on one core."""

import argparse
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sync_vs_rsync as base  # noqa: E402

PATHS = [
    ("udp direct", "udp://127.0.0.1:{port}"),
    ("udp via relay", "udp+relay://{relay}"),
    ("tcp direct", "tcp://127.0.0.1:{port}"),
    ("tcp via relay", "tcp+relay://{relay}"),
]


class Relay:
    def __init__(self, bin_dir, ca, scratch):
        self.state = os.path.join(scratch, "relay-state")
        self.proc = subprocess.Popen(
            [os.path.join(bin_dir, "runctl-relay"), "--listen", "127.0.0.1:0", "--ca-sha256", ca, "--state-dir", self.state],
            stderr=subprocess.PIPE,
            text=True,
        )
        first = self.proc.stderr.readline()
        self.addr = next(w.rstrip(",") for w in first.split() if w.count(":") == 1 and w[0].isdigit())
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def cpu_seconds(self):
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Runctl(base.Runctl):
    """The sync benchmark's driver, plus a relay and moving the agent between paths."""

    def __init__(self, bin_dir, scratch):
        self.bin_dir = bin_dir
        super().__init__(bin_dir, scratch)
        self.home = self.env["RUNCTL_HOME"]
        status = self.call("status")
        self.port = status["quic_addr"].rsplit(":", 1)[1]
        self.ca = status["ca_sha256"]

    def use_relay(self, relay):
        config = os.path.join(self.home, "config.toml")
        text = open(config).read() if os.path.exists(config) else ""
        with open(config, "w") as f:
            f.write(f'[daemon]\nrelay = "{relay}"\n' + text)
        subprocess.run([self.cli, "shutdown"], env=self.env, capture_output=True)
        deadline = time.time() + 20
        while not (self.call("status").get("relay") or {}).get("registered"):
            if time.time() > deadline:
                raise SystemExit("the daemon did not register with the relay")
            time.sleep(0.1)

    def move_agent(self, endpoint, path):
        config = os.path.join(self.home, "local", "bench", "agent.toml")
        subprocess.run(["pkill", "-9", "-f", config])
        time.sleep(0.3)
        lines = [line for line in open(config) if not line.startswith("controller")]
        with open(config, "w") as f:
            f.write(f'controller = ["{endpoint}"]\n' + "".join(lines))
        subprocess.Popen([os.path.join(self.bin_dir, "runctl-agent"), "--config", config], stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while not any(a["instance"] == "bench" and a["path"]["path"] == path for a in self.call("status")["agents"]):
            if time.time() > deadline:
                raise SystemExit(f"the agent did not connect {path}")
            time.sleep(0.05)

    def stop(self):
        """Terminates the instance and stops the daemon, and kills the agent this script
        started itself (the daemon no longer knows its process)."""
        super().stop()
        subprocess.run(["pkill", "-9", "-f", os.path.join(self.home, "local", "bench", "agent.toml")])

    def first_output(self, workdir):
        start = time.perf_counter()
        proc = subprocess.Popen([self.cli, "run", "--on", "bench", "--workdir", workdir, "--", "echo", "first"], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        proc.stdout.readline()
        took = time.perf_counter() - start
        proc.wait()
        return took


def relay_throughput(relay, home, gib):
    """Registers as the daemon with the controller's relay certificate, reads and drops;
    one UDP socket sends `gib` GiB of 1,400-byte datagrams to the relay."""
    pki = os.path.join(home, "pki")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    chain = os.path.join(pki, "relay-chain.pem")
    with open(chain, "w") as f:
        f.write(open(os.path.join(pki, "relay-client.crt")).read() + open(os.path.join(pki, "ca.crt")).read())
    ctx.load_cert_chain(chain, os.path.join(pki, "relay-client.key"))
    ctx.set_alpn_protocols(["runctl-relay-register/1"])
    host, port = relay.addr.rsplit(":", 1)
    link = ctx.wrap_socket(socket.create_connection((host, int(port))), server_hostname="runctl-relay")
    link.sendall(b"\x00\x01\x00")  # one record: a Ping
    received = [0]

    def read():
        while True:
            data = link.recv(1 << 20)
            if not data:
                return
            received[0] += len(data)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 10
    while received[0] < 3:  # the Pong: the relay took the registration
        if time.time() > deadline:
            raise SystemExit("the relay did not answer the registration's Ping")
        time.sleep(0.05)
    received[0] = 0
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = os.urandom(1400)
    total = int(gib * (1 << 30))
    cpu0, t0 = relay.cpu_seconds(), time.perf_counter()
    sent = 0
    while sent < total:
        try:
            udp.sendto(payload, (host, int(port)))
            sent += len(payload)
        except BlockingIOError:
            pass
    time.sleep(1.0)
    cpu, took = relay.cpu_seconds() - cpu0, time.perf_counter() - t0
    link.close()
    # Each forwarded datagram arrives as a record: 2 length bytes and an 11-byte IPv4 flow header.
    forwarded = received[0] * len(payload) // (len(payload) + 13)
    return sent, forwarded, cpu, took


def relay_report(relay, home, gib):
    """Runs the relay-alone case, prints it, returns MB forwarded per CPU-second."""
    sent, forwarded, cpu, took = relay_throughput(relay, home, gib)
    gib_fwd = forwarded / (1 << 30)
    rate = forwarded / 1e6 / max(cpu, 1e-9)
    print(f"\nrelay alone: sent {sent / 1e6:.0f} MB of datagrams in {took:.2f} s, forwarded {forwarded / 1e6:.0f} MB, "
          f"{cpu:.2f} CPU-s ({cpu / max(gib_fwd, 1e-9):.2f} CPU-s per GiB, {rate:.0f} MB per CPU-second)")
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--files", type=int, default=5_000)
    parser.add_argument("--mb", type=int, default=88)
    parser.add_argument("--gib", type=float, default=1.0, help="datagrams sent through the relay alone")
    parser.add_argument("--relay-only", action="store_true", help="only the relay-alone case")
    target_dir = os.environ.get("CARGO_TARGET_DIR", os.path.join(base.ROOT, "target"))
    parser.add_argument("--bin-dir", default=os.path.join(target_dir, "release"))
    opts = parser.parse_args()
    for b in ("runctl-controller", "runctl-agent", "runctl-relay"):
        if not os.path.exists(os.path.join(opts.bin_dir, b)):
            raise SystemExit(f"{opts.bin_dir}/{b} is missing: cargo build --release --bins (or pass --bin-dir)")
    scratch = tempfile.mkdtemp(prefix="runctl-reach-", dir="/dev/shm")
    if opts.relay_only:
        runctl = relay = None
        try:
            runctl = Runctl(opts.bin_dir, scratch)
            home, ca = runctl.home, runctl.ca
            runctl.stop()
            runctl = None
            relay = Relay(opts.bin_dir, ca, scratch)
            rate = relay_report(relay, home, opts.gib)
            print(f"\n  {'PASS' if rate >= 200 else 'FAIL'}  relay: ≥ 200 MB per CPU-second")
        finally:
            if runctl:
                runctl.stop()
            if relay:
                relay.stop()
            shutil.rmtree(scratch, ignore_errors=True)
        return
    base.ensure_tools()
    sshd = runctl = relay = None
    try:
        src = os.path.join(scratch, "src")
        base.generate(src, opts.files, opts.mb)
        editable = base.text_files(src)
        print(f"tree: {opts.files} files, about {opts.mb} MB, {opts.runs} runs per case, medians\n")
        sshd = base.Sshd(scratch)
        runctl = Runctl(opts.bin_dir, scratch)
        relay = Relay(opts.bin_dir, runctl.ca, scratch)
        runctl.use_relay(relay.addr)
        results = {}
        rnd = 0
        for name, pattern in PATHS:
            runctl.move_agent(pattern.format(port=runctl.port, relay=relay.addr), name)
            cases = {"first": [], "noop": [], "change20": [], "first output": []}
            for _ in range(opts.runs):
                run = runctl.new_run()
                cases["first"].append(runctl.sync(run, src)[0])
                cases["noop"].append(runctl.sync(run, src)[0])
                base.change_20(src, editable, rnd)
                rnd += 1
                cases["change20"].append(runctl.sync(run, src)[0])
                cases["first output"].append(runctl.first_output(runctl.empty))
                subprocess.run([runctl.cli, "stop", run], env=runctl.env, capture_output=True)
            results[name] = {k: statistics.median(v) for k, v in cases.items()}
        rs = {"first": [], "noop": [], "change20": [], "first output": []}
        for r in range(opts.runs):
            dst = os.path.join(scratch, f"rsync-dst-{r}")
            rs["first"].append(base.rsync(sshd, src, dst, False)[0])
            rs["noop"].append(base.rsync(sshd, src, dst, False)[0])
            base.change_20(src, editable, rnd)
            rnd += 1
            rs["change20"].append(base.rsync(sshd, src, dst, False)[0])
            start = time.perf_counter()
            base.sh([*sshd.ssh.split(), "root@127.0.0.1", "echo", "first"])
            rs["first output"].append(time.perf_counter() - start)
            shutil.rmtree(dst, ignore_errors=True)
        results["rsync over ssh"] = {k: statistics.median(v) for k, v in rs.items()}

        cols = ["first", "noop", "change20", "first output"]
        print(f"{'path':<16}" + "".join(f"{c:>14}" for c in cols))
        for name, row in results.items():
            print(f"{name:<16}" + "".join(f"{row[c]:>13.3f}s" for c in cols))
        ssh = results["rsync over ssh"]
        print("\nratios to rsync over ssh (time):")
        for name, _ in PATHS:
            print(f"  {name:<14}" + "".join(f"  {c} {results[name][c] / ssh[c]:.2f}×" for c in cols))

        # The daemon would re-register and take the link back: stop it (and the agent) first.
        home = runctl.home
        runctl.stop()
        runctl = None
        rate = relay_report(relay, home, opts.gib)

        verdicts = [
            ("via relay (udp): no-op sync ≤ 0.5× rsync", results["udp via relay"]["noop"] <= 0.5 * ssh["noop"]),
            ("via relay (udp): 20-file change ≤ 0.5× rsync", results["udp via relay"]["change20"] <= 0.5 * ssh["change20"]),
            ("via relay (tcp): no-op sync ≤ 0.5× rsync", results["tcp via relay"]["noop"] <= 0.5 * ssh["noop"]),
            ("via relay (tcp): 20-file change ≤ 0.5× rsync", results["tcp via relay"]["change20"] <= 0.5 * ssh["change20"]),
            ("tcp direct: first sync ≤ 1.5× udp direct", results["tcp direct"]["first"] <= 1.5 * results["udp direct"]["first"]),
            ("relay: ≥ 200 MB per CPU-second", rate >= 200),
        ]
        print()
        for what, ok in verdicts:
            print(f"  {'PASS' if ok else 'FAIL'}  {what}")
    finally:
        if runctl:
            runctl.stop()
        if relay:
            relay.stop()
        if sshd:
            sshd.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
