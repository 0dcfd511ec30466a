//! Packs a work directory into a zstd-compressed tar, streamed to a file: the files a run
//! needs, honouring `.gitignore`, `.git/info/exclude` and `.runctlignore`, never `.git`.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::Context;

/// The per-project ignore file, in `.gitignore` syntax.
pub const IGNORE_FILE: &str = ".runctlignore";

/// What was packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Packed {
    pub files: u64,
    pub bytes: u64,
}

/// Packs `root` into `out` (tar.zst). Symlinks are stored as links, not followed.
/// Nothing under `private` is packed: the controller's own home (its CA key) must never
/// leave the laptop, even when a run's work dir contains it.
pub fn pack(root: &Path, private: &Path, out: impl Write) -> anyhow::Result<Packed> {
    let encoder = zstd::stream::write::Encoder::new(out, 3)?;
    let mut tar = tar::Builder::new(encoder);
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut packed = Packed::default();
    let walk = ignore::WalkBuilder::new(root)
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
        .sort_by_file_name(|a, b| a.cmp(b))
        .build();
    for entry in walk {
        let entry = entry.with_context(|| format!("walking {}", root.display()))?;
        let rel = entry
            .path()
            .strip_prefix(root)
            .expect("walk stays under its root");
        if rel.as_os_str().is_empty() {
            continue;
        }
        let file_type = entry.file_type().context("reading a file type")?;
        if file_type.is_file() {
            packed.files += 1;
        } else if !file_type.is_dir() && !file_type.is_symlink() {
            continue; // sockets, FIFOs and devices have no place in a work tree
        }
        if file_type.is_file() {
            packed.bytes += append_file(&mut tar, entry.path(), rel)?;
        } else {
            tar.append_path_with_name(entry.path(), rel)
                .with_context(|| format!("adding {}", entry.path().display()))?;
        }
    }
    tar.into_inner()?.finish()?.flush()?;
    Ok(packed)
}

/// Appends a regular file with exactly the size it had when opened. tar's own
/// `append_path` copies to the end of the file, so a file that grows while it is packed
/// (a log being written) would corrupt the archive.
fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &Path,
    rel: &Path,
) -> anyhow::Result<u64> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
    let size_bytes = meta.len();
    let exact = Exact {
        inner: file.take(size_bytes),
        remaining: size_bytes,
    };
    tar.append_data(&mut header, rel, exact).with_context(|| {
        format!(
            "adding {} (did it change while being packed?)",
            path.display()
        )
    })?;
    Ok(size_bytes)
}

/// Yields exactly `remaining` bytes, or fails if the source ends early (a file that shrank).
struct Exact<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being packed",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn honours_ignore_files_and_skips_git() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join(".git")).expect("mkdir");
        std::fs::write(root.join(".git/HEAD"), "ref").expect("write");
        std::fs::write(root.join(".gitignore"), "*.log\n").expect("write");
        std::fs::write(root.join(IGNORE_FILE), "data/\n").expect("write");
        std::fs::create_dir_all(root.join("data")).expect("mkdir");
        std::fs::write(root.join("data/big.bin"), "x").expect("write");
        std::fs::write(root.join("train.py"), "print(1)").expect("write");
        std::fs::write(root.join("out.log"), "noise").expect("write");

        std::fs::create_dir_all(root.join("home/pki")).expect("mkdir");
        std::fs::write(root.join("home/pki/ca.key"), "secret").expect("write");
        let mut out = Vec::new();
        let packed = pack(root, &root.join("home"), &mut out).expect("pack");
        assert_eq!(packed.files, 3, "train.py, .gitignore, .runctlignore");
        let tar = zstd::decode_all(&out[..]).expect("zstd");
        let mut archive = tar::Archive::new(&tar[..]);
        let mut names: Vec<String> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        names.sort();
        assert_eq!(names, [".gitignore", ".runctlignore", "train.py"]);
    }
}
