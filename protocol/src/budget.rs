//! A run's budget (`run --max-cost`, `--max-hours`): what it may spend, what it had spent
//! when the daemon handed it over, and when it is used up. Pure: both ends decide with
//! these functions, the agent to stop the run on time and the daemon to show the spend.
//! Dollars are counted in millionths (micros) so the messages stay `Eq` and exact.

use serde::{Deserialize, Serialize};

const MS_PER_HOUR: u128 = 3_600_000;

/// A run's caps and its spend when the budget was handed to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// The most the run may cost, in micro-dollars.
    pub max_cost_micros: Option<u64>,
    /// The longest the run may take, in milliseconds.
    pub max_ms: Option<u64>,
    /// What the run's instance costs per hour, in micro-dollars; `None` when not known
    /// (then only a time cap can be held: a cost cap is refused before launch).
    pub price_micros_per_hour: Option<u64>,
    /// What the run had cost when this was handed over (its instance's time before the
    /// start: the launch, the sync; earlier incarnations).
    pub spent_micros: u64,
    /// How long the run had taken when this was handed over.
    pub elapsed_ms: u64,
}

/// A run's spend at some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spend {
    /// `None` when the price is not known.
    pub cost_micros: Option<u64>,
    pub elapsed_ms: u64,
}

/// The cap a run reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    Cost { max_micros: u64 },
    Time { max_ms: u64 },
}

impl Budget {
    /// Caps (dollars, milliseconds) and a price ($/h), with nothing spent yet.
    pub fn new(max_cost: Option<f64>, max_ms: Option<u64>, price_per_hour: Option<f64>) -> Self {
        Budget {
            max_cost_micros: max_cost.map(micros),
            max_ms,
            price_micros_per_hour: price_per_hour.map(micros),
            spent_micros: 0,
            elapsed_ms: 0,
        }
    }

    /// The same budget handed over `ms` later: what accrued meanwhile counts as spent.
    pub fn later(self, ms: u64) -> Self {
        let spend = self.spend(ms);
        Budget {
            spent_micros: spend.cost_micros.unwrap_or(self.spent_micros),
            elapsed_ms: spend.elapsed_ms,
            ..self
        }
    }

    /// The spend `since_ms` after the budget was handed over.
    pub fn spend(&self, since_ms: u64) -> Spend {
        Spend {
            cost_micros: self.price_micros_per_hour.map(|price| {
                let more = u128::from(price) * u128::from(since_ms) / MS_PER_HOUR;
                self.spent_micros
                    .saturating_add(u64::try_from(more).unwrap_or(u64::MAX))
            }),
            elapsed_ms: self.elapsed_ms.saturating_add(since_ms),
        }
    }

    /// The cap `spend` has reached, if any (the cost cap first: it is what users fear).
    pub fn reached(&self, spend: &Spend) -> Option<Limit> {
        if let (Some(max), Some(cost)) = (self.max_cost_micros, spend.cost_micros)
            && cost >= max
        {
            return Some(Limit::Cost { max_micros: max });
        }
        match self.max_ms {
            Some(max) if spend.elapsed_ms >= max => Some(Limit::Time { max_ms: max }),
            _ => None,
        }
    }

