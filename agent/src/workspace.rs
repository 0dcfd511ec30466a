//! The instance as a workspace kept between runs: the content store new trees are seeded
//! from, the saved environments, and pruning so runctl never fills the disk. `prune::plan`
//! decides; this measures what is on disk, deletes what the plan names, and checks there
//! is room before a run starts.
//!
//! Deleting is crash-safe: a run's tree, environment or a checkpoint is first renamed to a
//! `.trash-*` name in its own directory (one atomic step), then removed; whatever trash an
//! agent stopped in the middle of removing is removed when it next opens the workspace.
//! A run's log and small state files are never pruned: the run stays listed, its events
//! replayable.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use protocol::agent_config::DiskSize;
use protocol::{DiskUse, RunId};
use tokio::sync::watch;

use crate::envs::Envs;
use crate::prune::{self, CacheFacts, CheckpointFacts, Facts, Limits, RunFacts};
use crate::store::Store;
use crate::usage::{self, Du};

/// The disk settings from the agent's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLimits {
    pub keep_runs: u32,
    pub disk_budget: DiskSize,
    pub min_free: DiskSize,
    pub keep_local_checkpoints: u32,
}

impl Default for DiskLimits {
    fn default() -> Self {
        use protocol::agent_config as d;
        DiskLimits {
            keep_runs: d::DEFAULT_KEEP_RUNS,
            disk_budget: d::DEFAULT_DISK_BUDGET,
            min_free: d::DEFAULT_MIN_FREE,
            keep_local_checkpoints: d::DEFAULT_KEEP_LOCAL_CHECKPOINTS,
        }
    }
}

/// Marks a run directory whose tree and environment were pruned.
const PRUNED_MARK: &str = "pruned";
/// Marks a run directory whose ended log the controller has stored whole (it stays after
/// the log is pruned: the run started, and is not a tree waiting for its start).
pub const STORED_MARK: &str = "log-stored";
/// What pruning a run removes from its directory.
const PRUNABLE: &[&str] = &[
    "work",
    "venv",
    "resume",
    "tree.state",
    "sync-staging",
    "work.new",
];

#[derive(Debug)]
pub struct Workspace {
    pub store: Store,
    pub envs: std::sync::Arc<Envs>,
    runs_dir: PathBuf,
    data_dir: PathBuf,
    state_dir: PathBuf,
    limits: DiskLimits,
    /// One prune at a time.
    pruning: Mutex<()>,
    disk: watch::Sender<Option<DiskUse>>,
}

impl Workspace {
    pub fn open(state_dir: &Path, limits: DiskLimits) -> io::Result<Workspace> {
        let runs_dir = state_dir.join("runs");
        fs::create_dir_all(&runs_dir)?;
        let ws = Workspace {
            store: Store::open(&state_dir.join("store"))?,
            envs: std::sync::Arc::new(Envs::open(&state_dir.join("envs"))?),
            runs_dir: runs_dir.clone(),
            data_dir: state_dir.join("data"),
            state_dir: state_dir.to_owned(),
            limits,
            pruning: Mutex::new(()),
            disk: watch::channel(None).0,
        };
        // Finish deletes an earlier agent was cut off in.
        for run in fs::read_dir(&runs_dir)?.flatten() {
            remove_trash(&run.path());
            remove_trash(&run.path().join(CHECKPOINT_DIR));
        }
        Ok(ws)
    }

    /// The latest disk use, updated after every prune.
    pub fn disk(&self) -> watch::Receiver<Option<DiskUse>> {
        self.disk.subscribe()
    }

    fn run_dir(&self, run: &RunId) -> PathBuf {
        self.runs_dir.join(run.as_str())
    }

