//! The runs this agent holds: each has a directory with its event log, work tree and
//! checkpoint dir. Starting a run unpacks its bundle and hands the process to the
//! supervisor; a run the agent lost track of (the agent itself restarted) is ended as `Lost`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use protocol::{ErrorKind, EventKind, RunCursor, RunEnd, RunId, RunSpec, WireError};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::bundle;
use crate::eventlog::EventLog;
use crate::supervisor::{self, Launch, StopHandle};

#[derive(Debug)]
struct Entry {
    log: Arc<EventLog>,
    stop: Option<StopHandle>,
}

#[derive(Debug)]
pub struct Runs {
    runs_dir: PathBuf,
    data_dir: PathBuf,
    entries: Mutex<HashMap<RunId, Entry>>,
}

impl Runs {
    /// Opens the run directory, ending as `Lost` every run that was active when the agent
    /// last stopped: its process is no longer supervised, so it is killed.
    pub fn open(runs_dir: &Path, data_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(runs_dir)
            .with_context(|| format!("creating {}", runs_dir.display()))?;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let mut entries = HashMap::new();
        for dirent in std::fs::read_dir(runs_dir)? {
            let dirent = dirent?;
            let Ok(run) = dirent.file_name().to_string_lossy().parse::<RunId>() else {
                continue;
            };
            let path = dirent.path().join("events.log");
            let log = Arc::new(
                EventLog::open(&path).with_context(|| format!("opening {}", path.display()))?,
            );
            if !log.cursor().ended {
                end_lost_run(&log);
            }
            entries.insert(run, Entry { log, stop: None });
        }
        Ok(Runs {
            runs_dir: runs_dir.to_owned(),
            data_dir: data_dir.to_owned(),
            entries: Mutex::new(entries),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RunId, Entry>> {
        self.entries.lock().expect("runs lock is never poisoned")
    }

    pub fn cursors(&self) -> Vec<RunCursor> {
        let mut cursors: Vec<RunCursor> = self
            .lock()
            .iter()
            .map(|(run, entry)| {
                let cursor = entry.log.cursor();
                RunCursor {
                    run: run.clone(),
                    last_seq: cursor.last_seq,
                    ended: cursor.ended,
                }
            })
            .collect();
        cursors.sort_by(|a, b| a.run.cmp(&b.run));
        cursors
    }

    pub fn log(&self, run: &RunId) -> Option<Arc<EventLog>> {
        self.lock().get(run).map(|e| e.log.clone())
    }

    pub fn active(&self) -> u32 {
        self.lock()
            .values()
            .filter(|e| !e.log.cursor().ended)
            .count() as u32
    }

    /// Receives the run's bundle from `bundle`, unpacks it and starts the process.
    /// Whatever happens, the run's log exists afterwards; a failure is recorded in it.
    pub async fn start(
        &self,
        spec: RunSpec,
        bundle: impl AsyncRead + Unpin,
        bundle_bytes: u64,
    ) -> Result<u32, WireError> {
        let run_dir = self.runs_dir.join(spec.run.as_str());
        let log = {
            let mut entries = self.lock();
            if entries.contains_key(&spec.run) || run_dir.exists() {
                return Err(WireError::new(
                    ErrorKind::RunFailed,
                    format!("run {} already exists on this agent", spec.run),
                ));
            }
            std::fs::create_dir_all(&run_dir).map_err(|e| internal(&run_dir, e))?;
            let path = run_dir.join("events.log");
            let log = Arc::new(EventLog::open(&path).map_err(|e| internal(&path, e))?);
            entries.insert(
                spec.run.clone(),
                Entry {
                    log: log.clone(),
                    stop: None,
                },
            );
            log
        };
        match self.prepare(&spec, &run_dir, bundle, bundle_bytes).await {
            Ok(launch) => {
                let (pid, stop) = supervisor::spawn(launch, log)
                    .map_err(|m| WireError::new(ErrorKind::RunFailed, m))?;
                if let Some(entry) = self.lock().get_mut(&spec.run) {
                    entry.stop = Some(stop);
                }
                Ok(pid)
            }
            Err(message) => {
                if let Err(e) = log.append(EventKind::Ended(RunEnd::SpawnFailed {
                    message: message.clone(),
                })) {
                    tracing::warn!("run log write failed: {e}");
                }
                Err(WireError::new(ErrorKind::RunFailed, message))
            }
        }
    }

    async fn prepare(
        &self,
        spec: &RunSpec,
        run_dir: &Path,
        bundle: impl AsyncRead + Unpin,
        bundle_bytes: u64,
    ) -> Result<Launch, String> {
        let archive = run_dir.join("bundle.tar.zst");
        let mut file = tokio::fs::File::create(&archive)
            .await
            .map_err(|e| format!("creating {}: {e}", archive.display()))?;
        let copied = tokio::io::copy(&mut bundle.take(bundle_bytes + 1), &mut file)
            .await
            .map_err(|e| format!("receiving the work directory: {e}"))?;
        if copied != bundle_bytes {
            return Err(format!(
                "the work directory bundle was cut short: {copied} of {bundle_bytes} bytes arrived"
            ));
        }
        drop(file);
        let work = run_dir.join("work");
        let unpack_from = archive.clone();
        let unpack_to = work.clone();
        let unpacked = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&unpack_from)?;
            bundle::unpack(
                std::io::BufReader::new(file),
                &unpack_to,
                bundle::DEFAULT_MAX_UNPACKED_BYTES,
            )
        })
        .await
        .map_err(|e| format!("unpacking task failed: {e}"))?
        .map_err(|e| e.to_string())?;
        tracing::info!(run = %spec.run, files = unpacked.files, bytes = unpacked.bytes, "work directory unpacked");
        let _ = tokio::fs::remove_file(&archive).await;

        let checkpoints = run_dir.join("checkpoints");
        std::fs::create_dir_all(&checkpoints)
            .map_err(|e| format!("creating {}: {e}", checkpoints.display()))?;
        let mut env = vec![
            ("RUNCTL_RUN_ID".to_owned(), spec.run.to_string()),
            (
                "RUNCTL_CHECKPOINT_DIR".to_owned(),
                checkpoints.display().to_string(),
            ),
            (
                "RUNCTL_DATA_DIR".to_owned(),
                self.data_dir.display().to_string(),
            ),
            // Output reaches the user live only if Python does not block-buffer the pipe.
            ("PYTHONUNBUFFERED".to_owned(), "1".to_owned()),
        ];
        env.extend(spec.env.iter().cloned());
        Ok(Launch {
            argv: spec.argv.clone(),
            env,
            cwd: work,
        })
    }

