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
    /// RunPod's REST API (e.g. `https://api.runpod.io`) for a pod's agent: powering off
    /// asks it to stop or terminate this pod (`RUNPOD_POD_ID`) with the pod's own key
    /// (`RUNPOD_API_KEY`), both of which RunPod puts in the pod's environment; no user key
    /// is ever on the pod. Takes the place of `poweroff_command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_api: Option<String>,
    /// Where the agent's object-store credentials come from: its host's credential chain
    /// (an instance profile, the environment), or the controller over the channel (a pod,
    /// which has none of its own; nothing secret is then in its config or environment).
    #[serde(default, skip_serializing_if = "CredentialsFrom::is_host")]
    pub store_credentials: CredentialsFrom,
    /// The EC2 instance metadata endpoint (e.g. `http://169.254.169.254`); when set and
    /// the instance is spot, it is polled for interruption notices every 5 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_endpoint: Option<String>,
    /// Per-run cap on the agent's log of a run, in bytes (default 1 GiB); the oldest
    /// quarter is deleted when it is reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_max_bytes: Option<u64>,
    /// Ended runs kept on the instance with their trees and environments, newest first;
    /// older ones are pruned (default [`DEFAULT_KEEP_RUNS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_runs: Option<u32>,
    /// The most space runctl's own files (runs, environments, the content store,
    /// checkpoints) may take before ended runs are pruned even within `keep_runs`
    /// (default [`DEFAULT_DISK_BUDGET`] of the state filesystem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_budget: Option<DiskSize>,
    /// Free space a new run needs on the state filesystem before it starts (default
    /// [`DEFAULT_MIN_FREE`]); less, after pruning, refuses the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free: Option<DiskSize>,
    /// An ended run's checkpoints kept on the instance's disk once they are in the store,
    /// newest first (default [`DEFAULT_KEEP_LOCAL_CHECKPOINTS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_local_checkpoints: Option<u32>,
    /// What the controller may do on the instance beyond runs: exec, shell, forward, copy.
    #[serde(default, skip_serializing_if = "Access::is_default")]
    pub access: Access,
}

/// `[access]`: the exec, shell, forward and copy streams an agent serves, for fleets that
/// lock them down. Every one served or refused is a line in the agent's audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Access {
    /// `exec` and `shell` (default true).
    pub allow_shell: bool,
    /// Port forwarding (default true).
    pub allow_forward: bool,
    /// Hosts a forward may reach besides the instance's loopback (`"*"`: any). Default
    /// none.
    pub forward_hosts: Vec<String>,
    /// Absolute paths a copy may read or write (relative paths are in the run's tree or
    /// the agent's home). Default: the agent's state directory and its home.
    pub copy_roots: Vec<PathBuf>,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            allow_shell: true,
            allow_forward: true,
            forward_hosts: Vec::new(),
            copy_roots: Vec::new(),
        }
    }
}

impl Access {
    pub fn is_default(&self) -> bool {
        *self == Access::default()
    }
}

impl AgentConfigFile {
    /// A config with what every agent needs and every other setting at its default.
    pub fn new(
        instance: InstanceName,
        controller: Vec<crate::path::Endpoint>,
        ca_sha256: Fingerprint,
        token: EnrollToken,
        state_dir: PathBuf,
    ) -> Self {
        AgentConfigFile {
            instance,
            controller,
            ca_sha256,
            token,
            state_dir,
            stats_interval_ms: None,
            nvidia_smi: None,
            idle_timeout_secs: None,
            poweroff_command: None,
            pod_api: None,
            store_credentials: CredentialsFrom::Host,
            metadata_endpoint: None,
            log_max_bytes: None,
            keep_runs: None,
            disk_budget: None,
            min_free: None,
            keep_local_checkpoints: None,
            access: Access::default(),
        }
    }
}

/// Where an agent's object-store credentials come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialsFrom {
    /// The standard AWS credential chain of the agent's host.
    #[default]
    Host,
    /// `ControllerMsg::StoreCredentials`, scoped to the runs and renewed before expiry.
    Controller,
}

impl CredentialsFrom {
    pub fn is_host(&self) -> bool {
        *self == CredentialsFrom::Host
    }
}

pub const DEFAULT_KEEP_RUNS: u32 = 5;
pub const DEFAULT_DISK_BUDGET: DiskSize = DiskSize::Percent(50);
pub const DEFAULT_MIN_FREE: DiskSize = DiskSize::Bytes(1 << 30);
pub const DEFAULT_KEEP_LOCAL_CHECKPOINTS: u32 = 1;

/// An amount of disk: bytes (`"40GiB"`, `"500 MB"`, `1073741824`) or a share of the
/// filesystem (`"50%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskSize {
    Bytes(u64),
    Percent(u8),
}

impl DiskSize {
    /// The size in bytes on a filesystem of `total_bytes`.
    pub fn bytes_of(self, total_bytes: u64) -> u64 {
        match self {
            DiskSize::Bytes(b) => b,
            DiskSize::Percent(p) => (total_bytes as u128 * p as u128 / 100) as u64,
        }
    }
}

impl std::str::FromStr for DiskSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(DiskSize::Percent(p)),
                _ => Err(format!("{s:?} is not a share of the disk from 1% to 100%")),
            };
        }
        s.parse::<bytesize::ByteSize>()
            .map(|b| DiskSize::Bytes(b.as_u64()))
            .map_err(|_| format!("{s:?} is not a size (e.g. 40GiB, 500MB, 50%)"))
    }
}

impl std::fmt::Display for DiskSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskSize::Bytes(b) => write!(f, "{}", bytesize::ByteSize::b(*b).display().iec()),
            DiskSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for DiskSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DiskSize::Bytes(b) => s.serialize_u64(*b),
            DiskSize::Percent(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for DiskSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(DiskSize::Bytes(b)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_sizes_parse() {
        let check = |text: &str, expected: Option<DiskSize>| {
            assert_eq!(text.parse::<DiskSize>().ok(), expected, "{text:?}");
        };
        check("40GiB", Some(DiskSize::Bytes(40 << 30)));
        check("500 MB", Some(DiskSize::Bytes(500_000_000)));
        check("1048576", Some(DiskSize::Bytes(1 << 20)));
        check("50%", Some(DiskSize::Percent(50)));
        check("100%", Some(DiskSize::Percent(100)));
        check("0%", None);
        check("150%", None);
        check("lots", None);
        check("-5GB", None);
        assert_eq!(DiskSize::Percent(50).bytes_of(1000), 500);
        assert_eq!(DiskSize::Bytes(7).bytes_of(1000), 7);
    }

    #[test]
    fn disk_sizes_round_trip_through_toml() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct T {
            a: DiskSize,
            b: DiskSize,
        }
        let t = T {
            a: DiskSize::Bytes(3 << 30),
            b: DiskSize::Percent(40),
        };
        let text = toml::to_string(&t).expect("serializes");
        assert_eq!(toml::from_str::<T>(&text).expect("parses"), t);
        let parsed: T = toml::from_str("a = \"2GiB\"\nb = \"10%\"").expect("parses");
        assert_eq!(parsed.a, DiskSize::Bytes(2 << 30));
    }
}
