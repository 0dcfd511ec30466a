//! The controller's home directory (`$RUNCTL_HOME`, default `~/.runctl`): every path the
//! CLI and daemon use, in one place. The directory is owner-only.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Home { root: root.into() }
    }

    /// `$RUNCTL_HOME` (via the caller), else `~/.runctl`.
    /// The path is made absolute: the daemon and local agents run from other directories.
    pub fn resolve(explicit: Option<PathBuf>) -> anyhow::Result<Self> {
        let root = match explicit {
            Some(root) => root,
            None => {
                let home = std::env::var_os("HOME")
                    .context("neither --home, RUNCTL_HOME nor HOME is set")?;
                Path::new(&home).join(".runctl")
            }
        };
        let root =
            std::path::absolute(&root).with_context(|| format!("resolving {}", root.display()))?;
        Ok(Home::new(root))
    }

    /// Creates the directory (mode 0700) if missing.
    pub fn ensure(&self) -> anyhow::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn socket(&self) -> PathBuf {
        self.root.join("daemon.sock")
    }
    pub fn lock(&self) -> PathBuf {
        self.root.join("daemon.lock")
    }
    pub fn pid(&self) -> PathBuf {
        self.root.join("daemon.pid")
    }
    /// The daemon's sync memory: stat caches per project, agents' trees per run.
    pub fn sync_dir(&self) -> PathBuf {
        self.root.join("sync")
    }
    pub fn daemon_log(&self) -> PathBuf {
        self.root.join("daemon.log")
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("state.db")
    }
    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    /// Where the local provider keeps an instance's config, state and log.
    pub fn local_instance(&self, name: &protocol::InstanceName) -> PathBuf {
        self.root.join("local").join(name.as_str())
    }
}

/// The last `lines` lines of a log file, joined with ` | `, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
