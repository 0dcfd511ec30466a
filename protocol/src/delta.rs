//! The code-sync delta: what turns the agent's tree into the controller's. `plan` decides
//! it from two manifests; `Delta::apply_to` is the manifest the agent ends up with, which it
//! checks against `target` before touching disk. Pure: the bytes of new content travel
//! beside the delta as a zstd tar, one entry per distinct content, in `stream_order`.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::manifest::{ContentHash, Entry, Manifest, PathError, check_path, check_symlink, parent};

/// Where a written file's content comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// In the content stream, under its hash (sent once however many paths share it).
    Stream,
    /// Already on the agent at this path (a moved or copied file is not re-sent).
    Copy { from: String },
}

/// One change to the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Remove a file, symlink or (empty of synced files) directory.
    Delete {
        path: String,
    },
    Mkdir {
        path: String,
    },
    Write {
        path: String,
        hash: ContentHash,
        size_bytes: u64,
        executable: bool,
        source: Source,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// Same content, new executable bit.
    Chmod {
        path: String,
        executable: bool,
    },
}

impl Op {
    pub fn path(&self) -> &str {
        match self {
            Op::Delete { path }
            | Op::Mkdir { path }
            | Op::Write { path, .. }
            | Op::Symlink { path, .. }
            | Op::Chmod { path, .. } => path,
        }
    }
}

/// The changes from the tree named `base` to the tree named `target`, in apply order:
/// deletes (deepest first), then directories (shallowest first), then files, symlinks and
/// modes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub base: ContentHash,
    pub target: ContentHash,
    pub ops: Vec<Op>,
}

/// Why a delta cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// A path or symlink target is refused.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The delta was computed against a different tree than the one here.
    #[error("the delta was made for tree {expected:?}, but this tree is {actual:?}")]
    WrongBase {
        expected: ContentHash,
        actual: ContentHash,
    },
    /// A copy names a source that is not a file with that content.
    #[error("copy source {from:?} for {path:?} is not a file with the expected content")]
    BadCopy { path: String, from: String },
    /// Applying the ops does not give the tree the delta names.
    #[error("the delta does not produce the tree it names")]
    WrongTarget,
    /// A path whose parent is not a directory of the tree: writing it would go through a
    /// symlink (possibly out of the tree).
    #[error("refused path {path:?}: its parent is not a directory in the tree")]
    NotUnderDir { path: String },
}

/// How many of each change a delta holds, and how much content must travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub written: u64,
    pub copied: u64,
    pub deleted: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub chmods: u64,
    /// Distinct contents to send, and their total size.
    pub stream_files: u64,
    pub stream_bytes: u64,
}

/// Decides the delta from the agent's tree (`remote`) to the controller's (`local`).
pub fn plan(local: &Manifest, remote: &Manifest) -> Delta {
    // Content the agent already has, by hash: the first path holding it.
    let mut have: HashMap<ContentHash, &str> = HashMap::new();
    for (path, hash, _) in remote.files() {
        have.entry(*hash).or_insert(path);
    }
    let mut deletes = Vec::new();
    let mut dirs = Vec::new();
    let mut writes = Vec::new();
    let mut links = Vec::new();
    let mut chmods = Vec::new();
    for (path, theirs) in &remote.entries {
        let replaced = match local.entries.get(path) {
            None => true,
            Some(ours) => std::mem::discriminant(ours) != std::mem::discriminant(theirs),
        };
        if replaced {
            deletes.push(Op::Delete { path: path.clone() });
        }
    }
    for (path, ours) in &local.entries {
        let theirs = remote.entries.get(path);
        if theirs == Some(ours) {
            continue;
        }
        match ours {
            Entry::Dir => dirs.push(Op::Mkdir { path: path.clone() }),
            Entry::Symlink { target } => links.push(Op::Symlink {
                path: path.clone(),
                target: target.clone(),
            }),
            Entry::File {
                hash,
                size_bytes,
                executable,
            } => {
                if let Some(Entry::File { hash: old, .. }) = theirs
                    && old == hash
                {
                    chmods.push(Op::Chmod {
                        path: path.clone(),
                        executable: *executable,
                    });
                    continue;
                }
                let source = match have.get(hash) {
                    Some(from) => Source::Copy {
                        from: (*from).to_owned(),
                    },
                    None => Source::Stream,
                };
                writes.push(Op::Write {
                    path: path.clone(),
                    hash: *hash,
                    size_bytes: *size_bytes,
                    executable: *executable,
                    source,
                });
            }
        }
    }
    deletes.reverse(); // children before their parents
    let mut ops = deletes;
    ops.extend(dirs);
    ops.extend(writes);
    ops.extend(links);
    ops.extend(chmods);
    Delta {
        base: remote.root(),
        target: local.root(),
        ops,
    }
}

