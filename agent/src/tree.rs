//! A run's synced work tree on the agent: the manifest of what it holds (kept true to disk
//! by a stat check before every sync), and applying a delta safely. New content is staged
//! and verified by hash first; then a journal is written and the changes are made while
//! the training process is frozen, so it never sees a half-applied tree. An apply cut
//! short by a crash is rolled forward from the journal the next time the tree is opened.
//! The wire exchange around this lives in `session`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use protocol::codec;
use protocol::delta::{Delta, DeltaError, Op, Source, entry_name};
use protocol::manifest::{ContentHash, Entry, Manifest, PathError};
use protocol::{ErrorKind, WireError};
use serde::{Deserialize, Serialize};

use crate::store::{CopiedOut, Store, TreeRecord};

/// The default bound on the content one sync may unpack.
pub const DEFAULT_MAX_SYNC_BYTES: u64 = 16 * 1024 * 1024 * 1024;
/// Room allowed per tar entry beyond its content: a header and padding.
const TAR_OVERHEAD_BYTES: u64 = 1024;

/// Why a sync was refused or failed. The tree is as it was before, unless said otherwise.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A path or symlink in the delta would leave the work tree.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The delta does not fit this tree (made for another, or inconsistent).
    #[error(transparent)]
    Delta(#[from] DeltaError),
    /// The content stream held something other than the content the delta names.
    #[error("refused content stream: {0}")]
    Stream(String),
    /// The decompressed stream grew past its bound.
    #[error("refused content stream: it unpacks to more than {limit_bytes} bytes")]
    TooLarge { limit_bytes: u64 },
    /// A file on the instance changed while the sync read it.
    #[error("{path} changed on the instance during the sync; sync again")]
    Changed { path: String },
    /// The delta wants a file where the instance has a directory of files it did not sync.
    #[error(
        "{path} is a directory on the instance holding files runctl did not sync (outputs?); move them away there, or rename {path} locally"
    )]
    Conflict { path: String },
    /// The run has no tree on this agent.
    #[error("run has no synced tree on this agent")]
    NoTree,
    /// The instance's disk has no room for a new run (the message says what takes it).
    #[error("{0}")]
    NoRoom(String),
    /// Reading or writing failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl SyncError {
    pub fn to_wire(&self) -> WireError {
        let kind = match self {
            SyncError::NoTree => ErrorKind::NotFound,
            _ => ErrorKind::SyncFailed,
        };
        WireError::new(kind, self.to_string())
    }
}

fn io_err(context: impl std::fmt::Display) -> impl FnOnce(io::Error) -> SyncError {
    move |source| SyncError::Io {
        context: context.to_string(),
        source,
    }
}

/// What the agent last saw of a file, to tell whether it changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct FileStat {
    size_bytes: u64,
    mtime_ns: i64,
    ino: u64,
    mode: u32,
}

impl FileStat {
    fn of(meta: &fs::Metadata) -> Self {
        FileStat {
            size_bytes: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ino: meta.ino(),
            mode: meta.mode(),
        }
    }
}

/// The persisted state: the manifest and the stats it was checked against.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    manifest: Manifest,
    stats: BTreeMap<String, FileStat>,
}

/// Written after all content is staged and verified, before the tree is touched.
#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    ops: Vec<Op>,
    manifest: Manifest,
}

/// One run's tree: `<run dir>/work`, with its state and scratch space beside it.
#[derive(Debug)]
pub struct Tree {
    run_dir: PathBuf,
    state: State,
    /// The in-memory state is ahead of `tree.state` (see `persist`).
    unsaved: bool,
}

impl Drop for Tree {
    fn drop(&mut self) {
        if let Err(e) = self.persist() {
            tracing::warn!("saving the tree state of {}: {e}", self.run_dir.display());
        }
    }
}

impl Tree {
    pub fn work_dir(run_dir: &Path) -> PathBuf {
        run_dir.join("work")
    }

    fn work(&self) -> PathBuf {
        Self::work_dir(&self.run_dir)
    }

    fn staging(&self) -> PathBuf {
        self.run_dir.join("sync-staging")
    }

    fn journal_path(&self) -> PathBuf {
        self.run_dir.join("sync.journal")
    }

    fn state_path(&self) -> PathBuf {
        self.run_dir.join("tree.state")
    }

