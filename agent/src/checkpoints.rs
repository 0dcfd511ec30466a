//! Which checkpoint a restarted attempt resumes from: the newest complete entry in the
//! run's checkpoint dir. An entry under a temporary name (hidden, `*.tmp`, `*.partial`,
//! `*.part`, `*~`) is a save in progress, not a checkpoint. `newest` is the pure choice;
//! `newest_in` lists the directory. `cut_short` decides whether a save that left its disk
//! full is to be set aside, under `NAME.incomplete`, rather than trusted.

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

/// Free space, on the checkpoint's disk when it is saved, below which the save is taken to
/// have run out of room partway. A write that fails with ENOSPC leaves less than a block
/// or two free; a whole save that leaves under 1 MiB on a disk is rare, and the next write
/// of anything there would fail anyway.
pub const FULL_DISK: u64 = 1 << 20;

/// What a checkpoint that may be cut short is renamed to: a temporary name, so it is never
/// uploaded or resumed from, and no torn file stays under the real name.
pub fn set_aside_name(name: &str) -> String {
    format!("{name}.incomplete")
}

/// Whether a checkpoint just saved with `available` bytes free on its disk may be cut
/// short by the disk filling: the trainer's write can fail with ENOSPC and the file still
/// be closed (as `torch.save` leaves it), which looks like any other save. `None` (free
/// space unreadable) trusts the save.
pub fn cut_short(available: Option<u64>) -> bool {
    available.is_some_and(|free| free < FULL_DISK)
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
    fn a_save_that_left_the_disk_full_is_set_aside() {
        let check = |available: Option<u64>, expected: bool| {
            assert_eq!(cut_short(available), expected, "{available:?}");
        };
        check(Some(0), true);
        check(Some(4096), true);
        check(Some(FULL_DISK - 1), true);
        check(Some(FULL_DISK), false);
        check(Some(50 << 30), false);
        check(None, false);
        // The name it is kept under is one never uploaded or resumed from.
        assert!(is_temporary(&set_aside_name("step-2.pt")));
        assert_eq!(set_aside_name("step-2.pt"), "step-2.pt.incomplete");
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
