//! The bytes of a copy (`streams::CopyOpen`), the same at both ends: a zstd-compressed tar
//! of one file or directory under its own name. Packing keeps modes and symlinks (never
//! follows them); unpacking is checked entry by entry (under the announced name, no `..`,
//! files, directories and symlinks only, no set-id bits), bounded by the announced size,
//! and lands in a staging directory beside the destination: [`Staged::place`] renames the
//! whole copy into place, so a cut copy never leaves anything under the final name.
//!
//! Synchronous I/O (the `tar` crate is): callers run it on a blocking thread, bridged to
//! their stream.

use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::streams::{CopyKind, CopySource, copy_bound};

/// What `path` holds, for the copy's head: its name, kind, content bytes and files.
/// Symlinks count as entries of no content and are not followed.
pub fn scan(path: &Path) -> io::Result<CopySource> {
    let meta = std::fs::symlink_metadata(path)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| io::Error::other(format!("{} has no name to copy under", path.display())))?;
    if meta.is_dir() {
        let (mut bytes, mut files) = (0u64, 0u64);
        let mut stack = vec![path.to_owned()];
        while let Some(dir) = stack.pop() {
            for dirent in std::fs::read_dir(&dir)? {
                let dirent = dirent?;
                let meta = dirent.metadata()?;
                files += 1;
                if meta.is_dir() {
                    stack.push(dirent.path());
                } else if meta.is_file() {
                    bytes += meta.len();
                }
            }
        }
        Ok(CopySource {
            name,
            kind: CopyKind::Dir,
            bytes,
            files,
        })
    } else if meta.is_file() {
        Ok(CopySource {
            name,
            kind: CopyKind::File,
            bytes: meta.len(),
            files: 1,
        })
    } else {
        Err(io::Error::other(format!(
            "{} is not a file or a directory",
            path.display()
        )))
    }
}

/// Writes `path` as a zstd-compressed tar, its top entry named `name`, into `out`;
/// `on_bytes` is told of each write of tar bytes (content and headers) before compression.
pub fn pack(path: &Path, name: &str, out: impl Write, on_bytes: impl FnMut(u64)) -> io::Result<()> {
    let encoder = zstd::Encoder::new(out, 3)?;
    let mut tar = tar::Builder::new(Counting {
        inner: encoder,
        on_bytes,
    });
    tar.follow_symlinks(false);
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        tar.append_dir_all(name, path)?;
    } else {
        tar.append_path_with_name(path, name)?;
    }
    let counting = tar.into_inner()?;
    counting.inner.finish()?.flush()
}

struct Counting<W, F> {
    inner: W,
    on_bytes: F,
}

impl<W: Write, F: FnMut(u64)> Write for Counting<W, F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        (self.on_bytes)(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A copy unpacked into its staging directory, not yet under its final name.
#[derive(Debug)]
pub struct Staged {
    staging: PathBuf,
    top: PathBuf,
}

impl Staged {
    /// Renames the copy to `landing` (replacing a file there) and removes the staging
    /// directory.
    pub fn place(self, landing: &Path) -> io::Result<()> {
        let result = std::fs::rename(&self.top, landing);
        let _ = std::fs::remove_dir_all(&self.staging);
        result
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.staging);
    }
}

/// Unpacks the copy `source` announced from `input` into a fresh staging directory in
/// `parent` (the destination's directory, so the final rename stays on one filesystem).
/// Anything wrong (an entry outside the name, a device, more bytes than announced, a cut
/// stream) removes what was written and is an error for people. `on_bytes` is told of
/// each read of tar bytes after decompression.
pub fn unpack(
    input: impl Read,
    source: &CopySource,
    parent: &Path,
    on_bytes: impl FnMut(u64),
) -> Result<Staged, String> {
    check_name(&source.name)?;
    let staging = tempfile_dir(parent)?;
    let staged = Staged {
        top: staging.join(&source.name),
        staging,
    };
    let decoder = zstd::Decoder::new(input).map_err(|e| format!("reading the copy: {e}"))?;
    let bounded = Bounded {
        inner: decoder,
        left: copy_bound(source),
        on_bytes,
    };
    let mut archive = tar::Archive::new(bounded);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    // Set-uid, set-gid and sticky bits are never carried.
    archive.set_mask(0o7000);
    let entries = archive
        .entries()
        .map_err(|e| format!("reading the copy: {e}"))?;
    let mut seen_top = false;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("reading the copy: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("reading the copy: {e}"))?
            .into_owned();
        check_entry(&path, &source.name, source.kind)?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            return Err(format!(
                "the copy holds {} of a kind that is not copied ({kind:?})",
                path.display()
            ));
        }
        seen_top |= path == Path::new(&source.name);
        let unpacked = entry
            .unpack_in(&staged.staging)
            .map_err(|e| format!("writing {}: {}", path.display(), why(&e)))?;
        if !unpacked {
            return Err(format!("the copy's entry {} leaves it", path.display()));
        }
    }
    // The archive's end marker is in-band: read the compressed stream to its end too, so
    // a copy cut right after an entry is not taken as whole.
    io::copy(&mut archive.into_inner(), &mut io::sink())
        .map_err(|e| format!("reading the copy: {e}"))?;
    if !seen_top && source.kind == CopyKind::File {
        return Err(format!("the copy did not hold {}", source.name));
    }
    if !staged.top.exists() {
        // An empty directory's tar may hold only its own entry; with none, make it.
        if source.kind == CopyKind::Dir {
            std::fs::create_dir(&staged.top).map_err(|e| format!("writing the copy: {e}"))?;
        } else {
            return Err(format!("the copy did not hold {}", source.name));
        }
    }
    Ok(staged)
}

