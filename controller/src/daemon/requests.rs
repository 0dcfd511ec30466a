//! The daemon's side of the local socket: one request per connection, answered with one
//! response, or a stream of them for runs and logs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use protocol::framed::{read_frame, write_frame};
use protocol::{CheckpointPush, InstanceName, RunId, RunSpec, StoreSpec};
use storage::ObjectUrl;
use tokio::net::UnixStream;

use super::{Daemon, instances, now_ms, runs, sync};
use crate::db::{InstanceState, RunBudget, RunRow, RunState};
use crate::error::{ErrorCode, UserError};
use crate::ipc::{
    BudgetView, ClientHello, DaemonHello, InstanceStats, InstanceView, ListReport, Request,
    Response, Restart, RunRequest, StatusReport, SyncRequest, VERSION,
};
use crate::plan;
use crate::provider::LaunchOptions;

/// How long a request that needs an agent waits for it to (re)connect.
const AGENT_GRACE: Duration = Duration::from_secs(20);

/// How long `stop` waits for a run stopped with its own grace period (unknown here).
const STOP_BOUND: Duration = Duration::from_secs(600);

/// Events are read from the database in pages of this many.
const PAGE: u32 = 1000;

pub(super) async fn handle(d: Arc<Daemon>, mut stream: UnixStream) {
    if let Err(e) = serve(&d, &mut stream).await {
        tracing::debug!("local client: {e:#}");
    }
}

async fn serve(d: &Arc<Daemon>, stream: &mut UnixStream) -> anyhow::Result<()> {
    let Some(_hello): Option<ClientHello> = read_frame(stream).await? else {
        return Ok(());
    };
    let answer = DaemonHello {
        version: VERSION.to_owned(),
        pid: std::process::id(),
    };
    write_frame(stream, &answer).await?;
    let Some(request): Option<Request> = read_frame(stream).await? else {
        return Ok(());
    };
    if let Err(e) = dispatch(d, stream, request).await {
        let user = UserError::from_anyhow(&e);
        write_frame(stream, &Response::Error(user)).await?;
    }
    Ok(())
}

fn view(d: &Daemon, row: crate::db::InstanceRow) -> InstanceView {
    let cloud = d.db.cloud(&row.name).ok().flatten();
    let agent = d.agent(&row.name).map(|link| crate::ipc::AgentVersion {
        software: link.hello.software.clone(),
        protocol: link.hello.protocol_version,
        upgrade: crate::plan::agent_upgrade(
            link.hello.protocol_version,
            protocol::PROTOCOL_VERSION,
            &link.hello.software,
        ),
    });
    InstanceView {
        agent,
        disk: d.disk.lock().expect("disk lock").get(&row.name).cloned(),
        connected: d.connected(&row.name),
        path: d.agent_path(&row.name),
        cost: cloud.as_ref().and_then(|c| c.cost(now_ms())),
        cloud,
        row,
    }
}

/// Runs `work`, forwarding the phase lines it sends as `Progress` frames as they come.
async fn with_progress<T, F>(
    stream: &mut UnixStream,
    work: impl FnOnce(crate::provider::Progress) -> F,
) -> anyhow::Result<T>
where
    F: std::future::Future<Output = Result<T, UserError>>,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let work = work(tx);
    tokio::pin!(work);
    // The work runs to its end even when the client goes away (a launch abandoned
    // half-way could leave an instance no record knows); only the lines stop. What
    // follows goes on too: a run launched for starts, and ends its instance when done.
    let mut client_gone = false;
    let result = loop {
        tokio::select! {
            result = &mut work => break result,
            Some(line) = rx.recv(), if !client_gone => {
                client_gone = write_frame(stream, &Response::Progress(line)).await.is_err();
            }
        }
    };
    while let (false, Ok(line)) = (client_gone, rx.try_recv()) {
        client_gone = write_frame(stream, &Response::Progress(line))
            .await
            .is_err();
    }
    Ok(result?)
}

