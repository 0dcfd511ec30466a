//! What people used ssh for, as streams of the agent channel (feature `streams`, protocol
//! 8): a command (`exec`, or an interactive `shell` on a PTY), a TCP connection forwarded
//! to a port on the instance, and a copy of files either way. Each is one stream the
//! controller opens with a [`crate::BulkOpen`] naming it; the agent answers with a frame
//! saying whether it took it (its policy may refuse), and then the stream carries what
//! each kind says below.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::RunId;
use crate::message::WireError;

/// Where a command runs or a relative path is taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Place {
    /// A run's synced tree, with the run's environment (`RUNCTL_*`, its venv first in
    /// `PATH`, the variables it was started with).
    Run(RunId),
    /// The agent's home directory, with the agent's own environment.
    Home,
}

/// Who asked, for the agent's audit log: the controller's user and host (the session
/// itself is authenticated by its certificate; this names the person behind it).
pub type Requester = String;

/// A terminal's size, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// Run a command (`exec`), or a shell on a PTY (`shell`: `tty` set, `argv` empty for the
/// user's login shell). Then: agent `ExecOutput::Started` (or a refusal), and frames
/// both ways: [`ExecInput`] from the controller, [`ExecOutput`] from the agent, ending
/// with `ExecOutput::Ended`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOpen {
    pub place: Place,
    pub argv: Vec<String>,
    /// A PTY of this size; output then comes as `Stdout` only.
    pub tty: Option<TtySize>,
    /// `TERM` for the PTY (the laptop's).
    pub term: Option<String>,
    /// The controller sends stdin; without it the command's stdin is `/dev/null`.
    pub stdin: bool,
    pub who: Requester,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecInput {
    Stdin(Vec<u8>),
    /// No more stdin: the command's stdin is closed (on a PTY, nothing happens: the user
    /// types Ctrl-D).
    StdinEnd,
    Resize(TtySize),
    /// Send this signal to the command's process group (a Linux signal number).
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecOutput {
    /// The command is running as this pid, or it could not be started (the stream ends).
    Started(Result<u32, WireError>),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The last frame: how the command ended.
    Ended(ExitStatus),
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// The status a shell reports: the code, or 128 + the signal.
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Exited(code) => code.clamp(0, 255) as u8,
            ExitStatus::Signaled(signal) => 128u8.saturating_add(signal.clamp(0, 127) as u8),
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exit {code}"),
            ExitStatus::Signaled(signal) => write!(f, "signal {signal}"),
        }
    }
}

/// Forward one TCP connection to `host:port` as the instance sees it. The agent answers
/// [`ForwardReady`]; after an `Ok`, the stream's bytes are the connection's, both ways:
/// a half-close is a stream finish, a TCP reset a stream reset (code
/// [`FORWARD_RESET`]). With `check_only`, the agent says whether it would forward there
/// (its policy) without connecting, and the stream ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardOpen {
    pub host: String,
    pub port: u16,
    pub check_only: bool,
    pub who: Requester,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardReady {
    pub result: Result<(), WireError>,
}

/// The QUIC error code of a stream reset that stands for a TCP reset.
pub const FORWARD_RESET: u32 = 1;

