//! Every message that crosses the agent-controller channel. Each side sends `Hello` first;
//! the rest depends on whether the connection is an enrollment (no client certificate) or
//! an authenticated session (mutual TLS).

use serde::{Deserialize, Serialize};

use crate::ids::{EnrollToken, InstanceName, RunId};
use crate::manifest::ContentHash;
use crate::stats::StatsSample;

/// The first message in both directions on every connection.
///
/// Its layout is fixed from protocol 5 on: what a later version adds is a new feature
/// name, never a new field, so any two versions can read each other's `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    /// The sending program and its version, e.g. `runctl-agent 0.1.0`, for error messages.
    pub software: String,
    /// What the sender can do beyond the base protocol of its version (names from
    /// [`Feature`]; names a side does not know are ignored).
    pub features: Vec<String>,
}

/// The oldest protocol version this build talks to: the first with a fixed `Hello`.
pub const OLDEST_PEER_VERSION: u16 = 5;

/// Capabilities a side announces in its `Hello`. A request for one the peer lacks is
/// refused on its own (`ErrorKind::Unsupported`), not by dropping the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Sessions may run over the TCP and relay carriers (`protocol::carrier`).
    Carriers,
    /// The agent keeps a content store: a new run's first sync may be seeded from a tree
    /// it held before (`BulkOpen::SyncFrom`), and it reports its disk use
    /// (`AgentMsg::Disk`).
    Store,
    /// The agent takes object-store credentials from the controller
    /// (`ControllerMsg::StoreCredentials`), for hosts with no credentials of their own (a
    /// pod has no instance profile).
    StoreCredentials,
    /// The agent serves exec, shell, forward and copy streams (`crate::streams`).
    Streams,
    /// The agent takes a run's secrets beside its spec (`BulkOpen::StartRunWithSecrets`),
    /// keeps them in memory only and redacts them from the run's output.
    Secrets,
    /// The agent holds a run's budget (`BulkOpen::StartRunWith`): it stops the run the
    /// graceful way when the cap is reached, and says so (`Notice::BudgetExceeded`).
    Budget,
    /// The agent takes a run's launch (`RunStart::launch`): torchrun's environment and,
    /// under `--launcher torchrun`, the command wrapped in torchrun.
    Launcher,
    /// The agent starts a run that has ended once more on the same log
    /// (`BulkOpen::StartAgain`): a gang restarting all its nodes together.
    StartAgain,
    /// The agent's certificate is renewed over its session, well before it expires, with
    /// no token (`AgentMsg::Renew`, `ControllerMsg::Renewed`).
    Renew,
    /// The controller says when it has stored an ended run's whole log
    /// (`ControllerMsg::Stored`), so the agent may delete its own copy when it prunes.
    Stored,
}

impl Feature {
    pub const ALL: &[Feature] = &[
        Feature::Carriers,
        Feature::Store,
        Feature::StoreCredentials,
        Feature::Streams,
        Feature::Secrets,
        Feature::Budget,
        Feature::Launcher,
        Feature::StartAgain,
        Feature::Renew,
        Feature::Stored,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::Carriers => "carriers",
            Feature::Store => "store",
            Feature::StoreCredentials => "store-credentials",
            Feature::Streams => "streams",
            Feature::Secrets => "secrets",
            Feature::Budget => "budget",
            Feature::Launcher => "launcher",
            Feature::StartAgain => "start-again",
            Feature::Renew => "renew",
            Feature::Stored => "stored",
        }
    }
}

impl Hello {
    pub fn new(software: &str) -> Self {
        Hello {
            protocol_version: crate::PROTOCOL_VERSION,
            software: software.to_owned(),
            features: Feature::ALL.iter().map(|f| f.name().to_owned()).collect(),
        }
    }