async fn dispatch(
    d: &Arc<Daemon>,
    stream: &mut UnixStream,
    request: Request,
) -> anyhow::Result<()> {
    match request {
        Request::Open { target, open } => super::streams::open(d, stream, target, open).await?,
        Request::Forward {
            target,
            forwards,
            bind,
        } => super::streams::forward(d, stream, target, forwards, bind).await?,
        Request::Status => {
            let active: Vec<_> =
                d.db.runs()?
                    .into_iter()
                    .filter(|r| !r.state.is_terminal())
                    .collect();
            let mut budgets = Vec::new();
            for r in &active {
                if let Some(caps) = d.db.run_budget(&r.id)? {
                    let price = d.db.cloud(&r.instance)?.and_then(|c| c.price_per_hour);
                    budgets.push(BudgetView {
                        run: r.id.clone(),
                        instance: r.instance.clone(),
                        budget: plan::budget(&caps, price, now_ms()),
                    });
                }
            }
            if let Err(e) = instances::refresh(d).await {
                tracing::warn!("asking EC2 for instance states failed: {}", e.message);
            }
            let live: Vec<InstanceView> =
                d.db.instances()?
                    .into_iter()
                    .filter(|r| {
                        if r.provider.capabilities().remote {
                            matches!(r.state, InstanceState::Launching | InstanceState::Running)
                        } else {
                            d.connected(&r.name)
                        }
                    })
                    .map(|row| view(d, row))
                    .collect();
            let report = StatusReport {
                pid: std::process::id(),
                version: VERSION.to_owned(),
                quic_addr: d.quic_addr.to_string(),
                ca_sha256: d.pki.ca.fingerprint().to_string(),
                agents_connected: d.connected_count(),
                runs_active: active.len() as u32,
                instances_running: live.len() as u32,
                dollars_per_hour: live
                    .iter()
                    .filter_map(|v| v.cloud.as_ref().and_then(|c| c.price_per_hour))
                    // Not `sum()`: the sum of no floats is -0.0.
                    .fold(0.0, |total, price| total + price),
                agents: d.agent_paths(),
                relay: d.relay_view(),
                budgets,
            };
            write_frame(stream, &Response::Status(report)).await?;
        }
        Request::List => {
            let (foreign, cloud_warning) = match instances::refresh(d).await {
                Ok(foreign) => (foreign, None),
                Err(e) => (Vec::new(), Some(e.message)),
            };
            let instances =
                d.db.instances()?
                    .into_iter()
                    .map(|row| view(d, row))
                    .collect();
            let runs = d.db.runs()?;
            let mut nodes = Vec::new();
            for row in &runs {
                let of = d.db.run_nodes(row)?;
                if of.len() > 1 {
                    nodes.push((row.id.clone(), of));
                }
            }
            let report = ListReport {
                instances,
                runs,
                nodes,
                foreign,
                cloud_warning,
            };
            write_frame(stream, &Response::List(report)).await?;
        }
        Request::Launch {
            options,
            name,
            wait,
        } => {
            let row = with_progress(stream, |progress| async move {
                instances::launch(d, &options, name, None, wait, false, &progress).await
            })
            .await?;
            write_frame(stream, &Response::Launched(view(d, row))).await?;
        }
        Request::StopInstance { name, force } => {
            let row = live_instance(d, &name)?;
            instances::check_power(d, &name, false)?;
            refuse_active_runs(d, &name, force, "stop")?;
            if force {
                // Its runs stop and push their last checkpoints before the power goes.
                instances::shut_down_agent(d, &name).await;
            }
            instances::power(d, &row.name, false).await?;
            let row =
                d.db.instance(&name)?
                    .ok_or_else(|| anyhow::anyhow!("instance {name} vanished"))?;
            write_frame(stream, &Response::Instance(view(d, row))).await?;
        }
        Request::StartInstance { name } => {
            live_instance(d, &name)?;
            instances::power(d, &name, true).await?;
            let row =
                d.db.instance(&name)?
                    .ok_or_else(|| anyhow::anyhow!("instance {name} vanished"))?;
            write_frame(stream, &Response::Instance(view(d, row))).await?;
        }
        Request::Run(req) => run(d, stream, *req).await?,
        Request::Logs {
            run,
            follow,
            after_seq,
            since_ms,
            tail,
            node,
        } => {
            let Some(row) = d.db.run(&run)? else {
                return Err(runs::not_found_run(&run).into());
            };
            let nodes = d.db.run_nodes(&row)?.len() as u32;
            if let Some(node) = node
                && node >= nodes
            {
                return Err(UserError::new(
                    ErrorCode::BadInput,
                    format!(
                        "run {run} has no node {node}: its nodes are 0 to {}",
                        nodes - 1
                    ),
                )
                .resolve(format!(
                    "leave --node out for every node's output: runctl-controller logs {run}"
                ))
                .into());
            }
            let start = d.db.start_after(&run, since_ms, tail)?;
            let from = Shown {
                after: after_seq.max(start),
                node,
            };
            // A compacted log says so even when the lines shown start after its notice.
            if after_seq == 0
                && let Some(notice) = d.db.compaction_notice(&run)?
                && notice.seq <= from.after
            {
                write_frame(stream, &Response::Event(notice)).await?;
            }
            let row = stream_events(d, stream, &run, follow, from).await?;
            write_frame(stream, &Response::Run(row)).await?;
        }
        Request::Top { run } => top(d, stream, run).await?,
        Request::Sync(req) => sync_request(d, stream, req).await?,
        Request::Stop { run, grace_secs } => {
            // Without --grace, the run's own grace period (from its spec) applies.
            let grace = grace_secs.map(Duration::from_secs);
            runs::stop(d, &run, grace).await?;
            let bound = grace.unwrap_or(STOP_BOUND) + Duration::from_secs(30);
            let row = wait_terminal(d, &run, bound).await?;
            write_frame(stream, &Response::Run(row)).await?;
        }
        Request::CheckpointDest { run } => {
            if d.db.run(&run)?.is_none() {
                return Err(UserError::new(ErrorCode::NotFound, format!("no run {run}"))
                    .resolve("list runs: runctl-controller list")
                    .into());
            }
            let dest = d.db.run_checkpoints(&run)?;
            write_frame(stream, &Response::CheckpointDest(dest)).await?;
        }
        Request::Terminate { name, force } => {
            live_instance(d, &name)?;
            // A RunPod cluster's pods end together.
            for member in instances::ended_with(d, &name)? {
                refuse_active_runs(d, &member, force, "terminate")?;
            }
            instances::terminate_now(d, &name).await?;
            let row =
                d.db.instance(&name)?
                    .ok_or_else(|| anyhow::anyhow!("instance {name} vanished"))?;
            write_frame(stream, &Response::Terminated(view(d, row))).await?;
        }
    }
    Ok(())
}

