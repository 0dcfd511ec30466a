//! Which checkpoint a restarted attempt resumes from: the newest complete entry in the
//! run's checkpoint dir. An entry under a temporary name (hidden, `*.tmp`, `*.partial`,
//! `*.part`, `*~`) is a save in progress, not a checkpoint. `newest` is the pure choice;
//! `newest_in` lists the directory.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Whether `name` is a save in progress rather than a checkpoint.
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || [".tmp", ".partial", ".part", ".incomplete"]
            .iter()
            .any(|suffix| name.ends_with(suffix))
}

/// The newest checkpoint among `(name, modified)` entries; the name breaks ties, so the
/// choice is the same on every call.
pub fn newest<'a>(entries: impl IntoIterator<Item = (&'a str, SystemTime)>) -> Option<&'a str> {
    entries
        .into_iter()
        .filter(|(name, _)| !is_temporary(name))
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(b.0)))
        .map(|(name, _)| name)
}

/// The newest checkpoint in `dir`, if any.
pub fn newest_in(dir: &Path) -> Option<PathBuf> {
    let entries: Vec<(String, SystemTime)> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let modified = e.metadata().ok()?.modified().ok()?;
            Some((e.file_name().to_str()?.to_owned(), modified))
        })
        .collect();
    newest(entries.iter().map(|(n, t)| (n.as_str(), *t))).map(|name| dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn check(entries: &[(&str, u64)], expected: Option<&str>) {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(
            newest(entries.iter().map(|(n, s)| (*n, at(*s)))),
            expected,
            "{entries:?}"
        );
    }

    #[test]
    fn newest_complete_entry() {
        check(&[], None);
        check(&[("step-1.pt", 10), ("step-2.pt", 20)], Some("step-2.pt"));
        check(
            &[("step-2.pt", 20), ("step-3.pt.tmp", 30)],
            Some("step-2.pt"),
        );
        check(
            &[("a", 5), (".b", 9), ("c~", 9), ("d.partial", 9)],
            Some("a"),
        );
        check(&[("x", 5), ("y", 5)], Some("y"));
        check(&[(".tmp", 1)], None);
    }
}