/// An error with its causes (the tar crate wraps the reader's error in its own).
fn why(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        cause = c.source();
    }
    text
}

/// A copy's name is one plain path component.
fn check_name(name: &str) -> Result<(), String> {
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(_)), None) => Ok(()),
        _ => Err(format!("{name:?} is not a name a copy can have")),
    }
}

/// Every entry is the top name itself, or (for a directory) under it, with plain
/// components only.
fn check_entry(path: &Path, name: &str, kind: CopyKind) -> Result<(), String> {
    let mut parts = path.components();
    let first_ok = matches!(parts.next(), Some(Component::Normal(first)) if first == name);
    let rest_ok = parts.all(|c| matches!(c, Component::Normal(_)));
    let depth_ok = kind == CopyKind::Dir || path.components().count() == 1;
    if first_ok && rest_ok && depth_ok {
        return Ok(());
    }
    Err(format!(
        "the copy's entry {} is not under {name}",
        path.display()
    ))
}

fn tempfile_dir(parent: &Path) -> Result<PathBuf, String> {
    for attempt in 0..16u32 {
        let name = format!(
            ".runctl-copy-{}-{}-{attempt}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        let path = parent.join(name);
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot write in {}: {e}", parent.display())),
        }
    }
    Err(format!(
        "cannot make a staging directory in {}",
        parent.display()
    ))
}

/// Fails a read once more bytes than the bound came out of the decompressor: a copy can
/// not grow past what it announced (a zstd bomb, a lying head).
struct Bounded<R, F> {
    inner: R,
    left: u64,
    on_bytes: F,
}

