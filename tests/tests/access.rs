//! exec, shell, forward and cp end to end: the real CLI, daemon and agent on loopback, real
//! processes on the instance (a local one: its loopback is this machine's), and for the
//! shell a real PTY on the laptop side driving the CLI.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::terminal::Terminal;
use tests::{Home, stderr, stdout};

/// A project whose setup makes a venv (an empty requirements.txt), started detached with a
/// long sleep: a run to exec into. Returns its id and instance.
fn sleeping_run(home: &Home, files: &[(&str, &str)]) -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().expect("project");
    std::fs::write(dir.path().join("requirements.txt"), "# nothing\n").expect("write");
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }
    let root = dir.path().display().to_string();
    let started = home.json(&[
        "run",
        "--workdir",
        &root,
        "--env",
        "SECRET_SAUCE=42",
        "--detach",
        "--",
        "sleep",
        "600",
    ]);
    assert_eq!(started["state"], "running", "{started}");
    let run = started["id"].as_str().expect("id").to_owned();
    let instance = started["instance"].as_str().expect("instance").to_owned();
    (dir, run, instance)
}

#[test]
fn exec_runs_in_the_runs_tree_with_its_environment_and_returns_its_status() {
    let home = Home::new();
    let (_dir, run, instance) = sleeping_run(&home, &[("data/x.txt", "x\n")]);

    // Stdout and stderr apart, the exit code, the start directory and the environment.
    let out = home.run(&[
        "exec",
        &run,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; ls data; echo \"$RUNCTL_RUN_ID $SECRET_SAUCE\"; command -v python3; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "out", "{text}");
    assert_eq!(lines[1], "x.txt", "{text}");
    assert_eq!(lines[2], format!("{run} 42"), "{text}");
    assert!(
        lines[3].ends_with(&format!("/runs/{run}/venv/bin/python3")),
        "the run's venv is first in PATH: {text}"
    );
    assert_eq!(stderr(&out), "err\n");

    // A signal is 128 + N, as a shell reports it.
    let out = home.run(&["exec", &run, "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));

    // Stdin from a file reaches the command, and its end closes the command's stdin.
    let script = tempfile::NamedTempFile::new().expect("script");
    std::fs::write(
        script.path(),
        "import os\nprint(sum(range(10)), os.environ['RUNCTL_RUN_ID'])\n",
    )
    .expect("write");
    let out = home
        .cli()
        .args(["exec", &run, "--", "python3", "-"])
        .stdin(std::fs::File::open(script.path()).expect("open"))
        .output()
        .expect("exec");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("45 {run}\n"));

    // 1 MiB through stdin and back, byte for byte.
    let blob: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let mut child = home
        .cli()
        .args(["exec", &run, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec cat");
    let mut input = child.stdin.take().expect("stdin");
    let feed = {
        let blob = blob.clone();
        std::thread::spawn(move || input.write_all(&blob).expect("feed"))
    };
    let mut echoed = Vec::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut echoed)
        .expect("read");
    feed.join().expect("feed thread");
    assert!(child.wait().expect("wait").success());
    assert!(echoed == blob, "cat returned {} bytes", echoed.len());

    // A program that does not exist: 127, as a shell says, with the reason.
    let out = home.run(&["exec", &run, "--", "no-such-program-here"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(stderr(&out).contains("no such program"), "{}", stderr(&out));

    // Given the instance, the command runs in the agent's home, outside any run.
    let out = home.run(&[
        "exec",
        &instance,
        "--",
        "sh",
        "-c",
        "echo ${RUNCTL_RUN_ID:-none}",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "none\n");

    // Ctrl-C here reaches the remote command as SIGINT.
    let mut child = home
        .cli()
        .args([
            "exec",
            &run,
            "--",
            "python3",
            "-c",
            "import signal,sys,time\nsignal.signal(signal.SIGINT, lambda *a: (print('got SIGINT', flush=True), sys.exit(5)))\nprint('ready', flush=True)\ntime.sleep(60)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec");
    let mut out = child.stdout.take().expect("stdout");
    let mut seen = String::new();
    read_until(&mut out, &mut seen, "ready", Duration::from_secs(20));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("interrupt");
    let status = tests::wait_exit(&mut child, Duration::from_secs(20));
    read_until(&mut out, &mut seen, "got SIGINT", Duration::from_secs(5));
    assert_eq!(status.code(), Some(5), "{seen}");

    // A command that ignores SIGINT: the third Ctrl-C hangs up, and the command goes.
    let mut child = home
        .cli()
        .args([
            "exec",
            &run,
            "--",
            "python3",
            "-c",
            "import os,signal,time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('pid', os.getpid(), flush=True)\ntime.sleep(60)",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("exec");
    let mut out = child.stdout.take().expect("stdout");
    let mut seen = String::new();
    read_until(&mut out, &mut seen, "\n", Duration::from_secs(20));
    let pid: i32 = seen
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {seen:?}"));
    for _ in 0..3 {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .expect("interrupt");
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = tests::wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(255));
    home.wait_until("the hung-up command to go", Duration::from_secs(15), || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
    });

    // Every one of them is a line in the agent's audit log.
    let audit = std::fs::read_to_string(
        home.path()
            .join(format!("local/{instance}/state/audit.log")),
    )
    .expect("audit log");
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 8, "{audit}");
    assert!(
        lines[7]["end"]
            .as_str()
            .expect("end")
            .starts_with("hung up"),
        "{audit}"
    );
    assert!(lines.iter().all(|l| l["what"] == "exec"), "{audit}");
    assert_eq!(lines[0]["end"], "exit 7", "{audit}");
    assert_eq!(lines[1]["end"], "signal 15", "{audit}");
    assert_eq!(lines[0]["place"], run.as_str());
    assert_eq!(lines[5]["place"], "home");
    assert!(
        lines[0]["who"].as_str().expect("who").contains('@'),
        "{audit}"
    );
    assert!(
        lines[4]["end"]
            .as_str()
            .expect("end")
            .starts_with("failed: could not start"),
        "{audit}"
    );
}

fn read_until(from: &mut impl Read, seen: &mut String, needle: &str, bound: Duration) {
    let deadline = Instant::now() + bound;
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} in {seen:?}");
        match from.read(&mut buf) {
            Ok(0) => panic!("ended before {needle:?}: {seen:?}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => panic!("reading: {e}"),
        }
    }
}

#[test]
fn shell_is_a_real_terminal_with_sizes_signals_and_the_exit_status() {
    let home = Home::new();
    let (_dir, run, _instance) = sleeping_run(&home, &[]);
    let mut term = Terminal::spawn(&home, &["shell", &run]);
    let bound = Duration::from_secs(20);

    // The run's environment.
    term.type_text("echo \"id=$RUNCTL_RUN_ID term=$TERM\"\r");
    let at = term.expect(0, &format!("id={run} term=xterm-256color"), bound);

    // The window size at the start, and after a resize.
    term.type_text("stty size\r");
    let at = term.expect(at, "24 80", bound);
    term.pty
        .resize(pty_process::Size::new(40, 100))
        .expect("resize");
    // SIGWINCH reaches the CLI, which passes the size on; give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    term.type_text("stty size\r");
    let at = term.expect(at, "40 100", bound);

    // Ctrl-C interrupts the remote foreground job, not the shell or the CLI.
    term.type_text("sleep 100\r");
    std::thread::sleep(Duration::from_millis(500));
    let began = Instant::now();
    term.type_text("\x03");
    term.type_text("echo after-ctrl-$((40+2))\r");
    let at = term.expect(at, "after-ctrl-42", bound);
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "sleep was interrupted"
    );

    // Ctrl-Z stops it; the shell takes it back with fg and Ctrl-C ends it.
    term.type_text("sleep 100\r");
    std::thread::sleep(Duration::from_millis(500));
    term.type_text("\x1a");
    let at = term.expect(at, "Stopped", bound);
    term.type_text("jobs\r");
    let at = term.expect(at, "sleep 100", bound);
    term.type_text("kill %1\r");
    let _ = at;

    // The shell's exit status is the CLI's.
    term.type_text("exit 3\r");
    let status = tests::wait_exit(&mut term.child, bound);
    assert_eq!(status.code(), Some(3), "{}", term.seen());
    assert!(term.printed() > 0);
}

#[test]
fn shell_without_a_terminal_points_to_exec() {
    let home = Home::new();
    let (_dir, run, _) = sleeping_run(&home, &[]);
    let out = home.run(&["shell", &run]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("shell needs a terminal"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("exec"), "{}", stderr(&out));
}

/// A forward running in the background; its listening address read from its stderr.
struct Forward {
    child: Child,
    local: String,
}

impl Forward {
    fn start(home: &Home, target: &str, spec: &str) -> Self {
        let mut child = home
            .cli()
            .args(["forward", target, spec])
            .stderr(Stdio::piped())
            .spawn()
            .expect("forward");
        let mut err = child.stderr.take().expect("stderr");
        let mut seen = String::new();
        read_until(&mut err, &mut seen, "\n", Duration::from_secs(30));
        let local = seen
            .split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("no address in {seen:?}"))
            .to_owned();
        assert!(seen.starts_with("runctl: forwarding 127.0.0.1:"), "{seen}");
        // Keep draining stderr so the CLI never blocks on it.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = err.read_to_end(&mut sink);
        });
        Forward { child, local }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server on the instance (this machine's loopback, for a local instance).
struct Server(Child);

impl Server {
    /// A Python TCP server: `serve` runs with `s` listening on a free port (and `socket`,
    /// `struct`, `time` imported); returns once it accepts connections.
    fn python(serve: &str) -> (Server, u16) {
        let port = free_port();
        let program = format!(
            "import socket,struct,sys,time\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1', {port})); s.listen(8)\n{serve}"
        );
        let server = Server(
            Command::new("python3")
                .args(["-c", &program])
                .spawn()
                .expect("python3"),
        );
        wait_listening(port);
        (server, port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn forward_carries_many_connections_byte_for_byte_and_resets_through() {
    let home = Home::new();
    let (_dir, run, _) = sleeping_run(&home, &[]);
    let served = tempfile::tempdir().expect("served");
    let big: Vec<u8> = {
        let mut state = 0x1234_5678u64;
        (0..100 << 20)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    std::fs::write(served.path().join("big.bin"), &big).expect("write");
    let small: Vec<u8> = (0..256 * 1024).map(|i: u32| (i % 253) as u8).collect();
    std::fs::write(served.path().join("small.bin"), &small).expect("write");
    let http_port = free_port();
    let _http = Server(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                &http_port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .current_dir(served.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("http.server"),
    );
    wait_listening(http_port);
    let forward = Forward::start(&home, &run, &format!("0:{http_port}"));

    // 50 downloads at once, each whole.
    let handles: Vec<_> = (0..50)
        .map(|_| {
            let url = format!("http://{}/small.bin", forward.local);
            std::thread::spawn(move || {
                let mut body = Vec::new();
                ureq::get(&url)
                    .call()
                    .expect("get")
                    .into_body()
                    .into_reader()
                    .read_to_end(&mut body)
                    .expect("read");
                body
            })
        })
        .collect();
    for handle in handles {
        assert!(
            handle.join().expect("download") == small,
            "a small download differs"
        );
    }

    // 100 MB, byte for byte.
    let mut body = Vec::new();
    ureq::get(&format!("http://{}/big.bin", forward.local))
        .call()
        .expect("get")
        .into_body()
        .into_with_config()
        .limit(200 << 20)
        .reader()
        .read_to_end(&mut body)
        .expect("read");
    assert_eq!(body.len(), big.len());
    assert!(
        blake3::hash(&body) == blake3::hash(&big),
        "the 100 MB download differs"
    );

    // A half-close reaches the server, whose answer still comes back.
    let (_echo, echo_port) = Server::python(
        "while True:\n    c,_=s.accept(); n=0\n    while True:\n        b=c.recv(65536)\n        if not b: break\n        n+=len(b)\n    c.sendall(b'got %d bytes' % n); c.close()",
    );
    let echo_forward = Forward::start(&home, &run, &format!("0:{echo_port}"));
    let mut conn = TcpStream::connect(&echo_forward.local).expect("connect");
    conn.write_all(&vec![1u8; 300_000]).expect("write");
    conn.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut answer = String::new();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    conn.read_to_string(&mut answer).expect("read the answer");
    assert_eq!(answer, "got 300000 bytes");

    // The server resetting mid-transfer reaches the local client as a reset.
    let (_resetter, reset_port) = Server::python(
        "while True:\n    c,_=s.accept(); c.sendall(b'x' * 100000); time.sleep(0.3)\n    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0)); c.close()",
    );
    let reset_forward = Forward::start(&home, &run, &format!("0:{reset_port}"));
    let mut conn = TcpStream::connect(&reset_forward.local).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut got = 0usize;
    let mut buf = [0u8; 65536];
    let error = loop {
        match conn.read(&mut buf) {
            Ok(0) => panic!("a clean end after {got} bytes, not a reset"),
            Ok(n) => got += n,
            Err(e) => break e,
        }
    };
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionReset,
        "{error} after {got} bytes"
    );
}

#[test]
fn run_forward_opens_for_the_runs_life() {
    let home = Home::new();
    let port = free_port();
    let dir = tempfile::tempdir().expect("project");
    std::fs::write(dir.path().join("hello.txt"), "from the instance\n").expect("write");
    let root = dir.path().display().to_string();
    let mut child = home
        .cli()
        .args([
            "run",
            "--workdir",
            &root,
            "--forward",
            &format!("0:{port}"),
            "--",
            "python3",
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let mut err = child.stderr.take().expect("stderr");
    let mut seen = String::new();
    read_until(
        &mut err,
        &mut seen,
        "runctl: forwarding 127.0.0.1:",
        Duration::from_secs(60),
    );
    // The whole line: the local address is followed by where it goes.
    read_until(
        &mut err,
        &mut seen,
        &format!(" to 127.0.0.1:{port}"),
        Duration::from_secs(5),
    );
    let at = seen.find("runctl: forwarding ").expect("line");
    let local = seen[at..]
        .split_whitespace()
        .nth(2)
        .expect("address")
        .to_owned();
    wait_listening(port);
    let body = ureq::get(&format!("http://{local}/hello.txt"))
        .call()
        .unwrap_or_else(|e| panic!("get through the run's forward at {local}: {e}; {seen}"))
        .into_body()
        .read_to_string()
        .expect("body");
    assert_eq!(body, "from the instance\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("stop the run");
    tests::wait_exit(&mut child, Duration::from_secs(30));
    let gone = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&local).is_ok() {
        assert!(Instant::now() < gone, "the forward outlived its run");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .expect("stat")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn cp_round_trips_a_tree_and_refuses_escapes() {
    let home = Home::new();
    let (_dir, run, instance) = sleeping_run(&home, &[]);
    let local = tempfile::tempdir().expect("local");
    let tree = local.path().join("configs");
    std::fs::create_dir_all(tree.join("深い/sub")).expect("mkdir");
    std::fs::write(tree.join("深い/sub/ünïcödé ✓.yaml"), "lr: 0.1\n").expect("write");
    std::fs::write(tree.join("train.sh"), "#!/bin/sh\necho go\n").expect("write");
    std::fs::set_permissions(
        tree.join("train.sh"),
        std::fs::Permissions::from_mode(0o750),
    )
    .expect("chmod");
    std::fs::write(tree.join("big.bin"), vec![3u8; 5 << 20]).expect("write");

    // Up: into the run's tree under its own name, runnable there.
    let configs = tree.display().to_string();
    let out = home.run(&["cp", &configs, &format!("{run}:uploaded")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = home.run(&["exec", &run, "--", "sh", "uploaded/train.sh"]);
    assert_eq!(stdout(&out), "go\n", "{}", stderr(&out));

    // Down again into an existing directory: it lands under its own name.
    let back = local.path().join("back");
    std::fs::create_dir(&back).expect("mkdir");
    let out = home.run(&[
        "cp",
        &format!("{run}:uploaded"),
        &back.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let copied = back.join("uploaded");
    assert_eq!(
        tests::snapshot(&copied, &[]),
        tests::snapshot(&tree, &[]),
        "the tree came back as it went"
    );
    assert_eq!(mode(&copied.join("train.sh")), 0o750);

    // One file, to a new name.
    let one = local.path().join("one.yaml");
    let out = home.run(&[
        "--output",
        "json",
        "cp",
        &format!("{run}:uploaded/深い/sub/ünïcödé ✓.yaml"),
        &one.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&one).expect("read"), "lr: 0.1\n");
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    assert_eq!(json["bytes"], 8);

    // Paths that leave the run's tree, or the allowed roots, are refused.
    for path in ["../../../../etc/passwd", "/etc/passwd", "uploaded/../../.."] {
        let out = home.run(&[
            "cp",
            &format!("{run}:{path}"),
            &local.path().display().to_string(),
        ]);
        assert_eq!(out.status.code(), Some(4), "{path}: {}", stderr(&out));
    }
    let out = home.run(&["cp", &configs, &format!("{run}:../outside")]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("leaves"), "{}", stderr(&out));
    let out = home.run(&["cp", &configs, &format!("{run}:/etc/runctl-planted")]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("copy_roots"), "{}", stderr(&out));
    assert!(!Path::new("/etc/runctl-planted").exists());

    // A symlink in the tree that points out of it does not lead a copy out.
    let out = home.run(&["exec", &run, "--", "ln", "-s", "/etc", "escape"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = home.run(&[
        "cp",
        &format!("{run}:escape/hostname"),
        &local.path().display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("symlink"), "{}", stderr(&out));

    // Neither or both sides remote: a usage error.
    let out = home.run(&["cp", "a", "b"]);
    assert_eq!(out.status.code(), Some(2));
    let out = home.run(&["cp", &format!("{run}:a"), &format!("{instance}:b")]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_cut_copy_leaves_nothing_under_the_final_name() {
    let home = Home::new();
    let (_dir, run, instance) = sleeping_run(&home, &[]);
    let local = tempfile::tempdir().expect("local");
    let big = local.path().join("big.bin");
    {
        let mut file = std::fs::File::create(&big).expect("create");
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..400 {
            for byte in chunk.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state as u8;
            }
            file.write_all(&chunk).expect("write");
        }
    }
    // Up, with the CLI killed part-way: the agent keeps nothing under the name.
    let mut child = home
        .cli()
        .args([
            "cp",
            &big.display().to_string(),
            &format!("{run}:landed.bin"),
        ])
        .stderr(Stdio::null())
        .spawn()
        .expect("cp");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the copy was still going"
    );
    child.kill().expect("kill the CLI");
    let _ = child.wait();
    let work = home
        .path()
        .join(format!("local/{instance}/state/runs/{run}/work"));
    home.wait_until(
        "the agent to clear its staging",
        Duration::from_secs(20),
        || {
            std::fs::read_dir(&work)
                .expect("ls")
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with(".runctl-copy"))
        },
    );
    assert!(
        !work.join("landed.bin").exists(),
        "nothing under the final name"
    );

    // Down, with the agent killed part-way: nothing under the name here either, and the
    // CLI says what happened.
    let out = home.run(&[
        "cp",
        &big.display().to_string(),
        &format!("{run}:whole.bin"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let dest = local.path().join("down.bin");
    let child = home
        .cli()
        .args([
            "cp",
            &format!("{run}:whole.bin"),
            &dest.display().to_string(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("cp");
    std::thread::sleep(Duration::from_millis(1500));
    home.kill_agent();
    let out = child.wait_with_output().expect("cp ends");
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!dest.exists(), "nothing under the final name");
    let left: Vec<String> = std::fs::read_dir(local.path())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|n| !n.starts_with(".runctl-copy")),
        "no staging left: {left:?}"
    );
}

#[test]
fn switched_off_streams_are_refused_with_the_setting_named() {
    let home = Home::with_config("[agent]\nallow_shell = false\nallow_forward = false\n");
    let (_dir, run, instance) = sleeping_run(&home, &[]);
    let out = home.run(&["exec", &run, "--", "true"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("allow_shell = false"),
        "{}",
        stderr(&out)
    );
    let out = home.run(&["forward", &run, "0:80"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("allow_forward = false"),
        "{}",
        stderr(&out)
    );
    // Copies are governed by their roots, not by the switches.
    let out = home.run(&["exec", &instance, "--", "true"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let audit = std::fs::read_to_string(
        home.path()
            .join(format!("local/{instance}/state/audit.log")),
    )
    .expect("audit log");
    assert_eq!(audit.lines().count(), 3, "{audit}");
    assert!(
        audit.lines().all(|l| l.contains("\"end\":\"refused: ")),
        "{audit}"
    );

    // Forwarding to anything but the instance's loopback needs the host listed.
    let open = Home::new();
    let (_dir, run, _) = sleeping_run(&open, &[]);
    let out = open.run(&["forward", &run, "0:10.20.30.40:80"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("forward_hosts"), "{}", stderr(&out));
}
