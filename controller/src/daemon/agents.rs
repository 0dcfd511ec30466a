//! The daemon's side of agent connections. A connection without a client certificate may
//! only enroll; one with a certificate this CA issued (and has not revoked) becomes the
//! instance's session: the agent reports its runs, the daemon asks for missed events, and
//! events flow into the database.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use protocol::framed::{read_frame, read_frame_limited, spawn_reader, write_frame};
use protocol::tls::MAX_UNAUTHENTICATED_FRAME_BYTES;
use protocol::{
    AgentMsg, ControllerMsg, ErrorKind, FrameError, Hello, InstanceName, RunCursor, WireError,
};
use tokio::sync::mpsc;

use super::{AgentLink, Daemon, now_ms};
use crate::db::{InstanceState, RunState};

static NEXT_LINK_ID: AtomicUsize = AtomicUsize::new(1);

fn hello() -> Hello {
    Hello::new(concat!("runctl-controller ", env!("CARGO_PKG_VERSION")))
}

/// Connections that have not authenticated (handshaking, or without a certificate and not
/// yet enrolled) beyond which a new attempt must first prove its address with a Retry...
const SOFT_UNAUTHENTICATED: usize = 64;
/// ...and beyond which even a proven one is refused (it redials with backoff).
const MAX_UNAUTHENTICATED: usize = 256;
/// How long a connection may take from its first packet to a finished `Hello` (and, for
/// one without a certificate, `Enroll`): an agent needs a few round trips.
const UNAUTHENTICATED_DEADLINE: Duration = Duration::from_secs(10);
/// The receive window once a connection is authenticated (before it, the transport's
/// small window bounds what a stranger can make the daemon buffer).
const AUTHENTICATED_RECEIVE_WINDOW: u32 = 64 * 1024 * 1024;

/// What to do with a new connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Accept,
    /// Answer with a stateless Retry: costs the daemon nothing, and a spoofed source
    /// never comes back.
    Retry,
    Refuse,
}

fn admit(unauthenticated: usize, address_validated: bool) -> Admission {
    if unauthenticated < SOFT_UNAUTHENTICATED {
        Admission::Accept
    } else if !address_validated {
        Admission::Retry
    } else if unauthenticated < MAX_UNAUTHENTICATED {
        Admission::Accept
    } else {
        Admission::Refuse
    }
}

/// Counts a connection as unauthenticated until dropped or `done`.
struct Unauthenticated<'a>(Option<&'a std::sync::atomic::AtomicUsize>);

impl Unauthenticated<'_> {
    fn done(&mut self) {
        if let Some(n) = self.0.take() {
            n.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Unauthenticated<'_> {
    fn drop(&mut self) {
        self.done();
    }
}

pub(super) async fn handle(d: Arc<Daemon>, incoming: quinn::Incoming) {
    let pending = d.unauthenticated.load(Ordering::SeqCst);
    match admit(pending, incoming.remote_address_validated()) {
        Admission::Accept => {}
        Admission::Retry => {
            let _ = incoming.retry();
            return;
        }
        Admission::Refuse => {
            tracing::debug!(
                "refusing {}: {pending} unauthenticated connections",
                incoming.remote_address()
            );
            incoming.refuse();
            return;
        }
    }
    d.unauthenticated.fetch_add(1, Ordering::SeqCst);
    let mut guard = Unauthenticated(Some(&d.unauthenticated));
    let remote = incoming.remote_address();
    let deadline = tokio::time::Instant::now() + UNAUTHENTICATED_DEADLINE;
    let conn = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::info!("an agent's handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(
                "a handshake from {remote} did not finish in {UNAUTHENTICATED_DEADLINE:?}"
            );
            return;
        }
    };
    if let Err(e) = session(&d, conn, deadline, &mut guard).await {
        tracing::info!("agent connection from {remote} ended: {e:#}");
    }
}

/// Sends a refusal and closes the connection once the agent has had a chance to read it.
async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    error: WireError,
) -> anyhow::Result<()> {
    tracing::warn!(
        "refusing agent at {}: {}",
        conn.remote_address(),
        error.message
    );
    write_frame(send, &ControllerMsg::Error(error.clone())).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(1u32.into(), error.message.as_bytes());
    anyhow::bail!("refused: {}", error.message)
}

