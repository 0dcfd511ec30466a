//! The daemon's provider-neutral decisions about a launch and a run, as pure functions of
//! the request, the configuration and the facts read for them: how agents reach this
//! daemon, what happens to the instance when a run ends, and which object store a run's
//! instance is told about. The drivers (`daemon::instances`, `daemon::requests`) read the
//! facts, call these, and carry the answer out; they decide nothing themselves.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use protocol::budget::Budget;
use protocol::{EndAction, StoreSpec};

use crate::db::RunBudget;
use crate::error::{ErrorCode, UserError};
use crate::provider::Capabilities;

/// What to tell the user about a connected agent that speaks protocol `agent` to a
/// controller that speaks `ours` (the two are at most one apart, or the agent would not be
/// connected): nothing when it is as new; when it is older, that its runs go on, what it
/// cannot do, and how to upgrade it.
pub fn agent_upgrade(agent: u16, ours: u16, software: &str) -> Option<String> {
    (agent < ours).then(|| {
        format!(
            "{software} speaks protocol {agent}, this controller {ours}: its runs and logs go on, but what came since is refused for it; upgrade it (a new instance installs the matching runctl-agent)"
        )
    })
}

/// What the daemon does at start with an instance a previous daemon was launching when
/// it died (its record still says launching).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterruptedLaunch {
    /// Wait out the rest of its enrollment window, as the launch would have; an instance
    /// whose agent does not come is terminated then.
    Watch,
    /// Terminate it now, for the reason given.
    Terminate(String),
    /// The provider may have made it, but no record says which: find it by its name tag
    /// and terminate it.
    FindAndTerminate(String),
    /// Nothing: it is a stopped instance started again (its agent has enrolled before and
    /// comes back, or the user acts), or its run's own machinery (a relaunch, a gang
    /// restart) owns it.
    Leave,
}

/// Whom an instance was launched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchedFor {
    /// The user (`launch`, `run --keep`): the instance is theirs.
    User,
    /// A run that has never started (`run` starts it once the instance is up).
    UnstartedRun,
    /// A run that has started before (a spot relaunch's replacement, a gang's node).
    Run,
}

/// The choice for an interrupted launch of a `remote` instance (`recorded`: its cloud
/// record was written; `enrolled`: an agent of it has enrolled before, so this is a start
/// after a stop), launched `for` whom.
pub fn interrupted_launch(
    remote: bool,
    recorded: bool,
    enrolled: bool,
    launched_for: LaunchedFor,
) -> InterruptedLaunch {
    let why = "the daemon stopped while launching it";
    if enrolled {
        return InterruptedLaunch::Leave;
    }
    if remote && !recorded {
        return InterruptedLaunch::FindAndTerminate(format!(
            "{why}, before it recorded the provider's id"
        ));
    }
    match launched_for {
        LaunchedFor::UnstartedRun => InterruptedLaunch::Terminate(format!(
            "{why} for a run that never started (run it again)"
        )),
        LaunchedFor::User => InterruptedLaunch::Watch,
        LaunchedFor::Run => InterruptedLaunch::Leave,
    }
}

/// How agents of a remote instance reach this daemon: directly at `direct` (UDP and TCP),
/// through the relay at `relay`, or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    pub direct: Option<String>,
    pub relay: Option<String>,
}

