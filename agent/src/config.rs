//! The agent's config file: where the controller is, which CA to trust, the enrollment
//! token, and where to keep state. Written by the controller (user-data on EC2, the local
//! provider's instance dir) with owner-only permissions.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
pub use protocol::agent_config::AgentConfigFile;
use protocol::{EnrollToken, Fingerprint, InstanceName};

/// The validated config the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub instance: InstanceName,
    pub controller: Vec<protocol::path::Endpoint>,
    pub ca_pin: Fingerprint,
    pub token: EnrollToken,
    pub state_dir: PathBuf,
    pub stats_interval: Duration,
    pub nvidia_smi: PathBuf,
    pub idle_timeout: Option<Duration>,
    pub poweroff_command: Option<Vec<String>>,
    pub pod_api: Option<String>,
    pub store_credentials: protocol::agent_config::CredentialsFrom,
    pub metadata_endpoint: Option<String>,
    pub log_max_bytes: u64,
    pub disk: crate::workspace::DiskLimits,
    pub access: protocol::agent_config::Access,
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading agent config {}", path.display()))?;
        let file: AgentConfigFile = toml::from_str(&text)
            .with_context(|| format!("agent config {} is invalid", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_file(file, base).with_context(|| format!("agent config {}", path.display()))
    }

    pub fn from_file(file: AgentConfigFile, base: &Path) -> anyhow::Result<Self> {
        if file.controller.is_empty() {
            bail!("`controller` lists no endpoint; give at least one `host:port`");
        }
        if file.stats_interval_ms == Some(0) {
            bail!("`stats_interval_ms` must be at least 1 (1000 samples once a second)");
        }
        if file.idle_timeout_secs == Some(0) {
            bail!(
                "`idle_timeout_secs` must be at least 1; leave it out to never power off when idle"
            );
        }
        if file.poweroff_command.as_ref().is_some_and(|c| c.is_empty()) {
            bail!(
                "`poweroff_command` is empty; give a program and its arguments, e.g. [\"systemctl\", \"poweroff\"]"
            );
        }
        if let Some(api) = &file.pod_api
            && !(api.starts_with("https://") || api.starts_with("http://"))
        {
            bail!("`pod_api` {api:?} is not an http(s):// URL (e.g. \"https://api.runpod.io\")");
        }
        if file.pod_api.is_some() && file.poweroff_command.is_some() {
            bail!("`pod_api` and `poweroff_command` both say how to power off; give one");
        }
        if let Some(endpoint) = &file.metadata_endpoint
            && !endpoint.starts_with("http://")
        {
            bail!(
                "`metadata_endpoint` {endpoint:?} is not an http:// URL (e.g. \"http://169.254.169.254\")"
            );
        }
        Ok(AgentConfig {
            stats_interval: Duration::from_millis(file.stats_interval_ms.unwrap_or(1000)),
            nvidia_smi: file.nvidia_smi.unwrap_or_else(|| "nvidia-smi".into()),
            idle_timeout: file.idle_timeout_secs.map(Duration::from_secs),
            poweroff_command: file.poweroff_command,
            pod_api: file.pod_api,
            store_credentials: file.store_credentials,
            metadata_endpoint: file.metadata_endpoint,
            log_max_bytes: file
                .log_max_bytes
                .unwrap_or(crate::eventlog::DEFAULT_MAX_BYTES),
            disk: {
                let d = crate::workspace::DiskLimits::default();
                crate::workspace::DiskLimits {
                    keep_runs: file.keep_runs.unwrap_or(d.keep_runs),
                    disk_budget: file.disk_budget.unwrap_or(d.disk_budget),
                    min_free: file.min_free.unwrap_or(d.min_free),
                    keep_local_checkpoints: file
                        .keep_local_checkpoints
                        .unwrap_or(d.keep_local_checkpoints),
                }
            },
            access: file.access,
            instance: file.instance,
            controller: file.controller,
            ca_pin: file.ca_sha256,
            token: file.token,
            state_dir: base.join(file.state_dir),
        })
    }
}

/// Resolves `host:port` to a socket address, without glibc's NSS (see `storage::dns`:
/// the agent is a static binary).
pub async fn resolve(endpoint: &str) -> anyhow::Result<SocketAddr> {
    storage::dns::Resolver::from_system()
        .context("reading the DNS configuration")?
        .socket_addr(endpoint)
        .await
        .with_context(|| format!("resolving {endpoint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<AgentConfig> {
        let file: AgentConfigFile = toml::from_str(text)?;
        AgentConfig::from_file(file, Path::new("/etc/runctl"))
    }

    const GOOD: &str = r#"
instance = "gpu-1"
controller = ["127.0.0.1:7443"]
ca_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
token = "1111111111111111111111111111111111111111111111111111111111111111"
state_dir = "state"
"#;

    #[test]
    fn good_config_resolves_relative_state_dir() {
        let config = parse(GOOD).expect("valid");
        assert_eq!(config.state_dir, Path::new("/etc/runctl/state"));
        assert_eq!(config.stats_interval, Duration::from_secs(1));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            (GOOD.replace("gpu-1", "GPU 1"), "not a valid instance name"),
            (
                GOOD.replace("127.0.0.1:7443", "localhost"),
                "not `host:port`",
            ),
            (
                GOOD.replace("[\"127.0.0.1:7443\"]", "[]"),
                "lists no endpoint",
            ),
            (GOOD.replace("state_dir", "stat_dir"), "unknown field"),
            (GOOD.replace("\"00000", "\"zz000"), "SHA-256"),
            (format!("{GOOD}idle_timeout_secs = 0\n"), "at least 1"),
            (format!("{GOOD}poweroff_command = []\n"), "is empty"),
            (
                format!("{GOOD}metadata_endpoint = \"169.254.169.254\"\n"),
                "not an http:// URL",
            ),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", parse(&text).expect_err(expected));
            assert!(err.contains(expected), "{err}");
        }
    }
}