    /// Prunes what the plan names, keeping `active` runs whole. Returns what runctl's
    /// files take afterwards.
    pub fn prune(&self, active: &HashSet<RunId>) -> DiskUse {
        let _one = self.pruning.lock().unwrap_or_else(|p| p.into_inner());
        let facts = self.facts(active);
        let total = usage::free_and_total(&self.state_dir).map_or(0, |(_, t)| t);
        let limits = Limits {
            keep_runs: self.limits.keep_runs,
            budget_bytes: self.limits.disk_budget.bytes_of(total),
            keep_local_checkpoints: self.limits.keep_local_checkpoints,
        };
        let plan = prune::plan(&facts, &limits);
        if !plan.is_empty() {
            tracing::info!(
                runs = plan.runs.len(),
                logs = plan.logs.len(),
                checkpoints = plan.checkpoints.len(),
                envs = plan.envs.len(),
                records = plan.records.len(),
                "pruning the workspace"
            );
        }
        for run in &plan.runs {
            if let Err(e) = self.prune_run(run) {
                tracing::warn!(%run, "pruning the run's tree: {e}");
            }
        }
        for run in &plan.logs {
            if let Err(e) = trash_and_remove(&self.run_dir(run), LOG_DIR) {
                tracing::warn!(%run, "deleting the run's log (the controller holds it): {e}");
            }
        }
        for (run, name) in &plan.checkpoints {
            let dir = self.run_dir(run).join(CHECKPOINT_DIR);
            if let Err(e) = trash_and_remove(&dir, name) {
                tracing::warn!(%run, "deleting checkpoint {name} from the disk: {e}");
            }
        }
        for key in &plan.envs {
            if let Err(e) = self.envs.remove(key) {
                tracing::warn!("deleting environment {key}: {e}");
            }
        }
        for run in &plan.records {
            if let Ok(run) = run.parse::<RunId>() {
                self.store.remove_record(&run);
            }
        }
        if !plan.records.is_empty() || !plan.runs.is_empty() {
            self.store.collect_garbage();
        }
        let disk = self.measure(active);
        self.disk.send_replace(Some(disk.clone()));
        disk
    }

    fn prune_run(&self, run: &RunId) -> io::Result<()> {
        let dir = self.run_dir(run);
        fs::write(dir.join(PRUNED_MARK), b"")?;
        for name in PRUNABLE {
            trash_and_remove(&dir, name)?;
        }
        Ok(())
    }

    /// Refuses (with what takes the space and how to free it) unless the state filesystem
    /// has `min_free` left for the run about to start, pruning first when it has not.
    pub fn make_room(&self, active: &HashSet<RunId>) -> Result<(), String> {
        // Ended runs are pruned as each one ends (in the background); a new run waits for
        // a prune only when the disk is short of room, so it does not measure every tree
        // on the way to its first output.
        if let Ok((free, total)) = usage::free_and_total(&self.state_dir)
            && free >= self.limits.min_free.bytes_of(total)
        {
            return Ok(());
        }
        let disk = self.prune(active);
        let need = self.limits.min_free.bytes_of(disk.total_bytes);
        if disk.free_bytes >= need {
            return Ok(());
        }
        Err(no_room_message(&disk, need, &self.state_dir, &self.limits))
    }

    /// What is on disk, for the plan.
    fn facts(&self, active: &HashSet<RunId>) -> Facts {
        let mut facts = Facts::default();
        let Ok(entries) = fs::read_dir(&self.runs_dir) else {
            return facts;
        };
        let mut du = Du::default();
        let now = crate::eventlog::now_ms();
        for entry in entries.flatten() {
            let Ok(run) = entry.file_name().to_string_lossy().parse::<RunId>() else {
                continue;
            };
            let dir = entry.path();
            let log = dir.join(LOG_DIR);
            let last_used_ms =
                newest_mtime_ms(&log).unwrap_or_else(|| newest_mtime_ms(&dir).unwrap_or(0));
            // A tree synced for a run that has not started yet (or is being synced now)
            // counts as active for a day.
            let unstarted = !log.exists()
                && !dir.join(STORED_MARK).exists()
                && now.saturating_sub(last_used_ms) < 86_400_000;
            let is_active = active.contains(&run) || unstarted;
            let bytes = if dir.join(PRUNED_MARK).exists() {
                0
            } else {
                PRUNABLE.iter().map(|n| du.add(&dir.join(n))).sum()
            };
            let pushed = crate::pusher::in_store(&dir.join(CHECKPOINT_DIR));
            let mut checkpoints = Vec::new();
            if let Ok(ckpts) = fs::read_dir(dir.join(CHECKPOINT_DIR)) {
                for c in ckpts.flatten() {
                    let name = c.file_name().to_string_lossy().into_owned();
                    if name.starts_with(".trash-") {
                        continue;
                    }
                    let local = storage::checkpoints::local_files(&name, &c.path()).ok();
                    let in_store = local
                        .as_ref()
                        .is_some_and(|l| pushed.get(&name) == Some(&(l.bytes, l.saved_ms)));
                    checkpoints.push(CheckpointFacts {
                        saved_ms: local.as_ref().map_or(0, |l| l.saved_ms.max(0) as u64),
                        bytes: du.add(&c.path()),
                        name,
                        in_store,
                    });
                }
            }
            facts.runs.push(RunFacts {
                run,
                active: is_active,
                last_used_ms,
                bytes,
                checkpoints,
                log_stored: log.exists() && dir.join(STORED_MARK).exists(),
            });
        }
        for (saved, used, _) in self.envs.list() {
            facts.envs.push(CacheFacts {
                bytes: du.add(&self.envs.dir().join(&saved.key)),
                key: saved.key,
                last_used_ms: used,
            });
        }
        let records = self.store.records();
        let store_bytes = self.store.bytes();
        let n = records.len().max(1) as u64;
        for record in records {
            if active.contains(&record.run) {
                continue; // an active run's tree record stays with it
            }
            facts.records.push(CacheFacts {
                key: record.run.to_string(),
                last_used_ms: record.recorded_at_ms,
                bytes: store_bytes / n,
            });
        }
        facts
    }

