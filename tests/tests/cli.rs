//! The CLI's own documentation outputs: shell completions and man pages, from the real
//! binary, usable by the real shells and `man`.

use std::process::Command;

use tests::{bin, stderr, stdout};

fn controller(args: &[&str]) -> std::process::Output {
    // A home whose config is broken: completions and man pages need neither.
    let home = tempfile::tempdir().expect("home");
    std::fs::write(home.path().join("config.toml"), "[daemon\n").expect("config");
    Command::new(bin("runctl-controller"))
        .env("RUNCTL_HOME", home.path())
        .args(args)
        .output()
        .expect("runctl-controller")
}

const COMMANDS: &[&str] = &[
    "run",
    "sync",
    "launch",
    "volume",
    "relay",
    "list",
    "status",
    "logs",
    "top",
    "stop",
    "start",
    "terminate",
    "checkpoint",
    "s3",
    "exec",
    "shell",
    "forward",
    "cp",
    "daemon",
    "shutdown",
    "completions",
    "man",
];

#[test]
fn completions_are_valid_scripts_naming_every_command() {
    let out = controller(&["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let script = stdout(&out);
    let file = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(file.path(), &script).expect("write");
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(file.path())
        .output()
        .expect("bash");
    assert!(syntax.status.success(), "bash -n: {}", stderr(&syntax));
    // Sourced, it registers the completion function for the binary.
    let registered = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p runctl-controller",
            file.path().display()
        ))
        .output()
        .expect("bash");
    assert!(
        stdout(&registered).contains("runctl-controller"),
        "{}",
        stderr(&registered)
    );
    for command in COMMANDS {
        assert!(script.contains(command), "bash completion lacks {command}");
    }

    let zsh = stdout(&controller(&["completions", "zsh"]));
    assert!(
        zsh.starts_with("#compdef runctl-controller"),
        "{}",
        &zsh[..zsh.len().min(200)]
    );
    let fish = stdout(&controller(&["completions", "fish"]));
    assert!(
        fish.contains("complete -c runctl-controller"),
        "{}",
        &fish[..fish.len().min(200)]
    );
    for command in COMMANDS {
        assert!(fish.contains(command), "fish completion lacks {command}");
    }

    let out = controller(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "an unknown shell is bad input");
}

#[test]
fn man_pages_cover_every_command() {
    let out = controller(&["man"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(".TH runctl-controller 1"),
        "{}",
        stdout(&out)
    );

    let dir = tempfile::tempdir().expect("dir");
    let out = controller(&[
        "--output",
        "json",
        "man",
        "--dir",
        &dir.path().display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let written: Vec<String> = serde_json::from_str(stdout(&out).trim()).expect("json");
    for command in COMMANDS {
        let page = format!("runctl-controller-{command}.1");
        assert!(written.contains(&page), "no {page} in {written:?}");
        let text = std::fs::read_to_string(dir.path().join(&page)).expect("page");
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    assert!(written.contains(&"runctl-controller-exec.1".to_owned()));
}

fn in_home(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("runctl-controller"))
        .env("RUNCTL_HOME", home)
        .env_remove("RUNCTL_OUTPUT")
        .env_remove("RUNCTL_AGENT_BIN")
        .args(args)
        .output()
        .expect("runctl-controller")
}

#[test]
fn config_commands_read_edit_and_check_the_file() {
    let home = tempfile::tempdir().expect("home");
    let file = home.path().join("config.toml");
    std::fs::write(&file, "# mine\n[daemon]\n# grace\nstop_grace_secs = 30\n").expect("write");
    let run = |args: &[&str]| in_home(home.path(), args);

    assert_eq!(
        stdout(&run(&["config", "path"])).trim(),
        file.display().to_string()
    );
    let out = run(&["config", "get", "daemon.stop_grace_secs"]);
    assert_eq!(stdout(&out), "30\n", "{}", stderr(&out));
    assert_eq!(
        stdout(&run(&["config", "get", "storage.backend"])),
        "local\n"
    );

    // Show: every key with its source, human and JSON.
    let shown = stdout(&run(&["config", "show"]));
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("daemon.stop_grace_secs") && l.ends_with("(file)")),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("ec2.max_running") && l.ends_with("(default)")),
        "{shown}"
    );
    let json: serde_json::Value =
        serde_json::from_str(stdout(&run(&["--output", "json", "config", "show"])).trim())
            .expect("json");
    let keys: Vec<&str> = json
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["key"].as_str().expect("key"))
        .collect();
    for key in [
        "daemon.listen",
        "storage.backend",
        "ec2.region",
        "runpod.image",
        "agent.allow_shell",
        "relay.port",
    ] {
        assert!(keys.contains(&key), "{key} in {keys:?}");
    }

    // Unknown keys: exit 2 with the nearest one.
    let out = run(&["config", "get", "daemon.stop_grace"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("daemon.stop_grace_secs"),
        "{}",
        stderr(&out)
    );

    // Set keeps comments, types the value, and the daemon's loader accepts the result.
    let out = run(&["config", "set", "ec2.max_running", "8"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&["config", "set", "ec2.region", "eu-west-1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(&file).expect("read");
    assert!(
        text.starts_with("# mine\n[daemon]\n# grace\nstop_grace_secs = 30\n"),
        "{text}"
    );
    assert!(
        text.contains("max_running = 8") && text.contains("region = \"eu-west-1\""),
        "{text}"
    );
    assert_eq!(stdout(&run(&["config", "get", "ec2.max_running"])), "8\n");

    // A value that would not load is refused and the file is untouched.
    let before = std::fs::read_to_string(&file).expect("read");
    let out = run(&["config", "set", "relay.port", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("[relay] port"), "{}", stderr(&out));
    let out = run(&["config", "set", "daemon.stop_grace_secs", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(&file).expect("read"), before);

    // Unset: the default applies again.
    let out = run(&["config", "unset", "daemon.stop_grace_secs"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&run(&["config", "get", "daemon.stop_grace_secs"])),
        "10\n"
    );

    // Validate: this home's file, another file with the line of the fault, JSON too.
    let out = run(&["config", "validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let bad = home.path().join("bad.toml");
    std::fs::write(&bad, "[daemon]\nstop_grace_secs = 3\nbogus = 1\n").expect("write");
    let out = run(&["config", "validate", &bad.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("bad.toml") && err.contains("line 3") && err.contains("bogus"),
        "{err}"
    );
    let out = run(&[
        "--output",
        "json",
        "config",
        "validate",
        &bad.display().to_string(),
    ]);
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    assert!(
        json["error"]["message"]
            .as_str()
            .expect("message")
            .contains("bogus")
    );

    // A broken home config can still be seen and fixed from the CLI.
    std::fs::write(&file, "[daemon]\nstop_grace_secs = \"x\"\n").expect("write");
    let out = run(&["config", "validate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["config", "unset", "daemon.stop_grace_secs"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(run(&["config", "validate"]).status.code(), Some(0));
}
