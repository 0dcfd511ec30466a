//! `runctl-agent --supervise`: the agent as its own keeper, for a container's PID 1 (a
//! RunPod pod's start command), where no systemd restarts a crashed agent and the
//! container dies with its first process. The supervisor runs the agent as a child,
//! starts it again when it crashes (with backoff), forwards SIGTERM, SIGINT and SIGHUP to
//! it, and reaps orphaned processes (as PID 1, or as a child subreaper otherwise). It
//! exits when the agent exits by choice (shut down, powered off, interrupted) or with an
//! error that a restart cannot help (its config, a refused enrollment).

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

/// Exit statuses of `runctl-agent` after which a restart cannot help: an invalid config
/// (2), and a fatal error such as a refused enrollment or a revoked certificate (3).
const FINAL_CODES: [i32; 2] = [2, 3];

/// The first restart waits this long; each crash soon after a start doubles it.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An agent that ran this long before crashing restarts after the first backoff again.
const HEALTHY: Duration = Duration::from_secs(60);

/// How the agent process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Code(i32),
    Signal(i32),
}

/// What the supervisor does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Exit with this status.
    Exit(i32),
    /// Start the agent again after this long.
    Restart(Duration),
}

/// After the agent `ended` having run for `ran`: exit when it ended by choice (status 0),
/// with a final error, or while the supervisor is `stopping` (it forwarded a stop);
/// otherwise restart, backing off from `backoff` (the last wait) while it keeps crashing.
pub fn decide(ended: Ended, stopping: bool, ran: Duration, backoff: Duration) -> Next {
    let status = match ended {
        Ended::Code(code) => code,
        Ended::Signal(signal) => 128 + signal,
    };
    if stopping || status == 0 || FINAL_CODES.contains(&status) {
        return Next::Exit(status);
    }
    if ran >= HEALTHY || backoff.is_zero() {
        return Next::Restart(FIRST_BACKOFF);
    }
    Next::Restart((backoff * 2).min(MAX_BACKOFF))
}

/// Runs `exe --config CONFIG` under supervision until `decide` says exit; returns the
/// status to exit with.
pub async fn run(exe: &Path, config: &Path) -> anyhow::Result<i32> {
    if std::process::id() != 1 {
        // Orphans of the training processes come here rather than to the host's init.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!("cannot become a child subreaper: {e}");
        }
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut reap = tokio::time::interval(Duration::from_secs(1));
    let mut backoff = Duration::ZERO;
    loop {
        let started = Instant::now();
        let mut command = tokio::process::Command::new(exe);
        command.arg("--config").arg(config);
        let mut child = crate::reaper::spawn(&mut command)?;
        let pid = child.id().unwrap_or(0);
        tracing::info!("supervisor: agent started (pid {pid})");
        let forward = |sig: Signal| {
            if pid != 0
                && let Err(e) = kill(Pid::from_raw(pid as i32), sig)
            {
                tracing::warn!("supervisor: forwarding {sig} to the agent failed: {e}");
            }
        };
        let mut stopping = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status?,
                _ = term.recv() => { forward(Signal::SIGTERM); stopping = true; }
                _ = int.recv() => { forward(Signal::SIGINT); stopping = true; }
                _ = hup.recv() => forward(Signal::SIGHUP),
                _ = reap.tick() => { crate::reaper::reap_orphans(); }
            }
        };
        crate::reaper::forget(pid);
        let ended = {
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(code), _) => Ended::Code(code),
                (None, Some(signal)) => Ended::Signal(signal),
                (None, None) => Ended::Code(1),
            }
        };
        match decide(ended, stopping, started.elapsed(), backoff) {
            Next::Exit(status) => {
                tracing::info!("supervisor: agent ended ({ended:?}); exiting with {status}");
                return Ok(status);
            }
            Next::Restart(after) => {
                tracing::warn!(
                    "supervisor: agent ended ({ended:?}) after {:.0?}; starting it again in {after:?}",
                    started.elapsed()
                );
                backoff = after;
                let wait = tokio::time::sleep(after);
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        () = &mut wait => break,
                        // Asked to stop while no agent runs: nothing to forward it to.
                        _ = term.recv() => return Ok(128 + Signal::SIGTERM as i32),
                        _ = int.recv() => return Ok(128 + Signal::SIGINT as i32),
                        _ = hup.recv() => {}
                        _ = reap.tick() => { crate::reaper::reap_orphans(); }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// (how it ended, stopping, how long it ran, the last backoff) -> what comes next.
    fn check(ended: Ended, stopping: bool, ran: Duration, backoff: Duration, next: Next) {
        assert_eq!(
            decide(ended, stopping, ran, backoff),
            next,
            "{ended:?} stopping={stopping} ran={ran:?} backoff={backoff:?}"
        );
    }

    #[test]
    fn a_crashed_agent_restarts_and_a_chosen_end_is_final() {
        use Ended::*;
        use Next::*;
        // Ended by choice, or with an error a restart cannot help.
        check(Code(0), false, 5 * S, Duration::ZERO, Exit(0));
        check(Code(2), false, S, Duration::ZERO, Exit(2));
        check(Code(3), false, S, Duration::ZERO, Exit(3));
        // Crashes: a panic (101), SIGKILL (the OOM killer), SIGSEGV; restarted, backing off.
        check(Code(101), false, S, Duration::ZERO, Restart(S));
        check(Signal(9), false, S, S, Restart(2 * S));
        check(Signal(11), false, S, 16 * S, Restart(30 * S));
        check(Signal(11), false, S, 30 * S, Restart(30 * S));
        // A crash after a healthy run starts the backoff again.
        check(Signal(9), false, 61 * S, 30 * S, Restart(S));
        // While stopping, any end is final, with the shell's status for a signal.
        check(Signal(15), true, S, Duration::ZERO, Exit(143));
        check(Code(101), true, S, Duration::ZERO, Exit(101));
        check(Code(0), true, S, Duration::ZERO, Exit(0));
    }
}
