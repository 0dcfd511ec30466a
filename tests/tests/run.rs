//! The run path end to end: CLI -> daemon -> QUIC -> agent -> a real process, and back.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use tests::{Home, repo_root, stderr, stdout};

fn quickstart() -> String {
    repo_root()
        .join("examples/quickstart")
        .display()
        .to_string()
}

#[test]
fn quickstart_runs_end_to_end() {
    let home = Home::new();
    let out = home.run(&[
        "run",
        "--workdir",
        &quickstart(),
        "--env",
        "EPOCHS=6",
        "--env",
        "STEP_SECONDS=0.01",
        "--",
        "python3",
        "train.py",
    ]);
    let (out_text, err_text) = (stdout(&out), stderr(&out));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {out_text}\nstderr: {err_text}"
    );
    assert!(out_text.contains("epoch   6/6"), "{out_text}");
    assert!(
        out_text.contains("saved checkpoint ckpt-0005.json"),
        "{out_text}"
    );
    assert!(out_text.contains("done: w="), "{out_text}");
    assert!(
        !out_text.contains("runctl:"),
        "nothing but the remote output on stdout: {out_text}"
    );
    assert!(err_text.contains("succeeded (exit 0)"), "{err_text}");

    // The checkpoints exist on the agent side, where $RUNCTL_CHECKPOINT_DIR pointed.
    let list = home.json(&["list"]);
    let run = list["runs"][0]["id"].as_str().expect("run id").to_owned();
    let instance = list["runs"][0]["instance"]
        .as_str()
        .expect("instance")
        .to_owned();
    let ckpt = home.path().join(format!(
        "local/{instance}/state/runs/{run}/checkpoints/ckpt-0006.json"
    ));
    assert!(ckpt.is_file(), "{} exists", ckpt.display());

    // The instance launched for the run is terminated once the run is over.
    home.wait_until(
        "the run's instance to be terminated",
        Duration::from_secs(20),
        || home.json(&["list"])["instances"][0]["instance"]["state"] == "terminated",
    );
}