/// The instance `name`, unless it does not exist or is terminated.
fn live_instance(d: &Daemon, name: &InstanceName) -> anyhow::Result<crate::db::InstanceRow> {
    let row = d.db.instance(name)?.ok_or_else(|| {
        UserError::new(ErrorCode::NotFound, format!("no instance {name}"))
            .resolve("list instances: runctl-controller list")
    })?;
    if row.state == InstanceState::Terminated {
        return Err(
            UserError::new(ErrorCode::Conflict, format!("{name} is already terminated")).into(),
        );
    }
    Ok(row)
}

/// Refuses to `verb` an instance with active runs, unless `force`.
fn refuse_active_runs(
    d: &Daemon,
    name: &InstanceName,
    force: bool,
    verb: &str,
) -> anyhow::Result<()> {
    let active: Vec<RunId> =
        d.db.runs_on(name)?
            .into_iter()
            .filter(|r| !r.state.is_terminal())
            .map(|r| r.id)
            .collect();
    if !active.is_empty() && !force {
        let ids: Vec<String> = active.iter().map(|r| r.to_string()).collect();
        return Err(UserError::new(
            ErrorCode::Conflict,
            format!("{name} has active runs: {}", ids.join(", ")),
        )
        .resolve(format!(
            "stop them first: runctl-controller stop {}",
            ids[0]
        ))
        .resolve(format!(
            "or stop them with the instance: runctl-controller {verb} --force {name}"
        ))
        .into());
    }
    Ok(())
}

