//! Checkpoints in the store, shared by the agent (which pushes them) and the controller
//! (which lists, fetches and prunes them). Layout under a run's prefix `P`:
//!
//! - `P<name>` for a file checkpoint, `P<name>/<path>` for each file of a directory one;
//! - `P.runctl/checkpoints/<name>.json`: the checkpoint's record (files, sizes, content
//!   hashes), written only after every object of the checkpoint is complete;
//! - `P LATEST`: a copy of the record of the newest complete checkpoint, written after its
//!   record.
//!
//! A checkpoint without a record is incomplete and never offered. Retention deletes a
//! checkpoint's record before its objects, so a half-deleted one is never offered either,
//! and never touches the one `LATEST` names.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::transfer::{ContentHash, Engine, verify_file, walk_files};
use crate::{ObjectMeta, ObjectStore, StoreError};

/// The record of the newest complete checkpoint, beside the checkpoints.
pub const LATEST: &str = "LATEST";
/// Where the per-checkpoint records live, below the run's prefix.
pub const RECORDS: &str = ".runctl/checkpoints/";

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Relative to the run's prefix: the checkpoint's name, or `name/inner/path`.
    pub path: String,
    pub size: u64,
    pub hash: ContentHash,
}

/// A complete checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub name: String,
    /// A directory of files rather than one file.
    pub directory: bool,
    pub files: Vec<FileRecord>,
    pub bytes: u64,
    /// When the trainer saved it (the newest modification time among its files), ms since
    /// the Unix epoch: the order of checkpoints.
    pub saved_ms: i64,
    /// When its record was written.
    pub uploaded_ms: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn record_key(prefix: &str, name: &str) -> String {
    format!("{prefix}{RECORDS}{name}.json")
}

fn parse(key: &str, body: &[u8]) -> Result<CheckpointRecord, StoreError> {
    serde_json::from_slice(body).map_err(|e| StoreError::Integrity {
        what: key.to_owned(),
        detail: format!("not a checkpoint record: {e}"),
    })
}

/// The local modification time of `path`, ms since the epoch.
pub fn modified_ms(path: &Path) -> Option<i64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(
        modified
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis() as i64,
    )
}

/// A checkpoint on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCheckpoint {
    /// Each file as (path, name relative to the run's prefix).
    pub files: Vec<(PathBuf, String)>,
    pub bytes: u64,
    /// The newest modification time among its files, ms since the epoch.
    pub saved_ms: i64,
}

/// The checkpoint at `local` (a file or a directory).
pub fn local_files(name: &str, local: &Path) -> Result<LocalCheckpoint, StoreError> {
    let meta =
        std::fs::metadata(local).map_err(StoreError::io(format!("reading {}", local.display())))?;
    let files = if meta.is_dir() {
        walk_files(local)?
            .into_iter()
            .map(|(path, rel)| (path, format!("{name}/{rel}")))
            .collect()
    } else {
        vec![(local.to_owned(), name.to_owned())]
    };
    let mut bytes = 0;
    let mut saved = 0;
    for (path, _) in &files {
        let meta = std::fs::metadata(path)
            .map_err(StoreError::io(format!("reading {}", path.display())))?;
        bytes += meta.len();
        saved = saved.max(modified_ms(path).unwrap_or(0));
    }
    Ok(LocalCheckpoint {
        files,
        bytes,
        saved_ms: saved,
    })
}

/// Uploads the checkpoint `name` from `local` under `prefix`, then its record, then
/// `LATEST` when it is the newest complete checkpoint. Fails with `SourceChanged` if a file
/// changed while it was read (nothing is recorded then).
pub async fn push<S: ObjectStore + Clone + 'static>(
    engine: &Engine<S>,
    prefix: &str,
    name: &str,
    local: &Path,
) -> Result<CheckpointRecord, StoreError> {
    crate::validate_key(name)?;
    let LocalCheckpoint {
        files,
        bytes,
        saved_ms,
    } = local_files(name, local)?;
    let directory = local.is_dir();
    let items = files
        .iter()
        .map(|(path, rel)| (path.clone(), format!("{prefix}{rel}")))
        .collect();
    let mut uploaded = engine.upload_all(items).await?;
    uploaded.sort_by(|a, b| a.key.cmp(&b.key));
    let record = CheckpointRecord {
        name: name.to_owned(),
        directory,
        files: uploaded
            .into_iter()
            .map(|u| FileRecord {
                path: u.key[prefix.len()..].to_owned(),
                size: u.size,
                hash: u.hash,
            })
            .collect(),
        bytes,
        saved_ms,
        uploaded_ms: now_ms(),
    };
    let body = Bytes::from(serde_json::to_vec_pretty(&record).expect("a record serializes"));
    engine
        .store()
        .put(&record_key(prefix, name), body.clone())
        .await?;
    let newer_exists = match latest(engine.store(), prefix).await {
        Ok(Some(current)) => current.name != name && current.saved_ms > record.saved_ms,
        Ok(None) | Err(StoreError::Integrity { .. }) => false,
        Err(e) => return Err(e),
    };
    if !newer_exists {
        engine
            .store()
            .put(&format!("{prefix}{LATEST}"), body)
            .await?;
    }
    Ok(record)
}

