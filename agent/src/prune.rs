//! What to delete from the instance's disk so runctl never fills it: the pure decision.
//! `plan` takes what is on disk (runs, their checkpoints, cached environments, store
//! records, sizes) and the limits, and names what goes; `Runs::prune` measures and deletes.
//!
//! The rules, in order:
//! 1. An active run loses nothing, and neither does the run about to start.
//! 2. Ended runs beyond the newest `keep_runs` lose their trees and environments, and
//!    their logs once the controller has said it stored them whole (`ControllerMsg::Stored`).
//! 3. An ended run's checkpoints that are complete in the object store go, except its
//!    newest `keep_local_checkpoints` (at least its newest); one not (yet) in the store
//!    is never deleted.
//! 4. Cached environments and store records beyond the newest `keep_runs` go (at least
//!    one of each stays: the next run reuses it).
//! 5. While runctl's files still take more than the budget: the least recently used of
//!    what is left goes, oldest first (ended runs' trees, then environments and records
//!    other than the newest, then kept checkpoints in the store other than each run's
//!    newest).
//!
//! The shared data directory is never pruned.

use std::collections::HashSet;

use protocol::RunId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub keep_runs: u32,
    pub budget_bytes: u64,
    pub keep_local_checkpoints: u32,
}

/// One run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFacts {
    pub run: RunId,
    /// Running, setting up, or about to start: untouchable.
    pub active: bool,
    /// When it ended (or was last touched), ms since the epoch: recency.
    pub last_used_ms: u64,
    /// Its tree and environment (what pruning the run frees); 0 once pruned.
    pub bytes: u64,
    pub checkpoints: Vec<CheckpointFacts>,
    /// Its log is on disk and the controller has stored it whole.
    pub log_stored: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFacts {
    pub name: String,
    pub saved_ms: u64,
    pub bytes: u64,
    /// Complete in the object store, and not changed on disk since.
    pub in_store: bool,
}

/// A cached environment or a store record: something kept for the next run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheFacts {
    pub key: String,
    pub last_used_ms: u64,
    /// What deleting it frees (for a record: an estimate, the objects only it names).
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub runs: Vec<RunFacts>,
    pub envs: Vec<CacheFacts>,
    pub records: Vec<CacheFacts>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Runs whose trees and environments go.
    pub runs: Vec<RunId>,
    /// Runs whose logs go (the controller holds them).
    pub logs: Vec<RunId>,
    /// (run, checkpoint name) to delete from the instance's disk.
    pub checkpoints: Vec<(RunId, String)>,
    pub envs: Vec<String>,
    pub records: Vec<String>,
    /// What runctl's files will take after the plan (an estimate).
    pub after_bytes: u64,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
            && self.logs.is_empty()
            && self.checkpoints.is_empty()
            && self.envs.is_empty()
            && self.records.is_empty()
    }
}

impl Facts {
    pub fn total_bytes(&self) -> u64 {
        let runs: u64 = self
            .runs
            .iter()
            .map(|r| r.bytes + r.checkpoints.iter().map(|c| c.bytes).sum::<u64>())
            .sum();
        let caches: u64 = self.envs.iter().chain(&self.records).map(|c| c.bytes).sum();
        runs + caches
    }
}

