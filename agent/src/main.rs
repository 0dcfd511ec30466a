//! `runctl-agent`: the entry point. Parses flags, loads the config, runs the agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// runctl's agent: runs on the GPU host, dials back to the controller over QUIC with
/// mutual TLS, and runs the jobs it is given. Installed and started by cloud-init, the pod
/// start command, or the controller's local provider; not usually run by hand.
#[derive(Debug, Parser)]
#[command(
    version,
    after_long_help = "Examples:\n  runctl-agent --config /etc/runctl/agent.toml\n  RUNCTL_AGENT_CONFIG=./agent.toml runctl-agent"
)]
struct Args {
    /// The agent's config file (TOML: instance, controller endpoints, CA fingerprint,
    /// enrollment token, state dir), written by the controller.
    #[arg(long, env = "RUNCTL_AGENT_CONFIG", value_name = "PATH")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUNCTL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