/// How a remote instance's agent reaches the daemon listening on `listen`, from the
/// provider's `controller_endpoint` (named in errors as `[section] controller_endpoint`)
/// and `[daemon] relay`. Refused when neither would work, with what to set.
pub fn remote_reach(
    section: &str,
    endpoint: Option<&str>,
    relay: Option<&str>,
    listen: SocketAddr,
) -> Result<Reach, UserError> {
    let relay = relay.map(str::to_owned);
    let Some(endpoint) = endpoint else {
        if relay.is_some() {
            // With a relay the daemon needs no address of its own that instances can reach.
            return Ok(Reach {
                direct: None,
                relay,
            });
        }
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("[{section}] controller_endpoint is not set: instances need an address of this daemon they can reach"),
        )
        .resolve(format!(
            "set controller_endpoint = \"HOST:{}\" under [{section}] in config.toml (a public address, a forwarded port, a VPN address)",
            listen.port()
        ))
        .resolve("or set relay = \"HOST:PORT\" under [daemon] to reach instances through a runctl-relay (see the README's reachability section)"));
    };
    let (host, _) = endpoint.rsplit_once(':').unwrap_or((endpoint, ""));
    // An IPv6 address is bracketed before its port: `[::1]:7000`.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let loopback_endpoint =
        host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if listen.ip().is_loopback() && !loopback_endpoint {
        if relay.is_some() {
            // Unreachable directly, but the relay serves: agents are not told the direct way.
            return Ok(Reach {
                direct: None,
                relay,
            });
        }
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("the daemon listens on {listen} only, which instances cannot reach through {endpoint}"),
        )
        .resolve(format!(
            "set listen = \"0.0.0.0:{}\" under [daemon] in config.toml and restart it (runctl-controller shutdown)",
            listen.port()
        ))
        .resolve("or set relay = \"HOST:PORT\" under [daemon] to reach instances through a runctl-relay"));
    }
    Ok(Reach {
        direct: Some(endpoint.to_owned()),
        relay,
    })
}

/// How an agent on this machine reaches the daemon listening on `listen`: its own port
/// (on loopback when it listens on all addresses), and the relay when one is configured.
pub fn local_reach(listen: SocketAddr, relay: Option<&str>) -> Reach {
    let mut direct = listen;
    if direct.ip().is_unspecified() {
        direct.set_ip(Ipv4Addr::LOCALHOST.into());
    }
    Reach {
        direct: Some(direct.to_string()),
        relay: relay.map(str::to_owned),
    }
}

/// The name a terminated instance's record moves to when its name is used again: the
/// name (cut to fit) and when it was created, in hex seconds, plus `-N` past any `taken`.
pub fn retired_name(
    name: &protocol::InstanceName,
    created_ms: u64,
    taken: impl Fn(&str) -> bool,
) -> protocol::InstanceName {
    let stamp = format!("-t{:x}", created_ms / 1000);
    (0u32..)
        .map(|n| {
            let suffix = if n == 0 {
                stamp.clone()
            } else {
                format!("{stamp}-{n}")
            };
            let keep = 40usize
                .saturating_sub(suffix.len())
                .min(name.as_str().len());
            format!("{}{suffix}", name.as_str()[..keep].trim_end_matches('-'))
        })
        .find(|candidate| !taken(candidate))
        .expect("some suffix is free")
        .parse()
        .expect("a stem of a valid name, a dash, hex digits")
}

/// What ends a run's instance: the action in the agent's run spec, and whether the
/// daemon stops the instance through the provider's API once it hears of the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndPlan {
    pub agent: EndAction,
    pub daemon_stops: bool,
    /// The instance is stopped by its own agent and stays, even if launched for the run
    /// (a pod with `--end stop`).
    pub outlives_run: bool,
}

/// A run's budget as of `now_ms`, to hand to its agent or show: its caps, its instance's
/// price, and what it has spent since its spend began (the agent counts on from there).
pub fn budget(caps: &RunBudget, price_per_hour: Option<f64>, now_ms: u64) -> Budget {
    Budget::new(caps.max_cost, caps.max_ms, price_per_hour)
        .later(now_ms.saturating_sub(caps.since_ms))
}

/// Why a run that never reported its end is over with its terminated instance. A capped
/// run whose cap fell before `now_ms` was stopped by its agent then, as far as the daemon
/// can know (its last events went with the instance): the message says when, and where
/// its checkpoints are.
pub fn gone_with_instance(
    run: &str,
    caps: Option<&RunBudget>,
    price_per_hour: Option<f64>,
    now_ms: u64,
) -> String {
    let gone = "its instance was terminated";
    let Some(caps) = caps else {
        return gone.to_owned();
    };
    let start = budget(caps, price_per_hour, caps.since_ms);
    let Some(left) = start.left_ms(0) else {
        return gone.to_owned();
    };
    let at_ms = caps.since_ms.saturating_add(left);
    let spend = start.spend(left);
    match start.reached(&spend) {
        Some(limit) if at_ms <= now_ms => {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms);
            format!(
                "{gone}; it reached {} at {}, when its agent stops the run and pushes its checkpoints (see: runctl-controller checkpoint list {run})",
                limit.describe(&spend),
                humantime::format_rfc3339_seconds(at)
            )
        }
        _ => gone.to_owned(),
    }
}

