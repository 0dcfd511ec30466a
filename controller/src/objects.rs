//! `s3` and `checkpoint`: the user's own transfers and a run's checkpoints, done by this
//! process directly against the object store `[storage]` names (the daemon is asked only
//! where a run's checkpoints went). Progress bars on a terminal; JSON with `--output json`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use storage::checkpoints::{self, CheckpointRecord};
use storage::transfer::{Engine, Progress, Tuning, is_identical, walk_files};
use storage::{ObjectStore, ObjectUrl, Store, StoreError};

use crate::cli::{CheckpointCommand, ObjectCommand};
use crate::config::Config;
use crate::error::{ErrorCode, UserError};
use crate::home::Home;
use crate::ipc::{Client, Request, Response};
use crate::report::{Printer, bytes_words};

/// A store failure, for people: what it means and what to do.
pub fn store_error(e: StoreError) -> UserError {
    let message = e.to_string();
    match e {
        StoreError::NoSuchBucket { .. } => UserError::new(ErrorCode::NotFound, message)
            .resolve("check the bucket name and [storage] endpoint_url/region in the config"),
        StoreError::NotFound { .. } => UserError::new(ErrorCode::NotFound, message),
        StoreError::NoCredentials { .. } => UserError::new(ErrorCode::BadInput, message)
            .resolve("export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
            .resolve("or set [storage] profile in the config"),
        StoreError::AccessDenied { .. } => UserError::new(ErrorCode::BadInput, message)
            .resolve("check that the credentials are right and allowed on this bucket"),
        StoreError::InvalidUrl { .. } | StoreError::InvalidKey { .. } => {
            UserError::new(ErrorCode::BadInput, message)
        }
        _ => UserError::new(ErrorCode::Internal, message),
    }
}

async fn open(home: &Home, config: &Config, url: &ObjectUrl) -> Result<Store, UserError> {
    let conn = storage::connect(&config.storage.store_config(home.root()))
        .await
        .map_err(store_error)?;
    conn.bucket(&url.bucket).map_err(store_error)
}

fn parse_url(s: &str) -> Result<ObjectUrl, UserError> {
    ObjectUrl::parse(s).map_err(store_error)
}

/// Draws a progress bar on stderr from `progress` until dropped (terminal only).
struct Bar {
    task: Option<tokio::task::JoinHandle<()>>,
    bar: Option<indicatif::ProgressBar>,
}

impl Bar {
    fn start(printer: Printer, progress: Arc<Progress>, what: &str) -> Bar {
        if !printer.tty || printer.quiet || printer.format != crate::report::Format::Human {
            return Bar {
                task: None,
                bar: None,
            };
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {prefix}",
            )
            .expect("a valid template")
            .progress_chars("#>-"),
        );
        bar.set_message(what.to_owned());
        let b = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                let s = progress.snapshot();
                b.set_length(s.bytes_total);
                b.set_position(s.bytes_done);
                b.set_prefix(format!("{}/{} files", s.files_done, s.files_total));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Bar {
            task: Some(task),
            bar: Some(bar),
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// What a transfer did.
#[derive(Debug, Serialize)]
struct Transferred {
    files: u64,
    skipped: u64,
    bytes: u64,
    seconds: f64,
    mib_per_s: f64,
}

impl Transferred {
    fn new(files: u64, skipped: u64, bytes: u64, began: Instant) -> Self {
        let seconds = began.elapsed().as_secs_f64();
        Transferred {
            files,
            skipped,
            bytes,
            seconds,
            mib_per_s: bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9),
        }
    }

    fn text(&self, verb: &str) -> String {
        let skipped = if self.skipped > 0 {
            format!(" ({} already identical)", self.skipped)
        } else {
            String::new()
        };
        format!(
            "{verb} {} file(s), {} in {:.2} s ({:.1} MiB/s){skipped}\n",
            self.files,
            bytes_words(self.bytes),
            self.seconds,
            self.mib_per_s
        )
    }
}

pub async fn s3(
    home: &Home,
    config: &Config,
    printer: Printer,
    cmd: ObjectCommand,
) -> anyhow::Result<u8> {
    match cmd {
        ObjectCommand::Ls { url, recursive } => {
            let url = parse_url(&url)?;
            let store = open(home, config, &url).await?;
            let listing = store
                .list(&url.key, !recursive)
                .await
                .map_err(store_error)?;
            #[derive(Serialize)]
            struct Entry<'a> {
                key: &'a str,
                size: u64,
                modified_ms: Option<i64>,
            }
            #[derive(Serialize)]
            struct Ls<'a> {
                prefixes: &'a [String],
                objects: Vec<Entry<'a>>,
            }
            let json = Ls {
                prefixes: &listing.prefixes,
                objects: listing
                    .objects
                    .iter()
                    .map(|o| Entry {
                        key: &o.key,
                        size: o.size,
                        modified_ms: o.modified_ms,
                    })
                    .collect(),
            };
            printer.data(&json, || {
                let mut out = String::new();
                for p in &listing.prefixes {
                    out.push_str(&format!(
                        "{:>19} {:>10}  s3://{}/{p}\n",
                        "", "PRE", url.bucket
                    ));
                }
                for o in &listing.objects {
                    let when = o
                        .modified_ms
                        .map(|ms| {
                            humantime::format_rfc3339_seconds(
                                std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64),
                            )
                            .to_string()
                        })
                        .unwrap_or_default();
                    out.push_str(&format!(
                        "{when:>19} {:>10}  s3://{}/{}\n",
                        o.size, url.bucket, o.key
                    ));
                }
                out
            });
            Ok(0)
        }
        ObjectCommand::Cp {
            source,
            dest,
            recursive,
        } => copy(home, config, printer, &source, &dest, recursive, false).await,
        ObjectCommand::Sync { source, dest } => {
            copy(home, config, printer, &source, &dest, true, true).await
        }
        ObjectCommand::Rm { url, recursive } => {
            let url = parse_url(&url)?;
            let store = open(home, config, &url).await?;
            let keys: Vec<String> = if recursive {
                let listing = store
                    .list(&url.as_prefix(), false)
                    .await
                    .map_err(store_error)?;
                listing.objects.into_iter().map(|o| o.key).collect()
            } else {
                if store.head(&url.key).await.map_err(store_error)?.is_none() {
                    return Err(
                        UserError::new(ErrorCode::NotFound, format!("no object at {url}"))
                            .resolve("to delete everything under a prefix, add --recursive")
                            .into(),
                    );
                }
                vec![url.key.clone()]
            };
            let count = keys.len();
            Engine::new(store, Tuning::default())
                .delete_all(keys)
                .await
                .map_err(store_error)?;
            #[derive(Serialize)]
            struct Deleted {
                deleted: usize,
            }
            printer.data(&Deleted { deleted: count }, || {
                format!("deleted {count} object(s)\n")
            });
            Ok(0)
        }
    }
}

