//! runctl-controller: the laptop side. The CLI (`cli`, `commands`, `report`) talks over a
//! local socket (`ipc`) to a daemon (`daemon`) that it starts on demand. The daemon owns
//! the QUIC endpoint agents dial, the CA that identifies them (`pki`), and the database
//! (`db`); it launches instances through providers (`provider`) and keeps each run's
//! tree in step with the project (`sync`, driven by `daemon::sync`). `objects` moves data
//! and checkpoints to and from the object store directly; `volumes` manages EBS volumes
//! and `relays` runctl-relays directly with EC2. `remote` is the CLI side of `exec`,
//! `shell`, `forward` and `cp`.

pub mod cli;
pub mod commands;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod db;
pub mod detach;
pub mod doctor;
pub mod error;
pub mod gang;
pub mod home;
pub mod ipc;
pub mod objects;
pub mod pki;
pub mod plan;
pub mod provider;
pub mod relaunch;
pub mod relays;
pub mod remote;
pub mod report;
pub mod retention;
pub mod run_state;
pub mod runfile;
pub mod secrets;
pub mod settings;
pub mod sync;
pub mod volumes;
