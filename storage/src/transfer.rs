//! The parallel transfer engine, over any [`ObjectStore`].
//!
//! - Many objects at once, and large objects in parts: ranged GETs and multipart PUTs. All
//!   requests of one [`Engine`] share `concurrency` slots (many, so small objects keep the
//!   server busy), and every byte held in memory is reserved from a budget first (a part is
//!   read only once its bytes are reserved; ranged downloads stream to the file), so memory
//!   stays under `memory_budget` whatever the mix.
//! - Part size: at least the configured size, and large enough that no object needs more
//!   than 10,000 parts (S3's limit).
//! - Every request is retried with jittered exponential backoff when the failure is
//!   transient (a dropped connection, a timeout, a 5xx); a multipart upload that fails for
//!   good is aborted, so no partial object remains.
//! - Integrity: ranged reads are pinned to one ETag (an object replaced mid-download fails
//!   as `Changed` rather than being stitched from two versions); lengths are checked; S3
//!   parts carry a CRC32 the server verifies; and every upload returns a [`ContentHash`]
//!   of exactly the bytes sent, which [`verify_file`] checks after a download.
//! - Downloads go to a hidden partial file beside the destination, renamed into place only
//!   when complete. Large ones keep a record of the parts they hold, so a cut download
//!   resumes with the parts it lacks. The destination gets the object's modification time,
//!   which is how a later pull knows the file is present and identical.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::{ObjectMeta, ObjectStore, StoreError, blocking, relative_key};

/// S3 refuses uploads of more parts than this.
pub const MAX_PARTS: u64 = 10_000;
/// S3's smallest part (but the last).
pub const MIN_PART: u64 = 5 << 20;
const MIB: u64 = 1 << 20;

/// How a transfer is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Requests in flight at once, across all objects of one engine.
    pub concurrency: usize,
    /// Bytes of object data held in memory at once, across all requests.
    pub memory_budget: u64,
    /// The smallest part of a multipart upload.
    pub part_size: u64,
    /// The smallest part of a ranged download (no memory cost: parts stream to the file).
    pub download_part_size: u64,
    /// Parts of one object in flight at once (more only adds contention at the server).
    pub parts_per_object: usize,
    /// Objects larger than this are transferred in parts.
    pub multipart_threshold: u64,
    /// Tries per request before a transient failure is given up on.
    pub attempts: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            concurrency: 64,
            memory_budget: 128 * MIB,
            part_size: 8 * MIB,
            download_part_size: 32 * MIB,
            parts_per_object: 8,
            multipart_threshold: 16 * MIB,
            attempts: 6,
        }
    }
}

/// The part size for an object of `size` bytes: at least `min` (and S3's 5 MiB), a whole
/// number of MiB, and large enough for at most [`MAX_PARTS`] parts.
pub fn part_size(size: u64, min: u64) -> u64 {
    let needed = size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    min.max(MIN_PART).max(needed)
}

/// Counters a progress bar reads while a transfer runs.
#[derive(Debug, Default)]
pub struct Progress {
    files_total: AtomicU64,
    files_done: AtomicU64,
    bytes_total: AtomicU64,
    bytes_done: AtomicU64,
}

/// One reading of [`Progress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressSnapshot {
    pub files_total: u64,
    pub files_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
}

impl Progress {
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            files_total: self.files_total.load(Ordering::Relaxed),
            files_done: self.files_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
        }
    }

    fn add_total(&self, files: u64, bytes: u64) {
        self.files_total.fetch_add(files, Ordering::Relaxed);
        self.bytes_total.fetch_add(bytes, Ordering::Relaxed);
    }

    fn add_bytes(&self, bytes: u64) {
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
    }

    fn file_done(&self) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
    }
}

/// A content hash of exactly the bytes uploaded: BLAKE3 over the BLAKE3 of each
/// `part_size` piece, so parts are hashed in parallel as they are sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContentHash {
    pub part_size: u64,
    pub blake3: String,
}

