//! An EC2 launch, in the steps `daemon::instances` calls between its provider-neutral
//! ones: `prepare` checks everything against EC2 before anything costs (type, image,
//! limit, price, security group) and publishes the agent; `start` renders the user-data
//! and calls RunInstances; `wait_running` polls until EC2 says the instance runs. None of
//! them touches the daemon's records: the caller writes what they return.

use std::path::Path;
use std::time::{Duration, Instant};

use protocol::agent_config::AgentConfigFile;
use protocol::{InstanceName, RunId};

use super::{DataVolume, Ec2, Ec2Gang, Ec2Launch, Image, LaunchPlan, plan, prices, userdata};
use crate::config::Config;
use crate::error::{ErrorCode, UserError};
use crate::provider::artifact;
use crate::provider::{Progress, say, seconds};

/// How often a launch asks EC2 for the instance's state.
const POLL: Duration = Duration::from_secs(2);

/// What `prepare` found, for `start`.
#[derive(Debug, Clone)]
pub struct Prepared {
    opts: Ec2Launch,
    image: Image,
    security_group: String,
    agent_url: String,
    agent_sha256: String,
    spot_now: Option<f64>,
    max_price: Option<f64>,
    on_demand: Option<f64>,
}

impl Prepared {
    /// What the instance will be billed per hour, where known (`plan::price_paid` for the
    /// launch asked for).
    pub fn price_per_hour(&self) -> Option<f64> {
        plan::price_paid(
            self.opts.spot,
            self.spot_now,
            self.max_price,
            self.on_demand,
        )
    }
}

/// An instance RunInstances made.
#[derive(Debug, Clone)]
pub struct Started {
    pub id: String,
    pub instance_type: String,
    pub zone: String,
    pub spot: bool,
    /// $/hour as billed (see `plan::price_paid`).
    pub price_per_hour: Option<f64>,
}

/// The agent binary to install: `[ec2] agent_binary`, else `runctl-agent` beside this
/// executable; a static x86_64 ELF.
pub fn agent_binary(config: &Config) -> Result<std::path::PathBuf, UserError> {
    artifact::static_binary(
        config.ec2.agent_binary.as_deref(),
        "runctl-agent",
        "build it: scripts/build-static-agent.sh, then set agent_binary under [ec2] in config.toml to the path it prints",
    )
}

/// Checks the launch against EC2 (the type, the image, the instance limit, the spot price
/// against the maximum, the security group) and publishes the agent; says what it found.
/// Nothing that costs exists when this returns.
pub async fn prepare(
    ec2: &Ec2,
    config: &Config,
    home: &Path,
    opts: &Ec2Launch,
    progress: &Progress,
) -> Result<Prepared, UserError> {
    let cfg = &config.ec2;
    plan::check_options(opts)?;
    let agent_path = agent_binary(config)?;
    let artifacts = artifact::location(config)?;
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
    if opts.gang.is_none() {
        // A gang's nodes were counted together (`prepare_gang`).
        plan::check_limit(ec2.running_count().await?, cfg.max_running, &ec2.region)?;
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
        let now = spot_now
            .as_ref()
            .map(|(price, zone)| (*price, zone.as_str()));
        say(
            progress,
            plan::spot_price(kind, now, max_price, opts.spot_fallback)?,
        );
    }
    let security_group = match &opts.gang {
        Some(gang) => gang.security_group.clone(),
        None => ec2.security_group(cfg.subnet.as_deref()).await?,
    };
    let (agent_url, agent_sha256) = artifact::publish(
        &config.storage.store_config(home),
        &agent_path,
        &artifacts,
        "agent",
        Duration::from_secs(cfg.presign_secs),
    )
    .await?;
    say(progress, format!("agent {} published", &agent_sha256[..12]));
    Ok(Prepared {
        opts: opts.clone(),
        image,
        security_group,
        agent_url,
        agent_sha256,
        spot_now: spot_now.map(|(price, _)| price),
        max_price,
        on_demand: on_demand.map(|p| p.per_hour),
    })
}

/// Makes a gang's place before its `nodes` instances are launched: checks that they fit
/// under the instance limit together, picks the zone, and creates the gang's cluster
/// placement group and its members-only security group (`Ec2::create_gang`); says what
/// the gang costs, all nodes together. Nothing else that costs exists when this returns.
pub async fn prepare_gang(
    ec2: &Ec2,
    config: &Config,
    opts: &Ec2Launch,
    run: &RunId,
    relaunch: u32,
    nodes: u32,
    progress: &Progress,
) -> Result<Ec2Gang, UserError> {
    let cfg = &config.ec2;
    plan::check_options(opts)?;
    let running = ec2.running_count().await?;
    plan::check_limit(running + nodes as usize - 1, cfg.max_running, &ec2.region)?;
    let kind = opts.instance_type.as_str();
    let zone = ec2.gang_zone(kind, cfg.subnet.as_deref()).await?;
    let on_demand = prices::on_demand(kind, &cfg.prices).map(|p| p.per_hour);
    let spot_now = match opts.spot {
        true => ec2.spot_price(kind).await?.map(|(price, _)| price),
        false => None,
    };
    let max_price = opts.max_price.or(on_demand);
    say(
        progress,
        plan::gang_cost(
            nodes,
            plan::price_paid(opts.spot, spot_now, max_price, on_demand),
        ),
    );
    let name = super::gang_name(run, relaunch);
    let vpc = ec2.vpc(cfg.subnet.as_deref()).await?;
    let tags = [
        (super::MANAGED_TAG.to_owned(), "true".to_owned()),
        (super::RUN_TAG.to_owned(), run.to_string()),
    ];
    let security_group = ec2.create_gang(&name, &vpc, &tags).await?;
    say(
        progress,
        format!(
            "gang: placement group {name} (cluster) in {zone}; security group {security_group}, open only to its members"
        ),
    );
    Ok(Ec2Gang {
        name,
        security_group,
        zone,
    })
}

