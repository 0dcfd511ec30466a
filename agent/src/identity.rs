//! The agent's TLS identity: enrollment (trading the single-use token and a CSR for a
//! client certificate) and the key and certificate kept, owner-only, in the state dir.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use protocol::framed::{read_frame, write_frame};
use protocol::tls::{self, Identity};
use protocol::{AgentMsg, ControllerMsg, ErrorKind, Hello};

use crate::{AgentConfig, Fatal};

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("identity")
}

/// The identity saved by an earlier enrollment, if any.
pub fn load(state_dir: &Path) -> anyhow::Result<Option<Identity>> {
    let dir = dir(state_dir);
    let (cert, key) = (dir.join("agent.crt"), dir.join("agent.key"));
    if !cert.exists() || !key.exists() {
        return Ok(None);
    }
    Ok(Some(Identity {
        cert_pem: std::fs::read_to_string(&cert)
            .with_context(|| format!("reading {}", cert.display()))?,
        key_pem: std::fs::read_to_string(&key)
            .with_context(|| format!("reading {}", key.display()))?,
    }))
}

fn save(state_dir: &Path, identity: &Identity) -> anyhow::Result<()> {
    let dir = dir(state_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // Key first, certificate last: `load` only trusts a directory holding both.
    tls::write_private(&dir.join("agent.key"), identity.key_pem.as_bytes())
        .with_context(|| format!("saving {}", dir.join("agent.key").display()))?;
    tls::write_private(&dir.join("agent.crt"), identity.cert_pem.as_bytes())
        .with_context(|| format!("saving {}", dir.join("agent.crt").display()))?;
    Ok(())
}

/// Enrolls over `conn` (a connection made without a client certificate) and saves the
/// resulting identity.
pub async fn enroll(config: &AgentConfig, conn: &quinn::Connection) -> anyhow::Result<Identity> {
    let (key_pem, csr_der) = tls::agent_key_and_csr()?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let ours = Hello::new(concat!("runctl-agent ", env!("CARGO_PKG_VERSION")));
    write_frame(&mut send, &AgentMsg::Hello(ours.clone())).await?;
    write_frame(
        &mut send,
        &AgentMsg::Enroll {
            token: config.token.clone(),
            csr_der,
        },
    )
    .await?;
    let mut answers = Vec::new();
    for _ in 0..2 {
        match read_frame::<_, ControllerMsg>(&mut recv).await? {
            Some(msg) => answers.push(msg),
            None => break,
        }
    }
    conn.close(0u32.into(), b"enrolled");
    let mut answers = answers.into_iter();
    match answers.next() {
        Some(ControllerMsg::Hello(theirs)) => {
            if let Err(e) = ours.check_peer(&theirs) {
                bail!("{e}");
            }
        }
        Some(ControllerMsg::Error(e)) => return Err(refusal(e)),
        other => bail!("the controller answered enrollment with {other:?}"),
    }
    match answers.next() {
        Some(ControllerMsg::Enrolled { instance, cert_der }) => {
            if instance != config.instance {
                tracing::warn!(
                    "the controller enrolled this agent as {instance}, not {}",
                    config.instance
                );
            }
            let identity = Identity {
                cert_pem: tls::der_to_pem(&cert_der),
                key_pem,
            };
            save(&config.state_dir, &identity)?;
            tracing::info!("enrolled as {instance}");
            Ok(identity)
        }
        Some(ControllerMsg::Error(e)) => Err(refusal(e)),
        other => bail!("the controller answered enrollment with {other:?}"),
    }
}

/// Token and certificate refusals are final: retrying with the same token cannot succeed.
pub fn refusal(e: protocol::WireError) -> anyhow::Error {
    match e.kind {
        ErrorKind::TokenUnknown
        | ErrorKind::TokenReused
        | ErrorKind::TokenExpired
        | ErrorKind::CertificateRevoked => Fatal(format!(
            "the controller refused this agent: {}. To resolve: launch a new instance (`runctl-controller launch`), which mints a new token",
            e.message
        ))
        .into(),
        ErrorKind::VersionMismatch
        | ErrorKind::Unauthenticated
        | ErrorKind::NotYourRun
        | ErrorKind::BadRequest
        | ErrorKind::RunFailed
        | ErrorKind::SyncFailed
        | ErrorKind::NotFound
        | ErrorKind::Forbidden
        | ErrorKind::Internal
        | ErrorKind::Unsupported => {
            anyhow::anyhow!("the controller refused the request: {}", e.message)
        }
    }
}