/// `cp` and `sync`: one side local, the other `s3://`. `sync` copies only what differs.
async fn copy(
    home: &Home,
    config: &Config,
    printer: Printer,
    source: &str,
    dest: &str,
    recursive: bool,
    sync: bool,
) -> anyhow::Result<u8> {
    let began = Instant::now();
    match (source.starts_with("s3://"), dest.starts_with("s3://")) {
        (false, true) => {
            let url = parse_url(dest)?;
            let src = PathBuf::from(source);
            let meta = std::fs::metadata(&src)
                .map_err(|e| UserError::new(ErrorCode::BadInput, format!("{source}: {e}")))?;
            let store = open(home, config, &url).await?;
            let engine = Engine::new(store, Tuning::default());
            let mut items = Vec::new();
            if meta.is_dir() {
                if !recursive {
                    return Err(UserError::new(
                        ErrorCode::BadInput,
                        format!("{source} is a directory"),
                    )
                    .resolve("add --recursive to copy a directory")
                    .into());
                }
                for (path, rel) in walk_files(&src).map_err(store_error)? {
                    items.push((path, format!("{}{rel}", url.as_prefix())));
                }
            } else {
                let name = src
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let key = if url.key.is_empty() || url.key.ends_with('/') {
                    format!("{}{name}", url.key)
                } else {
                    url.key.clone()
                };
                items.push((src.clone(), key));
            }
            let total = items.len() as u64;
            if sync {
                items = changed_locally(engine.store(), &url.as_prefix(), items).await?;
            }
            let skipped = total - items.len() as u64;
            let _bar = Bar::start(printer, engine.progress(), "uploading");
            let done = engine.upload_all(items).await.map_err(store_error)?;
            drop(_bar);
            let bytes = done.iter().map(|u| u.size).sum();
            let report = Transferred::new(done.len() as u64, skipped, bytes, began);
            printer.data(&report, || report.text("uploaded"));
            Ok(0)
        }
        (true, false) => {
            let url = parse_url(source)?;
            let store = open(home, config, &url).await?;
            let engine = Engine::new(store, Tuning::default());
            let dest = PathBuf::from(dest);
            let single = !url.key.is_empty() && !url.key.ends_with('/') && !recursive;
            let _bar = Bar::start(printer, engine.progress(), "downloading");
            let report = if single {
                let meta = engine
                    .store()
                    .head(&url.key)
                    .await
                    .map_err(store_error)?
                    .ok_or_else(|| {
                        UserError::new(ErrorCode::NotFound, format!("no object at {url}"))
                            .resolve("to copy everything under a prefix, add --recursive")
                    })?;
                let target = if dest.is_dir() || dest.to_string_lossy().ends_with('/') {
                    dest.join(url.key.rsplit('/').next().unwrap_or(&url.key))
                } else {
                    dest
                };
                if sync && is_identical(&target, &meta) {
                    Transferred::new(0, 1, 0, began)
                } else {
                    let done = engine
                        .download_file(&url.key, &target, Some(meta))
                        .await
                        .map_err(store_error)?;
                    Transferred::new(1, 0, done.size, began)
                }
            } else {
                let pulled = engine
                    .download_prefix(&url.as_prefix(), &dest)
                    .await
                    .map_err(store_error)?;
                if !pulled.refused.is_empty() {
                    printer.progress(&format!(
                        "refused {} key(s) that would land outside {}: {:?}",
                        pulled.refused.len(),
                        dest.display(),
                        pulled.refused
                    ));
                }
                Transferred::new(
                    pulled.files - pulled.skipped,
                    pulled.skipped,
                    pulled.fetched,
                    began,
                )
            };
            drop(_bar);
            printer.data(&report, || report.text("downloaded"));
            Ok(0)
        }
        (true, true) => Err(UserError::new(
            ErrorCode::BadInput,
            "copying from one s3:// URL to another is not supported",
        )
        .resolve("copy down to a local directory, then up")
        .into()),
        (false, false) => Err(
            UserError::new(ErrorCode::BadInput, "neither side is an s3:// URL")
                .resolve("use cp for local copies; one side here must be s3://BUCKET/KEY")
                .into(),
        ),
    }
}

