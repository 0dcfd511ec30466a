//! Measuring what runctl's files take on disk: allocated blocks, each inode counted once
//! (hard-linked environment files are shared, not repeated).

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Counts the blocks of trees, each inode once across every tree it is given.
#[derive(Debug, Default)]
pub struct Du {
    seen: HashSet<(u64, u64)>,
}

impl Du {
    /// Bytes under `path` (a file or a directory) not counted before by this `Du`.
    pub fn add(&mut self, path: &Path) -> u64 {
        let Ok(meta) = fs::symlink_metadata(path) else {
            return 0;
        };
        let mut bytes = 0;
        if meta.nlink() < 2 || self.seen.insert((meta.dev(), meta.ino())) {
            bytes += meta.blocks() * 512;
        }
        if meta.is_dir()
            && let Ok(entries) = fs::read_dir(path)
        {
            for entry in entries.flatten() {
                bytes += self.add(&entry.path());
            }
        }
        bytes
    }
}

/// Bytes under `path`, on its own.
pub fn tree_bytes(path: &Path) -> u64 {
    Du::default().add(path)
}

/// (free, total) bytes of the filesystem holding `path`, as an unprivileged user sees it.
pub fn free_and_total(path: &Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path)?;
    let frag = st.fragment_size() as u64;
    Ok((
        st.blocks_available() as u64 * frag,
        st.blocks() as u64 * frag,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_links_count_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir_all(&a).expect("mkdir");
        fs::create_dir_all(&b).expect("mkdir");
        fs::write(a.join("f"), vec![7u8; 64 * 1024]).expect("write");
        fs::hard_link(a.join("f"), b.join("f")).expect("link");
        let mut du = Du::default();
        let first = du.add(&a);
        let second = du.add(&b);
        assert!(first >= 64 * 1024, "{first}");
        assert!(second < 64 * 1024, "{second}");
        assert!(tree_bytes(&b) >= 64 * 1024);
        let (free, total) = free_and_total(dir.path()).expect("statvfs");
        assert!(free <= total && total > 0);
    }
}
