//! What the agent's `[access]` config allows, as pure decisions: may this stream kind be
//! served, may a forward reach this host, and where does a path a copy names lead.

use std::path::{Component, Path, PathBuf};

use protocol::agent_config::Access;
use protocol::{ErrorKind, WireError};

fn forbidden(message: String) -> WireError {
    WireError::new(ErrorKind::Forbidden, message)
}

/// `exec` and `shell` are allowed.
pub fn shell(access: &Access) -> Result<(), WireError> {
    if access.allow_shell {
        return Ok(());
    }
    Err(forbidden(
        "this agent does not allow exec or shell (its config has allow_shell = false; [agent] allow_shell in the controller's config.toml sets it for instances launched after)".into(),
    ))
}

/// A forward to `host` is allowed: forwarding is on, and `host` is the instance's
/// loopback or a host the config lists.
pub fn forward(access: &Access, host: &str) -> Result<(), WireError> {
    if !access.allow_forward {
        return Err(forbidden(
            "this agent does not allow port forwarding (its config has allow_forward = false; [agent] allow_forward in the controller's config.toml sets it for instances launched after)".into(),
        ));
    }
    if is_loopback(host) || access.forward_hosts.iter().any(|h| h == "*" || h == host) {
        return Ok(());
    }
    Err(forbidden(format!(
        "forwarding to {host} is not allowed: only the instance's own loopback (127.0.0.1, localhost) is, unless the agent's config lists the host ([agent] forward_hosts = [\"{host}\"])"
    )))
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `path` made absolute and free of `.` and `..`, without touching the disk: relative to
/// `start` (a run's start directory, the agent's home) and refused when it leaves `fence`
/// (the run's tree, the home); when absolute, refused outside every one of `roots`.
/// Symlinks on the way are checked by the caller ([`within`] on the resolved path).
pub fn resolve(
    start: &Path,
    fence: &Path,
    roots: &[PathBuf],
    path: &str,
) -> Result<PathBuf, WireError> {
    if path.is_empty() {
        return Err(WireError::new(ErrorKind::BadRequest, "the path is empty"));
    }
    if path.contains('\0') {
        return Err(WireError::new(
            ErrorKind::BadRequest,
            "the path holds a NUL byte",
        ));
    }
    let given = Path::new(path);
    let (start, allowed): (&Path, Vec<&Path>) = if given.is_absolute() {
        (Path::new("/"), roots.iter().map(PathBuf::as_path).collect())
    } else {
        (start, vec![fence])
    };
    let mut resolved = start.to_path_buf();
    for part in given.components() {
        match part {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(name) => resolved.push(name),
        }
    }
    if allowed.iter().any(|root| resolved.starts_with(root)) {
        return Ok(resolved);
    }
    Err(forbidden(if given.is_absolute() {
        format!(
            "{path} is outside what this agent lets a copy reach ({}); [agent] copy_roots in the controller's config.toml widens it",
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        format!("{path} leaves {}", fence.display())
    }))
}

/// `real` (a path with its symlinks resolved) is still under one of `roots`.
pub fn within(real: &Path, roots: &[&Path], shown: &str) -> Result<(), WireError> {
    if roots.iter().any(|root| real.starts_with(root)) {
        return Ok(());
    }
    Err(forbidden(format!(
        "{shown} leads to {} through a symlink, outside what a copy may reach",
        real.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_and_forward_follow_the_switches_and_the_host_list() {
        let open = Access::default();
        let check = |access: &Access, host: &str, ok: bool| {
            assert_eq!(forward(access, host).is_ok(), ok, "{host}");
        };
        assert!(shell(&open).is_ok());
        check(&open, "127.0.0.1", true);
        check(&open, "127.0.0.53", true);
        check(&open, "localhost", true);
        check(&open, "LOCALHOST", true);
        check(&open, "::1", true);
        check(&open, "[::1]", true);
        check(&open, "10.0.0.5", false);
        check(&open, "db.internal", false);
        check(&open, "localhost.evil.com", false);
        let listed = Access {
            forward_hosts: vec!["10.0.0.5".into()],
            ..Access::default()
        };
        check(&listed, "10.0.0.5", true);
        check(&listed, "10.0.0.6", false);
        let any = Access {
            forward_hosts: vec!["*".into()],
            ..Access::default()
        };
        check(&any, "db.internal", true);
        let closed = Access {
            allow_shell: false,
            allow_forward: false,
            forward_hosts: vec!["*".into()],
            ..Access::default()
        };
        check(&closed, "127.0.0.1", false);
        let e = shell(&closed).expect_err("off");
        assert_eq!(e.kind, ErrorKind::Forbidden);
        assert!(e.message.contains("allow_shell = false"), "{}", e.message);
        let e = forward(&closed, "127.0.0.1").expect_err("off");
        assert!(e.message.contains("allow_forward = false"), "{}", e.message);
        let e = forward(&open, "10.0.0.5").expect_err("not listed");
        assert!(e.message.contains("forward_hosts"), "{}", e.message);
    }

    #[test]
    fn paths_stay_in_their_tree_or_the_roots() {
        let base = Path::new("/s/runs/r/work");
        let roots = [PathBuf::from("/s"), PathBuf::from("/home/u")];
        let check = |path: &str, expected: Option<&str>| {
            assert_eq!(
                resolve(base, base, &roots, path).ok(),
                expected.map(PathBuf::from),
                "{path:?}"
            );
        };
        check("outputs", Some("/s/runs/r/work/outputs"));
        check("./outputs/a.txt", Some("/s/runs/r/work/outputs/a.txt"));
        check("a/../b", Some("/s/runs/r/work/b"));
        check(".", Some("/s/runs/r/work"));
        check("..", None);
        check("../other", None);
        check("a/../../x", None);
        check("../../../../etc/passwd", None);
        check("/s/runs/r/checkpoints", Some("/s/runs/r/checkpoints"));
        check("/home/u/.cache", Some("/home/u/.cache"));
        check("/home/u/../v", None);
        check("/etc/passwd", None);
        check("/s/../etc", None);
        check("/", None);
        check("/sx", None);
        check("", None);
        check("a\0b", None);
        // From a start directory inside the tree, up to the tree's root and no further.
        let src = Path::new("/s/runs/r/work/src");
        assert_eq!(
            resolve(src, base, &roots, "../data").ok(),
            Some(PathBuf::from("/s/runs/r/work/data"))
        );
        assert!(resolve(src, base, &roots, "../../x").is_err());
        let e = resolve(base, base, &roots, "/etc/passwd").expect_err("outside");
        assert_eq!(e.kind, ErrorKind::Forbidden);
        assert!(e.message.contains("copy_roots"), "{}", e.message);
        assert!(within(Path::new("/s/x"), &[Path::new("/s")], "x").is_ok());
        assert!(within(Path::new("/etc"), &[Path::new("/s")], "x").is_err());
    }
}