/// EC2's settings in an agent's config: power-off is `systemctl poweroff` (the instance's
/// shutdown behaviour terminates it), spot notices come from the instance metadata.
pub fn agent_settings(config: &Config, file: &mut AgentConfigFile) {
    file.idle_timeout_secs = config.ec2.idle_timeout_secs;
    file.poweroff_command = Some(vec!["systemctl".into(), "poweroff".into()]);
    file.metadata_endpoint = Some(
        config
            .ec2
            .metadata_endpoint
            .clone()
            .unwrap_or_else(|| "http://169.254.169.254".into()),
    );
    config.agent.write_into(file);
}

/// Renders the user-data that installs the agent with `agent_config` and launches the
/// instance (on-demand instead of spot when there is no spot capacity and
/// `--spot-fallback` allows it).
pub async fn start(
    ec2: &Ec2,
    config: &Config,
    prepared: &Prepared,
    name: &InstanceName,
    for_run: Option<&RunId>,
    agent_config: &AgentConfigFile,
    progress: &Progress,
) -> Result<Started, UserError> {
    let opts = &prepared.opts;
    let cfg = &config.ec2;
    let user_data = userdata::render(&userdata::Params {
        config: agent_config,
        agent_url: &prepared.agent_url,
        agent_sha256: &prepared.agent_sha256,
    })
    .map_err(|e| UserError::new(ErrorCode::Internal, format!("rendering the user-data: {e}")))?;
    let mut tags = vec![
        ("Name".to_owned(), format!("runctl-{name}")),
        (super::MANAGED_TAG.to_owned(), "true".to_owned()),
        (super::INSTANCE_TAG.to_owned(), name.to_string()),
    ];
    if let Some(run) = for_run {
        tags.push((super::RUN_TAG.to_owned(), run.to_string()));
    }
    if let Some(project) = &opts.project {
        tags.push((super::PROJECT_TAG.to_owned(), project.clone()));
    }
    if let Ok(user) = std::env::var("USER") {
        tags.push((super::USER_TAG.to_owned(), user));
    }
    let mut launch_plan = LaunchPlan {
        instance_type: opts.instance_type.clone(),
        image: prepared.image.clone(),
        security_group: prepared.security_group.clone(),
        subnet: cfg.subnet.clone(),
        user_data,
        tags,
        spot: opts.spot.then_some(prepared.max_price),
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
        placement: opts.gang.as_ref().map(|g| (g.name.clone(), g.zone.clone())),
        zone: None,
    };
    let api_start = Instant::now();
    // A shortage in the zone EC2 picked: the other zones that offer the type, in turn
    // (`plan::next_zone`), unless the zone is pinned.
    let pinned = launch_plan.subnet.is_some() || launch_plan.placement.is_some();
    let mut offered: Option<Vec<String>> = None;
    let mut tried: Vec<String> = Vec::new();
    let first = loop {
        let e = match ec2.run_instance(&launch_plan, opts.spot).await {
            Ok(instance) => break Ok(instance),
            Err(e) => e,
        };
        if pinned || e.code != ErrorCode::Capacity {
            break Err(e);
        }
        if offered.is_none() {
            offered = Some(ec2.offered_zones(&opts.instance_type).await?);
        }
        let zones = offered.as_deref().unwrap_or_default();
        let short = launch_plan
            .zone
            .take()
            .or_else(|| plan::failed_zone(&e.message, &ec2.region));
        tried.extend(short);
        match plan::next_zone(zones, &tried, e.code, pinned) {
            Some(next) => {
                say(
                    progress,
                    format!(
                        "{} in {}: {}; trying {next}",
                        opts.instance_type,
                        tried.last().map_or("the zone EC2 picked", String::as_str),
                        e.message
                    ),
                );
                launch_plan.zone = Some(next.to_owned());
            }
            None => break Err(e),
        }
    };
    let launched = match first {
        Ok(instance) => instance,
        Err(e) if opts.spot && opts.spot_fallback && e.code == ErrorCode::Capacity => {
            launch_plan.zone = None;
            say(
                progress,
                format!(
                    "WARNING: no spot capacity ({}); launching ON-DEMAND instead, as --spot-fallback allows",
                    e.message
                ),
            );
            ec2.run_instance(&launch_plan, false).await?
        }
        Err(e) => return Err(e),
    };
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
    Ok(Started {
        price_per_hour: plan::price_paid(
            launched.spot,
            prepared.spot_now,
            prepared.max_price,
            prepared.on_demand,
        ),
        id: launched.id,
        instance_type: opts.instance_type.clone(),
        zone: launched.zone,
        spot: launched.spot,
    })
}

/// Polls EC2 until instance `id` runs (since `started`, within `timeout`); says each
/// state it passes through. An instance that goes anywhere but running is an error.
pub async fn wait_running(
    ec2: &Ec2,
    id: &str,
    started: Instant,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), UserError> {
    let mut last = String::new();
    loop {
        // Right after RunInstances, EC2 may not list the instance yet (its reads are
        // eventually consistent): absent counts as pending for a while.
        let absent = if started.elapsed() < Duration::from_millis(plan::CONSISTENCY_MS) {
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
            "running" => return Ok(()),
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
}

/// Where to read why an instance's agent did not enroll.
pub fn boot_log_hint(id: &str, region: &str) -> String {
    format!("read its boot log: aws ec2 get-console-output --instance-id {id} --region {region}")
}
