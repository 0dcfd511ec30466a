//! Runs as the daemon drives them: starting a run (sync the project to the run's tree,
//! start the spec on a stream of its own, then follow the run's events), what its end
//! does to its instance (through `instances`), and stopping runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use protocol::budget::Budget;
use protocol::framed::{read_frame, write_frame};
use protocol::launch::Launch;
use protocol::{
    AgentMsg, BulkOpen, ControllerMsg, Feature, InstanceName, RunId, RunSpec, RunStart, Secret,
};

use super::{Daemon, credentials, instances, now_ms, sync};
use crate::db::{InstanceState, RunBudget, RunState, Source};
use crate::error::{ErrorCode, UserError};
use crate::plan;

/// How long a run's agent gets to (re)connect before its start fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts `run` on its instances (one, or a gang's, node 0's first). Failures end the
/// run as failed with the reason.
pub(super) async fn start(d: Arc<Daemon>, run: RunId, start: Start) {
    let nodes = start.nodes.clone();
    if let Err(e) = try_start(&d, &run, start).await {
        fail(&d, &run, &nodes, &format!("{e:#}")).await;
    }
}

/// Ends a run that could not be started (or started again) as failed with `message`;
/// nodes of a gang that did start are not left running on their own.
async fn fail(d: &Arc<Daemon>, run: &RunId, nodes: &[InstanceName], message: &str) {
    tracing::warn!("run {run} failed to start: {message}");
    let _ =
        d.db.set_run_state(run, RunState::Failed, now_ms(), Some(message));
    d.bump_run(run);
    if nodes.len() > 1 {
        stop_nodes(d, run, nodes, None).await;
    }
    on_run_ended(d, run);
}

/// `caps` as of now on `instance`, at its price. A cost cap needs a price: `run` checks
/// before launching, and this is the last word (a spot launch fell back to on-demand at a
/// price not known).
pub(super) fn budget_now(
    d: &Daemon,
    instance: &InstanceName,
    caps: &RunBudget,
) -> anyhow::Result<Budget> {
    let price = d.db.cloud(instance)?.and_then(|c| c.price_per_hour);
    if caps.max_cost.is_some() && price.is_none() {
        anyhow::bail!(
            "--max-cost needs {instance}'s price per hour, and it is not known (cap the run's time with --max-hours instead)"
        );
    }
    Ok(plan::budget(caps, price, now_ms()))
}

/// What starting a run takes.
pub(super) struct Start {
    /// Its instances: one, or a gang's, node 0's first.
    pub nodes: Vec<InstanceName>,
    pub root: PathBuf,
    pub spec: RunSpec,
    pub secrets: Vec<Secret>,
    pub launch: Option<Launch>,
    /// Every node of a gang pushes its checkpoints (`--checkpoints-from all`), not only
    /// node 0.
    pub all_checkpoints: bool,
    /// What the run does when its spot instance is taken back.
    pub on_interrupt: crate::relaunch::OnInterrupt,
    /// How its instance was launched (to launch a replacement), if it was for the run.
    pub launch_options: Option<crate::provider::LaunchOptions>,
}

async fn try_start(d: &Arc<Daemon>, run: &RunId, start: Start) -> anyhow::Result<()> {
    let Start {
        nodes,
        root,
        spec,
        secrets,
        launch,
        all_checkpoints,
        on_interrupt,
        launch_options,
    } = start;
    let nodes = nodes.as_slice();
    d.db.set_run_state(run, RunState::Syncing, now_ms(), None)?;
    d.bump_run(run);
    let caps = d.db.run_budget(run)?;
    let mut links = Vec::with_capacity(nodes.len());
    for (node, instance) in nodes.iter().enumerate() {
        let pid = d.db.instance(instance)?.and_then(|row| row.pid);
        let link = d.wait_for_agent(instance, CONNECT_TIMEOUT, pid).await?;
        check_features(&link, instance, &secrets, caps.is_some(), launch.is_some())?;
        links.push((node as u32, link));
    }
    let params = sync::Params {
        run: run.clone(),
        node: 0,
        root,
        dry_run: false,
        restart: crate::ipc::Restart::Never,
        create: true,
    };
    let report = match links.as_slice() {
        [(_, link)] => sync::sync(d, link, params, |_| {}).await,
        _ => sync::sync_nodes(d, &links, params)
            .await
            .map(|reports| reports[0].clone()),
    }
    .map_err(|e| anyhow::anyhow!("syncing the project failed: {e}"))?;
    tracing::info!(%run, nodes = links.len(), files = report.summary.written, bytes = report.summary.stream_bytes, elapsed_ms = report.elapsed_ms, "project synced");
    // For `run` to tell: what the first sync sent, and what the instance already had.
    d.db.set_setting(&first_sync_key(run), &serde_json::to_string(&report)?)?;
    for ((_, link), instance) in links.iter().zip(nodes) {
        hand_credentials(d, link, instance, &spec).await?;
    }
    let gang = Gang {
        spec,
        secrets,
        launch,
        all_checkpoints,
    };
    if nodes.len() > 1 || on_interrupt != crate::relaunch::OnInterrupt::End {
        // Kept to start the gang again or relaunch the run: what it was started with
        // (secrets in memory only).
        let stored = crate::db::StoredStart {
            spec: gang.spec.clone(),
            launch: gang.launch.clone(),
            all_checkpoints,
            secret_names: gang.secrets.iter().map(|s| s.name.clone()).collect(),
            on_interrupt,
            launch_options,
        };
        d.db.set_run_start(run, &stored, now_ms())?;
        if !gang.secrets.is_empty() {
            d.secrets
                .lock()
                .expect("secrets lock")
                .insert(run.clone(), gang.secrets.clone());
        }
    }
    let opens = gang
        .opens(d, &links, nodes, caps.as_ref(), start_message)
        .await?;
    start_all(d, run, &links, nodes, opens, 0).await?;
    if d.pending_stops
        .lock()
        .expect("pending stops lock")
        .remove(run)
    {
        stop_nodes(d, run, nodes, None).await;
    }
    Ok(())
}

