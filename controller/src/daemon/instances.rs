//! Instances as the daemon drives them, whatever their provider: a launch's
//! provider-neutral steps (the name, how agents reach the daemon, the record, the token,
//! the agent's config, "comes up or is cleaned up") written once around the steps of the
//! provider's folder; terminating (flush, revoke, kill); stop and start; bringing records
//! up to date with the cloud. The `match`es on `LaunchOptions` and `ProviderKind` here are
//! the daemon's only dispatch on the provider.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::agent_config::AgentConfigFile;
use protocol::{ControllerMsg, InstanceName, RunId};

use super::{Daemon, now_ms, sync};
use crate::db::{CloudRow, InstanceRow, InstanceState, RunState};
use crate::error::{ErrorCode, UserError};
use crate::plan;
use crate::provider::ec2::{self, Ec2};
use crate::provider::runpod::{self, PodAction, RunPod};
use crate::provider::{LaunchOptions, Progress, ProviderKind, local, say, seconds};

/// How long a terminated instance's agent gets to stop its runs (each with its own grace
/// period) and close.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(610);

/// How long a freshly started local agent gets to enroll and connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

fn internal(e: anyhow::Error) -> UserError {
    UserError::new(ErrorCode::Internal, format!("{e:#}"))
}

pub(super) async fn ec2_client(d: &Daemon) -> Result<&Ec2, UserError> {
    d.ec2.get_or_try_init(|| Ec2::connect(&d.config.ec2)).await
}

/// A client for the RunPod account of `[runpod]` and the daemon's `RUNPOD_API_KEY`.
fn runpod_client(d: &Daemon) -> Result<RunPod, UserError> {
    runpod::launch::client(&d.config, std::env::var("RUNPOD_API_KEY").ok()).map_err(|e| {
        e.resolve("the daemon reads RUNPOD_API_KEY when it starts: after exporting it, restart the daemon (runctl-controller shutdown; the next command starts it)")
    })
}

/// A provider's checks and preparations, done before anything is recorded or paid for.
enum Prepared {
    Local { agent_bin: PathBuf },
    Ec2(Box<ec2::launch::Prepared>),
    Runpod(Box<runpod::launch::Prepared>),
}

impl Prepared {
    /// What the instance will cost per hour, where known before it is made.
    fn price_per_hour(&self) -> Option<f64> {
        match self {
            Prepared::Local { .. } => None,
            Prepared::Ec2(prepared) => prepared.price_per_hour(),
            Prepared::Runpod(prepared) => Some(prepared.price),
        }
    }
}

/// Launches an instance of the first type EC2 has (`--instance-type a,b,c`: the next is
/// tried after a shortage, `ec2::plan::next_type`, each said on `progress`), else as
/// `launch_one`.
pub(super) async fn launch(
    d: &Arc<Daemon>,
    options: &LaunchOptions,
    name: Option<InstanceName>,
    for_run: Option<RunId>,
    wait: bool,
    needs_price: bool,
    progress: &Progress,
) -> Result<InstanceRow, UserError> {
    let LaunchOptions::Ec2(first) = options else {
        return launch_one(d, options, name, for_run, wait, needs_price, progress).await;
    };
    let types: Vec<String> = std::iter::once(first.instance_type.clone())
        .chain(first.other_types.iter().cloned())
        .collect();
    let mut tried = 0;
    loop {
        let mut opts = first.clone();
        opts.instance_type = types[tried].clone();
        opts.other_types.clear();
        let this = LaunchOptions::Ec2(opts);
        let made = launch_one(
            d,
            &this,
            name.clone(),
            for_run.clone(),
            wait,
            needs_price,
            progress,
        )
        .await;
        let e = match made {
            Ok(row) => return Ok(row),
            Err(e) => e,
        };
        match ec2::plan::next_type(&types, tried, e.code) {
            Some(next) => {
                say(
                    progress,
                    format!("{}: {}; trying {next}", types[tried], e.message),
                );
                tried += 1;
            }
            None if tried > 0 => {
                let mut last = UserError::new(
                    e.code,
                    format!(
                        "none of {} could be launched; {}: {}",
                        types.join(", "),
                        types[tried],
                        e.message
                    ),
                );
                last.to_resolve = e.to_resolve;
                return Err(last);
            }
            None => return Err(e),
        }
    }
}

/// Makes `name` free for a new instance: a terminated instance's record (and runs) move
/// aside; a live one is a conflict.
fn claim_name(d: &Daemon, name: &InstanceName) -> Result<(), UserError> {
    match d.db.instance(name).map_err(internal)? {
        // A terminated instance's name is free: its record (and runs) move aside.
        Some(old) if old.state == InstanceState::Terminated => {
            let to = plan::retired_name(name, old.created_ms, |c| {
                c.parse()
                    .ok()
                    .is_some_and(|n| d.db.instance(&n).ok().flatten().is_some())
            });
            d.db.retire_instance(name, &to).map_err(internal)?;
            let dir = d.home.local_instance(name);
            if dir.exists() {
                std::fs::rename(&dir, d.home.local_instance(&to)).map_err(|e| {
                    internal(anyhow::anyhow!("moving {} aside: {e}", dir.display()))
                })?;
            }
            tracing::info!("{name} was terminated; its record is now {to}");
        }
        Some(_) => {
            return Err(UserError::new(
                ErrorCode::Conflict,
                format!("an instance named {name} already exists"),
            )
            .resolve("pick another --name, or leave it out for a generated one"));
        }
        None => {}
    }
    Ok(())
}

/// A new agent config for instance `name`, with a fresh enrollment token that lives as
/// long as the instance may take to enroll.
fn agent_config(
    d: &Daemon,
    name: &InstanceName,
    reach: &plan::Reach,
    enroll_timeout: Duration,
) -> Result<AgentConfigFile, UserError> {
    let ttl = d.config.daemon.token_ttl().max(enroll_timeout);
    let token =
        d.db.mint_token(name, now_ms() + ttl.as_millis() as u64)
            .map_err(internal)?;
    Ok(AgentConfigFile::new(
        name.clone(),
        super::carriers::agent_endpoints(reach.direct.as_deref(), reach.relay.as_deref()),
        d.pki.ca.fingerprint(),
        token,
        PathBuf::from("state"),
    ))
}