/// What goes. See the module's rules.
pub fn plan(facts: &Facts, limits: &Limits) -> Plan {
    let mut out = Plan::default();
    let mut total = facts.total_bytes();
    let keep = limits.keep_runs as usize;
    let mut ended: Vec<&RunFacts> = facts.runs.iter().filter(|r| !r.active).collect();
    ended.sort_by(|a, b| b.last_used_ms.cmp(&a.last_used_ms).then(a.run.cmp(&b.run)));

    // Rules 2 and 3.
    let mut pruned: HashSet<&RunId> = HashSet::new();
    let mut kept_checkpoints: Vec<(&RunFacts, &CheckpointFacts)> = Vec::new();
    for (rank, run) in ended.iter().enumerate() {
        if rank >= keep && run.bytes > 0 {
            out.runs.push(run.run.clone());
            pruned.insert(&run.run);
            total -= run.bytes;
        }
        if rank >= keep && run.log_stored {
            out.logs.push(run.run.clone());
        }
        let mut stored: Vec<&CheckpointFacts> =
            run.checkpoints.iter().filter(|c| c.in_store).collect();
        stored.sort_by(|a, b| b.saved_ms.cmp(&a.saved_ms).then(a.name.cmp(&b.name)));
        for (n, c) in stored.into_iter().enumerate() {
            if n >= limits.keep_local_checkpoints.max(1) as usize {
                out.checkpoints.push((run.run.clone(), c.name.clone()));
                total -= c.bytes;
            } else if n > 0 {
                kept_checkpoints.push((run, c));
            }
        }
    }

    // Rule 4.
    let by_recency = |caches: &[CacheFacts]| {
        let mut v: Vec<CacheFacts> = caches.to_vec();
        v.sort_by(|a, b| b.last_used_ms.cmp(&a.last_used_ms).then(a.key.cmp(&b.key)));
        v
    };
    let envs = by_recency(&facts.envs);
    let records = by_recency(&facts.records);
    let keep_caches = keep.max(1);
    for (caches, goes) in [(&envs, &mut out.envs), (&records, &mut out.records)] {
        for c in caches.iter().skip(keep_caches) {
            goes.push(c.key.clone());
            total -= c.bytes;
        }
    }

    // Rule 5: oldest first, across kinds.
    if total > limits.budget_bytes {
        #[derive(Clone, Copy)]
        enum What<'a> {
            Run(&'a RunFacts),
            Env(&'a CacheFacts),
            Record(&'a CacheFacts),
            Checkpoint(&'a RunFacts, &'a CheckpointFacts),
        }
        let mut candidates: Vec<(u64, What)> = Vec::new();
        for run in &ended {
            if !pruned.contains(&run.run) && run.bytes > 0 {
                candidates.push((run.last_used_ms, What::Run(run)));
            }
        }
        for c in envs.iter().take(keep_caches).skip(1) {
            candidates.push((c.last_used_ms, What::Env(c)));
        }
        for c in records.iter().take(keep_caches).skip(1) {
            candidates.push((c.last_used_ms, What::Record(c)));
        }
        for (run, c) in &kept_checkpoints {
            candidates.push((c.saved_ms, What::Checkpoint(run, c)));
        }
        candidates.sort_by_key(|(at, _)| *at);
        for (_, what) in candidates {
            if total <= limits.budget_bytes {
                break;
            }
            match what {
                What::Run(r) => {
                    out.runs.push(r.run.clone());
                    total -= r.bytes;
                }
                What::Env(c) => {
                    out.envs.push(c.key.clone());
                    total -= c.bytes;
                }
                What::Record(c) => {
                    out.records.push(c.key.clone());
                    total -= c.bytes;
                }
                What::Checkpoint(r, c) => {
                    out.checkpoints.push((r.run.clone(), c.name.clone()));
                    total -= c.bytes;
                }
            }
        }
    }
    out.after_bytes = total;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> RunId {
        RunId::from_random([n; 6])
    }

    fn run(n: u8, active: bool, at: u64, bytes: u64, ckpts: &[(&str, u64, bool)]) -> RunFacts {
        RunFacts {
            run: id(n),
            active,
            last_used_ms: at,
            bytes,
            checkpoints: ckpts
                .iter()
                .map(|(name, saved, in_store)| CheckpointFacts {
                    name: name.to_string(),
                    saved_ms: *saved,
                    bytes: 10,
                    in_store: *in_store,
                })
                .collect(),
            log_stored: false,
        }
    }

    fn cache(key: &str, at: u64, bytes: u64) -> CacheFacts {
        CacheFacts {
            key: key.into(),
            last_used_ms: at,
            bytes,
        }
    }

    const ROOMY: u64 = u64::MAX;

    fn limits(keep_runs: u32, budget_bytes: u64, keep_local_checkpoints: u32) -> Limits {
        Limits {
            keep_runs,
            budget_bytes,
            keep_local_checkpoints,
        }
    }

    #[test]
    fn logs_go_beyond_keep_runs_once_the_controller_holds_them() {
        let stored = |n, active, at| RunFacts {
            log_stored: true,
            ..run(n, active, at, 0, &[])
        };
        let check = |runs: Vec<RunFacts>, keep: u32, expected: &[u8]| {
            let facts = Facts {
                runs,
                envs: vec![],
                records: vec![],
            };
            let got = plan(&facts, &limits(keep, ROOMY, 1)).logs;
            assert_eq!(got, expected.iter().map(|n| id(*n)).collect::<Vec<_>>());
        };
        // Newest first: beyond the newest one, both older logs go.
        check(
            vec![
                stored(1, false, 1),
                stored(2, false, 2),
                stored(3, false, 3),
            ],
            1,
            &[2, 1],
        );
        // One the controller has not confirmed stays, whatever its age.
        check(
            vec![
                stored(1, false, 1),
                run(2, false, 2, 0, &[]),
                stored(3, false, 3),
            ],
            1,
            &[1],
        );
        // An active run's log never goes.
        check(vec![stored(1, true, 1), stored(2, false, 2)], 0, &[2]);
        check(vec![stored(1, false, 1)], 1, &[]);
    }

    #[test]
    fn check() {
        struct Case {
            name: &'static str,
            facts: Facts,
            limits: Limits,
            runs: Vec<RunId>,
            checkpoints: Vec<(RunId, &'static str)>,
            envs: Vec<&'static str>,
            records: Vec<&'static str>,
        }
        let case = |name, facts, limits, runs, checkpoints, envs, records| Case {
            name,
            facts,
            limits,
            runs,
            checkpoints,
            envs,
            records,
        };
        let f = |runs, envs, records| Facts {
            runs,
            envs,
            records,
        };
        let cases = [
            case(
                "nothing to do",
                f(vec![], vec![], vec![]),
                limits(5, ROOMY, 1),
                vec![],
                vec![],
                vec![],
                vec![],
            ),
            case(
                "keeps the newest ended runs",
                f(
                    vec![
                        run(1, false, 1, 100, &[]),
                        run(2, false, 3, 100, &[]),
                        run(3, false, 2, 100, &[]),
                    ],
                    vec![],
                    vec![],
                ),
                limits(2, ROOMY, 1),
                vec![id(1)],
                vec![],
                vec![],
                vec![],
            ),
            case(
                "an active run is never pruned",
                f(
                    vec![run(1, true, 1, 100, &[]), run(2, false, 2, 100, &[])],
                    vec![],
                    vec![],
                ),
                limits(0, 0, 0),
                vec![id(2)],
                vec![],
                vec![],
                vec![],
            ),
            case(
                "a run already pruned is not pruned again",
                f(
                    vec![run(1, false, 1, 0, &[]), run(2, false, 2, 100, &[])],
                    vec![],
                    vec![],
                ),
                limits(1, ROOMY, 1),
                vec![],
                vec![],
                vec![],
                vec![],
            ),
            case(
                "stored checkpoints but the newest go",
                f(
                    vec![run(
                        1,
                        false,
                        9,
                        100,
                        &[("a", 1, true), ("c", 3, true), ("b", 2, true)],
                    )],
                    vec![],
                    vec![],
                ),
                limits(5, ROOMY, 1),
                vec![],
                vec![(id(1), "b"), (id(1), "a")],
                vec![],
                vec![],
            ),
            case(
                "a checkpoint not in the store stays, and so does the newest stored",
                f(
                    vec![run(
                        1,
                        false,
                        9,
                        100,
                        &[("a", 1, false), ("b", 2, true), ("c", 3, true)],
                    )],
                    vec![],
                    vec![],
                ),
                limits(5, 0, 0),
                vec![id(1)],
                vec![(id(1), "b")],
                vec![],
                vec![],
            ),
            case(
                "an active run keeps its checkpoints",
                f(
                    vec![run(1, true, 9, 100, &[("a", 1, true), ("c", 3, true)])],
                    vec![],
                    vec![],
                ),
                limits(0, 0, 0),
                vec![],
                vec![],
                vec![],
                vec![],
            ),
            case(
                "keep_local_checkpoints 0 still keeps the newest",
                f(
                    vec![run(1, false, 9, 100, &[("a", 1, true), ("c", 3, true)])],
                    vec![],
                    vec![],
                ),
                limits(5, ROOMY, 0),
                vec![],
                vec![(id(1), "a")],
                vec![],
                vec![],
            ),
            case(
                "caches beyond keep_runs go, least recent first",
                f(
                    vec![],
                    vec![cache("e1", 1, 5), cache("e2", 2, 5), cache("e3", 3, 5)],
                    vec![cache("r1", 3, 5), cache("r2", 1, 5)],
                ),
                limits(1, ROOMY, 1),
                vec![],
                vec![],
                vec!["e2", "e1"],
                vec!["r2"],
            ),
            case(
                "one cache of each kind stays even with keep_runs 0",
                f(vec![], vec![cache("e1", 1, 5)], vec![cache("r1", 1, 5)]),
                limits(0, 0, 0),
                vec![],
                vec![],
                vec![],
                vec![],
            ),
            case(
                "over budget: oldest kept run goes first, then only what is needed",
                f(
                    vec![
                        run(1, false, 1, 100, &[]),
                        run(2, false, 2, 100, &[]),
                        run(3, false, 3, 100, &[]),
                    ],
                    vec![],
                    vec![],
                ),
                limits(5, 150, 1),
                vec![id(1), id(2)],
                vec![],
                vec![],
                vec![],
            ),
            case(
                "over budget: across kinds by age",
                f(
                    vec![run(1, false, 5, 100, &[])],
                    vec![cache("e-new", 9, 100), cache("e-old", 2, 100)],
                    vec![cache("r-new", 9, 100)],
                ),
                limits(5, 300, 1),
                vec![],
                vec![],
                vec!["e-old"],
                vec![],
            ),
            case(
                "over budget: the newest cached env and record stay",
                f(vec![], vec![cache("e", 1, 100)], vec![cache("r", 1, 100)]),
                limits(5, 0, 1),
                vec![],
                vec![],
                vec![],
                vec![],
            ),
            case(
                "over budget: older stored checkpoints of a kept run go, its newest stays",
                f(
                    vec![
                        run(1, true, 9, 100, &[]),
                        run(
                            2,
                            false,
                            9,
                            0,
                            &[("a", 1, true), ("b", 2, true), ("c", 3, true)],
                        ),
                    ],
                    vec![],
                    vec![],
                ),
                limits(5, 115, 3),
                vec![],
                vec![(id(2), "a"), (id(2), "b")],
                vec![],
                vec![],
            ),
        ];
        for c in cases {
            let got = plan(&c.facts, &c.limits);
            assert_eq!(got.runs, c.runs, "{}: runs", c.name);
            let ckpts: Vec<(RunId, String)> = c
                .checkpoints
                .iter()
                .map(|(r, n)| (r.clone(), n.to_string()))
                .collect();
            assert_eq!(got.checkpoints, ckpts, "{}: checkpoints", c.name);
            assert_eq!(got.envs, c.envs, "{}: envs", c.name);
            assert_eq!(got.records, c.records, "{}: records", c.name);
        }
    }

    #[test]
    fn the_estimate_is_what_is_left() {
        let facts = Facts {
            runs: vec![
                run(1, false, 1, 100, &[("a", 1, true)]),
                run(2, false, 2, 50, &[]),
            ],
            envs: vec![cache("e", 1, 7)],
            records: vec![],
        };
        assert_eq!(facts.total_bytes(), 167);
        let plan = plan(&facts, &limits(1, ROOMY, 0));
        assert_eq!(plan.runs, vec![id(1)]);
        assert_eq!(plan.after_bytes, 67);
    }
}
