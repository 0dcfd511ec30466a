//! Supervises one run: runs its setup steps, then its command, each in its own process
//! group; records every line of output in the run's event log; forwards stop requests
//! (SIGTERM to the group, then SIGKILL after the grace period) and spot signals; records
//! how each attempt really ended; and starts the command again as the restart policy says,
//! with `RUNCTL_RESUME_FROM` set to the newest checkpoint.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use protocol::{EventKind, RestartPolicy, RunEnd, Stream};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::checkpoints;
use crate::data;
use crate::eventlog::EventLog;
use crate::lines::{LineSplitter, Piece, Redactor};
use crate::pusher::{Finish, Pusher};
use crate::setup::Step;
use protocol::restart::{self, History};

/// After the process exits, how long its output pipes may stay open (held by leftover
/// children) before the rest of its process group is killed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an `Ended` event that could not be written (a full disk) is tried again.
const END_RETRY: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone)]
pub struct Job {
    pub steps: Vec<Step>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub restart: RestartPolicy,
    pub stop_grace: Duration,
    pub spot_signal: Signal,
    pub checkpoints: PathBuf,
    /// Data to pull and a checkpoint to resume from, before the first attempt.
    pub storage: Option<Storage>,
    /// Pushes checkpoints; drained before the run's end is recorded.
    pub pusher: Option<Pusher>,
    /// Told to the user before setup: the environment was reused, not built.
    pub env_notice: Option<String>,
    /// Saves the environment setup builds, for later runs with the same key.
    pub save_env: Option<SaveEnv>,
    /// Secret variables: in the environment of setup and the command, in memory only,
    /// and redacted from their output.
    pub secrets: Vec<protocol::Secret>,
}

impl Job {
    /// The environment a process of this job starts with, secrets last.
    fn env_with(&self, more: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        env.extend(more);
        env.extend(
            self.secrets
                .iter()
                .map(|s| (s.name.clone(), s.value.clone())),
        );
        env
    }
}

/// Where to save a run's freshly built environment, and under which key.
#[derive(Debug, Clone)]
pub struct SaveEnv {
    pub envs: Arc<crate::envs::Envs>,
    pub key: String,
    pub run: protocol::RunId,
    pub venv: PathBuf,
    pub project: PathBuf,
}

/// The store a run's data and resume point come from.
#[derive(Debug, Clone)]
pub struct Storage {
    pub conn: storage::Connection,
    pub plan: data::Plan,
    /// Where the checkpoint to resume from is fetched to.
    pub resume_dir: PathBuf,
}

/// A request to the supervisor of a run.
#[derive(Debug)]
enum Control {
    /// SIGTERM now, SIGKILL after the grace period (the job's own when `None`); the run ends.
    Stop(Option<Duration>),
    /// Stop the process the same way, then start it again; answers with the new pid.
    Restart(oneshot::Sender<Result<u32, String>>),
    /// A spot interruption: send the job's spot signal; the run is not restarted after.
    Interrupt,
}

/// A supervised run: stop it, restart it, interrupt it, or find its process group.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Control>,
    /// The current process (and process group) id; 0 while none runs.
    pid: Arc<AtomicU32>,
    spot_signal: Signal,
    /// Set by [`Handle::interrupt`]: the host is going away.
    interrupted: Arc<AtomicBool>,
}

impl Handle {
    /// Requests a stop with `grace` between SIGTERM and SIGKILL (the job's own grace when
    /// `None`). Returns false when the run is already over.
    pub fn stop(&self, grace: Option<Duration>) -> bool {
        self.tx.send(Control::Stop(grace)).is_ok()
    }

    /// Stops the process (SIGTERM, SIGKILL after the job's grace period) and starts it
    /// again with the same command; returns the new pid.
    pub async fn restart(&self) -> Result<u32, String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Control::Restart(reply))
            .map_err(|_| "the run has ended".to_owned())?;
        answer.await.map_err(|_| "the run has ended".to_owned())?
    }

    /// Sends the job's spot signal to the current process group; no restart follows.
    pub fn interrupt(&self) -> bool {
        self.interrupted.store(true, Ordering::SeqCst);
        self.tx.send(Control::Interrupt).is_ok()
    }

    /// The signal a spot interruption sends.
    pub fn spot_signal(&self) -> Signal {
        self.spot_signal
    }

    /// The process group of the running process (setup step or command), if one runs.
    pub fn process_group(&self) -> Option<u32> {
        match self.pid.load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }
}

