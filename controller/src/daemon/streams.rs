//! The daemon's side of exec, shell, copy and forward: find the target's agent, open the
//! stream on its session, and splice. For exec, shell and copy the CLI's socket is spliced
//! to the agent's stream as it is (the CLI speaks `protocol::streams` itself); for a
//! forward the daemon listens on the local ports and splices each TCP connection to a
//! stream of its own (`protocol::splice`), until the CLI goes away or the run ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protocol::framed::{read_frame, write_frame};
use protocol::streams::{CopyOpen, ExecOpen, ForwardOpen, ForwardReady, Place};
use protocol::{BulkOpen, Feature, InstanceName, WireError};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::mpsc;

use super::{AgentLink, Daemon, runs};
use crate::db::InstanceState;
use crate::error::{ErrorCode, UserError};
use crate::ipc::{ForwardSpec, ForwardView, Open, Response, Target};

/// How long a stream waits for its agent to (re)connect.
const AGENT_GRACE: Duration = Duration::from_secs(20);

/// The person behind this daemon, for agents' audit logs: `user@host` (read once).
pub fn who() -> String {
    static WHO: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    WHO.get_or_init(read_who).clone()
}

fn read_who() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid{}", nix::unistd::getuid()));
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    format!("{user}@{host}")
}

/// The target's instance and the place a stream works in there.
fn locate(d: &Daemon, target: &Target) -> Result<(InstanceName, Place), UserError> {
    let (instance, place) = match target {
        Target::Run(run) => {
            let row =
                d.db.run(run)
                    .map_err(|e| UserError::from_anyhow(&e))?
                    .ok_or_else(|| runs::not_found_run(run))?;
            (row.instance, Place::Run(run.clone()))
        }
        Target::Instance(name) => (name.clone(), Place::Home),
    };
    let row =
        d.db.instance(&instance)
            .map_err(|e| UserError::from_anyhow(&e))?
            .ok_or_else(|| {
                UserError::new(ErrorCode::NotFound, format!("no instance named {instance}"))
                    .resolve("see the instances: runctl-controller list")
            })?;
    match row.state {
        InstanceState::Terminated => Err(UserError::new(
            ErrorCode::Conflict,
            format!("{instance} is terminated: nothing of {target} is left on it"),
        )
        .resolve("copy what a run saved from the store: runctl-controller checkpoint list RUN")),
        InstanceState::Stopped => {
            Err(
                UserError::new(ErrorCode::Conflict, format!("{instance} is stopped")).resolve(
                    format!("start it first: runctl-controller start {instance}"),
                ),
            )
        }
        InstanceState::Launching | InstanceState::Running => Ok((instance, place)),
    }
}

/// The target's connected agent, if it serves access streams.
async fn agent(d: &Daemon, instance: &InstanceName) -> Result<AgentLink, UserError> {
    let link = d.wait_for_agent(instance, AGENT_GRACE, None).await?;
    link.hello.require(Feature::Streams).map_err(|e| {
        UserError::new(
            ErrorCode::Agent,
            format!("the agent of {instance}: {}", e.message),
        )
        .resolve("launch a new instance, which gets this controller's agent")
    })?;
    Ok(link)
}

/// Opens an exec, shell or copy stream and splices the CLI's socket to it.
pub(super) async fn open(
    d: &Arc<Daemon>,
    stream: &mut UnixStream,
    target: Target,
    open: Open,
) -> anyhow::Result<()> {
    let (instance, place) = locate(d, &target)?;
    let link = agent(d, &instance).await?;
    let who = who();
    let bulk = match open {
        Open::Exec {
            argv,
            tty,
            term,
            stdin,
        } => BulkOpen::Exec(ExecOpen {
            place,
            argv,
            tty,
            term,
            stdin,
            who,
        }),
        Open::CopyOut { path } => BulkOpen::CopyOut(CopyOpen { place, path, who }),
        Open::CopyIn { path } => BulkOpen::CopyIn(CopyOpen { place, path, who }),
    };
    let (mut send, recv) = open_bi(&link, &instance).await?;
    write_frame(&mut send, &bulk).await?;
    write_frame(stream, &Response::Spliced { instance }).await?;
    let mut agent_side = tokio::io::join(recv, send);
    if let Err(e) = tokio::io::copy_bidirectional(stream, &mut agent_side).await {
        tracing::debug!("a spliced stream ended: {e}");
    }
    Ok(())
}

async fn open_bi(
    link: &AgentLink,
    instance: &InstanceName,
) -> Result<(quinn::SendStream, quinn::RecvStream), UserError> {
    link.conn.open_bi().await.map_err(|e| {
        UserError::new(
            ErrorCode::Agent,
            format!("opening a stream to {instance}'s agent: {e}"),
        )
    })
}