impl ContentHash {
    fn of_parts(part_size: u64, parts: &[blake3::Hash]) -> Self {
        let mut outer = blake3::Hasher::new();
        for part in parts {
            outer.update(part.as_bytes());
        }
        ContentHash {
            part_size,
            blake3: outer.finalize().to_hex().to_string(),
        }
    }

    /// The hash of the file at `path`, pieced the same way.
    pub fn of_file(path: &Path, part_size: u64) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        let mut parts = Vec::new();
        let mut buf = vec![0u8; part_size.min(size.max(1)) as usize];
        let mut offset = 0;
        while offset < size || (size == 0 && parts.is_empty()) {
            let len = part_size.min(size - offset) as usize;
            file.read_exact_at(&mut buf[..len], offset)?;
            parts.push(blake3::hash(&buf[..len]));
            offset += len as u64;
            if size == 0 {
                break;
            }
        }
        Ok(Self::of_parts(part_size, &parts))
    }
}

/// Checks a downloaded file against the hash recorded when it was uploaded.
pub fn verify_file(path: &Path, expected: &ContentHash) -> Result<(), StoreError> {
    let actual = ContentHash::of_file(path, expected.part_size)
        .map_err(StoreError::io(format!("reading {}", path.display())))?;
    if &actual == expected {
        Ok(())
    } else {
        Err(StoreError::Integrity {
            what: path.display().to_string(),
            detail: format!(
                "its BLAKE3 is {} but {} was uploaded",
                actual.blake3, expected.blake3
            ),
        })
    }
}

/// A file the engine uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub key: String,
    pub size: u64,
    pub hash: ContentHash,
}

/// A file the engine downloaded (or found present and identical).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub key: String,
    pub path: PathBuf,
    pub size: u64,
    /// Bytes actually fetched: less than `size` when a cut download resumed, 0 when skipped.
    pub fetched: u64,
}

/// What a prefix download did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullReport {
    pub files: u64,
    pub skipped: u64,
    pub bytes: u64,
    pub fetched: u64,
    /// Keys that would have been written outside the destination, refused.
    pub refused: Vec<String>,
}

/// Transfers objects between local files and one store.
#[derive(Debug, Clone)]
pub struct Engine<S> {
    store: S,
    tuning: Tuning,
    slots: Arc<Semaphore>,
    /// The memory budget, in units of [`MEMORY_UNIT`].
    memory: Arc<Semaphore>,
    progress: Arc<Progress>,
}

/// The granularity of the memory budget.
const MEMORY_UNIT: u64 = 64 << 10;

/// A request slot and the memory reserved for its bytes, released together.
#[derive(Debug)]
struct Reservation {
    _memory: tokio::sync::OwnedSemaphorePermit,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// The hidden partial file a download writes before renaming into place, and its record.
fn partial_paths(dest: &Path) -> (PathBuf, PathBuf) {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = dest.parent().unwrap_or(Path::new("."));
    (
        dir.join(format!(".{name}.runctl-partial")),
        dir.join(format!(".{name}.runctl-partial.json")),
    )
}

/// Whether `name` is one of the engine's own partial files.
pub fn is_partial_name(name: &str) -> bool {
    name.ends_with(".runctl-partial") || name.ends_with(".runctl-partial.json")
}

/// What a resumable download holds so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PartialRecord {
    etag: String,
    size: u64,
    part_size: u64,
    done: BTreeSet<u64>,
}

fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1 << attempt.min(5));
    base.min(Duration::from_secs(5))
        .mul_f64(0.5 + 0.5 * rand::random::<f64>())
}

