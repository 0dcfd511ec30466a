//! The controller daemon: owns the QUIC endpoint agents dial, the local socket the CLI
//! talks to, and the database. One instance per home directory, guarded by a lock file.
//! Stopping it leaves agents and their runs going; they redial when it is back, and it
//! asks each for the events it missed.

mod agents;
pub mod carriers;
mod credentials;
mod instances;
mod requests;
mod runs;
mod streams;
pub mod sync;
mod writer;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use protocol::{ControllerMsg, InstanceName, RunId};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::db::Db;
use crate::error::{ErrorCode, UserError};
use crate::home::Home;
use crate::pki::{self, Pki};

/// The settings key that remembers the QUIC port picked for `listen = "...:0"`.
const PORT_SETTING: &str = "quic_port";

pub fn now_ms() -> u64 {
    protocol::clock::now_ms()
}

/// A connected agent.
#[derive(Debug, Clone)]
struct AgentLink {
    conn: quinn::Connection,
    tx: mpsc::Sender<ControllerMsg>,
    /// Distinguishes this connection from an older one of the same instance.
    id: usize,
    /// The agent keeps a content store (`Feature::Store`): new runs' trees may be seeded.
    store: bool,
    /// Asks the task handing the agent its store credentials to do it now (an agent with
    /// none of its own: a pod).
    credentials: Option<mpsc::Sender<credentials::Request>>,
    /// The agent's `Hello`: its version and features.
    hello: Arc<protocol::Hello>,
}

/// State shared by every task of the daemon.
#[derive(Debug)]
pub struct Daemon {
    home: Home,
    config: Config,
    db: Db,
    pki: Pki,
    quic_addr: SocketAddr,
    /// The endpoint's socket: UDP plus the TCP and relay routes; names each agent's path.
    mux: Arc<protocol::carrier::MuxSocket>,
    /// The relay link's state, when `[daemon] relay` is set.
    relay: Option<Arc<Mutex<carriers::RelayStatus>>>,
    /// Connections that have not authenticated yet (handshaking, or enrolling).
    unauthenticated: std::sync::atomic::AtomicUsize,
    agents: Mutex<HashMap<InstanceName, AgentLink>>,
    /// Bumped whenever an agent connects or disconnects.
    agents_changed: watch::Sender<u64>,
    /// Per run, bumped whenever its events or state change.
    run_changes: Mutex<HashMap<RunId, watch::Sender<u64>>>,
    /// Stops asked for while a run was still starting; delivered once it has started.
    pending_stops: Mutex<HashSet<RunId>>,
    /// Gangs waiting out their restart's delay; a stop meanwhile takes the run out, and
    /// it ends stopped instead.
    restarting: Mutex<HashSet<RunId>>,
    /// Spot runs whose relaunch is under way in this daemon.
    relaunching: Mutex<HashSet<RunId>>,
    /// Held while a RunPod cluster is terminated, so that its members' terminations (a
    /// gang's nodes end at once) end it once.
    clusters: tokio::sync::Mutex<()>,
    /// The secrets of gangs still going, in memory only, to start their nodes again with.
    secrets: Mutex<HashMap<RunId, Vec<protocol::Secret>>>,
    /// Stat caches and what each agent's trees hold.
    sync: sync::SyncState,
    /// The latest resource sample of each connected agent, and a counter bumped on each.
    stats: Mutex<HashMap<InstanceName, Arc<protocol::StatsSample>>>,
    stats_changed: watch::Sender<u64>,
    /// The latest disk use each agent reported (kept after it disconnects).
    disk: Mutex<HashMap<InstanceName, protocol::DiskUse>>,
    /// The queue to the one writer of every agent's run events (`writer`).
    events: mpsc::Sender<writer::Incoming>,
    /// Every task the daemon spawns that must finish (or be cut off) on shutdown.
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// The EC2 client, made on first use (its credentials load lazily too).
    ec2: tokio::sync::OnceCell<crate::provider::ec2::Ec2>,
}

impl Daemon {
    fn agent(&self, name: &InstanceName) -> Option<AgentLink> {
        self.agents.lock().expect("agents lock").get(name).cloned()
    }

    fn connected(&self, name: &InstanceName) -> bool {
        self.agents.lock().expect("agents lock").contains_key(name)
    }