    /// What runctl's files take now, by kind.
    pub fn measure(&self, active: &HashSet<RunId>) -> DiskUse {
        let mut du = Du::default();
        // Environments first, so files a run's venv shares with a saved one count there.
        let mut disk = DiskUse {
            envs_bytes: du.add(self.envs.dir()),
            ..DiskUse::default()
        };
        if let Ok(entries) = fs::read_dir(&self.runs_dir) {
            for entry in entries.flatten() {
                let Ok(run) = entry.file_name().to_string_lossy().parse::<RunId>() else {
                    continue;
                };
                disk.runs += 1;
                let dir = entry.path();
                // Started (a log, or one the controller holds and pruning deleted) and over.
                let started = dir.join(LOG_DIR).exists() || dir.join(STORED_MARK).exists();
                let ended = started && !active.contains(&run);
                disk.ended_runs += u32::from(ended);
                disk.envs_bytes += du.add(&dir.join("venv"));
                disk.checkpoints_bytes += du.add(&dir.join(CHECKPOINT_DIR));
                if let Ok(files) = fs::read_dir(&dir) {
                    for f in files.flatten() {
                        let name = f.file_name();
                        if name != "venv" && name != CHECKPOINT_DIR {
                            disk.runs_bytes += du.add(&f.path());
                        }
                    }
                }
            }
        }
        disk.store_bytes = du.add(self.store.dir());
        disk.data_bytes = du.add(&self.data_dir);
        if let Ok((free, total)) = usage::free_and_total(&self.state_dir) {
            disk.free_bytes = free;
            disk.total_bytes = total;
        }
        disk
    }
}

/// A run's checkpoint dir, inside its run directory.
pub const CHECKPOINT_DIR: &str = "checkpoints";
/// A run's event log directory, inside its run directory.
pub const LOG_DIR: &str = "log";

fn no_room_message(disk: &DiskUse, need: u64, state_dir: &Path, limits: &DiskLimits) -> String {
    let b = |n: u64| bytesize::ByteSize::b(n).display().iec().to_string();
    format!(
        "the instance has {} free on {} and a run needs {} ([agent] min_free = {}); runctl's files take {}: {} runs ({} ended) {}, checkpoints not yet in the store or the newest of each run {}, environments {}, content store {}, data (never pruned) {}; the rest is other files. To free space: remove data from RUNCTL_DATA_DIR ({}), lower [agent] keep_runs (now {}) or disk_budget (now {}) for instances launched after, or launch with a bigger disk",
        b(disk.free_bytes),
        state_dir.display(),
        b(need),
        limits.min_free,
        b(disk.runctl_bytes()),
        disk.runs,
        disk.ended_runs,
        b(disk.runs_bytes),
        b(disk.checkpoints_bytes),
        b(disk.envs_bytes),
        b(disk.store_bytes),
        b(disk.data_bytes),
        state_dir.join("data").display(),
        limits.keep_runs,
        limits.disk_budget,
    )
}

/// Renames `dir/name` to a trash name, then removes it.
fn trash_and_remove(dir: &Path, name: &str) -> io::Result<()> {
    let from = dir.join(name);
    let trash = dir.join(format!(".trash-{name}-{:08x}", rand::random::<u32>()));
    match fs::rename(&from, &trash) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    remove_any(&trash)
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            make_writable(path);
            fs::remove_dir_all(path)
        }
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Directories a run made read-only would stop `remove_dir_all`.
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = fs::symlink_metadata(dir)
        && m.is_dir()
    {
        let _ = fs::set_permissions(
            dir,
            fs::Permissions::from_mode(m.permissions().mode() | 0o700),
        );
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                make_writable(&e.path());
            }
        }
    }
}

fn remove_trash(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".trash-") {
            let _ = remove_any(&entry.path());
        }
    }
}

/// The newest modification time of `path` or a file directly in it.
fn newest_mtime_ms(path: &Path) -> Option<u64> {
    let ms = |m: fs::Metadata| {
        m.modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_millis() as u64)
    };
    let mut newest = ms(fs::metadata(path).ok()?)?;
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if let Some(t) = e.metadata().ok().and_then(ms) {
                newest = newest.max(t);
            }
        }
    }
    Some(newest)
}
