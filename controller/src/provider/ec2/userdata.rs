//! The user-data an EC2 instance boots with: the `cloud-init/` templates, rendered. It
//! writes the agent's config (owner-only), downloads the agent by a presigned URL with
//! retries, checks its SHA-256, and installs and starts the systemd unit.

use protocol::agent_config::AgentConfigFile;

const TEMPLATE: &str = include_str!("../../../../cloud-init/user-data.yaml");
const INSTALL: &str = include_str!("../../../../cloud-init/install-agent.sh");
const UNIT: &str = include_str!("../../../../cloud-init/runctl-agent.service");

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

/// Renders the user-data, or says why it cannot be.
pub fn render(params: &Params<'_>) -> Result<String, String> {
    // The URL sits in single quotes in a shell script; a presigned URL never holds one,
    // nor whitespace, but the check keeps that an invariant rather than a hope.
    if params
        .agent_url
        .bytes()
        .any(|b| b == b'\'' || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("the agent URL holds a quote, a space or a control character".into());
    }
    if params.agent_sha256.len() != 64
        || !params.agent_sha256.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err("the agent's SHA-256 is not 64 hex digits".into());
    }
    let config = toml::to_string(params.config).map_err(|e| e.to_string())?;
    let install = INSTALL
        .replace("{{agent_url}}", params.agent_url)
        .replace("{{agent_sha256}}", params.agent_sha256);
    let text = TEMPLATE
        .replace("{{version}}", env!("CARGO_PKG_VERSION"))
        .replace("{{instance}}", params.config.instance.as_str())
        .replace("{{agent_config}}", &indent(&config))
        .replace("{{install_script}}", &indent(&install))
        .replace("{{unit}}", &indent(UNIT));
    if text.len() > MAX_BYTES {
        return Err(format!(
            "the user-data is {} bytes, over EC2's limit of {MAX_BYTES}",
            text.len()
        ));
    }
    Ok(text)
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
            instance: "ec2-3fa9c1".parse().expect("name"),
            controller: vec![
                "203.0.113.7:7443".parse().expect("valid"),
                "tcp://203.0.113.7:7443".parse().expect("valid"),
            ],
            ca_sha256: "ab".repeat(32).parse().expect("fingerprint"),
            token: protocol::EnrollToken::from_random([7; 32]),
            state_dir: "state".into(),
            stats_interval_ms: None,
            nvidia_smi: None,
            idle_timeout_secs: None,
            poweroff_command: Some(vec!["systemctl".into(), "poweroff".into()]),
            metadata_endpoint: Some("http://169.254.169.254".into()),
            log_max_bytes: None,
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
