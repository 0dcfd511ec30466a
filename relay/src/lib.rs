//! runctl-relay: a meeting point for a controller that cannot be reached (behind NAT, on a
//! laptop that roams) and agents that can only dial out. The daemon dials the relay and
//! registers over TLS with its controller certificate; agents send their QUIC packets to
//! the relay over UDP, or as records over TLS over TCP; the relay forwards each packet to
//! the registered daemon tagged with the agent's flow, and the daemon's answers back.
//!
//! It never terminates the inner QUIC TLS: it sees ciphertext, cannot read or forge the
//! channel, and its own certificate is not one an agent accepts as the controller. It
//! keeps nothing a restart would lose beyond live connections: the daemon re-registers
//! and agents redial on their own. It never amplifies: it sends an agent only what the
//! daemon sent for that agent's flow, and only to a flow that has spoken first.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::carrier::{self, RecordQueue, RelayOut, RelayQueue};
use protocol::path::Transport;
use protocol::relay::{ALPN_REGISTER, Flow, Frame};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A TLS handshake must finish within this.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// An agent's TCP flow with nothing to read for this long is closed (QUIC's idle timeout
/// is 30 s, so a live session is never this quiet).
const AGENT_SILENCE: Duration = Duration::from_secs(60);
/// The daemon pings every few seconds; a link silent this long is dropped.
const DAEMON_SILENCE: Duration = Duration::from_secs(30);
/// A UDP flow silent this long is forgotten.
const UDP_FLOW_IDLE: Duration = Duration::from_secs(120);

/// Limits on what strangers can make the relay hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// UDP flows (agent addresses) tracked at once; packets from new ones beyond it are dropped.
    pub max_udp_flows: usize,
    /// TCP connections at once (agents' flows and registration attempts).
    pub max_tcp: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_udp_flows: 4096,
            max_tcp: 1024,
        }
    }
}

/// What the relay needs to serve.
#[derive(Debug)]
pub struct Relay {
    pub udp: tokio::net::UdpSocket,
    pub tcp: tokio::net::TcpListener,
    /// From `protocol::tls::relay_server_config`: the relay's identity and the CA it serves.
    pub tls: rustls::ServerConfig,
    pub limits: Limits,
}

/// Counters, for tests and logs.
#[derive(Debug, Default)]
pub struct Counters {
    pub to_daemon: AtomicU64,
    pub to_agents: AtomicU64,
    pub dropped: AtomicU64,
    pub registrations: AtomicU64,
    pub refused: AtomicU64,
}

#[derive(Debug)]
struct Daemon {
    id: u64,
    out: RelayQueue,
}

#[derive(Debug)]
struct State {
    udp: tokio::net::UdpSocket,
    daemon: Mutex<Option<Daemon>>,
    udp_flows: Mutex<HashMap<SocketAddr, Instant>>,
    tcp_flows: Mutex<HashMap<SocketAddr, RecordQueue>>,
    next_link: AtomicU64,
    limits: Limits,
    counters: Arc<Counters>,
}

impl State {
    fn daemon_out(&self) -> Option<RelayQueue> {
        self.daemon
            .lock()
            .expect("daemon lock")
            .as_ref()
            .map(|d| d.out.clone())
    }

