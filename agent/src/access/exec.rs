//! `exec` and `shell`: a command in a place (a run's start directory and environment, or
//! the agent's home), with its output streamed back apart (`exec`) or on a PTY (`shell`:
//! the PTY's line discipline turns the user's Ctrl-C and Ctrl-Z into signals for the
//! foreground process group, as on any terminal). Not a run: nothing supervises or
//! restarts it. When the controller goes away, the command's process group gets SIGHUP,
//! and SIGKILL 5 s later, as a dropped ssh session's would.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use protocol::framed::{spawn_reader, write_frame};
use protocol::streams::{CHUNK_BYTES, ExecInput, ExecOpen, ExecOutput, ExitStatus, TtySize};
use protocol::{ErrorKind, WireError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{Access, AuditLine, policy};

/// After the command exits, how long its output may take to drain (a background child
/// can hold the pipe open).
const DRAIN: Duration = Duration::from_secs(2);
const HANGUP_GRACE: Duration = Duration::from_secs(5);

pub async fn serve(
    access: &Access,
    open: ExecOpen,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let began = Instant::now();
    let at_ms = crate::eventlog::now_ms();
    let what = if open.tty.is_some() { "shell" } else { "exec" };
    let argv = if open.argv.is_empty() {
        vec![login_shell()]
    } else {
        open.argv.clone()
    };
    let line = |end: String| AuditLine {
        at_ms,
        who: open.who.clone(),
        what,
        place: super::place_name(&open.place),
        detail: shell_words(&argv),
        end,
        ms: began.elapsed().as_millis() as u64,
    };
    let spawned = match policy::shell(&access.policy).and_then(|()| access.locate(&open.place)) {
        Err(e) => Err(("refused", e)),
        Ok(located) => spawn(&open, &argv, &located).map_err(|e| ("failed", e)),
    };
    let (child, io) = match spawned {
        Ok(spawned) => spawned,
        Err((how, e)) => {
            access.audit(line(format!("{how}: {}", e.message)));
            return super::answer_and_end(&mut send, &ExecOutput::Started(Err(e))).await;
        }
    };
    let pid = child.id().unwrap_or(0);
    write_frame(&mut send, &ExecOutput::Started(Ok(pid))).await?;
    let (status, gone) = pump(child, io, pid, send, recv).await;
    let status = status.map_or("unknown".to_owned(), |s| s.to_string());
    access.audit(line(if gone {
        format!("hung up (the controller went away), {status}")
    } else {
        status
    }));
    Ok(())
}

/// The user's shell: `$SHELL`, else bash, else sh (not looked up in the passwd database:
/// a static binary must not load NSS modules).
fn login_shell() -> String {
    std::env::var("SHELL")
        .ok()
        .filter(|s| std::path::Path::new(s).is_file())
        .or_else(|| {
            ["/bin/bash", "/usr/bin/bash"]
                .into_iter()
                .find(|p| std::path::Path::new(p).is_file())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "/bin/sh".to_owned())
}

fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The command's I/O: pipes, or a PTY.
enum Io {
    Pipes {
        stdin: Option<tokio::process::ChildStdin>,
        stdout: tokio::process::ChildStdout,
        stderr: tokio::process::ChildStderr,
    },
    Pty {
        read: pty_process::OwnedReadPty,
        write: pty_process::OwnedWritePty,
    },
}

fn spawn(
    open: &ExecOpen,
    argv: &[String],
    located: &super::Located,
) -> Result<(tokio::process::Child, Io), WireError> {
    let failed = |e: std::io::Error| {
        let message = if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "could not start {:?}: no such program (is it installed and in PATH?)",
                argv[0]
            )
        } else {
            format!("could not start {:?}: {e}", argv[0])
        };
        WireError::new(ErrorKind::NotFound, message)
    };
    if let Some(size) = open.tty {
        let (pty, pts) = pty_process::open().map_err(|e| failed(pty_error(e)))?;
        pty.resize(pty_size(size))
            .map_err(|e| failed(pty_error(e)))?;
        let mut command = pty_process::Command::new(&argv[0])
            .args(&argv[1..])
            .envs(located.env.iter().cloned())
            .current_dir(&located.cwd);
        if let Some(term) = &open.term {
            command = command.env("TERM", term);
        }
        let child =
            crate::reaper::spawn_with(|| command.spawn(pts).map_err(pty_error)).map_err(failed)?;
        let (read, write) = pty.into_split();
        return Ok((child, Io::Pty { read, write }));
    }
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .envs(located.env.iter().cloned())
        .current_dir(&located.cwd)
        .stdin(if open.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = crate::reaper::spawn(&mut command).map_err(failed)?;
    let io = Io::Pipes {
        stdin: child.stdin.take(),
        stdout: child.stdout.take().expect("piped"),
        stderr: child.stderr.take().expect("piped"),
    };
    Ok((child, io))
}

fn pty_error(e: pty_process::Error) -> std::io::Error {
    match e {
        pty_process::Error::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

fn pty_size(size: TtySize) -> pty_process::Size {
    pty_process::Size::new(size.rows.max(1), size.cols.max(1))
}

/// Streams the command's output and the controller's input until the command has ended
/// and its output is drained. Returns how it ended, and whether the controller went away
/// first (the command was hung up on).
async fn pump(
    mut child: tokio::process::Child,
    io: Io,
    pid: u32,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> (Option<ExitStatus>, bool) {
    let (out_tx, mut out_rx) = mpsc::channel::<ExecOutput>(32);
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if write_frame(&mut send, &frame).await.is_err() {
                return false;
            }
        }
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
        true
    });
    let mut readers = tokio::task::JoinSet::new();
    let (mut stdin, mut pty_write) = (None, None);
    match io {
        Io::Pipes {
            stdin: input,
            stdout,
            stderr,
        } => {
            stdin = input;
            readers.spawn(read_into(stdout, out_tx.clone(), ExecOutput::Stdout));
            readers.spawn(read_into(stderr, out_tx.clone(), ExecOutput::Stderr));
        }
        Io::Pty { read, write } => {
            pty_write = Some(write);
            readers.spawn(read_into(read, out_tx.clone(), ExecOutput::Stdout));
        }
    }
    let (_reader_task, mut input) = spawn_reader::<_, ExecInput>(recv);
    let group = Pid::from_raw(pid as i32);
    let mut controller_gone = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.ok(),
            frame = input.recv(), if !controller_gone => match frame {
                Some(Ok(Some(ExecInput::Stdin(bytes)))) => {
                    if let Some(w) = stdin.as_mut() {
                        if w.write_all(&bytes).await.is_err() {
                            stdin = None;
                        }
                    } else if let Some(w) = pty_write.as_mut() {
                        let _ = w.write_all(&bytes).await;
                    }
                }
                Some(Ok(Some(ExecInput::StdinEnd))) => stdin = None,
                Some(Ok(Some(ExecInput::Resize(size)))) => {
                    if let Some(w) = pty_write.as_ref() {
                        let _ = w.resize(pty_size(size));
                    }
                }
                Some(Ok(Some(ExecInput::Signal(n)))) => {
                    if let Ok(signal) = Signal::try_from(n) {
                        let _ = killpg(group, signal);
                    }
                }
                // The controller went away: hang up, as a terminal closing would.
                None | Some(Ok(None)) | Some(Err(_)) => {
                    controller_gone = true;
                    stdin = None;
                    let _ = killpg(group, Signal::SIGHUP);
                    let _ = killpg(group, Signal::SIGCONT);
                    tokio::spawn(async move {
                        tokio::time::sleep(HANGUP_GRACE).await;
                        let _ = killpg(group, Signal::SIGKILL);
                    });
                }
            },
        }
    };
    crate::reaper::forget(pid);
    drop(stdin);
    let _ = tokio::time::timeout(DRAIN, async {
        while readers.join_next().await.is_some() {}
    })
    .await;
    readers.abort_all();
    drop(pty_write);
    let status = status.map(|s| {
        use std::os::unix::process::ExitStatusExt;
        match (s.code(), s.signal()) {
            (Some(code), _) => ExitStatus::Exited(code),
            (None, Some(signal)) => ExitStatus::Signaled(signal),
            (None, None) => ExitStatus::Exited(255),
        }
    });
    if let Some(status) = status {
        let _ = out_tx.send(ExecOutput::Ended(status)).await;
    }
    drop(out_tx);
    let delivered = writer.await.unwrap_or(false);
    (status, controller_gone || !delivered)
}

async fn read_into<R: AsyncRead + Unpin>(
    mut from: R,
    to: mpsc::Sender<ExecOutput>,
    frame: fn(Vec<u8>) -> ExecOutput,
) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        match from.read(&mut buf).await {
            // A PTY reads EIO once the last process holding its terminal is gone.
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.send(frame(buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}
