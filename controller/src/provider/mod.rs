//! Where instances come from: `local` (an agent process on this machine, the embedded
//! default) and `ec2`, one folder each. This module is what they share: which providers
//! exist and what each can do. The daemon's instance code (`daemon::instances`) writes
//! the provider-neutral steps of a launch once and calls into a provider's folder for the
//! rest; `Capabilities` answer what differs, so no other place matches on the kind.

pub mod artifact;
pub mod ec2;
pub mod local;
pub mod runpod;

use serde::{Deserialize, Serialize};

/// Phase lines for the CLI (stderr), as a launch goes.
pub type Progress = tokio::sync::mpsc::UnboundedSender<String>;

/// Sends one phase line; a CLI that has gone away loses nothing the launch needs.
pub fn say(progress: &Progress, line: impl Into<String>) {
    let _ = progress.send(line.into());
}

/// Checks what an install script is given to download a static binary: the URL sits in
/// single quotes in a shell script (a presigned URL never holds a quote, whitespace or a
/// control character, and the check keeps that an invariant rather than a hope), and the
/// SHA-256 is 64 hex digits.
pub fn check_download(binary: &str, url: &str, sha256: &str) -> Result<(), String> {
    if url
        .bytes()
        .any(|b| b == b'\'' || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!(
            "the {binary} URL holds a quote, a space or a control character"
        ));
    }
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("the {binary} SHA-256 is not 64 hex digits"));
    }
    Ok(())
}

/// `12.3s`, for phase lines.
pub fn seconds(elapsed: std::time::Duration) -> String {
    format!("{:.1}s", elapsed.as_secs_f64())
}

/// Where instances come from. Stored in the database as its `as_str` (a CHECK constraint
/// keeps the column to these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// An agent process on this machine, with its own work dir (no cloud account needed).
    Local,
    /// An EC2 instance whose cloud-init installs the agent ([ec2] in the config).
    Ec2,
    /// A RunPod pod whose start command installs the agent ([runpod] in the config, the
    /// key in RUNPOD_API_KEY).
    Runpod,
}

/// What a provider can do, declared once and asked wherever behaviour differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `stop` and `start` keep the instance and its disk (on-demand instances).
    pub stop_start: bool,
    /// Spot (interruptible) capacity at a lower price.
    pub spot: bool,
    /// Data volumes made and attached by runctl.
    pub volumes: bool,
    /// Several instances launched together for one run (`run --nodes`): local agents, EC2
    /// instances in one placement group, or one RunPod cluster.
    pub multi_node: bool,
    /// The instance runs elsewhere: it has its own credentials and cannot reach this
    /// machine's files (a local object store), and it is billed.
    pub remote: bool,
    /// The instance has object-store credentials of its own (an instance profile, or
    /// this machine's environment); without them the daemon hands its agent short-lived
    /// ones over the channel.
    pub own_store_credentials: bool,
    /// Its agent can stop its own instance through the provider's API (a pod, with the
    /// key RunPod gives it), so a run's `--end stop` needs no daemon.
    pub stops_itself: bool,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Ec2 => "ec2",
            ProviderKind::Runpod => "runpod",
        }
    }

    /// "a local instance", "an EC2 instance".
    pub fn an_instance(self) -> &'static str {
        match self {
            ProviderKind::Local => "a local instance",
            ProviderKind::Ec2 => "an EC2 instance",
            ProviderKind::Runpod => "a RunPod pod",
        }
    }

    pub fn capabilities(self) -> Capabilities {
        match self {
            ProviderKind::Local => Capabilities {
                stop_start: false,
                spot: false,
                volumes: false,
                multi_node: true,
                remote: false,
                own_store_credentials: true,
                stops_itself: false,
            },
            ProviderKind::Ec2 => Capabilities {
                stop_start: true,
                spot: true,
                volumes: true,
                multi_node: true,
                remote: true,
                own_store_credentials: true,
                stops_itself: false,
            },
            ProviderKind::Runpod => Capabilities {
                stop_start: true,
                spot: true,
                volumes: true,
                multi_node: true,
                remote: true,
                own_store_credentials: false,
                stops_itself: true,
            },
        }
    }

    /// A new instance name: the provider's prefix and 6 hex digits.
    pub fn fresh_name(self) -> protocol::InstanceName {
        let suffix: [u8; 3] = rand::random();
        format!("{}-{}", self.as_str(), hex::encode(suffix))
            .parse()
            .expect("a provider's name, '-' and 6 hex digits is a valid instance name")
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl rusqlite::ToSql for ProviderKind {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::types::FromSql for ProviderKind {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let text = value.as_str()?;
        <ProviderKind as clap::ValueEnum>::value_variants()
            .iter()
            .copied()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| {
                rusqlite::types::FromSqlError::Other(
                    format!("unknown provider {text:?} in the database").into(),
                )
            })
    }
}

/// How to launch an instance, one variant per provider (`launch`, `run`): the wire form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LaunchOptions {
    Local,
    Ec2(Box<ec2::Ec2Launch>),
    Runpod(Box<runpod::RunpodLaunch>),
}

impl LaunchOptions {
    pub fn kind(&self) -> ProviderKind {
        match self {
            LaunchOptions::Local => ProviderKind::Local,
            LaunchOptions::Ec2(_) => ProviderKind::Ec2,
            LaunchOptions::Runpod(_) => ProviderKind::Runpod,
        }
    }

    /// Spot capacity asked for.
    pub fn spot(&self) -> bool {
        match self {
            LaunchOptions::Local => false,
            LaunchOptions::Ec2(opts) => opts.spot,
            LaunchOptions::Runpod(opts) => opts.spot,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in <ProviderKind as clap::ValueEnum>::value_variants() {
            let json = serde_json::to_string(kind).expect("json");
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert!(kind.fresh_name().as_str().starts_with(kind.as_str()));
            let value = rusqlite::types::Value::Text(kind.as_str().into());
            let back = <ProviderKind as rusqlite::types::FromSql>::column_result((&value).into())
                .expect("known");
            assert_eq!(back, *kind);
        }
        let unknown = rusqlite::types::Value::Text("gcp".into());
        assert!(
            <ProviderKind as rusqlite::types::FromSql>::column_result((&unknown).into()).is_err()
        );
    }
}