    fn to_daemon(&self, flow: Flow, payload: &[u8]) {
        let sent = self
            .daemon_out()
            .is_some_and(|out| out.push_datagram(flow, Bytes::copy_from_slice(payload)));
        let counter = if sent {
            &self.counters.to_daemon
        } else {
            &self.counters.dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves until `shutdown`. `counters` may be shared with the caller.
pub async fn serve(relay: Relay, counters: Arc<Counters>, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    let state = Arc::new(State {
        udp: relay.udp,
        daemon: Mutex::new(None),
        udp_flows: Mutex::default(),
        tcp_flows: Mutex::default(),
        next_link: AtomicU64::new(1),
        limits: relay.limits,
        counters,
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(relay.tls));
    let slots = Arc::new(Semaphore::new(state.limits.max_tcp));
    tokio::select! {
        () = udp_loop(&state) => {}
        () = accept_loop(&state, relay.tcp, acceptor, slots, &tasks) => {}
        () = shutdown.cancelled() => {}
    }
    if let Some(d) = state.daemon.lock().expect("daemon lock").take() {
        d.out.close();
    }
    for q in state.tcp_flows.lock().expect("flows lock").values() {
        q.close();
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
}

async fn udp_loop(state: &Arc<State>) {
    let mut buf = vec![0u8; 65536];
    let mut sweep = Instant::now();
    loop {
        let (n, from) = match state.udp.recv_from(&mut buf).await {
            Ok(got) => got,
            // ICMP errors surface on later receives; they say nothing about this packet.
            Err(_) => continue,
        };
        let now = Instant::now();
        let known = {
            let mut flows = state.udp_flows.lock().expect("flows lock");
            if now.duration_since(sweep) > UDP_FLOW_IDLE / 4 {
                sweep = now;
                flows.retain(|_, seen| now.duration_since(*seen) < UDP_FLOW_IDLE);
            }
            if flows.len() < state.limits.max_udp_flows || flows.contains_key(&from) {
                flows.insert(from, now);
                true
            } else {
                false
            }
        };
        if !known {
            state.counters.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        state.to_daemon(
            Flow {
                transport: Transport::Udp,
                addr: from,
            },
            &buf[..n],
        );
    }
}

async fn accept_loop(
    state: &Arc<State>,
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    slots: Arc<Semaphore>,
    tasks: &TaskTracker,
) {
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!("accepting a TCP connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            state.counters.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (state, acceptor) = (state.clone(), acceptor.clone());
        tasks.spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(stream)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    state.counters.refused.fetch_add(1, Ordering::Relaxed);
                    return tracing::info!("TLS from {peer} refused: {e}");
                }
                Err(_) => {
                    state.counters.refused.fetch_add(1, Ordering::Relaxed);
                    return tracing::info!("TLS from {peer} timed out");
                }
            };
            let (_, session) = tls.get_ref();
            let register = session.alpn_protocol() == Some(ALPN_REGISTER);
            if !register {
                agent_flow(&state, tls, peer).await;
            } else if session.peer_certificates().is_some_and(|c| !c.is_empty()) {
                daemon_link(&state, tls, peer).await;
            } else {
                state.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("refused a registration from {peer}: no controller certificate");
            }
        });
    }
}

/// An agent's TCP flow: records in go to the daemon, the daemon's for it come back.
async fn agent_flow<S>(state: &Arc<State>, stream: S, peer: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let flow = Flow {
        transport: Transport::Tcp,
        addr: peer,
    };
    let out = RecordQueue::default();
    state
        .tcp_flows
        .lock()
        .expect("flows lock")
        .insert(peer, out.clone());
    let (mut reader, mut writer) = tokio::io::split(stream);
    let inbound = async {
        let mut buf = Vec::new();
        loop {
            match tokio::time::timeout(AGENT_SILENCE, carrier::read_record(&mut reader, &mut buf))
                .await
            {
                Ok(Ok(true)) => state.to_daemon(flow, &buf),
                _ => return,
            }
        }
    };
    tokio::select! {
        () = inbound => {}
        _ = out.pump(&mut writer) => {}
    }
    out.close();
    state.tcp_flows.lock().expect("flows lock").remove(&peer);
}

/// The registered daemon's link. A new registration replaces this one (the daemon came
/// back from another address); the old one's writer is closed, which ends it.
async fn daemon_link<S>(state: &Arc<State>, stream: S, peer: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let id = state.next_link.fetch_add(1, Ordering::Relaxed);
    let out = RelayQueue::default();
    if let Some(old) = state.daemon.lock().expect("daemon lock").replace(Daemon {
        id,
        out: out.clone(),
    }) {
        old.out.close();
    }
    state.counters.registrations.fetch_add(1, Ordering::Relaxed);
    tracing::info!("controller registered from {peer}");
    let (mut reader, mut writer) = tokio::io::split(stream);
    let inbound = async {
        let mut buf = Vec::new();
        loop {
            match tokio::time::timeout(DAEMON_SILENCE, carrier::read_record(&mut reader, &mut buf))
                .await
            {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return "closed".to_owned(),
                Ok(Err(e)) => return e.to_string(),
                Err(_) => return format!("silent for {DAEMON_SILENCE:?}"),
            }
            match Frame::decode(&buf) {
                Ok(Frame::Datagram { flow, payload }) => to_agent(state, flow, payload),
                Ok(Frame::Ping) => out.push_control(RelayOut::Pong),
                Ok(Frame::Pong) => {}
                Err(e) => return format!("malformed frame: {e}"),
            }
        }
    };
    let why = tokio::select! {
        why = inbound => why,
        r = out.pump(&mut writer) => match r {
            Ok(()) => "replaced by a newer registration".to_owned(),
            Err(e) => e.to_string(),
        },
    };
    out.close();
    let mut current = state.daemon.lock().expect("daemon lock");
    if current.as_ref().is_some_and(|d| d.id == id) {
        *current = None;
    }
    tracing::info!("controller link from {peer} ended: {why}");
}

fn to_agent(state: &State, flow: Flow, payload: &[u8]) {
    let sent = match flow.transport {
        Transport::Udp => {
            // Only to an address that has spoken to the relay: the relay is no reflector.
            let known = state
                .udp_flows
                .lock()
                .expect("flows lock")
                .contains_key(&flow.addr);
            known && state.udp.try_send_to(payload, flow.addr).is_ok()
        }
        Transport::Tcp => {
            let queue = state
                .tcp_flows
                .lock()
                .expect("flows lock")
                .get(&flow.addr)
                .cloned();
            queue.is_some_and(|q| q.push(Bytes::copy_from_slice(payload)))
        }
    };
    let counter = if sent {
        &state.counters.to_agents
    } else {
        &state.counters.dropped
    };
    counter.fetch_add(1, Ordering::Relaxed);
}