fn join_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Io {
        context: "transfer task".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// A file's identity for noticing it changed under an upload.
fn stamp(meta: &std::fs::Metadata) -> (u64, Option<SystemTime>) {
    (meta.len(), meta.modified().ok())
}

impl<S: ObjectStore + Clone + 'static> Engine<S> {
    pub fn new(store: S, tuning: Tuning) -> Self {
        Engine {
            store,
            slots: Arc::new(Semaphore::new(tuning.concurrency.max(1))),
            memory: Arc::new(Semaphore::new(
                (tuning.memory_budget / MEMORY_UNIT).clamp(1, u32::MAX as u64) as usize,
            )),
            tuning,
            progress: Arc::default(),
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// The counters of every transfer this engine runs.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Waits for `bytes` of the memory budget (the whole budget at most), then a slot.
    async fn reserve(&self, bytes: u64) -> Reservation {
        let total = (self.tuning.memory_budget / MEMORY_UNIT).clamp(1, u32::MAX as u64);
        let units = bytes.div_ceil(MEMORY_UNIT).clamp(1, total) as u32;
        let memory = self
            .memory
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("the budget is never closed");
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("slots are never closed");
        Reservation {
            _memory: memory,
            _slot: slot,
        }
    }

    /// Runs `op` until it succeeds, fails for good, or runs out of attempts.
    async fn retry<T, F, Fut>(
        &self,
        what: &(dyn Fn() -> String + Sync),
        mut op: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Ok(value) => return Ok(value),
                Err(e) if e.is_retryable() && attempt + 1 < self.tuning.attempts => {
                    let delay = backoff(attempt);
                    tracing::debug!("{}: {e}; retrying in {delay:?}", what());
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Uploads the file at `src` as `key`. Fails with `SourceChanged` if the file changed
    /// while it was read (the object is then not created).
    pub async fn upload_file(&self, src: &Path, key: &str) -> Result<Uploaded, StoreError> {
        crate::validate_key(key)?;
        let meta = tokio::fs::metadata(src)
            .await
            .map_err(StoreError::io(format!("reading {}", src.display())))?;
        if !meta.is_file() {
            return Err(StoreError::Io {
                context: src.display().to_string(),
                source: std::io::Error::other("not a regular file"),
            });
        }
        let before = stamp(&meta);
        let size = meta.len();
        self.progress.add_total(1, size);
        let file = Arc::new(
            File::open(src).map_err(StoreError::io(format!("opening {}", src.display())))?,
        );
        let hash = if size <= self.tuning.multipart_threshold {
            self.upload_single(&file, src, key, size).await?
        } else {
            self.upload_parts(&file, src, key, size).await?
        };
        let after = tokio::fs::metadata(src)
            .await
            .map_err(StoreError::io(format!("reading {}", src.display())))?;
        if stamp(&after) != before {
            return Err(StoreError::SourceChanged {
                path: src.display().to_string(),
            });
        }
        self.progress.file_done();
        Ok(Uploaded {
            key: key.to_owned(),
            size,
            hash,
        })
    }

    async fn read_part(
        file: &Arc<File>,
        src: &Path,
        offset: u64,
        len: u64,
    ) -> Result<(Bytes, blake3::Hash), StoreError> {
        let (file, context) = (file.clone(), format!("reading {}", src.display()));
        blocking(move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)
                .map_err(StoreError::io(context))?;
            let hash = blake3::hash(&buf);
            Ok((Bytes::from(buf), hash))
        })
        .await
    }

    async fn upload_single(
        &self,
        file: &Arc<File>,
        src: &Path,
        key: &str,
        size: u64,
    ) -> Result<ContentHash, StoreError> {
        let _reserved = self.reserve(size).await;
        let (body, hash) = Self::read_part(file, src, 0, size).await?;
        let what = || format!("uploading {key}");
        self.retry(&what, || self.store.put(key, body.clone()))
            .await?;
        self.progress.add_bytes(size);
        Ok(ContentHash::of_parts(size.max(1), &[hash]))
    }

    async fn upload_parts(
        &self,
        file: &Arc<File>,
        src: &Path,
        key: &str,
        size: u64,
    ) -> Result<ContentHash, StoreError> {
        let part = part_size(size, self.tuning.part_size);
        let count = size.div_ceil(part);
        let what = || format!("starting the upload of {key}");
        let upload = self.retry(&what, || self.store.create_upload(key)).await?;
        let mut tasks = JoinSet::new();
        for index in 0..count {
            let (engine, file, src, key, upload) = (
                self.clone(),
                file.clone(),
                src.to_owned(),
                key.to_owned(),
                upload.clone(),
            );
            tasks.spawn(async move {
                let offset = index * part;
                let len = part.min(size - offset);
                let _reserved = engine.reserve(len).await;
                let (body, hash) = Self::read_part(&file, &src, offset, len).await?;
                let number = index as u32 + 1;
                let what = || format!("uploading part {number} of {key}");
                let acked = engine
                    .retry(&what, || {
                        engine
                            .store
                            .upload_part(&key, &upload, number, body.clone())
                    })
                    .await?;
                engine.progress.add_bytes(len);
                Ok::<_, StoreError>((acked, hash))
            });
        }
        let mut parts = Vec::with_capacity(count as usize);
        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            match joined.map_err(join_error).and_then(|r| r) {
                Ok(done) => parts.push(done),
                Err(e) => {
                    failure.get_or_insert(e);
                    tasks.abort_all();
                }
            }
        }
        let completed = match failure {
            Some(e) => Err(e),
            None => {
                parts.sort_by_key(|(p, _)| p.number);
                let acked: Vec<_> = parts.iter().map(|(p, _)| p.clone()).collect();
                let what = || format!("completing the upload of {key}");
                self.retry(&what, || {
                    self.store.complete_upload(key, &upload, acked.clone())
                })
                .await
            }
        };
        if let Err(e) = completed {
            if let Err(abort) = self.store.abort_upload(key, &upload).await {
                tracing::warn!("aborting the failed upload of {key}: {abort}");
            }
            return Err(e);
        }
        let hashes: Vec<_> = parts.iter().map(|(_, h)| *h).collect();
        Ok(ContentHash::of_parts(part, &hashes))
    }

    /// Downloads `key` to `dest` (through a partial file, renamed into place when whole).
    /// `meta` saves a HEAD when the caller has listed the object already.
    pub async fn download_file(
        &self,
        key: &str,
        dest: &Path,
        meta: Option<ObjectMeta>,
    ) -> Result<Downloaded, StoreError> {
        let meta = match meta {
            Some(meta) => meta,
            None => self
                .retry(&|| format!("looking up {key}"), || self.store.head(key))
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    key: key.to_owned(),
                })?,
        };
        self.progress.add_total(1, meta.size);
        let dir = dest.parent().unwrap_or(Path::new("."));
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(StoreError::io(format!("creating {}", dir.display())))?;
        let (partial, record_path) = partial_paths(dest);
        let fetched = if meta.size <= self.tuning.multipart_threshold || meta.etag.is_none() {
            self.download_single(&meta, &partial).await?
        } else {
            match self.download_parts(&meta, &partial, &record_path).await {
                Err(StoreError::Changed { key }) => {
                    // A new version replaced the object: what we hold is of the old one.
                    let _ = std::fs::remove_file(&partial);
                    let _ = std::fs::remove_file(&record_path);
                    return Err(StoreError::Changed { key });
                }
                other => other?,
            }
        };
        let (partial2, dest2, modified) = (partial.clone(), dest.to_owned(), meta.modified_ms);
        blocking(move || {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&partial2)
                .map_err(StoreError::io(format!("opening {}", partial2.display())))?;
            if let Some(ms) = modified {
                let time = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
                file.set_modified(time).map_err(StoreError::io(format!(
                    "setting the time of {}",
                    partial2.display()
                )))?;
            }
            file.sync_all()
                .map_err(StoreError::io(format!("syncing {}", partial2.display())))?;
            std::fs::rename(&partial2, &dest2)
                .map_err(StoreError::io(format!("renaming into {}", dest2.display())))
        })
        .await?;
        let _ = tokio::fs::remove_file(&record_path).await;
        self.progress.file_done();
        Ok(Downloaded {
            key: meta.key.clone(),
            path: dest.to_owned(),
            size: meta.size,
            fetched,
        })
    }

    async fn download_single(&self, meta: &ObjectMeta, partial: &Path) -> Result<u64, StoreError> {
        let _reserved = self.reserve(meta.size).await;
        let what = || format!("downloading {}", meta.key);
        let body = self
            .retry(&what, || {
                self.store.get(&meta.key, None, meta.etag.as_deref())
            })
            .await?;
        if body.len() != meta.size {
            return Err(StoreError::Changed {
                key: meta.key.clone(),
            });
        }
        let len = body.len();
        let path = partial.to_owned();
        blocking(move || {
            let context = || format!("writing {}", path.display());
            let file = File::create(&path).map_err(StoreError::io(context()))?;
            body.write_all_at(&file, 0)
                .map_err(StoreError::io(context()))
        })
        .await?;
        self.progress.add_bytes(len);
        Ok(len)
    }

    async fn download_parts(
        &self,
        meta: &ObjectMeta,
        partial: &Path,
        record_path: &Path,
    ) -> Result<u64, StoreError> {
        let etag = meta.etag.clone().unwrap_or_default();
        let part = part_size(meta.size, self.tuning.download_part_size);
        let count = meta.size.div_ceil(part);
        let fresh = PartialRecord {
            etag: etag.clone(),
            size: meta.size,
            part_size: part,
            done: BTreeSet::new(),
        };
        // Resume only what was fetched of this very version, with these parts.
        let record = std::fs::read(record_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<PartialRecord>(&b).ok())
            .filter(|r| r.etag == fresh.etag && r.size == fresh.size && r.part_size == part)
            .filter(|_| partial.is_file())
            .unwrap_or(fresh);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(partial)
            .map_err(StoreError::io(format!("opening {}", partial.display())))?;
        file.set_len(meta.size)
            .map_err(StoreError::io(format!("sizing {}", partial.display())))?;
        let file = Arc::new(file);
        let already: u64 = record
            .done
            .iter()
            .map(|&i| part.min(meta.size - i * part))
            .sum();
        self.progress.add_bytes(already);
        let state = Arc::new(tokio::sync::Mutex::new(record));
        let in_flight = Arc::new(Semaphore::new(self.tuning.parts_per_object.max(1)));
        let mut tasks = JoinSet::new();
        for index in 0..count {
            if state.lock().await.done.contains(&index) {
                continue;
            }
            let (engine, file, key, etag, state, record_path) = (
                self.clone(),
                file.clone(),
                meta.key.clone(),
                etag.clone(),
                state.clone(),
                record_path.to_owned(),
            );
            let size = meta.size;
            let in_flight = in_flight.clone();
            tasks.spawn(async move {
                let _turn = in_flight.acquire().await.expect("never closed");
                // A ranged download streams to the file: about a write batch in memory.
                let _reserved = engine.reserve(2 << 20).await;
                let offset = index * part;
                let len = part.min(size - offset);
                let what = || format!("downloading part {} of {key}", index + 1);
                engine
                    .retry(&what, || {
                        engine.store.get_into(
                            &key,
                            offset..offset + len,
                            Some(&etag),
                            file.clone(),
                            offset,
                        )
                    })
                    .await?;
                engine.progress.add_bytes(len);
                let mut guard = state.lock().await;
                guard.done.insert(index);
                // Persist progress with each part, data first, so a process killed
                // mid-pull resumes from every part it completed (a part is at least
                // 32 MiB: one sync each costs little). Parts in flight complete together,
                // so a time-based throttle here recorded only the first of them.
                let record = serde_json::to_vec(&*guard).expect("a record serializes");
                let (file, record_path) = (file.clone(), record_path.clone());
                blocking(move || {
                    file.sync_data()
                        .map_err(StoreError::io("syncing a partial download"))?;
                    write_record(&record_path, &record)
                })
                .await?;
                Ok::<u64, StoreError>(len)
            });
        }
        let mut fetched = 0;
        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            match joined.map_err(join_error).and_then(|r| r) {
                Ok(len) => fetched += len,
                Err(e) => {
                    failure.get_or_insert(e);
                    tasks.abort_all();
                }
            }
        }
        // Whatever happened, keep the record of what is held, for the next try.
        let record = serde_json::to_vec(&*state.lock().await).expect("a record serializes");
        let (f, rp) = (file.clone(), record_path.to_owned());
        let saved = blocking(move || {
            f.sync_data()
                .map_err(StoreError::io("syncing a partial download"))?;
            write_record(&rp, &record)
        })
        .await;
        if let Some(e) = failure {
            return Err(e);
        }
        saved?;
        Ok(fetched)
    }

    /// Downloads every object under `prefix` into `dest_dir` (keys below the prefix become
    /// relative paths), skipping files already present and identical (same size and
    /// modification time as the object). Keys that would escape `dest_dir` are refused.
    pub async fn download_prefix(
        &self,
        prefix: &str,
        dest_dir: &Path,
    ) -> Result<PullReport, StoreError> {
        let listing = self
            .retry(&|| format!("listing {prefix}"), || {
                self.store.list(prefix, false)
            })
            .await?;
        let mut report = PullReport::default();
        let mut todo = Vec::new();
        for object in listing.objects {
            if object.key.ends_with('/') {
                continue; // a "folder" marker
            }
            let Some(rel) = relative_key(prefix, &object.key) else {
                report.refused.push(object.key);
                continue;
            };
            let dest = dest_dir.join(rel);
            report.files += 1;
            report.bytes += object.size;
            if is_identical(&dest, &object) {
                report.skipped += 1;
                self.progress.add_total(1, object.size);
                self.progress.add_bytes(object.size);
                self.progress.file_done();
                continue;
            }
            todo.push((object, dest));
        }
        for done in self.download_all(todo).await? {
            report.fetched += done.fetched;
        }
        Ok(report)
    }

    /// Downloads many objects, up to twice `concurrency` files at once; the first failure
    /// stops the rest (what completed stays, partial files are kept for resuming).
    pub async fn download_all(
        &self,
        items: Vec<(ObjectMeta, PathBuf)>,
    ) -> Result<Vec<Downloaded>, StoreError> {
        self.each_file(items, |engine, (meta, dest)| async move {
            engine
                .download_file(&meta.key.clone(), &dest, Some(meta))
                .await
        })
        .await
    }

    /// Uploads many files, up to twice `concurrency` files at once; the first failure
    /// stops the rest.
    pub async fn upload_all(
        &self,
        items: Vec<(PathBuf, String)>,
    ) -> Result<Vec<Uploaded>, StoreError> {
        self.each_file(items, |engine, (src, key)| async move {
            engine.upload_file(&src, &key).await
        })
        .await
    }

    /// Runs `work` on every item, a bounded number of files at once (each file's requests
    /// still share the engine's slots and budget), collecting the results.
    async fn each_file<I, T, F, Fut>(&self, items: Vec<I>, work: F) -> Result<Vec<T>, StoreError>
    where
        I: Send + 'static,
        T: Send + 'static,
        F: Fn(Engine<S>, I) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let files = Arc::new(Semaphore::new(self.tuning.concurrency.max(1) * 2));
        let mut tasks = JoinSet::new();
        for item in items {
            let (files, job) = (files.clone(), work(self.clone(), item));
            tasks.spawn(async move {
                let _file = files.acquire().await.expect("never closed");
                job.await
            });
        }
        collect(tasks).await
    }

    /// Deletes many objects, `concurrency` at a time.
    pub async fn delete_all(&self, keys: Vec<String>) -> Result<(), StoreError> {
        let mut tasks = JoinSet::new();
        for key in keys {
            let engine = self.clone();
            tasks.spawn(async move {
                let _reserved = engine.reserve(0).await;
                engine
                    .retry(&|| format!("deleting {key}"), || engine.store.delete(&key))
                    .await
            });
        }
        collect(tasks).await.map(drop)
    }
}

