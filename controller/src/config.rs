//! The controller's config file (`$RUNCTL_HOME/config.toml`). Every key is optional; an
//! unknown key or a bad value is an error that names the file, the line and the fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::agent_config::DiskSize;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, UserError};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub local: LocalConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub ec2: Ec2Config,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub runpod: RunpodConfig,
    #[serde(default)]
    pub agent: AgentSettings,
}

/// `[runpod]`: RunPod pods (`--provider runpod`). The API key comes from `RUNPOD_API_KEY`
/// in the daemon's environment, else from `api_key_file`; never from this file itself.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunpodConfig {
    /// A file whose first line is the API key (keep it owner-only).
    pub api_key_file: Option<PathBuf>,
    /// RunPod's REST API (v2 lives under it).
    #[serde(default = "default_runpod_api")]
    pub api_url: String,
    /// RunPod's GraphQL endpoint, for interruptible pods.
    #[serde(default = "default_runpod_graphql")]
    pub graphql_url: String,
    /// What pods' agents dial, `HOST:PORT` (pods reach it over TCP; many have no UDP).
    pub controller_endpoint: Option<String>,
    /// The image pods run (it needs `sh` and one of curl, wget or python3).
    #[serde(default = "default_runpod_image")]
    pub image: String,
    /// The data center to place pods in (default: RunPod's choice).
    pub datacenter: Option<String>,
    /// Container disk in GB (wiped when the container restarts).
    #[serde(default = "default_runpod_disk")]
    pub disk_gb: u32,
    /// The pod's volume at /workspace in GB, where the agent keeps its state.
    #[serde(default = "default_runpod_volume")]
    pub volume_gb: u32,
    /// The static agent pods install (default: `runctl-agent` beside this executable).
    pub agent_binary: Option<PathBuf>,
    /// Where that binary is published for pods to download (default: `runctl/` in the
    /// checkpoint bucket).
    pub artifacts: Option<String>,
    /// How long the agent's download URL stays valid.
    #[serde(default = "default_presign_secs")]
    pub presign_secs: u64,
    /// How long a pod may take from creation to its agent's enrollment (images can be big).
    #[serde(default = "default_runpod_enroll")]
    pub enroll_timeout_secs: u64,
    /// Refuse a launch while this many runctl pods run.
    #[serde(default = "default_max_running")]
    pub max_running: u32,
    /// Terminate a pod after this long with no run and no controller (default: never).
    pub idle_timeout_secs: Option<u64>,
    /// The IAM role the daemon assumes to give a pod's agent store credentials: short
    /// lived, limited by a session policy to the prefixes of the pod's runs, handed over
    /// the channel and renewed before they expire.
    pub store_role_arn: Option<String>,
    /// Instead of a role: the named AWS profile whose credentials pods' agents are handed
    /// (not scoped to the run; renewed when the profile's own expire).
    pub store_profile: Option<String>,
    /// How long assumed-role credentials last (900 to 43200 s).
    #[serde(default = "default_store_credentials_secs")]
    pub store_credentials_secs: u64,
    /// The STS endpoint to assume the role at (default: AWS's for the region).
    pub sts_endpoint: Option<String>,
}

fn default_store_credentials_secs() -> u64 {
    3600
}

fn default_runpod_api() -> String {
    crate::provider::runpod::API_URL.into()
}
fn default_runpod_graphql() -> String {
    crate::provider::runpod::GRAPHQL_URL.into()
}
fn default_runpod_image() -> String {
    "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04".into()
}
fn default_runpod_disk() -> u32 {
    20
}
fn default_runpod_volume() -> u32 {
    20
}
fn default_runpod_enroll() -> u64 {
    1200
}

