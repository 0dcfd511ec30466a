//! A run's state, from its events: the one place that decides it. Pure: the database
//! passes in what it holds of the run and the events it has just stored, and writes back
//! the `Change` this returns (in the same transaction).

use protocol::{EventKind, Notice, RunEnd, RunEvent};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Pending,
    Syncing,
    SettingUp,
    PullingData,
    Running,
    Succeeded,
    Failed,
    Stopped,
    /// Ended after a spot interruption notice: the instance was taken back.
    Interrupted,
    /// Stopped by its budget (`--max-cost`, `--max-hours`) on reaching a cap.
    BudgetExceeded,
}

impl RunState {
    pub fn is_terminal(self) -> bool {
        match self {
            RunState::Succeeded
            | RunState::Failed
            | RunState::Stopped
            | RunState::Interrupted
            | RunState::BudgetExceeded => true,
            RunState::Pending
            | RunState::Syncing
            | RunState::SettingUp
            | RunState::PullingData
            | RunState::Running => false,
        }
    }

    /// The state a run's end puts it in. A run its budget stopped ended for that, however
    /// its process took it. A non-zero exit is a failure unless the user asked for the
    /// stop, or a spot interruption notice came first.
    pub fn after(end: &RunEnd, notices: Notices) -> Self {
        let spot_notice = notices.spot;
        match end {
            _ if notices.budget => RunState::BudgetExceeded,
            RunEnd::Exited { code: 0, .. } => RunState::Succeeded,
            RunEnd::Exited { .. }
            | RunEnd::Signaled { .. }
            | RunEnd::SpawnFailed { .. }
            | RunEnd::SetupFailed { .. }
            | RunEnd::DataFailed { .. }
            | RunEnd::Lost { .. }
                if spot_notice =>
            {
                RunState::Interrupted
            }
            RunEnd::Exited {
                stop_requested: true,
                ..
            }
            | RunEnd::Signaled {
                stop_requested: true,
                ..
            } => RunState::Stopped,
            RunEnd::Exited { .. }
            | RunEnd::Signaled { .. }
            | RunEnd::SpawnFailed { .. }
            | RunEnd::SetupFailed { .. }
            | RunEnd::DataFailed { .. }
            | RunEnd::Lost { .. } => RunState::Failed,
        }
    }
}

/// The notices among a run's events that decide how its end reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Notices {
    /// A spot interruption notice.
    pub spot: bool,
    /// Its budget stopped it (`Notice::BudgetExceeded`).
    pub budget: bool,
}

/// What the database holds of a run before new events land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub state: RunState,
    /// Among its stored events.
    pub notices: Notices,
    /// Its end is recorded (the agent's `Ended`, not a state the daemon set).
    pub ended: bool,
}

/// What new events change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The run's state after the events.
    pub state: RunState,
    pub notices: Notices,
    /// When the process first started, if among the events (`started_ms` is kept once set).
    pub started_ms: Option<u64>,
    /// The end, when the events carry it and none was recorded: written once.
    pub end: Option<Ended>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub end: RunEnd,
    pub at_ms: u64,
    /// The error column: the failure's message, when the end is runctl's failure.
    pub error: Option<String>,
}

