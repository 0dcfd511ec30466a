//! What instances cost: on-demand prices kept as data (`data/ec2-prices.toml`, dated,
//! overridable per type in `[ec2.prices]`), spot prices asked of EC2.

use std::collections::BTreeMap;

use serde::Deserialize;

const TABLE: &str = include_str!("../../../data/ec2-prices.toml");

#[derive(Debug, Deserialize)]
struct Table {
    as_of: String,
    region: String,
    prices: BTreeMap<String, f64>,
}

/// An on-demand price and where it comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct OnDemand {
    pub per_hour: f64,
    /// `config` or `us-east-1 list price, 2025-06-05`.
    pub source: String,
}

fn table() -> Table {
    toml::from_str(TABLE).expect("the built-in price table parses (checked by a test)")
}

/// The on-demand $/hour of `kind`: `[ec2.prices]` first, then the built-in table.
pub fn on_demand(kind: &str, overrides: &BTreeMap<String, f64>) -> Option<OnDemand> {
    if let Some(&per_hour) = overrides.get(kind) {
        return Some(OnDemand {
            per_hour,
            source: "[ec2.prices]".into(),
        });
    }
    let table = table();
    table.prices.get(kind).map(|&per_hour| OnDemand {
        per_hour,
        source: format!("{} list price of {}", table.region, table.as_of),
    })
}

/// Dollars, to the cent (to a tenth of a cent below a dollar an hour).
pub fn dollars(amount: f64) -> String {
    if amount < 1.0 {
        format!("${amount:.3}")
    } else {
        format!("${amount:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_parses_and_overrides_win() {
        let table = table();
        assert!(table.prices.len() > 20);
        assert!(table.prices.values().all(|p| p.is_finite() && *p > 0.0));
        let none = BTreeMap::new();
        let g5 = on_demand("g5.xlarge", &none).expect("g5.xlarge is in the table");
        assert!(g5.source.contains("us-east-1"), "{}", g5.source);
        let mut mine = BTreeMap::new();
        mine.insert("g5.xlarge".to_owned(), 0.9);
        assert_eq!(on_demand("g5.xlarge", &mine).map(|p| p.per_hour), Some(0.9));
        assert_eq!(on_demand("x9.nothing", &none), None);
        assert_eq!(dollars(0.526), "$0.526");
        assert_eq!(dollars(16.288), "$16.29");
    }
}
