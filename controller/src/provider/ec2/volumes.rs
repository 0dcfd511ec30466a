//! EBS volumes and snapshots that runctl manages: created tagged, listed by tag, placed in
//! the availability zone of the instance they are meant for, and guarded against
//! deletion while attached, persistent or protected.

use aws_sdk_ec2::types::{ResourceType, Volume, VolumeType};
use serde::{Deserialize, Serialize};

use super::{Ec2, MANAGED_TAG, api_error, filter, ids, tag_value, tags_for};
use crate::error::{ErrorCode, UserError};

/// Tags (value anything but `false`) that keep a volume from `volume delete` without
/// `--force`.
pub const GUARD_TAGS: [&str; 4] = [
    "persistent",
    "protected",
    "runctl:persistent",
    "runctl:protected",
];

/// A volume as `volume list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeView {
    pub id: String,
    pub name: Option<String>,
    pub size_gb: i32,
    pub state: String,
    pub zone: String,
    /// `i-...` and device, when attached.
    pub attached_to: Option<(String, String)>,
    pub snapshot: Option<String>,
    /// Which guard tags it carries.
    pub guards: Vec<String>,
    pub created_ms: u64,
}

/// A snapshot as `volume snapshot` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotView {
    pub id: String,
    pub volume: String,
    pub state: String,
}

fn view(v: &Volume) -> VolumeView {
    let attached_to = v
        .attachments()
        .iter()
        .find(|a| a.state().is_some_and(|s| s.as_str() != "detached"))
        .map(|a| {
            (
                a.instance_id().unwrap_or_default().to_owned(),
                a.device().unwrap_or_default().to_owned(),
            )
        });
    VolumeView {
        id: v.volume_id().unwrap_or_default().to_owned(),
        name: tag_value(v.tags(), "Name").map(str::to_owned),
        size_gb: v.size().unwrap_or(0),
        state: v.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
        zone: v.availability_zone().unwrap_or_default().to_owned(),
        attached_to,
        snapshot: v.snapshot_id().filter(|s| !s.is_empty()).map(str::to_owned),
        guards: GUARD_TAGS
            .iter()
            .filter(|g| tag_value(v.tags(), g).is_some_and(|value| value != "false"))
            .map(|g| (*g).to_owned())
            .collect(),
        created_ms: v
            .create_time()
            .and_then(|t| t.to_millis().ok())
            .unwrap_or(0)
            .max(0) as u64,
    }
}

/// How a new volume is made.
#[derive(Debug, Clone, Default)]
pub struct NewVolume {
    pub size_gb: Option<u32>,
    pub zone: String,
    pub name: Option<String>,
    pub snapshot: Option<String>,
    pub persistent: bool,
    pub protected: bool,
}

impl Ec2 {
    /// Resolves an instance given as `i-...` or a runctl name to its id and zone.
    pub async fn locate_instance(&self, instance: &str) -> Result<(String, String), UserError> {
        let found = if instance.starts_with("i-") {
            ids::check_id(instance, "i").map_err(|e| UserError::new(ErrorCode::BadInput, e))?;
            self.instances(&[instance.to_owned()]).await?
        } else {
            let mut all = self.instances(&[]).await?;
            all.retain(|i| i.name.as_deref() == Some(instance));
            all
        };
        let live = found
            .into_iter()
            .find(|i| i.state != "terminated" && i.state != "shutting-down")
            .ok_or_else(|| {
                UserError::new(
                    ErrorCode::NotFound,
                    format!("no live runctl instance {instance} in {}", self.region),
                )
                .resolve("list them: runctl-controller list")
            })?;
        Ok((live.id, live.zone))
    }

    pub async fn volumes(&self) -> Result<Vec<VolumeView>, UserError> {
        let out = self
            .client
            .describe_volumes()
            .filters(filter(&format!("tag:{MANAGED_TAG}"), &["true"]))
            .send()
            .await
            .map_err(|e| api_error("listing volumes", e))?;
        let mut views: Vec<VolumeView> = out.volumes().iter().map(view).collect();
        views.sort_by_key(|v| v.created_ms);
        Ok(views)
    }

    /// One runctl-managed volume; a volume runctl did not create is not touched.
    pub async fn volume(&self, id: &str) -> Result<VolumeView, UserError> {
        ids::check_id(id, "vol").map_err(|e| UserError::new(ErrorCode::BadInput, e))?;
        let out = self
            .client
            .describe_volumes()
            .volume_ids(id)
            .send()
            .await
            .map_err(|e| api_error(format!("volume {id}"), e))?;
        let volume = out.volumes().first().ok_or_else(|| {
            UserError::new(
                ErrorCode::NotFound,
                format!("no volume {id} in {}", self.region),
            )
        })?;
        if tag_value(volume.tags(), MANAGED_TAG) != Some("true") {
            return Err(UserError::new(
                ErrorCode::Conflict,
                format!("volume {id} was not created by runctl (no {MANAGED_TAG} tag); runctl leaves it alone"),
            )
            .resolve("manage it with the AWS console or CLI"));
        }
        Ok(view(volume))
    }

