//! The ways agents reach the daemon besides its UDP port, all feeding the one QUIC
//! endpoint's `MuxSocket`: the TLS-over-TCP listener on the same port number, and the
//! link the daemon dials out to a relay (so it needs no reachable port at all). Also what
//! each agent is told about them (`agent_endpoints`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::carrier::{self, MuxSocket, RelayOut, RelayQueue};
use protocol::path::{Endpoint, PathKind, Transport, Via};
use protocol::relay::{Flow, Frame};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a TCP peer gets to finish its TLS handshake.
const TLS_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Direct TCP flows at once; more are closed at accept. Each costs a task and two queues,
/// not more (every byte inside is QUIC, which has its own limits).
const MAX_TCP_FLOWS: usize = 1024;
/// A direct TCP flow with nothing to read for this long is closed (QUIC's idle timeout is
/// 30 s, so a live session is never this quiet).
const TCP_FLOW_SILENCE: Duration = Duration::from_secs(60);
/// The daemon pings its relay this often, and gives up on the link after `RELAY_SILENCE`
/// without a frame: a laptop that changed networks must notice its dead link quickly, well
/// inside the agents' 30 s QUIC idle timeout, so their sessions survive the move.
const RELAY_PING: Duration = Duration::from_secs(3);
const RELAY_SILENCE: Duration = Duration::from_secs(10);
/// A relay flow idle this long is forgotten (its QUIC connection is long gone).
const RELAY_FLOW_IDLE: Duration = Duration::from_secs(180);

/// Every way an agent may reach this daemon, for its config: the direct address (when
/// there is one agents can reach) over UDP and TCP, then the relay over UDP and TCP.
pub fn agent_endpoints(direct: Option<&str>, relay: Option<&str>) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for (host_port, via) in [(direct, Via::Direct), (relay, Via::Relay)] {
        let Some(host_port) = host_port else { continue };
        for transport in [Transport::Udp, Transport::Tcp] {
            out.push(Endpoint {
                path: PathKind { transport, via },
                host_port: host_port.to_owned(),
            });
        }
    }
    out
}

/// Accepts agents' TLS-over-TCP flows until `shutdown`.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    mux: Arc<MuxSocket>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let slots = Arc::new(Semaphore::new(MAX_TCP_FLOWS));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!("accepting a TCP connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("closing TCP connection from {peer}: {MAX_TCP_FLOWS} flows open");
            continue;
        };
        let (acceptor, mux, shutdown) = (acceptor.clone(), mux.clone(), shutdown.clone());
        tasks.spawn(async move {
            let _slot = slot;
            let _ = tcp.set_nodelay(true);
            let stream =
                match tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return tracing::debug!("TLS from {peer} failed: {e}"),
                    Err(_) => return tracing::debug!("TLS from {peer} timed out"),
                };
            let stream = SilenceLimit::new(stream, TCP_FLOW_SILENCE);
            tokio::select! {
                result = mux.serve_stream(stream) => {
                    if let Err(e) = result {
                        tracing::debug!("TCP flow from {peer} ended: {e}");
                    }
                }
                () = shutdown.cancelled() => {}
            }
        });
    }
}

/// A stream whose reads fail once nothing has arrived for `limit`.
struct SilenceLimit<S> {
    inner: S,
    limit: Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<S> SilenceLimit<S> {
    fn new(inner: S, limit: Duration) -> Self {
        SilenceLimit {
            inner,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for SilenceLimit<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let deadline = tokio::time::Instant::now() + self.limit;
                    self.timer.as_mut().reset(deadline);
                }
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => match self.timer.as_mut().poll(cx) {
                std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "nothing received for too long",
                ))),
                std::task::Poll::Pending => std::task::Poll::Pending,
            },
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SilenceLimit<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What `status` shows of the relay link.
#[derive(Debug, Clone, Default)]
pub struct RelayStatus {
    pub relay: String,
    pub registered: bool,
    pub last_error: Option<String>,
}

/// Keeps the daemon registered with the relay at `relay` (`host:port`) until `shutdown`:
/// dials out, proves itself with the controller's relay certificate, and carries every
/// agent flow the relay forwards. A dropped link is redialled with backoff; the flows'
/// virtual addresses are kept, so agents' QUIC sessions survive a short outage (a laptop
/// that changed networks, a relay restart within the idle timeout).
pub async fn relay_link(
    relay: String,
    tls: rustls::ClientConfig,
    mux: Arc<MuxSocket>,
    status: Arc<Mutex<RelayStatus>>,
    shutdown: CancellationToken,
) {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let queue = RelayQueue::default();
    let mut flows: HashMap<Flow, (SocketAddr, Instant)> = HashMap::new();
    let mut failures: u32 = 0;
    loop {
        let result = tokio::select! {
            r = link_once(&relay, &connector, &queue, &mux, &mut flows, &status) => r,
            () = shutdown.cancelled() => break,
        };
        {
            let mut s = status.lock().expect("relay status lock");
            s.registered = false;
            if let Err(e) = &result {
                s.last_error = Some(format!("{e:#}"));
            }
        }
        match result {
            Ok(()) => failures = 0,
            Err(e) => {
                tracing::warn!("relay {relay}: {e:#}");
                failures = failures.saturating_add(1);
            }
        }
        // Quick the first time (a moved laptop), then backing off to 15 s.
        let wait = Duration::from_millis(200)
            .saturating_mul(2u32.saturating_pow(failures.min(7)))
            .min(Duration::from_secs(15))
            .mul_f64(0.5 + 0.5 * rand::random::<f64>());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => break,
        }
    }
    for (addr, _) in flows.into_values() {
        mux.remove_route(addr);
    }
}