    /// Opens a run's tree (creating an empty one when `create`), finishing any apply a
    /// crash cut short.
    pub fn open(run_dir: &Path, create: bool) -> Result<Tree, SyncError> {
        let work = Self::work_dir(run_dir);
        if !work.is_dir() {
            if !create {
                return Err(SyncError::NoTree);
            }
            fs::create_dir_all(&work).map_err(io_err(format!("creating {}", work.display())))?;
        }
        let mut tree = Tree {
            run_dir: run_dir.to_owned(),
            state: State::default(),
            unsaved: false,
        };
        match fs::read(tree.state_path()) {
            Ok(bytes) => match codec::decode_blob(&bytes) {
                Ok(state) => tree.state = state,
                // An unreadable state is rebuilt: an empty manifest makes the controller
                // send everything, which overwrites whatever is there.
                Err(e) => {
                    tracing::warn!("ignoring unreadable {}: {e}", tree.state_path().display())
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io_err(format!("reading {}", tree.state_path().display()))(
                    e,
                ));
            }
        }
        let _ = fs::remove_dir_all(run_dir.join("work.new"));
        tree.roll_forward()?;
        Ok(tree)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.state.manifest
    }

    /// Re-checks the manifest against disk: a file whose stat changed is re-hashed, an
    /// entry that is gone or changed kind is dropped (so the controller sends it again).
    pub fn refresh(&mut self) -> Result<(), SyncError> {
        let work = self.work();
        // Per path: its entry and stat now, or `None` when it must leave the manifest.
        let mut updates: Vec<(String, Option<(Entry, FileStat)>)> = Vec::new();
        for (path, entry) in &self.state.manifest.entries {
            let full = work.join(path);
            let meta = fs::symlink_metadata(&full);
            match (entry, meta) {
                (Entry::File { .. }, Ok(meta)) if meta.is_file() => {
                    let stat = FileStat::of(&meta);
                    if self.state.stats.get(path) == Some(&stat) {
                        continue;
                    }
                    let hash = hash_file(&full)?;
                    let now = Entry::File {
                        hash,
                        size_bytes: meta.len(),
                        executable: is_executable(meta.mode()),
                    };
                    updates.push((path.clone(), Some((now, stat))));
                }
                (Entry::Symlink { target }, Ok(meta)) if meta.is_symlink() => {
                    let now = fs::read_link(&full).map_err(io_err(format!("reading {path}")))?;
                    if now.as_os_str() != target.as_str() {
                        updates.push((path.clone(), None));
                    }
                }
                (Entry::Dir, Ok(meta)) if meta.is_dir() => {}
                _ => updates.push((path.clone(), None)),
            }
        }
        if updates.is_empty() {
            return Ok(());
        }
        for (path, update) in updates {
            match update {
                Some((entry, stat)) => {
                    self.state.stats.insert(path.clone(), stat);
                    self.state.manifest.entries.insert(path, entry);
                }
                None => {
                    self.state.stats.remove(&path);
                    self.state.manifest.entries.remove(&path);
                }
            }
        }
        self.unsaved = true;
        self.persist()
    }

