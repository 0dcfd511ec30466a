//! The agent running the job, end to end with real Python trainers on loopback: restart
//! policy with RUNCTL_RESUME_FROM, stop escalation, spot notices from a metadata double,
//! a time cap held while the daemon is away, the idle timeout and end actions, stats with the trainer's RSS, setup detection, and
//! `logs --tail/--since`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent::procstat::{self, ProcStat};
use serde_json::Value;
use tests::{Home, Imds, fixture, stderr, stdout};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Starts `command` detached and returns its run id.
fn detach(home: &Home, extra: &[&str], command: &[&str]) -> String {
    let mut args = vec!["run", "--detach"];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(command);
    let row = home.json(&args);
    row["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{args:?} gave no run id: {row}"))
        .to_owned()
}

/// Every event of `run` stored so far, as JSON.
fn events(home: &Home, run: &str) -> Vec<Value> {
    tests::events_of(home.cli(), run)
}

/// The output lines among `events`, with their times.
fn output_lines(events: &[Value]) -> Vec<(String, u64)> {
    events
        .iter()
        .filter_map(|e| {
            let line = e["kind"]["output"]["line"].as_str()?;
            Some((line.to_owned(), e["at_ms"].as_u64()?))
        })
        .collect()
}

fn wait_for_line(home: &Home, run: &str, line: &str) {
    home.wait_until(
        &format!("{line:?} from {run}"),
        Duration::from_secs(30),
        || {
            output_lines(&events(home, run))
                .iter()
                .any(|(l, _)| l == line)
        },
    );
}

fn run_state(home: &Home, run: &str) -> Value {
    home.json(&["list"])["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .find(|r| r["id"] == run)
        .cloned()
        .unwrap_or_else(|| panic!("{run} is listed"))
}

#[test]
fn a_crash_restarts_with_the_newest_checkpoint_in_runctl_resume_from() {
    let home = Home::new();
    let trainer = "\
import os, sys
cp = os.environ['RUNCTL_CHECKPOINT_DIR']
resume = os.environ.get('RUNCTL_RESUME_FROM')
print('resume', resume, flush=True)
if resume is None:
    open(os.path.join(cp, 'step-100.pt'), 'w').write('weights')
    open(os.path.join(cp, 'step-200.pt.tmp'), 'w').write('half written')
    sys.exit(1)
print('resumed from', os.path.basename(resume), open(resume).read())
";
    let out = home.run(&[
        "run",
        "--restart",
        "on-failure:2",
        "--",
        "python3",
        "-c",
        trainer,
    ]);
    let (out_text, err_text) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{out_text}\n{err_text}");
    let lines: Vec<&str> = out_text.lines().collect();
    assert_eq!(lines.len(), 3, "{out_text}");
    assert_eq!(lines[0], "resume None");
    assert!(lines[1].ends_with("/checkpoints/step-100.pt"), "{out_text}");
    assert_eq!(lines[2], "resumed from step-100.pt weights");
    assert!(
        err_text.contains("the process exited with 1; restarting in 1s, resuming from"),
        "{err_text}"
    );
    assert!(err_text.contains("attempt 2 started"), "{err_text}");
    assert!(err_text.contains("succeeded (exit 0)"), "{err_text}");
}

#[test]
fn restarts_stop_at_the_policys_limit_and_the_failure_is_reported() {
    let home = Home::new();
    let out = home.run(&[
        "run",
        "--restart",
        "on-failure:1",
        "--",
        "python3",
        "-c",
        "import sys; print('try'); sys.exit(5)",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(stdout(&out), "try\ntry\n");
    assert!(stderr(&out).contains("failed (exit 5)"), "{}", stderr(&out));
}

#[test]
fn a_trainer_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let home = Home::new();
    let trainer = "\
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print('ready', flush=True)
while True:
    time.sleep(0.05)
";
    let run = detach(&home, &["--stop-grace", "1"], &["python3", "-c", trainer]);
    wait_for_line(&home, &run, "ready");
    let started = Instant::now();
    let row = home.json(&["stop", &run]);
    let took = started.elapsed();
    assert_eq!(row["state"], "stopped", "{row}");
    assert_eq!(row["exit"]["signaled"]["signal"], 9, "{row}");
    // The run's own grace (1 s), not the daemon's default (3 s in these tests).
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_millis(2_950),
        "killed after the run's 1 s grace: took {took:?}"
    );
}

#[test]
fn a_trainer_that_forks_children_and_exits_leaves_nothing_behind() {
    let home = Home::new();
    let marker = format!("runctl-orphan-{}", std::process::id());
    let trainer = format!(
        "import subprocess; subprocess.Popen(['sh', '-c', 'sleep 300; : {marker}']); print('parent done')"
    );
    let started = Instant::now();
    let out = home.run(&["run", "--", "python3", "-c", &trainer]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "parent done\n");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the run ended although a child held its output open"
    );
    home.wait_until(
        "the leftover child to be gone",
        Duration::from_secs(10),
        || !process_with_arg_exists(&marker),
    );
}

