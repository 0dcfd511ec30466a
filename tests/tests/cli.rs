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
