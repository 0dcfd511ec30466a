//! Cloud instances as the daemon drives them (EC2): a launch checked end to end before it
//! costs anything, reported phase by phase; stop, start and terminate; what they cost.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::agent_config::AgentConfigFile;
use protocol::{InstanceName, RunId};

use super::{Daemon, now_ms};
use crate::db::{CloudRow, InstanceRow, InstanceState};
use crate::error::{ErrorCode, UserError};
use crate::provider::ProviderKind;
use crate::provider::ec2::{
    self, DataVolume, Ec2, Ec2Launch, LaunchPlan, artifact, ids, prices, userdata,
};

/// Phase lines for the CLI (stderr), as the launch goes.
pub(super) type Progress = tokio::sync::mpsc::UnboundedSender<String>;

/// How often a launch asks EC2 for the instance's state.
const POLL: Duration = Duration::from_secs(2);

/// How long a new instance may be missing from DescribeInstances (EC2's reads are
/// eventually consistent) before its absence means it is gone.
const CONSISTENCY: Duration = Duration::from_secs(300);

fn internal(e: anyhow::Error) -> UserError {
    UserError::new(ErrorCode::Internal, format!("{e:#}"))
}

pub(super) async fn client(d: &Daemon) -> Result<&Ec2, UserError> {
    d.ec2.get_or_try_init(|| Ec2::connect(&d.config.ec2)).await
}

fn say(progress: &Progress, line: impl Into<String>) {
    let _ = progress.send(line.into());
}

/// What agents dial, checked against where the daemon listens: the direct endpoint (UDP
/// and TCP) when it can be reached, and the relay when one is configured.
fn controller_endpoints(d: &Daemon) -> Result<Vec<protocol::path::Endpoint>, UserError> {
    let relay = d.config.daemon.relay.as_deref();
    let endpoint = match (d.config.ec2.controller_endpoint.clone(), relay) {
        (Some(endpoint), _) => endpoint,
        // With a relay the daemon needs no address of its own that instances can reach.
        (None, Some(_)) => return Ok(super::carriers::agent_endpoints(None, relay)),
        (None, None) => {
            return Err(UserError::new(
                ErrorCode::BadInput,
                "[ec2] controller_endpoint is not set: instances need an address of this daemon they can reach",
            )
            .resolve(format!(
                "set controller_endpoint = \"HOST:{}\" under [ec2] in config.toml (a public address, a forwarded port, a VPN address)",
                d.quic_addr.port()
            ))
            .resolve("or set relay = \"HOST:PORT\" under [daemon] to reach instances through a runctl-relay (see the README's reachability section)"));
        }
    };
    let (host, _) = endpoint.rsplit_once(':').unwrap_or((&endpoint, ""));
    let loopback_endpoint = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if d.quic_addr.ip().is_loopback() && !loopback_endpoint {
        if relay.is_some() {
            // Unreachable directly, but the relay serves: agents are not told the direct way.
            return Ok(super::carriers::agent_endpoints(None, relay));
        }
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!(
                "the daemon listens on {} only, which instances cannot reach through {endpoint}",
                d.quic_addr
            ),
        )
        .resolve(format!(
            "set listen = \"0.0.0.0:{}\" under [daemon] in config.toml and restart it (runctl-controller shutdown)",
            d.quic_addr.port()
        ))
        .resolve("or set relay = \"HOST:PORT\" under [daemon] to reach instances through a runctl-relay"));
    }
    Ok(super::carriers::agent_endpoints(Some(&endpoint), relay))
}

/// The agent binary to install: `[ec2] agent_binary`, else `runctl-agent` beside this
/// executable; a static x86_64 ELF.
fn agent_binary(d: &Daemon) -> Result<PathBuf, UserError> {
    artifact::static_binary(
        d.config.ec2.agent_binary.as_deref(),
        "runctl-agent",
        "build it: scripts/build-static-agent.sh, then set agent_binary under [ec2] in config.toml to the path it prints",
    )
}