fn process_with_arg_exists(needle: &str) -> bool {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|p| p.file_name().to_string_lossy().parse::<u32>().is_ok())
        .any(|p| {
            std::fs::read(p.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
}

#[test]
fn a_time_cap_stops_the_run_the_graceful_way_while_the_daemon_is_away() {
    let home = Home::new();
    // Nothing launched for a cost cap the local provider cannot price.
    let out = home.run(&["run", "--max-cost", "5", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--max-cost needs the instance's price per hour"),
        "{}",
        stderr(&out)
    );
    assert_eq!(home.json(&["list"])["instances"], serde_json::json!([]));
    for bad in [
        "--max-cost=0",
        "--max-cost=ten",
        "--max-hours=0",
        "--max-hours=-1",
        "--max-hours=100000",
    ] {
        let out = home.run(&["run", bad, "--", "true"]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains("is not"), "{bad}: {}", stderr(&out));
    }

    // A 10.8 s cap, counted from the local instance's launch.
    let trainer = fixture("ckpt_trainer.py").display().to_string();
    let asked = now_ms();
    let run = detach(
        &home,
        &["--max-hours", "0.003"],
        &["python3", &trainer, "until-stopped"],
    );
    wait_for_line(&home, &run, "training");
    let status = home.json(&["status"]);
    let budget = &status["budgets"][0];
    assert_eq!(budget["run"], run.as_str(), "{status}");
    assert_eq!(budget["budget"]["max_ms"], 10_800, "{status}");
    let text = stdout(&home.run(&["status"]));
    assert!(text.contains(&format!("{run} on ")), "{text}");
    assert!(text.contains(" of 10s ("), "{text}");

    // The daemon goes away before the cap; the agent holds it.
    let out = home.run(&["shutdown"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    std::thread::sleep(Duration::from_millis(
        (asked + 13_000).saturating_sub(now_ms()),
    ));
    assert!(
        home.daemon_pid().is_none(),
        "no daemon while the cap was reached"
    );
    let back = now_ms();
    // `logs -f` brings the daemon back within the agent's delivery window; a run its
    // budget stopped never reports success.
    let follow = home.run(&["logs", "-f", &run]);
    assert_eq!(follow.status.code(), Some(1), "{}", stderr(&follow));
    assert!(
        stderr(&follow).contains("budget reached: the 10s time cap"),
        "{}",
        stderr(&follow)
    );
    let events = events(&home, &run);
    let notice = events
        .iter()
        .find(|e| e["kind"]["notice"].get("budget_exceeded").is_some())
        .unwrap_or_else(|| panic!("no budget notice in {events:?}"));
    let at = notice["at_ms"].as_u64().expect("at_ms");
    assert!(at < back, "the agent stopped the run on its own");
    assert!(at >= asked + 10_800, "not before the cap: {at} vs {asked}");
    let exceeded = &notice["kind"]["notice"]["budget_exceeded"];
    assert_eq!(exceeded["limit"]["time"]["max_ms"], 10_800, "{exceeded}");
    assert!(
        output_lines(&events)
            .iter()
            .any(|(l, _)| l == "stopped: saved final.bin"),
        "the trainer got its stop signal: {events:?}"
    );
    assert_eq!(run_state(&home, &run)["state"], "budget_exceeded");
    let (names, latest) = home.checkpoint_names(&run);
    assert!(names.contains(&"final.bin".to_owned()), "{names:?}");
    assert_eq!(latest.as_deref(), Some("final.bin"));
}

#[test]
fn a_spot_notice_reaches_the_trainer_as_its_signal_within_6_seconds() {
    let imds = Imds::start();
    let home = Home::with_config(&format!(
        "[local.agent]\nmetadata_endpoint = \"http://127.0.0.1:{}\"\n",
        imds.port
    ));
    let trainer = "\
import signal, sys, time
def checkpoint(*_):
    print('checkpointing on USR1', flush=True)
    sys.exit(143)
signal.signal(signal.SIGUSR1, checkpoint)
print('ready', flush=True)
while True:
    time.sleep(0.05)
";
    let run = detach(
        &home,
        &["--spot-signal", "USR1", "--keep"],
        &["python3", "-c", trainer],
    );
    wait_for_line(&home, &run, "ready");
    imds.notice(
        "rebalance.json",
        r#"{"noticeTime": "2026-11-28T08:20:00Z"}"#,
    );
    let noticed_at = now_ms();
    imds.notice(
        "instance-action.json",
        r#"{"action": "terminate", "time": "2026-11-28T08:22:00Z"}"#,
    );
    let follow = home
        .cli()
        .args(["--output", "json", "logs", "-f", &run])
        .output()
        .expect("logs -f");
    assert_eq!(follow.status.code(), Some(143), "{}", stderr(&follow));
    let events = events(&home, &run);
    let (_, at) = output_lines(&events)
        .into_iter()
        .find(|(l, _)| l == "checkpointing on USR1")
        .expect("the trainer got the signal");
    let latency = at.saturating_sub(noticed_at);
    assert!(
        latency <= 6_000,
        "the signal arrived {latency} ms after the notice"
    );
    let notices: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["kind"].get("notice"))
        .collect();
    assert!(
        notices
            .iter()
            .any(|n| n["spot_interruption"]["action"] == "terminate"
                && n["spot_interruption"]["signal"] == 10),
        "{notices:?}"
    );
    assert!(
        notices
            .iter()
            .any(|n| n.get("rebalance_recommended").is_some()),
        "{notices:?}"
    );
    assert_eq!(run_state(&home, &run)["state"], "interrupted");
    let logs = home.run(&["logs", &run]);
    assert!(
        stderr(&logs).contains("spot interruption notice: the instance will terminate"),
        "{}",
        stderr(&logs)
    );
}

#[test]
fn the_end_action_and_the_idle_timeout_run_the_power_off_command() {
    let marker_dir = tempfile::tempdir().expect("tempdir");
    let marker = marker_dir.path().join("poweroff");
    let home = Home::with_config(&format!(
        "[local.agent]\nidle_timeout_secs = 2\npoweroff_command = [\"sh\", \"-c\", \"echo \\\"$RUNCTL_POWEROFF_REASON\\\" >> {}\"]\n",
        marker.display()
    ));
    let read = || std::fs::read_to_string(&marker).unwrap_or_default();

    // A run with end action `stop` powers its instance off once it has ended.
    let launched = home.json(&["launch"]);
    let first = launched["instance"]["name"]
        .as_str()
        .expect("name")
        .to_owned();
    let out = home.run(&["run", "--on", &first, "--end", "stop", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    home.wait_until("the end action", Duration::from_secs(20), || {
        read().contains("ended, end action Stop")
    });
    assert!(!read().contains("no run and no controller"), "{}", read());

    // While the controller is connected the agent is not idle; once it is gone (and no
    // run is active) the idle timeout powers it off.
    let launched = home.json(&["launch"]);
    assert!(launched["instance"]["name"].is_string(), "{launched}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !read().contains("no run and no controller"),
        "busy while connected"
    );
    let out = home.run(&["shutdown"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    home.wait_until("the idle power-off", Duration::from_secs(20), || {
        read().contains("no run and no controller for 2s")
    });
}

#[test]
fn stats_report_the_trainers_rss_and_gpu_figures() {
    let home = Home::with_config(&format!(
        "[local.agent]\nnvidia_smi = \"{}\"\nstats_interval_ms = 500\n",
        fixture("nvidia-smi").display()
    ));
    let trainer = "\
import time
weights = bytearray(64_000_000)
print('ready', flush=True)
time.sleep(120)
";
    // The marker argument makes the nvidia-smi double list the trainer as a GPU process.
    let run = detach(
        &home,
        &["--keep"],
        &["python3", "-c", trainer, "fake-gpu-user"],
    );
    wait_for_line(&home, &run, "ready");
    let mut top = home
        .cli()
        .args(["--output", "json", "top", &run])
        .stdout(Stdio::piped())
        .spawn()
        .expect("top");
    let lines = BufReader::new(top.stdout.take().expect("piped")).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = None;
    for line in lines {
        let line = line.expect("a line from top");
        let shown: Value = serde_json::from_str(&line).expect("JSON lines");
        let sample = &shown[0]["sample"];
        let ready = sample["runs"][0]["rss_bytes"].as_u64().unwrap_or(0) >= 64_000_000
            && sample["runs"][0]["gpu_mem_bytes"]
                .as_u64()
                .is_some_and(|m| m > 0);
        if ready {
            seen = Some(shown);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no complete sample in 30 s: {line}"
        );
    }
    let _ = top.kill();
    let _ = top.wait();
    let shown = seen.expect("a sample");
    let sample = &shown[0]["sample"];
    assert_eq!(sample["runs"].as_array().map(Vec::len), Some(1), "{shown}");
    assert_eq!(sample["runs"][0]["run"], run.as_str());
    assert_eq!(sample["runs"][0]["gpu_mem_bytes"], 1234u64 * 1024 * 1024);
    assert!(sample["runs"][0]["threads"].as_u64() >= Some(1));
    assert_eq!(sample["gpus"][0]["name"], "NVIDIA H200");
    assert_eq!(sample["gpus"][0]["util_percent"], 87.0);
    assert_eq!(sample["gpus"][0]["power_w"], Value::Null, "[N/A] is absent");
    assert!(sample["host"]["mem_total_bytes"].as_u64() > Some(0));

    // The human view shows the same figures.
    let mut top = home
        .cli()
        .args(["top", &run])
        .stdout(Stdio::piped())
        .spawn()
        .expect("top");
    let mut text = String::new();
    let mut out = BufReader::new(top.stdout.take().expect("piped"));
    while !text.contains("NVIDIA H200") {
        let mut line = String::new();
        if out.read_line(&mut line).expect("read") == 0 {
            break;
        }
        text.push_str(&line);
    }
    let _ = top.kill();
    let _ = top.wait();
    assert!(text.contains(&run), "{text}");
    let _ = home.run(&["stop", &run]);
}

/// A project dir holding `files`.
fn project(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    dir
}

/// `PATH` without any directory holding `uv`, so setup falls back to pip.
fn path_without_uv() -> String {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .filter(|dir| !dir.join("uv").exists())
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

const SHOW_PREFIX: &str = "import sys; print('prefix', sys.prefix)";

fn run_in(home: &Home, dir: &Path, path: Option<&str>, extra: &[&str]) -> std::process::Output {
    let mut cmd = home.cli();
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    let workdir = dir.display().to_string();
    let mut args = vec!["run", "--workdir", &workdir];
    args.extend_from_slice(extra);
    cmd.args(args).output().expect("run")
}

#[test]
fn setup_installs_requirements_into_a_venv_and_a_failing_setup_fails_the_run() {
    // Started without uv in PATH, the daemon's agents fall back to pip.
    let home = Home::new();
    let no_uv = path_without_uv();
    let dir = project(&[
        ("requirements.txt", "# nothing to install\n"),
        ("show.py", SHOW_PREFIX),
    ]);
    let out = run_in(
        &home,
        dir.path(),
        Some(&no_uv),
        &["--", "python3", "show.py"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("setup: python3 -m venv --system-site-packages"),
        "{err}"
    );
    assert!(
        err.contains("-m pip install --disable-pip-version-check -r requirements.txt"),
        "{err}"
    );
    assert!(
        stdout(&out).trim_end().ends_with("/venv"),
        "{}",
        stdout(&out)
    );

    let dir = project(&[
        ("requirements.txt", "./no-such-package-dir\n"),
        ("show.py", SHOW_PREFIX),
    ]);
    let out = run_in(
        &home,
        dir.path(),
        Some(&no_uv),
        &["--", "python3", "show.py"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no-such-package-dir"),
        "pip's own message is shown: {err}"
    );
    assert!(err.contains("failed (setup step"), "{err}");
    assert!(!stdout(&out).contains("prefix"), "the command never ran");

    let dir = project(&[("show.py", SHOW_PREFIX)]);
    let out = run_in(
        &home,
        dir.path(),
        None,
        &[
            "--setup",
            "echo preparing; echo broken >&2; exit 3",
            "--",
            "python3",
            "show.py",
        ],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(stdout(&out).contains("preparing"), "{}", stdout(&out));
    assert!(err.contains("broken"), "{err}");
    assert!(err.contains("exited with code 3"), "{err}");

    let out = run_in(
        &home,
        dir.path(),
        None,
        &["--setup", "none", "--setup", "make", "--", "true"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot be combined"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn setup_with_uv_syncs_a_pyproject_and_runs_pep723_scripts() {
    let Some(uv) = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("uv"))
        .find(|p| p.is_file())
    else {
        eprintln!(
            "SKIPPED setup_with_uv_syncs_a_pyproject_and_runs_pep723_scripts: uv is not in PATH (scripts/test.sh installs it)"
        );
        return;
    };
    let home = Home::new();
    let dir = project(&[
        (
            "pyproject.toml",
            "[project]\nname = \"demo\"\nversion = \"0.1.0\"\nrequires-python = \">=3.8\"\ndependencies = []\n",
        ),
        ("show.py", SHOW_PREFIX),
    ]);
    let out = run_in(&home, dir.path(), None, &["--", "python3", "show.py"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!("setup: {} sync", uv.display())),
        "{err}"
    );
    assert!(
        stdout(&out).trim_end().ends_with("/venv"),
        "{}",
        stdout(&out)
    );

    let dir = project(&[(
        "script.py",
        "# /// script\n# dependencies = []\n# ///\nimport sys\nprint('inline', sys.prefix != sys.base_prefix)\n",
    )]);
    let out = run_in(&home, dir.path(), None, &["--", "python3", "script.py"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "inline True\n", "{}", stderr(&out));
}

#[test]
fn logs_tail_and_since_pick_the_window() {
    let home = Home::new();
    let out = home.run(&["run", "--", "python3", "-c", "for i in range(10): print(i)"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run = home.json(&["list"])["runs"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(
        stdout(&home.run(&["logs", "--tail", "3", &run])),
        "7\n8\n9\n"
    );
    assert_eq!(stdout(&home.run(&["logs", "--tail", "0", &run])), "");
    assert_eq!(
        stdout(&home.run(&["logs", "--since", "1h", &run])),
        "0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n"
    );
    assert_eq!(
        stdout(&home.run(&["logs", "--since", "2099-01-01T00:00:00Z", &run])),
        ""
    );
    let bad = home.run(&["logs", "--since", "yesterday", &run]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("e.g. 10m"), "{}", stderr(&bad));
}

/// Zombie processes whose parent is `ppid`.
fn zombie_children(ppid: u32) -> Vec<u32> {
    procstat::pids()
        .filter(|pid| ProcStat::of(*pid).is_some_and(|s| s.state == 'Z' && s.ppid == ppid))
        .collect()
}

#[test]
fn as_pid_1_the_agent_reaps_orphaned_processes() {
    let can_unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !can_unshare {
        eprintln!(
            "SKIPPED as_pid_1_the_agent_reaps_orphaned_processes: needs root for a PID namespace (unshare)"
        );
        return;
    }
    let home = Home::new();
    let launched = home.json(&["launch", "--name", "init"]);
    assert_eq!(launched["connected"], true, "{launched}");
    home.kill_agent();
    // The agent again, now as PID 1 of a PID namespace of its own, as in a container.
    let config = home.path().join("local/init/agent.toml");
    let mut unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(tests::bin("runctl-agent"))
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare");
    let mut agent = None;
    home.wait_until(
        "the agent in its namespace",
        Duration::from_secs(10),
        || {
            agent = std::fs::read_dir("/proc")
                .expect("/proc")
                .flatten()
                .find_map(|p| {
                    let pid: u32 = p.file_name().to_string_lossy().parse().ok()?;
                    let stat = std::fs::read_to_string(p.path().join("stat")).ok()?;
                    let parent: u32 = stat
                        .rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse()
                        .ok()?;
                    (parent == unshare.id()).then_some(pid)
                });
            agent.is_some()
        },
    );
    let agent = agent.expect("found");
    // Start the run only once the daemon has taken the new connection in place of the
    // killed agent's, or the start may go to the dead one.
    home.wait_until(
        "the new agent's connection",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(home.path().join("daemon.log"))
                .is_ok_and(|log| log.matches("agent init connected").count() >= 2)
        },
    );
    // Each subshell starts a short sleep in the background and exits: the sleeps are
    // orphaned, re-parented to the agent, and become zombies when they end.
    let run = detach(
        &home,
        &["--on", "init"],
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do (sleep 0.1 &); done; sleep 0.5; echo orphans-ended; sleep 30",
        ],
    );
    wait_for_line(&home, &run, "orphans-ended");
    home.wait_until("the orphans to be reaped", Duration::from_secs(10), || {
        zombie_children(agent).is_empty()
    });
    // They were the agent's: the namespace has no other PID 1 to take them.
    let out = home.run(&["stop", &run]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let _ = unshare.kill();
    let _ = unshare.wait();
}

/// The live (not zombie) child of `parent`, if it has one.
fn child_of(parent: u32) -> Option<u32> {
    procstat::pids()
        .into_iter()
        .find(|pid| ProcStat::of(*pid).is_some_and(|stat| stat.ppid == parent && stat.state != 'Z'))
}

/// How many times the agents logging to `log` have connected to the controller.
fn connections(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("connected to the controller via")
        .count()
}

#[test]
fn a_supervised_agent_is_started_again_after_a_crash_and_stops_with_its_supervisor() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let home = Home::new();
    let launched = home.json(&["launch", "--provider", "local"]);
    let name = launched["instance"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("{launched}"))
        .to_owned();
    home.kill_agent();
    let config = home.path().join(format!("local/{name}/agent.toml"));
    let log = home.path().join("supervisor.log");
    let mut supervisor = Command::new(tests::bin("runctl-agent"))
        .arg("--supervise")
        .arg("--config")
        .arg(&config)
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start the supervisor");
    let sup = supervisor.id();
    home.wait_until(
        "the supervised agent to connect",
        Duration::from_secs(30),
        || connections(&log) == 1,
    );
    let first = child_of(sup).expect("the agent runs as the supervisor's child");

    // A crash (SIGKILL, as the OOM killer would): the supervisor starts it again.
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).expect("kill the agent");
    home.wait_until(
        "the restarted agent to connect",
        Duration::from_secs(30),
        || connections(&log) == 2,
    );
    let second = child_of(sup).expect("the agent");
    assert_ne!(second, first, "a new agent process");
    let out = home.run(&["run", "--on", &name, "--", "echo", "after the crash"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("after the crash"), "{}", stdout(&out));

    // SIGTERM reaches the agent, which stops; so does the supervisor, with its status.
    kill(Pid::from_raw(sup as i32), Signal::SIGTERM).expect("stop the supervisor");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = supervisor.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the supervisor did not exit");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0), "the agent ended by choice");
    assert!(
        kill(Pid::from_raw(second as i32), None).is_err()
            || ProcStat::of(second).is_none_or(|s| s.state == 'Z'),
        "the agent is gone with its supervisor"
    );
}

#[test]
fn a_supervised_agent_that_cannot_start_is_not_started_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("supervisor.log");
    let started = Instant::now();
    let status = Command::new(tests::bin("runctl-agent"))
        .arg("--supervise")
        .arg("--config")
        .arg(dir.path().join("no-such-config.toml"))
        .stderr(std::fs::File::create(&log).expect("log file"))
        .status()
        .expect("run the supervisor");
    let text = std::fs::read_to_string(&log).expect("log");
    assert_eq!(status.code(), Some(2), "the agent's own status: {text}");
    assert_eq!(
        text.matches("supervisor: agent started").count(),
        1,
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no backoff for a final error"
    );
}
