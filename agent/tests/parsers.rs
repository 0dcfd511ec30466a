//! Property tests of what the agent parses from outside: nvidia-smi's CSV lines, the
//! kernel's `/proc/PID/stat`, the instance metadata's spot and rebalance notices, and its
//! own config file. Arbitrary text and mutations of real examples give a value or a clean
//! refusal, never a panic. Cases: `PROPTEST_CASES`, else 512.

use proptest::prelude::*;
use protocol::agent_config::AgentConfigFile;

fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// `example` split at `sep`, each field kept or replaced by arbitrary text.
fn fields_of(example: &'static str, sep: char) -> impl Strategy<Value = String> {
    let parts: Vec<&'static str> = example.split(sep).collect();
    let n = parts.len();
    prop::collection::vec(prop::option::of(any::<String>()), n..=n + 1).prop_map(move |swaps| {
        swaps
            .iter()
            .enumerate()
            .map(|(i, swap)| match swap {
                Some(text) => text.clone(),
                None => parts.get(i).copied().unwrap_or_default().to_owned(),
            })
            .collect::<Vec<_>>()
            .join(&sep.to_string())
    })
}

const GPU_LINE: &str = "0, NVIDIA H100 80GB HBM3, 97, 61234, 81559, 71, 612.34";
const APP_LINE: &str = "41234, 00000000:18:00.0, 30215";
const STAT_LINE: &str =
    "4123 (python3 (train)) S 4100 4123 4100 0 -1 4194304 5000 0 0 0 120 30 0 0 20 0 8 0 900";
const CONFIG: &str = r#"
instance = "gpu-1"
endpoints = ["udp://203.0.113.7:7443", "tcp://203.0.113.7:7443"]
ca_sha256 = "abababababababababababababababababababababababababababababababab"
token = "0707070707070707070707070707070707070707070707070707070707070707"
state_dir = "state"
idle_timeout_secs = 3600
"#;

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn nvidia_smi_lines_parse_or_are_skipped(
        gpu in prop_oneof![any::<String>(), fields_of(GPU_LINE, ',')],
        app in prop_oneof![any::<String>(), fields_of(APP_LINE, ',')],
    ) {
        if let Some(stats) = agent::gpu::parse_gpu_line(&gpu) {
            prop_assert!(stats.util_percent.is_none_or(|u| !u.is_nan()));
        }
        let _ = agent::gpu::parse_app_line(&app);
    }

    #[test]
    fn proc_stat_lines_parse_or_are_skipped(
        line in prop_oneof![any::<String>(), fields_of(STAT_LINE, ' ')],
    ) {
        let _ = agent::procstat::ProcStat::parse(&line);
    }

    #[test]
    fn metadata_notices_parse_or_are_ignored(body in prop_oneof![
        any::<String>(),
        fields_of(r#"{"action": "terminate", "time": "2026-12-07T17:00:00Z"}"#, '"'),
        fields_of(r#"{"noticeTime": "2026-12-07T17:00:00Z"}"#, '"'),
    ]) {
        let _ = agent::spot::parse_instance_action(&body);
        let _ = agent::spot::parse_rebalance(&body);
    }

    #[test]
    fn an_agent_config_parses_or_is_refused_with_a_reason(
        text in prop_oneof![any::<String>(), fields_of(CONFIG, '"'), fields_of(CONFIG, '\n')],
    ) {
        if let Ok(file) = toml::from_str::<AgentConfigFile>(&text)
            && let Err(e) = agent::config::AgentConfig::from_file(file, std::path::Path::new("/etc/runctl"))
        {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
