//! One connection to the controller: enroll if needed, dial with mutual TLS, exchange
//! `Hello`, report the runs this agent holds, then serve until the connection drops.
//! The control stream carries requests and events; code syncs and run starts arrive on
//! streams of their own (`BulkOpen`).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use protocol::framed::{read_frame, spawn_reader, write_frame};
use protocol::{
    AgentMsg, BulkOpen, ContentHash, ControllerMsg, ErrorKind, FrameError, Hello, RunId,
    StatsSample, SyncApplied, SyncDone, SyncGo, SyncHave, SyncOpen, WireError,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::access::Access;
use crate::eventlog::EventLog;
use crate::runs::Runs;
use crate::supervisor;
use crate::tree::{self, Tree};
use crate::{AgentConfig, dial, identity};

const HEARTBEAT: Duration = Duration::from_secs(10);
/// Events per frame are bounded by encoded size, well under the frame limit.
const BATCH_BYTES: usize = 512 * 1024;

/// How a session ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The connection closed; redial.
    Disconnected,
    /// The controller asked the agent to stop everything and exit.
    Shutdown,
}

pub fn hello() -> Hello {
    Hello::new(concat!("runctl-agent ", env!("CARGO_PKG_VERSION")))
}

/// How often a session on a worse path than the best configured one looks for a better.
const BETTER_PATH_PROBE: Duration = Duration::from_secs(120);

/// Dials the controller by the best path that works (enrolling first when the agent has
/// no certificate yet) and serves the session. `last_good` is the path that worked last;
/// it is tried first and updated.
pub async fn connect_and_serve(
    config: &AgentConfig,
    runs: &Arc<Runs>,
    access: &Arc<Access>,
    connected: &AtomicBool,
    stats: watch::Receiver<Option<Arc<StatsSample>>>,
    closing: watch::Receiver<bool>,
    last_good: &mut Option<protocol::path::Endpoint>,
) -> anyhow::Result<Outcome> {
    let identity = match identity::load(&config.state_dir)? {
        Some(identity) => identity,
        None => {
            let client = protocol::tls::client_config(config.ca_pin, None)?;
            let dialed = dial::dial(&config.controller, last_good.as_ref(), client).await?;
            let result = identity::enroll(config, &dialed.conn).await;
            dialed.endpoint.close(0u32.into(), b"");
            result?
        }
    };
    let renewal = protocol::tls::validity(&identity.cert_pem).map(|validity| Renewal {
        state_dir: config.state_dir.clone(),
        validity,
    });
    let client = protocol::tls::client_config(config.ca_pin, Some(&identity))?;
    let dialed = dial::dial(&config.controller, last_good.as_ref(), client.clone()).await?;
    *last_good = Some(dialed.via.clone());
    tracing::info!(
        "connected to the controller via {} ({})",
        dialed.via,
        dialed.via.path
    );
    // Watchers that end the session from outside: a TCP carrier that broke, and a better
    // path found while this one serves. Each closes the connection, so `serve` ends as for
    // any disconnect (and the runs' events are replayed on the next session).
    let better = Arc::new(std::sync::Mutex::new(None));
    let mut watchers = JoinSet::new();
    {
        let conn = dialed.conn.clone();
        let stream = dialed.stream_watch();
        watchers.spawn(async move {
            stream.await;
            conn.close(0u32.into(), b"carrier lost");
        });
    }
    let betters = protocol::path::better_than(&config.controller, &dialed.via);
    if !betters.is_empty() {
        let (conn, better, client) = (dialed.conn.clone(), better.clone(), client.clone());
        watchers.spawn(async move {
            loop {
                tokio::time::sleep(BETTER_PATH_PROBE).await;
                if let Ok(probe) = dial::dial(&betters, None, client.clone()).await {
                    tracing::info!("found a better path to the controller: {}", probe.via);
                    probe.endpoint.close(0u32.into(), b"probe");
                    *better.lock().expect("better path lock") = Some(probe.via);
                    conn.close(0u32.into(), b"switching to a better path");
                    return;
                }
            }
        });
    }
    let outcome = serve(
        dialed.conn.clone(),
        runs,
        access,
        connected,
        stats,
        closing,
        renewal,
    )
    .await;
    watchers.shutdown().await;
    if let Some(better) = better.lock().expect("better path lock").take() {
        *last_good = Some(better);
    }
    dialed.endpoint.close(0u32.into(), b"");
    // Let the close reach the controller, so it sees the agent go at once.
    let _ = tokio::time::timeout(Duration::from_secs(1), dialed.endpoint.wait_idle()).await;
    outcome
}