impl Default for RunpodConfig {
    fn default() -> Self {
        RunpodConfig {
            api_key_file: None,
            api_url: default_runpod_api(),
            graphql_url: default_runpod_graphql(),
            controller_endpoint: None,
            image: default_runpod_image(),
            datacenter: None,
            disk_gb: default_runpod_disk(),
            volume_gb: default_runpod_volume(),
            agent_binary: None,
            artifacts: None,
            presign_secs: default_presign_secs(),
            enroll_timeout_secs: default_runpod_enroll(),
            max_running: default_max_running(),
            idle_timeout_secs: None,
            store_role_arn: None,
            store_profile: None,
            store_credentials_secs: default_store_credentials_secs(),
            sts_endpoint: None,
        }
    }
}

impl RunpodConfig {
    fn check(&self) -> Result<(), String> {
        for (key, url) in [
            ("api_url", &self.api_url),
            ("graphql_url", &self.graphql_url),
        ] {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(format!("[runpod] {key} {url:?} is not an http(s):// URL"));
            }
        }
        if let Some(endpoint) = &self.controller_endpoint {
            check_host_port("runpod", endpoint)?;
        }
        if self.store_role_arn.is_some() && self.store_profile.is_some() {
            return Err("[runpod] store_role_arn and store_profile both say where pods' store credentials come from; give one".into());
        }
        if let Some(arn) = &self.store_role_arn
            && !(arn.starts_with("arn:") && arn.contains(":role/"))
        {
            return Err(format!(
                "[runpod] store_role_arn {arn:?} is not a role ARN (e.g. \"arn:aws:iam::123456789012:role/runctl-pods\")"
            ));
        }
        if !(900..=43_200).contains(&self.store_credentials_secs) {
            return Err(format!(
                "[runpod] store_credentials_secs is {}; STS gives 900 to 43200 seconds",
                self.store_credentials_secs
            ));
        }
        if let Some(url) = &self.sts_endpoint
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(format!(
                "[runpod] sts_endpoint {url:?} is not an http(s):// URL"
            ));
        }
        if let Some(url) = &self.artifacts {
            storage::ObjectUrl::parse(url).map_err(|e| format!("[runpod] artifacts: {e}"))?;
        }
        if self.disk_gb == 0 {
            return Err("[runpod] disk_gb must be at least 1".into());
        }
        if self.volume_gb < 10 {
            return Err("[runpod] volume_gb must be at least 10 (RunPod's floor)".into());
        }
        if self.idle_timeout_secs == Some(0) {
            return Err("[runpod] idle_timeout_secs must be at least 1".into());
        }
        if !(60..=7 * 24 * 3600).contains(&self.presign_secs) {
            return Err("[runpod] presign_secs must be between 60 and 604800".into());
        }
        Ok(())
    }
}

/// Checks `[SECTION] controller_endpoint` is `host:port`.
fn check_host_port(section: &str, endpoint: &str) -> Result<(), String> {
    match endpoint.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err(format!(
            "[{section}] controller_endpoint {endpoint:?} is not host:port"
        )),
    }
}

/// `[agent]`: how every agent keeps its disk and what it lets the controller do beyond
/// runs (exec, shell, forward, copy), written into its config at launch (any provider;
/// `[local.agent]` overrides the disk keys for local instances). A change applies to
/// instances launched after it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Ended runs kept whole on an instance (trees, environments), newest first.
    #[serde(default = "default_keep_runs")]
    pub keep_runs: u32,
    /// The most runctl's files may take before ended runs go even within `keep_runs`:
    /// a size (`"40GiB"`) or a share of the disk (`"50%"`).
    #[serde(default = "default_disk_budget")]
    pub disk_budget: DiskSize,
    /// Free space a new run needs to start.
    #[serde(default = "default_min_free")]
    pub min_free: DiskSize,
    /// An ended run's checkpoints kept on the instance once they are in the store.
    #[serde(default = "default_keep_local_checkpoints")]
    pub keep_local_checkpoints: u32,
    /// `exec` and `shell` on the instance.
    #[serde(default = "yes")]
    pub allow_shell: bool,
    /// Port forwarding to the instance.
    #[serde(default = "yes")]
    pub allow_forward: bool,
    /// Hosts a forward may reach besides the instance's loopback (`"*"`: any).
    #[serde(default)]
    pub forward_hosts: Vec<String>,
    /// Absolute paths `cp` may reach on the instance (default: the agent's state
    /// directory and its home).
    #[serde(default)]
    pub copy_roots: Vec<PathBuf>,
}