    pub async fn create_volume(&self, spec: &NewVolume) -> Result<VolumeView, UserError> {
        let mut tags = vec![(MANAGED_TAG.to_owned(), "true".to_owned())];
        if let Some(name) = &spec.name {
            tags.push(("Name".into(), name.clone()));
        }
        if spec.persistent {
            tags.push(("runctl:persistent".into(), "true".into()));
        }
        if spec.protected {
            tags.push(("runctl:protected".into(), "true".into()));
        }
        let out = self
            .client
            .create_volume()
            .availability_zone(&spec.zone)
            .set_size(spec.size_gb.map(|g| g as i32))
            .set_snapshot_id(spec.snapshot.clone())
            .volume_type(VolumeType::Gp3)
            .encrypted(spec.snapshot.is_none())
            .tag_specifications(tags_for(ResourceType::Volume, &tags))
            .send()
            .await
            .map_err(|e| api_error("creating the volume", e))?;
        let id = out.volume_id().unwrap_or_default();
        self.volume(id).await
    }

    pub async fn attach_volume(
        &self,
        id: &str,
        instance: &str,
        device: &str,
    ) -> Result<VolumeView, UserError> {
        ids::check_device(device).map_err(|e| UserError::new(ErrorCode::BadInput, e))?;
        let volume = self.volume(id).await?;
        let (instance_id, zone) = self.locate_instance(instance).await?;
        if let Some((other, _)) = &volume.attached_to {
            return Err(UserError::new(
                ErrorCode::Conflict,
                format!("volume {id} is attached to {other}"),
            )
            .resolve(format!(
                "detach it first: runctl-controller volume detach {id}"
            )));
        }
        if volume.zone != zone {
            return Err(UserError::new(
                ErrorCode::Conflict,
                format!("volume {id} is in {} but {instance} is in {zone}; a volume attaches only within its zone", volume.zone),
            )
            .resolve(format!("snapshot it and restore it there: runctl-controller volume snapshot {id}, then volume restore SNAPSHOT --instance {instance}")));
        }
        self.client
            .attach_volume()
            .volume_id(id)
            .instance_id(&instance_id)
            .device(device)
            .send()
            .await
            .map_err(|e| api_error(format!("attaching {id} to {instance_id}"), e))?;
        self.volume(id).await
    }

    pub async fn detach_volume(&self, id: &str, force: bool) -> Result<VolumeView, UserError> {
        let volume = self.volume(id).await?;
        let Some((instance, device)) = volume.attached_to else {
            return Err(UserError::new(
                ErrorCode::Conflict,
                format!("volume {id} is not attached"),
            ));
        };
        self.client
            .detach_volume()
            .volume_id(id)
            .instance_id(&instance)
            .device(&device)
            .force(force)
            .send()
            .await
            .map_err(|e| api_error(format!("detaching {id} from {instance}"), e))?;
        self.volume(id).await
    }

    pub async fn delete_volume(&self, id: &str, force: bool) -> Result<VolumeView, UserError> {
        let volume = self.volume(id).await?;
        if let Some((instance, _)) = &volume.attached_to {
            return Err(UserError::new(
                ErrorCode::Conflict,
                format!(
                    "volume {id} is attached to {instance}; an attached volume is never deleted"
                ),
            )
            .resolve(format!(
                "detach it first: runctl-controller volume detach {id}"
            )));
        }
        if !volume.guards.is_empty() && !force {
            return Err(UserError::new(
                ErrorCode::Conflict,
                format!(
                    "volume {id} is tagged {}: it is kept unless you insist",
                    volume.guards.join(", ")
                ),
            )
            .resolve(format!(
                "snapshot it first if in doubt: runctl-controller volume snapshot {id}"
            ))
            .resolve(format!(
                "then delete it anyway: runctl-controller volume delete --force {id}"
            )));
        }
        self.client
            .delete_volume()
            .volume_id(id)
            .send()
            .await
            .map_err(|e| api_error(format!("deleting {id}"), e))?;
        Ok(volume)
    }

    pub async fn snapshot_volume(
        &self,
        id: &str,
        description: Option<&str>,
    ) -> Result<SnapshotView, UserError> {
        let volume = self.volume(id).await?;
        let mut tags = vec![(MANAGED_TAG.to_owned(), "true".to_owned())];
        if let Some(name) = &volume.name {
            tags.push(("Name".into(), name.clone()));
        }
        let out = self
            .client
            .create_snapshot()
            .volume_id(id)
            .description(description.unwrap_or("runctl snapshot"))
            .tag_specifications(tags_for(ResourceType::Snapshot, &tags))
            .send()
            .await
            .map_err(|e| api_error(format!("snapshotting {id}"), e))?;
        Ok(SnapshotView {
            id: out.snapshot_id().unwrap_or_default().to_owned(),
            volume: id.to_owned(),
            state: out
                .state()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
        })
    }

    /// Checks a snapshot exists and returns its size in GiB.
    pub async fn snapshot_size(&self, id: &str) -> Result<i32, UserError> {
        ids::check_id(id, "snap").map_err(|e| UserError::new(ErrorCode::BadInput, e))?;
        let out = self
            .client
            .describe_snapshots()
            .snapshot_ids(id)
            .send()
            .await
            .map_err(|e| api_error(format!("snapshot {id}"), e))?;
        out.snapshots()
            .first()
            .and_then(|s| s.volume_size())
            .ok_or_else(|| {
                UserError::new(
                    ErrorCode::NotFound,
                    format!("no snapshot {id} in {}", self.region),
                )
            })
    }
}