/// What renewing the session's certificate needs: where the identity is kept, and the
/// current certificate's validity (seconds since the epoch).
#[derive(Debug, Clone)]
pub struct Renewal {
    pub state_dir: std::path::PathBuf,
    pub validity: (u64, u64),
}

/// How long after an unanswered or refused renewal it is asked for again.
const RENEW_RETRY: Duration = Duration::from_secs(600);

/// When, on tokio's clock, a certificate valid for `validity` is to be renewed.
fn renew_due(validity: (u64, u64)) -> tokio::time::Instant {
    let now = protocol::clock::now_secs();
    let at = identity::renew_at(validity.0, validity.1);
    tokio::time::Instant::now() + Duration::from_secs(at.saturating_sub(now))
}

enum Event {
    Inbound(Result<Option<ControllerMsg>, FrameError>),
    /// The certificate is due for renewal.
    Renew,
    Stream(Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>),
    Outbound(AgentMsg),
    Heartbeat,
    Stats,
    /// The workspace's disk use changed (after a prune).
    Disk,
    /// The agent is powering off: end the session.
    Closing,
    PumpDone(Option<RunId>),
    StoppedAll,
}

/// Serves one authenticated connection; with `renewal`, renews its certificate when due
/// (a controller with feature `renew`).
pub async fn serve(
    conn: quinn::Connection,
    runs: &Arc<Runs>,
    access: &Arc<Access>,
    connected: &AtomicBool,
    mut stats: watch::Receiver<Option<Arc<StatsSample>>>,
    mut closing: watch::Receiver<bool>,
    renewal: Option<Renewal>,
) -> anyhow::Result<Outcome> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let ours = hello();
    write_frame(&mut send, &AgentMsg::Hello(ours.clone())).await?;
    let (reports_disk, renews) = match read_frame::<_, ControllerMsg>(&mut recv).await {
        Ok(Some(ControllerMsg::Hello(theirs))) => {
            if let Err(e) = ours.check_peer(&theirs) {
                bail!("{e}");
            }
            (
                theirs.has(protocol::Feature::Store),
                theirs.has(protocol::Feature::Renew),
            )
        }
        Ok(Some(ControllerMsg::Error(e))) => return Err(identity::refusal(e)),
        Ok(Some(other)) => bail!("the controller opened with {other:?} instead of Hello"),
        Ok(None) => return Ok(Outcome::Disconnected),
        // A rejected client certificate surfaces here, on the first read.
        Err(e) => return Err(anyhow::Error::new(e).context("the controller closed the session")),
    };
    write_frame(
        &mut send,
        &AgentMsg::Ready {
            runs: runs.cursors(),
        },
    )
    .await?;
    connected.store(true, Ordering::SeqCst);
    stats.mark_unchanged();
    let mut disk = runs.workspace().disk();
    disk.mark_changed();

    let (reader, mut in_rx) = spawn_reader::<_, ControllerMsg>(recv);
    let (out_tx, mut out_rx) = mpsc::channel::<AgentMsg>(64);
    let mut pumps = JoinSet::new();
    // Runs being streamed on this connection: a repeated Replay must not stream twice.
    let mut pumping: HashSet<RunId> = HashSet::new();
    let mut stopping: Option<tokio::task::JoinHandle<()>> = None;
    let mut stopped_all = false;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut due = renewal
        .as_ref()
        .filter(|_| renews)
        .map(|r| renew_due(r.validity));
    let mut renewing: Option<identity::Renewing> = None;

    let result = loop {
        let event = tokio::select! {
            Some(frame) = in_rx.recv() => Event::Inbound(frame),
            stream = conn.accept_bi() => Event::Stream(stream),
            Some(msg) = out_rx.recv() => Event::Outbound(msg),
            _ = heartbeat.tick() => Event::Heartbeat,
            () = async { tokio::time::sleep_until(due.expect("guarded")).await }, if due.is_some() => Event::Renew,
            Ok(()) = stats.changed() => Event::Stats,
            Ok(()) = disk.changed(), if reports_disk => Event::Disk,
            Ok(()) = closing.changed() => Event::Closing,
            Some(done) = pumps.join_next(), if !pumps.is_empty() => Event::PumpDone(done.ok()),
            _ = async { stopping.as_mut().expect("guarded").await }, if stopping.is_some() => Event::StoppedAll,
        };
        match event {
            Event::Inbound(Ok(Some(msg))) => match msg {
                ControllerMsg::Replay { run, after_seq } => match runs.log(&run) {
                    Some(log) => {
                        if pumping.insert(run.clone()) {
                            pumps.spawn(pump(run, log, after_seq, out_tx.clone()));
                        }
                    }
                    None => {
                        let e = WireError::new(
                            ErrorKind::NotFound,
                            format!("run {run} is not on this agent"),
                        );
                        write_frame(&mut send, &AgentMsg::Error(e)).await?;
                    }
                },
                ControllerMsg::StopRun { run, grace_ms } => {
                    if let Err(e) = runs.stop(&run, grace_ms.map(Duration::from_millis)) {
                        write_frame(&mut send, &AgentMsg::Error(e)).await?;
                    }
                }
                ControllerMsg::Shutdown { grace_ms } => {
                    tracing::info!("the controller asked this agent to shut down");
                    let runs = runs.clone();
                    let grace = grace_ms.map(Duration::from_millis);
                    stopping = Some(tokio::spawn(async move { runs.stop_all(grace).await }));
                }
                ControllerMsg::Error(e) => {
                    if e.kind == ErrorKind::CertificateRevoked {
                        break Err(identity::refusal(e));
                    }
                    tracing::warn!("the controller reported: {}", e.message);
                }
                ControllerMsg::StoreCredentials(creds) => match runs.handed() {
                    Some(handed) => handed.set(creds),
                    None => tracing::warn!(
                        "ignoring store credentials from the controller: this agent uses its host's (store_credentials = \"host\")"
                    ),
                },
                ControllerMsg::Renewed { cert_der } => match (renewing.take(), &renewal) {
                    (Some(pending), Some(renewal)) => {
                        match pending.finish(&renewal.state_dir, &cert_der) {
                            Ok(validity) => {
                                tracing::info!(
                                    "renewed this agent's certificate: valid for {} s more; the next connection uses it",
                                    validity.1.saturating_sub(validity.0)
                                );
                                due = Some(renew_due(validity));
                            }
                            Err(e) => {
                                tracing::warn!("keeping the renewed certificate failed: {e:#}")
                            }
                        }
                    }
                    _ => tracing::warn!("ignoring a certificate this agent did not ask for"),
                },
                ControllerMsg::Stored { run, through_seq } => {
                    runs.mark_stored(&run, through_seq);
                }
                ControllerMsg::Hello(_) | ControllerMsg::Enrolled { .. } => {
                    tracing::warn!("ignoring an out-of-place message from the controller");
                }
            },
            Event::Renew => {
                due = Some(tokio::time::Instant::now() + RENEW_RETRY);
                match identity::Renewing::start() {
                    Ok((pending, csr_der)) => {
                        tracing::info!("asking the controller to renew this agent's certificate");
                        write_frame(&mut send, &AgentMsg::Renew { csr_der }).await?;
                        renewing = Some(pending);
                    }
                    Err(e) => tracing::warn!("making a key to renew the certificate with: {e:#}"),
                }
            }
            Event::Inbound(Ok(None)) => break Ok(Outcome::Disconnected),
            Event::Inbound(Err(e)) => {
                break Err(anyhow::Error::new(e).context("reading from the controller"));
            }
            Event::Stream(Ok((send, recv))) => {
                let (runs, access) = (runs.clone(), access.clone());
                // Not tied to this session: a start cut off by a disconnect still records
                // how it ended in the run's log, so no run is left neither started nor
                // ended; a sync cut off leaves its tree whole either way.
                tokio::spawn(async move {
                    if let Err(e) = handle_bulk(runs, access, send, recv).await {
                        tracing::warn!("a bulk stream failed: {e:#}");
                    }
                });
            }
            Event::Stream(Err(_)) => break Ok(Outcome::Disconnected),
            Event::Outbound(msg) => {
                write_frame(&mut send, &msg).await?;
                if let AgentMsg::Events { run, events } = &msg
                    && let Some(last) = events.last()
                {
                    runs.mark_delivered(run, last.seq);
                }
            }
            Event::Disk => {
                let used = disk.borrow_and_update().clone();
                if let Some(used) = used {
                    write_frame(&mut send, &AgentMsg::Disk(used)).await?;
                }
            }
            Event::Stats => {
                let sample = stats.borrow_and_update().clone();
                if let Some(sample) = sample {
                    write_frame(&mut send, &AgentMsg::Stats(Box::new((*sample).clone()))).await?;
                }
            }
            Event::Heartbeat => {
                write_frame(
                    &mut send,
                    &AgentMsg::Heartbeat {
                        active_runs: runs.active(),
                    },
                )
                .await?;
            }
            Event::PumpDone(run) => {
                if let Some(run) = run {
                    pumping.remove(&run);
                }
            }
            Event::Closing => {
                if *closing.borrow() {
                    // The controller closes the connection once it has read everything up
                    // to the end of this stream; closing first would drop unsent events.
                    let _ = send.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                    break Ok(Outcome::Shutdown);
                }
            }
            Event::StoppedAll => {
                stopping = None;
                stopped_all = true;
            }
        }
        if stopped_all && pumps.is_empty() {
            // Every run has ended and every event went out: flush, then let the controller close.
            while let Ok(msg) = out_rx.try_recv() {
                write_frame(&mut send, &msg).await?;
            }
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            break Ok(Outcome::Shutdown);
        }
    };
    reader.abort();
    pumps.abort_all();
    result
}

