//! The EC2 provider (aws-sdk-ec2): checks a launch before it costs anything (instance
//! type, AMI and its root device, the running-instance limit), launches with tags on the
//! instance and its volumes, IMDSv2 required, a security group with no ingress, spot
//! through RunInstances market options, and user-data that installs the agent. Also the
//! lifecycle calls (describe, stop, start, terminate), spot prices and EBS volumes.

pub mod ids;
pub mod launch;
pub mod plan;
pub mod prices;
pub mod relay;
pub mod userdata;
pub mod volumes;

use std::fmt::Display;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceType, MarketType, ResourceType, ShutdownBehavior,
    SpotInstanceType, SpotMarketOptions, Tag, TagSpecification, VolumeType,
};

use serde::{Deserialize, Serialize};

use crate::config::Ec2Config;
use crate::error::{ErrorCode, UserError};

/// Every resource runctl creates carries this tag (value `true`); nothing else is listed.
pub const MANAGED_TAG: &str = "runctl:managed";
/// The instance's runctl name.
pub const INSTANCE_TAG: &str = "runctl:instance";
pub const RUN_TAG: &str = "runctl:run";
pub const PROJECT_TAG: &str = "runctl:project";
pub const USER_TAG: &str = "runctl:user";
/// The security group runctl instances share: egress only.
pub const SECURITY_GROUP: &str = "runctl-agent";
/// The data volume's device name at launch.
pub const DATA_DEVICE: &str = "/dev/sdf";

/// How to launch an EC2 instance (`launch --provider ec2`, `run --provider ec2`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ec2Launch {
    pub instance_type: String,
    /// Types to try in order when EC2 has none of `instance_type` (`plan::next_type`).
    #[serde(default)]
    pub other_types: Vec<String>,
    /// An AMI id; default `[ec2] ami`, else the newest Deep Learning AMI.
    pub ami: Option<String>,
    pub spot: bool,
    /// The most to pay per hour for spot (default: the on-demand price).
    pub max_price: Option<f64>,
    /// Launch on-demand when spot capacity is not there.
    pub spot_fallback: bool,
    /// An IAM instance profile (default `[ec2] instance_profile`).
    pub instance_profile: Option<String>,
    /// A data volume at launch: its size in GiB.
    pub volume_gb: Option<u32>,
    /// A data volume at launch, restored from this snapshot.
    pub volume_snapshot: Option<String>,
    /// Keep the data volume when the instance terminates.
    pub keep_volume: bool,
    /// The project the instance is for (a tag), e.g. the project root's name.
    pub project: Option<String>,
    /// Where a node of a gang goes (`run --nodes`): set by the daemon, never by a flag.
    #[serde(default)]
    pub gang: Option<Ec2Gang>,
}

/// A gang's place on EC2 (`run --nodes N`): every node in one cluster placement group, in
/// one availability zone, behind a security group of the gang's own whose one inbound rule
/// admits its members (NCCL and gloo pick ports as they go) and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ec2Gang {
    /// The placement group's name and the security group's: `runctl-gang-RUN`.
    pub name: String,
    pub security_group: String,
    pub zone: String,
}

/// The name of a gang's placement group and security group: `runctl-gang-RUN`, and
/// `runctl-gang-RUN-rN` for the gang of its relaunch N (the place of the gang before it
/// may still be held by instances shutting down).
pub fn gang_name(run: &protocol::RunId, relaunch: u32) -> String {
    match relaunch {
        0 => format!("runctl-gang-{run}"),
        n => format!("runctl-gang-{run}-r{n}"),
    }
}

/// A connected EC2 client for one region.
#[derive(Debug, Clone)]
pub struct Ec2 {
    client: Client,
    pub region: String,
}

/// Turns an EC2 API failure into an error that says what to do.
pub fn api_error<E>(
    what: impl Display,
    err: SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> UserError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code = err.code().unwrap_or_default().to_owned();
    let context = DisplayErrorContext(&err).to_string();
    let detail = err
        .message()
        .map(str::to_owned)
        .unwrap_or_else(|| context.clone());
    classify(&what.to_string(), &code, &detail, &context)
}

