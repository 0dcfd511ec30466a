//! What carries the channel's QUIC packets underneath quinn: UDP, or records over a byte
//! stream (TLS over TCP, to the daemon or through a relay). quinn sees only an
//! [`quinn::AsyncUdpSocket`]; this module is the one place that implements it, so when
//! quinn's socket trait changes (it does in its next breaking release) only this file does.
//!
//! - [`StreamSocket`]: a client's socket over one stream (the agent's TCP paths).
//! - [`MuxSocket`]: the daemon's socket: its UDP port plus any number of routes, each a
//!   stream (an agent's direct TCP flow) or a flow through a relay link, told apart by a
//!   virtual source address that quinn treats as the peer's.
//!
//! A record is a 2-byte big-endian length and that many bytes: one QUIC datagram (QUIC
//! datagrams never exceed 65,535 bytes), or on a relay link one `relay::Frame`.

mod queue;

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub(crate) use queue::{PushError, Queue};

use crate::path::{PathKind, Transport, Via};
use crate::relay::Flow;

/// ALPN of a stream that carries an agent's datagrams (to the daemon or to a relay).
pub const ALPN_DATAGRAMS: &[u8] = b"runctl-datagrams/1";

/// The largest record body: a length prefix is two bytes.
pub const MAX_RECORD_BYTES: usize = u16::MAX as usize;

/// Datagrams queued towards one stream before more are dropped (about a congestion
/// window at the default rates; more only adds delay behind TCP's own buffer).
const STREAM_QUEUE_BYTES: usize = 2 * 1024 * 1024;
/// Datagrams queued from all streams towards quinn before more are dropped (as a UDP
/// socket's receive buffer does).
const INBOX_BYTES: usize = 8 * 1024 * 1024;
/// How many records a writer gathers into one write.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// Reads one record into `buf`. `Ok(false)` is a clean end of stream between records.
pub async fn read_record<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut header = [0u8; 2];
    match r.read_exact(&mut header[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut header[1..]).await?;
    let len = u16::from_be_bytes(header) as usize;
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(true)
}

/// Appends one record holding `parts` (concatenated) to `out`.
pub fn put_record(out: &mut Vec<u8>, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u16::try_from(len).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a record of {len} bytes is over 65,535"),
        )
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    Ok(())
}

/// Writes what `queue` holds to `w` as records (`encode` appends one), batching what has
/// piled up into one write, until the queue is closed or the write fails.
pub(crate) async fn pump_out<T, W: AsyncWrite + Unpin>(
    queue: &Queue<T>,
    w: &mut W,
    encode: impl Fn(&T, &[u8], &mut Vec<u8>) -> io::Result<()>,
) -> io::Result<()> {
    let mut batch = Vec::with_capacity(WRITE_BATCH_BYTES + MAX_RECORD_BYTES);
    while let Some((tag, data)) = queue.pop().await {
        batch.clear();
        encode(&tag, &data, &mut batch)?;
        while batch.len() < WRITE_BATCH_BYTES {
            let Some((tag, data)) = queue.try_pop() else {
                break;
            };
            encode(&tag, &data, &mut batch)?;
        }
        w.write_all(&batch).await?;
        w.flush().await?;
    }
    let _ = w.shutdown().await;
    Ok(())
}