#[test]
fn exit_codes_and_streams_propagate() {
    let home = Home::new();
    let out = home.run(&["run", "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(stdout(&out), "out\n");
    assert!(stderr(&out).contains("err\n"), "{}", stderr(&out));
    assert!(stderr(&out).contains("failed (exit 7)"), "{}", stderr(&out));

    let out = home.run(&["run", "--", "sh", "-c", "kill -USR1 $$"]);
    assert_eq!(
        out.status.code(),
        Some(128 + 10),
        "a signal death is 128+N: {}",
        stderr(&out)
    );

    let out = home.run(&["run", "--", "no-such-program-runctl"]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("could not start \"no-such-program-runctl\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn detach_then_logs_list_and_status() {
    let home = Home::new();
    let started = home.json(&[
        "run",
        "--detach",
        "--keep",
        "--",
        "python3",
        "-c",
        "import time\nfor i in range(5):\n    print('tick', i)\n    time.sleep(0.2)",
    ]);
    let run = started["id"].as_str().expect("run id in JSON").to_owned();
    assert_eq!(started["state"], "running");

    let out = home.run(&["logs", "-f", &run]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "tick 0\ntick 1\ntick 2\ntick 3\ntick 4\n");

    let list = home.json(&["list"]);
    assert_eq!(list["runs"][0]["state"], "succeeded");
    assert_eq!(
        list["instances"][0]["connected"], true,
        "--keep kept the instance"
    );
    let status = home.run(&["status"]);
    assert!(
        stdout(&status)
            .starts_with("1 instance running ($0.000/h), 0 runs active, 1 agent connected"),
        "{}",
        stdout(&status)
    );

    // JSON logs: one event per line, then the run.
    let out = home
        .cli()
        .args(["--output", "json", "logs", &run])
        .output()
        .expect("logs");
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert!(
        lines[0]["kind"]["started"]["pid"].is_u64(),
        "{:?}",
        lines[0]
    );
    assert_eq!(lines[1]["kind"]["output"]["line"], "tick 0");
    assert_eq!(lines.last().expect("final")["state"], "succeeded");
}

#[test]
fn stop_runs_the_trainers_sigterm_handler() {
    let home = Home::new();
    assert!(home.run(&["launch", "--name", "box"]).status.success());
    let script = "import signal, sys, time\n\
def bye(*_):\n    print('handler ran', flush=True)\n    sys.exit(143)\n\
signal.signal(signal.SIGTERM, bye)\nprint('ready', flush=True)\nwhile True:\n    time.sleep(0.05)";
    let started = home.json(&[
        "run", "--on", "box", "--detach", "--", "python3", "-c", script,
    ]);
    let run = started["id"].as_str().expect("run id").to_owned();
    home.wait_until("the trainer to be ready", Duration::from_secs(20), || {
        stdout(&home.run(&["logs", &run])).contains("ready")
    });
    let stopped = home.json(&["stop", &run]);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert_eq!(stopped["exit"]["exited"]["code"], 143);
    assert!(stdout(&home.run(&["logs", &run])).contains("handler ran"));

    let again = home.run(&["stop", &run]);
    assert_eq!(
        again.status.code(),
        Some(4),
        "stopping an ended run is a conflict"
    );
    assert!(
        stderr(&again).contains("already ended"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn ctrl_c_stops_the_remote_process_gracefully() {
    let home = Home::new();
    let script = "import signal, sys, time\n\
def bye(*_):\n    print('graceful exit', flush=True)\n    sys.exit(3)\n\
signal.signal(signal.SIGTERM, bye)\nprint('ready', flush=True)\nwhile True:\n    time.sleep(0.05)";
    let mut child = home
        .cli()
        .args(["run", "--", "python3", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("utf-8"), "ready");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    assert_eq!(
        lines.next().expect("a line").expect("utf-8"),
        "graceful exit"
    );
    let status = child.wait().expect("wait");
    assert_eq!(
        status.code(),
        Some(3),
        "the CLI exits with the remote status"
    );
}

#[test]
fn terminate_refuses_active_runs_unless_forced() {
    let home = Home::new();
    assert!(home.run(&["launch", "--name", "busy"]).status.success());
    let started = home.json(&["run", "--on", "busy", "--detach", "--", "sleep", "60"]);
    let run = started["id"].as_str().expect("run id").to_owned();

    let refused = home.run(&["terminate", "busy"]);
    assert_eq!(refused.status.code(), Some(4));
    assert!(
        stderr(&refused).contains(&format!("busy has active runs: {run}")),
        "{}",
        stderr(&refused)
    );
    assert!(
        stderr(&refused).contains("To resolve:"),
        "{}",
        stderr(&refused)
    );

    let forced = home.json(&["terminate", "--force", "busy"]);
    assert_eq!(forced["instance"]["state"], "terminated");
    let list = home.json(&["list"]);
    assert!(list["runs"][0]["state"] != "running", "{list}");
    let pid = list["instances"][0]["instance"]["pid"]
        .as_u64()
        .expect("pid");
    // Gone, once the daemon has reaped it (it exits, or is killed, as terminate returns).
    home.wait_until(
        "the agent process to be gone",
        Duration::from_secs(5),
        || !std::path::Path::new(&format!("/proc/{pid}")).exists(),
    );

    let again = home.run(&["run", "--on", "busy", "--", "true"]);
    assert_eq!(again.status.code(), Some(4), "{}", stderr(&again));
}

#[test]
fn daemon_killed_mid_run_loses_and_duplicates_no_log_line() {
    let home = Home::new();
    let mut attached = tests::CountedRun::start(&home, &["--keep"], 400, 0.01);
    attached.read(30);

    // The daemon dies while it streams the run to `run`; the agent and the trainer go on.
    let pid = home.daemon_pid().expect("daemon pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill daemon");

    // `run` brings a daemon back, the agent redials and replays what it missed, and the
    // stream resumes after the last line shown.
    let err = attached.finish();
    assert!(err.contains("reconnecting"), "{err}");
    assert_ne!(home.daemon_pid(), Some(pid), "a new daemon");

    let run = home.json(&["list"])["runs"][0]["id"]
        .as_str()
        .expect("run id")
        .to_owned();
    let out = home.run(&["logs", &run]);
    let expected: Vec<String> = (1..=400).map(|i| format!("line {i}")).collect();
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>(),
        expected,
        "and the log holds each once"
    );
}

#[test]
fn the_daemon_restarts_cleanly_and_keeps_its_state() {
    let home = Home::new();
    let out = home.run(&["run", "--", "echo", "before"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = home.json(&["status"]);
    let stopped = home.run(&["shutdown"]);
    assert!(stdout(&stopped).contains("stopped"), "{}", stdout(&stopped));
    assert!(
        !home.path().join("daemon.sock").exists(),
        "the socket is removed"
    );
    let again = home.json(&["status"]);
    let socket_mode = std::fs::metadata(home.path().join("daemon.sock"))
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(socket_mode & 0o777, 0o600, "the socket is owner-only");
    assert_ne!(again["pid"], status["pid"]);
    assert_eq!(
        again["quic_addr"], status["quic_addr"],
        "the QUIC port survives restarts"
    );
    assert_eq!(again["ca_sha256"], status["ca_sha256"], "so does the CA");
    let list = home.json(&["list"]);
    assert_eq!(list["runs"][0]["argv"][1], "before");
}

#[test]
fn bad_input_gets_clear_errors() {
    let home = Home::new();
    std::fs::write(
        home.path().join("config.toml"),
        "[daemon]\nlisten = \"127.0.0.1:0\"\nbogus = true\n",
    )
    .expect("write");
    let out = home.run(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("config.toml is invalid"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("unknown field `bogus`"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("line 3"), "{}", stderr(&out));
    let json = home.json(&["status"]);
    assert_eq!(json["error"]["code"], "bad_input");

    let home = Home::new();
    let out = home.run(&["logs", "run-1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("run-3f9a2c1b7d4e"),
        "{}",
        stderr(&out)
    );
    let json = home.json(&["logs", "run-1"]);
    assert_eq!(
        json["error"]["code"], "bad_input",
        "clap errors are JSON too"
    );
    let out = home.run(&["run", "--workdir", "/nonexistent/dir", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/dir"),
        "{}",
        stderr(&out)
    );
    let out = home.run(&["logs", "run-000000000000"]);
    assert_eq!(out.status.code(), Some(3));
    let out = home.run(&["run", "--env", "1BAD=x", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not a valid variable name"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_restarted_agent_reconnects_with_its_certificate_and_reports_lost_runs() {
    let home = Home::new();
    assert!(home.run(&["launch", "--name", "flaky"]).status.success());
    let started = home.json(&["run", "--on", "flaky", "--detach", "--", "sleep", "60"]);
    let run = started["id"].as_str().expect("run id").to_owned();
    // The agent dies hard; its token is already burnt, so only its saved identity can
    // bring it back. No wait for the daemon to notice: the new connection replaces the
    // dead one.
    home.kill_agent();
    let mut agent = home.restart_agent("flaky");
    let out = home.run(&["logs", "-f", &run]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the agent restarted while this run was active"),
        "{}",
        stderr(&out)
    );
    assert_eq!(home.json(&["list"])["instances"][0]["connected"], true);

    let _ = agent.kill();
    let _ = agent.wait();
}

/// `logs -f | head`: once its reader goes away, `logs -f` ends quietly at once, and the
/// run goes on.
#[test]
fn logs_follow_stops_when_its_reader_goes_away() {
    let home = Home::new();
    let started = home.json(&[
        "run",
        "--detach",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 600 ]; do echo line $i; i=$((i+1)); sleep 0.1; done",
    ]);
    let run = started["id"].as_str().expect("id").to_owned();
    let mut child = home
        .cli()
        .args(["logs", "-f", &run])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("logs -f");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("a line");
    assert!(first.starts_with("line "), "{first}");
    drop(out);
    // Bounded: it must not keep following with nobody reading.
    let status = tests::wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(!err.contains("error"), "quietly: {err}");
    let row = home.json(&["list"]);
    assert_eq!(row["runs"][0]["state"], "running", "{row}");
    home.json(&["stop", &run]);
}

#[test]
fn a_terminated_instances_name_can_be_used_again() {
    let home = Home::new();
    let launched = home.run(&["launch", "--name", "box", "--wait"]);
    assert_eq!(launched.status.code(), Some(0), "{}", stderr(&launched));
    let ran = home.run(&["run", "--on", "box", "--", "echo", "first"]);
    assert_eq!(stdout(&ran), "first\n", "{}", stderr(&ran));
    let taken = home.run(&["launch", "--name", "box"]);
    assert_eq!(taken.status.code(), Some(4), "a live name is taken");
    assert!(
        stderr(&taken).contains("already exists"),
        "{}",
        stderr(&taken)
    );
    let gone = home.run(&["terminate", "box"]);
    assert_eq!(gone.status.code(), Some(0), "{}", stderr(&gone));

    let again = home.run(&["launch", "--name", "box", "--wait"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    let ran = home.run(&["run", "--on", "box", "--", "echo", "second"]);
    assert_eq!(stdout(&ran), "second\n", "{}", stderr(&ran));
    // The old record, and its run, moved aside under a name of their own.
    let list = home.json(&["list", "--all"]);
    let instances = list["instances"].as_array().expect("instances");
    let names: Vec<&str> = instances
        .iter()
        .map(|i| i["instance"]["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let old = names
        .iter()
        .find(|n| n.starts_with("box-t"))
        .unwrap_or_else(|| panic!("{names:?}"));
    let runs = list["runs"].as_array().expect("runs");
    let on = |word: &str| {
        runs.iter()
            .find(|r| r["argv"].to_string().contains(word))
            .map(|r| r["instance"].as_str().expect("instance").to_owned())
    };
    assert_eq!(on("first").as_deref(), Some(*old));
    assert_eq!(on("second").as_deref(), Some("box"));
    let _ = home.run(&["terminate", "box"]);
}

#[test]
fn a_local_agent_whose_home_is_deleted_stops_redialling() {
    let home = Home::new();
    let launched = home.run(&["launch", "--name", "orphan", "--wait"]);
    assert_eq!(launched.status.code(), Some(0), "{}", stderr(&launched));
    let pid = home.json(&["list"])["instances"][0]["instance"]["pid"]
        .as_i64()
        .expect("the agent's pid") as i32;
    let down = home.run(&["shutdown"]);
    assert_eq!(down.status.code(), Some(0), "{}", stderr(&down));
    std::fs::remove_dir_all(home.path().join("local/orphan")).expect("delete its dir");
    let alive = || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    home.wait_until(
        "the orphaned agent to exit",
        Duration::from_secs(60),
        || {
            // Reap it if it is our grandchild's zombie: the daemon is gone, so init has it.
            !alive()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        },
    );
}

/// A home whose local agent starts only once the file `go` exists in `scratch`, as a
/// cloud instance takes a while to boot: a daemon killed meanwhile dies after the instance
/// is recorded, before it enrolls.
fn slow_booting_home(scratch: &std::path::Path) -> Home {
    let slow = scratch.join("slow-agent");
    std::fs::write(
        &slow,
        format!(
            "#!/bin/sh\nwhile [ ! -e {go} ]; do sleep 0.1; done\nexec {agent} \"$@\"\n",
            go = scratch.join("go").display(),
            agent = tests::bin("runctl-agent").display()
        ),
    )
    .expect("write");
    std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut home = Home::new();
    home.agent_bin = Some(slow);
    home
}

/// Starts `args` and SIGKILLs the daemon once `list` shows an instance launching; the
/// command's output.
fn kill_daemon_mid_launch(home: &Home, args: &[&str]) -> std::process::Output {
    let cmd = home
        .cli()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    home.wait_until("an instance launching", Duration::from_secs(60), || {
        home.daemon_pid().is_some() && stdout(&home.run(&["list"])).contains("launching")
    });
    let pid = home.daemon_pid().expect("daemon pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill daemon");
    cmd.wait_with_output().expect("wait")
}

/// The state and agent pid of the only instance `list` shows.
fn only_instance(home: &Home) -> (String, Option<i32>) {
    let list = home.json(&["list", "--all"]);
    let instances = list["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 1, "{list}");
    let instance = &instances[0]["instance"];
    (
        instance["state"].as_str().expect("state").to_owned(),
        instance["pid"].as_i64().map(|p| p as i32),
    )
}

#[test]
fn a_daemon_killed_mid_launch_terminates_an_instance_made_for_a_run_that_never_started() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let home = slow_booting_home(scratch.path());
    let out = kill_daemon_mid_launch(&home, &["run", "--", "echo", "ran"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the daemon closed the connection"),
        "{}",
        stderr(&out)
    );
    let (_, pid) = only_instance(&home);
    // The next command brings a daemon back; it ends the instance nobody will use, and
    // its agent with it.
    home.wait_until(
        "the instance to be terminated",
        Duration::from_secs(60),
        || only_instance(&home).0 == "terminated",
    );
    let pid = pid.expect("the agent's pid was recorded");
    home.wait_until("its agent to be gone", Duration::from_secs(30), || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
    });
    assert_eq!(home.json(&["status"])["runs_active"], 0);
}

#[test]
fn a_daemon_killed_mid_launch_still_brings_up_an_instance_the_user_asked_for() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let home = slow_booting_home(scratch.path());
    let out = kill_daemon_mid_launch(&home, &["launch"]);
    assert!(!out.status.success());
    assert_eq!(only_instance(&home).0, "launching");
    std::fs::write(scratch.path().join("go"), b"").expect("boot");
    // The daemon that comes back watches the launch to its end, as the first would have.
    home.wait_until("the instance to come up", Duration::from_secs(60), || {
        only_instance(&home).0 == "running"
    });
    let name = home.json(&["list"])["instances"][0]["instance"]["name"]
        .as_str()
        .expect("name")
        .to_owned();
    let ran = home.run(&["run", "--on", &name, "--", "echo", "on it"]);
    assert!(ran.status.success(), "{}", stderr(&ran));
    assert!(stdout(&ran).contains("on it"));
    let _ = home.run(&["terminate", &name]);
}

#[test]
fn the_clock_jumping_an_hour_forward_and_back_loses_no_line_trips_no_cap_and_breaks_no_reconnect() {
    // One host: the daemon and the local agent read the same (hooked) wall clock.
    let home = Home::new().with_clock_hook();
    let mut attached = tests::CountedRun::start(&home, &["--max-hours", "1"], 300, 0.05);
    // Whatever happens, the test ends: a run that cannot reconnect would wait forever.
    let pid = attached.pid() as i32;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(120));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    attached.read(20);
    // Forward an hour: on the wall clock the run is past its 1-hour cap.
    home.set_clock_offset(3600);
    attached.read(100);
    // Back an hour and a minute: before every certificate of this home was issued. The
    // daemon dies, and the next one and the agent must still take each other's.
    home.set_clock_offset(-3660);
    let daemon = home.daemon_pid().expect("daemon pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill daemon");
    let err = attached.finish();
    assert!(err.contains("reconnecting"), "{err}");
    let run = home.json(&["list"])["runs"][0].clone();
    assert_eq!(run["state"], "succeeded", "{run}");
}
