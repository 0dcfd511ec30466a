//! A RunPod launch, in the steps `daemon::instances` calls between its provider-neutral
//! ones: `prepare` checks everything before anything costs (the key, the GPU against the
//! catalog, the pod limit, the price or bid) and publishes the agent; `start` renders the
//! start command and creates the pod (or rents an interruptible one); `wait_running` polls
//! until RunPod says it runs, which is before its image has started: the phase that
//! counts is the agent's enrollment, which the caller waits for.

use std::path::Path;
use std::time::{Duration, Instant};

use protocol::agent_config::AgentConfigFile;
use protocol::{InstanceName, RunId};

use super::{
    ApiKey, ClusterCompute, CreateCluster, CreatePod, GpuConfig, Mounts, NetworkMount,
    PersistentMount, PodStatus, RentInterruptible, RunPod, RunpodLaunch, plan, start,
};
use crate::config::Config;
use crate::error::{ErrorCode, UserError};
use crate::provider::{Progress, artifact, say, seconds};

/// How often a launch asks RunPod for the pod's status.
const POLL: Duration = Duration::from_secs(2);

/// Where a pod's volume is mounted, and its agent's files on it.
pub const VOLUME_PATH: &str = "/workspace";

/// What runctl's pods are named: `runctl-NAME`; `list` shows no other pod.
pub const NAME_PREFIX: &str = "runctl-";

/// A client for the account `[runpod]` and `RUNPOD_API_KEY` (`env`) name; refused before
/// any call without a key.
pub fn client(config: &Config, env: Option<String>) -> Result<RunPod, UserError> {
    let key = ApiKey::find(env, config.runpod.api_key_file.as_deref())?;
    Ok(RunPod::new(
        &config.runpod.api_url,
        &config.runpod.graphql_url,
        key,
    ))
}

/// What `prepare` found, for `start`.
#[derive(Debug, Clone)]
pub struct Prepared {
    opts: RunpodLaunch,
    gpu_id: String,
    /// $/h for the pod: the on-demand price, or the most bid for spot.
    pub(crate) price: f64,
    bid_per_gpu: Option<f64>,
    agent_url: String,
    agent_sha256: String,
    /// Where the pod goes: asked for, the network volume's, or RunPod's choice.
    datacenter: Option<String>,
}

/// A pod RunPod made.
#[derive(Debug, Clone)]
pub struct Started {
    pub id: String,
    /// `GPU xN`, for `list`.
    pub instance_type: String,
    pub spot: bool,
    pub price_per_hour: Option<f64>,
    pub datacenter: String,
}

/// The agent binary pods install: `[runpod] agent_binary`, else `runctl-agent` beside this
/// executable; a static x86_64 ELF.
pub fn agent_binary(config: &Config) -> Result<std::path::PathBuf, UserError> {
    artifact::static_binary(
        config.runpod.agent_binary.as_deref(),
        "runctl-agent",
        "build it: scripts/build-static-agent.sh, then set agent_binary under [runpod] in config.toml to the path it prints",
    )
}

