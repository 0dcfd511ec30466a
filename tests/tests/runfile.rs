//! The project run file (`runctl.toml`) and `--secret`, through the real CLI, daemon and a
//! local agent: a run needs no flags, profiles and flags override as documented, and a
//! secret reaches the command but no file, database or log.

use std::path::Path;

use tests::{Home, stderr, stdout};

const SECRET: &str = "hf_s3cr3t_VALUE_8472";

/// A project (not a git tree: the directory is the root) holding `runctl.toml`.
fn project(file: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("project");
    std::fs::write(dir.path().join("runctl.toml"), file).expect("run file");
    dir
}

const FILE: &str = r#"
[run]
command = "echo seed=$SEED token=$HF_TOKEN; printf %s \"$HF_TOKEN\" | rev; echo"
env = { SEED = 3 }
secrets = ["HF_TOKEN"]
setup = "none"

[profile.other]
env = { SEED = 4 }
"#;

/// Every file under `dir` holding `needle`, as paths.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && std::fs::read(&path)
                    .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[test]
fn a_run_file_runs_without_flags_and_its_secret_is_stored_nowhere() {
    let home = Home::new();
    let dir = project(FILE);
    let workdir = dir.path().display().to_string();
    // The daemon (and the local agents it starts) must not inherit the secret: it has to
    // arrive through the run.
    let listed = home.run(&["list"]);
    assert_eq!(listed.status.code(), Some(0), "{}", stderr(&listed));

    let out = home
        .cli()
        .env("HF_TOKEN", SECRET)
        .args(["run", "--workdir", &workdir])
        .output()
        .expect("run");
    let (out_text, err_text) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{out_text}\n{err_text}");
    assert!(
        out_text.contains("seed=3 token=[secret HF_TOKEN]"),
        "the file's command and env, the secret redacted: {out_text}"
    );
    let reversed: String = SECRET.chars().rev().collect();
    assert!(
        out_text.contains(&reversed),
        "the command had the value itself: {out_text}"
    );

    // A profile overlays [run]; a flag overrides both; a command after -- replaces the file's.
    let out = home
        .cli()
        .env("HF_TOKEN", SECRET)
        .args(["run", "--workdir", &workdir, "--profile", "other"])
        .output()
        .expect("run");
    assert!(stdout(&out).contains("seed=4 "), "{}", stdout(&out));
    let out = home
        .cli()
        .env("HF_TOKEN", SECRET)
        .args([
            "run",
            "--workdir",
            &workdir,
            "--profile",
            "other",
            "-e",
            "SEED=5",
            "--",
            "sh",
            "-c",
            "echo seed=$SEED",
        ])
        .output()
        .expect("run");
    assert_eq!(stdout(&out), "seed=5\n", "{}", stderr(&out));

    // Without the secret in the environment the run is refused before anything starts.
    let out = home
        .cli()
        .env_remove("HF_TOKEN")
        .args(["run", "--workdir", &workdir])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("HF_TOKEN is not set"),
        "{}",
        stderr(&out)
    );

    // Nothing the daemon or the agent keeps holds the value: the database, the agents'
    // state (run dirs, event logs, place files), their logs.
    let run = home.json(&["list"])["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .find(|r| r["argv"].to_string().contains("token="))
        .map(|r| r["id"].as_str().expect("id").to_owned())
        .expect("the first run is listed");
    let logs = home.run(&["logs", &run]);
    assert!(
        stdout(&logs).contains("[secret HF_TOKEN]") && !stdout(&logs).contains(SECRET),
        "{}",
        stdout(&logs)
    );
    assert!(
        !home.json(&["list"]).to_string().contains(SECRET),
        "list shows no secret"
    );
    let holding = files_holding(home.path(), SECRET.as_bytes());
    assert!(holding.is_empty(), "the secret was written to {holding:?}");
}