/// The local files that differ from the store: missing there, another size, or newer here.
async fn changed_locally(
    store: &Store,
    prefix: &str,
    items: Vec<(PathBuf, String)>,
) -> Result<Vec<(PathBuf, String)>, UserError> {
    let listing = store.list(prefix, false).await.map_err(store_error)?;
    let remote: std::collections::HashMap<&str, &storage::ObjectMeta> = listing
        .objects
        .iter()
        .map(|o| (o.key.as_str(), o))
        .collect();
    Ok(items
        .into_iter()
        .filter(|(path, key)| {
            let Some(object) = remote.get(key.as_str()) else {
                return true;
            };
            let Ok(meta) = std::fs::metadata(path) else {
                return true;
            };
            let local_ms = checkpoints::modified_ms(path).unwrap_or(i64::MAX);
            meta.len() != object.size || object.modified_ms.is_none_or(|r| local_ms > r)
        })
        .collect())
}

/// A run's checkpoint prefix: given as `s3://...`, or a run id the daemon knows.
async fn checkpoint_prefix(home: &Home, target: &str) -> Result<ObjectUrl, UserError> {
    if target.starts_with("s3://") {
        let url = parse_url(target)?;
        return Ok(url.with_key(url.as_prefix()));
    }
    let run = target.parse().map_err(|e| {
        UserError::new(ErrorCode::BadInput, format!("{target:?}: {e}"))
            .resolve("give a run id (see `list`) or an s3:// checkpoint prefix")
    })?;
    match Client::call(home, &Request::CheckpointDest { run }).await? {
        Response::CheckpointDest(Some(url)) => parse_url(&url),
        Response::CheckpointDest(None) => Err(UserError::new(
            ErrorCode::NotFound,
            format!("run {target} pushes no checkpoints (it was started with none configured)"),
        )),
        _ => Err(UserError::new(
            ErrorCode::Internal,
            "unexpected answer from the daemon",
        )),
    }
}

fn pick<'a>(
    records: &'a [CheckpointRecord],
    latest: Option<&'a CheckpointRecord>,
    name: Option<&str>,
    prefix: &ObjectUrl,
) -> Result<&'a CheckpointRecord, UserError> {
    match name {
        None => latest.ok_or_else(|| {
            UserError::new(
                ErrorCode::NotFound,
                format!("no complete checkpoint under {prefix} (no LATEST record)"),
            )
        }),
        Some(name) => records.iter().find(|r| r.name == name).ok_or_else(|| {
            UserError::new(
                ErrorCode::NotFound,
                format!("no complete checkpoint named {name:?} under {prefix}"),
            )
            .resolve("see the names with: runctl-controller checkpoint list RUN")
        }),
    }
}

/// The complete checkpoints under `prefix`, and the one `LATEST` names.
async fn complete(
    store: &Store,
    prefix: &str,
) -> Result<(Vec<CheckpointRecord>, Option<CheckpointRecord>), UserError> {
    let records = checkpoints::list(store, prefix)
        .await
        .map_err(store_error)?;
    let latest = checkpoints::latest(store, prefix)
        .await
        .map_err(store_error)?;
    Ok((records, latest))
}

