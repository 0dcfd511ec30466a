//! What each command does: resolve settings, talk to the daemon, print through the
//! `Printer`, and choose the exit code.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use protocol::{InstanceName, RunId, Setup};

use crate::cli::{self, Cli, Command, LogsArgs, RunArgs, SyncArgs, TopArgs};
use crate::config::Config;
use crate::daemon::now_ms;
use crate::error::{ErrorCode, UserError};
use crate::home::Home;
use crate::ipc::{Client, Request, Response, Restart, RunRequest, SyncReport, SyncRequest};
use crate::report::{self, Format, Printer};

/// The whole CLI: parse, run, print, exit.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    use std::io::IsTerminal;
    let printer = Printer {
        format: cli.output,
        tty: std::io::stdout().is_terminal() && std::io::stderr().is_terminal(),
        quiet: cli.quiet,
    };
    match run(cli, printer) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let user = UserError::from_anyhow(&e);
            printer.error(&user);
            ExitCode::from(user.code.exit_code())
        }
    }
}

/// Clap's own errors, as JSON when JSON output was asked for.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let args: Vec<String> = std::env::args().collect();
    let json = args
        .windows(2)
        .any(|w| w[0] == "--output" && w[1] == "json")
        || args.iter().any(|a| a == "--output=json")
        || std::env::var("RUNCTL_OUTPUT").is_ok_and(|v| v == "json");
    if json {
        let message = e.render().to_string();
        let error = UserError::new(
            ErrorCode::BadInput,
            message.trim().trim_start_matches("error: "),
        )
        .resolve("see runctl-controller --help");
        Printer {
            format: Format::Json,
            tty: false,
            quiet: false,
        }
        .error(&error);
        ExitCode::from(ErrorCode::BadInput.exit_code())
    } else {
        let _ = e.print();
        ExitCode::from(ErrorCode::BadInput.exit_code())
    }
}