/// Starts supervising `job`; everything from here on, failures included, is recorded in
/// the run's log, which ends with `Ended`.
pub fn spawn(job: Job, log: Arc<EventLog>) -> Handle {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = Handle {
        tx,
        pid: Arc::new(AtomicU32::new(0)),
        spot_signal: job.spot_signal,
        interrupted: Arc::default(),
    };
    let (pid, interrupted) = (handle.pid.clone(), handle.interrupted.clone());
    tokio::spawn(async move {
        let mut pull = None;
        let end = supervise(&job, &log, rx, &pid, &mut pull).await;
        pid.store(0, Ordering::SeqCst);
        if let Some(task) = pull.filter(|t: &tokio::task::JoinHandle<()>| !t.is_finished()) {
            // Nothing will read the data any more: stop paying for it (what arrived stays,
            // and a partial file resumes on the next pull).
            task.abort();
            let _ = task.await;
            append(
                &log,
                EventKind::Output {
                    stream: Stream::Stderr,
                    line:
                        "runctl: the data pull was cancelled: the process ended before it finished"
                            .into(),
                },
            );
        }
        if let Some(pusher) = &job.pusher {
            // Every checkpoint the run saved reaches the store before it is over; when
            // the host is going away, the newest one (older ones go on uploading while
            // it lasts, and the agent's next start finishes them if the disk survives).
            let what = match interrupted.load(Ordering::SeqCst) {
                true => Finish::Newest,
                false => Finish::All,
            };
            pusher.finish(what).await;
        }
        record_end(&log, end).await;
    });
    handle
}

fn append(log: &EventLog, kind: EventKind) {
    if let Err(e) = log.append(kind) {
        tracing::warn!("run log write failed: {e}");
    }
}

/// Writes the run's last event, retrying while the disk is full: a run must not stay
/// "active" forever because its end could not be written once.
async fn record_end(log: &EventLog, end: RunEnd) {
    loop {
        match log.append(EventKind::Ended(end.clone())) {
            Ok(_) => return,
            Err(_) if log.cursor().ended => return,
            Err(e) => {
                tracing::error!("could not record the end of a run (retrying): {e}");
                tokio::time::sleep(END_RETRY).await;
            }
        }
    }
}

/// What a stop or restart request left behind for the caller.
#[derive(Debug, Default)]
struct Requests {
    restart: Option<oneshot::Sender<Result<u32, String>>>,
    interrupted: bool,
}

