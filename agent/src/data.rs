//! A run's storage side: checking its data sources, checkpoint destination and resume
//! point (pure, at start); pulling data into the data dir with progress events; fetching
//! the checkpoint to resume from. The pushing of checkpoints is `pusher`'s.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use protocol::{
    CheckpointEvent, CheckpointOutcome, CheckpointPush, EventKind, PullProgress, RunSpec, StoreSpec,
};
use serde::{Deserialize, Serialize};
use storage::transfer::{Engine, Tuning, is_identical};
use storage::{Connection, ObjectStore, ObjectUrl, Store};

use crate::eventlog::EventLog;

/// A run's storage work, checked.
#[derive(Debug, Clone)]
pub struct Plan {
    pub spec: StoreSpec,
    pub data: Vec<(ObjectUrl, PathBuf)>,
    pub alongside: bool,
    pub resume: Option<ObjectUrl>,
    pub checkpoints: Option<(ObjectUrl, u32)>,
}

/// What a run needs to push checkpoints again after the agent restarts, kept in its dir.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saved {
    pub storage: StoreSpec,
    pub checkpoints: CheckpointPush,
}

pub const SAVED_FILE: &str = "storage.json";

/// Checks the storage parts of `spec`; `None` when the run uses no storage.
pub fn plan(spec: &RunSpec, data_dir: &Path) -> Result<Option<Plan>, String> {
    let uses = !spec.data.is_empty() || spec.checkpoints.is_some() || spec.resume_from.is_some();
    let Some(store) = &spec.storage else {
        return if uses {
            Err("the run names data, checkpoints or a resume point but no object store".into())
        } else {
            Ok(None)
        };
    };
    if !uses {
        return Ok(None);
    }
    let url = |s: &str| ObjectUrl::parse(s).map_err(|e| e.to_string());
    let mut data = Vec::new();
    for source in &spec.data {
        let from = url(&source.source)?;
        if !source.dest.is_empty() {
            protocol::manifest::check_path(&source.dest)
                .map_err(|e| format!("data destination {:?}: {e}", source.dest))?;
        }
        data.push((from, data_dir.join(&source.dest)));
    }
    let resume = spec.resume_from.as_deref().map(url).transpose()?;
    let checkpoints = spec
        .checkpoints
        .as_ref()
        .map(|c| Ok::<_, String>((url(&c.dest)?, c.keep)))
        .transpose()?;
    Ok(Some(Plan {
        spec: store.clone(),
        data,
        alongside: spec.pull_alongside,
        resume,
        checkpoints,
    }))
}

/// An engine for the bucket of `url`.
pub fn engine(conn: &Connection, url: &ObjectUrl) -> Result<Engine<Store>, String> {
    let store = conn.bucket(&url.bucket).map_err(|e| e.to_string())?;
    Ok(Engine::new(store, Tuning::default()))
}