/// Launches an instance; with `wait` (always, for a local one) returns once its agent has
/// enrolled. A failure before the provider makes the instance leaves nothing behind; one
/// after it terminates the instance, so a failed launch never leaves a paid machine. With
/// `needs_price` (a run with a cost cap) an instance whose price is not known is refused
/// before it is made.
async fn launch_one(
    d: &Arc<Daemon>,
    options: &LaunchOptions,
    name: Option<InstanceName>,
    for_run: Option<RunId>,
    wait: bool,
    needs_price: bool,
    progress: &Progress,
) -> Result<InstanceRow, UserError> {
    let started = Instant::now();
    let provider = options.kind();
    let name = name.unwrap_or_else(|| provider.fresh_name());
    claim_name(d, &name)?;
    // How its agent reaches this daemon, checked before anything is made.
    let relay = d.config.daemon.relay.as_deref();
    let reach = match options {
        LaunchOptions::Local => plan::local_reach(d.quic_addr, relay),
        LaunchOptions::Ec2(_) => plan::remote_reach(
            "ec2",
            d.config.ec2.controller_endpoint.as_deref(),
            relay,
            d.quic_addr,
        )?,
        LaunchOptions::Runpod(_) => plan::remote_reach(
            "runpod",
            d.config.runpod.controller_endpoint.as_deref(),
            relay,
            d.quic_addr,
        )?,
    };
    let prepared = match options {
        LaunchOptions::Local => Prepared::Local {
            agent_bin: local::agent_binary(&d.config.local)?,
        },
        LaunchOptions::Ec2(opts) => Prepared::Ec2(Box::new(
            ec2::launch::prepare(
                ec2_client(d).await?,
                &d.config,
                d.home.root(),
                opts,
                progress,
            )
            .await?,
        )),
        LaunchOptions::Runpod(opts) => Prepared::Runpod(Box::new(
            runpod::launch::prepare(
                &runpod_client(d)?,
                &d.config,
                d.home.root(),
                opts,
                1,
                progress,
            )
            .await?,
        )),
    };
    if needs_price && prepared.price_per_hour().is_none() {
        let mut refusal = UserError::new(
            ErrorCode::BadInput,
            format!(
                "--max-cost needs the instance's price per hour, and that of {} is not known",
                provider.an_instance()
            ),
        );
        if provider == ProviderKind::Ec2 {
            refusal = refusal.resolve("add the type's price under [ec2.prices] in config.toml");
        }
        return Err(refusal.resolve("or cap the run's time with --max-hours instead"));
    }

    // From here on there is a record: a failure marks it terminated.
    d.db.insert_instance(&InstanceRow {
        name: name.clone(),
        provider,
        state: InstanceState::Launching,
        created_ms: now_ms(),
        terminated_ms: None,
        pid: None,
        for_run: for_run.clone(),
    })
    .map_err(internal)?;
    let enroll_timeout = enroll_timeout(d, provider);
    let made = async {
        let mut config = agent_config(d, &name, &reach, enroll_timeout)?;
        match &prepared {
            Prepared::Local { agent_bin } => {
                local::agent_settings(&d.config, &mut config);
                start_local(d, &name, &config, agent_bin)
            }
            Prepared::Ec2(prepared) => {
                ec2::launch::agent_settings(&d.config, &mut config);
                let ec2 = ec2_client(d).await?;
                let instance = ec2::launch::start(
                    ec2,
                    &d.config,
                    prepared,
                    &name,
                    for_run.as_ref(),
                    &config,
                    progress,
                )
                .await?;
                let cloud = CloudRow {
                    name: name.clone(),
                    cloud_id: instance.id.clone(),
                    region: ec2.region.clone(),
                    instance_type: instance.instance_type.clone(),
                    spot: instance.spot,
                    price_per_hour: instance.price_per_hour,
                    accrued_ms: 0,
                    running_since_ms: Some(now_ms()),
                    cluster: None,
                };
                if let Err(e) = d.db.insert_cloud(&cloud) {
                    // Without the record nothing would ever terminate it: do it now.
                    let _ = ec2.terminate(&instance.id).await;
                    return Err(internal(e));
                }
                Ok(())
            }
            Prepared::Runpod(prepared) => {
                runpod::launch::agent_settings(&d.config, &mut config);
                let api = runpod_client(d)?;
                let pod =
                    runpod::launch::start(&api, &d.config, prepared, &name, &config, progress)
                        .await?;
                let cloud = pod_record(&name, &pod, None);
                if let Err(e) = d.db.insert_cloud(&cloud) {
                    // Without the record nothing would ever terminate it: do it now.
                    let _ = api.action(&pod.id, PodAction::Terminate).await;
                    return Err(internal(e));
                }
                Ok(())
            }
        }
    };
    if let Err(e) = made.await {
        let _ =
            d.db.set_instance_state(&name, InstanceState::Terminated, now_ms());
        return Err(e);
    }
    if !wait && provider.capabilities().remote {
        // Nobody waits, but an instance that never enrolls is still ended in time.
        let (d2, name2) = (d.clone(), name.clone());
        d.tasks.spawn(async move {
            let (quiet, _) = tokio::sync::mpsc::unbounded_channel();
            tokio::select! {
                () = d2.shutdown.cancelled() => {}
                _ = come_up_or_go(&d2, &name2, started, &quiet) => {}
            }
        });
    } else {
        come_up_or_go(d, &name, started, progress).await?;
        if provider.capabilities().remote {
            say(
                progress,
                format!("  {:<16}{:>7}", "ready", seconds(started.elapsed())),
            );
        }
    }
    d.db.instance(&name)
        .map_err(internal)?
        .ok_or_else(|| internal(anyhow::anyhow!("instance {name} vanished")))
}

/// The record of pod `pod`, made now for instance `name` (a member of `cluster`, if any).
fn pod_record(
    name: &InstanceName,
    pod: &runpod::launch::Started,
    cluster: Option<String>,
) -> CloudRow {
    CloudRow {
        name: name.clone(),
        cloud_id: pod.id.clone(),
        region: pod.datacenter.clone(),
        instance_type: pod.instance_type.clone(),
        spot: pod.spot,
        price_per_hour: pod.price_per_hour,
        accrued_ms: 0,
        running_since_ms: Some(now_ms()),
        cluster,
    }
}

