//! A run of several nodes (`run --nodes N`) as one run: what a node's end does to the
//! others and to the run. Pure: the database passes in the ends the nodes of the gang
//! have reported so far, and does what this returns in the transaction that stored the
//! last one; the daemon stops the nodes still running when told to.
//!
//! The rules: a node that ends without success (it failed, was killed, lost its process,
//! or was interrupted) stops the others, since a collective job cannot go on without
//! it; a node that succeeds waits for the others (ranks finish at slightly different
//! times); the run is over when every node has ended, and its end is the first failure
//! (the cause: the nodes stopped because of it ended `stopped`), else the first stop the
//! user asked for, else node 0's success. Under a restart policy the gang may instead
//! start again, every node at once, from the run's newest checkpoint (`restart`).

use std::time::Duration;

use protocol::restart::History;
use protocol::{EndAction, RestartPolicy, RunEnd, RunSpec};

use crate::run_state::{Notices, RunState};

/// One node's reported end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEnd {
    pub node: u32,
    pub end: RunEnd,
    pub at_ms: u64,
}

/// What the gang does after a node's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The nodes still running go on: nothing went wrong.
    Wait,
    /// Stop the nodes still running: `cause` ended without success.
    StopOthers { cause: u32 },
    /// Every node has ended: the run ends so.
    End(NodeEnd),
}

/// How a node's end reads for the gang.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// The process failed (or was lost): the cause of a gang's end.
    Failed,
    /// The stop the user (or the gang) asked for.
    Stopped,
    Succeeded,
}

/// A node's end read as a run's would be (`RunState::after`, no notices).
fn kind(end: &RunEnd) -> Kind {
    match RunState::after(end, Notices::default()) {
        RunState::Succeeded => Kind::Succeeded,
        RunState::Stopped => Kind::Stopped,
        _ => Kind::Failed,
    }
}

/// The gang's next step, given its size and the ends its nodes reported (one per node).
pub fn step(nodes: u32, ends: &[NodeEnd]) -> Step {
    let first = |k: Kind| {
        ends.iter()
            .filter(|e| kind(&e.end) == k)
            .min_by_key(|e| (e.at_ms, e.node))
    };
    if ends.len() as u32 >= nodes {
        let end = first(Kind::Failed)
            .or_else(|| first(Kind::Stopped))
            .or_else(|| ends.iter().find(|e| e.node == 0))
            .or_else(|| ends.first())
            .cloned();
        return match end {
            Some(end) => Step::End(end),
            None => Step::Wait,
        };
    }
    match first(Kind::Failed).or_else(|| first(Kind::Stopped)) {
        Some(cause) => Step::StopOthers { cause: cause.node },
        None => Step::Wait,
    }
}

/// A gang's start again, all its nodes together: the attempt it will be (2 for the
/// first), after how long, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    pub attempt: u32,
    pub delay: Duration,
    pub cause: String,
}

/// Whether a gang whose nodes have all ended, the run's end being `last` (by [`step`]),
/// starts again under the run's restart policy, having run `ran_for` since its last
/// start; `history` is the gang's, and counts this restart when there is one.
///
/// The gang's restart is the node's policy lifted to the gang: a failure (a node's
/// process failed or was lost with its agent) restarts it under `on-failure`, any end
/// by itself under `always`. Never: a stop the user asked for, a spot interruption (a
/// new instance is needed, not a new process) or a cap of the budget, and a start that
/// failed (setup, spawn, data: it would fail the same way again).
pub fn restart(
    policy: RestartPolicy,
    last: &NodeEnd,
    notices: Notices,
    ran_for: Duration,
    history: &mut History,
) -> Option<Restart> {
    let failed = match &last.end {
        RunEnd::Exited {
            code,
            stop_requested: false,
        } => *code != 0,
        RunEnd::Signaled {
            stop_requested: false,
            ..
        }
        | RunEnd::Lost { .. } => true,
        RunEnd::Exited {
            stop_requested: true,
            ..
        }
        | RunEnd::Signaled {
            stop_requested: true,
            ..
        }
        | RunEnd::SpawnFailed { .. }
        | RunEnd::SetupFailed { .. }
        | RunEnd::DataFailed { .. } => return None,
    };
    if notices.spot || notices.budget {
        return None;
    }
    let delay = protocol::restart::next(policy, failed, ran_for, history)?;
    Some(Restart {
        attempt: history.restarts + 1,
        delay,
        cause: error(last).unwrap_or_else(|| format!("node {} ended by itself", last.node)),
    })
}