    /// How long after `since_ms` (from the hand-over) the first cap is reached: zero when
    /// one already is, `None` when none can be (no caps, or a cost cap with no price).
    pub fn left_ms(&self, since_ms: u64) -> Option<u64> {
        let spend = self.spend(since_ms);
        if self.reached(&spend).is_some() {
            return Some(0);
        }
        let by_time = self.max_ms.map(|max| max - spend.elapsed_ms);
        let by_cost = match (
            self.max_cost_micros,
            self.price_micros_per_hour,
            spend.cost_micros,
        ) {
            (Some(max), Some(price), Some(cost)) if price > 0 => {
                let left = u128::from(max - cost) * MS_PER_HOUR;
                // Rounded up: the cap is reached at that moment, not just before it.
                Some(u64::try_from(left.div_ceil(u128::from(price))).unwrap_or(u64::MAX))
            }
            _ => None,
        };
        match (by_time, by_cost) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Budget {
    /// The caps as a run's start reports them, each with how long it leaves from now:
    /// `stops at $5.00 (4h 57m from now at $1.01/h) or 48h (47h 59m from now)`.
    pub fn caps_words(&self) -> String {
        let mut parts = Vec::new();
        if let Some(max) = self.max_cost_micros {
            let alone = Budget {
                max_ms: None,
                ..*self
            };
            parts.push(match (alone.left_ms(0), self.price_micros_per_hour) {
                (Some(left), Some(price)) => format!(
                    "{} ({} from now at {}/h)",
                    dollars(max),
                    duration(left),
                    dollars(price)
                ),
                _ => format!("{} (the price is not known)", dollars(max)),
            });
        }
        if let Some(max) = self.max_ms {
            parts.push(format!(
                "{} ({} from now)",
                duration(max),
                duration(max.saturating_sub(self.elapsed_ms))
            ));
        }
        format!("stops at {}", parts.join(" or "))
    }
}

/// Dollars as people read them: `$1.50`, `$0.0042` under a cent.
pub fn dollars(micros: u64) -> String {
    let d = micros as f64 / 1e6;
    if micros > 0 && micros < 10_000 {
        format!("${d:.4}")
    } else {
        format!("${d:.2}")
    }
}

/// A duration as people read it, to the second: `1h 2m 3s`.
pub fn duration(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(ms / 1000)).to_string()
}

impl Limit {
    /// The cap reached, and the spend, in words: `the $6.00 cost cap ($6.01 spent in 6s)`.
    pub fn describe(&self, spend: &Spend) -> String {
        let spent = match spend.cost_micros {
            Some(cost) => format!("{} spent in {}", dollars(cost), duration(spend.elapsed_ms)),
            None => format!("{} so far", duration(spend.elapsed_ms)),
        };
        match self {
            Limit::Cost { max_micros } => {
                format!("the {} cost cap ({spent})", dollars(*max_micros))
            }
            Limit::Time { max_ms } => format!("the {} time cap ({spent})", duration(*max_ms)),
        }
    }
}

/// Hours (as the user wrote them) in milliseconds.
pub fn hours_ms(hours: f64) -> u64 {
    (hours * MS_PER_HOUR as f64).round().max(0.0) as u64
}

/// Dollars (as the user wrote them) in micro-dollars.
pub fn micros(dollars: f64) -> u64 {
    (dollars * 1e6).round().max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    /// $1 spent over the minute before the hand-over.
    fn budget(max_cost: Option<f64>, max_hours: Option<f64>, price: Option<f64>) -> Budget {
        Budget {
            spent_micros: micros(1.0),
            elapsed_ms: 60_000,
            ..Budget::new(max_cost, max_hours.map(hours_ms), price)
        }
    }

    #[test]
    fn the_caps_are_told_with_the_time_they_leave() {
        let check = |b: Budget, want: &str| assert_eq!(b.caps_words(), want, "{b:?}");
        check(
            Budget::new(Some(5.0), None, Some(1.0)),
            "stops at $5.00 (5h from now at $1.00/h)",
        );
        check(
            Budget::new(Some(5.0), Some(hours_ms(48.0)), Some(2.0)).later(HOUR),
            "stops at $5.00 (1h 30m from now at $2.00/h) or 2days (1day 23h from now)",
        );
        check(
            Budget::new(None, Some(hours_ms(0.5)), None),
            "stops at 30m (30m from now)",
        );
        check(
            Budget::new(Some(5.0), None, None),
            "stops at $5.00 (the price is not known)",
        );
        // Already past: nothing left.
        check(
            Budget::new(Some(1.0), Some(HOUR), Some(4.0)).later(2 * HOUR),
            "stops at $1.00 (0s from now at $4.00/h) or 1h (0s from now)",
        );
    }

    #[test]
    fn handed_over_later_the_spend_so_far_is_carried() {
        let fresh = Budget::new(Some(10.0), Some(hours_ms(2.0)), Some(4.0));
        assert_eq!(fresh.max_ms, Some(2 * HOUR));
        let later = fresh.later(HOUR / 4);
        assert_eq!(
            (later.spent_micros, later.elapsed_ms),
            (micros(1.0), HOUR / 4)
        );
        assert_eq!(later.spend(HOUR / 4), fresh.spend(HOUR / 2));
        assert_eq!(later.left_ms(0), fresh.left_ms(HOUR / 4));
        let unpriced = Budget::new(None, Some(HOUR), None).later(1000);
        assert_eq!((unpriced.spent_micros, unpriced.elapsed_ms), (0, 1000));
    }

    #[test]
    fn spend_accrues_from_the_hand_over() {
        let b = budget(None, None, Some(2.0));
        let check = |since_ms: u64, cost: Option<f64>, elapsed_ms: u64| {
            let want = Spend {
                cost_micros: cost.map(micros),
                elapsed_ms,
            };
            assert_eq!(b.spend(since_ms), want, "since {since_ms} ms");
        };
        check(0, Some(1.0), 60_000);
        check(HOUR / 2, Some(2.0), 60_000 + HOUR / 2);
        check(HOUR * 10, Some(21.0), 60_000 + HOUR * 10);
        let unpriced = budget(None, Some(1.0), None);
        assert_eq!(unpriced.spend(HOUR).cost_micros, None);
        assert_eq!(unpriced.spend(u64::MAX).elapsed_ms, u64::MAX, "saturates");
    }

    #[test]
    fn the_first_cap_reached_is_reported_cost_first() {
        let check = |b: Budget, since_ms: u64, want: Option<Limit>| {
            assert_eq!(b.reached(&b.spend(since_ms)), want, "{b:?} at {since_ms}");
        };
        let cost = Limit::Cost {
            max_micros: micros(3.0),
        };
        let time = Limit::Time { max_ms: HOUR };
        // $1 spent, $2/h: $3 is reached an hour on; an hour's cap 59 minutes on.
        check(budget(Some(3.0), None, Some(2.0)), HOUR - 1, None);
        check(budget(Some(3.0), None, Some(2.0)), HOUR, Some(cost));
        check(budget(None, Some(1.0), Some(2.0)), HOUR - 60_001, None);
        check(
            budget(None, Some(1.0), Some(2.0)),
            HOUR - 60_000,
            Some(time),
        );
        check(budget(Some(3.0), Some(1.0), Some(2.0)), HOUR, Some(cost));
        // No price: a cost cap cannot be reached, a time cap still is.
        check(budget(Some(3.0), None, None), HOUR * 100, None);
        check(budget(Some(3.0), Some(1.0), None), HOUR, Some(time));
        // Already over when handed over.
        check(
            budget(Some(0.5), None, Some(2.0)),
            0,
            Some(Limit::Cost {
                max_micros: micros(0.5),
            }),
        );
        check(budget(None, None, Some(2.0)), u64::MAX, None);
    }

    #[test]
    fn left_is_the_wait_until_the_first_cap() {
        let check = |b: Budget, since_ms: u64, want: Option<u64>| {
            assert_eq!(b.left_ms(since_ms), want, "{b:?} at {since_ms}");
        };
        check(budget(Some(3.0), None, Some(2.0)), 0, Some(HOUR));
        check(
            budget(Some(3.0), None, Some(2.0)),
            HOUR / 4,
            Some(HOUR * 3 / 4),
        );
        check(
            budget(Some(3.0), Some(0.5), Some(2.0)),
            0,
            Some(HOUR / 2 - 60_000),
        );
        check(budget(Some(3.0), Some(0.5), Some(2.0)), HOUR, Some(0));
        check(budget(Some(3.0), None, None), 0, None);
        check(budget(None, None, Some(2.0)), 0, None);
        check(budget(Some(3.0), None, Some(0.0)), 0, None);
        // Rounded up: waiting this long reaches the cap, a millisecond less does not.
        let b = budget(Some(1.000_001), None, Some(7.0));
        let left = b.left_ms(0).expect("reachable");
        assert!(b.reached(&b.spend(left)).is_some());
        assert!(b.reached(&b.spend(left - 1)).is_none());
    }

    #[test]
    fn words() {
        assert_eq!(dollars(micros(6.0)), "$6.00");
        assert_eq!(dollars(micros(0.0042)), "$0.0042");
        assert_eq!(dollars(0), "$0.00");
        assert_eq!(duration(3_723_000), "1h 2m 3s");
        assert_eq!(duration(65_000), "1m 5s");
        let spend = Spend {
            cost_micros: Some(micros(6.01)),
            elapsed_ms: 6_000,
        };
        assert_eq!(
            Limit::Cost {
                max_micros: micros(6.0)
            }
            .describe(&spend),
            "the $6.00 cost cap ($6.01 spent in 6s)"
        );
        let spend = Spend {
            cost_micros: None,
            elapsed_ms: 7_200_000,
        };
        assert_eq!(
            Limit::Time { max_ms: 7_200_000 }.describe(&spend),
            "the 2h time cap (2h so far)"
        );
    }
}
