//! Supervises one training process: spawns it in its own process group, records every line
//! of its output in the run's event log, forwards stop requests (SIGTERM to the group, then
//! SIGKILL after the grace period), and records how it really ended.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use protocol::{EventKind, RunEnd, Stream};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::eventlog::EventLog;

/// Output lines longer than this are split into several events.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// After the process exits, how long its output pipes may stay open (held by leftover
/// children) before the rest of its process group is killed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What to start.
#[derive(Debug, Clone)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
}

/// A request to the supervisor of a run.
#[derive(Debug)]
enum Control {
    /// SIGTERM now, SIGKILL after the grace period; the run ends.
    Stop(Duration),
    /// Stop the process the same way, then start it again; answers with the new pid.
    Restart(Duration, oneshot::Sender<Result<u32, String>>),
}

/// A supervised run: stop it, restart it, or find its process group.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Control>,
    /// The current process (and process group) id; 0 while none runs.
    pid: Arc<AtomicU32>,
}

impl Handle {
    /// Requests a stop with `grace` between SIGTERM and SIGKILL. Returns false when the
    /// process is already gone.
    pub fn stop(&self, grace: Duration) -> bool {
        self.tx.send(Control::Stop(grace)).is_ok()
    }

    /// Stops the process (SIGTERM, SIGKILL after `grace`) and starts it again with the
    /// same command; returns the new pid.
    pub async fn restart(&self, grace: Duration) -> Result<u32, String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Control::Restart(grace, reply))
            .map_err(|_| "the run has ended".to_owned())?;
        answer.await.map_err(|_| "the run has ended".to_owned())?
    }

    /// The process group of the running process, if one runs.
    pub fn process_group(&self) -> Option<u32> {
        match self.pid.load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }
}

/// Spawns the process and its supervisor task. On failure, the run's log already records
/// `SpawnFailed` and the message is returned.
pub fn spawn(launch: Launch, log: Arc<EventLog>) -> Result<(u32, Handle), String> {
    let child = start(&launch, &log).map_err(|message| fail(&log, message))?;
    let pid = child.id().expect("a just-spawned child has a pid");
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = Handle {
        tx,
        pid: Arc::new(AtomicU32::new(pid)),
    };
    tokio::spawn(supervise(child, launch, log, rx, handle.pid.clone()));
    Ok((pid, handle))
}

