//! The CLI side of `exec`, `shell`, `forward` and `cp`: ask the daemon to open the stream
//! on the target's agent, then speak it (`protocol::streams`) over the daemon's socket,
//! which the daemon splices to the agent's stream as it is.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use protocol::framed::{read_frame, spawn_reader, write_frame};
use protocol::streams::{
    CopyDone, CopyHead, CopyInHead, CopyKind, CopyReady, CopySource, ExecInput, ExecOutput, Found,
    TtySize,
};
use protocol::{ErrorKind, InstanceName, WireError};
use tokio::net::UnixStream;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::io::SyncIoBridge;

use crate::cli::{CpArgs, ExecArgs, ForwardArgs, ShellArgs};
use crate::error::{ErrorCode, UserError};
use crate::home::Home;
use crate::ipc::{Client, ForwardSpec, Open, Request, Response, Target};
use crate::report::{Format, Printer, bytes_words};

/// The exit status when the connection to the instance is lost (as ssh's).
const LOST: u8 = 255;

/// The Ctrl-C that hangs up on an `exec` instead of passing SIGINT on.
const HANG_UP_AFTER: u32 = 3;

/// Asks the daemon for the stream; the socket once it is open.
async fn open_stream(
    home: &Home,
    target: Target,
    open: Open,
) -> Result<(UnixStream, InstanceName), UserError> {
    let mut client = Client::connect(home).await?;
    client.send(&Request::Open { target, open }).await?;
    loop {
        match client.next().await? {
            Some(Response::Spliced { instance }) => return Ok((client.into_stream(), instance)),
            Some(Response::Progress(line)) => eprintln!("runctl: {line}"),
            Some(Response::Error(e)) => return Err(e),
            Some(other) => {
                return Err(UserError::new(
                    ErrorCode::Internal,
                    format!("unexpected answer from the daemon: {other:?}"),
                ));
            }
            None => {
                return Err(UserError::new(
                    ErrorCode::DaemonUnavailable,
                    "the daemon closed the connection without answering",
                ));
            }
        }
    }
}

/// An agent's refusal, for people (a policy refusal's message names the setting).
fn refusal(instance: &InstanceName, e: WireError) -> UserError {
    let code = match e.kind {
        ErrorKind::Forbidden => ErrorCode::Conflict,
        ErrorKind::NotFound => ErrorCode::NotFound,
        ErrorKind::BadRequest => ErrorCode::BadInput,
        _ => ErrorCode::Agent,
    };
    UserError::new(code, format!("{instance}: {}", e.message))
}

pub async fn exec(home: &Home, args: ExecArgs) -> anyhow::Result<u8> {
    let stdin = !std::io::stdin().is_terminal();
    let open = Open::Exec {
        argv: args.command,
        tty: None,
        term: None,
        stdin,
    };
    let (stream, instance) = open_stream(home, args.target, open).await?;
    Ok(interact(stream, &instance, stdin, None).await?)
}

pub async fn shell(home: &Home, args: ShellArgs) -> anyhow::Result<u8> {
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        return Err(
            UserError::new(ErrorCode::BadInput, "shell needs a terminal")
                .resolve("run a command without one: runctl-controller exec RUN -- COMMAND")
                .into(),
        );
    }
    let size = terminal_size();
    let open = Open::Exec {
        argv: Vec::new(),
        tty: Some(size),
        term: std::env::var("TERM").ok(),
        stdin: true,
    };
    let (stream, instance) = open_stream(home, args.target, open).await?;
    let raw = RawMode::enable()?;
    let code = interact(stream, &instance, true, Some(raw)).await?;
    Ok(code)
}

fn terminal_size() -> TtySize {
    let (cols, rows) = crossterm::terminal::size().unwrap_or((80, 24));
    TtySize { rows, cols }
}

/// The terminal in raw mode while a shell runs; restored when dropped, however the shell
/// ends.
struct RawMode;

