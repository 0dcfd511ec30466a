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
//! user asked for, else node 0's success.

use protocol::RunEnd;

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
