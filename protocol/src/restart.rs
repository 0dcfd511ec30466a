//! The restart policy of a run: whether a process that ended by itself is started again,
//! and after how long. Pure: the caller passes how the attempt ended and how long it ran.

use std::time::Duration;

use crate::{RestartPolicy, RunEnd};

/// The first restart after a quick failure waits this long; each further quick failure
/// doubles it, up to [`MAX_DELAY`].
pub const FIRST_DELAY: Duration = Duration::from_secs(1);
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// An attempt that ran at least this long was healthy: the backoff starts over.
pub const HEALTHY_RUN: Duration = Duration::from_secs(120);

/// What the supervisor knows after an attempt ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    /// Restarts made so far under the policy.
    pub restarts: u32,
    /// Quick failures in a row, which set the backoff.
    pub quick_failures: u32,
}

/// Decides what follows an attempt that ended with `end` after running `ran_for`. `None`:
/// the run is over. A stop the user asked for, a spot interruption, and a start that
/// failed are never restarted.
pub fn decide(
    policy: RestartPolicy,
    end: &RunEnd,
    ran_for: Duration,
    interrupted: bool,
    history: &mut History,
) -> Option<Duration> {
    let (failed, stop_requested) = match end {
        RunEnd::Exited {
            code,
            stop_requested,
        } => (*code != 0, *stop_requested),
        RunEnd::Signaled { stop_requested, .. } => (true, *stop_requested),
        RunEnd::SpawnFailed { .. }
        | RunEnd::SetupFailed { .. }
        | RunEnd::DataFailed { .. }
        | RunEnd::Lost { .. } => {
            return None;
        }
    };
    if stop_requested || interrupted {
        return None;
    }
    next(policy, failed, ran_for, history)
}

/// After an attempt that ended by itself, `failed` or not, having run `ran_for`: whether
/// the policy starts it again, and after how long. The caller has already ruled out what
/// is never restarted (a stop asked for, an interruption).
pub fn next(
    policy: RestartPolicy,
    failed: bool,
    ran_for: Duration,
    history: &mut History,
) -> Option<Duration> {
    let allowed = match policy {
        RestartPolicy::Never => false,
        RestartPolicy::OnFailure { max_restarts } => failed && history.restarts < max_restarts,
        RestartPolicy::Always => true,
    };
    if !allowed {
        return None;
    }
    if ran_for >= HEALTHY_RUN {
        history.quick_failures = 0;
    }
    let delay = FIRST_DELAY
        .saturating_mul(2u32.saturating_pow(history.quick_failures.min(16)))
        .min(MAX_DELAY);
    history.restarts += 1;
    history.quick_failures += 1;
    Some(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> RunEnd {
        RunEnd::Exited {
            code,
            stop_requested: false,
        }
    }

    /// Runs `ends` (each after `ran_secs`) through the policy; the delays in seconds.
    fn check(policy: RestartPolicy, ends: &[(RunEnd, u64)], expected: &[Option<u64>]) {
        let mut history = History::default();
        let got: Vec<Option<u64>> = ends
            .iter()
            .map(|(end, secs)| {
                decide(policy, end, Duration::from_secs(*secs), false, &mut history)
                    .map(|d| d.as_secs())
            })
            .collect();
        assert_eq!(got, expected, "{policy:?}");
    }

    #[test]
    fn policies() {
        let on_failure = RestartPolicy::OnFailure { max_restarts: 2 };
        check(RestartPolicy::Never, &[(exited(1), 0)], &[None]);
        check(on_failure, &[(exited(0), 0)], &[None]);
        check(
            on_failure,
            &[(exited(1), 0), (exited(1), 0), (exited(1), 0)],
            &[Some(1), Some(2), None],
        );
        let killed = RunEnd::Signaled {
            signal: 9,
            stop_requested: false,
        };
        check(on_failure, &[(killed, 0)], &[Some(1)]);
        check(
            RestartPolicy::Always,
            &[
                (exited(0), 0),
                (exited(0), 0),
                (exited(3), 0),
                (exited(0), 500),
            ],
            &[Some(1), Some(2), Some(4), Some(1)],
        );
    }

    #[test]
    fn backoff_is_capped() {
        let mut history = History::default();
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = decide(
                RestartPolicy::Always,
                &exited(1),
                Duration::ZERO,
                false,
                &mut history,
            )
            .expect("always restarts");
        }
        assert_eq!(last, MAX_DELAY);
    }

    #[test]
    fn never_restarted() {
        let always = RestartPolicy::Always;
        let mut history = History::default();
        let stopped = RunEnd::Signaled {
            signal: 15,
            stop_requested: true,
        };
        assert_eq!(
            decide(always, &stopped, Duration::ZERO, false, &mut history),
            None
        );
        assert_eq!(
            decide(always, &exited(1), Duration::ZERO, true, &mut history),
            None
        );
        let setup = RunEnd::SetupFailed {
            message: "x".into(),
        };
        assert_eq!(
            decide(always, &setup, Duration::ZERO, false, &mut history),
            None
        );
        let spawn = RunEnd::SpawnFailed {
            message: "x".into(),
        };
        assert_eq!(
            decide(always, &spawn, Duration::ZERO, false, &mut history),
            None
        );
    }
}
