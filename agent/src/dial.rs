//! Finding a path to the controller: every configured endpoint is dialled, staggered in
//! the order `protocol::path::attempts` gives (happy eyeballs), and the first QUIC
//! handshake to complete wins; the others are dropped. A UDP path is a plain socket; a
//! TCP path is TLS over TCP carrying QUIC's datagrams as records (`protocol::carrier`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use protocol::carrier::StreamSocket;
use protocol::path::{self, Endpoint, Transport, Via};
use tokio::task::JoinSet;

/// How long a TCP connect and its TLS handshake may take.
const TCP_DEADLINE: Duration = Duration::from_secs(10);

/// A connection the agent got, with what carries it.
#[derive(Debug)]
pub struct Dialed {
    /// Owns the socket; dropping it closes the path.
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub via: Endpoint,
    /// The stream under a TCP path, to notice at once when it breaks.
    stream: Option<Arc<StreamSocket>>,
}

impl Dialed {
    /// Resolves when the carrier under the connection is gone (a TCP path's stream ended);
    /// never for UDP, where QUIC's own idle timeout is the only sign.
    pub fn stream_watch(&self) -> impl Future<Output = ()> + Send + 'static {
        let stream = self.stream.clone();
        async move {
            match stream {
                Some(stream) => stream.closed().await,
                None => std::future::pending().await,
            }
        }
    }
}

/// Dials `endpoints` staggered, the remembered `last_good` first, and returns the first
/// connection whose handshake completes with `client`.
pub async fn dial(
    endpoints: &[Endpoint],
    last_good: Option<&Endpoint>,
    client: quinn::ClientConfig,
) -> anyhow::Result<Dialed> {
    let mut set = JoinSet::new();
    for (endpoint, delay) in path::attempts(endpoints, last_good) {
        let client = client.clone();
        set.spawn(async move {
            tokio::time::sleep(delay).await;
            let result = attempt(&endpoint, client).await;
            result.with_context(|| format!("via {endpoint}"))
        });
    }
    let mut errors = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(dialed)) => {
                set.abort_all();
                return Ok(dialed);
            }
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(format!("a dial attempt failed: {e}")),
        }
    }
    anyhow::bail!("no path to the controller worked: {}", errors.join("; "))
}

/// One path, from resolving its name to a completed handshake.
pub async fn attempt(endpoint: &Endpoint, client: quinn::ClientConfig) -> anyhow::Result<Dialed> {
    let addr = crate::config::resolve(&endpoint.host_port).await?;
    let (quic, peer, stream) = match endpoint.path.transport {
        Transport::Udp => (udp_endpoint(addr)?, addr, None),
        Transport::Tcp => {
            let (stream, local) = tcp_stream(addr, endpoint.path.via).await?;
            let socket = StreamSocket::spawn(stream, local, addr);
            let quic = quinn::Endpoint::new_with_abstract_socket(
                protocol::tls::endpoint_config(quinn::EndpointConfig::default()),
                None,
                socket.clone(),
                Arc::new(quinn::TokioRuntime),
            )
            .context("opening a QUIC endpoint over TCP")?;
            (quic, addr, Some(socket))
        }
    };
    let conn = quic
        .connect_with(client, peer, protocol::tls::SERVER_NAME)?
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(Dialed {
        endpoint: quic,
        conn,
        via: endpoint.clone(),
        stream,
    })
}

fn udp_endpoint(addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .expect("a valid wildcard address");
    let socket = protocol::tls::bind_udp(bind).context("opening a UDP socket")?;
    quinn::Endpoint::new(
        protocol::tls::endpoint_config(quinn::EndpointConfig::default()),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .context("opening a UDP socket")
}

async fn tcp_stream(
    addr: SocketAddr,
    via: Via,
) -> anyhow::Result<(
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    SocketAddr,
)> {
    let tcp = tokio::time::timeout(TCP_DEADLINE, tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("TCP connect to {addr} timed out"))?
        .with_context(|| format!("TCP connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    let local = tcp.local_addr()?;
    let tls = protocol::tls::outer_client_config(protocol::carrier::ALPN_DATAGRAMS, None)?;
    let name = match via {
        Via::Direct => protocol::tls::SERVER_NAME,
        Via::Relay => protocol::tls::RELAY_NAME,
    };
    let name = rustls::pki_types::ServerName::try_from(name).expect("a valid DNS name");
    let stream = tokio::time::timeout(
        TCP_DEADLINE,
        tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp),
    )
    .await
    .context("the TLS handshake timed out")?
    .context("the TLS handshake failed")?;
    Ok((stream, local))
}