/// What a run's agent must be able to do for it: keep secrets, hold a budget, launch.
fn check_features(
    link: &super::AgentLink,
    instance: &InstanceName,
    secrets: &[Secret],
    budget: bool,
    launch: bool,
) -> anyhow::Result<()> {
    if !secrets.is_empty() {
        // Before the sync: an agent that cannot keep them costs nothing more.
        link.hello.require(Feature::Secrets).map_err(|e| {
            anyhow::anyhow!(
                "{instance}'s agent cannot take --secret: {} (or drop --secret)",
                e.message
            )
        })?;
    }
    if budget {
        link.hello.require(Feature::Budget).map_err(|e| {
            anyhow::anyhow!(
                "{instance}'s agent cannot hold a budget: {} (or drop --max-cost and --max-hours)",
                e.message
            )
        })?;
    }
    if launch {
        link.hello.require(Feature::Launcher).map_err(|e| {
            anyhow::anyhow!(
                "{instance}'s agent cannot launch with --launcher: {} (or drop --launcher)",
                e.message
            )
        })?;
    }
    Ok(())
}

/// Hands the agent its store credentials when it has none of its own and the run uses the
/// store: its store requests wait until credentials naming the run arrive.
async fn hand_credentials(
    d: &Arc<Daemon>,
    link: &super::AgentLink,
    instance: &InstanceName,
    spec: &RunSpec,
) -> anyhow::Result<()> {
    let (Some(_), Some(ask)) = (&spec.storage, &link.credentials) else {
        return Ok(());
    };
    credentials::remember(d, spec).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    let gone =
        || anyhow::anyhow!("the agent disconnected before its store credentials were handed over");
    ask.send(reply).await.map_err(|_| gone())?;
    answer
        .await
        .map_err(|_| gone())?
        .map_err(|e| anyhow::anyhow!("handing {instance} its store credentials: {e}"))
}

/// What every node of a run is started with, before each node's part of it.
struct Gang {
    spec: RunSpec,
    secrets: Vec<Secret>,
    launch: Option<Launch>,
    all_checkpoints: bool,
}

impl Gang {
    /// Each node's start, as `open` wraps it: its spec (`gang::node_spec` for a gang), its
    /// budget as of now (what the launch and the sync cost is spent, and the agent counts
    /// on it), its launch meeting at node 0.
    async fn opens(
        &self,
        d: &Arc<Daemon>,
        links: &[(u32, super::AgentLink)],
        nodes: &[InstanceName],
        caps: Option<&RunBudget>,
        open: impl Fn(RunStart) -> BulkOpen,
    ) -> anyhow::Result<Vec<BulkOpen>> {
        // A gang meets at node 0; a run of one finds its own port.
        let master = match nodes {
            [_] | [] => None,
            [node0, ..] => Some(instances::gang_master(d, node0).await?),
        };
        let mut opens = Vec::with_capacity(nodes.len());
        for ((node, _), instance) in links.iter().zip(nodes) {
            let budget = match caps {
                Some(caps) => Some(budget_now(d, instance, caps)?),
                None => None,
            };
            let spec = match nodes.len() {
                1 => self.spec.clone(),
                _ => crate::gang::node_spec(&self.spec, *node, self.all_checkpoints),
            };
            opens.push(open(RunStart {
                spec,
                secrets: self.secrets.clone(),
                budget,
                launch: self
                    .launch
                    .as_ref()
                    .map(|l| l.for_node(*node, master.clone())),
            }));
        }
        Ok(opens)
    }
}

