//! Splits a process's output bytes into log lines, the way a terminal would show them:
//! `\n` (or `\r\n`) ends a line; a lone `\r` ends a progress update that the next one
//! redraws. Progress updates are rate-limited (a progress bar redrawing 50 times a second
//! would otherwise flood the log): the newest is kept and let out once per interval, and
//! dropped when a real line supersedes it. Pure: the caller passes `now`.

use std::time::{Duration, Instant};

/// Output lines longer than this are split into several lines.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// At most one progress update per stream per this interval reaches the log.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// A `\r` not followed by `\n` within this long ends a progress update.
const CR_WAIT: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Line(String),
    Progress(String),
}

#[derive(Debug)]
pub struct LineSplitter {
    current: Vec<u8>,
    /// When `current` was ended by a `\r`: a progress update, unless a `\n` follows.
    cr_at: Option<Instant>,
    /// A line was just split at the length cap: a `\n` right after it ends nothing more.
    just_split: bool,
    held: Option<String>,
    last_progress: Option<Instant>,
    max_line: usize,
}

impl Default for LineSplitter {
    fn default() -> Self {
        Self::new(MAX_LINE_BYTES)
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl LineSplitter {
    pub fn new(max_line: usize) -> Self {
        LineSplitter {
            current: Vec::new(),
            cr_at: None,
            just_split: false,
            held: None,
            last_progress: None,
            max_line: max_line.max(1),
        }
    }

    /// Feeds bytes; returns the pieces they complete.
    pub fn push(&mut self, bytes: &[u8], now: Instant) -> Vec<Piece> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.cr_at.take().is_some() {
                if b == b'\n' {
                    self.line(&mut out);
                    continue;
                }
                self.progress(now, &mut out);
            }
            let split = std::mem::take(&mut self.just_split);
            match b {
                b'\n' if split && self.current.is_empty() => {}
                b'\n' => self.line(&mut out),
                b'\r' => self.cr_at = Some(now),
                _ => {
                    self.current.push(b);
                    if self.current.len() >= self.max_line {
                        self.line(&mut out);
                        self.just_split = true;
                    }
                }
            }
        }
        out
    }

