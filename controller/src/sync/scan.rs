//! Scans a project root into a manifest: gitignore rules (`.gitignore`,
//! `.git/info/exclude`) plus `.runctlignore`, whose `!pattern` lines bring back paths the
//! others ignore; never `.git` or the controller's own home. Files are hashed with BLAKE3
//! unless the stat cache says they have not changed, so an unchanged tree costs one stat
//! per file.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use protocol::manifest::{ContentHash, Entry, Manifest, check_symlink};
use serde::{Deserialize, Serialize};

/// The per-project ignore file, in `.gitignore` syntax.
pub const IGNORE_FILE: &str = ".runctlignore";

/// A file modified this close to a scan may change again within the same timestamp tick
/// (file systems stamp with a coarse clock, 1 to 10 ms), so its hash is not cached: the
/// "racily clean" problem git also guards against.
const RACY_WINDOW: Duration = Duration::from_millis(100);

/// What a scan remembers about each file: its stat then, and its hash.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatCache {
    files: HashMap<String, Cached>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Cached {
    size_bytes: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    hash: ContentHash,
}

/// A scan's result.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub manifest: Manifest,
    /// Files read and hashed because the cache could not vouch for them.
    pub hashed_files: u64,
    /// Things left out, for the user: symlinks that leave the tree, special files.
    pub skipped: Vec<String>,
}

/// The project's files as a sync sees them: ignore rules applied, `.git` and `private`
/// left out.
fn walk(root: &Path, private: &Path) -> ignore::Walk {
    ignore::WalkBuilder::new(root)
        .hidden(false)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(false)
        .require_git(false)
        .add_custom_ignore_filename(IGNORE_FILE)
        .filter_entry({
            let private = private.to_owned();
            move |e| e.file_name() != ".git" && !e.path().starts_with(&private)
        })
        .build()
}

/// Where the daemon keeps `root`'s stat cache under its sync dir: there is one once the
/// tree has been scanned for a sync.
pub fn cache_path(dir: &Path, root: &Path) -> PathBuf {
    let key = ContentHash::of(root.as_os_str().as_encoded_bytes());
    dir.join(format!("stat-{}.cache", &key.to_hex()[..16]))
}

/// How big a tree is as a sync would send it, without reading any file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TreeSize {
    pub files: u64,
    pub bytes: u64,
    /// The biggest top-level directories (`.` for the files at the root), by bytes.
    pub biggest: Vec<DirSize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirSize {
    pub dir: String,
    pub files: u64,
    pub bytes: u64,
}

/// Walks `root` as `scan` would, adding up regular files' sizes per top-level directory.
pub fn measure(root: &Path, private: &Path) -> anyhow::Result<TreeSize> {
    let mut per_dir: HashMap<String, DirSize> = HashMap::new();
    for entry in walk(root, private) {
        let entry = entry.with_context(|| format!("scanning {}", root.display()))?;
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
        let mut parts = rel.components();
        let first = parts.next();
        let dir = match (first, parts.next()) {
            (Some(dir), Some(_)) => dir.as_os_str().to_string_lossy().into_owned(),
            _ => ".".to_owned(),
        };
        let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
        let slot = per_dir.entry(dir.clone()).or_insert(DirSize {
            dir,
            files: 0,
            bytes: 0,
        });
        slot.files += 1;
        slot.bytes += bytes;
    }
    Ok(sized(per_dir.into_values().collect()))
}

/// The totals, and the five biggest directories, biggest first (ties by name).
fn sized(mut dirs: Vec<DirSize>) -> TreeSize {
    let files = dirs.iter().map(|d| d.files).sum();
    let bytes = dirs.iter().map(|d| d.bytes).sum();
    dirs.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.dir.cmp(&b.dir)));
    dirs.truncate(5);
    TreeSize {
        files,
        bytes,
        biggest: dirs,
    }
}

/// Scans `root`, leaving out everything under `private` (the controller's home: its CA
/// key must never leave the laptop, even when a project contains it).
pub fn scan(root: &Path, private: &Path, cache: &mut StatCache) -> anyhow::Result<Scan> {
    scan_at(root, private, cache, SystemTime::now())
}

