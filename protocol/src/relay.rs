//! The link between the daemon and a `runctl-relay` (pure): after a TLS handshake in which
//! the daemon proves it holds a controller certificate, both sides exchange records (see
//! [`crate::carrier`] for the length prefix) holding one [`Frame`] each. A datagram frame
//! names the agent's flow at the relay, so one link carries every agent's QUIC packets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::path::Transport;

/// ALPN of the daemon's registration link.
pub const ALPN_REGISTER: &[u8] = b"runctl-relay-register/1";

/// One agent's packets at the relay: its address there and how it reached the relay. The
/// relay keys its flows by this; the daemon gives each flow an address of its own for quinn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub transport: Transport,
    pub addr: SocketAddr,
}

/// A record on the registration link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Liveness: either side may send it; the other answers `Pong`.
    Ping,
    Pong,
    /// A QUIC packet to or from an agent's flow.
    Datagram {
        flow: Flow,
        payload: &'a [u8],
    },
}

/// Why a relay frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayFrameError {
    #[error("relay frame is empty")]
    Empty,
    #[error("relay frame has unknown tag {0}")]
    Tag(u8),
    #[error("relay frame's flow header is cut short")]
    Short,
    #[error("relay frame names unknown transport {0}")]
    Transport(u8),
    #[error("relay frame names unknown address family {0}")]
    Family(u8),
    #[error("relay ping or pong frame has {0} bytes after its tag")]
    Trailing(usize),
}

const TAG_PING: u8 = 0;
const TAG_PONG: u8 = 1;
const TAG_DATAGRAM: u8 = 2;

/// The bytes a datagram frame adds at most: tag, transport, family, 16 address bytes, port.
pub const MAX_HEADER_BYTES: usize = 1 + 1 + 1 + 16 + 2;

impl<'a> Frame<'a> {
    /// Appends the frame's bytes (without the record's length prefix) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Ping => out.push(TAG_PING),
            Frame::Pong => out.push(TAG_PONG),
            Frame::Datagram { flow, payload } => {
                out.push(TAG_DATAGRAM);
                out.push(match flow.transport {
                    Transport::Udp => 0,
                    Transport::Tcp => 1,
                });
                match flow.addr.ip() {
                    IpAddr::V4(ip) => {
                        out.push(4);
                        out.extend_from_slice(&ip.octets());
                    }
                    IpAddr::V6(ip) => {
                        out.push(6);
                        out.extend_from_slice(&ip.octets());
                    }
                }
                out.extend_from_slice(&flow.addr.port().to_be_bytes());
                out.extend_from_slice(payload);
            }
        }
    }

    pub fn decode(bytes: &'a [u8]) -> Result<Self, RelayFrameError> {
        let (&tag, rest) = bytes.split_first().ok_or(RelayFrameError::Empty)?;
        match tag {
            TAG_PING | TAG_PONG if !rest.is_empty() => Err(RelayFrameError::Trailing(rest.len())),
            TAG_PING => Ok(Frame::Ping),
            TAG_PONG => Ok(Frame::Pong),
            TAG_DATAGRAM => {
                let [transport, family, rest @ ..] = rest else {
                    return Err(RelayFrameError::Short);
                };
                let transport = match transport {
                    0 => Transport::Udp,
                    1 => Transport::Tcp,
                    other => return Err(RelayFrameError::Transport(*other)),
                };
                let (ip, rest): (IpAddr, &[u8]) = match family {
                    4 => {
                        let (ip, rest) = rest
                            .split_first_chunk::<4>()
                            .ok_or(RelayFrameError::Short)?;
                        (Ipv4Addr::from(*ip).into(), rest)
                    }
                    6 => {
                        let (ip, rest) = rest
                            .split_first_chunk::<16>()
                            .ok_or(RelayFrameError::Short)?;
                        (Ipv6Addr::from(*ip).into(), rest)
                    }
                    other => return Err(RelayFrameError::Family(*other)),
                };
                let (port, payload) = rest
                    .split_first_chunk::<2>()
                    .ok_or(RelayFrameError::Short)?;
                Ok(Frame::Datagram {
                    flow: Flow {
                        transport,
                        addr: SocketAddr::new(ip, u16::from_be_bytes(*port)),
                    },
                    payload,
                })
            }
            other => Err(RelayFrameError::Tag(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: Frame<'_>) {
        let mut out = Vec::new();
        frame.encode(&mut out);
        assert!(out.len() <= MAX_HEADER_BYTES + 3, "{}", out.len());
        assert_eq!(Frame::decode(&out).expect("decodes"), frame);
    }

    #[test]
    fn frames_round_trip() {
        round_trip(Frame::Ping);
        round_trip(Frame::Pong);
        for (transport, addr) in [
            (Transport::Udp, "192.0.2.1:5000"),
            (Transport::Tcp, "[2001:db8::7]:443"),
        ] {
            round_trip(Frame::Datagram {
                flow: Flow {
                    transport,
                    addr: addr.parse().expect("valid"),
                },
                payload: b"abc",
            });
        }
    }

    #[test]
    fn golden_datagram_encoding() {
        let mut out = Vec::new();
        Frame::Datagram {
            flow: Flow {
                transport: Transport::Tcp,
                addr: "192.0.2.1:258".parse().expect("valid"),
            },
            payload: b"x",
        }
        .encode(&mut out);
        assert_eq!(out, [2, 1, 4, 192, 0, 2, 1, 1, 2, b'x']);
    }

    fn check_refused(bytes: &[u8], expected: RelayFrameError) {
        assert_eq!(Frame::decode(bytes), Err(expected), "{bytes:?}");
    }

    #[test]
    fn malformed_frames_are_refused() {
        check_refused(&[], RelayFrameError::Empty);
        check_refused(&[9], RelayFrameError::Tag(9));
        check_refused(&[2], RelayFrameError::Short);
        check_refused(&[2, 0], RelayFrameError::Short);
        check_refused(&[2, 5, 4], RelayFrameError::Transport(5));
        check_refused(&[2, 0, 5], RelayFrameError::Family(5));
        check_refused(&[2, 0, 4, 1, 2, 3], RelayFrameError::Short);
        check_refused(&[2, 0, 6, 1, 2, 3, 4], RelayFrameError::Short);
        check_refused(&[2, 0, 4, 1, 2, 3, 4, 9], RelayFrameError::Short);
        // An empty payload is a valid (if useless) datagram.
        assert!(Frame::decode(&[2, 0, 4, 1, 2, 3, 4, 0, 9]).is_ok());
    }
}