async fn session(
    d: &Arc<Daemon>,
    conn: quinn::Connection,
    deadline: tokio::time::Instant,
    unauthenticated: &mut Unauthenticated<'_>,
) -> anyhow::Result<()> {
    let late = || anyhow::anyhow!("no Hello within {UNAUTHENTICATED_DEADLINE:?}: closed");
    let Ok(stream) = tokio::time::timeout_at(deadline, conn.accept_bi()).await else {
        conn.close(1u32.into(), b"too slow");
        return Err(late());
    };
    let (mut send, mut recv) = stream?;
    let Ok(first) = tokio::time::timeout_at(
        deadline,
        read_frame_limited::<_, AgentMsg>(&mut recv, MAX_UNAUTHENTICATED_FRAME_BYTES),
    )
    .await
    else {
        conn.close(1u32.into(), b"too slow");
        return Err(late());
    };
    let theirs = match first {
        Ok(Some(AgentMsg::Hello(h))) => h,
        Ok(Some(_)) => {
            return refuse(
                &conn,
                &mut send,
                WireError::new(ErrorKind::BadRequest, "the first message must be Hello"),
            )
            .await;
        }
        Ok(None) => return Ok(()),
        // Before protocol 5, Hello had no feature list, so an older agent's does not decode.
        Err(e @ FrameError::Decode(_)) => {
            let e = WireError::new(
                ErrorKind::VersionMismatch,
                format!(
                    "could not read the agent's Hello ({e}): it is likely older than protocol {}; install matching versions of runctl-controller and runctl-agent",
                    protocol::OLDEST_PEER_VERSION
                ),
            );
            return refuse(&conn, &mut send, e).await;
        }
        Err(e) => return refuse(&conn, &mut send, frame_refusal(&e)).await,
    };
    let ours = hello();
    if let Err(e) = ours.check_peer(&theirs) {
        return refuse(&conn, &mut send, e).await;
    }
    match protocol::tls::peer_fingerprint(&conn) {
        None => {
            let Ok(result) =
                tokio::time::timeout_at(deadline, enroll(d, &conn, send, recv, ours)).await
            else {
                conn.close(1u32.into(), b"too slow");
                anyhow::bail!("no enrollment within {UNAUTHENTICATED_DEADLINE:?}: closed");
            };
            result
        }
        Some(fingerprint) => {
            let instance = match d.db.cert(fingerprint)? {
                None => {
                    let e = WireError::new(
                        ErrorKind::Unauthenticated,
                        "this certificate was not issued by this controller",
                    );
                    return refuse(&conn, &mut send, e).await;
                }
                Some((_, true)) => {
                    let e = WireError::new(
                        ErrorKind::CertificateRevoked,
                        "this agent's certificate was revoked: its instance was terminated",
                    );
                    return refuse(&conn, &mut send, e).await;
                }
                Some((instance, false)) => instance,
            };
            unauthenticated.done();
            conn.set_receive_window(AUTHENTICATED_RECEIVE_WINDOW.into());
            write_frame(&mut send, &ControllerMsg::Hello(ours)).await?;
            serve_agent(d, conn, send, recv, instance, theirs).await
        }
    }
}

fn frame_refusal(e: &FrameError) -> WireError {
    WireError::new(
        ErrorKind::BadRequest,
        format!("refused a malformed message: {e}"),
    )
}

async fn enroll(
    d: &Arc<Daemon>,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    ours: Hello,
) -> anyhow::Result<()> {
    let (token, csr_der) =
        match read_frame_limited::<_, AgentMsg>(&mut recv, MAX_UNAUTHENTICATED_FRAME_BYTES).await {
            Ok(Some(AgentMsg::Enroll { token, csr_der })) => (token, csr_der),
            Ok(Some(_)) => {
                let e = WireError::new(
                    ErrorKind::Unauthenticated,
                    "this connection has no client certificate: it may only enroll",
                );
                return refuse(conn, &mut send, e).await;
            }
            Ok(None) => return Ok(()),
            Err(e) => return refuse(conn, &mut send, frame_refusal(&e)).await,
        };
    let instance = match d.db.consume_token(&token, now_ms())? {
        Ok(instance) => instance,
        Err(refusal) => {
            return refuse(conn, &mut send, refusal.to_wire()).await;
        }
    };
    let cert = match issue_cert(d, &instance, &csr_der) {
        Ok(cert) => cert,
        Err(e) => return refuse(conn, &mut send, e).await,
    };
    tracing::info!("enrolled {instance}");
    write_frame(&mut send, &ControllerMsg::Hello(ours)).await?;
    write_frame(
        &mut send,
        &ControllerMsg::Enrolled {
            instance,
            cert_der: cert.to_vec(),
        },
    )
    .await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    Ok(())
}

enum Event {
    Inbound(Result<Option<AgentMsg>, FrameError>),
    Outbound(ControllerMsg),
    Closed,
}

