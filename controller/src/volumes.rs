//! `volume ...`: EBS volumes for runctl's EC2 instances, straight from this process to
//! EC2 (the cloud is the truth for volumes; the daemon keeps no record of them).

use crate::cli::VolumeCommand;
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

/// The zone a new volume goes in: the instance's, or the one given.
async fn zone(
    ec2: &Ec2,
    instance: Option<String>,
    zone: Option<String>,
) -> Result<String, UserError> {
    match (instance, zone) {
        (Some(instance), _) => Ok(ec2.locate_instance(&instance).await?.1),
        (None, Some(zone)) => Ok(zone),
        (None, None) => Err(UserError::new(
            crate::error::ErrorCode::BadInput,
            "say where the volume goes: --instance NAME or --zone ZONE",
        )),
    }
}

pub async fn volume(config: &Config, printer: Printer, cmd: VolumeCommand) -> anyhow::Result<u8> {
    let ec2 = Ec2::connect(&config.ec2).await?;
    match cmd {
        VolumeCommand::Create {
            size,
            instance,
            zone: az,
            name,
            persistent,
            protected,
        } => {
            if !(1..=16384).contains(&size) {
                return Err(UserError::new(
                    crate::error::ErrorCode::BadInput,
                    format!("--size {size}: a volume is 1 to 16384 GiB"),
                )
                .into());
            }
            let zone = zone(&ec2, instance, az).await?;
            let v = ec2
                .create_volume(&NewVolume {
                    size_gb: Some(size),
                    zone,
                    name,
                    snapshot: None,
                    persistent,
                    protected,
                })
                .await?;
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
            instance,
            zone: az,
            size,
            name,
            persistent,
            protected,
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
            let zone = zone(&ec2, instance, az).await?;
            let v = ec2
                .create_volume(&NewVolume {
                    size_gb: size,
                    zone,
                    name,
                    snapshot: Some(snapshot),
                    persistent,
                    protected,
                })
                .await?;
            printer.data(&v, || volume_line("restored", &v));
        }
    }
    Ok(0)
}
