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
    /// Where the pods' containers run (`DIR/POD_ID`).
    pub dir: tempfile::TempDir,
}

impl RunPodDouble {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new("python3")
            .arg(fixture("runpod_double.py"))
            .arg(KEY)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the RunPod double");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("port line");
        let port = line.trim().parse().expect("a port");
        RunPodDouble { child, port, dir }
    }

    /// The REST base URL (without `/v2`).
    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn graphql(&self) -> String {
        format!("http://127.0.0.1:{}/graphql", self.port)
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