/// `sync`: checks the run can take it, then syncs, forwarding progress as it goes.
async fn sync_request(
    d: &Arc<Daemon>,
    stream: &mut UnixStream,
    req: SyncRequest,
) -> anyhow::Result<()> {
    let row =
        d.db.run(&req.run)?
            .ok_or_else(|| runs::not_found_run(&req.run))?;
    if matches!(row.state, RunState::Pending | RunState::Syncing) {
        return Err(UserError::new(
            ErrorCode::Conflict,
            format!("run {} is still starting", req.run),
        )
        .resolve("sync once it runs: runctl-controller list shows its state")
        .into());
    }
    if req.restart != Restart::Never && row.state.is_terminal() {
        return Err(UserError::new(
            ErrorCode::Conflict,
            format!(
                "run {} already ended ({}): there is no process to restart",
                req.run,
                crate::report::state_word(row.state)
            ),
        )
        .resolve("sync without --restart, or start a new run: runctl-controller run -- COMMAND")
        .into());
    }
    let nodes = d.db.run_nodes(&row)?;
    if nodes.len() > 1 && req.restart != Restart::Never {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!(
                "run {} has {} nodes: restarting their processes one by one would break the gang's rendezvous",
                req.run,
                nodes.len()
            ),
        )
        .resolve("sync without --restart, or stop the run and start it again with the new code")
        .into());
    }
    let mut links = Vec::with_capacity(nodes.len());
    for (node, name) in nodes.iter().enumerate() {
        let instance = d.db.instance(name)?;
        if instance
            .as_ref()
            .is_none_or(|i| i.state == crate::db::InstanceState::Terminated)
        {
            return Err(UserError::new(
                ErrorCode::Conflict,
                format!("the instance of run {} ({name}) is terminated", req.run),
            )
            .resolve("start a new run: runctl-controller run -- COMMAND")
            .into());
        }
        // A daemon that just started gives agents a moment to redial.
        let pid = instance.and_then(|i| i.pid);
        links.push((node as u32, d.wait_for_agent(name, AGENT_GRACE, pid).await?));
    }
    let link = links[0].1.clone();
    let root = req.root.unwrap_or_else(|| PathBuf::from(&row.root));
    if !root.is_dir() {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("the project root {} is not a directory", root.display()),
        )
        .resolve("pass the project with --root DIR")
        .into());
    }
    let params = sync::Params {
        run: req.run,
        node: 0,
        root,
        dry_run: req.dry_run,
        restart: req.restart,
        create: false,
    };
    if links.len() > 1 {
        // Node 0's report stands for the gang's: every node gets the same tree.
        let reports = sync::sync_nodes(d, &links, params).await?;
        write_frame(stream, &Response::Synced(reports[0].clone())).await?;
        return Ok(());
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let work = sync::sync(d, &link, params, move |p| {
        let _ = tx.send(p);
    });
    tokio::pin!(work);
    let report = loop {
        tokio::select! {
            report = &mut work => break report?,
            Some(p) = rx.recv() => write_frame(stream, &Response::SyncProgress(p)).await?,
        }
    };
    write_frame(stream, &Response::Synced(report)).await?;
    Ok(())
}