    /// Checks the peer's hello against ours: the same version, or one apart (the newer
    /// side speaks the older one's protocol, using only features both announce). The
    /// error names both versions and what to do.
    pub fn check_peer(&self, peer: &Hello) -> Result<(), WireError> {
        let (a, b) = (self.protocol_version, peer.protocol_version);
        if a.abs_diff(b) <= 1 && a.min(b) >= OLDEST_PEER_VERSION {
            return Ok(());
        }
        Err(WireError::new(
            ErrorKind::VersionMismatch,
            format!(
                "incompatible protocol versions: {} speaks {}, {} speaks {} (versions one apart work together); install matching versions of runctl-controller and runctl-agent",
                self.software, self.protocol_version, peer.software, peer.protocol_version
            ),
        ))
    }

    /// Whether the peer announced `feature`.
    pub fn has(&self, feature: Feature) -> bool {
        self.features.iter().any(|f| f == feature.name())
    }

    /// `Ok` when the peer announced `feature`; else the refusal to send back for the one
    /// request that needed it.
    pub fn require(&self, feature: Feature) -> Result<(), WireError> {
        if self.has(feature) {
            return Ok(());
        }
        Err(WireError::new(
            ErrorKind::Unsupported,
            format!(
                "{} (protocol {}) does not support {}; upgrade it to use this",
                self.software,
                self.protocol_version,
                feature.name()
            ),
        ))
    }
}

/// Messages from the agent to the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// The result of `StartRun`: the run is under supervision (its setup and process
    /// follow as events), or it could not be started (the reason is also its `Ended`).
    RunStarted {
        run: RunId,
        result: Result<(), WireError>,
    },
    /// Run events in sequence order, sent in answer to `Replay` and then live.
    Events {
        run: RunId,
        events: Vec<RunEvent>,
    },
    /// One sample of the host's and its runs' resource use, sent at the sampling interval.
    Stats(Box<StatsSample>),
    /// A request failed or was refused.
    Error(WireError),
    /// What runctl keeps on the instance's disk, sent when it changes (feature `store`).
    Disk(DiskUse),
    /// A request for a new certificate for this session's instance, for a new key
    /// (feature `renew`): sent once two thirds of the current one's lifetime are gone.
    Renew {
        csr_der: Vec<u8>,
    },
}

/// The disk space runctl's own files take on an instance, by kind, and the filesystem's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUse {
    /// Runs' work trees, logs and everything else in their directories but checkpoints
    /// and environments.
    pub runs_bytes: u64,
    /// Checkpoints still on the instance's disk.
    pub checkpoints_bytes: u64,
    /// Runs' environments and the cached ones they are cloned from (files shared by hard
    /// link are counted once).
    pub envs_bytes: u64,
    /// The content store new runs' trees are seeded from.
    pub store_bytes: u64,
    /// The shared data directory (`RUNCTL_DATA_DIR`); never pruned.
    pub data_bytes: u64,
    /// Runs on the instance, and how many of them have ended.
    pub runs: u32,
    pub ended_runs: u32,
    /// Free and total bytes of the filesystem holding the agent's state.
    pub free_bytes: u64,
    pub total_bytes: u64,
}

impl DiskUse {
    pub fn runctl_bytes(&self) -> u64 {
        self.runs_bytes
            + self.checkpoints_bytes
            + self.envs_bytes
            + self.store_bytes
            + self.data_bytes
    }
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
    /// Stop a run: SIGTERM to its process group, SIGKILL after the grace period (the
    /// run's own, from its spec, when `None`).
    StopRun {
        run: RunId,
        grace_ms: Option<u64>,
    },
    /// Stop every run (each with its own grace period unless one is given) and exit: the
    /// instance is being terminated.
    Shutdown {
        grace_ms: Option<u64>,
    },
    /// A request failed or was refused; the connection may be closed after it.
    Error(WireError),
    /// Object-store credentials for the runs named in them (feature `store-credentials`),
    /// replacing any given before; sent when the session starts, before a run starts, and
    /// again before they expire.
    StoreCredentials(StoreCredentials),
    /// The certificate issued in answer to `Renew` (feature `renew`).
    Renewed {
        cert_der: Vec<u8>,
    },
    /// The controller has stored the events of `run` through `through_seq` (feature
    /// `stored`): sent once it has stored an ended run's `Ended`, and when a session starts
    /// for each ended run it holds whole. The agent's log of that run is then only a copy.
    Stored {
        run: RunId,
        through_seq: u64,
    },
}

