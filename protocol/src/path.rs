//! The ways an agent can reach the daemon (pure): each endpoint names a carrier (UDP, or
//! datagrams over TLS over TCP) and whether it is the daemon itself or a relay, and
//! [`attempts`] orders them for the agent's staggered dial.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What carries QUIC's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Transport {
    /// Plain UDP datagrams.
    Udp,
    /// Length-prefixed datagrams inside TLS over TCP, for networks that drop UDP.
    Tcp,
}

/// Whom the carrier reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Via {
    /// The daemon's own address.
    Direct,
    /// A `runctl-relay` the daemon has registered with; it forwards ciphertext only.
    Relay,
}

/// A path an agent's session runs over, as `list` and `status` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PathKind {
    pub transport: Transport,
    pub via: Via,
}

impl PathKind {
    pub const UDP_DIRECT: PathKind = PathKind {
        transport: Transport::Udp,
        via: Via::Direct,
    };

    /// Lower is tried first: UDP before TCP (no head-of-line blocking, no TLS in TLS),
    /// direct UDP before the relay (one hop less), but over TCP the relay first: a daemon
    /// a UDP-less agent cannot reach over UDP is most likely behind NAT, where its TCP
    /// port is not reachable either.
    fn preference(self) -> u8 {
        match (self.transport, self.via) {
            (Transport::Udp, Via::Direct) => 0,
            (Transport::Udp, Via::Relay) => 1,
            (Transport::Tcp, Via::Relay) => 2,
            (Transport::Tcp, Via::Direct) => 3,
        }
    }

    fn scheme(self) -> &'static str {
        match (self.transport, self.via) {
            (Transport::Udp, Via::Direct) => "udp",
            (Transport::Tcp, Via::Direct) => "tcp",
            (Transport::Udp, Via::Relay) => "udp+relay",
            (Transport::Tcp, Via::Relay) => "tcp+relay",
        }
    }
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let transport = match self.transport {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        };
        let via = match self.via {
            Via::Direct => "direct",
            Via::Relay => "via relay",
        };
        write!(f, "{transport} {via}")
    }
}

/// One way to reach the daemon: `udp://HOST:PORT`, `tcp://HOST:PORT`,
/// `udp+relay://HOST:PORT` or `tcp+relay://HOST:PORT`. A bare `HOST:PORT` is UDP direct,
/// as agent configs written before carriers existed say.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub path: PathKind,
    /// `host:port`, resolved by the agent when it dials.
    pub host_port: String,
}

/// Why an endpoint string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error(
        "endpoint {0:?} has an unknown scheme; use udp://, tcp://, udp+relay:// or tcp+relay:// before host:port"
    )]
    Scheme(String),
    #[error("endpoint {0:?} is not `host:port` (e.g. `203.0.113.7:7443`)")]
    HostPort(String),
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (path, rest) = match text.split_once("://") {
            None => (PathKind::UDP_DIRECT, text),
            Some((scheme, rest)) => {
                let path = [Transport::Udp, Transport::Tcp]
                    .into_iter()
                    .flat_map(|transport| {
                        [Via::Direct, Via::Relay].map(|via| PathKind { transport, via })
                    })
                    .find(|p| p.scheme() == scheme)
                    .ok_or_else(|| EndpointError::Scheme(text.to_owned()))?;
                (path, rest)
            }
        };
        match rest.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                Ok(Endpoint {
                    path,
                    host_port: rest.to_owned(),
                })
            }
            _ => Err(EndpointError::HostPort(text.to_owned())),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.path.scheme(), self.host_port)
    }
}

impl Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How far apart the agent starts its dial attempts: long enough for a healthy path's
/// handshake (one round trip on most links) to win before the next is tried, short
/// enough that a blocked one costs little (happy eyeballs, RFC 8305, uses 250 ms).
pub const STAGGER: Duration = Duration::from_millis(300);

/// The order and start delay of the agent's dial attempts: by path preference, except
/// that the path that worked last time goes first. Each endpoint appears once.
pub fn attempts(endpoints: &[Endpoint], last_good: Option<&Endpoint>) -> Vec<(Endpoint, Duration)> {
    let mut ordered: Vec<&Endpoint> = Vec::new();
    for e in endpoints {
        if !ordered.contains(&e) {
            ordered.push(e);
        }
    }
    // Stable: endpoints of one kind keep the order the config gives them.
    ordered.sort_by_key(|e| (Some(*e) != last_good, e.path.preference()));
    ordered
        .into_iter()
        .enumerate()
        .map(|(i, e)| (e.clone(), STAGGER * i as u32))
        .collect()
}