impl RawMode {
    fn enable() -> Result<Self, UserError> {
        crossterm::terminal::enable_raw_mode().map_err(|e| {
            UserError::new(
                ErrorCode::Internal,
                format!("cannot put the terminal in raw mode: {e}"),
            )
        })?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// Reads stdin on a thread of its own (a blocked read must not hold up the runtime's
/// end), in chunks; the channel closes at end of input.
fn stdin_chunks() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(8);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; protocol::streams::CHUNK_BYTES];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Runs an exec or shell stream to its end: output to stdout and stderr, stdin and
/// signals (and, for a shell, window sizes) to the agent. The command's status, or 255
/// when the connection is lost.
async fn interact(
    stream: UnixStream,
    instance: &InstanceName,
    forward_stdin: bool,
    raw: Option<RawMode>,
) -> Result<u8, UserError> {
    let (read, mut write) = stream.into_split();
    let (_reader, mut frames) = spawn_reader::<_, ExecOutput>(read);
    match frames.recv().await {
        Some(Ok(Some(ExecOutput::Started(Ok(_pid))))) => {}
        Some(Ok(Some(ExecOutput::Started(Err(e))))) => {
            drop(raw);
            if e.kind == ErrorKind::NotFound && e.message.starts_with("could not start") {
                eprintln!("runctl: {instance}: {}", e.message);
                return Ok(127);
            }
            return Err(refusal(instance, e));
        }
        _ => {
            drop(raw);
            return Err(UserError::new(
                ErrorCode::Agent,
                format!("{instance}'s agent ended the stream before starting the command"),
            ));
        }
    }
    let tty = raw.is_some();
    let mut stdin = forward_stdin.then(stdin_chunks);
    let signal_err = |e: std::io::Error| {
        UserError::new(ErrorCode::Internal, format!("listening for signals: {e}"))
    };
    let mut sigint = signal(SignalKind::interrupt()).map_err(signal_err)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(signal_err)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(signal_err)?;
    let mut winch = signal(SignalKind::window_change()).map_err(signal_err)?;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let (mut interrupts, mut hung_up) = (0, false);
    let ended = loop {
        let input = tokio::select! {
            frame = frames.recv() => match frame {
                Some(Ok(Some(ExecOutput::Stdout(bytes)))) => {
                    let _ = out.write_all(&bytes).and_then(|()| out.flush());
                    continue;
                }
                Some(Ok(Some(ExecOutput::Stderr(bytes)))) => {
                    let _ = err.write_all(&bytes).and_then(|()| err.flush());
                    continue;
                }
                Some(Ok(Some(ExecOutput::Ended(status)))) => break Some(status),
                _ => break None,
            },
            chunk = async { stdin.as_mut().expect("guarded").recv().await }, if stdin.is_some() => match chunk {
                Some(bytes) => ExecInput::Stdin(bytes),
                None => {
                    stdin = None;
                    if tty {
                        continue;
                    }
                    ExecInput::StdinEnd
                }
            },
            _ = sigint.recv() => {
                // A command that ignores SIGINT must not hold the terminal: the third
                // Ctrl-C hangs up (the remote command gets SIGHUP, as from a dropped ssh).
                interrupts += 1;
                if interrupts >= HANG_UP_AFTER {
                    hung_up = true;
                    break None;
                }
                ExecInput::Signal(2)
            }
            _ = sigterm.recv() => ExecInput::Signal(15),
            _ = sighup.recv() => ExecInput::Signal(1),
            _ = winch.recv(), if tty => ExecInput::Resize(terminal_size()),
        };
        if write_frame(&mut write, &input).await.is_err() {
            break None;
        }
    };
    drop(raw);
    match ended {
        Some(status) => Ok(status.code()),
        None if hung_up => {
            eprintln!("runctl: hung up on the command on {instance} (it gets SIGHUP)");
            Ok(LOST)
        }
        None => {
            let lead = if tty { "\r\n" } else { "" };
            eprintln!("{lead}runctl: the connection to {instance} was lost");
            Ok(LOST)
        }
    }
}

pub async fn forward(home: &Home, printer: Printer, args: ForwardArgs) -> anyhow::Result<u8> {
    let mut client = Client::connect(home).await?;
    let target = args.target.clone();
    client
        .send(&Request::Forward {
            target: args.target,
            forwards: args.forwards,
            bind: args.bind,
        })
        .await?;
    let mut interrupted = signal(SignalKind::interrupt())?;
    loop {
        let response = tokio::select! {
            response = client.next() => response?,
            _ = interrupted.recv() => return Ok(0),
        };
        match response {
            Some(Response::Forwarding(views)) => {
                if printer.format == Format::Json {
                    printer.data(&views, String::new);
                }
                for view in &views {
                    eprintln!(
                        "runctl: forwarding {} to {} on {target}",
                        view.local, view.remote
                    );
                }
            }
            Some(Response::Progress(line)) => eprintln!("runctl: {line}"),
            Some(Response::Error(e)) => return Err(e.into()),
            Some(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
            None => {
                return Err(UserError::new(
                    ErrorCode::DaemonUnavailable,
                    "the daemon closed the connection: the forwards are gone",
                )
                .resolve("check it with: runctl-controller status")
                .into());
            }
        }
    }
}

/// Opens the forwards of `run --forward` for as long as the returned task runs.
pub fn forward_for_run(
    home: Home,
    run: protocol::RunId,
    forwards: Vec<ForwardSpec>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let request = Request::Forward {
            target: Target::Run(run),
            forwards,
            bind: std::net::IpAddr::from([127, 0, 0, 1]),
        };
        let mut client = match Client::connect(&home).await {
            Ok(client) => client,
            Err(e) => return eprintln!("runctl: no forward: {}", e.message),
        };
        if let Err(e) = client.send(&request).await {
            return eprintln!("runctl: no forward: {}", e.message);
        }
        while let Ok(Some(response)) = client.next().await {
            match response {
                Response::Forwarding(views) => {
                    for view in views {
                        eprintln!("runctl: forwarding {} to {}", view.local, view.remote);
                    }
                }
                Response::Progress(line) => eprintln!("runctl: {line}"),
                Response::Error(e) => return eprintln!("runctl: no forward: {}", e.message),
                _ => {}
            }
        }
    })
}

