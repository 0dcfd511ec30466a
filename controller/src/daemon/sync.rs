//! Drives one code sync with an agent (the exchange `BulkOpen::Sync` describes): scan the
//! project, learn what the agent has (its root hash, and its manifest only when the
//! daemon's cached copy is stale), plan the delta, stream it, and record the agent's new
//! tree. Syncs of one run take turns.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use protocol::codec::{self, MAX_BLOB_BYTES};
use protocol::delta::{self, Delta, Op, Source, Summary};
use protocol::framed::{read_frame, write_frame};
use protocol::{BulkOpen, ErrorKind, Manifest, RunId, SyncDone, SyncGo, SyncHave, SyncOpen};
use serde::{Deserialize, Serialize};

use super::Daemon;
use crate::error::{ErrorCode, UserError};
use crate::ipc::Restart;
use crate::sync::pack::{self, Sent};
use crate::sync::scan::{self, StatCache};

/// At most this many changes or skipped paths are listed in a report: it travels in one
/// frame to the CLI, and a screenful of a hundred thousand paths helps no one.
pub const MAX_LISTED: usize = 10_000;

/// What to sync and how.
#[derive(Debug, Clone)]
pub struct Params {
    pub run: RunId,
    /// Which node of the run the agent holds (0 but in a gang).
    pub node: u32,
    pub root: PathBuf,
    pub dry_run: bool,
    /// Whether the run's process restarts after the sync (with its own grace period).
    pub restart: Restart,
    /// The run is being started: its tree may not exist yet.
    pub create: bool,
}

/// One change, for listings (`--dry-run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub op: String,
    pub path: String,
}

/// The result of a sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    pub run: RunId,
    pub root: String,
    pub dry_run: bool,
    pub summary: Summary,
    /// The changes when a dry run (the first [`MAX_LISTED`]); otherwise empty.
    pub changes: Vec<Change>,
    /// Changes beyond those listed.
    pub unlisted: u64,
    /// Files in the project, and files hashed because the stat cache could not vouch.
    pub files: u64,
    pub hashed_files: u64,
    /// Paths left out of the sync, with why (the first [`MAX_LISTED`]).
    pub skipped: Vec<String>,
    /// Paths left out beyond those listed.
    pub unlisted_skipped: u64,
    /// UDP bytes both ways on the agent's connection during the sync (QUIC and TLS
    /// overhead included, and anything else the connection carried meanwhile).
    pub wire_bytes: u64,
    /// Size of the manifest the agent had to send because the daemon's copy of its tree
    /// was missing or stale (0 when the daemon knew it).
    pub agent_manifest_bytes: u64,
    /// The earlier run whose tree the agent's store seeded this (new) tree from.
    pub seeded_from: Option<RunId>,
    pub elapsed_ms: u64,
    pub restarted_pid: Option<u32>,
}

/// Progress of a running sync, polled by whoever shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub files: u64,
    pub total_files: u64,
    pub bytes: u64,
    pub total_bytes: u64,
}

/// One agent's tree of a run: the run's, on the instance of one of its nodes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TreeKey {
    pub run: RunId,
    pub node: u32,
}

impl TreeKey {
    /// Its file under the sync dir: `RUN.tree` for node 0, `RUN.nN.tree` for node N.
    fn file_name(&self) -> String {
        match self.node {
            0 => format!("{}.tree", self.run),
            n => format!("{}.n{n}.tree", self.run),
        }
    }

    fn from_file_name(name: &str) -> Option<Self> {
        let stem = name.strip_suffix(".tree")?;
        let (run, node) = match stem.split_once(".n") {
            Some((run, node)) => (run, node.parse().ok().filter(|n| *n > 0)?),
            None => (stem, 0),
        };
        Some(TreeKey {
            run: run.parse().ok()?,
            node,
        })
    }
}