async fn serve_agent(
    d: &Arc<Daemon>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    instance: InstanceName,
    theirs: Hello,
) -> anyhow::Result<()> {
    let store = theirs.has(protocol::Feature::Store);
    let handed = theirs.has(protocol::Feature::StoreCredentials);
    let (theirs_version, theirs_software) = (theirs.protocol_version, theirs.software.clone());
    let theirs_stored = theirs.has(protocol::Feature::Stored);
    let runs = match read_frame::<_, AgentMsg>(&mut recv).await {
        Ok(Some(AgentMsg::Ready { runs })) => runs,
        Ok(Some(_)) => {
            let e = WireError::new(ErrorKind::BadRequest, "expected Ready after Hello");
            return refuse(&conn, &mut send, e).await;
        }
        Ok(None) => return Ok(()),
        Err(e) => return refuse(&conn, &mut send, frame_refusal(&e)).await,
    };
    let (tx, mut rx) = mpsc::channel::<ControllerMsg>(64);
    let id = NEXT_LINK_ID.fetch_add(1, Ordering::Relaxed);
    // An agent with no store credentials of its own is handed them by a task of its own.
    let (credentials, renewal) = if super::credentials::needed(d, &instance) {
        let (ask, requests) = mpsc::channel(8);
        let task = tokio::spawn(super::credentials::keep_renewed(
            d.clone(),
            instance.clone(),
            handed,
            tx.clone(),
            requests,
        ));
        (Some(ask), Some(task))
    } else {
        (None, None)
    };
    let previous = d.agents.lock().expect("agents lock").insert(
        instance.clone(),
        AgentLink {
            conn: conn.clone(),
            tx: tx.clone(),
            id,
            store,
            credentials,
            hello: Arc::new(theirs),
        },
    );
    if let Some(previous) = previous {
        previous
            .conn
            .close(0u32.into(), b"replaced by a newer connection");
    }
    if let Some(upgrade) =
        crate::plan::agent_upgrade(theirs_version, protocol::PROTOCOL_VERSION, &theirs_software)
    {
        tracing::warn!("agent {instance}: {upgrade}");
    }
    d.db.set_instance_state(&instance, InstanceState::Running, now_ms())?;
    d.bump_agents();
    tracing::info!(
        "agent {instance} connected from {} ({})",
        conn.remote_address(),
        d.mux.path_of(conn.remote_address())
    );

    // Written before the loop starts draining `rx`, so they go straight to the stream.
    for msg in reconcile(d, &instance, &runs, theirs_stored)? {
        write_frame(&mut send, &msg).await?;
    }

    let (reader, mut in_rx) = spawn_reader::<_, AgentMsg>(recv);
    let result = loop {
        let event = tokio::select! {
            Some(frame) = in_rx.recv() => Event::Inbound(frame),
            Some(msg) = rx.recv() => Event::Outbound(msg),
            _ = conn.closed() => Event::Closed,
            () = d.shutdown.cancelled() => Event::Closed,
        };
        match event {
            Event::Inbound(Ok(Some(msg))) => match msg {
                AgentMsg::Events { run, events } => {
                    let queued = super::writer::Incoming::Events {
                        instance: instance.clone(),
                        run,
                        events,
                        reply: tx.clone(),
                    };
                    if d.events.send(queued).await.is_err() {
                        break Err(anyhow::anyhow!("the event writer has stopped"));
                    }
                }
                AgentMsg::Stats(sample) => {
                    d.stats
                        .lock()
                        .expect("stats lock")
                        .insert(instance.clone(), Arc::new(*sample));
                    d.stats_changed.send_modify(|n| *n += 1);
                }
                AgentMsg::Disk(disk) => {
                    d.disk
                        .lock()
                        .expect("disk lock")
                        .insert(instance.clone(), disk);
                    d.stats_changed.send_modify(|n| *n += 1);
                }
                AgentMsg::Heartbeat { active_runs } => {
                    tracing::debug!("heartbeat from {instance}: {active_runs} active runs");
                }
                AgentMsg::Error(e) => tracing::warn!("agent {instance} reported: {}", e.message),
                AgentMsg::Renew { csr_der } => {
                    let answer = renew(d, &instance, &csr_der);
                    write_frame(&mut send, &answer).await?;
                }
                AgentMsg::Hello(_)
                | AgentMsg::Enroll { .. }
                | AgentMsg::Ready { .. }
                | AgentMsg::RunStarted { .. } => {
                    tracing::warn!("agent {instance} sent an out-of-place message");
                }
            },
            Event::Inbound(Ok(None)) | Event::Closed => break Ok(()),
            Event::Inbound(Err(e)) => {
                let _ = write_frame(&mut send, &ControllerMsg::Error(frame_refusal(&e))).await;
                conn.close(1u32.into(), b"malformed message");
                break Err(anyhow::Error::new(e).context(format!("reading from {instance}")));
            }
            Event::Outbound(msg) => write_frame(&mut send, &msg).await?,
        }
    };
    reader.abort();
    if let Some(renewal) = renewal {
        renewal.abort();
    }
    {
        let mut agents = d.agents.lock().expect("agents lock");
        if agents.get(&instance).is_some_and(|link| link.id == id) {
            agents.remove(&instance);
            d.stats.lock().expect("stats lock").remove(&instance);
        }
    }
    d.bump_agents();
    conn.close(0u32.into(), b"");
    tracing::info!("agent {instance} disconnected");
    d.tasks
        .spawn(super::runs::after_disconnect(d.clone(), instance.clone()));
    result
}

