//! Code sync end to end: the CLI, the daemon and a real local agent on loopback. After each
//! sync the agent's tree must equal the project byte for byte (ignored files aside).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tests::{Home, snapshot, stderr, stdout};

/// A launched local instance with a long-running run whose tree is the project.
struct Setup {
    home: Home,
    project: tempfile::TempDir,
    run: String,
    instance: String,
}

impl Setup {
    fn new(files: &[(&str, &[u8])], argv: &[&str]) -> Setup {
        let home = Home::new();
        let project = tempfile::tempdir().expect("tempdir");
        for (path, content) in files {
            write(project.path(), path, content);
        }
        let mut args = vec![
            "run",
            "--detach",
            "--keep",
            "--workdir",
            project.path().to_str().expect("utf8"),
            "--",
        ];
        args.extend(argv);
        let started = home.json(&args);
        let run = started["id"].as_str().expect("run id").to_owned();
        let instance = started["instance"].as_str().expect("instance").to_owned();
        Setup {
            home,
            project,
            run,
            instance,
        }
    }

    fn tree(&self) -> PathBuf {
        self.home
            .path()
            .join("local")
            .join(&self.instance)
            .join("state/runs")
            .join(&self.run)
            .join("work")
    }

    /// A sync of a 300 MB file (content from `seed`) and a changed `train.py`, started
    /// and waited for until its content is arriving in the agent's staging area.
    fn sync_under_way(&self, seed: u64) -> std::process::Child {
        write_big(&self.p("data.bin"), 300 << 20, seed);
        write(self.project.path(), "train.py", b"print(2)\n");
        let sync = self
            .home
            .cli()
            .args(["--output", "json", "sync", &self.run])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sync");
        let staging = self.tree().with_file_name("sync-staging");
        self.home
            .wait_until("content to arrive", Duration::from_secs(60), || {
                std::fs::read_dir(&staging)
                    .map(|d| d.flatten().any(|e| e.metadata().is_ok_and(|m| m.len() > 0)))
                    .unwrap_or(false)
            });
        sync
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.project.path().join(rel)
    }

    fn sync(&self, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["sync"];
        args.extend(extra);
        args.push(&self.run);
        let report = self.home.json(&args);
        assert!(report.get("error").is_none(), "{report}");
        report
    }

    /// The agent's tree equals the project, less the paths the project ignores.
    fn assert_in_step(&self, ignored: &[&str]) {
        assert_eq!(
            snapshot(&self.tree(), &[]),
            snapshot(self.project.path(), ignored)
        );
    }
}

fn write(root: &Path, rel: &str, content: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, content).expect("write");
}

/// Incompressible, reproducible bytes, written in chunks (never whole in memory).
fn write_big(path: &Path, size_bytes: u64, seed: u64) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut x = seed | 1;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = size_bytes;
    while left > 0 {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).expect("write");
        left -= n as u64;
    }
    file.flush().expect("flush");
}

fn summary(report: &serde_json::Value, key: &str) -> u64 {
    report["summary"][key].as_u64().expect("a count")
}

