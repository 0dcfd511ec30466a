//! Object-store credentials the daemon hands an agent whose host has none of its own (a
//! RunPod pod: no instance profile, and an environment RunPod's API shows to anyone with
//! the account key). By default STS AssumeRole with a session policy that allows only the
//! prefixes of the instance's live runs, so a pod can read its data and write its own
//! checkpoints and nothing else; or a named profile's credentials, as they are.
//!
//! Pure: [`grants_of`], [`session_policy`], [`renew_in`]. The one call out is [`issue`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protocol::{RunId, RunSpec, StoreCredentials};
use serde::{Deserialize, Serialize};
use storage::ObjectUrl;

use crate::config::Config;
use crate::error::{ErrorCode, UserError};

/// AWS's limit on a session policy, packed (no whitespace).
pub const POLICY_MAX_CHARS: usize = 2048;

/// Where handed credentials come from (`[runpod] store_role_arn` or `store_profile`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    AssumeRole {
        role_arn: String,
        lifetime: Duration,
        sts_endpoint: Option<String>,
    },
    Profile(String),
}

impl Source {
    /// The configured source, if any.
    pub fn of(config: &Config) -> Option<Source> {
        let pods = &config.runpod;
        if let Some(role_arn) = &pods.store_role_arn {
            return Some(Source::AssumeRole {
                role_arn: role_arn.clone(),
                lifetime: Duration::from_secs(pods.store_credentials_secs),
                sts_endpoint: pods.sts_endpoint.clone(),
            });
        }
        pods.store_profile.clone().map(Source::Profile)
    }
}

/// What one run may do under a prefix: read it, or also write and delete (its own
/// checkpoints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub bucket: String,
    /// A key prefix; everything under it (a data source naming one object is a prefix
    /// of itself).
    pub prefix: String,
    pub write: bool,
}

/// The prefixes `spec` touches: its checkpoint prefix (written), the checkpoint it
/// resumes from and its data sources (read).
pub fn grants_of(spec: &RunSpec) -> Result<Vec<Grant>, UserError> {
    let grant = |url: &str, write: bool| {
        let url = ObjectUrl::parse(url)
            .map_err(|e| UserError::new(ErrorCode::BadInput, format!("{url}: {e}")))?;
        Ok::<_, UserError>(Grant {
            bucket: url.bucket,
            prefix: url.key,
            write,
        })
    };
    let mut grants = Vec::new();
    if let Some(push) = &spec.checkpoints {
        grants.push(grant(&push.dest, true)?);
    }
    if let Some(from) = &spec.resume_from {
        grants.push(grant(from, false)?);
    }
    for source in &spec.data {
        grants.push(grant(&source.source, false)?);
    }
    Ok(grants)
}

/// The session policy allowing exactly `grants` (in partition `partition`, e.g. `aws`):
/// objects under each prefix read (and written, for write grants), each bucket listed
/// only under those prefixes. Refused when AWS would refuse it for its size.
pub fn session_policy(partition: &str, grants: &[Grant]) -> Result<String, UserError> {
    let arn = |bucket: &str, prefix: &str| format!("arn:{partition}:s3:::{bucket}/{prefix}*");
    let mut statements = Vec::new();
    let written: Vec<String> = grants
        .iter()
        .filter(|g| g.write)
        .map(|g| arn(&g.bucket, &g.prefix))
        .collect();
    if !written.is_empty() {
        statements.push(serde_json::json!({
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                       "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
            "Resource": written,
        }));
    }
    let read: Vec<String> = grants
        .iter()
        .filter(|g| !g.write)
        .map(|g| arn(&g.bucket, &g.prefix))
        .collect();
    if !read.is_empty() {
        statements.push(serde_json::json!({
            "Effect": "Allow",
            "Action": ["s3:GetObject"],
            "Resource": read,
        }));
    }
    let mut buckets: Vec<&str> = grants.iter().map(|g| g.bucket.as_str()).collect();
    buckets.sort_unstable();
    buckets.dedup();
    for bucket in buckets {
        let prefixes: Vec<String> = grants
            .iter()
            .filter(|g| g.bucket == bucket)
            .map(|g| format!("{}*", g.prefix))
            .collect();
        statements.push(serde_json::json!({
            "Effect": "Allow",
            "Action": ["s3:ListBucket", "s3:ListBucketMultipartUploads"],
            "Resource": format!("arn:{partition}:s3:::{bucket}"),
            "Condition": {"StringLike": {"s3:prefix": prefixes}},
        }));
    }
    let policy = serde_json::json!({"Version": "2012-10-17", "Statement": statements}).to_string();
    if policy.len() > POLICY_MAX_CHARS {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!(
                "the session policy for this instance's runs is {} characters; AWS takes at most {POLICY_MAX_CHARS}",
                policy.len()
            ),
        )
        .resolve("run fewer runs with data and checkpoints on one pod at a time, or name fewer --data sources (a common prefix covers several)")
        .resolve("or set store_profile under [runpod] instead of store_role_arn"));
    }
    Ok(policy)
}

