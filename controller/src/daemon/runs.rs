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

/// Starts `run` on its instance. Failures end the run as failed with the reason.
pub(super) async fn start(
    d: Arc<Daemon>,
    run: RunId,
    instance: InstanceName,
    root: PathBuf,
    spec: RunSpec,
    secrets: Vec<Secret>,
    launch: Option<Launch>,
) {
    if let Err(e) = try_start(&d, &run, &instance, root, spec, secrets, launch).await {
        let message = format!("{e:#}");
        tracing::warn!("run {run} failed to start: {message}");
        let _ =
            d.db.set_run_state(&run, RunState::Failed, now_ms(), Some(&message));
        d.bump_run(&run);
        on_run_ended(&d, &run);
    }
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

async fn try_start(
    d: &Arc<Daemon>,
    run: &RunId,
    instance: &InstanceName,
    root: PathBuf,
    spec: RunSpec,
    secrets: Vec<Secret>,
    launch: Option<Launch>,
) -> anyhow::Result<()> {
    d.db.set_run_state(run, RunState::Syncing, now_ms(), None)?;
    d.bump_run(run);
    let pid = d.db.instance(instance)?.and_then(|row| row.pid);
    let link = d.wait_for_agent(instance, CONNECT_TIMEOUT, pid).await?;
    if !secrets.is_empty() {
        // Before the sync: an agent that cannot keep them costs nothing more.
        link.hello.require(Feature::Secrets).map_err(|e| {
            anyhow::anyhow!(
                "{instance}'s agent cannot take --secret: {} (or drop --secret)",
                e.message
            )
        })?;
    }
    let caps = d.db.run_budget(run)?;
    if caps.is_some() {
        link.hello.require(Feature::Budget).map_err(|e| {
            anyhow::anyhow!(
                "{instance}'s agent cannot hold a budget: {} (or drop --max-cost and --max-hours)",
                e.message
            )
        })?;
    }
    if launch.is_some() {
        link.hello.require(Feature::Launcher).map_err(|e| {
            anyhow::anyhow!(
                "{instance}'s agent cannot launch with --launcher: {} (or drop --launcher)",
                e.message
            )
        })?;
    }
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
    if let (Some(_), Some(ask)) = (&spec.storage, &link.credentials) {
        // The run's store requests wait on the agent until credentials naming it arrive.
        credentials::remember(d, &spec).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        ask.send(reply).await.map_err(|_| {
            anyhow::anyhow!("the agent disconnected before its store credentials were handed over")
        })?;
        answer
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the agent disconnected before its store credentials were handed over"
                )
            })?
            .map_err(|e| anyhow::anyhow!("handing {instance} its store credentials: {e}"))?;
    }
    let (mut send, mut recv) = link
        .conn
        .open_bi()
        .await
        .context("opening a stream to the agent")?;
    // As of now: what the launch and the sync cost is spent, and the agent counts on.
    let budget = match &caps {
        Some(caps) => Some(budget_now(d, instance, caps)?),
        None => None,
    };
    let open = match (budget, launch) {
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
    };
    write_frame(&mut send, &open).await?;
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
        after_seq: d.db.last_seq(run, Source::default())?,
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
            if let Err(e) = instances::power(&d2, &name, false).await {
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
            if let Err(e) = instances::terminate_now(&d2, &instance.name).await {
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

pub(super) fn not_found_run(run: &RunId) -> UserError {
    UserError::new(ErrorCode::NotFound, format!("no run {run}"))
        .resolve("list runs: runctl-controller list")
}
