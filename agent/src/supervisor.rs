//! Supervises one training process: spawns it in its own process group, records every line
//! of its output in the run's event log, forwards stop requests (SIGTERM to the group, then
//! SIGKILL after the grace period), and records how it really ended.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use protocol::{EventKind, RunEnd, Stream};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
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

/// Asks a supervised process to stop.
#[derive(Debug, Clone)]
pub struct StopHandle(mpsc::UnboundedSender<Duration>);

impl StopHandle {
    /// Requests a stop with `grace` between SIGTERM and SIGKILL. Returns false when the
    /// process is already gone.
    pub fn stop(&self, grace: Duration) -> bool {
        self.0.send(grace).is_ok()
    }
}

/// Spawns the process and its supervisor task. On failure, the run's log already records
/// `SpawnFailed` and the message is returned.
pub fn spawn(launch: Launch, log: Arc<EventLog>) -> Result<(u32, StopHandle), String> {
    let Some((program, args)) = launch.argv.split_first() else {
        return Err(fail(&log, "the command is empty".into()));
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
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Err(fail(
                &log,
                format!(
                    "could not start {program:?} in {}: {e}",
                    launch.cwd.display()
                ),
            ));
        }
    };
    let pid = child.id().expect("a just-spawned child has a pid");
    if let Err(e) = log.append(EventKind::Started { pid }) {
        tracing::warn!("run log write failed: {e}");
    }
    let (stop_tx, stop_rx) = mpsc::unbounded_channel();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    tokio::spawn(supervise(child, pid, stdout, stderr, log, stop_rx));
    Ok((pid, StopHandle(stop_tx)))
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

async fn supervise(
    mut child: tokio::process::Child,
    pid: u32,
    stdout: impl AsyncRead + Unpin + Send + 'static,
    stderr: impl AsyncRead + Unpin + Send + 'static,
    log: Arc<EventLog>,
    mut stop_rx: mpsc::UnboundedReceiver<Duration>,
) {
    let mut readers = tokio::task::JoinSet::new();
    readers.spawn(pump_lines(stdout, Stream::Stdout, log.clone()));
    readers.spawn(pump_lines(stderr, Stream::Stderr, log.clone()));

    let mut stop_requested = false;
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some(grace) = stop_rx.recv(), if !stop_requested => {
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
    if let Err(e) = log.append(EventKind::Ended(end)) {
        tracing::error!("could not record the end of the run: {e}");
    }
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