/// The instance's fate at the end of a run: `requested` (`--end`), else terminate an
/// instance launched for this run (`launched` without `--keep`) and keep any other. A
/// spot instance cannot be stopped. Where the provider stops and starts instances
/// (`caps.stop_start`) but an agent cannot stop its own (EC2: powered off from inside, an
/// instance terminates, its shutdown behaviour), a stop is the daemon's to do through the
/// API; elsewhere the agent stops its instance (a pod, with its own key) or powers off.
pub fn run_end(
    requested: Option<EndAction>,
    launched: bool,
    keep: bool,
    spot: bool,
    caps: Capabilities,
) -> Result<EndPlan, UserError> {
    let end = requested.unwrap_or(if launched && !keep {
        EndAction::Terminate
    } else {
        EndAction::Keep
    });
    match end {
        EndAction::Stop if spot => Err(UserError::new(
            ErrorCode::BadInput,
            "--end stop: a spot instance cannot be stopped, only terminated",
        )
        .resolve("use --end terminate or --end keep")),
        EndAction::Stop if caps.stop_start && !caps.stops_itself => Ok(EndPlan {
            agent: EndAction::Keep,
            daemon_stops: true,
            outlives_run: false,
        }),
        EndAction::Keep | EndAction::Stop | EndAction::Terminate => Ok(EndPlan {
            agent: end,
            daemon_stops: false,
            outlives_run: end == EndAction::Stop && caps.stops_itself,
        }),
    }
}

/// Where an instance's agent gets its object-store credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreAccess {
    /// Its host's own (an instance profile; this machine's environment for a local one).
    Own,
    /// Handed over the channel by the daemon, from the configured role or profile.
    Handed,
    /// It has none of its own and none are configured to hand over.
    Nothing,
}

/// The object store a run's agent is told about: none unless the run pulls data, pushes
/// checkpoints or resumes (`needs_store`). A remote instance cannot reach a local store,
/// and uses its own credentials (its instance profile) or handed ones, never this
/// laptop's named profile.
pub fn run_store(
    configured: StoreSpec,
    needs_store: bool,
    remote: bool,
    access: StoreAccess,
) -> Result<Option<StoreSpec>, UserError> {
    if !needs_store {
        return Ok(None);
    }
    if access == StoreAccess::Nothing && matches!(configured, StoreSpec::S3 { .. }) {
        return Err(UserError::new(
            ErrorCode::BadInput,
            "a pod has no credentials of its own for the object store, which this run's data or checkpoints need, and none are configured to hand it",
        )
        .resolve("set store_role_arn = \"arn:aws:iam::ACCOUNT:role/ROLE\" under [runpod]: the daemon assumes it and hands the pod short-lived credentials limited to the run's prefixes, renewed over the channel")
        .resolve("or store_profile = \"NAME\" under [runpod]: that profile's credentials are handed over as they are")
        .resolve("or run without the store: --no-checkpoints and no --data"));
    }
    match configured {
        StoreSpec::Local { .. } if remote => Err(UserError::new(
            ErrorCode::BadInput,
            "a cloud instance cannot reach the local object store ([storage] backend = \"local\"), which this run's data or checkpoints need",
        )
        .resolve("set backend = \"s3\" under [storage] (and checkpoints = \"s3://BUCKET/PREFIX\")")
        .resolve("or run without them: --no-checkpoints and no --data")),
        StoreSpec::S3 {
            region,
            endpoint_url,
            force_path_style,
            profile: _,
        } if remote => Ok(Some(StoreSpec::S3 {
            region,
            endpoint_url,
            force_path_style,
            profile: None,
        })),
        spec @ (StoreSpec::Local { .. } | StoreSpec::S3 { .. }) => Ok(Some(spec)),
    }
}