/// Temporary object-store credentials the controller hands an agent over the channel, for
/// the runs they were scoped to. Never written to disk by the agent.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    /// When they stop working (Unix ms); `None`: they do not expire.
    pub expires_at_ms: Option<u64>,
    /// The runs whose prefixes they reach; a run's store requests wait for credentials
    /// that name it.
    pub runs: Vec<RunId>,
}

impl std::fmt::Debug for StoreCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expires_at_ms", &self.expires_at_ms)
            .field("runs", &self.runs)
            .finish()
    }
}

/// The first frame on every stream the controller opens beside the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BulkOpen {
    /// Start a run whose tree is already synced. Answered by `AgentMsg::RunStarted`.
    StartRun(Box<RunSpec>),
    /// Sync a run's tree. The exchange on the stream, in order:
    /// 1. agent: `SyncHave`, then, when its root differs from `known_root`, its manifest
    ///    (`manifest_bytes` of zstd-compressed bincode);
    /// 2. controller: `SyncGo`; after `Apply`, one zstd stream holding the bincode `Delta`
    ///    (`delta_bytes` long) and then a tar of new content, entries named by hash, up to
    ///    the end of the stream;
    /// 3. agent: `SyncDone`.
    Sync(SyncOpen),
    /// A sync that may seed the run's new, empty tree from the agent's store (feature
    /// `store`): `bases` are roots of trees the agent held before, best first. The agent
    /// fills the tree from the first whose content it still has all of, and answers that
    /// root in `SyncHave` (without a manifest: the controller knows it); the exchange then
    /// goes on as for `Sync`.
    SyncFrom {
        open: SyncOpen,
        bases: Vec<ContentHash>,
    },
    /// A command or a shell (feature `streams`; see `streams::ExecOpen`).
    Exec(crate::streams::ExecOpen),
    /// One forwarded TCP connection (feature `streams`; see `streams::ForwardOpen`).
    Forward(crate::streams::ForwardOpen),
    /// Files from the instance (feature `streams`; see `streams::CopyOpen`).
    CopyOut(crate::streams::CopyOpen),
    /// Files to the instance (feature `streams`; see `streams::CopyOpen`).
    CopyIn(crate::streams::CopyOpen),
    /// `StartRun` with secrets for the command's environment (feature `secrets`): never
    /// written to the agent's disk, and shown as `[secret NAME]` in the run's output.
    StartRunWithSecrets {
        spec: Box<RunSpec>,
        secrets: Vec<Secret>,
    },
    /// `StartRun` with what comes beside a spec (feature `budget`): its secrets, as for
    /// `StartRunWithSecrets`, and its budget, which the agent holds while the daemon is
    /// away.
    StartRunWith(Box<RunStart>),
    /// Start a run that has ended on this agent once more (feature `start-again`), its
    /// events going on in the same log after a `Notice::StartedAgain`: a gang's restart,
    /// every node at once. Refused while the run is still going. Answered by
    /// `AgentMsg::RunStarted`.
    StartAgain {
        start: Box<RunStart>,
        /// The attempt this is (2 for the first start again) and why, for the log.
        attempt: u32,
        cause: String,
    },
}

/// A run's start with everything beside its spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStart {
    pub spec: RunSpec,
    pub secrets: Vec<Secret>,
    pub budget: Option<crate::budget::Budget>,
    /// How the command is launched (feature `launcher`); `None`: as given, with no
    /// distributed environment.
    pub launch: Option<crate::launch::Launch>,
}