/// Pulls every source, reporting progress as `Pull` events about once a second.
pub async fn pull(
    conn: &Connection,
    sources: &[(ObjectUrl, PathBuf)],
    log: &Arc<EventLog>,
) -> Result<(), String> {
    let mut engines = Vec::new();
    for (url, dest) in sources {
        engines.push((engine(conn, url)?, url, dest));
    }
    let progress: Vec<_> = engines.iter().map(|(e, _, _)| e.progress()).collect();
    let skipped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let report = {
        let (progress, skipped) = (progress.clone(), skipped.clone());
        move |done: bool| {
            let mut p = PullProgress {
                files_done: 0,
                files_total: 0,
                bytes_done: 0,
                bytes_total: 0,
                skipped: skipped.load(std::sync::atomic::Ordering::Relaxed),
                done,
            };
            for s in progress.iter().map(|p| p.snapshot()) {
                p.files_done += s.files_done;
                p.files_total += s.files_total;
                p.bytes_done += s.bytes_done;
                p.bytes_total += s.bytes_total;
            }
            p
        }
    };
    // Aborted when the pull ends or is itself cancelled.
    let ticker = {
        let (log, report) = (log.clone(), report.clone());
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                append(&log, EventKind::Pull(report(false)));
            }
        }))
    };
    let result = async {
        for (engine, url, dest) in &engines {
            let n = pull_one(engine, url, dest)
                .await
                .map_err(|e| format!("pulling {url}: {e}"))?;
            skipped.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
    .await;
    drop(ticker);
    append(log, EventKind::Pull(report(result.is_ok())));
    result
}

/// Pulls one source: one object when the URL names one, else everything under it as a
/// prefix. Returns how many files were skipped as present and identical.
async fn pull_one(
    engine: &Engine<Store>,
    url: &ObjectUrl,
    dest: &Path,
) -> Result<u64, storage::StoreError> {
    if !url.key.is_empty()
        && !url.key.ends_with('/')
        && let Some(meta) = engine.store().head(&url.key).await?
    {
        if is_identical(dest, &meta) {
            return Ok(1);
        }
        engine.download_file(&url.key, dest, Some(meta)).await?;
        return Ok(0);
    }
    let report = engine.download_prefix(&url.as_prefix(), dest).await?;
    if !report.refused.is_empty() {
        tracing::warn!(
            "refused {} key(s) under {url} that would land outside {}: {:?}",
            report.refused.len(),
            dest.display(),
            report.refused
        );
    }
    Ok(report.skipped)
}

/// Fetches the newest complete checkpoint under `url` into `dest_dir`; its local path is
/// the trainer's `RUNCTL_RESUME_FROM`.
pub async fn fetch_resume(
    conn: &Connection,
    url: &ObjectUrl,
    dest_dir: &Path,
    log: &Arc<EventLog>,
) -> Result<PathBuf, String> {
    let engine = engine(conn, url)?;
    let prefix = url.as_prefix();
    let fail =
        |e: storage::StoreError| format!("fetching the checkpoint to resume from at {url}: {e}");
    let record = storage::checkpoints::latest(engine.store(), &prefix)
        .await
        .map_err(fail)?
        .ok_or_else(|| {
            format!("no complete checkpoint (no LATEST record) under {url} to resume from")
        })?;
    let path = storage::checkpoints::fetch(&engine, &prefix, &record, dest_dir)
        .await
        .map_err(fail)?;
    append(
        log,
        EventKind::Checkpoint(CheckpointEvent {
            name: record.name.clone(),
            url: url.join(&record.name).to_string(),
            bytes: record.bytes,
            files: record.files.len() as u32,
            outcome: CheckpointOutcome::Fetched {
                path: path.display().to_string(),
            },
        }),
    );
    Ok(path)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn append(log: &EventLog, kind: EventKind) {
    if let Err(e) = log.append(kind) {
        tracing::warn!("run log write failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{DataSource, EndAction, RestartPolicy, RunId, Setup};

    fn spec() -> RunSpec {
        RunSpec {
            run: "run-0123456789ab".parse::<RunId>().expect("id"),
            argv: vec!["true".into()],
            env: vec![],
            cwd: String::new(),
            setup: Setup::Skip,
            restart: RestartPolicy::Never,
            stop_grace_ms: 1000,
            end: EndAction::Keep,
            spot_signal: 15,
            storage: Some(StoreSpec::Local { root: "/s".into() }),
            data: vec![],
            pull_alongside: false,
            checkpoints: None,
            resume_from: None,
        }
    }

    #[test]
    fn plans_are_checked() {
        let dir = Path::new("/data");
        let mut s = spec();
        assert!(plan(&s, dir).expect("ok").is_none(), "nothing to do");
        s.data = vec![DataSource {
            source: "s3://bkt/train/".into(),
            dest: "train".into(),
        }];
        let p = plan(&s, dir).expect("ok").expect("some");
        assert_eq!(p.data[0].1, Path::new("/data/train"));
        s.data[0].dest = "../etc".into();
        assert!(plan(&s, dir).expect_err("escapes").contains("../etc"));
        s.data[0].dest = "x".into();
        s.data[0].source = "bkt/train".into();
        assert!(plan(&s, dir).is_err());
        s.data.clear();
        s.resume_from = Some("s3://bkt/runs/r/".into());
        s.storage = None;
        assert!(
            plan(&s, dir)
                .expect_err("no store")
                .contains("no object store")
        );
    }
}