/// Binds the UDP socket and a TCP listener on the same port number. With port 0, a port
/// free for both is found (a few tries: the UDP port picked may be taken for TCP).
pub fn bind_udp_and_tcp(
    addr: SocketAddr,
) -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let mut last = None;
    for _ in 0..16 {
        let udp = crate::tls::bind_udp(addr)?;
        let mut tcp_addr = addr;
        tcp_addr.set_port(udp.local_addr()?.port());
        match bind_tcp(tcp_addr) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for both UDP and TCP")))
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Splits a transmit into its datagrams (GSO batches several of one size).
fn datagrams<'a>(t: &'a Transmit<'_>) -> impl Iterator<Item = &'a [u8]> {
    t.contents
        .chunks(t.segment_size.unwrap_or(t.contents.len()).max(1))
}

/// Copies queued datagrams into quinn's buffers, one datagram per buffer.
fn fill<T>(
    queue: &Queue<T>,
    from: impl Fn(&T) -> SocketAddr,
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
) -> usize {
    let mut n = 0;
    while n < bufs.len().min(meta.len()) {
        let Some((tag, data)) = queue.try_pop() else {
            break;
        };
        // A datagram bigger than quinn's buffer cannot be a packet it would accept.
        if data.len() > bufs[n].len() {
            continue;
        }
        bufs[n][..data.len()].copy_from_slice(&data);
        meta[n] = RecvMeta {
            addr: from(&tag),
            len: data.len(),
            stride: data.len(),
            ecn: None,
            dst_ip: None,
        };
        n += 1;
    }
    n
}

/// Aborts the carrier's tasks when its socket goes (with the endpoint that owns it).
#[derive(Debug)]
struct Tasks(Vec<tokio::task::AbortHandle>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A client socket whose datagrams travel as records over one stream: every packet quinn
/// sends goes to the stream's far end, and every packet from it appears to come from `peer`.
#[derive(Debug)]
pub struct StreamSocket {
    local: SocketAddr,
    peer: SocketAddr,
    out: Arc<Queue<()>>,
    inbox: Arc<Queue<()>>,
    closed: Arc<tokio::sync::Notify>,
    _tasks: Tasks,
}

impl StreamSocket {
    /// Starts moving records over `stream`. `local` and `peer` are what quinn is told (the
    /// TCP connection's addresses); connect quinn to `peer`.
    pub fn spawn<S>(stream: S, local: SocketAddr, peer: SocketAddr) -> Arc<Self>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let out = Arc::new(Queue::new(STREAM_QUEUE_BYTES));
        let inbox = Arc::new(Queue::new(INBOX_BYTES));
        let closed = Arc::new(tokio::sync::Notify::new());
        let (mut reader, mut writer) = tokio::io::split(stream);
        let read_task = {
            let (out, inbox, closed) = (out.clone(), inbox.clone(), closed.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Ok(true) = read_record(&mut reader, &mut buf).await {
                    // Dropped when quinn falls behind, as a full socket buffer drops.
                    let _ = inbox.push((), Bytes::copy_from_slice(&buf));
                }
                out.close();
                inbox.close();
                closed.notify_waiters();
                closed.notify_one();
            })
        };
        let write_task = {
            let (out, inbox, closed) = (out.clone(), inbox.clone(), closed.clone());
            tokio::spawn(async move {
                let _ = pump_out(&out, &mut writer, |(), d, b| put_record(b, &[d])).await;
                out.close();
                inbox.close();
                closed.notify_waiters();
                closed.notify_one();
            })
        };
        Arc::new(StreamSocket {
            local,
            peer,
            out,
            inbox,
            closed,
            _tasks: Tasks(vec![read_task.abort_handle(), write_task.abort_handle()]),
        })
    }

    /// Resolves once the stream has ended or failed: the path is gone.
    pub async fn closed(&self) {
        let notified = self.closed.notified();
        if self.out.is_closed() {
            return;
        }
        notified.await;
    }
}

#[derive(Debug)]
struct QueueSpace(Arc<Queue<()>>);

impl UdpPoller for QueueSpace {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_space(cx).map(Ok)
    }
}

impl AsyncUdpSocket for StreamSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(QueueSpace(self.out.clone()))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        // One datagram per transmit (`max_transmit_segments` is 1), so a full queue can
        // push back without leaving half a batch sent.
        match self.out.push((), Bytes::copy_from_slice(transmit.contents)) {
            Ok(()) => Ok(()),
            Err(PushError::Full) => Err(io::ErrorKind::WouldBlock.into()),
            Err(PushError::Closed) => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = fill(&self.inbox, |()| self.peer, bufs, meta);
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            // A closed stream stays silent: the session notices through `closed`.
            if self.inbox.register_reader(cx) || self.inbox.is_closed() {
                return Poll::Pending;
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        // Records are never fragmented, so path MTU discovery may climb.
        false
    }
}

/// Where the daemon's socket sends a packet for a virtual address.
#[derive(Debug, Clone)]
enum RouteOut {
    Stream(Arc<Queue<()>>),
    Relay {
        link: Arc<Queue<RelayOut>>,
        flow: Flow,
    },
}

#[derive(Debug, Clone)]
struct Route {
    out: RouteOut,
    path: PathKind,
}

/// What the daemon queues towards a relay link.
#[derive(Debug, Clone, Copy)]
pub enum RelayOut {
    Datagram(Flow),
    Ping,
    Pong,
}

/// The queue of one relay link's outbound frames, kept across reconnects of the link so
/// that the virtual addresses of its flows (and the QUIC connections on them) survive.
#[derive(Debug, Clone)]
pub struct RelayQueue(Arc<Queue<RelayOut>>);

impl Default for RelayQueue {
    fn default() -> Self {
        RelayQueue(Arc::new(Queue::new(STREAM_QUEUE_BYTES)))
    }
}

impl RelayQueue {
    /// Queues a control frame (dropped when the link is backed up: a ping that waits
    /// behind megabytes is no use).
    pub fn push_control(&self, frame: RelayOut) {
        let _ = self.0.push(frame, Bytes::new());
    }

