//! A controller upgrade never strands a running agent: an agent of the previous protocol
//! (the agent swarm with `--previous-protocol`: the previous version, without the features
//! added since, enrolling and serving on the real protocol) enrolls, syncs, runs and
//! streams every line, and the user is told to upgrade it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tests::{Home, bin, stderr, stdout};

struct Swarm(Child);

impl Drop for Swarm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_agent_of_the_previous_protocol_runs_streams_and_is_told_to_upgrade() {
    let home = Home::new();
    let socket = home.path().join("swarm.sock");
    let report = home.path().join("swarm.json");
    let _swarm = Swarm(
        Command::new(bin("agent-swarm"))
            .args([
                "serve",
                "--previous-protocol",
                "--lines",
                "500",
                "--rate",
                "2000",
            ])
            .arg("--socket")
            .arg(&socket)
            .arg("--report")
            .arg(&report)
            .stdout(Stdio::null())
            .spawn()
            .expect("start agent-swarm (cargo build --workspace --bins)"),
    );
    home.wait_until("the swarm to listen", Duration::from_secs(10), || {
        socket.exists()
    });
    // The daemon, started here, starts the swarm's shim as the local agent.
    let started = home
        .cli()
        .env("RUNCTL_AGENT_BIN", bin("agent-swarm"))
        .env("RUNCTL_SWARM_SOCKET", &socket)
        .args(["launch", "--name", "old1"])
        .output()
        .expect("launch");
    assert!(started.status.success(), "{}", stderr(&started));

    let listed = home.json(&["list"]);
    let agent = &listed["instances"][0]["agent"];
    let previous = u64::from(protocol::PROTOCOL_VERSION - 1);
    assert_eq!(agent["protocol"], previous, "{listed}");
    let upgrade = agent["upgrade"]
        .as_str()
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        upgrade.contains(&format!("speaks protocol {previous}")) && upgrade.contains("upgrade"),
        "{upgrade}"
    );
    let text = stdout(&home.run(&["list"]));
    assert!(text.contains(upgrade), "{text}");

    // A run on it: synced, started, and every line streamed back once, in order.
    let project = tempfile::tempdir().expect("tempdir");
    std::fs::write(project.path().join("train.py"), "print('simulated')\n").expect("write");
    let dir = project.path().display().to_string();
    let out = home.run(&[
        "run",
        "--on",
        "old1",
        "--root",
        &dir,
        "--workdir",
        &dir,
        "--setup",
        "none",
        "--no-checkpoints",
        "--",
        "python3",
        "train.py",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out)
        .lines()
        .filter_map(|l| l.split(" line ").nth(1).map(str::to_owned))
        .collect();
    let expected: Vec<String> = (1..=500).map(|n| n.to_string()).collect();
    assert_eq!(lines, expected);
    let log = std::fs::read_to_string(home.path().join("daemon.log")).unwrap_or_default();
    assert!(
        log.contains(&format!("speaks protocol {previous}")),
        "the daemon's log says so too"
    );
}