#[test]
fn sync_round_trips_a_real_tree_with_deletes_renames_and_a_200_mb_file() {
    let s = Setup::new(
        &[
            ("train.py", b"print('v1')\n"),
            ("src/ünïcödé model.py", b"class M: pass\n"),
            ("src/with space/data loader.py", b"def load(): ...\n"),
            (".gitignore", b"*.log\nbig-ignored/\n"),
            ("run.log", b"ignored\n"),
            ("big-ignored/x.bin", b"ignored\n"),
        ],
        &["sleep", "600"],
    );
    let ignored = ["run.log", "big-ignored"];
    s.assert_in_step(&ignored);

    // Executable files, symlinks inside the tree, empty dirs, and a 200 MB file.
    write(
        s.project.path(),
        "scripts/launch.sh",
        b"#!/bin/sh\necho go\n",
    );
    std::fs::set_permissions(
        s.p("scripts/launch.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    std::os::unix::fs::symlink("src/ünïcödé model.py", s.p("model.py")).expect("link");
    std::os::unix::fs::symlink("../train.py", s.p("scripts/train.py")).expect("link");
    std::fs::create_dir_all(s.p("outputs/empty")).expect("mkdir");
    write_big(&s.p("weights.bin"), 200 << 20, 7);
    let report = s.sync(&[]);
    assert!(summary(&report, "stream_bytes") > 200 << 20, "{report}");
    s.assert_in_step(&ignored);

    // A rename of the big file is not sent again; edits, deletes, a mode change, a
    // directory replaced by a file.
    std::fs::rename(s.p("weights.bin"), s.p("outputs/weights-final.bin")).expect("mv");
    write(s.project.path(), "train.py", b"print('v2')\n");
    std::fs::remove_file(s.p("src/with space/data loader.py")).expect("rm");
    std::fs::remove_dir(s.p("src/with space")).expect("rmdir");
    write(s.project.path(), "src/with space", b"now a file\n");
    std::fs::set_permissions(
        s.p("scripts/launch.sh"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let report = s.sync(&[]);
    assert_eq!(summary(&report, "copied"), 1, "{report}");
    assert!(summary(&report, "stream_bytes") < 1024, "{report}");
    assert!(
        report["wire_bytes"].as_u64().expect("wire") < 64 * 1024,
        "a rename costs no content on the wire: {report}"
    );
    s.assert_in_step(&ignored);

    // Nothing changed: nothing sent, and under 1 KB on the wire.
    let report = s.sync(&[]);
    assert_eq!(summary(&report, "written") + summary(&report, "deleted"), 0);
    let wire = report["wire_bytes"].as_u64().expect("wire");
    assert!(wire < 1024, "a no-op sync costs {wire} bytes");

    assert_eq!(report["agent_manifest_bytes"], 0, "{report}");

    // A restarted daemon still knows the agent's tree: the agent need not send it.
    assert!(s.home.run(&["shutdown"]).status.success());
    let report = s.sync(&[]);
    assert_eq!(report["agent_manifest_bytes"], 0, "{report}");
    s.assert_in_step(&ignored);
}

#[test]
fn dry_run_lists_changes_and_changes_nothing() {
    let s = Setup::new(&[("a.py", b"1"), ("b.py", b"2")], &["sleep", "600"]);
    write(s.project.path(), "a.py", b"changed");
    std::fs::remove_file(s.p("b.py")).expect("rm");
    write(s.project.path(), "c.py", b"new");
    let report = s.sync(&["--dry-run"]);
    let mut changes: Vec<String> = report["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["op"].as_str().expect("op"),
                c["path"].as_str().expect("path")
            )
        })
        .collect();
    changes.sort();
    assert_eq!(changes, ["delete b.py", "write a.py", "write c.py"]);
    assert_eq!(std::fs::read(s.tree().join("a.py")).expect("read"), b"1");
    assert!(s.tree().join("b.py").exists());

    let human = s.home.run(&["sync", "--dry-run", &s.run]);
    assert!(human.status.success(), "{}", stderr(&human));
    assert!(stdout(&human).contains("would sync"), "{}", stdout(&human));
}

#[test]
fn restart_runs_the_new_code_and_ended_runs_refuse_a_restart() {
    let s = Setup::new(
        &[("version.txt", b"v1\n")],
        &["sh", "-c", "cat version.txt; exec sleep 600"],
    );
    let logs = |s: &Setup| stdout(&s.home.run(&["logs", &s.run]));
    s.home
        .wait_until("v1 printed", Duration::from_secs(20), || {
            logs(&s).contains("v1")
        });
    write(s.project.path(), "version.txt", b"v2\n");
    let report = s.sync(&["--restart"]);
    assert!(report["restarted_pid"].as_u64().is_some(), "{report}");
    s.home
        .wait_until("v2 printed", Duration::from_secs(20), || {
            logs(&s).contains("v2")
        });
    let list = s.home.json(&["list"]);
    assert_eq!(list["runs"][0]["state"], "running", "{list}");

    assert!(s.home.run(&["stop", &s.run]).status.success());
    let out = s.home.run(&["sync", "--restart", &s.run]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no process to restart"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn watch_pushes_each_save() {
    let s = Setup::new(&[("a.py", b"1")], &["sleep", "600"]);
    let mut watch = s
        .home
        .cli()
        .args(["sync", "--watch", &s.run])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start watch");
    // The first sync happens before watching starts; wait for the watcher to say so.
    let mut err = std::io::BufReader::new(watch.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.contains("watching") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut err, &mut line).expect("read");
        assert!(n > 0, "watch exited early");
    }
    for round in 0..3 {
        let content = format!("save {round}");
        let saved = Instant::now();
        write(s.project.path(), "a.py", content.as_bytes());
        s.home
            .wait_until("the save to arrive", Duration::from_secs(10), || {
                std::fs::read(s.tree().join("a.py")).is_ok_and(|c| c == content.as_bytes())
            });
        eprintln!("save {round} arrived after {:?}", saved.elapsed());
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watch.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("interrupt watch");
    assert!(watch.wait().expect("wait").success());
}

#[test]
fn an_agent_killed_mid_apply_keeps_its_tree_and_the_next_sync_completes() {
    let s = Setup::new(&[("train.py", b"print(1)\n")], &["sleep", "600"]);
    let before = snapshot(&s.tree(), &[]);
    // Kill the agent while content is arriving in its staging area.
    let sync = s.sync_under_way(3);
    s.home.kill_agent();
    // Restarted at once, as systemd would: its new connection replaces the dead one, so
    // the cut-off sync fails now rather than at the idle timeout.
    let mut agent = s.home.restart_agent(&s.instance);
    let out = sync.wait_with_output().expect("sync ends");
    assert!(
        !out.status.success(),
        "the cut-off sync fails: {}",
        stdout(&out)
    );
    assert_eq!(
        snapshot(&s.tree(), &[]),
        before,
        "the previous tree is intact"
    );

    s.home
        .wait_until("the agent to reconnect", Duration::from_secs(30), || {
            s.home.json(&["list"])["instances"][0]["connected"] == true
        });
    s.sync(&[]);
    s.assert_in_step(&[]);
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn a_daemon_killed_mid_sync_leaves_the_tree_whole_and_the_next_sync_completes() {
    let s = Setup::new(&[("train.py", b"print(1)\n")], &["sleep", "600"]);
    let before = snapshot(&s.tree(), &[]);
    let sync = s.sync_under_way(4);
    let staging = s.tree().with_file_name("sync-staging");
    let daemon = s.home.daemon_pid().expect("the daemon's pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the daemon");
    let out = sync.wait_with_output().expect("sync ends");
    assert!(!out.status.success(), "the cut-off sync fails");
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(said.contains("daemon"), "and says the daemon went: {said}");
    // The agent drops the cut-off apply; until then and after, the tree is the old one.
    assert_eq!(
        snapshot(&s.tree(), &[]),
        before,
        "the previous tree is intact"
    );
    s.home.wait_until(
        "the agent to drop the cut-off sync",
        Duration::from_secs(90),
        || !staging.exists(),
    );
    assert_eq!(
        snapshot(&s.tree(), &[]),
        before,
        "the previous tree is intact"
    );
    // The next sync (the daemon started again on demand) completes; the run goes on.
    s.home
        .wait_until("the agent to reconnect", Duration::from_secs(90), || {
            s.home.json(&["list"])["instances"][0]["connected"] == true
        });
    s.sync(&[]);
    s.assert_in_step(&[]);
    assert_eq!(s.home.json(&["list"])["runs"][0]["state"], "running");
}

#[test]
fn links_that_leave_the_project_are_skipped_with_a_word() {
    let s = Setup::new(&[("a.py", b"1")], &["sleep", "600"]);
    std::os::unix::fs::symlink("/etc", s.p("etc")).expect("link");
    let out = s.home.run(&["sync", &s.run]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("skipped etc -> /etc"),
        "{}",
        stdout(&out)
    );
    assert!(!s.tree().join("etc").exists());
}
