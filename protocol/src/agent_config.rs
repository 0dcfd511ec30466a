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
    /// Controller endpoints (`host:port`), tried in order.
    pub controller: Vec<String>,
    /// SHA-256 of the controller CA's certificate (64 hex digits): the agent trusts only it.
    pub ca_sha256: Fingerprint,
    /// The single-use enrollment token; unused once the agent has its certificate.
    pub token: EnrollToken,
    /// Where the agent keeps its identity, run logs and work trees. A relative path is
    /// taken relative to the config file.
    pub state_dir: PathBuf,
    /// Seconds between SIGTERM and SIGKILL when stopping a run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_secs: Option<u64>,
}