/// Sends each node its start (`opens`, in node order) at once and follows its events (of
/// `incarnation`); the first failure, naming its node in a gang.
async fn start_all(
    d: &Arc<Daemon>,
    run: &RunId,
    links: &[(u32, super::AgentLink)],
    nodes: &[InstanceName],
    opens: Vec<BulkOpen>,
    incarnation: u32,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for (((node, link), instance), open) in links.iter().zip(nodes).zip(opens) {
        let (d, run, link, instance) = (d.clone(), run.clone(), link.clone(), instance.clone());
        let node = *node;
        tasks.spawn(async move {
            let source = Source { node, incarnation };
            let started = start_node(&d, &run, &link, &instance, source, open).await;
            (node, started)
        });
    }
    let mut failed = None;
    while let Some(joined) = tasks.join_next().await {
        let e = match joined {
            Ok((_, Ok(()))) => continue,
            Ok((_, Err(e))) if nodes.len() == 1 => e,
            Ok((node, Err(e))) => e.context(format!("starting node {node}")),
            Err(e) => anyhow::anyhow!("a start task: {e}"),
        };
        failed = failed.or(Some(e));
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The start message for what the run needs: the oldest one that carries it, so older
/// agents keep starting plain runs.
fn start_message(start: RunStart) -> BulkOpen {
    let RunStart {
        spec,
        secrets,
        budget,
        launch,
    } = start;
    match (budget, launch) {
        (None, None) if secrets.is_empty() => BulkOpen::StartRun(Box::new(spec)),
        (None, None) => BulkOpen::StartRunWithSecrets {
            spec: Box::new(spec),
            secrets,
        },
        (budget, launch) => BulkOpen::StartRunWith(Box::new(RunStart {
            spec,
            secrets,
            budget,
            launch,
        })),
    }
}

/// Starts a gang again after `restart`'s delay, every node at once (`BulkOpen::StartAgain`),
/// resuming from the run's newest checkpoint; a local node whose agent died gets its agent
/// started again first. A stop during the delay ends the run stopped instead.
pub(super) async fn restart_gang(d: Arc<Daemon>, run: RunId, restart: crate::gang::Restart) {
    d.restarting
        .lock()
        .expect("restarting lock")
        .insert(run.clone());
    tracing::info!(%run, attempt = restart.attempt, "the gang ended ({}); starting it again in {:?}", restart.cause, restart.delay);
    tokio::select! {
        _ = tokio::time::sleep(restart.delay) => {}
        // The next daemon finds the restart pending (`resume_restarts`).
        _ = d.shutdown.cancelled() => return,
    }
    if !d.restarting.lock().expect("restarting lock").remove(&run) {
        return;
    }
    let nodes = match d.db.run(&run) {
        Ok(Some(row)) => d.db.run_nodes(&row).unwrap_or_default(),
        _ => return,
    };
    if let Err(e) = try_restart(&d, &run, &nodes, &restart).await {
        let message = format!(
            "starting the gang again (attempt {}): {e:#}",
            restart.attempt
        );
        fail(&d, &run, &nodes, &message).await;
    }
}

async fn try_restart(
    d: &Arc<Daemon>,
    run: &RunId,
    nodes: &[InstanceName],
    restart: &crate::gang::Restart,
) -> anyhow::Result<()> {
    let stored =
        d.db.run_start(run)?
            .context("what its nodes were started with is not kept")?;
    let secrets = kept_secrets(d, run, &stored)?;
    let caps = d.db.run_budget(run)?;
    let mut links = Vec::with_capacity(nodes.len());
    for (node, instance) in nodes.iter().enumerate() {
        instances::revive(d, instance)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let pid = d.db.instance(instance)?.and_then(|row| row.pid);
        let link = d.wait_for_agent(instance, CONNECT_TIMEOUT, pid).await?;
        link.hello.require(Feature::StartAgain).map_err(|e| {
            anyhow::anyhow!("{instance}'s agent cannot start a run again: {}", e.message)
        })?;
        links.push((node as u32, link));
    }
    let mut spec = stored.spec;
    let dest = spec.checkpoints.as_ref().map(|c| c.dest.clone());
    spec.resume_from = crate::gang::resume_from(
        dest.as_deref(),
        d.db.pushed_checkpoint(run)?,
        spec.resume_from.as_deref(),
    );
    let gang = Gang {
        spec,
        secrets,
        launch: stored.launch,
        all_checkpoints: stored.all_checkpoints,
    };
    d.db.set_attempt_started(run, now_ms())?;
    let opens = gang
        .opens(d, &links, nodes, caps.as_ref(), |start| {
            BulkOpen::StartAgain {
                start: Box::new(start),
                attempt: restart.attempt,
                cause: restart.cause.clone(),
            }
        })
        .await?;
    start_all(d, run, &links, nodes, opens, 0).await
}

/// The secrets a run started again needs, from the daemon's memory: refused when the
/// daemon restarted since the run began (they are never written down).
fn kept_secrets(
    d: &Daemon,
    run: &RunId,
    stored: &crate::db::StoredStart,
) -> anyhow::Result<Vec<Secret>> {
    let secrets = d
        .secrets
        .lock()
        .expect("secrets lock")
        .get(run)
        .cloned()
        .unwrap_or_default();
    if secrets.len() < stored.secret_names.len() {
        anyhow::bail!(
            "its secrets ({}) were held in the daemon's memory only, and the daemon has restarted since the run began: run it again",
            stored.secret_names.join(", ")
        );
    }
    Ok(secrets)
}

/// At the daemon's start: gangs whose restart was decided but not made (the daemon
/// stopped during its delay) are started again now.
pub(super) fn resume_restarts(d: &Arc<Daemon>) {
    let pending = match d.db.pending_restarts() {
        Ok(pending) => pending,
        Err(e) => {
            tracing::error!("reading the gangs waiting to start again: {e:#}");
            return;
        }
    };
    for (run, attempt) in pending {
        let restart = crate::gang::Restart {
            attempt,
            delay: Duration::ZERO,
            cause: "the daemon restarted while the gang waited to start again".into(),
        };
        d.tasks.spawn(restart_gang(d.clone(), run, restart));
    }
}

/// Starts one node of the run on its agent and asks for its events.
async fn start_node(
    d: &Arc<Daemon>,
    run: &RunId,
    link: &super::AgentLink,
    instance: &InstanceName,
    source: Source,
    open: BulkOpen,
) -> anyhow::Result<()> {
    let node = source.node;
    let (mut send, mut recv) = link
        .conn
        .open_bi()
        .await
        .context("opening a stream to the agent")?;
    write_frame(&mut send, &open).await?;
    send.finish()?;
    let answer = tokio::time::timeout(
        Duration::from_secs(600),
        read_frame::<_, AgentMsg>(&mut recv),
    )
    .await
    .context("the agent did not confirm the start within 10 minutes")??;
    match answer {
        // Its events (setup steps, the process start) move its state from here on.
        Some(AgentMsg::RunStarted { result: Ok(()), .. }) => {
            tracing::info!(%run, node, "run started on {instance}")
        }
        // The agent recorded the failure in the run's log; the replay below brings it here.
        Some(AgentMsg::RunStarted { result: Err(e), .. }) => {
            tracing::info!(%run, node, "agent could not start the run: {}", e.message)
        }
        other => anyhow::bail!("the agent answered the start with {other:?}"),
    }
    // If the connection dropped meanwhile, the agent's next session asks for this run's
    // events anyway: it reports the run in `Ready`.
    let replay = ControllerMsg::Replay {
        run: run.clone(),
        after_seq: d.db.last_seq(run, source)?,
    };
    if link.tx.send(replay).await.is_err() {
        tracing::info!(%run, node, "the agent disconnected right after the start; its reconnect catches up");
    }
    Ok(())
}

/// Asks the agents of `nodes` to stop the run (each with `grace`, or the run's own); one
/// out of reach gets the stop when it is back.
pub(super) async fn stop_nodes(
    d: &Arc<Daemon>,
    run: &RunId,
    nodes: &[InstanceName],
    grace: Option<Duration>,
) {
    for instance in nodes {
        let stop = ControllerMsg::StopRun {
            run: run.clone(),
            grace_ms: grace.map(|g| g.as_millis() as u64),
        };
        let sent = match d.agent(instance) {
            Some(link) => link.tx.send(stop).await.is_ok(),
            None => false,
        };
        if !sent {
            // Delivered when the agent is back (see `reconcile`).
            d.pending_stops
                .lock()
                .expect("pending stops lock")
                .insert(run.clone());
        }
    }
}

/// The settings key holding a run's first sync report (JSON).
pub(super) fn first_sync_key(run: &RunId) -> String {
    format!("first_sync:{run}")
}

/// The settings key that marks a run whose cloud instance the daemon stops at its end.
pub(super) fn stop_at_end_key(run: &RunId) -> String {
    format!("stop_at_end:{run}")
}

/// Called once a run has reached its end: an instance launched just for it goes too (each
/// of a gang's), and a cloud instance whose run asked for `--end stop` is stopped.
pub(super) fn on_run_ended(d: &Arc<Daemon>, run: &RunId) {
    d.pending_stops
        .lock()
        .expect("pending stops lock")
        .remove(run);
    d.secrets.lock().expect("secrets lock").remove(run);
    let Ok(Some(row)) = d.db.run(run) else { return };
    let stop_at_end =
        d.db.take_setting(&stop_at_end_key(run))
            .ok()
            .flatten()
            .is_some();
    let nodes =
        d.db.run_nodes(&row)
            .unwrap_or_else(|_| vec![row.instance.clone()]);
    let gang = nodes.len() > 1;
    for name in nodes {
        let Ok(Some(instance)) = d.db.instance(&name) else {
            continue;
        };
        if instance.state == InstanceState::Terminated {
            continue;
        }
        let d2 = d.clone();
        if stop_at_end {
            d.tasks.spawn(async move {
                tracing::info!("run ended; stopping {name} as its --end stop asked");
                if let Err(e) = instances::power(&d2, &name, false).await {
                    tracing::error!(
                        "stopping {name} at the end of its run failed: {}",
                        e.message
                    );
                }
            });
        } else if instance.for_run.as_ref() == Some(run) {
            if gang && name == row.instance {
                // The gang's place goes once its instances have.
                instances::release_gang(d, instance.provider, run);
            }
            let id = row.id.clone();
            d.tasks.spawn(async move {
                tracing::info!("run {id} ended; terminating {name}, launched for it");
                if let Err(e) = instances::terminate_now(&d2, &name).await {
                    tracing::error!("terminating {name} failed: {}", e.message);
                }
            });
        }
    }
}

/// Asks a run to stop; a run still starting is stopped as soon as it has started.
pub(super) async fn stop(
    d: &Arc<Daemon>,
    run: &RunId,
    grace: Option<Duration>,
) -> Result<(), UserError> {
    let internal = |e: anyhow::Error| UserError::new(ErrorCode::Internal, format!("{e:#}"));
    let row =
        d.db.run(run)
            .map_err(internal)?
            .ok_or_else(|| not_found_run(run))?;
    let nodes = d.db.run_nodes(&row).map_err(internal)?;
    match row.state {
        s if s.is_terminal() => Err(UserError::new(
            ErrorCode::Conflict,
            format!("run {run} already ended ({})", crate::report::state_word(s)),
        )
        .resolve(format!("see its output: runctl-controller logs {run}"))),
        _ if d.restarting.lock().expect("restarting lock").remove(run) => {
            // A gang waiting to start again: it does not, and ends stopped.
            d.db.set_run_state(run, RunState::Stopped, now_ms(), None)
                .map_err(internal)?;
            d.bump_run(run);
            on_run_ended(d, run);
            Ok(())
        }
        RunState::Pending | RunState::Syncing => {
            d.pending_stops
                .lock()
                .expect("pending stops lock")
                .insert(run.clone());
            Ok(())
        }
        _ if nodes.len() > 1 => {
            // Every node is told; one out of reach is told when it is back.
            stop_nodes(d, run, &nodes, grace).await;
            Ok(())
        }
        _ => {
            let link = d.agent(&row.instance).ok_or_else(|| {
                UserError::new(
                    ErrorCode::Agent,
                    format!("the agent of {} is not connected", row.instance),
                )
                .resolve("wait for it to reconnect (runctl-controller list shows it), then retry")
            })?;
            link.tx
                .send(ControllerMsg::StopRun {
                    run: run.clone(),
                    grace_ms: grace.map(|g| g.as_millis() as u64),
                })
                .await
                .map_err(|_| {
                    UserError::new(
                        ErrorCode::Agent,
                        format!("the agent of {} just disconnected", row.instance),
                    )
                })?;
            Ok(())
        }
    }
}

/// After a node of a gang ended: stops the nodes still running when the gang says so.
pub(super) fn gang_step(d: &Arc<Daemon>, row: &crate::db::RunRow) {
    let (Ok(nodes), Ok(ends)) = (d.db.run_nodes(row), d.db.node_ends(&row.id)) else {
        return;
    };
    let crate::gang::Step::StopOthers { cause } = crate::gang::step(nodes.len() as u32, &ends)
    else {
        return;
    };
    let running: Vec<InstanceName> = nodes
        .into_iter()
        .enumerate()
        .filter(|(node, _)| !ends.iter().any(|e| e.node == *node as u32))
        .map(|(_, name)| name)
        .collect();
    tracing::info!(run = %row.id, "node {cause} ended; stopping the {} still running", running.len());
    let (d2, run) = (d.clone(), row.id.clone());
    d.tasks.spawn(async move {
        stop_nodes(&d2, &run, &running, None).await;
    });
}

/// How long a disconnected local agent's process gets to be gone before its nodes are.
const DYING: Duration = Duration::from_millis(500);

/// A local agent that disconnected because its process died (killed, crashed) holds its
/// gang nodes no more: each is ended `lost` (the daemon writes the end its agent never
/// will, and kills what is left of the node's process group), so the gang stops the
/// others. A cloud agent out of touch may come back (a laptop asleep, a partition): its
/// nodes wait for it, and its instance's end (found by `list`) ends them.
pub(super) async fn after_disconnect(d: Arc<Daemon>, instance: InstanceName) {
    let Ok(Some(row)) = d.db.instance(&instance) else {
        return;
    };
    let Some(pid) = row.pid else { return };
    if row.provider != crate::provider::ProviderKind::Local
        || row.state == InstanceState::Terminated
    {
        return;
    }
    tokio::time::sleep(DYING).await;
    if d.connected(&instance) || crate::provider::local::is_agent_alive(&d.home, &instance, pid) {
        return;
    }
    let Ok(runs) = d.db.runs_on(&instance) else {
        return;
    };
    for run in runs.iter().filter(|r| !r.state.is_terminal()) {
        if let Err(e) = lose_node(&d, run, &instance, pid) {
            tracing::error!(run = %run.id, "ending the node on {instance}: {e:#}");
        }
    }
}

fn lose_node(
    d: &Arc<Daemon>,
    run: &crate::db::RunRow,
    instance: &InstanceName,
    pid: u32,
) -> anyhow::Result<()> {
    let nodes = d.db.run_nodes(run)?;
    let Some(node) = nodes.iter().position(|n| n == instance).map(|n| n as u32) else {
        return Ok(());
    };
    if nodes.len() < 2 || d.db.node_ends(&run.id)?.iter().any(|e| e.node == node) {
        return Ok(());
    }
    if let Some(group) = d.db.last_started_pid(&run.id, node)? {
        crate::provider::local::kill_group(group);
    }
    let source = Source {
        node,
        incarnation: 0,
    };
    let end = protocol::RunEvent {
        seq: d.db.last_seq(&run.id, source)? + 1,
        at_ms: now_ms(),
        kind: protocol::EventKind::Ended(protocol::RunEnd::Lost {
            message: format!("its agent on {instance} (pid {pid}) died"),
        }),
    };
    tracing::warn!(run = %run.id, "node {node}'s agent on {instance} died; the node is lost");
    let stored = d.db.insert_events(&run.id, source, &[end])?;
    d.bump_run(&run.id);
    after_node_end(d, run, stored);
    Ok(())
}

/// What follows a node's end being stored: the run's end, the gang's restart, or the
/// others stopped.
pub(super) fn after_node_end(d: &Arc<Daemon>, run: &crate::db::RunRow, stored: crate::db::Stored) {
    if stored.ended.is_some() {
        on_run_ended(d, &run.id);
    } else if let Some(next) = stored.relaunch {
        d.tasks.spawn(relaunch(d.clone(), run.id.clone(), next));
    } else if let Some(restart) = stored.restart {
        d.tasks
            .spawn(restart_gang(d.clone(), run.id.clone(), restart));
    } else {
        gang_step(d, run);
    }
}

pub(super) fn not_found_run(run: &RunId) -> UserError {
    UserError::new(ErrorCode::NotFound, format!("no run {run}"))
        .resolve("list runs: runctl-controller list")
}

/// Relaunches a spot run whose instance was taken back (`--on-interrupt relaunch`): ends
/// what is left of the old instance, launches a replacement the way the first was
/// launched, syncs the project to it and starts the command again there as the node's
/// next incarnation (`BulkOpen::StartAgain`, its log opening with `started again (attempt
/// N) after ...`), resuming from the run's newest checkpoint. A failure ends the run
/// failed, saying so.
pub(super) async fn relaunch(d: Arc<Daemon>, run: RunId, next: crate::db::Relaunch) {
    if !d
        .relaunching
        .lock()
        .expect("relaunching lock")
        .insert(run.clone())
    {
        return;
    }
    let outcome = try_relaunch(&d, &run, &next).await;
    d.relaunching.lock().expect("relaunching lock").remove(&run);
    if let Err(e) = outcome {
        let nodes = match d.db.run(&run) {
            Ok(Some(row)) => d.db.run_nodes(&row).unwrap_or_else(|_| vec![row.instance]),
            _ => Vec::new(),
        };
        let message = format!(
            "relaunch {} after {}: {e:#}",
            next.number,
            next.interruption.words()
        );
        fail(&d, &run, &nodes, &message).await;
    }
}

async fn try_relaunch(
    d: &Arc<Daemon>,
    run: &RunId,
    next: &crate::db::Relaunch,
) -> anyhow::Result<()> {
    let row = d.db.run(run)?.context("the run is not known")?;
    let stored =
        d.db.run_start(run)?
            .context("what the run was started with is not kept")?;
    let options = stored
        .launch_options
        .clone()
        .context("how its instance was launched is not kept")?;
    let secrets = kept_secrets(d, run, &stored)?;
    let old = d.db.run_nodes(&row)?;
    let count = old.len() as u32;
    tracing::info!(%run, number = next.number, nodes = count, "relaunching after {}", next.interruption.words());
    // What is left of the old instances goes first: nothing is paid for twice. A gang is
    // relaunched whole: its nodes meet in one place, made again for the new ones.
    let mut ending = tokio::task::JoinSet::new();
    for name in &old {
        let (d, run, name) = (d.clone(), run.clone(), name.clone());
        ending.spawn(async move {
            if let Err(e) = instances::terminate_now(&d, &name).await {
                tracing::warn!(%run, "terminating {name} before its relaunch: {}", e.message);
            }
        });
    }
    while ending.join_next().await.is_some() {}
    if count > 1 {
        instances::release_gang_place(d, options.kind(), run, next.number - 1);
    }
    let (progress, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let said = tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            tracing::info!("relaunch: {}", line.trim_start());
        }
    });
    let caps = d.db.run_budget(run)?;
    let needs_price = caps.as_ref().is_some_and(|c| c.max_cost.is_some());
    let launched = match count {
        1 => instances::launch(
            d,
            &options,
            None,
            Some(run.clone()),
            true,
            needs_price,
            &progress,
        )
        .await
        .map(|row| vec![row.name]),
        _ => {
            instances::launch_gang(
                d,
                &options,
                run,
                count,
                Some(run.clone()),
                needs_price,
                false,
                &progress,
            )
            .await
        }
    };
    drop(progress);
    let _ = said.await;
    let new = launched.map_err(|e| anyhow::anyhow!("launching the replacement: {}", e.message))?;
    let incarnation = next.number;
    for (node, (from, to)) in (0..).zip(old.iter().zip(&new)) {
        d.db.relaunched(run, node, incarnation, from, to)?;
    }
    d.bump_run(run);
    let mut links = Vec::with_capacity(new.len());
    for (node, name) in (0..).zip(&new) {
        let pid = d.db.instance(name)?.and_then(|row| row.pid);
        let link = d.wait_for_agent(name, CONNECT_TIMEOUT, pid).await?;
        link.hello.require(Feature::StartAgain).map_err(|e| {
            anyhow::anyhow!("{name}'s agent cannot start a run again: {}", e.message)
        })?;
        // The old agent's tree went with its instance: the replacement gets the project
        // whole.
        sync::forget_tree(
            d,
            &sync::TreeKey {
                run: run.clone(),
                node,
            },
        );
        links.push((node, link));
    }
    let params = sync::Params {
        run: run.clone(),
        node: 0,
        root: PathBuf::from(&row.root),
        dry_run: false,
        restart: crate::ipc::Restart::Never,
        create: true,
    };
    match links.as_slice() {
        [(_, link)] => sync::sync(d, link, params, |_| {}).await.map(|_| ()),
        _ => sync::sync_nodes(d, &links, params).await.map(|_| ()),
    }
    .map_err(|e| {
        let names: Vec<&str> = new.iter().map(InstanceName::as_str).collect();
        anyhow::anyhow!("syncing the project to {}: {e}", names.join(", "))
    })?;
    let mut spec = stored.spec;
    for ((_, link), name) in links.iter().zip(&new) {
        hand_credentials(d, link, name, &spec).await?;
    }
    let dest = spec.checkpoints.as_ref().map(|c| c.dest.clone());
    spec.resume_from = crate::gang::resume_from(
        dest.as_deref(),
        d.db.pushed_checkpoint(run)?,
        spec.resume_from.as_deref(),
    );
    let price = d.db.cloud(&new[0])?.and_then(|c| c.price_per_hour);
    let cause = format!(
        "{}; {}",
        next.interruption.words(),
        crate::relaunch::replaced_by(next.number, &new, price)
    );
    let gang = Gang {
        spec,
        secrets,
        launch: stored.launch,
        all_checkpoints: stored.all_checkpoints,
    };
    // The attempt after every earlier one: restarts and relaunches both count.
    let attempt = d.db.gang_attempt(run)?;
    d.db.set_attempt_started(run, now_ms())?;
    let opens = gang
        .opens(d, &links, &new, caps.as_ref(), |start| {
            BulkOpen::StartAgain {
                start: Box::new(start),
                attempt,
                cause: cause.clone(),
            }
        })
        .await?;
    start_all(d, run, &links, &new, opens, incarnation).await?;
    // A stop asked for while the replacement was on its way.
    if d.pending_stops
        .lock()
        .expect("pending stops lock")
        .remove(run)
    {
        stop_nodes(d, run, &new, None).await;
    }
    Ok(())
}

