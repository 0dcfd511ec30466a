//! Instances and runs as the daemon drives them: launching an instance (a local one here,
//! a cloud one through `cloud`), starting a
//! run (sync the project to the run's tree, start the spec on a stream of its own, then
//! follow the run's events), stopping runs, and terminating instances (flush, revoke, kill).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use protocol::framed::{read_frame, write_frame};
use protocol::{AgentMsg, BulkOpen, ControllerMsg, InstanceName, RunId, RunSpec};

use super::{Daemon, cloud, now_ms, sync};
use crate::db::{InstanceRow, InstanceState, RunState};
use crate::error::{ErrorCode, UserError};
use crate::provider::LaunchOptions;
use crate::provider::local;

/// How long a terminated instance's agent gets to stop its runs (each with its own grace
/// period) and close.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(610);

/// How long a freshly launched agent gets to enroll and connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Launches an instance; with `wait` (always, for a local one) returns once its agent is
/// connected.
pub(super) async fn launch(
    d: &Arc<Daemon>,
    options: &LaunchOptions,
    name: Option<InstanceName>,
    for_run: Option<RunId>,
    wait: bool,
    progress: &cloud::Progress,
) -> Result<InstanceRow, UserError> {
    let internal = |e: anyhow::Error| UserError::new(ErrorCode::Internal, format!("{e:#}"));
    let provider = options.kind();
    let name = name.unwrap_or_else(|| provider.fresh_name());
    if d.db.instance(&name).map_err(internal)?.is_some() {
        return Err(UserError::new(
            ErrorCode::Conflict,
            format!("an instance named {name} already exists"),
        )
        .resolve("pick another --name, or leave it out for a generated one"));
    }
    if let LaunchOptions::Ec2(opts) = options {
        return cloud::launch(d, name, for_run, opts, wait, progress).await;
    }
    let agent_bin = local::agent_binary(&d.config.local)?;
    let row = InstanceRow {
        name: name.clone(),
        provider,
        state: InstanceState::Launching,
        created_ms: now_ms(),
        terminated_ms: None,
        pid: None,
        for_run,
    };
    d.db.insert_instance(&row).map_err(internal)?;
    let expires = now_ms() + d.config.daemon.token_ttl().as_millis() as u64;
    let token = d.db.mint_token(&name, expires).map_err(internal)?;
    let mut child = local::launch(
        &d.home,
        local::LaunchSpec {
            name: &name,
            token,
            ca_pin: d.pki.ca.fingerprint(),
            endpoints: local_endpoints(d),
            agent_bin: &agent_bin,
            agent: &d.config.local.agent,
            disk: d.config.agent.for_local(&d.config.local.agent),
        },
    )
    .map_err(|e| {
        let _ =
            d.db.set_instance_state(&name, InstanceState::Terminated, now_ms());
        internal(e)
    })?;
    let pid = child.id().unwrap_or(0);
    d.db.set_instance_pid(&name, pid).map_err(internal)?;
    // Reap the agent when it exits, as long as this daemon lives. Untracked: the agent
    // outlives the daemon, and shutdown must not wait for it.
    let reaped = name.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        tracing::info!("local agent {reaped} exited: {status:?}");
    });
    if let Err(e) = d.wait_for_agent(&name, CONNECT_TIMEOUT, Some(pid)).await {
        let _ = terminate_now(d, &name).await;
        return Err(e);
    }
    d.db.instance(&name)
        .map_err(internal)?
        .ok_or_else(|| internal(anyhow::anyhow!("instance {name} vanished")))
}

/// Starts `run` on its instance. Failures end the run as failed with the reason.
pub(super) async fn start(
    d: Arc<Daemon>,
    run: RunId,
    instance: InstanceName,
    root: PathBuf,
    spec: RunSpec,
) {
    if let Err(e) = try_start(&d, &run, &instance, root, spec).await {
        let message = format!("{e:#}");
        tracing::warn!("run {run} failed to start: {message}");
        let _ =
            d.db.set_run_state(&run, RunState::Failed, now_ms(), Some(&message));
        d.bump_run(&run);
        on_run_ended(&d, &run);
    }
}