/// Checks the launch of `pods` pods (1, or a cluster's) against RunPod (the GPU type and
/// count, runctl's running pods, the price) and publishes the agent; says what it found.
/// Nothing billed exists after it.
pub async fn prepare(
    api: &RunPod,
    config: &Config,
    home: &Path,
    opts: &RunpodLaunch,
    pods: u32,
    progress: &Progress,
) -> Result<Prepared, UserError> {
    plan::check_options(opts)?;

    let agent_path = agent_binary(config)?;
    let artifacts = artifact::location_in(config.runpod.artifacts.as_deref(), config, "runpod")?;
    let wanted = opts
        .datacenter
        .clone()
        .or_else(|| config.runpod.datacenter.clone());
    let datacenter = match &opts.volume {
        Some(id) => {
            let volume = api.volume(id).await?;
            let dc = plan::volume_datacenter(id, volume.as_ref(), wanted.as_deref())?;
            say(
                progress,
                format!("network volume {id} at {VOLUME_PATH}, in {dc}"),
            );
            Some(dc)
        }
        None => wanted,
    };
    let catalog = api.gpu_types().await?;
    let gpu = plan::find_gpu(&catalog, &opts.gpu)?;
    plan::check_count(gpu, opts.gpus)?;
    let running = api
        .pods()
        .await?
        .iter()
        .filter(|p| p.name.starts_with(NAME_PREFIX) && plan::is_live(p.status))
        .count();
    crate::provider::ec2::plan::check_limit(
        running + pods as usize - 1,
        config.runpod.max_running,
        "RunPod",
    )?;
    let on_demand = gpu.price.secure * f64::from(opts.gpus);
    say(
        progress,
        format!(
            "{} x{}: {} GB each; on-demand {}/h (RunPod's list price, secure cloud)",
            gpu.id,
            opts.gpus,
            gpu.memory,
            crate::provider::ec2::prices::dollars(on_demand)
        ),
    );
    let (price, bid_per_gpu) = if opts.spot {
        let max = opts.max_price.unwrap_or(on_demand);
        let bid = plan::bid_per_gpu(max, opts.gpus, None)?;
        say(
            progress,
            format!(
                "interruptible: bidding {}/h per GPU ({}/h for the pod)",
                crate::provider::ec2::prices::dollars(bid),
                crate::provider::ec2::prices::dollars(max)
            ),
        );
        (max, Some(bid))
    } else {
        (on_demand, None)
    };
    if pods > 1 {
        say(
            progress,
            crate::provider::ec2::plan::gang_cost(pods, Some(price)),
        );
    }
    let (agent_url, agent_sha256) = artifact::publish(
        &config.storage.store_config(home),
        &agent_path,
        &artifacts,
        "agent",
        Duration::from_secs(config.runpod.presign_secs),
    )
    .await?;
    say(progress, format!("agent {} published", &agent_sha256[..12]));
    Ok(Prepared {
        opts: opts.clone(),
        gpu_id: gpu.id.clone(),
        price,
        bid_per_gpu,
        agent_url,
        agent_sha256,
        datacenter,
    })
}

/// RunPod's settings in an agent's config: powering off asks RunPod, with the pod's own
/// key, to stop or terminate the pod; store credentials come from the controller.
pub fn agent_settings(config: &Config, file: &mut AgentConfigFile) {
    file.idle_timeout_secs = config.runpod.idle_timeout_secs;
    file.pod_api = Some(config.runpod.api_url.clone());
    // A pod has no instance profile: the daemon hands it store credentials over the
    // channel (never in its environment or start command, which RunPod's API shows).
    file.store_credentials = protocol::agent_config::CredentialsFrom::Controller;
    config.agent.write_into(file);
}