/// Watches spot runs under `--on-interrupt relaunch` for the instance that went while
/// nobody heard its end (the laptop asleep, a reclaim with no notice): at the start and
/// every `[daemon] watch_secs`, an instance out of touch is looked up at its provider, and
/// one that is gone gets its run relaunched (or ended, its relaunches used up). A
/// relaunch decided before the daemon stopped and not made is made now.
/// Compacts the logs of runs that ended `[daemon] keep_logs_days` ago and prunes the sync
/// dir (`retention`): when the daemon starts, then hourly. One run at a time, so other
/// writers wait at most one.
pub(super) async fn compact_logs(d: Arc<Daemon>) {
    let mut tick = tokio::time::interval(crate::retention::EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = d.shutdown.cancelled() => return,
        }
        let keep_days = d.config.daemon.keep_logs_days;
        super::sync::prune_files(&d, now_ms());
        let runs = match d.db.uncompacted_runs() {
            Ok(runs) => runs,
            Err(e) => {
                tracing::error!("reading the runs whose logs may be compacted: {e:#}");
                continue;
            }
        };
        let now = now_ms();
        for (run, _) in runs
            .into_iter()
            .filter(|(_, facts)| crate::retention::due(*facts, now, keep_days))
        {
            let d2 = d.clone();
            let compacted = tokio::task::spawn_blocking(move || {
                d2.db
                    .compact_run(&run, crate::retention::TAIL_LINES, keep_days, now)
                    .map(|lines| (run, lines))
            })
            .await;
            match compacted {
                Ok(Ok((run, lines))) => {
                    tracing::info!("compacted the log of {run}: {lines} lines removed")
                }
                Ok(Err(e)) => tracing::error!("compacting a run's log failed: {e:#}"),
                Err(e) => tracing::error!("compacting a run's log failed: {e}"),
            }
        }
    }
}

