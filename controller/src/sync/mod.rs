//! Code sync on the controller's side: finding the project root, scanning it into a
//! manifest (with a stat cache), and writing the content stream for a delta. The wire
//! exchange with the agent is the daemon's (`daemon::sync`); the decisions are
//! `protocol::delta`'s.

pub mod big;
pub mod pack;
pub mod root;
pub mod scan;
pub mod watch;