/// Sends the run's events after `after_seq`, then follows the log until the run ends.
async fn pump(
    run: RunId,
    log: Arc<EventLog>,
    after_seq: u64,
    out: mpsc::Sender<AgentMsg>,
) -> RunId {
    stream_events(&run, log, after_seq, out).await;
    run
}

async fn stream_events(
    run: &RunId,
    log: Arc<EventLog>,
    after_seq: u64,
    out: mpsc::Sender<AgentMsg>,
) {
    let mut cursor = log.subscribe();
    let mut reader = match log.reader(after_seq) {
        Ok(reader) => reader,
        Err(e) => {
            tracing::error!("cannot read the log of {run}: {e}");
            return;
        }
    };
    loop {
        let now = *cursor.borrow_and_update();
        let batch = match reader.read_batch(now.last_seq, BATCH_BYTES) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!("reading the log of {run} failed: {e}");
                return;
            }
        };
        if !batch.is_empty() {
            if out
                .send(AgentMsg::Events {
                    run: run.clone(),
                    events: batch,
                })
                .await
                .is_err()
            {
                return;
            }
            continue;
        }
        if now.ended && reader.next_seq() > now.last_seq {
            return;
        }
        if cursor.changed().await.is_err() {
            return;
        }
    }
}

/// A stream the controller opened: a run start, a code sync, or an access stream (exec,
/// shell, forward, copy). A kind this agent does not know is answered with
/// `AgentMsg::Error` (`Unsupported`), not dropped.
async fn handle_bulk(
    runs: Arc<Runs>,
    access: Arc<Access>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let open: BulkOpen = match read_frame(&mut recv).await {
        Ok(Some(open)) => open,
        Ok(None) => bail!("the stream ended before its header"),
        Err(FrameError::Decode(e)) => {
            let refusal = WireError::new(
                ErrorKind::Unsupported,
                format!(
                    "{} does not know this kind of stream ({e}); upgrade it to use this",
                    hello().software
                ),
            );
            write_frame(&mut send, &AgentMsg::Error(refusal)).await?;
            send.finish()?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    match open {
        open @ (BulkOpen::Exec(_)
        | BulkOpen::Forward(_)
        | BulkOpen::CopyOut(_)
        | BulkOpen::CopyIn(_)) => return crate::access::serve(access, open, send, recv).await,
        BulkOpen::StartRun(spec) => {
            start_run(&runs, plain_start(*spec, Vec::new()), &mut send).await?
        }
        BulkOpen::StartRunWithSecrets { spec, secrets } => {
            start_run(&runs, plain_start(*spec, secrets), &mut send).await?
        }
        BulkOpen::StartRunWith(start) => start_run(&runs, *start, &mut send).await?,
        BulkOpen::StartAgain {
            start,
            attempt,
            cause,
        } => {
            let run = start.spec.run.clone();
            let result = runs.start_again(*start, attempt, cause).await;
            match &result {
                Ok(()) => tracing::info!(%run, attempt, "run started again"),
                Err(e) => tracing::warn!(%run, "run failed to start again: {}", e.message),
            }
            write_frame(&mut send, &AgentMsg::RunStarted { run, result }).await?;
        }
        BulkOpen::Sync(open) => handle_sync(runs, open, Vec::new(), &mut send, recv).await?,
        BulkOpen::SyncFrom { open, bases } => {
            handle_sync(runs, open, bases, &mut send, recv).await?
        }
    }
    send.finish()?;
    // Wait until the controller has read the answer (it closes its side), bounded.
    let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
    Ok(())
}

/// A start from before `RunStart`: its spec and secrets, nothing else.
fn plain_start(spec: protocol::RunSpec, secrets: Vec<protocol::Secret>) -> protocol::RunStart {
    protocol::RunStart {
        spec,
        secrets,
        budget: None,
        launch: None,
    }
}

/// Starts a run and answers `RunStarted`.
async fn start_run(
    runs: &Runs,
    start: protocol::RunStart,
    send: &mut quinn::SendStream,
) -> anyhow::Result<()> {
    let run = start.spec.run.clone();
    let result = runs.start(start).await;
    match &result {
        Ok(()) => tracing::info!(%run, "run started"),
        Err(e) => tracing::warn!(%run, "run failed to start: {}", e.message),
    }
    write_frame(send, &AgentMsg::RunStarted { run, result }).await?;
    Ok(())
}

/// One code sync (see `BulkOpen::Sync` for the exchange). Syncs of one run take turns.
/// A new tree is seeded from the store with the first of `bases` it can provide.
async fn handle_sync(
    runs: Arc<Runs>,
    open: SyncOpen,
    bases: Vec<ContentHash>,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let slot = runs.tree_slot(&open.run);
    // Held to the end: syncs of one run take turns. The tree stays open between syncs;
    // one cut off midway is simply opened from disk again next time.
    let mut held = slot.lock().await;
    let cached = held.take();
    let run_dir = runs.run_dir(&open.run);
    let create = open.create;
    let started = std::time::Instant::now();
    let runs2 = runs.clone();
    let bases2 = bases.clone();
    let run2 = open.run.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let mut tree = match cached {
            Some(tree) => tree,
            None => {
                let new = create && !Tree::work_dir(&run_dir).exists();
                if new {
                    runs2.make_room(&run2).map_err(tree::SyncError::NoRoom)?;
                }
                Tree::open(&run_dir, create)?
            }
        };
        tree.refresh()?;
        let mut seeded = false;
        if let Some(record) = tree
            .manifest()
            .entries
            .is_empty()
            .then(|| runs2.store().find(&bases2))
            .flatten()
        {
            seeded = tree.seed(runs2.store(), &record)?;
        }
        let root = tree.manifest().root();
        Ok::<_, tree::SyncError>((tree, root, seeded))
    })
    .await?;
    let (mut tree, root, seeded) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            let have = SyncHave {
                root: Err(e.to_wire()),
                manifest_bytes: 0,
            };
            write_frame(send, &have).await?;
            return Ok(());
        }
    };
    tracing::debug!(run = %open.run, ms = started.elapsed().as_millis() as u64, "tree checked");
    let manifest = if open.known_root == Some(root) || (seeded && bases.contains(&root)) {
        Vec::new()
    } else {
        let blob = protocol::codec::encode_blob(tree.manifest())?;
        zstd::bulk::compress(&blob, 3)?
    };
    let have = SyncHave {
        root: Ok(root),
        manifest_bytes: manifest.len() as u64,
    };
    write_frame(send, &have).await?;
    send.write_all(&manifest).await?;
    let go: SyncGo = read_frame(&mut recv)
        .await?
        .context("the controller ended the sync stream early")?;
    let (delta_bytes, restart) = match go {
        SyncGo::Cancel => {
            if seeded {
                record_tree(&runs, &open.run, &tree);
            }
            *held = Some(tree);
            return Ok(());
        }
        SyncGo::Apply {
            delta_bytes,
            restart,
        } => (delta_bytes, restart),
    };
    let run = open.run.clone();
    let runs2 = runs.clone();
    let rt = tokio::runtime::Handle::current();
    let (applied, recv, tree) = tokio::task::spawn_blocking(move || {
        let mut bridge = tokio_util::io::SyncIoBridge::new_with_handle(recv, rt);
        let applied = tree::apply_stream(
            &mut tree,
            std::io::BufReader::with_capacity(256 * 1024, &mut bridge),
            delta_bytes,
            tree::DEFAULT_MAX_SYNC_BYTES,
            Some(runs2.store()),
            || runs2.process_group(&run).map(supervisor::freeze),
        )
        .map(|_| tree.manifest().root());
        (applied, bridge.into_inner(), tree)
    })
    .await?;
    *held = Some(tree);
    let result = match applied {
        Err(e) => {
            tracing::warn!(run = %open.run, "sync refused or failed: {e}");
            let mut recv = recv;
            let _ = recv.stop(0u32.into());
            Err(e.to_wire())
        }
        Ok(root) => match restart {
            false => Ok(SyncApplied {
                root,
                restarted_pid: None,
            }),
            true => runs.restart(&open.run).await.map(|pid| SyncApplied {
                root,
                restarted_pid: Some(pid),
            }),
        },
    };
    let applied = result.is_ok();
    write_frame(send, &SyncDone { result }).await?;
    // Saved after answering, still holding the run's turn.
    if let Some(mut tree) = held.take() {
        let (runs2, run) = (runs.clone(), open.run.clone());
        let tree = tokio::task::spawn_blocking(move || {
            if let Err(e) = tree.persist() {
                tracing::warn!("saving a tree's state: {e}");
            }
            if applied {
                record_tree(&runs2, &run, &tree);
            }
            tree
        })
        .await?;
        *held = Some(tree);
    }
    Ok(())
}

/// Records the tree a run was just synced to, so later runs can be seeded from it.
fn record_tree(runs: &Runs, run: &RunId, tree: &Tree) {
    match runs
        .store()
        .record(run, tree.manifest(), crate::eventlog::now_ms())
    {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(%run, "not all of the tree is in the store; later runs get the rest sent")
        }
        Err(e) => tracing::warn!(%run, "recording the tree in the store: {e}"),
    }
}