/// The error for an EC2 answer `code` with `detail` (`context`: the SDK's whole account of
/// it, for failures without a code): what the user can do about each kind.
pub fn classify(what: &str, code: &str, detail: &str, context: &str) -> UserError {
    let message = format!("{what}: {detail}");
    let coded = || format!("{message} ({code})");
    match code {
        "AuthFailure" | "UnauthorizedOperation" | "InvalidClientTokenId" | "SignatureDoesNotMatch"
        | "OptInRequired" => UserError::new(ErrorCode::BadInput, coded())
            .resolve("check the AWS credentials (AWS_PROFILE, [ec2] profile, aws sso login) and that they may use EC2 in this region")
            .resolve("runctl-controller doctor checks them"),
        "NoSuchEntity" => UserError::new(ErrorCode::BadInput, coded())
            .resolve("create the instance profile: aws iam create-instance-profile --instance-profile-name NAME, then aws iam add-role-to-instance-profile --instance-profile-name NAME --role-name ROLE (a role EC2 may assume, allowed the bucket)")
            .resolve("or name an existing one: runctl-controller config set ec2.instance_profile NAME (or --instance-profile)"),
        "InvalidParameterValue" if detail.contains("iamInstanceProfile") => {
            UserError::new(ErrorCode::BadInput, coded())
                .resolve("the instance profile does not exist in this account: create it (aws iam create-instance-profile) or name an existing one with runctl-controller config set ec2.instance_profile NAME")
                .resolve("runctl-controller doctor checks it")
        }
        c if c.ends_with(".NotFound") || c == "InvalidAMIID.Unavailable" => {
            UserError::new(ErrorCode::NotFound, message)
                .resolve("check the id and the region ([ec2] region, AWS_REGION)")
        }
        c if c.ends_with(".Malformed") || c == "InvalidParameterValue" || c == "InvalidParameterCombination" || c == "InvalidInstanceType" => {
            UserError::new(ErrorCode::BadInput, message)
        }
        "InsufficientInstanceCapacity" | "InsufficientCapacity" => {
            UserError::new(ErrorCode::Capacity, coded())
                .resolve("AWS has none of this type free in this availability zone now: try another zone ([ec2] subnet, a subnet in another zone), another instance type, or later")
                .resolve("for spot: allow an on-demand fallback with --spot-fallback")
        }
        "SpotMaxPriceTooLow" | "MaxSpotInstanceCountExceeded" => {
            UserError::new(ErrorCode::Capacity, coded())
                .resolve("raise --max-price, or allow an on-demand fallback with --spot-fallback")
                .resolve("or try another instance type or zone ([ec2] subnet)")
        }
        "Unsupported" => UserError::new(ErrorCode::Capacity, coded())
            .resolve("this instance type is not offered in this availability zone: use a subnet in another zone ([ec2] subnet) or another type"),
        "VcpuLimitExceeded" => UserError::new(ErrorCode::Capacity, coded())
            .resolve("the account's vCPU quota for this instance family is used up, or is 0 (new accounts start at 0 for GPU types)")
            .resolve("request an increase in the Service Quotas console, Amazon EC2, in this region: Running On-Demand G and VT instances (L-DB2E81BA) for g*, Running On-Demand P instances (L-417A185B) for p*, All G and VT Spot Instance Requests (L-3819A6DF) for spot")
            .resolve("runctl-controller doctor shows the quotas; terminating instances you no longer need frees vCPUs"),
        "InstanceLimitExceeded" | "VolumeLimitExceeded" => {
            UserError::new(ErrorCode::Conflict, coded())
                .resolve("terminate instances (or volumes) you no longer need, or ask AWS for a higher quota (Service Quotas, Amazon EC2)")
        }
        "IncorrectState" | "IncorrectInstanceState" | "VolumeInUse" | "UnsupportedOperation" | "InvalidVolume.ZoneMismatch" => {
            UserError::new(ErrorCode::Conflict, coded())
        }
        "" => {
            if context.contains("credentials") {
                UserError::new(ErrorCode::BadInput, format!("{what}: no AWS credentials: {context}"))
                    .resolve("export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or set [ec2] profile")
            } else {
                UserError::new(ErrorCode::Internal, format!("{what}: could not reach EC2: {context}"))
                    .resolve("check the network, the region ([ec2] region, AWS_REGION) and [ec2] endpoint_url")
            }
        }
        _ => UserError::new(ErrorCode::Internal, coded()),
    }
}

pub fn filter(name: &str, values: &[&str]) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.iter().map(|v| (*v).to_owned()).collect()))
        .build()
}

pub fn tag_value<'a>(tags: &'a [Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

fn millis(t: Option<&aws_sdk_ec2::primitives::DateTime>) -> u64 {
    t.and_then(|t| t.to_millis().ok()).unwrap_or(0).max(0) as u64
}

/// What EC2 says about an instance type.
#[derive(Debug, Clone)]
pub struct TypeInfo {
    pub vcpus: i32,
    pub memory_gib: f64,
    /// E.g. `1x NVIDIA A10G (24 GiB)`; `None` for a type without GPUs.
    pub gpus: Option<String>,
}

/// The AMI a launch uses.
#[derive(Debug, Clone)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub root_device: String,
    /// The size of its root snapshot, where the image says.
    pub root_gb: Option<u32>,
}

