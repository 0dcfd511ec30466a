//! EC2's launch and reconcile decisions, as pure functions of the options, the
//! configuration and what EC2 answered (`launch` and `daemon::instances` read the facts
//! and carry these out): what a launch may ask for, the instance limit, the spot price
//! against the maximum, the price paid, and what EC2's listing means for each record.

use protocol::InstanceName;

use super::{CloudInstance, Ec2Launch, ids, prices};
use crate::error::{ErrorCode, UserError};

/// How long a new instance may be missing from DescribeInstances (EC2's reads are
/// eventually consistent) before its absence means it is gone.
pub const CONSISTENCY_MS: u64 = 300_000;

/// The options' own checks, made before EC2 is asked anything.
pub fn check_options(opts: &Ec2Launch) -> Result<(), UserError> {
    let bad = |message: String| UserError::new(ErrorCode::BadInput, message);
    ids::check_instance_type(&opts.instance_type).map_err(bad)?;
    if let Some(snapshot) = &opts.volume_snapshot {
        ids::check_id(snapshot, "snap").map_err(bad)?;
    }
    if let Some(gb) = opts.volume_gb
        && !(1..=16384).contains(&gb)
    {
        return Err(bad(format!(
            "--volume-size {gb}: a volume is 1 to 16384 GiB"
        )));
    }
    if let Some(price) = opts.max_price
        && !(price.is_finite() && price > 0.0)
    {
        return Err(bad(format!("--max-price {price} is not a positive price")));
    }
    Ok(())
}

/// Refused when `running` runctl instances already reach `[ec2] max_running`.
pub fn check_limit(running: usize, max_running: u32, region: &str) -> Result<(), UserError> {
    if running < max_running as usize {
        return Ok(());
    }
    Err(UserError::new(
        ErrorCode::Conflict,
        format!("{running} runctl instances are running in {region}, the limit is {max_running}"),
    )
    .resolve("terminate one you no longer need: runctl-controller list, then runctl-controller terminate NAME")
    .resolve("or raise max_running under [ec2] in config.toml"))
}

/// The type to try after `tried` (the index in `types`) failed with `code`: the next one,
/// where the failure was a shortage another type may make up for (`ErrorCode::Capacity`);
/// none after the last, or after any other failure (bad input, credentials, a limit of
/// runctl's own), which another type would meet again.
pub fn next_type(types: &[String], tried: usize, code: ErrorCode) -> Option<&str> {
    match code {
        ErrorCode::Capacity => types.get(tried + 1).map(String::as_str),
        ErrorCode::Internal
        | ErrorCode::BadInput
        | ErrorCode::NotFound
        | ErrorCode::Conflict
        | ErrorCode::DaemonUnavailable
        | ErrorCode::Agent => None,
    }
}

/// The zone to try after a launch of one instance failed with `code`, when the zone is
/// not pinned (no `[ec2] subnet`, not a gang's node): the first zone offering the type
/// (`offered`) not yet `tried`, where the failure was a shortage another zone may not
/// have (`ErrorCode::Capacity`); none otherwise. The first try is EC2's own choice of
/// zone, which is not known, so one zone may be tried twice.
pub fn next_zone<'a>(
    offered: &'a [String],
    tried: &[String],
    code: ErrorCode,
    pinned: bool,
) -> Option<&'a str> {
    if pinned || code != ErrorCode::Capacity {
        return None;
    }
    offered
        .iter()
        .find(|z| !tried.contains(z))
        .map(String::as_str)
}

/// The zone of `region` a shortage happened in, where EC2's message names it: EC2 writes
/// the zone asked for (or picked) in parentheses ("...in the Availability Zone you
/// requested (us-east-1a)..."), then the zones to try instead, without.
pub fn failed_zone(message: &str, region: &str) -> Option<String> {
    let open = format!("({region}");
    let start = message.find(&open)? + 1;
    let zone = &message[start..start + message[start..].find(')')?];
    zone.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        .then(|| zone.to_owned())
}

/// What a gang of `nodes` instances costs, all together, at `each` $/h where known.
pub fn gang_cost(nodes: u32, each: Option<f64>) -> String {
    match each {
        Some(each) => format!(
            "cost: {nodes} x {}/h = {}/h for the gang",
            prices::dollars(each),
            prices::dollars(each * f64::from(nodes))
        ),
        None => {
            format!("cost: {nodes} instances, price per hour unknown (add it under [ec2.prices])")
        }
    }
}