/// Launches the `nodes` instances of a gang together, all or none: each as `launch` does
/// (waiting for its agent), at once, or on RunPod as one cluster (`launch_cluster`); if
/// any cannot be had, those that were made are terminated and the error says which node
/// failed and why. Returns the instances in node order. `stops_at_end`: the run asked for
/// `--end stop`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn launch_gang(
    d: &Arc<Daemon>,
    options: &LaunchOptions,
    run: &RunId,
    nodes: u32,
    for_run: Option<RunId>,
    needs_price: bool,
    stops_at_end: bool,
    progress: &Progress,
) -> Result<Vec<InstanceName>, UserError> {
    let kind = options.kind();
    if !kind.capabilities().multi_node {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("--nodes {nodes}: runctl cannot launch a gang of {kind} instances yet"),
        )
        .resolve("run the nodes on the local provider (--provider local), or drop --nodes"));
    }
    // The gang's place, before any node: on EC2 one placement group, zone and
    // members-only security group; on RunPod the cluster, made with its pods.
    let mut options = options.clone();
    match &mut options {
        LaunchOptions::Ec2(opts) => {
            say(
                progress,
                format!("launching {nodes} {kind} instances together, one per node"),
            );
            // Every node of a gang is of one type: the first.
            opts.other_types.clear();
            let ec2 = ec2_client(d).await?;
            let relaunch = d.db.relaunches(run).map_err(internal)?;
            let gang =
                ec2::launch::prepare_gang(ec2, &d.config, opts, run, relaunch, nodes, progress)
                    .await?;
            opts.gang = Some(gang);
        }
        LaunchOptions::Runpod(opts) => {
            runpod::plan::check_cluster(opts, nodes, stops_at_end)?;
            say(
                progress,
                format!("launching {nodes} RunPod pods together as one cluster, one per node"),
            );
        }
        LaunchOptions::Local => say(
            progress,
            format!("launching {nodes} {kind} instances together, one per node"),
        ),
    }
    let (made, mut failed) = match &options {
        LaunchOptions::Runpod(opts) => {
            launch_cluster(d, opts, run, nodes, for_run, progress).await?
        }
        LaunchOptions::Local | LaunchOptions::Ec2(_) => {
            launch_each(d, &options, nodes, for_run, needs_price, progress).await
        }
    };
    if failed.is_empty() {
        return Ok(made.into_iter().flatten().collect());
    }
    failed.sort_by_key(|(node, _)| *node);
    let kept: Vec<InstanceName> = made.into_iter().flatten().collect();
    for name in &kept {
        if let Err(e) = terminate_now(d, name).await {
            tracing::error!(
                "terminating {name} of a gang that could not be launched: {}",
                e.message
            );
        }
    }
    release_gang(d, kind, run);
    let (node, first) = failed.swap_remove(0);
    let mut error = UserError::new(
        first.code,
        format!(
            "node {node} of {nodes} could not be launched, so none is kept ({} made and terminated): {}",
            kept.len(),
            first.message
        ),
    );
    error.to_resolve = first.to_resolve;
    Err(error)
}

/// Each node's instance (by node) where it came up, and each node's failure.
type GangOutcome = (Vec<Option<InstanceName>>, Vec<(u32, UserError)>);

/// A progress sink whose lines are `outer`'s, prefixed `[node R]`, and the task that
/// forwards them (done once the sink is dropped).
fn node_progress(outer: &Progress, node: u32) -> (Progress, tokio::task::JoinHandle<()>) {
    let (progress, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let out = outer.clone();
    let forwarder = tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            say(&out, format!("[node {node}] {}", line.trim_start()));
        }
    });
    (progress, forwarder)
}

/// Waits for every task's outcome, then for every node's last lines.
async fn gang_outcome(
    nodes: u32,
    mut tasks: tokio::task::JoinSet<(u32, Result<InstanceName, UserError>)>,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
) -> GangOutcome {
    let mut made: Vec<Option<InstanceName>> = vec![None; nodes as usize];
    let mut failed: Vec<(u32, UserError)> = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((node, Ok(name))) => made[node as usize] = Some(name),
            Ok((node, Err(e))) => failed.push((node, e)),
            Err(e) => failed.push((u32::MAX, internal(anyhow::anyhow!("a launch task: {e}")))),
        }
    }
    // Every node's last lines are out before the gang's outcome.
    for forwarder in forwarders {
        let _ = forwarder.await;
    }
    (made, failed)
}

/// A gang's nodes launched one instance each, as `launch` does, all at once.
async fn launch_each(
    d: &Arc<Daemon>,
    options: &LaunchOptions,
    nodes: u32,
    for_run: Option<RunId>,
    needs_price: bool,
    progress: &Progress,
) -> GangOutcome {
    let mut forwarders = Vec::with_capacity(nodes as usize);
    let mut tasks = tokio::task::JoinSet::new();
    for node in 0..nodes {
        let (d, options, for_run) = (d.clone(), options.clone(), for_run.clone());
        let (progress, forwarder) = node_progress(progress, node);
        forwarders.push(forwarder);
        tasks.spawn(async move {
            let made = launch(&d, &options, None, for_run, true, needs_price, &progress).await;
            (node, made.map(|row| row.name))
        });
    }
    gang_outcome(nodes, tasks, forwarders).await
}

/// A RunPod gang: one cluster, whose pods RunPod makes together and alike (one image, one
/// start command that writes each pod the agent config of its `NODE_RANK`). Until every
/// rank has its pod, a failure leaves nothing (the cluster deleted, the records
/// terminated); after that each node's agent is waited for as `launch` waits, and the
/// outcome is per node.
async fn launch_cluster(
    d: &Arc<Daemon>,
    opts: &runpod::RunpodLaunch,
    run: &RunId,
    nodes: u32,
    for_run: Option<RunId>,
    progress: &Progress,
) -> Result<GangOutcome, UserError> {
    let started = Instant::now();
    let reach = plan::remote_reach(
        "runpod",
        d.config.runpod.controller_endpoint.as_deref(),
        d.config.daemon.relay.as_deref(),
        d.quic_addr,
    )?;
    let api = runpod_client(d)?;
    let prepared =
        runpod::launch::prepare(&api, &d.config, d.home.root(), opts, nodes, progress).await?;
    let timeout = enroll_timeout(d, ProviderKind::Runpod);
    let names: Vec<InstanceName> = (0..nodes)
        .map(|_| ProviderKind::Runpod.fresh_name())
        .collect();
    for name in &names {
        claim_name(d, name)?;
    }
    let made = async {
        let mut configs = Vec::with_capacity(names.len());
        for name in &names {
            d.db.insert_instance(&InstanceRow {
                name: name.clone(),
                provider: ProviderKind::Runpod,
                state: InstanceState::Launching,
                created_ms: now_ms(),
                terminated_ms: None,
                pid: None,
                for_run: for_run.clone(),
            })
            .map_err(internal)?;
            let mut config = agent_config(d, name, &reach, timeout)?;
            runpod::launch::agent_settings(&d.config, &mut config);
            configs.push(config);
        }
        let (cluster, pods) = runpod::launch::start_cluster(
            &api, &d.config, &prepared, run, &configs, timeout, progress,
        )
        .await?;
        for (name, pod) in names.iter().zip(&pods) {
            let cloud = pod_record(name, pod, Some(cluster.clone()));
            if let Err(e) = d.db.insert_cloud(&cloud) {
                // Without the records nothing would ever end it: do it now.
                let _ = api.delete_cluster(&cluster).await;
                return Err(internal(e));
            }
        }
        Ok(())
    };
    if let Err(e) = made.await {
        for name in &names {
            let _ =
                d.db.set_instance_state(name, InstanceState::Terminated, now_ms());
        }
        return Err(e);
    }
    let mut forwarders = Vec::with_capacity(names.len());
    let mut tasks = tokio::task::JoinSet::new();
    for (node, name) in (0..nodes).zip(names) {
        let d = d.clone();
        let (progress, forwarder) = node_progress(progress, node);
        forwarders.push(forwarder);
        tasks.spawn(async move {
            let up = come_up_or_go(&d, &name, started, &progress).await;
            (node, up.map(|()| name))
        });
    }
    Ok(gang_outcome(nodes, tasks, forwarders).await)
}