async fn run(d: &Arc<Daemon>, stream: &mut UnixStream, req: RunRequest) -> anyhow::Result<()> {
    if req.argv.is_empty() {
        return Err(UserError::new(ErrorCode::BadInput, "no command given")
            .resolve("put the command after `--`: runctl-controller run -- python train.py")
            .into());
    }
    if !req.root.is_dir() {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("the project root {} is not a directory", req.root.display()),
        )
        .resolve("pass an existing directory with --workdir, or run from inside the project")
        .into());
    }
    let run_id = RunId::from_random(rand::random());
    // Checked before anything is launched: bad input costs nothing.
    let stored = run_storage(d, &req, &run_id)?;
    if let Some(launch) = &req.launcher {
        launch
            .check_asked()
            .map_err(|e| UserError::new(ErrorCode::BadInput, e))?;
    }
    let nodes = req.launcher.as_ref().map_or(1, |l| l.nodes);
    crate::relaunch::check(
        req.on_interrupt,
        req.launch.spot(),
        req.on.is_none(),
        req.keep,
    )
    .map_err(|(why, fix)| UserError::new(ErrorCode::BadInput, why).resolve(fix))?;
    let mut gang = Vec::new();
    let mut launch_options = None;
    let (instance, launched, end) = match &req.on {
        Some(name) if nodes > 1 => {
            return Err(UserError::new(
                ErrorCode::BadInput,
                format!("--nodes {nodes} launches its instances; it cannot run on {name}"),
            )
            .resolve("drop --on to launch the nodes, or drop --nodes to run on it")
            .into());
        }
        Some(name) => {
            let row = d.db.instance(name)?.ok_or_else(|| {
                UserError::new(ErrorCode::NotFound, format!("no instance {name}"))
                    .resolve("list instances: runctl-controller list")
                    .resolve("or launch one: runctl-controller launch --provider local")
            })?;
            if row.state == crate::db::InstanceState::Terminated {
                return Err(
                    UserError::new(ErrorCode::Conflict, format!("{name} is terminated"))
                        .resolve("launch another: runctl-controller launch --provider local")
                        .into(),
                );
            }
            let cloud = d.db.cloud(name)?;
            if req.max_cost.is_some() && cloud.as_ref().and_then(|c| c.price_per_hour).is_none() {
                return Err(UserError::new(
                    ErrorCode::BadInput,
                    format!("--max-cost needs {name}'s price per hour, and it is not known"),
                )
                .resolve("cap the run's time with --max-hours instead")
                .into());
            }
            let spot = cloud.is_some_and(|c| c.spot);
            let end = plan::run_end(req.end, false, req.keep, spot, row.provider.capabilities())?;
            (row.name, false, end)
        }
        None => {
            let end = plan::run_end(
                req.end,
                true,
                req.keep,
                req.launch.spot(),
                req.launch.kind().capabilities(),
            )?;
            if nodes == 1 {
                write_frame(
                    stream,
                    &Response::Progress(format!("launching {}", req.launch.kind().an_instance())),
                )
                .await?;
            }
            let for_run = (!req.keep && !end.outlives_run).then(|| run_id.clone());
            let mut options = req.launch.clone();
            if let LaunchOptions::Ec2(opts) = &mut options {
                opts.project = req
                    .root
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
            }
            let needs_price = req.max_cost.is_some();
            launch_options = Some(options.clone());
            if nodes > 1 {
                let run_id = &run_id;
                gang = with_progress(stream, |progress| async move {
                    instances::launch_gang(
                        d,
                        &options,
                        run_id,
                        nodes,
                        for_run,
                        needs_price,
                        end.agent == protocol::EndAction::Stop || end.daemon_stops,
                        &progress,
                    )
                    .await
                })
                .await?;
                (gang[0].clone(), true, end)
            } else {
                let row = with_progress(stream, |progress| async move {
                    instances::launch(d, &options, None, for_run, true, needs_price, &progress)
                        .await
                })
                .await?;
                (row.name, true, end)
            }
        }
    };
    d.db.insert_run(&RunRow {
        id: run_id.clone(),
        instance: instance.clone(),
        argv: req.argv.clone(),
        root: req.root.display().to_string(),
        state: RunState::Pending,
        created_ms: now_ms(),
        started_ms: None,
        ended_ms: None,
        exit: None,
        error: None,
    })?;
    if !gang.is_empty() {
        d.db.insert_run_nodes(&run_id, &gang)?;
    }
    if end.daemon_stops {
        d.db.set_setting(&runs::stop_at_end_key(&run_id), "1")?;
    }
    let mut budget_words = None;
    if req.max_cost.is_some() || req.max_hours.is_some() {
        // An instance made for the run is paid for from its launch.
        let since_ms = match launched {
            true => {
                d.db.instance(&instance)?
                    .map_or(now_ms(), |row| row.created_ms)
            }
            false => now_ms(),
        };
        let budget = RunBudget {
            max_cost: req.max_cost,
            max_ms: req.max_hours.map(protocol::budget::hours_ms),
            since_ms,
        };
        d.db.set_run_budget(&run_id, &budget)?;
        let price = d.db.cloud(&instance)?.and_then(|c| c.price_per_hour);
        budget_words = Some(plan::budget(&budget, price, now_ms()).caps_words());
    }
    let spec = RunSpec {
        run: run_id.clone(),
        argv: req.argv,
        env: req.env,
        cwd: req.cwd,
        setup: req.setup,
        restart: req.restart,
        stop_grace_ms: req
            .stop_grace_secs
            .map(Duration::from_secs)
            .unwrap_or(d.config.daemon.stop_grace())
            .as_millis() as u64,
        end: end.agent,
        spot_signal: req.spot_signal,
        storage: stored.storage,
        data: req.data,
        pull_alongside: req.pull_alongside,
        checkpoints: stored.checkpoints,
        resume_from: stored.resume_from,
    };
    if let Some(push) = &spec.checkpoints {
        d.db.set_run_checkpoints(&run_id, &push.dest)?;
    }
    let d2 = d.clone();
    let (run2, root) = (run_id.clone(), req.root);
    let placed = match gang.is_empty() {
        true => vec![instance.clone()],
        false => gang,
    };
    let gang_words = (placed.len() > 1).then(|| {
        let nodes: Vec<String> = placed
            .iter()
            .enumerate()
            .map(|(node, name)| format!("{node} on {name}"))
            .collect();
        format!("nodes: {}", nodes.join(", "))
    });
    let start = runs::Start {
        nodes: placed,
        root,
        spec,
        secrets: req.secrets,
        launch: req.launcher.clone(),
        all_checkpoints: req.checkpoints_from_all,
        on_interrupt: req.on_interrupt,
        launch_options,
    };
    d.tasks.spawn(runs::start(d2, run2, start));
    // Started before the client hears of it: a client gone by now (Ctrl-C twice during a
    // launch) leaves a run going, whose end ends an instance launched for it, rather than
    // a paid instance nobody runs anything on.
    write_frame(
        stream,
        &Response::RunAccepted {
            run: run_id.clone(),
            instance,
            launched,
        },
    )
    .await?;
    if let Some(words) = gang_words {
        write_frame(stream, &Response::Progress(words)).await?;
    }
    if let Some(words) = budget_words {
        write_frame(stream, &Response::Progress(format!("budget: {words}"))).await?;
    }
    if let Some(launch) = &req.launcher {
        let words = format!("launcher: {}", launch.words());
        write_frame(stream, &Response::Progress(words)).await?;
    }

    if req.detach {
        let row = wait_started(d, stream, &run_id).await?;
        write_frame(stream, &Response::Run(row)).await?;
        return Ok(());
    }
    let row = stream_events(d, stream, &run_id, true, Shown::default()).await?;
    write_frame(stream, &Response::Run(row)).await?;
    Ok(())
}

