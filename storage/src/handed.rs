//! Object-store credentials handed to the agent from outside (the controller, over the
//! channel) rather than found on its host: a pod has no instance profile, and credentials
//! in its environment would be shown by RunPod's API to anyone holding the account key.
//!
//! Each run's store client asks [`Handed::for_run`]'s provider for credentials on every
//! request (no cache in between). The provider answers with the newest credentials that
//! name the run and are good for at least [`MARGIN`] more; until such arrive, the request
//! waits, with one line in the log when the wait starts and one when it ends. Nothing is
//! refused for want of credentials: uploads resume when the controller renews them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, future};
use protocol::{RunId, StoreCredentials};
use tokio::sync::watch;

/// How long credentials must still be good for to sign a request with them.
pub const MARGIN: Duration = Duration::from_secs(5);

/// The credentials the controller handed over last, for every run's client to read.
#[derive(Debug, Clone)]
pub struct Handed {
    tx: Arc<watch::Sender<Option<Arc<StoreCredentials>>>>,
}

impl Default for Handed {
    fn default() -> Self {
        Handed {
            tx: Arc::new(watch::channel(None).0),
        }
    }
}

/// Whether credentials can sign a run's request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usable {
    Yes,
    /// None handed over yet (the controller is away, or has not sent them).
    NoneYet,
    /// The newest do not name this run (it started after they were issued).
    NotForRun,
    /// They expire within [`MARGIN`] (or have).
    Expiring,
}

impl Usable {
    fn why(self) -> &'static str {
        match self {
            Usable::Yes => "they are good",
            Usable::NoneYet => "none handed over yet",
            Usable::NotForRun => "the newest do not cover this run yet",
            Usable::Expiring => "the newest have expired",
        }
    }
}

/// Whether `creds` can sign a request of `run` at `now_ms`.
pub fn usable(creds: Option<&StoreCredentials>, run: &RunId, now_ms: u64) -> Usable {
    let Some(creds) = creds else {
        return Usable::NoneYet;
    };
    if !creds.runs.contains(run) {
        return Usable::NotForRun;
    }
    match creds.expires_at_ms {
        Some(at) if at < now_ms.saturating_add(MARGIN.as_millis() as u64) => Usable::Expiring,
        Some(_) | None => Usable::Yes,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Handed {
    /// Replaces the credentials every run's client reads.
    pub fn set(&self, creds: StoreCredentials) {
        tracing::info!(
            runs = creds.runs.len(),
            expires_at_ms = creds.expires_at_ms,
            "store credentials handed over by the controller"
        );
        self.tx.send_replace(Some(Arc::new(creds)));
    }

    /// A credentials provider for `run`'s store client.
    pub fn for_run(&self, run: RunId) -> RunCredentials {
        RunCredentials {
            rx: self.tx.subscribe(),
            run,
        }
    }
}

/// [`ProvideCredentials`] for one run: waits for handed-over credentials that cover it.
#[derive(Debug)]
pub struct RunCredentials {
    rx: watch::Receiver<Option<Arc<StoreCredentials>>>,
    run: RunId,
}

impl RunCredentials {
    async fn wait(&self) -> Result<Credentials, CredentialsError> {
        let mut rx = self.rx.clone();
        let mut waited: Option<std::time::Instant> = None;
        loop {
            let current = rx.borrow_and_update().clone();
            match usable(current.as_deref(), &self.run, now_ms()) {
                Usable::Yes => {
                    let creds = current.expect("usable credentials exist");
                    if let Some(since) = waited {
                        tracing::info!(
                            "run {}: store credentials arrived after {:.0?}; store requests resume",
                            self.run,
                            since.elapsed()
                        );
                    }
                    return Ok(Credentials::new(
                        creds.access_key_id.clone(),
                        creds.secret_access_key.clone(),
                        creds.session_token.clone(),
                        creds
                            .expires_at_ms
                            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
                        "runctl-controller",
                    ));
                }
                why => {
                    if waited.is_none() {
                        tracing::warn!(
                            "run {}: store requests wait for the controller to renew its credentials ({}); they resume when it is back",
                            self.run,
                            why.why()
                        );
                        waited = Some(std::time::Instant::now());
                    }
                    // Woken by new credentials; the timeout re-checks the clock.
                    if let Ok(Err(_)) =
                        tokio::time::timeout(Duration::from_secs(5), rx.changed()).await
                    {
                        return Err(CredentialsError::not_loaded(
                            "the agent is shutting down; no credentials will come",
                        ));
                    }
                }
            }
        }
    }
}

impl ProvideCredentials for RunCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.wait())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(n: u8) -> RunId {
        RunId::from_random([n; 6])
    }

    fn creds(runs: &[RunId], expires_at_ms: Option<u64>) -> StoreCredentials {
        StoreCredentials {
            access_key_id: "ASIA".into(),
            secret_access_key: "s".into(),
            session_token: None,
            expires_at_ms,
            runs: runs.to_vec(),
        }
    }

    fn check(creds: Option<StoreCredentials>, now_ms: u64, expected: Usable) {
        assert_eq!(
            usable(creds.as_ref(), &run(1), now_ms),
            expected,
            "{creds:?} at {now_ms}"
        );
    }

    #[test]
    fn which_credentials_sign_a_runs_requests() {
        check(None, 0, Usable::NoneYet);
        check(Some(creds(&[run(2)], None)), 0, Usable::NotForRun);
        check(Some(creds(&[run(2), run(1)], None)), 0, Usable::Yes);
        check(Some(creds(&[run(1)], Some(60_000))), 0, Usable::Yes);
        check(Some(creds(&[run(1)], Some(60_000))), 55_000, Usable::Yes);
        check(
            Some(creds(&[run(1)], Some(60_000))),
            55_001,
            Usable::Expiring,
        );
        check(
            Some(creds(&[run(1)], Some(60_000))),
            90_000,
            Usable::Expiring,
        );
    }

    #[tokio::test]
    async fn a_request_waits_for_credentials_that_cover_its_run_and_then_goes() {
        let handed = Handed::default();
        let provider = handed.for_run(run(1));
        let waiting = tokio::spawn(async move { provider.provide_credentials().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        handed.set(creds(&[run(2)], None));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "credentials for another run went");
        handed.set(creds(&[run(1)], Some(now_ms() + 600_000)));
        let got = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("woken by the new credentials")
            .expect("task")
            .expect("credentials");
        assert_eq!(got.access_key_id(), "ASIA");
    }
}