/// What a spot launch does at today's price: `spot_now` (price and zone, when EC2 has a
/// history) against `max` (`--max-price`, else the on-demand price). Above the maximum it
/// is refused unless `fallback` allows on-demand; otherwise the line to tell the user.
pub fn spot_price(
    kind: &str,
    spot_now: Option<(f64, &str)>,
    max: Option<f64>,
    fallback: bool,
) -> Result<String, UserError> {
    match (spot_now, max) {
        (Some((now, zone)), Some(max)) if now > max && !fallback => Err(UserError::new(
            ErrorCode::Capacity,
            format!(
                "the spot price of {kind} is {}/h ({zone}), above the maximum {}/h",
                prices::dollars(now),
                prices::dollars(max)
            ),
        )
        .resolve(
            "raise it with --max-price, launch on-demand (without --spot), or allow --spot-fallback",
        )),
        (Some((now, zone)), max) => Ok(format!(
            "spot now {}/h in {zone}; maximum {}",
            prices::dollars(now),
            max.map_or("the on-demand price".into(), |m| format!(
                "{}/h",
                prices::dollars(m)
            ))
        )),
        (None, _) => Ok("no spot price history for this type here".into()),
    }
}

/// The price recorded for billing: for spot, the price at launch (else the maximum paid);
/// for on-demand (also a spot launch that fell back), the on-demand price.
pub fn price_paid(
    launched_spot: bool,
    spot_now: Option<f64>,
    max: Option<f64>,
    on_demand: Option<f64>,
) -> Option<f64> {
    if launched_spot {
        spot_now.or(max)
    } else {
        on_demand
    }
}

/// A live record as the daemon holds it: its name, EC2 id and when it was made.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub name: &'a InstanceName,
    pub cloud_id: &'a str,
    pub created_ms: u64,
}

/// What EC2's listing says happened to a live record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Terminated (or terminating): by spot reclaim, power-off from inside, the console.
    Terminated,
    /// Stopped (or stopping) outside runctl.
    Stopped,
}

