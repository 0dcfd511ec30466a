//! `sync --watch`: turns file-system events under a project into "sync now" signals,
//! debounced so a burst of saves (an editor writing a swap file, a formatter touching
//! twenty files) becomes one sync, sent within half a second of the first change.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet time that ends a burst of changes.
const QUIET: Duration = Duration::from_millis(100);
/// The longest a change waits for its burst to end.
const MAX_WAIT: Duration = Duration::from_millis(400);

/// Watches a project; `changed` resolves once per debounced burst of relevant changes.
#[derive(Debug)]
pub struct ProjectWatch {
    _watcher: notify::RecommendedWatcher,
    events: mpsc::UnboundedReceiver<()>,
}

impl ProjectWatch {
    /// Watches `root`, ignoring `.git` and everything under `private` (the controller's
    /// home, which the daemon writes to).
    pub fn new(root: &Path, private: &Path) -> anyhow::Result<Self> {
        let (tx, events) = mpsc::unbounded_channel();
        let (root_owned, private) = (root.to_owned(), private.to_owned());
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event
                    && relevant(&event, &root_owned, &private)
                {
                    let _ = tx.send(());
                }
            })
            .context("starting the file watcher")?;
        watcher
            .watch(root, RecursiveMode::Recursive)
            .with_context(|| format!("watching {}", root.display()))?;
        Ok(ProjectWatch {
            _watcher: watcher,
            events,
        })
    }

    /// Waits for the next burst of changes to end (or to have waited long enough).
    pub async fn changed(&mut self) -> Option<()> {
        self.events.recv().await?;
        let deadline = tokio::time::Instant::now() + MAX_WAIT;
        loop {
            let quiet = tokio::time::sleep(QUIET);
            tokio::select! {
                more = self.events.recv() => more?,
                () = quiet => return Some(()),
                () = tokio::time::sleep_until(deadline) => return Some(()),
            }
        }
    }
}

fn relevant(event: &notify::Event, root: &Path, private: &Path) -> bool {
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return false;
    }
    event.paths.iter().any(|path| {
        let inside_git = path
            .strip_prefix(root)
            .map(|rel| {
                rel.components()
                    .next()
                    .is_some_and(|c| c.as_os_str() == ".git")
            })
            .unwrap_or(false);
        !inside_git && !path.starts_with(private)
    })
}