fn yes() -> bool {
    true
}

fn default_keep_runs() -> u32 {
    protocol::agent_config::DEFAULT_KEEP_RUNS
}
fn default_disk_budget() -> DiskSize {
    protocol::agent_config::DEFAULT_DISK_BUDGET
}
fn default_min_free() -> DiskSize {
    protocol::agent_config::DEFAULT_MIN_FREE
}
fn default_keep_local_checkpoints() -> u32 {
    protocol::agent_config::DEFAULT_KEEP_LOCAL_CHECKPOINTS
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            keep_runs: default_keep_runs(),
            disk_budget: default_disk_budget(),
            min_free: default_min_free(),
            keep_local_checkpoints: default_keep_local_checkpoints(),
            allow_shell: true,
            allow_forward: true,
            forward_hosts: Vec::new(),
            copy_roots: Vec::new(),
        }
    }
}

impl AgentSettings {
    /// `[agent]` with `[local.agent]`'s keys over it, for a local instance.
    pub fn for_local(&self, local: &LocalAgentConfig) -> AgentSettings {
        AgentSettings {
            keep_runs: local.keep_runs.unwrap_or(self.keep_runs),
            disk_budget: local.disk_budget.unwrap_or(self.disk_budget),
            min_free: local.min_free.unwrap_or(self.min_free),
            keep_local_checkpoints: local
                .keep_local_checkpoints
                .unwrap_or(self.keep_local_checkpoints),
            ..self.clone()
        }
    }

    fn check(&self) -> Result<(), String> {
        if let Some(root) = self.copy_roots.iter().find(|r| !r.is_absolute()) {
            return Err(format!(
                "[agent] copy_roots: {} is not an absolute path (e.g. \"/data\")",
                root.display()
            ));
        }
        if let Some(host) = self
            .forward_hosts
            .iter()
            .find(|h| h.is_empty() || h.contains(char::is_whitespace))
        {
            return Err(format!(
                "[agent] forward_hosts: {host:?} is not a host name or address (e.g. \"10.0.0.5\", or \"*\" for any)"
            ));
        }
        Ok(())
    }

    /// Writes these settings into an agent's config.
    pub fn write_into(&self, file: &mut protocol::agent_config::AgentConfigFile) {
        file.keep_runs = Some(self.keep_runs);
        file.disk_budget = Some(self.disk_budget);
        file.min_free = Some(self.min_free);
        file.keep_local_checkpoints = Some(self.keep_local_checkpoints);
        file.access = protocol::agent_config::Access {
            allow_shell: self.allow_shell,
            allow_forward: self.allow_forward,
            forward_hosts: self.forward_hosts.clone(),
            copy_roots: self.copy_roots.clone(),
        };
    }
}

/// `[relay]`: what `relay launch` stands up (EC2's region, credentials, subnet and
/// artifacts bucket come from `[ec2]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The static `runctl-relay` to install (default: the one beside this executable;
    /// `scripts/build-static-agent.sh --relay` builds it).
    pub binary: Option<PathBuf>,
    /// The instance type (default: t3.nano, the smallest x86_64 type).
    #[serde(default = "default_relay_type")]
    pub instance_type: String,
    /// The port agents and the daemon reach it on, UDP and TCP (default 443: the port
    /// networks that block everything else still let through).
    #[serde(default = "default_relay_port")]
    pub port: u16,
    /// The AMI (default: the newest Amazon Linux 2023 for x86_64).
    pub ami: Option<String>,
}