/// How often, and how long, a gang's place is tried for deletion while its instances
/// shut down (EC2 refuses to delete a group an instance still holds).
const RELEASE_EVERY: Duration = Duration::from_secs(10);
const RELEASE_FOR: Duration = Duration::from_secs(600);

/// Deletes what the place of a run's current gang holds once its instances are gone
/// (EC2: its placement group and security group), in the background, retrying while
/// they shut down.
pub(super) fn release_gang(d: &Arc<Daemon>, provider: ProviderKind, run: &RunId) {
    match d.db.relaunches(run) {
        Ok(relaunch) => release_gang_place(d, provider, run, relaunch),
        Err(e) => {
            tracing::error!(%run, "reading its relaunches to release its gang's place: {e:#}")
        }
    }
}

/// `release_gang` for the place of the run's gang of relaunch `relaunch` (0: its first).
pub(super) fn release_gang_place(
    d: &Arc<Daemon>,
    provider: ProviderKind,
    run: &RunId,
    relaunch: u32,
) {
    match provider {
        ProviderKind::Ec2 => {}
        ProviderKind::Local | ProviderKind::Runpod => return,
    }
    let (d2, name) = (d.clone(), ec2::gang_name(run, relaunch));
    d.tasks.spawn(async move {
        let Ok(ec2) = ec2_client(&d2).await else {
            return;
        };
        let deadline = Instant::now() + RELEASE_FOR;
        loop {
            match ec2.delete_gang(&name).await {
                Ok(true) => {
                    tracing::info!("deleted {name}'s placement group and security group");
                    return;
                }
                Ok(false) if Instant::now() < deadline => {}
                Ok(false) => {
                    tracing::warn!(
                        "{name} is still held by an instance after {RELEASE_FOR:?}; left in place"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!("deleting {name}: {}", e.message);
                    return;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(RELEASE_EVERY) => {}
                () = d2.shutdown.cancelled() => return,
            }
        }
    });
}

/// Whether instance `name` is gone from its provider (terminated, or being terminated, or
/// not listed at all): a spot instance taken back while its agent was out of touch.
pub(super) async fn gone(d: &Arc<Daemon>, name: &InstanceName) -> Result<bool, UserError> {
    let Some(row) = d.db.instance(name).map_err(internal)? else {
        return Ok(true);
    };
    if row.state == InstanceState::Terminated {
        return Ok(true);
    }
    let Some(cloud) = d.db.cloud(name).map_err(internal)? else {
        return Ok(false);
    };
    match row.provider {
        ProviderKind::Ec2 => {
            let listed = ec2_client(d).await?.instance(&cloud.cloud_id).await?;
            Ok(listed.is_none_or(|i| matches!(i.state.as_str(), "terminated" | "shutting-down")))
        }
        ProviderKind::Runpod => {
            let pods = runpod_client(d)?.pods().await?;
            // An interruptible pod outbid is stopped, not terminated: for a run that
            // relaunches, stopped is gone too.
            Ok(!pods.iter().any(|p| {
                p.id == cloud.cloud_id
                    && !matches!(runpod::plan::status_word(p.status), "terminated" | "exited")
            }))
        }
        ProviderKind::Local => Ok(false),
    }
}

/// Where a gang's nodes meet (`MASTER_ADDR`, `MASTER_PORT`): a local gang on loopback at
/// a port free here now; an EC2 gang at node 0's private address, a RunPod one at node 0's
/// address on its cluster's network, both at torch's port.
pub(super) async fn gang_master(
    d: &Arc<Daemon>,
    node0: &InstanceName,
) -> anyhow::Result<protocol::launch::Master> {
    let row =
        d.db.instance(node0)?
            .ok_or_else(|| anyhow::anyhow!("no instance {node0}"))?;
    match row.provider {
        ProviderKind::Local => {
            let probe = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| {
                anyhow::anyhow!("finding a free port for the gang's rendezvous: {e}")
            })?;
            Ok(protocol::launch::Master {
                addr: "127.0.0.1".into(),
                port: probe.local_addr()?.port(),
            })
        }
        ProviderKind::Ec2 => {
            let cloud =
                d.db.cloud(node0)?
                    .ok_or_else(|| anyhow::anyhow!("{node0} has no cloud record"))?;
            let ec2 = ec2_client(d)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            let addr = ec2
                .instance(&cloud.cloud_id)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?
                .and_then(|i| i.private_ip)
                .ok_or_else(|| {
                    anyhow::anyhow!("EC2 gives {node0} ({}) no private address", cloud.cloud_id)
                })?;
            Ok(protocol::launch::Master {
                addr,
                port: GANG_PORT,
            })
        }
        ProviderKind::Runpod => {
            let cloud =
                d.db.cloud(node0)?
                    .ok_or_else(|| anyhow::anyhow!("{node0} has no cloud record"))?;
            let pod = runpod_client(d)
                .map_err(|e| anyhow::anyhow!("{}", e.message))?
                .pod(&cloud.cloud_id)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            let addr = pod
                .and_then(|p| p.cluster)
                .and_then(|c| c.ip)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "RunPod gives {node0} ({}) no address on its cluster's network",
                        cloud.cloud_id
                    )
                })?;
            Ok(protocol::launch::Master {
                addr,
                port: GANG_PORT,
            })
        }
    }
}