pub(super) async fn watch_relaunches(d: Arc<Daemon>) {
    let mut tick = tokio::time::interval(d.config.daemon.watch());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = d.shutdown.cancelled() => return,
        }
        let runs = match d.db.relaunch_runs() {
            Ok(runs) => runs,
            Err(e) => {
                tracing::error!("reading the spot runs to watch: {e:#}");
                continue;
            }
        };
        for (run, nodes, pending) in runs {
            if d.relaunching
                .lock()
                .expect("relaunching lock")
                .contains(&run)
            {
                continue;
            }
            if let Some(number) = pending {
                let interruption = crate::relaunch::Interruption::Gone {
                    instance: nodes.first().map(ToString::to_string).unwrap_or_default(),
                    at_ms: now_ms(),
                };
                let next = crate::db::Relaunch {
                    number,
                    interruption,
                };
                d.tasks.spawn(relaunch(d.clone(), run, next));
                continue;
            }
            // A gang is relaunched whole when any of its instances is gone.
            let mut gone = None;
            for instance in nodes.iter().filter(|i| !d.connected(i)) {
                match instances::gone(&d, instance).await {
                    Ok(true) => {
                        gone = Some(instance.clone());
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(%run, "asking whether {instance} is gone: {}", e.message)
                    }
                }
            }
            let Some(instance) = gone else {
                continue;
            };
            match d.db.relaunch_gone(&run, &instance, now_ms()) {
                Ok(Some(Ok(next))) => {
                    tracing::info!(%run, "{instance} is gone; relaunching");
                    d.bump_run(&run);
                    d.tasks.spawn(relaunch(d.clone(), run, next));
                }
                Ok(Some(Err(error))) => {
                    tracing::info!(%run, "{instance} is gone: {error}");
                    d.bump_run(&run);
                    on_run_ended(&d, &run);
                }
                Ok(None) => {}
                Err(e) => tracing::error!(%run, "deciding its relaunch: {e:#}"),
            }
        }
    }
}
