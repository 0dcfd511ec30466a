//! The runs this agent holds: each has a directory with its event log, synced work tree,
//! checkpoint dir and (when setup makes one) venv. A run's tree is synced first (see
//! `tree`), then starting it checks the spec, plans its setup and storage (connecting to
//! the store and starting the checkpoint pusher) and hands it to the supervisor; a run the
//! agent lost track of (the agent itself restarted) is ended as `Lost`, after the
//! checkpoints it left are pushed. Syncs to one run are serialized.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::data;
use crate::envs;
use crate::eventlog::EventLog;
use crate::pusher::{self, Pusher};
use crate::setup;
use crate::store::Store;
use crate::supervisor::{self, Handle, Job, SaveEnv, Storage};
use crate::tree::Tree;
use crate::workspace::{DiskLimits, Workspace};
use anyhow::Context;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use protocol::{
    EndAction, ErrorKind, EventKind, Notice, RunCursor, RunEnd, RunId, RunSpec, WireError,
};
use storage::handed::Handed;
use tokio::sync::{Notify, mpsc};

/// Where a run's process starts and its environment as runctl gives it (on top of the
/// agent's own), kept in the run's dir for `exec` and `shell`. Owner-only: the variables
/// may hold the user's secrets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunPlace {
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
}

const PLACE_FILE: &str = "place.json";