fn run(cli: Cli, printer: Printer) -> anyhow::Result<u8> {
    // These need neither a home nor a valid config.
    match cli.command {
        Command::Completions(args) => return completions(args),
        Command::Man(args) => return man(printer, args),
        _ => {}
    }
    let home = Home::resolve(cli.home)?;
    // Needs the file, not a valid one: it is how a broken file gets fixed.
    if let Command::Config(cmd) = cli.command {
        return config_command(&home, printer, cmd);
    }
    // Reports a broken file as one of its checks.
    if let Command::Doctor = cli.command {
        return tokio::runtime::Runtime::new()?.block_on(doctor(&home, printer));
    }
    // Checked here as well as in the daemon, so a bad file is reported before anything starts.
    let config = Config::load(&home.config())?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Daemon => daemon(home, config).await,
            Command::Shutdown => shutdown(&home, printer).await,
            // Answered before the config was read; the same calls here.
            Command::Config(cmd) => config_command(&home, printer, cmd),
            Command::Doctor => doctor(&home, printer).await,
            Command::Completions(args) => completions(args),
            Command::Man(args) => man(printer, args),
            Command::Status => {
                let Response::Status(status) = Client::call(&home, &Request::Status).await? else {
                    anyhow::bail!("unexpected answer to status");
                };
                printer.data(&status, || report::status_text(&status));
                Ok(0)
            }
            Command::List(args) => {
                let Response::List(mut list) = Client::call(&home, &Request::List).await? else {
                    anyhow::bail!("unexpected answer to list");
                };
                if !args.all {
                    list.instances.retain(|v| report::listed(&v.row, now_ms()));
                }
                printer.data(&list, || report::list_text(&list, now_ms()));
                Ok(0)
            }
            Command::Launch(args) => {
                use std::io::IsTerminal;
                let options = cli::launch_options(
                    args.provider,
                    args.instance_type,
                    &args.ec2,
                    &args.runpod,
                )?;
                printer.progress(&format!("launching {}", options.kind().an_instance()));
                let wait = args.wait || (!args.no_wait && std::io::stdout().is_terminal());
                let request = Request::Launch {
                    options,
                    name: args.name,
                    wait,
                };
                let Response::Launched(view) = call_with_progress(&home, printer, &request).await?
                else {
                    anyhow::bail!("unexpected answer to launch");
                };
                printer.data(&view, || format!("{}\n", view.row.name));
                Ok(0)
            }
            Command::Start(args) => {
                printer.progress(&format!("starting {}", args.name));
                let request = Request::StartInstance { name: args.name };
                let Response::Instance(view) = Client::call(&home, &request).await? else {
                    anyhow::bail!("unexpected answer to start");
                };
                printer.data(&view, || {
                    format!(
                        "started {}; its agent reconnects once it boots\n",
                        view.row.name
                    )
                });
                Ok(0)
            }
            Command::Volume(cmd) => crate::volumes::volume(&config, printer, cmd).await,
            Command::Relay(cmd) => crate::relays::relay(&home, &config, printer, cmd).await,
            Command::Logs(args) => logs(&home, printer, args).await,
            Command::Top(args) => top(&home, printer, args).await,
            Command::Sync(args) => sync_command(&home, printer, args).await,
            Command::Stop(args) => {
                printer.progress(&format!("stopping {}", args.target));
                let Ok(run) = args.target.parse::<RunId>() else {
                    let name: InstanceName = args.target.parse().map_err(|e| {
                        UserError::new(
                            ErrorCode::BadInput,
                            format!(
                                "{:?} is neither a run id nor an instance name: {e}",
                                args.target
                            ),
                        )
                        .resolve("see both with: runctl-controller list")
                    })?;
                    let request = Request::StopInstance {
                        name,
                        force: args.force,
                    };
                    let Response::Instance(view) = Client::call(&home, &request).await? else {
                        anyhow::bail!("unexpected answer to stop");
                    };
                    printer.data(&view, || {
                        format!(
                            "stopped {} (start it again: runctl-controller start {})\n",
                            view.row.name, view.row.name
                        )
                    });
                    return Ok(0);
                };
                let request = Request::Stop {
                    run,
                    grace_secs: args.grace,
                };
                let Response::Run(row) = Client::call(&home, &request).await? else {
                    anyhow::bail!("unexpected answer to stop");
                };
                printer.data(&row, || report::run_summary(&row));
                Ok(0)
            }
            Command::Terminate(args) => {
                printer.progress(&format!("terminating {}", args.name));
                let request = Request::Terminate {
                    name: args.name,
                    force: args.force,
                };
                let Response::Terminated(view) = Client::call(&home, &request).await? else {
                    anyhow::bail!("unexpected answer to terminate");
                };
                printer.data(&view, || format!("terminated {}\n", view.row.name));
                Ok(0)
            }
            Command::Run(args) => run_command(&home, printer, *args).await,
            Command::S3(cmd) => crate::objects::s3(&home, &config, printer, cmd).await,
            Command::Exec(args) => crate::remote::exec(&home, args).await,
            Command::Shell(args) => crate::remote::shell(&home, args).await,
            Command::Forward(args) => crate::remote::forward(&home, printer, args).await,
            Command::Cp(args) => crate::remote::cp(&home, printer, args).await,
            Command::Checkpoint(cmd) => {
                crate::objects::checkpoint(&home, &config, printer, cmd).await
            }
        }
    })
}

async fn daemon(home: Home, config: Config) -> anyhow::Result<u8> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUNCTL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(report::colour_on_stderr())
        .init();
    let bound = crate::daemon::bind(&home, &config)?;
    crate::daemon::serve(home, config, bound, async {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    })
    .await?;
    Ok(0)
}