/// A runctl instance as EC2 reports it.
#[derive(Debug, Clone)]
pub struct CloudInstance {
    pub id: String,
    /// The `runctl:instance` tag.
    pub name: Option<String>,
    pub state: String,
    pub instance_type: String,
    pub spot: bool,
    pub launched_ms: u64,
    pub zone: String,
    pub reason: Option<String>,
    /// Its address inside its VPC (a gang's `MASTER_ADDR` is node 0's).
    pub private_ip: Option<String>,
}

impl From<&aws_sdk_ec2::types::Instance> for CloudInstance {
    fn from(i: &aws_sdk_ec2::types::Instance) -> Self {
        CloudInstance {
            id: i.instance_id().unwrap_or_default().to_owned(),
            name: tag_value(i.tags(), INSTANCE_TAG).map(str::to_owned),
            state: i
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_owned())
                .unwrap_or_default(),
            instance_type: i
                .instance_type()
                .map(|t| t.as_str().to_owned())
                .unwrap_or_default(),
            spot: i.instance_lifecycle().is_some_and(|l| l.as_str() == "spot"),
            launched_ms: millis(i.launch_time()),
            zone: i
                .placement()
                .and_then(|p| p.availability_zone())
                .unwrap_or_default()
                .to_owned(),
            reason: i
                .state_reason()
                .and_then(|r| r.message())
                .map(str::to_owned),
            private_ip: i.private_ip_address().map(str::to_owned),
        }
    }
}

/// Everything RunInstances needs, decided before it is called.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    pub instance_type: String,
    pub image: Image,
    pub security_group: String,
    pub subnet: Option<String>,
    pub user_data: String,
    pub tags: Vec<(String, String)>,
    /// `Some(max $/h)` for spot (`None` inside: EC2's default, the on-demand price).
    pub spot: Option<Option<f64>>,
    pub instance_profile: Option<String>,
    pub root_gb: u32,
    pub data_volume: Option<DataVolume>,
    /// Makes a retried RunInstances launch at most one instance.
    pub client_token: String,
    /// A gang's node: its placement group and zone.
    pub placement: Option<(String, String)>,
    /// The zone asked for (after EC2's own choice had no capacity); `None`: EC2 picks.
    pub zone: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DataVolume {
    pub size_gb: Option<u32>,
    pub snapshot: Option<String>,
    pub keep: bool,
}