async fn collect<T: 'static>(
    mut tasks: JoinSet<Result<T, StoreError>>,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.map_err(join_error).and_then(|r| r) {
            Ok(value) => out.push(value),
            Err(e) => {
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                return Err(e);
            }
        }
    }
    Ok(out)
}

fn write_record(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).map_err(StoreError::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(StoreError::io(format!("writing {}", path.display())))
}

/// Whether the file at `path` is this object already: same size, same modification time
/// (to the millisecond where the store keeps them, to the second as S3 does).
pub fn is_identical(path: &Path, object: &ObjectMeta) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let (Some(local_ms), Some(remote_ms)) = (
        meta.modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64),
        object.modified_ms,
    ) else {
        return false;
    };
    let same_time = if remote_ms % 1000 == 0 {
        local_ms.div_euclid(1000) == remote_ms.div_euclid(1000)
    } else {
        local_ms == remote_ms
    };
    meta.is_file() && meta.len() == object.size && same_time
}

/// Every regular file under `dir` as (path, '/'-separated relative name), sorted; symbolic
/// links are not followed.
pub fn walk_files(dir: &Path) -> Result<Vec<(PathBuf, String)>, StoreError> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_owned(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        let entries = std::fs::read_dir(&path)
            .map_err(StoreError::io(format!("listing {}", path.display())))?;
        for entry in entries {
            let entry = entry.map_err(StoreError::io(format!("listing {}", path.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let kind = entry.file_type().map_err(StoreError::io(format!(
                "reading {}",
                entry.path().display()
            )))?;
            if kind.is_dir() {
                stack.push((entry.path(), child_rel));
            } else if kind.is_file() && !is_partial_name(&name) {
                out.push((entry.path(), child_rel));
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;

    #[test]
    fn part_sizes_respect_the_part_limit() {
        assert_eq!(part_size(100, 8 * MIB), 8 * MIB);
        assert_eq!(part_size(100, MIB), MIN_PART);
        let tib = 1u64 << 40;
        let p = part_size(tib, 8 * MIB);
        assert!(tib.div_ceil(p) <= MAX_PARTS, "{p}");
        assert_eq!(p % MIB, 0);
        let max_object = 5 * tib;
        assert!(max_object.div_ceil(part_size(max_object, 8 * MIB)) <= MAX_PARTS);
    }

    fn small_parts() -> Tuning {
        Tuning {
            concurrency: 4,
            memory_budget: 64 * MIB,
            part_size: MIN_PART,
            download_part_size: MIN_PART,
            parts_per_object: 4,
            multipart_threshold: MIN_PART,
            attempts: 2,
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn multipart_round_trip_on_the_local_store_with_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::new(
            LocalStore::new(dir.path().join("bkt"), "bkt"),
            small_parts(),
        );
        let src = dir.path().join("src.bin");
        let data = pattern(12 * MIB as usize + 7);
        std::fs::write(&src, &data).expect("write");
        let up = engine.upload_file(&src, "a/b.bin").await.expect("upload");
        assert_eq!(up.size, data.len() as u64);
        assert_eq!(up.hash, ContentHash::of_file(&src, MIN_PART).expect("hash"));
        let dest = dir.path().join("out/b.bin");
        let down = engine
            .download_file("a/b.bin", &dest, None)
            .await
            .expect("download");
        assert_eq!(down.fetched, data.len() as u64);
        assert_eq!(std::fs::read(&dest).expect("read"), data);
        verify_file(&dest, &up.hash).expect("verified");
        std::fs::write(&dest, b"tampered").expect("write");
        assert!(matches!(
            verify_file(&dest, &up.hash),
            Err(StoreError::Integrity { .. })
        ));
        let snap = engine.progress().snapshot();
        assert_eq!(snap.files_done, 2);
        assert_eq!(snap.bytes_done, 2 * data.len() as u64);
    }

    #[tokio::test]
    async fn a_budget_smaller_than_a_part_still_moves_everything_one_part_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tuning = Tuning {
            memory_budget: MIB,
            ..small_parts()
        };
        let engine = Engine::new(LocalStore::new(dir.path().join("bkt"), "bkt"), tuning);
        let src = dir.path().join("src.bin");
        let data = pattern(3 * MIN_PART as usize);
        std::fs::write(&src, &data).expect("write");
        let items = (0..4).map(|i| (src.clone(), format!("k{i}"))).collect();
        assert_eq!(engine.upload_all(items).await.expect("upload").len(), 4);
        let dest = dir.path().join("back.bin");
        engine
            .download_file("k3", &dest, None)
            .await
            .expect("download");
        assert_eq!(std::fs::read(&dest).expect("read"), data);
    }

    #[tokio::test]
    async fn a_cut_download_resumes_with_the_parts_it_lacks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().join("bkt"), "bkt");
        let engine = Engine::new(store.clone(), small_parts());
        let data = pattern(4 * MIN_PART as usize);
        store
            .put("big", Bytes::from(data.clone()))
            .await
            .expect("put");
        let meta = store.head("big").await.expect("head").expect("there");
        // Pretend parts 0 and 2 arrived before the cut.
        let dest = dir.path().join("big");
        let (partial, record) = partial_paths(&dest);
        let mut held = vec![0u8; data.len()];
        let p = MIN_PART as usize;
        held[..p].copy_from_slice(&data[..p]);
        held[2 * p..3 * p].copy_from_slice(&data[2 * p..3 * p]);
        std::fs::write(&partial, &held).expect("write");
        let rec = PartialRecord {
            etag: meta.etag.clone().expect("etag"),
            size: meta.size,
            part_size: MIN_PART,
            done: [0, 2].into(),
        };
        std::fs::write(&record, serde_json::to_vec(&rec).expect("json")).expect("write");
        let down = engine
            .download_file("big", &dest, None)
            .await
            .expect("download");
        assert_eq!(down.fetched, 2 * MIN_PART);
        assert_eq!(std::fs::read(&dest).expect("read"), data);
        assert!(!partial.exists() && !record.exists());
        assert!(is_identical(&dest, &meta));
    }

    #[tokio::test]
    async fn prefix_download_skips_identical_and_refuses_nothing_safe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().join("bkt"), "bkt");
        for (key, body) in [("d/x", "1"), ("d/sub/y", "22"), ("other", "3")] {
            store.put(key, Bytes::from(body)).await.expect("put");
        }
        let engine = Engine::new(store, small_parts());
        let out = dir.path().join("out");
        let first = engine.download_prefix("d/", &out).await.expect("pull");
        assert_eq!((first.files, first.skipped, first.fetched), (2, 0, 3));
        assert_eq!(std::fs::read(out.join("sub/y")).expect("read"), b"22");
        let second = engine.download_prefix("d/", &out).await.expect("pull");
        assert_eq!((second.files, second.skipped, second.fetched), (2, 2, 0));
        std::fs::write(out.join("x"), "9").expect("edit");
        let third = engine.download_prefix("d/", &out).await.expect("pull");
        assert_eq!((third.skipped, third.fetched), (1, 1));
        assert_eq!(std::fs::read(out.join("x")).expect("read"), b"1");
    }
}
