//! When the agent powers its instance off: a run ended whose end action says so (and no
//! other run is active), or nothing happened for the idle timeout (no active run and no
//! controller connection). `Idle` is the pure clock; `power_off` runs the configured
//! command, or, without one (a local instance), lets the agent exit.

use std::time::{Duration, Instant};

/// Tracks how long the agent has been idle.
#[derive(Debug, Clone)]
pub struct Idle {
    timeout: Duration,
    since: Option<Instant>,
}

impl Idle {
    pub fn new(timeout: Duration) -> Self {
        Idle {
            timeout,
            since: None,
        }
    }

    /// Records whether the agent is busy at `now`; true once it has been idle for the
    /// whole timeout.
    pub fn observe(&mut self, now: Instant, busy: bool) -> bool {
        if busy {
            self.since = None;
            return false;
        }
        let since = *self.since.get_or_insert(now);
        now.duration_since(since) >= self.timeout
    }
}

/// Why the agent powers off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A run ended with end action stop or terminate (`stop`: the instance is to be kept).
    RunEnded { detail: String, stop: bool },
    /// No run and no controller for the idle timeout.
    Idle(Duration),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::RunEnded { detail, .. } => write!(f, "{detail}"),
            Reason::Idle(timeout) => write!(
                f,
                "no run and no controller for {}",
                humantime::format_duration(*timeout)
            ),
        }
    }
}

/// Now, as RFC 3339 (UTC, seconds), as EC2 writes a notice's time.
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(protocol::clock::now()).to_string()
}

/// What a pod asks RunPod for when it powers off: `stop` (its volume kept) for a run
/// that asked for it, else `terminate` (as an EC2 instance terminates when it powers off).
pub fn pod_action(reason: &Reason) -> &'static str {
    match reason {
        Reason::RunEnded { stop: true, .. } => "stop",
        Reason::RunEnded { stop: false, .. } | Reason::Idle(_) => "terminate",
    }
}

/// Powers off: through RunPod's API for a pod (`pod_api`), else by running the
/// power-off command; `Ok` when that succeeded (or there is neither: the agent exits).
pub async fn power_off(
    command: Option<&[String]>,
    pod_api: Option<&str>,
    reason: &Reason,
) -> Result<(), String> {
    if let Some(api) = pod_api {
        let action = pod_action(reason);
        tracing::warn!("powering off ({reason}): asking RunPod to {action} this pod");
        return crate::pod::act(api, action).await;
    }
    let Some((program, args)) = command.and_then(|c| c.split_first()) else {
        tracing::warn!("powering off ({reason}): no power-off command, so the agent exits");
        return Ok(());
    };
    tracing::warn!("powering off ({reason}): running {command:?}");
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("RUNCTL_POWEROFF_REASON", reason.to_string());
    let mut child = crate::reaper::spawn(&mut cmd)
        .map_err(|e| format!("could not run the power-off command {program:?}: {e}"))?;
    let pid = child.id().unwrap_or(0);
    let status = child.wait().await;
    crate::reaper::forget(pid);
    match status {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!(
            "the power-off command {program:?} failed: {status}"
        )),
        Err(e) => Err(format!("waiting for the power-off command: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_stopped_only_when_its_run_asked() {
        let ended = |stop| Reason::RunEnded {
            detail: "run ended".into(),
            stop,
        };
        assert_eq!(pod_action(&ended(true)), "stop");
        assert_eq!(pod_action(&ended(false)), "terminate");
        assert_eq!(
            pod_action(&Reason::Idle(Duration::from_secs(60))),
            "terminate"
        );
    }

    #[test]
    fn idle_needs_the_whole_timeout_uninterrupted() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut idle = Idle::new(Duration::from_secs(60));
        assert!(!idle.observe(at(0), false));
        assert!(!idle.observe(at(59), false));
        assert!(!idle.observe(at(60), true), "busy resets the clock");
        assert!(!idle.observe(at(61), false));
        assert!(!idle.observe(at(120), false));
        assert!(idle.observe(at(121), false));
    }
}