    /// How `name`'s agent reaches the daemon now, if it is connected.
    fn agent_path(&self, name: &InstanceName) -> Option<crate::ipc::AgentPath> {
        let link = self.agent(name)?;
        Some(crate::ipc::AgentPath {
            path: self.mux.path_of(link.conn.remote_address()).to_string(),
            rtt_ms: link.conn.rtt().as_secs_f64() * 1000.0,
        })
    }

    /// Every connected agent's path, by instance name.
    fn agent_paths(&self) -> Vec<crate::ipc::AgentPathView> {
        let mut names: Vec<InstanceName> = self
            .agents
            .lock()
            .expect("agents lock")
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|instance| {
                let path = self.agent_path(&instance)?;
                Some(crate::ipc::AgentPathView { instance, path })
            })
            .collect()
    }

    fn relay_view(&self) -> Option<crate::ipc::RelayView> {
        let status = self
            .relay
            .as_ref()?
            .lock()
            .expect("relay status lock")
            .clone();
        Some(crate::ipc::RelayView {
            relay: status.relay,
            registered: status.registered,
            last_error: status.last_error,
        })
    }

    fn connected_count(&self) -> u32 {
        self.agents.lock().expect("agents lock").len() as u32
    }

    fn bump_agents(&self) {
        self.agents_changed.send_modify(|n| *n += 1);
    }

    fn run_watch(&self, run: &RunId) -> watch::Receiver<u64> {
        self.run_changes
            .lock()
            .expect("run changes lock")
            .entry(run.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn bump_run(&self, run: &RunId) {
        if let Some(tx) = self.run_changes.lock().expect("run changes lock").get(run) {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// Waits until `name`'s agent is connected, its process dies, or `timeout` passes.
    async fn wait_for_agent(
        &self,
        name: &InstanceName,
        timeout: Duration,
        pid: Option<u32>,
    ) -> Result<AgentLink, UserError> {
        let mut changes = self.agents_changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(link) = self.agent(name) {
                return Ok(link);
            }
            if let Some(pid) = pid
                && !crate::provider::local::is_agent_alive(&self.home, name, pid)
            {
                return Err(UserError::new(
                    ErrorCode::Agent,
                    format!(
                        "the agent of {name} exited before connecting: {}",
                        crate::provider::local::log_tail(&self.home, name)
                    ),
                )
                .resolve(format!(
                    "read {}",
                    self.home.local_instance(name).join("agent.log").display()
                )));
            }
            // Wake on a connection, or every 200 ms to notice a dead agent process.
            let tick = (deadline - tokio::time::Instant::now()).min(Duration::from_millis(200));
            if tick.is_zero() {
                return Err(UserError::new(
                    ErrorCode::Agent,
                    format!("the agent of {name} did not connect within {timeout:?}"),
                )
                .resolve("check that the agent can reach the daemon's QUIC address (runctl-controller status)")
                .resolve(format!("then terminate it: runctl-controller terminate {name}")));
            }
            let _ = tokio::time::timeout(tick, changes.changed()).await;
        }
    }
}

/// What a daemon serves on, bound by `bind`: the agents' endpoint (QUIC over UDP, and
/// TLS over TCP on the same port number), the CLI's socket, and the home's lock, database
/// and CA they were bound with.
#[derive(Debug)]
pub struct Bound {
    _lock: Flock<std::fs::File>,
    db: Db,
    pki: Pki,
    endpoint: quinn::Endpoint,
    mux: Arc<protocol::carrier::MuxSocket>,
    tcp: std::net::TcpListener,
    socket: tokio::net::UnixListener,
}

impl Bound {
    /// Where agents dial (the port picked, for `listen = "...:0"`).
    pub fn quic_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }
}

/// Takes `home`'s lock (one daemon per home: a second is refused with the first's pid),
/// opens its database and CA, and binds the agents' endpoint and the CLI's socket. Called
/// inside a tokio runtime.
pub fn bind(home: &Home, config: &Config) -> anyhow::Result<Bound> {
    home.ensure()?;
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(home.lock())
        .with_context(|| format!("opening {}", home.lock().display()))?;
    let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
        let pid = std::fs::read_to_string(home.pid()).unwrap_or_default();
        UserError::new(
            ErrorCode::Conflict,
            format!(
                "a daemon is already running for {} (pid {})",
                home.root().display(),
                pid.trim()
            ),
        )
        .resolve("use it as it is, or stop it first: runctl-controller shutdown")
    })?;
    std::fs::write(home.pid(), format!("{}\n", std::process::id()))?;

    let db = Db::open(&home.db())?;
    let pki = pki::load_or_create(&home.pki())?;
    let (endpoint, mux, tcp) = bind_quic(config, &db, &pki)?;

    let socket_path = home.socket();
    let _ = std::fs::remove_file(&socket_path);
    let socket = tokio::net::UnixListener::bind(&socket_path)
        .with_context(|| format!("binding {}", socket_path.display()))?;
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o600))?;
    Ok(Bound {
        _lock: lock,
        db,
        pki,
        endpoint,
        mux,
        tcp,
        socket,
    })
}