    /// Stops one run: SIGTERM to its process group, SIGKILL after `grace`.
    pub fn stop(&self, run: &RunId, grace: Duration) -> Result<(), WireError> {
        let entries = self.lock();
        let entry = entries.get(run).ok_or_else(|| {
            WireError::new(
                ErrorKind::NotFound,
                format!("run {run} is not on this agent"),
            )
        })?;
        match &entry.stop {
            Some(stop) if !entry.log.cursor().ended => {
                stop.stop(grace);
                Ok(())
            }
            _ => Err(WireError::new(
                ErrorKind::RunFailed,
                format!("run {run} is not running"),
            )),
        }
    }

    /// Stops every active run and waits (bounded) until each has recorded its end.
    pub async fn stop_all(&self, grace: Duration) {
        let active: Vec<(Arc<EventLog>, Option<StopHandle>)> = self
            .lock()
            .values()
            .filter(|e| !e.log.cursor().ended)
            .map(|e| (e.log.clone(), e.stop.clone()))
            .collect();
        for (_, stop) in &active {
            if let Some(stop) = stop {
                stop.stop(grace);
            }
        }
        let bound = grace + Duration::from_secs(5);
        for (log, _) in active {
            let mut cursor = log.subscribe();
            if tokio::time::timeout(bound, cursor.wait_for(|c| c.ended))
                .await
                .is_err()
            {
                tracing::warn!("a run did not end within {bound:?} of being stopped");
            }
        }
    }
}

fn internal(path: &Path, e: std::io::Error) -> WireError {
    WireError::new(ErrorKind::Internal, format!("{}: {e}", path.display()))
}

/// Ends a run whose supervisor is gone: kills what is left of its process group and
/// records the loss.
fn end_lost_run(log: &EventLog) {
    let pid = log.reader(0).ok().and_then(|mut reader| {
        reader
            .read_batch(u64::MAX, usize::MAX)
            .ok()?
            .into_iter()
            .find_map(|e| match e.kind {
                EventKind::Started { pid } => Some(pid),
                _ => None,
            })
    });
    if let Some(pid) = pid {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    let message =
        "the agent restarted while this run was active; its process was stopped".to_owned();
    if let Err(e) = log.append(EventKind::Ended(RunEnd::Lost { message })) {
        tracing::warn!("run log write failed: {e}");
    }
}