    /// When the driver should call [`LineSplitter::tick`] next, if anything is waiting.
    pub fn next_deadline(&self) -> Option<Instant> {
        let held = self
            .held
            .as_ref()
            .and(self.last_progress)
            .map(|last| last + PROGRESS_INTERVAL);
        let cr = self.cr_at.map(|at| at + CR_WAIT);
        match (held, cr) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Lets out a held progress update whose interval has passed. A stream that paused
    /// right after a `\r` has finished that update.
    pub fn tick(&mut self, now: Instant) -> Vec<Piece> {
        let mut out = Vec::new();
        if let Some(at) = self.cr_at
            && now >= at + CR_WAIT
        {
            self.cr_at = None;
            self.progress(now, &mut out);
        }
        if let (Some(_), Some(last)) = (&self.held, self.last_progress)
            && now >= last + PROGRESS_INTERVAL
        {
            self.last_progress = Some(now);
            out.extend(self.held.take().map(Piece::Progress));
        }
        out
    }

    /// The stream ended: what is left is its last line, as a terminal would leave it.
    pub fn finish(mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        if !self.current.is_empty() {
            self.line(&mut out);
        } else if let Some(held) = self.held.take() {
            out.push(Piece::Progress(held));
        }
        out
    }

    fn line(&mut self, out: &mut Vec<Piece>) {
        self.held = None;
        out.push(Piece::Line(text(&self.current)));
        self.current.clear();
    }

    fn progress(&mut self, now: Instant, out: &mut Vec<Piece>) {
        if self.current.is_empty() {
            return;
        }
        let update = text(&self.current);
        self.current.clear();
        match self.last_progress {
            Some(last) if now < last + PROGRESS_INTERVAL => self.held = Some(update),
            _ => {
                self.held = None;
                self.last_progress = Some(now);
                out.push(Piece::Progress(update));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &str) -> Piece {
        Piece::Line(s.into())
    }
    fn progress(s: &str) -> Piece {
        Piece::Progress(s.into())
    }

    /// Feeds `chunks` (each at its millisecond offset), then finishes.
    fn check(chunks: &[(u64, &str)], expected: &[Piece]) {
        let t0 = Instant::now();
        let mut splitter = LineSplitter::new(8);
        let mut got = Vec::new();
        for &(ms, chunk) in chunks {
            let now = t0 + Duration::from_millis(ms);
            got.extend(splitter.tick(now));
            got.extend(splitter.push(chunk.as_bytes(), now));
        }
        got.extend(splitter.finish());
        assert_eq!(got, expected, "{chunks:?}");
    }

    #[test]
    fn splits_like_a_terminal() {
        check(&[(0, "a\nb\n")], &[line("a"), line("b")]);
        check(&[(0, "a\r\nb")], &[line("a"), line("b")]);
        check(&[(0, "a\r"), (0, "\nb\n")], &[line("a"), line("b")]);
        check(&[(0, "\n\n")], &[line(""), line("")]);
        check(&[(0, "0123456789ab\n")], &[line("01234567"), line("89ab")]);
        check(&[(0, "01234567\n")], &[line("01234567")]);
        check(
            &[(0, "01234567"), (0, "\nx\n")],
            &[line("01234567"), line("x")],
        );
        check(&[(0, "no newline")], &[line("no newli"), line("ne")]);
    }

    #[test]
    fn progress_updates_are_rate_limited_and_superseded() {
        check(
            &[(0, "10%\r20%\r30%\rdone\n")],
            &[progress("10%"), line("done")],
        );
        check(
            &[
                (0, "10%\r"),
                (500, "20%\r"),
                (1_100, "30%\r"),
                (1_200, "40%\r"),
                (2_200, ""),
            ],
            &[progress("10%"), progress("40%")],
        );
        // A held update gets out once its interval has passed, even with no new output.
        check(
            &[(0, "1\r2\r"), (300, ""), (1_000, "")],
            &[progress("1"), progress("2")],
        );
        // At the end, the last update stays, as it would on a terminal.
        check(&[(0, "1\r2\r3")], &[progress("1"), line("3")]);
        check(&[(0, "1\r2\r"), (100, "")], &[progress("1"), progress("2")]);
        // Empty segments (`\r\r`) are not updates.
        check(&[(0, "\r\rx\n")], &[line("x")]);
    }

    #[test]
    fn deadline_follows_the_held_update() {
        let t0 = Instant::now();
        let mut splitter = LineSplitter::default();
        assert_eq!(splitter.push(b"a\rb\r", t0), [progress("a")]);
        assert_eq!(splitter.tick(t0), []);
        assert_eq!(splitter.next_deadline(), Some(t0 + CR_WAIT));
        assert_eq!(splitter.tick(t0 + CR_WAIT), [], "held: too soon after `a`");
        assert_eq!(splitter.next_deadline(), Some(t0 + PROGRESS_INTERVAL));
        assert_eq!(splitter.tick(t0 + PROGRESS_INTERVAL), [progress("b")]);
        assert_eq!(splitter.next_deadline(), None);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        check(&[(0, "ok\n")], &[line("ok")]);
        let mut splitter = LineSplitter::default();
        assert_eq!(
            splitter.push(b"\xff\xfe\n", Instant::now()),
            [line("\u{fffd}\u{fffd}")]
        );
    }
}

/// Replaces a run's secret values in its output with `[secret NAME]`, longest first (so a
/// secret holding another is replaced whole). A value split across two lines (by the
/// length cap) is not caught; empty values are never secrets.
#[derive(Debug, Default, Clone)]
pub struct Redactor {
    secrets: Vec<protocol::Secret>,
}

impl Redactor {
    pub fn new(secrets: &[protocol::Secret]) -> Self {
        let mut secrets: Vec<_> = secrets
            .iter()
            .filter(|s| !s.value.is_empty())
            .cloned()
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.value.len()));
        Redactor { secrets }
    }

    pub fn redact(&self, line: String) -> String {
        self.secrets.iter().fold(line, |line, s| {
            if line.contains(&s.value) {
                line.replace(&s.value, &format!("[secret {}]", s.name))
            } else {
                line
            }
        })
    }
}

#[cfg(test)]
mod redact_tests {
    use super::*;

    fn secret(name: &str, value: &str) -> protocol::Secret {
        protocol::Secret {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn check() {
        let r = Redactor::new(&[
            secret("A", "hf_abc123"),
            secret("B", "hf_abc123XYZ"),
            secret("EMPTY", ""),
        ]);
        let cases = [
            ("token=hf_abc123 done", "token=[secret A] done"),
            ("hf_abc123XYZ", "[secret B]"),
            ("twice hf_abc123 hf_abc123", "twice [secret A] [secret A]"),
            ("nothing here", "nothing here"),
            ("", ""),
        ];
        for (line, want) in cases {
            assert_eq!(r.redact(line.into()), want, "{line:?}");
        }
    }
}
