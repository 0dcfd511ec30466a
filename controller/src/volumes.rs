//! `volume ...`: EBS volumes for runctl's EC2 instances, straight from this process to
//! EC2 (the cloud is the truth for volumes; the daemon keeps no record of them).

use crate::cli::{NewVolumeArgs, VolumeCommand};
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
        VolumeCommand::List => {
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
        VolumeCommand::Delete { volume, force } => {
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
