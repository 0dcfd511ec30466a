//! One writer stores every agent's run events. What arrives while it commits is gathered
//! into its next transaction, so under load one commit carries many agents' batches, and
//! no agent's connection waits on SQLite: it queues its events and reads on. The queue is
//! bounded; when it is full an agent's connection waits, QUIC's flow control holds the
//! agent back, and its events wait in its durable log, as they do while it is away.
//!
//! Order is kept: one queue, one writer, so a run's events are stored in the order its
//! agent sent them. What is stored, and what a run's end sets off, is as before: the batch's
//! `Db::insert_events` in a savepoint of the shared transaction, then `after_node_end`.

use std::collections::HashMap;
use std::sync::Arc;

use protocol::{ControllerMsg, ErrorKind, InstanceName, RunEvent, RunId, WireError};
use tokio::sync::{mpsc, oneshot};

use super::Daemon;
use crate::db::{RunRow, Source};

/// Batches queued before an agent's connection waits.
pub(super) const QUEUE: usize = 256;
/// A transaction takes what is queued up to this many batches or events, so the
/// database is never held long from the readers that wait on it.
const MAX_BATCHES: usize = 512;
const MAX_EVENTS: usize = 4096;

pub(super) enum Incoming {
    Events {
        instance: InstanceName,
        run: RunId,
        events: Vec<RunEvent>,
        /// The agent's connection, for a refusal.
        reply: mpsc::Sender<ControllerMsg>,
    },
    /// Answered once everything queued before it is stored.
    Flush(oneshot::Sender<()>),
}

impl Incoming {
    fn events(&self) -> usize {
        match self {
            Incoming::Events { events, .. } => events.len(),
            Incoming::Flush(_) => 0,
        }
    }
}

/// Starts the writer on a thread of its own (SQLite blocks), draining `queue`.
pub(super) fn spawn(d: Arc<Daemon>, mut queue: mpsc::Receiver<Incoming>) {
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("runctl-events".into())
        .spawn(move || {
            // What a run's end sets off is spawned on the daemon's runtime.
            let _entered = runtime.enter();
            while let Some(first) = queue.blocking_recv() {
                let mut events = first.events();
                let mut batch = vec![first];
                while batch.len() < MAX_BATCHES
                    && events < MAX_EVENTS
                    && let Ok(next) = queue.try_recv()
                {
                    events += next.events();
                    batch.push(next);
                }
                store(&d, batch);
            }
        })
        .expect("starting the event writer thread");
}

/// Waits (at most `bound`) until every event queued so far is stored.
pub(super) async fn flush(d: &Daemon, bound: std::time::Duration) {
    let (done, stored) = oneshot::channel();
    if d.events.send(Incoming::Flush(done)).await.is_ok() {
        let _ = tokio::time::timeout(bound, stored).await;
    }
}

/// One batch that belongs where it came from.
struct Owned {
    instance: InstanceName,
    row: RunRow,
    source: Source,
    events: Vec<RunEvent>,
    reply: mpsc::Sender<ControllerMsg>,
}

fn store(d: &Arc<Daemon>, batch: Vec<Incoming>) {
    let mut flushes = Vec::new();
    let mut owned = Vec::with_capacity(batch.len());
    // Whose run each is, looked up once per agent and run in a batch.
    let mut owners: HashMap<(InstanceName, RunId), Result<(RunRow, Source), WireError>> =
        HashMap::new();
    for item in batch {
        match item {
            Incoming::Flush(done) => flushes.push(done),
            Incoming::Events {
                instance,
                run,
                events,
                reply,
            } => {
                let owner = owners
                    .entry((instance.clone(), run.clone()))
                    .or_insert_with(|| owner(d, &instance, &run));
                match owner {
                    Ok((row, source)) => owned.push(Owned {
                        instance,
                        row: row.clone(),
                        source: *source,
                        events,
                        reply,
                    }),
                    Err(e) => refuse(&reply, &instance, e.clone()),
                }
            }
        }
    }
    let items: Vec<(&RunId, Source, &[RunEvent])> = owned
        .iter()
        .map(|o| (&o.row.id, o.source, o.events.as_slice()))
        .collect();
    match d.db.insert_event_batches(&items) {
        Ok(results) => {
            for (o, stored) in owned.iter().zip(results) {
                match stored {
                    Ok(stored) => {
                        d.bump_run(&o.row.id);
                        let node_ended = o
                            .events
                            .iter()
                            .any(|e| matches!(e.kind, protocol::EventKind::Ended(_)));
                        if node_ended {
                            ack_stored(d, o);
                        }
                        if stored.ended.is_some() || node_ended {
                            super::runs::after_node_end(d, &o.row, stored);
                        }
                    }
                    Err(e) => {
                        tracing::error!("storing events of {} failed: {e:#}", o.row.id);
                        refuse(&o.reply, &o.instance, internal(&e));
                    }
                }
            }
        }
        Err(e) => {
            tracing::error!("storing run events failed: {e:#}");
            for o in &owned {
                refuse(&o.reply, &o.instance, internal(&e));
            }
        }
    }
    for done in flushes {
        let _ = done.send(());
    }
}

/// Tells an agent that announced `stored` that its node's log of a run, through its
/// `Ended`, is committed here. Best effort: a full queue drops it, and the next session's
/// reconciliation says it again.
fn ack_stored(d: &Daemon, o: &Owned) {
    let Some(last) = o.events.last() else { return };
    if !d
        .agent(&o.instance)
        .is_some_and(|link| link.hello.has(protocol::Feature::Stored))
    {
        return;
    }
    // What the database holds through, not what this batch carried.
    let through_seq = match d.db.last_seq(&o.row.id, o.source) {
        Ok(have) if have >= last.seq => have,
        _ => return,
    };
    let ack = ControllerMsg::Stored {
        run: o.row.id.clone(),
        through_seq,
    };
    if o.reply.try_send(ack).is_err() {
        tracing::debug!(
            "could not tell {} that run {} is stored",
            o.instance,
            o.row.id
        );
    }
}

/// The run row and the source of `instance`'s events for `run`, or why they are refused.
fn owner(d: &Daemon, instance: &InstanceName, run: &RunId) -> Result<(RunRow, Source), WireError> {
    let row = d.db.run(run).map_err(|e| internal(&e))?;
    let source = match &row {
        Some(row) => d.db.source_of(row, instance).map_err(|e| internal(&e))?,
        None => None,
    };
    match (row, source) {
        (Some(row), Some(source)) => Ok((row, source)),
        _ => {
            tracing::warn!("agent {instance} sent events for run {run}, which is not its own");
            Err(WireError::new(
                ErrorKind::NotYourRun,
                format!("run {run} does not belong to {instance}"),
            ))
        }
    }
}

fn internal(e: &anyhow::Error) -> WireError {
    WireError::new(ErrorKind::Internal, format!("{e:#}"))
}

/// Sends `e` to the agent unless its connection is gone or its queue full (then it is
/// only logged: the agent replays what was not stored on its next session).
fn refuse(reply: &mpsc::Sender<ControllerMsg>, instance: &InstanceName, e: WireError) {
    if reply.try_send(ControllerMsg::Error(e)).is_err() {
        tracing::warn!("could not tell {instance} its events were refused");
    }
}