/// Runs the setup steps and the attempts; returns how the run ended.
async fn supervise(
    job: &Job,
    log: &Arc<EventLog>,
    mut control: mpsc::UnboundedReceiver<Control>,
    current: &AtomicU32,
    pull_task: &mut Option<tokio::task::JoinHandle<()>>,
) -> RunEnd {
    let mut interrupted = false;
    if let Some(notice) = &job.env_notice {
        append(
            log,
            EventKind::Output {
                stream: protocol::Stream::Stderr,
                line: notice.clone(),
            },
        );
    }
    for step in &job.steps {
        append(
            log,
            EventKind::Setup {
                command: step.shown.clone(),
            },
        );
        let env = job.env_with(step.env.iter().cloned());
        let mut child = match start(&step.argv, &env, job) {
            Ok(child) => child,
            Err(message) => return RunEnd::SetupFailed { message },
        };
        current.store(pid_of(&child), Ordering::SeqCst);
        let (end, requests) = watch_one(&mut child, log, &mut control, job).await;
        current.store(0, Ordering::SeqCst);
        interrupted |= requests.interrupted;
        if let Some(reply) = requests.restart {
            let _ = reply.send(Err("the run is still setting up".into()));
        }
        match end {
            RunEnd::Exited { code: 0, .. } => {}
            RunEnd::Exited {
                stop_requested: true,
                ..
            }
            | RunEnd::Signaled {
                stop_requested: true,
                ..
            } => return end,
            other => {
                return RunEnd::SetupFailed {
                    message: format!("setup step `{}` {}", step.shown, describe(&other)),
                };
            }
        }
    }

    if let Some(save) = job.save_env.clone() {
        let saved = tokio::task::spawn_blocking(move || {
            save.envs.save(
                &save.key,
                &save.run,
                &save.venv,
                &save.project,
                crate::eventlog::now_ms(),
            )
        })
        .await;
        match saved {
            Ok(Ok(())) => tracing::info!("environment saved for later runs"),
            Ok(Err(e)) => tracing::warn!("saving the environment for later runs: {e}"),
            Err(e) => tracing::warn!("saving the environment for later runs: {e}"),
        }
    }

    let mut resume_from: Option<PathBuf> = None;
    if let Some(storage) = &job.storage {
        if let Some(url) = &storage.plan.resume {
            let fetch = data::fetch_resume(&storage.conn, url, &storage.resume_dir, log);
            match until_stopped(fetch, &mut control).await {
                None => return stopped_before_start(),
                Some(Ok(path)) => resume_from = Some(path),
                Some(Err(message)) => return RunEnd::DataFailed { message },
            }
        }
        if !storage.plan.data.is_empty() {
            let (conn, sources, pull_log) =
                (storage.conn.clone(), storage.plan.data.clone(), log.clone());
            let pull = async move { data::pull(&conn, &sources, &pull_log).await };
            if storage.plan.alongside {
                let log = log.clone();
                *pull_task = Some(tokio::spawn(async move {
                    if let Err(message) = pull.await {
                        append(
                            &log,
                            EventKind::Output {
                                stream: Stream::Stderr,
                                line: format!("runctl: the data pull failed: {message}"),
                            },
                        );
                    }
                }));
            } else {
                match until_stopped(pull, &mut control).await {
                    None => return stopped_before_start(),
                    Some(Ok(())) => {}
                    Some(Err(message)) => return RunEnd::DataFailed { message },
                }
            }
        }
    }

    let mut history = History::default();
    let mut attempt = 0u32;
    let mut pending_reply: Option<oneshot::Sender<Result<u32, String>>> = None;
    loop {
        attempt += 1;
        let env = job.env_with(
            resume_from
                .iter()
                .map(|c| ("RUNCTL_RESUME_FROM".into(), c.display().to_string())),
        );
        let mut child = match start(&job.argv, &env, job) {
            Ok(child) => child,
            Err(message) => {
                if let Some(reply) = pending_reply.take() {
                    let _ = reply.send(Err(message.clone()));
                }
                return RunEnd::SpawnFailed { message };
            }
        };
        let pid = pid_of(&child);
        append(log, EventKind::Started { pid, attempt });
        current.store(pid, Ordering::SeqCst);
        if let Some(reply) = pending_reply.take() {
            let _ = reply.send(Ok(pid));
        }
        let began = Instant::now();
        let (end, requests) = watch_one(&mut child, log, &mut control, job).await;
        current.store(0, Ordering::SeqCst);
        interrupted |= requests.interrupted;
        if let Some(reply) = requests.restart {
            append(log, EventKind::Restarted { previous: end });
            pending_reply = Some(reply);
            continue;
        }
        let Some(delay) = restart::decide(
            job.restart,
            &end,
            began.elapsed(),
            interrupted,
            &mut history,
        ) else {
            return end;
        };
        resume_from = checkpoints::newest_in(&job.checkpoints).or(resume_from);
        append(
            log,
            EventKind::Retrying {
                previous: end.clone(),
                delay_ms: delay.as_millis() as u64,
                resume_from: resume_from.as_ref().map(|p| p.display().to_string()),
            },
        );
        // Waiting out the backoff: a stop ends the run here, a restart starts it now.
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            request = control.recv() => match request {
                Some(Control::Stop(_)) | None => return stopped(end),
                Some(Control::Interrupt) => return end,
                Some(Control::Restart(reply)) => pending_reply = Some(reply),
            },
        }
    }
}

