//! runctl-agent: runs on the GPU host. It dials back to the controller (QUIC, mutual TLS),
//! enrolls once with a single-use token, and then receives runs: it applies code-sync deltas to each
//! run's work tree, supervises the process, and keeps every line of output in a durable,
//! sequence-numbered event log that the controller replays from wherever it left off.
//!
//! The agent keeps working while disconnected: runs go on, and their events wait on disk.

pub mod access;
pub mod backoff;
pub mod budget;
pub mod checkpoints;
pub mod config;
pub mod data;
pub mod dial;
pub mod envs;
pub mod eventlog;
pub mod gpu;
pub mod identity;
pub mod lifecycle;
pub mod lines;
pub mod pod;
pub mod procstat;
pub mod prune;
pub mod pusher;
pub mod reaper;
pub mod runs;
pub mod session;
pub mod setup;
pub mod spot;
pub mod stats;
pub mod store;
pub mod supervise;
pub mod supervisor;
pub mod tree;
pub mod usage;
pub mod workspace;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use protocol::{EndAction, StatsSample};
use tokio::sync::watch;

pub use config::AgentConfig;

/// How the agent's main loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The controller asked the agent to shut down (its instance is being terminated).
    Shutdown,
    /// The local shutdown future fired (SIGTERM from systemd, Ctrl-C).
    Interrupted,
    /// The instance was powered off (a run's end action, or the idle timeout); without a
    /// power-off command, the agent just exits.
    PoweredOff(String),
}

/// An error after which retrying cannot help: enrollment was refused or the agent's
/// certificate was revoked. The process exits non-zero with the message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

/// How long a run's last events get to reach the controller before an end action powers
/// the instance off; they stay on the agent's disk either way.
const DELIVERY_BOUND: Duration = Duration::from_secs(30);

/// How long an interrupted pod's runs get to end (RunPod sends SIGKILL 5 s after SIGTERM;
/// whatever upload is in flight goes on until then).
const POD_STOP_BOUND: Duration = Duration::from_millis(4500);

/// Runs the agent until the controller shuts it down, the instance powers off, or
/// `shutdown` resolves.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<Exit> {
    let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel();
    let runs = Arc::new(
        runs::Runs::open(
            &config.state_dir,
            config.log_max_bytes,
            config.disk,
            ended_tx,
            (config.store_credentials == protocol::agent_config::CredentialsFrom::Controller)
                .then(storage::handed::Handed::default),
        )
        .with_context(|| format!("opening run state in {}", config.state_dir.display()))?
        .with_nvidia_smi(config.nvidia_smi.clone()),
    );
    // Whatever an earlier agent left: ended runs beyond the limits, half-done deletes.
    spawn_prune(&runs);
    let connected = Arc::new(AtomicBool::new(false));
    let (stats_tx, stats_rx) = watch::channel::<Option<Arc<StatsSample>>>(None);
    let mut background = tokio::task::JoinSet::new();
    background.spawn(reaper::run());
    let gpus = gpu::Monitor::start(
        config.nvidia_smi.clone(),
        config.stats_interval,
        gpu::Pids::detect(config.pod_api.is_some()),
    );
    match stats::Sampler::new(&config.state_dir, gpus) {
        Ok(sampler) => {
            background.spawn(sample(
                sampler,
                runs.clone(),
                config.stats_interval,
                stats_tx,
            ));
        }
        Err(e) => tracing::warn!("no resource stats on this host: {e}"),
    }
    if let Some(endpoint) = config.metadata_endpoint.clone() {
        background.spawn(spot::watch(endpoint, runs.clone()));
    }

    // A task of its own: the session must keep serving while this loop waits (e.g. for a
    // run's last events to reach the controller before powering off).
    let (closing_tx, closing_rx) = watch::channel(false);
    let access = Arc::new(access::Access::new(
        config.access.clone(),
        &config.state_dir,
        access::agent_home(&config.state_dir),
        runs.clone(),
    ));
    let mut sessions = tokio::spawn(serve_controller(
        config.clone(),
        runs.clone(),
        access,
        connected.clone(),
        stats_rx,
        closing_rx,
    ));
    let _abort_sessions = AbortOnDrop(sessions.abort_handle());
    tokio::pin!(shutdown);
    let mut idle = config.idle_timeout.map(lifecycle::Idle::new);
    let mut idle_tick = tokio::time::interval(Duration::from_secs(1));
    let reason = loop {
        tokio::select! {
            exit = &mut sessions => {
                return exit.unwrap_or_else(|e| Err(anyhow::anyhow!("the session task failed: {e}")));
            }
            () = &mut shutdown => {
                if config.pod_api.is_some() && runs.active() > 0 {
                    // A pod's PID 1 got SIGTERM while runs were active: RunPod is
                    // interrupting the pod (or someone stopped it), and SIGKILL follows in
                    // 5 s. The runs get their spot signal now, to checkpoint in time.
                    tracing::warn!("the pod is being stopped while runs are active: treating it as an interruption");
                    runs.interrupt_before_kill(POD_STOP_BOUND).await;
                } else {
                    runs.stop_all(None).await;
                }
                // The controller sees the agent go at once, not after the idle timeout.
                closing_tx.send_replace(true);
                let _ = tokio::time::timeout(Duration::from_millis(500), &mut sessions).await;
                return Ok(Exit::Interrupted);
            }
            Some((run, action)) = ended_rx.recv() => {
                spawn_prune(&runs);
                if action == EndAction::Keep {
                    continue;
                }
                if runs.active() > 0 {
                    tracing::info!("run {run} ended with end action {action:?}, but other runs are active: the instance stays up");
                    continue;
                }
                runs.wait_delivered(&run, DELIVERY_BOUND).await;
                break lifecycle::Reason::RunEnded {
                    detail: format!("run {run} ended, end action {action:?}"),
                    stop: action == EndAction::Stop,
                };
            }
            _ = idle_tick.tick(), if idle.is_some() => {
                let busy = runs.active() > 0 || connected.load(Ordering::SeqCst);
                let idle = idle.as_mut().expect("guarded");
                if idle.observe(tokio::time::Instant::now().into_std(), busy) {
                    break lifecycle::Reason::Idle(config.idle_timeout.unwrap_or_default());
                }
            }
        }
    };
    runs.stop_all(None).await;
    // Close the session cleanly: the controller sees the agent go at once.
    closing_tx.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), &mut sessions).await;
    if let Err(e) = lifecycle::power_off(
        config.poweroff_command.as_deref(),
        config.pod_api.as_deref(),
        &reason,
    )
    .await
    {
        tracing::error!("{e}");
    }
    background.shutdown().await;
    Ok(Exit::PoweredOff(reason.to_string()))
}

