//! Rendering: every command's result goes through the `Printer`, as text for people or as
//! JSON for programs. Data goes to stdout; progress and human-readable errors to stderr.

use std::io::Write;

use protocol::{
    CheckpointEvent, CheckpointOutcome, EventKind, Notice, PullProgress, RunEnd, RunEvent, Stream,
};
use serde::Serialize;

use crate::db::{InstanceState, RunRow, RunState};
use crate::error::UserError;
use crate::ipc::{InstanceView, ListReport, StatusReport, SyncReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Text for people.
    Human,
    /// JSON: one object per result, one line per run event.
    Json,
}

#[derive(Debug, Clone, Copy)]
pub struct Printer {
    pub format: Format,
    /// Whether stderr is a terminal: progress updates then redraw one line in place.
    pub tty: bool,
    /// `--quiet`: runctl's own progress lines and bars are left out (errors, warnings,
    /// questions and the remote command's output are not).
    pub quiet: bool,
}

/// Whether log lines on stderr may be coloured: a terminal, and no `NO_COLOR` (no-color.org:
/// set and not empty).
pub fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Writes one JSON line; `false` once stdout's reader has gone away.
/// A gang's event in JSON: the event's fields and its node.
#[derive(Serialize)]
struct NodeEvent<'a> {
    node: u32,
    #[serde(flatten)]
    event: &'a RunEvent,
}

fn json_line(value: &impl Serialize) -> bool {
    let mut out = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut out, value)
        .map_err(std::io::Error::from)
        .and_then(|()| writeln!(out))
        .and_then(|()| out.flush());
    open(written)
}