/// One side of `cp`: `RUN:PATH` / `INSTANCE:PATH`, or a local path (anything whose part
/// before the first `:` is not a run id or an instance name, or holds a `/`).
fn remote_side(arg: &str) -> Option<(Target, String)> {
    let (head, path) = arg.split_once(':')?;
    if head.contains('/') {
        return None;
    }
    let target = crate::cli::parse_target(head).ok()?;
    Some((
        target,
        if path.is_empty() {
            ".".into()
        } else {
            path.into()
        },
    ))
}

/// What `cp` did, for `--output json`.
#[derive(Debug, serde::Serialize)]
struct Copied {
    to: String,
    bytes: u64,
    files: u64,
}

pub async fn cp(home: &Home, printer: Printer, args: CpArgs) -> anyhow::Result<u8> {
    match (remote_side(&args.source), remote_side(&args.dest)) {
        (Some((target, path)), None) => download(home, printer, target, path, &args.dest).await,
        (None, Some((target, path))) => upload(home, printer, &args.source, target, path).await,
        (Some(_), Some(_)) => Err(UserError::new(
            ErrorCode::BadInput,
            "both sides of cp are remote",
        )
        .resolve("copy to this machine first, then on: cp RUN:PATH ./local && cp ./local OTHER:PATH")
        .into()),
        (None, None) => Err(UserError::new(ErrorCode::BadInput, "neither side of cp is remote")
            .resolve("name one side RUN:PATH or INSTANCE:PATH, e.g. cp run-3f9a2c1b7d4e:outputs ./outputs")
            .into()),
    }
}

fn bar(printer: Printer, source: &CopySource, verb: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() || printer.quiet {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(source.bytes + source.files * 512),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{verb} {{msg}} {{bytes}}/{{total_bytes}} ({{bytes_per_sec}}) {{wide_bar}}"
        ))
        .expect("a valid template"),
    );
    bar.set_message(source.name.clone());
    Some(bar)
}

fn report(printer: Printer, to: &Path, source: &CopySource) {
    let copied = Copied {
        to: to.display().to_string(),
        bytes: source.bytes,
        files: source.files,
    };
    if printer.format == Format::Json {
        printer.data(&copied, String::new);
    } else {
        let what = match source.kind {
            CopyKind::File => bytes_words(source.bytes),
            CopyKind::Dir => format!("{} files, {}", source.files, bytes_words(source.bytes)),
        };
        eprintln!(
            "runctl: copied {} ({what}) to {}",
            source.name,
            to.display()
        );
    }
}

