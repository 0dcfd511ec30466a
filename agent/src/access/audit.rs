//! The agent's audit log: one JSON line per exec, shell, forwarded connection and copy,
//! served or refused (who asked, what, where, when, how it ended). Appended, never
//! rewritten; a line that cannot be written is logged as a warning, and the stream goes on.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::Serialize;

pub const FILE: &str = "audit.log";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Line {
    /// When it began, ms since the Unix epoch.
    pub at_ms: u64,
    /// The person behind the controller's session (`user@host`), as the controller says.
    pub who: String,
    /// `exec`, `shell`, `forward`, `copy-out`, `copy-in`.
    pub what: &'static str,
    /// The run, or `home`.
    pub place: String,
    /// The command, the forward's target, the copy's path.
    pub detail: String,
    /// How it ended: `exit 0`, `signal 9`, `refused: ...`, `bytes 123/456`, `failed: ...`.
    pub end: String,
    pub ms: u64,
}

#[derive(Debug)]
pub struct Audit {
    path: PathBuf,
    lock: Mutex<()>,
}

impl Audit {
    pub fn new(path: PathBuf) -> Self {
        Audit {
            path,
            lock: Mutex::new(()),
        }
    }

    pub fn write(&self, line: &Line) {
        use std::os::unix::fs::OpenOptionsExt;
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut text = serde_json::to_string(line).expect("an audit line serializes");
        text.push('\n');
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = written {
            tracing::warn!("writing the audit log {}: {e}", self.path.display());
        }
        tracing::info!(
            who = %line.who,
            what = line.what,
            place = %line.place,
            "{}: {}",
            line.detail,
            line.end
        );
    }
}