/// `scan` as of `now`, which decides which files are too fresh to cache.
fn scan_at(
    root: &Path,
    private: &Path,
    cache: &mut StatCache,
    now: SystemTime,
) -> anyhow::Result<Scan> {
    let started_ns = ns(now);
    let mut out = Scan::default();
    let mut next = HashMap::with_capacity(cache.files.len());
    let racy_ns = RACY_WINDOW.as_nanos() as i64;
    // Files the cache cannot vouch for: hashed after the walk, in parallel.
    let mut to_hash: Vec<(String, PathBuf, Cached, bool)> = Vec::new();
    for entry in walk(root, private) {
        let entry = entry.with_context(|| format!("scanning {}", root.display()))?;
        let rel = entry
            .path()
            .strip_prefix(root)
            .expect("the walk stays under its root");
        if rel.as_os_str().is_empty() {
            continue;
        }
        let rel = rel.to_str().with_context(|| {
            format!(
                "{} has a name that is not UTF-8; rename it, or list it in {IGNORE_FILE}",
                entry.path().display()
            )
        })?;
        let meta = entry
            .metadata()
            .with_context(|| format!("reading {}", entry.path().display()))?;
        let file_type = meta.file_type();
        let item = if file_type.is_dir() {
            Entry::Dir
        } else if file_type.is_symlink() {
            let target = std::fs::read_link(entry.path())
                .with_context(|| format!("reading the link {}", entry.path().display()))?;
            match target.to_str() {
                Some(target) if check_symlink(rel, target).is_ok() => Entry::Symlink {
                    target: target.to_owned(),
                },
                _ => {
                    out.skipped.push(format!(
                        "{rel} -> {}: a link that leaves the project is not synced",
                        target.display()
                    ));
                    continue;
                }
            }
        } else if file_type.is_file() {
            let stat = Cached {
                size_bytes: meta.len(),
                mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
                ino: meta.ino(),
                hash: ContentHash([0; 32]),
            };
            let executable = meta.mode() & 0o100 != 0;
            match cache.files.get(rel) {
                Some(c)
                    if Cached {
                        hash: c.hash,
                        ..stat
                    } == *c =>
                {
                    if started_ns - stat.mtime_ns.max(stat.ctime_ns) > racy_ns {
                        next.insert(rel.to_owned(), *c);
                    }
                    Entry::File {
                        hash: c.hash,
                        size_bytes: stat.size_bytes,
                        executable,
                    }
                }
                _ => {
                    to_hash.push((rel.to_owned(), entry.into_path(), stat, executable));
                    continue;
                }
            }
        } else {
            out.skipped
                .push(format!("{rel}: sockets, FIFOs and devices are not synced"));
            continue;
        };
        out.manifest.entries.insert(rel.to_owned(), item);
    }
    out.hashed_files = to_hash.len() as u64;
    let hashes = hash_all(&to_hash)?;
    for ((rel, _, stat, executable), hash) in to_hash.into_iter().zip(hashes) {
        if started_ns - stat.mtime_ns.max(stat.ctime_ns) > racy_ns {
            next.insert(rel.clone(), Cached { hash, ..stat });
        }
        let entry = Entry::File {
            hash,
            size_bytes: stat.size_bytes,
            executable,
        };
        out.manifest.entries.insert(rel, entry);
    }
    cache.files = next;
    Ok(out)
}

/// Hashes files on every core: a first scan of a large project is bound by hashing.
fn hash_all(files: &[(String, PathBuf, Cached, bool)]) -> anyhow::Result<Vec<ContentHash>> {
    let workers = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .min(files.len().div_ceil(64).max(1));
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<ContentHash>>> = files.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((_, path, _, _)) = files.get(i) else {
                            return Ok(());
                        };
                        let hash = hash_file(path)?;
                        *results[i].lock().expect("never poisoned") = Some(hash);
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("a hashing thread does not panic")?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .expect("never poisoned")
                .expect("every file hashed")
        })
        .collect())
}

fn hash_file(path: &Path) -> anyhow::Result<ContentHash> {
    std::fs::File::open(path)
        .and_then(ContentHash::of_reader)
        .with_context(|| format!("reading {}", path.display()))
}

fn ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(scan: &Scan) -> Vec<&str> {
        scan.manifest.entries.keys().map(String::as_str).collect()
    }

    #[test]
    fn honours_ignore_files_with_overrides_and_skips_git_and_home() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let write = |p: &str, s: &str| {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, s).expect("write");
        };
        write(".git/HEAD", "ref");
        write(".gitignore", "*.log\ndata/\n");
        write(IGNORE_FILE, "scratch/\n!data/\ndata/raw/\n");
        write("data/labels.csv", "a,b");
        write("data/raw/huge.bin", "x");
        write("scratch/tmp.txt", "x");
        write("train.py", "print(1)");
        write("out.log", "noise");
        write("home/pki/ca.key", "secret");
        std::os::unix::fs::symlink("/etc/passwd", root.join("outside")).expect("link");
        std::os::unix::fs::symlink("train.py", root.join("inside")).expect("link");
        let scan = scan(root, &root.join("home"), &mut StatCache::default()).expect("scan");
        assert_eq!(
            names(&scan),
            [
                ".gitignore",
                IGNORE_FILE,
                "data",
                "data/labels.csv",
                "inside",
                "train.py"
            ]
        );
        assert_eq!(scan.skipped.len(), 1, "{:?}", scan.skipped);
    }

    #[test]
    fn the_stat_cache_spares_rehashing_unchanged_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.py");
        std::fs::write(&path, "v1").expect("write");
        let home = dir.path().join("home");
        let mut cache = StatCache::default();
        let mut hashed = |now| {
            scan_at(dir.path(), &home, &mut cache, now)
                .expect("scan")
                .hashed_files
        };
        let later = SystemTime::now() + Duration::from_secs(60);
        assert_eq!(hashed(later), 1);
        assert_eq!(hashed(later), 0, "unchanged: the cache vouches for it");
        std::fs::write(&path, "v2").expect("write");
        assert_eq!(hashed(SystemTime::now()), 1, "changed");
        // Just written: inside the racy window, so not cached and hashed again.
        assert_eq!(hashed(SystemTime::now()), 1);
        assert_eq!(hashed(later), 1);
        assert_eq!(hashed(later), 0);
    }
}