pub async fn checkpoint(
    home: &Home,
    config: &Config,
    printer: Printer,
    cmd: CheckpointCommand,
) -> anyhow::Result<u8> {
    let target = match &cmd {
        CheckpointCommand::List { target }
        | CheckpointCommand::Info { target, .. }
        | CheckpointCommand::Download { target, .. }
        | CheckpointCommand::Prune { target, .. } => target.clone(),
    };
    let url = checkpoint_prefix(home, &target).await?;
    let prefix = url.as_prefix();
    let store = open(home, config, &url).await?;
    match cmd {
        CheckpointCommand::List { .. } => {
            let (records, latest) = complete(&store, &prefix).await?;
            let latest_name = latest.map(|r| r.name);
            let partial = checkpoints::incomplete(&store, &prefix, &records)
                .await
                .map_err(store_error)?;
            #[derive(Serialize)]
            struct Listed<'a> {
                url: String,
                latest: Option<&'a str>,
                checkpoints: &'a [CheckpointRecord],
                incomplete: Vec<&'a str>,
            }
            let listed = Listed {
                url: url.to_string(),
                latest: latest_name.as_deref(),
                checkpoints: &records,
                incomplete: partial.iter().map(|o| o.key.as_str()).collect(),
            };
            printer.data(&listed, || {
                let mut out = format!("{url}\n");
                if records.is_empty() {
                    out.push_str("no complete checkpoints\n");
                }
                for r in &records {
                    let mark = if Some(&r.name) == latest_name.as_ref() {
                        " LATEST"
                    } else {
                        ""
                    };
                    let saved = humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_millis(r.saved_ms.max(0) as u64),
                    );
                    out.push_str(&format!(
                        "  {:<32} {:>10}  {} file(s)  saved {saved}{mark}\n",
                        r.name,
                        bytes_words(r.bytes),
                        r.files.len()
                    ));
                }
                if !partial.is_empty() {
                    out.push_str(&format!(
                        "  ({} object(s) of unfinished uploads, not offered)\n",
                        partial.len()
                    ));
                }
                out
            });
            Ok(0)
        }
        CheckpointCommand::Info { name, .. } => {
            let (records, latest) = complete(&store, &prefix).await?;
            let latest_name = latest.as_ref().map(|r| r.name.clone());
            let record = pick(&records, latest.as_ref(), name.as_deref(), &url)?;
            printer.data(record, || {
                let mut out = format!(
                    "{}{}\n  {} in {} file(s){}\n",
                    url,
                    record.name,
                    bytes_words(record.bytes),
                    record.files.len(),
                    if Some(&record.name) == latest_name.as_ref() {
                        ", LATEST"
                    } else {
                        ""
                    }
                );
                for f in &record.files {
                    out.push_str(&format!(
                        "  {:<40} {:>12} B  blake3 {}\n",
                        f.path, f.size, f.hash.blake3
                    ));
                }
                out
            });
            Ok(0)
        }
        CheckpointCommand::Download { name, to, .. } => {
            let (records, latest) = complete(&store, &prefix).await?;
            let record = pick(&records, latest.as_ref(), name.as_deref(), &url)?;
            let began = Instant::now();
            let engine = Engine::new(store, Tuning::default());
            let _bar = Bar::start(printer, engine.progress(), "downloading");
            let path = checkpoints::fetch(&engine, &prefix, record, &to)
                .await
                .map_err(store_error)?;
            drop(_bar);
            #[derive(Serialize)]
            struct Fetched {
                name: String,
                path: PathBuf,
                bytes: u64,
                verified: bool,
                seconds: f64,
            }
            let fetched = Fetched {
                name: record.name.clone(),
                path,
                bytes: record.bytes,
                verified: true,
                seconds: began.elapsed().as_secs_f64(),
            };
            printer.data(&fetched, || {
                format!(
                    "downloaded {} to {} ({}, content verified)\n",
                    fetched.name,
                    fetched.path.display(),
                    bytes_words(fetched.bytes)
                )
            });
            Ok(0)
        }
        CheckpointCommand::Prune { keep, .. } => {
            let engine = Engine::new(store, Tuning::default());
            let pruned = checkpoints::prune(&engine, &prefix, keep as usize)
                .await
                .map_err(store_error)?;
            printer.data(&pruned, || {
                let mut out = format!(
                    "deleted {} checkpoint(s), kept {}\n",
                    pruned.deleted.len(),
                    pruned.kept
                );
                for name in &pruned.deleted {
                    out.push_str(&format!("  {name}\n"));
                }
                out
            });
            Ok(0)
        }
    }
}
