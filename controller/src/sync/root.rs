//! Which directory is the project: `--root` if given, else the git work tree holding the
//! start directory, else the start directory itself; and where inside it to start.

use std::path::{Path, PathBuf};

use crate::error::{ErrorCode, UserError};

/// A project root and the start directory relative to it (`""` for the root itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub root: PathBuf,
    pub cwd: String,
}

/// Resolves the project for a start directory (`start`, absolute) and an optional
/// explicit root.
pub fn resolve(start: &Path, explicit_root: Option<&Path>) -> Result<Project, UserError> {
    let start = canonical(start, "the work dir")?;
    let root = match explicit_root {
        Some(root) => canonical(root, "the --root directory")?,
        None => git_root(&start).unwrap_or_else(|| start.clone()),
    };
    let Ok(rel) = start.strip_prefix(&root) else {
        // The start dir is outside an explicit root: start at the root.
        return Ok(Project {
            root,
            cwd: String::new(),
        });
    };
    let cwd = rel.to_str().ok_or_else(|| {
        UserError::new(
            ErrorCode::BadInput,
            format!("the path {} is not valid UTF-8", rel.display()),
        )
    })?;
    Ok(Project {
        root,
        cwd: cwd.to_owned(),
    })
}

fn canonical(dir: &Path, what: &str) -> Result<PathBuf, UserError> {
    match std::fs::canonicalize(dir) {
        Ok(path) if path.is_dir() => Ok(path),
        _ => Err(UserError::new(
            ErrorCode::BadInput,
            format!("{what} {} is not a directory", dir.display()),
        )
        .resolve("pass an existing directory")),
    }
}

/// The nearest enclosing directory with a `.git` (a directory, or a file for worktrees).
fn git_root(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|dir| dir.join(".git").exists())
        .map(Path::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_root_else_the_directory_else_explicit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(repo.join(".git")).expect("mkdir");
        std::fs::create_dir_all(repo.join("src/models")).expect("mkdir");
        let base = std::fs::canonicalize(dir.path()).expect("canonical");
        let check = |start: &Path, root: Option<&Path>, expected: (&str, &str)| {
            let p = resolve(start, root).expect("resolves");
            assert_eq!(
                (
                    p.root
                        .strip_prefix(&base)
                        .expect("under base")
                        .to_str()
                        .expect("utf8"),
                    p.cwd.as_str()
                ),
                expected
            );
        };
        check(&repo.join("src/models"), None, ("repo", "src/models"));
        check(&repo, None, ("repo", ""));
        check(dir.path(), None, ("", ""));
        check(
            &repo.join("src/models"),
            Some(&repo.join("src")),
            ("repo/src", "models"),
        );
        check(dir.path(), Some(&repo), ("repo", ""));
        assert!(resolve(&dir.path().join("missing"), None).is_err());
    }
}