    /// Queues a datagram for `flow`; false when the link is backed up and it was dropped.
    pub fn push_datagram(&self, flow: Flow, data: Bytes) -> bool {
        self.0.push(RelayOut::Datagram(flow), data).is_ok()
    }

    /// Ends the link's writer once what is queued is written; pushes fail from now on.
    pub fn close(&self) {
        self.0.close();
    }

    /// Writes queued frames to the link until it fails. What is queued when the link
    /// fails is lost (as packets on a dead path are); the queue stays usable.
    pub async fn pump<W: AsyncWrite + Unpin>(&self, w: &mut W) -> io::Result<()> {
        pump_out(&self.0, w, |tag, data, batch| {
            let frame = match tag {
                RelayOut::Datagram(flow) => crate::relay::Frame::Datagram {
                    flow: *flow,
                    payload: data,
                },
                RelayOut::Ping => crate::relay::Frame::Ping,
                RelayOut::Pong => crate::relay::Frame::Pong,
            };
            // Encoded in place behind its length prefix: no buffer per frame.
            let start = batch.len();
            batch.extend_from_slice(&[0, 0]);
            frame.encode(batch);
            let len = u16::try_from(batch.len() - start - 2).map_err(|_| {
                batch.truncate(start);
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a relay frame over 65,535 bytes",
                )
            })?;
            batch[start..start + 2].copy_from_slice(&len.to_be_bytes());
            Ok(())
        })
        .await
    }
}

/// The outbound queue of one stream that carries datagrams as records (a relay's side of
/// an agent's TCP flow).
#[derive(Debug, Clone)]
pub struct RecordQueue(Arc<Queue<()>>);

impl Default for RecordQueue {
    fn default() -> Self {
        RecordQueue(Arc::new(Queue::new(STREAM_QUEUE_BYTES)))
    }
}

impl RecordQueue {
    /// Queues a datagram; false when the stream is backed up and it was dropped.
    pub fn push(&self, data: Bytes) -> bool {
        self.0.push((), data).is_ok()
    }

    pub fn close(&self) {
        self.0.close();
    }

    /// Writes queued datagrams to `w` as records until the queue is closed or a write fails.
    pub async fn pump<W: AsyncWrite + Unpin>(&self, w: &mut W) -> io::Result<()> {
        pump_out(&self.0, w, |(), d, b| put_record(b, &[d])).await
    }
}

/// The first segment of the virtual addresses: IPv6's discard-only prefix (RFC 6666), so
/// no real peer's packets can ever carry one.
const VIRTUAL_PREFIX: u16 = 0x0100;

fn virtual_addr(id: u64) -> SocketAddr {
    let s = |shift: u32| (id >> shift) as u16;
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::new(VIRTUAL_PREFIX, 0, 0, 0, s(48), s(32), s(16), s(0)),
        1,
        0,
        0,
    ))
}

/// The daemon's socket: its UDP port, plus routes that carry datagrams over streams.
#[derive(Debug)]
pub struct MuxSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    inbox: Queue<SocketAddr>,
    routes: Mutex<HashMap<SocketAddr, Route>>,
    next_id: AtomicU64,
    /// Alternates which source `poll_recv` drains first, so neither starves the other.
    streams_first: AtomicBool,
}

impl MuxSocket {
    /// Wraps a bound UDP socket (see `tls::bind_udp`).
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Arc<Self>> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        Ok(Arc::new(MuxSocket {
            io: tokio::net::UdpSocket::from_std(socket)?,
            state,
            inbox: Queue::new(INBOX_BYTES),
            routes: Mutex::default(),
            next_id: AtomicU64::new(1),
            streams_first: AtomicBool::new(false),
        }))
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The path a peer address stands for: a virtual one names its route, any other is UDP.
    pub fn path_of(&self, addr: SocketAddr) -> PathKind {
        self.routes()
            .get(&addr)
            .map_or(PathKind::UDP_DIRECT, |r| r.path)
    }

    /// How many routes exist now (direct TCP flows and relay flows).
    pub fn route_count(&self) -> usize {
        self.routes().len()
    }