/// The storage side of a run spec, checked.
struct RunStorage {
    storage: Option<StoreSpec>,
    checkpoints: Option<CheckpointPush>,
    resume_from: Option<String>,
}

fn run_storage(d: &Arc<Daemon>, req: &RunRequest, run: &RunId) -> Result<RunStorage, UserError> {
    let bad = |message: String| UserError::new(ErrorCode::BadInput, message);
    for source in &req.data {
        ObjectUrl::parse(&source.source).map_err(|e| {
            bad(format!("data source: {e}")).resolve("name data as --data s3://BUCKET/PREFIX=DEST")
        })?;
        if !source.dest.is_empty() {
            protocol::manifest::check_path(&source.dest).map_err(|e| {
                bad(format!("data destination {:?}: {e}", source.dest)).resolve(
                    "give a relative path inside the data dir, e.g. --data s3://b/train=train",
                )
            })?;
        }
    }
    let base = match &req.checkpoints {
        Some(url) if url.is_empty() => None,
        Some(url) => Some(url.clone()),
        None => d.config.storage.checkpoints(),
    };
    let checkpoints = base
        .map(|base| {
            let url = ObjectUrl::parse(&base).map_err(|e| {
                bad(format!("checkpoint destination: {e}"))
                    .resolve("give --checkpoints s3://BUCKET/PREFIX, or set [storage] checkpoints")
            })?;
            Ok::<_, UserError>(CheckpointPush {
                dest: url
                    .with_key(format!("{}{run}/", url.as_prefix()))
                    .to_string(),
                keep: req
                    .keep_checkpoints
                    .unwrap_or(d.config.storage.keep_checkpoints),
            })
        })
        .transpose()?;
    let resume_from = match &req.resume_from {
        None => None,
        Some(from) if from.starts_with("s3://") => {
            let url = ObjectUrl::parse(from).map_err(|e| bad(format!("--resume-from: {e}")))?;
            Some(url.with_key(url.as_prefix()).to_string())
        }
        Some(from) => {
            let earlier: RunId = from.parse().map_err(|e| {
                bad(format!("--resume-from {from:?}: {e}"))
                    .resolve("give a run id (see `list`) or an s3:// checkpoint prefix")
            })?;
            let url = d
                .db
                .run_checkpoints(&earlier)
                .map_err(|e| UserError::new(ErrorCode::Internal, format!("{e:#}")))?
                .ok_or_else(|| {
                    UserError::new(
                        ErrorCode::NotFound,
                        format!("run {earlier} pushed no checkpoints here, so there is nothing to resume from"),
                    )
                    .resolve("check the run id with `runctl-controller list`")
                    .resolve("or give the checkpoint prefix itself: --resume-from s3://BUCKET/PREFIX/RUN/")
                })?;
            Some(url)
        }
    };
    let needs_store = !req.data.is_empty() || checkpoints.is_some() || resume_from.is_some();
    let caps = match &req.on {
        Some(name) => {
            d.db.instance(name)
                .ok()
                .flatten()
                .map(|row| row.provider.capabilities())
        }
        None => Some(req.launch.kind().capabilities()),
    };
    let remote = caps.is_some_and(|c| c.remote);
    let access = match caps {
        Some(c) if !c.own_store_credentials => match crate::credentials::Source::of(&d.config) {
            Some(_) => plan::StoreAccess::Handed,
            None => plan::StoreAccess::Nothing,
        },
        Some(_) | None => plan::StoreAccess::Own,
    };
    let storage = plan::run_store(
        d.config.storage.spec(d.home.root()),
        needs_store,
        remote,
        access,
    )?;
    Ok(RunStorage {
        storage,
        checkpoints,
        resume_from,
    })
}