/// Where node 0 of a cloud gang listens for the others: torch's own default port, open
/// to the gang's members by its security group (EC2), on its cluster's network (RunPod).
const GANG_PORT: u16 = 29500;

/// How long an instance of `provider` gets from launch to its agent's enrollment.
fn enroll_timeout(d: &Daemon, provider: ProviderKind) -> Duration {
    match provider {
        ProviderKind::Local => CONNECT_TIMEOUT,
        ProviderKind::Ec2 => Duration::from_secs(d.config.ec2.enroll_timeout_secs),
        ProviderKind::Runpod => Duration::from_secs(d.config.runpod.enroll_timeout_secs),
    }
}

/// Starts a local agent with `config` and reaps it when it exits.
fn start_local(
    d: &Arc<Daemon>,
    name: &InstanceName,
    config: &AgentConfigFile,
    agent_bin: &std::path::Path,
) -> Result<(), UserError> {
    let child = local::launch(
        &d.home,
        local::LaunchSpec {
            name,
            config,
            agent_bin,
        },
    )
    .map_err(internal)?;
    reap_local(d, name, child)
}

/// Brings back the agent of an instance a run needs again (a gang starting again): a local
/// agent whose process died is started again with its config and identity. A cloud
/// instance's agent is its init system's to restart; the caller waits for it to connect.
pub(super) async fn revive(d: &Arc<Daemon>, name: &InstanceName) -> Result<(), UserError> {
    let row =
        d.db.instance(name)
            .map_err(internal)?
            .ok_or_else(|| UserError::new(ErrorCode::NotFound, format!("no instance {name}")))?;
    if row.state == InstanceState::Terminated {
        return Err(UserError::new(
            ErrorCode::Conflict,
            format!("{name} is terminated"),
        ));
    }
    match row.provider {
        ProviderKind::Local => {
            let alive = row
                .pid
                .is_some_and(|pid| local::is_agent_alive(&d.home, name, pid));
            if alive || d.connected(name) {
                return Ok(());
            }
            tracing::info!("starting the agent of {name} again: its process died");
            let agent_bin = local::agent_binary(&d.config.local)?;
            let child = local::spawn(&d.home, name, &agent_bin).map_err(internal)?;
            reap_local(d, name, child)
        }
        ProviderKind::Ec2 | ProviderKind::Runpod => Ok(()),
    }
}

/// Records a local agent's pid and reaps the process when it exits.
fn reap_local(
    d: &Arc<Daemon>,
    name: &InstanceName,
    mut child: tokio::process::Child,
) -> Result<(), UserError> {
    let pid = child.id().unwrap_or(0);
    d.db.set_instance_pid(name, pid).map_err(internal)?;
    // Reap the agent when it exits, as long as this daemon lives. Untracked: the agent
    // outlives the daemon, and shutdown must not wait for it.
    let (reaped, d2) = (name.clone(), d.clone());
    tokio::spawn(async move {
        let status = child.wait().await;
        tracing::info!("local agent {reaped} exited: {status:?}");
        // Its connection is gone with it: closed now rather than when QUIC's idle timeout
        // finds out, so what the agent held is seen to be lost at once. Unless the
        // instance has another agent process by now.
        let current = d2.db.instance(&reaped).ok().flatten().and_then(|r| r.pid);
        if current == Some(pid)
            && let Some(link) = d2.agent(&reaped)
        {
            link.conn.close(0u32.into(), b"the agent process exited");
        }
    });
    Ok(())
}

/// Waits for the instance to come up and its agent to enroll; an instance that does not
/// is terminated, unless it was stopped or terminated through runctl meanwhile.
async fn come_up_or_go(
    d: &Arc<Daemon>,
    name: &InstanceName,
    started: Instant,
    progress: &Progress,
) -> Result<(), UserError> {
    let Err(e) = wait_until_enrolled(d, name, started, progress).await else {
        return Ok(());
    };
    // A cloud instance is named with its provider's id too, as its console shows it.
    let (label, id_first) = match d.db.cloud(name) {
        Ok(Some(cloud)) => (
            format!("{name} ({})", cloud.cloud_id),
            format!("{} ({name})", cloud.cloud_id),
        ),
        _ => (name.to_string(), name.to_string()),
    };
    // Stopped or terminated through runctl meanwhile: the user's call, not a failure.
    if let Ok(Some(row)) = d.db.instance(name)
        && matches!(
            row.state,
            InstanceState::Stopped | InstanceState::Terminated
        )
    {
        tracing::info!(
            "{label} was {} meanwhile: no longer waiting for its agent",
            crate::report::instance_word(row.state)
        );
        return Err(e);
    }
    say(
        progress,
        format!("terminating {id_first}: it did not come up"),
    );
    tracing::warn!("terminating {label}: {}", e.message);
    if let Err(t) = terminate_now(d, name).await {
        tracing::error!(
            "terminating {name} after a failed launch failed: {}",
            t.message
        );
        return Err(e.resolve(format!(
            "it may still be running: terminate it with runctl-controller terminate {name}"
        )));
    }
    Err(e)
}

/// At start: each instance a previous daemon was launching when it died goes on as its
/// launch would have, or is terminated (`plan::interrupted_launch`). Without this a
/// daemon killed mid-launch left an instance made for a run that never started running,
/// and billed, with nothing watching it.
pub(super) fn recover_launches(d: &Arc<Daemon>) {
    let rows = match d.db.instances() {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!("reading the instances at start: {e:#}");
            return;
        }
    };
    for row in rows
        .into_iter()
        .filter(|r| r.state == InstanceState::Launching)
    {
        let recorded = matches!(d.db.cloud(&row.name), Ok(Some(_)));
        // Unknown is taken as enrolled: nothing is terminated on a guess.
        let enrolled = d.db.has_enrolled(&row.name).unwrap_or(true);
        let launched_for = match &row.for_run {
            None => plan::LaunchedFor::User,
            Some(run) => match d.db.run(run) {
                Ok(None) => plan::LaunchedFor::UnstartedRun,
                Ok(Some(r)) if r.started_ms.is_none() => plan::LaunchedFor::UnstartedRun,
                _ => plan::LaunchedFor::Run,
            },
        };
        let choice = plan::interrupted_launch(
            row.provider.capabilities().remote,
            recorded,
            enrolled,
            launched_for,
        );
        let d2 = d.clone();
        d.tasks
            .spawn(async move { recover_launch(&d2, row, choice).await });
    }
}