/// Reconciles live records with EC2's listing at `now`: the records EC2 says are gone or
/// stopped, and the listed runctl instances (not terminated) that no record names. A
/// record missing from the listing is gone unless it is younger than EC2's consistency
/// window; one listed as pending or running is left as it is.
pub fn reconcile<'a>(
    live: &[Record<'a>],
    known_ids: &[&str],
    listed: &'a [CloudInstance],
    now_ms: u64,
) -> (Vec<(&'a InstanceName, Observed)>, Vec<&'a CloudInstance>) {
    let mut changes = Vec::new();
    for record in live {
        let state = match listed.iter().find(|c| c.id == record.cloud_id) {
            Some(c) => c.state.as_str(),
            // Not listed yet, or long gone (EC2 forgets terminated instances after a while).
            None if now_ms.saturating_sub(record.created_ms) < CONSISTENCY_MS => continue,
            None => "terminated",
        };
        match state {
            "terminated" | "shutting-down" => changes.push((record.name, Observed::Terminated)),
            "stopped" | "stopping" => changes.push((record.name, Observed::Stopped)),
            _ => {}
        }
    }
    let foreign = listed
        .iter()
        .filter(|c| c.state != "terminated" && !known_ids.contains(&c.id.as_str()))
        .collect();
    (changes, foreign)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Ec2Launch {
        Ec2Launch {
            instance_type: "g5.xlarge".into(),
            other_types: vec![],
            ami: None,
            spot: false,
            max_price: None,
            spot_fallback: false,
            instance_profile: None,
            volume_gb: None,
            volume_snapshot: None,
            keep_volume: false,
            project: None,
            gang: None,
        }
    }

    /// Options changed by `edit` -> accepted, or refused with `refused` in the message.
    fn check_opts(edit: impl Fn(&mut Ec2Launch), expected: Result<(), &str>) {
        let mut o = opts();
        edit(&mut o);
        match (check_options(&o), expected) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(refused)) => assert!(e.message.contains(refused), "{o:?}: {}", e.message),
            (got, expected) => panic!("{o:?}: {got:?}, not {expected:?}"),
        }
    }

    #[test]
    fn launch_options_are_checked_before_ec2_is_asked() {
        check_opts(|_| {}, Ok(()));
        check_opts(|o| o.volume_gb = Some(1), Ok(()));
        check_opts(|o| o.volume_gb = Some(16384), Ok(()));
        check_opts(|o| o.volume_gb = Some(0), Err("1 to 16384 GiB"));
        check_opts(|o| o.volume_gb = Some(16385), Err("1 to 16384 GiB"));
        check_opts(|o| o.max_price = Some(0.5), Ok(()));
        check_opts(|o| o.max_price = Some(0.0), Err("not a positive price"));
        check_opts(|o| o.max_price = Some(-1.0), Err("not a positive price"));
        check_opts(
            |o| o.max_price = Some(f64::NAN),
            Err("not a positive price"),
        );
        check_opts(
            |o| o.max_price = Some(f64::INFINITY),
            Err("not a positive price"),
        );
        check_opts(
            |o| o.volume_snapshot = Some("snap-0123456789abcdef0".into()),
            Ok(()),
        );
        check_opts(
            |o| o.volume_snapshot = Some("vol-0123456789abcdef0".into()),
            Err("snap-"),
        );
        check_opts(
            |o| o.instance_type = "g5.xlarge; rm".into(),
            Err("instance type"),
        );
    }

    #[test]
    fn the_instance_limit_counts_runctl_instances_in_the_region() {
        let check = |running, max, ok: bool| {
            assert_eq!(
                check_limit(running, max, "us-east-1").is_ok(),
                ok,
                "{running} of {max}"
            );
        };
        check(0, 1, true);
        check(3, 4, true);
        check(4, 4, false);
        check(9, 4, false);
        check(0, 0, false);
    }

    /// (spot now, max, fallback) -> the line told, or a refusal.
    fn check_spot(
        now: Option<(f64, &str)>,
        max: Option<f64>,
        fallback: bool,
        expected: Result<&str, &str>,
    ) {
        match (spot_price("g5.xlarge", now, max, fallback), expected) {
            (Ok(line), Ok(want)) => assert!(line.contains(want), "{line}"),
            (Err(e), Err(want)) => assert!(e.message.contains(want), "{}", e.message),
            (got, expected) => panic!("{now:?} {max:?} {fallback}: {got:?}, not {expected:?}"),
        }
    }

    #[test]
    fn spot_above_the_maximum_is_refused_unless_on_demand_may_stand_in() {
        check_spot(
            Some((0.30, "us-east-1a")),
            Some(1.0),
            false,
            Ok("spot now $0.300/h in us-east-1a; maximum $1.00/h"),
        );
        check_spot(
            Some((0.30, "us-east-1a")),
            None,
            false,
            Ok("maximum the on-demand price"),
        );
        check_spot(
            Some((1.20, "us-east-1a")),
            Some(1.0),
            false,
            Err("above the maximum"),
        );
        check_spot(Some((1.20, "us-east-1a")), Some(1.0), true, Ok("spot now"));
        check_spot(Some((1.0, "us-east-1a")), Some(1.0), false, Ok("spot now"));
        check_spot(None, Some(1.0), false, Ok("no spot price history"));
    }

    #[test]
    fn the_price_paid_is_the_spot_price_at_launch_or_on_demand() {
        assert_eq!(price_paid(true, Some(0.3), Some(1.0), Some(1.0)), Some(0.3));
        assert_eq!(price_paid(true, None, Some(0.8), Some(1.0)), Some(0.8));
        assert_eq!(price_paid(true, None, None, Some(1.0)), None);
        assert_eq!(
            price_paid(false, Some(0.3), Some(0.8), Some(1.0)),
            Some(1.0)
        );
        assert_eq!(price_paid(false, None, None, None), None);
    }

    #[test]
    fn another_type_is_tried_only_for_a_shortage() {
        let types: Vec<String> = ["p5.48xlarge", "g6e.xlarge", "g5.xlarge"]
            .map(String::from)
            .to_vec();
        let cases: &[(usize, ErrorCode, Option<&str>)] = &[
            (0, ErrorCode::Capacity, Some("g6e.xlarge")),
            (1, ErrorCode::Capacity, Some("g5.xlarge")),
            (2, ErrorCode::Capacity, None),
            (0, ErrorCode::BadInput, None),
            (0, ErrorCode::Conflict, None),
            (0, ErrorCode::Agent, None),
            (0, ErrorCode::Internal, None),
        ];
        for (tried, code, want) in cases {
            assert_eq!(next_type(&types, *tried, *code), *want, "{tried} {code:?}");
        }
        assert_eq!(next_type(&types[..1], 0, ErrorCode::Capacity), None);
    }

    #[test]
    fn a_shortage_in_one_zone_tries_the_next_zone_that_offers_the_type() {
        let offered: Vec<String> = ["us-east-1a", "us-east-1b"].map(String::from).to_vec();
        let tried = |zones: &[&str]| zones.iter().map(|z| z.to_string()).collect::<Vec<_>>();
        // (tried, code, pinned) -> the next zone
        let cases: &[(&[&str], ErrorCode, bool, Option<&str>)] = &[
            (&[], ErrorCode::Capacity, false, Some("us-east-1a")),
            (
                &["us-east-1a"],
                ErrorCode::Capacity,
                false,
                Some("us-east-1b"),
            ),
            (
                &["us-east-1a", "us-east-1b"],
                ErrorCode::Capacity,
                false,
                None,
            ),
            (&[], ErrorCode::Capacity, true, None),
            (&[], ErrorCode::BadInput, false, None),
            (&[], ErrorCode::Conflict, false, None),
        ];
        for (done, code, pinned, want) in cases {
            assert_eq!(
                next_zone(&offered, &tried(done), *code, *pinned),
                *want,
                "{done:?} {code:?} {pinned}"
            );
        }
        assert_eq!(next_zone(&[], &[], ErrorCode::Capacity, false), None);
        // Where EC2 says which zone was short.
        let said: &[(&str, Option<&str>)] = &[
            (
                "We currently do not have sufficient g5.xlarge capacity in the Availability Zone you requested (us-east-1b). You can currently get g5.xlarge capacity by not specifying an Availability Zone in your request or choosing us-east-1a.",
                Some("us-east-1b"),
            ),
            (
                "Your requested instance type (g5.xlarge) is not supported in your requested Availability Zone (us-east-1a). Please retry your request by not specifying an Availability Zone or choosing us-east-1b.",
                Some("us-east-1a"),
            ),
            ("Insufficient capacity.", None),
            ("Insufficient capacity (us-east-1a; try later).", None),
        ];
        for (message, want) in said {
            assert_eq!(
                failed_zone(message, "us-east-1").as_deref(),
                *want,
                "{message}"
            );
        }
    }

    #[test]
    fn a_gang_costs_its_nodes_together() {
        assert_eq!(
            gang_cost(2, Some(1.006)),
            "cost: 2 x $1.01/h = $2.01/h for the gang"
        );
        assert_eq!(
            gang_cost(3, None),
            "cost: 3 instances, price per hour unknown (add it under [ec2.prices])"
        );
    }

    fn listed(id: &str, state: &str) -> CloudInstance {
        CloudInstance {
            id: id.into(),
            name: None,
            state: state.into(),
            instance_type: "g5.xlarge".into(),
            spot: false,
            launched_ms: 0,
            zone: "us-east-1a".into(),
            reason: None,
            private_ip: None,
        }
    }

    /// A record made at `created_ms`, against `listing` at `now` -> what is observed.
    fn check_reconcile(
        created_ms: u64,
        listing: &[CloudInstance],
        now: u64,
        expected: Option<Observed>,
    ) {
        let name: InstanceName = "ec2-abcdef".parse().expect("name");
        let live = [Record {
            name: &name,
            cloud_id: "i-1",
            created_ms,
        }];
        let (changes, _) = reconcile(&live, &["i-1"], listing, now);
        assert_eq!(
            changes.first().map(|c| c.1),
            expected,
            "{listing:?} at {now}"
        );
    }

    #[test]
    fn ec2s_listing_moves_records_to_what_it_reports() {
        let old = 1_000_000;
        let now = old + CONSISTENCY_MS;
        check_reconcile(old, &[listed("i-1", "running")], now, None);
        check_reconcile(old, &[listed("i-1", "pending")], now, None);
        check_reconcile(
            old,
            &[listed("i-1", "shutting-down")],
            now,
            Some(Observed::Terminated),
        );
        check_reconcile(
            old,
            &[listed("i-1", "terminated")],
            now,
            Some(Observed::Terminated),
        );
        check_reconcile(
            old,
            &[listed("i-1", "stopping")],
            now,
            Some(Observed::Stopped),
        );
        check_reconcile(
            old,
            &[listed("i-1", "stopped")],
            now,
            Some(Observed::Stopped),
        );
        // Missing: gone once older than EC2's consistency window, pending before.
        check_reconcile(
            old,
            &[listed("i-2", "running")],
            now,
            Some(Observed::Terminated),
        );
        check_reconcile(old, &[], now - 1, None);
        check_reconcile(old, &[], now, Some(Observed::Terminated));
    }

    #[test]
    fn instances_no_record_names_are_foreign_unless_terminated() {
        let listing = [
            listed("i-1", "running"),
            listed("i-2", "running"),
            listed("i-3", "terminated"),
            listed("i-4", "stopped"),
        ];
        let (_, foreign) = reconcile(&[], &["i-1"], &listing, 0);
        let ids: Vec<&str> = foreign.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["i-2", "i-4"]);
    }
}