    /// Applies a sync stream: `stream` is the decompressed stream after the delta header,
    /// i.e. the tar of new content. `freeze` stops the training process for the swap.
    /// New content also goes into `store`, when given, for later runs' trees.
    pub fn apply<F, G>(
        &mut self,
        delta: &Delta,
        stream: &mut Limited<impl Read>,
        max_bytes: u64,
        store: Option<&Store>,
        freeze: F,
    ) -> Result<(), SyncError>
    where
        F: FnOnce() -> G,
    {
        let next = delta.apply_to(&self.state.manifest)?;
        let summary = delta.summary();
        if summary.stream_bytes > max_bytes {
            return Err(SyncError::TooLarge {
                limit_bytes: max_bytes,
            });
        }
        stream
            .set_remaining(summary.stream_bytes + TAR_OVERHEAD_BYTES * (summary.stream_files + 2));
        if self.is_empty() {
            return self.apply_fresh(delta, next, stream, store, freeze);
        }
        self.check_conflicts(delta)?;
        let staging = self.staging();
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).map_err(io_err(format!("creating {}", staging.display())))?;
        let started = std::time::Instant::now();
        let mut staged = Staged::new(delta);
        let received = self
            .receive(delta, stream, &mut staged, &|hash, _| {
                staging.join(hash.to_hex())
            })
            .and_then(|bytes| self.stage_copies(delta, &mut staged).map(|()| bytes));
        let received_bytes = match received {
            Ok(bytes) => bytes,
            Err(e) => {
                // Nothing was applied: what arrived goes now, not at the next sync.
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        if let Some(store) = store {
            let ingest = delta
                .stream_order()
                .into_iter()
                .map(|(hash, _, _)| (hash, staging.join(hash.to_hex())));
            ingest_all(store, ingest);
        }
        let staged_ms = started.elapsed().as_millis() as u64;

        let journal = Journal {
            ops: delta.ops.clone(),
            manifest: next,
        };
        write_atomically(
            &self.journal_path(),
            &codec::encode_blob(&journal).map_err(|e| SyncError::Stream(e.to_string()))?,
            Durability::Synced,
        )?;
        let executed = {
            let _frozen = freeze();
            execute(&self.work(), &staging, &journal.ops, &staged.stats)
        };
        let placed = match executed {
            Ok(placed) => placed,
            Err(e) => {
                // Part applied: make the manifest true to disk, so the next sync repairs it.
                self.finish(journal, None)?;
                self.refresh()?;
                self.persist()?;
                return Err(e);
            }
        };
        let swapped_ms = started.elapsed().as_millis() as u64;
        self.finish(journal, Some(placed))?;
        tracing::debug!(
            staged_ms,
            swapped_ms,
            done_ms = started.elapsed().as_millis() as u64,
            ops = delta.ops.len(),
            received_bytes,
            "sync applied"
        );
        Ok(())
    }

    /// Fills an empty tree with the tree `record` describes, from the store (reflinks or
    /// verified copies, never hard links). Returns false, the tree left empty, when the
    /// tree is not empty or the store cannot provide all of it.
    pub fn seed(&mut self, store: &Store, record: &TreeRecord) -> Result<bool, SyncError> {
        if !self.is_empty() {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let new = self.run_dir.join("work.new");
        let _ = fs::remove_dir_all(&new);
        fs::create_dir_all(&new).map_err(io_err(format!("creating {}", new.display())))?;
        let mut reflinked = 0usize;
        let built = (|| -> io::Result<BTreeMap<String, FileStat>> {
            // Directories and links first, one thread; then the files, copied by several
            // (a copy is hashing and writing: it scales with the cores).
            let mut files = Vec::new();
            for (path, entry) in &record.manifest.entries {
                let full = new.join(path);
                match entry {
                    Entry::Dir => fs::create_dir_all(&full)?,
                    Entry::Symlink { target } => {
                        ensure_parent(&full)?;
                        std::os::unix::fs::symlink(target, &full)?;
                    }
                    Entry::File {
                        hash, executable, ..
                    } => {
                        ensure_parent(&full)?;
                        files.push((path, full, hash, file_mode(*executable)));
                    }
                }
            }
            let workers = std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, SEED_THREADS);
            let per = files.len().div_ceil(workers).max(1);
            let copied: Vec<io::Result<Vec<(String, FileStat, CopiedOut)>>> =
                std::thread::scope(|scope| {
                    let handles: Vec<_> = files
                        .chunks(per)
                        .map(|chunk| {
                            scope.spawn(move || {
                                let mut buf = vec![0u8; 256 * 1024];
                                chunk
                                    .iter()
                                    .map(|(path, full, hash, mode)| {
                                        let (how, meta) =
                                            store.copy_out(hash, full, *mode, &mut buf)?;
                                        Ok(((*path).clone(), FileStat::of(&meta), how))
                                    })
                                    .collect()
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("a seeding thread does not panic"))
                        .collect()
                });
            let mut stats = BTreeMap::new();
            for part in copied {
                for (path, stat, how) in part? {
                    reflinked += usize::from(how == CopiedOut::Reflinked);
                    stats.insert(path, stat);
                }
            }
            Ok(stats)
        })();
        let stats = match built {
            Ok(stats) => stats,
            Err(e) => {
                tracing::warn!(
                    "seeding {} from the store failed ({e}); the sync sends it all",
                    self.run_dir.display()
                );
                let _ = fs::remove_dir_all(&new);
                return Ok(false);
            }
        };
        let work = self.work();
        move_entries(&new, &work).map_err(io_err("putting the seeded tree in place"))?;
        let _ = fs::remove_dir(&new);
        self.state.manifest = record.manifest.clone();
        self.state.stats = stats;
        self.unsaved = true;
        self.persist()?;
        tracing::debug!(
            done_ms = started.elapsed().as_millis() as u64,
            files = record.manifest.files().count(),
            reflinked,
            from = %record.run,
            "tree seeded from the store"
        );
        Ok(true)
    }

    /// Whether the tree holds nothing at all, synced or not.
    fn is_empty(&self) -> bool {
        self.state.manifest.entries.is_empty()
            && fs::read_dir(self.work()).is_ok_and(|mut d| d.next().is_none())
    }

    /// The first sync of a tree: the whole tree is built beside the empty one, each file
    /// written straight to its place and verified, and then its top-level entries are
    /// moved in (a handful of renames, the process frozen meanwhile) instead of renaming
    /// every file. Nothing to journal: a move cut short leaves a tree the state does not
    /// describe yet, which the next sync overwrites as a whole.
    fn apply_fresh<F, G>(
        &mut self,
        delta: &Delta,
        next: Manifest,
        stream: &mut Limited<impl Read>,
        store: Option<&Store>,
        freeze: F,
    ) -> Result<(), SyncError>
    where
        F: FnOnce() -> G,
    {
        let started = std::time::Instant::now();
        let new = self.run_dir.join("work.new");
        let _ = fs::remove_dir_all(&new);
        fs::create_dir_all(&new).map_err(io_err(format!("creating {}", new.display())))?;
        let built = self.build_fresh(delta, stream, &new);
        let placed = match built {
            Ok(placed) => placed,
            Err(e) => {
                let _ = fs::remove_dir_all(&new);
                return Err(e);
            }
        };
        if let Some(store) = store {
            let ingest = delta
                .stream_order()
                .into_iter()
                .map(|(hash, _, path)| (hash, new.join(path)));
            ingest_all(store, ingest);
        }
        let work = self.work();
        let moved = {
            let _frozen = freeze();
            move_entries(&new, &work)
        };
        moved.map_err(io_err("putting the new tree in place"))?;
        let _ = fs::remove_dir(&new);
        let journal = Journal {
            ops: Vec::new(),
            manifest: next,
        };
        self.state.stats = placed;
        self.finish(journal, Some(HashMap::new()))?;
        tracing::debug!(
            done_ms = started.elapsed().as_millis() as u64,
            ops = delta.ops.len(),
            "fresh tree built"
        );
        Ok(())
    }

    fn build_fresh(
        &self,
        delta: &Delta,
        stream: &mut Limited<impl Read>,
        new: &Path,
    ) -> Result<BTreeMap<String, FileStat>, SyncError> {
        for op in &delta.ops {
            match op {
                Op::Mkdir { path } => fs::create_dir_all(new.join(path))
                    .map_err(io_err(format!("creating {path}")))?,
                Op::Symlink { path, target } => {
                    let full = new.join(path);
                    ensure_parent(&full)
                        .map_err(io_err(format!("creating the parent of {path}")))?;
                    std::os::unix::fs::symlink(target, &full)
                        .map_err(io_err(format!("linking {path}")))?;
                }
                // Nothing to delete or re-mode in an empty tree; writes come below.
                Op::Delete { .. } | Op::Chmod { .. } | Op::Write { .. } => {}
            }
        }
        let mut staged = Staged::new(delta);
        self.receive(delta, stream, &mut staged, &|_, path| new.join(path))?;
        // Each distinct content was written to its first path; the others get copies.
        let mut first: HashMap<ContentHash, &str> = HashMap::new();
        for (hash, _, path) in delta.stream_order() {
            first.insert(hash, path);
        }
        let mut stats = BTreeMap::new();
        for op in &delta.ops {
            let Op::Write {
                path,
                hash,
                executable,
                ..
            } = op
            else {
                continue;
            };
            let Some(from) = first.get(hash) else {
                // A copy source on an empty tree: `apply_to` refuses those already.
                return Err(SyncError::Stream(format!("no content for {path}")));
            };
            let full = new.join(path);
            if *from == path.as_str() {
                if let Some(stat) = staged.stats.get(hash) {
                    stats.insert(path.clone(), *stat);
                }
                continue;
            }
            ensure_parent(&full).map_err(io_err(format!("creating the parent of {path}")))?;
            fs::copy(new.join(from), &full).map_err(io_err(format!("writing {path}")))?;
            fs::set_permissions(&full, fs::Permissions::from_mode(file_mode(*executable)))
                .map_err(io_err(format!("writing {path}")))?;
            if let Ok(meta) = fs::metadata(&full) {
                stats.insert(path.clone(), FileStat::of(&meta));
            }
        }
        Ok(stats)
    }

    /// Refuses, before anything is touched, a file or symlink that would replace a
    /// directory holding files the sync does not know about.
    fn check_conflicts(&self, delta: &Delta) -> Result<(), SyncError> {
        let work = self.work();
        for op in &delta.ops {
            let (Op::Write { path, .. } | Op::Symlink { path, .. }) = op else {
                continue;
            };
            let full = work.join(path);
            if fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir())
                && holds_untracked(&full, path, &self.state.manifest)
            {
                return Err(SyncError::Conflict { path: path.clone() });
            }
        }
        Ok(())
    }

    /// Reads the content tar, writing the content for (hash, first path) to `dest`'s
    /// answer and verifying it there.
    fn receive(
        &self,
        delta: &Delta,
        stream: &mut Limited<impl Read>,
        staged: &mut Staged,
        dest: &dyn Fn(&ContentHash, &str) -> PathBuf,
    ) -> Result<u64, SyncError> {
        let exceeded = stream.exceeded.clone();
        let limit = stream.remaining;
        let map = |e: io::Error| {
            if exceeded.get() {
                SyncError::TooLarge { limit_bytes: limit }
            } else {
                SyncError::Io {
                    context: "reading the content stream".into(),
                    source: e,
                }
            }
        };
        let mut archive = tar::Archive::new(stream);
        let mut entries = archive.entries().map_err(map)?;
        let mut received = 0;
        for (index, (hash, size_bytes, path)) in delta.stream_order().into_iter().enumerate() {
            let mut entry = entries
                .next()
                .ok_or_else(|| SyncError::Stream(format!("it ended before the content of {path}")))?
                .map_err(map)?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let kind = entry.header().entry_type();
            if kind != tar::EntryType::Regular {
                return Err(SyncError::Stream(format!(
                    "entry {name:?} is a {kind:?} entry; only regular files are accepted"
                )));
            }
            if name != entry_name(index) || entry.size() != size_bytes {
                return Err(SyncError::Stream(format!(
                    "entry {name:?} ({} bytes) is not the content of {path} ({hash}, {size_bytes} bytes)",
                    entry.size()
                )));
            }
            let to = dest(&hash, path);
            let got = staged.put(&mut entry, &to, hash).map_err(|e| match e {
                SyncError::Io { source, context } if context == READING_CONTENT => map(source),
                // The instance's side failed (its disk filled): name the file.
                SyncError::Io { source, .. } => SyncError::Io {
                    context: format!("writing {path} on the instance"),
                    source,
                },
                other => other,
            })?;
            if got != hash {
                let _ = fs::remove_file(&to);
                return Err(SyncError::Stream(format!(
                    "the content sent for {path} does not match its hash (edited during the sync? sync again)"
                )));
            }
            received += size_bytes;
        }
        if let Some(extra) = entries.next() {
            let name = extra
                .map(|e| String::from_utf8_lossy(&e.path_bytes()).into_owned())
                .unwrap_or_default();
            return Err(SyncError::Stream(format!(
                "it holds an entry the delta does not name: {name:?}"
            )));
        }
        Ok(received)
    }

    /// Stages content the agent already has (moved or copied files), verifying it.
    fn stage_copies(&self, delta: &Delta, staged: &mut Staged) -> Result<(), SyncError> {
        for op in &delta.ops {
            let Op::Write {
                hash,
                source: Source::Copy { from },
                ..
            } = op
            else {
                continue;
            };
            if staged.stats.contains_key(hash) {
                continue;
            }
            let to = self.staging().join(hash.to_hex());
            let src = self.work().join(from);
            let mut file = fs::File::open(&src).map_err(io_err(format!("opening {from}")))?;
            if staged.put(&mut file, &to, *hash)? != *hash {
                let _ = fs::remove_file(&to);
                return Err(SyncError::Changed { path: from.clone() });
            }
        }
        Ok(())
    }

    /// Records the journal's manifest as the tree's and clears the journal and staging.
    /// With `placed` (the apply completed), files keep the stats they were placed with;
    /// otherwise the journal's paths get none, so the next refresh checks each on disk.
    fn finish(
        &mut self,
        journal: Journal,
        placed: Option<HashMap<String, FileStat>>,
    ) -> Result<(), SyncError> {
        let work = self.work();
        for op in &journal.ops {
            let path = op.path();
            self.state.stats.remove(path);
            let Some(placed) = &placed else { continue };
            let stat = match op {
                Op::Write { .. } => placed.get(path).copied(),
                Op::Chmod { .. } => fs::symlink_metadata(work.join(path))
                    .ok()
                    .filter(fs::Metadata::is_file)
                    .map(|m| FileStat::of(&m)),
                _ => None,
            };
            if let Some(stat) = stat {
                self.state.stats.insert(path.to_owned(), stat);
            }
        }
        self.state
            .stats
            .retain(|p, _| journal.manifest.entries.contains_key(p));
        self.state.manifest = journal.manifest;
        self.unsaved = true;
        Ok(())
    }

    /// Writes the state, then drops the journal and staging. A successful apply leaves this
    /// to its caller, after it has answered the controller: until then a crash costs only
    /// a replay of the (idempotent) journal or a resend, never a wrong tree, because
    /// `refresh` checks the state against disk before every sync.
    pub fn persist(&mut self) -> Result<(), SyncError> {
        if !self.unsaved {
            return Ok(());
        }
        self.save()?;
        self.unsaved = false;
        let _ = fs::remove_file(self.journal_path());
        let _ = fs::remove_dir_all(self.staging());
        Ok(())
    }

    /// Completes an apply that a crash interrupted after its journal was written.
    fn roll_forward(&mut self) -> Result<(), SyncError> {
        let path = self.journal_path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let _ = fs::remove_dir_all(self.staging());
                return Ok(());
            }
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        let Ok(journal) = codec::decode_blob::<Journal>(&bytes) else {
            // A torn journal means the apply never started: the tree is the old one.
            let _ = fs::remove_file(&path);
            let _ = fs::remove_dir_all(self.staging());
            return Ok(());
        };
        tracing::info!(
            "finishing an interrupted sync in {} ({} changes)",
            self.run_dir.display(),
            journal.ops.len()
        );
        if let Err(e) = execute(&self.work(), &self.staging(), &journal.ops, &HashMap::new()) {
            tracing::warn!("finishing the interrupted sync failed ({e}); the next sync repairs it");
        }
        self.finish(journal, None)?;
        self.refresh()?;
        self.persist()
    }

    fn save(&self) -> Result<(), SyncError> {
        let bytes =
            codec::encode_blob(&self.state).map_err(|e| SyncError::Stream(e.to_string()))?;
        write_atomically(&self.state_path(), &bytes, Durability::Cached)
    }
}

/// Makes the journal's changes. Every step can be repeated, so an interrupted run of this
/// is completed by running it again. Staged files already carry their final mode (see
/// `Staged`), so placing one is a single rename. Returns the stats of the files placed.
fn execute(
    work: &Path,
    staging: &Path,
    ops: &[Op],
    staged_stats: &HashMap<ContentHash, FileStat>,
) -> Result<HashMap<String, FileStat>, SyncError> {
    let mut uses: HashMap<ContentHash, usize> = HashMap::new();
    for op in ops {
        if let Op::Write { hash, .. } = op {
            *uses.entry(*hash).or_default() += 1;
        }
    }
    let mut placed = HashMap::new();
    for op in ops {
        let full = work.join(op.path());
        match op {
            Op::Delete { path } => match fs::symlink_metadata(&full) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("deleting {path}"))(e)),
                Ok(meta) if meta.is_dir() => match fs::remove_dir(&full) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    // It holds files the sync did not create (outputs): they stay.
                    Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                        tracing::info!("kept {path}: it holds files runctl did not sync");
                    }
                    Err(e) => return Err(io_err(format!("deleting {path}"))(e)),
                },
                Ok(_) => remove_file(&full).map_err(io_err(format!("deleting {path}")))?,
            },
            Op::Mkdir { path } => match fs::create_dir(&full) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if !fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir()) {
                        remove_file(&full).map_err(io_err(format!("replacing {path}")))?;
                        fs::create_dir(&full).map_err(io_err(format!("creating {path}")))?;
                    }
                }
                Err(_) => fs::create_dir_all(&full).map_err(io_err(format!("creating {path}")))?,
            },
            Op::Write {
                path,
                hash,
                executable,
                ..
            } => {
                let left = uses.get_mut(hash).expect("counted above");
                *left -= 1;
                let staged = staging.join(hash.to_hex());
                if *left > 0 {
                    if !staged.exists() {
                        continue; // placed before an interruption
                    }
                    // Not the last use: place a copy, with this path's own mode.
                    let tmp = sibling_tmp(&full);
                    ensure_parent(&full)
                        .map_err(io_err(format!("creating the parent of {path}")))?;
                    fs::copy(&staged, &tmp).map_err(io_err(format!("placing {path}")))?;
                    let mode = fs::Permissions::from_mode(file_mode(*executable));
                    fs::set_permissions(&tmp, mode).map_err(io_err(format!("placing {path}")))?;
                    let stat = fs::metadata(&tmp).map(|m| FileStat::of(&m));
                    place(&tmp, &full, path)?;
                    if let Ok(stat) = stat {
                        placed.insert(path.clone(), stat);
                    }
                    continue;
                }
                match place(&staged, &full, path) {
                    Ok(()) => {}
                    Err(SyncError::Io { source, .. })
                        if source.kind() == io::ErrorKind::NotFound && !staged.exists() =>
                    {
                        continue; // placed before an interruption
                    }
                    Err(SyncError::Io { source, .. })
                        if source.kind() == io::ErrorKind::NotFound =>
                    {
                        ensure_parent(&full)
                            .map_err(io_err(format!("creating the parent of {path}")))?;
                        place(&staged, &full, path)?;
                    }
                    Err(e) => return Err(e),
                }
                if let Some(stat) = staged_stats.get(hash) {
                    placed.insert(path.clone(), *stat);
                }
            }
            Op::Symlink { path, target } => {
                ensure_parent(&full).map_err(io_err(format!("creating the parent of {path}")))?;
                let tmp = sibling_tmp(&full);
                std::os::unix::fs::symlink(target, &tmp)
                    .map_err(io_err(format!("linking {path}")))?;
                if let Err(e) = place(&tmp, &full, path) {
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
            }
            Op::Chmod { path, executable } => {
                fs::set_permissions(&full, fs::Permissions::from_mode(file_mode(*executable)))
                    .map_err(io_err(format!("setting the mode of {path}")))?;
            }
        }
    }
    Ok(placed)
}