/// One secret environment variable. Its `Debug` leaves the value out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    pub name: String,
    pub value: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncOpen {
    pub run: RunId,
    /// The root of the tree the controller believes the agent has, if it has one cached.
    pub known_root: Option<ContentHash>,
    /// Create the run's tree if the agent has none (a run being started).
    pub create: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncHave {
    /// The root of the tree the agent has, re-checked against its disk just now.
    pub root: Result<ContentHash, WireError>,
    /// Length of the manifest that follows; 0 when the controller's `known_root` matched.
    pub manifest_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncGo {
    /// Nothing to send (a dry run, or the controller gave up).
    Cancel,
    Apply {
        delta_bytes: u64,
        /// Restart the run's process once the tree is in place (SIGTERM, SIGKILL after the
        /// run's grace period).
        restart: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncDone {
    pub result: Result<SyncApplied, WireError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncApplied {
    /// The root of the agent's tree now.
    pub root: ContentHash,
    /// The new process, when a restart was asked for.
    pub restarted_pid: Option<u32>,
}

/// What to run and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    pub run: RunId,
    /// The program and its arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment variables for the process, on top of the agent's own.
    pub env: Vec<(String, String)>,
    /// The directory to start in, relative to the synced tree's root ("" for the root).
    pub cwd: String,
    /// What to run before the command, once per run.
    pub setup: Setup,
    pub restart: RestartPolicy,
    /// Between SIGTERM and SIGKILL when the process is stopped (by the user, a restart,
    /// or the agent shutting down).
    pub stop_grace_ms: u64,
    /// What happens to the instance once the run has ended.
    pub end: EndAction,
    /// The signal sent to the process group when a spot interruption notice arrives, so
    /// the trainer can checkpoint (e.g. 15 for SIGTERM, 10 for SIGUSR1).
    pub spot_signal: i32,
    /// How the agent reaches the object store; needed for data, checkpoints and resuming.
    pub storage: Option<StoreSpec>,
    /// Data pulled into `RUNCTL_DATA_DIR` before the process starts.
    pub data: Vec<DataSource>,
    /// Start the process while the data is still being pulled, instead of after.
    pub pull_alongside: bool,
    /// Where every checkpoint saved in `RUNCTL_CHECKPOINT_DIR` is pushed.
    pub checkpoints: Option<CheckpointPush>,
    /// A checkpoint prefix (`s3://bucket/prefix/<run>/`, holding a `LATEST` record) whose
    /// newest complete checkpoint is fetched before the process starts, its local path
    /// given as `RUNCTL_RESUME_FROM`.
    pub resume_from: Option<String>,
}

/// How to reach the object store (no secrets: the agent uses the standard AWS credential
/// chain of its host: instance profile, environment, shared profiles).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreSpec {
    /// Buckets are directories under `root` on the agent's host.
    Local { root: String },
    S3 {
        region: Option<String>,
        endpoint_url: Option<String>,
        force_path_style: bool,
        profile: Option<String>,
    },
}

/// One data source: every object under `source` (`s3://bucket/prefix`, or one object) is
/// pulled to `dest`, a relative path inside the data dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataSource {
    pub source: String,
    pub dest: String,
}

/// Where checkpoints go and how many stay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointPush {
    /// This run's prefix, `s3://bucket/prefix/<run>/`.
    pub dest: String,
    /// Keep the newest `keep` complete checkpoints (0 keeps all); the newest complete one
    /// is never deleted.
    pub keep: u32,
}

/// The setup steps of a run, run in the start directory with output streamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Setup {
    /// Detect from the project: `uv sync` for a pyproject, `uv pip install -r` (or pip)
    /// for requirements.txt, `uv run` for a PEP 723 script; nothing when none applies.
    Auto,
    /// No setup.
    Skip,
    /// These shell commands (`sh -c`), in order; the first failure fails the run.
    Commands(Vec<String>),
}

/// When a run's process is started again after it ends by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    Never,
    /// After a failure (non-zero exit or a signal), at most `max_restarts` times.
    OnFailure {
        max_restarts: u32,
    },
    /// After every end that was not asked for, success included.
    Always,
}

