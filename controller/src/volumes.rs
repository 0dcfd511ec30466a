//! `volume ...`: EBS volumes for runctl's EC2 instances and RunPod network volumes,
//! straight from this process to the cloud (the cloud is the truth for volumes; the daemon
//! keeps no record of them). The second place that picks a provider, after
//! `daemon::instances`: volumes are not instances, and each cloud's differ in kind (an EBS
//! volume attaches and detaches; a network volume is named at a pod's creation).

use crate::cli::{NewVolumeArgs, VolumeCommand, VolumeProvider};
use crate::config::Config;
use crate::error::UserError;
use crate::provider::ec2::Ec2;
use crate::provider::ec2::volumes::{NewVolume, VolumeView};
use crate::report::{Printer, table};

fn volume_line(verb: &str, v: &VolumeView) -> String {
    format!(
        "{verb} {} ({} GiB, {}, {})\n",
        v.id, v.size_gb, v.zone, v.state
    )
}

/// The new volume `args` describe: in the zone of the instance named, or the one given.
async fn new_volume(
    ec2: &Ec2,
    args: NewVolumeArgs,
    size_gb: Option<u32>,
    snapshot: Option<String>,
) -> Result<NewVolume, UserError> {
    let zone = match (args.instance, args.zone) {
        (Some(instance), _) => ec2.locate_instance(&instance).await?.1,
        (None, Some(zone)) => zone,
        (None, None) => {
            return Err(UserError::new(
                crate::error::ErrorCode::BadInput,
                "say where the volume goes: --instance NAME or --zone ZONE",
            ));
        }
    };
    Ok(NewVolume {
        size_gb,
        zone,
        name: args.name,
        snapshot,
        persistent: args.persistent,
        protected: args.protected,
    })
}

pub async fn volume(config: &Config, printer: Printer, cmd: VolumeCommand) -> anyhow::Result<u8> {
    let runpod = match &cmd {
        VolumeCommand::Create { new, .. } | VolumeCommand::Restore { new, .. } => {
            new.provider == VolumeProvider::Runpod
        }
        VolumeCommand::List { provider } | VolumeCommand::Delete { provider, .. } => {
            *provider == VolumeProvider::Runpod
        }
        VolumeCommand::Attach { .. }
        | VolumeCommand::Detach { .. }
        | VolumeCommand::Snapshot { .. } => false,
    };
    if runpod {
        return runpod_volume(config, printer, cmd).await;
    }
    if let VolumeCommand::Create { new, .. } | VolumeCommand::Restore { new, .. } = &cmd
        && new.datacenter.is_some()
    {
        return Err(UserError::new(
            crate::error::ErrorCode::BadInput,
            "--datacenter is for RunPod network volumes: add --provider runpod, or give --zone or --instance for an EBS volume",
        )
        .into());
    }
    let ec2 = Ec2::connect(&config.ec2).await?;
    match cmd {
        VolumeCommand::Create { size, new } => {
            if !(1..=16384).contains(&size) {
                return Err(UserError::new(
                    crate::error::ErrorCode::BadInput,
                    format!("--size {size}: a volume is 1 to 16384 GiB"),
                )
                .into());
            }
            let spec = new_volume(&ec2, new, Some(size), None).await?;
            let v = ec2.create_volume(&spec).await?;
            printer.data(&v, || volume_line("created", &v));
        }
        VolumeCommand::List { .. } => {
            let volumes = ec2.volumes().await?;
            printer.data(&volumes, || {
                let mut t = table(&[
                    "VOLUME", "NAME", "SIZE", "STATE", "ZONE", "ATTACHED", "GUARDS",
                ]);
                for v in &volumes {
                    t.add_row(vec![
                        v.id.clone(),
                        v.name.clone().unwrap_or_default(),
                        format!("{} GiB", v.size_gb),
                        v.state.clone(),
                        v.zone.clone(),
                        v.attached_to
                            .as_ref()
                            .map(|(i, d)| format!("{i} {d}"))
                            .unwrap_or_default(),
                        v.guards.join(","),
                    ]);
                }
                format!("{t}\n")
            });
        }
        VolumeCommand::Attach {
            volume,
            instance,
            device,
        } => {
            let v = ec2.attach_volume(&volume, &instance, &device).await?;
            printer.data(&v, || volume_line("attached", &v));
        }
        VolumeCommand::Detach { volume, force } => {
            let v = ec2.detach_volume(&volume, force).await?;
            printer.data(&v, || volume_line("detached", &v));
        }
        VolumeCommand::Delete { volume, force, .. } => {
            crate::provider::ec2::ids::check_id(&volume, "vol")
                .map_err(|e| UserError::new(crate::error::ErrorCode::BadInput, e))?;
            let v = ec2.delete_volume(&volume, force).await?;
            printer.data(&v, || format!("deleted {}\n", v.id));
        }
        VolumeCommand::Snapshot {
            volume,
            description,
        } => {
            let s = ec2.snapshot_volume(&volume, description.as_deref()).await?;
            printer.data(&s, || {
                format!("snapshot {} of {} ({})\n", s.id, s.volume, s.state)
            });
        }
        VolumeCommand::Restore {
            snapshot,
            size,
            new,
        } => {
            let snapshot_gb = ec2.snapshot_size(&snapshot).await?;
            if let Some(size) = size
                && (size as i64) < snapshot_gb as i64
            {
                return Err(UserError::new(
                    crate::error::ErrorCode::BadInput,
                    format!("--size {size} is smaller than the snapshot ({snapshot_gb} GiB)"),
                )
                .into());
            }
            let spec = new_volume(&ec2, new, size, Some(snapshot)).await?;
            let v = ec2.create_volume(&spec).await?;
            printer.data(&v, || volume_line("restored", &v));
        }
    }
    Ok(0)
}

