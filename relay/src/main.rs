//! `runctl-relay`: see the `relay` crate. Parses flags, loads (or makes) the relay's own
//! identity, binds one port number for UDP and TCP, and serves until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use protocol::Fingerprint;

/// Forwards runctl agents' packets to a runctl controller that registered from anywhere.
///
/// The controller (`[daemon] relay = "HOST:PORT"`) dials out to the relay and proves it
/// holds a certificate from the CA given here; agents reach the relay over UDP, or over
/// TLS on TCP where UDP is blocked, on the same port number. The relay sees ciphertext
/// only and cannot act as the controller.
///
/// Examples:
///   runctl-relay --ca-sha256 "$(runctl-controller status --output json | jq -r .ca_sha256)"
///   runctl-relay --listen 0.0.0.0:443 --ca-sha256 3f2a... --state-dir /var/lib/runctl-relay
#[derive(Debug, Parser)]
#[command(name = "runctl-relay", version, verbatim_doc_comment)]
struct Args {
    /// Where to listen, for both UDP and TCP (port 0 picks one free for both).
    #[arg(long, default_value = "0.0.0.0:4433", env = "RUNCTL_RELAY_LISTEN")]
    listen: SocketAddr,
    /// SHA-256 of the controller CA's certificate (64 hex digits, as `runctl-controller
    /// status` shows it): only that controller may register.
    #[arg(long, env = "RUNCTL_RELAY_CA_SHA256")]
    ca_sha256: Fingerprint,
    /// Where the relay keeps its own key and certificate (made on first start).
    #[arg(
        long,
        default_value = "/var/lib/runctl-relay",
        env = "RUNCTL_RELAY_STATE_DIR"
    )]
    state_dir: PathBuf,
    /// Agent UDP addresses tracked at once; packets from new ones beyond it are dropped.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    max_udp_flows: u32,
    /// TCP connections at once (agents' flows and registrations).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_tcp: u32,
}

fn identity(dir: &std::path::Path) -> anyhow::Result<protocol::tls::Identity> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let (crt, key) = (dir.join("relay.crt"), dir.join("relay.key"));
    if let (Ok(cert_pem), Ok(key_pem)) =
        (std::fs::read_to_string(&crt), std::fs::read_to_string(&key))
    {
        return Ok(protocol::tls::Identity { cert_pem, key_pem });
    }
    let id = protocol::tls::self_signed_relay_identity()?;
    protocol::tls::write_private(&key, id.key_pem.as_bytes())
        .with_context(|| format!("writing {}", key.display()))?;
    protocol::tls::write_private(&crt, id.cert_pem.as_bytes())
        .with_context(|| format!("writing {}", crt.display()))?;
    Ok(id)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let id = identity(&args.state_dir)?;
    let tls = protocol::tls::relay_server_config(&id, args.ca_sha256)?;
    let (udp, tcp) = protocol::carrier::bind_udp_and_tcp(args.listen)
        .with_context(|| format!("listening on UDP and TCP {}", args.listen))?;
    udp.set_nonblocking(true)?;
    let udp = tokio::net::UdpSocket::from_std(udp)?;
    let tcp = tokio::net::TcpListener::from_std(tcp)?;
    eprintln!(
        "runctl-relay listening on UDP and TCP {}, serving the controller CA {}",
        udp.local_addr()?,
        args.ca_sha256
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            shutdown.cancel();
        });
    }
    relay::serve(
        relay::Relay {
            udp,
            tcp,
            tls,
            limits: relay::Limits {
                max_udp_flows: args.max_udp_flows as usize,
                max_tcp: args.max_tcp as usize,
            },
        },
        Arc::default(),
        shutdown,
    )
    .await;
    Ok(())
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUNCTL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // One thread: forwarding is a syscall and a copy per packet, and handing each packet
    // between threads would cost more than that (measured: BENCHMARKS.md, the relay).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