/// What the agent does with its instance when a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndAction {
    /// Leave the instance running (the idle timeout still applies).
    Keep,
    /// Power the instance off (stopped, restartable; on EC2 its shutdown behaviour decides).
    Stop,
    /// Power the instance off for good.
    Terminate,
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
    /// A setup step started; its output follows as `Output` events.
    Setup { command: String },
    /// The process was spawned; `attempt` counts from 1 and grows with each restart.
    Started { pid: u32, attempt: u32 },
    /// One line of output, without its line terminator; invalid UTF-8 is replaced.
    Output { stream: Stream, line: String },
    /// A carriage-return progress update (a progress bar redrawing its line); the next
    /// `Progress` or `Output` of the stream replaces it. Rate-limited by the agent.
    Progress { stream: Stream, line: String },
    /// The process ended because a restart was asked for (`sync --restart`); a new
    /// `Started` follows.
    Restarted { previous: RunEnd },
    /// The process ended by itself and the restart policy starts it again after `delay_ms`,
    /// with `RUNCTL_RESUME_FROM` set to `resume_from` when a checkpoint exists.
    Retrying {
        previous: RunEnd,
        delay_ms: u64,
        resume_from: Option<String>,
    },
    /// Where the data pull stands; sent about once a second while it runs, and once with
    /// `done` when it has finished.
    Pull(PullProgress),
    /// Something happened to a checkpoint: uploaded (complete, `LATEST` written), failed,
    /// pruned by retention, or fetched to resume from.
    Checkpoint(CheckpointEvent),
    /// Something the user should know that is not output: a spot notice, lost lines.
    Notice(Notice),
    /// The run is over. Always the last event of a run.
    Ended(RunEnd),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullProgress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Files already present and identical, not fetched again.
    pub skipped: u64,
    pub done: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointEvent {
    /// The checkpoint's name in the checkpoint dir (a file or a directory).
    pub name: String,
    /// Where it is in the store.
    pub url: String,
    pub bytes: u64,
    pub files: u32,
    pub outcome: CheckpointOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointOutcome {
    /// Every part is in the store and `LATEST` names it (or a newer one); `ms` from the
    /// save to the record.
    Uploaded { ms: u64 },
    /// The upload failed; it is tried again (and on the agent's next start).
    Failed { message: String },
    /// Deleted from the store by the retention setting.
    Pruned,
    /// Fetched to `path` on the agent, for `RUNCTL_RESUME_FROM`.
    Fetched { path: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Notice {
    /// EC2 will interrupt this spot instance (`action` is stop, hibernate or terminate, at
    /// `time`, ISO 8601); the process group was sent `signal`.
    SpotInterruption {
        action: String,
        time: String,
        signal: i32,
    },
    /// EC2 recommends moving off this spot instance soon (no signal is sent).
    RebalanceRecommended { time: String },
    /// Output lines that could not be written to the agent's disk (e.g. it was full).
    LinesDropped { lines: u64, reason: String },
    /// The log reached its size cap; events up to `through_seq` were deleted on the agent.
    LogTruncated { through_seq: u64 },
    /// The run reached a cap of its budget (`spend` then): it is being stopped the graceful
    /// way (SIGTERM, the grace period, checkpoints pushed), then its end action.
    BudgetExceeded {
        limit: crate::budget::Limit,
        spend: crate::budget::Spend,
    },
    /// The run, which had ended here, was started again (`BulkOpen::StartAgain`): its
    /// `attempt`, and the `cause` its controller gave (a gang restarting after a node
    /// failed). An `Ended` before this one was not the run's last.
    StartedAgain { attempt: u32, cause: String },
    /// Written by the controller, never an agent: the run's log was compacted `keep_days`
    /// after it ended, and `lines` output lines before this notice were removed.
    Compacted { lines: u64, keep_days: u32 },
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
    /// A setup step failed (its output is in the run's log before this).
    SetupFailed { message: String },
    /// The data pull, or fetching the checkpoint to resume from, failed.
    DataFailed { message: String },
    /// The agent lost track of the process (e.g. the agent itself was restarted).
    Lost { message: String },
}

impl RunEnd {
    /// The message of an end that is runctl's failure rather than the process's own exit
    /// (it could not start, set up, fetch data, or keep track of the process).
    pub fn failure(&self) -> Option<&str> {
        match self {
            RunEnd::Exited { .. } | RunEnd::Signaled { .. } => None,
            RunEnd::SpawnFailed { message }
            | RunEnd::SetupFailed { message }
            | RunEnd::DataFailed { message }
            | RunEnd::Lost { message } => Some(message),
        }
    }

    /// How the process ended, in words for people; both ends render ends with this.
    pub fn describe(&self) -> String {
        match self {
            RunEnd::Exited { code, .. } => format!("the process exited with {code}"),
            RunEnd::Signaled { signal, .. } => format!("the process was killed by signal {signal}"),
            RunEnd::SpawnFailed { message }
            | RunEnd::SetupFailed { message }
            | RunEnd::DataFailed { message }
            | RunEnd::Lost { message } => message.clone(),
        }
    }
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
    /// A code sync was refused or failed; the tree is as it was before it.
    SyncFailed,
    /// The named run does not exist here.
    NotFound,
    /// Something unexpected failed on the peer.
    Internal,
    /// The peer's version lacks the feature the request needs.
    Unsupported,
    /// The agent's configuration does not allow this (shell, forwarding, a path or a host
    /// outside what it permits).
    Forbidden,
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
                result: Ok(()),
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
                        kind: EventKind::Started { pid: 7, attempt: 1 },
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
                        kind: EventKind::Pull(PullProgress {
                            files_done: 1,
                            files_total: 2,
                            bytes_done: 3,
                            bytes_total: 4,
                            skipped: 1,
                            done: false,
                        }),
                    },
                    RunEvent {
                        seq: 4,
                        at_ms: 1_700_000_000_002,
                        kind: EventKind::Checkpoint(CheckpointEvent {
                            name: "ckpt-1.pt".into(),
                            url: "s3://ckpt/runs/r-1/ckpt-1.pt".into(),
                            bytes: 1 << 30,
                            files: 1,
                            outcome: CheckpointOutcome::Uploaded { ms: 9_000 },
                        }),
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
            AgentMsg::Disk(DiskUse {
                runs_bytes: 1,
                checkpoints_bytes: 2,
                envs_bytes: 3,
                store_bytes: 4,
                data_bytes: 5,
                runs: 6,
                ended_runs: 5,
                free_bytes: 7,
                total_bytes: 8,
            }),
            AgentMsg::Renew {
                csr_der: vec![0x30, 0x82, 1, 2],
            },
        ];
        let mut rendered: Vec<String> = msgs.iter().map(golden).collect();
        rendered.push(golden(&SyncHave {
            root: Ok(ContentHash([9; 32])),
            manifest_bytes: 77,
        }));
        rendered.push(golden(&SyncDone {
            result: Ok(SyncApplied {
                root: ContentHash([3; 32]),
                restarted_pid: Some(99),
            }),
        }));
        let more_events = [
            EventKind::Setup {
                command: "uv sync".into(),
            },
            EventKind::Progress {
                stream: Stream::Stderr,
                line: "50%".into(),
            },
            EventKind::Retrying {
                previous: RunEnd::SetupFailed {
                    message: "x".into(),
                },
                delay_ms: 1000,
                resume_from: Some("/c/step-9.pt".into()),
            },
            EventKind::Notice(Notice::SpotInterruption {
                action: "terminate".into(),
                time: "2026-11-28T08:22:00Z".into(),
                signal: 15,
            }),
            EventKind::Notice(Notice::RebalanceRecommended {
                time: "2026-11-28T08:20:00Z".into(),
            }),
            EventKind::Notice(Notice::LinesDropped {
                lines: 3,
                reason: "disk full".into(),
            }),
            EventKind::Notice(Notice::LogTruncated { through_seq: 99 }),
            EventKind::Notice(Notice::BudgetExceeded {
                limit: crate::budget::Limit::Cost {
                    max_micros: 6_000_000,
                },
                spend: crate::budget::Spend {
                    cost_micros: Some(6_001_000),
                    elapsed_ms: 6_000,
                },
            }),
            EventKind::Notice(Notice::StartedAgain {
                attempt: 2,
                cause: "node 1: its agent died".into(),
            }),
        ];
        rendered.extend(more_events.into_iter().map(|kind| {
            golden(&RunEvent {
                seq: 5,
                at_ms: 2,
                kind,
            })
        }));
        rendered.push(golden(&AgentMsg::Stats(Box::new(StatsSample {
            at_ms: 3,
            host: crate::stats::HostStats {
                cpus: 16,
                cpu_percent: 12.5,
                mem_used_bytes: 1 << 30,
                mem_total_bytes: 1 << 34,
                disk_used_bytes: 5,
                disk_total_bytes: 10,
                net_rx_bytes_per_sec: 100,
                net_tx_bytes_per_sec: 200,
            },
            runs: vec![crate::stats::RunStats {
                run: run_id(),
                processes: 2,
                threads: 9,
                cpu_percent: 99.5,
                rss_bytes: 1 << 28,
                gpu_mem_bytes: Some(1 << 33),
            }],
            gpus: vec![crate::stats::GpuStats {
                index: 0,
                name: "NVIDIA H200".into(),
                util_percent: Some(97.0),
                mem_used_bytes: Some(1 << 33),
                mem_total_bytes: None,
                temp_c: Some(61.0),
                power_w: Some(500.5),
            }],
        }))));
        rendered.push(golden(&RunEvent {
            seq: 4,
            at_ms: 1,
            kind: EventKind::Restarted {
                previous: RunEnd::Exited {
                    code: 0,
                    stop_requested: true,
                },
            },
        }));
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
                grace_ms: Some(10_000),
            },
            ControllerMsg::Shutdown { grace_ms: None },
            ControllerMsg::Error(WireError::new(ErrorKind::TokenReused, "used")),
            ControllerMsg::StoreCredentials(StoreCredentials {
                access_key_id: "ASIAEXAMPLE".into(),
                secret_access_key: "secret".into(),
                session_token: Some("token".into()),
                expires_at_ms: Some(1_700_000_900_000),
                runs: vec![run_id()],
            }),
            ControllerMsg::Renewed {
                cert_der: vec![0x30, 0x82, 3, 4],
            },
            ControllerMsg::Stored {
                run: run_id(),
                through_seq: 812,
            },
        ];
        let bulk = [
            BulkOpen::StartRun(Box::new(RunSpec {
                run: run_id(),
                argv: vec!["python3".into(), "train.py".into()],
                env: vec![("SEED".into(), "1".into())],
                cwd: "src".into(),
                setup: Setup::Commands(vec!["uv sync".into()]),
                restart: RestartPolicy::OnFailure { max_restarts: 3 },
                stop_grace_ms: 10_000,
                end: EndAction::Terminate,
                spot_signal: 10,
                storage: Some(StoreSpec::S3 {
                    region: Some("eu-west-1".into()),
                    endpoint_url: None,
                    force_path_style: false,
                    profile: None,
                }),
                data: vec![DataSource {
                    source: "s3://data/imagenet/".into(),
                    dest: "imagenet".into(),
                }],
                pull_alongside: false,
                checkpoints: Some(CheckpointPush {
                    dest: "s3://ckpt/runs/r-1/".into(),
                    keep: 3,
                }),
                resume_from: Some("s3://ckpt/runs/r-0/".into()),
            })),
            BulkOpen::Sync(SyncOpen {
                run: run_id(),
                known_root: Some(ContentHash([7; 32])),
                create: true,
            }),
            BulkOpen::SyncFrom {
                open: SyncOpen {
                    run: run_id(),
                    known_root: None,
                    create: true,
                },
                bases: vec![ContentHash([8; 32])],
            },
        ];
        let mut rendered: Vec<String> = msgs.iter().map(golden).collect();
        rendered.extend(bulk.iter().map(golden));
        rendered.push(golden(&SyncGo::Apply {
            delta_bytes: 100,
            restart: true,
        }));
        let BulkOpen::StartRun(spec) = &bulk[0] else {
            panic!("the first is a start");
        };
        rendered.push(golden(&BulkOpen::StartRunWithSecrets {
            spec: spec.clone(),
            secrets: vec![Secret {
                name: "HF_TOKEN".into(),
                value: "hf_x".into(),
            }],
        }));
        rendered.push(golden(&BulkOpen::StartRunWith(Box::new(RunStart {
            spec: (**spec).clone(),
            secrets: vec![],
            budget: Some(crate::budget::Budget {
                max_cost_micros: Some(6_000_000),
                max_ms: Some(3_600_000),
                price_micros_per_hour: Some(1_006_000),
                spent_micros: 12_000,
                elapsed_ms: 40_000,
            }),
            launch: Some(crate::launch::Launch {
                launcher: crate::launch::Launcher::Torchrun,
                nodes: 2,
                rank: 1,
                nproc_per_node: Some(8),
                master: Some(crate::launch::Master {
                    addr: "10.0.0.5".into(),
                    port: 29500,
                }),
            }),
        }))));
        rendered.push(golden(&BulkOpen::StartAgain {
            start: Box::new(RunStart {
                spec: (**spec).clone(),
                secrets: vec![],
                budget: None,
                launch: None,
            }),
            attempt: 2,
            cause: "node 1: its agent died".into(),
        }));
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
        let theirs = |v: u16| Hello {
            protocol_version: v,
            software: "runctl-agent 9.0.0".into(),
            features: vec![],
        };
        let err = ours.check_peer(&theirs(999)).expect_err("versions differ");
        assert_eq!(err.kind, ErrorKind::VersionMismatch);
        assert!(
            err.message
                .contains(&format!("speaks {}", crate::PROTOCOL_VERSION)),
            "{}",
            err.message
        );
        assert!(err.message.contains("speaks 999"), "{}", err.message);
        assert!(ours.check_peer(&ours.clone()).is_ok());
        let v = crate::PROTOCOL_VERSION;
        assert!(ours.check_peer(&theirs(v + 1)).is_ok(), "one newer");
        assert_eq!(
            ours.check_peer(&theirs(v - 1)).is_ok(),
            v > OLDEST_PEER_VERSION
        );
        assert!(ours.check_peer(&theirs(v + 2)).is_err());
        assert!(ours.check_peer(&theirs(OLDEST_PEER_VERSION - 1)).is_err());
    }

    #[test]
    fn features_are_announced_and_required_one_by_one() {
        let full = Hello::new("runctl-agent 0.1.0");
        assert!(full.has(Feature::Carriers));
        assert!(full.require(Feature::Carriers).is_ok());
        let bare = Hello {
            features: vec!["a-feature-from-the-future".into()],
            ..full
        };
        let err = bare.require(Feature::Carriers).expect_err("lacks it");
        assert_eq!(err.kind, ErrorKind::Unsupported);
        assert!(
            err.message.contains("does not support carriers"),
            "{}",
            err.message
        );
    }

    /// A later version may only add feature names: its `Hello` must decode here whatever
    /// it announces.
    #[test]
    fn a_newer_hello_still_decodes() {
        let newer = Hello {
            protocol_version: crate::PROTOCOL_VERSION + 1,
            software: "runctl-agent 9.0.0".into(),
            features: vec!["carriers".into(), "exec".into(), "shell".into()],
        };
        let frame = codec::encode(&AgentMsg::Hello(newer.clone())).expect("encodes");
        let back: AgentMsg = codec::decode(&frame[4..]).expect("decodes");
        assert_eq!(back, AgentMsg::Hello(newer));
    }
}