impl Ec2 {
    /// A client for `[ec2]`'s region (else the AWS configuration's), with the standard
    /// credential chain.
    pub async fn connect(config: &Ec2Config) -> Result<Self, UserError> {
        let sdk = storage::aws_sdk_config(
            config.region.as_deref(),
            config.endpoint_url.as_deref(),
            config.profile.as_deref(),
            storage::dns::Dns::System,
        )
        .await
        .map_err(crate::objects::store_error)?;
        let region = sdk
            .region()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "us-east-1".into());
        ids::check_region(&region).map_err(|e| {
            UserError::new(ErrorCode::BadInput, e).resolve("set [ec2] region or AWS_REGION")
        })?;
        Ok(Ec2 {
            client: Client::new(&sdk),
            region,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Checks EC2 offers `kind` here, and what it has.
    pub async fn instance_type(&self, kind: &str) -> Result<TypeInfo, UserError> {
        ids::check_instance_type(kind).map_err(|e| UserError::new(ErrorCode::BadInput, e))?;
        let out = self
            .client
            .describe_instance_types()
            .instance_types(InstanceType::from(kind))
            .send()
            .await
            .map_err(|e| {
                let user = api_error(format!("instance type {kind}"), e);
                if user.code == ErrorCode::BadInput {
                    user.resolve(format!(
                        "list what the region offers: aws ec2 describe-instance-types --region {}",
                        self.region
                    ))
                } else {
                    user
                }
            })?;
        // A type EC2 has not at all is bad input; one sold elsewhere but not here, a
        // shortage another type may make up for.
        let not_offered = |code| {
            UserError::new(
                code,
                format!("EC2 does not offer {kind} in {}", self.region),
            )
            .resolve("pick another type (e.g. g5.xlarge, g6.xlarge) or region ([ec2] region)")
        };
        let info = out
            .instance_types()
            .first()
            .ok_or_else(|| not_offered(ErrorCode::BadInput))?;
        if self
            .offerings(kind, aws_sdk_ec2::types::LocationType::Region)
            .await?
            .is_empty()
        {
            return Err(not_offered(ErrorCode::Capacity));
        }
        if !info
            .processor_info()
            .map(|p| {
                p.supported_architectures()
                    .iter()
                    .any(|a| a.as_str() == "x86_64")
            })
            .unwrap_or(true)
        {
            return Err(UserError::new(
                ErrorCode::BadInput,
                format!("{kind} is not an x86_64 type; the runctl agent is built for x86_64"),
            )
            .resolve("pick an x86_64 GPU type (g4dn, g5, g6, g6e, p4d, p5)"));
        }
        let gpus = info.gpu_info().map(|g| {
            g.gpus()
                .iter()
                .map(|d| {
                    format!(
                        "{}x {} {} ({} GiB)",
                        d.count().unwrap_or(0),
                        d.manufacturer().unwrap_or(""),
                        d.name().unwrap_or("GPU"),
                        d.memory_info().and_then(|m| m.size_in_mib()).unwrap_or(0) / 1024
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        });
        Ok(TypeInfo {
            vcpus: info
                .v_cpu_info()
                .and_then(|v| v.default_v_cpus())
                .unwrap_or(0),
            memory_gib: info
                .memory_info()
                .and_then(|m| m.size_in_mib())
                .unwrap_or(0) as f64
                / 1024.0,
            gpus,
        })
    }

    /// The AMI to launch: `ami` if given (checked), else the newest available x86_64 image
    /// named like `name` owned by `owner`. Its root device must be in its block devices.
    pub async fn image(
        &self,
        ami: Option<&str>,
        name: &str,
        owner: &str,
    ) -> Result<Image, UserError> {
        let mut request = self.client.describe_images();
        match ami {
            Some(ami) => {
                ids::check_id(ami, "ami").map_err(|e| UserError::new(ErrorCode::BadInput, e))?;
                request = request.image_ids(ami);
            }
            None => {
                request = request
                    .owners(owner)
                    .filters(filter("name", &[name]))
                    .filters(filter("state", &["available"]))
                    .filters(filter("architecture", &["x86_64"]));
            }
        }
        let out = request
            .send()
            .await
            .map_err(|e| api_error("looking up the AMI", e))?;
        let mut images: Vec<_> = out.images().to_vec();
        images.sort_by(|a, b| b.creation_date().cmp(&a.creation_date()));
        let Some(image) = images.into_iter().next() else {
            return Err(match ami {
                Some(ami) => UserError::new(
                    ErrorCode::NotFound,
                    format!("AMI {ami} does not exist in {}", self.region),
                )
                .resolve("AMI ids differ per region: look it up for this region"),
                None => UserError::new(
                    ErrorCode::NotFound,
                    format!(
                        "no AMI named like {name:?} (owner {owner}) in {}",
                        self.region
                    ),
                )
                .resolve("pass one with --ami, or set [ec2] ami (or ami_name/ami_owner)"),
            });
        };
        let id = image.image_id().unwrap_or_default().to_owned();
        if image.architecture().is_some_and(|a| a.as_str() != "x86_64") {
            return Err(UserError::new(
                ErrorCode::BadInput,
                format!("AMI {id} is not x86_64; the runctl agent is built for x86_64"),
            ));
        }
        let root = image.root_device_name().unwrap_or_default().to_owned();
        let root_ebs = image
            .block_device_mappings()
            .iter()
            .find(|m| !root.is_empty() && m.device_name() == Some(root.as_str()))
            .and_then(|m| m.ebs());
        if root_ebs.is_none() {
            return Err(UserError::new(
                ErrorCode::BadInput,
                format!("AMI {id} has no EBS root device (root device {root:?}); runctl needs an EBS-backed AMI"),
            )
            .resolve("pick an EBS-backed AMI (any Deep Learning AMI is)"));
        }
        Ok(Image {
            name: image.name().unwrap_or_default().to_owned(),
            root_gb: root_ebs
                .and_then(|e| e.volume_size())
                .and_then(|g| u32::try_from(g).ok()),
            id,
            root_device: root,
        })
    }

    /// The runctl instances EC2 knows (any state but terminated), optionally only `ids`.
    /// Relays are not among them: runs never see, count or clean them up.
    pub async fn instances(&self, ids: &[String]) -> Result<Vec<CloudInstance>, UserError> {
        let found = self
            .describe(
                ids,
                &[filter(&format!("tag:{MANAGED_TAG}"), &["true"])],
                "listing instances",
            )
            .await?;
        Ok(found
            .iter()
            .filter(|i| !relay::is_relay(i.tags()))
            .map(CloudInstance::from)
            .collect())
    }

    /// Every instance DescribeInstances returns for `ids` (all if empty) and `filters`,
    /// page by page.
    pub(crate) async fn describe(
        &self,
        ids: &[String],
        filters: &[Filter],
        what: &str,
    ) -> Result<Vec<aws_sdk_ec2::types::Instance>, UserError> {
        let mut found = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut request = self
                .client
                .describe_instances()
                .set_filters(Some(filters.to_vec()))
                .set_next_token(next.take());
            if !ids.is_empty() {
                request = request.set_instance_ids(Some(ids.to_vec()));
            }
            let out = request.send().await.map_err(|e| api_error(what, e))?;
            for reservation in out.reservations() {
                found.extend(reservation.instances().iter().cloned());
            }
            next = out.next_token().map(str::to_owned);
            if next.is_none() {
                return Ok(found);
            }
        }
    }

    /// One instance by id; `None` once EC2 has forgotten it.
    pub async fn instance(&self, id: &str) -> Result<Option<CloudInstance>, UserError> {
        match self.instances(&[id.to_owned()]).await {
            Ok(mut found) => Ok(found.pop()),
            Err(e) if e.code == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// How many runctl instances are running or on their way.
    pub async fn running_count(&self) -> Result<usize, UserError> {
        Ok(self
            .instances(&[])
            .await?
            .iter()
            .filter(|i| i.state == "pending" || i.state == "running")
            .count())
    }

    /// The shared security group with no ingress rules, in the VPC the launch uses:
    /// reused when it exists (and refused if someone opened it), created otherwise.
    pub async fn security_group(&self, subnet: Option<&str>) -> Result<String, UserError> {
        let vpc = self.vpc(subnet).await?;
        if let Some(id) = self.existing_group(&vpc).await? {
            return Ok(id);
        }
        let created = self
            .client
            .create_security_group()
            .group_name(SECURITY_GROUP)
            .description("runctl agents: outbound only, no inbound rules")
            .vpc_id(&vpc)
            .tag_specifications(tags_for(
                ResourceType::SecurityGroup,
                &[(MANAGED_TAG.into(), "true".into())],
            ))
            .send()
            .await;
        match created {
            Ok(out) => Ok(out.group_id().unwrap_or_default().to_owned()),
            // Another launch made it first.
            Err(e) if e.code() == Some("InvalidGroup.Duplicate") => self
                .existing_group(&vpc)
                .await?
                .ok_or_else(|| api_error("creating the security group", e)),
            Err(e) => Err(api_error("creating the security group", e)),
        }
    }

    /// The zone a gang's nodes go to: `subnet`'s, else the first of the region's zones that
    /// offers `kind` (a cluster placement group holds one zone).
    pub async fn gang_zone(&self, kind: &str, subnet: Option<&str>) -> Result<String, UserError> {
        if let Some(subnet) = subnet {
            return Ok(self.subnet(subnet).await?.0);
        }
        let mut zones = self
            .offerings(kind, aws_sdk_ec2::types::LocationType::AvailabilityZone)
            .await?;
        zones.sort_unstable();
        zones.into_iter().next().ok_or_else(|| {
            UserError::new(
                ErrorCode::BadInput,
                format!("no availability zone of {} offers {kind}", self.region),
            )
            .resolve("pick another instance type or region")
        })
    }

    /// The zones of this region that offer `kind`, in name order.
    pub async fn offered_zones(&self, kind: &str) -> Result<Vec<String>, UserError> {
        let mut zones = self
            .offerings(kind, aws_sdk_ec2::types::LocationType::AvailabilityZone)
            .await?;
        zones.sort_unstable();
        Ok(zones)
    }

    /// Where (regions or zones, as `scope` says) EC2 offers `kind`.
    async fn offerings(
        &self,
        kind: &str,
        scope: aws_sdk_ec2::types::LocationType,
    ) -> Result<Vec<String>, UserError> {
        let out = self
            .client
            .describe_instance_type_offerings()
            .location_type(scope)
            .filters(filter("instance-type", &[kind]))
            .send()
            .await
            .map_err(|e| api_error(format!("where {kind} is offered"), e))?;
        Ok(out
            .instance_type_offerings()
            .iter()
            .filter_map(|o| o.location().map(str::to_owned))
            .collect())
    }

    /// Makes a gang's place: its cluster placement group and its security group in `vpc`,
    /// whose one inbound rule admits traffic from its own members on every port. Either
    /// both exist when this returns, or neither.
    pub async fn create_gang(
        &self,
        name: &str,
        vpc: &str,
        tags: &[(String, String)],
    ) -> Result<String, UserError> {
        self.client
            .create_placement_group()
            .group_name(name)
            .strategy(aws_sdk_ec2::types::PlacementStrategy::Cluster)
            .tag_specifications(tags_for(ResourceType::PlacementGroup, tags))
            .send()
            .await
            .map_err(|e| api_error(format!("creating placement group {name}"), e))?;
        let group = async {
            let created = self
                .client
                .create_security_group()
                .group_name(name)
                .description("runctl gang: inbound from its own members only")
                .vpc_id(vpc)
                .tag_specifications(tags_for(ResourceType::SecurityGroup, tags))
                .send()
                .await
                .map_err(|e| api_error(format!("creating security group {name}"), e))?;
            let id = created.group_id().unwrap_or_default().to_owned();
            let members = aws_sdk_ec2::types::IpPermission::builder()
                .ip_protocol("-1")
                .user_id_group_pairs(
                    aws_sdk_ec2::types::UserIdGroupPair::builder()
                        .group_id(&id)
                        .build(),
                )
                .build();
            let opened = self
                .client
                .authorize_security_group_ingress()
                .group_id(&id)
                .ip_permissions(members)
                .send()
                .await
                .map_err(|e| api_error(format!("admitting {id}'s members to each other"), e));
            if let Err(e) = opened {
                let _ = self
                    .client
                    .delete_security_group()
                    .group_id(&id)
                    .send()
                    .await;
                return Err(e);
            }
            Ok(id)
        }
        .await;
        if group.is_err() {
            let _ = self
                .client
                .delete_placement_group()
                .group_name(name)
                .send()
                .await;
        }
        group
    }

    /// Deletes a gang's security group and placement group once no instance holds them;
    /// `Ok(false)` while one still does (an instance shutting down), to be tried again. One
    /// already gone counts as deleted.
    pub async fn delete_gang(&self, name: &str) -> Result<bool, UserError> {
        let groups = self
            .client
            .describe_security_groups()
            .filters(filter("group-name", &[name]))
            .filters(filter(&format!("tag:{MANAGED_TAG}"), &["true"]))
            .send()
            .await
            .map_err(|e| api_error(format!("finding security group {name}"), e))?;
        for group in groups.security_groups() {
            let id = group.group_id().unwrap_or_default();
            match self
                .client
                .delete_security_group()
                .group_id(id)
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) if e.code() == Some("DependencyViolation") => return Ok(false),
                Err(e) if e.code() == Some("InvalidGroup.NotFound") => {}
                Err(e) => return Err(api_error(format!("deleting security group {id}"), e)),
            }
        }
        match self
            .client
            .delete_placement_group()
            .group_name(name)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("InvalidPlacementGroup.InUse") => Ok(false),
            Err(e) if e.code() == Some("InvalidPlacementGroup.Unknown") => Ok(true),
            Err(e) => Err(api_error(format!("deleting placement group {name}"), e)),
        }
    }

    /// `subnet`'s availability zone and VPC.
    async fn subnet(&self, subnet: &str) -> Result<(String, String), UserError> {
        let out = self
            .client
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await
            .map_err(|e| api_error(format!("subnet {subnet}"), e))?;
        out.subnets()
            .first()
            .and_then(|s| Some((s.availability_zone()?.to_owned(), s.vpc_id()?.to_owned())))
            .ok_or_else(|| {
                UserError::new(
                    ErrorCode::NotFound,
                    format!("subnet {subnet} does not exist in {}", self.region),
                )
            })
    }

    /// The VPC of `subnet`, else the region's default VPC.
    pub async fn vpc(&self, subnet: Option<&str>) -> Result<String, UserError> {
        Ok(match subnet {
            Some(subnet) => self.subnet(subnet).await?.1,
            None => {
                let out = self
                    .client
                    .describe_vpcs()
                    .filters(filter("isDefault", &["true"]))
                    .send()
                    .await
                    .map_err(|e| api_error("finding the default VPC", e))?;
                out.vpcs()
                    .first()
                    .and_then(|v| v.vpc_id())
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        UserError::new(
                            ErrorCode::BadInput,
                            format!("{} has no default VPC", self.region),
                        )
                        .resolve("set [ec2] subnet to a subnet with outbound internet access")
                    })?
            }
        })
    }

    /// The shared group in `vpc`, if it exists; refused if someone gave it inbound rules.
    async fn existing_group(&self, vpc: &str) -> Result<Option<String>, UserError> {
        let out = self
            .client
            .describe_security_groups()
            .filters(filter("group-name", &[SECURITY_GROUP]))
            .filters(filter("vpc-id", &[vpc]))
            .send()
            .await
            .map_err(|e| api_error("finding the security group", e))?;
        let Some(group) = out.security_groups().first() else {
            return Ok(None);
        };
        let id = group.group_id().unwrap_or_default().to_owned();
        if !group.ip_permissions().is_empty() {
            return Err(UserError::new(
                ErrorCode::Conflict,
                format!("security group {id} ({SECURITY_GROUP}) has inbound rules; runctl instances need none and get none"),
            )
            .resolve(format!("remove its inbound rules: aws ec2 revoke-security-group-ingress --group-id {id} ...")));
        }
        Ok(Some(id))
    }

    /// The current spot price of `kind` (the lowest over the region's zones), if EC2 has one.
    pub async fn spot_price(&self, kind: &str) -> Result<Option<(f64, String)>, UserError> {
        let out = self
            .client
            .describe_spot_price_history()
            .instance_types(InstanceType::from(kind))
            .product_descriptions("Linux/UNIX")
            .start_time(aws_sdk_ec2::primitives::DateTime::from(
                std::time::SystemTime::now(),
            ))
            .send()
            .await
            .map_err(|e| api_error(format!("spot prices of {kind}"), e))?;
        Ok(out
            .spot_price_history()
            .iter()
            .filter_map(|p| {
                let price = p.spot_price()?.parse::<f64>().ok()?;
                Some((price, p.availability_zone().unwrap_or_default().to_owned()))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0)))
    }

    /// Calls RunInstances; `spot` overrides the plan's market (for the fallback).
    pub async fn run_instance(
        &self,
        plan: &LaunchPlan,
        spot: bool,
    ) -> Result<CloudInstance, UserError> {
        use base64::Engine;
        let mut volume_tags = plan.tags.clone();
        volume_tags.retain(|(k, _)| k != "Name");
        let mut root = EbsBlockDevice::builder()
            .volume_size(plan.root_gb as i32)
            .volume_type(VolumeType::Gp3)
            .delete_on_termination(true);
        root = root.encrypted(true);
        let mut mappings = vec![
            BlockDeviceMapping::builder()
                .device_name(&plan.image.root_device)
                .ebs(root.build())
                .build(),
        ];
        if let Some(data) = &plan.data_volume {
            mappings.push(
                BlockDeviceMapping::builder()
                    .device_name(DATA_DEVICE)
                    .ebs(
                        EbsBlockDevice::builder()
                            .set_volume_size(data.size_gb.map(|g| g as i32))
                            .set_snapshot_id(data.snapshot.clone())
                            .volume_type(VolumeType::Gp3)
                            .delete_on_termination(!data.keep)
                            .build(),
                    )
                    .build(),
            );
        }
        let mut request = self
            .client
            .run_instances()
            .image_id(&plan.image.id)
            .instance_type(InstanceType::from(plan.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .user_data(base64::engine::general_purpose::STANDARD.encode(&plan.user_data))
            .security_group_ids(&plan.security_group)
            .set_subnet_id(plan.subnet.clone())
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .metadata_options(imdsv2_only())
            .set_block_device_mappings(Some(mappings))
            .tag_specifications(tags_for(ResourceType::Instance, &plan.tags))
            .tag_specifications(tags_for(ResourceType::Volume, &volume_tags))
            .client_token(if spot {
                plan.client_token.clone()
            } else {
                format!("{}-od", plan.client_token)
            });
        if let Some((group, zone)) = &plan.placement {
            request = request.placement(
                aws_sdk_ec2::types::Placement::builder()
                    .group_name(group)
                    .availability_zone(zone)
                    .build(),
            );
        } else if let Some(zone) = &plan.zone {
            request = request.placement(
                aws_sdk_ec2::types::Placement::builder()
                    .availability_zone(zone)
                    .build(),
            );
        }
        if let Some(profile) = &plan.instance_profile {
            let spec = if profile.starts_with("arn:") {
                IamInstanceProfileSpecification::builder().arn(profile)
            } else {
                IamInstanceProfileSpecification::builder().name(profile)
            };
            request = request.iam_instance_profile(spec.build());
        }
        if spot {
            let max_price = plan.spot.flatten();
            request = request
                .instance_market_options(
                    InstanceMarketOptionsRequest::builder()
                        .market_type(MarketType::Spot)
                        .spot_options(
                            SpotMarketOptions::builder()
                                .set_max_price(max_price.map(|p| format!("{p:.4}")))
                                .spot_instance_type(SpotInstanceType::OneTime)
                                .instance_interruption_behavior(
                                    InstanceInterruptionBehavior::Terminate,
                                )
                                .build(),
                        )
                        .build(),
                )
                .tag_specifications(tags_for(ResourceType::SpotInstancesRequest, &volume_tags));
        }
        let out = request
            .send()
            .await
            .map_err(|e| api_error(format!("launching a {}", plan.instance_type), e))?;
        let i = out.instances().first().ok_or_else(|| {
            UserError::new(
                ErrorCode::Internal,
                "RunInstances answered without an instance",
            )
        })?;
        // RunInstances answers before the market is on the instance's record.
        Ok(CloudInstance {
            spot,
            instance_type: plan.instance_type.clone(),
            ..CloudInstance::from(i)
        })
    }

    pub async fn terminate(&self, id: &str) -> Result<(), UserError> {
        self.client
            .terminate_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|e| api_error(format!("terminating {id}"), e))?;
        Ok(())
    }

    pub async fn stop(&self, id: &str) -> Result<(), UserError> {
        self.client
            .stop_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|e| api_error(format!("stopping {id}"), e))?;
        Ok(())
    }

    pub async fn start(&self, id: &str) -> Result<(), UserError> {
        self.client
            .start_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|e| api_error(format!("starting {id}"), e))?;
        Ok(())
    }

