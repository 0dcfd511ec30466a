//! The local socket between the CLI and the daemon (`$RUNCTL_HOME/daemon.sock`, owner-only):
//! the request and response types, and the client, which starts the daemon when none is
//! running. Frames use the same codec as the agent channel.

use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::framed::{read_frame, write_frame};
use protocol::{EndAction, InstanceName, RestartPolicy, RunEvent, RunId, Setup, StatsSample};
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

pub use crate::daemon::sync::{Progress as SyncProgress, SyncReport};
use crate::db::{CloudRow, InstanceRow, RunRow};
use crate::error::{ErrorCode, UserError};
use crate::home::Home;
use crate::provider::LaunchOptions;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The first frame from the CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientHello {
    pub version: String,
}

/// The daemon's answer to `ClientHello`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonHello {
    pub version: String,
    pub pid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRequest {
    /// The project root to sync, absolute.
    pub root: PathBuf,
    /// Where to start, relative to the root ("" for the root).
    pub cwd: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run on this existing instance; otherwise launch one with `launch`.
    pub on: Option<InstanceName>,
    pub launch: LaunchOptions,
    /// Keep an instance launched for this run after the run ends.
    pub keep: bool,
    /// Answer once the process has started instead of streaming its output.
    pub detach: bool,
    pub setup: Setup,
    pub restart: RestartPolicy,
    /// Seconds between SIGTERM and SIGKILL; `None` for the daemon's default.
    pub stop_grace_secs: Option<u64>,
    /// What the agent does with the instance when the run ends; `None`: terminate an
    /// instance launched for the run (unless `keep`), keep an existing one.
    pub end: Option<EndAction>,
    /// The signal a spot interruption notice sends (a Linux signal number).
    pub spot_signal: i32,
    /// Data to pull before the command starts.
    pub data: Vec<protocol::DataSource>,
    pub pull_alongside: bool,
    /// Where checkpoints go (`s3://bucket/prefix`; the run's id is appended); `None` for
    /// `[storage] checkpoints`; `Some("")` for no push.
    pub checkpoints: Option<String>,
    /// `None` for `[storage] keep_checkpoints`.
    pub keep_checkpoints: Option<u32>,
    /// A run id or an `s3://` checkpoint prefix to resume from.
    pub resume_from: Option<String>,
    /// Secret variables for the command, handed to the agent at start and stored nowhere.
    pub secrets: Vec<protocol::Secret>,
    /// Stop the run once it has cost this many dollars (needs a known price).
    pub max_cost: Option<f64>,
    /// Stop the run once it has taken this many hours.
    pub max_hours: Option<f64>,
    /// How the command is launched (`--launcher`, `--nodes`); `None`: as given.
    pub launcher: Option<protocol::launch::Launch>,
    /// Every node of a gang pushes checkpoints, not only node 0 (`--checkpoints-from all`).
    pub checkpoints_from_all: bool,
    /// What the run does when its spot instance is taken back (`--on-interrupt`).
    pub on_interrupt: crate::relaunch::OnInterrupt,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncRequest {
    pub run: RunId,
    /// The project root (absolute); `None` for the run's own.
    pub root: Option<PathBuf>,
    pub dry_run: bool,
    pub restart: Restart,
}

/// Whether a sync restarts the run's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Restart {
    Never,
    /// Even when nothing changed (`sync --restart`: "restart it on the current code").
    Always,
    /// Only when the sync changed something (`sync --watch --restart`).
    IfChanged,
}

/// What `exec`, `shell`, `forward` and `cp` work on: a run (its start directory and
/// environment, relative paths in its tree) or an instance (its agent's home).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    Run(RunId),
    Instance(InstanceName),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Run(run) => write!(f, "{run}"),
            Target::Instance(name) => write!(f, "{name}"),
        }
    }
}

/// A stream to open on a target's agent; once the daemon answers `Spliced`, the socket
/// carries that stream's own frames (`protocol::streams`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Open {
    Exec {
        argv: Vec<String>,
        tty: Option<protocol::streams::TtySize>,
        term: Option<String>,
        stdin: bool,
    },
    CopyOut {
        path: String,
    },
    CopyIn {
        path: String,
    },
}

/// One `[LOCAL:][HOST:]REMOTE` forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardSpec {
    /// `None`: the same port as `port` (ssh -L's `6006` alone); `Some(0)`: any free one.
    pub local_port: Option<u16>,
    pub host: String,
    pub port: u16,
}