/// Folds newly stored events (in order) into the run's state. Phases move a live run
/// forward (setup, the data pull before the first start, running); the agent's `Ended`
/// decides the end, over a terminal state the daemon set meanwhile (the agent's account
/// is the truth), but only once. Events already stored must not be passed again.
pub fn apply(held: Held, events: &[RunEvent]) -> Change {
    let mut state = held.state;
    let mut notices = held.notices;
    let mut end = None;
    let mut started_ms = None;
    for event in events {
        match &event.kind {
            EventKind::Setup { .. } if !state.is_terminal() => state = RunState::SettingUp,
            // A pull alongside the process does not take a running run back.
            EventKind::Pull(p) if !p.done && !state.is_terminal() && state != RunState::Running => {
                state = RunState::PullingData
            }
            EventKind::Started { .. } if !state.is_terminal() => {
                state = RunState::Running;
                started_ms = started_ms.or(Some(event.at_ms));
            }
            EventKind::Notice(Notice::SpotInterruption { .. }) => notices.spot = true,
            // A new attempt (a relaunch on a new instance) has had no notice yet.
            EventKind::Notice(Notice::StartedAgain { .. }) => notices.spot = false,
            EventKind::Notice(Notice::BudgetExceeded { .. }) => notices.budget = true,
            EventKind::Ended(e) if !held.ended && end.is_none() => {
                state = RunState::after(e, notices);
                end = Some(Ended {
                    end: e.clone(),
                    at_ms: event.at_ms,
                    error: e.failure().map(str::to_owned),
                });
            }
            EventKind::Setup { .. }
            | EventKind::Pull(_)
            | EventKind::Started { .. }
            | EventKind::Ended(_)
            | EventKind::Output { .. }
            | EventKind::Progress { .. }
            | EventKind::Restarted { .. }
            | EventKind::Retrying { .. }
            | EventKind::Checkpoint(_)
            | EventKind::Notice(
                Notice::RebalanceRecommended { .. }
                | Notice::LinesDropped { .. }
                | Notice::LogTruncated { .. }
                | Notice::Compacted { .. },
            ) => {}
        }
    }
    Change {
        state,
        notices,
        started_ms,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunState::*;
    use protocol::{PullProgress, Stream};

    fn ev(kind: EventKind) -> RunEvent {
        RunEvent {
            seq: 1,
            at_ms: 7,
            kind,
        }
    }

    fn setup() -> RunEvent {
        ev(EventKind::Setup {
            command: "uv sync".into(),
        })
    }
    fn pull(done: bool) -> RunEvent {
        ev(EventKind::Pull(PullProgress {
            files_done: 0,
            files_total: 1,
            bytes_done: 0,
            bytes_total: 1,
            skipped: 0,
            done,
        }))
    }
    fn started() -> RunEvent {
        ev(EventKind::Started { pid: 9, attempt: 1 })
    }
    fn out() -> RunEvent {
        ev(EventKind::Output {
            stream: Stream::Stdout,
            line: "x".into(),
        })
    }
    fn spot() -> RunEvent {
        ev(EventKind::Notice(Notice::SpotInterruption {
            action: "terminate".into(),
            time: "now".into(),
            signal: 15,
        }))
    }
    fn exited(code: i32) -> RunEvent {
        ev(EventKind::Ended(RunEnd::Exited {
            code,
            stop_requested: false,
        }))
    }
    fn data_failed() -> RunEvent {
        ev(EventKind::Ended(RunEnd::DataFailed {
            message: "no such bucket".into(),
        }))
    }
    fn held(state: RunState) -> Held {
        Held {
            state,
            notices: Notices::default(),
            ended: false,
        }
    }
    fn budget() -> RunEvent {
        ev(EventKind::Notice(Notice::BudgetExceeded {
            limit: protocol::budget::Limit::Time { max_ms: 1000 },
            spend: protocol::budget::Spend {
                cost_micros: None,
                elapsed_ms: 1000,
            },
        }))
    }

    /// `held`, then `events` -> the state, whether an end is recorded, and its error.
    fn check(held: Held, events: &[RunEvent], state: RunState, end: bool, error: Option<&str>) {
        let change = apply(held, events);
        assert_eq!(change.state, state, "{held:?} + {events:?}");
        assert_eq!(change.end.is_some(), end, "{held:?} + {events:?}");
        assert_eq!(
            change.end.as_ref().and_then(|e| e.error.as_deref()),
            error,
            "{held:?} + {events:?}"
        );
    }

    #[test]
    fn events_move_the_state() {
        check(held(Syncing), &[setup(), out()], SettingUp, false, None);
        check(held(SettingUp), &[pull(false)], PullingData, false, None);
        check(
            held(Syncing),
            &[setup(), pull(false), started()],
            Running,
            false,
            None,
        );
        check(held(Running), &[pull(false)], Running, false, None);
        check(
            held(Syncing),
            &[started(), pull(false)],
            Running,
            false,
            None,
        );
        check(held(Running), &[out(), exited(0)], Succeeded, true, None);
        check(held(Running), &[exited(1)], Failed, true, None);
        check(
            held(PullingData),
            &[data_failed()],
            Failed,
            true,
            Some("no such bucket"),
        );
        check(
            held(Running),
            &[spot(), exited(143)],
            Interrupted,
            true,
            None,
        );
        check(held(Running), &[spot(), exited(0)], Succeeded, true, None);
        let noticed = Held {
            notices: Notices {
                spot: true,
                budget: false,
            },
            ..held(Running)
        };
        check(noticed, &[exited(143)], Interrupted, true, None);
        // Relaunched after the notice: the new attempt's end is its own.
        let again = || {
            ev(EventKind::Notice(Notice::StartedAgain {
                attempt: 2,
                cause: "a spot interruption".into(),
            }))
        };
        let stop = ev(EventKind::Ended(RunEnd::Exited {
            code: 143,
            stop_requested: true,
        }));
        check(noticed, &[again(), stop], Stopped, true, None);
        check(noticed, &[again(), exited(1)], Failed, true, None);
        check(
            noticed,
            &[again(), spot(), exited(143)],
            Interrupted,
            true,
            None,
        );
        // The budget stopped it: however the process took the SIGTERM.
        check(
            held(Running),
            &[budget(), exited(0)],
            BudgetExceeded,
            true,
            None,
        );
        check(
            held(Running),
            &[budget(), exited(143)],
            BudgetExceeded,
            true,
            None,
        );
        check(
            held(SettingUp),
            &[budget(), exited(143)],
            BudgetExceeded,
            true,
            None,
        );
        check(
            held(Running),
            &[spot(), budget(), exited(143)],
            BudgetExceeded,
            true,
            None,
        );
        let capped = Held {
            notices: Notices {
                spot: false,
                budget: true,
            },
            ..held(Running)
        };
        check(capped, &[out(), exited(1)], BudgetExceeded, true, None);
        check(held(Running), &[budget()], Running, false, None);
        // The daemon failed it (its instance went), then the agent's own end arrives.
        check(held(Failed), &[exited(0)], Succeeded, true, None);
        check(held(Failed), &[setup(), started()], Failed, false, None);
        let ended = Held {
            ended: true,
            ..held(Succeeded)
        };
        check(ended, &[exited(1)], Succeeded, false, None);
        check(
            held(Running),
            &[exited(0), exited(1)],
            Succeeded,
            true,
            None,
        );
    }

    #[test]
    fn run_end_states() {
        let check = |end: RunEnd, spot: bool, state: RunState| {
            let notices = Notices {
                spot,
                budget: false,
            };
            assert_eq!(RunState::after(&end, notices), state, "{end:?} spot {spot}");
            let capped = Notices { spot, budget: true };
            assert_eq!(
                RunState::after(&end, capped),
                BudgetExceeded,
                "{end:?} capped"
            );
        };
        let exit = |code, stop_requested| RunEnd::Exited {
            code,
            stop_requested,
        };
        let signal = |signal, stop_requested| RunEnd::Signaled {
            signal,
            stop_requested,
        };
        let message = String::new;
        check(signal(15, false), true, Interrupted);
        check(exit(0, false), true, Succeeded);
        check(exit(143, true), true, Interrupted);
        check(RunEnd::SetupFailed { message: message() }, false, Failed);
        check(exit(0, true), false, Succeeded);
        check(exit(1, false), false, Failed);
        check(exit(143, true), false, Stopped);
        check(signal(15, true), false, Stopped);
        check(signal(9, false), false, Failed);
        check(RunEnd::SpawnFailed { message: message() }, false, Failed);
        check(RunEnd::DataFailed { message: message() }, false, Failed);
        check(RunEnd::Lost { message: message() }, false, Failed);
    }
}