/// Creates the pod with the start command that installs the agent with `agent_config`.
pub async fn start(
    api: &RunPod,
    config: &Config,
    prepared: &Prepared,
    name: &InstanceName,
    agent_config: &AgentConfigFile,
    progress: &Progress,
) -> Result<Started, UserError> {
    let opts = &prepared.opts;
    let cfg = &config.runpod;
    let args = start_command(prepared, std::slice::from_ref(agent_config))?;
    let pod_name = pod_name(name);
    let image = opts.image.clone().unwrap_or_else(|| cfg.image.clone());
    let datacenter = prepared.datacenter.clone();
    let gpu = GpuConfig {
        id: prepared.gpu_id.clone(),
        count: opts.gpus,
    };
    let api_start = Instant::now();
    let (id, datacenter) = match prepared.bid_per_gpu {
        Some(bid) => {
            let id = api
                .rent_interruptible(&RentInterruptible {
                    name: pod_name,
                    image,
                    args,
                    gpu,
                    bid_per_gpu: bid,
                    disk: Some(opts.disk_gb.unwrap_or(cfg.disk_gb)),
                    data_center: datacenter.clone(),
                    network_volume: opts.volume.clone(),
                    volume_path: VOLUME_PATH.into(),
                    volume_gb: opts.volume.is_none().then_some(cfg.volume_gb),
                    env: Default::default(),
                })
                .await?;
            (id, datacenter)
        }
        None => {
            let pod = api
                .create_pod(&CreatePod {
                    name: pod_name,
                    image,
                    args,
                    disk: Some(opts.disk_gb.unwrap_or(cfg.disk_gb)),
                    env: Default::default(),
                    gpu,
                    data_center_ids: datacenter.clone().into_iter().collect(),
                    mounts: mounts(opts, cfg.volume_gb),
                })
                .await?;
            (pod.id, pod.data_center_id.or(datacenter))
        }
    };
    let spot = prepared.bid_per_gpu.is_some();
    say(
        progress,
        format!(
            "  {:<16}{:>7}  pod {id} ({})",
            "requested",
            seconds(api_start.elapsed()),
            if spot { "interruptible" } else { "on-demand" }
        ),
    );
    Ok(Started {
        id,
        instance_type: format!("{} x{}", prepared.gpu_id, opts.gpus),
        spot,
        price_per_hour: Some(prepared.price),
        datacenter: datacenter.unwrap_or_else(|| "runpod".into()),
    })
}

/// The start command for pods with `configs` (one, or a cluster's in rank order).
fn start_command(prepared: &Prepared, configs: &[AgentConfigFile]) -> Result<String, UserError> {
    start::render(&start::Params {
        configs,
        agent_url: &prepared.agent_url,
        agent_sha256: &prepared.agent_sha256,
    })
    .map_err(|e| {
        UserError::new(
            ErrorCode::Internal,
            format!("rendering the start command: {e}"),
        )
    })
}

/// A pod's storage at `/workspace`: the network volume asked for, else its own.
fn mounts(opts: &RunpodLaunch, volume_gb: u32) -> Mounts {
    match &opts.volume {
        Some(volume) => Mounts {
            persistent: None,
            network: vec![NetworkMount {
                volume_id: volume.clone(),
                path: VOLUME_PATH.into(),
            }],
        },
        None => Mounts {
            persistent: Some(PersistentMount {
                size: volume_gb,
                path: VOLUME_PATH.into(),
            }),
            network: vec![],
        },
    }
}

/// What RunPod calls a run's gang: `runctl-gang-RUN`.
/// The RunPod name of the pod that is runctl instance `name`.
pub fn pod_name(name: &InstanceName) -> String {
    format!("{NAME_PREFIX}{name}")
}

pub fn cluster_name(run: &RunId) -> String {
    format!("{NAME_PREFIX}gang-{run}")
}