/// Runs the daemon on `bound` until `shutdown` resolves or a client asks it to stop;
/// agents and their runs go on without it.
pub async fn serve(
    home: Home,
    config: Config,
    bound: Bound,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Bound {
        _lock,
        db,
        pki,
        endpoint,
        mux,
        tcp,
        socket: listener,
    } = bound;
    let quic_addr = endpoint.local_addr()?;
    let tcp = tokio::net::TcpListener::from_std(tcp)?;
    let socket_path = home.socket();
    let relay = config.daemon.relay.clone().map(|relay| {
        Arc::new(Mutex::new(carriers::RelayStatus {
            relay,
            ..Default::default()
        }))
    });

    let (events, queue) = mpsc::channel(writer::QUEUE);
    let daemon = Arc::new(Daemon {
        home: home.clone(),
        config,
        db,
        pki,
        quic_addr,
        mux: mux.clone(),
        relay: relay.clone(),
        unauthenticated: Default::default(),
        agents: Mutex::new(HashMap::new()),
        agents_changed: watch::channel(0).0,
        run_changes: Mutex::new(HashMap::new()),
        pending_stops: Mutex::new(HashSet::new()),
        restarting: Mutex::default(),
        relaunching: Mutex::default(),
        clusters: tokio::sync::Mutex::default(),
        secrets: Mutex::default(),
        sync: sync::SyncState::new(sync::load_trees(&home.sync_dir())),
        stats: Mutex::default(),
        disk: Mutex::default(),
        stats_changed: watch::channel(0).0,
        events,
        tasks: TaskTracker::new(),
        shutdown: CancellationToken::new(),
        ec2: tokio::sync::OnceCell::new(),
    });
    writer::spawn(daemon.clone(), queue);
    tracing::info!(
        "daemon {} listening: QUIC {quic_addr} (UDP and TLS over TCP), socket {}, CA {}",
        std::process::id(),
        socket_path.display(),
        daemon.pki.ca.fingerprint()
    );
    daemon.tasks.spawn(carriers::serve_tcp(
        tcp,
        protocol::tls::datagram_server_config(&daemon.pki.ca, &daemon.pki.server)?,
        mux.clone(),
        daemon.tasks.clone(),
        daemon.shutdown.clone(),
    ));
    if let Some(status) = relay {
        let relay = status.lock().expect("relay status lock").relay.clone();
        tracing::info!("registering with relay {relay}");
        daemon.tasks.spawn(carriers::relay_link(
            relay,
            protocol::tls::outer_client_config(
                protocol::relay::ALPN_REGISTER,
                Some((&daemon.pki.relay_client, daemon.pki.ca.cert_der())),
            )?,
            mux.clone(),
            status,
            daemon.shutdown.clone(),
        ));
    }
    runs::resume_restarts(&daemon);
    instances::recover_launches(&daemon);
    daemon.tasks.spawn(runs::watch_relaunches(daemon.clone()));
    daemon.tasks.spawn(runs::compact_logs(daemon.clone()));

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let d = daemon.clone();
                daemon.tasks.spawn(async move { agents::handle(d, incoming).await });
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let d = daemon.clone();
                    daemon.tasks.spawn(async move { requests::handle(d, stream).await });
                }
                Err(e) => tracing::warn!("accepting a local connection failed: {e}"),
            },
            () = &mut shutdown => break,
            () = daemon.shutdown.cancelled() => break,
        }
    }

    tracing::info!("daemon stopping");
    daemon.shutdown.cancel();
    drop(listener);
    let _ = std::fs::remove_file(&socket_path);
    endpoint.close(0u32.into(), b"daemon stopping");
    daemon.tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), daemon.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not finish within 5 s of shutdown");
    }
    // Events received are stored before the daemon goes (agents would replay them anyway).
    writer::flush(&daemon, Duration::from_secs(5)).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    let _ = std::fs::remove_file(home.pid());
    Ok(())
}

