//! `doctor`: checks the set-up one thing at a time with harmless calls, and says for
//! each what was found and, when it is wrong, what to do. The verdict over the checks is
//! the pure `exit_code`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use storage::ObjectStore;

use crate::config::{Backend, Config};
use crate::error::UserError;
use crate::home::Home;
use crate::ipc::{Client, Request, Response};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// Works, but something will bite later.
    Warn,
    /// Needed and missing.
    Fail,
    /// Not configured, or not checkable because something before it failed.
    Skipped,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    /// What to do, when it is not ok.
    pub fix: Vec<String>,
}

impl Check {
    fn ok(name: &str, detail: impl Into<String>) -> Self {
        Check::new(name, Status::Ok, detail, Vec::new())
    }

    fn new(name: &str, status: Status, detail: impl Into<String>, fix: Vec<String>) -> Self {
        Check {
            name: name.to_owned(),
            status,
            detail: detail.into(),
            fix,
        }
    }

    fn failed(name: &str, error: UserError) -> Self {
        Check::new(name, Status::Fail, error.message, error.to_resolve)
    }

    fn warn(name: &str, detail: impl Into<String>, fix: &str) -> Self {
        Check::new(name, Status::Warn, detail, vec![fix.to_owned()])
    }
}

/// The exit status for a set of checks: 1 when any failed.
pub fn exit_code(checks: &[Check]) -> u8 {
    u8::from(checks.iter().any(|c| c.status == Status::Fail))
}

/// How far this machine's clock may be from the cloud's: AWS refuses requests signed more
/// than 5 minutes off; a few seconds matter for token and certificate lifetimes.
pub fn clock_status(skew_secs: i64) -> Status {
    match skew_secs.unsigned_abs() {
        0..=30 => Status::Ok,
        31..=299 => Status::Warn,
        _ => Status::Fail,
    }
}

/// Every check, in order.
pub async fn run(home: &Home) -> Vec<Check> {
    let mut checks = Vec::new();
    let path = home.config();
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let config = match Config::load(&path) {
        Ok(config) => {
            let detail = if path.exists() {
                format!("{} is valid", path.display())
            } else {
                format!("{} does not exist: the defaults apply", path.display())
            };
            checks.push(Check::ok("config", detail));
            config
        }
        Err(e) => {
            checks.push(Check::failed("config", e));
            checks.push(Check::new(
                "the rest",
                Status::Skipped,
                "not checked: the config file is invalid",
                Vec::new(),
            ));
            return checks;
        }
    };
    let doc = text.parse::<toml_edit::DocumentMut>().ok();
    let has_table = |name: &str| doc.as_ref().is_some_and(|doc| doc.contains_key(name));
    let status = daemon(home, &mut checks).await;
    checks.push(store(home, &config).await);
    checks.push(local(&config));
    if has_table("ec2") {
        ec2(&config, status.as_ref(), &mut checks).await;
    } else {
        checks.push(Check::new(
            "ec2",
            Status::Skipped,
            "not configured",
            vec!["to use EC2, set [ec2] region (and instance_profile, controller_endpoint or [daemon] relay) in config.toml".into()],
        ));
    }
    let runpod_key = std::env::var("RUNPOD_API_KEY").ok();
    if has_table("runpod") || runpod_key.is_some() {
        runpod(&config, runpod_key, status.as_ref(), &mut checks).await;
    } else {
        checks.push(Check::new(
            "runpod",
            Status::Skipped,
            "not configured",
            vec!["to use RunPod, export RUNPOD_API_KEY (or set [runpod] api_key_file)".into()],
        ));
    }
    checks
}

