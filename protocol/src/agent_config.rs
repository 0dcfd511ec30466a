//! The agent's config file format: the contract between the controller, which writes it
//! (into user-data, a pod's start command, or a local instance's directory), and the
//! agent, which reads it. Serialized as TOML by both sides.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ids::{EnrollToken, Fingerprint, InstanceName};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfigFile {
    /// This instance's name, as the controller knows it.
    pub instance: InstanceName,
    /// Every way to reach the controller (`udp://HOST:PORT`, `tcp://...`, `udp+relay://...`,
    /// `tcp+relay://...`; a bare `HOST:PORT` is UDP direct). The agent dials them staggered,
    /// best path first, and keeps the first whose handshake completes.
    pub controller: Vec<crate::path::Endpoint>,
    /// SHA-256 of the controller CA's certificate (64 hex digits): the agent trusts only it.
    pub ca_sha256: Fingerprint,
    /// The single-use enrollment token; unused once the agent has its certificate.
    pub token: EnrollToken,
    /// Where the agent keeps its identity, run logs and work trees. A relative path is
    /// taken relative to the config file.
    pub state_dir: PathBuf,
    /// Milliseconds between resource samples (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_interval_ms: Option<u64>,
    /// The `nvidia-smi` to run for GPU figures (default: `nvidia-smi` from `PATH`; none
    /// found means no GPU figures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvidia_smi: Option<PathBuf>,
    /// Power the instance off after this many seconds with no active run and no
    /// controller connection (default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    /// The command that powers the instance off (e.g. `["systemctl", "poweroff"]`).
    /// Without one, "powering off" ends the agent process (a local instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poweroff_command: Option<Vec<String>>,
    /// The EC2 instance metadata endpoint (e.g. `http://169.254.169.254`); when set and
    /// the instance is spot, it is polled for interruption notices every 5 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_endpoint: Option<String>,
    /// Per-run cap on the agent's log of a run, in bytes (default 1 GiB); the oldest
    /// quarter is deleted when it is reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_max_bytes: Option<u64>,
}