/// Stops the daemon by signal (not over the socket, so it works across versions too).
async fn shutdown(home: &Home, printer: Printer) -> anyhow::Result<u8> {
    let pid = std::fs::read_to_string(home.pid())
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let running = Client::connect_existing(home)
        .await
        .ok()
        .flatten()
        .is_some()
        || home.socket().exists();
    let Some(pid) = pid.filter(|_| running) else {
        printer.data(
            &serde_json::json!({ "stopped": false, "running": false }),
            || "no daemon is running".into(),
        );
        return Ok(0);
    };
    let target = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM).map_err(|e| {
        UserError::new(
            ErrorCode::DaemonUnavailable,
            format!("cannot signal the daemon (pid {pid}): {e}"),
        )
    })?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while nix::sys::signal::kill(target, None).is_ok() {
        if tokio::time::Instant::now() >= deadline {
            return Err(UserError::new(
                ErrorCode::DaemonUnavailable,
                format!("the daemon (pid {pid}) did not stop within 15 s"),
            )
            .resolve(format!("kill it: kill -9 {pid}"))
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    printer.data(&serde_json::json!({ "stopped": true, "pid": pid }), || {
        format!("daemon {pid} stopped")
    });
    Ok(0)
}

/// `sync`: once, or with `--watch` after every burst of local changes until Ctrl-C.
async fn sync_command(home: &Home, printer: Printer, args: SyncArgs) -> anyhow::Result<u8> {
    let root = match &args.root {
        Some(root) => Some(crate::sync::root::resolve(root, Some(root))?.root),
        None => None,
    };
    let request = SyncRequest {
        run: args.run,
        root,
        dry_run: args.dry_run,
        restart: match (args.restart, args.watch) {
            (false, _) => Restart::Never,
            (true, false) => Restart::Always,
            (true, true) => Restart::IfChanged,
        },
    };
    let first = sync_once(home, printer, &request).await?;
    printer.data(&first, || report::sync_text(&first));
    if !args.watch {
        return Ok(0);
    }
    let root = std::path::PathBuf::from(&first.root);
    let mut watch = crate::sync::watch::ProjectWatch::new(&root, home.root())?;
    printer.progress(&format!("watching {} (Ctrl-C to stop)", root.display()));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(0),
            changed = watch.changed() => {
                if changed.is_none() {
                    anyhow::bail!("the file watcher stopped");
                }
            }
        }
        match sync_once(home, printer, &request).await {
            Ok(report) => printer.data(&report, || report::sync_text(&report)),
            // Passing trouble (the agent reconnecting, a file edited mid-sync): the next
            // change tries again.
            Err(e) if matches!(e.code, ErrorCode::Agent | ErrorCode::BadInput) => printer.error(&e),
            Err(e) => return Err(e.into()),
        }
    }
}

/// One sync through the daemon, drawing its progress on stderr when that is a terminal.
async fn sync_once(
    home: &Home,
    printer: Printer,
    request: &SyncRequest,
) -> Result<SyncReport, UserError> {
    let mut client = Client::connect(home).await?;
    client.send(&Request::Sync(request.clone())).await?;
    let mut bar: Option<indicatif::ProgressBar> = None;
    let result = loop {
        match client.next().await {
            Ok(Some(Response::SyncProgress(p))) => {
                if printer.format == Format::Human
                    && printer.tty
                    && !printer.quiet
                    && p.total_bytes > 0
                {
                    let bar = bar.get_or_insert_with(|| progress_bar(p.total_bytes));
                    bar.set_position(p.bytes);
                    bar.set_message(format!("{}/{} files", p.files, p.total_files));
                }
            }
            Ok(Some(Response::Synced(report))) => break Ok(report),
            Ok(Some(Response::Error(e))) | Err(e) => break Err(e),
            Ok(Some(other)) => {
                break Err(UserError::new(
                    ErrorCode::Internal,
                    format!("unexpected answer to sync: {other:?}"),
                ));
            }
            Ok(None) => break Err(daemon_gone()),
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result
}

fn progress_bar(total_bytes: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total_bytes),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "syncing {msg} {bytes}/{total_bytes} ({bytes_per_sec}) {wide_bar}",
        )
        .expect("a valid template"),
    );
    bar
}

async fn logs(home: &Home, printer: Printer, args: LogsArgs) -> anyhow::Result<u8> {
    let follow = args.follow;
    let since_ms = args.since.map(|t| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    });
    let window = Window {
        since_ms,
        tail: args.tail,
        node: args.node,
    };
    let row = stream_run(home, printer, &args.run, follow, 0, window).await?;
    if printer.format == Format::Json {
        printer.data(&row, String::new);
    } else if row.state.is_terminal() || follow {
        printer.progress(&report::run_summary(&row));
    }
    Ok(if follow { report::exit_status(&row) } else { 0 })
}