/// The daemon's memory of projects and agents' trees.
#[derive(Debug, Default)]
pub struct SyncState {
    caches: std::sync::Mutex<HashMap<PathBuf, StatCache>>,
    /// Per run and node, the manifest the agent was last known to have.
    trees: std::sync::Mutex<HashMap<TreeKey, Manifest>>,
    locks: std::sync::Mutex<HashMap<TreeKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// Syncs `params.root` to the run's tree. `progress` is called as content goes out.
pub(super) async fn sync(
    d: &Arc<Daemon>,
    link: &super::AgentLink,
    params: Params,
    progress: impl FnMut(Progress),
) -> Result<SyncReport, UserError> {
    let started = Instant::now();
    let (run, root) = (params.run.clone(), params.root.clone());
    let scan = async move {
        let scan = scan_project(d, &root).await;
        if let Ok(scan) = &scan {
            tracing::debug!(run = %run, files = scan.manifest.entries.len(), hashed = scan.hashed_files, ms = started.elapsed().as_millis() as u64, "scanned");
        }
        scan
    };
    sync_scanned(d, link, params, scan, progress).await
}

/// Syncs `params.root` to the run's tree on every one of `links` (node, agent) at once,
/// from one scan. Returns each node's report, in the order of `links`.
pub(super) async fn sync_nodes(
    d: &Arc<Daemon>,
    links: &[(u32, super::AgentLink)],
    params: Params,
) -> Result<Vec<SyncReport>, UserError> {
    let scan = scan_project(d, &params.root).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (node, link)) in links.iter().enumerate() {
        let (d, link, scan) = (d.clone(), link.clone(), scan.clone());
        let params = Params {
            node: *node,
            ..params.clone()
        };
        tasks.spawn(async move {
            let done = sync_scanned(&d, &link, params, async { Ok(scan) }, |_| {}).await;
            (i, done)
        });
    }
    let mut reports: Vec<Option<SyncReport>> = vec![None; links.len()];
    while let Some(joined) = tasks.join_next().await {
        let (i, done) =
            joined.map_err(|e| UserError::new(ErrorCode::Internal, format!("a sync task: {e}")))?;
        let report = done.map_err(|e| {
            let node = links[i].0;
            UserError {
                message: format!("node {node}: {}", e.message),
                ..e
            }
        })?;
        reports[i] = Some(report);
    }
    Ok(reports.into_iter().flatten().collect())
}

async fn sync_scanned(
    d: &Arc<Daemon>,
    link: &super::AgentLink,
    params: Params,
    scan: impl Future<Output = Result<scan::Scan, UserError>>,
    mut progress: impl FnMut(Progress),
) -> Result<SyncReport, UserError> {
    let conn = &link.conn;
    let key = params.key();
    let lock = d
        .sync
        .locks
        .lock()
        .expect("sync locks")
        .entry(key.clone())
        .or_default()
        .clone();
    let _turn = lock.lock().await;
    let started = Instant::now();
    let before = wire_bytes(conn);
    let known = d.sync.trees.lock().expect("trees").get(&key).cloned();
    // A new tree is seeded on the agent from an earlier run's, when it still has one.
    let bases = if known.is_none() && params.create && link.store && params.node == 0 {
        bases_for(d, &params.run)
    } else {
        Vec::new()
    };
    let result = exchange(d, conn, &params, scan, known, bases, &mut progress).await;
    let (scan, delta, restarted_pid, agent_manifest_bytes, seeded) = match result {
        Ok(done) => done,
        Err(e) => {
            // Whatever the agent has now, learn it afresh next time.
            forget_tree(d, &key);
            return Err(e);
        }
    };
    let summary = delta.summary();
    let changes: Vec<Change> = if params.dry_run {
        delta.ops.iter().take(MAX_LISTED).map(change).collect()
    } else {
        Vec::new()
    };
    let unlisted = if params.dry_run {
        delta.ops.len().saturating_sub(MAX_LISTED) as u64
    } else {
        0
    };
    let mut skipped = scan.skipped;
    let unlisted_skipped = skipped.len().saturating_sub(MAX_LISTED) as u64;
    skipped.truncate(MAX_LISTED);
    Ok(SyncReport {
        run: params.run,
        root: params.root.display().to_string(),
        dry_run: params.dry_run,
        summary,
        changes,
        files: scan.manifest.files().count() as u64,
        hashed_files: scan.hashed_files,
        skipped,
        unlisted_skipped,
        unlisted,
        wire_bytes: wire_bytes(conn).saturating_sub(before),
        agent_manifest_bytes,
        seeded_from: seeded,
        elapsed_ms: started.elapsed().as_millis() as u64,
        restarted_pid,
    })
}

