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
    if dir.exists() {
        finish_saving(&dir)?;
    }
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
    // Both written aside (the certificate last), then moved into place; `load` finishes
    // a move a crash cut short, so the key and certificate in place always belong
    // together.
    tls::write_private(&dir.join(KEY_NEW), identity.key_pem.as_bytes())
        .with_context(|| format!("saving {}", dir.join(KEY_NEW).display()))?;
    tls::write_private(&dir.join(CERT_NEW), identity.cert_pem.as_bytes())
        .with_context(|| format!("saving {}", dir.join(CERT_NEW).display()))?;
    finish_saving(&dir)
}

/// The key and certificate being saved, before they are moved into place.
const KEY_NEW: &str = "agent.key.new";
const CERT_NEW: &str = "agent.crt.new";

/// Moves a pair written aside into place; a key aside without its certificate (a save cut
/// short before the pair was whole) is dropped.
fn finish_saving(dir: &Path) -> anyhow::Result<()> {
    let (key_new, cert_new) = (dir.join(KEY_NEW), dir.join(CERT_NEW));
    if !cert_new.exists() {
        let _ = std::fs::remove_file(&key_new);
        return Ok(());
    }
    if key_new.exists() {
        std::fs::rename(&key_new, dir.join("agent.key"))
            .with_context(|| format!("moving {} into place", key_new.display()))?;
    }
    std::fs::rename(&cert_new, dir.join("agent.crt"))
        .with_context(|| format!("moving {} into place", cert_new.display()))?;
    Ok(())
}

/// When to renew a certificate valid from `not_before` to `not_after` (seconds since the
/// epoch): once two thirds of its lifetime since it was issued are gone (its validity
/// starts `tls::BACKDATE` before that), leaving a third to get a new one through
/// disconnections (30 days of a 90-day certificate).
pub fn renew_at(not_before: u64, not_after: u64) -> u64 {
    let issued = not_before
        .saturating_add(tls::BACKDATE.as_secs())
        .min(not_after);
    issued + (not_after - issued) / 3 * 2
}

/// A renewal under way: the new key, kept until its certificate comes.
#[derive(Debug)]
pub struct Renewing {
    key_pem: String,
}

impl Renewing {
    /// A new key and the request for its certificate (`AgentMsg::Renew`).
    pub fn start() -> anyhow::Result<(Renewing, Vec<u8>)> {
        let (key_pem, csr_der) = tls::agent_key_and_csr()?;
        Ok((Renewing { key_pem }, csr_der))
    }

    /// Saves the new key with its certificate in place of the old pair (the next
    /// connection uses them), and returns the new certificate's validity.
    pub fn finish(self, state_dir: &Path, cert_der: &[u8]) -> anyhow::Result<(u64, u64)> {
        let identity = Identity {
            cert_pem: tls::der_to_pem(cert_der),
            key_pem: self.key_pem,
        };
        let validity = tls::validity(&identity.cert_pem)
            .context("the renewed certificate has no readable validity")?;
        save(state_dir, &identity)?;
        Ok(validity)
    }
}

/// Enrolls over `conn` (a connection made without a client certificate) and saves the
/// resulting identity.
pub async fn enroll(config: &AgentConfig, conn: &quinn::Connection) -> anyhow::Result<Identity> {
    let ours = Hello::new(concat!("runctl-agent ", env!("CARGO_PKG_VERSION")));
    enroll_as(config, conn, ours).await
}

/// [`enroll`], opening with `ours` (the load benchmark's swarm speaks an older protocol).
pub async fn enroll_as(
    config: &AgentConfig,
    conn: &quinn::Connection,
    ours: Hello,
) -> anyhow::Result<Identity> {
    let (key_pem, csr_der) = tls::agent_key_and_csr()?;
    let (mut send, mut recv) = conn.open_bi().await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_renewed_two_thirds_into_its_life() {
        const DAY: u64 = 86_400;
        let back = tls::BACKDATE.as_secs();
        // (not_before, not_after) -> when to renew
        let t = 1_000_000;
        let cases: &[(u64, u64, u64)] = &[
            (t - back, t + 90 * DAY, t + 60 * DAY),
            (t - back, t + 15, t + 10),
            (t - back, t, t),
            // A validity shorter than the backdating: renewed at once.
            (t, t + 500, t + 500),
            (0, 0, 0),
            (u64::MAX - 1, u64::MAX, u64::MAX),
        ];
        for (from, until, want) in cases {
            assert_eq!(renew_at(*from, *until), *want, "{from}..{until}");
        }
    }
}