/// Stdout's reader went away (`logs -f | head`): end quietly and at once, as a command in a
/// pipeline does on SIGPIPE. Nothing of the run is touched.
fn reader_gone() -> ! {
    std::process::exit(0)
}

/// How often a follower reconnects to a daemon that went away before giving up.
const RECONNECTS: u32 = 5;

/// Prints the run's events after `after_seq` (with `follow`, until it ends) and returns its
/// final row. If the daemon goes away meanwhile, it is started again and the stream
/// resumes after the last event printed: nothing is shown twice or skipped.
async fn stream_run(
    home: &Home,
    printer: Printer,
    run: &RunId,
    follow: bool,
    mut after_seq: u64,
    window: Window,
) -> anyhow::Result<crate::db::RunRow> {
    let mut lost = 0;
    loop {
        let lost_daemon =
            match stream_once(home, printer, run, follow, &mut after_seq, window).await {
                Ok(row) => return Ok(row),
                Err(e) if e.code == ErrorCode::DaemonUnavailable && lost < RECONNECTS => e,
                Err(e) => return Err(e.into()),
            };
        lost += 1;
        printer.progress(&format!("{}; reconnecting", lost_daemon.message));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Which part of a run's log `logs` shows (after any resume point).
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    since_ms: Option<u64>,
    tail: Option<u64>,
    /// One node's events alone (a run of several nodes).
    node: Option<u32>,
}

async fn stream_once(
    home: &Home,
    printer: Printer,
    run: &RunId,
    follow: bool,
    after_seq: &mut u64,
    window: Window,
) -> Result<crate::db::RunRow, UserError> {
    let mut client = Client::connect(home).await?;
    let request = Request::Logs {
        run: run.clone(),
        follow,
        after_seq: *after_seq,
        since_ms: window.since_ms,
        tail: window.tail,
        node: window.node,
    };
    client.send(&request).await?;
    loop {
        match client.next().await? {
            Some(Response::Event(event)) => {
                *after_seq = event.seq;
                if !printer.event(&event, None) {
                    reader_gone();
                }
            }
            Some(Response::NodeEvent { node, event }) => {
                *after_seq = event.seq;
                if !printer.event(&event, Some(node)) {
                    reader_gone();
                }
            }
            Some(Response::Progress(_)) => {}
            Some(Response::Run(row)) => return Ok(row),
            Some(Response::Error(e)) => return Err(e),
            Some(other) => {
                return Err(UserError::new(
                    ErrorCode::Internal,
                    format!("unexpected answer to logs: {other:?}"),
                ));
            }
            None => return Err(daemon_gone()),
        }
    }
}

/// Sends `request` and prints the daemon's phase lines until its answer.
async fn call_with_progress(
    home: &Home,
    printer: Printer,
    request: &Request,
) -> Result<Response, UserError> {
    let mut client = Client::connect(home).await?;
    client.send(request).await?;
    loop {
        match client.next().await? {
            Some(Response::Progress(line)) => printer.progress(&line),
            Some(Response::Error(e)) => return Err(e),
            Some(other) => return Ok(other),
            None => return Err(daemon_gone()),
        }
    }
}

fn daemon_gone() -> UserError {
    UserError::new(
        ErrorCode::DaemonUnavailable,
        "the daemon closed the connection",
    )
}

/// What Ctrl-C acts on: the run once the daemon has named it.
#[derive(Debug, Default)]
struct Interrupt {
    run: Option<RunId>,
    stop_asked: bool,
}

async fn run_command(home: &Home, printer: Printer, mut args: RunArgs) -> anyhow::Result<u8> {
    let start = args.workdir.clone().unwrap_or_else(|| ".".into());
    let mut project = crate::sync::root::resolve(&start, args.root.as_deref())?;
    let file_path = project.root.join(crate::runfile::FILE_NAME);
    let run_file = crate::runfile::load(&file_path)?;
    let from_file = match (&run_file, &args.profile) {
        (Some(file), profile) => {
            let section = file.section(profile.as_deref())?;
            let file_workdir = section.workdir.clone().filter(|_| args.workdir.is_none());
            crate::runfile::apply(&mut args, section);
            if let Some(dir) = file_workdir {
                project = crate::runfile::workdir(&project.root, &dir)?;
            }
            true
        }
        (None, Some(profile)) => {
            return Err(UserError::new(
                ErrorCode::BadInput,
                format!(
                    "--profile {profile}: there is no {} at the project root {}",
                    crate::runfile::FILE_NAME,
                    project.root.display()
                ),
            )
            .resolve(
                "create it with a [profile.NAME] table (see the README), or leave out --profile",
            )
            .into());
        }
        (None, None) => false,
    };
    if args.command.is_empty() {
        return Err(UserError::new(ErrorCode::BadInput, "no command given")
            .resolve("put the command after `--`: runctl-controller run -- python train.py")
            .resolve(format!(
                "or set it once in {} at the project root: [run] command = \"python train.py\"",
                crate::runfile::FILE_NAME
            ))
            .into());
    }
    if let Some(on) = &args.on
        && (args.ec2.any() || args.runpod.any())
    {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("launch options (--spot, --gpu, --ami, ...) do not apply to --on {on}: that instance exists already"),
        )
        .resolve("leave them out, or launch a new instance for the run: drop --on and add --provider")
        .into());
    }
    let secrets = crate::secrets::read(&args.secret)?;
    let launcher = cli::launch_from(
        args.launcher,
        args.nproc_per_node,
        args.nodes,
        &args.command,
    )?;
    let request = RunRequest {
        root: project.root,
        cwd: project.cwd,
        argv: args.command,
        env: args.env,
        on: args.on,
        launch: cli::launch_options(
            args.provider
                .unwrap_or(crate::provider::ProviderKind::Local),
            args.instance_type,
            &args.ec2,
            &args.runpod,
        )?,
        keep: args.keep,
        detach: args.detach,
        setup: setup_from(&args.setup)?,
        restart: args.restart.unwrap_or(protocol::RestartPolicy::Never),
        stop_grace_secs: args.stop_grace,
        end: args.end.map(Into::into),
        spot_signal: args.spot_signal.unwrap_or(15),
        data: args.data,
        pull_alongside: args.pull_alongside,
        checkpoints: if args.no_checkpoints {
            Some(String::new())
        } else {
            args.checkpoints
        },
        keep_checkpoints: args.keep_checkpoints,
        resume_from: args.resume_from,
        secrets,
        max_cost: args.max_cost,
        max_hours: args.max_hours,
        launcher,
        checkpoints_from_all: args.checkpoints_from == Some(cli::CheckpointsFrom::All),
        on_interrupt: args.on_interrupt.unwrap_or_default(),
    };
    // A tree synced before is never asked about: it is not even walked here.
    let synced_before = crate::sync::scan::cache_path(&home.sync_dir(), &request.root).exists();
    let tree = if args.dry_run || !synced_before {
        crate::sync::scan::measure(&request.root, home.root())?
    } else {
        crate::sync::scan::TreeSize::default()
    };
    if args.dry_run {
        let resolved = report::DryRun {
            run_file: from_file.then_some(file_path),
            profile: args.profile,
            secrets: args.secret,
            request: &request,
            tree,
        };
        printer.data(&resolved, || report::dry_run_text(&resolved));
        return Ok(0);
    }
    if !send_big_tree(printer, &request.root, &tree, synced_before, args.yes)? {
        return Ok(ErrorCode::BadInput.exit_code());
    }
    let detach = request.detach;
    let forwards = args.forward;
    let request = Request::Run(Box::new(request));
    let mut client = Client::connect(home).await?;
    client.send(&request).await?;

    let interrupt = Arc::new(Mutex::new(Interrupt::default()));
    if !detach {
        tokio::spawn(watch_ctrl_c(home.clone(), printer, interrupt.clone()));
    }
    let mut accepted: Option<RunId> = None;
    let mut last_seq = 0u64;
    // `--forward`: opened once the command has started, closed when the run is over.
    let mut forwarding: Option<tokio::task::JoinHandle<()>> = None;
    let row = loop {
        let next = match client.next().await {
            Ok(Some(Response::Error(e))) if e.code != ErrorCode::DaemonUnavailable => {
                return Err(e.into());
            }
            Ok(Some(Response::Error(e))) | Err(e) => Err(e),
            Ok(None) => Err(daemon_gone()),
            Ok(Some(response)) => Ok(response),
        };
        let response = match (next, &accepted) {
            (Ok(response), _) => response,
            // The daemon went away (killed, restarted, laptop slept): the run goes on, so
            // follow it from the last event shown.
            (Err(e), Some(run)) if !detach => {
                printer.progress(&format!("{}; reconnecting", e.message));
                break stream_run(home, printer, run, true, last_seq, Window::default()).await?;
            }
            (Err(e), _) => {
                return Err(e
                    .resolve("the run may still be going: runctl-controller list")
                    .into());
            }
        };
        match response {
            Response::Progress(message) => printer.progress(&message),
            Response::RunAccepted {
                run,
                instance,
                launched,
            } => {
                let on = if launched {
                    format!("new instance {instance}")
                } else {
                    instance.to_string()
                };
                printer.progress(&format!("run {run} on {on}"));
                let stop_now = {
                    let mut state = interrupt.lock().expect("interrupt lock");
                    state.run = Some(run.clone());
                    state.stop_asked
                };
                if stop_now {
                    request_stop(home, printer, run.clone());
                }
                accepted = Some(run);
            }
            Response::Event(_) | Response::NodeEvent { .. } => {
                let (node, event) = match response {
                    Response::NodeEvent { node, event } => (Some(node), event),
                    Response::Event(event) => (None, event),
                    _ => unreachable!("matched above"),
                };
                last_seq = event.seq;
                if !printer.event(&event, node) {
                    if let Some(run) = &accepted {
                        eprintln!(
                            "runctl: the output's reader went away; run {run} goes on (runctl-controller logs -f {run})"
                        );
                    }
                    reader_gone();
                }
                if let (protocol::EventKind::Started { .. }, None, Some(run)) =
                    (&event.kind, &forwarding, &accepted)
                    && !forwards.is_empty()
                {
                    forwarding = Some(crate::remote::forward_for_run(
                        home.clone(),
                        run.clone(),
                        forwards.clone(),
                    ));
                }
            }
            Response::Run(row) => break row,
            other => anyhow::bail!("unexpected answer to run: {other:?}"),
        }
    };
    if let Some(forwarding) = forwarding {
        forwarding.abort();
    }
    if detach {
        printer.data(&row, || format!("{}\n", row.id));
        if row.state.is_terminal() {
            // It was over before there was anything to detach from.
            printer.progress(&report::run_summary(&row));
            return Ok(report::exit_status(&row));
        }
        if printer.format == Format::Human {
            printer.progress(&format!(
                "follow it with: runctl-controller logs -f {}",
                row.id
            ));
        }
        return Ok(0);
    }
    if printer.format == Format::Json {
        printer.data(&row, String::new);
    } else {
        printer.progress(&report::run_summary(&row));
    }
    Ok(report::exit_status(&row))
}

