//! The streams that stand in for ssh (`protocol::streams`): a command or a shell, a
//! forwarded TCP connection, a copy either way. Each arrives on a stream of the
//! authenticated session, is checked against the agent's `[access]` config (`policy`,
//! pure), and ends as one line in the agent's audit log (`audit.log` in its state dir).

mod audit;
mod copy;
mod exec;
mod forward;
pub mod policy;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::streams::Place;
use protocol::{BulkOpen, WireError};

pub use audit::Line as AuditLine;

use crate::runs::{RunPlace, Runs};

/// What the access streams need: the policy, the runs (for their places), the agent's
/// home and state dir, and the audit log.
#[derive(Debug)]
pub struct Access {
    pub policy: protocol::agent_config::Access,
    pub home: PathBuf,
    pub state_dir: PathBuf,
    pub runs: Arc<Runs>,
    audit: audit::Audit,
}

/// Where a stream works: its start directory and environment, and the directory its
/// relative paths may not leave.
#[derive(Debug, Clone)]
pub struct Located {
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    pub fence: PathBuf,
}

/// The agent's home: `$HOME` when it is a directory, else its state directory.
pub fn agent_home(state_dir: &Path) -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|h| h.is_absolute() && h.is_dir())
        .unwrap_or_else(|| state_dir.to_owned())
}

impl Access {
    pub fn new(
        policy: protocol::agent_config::Access,
        state_dir: &Path,
        home: PathBuf,
        runs: Arc<Runs>,
    ) -> Self {
        Access {
            policy,
            home,
            state_dir: state_dir.to_owned(),
            runs,
            audit: audit::Audit::new(state_dir.join(audit::FILE)),
        }
    }

    /// The absolute paths a copy may reach.
    pub fn roots(&self) -> Vec<PathBuf> {
        if self.policy.copy_roots.is_empty() {
            vec![self.state_dir.clone(), self.home.clone()]
        } else {
            self.policy.copy_roots.clone()
        }
    }

    pub fn locate(&self, place: &Place) -> Result<Located, WireError> {
        match place {
            Place::Run(run) => {
                let (RunPlace { cwd, env }, fence) = self.runs.place(run)?;
                Ok(Located { cwd, env, fence })
            }
            Place::Home => Ok(Located {
                cwd: self.home.clone(),
                env: Vec::new(),
                fence: self.home.clone(),
            }),
        }
    }

    pub fn audit(&self, line: AuditLine) {
        self.audit.write(&line);
    }
}

/// Serves one access stream; the open has been read. Errors are the stream's own (its
/// refusals are written to it and to the audit log).
pub async fn serve(
    access: Arc<Access>,
    open: BulkOpen,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    match open {
        BulkOpen::Exec(open) => exec::serve(&access, open, send, recv).await,
        BulkOpen::Forward(open) => forward::serve(&access, open, send, recv).await,
        BulkOpen::CopyOut(open) => copy::serve_out(&access, open, send).await,
        BulkOpen::CopyIn(open) => copy::serve_in(&access, open, send, recv).await,
        BulkOpen::StartRun(_)
        | BulkOpen::StartRunWithSecrets { .. }
        | BulkOpen::StartRunWith(_)
        | BulkOpen::StartAgain { .. }
        | BulkOpen::Sync(_)
        | BulkOpen::SyncFrom { .. } => {
            anyhow::bail!("not an access stream")
        }
    }
}

/// Sends `answer` (an open's reply that ends the exchange: a refusal, a check's result)
/// and finishes the stream.
async fn answer_and_end<T: serde::Serialize>(
    send: &mut quinn::SendStream,
    answer: &T,
) -> anyhow::Result<()> {
    protocol::framed::write_frame(send, answer).await?;
    let _ = send.finish();
    Ok(())
}

/// How a place reads in the audit log.
fn place_name(place: &Place) -> String {
    match place {
        Place::Run(run) => run.to_string(),
        Place::Home => "home".to_owned(),
    }
}