/// Whether a write to stdout leaves it usable: only a reader that went away is final.
fn open(written: std::io::Result<()>) -> bool {
    !matches!(written, Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
}

impl Printer {
    /// Prints a result: `value` as JSON, or `human` as text.
    pub fn data(&self, value: &impl Serialize, human: impl FnOnce() -> String) {
        match self.format {
            Format::Json => {
                json_line(value);
            }
            Format::Human => {
                let text = human();
                let mut out = std::io::stdout().lock();
                let _ = write!(out, "{text}");
                if !text.ends_with('\n') {
                    let _ = writeln!(out);
                }
            }
        }
    }

    /// A step of progress, on stderr.
    pub fn progress(&self, message: &str) {
        if !self.quiet {
            eprintln!("runctl: {message}");
        }
    }

    /// A warning, on stderr, shown even with `--quiet`.
    pub fn warn(&self, message: &str) {
        eprintln!("runctl: {message}");
    }

    /// One run event (of `node`, for a run of several): output lines go to the matching
    /// local stream, a gang's prefixed `[node R]`; JSON prints the event (with its
    /// `node`). `false` once stdout's reader has gone away (`logs -f | head`): the caller
    /// stops.
    #[must_use]
    pub fn event(&self, event: &RunEvent, node: Option<u32>) -> bool {
        let tag = node.map(|n| format!("[node {n}] ")).unwrap_or_default();
        match self.format {
            Format::Json => {
                return match node {
                    Some(node) => json_line(&NodeEvent { node, event }),
                    None => json_line(event),
                };
            }
            Format::Human => match &event.kind {
                EventKind::Output {
                    stream: Stream::Stdout,
                    line,
                } => {
                    let mut out = std::io::stdout().lock();
                    return open(writeln!(out, "{tag}{line}").and_then(|()| out.flush()));
                }
                EventKind::Output {
                    stream: Stream::Stderr,
                    line,
                } => eprintln!("{tag}{line}"),
                EventKind::Progress { stream, line } => {
                    // A terminal redraws the line in place, as it would have locally.
                    let end = if self.tty { "\r" } else { "\n" };
                    match stream {
                        Stream::Stdout => {
                            let mut out = std::io::stdout().lock();
                            return open(
                                write!(out, "{tag}{line}{end}").and_then(|()| out.flush()),
                            );
                        }
                        Stream::Stderr => eprint!("{tag}{line}{end}"),
                    }
                }
                EventKind::Setup { command } => self.progress(&format!("{tag}setup: {command}")),
                EventKind::Restarted { previous } => {
                    eprintln!("runctl: restarting the command ({})", previous.describe())
                }
                EventKind::Retrying {
                    previous,
                    delay_ms,
                    resume_from,
                } => {
                    let resume = resume_from
                        .as_ref()
                        .map(|p| format!(", resuming from {p}"))
                        .unwrap_or_default();
                    eprintln!(
                        "runctl: {}; restarting in {}{resume}",
                        previous.describe(),
                        humantime::format_duration(std::time::Duration::from_millis(*delay_ms))
                    )
                }
                EventKind::Started { attempt, .. } if *attempt > 1 => {
                    eprintln!("runctl: attempt {attempt} started")
                }
                EventKind::Notice(notice) => eprintln!("runctl: {tag}{}", notice_text(notice)),
                EventKind::Pull(_) if self.quiet => {}
                EventKind::Pull(p) => {
                    // A terminal redraws the bar in place; elsewhere only the end is shown.
                    if self.tty && !p.done {
                        eprint!("{}\r", pull_text(p));
                    } else if p.done {
                        eprintln!("{}", pull_text(p));
                    }
                }
                EventKind::Checkpoint(c) => self.progress(&format!("{tag}{}", checkpoint_text(c))),
                // A gang's node ends before the run does: say how.
                EventKind::Ended(end) if node.is_some() => {
                    self.progress(&format!("{tag}ended: {}", end.describe()))
                }
                EventKind::Started { .. } | EventKind::Ended(_) => {}
            },
        }
        true
    }

    pub fn error(&self, error: &UserError) {
        match self.format {
            Format::Json => {
                json_line(&serde_json::json!({ "error": error }));
            }
            Format::Human => eprint!("{}", render_error(error)),
        }
    }
}

pub fn render_error(error: &UserError) -> String {
    let mut text = format!("error: {}\n", error.message);
    if !error.to_resolve.is_empty() {
        text.push_str("\nTo resolve:\n");
        for step in &error.to_resolve {
            text.push_str(&format!("  - {step}\n"));
        }
    }
    text
}

/// A data pull's progress as one line with a bar.
pub fn pull_text(p: &PullProgress) -> String {
    let fraction = if p.bytes_total == 0 {
        if p.done { 1.0 } else { 0.0 }
    } else {
        p.bytes_done as f64 / p.bytes_total as f64
    };
    let filled = (fraction * 24.0).round() as usize;
    let skipped = if p.skipped > 0 {
        format!(", {} already present", p.skipped)
    } else {
        String::new()
    };
    format!(
        "runctl: pulling data [{}{}] {:>3.0}% {} / {}, {}/{} files{skipped}",
        "#".repeat(filled.min(24)),
        "-".repeat(24 - filled.min(24)),
        fraction * 100.0,
        bytes_words(p.bytes_done),
        bytes_words(p.bytes_total),
        p.files_done,
        p.files_total,
    )
}

/// What happened to a checkpoint, in words.
pub fn checkpoint_text(c: &CheckpointEvent) -> String {
    match &c.outcome {
        CheckpointOutcome::Uploaded { ms } => format!(
            "checkpoint {} saved to {} ({}, {} file(s), {:.1} s after it was written)",
            c.name,
            c.url,
            bytes_words(c.bytes),
            c.files,
            *ms as f64 / 1000.0
        ),
        CheckpointOutcome::Failed { message } => {
            format!("checkpoint {} not uploaded: {message}", c.name)
        }
        CheckpointOutcome::Pruned => {
            format!("checkpoint {} deleted from {} (retention)", c.name, c.url)
        }
        CheckpointOutcome::Fetched { path } => format!(
            "resuming from checkpoint {} ({}, fetched to {path})",
            c.url,
            bytes_words(c.bytes)
        ),
    }
}

/// A notice, in words.
pub fn notice_text(notice: &Notice) -> String {
    match notice {
        Notice::SpotInterruption {
            action,
            time,
            signal,
        } => format!(
            "spot interruption notice: the instance will {action} at {time}; sent signal {signal} to the command"
        ),
        Notice::RebalanceRecommended { time } => {
            format!("EC2 recommends moving off this spot instance (notice at {time})")
        }
        Notice::LinesDropped { lines, reason } => {
            format!("{lines} lines of output were lost: {reason}")
        }
        Notice::LogTruncated { through_seq } => format!(
            "the agent's log reached its size cap; events through #{through_seq} were deleted there"
        ),
        Notice::BudgetExceeded { limit, spend } => format!(
            "budget reached: {}; stopping the run (its stop signal, the grace period, checkpoints pushed, then its end action)",
            limit.describe(spend)
        ),
        Notice::StartedAgain { attempt, cause } => {
            format!("started again (attempt {attempt}) after {cause}")
        }
        Notice::Compacted { lines, keep_days } => format!(
            "{lines} earlier lines of output were removed: an ended run keeps its whole output for {keep_days} days ([daemon] keep_logs_days), then its last {} lines and every other event",
            crate::retention::TAIL_LINES
        ),
    }
}

/// One screen of `top`: per instance, the host line, its runs, its GPUs.
pub fn top_text(shown: &[crate::ipc::InstanceStats]) -> String {
    let mut out = String::new();
    for s in shown {
        let h = &s.sample.host;
        out.push_str(&format!(
            "{}  cpu {:.0}% of {}  mem {} / {}  disk {} / {}  net rx {}/s tx {}/s\n",
            s.instance,
            h.cpu_percent,
            h.cpus,
            bytes_words(h.mem_used_bytes),
            bytes_words(h.mem_total_bytes),
            bytes_words(h.disk_used_bytes),
            bytes_words(h.disk_total_bytes),
            bytes_words(h.net_rx_bytes_per_sec),
            bytes_words(h.net_tx_bytes_per_sec),
        ));
        if let Some(d) = &s.disk {
            out.push_str(&format!(
                "runctl on disk {}: runs {} ({} ended), checkpoints {}, environments {}, store {}, data {}\n",
                disk_words(d),
                bytes_words(d.runs_bytes),
                d.ended_runs,
                bytes_words(d.checkpoints_bytes),
                bytes_words(d.envs_bytes),
                bytes_words(d.store_bytes),
                bytes_words(d.data_bytes),
            ));
        }
        if !s.sample.runs.is_empty() {
            let mut t = table(&["RUN", "PROCS", "THREADS", "CPU", "RSS", "GPU MEM"]);
            for r in &s.sample.runs {
                t.add_row([
                    r.run.to_string(),
                    r.processes.to_string(),
                    r.threads.to_string(),
                    format!("{:.0}%", r.cpu_percent),
                    bytes_words(r.rss_bytes),
                    r.gpu_mem_bytes
                        .map(bytes_words)
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
            out.push_str(&format!("{t}\n"));
        }
        if !s.sample.gpus.is_empty()
            && !s.sample.runs.is_empty()
            && s.sample.runs.iter().all(|r| r.gpu_mem_bytes.is_none())
        {
            out.push_str("per-run GPU memory: unavailable here (in a container nvidia-smi reports the host's process ids); per-GPU figures below\n");
        }
        if s.sample.gpus.is_empty() {
            out.push_str("no GPU figures (no NVIDIA driver on this instance)\n");
        } else {
            let mut t = table(&["GPU", "NAME", "UTIL", "MEM", "TEMP", "POWER"]);
            let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            for g in &s.sample.gpus {
                t.add_row([
                    g.index.to_string(),
                    g.name.clone(),
                    or_dash(g.util_percent.map(|u| format!("{u:.0}%"))),
                    format!(
                        "{} / {}",
                        or_dash(g.mem_used_bytes.map(bytes_words)),
                        or_dash(g.mem_total_bytes.map(bytes_words))
                    ),
                    or_dash(g.temp_c.map(|t| format!("{t:.0} C"))),
                    or_dash(g.power_w.map(|p| format!("{p:.0} W"))),
                ]);
            }
            out.push_str(&format!("{t}\n"));
        }
    }
    out
}

/// Bytes for people: 1.2 MB, 512 B.
pub fn bytes_words(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// What a new run's first sync sent, for `run`: e.g. `synced 4769 files: 3 sent (12.0 KB
/// on the wire), 4766 already on the instance (from run-...)`.
pub fn first_sync_line(r: &SyncReport) -> String {
    let s = &r.summary;
    let mut line = format!(
        "synced {} files: {} sent ({} on the wire, {} ms)",
        r.files,
        s.stream_files,
        bytes_words(r.wire_bytes),
        r.elapsed_ms
    );
    if let Some(from) = &r.seeded_from {
        line.push_str(&format!(
            ", {} already on the instance (from {from})",
            r.files.saturating_sub(s.written)
        ));
    }
    line
}

/// runctl's files on an instance, for `list` and `top`: `1.2 GB (8.0 GB free)`.
pub fn disk_words(d: &protocol::DiskUse) -> String {
    format!(
        "{} ({} free)",
        bytes_words(d.runctl_bytes()),
        bytes_words(d.free_bytes)
    )
}

/// A sync's result: the change list for a dry run, else one summary line.
pub fn sync_text(r: &SyncReport) -> String {
    let s = &r.summary;
    let mut out = String::new();
    if r.dry_run && !r.changes.is_empty() {
        let mut t = table(&["CHANGE", "PATH"]);
        for c in &r.changes {
            t.add_row([c.op.as_str(), c.path.as_str()]);
        }
        out.push_str(&format!("{t}\n"));
        if r.unlisted > 0 {
            out.push_str(&format!("... and {} more changes\n", r.unlisted));
        }
    }
    for skipped in &r.skipped {
        out.push_str(&format!("skipped {skipped}\n"));
    }
    if r.unlisted_skipped > 0 {
        out.push_str(&format!("... and {} more skipped\n", r.unlisted_skipped));
    }
    let total = s.written + s.copied + s.deleted + s.dirs + s.symlinks + s.chmods;
    if total == 0 {
        out.push_str(&format!(
            "{} is up to date ({} files checked in {} ms)",
            r.run, r.files, r.elapsed_ms
        ));
    } else {
        let mut parts = vec![format!(
            "{} written ({})",
            s.written,
            bytes_words(s.stream_bytes)
        )];
        for (n, what) in [
            (s.copied, "copied from the instance's own files"),
            (s.deleted, "deleted"),
            (s.dirs, "directories made"),
            (s.symlinks, "links"),
            (s.chmods, "modes changed"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        let verb = if r.dry_run { "would sync" } else { "synced" };
        out.push_str(&format!("{verb} {}: {}", r.run, parts.join(", ")));
        if !r.dry_run {
            out.push_str(&format!(
                " ({} ms, {} on the wire)",
                r.elapsed_ms,
                bytes_words(r.wire_bytes)
            ));
        }
    }
    if let Some(pid) = r.restarted_pid {
        out.push_str(&format!("; restarted (pid {pid})"));
    }
    out.push('\n');
    out
}

pub fn state_word(state: RunState) -> &'static str {
    match state {
        RunState::Pending => "pending",
        RunState::Syncing => "syncing",
        RunState::SettingUp => "setting up",
        RunState::PullingData => "pulling data",
        RunState::Running => "running",
        RunState::Succeeded => "succeeded",
        RunState::Failed => "failed",
        RunState::Stopped => "stopped",
        RunState::Interrupted => "interrupted",
        RunState::BudgetExceeded => "budget exceeded",
    }
}

pub fn instance_word(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Launching => "launching",
        InstanceState::Running => "running",
        InstanceState::Stopped => "stopped",
        InstanceState::Terminated => "terminated",
    }
}

/// How a run ended, in a few words: `exit 0`, `signal 15`, or the failure.
pub fn end_words(row: &RunRow) -> String {
    match (&row.exit, &row.error) {
        (Some(RunEnd::Exited { code, .. }), _) => format!("exit {code}"),
        (Some(RunEnd::Signaled { signal, .. }), _) => format!("signal {signal}"),
        (
            Some(
                end @ (RunEnd::SpawnFailed { .. }
                | RunEnd::SetupFailed { .. }
                | RunEnd::DataFailed { .. }
                | RunEnd::Lost { .. }),
            ),
            _,
        ) => end.describe(),
        (None, Some(error)) => error.clone(),
        (None, None) => String::new(),
    }
}

/// The exit status `run` and `logs -f` report for a finished run: the remote exit code,
/// 128 + N for signal N (as shells do), 127 when the command could not start; a run
/// its budget stopped never reports success, whatever its command returned.
pub fn exit_status(row: &RunRow) -> u8 {
    let status = match &row.exit {
        Some(RunEnd::Exited { code, .. }) => (*code & 0xff) as u8,
        Some(RunEnd::Signaled { signal, .. }) => 128u8.saturating_add(*signal as u8),
        Some(RunEnd::SpawnFailed { .. }) => 127,
        Some(RunEnd::SetupFailed { .. } | RunEnd::DataFailed { .. } | RunEnd::Lost { .. }) => 1,
        None if row.state == RunState::Succeeded => 0,
        None => 1,
    };
    if status == 0 && row.state == RunState::BudgetExceeded {
        1
    } else {
        status
    }
}

fn age(now_ms: u64, then_ms: u64) -> String {
    let secs = now_ms.saturating_sub(then_ms) / 1000;
    let rounded = if secs >= 3600 { secs - secs % 60 } else { secs };
    format!(
        "{} ago",
        humantime::format_duration(std::time::Duration::from_secs(rounded))
    )
}

fn duration_words(row: &RunRow) -> String {
    match (row.started_ms, row.ended_ms) {
        (Some(start), Some(end)) => {
            let ms = end.saturating_sub(start);
            format!("{:.1}s", ms as f64 / 1000.0)
        }
        _ => String::new(),
    }
}

pub(crate) fn table(header: &[&str]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(header.to_vec());
    table
}

fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max_chars - 1).collect();
    out.push('…');
    out
}

/// How long a terminated instance stays in `list` without `--all`.
pub const LISTED_AFTER_TERMINATION_MS: u64 = 24 * 3600 * 1000;

/// Whether `list` shows this instance without `--all`: all but those terminated more
/// than a day ago.
pub fn listed(row: &crate::db::InstanceRow, now_ms: u64) -> bool {
    match (row.state, row.terminated_ms) {
        (InstanceState::Terminated, Some(at)) => {
            now_ms.saturating_sub(at) <= LISTED_AFTER_TERMINATION_MS
        }
        _ => true,
    }
}

/// A run's command for a table cell: one line (newlines, tabs and other control
/// characters escaped as Rust writes them), at most 60 characters.
pub fn command_line(argv: &[String]) -> String {
    let joined = argv.join(" ");
    let escaped: String = joined
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    truncate(&escaped, 60)
}

pub fn status_text(s: &StatusReport) -> String {
    let plural = |n: u32, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    let mut text = format!(
        "{} running ({}/h), {} active, {} connected (daemon pid {}, v{}, QUIC {}, UDP and TCP)",
        plural(s.instances_running, "instance"),
        crate::provider::ec2::prices::dollars(s.dollars_per_hour),
        plural(s.runs_active, "run"),
        plural(s.agents_connected, "agent"),
        s.pid,
        s.version,
        s.quic_addr
    );
    if let Some(relay) = &s.relay {
        text.push_str(&match (relay.registered, &relay.last_error) {
            (true, _) => format!("\nrelay {}: registered", relay.relay),
            (false, Some(e)) => format!("\nrelay {}: not registered: {e}", relay.relay),
            (false, None) => format!("\nrelay {}: registering", relay.relay),
        });
    }
    for a in &s.agents {
        text.push_str(&format!("\n{}: {}", a.instance, path_words(&a.path)));
    }
    for b in &s.budgets {
        text.push_str(&format!(
            "\n{} on {}: {}",
            b.run,
            b.instance,
            budget_words(&b.budget)
        ));
    }
    text
}

/// A budget's spend against its caps: `$1.20 of $8.00 (15%), 20m of 2h (16%)`.
pub fn budget_words(b: &protocol::budget::Budget) -> String {
    use protocol::budget::{dollars, duration};
    let share = |part: u64, whole: u64| match whole {
        0 => 100,
        whole => u128::from(part) * 100 / u128::from(whole),
    };
    let mut parts = Vec::new();
    if let Some(max) = b.max_cost_micros {
        parts.push(match b.price_micros_per_hour {
            Some(_) => format!(
                "{} of {} ({}%)",
                dollars(b.spent_micros),
                dollars(max),
                share(b.spent_micros, max)
            ),
            None => format!("cost unknown of {}", dollars(max)),
        });
    }
    if let Some(max) = b.max_ms {
        parts.push(format!(
            "{} of {} ({}%)",
            duration(b.elapsed_ms),
            duration(max),
            share(b.elapsed_ms, max)
        ));
    }
    parts.join(", ")
}

fn path_words(p: &crate::ipc::AgentPath) -> String {
    format!("{}, rtt {:.1} ms", p.path, p.rtt_ms)
}

pub fn list_text(report: &ListReport, now_ms: u64) -> String {
    let mut instances = table(&[
        "INSTANCE",
        "PROVIDER",
        "TYPE",
        "STATE",
        "AGENT",
        "CREATED",
        "$/HR",
        "COST",
        "RUNCTL DISK",
    ]);
    let dollars = crate::provider::ec2::prices::dollars;
    for InstanceView {
        row,
        connected,
        path,
        cloud,
        cost,
        disk,
        agent: _,
    } in &report.instances
    {
        instances.add_row(vec![
            row.name.to_string(),
            match cloud {
                Some(c) => format!("{} {}", row.provider, c.cloud_id),
                None => row.provider.to_string(),
            },
            cloud
                .as_ref()
                .map(|c| format!("{}{}", c.instance_type, if c.spot { " spot" } else { "" }))
                .unwrap_or_else(|| "-".into()),
            instance_word(row.state).to_owned(),
            match (connected, path) {
                (true, Some(p)) => path_words(p),
                (true, None) => "connected".to_owned(),
                (false, _) => "-".to_owned(),
            },
            age(now_ms, row.created_ms),
            cloud
                .as_ref()
                .and_then(|c| c.price_per_hour)
                .map(dollars)
                .unwrap_or_else(|| "-".into()),
            cost.map(dollars).unwrap_or_else(|| "-".into()),
            disk.as_ref().map(disk_words).unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut runs = table(&[
        "RUN", "INSTANCE", "STATE", "RESULT", "TOOK", "CREATED", "COMMAND",
    ]);
    for row in &report.runs {
        let instance = match report.nodes.iter().find(|(run, _)| run == &row.id) {
            Some((_, nodes)) => nodes
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(","),
            None => row.instance.to_string(),
        };
        runs.add_row(vec![
            row.id.to_string(),
            instance,
            state_word(row.state).to_owned(),
            truncate(&end_words(row), 48),
            duration_words(row),
            age(now_ms, row.created_ms),
            command_line(&row.argv),
        ]);
    }
    let mut text = String::new();
    if report.instances.is_empty() {
        text.push_str("no instances\n");
    } else {
        text.push_str(&format!("{}\n", instances.trim_fmt()));
    }
    for view in &report.instances {
        if let Some(upgrade) = view.agent.as_ref().and_then(|a| a.upgrade.as_ref()) {
            text.push_str(&format!("({}: {upgrade})\n", view.row.name));
        }
    }
    if let Some(warning) = &report.cloud_warning {
        text.push_str(&format!(
            "(EC2 could not be asked, states may be stale: {warning})\n"
        ));
    }
    for f in &report.foreign {
        text.push_str(&format!(
            "(also runctl-tagged in EC2, not launched from here: {} {} {} {})\n",
            f.cloud_id,
            f.name.as_deref().unwrap_or("-"),
            f.instance_type,
            f.state
        ));
    }
    text.push('\n');
    if report.runs.is_empty() {
        text.push_str("no runs\n");
    } else {
        text.push_str(&format!("{}\n", runs.trim_fmt()));
    }
    text
}

/// `run --dry-run`: the run as the run file and the flags resolve it.
#[derive(Debug, Serialize)]
pub struct DryRun<'a> {
    /// The run file read, if there was one.
    pub run_file: Option<std::path::PathBuf>,
    pub profile: Option<String>,
    /// Where each secret is read (the values are not shown).
    pub secrets: Vec<crate::cli::SecretSpec>,
    /// The request `run` would send, without the secrets' values.
    #[serde(serialize_with = "without_secrets")]
    pub request: &'a crate::ipc::RunRequest,
    /// What the first sync would send at most.
    pub tree: crate::sync::scan::TreeSize,
}

fn without_secrets<S: serde::Serializer>(
    request: &&crate::ipc::RunRequest,
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut shown = (*request).clone();
    shown.secrets.clear();
    shown.serialize(s)
}

pub fn dry_run_text(dry: &DryRun) -> String {
    use crate::provider::LaunchOptions;
    let r = dry.request;
    let mut rows: Vec<(&str, String)> = Vec::new();
    let command = shlex::try_join(r.argv.iter().map(String::as_str))
        .unwrap_or_else(|_| format!("{:?}", r.argv));
    rows.push(("command", command));
    let start = if r.cwd.is_empty() {
        r.root.display().to_string()
    } else {
        format!("{} (in {})", r.root.display(), r.cwd)
    };
    rows.push(("project", start));
    rows.push((
        "sync",
        format!(
            "{} files, {} (less what the instance already has)",
            dry.tree.files,
            bytes_words(dry.tree.bytes)
        ),
    ));
    let on = match (&r.on, &r.launch) {
        (Some(name), _) => format!("the existing instance {name}"),
        (None, LaunchOptions::Local) => "a new local instance (an agent on this machine)".into(),
        (None, LaunchOptions::Ec2(o)) => {
            let mut text = format!("a new EC2 {} instance", o.instance_type);
            if o.spot {
                text.push_str(", spot");
                match o.max_price {
                    Some(p) => text.push_str(&format!(" at most ${p}/h")),
                    None => text.push_str(" at most the on-demand price"),
                }
                if o.spot_fallback {
                    text.push_str(", else on-demand");
                }
            }
            if let Some(ami) = &o.ami {
                text.push_str(&format!(", {ami}"));
            }
            if let Some(gb) = o.volume_gb {
                text.push_str(&format!(", a {gb} GiB data volume"));
            }
            if let Some(snap) = &o.volume_snapshot {
                text.push_str(&format!(", a volume from {snap}"));
            }
            text
        }
        (None, LaunchOptions::Runpod(o)) => {
            let mut text = format!("a new RunPod pod with {} x {}", o.gpus, o.gpu);
            if o.spot {
                text.push_str(", interruptible");
            }
            if let Some(dc) = &o.datacenter {
                text.push_str(&format!(", in {dc}"));
            }
            text
        }
    };
    rows.push(("on", on));
    let end = match (r.end, r.keep, &r.on) {
        (Some(end), _, _) => format!("{end:?}").to_lowercase(),
        (None, true, _) | (None, _, Some(_)) => "keep the instance".into(),
        (None, false, None) => "terminate the instance".into(),
    };
    rows.push(("at the end", end));
    if !r.env.is_empty() {
        let env: Vec<String> = r.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        rows.push(("env", env.join(" ")));
    }
    if !dry.secrets.is_empty() {
        let secrets: Vec<String> = dry
            .secrets
            .iter()
            .map(|s| match &s.file {
                Some(file) => format!("{} (from {})", s.name, file.display()),
                None => format!("{} (from this environment)", s.name),
            })
            .collect();
        rows.push(("secrets", secrets.join(", ")));
    }
    let setup = match &r.setup {
        protocol::Setup::Auto => "auto".to_owned(),
        protocol::Setup::Skip => "none".to_owned(),
        protocol::Setup::Commands(commands) => commands.join("; "),
    };
    rows.push(("setup", setup));
    let restart = match r.restart {
        protocol::RestartPolicy::Never => "never".to_owned(),
        protocol::RestartPolicy::Always => "always".to_owned(),
        protocol::RestartPolicy::OnFailure { max_restarts } => format!("on-failure:{max_restarts}"),
    };
    rows.push(("restart", restart));
    if let Some(launch) = &r.launcher {
        rows.push(("launcher", launch.words()));
    }
    let mut caps = Vec::new();
    if let Some(max) = r.max_cost {
        caps.push(format!(
            "{} (the instance's time, from its launch)",
            protocol::budget::dollars(protocol::budget::micros(max))
        ));
    }
    if let Some(hours) = r.max_hours {
        caps.push(protocol::budget::duration(protocol::budget::hours_ms(
            hours,
        )));
    }
    if !caps.is_empty() {
        rows.push(("budget", format!("stop at {}", caps.join(" or "))));
    }
    for data in &r.data {
        rows.push(("data", format!("{} -> {}", data.source, data.dest)));
    }
    let checkpoints = match r.checkpoints.as_deref() {
        Some("") => "not pushed".to_owned(),
        Some(dest) => dest.to_owned(),
        None => "[storage] checkpoints".to_owned(),
    };
    rows.push(("checkpoints", checkpoints));
    if let Some(from) = &r.resume_from {
        rows.push(("resume from", from.clone()));
    }
    match (&dry.run_file, &dry.profile) {
        (Some(file), Some(profile)) => rows.push((
            "run file",
            format!("{} [profile.{profile}]", file.display()),
        )),
        (Some(file), None) => rows.push(("run file", file.display().to_string())),
        _ => rows.push(("run file", "none (flags only)".into())),
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut text = String::from("would run (nothing launched, nothing sent):\n");
    for (key, value) in rows {
        text.push_str(&format!("  {key:width$}  {value}\n"));
    }
    text
}

pub fn run_summary(row: &RunRow) -> String {
    let took = duration_words(row);
    let end = end_words(row);
    let mut text = format!("run {} {}", row.id, state_word(row.state));
    if !end.is_empty() {
        text.push_str(&format!(" ({end})"));
    }
    if !took.is_empty() {
        text.push_str(&format!(" after {took}"));
    }
    text
}

#[cfg(test)]
mod tests {

    #[test]
    fn list_leaves_out_instances_terminated_a_day_ago() {
        let now = 10 * LISTED_AFTER_TERMINATION_MS;
        let row = |state: InstanceState, terminated_ms: Option<u64>| crate::db::InstanceRow {
            name: "gpu-1".parse().expect("name"),
            provider: crate::provider::ProviderKind::Local,
            state,
            created_ms: 0,
            terminated_ms,
            pid: None,
            for_run: None,
        };
        let check = |state, terminated: Option<u64>, shown: bool| {
            assert_eq!(
                listed(&row(state, terminated), now),
                shown,
                "{state:?} {terminated:?}"
            );
        };
        check(InstanceState::Running, None, true);
        check(InstanceState::Stopped, None, true);
        check(InstanceState::Launching, None, true);
        check(InstanceState::Terminated, Some(now - 1000), true);
        check(
            InstanceState::Terminated,
            Some(now - LISTED_AFTER_TERMINATION_MS),
            true,
        );
        check(
            InstanceState::Terminated,
            Some(now - LISTED_AFTER_TERMINATION_MS - 1),
            false,
        );
        check(InstanceState::Terminated, None, true);
    }

    #[test]
    fn commands_fit_one_table_line() {
        let check = |argv: &[&str], expected: &str| {
            let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
            assert_eq!(command_line(&argv), expected, "{argv:?}");
        };
        check(&["python3", "train.py"], "python3 train.py");
        check(&["sh", "-c", "echo a\necho b"], "sh -c echo a\\necho b");
        check(&["printf", "a\tb\r"], "printf a\\tb\\r");
        check(
            &["x"; 40],
            &format!(
                "{}…",
                "x ".repeat(30)
                    .trim_end()
                    .chars()
                    .take(59)
                    .collect::<String>()
            ),
        );
        check(&["日本語"], "日本語");
    }

    use super::*;
    use crate::db::InstanceRow;
    use protocol::RunId;

    fn run_row(state: RunState, exit: Option<RunEnd>) -> RunRow {
        RunRow {
            id: protocol::RunId::from_random([0xab; 6]),
            instance: "local-1".parse().expect("valid"),
            argv: vec!["python3".into(), "train.py".into()],
            root: "/src".into(),
            state,
            created_ms: 1_000,
            started_ms: Some(2_000),
            ended_ms: Some(5_500),
            exit,
            error: None,
        }
    }

    #[test]
    fn exit_statuses() {
        let check = |exit: Option<RunEnd>, state: RunState, code: u8| {
            assert_eq!(exit_status(&run_row(state, exit.clone())), code, "{exit:?}")
        };
        check(
            Some(RunEnd::Exited {
                code: 0,
                stop_requested: false,
            }),
            RunState::Succeeded,
            0,
        );
        check(
            Some(RunEnd::Exited {
                code: 7,
                stop_requested: false,
            }),
            RunState::Failed,
            7,
        );
        check(
            Some(RunEnd::Signaled {
                signal: 15,
                stop_requested: true,
            }),
            RunState::Stopped,
            143,
        );
        check(
            Some(RunEnd::SpawnFailed {
                message: "x".into(),
            }),
            RunState::Failed,
            127,
        );
        check(None, RunState::Failed, 1);
        check(
            Some(RunEnd::Exited {
                code: 0,
                stop_requested: true,
            }),
            RunState::BudgetExceeded,
            1,
        );
        check(
            Some(RunEnd::Signaled {
                signal: 15,
                stop_requested: true,
            }),
            RunState::BudgetExceeded,
            143,
        );
    }

    #[test]
    fn sync_report_snapshots() {
        let mut report = SyncReport {
            run: RunId::from_random([0xab; 6]),
            root: "/src/project".into(),
            dry_run: false,
            summary: protocol::delta::Summary::default(),
            changes: Vec::new(),
            unlisted: 0,
            files: 10_000,
            hashed_files: 0,
            skipped: Vec::new(),
            unlisted_skipped: 0,
            wire_bytes: 206,
            agent_manifest_bytes: 0,
            seeded_from: None,
            elapsed_ms: 48,
            restarted_pid: None,
        };
        let mut rendered = sync_text(&report);
        report.summary.written = 20;
        report.summary.stream_bytes = 123_456;
        report.summary.deleted = 2;
        report.summary.copied = 1;
        report.wire_bytes = 29_000;
        report.restarted_pid = Some(4242);
        rendered.push_str(&sync_text(&report));
        report.dry_run = true;
        report.restarted_pid = None;
        report.changes = vec![
            crate::daemon::sync::Change {
                op: "write".into(),
                path: "train.py".into(),
            },
            crate::daemon::sync::Change {
                op: "copy".into(),
                path: "a.bin -> b.bin".into(),
            },
        ];
        report.unlisted = 21;
        report.skipped =
            vec!["data -> /mnt/data: a link that leaves the project is not synced".into()];
        rendered.push_str(&sync_text(&report));
        report.dry_run = false;
        report.summary = protocol::delta::Summary {
            written: 3,
            stream_files: 3,
            stream_bytes: 9_000,
            ..Default::default()
        };
        report.wire_bytes = 7_400;
        report.seeded_from = Some(RunId::from_random([0xcd; 6]));
        rendered.push_str(&first_sync_line(&report));
        rendered.push('\n');
        insta::assert_snapshot!(rendered);
    }

    #[test]
    fn list_and_status_snapshots() {
        let report = ListReport {
            instances: vec![
                InstanceView {
                    row: InstanceRow {
                        name: "local-1".parse().expect("valid"),
                        provider: crate::provider::ProviderKind::Local,
                        state: InstanceState::Running,
                        created_ms: 1_000,
                        terminated_ms: None,
                        pid: Some(42),
                        for_run: None,
                    },
                    connected: true,
                    path: Some(crate::ipc::AgentPath {
                        path: "tcp via relay".into(),
                        rtt_ms: 12.34,
                    }),
                    cloud: None,
                    cost: None,
                    disk: Some(protocol::DiskUse {
                        runs_bytes: 84_000_000,
                        checkpoints_bytes: 1_200_000_000,
                        envs_bytes: 300_000_000,
                        store_bytes: 84_000_000,
                        data_bytes: 0,
                        runs: 6,
                        ended_runs: 5,
                        free_bytes: 40_000_000_000,
                        total_bytes: 100_000_000_000,
                    }),
                    agent: Some(crate::ipc::AgentVersion {
                        software: "runctl-agent 0.1.0".into(),
                        protocol: 11,
                        upgrade: crate::plan::agent_upgrade(11, 12, "runctl-agent 0.1.0"),
                    }),
                },
                InstanceView {
                    row: InstanceRow {
                        name: "ec2-3fa9c1".parse().expect("valid"),
                        provider: crate::provider::ProviderKind::Ec2,
                        state: InstanceState::Running,
                        created_ms: 1_000,
                        terminated_ms: None,
                        pid: None,
                        for_run: None,
                    },
                    connected: false,
                    path: None,
                    cloud: Some(crate::db::CloudRow {
                        name: "ec2-3fa9c1".parse().expect("valid"),
                        cloud_id: "i-0123456789abcdef0".into(),
                        region: "us-east-1".into(),
                        instance_type: "g5.xlarge".into(),
                        spot: true,
                        price_per_hour: Some(0.45),
                        accrued_ms: 0,
                        running_since_ms: Some(1_000),
                        cluster: None,
                    }),
                    cost: Some(0.0075),
                    disk: None,
                    agent: None,
                },
            ],
            runs: vec![run_row(
                RunState::Failed,
                Some(RunEnd::Exited {
                    code: 3,
                    stop_requested: false,
                }),
            )],
            nodes: vec![],
            foreign: vec![],
            cloud_warning: None,
        };
        insta::assert_snapshot!(list_text(&report, 61_000));
        insta::assert_snapshot!(list_text(
            &ListReport {
                instances: vec![],
                runs: vec![],
                nodes: vec![],
                foreign: vec![],
                cloud_warning: None,
            },
            0
        ));
        let status = StatusReport {
            pid: 7,
            version: "0.1.0".into(),
            quic_addr: "127.0.0.1:4433".into(),
            ca_sha256: "00".into(),
            agents_connected: 1,
            runs_active: 2,
            instances_running: 2,
            dollars_per_hour: 1.456,
            agents: vec![crate::ipc::AgentPathView {
                instance: "local-1".parse().expect("valid"),
                path: crate::ipc::AgentPath {
                    path: "udp direct".into(),
                    rtt_ms: 0.5,
                },
            }],
            relay: Some(crate::ipc::RelayView {
                relay: "relay.example.com:443".into(),
                registered: false,
                last_error: Some("connecting to 192.0.2.1:443 timed out".into()),
            }),
            budgets: vec![
                crate::ipc::BudgetView {
                    run: RunId::from_random([0xcd; 6]),
                    instance: "i-gpu".parse().expect("valid"),
                    budget: protocol::budget::Budget::new(Some(8.0), Some(7_200_000), Some(3.6))
                        .later(1_200_000),
                },
                crate::ipc::BudgetView {
                    run: RunId::from_random([0xef; 6]),
                    instance: "local-1".parse().expect("valid"),
                    budget: protocol::budget::Budget::new(None, Some(60_000), None).later(90_000),
                },
            ],
        };
        insta::assert_snapshot!(status_text(&status), @r"
        2 instances running ($1.46/h), 2 runs active, 1 agent connected (daemon pid 7, v0.1.0, QUIC 127.0.0.1:4433, UDP and TCP)
        relay relay.example.com:443: not registered: connecting to 192.0.2.1:443 timed out
        local-1: udp direct, rtt 0.5 ms
        run-cdcdcdcdcdcd on i-gpu: $1.20 of $8.00 (15%), 20m of 2h (16%)
        run-efefefefefef on local-1: 1m 30s of 1m (150%)
        ");
        insta::assert_snapshot!(run_summary(&report.runs[0]), @"run run-abababababab failed (exit 3) after 3.5s");
    }

    #[test]
    fn errors_list_their_fixes() {
        let e = UserError::new(crate::error::ErrorCode::NotFound, "no run run-000000000000")
            .resolve("list runs: runctl-controller list");
        insta::assert_snapshot!(render_error(&e), @r"
        error: no run run-000000000000

        To resolve:
          - list runs: runctl-controller list
        ");
    }
}