fn wire_bytes(conn: &quinn::Connection) -> u64 {
    let stats = conn.stats();
    stats.udp_tx.bytes + stats.udp_rx.bytes
}

async fn scan_project(d: &Arc<Daemon>, root: &Path) -> Result<scan::Scan, UserError> {
    let mut cache = d
        .sync
        .caches
        .lock()
        .expect("caches")
        .remove(root)
        .or_else(|| load_cache(&d.home.sync_dir(), root))
        .unwrap_or_default();
    let (root2, private) = (root.to_owned(), d.home.root().to_owned());
    let (scanned, cache) = tokio::task::spawn_blocking(move || {
        let scanned = scan::scan(&root2, &private, &mut cache);
        (scanned, cache)
    })
    .await
    .map_err(|e| UserError::new(ErrorCode::Internal, format!("scan task: {e}")))?;
    let scanned = scanned.map_err(|e| {
        UserError::new(ErrorCode::BadInput, format!("{e:#}")).resolve(format!(
            "fix the project at {}, then sync again",
            root.display()
        ))
    })?;
    if scanned.hashed_files > 0 {
        // Off the sync's path: losing it costs only a re-hash.
        let (dir, root2, copy) = (d.home.sync_dir(), root.to_owned(), cache.clone());
        d.tasks
            .spawn_blocking(move || save_cache(&dir, &root2, &copy));
    }
    d.sync
        .caches
        .lock()
        .expect("caches")
        .insert(root.to_owned(), cache);
    Ok(scanned)
}