fn default_relay_type() -> String {
    crate::provider::ec2::relay::DEFAULT_TYPE.into()
}
fn default_relay_port() -> u16 {
    443
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            binary: None,
            instance_type: default_relay_type(),
            port: default_relay_port(),
            ami: None,
        }
    }
}

impl RelayConfig {
    fn check(&self) -> Result<(), String> {
        crate::provider::ec2::ids::check_instance_type(&self.instance_type)
            .map_err(|e| format!("[relay] instance_type: {e}"))?;
        if self.port == 0 {
            return Err("[relay] port must be 1 to 65535".into());
        }
        if let Some(ami) = &self.ami {
            crate::provider::ec2::ids::check_id(ami, "ami")
                .map_err(|e| format!("[relay] ami: {e}"))?;
        }
        Ok(())
    }
}

/// `[ec2]`: how instances are launched on EC2. Only `controller_endpoint` is needed to
/// launch; everything else has a default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Config {
    /// The region (default: the AWS configuration's, e.g. AWS_REGION).
    pub region: Option<String>,
    /// A named profile from the AWS config files (default: AWS_PROFILE or the default).
    pub profile: Option<String>,
    /// An EC2-compatible endpoint instead of AWS's own (an emulator in tests).
    pub endpoint_url: Option<String>,
    /// What agents dial, `host:port`, reachable from the instance (a public address, a
    /// forwarded port, a VPN address). Its port is `[daemon] listen`'s.
    pub controller_endpoint: Option<String>,
    /// Where the agent binary is uploaded for instances to fetch, `s3://bucket/prefix`
    /// (default: the bucket of `[storage] checkpoints`, under `runctl/`).
    pub artifacts: Option<String>,
    /// The static agent binary to install (default: `runctl-agent` beside this executable;
    /// build it with scripts/build-static-agent.sh).
    pub agent_binary: Option<PathBuf>,
    /// The AMI for every launch (default: the newest AMI matching `ami_name`).
    pub ami: Option<String>,
    /// The name pattern (DescribeImages wildcards) the AMI is chosen by.
    #[serde(default = "default_ami_name")]
    pub ami_name: String,
    /// Who owns that AMI (`amazon`, an account id).
    #[serde(default = "default_ami_owner")]
    pub ami_owner: String,
    /// An IAM instance profile (name or ARN) giving the agent access to the bucket.
    pub instance_profile: Option<String>,
    /// The subnet to launch in (default: the default VPC's choice).
    pub subnet: Option<String>,
    /// The root volume's size in GiB.
    #[serde(default = "default_root_gb")]
    pub root_volume_gb: u32,
    /// At most this many runctl instances running (or starting) at once.
    #[serde(default = "default_max_running")]
    pub max_running: u32,
    /// How long the agent's download URL stays valid, in seconds.
    #[serde(default = "default_presign_secs")]
    pub presign_secs: u64,
    /// How long a launch waits for the agent to enroll, in seconds.
    #[serde(default = "default_enroll_timeout")]
    pub enroll_timeout_secs: u64,
    /// Power an instance off (which terminates it) after this many seconds with no active
    /// run and no connection to this daemon (default: never).
    pub idle_timeout_secs: Option<u64>,
    /// On-demand $/hour by instance type, overriding (or adding to) the built-in table.
    #[serde(default)]
    pub prices: std::collections::BTreeMap<String, f64>,
    /// The instance metadata endpoint agents poll for spot notices (default EC2's,
    /// `http://169.254.169.254`; `http://[fd00:ec2::254]` on IPv6-only subnets).
    pub metadata_endpoint: Option<String>,
}

fn default_ami_name() -> String {
    "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *".into()
}
fn default_ami_owner() -> String {
    "amazon".into()
}
fn default_root_gb() -> u32 {
    200
}
fn default_max_running() -> u32 {
    4
}
fn default_presign_secs() -> u64 {
    3600
}
fn default_enroll_timeout() -> u64 {
    900
}

impl Default for Ec2Config {
    fn default() -> Self {
        toml::from_str("").expect("every [ec2] key has a default")
    }
}

