//! Which backend a store uses and how to reach it.

use std::path::PathBuf;
use std::time::Duration;

use crate::dns::{Dns, Resolver};
use crate::{LocalStore, S3Store, Store, StoreError};

/// How to reach the object store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// Buckets are directories under `root` (the embedded default: no cloud account).
    Local { root: PathBuf },
    /// S3 or any S3-compatible server, with the standard AWS credential chain (environment,
    /// shared profiles, SSO, instance profile).
    S3 {
        region: Option<String>,
        /// E.g. `http://127.0.0.1:8333` for a local server; AWS's own when `None`.
        endpoint_url: Option<String>,
        /// `http://host/bucket/key` rather than `http://bucket.host/key`.
        force_path_style: bool,
        /// A named profile from `~/.aws/config`.
        profile: Option<String>,
    },
}

impl From<&protocol::StoreSpec> for StoreConfig {
    /// The store a run spec names (the controller sends the location, never credentials).
    fn from(spec: &protocol::StoreSpec) -> Self {
        match spec.clone() {
            protocol::StoreSpec::Local { root } => StoreConfig::Local { root: root.into() },
            protocol::StoreSpec::S3 {
                region,
                endpoint_url,
                force_path_style,
                profile,
            } => StoreConfig::S3 {
                region,
                endpoint_url,
                force_path_style,
                profile,
            },
        }
    }
}

/// An open connection to a store, cheap to clone; [`Connection::bucket`] gives a store.
#[derive(Debug, Clone)]
pub struct Connection {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Local(PathBuf),
    S3(aws_sdk_s3::Client),
}

/// The region requests are signed for when none is configured anywhere (S3-compatible
/// servers accept any).
const FALLBACK_REGION: &str = "us-east-1";

/// The AWS configuration every runctl client shares: the standard credential chain,
/// rustls (ring) for TLS, short connect and read timeouts, and the region signed for when
/// none is configured anywhere (S3-compatible servers and emulators accept any).
pub async fn aws_sdk_config(
    region: Option<&str>,
    endpoint_url: Option<&str>,
    profile: Option<&str>,
    dns: Dns,
) -> Result<aws_config::SdkConfig, StoreError> {
    use aws_config::{BehaviorVersion, Region};
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    let builder = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring));
    let http = match dns {
        Dns::System => builder.build_https(),
        Dns::Hickory => builder.build_with_resolver(
            Resolver::from_system().map_err(StoreError::io("reading the DNS configuration"))?,
        ),
    };
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(30))
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(timeouts);
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(endpoint) = endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(profile) = profile {
        loader = loader.profile_name(profile);
    }
    let sdk = loader.load().await;
    if sdk.region().is_some() {
        return Ok(sdk);
    }
    Ok(sdk
        .into_builder()
        .region(Region::new(FALLBACK_REGION))
        .build())
}

/// Opens a connection: for S3, loads the AWS configuration and credential chain once.
pub async fn connect(config: &StoreConfig) -> Result<Connection, StoreError> {
    connect_with(config, Dns::System).await
}

/// [`connect`], resolving names with `dns`.
pub async fn connect_with(config: &StoreConfig, dns: Dns) -> Result<Connection, StoreError> {
    connect_handed(config, dns, None).await
}

/// [`connect_with`], signing S3 requests with `handed` credentials (asked for on every
/// request, so renewed ones are used at once) instead of the host's credential chain.
pub async fn connect_handed(
    config: &StoreConfig,
    dns: Dns,
    handed: Option<crate::handed::RunCredentials>,
) -> Result<Connection, StoreError> {
    let backend = match config {
        StoreConfig::Local { root } => {
            std::fs::create_dir_all(root)
                .map_err(StoreError::io(format!("creating {}", root.display())))?;
            Backend::Local(root.clone())
        }
        StoreConfig::S3 {
            region,
            endpoint_url,
            force_path_style,
            profile,
        } => {
            let sdk = aws_sdk_config(
                region.as_deref(),
                endpoint_url.as_deref(),
                profile.as_deref(),
                dns,
            )
            .await?;
            let mut s3 =
                aws_sdk_s3::config::Builder::from(&sdk).force_path_style(*force_path_style);
            if let Some(handed) = handed {
                s3 = s3
                    .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(
                        handed,
                    ))
                    .identity_cache(aws_sdk_s3::config::IdentityCache::no_cache());
            }
            Backend::S3(aws_sdk_s3::Client::from_conf(s3.build()))
        }
    };
    Ok(Connection { backend })
}

impl Connection {
    /// The store for one bucket (for the local backend, a directory under the root).
    pub fn bucket(&self, bucket: &str) -> Result<Store, StoreError> {
        match &self.backend {
            Backend::Local(root) => {
                crate::validate_key(bucket).map_err(|_| StoreError::InvalidUrl {
                    url: format!("s3://{bucket}"),
                    reason: "not a usable bucket name".into(),
                })?;
                Ok(Store::Local(LocalStore::new(root.join(bucket), bucket)))
            }
            Backend::S3(client) => Ok(Store::S3(S3Store::new(client.clone(), bucket))),
        }
    }
}
