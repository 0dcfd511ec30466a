//! Starting processes that outlive the one that started them: the daemon (started by a
//! CLI command) and local agents (started by the daemon) each get a session of their own,
//! so a Ctrl-C or a closed terminal does not reach them.

/// Makes `command` start its process in a new session (`setsid`).
#[allow(unsafe_code)]
pub fn new_session(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls only setsid(2),
    // which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}