/// Prunes the workspace off the async threads (see `workspace`).
fn spawn_prune(runs: &Arc<runs::Runs>) {
    let runs = runs.clone();
    tokio::task::spawn_blocking(move || {
        let disk = runs.prune();
        tracing::debug!(
            runctl_bytes = disk.runctl_bytes(),
            free_bytes = disk.free_bytes,
            "workspace pruned"
        );
    });
}

/// Dials the controller and serves it, redialling with backoff, until the controller
/// shuts the agent down or refuses it for good.
async fn serve_controller(
    config: AgentConfig,
    runs: Arc<runs::Runs>,
    access: Arc<access::Access>,
    connected: Arc<AtomicBool>,
    stats: watch::Receiver<Option<Arc<StatsSample>>>,
    closing: watch::Receiver<bool>,
) -> anyhow::Result<Exit> {
    let mut attempt: u32 = 0;
    let mut last_good = None;
    loop {
        if *closing.borrow() {
            return Ok(Exit::Shutdown);
        }
        if !config.state_dir.is_dir() {
            // Deleted under it (a local agent whose controller home was removed): there is
            // nothing left to serve or report, and no controller will come back for it.
            runs.stop_all(None).await;
            return Err(anyhow::anyhow!(
                "the agent's state dir {} is gone: exiting instead of redialling",
                config.state_dir.display()
            ));
        }
        let outcome = session::connect_and_serve(
            &config,
            &runs,
            &access,
            &connected,
            stats.clone(),
            closing.clone(),
            &mut last_good,
        )
        .await;
        connected.store(false, Ordering::SeqCst);
        match outcome {
            Ok(session::Outcome::Shutdown) => return Ok(Exit::Shutdown),
            Ok(session::Outcome::Disconnected) => {
                tracing::info!("disconnected from the controller; redialling");
                attempt = 0;
            }
            Err(e) => {
                if let Some(fatal) = e.downcast_ref::<Fatal>() {
                    return Err(anyhow::anyhow!("{fatal}"));
                }
                tracing::warn!("controller unreachable: {e:#}");
            }
        }
        let delay = backoff::delay(attempt, rand::random::<f64>());
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(delay).await;
    }
}

/// Aborts a task when dropped: the session task ends with the agent's main loop.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Samples resource use at `interval`, publishing each sample for the session to send.
async fn sample(
    mut sampler: stats::Sampler,
    runs: Arc<runs::Runs>,
    interval: Duration,
    out: watch::Sender<Option<Arc<StatsSample>>>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let groups = runs.process_groups();
        let at_ms = eventlog::now_ms();
        let Ok((back, sample)) = tokio::task::spawn_blocking(move || {
            let sample = sampler.sample(&groups, at_ms);
            (sampler, sample)
        })
        .await
        else {
            tracing::error!("the stats sampler panicked; no more samples");
            return;
        };
        sampler = back;
        out.send_replace(Some(Arc::new(sample)));
    }
}