/// Renames `from` over the tree path `full`; a directory there is a conflict (it can only
/// be one holding files the sync did not create: synced ones were deleted first).
fn place(from: &Path, full: &Path, path: &str) -> Result<(), SyncError> {
    match fs::rename(from, full) {
        Ok(()) => Ok(()),
        Err(e)
            if e.kind() == io::ErrorKind::IsADirectory
                || e.kind() == io::ErrorKind::DirectoryNotEmpty =>
        {
            Err(SyncError::Conflict {
                path: path.to_owned(),
            })
        }
        Err(e) => Err(io_err(format!("placing {path}"))(e)),
    }
}

/// Content staged for an apply, one file per distinct hash, each already given the mode
/// of the last path it will be renamed to; one copy buffer for them all.
struct Staged {
    modes: HashMap<ContentHash, bool>,
    stats: HashMap<ContentHash, FileStat>,
    buf: Vec<u8>,
    /// The directory files were last created in: files arrive grouped by directory, and
    /// creating each relative to an open directory spares the kernel the walk down the
    /// whole path (measured: path lookups were a tenth of a first sync's CPU).
    dir: Option<(PathBuf, std::os::fd::OwnedFd)>,
}

impl Staged {
    fn new(delta: &Delta) -> Self {
        let mut modes = HashMap::new();
        for op in &delta.ops {
            if let Op::Write {
                hash, executable, ..
            } = op
            {
                modes.insert(*hash, *executable);
            }
        }
        Staged {
            modes,
            stats: HashMap::new(),
            buf: vec![0u8; 256 * 1024],
            dir: None,
        }
    }