async fn download(
    home: &Home,
    printer: Printer,
    target: Target,
    path: String,
    dest: &str,
) -> anyhow::Result<u8> {
    let (stream, instance) = open_stream(home, target, Open::CopyOut { path }).await?;
    let (mut read, _write) = stream.into_split();
    let head: CopyHead = read_frame(&mut read).await?.ok_or_else(|| {
        UserError::new(
            ErrorCode::Agent,
            format!("{instance}'s agent closed the stream"),
        )
    })?;
    let source = head.result.map_err(|e| refusal(&instance, e))?;
    let dest_path = PathBuf::from(dest);
    let found = match std::fs::metadata(&dest_path) {
        Ok(m) if m.is_dir() => Found::Dir,
        Ok(_) => Found::File,
        Err(_) => Found::Nothing,
    };
    let parent = match dest_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let landing = protocol::streams::landing(
        &dest_path,
        dest.ends_with('/'),
        found,
        parent.is_dir(),
        source.kind,
        &source.name,
    )
    .map_err(|m| UserError::new(ErrorCode::BadInput, m))?;
    let into = landing
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_owned);
    let bar = bar(printer, &source, "copying");
    let (bar2, source2, landing2) = (bar.clone(), source.clone(), landing.clone());
    let bridge = SyncIoBridge::new(read);
    let placed = tokio::task::spawn_blocking(move || {
        let staged = protocol::copy::unpack(bridge, &source2, &into, |n| {
            if let Some(bar) = &bar2 {
                bar.inc(n);
            }
        })?;
        staged
            .place(&landing2)
            .map_err(|e| format!("moving the copy to {}: {e}", landing2.display()))
    })
    .await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    placed.map_err(|m| {
        UserError::new(
            ErrorCode::Agent,
            format!(
                "copying {} from {instance}: {m}; nothing was left at {}",
                source.name,
                landing.display()
            ),
        )
    })?;
    report(printer, &landing, &source);
    Ok(0)
}

async fn upload(
    home: &Home,
    printer: Printer,
    local: &str,
    target: Target,
    path: String,
) -> anyhow::Result<u8> {
    let local_path = std::fs::canonicalize(local)
        .map_err(|e| UserError::new(ErrorCode::BadInput, format!("{local}: {e}")))?;
    let source = protocol::copy::scan(&local_path)
        .map_err(|e| UserError::new(ErrorCode::BadInput, format!("{local}: {e}")))?;
    let (stream, instance) = open_stream(home, target, Open::CopyIn { path }).await?;
    let (mut read, mut write) = stream.into_split();
    write_frame(
        &mut write,
        &CopyInHead {
            source: source.clone(),
        },
    )
    .await?;
    let ready: CopyReady = read_frame(&mut read).await?.ok_or_else(|| {
        UserError::new(
            ErrorCode::Agent,
            format!("{instance}'s agent closed the stream"),
        )
    })?;
    let at = ready.result.map_err(|e| refusal(&instance, e))?;
    let bar = bar(printer, &source, "copying");
    let (bar2, name) = (bar.clone(), source.name.clone());
    let bridge = SyncIoBridge::new(write);
    let (packed, write) = tokio::task::spawn_blocking(move || {
        let mut bridge = bridge;
        let packed = protocol::copy::pack(&local_path, &name, &mut bridge, |n| {
            if let Some(bar) = &bar2 {
                bar.inc(n);
            }
        });
        (packed, bridge.into_inner())
    })
    .await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    packed.map_err(|e| UserError::new(ErrorCode::BadInput, format!("reading {local}: {e}")))?;
    let mut write = write;
    tokio::io::AsyncWriteExt::shutdown(&mut write).await?;
    let done: CopyDone = read_frame(&mut read).await?.ok_or_else(|| {
        UserError::new(
            ErrorCode::Agent,
            format!("the connection to {instance} was lost before the copy was in place"),
        )
    })?;
    done.result.map_err(|e| refusal(&instance, e))?;
    report(printer, Path::new(&at), &source);
    Ok(0)
}
