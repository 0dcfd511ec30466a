//! Many simulated agents in one process, for the load benchmark (`bench/load.py`).
//!
//! Started by the daemon as the local provider's agent binary (`RUNCTL_AGENT_BIN`), this
//! program is a shim: it hands its `--config` to the swarm listening on
//! `RUNCTL_SWARM_SOCKET` and stays alive (so the daemon sees its agent process) until the
//! swarm goes away. The swarm (`agent-swarm serve`) runs every handed config as an agent
//! speaking the real protocol: enrollment with the config's single-use token through the
//! agent's own code, a mutual-TLS QUIC session of its own, `Stats` at the sampling
//! interval, code syncs applied to a real work tree, and runs whose output is produced at a
//! fixed rate and streamed and replayed exactly as an agent's event log would be. Nothing is
//! executed: a run's lines are made from their sequence numbers, so none is held in memory.
//! Every second the swarm writes what it has done to the `--report` file (JSON).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::tree::{self, Tree};
use agent::{AgentConfig, dial, identity, session};
use anyhow::{Context, bail};
use protocol::framed::{read_frame, spawn_reader, write_frame};
use protocol::stats::{GpuStats, HostStats, RunStats};
use protocol::{
    AgentMsg, BulkOpen, ControllerMsg, ErrorKind, EventKind, RunCursor, RunEnd, RunEvent, RunId,
    StatsSample, Stream, SyncApplied, SyncDone, SyncGo, SyncHave, SyncOpen, WireError,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::{mpsc, watch};

const SOCKET_ENV: &str = "RUNCTL_SWARM_SOCKET";
/// The features the current protocol added over the previous one: an agent of the
/// previous protocol (`--previous-protocol`) does not announce them. Keep in step with
/// `protocol::PROTOCOL_VERSION`.
const ADDED_IN_CURRENT: &[&str] = &["stored"];
/// Events per `Events` frame at most (an agent bounds its batches by bytes; these lines
/// are about 90 bytes, so this is well under its 512 KiB).
const BATCH_EVENTS: u64 = 1000;
/// How often a run's producer adds the lines due.
const PRODUCE_EVERY: Duration = Duration::from_millis(20);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--config") => shim(args.get(1).context("--config needs a path")?),
        Some("serve") => {
            let opts = Opts::parse(&args[1..])?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(opts))
        }
        _ => bail!(
            "usage: agent-swarm serve --socket PATH --report PATH [--lines N] [--rate LINES_PER_S] [--stats-ms MS] [--previous-protocol]\n       agent-swarm --config PATH (as the daemon's agent binary, with {SOCKET_ENV} set)"
        ),
    }
}

/// The agent process the daemon starts: hand the config over, then live as long as the swarm.
fn shim(config: &str) -> anyhow::Result<()> {
    let socket = std::env::var(SOCKET_ENV).with_context(|| format!("{SOCKET_ENV} is not set"))?;
    let mut stream = std::os::unix::net::UnixStream::connect(&socket)
        .with_context(|| format!("no swarm listening on {socket}"))?;
    let path = std::fs::canonicalize(config)?;
    writeln!(stream, "{}", path.display())?;
    eprintln!("handed {} to the swarm", path.display());
    let mut rest = Vec::new();
    let read = stream.read_to_end(&mut rest);
    eprintln!("the swarm let go of this agent ({read:?})");
    Ok(())
}

struct Opts {
    socket: PathBuf,
    report: PathBuf,
    lines: u64,
    rate: u64,
    stats: Duration,
    previous: bool,
}

impl Opts {
    fn parse(args: &[String]) -> anyhow::Result<Opts> {
        let mut opts = Opts {
            socket: PathBuf::new(),
            report: PathBuf::new(),
            lines: 60_000,
            rate: 1000,
            stats: Duration::from_secs(1),
            previous: false,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--previous-protocol" {
                opts.previous = true;
                continue;
            }
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--socket" => opts.socket = value.into(),
                "--report" => opts.report = value.into(),
                "--lines" => opts.lines = value.parse()?,
                "--rate" => opts.rate = value.parse()?,
                "--stats-ms" => opts.stats = Duration::from_millis(value.parse()?),
                other => bail!("unknown flag {other}"),
            }
        }
        if opts.socket.as_os_str().is_empty() || opts.report.as_os_str().is_empty() {
            bail!("--socket and --report are required");
        }
        if opts.rate == 0 {
            bail!("--rate must be above 0");
        }
        Ok(opts)
    }
}

