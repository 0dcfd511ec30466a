//! Wall-clock time for what runctl stamps or checks against the calendar: event times,
//! certificate issue and validity (rustls is handed [`Clock`]), renewal and retention.
//! Durations (time caps, timeouts, backoff) use the monotonic clock, which never jumps.
//!
//! One hook, for tests: when [`OFFSET_FILE_ENV`] names a file, the number of seconds it
//! holds (signed; a missing or unreadable file is 0) is added to the system clock on each
//! reading, so a test can make the clock jump under running processes, as an NTP step or
//! a wrong hardware clock does, without touching the machine's clock. Unset (always, in
//! use), reading the clock costs one check of a `OnceLock`.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The variable naming the clock-offset file (tests only).
pub const OFFSET_FILE_ENV: &str = "RUNCTL_TEST_CLOCK_OFFSET_FILE";

fn offset_file() -> Option<&'static PathBuf> {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    FILE.get_or_init(|| std::env::var_os(OFFSET_FILE_ENV).map(PathBuf::from))
        .as_ref()
}

/// The offset in `text` (whole seconds, signed), or 0.
pub fn parse_offset(text: &str) -> i64 {
    text.trim().parse().unwrap_or(0)
}

/// `real` moved by `offset_secs`.
pub fn shifted(real: SystemTime, offset_secs: i64) -> SystemTime {
    let by = Duration::from_secs(offset_secs.unsigned_abs());
    if offset_secs >= 0 {
        real + by
    } else {
        real.checked_sub(by).unwrap_or(UNIX_EPOCH)
    }
}

/// Now, on the wall clock (moved by the test hook, when set).
pub fn now() -> SystemTime {
    let real = SystemTime::now();
    match offset_file() {
        None => real,
        Some(file) => shifted(
            real,
            std::fs::read_to_string(file).map_or(0, |t| parse_offset(&t)),
        ),
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

/// rustls's clock: certificate validity is checked against [`now`].
#[derive(Debug)]
pub struct Clock;

impl rustls::time_provider::TimeProvider for Clock {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        Some(rustls::pki_types::UnixTime::since_unix_epoch(
            now().duration_since(UNIX_EPOCH).ok()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets() {
        let check =
            |text: &str, expected: i64| assert_eq!(parse_offset(text), expected, "{text:?}");
        check("3600", 3600);
        check("-3660\n", -3660);
        check(" 0 ", 0);
        check("", 0);
        check("an hour", 0);
        let at = UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(shifted(at, 3600), UNIX_EPOCH + Duration::from_secs(13_600));
        assert_eq!(shifted(at, -3600), UNIX_EPOCH + Duration::from_secs(6_400));
        assert_eq!(
            shifted(at, -20_000),
            UNIX_EPOCH - Duration::from_secs(10_000)
        );
    }
}