/// The record `LATEST` holds, if any.
pub async fn latest<S: ObjectStore>(
    store: &S,
    prefix: &str,
) -> Result<Option<CheckpointRecord>, StoreError> {
    let key = format!("{prefix}{LATEST}");
    match store.get(&key, None, None).await {
        Ok(body) => parse(&key, &body.into_bytes()).map(Some),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every complete checkpoint under `prefix`, oldest first.
pub async fn list<S: ObjectStore>(
    store: &S,
    prefix: &str,
) -> Result<Vec<CheckpointRecord>, StoreError> {
    let records = store.list(&format!("{prefix}{RECORDS}"), false).await?;
    let mut out = Vec::new();
    for object in records.objects {
        if !object.key.ends_with(".json") {
            continue;
        }
        let body = store.get(&object.key, None, object.etag.as_deref()).await;
        match body {
            Ok(body) => out.push(parse(&object.key, &body.into_bytes())?),
            // Pruned between the listing and the read.
            Err(StoreError::NotFound { .. } | StoreError::Changed { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| {
        a.saved_ms
            .cmp(&b.saved_ms)
            .then_with(|| a.name.cmp(&b.name))
    });
    Ok(out)
}

/// The objects under `prefix` that belong to no complete checkpoint (uploads that never
/// finished), other than runctl's own.
pub async fn incomplete<S: ObjectStore>(
    store: &S,
    prefix: &str,
    complete: &[CheckpointRecord],
) -> Result<Vec<ObjectMeta>, StoreError> {
    let known: std::collections::HashSet<String> = complete
        .iter()
        .flat_map(|r| r.files.iter().map(|f| format!("{prefix}{}", f.path)))
        .collect();
    let listing = store.list(prefix, false).await?;
    Ok(listing
        .objects
        .into_iter()
        .filter(|o| {
            let rel = &o.key[prefix.len()..];
            rel != LATEST && !rel.starts_with(".runctl/") && !known.contains(&o.key)
        })
        .collect())
}

/// Downloads `record` into `dest_dir` (as `dest_dir/<name>`), verifying every file's
/// content hash; returns the checkpoint's local path.
pub async fn fetch<S: ObjectStore + Clone + 'static>(
    engine: &Engine<S>,
    prefix: &str,
    record: &CheckpointRecord,
    dest_dir: &Path,
) -> Result<PathBuf, StoreError> {
    let mut items = Vec::new();
    for file in &record.files {
        let local = crate::relative_key("", &file.path).ok_or_else(|| StoreError::InvalidKey {
            key: file.path.clone(),
        })?;
        let key = format!("{prefix}{}", file.path);
        let meta = engine
            .store()
            .head(&key)
            .await?
            .ok_or_else(|| StoreError::NotFound { key: key.clone() })?;
        if meta.size != file.size {
            return Err(StoreError::Integrity {
                what: key,
                detail: format!("{} bytes in the store, {} recorded", meta.size, file.size),
            });
        }
        items.push((meta, dest_dir.join(local)));
    }
    let downloaded = engine.download_all(items).await?;
    for done in &downloaded {
        let rel = &done.key[prefix.len()..];
        let file = record
            .files
            .iter()
            .find(|f| f.path == rel)
            .expect("every download is of a recorded file");
        verify_file(&done.path, &file.hash)?;
    }
    Ok(dest_dir.join(&record.name))
}

/// What `prune` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// The checkpoints deleted, newest first.
    pub deleted: Vec<String>,
    /// How many complete checkpoints are left.
    pub kept: usize,
}

/// Deletes all but the newest `keep` complete checkpoints (by save time), never the one
/// `LATEST` names.
pub async fn prune<S: ObjectStore + Clone + 'static>(
    engine: &Engine<S>,
    prefix: &str,
    keep: usize,
) -> Result<Pruned, StoreError> {
    let all = list(engine.store(), prefix).await?;
    let latest = latest(engine.store(), prefix).await?.map(|r| r.name);
    let doomed: Vec<&CheckpointRecord> = all
        .iter()
        .rev()
        .skip(keep)
        .filter(|r| Some(&r.name) != latest.as_ref())
        .collect();
    let mut deleted = Vec::new();
    for record in doomed {
        // The record first: from here on the checkpoint is no longer offered.
        engine
            .store()
            .delete(&record_key(prefix, &record.name))
            .await?;
        let keys = record
            .files
            .iter()
            .map(|f| format!("{prefix}{}", f.path))
            .collect();
        engine.delete_all(keys).await?;
        deleted.push(record.name.clone());
    }
    Ok(Pruned {
        kept: all.len() - deleted.len(),
        deleted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;
    use crate::transfer::Tuning;

    fn set_mtime(path: &Path, secs: u64) {
        let file = std::fs::File::options()
            .write(true)
            .open(path)
            .expect("open");
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .expect("mtime");
    }

    #[tokio::test]
    async fn push_list_latest_fetch_prune() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::new(
            LocalStore::new(dir.path().join("bkt"), "bkt"),
            Tuning::default(),
        );
        let ckpts = dir.path().join("ckpts");
        std::fs::create_dir_all(ckpts.join("step-3/shards")).expect("mkdir");
        for (name, secs) in [("ckpt-1.pt", 100), ("ckpt-2.pt", 200)] {
            std::fs::write(ckpts.join(name), name).expect("write");
            set_mtime(&ckpts.join(name), secs);
        }
        std::fs::write(ckpts.join("step-3/meta.json"), "{}").expect("write");
        std::fs::write(ckpts.join("step-3/shards/0.bin"), "zero").expect("write");
        set_mtime(&ckpts.join("step-3/meta.json"), 300);
        set_mtime(&ckpts.join("step-3/shards/0.bin"), 300);
        let prefix = "runs/r1/";

        // Newest first, as the agent does: an older one completing later leaves LATEST.
        push(&engine, prefix, "step-3", &ckpts.join("step-3"))
            .await
            .expect("push");
        push(&engine, prefix, "ckpt-1.pt", &ckpts.join("ckpt-1.pt"))
            .await
            .expect("push");
        push(&engine, prefix, "ckpt-2.pt", &ckpts.join("ckpt-2.pt"))
            .await
            .expect("push");
        let latest_now = latest(engine.store(), prefix)
            .await
            .expect("latest")
            .expect("some");
        assert_eq!(latest_now.name, "step-3");
        assert!(latest_now.directory);
        assert_eq!(latest_now.files.len(), 2);
        let names: Vec<_> = list(engine.store(), prefix)
            .await
            .expect("list")
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["ckpt-1.pt", "ckpt-2.pt", "step-3"]);

        let out = dir.path().join("out");
        let path = fetch(&engine, prefix, &latest_now, &out)
            .await
            .expect("fetch");
        assert_eq!(path, out.join("step-3"));
        assert_eq!(
            std::fs::read(out.join("step-3/shards/0.bin")).expect("read"),
            b"zero"
        );

        // Tampering with a stored object is caught.
        engine
            .store()
            .put("runs/r1/step-3/meta.json", Bytes::from_static(b"{} "))
            .await
            .expect("put");
        let err = fetch(&engine, prefix, &latest_now, &dir.path().join("out2"))
            .await
            .expect_err("size differs");
        assert!(matches!(err, StoreError::Integrity { .. }), "{err}");

        // An object without a record is incomplete.
        engine
            .store()
            .put("runs/r1/ckpt-9.pt", Bytes::from_static(b"half"))
            .await
            .expect("put");
        let complete = list(engine.store(), prefix).await.expect("list");
        let partial = incomplete(engine.store(), prefix, &complete)
            .await
            .expect("incomplete");
        assert_eq!(partial.len(), 1);
        assert_eq!(partial[0].key, "runs/r1/ckpt-9.pt");

        assert_eq!(
            prune(&engine, prefix, 1).await.expect("prune").deleted,
            ["ckpt-2.pt", "ckpt-1.pt"]
        );
        assert!(
            engine
                .store()
                .head("runs/r1/ckpt-1.pt")
                .await
                .expect("head")
                .is_none()
        );
        let left: Vec<_> = list(engine.store(), prefix)
            .await
            .expect("list")
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(left, ["step-3"]);
        // keep 0 would delete everything but LATEST's.
        assert!(
            prune(&engine, prefix, 0)
                .await
                .expect("prune")
                .deleted
                .is_empty()
        );
    }
}