/// The exchange on one stream. The project is scanned while the agent checks its tree.
/// Returns the scan, the delta that was (or, dry, would be) applied, the restarted
/// process, and the size of the manifest the agent sent.
async fn exchange(
    d: &Arc<Daemon>,
    conn: &quinn::Connection,
    params: &Params,
    scan: impl Future<Output = Result<scan::Scan, UserError>>,
    known: Option<Manifest>,
    bases: Vec<(RunId, Manifest)>,
    progress: &mut impl FnMut(Progress),
) -> Result<Exchanged, UserError> {
    let lost = |e: &dyn std::fmt::Display| {
        UserError::new(
            ErrorCode::Agent,
            format!("the sync of {} was cut off: {e}", params.run),
        )
        .resolve("sync again once the agent is connected (runctl-controller list shows it)")
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    let open = SyncOpen {
        run: params.run.clone(),
        known_root: known.as_ref().map(Manifest::root),
        create: params.create,
    };
    let open = if bases.is_empty() {
        BulkOpen::Sync(open)
    } else {
        BulkOpen::SyncFrom {
            open,
            bases: bases.iter().map(|(_, m)| m.root()).collect(),
        }
    };
    write_frame(&mut send, &open).await.map_err(|e| lost(&e))?;
    let scanned = scan.await;
    let have: SyncHave = read_frame(&mut recv)
        .await
        .map_err(|e| lost(&e))?
        .ok_or_else(|| lost(&"the agent closed the stream"))?;
    let scanned = match scanned {
        Ok(scanned) => scanned,
        Err(e) => {
            let _ = write_frame(&mut send, &SyncGo::Cancel).await;
            let _ = send.finish();
            return Err(e);
        }
    };
    let local = &scanned.manifest;
    let root = have.root.map_err(|e| refused(&params.run, e))?;
    let known_root = known.as_ref().map(Manifest::root);
    let seeded = bases
        .iter()
        .find(|(_, m)| Some(root) != known_root && m.root() == root)
        .map(|(run, _)| run.clone());
    let remote = if have.manifest_bytes == 0 {
        known
            .into_iter()
            .chain(bases.into_iter().map(|(_, m)| m))
            .find(|k| k.root() == root)
            .ok_or_else(|| {
                lost(&"the agent sent no manifest for a tree the daemon does not know")
            })?
    } else {
        read_manifest(&mut recv, have.manifest_bytes)
            .await
            .map_err(|e| lost(&format!("{e:#}")))?
    };
    let delta = delta::plan(local, &remote);
    let restart = restarts(params.restart, delta.is_empty());
    if params.dry_run || (delta.is_empty() && !restart) {
        write_frame(&mut send, &SyncGo::Cancel)
            .await
            .map_err(|e| lost(&e))?;
        let _ = send.finish();
        if have.manifest_bytes > 0 || seeded.is_some() {
            remember_tree(d, &params.key(), remote);
        }
        return Ok((scanned, delta, None, have.manifest_bytes, seeded));
    }
    let blob = codec::encode_blob(&delta)
        .map_err(|e| UserError::new(ErrorCode::Internal, format!("encoding the delta: {e}")))?;
    let go = SyncGo::Apply {
        delta_bytes: blob.len() as u64,
        restart,
    };
    write_frame(&mut send, &go).await.map_err(|e| lost(&e))?;

    let summary = delta.summary();
    let sent = Arc::new(Sent::default());
    let rt = tokio::runtime::Handle::current();
    let (root_dir, delta2, sent2) = (params.root.clone(), delta.clone(), sent.clone());
    let mut writer = tokio::task::spawn_blocking(move || {
        let mut bridge = tokio_util::io::SyncIoBridge::new_with_handle(send, rt);
        let out = std::io::BufWriter::with_capacity(256 * 1024, &mut bridge);
        let written = pack::write_stream(&root_dir, &delta2, &blob, out, &sent2);
        let mut send = bridge.into_inner();
        match &written {
            Ok(()) => {
                let _ = send.finish();
            }
            // Cut the stream: the agent sees it end early and keeps its old tree.
            Err(_) => {
                let _ = send.reset(1u32.into());
            }
        }
        written
    });
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let written = loop {
        tokio::select! {
            done = &mut writer => break done,
            _ = tick.tick() => progress(snapshot(&sent, &summary)),
        }
    };
    progress(snapshot(&sent, &summary));
    tracing::debug!(run = %params.run, path = ?conn.stats().path, "stream written");
    let written = written.map_err(|e| UserError::new(ErrorCode::Internal, format!("{e}")))?;
    let done: Option<SyncDone> = read_frame(&mut recv).await.map_err(|e| lost(&e))?;
    if let Err(e) = written {
        // The agent stopped the stream because applying failed on its side (its disk
        // filled, a path was refused): its reason is the one to give, not the stop.
        if stopped_by_peer(&e)
            && let Some(SyncDone { result: Err(why) }) = done
        {
            return Err(refused(&params.run, why));
        }
        return Err(UserError::new(ErrorCode::BadInput, format!("{e:#}"))
            .resolve("sync again; files edited during a sync are sent by the next one"));
    }
    let done = done.ok_or_else(|| lost(&"the agent closed the stream before confirming"))?;
    let applied = done.result.map_err(|e| refused(&params.run, e))?;
    if applied.root != local.root() {
        return Err(UserError::new(
            ErrorCode::Agent,
            format!(
                "the agent's tree for {} does not match after the sync",
                params.run
            ),
        )
        .resolve("sync again"));
    }
    remember_tree(d, &params.key(), local.clone());
    Ok((
        scanned,
        delta,
        applied.restarted_pid,
        have.manifest_bytes,
        seeded,
    ))
}

/// Whether writing the stream failed because the agent stopped reading it.
fn stopped_by_peer(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<quinn::WriteError>())
            .is_some_and(|w| matches!(w, quinn::WriteError::Stopped(_)))
    })
}

/// What an exchange did: the scan, the delta (applied, or planned when dry), the
/// restarted process, the size of the manifest the agent sent, and the earlier run the
/// tree was seeded from.
type Exchanged = (scan::Scan, Delta, Option<u32>, u64, Option<RunId>);

/// Whether this sync restarts the run's process, as asked.
fn restarts(restart: Restart, unchanged: bool) -> bool {
    match restart {
        Restart::Never => false,
        Restart::Always => true,
        Restart::IfChanged => !unchanged,
    }
}

fn snapshot(sent: &Sent, summary: &Summary) -> Progress {
    use std::sync::atomic::Ordering;
    Progress {
        files: sent.files.load(Ordering::Relaxed),
        total_files: summary.stream_files,
        bytes: sent.bytes.load(Ordering::Relaxed),
        total_bytes: summary.stream_bytes,
    }
}