/// A new certificate for `instance`, on its authenticated session (no token): the
/// session's certificate was checked against the database when it connected, so a
/// revoked instance never gets here.
fn renew(d: &Daemon, instance: &InstanceName, csr_der: &[u8]) -> ControllerMsg {
    match issue_cert(d, instance, csr_der) {
        Ok(cert) => {
            tracing::info!(
                "renewed {instance}'s certificate for {:?}",
                d.config.daemon.agent_cert_lifetime()
            );
            ControllerMsg::Renewed {
                cert_der: cert.to_vec(),
            }
        }
        Err(e) => ControllerMsg::Error(e),
    }
}

/// Signs `csr_der` for `instance` (the configured lifetime) and records the certificate,
/// so the next connection with it is let in: enrollment and renewal alike.
fn issue_cert(
    d: &Daemon,
    instance: &InstanceName,
    csr_der: &[u8],
) -> Result<rustls::pki_types::CertificateDer<'static>, WireError> {
    let lifetime = d.config.daemon.agent_cert_lifetime();
    let cert = d
        .pki
        .ca
        .sign_agent_csr(csr_der, instance, lifetime)
        .map_err(|e| {
            WireError::new(
                ErrorKind::BadRequest,
                format!("the certificate request is invalid: {e}"),
            )
        })?;
    d.db.record_cert(protocol::Fingerprint::of_der(&cert), instance, now_ms())
        .map_err(|e| {
            tracing::error!("recording {instance}'s certificate failed: {e:#}");
            WireError::new(
                ErrorKind::Internal,
                "the controller could not record the certificate; try again",
            )
        })?;
    Ok(cert)
}

/// The replays that fetch every event the database is missing; runs the agent no longer
/// knows are failed.
fn reconcile(
    d: &Arc<Daemon>,
    instance: &InstanceName,
    cursors: &[RunCursor],
    stored_acks: bool,
) -> anyhow::Result<Vec<ControllerMsg>> {
    let mut replays = Vec::new();
    for cursor in cursors {
        let Some(row) = d.db.run(&cursor.run)? else {
            continue;
        };
        let Some(source) = d.db.source_of(&row, instance)? else {
            tracing::warn!(
                "agent {instance} reports run {} of {}",
                cursor.run,
                row.instance
            );
            continue;
        };
        let have = d.db.last_seq(&cursor.run, source)?;
        // A live run is followed; an ended one is fetched only if something is missing.
        if !cursor.ended || have < cursor.last_seq {
            replays.push(ControllerMsg::Replay {
                run: cursor.run.clone(),
                after_seq: have,
            });
        } else if stored_acks {
            // Held whole here: the agent's copy may go when it prunes.
            replays.push(ControllerMsg::Stored {
                run: cursor.run.clone(),
                through_seq: have,
            });
        }
        // A stop asked for while the agent was out of reach is delivered now.
        let stop_pending = d
            .pending_stops
            .lock()
            .expect("pending stops lock")
            .remove(&cursor.run);
        if stop_pending && !cursor.ended {
            replays.push(ControllerMsg::StopRun {
                run: cursor.run.clone(),
                grace_ms: None,
            });
        }
    }
    for row in d.db.runs_on(instance)? {
        let known = cursors.iter().any(|c| c.run == row.id);
        if matches!(
            row.state,
            RunState::Running | RunState::SettingUp | RunState::PullingData
        ) && !known
        {
            d.db.set_run_state(
                &row.id,
                RunState::Failed,
                now_ms(),
                Some("the agent no longer has this run (its state was lost)"),
            )?;
            d.bump_run(&row.id);
        }
    }
    Ok(replays)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(unauthenticated: usize, validated: bool, expected: Admission) {
        assert_eq!(
            admit(unauthenticated, validated),
            expected,
            "{unauthenticated} {validated}"
        );
    }

    #[test]
    fn admission_under_load() {
        check(0, false, Admission::Accept);
        check(SOFT_UNAUTHENTICATED - 1, false, Admission::Accept);
        check(SOFT_UNAUTHENTICATED, false, Admission::Retry);
        check(SOFT_UNAUTHENTICATED, true, Admission::Accept);
        check(MAX_UNAUTHENTICATED - 1, true, Admission::Accept);
        check(MAX_UNAUTHENTICATED, true, Admission::Refuse);
        check(MAX_UNAUTHENTICATED * 10, false, Admission::Retry);
    }
}