/// Launches an EC2 instance whose cloud-init installs the agent; with `wait`, returns once
/// the agent has enrolled. A failure before RunInstances leaves nothing behind; one after
/// it terminates the instance.
pub(super) async fn launch(
    d: &Arc<Daemon>,
    name: InstanceName,
    for_run: Option<RunId>,
    opts: &Ec2Launch,
    wait: bool,
    progress: &Progress,
) -> Result<InstanceRow, UserError> {
    let started = Instant::now();
    let cfg = &d.config.ec2;
    let endpoints = controller_endpoints(d)?;
    if let Some(snapshot) = &opts.volume_snapshot {
        ids::check_id(snapshot, "snap").map_err(|e| UserError::new(ErrorCode::BadInput, e))?;
    }
    if let Some(gb) = opts.volume_gb
        && !(1..=16384).contains(&gb)
    {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("--volume-size {gb}: a volume is 1 to 16384 GiB"),
        ));
    }
    if let Some(price) = opts.max_price
        && !(price.is_finite() && price > 0.0)
    {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("--max-price {price} is not a positive price"),
        ));
    }
    let agent_path = agent_binary(d)?;
    let artifacts = artifact::location(&d.config)?;
    let ec2 = client(d).await?;
    let kind = opts.instance_type.as_str();
    let info = ec2.instance_type(kind).await?;
    let image = ec2
        .image(
            opts.ami.as_deref().or(cfg.ami.as_deref()),
            &cfg.ami_name,
            &cfg.ami_owner,
        )
        .await?;
    if let Some(snapshot) = &opts.volume_snapshot {
        ec2.snapshot_size(snapshot).await?;
    }
    let running = ec2.running_count().await?;
    if running >= cfg.max_running as usize {
        return Err(UserError::new(
            ErrorCode::Conflict,
            format!("{running} runctl instances are running in {}, the limit is {}", ec2.region, cfg.max_running),
        )
        .resolve("terminate one you no longer need: runctl-controller list, then runctl-controller terminate NAME")
        .resolve("or raise max_running under [ec2] in config.toml"));
    }
    let on_demand = prices::on_demand(kind, &cfg.prices);
    let spot_now = if opts.spot {
        ec2.spot_price(kind).await?
    } else {
        None
    };
    let max_price = opts.max_price.or(on_demand.as_ref().map(|p| p.per_hour));
    say(
        progress,
        format!(
            "{kind}: {}, {} vCPU, {:.0} GiB; AMI {} ({})",
            info.gpus.clone().unwrap_or_else(|| "no GPU".into()),
            info.vcpus,
            info.memory_gib,
            image.id,
            image.name
        ),
    );
    say(
        progress,
        match &on_demand {
            Some(p) => format!("on-demand {}/h ({})", prices::dollars(p.per_hour), p.source),
            None => format!("on-demand price of {kind} unknown (add it under [ec2.prices])"),
        },
    );
    if opts.spot {
        match (&spot_now, max_price) {
            (Some((now, zone)), Some(max)) if *now > max && !opts.spot_fallback => {
                return Err(UserError::new(
                    ErrorCode::Conflict,
                    format!("the spot price of {kind} is {}/h ({zone}), above the maximum {}/h", prices::dollars(*now), prices::dollars(max)),
                )
                .resolve("raise it with --max-price, launch on-demand (without --spot), or allow --spot-fallback"));
            }
            (Some((now, zone)), _) => say(
                progress,
                format!(
                    "spot now {}/h in {zone}; maximum {}",
                    prices::dollars(*now),
                    max_price.map_or("the on-demand price".into(), |m| format!(
                        "{}/h",
                        prices::dollars(m)
                    ))
                ),
            ),
            (None, _) => say(progress, "no spot price history for this type here"),
        }
    }
    let security_group = ec2.security_group(cfg.subnet.as_deref()).await?;
    let (agent_url, agent_sha256) = artifact::publish(
        &d.config.storage.store_config(d.home.root()),
        &agent_path,
        &artifacts,
        "agent",
        Duration::from_secs(cfg.presign_secs),
    )
    .await?;
    say(progress, format!("agent {} published", &agent_sha256[..12]));

    // From here on there is a record: a failure marks it terminated.
    let row = InstanceRow {
        name: name.clone(),
        provider: ProviderKind::Ec2,
        state: InstanceState::Launching,
        created_ms: now_ms(),
        terminated_ms: None,
        pid: None,
        for_run: for_run.clone(),
    };
    d.db.insert_instance(&row).map_err(internal)?;
    let forget = |d: &Daemon| {
        let _ =
            d.db.set_instance_state(&name, InstanceState::Terminated, now_ms());
    };
    let ttl = d
        .config
        .daemon
        .token_ttl()
        .max(Duration::from_secs(cfg.enroll_timeout_secs));
    let token = match d.db.mint_token(&name, now_ms() + ttl.as_millis() as u64) {
        Ok(token) => token,
        Err(e) => {
            forget(d);
            return Err(internal(e));
        }
    };
    let mut agent_config = AgentConfigFile {
        instance: name.clone(),
        controller: endpoints,
        ca_sha256: d.pki.ca.fingerprint(),
        token,
        state_dir: PathBuf::from("state"),
        stats_interval_ms: None,
        nvidia_smi: None,
        idle_timeout_secs: cfg.idle_timeout_secs,
        poweroff_command: Some(vec!["systemctl".into(), "poweroff".into()]),
        metadata_endpoint: Some("http://169.254.169.254".into()),
        log_max_bytes: None,
        keep_runs: None,
        disk_budget: None,
        min_free: None,
        keep_local_checkpoints: None,
    };
    d.config.agent.write_into(&mut agent_config);
    let user_data = match userdata::render(&userdata::Params {
        config: &agent_config,
        agent_url: &agent_url,
        agent_sha256: &agent_sha256,
    }) {
        Ok(text) => text,
        Err(e) => {
            forget(d);
            return Err(UserError::new(
                ErrorCode::Internal,
                format!("rendering the user-data: {e}"),
            ));
        }
    };
    let mut tags = vec![
        ("Name".to_owned(), format!("runctl-{name}")),
        (ec2::MANAGED_TAG.to_owned(), "true".to_owned()),
        (ec2::INSTANCE_TAG.to_owned(), name.to_string()),
    ];
    if let Some(run) = &for_run {
        tags.push((ec2::RUN_TAG.to_owned(), run.to_string()));
    }
    if let Some(project) = &opts.project {
        tags.push((ec2::PROJECT_TAG.to_owned(), project.clone()));
    }
    if let Ok(user) = std::env::var("USER") {
        tags.push((ec2::USER_TAG.to_owned(), user));
    }
    let plan = LaunchPlan {
        instance_type: kind.to_owned(),
        image,
        security_group,
        subnet: cfg.subnet.clone(),
        user_data,
        tags,
        spot: opts.spot.then_some(max_price),
        instance_profile: opts
            .instance_profile
            .clone()
            .or(cfg.instance_profile.clone()),
        root_gb: cfg.root_volume_gb,
        data_volume: (opts.volume_gb.is_some() || opts.volume_snapshot.is_some()).then(|| {
            DataVolume {
                size_gb: opts.volume_gb,
                snapshot: opts.volume_snapshot.clone(),
                keep: opts.keep_volume,
            }
        }),
        client_token: format!("runctl-{name}"),
    };
    let api_start = Instant::now();
    let launched = match ec2.run_instance(&plan, opts.spot).await {
        Ok(instance) => instance,
        Err(e) if opts.spot && opts.spot_fallback && e.code == ErrorCode::Conflict => {
            say(
                progress,
                format!(
                    "WARNING: no spot capacity ({}); launching ON-DEMAND instead, as --spot-fallback allows",
                    e.message
                ),
            );
            match ec2.run_instance(&plan, false).await {
                Ok(instance) => instance,
                Err(e) => {
                    forget(d);
                    return Err(e);
                }
            }
        }
        Err(e) => {
            forget(d);
            return Err(e);
        }
    };
    let price = if launched.spot {
        spot_now.map(|(p, _)| p).or(max_price)
    } else {
        on_demand.map(|p| p.per_hour)
    };
    let cloud = CloudRow {
        name: name.clone(),
        cloud_id: launched.id.clone(),
        region: ec2.region.clone(),
        instance_type: kind.to_owned(),
        spot: launched.spot,
        price_per_hour: price,
        accrued_ms: 0,
        running_since_ms: Some(now_ms()),
    };
    if let Err(e) = d.db.insert_cloud(&cloud) {
        // Without the record nothing would ever terminate it: do it now.
        let _ = ec2.terminate(&launched.id).await;
        forget(d);
        return Err(internal(e));
    }
    say(
        progress,
        format!(
            "  {:<16}{:>7}  {} in {} ({})",
            "requested",
            seconds(api_start.elapsed()),
            launched.id,
            launched.zone,
            if launched.spot { "spot" } else { "on-demand" }
        ),
    );
    if !wait {
        // Nobody waits, but an instance that never enrolls is still ended in time.
        let (d2, name2, id) = (d.clone(), name.clone(), launched.id.clone());
        d.tasks.spawn(async move {
            let (quiet, _) = tokio::sync::mpsc::unbounded_channel();
            tokio::select! {
                () = d2.shutdown.cancelled() => {}
                _ = come_up_or_go(&d2, &name2, &id, started, &quiet) => {}
            }
        });
        return d
            .db
            .instance(&name)
            .map_err(internal)?
            .ok_or_else(|| internal(anyhow::anyhow!("instance {name} vanished")));
    }
    come_up_or_go(d, &name, &launched.id, started, progress).await?;
    say(
        progress,
        format!("  {:<16}{:>7}", "ready", seconds(started.elapsed())),
    );
    d.db.instance(&name)
        .map_err(internal)?
        .ok_or_else(|| internal(anyhow::anyhow!("instance {name} vanished")))
}