/// Asks the agent to forward to `spec` (or, with `check_only`, whether it would): the
/// stream, and the agent's answer.
async fn ask_forward(
    link: &AgentLink,
    instance: &InstanceName,
    spec: &ForwardSpec,
    check_only: bool,
) -> Result<(quinn::SendStream, quinn::RecvStream, ForwardReady), UserError> {
    let (mut send, mut recv) = open_bi(link, instance).await?;
    let open = BulkOpen::Forward(ForwardOpen {
        host: spec.host.clone(),
        port: spec.port,
        check_only,
        who: who(),
    });
    let ready = async {
        write_frame(&mut send, &open).await?;
        read_frame::<_, ForwardReady>(&mut recv).await
    }
    .await
    .map_err(|e| UserError::new(ErrorCode::Agent, format!("asking {instance}'s agent: {e}")))?
    .ok_or_else(|| {
        UserError::new(
            ErrorCode::Agent,
            format!("{instance}'s agent closed the stream"),
        )
    })?;
    Ok((send, recv, ready))
}

/// Serves `forward`: every spec checked with the agent and listening, then connections
/// forwarded until the CLI closes its socket.
pub(super) async fn forward(
    d: &Arc<Daemon>,
    stream: &mut UnixStream,
    target: Target,
    forwards: Vec<ForwardSpec>,
    bind: std::net::IpAddr,
) -> anyhow::Result<()> {
    let (instance, _) = locate(d, &target)?;
    let (tx, mut failures) = mpsc::unbounded_channel();
    let (views, mut listening) = listen(d, &instance, &forwards, bind, tx).await?;
    write_frame(stream, &Response::Forwarding(views)).await?;
    let (mut from_cli, mut to_cli) = stream.split();
    let mut byte = [0u8; 1];
    loop {
        tokio::select! {
            // The CLI sends nothing more: its closing is the end of the forward.
            _ = tokio::io::AsyncReadExt::read(&mut from_cli, &mut byte) => break,
            Some(line) = failures.recv() => {
                if write_frame(&mut to_cli, &Response::Progress(line)).await.is_err() {
                    break;
                }
            }
        }
    }
    listening.abort_all();
    Ok(())
}

/// Checks each forward with the agent (its policy), binds its local port, and serves it
/// in a task of the returned set. Failed connections are described on `failures`.
pub(super) async fn listen(
    d: &Arc<Daemon>,
    instance: &InstanceName,
    forwards: &[ForwardSpec],
    bind: std::net::IpAddr,
    failures: mpsc::UnboundedSender<String>,
) -> Result<(Vec<ForwardView>, tokio::task::JoinSet<()>), UserError> {
    let link = agent(d, instance).await?;
    let mut bound = Vec::new();
    for spec in forwards {
        let (_, _, ready) = ask_forward(&link, instance, spec, true).await?;
        if let Err(e) = ready.result {
            return Err(refused(instance, &e));
        }
        let local_port = spec.local_port.unwrap_or(spec.port);
        let listener = TcpListener::bind(SocketAddr::new(bind, local_port))
            .await
            .map_err(|e| {
                UserError::new(
                    ErrorCode::Conflict,
                    format!("cannot listen on {bind}:{local_port}: {e}"),
                )
                .resolve(format!(
                    "pick another local port: LOCAL:{}:{} (e.g. 16006:{}:{})",
                    spec.host, spec.port, spec.host, spec.port
                ))
            })?;
        let local = listener.local_addr().map_err(|e| {
            UserError::new(
                ErrorCode::Internal,
                format!("reading the listener's address: {e}"),
            )
        })?;
        bound.push((listener, spec.clone(), local));
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut views = Vec::new();
    for (listener, spec, local) in bound {
        views.push(ForwardView {
            local,
            remote: format!("{}:{}", spec.host, spec.port),
        });
        tasks.spawn(accept(
            d.clone(),
            instance.clone(),
            listener,
            spec,
            failures.clone(),
        ));
    }
    Ok((views, tasks))
}

fn refused(instance: &InstanceName, e: &WireError) -> UserError {
    let code = if e.kind == protocol::ErrorKind::Forbidden {
        ErrorCode::Conflict
    } else {
        ErrorCode::Agent
    };
    UserError::new(code, format!("{instance}'s agent refused: {}", e.message))
}

async fn accept(
    d: Arc<Daemon>,
    instance: InstanceName,
    listener: TcpListener,
    spec: ForwardSpec,
    failures: mpsc::UnboundedSender<String>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of descriptors, most likely: wait rather than spin.
                        tracing::warn!("accepting a forwarded connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                connections.spawn(connect(d.clone(), instance.clone(), tcp, spec.clone(), failures.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One accepted connection: a stream to the agent, which connects on the instance; on a
/// refusal the local connection is reset and the reason goes to the CLI.
async fn connect(
    d: Arc<Daemon>,
    instance: InstanceName,
    tcp: tokio::net::TcpStream,
    spec: ForwardSpec,
    failures: mpsc::UnboundedSender<String>,
) {
    let target = format!("{}:{}", spec.host, spec.port);
    let fail = |why: String| {
        let _ = failures.send(format!("forward to {target}: {why}"));
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    };
    let link = match agent(&d, &instance).await {
        Ok(link) => link,
        Err(e) => return fail(e.message),
    };
    match ask_forward(&link, &instance, &spec, false).await {
        Ok((send, recv, ForwardReady { result: Ok(()) })) => {
            protocol::splice::splice(tcp, send, recv).await;
        }
        Ok((_, _, ForwardReady { result: Err(e) })) => fail(e.message),
        Err(e) => fail(e.message),
    }
}