/// The configured endpoints on a better path than `current`'s, for the agent to probe
/// while it serves on a worse one.
pub fn better_than(endpoints: &[Endpoint], current: &Endpoint) -> Vec<Endpoint> {
    endpoints
        .iter()
        .filter(|e| e.path.preference() < current.path.preference())
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_parse(text: &str, expected: Result<&str, &str>) {
        let got = text.parse::<Endpoint>();
        match (got, expected) {
            (Ok(e), Ok(shown)) => assert_eq!(e.to_string(), shown, "{text}"),
            (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{text}: {e}"),
            (got, expected) => panic!("{text}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn endpoints_parse_and_print() {
        check_parse("203.0.113.7:7443", Ok("udp://203.0.113.7:7443"));
        check_parse("udp://h:1", Ok("udp://h:1"));
        check_parse("tcp://h:1", Ok("tcp://h:1"));
        check_parse(
            "udp+relay://relay.example.com:443",
            Ok("udp+relay://relay.example.com:443"),
        );
        check_parse(
            "tcp+relay://[2001:db8::1]:443",
            Ok("tcp+relay://[2001:db8::1]:443"),
        );
        check_parse("quic://h:1", Err("unknown scheme"));
        check_parse("tcp://h", Err("not `host:port`"));
        check_parse("h:0", Err("not `host:port`"));
        check_parse(":7443", Err("not `host:port`"));
        check_parse("tcp://h:99999", Err("not `host:port`"));
    }

    fn check_attempts(endpoints: &[&str], last_good: Option<&str>, expected: &[(&str, u64)]) {
        let endpoints: Vec<Endpoint> = endpoints
            .iter()
            .map(|e| e.parse().expect("valid"))
            .collect();
        let last: Option<Endpoint> = last_good.map(|e| e.parse().expect("valid"));
        let got: Vec<(String, u64)> = attempts(&endpoints, last.as_ref())
            .into_iter()
            .map(|(e, d)| (e.to_string(), d.as_millis() as u64))
            .collect();
        let expected: Vec<(String, u64)> =
            expected.iter().map(|(e, d)| (e.to_string(), *d)).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn better_paths_are_strictly_better() {
        let all: Vec<Endpoint> = [
            "tcp://d:1",
            "tcp+relay://r:2",
            "udp+relay://r:2",
            "udp://d:1",
        ]
        .iter()
        .map(|e| e.parse().expect("valid"))
        .collect();
        let names = |current: &str| -> Vec<String> {
            better_than(&all, &current.parse().expect("valid"))
                .iter()
                .map(|e| e.to_string())
                .collect()
        };
        assert_eq!(names("udp://d:1"), Vec::<String>::new());
        assert_eq!(names("tcp+relay://r:2"), ["udp+relay://r:2", "udp://d:1"]);
        assert_eq!(
            names("tcp://d:1"),
            ["tcp+relay://r:2", "udp+relay://r:2", "udp://d:1"]
        );
    }

    #[test]
    fn attempts_are_ordered_and_staggered() {
        let all = [
            "tcp://d:1",
            "tcp+relay://r:2",
            "udp+relay://r:2",
            "udp://d:1",
        ];
        check_attempts(
            &all,
            None,
            &[
                ("udp://d:1", 0),
                ("udp+relay://r:2", 300),
                ("tcp+relay://r:2", 600),
                ("tcp://d:1", 900),
            ],
        );
        check_attempts(
            &all,
            Some("tcp+relay://r:2"),
            &[
                ("tcp+relay://r:2", 0),
                ("udp://d:1", 300),
                ("udp+relay://r:2", 600),
                ("tcp://d:1", 900),
            ],
        );
        // A remembered path that is no longer configured is not tried.
        check_attempts(&["udp://d:1"], Some("tcp://x:1"), &[("udp://d:1", 0)]);
        check_attempts(
            &["udp://a:1", "udp://b:1", "a:1"],
            None,
            &[("udp://a:1", 0), ("udp://b:1", 300)],
        );
        check_attempts(&[], None, &[]);
    }
}