/// Whether `stop` (`start` false) or `start` may go ahead on `name`, `an_instance` of a
/// provider that can (`stop_start`) or cannot stop and start instances.
pub fn power(
    name: &str,
    an_instance: &str,
    stop_start: bool,
    spot: bool,
    stopped: bool,
    start: bool,
) -> Result<(), UserError> {
    if !stop_start {
        return Err(UserError::new(
            ErrorCode::Conflict,
            format!("{name} is {an_instance}, not a cloud instance that can be stopped: stop and start apply to EC2 instances"),
        )
        .resolve(format!("terminate it instead: runctl-controller terminate {name}")));
    }
    if spot {
        return Err(UserError::new(
            ErrorCode::Conflict,
            format!("{name} is a spot instance: it can only be terminated, not stopped"),
        )
        .resolve(format!("terminate it: runctl-controller terminate {name}")));
    }
    match (start, stopped) {
        (true, false) => Err(UserError::new(
            ErrorCode::Conflict,
            format!("{name} is not stopped"),
        )),
        (false, true) => Err(UserError::new(
            ErrorCode::Conflict,
            format!("{name} is already stopped"),
        )
        .resolve(format!("start it: runctl-controller start {name}"))),
        (true, true) | (false, false) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_run_gone_with_its_instance_after_its_cap_says_when_the_cap_fell() {
        use super::{RunBudget, gone_with_instance};
        let hour = 3_600_000;
        let caps = |max_cost, max_ms| RunBudget {
            max_cost,
            max_ms,
            since_ms: 1_000,
        };
        let gone = "its instance was terminated";
        let capped = |at: &str, what: &str| {
            format!(
                "{gone}; it reached {what} at {at}, when its agent stops the run and pushes its checkpoints (see: runctl-controller checkpoint list run-1)"
            )
        };
        // (caps, price $/h, now, message)
        let cases = [
            (None, Some(2.0), 10 * hour, gone.to_owned()),
            (
                Some(caps(Some(4.0), None)),
                Some(2.0),
                hour,
                gone.to_owned(),
            ),
            (
                Some(caps(Some(4.0), None)),
                Some(2.0),
                3 * hour,
                capped(
                    "1970-01-01T02:00:01Z",
                    "the $4.00 cost cap ($4.00 spent in 2h)",
                ),
            ),
            // The time cap falls first; the cost cap cannot without a price.
            (
                Some(caps(Some(100.0), Some(hour))),
                Some(2.0),
                3 * hour,
                capped(
                    "1970-01-01T01:00:01Z",
                    "the 1h time cap ($2.00 spent in 1h)",
                ),
            ),
            (
                Some(caps(Some(4.0), None)),
                None,
                30 * hour,
                gone.to_owned(),
            ),
        ];
        for (caps, price, now, message) in cases {
            assert_eq!(
                gone_with_instance("run-1", caps.as_ref(), price, now),
                message,
                "{caps:?} {price:?} {now}"
            );
        }
    }

    #[test]
    fn a_budget_counts_from_when_its_spend_began() {
        use super::{RunBudget, budget};
        let hour = 3_600_000;
        let caps = RunBudget {
            max_cost: Some(5.0),
            max_ms: Some(2 * hour),
            since_ms: 1_000,
        };
        // (price $/h, now, spent micros, elapsed ms, left ms)
        let cases = [
            (Some(2.0), 1_000, 0, 0, Some(2 * hour)),
            (Some(2.0), 1_000 + hour, 2_000_000, hour, Some(hour)),
            (Some(4.0), 1_000 + hour, 4_000_000, hour, Some(hour / 4)),
            (Some(6.0), 1_000 + hour, 6_000_000, hour, Some(0)),
            (None, 1_000 + hour, 0, hour, Some(hour)),
            // A clock behind the start counts nothing rather than going negative.
            (Some(2.0), 0, 0, 0, Some(2 * hour)),
        ];
        for (price, now, spent, elapsed, left) in cases {
            let b = budget(&caps, price, now);
            assert_eq!(
                (b.spent_micros, b.elapsed_ms, b.left_ms(0)),
                (spent, elapsed, left),
                "{price:?} at {now}"
            );
        }
    }

    #[test]
    fn retired_names_are_valid_and_free() {
        let name = |s: &str| s.parse::<protocol::InstanceName>().expect("name");
        let long = "a".repeat(40);
        // (name, created ms, taken, retired)
        let cases = [
            ("gpu-1", 1_700_000_000_000, vec![], "gpu-1-t6553f100"),
            (
                "gpu-1",
                1_700_000_000_000,
                vec!["gpu-1-t6553f100"],
                "gpu-1-t6553f100-1",
            ),
            (
                long.as_str(),
                0,
                vec![],
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-t0",
            ),
            (
                "ab-cdefghijklmnopqrstuvwxyz-abcdefghij",
                0,
                vec![],
                "ab-cdefghijklmnopqrstuvwxyz-abcdefghi-t0",
            ),
        ];
        for (from, created, taken, want) in cases {
            let got = super::retired_name(&name(from), created, |c| taken.contains(&c));
            assert_eq!(got.as_str(), want, "{from}");
            assert!(got.as_str().len() <= 40);
        }
    }

    use super::*;
    use crate::provider::ProviderKind;
    use EndAction::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    /// (endpoint, relay, listen) -> the reach, or a refusal containing `refused`.
    fn check_reach(
        endpoint: Option<&str>,
        relay: Option<&str>,
        listen: &str,
        expected: Result<(Option<&str>, Option<&str>), &str>,
    ) {
        let got = remote_reach("ec2", endpoint, relay, addr(listen));
        match (got, expected) {
            (Ok(reach), Ok((direct, relay))) => {
                assert_eq!(reach.direct.as_deref(), direct, "{endpoint:?} {listen}");
                assert_eq!(reach.relay.as_deref(), relay, "{endpoint:?} {listen}");
            }
            (Err(e), Err(refused)) => assert!(e.message.contains(refused), "{}", e.message),
            (got, expected) => panic!("{endpoint:?} {relay:?} {listen}: {got:?}, not {expected:?}"),
        }
    }

    #[test]
    fn remote_agents_reach_the_daemon_directly_or_through_the_relay() {
        let r = Some("relay.example:4433");
        check_reach(
            Some("1.2.3.4:7000"),
            None,
            "0.0.0.0:7000",
            Ok((Some("1.2.3.4:7000"), None)),
        );
        check_reach(
            Some("1.2.3.4:7000"),
            r,
            "0.0.0.0:7000",
            Ok((Some("1.2.3.4:7000"), r)),
        );
        check_reach(None, r, "127.0.0.1:7000", Ok((None, r)));
        check_reach(
            None,
            None,
            "0.0.0.0:7000",
            Err("controller_endpoint is not set"),
        );
        // Listening on loopback: only a loopback endpoint works directly.
        check_reach(
            Some("127.0.0.1:7000"),
            None,
            "127.0.0.1:7000",
            Ok((Some("127.0.0.1:7000"), None)),
        );
        check_reach(
            Some("localhost:7000"),
            None,
            "127.0.0.1:7000",
            Ok((Some("localhost:7000"), None)),
        );
        check_reach(
            Some("1.2.3.4:7000"),
            None,
            "127.0.0.1:7000",
            Err("listens on 127.0.0.1:7000 only"),
        );
        check_reach(Some("1.2.3.4:7000"), r, "127.0.0.1:7000", Ok((None, r)));
        check_reach(
            Some("[::1]:7000"),
            None,
            "[::1]:7000",
            Ok((Some("[::1]:7000"), None)),
        );
    }

    #[test]
    fn local_agents_dial_loopback_when_the_daemon_listens_on_all() {
        let check = |listen: &str, relay: Option<&str>, direct: &str| {
            let reach = local_reach(addr(listen), relay);
            assert_eq!(reach.direct.as_deref(), Some(direct), "{listen}");
            assert_eq!(reach.relay.as_deref(), relay, "{listen}");
        };
        check("0.0.0.0:7000", None, "127.0.0.1:7000");
        check("127.0.0.1:7000", Some("r:1"), "127.0.0.1:7000");
        check("10.0.0.5:7000", None, "10.0.0.5:7000");
    }

    /// (requested, launched, keep, spot, stop_start) -> the agent's action and whether
    /// the daemon stops the instance, or a refusal.
    fn check_end(
        requested: Option<EndAction>,
        launched: bool,
        keep: bool,
        spot: bool,
        stop_start: bool,
        expected: Option<(EndAction, bool)>,
    ) {
        let provider = if stop_start {
            ProviderKind::Ec2
        } else {
            ProviderKind::Local
        };
        check_end_on(requested, launched, keep, spot, provider, expected);
    }

    fn check_end_on(
        requested: Option<EndAction>,
        launched: bool,
        keep: bool,
        spot: bool,
        provider: ProviderKind,
        expected: Option<(EndAction, bool)>,
    ) {
        let got = run_end(requested, launched, keep, spot, provider.capabilities())
            .ok()
            .map(|p| (p.agent, p.daemon_stops));
        assert_eq!(
            got, expected,
            "{requested:?} launched={launched} keep={keep} spot={spot} {provider:?}"
        );
    }

    #[test]
    fn a_run_ends_its_instance_as_asked_or_as_it_was_launched() {
        check_end(None, true, false, false, true, Some((Terminate, false)));
        check_end(None, true, true, false, true, Some((Keep, false)));
        check_end(None, false, false, false, true, Some((Keep, false)));
        check_end(
            Some(Terminate),
            false,
            false,
            false,
            false,
            Some((Terminate, false)),
        );
        check_end(Some(Keep), true, false, true, true, Some((Keep, false)));
        // A stop on a provider with stop/start is the daemon's, through the API.
        check_end(Some(Stop), true, false, false, true, Some((Keep, true)));
        // Elsewhere (a local instance) the agent powers off with its poweroff command.
        check_end(Some(Stop), false, false, false, false, Some((Stop, false)));
        // A pod stops itself through RunPod's API with its own key: no laptop needed.
        let pod = ProviderKind::Runpod;
        check_end_on(Some(Stop), true, false, false, pod, Some((Stop, false)));
        check_end_on(None, true, false, false, pod, Some((Terminate, false)));
        check_end_on(Some(Stop), true, false, true, pod, None);
        let caps = pod.capabilities();
        assert!(run_end(Some(Stop), true, false, false, caps).is_ok_and(|p| p.outlives_run));
        assert!(run_end(None, true, false, false, caps).is_ok_and(|p| !p.outlives_run));
        let local = ProviderKind::Local.capabilities();
        assert!(run_end(Some(Stop), true, false, false, local).is_ok_and(|p| !p.outlives_run));
        // Spot instances cannot be stopped, whoever would.
        check_end(Some(Stop), true, false, true, true, None);
        check_end(Some(Stop), false, false, true, false, None);
        check_end(
            Some(Terminate),
            true,
            false,
            true,
            true,
            Some((Terminate, false)),
        );
    }

    fn s3(profile: Option<&str>) -> StoreSpec {
        StoreSpec::S3 {
            region: Some("us-east-1".into()),
            endpoint_url: None,
            force_path_style: false,
            profile: profile.map(str::to_owned),
        }
    }
    fn local() -> StoreSpec {
        StoreSpec::Local {
            root: "/home/u/.runctl/objects".into(),
        }
    }

    /// (configured, needs_store, remote) -> what the agent is told, or a refusal.
    fn check_store(
        configured: StoreSpec,
        needs: bool,
        remote: bool,
        expected: Result<Option<StoreSpec>, ()>,
    ) {
        check_store_with(configured, needs, remote, StoreAccess::Own, expected);
    }

    fn check_store_with(
        configured: StoreSpec,
        needs: bool,
        remote: bool,
        access: StoreAccess,
        expected: Result<Option<StoreSpec>, ()>,
    ) {
        let got = run_store(configured.clone(), needs, remote, access).map_err(|_| ());
        assert_eq!(
            got, expected,
            "{configured:?} needs={needs} remote={remote} {access:?}"
        );
    }

    #[test]
    fn a_run_is_told_of_a_store_it_can_reach_with_its_own_credentials() {
        check_store(local(), false, true, Ok(None));
        check_store(s3(Some("dev")), false, false, Ok(None));
        check_store(local(), true, false, Ok(Some(local())));
        check_store(local(), true, true, Err(()));
        check_store(s3(Some("dev")), true, false, Ok(Some(s3(Some("dev")))));
        check_store(s3(Some("dev")), true, true, Ok(Some(s3(None))));
        // A pod: handed credentials, or a refusal when none are configured.
        let handed = StoreAccess::Handed;
        let nothing = StoreAccess::Nothing;
        check_store_with(s3(Some("dev")), true, true, handed, Ok(Some(s3(None))));
        check_store_with(s3(None), true, true, nothing, Err(()));
        check_store_with(s3(None), false, true, nothing, Ok(None));
        check_store_with(local(), true, true, nothing, Err(()));
    }

    /// (stop_start, spot, stopped, start) -> allowed, or refused with `refused`.
    fn check_power(
        stop_start: bool,
        spot: bool,
        stopped: bool,
        start: bool,
        expected: Result<(), &str>,
    ) {
        let got = power(
            "ec2-abcdef",
            "an EC2 instance",
            stop_start,
            spot,
            stopped,
            start,
        );
        match (got, expected) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(refused)) => assert!(e.message.contains(refused), "{}", e.message),
            (got, expected) => {
                panic!("{stop_start} {spot} {stopped} {start}: {got:?}, not {expected:?}")
            }
        }
    }

    #[test]
    fn only_on_demand_instances_of_a_provider_that_can_stop_them_stop_and_start() {
        check_power(true, false, false, false, Ok(()));
        check_power(true, false, true, true, Ok(()));
        check_power(true, false, true, false, Err("already stopped"));
        check_power(true, false, false, true, Err("is not stopped"));
        check_power(true, true, false, false, Err("spot instance"));
        check_power(true, true, true, true, Err("spot instance"));
        check_power(false, false, false, false, Err("not a cloud instance"));
        check_power(false, false, true, true, Err("not a cloud instance"));
    }

    #[test]
    fn interrupted_launch_table() {
        use InterruptedLaunch::*;
        use LaunchedFor::*;
        let check = |remote, recorded, enrolled, launched_for, expected: &str| {
            let got = interrupted_launch(remote, recorded, enrolled, launched_for);
            let kind = match got {
                Watch => "watch",
                Terminate(_) => "terminate",
                FindAndTerminate(_) => "find",
                Leave => "leave",
            };
            assert_eq!(
                kind, expected,
                "{remote} {recorded} {enrolled} {launched_for:?}"
            );
        };
        // A cloud instance made but not recorded: only its tag says it is ours.
        check(true, false, false, User, "find");
        check(true, false, false, UnstartedRun, "find");
        check(true, false, false, Run, "find");
        // Made for a run that never started: nobody will use it.
        check(true, true, false, UnstartedRun, "terminate");
        check(false, false, false, UnstartedRun, "terminate");
        // The user's own: it goes on if its agent comes in time, as the launch would have.
        check(true, true, false, User, "watch");
        check(false, false, false, User, "watch");
        // A run's replacement or node: the run's own machinery owns it.
        check(true, true, false, Run, "leave");
        // Started again after a stop (its agent enrolled before): never terminated here,
        // however long its agent takes.
        check(true, true, true, User, "leave");
        check(true, true, true, UnstartedRun, "leave");
        check(true, false, true, User, "leave");
    }

    #[test]
    fn agent_upgrade_table() {
        let check = |agent, ours, expected: bool| {
            assert_eq!(
                agent_upgrade(agent, ours, "runctl-agent 0.1.0").is_some(),
                expected,
                "{agent} {ours}"
            )
        };
        check(12, 12, false);
        check(11, 12, true);
        // A newer agent than the controller: the controller is what to upgrade, and a
        // request it makes is one the agent knows.
        check(13, 12, false);
        let said = agent_upgrade(11, 12, "runctl-agent 0.0.9").expect("said");
        assert!(
            said.contains("protocol 11") && said.contains("upgrade"),
            "{said}"
        );
    }
}