/// What RunPod volumes runctl made are named: `runctl-NAME`.
const RUNPOD_PREFIX: &str = crate::provider::runpod::launch::NAME_PREFIX;

async fn runpod_volume(
    config: &Config,
    printer: Printer,
    cmd: VolumeCommand,
) -> anyhow::Result<u8> {
    use crate::error::ErrorCode;
    let api =
        crate::provider::runpod::launch::client(config, std::env::var("RUNPOD_API_KEY").ok())?;
    match cmd {
        VolumeCommand::Create { size, new } => {
            if !(10..=4096).contains(&size) {
                return Err(UserError::new(
                    ErrorCode::BadInput,
                    format!("--size {size}: a RunPod network volume is 10 to 4096 GB"),
                )
                .into());
            }
            let Some(datacenter) = new.datacenter.or_else(|| config.runpod.datacenter.clone())
            else {
                return Err(UserError::new(
                    ErrorCode::BadInput,
                    "say which data center the volume is in: --datacenter DC (pods that mount it run there)",
                )
                .resolve("or set datacenter under [runpod] in config.toml")
                .into());
            };
            if new.instance.is_some() || new.zone.is_some() || new.persistent || new.protected {
                return Err(UserError::new(
                    ErrorCode::BadInput,
                    "--instance, --zone, --persistent and --protected are for EBS volumes",
                )
                .into());
            }
            let suffix: [u8; 3] = rand::random();
            let name = format!(
                "{RUNPOD_PREFIX}{}",
                new.name.unwrap_or_else(|| hex::encode(suffix))
            );
            let v = api.create_volume(&name, size, &datacenter).await?;
            printer.data(&v, || {
                format!(
                    "created {} ({}, {} GB, {})\n",
                    v.id, v.name, v.size, v.data_center
                )
            });
        }
        VolumeCommand::List { .. } => {
            let volumes: Vec<_> = api
                .volumes()
                .await?
                .into_iter()
                .filter(|v| v.name.starts_with(RUNPOD_PREFIX))
                .collect();
            printer.data(&volumes, || {
                let mut t = table(&["VOLUME", "NAME", "SIZE", "DATACENTER"]);
                for v in &volumes {
                    t.add_row(vec![
                        v.id.clone(),
                        v.name.clone(),
                        format!("{} GB", v.size),
                        v.data_center.clone(),
                    ]);
                }
                format!("{t}\n")
            });
        }
        VolumeCommand::Delete { volume, .. } => {
            let Some(v) = api.volume(&volume).await? else {
                return Err(UserError::new(
                    ErrorCode::NotFound,
                    format!("RunPod has no network volume {volume}"),
                )
                .resolve("list them: runctl-controller volume list --provider runpod")
                .into());
            };
            if !v.name.starts_with(RUNPOD_PREFIX) {
                return Err(UserError::new(
                    ErrorCode::Conflict,
                    format!("network volume {volume} ({}) is not runctl's: runctl deletes only the volumes it made", v.name),
                )
                .into());
            }
            api.delete_volume(&volume).await?;
            printer.data(&v, || format!("deleted {}\n", v.id));
        }
        VolumeCommand::Attach { .. }
        | VolumeCommand::Detach { .. }
        | VolumeCommand::Snapshot { .. }
        | VolumeCommand::Restore { .. } => {
            return Err(UserError::new(
                ErrorCode::BadInput,
                "RunPod network volumes are mounted when a pod is created, and have no snapshots",
            )
            .resolve("mount one at launch: runctl-controller launch --provider runpod --gpu GPU --volume ID")
            .into());
        }
    }
    Ok(0)
}