    /// Creates (or truncates) the file at `path`, relative to its open parent directory.
    fn create(&mut self, path: &Path) -> io::Result<fs::File> {
        use nix::fcntl::{OFlag, open, openat};
        use nix::sys::stat::Mode;
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return fs::File::create(path);
        };
        if self.dir.as_ref().is_none_or(|(p, _)| p != parent) {
            let fd = open(
                parent,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            self.dir = Some((parent.to_owned(), fd));
        }
        let (_, dir) = self.dir.as_ref().expect("just set");
        let fd = openat(
            dir,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o666),
        )?;
        Ok(fs::File::from(fd))
    }

    /// Copies `from` into a new staged file at `to`, returning the content's hash.
    fn put(
        &mut self,
        from: &mut impl Read,
        to: &Path,
        hash: ContentHash,
    ) -> Result<ContentHash, SyncError> {
        let mut out = self
            .create(to)
            .map_err(io_err(format!("creating {}", to.display())))?;
        let mut hasher = blake3::Hasher::new();
        loop {
            let n = match from.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(READING_CONTENT)(e)),
            };
            hasher.update(&self.buf[..n]);
            out.write_all(&self.buf[..n])
                .map_err(io_err(format!("writing {}", to.display())))?;
        }
        let executable = self.modes.get(&hash).copied().unwrap_or(false);
        let mode = file_mode(executable);
        let mut meta = out.metadata().ok();
        // Created as 0666 less the umask: usually already right for a plain file.
        if meta.as_ref().is_none_or(|m| m.mode() & 0o7777 != mode) {
            out.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io_err(format!("writing {}", to.display())))?;
            meta = out.metadata().ok();
        }
        if let Some(meta) = meta {
            self.stats.insert(hash, FileStat::of(&meta));
        }
        Ok(hasher.finalize().into())
    }
}

