//! The local provider: an instance is a `runctl-agent` process on this machine, with its
//! own directory (config, state, log) under `$RUNCTL_HOME/local/NAME`. It enrolls over
//! loopback exactly as a cloud agent would, token and CA pin included.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use protocol::InstanceName;
use protocol::agent_config::AgentConfigFile;

use crate::config::LocalConfig;
use crate::error::{ErrorCode, UserError};
use crate::home::Home;

const AGENT_BIN: &str = "runctl-agent";

/// Finds the agent binary: `RUNCTL_AGENT_BIN`, then `[local] agent_binary`, then the
/// `runctl-agent` beside this executable.
pub fn agent_binary(config: &LocalConfig) -> Result<PathBuf, UserError> {
    let candidate = std::env::var_os("RUNCTL_AGENT_BIN")
        .map(PathBuf::from)
        .or_else(|| config.agent_binary.clone())
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join(AGENT_BIN)))
        });
    match candidate {
        Some(path) if path.is_file() => Ok(path),
        other => Err(UserError::new(
            ErrorCode::BadInput,
            match other {
                Some(path) => format!("the agent binary {} does not exist", path.display()),
                None => "cannot locate the runctl-agent binary".to_owned(),
            },
        )
        .resolve("build it beside the controller: cargo build -p agent")
        .resolve("or point to it: RUNCTL_AGENT_BIN=/path/to/runctl-agent, or `agent_binary` under [local] in config.toml")),
    }
}

/// `[local.agent]`'s settings in an agent's config, and `[agent]`'s disk limits with
/// `[local.agent]`'s overrides.
pub fn agent_settings(config: &crate::config::Config, file: &mut AgentConfigFile) {
    let agent = &config.local.agent;
    file.stats_interval_ms = agent.stats_interval_ms;
    file.nvidia_smi = agent.nvidia_smi.clone();
    file.idle_timeout_secs = agent.idle_timeout_secs;
    file.poweroff_command = agent.poweroff_command.clone();
    file.metadata_endpoint = agent.metadata_endpoint.clone();
    file.log_max_bytes = agent.log_max_bytes;
    config.agent.for_local(agent).write_into(file);
}

/// What the daemon needs to start a local agent.
#[derive(Debug)]
pub struct LaunchSpec<'a> {
    pub name: &'a InstanceName,
    pub config: &'a AgentConfigFile,
    pub agent_bin: &'a Path,
}

/// Writes the instance's agent config (owner-only) and starts the agent in a session of
/// its own, so it keeps running when the daemon stops.
pub fn launch(home: &Home, spec: LaunchSpec<'_>) -> anyhow::Result<tokio::process::Child> {
    let dir = home.local_instance(spec.name);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let config_path = config_path(home, spec.name);
    protocol::tls::write_private(&config_path, toml::to_string(spec.config)?.as_bytes())
        .with_context(|| format!("writing {}", config_path.display()))?;
    spawn(home, spec.name, spec.agent_bin)
}

/// Starts the agent of instance `name` with the config it was launched with (its identity
/// is in its state dir), in a session of its own: a launch, or an agent started again
/// after its process died (what systemd does for a cloud instance's).
pub fn spawn(
    home: &Home,
    name: &InstanceName,
    agent_bin: &Path,
) -> anyhow::Result<tokio::process::Child> {
    let dir = home.local_instance(name);
    let config_path = config_path(home, name);
    let log_path = dir.join("agent.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut command = std::process::Command::new(agent_bin);
    command
        .arg("--config")
        .arg(&config_path)
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    crate::detach::new_session(&mut command);
    let child = tokio::process::Command::from(command)
        .spawn()
        .with_context(|| format!("starting {}", agent_bin.display()))?;
    Ok(child)
}

fn config_path(home: &Home, name: &InstanceName) -> PathBuf {
    home.local_instance(name).join("agent.toml")
}

/// Whether `pid` is still the agent of instance `name`, and not a reused pid: its
/// command line names the instance's own config file.
pub fn is_agent_alive(home: &Home, name: &InstanceName, pid: u32) -> bool {
    if kill(Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok();
    runs_config(
        cmdline.as_deref(),
        &config_path(home, name).to_string_lossy(),
    )
}

/// Whether a live process whose command line is `cmdline` (`None`: no /proc to read, as
/// on macOS) may be the agent started with `config`. An empty command line is one whose
/// exec has not finished: a spawn returns once the exec is past its point of no return,
/// before the kernel has set up the new program's arguments, and on a busy host that
/// window is long enough to be seen. It is the agent's, so it counts as alive; a zombie,
/// the other empty case, is reaped and then fails the signal probe.
fn runs_config(cmdline: Option<&[u8]>, config: &str) -> bool {
    match cmdline {
        None => true,
        Some([]) => true,
        Some(cmdline) => String::from_utf8_lossy(cmdline).contains(config),
    }
}

/// Kills the agent of `name` (SIGKILL) if it is still running.
pub fn kill_agent(home: &Home, name: &InstanceName, pid: u32) {
    if is_agent_alive(home, name, pid) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// Kills (SIGKILL) what is left of a run's process group `pgid` after its local agent
/// died: the group's processes outlive the agent (they are in a session of their own).
/// Only while `pgid` still leads its group, so a pid since reused by something else is
/// left alone.
pub fn kill_group(pgid: u32) {
    let leads = std::fs::read_to_string(format!("/proc/{pgid}/stat"))
        .ok()
        .and_then(|stat| {
            // After the command's name in parentheses: state, ppid, pgrp.
            let rest = stat.rsplit_once(')')?.1;
            rest.split_whitespace().nth(2)?.parse::<u32>().ok()
        })
        == Some(pgid);
    if leads {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
    }
}

/// The last lines of the instance's agent log, for error messages.
pub fn log_tail(home: &Home, name: &InstanceName) -> String {
    crate::home::log_tail(&home.local_instance(name).join("agent.log"), 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cmdline: Option<&[u8]>, expected: bool) {
        assert_eq!(
            runs_config(cmdline, "/h/local/a/agent.toml"),
            expected,
            "{cmdline:?}"
        );
    }

    #[test]
    fn whose_process_it_is() {
        check(
            Some(b"/bin/runctl-agent\0--config\0/h/local/a/agent.toml\0"),
            true,
        );
        // A pid reused by another program, or another instance's agent.
        check(Some(b"/usr/bin/python3\0train.py\0"), false);
        check(
            Some(b"/bin/runctl-agent\0--config\0/h/local/b/agent.toml\0"),
            false,
        );
        // Caught mid-exec (its arguments not set up yet), or no /proc at all.
        check(Some(b""), true);
        check(None, true);
    }
}
