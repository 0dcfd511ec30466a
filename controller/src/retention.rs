//! How long the daemon's database keeps an ended run's whole output: the pure decision.
//! A run that ended `[daemon] keep_logs_days` ago is compacted once: its output lines but
//! the last `TAIL_LINES` (and its progress-bar updates before them) are deleted and a
//! `Notice::Compacted` takes their place; every other event (its start, checkpoints,
//! notices, end) stays, so `list`, `status` and `checkpoint` still tell its whole story.
//! `Db::compact_run` does it; the daemon looks for runs due when it starts and hourly.

use crate::run_state::RunState;

/// Output lines an ended run keeps after compaction.
pub const TAIL_LINES: u64 = 200;
/// How often the daemon looks for runs due.
pub const EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
const DAY_MS: u64 = 86_400_000;

/// What the database holds about a run that has not been compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub state: RunState,
    pub ended_ms: Option<u64>,
}

/// Whether the run's log is compacted at `now_ms`: only an ended run, `keep_days` after it
/// ended (never with `keep_days` 0). A clock set back before the end compacts nothing.
pub fn due(run: Facts, now_ms: u64, keep_days: u32) -> bool {
    if keep_days == 0 || !run.state.is_terminal() {
        return false;
    }
    run.ended_ms
        .is_some_and(|ended| now_ms.saturating_sub(ended) >= u64::from(keep_days) * DAY_MS)
}

/// A project's stat cache unused this long is deleted: without one, the next sync of that
/// project hashes its files once more, nothing else.
pub const STAT_CACHE_DAYS: u64 = 30;

/// A file of the daemon's sync dir, with what decides whether it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncFile {
    /// A project's stat cache, last written at `modified_ms`.
    StatCache { modified_ms: u64 },
    /// What the daemon remembers of an agent's tree of a run: whether that agent's
    /// instance is still there (not terminated, and the run known).
    Tree { instance_live: bool },
}

/// Whether the daemon deletes a file of its sync dir at `now_ms`. A tree is kept while its
/// instance lives (its trees seed new runs there); a stat cache while it has been used in
/// the last `STAT_CACHE_DAYS`.
pub fn sync_file_due(file: SyncFile, now_ms: u64) -> bool {
    match file {
        SyncFile::StatCache { modified_ms } => {
            now_ms.saturating_sub(modified_ms) >= STAT_CACHE_DAYS * DAY_MS
        }
        SyncFile::Tree { instance_live } => !instance_live,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(state: RunState, ended_ms: Option<u64>, now_ms: u64, keep_days: u32, expected: bool) {
        assert_eq!(
            due(Facts { state, ended_ms }, now_ms, keep_days),
            expected,
            "{state:?} ended {ended_ms:?} now {now_ms} keep {keep_days}"
        );
    }

    #[test]
    fn table() {
        let day = DAY_MS;
        // Ended long enough ago, or not yet.
        check(RunState::Succeeded, Some(0), 30 * day, 30, true);
        check(RunState::Succeeded, Some(0), 30 * day - 1, 30, false);
        check(RunState::Failed, Some(day), 400 * day, 30, true);
        check(RunState::Stopped, Some(0), day, 1, true);
        check(RunState::Interrupted, Some(0), 31 * day, 30, true);
        check(RunState::BudgetExceeded, Some(0), 31 * day, 30, true);
        // 0 keeps everything for ever.
        check(RunState::Succeeded, Some(0), 10_000 * day, 0, false);
        // A run still going (or pending again, to be relaunched) keeps everything.
        check(RunState::Running, Some(0), 400 * day, 30, false);
        check(RunState::Pending, Some(0), 400 * day, 30, false);
        check(RunState::Syncing, None, 400 * day, 30, false);
        // No end time recorded: nothing to count from.
        check(RunState::Failed, None, 400 * day, 30, false);
        // The clock set back before the run ended.
        check(RunState::Succeeded, Some(40 * day), 10 * day, 30, false);
    }

    #[test]
    fn sync_files() {
        let day = DAY_MS;
        let check = |file, now, expected| {
            assert_eq!(sync_file_due(file, now), expected, "{file:?} at {now}");
        };
        check(SyncFile::StatCache { modified_ms: 0 }, 30 * day, true);
        check(SyncFile::StatCache { modified_ms: 0 }, 30 * day - 1, false);
        // The clock set back: kept.
        check(
            SyncFile::StatCache {
                modified_ms: 40 * day,
            },
            day,
            false,
        );
        check(
            SyncFile::Tree {
                instance_live: true,
            },
            1000 * day,
            false,
        );
        check(
            SyncFile::Tree {
                instance_live: false,
            },
            0,
            true,
        );
    }
}