/// What the whole swarm has done, for the report.
#[derive(Default)]
struct Counters {
    enrolled: AtomicU64,
    connected: AtomicU64,
    failures: AtomicU64,
    stats_sent: AtomicU64,
    events_sent: AtomicU64,
}

struct Swarm {
    /// The `Hello` every agent opens with.
    hello: protocol::Hello,
    lines: u64,
    rate: u64,
    stats: Duration,
    counters: Counters,
    runs: Mutex<HashMap<RunId, Arc<SimRun>>>,
    errors: Mutex<Vec<String>>,
}

async fn serve(opts: Opts) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&opts.socket);
    let listener = tokio::net::UnixListener::bind(&opts.socket)
        .with_context(|| format!("listening on {}", opts.socket.display()))?;
    let mut hello = session::hello();
    if opts.previous {
        // An agent of the previous protocol: its version, without what came since. Its
        // messages are the current types' encodings, which the golden tests hold equal to
        // the previous protocol's for every message it sends.
        hello.protocol_version = protocol::PROTOCOL_VERSION - 1;
        hello.software = "runctl-agent (previous protocol)".into();
        hello
            .features
            .retain(|f| !ADDED_IN_CURRENT.contains(&f.as_str()));
    }
    let swarm = Arc::new(Swarm {
        hello,
        lines: opts.lines,
        rate: opts.rate,
        stats: opts.stats,
        counters: Counters::default(),
        runs: Mutex::new(HashMap::new()),
        errors: Mutex::new(Vec::new()),
    });
    tokio::spawn(report_every_second(swarm.clone(), opts.report.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        swarm.failed(format!("accepting a shim: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let swarm = swarm.clone();
                tokio::spawn(async move {
                    let mut reader = tokio::io::BufReader::new(stream);
                    let mut line = String::new();
                    if let Err(e) = reader.read_line(&mut line).await {
                        swarm.failed(format!("reading a shim's config path: {e}"));
                        return;
                    }
                    let path = PathBuf::from(line.trim_end());
                    if path.as_os_str().is_empty() {
                        swarm.failed(format!("a shim handed no config ({line:?})"));
                        return;
                    }
                    // The shim lives while this task holds its stream.
                    let mut agent = tokio::spawn(run_agent(swarm.clone(), path.clone()));
                    let mut rest = Vec::new();
                    tokio::select! {
                        _ = reader.read_to_end(&mut rest) => agent.abort(),
                        joined = &mut agent => match joined {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => swarm.failed(format!("{}: {e:#}", path.display())),
                            Err(e) => swarm.failed(format!("{}: the agent's task failed: {e}", path.display())),
                        },
                    }
                });
            }
            _ = term.recv() => break,
        }
    }
    write_report(&swarm, &opts.report)?;
    Ok(())
}

impl Swarm {
    fn failed(&self, what: String) {
        eprintln!("{what}");
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().expect("errors lock");
        if errors.len() < 20 {
            errors.push(what);
        }
    }
}

async fn report_every_second(swarm: Arc<Swarm>, path: PathBuf) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Err(e) = write_report(&swarm, &path) {
            eprintln!("writing the report: {e:#}");
        }
    }
}

