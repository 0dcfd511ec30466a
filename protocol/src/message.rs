//! Every message that crosses the agent-controller channel. Each side sends `Hello` first;
//! the rest depends on whether the connection is an enrollment (no client certificate) or
//! an authenticated session (mutual TLS).

use serde::{Deserialize, Serialize};

use crate::ids::{EnrollToken, InstanceName, RunId};

/// The first message in both directions on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    /// The sending program and its version, e.g. `runctl-agent 0.1.0`, for error messages.
    pub software: String,
}

impl Hello {
    pub fn new(software: &str) -> Self {
        Hello {
            protocol_version: crate::PROTOCOL_VERSION,
            software: software.to_owned(),
        }
    }

    /// Checks the peer's hello against ours; the error names both versions and what to do.
    pub fn check_peer(&self, peer: &Hello) -> Result<(), WireError> {
        if self.protocol_version == peer.protocol_version {
            return Ok(());
        }
        Err(WireError::new(
            ErrorKind::VersionMismatch,
            format!(
                "incompatible protocol versions: {} speaks {}, {} speaks {}; install matching versions of runctl-controller and runctl-agent",
                self.software, self.protocol_version, peer.software, peer.protocol_version
            ),
        ))
    }
}

/// Messages from the agent to the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    Hello(Hello),
    /// On an enrollment connection: trade a single-use token for a client certificate.
    Enroll {
        token: EnrollToken,
        /// A PKCS#10 certificate signing request (DER) for the agent's own key pair.
        csr_der: Vec<u8>,
    },
    /// On an authenticated session, after `Hello`: the runs this agent knows, so the
    /// controller can ask for what it missed.
    Ready {
        runs: Vec<RunCursor>,
    },
    /// Periodic liveness and a summary of the agent's work.
    Heartbeat {
        active_runs: u32,
    },
    /// The result of `StartRun`: the process was spawned (or the start failed).
    RunStarted {
        run: RunId,
        result: Result<u32, WireError>,
    },
    /// Run events in sequence order, sent in answer to `Replay` and then live.
    Events {
        run: RunId,
        events: Vec<RunEvent>,
    },
    /// A request failed or was refused.
    Error(WireError),
}

/// Messages from the controller to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerMsg {
    Hello(Hello),
    /// The certificate issued in answer to `Enroll`.
    Enrolled {
        instance: InstanceName,
        cert_der: Vec<u8>,
    },
    /// Send the events of `run` with a sequence number above `after_seq`, then keep
    /// sending new ones as they happen, until the run's `Ended` event has been sent.
    Replay {
        run: RunId,
        after_seq: u64,
    },
    /// Stop a run: SIGTERM to its process group, SIGKILL after the grace period.
    StopRun {
        run: RunId,
        grace_ms: u64,
    },
    /// Stop every run (with their grace periods) and exit: the instance is being terminated.
    Shutdown {
        grace_ms: u64,
    },
    /// A request failed or was refused; the connection may be closed after it.
    Error(WireError),
}

/// The header frame of a bulk stream that starts a run: the spec, followed on the same
/// stream by the work directory as a zstd-compressed tar, up to the end of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRun {
    pub spec: RunSpec,
    /// The compressed size of the tar that follows, so the agent can refuse it up front.
    pub bundle_bytes: u64,
}

/// What to run and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    pub run: RunId,
    /// The program and its arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment variables for the process, on top of the agent's own.
    pub env: Vec<(String, String)>,
}

/// Where an agent's event log for one run stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCursor {
    pub run: RunId,
    /// The highest sequence number written (0 when none).
    pub last_seq: u64,
    pub ended: bool,
}

/// One entry in a run's durable event log. Sequence numbers start at 1 and have no gaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEvent {
    pub seq: u64,
    /// Agent wall-clock time, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The process was spawned.
    Started { pid: u32 },
    /// One line of output, without its line terminator; invalid UTF-8 is replaced.
    Output { stream: Stream, line: String },
    /// The run is over. Always the last event of a run.
    Ended(RunEnd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunEnd {
    /// The process exited with a code.
    Exited { code: i32, stop_requested: bool },
    /// The process was killed by a signal.
    Signaled { signal: i32, stop_requested: bool },
    /// The process could not be started (program not found, work dir unusable, ...).
    SpawnFailed { message: String },
    /// The agent lost track of the process (e.g. the agent itself was restarted).
    Lost { message: String },
}

/// An error carried on the wire: a kind to match on and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    pub kind: ErrorKind,
    pub message: String,
}