fn refused(run: &RunId, e: protocol::WireError) -> UserError {
    let code = match e.kind {
        ErrorKind::NotFound => ErrorCode::NotFound,
        ErrorKind::RunFailed | ErrorKind::Forbidden => ErrorCode::Conflict,
        ErrorKind::SyncFailed
        | ErrorKind::BadRequest
        | ErrorKind::Internal
        | ErrorKind::Unsupported
        | ErrorKind::NotYourRun
        | ErrorKind::VersionMismatch
        | ErrorKind::TokenUnknown
        | ErrorKind::TokenReused
        | ErrorKind::TokenExpired
        | ErrorKind::Unauthenticated
        | ErrorKind::CertificateRevoked => ErrorCode::Agent,
    };
    UserError::new(
        code,
        format!("the agent refused the sync of {run}: {}", e.message),
    )
    .resolve("the run's tree on the instance is as it was before this sync")
}

async fn read_manifest(recv: &mut quinn::RecvStream, len: u64) -> anyhow::Result<Manifest> {
    anyhow::ensure!(
        len <= MAX_BLOB_BYTES as u64,
        "the agent's manifest is {len} bytes, over the limit"
    );
    let mut compressed = vec![0u8; len as usize];
    recv.read_exact(&mut compressed)
        .await
        .context("reading the agent's manifest")?;
    let blob = zstd::bulk::decompress(&compressed, MAX_BLOB_BYTES)
        .context("decompressing the agent's manifest")?;
    let manifest: Manifest = codec::decode_blob(&blob)?;
    manifest.check()?;
    Ok(manifest)
}

fn change(op: &Op) -> Change {
    let (op_name, path) = match op {
        Op::Delete { path } => ("delete", path.clone()),
        Op::Mkdir { path } => ("mkdir", path.clone()),
        Op::Write {
            path,
            source: Source::Stream,
            ..
        } => ("write", path.clone()),
        Op::Write {
            path,
            source: Source::Copy { from },
            ..
        } => ("copy", format!("{from} -> {path}")),
        Op::Symlink { path, target } => ("link", format!("{path} -> {target}")),
        Op::Chmod { path, executable } => (
            if *executable { "chmod +x" } else { "chmod -x" },
            path.clone(),
        ),
    };
    Change {
        op: op_name.to_owned(),
        path,
    }
}

/// At most this many earlier trees are offered to seed a new run's.
const MAX_BASES: usize = 4;

/// The trees the daemon knows of other runs on the run's instance, newest run first: what
/// the agent's store may still hold.
fn bases_for(d: &Daemon, run: &RunId) -> Vec<(RunId, Manifest)> {
    let Ok(Some(row)) = d.db.run(run) else {
        return Vec::new();
    };
    let Ok(mut runs) = d.db.runs_on(&row.instance) else {
        return Vec::new();
    };
    runs.reverse();
    let trees = d.sync.trees.lock().expect("trees");
    let mut bases: Vec<(RunId, Manifest)> = Vec::new();
    for other in runs.iter().filter(|r| r.id != *run) {
        let key = TreeKey {
            run: other.id.clone(),
            node: 0,
        };
        if let Some(m) = trees.get(&key)
            && !bases.iter().any(|(_, b)| b.root() == m.root())
        {
            bases.push((other.id.clone(), m.clone()));
        }
        if bases.len() == MAX_BASES {
            break;
        }
    }
    bases
}

fn remember_tree(d: &Daemon, key: &TreeKey, manifest: Manifest) {
    let path = d.home.sync_dir().join(key.file_name());
    if let Err(e) = write_blob(&path, &manifest) {
        tracing::warn!("saving {}: {e:#}", path.display());
    }
    d.sync
        .trees
        .lock()
        .expect("trees")
        .insert(key.clone(), manifest);
}

/// Drops what the daemon remembers of one agent's tree of a run (its instance is gone).
pub(super) fn forget_tree(d: &Daemon, key: &TreeKey) {
    d.sync.trees.lock().expect("trees").remove(key);
    let _ = std::fs::remove_file(d.home.sync_dir().join(key.file_name()));
}

