//! Unpacking a run's work directory (a zstd-compressed tar) safely: every entry must stay
//! inside the destination, only files, directories and in-tree symlinks are accepted, and
//! the decompressed size is bounded. The tree is built in a staging directory and renamed
//! into place, so nothing sees it half-written.

use std::cell::Cell;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

/// The default bound on a work directory's unpacked size.
pub const DEFAULT_MAX_UNPACKED_BYTES: u64 = 16 * 1024 * 1024 * 1024;

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// An entry's path is absolute or climbs out with `..`.
    #[error("refused entry {path:?}: its path escapes the work directory")]
    Escape { path: String },
    /// A symlink points outside the work directory.
    #[error("refused symlink {path:?} -> {target:?}: it points outside the work directory")]
    SymlinkEscape { path: String, target: String },
    /// Devices, FIFOs, hard links and other special entries are not accepted.
    #[error("refused entry {path:?}: {kind} entries are not allowed in a work directory")]
    Unsupported { path: String, kind: String },
    /// The decompressed stream grew past the bound.
    #[error("refused bundle: it unpacks to more than {limit_bytes} bytes")]
    TooLarge { limit_bytes: u64 },
    /// Reading or writing failed.
    #[error("unpacking failed: {0}")]
    Io(#[from] io::Error),
}

/// What was unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Unpacked {
    pub files: u64,
    pub bytes: u64,
}

/// Unpacks `archive` (tar.zst) as the directory `dest`, which must not exist yet.
pub fn unpack(archive: impl Read, dest: &Path, limit_bytes: u64) -> Result<Unpacked, BundleError> {
    let staging = dest.with_extension("staging");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    match unpack_into(archive, &staging, limit_bytes) {
        Ok(stats) => {
            std::fs::rename(&staging, dest)?;
            Ok(stats)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn unpack_into(archive: impl Read, dest: &Path, limit_bytes: u64) -> Result<Unpacked, BundleError> {
    let decoder = zstd::stream::read::Decoder::new(archive)?;
    let exceeded = Rc::new(Cell::new(false));
    let mut tar = tar::Archive::new(Limited {
        inner: decoder,
        remaining: limit_bytes,
        exceeded: exceeded.clone(),
    });
    // tar wraps reader errors in its own; the flag says which ones were the bound.
    let map_limit = |e: io::Error| {
        if exceeded.get() {
            BundleError::TooLarge { limit_bytes }
        } else {
            BundleError::Io(e)
        }
    };
    tar.set_preserve_permissions(true);
    tar.set_overwrite(true);
    let mut stats = Unpacked::default();
    let entries = tar.entries().map_err(map_limit)?;
    for entry in entries {
        let mut entry = entry.map_err(map_limit)?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = checked_path(&raw)?;
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Directory => {}
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if !symlink_stays_inside(&rel, &target) {
                    return Err(BundleError::SymlinkEscape {
                        path: raw,
                        target: target.display().to_string(),
                    });
                }
            }
            // Extended headers carry metadata for the next entry; tar handles them.
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            other => {
                return Err(BundleError::Unsupported {
                    path: raw,
                    kind: format!("{other:?}"),
                });
            }
        }
        if rel.as_os_str().is_empty() {
            continue; // "./" itself
        }
        if !entry.unpack_in(dest).map_err(map_limit)? {
            return Err(BundleError::Escape { path: raw });
        }
        if kind == tar::EntryType::Regular {
            stats.files += 1;
            stats.bytes += entry.header().size().unwrap_or(0);
        }
    }
    Ok(stats)
}

/// The entry's path relative to the work dir, refusing anything that could leave it.
fn checked_path(raw: &str) -> Result<PathBuf, BundleError> {
    let mut rel = PathBuf::new();
    for component in Path::new(raw).components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(BundleError::Escape {
                    path: raw.to_owned(),
                });
            }
        }
    }
    Ok(rel)
}