/// Copy files from the instance (`CopyOut`) or to it (`CopyIn`). `path` is absolute, or
/// relative to the place (a run's tree; the agent's home).
///
/// Out: the agent answers [`CopyHead`], then the stream holds one zstd-compressed tar of
/// the file or directory (entries under its own name) and ends; a stream reset means the
/// copy failed (nothing complete was sent).
///
/// In: the controller sends [`CopyInHead`] after the open; the agent answers
/// [`CopyReady`] (where it will land, by `docker cp`'s rules), the controller sends the
/// zstd-compressed tar and finishes the stream, the agent answers [`CopyDone`] once the
/// copy is in place under its final name (never before it is whole).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyOpen {
    pub place: Place,
    pub path: String,
    pub who: Requester,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyKind {
    File,
    Dir,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyHead {
    pub result: Result<CopySource, WireError>,
}

/// What a copy carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopySource {
    /// The top entry's name in the tar (the source's own name).
    pub name: String,
    pub kind: CopyKind,
    /// The bytes of file content in it (for progress, and the receiver's bound).
    pub bytes: u64,
    pub files: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyInHead {
    pub source: CopySource,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyReady {
    /// The absolute path the copy will have on the instance.
    pub result: Result<String, WireError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyDone {
    pub result: Result<(), WireError>,
}

/// The most bytes a receiver takes for a copy: its announced content plus tar's own, per
/// entry a header, padding to 512 bytes, and a long name's extra blocks (8 KiB covers a
/// 4,096-byte path), and the archive's end.
pub fn copy_bound(source: &CopySource) -> u64 {
    source
        .bytes
        .saturating_add(source.files.saturating_add(16).saturating_mul(8192))
}

/// What is at a copy's destination, as the agent (or the CLI) found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Nothing,
    File,
    Dir,
}

/// Where a copy of `kind` named `name` lands, by `docker cp`'s rules: into an existing
/// directory under its own name; otherwise as `dest` itself, whose parent must be a
/// directory; a file replaces a file; a directory never replaces a file; a destination
/// written with a trailing `/` must be an existing directory.
pub fn landing(
    dest: &Path,
    trailing_slash: bool,
    found: Found,
    parent_is_dir: bool,
    kind: CopyKind,
    name: &str,
) -> Result<PathBuf, String> {
    match (found, kind) {
        (Found::Dir, _) => Ok(dest.join(name)),
        (Found::File, _) if trailing_slash => Err(format!("{} is not a directory", dest.display())),
        (Found::File, CopyKind::File) => Ok(dest.to_owned()),
        (Found::File, CopyKind::Dir) => Err(format!(
            "cannot copy a directory over the file {}",
            dest.display()
        )),
        (Found::Nothing, _) if trailing_slash => Err(format!(
            "{} does not exist (a destination ending in / must be a directory)",
            dest.display()
        )),
        (Found::Nothing, _) if !parent_is_dir => Err(format!(
            "{} is not a directory",
            dest.parent().unwrap_or(Path::new("/")).display()
        )),
        (Found::Nothing, _) => Ok(dest.to_owned()),
    }
}

/// A chunk of bytes in one `Stdin`/`Stdout`/`Stderr` frame, at most.
pub const CHUNK_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ErrorKind;
    use crate::{BulkOpen, codec};

    fn golden<T: Serialize>(msg: &T) -> String {
        hex::encode(codec::encode(msg).expect("test messages encode"))
    }

    /// Golden encodings of every stream message (protocol 8).
    #[test]
    fn golden_stream_messages() {
        let run = RunId::from_random([0xab; 6]);
        let source = CopySource {
            name: "outputs".into(),
            kind: CopyKind::Dir,
            bytes: 1 << 20,
            files: 3,
        };
        let rendered = [
            golden(&BulkOpen::Exec(ExecOpen {
                place: Place::Run(run.clone()),
                argv: vec!["nvidia-smi".into()],
                tty: None,
                term: None,
                stdin: true,
                who: "ada@laptop".into(),
            })),
            golden(&BulkOpen::Exec(ExecOpen {
                place: Place::Home,
                argv: vec![],
                tty: Some(TtySize {
                    rows: 40,
                    cols: 100,
                }),
                term: Some("xterm-256color".into()),
                stdin: true,
                who: "ada@laptop".into(),
            })),
            golden(&BulkOpen::Forward(ForwardOpen {
                host: "127.0.0.1".into(),
                port: 6006,
                check_only: false,
                who: "ada@laptop".into(),
            })),
            golden(&BulkOpen::CopyOut(CopyOpen {
                place: Place::Run(run.clone()),
                path: "outputs".into(),
                who: "ada@laptop".into(),
            })),
            golden(&BulkOpen::CopyIn(CopyOpen {
                place: Place::Home,
                path: "/data/in".into(),
                who: "ada@laptop".into(),
            })),
            golden(&ExecInput::Stdin(b"ls\n".to_vec())),
            golden(&ExecInput::StdinEnd),
            golden(&ExecInput::Resize(TtySize {
                rows: 50,
                cols: 120,
            })),
            golden(&ExecInput::Signal(2)),
            golden(&ExecOutput::Started(Ok(4242))),
            golden(&ExecOutput::Started(Err(WireError::new(
                ErrorKind::Forbidden,
                "shell is off",
            )))),
            golden(&ExecOutput::Stdout(b"out".to_vec())),
            golden(&ExecOutput::Stderr(b"err".to_vec())),
            golden(&ExecOutput::Ended(ExitStatus::Exited(3))),
            golden(&ExecOutput::Ended(ExitStatus::Signaled(9))),
            golden(&ForwardReady { result: Ok(()) }),
            golden(&CopyHead {
                result: Ok(source.clone()),
            }),
            golden(&CopyInHead { source }),
            golden(&CopyReady {
                result: Ok("/root/outputs".into()),
            }),
            golden(&CopyDone { result: Ok(()) }),
        ];
        insta::assert_snapshot!(rendered.join("\n"));
    }

    #[test]
    fn exit_statuses_read_as_a_shell_reports_them() {
        let check = |status: ExitStatus, code: u8| assert_eq!(status.code(), code, "{status}");
        check(ExitStatus::Exited(0), 0);
        check(ExitStatus::Exited(3), 3);
        check(ExitStatus::Exited(300), 255);
        check(ExitStatus::Exited(-1), 0);
        check(ExitStatus::Signaled(2), 130);
        check(ExitStatus::Signaled(9), 137);
    }

    #[test]
    fn the_copy_bound_covers_tar_overhead_and_no_more_than_that() {
        let check = |bytes: u64, files: u64, at_least: u64, at_most: u64| {
            let bound = copy_bound(&CopySource {
                name: "x".into(),
                kind: CopyKind::Dir,
                bytes,
                files,
            });
            assert!(
                (at_least..=at_most).contains(&bound),
                "{bytes} B in {files}: {bound}"
            );
        };
        check(0, 0, 2048, 1 << 20);
        check(1 << 30, 1, (1 << 30) + 1024, (1 << 30) + (1 << 20));
        check(10, 10_000, 10_000 * 4096, 10_000 * 10_000);
        check(u64::MAX, u64::MAX, u64::MAX, u64::MAX);
    }

    #[test]
    fn a_copy_lands_where_docker_cp_puts_it() {
        let d = Path::new("/w/dest");
        let check =
            |slash: bool, found: Found, parent: bool, kind: CopyKind, expected: Option<&str>| {
                assert_eq!(
                    landing(d, slash, found, parent, kind, "src").ok(),
                    expected.map(PathBuf::from),
                    "{slash} {found:?} {parent} {kind:?}"
                );
            };
        use CopyKind::{Dir, File};
        check(false, Found::Dir, true, File, Some("/w/dest/src"));
        check(false, Found::Dir, true, Dir, Some("/w/dest/src"));
        check(true, Found::Dir, true, Dir, Some("/w/dest/src"));
        check(false, Found::File, true, File, Some("/w/dest"));
        check(false, Found::File, true, Dir, None);
        check(true, Found::File, true, File, None);
        check(false, Found::Nothing, true, File, Some("/w/dest"));
        check(false, Found::Nothing, true, Dir, Some("/w/dest"));
        check(true, Found::Nothing, true, Dir, None);
        check(false, Found::Nothing, false, File, None);
    }
}