#[test]
fn dry_run_shows_the_resolved_run_and_does_nothing() {
    let home = Home::new();
    let dir = project(
        r#"
[run]
command = ["python3", "train.py"]
provider = "ec2"
instance_type = "g5.xlarge"
spot = true
secrets = ["HF_TOKEN"]
max_cost = 8
max_hours = 1.5
launcher = "torchrun"
nproc_per_node = 4
"#,
    );
    let workdir = dir.path().display().to_string();
    let out = home
        .cli()
        .env("HF_TOKEN", SECRET)
        .args([
            "--output",
            "json",
            "run",
            "--dry-run",
            "--workdir",
            &workdir,
        ])
        .output()
        .expect("dry run");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let shown: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(
        shown["request"]["argv"],
        serde_json::json!(["python3", "train.py"])
    );
    assert_eq!(
        shown["request"]["launch"]["Ec2"]["instance_type"],
        "g5.xlarge"
    );
    assert_eq!(shown["request"]["launch"]["Ec2"]["spot"], true);
    assert_eq!(shown["secrets"][0]["name"], "HF_TOKEN");
    assert_eq!(shown["request"]["max_cost"], 8.0);
    assert_eq!(shown["request"]["max_hours"], 1.5);
    assert_eq!(shown["request"]["launcher"]["launcher"], "torchrun");
    assert_eq!(shown["request"]["launcher"]["nproc_per_node"], 4);
    assert!(!stdout(&out).contains(SECRET), "{}", stdout(&out));
    let out = home
        .cli()
        .env("HF_TOKEN", SECRET)
        .args(["run", "--dry-run", "--workdir", &workdir])
        .output()
        .expect("dry run");
    assert!(
        stdout(&out).contains(
            "budget       stop at $8.00 (the instance's time, from its launch) or 1h 30m"
        ),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("launcher     torchrun, 1 node x 4 processes"),
        "{}",
        stdout(&out)
    );

    // A flag given wins; --on sets the file's launch options aside.
    let out = home
        .cli()
        .env("HF_TOKEN", SECRET)
        .args(["run", "--dry-run", "--workdir", &workdir, "--on", "gpu-7"])
        .output()
        .expect("dry run");
    assert!(
        stdout(&out).contains("the existing instance gpu-7"),
        "{}",
        stdout(&out)
    );
    // Nothing was started: no daemon, no instance.
    assert!(home.daemon_pid().is_none(), "a dry run starts no daemon");
}

#[test]
fn bad_run_files_and_missing_commands_are_refused_with_the_fix() {
    let home = Home::new();
    let dir = project("[run]\ncommand = \"true\"\ninstnce_type = \"g5.xlarge\"\n");
    let workdir = dir.path().display().to_string();
    let file = dir.path().join("runctl.toml").display().to_string();
    for args in [
        vec!["config", "validate", file.as_str()],
        vec!["run", "--workdir", workdir.as_str()],
    ] {
        let out = home.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let text = stderr(&out);
        assert!(
            text.contains("line 3") && text.contains("did you mean instance_type?"),
            "{args:?}: {text}"
        );
    }

    let empty = tempfile::tempdir().expect("project");
    let out = home.run(&["run", "--workdir", &empty.path().display().to_string()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no command given") && stderr(&out).contains("runctl.toml"),
        "{}",
        stderr(&out)
    );
    let out = home.run(&[
        "run",
        "--workdir",
        &empty.path().display().to_string(),
        "--profile",
        "gpu",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("there is no runctl.toml"),
        "{}",
        stderr(&out)
    );

    let bad = project("[run]\ncommand = \"true\"\nlauncher = \"mpirun\"\n");
    let out = home.run(&["run", "--workdir", &bad.path().display().to_string()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("\"mpirun\" is not a launcher: use torchrun or none"),
        "{}",
        stderr(&out)
    );

    let out = home.run(&["run", "--secret", "HF_TOKEN=hf_abc", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not written on the command line"),
        "{}",
        stderr(&out)
    );
}

/// A project of `n` empty files in two directories.
fn many_files(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("project");
    for sub in ["data", "src"] {
        std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
    }
    for i in 0..n {
        let sub = if i % 10 == 0 { "src" } else { "data" };
        std::fs::write(dir.path().join(format!("{sub}/f{i}")), "").expect("file");
    }
    dir
}

#[test]
fn a_big_tree_is_reported_before_its_first_sync_and_never_again() {
    let home = Home::new();
    let dir = many_files(20_001);
    let workdir = dir.path().display().to_string();
    let run = || home.run(&["run", "--workdir", &workdir, "--", "true"]);
    // Not a terminal: said, then sent.
    let out = run();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("holds 20001 files") && text.contains(".runctlignore"),
        "{text}"
    );
    let data = text.find("data/").expect("data listed");
    let src = text.find("src/").expect("src listed");
    assert!(data < src, "biggest first: {text}");
    // Synced once: not said again.
    let out = run();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("holds"), "{}", stderr(&out));
}

#[test]
fn on_a_terminal_a_big_tree_is_sent_only_when_the_user_says_so() {
    let home = Home::new();
    let dir = many_files(20_001);
    let workdir = dir.path().display().to_string();
    let bound = std::time::Duration::from_secs(30);
    let mut term =
        tests::terminal::Terminal::spawn(&home, &["run", "--workdir", &workdir, "--", "true"]);
    term.expect(0, "[y/N]", bound);
    term.type_text("n\r");
    let status = tests::wait_exit(&mut term.child, bound);
    assert_eq!(status.code(), Some(2), "{}", term.seen());
    assert!(term.seen().contains("nothing was sent"), "{}", term.seen());
    assert!(home.daemon_pid().is_none(), "nothing started");

    // --yes: said, not asked.
    let mut term = tests::terminal::Terminal::spawn(
        &home,
        &["run", "--yes", "--workdir", &workdir, "--", "true"],
    );
    let status = tests::wait_exit(&mut term.child, bound);
    assert_eq!(status.code(), Some(0), "{}", term.seen());
    assert!(
        term.seen().contains("holds 20001 files") && !term.seen().contains("[y/N]"),
        "{}",
        term.seen()
    );
}
