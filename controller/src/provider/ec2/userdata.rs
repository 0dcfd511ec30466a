//! The user-data an EC2 instance boots with: the `cloud-init/` templates, rendered. For a
//! run's instance it writes the agent's config (owner-only), downloads the agent by a
//! presigned URL with retries, checks its SHA-256, and installs and starts the systemd
//! unit; for a relay the same with `runctl-relay`, the CA it serves and its port.

use protocol::Fingerprint;
use protocol::agent_config::AgentConfigFile;

const TEMPLATE: &str = include_str!("../../../../cloud-init/user-data.yaml");
const RELAY_TEMPLATE: &str = include_str!("../../../../cloud-init/relay-user-data.yaml");
const INSTALL: &str = include_str!("../../../../cloud-init/install.sh");
const UNIT: &str = include_str!("../../../../cloud-init/runctl-agent.service");
const RELAY_UNIT: &str = include_str!("../../../../cloud-init/runctl-relay.service");

/// EC2 refuses user-data over 16 KB (before base64).
pub const MAX_BYTES: usize = 16 * 1024;

/// Where the unit runs the agent from; its config and state live here.
pub const AGENT_DIR: &str = "/var/lib/runctl";

#[derive(Debug)]
pub struct Params<'a> {
    pub config: &'a AgentConfigFile,
    /// A presigned GET URL for the agent binary.
    pub agent_url: &'a str,
    /// Its SHA-256, 64 hex digits.
    pub agent_sha256: &'a str,
}

/// What a relay's user-data needs.
#[derive(Debug)]
pub struct RelayParams<'a> {
    pub name: &'a str,
    pub ca_sha256: &'a Fingerprint,
    pub port: u16,
    /// A presigned GET URL for the static `runctl-relay`, and its SHA-256.
    pub relay_url: &'a str,
    pub relay_sha256: &'a str,
}

/// The install script for `binary`, or why it cannot be written.
fn install_script(binary: &str, url: &str, sha256: &str) -> Result<String, String> {
    crate::provider::check_download(binary, url, sha256)?;
    Ok(INSTALL
        .replace("{{binary}}", binary)
        .replace("{{url}}", url)
        .replace("{{sha256}}", sha256))
}

fn within_limit(text: String) -> Result<String, String> {
    if text.len() > MAX_BYTES {
        return Err(format!(
            "the user-data is {} bytes, over EC2's limit of {MAX_BYTES}",
            text.len()
        ));
    }
    Ok(text)
}

/// Renders a run instance's user-data, or says why it cannot be.
pub fn render(params: &Params<'_>) -> Result<String, String> {
    let install = install_script("runctl-agent", params.agent_url, params.agent_sha256)?;
    let config = toml::to_string(params.config).map_err(|e| e.to_string())?;
    within_limit(
        TEMPLATE
            .replace("{{version}}", env!("CARGO_PKG_VERSION"))
            .replace("{{instance}}", params.config.instance.as_str())
            .replace("{{agent_config}}", &indent(&config))
            .replace("{{install_script}}", &indent(&install))
            .replace("{{unit}}", &indent(UNIT)),
    )
}

/// Renders a relay's user-data. Its name is a runctl name (letters, digits, `-`), so it
/// cannot break the YAML comment it appears in.
pub fn render_relay(params: &RelayParams<'_>) -> Result<String, String> {
    if params.port == 0 {
        return Err("the relay's port is 0".into());
    }
    let install = install_script("runctl-relay", params.relay_url, params.relay_sha256)?;
    within_limit(
        RELAY_TEMPLATE
            .replace("{{version}}", env!("CARGO_PKG_VERSION"))
            .replace("{{name}}", params.name)
            .replace("{{ca_sha256}}", &params.ca_sha256.to_string())
            .replace("{{port}}", &params.port.to_string())
            .replace("{{install_script}}", &indent(&install))
            .replace("{{unit}}", &indent(RELAY_UNIT)),
    )
}

