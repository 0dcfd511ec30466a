//! Checkpoint push-on-save: watches a run's checkpoint dir (inotify through `notify`) and
//! uploads each checkpoint the moment it is saved, newest first, without the trainer
//! waiting on it.
//!
//! What counts as saved: a top-level file closed after writing, or renamed into place; a
//! top-level directory renamed into place, or one that has been quiet for [`QUIET`]. Names
//! that look temporary (hidden, `*.tmp`, `*.partial`, ...) are never uploaded. A file that
//! changes while it is being read is not recorded and goes again. One saved while its disk
//! filled may be cut short (`checkpoints::cut_short`): it is renamed `NAME.incomplete` and
//! never uploaded. Every upload ends with
//! the checkpoint's record and `LATEST` (see `storage::checkpoints`); retention then prunes.
//! At start the dir is rescanned against the records in the store, so what a previous
//! agent did not finish is uploaded now; at the end of the run [`Pusher::finish`] rescans
//! and drains the queue before the run's `Ended` is written.
//!
//! Up to [`IN_FLIGHT`] checkpoints upload at once, newest first, so a save never waits
//! behind an older one still uploading: on a spot interruption the checkpoint saved on the
//! signal goes out alongside the big one saved a minute before, and the end of an
//! interrupted run waits only for the newest ([`Finish::Newest`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{EventKind as FsEvent, RecursiveMode, Watcher};
use protocol::{CheckpointEvent, CheckpointOutcome, EventKind};
use storage::checkpoints::{self, CheckpointRecord};
use storage::transfer::Engine;
use storage::{ObjectUrl, Store, StoreError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::checkpoints::is_temporary;
use crate::eventlog::EventLog;

/// A directory checkpoint counts as saved once nothing in it has changed for this long.
pub const QUIET: Duration = Duration::from_secs(2);
/// How long the end of a run waits for its checkpoints to reach the store.
pub const FINISH_BOUND: Duration = Duration::from_secs(600);
const TICK: Duration = Duration::from_millis(250);
/// Checkpoints uploading at once (their parts share the engine's concurrency).
pub const IN_FLIGHT: usize = 2;

/// What the end of a run waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Every checkpoint saved is in the store.
    All,
    /// The newest checkpoint saved is in the store (the host is going away: older ones
    /// still uploading go on while it lasts, and a later start of the agent uploads them).
    Newest,
}

/// The push side of one run's checkpoint dir.
#[derive(Debug, Clone)]
pub struct Pusher {
    tx: mpsc::UnboundedSender<(Finish, oneshot::Sender<()>)>,
}