async fn recover_launch(d: &Arc<Daemon>, row: InstanceRow, choice: plan::InterruptedLaunch) {
    let name = &row.name;
    match choice {
        plan::InterruptedLaunch::Leave => {}
        plan::InterruptedLaunch::Watch => {
            tracing::info!("{name} was launching when the daemon stopped: waiting for its agent");
            let age = Duration::from_millis(now_ms().saturating_sub(row.created_ms));
            let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            let (quiet, _) = tokio::sync::mpsc::unbounded_channel();
            tokio::select! {
                () = d.shutdown.cancelled() => {}
                _ = come_up_or_go(d, name, started, &quiet) => {}
            }
        }
        plan::InterruptedLaunch::Terminate(why) => {
            tracing::warn!("terminating {name}: {why}");
            if let Err(e) = terminate_now(d, name).await {
                tracing::error!(
                    "terminating {name} failed: {}; terminate it with runctl-controller terminate {name}",
                    e.message
                );
            }
        }
        plan::InterruptedLaunch::FindAndTerminate(why) => {
            tracing::warn!("terminating {name} wherever its provider made it: {why}");
            match terminate_unrecorded(d, &row).await {
                Ok(ids) => {
                    tracing::info!("{name}: terminated {ids:?} found by name");
                    record_terminated(d, name, now_ms());
                }
                Err(e) => tracing::error!(
                    "finding {name} at its provider failed: {}; look for it by its name (runctl-{name}) in the console",
                    e.message
                ),
            }
        }
    }
}

/// Terminates whatever the provider holds under instance `row`'s name (its `runctl:instance`
/// tag on EC2, its pod name on RunPod); returns the provider's ids of what it ended.
async fn terminate_unrecorded(
    d: &Arc<Daemon>,
    row: &InstanceRow,
) -> Result<Vec<String>, UserError> {
    let mut ended = Vec::new();
    match row.provider {
        ProviderKind::Local => {}
        ProviderKind::Ec2 => {
            let ec2 = ec2_client(d).await?;
            for i in ec2.instances(&[]).await? {
                let live = !matches!(i.state.as_str(), "shutting-down" | "terminated");
                if live && i.name.as_deref() == Some(row.name.as_str()) {
                    ec2.terminate(&i.id).await?;
                    ended.push(i.id);
                }
            }
        }
        ProviderKind::Runpod => {
            let api = runpod_client(d)?;
            let pod_name = runpod::launch::pod_name(&row.name);
            for pod in api.pods().await?.into_iter().filter(|p| p.name == pod_name) {
                match api.action(&pod.id, PodAction::Terminate).await {
                    Err(e) if e.code == ErrorCode::NotFound => {}
                    other => other?,
                }
                ended.push(pod.id);
            }
        }
    }
    Ok(ended)
}

/// Waits for the provider to say the instance runs, then for its agent; says each phase.
async fn wait_until_enrolled(
    d: &Arc<Daemon>,
    name: &InstanceName,
    started: Instant,
    progress: &Progress,
) -> Result<(), UserError> {
    let row =
        d.db.instance(name)
            .map_err(internal)?
            .ok_or_else(|| internal(anyhow::anyhow!("instance {name} vanished")))?;
    let timeout = enroll_timeout(d, row.provider);
    if row.provider == ProviderKind::Local {
        d.wait_for_agent(name, timeout, row.pid).await?;
        return Ok(());
    }
    let cloud =
        d.db.cloud(name)
            .map_err(internal)?
            .ok_or_else(|| internal(anyhow::anyhow!("{name} has no cloud record")))?;
    let id = &cloud.cloud_id;
    let (endpoint, boot_log) = match row.provider {
        ProviderKind::Local => unreachable_local(name)?,
        ProviderKind::Ec2 => {
            let ec2 = ec2_client(d).await?;
            ec2::launch::wait_running(ec2, id, started, timeout, progress).await?;
            (
                d.config.ec2.controller_endpoint.clone(),
                ec2::launch::boot_log_hint(id, &ec2.region),
            )
        }
        ProviderKind::Runpod => {
            let api = runpod_client(d)?;
            runpod::launch::wait_running(&api, id, started, timeout, progress).await?;
            (
                d.config.runpod.controller_endpoint.clone(),
                runpod::launch::boot_log_hint(id),
            )
        }
    };
    let left = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_secs(30));
    d.wait_for_agent(name, left, None).await.map_err(|e| {
        UserError::new(
            ErrorCode::Agent,
            format!(
                "the agent of {name} ({id}) did not enroll within {timeout:?}: {}",
                e.message
            ),
        )
        .resolve(format!(
            "check that {} is reachable from the instance (UDP or TCP), or that the relay is registered (runctl-controller status)",
            endpoint
                .as_deref()
                .or(d.config.daemon.relay.as_deref())
                .unwrap_or("the controller_endpoint")
        ))
        .resolve(boot_log)
    })?;
    say(
        progress,
        format!(
            "  {:<16}{:>7}",
            "agent enrolled",
            seconds(started.elapsed())
        ),
    );
    Ok(())
}

/// A local instance where a cloud one was expected (the callers have returned already).
fn unreachable_local(name: &InstanceName) -> Result<(Option<String>, String), UserError> {
    Err(internal(anyhow::anyhow!(
        "{name} is a local instance, not a cloud one"
    )))
}

/// Terminates an instance: the agent stops its runs and flushes their events (and
/// checkpoints), its certificate is revoked, and its process (or cloud instance) is gone
/// when this returns. Fails only when the cloud refuses; the record then stays live.
pub(super) async fn terminate_now(d: &Arc<Daemon>, name: &InstanceName) -> Result<(), UserError> {
    if let Some(cluster) = d.db.cloud(name).map_err(internal)?.and_then(|c| c.cluster) {
        return terminate_cluster(d, &cluster).await;
    }
    shut_down_agent(d, name).await;
    let now = now_ms();
    cut_off(d, name, now);
    let row = d.db.instance(name).map_err(internal)?;
    match row.as_ref().map(|r| r.provider) {
        Some(ProviderKind::Local) => {
            if let Some(pid) = row.and_then(|r| r.pid) {
                local::kill_agent(&d.home, name, pid);
            }
        }
        Some(ProviderKind::Ec2) => {
            // Billed time ends in `record_terminated`.
            if let Some(cloud) = d.db.cloud(name).map_err(internal)? {
                ec2_client(d).await?.terminate(&cloud.cloud_id).await?;
            }
        }
        Some(ProviderKind::Runpod) => {
            if let Some(cloud) = d.db.cloud(name).map_err(internal)? {
                match runpod_client(d)?
                    .action(&cloud.cloud_id, PodAction::Terminate)
                    .await
                {
                    // Already gone (terminated from inside, or in the console).
                    Err(e) if e.code == ErrorCode::NotFound => {}
                    other => other?,
                }
            }
        }
        None => {}
    }
    record_terminated(d, name, now);
    Ok(())
}

