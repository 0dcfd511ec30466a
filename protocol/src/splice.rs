//! One forwarded TCP connection over one QUIC stream (`streams::ForwardOpen`), the same at
//! both ends: bytes both ways, a half-close (FIN) carried as a stream finish, and a TCP
//! reset carried as a stream reset ([`FORWARD_RESET`]) and turned back into a reset
//! (`SO_LINGER` 0) on the far side.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::streams::FORWARD_RESET;

/// How a spliced connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes from the TCP side into the stream, and from the stream out to TCP.
    pub sent: u64,
    pub received: u64,
    /// Either side was reset (and the other was reset to match).
    pub reset: bool,
}

const BUF: usize = 64 * 1024;

/// Splices `tcp` and the stream until both directions are done.
pub async fn splice(
    tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Spliced {
    let (abort, aborted) = watch::channel(false);
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let tcp = &tcp;
    let up = async {
        let mut aborted = aborted.clone();
        let mut buf = vec![0u8; BUF];
        loop {
            tokio::select! {
                () = until(&mut aborted) => {
                    let _ = send.reset(FORWARD_RESET.into());
                    return;
                }
                ready = tcp.readable() => {
                    if ready.is_err() {
                        let _ = send.reset(FORWARD_RESET.into());
                        let _ = abort.send(true);
                        return;
                    }
                    match tcp.try_read(&mut buf) {
                        Ok(0) => {
                            let _ = send.finish();
                            return;
                        }
                        Ok(n) => {
                            if send.write_all(&buf[..n]).await.is_err() {
                                // The far side stopped reading: its connection is gone.
                                let _ = abort.send(true);
                                return;
                            }
                            sent.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => {
                            let _ = send.reset(FORWARD_RESET.into());
                            let _ = abort.send(true);
                            return;
                        }
                    }
                }
            }
        }
    };
    let down = async {
        let mut aborted = aborted.clone();
        let mut buf = vec![0u8; BUF];
        loop {
            let chunk = tokio::select! {
                () = until(&mut aborted) => {
                    let _ = recv.stop(FORWARD_RESET.into());
                    return;
                }
                chunk = recv.read(&mut buf) => chunk,
            };
            match chunk {
                Ok(Some(n)) => {
                    if write_all(tcp, &buf[..n]).await.is_err() {
                        let _ = recv.stop(FORWARD_RESET.into());
                        let _ = abort.send(true);
                        return;
                    }
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(None) => {
                    let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write);
                    return;
                }
                Err(_) => {
                    // Reset by the far side, or the connection is gone: reset ours.
                    let _ = abort.send(true);
                    return;
                }
            }
        }
    };
    tokio::join!(up, down);
    let reset = *abort.borrow();
    if reset {
        // Closing with a zero linger sends RST instead of FIN.
        let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
    }
    Spliced {
        sent: sent.into_inner(),
        received: received.into_inner(),
        reset,
    }
}

/// Resolves once the splice is aborted (the guard `wait_for` returns is dropped here, so
/// the future stays `Send`).
async fn until(aborted: &mut watch::Receiver<bool>) {
    let _ = aborted.wait_for(|a| *a).await.map(|_| ());
}

async fn write_all(tcp: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