/// Starts the process in its own process group and records `Started`.
fn start(launch: &Launch, log: &EventLog) -> Result<tokio::process::Child, String> {
    let Some((program, args)) = launch.argv.split_first() else {
        return Err("the command is empty".into());
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(&launch.cwd)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = command.spawn().map_err(|e| {
        format!(
            "could not start {program:?} in {}: {e}",
            launch.cwd.display()
        )
    })?;
    let pid = child.id().expect("a just-spawned child has a pid");
    if let Err(e) = log.append(EventKind::Started { pid }) {
        tracing::warn!("run log write failed: {e}");
    }
    Ok(child)
}

fn fail(log: &EventLog, message: String) -> String {
    if let Err(e) = log.append(EventKind::Ended(RunEnd::SpawnFailed {
        message: message.clone(),
    })) {
        tracing::warn!("run log write failed: {e}");
    }
    message
}

fn signal_group(pid: u32, signal: Signal) {
    let pgid = Pid::from_raw(pid as i32);
    if let Err(e) = killpg(pgid, signal) {
        tracing::debug!("killpg({pid}, {signal}) failed: {e}");
    }
}

/// Supervises the run's processes: the first, and each one a restart starts.
async fn supervise(
    mut child: tokio::process::Child,
    launch: Launch,
    log: Arc<EventLog>,
    mut control: mpsc::UnboundedReceiver<Control>,
    current: Arc<AtomicU32>,
) {
    loop {
        let (end, restart) = watch_one(&mut child, &log, &mut control).await;
        current.store(0, Ordering::SeqCst);
        let Some(reply) = restart else {
            if let Err(e) = log.append(EventKind::Ended(end)) {
                tracing::error!("could not record the end of the run: {e}");
            }
            return;
        };
        if let Err(e) = log.append(EventKind::Restarted { previous: end }) {
            tracing::warn!("run log write failed: {e}");
        }
        match start(&launch, &log) {
            Ok(next) => {
                let pid = next.id().expect("a just-spawned child has a pid");
                current.store(pid, Ordering::SeqCst);
                child = next;
                let _ = reply.send(Ok(pid));
            }
            Err(message) => {
                let _ = reply.send(Err(fail(&log, message)));
                return;
            }
        }
    }
}

/// Follows one process to its end, forwarding stop requests; returns how it ended and,
/// when the stop was for a restart, where to answer.
async fn watch_one(
    child: &mut tokio::process::Child,
    log: &Arc<EventLog>,
    control: &mut mpsc::UnboundedReceiver<Control>,
) -> (RunEnd, Option<oneshot::Sender<Result<u32, String>>>) {
    let pid = child.id().expect("a running child has a pid");
    let mut readers = tokio::task::JoinSet::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    readers.spawn(pump_lines(stdout, Stream::Stdout, log.clone()));
    readers.spawn(pump_lines(stderr, Stream::Stderr, log.clone()));

    let mut stop_requested = false;
    let mut restart = None;
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some(request) = control.recv(), if !stop_requested => {
                let grace = match request {
                    Control::Stop(grace) => grace,
                    Control::Restart(grace, reply) => {
                        restart = Some(reply);
                        grace
                    }
                };
                stop_requested = true;
                signal_group(pid, Signal::SIGTERM);
                kill_at = Some(Instant::now() + grace);
            }
            () = async { tokio::time::sleep_until(kill_at.expect("guarded")).await }, if kill_at.is_some() => {
                tracing::info!("process group {pid} outlived its grace period; sending SIGKILL");
                signal_group(pid, Signal::SIGKILL);
                kill_at = None;
            }
        }
    };

    // Leftover children may hold the pipes open; give them a moment, then end the group.
    if tokio::time::timeout(DRAIN_TIMEOUT, drain(&mut readers))
        .await
        .is_err()
    {
        signal_group(pid, Signal::SIGKILL);
        if tokio::time::timeout(DRAIN_TIMEOUT, drain(&mut readers))
            .await
            .is_err()
        {
            readers.abort_all();
        }
    }

    let end = match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => RunEnd::Exited {
                code,
                stop_requested,
            },
            (None, Some(signal)) => RunEnd::Signaled {
                signal,
                stop_requested,
            },
            (None, None) => RunEnd::Lost {
                message: format!("unrecognised exit status {status:?}"),
            },
        },
        Err(e) => RunEnd::Lost {
            message: format!("waiting for the process failed: {e}"),
        },
    };
    (end, restart)
}

/// Freezes a process group (SIGSTOP) until the guard is dropped (SIGCONT), waiting until
/// each of its processes has actually stopped (bounded): a sync swaps files in while the
/// training process cannot look.
pub fn freeze(pgid: u32) -> Frozen {
    signal_group(pgid, Signal::SIGSTOP);
    let deadline = std::time::Instant::now() + FREEZE_WAIT;
    while std::time::Instant::now() < deadline && !group_stopped(pgid) {
        std::thread::sleep(Duration::from_millis(1));
    }
    Frozen(pgid)
}

/// Bound on waiting for a frozen group's processes to reach the stopped state.
const FREEZE_WAIT: Duration = Duration::from_millis(500);

/// Thaws its process group when dropped.
#[derive(Debug)]
pub struct Frozen(u32);

impl Drop for Frozen {
    fn drop(&mut self) {
        signal_group(self.0, Signal::SIGCONT);
    }
}

/// Whether every thread of every process in the group is stopped (`T` in /proc).
fn group_stopped(pgid: u32) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    for proc in procs.flatten() {
        let Some(pid) = proc
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next().unwrap_or("");
            let pgrp = fields.nth(1).and_then(|p| p.parse::<u32>().ok());
            if pgrp == Some(pgid) && !matches!(state, "T" | "t" | "Z" | "X") {
                return false;
            }
        }
    }
    true
}

async fn drain(readers: &mut tokio::task::JoinSet<()>) {
    while readers.join_next().await.is_some() {}
}

