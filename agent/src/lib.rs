//! runctl-agent: runs on the GPU host. It dials back to the controller (QUIC, mutual TLS),
//! enrolls once with a single-use token, and then receives runs: it applies code-sync deltas to each
//! run's work tree, supervises the process, and keeps every line of output in a durable,
//! sequence-numbered event log that the controller replays from wherever it left off.
//!
//! The agent keeps working while disconnected: runs go on, and their events wait on disk.

pub mod backoff;
pub mod config;
pub mod eventlog;
pub mod identity;
pub mod runs;
pub mod session;
pub mod supervisor;
pub mod tree;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

pub use config::AgentConfig;

/// How the agent's main loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The controller asked the agent to shut down (its instance is being terminated).
    Shutdown,
    /// The local shutdown future fired (SIGTERM from systemd, Ctrl-C).
    Interrupted,
}

/// An error after which retrying cannot help: enrollment was refused or the agent's
/// certificate was revoked. The process exits non-zero with the message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

/// Runs the agent until the controller shuts it down or `shutdown` resolves.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<Exit> {
    let runs = Arc::new(
        runs::Runs::open(
            &config.state_dir.join("runs"),
            &config.state_dir.join("data"),
        )
        .with_context(|| format!("opening run state in {}", config.state_dir.display()))?,
    );
    tokio::pin!(shutdown);
    let mut attempt: u32 = 0;
    loop {
        let outcome = tokio::select! {
            outcome = session::connect_and_serve(&config, &runs) => outcome,
            () = &mut shutdown => {
                runs.stop_all(config.stop_grace).await;
                return Ok(Exit::Interrupted);
            }
        };
        match outcome {
            Ok(session::Outcome::Shutdown) => return Ok(Exit::Shutdown),
            Ok(session::Outcome::Disconnected) => {
                tracing::info!("disconnected from the controller; redialling");
                attempt = 0;
            }
            Err(e) => {
                if let Some(fatal) = e.downcast_ref::<Fatal>() {
                    return Err(anyhow::anyhow!("{fatal}"));
                }
                tracing::warn!("controller unreachable: {e:#}");
            }
        }
        let delay = backoff::delay(attempt, rand::random::<f64>());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut shutdown => {
                runs.stop_all(config.stop_grace).await;
                return Ok(Exit::Interrupted);
            }
        }
    }
}

/// How long a stopped process gets between SIGTERM and SIGKILL unless told otherwise.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
