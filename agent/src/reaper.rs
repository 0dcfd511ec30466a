//! Child processes and orphans. Every process the agent starts goes through [`spawn`],
//! which remembers it until its owner has waited for it. When the agent is PID 1 (the
//! start command of a container), orphaned grandchildren are re-parented to it and must be
//! reaped or they stay zombies: [`run`] reaps every zombie child that nobody is waiting on.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use crate::procstat::{self, ProcStat};

/// Pids of children whose owners wait for them (tokio reaps those).
static OWNED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn owned() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    OWNED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Spawns `command`, remembering the child as owned. The lock is held across the spawn so
/// the reaper never sees the new child unowned.
pub fn spawn(command: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    spawn_with(|| command.spawn())
}

/// Spawns with `spawn` (a command of another kind, e.g. one on a PTY), remembering the
/// child as owned, as [`spawn`] does.
pub fn spawn_with(
    spawn: impl FnOnce() -> std::io::Result<tokio::process::Child>,
) -> std::io::Result<tokio::process::Child> {
    let mut owned = owned();
    let child = spawn()?;
    if let Some(pid) = child.id() {
        owned.insert(pid);
    }
    Ok(child)
}

/// The owner of `pid` has waited for it.
pub fn forget(pid: u32) {
    owned().remove(&pid);
}

/// Reaps orphans once a second, when this process is PID 1; otherwise returns at once
/// (the system's init reaps them).
pub async fn run() {
    if std::process::id() != 1 {
        return;
    }
    tracing::info!("running as PID 1: reaping orphaned processes");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let reaped = reap_orphans();
        if reaped > 0 {
            tracing::debug!("reaped {reaped} orphaned processes");
        }
    }
}

/// Reaps zombie children of this process that nobody owns; returns how many.
pub fn reap_orphans() -> usize {
    let me = std::process::id();
    let owned = owned();
    let mut reaped = 0;
    for pid in procstat::pids() {
        if owned.contains(&pid) {
            continue;
        }
        let Some(stat) = ProcStat::of(pid) else {
            continue;
        };
        if stat.state == 'Z'
            && stat.ppid == me
            && waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)).is_ok()
        {
            reaped += 1;
        }
    }
    reaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_of(pid: u32) -> Option<char> {
        ProcStat::of(pid).map(|s| s.state)
    }

    #[test]
    fn unowned_zombie_children_are_reaped_and_owned_ones_are_not() {
        let orphan = std::process::Command::new("sh")
            .args(["-c", "exit 0"])
            .spawn()
            .expect("sh runs");
        let pid = orphan.id();
        // Stands in for an orphan re-parented to PID 1: nobody will wait for it.
        std::mem::forget(orphan);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while state_of(pid) != Some('Z') {
            assert!(
                std::time::Instant::now() < deadline,
                "{pid} became a zombie"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        owned().insert(pid);
        reap_orphans();
        assert_eq!(state_of(pid), Some('Z'), "an owned child is left alone");
        forget(pid);
        assert!(reap_orphans() >= 1);
        assert_eq!(state_of(pid), None, "the zombie is gone");
    }
}