/// Reports phases until the run's process has started (or the run ended).
async fn wait_started(
    d: &Arc<Daemon>,
    stream: &mut UnixStream,
    run: &RunId,
) -> anyhow::Result<RunRow> {
    let mut changes = d.run_watch(run);
    let mut last_state = None;
    loop {
        changes.borrow_and_update();
        let row = d.db.run(run)?.ok_or_else(|| runs::not_found_run(run))?;
        announce_phase(d, stream, run, &mut last_state, row.state).await?;
        if row.state == RunState::Running || row.state.is_terminal() {
            return Ok(row);
        }
        if changes.changed().await.is_err() {
            return Ok(row);
        }
    }
}

/// Tells the client about a new phase of the run, once per state, and what the first
/// sync sent once it is over.
async fn announce_phase(
    d: &Daemon,
    stream: &mut UnixStream,
    run: &RunId,
    last: &mut Option<RunState>,
    state: RunState,
) -> anyhow::Result<()> {
    let syncing =
        |s: Option<RunState>| matches!(s, None | Some(RunState::Pending | RunState::Syncing));
    if *last != Some(state)
        && syncing(*last)
        && !syncing(Some(state))
        && let Some(report) =
            d.db.setting(&runs::first_sync_key(run))?
                .and_then(|json| serde_json::from_str::<crate::ipc::SyncReport>(&json).ok())
    {
        write_frame(
            stream,
            &Response::Progress(crate::report::first_sync_line(&report)),
        )
        .await?;
    }
    if *last != Some(state) {
        if let Some(phase) = phase_message(state) {
            write_frame(stream, &Response::Progress(phase.into())).await?;
        }
        *last = Some(state);
    }
    Ok(())
}

fn phase_message(state: RunState) -> Option<&'static str> {
    match state {
        RunState::Syncing => Some("uploading the work dir"),
        RunState::SettingUp => Some("setting up"),
        RunState::PullingData => Some("pulling data"),
        RunState::Running => Some("running"),
        _ => None,
    }
}

/// Sends the run's stored events, and with `follow` keeps sending new ones until the run
/// has ended and its last event went out. Returns the final row.
/// Which of a run's events a stream shows: those after `after` (a `shown` number), of
/// `node` alone or of every node.
#[derive(Debug, Clone, Copy, Default)]
struct Shown {
    after: u64,
    node: Option<u32>,
}