/// Whether a symlink at `link` (relative to the work dir) pointing at `target` resolves,
/// lexically, to somewhere inside the work dir.
fn symlink_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: Vec<&std::ffi::OsStr> = link
        .parent()
        .map(|p| {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(p) => Some(p),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for component in target.components() {
        match component {
            Component::Normal(part) => depth.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// A reader that fails, and raises its flag, once more than its bound has been read.
struct Limited<R> {
    inner: R,
    remaining: u64,
    exceeded: Rc<Cell<bool>>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A tar.zst whose entries are written with raw header names, so hostile paths that
    /// `tar::Builder` would refuse can be built.
    fn bundle(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(if name.ends_with(".sh") { 0o755 } else { 0o644 });
            let raw = &mut header.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            if !link.is_empty() {
                let raw = &mut header.as_old_mut().linkname;
                raw[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_cksum();
            builder.append(&header, *data).expect("append");
        }
        zstd::encode_all(&builder.into_inner().expect("finish")[..], 3).expect("compress")
    }

    fn check_refused(entries: &[(&str, tar::EntryType, &[u8], &str)], expected: &str) {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("work/tree");
        let err = unpack(&bundle(entries)[..], &dest, 1 << 20).expect_err(expected);
        assert!(err.to_string().contains(expected), "{err}");
        assert!(!dest.exists(), "nothing is left in place after a refusal");
        assert!(!dir.path().join("evil").exists());
        assert!(!dir.path().join("work/evil").exists());
    }

    #[test]
    fn unpacks_files_dirs_modes_and_inner_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("tree");
        let data = bundle(&[
            ("src/", tar::EntryType::Directory, b"", ""),
            ("src/train.py", tar::EntryType::Regular, b"print(1)\n", ""),
            ("run.sh", tar::EntryType::Regular, b"#!/bin/sh\n", ""),
            ("src/link.py", tar::EntryType::Symlink, b"", "train.py"),
            ("up.py", tar::EntryType::Symlink, b"", "src/../run.sh"),
        ]);
        let stats = unpack(&data[..], &dest, 1 << 20).expect("unpacks");
        assert_eq!(
            stats,
            Unpacked {
                files: 2,
                bytes: 19
            }
        );
        assert_eq!(
            std::fs::read(dest.join("src/link.py")).expect("read"),
            b"print(1)\n"
        );
        let mode = std::fs::metadata(dest.join("run.sh"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "executable bit kept");
    }

    #[test]
    fn hostile_entries_are_refused() {
        check_refused(&[("../evil", tar::EntryType::Regular, b"x", "")], "escapes");
        check_refused(
            &[("a/../../evil", tar::EntryType::Regular, b"x", "")],
            "escapes",
        );
        check_refused(
            &[("/tmp/evil", tar::EntryType::Regular, b"x", "")],
            "escapes",
        );
        check_refused(
            &[("ln", tar::EntryType::Symlink, b"", "/etc/passwd")],
            "points outside",
        );
        check_refused(
            &[("a/ln", tar::EntryType::Symlink, b"", "../../evil")],
            "points outside",
        );
        check_refused(&[("dev", tar::EntryType::Char, b"", "")], "not allowed");
        check_refused(&[("fifo", tar::EntryType::Fifo, b"", "")], "not allowed");
        check_refused(
            &[("hard", tar::EntryType::Link, b"", "/etc/passwd")],
            "not allowed",
        );
    }

    #[test]
    fn decompression_is_bounded() {
        let big = vec![0u8; 4 << 20];
        let data = bundle(&[("zeros.bin", tar::EntryType::Regular, &big, "")]);
        assert!(data.len() < 64 << 10, "a small bundle that expands a lot");
        let dir = tempfile::tempdir().expect("tempdir");
        let err = unpack(&data[..], &dir.path().join("tree"), 1 << 20).expect_err("too large");
        assert!(
            matches!(
                err,
                BundleError::TooLarge {
                    limit_bytes: 1_048_576
                }
            ),
            "{err}"
        );
        assert!(!dir.path().join("tree").exists());
    }
}