impl WireError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        WireError {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// The enrollment token is not one the controller issued.
    TokenUnknown,
    /// The enrollment token was already used.
    TokenReused,
    /// The enrollment token's lifetime is over.
    TokenExpired,
    /// The request needs an authenticated (mutual TLS) session.
    Unauthenticated,
    /// The client certificate was revoked (its instance was terminated).
    CertificateRevoked,
    /// The run belongs to another instance.
    NotYourRun,
    /// The message was malformed, out of order, or too large.
    BadRequest,
    /// The run could not be prepared or started.
    RunFailed,
    /// The named run does not exist here.
    NotFound,
    /// Something unexpected failed on the peer.
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    fn run_id() -> RunId {
        RunId::from_random([0xab; 6])
    }

    /// Golden encodings: a change to any message's wire form shows up here as a snapshot
    /// diff, and must come with a `PROTOCOL_VERSION` bump.
    fn golden<T: Serialize>(msg: &T) -> String {
        hex::encode(codec::encode(msg).expect("test messages encode"))
    }

    #[test]
    fn golden_agent_messages() {
        let msgs = [
            AgentMsg::Hello(Hello::new("runctl-agent 0.1.0")),
            AgentMsg::Enroll {
                token: EnrollToken::from_random([1; 32]),
                csr_der: vec![0x30, 0x82],
            },
            AgentMsg::Ready {
                runs: vec![RunCursor {
                    run: run_id(),
                    last_seq: 300,
                    ended: true,
                }],
            },
            AgentMsg::Heartbeat { active_runs: 2 },
            AgentMsg::RunStarted {
                run: run_id(),
                result: Ok(4242),
            },
            AgentMsg::RunStarted {
                run: run_id(),
                result: Err(WireError::new(ErrorKind::RunFailed, "no such dir")),
            },
            AgentMsg::Events {
                run: run_id(),
                events: vec![
                    RunEvent {
                        seq: 1,
                        at_ms: 1_700_000_000_000,
                        kind: EventKind::Started { pid: 7 },
                    },
                    RunEvent {
                        seq: 2,
                        at_ms: 1_700_000_000_001,
                        kind: EventKind::Output {
                            stream: Stream::Stderr,
                            line: "epoch 1".into(),
                        },
                    },
                    RunEvent {
                        seq: 3,
                        at_ms: 1_700_000_000_002,
                        kind: EventKind::Ended(RunEnd::Signaled {
                            signal: 15,
                            stop_requested: true,
                        }),
                    },
                ],
            },
            AgentMsg::Error(WireError::new(ErrorKind::BadRequest, "x")),
        ];
        let rendered: Vec<String> = msgs.iter().map(golden).collect();
        insta::assert_snapshot!(rendered.join("\n"));
    }

    #[test]
    fn golden_controller_messages() {
        let msgs = [
            ControllerMsg::Hello(Hello::new("runctl-controller 0.1.0")),
            ControllerMsg::Enrolled {
                instance: "local-1".parse().expect("valid name"),
                cert_der: vec![1, 2, 3],
            },
            ControllerMsg::Replay {
                run: run_id(),
                after_seq: 17,
            },
            ControllerMsg::StopRun {
                run: run_id(),
                grace_ms: 10_000,
            },
            ControllerMsg::Shutdown { grace_ms: 5_000 },
            ControllerMsg::Error(WireError::new(ErrorKind::TokenReused, "used")),
        ];
        let start = StartRun {
            spec: RunSpec {
                run: run_id(),
                argv: vec!["python3".into(), "train.py".into()],
                env: vec![("SEED".into(), "1".into())],
            },
            bundle_bytes: 1024,
        };
        let mut rendered: Vec<String> = msgs.iter().map(golden).collect();
        rendered.push(golden(&start));
        insta::assert_snapshot!(rendered.join("\n"));
    }

    #[test]
    fn every_message_round_trips() {
        let msg = AgentMsg::Events {
            run: run_id(),
            events: vec![RunEvent {
                seq: 9,
                at_ms: 5,
                kind: EventKind::Ended(RunEnd::Lost {
                    message: "agent restarted".into(),
                }),
            }],
        };
        let frame = codec::encode(&msg).expect("encodes");
        let back: AgentMsg = codec::decode(&frame[4..]).expect("decodes");
        assert_eq!(back, msg);
    }

    #[test]
    fn version_check_names_both_sides() {
        let ours = Hello::new("runctl-controller 0.1.0");
        let theirs = Hello {
            protocol_version: 999,
            software: "runctl-agent 9.0.0".into(),
        };
        let err = ours.check_peer(&theirs).expect_err("versions differ");
        assert_eq!(err.kind, ErrorKind::VersionMismatch);
        assert!(err.message.contains("speaks 1"), "{}", err.message);
        assert!(err.message.contains("speaks 999"), "{}", err.message);
        assert!(ours.check_peer(&ours.clone()).is_ok());
    }
}