impl Ec2Config {
    fn check(&self) -> Result<(), String> {
        if let Some(region) = &self.region {
            crate::provider::ec2::ids::check_region(region)
                .map_err(|e| format!("[ec2] region: {e}"))?;
        }
        if let Some(ami) = &self.ami {
            crate::provider::ec2::ids::check_id(ami, "ami")
                .map_err(|e| format!("[ec2] ami: {e}"))?;
        }
        if let Some(subnet) = &self.subnet {
            crate::provider::ec2::ids::check_id(subnet, "subnet")
                .map_err(|e| format!("[ec2] subnet: {e}"))?;
        }
        if let Some(url) = &self.artifacts {
            storage::ObjectUrl::parse(url).map_err(|e| format!("[ec2] artifacts: {e}"))?;
        }
        if let Some(endpoint) = &self.controller_endpoint {
            check_host_port("ec2", endpoint)?;
        }
        if !(8..=16384).contains(&self.root_volume_gb) {
            return Err("[ec2] root_volume_gb must be between 8 and 16384".into());
        }
        if self.idle_timeout_secs == Some(0) {
            return Err("[ec2] idle_timeout_secs must be at least 1".into());
        }
        if !(60..=7 * 24 * 3600).contains(&self.presign_secs) {
            return Err("[ec2] presign_secs must be between 60 and 604800".into());
        }
        if let Some((kind, price)) = self
            .prices
            .iter()
            .find(|(_, p)| !(p.is_finite() && **p > 0.0))
        {
            return Err(format!(
                "[ec2.prices] {kind} = {price} is not a positive price"
            ));
        }
        Ok(())
    }
}

/// `[storage]`: the object store runs pull data from and push checkpoints to, and that
/// `s3` and `checkpoint` commands use.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `local` (the default: buckets are directories under `root`) or `s3`.
    #[serde(default)]
    pub backend: Backend,
    /// For `local`: where the buckets are (default: `store/` in the controller's home).
    pub root: Option<PathBuf>,
    /// For `s3`: the region (default: the AWS configuration's).
    pub region: Option<String>,
    /// For `s3`: an S3-compatible server, e.g. `http://127.0.0.1:8333`.
    pub endpoint_url: Option<String>,
    /// For `s3`: address buckets as `endpoint/bucket` (most S3-compatible servers).
    #[serde(default)]
    pub force_path_style: bool,
    /// For `s3`: a named profile from the AWS config files.
    pub profile: Option<String>,
    /// Where runs push checkpoints, `s3://bucket/prefix` (each run under `<prefix>/<run>/`).
    /// Default for `local`: `s3://runctl/checkpoints`; for `s3`, none (no push).
    pub checkpoints: Option<String>,
    /// Keep this many complete checkpoints per run (0, the default, keeps all).
    #[serde(default)]
    pub keep_checkpoints: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    #[default]
    Local,
    S3,
}

/// The bucket and prefix checkpoints go to with the local backend by default.
const LOCAL_CHECKPOINTS: &str = "s3://runctl/checkpoints";

impl StorageConfig {
    /// How agents and this CLI reach the store; `home` roots the local default.
    pub fn spec(&self, home: &Path) -> protocol::StoreSpec {
        match self.backend {
            Backend::Local => protocol::StoreSpec::Local {
                root: self
                    .root
                    .clone()
                    .unwrap_or_else(|| home.join("store"))
                    .display()
                    .to_string(),
            },
            Backend::S3 => protocol::StoreSpec::S3 {
                region: self.region.clone(),
                endpoint_url: self.endpoint_url.clone(),
                force_path_style: self.force_path_style,
                profile: self.profile.clone(),
            },
        }
    }

    /// The same, for this process's own transfers.
    pub fn store_config(&self, home: &Path) -> storage::StoreConfig {
        (&self.spec(home)).into()
    }

