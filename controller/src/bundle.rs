//! Packs a work directory into a zstd-compressed tar, streamed to a file: the files a run
//! needs, honouring `.gitignore`, `.git/info/exclude` and `.runctlignore`, never `.git`.

use std::io::Write;
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
pub fn pack(root: &Path, out: impl Write) -> anyhow::Result<Packed> {
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
        .filter_entry(|e| e.file_name() != ".git")
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
            packed.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
        } else if !file_type.is_dir() && !file_type.is_symlink() {
            continue; // sockets, FIFOs and devices have no place in a work tree
        }
        tar.append_path_with_name(entry.path(), rel)
            .with_context(|| format!("adding {}", entry.path().display()))?;
    }
    tar.into_inner()?.finish()?.flush()?;
    Ok(packed)
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

        let mut out = Vec::new();
        let packed = pack(root, &mut out).expect("pack");
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