/// Waits for the instance to run and its agent to enroll; an instance that does not is
/// terminated, so a failed launch never leaves a paid machine behind.
async fn come_up_or_go(
    d: &Arc<Daemon>,
    name: &InstanceName,
    id: &str,
    started: Instant,
    progress: &Progress,
) -> Result<(), UserError> {
    let ec2 = client(d).await?;
    let Err(e) = wait_until_enrolled(d, ec2, name, id, started, progress).await else {
        return Ok(());
    };
    // Stopped or terminated through runctl meanwhile: the user's call, not a failure.
    if let Ok(Some(row)) = d.db.instance(name)
        && matches!(
            row.state,
            InstanceState::Stopped | InstanceState::Terminated
        )
    {
        tracing::info!(
            "{name} ({id}) was {} meanwhile: no longer waiting for its agent",
            crate::report::instance_word(row.state)
        );
        return Err(e);
    }
    say(
        progress,
        format!("terminating {id} ({name}): it did not come up"),
    );
    tracing::warn!("terminating {id} ({name}): {}", e.message);
    if let Err(t) = ec2.terminate(id).await {
        tracing::error!(
            "terminating {id} after a failed launch failed: {}",
            t.message
        );
        return Err(e.resolve(format!(
            "it may still be running: terminate it with runctl-controller terminate {name}"
        )));
    }
    super::runs::record_terminated(d, name, now_ms());
    Err(e)
}