/// Before a big tree's first sync: says how big it is and, on a terminal, asks. `false`
/// when the user said no.
fn send_big_tree(
    printer: Printer,
    root: &std::path::Path,
    tree: &crate::sync::scan::TreeSize,
    synced_before: bool,
    yes: bool,
) -> anyhow::Result<bool> {
    use crate::sync::big::{self, Decision};
    use std::io::IsTerminal;
    let terminal = printer.tty && std::io::stdin().is_terminal();
    match big::decide(tree, synced_before, yes, terminal) {
        Decision::Send => Ok(true),
        Decision::Warn => {
            printer.warn(&big::describe(tree, root));
            Ok(true)
        }
        Decision::Ask => {
            printer.warn(&big::describe(tree, root));
            eprint!("runctl: send it all? [y/N] (--yes skips this question) ");
            let mut answer = String::new();
            std::io::stdin().read_line(&mut answer)?;
            let yes = matches!(answer.trim(), "y" | "Y" | "yes");
            if !yes {
                printer.warn("nothing was sent or launched");
            }
            Ok(yes)
        }
    }
}

/// `config ...`: read and edit config.toml by dotted key.
fn config_command(home: &Home, printer: Printer, cmd: cli::ConfigCommand) -> anyhow::Result<u8> {
    use crate::settings;
    use cli::ConfigCommand;
    let path = home.config();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(UserError::new(
                ErrorCode::BadInput,
                format!("cannot read {}: {e}", path.display()),
            )
            .into());
        }
    };
    let loaded = || Config::load(&path);
    match cmd {
        ConfigCommand::Path => {
            printer.data(&serde_json::json!({ "path": path }), || {
                format!("{}\n", path.display())
            });
        }
        ConfigCommand::Show => {
            let shown = settings::show(&loaded()?, &text);
            printer.data(&shown, || {
                let width = shown.iter().map(|s| s.key.len()).max().unwrap_or(0);
                shown
                    .iter()
                    .map(|s| {
                        let value = if s.value.is_null() {
                            "(not set)".to_owned()
                        } else {
                            settings::bare(&s.value)
                        };
                        format!("{:width$}  {value}  ({})\n", s.key, s.source)
                    })
                    .collect()
            });
        }
        ConfigCommand::Get { key } => {
            let setting = settings::get(&settings::show(&loaded()?, &text), &key)?;
            printer.data(&setting, || format!("{}\n", settings::bare(&setting.value)));
        }
        ConfigCommand::Set { key, value } => {
            let edited = settings::set(&text, &key, &value)?;
            home.ensure()?;
            settings::write(&path, &edited)?;
            // A key under a table of names (ec2.prices.TYPE) is not listed on its own.
            let setting = settings::get(&settings::show(&Config::load(&path)?, &edited), &key)
                .unwrap_or_else(|_| settings::Setting {
                    key: key.clone(),
                    value: value.clone().into(),
                    source: "file".into(),
                });
            printer.data(&setting, || {
                format!("{} = {}\n", key, settings::bare(&setting.value))
            });
            printer
                .progress("the daemon reads it when it next starts (runctl-controller shutdown)");
        }
        ConfigCommand::Unset { key } => {
            let edited = settings::unset(&text, &key)?;
            if edited != text {
                settings::write(&path, &edited)?;
            }
            let setting = settings::get(&settings::show(&Config::load(&path)?, &edited), &key)?;
            printer.data(&setting, || {
                format!("{} = {} (default)\n", key, settings::bare(&setting.value))
            });
        }
        ConfigCommand::Validate { file } => {
            let file = file.unwrap_or(path);
            settings::validate(&file)?;
            printer.data(&serde_json::json!({ "file": file, "valid": true }), || {
                format!("{} is valid\n", file.display())
            });
        }
    }
    Ok(0)
}