/// What a gang started again resumes from: its own checkpoints once node 0 has pushed
/// one (`dest`, where `LATEST` is), else what the run was started from (`--resume-from`),
/// else nothing.
pub fn resume_from(dest: Option<&str>, pushed: bool, first: Option<&str>) -> Option<String> {
    match (dest, pushed) {
        (Some(dest), true) => Some(dest.to_owned()),
        _ => first.map(str::to_owned),
    }
}

/// The run's error for its end, naming the node: `node 1: exited with code 3`.
pub fn error(end: &NodeEnd) -> Option<String> {
    end.end
        .failure()
        .map(|message| format!("node {}: {message}", end.node))
        .or_else(|| {
            (kind(&end.end) == Kind::Failed)
                .then(|| format!("node {}: {}", end.node, end.end.describe()))
        })
}

/// What node `node` of a gang is started with: the run's spec with the node's own
/// checkpoints ([`checkpoints`]). A node's process is never restarted alone (the gang's
/// rendezvous would not take it back): the gang restarts together, by the daemon. Under a
/// restart policy a node's agent keeps its instance when the node ends, since the gang may
/// start again on it; the daemon ends the instances with the run.
pub fn node_spec(spec: &RunSpec, node: u32, all_checkpoints: bool) -> RunSpec {
    let mut node_spec = spec.clone();
    node_spec.checkpoints = checkpoints(spec.checkpoints.as_ref(), node, all_checkpoints);
    node_spec.restart = RestartPolicy::Never;
    if spec.restart != RestartPolicy::Never {
        node_spec.end = EndAction::Keep;
    }
    node_spec
}

