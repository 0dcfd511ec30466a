//! A pod's start command (`args` of the create call): `cloud-init/pod-start.sh` rendered
//! with the agent's presigned URL, its SHA-256 and the agent's config, as one `sh -c`
//! word. RunPod splits `args` into words as a POSIX shell would, so the script is
//! single-quoted, each quote inside it written `'\''`. A cluster's pods all run one start
//! command: it holds every node's config and each pod writes the one of its `NODE_RANK`.

use protocol::agent_config::AgentConfigFile;

const TEMPLATE: &str = include_str!("../../../../cloud-init/pod-start.sh");

/// The heredoc delimiter the config is written between; it must not occur in the config.
const CONFIG_END: &str = "RUNCTL_CONFIG_END";

/// What the start command needs.
#[derive(Debug)]
pub struct Params<'a> {
    /// The agent's config; for a cluster, each node's, in rank order.
    pub configs: &'a [AgentConfigFile],
    /// A presigned GET URL for the static agent, and its SHA-256.
    pub agent_url: &'a str,
    pub agent_sha256: &'a str,
}

/// The script itself (what `sh -c` runs), or why it cannot be written.
pub fn script(params: &Params<'_>) -> Result<String, String> {
    crate::provider::check_download("runctl-agent", params.agent_url, params.agent_sha256)?;
    let mut heredocs = Vec::with_capacity(params.configs.len());
    for config in params.configs {
        let text = toml::to_string(config).map_err(|e| e.to_string())?;
        if text.lines().any(|line| line.trim() == CONFIG_END) {
            return Err(format!("the agent config holds the line {CONFIG_END}"));
        }
        heredocs.push(format!(
            "cat >\"$root/agent.toml\" <<'{CONFIG_END}'\n{}\n{CONFIG_END}",
            text.trim_end()
        ));
    }
    let write_config = match heredocs.as_slice() {
        [] => return Err("no agent config".into()),
        [one] => one.clone(),
        many => {
            let mut case = String::from("case \"${NODE_RANK:-}\" in\n");
            for (rank, heredoc) in many.iter().enumerate() {
                case.push_str(&format!("{rank})\n{heredoc}\n;;\n"));
            }
            case.push_str(&format!(
                "*) say \"NODE_RANK is '${{NODE_RANK:-}}', not a rank of this cluster's {} nodes\"; exit 2 ;;\nesac",
                many.len()
            ));
            case
        }
    };
    Ok(TEMPLATE
        .replace("{{url}}", params.agent_url)
        .replace("{{sha256}}", params.agent_sha256)
        .replace("{{write_config}}", &write_config))
}

/// The start command: `sh -c '<script>'`.
pub fn render(params: &Params<'_>) -> Result<String, String> {
    Ok(format!("sh -c {}", quote(&script(params)?)))
}

/// One POSIX shell word holding `text` exactly.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfigFile {
        AgentConfigFile {
            idle_timeout_secs: Some(3600),
            ..AgentConfigFile::new(
                "runpod-3fa9c1".parse().expect("name"),
                vec!["tcp://203.0.113.7:7443".parse().expect("valid")],
                "ab".repeat(32).parse().expect("fingerprint"),
                protocol::EnrollToken::from_random([7; 32]),
                "state".into(),
            )
        }
    }

    #[test]
    fn the_start_command_is_one_word_that_a_shell_splits_back_into_the_script() {
        let config = [config()];
        let params = Params {
            configs: &config,
            agent_url: "https://bucket.s3.amazonaws.com/agent/abc/runctl-agent?X-Amz-Signature=1",
            agent_sha256: &"c".repeat(64),
        };
        let script = script(&params).expect("script");
        assert!(script.contains(
            "url='https://bucket.s3.amazonaws.com/agent/abc/runctl-agent?X-Amz-Signature=1'"
        ));
        assert!(script.contains(&format!("sha256='{}'", "c".repeat(64))));
        assert!(script.contains("instance = \"runpod-3fa9c1\""), "{script}");
        assert!(!script.contains("{{"), "every placeholder is filled");
        let command = render(&params).expect("command");
        // What `sh` makes of it: `sh`, `-c` and the script, byte for byte.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s\\0' {command}"))
            .output()
            .expect("sh");
        let words: Vec<&[u8]> = out
            .stdout
            .split(|b| *b == 0)
            .filter(|w| !w.is_empty())
            .collect();
        assert_eq!(words.len(), 3, "{command}");
        assert_eq!(words[0], b"sh");
        assert_eq!(words[1], b"-c");
        assert_eq!(words[2], script.as_bytes());
    }

    #[test]
    fn a_url_or_hash_that_could_break_the_script_is_refused() {
        let config = [config()];
        let sha = "c".repeat(64);
        for (url, sha256) in [
            ("https://x/a'b", sha.as_str()),
            ("https://x/a b", sha.as_str()),
            ("https://x/a\nb", sha.as_str()),
            ("https://x/a", "abc"),
            ("https://x/a", &"g".repeat(64)),
        ] {
            let params = Params {
                configs: &config,
                agent_url: url,
                agent_sha256: sha256,
            };
            assert!(render(&params).is_err(), "{url:?} {sha256:?}");
        }
    }
}
