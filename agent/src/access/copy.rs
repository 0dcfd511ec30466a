//! Copies: out (a file or directory on the instance, as one zstd tar) and in (unpacked
//! into a staging directory beside its destination, renamed into place only when whole;
//! see `protocol::copy`). Paths are checked by `policy::resolve`, and again once their
//! symlinks are resolved.

use std::path::{Path, PathBuf};
use std::time::Instant;

use protocol::framed::{read_frame, write_frame};
use protocol::streams::{
    CopyDone, CopyHead, CopyInHead, CopyOpen, CopyReady, FORWARD_RESET, Found, landing,
};
use protocol::{ErrorKind, WireError};
use tokio_util::io::SyncIoBridge;

use super::{Access, AuditLine, policy};

struct Checked {
    path: PathBuf,
    fences: Vec<PathBuf>,
}

/// The path `open` names, made absolute and checked, with the roots its real path must
/// stay under.
fn check(access: &Access, open: &CopyOpen) -> Result<Checked, WireError> {
    let located = access.locate(&open.place)?;
    let roots = access.roots();
    let path = policy::resolve(&located.cwd, &located.fence, &roots, &open.path)?;
    let fences = if Path::new(&open.path).is_absolute() {
        roots
    } else {
        vec![located.fence]
    };
    Ok(Checked { path, fences })
}

/// The real path of `path`, or of its deepest existing ancestor with the rest appended,
/// checked to stay within `fences` (themselves resolved).
fn real_within(path: &Path, fences: &[PathBuf], shown: &str) -> Result<PathBuf, WireError> {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    let real = loop {
        match existing.canonicalize() {
            Ok(real) => break real,
            Err(_) => match (
                existing.file_name().map(ToOwned::to_owned),
                existing.parent(),
            ) {
                (Some(name), Some(parent)) => {
                    rest.push(name);
                    existing = parent.to_owned();
                }
                _ => break existing.clone(),
            },
        }
    };
    let real = rest.into_iter().rev().fold(real, |p, name| p.join(name));
    let fences: Vec<PathBuf> = fences
        .iter()
        .map(|f| f.canonicalize().unwrap_or_else(|_| f.clone()))
        .collect();
    let refs: Vec<&Path> = fences.iter().map(PathBuf::as_path).collect();
    policy::within(&real, &refs, shown)?;
    Ok(real)
}

fn line(open: &CopyOpen, what: &'static str, at_ms: u64, began: Instant, end: String) -> AuditLine {
    AuditLine {
        at_ms,
        who: open.who.clone(),
        what,
        place: super::place_name(&open.place),
        detail: open.path.clone(),
        end,
        ms: began.elapsed().as_millis() as u64,
    }
}

pub async fn serve_out(
    access: &Access,
    open: CopyOpen,
    mut send: quinn::SendStream,
) -> anyhow::Result<()> {
    let (began, at_ms) = (Instant::now(), crate::eventlog::now_ms());
    let found = check(access, &open).and_then(|c| {
        let real = real_within(&c.path, &c.fences, &open.path)?;
        let source = protocol::copy::scan(&real).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                ErrorKind::NotFound
            } else {
                ErrorKind::BadRequest
            };
            WireError::new(kind, format!("{}: {e}", open.path))
        })?;
        Ok((real, source))
    });
    let (real, source) = match found {
        Ok(found) => found,
        Err(e) => {
            access.audit(line(
                &open,
                "copy-out",
                at_ms,
                began,
                format!("refused: {}", e.message),
            ));
            return super::answer_and_end(&mut send, &CopyHead { result: Err(e) }).await;
        }
    };
    write_frame(
        &mut send,
        &CopyHead {
            result: Ok(source.clone()),
        },
    )
    .await?;
    let bridge = SyncIoBridge::new(send);
    let name = source.name.clone();
    let (packed, send) = tokio::task::spawn_blocking(move || {
        let mut bridge = bridge;
        let packed = protocol::copy::pack(&real, &name, &mut bridge, |_| {});
        (packed, bridge.into_inner())
    })
    .await?;
    let mut send = send;
    let end = match packed {
        Ok(()) => {
            let _ = send.finish();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), send.stopped()).await;
            format!("bytes {} in {} files", source.bytes, source.files)
        }
        Err(e) => {
            let _ = send.reset(FORWARD_RESET.into());
            format!("failed: {e}")
        }
    };
    access.audit(line(&open, "copy-out", at_ms, began, end));
    Ok(())
}

pub async fn serve_in(
    access: &Access,
    open: CopyOpen,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let (began, at_ms) = (Instant::now(), crate::eventlog::now_ms());
    let Some(CopyInHead { source }) = read_frame(&mut recv).await? else {
        return Ok(());
    };
    let placed = check(access, &open).and_then(|c| {
        let found = match std::fs::metadata(&c.path) {
            Ok(m) if m.is_dir() => Found::Dir,
            Ok(_) => Found::File,
            Err(_) => Found::Nothing,
        };
        let parent_is_dir = c.path.parent().is_some_and(Path::is_dir);
        let at = landing(
            &c.path,
            open.path.ends_with('/'),
            found,
            parent_is_dir,
            source.kind,
            &source.name,
        )
        .map_err(|m| WireError::new(ErrorKind::BadRequest, m))?;
        real_within(&at, &c.fences, &open.path)
    });
    let at = match placed {
        Ok(at) => at,
        Err(e) => {
            access.audit(line(
                &open,
                "copy-in",
                at_ms,
                began,
                format!("refused: {}", e.message),
            ));
            return super::answer_and_end(&mut send, &CopyReady { result: Err(e) }).await;
        }
    };
    write_frame(
        &mut send,
        &CopyReady {
            result: Ok(at.display().to_string()),
        },
    )
    .await?;
    let parent = at.parent().unwrap_or(Path::new("/")).to_owned();
    let bridge = SyncIoBridge::new(recv);
    let landing_at = at.clone();
    let unpacked = tokio::task::spawn_blocking(move || {
        let staged = protocol::copy::unpack(bridge, &source, &parent, |_| {})?;
        staged
            .place(&landing_at)
            .map_err(|e| format!("moving the copy to {}: {e}", landing_at.display()))
    })
    .await?;
    let end = match &unpacked {
        Ok(()) => format!("to {}", at.display()),
        Err(e) => format!("failed: {e}"),
    };
    access.audit(line(&open, "copy-in", at_ms, began, end));
    let result = unpacked.map_err(|m| WireError::new(ErrorKind::Internal, m));
    write_frame(&mut send, &CopyDone { result }).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), send.stopped()).await;
    Ok(())
}
