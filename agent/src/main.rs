//! `runctl-agent`: the entry point. Parses flags, loads the config, runs the agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// runctl's agent: runs on the GPU host, dials back to the controller over QUIC with
/// mutual TLS, and runs the jobs it is given. Installed and started by cloud-init, the pod
/// start command, or the controller's local provider; not usually run by hand.
#[derive(Debug, Parser)]
#[command(
    name = "runctl-agent",
    version,
    after_long_help = "Examples:\n  runctl-agent --config /etc/runctl/agent.toml\n  runctl-agent --supervise --config /workspace/runctl/agent.toml\n  RUNCTL_AGENT_CONFIG=./agent.toml runctl-agent"
)]
struct Args {
    /// The agent's config file (TOML: instance, controller endpoints, CA fingerprint,
    /// enrollment token, state dir), written by the controller.
    #[arg(long, env = "RUNCTL_AGENT_CONFIG", value_name = "PATH")]
    config: PathBuf,

    /// Run the agent as a child and keep it running: start it again when it crashes
    /// (backing off from 1 s to 30 s), forward SIGTERM, SIGINT and SIGHUP to it, and reap
    /// orphaned processes. For a container's first process (a RunPod pod's start
    /// command), where nothing else restarts the agent. Exits with the agent's status
    /// when it ends by itself (shut down, powered off, interrupted) or cannot start (an
    /// invalid config, a refused enrollment).
    #[arg(long)]
    supervise: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUNCTL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal, and not under NO_COLOR (no-color.org).
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    if args.supervise {
        return supervise(&args.config);
    }
    let config = match agent::AgentConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(config, shutdown_signal())) {
        Ok(exit) => {
            tracing::info!("agent exiting: {exit:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
    }
}

/// Runs the agent under `agent::supervise` and exits with the status it decides.
fn supervise(config: &std::path::Path) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("error: cannot find this executable to supervise it: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::supervise::run(&exe, config)) {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: supervising the agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
