//! Big trees: before a tree's first sync, one over `FILES` files or `BYTES` bytes is
//! reported (its size and biggest directories), and on a terminal the user is asked
//! before it is sent. A tree synced before is not asked about again.

use super::scan::TreeSize;
use crate::report::bytes_words;

pub const FILES: u64 = 20_000;
pub const BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it without a word.
    Send,
    /// Say how big it is, then send it.
    Warn,
    /// Say how big it is and ask first.
    Ask,
}

/// What to do before sending `size`: `synced_before` (the daemon has its stat cache),
/// `asked_not` (`--yes`), `terminal` (a person can answer).
pub fn decide(size: &TreeSize, synced_before: bool, asked_not: bool, terminal: bool) -> Decision {
    let big = size.files > FILES || size.bytes > BYTES;
    match (big && !synced_before, asked_not || !terminal) {
        (false, _) => Decision::Send,
        (true, true) => Decision::Warn,
        (true, false) => Decision::Ask,
    }
}

/// The report, for stderr.
pub fn describe(size: &TreeSize, root: &std::path::Path) -> String {
    let mut text = format!(
        "{} holds {} files ({}) to send, more than runctl expects of code (over {} files or {}):",
        root.display(),
        size.files,
        bytes_words(size.bytes),
        FILES,
        bytes_words(BYTES)
    );
    for dir in &size.biggest {
        text.push_str(&format!(
            "\n  {:>10}  {:>7} files  {}",
            bytes_words(dir.bytes),
            dir.files,
            if dir.dir == "." {
                "(files at the root)".to_owned()
            } else {
                format!("{}/", dir.dir)
            }
        ));
    }
    text.push_str(&format!(
        "\nleave data and outputs out with a {} at the project root (gitignore syntax, e.g. `data/`), and pull data with --data s3://...",
        super::scan::IGNORE_FILE
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check() {
        let size = |files, bytes| TreeSize {
            files,
            bytes,
            biggest: Vec::new(),
        };
        use Decision::*;
        // (files, bytes, synced before, --yes, terminal) -> decision
        let cases = [
            (100, 1 << 20, false, false, true, Send),
            (FILES, BYTES, false, false, true, Send),
            (FILES + 1, 0, false, false, true, Ask),
            (0, BYTES + 1, false, false, true, Ask),
            (FILES + 1, 0, false, true, true, Warn),
            (FILES + 1, 0, false, false, false, Warn),
            (FILES + 1, BYTES + 1, true, false, true, Send),
            (FILES + 1, BYTES + 1, true, false, false, Send),
        ];
        for (files, bytes, before, yes, tty, want) in cases {
            assert_eq!(
                decide(&size(files, bytes), before, yes, tty),
                want,
                "{files} files, {bytes} bytes, before {before}, yes {yes}, tty {tty}"
            );
        }
    }
}