/// `end`, marked as ended by a stop the user asked for.
/// Runs `work` (no process of the run is alive meanwhile) unless a stop comes first;
/// `None` when stopped. A restart is refused and a spot interruption needs no signal.
async fn until_stopped<T>(
    work: impl Future<Output = T>,
    control: &mut mpsc::UnboundedReceiver<Control>,
) -> Option<T> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return Some(done),
            request = control.recv() => match request {
                Some(Control::Stop(_)) | None => return None,
                Some(Control::Interrupt) => {}
                Some(Control::Restart(reply)) => {
                    let _ = reply.send(Err("the run has not started its process yet".into()));
                }
            },
        }
    }
}

/// How a run stopped before its process started ends: as a stopped step would.
fn stopped_before_start() -> RunEnd {
    RunEnd::Signaled {
        signal: Signal::SIGTERM as i32,
        stop_requested: true,
    }
}

fn stopped(end: RunEnd) -> RunEnd {
    match end {
        RunEnd::Exited { code, .. } => RunEnd::Exited {
            code,
            stop_requested: true,
        },
        RunEnd::Signaled { signal, .. } => RunEnd::Signaled {
            signal,
            stop_requested: true,
        },
        other => other,
    }
}

fn describe(end: &RunEnd) -> String {
    match end {
        RunEnd::Exited { code, .. } => format!("exited with code {code}"),
        RunEnd::Signaled { signal, .. } => format!("was killed by signal {signal}"),
        RunEnd::SpawnFailed { message }
        | RunEnd::SetupFailed { message }
        | RunEnd::DataFailed { message }
        | RunEnd::Lost { message } => message.clone(),
    }
}

fn pid_of(child: &tokio::process::Child) -> u32 {
    child.id().expect("a just-spawned child has a pid")
}

/// Starts `argv` in the job's directory, in its own process group.
fn start(
    argv: &[String],
    env: &[(String, String)],
    job: &Job,
) -> Result<tokio::process::Child, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("the command is empty".into());
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(&job.cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    crate::reaper::spawn(&mut command).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound if !job.cwd.is_dir() => format!(
            "could not start {program:?}: the directory {} does not exist",
            job.cwd.display()
        ),
        std::io::ErrorKind::NotFound => match protocol::launch::not_found_hint(program) {
            Some(hint) => format!("could not start {program:?}: no such program ({hint})"),
            None => format!(
                "could not start {program:?}: no such program (is it installed and in PATH?)"
            ),
        },
        _ => format!("could not start {program:?} in {}: {e}", job.cwd.display()),
    })
}

fn signal_group(pid: u32, signal: Signal) {
    let pgid = Pid::from_raw(pid as i32);
    if let Err(e) = killpg(pgid, signal) {
        tracing::debug!("killpg({pid}, {signal}) failed: {e}");
    }
}