/// Indents a block for a YAML literal scalar under `content: |` (six spaces).
fn indent(block: &str) -> String {
    block
        .lines()
        .map(|line| {
            if line.is_empty() {
                String::new()
            } else {
                format!("      {line}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfigFile {
        AgentConfigFile {
            poweroff_command: Some(vec!["systemctl".into(), "poweroff".into()]),
            metadata_endpoint: Some("http://169.254.169.254".into()),
            keep_runs: Some(5),
            disk_budget: Some(protocol::agent_config::DiskSize::Percent(50)),
            ..AgentConfigFile::new(
                "ec2-3fa9c1".parse().expect("name"),
                vec![
                    "203.0.113.7:7443".parse().expect("valid"),
                    "tcp://203.0.113.7:7443".parse().expect("valid"),
                ],
                "ab".repeat(32).parse().expect("fingerprint"),
                protocol::EnrollToken::from_random([7; 32]),
                "state".into(),
            )
        }
    }

    #[test]
    fn renders_every_placeholder_and_stays_small() {
        let config = config();
        let url = "https://b.s3.amazonaws.com/runctl/agent/x/runctl-agent?X-Amz-Signature=ab&X-Amz-Expires=3600";
        let sha = "0".repeat(64);
        let text = render(&Params {
            config: &config,
            agent_url: url,
            agent_sha256: &sha,
        })
        .expect("renders");
        assert!(text.starts_with("#cloud-config\n"));
        assert!(!text.contains("{{"), "{text}");
        assert!(text.contains(url));
        assert!(text.contains(config.token.expose()));
        assert!(text.contains("permissions: '0600'"));
        assert!(text.contains("Restart=always"));
        assert!(text.len() < MAX_BYTES / 2, "{} bytes", text.len());
        insta::assert_snapshot!(text);
    }

    #[test]
    fn a_relay_is_rendered_for_its_ca_and_port() {
        let ca: Fingerprint = "ab".repeat(32).parse().expect("fingerprint");
        let url = "https://b.s3.amazonaws.com/runctl/relay/x/runctl-relay?X-Amz-Signature=ab";
        let sha = "1".repeat(64);
        let text = render_relay(&RelayParams {
            name: "relay-3fa9c1",
            ca_sha256: &ca,
            port: 443,
            relay_url: url,
            relay_sha256: &sha,
        })
        .expect("renders");
        assert!(text.starts_with("#cloud-config\n"));
        assert!(!text.contains("{{"), "{text}");
        assert!(text.contains(&format!("RUNCTL_RELAY_CA_SHA256={ca}")));
        assert!(text.contains("RUNCTL_RELAY_LISTEN=0.0.0.0:443"));
        assert!(text.contains("/usr/local/bin/runctl-relay"));
        assert!(text.contains("DynamicUser=yes"));
        assert!(text.len() < MAX_BYTES / 2, "{} bytes", text.len());
        for (url, sha, port) in [
            ("https://x/'; rm -rf /", sha.as_str(), 443),
            (url, "abc", 443),
            (url, sha.as_str(), 0),
        ] {
            let params = RelayParams {
                name: "relay-3fa9c1",
                ca_sha256: &ca,
                port,
                relay_url: url,
                relay_sha256: sha,
            };
            assert!(render_relay(&params).is_err(), "{url} {sha} {port}");
        }
    }

    #[test]
    fn refuses_what_would_break_the_script() {
        let config = config();
        let sha = "0".repeat(64);
        for url in ["https://x/'; rm -rf /", "https://x/a b", "https://x/\nb"] {
            assert!(
                render(&Params {
                    config: &config,
                    agent_url: url,
                    agent_sha256: &sha
                })
                .is_err()
            );
        }
        assert!(
            render(&Params {
                config: &config,
                agent_url: "https://x/a",
                agent_sha256: "abc"
            })
            .is_err()
        );
    }
}
