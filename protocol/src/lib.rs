//! runctl's wire protocol: the messages both sides exchange, their one codec, and the QUIC
//! channel (endpoints, mutual TLS, framing) that carries them.
//!
//! `ids`, `budget`, `launch`, `restart`, `message`, `streams`, `stats`, `codec`, `manifest`, `delta`, `agent_config`, `path` and
//! `relay` are pure: no tokio, no clock, no I/O. `tls`, `framed`, `carrier`, `copy` (a copy's tar, checked
//! unpack) and `splice` (a forwarded TCP connection over a stream) are the thin I/O shell
//! around them.

pub mod agent_config;
pub mod budget;
pub mod carrier;
pub mod clock;
pub mod codec;
pub mod copy;
pub mod delta;
pub mod framed;
pub mod ids;
pub mod launch;
pub mod manifest;
pub mod message;
pub mod path;
pub mod relay;
pub mod restart;
pub mod splice;
pub mod stats;
pub mod streams;
pub mod tls;

pub use codec::{FrameError, MAX_FRAME_BYTES};
pub use ids::{EnrollToken, Fingerprint, IdError, InstanceName, RunId};
pub use manifest::{ContentHash, Manifest};
pub use message::*;
pub use stats::{GpuStats, HostStats, RunStats, StatsSample};

/// The version of the agent-controller protocol this build speaks. Bump it on any change
/// to the messages; the golden encodings in `message` tests make such a change visible.
pub const PROTOCOL_VERSION: u16 = 13;