fn write_report(swarm: &Swarm, path: &Path) -> anyhow::Result<()> {
    let c = &swarm.counters;
    let runs: serde_json::Map<String, serde_json::Value> = swarm
        .runs
        .lock()
        .expect("runs lock")
        .iter()
        .map(|(id, run)| {
            let state = *run.state.borrow();
            (
                id.to_string(),
                serde_json::json!({"last_seq": state.last_seq, "ended": state.ended.is_some(), "lines": run.lines_in(state)}),
            )
        })
        .collect();
    let report = serde_json::json!({
        "enrolled": c.enrolled.load(Ordering::Relaxed),
        "connected": c.connected.load(Ordering::Relaxed),
        "failures": c.failures.load(Ordering::Relaxed),
        "errors": *swarm.errors.lock().expect("errors lock"),
        "stats_sent": c.stats_sent.load(Ordering::Relaxed),
        "events_sent": c.events_sent.load(Ordering::Relaxed),
        "runs": runs,
    });
    let temp = path.with_extension("partial");
    std::fs::write(&temp, serde_json::to_vec(&report)?)?;
    std::fs::rename(&temp, path)?;
    Ok(())
}

/// One agent: enroll once, then keep a session up, redialling after a disconnect.
async fn run_agent(swarm: Arc<Swarm>, config_path: PathBuf) -> anyhow::Result<()> {
    let config = AgentConfig::load(&config_path)?;
    let identity = match identity::load(&config.state_dir)? {
        Some(identity) => identity,
        None => {
            let client = protocol::tls::client_config(config.ca_pin, None)?;
            let dialed = dial::dial(&config.controller, None, client).await?;
            let result = identity::enroll_as(&config, &dialed.conn, swarm.hello.clone()).await;
            dialed.endpoint.close(0u32.into(), b"");
            let identity = result?;
            swarm.counters.enrolled.fetch_add(1, Ordering::Relaxed);
            identity
        }
    };
    let agent = Arc::new(SimAgent {
        swarm: swarm.clone(),
        state_dir: config.state_dir.clone(),
        runs: Mutex::new(HashMap::new()),
    });
    let client = protocol::tls::client_config(config.ca_pin, Some(&identity))?;
    loop {
        match dial::dial(&config.controller, None, client.clone()).await {
            Ok(dialed) => {
                swarm.counters.connected.fetch_add(1, Ordering::Relaxed);
                let served = agent.session(dialed.conn.clone()).await;
                swarm.counters.connected.fetch_sub(1, Ordering::Relaxed);
                dialed.endpoint.close(0u32.into(), b"");
                match served {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    Err(e) => swarm.failed(format!("{}: session: {e:#}", config.instance)),
                }
            }
            Err(e) => swarm.failed(format!("{}: dial: {e:#}", config.instance)),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Where a simulated run's output stands.
#[derive(Debug, Clone, Copy)]
struct Progress {
    last_seq: u64,
    ended: Option<SimEnd>,
}

/// How a simulated run ended (a copyable `RunEnd`).
#[derive(Debug, Clone, Copy)]
enum SimEnd {
    Finished,
    Stopped,
}

/// A run whose events are made from their sequence numbers: 1 is `Started`, then one
/// `Output` line per number, and the last is `Ended`.
struct SimRun {
    id: RunId,
    state: watch::Sender<Progress>,
}

impl SimRun {
    fn lines_in(&self, state: Progress) -> u64 {
        let ended = u64::from(state.ended.is_some());
        state.last_seq.saturating_sub(1 + ended)
    }

    fn event(&self, seq: u64, state: Progress) -> RunEvent {
        let kind = if seq == 1 {
            EventKind::Started {
                pid: 4242,
                attempt: 1,
            }
        } else if seq == state.last_seq
            && let Some(end) = state.ended
        {
            EventKind::Ended(match end {
                SimEnd::Finished => RunEnd::Exited {
                    code: 0,
                    stop_requested: false,
                },
                SimEnd::Stopped => RunEnd::Signaled {
                    signal: 15,
                    stop_requested: true,
                },
            })
        } else {
            EventKind::Output {
                stream: Stream::Stdout,
                line: format!(
                    "step {:>8} loss {:.6} lr 3.0e-4 tokens/s 181234 run {} line {}",
                    seq - 1,
                    1.0 / seq as f64,
                    self.id,
                    seq - 1
                ),
            }
        };
        RunEvent {
            seq,
            at_ms: now_ms(),
            kind,
        }
    }

    fn stop(&self) {
        self.state.send_if_modified(|state| {
            if state.ended.is_some() {
                return false;
            }
            state.last_seq += 1;
            state.ended = Some(SimEnd::Stopped);
            true
        });
    }

    /// Adds the lines due at `rate` until `lines` have been written, then ends the run.
    async fn produce(self: Arc<Self>, lines: u64, rate: u64) {
        let started = Instant::now();
        let mut tick = tokio::time::interval(PRODUCE_EVERY);
        loop {
            tick.tick().await;
            let due = (started.elapsed().as_millis() as u64 * rate / 1000).min(lines);
            let mut done = false;
            self.state.send_if_modified(|state| {
                if state.ended.is_some() {
                    done = true;
                    return false;
                }
                let before = state.last_seq;
                state.last_seq = 1 + due;
                if due == lines {
                    state.last_seq += 1;
                    state.ended = Some(SimEnd::Finished);
                    done = true;
                }
                state.last_seq != before
            });
            if done {
                return;
            }
        }
    }
}

struct SimAgent {
    swarm: Arc<Swarm>,
    state_dir: PathBuf,
    runs: Mutex<HashMap<RunId, Arc<SimRun>>>,
}

enum Event {
    Inbound(Option<ControllerMsg>),
    Stream(Option<(quinn::SendStream, quinn::RecvStream)>),
    Outbound(AgentMsg),
    Stats,
    Heartbeat,
}

impl SimAgent {
    /// Serves one session; `Ok(true)` when the controller asked the agent to shut down.
    async fn session(self: &Arc<Self>, conn: quinn::Connection) -> anyhow::Result<bool> {
        let (mut send, mut recv) = conn.open_bi().await?;
        let ours = self.swarm.hello.clone();
        write_frame(&mut send, &AgentMsg::Hello(ours.clone())).await?;
        match read_frame::<_, ControllerMsg>(&mut recv).await? {
            Some(ControllerMsg::Hello(theirs)) => ours.check_peer(&theirs)?,
            Some(ControllerMsg::Error(e)) => bail!("refused: {}", e.message),
            other => bail!("the controller opened with {other:?}"),
        }
        let cursors = self
            .runs
            .lock()
            .expect("runs lock")
            .values()
            .map(|run| {
                let state = *run.state.borrow();
                RunCursor {
                    run: run.id.clone(),
                    last_seq: state.last_seq,
                    ended: state.ended.is_some(),
                }
            })
            .collect();
        write_frame(&mut send, &AgentMsg::Ready { runs: cursors }).await?;
        let (reader, mut inbound) = spawn_reader::<_, ControllerMsg>(recv);
        let (out_tx, mut out_rx) = mpsc::channel::<AgentMsg>(64);
        let mut pumps = tokio::task::JoinSet::new();
        let mut stats = tokio::time::interval(self.swarm.stats);
        let mut heartbeat = tokio::time::interval(Duration::from_secs(10));
        let result = loop {
            let event = tokio::select! {
                frame = inbound.recv() => Event::Inbound(frame.and_then(|f| f.ok().flatten())),
                stream = conn.accept_bi() => Event::Stream(stream.ok()),
                Some(msg) = out_rx.recv() => Event::Outbound(msg),
                _ = stats.tick() => Event::Stats,
                _ = heartbeat.tick() => Event::Heartbeat,
                Some(_) = pumps.join_next(), if !pumps.is_empty() => continue,
            };
            match event {
                Event::Inbound(None) | Event::Stream(None) => break Ok(false),
                Event::Inbound(Some(msg)) => match msg {
                    ControllerMsg::Replay { run, after_seq } => {
                        let found = self.runs.lock().expect("runs lock").get(&run).cloned();
                        match found {
                            Some(run) => {
                                let swarm = self.swarm.clone();
                                pumps.spawn(pump(swarm, run, after_seq, out_tx.clone()));
                            }
                            None => {
                                let e = WireError::new(ErrorKind::NotFound, "no such run");
                                write_frame(&mut send, &AgentMsg::Error(e)).await?;
                            }
                        }
                    }
                    ControllerMsg::StopRun { run, .. } => {
                        if let Some(run) = self.runs.lock().expect("runs lock").get(&run) {
                            run.stop();
                        }
                    }
                    ControllerMsg::Shutdown { .. } => {
                        eprintln!("{}: shut down by the controller", self.state_dir.display());
                        for run in self.runs.lock().expect("runs lock").values() {
                            run.stop();
                        }
                        // Let the pumps deliver every run's end, then close.
                        while let Some(msg) =
                            tokio::time::timeout(Duration::from_secs(2), out_rx.recv())
                                .await
                                .ok()
                                .flatten()
                        {
                            write_frame(&mut send, &msg).await?;
                        }
                        let _ = send.finish();
                        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                        break Ok(true);
                    }
                    _ => {}
                },
                Event::Stream(Some((send, recv))) => {
                    let agent = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = agent.bulk(send, recv).await {
                            agent.swarm.failed(format!("bulk stream: {e:#}"));
                        }
                    });
                }
                Event::Outbound(msg) => write_frame(&mut send, &msg).await?,
                Event::Stats => {
                    write_frame(&mut send, &AgentMsg::Stats(Box::new(self.sample()))).await?;
                    self.swarm
                        .counters
                        .stats_sent
                        .fetch_add(1, Ordering::Relaxed);
                }
                Event::Heartbeat => {
                    let active = self
                        .runs
                        .lock()
                        .expect("runs lock")
                        .values()
                        .filter(|run| run.state.borrow().ended.is_none())
                        .count() as u32;
                    write_frame(
                        &mut send,
                        &AgentMsg::Heartbeat {
                            active_runs: active,
                        },
                    )
                    .await?;
                }
            }
        };
        reader.abort();
        pumps.abort_all();
        result
    }

    /// A sample the size of a one-GPU host's with its runs.
    fn sample(&self) -> StatsSample {
        let runs = self
            .runs
            .lock()
            .expect("runs lock")
            .values()
            .filter(|run| run.state.borrow().ended.is_none())
            .map(|run| RunStats {
                run: run.id.clone(),
                processes: 3,
                threads: 40,
                cpu_percent: 97.0,
                rss_bytes: 6 << 30,
                gpu_mem_bytes: Some(60 << 30),
            })
            .collect();
        StatsSample {
            at_ms: now_ms(),
            host: HostStats {
                cpus: 26,
                cpu_percent: 12.5,
                mem_used_bytes: 40 << 30,
                mem_total_bytes: 220 << 30,
                disk_used_bytes: 300 << 30,
                disk_total_bytes: 1 << 40,
                net_rx_bytes_per_sec: 1 << 20,
                net_tx_bytes_per_sec: 1 << 18,
            },
            runs,
            gpus: vec![GpuStats {
                index: 0,
                name: "NVIDIA H100 80GB HBM3".into(),
                util_percent: Some(98.0),
                mem_used_bytes: Some(60 << 30),
                mem_total_bytes: Some(80 << 30),
                temp_c: Some(61.0),
                power_w: Some(640.0),
            }],
        }
    }

    /// A stream the controller opened: a sync (applied to a real tree) or a run start.
    async fn bulk(
        self: &Arc<Self>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> anyhow::Result<()> {
        let open: BulkOpen = read_frame(&mut recv)
            .await?
            .context("the stream ended before its header")?;
        match open {
            BulkOpen::Sync(open) | BulkOpen::SyncFrom { open, .. } => {
                self.sync(open, &mut send, recv).await?
            }
            BulkOpen::StartRun(spec) => self.start(spec.run, &mut send).await?,
            BulkOpen::StartRunWithSecrets { spec, .. } => self.start(spec.run, &mut send).await?,
            BulkOpen::StartRunWith(start) => self.start(start.spec.run, &mut send).await?,
            other => {
                let e = WireError::new(
                    ErrorKind::Unsupported,
                    format!("the swarm does not serve {other:?}"),
                );
                write_frame(&mut send, &AgentMsg::Error(e)).await?;
            }
        }
        send.finish()?;
        let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
        Ok(())
    }

    async fn start(&self, id: RunId, send: &mut quinn::SendStream) -> anyhow::Result<()> {
        let run = Arc::new(SimRun {
            id: id.clone(),
            state: watch::Sender::new(Progress {
                last_seq: 1,
                ended: None,
            }),
        });
        let result = {
            let mut runs = self.runs.lock().expect("runs lock");
            if runs.contains_key(&id) {
                Err(WireError::new(ErrorKind::BadRequest, "the run exists"))
            } else {
                runs.insert(id.clone(), run.clone());
                self.swarm
                    .runs
                    .lock()
                    .expect("runs lock")
                    .insert(id.clone(), run.clone());
                Ok(())
            }
        };
        if result.is_ok() {
            tokio::spawn(run.produce(self.swarm.lines, self.swarm.rate));
        }
        write_frame(send, &AgentMsg::RunStarted { run: id, result }).await?;
        Ok(())
    }

    /// The sync exchange of `BulkOpen::Sync`, applied by the agent's own tree code.
    async fn sync(
        &self,
        open: SyncOpen,
        send: &mut quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> anyhow::Result<()> {
        let run_dir = self.state_dir.join("runs").join(open.run.to_string());
        let create = open.create;
        let opened = tokio::task::spawn_blocking(move || {
            let mut tree = Tree::open(&run_dir, create)?;
            tree.refresh()?;
            Ok::<_, tree::SyncError>(tree)
        })
        .await?;
        let mut tree = match opened {
            Ok(tree) => tree,
            Err(e) => {
                let have = SyncHave {
                    root: Err(e.to_wire()),
                    manifest_bytes: 0,
                };
                write_frame(send, &have).await?;
                return Ok(());
            }
        };
        let root = tree.manifest().root();
        let manifest = if open.known_root == Some(root) {
            Vec::new()
        } else {
            zstd::bulk::compress(&protocol::codec::encode_blob(tree.manifest())?, 3)?
        };
        let have = SyncHave {
            root: Ok(root),
            manifest_bytes: manifest.len() as u64,
        };
        write_frame(send, &have).await?;
        send.write_all(&manifest).await?;
        let mut recv = recv;
        let Some(SyncGo::Apply { delta_bytes, .. }) = read_frame(&mut recv).await? else {
            return Ok(());
        };
        let rt = tokio::runtime::Handle::current();
        let applied = tokio::task::spawn_blocking(move || {
            let mut bridge = tokio_util::io::SyncIoBridge::new_with_handle(recv, rt);
            tree::apply_stream(
                &mut tree,
                std::io::BufReader::new(&mut bridge),
                delta_bytes,
                tree::DEFAULT_MAX_SYNC_BYTES,
                None,
                || (),
            )
            .map(|()| tree.manifest().root())
        })
        .await?;
        let done = SyncDone {
            result: applied
                .map(|root| SyncApplied {
                    root,
                    restarted_pid: None,
                })
                .map_err(|e| e.to_wire()),
        };
        write_frame(send, &done).await?;
        Ok(())
    }
}

/// Sends a run's events after `after_seq` as they are produced, until its end is sent.
async fn pump(swarm: Arc<Swarm>, run: Arc<SimRun>, after_seq: u64, out: mpsc::Sender<AgentMsg>) {
    let mut cursor = run.state.subscribe();
    let mut next = after_seq + 1;
    loop {
        let state = *cursor.borrow_and_update();
        if next <= state.last_seq {
            let last = state.last_seq.min(next + BATCH_EVENTS - 1);
            let events: Vec<RunEvent> = (next..=last).map(|seq| run.event(seq, state)).collect();
            let sent = events.len() as u64;
            let msg = AgentMsg::Events {
                run: run.id.clone(),
                events,
            };
            if out.send(msg).await.is_err() {
                return;
            }
            swarm
                .counters
                .events_sent
                .fetch_add(sent, Ordering::Relaxed);
            next = last + 1;
            continue;
        }
        if state.ended.is_some() || cursor.changed().await.is_err() {
            return;
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
