//! Property tests of what the controller parses from people and files: every flag's
//! value (through clap, so each `value_parser` is reached as a user reaches it), the
//! project's `runctl.toml` and the controller's `config.toml`. Arbitrary text and
//! mutations of good examples give a value or a clean refusal, never a panic. Cases:
//! `PROPTEST_CASES`, else 256.

use clap::Parser;
use controller::cli::Cli;
use proptest::prelude::*;

fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every flag that takes a value with a parser of runctl's own, with the subcommand it
/// belongs to.
const FLAGS: &[(&[&str], &str)] = &[
    (&["run"], "--instance-type"),
    (&["run"], "--env"),
    (&["run"], "--forward"),
    (&["run"], "--restart"),
    (&["run"], "--spot-signal"),
    (&["run"], "--on-interrupt"),
    (&["run"], "--max-cost"),
    (&["run"], "--max-hours"),
    (&["run"], "--data"),
    (&["run"], "--secret"),
    (&["run"], "--nodes"),
    (&["run"], "--ami"),
    (&["run"], "--max-price"),
    (&["run"], "--volume-snapshot"),
    (&["logs"], "--since"),
];

/// Text shaped like the values people type: digits, units, colons, equals signs,
/// schemes, and anything else.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9a-z.:=/@,_-]{0,24}",
        "(s3://)?[a-z0-9]{0,8}(/[a-z0-9.]{0,6}){0,3}(=[a-z/]{0,8})?",
        "[0-9]{0,12}(\\.[0-9]{0,4})?(h|m|s|ms|d)?",
        "(localhost|127\\.0\\.0\\.1)?:?[0-9]{0,6}(:[a-z0-9.]{0,12})?(:[0-9]{0,6})?",
    ]
}

const RUNFILE: &str = r#"
[run]
command = ["python", "train.py"]
provider = "ec2"
instance_type = "g5.xlarge,g6.xlarge"
spot = true
on_interrupt = "relaunch:3"
max_cost = 25.0
nodes = 2
env = ["A=1"]
data = ["s3://bucket/prefix=/data"]

[profile.big]
instance_type = "p4d.24xlarge"
"#;

const CONFIG: &str = r#"
[daemon]
listen = "127.0.0.1:7443"
token_ttl_secs = 600
watch_secs = 30

[storage]
store = "s3://bucket/runctl"

[ec2]
region = "us-east-1"
max_running = 4

[runpod]
enroll_timeout_secs = 600
"#;

/// `example` with some of its lines' values replaced, or whole lines.
fn mutated(example: &'static str) -> impl Strategy<Value = String> {
    let lines: Vec<&'static str> = example.lines().collect();
    let n = lines.len();
    prop::collection::vec(
        prop::option::of(prop_oneof![any::<String>(), value()]),
        n..=n,
    )
    .prop_map(move |swaps| {
        lines
            .iter()
            .zip(&swaps)
            .map(|(line, swap)| match swap {
                None => (*line).to_owned(),
                Some(text) => match line.split_once('=') {
                    Some((key, _)) => format!("{key}= {text:?}"),
                    None => text.clone(),
                },
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn every_flag_value_parses_or_is_refused(
        pick in any::<prop::sample::Index>(),
        text in value(),
    ) {
        let (sub, flag) = FLAGS[pick.index(FLAGS.len())];
        let mut argv = vec!["runctl-controller"];
        argv.extend_from_slice(sub);
        argv.extend_from_slice(&[flag, &text]);
        if sub == ["run"] {
            argv.extend_from_slice(&["--", "true"]);
        }
        if let Err(e) = Cli::try_parse_from(&argv) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn a_run_file_parses_or_is_refused_with_a_reason(
        text in prop_oneof![any::<String>(), mutated(RUNFILE)],
    ) {
        if let Err(e) = controller::runfile::parse(&text) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn a_config_file_loads_or_is_refused_with_a_reason(
        text in prop_oneof![any::<String>(), mutated(CONFIG)],
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, &text).expect("write");
        if let Err(e) = controller::config::Config::load(&path) {
            prop_assert!(!e.message.is_empty());
        }
    }
}

#[test]
fn every_flag_listed_is_one_the_cli_has() {
    use clap::CommandFactory;
    let cli = Cli::command();
    for (sub, flag) in FLAGS {
        let command = sub.iter().fold(&cli, |c, s| {
            c.find_subcommand(s)
                .unwrap_or_else(|| panic!("no subcommand {s}"))
        });
        let long = flag.trim_start_matches("--");
        assert!(
            command.get_arguments().any(|a| a.get_long() == Some(long)
                && a.get_value_parser().type_id() != clap::builder::ValueParser::bool().type_id()),
            "{sub:?} has no {flag} taking a value"
        );
    }
}