/// Revokes `name`'s certificate and closes its agent's connection: nothing of it reaches
/// the daemon again.
fn cut_off(d: &Daemon, name: &InstanceName, now: u64) {
    if let Err(e) = d.db.revoke_instance(name, now) {
        tracing::error!("revoking {name}'s certificate failed: {e:#}");
    }
    if let Some(link) = d.agent(name) {
        link.conn.close(0u32.into(), b"instance terminated");
    }
}

/// The live instances that end with `name` (itself included): every pod of its RunPod
/// cluster, which RunPod ends only together; else `name` alone.
pub(super) fn ended_with(d: &Daemon, name: &InstanceName) -> Result<Vec<InstanceName>, UserError> {
    match d.db.cloud(name).map_err(internal)?.and_then(|c| c.cluster) {
        Some(cluster) => d.db.live_cluster_members(&cluster).map_err(internal),
        None => Ok(vec![name.clone()]),
    }
}

/// Terminates every pod of RunPod cluster `cluster` at once, by deleting the cluster (the
/// only way RunPod ends a cluster's pods): each agent first stops its runs and flushes,
/// as `terminate_now` does for one instance. Once ended, a member's termination finds
/// nothing left to do.
async fn terminate_cluster(d: &Arc<Daemon>, cluster: &str) -> Result<(), UserError> {
    let _one_at_a_time = d.clusters.lock().await;
    let members = d.db.live_cluster_members(cluster).map_err(internal)?;
    if members.is_empty() {
        return Ok(());
    }
    let mut flushes = tokio::task::JoinSet::new();
    for member in &members {
        let (d, member) = (d.clone(), member.clone());
        flushes.spawn(async move { shut_down_agent(&d, &member).await });
    }
    while flushes.join_next().await.is_some() {}
    let now = now_ms();
    for member in &members {
        cut_off(d, member, now);
    }
    runpod_client(d)?.delete_cluster(cluster).await?;
    tracing::info!(
        "deleted RunPod cluster {cluster}, and with it {}",
        members
            .iter()
            .map(InstanceName::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    );
    for member in &members {
        record_terminated(d, member, now);
    }
    Ok(())
}

/// Asks `name`'s agent, if connected, to stop its runs (each with its own grace period)
/// and push their last events and checkpoints, and waits until it has disconnected (or,
/// for a local instance, its process is gone), within a bound.
pub(super) async fn shut_down_agent(d: &Daemon, name: &InstanceName) {
    let Some(link) = d.agent(name) else { return };
    let _ = link
        .tx
        .send(ControllerMsg::Shutdown { grace_ms: None })
        .await;
    let pid = d.db.instance(name).ok().flatten().and_then(|row| row.pid);
    let gone = async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if pid.is_some_and(|pid| !local::is_agent_alive(&d.home, name, pid)) {
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(SHUTDOWN_BOUND, link.conn.closed()) => {}
        () = gone => {}
    }
}

/// Records `name` as gone (by `terminate`, or found terminated in the cloud): its
/// certificate revoked, its runs that never reported an end failed, their trees forgotten.
pub(super) fn record_terminated(d: &Daemon, name: &InstanceName, now: u64) {
    if let Err(e) = d.db.revoke_instance(name, now) {
        tracing::error!("revoking {name}'s certificate failed: {e:#}");
    }
    if let Err(e) = d.db.set_cloud_running(name, false, now) {
        tracing::error!("recording {name}'s billed time failed: {e:#}");
    }
    if let Err(e) =
        d.db.set_instance_state(name, InstanceState::Terminated, now)
    {
        tracing::error!("recording {name} as terminated failed: {e:#}");
    }
    if let Some(link) = d.agent(name) {
        link.conn.close(0u32.into(), b"instance terminated");
    }
    // Runs that never reported their end are over with their instance, and their trees
    // are gone with it.
    if let Ok(rows) = d.db.runs_on(name) {
        for row in &rows {
            let node = d.db.node_of(row, name).ok().flatten().unwrap_or(0);
            let key = sync::TreeKey {
                run: row.id.clone(),
                node,
            };
            sync::forget_tree(d, &key);
        }
        let price =
            d.db.cloud(name)
                .ok()
                .flatten()
                .and_then(|c| c.price_per_hour);
        for row in rows.into_iter().filter(|r| !r.state.is_terminal()) {
            // A spot run being relaunched goes on on its replacement.
            if d.db.relaunch_pending(&row.id).unwrap_or(false) {
                continue;
            }
            let caps = d.db.run_budget(&row.id).ok().flatten();
            let why = plan::gone_with_instance(row.id.as_str(), caps.as_ref(), price, now);
            let _ =
                d.db.set_run_state(&row.id, RunState::Failed, now, Some(&why));
            d.bump_run(&row.id);
        }
    }
    d.bump_agents();
}

/// Checks that `name` can be stopped (`start` false) or started now (`plan::power`).
pub(super) fn check_power(d: &Daemon, name: &InstanceName, start: bool) -> Result<(), UserError> {
    let row =
        d.db.instance(name)
            .map_err(internal)?
            .ok_or_else(|| UserError::new(ErrorCode::NotFound, format!("no instance {name}")))?;
    let cloud = d.db.cloud(name).map_err(internal)?;
    if let Some(cluster) = cloud.as_ref().and_then(|c| c.cluster.as_deref()) {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("{name} is a pod of RunPod cluster {cluster}, and RunPod cannot stop or start a cluster's pods"),
        )
        .resolve(format!("end it with its whole cluster: runctl-controller terminate {name}")));
    }
    plan::power(
        name.as_str(),
        row.provider.an_instance(),
        row.provider.capabilities().stop_start && cloud.is_some(),
        cloud.as_ref().is_some_and(|c| c.spot),
        row.state == InstanceState::Stopped,
        start,
    )
}