    fn add_route(&self, out: RouteOut, path: PathKind) -> SocketAddr {
        let addr = virtual_addr(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.routes().insert(addr, Route { out, path });
        addr
    }

    /// Removes a route; packets for it are dropped from now on.
    pub fn remove_route(&self, addr: SocketAddr) {
        self.routes().remove(&addr);
    }

    /// Hands quinn a datagram that arrived on a route.
    pub fn deliver(&self, from: SocketAddr, data: Bytes) {
        // Dropped when quinn falls behind, as a full socket buffer drops.
        let _ = self.inbox.push(from, data);
    }

    /// A route for a flow through a relay link; returns its virtual address.
    pub fn add_relay_route(&self, link: &RelayQueue, flow: Flow) -> SocketAddr {
        let path = PathKind {
            transport: flow.transport,
            via: Via::Relay,
        };
        self.add_route(
            RouteOut::Relay {
                link: link.0.clone(),
                flow,
            },
            path,
        )
    }

    /// Carries one agent's direct TCP flow until the stream ends or fails.
    pub async fn serve_stream<S>(self: &Arc<Self>, stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let out = Arc::new(Queue::new(STREAM_QUEUE_BYTES));
        let addr = self.add_route(
            RouteOut::Stream(out.clone()),
            PathKind {
                transport: Transport::Tcp,
                via: Via::Direct,
            },
        );
        let (mut reader, mut writer) = tokio::io::split(stream);
        let inbound = async {
            let mut buf = Vec::new();
            while read_record(&mut reader, &mut buf).await? {
                self.deliver(addr, Bytes::copy_from_slice(&buf));
            }
            io::Result::Ok(())
        };
        let outbound = pump_out(&out, &mut writer, |(), d, b| put_record(b, &[d]));
        let result = tokio::select! {
            r = inbound => r,
            r = outbound => r,
        };
        out.close();
        self.remove_route(addr);
        result
    }

    fn poll_udp(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            if let Ok(n) = self.io.try_io(tokio::io::Interest::READABLE, || {
                self.state.recv((&self.io).into(), bufs, meta)
            }) {
                return Poll::Ready(Ok(n));
            }
        }
    }
}

#[derive(Debug)]
struct UdpWritable(Arc<MuxSocket>);

impl UdpPoller for UdpWritable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.io.poll_send_ready(cx)
    }
}

impl AsyncUdpSocket for MuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(UdpWritable(self))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let route = self
            .routes()
            .get(&transmit.destination)
            .map(|r| r.out.clone());
        match route {
            None => self.io.try_io(tokio::io::Interest::WRITABLE, || {
                self.state.send((&self.io).into(), transmit)
            }),
            // A full or closed route drops what does not fit (never blocks the endpoint,
            // which serves every agent): QUIC reads it as loss.
            Some(RouteOut::Stream(out)) => {
                for d in datagrams(transmit) {
                    let _ = out.push((), Bytes::copy_from_slice(d));
                }
                Ok(())
            }
            Some(RouteOut::Relay { link, flow }) => {
                for d in datagrams(transmit) {
                    let _ = link.push(RelayOut::Datagram(flow), Bytes::copy_from_slice(d));
                }
                Ok(())
            }
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let streams_first = !self.streams_first.fetch_xor(true, Ordering::Relaxed);
        if streams_first {
            let n = fill(&self.inbox, |a| *a, bufs, meta);
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
        }
        if let Poll::Ready(r) = self.poll_udp(cx, bufs, meta) {
            return Poll::Ready(r);
        }
        loop {
            let n = fill(&self.inbox, |a| *a, bufs, meta);
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            if self.inbox.register_reader(cx) {
                return Poll::Pending;
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_round_trip_and_end_cleanly() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let mut out = Vec::new();
        put_record(&mut out, &[b"ab", b"c"]).expect("fits");
        put_record(&mut out, &[&[7u8; 65535]]).expect("fits");
        assert!(put_record(&mut Vec::new(), &[&[0u8; 65536]]).is_err());
        a.write_all(&out).await.expect("write");
        drop(a);
        let mut buf = Vec::new();
        assert!(read_record(&mut b, &mut buf).await.expect("read"));
        assert_eq!(buf, b"abc");
        assert!(read_record(&mut b, &mut buf).await.expect("read"));
        assert_eq!(buf.len(), 65535);
        assert!(!read_record(&mut b, &mut buf).await.expect("clean end"));
    }

    #[tokio::test]
    async fn a_record_cut_short_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 10, 1, 2]).await.expect("write");
        drop(a);
        let mut buf = Vec::new();
        assert!(read_record(&mut b, &mut buf).await.is_err());
    }

    #[test]
    fn virtual_addresses_are_unique_and_in_the_discard_prefix() {
        let a = virtual_addr(1);
        let b = virtual_addr(u64::MAX);
        assert_ne!(a, b);
        for addr in [a, b] {
            let SocketAddr::V6(v6) = addr else {
                panic!("v6")
            };
            assert_eq!(v6.ip().segments()[..4], [0x0100, 0, 0, 0]);
        }
    }
}
