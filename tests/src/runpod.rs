//! The RunPod double (`fixtures/runpod_double.py`): one per test, on a port of its own.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::fixture;

/// The key the double accepts.
pub const KEY: &str = "rpa_TESTKEY0123456789";

/// A running double; killed when dropped.
#[derive(Debug)]
pub struct RunPodDouble {
    child: Child,
    pub port: u16,
    /// The address its API is reached at.
    host: String,
    /// Where the pods' containers run (`DIR/POD_ID`).
    pub dir: tempfile::TempDir,
}

impl RunPodDouble {
    pub fn start() -> Self {
        Self::start_with(None, "127.0.0.1")
    }

    /// A double whose containers run in network namespace `netns` (when given) and whose
    /// API listens on `host`.
    pub fn start_with(netns: Option<&str>, host: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new("python3");
        cmd.arg(fixture("runpod_double.py"))
            .arg(KEY)
            .arg("--dir")
            .arg(dir.path())
            .args(["--bind", host]);
        if let Some(netns) = netns {
            cmd.args(["--netns", netns]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the RunPod double");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("port line");
        let port = line.trim().parse().expect("a port");
        RunPodDouble {
            child,
            port,
            host: host.to_owned(),
            dir,
        }
    }

    /// The REST base URL (without `/v2`).
    pub fn api(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    pub fn graphql(&self) -> String {
        format!("http://{}:{}/graphql", self.host, self.port)
    }

    /// Every pod the double holds, as it describes them (with `interruptible`, `rate`).
    pub fn pods(&self) -> Vec<serde_json::Value> {
        let body: serde_json::Value = ureq::get(format!("{}/_double/pods", self.api()))
            .call()
            .expect("the double answers")
            .into_body()
            .read_json()
            .expect("json");
        body["pods"].as_array().cloned().unwrap_or_default()
    }

    /// Interrupts an interruptible pod, as an outbid spot pod is.
    pub fn interrupt(&self, id: &str) {
        ureq::post(format!("{}/_double/pods/{id}/interrupt", self.api()))
            .send_empty()
            .expect("the double answers");
    }

    /// Every cluster the double holds, as its API lists them.
    pub fn clusters(&self) -> Vec<serde_json::Value> {
        let body: serde_json::Value = ureq::get(format!("{}/v2/clusters", self.api()))
            .header("Authorization", &format!("Bearer {KEY}"))
            .call()
            .expect("the double answers")
            .into_body()
            .read_json()
            .expect("json");
        body["clusters"].as_array().cloned().unwrap_or_default()
    }

    /// The next cluster's pod of `rank` runs an image that ignores its start command.
    pub fn quiet_rank(&self, rank: u32) {
        ureq::post(format!("{}/_double/quiet-rank", self.api()))
            .send_json(serde_json::json!({ "rank": rank }))
            .expect("the double answers");
    }

    /// Sets how many more pods of `gpu` can be had.
    pub fn set_stock(&self, gpu: &str, count: u32) {
        ureq::post(format!("{}/_double/stock", self.api()))
            .send_json(serde_json::json!({ "gpu": gpu, "count": count }))
            .expect("the double answers");
    }
}

impl Drop for RunPodDouble {
    /// SIGTERM: the double kills its pods' containers before it exits.
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// A pod's network: a namespace of its own joined to this machine by one veth pair
/// (`HOST` here, `POD` inside), no other route, and outgoing UDP dropped, as on pods that
/// have none. Removed when dropped. Needs root: `None` (SKIPPED) without it.
#[derive(Debug)]
pub struct PodNet {
    pub netns: String,
    host_dev: String,
}

impl PodNet {
    /// This machine's side, where the pod reaches the daemon, the store and the API.
    pub const HOST: &str = "198.19.77.1";
    pub const POD: &str = "198.19.77.2";

    pub fn new(test: &str) -> Option<PodNet> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "SKIPPED {test}: a pod's network namespace needs root (scripts/test.sh runs it in CI)"
            );
            return None;
        }
        for tool in ["ip", "nft"] {
            if Command::new(tool).arg("-V").output().is_err() {
                eprintln!(
                    "SKIPPED {test}: `{tool}` is not installed (scripts/test.sh installs it)"
                );
                return None;
            }
        }
        let id = std::process::id() % 100_000;
        let net = PodNet {
            netns: format!("rc{id}-pod"),
            host_dev: format!("rc{id}p0"),
        };
        let sh = |args: &[&str]| crate::reach::sh(Command::new("ip").args(args));
        sh(&["netns", "add", &net.netns]);
        sh(&["netns", "exec", &net.netns, "ip", "link", "set", "lo", "up"]);
        sh(&[
            "link",
            "add",
            &net.host_dev,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &net.netns,
        ]);
        sh(&[
            "addr",
            "add",
            &format!("{}/30", Self::HOST),
            "dev",
            &net.host_dev,
        ]);
        sh(&["link", "set", &net.host_dev, "up"]);
        sh(&[
            "netns",
            "exec",
            &net.netns,
            "ip",
            "addr",
            "add",
            &format!("{}/30", Self::POD),
            "dev",
            "eth0",
        ]);
        sh(&[
            "netns", "exec", &net.netns, "ip", "link", "set", "eth0", "up",
        ]);
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &net.netns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft");
        use std::io::Write;
        nft.stdin
            .take()
            .expect("stdin")
            .write_all(
                b"table inet pod {\n  chain out {\n    type filter hook output priority 0;\n    meta l4proto udp drop\n  }\n}\n",
            )
            .expect("rules");
        assert!(nft.wait().expect("nft").success(), "nft refused the rules");
        Some(net)
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it; the link, in case.
        crate::delete_netns(&self.netns);
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_dev])
            .status();
    }
}