/// Deletes what the sync dir holds that is no longer of use (`retention::sync_file_due`):
/// trees of runs whose instance is gone (a crash can leave them behind) and stat caches of
/// projects not synced for a month.
pub(super) fn prune_files(d: &Daemon, now_ms: u64) {
    use crate::retention::{SyncFile, sync_file_due};
    let dir = d.home.sync_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(key) = TreeKey::from_file_name(&name) {
            let file = SyncFile::Tree {
                instance_live: tree_instance_live(d, &key),
            };
            if sync_file_due(file, now_ms) {
                tracing::info!("forgetting the tree of {} (its instance is gone)", key.run);
                forget_tree(d, &key);
            }
        } else if name.starts_with("stat-") && name.ends_with(".cache") {
            let modified_ms = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(now_ms, |t| t.as_millis() as u64);
            if sync_file_due(SyncFile::StatCache { modified_ms }, now_ms) {
                tracing::info!("deleting {name}, a stat cache unused for a month");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Whether the instance whose tree `key` is still there (an unknown run has none).
fn tree_instance_live(d: &Daemon, key: &TreeKey) -> bool {
    let Ok(Some(row)) = d.db.run(&key.run) else {
        return false;
    };
    let instance = match key.node {
        0 => Some(row.instance.clone()),
        n => {
            d.db.run_nodes(&row)
                .ok()
                .and_then(|nodes| nodes.get(n as usize).cloned())
        }
    };
    // Unreadable is kept: only what is known to be gone is deleted.
    match instance.map(|name| d.db.instance(&name)) {
        Some(Ok(Some(instance))) => instance.state != crate::db::InstanceState::Terminated,
        Some(Ok(None)) | None => false,
        Some(Err(_)) => true,
    }
}

/// Loads the remembered trees of every run (at daemon start).
pub fn load_trees(dir: &Path) -> HashMap<TreeKey, Manifest> {
    let mut trees = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return trees;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(key) = name.to_str().and_then(TreeKey::from_file_name) else {
            continue;
        };
        if let Some(manifest) = read_blob::<Manifest>(&entry.path()) {
            trees.insert(key, manifest);
        }
    }
    trees
}

impl SyncState {
    pub fn new(trees: HashMap<TreeKey, Manifest>) -> Self {
        SyncState {
            trees: std::sync::Mutex::new(trees),
            ..Default::default()
        }
    }
}

fn load_cache(dir: &Path, root: &Path) -> Option<StatCache> {
    read_blob(&crate::sync::scan::cache_path(dir, root))
}

fn save_cache(dir: &Path, root: &Path, cache: &StatCache) {
    let path = crate::sync::scan::cache_path(dir, root);
    if let Err(e) = write_blob(&path, cache) {
        tracing::warn!("saving {}: {e:#}", path.display());
    }
}

fn read_blob<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    let blob = zstd::bulk::decompress(&bytes, MAX_BLOB_BYTES).ok()?;
    codec::decode_blob(&blob).ok()
}

fn write_blob<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().expect("a file in a dir"))?;
    let blob = zstd::bulk::compress(&codec::encode_blob(value)?, 1)?;
    let tmp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
    std::fs::write(&tmp, blob)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

impl Params {
    fn key(&self) -> TreeKey {
        TreeKey {
            run: self.run.clone(),
            node: self.node,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_files_name_the_run_and_the_node() {
        let run: RunId = "run-0123456789ab".parse().expect("id");
        for node in [0, 1, 17] {
            let key = TreeKey {
                run: run.clone(),
                node,
            };
            assert_eq!(TreeKey::from_file_name(&key.file_name()), Some(key));
        }
        assert_eq!(
            TreeKey {
                run: run.clone(),
                node: 0
            }
            .file_name(),
            "run-0123456789ab.tree",
            "as before gangs"
        );
        for bad in [
            "run-0123456789ab.n0.tree",
            "run-0123456789ab.nx.tree",
            "run-0123456789ab",
            "other.tree",
        ] {
            assert_eq!(TreeKey::from_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn restarts_as_asked() {
        let check = |restart, unchanged, expected| {
            assert_eq!(
                restarts(restart, unchanged),
                expected,
                "{restart:?} {unchanged}"
            );
        };
        check(Restart::Never, false, false);
        check(Restart::Always, true, true);
        check(Restart::Always, false, true);
        check(Restart::IfChanged, true, false);
        check(Restart::IfChanged, false, true);
    }
}