async fn link_once(
    relay: &str,
    connector: &tokio_rustls::TlsConnector,
    queue: &RelayQueue,
    mux: &Arc<MuxSocket>,
    flows: &mut HashMap<Flow, (SocketAddr, Instant)>,
    status: &Mutex<RelayStatus>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let addr = tokio::net::lookup_host(relay)
        .await
        .with_context(|| format!("resolving {relay}"))?
        .next()
        .with_context(|| format!("{relay} has no address"))?;
    let tcp = tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(protocol::tls::RELAY_NAME)
        .expect("a valid DNS name");
    let stream = tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, connector.connect(name, tcp))
        .await
        .context("the TLS handshake timed out")?
        .context("the TLS handshake failed")?;
    let (mut reader, mut writer) = tokio::io::split(stream);
    // The relay refuses a registration by closing after the handshake, so registration
    // counts as done only once its first answer arrives.
    queue.push_control(RelayOut::Ping);
    let mut buf = Vec::new();
    let first = tokio::time::timeout(RELAY_SILENCE, async {
        // The ping goes out meanwhile.
        tokio::select! {
            r = carrier::read_record(&mut reader, &mut buf) => r,
            r = queue.pump(&mut writer) => r.map(|()| false),
        }
    });
    match first.await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => anyhow::bail!(
            "the relay closed the link: it refused this controller's certificate (is it configured with this CA's SHA-256?)"
        ),
        Ok(Err(e)) => return Err(anyhow::Error::new(e).context("the relay closed the link")),
        Err(_) => anyhow::bail!("the relay did not answer within {RELAY_SILENCE:?}"),
    }
    {
        let mut s = status.lock().expect("relay status lock");
        s.registered = true;
        s.last_error = None;
    }
    tracing::info!("registered with relay {relay} ({addr})");
    let inbound = async {
        let mut first = Some(std::mem::take(&mut buf));
        let mut sweep = Instant::now();
        loop {
            let record = match first.take() {
                Some(record) => record,
                None => {
                    match tokio::time::timeout(
                        RELAY_SILENCE,
                        carrier::read_record(&mut reader, &mut buf),
                    )
                    .await
                    {
                        Ok(Ok(true)) => {}
                        Ok(Ok(false)) => anyhow::bail!("the relay closed the link"),
                        Ok(Err(e)) => {
                            return Err(anyhow::Error::new(e).context("reading from the relay"));
                        }
                        Err(_) => anyhow::bail!("nothing from the relay for {RELAY_SILENCE:?}"),
                    }
                    std::mem::take(&mut buf)
                }
            };
            let now = Instant::now();
            match Frame::decode(&record) {
                Ok(Frame::Datagram { flow, payload }) => {
                    let (addr, seen) = flows
                        .entry(flow)
                        .or_insert_with(|| (mux.add_relay_route(queue, flow), now));
                    *seen = now;
                    mux.deliver(*addr, Bytes::copy_from_slice(payload));
                }
                Ok(Frame::Ping) => queue.push_control(RelayOut::Pong),
                Ok(Frame::Pong) => {}
                Err(e) => anyhow::bail!("the relay sent a malformed frame: {e}"),
            }
            buf = record;
            if now.duration_since(sweep) > RELAY_FLOW_IDLE / 4 {
                sweep = now;
                flows.retain(|_, (addr, seen)| {
                    let keep = now.duration_since(*seen) < RELAY_FLOW_IDLE;
                    if !keep {
                        mux.remove_route(*addr);
                    }
                    keep
                });
            }
        }
    };
    let pings = async {
        let mut tick = tokio::time::interval(RELAY_PING);
        loop {
            tick.tick().await;
            queue.push_control(RelayOut::Ping);
        }
    };
    tokio::select! {
        r = inbound => r,
        r = queue.pump(&mut writer) => r.context("writing to the relay"),
        () = pings => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(direct: Option<&str>, relay: Option<&str>, expected: &[&str]) {
        let got: Vec<String> = agent_endpoints(direct, relay)
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn agents_learn_every_way_in() {
        check(
            Some("127.0.0.1:7443"),
            None,
            &["udp://127.0.0.1:7443", "tcp://127.0.0.1:7443"],
        );
        check(
            Some("d:1"),
            Some("r:443"),
            &[
                "udp://d:1",
                "tcp://d:1",
                "udp+relay://r:443",
                "tcp+relay://r:443",
            ],
        );
        check(
            None,
            Some("r:443"),
            &["udp+relay://r:443", "tcp+relay://r:443"],
        );
        check(None, None, &[]);
    }
}