/// Binds the QUIC endpoint (UDP, and TLS over TCP on the same port number). With port 0
/// the first start picks a port and every later start reuses it, so agents that outlive
/// the daemon can find it again.
fn bind_quic(
    config: &Config,
    db: &Db,
    pki: &Pki,
) -> anyhow::Result<(
    quinn::Endpoint,
    Arc<protocol::carrier::MuxSocket>,
    std::net::TcpListener,
)> {
    let server = protocol::tls::server_config(&pki.ca, &pki.server)?;
    let mut addr = config.daemon.listen;
    let remembered = db
        .setting(PORT_SETTING)?
        .and_then(|p| p.parse::<u16>().ok());
    if addr.port() == 0
        && let Some(port) = remembered
    {
        addr.set_port(port);
    }
    let (endpoint, mux, tcp) = endpoint(server, addr, &pki.endpoint_secret).map_err(|e| {
        UserError::new(ErrorCode::Conflict, format!("cannot listen for agents on UDP and TCP {addr}: {e}"))
            .resolve("free that port (both UDP and TCP), or set another under [daemon] listen in config.toml (agents launched earlier will not find a new port)")
    })?;
    let bound = endpoint.local_addr()?;
    if config.daemon.listen.port() == 0 && remembered != Some(bound.port()) {
        db.set_setting(PORT_SETTING, &bound.port().to_string())?;
    }
    Ok((endpoint, mux, tcp))
}

/// A QUIC server endpoint whose connection ids and stateless-reset tokens derive from
/// `secret`: after a restart it recognises the previous run's connection ids and answers
/// packets on them with a stateless reset, which agents verify and act on at once.
fn endpoint(
    server: quinn::ServerConfig,
    addr: SocketAddr,
    secret: &[u8; 32],
) -> std::io::Result<(
    quinn::Endpoint,
    Arc<protocol::carrier::MuxSocket>,
    std::net::TcpListener,
)> {
    use ring::hmac;
    // Two independent keys from one secret: one signs reset tokens, one keys connection ids.
    let derive = |label: &[u8]| hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), label);
    let reset_key = hmac::Key::new(hmac::HMAC_SHA256, derive(b"stateless reset").as_ref());
    let cid_tag = derive(b"connection id");
    let cid_key = u64::from_le_bytes(
        cid_tag.as_ref()[..8]
            .try_into()
            .expect("an HMAC-SHA256 tag has 32 bytes"),
    );
    let mut config =
        protocol::tls::endpoint_config(quinn::EndpointConfig::new(Arc::new(reset_key)));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let (udp, tcp) = protocol::carrier::bind_udp_and_tcp(addr)?;
    let mux = protocol::carrier::MuxSocket::new(udp)?;
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        config,
        Some(server),
        mux.clone(),
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((endpoint, mux, tcp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::{Client, Request, Response};

    #[tokio::test]
    async fn a_daemon_serves_in_process_and_a_second_one_for_its_home_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        let config = Config::parse("[daemon]\nlisten = \"127.0.0.1:0\"\n").expect("config");
        let bound = bind(&home, &config).expect("bind");
        let addr = bound.quic_addr().expect("address");
        assert_ne!(addr.port(), 0, "port 0 is picked at bind");
        let second = bind(&home, &config).expect_err("one daemon per home");
        assert!(
            format!("{second:#}").contains("already running"),
            "{second:#}"
        );

        let stop = CancellationToken::new();
        let client = async {
            let mut client = Client::connect_existing(&home)
                .await
                .expect("handshake")
                .expect("the socket is open");
            client.send(&Request::Status).await.expect("send");
            let answer = client.next().await.expect("answer");
            stop.cancel();
            answer
        };
        let (served, answer) = tokio::join!(
            serve(home.clone(), config.clone(), bound, stop.cancelled()),
            client
        );
        served.expect("served until stopped");
        match answer {
            Some(Response::Status(status)) => {
                assert_eq!(status.pid, std::process::id());
                assert_eq!(status.quic_addr, addr.to_string());
            }
            other => panic!("status answered with {other:?}"),
        }
        assert!(!home.socket().exists(), "the socket is removed on stop");
        let lock_file = std::fs::File::options()
            .write(true)
            .open(home.lock())
            .expect("lock file");
        assert!(
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).is_ok(),
            "the lock is free once the daemon stopped"
        );
    }
}
