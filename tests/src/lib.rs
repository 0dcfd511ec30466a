//! The end-to-end harness: a private controller home per test, the real
//! `runctl-controller` and `runctl-agent` binaries, and cleanup that leaves no daemon or
//! agent process behind.

pub mod reach;
pub mod runpod;
pub mod s3;
pub mod terminal;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The directory holding the workspace's binaries (`target/debug`), found from this test
/// executable's own path (`target/debug/deps/...`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("target profile dir").to_owned()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// The repository root. Read at run time (cargo sets it for tests): a test binary reused
/// from a shared target dir may have been compiled in another checkout.
pub fn repo_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    Path::new(&manifest_dir)
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The test doubles in `tests/fixtures` (IMDS, nvidia-smi).
pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// A command for `program`, run inside network namespace `netns` when one is given.
pub fn in_netns(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        None => Command::new(program),
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
    }
}

/// A port free on 127.0.0.1 for both UDP and TCP, for a daemon's fixed `listen` (which
/// binds both): a UDP port alone may be some connection's local TCP port.
pub fn free_daemon_port() -> u16 {
    for _ in 0..64 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("a free UDP port");
        let port = udp.local_addr().expect("its address").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

/// Waits for `child` to exit, killing it and failing the test after `bound`.
pub fn wait_exit(child: &mut std::process::Child, bound: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not exit within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A controller home in a temporary directory, with a daemon started on demand.
#[derive(Debug)]
pub struct Home {
    pub dir: tempfile::TempDir,
    /// The network namespace its CLI (and so its daemon) runs in, for the netns tests.
    pub netns: Option<String>,
    /// The clock-offset file its CLI, daemon and local agents read (`protocol::clock`).
    pub clock: Option<PathBuf>,
    /// The agent binary its local instances run (`RUNCTL_AGENT_BIN`), when not the built one.
    pub agent_bin: Option<PathBuf>,
}

impl Default for Home {
    fn default() -> Self {
        Self::new()
    }
}

impl Home {
    pub fn new() -> Self {
        Self::with_config("")
    }

    /// A home whose config.toml holds `extra` after the test defaults (e.g. a
    /// `[local.agent]` table).
    pub fn with_config(extra: &str) -> Self {
        // Short paths: the daemon's Unix socket path must stay under ~100 bytes.
        let dir = tempfile::Builder::new()
            .prefix("rc")
            .tempdir_in("/tmp")
            .expect("tempdir");
        std::fs::write(
            dir.path().join("config.toml"),
            format!("[daemon]\nlisten = \"127.0.0.1:0\"\nstop_grace_secs = 3\n{extra}"),
        )
        .expect("write config");
        Home {
            dir,
            netns: None,
            clock: None,
            agent_bin: None,
        }
    }

    /// The same home, its CLI, daemon and local agents reading their wall clock through
    /// the test hook (`protocol::clock`), moved with [`Home::set_clock_offset`].
    pub fn with_clock_hook(mut self) -> Self {
        let file = self.path().join("clock-offset");
        std::fs::write(&file, "0").expect("write clock offset");
        self.clock = Some(file);
        self
    }

    /// Moves the hooked wall clock to `secs` from the real one (a jump, as an NTP step
    /// makes); every process of this home sees it at its next reading.
    pub fn set_clock_offset(&self, secs: i64) {
        let file = self.clock.as_ref().expect("a home with_clock_hook");
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, secs.to_string()).expect("write clock offset");
        std::fs::rename(&tmp, file).expect("move clock offset");
    }

    /// The same home, with its CLI and daemon run inside network namespace `netns`.
    pub fn in_netns(mut self, netns: &str) -> Self {
        self.netns = Some(netns.to_owned());
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A `runctl-controller` command bound to this home.
    pub fn cli(&self) -> Command {
        let mut cmd = in_netns(self.netns.as_deref(), &bin("runctl-controller"));
        cmd.env("RUNCTL_HOME", self.path())
            .env(
                "RUNCTL_AGENT_BIN",
                self.agent_bin
                    .clone()
                    .unwrap_or_else(|| bin("runctl-agent")),
            )
            .env_remove("RUNCTL_OUTPUT")
            .current_dir(repo_root());
        if let Some(clock) = &self.clock {
            cmd.env(protocol::clock::OFFSET_FILE_ENV, clock);
        }
        cmd
    }

    /// Runs the CLI to completion with `args`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cli()
            .args(args)
            .output()
            .expect("run runctl-controller")
    }

    /// The names of `run`'s complete checkpoints in the store, and the one `LATEST` names.
    pub fn checkpoint_names(&self, run: &str) -> (Vec<String>, Option<String>) {
        let listed = self.json(&["checkpoint", "list", run]);
        let names = listed["checkpoints"]
            .as_array()
            .unwrap_or_else(|| panic!("{listed}"))
            .iter()
            .map(|c| c["name"].as_str().expect("name").to_owned())
            .collect();
        (names, listed["latest"].as_str().map(str::to_owned))
    }

    /// Runs the CLI with `--output json` and parses stdout (the last line, for commands
    /// that print events first).
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self
            .cli()
            .arg("--output")
            .arg("json")
            .args(args)
            .output()
            .expect("run");
        json_output(&out, args)
    }

    pub fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.path().join("daemon.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Kills the agent of the first listed instance with SIGKILL, as a crash would.
    pub fn kill_agent(&self) {
        let list = self.json(&["list"]);
        let pid = list["instances"][0]["instance"]["pid"]
            .as_i64()
            .expect("the instance has an agent pid") as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the agent");
    }

    /// Starts the local agent of `instance` again from its config, as systemd would.
    pub fn restart_agent(&self, instance: &str) -> std::process::Child {
        self.restart_agent_in(instance, self.netns.as_deref())
    }

    /// Starts the local agent of `instance` again, inside network namespace `netns`.
    pub fn restart_agent_in(&self, instance: &str, netns: Option<&str>) -> std::process::Child {
        let config = self.path().join(format!("local/{instance}/agent.toml"));
        in_netns(netns, &bin("runctl-agent"))
            .arg("--config")
            .arg(&config)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("restart the agent")
    }

    /// Polls `check` until it holds, failing after `bound` with the end of the daemon's log.
    pub fn wait_until(&self, what: &str, bound: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + bound;
        while !check() {
            if Instant::now() >= deadline {
                let log =
                    std::fs::read_to_string(self.path().join("daemon.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "timed out after {bound:?} waiting for {what}; the daemon's log ends:\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        // Kill every local agent this home started, then the daemon.
        let local = self.path().join("local");
        if let Ok(entries) = std::fs::read_dir(&local) {
            for entry in entries.flatten() {
                let config = entry.path().join("agent.toml");
                kill_processes_with_arg(&config.display().to_string());
            }
        }
        let _ = self.run(&["shutdown"]);
    }
}

/// The last line of a `--output json` command's stdout, parsed.
pub fn json_output(out: &Output, args: &[&str]) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "{args:?}: stdout is not JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Kills processes whose command line contains `needle` (Linux /proc).
pub fn kill_processes_with_arg(needle: &str) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for proc in procs.flatten() {
        let Ok(pid) = proc.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(proc.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An attached `run` of a script that prints `line 1` to `line N`, one every `delay`
/// seconds: for tests that break something mid-stream and then check that every line
/// arrived exactly once, in order.
#[derive(Debug)]
pub struct CountedRun {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    got: Vec<String>,
    total: usize,
}

impl CountedRun {
    /// Starts `run ARGS -- python3 -c SCRIPT` in `home`.
    pub fn start(home: &Home, args: &[&str], total: usize, delay: f64) -> Self {
        use std::io::BufRead;
        let script = format!(
            "import time\nfor i in range(1, {}):\n    print(f'line {{i}}', flush=True)\n    time.sleep({delay})",
            total + 1
        );
        let mut child = home
            .cli()
            .arg("run")
            .args(args)
            .args(["--", "python3", "-c", &script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn run");
        let lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        CountedRun {
            child,
            lines,
            got: Vec::new(),
            total,
        }
    }

    /// The `run` process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads until `n` lines have been shown.
    pub fn read(&mut self, n: usize) {
        while self.got.len() < n {
            let line = self.lines.next().expect("a line").expect("utf-8");
            self.got.push(line);
        }
    }

    /// Reads the rest and checks the run exited 0 with every line exactly once, in order;
    /// returns what `run` wrote on stderr.
    pub fn finish(mut self) -> String {
        self.got
            .extend(self.lines.by_ref().map(|l| l.expect("utf-8")));
        let status = self.child.wait().expect("wait");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut self.child.stderr.take().expect("stderr"), &mut err)
            .expect("stderr");
        assert_eq!(status.code(), Some(0), "{err}");
        let expected: Vec<String> = (1..=self.total).map(|i| format!("line {i}")).collect();
        assert_eq!(self.got, expected, "every line exactly once, in order");
        err
    }
}

/// What a tree holds at one path.
#[derive(Debug, PartialEq, Eq)]
pub enum Node {
    File { hash: String, executable: bool },
    Link(std::path::PathBuf),
    Dir,
}

/// Every path under `root` (less `skip`) and what it holds.
pub fn snapshot(root: &Path, skip: &[&str]) -> std::collections::BTreeMap<String, Node> {
    let mut out = std::collections::BTreeMap::new();
    walk(root, root, skip, &mut out);
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    skip: &[&str],
    out: &mut std::collections::BTreeMap<String, Node>,
) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        if skip.contains(&rel.as_str()) {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).expect("meta");
        let node = if meta.is_symlink() {
            Node::Link(std::fs::read_link(&path).expect("link"))
        } else if meta.is_dir() {
            walk(root, &path, skip, out);
            Node::Dir
        } else {
            let mut hasher = blake3::Hasher::new();
            hasher
                .update_reader(std::fs::File::open(&path).expect("open"))
                .expect("read");
            Node::File {
                hash: hasher.finalize().to_hex().to_string(),
                executable: std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o100
                    != 0,
            }
        };
        out.insert(rel, node);
    }
}

/// `len` bytes that do not compress (xorshift from `seed`): the same for the same seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ seed;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data
}

/// A small tmpfs mounted over `dir` (created if missing), unmounted (lazily, so a process
/// still in it does not keep it) on drop: a disk that fills on cue.
#[derive(Debug)]
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it: `64m`) over `dir`; `None`,
    /// with a SKIPPED line naming `test`, without root.
    pub fn mount(test: &str, dir: &Path, size: &str) -> Option<SmallDisk> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED {test}: mounting a small tmpfs needs root");
            return None;
        }
        std::fs::create_dir_all(dir).expect("mkdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(status.success(), "mounting a tmpfs over {}", dir.display());
        Some(SmallDisk(dir.to_owned()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Kills every process in network namespace `ns` and deletes it (with the veth ends in it).
pub fn delete_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
}

/// The metadata double, serving on loopback; killed on drop.
#[derive(Debug)]
pub struct Imds {
    child: std::process::Child,
    pub port: u16,
    state: tempfile::TempDir,
}

impl Imds {
    pub fn start() -> Self {
        use std::io::BufRead;
        let state = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new("python3")
            .arg(fixture("imds_double.py"))
            .arg(state.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the metadata double");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("port line");
        let port = line.trim().parse().expect("a port");
        Imds { child, port, state }
    }

    /// Publishes a notice (`instance-action.json`, `rebalance.json`) for the agents that poll.
    pub fn notice(&self, file: &str, body: &str) {
        let tmp = self.state.path().join(format!("{file}.tmp"));
        std::fs::write(&tmp, body).expect("write notice");
        std::fs::rename(&tmp, self.state.path().join(file)).expect("publish notice");
    }

    /// Takes a notice back (a replacement instance has a metadata service of its own).
    pub fn withdraw(&self, file: &str) {
        let _ = std::fs::remove_file(self.state.path().join(file));
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every event of `run` stored so far, as `logs --output json` prints them (one JSON line
/// each), asked through `cli` (the CLI as the test's home runs it).
pub fn events_of(mut cli: Command, run: &str) -> Vec<serde_json::Value> {
    let out = cli
        .args(["--output", "json", "logs", run])
        .output()
        .expect("logs");
    stdout(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("seq").is_some())
        .collect()
}
