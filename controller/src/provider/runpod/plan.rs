//! RunPod's decisions, as pure functions of what its API answered: what a failed call
//! means for the user (REST answers RFC 9457 problems; GraphQL answers HTTP 200 with an
//! `errors` list), which catalog GPU a name means (with the nearest names when none),
//! and a spot bid from the most the user will pay per hour.

use protocol::InstanceName;

use super::{GpuType, NetworkVolume, Pod, PodStatus, RunpodLaunch};
use crate::error::{ErrorCode, UserError};

/// The options' own checks, made before RunPod is asked anything.
pub fn check_options(opts: &RunpodLaunch) -> Result<(), UserError> {
    let bad = |message: String| UserError::new(ErrorCode::BadInput, message);
    if opts.gpu.trim().is_empty() {
        return Err(bad(
            "--gpu is empty: name a RunPod GPU type, e.g. \"NVIDIA A100 80GB PCIe\"".into(),
        ));
    }
    if opts.gpus == 0 {
        return Err(bad("--gpus 0: a pod has at least one GPU".into()));
    }
    if opts.disk_gb == Some(0) {
        return Err(bad("--disk 0: a container disk is at least 1 GB".into()));
    }
    if let Some(price) = opts.max_price
        && !(price.is_finite() && price > 0.0)
    {
        return Err(bad(format!("--max-price {price} is not a positive price")));
    }
    if let Some(volume) = &opts.volume
        && (volume.is_empty() || !volume.bytes().all(|b| b.is_ascii_alphanumeric()))
    {
        return Err(bad(format!(
            "--volume {volume:?} is not a RunPod network volume id"
        )));
    }
    Ok(())
}

/// Most pods one RunPod cluster may have (`ClusterCompute.podCount`: 2 to 250).
pub const MAX_CLUSTER_PODS: u32 = 250;

/// Whether `nodes` pods of `opts` can be one cluster: RunPod's clusters hold 2 to 250
/// pods, all on-demand (a cluster has no interruptible pods), which are never stopped
/// (RunPod ends a cluster's pods only together, by deleting it): `stops_at_end` is a run
/// that asked for `--end stop`.
pub fn check_cluster(opts: &RunpodLaunch, nodes: u32, stops_at_end: bool) -> Result<(), UserError> {
    if opts.spot {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("--nodes {nodes} --spot: RunPod's clusters have no interruptible pods"),
        )
        .resolve("drop --spot for a multi-node run on RunPod, or run --spot on one pod"));
    }
    if stops_at_end {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("--nodes {nodes} --end stop: RunPod cannot stop a cluster's pods, only delete the cluster"),
        )
        .resolve("use --end terminate, or --end keep to keep the cluster after the run"));
    }
    if !(2..=MAX_CLUSTER_PODS).contains(&nodes) {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("--nodes {nodes}: a RunPod cluster has 2 to {MAX_CLUSTER_PODS} pods"),
        ));
    }
    Ok(())
}

/// A cluster's `nodes` pods in rank order, once RunPod has given each rank one pod (a
/// rank is assigned during provisioning); `None` until then, or while a rank is missing
/// or doubled.
pub fn by_rank(pods: &[Pod], nodes: u32) -> Option<Vec<&Pod>> {
    let mut ranked: Vec<Option<&Pod>> = vec![None; nodes as usize];
    for pod in pods {
        let rank = pod.cluster.as_ref()?.rank? as usize;
        let slot = ranked.get_mut(rank)?;
        if slot.is_some() {
            return None;
        }
        *slot = Some(pod);
    }
    ranked.into_iter().collect()
}

/// Refused when one pod of `gpu` cannot have `count` GPUs.
pub fn check_count(gpu: &GpuType, count: u32) -> Result<(), UserError> {
    if count <= gpu.max_count.secure {
        return Ok(());
    }
    Err(UserError::new(
        ErrorCode::BadInput,
        format!(
            "--gpus {count}: a pod has at most {} x {}",
            gpu.max_count.secure, gpu.id
        ),
    ))
}