/// The daemon, if running: its status. Not running is fine: it starts on demand.
async fn daemon(home: &Home, checks: &mut Vec<Check>) -> Option<crate::ipc::StatusReport> {
    let mut client = match Client::connect_existing(home).await {
        Ok(Some(client)) => client,
        Ok(None) => {
            checks.push(Check::ok(
                "daemon",
                "not running; the first command that needs it starts it",
            ));
            return None;
        }
        Err(e) => {
            checks.push(Check::failed("daemon", e));
            return None;
        }
    };
    let answer = match client.send(&Request::Status).await {
        Ok(()) => client.next().await,
        Err(e) => Err(e),
    };
    let status = match answer {
        Ok(Some(Response::Status(status))) => status,
        Ok(other) => {
            checks.push(Check::new(
                "daemon",
                Status::Fail,
                format!("answered status with {other:?}"),
                vec!["restart it: runctl-controller shutdown".into()],
            ));
            return None;
        }
        Err(e) => {
            checks.push(Check::failed("daemon", e));
            return None;
        }
    };
    checks.push(Check::ok(
        "daemon",
        format!(
            "running (pid {}, {}), agents dial {}; {} connected",
            status.pid, status.version, status.quic_addr, status.agents_connected
        ),
    ));
    if let Some(relay) = &status.relay {
        checks.push(match (relay.registered, &relay.last_error) {
            (true, _) => Check::ok("relay", format!("registered with {}", relay.relay)),
            (false, error) => Check::new(
                "relay",
                Status::Fail,
                format!(
                    "not registered with {}: {}",
                    relay.relay,
                    error.as_deref().unwrap_or("no attempt yet")
                ),
                vec![
                    "check [daemon] relay and that the relay runs (runctl-controller relay status)"
                        .into(),
                ],
            ),
        });
    }
    Some(status)
}

/// The store: credentials, the checkpoint bucket, and a probe object written and deleted.
async fn store(home: &Home, config: &Config) -> Check {
    const NAME: &str = "store";
    let where_ = match config.storage.backend {
        Backend::Local => format!(
            "local ({})",
            config
                .storage
                .root
                .clone()
                .unwrap_or_else(|| home.root().join("store"))
                .display()
        ),
        Backend::S3 => format!(
            "s3{}",
            config
                .storage
                .endpoint_url
                .as_deref()
                .map(|e| format!(" at {e}"))
                .unwrap_or_default()
        ),
    };
    let Some(checkpoints) = config.storage.checkpoints() else {
        return Check::warn(
            NAME,
            format!("{where_}: no checkpoint bucket, so runs push no checkpoints"),
            "set checkpoints = \"s3://BUCKET/PREFIX\" under [storage] in config.toml",
        );
    };
    let url = match storage::ObjectUrl::parse(&checkpoints) {
        Ok(url) => url,
        Err(e) => return Check::failed(NAME, crate::objects::store_error(e)),
    };
    let probe = async {
        let conn = storage::connect(&config.storage.store_config(home.root())).await?;
        let bucket = conn.bucket(&url.bucket)?;
        let key = format!(
            "{}.runctl-doctor-{:016x}",
            url.key.trim_start_matches('/'),
            rand::random::<u64>()
        );
        bucket
            .put(&key, bytes::Bytes::from_static(b"runctl doctor"))
            .await?;
        let seen = bucket.head(&key).await?.is_some();
        bucket.delete(&key).await?;
        Ok::<_, storage::StoreError>(seen)
    };
    match tokio::time::timeout(Duration::from_secs(30), probe).await {
        Ok(Ok(true)) => Check::ok(
            NAME,
            format!(
                "{where_}, bucket {}: wrote, read and deleted a probe object",
                url.bucket
            ),
        ),
        Ok(Ok(false)) => Check::new(
            NAME,
            Status::Fail,
            format!(
                "{where_}, bucket {}: a probe object written was not there",
                url.bucket
            ),
            vec!["check the store's consistency settings".into()],
        ),
        Ok(Err(e)) => Check::failed(NAME, crate::objects::store_error(e)),
        Err(_) => Check::new(
            NAME,
            Status::Fail,
            format!("{where_}: no answer within 30 s"),
            vec!["check [storage] endpoint_url and the network".into()],
        ),
    }
}