async fn try_start(
    d: &Arc<Daemon>,
    run: &RunId,
    instance: &InstanceName,
    root: PathBuf,
    spec: RunSpec,
) -> anyhow::Result<()> {
    d.db.set_run_state(run, RunState::Syncing, now_ms(), None)?;
    d.bump_run(run);
    let pid = d.db.instance(instance)?.and_then(|row| row.pid);
    let link = d.wait_for_agent(instance, CONNECT_TIMEOUT, pid).await?;
    let params = sync::Params {
        run: run.clone(),
        root,
        dry_run: false,
        restart: crate::ipc::Restart::Never,
        create: true,
    };
    let report = sync::sync(d, &link, params, |_| {})
        .await
        .map_err(|e| anyhow::anyhow!("syncing the project failed: {e}"))?;
    tracing::info!(%run, files = report.summary.written, bytes = report.summary.stream_bytes, elapsed_ms = report.elapsed_ms, "project synced");
    // For `run` to tell: what the first sync sent, and what the instance already had.
    d.db.set_setting(&first_sync_key(run), &serde_json::to_string(&report)?)?;
    let (mut send, mut recv) = link
        .conn
        .open_bi()
        .await
        .context("opening a stream to the agent")?;
    write_frame(&mut send, &BulkOpen::StartRun(Box::new(spec))).await?;
    send.finish()?;
    let answer = tokio::time::timeout(
        Duration::from_secs(600),
        read_frame::<_, AgentMsg>(&mut recv),
    )
    .await
    .context("the agent did not confirm the start within 10 minutes")??;
    match answer {
        Some(AgentMsg::RunStarted { result: Ok(()), .. }) => {
            // Its events (setup steps, the process start) move its state from here on.
            tracing::info!(%run, "run started on {instance}");
            if d.pending_stops
                .lock()
                .expect("pending stops lock")
                .remove(run)
            {
                let stop = ControllerMsg::StopRun {
                    run: run.clone(),
                    grace_ms: None,
                };
                if link.tx.send(stop).await.is_err() {
                    // Delivered when the agent is back (see `reconcile`).
                    d.pending_stops
                        .lock()
                        .expect("pending stops lock")
                        .insert(run.clone());
                }
            }
        }
        // The agent recorded the failure in the run's log; the replay below brings it here.
        Some(AgentMsg::RunStarted { result: Err(e), .. }) => {
            tracing::info!(%run, "agent could not start the run: {}", e.message)
        }
        other => anyhow::bail!("the agent answered the start with {other:?}"),
    }
    // If the connection dropped meanwhile, the agent's next session asks for this run's
    // events anyway: it reports the run in `Ready`.
    let replay = ControllerMsg::Replay {
        run: run.clone(),
        after_seq: d.db.last_seq(run)?,
    };
    if link.tx.send(replay).await.is_err() {
        tracing::info!(%run, "the agent disconnected right after the start; its reconnect catches up");
    }
    Ok(())
}

/// The settings key holding a run's first sync report (JSON).
pub(super) fn first_sync_key(run: &RunId) -> String {
    format!("first_sync:{run}")
}

/// The settings key that marks a run whose cloud instance the daemon stops at its end.
pub(super) fn stop_at_end_key(run: &RunId) -> String {
    format!("stop_at_end:{run}")
}

/// Called once a run has reached its end: an instance launched just for it goes too, and
/// a cloud instance whose run asked for `--end stop` is stopped.
pub(super) fn on_run_ended(d: &Arc<Daemon>, run: &RunId) {
    d.pending_stops
        .lock()
        .expect("pending stops lock")
        .remove(run);
    let Ok(Some(row)) = d.db.run(run) else { return };
    let Ok(Some(instance)) = d.db.instance(&row.instance) else {
        return;
    };
    if d.db
        .take_setting(&stop_at_end_key(run))
        .ok()
        .flatten()
        .is_some()
        && instance.state != InstanceState::Terminated
    {
        let d2 = d.clone();
        let name = instance.name.clone();
        d.tasks.spawn(async move {
            tracing::info!("run ended; stopping {name} as its --end stop asked");
            if let Err(e) = cloud::power(&d2, &name, false).await {
                tracing::error!(
                    "stopping {name} at the end of its run failed: {}",
                    e.message
                );
            }
        });
        return;
    }
    if instance.for_run.as_ref() == Some(run) && instance.state != InstanceState::Terminated {
        let d2 = d.clone();
        d.tasks.spawn(async move {
            tracing::info!(
                "run {} ended; terminating {}, launched for it",
                row.id,
                instance.name
            );
            if let Err(e) = terminate_now(&d2, &instance.name).await {
                tracing::error!("terminating {} failed: {}", instance.name, e.message);
            }
        });
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
    match row.state {
        s if s.is_terminal() => Err(UserError::new(
            ErrorCode::Conflict,
            format!("run {run} already ended ({})", crate::report::state_word(s)),
        )
        .resolve(format!("see its output: runctl-controller logs {run}"))),
        RunState::Pending | RunState::Syncing => {
            d.pending_stops
                .lock()
                .expect("pending stops lock")
                .insert(run.clone());
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

/// Terminates an instance: the agent stops its runs and flushes their events (and
/// checkpoints), its certificate is revoked, and its process (or cloud instance) is gone
/// when this returns. Fails only when the cloud refuses; the record then stays live.
pub(super) async fn terminate_now(d: &Arc<Daemon>, name: &InstanceName) -> Result<(), UserError> {
    shut_down_agent(d, name).await;
    let now = now_ms();
    if let Err(e) = d.db.revoke_instance(name, now) {
        tracing::error!("revoking {name}'s certificate failed: {e:#}");
    }
    if let Some(link) = d.agent(name) {
        link.conn.close(0u32.into(), b"instance terminated");
    }
    if let Ok(Some(row)) = d.db.instance(name)
        && let Some(pid) = row.pid
    {
        local::kill_agent(&d.home, name, pid);
    }
    cloud::terminate(d, name).await?;
    record_terminated(d, name, now);
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
            sync::forget_tree(d, &row.id);
        }
        for row in rows.into_iter().filter(|r| !r.state.is_terminal()) {
            let _ = d.db.set_run_state(
                &row.id,
                RunState::Failed,
                now,
                Some("its instance was terminated"),
            );
            d.bump_run(&row.id);
        }
    }
    d.bump_agents();
}

pub(super) fn not_found_run(run: &RunId) -> UserError {
    UserError::new(ErrorCode::NotFound, format!("no run {run}"))
        .resolve("list runs: runctl-controller list")
}

/// What a local agent dials: the daemon's own port (loopback when it listens on all), over
/// UDP and TCP, and the relay when one is configured.
fn local_endpoints(d: &Daemon) -> Vec<protocol::path::Endpoint> {
    let mut direct = d.quic_addr;
    if direct.ip().is_unspecified() {
        direct.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    super::carriers::agent_endpoints(Some(&direct.to_string()), d.config.daemon.relay.as_deref())
}