fn seconds(elapsed: Duration) -> String {
    format!("{:.1}s", elapsed.as_secs_f64())
}

/// Polls EC2 until the instance runs, then waits for its agent; says each phase.
async fn wait_until_enrolled(
    d: &Arc<Daemon>,
    ec2: &Ec2,
    name: &InstanceName,
    id: &str,
    started: Instant,
    progress: &Progress,
) -> Result<(), UserError> {
    let timeout = Duration::from_secs(d.config.ec2.enroll_timeout_secs);
    let mut last = String::new();
    loop {
        // Right after RunInstances, EC2 may not list the instance yet (its reads are
        // eventually consistent): absent counts as pending for a while.
        let absent = if started.elapsed() < CONSISTENCY {
            "pending"
        } else {
            "terminated"
        };
        let state = ec2.instance(id).await?;
        let (state, reason) = state.map_or((absent.into(), None), |i| (i.state, i.reason));
        if state != last {
            say(
                progress,
                format!("  {:<16}{:>7}", state, seconds(started.elapsed())),
            );
            last = state.clone();
        }
        match state.as_str() {
            "running" => break,
            "pending" => {}
            other => {
                return Err(UserError::new(
                    ErrorCode::Conflict,
                    format!(
                        "{id} went {other} while starting{}",
                        reason.map(|r| format!(": {r}")).unwrap_or_default()
                    ),
                )
                .resolve("for spot, try another type or zone, or launch on-demand"));
            }
        }
        if started.elapsed() > timeout {
            return Err(UserError::new(
                ErrorCode::Conflict,
                format!("{id} did not reach running within {timeout:?}"),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    let left = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_secs(30));
    d.wait_for_agent(name, left, None).await.map_err(|e| {
        UserError::new(
            ErrorCode::Agent,
            format!(
                "the agent of {name} ({id}) did not enroll within {timeout:?}: {}",
                e.message
            ),
        )
        .resolve(format!(
            "check that {} is reachable from the instance (UDP or TCP), or that the relay is registered (runctl-controller status)",
            d.config
                .ec2
                .controller_endpoint
                .as_deref()
                .or(d.config.daemon.relay.as_deref())
                .unwrap_or("[ec2] controller_endpoint")
        ))
        .resolve(format!(
            "read its boot log: aws ec2 get-console-output --instance-id {id} --region {}",
            ec2.region
        ))
    })?;
    say(
        progress,
        format!(
            "  {:<16}{:>7}",
            "agent enrolled",
            seconds(started.elapsed())
        ),
    );
    Ok(())
}

/// Terminates the cloud side of `name`, if it has one.
pub(super) async fn terminate(d: &Daemon, name: &InstanceName) -> Result<(), UserError> {
    let Some(cloud) = d.db.cloud(name).map_err(internal)? else {
        return Ok(());
    };
    // Billed time ends in `runs::record_terminated`.
    client(d).await?.terminate(&cloud.cloud_id).await
}

/// The cloud record of `name`, if EC2 can stop or start it (an on-demand EC2 instance)
/// and it is not already where `running` would take it.
pub(super) fn powerable(
    d: &Daemon,
    name: &InstanceName,
    running: bool,
) -> Result<CloudRow, UserError> {
    let cloud = d.db.cloud(name).map_err(internal)?.ok_or_else(|| {
        UserError::new(
            ErrorCode::Conflict,
            format!("{name} is not a cloud instance: stop and start apply to EC2 instances"),
        )
        .resolve(format!(
            "terminate it instead: runctl-controller terminate {name}"
        ))
    })?;
    if cloud.spot {
        return Err(UserError::new(
            ErrorCode::Conflict,
            format!("{name} is a spot instance: EC2 can only terminate it, not stop it"),
        )
        .resolve(format!("terminate it: runctl-controller terminate {name}")));
    }
    let stopped =
        d.db.instance(name)
            .map_err(internal)?
            .is_some_and(|row| row.state == InstanceState::Stopped);
    match (running, stopped) {
        (true, false) => Err(UserError::new(
            ErrorCode::Conflict,
            format!("{name} is not stopped"),
        )),
        (false, true) => Err(UserError::new(
            ErrorCode::Conflict,
            format!("{name} is already stopped"),
        )
        .resolve(format!("start it: runctl-controller start {name}"))),
        _ => Ok(cloud),
    }
}

/// Stops (`running` false) or starts a cloud instance, keeping its billed time.
pub(super) async fn power(d: &Daemon, name: &InstanceName, running: bool) -> Result<(), UserError> {
    let cloud = powerable(d, name, running)?;
    let ec2 = client(d).await?;
    let before =
        d.db.instance(name)
            .map_err(internal)?
            .map_or(InstanceState::Launching, |row| row.state);
    let after = if running {
        InstanceState::Launching
    } else {
        InstanceState::Stopped
    };
    // Recorded first: a launch's enrollment watch must see a stop as the user's doing.
    d.db.set_instance_state(name, after, now_ms())
        .map_err(internal)?;
    let call = if running {
        ec2.start(&cloud.cloud_id).await
    } else {
        ec2.stop(&cloud.cloud_id).await
    };
    if let Err(e) = call {
        let _ = d.db.set_instance_state(name, before, now_ms());
        return Err(e);
    }
    d.db.set_cloud_running(name, running, now_ms())
        .map_err(internal)
}

/// Brings cloud records up to date with EC2 (instances gone by spot reclaim, power-off or
/// the console are marked terminated) and returns runctl-tagged instances this controller
/// does not know. Without live EC2 records or `[ec2]` settings, EC2 is not asked.
pub(super) async fn refresh(
    d: &Arc<Daemon>,
) -> Result<Vec<crate::ipc::ForeignInstance>, UserError> {
    let rows = d.db.instances().map_err(internal)?;
    let live: Vec<InstanceRow> = rows
        .iter()
        .filter(|r| r.provider == ProviderKind::Ec2 && r.state != InstanceState::Terminated)
        .cloned()
        .collect();
    if live.is_empty() && d.config.ec2.controller_endpoint.is_none() {
        return Ok(Vec::new());
    }
    let ec2 = client(d).await?;
    let cloud = tokio::time::timeout(Duration::from_secs(15), ec2.instances(&[]))
        .await
        .map_err(|_| UserError::new(ErrorCode::Internal, "EC2 did not answer within 15 s"))??;
    let now = now_ms();
    let records = d.db.clouds().map_err(internal)?;
    for row in &live {
        let Some(record) = records.iter().find(|c| c.name == row.name) else {
            continue;
        };
        let young = now.saturating_sub(row.created_ms) < CONSISTENCY.as_millis() as u64;
        let state = match cloud.iter().find(|c| c.id == record.cloud_id) {
            Some(c) => c.state.as_str(),
            // Not listed yet, or long gone (EC2 forgets terminated instances after a while).
            None if young => continue,
            None => "terminated",
        };
        match state {
            "terminated" | "shutting-down" => {
                let _ = d.db.set_cloud_running(&row.name, false, now);
                let _ = d.db.revoke_instance(&row.name, now);
                let _ =
                    d.db.set_instance_state(&row.name, InstanceState::Terminated, now);
            }
            "stopped" | "stopping" => {
                let _ = d.db.set_cloud_running(&row.name, false, now);
                let _ =
                    d.db.set_instance_state(&row.name, InstanceState::Stopped, now);
            }
            _ => {}
        }
    }
    Ok(cloud
        .into_iter()
        .filter(|c| c.state != "terminated" && !records.iter().any(|r| r.cloud_id == c.id))
        .map(|c| crate::ipc::ForeignInstance {
            cloud_id: c.id,
            name: c.name,
            state: c.state,
            instance_type: c.instance_type,
        })
        .collect())
}
