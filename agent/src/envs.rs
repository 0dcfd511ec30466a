//! Environments reused across runs. The venv that setup builds is saved, keyed by what
//! defines it (`key`: the setup kind, uv.lock, pyproject.toml, requirements.txt,
//! .python-version, the interpreter and uv binaries); a later run with the same key gets a
//! clone of it instead of running setup again.
//!
//! Layout under `<state>/envs/<key>/`: `venv/` (the saved environment, its paths still
//! those of the run that built it) and `env.json` (`Saved`).
//!
//! A clone is a new directory tree: directories are the run's own, files are hard links to
//! the saved ones, made read-only, except the few files that name the venv's or the
//! project's path (scripts' `#!` lines, `.pth` files and editable-install finders, found
//! when the environment is saved), which are copies with the paths rewritten to the new
//! run's. So `pip install`, `pip uninstall` and byte-compiling in a run (all of which
//! replace files rather than write into them) stay in that run, and an editable install
//! points at the run's own tree. This is how uv shares its cache with every venv.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use protocol::{ContentHash, RunId};
use serde::{Deserialize, Serialize};

/// Files larger than this never name a path we rewrite (scripts, `.pth`, metadata).
const MAX_REWRITE_BYTES: u64 = 1 << 20;

/// A saved environment's description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub key: String,
    pub built_for: RunId,
    pub built_at_ms: u64,
    /// The venv's and the start directory's paths when it was built.
    pub venv: String,
    pub project: String,
    /// Files (relative to the venv) that name either path.
    pub rewrite: Vec<String>,
}

/// What a run's environment key is made of: the setup kind and what defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInputs<'a> {
    /// The setup steps as shown (their programs and arguments, with paths of this run
    /// replaced by placeholders by the caller).
    pub steps: Vec<String>,
    /// (name, content) of each defining file in the start directory that exists.
    pub files: Vec<(&'a str, Vec<u8>)>,
    /// Identity of the tools: (path, size, mtime) of the interpreter and uv.
    pub tools: Vec<String>,
}

/// The files whose content defines an environment, in the start directory.
pub const DEFINING_FILES: &[&str] = &[
    "pyproject.toml",
    "uv.lock",
    "requirements.txt",
    ".python-version",
];

/// The key: a hash of the inputs, in a fixed order.
pub fn key(inputs: &KeyInputs) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"runctl-env-1\0");
    for step in &inputs.steps {
        h.update(b"step\0");
        h.update(step.as_bytes());
        h.update(b"\0");
    }
    for (name, content) in &inputs.files {
        h.update(b"file\0");
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update(&(content.len() as u64).to_le_bytes());
        h.update(content);
    }
    for tool in &inputs.tools {
        h.update(b"tool\0");
        h.update(tool.as_bytes());
        h.update(b"\0");
    }
    ContentHash::from(h.finalize()).to_hex()[..32].to_owned()
}

/// Identifies a program by where it resolves to and its size and modification time, so
/// an upgraded interpreter or uv makes a new key.
pub fn tool_identity(program: &Path) -> String {
    let real = fs::canonicalize(program).unwrap_or_else(|_| program.to_owned());
    match fs::metadata(&real) {
        Ok(m) => format!("{} {} {}", real.display(), m.len(), m.mtime()),
        Err(_) => format!("{} missing", real.display()),
    }
}

