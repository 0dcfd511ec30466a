//! Helpers for the reachability tests: a `runctl-relay` process, and a local agent
//! repointed at chosen endpoints (optionally inside a network namespace).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Home, bin};

/// A `runctl-relay` process serving one controller CA.
#[derive(Debug)]
pub struct RelayProcess {
    child: Child,
    /// The address it printed (what it bound).
    pub addr: SocketAddr,
    pub state: tempfile::TempDir,
    pub ca: String,
    pub netns: Option<String>,
}

impl RelayProcess {
    /// Starts a relay on `listen` (port 0 picks one), with a fresh state dir unless given.
    pub fn start(
        ca: &str,
        listen: &str,
        state: Option<tempfile::TempDir>,
        netns: Option<&str>,
    ) -> Self {
        let state = state.unwrap_or_else(|| tempfile::tempdir().expect("tempdir"));
        let mut child = crate::in_netns(netns, &bin("runctl-relay"))
            .args(["--listen", listen, "--ca-sha256", ca, "--state-dir"])
            .arg(state.path())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start runctl-relay");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let first = lines.next().expect("a line").expect("utf-8");
        let addr = first
            .split_whitespace()
            .find_map(|w| w.trim_end_matches(',').parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("no address in {first:?}"));
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        RelayProcess {
            child,
            addr,
            state,
            ca: ca.to_owned(),
            netns: netns.map(str::to_owned),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (SIGKILL) and hands back what a restart needs: its state and address.
    pub fn kill(mut self) -> (tempfile::TempDir, SocketAddr) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let state = std::mem::replace(&mut self.state, tempfile::tempdir().expect("tempdir"));
        (state, self.addr)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sets `[daemon] relay` in the home's config and restarts its daemon, then waits until
/// it has registered.
pub fn use_relay(home: &Home, relay: &str) {
    let config = home.path().join("config.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("[daemon]\n", &format!("[daemon]\nrelay = \"{relay}\"\n")),
    )
    .expect("write config");
    assert!(home.run(&["shutdown"]).status.success());
    home.wait_until("the relay registration", Duration::from_secs(20), || {
        home.json(&["status"])["relay"]["registered"] == true
    });
}

/// The controller CA's fingerprint, from `status`.
pub fn ca(home: &Home) -> String {
    home.json(&["status"])["ca_sha256"]
        .as_str()
        .expect("ca")
        .to_owned()
}

/// An agent process a test started; killed and reaped when dropped.
#[derive(Debug)]
pub struct AgentProcess(pub Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Points a local instance's agent at exactly `endpoints` and restarts it (inside
/// `netns` when given).
pub fn repoint_agent(
    home: &Home,
    instance: &str,
    endpoints: &[String],
    netns: Option<&str>,
) -> AgentProcess {
    let path = home.path().join(format!("local/{instance}/agent.toml"));
    let needle = path.display().to_string();
    crate::kill_processes_with_arg(&needle);
    home.wait_until("the agent to die", Duration::from_secs(10), || {
        !std::fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .any(|p| {
                std::fs::read(p.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
            })
    });
    let mut config: toml::Table = std::fs::read_to_string(&path)
        .expect("read agent config")
        .parse()
        .expect("toml");
    config.insert(
        "controller".into(),
        toml::Value::Array(endpoints.iter().map(|e| e.clone().into()).collect()),
    );
    std::fs::write(&path, toml::to_string(&config).expect("toml")).expect("write agent config");
    AgentProcess(home.restart_agent_in(instance, netns))
}

/// (instance, path) of every connected agent, from `status`.
pub fn agent_paths(home: &Home) -> Vec<(String, String)> {
    let status = home.json(&["status"]);
    status["agents"]
        .as_array()
        .unwrap_or_else(|| panic!("no agents in {status}"))
        .iter()
        .map(|a| {
            (
                a["instance"].as_str().expect("instance").to_owned(),
                a["path"]["path"].as_str().expect("path").to_owned(),
            )
        })
        .collect()
}

/// Waits until `instance`'s agent is connected over `path`; returns how long that took.
pub fn wait_for_path(home: &Home, instance: &str, path: &str, bound: Duration) -> Duration {
    let started = std::time::Instant::now();
    home.wait_until(&format!("{instance} to connect {path}"), bound, || {
        agent_paths(home).contains(&(instance.to_owned(), path.to_owned()))
    });
    started.elapsed()
}

/// The daemon's QUIC port, from `status`.
pub fn quic_port(home: &Home) -> u16 {
    home.json(&["status"])["quic_addr"]
        .as_str()
        .expect("quic addr")
        .parse::<SocketAddr>()
        .expect("addr")
        .port()
}

/// Runs a command and fails the test, with its output, if it fails.
pub fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
