//! The code-sync manifest: every file, directory and symlink of a work tree by relative
//! path, files by BLAKE3 content hash. Pure: building one from a disk walk is the
//! controller's job, keeping one true to disk is the agent's.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A BLAKE3 hash of a file's content (or of a whole manifest).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    pub fn of(bytes: &[u8]) -> Self {
        ContentHash(*blake3::hash(bytes).as_bytes())
    }

    /// The hash of everything `reader` yields (a file's content, say).
    pub fn of_reader(reader: impl std::io::Read) -> std::io::Result<Self> {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(reader)?;
        Ok(hasher.finalize().into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for ContentHash {
    fn from(h: blake3::Hash) -> Self {
        ContentHash(*h.as_bytes())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One entry of a work tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    File {
        hash: ContentHash,
        size_bytes: u64,
        executable: bool,
    },
    /// A symlink, stored as its target text; it must resolve inside the tree.
    Symlink {
        target: String,
    },
    Dir,
}

/// A work tree: relative, `/`-separated paths (see [`check_path`]) to entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: BTreeMap<String, Entry>,
}

impl Manifest {
    /// The hash that names this exact tree: equal manifests, equal roots.
    pub fn root(&self) -> ContentHash {
        let mut hasher = blake3::Hasher::new();
        for (path, entry) in &self.entries {
            hasher.update(&(path.len() as u64).to_le_bytes());
            hasher.update(path.as_bytes());
            match entry {
                Entry::File {
                    hash,
                    size_bytes,
                    executable,
                } => {
                    hasher.update(b"f");
                    hasher.update(&hash.0);
                    hasher.update(&size_bytes.to_le_bytes());
                    hasher.update(&[u8::from(*executable)]);
                }
                Entry::Symlink { target } => {
                    hasher.update(b"l");
                    hasher.update(&(target.len() as u64).to_le_bytes());
                    hasher.update(target.as_bytes());
                }
                Entry::Dir => {
                    hasher.update(b"d");
                }
            }
        }
        hasher.finalize().into()
    }

    pub fn files(&self) -> impl Iterator<Item = (&String, &ContentHash, u64)> {
        self.entries.iter().filter_map(|(path, e)| match e {
            Entry::File {
                hash, size_bytes, ..
            } => Some((path, hash, *size_bytes)),
            _ => None,
        })
    }

    /// Checks every path and symlink; a manifest from the wire is checked before use.
    pub fn check(&self) -> Result<(), PathError> {
        for (path, entry) in &self.entries {
            check_path(path)?;
            if let Entry::Symlink { target } = entry {
                check_symlink(path, target)?;
            }
        }
        Ok(())
    }
}

/// Why a path or symlink was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is absolute, climbs out with `..`, or is not in normal form.
    #[error("refused path {path:?}: it escapes the work tree or is not a plain relative path")]
    Escape { path: String },
    /// The symlink's target resolves outside the tree.
    #[error("refused symlink {path:?} -> {target:?}: it points outside the work tree")]
    SymlinkEscape { path: String, target: String },
}

/// A tree path must be relative, `/`-separated, with only normal components: no empty
/// part, no `.`, no `..`, no NUL, no leading or trailing `/`.
pub fn check_path(path: &str) -> Result<(), PathError> {
    let ok = !path.is_empty()
        && !path.contains('\0')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if ok {
        Ok(())
    } else {
        Err(PathError::Escape {
            path: path.to_owned(),
        })
    }
}

/// Whether a symlink at `link` pointing at `target` resolves, lexically, inside the tree.
pub fn check_symlink(link: &str, target: &str) -> Result<(), PathError> {
    let escape = || PathError::SymlinkEscape {
        path: link.to_owned(),
        target: target.to_owned(),
    };
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return Err(escape());
    }
    let mut depth: Vec<&str> = link.split('/').collect();
    depth.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth.pop().ok_or_else(escape)?;
            }
            normal => depth.push(normal),
        }
    }
    Ok(())
}

/// The parent directory of a tree path, if it has one.
pub fn parent(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(parent, _)| parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(path: &str, ok: bool) {
        assert_eq!(check_path(path).is_ok(), ok, "{path:?}");
    }

    fn check_link(link: &str, target: &str, ok: bool) {
        assert_eq!(
            check_symlink(link, target).is_ok(),
            ok,
            "{link} -> {target}"
        );
    }

    #[test]
    fn paths() {
        check("train.py", true);
        check("src/model/ünïcode file.py", true);
        check("a/b/c", true);
        check("", false);
        check("/etc/passwd", false);
        check("../evil", false);
        check("a/../../evil", false);
        check("a/./b", false);
        check("a//b", false);
        check("a/", false);
        check("a\0b", false);
        check("..", false);
    }

    #[test]
    fn symlinks() {
        check_link("a.py", "b.py", true);
        check_link("src/a.py", "../b.py", true);
        check_link("src/a.py", "./x/../y", true);
        check_link("a.py", "../b.py", false);
        check_link("src/a.py", "../../b.py", false);
        check_link("a", "/etc/passwd", false);
        check_link("a", "", false);
    }

    #[test]
    fn root_changes_with_any_field() {
        let file = |exec| Entry::File {
            hash: ContentHash::of(b"x"),
            size_bytes: 1,
            executable: exec,
        };
        let mut a = Manifest::default();
        a.entries.insert("a".into(), file(false));
        let mut b = a.clone();
        assert_eq!(a.root(), b.root());
        b.entries.insert("a".into(), file(true));
        assert_ne!(a.root(), b.root());
        let mut c = a.clone();
        c.entries.insert("d".into(), Entry::Dir);
        assert_ne!(a.root(), c.root());
        assert_ne!(Manifest::default().root(), a.root());
    }
}
