//! The instance's content store: each file content a sync brought, once, named by its
//! BLAKE3 hash, and a record of the tree each run was last synced to. A new run's tree is
//! filled from a record (`Tree::seed`), so only content the instance lacks crosses the
//! network.
//!
//! Layout under `<state>/store`: `objects/<2 hex>/<64 hex>` (read-only files),
//! `trees/<run>.tree` (the run's last synced manifest), `tmp/` (objects being written).
//!
//! Invariant: no run's file is ever a hard link to an object. A tree gets reflinks
//! (copy-on-write, where the filesystem has them) or verified copies, so a run writing its
//! own files never changes the store or another run's tree.
//! Invariant: a record is written only when every object it names is in the store, and an
//! object is deleted only when no remaining record names it (records go first). A prune
//! cut short leaves records whose objects are all there, plus garbage the next collects.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use protocol::RunId;
use protocol::codec;
use protocol::manifest::{ContentHash, Entry, Manifest};
use serde::{Deserialize, Serialize};

/// A run's last synced tree, as the controller knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TreeRecord {
    pub run: RunId,
    pub root: ContentHash,
    pub recorded_at_ms: u64,
    pub manifest: Manifest,
}

/// A record without its manifest, for pruning decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    pub run: RunId,
    pub root: ContentHash,
    pub recorded_at_ms: u64,
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// Writers of objects and records, and readers, share it; garbage collection takes it
    /// alone, so it never deletes an object a seed is copying or a sync just brought.
    lock: RwLock<()>,
    /// Cleared when the filesystem refuses a reflink, so later copies skip the attempt.
    reflinks: AtomicBool,
}

/// How an object left the store for a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopiedOut {
    /// A copy-on-write clone: no bytes written.
    Reflinked,
    /// A copy, its hash checked on the way.
    Copied,
}