    /// Where checkpoints go by default, if anywhere.
    pub fn checkpoints(&self) -> Option<String> {
        match (&self.checkpoints, self.backend) {
            (Some(url), _) => Some(url.clone()),
            (None, Backend::Local) => Some(LOCAL_CHECKPOINTS.to_owned()),
            (None, Backend::S3) => None,
        }
    }

    fn check(&self) -> Result<(), String> {
        if let Some(url) = &self.checkpoints {
            storage::ObjectUrl::parse(url).map_err(|e| format!("[storage] checkpoints: {e}"))?;
        }
        let s3_only = [
            ("region", self.region.is_some()),
            ("endpoint_url", self.endpoint_url.is_some()),
            ("force_path_style", self.force_path_style),
            ("profile", self.profile.is_some()),
        ];
        match self.backend {
            Backend::Local => {
                if let Some((key, _)) = s3_only.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "[storage] {key} applies to backend = \"s3\" but the backend is \"local\""
                    ));
                }
            }
            Backend::S3 => {
                if self.root.is_some() {
                    return Err(
                        "[storage] root applies to backend = \"local\" but the backend is \"s3\""
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// The QUIC endpoint agents dial. Port 0 picks a free port on first start and keeps it
    /// across restarts, so running agents can always find the daemon again.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// A `runctl-relay` (`host:port`) the daemon registers with, so agents can reach it
    /// from anywhere while it listens on loopback or sits behind NAT.
    pub relay: Option<String>,
    /// How long an enrollment token stays valid, in seconds.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// How long a stopped run gets between SIGTERM and SIGKILL, in seconds.
    #[serde(default = "default_stop_grace")]
    pub stop_grace_secs: u64,
    /// How often the daemon asks the provider whether the instance of a spot run under
    /// `--on-interrupt relaunch` that is out of touch is gone, in seconds (and once when
    /// it starts).
    #[serde(default = "default_watch_secs")]
    pub watch_secs: u64,
    /// How long an agent's certificate is valid, in seconds (default 90 days); an agent
    /// renews it over its session once two thirds of that are gone.
    #[serde(default = "default_agent_cert_secs")]
    pub agent_cert_secs: u64,
    /// How many days an ended run keeps its whole output in the database; after that its
    /// log is compacted to its last lines and every event that is not output (see
    /// `retention`). 0 keeps every line for ever.
    #[serde(default = "default_keep_logs_days")]
    pub keep_logs_days: u32,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalAgentConfig {
    pub stats_interval_ms: Option<u64>,
    pub nvidia_smi: Option<PathBuf>,
    pub idle_timeout_secs: Option<u64>,
    pub poweroff_command: Option<Vec<String>>,
    /// An instance metadata endpoint (a local double, to rehearse spot notices).
    pub metadata_endpoint: Option<String>,
    pub log_max_bytes: Option<u64>,
    /// Overrides of `[agent]` for local instances.
    pub keep_runs: Option<u32>,
    pub disk_budget: Option<DiskSize>,
    pub min_free: Option<DiskSize>,
    pub keep_local_checkpoints: Option<u32>,
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
fn default_watch_secs() -> u64 {
    30
}
fn default_agent_cert_secs() -> u64 {
    90 * 86_400
}
fn default_keep_logs_days() -> u32 {
    30
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: default_listen(),
            relay: None,
            token_ttl_secs: default_token_ttl(),
            stop_grace_secs: default_stop_grace(),
            watch_secs: default_watch_secs(),
            agent_cert_secs: default_agent_cert_secs(),
            keep_logs_days: default_keep_logs_days(),
        }
    }
}

impl DaemonConfig {
    fn check(&self) -> Result<(), String> {
        if self.agent_cert_secs < 10 {
            return Err("[daemon] agent_cert_secs must be at least 10".into());
        }
        if let Some(relay) = &self.relay {
            match relay.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
                _ => {
                    return Err(format!(
                        "[daemon] relay {relay:?} is not host:port (e.g. \"relay.example.com:443\")"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn token_ttl(&self) -> Duration {
        Duration::from_secs(self.token_ttl_secs)
    }
    pub fn stop_grace(&self) -> Duration {
        Duration::from_secs(self.stop_grace_secs)
    }
    pub fn watch(&self) -> Duration {
        Duration::from_secs(self.watch_secs.max(1))
    }
    pub fn agent_cert_lifetime(&self) -> Duration {
        Duration::from_secs(self.agent_cert_secs)
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
                "fix the file (see the README's configuration section), or remove it to use the defaults",
            )
        })
    }

    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if config.daemon.token_ttl_secs == 0 {
            return Err("[daemon] token_ttl_secs must be at least 1".into());
        }
        config.daemon.check()?;
        config.storage.check()?;
        config.ec2.check()?;
        config.relay.check()?;
        config.runpod.check()?;
        config.agent.check()?;
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
            "[daemon]\nrelay = \"relay.example.com:443\"\n",
            Ok("127.0.0.1:0"),
        );
        check(
            "[daemon]\nrelay = \"relay.example.com\"\n",
            Err("is not host:port"),
        );
        check(
            "[daemon]\nlisten = \"nowhere\"\n",
            Err("invalid socket address"),
        );
        check(
            "[daemon]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n",
            Err("unknown field `bogus`"),
        );
        check("[daemon\n", Err("line 1"));
        check("[relay]\nport = 0\n", Err("[relay] port"));
        check(
            "[agent]\nallow_shell = false\nforward_hosts = [\"10.0.0.5\"]\ncopy_roots = [\"/data\"]\n",
            Ok("127.0.0.1:0"),
        );
        check(
            "[agent]\ncopy_roots = [\"data\"]\n",
            Err("[agent] copy_roots"),
        );
        check(
            "[agent]\nforward_hosts = [\"\"]\n",
            Err("[agent] forward_hosts"),
        );
        check(
            "[agent]\nallow_shel = false\n",
            Err("unknown field `allow_shel`"),
        );
        check(
            "[relay]\ninstance_type = \"t3 nano\"\n",
            Err("[relay] instance_type"),
        );
        check("[relay]\nami = \"ami-zz\"\n", Err("[relay] ami"));
        check(
            "[relay]\ninstance_type = \"t3a.nano\"\nport = 4433\n",
            Ok("127.0.0.1:0"),
        );
        check("[daemon]\ntoken_ttl_secs = 0\n", Err("at least 1"));
        check(
            "[storage]\nbackend = \"s3\"\nendpoint_url = \"http://127.0.0.1:8333\"\nforce_path_style = true\ncheckpoints = \"s3://ckpt/runs\"\n",
            Ok("127.0.0.1:0"),
        );
        check("[storage]\nbackend = \"gcs\"\n", Err("unknown variant"));
        check("[storage]\ncheckpoints = \"ckpt/runs\"\n", Err("s3://"));
        check(
            "[storage]\nendpoint_url = \"http://x\"\n",
            Err("applies to backend = \"s3\""),
        );
        check(
            "[storage]\nbackend = \"s3\"\nroot = \"/x\"\n",
            Err("applies to backend = \"local\""),
        );
        check(
            "[ec2]\nregion = \"us-east-1\"\ncontroller_endpoint = \"gpu.example.com:7443\"\nartifacts = \"s3://my-bucket/runctl\"\n[ec2.prices]\n\"g5.xlarge\" = 1.0\n",
            Ok("127.0.0.1:0"),
        );
        check("[ec2]\nregion = \"Mars\"\n", Err("not an AWS region"));
        check("[ec2]\nami = \"ami-xyz\"\n", Err("not a valid ami- id"));
        check(
            "[ec2]\ncontroller_endpoint = \"example.com\"\n",
            Err("not host:port"),
        );
        check(
            "[ec2.prices]\n\"g5.xlarge\" = -1\n",
            Err("not a positive price"),
        );
    }
}