/// How long after issuing (at `now_ms`) credentials expiring at `expires_at_ms` to renew
/// them: when a third of their remaining life is left, at least a second from now; an
/// hour for credentials that do not expire (a profile's may have been rotated).
pub fn renew_in(now_ms: u64, expires_at_ms: Option<u64>) -> Duration {
    match expires_at_ms {
        None => Duration::from_secs(3600),
        Some(at) => {
            Duration::from_millis(at.saturating_sub(now_ms) * 2 / 3).max(Duration::from_secs(1))
        }
    }
}

/// The partition of an ARN (`arn:PARTITION:...`).
fn partition(arn: &str) -> &str {
    arn.split(':')
        .nth(1)
        .filter(|p| !p.is_empty())
        .unwrap_or("aws")
}

fn ms_of(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Credentials from `source` for `runs`, allowed `grants`, for instance `session`.
pub async fn issue(
    config: &Config,
    source: &Source,
    session: &str,
    runs: Vec<RunId>,
    grants: &[Grant],
) -> Result<StoreCredentials, UserError> {
    let storage = &config.storage;
    match source {
        Source::AssumeRole {
            role_arn,
            lifetime,
            sts_endpoint,
        } => {
            let policy = session_policy(partition(role_arn), grants)?;
            let sdk = storage::aws_sdk_config(
                storage.region.as_deref(),
                sts_endpoint.as_deref(),
                storage.profile.as_deref(),
                storage::dns::Dns::System,
            )
            .await
            .map_err(|e| UserError::new(ErrorCode::Internal, e.to_string()))?;
            let sts = aws_sdk_sts::Client::new(&sdk);
            let answer = sts
                .assume_role()
                .role_arn(role_arn)
                .role_session_name(session_name(session))
                .policy(policy)
                .duration_seconds(lifetime.as_secs() as i32)
                .send()
                .await
                .map_err(|e| {
                    UserError::new(
                        ErrorCode::Conflict,
                        format!(
                            "assuming {role_arn} for the pod's store credentials failed: {}",
                            aws_sdk_sts::error::DisplayErrorContext(&e)
                        ),
                    )
                    .resolve("check that this machine's AWS credentials may sts:AssumeRole it, and that its trust policy admits them")
                })?;
            let creds = answer.credentials().ok_or_else(|| {
                UserError::new(
                    ErrorCode::Conflict,
                    "STS answered AssumeRole without credentials",
                )
            })?;
            let expires = SystemTime::try_from(*creds.expiration()).map_err(|e| {
                UserError::new(ErrorCode::Conflict, format!("STS's expiry time: {e}"))
            })?;
            Ok(StoreCredentials {
                access_key_id: creds.access_key_id().to_owned(),
                secret_access_key: creds.secret_access_key().to_owned(),
                session_token: Some(creds.session_token().to_owned()),
                expires_at_ms: Some(ms_of(expires)),
                runs,
            })
        }
        Source::Profile(profile) => {
            use aws_credential_types::provider::ProvideCredentials;
            let sdk = storage::aws_sdk_config(
                storage.region.as_deref(),
                None,
                Some(profile),
                storage::dns::Dns::System,
            )
            .await
            .map_err(|e| UserError::new(ErrorCode::Internal, e.to_string()))?;
            // The profile alone, not the whole chain: this machine's environment must not
            // stand in for the profile the user named.
            let mut settings = aws_config::provider_config::ProviderConfig::without_region()
                .with_region(sdk.region().cloned());
            if let Some(http) = sdk.http_client() {
                settings = settings.with_http_client(http);
            }
            let provider = aws_config::profile::ProfileFileCredentialsProvider::builder()
                .configure(&settings)
                .profile_name(profile)
                .build();
            let creds = provider.provide_credentials().await.map_err(|e| {
                UserError::new(
                    ErrorCode::BadInput,
                    format!(
                        "loading the credentials of profile {profile:?} ([runpod] store_profile): {}",
                        aws_credential_types::provider::error::CredentialsError::to_string(&e)
                    ),
                )
                .resolve("check the profile in ~/.aws/config and ~/.aws/credentials")
            })?;
            Ok(StoreCredentials {
                access_key_id: creds.access_key_id().to_owned(),
                secret_access_key: creds.secret_access_key().to_owned(),
                session_token: creds.session_token().map(str::to_owned),
                expires_at_ms: creds.expiry().map(ms_of),
                runs,
            })
        }
    }
}

/// An STS session name for `instance` (2 to 64 of `[\w+=,.@-]`).
fn session_name(instance: &str) -> String {
    format!("runctl-{instance}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+=,.@-_".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(bucket: &str, prefix: &str, write: bool) -> Grant {
        Grant {
            bucket: bucket.into(),
            prefix: prefix.into(),
            write,
        }
    }

    fn statements(policy: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(policy).expect("JSON");
        assert_eq!(v["Version"], "2012-10-17");
        v["Statement"].as_array().expect("statements").clone()
    }

    #[test]
    fn the_session_policy_allows_the_runs_prefixes_and_nothing_else() {
        let policy = session_policy(
            "aws",
            &[
                grant("ckpt", "runs/r-1/", true),
                grant("data", "imagenet/", false),
                grant("ckpt", "runs/r-0/", false),
            ],
        )
        .expect("fits");
        let s = statements(&policy);
        assert_eq!(s.len(), 4, "{policy}");
        // Written: only the run's own checkpoint prefix.
        assert_eq!(
            s[0]["Resource"],
            serde_json::json!(["arn:aws:s3:::ckpt/runs/r-1/*"])
        );
        assert!(
            s[0]["Action"]
                .as_array()
                .expect("actions")
                .iter()
                .any(|a| a == "s3:PutObject")
        );
        assert!(
            s[0]["Action"]
                .as_array()
                .expect("actions")
                .iter()
                .all(|a| a != "s3:*")
        );
        // Read: the data and the checkpoint resumed from, with GetObject alone.
        assert_eq!(s[1]["Action"], serde_json::json!(["s3:GetObject"]));
        assert_eq!(
            s[1]["Resource"],
            serde_json::json!([
                "arn:aws:s3:::data/imagenet/*",
                "arn:aws:s3:::ckpt/runs/r-0/*"
            ])
        );
        // Listing: each bucket under its granted prefixes only.
        assert_eq!(s[2]["Resource"], "arn:aws:s3:::ckpt");
        assert_eq!(
            s[2]["Condition"]["StringLike"]["s3:prefix"],
            serde_json::json!(["runs/r-1/*", "runs/r-0/*"])
        );
        assert_eq!(s[3]["Resource"], "arn:aws:s3:::data");
        assert!(!policy.contains(' '), "packed: {policy}");
    }

    #[test]
    fn a_policy_names_the_roles_partition_and_refuses_what_aws_would() {
        let policy = session_policy("aws-cn", &[grant("b", "p/", true)]).expect("fits");
        assert!(policy.contains("arn:aws-cn:s3:::b/p/*"), "{policy}");
        assert_eq!(partition("arn:aws-us-gov:iam::1:role/r"), "aws-us-gov");
        let many: Vec<Grant> = (0..60)
            .map(|i| grant("bucket", &format!("runs/r-{i:012}/"), true))
            .collect();
        let e = session_policy("aws", &many).expect_err("too long");
        assert!(e.message.contains("2048"), "{}", e.message);
    }

    fn check_renew(now: u64, expires: Option<u64>, expected: Duration) {
        assert_eq!(renew_in(now, expires), expected, "{now} {expires:?}");
    }

    #[test]
    fn credentials_are_renewed_with_a_third_of_their_life_left() {
        check_renew(0, Some(900_000), Duration::from_secs(600));
        check_renew(1_000, Some(31_000), Duration::from_secs(20));
        check_renew(10_000, Some(10_500), Duration::from_secs(1));
        check_renew(20_000, Some(10_000), Duration::from_secs(1));
        check_renew(0, None, Duration::from_secs(3600));
    }

    #[test]
    fn session_names_keep_to_what_sts_takes() {
        assert_eq!(session_name("runpod-3fa9c1"), "runctl-runpod-3fa9c1");
        assert_eq!(session_name(&"x".repeat(100)).len(), 64);
    }
}