/// The local provider: the agent binary it starts, and that it runs.
fn local(config: &Config) -> Check {
    const NAME: &str = "local";
    let path = match crate::provider::local::agent_binary(&config.local) {
        Ok(path) => path,
        Err(e) => return Check::failed(NAME, e),
    };
    match std::process::Command::new(&path).arg("--version").output() {
        Ok(out) if out.status.success() => Check::ok(
            NAME,
            format!(
                "agent {} ({})",
                path.display(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        ),
        Ok(out) => Check::new(
            NAME,
            Status::Fail,
            format!("{} --version exited with {}", path.display(), out.status),
            vec!["rebuild it: cargo build --bins".into()],
        ),
        Err(e) => Check::new(
            NAME,
            Status::Fail,
            format!("cannot run {}: {e}", path.display()),
            vec!["rebuild it: cargo build --bins".into()],
        ),
    }
}

/// Captures the `Date` header of an AWS answer, to compare clocks.
#[derive(Debug, Clone, Default)]
struct ServerDate(Arc<Mutex<Option<(String, SystemTime)>>>);

impl aws_smithy_runtime_api::client::interceptors::Intercept for ServerDate {
    fn name(&self) -> &'static str {
        "ServerDate"
    }

    fn read_before_deserialization(
        &self,
        context: &aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextRef<'_>,
        _: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        _: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        if let Some(date) = context.response().headers().get("date") {
            *self.0.lock().expect("date lock") = Some((date.to_owned(), SystemTime::now()));
        }
        Ok(())
    }
}

/// `(code, message)` of an AWS SDK failure, for people.
fn sdk_failure<E, R>(err: &aws_sdk_sts::error::SdkError<E, R>) -> (String, String)
where
    E: aws_sdk_sts::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_sts::error::ProvideErrorMetadata;
    let code = err.code().unwrap_or_default().to_owned();
    let message = err
        .message()
        .map(str::to_owned)
        .unwrap_or_else(|| aws_sdk_sts::error::DisplayErrorContext(err).to_string());
    (code, message)
}

/// GPU instance quotas on EC2 (vCPUs), by Service Quotas code.
const GPU_QUOTAS: [(&str, &str); 3] = [
    ("L-DB2E81BA", "on-demand G and VT"),
    ("L-417A185B", "on-demand P"),
    ("L-3819A6DF", "spot G and VT"),
];