/// The name of the `index`-th entry of a content stream: its position. (Hex hashes as
/// names would add 64 incompressible bytes per file to the stream, and say nothing the
/// position and the hash check do not.)
pub fn entry_name(index: usize) -> String {
    index.to_string()
}

impl Delta {
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        let mut streamed = HashSet::new();
        for op in &self.ops {
            match op {
                Op::Delete { .. } => s.deleted += 1,
                Op::Mkdir { .. } => s.dirs += 1,
                Op::Symlink { .. } => s.symlinks += 1,
                Op::Chmod { .. } => s.chmods += 1,
                Op::Write {
                    hash,
                    size_bytes,
                    source,
                    ..
                } => match source {
                    Source::Copy { .. } => s.copied += 1,
                    Source::Stream => {
                        s.written += 1;
                        if streamed.insert(*hash) {
                            s.stream_files += 1;
                            s.stream_bytes += size_bytes;
                        }
                    }
                },
            }
        }
        s
    }

    /// The distinct contents the stream carries, in the order it carries them. The tar
    /// entry for the i-th is named [`entry_name`]`(i)`; its hash is checked on arrival.
    pub fn stream_order(&self) -> Vec<(ContentHash, u64, &str)> {
        let mut seen = HashSet::new();
        self.ops
            .iter()
            .filter_map(|op| match op {
                Op::Write {
                    path,
                    hash,
                    size_bytes,
                    source: Source::Stream,
                    ..
                } if seen.insert(*hash) => Some((*hash, *size_bytes, path.as_str())),
                _ => None,
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The tree `base` becomes under this delta, after checking every path, symlink and
    /// copy source, and that the result is the tree named `target`.
    pub fn apply_to(&self, base: &Manifest) -> Result<Manifest, DeltaError> {
        let actual = base.root();
        if actual != self.base {
            return Err(DeltaError::WrongBase {
                expected: self.base,
                actual,
            });
        }
        let mut entries: BTreeMap<String, Entry> = base.entries.clone();
        for op in &self.ops {
            check_path(op.path())?;
            match op {
                Op::Delete { path } => {
                    entries.remove(path);
                }
                Op::Mkdir { path } => {
                    entries.insert(path.clone(), Entry::Dir);
                }
                Op::Write {
                    path,
                    hash,
                    size_bytes,
                    executable,
                    source,
                } => {
                    if let Source::Copy { from } = source {
                        check_path(from)?;
                        let ok = matches!(
                            base.entries.get(from),
                            Some(Entry::File { hash: h, size_bytes: s, .. }) if h == hash && s == size_bytes
                        );
                        if !ok {
                            return Err(DeltaError::BadCopy {
                                path: path.clone(),
                                from: from.clone(),
                            });
                        }
                    }
                    entries.insert(
                        path.clone(),
                        Entry::File {
                            hash: *hash,
                            size_bytes: *size_bytes,
                            executable: *executable,
                        },
                    );
                }
                Op::Symlink { path, target } => {
                    check_symlink(path, target)?;
                    entries.insert(
                        path.clone(),
                        Entry::Symlink {
                            target: target.clone(),
                        },
                    );
                }
                Op::Chmod { path, executable } => match entries.get_mut(path) {
                    Some(Entry::File { executable: e, .. }) => *e = *executable,
                    _ => return Err(DeltaError::WrongTarget),
                },
            }
        }
        let result = Manifest { entries };
        // Every parent must be a real directory: a path through a symlink could lead
        // anywhere, whatever its text says.
        for path in result.entries.keys() {
            if let Some(parent) = parent(path)
                && !matches!(result.entries.get(parent), Some(Entry::Dir))
            {
                return Err(DeltaError::NotUnderDir { path: path.clone() });
            }
        }
        if result.root() != self.target {
            return Err(DeltaError::WrongTarget);
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(content: &str, executable: bool) -> Entry {
        Entry::File {
            hash: ContentHash::of(content.as_bytes()),
            size_bytes: content.len() as u64,
            executable,
        }
    }

    fn tree(entries: &[(&str, Entry)]) -> Manifest {
        Manifest {
            entries: entries
                .iter()
                .map(|(p, e)| ((*p).to_owned(), e.clone()))
                .collect(),
        }
    }

    /// Plans remote -> local, checks the ops, and that applying them gives `local`.
    fn check(remote: &Manifest, local: &Manifest, expected: &[&str]) {
        let delta = plan(local, remote);
        let rendered: Vec<String> = delta
            .ops
            .iter()
            .map(|op| match op {
                Op::Delete { path } => format!("delete {path}"),
                Op::Mkdir { path } => format!("mkdir {path}"),
                Op::Write {
                    path,
                    source: Source::Stream,
                    ..
                } => format!("write {path}"),
                Op::Write {
                    path,
                    source: Source::Copy { from },
                    ..
                } => format!("copy {from} -> {path}"),
                Op::Symlink { path, target } => format!("link {path} -> {target}"),
                Op::Chmod { path, executable } => format!("chmod {path} {executable}"),
            })
            .collect();
        assert_eq!(rendered, expected);
        assert_eq!(&delta.apply_to(remote).expect("applies"), local);
    }

    #[test]
    fn plans() {
        let empty = Manifest::default();
        let base = tree(&[
            ("src", Entry::Dir),
            ("src/a.py", file("a", false)),
            ("run.sh", file("run", true)),
        ]);
        check(&base, &base, &[]);
        check(
            &empty,
            &base,
            &["mkdir src", "write run.sh", "write src/a.py"],
        );
        check(
            &base,
            &empty,
            &["delete src/a.py", "delete src", "delete run.sh"],
        );
        // A rename: the new path copies what the agent has; the old one goes.
        check(
            &base,
            &tree(&[
                ("src", Entry::Dir),
                ("src/b.py", file("a", false)),
                ("run.sh", file("run", true)),
            ]),
            &["delete src/a.py", "copy src/a.py -> src/b.py"],
        );
        check(
            &base,
            &tree(&[
                ("src", Entry::Dir),
                ("src/a.py", file("a2", false)),
                ("run.sh", file("run", false)),
                (
                    "link",
                    Entry::Symlink {
                        target: "src/a.py".into(),
                    },
                ),
                ("empty", Entry::Dir),
            ]),
            &[
                "mkdir empty",
                "write src/a.py",
                "link link -> src/a.py",
                "chmod run.sh false",
            ],
        );
        // A directory replaced by a file: its children and itself go first.
        check(
            &base,
            &tree(&[
                ("src", file("now a file", false)),
                ("run.sh", file("run", true)),
            ]),
            &["delete src/a.py", "delete src", "write src"],
        );
    }

    #[test]
    fn shared_content_is_streamed_once() {
        let local = tree(&[("a", file("same", false)), ("b", file("same", false))]);
        let delta = plan(&local, &Manifest::default());
        let s = delta.summary();
        assert_eq!((s.written, s.stream_files, s.stream_bytes), (2, 1, 4));
        assert_eq!(delta.stream_order().len(), 1);
    }

    #[test]
    fn hostile_deltas_are_refused() {
        let base = Manifest::default();
        let hostile = |op: Op| Delta {
            base: base.root(),
            target: base.root(),
            ops: vec![op],
        };
        let write = |path: &str| Op::Write {
            path: path.into(),
            hash: ContentHash::of(b""),
            size_bytes: 0,
            executable: false,
            source: Source::Stream,
        };
        for op in [
            write("../evil"),
            write("/etc/passwd"),
            Op::Delete {
                path: "a/../../x".into(),
            },
            Op::Symlink {
                path: "l".into(),
                target: "../../etc".into(),
            },
        ] {
            assert!(
                matches!(
                    hostile(op.clone()).apply_to(&base),
                    Err(DeltaError::Path(_))
                ),
                "{op:?}"
            );
        }
        let copy = Op::Write {
            path: "b".into(),
            hash: ContentHash::of(b"secret"),
            size_bytes: 6,
            executable: false,
            source: Source::Copy {
                from: "nothing".into(),
            },
        };
        assert!(matches!(
            hostile(copy).apply_to(&base),
            Err(DeltaError::BadCopy { .. })
        ));
        // Through a symlink: `l -> d` is inside, but `l/x` would be written via the link.
        let through = Delta {
            base: base.root(),
            target: base.root(),
            ops: vec![
                Op::Mkdir { path: "d".into() },
                Op::Symlink {
                    path: "l".into(),
                    target: "d".into(),
                },
                write("l/x"),
            ],
        };
        assert!(matches!(
            through.apply_to(&base),
            Err(DeltaError::NotUnderDir { .. })
        ));
        // A parent that is not in the tree at all.
        assert!(matches!(
            hostile(write("nodir/x")).apply_to(&base),
            Err(DeltaError::NotUnderDir { .. })
        ));
        let mut stale = hostile(write("a"));
        stale.base = ContentHash::of(b"another tree");
        assert!(matches!(
            stale.apply_to(&base),
            Err(DeltaError::WrongBase { .. })
        ));
        assert!(matches!(
            hostile(write("a")).apply_to(&base),
            Err(DeltaError::WrongTarget)
        ));
    }
}