/// Splits a stream into lines (at most [`MAX_LINE_BYTES`] each) and logs them.
async fn pump_lines(reader: impl AsyncRead + Unpin, stream: Stream, log: Arc<EventLog>) {
    let mut reader = BufReader::with_capacity(MAX_LINE_BYTES, reader);
    let mut line: Vec<u8> = Vec::new();
    let emit = |line: &mut Vec<u8>| {
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let text = String::from_utf8_lossy(line).into_owned();
        line.clear();
        if let Err(e) = log.append(EventKind::Output { stream, line: text }) {
            tracing::warn!("run log write failed: {e}");
        }
    };
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(e) => {
                tracing::warn!("reading the process's {stream:?} failed: {e}");
                break;
            }
        };
        if buf.is_empty() {
            break;
        }
        let room = MAX_LINE_BYTES - line.len();
        let (take, complete) = match buf.iter().take(room).position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (
                buf.len().min(room),
                line.len() + buf.len() >= MAX_LINE_BYTES,
            ),
        };
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if complete {
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            emit(&mut line);
        }
    }
    if !line.is_empty() {
        emit(&mut line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::RunEvent;

    async fn run(argv: &[&str], stop_after: Option<Duration>) -> Vec<RunEvent> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(EventLog::open(&dir.path().join("events.log")).expect("open"));
        let mut cursor = log.subscribe();
        let launch = Launch {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("GREETING".into(), "hello".into())],
            cwd: dir.path().to_owned(),
        };
        if let Ok((_pid, stop)) = spawn(launch, log.clone())
            && let Some(after) = stop_after
        {
            tokio::time::sleep(after).await;
            stop.stop(Duration::from_millis(300));
        }
        tokio::time::timeout(Duration::from_secs(20), cursor.wait_for(|c| c.ended))
            .await
            .expect("the run ends in time")
            .expect("log alive");
        log.reader(0)
            .expect("reader")
            .read_batch(u64::MAX, usize::MAX)
            .expect("read")
    }

    fn lines(events: &[RunEvent]) -> Vec<(Stream, String)> {
        events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Output { stream, line } => Some((*stream, line.clone())),
                _ => None,
            })
            .collect()
    }

    fn end(events: &[RunEvent]) -> RunEnd {
        match &events.last().expect("events").kind {
            EventKind::Ended(end) => end.clone(),
            other => panic!("last event is {other:?}"),
        }
    }

    #[tokio::test]
    async fn output_and_exit_code() {
        let events = run(
            &[
                "sh",
                "-c",
                "echo \"$GREETING\"; echo oops >&2; printf 'no newline'; exit 3",
            ],
            None,
        )
        .await;
        assert!(matches!(events[0].kind, EventKind::Started { .. }));
        let mut got = lines(&events);
        got.sort();
        assert_eq!(
            got,
            [
                (Stream::Stdout, "hello".to_string()),
                (Stream::Stdout, "no newline".to_string()),
                (Stream::Stderr, "oops".to_string()),
            ]
        );
        assert_eq!(
            end(&events),
            RunEnd::Exited {
                code: 3,
                stop_requested: false
            }
        );
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_failure() {
        let events = run(&["definitely-not-a-program-runctl"], None).await;
        assert_eq!(events.len(), 1);
        assert!(
            matches!(end(&events), RunEnd::SpawnFailed { message } if message.contains("definitely-not-a-program-runctl"))
        );
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_for_a_process_that_ignores_sigterm() {
        let events = run(
            &[
                "sh",
                "-c",
                "trap 'echo got TERM' TERM; echo ready; while true; do sleep 0.05; done",
            ],
            Some(Duration::from_millis(300)),
        )
        .await;
        assert!(
            lines(&events).iter().any(|(_, l)| l == "got TERM"),
            "{events:?}"
        );
        assert_eq!(
            end(&events),
            RunEnd::Signaled {
                signal: 9,
                stop_requested: true
            }
        );
    }

    #[tokio::test]
    async fn long_lines_are_split() {
        let events = run(
            &["sh", "-c", "head -c 150000 /dev/zero | tr '\\0' 'a'; echo"],
            None,
        )
        .await;
        let sizes: Vec<usize> = lines(&events).iter().map(|(_, l)| l.len()).collect();
        assert_eq!(
            sizes,
            [MAX_LINE_BYTES, MAX_LINE_BYTES, 150_000 - 2 * MAX_LINE_BYTES]
        );
    }
}