impl Pusher {
    /// Starts watching `dir` and pushing to `dest` (the run's prefix); `keep` > 0 prunes
    /// to that many complete checkpoints after each upload.
    pub fn start(
        dir: &Path,
        engine: Engine<Store>,
        dest: ObjectUrl,
        keep: u32,
        log: Arc<EventLog>,
    ) -> anyhow::Result<Pusher> {
        let (fs_tx, fs_rx) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            let _ = fs_tx.send(event);
        })?;
        watcher.watch(dir, RecursiveMode::Recursive)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let state = State {
            dir: dir.to_owned(),
            engine,
            prefix: dest.as_prefix(),
            dest,
            keep,
            log,
            pending: HashMap::new(),
            dirty: HashMap::new(),
            uploaded: HashMap::new(),
            failures: HashMap::new(),
            order: 0,
            newest: None,
            in_store: in_store(dir),
        };
        tokio::spawn(state.run(watcher, fs_rx, rx));
        Ok(Pusher { tx })
    }

    /// Rescans the dir, uploads what `what` asks for, and returns when done (or after a
    /// bound; what is left stays on disk for the next start of the agent).
    pub async fn finish(&self, what: Finish) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send((what, tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

struct State {
    dir: PathBuf,
    engine: Engine<Store>,
    dest: ObjectUrl,
    prefix: String,
    keep: u32,
    log: Arc<EventLog>,
    /// Saved checkpoints waiting for upload, with their order (higher = newer).
    pending: HashMap<String, u64>,
    /// Directory checkpoints being written, with their last change.
    dirty: HashMap<String, Instant>,
    /// What the store holds, or held until retention pruned it: name -> (bytes, save time).
    uploaded: HashMap<String, (u64, i64)>,
    /// Failed uploads: name -> (failures so far, not before).
    failures: HashMap<String, (u32, Instant)>,
    order: u64,
    /// The checkpoint saved last (the highest order given).
    newest: Option<String>,
    /// Complete in the store now: name -> (bytes, save time), kept in `PUSHED_FILE`.
    in_store: std::collections::BTreeMap<String, (u64, i64)>,
}

/// Beside a run's checkpoint dir: the checkpoints complete in the store, as
/// `{name: [bytes, saved_ms]}`. A local checkpoint whose size and save time still match
/// its entry may be deleted from the instance's disk once the run has ended.
pub const PUSHED_FILE: &str = "checkpoints.pushed.json";

fn pushed_path(dir: &Path) -> Option<PathBuf> {
    Some(dir.parent()?.join(PUSHED_FILE))
}

/// The checkpoints of the run whose checkpoint dir is `dir` that are in the store.
pub fn in_store(dir: &Path) -> std::collections::BTreeMap<String, (u64, i64)> {
    pushed_path(dir)
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Whether the end of a run has what `what` waits for: `waiting`, whether any checkpoint
/// is still pending or uploading; `newest_waiting`, whether the one saved last is.
pub fn finished(what: Finish, waiting: bool, newest_waiting: bool) -> bool {
    match what {
        Finish::All => !waiting,
        Finish::Newest => !newest_waiting,
    }
}

type Uploaded = (String, Result<CheckpointRecord, StoreError>);

impl State {
    async fn run(
        mut self,
        _watcher: notify::RecommendedWatcher,
        mut fs: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
        mut finish: mpsc::UnboundedReceiver<(Finish, oneshot::Sender<()>)>,
    ) {
        match checkpoints::list(self.engine.store(), &self.prefix).await {
            Ok(records) => {
                for r in records {
                    self.uploaded.insert(r.name, (r.bytes, r.saved_ms));
                }
            }
            Err(e) => tracing::warn!("listing the checkpoints in {}: {e}", self.dest),
        }
        self.rescan(false);
        let mut inflight: tokio::task::JoinSet<Uploaded> = tokio::task::JoinSet::new();
        let mut uploading: Vec<String> = Vec::new();
        let mut finishing: Option<(Finish, oneshot::Sender<()>, Instant)> = None;
        let mut tick = tokio::time::interval(TICK);
        loop {
            while uploading.len() < IN_FLIGHT
                && let Some(name) = self.next_upload(&uploading, &mut inflight)
            {
                uploading.push(name);
            }
            if let Some((what, reply, deadline)) = finishing.take() {
                if self.finished(what, &uploading) {
                    let _ = reply.send(());
                    // What still uploads goes on while the host lasts.
                    inflight.detach_all();
                    return;
                }
                if Instant::now() >= deadline {
                    let left: Vec<_> = self.pending.keys().chain(&uploading).cloned().collect();
                    tracing::error!(
                        "checkpoints not uploaded within {FINISH_BOUND:?}, left on disk for the agent's next start: {left:?}"
                    );
                    let _ = reply.send(());
                    inflight.detach_all();
                    return;
                }
                finishing = Some((what, reply, deadline));
            }
            tokio::select! {
                Some(event) = fs.recv() => match event {
                    Ok(event) => self.on_event(event),
                    Err(e) => tracing::warn!("watching {}: {e}", self.dir.display()),
                },
                Some((what, reply)) = finish.recv() => {
                    self.rescan(true);
                    finishing = Some((what, reply, Instant::now() + FINISH_BOUND));
                }
                Some(done) = inflight.join_next(), if !inflight.is_empty() => match done {
                    Ok((name, result)) => {
                        uploading.retain(|n| *n != name);
                        self.on_done(name, result).await;
                    }
                    Err(e) => {
                        // Not expected (an upload task panicked): forget what it held, and
                        // the next rescan queues it again.
                        tracing::error!("a checkpoint upload task failed: {e}");
                        uploading.retain(|n| self.pending.contains_key(n));
                    }
                },
                _ = tick.tick() => {
                    let quiet: Vec<String> = self
                        .dirty
                        .iter()
                        .filter(|(_, at)| at.elapsed() >= QUIET)
                        .map(|(name, _)| name.clone())
                        .collect();
                    for name in quiet {
                        self.dirty.remove(&name);
                        self.ready(&name, true);
                    }
                }
            }
        }
    }

    /// Whether the end of the run has what `what` waits for, with `uploading` in flight.
    fn finished(&self, what: Finish, uploading: &[String]) -> bool {
        let waiting = |name: &String| self.pending.contains_key(name) || uploading.contains(name);
        finished(
            what,
            !self.pending.is_empty() || !uploading.is_empty(),
            self.newest.as_ref().is_some_and(waiting),
        )
    }

    /// The top-level name an event path belongs to, and whether it is that entry itself.
    fn name_of(&self, path: &Path) -> Option<(String, bool)> {
        let rel = path.strip_prefix(&self.dir).ok()?;
        let mut parts = rel.components();
        let name = parts.next()?.as_os_str().to_str()?.to_owned();
        if is_temporary(&name) {
            return None;
        }
        Some((name, parts.next().is_none()))
    }

    fn on_event(&mut self, event: notify::Event) {
        let paths: Vec<&PathBuf> = match event.kind {
            // For a rename within the dir, only where it went matters.
            FsEvent::Modify(ModifyKind::Name(RenameMode::Both)) => {
                event.paths.last().into_iter().collect()
            }
            FsEvent::Modify(ModifyKind::Name(RenameMode::From)) => return,
            _ => event.paths.iter().collect(),
        };
        for path in paths {
            let Some((name, top)) = self.name_of(path) else {
                continue;
            };
            match event.kind {
                FsEvent::Access(AccessKind::Close(AccessMode::Write)) if top => {
                    self.ready(&name, true)
                }
                FsEvent::Modify(ModifyKind::Name(_)) if top => {
                    // Renamed into place: a whole file, or a whole directory.
                    self.dirty.remove(&name);
                    self.ready(&name, true);
                }
                FsEvent::Create(CreateKind::Folder) if top => {
                    self.dirty.insert(name, Instant::now());
                }
                FsEvent::Create(_) | FsEvent::Modify(_) | FsEvent::Access(AccessKind::Close(_))
                    if !top =>
                {
                    self.dirty.insert(name, Instant::now());
                }
                _ => {}
            }
        }
    }

    /// Marks `name` saved, unless the store already holds this very version, or (`just_saved`:
    /// it was saved a moment ago, not found at the agent's start) the disk filled as it
    /// was saved.
    fn ready(&mut self, name: &str, just_saved: bool) {
        let path = self.dir.join(name);
        let Ok(local) = checkpoints::local_files(name, &path) else {
            return; // gone already
        };
        if self.uploaded.get(name) == Some(&(local.bytes, local.saved_ms)) {
            return;
        }
        let free = just_saved
            .then(|| crate::usage::free_and_total(&self.dir).ok().map(|(f, _)| f))
            .flatten();
        if crate::checkpoints::cut_short(free) {
            self.set_aside(name, free.unwrap_or(0));
            return;
        }
        self.order += 1;
        self.pending.insert(name.to_owned(), self.order);
        self.newest = Some(name.to_owned());
    }

    /// Queues every checkpoint in the dir the store lacks, oldest first so the newest gets
    /// the highest order; with `all`, directories still changing count as saved too (the
    /// run is over: they are as complete as they will get), and a full disk sets a save
    /// aside as it would on its event. At the agent's start (not `all`) the disk's state
    /// now says nothing of how a file was written then.
    fn rescan(&mut self, all: bool) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut found: Vec<(i64, String)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_owned();
                if is_temporary(&name) || (!all && self.dirty.contains_key(&name)) {
                    return None;
                }
                let local = checkpoints::local_files(&name, &e.path()).ok()?;
                Some((local.saved_ms, name))
            })
            .collect();
        found.sort();
        if self.keep > 0 {
            // Older ones would only be pruned again.
            let skip = found.len().saturating_sub(self.keep as usize);
            found.drain(..skip);
        }
        for (_, name) in found {
            self.dirty.remove(&name);
            self.ready(&name, all);
        }
    }

    /// Starts, in `inflight`, the upload of the newest pending checkpoint whose retry time
    /// has come and that is not `uploading` already; its name.
    fn next_upload(
        &mut self,
        uploading: &[String],
        inflight: &mut tokio::task::JoinSet<Uploaded>,
    ) -> Option<String> {
        let now = Instant::now();
        let name = loop {
            let name = self
                .pending
                .iter()
                .filter(|(name, _)| !uploading.contains(*name))
                .filter(|(name, _)| self.failures.get(*name).is_none_or(|(_, at)| *at <= now))
                .max_by_key(|(_, order)| **order)
                .map(|(name, _)| name.clone())?;
            self.pending.remove(&name);
            // Saved twice while an upload of it ran (a close and a rename): once is enough.
            let stamp = checkpoints::local_files(&name, &self.dir.join(&name))
                .ok()
                .map(|local| (local.bytes, local.saved_ms));
            if stamp.is_some() && self.uploaded.get(&name) != stamp.as_ref() {
                break name;
            }
        };
        let (engine, prefix, path, key) = (
            self.engine.clone(),
            self.prefix.clone(),
            self.dir.join(&name),
            name.clone(),
        );
        inflight.spawn(async move {
            let result = checkpoints::push(&engine, &prefix, &key, &path).await;
            (key, result)
        });
        Some(name)
    }

    async fn on_done(&mut self, name: String, result: Result<CheckpointRecord, StoreError>) {
        let url = self.dest.join(&name).to_string();
        match result {
            Ok(record) => {
                self.failures.remove(&name);
                self.uploaded
                    .insert(name.clone(), (record.bytes, record.saved_ms));
                self.in_store
                    .insert(name.clone(), (record.bytes, record.saved_ms));
                self.save_in_store();
                // From the save (the file's modification time) to now, with LATEST written.
                let ms = (crate::eventlog::now_ms() as i64 - record.saved_ms).max(0) as u64;
                self.append(CheckpointEvent {
                    name: name.clone(),
                    url,
                    bytes: record.bytes,
                    files: record.files.len() as u32,
                    outcome: CheckpointOutcome::Uploaded { ms },
                });
                if self.keep > 0 {
                    self.prune().await;
                }
            }
            Err(StoreError::SourceChanged { .. }) => {
                // Being written again: its next save (or the next tick) queues it.
                self.order += 1;
                self.pending.insert(name, self.order);
            }
            Err(e) if !self.dir.join(&name).exists() => {
                tracing::info!("checkpoint {name} was deleted before its upload finished: {e}");
            }
            Err(e) => {
                let failures = self.failures.get(&name).map_or(0, |(n, _)| *n) + 1;
                let delay = Duration::from_secs(1 << failures.min(6)).min(Duration::from_secs(60));
                self.failures
                    .insert(name.clone(), (failures, Instant::now() + delay));
                self.order += 1;
                self.pending.insert(name.clone(), self.order);
                self.append(CheckpointEvent {
                    name,
                    url,
                    bytes: 0,
                    files: 0,
                    outcome: CheckpointOutcome::Failed {
                        message: format!("{e} (trying again in {}s)", delay.as_secs()),
                    },
                });
            }
        }
    }

    /// Renames a checkpoint that may be cut short out of the way, and says so.
    fn set_aside(&mut self, name: &str, free: u64) {
        let aside = crate::checkpoints::set_aside_name(name);
        let kept = match std::fs::rename(self.dir.join(name), self.dir.join(&aside)) {
            Ok(()) => format!("kept on the instance as {aside}"),
            Err(e) => format!("setting it aside as {aside} failed: {e}"),
        };
        self.pending.remove(name);
        self.append(CheckpointEvent {
            name: name.to_owned(),
            url: self.dest.join(name).to_string(),
            bytes: 0,
            files: 0,
            outcome: CheckpointOutcome::Failed {
                message: format!(
                    "its disk was full as it was saved ({} free in {}), so it may be cut short: it is not uploaded, and is {kept}. Free space on the instance and save again",
                    protocol::agent_config::DiskSize::Bytes(free),
                    self.dir.display()
                ),
            },
        });
    }

    async fn prune(&mut self) {
        match checkpoints::prune(&self.engine, &self.prefix, self.keep as usize).await {
            Ok(pruned) => {
                for name in &pruned.deleted {
                    self.in_store.remove(name);
                }
                self.save_in_store();
                for name in pruned.deleted {
                    self.append(CheckpointEvent {
                        url: self.dest.join(&name).to_string(),
                        name,
                        bytes: 0,
                        files: 0,
                        outcome: CheckpointOutcome::Pruned,
                    });
                }
            }
            Err(e) => tracing::warn!("pruning checkpoints in {}: {e}", self.dest),
        }
    }

    /// Keeps `PUSHED_FILE` beside the checkpoint dir true: what disk pruning may delete.
    fn save_in_store(&self) {
        let Some(path) = pushed_path(&self.dir) else {
            return;
        };
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(
            &tmp,
            serde_json::to_vec(&self.in_store).expect("serializes"),
        )
        .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("writing {}: {e}", path.display());
        }
    }

    fn append(&self, event: CheckpointEvent) {
        if self.log.cursor().ended {
            tracing::info!("checkpoint {}: {:?}", event.name, event.outcome);
            return;
        }
        if let Err(e) = self.log.append(EventKind::Checkpoint(event)) {
            tracing::warn!("run log write failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_end_of_a_run_waits_for() {
        let check = |what, waiting, newest_waiting, expected: bool| {
            assert_eq!(
                finished(what, waiting, newest_waiting),
                expected,
                "{what:?} {waiting} {newest_waiting}"
            );
        };
        check(Finish::All, false, false, true);
        check(Finish::All, true, false, false);
        check(Finish::All, true, true, false);
        // Interrupted: an older checkpoint still uploading does not hold the end back...
        check(Finish::Newest, true, false, true);
        check(Finish::Newest, false, false, true);
        // ...the newest does.
        check(Finish::Newest, true, true, false);
    }
}