impl<R: Read, F: FnMut(u64)> Read for Bounded<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self
            .left
            .checked_sub(n as u64)
            .ok_or_else(|| io::Error::other("the copy is larger than it announced"))?;
        (self.on_bytes)(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tree(root: &Path) -> PathBuf {
        let top = root.join("outputs");
        std::fs::create_dir_all(top.join("sub/deeper")).expect("mkdir");
        std::fs::write(top.join("a.txt"), b"alpha").expect("write");
        std::fs::write(top.join("sub/日本語 ✓.bin"), vec![7u8; 1_000_000]).expect("write");
        std::fs::write(top.join("run.sh"), b"#!/bin/sh\necho hi\n").expect("write");
        std::fs::set_permissions(top.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::os::unix::fs::symlink("a.txt", top.join("link")).expect("symlink");
        top
    }

    #[test]
    fn a_tree_round_trips_with_modes_names_and_symlinks() {
        let from = tempfile::tempdir().expect("tempdir");
        let to = tempfile::tempdir().expect("tempdir");
        let top = tree(from.path());
        let source = scan(&top).expect("scan");
        assert_eq!(source.kind, CopyKind::Dir);
        assert_eq!(source.bytes, 5 + 1_000_000 + 18);
        let mut bytes = Vec::new();
        pack(&top, &source.name, &mut bytes, |_| {}).expect("pack");
        let staged = unpack(&bytes[..], &source, to.path(), |_| {}).expect("unpack");
        staged.place(&to.path().join("copied")).expect("place");
        let copied = to.path().join("copied");
        assert_eq!(std::fs::read(copied.join("a.txt")).expect("read"), b"alpha");
        assert_eq!(
            std::fs::read(copied.join("sub/日本語 ✓.bin"))
                .expect("read")
                .len(),
            1_000_000
        );
        let mode = std::fs::metadata(copied.join("run.sh"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(copied.join("link")).expect("readlink"),
            Path::new("a.txt")
        );
        assert!(copied.join("sub/deeper").is_dir());
        let left: Vec<_> = std::fs::read_dir(to.path()).expect("ls").collect();
        assert_eq!(left.len(), 1, "no staging directory is left");
    }

    #[test]
    fn a_file_round_trips_and_replaces_a_file() {
        let from = tempfile::tempdir().expect("tempdir");
        let path = from.path().join("model.pt");
        std::fs::write(&path, b"weights").expect("write");
        let source = scan(&path).expect("scan");
        assert_eq!((source.kind, source.bytes), (CopyKind::File, 7));
        let mut bytes = Vec::new();
        pack(&path, "model.pt", &mut bytes, |_| {}).expect("pack");
        let to = tempfile::tempdir().expect("tempdir");
        let dest = to.path().join("old.pt");
        std::fs::write(&dest, b"old").expect("write");
        unpack(&bytes[..], &source, to.path(), |_| {})
            .expect("unpack")
            .place(&dest)
            .expect("place");
        assert_eq!(std::fs::read(&dest).expect("read"), b"weights");
    }

    #[test]
    fn a_cut_or_oversized_copy_leaves_nothing() {
        let from = tempfile::tempdir().expect("tempdir");
        let top = tree(from.path());
        let source = scan(&top).expect("scan");
        let mut bytes = Vec::new();
        pack(&top, &source.name, &mut bytes, |_| {}).expect("pack");
        let to = tempfile::tempdir().expect("tempdir");
        let cut = &bytes[..bytes.len() / 2];
        assert!(unpack(cut, &source, to.path(), |_| {}).is_err());
        let lying = CopySource {
            bytes: 10,
            files: 1,
            ..source.clone()
        };
        let e = unpack(&bytes[..], &lying, to.path(), |_| {}).expect_err("too big");
        assert!(e.contains("larger than it announced"), "{e}");
        assert_eq!(std::fs::read_dir(to.path()).expect("ls").count(), 0);
    }

    /// Raw tars a hostile peer could send: each is refused and leaves nothing.
    #[test]
    fn hostile_entries_are_refused() {
        let to = tempfile::tempdir().expect("tempdir");
        let source = CopySource {
            name: "outputs".into(),
            kind: CopyKind::Dir,
            bytes: 100,
            files: 2,
        };
        let tar_of = |entries: &[(&str, tar::EntryType, Option<&str>)]| {
            let mut tar = tar::Builder::new(Vec::new());
            for (path, kind, link) in entries {
                let mut header = tar::Header::new_gnu();
                {
                    let gnu = header.as_gnu_mut().expect("gnu");
                    gnu.name[..path.len()].copy_from_slice(path.as_bytes());
                }
                header.set_entry_type(*kind);
                header.set_size(if kind.is_file() { 3 } else { 0 });
                header.set_mode(0o4755);
                if let Some(link) = link {
                    header.set_link_name(link).expect("link");
                }
                header.set_cksum();
                let data: &[u8] = if kind.is_file() { b"abc" } else { b"" };
                tar.append(&header, data).expect("append");
            }
            let mut out = Vec::new();
            let mut enc = zstd::Encoder::new(&mut out, 1).expect("zstd");
            enc.write_all(&tar.into_inner().expect("tar"))
                .expect("write");
            enc.finish().expect("finish");
            out
        };
        let raw =
            |path: &str, kind: tar::EntryType, link: Option<&str>| tar_of(&[(path, kind, link)]);
        let check = |bytes: Vec<u8>, what: &str| {
            assert!(
                unpack(&bytes[..], &source, to.path(), |_| {}).is_err(),
                "{what}"
            );
            assert_eq!(
                std::fs::read_dir(to.path()).expect("ls").count(),
                0,
                "{what}"
            );
        };
        check(raw("../escape", tar::EntryType::Regular, None), "parent");
        check(
            raw("other/x", tar::EntryType::Regular, None),
            "another name",
        );
        check(
            raw("outputs/../../x", tar::EntryType::Regular, None),
            "dotdot inside",
        );
        check(raw("outputs/dev", tar::EntryType::Char, None), "a device");
        check(raw("outputs/fifo", tar::EntryType::Fifo, None), "a fifo");
        check(
            raw("outputs/h", tar::EntryType::Link, Some("/etc/passwd")),
            "a hard link",
        );
        let outside = tempfile::tempdir().expect("tempdir");
        let target = outside.path().display().to_string();
        check(
            tar_of(&[
                ("outputs", tar::EntryType::Directory, None),
                ("outputs/link", tar::EntryType::Symlink, Some(&target)),
                ("outputs/link/planted", tar::EntryType::Regular, None),
            ]),
            "a file written through a symlink it planted",
        );
        assert!(!outside.path().join("planted").exists());
        // A set-uid file is written without the bit.
        let bytes = raw("outputs/suid", tar::EntryType::Regular, None);
        let staged = unpack(&bytes[..], &source, to.path(), |_| {}).expect("a plain file is fine");
        let mode = std::fs::metadata(to.path().join(&staged.staging).join("outputs/suid"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
    }

    #[test]
    fn names_are_one_component() {
        assert!(check_name("outputs").is_ok());
        assert!(check_name("a b ✓").is_ok());
        assert!(check_name("..").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("/").is_err());
        assert!(check_name("").is_err());
    }
}