/// The context of a failure to read content while staging it (the stream, or a local copy
/// source), as opposed to writing it.
const READING_CONTENT: &str = "reading content";

/// The most threads a seed copies files with.
const SEED_THREADS: usize = 8;

/// Moves every top-level entry of `from` into `to` (a handful of renames).
fn move_entries(from: &Path, to: &Path) -> io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        fs::rename(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// Adds verified content to the store, each hash once. A failure (a full disk) costs a
/// later run a resend, never this sync.
fn ingest_all(store: &Store, files: impl IntoIterator<Item = (ContentHash, PathBuf)>) {
    let mut seen = std::collections::HashSet::new();
    for (hash, path) in files {
        if seen.insert(hash)
            && let Err(e) = store.ingest(&path, &hash)
        {
            tracing::warn!("adding {hash} to the store: {e}");
            return;
        }
    }
}

fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn ensure_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.is_dir() => fs::create_dir_all(parent),
        _ => Ok(()),
    }
}

fn sibling_tmp(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.runctl-{:016x}", rand::random::<u64>()))
}

/// Executable for the owner means executable: the same rule the controller uses.
pub fn is_executable(mode: u32) -> bool {
    mode & 0o100 != 0
}

fn file_mode(executable: bool) -> u32 {
    if executable { 0o755 } else { 0o644 }
}