impl RunPlace {
    fn save(&self, run_dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).expect("serializes");
        protocol::tls::write_private(&run_dir.join(PLACE_FILE), &json)
    }

    fn load(run_dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(run_dir.join(PLACE_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

#[derive(Debug)]
struct Entry {
    log: Arc<EventLog>,
    stop: Option<Handle>,
}

/// A run's tree, open or not, behind the lock its syncs take turns on.
pub type TreeSlot = Arc<tokio::sync::Mutex<Option<Tree>>>;

#[derive(Debug)]
pub struct Runs {
    runs_dir: PathBuf,
    data_dir: PathBuf,
    workspace: Workspace,
    log_max_bytes: u64,
    /// Told when a run ends, with its end action.
    ended: mpsc::UnboundedSender<(RunId, EndAction)>,
    /// Store credentials from the controller, when the host has none of its own.
    handed: Option<Handed>,
    /// Per run, the highest sequence number handed to a controller connection.
    delivered: Mutex<HashMap<RunId, u64>>,
    delivered_changed: Notify,
    entries: Mutex<HashMap<RunId, Entry>>,
    /// Per run, its tree (kept open between syncs) behind the lock a sync holds from
    /// reading the tree to the swap.
    trees: Mutex<HashMap<RunId, TreeSlot>>,
    /// Asked how many GPUs the host has, for a launch of a process per GPU.
    nvidia_smi: PathBuf,
}

impl Runs {
    /// Opens the run directory, ending as `Lost` every run that was active when the agent
    /// last stopped: its process is no longer supervised, so it is killed.
    pub fn open(
        state_dir: &Path,
        log_max_bytes: u64,
        limits: DiskLimits,
        ended: mpsc::UnboundedSender<(RunId, EndAction)>,
        handed: Option<Handed>,
    ) -> anyhow::Result<Self> {
        let runs_dir = &state_dir.join("runs");
        let data_dir = &state_dir.join("data");
        std::fs::create_dir_all(runs_dir)
            .with_context(|| format!("creating {}", runs_dir.display()))?;
        let workspace = Workspace::open(state_dir, limits)
            .with_context(|| format!("opening the workspace in {}", state_dir.display()))?;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let mut entries = HashMap::new();
        for dirent in std::fs::read_dir(runs_dir)? {
            let dirent = dirent?;
            let Ok(run) = dirent.file_name().to_string_lossy().parse::<RunId>() else {
                continue;
            };
            let path = dirent.path().join(LOG_DIR);
            if !path.exists() {
                continue; // synced, never started
            }
            let log = Arc::new(
                EventLog::open(&path, log_max_bytes)
                    .with_context(|| format!("opening {}", path.display()))?,
            );
            if !log.cursor().ended {
                match std::fs::read(dirent.path().join(data::SAVED_FILE)) {
                    Ok(saved) => finish_lost_run(
                        dirent.path(),
                        saved,
                        log.clone(),
                        handed.as_ref().map(|h| h.for_run(run.clone())),
                    ),
                    Err(_) => end_lost_run(&log),
                }
            }
            entries.insert(run, Entry { log, stop: None });
        }
        Ok(Runs {
            runs_dir: runs_dir.to_owned(),
            data_dir: data_dir.to_owned(),
            workspace,
            log_max_bytes,
            ended,
            handed,
            delivered: Mutex::default(),
            delivered_changed: Notify::new(),
            entries: Mutex::new(entries),
            trees: Mutex::default(),
            nvidia_smi: "nvidia-smi".into(),
        })
    }

    /// Asks `nvidia_smi` (not `nvidia-smi` in `PATH`) how many GPUs the host has.
    pub fn with_nvidia_smi(mut self, nvidia_smi: PathBuf) -> Self {
        self.nvidia_smi = nvidia_smi;
        self
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

    /// The runs that have not ended.
    fn active_set(&self) -> HashSet<RunId> {
        self.lock()
            .iter()
            .filter(|(_, e)| !e.log.cursor().ended)
            .map(|(run, _)| run.clone())
            .collect()
    }

    pub fn store(&self) -> &Store {
        &self.workspace.store
    }

    pub fn workspace(&self) -> &Workspace {
        &self.workspace
    }

    /// Prunes ended runs' files (see `prune`); blocking.
    pub fn prune(&self) -> protocol::DiskUse {
        let used = self.workspace.prune(&self.active_set());
        self.forget_pruned_logs();
        used
    }

    /// Closes the logs pruning deleted (ended runs the controller holds).
    fn forget_pruned_logs(&self) {
        let runs_dir = self.runs_dir.clone();
        self.lock().retain(|run, entry| {
            !entry.log.cursor().ended || runs_dir.join(run.as_str()).join(LOG_DIR).exists()
        });
    }

    /// Prunes, then refuses unless there is room for `run` to start; blocking.
    pub fn make_room(&self, run: &RunId) -> Result<(), String> {
        let mut active = self.active_set();
        active.insert(run.clone());
        let room = self.workspace.make_room(&active);
        self.forget_pruned_logs();
        room
    }

    pub fn active(&self) -> u32 {
        self.lock()
            .values()
            .filter(|e| !e.log.cursor().ended)
            .count() as u32
    }

    /// The run's directory; its tree is `Tree::work_dir` of it.
    pub fn run_dir(&self, run: &RunId) -> PathBuf {
        self.runs_dir.join(run.as_str())
    }

    /// Where `exec` and `shell` in a run start, with what environment, and the tree its
    /// relative paths stay in. A run synced but never started starts at its tree's root
    /// with only `RUNCTL_RUN_ID`.
    pub fn place(&self, run: &RunId) -> Result<(RunPlace, PathBuf), WireError> {
        let run_dir = self.run_dir(run);
        let work = Tree::work_dir(&run_dir);
        if !work.is_dir() {
            return Err(WireError::new(
                ErrorKind::NotFound,
                format!("run {run} has no tree on this instance"),
            ));
        }
        let place = RunPlace::load(&run_dir).unwrap_or_else(|| RunPlace {
            cwd: work.clone(),
            env: vec![("RUNCTL_RUN_ID".to_owned(), run.to_string())],
        });
        Ok((place, work))
    }

    /// The run's tree slot: lock it to sync; it holds the tree if one is open.
    pub fn tree_slot(&self, run: &RunId) -> TreeSlot {
        self.trees
            .lock()
            .expect("tree locks are never poisoned")
            .entry(run.clone())
            .or_default()
            .clone()
    }

    /// The process group of the run's running process, if any.
    pub fn process_group(&self, run: &RunId) -> Option<u32> {
        self.lock()
            .get(run)
            .and_then(|e| e.stop.as_ref())
            .and_then(Handle::process_group)
    }

    /// Starts a run whose tree has been synced: checks the spec, plans its setup and
    /// hands it to the supervisor. Whatever happens, the run's log exists afterwards; a
    /// failure is recorded in it.
    pub async fn start(&self, start: protocol::RunStart) -> Result<(), WireError> {
        self.start_fresh(start, None).await
    }

    /// `start`, with `first` (a `StartedAgain` notice) as the new log's first event.
    async fn start_fresh(
        &self,
        start: protocol::RunStart,
        first: Option<EventKind>,
    ) -> Result<(), WireError> {
        let spec = &start.spec;
        let run_dir = self.run_dir(&spec.run);
        let work = Tree::work_dir(&run_dir);
        let log = {
            let mut entries = self.lock();
            let path = run_dir.join(LOG_DIR);
            if entries.contains_key(&spec.run) || path.exists() {
                return Err(WireError::new(
                    ErrorKind::RunFailed,
                    format!("run {} already exists on this agent", spec.run),
                ));
            }
            if !work.is_dir() {
                return Err(WireError::new(
                    ErrorKind::RunFailed,
                    format!("run {} has no synced work tree on this agent", spec.run),
                ));
            }
            let log = Arc::new(
                EventLog::open(&path, self.log_max_bytes).map_err(|e| internal(&path, e))?,
            );
            if let Some(first) = first {
                log.append(first).map_err(|e| internal(&path, e))?;
            }
            entries.insert(
                spec.run.clone(),
                Entry {
                    log: log.clone(),
                    stop: None,
                },
            );
            log
        };
        self.launch(start, log).await
    }

    /// Starts a run once more: where it has ended here (a gang's restart), the same tree
    /// and the same log, going on after a `StartedAgain` notice; where it never ran (a
    /// spot run's replacement instance), a new log that opens with that notice. Refused
    /// while the run is going.
    pub async fn start_again(
        &self,
        start: protocol::RunStart,
        attempt: u32,
        cause: String,
    ) -> Result<(), WireError> {
        let run = start.spec.run.clone();
        let refuse = |why: String| Err(WireError::new(ErrorKind::RunFailed, why));
        if !Tree::work_dir(&self.run_dir(&run)).is_dir() {
            return refuse(format!("run {run} has no synced work tree on this agent"));
        }
        let notice = EventKind::Notice(protocol::Notice::StartedAgain { attempt, cause });
        let known = self.lock().contains_key(&run);
        if !known {
            return self.start_fresh(start, Some(notice)).await;
        }
        let log = {
            let mut entries = self.lock();
            let Some(entry) = entries.get_mut(&run) else {
                return refuse(format!("run {run} is not known on this agent"));
            };
            if !entry.log.cursor().ended {
                return refuse(format!("run {run} is still going on this agent"));
            }
            if let Err(e) = entry.log.reopen(notice) {
                return Err(internal(&self.run_dir(&run).join(LOG_DIR), e));
            }
            entry.stop = None;
            entry.log.clone()
        };
        self.launch(start, log).await
    }

    /// Hands a run whose log is open to the supervisor: resolves its launch, prepares it
    /// and connects its storage; a failure is the log's `Ended`.
    async fn launch(&self, start: protocol::RunStart, log: Arc<EventLog>) -> Result<(), WireError> {
        let protocol::RunStart {
            spec,
            secrets,
            budget,
            launch,
        } = start;
        let run_dir = self.run_dir(&spec.run);
        let launch = match launch {
            Some(launch) => self.resolve_launch(&launch).await.map(Some),
            None => Ok(None),
        };
        let prepared = match launch.and_then(|l| self.prepare(&spec, secrets, l, &run_dir)) {
            Ok((job, plan)) => self.attach_storage(job, plan, &spec, &run_dir, &log).await,
            Err(end) => Err(end),
        };
        match prepared {
            Ok(job) => {
                let mut cursor = log.subscribe();
                let handle = supervisor::spawn(job, log.clone());
                if let Some(budget) = budget {
                    tokio::spawn(crate::budget::hold(budget, handle.clone(), log));
                }
                if let Some(entry) = self.lock().get_mut(&spec.run) {
                    entry.stop = Some(handle);
                }
                let (ended, run, action) = (self.ended.clone(), spec.run.clone(), spec.end);
                tokio::spawn(async move {
                    if cursor.wait_for(|c| c.ended).await.is_ok() {
                        let _ = ended.send((run, action));
                    }
                });
                Ok(())
            }
            Err(end) => {
                let message = end.describe();
                if let Err(e) = log.append(EventKind::Ended(end)) {
                    tracing::warn!("run log write failed: {e}");
                }
                Err(WireError::new(ErrorKind::RunFailed, message))
            }
        }
    }

    /// Connects to the run's object store, remembers where its checkpoints go (so a
    /// restarted agent can finish pushing them) and starts pushing them.
    async fn attach_storage(
        &self,
        mut job: Job,
        plan: Option<data::Plan>,
        spec: &RunSpec,
        run_dir: &Path,
        log: &Arc<EventLog>,
    ) -> Result<Job, RunEnd> {
        let Some(plan) = plan else { return Ok(job) };
        let failed = |message: String| RunEnd::DataFailed { message };
        let conn = storage::connect_handed(
            &(&plan.spec).into(),
            storage::dns::Dns::Hickory,
            self.handed.as_ref().map(|h| h.for_run(spec.run.clone())),
        )
        .await
        .map_err(|e| failed(format!("opening the object store: {e}")))?;
        if let (Some((url, keep)), Some(push)) = (&plan.checkpoints, &spec.checkpoints) {
            let saved = data::Saved {
                storage: plan.spec.clone(),
                checkpoints: push.clone(),
            };
            let path = run_dir.join(data::SAVED_FILE);
            std::fs::write(&path, serde_json::to_vec(&saved).expect("serializes"))
                .map_err(|e| failed(format!("writing {}: {e}", path.display())))?;
            let engine = data::engine(&conn, url).map_err(failed)?;
            let pusher =
                Pusher::start(&job.checkpoints, engine, url.clone(), *keep, log.clone())
                    .map_err(|e| failed(format!("watching {}: {e}", job.checkpoints.display())))?;
            job.pusher = Some(pusher);
        }
        job.storage = Some(Storage {
            conn,
            plan,
            resume_dir: run_dir.join("resume"),
        });
        Ok(job)
    }

    /// The launch with this host's facts: its GPU count (asked only for a process per
    /// GPU) and, for a run of one node, a loopback port free now for the rendezvous.
    async fn resolve_launch(
        &self,
        launch: &protocol::launch::Launch,
    ) -> Result<protocol::launch::Resolved, RunEnd> {
        let spawn_failed = |message: String| RunEnd::SpawnFailed { message };
        launch.check().map_err(spawn_failed)?;
        let gpus = match (launch.launcher, launch.nproc_per_node) {
            (protocol::launch::Launcher::Torchrun, None) => {
                crate::gpu::count(&self.nvidia_smi).await
            }
            _ => 0,
        };
        let port = match &launch.master {
            Some(master) => master.port,
            None => std::net::TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .map_err(|e| spawn_failed(format!("finding a free port for the rendezvous: {e}")))?
                .port(),
        };
        Ok(launch.resolve(gpus, port))
    }

    /// Checks the spec and plans the run; an error is how the run ends.
    fn prepare(
        &self,
        spec: &RunSpec,
        secrets: Vec<protocol::Secret>,
        launch: Option<protocol::launch::Resolved>,
        run_dir: &Path,
    ) -> Result<(Job, Option<data::Plan>), RunEnd> {
        let spawn_failed = |message: String| RunEnd::SpawnFailed { message };
        if spec.argv.is_empty() || spec.argv[0].is_empty() {
            return Err(spawn_failed("the command is empty".into()));
        }
        for (key, value) in &spec.env {
            check_env(key, value).map_err(spawn_failed)?;
        }
        let spot_signal = Signal::try_from(spec.spot_signal).map_err(|_| {
            spawn_failed(format!(
                "{} is not a signal number (e.g. 15 for SIGTERM, 10 for SIGUSR1)",
                spec.spot_signal
            ))
        })?;
        let work = Tree::work_dir(run_dir);
        let cwd = if spec.cwd.is_empty() {
            work
        } else {
            protocol::manifest::check_path(&spec.cwd).map_err(|e| spawn_failed(e.to_string()))?;
            work.join(&spec.cwd)
        };
        if !cwd.is_dir() {
            return Err(spawn_failed(format!(
                "the start directory {:?} is not a directory in the synced tree",
                spec.cwd
            )));
        }
        let checkpoints = run_dir.join(CHECKPOINT_DIR);
        std::fs::create_dir_all(&checkpoints)
            .map_err(|e| spawn_failed(format!("creating {}: {e}", checkpoints.display())))?;
        let storage_plan =
            data::plan(spec, &self.data_dir).map_err(|message| RunEnd::DataFailed { message })?;
        let facts = setup::Facts::gather(&cwd, &spec.argv);
        let venv = run_dir.join("venv");
        let mut plan = setup::plan(&spec.setup, &spec.argv, &facts, &venv)
            .map_err(|message| RunEnd::SetupFailed { message })?;
        let (env_notice, save_env) = self.reuse_env(spec, &mut plan, &facts, run_dir, &cwd);
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
        env.extend(plan.env);
        if let Some(launch) = &launch {
            env.extend(launch.env());
        }
        env.extend(spec.env.iter().cloned());
        let place = RunPlace {
            cwd: cwd.clone(),
            env: env.clone(),
        };
        place
            .save(run_dir)
            .map_err(|e| spawn_failed(format!("writing the run's environment: {e}")))?;
        let job = Job {
            steps: plan.steps,
            argv: match &launch {
                Some(launch) => launch.argv(&plan.argv),
                None => plan.argv,
            },
            env,
            cwd,
            restart: spec.restart,
            stop_grace: Duration::from_millis(spec.stop_grace_ms),
            spot_signal,
            checkpoints,
            storage: None,
            pusher: None,
            env_notice,
            save_env,
            // Not in the place file: secrets never reach the agent's disk.
            secrets,
        };
        Ok((job, storage_plan))
    }

    /// An automatic setup that builds a venv reuses a saved one with the same key: the
    /// run gets a clone and its setup steps are dropped. Otherwise the venv it builds is
    /// saved for later runs. Returns the notice to show and what to save.
    fn reuse_env(
        &self,
        spec: &RunSpec,
        plan: &mut setup::Plan,
        facts: &setup::Facts,
        run_dir: &Path,
        cwd: &Path,
    ) -> (Option<String>, Option<SaveEnv>) {
        let builds_venv = plan.env.iter().any(|(k, _)| k == "VIRTUAL_ENV");
        if !matches!(spec.setup, protocol::Setup::Auto) || plan.steps.is_empty() || !builds_venv {
            return (None, None);
        }
        let key = setup::env_key(plan, facts, run_dir, cwd);
        let envs = self.workspace.envs.clone();
        let venv = run_dir.join("venv");
        if let Some(saved) = envs.find(&key) {
            match envs.clone_env(&saved, &venv, cwd) {
                Ok(()) => {
                    plan.steps.clear();
                    let notice = format!(
                        "runctl: environment reused (built {} for {})",
                        envs::ago(crate::eventlog::now_ms(), saved.built_at_ms),
                        saved.built_for
                    );
                    return (Some(notice), None);
                }
                Err(e) => tracing::warn!("cloning environment {key}: {e}; setting up afresh"),
            }
        }
        let save = SaveEnv {
            envs,
            key,
            run: spec.run.clone(),
            venv,
            project: cwd.to_owned(),
        };
        (None, Some(save))
    }

    /// Tells every active run about a spot interruption: the notice goes in its log and
    /// its process group gets its spot signal.
    pub fn interrupt_all(&self, action: &str, time: &str) {
        for entry in self.lock().values() {
            if entry.log.cursor().ended {
                continue;
            }
            let Some(handle) = &entry.stop else { continue };
            let signal = handle.spot_signal() as i32;
            let notice = Notice::SpotInterruption {
                action: action.to_owned(),
                time: time.to_owned(),
                signal,
            };
            if let Err(e) = entry.log.append(EventKind::Notice(notice)) {
                tracing::warn!("run log write failed: {e}");
            }
            handle.interrupt();
        }
    }

    /// Where handed-over store credentials go; `None` when the host has its own.
    pub fn handed(&self) -> Option<&Handed> {
        self.handed.as_ref()
    }

    /// The host is going away within `bound` (a pod's PID 1 got SIGTERM; SIGKILL
    /// follows): every active run gets its spot signal at once, and most of `bound` to end
    /// (its checkpoint upload going on meanwhile); the rest is for its last events to reach
    /// a controller, if the link allows.
    pub async fn interrupt_before_kill(&self, bound: Duration) {
        let start = tokio::time::Instant::now();
        let active: Vec<(RunId, Arc<EventLog>)> = self
            .lock()
            .iter()
            .filter(|(_, e)| !e.log.cursor().ended)
            .map(|(run, e)| (run.clone(), e.log.clone()))
            .collect();
        self.interrupt_all("pod-stop", &crate::lifecycle::rfc3339_now());
        let ended_by = start + bound.mul_f32(0.7);
        for (_, log) in &active {
            let mut cursor = log.subscribe();
            if tokio::time::timeout_at(ended_by, cursor.wait_for(|c| c.ended))
                .await
                .is_err()
            {
                tracing::warn!("runs still active {bound:?} after the interruption");
                break;
            }
        }
        for (run, _) in &active {
            let left = (start + bound).saturating_duration_since(tokio::time::Instant::now());
            self.wait_delivered(run, left).await;
        }
    }

    /// Records a notice in every active run's log.
    pub fn notify_all(&self, notice: Notice) {
        for entry in self.lock().values() {
            if !entry.log.cursor().ended
                && let Err(e) = entry.log.append(EventKind::Notice(notice.clone()))
            {
                tracing::warn!("run log write failed: {e}");
            }
        }
    }

    /// The controller has stored `run`'s events through `seq`: once that covers the whole
    /// of an ended log, the run is marked so pruning may delete the log.
    pub fn mark_stored(&self, run: &RunId, seq: u64) {
        let Some(log) = self.log(run) else { return };
        let cursor = log.cursor();
        if !cursor.ended || seq < cursor.last_seq {
            return;
        }
        let mark = self.run_dir(run).join(crate::workspace::STORED_MARK);
        if !mark.exists()
            && let Err(e) = std::fs::write(&mark, b"")
        {
            tracing::warn!(%run, "marking the run's log as stored: {e}");
        }
    }

    /// Records that a connection took the run's events through `seq`.
    pub fn mark_delivered(&self, run: &RunId, seq: u64) {
        self.delivered
            .lock()
            .expect("delivery lock is never poisoned")
            .insert(run.clone(), seq);
        self.delivered_changed.notify_waiters();
    }

    /// Waits (at most `bound`) until every event of `run` was handed to a controller.
    pub async fn wait_delivered(&self, run: &RunId, bound: Duration) {
        let Some(log) = self.log(run) else { return };
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let changed = self.delivered_changed.notified();
            let delivered = self
                .delivered
                .lock()
                .expect("delivery lock is never poisoned")
                .get(run)
                .copied()
                .unwrap_or(0);
            if delivered >= log.cursor().last_seq {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                tracing::warn!(
                    "run {run}'s last events did not reach the controller within {bound:?}; they stay on this disk"
                );
                return;
            }
        }
    }

    /// The process groups of active runs, for the stats sampler.
    pub fn process_groups(&self) -> Vec<(RunId, u32)> {
        self.lock()
            .iter()
            .filter_map(|(run, e)| Some((run.clone(), e.stop.as_ref()?.process_group()?)))
            .collect()
    }

    /// Restarts a running run's process (SIGTERM, SIGKILL after `grace`, start again).
    pub async fn restart(&self, run: &RunId) -> Result<u32, WireError> {
        let handle = {
            let entries = self.lock();
            match entries.get(run) {
                Some(Entry {
                    stop: Some(handle),
                    log,
                }) if !log.cursor().ended => handle.clone(),
                _ => {
                    return Err(WireError::new(
                        ErrorKind::RunFailed,
                        format!("run {run} is not running, so it cannot be restarted"),
                    ));
                }
            }
        };
        handle
            .restart()
            .await
            .map_err(|m| WireError::new(ErrorKind::RunFailed, format!("restarting {run}: {m}")))
    }

    /// Stops one run: SIGTERM to its process group, SIGKILL after `grace`.
    pub fn stop(&self, run: &RunId, grace: Option<Duration>) -> Result<(), WireError> {
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
    pub async fn stop_all(&self, grace: Option<Duration>) {
        let active: Vec<(Arc<EventLog>, Option<Handle>)> = self
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
        // A run's end also waits for its checkpoints to reach the store.
        let bound = grace.unwrap_or(STOP_ALL_BOUND) + Duration::from_secs(5) + pusher::FINISH_BOUND;
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

/// How long stopping every run (each with its own grace period) may take.
const STOP_ALL_BOUND: Duration = Duration::from_secs(600);

use crate::workspace::{CHECKPOINT_DIR, LOG_DIR};

/// An environment entry the OS can carry: a non-empty name without `=` or NUL, a value
/// without NUL.
fn check_env(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() || key.contains(['=', '\0']) {
        return Err(format!(
            "{key:?} is not a valid environment variable name (no '=' or NUL, not empty)"
        ));
    }
    if value.contains('\0') {
        return Err(format!("the value of {key} contains a NUL byte"));
    }
    Ok(())
}

fn internal(path: &Path, e: std::io::Error) -> WireError {
    WireError::new(ErrorKind::Internal, format!("{}: {e}", path.display()))
}

/// Ends a run whose supervisor is gone: kills what is left of its process group and
/// records the loss.
fn end_lost_run(log: &EventLog) {
    kill_lost_process(log);
    record_lost(log);
}

/// Kills what is left of a run the agent lost track of (its last started process group).
fn kill_lost_process(log: &EventLog) {
    let pid = log.reader(0).ok().and_then(|mut reader| {
        reader
            .read_batch(u64::MAX, usize::MAX)
            .ok()?
            .into_iter()
            .rev()
            .find_map(|e| {
                let EventKind::Started { pid, .. } = e.kind else {
                    return None;
                };
                Some(pid)
            })
    });
    if let Some(pid) = pid {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

fn record_lost(log: &EventLog) {
    let message =
        "the agent restarted while this run was active; its process was stopped".to_owned();
    if let Err(e) = log.append(EventKind::Ended(RunEnd::Lost { message })) {
        tracing::warn!("run log write failed: {e}");
    }
}

/// A lost run that pushes checkpoints: its process is killed, then every checkpoint it
/// saved that the store lacks is uploaded (recorded in its log), then it ends as `Lost`.
fn finish_lost_run(
    run_dir: PathBuf,
    saved: Vec<u8>,
    log: Arc<EventLog>,
    handed: Option<storage::handed::RunCredentials>,
) {
    kill_lost_process(&log);
    tokio::spawn(async move {
        let pushed = async {
            let saved: data::Saved = serde_json::from_slice(&saved)?;
            let conn = storage::connect_handed(
                &(&saved.storage).into(),
                storage::dns::Dns::Hickory,
                handed,
            )
            .await?;
            let url = storage::ObjectUrl::parse(&saved.checkpoints.dest)?;
            let engine = data::engine(&conn, &url).map_err(anyhow::Error::msg)?;
            let dir = run_dir.join(CHECKPOINT_DIR);
            let pusher = Pusher::start(&dir, engine, url, saved.checkpoints.keep, log.clone())?;
            pusher.finish(crate::pusher::Finish::All).await;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = pushed {
            tracing::error!(
                "pushing the checkpoints of lost run {}: {e:#}",
                run_dir.display()
            );
        }
        record_lost(&log);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_entries_the_os_cannot_carry_are_refused() {
        assert!(check_env("SEED", "3").is_ok());
        assert!(check_env("A_B", "").is_ok());
        let refused = [("", "x"), ("A=B", "x"), ("A\0", "x"), ("A", "x\0y")];
        for (key, value) in refused {
            assert!(check_env(key, value).is_err(), "{key:?}={value:?}");
        }
    }
}