/// A forward that is listening.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardView {
    pub local: std::net::SocketAddr,
    /// `host:port` as the instance sees it.
    pub remote: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Status,
    List,
    Launch {
        options: LaunchOptions,
        name: Option<InstanceName>,
        /// Answer once the agent is connected; otherwise once the instance exists.
        wait: bool,
    },
    /// Power a cloud instance off (restartable); its agent reconnects after `StartInstance`.
    StopInstance {
        name: InstanceName,
        force: bool,
    },
    StartInstance {
        name: InstanceName,
    },
    Run(Box<RunRequest>),
    /// The run's events after `after_seq` (0: all of them), then its row.
    Sync(SyncRequest),
    Logs {
        run: RunId,
        follow: bool,
        after_seq: u64,
        /// Only events at or after this time (ms since the epoch).
        since_ms: Option<u64>,
        /// Only from the last this many output lines on.
        tail: Option<u64>,
        /// Only this node's events (a run of several nodes).
        node: Option<u32>,
    },
    /// Resource samples as they arrive: of every connected instance, or of one run's.
    Top {
        run: Option<RunId>,
    },
    Stop {
        run: RunId,
        grace_secs: Option<u64>,
    },
    Terminate {
        name: InstanceName,
        force: bool,
    },
    /// Where a run's checkpoints go; answered with `CheckpointDest`.
    CheckpointDest {
        run: RunId,
    },
    /// Open an exec, shell or copy stream on the target's agent: answered `Spliced`, after
    /// which the socket is the stream.
    Open {
        target: Target,
        open: Open,
    },
    /// Listen on local ports and forward each connection to the target's instance, until
    /// this connection closes: answered `Forwarding` once all listen, then `Progress`
    /// lines for connections that fail.
    Forward {
        target: Target,
        forwards: Vec<ForwardSpec>,
        bind: std::net::IpAddr,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStats {
    pub instance: InstanceName,
    pub sample: StatsSample,
    /// What runctl's own files take on its disk (from agents that report it).
    pub disk: Option<protocol::DiskUse>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub pid: u32,
    pub version: String,
    pub quic_addr: String,
    pub ca_sha256: String,
    pub agents_connected: u32,
    pub runs_active: u32,
    /// Instances running (cloud ones by their last known state, local ones connected).
    pub instances_running: u32,
    /// What the running instances cost per hour, where known.
    pub dollars_per_hour: f64,
    /// How each connected agent reaches the daemon.
    pub agents: Vec<AgentPathView>,
    /// The relay link, when `[daemon] relay` is set.
    pub relay: Option<RelayView>,
    /// Each active run with `--max-cost` or `--max-hours`: its caps and its spend now.
    pub budgets: Vec<BudgetView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetView {
    pub run: RunId,
    pub instance: InstanceName,
    /// The caps, with what was spent as of the report in `spent_micros`/`elapsed_ms`.
    pub budget: protocol::budget::Budget,
}

/// The path one agent's session runs over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentPath {
    /// `udp direct`, `udp via relay`, `tcp via relay`, `tcp direct`.
    pub path: String,
    /// QUIC's smoothed round-trip time, in milliseconds.
    pub rtt_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentPathView {
    pub instance: InstanceName,
    pub path: AgentPath,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayView {
    /// `host:port` of the relay.
    pub relay: String,
    pub registered: bool,
    /// Why the last attempt to register failed, while not registered.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    #[serde(rename = "instance")]
    pub row: InstanceRow,
    pub connected: bool,
    /// The connected agent's path and round-trip time.
    pub path: Option<AgentPath>,
    /// For a cloud instance: its id, type, price and billed time.
    pub cloud: Option<CloudRow>,
    /// Its cost so far, in dollars, where its price is known.
    pub cost: Option<f64>,
    /// What runctl's own files take on its disk, as its agent last reported.
    pub disk: Option<protocol::DiskUse>,
    /// The connected agent's software and protocol, and what to do when it is older.
    pub agent: Option<AgentVersion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentVersion {
    pub software: String,
    pub protocol: u16,
    pub upgrade: Option<String>,
}

/// A runctl-tagged instance in the cloud that this controller did not launch (another
/// controller's, or one whose record was lost).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForeignInstance {
    pub cloud_id: String,
    pub name: Option<String>,
    pub state: String,
    pub instance_type: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListReport {
    pub instances: Vec<InstanceView>,
    pub runs: Vec<RunRow>,
    /// The instances of each run of several nodes, node 0's first.
    #[serde(default)]
    pub nodes: Vec<(RunId, Vec<InstanceName>)>,
    pub foreign: Vec<ForeignInstance>,
    /// Why the cloud could not be asked (the list shows what runctl last knew).
    pub cloud_warning: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Status(StatusReport),
    List(ListReport),
    Launched(InstanceView),
    /// The run exists; `launched` says whether an instance was launched for it.
    RunAccepted {
        run: RunId,
        instance: InstanceName,
        launched: bool,
    },
    /// A phase of getting a run going, for stderr.
    Progress(String),
    SyncProgress(SyncProgress),
    Synced(SyncReport),
    Event(RunEvent),
    /// An event of a run of several nodes, with the node it came from.
    NodeEvent {
        node: u32,
        event: RunEvent,
    },
    /// The latest sample of each instance shown by `top`.
    Stats(Vec<InstanceStats>),
    /// The final state of a run: after `Logs`, `Stop`, a finished `Run`, or a detached
    /// `Run` once its process started.
    Run(RunRow),
    Terminated(InstanceView),
    /// An instance after `StopInstance` or `StartInstance`.
    Instance(InstanceView),
    /// The run's checkpoint prefix, `s3://bucket/prefix/<run>/`; `None` if it pushes none.
    CheckpointDest(Option<String>),
    /// The stream `Open` asked for is open on `instance`'s agent: from here on the socket
    /// carries it.
    Spliced {
        instance: InstanceName,
    },
    Forwarding(Vec<ForwardView>),
    Error(UserError),
}

/// A connection to the daemon.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Connects to the daemon, starting it in the background if it is not running.
    pub async fn connect(home: &Home) -> Result<Self, UserError> {
        if let Ok(client) = Self::try_connect(&home.socket()).await {
            return client.handshake().await;
        }
        let mut child = spawn_daemon(home)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(client) = Self::try_connect(&home.socket()).await {
                return client.handshake().await;
            }
            // Our daemon may have exited because another CLI started one at the same
            // moment: that one holds the lock and is about to open the socket.
            if let Ok(Some(status)) = child.try_wait()
                && !daemon_lock_held(home)
            {
                if let Ok(client) = Self::try_connect(&home.socket()).await {
                    return client.handshake().await;
                }
                return Err(UserError::new(
                    ErrorCode::DaemonUnavailable,
                    format!(
                        "the daemon exited ({status}) while starting: {}",
                        crate::home::log_tail(&home.daemon_log(), 5)
                    ),
                )
                .resolve(format!("read {}", home.daemon_log().display()))
                .resolve("run it in the foreground to see why: runctl-controller daemon"));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(UserError::new(
                    ErrorCode::DaemonUnavailable,
                    format!(
                        "the daemon did not open {} within 20 s",
                        home.socket().display()
                    ),
                )
                .resolve(format!("read {}", home.daemon_log().display())));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Connects only if a daemon is already running.
    pub async fn connect_existing(home: &Home) -> Result<Option<Self>, UserError> {
        match Self::try_connect(&home.socket()).await {
            Ok(client) => client.handshake().await.map(Some),
            Err(_) => Ok(None),
        }
    }

    async fn try_connect(socket: &Path) -> std::io::Result<Self> {
        Ok(Client {
            stream: UnixStream::connect(socket).await?,
        })
    }

    async fn handshake(mut self) -> Result<Self, UserError> {
        let hello = ClientHello {
            version: VERSION.to_owned(),
        };
        write_frame(&mut self.stream, &hello)
            .await
            .map_err(unavailable)?;
        let answer: DaemonHello = read_frame(&mut self.stream)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| unavailable("the daemon closed the connection"))?;
        if answer.version != VERSION {
            return Err(UserError::new(
                ErrorCode::DaemonUnavailable,
                format!(
                    "the running daemon (pid {}) is version {}, this CLI is {VERSION}",
                    answer.pid, answer.version
                ),
            )
            .resolve(
                "restart it: runctl-controller shutdown (runs on agents keep going), then retry",
            ));
        }
        Ok(self)
    }

    /// The socket itself, for a stream the daemon has spliced to an agent.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    pub async fn send(&mut self, request: &Request) -> Result<(), UserError> {
        write_frame(&mut self.stream, request)
            .await
            .map_err(unavailable)
    }

    /// The next response; `None` when the daemon closed the connection.
    pub async fn next(&mut self) -> Result<Option<Response>, UserError> {
        read_frame(&mut self.stream).await.map_err(unavailable)
    }

    /// Sends a request that has exactly one response; a `Response::Error` becomes `Err`.
    pub async fn call(home: &Home, request: &Request) -> Result<Response, UserError> {
        let mut client = Client::connect(home).await?;
        client.send(request).await?;
        match client.next().await? {
            Some(Response::Error(e)) => Err(e),
            Some(response) => Ok(response),
            None => Err(unavailable(
                "the daemon closed the connection without answering",
            )),
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> UserError {
    UserError::new(
        ErrorCode::DaemonUnavailable,
        format!("talking to the daemon failed: {e}"),
    )
    .resolve("check it with: runctl-controller status")
}

/// Whether some daemon holds this home's lock (is running or starting).
fn daemon_lock_held(home: &Home) -> bool {
    let Ok(file) = std::fs::OpenOptions::new().write(true).open(home.lock()) else {
        return false;
    };
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
}

/// Starts `runctl-controller daemon` in its own session, detached from this terminal,
/// with its output appended to the daemon log.
fn spawn_daemon(home: &Home) -> Result<std::process::Child, UserError> {
    let fail = |what: String| {
        UserError::new(ErrorCode::DaemonUnavailable, what)
            .resolve("run it in the foreground: runctl-controller daemon")
    };
    home.ensure().map_err(|e| fail(format!("{e:#}")))?;
    let exe =
        std::env::current_exe().map_err(|e| fail(format!("cannot find this executable: {e}")))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.daemon_log())
        .map_err(|e| fail(format!("cannot open {}: {e}", home.daemon_log().display())))?;
    let log_err = log
        .try_clone()
        .map_err(|e| fail(format!("cannot open {}: {e}", home.daemon_log().display())))?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("--home")
        .arg(home.root())
        .arg("daemon")
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err);
    crate::detach::new_session(&mut command);
    command
        .spawn()
        .map_err(|e| fail(format!("cannot start the daemon: {e}")))
}