    /// The user-data an instance was launched with (base64 decoded).
    pub async fn user_data(&self, id: &str) -> Result<String, UserError> {
        use base64::Engine;
        let out = self
            .client
            .describe_instance_attribute()
            .instance_id(id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .map_err(|e| api_error(format!("the user-data of {id}"), e))?;
        let encoded = out.user_data().and_then(|v| v.value()).unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| {
                UserError::new(
                    ErrorCode::Internal,
                    format!("the user-data of {id} is not base64: {e}"),
                )
            })?;
        String::from_utf8(bytes).map_err(|e| {
            UserError::new(
                ErrorCode::Internal,
                format!("the user-data of {id} is not UTF-8: {e}"),
            )
        })
    }
}

/// Instance metadata by IMDSv2 (session tokens) only, one hop: a process in a container
/// on the instance cannot reach it.
pub fn imdsv2_only() -> InstanceMetadataOptionsRequest {
    InstanceMetadataOptionsRequest::builder()
        .http_tokens(HttpTokensState::Required)
        .http_endpoint(InstanceMetadataEndpointState::Enabled)
        .http_put_response_hop_limit(1)
        .build()
}

pub fn tags_for(kind: ResourceType, tags: &[(String, String)]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(
            tags.iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect(),
        ))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_a_user_can_fix_says_how() {
        // (code, detail, exit kind, a fix must mention)
        let cases = [
            (
                "VcpuLimitExceeded",
                "You have requested more vCPU capacity than your current vCPU limit of 0 allows",
                ErrorCode::Capacity,
                "L-DB2E81BA",
            ),
            (
                "InsufficientInstanceCapacity",
                "We currently do not have sufficient g5.xlarge capacity in the Availability Zone you requested",
                ErrorCode::Capacity,
                "another zone",
            ),
            (
                "Unsupported",
                "Your requested instance type (p4d.24xlarge) is not supported in your requested Availability Zone (us-east-1e)",
                ErrorCode::Capacity,
                "another zone",
            ),
            (
                "NoSuchEntity",
                "Instance profile runctl-agent not found",
                ErrorCode::BadInput,
                "create-instance-profile",
            ),
            (
                "InvalidParameterValue",
                "Value (runctl-agent) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name",
                ErrorCode::BadInput,
                "instance profile",
            ),
            (
                "AuthFailure",
                "AWS was not able to validate the provided access credentials",
                ErrorCode::BadInput,
                "credentials",
            ),
            (
                "SpotMaxPriceTooLow",
                "Your Spot request price of 0.1 is lower than the minimum",
                ErrorCode::Capacity,
                "--max-price",
            ),
            (
                "InstanceLimitExceeded",
                "Your quota allows for 0 more running instance(s)",
                ErrorCode::Conflict,
                "quota",
            ),
        ];
        for (code, detail, kind, fix) in cases {
            let e = classify("launching", code, detail, "");
            assert_eq!(e.code, kind, "{code}");
            assert!(
                e.message.contains(code) && e.message.contains(detail),
                "{code}: {}",
                e.message
            );
            assert!(
                e.to_resolve.iter().any(|r| r.contains(fix)),
                "{code}: {:?}",
                e.to_resolve
            );
        }
        let no_creds = classify("listing", "", "", "failed to load credentials");
        assert!(no_creds.to_resolve[0].contains("AWS_ACCESS_KEY_ID"));
    }
}