/// Stops (`start` false) or starts an instance through its provider, keeping its billed
/// time.
pub(super) async fn power(d: &Daemon, name: &InstanceName, start: bool) -> Result<(), UserError> {
    check_power(d, name, start)?;
    let row =
        d.db.instance(name)
            .map_err(internal)?
            .ok_or_else(|| UserError::new(ErrorCode::NotFound, format!("no instance {name}")))?;
    let cloud =
        d.db.cloud(name)
            .map_err(internal)?
            .ok_or_else(|| internal(anyhow::anyhow!("{name} has no cloud record")))?;
    let after = if start {
        InstanceState::Launching
    } else {
        InstanceState::Stopped
    };
    // Recorded first: a launch's enrollment watch must see a stop as the user's doing.
    d.db.set_instance_state(name, after, now_ms())
        .map_err(internal)?;
    let call = match row.provider {
        ProviderKind::Ec2 => {
            let ec2 = ec2_client(d).await?;
            if start {
                ec2.start(&cloud.cloud_id).await
            } else {
                ec2.stop(&cloud.cloud_id).await
            }
        }
        ProviderKind::Runpod => {
            let action = if start {
                PodAction::Start
            } else {
                PodAction::Stop
            };
            match runpod_client(d) {
                Ok(api) => api.action(&cloud.cloud_id, action).await,
                Err(e) => Err(e),
            }
        }
        // `check_power` has refused it; said again rather than assumed.
        ProviderKind::Local => Err(UserError::new(
            ErrorCode::Conflict,
            format!("{name} is a local instance: it cannot be stopped or started"),
        )),
    };
    if let Err(e) = call {
        let _ = d.db.set_instance_state(name, row.state, now_ms());
        return Err(e);
    }
    d.db.set_cloud_running(name, start, now_ms())
        .map_err(internal)
}

/// Brings cloud records up to date with the cloud (instances gone by spot reclaim,
/// power-off or the console are marked terminated, stopped ones stopped) and returns
/// runctl-tagged instances this controller does not know. Without live EC2 records or
/// `[ec2]` settings, EC2 is not asked.
pub(super) async fn refresh(
    d: &Arc<Daemon>,
) -> Result<Vec<crate::ipc::ForeignInstance>, UserError> {
    let mut foreign = refresh_ec2(d).await?;
    foreign.extend(refresh_runpod(d).await?);
    Ok(foreign)
}

/// RunPod's part of `refresh`: asked only while there are live pod records.
async fn refresh_runpod(d: &Arc<Daemon>) -> Result<Vec<crate::ipc::ForeignInstance>, UserError> {
    let rows = d.db.instances().map_err(internal)?;
    let live: Vec<&InstanceRow> = rows
        .iter()
        .filter(|r| r.provider == ProviderKind::Runpod && r.state != InstanceState::Terminated)
        .collect();
    if live.is_empty() {
        return Ok(Vec::new());
    }
    let api = runpod_client(d)?;
    let pods = tokio::time::timeout(Duration::from_secs(15), api.pods())
        .await
        .map_err(|_| UserError::new(ErrorCode::Internal, "RunPod did not answer within 15 s"))??;
    let now = now_ms();
    let records = d.db.clouds().map_err(internal)?;
    let live: Vec<(runpod::plan::Record<'_>, bool)> = live
        .iter()
        .filter_map(|row| {
            let record = records.iter().find(|c| c.name == row.name)?;
            Some((
                runpod::plan::Record {
                    name: &row.name,
                    pod_id: &record.cloud_id,
                },
                row.state == InstanceState::Stopped,
            ))
        })
        .collect();
    let known: Vec<&str> = records.iter().map(|r| r.cloud_id.as_str()).collect();
    let (changes, foreign) = runpod::plan::reconcile(&live, &known, &pods);
    for (name, observed) in changes {
        match observed {
            runpod::plan::Observed::Terminated => record_terminated(d, name, now),
            runpod::plan::Observed::Stopped => {
                let _ = d.db.set_cloud_running(name, false, now);
                let _ = d.db.set_instance_state(name, InstanceState::Stopped, now);
            }
            runpod::plan::Observed::Running => {
                let _ = d.db.set_cloud_running(name, true, now);
                let _ = d.db.set_instance_state(name, InstanceState::Running, now);
            }
        }
    }
    Ok(foreign
        .into_iter()
        .map(|p| crate::ipc::ForeignInstance {
            cloud_id: p.id.clone(),
            name: Some(p.name.clone()),
            state: runpod::plan::status_word(p.status).to_owned(),
            instance_type: p
                .gpu
                .as_ref()
                .map(|g| format!("{} x{}", g.id, g.count))
                .unwrap_or_default(),
        })
        .collect())
}

/// EC2's part of `refresh`.
async fn refresh_ec2(d: &Arc<Daemon>) -> Result<Vec<crate::ipc::ForeignInstance>, UserError> {
    let rows = d.db.instances().map_err(internal)?;
    let live: Vec<&InstanceRow> = rows
        .iter()
        .filter(|r| r.provider == ProviderKind::Ec2 && r.state != InstanceState::Terminated)
        .collect();
    if live.is_empty() && d.config.ec2.controller_endpoint.is_none() {
        return Ok(Vec::new());
    }
    let ec2 = ec2_client(d).await?;
    let listed = tokio::time::timeout(Duration::from_secs(15), ec2.instances(&[]))
        .await
        .map_err(|_| UserError::new(ErrorCode::Internal, "EC2 did not answer within 15 s"))??;
    let now = now_ms();
    let records = d.db.clouds().map_err(internal)?;
    let live: Vec<ec2::plan::Record<'_>> = live
        .iter()
        .filter_map(|row| {
            let record = records.iter().find(|c| c.name == row.name)?;
            Some(ec2::plan::Record {
                name: &row.name,
                cloud_id: &record.cloud_id,
                created_ms: row.created_ms,
            })
        })
        .collect();
    let known: Vec<&str> = records.iter().map(|r| r.cloud_id.as_str()).collect();
    let (changes, foreign) = ec2::plan::reconcile(&live, &known, &listed, now);
    for (name, observed) in changes {
        let _ = d.db.set_cloud_running(name, false, now);
        match observed {
            ec2::plan::Observed::Terminated => {
                let _ = d.db.revoke_instance(name, now);
                let _ =
                    d.db.set_instance_state(name, InstanceState::Terminated, now);
            }
            ec2::plan::Observed::Stopped => {
                let _ = d.db.set_instance_state(name, InstanceState::Stopped, now);
            }
        }
    }
    Ok(foreign
        .into_iter()
        .map(|c| crate::ipc::ForeignInstance {
            cloud_id: c.id.clone(),
            name: c.name.clone(),
            state: c.state.clone(),
            instance_type: c.instance_type.clone(),
        })
        .collect())
}