/// Whether the directory at `full` (tree path `rel`) holds anything the manifest lacks.
fn holds_untracked(full: &Path, rel: &str, manifest: &Manifest) -> bool {
    let Ok(dir) = fs::read_dir(full) else {
        return false;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return true;
        };
        let child = format!("{rel}/{name}");
        match manifest.entries.get(&child) {
            None => return true,
            Some(Entry::Dir) => {
                if holds_untracked(&entry.path(), &child, manifest) {
                    return true;
                }
            }
            Some(_) => {}
        }
    }
    false
}

fn hash_file(path: &Path) -> Result<ContentHash, SyncError> {
    fs::File::open(path)
        .and_then(ContentHash::of_reader)
        .map_err(io_err(format!("reading {}", path.display())))
}

/// Whether a write must reach the disk before it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// fsync before the rename: the journal, which a roll-forward trusts.
    Synced,
    /// Page cache only: the tree state, which `refresh` checks against disk anyway (a
    /// lost or torn state means a full resend, never a wrong tree).
    Cached,
}

fn write_atomically(path: &Path, bytes: &[u8], durability: Durability) -> Result<(), SyncError> {
    let tmp = path.with_extension("tmp");
    let write = || -> io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        if durability == Durability::Synced {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)
    };
    write().map_err(io_err(format!("writing {}", path.display())))
}