/// Where node `node` of a gang pushes its checkpoints: node 0 to the run's prefix (where
/// `checkpoint`, `--resume-from RUN` and a restart look); with `all` (`--checkpoints-from
/// all`) each other node to a prefix of its own beside it, `RUN-nodeR/`; without, nowhere:
/// in data-parallel training every rank holds the same weights, and nodes writing the
/// same names under one prefix would overwrite each other's checkpoints and `LATEST`.
pub fn checkpoints(
    push: Option<&protocol::CheckpointPush>,
    node: u32,
    all: bool,
) -> Option<protocol::CheckpointPush> {
    let push = push?;
    match (node, all) {
        (0, _) => Some(push.clone()),
        (_, false) => None,
        (n, true) => Some(protocol::CheckpointPush {
            dest: format!("{}-node{n}/", push.dest.trim_end_matches('/')),
            keep: push.keep,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_come_from_node_0_unless_all_are_asked_for() {
        let push = protocol::CheckpointPush {
            dest: "s3://b/checkpoints/run-0123456789ab/".into(),
            keep: 3,
        };
        let dest = |node, all| checkpoints(Some(&push), node, all).map(|p| p.dest);
        let cases: &[(u32, bool, Option<&str>)] = &[
            (0, false, Some("s3://b/checkpoints/run-0123456789ab/")),
            (1, false, None),
            (0, true, Some("s3://b/checkpoints/run-0123456789ab/")),
            (1, true, Some("s3://b/checkpoints/run-0123456789ab-node1/")),
            (
                12,
                true,
                Some("s3://b/checkpoints/run-0123456789ab-node12/"),
            ),
        ];
        for (node, all, want) in cases {
            assert_eq!(dest(*node, *all).as_deref(), *want, "node {node} all {all}");
        }
        assert_eq!(checkpoints(None, 0, true), None, "a run that pushes none");
        assert_eq!(checkpoints(Some(&push), 1, true).map(|p| p.keep), Some(3));
    }

    #[test]
    fn a_node_is_never_restarted_alone_and_keeps_its_instance_while_the_gang_may_restart() {
        let spec = RunSpec {
            run: "run-0123456789ab".parse().expect("run id"),
            argv: vec!["python".into(), "train.py".into()],
            env: vec![],
            cwd: String::new(),
            setup: protocol::Setup::Auto,
            restart: RestartPolicy::OnFailure { max_restarts: 3 },
            stop_grace_ms: 1000,
            end: EndAction::Terminate,
            spot_signal: 15,
            storage: None,
            data: vec![],
            pull_alongside: false,
            checkpoints: Some(protocol::CheckpointPush {
                dest: "s3://b/checkpoints/run-0123456789ab/".into(),
                keep: 3,
            }),
            resume_from: None,
        };
        // (policy, node) -> (node's policy, node's end action, pushes checkpoints)
        let cases: &[(RestartPolicy, u32, EndAction, bool)] = &[
            (
                RestartPolicy::OnFailure { max_restarts: 3 },
                0,
                EndAction::Keep,
                true,
            ),
            (
                RestartPolicy::OnFailure { max_restarts: 3 },
                1,
                EndAction::Keep,
                false,
            ),
            (RestartPolicy::Always, 1, EndAction::Keep, false),
            (RestartPolicy::Never, 0, EndAction::Terminate, true),
            (RestartPolicy::Never, 1, EndAction::Terminate, false),
        ];
        for (policy, node, end, pushes) in cases {
            let mut run = spec.clone();
            run.restart = *policy;
            let got = node_spec(&run, *node, false);
            assert_eq!(got.restart, RestartPolicy::Never, "{policy:?} {node}");
            assert_eq!(got.end, *end, "{policy:?} {node}");
            assert_eq!(got.checkpoints.is_some(), *pushes, "{policy:?} {node}");
            assert_eq!(got.argv, spec.argv);
        }
    }

    fn exited(code: i32) -> RunEnd {
        RunEnd::Exited {
            code,
            stop_requested: false,
        }
    }
    fn stopped() -> RunEnd {
        RunEnd::Signaled {
            signal: 15,
            stop_requested: true,
        }
    }
    fn lost() -> RunEnd {
        RunEnd::Lost {
            message: "the agent restarted".into(),
        }
    }
    fn at(node: u32, end: RunEnd, at_ms: u64) -> NodeEnd {
        NodeEnd { node, end, at_ms }
    }

    #[test]
    fn check() {
        let cases: &[(&str, u32, Vec<NodeEnd>, Step)] = &[
            ("nothing yet", 2, vec![], Step::Wait),
            (
                "a rank finished first",
                2,
                vec![at(1, exited(0), 5)],
                Step::Wait,
            ),
            (
                "all finished: node 0's success",
                2,
                vec![at(1, exited(0), 5), at(0, exited(0), 6)],
                Step::End(at(0, exited(0), 6)),
            ),
            (
                "a node failed: the others stop",
                3,
                vec![at(2, exited(3), 5)],
                Step::StopOthers { cause: 2 },
            ),
            (
                "a node lost: the others stop",
                2,
                vec![at(1, lost(), 5)],
                Step::StopOthers { cause: 1 },
            ),
            (
                "still stopping the third after the second went",
                3,
                vec![at(2, exited(3), 5), at(1, stopped(), 6)],
                Step::StopOthers { cause: 2 },
            ),
            (
                "the failure is the run's end, not the stops it caused",
                2,
                vec![at(1, exited(3), 5), at(0, stopped(), 6)],
                Step::End(at(1, exited(3), 5)),
            ),
            (
                "the first failure of two",
                3,
                vec![at(2, exited(1), 9), at(1, lost(), 5), at(0, stopped(), 10)],
                Step::End(at(1, lost(), 5)),
            ),
            (
                "a user's stop stops them all",
                2,
                vec![at(0, stopped(), 5)],
                Step::StopOthers { cause: 0 },
            ),
            (
                "and the run ends stopped",
                2,
                vec![at(0, stopped(), 5), at(1, stopped(), 6)],
                Step::End(at(0, stopped(), 5)),
            ),
            (
                "a stop after a success is the run's end",
                2,
                vec![at(1, exited(0), 5), at(0, stopped(), 6)],
                Step::End(at(0, stopped(), 6)),
            ),
        ];
        for (name, nodes, ends, want) in cases {
            assert_eq!(step(*nodes, ends), *want, "{name}");
        }
    }

    #[test]
    fn restarts() {
        let on_failure = RestartPolicy::OnFailure { max_restarts: 2 };
        let spot = Notices {
            spot: true,
            budget: false,
        };
        let quiet = Notices::default();
        // (case, policy, the run's end, notices, restarts so far, the restart as (attempt, delay s))
        type Case = (
            &'static str,
            RestartPolicy,
            RunEnd,
            Notices,
            u32,
            Option<(u32, u64)>,
        );
        let cases: &[Case] = &[
            (
                "a lost node, on failure",
                on_failure,
                lost(),
                quiet,
                0,
                Some((2, 1)),
            ),
            (
                "a failed node",
                on_failure,
                exited(3),
                quiet,
                0,
                Some((2, 1)),
            ),
            ("the second", on_failure, exited(3), quiet, 1, Some((3, 2))),
            ("out of restarts", on_failure, exited(3), quiet, 2, None),
            ("never", RestartPolicy::Never, lost(), quiet, 0, None),
            ("success, on failure", on_failure, exited(0), quiet, 0, None),
            (
                "success, always",
                RestartPolicy::Always,
                exited(0),
                quiet,
                0,
                Some((2, 1)),
            ),
            (
                "stopped by the user",
                RestartPolicy::Always,
                stopped(),
                quiet,
                0,
                None,
            ),
            ("a spot notice", on_failure, exited(3), spot, 0, None),
            (
                "setup failed",
                on_failure,
                RunEnd::SetupFailed {
                    message: "pip".into(),
                },
                quiet,
                0,
                None,
            ),
        ];
        for (name, policy, end, notices, restarts, want) in cases {
            let mut history = History {
                restarts: *restarts,
                quick_failures: *restarts,
            };
            let got = restart(
                *policy,
                &at(1, end.clone(), 5),
                *notices,
                Duration::from_secs(10),
                &mut history,
            )
            .map(|r| (r.attempt, r.delay.as_secs()));
            assert_eq!(got, *want, "{name}");
        }
        let why = restart(
            on_failure,
            &at(1, lost(), 5),
            quiet,
            Duration::ZERO,
            &mut History::default(),
        )
        .map(|r| r.cause);
        assert_eq!(why.as_deref(), Some("node 1: the agent restarted"));
    }

    #[test]
    fn a_restart_resumes_from_the_runs_own_checkpoints_once_there_are_some() {
        let dest = Some("s3://b/checkpoints/run-0123456789ab/");
        // (the run's prefix, node 0 pushed one, --resume-from, what a restart resumes from)
        type Case = (
            Option<&'static str>,
            bool,
            Option<&'static str>,
            Option<&'static str>,
        );
        let cases: &[Case] = &[
            (dest, true, None, dest),
            (dest, false, None, None),
            (
                dest,
                false,
                Some("s3://b/checkpoints/run-a/"),
                Some("s3://b/checkpoints/run-a/"),
            ),
            (dest, true, Some("s3://b/checkpoints/run-a/"), dest),
            (None, false, None, None),
        ];
        for (dest, pushed, first, want) in cases {
            assert_eq!(
                resume_from(*dest, *pushed, *first).as_deref(),
                *want,
                "{dest:?} {pushed} {first:?}"
            );
        }
    }

    #[test]
    fn the_error_names_the_node() {
        assert_eq!(
            error(&at(1, exited(3), 5)).as_deref(),
            Some("node 1: the process exited with 3")
        );
        assert_eq!(
            error(&at(1, lost(), 5)).as_deref(),
            Some("node 1: the agent restarted")
        );
        assert_eq!(error(&at(0, exited(0), 5)), None);
        assert_eq!(error(&at(0, stopped(), 5)), None);
    }
}
