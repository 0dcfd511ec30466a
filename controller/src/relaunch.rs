//! Managed spot (`run --spot --on-interrupt relaunch[:N]`): what an interrupted run does
//! next. Pure: the daemon passes the run's policy, how many relaunches it has made, and
//! how the interruption came to be known; it launches the replacement when told to.
//!
//! An interruption is a spot notice the run ended after (the daemon was there), or the
//! run's instance found gone from the provider while the daemon was away or out of touch.
//! Either way the run keeps its id and its one log: the replacement is a new incarnation
//! of the node, resuming from the newest checkpoint in the store.

use serde::{Deserialize, Serialize};

/// What a run does when its spot instance is taken back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInterrupt {
    /// The run ends `interrupted` (its checkpoints are in the store).
    #[default]
    End,
    /// A replacement is launched and the command resumed, at most `max` times.
    Relaunch { max: u32 },
}

/// Relaunches `relaunch` allows without a number.
pub const DEFAULT_RELAUNCHES: u32 = 3;

/// Parses `end`, `relaunch` or `relaunch:N`.
pub fn parse(s: &str) -> Result<OnInterrupt, String> {
    const HELP: &str = "use end, relaunch or relaunch:N (e.g. relaunch:5)";
    match s {
        "end" => Ok(OnInterrupt::End),
        "relaunch" => Ok(OnInterrupt::Relaunch {
            max: DEFAULT_RELAUNCHES,
        }),
        _ => {
            let n = s
                .strip_prefix("relaunch:")
                .ok_or_else(|| format!("{s:?} is not what to do on an interruption: {HELP}"))?;
            match n.parse::<u32>() {
                Ok(0) | Err(_) => Err(format!(
                    "{n:?} is not a number of relaunches (at least 1): {HELP}"
                )),
                Ok(max) => Ok(OnInterrupt::Relaunch { max }),
            }
        }
    }
}

/// How an interruption came to be known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interruption {
    /// The run ended after a spot notice its agent reported (`at_ms`).
    Notice { instance: String, at_ms: u64 },
    /// The run's instance was found gone from the provider (`at_ms`), its end never
    /// reported: the daemon was away, or the instance went without a notice.
    Gone { instance: String, at_ms: u64 },
}

impl Interruption {
    /// In words, for the replacement's `started again ... after` line.
    pub fn words(&self) -> String {
        let at = |ms: u64| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
        };
        match self {
            Interruption::Notice { instance, at_ms } => {
                format!("a spot interruption of {instance} at {}", at(*at_ms))
            }
            Interruption::Gone { instance, at_ms } => format!(
                "{instance} was found gone at {} (no end reached the daemon: it was away, or the instance went without a notice)",
                at(*at_ms)
            ),
        }
    }
}

/// What an interrupted run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Launch replacement number `number` (from 1).
    Relaunch { number: u32 },
    /// The run is over: interrupted (with the reason when relaunches were allowed).
    End { error: Option<String> },
}

/// The next step for a run under `policy` that has made `relaunches` so far.
pub fn decide(policy: OnInterrupt, relaunches: u32) -> Decision {
    match policy {
        OnInterrupt::End => Decision::End { error: None },
        OnInterrupt::Relaunch { max } if relaunches < max => Decision::Relaunch {
            number: relaunches + 1,
        },
        OnInterrupt::Relaunch { max } => Decision::End {
            error: Some(format!(
                "interrupted again after {relaunches} relaunch{} (--on-interrupt relaunch:{max} allows {max}); its checkpoints are in the store",
                if relaunches == 1 { "" } else { "es" }
            )),
        },
    }
}

/// The replacement in words, for the `started again ... after` line: `relaunch 1 on
/// ec2-3fa9c1, $1.01/h`, or for a gang `relaunch 1 on ec2-a, ec2-b, 2 x $1.01/h`.
pub fn replaced_by(number: u32, instances: &[impl std::fmt::Display], each: Option<f64>) -> String {
    let names: Vec<String> = instances.iter().map(ToString::to_string).collect();
    let price = match (each, names.len()) {
        (None, _) => String::new(),
        (Some(p), 1) => format!(", {}/h", crate::provider::ec2::prices::dollars(p)),
        (Some(p), n) => format!(", {n} x {}/h", crate::provider::ec2::prices::dollars(p)),
    };
    format!("relaunch {number} on {}{price}", names.join(", "))
}