impl Store {
    pub fn open(dir: &Path) -> io::Result<Store> {
        for sub in ["objects", "trees", "tmp"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        // Whatever was being written when the agent stopped is incomplete.
        if let Ok(entries) = fs::read_dir(dir.join("tmp")) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Store {
            dir: dir.to_owned(),
            lock: RwLock::new(()),
            reflinks: AtomicBool::new(true),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn object_path(&self, hash: &ContentHash) -> PathBuf {
        let hex = hash.to_hex();
        self.dir.join("objects").join(&hex[..2]).join(hex)
    }

    fn record_path(&self, run: &RunId) -> PathBuf {
        self.dir.join("trees").join(format!("{run}.tree"))
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn has(&self, hash: &ContentHash) -> bool {
        self.object_path(hash).is_file()
    }

    /// Adds the content of `src`, already verified to hash to `hash`, unless the store has
    /// it. The object is a reflink of `src` where the filesystem allows, else a copy.
    pub fn ingest(&self, src: &Path, hash: &ContentHash) -> io::Result<()> {
        let _shared = self.shared();
        let dest = self.object_path(hash);
        if dest.is_file() {
            return Ok(());
        }
        let tmp =
            self.dir
                .join("tmp")
                .join(format!("{}-{:016x}", hash.to_hex(), rand::random::<u64>()));
        let put = || -> io::Result<()> {
            reflink_copy::reflink_or_copy(src, &tmp)?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))?;
            fs::create_dir_all(dest.parent().expect("objects sit in a fan-out dir"))?;
            fs::rename(&tmp, &dest)
        };
        let put = put();
        if put.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        put
    }

    /// Puts the object `hash` at `to` (which must not exist) with `mode`, as a reflink or
    /// as a copy whose hash is checked, and returns how and the new file's metadata. A
    /// missing or damaged object is an error, and a damaged one is deleted so it is
    /// brought again. Safe to call from several threads at once.
    pub fn copy_out(
        &self,
        hash: &ContentHash,
        to: &Path,
        mode: u32,
        buf: &mut [u8],
    ) -> io::Result<(CopiedOut, fs::Metadata)> {
        let _shared = self.shared();
        let from = self.object_path(hash);
        if self.reflinks.load(Ordering::Relaxed) {
            match reflink_copy::reflink(&from, to) {
                Ok(()) => {
                    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
                    return Ok((CopiedOut::Reflinked, fs::symlink_metadata(to)?));
                }
                Err(e) => {
                    if refuses_reflinks(&e) {
                        self.reflinks.store(false, Ordering::Relaxed);
                    }
                    let _ = fs::remove_file(to);
                }
            }
        }
        let mut src = fs::File::open(&from)?;
        let mut out = fs::File::create_new(to)?;
        let mut hasher = blake3::Hasher::new();
        loop {
            let n = match src.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        if ContentHash::from(hasher.finalize()) != *hash {
            drop(out);
            let _ = fs::remove_file(to);
            let _ = fs::remove_file(&from);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the store's copy of {hash} is damaged; it was removed"),
            ));
        }
        out.set_permissions(fs::Permissions::from_mode(mode))?;
        Ok((CopiedOut::Copied, out.metadata()?))
    }

    /// Records `manifest` as the tree `run` was synced to, if the store holds every file
    /// of it (else the run's older record, if any, is dropped: it no longer describes the
    /// run). Returns whether it was recorded.
    pub fn record(&self, run: &RunId, manifest: &Manifest, now_ms: u64) -> io::Result<bool> {
        let _shared = self.shared();
        let path = self.record_path(run);
        let complete = manifest.entries.values().all(|e| match e {
            Entry::File { hash, .. } => self.has(hash),
            _ => true,
        });
        if !complete {
            let _ = fs::remove_file(&path);
            return Ok(false);
        }
        let record = TreeRecord {
            run: run.clone(),
            root: manifest.root(),
            recorded_at_ms: now_ms,
            manifest: manifest.clone(),
        };
        let blob = codec::encode_blob(&record).map_err(io::Error::other)?;
        let packed = zstd::bulk::compress(&blob, 1)?;
        let tmp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
        fs::write(&tmp, packed)?;
        fs::rename(&tmp, &path)?;
        Ok(true)
    }

    fn read_record(path: &Path) -> Option<TreeRecord> {
        let packed = fs::read(path).ok()?;
        let blob = zstd::bulk::decompress(&packed, codec::MAX_BLOB_BYTES).ok()?;
        let record: TreeRecord = codec::decode_blob(&blob).ok()?;
        // Records are the agent's own, but whatever reaches a tree is checked.
        record.manifest.check().ok()?;
        (record.manifest.root() == record.root).then_some(record)
    }

    /// Every record, newest first. Unreadable ones are deleted.
    pub fn records(&self) -> Vec<TreeRecord> {
        let _shared = self.shared();
        let mut records = Vec::new();
        let Ok(entries) = fs::read_dir(self.dir.join("trees")) else {
            return records;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "tree") {
                let _ = fs::remove_file(&path); // a write cut short
                continue;
            }
            match Self::read_record(&path) {
                Some(record) => records.push(record),
                None => {
                    tracing::warn!("removing unreadable store record {}", path.display());
                    let _ = fs::remove_file(&path);
                }
            }
        }
        records.sort_by_key(|r| std::cmp::Reverse(r.recorded_at_ms));
        records
    }

    /// The newest record of one of `roots` whose objects are all present, best root first.
    pub fn find(&self, roots: &[ContentHash]) -> Option<TreeRecord> {
        let records = self.records();
        roots.iter().find_map(|root| {
            records
                .iter()
                .find(|r| r.root == *root)
                .filter(|r| {
                    r.manifest.entries.values().all(|e| match e {
                        Entry::File { hash, .. } => self.has(hash),
                        _ => true,
                    })
                })
                .cloned()
        })
    }

    pub fn remove_record(&self, run: &RunId) {
        let _shared = self.shared();
        let _ = fs::remove_file(self.record_path(run));
    }

    /// Deletes every object no record names. Returns the bytes freed.
    pub fn collect_garbage(&self) -> u64 {
        let records = self.records();
        let _alone = self.lock.write().unwrap_or_else(|p| p.into_inner());
        let mut referenced = HashSet::new();
        for record in &records {
            for entry in record.manifest.entries.values() {
                if let Entry::File { hash, .. } = entry {
                    referenced.insert(hash.to_hex());
                }
            }
        }
        let mut freed = 0;
        for (path, name, len) in self.objects() {
            if !referenced.contains(&name) && fs::remove_file(&path).is_ok() {
                freed += len;
            }
        }
        freed
    }