/// A pod that runs or is on its way to (and is billed for its GPUs).
pub fn is_live(status: PodStatus) -> bool {
    match status {
        PodStatus::Provisioning | PodStatus::Starting | PodStatus::Running => true,
        PodStatus::Exited | PodStatus::Error | PodStatus::Terminated => false,
    }
}

/// A status as the phase lines say it.
pub fn status_word(status: PodStatus) -> &'static str {
    match status {
        PodStatus::Provisioning => "provisioning",
        PodStatus::Starting => "starting",
        PodStatus::Running => "running",
        PodStatus::Exited => "exited",
        PodStatus::Error => "error",
        PodStatus::Terminated => "terminated",
    }
}

/// A live record as the daemon holds it: its name and pod id.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub name: &'a InstanceName,
    pub pod_id: &'a str,
}

/// What RunPod's listing says happened to a live record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Terminated, or gone from the account's pods.
    Terminated,
    /// Stopped (exited, or interrupted).
    Stopped,
    /// Running again (started outside runctl).
    Running,
}

/// Reconciles live records with the account's pods: the records RunPod says are gone,
/// stopped or running, and runctl's pods (by name) that no record names. Other pods of
/// the account are never listed, let alone touched.
pub fn reconcile<'a>(
    live: &[(Record<'a>, bool)],
    known_ids: &[&str],
    pods: &'a [Pod],
) -> (Vec<(&'a InstanceName, Observed)>, Vec<&'a Pod>) {
    let mut changes = Vec::new();
    for (record, stopped) in live {
        let observed = match pods
            .iter()
            .find(|p| p.id == record.pod_id)
            .map(|p| p.status)
        {
            None | Some(PodStatus::Terminated) => Some(Observed::Terminated),
            Some(PodStatus::Exited | PodStatus::Error) if !stopped => Some(Observed::Stopped),
            Some(PodStatus::Running) if *stopped => Some(Observed::Running),
            Some(_) => None,
        };
        if let Some(observed) = observed {
            changes.push((record.name, observed));
        }
    }
    let foreign = pods
        .iter()
        .filter(|p| {
            p.name.starts_with(super::launch::NAME_PREFIX)
                && p.status != PodStatus::Terminated
                && !known_ids.contains(&p.id.as_str())
        })
        .collect();
    (changes, foreign)
}

/// RFC 9457's problem body, as RunPod's REST API sends it (`ErrorResponse`).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct Problem {
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub errors: Vec<String>,
}

/// Why a REST call failed, from its status and problem body (`what` names the call).
/// `RetryAfter`-worthy answers (429, 5xx) are `retry: true`; the caller backs off.
pub fn rest_error(what: &str, status: u16, problem: &Problem) -> (UserError, bool) {
    let detail = if problem.detail.is_empty() {
        problem.title.clone()
    } else {
        problem.detail.clone()
    };
    let said = |d: &str| {
        if d.is_empty() {
            format!("{what}: RunPod answered HTTP {status}")
        } else {
            format!("{what}: {d} (HTTP {status})")
        }
    };
    match status {
        401 => (unauthorized(what), false),
        402 => (
            UserError::new(ErrorCode::Conflict, said(&detail))
                .resolve("add funds to the RunPod account (console, Billing), then retry"),
            false,
        ),
        403 => (
            UserError::new(ErrorCode::Conflict, said(&detail))
                .resolve("the API key lacks this permission: make one with read and write access to pods in the RunPod console (Settings, API Keys)"),
            false,
        ),
        404 => (UserError::new(ErrorCode::NotFound, said(&detail)), false),
        409 => (UserError::new(ErrorCode::Conflict, said(&detail)), false),
        422 => {
            let mut message = said(&detail);
            if !problem.errors.is_empty() {
                message = format!("{message}: {}", problem.errors.join("; "));
            }
            (UserError::new(ErrorCode::BadInput, message), false)
        }
        // A rule broken, or no capacity for this GPU here: RunPod gives no code for which.
        400 => (
            UserError::new(ErrorCode::Conflict, said(&detail))
                .resolve("if it says there is no capacity: try another --gpu, another --datacenter, or later"),
            false,
        ),
        429 => (
            UserError::new(ErrorCode::Conflict, said("rate limited")),
            true,
        ),
        500..=599 => (UserError::new(ErrorCode::Internal, said(&detail)), true),
        _ => (UserError::new(ErrorCode::Internal, said(&detail)), false),
    }
}

/// A wrong, revoked or missing key.
pub fn unauthorized(what: &str) -> UserError {
    UserError::new(
        ErrorCode::BadInput,
        format!("{what}: RunPod refused the API key (HTTP 401)"),
    )
    .resolve("check the key in RUNPOD_API_KEY, or the file [runpod] api_key_file names; make a new one in the RunPod console (Settings, API Keys)")
}

/// Why a GraphQL call failed, from the first of its `errors` (RunPod answers them with
/// HTTP 200).
pub fn graphql_error(what: &str, messages: &[String]) -> UserError {
    let first = messages.first().map_or("no message", String::as_str);
    let lower = first.to_ascii_lowercase();
    let error = if lower.contains("no longer any instances available")
        || lower.contains("no instances available")
    {
        UserError::new(ErrorCode::Conflict, format!("{what}: no capacity: {first}"))
            .resolve("try another --gpu, another --datacenter, a higher --max-price, or later")
    } else if lower.contains("bid") {
        UserError::new(ErrorCode::BadInput, format!("{what}: {first}"))
            .resolve("raise --max-price to at least the minimum bid times the GPU count")
    } else if lower.contains("unauthorized") || lower.contains("api key") {
        unauthorized(what)
    } else {
        UserError::new(ErrorCode::Internal, format!("{what}: {first}"))
    };
    if messages.len() > 1 {
        error.resolve(format!("RunPod also said: {}", messages[1..].join("; ")))
    } else {
        error
    }
}

/// The catalog GPU `wanted` names (its id or its display name, any case), or a refusal
/// that lists the nearest names.
pub fn find_gpu<'a>(catalog: &'a [GpuType], wanted: &str) -> Result<&'a GpuType, UserError> {
    let wanted_lower = wanted.to_lowercase();
    if let Some(gpu) = catalog
        .iter()
        .find(|g| g.id.to_lowercase() == wanted_lower || g.name.to_lowercase() == wanted_lower)
    {
        return Ok(gpu);
    }
    let mut near: Vec<(f64, &GpuType)> = catalog
        .iter()
        .map(|g| {
            let score = strsim::jaro_winkler(&wanted_lower, &g.id.to_lowercase())
                .max(strsim::jaro_winkler(&wanted_lower, &g.name.to_lowercase()));
            (score, g)
        })
        .collect();
    near.sort_by(|a, b| b.0.total_cmp(&a.0));
    let names: Vec<String> = near
        .iter()
        .take(3)
        .map(|(_, g)| format!("{:?}", g.id))
        .collect();
    let mut error = UserError::new(
        ErrorCode::BadInput,
        format!("--gpu {wanted:?} is not a RunPod GPU type"),
    );
    if !names.is_empty() {
        error = error.resolve(format!("the nearest: {}", names.join(", ")));
    }
    Err(error
        .resolve("RunPod's GPU types and their ids: https://docs.runpod.io/references/gpu-types"))
}