/// Why `--on-interrupt relaunch` cannot apply to this run, if it cannot: a relaunch
/// replaces spot instances launched for the run (a gang's all together).
pub fn check(
    policy: OnInterrupt,
    spot: bool,
    launched: bool,
    keep: bool,
) -> Result<(), (String, &'static str)> {
    if policy == OnInterrupt::End {
        return Ok(());
    }
    if !launched {
        return Err((
            "--on-interrupt relaunch replaces an instance launched for the run; it cannot relaunch one given with --on".into(),
            "drop --on (the run launches its instance), or drop --on-interrupt",
        ));
    }
    if !spot {
        return Err((
            "--on-interrupt relaunch is for spot instances, which the provider takes back".into(),
            "add --spot, or drop --on-interrupt",
        ));
    }
    if keep {
        return Err((
            "--on-interrupt relaunch launches replacements for the run; --keep would keep each"
                .into(),
            "drop --keep, or drop --on-interrupt",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let cases: &[(&str, Result<OnInterrupt, &str>)] = &[
            ("end", Ok(OnInterrupt::End)),
            ("relaunch", Ok(OnInterrupt::Relaunch { max: 3 })),
            ("relaunch:5", Ok(OnInterrupt::Relaunch { max: 5 })),
            ("relaunch:0", Err("at least 1")),
            ("relaunch:x", Err("not a number")),
            ("restart", Err("use end, relaunch or relaunch:N")),
        ];
        for (text, want) in cases {
            match (parse(text), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, *want, "{text}"),
                (Err(e), Err(needle)) => assert!(e.contains(needle), "{text}: {e}"),
                (got, want) => panic!("{text}: {got:?}, expected {want:?}"),
            }
        }
    }

    #[test]
    fn check() {
        let relaunch = OnInterrupt::Relaunch { max: 2 };
        let cases: &[(OnInterrupt, u32, Decision)] = &[
            (OnInterrupt::End, 0, Decision::End { error: None }),
            (relaunch, 0, Decision::Relaunch { number: 1 }),
            (relaunch, 1, Decision::Relaunch { number: 2 }),
            (
                relaunch,
                2,
                Decision::End {
                    error: Some("interrupted again after 2 relaunches (--on-interrupt relaunch:2 allows 2); its checkpoints are in the store".into()),
                },
            ),
            (
                OnInterrupt::Relaunch { max: 1 },
                1,
                Decision::End {
                    error: Some("interrupted again after 1 relaunch (--on-interrupt relaunch:1 allows 1); its checkpoints are in the store".into()),
                },
            ),
        ];
        for (policy, relaunches, want) in cases {
            assert_eq!(
                decide(*policy, *relaunches),
                *want,
                "{policy:?} {relaunches}"
            );
        }
    }

    #[test]
    fn only_spot_instances_launched_for_the_run_are_relaunched() {
        let relaunch = OnInterrupt::Relaunch { max: 3 };
        // (policy, spot, launched, keep) -> refused, with a word of why
        type Case = (OnInterrupt, bool, bool, bool, Option<&'static str>);
        let cases: &[Case] = &[
            (relaunch, true, true, false, None),
            (OnInterrupt::End, false, false, true, None),
            (relaunch, false, true, false, Some("spot")),
            (relaunch, true, false, false, Some("--on")),
            (relaunch, true, true, true, Some("--keep")),
        ];
        for (policy, spot, launched, keep, want) in cases {
            let got = super::check(*policy, *spot, *launched, *keep).err();
            match (got, want) {
                (None, None) => {}
                (Some((e, _)), Some(needle)) => assert!(e.contains(needle), "{e}"),
                (got, want) => panic!("{got:?}, expected {want:?}"),
            }
        }
    }

    #[test]
    fn a_replacement_is_said_with_its_instances_and_price() {
        let cases: &[(u32, &[&str], Option<f64>, &str)] = &[
            (
                1,
                &["ec2-aaaaaa"],
                Some(1.006),
                "relaunch 1 on ec2-aaaaaa, $1.01/h",
            ),
            (2, &["ec2-aaaaaa"], None, "relaunch 2 on ec2-aaaaaa"),
            (
                1,
                &["ec2-aaaaaa", "ec2-bbbbbb"],
                Some(1.006),
                "relaunch 1 on ec2-aaaaaa, ec2-bbbbbb, 2 x $1.01/h",
            ),
        ];
        for (number, names, price, want) in cases {
            assert_eq!(replaced_by(*number, names, *price), *want);
        }
    }

    #[test]
    fn interruptions_say_what_happened_and_when() {
        let notice = Interruption::Notice {
            instance: "ec2-abc123".into(),
            at_ms: 1_796_661_000_000,
        };
        assert_eq!(
            notice.words(),
            "a spot interruption of ec2-abc123 at 2026-12-07T16:30:00Z"
        );
        let gone = Interruption::Gone {
            instance: "ec2-abc123".into(),
            at_ms: 1_796_661_000_000,
        };
        assert!(
            gone.words()
                .starts_with("ec2-abc123 was found gone at 2026-12-07T16:30:00Z")
        );
    }
}