async fn stream_events(
    d: &Arc<Daemon>,
    stream: &mut UnixStream,
    run: &RunId,
    follow: bool,
    from: Shown,
) -> anyhow::Result<RunRow> {
    let mut changes = d.run_watch(run);
    let mut after = from.after;
    // A gang's events say their node.
    let gang = match d.db.run(run)? {
        Some(row) => d.db.run_nodes(&row)?.len() > 1,
        None => false,
    };
    let mut last_state = None;
    loop {
        changes.borrow_and_update();
        // The state is read before the events: a run seen as ended has all of its events
        // stored already (they land in the same transaction that ends it).
        let row = d.db.run(run)?.ok_or_else(|| runs::not_found_run(run))?;
        if follow {
            announce_phase(d, stream, run, &mut last_state, row.state).await?;
        }
        loop {
            let events = d.db.node_events_after(run, after, PAGE, from.node)?;
            let Some((_, last)) = events.last() else {
                break;
            };
            after = last.seq;
            for (node, event) in events {
                let frame = match gang {
                    true => Response::NodeEvent { node, event },
                    false => Response::Event(event),
                };
                write_frame(stream, &frame).await?;
            }
        }
        if !follow || row.state.is_terminal() {
            return Ok(row);
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return Ok(row) },
            () = d.shutdown.cancelled() => anyhow::bail!(UserError::new(
                ErrorCode::DaemonUnavailable,
                "the daemon is stopping; the run goes on",
            ).resolve(format!("follow it again: runctl-controller logs -f {run}"))),
        }
    }
}

/// Streams the latest resource samples (of one run's instance, with only that run's
/// processes, when `run` is given) until the client goes away or the run ends.
async fn top(d: &Arc<Daemon>, stream: &mut UnixStream, run: Option<RunId>) -> anyhow::Result<()> {
    let row = match &run {
        Some(run) => Some(d.db.run(run)?.ok_or_else(|| runs::not_found_run(run))?),
        None => None,
    };
    if let Some(row) = &row
        && row.state.is_terminal()
    {
        return Err(UserError::new(
            ErrorCode::Conflict,
            format!(
                "run {} already ended ({})",
                row.id,
                crate::report::state_word(row.state)
            ),
        )
        .resolve(format!("see its output: runctl-controller logs {}", row.id))
        .into());
    }
    // A gang's every node.
    let nodes = match &row {
        Some(row) => Some(d.db.run_nodes(row)?),
        None => None,
    };
    let mut changes = d.stats_changed.subscribe();
    let mut run_changes = run.as_ref().map(|r| d.run_watch(r));
    loop {
        changes.borrow_and_update();
        let mut shown: Vec<InstanceStats> = d
            .stats
            .lock()
            .expect("stats lock")
            .iter()
            .filter(|(name, _)| nodes.as_ref().is_none_or(|n| n.contains(name)))
            .map(|(name, sample)| InstanceStats {
                instance: name.clone(),
                sample: (**sample).clone(),
                disk: d.disk.lock().expect("disk lock").get(name).cloned(),
            })
            .collect();
        shown.sort_by(|a, b| a.instance.cmp(&b.instance));
        if let Some(run) = &run {
            for s in &mut shown {
                s.sample.runs.retain(|r| &r.run == run);
            }
        }
        if !shown.is_empty() {
            write_frame(stream, &Response::Stats(shown)).await?;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return Ok(()) },
            ended = async { run_changes.as_mut().expect("guarded").changed().await }, if run_changes.is_some() => {
                let now = run.as_ref().and_then(|r| d.db.run(r).ok().flatten());
                if ended.is_err() || now.as_ref().is_none_or(|row| row.state.is_terminal()) {
                    if let Some(row) = now {
                        write_frame(stream, &Response::Run(row)).await?;
                    }
                    return Ok(());
                }
            }
            () = d.shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Waits until the run is over, bounded.
async fn wait_terminal(d: &Arc<Daemon>, run: &RunId, bound: Duration) -> anyhow::Result<RunRow> {
    let mut changes = d.run_watch(run);
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        changes.borrow_and_update();
        let row = d.db.run(run)?.ok_or_else(|| runs::not_found_run(run))?;
        if row.state.is_terminal() {
            return Ok(row);
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            return Err(UserError::new(
                ErrorCode::Agent,
                format!("run {run} was asked to stop but has not ended within {bound:?}"),
            )
            .resolve(format!("check on it: runctl-controller logs {run}"))
            .into());
        }
    }
}