/// `doctor`: every check, one line each; 1 when one failed.
async fn doctor(home: &Home, printer: Printer) -> anyhow::Result<u8> {
    let checks = crate::doctor::run(home).await;
    printer.data(&checks, || crate::doctor::text(&checks));
    Ok(crate::doctor::exit_code(&checks))
}

/// The completion script for `args.shell`, on stdout.
fn completions(args: cli::CompletionsArgs) -> anyhow::Result<u8> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let shell = match args.shell {
        cli::CompletionShell::Bash => Shell::Bash,
        cli::CompletionShell::Zsh => Shell::Zsh,
        cli::CompletionShell::Fish => Shell::Fish,
    };
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, BIN, &mut script);
    print_bytes(&script)
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) is not an error.
fn print_bytes(bytes: &[u8]) -> anyhow::Result<u8> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(0),
    }
}

const BIN: &str = "runctl-controller";

/// The man page on stdout, or every command's page written into `--dir`.
fn man(printer: Printer, args: cli::ManArgs) -> anyhow::Result<u8> {
    use clap::CommandFactory;
    let command = Cli::command().name(BIN);
    let Some(dir) = args.dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(command).render(&mut page)?;
        return print_bytes(&page);
    };
    std::fs::create_dir_all(&dir).map_err(|e| {
        UserError::new(
            ErrorCode::BadInput,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    clap_mangen::generate_to(command, &dir).map_err(|e| {
        UserError::new(
            ErrorCode::BadInput,
            format!("writing man pages into {}: {e}", dir.display()),
        )
    })?;
    let mut written: Vec<String> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(BIN) && n.ends_with(".1"))
        .collect();
    written.sort();
    printer.data(&written, || {
        format!("wrote {} pages into {}\n", written.len(), dir.display())
    });
    Ok(0)
}

/// `--setup` values: none given is `auto`; `auto` or `none` stand alone; anything else is
/// a list of shell commands.
fn setup_from(values: &[String]) -> Result<Setup, UserError> {
    match values {
        [] => Ok(Setup::Auto),
        [only] if only == "auto" => Ok(Setup::Auto),
        [only] if only == "none" => Ok(Setup::Skip),
        many if many.iter().any(|v| v == "auto" || v == "none") => Err(UserError::new(
            ErrorCode::BadInput,
            "--setup auto and --setup none cannot be combined with other --setup values",
        )
        .resolve("give either one of auto/none, or only commands")),
        many if many.iter().any(|v| v.trim().is_empty()) => Err(UserError::new(
            ErrorCode::BadInput,
            "--setup was given an empty command",
        )
        .resolve("give a shell command, e.g. --setup 'pip install -e .'")),
        many => Ok(Setup::Commands(many.to_vec())),
    }
}

/// `top`: redraws the latest samples in place on a terminal; JSON lines otherwise.
async fn top(home: &Home, printer: Printer, args: TopArgs) -> anyhow::Result<u8> {
    let mut client = Client::connect(home).await?;
    client
        .send(&Request::Top {
            run: args.run.clone(),
        })
        .await?;
    let mut waited = false;
    loop {
        let next = tokio::select! {
            next = client.next() => next?,
            _ = tokio::signal::ctrl_c() => return Ok(0),
            () = tokio::time::sleep(Duration::from_secs(5)), if !waited => {
                waited = true;
                printer.progress("waiting for samples: no agent connected has sent one yet");
                continue;
            }
        };
        match next {
            Some(Response::Stats(shown)) => {
                waited = true;
                use std::io::Write;
                let text = match printer.format {
                    Format::Json => format!("{}\n", serde_json::to_string(&shown)?),
                    // A terminal redraws in place; a pipe gets one block per sample.
                    Format::Human if printer.tty => {
                        format!("\x1b[H\x1b[2J{}", report::top_text(&shown))
                    }
                    Format::Human => format!("{}\n", report::top_text(&shown)),
                };
                let mut out = std::io::stdout().lock();
                if out
                    .write_all(text.as_bytes())
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    return Ok(0); // the reader went away (e.g. `| head`)
                }
            }
            Some(Response::Run(row)) => {
                printer.progress(&report::run_summary(&row));
                return Ok(0);
            }
            Some(Response::Error(e)) => return Err(e.into()),
            Some(other) => anyhow::bail!("unexpected answer to top: {other:?}"),
            None => return Err(daemon_gone().into()),
        }
    }
}

fn request_stop(home: &Home, printer: Printer, run: RunId) {
    let home = home.clone();
    tokio::spawn(async move {
        let request = Request::Stop {
            run,
            grace_secs: None,
        };
        if let Err(e) = Client::call(&home, &request).await {
            printer.error(&e);
        }
    });
}

/// First Ctrl-C: stop the run gracefully and keep streaming. Second: detach.
async fn watch_ctrl_c(home: Home, printer: Printer, interrupt: Arc<Mutex<Interrupt>>) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    let run = {
        let mut state = interrupt.lock().expect("interrupt lock");
        state.stop_asked = true;
        state.run.clone()
    };
    match &run {
        Some(run) => {
            printer.progress(&format!("stopping {run} (Ctrl-C again to detach)"));
            request_stop(&home, printer, run.clone());
        }
        None => printer
            .progress("the run will be stopped as soon as it starts (Ctrl-C again to detach)"),
    }
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    let run = interrupt.lock().expect("interrupt lock").run.clone();
    match run {
        Some(run) => printer.progress(&format!(
            "detached; {run} goes on. Follow it: runctl-controller logs -f {run}"
        )),
        None => printer.progress("detached"),
    }
    std::process::exit(130);
}