async fn ec2(config: &Config, status: Option<&crate::ipc::StatusReport>, checks: &mut Vec<Check>) {
    let cfg = &config.ec2;
    let sdk = match storage::aws_sdk_config(
        cfg.region.as_deref(),
        cfg.endpoint_url.as_deref(),
        cfg.profile.as_deref(),
        storage::dns::Dns::System,
    )
    .await
    {
        Ok(sdk) => sdk,
        Err(e) => {
            checks.push(Check::failed("ec2", crate::objects::store_error(e)));
            return;
        }
    };
    let region = sdk.region().map(|r| r.to_string()).unwrap_or_default();
    let date = ServerDate::default();
    let who = aws_sdk_sts::Client::new(&sdk)
        .get_caller_identity()
        .customize()
        .interceptor(date.clone())
        .send()
        .await;
    match who {
        Ok(who) => checks.push(Check::ok(
            "ec2 credentials",
            format!(
                "account {} as {}, region {region}",
                who.account().unwrap_or("?"),
                who.arn().unwrap_or("?")
            ),
        )),
        Err(e) => {
            let (code, message) = sdk_failure(&e);
            checks.push(Check::new(
                "ec2 credentials",
                Status::Fail,
                format!("STS GetCallerIdentity: {message}{}", if code.is_empty() { String::new() } else { format!(" ({code})") }),
                vec!["check the AWS credentials: AWS_PROFILE or [ec2] profile, aws sso login, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into()],
            ));
            checks.push(Check::new(
                "ec2 (the rest)",
                Status::Skipped,
                "not checked without credentials",
                Vec::new(),
            ));
            return;
        }
    }
    let seen = date.0.lock().expect("date lock").clone();
    if let Some((header, at)) = seen
        && let Ok(server) = httpdate::parse_http_date(&header)
    {
        let skew = match server.duration_since(at) {
            Ok(ahead) => ahead.as_secs() as i64,
            Err(behind) => -(behind.duration().as_secs() as i64),
        };
        let status = clock_status(skew);
        let detail = format!("this machine's clock is {skew:+} s from AWS's ({header})");
        checks.push(match status {
            Status::Ok => Check::ok("clock", detail),
            _ => Check::new(
                "clock",
                status,
                detail,
                vec!["turn on time sync (timedatectl set-ntp true, or the OS's date and time settings)".into()],
            ),
        });
    }

    match &cfg.instance_profile {
        None => checks.push(Check::warn(
            "ec2 instance profile",
            "[ec2] instance_profile is not set: instances have no credentials of their own for the bucket",
            "create one with access to the bucket and set instance_profile = \"NAME\" under [ec2] (see the README's EC2 section)",
        )),
        Some(profile) => {
            let name = profile.rsplit('/').next().unwrap_or(profile);
            let got = aws_sdk_iam::Client::new(&sdk)
                .get_instance_profile()
                .instance_profile_name(name)
                .send()
                .await;
            checks.push(match got {
                Ok(out) => {
                    let roles: Vec<&str> = out
                        .instance_profile()
                        .map(|p| p.roles().iter().map(|r| r.role_name()).collect())
                        .unwrap_or_default();
                    if roles.is_empty() {
                        Check::new(
                            "ec2 instance profile",
                            Status::Fail,
                            format!("{name} exists but has no role, so instances get no credentials"),
                            vec![format!("aws iam add-role-to-instance-profile --instance-profile-name {name} --role-name ROLE")],
                        )
                    } else {
                        Check::ok("ec2 instance profile", format!("{name} (role {})", roles.join(", ")))
                    }
                }
                Err(e) => {
                    let (code, message) = sdk_failure(&e);
                    let fix = if code == "NoSuchEntity" {
                        vec![
                            format!("aws iam create-instance-profile --instance-profile-name {name}"),
                            format!("aws iam add-role-to-instance-profile --instance-profile-name {name} --role-name ROLE (a role EC2 may assume, allowed the bucket)"),
                            "or name an existing one: runctl-controller config set ec2.instance_profile NAME".into(),
                        ]
                    } else {
                        vec!["the credentials need iam:GetInstanceProfile to check it (a launch still works without)".into()]
                    };
                    Check::new(
                        "ec2 instance profile",
                        if code == "NoSuchEntity" { Status::Fail } else { Status::Warn },
                        format!("{name}: {message} ({code})"),
                        fix,
                    )
                }
            });
        }
    }

    let quotas = aws_sdk_servicequotas::Client::new(&sdk);
    let mut read = Vec::new();
    for (code, what) in GPU_QUOTAS {
        let answer = quotas
            .get_service_quota()
            .service_code("ec2")
            .quota_code(code)
            .send()
            .await;
        let value = answer
            .map(|out| out.quota().and_then(|q| q.value()).unwrap_or(0.0))
            .map_err(|e| sdk_failure(&e).1);
        read.push((code, what, value));
    }
    checks.push(gpu_quota(&read, &region));

    checks.push(match crate::provider::ec2::launch::agent_binary(config) {
        Ok(path) => Check::ok(
            "ec2 agent",
            format!("{} is a static x86_64 executable", path.display()),
        ),
        Err(e) => Check::failed("ec2 agent", e),
    });
    if let Err(e) = crate::provider::artifact::location(config) {
        checks.push(Check::failed("ec2 artifacts", e));
    }
    checks.push(reach(
        "ec2",
        cfg.controller_endpoint.as_deref(),
        config,
        status,
    ));
}

/// What Service Quotas answered for one quota: its code, what it covers, its value.
type QuotaRead<'a> = (&'a str, &'a str, Result<f64, String>);

/// The GPU quota check from what Service Quotas answered for each of `GPU_QUOTAS`.
fn gpu_quota(read: &[QuotaRead], region: &str) -> Check {
    const NAME: &str = "ec2 gpu quota";
    let found: Vec<String> = read
        .iter()
        .filter_map(|(_, what, v)| v.as_ref().ok().map(|v| format!("{what} {v} vCPUs")))
        .collect();
    let zero: Vec<String> = read
        .iter()
        .filter(|(_, _, v)| v.as_ref().is_ok_and(|v| *v < 1.0))
        .map(|(code, what, _)| format!("{what} ({code})"))
        .collect();
    if found.is_empty() {
        let why = read
            .iter()
            .find_map(|(_, _, v)| v.as_ref().err().cloned())
            .unwrap_or_else(|| "nothing asked".into());
        return Check::warn(
            NAME,
            format!("could not be read: {why}"),
            "see it in the Service Quotas console (Amazon EC2, Running On-Demand G and VT instances); the credentials need servicequotas:GetServiceQuota",
        );
    }
    if zero.is_empty() {
        return Check::ok(NAME, found.join(", "));
    }
    Check::new(
        NAME,
        Status::Warn,
        format!(
            "{}: GPU launches of those kinds are refused (VcpuLimitExceeded)",
            found.join(", ")
        ),
        vec![format!(
            "request an increase in the Service Quotas console (Amazon EC2, region {region}) for {}; new accounts start at 0",
            zero.join(", ")
        )],
    )
}

async fn runpod(
    config: &Config,
    key: Option<String>,
    status: Option<&crate::ipc::StatusReport>,
    checks: &mut Vec<Check>,
) {
    let api = match crate::provider::runpod::launch::client(config, key) {
        Ok(api) => api,
        Err(e) => {
            checks.push(Check::failed("runpod", e));
            return;
        }
    };
    checks.push(match api.gpu_types().await {
        Ok(types) => Check::ok(
            "runpod api",
            format!("the key works; {} GPU types offered", types.len()),
        ),
        Err(e) => Check::failed("runpod api", e),
    });
    checks.push(
        match crate::provider::runpod::launch::agent_binary(config) {
            Ok(path) => Check::ok(
                "runpod agent",
                format!("{} is a static x86_64 executable", path.display()),
            ),
            Err(e) => Check::failed("runpod agent", e),
        },
    );
    checks.push(reach(
        "runpod",
        config.runpod.controller_endpoint.as_deref(),
        config,
        status,
    ));
}

/// How that provider's agents would reach this daemon (`plan::remote_reach`).
fn reach(
    section: &str,
    endpoint: Option<&str>,
    config: &Config,
    status: Option<&crate::ipc::StatusReport>,
) -> Check {
    let name = format!("{section} reach");
    let relay = config.daemon.relay.as_deref();
    match crate::plan::remote_reach(section, endpoint, relay, config.daemon.listen) {
        Ok(reach) => {
            let mut ways = Vec::new();
            if let Some(direct) = &reach.direct {
                ways.push(format!("directly at {direct} (UDP, else TCP)"));
            }
            if let Some(relay) = &reach.relay {
                let registered = status
                    .and_then(|s| s.relay.as_ref())
                    .map(|r| {
                        if r.registered {
                            ", registered"
                        } else {
                            ", not registered now"
                        }
                    })
                    .unwrap_or("");
                ways.push(format!("through the relay {relay}{registered}"));
            }
            Check::ok(&name, format!("agents dial {}", ways.join(", and ")))
        }
        Err(e) => Check::failed(&name, e),
    }
}

/// The checks for people: one line each, the fixes under failures and warnings.
pub fn text(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for check in checks {
        let word = match check.status {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skipped => "skip",
        };
        out.push_str(&format!(
            "{word:4}  {:width$}  {}\n",
            check.name, check.detail
        ));
        for fix in &check.fix {
            out.push_str(&format!("{:4}  {:width$}  - {fix}\n", "", ""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check() {
        let c = |status| Check::new("x", status, "", Vec::new());
        let cases = [
            (vec![], 0),
            (vec![c(Status::Ok), c(Status::Skipped)], 0),
            (vec![c(Status::Ok), c(Status::Warn)], 0),
            (vec![c(Status::Ok), c(Status::Fail), c(Status::Warn)], 1),
        ];
        for (checks, want) in cases {
            assert_eq!(exit_code(&checks), want, "{checks:?}");
        }
        for (skew, want) in [
            (0, Status::Ok),
            (-30, Status::Ok),
            (31, Status::Warn),
            (-299, Status::Warn),
            (300, Status::Fail),
            (-3600, Status::Fail),
        ] {
            assert_eq!(clock_status(skew), want, "{skew}");
        }
    }

    #[test]
    fn gpu_quotas_of_zero_say_which_to_raise() {
        let ok = |v: f64| Ok::<f64, String>(v);
        let cases: [(Vec<QuotaRead>, Status, &str); 4] = [
            (
                vec![("L-DB2E81BA", "on-demand G and VT", ok(64.0))],
                Status::Ok,
                "64 vCPUs",
            ),
            (
                vec![
                    ("L-DB2E81BA", "on-demand G and VT", ok(0.0)),
                    ("L-417A185B", "on-demand P", ok(96.0)),
                ],
                Status::Warn,
                "on-demand G and VT (L-DB2E81BA); new accounts",
            ),
            (
                vec![(
                    "L-DB2E81BA",
                    "on-demand G and VT",
                    Err("AccessDenied".into()),
                )],
                Status::Warn,
                "servicequotas:GetServiceQuota",
            ),
            (
                vec![
                    (
                        "L-DB2E81BA",
                        "on-demand G and VT",
                        Err("AccessDenied".into()),
                    ),
                    ("L-417A185B", "on-demand P", ok(8.0)),
                ],
                Status::Ok,
                "on-demand P 8 vCPUs",
            ),
        ];
        for (read, status, shown) in cases {
            let check = gpu_quota(&read, "us-east-1");
            assert_eq!(check.status, status, "{read:?}");
            let all = format!("{} {:?}", check.detail, check.fix);
            assert!(all.contains(shown), "{read:?}: {all}");
        }
    }
}