    /// Bytes the objects take.
    pub fn bytes(&self) -> u64 {
        let _shared = self.shared();
        self.objects().iter().map(|(_, _, len)| len).sum()
    }

    fn objects(&self) -> Vec<(PathBuf, String, u64)> {
        let mut out = Vec::new();
        let Ok(fans) = fs::read_dir(self.dir.join("objects")) else {
            return out;
        };
        for fan in fans.flatten() {
            let Ok(objects) = fs::read_dir(fan.path()) else {
                continue;
            };
            for object in objects.flatten() {
                let len = object.metadata().map(|m| m.len()).unwrap_or(0);
                let name = object.file_name().to_string_lossy().into_owned();
                out.push((object.path(), name, len));
            }
        }
        out
    }
}

/// Whether a failed reflink means the filesystem has none (rather than this one file
/// failing), so it is not tried again.
fn refuses_reflinks(e: &io::Error) -> bool {
    use nix::errno::Errno;
    e.kind() == io::ErrorKind::Unsupported
        || e.raw_os_error().map(Errno::from_raw).is_some_and(|errno| {
            [
                Errno::EOPNOTSUPP,
                Errno::EXDEV,
                Errno::EINVAL,
                Errno::ENOTTY,
                Errno::ENOSYS,
            ]
            .contains(&errno)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_of(files: &[(&str, &[u8])]) -> Manifest {
        let mut m = Manifest::default();
        for (path, content) in files {
            m.entries.insert(
                path.to_string(),
                Entry::File {
                    hash: ContentHash::of(content),
                    size_bytes: content.len() as u64,
                    executable: false,
                },
            );
        }
        m
    }

    fn ingest(store: &Store, dir: &Path, content: &[u8]) -> ContentHash {
        let src = dir.join("src");
        fs::write(&src, content).expect("write");
        let hash = ContentHash::of(content);
        store.ingest(&src, &hash).expect("ingest");
        hash
    }

    #[test]
    fn a_record_needs_all_its_objects_and_keeps_them_from_collection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("store")).expect("open");
        let run: RunId = "run-aaaaaaaaaaaa".parse().expect("id");
        let m = manifest_of(&[("a.py", b"one"), ("b.py", b"two")]);
        ingest(&store, dir.path(), b"one");
        assert!(!store.record(&run, &m, 1).expect("record"), "b.py missing");
        assert!(store.find(&[m.root()]).is_none());
        ingest(&store, dir.path(), b"two");
        let stray = ingest(&store, dir.path(), b"nobody's");
        assert!(store.record(&run, &m, 2).expect("record"));
        assert_eq!(store.find(&[m.root()]).map(|r| r.run), Some(run.clone()));
        assert_eq!(store.collect_garbage(), 8);
        assert!(!store.has(&stray));
        assert!(store.has(&ContentHash::of(b"one")));
        store.remove_record(&run);
        store.collect_garbage();
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn a_damaged_object_is_refused_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("store")).expect("open");
        let hash = ingest(&store, dir.path(), b"weights");
        let object = store.object_path(&hash);
        fs::set_permissions(&object, fs::Permissions::from_mode(0o644)).expect("chmod");
        fs::write(&object, b"w3ights").expect("damage");
        let mut buf = vec![0; 64];
        let to = dir.path().join("out");
        let err = store
            .copy_out(&hash, &to, 0o644, &mut buf)
            .map(|(how, _)| how);
        // A reflink (on filesystems with them) copies without reading: only a copy checks.
        if let Err(e) = err {
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(!to.exists() && !store.has(&hash));
        }
    }

    #[test]
    fn an_object_copied_out_is_not_the_store_s_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("store")).expect("open");
        let hash = ingest(&store, dir.path(), b"shared");
        let to = dir.path().join("tree-file");
        store
            .copy_out(&hash, &to, 0o644, &mut [0; 64])
            .expect("copy out");
        fs::write(&to, b"edited by a run").expect("the run writes its file");
        let mut back = String::new();
        fs::File::open(store.object_path(&hash))
            .and_then(|mut f| f.read_to_string(&mut back))
            .expect("read object");
        assert_eq!(back, "shared");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(store.object_path(&hash))
                .expect("meta")
                .nlink(),
            1
        );
    }
}
