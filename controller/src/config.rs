//! The controller's config file (`$RUNCTL_HOME/config.toml`). Every key is optional; an
//! unknown key or a bad value is an error that names the file, the line and the fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{ErrorCode, UserError};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub local: LocalConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// The QUIC endpoint agents dial. Port 0 picks a free port on first start and keeps it
    /// across restarts, so running agents can always find the daemon again.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How long an enrollment token stays valid, in seconds.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// How long a stopped run gets between SIGTERM and SIGKILL, in seconds.
    #[serde(default = "default_stop_grace")]
    pub stop_grace_secs: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// The `runctl-agent` binary the local provider starts. Default: `RUNCTL_AGENT_BIN`,
    /// else the `runctl-agent` beside this executable.
    pub agent_binary: Option<PathBuf>,
    /// Settings written into each local agent's config.
    #[serde(default)]
    pub agent: LocalAgentConfig,
}

/// `[local.agent]`: what local agents are told (the agent config's keys of the same names).
/// A local instance has no power-off command by default: "powering off" ends its agent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalAgentConfig {
    pub stats_interval_ms: Option<u64>,
    pub nvidia_smi: Option<PathBuf>,
    pub idle_timeout_secs: Option<u64>,
    pub poweroff_command: Option<Vec<String>>,
    /// An instance metadata endpoint (a local double, to rehearse spot notices).
    pub metadata_endpoint: Option<String>,
    pub log_max_bytes: Option<u64>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
fn default_token_ttl() -> u64 {
    900
}
fn default_stop_grace() -> u64 {
    10
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: default_listen(),
            token_ttl_secs: default_token_ttl(),
            stop_grace_secs: default_stop_grace(),
        }
    }
}

impl DaemonConfig {
    pub fn token_ttl(&self) -> Duration {
        Duration::from_secs(self.token_ttl_secs)
    }
    pub fn stop_grace(&self) -> Duration {
        Duration::from_secs(self.stop_grace_secs)
    }
}

impl Config {
    /// Loads the config at `path`; a missing file means all defaults.
    pub fn load(path: &Path) -> Result<Self, UserError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => {
                return Err(UserError::new(
                    ErrorCode::BadInput,
                    format!("cannot read config file {}: {e}", path.display()),
                )
                .resolve(format!(
                    "make {} readable, or remove it to use the defaults",
                    path.display()
                )));
            }
        };
        Self::parse(&text).map_err(|e| {
            UserError::new(
                ErrorCode::BadInput,
                format!("config file {} is invalid: {}", path.display(), e.trim_end()),
            )
            .resolve(
                "fix the file (keys: [daemon] listen, token_ttl_secs, stop_grace_secs; [local] agent_binary), or remove it to use the defaults",
            )
        })
    }

    fn parse(text: &str) -> Result<Self, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if config.daemon.token_ttl_secs == 0 {
            return Err("[daemon] token_ttl_secs must be at least 1".into());
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<&str, &str>) {
        match (Config::parse(text), expected) {
            (Ok(config), Ok(listen)) => assert_eq!(config.daemon.listen.to_string(), listen),
            (Err(e), Err(needle)) => assert!(e.contains(needle), "{e}"),
            (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn parses_and_refuses() {
        check("", Ok("127.0.0.1:0"));
        check("[daemon]\nlisten = \"0.0.0.0:7443\"\n", Ok("0.0.0.0:7443"));
        check(
            "[daemon]\nlisten = \"nowhere\"\n",
            Err("invalid socket address"),
        );
        check(
            "[daemon]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n",
            Err("unknown field `bogus`"),
        );
        check("[daemon\n", Err("line 1"));
        check("[daemon]\ntoken_ttl_secs = 0\n", Err("at least 1"));
    }
}