/// RunPod's `bidPerGpu` for a pod of `gpus` GPUs when the user pays at most `max_per_hour`
/// for the pod, refused under the catalog's minimum bid.
pub fn bid_per_gpu(max_per_hour: f64, gpus: u32, minimum: Option<f64>) -> Result<f64, UserError> {
    if !(max_per_hour.is_finite() && max_per_hour > 0.0) || gpus == 0 {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("--max-price {max_per_hour} is not a positive price"),
        ));
    }
    let bid = max_per_hour / f64::from(gpus);
    if let Some(minimum) = minimum
        && bid < minimum
    {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!(
                "--max-price {max_per_hour} is {bid:.3}/h per GPU, under RunPod's minimum bid of {minimum:.3}/h per GPU"
            ),
        )
        .resolve(format!(
            "raise --max-price to at least {:.3} for {gpus} GPU(s)",
            minimum * f64::from(gpus)
        )));
    }
    Ok(bid)
}

/// The data center a pod with network volume `volume_id` (`volume`: what RunPod knows of
/// it) goes to: the volume's, which a pod must share; refused when the volume does not
/// exist or another data center was asked for (`wanted`).
pub fn volume_datacenter(
    volume_id: &str,
    volume: Option<&NetworkVolume>,
    wanted: Option<&str>,
) -> Result<String, UserError> {
    let Some(volume) = volume else {
        return Err(UserError::new(
            ErrorCode::NotFound,
            format!("RunPod has no network volume {volume_id}"),
        )
        .resolve("list them: runctl-controller volume list --provider runpod")
        .resolve("or make one: runctl-controller volume create --provider runpod --size GB --datacenter DC"));
    };
    match wanted {
        Some(dc) if dc != volume.data_center => Err(UserError::new(
            ErrorCode::BadInput,
            format!(
                "network volume {volume_id} is in data center {}, and a pod can mount only a volume in its own data center ({dc} was asked for)",
                volume.data_center
            ),
        )
        .resolve(format!("launch in {}: --datacenter {}", volume.data_center, volume.data_center))
        .resolve(format!("or use a volume in {dc} (runctl-controller volume list --provider runpod)"))),
        Some(_) | None => Ok(volume.data_center.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, rank: Option<u32>) -> Pod {
        Pod {
            id: id.into(),
            name: format!("runctl-gang-r-{id}"),
            status: PodStatus::Provisioning,
            gpu: None,
            data_center_id: None,
            cost: 0.0,
            created_at: None,
            cluster: Some(super::super::PodCluster {
                id: "cluster_1".into(),
                rank,
                ip: None,
            }),
        }
    }

    /// (the pods' ranks, nodes) -> their ids in rank order, or `None`.
    fn check_ranks(ranks: &[Option<u32>], nodes: u32, want: Option<&[&str]>) {
        let pods: Vec<Pod> = ranks
            .iter()
            .enumerate()
            .map(|(i, rank)| member(&format!("p{i}"), *rank))
            .collect();
        let got = by_rank(&pods, nodes).map(|v| v.iter().map(|p| p.id.clone()).collect::<Vec<_>>());
        let want = want.map(|w| w.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(got, want, "{ranks:?} of {nodes}");
    }

    #[test]
    fn a_clusters_pods_are_taken_in_rank_order_once_every_rank_has_one() {
        check_ranks(&[Some(1), Some(0)], 2, Some(&["p1", "p0"]));
        check_ranks(&[Some(0), Some(1), Some(2)], 3, Some(&["p0", "p1", "p2"]));
        check_ranks(&[Some(0), None], 2, None);
        check_ranks(&[Some(0)], 2, None);
        check_ranks(&[Some(0), Some(0)], 2, None);
        check_ranks(&[Some(0), Some(2)], 2, None);
        check_ranks(&[], 2, None);
        let mut standalone = member("p0", Some(0));
        standalone.cluster = None;
        assert!(by_rank(&[standalone], 1).is_none(), "a pod of no cluster");
    }

    /// (spot, nodes, --end stop) -> refused with this phrase, or allowed.
    fn check_cluster_case(spot: bool, nodes: u32, stop: bool, refused: Option<&str>) {
        let opts = RunpodLaunch {
            gpu: "A100".into(),
            gpus: 1,
            spot,
            max_price: None,
            image: None,
            datacenter: None,
            disk_gb: None,
            volume: None,
        };
        match (check_cluster(&opts, nodes, stop), refused) {
            (Ok(()), None) => {}
            (Err(e), Some(said)) => assert!(e.message.contains(said), "{}", e.message),
            (got, want) => panic!("spot {spot}, {nodes} nodes: {got:?}, wanted {want:?}"),
        }
    }

    #[test]
    fn a_cluster_is_two_to_250_on_demand_pods() {
        check_cluster_case(false, 2, false, None);
        check_cluster_case(false, 250, false, None);
        check_cluster_case(false, 1, false, Some("2 to 250"));
        check_cluster_case(false, 251, false, Some("2 to 250"));
        check_cluster_case(true, 2, false, Some("no interruptible pods"));
        check_cluster_case(false, 2, true, Some("cannot stop a cluster's pods"));
    }

    fn problem(detail: &str, errors: &[&str]) -> Problem {
        Problem {
            title: "Bad".into(),
            status: 0,
            detail: detail.into(),
            errors: errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// (status, problem) -> the error code, whether to retry, and a phrase of the message.
    fn check_rest(status: u16, p: Problem, code: ErrorCode, retry: bool, said: &str) {
        let (error, again) = rest_error("creating pod x", status, &p);
        assert_eq!((error.code, again), (code, retry), "{status} {p:?}");
        assert!(error.message.contains(said), "{status}: {}", error.message);
    }

    #[test]
    fn rest_problems_become_errors_that_say_what_to_do() {
        check_rest(
            401,
            problem("", &[]),
            ErrorCode::BadInput,
            false,
            "refused the API key",
        );
        check_rest(
            402,
            problem("Insufficient balance", &[]),
            ErrorCode::Conflict,
            false,
            "Insufficient balance",
        );
        check_rest(
            403,
            problem("no access", &[]),
            ErrorCode::Conflict,
            false,
            "no access",
        );
        check_rest(
            404,
            problem("pod not found", &[]),
            ErrorCode::NotFound,
            false,
            "pod not found",
        );
        check_rest(
            409,
            problem("pod is locked", &[]),
            ErrorCode::Conflict,
            false,
            "locked",
        );
        check_rest(
            422,
            problem("invalid body", &["gpu.count: must be >= 1"]),
            ErrorCode::BadInput,
            false,
            "gpu.count",
        );
        check_rest(
            400,
            problem("no capacity for this GPU", &[]),
            ErrorCode::Conflict,
            false,
            "no capacity",
        );
        check_rest(
            429,
            problem("", &[]),
            ErrorCode::Conflict,
            true,
            "rate limited",
        );
        check_rest(
            503,
            problem("upstream", &[]),
            ErrorCode::Internal,
            true,
            "upstream",
        );
        check_rest(
            500,
            Problem::default(),
            ErrorCode::Internal,
            true,
            "HTTP 500",
        );
        check_rest(
            418,
            problem("teapot", &[]),
            ErrorCode::Internal,
            false,
            "teapot",
        );
    }

    #[test]
    fn graphql_errors_are_read_from_a_200() {
        let check = |messages: &[&str], code: ErrorCode, said: &str| {
            let messages: Vec<String> = messages.iter().map(|m| m.to_string()).collect();
            let error = graphql_error("renting a spot pod", &messages);
            assert_eq!(error.code, code, "{messages:?}");
            assert!(error.message.contains(said), "{}", error.message);
        };
        check(
            &[
                "There are no longer any instances available with the requested specifications. Please refresh and try again.",
            ],
            ErrorCode::Conflict,
            "no capacity",
        );
        check(
            &["Your bid price is below the minimum bid price of 0.5"],
            ErrorCode::BadInput,
            "minimum bid",
        );
        check(
            &["Unauthorized"],
            ErrorCode::BadInput,
            "refused the API key",
        );
        check(&["Something broke"], ErrorCode::Internal, "Something broke");
        check(&[], ErrorCode::Internal, "no message");
    }

    fn gpu(id: &str, name: &str) -> GpuType {
        GpuType {
            id: id.into(),
            name: name.into(),
            memory: 80,
            secure: true,
            community: true,
            price: super::super::GpuPrice {
                secure: 1.5,
                community: 1.2,
            },
            max_count: super::super::GpuCount {
                secure: 8,
                community: 4,
            },
        }
    }

    #[test]
    fn a_gpu_is_found_by_id_or_name_else_the_nearest_are_named() {
        let catalog = [
            gpu("NVIDIA A100 80GB PCIe", "A100 PCIe"),
            gpu("NVIDIA H100 80GB HBM3", "H100 SXM"),
            gpu("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ];
        let check = |wanted: &str, expected: Result<&str, &str>| match (
            find_gpu(&catalog, wanted),
            expected,
        ) {
            (Ok(g), Ok(id)) => assert_eq!(g.id, id),
            (Err(e), Err(near)) => {
                assert!(
                    e.message.contains("is not a RunPod GPU type"),
                    "{}",
                    e.message
                );
                assert!(e.to_resolve[0].contains(near), "{:?}", e.to_resolve);
            }
            (got, expected) => panic!("{wanted}: {got:?}, not {expected:?}"),
        };
        check("NVIDIA A100 80GB PCIe", Ok("NVIDIA A100 80GB PCIe"));
        check("nvidia a100 80gb pcie", Ok("NVIDIA A100 80GB PCIe"));
        check("RTX 4090", Ok("NVIDIA GeForce RTX 4090"));
        check("NVIDIA A100 80GB", Err("\"NVIDIA A100 80GB PCIe\""));
        check("H100", Err("\"NVIDIA H100 80GB HBM3\""));
        assert!(find_gpu(&[], "A100").is_err());
    }

    fn pod(id: &str, name: &str, status: PodStatus) -> Pod {
        Pod {
            id: id.into(),
            name: name.into(),
            status,
            gpu: None,
            data_center_id: None,
            cost: 0.0,
            created_at: None,
            cluster: None,
        }
    }

    /// A live record (stopped or not) against the account's pods -> what is observed.
    fn check_reconcile(stopped: bool, pods: &[Pod], expected: Option<Observed>) {
        let name: InstanceName = "runpod-abcdef".parse().expect("name");
        let live = [(
            Record {
                name: &name,
                pod_id: "p1",
            },
            stopped,
        )];
        let (changes, _) = reconcile(&live, &["p1"], pods);
        assert_eq!(
            changes.first().map(|c| c.1),
            expected,
            "stopped={stopped} {pods:?}"
        );
    }

    #[test]
    fn the_accounts_pods_move_records_to_what_runpod_reports() {
        use PodStatus::*;
        let mine = "runctl-runpod-abcdef";
        check_reconcile(false, &[pod("p1", mine, Running)], None);
        check_reconcile(false, &[pod("p1", mine, Provisioning)], None);
        check_reconcile(false, &[pod("p1", mine, Exited)], Some(Observed::Stopped));
        check_reconcile(false, &[pod("p1", mine, Error)], Some(Observed::Stopped));
        check_reconcile(true, &[pod("p1", mine, Exited)], None);
        check_reconcile(true, &[pod("p1", mine, Running)], Some(Observed::Running));
        check_reconcile(
            false,
            &[pod("p1", mine, Terminated)],
            Some(Observed::Terminated),
        );
        check_reconcile(false, &[], Some(Observed::Terminated));
        check_reconcile(
            true,
            &[pod("p2", mine, Running)],
            Some(Observed::Terminated),
        );
    }

    #[test]
    fn only_runctls_unknown_pods_are_foreign() {
        let pods = [
            pod("p1", "runctl-runpod-aaaaaa", PodStatus::Running),
            pod("p2", "runctl-runpod-bbbbbb", PodStatus::Exited),
            pod("p3", "my-notebook", PodStatus::Running),
            pod("p4", "runctl-runpod-cccccc", PodStatus::Terminated),
        ];
        let (_, foreign) = reconcile(&[], &["p1"], &pods);
        let ids: Vec<&str> = foreign.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["p2"]);
    }

    #[test]
    fn launch_options_are_checked_before_runpod_is_asked() {
        let opts = RunpodLaunch {
            gpu: "NVIDIA A100 80GB PCIe".into(),
            gpus: 1,
            spot: false,
            max_price: None,
            image: None,
            datacenter: None,
            disk_gb: None,
            volume: None,
        };
        let check = |edit: &dyn Fn(&mut RunpodLaunch), refused: Option<&str>| {
            let mut o = opts.clone();
            edit(&mut o);
            match (check_options(&o), refused) {
                (Ok(()), None) => {}
                (Err(e), Some(said)) => assert!(e.message.contains(said), "{}", e.message),
                (got, want) => panic!("{o:?}: {got:?}, not {want:?}"),
            }
        };
        check(&|_| {}, None);
        check(&|o| o.gpu = " ".into(), Some("--gpu is empty"));
        check(&|o| o.gpus = 0, Some("--gpus 0"));
        check(&|o| o.disk_gb = Some(0), Some("--disk 0"));
        check(&|o| o.max_price = Some(-1.0), Some("not a positive price"));
        check(
            &|o| o.volume = Some("../x".into()),
            Some("network volume id"),
        );
        check(&|o| o.volume = Some("agv6w2qcg7".into()), None);
        let a100 = gpu("NVIDIA A100 80GB PCIe", "A100 PCIe");
        assert!(check_count(&a100, 8).is_ok());
        assert!(check_count(&a100, 9).is_err());
    }

    #[test]
    fn a_spot_bid_is_the_pods_maximum_shared_by_its_gpus() {
        let check = |max: f64, gpus: u32, minimum: Option<f64>, expected: Option<f64>| {
            let got = bid_per_gpu(max, gpus, minimum).ok();
            assert_eq!(got, expected, "{max} for {gpus} GPUs, minimum {minimum:?}");
        };
        check(2.0, 1, None, Some(2.0));
        check(2.0, 4, Some(0.3), Some(0.5));
        check(1.0, 4, Some(0.3), None);
        check(1.2, 4, Some(0.3), Some(0.3));
        check(0.0, 1, None, None);
        check(f64::NAN, 1, None, None);
        check(1.0, 0, None, None);
    }

    #[test]
    fn a_pod_goes_where_its_network_volume_is() {
        let volume = NetworkVolume {
            id: "v1".into(),
            name: "runctl-data".into(),
            size: 50,
            data_center: "US-KS-2".into(),
            kind: None,
        };
        let check =
            |volume: Option<&NetworkVolume>, wanted: Option<&str>, expected: Result<&str, &str>| {
                match (volume_datacenter("v1", volume, wanted), expected) {
                    (Ok(dc), Ok(want)) => assert_eq!(dc, want),
                    (Err(e), Err(says)) => assert!(e.message.contains(says), "{}", e.message),
                    (got, expected) => panic!("{volume:?} {wanted:?}: {got:?}, not {expected:?}"),
                }
            };
        check(Some(&volume), None, Ok("US-KS-2"));
        check(Some(&volume), Some("US-KS-2"), Ok("US-KS-2"));
        check(
            Some(&volume),
            Some("EU-RO-1"),
            Err("is in data center US-KS-2"),
        );
        check(None, None, Err("no network volume v1"));
    }
}