/// `2h ago`, `3 min ago`: how long since `then_ms`.
pub fn ago(now_ms: u64, then_ms: u64) -> String {
    let secs = now_ms.saturating_sub(then_ms) / 1000;
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

#[derive(Debug)]
pub struct Envs {
    dir: PathBuf,
}

impl Envs {
    pub fn open(dir: &Path) -> io::Result<Envs> {
        fs::create_dir_all(dir)?;
        // A save or delete cut short left a directory without its `env.json` or a trash.
        for entry in fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !path.join("env.json").is_file() {
                let _ = fs::remove_dir_all(&path);
            }
        }
        Ok(Envs {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The saved environment for `key`, if there is one.
    pub fn find(&self, key: &str) -> Option<Saved> {
        let text = fs::read(self.dir.join(key).join("env.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Every saved environment with when it was last used (its `env.json`'s mtime) and
    /// its size.
    pub fn list(&self) -> Vec<(Saved, u64, u64)> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return out;
        };
        for entry in entries.flatten() {
            let key = entry.file_name().to_string_lossy().into_owned();
            let Some(saved) = self.find(&key) else {
                continue;
            };
            let used = fs::metadata(entry.path().join("env.json"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            out.push((saved, used, crate::usage::tree_bytes(&entry.path())));
        }
        out
    }

    /// Saves the venv a run just built under `key` (hard links, files made read-only).
    pub fn save(
        &self,
        key: &str,
        run: &RunId,
        venv: &Path,
        project: &Path,
        now_ms: u64,
    ) -> io::Result<()> {
        let final_dir = self.dir.join(key);
        if final_dir.join("env.json").is_file() {
            return Ok(());
        }
        let tmp = self
            .dir
            .join(format!(".new-{key}-{:08x}", rand::random::<u32>()));
        let saved = (|| {
            fs::create_dir_all(&tmp)?;
            let (venv_s, project_s) = (venv.display().to_string(), project.display().to_string());
            let mut rewrite = Vec::new();
            link_tree(venv, &tmp.join("venv"), &mut |rel, from| {
                if names_a_path(from, &[&venv_s, &project_s]) {
                    rewrite.push(rel.to_owned());
                }
                Ok(())
            })?;
            let saved = Saved {
                key: key.to_owned(),
                built_for: run.clone(),
                built_at_ms: now_ms,
                venv: venv_s,
                project: project_s,
                rewrite,
            };
            fs::write(
                tmp.join("env.json"),
                serde_json::to_vec_pretty(&saved).expect("serializes"),
            )?;
            match fs::rename(&tmp, &final_dir) {
                Ok(()) => Ok(()),
                // Another run saved the same key meanwhile: keep theirs.
                Err(_) if final_dir.join("env.json").is_file() => {
                    let _ = fs::remove_dir_all(&tmp);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        })();
        if saved.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        saved
    }

    /// Makes `venv` (which must not exist) a clone of the saved environment, for a run
    /// whose start directory is `project`, and marks the saved one as just used.
    pub fn clone_env(&self, saved: &Saved, venv: &Path, project: &Path) -> io::Result<()> {
        let from = self.dir.join(&saved.key).join("venv");
        let (new_venv, new_project) = (venv.display().to_string(), project.display().to_string());
        let rewrite: std::collections::HashSet<&str> =
            saved.rewrite.iter().map(String::as_str).collect();
        let cloned = link_tree(&from, venv, &mut |rel, src| {
            if !rewrite.contains(rel) {
                return Ok(());
            }
            let text = fs::read(src)?;
            let text = replace(&text, saved.venv.as_bytes(), new_venv.as_bytes());
            let text = replace(&text, saved.project.as_bytes(), new_project.as_bytes());
            let dest = venv.join(rel);
            let mode = fs::metadata(src)?.mode() | 0o200;
            fs::remove_file(&dest)?;
            fs::write(&dest, text)?;
            fs::set_permissions(&dest, fs::Permissions::from_mode(mode & 0o7777))
        });
        if cloned.is_err() {
            let _ = fs::remove_dir_all(venv);
            return cloned;
        }
        // Recency for pruning.
        let json = self.dir.join(&saved.key).join("env.json");
        let _ = fs::File::options()
            .append(true)
            .open(&json)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        Ok(())
    }

    /// Deletes a saved environment (renamed away first, so a cut-short delete leaves no
    /// half of one under its key).
    pub fn remove(&self, key: &str) -> io::Result<()> {
        let dir = self.dir.join(key);
        let trash = self.dir.join(format!(".trash-{key}"));
        match fs::rename(&dir, &trash) {
            Ok(()) => fs::remove_dir_all(&trash),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Rebuilds the tree at `from` under `to`: directories created, symlinks copied, regular
/// files hard-linked and made read-only; `each(rel, from_path)` is called for each file
/// after it is linked.
fn link_tree(
    from: &Path,
    to: &Path,
    each: &mut dyn FnMut(&str, &Path) -> io::Result<()>,
) -> io::Result<()> {
    fn walk(
        root: &Path,
        dir: &Path,
        to: &Path,
        each: &mut dyn FnMut(&str, &Path) -> io::Result<()>,
    ) -> io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let rel = path.strip_prefix(root).expect("under the root");
            let dest = to.join(rel);
            let kind = entry.file_type()?;
            if kind.is_dir() {
                fs::create_dir(&dest)?;
                walk(root, &path, to, each)?;
            } else if kind.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&path)?, &dest)?;
            } else if kind.is_file() {
                let meta = entry.metadata()?;
                if meta.mode() & 0o222 != 0 {
                    fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode() & 0o7555))?;
                }
                fs::hard_link(&path, &dest)?;
                each(&rel.to_string_lossy(), &path)?;
            }
        }
        Ok(())
    }
    fs::create_dir(to)?;
    walk(from, from, to, each)
}

/// Whether a small file's bytes contain any of `paths`.
fn names_a_path(path: &Path, paths: &[&str]) -> bool {
    let small = fs::metadata(path).is_ok_and(|m| m.len() <= MAX_REWRITE_BYTES);
    let compiled = path
        .extension()
        .is_some_and(|e| e == "so" || e == "pyc" || e == "a");
    if !small || compiled {
        return false;
    }
    let Ok(bytes) = fs::read(path) else {
        return false;
    };
    paths
        .iter()
        .any(|p| !p.is_empty() && find(&bytes, p.as_bytes()).is_some())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn replace(text: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    if from.is_empty() {
        return text.to_vec();
    }
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = find(rest, from) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(to);
        rest = &rest[i + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_change_with_what_defines_the_environment() {
        let base = KeyInputs {
            steps: vec![
                "uv venv".into(),
                "uv pip install -r requirements.txt".into(),
            ],
            files: vec![("requirements.txt", b"numpy==2.1\n".to_vec())],
            tools: vec!["/usr/bin/python3.12 100 5".into()],
        };
        let k = key(&base);
        assert_eq!(k, key(&base.clone()), "stable");
        let mut other = base.clone();
        other.files[0].1 = b"numpy==2.2\n".to_vec();
        assert_ne!(k, key(&other), "requirements");
        let mut other = base.clone();
        other.tools[0] = "/usr/bin/python3.13 100 5".into();
        assert_ne!(k, key(&other), "python");
        let mut other = base.clone();
        other.steps.pop();
        assert_ne!(k, key(&other), "steps");
        let mut other = base.clone();
        other.files.push((".python-version", b"3.12".to_vec()));
        assert_ne!(k, key(&other), "a new defining file");
        // Names and contents cannot be shifted into each other.
        let a = KeyInputs {
            steps: vec![],
            files: vec![("ab", b"c".to_vec())],
            tools: vec![],
        };
        let b = KeyInputs {
            steps: vec![],
            files: vec![("a", b"bc".to_vec())],
            tools: vec![],
        };
        assert_ne!(key(&a), key(&b));
    }

    #[test]
    fn ages_read_naturally() {
        let check = |secs: u64, text: &str| assert_eq!(ago(secs * 1000 + 5, 5), text, "{secs}");
        check(5, "5 s ago");
        check(120, "2 min ago");
        check(7200, "2h ago");
        check(3 * 86_400, "3 days ago");
    }

    #[test]
    fn a_clone_is_the_run_s_own_and_points_at_its_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let envs = Envs::open(&dir.path().join("envs")).expect("open");
        let run1 = dir.path().join("runs/run-aaaaaaaaaaaa");
        let (venv1, proj1) = (run1.join("venv"), run1.join("work"));
        fs::create_dir_all(venv1.join("bin")).expect("mkdir");
        fs::create_dir_all(venv1.join("lib/site-packages/pkg")).expect("mkdir");
        fs::create_dir_all(&proj1).expect("mkdir");
        fs::write(
            venv1.join("bin/tool"),
            format!("#!{}/bin/python\nprint()\n", venv1.display()),
        )
        .expect("write");
        fs::write(
            venv1.join("lib/site-packages/_proj.pth"),
            format!("{}\n", proj1.display()),
        )
        .expect("write");
        fs::write(venv1.join("lib/site-packages/pkg/mod.py"), "x = 1\n").expect("write");
        std::os::unix::fs::symlink("/usr/bin/python3", venv1.join("bin/python")).expect("link");
        let run: RunId = "run-aaaaaaaaaaaa".parse().expect("id");
        envs.save("k1", &run, &venv1, &proj1, 1000).expect("save");
        let saved = envs.find("k1").expect("found");
        let mut rewrite = saved.rewrite.clone();
        rewrite.sort();
        assert_eq!(rewrite, vec!["bin/tool", "lib/site-packages/_proj.pth"]);

        let run2 = dir.path().join("runs/run-bbbbbbbbbbbb");
        let (venv2, proj2) = (run2.join("venv"), run2.join("work"));
        fs::create_dir_all(&run2).expect("mkdir");
        envs.clone_env(&saved, &venv2, &proj2).expect("clone");
        let tool = fs::read_to_string(venv2.join("bin/tool")).expect("read");
        assert_eq!(tool, format!("#!{}/bin/python\nprint()\n", venv2.display()));
        let pth = fs::read_to_string(venv2.join("lib/site-packages/_proj.pth")).expect("read");
        assert_eq!(pth.trim(), proj2.display().to_string());
        assert_eq!(
            fs::read_link(venv2.join("bin/python")).expect("link"),
            PathBuf::from("/usr/bin/python3")
        );
        // A package installed or removed in run 2 stays there.
        fs::write(venv2.join("lib/site-packages/new.py"), "y = 2\n").expect("install");
        fs::remove_file(venv2.join("lib/site-packages/pkg/mod.py")).expect("uninstall");
        assert!(!venv1.join("lib/site-packages/new.py").exists());
        assert!(
            envs.dir()
                .join("k1/venv/lib/site-packages/pkg/mod.py")
                .exists()
        );
        assert!(venv1.join("lib/site-packages/pkg/mod.py").exists());
        // Shared files are read-only, so a write into one fails rather than reach others
        // (for a user other than root).
        let shared = fs::metadata(venv1.join("lib/site-packages/pkg/mod.py")).expect("meta");
        assert_eq!(shared.mode() & 0o222, 0);
    }

    #[test]
    fn rewriting_replaces_every_occurrence() {
        assert_eq!(
            replace(b"a/x b/x a/x", b"a/x", b"c/yy"),
            b"c/yy b/x c/yy".to_vec()
        );
        assert_eq!(replace(b"none", b"zz", b"q"), b"none".to_vec());
    }
}