/// Creates a run's gang as one RunPod cluster of `configs.len()` pods, each writing the
/// agent config of its rank, and waits (within `timeout`) until RunPod has given every
/// rank its pod. Returns the cluster's id and its pods in rank order. A cluster whose
/// ranks are not all given in time is deleted: nothing is left behind.
pub async fn start_cluster(
    api: &RunPod,
    config: &Config,
    prepared: &Prepared,
    run: &RunId,
    configs: &[AgentConfigFile],
    timeout: Duration,
    progress: &Progress,
) -> Result<(String, Vec<Started>), UserError> {
    let opts = &prepared.opts;
    let cfg = &config.runpod;
    let nodes = configs.len() as u32;
    let api_start = Instant::now();
    let cluster = api
        .create_cluster(&CreateCluster {
            name: cluster_name(run),
            kind: "TRAINING",
            compute: ClusterCompute {
                gpu_type_id: prepared.gpu_id.clone(),
                gpu_count_per_pod: opts.gpus,
                pod_count: nodes,
            },
            image: opts.image.clone().unwrap_or_else(|| cfg.image.clone()),
            args: start_command(prepared, configs)?,
            disk: Some(opts.disk_gb.unwrap_or(cfg.disk_gb)),
            env: Default::default(),
            data_center_ids: prepared.datacenter.clone().into_iter().collect(),
            mounts: mounts(opts, cfg.volume_gb),
        })
        .await?;
    say(
        progress,
        format!(
            "  {:<16}{:>7}  cluster {} of {nodes} pods (on-demand)",
            "requested",
            seconds(api_start.elapsed()),
            cluster.id
        ),
    );
    let placed = async {
        loop {
            let pods = api.cluster_pods(&cluster.id).await?.ok_or_else(|| {
                UserError::new(
                    ErrorCode::Conflict,
                    format!("cluster {} went away while starting", cluster.id),
                )
            })?;
            if let Some(ranked) = plan::by_rank(&pods, nodes) {
                return Ok(ranked.into_iter().cloned().collect::<Vec<_>>());
            }
            if api_start.elapsed() > timeout {
                return Err(UserError::new(
                    ErrorCode::Conflict,
                    format!(
                        "RunPod did not give all {nodes} pods of cluster {} their ranks within {timeout:?}",
                        cluster.id
                    ),
                )
                .resolve("try another --gpu or --datacenter, or fewer --nodes"));
            }
            tokio::time::sleep(POLL).await;
        }
    };
    let ranked = match placed.await {
        Ok(ranked) => ranked,
        Err(e) => {
            if let Err(d) = api.delete_cluster(&cluster.id).await {
                return Err(e.resolve(format!(
                    "deleting cluster {} failed too ({}): delete it in the RunPod console",
                    cluster.id, d.message
                )));
            }
            return Err(e);
        }
    };
    let started = ranked
        .into_iter()
        .map(|pod| Started {
            id: pod.id.clone(),
            instance_type: format!("{} x{}", prepared.gpu_id, opts.gpus),
            spot: false,
            price_per_hour: Some(prepared.price),
            datacenter: pod
                .data_center_id
                .clone()
                .or_else(|| cluster.data_center_id.clone())
                .unwrap_or_else(|| "runpod".into()),
        })
        .collect();
    Ok((cluster.id, started))
}

/// Polls RunPod until pod `id` is RUNNING (since `started`, within `timeout`); says each
/// status it passes through. A pod that exits, fails or goes away is an error.
pub async fn wait_running(
    api: &RunPod,
    id: &str,
    started: Instant,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), UserError> {
    let mut last = None;
    loop {
        let status = api.pod(id).await?.map(|p| p.status);
        if status != last {
            let word = status.map_or("gone", plan::status_word);
            say(
                progress,
                format!("  {:<16}{:>7}", word, seconds(started.elapsed())),
            );
            last = status;
        }
        match status {
            Some(PodStatus::Running) => return Ok(()),
            Some(PodStatus::Provisioning | PodStatus::Starting) => {}
            Some(other @ (PodStatus::Exited | PodStatus::Error | PodStatus::Terminated)) => {
                return Err(UserError::new(
                    ErrorCode::Conflict,
                    format!("pod {id} went {} while starting", plan::status_word(other)),
                )
                .resolve("try another --gpu or --datacenter, or launch on-demand"));
            }
            None => {
                return Err(UserError::new(
                    ErrorCode::Conflict,
                    format!("pod {id} went away while starting"),
                ));
            }
        }
        if started.elapsed() > timeout {
            return Err(UserError::new(
                ErrorCode::Conflict,
                format!("pod {id} did not reach RUNNING within {timeout:?}"),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Where to read why a pod's agent did not enroll.
pub fn boot_log_hint(id: &str) -> String {
    format!(
        "read the pod's logs in the RunPod console (pod {id}); an image whose entrypoint ignores its arguments never runs the start command: use one that runs them (RunPod's own images do), with sh and curl, wget or python3"
    )
}