/// Follows one process to its end, forwarding stop, restart and interrupt requests.
async fn watch_one(
    child: &mut tokio::process::Child,
    log: &Arc<EventLog>,
    control: &mut mpsc::UnboundedReceiver<Control>,
    job: &Job,
) -> (RunEnd, Requests) {
    let pid = pid_of(child);
    let mut readers = tokio::task::JoinSet::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let redactor = Arc::new(Redactor::new(&job.secrets));
    readers.spawn(pump_lines(
        stdout,
        Stream::Stdout,
        log.clone(),
        redactor.clone(),
    ));
    readers.spawn(pump_lines(stderr, Stream::Stderr, log.clone(), redactor));

    let mut requests = Requests::default();
    let mut stop_requested = false;
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some(request) = control.recv() => {
                let grace = match request {
                    Control::Interrupt => {
                        requests.interrupted = true;
                        tracing::info!("spot interruption: sending {} to process group {pid}", job.spot_signal);
                        signal_group(pid, job.spot_signal);
                        continue;
                    }
                    _ if stop_requested => continue,
                    Control::Stop(grace) => grace.unwrap_or(job.stop_grace),
                    Control::Restart(reply) => {
                        requests.restart = Some(reply);
                        job.stop_grace
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
    crate::reaper::forget(pid);

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
    (end, requests)
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
    for pid in crate::procstat::pids() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(stat) = crate::procstat::ProcStat::read(&task.path().join("stat")) else {
                continue;
            };
            if stat.pgrp == pgid && !matches!(stat.state, 'T' | 't' | 'Z' | 'X') {
                return false;
            }
        }
    }
    true
}

async fn drain(readers: &mut tokio::task::JoinSet<()>) {
    while readers.join_next().await.is_some() {}
}

/// Reads a stream, splits it into lines and progress updates, and logs them.
async fn pump_lines(
    mut reader: impl AsyncRead + Unpin,
    stream: Stream,
    log: Arc<EventLog>,
    redactor: Arc<Redactor>,
) {
    let mut splitter = LineSplitter::default();
    let mut buf = vec![0u8; 64 * 1024];
    let emit = |pieces: Vec<Piece>| {
        for piece in pieces {
            let kind = match piece {
                Piece::Line(line) => EventKind::Output {
                    stream,
                    line: redactor.redact(line),
                },
                Piece::Progress(line) => EventKind::Progress {
                    stream,
                    line: redactor.redact(line),
                },
            };
            append(&log, kind);
        }
    };
    loop {
        let deadline = splitter.next_deadline();
        tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(0) => break,
                Ok(n) => emit(splitter.push(&buf[..n], std::time::Instant::now())),
                Err(e) => {
                    tracing::warn!("reading the process's {stream:?} failed: {e}");
                    break;
                }
            },
            () = async { tokio::time::sleep_until(deadline.expect("guarded").into()).await }, if deadline.is_some() => {
                emit(splitter.tick(std::time::Instant::now()));
            }
        }
    }
    emit(splitter.finish());
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::RunEvent;

    fn job(dir: &std::path::Path, argv: &[&str], restart: RestartPolicy) -> Job {
        Job {
            steps: Vec::new(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("GREETING".into(), "hello".into())],
            cwd: dir.to_owned(),
            restart,
            stop_grace: Duration::from_millis(300),
            spot_signal: Signal::SIGUSR1,
            checkpoints: dir.join("checkpoints"),
            storage: None,
            pusher: None,
            env_notice: None,
            save_env: None,
            secrets: Vec::new(),
        }
    }

    /// Supervises `job` to its end (stopping it after `stop_after`); all its events.
    async fn run_job(
        dir: &std::path::Path,
        job: Job,
        stop_after: Option<Duration>,
    ) -> Vec<RunEvent> {
        let log = Arc::new(EventLog::open(&dir.join("log"), u64::MAX).expect("open"));
        let mut cursor = log.subscribe();
        let handle = spawn(job, log.clone());
        if let Some(after) = stop_after {
            tokio::time::sleep(after).await;
            handle.stop(None);
        }
        tokio::time::timeout(Duration::from_secs(30), cursor.wait_for(|c| c.ended))
            .await
            .expect("the run ends in time")
            .expect("log alive");
        log.reader(0)
            .expect("reader")
            .read_batch(u64::MAX, usize::MAX)
            .expect("read")
    }

    async fn run(argv: &[&str], stop_after: Option<Duration>) -> Vec<RunEvent> {
        let dir = tempfile::tempdir().expect("tempdir");
        let job = job(dir.path(), argv, RestartPolicy::Never);
        run_job(dir.path(), job, stop_after).await
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
        assert!(matches!(
            events[0].kind,
            EventKind::Started { attempt: 1, .. }
        ));
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
            matches!(end(&events), RunEnd::SpawnFailed { message } if message.contains("no such program")),
            "{events:?}"
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
    async fn a_ten_megabyte_line_is_split_and_kept() {
        let events = run(
            &[
                "sh",
                "-c",
                "head -c 10000000 /dev/zero | tr '\\0' 'a'; echo; echo next",
            ],
            None,
        )
        .await;
        let got = lines(&events);
        let total: usize = got.iter().map(|(_, l)| l.len()).sum();
        assert_eq!(total, 10_000_000 + "next".len());
        assert!(
            got.iter()
                .all(|(_, l)| l.len() <= crate::lines::MAX_LINE_BYTES)
        );
        assert_eq!(got.last().map(|(_, l)| l.as_str()), Some("next"));
    }

    #[tokio::test]
    async fn on_failure_restarts_with_the_newest_checkpoint_then_gives_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("checkpoints")).expect("mkdir");
        let script = "echo \"resume=${RUNCTL_RESUME_FROM:-none}\"; \
                      n=$(ls \"$RUNCTL_CP\" | wc -l); touch \"$RUNCTL_CP/step-$n.pt\"; exit 2";
        let mut job = job(
            dir.path(),
            &["sh", "-c", script],
            RestartPolicy::OnFailure { max_restarts: 2 },
        );
        job.env.push((
            "RUNCTL_CP".into(),
            dir.path().join("checkpoints").display().to_string(),
        ));
        let events = run_job(dir.path(), job, None).await;
        let cp = |n: u32| dir.path().join(format!("checkpoints/step-{n}.pt"));
        let resumes: Vec<String> = lines(&events).into_iter().map(|(_, l)| l).collect();
        assert_eq!(
            resumes,
            [
                "resume=none".to_string(),
                format!("resume={}", cp(0).display()),
                format!("resume={}", cp(1).display()),
            ]
        );
        let attempts: Vec<u32> = events
            .iter()
            .filter_map(|e| match e.kind {
                EventKind::Started { attempt, .. } => Some(attempt),
                _ => None,
            })
            .collect();
        assert_eq!(attempts, [1, 2, 3]);
        let retries = events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Retrying { .. }))
            .count();
        assert_eq!(retries, 2);
        assert_eq!(
            end(&events),
            RunEnd::Exited {
                code: 2,
                stop_requested: false
            }
        );
    }

    #[tokio::test]
    async fn a_failing_setup_step_fails_the_run_with_its_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut job = job(
            dir.path(),
            &["sh", "-c", "echo never"],
            RestartPolicy::Always,
        );
        job.steps = vec![
            crate::setup::Step {
                shown: "first".into(),
                argv: vec!["sh".into(), "-c".into(), "echo one".into()],
                env: Vec::new(),
            },
            crate::setup::Step {
                shown: "second".into(),
                argv: vec!["sh".into(), "-c".into(), "echo broken >&2; exit 4".into()],
                env: Vec::new(),
            },
        ];
        let events = run_job(dir.path(), job, None).await;
        let kinds: Vec<&EventKind> = events.iter().map(|e| &e.kind).collect();
        assert!(matches!(kinds[0], EventKind::Setup { command } if command == "first"));
        assert!(lines(&events).contains(&(Stream::Stdout, "one".into())));
        assert!(lines(&events).contains(&(Stream::Stderr, "broken".into())));
        assert!(!lines(&events).iter().any(|(_, l)| l == "never"));
        assert_eq!(
            end(&events),
            RunEnd::SetupFailed {
                message: "setup step `second` exited with code 4".into()
            }
        );
    }

    #[tokio::test]
    async fn progress_lines_are_kept_apart_from_output() {
        let events = run(
            &[
                "sh",
                "-c",
                "printf '10%%\\r50%%\\r100%%\\n'; printf 'a\\r'; sleep 1.2; echo done",
            ],
            None,
        )
        .await;
        let kinds: Vec<EventKind> = events
            .into_iter()
            .map(|e| e.kind)
            .filter(|k| matches!(k, EventKind::Output { .. } | EventKind::Progress { .. }))
            .collect();
        let progress = |l: &str| EventKind::Progress {
            stream: Stream::Stdout,
            line: l.into(),
        };
        let output = |l: &str| EventKind::Output {
            stream: Stream::Stdout,
            line: l.into(),
        };
        assert_eq!(
            kinds,
            [
                progress("10%"),
                output("100%"),
                progress("a"),
                output("done")
            ]
        );
    }
}