/// A reader that fails, and raises its flag, once more than its bound has been read.
#[derive(Debug)]
pub struct Limited<R> {
    inner: R,
    remaining: u64,
    exceeded: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: Read> Limited<R> {
    pub fn new(inner: R, limit_bytes: u64) -> Self {
        Limited {
            inner,
            remaining: limit_bytes,
            exceeded: Default::default(),
        }
    }

    pub fn set_remaining(&mut self, limit_bytes: u64) {
        self.remaining = limit_bytes;
    }
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.remaining {
            self.exceeded.set(true);
            return Err(io::Error::other("decompressed size limit exceeded"));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Reads one whole sync stream (zstd: the delta, then the content tar) and applies it.
pub fn apply_stream<F, G>(
    tree: &mut Tree,
    compressed: impl Read,
    delta_bytes: u64,
    max_bytes: u64,
    store: Option<&Store>,
    freeze: F,
) -> Result<(), SyncError>
where
    F: FnOnce() -> G,
{
    if delta_bytes > codec::MAX_BLOB_BYTES as u64 {
        return Err(SyncError::TooLarge {
            limit_bytes: codec::MAX_BLOB_BYTES as u64,
        });
    }
    let decoder = zstd::stream::read::Decoder::new(compressed)
        .map_err(io_err("starting to decompress the sync stream"))?;
    let mut stream = Limited::new(decoder, delta_bytes);
    let mut header = vec![0u8; delta_bytes as usize];
    stream
        .read_exact(&mut header)
        .map_err(io_err("reading the delta"))?;
    let delta: Delta =
        codec::decode_blob(&header).map_err(|e| SyncError::Stream(format!("bad delta: {e}")))?;
    tree.apply(&delta, &mut stream, max_bytes, store, freeze)
}

#[cfg(test)]
mod tests;
