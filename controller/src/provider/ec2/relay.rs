//! A `runctl-relay` on EC2: the smallest x86_64 instance with a public address, a security
//! group that admits the relay's one port (UDP and TCP) and nothing else, and user-data
//! that installs the static relay for this controller's CA. Relays carry
//! `runctl:role=relay`: `Ec2::instances` leaves them out, so runs never count, list,
//! reconcile or clean them up; only `relay terminate` ends one.

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, InstanceNetworkInterfaceSpecification, InstanceType,
    IpPermission, IpRange, Ipv6Range, ResourceType, Tag, VolumeType,
};
use serde::Serialize;

use super::{
    CloudInstance, Ec2, Image, MANAGED_TAG, USER_TAG, api_error, filter, imdsv2_only, tag_value,
    tags_for,
};
use crate::error::{ErrorCode, UserError};

/// What a runctl instance is for, when it is not a run's (`relay`).
pub const ROLE_TAG: &str = "runctl:role";
pub const RELAY_ROLE: &str = "relay";
/// The relay's name.
pub const NAME_TAG: &str = "runctl:relay";
/// The SHA-256 of the controller CA it serves.
pub const CA_TAG: &str = "runctl:ca";
/// The port it listens on, UDP and TCP.
pub const PORT_TAG: &str = "runctl:relay-port";
/// The smallest x86_64 type there is in every region.
pub const DEFAULT_TYPE: &str = "t3.nano";
/// Amazon Linux 2023 (systemd and cloud-init; the relay is static, so any distribution works).
pub const AMI_NAME: &str = "al2023-ami-2023.*-x86_64";
pub const AMI_OWNER: &str = "amazon";

/// AWS's list prices (us-east-1) for what a relay holds besides its instance.
const PUBLIC_IPV4_PER_HOUR: f64 = 0.005;
const GP3_PER_GB_MONTH: f64 = 0.08;
/// Data sent from EC2 to the internet (the first 10 TB of a month).
pub const EGRESS_PER_GB: f64 = 0.09;
const HOURS_PER_MONTH: f64 = 730.0;

/// Whether an instance's tags make it a relay.
pub fn is_relay(tags: &[Tag]) -> bool {
    tag_value(tags, ROLE_TAG) == Some(RELAY_ROLE)
}

/// The security group of relays on `port`: one per port, so relays on different ports
/// never share (or widen) each other's rules.
pub fn group_name(port: u16) -> String {
    format!("runctl-relay-{port}")
}

/// What a relay costs a month, in dollars, in parts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MonthlyCost {
    /// `None` when the instance type's price is unknown.
    pub instance: Option<f64>,
    pub public_ipv4: f64,
    pub storage: f64,
    pub total: Option<f64>,
}

/// A month (730 h) of the instance at `per_hour`, its public IPv4 address and a gp3 root
/// of `root_gb`. Traffic is extra (`EGRESS_PER_GB`).
pub fn monthly_cost(per_hour: Option<f64>, root_gb: u32) -> MonthlyCost {
    let round = |d: f64| (d * 100.0).round() / 100.0;
    let instance = per_hour.map(|p| round(p * HOURS_PER_MONTH));
    let public_ipv4 = round(PUBLIC_IPV4_PER_HOUR * HOURS_PER_MONTH);
    let storage = round(GP3_PER_GB_MONTH * f64::from(root_gb));
    MonthlyCost {
        instance,
        public_ipv4,
        storage,
        total: instance.map(|i| round(i + public_ipv4 + storage)),
    }
}

/// One inbound rule of a security group, as far as the check needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub protocol: String,
    pub from: Option<i32>,
    pub to: Option<i32>,
    pub v4: Vec<String>,
    pub v6: Vec<String>,
    /// Other sources (security groups, prefix lists).
    pub others: usize,
}

impl From<&IpPermission> for Rule {
    fn from(p: &IpPermission) -> Self {
        Rule {
            protocol: p.ip_protocol().unwrap_or_default().to_owned(),
            from: p.from_port(),
            to: p.to_port(),
            v4: p
                .ip_ranges()
                .iter()
                .filter_map(|r| r.cidr_ip().map(str::to_owned))
                .collect(),
            v6: p
                .ipv6_ranges()
                .iter()
                .filter_map(|r| r.cidr_ipv6().map(str::to_owned))
                .collect(),
            others: p.user_id_group_pairs().len() + p.prefix_list_ids().len(),
        }
    }
}

/// The relay group's rules must be exactly what `relay launch` made: `port` over TCP and
/// over UDP, from anywhere, and nothing else. `Err` says what differs.
pub fn check_ingress(rules: &[Rule], port: u16) -> Result<(), String> {
    let port = i32::from(port);
    for rule in rules {
        let ours = (rule.protocol == "tcp" || rule.protocol == "udp")
            && rule.from == Some(port)
            && rule.to == Some(port)
            && rule.others == 0
            && rule.v4.iter().all(|c| c == "0.0.0.0/0")
            && rule.v6.iter().all(|c| c == "::/0");
        if !ours {
            return Err(format!(
                "it admits {} {}..{} from {:?} {:?}{}, beyond the relay's port {port}",
                rule.protocol,
                rule.from.unwrap_or(-1),
                rule.to.unwrap_or(-1),
                rule.v4,
                rule.v6,
                if rule.others > 0 {
                    " and other groups"
                } else {
                    ""
                }
            ));
        }
    }
    for protocol in ["tcp", "udp"] {
        if !rules
            .iter()
            .any(|r| r.protocol == protocol && r.v4.iter().any(|c| c == "0.0.0.0/0"))
        {
            return Err(format!("it does not admit {protocol} {port} from anywhere"));
        }
    }
    Ok(())
}

/// A relay as EC2 reports it.
#[derive(Debug, Clone, Serialize)]
pub struct RelayInstance {
    pub id: String,
    pub name: String,
    pub state: String,
    pub instance_type: String,
    pub public_ip: Option<String>,
    pub port: Option<u16>,
    /// The controller CA it serves.
    pub ca_sha256: Option<String>,
    pub launched_ms: u64,
}

impl RelayInstance {
    /// `IP:PORT`, once it has a public address.
    pub fn address(&self) -> Option<String> {
        Some(format!("{}:{}", self.public_ip.as_ref()?, self.port?))
    }
}

impl From<&aws_sdk_ec2::types::Instance> for RelayInstance {
    fn from(i: &aws_sdk_ec2::types::Instance) -> Self {
        let c = CloudInstance::from(i);
        RelayInstance {
            id: c.id,
            name: tag_value(i.tags(), NAME_TAG).unwrap_or_default().to_owned(),
            state: c.state,
            instance_type: c.instance_type,
            public_ip: i.public_ip_address().map(str::to_owned),
            port: tag_value(i.tags(), PORT_TAG).and_then(|p| p.parse().ok()),
            ca_sha256: tag_value(i.tags(), CA_TAG).map(str::to_owned),
            launched_ms: c.launched_ms,
        }
    }
}

/// Everything RunInstances needs for a relay, decided before it is called.
#[derive(Debug, Clone)]
pub struct RelayPlan {
    pub name: String,
    pub instance_type: String,
    pub image: Image,
    pub root_gb: u32,
    pub security_group: String,
    pub subnet: Option<String>,
    pub port: u16,
    pub ca_sha256: String,
    pub user_data: String,
    pub client_token: String,
}

/// The root volume: the image's own size, at least 8 GiB.
pub fn root_gb(image: &Image) -> u32 {
    image.root_gb.unwrap_or(8).max(8)
}

impl Ec2 {
    /// The relays runctl launched here (any state but terminated), oldest first.
    pub async fn relays(&self) -> Result<Vec<RelayInstance>, UserError> {
        let filters = [
            filter(&format!("tag:{MANAGED_TAG}"), &["true"]),
            filter(&format!("tag:{ROLE_TAG}"), &[RELAY_ROLE]),
        ];
        let mut found: Vec<RelayInstance> = self
            .describe(&[], &filters, "listing relays")
            .await?
            .iter()
            .map(RelayInstance::from)
            .filter(|r| r.state != "terminated")
            .collect();
        found.sort_by_key(|r| r.launched_ms);
        Ok(found)
    }

    /// The relay named `which` (its name or `i-` id).
    pub async fn relay(&self, which: &str) -> Result<RelayInstance, UserError> {
        self.relays()
            .await?
            .into_iter()
            .find(|r| r.name == which || r.id == which)
            .ok_or_else(|| {
                UserError::new(
                    ErrorCode::NotFound,
                    format!("no relay {which} in {}", self.region),
                )
                .resolve("runctl-controller relay list shows them (only relays runctl launched are touched)")
            })
    }

    /// The group of relays on `port` in the launch's VPC: reused when its rules are still
    /// exactly the relay's, refused when someone changed them, created otherwise.
    pub async fn relay_security_group(
        &self,
        subnet: Option<&str>,
        port: u16,
    ) -> Result<String, UserError> {
        let vpc = self.vpc(subnet).await?;
        let name = group_name(port);
        let existing = self
            .client
            .describe_security_groups()
            .filters(filter("group-name", &[&name]))
            .filters(filter("vpc-id", &[&vpc]))
            .send()
            .await
            .map_err(|e| api_error("finding the relay's security group", e))?;
        if let Some(group) = existing.security_groups().first() {
            let id = group.group_id().unwrap_or_default().to_owned();
            let rules: Vec<Rule> = group.ip_permissions().iter().map(Rule::from).collect();
            return match check_ingress(&rules, port) {
                Ok(()) => Ok(id),
                Err(why) => Err(UserError::new(
                    ErrorCode::Conflict,
                    format!("security group {id} ({name}) is not the relay's any more: {why}"),
                )
                .resolve(format!("restore it to UDP and TCP {port} from anywhere only, or delete it (aws ec2 delete-security-group --group-id {id}) and launch again"))),
            };
        }
        let created = self
            .client
            .create_security_group()
            .group_name(&name)
            .description(format!(
                "runctl relay: UDP and TCP {port} from anywhere, nothing else"
            ))
            .vpc_id(&vpc)
            .tag_specifications(tags_for(
                ResourceType::SecurityGroup,
                &[
                    (MANAGED_TAG.into(), "true".into()),
                    (ROLE_TAG.into(), RELAY_ROLE.into()),
                ],
            ))
            .send()
            .await
            .map_err(|e| api_error("creating the relay's security group", e))?;
        let id = created.group_id().unwrap_or_default().to_owned();
        let rule = |protocol: &str| {
            IpPermission::builder()
                .ip_protocol(protocol)
                .from_port(i32::from(port))
                .to_port(i32::from(port))
                .ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").build())
                .ipv6_ranges(Ipv6Range::builder().cidr_ipv6("::/0").build())
                .build()
        };
        self.client
            .authorize_security_group_ingress()
            .group_id(&id)
            .ip_permissions(rule("udp"))
            .ip_permissions(rule("tcp"))
            .send()
            .await
            .map_err(|e| api_error(format!("opening port {port} on {id}"), e))?;
        Ok(id)
    }

    /// Calls RunInstances for the relay: a public IPv4 address on its one interface,
    /// IMDSv2 only, an encrypted gp3 root, tagged as a relay for this controller's CA.
    pub async fn run_relay(&self, plan: &RelayPlan) -> Result<RelayInstance, UserError> {
        use base64::Engine;
        let mut tags = vec![
            ("Name".to_owned(), format!("runctl-{}", plan.name)),
            (MANAGED_TAG.to_owned(), "true".to_owned()),
            (ROLE_TAG.to_owned(), RELAY_ROLE.to_owned()),
            (NAME_TAG.to_owned(), plan.name.clone()),
            (CA_TAG.to_owned(), plan.ca_sha256.clone()),
            (PORT_TAG.to_owned(), plan.port.to_string()),
        ];
        if let Ok(user) = std::env::var("USER") {
            tags.push((USER_TAG.to_owned(), user));
        }
        let mut volume_tags = tags.clone();
        volume_tags.retain(|(k, _)| k != "Name");
        let out = self
            .client
            .run_instances()
            .image_id(&plan.image.id)
            .instance_type(InstanceType::from(plan.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .user_data(base64::engine::general_purpose::STANDARD.encode(&plan.user_data))
            .network_interfaces(
                InstanceNetworkInterfaceSpecification::builder()
                    .device_index(0)
                    .associate_public_ip_address(true)
                    .groups(&plan.security_group)
                    .set_subnet_id(plan.subnet.clone())
                    .delete_on_termination(true)
                    .build(),
            )
            .metadata_options(imdsv2_only())
            .block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(&plan.image.root_device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .volume_size(plan.root_gb as i32)
                            .volume_type(VolumeType::Gp3)
                            .encrypted(true)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            )
            .tag_specifications(tags_for(ResourceType::Instance, &tags))
            .tag_specifications(tags_for(ResourceType::Volume, &volume_tags))
            .client_token(&plan.client_token)
            .send()
            .await
            .map_err(|e| api_error(format!("launching a {} relay", plan.instance_type), e))?;
        out.instances()
            .first()
            .map(RelayInstance::from)
            .ok_or_else(|| {
                UserError::new(
                    ErrorCode::Internal,
                    "RunInstances answered without an instance",
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_cost(per_hour: Option<f64>, root_gb: u32, total: Option<f64>) {
        assert_eq!(
            monthly_cost(per_hour, root_gb).total,
            total,
            "{per_hour:?} {root_gb}"
        );
    }

    #[test]
    fn a_month_is_the_instance_its_address_and_its_disk() {
        check_cost(Some(0.0052), 8, Some(8.09)); // t3.nano: 3.80 + 3.65 + 0.64
        check_cost(Some(0.0047), 8, Some(7.72)); // t3a.nano
        check_cost(Some(0.0052), 30, Some(9.85));
        check_cost(None, 8, None);
        let parts = monthly_cost(Some(0.0052), 8);
        assert_eq!(
            (parts.instance, parts.public_ipv4, parts.storage),
            (Some(3.8), 3.65, 0.64)
        );
    }

    fn rule(protocol: &str, port: i32, v4: &[&str], v6: &[&str]) -> Rule {
        Rule {
            protocol: protocol.into(),
            from: Some(port),
            to: Some(port),
            v4: v4.iter().map(|s| (*s).to_owned()).collect(),
            v6: v6.iter().map(|s| (*s).to_owned()).collect(),
            others: 0,
        }
    }

    fn check_rules(rules: &[Rule], port: u16, expected: Result<(), &str>) {
        match (check_ingress(rules, port), expected) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(needle)) => assert!(e.contains(needle), "{e}"),
            (got, want) => panic!("{rules:?} on {port}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn the_relay_group_admits_its_port_and_nothing_else() {
        let any4 = &["0.0.0.0/0"][..];
        let any6 = &["::/0"][..];
        let ours = [rule("udp", 443, any4, any6), rule("tcp", 443, any4, any6)];
        check_rules(&ours, 443, Ok(()));
        check_rules(&ours, 4433, Err("beyond the relay's port 4433"));
        check_rules(&ours[..1], 443, Err("does not admit tcp 443"));
        check_rules(&[], 443, Err("does not admit tcp 443"));
        let mut ssh = ours.to_vec();
        ssh.push(rule("tcp", 22, any4, &[]));
        check_rules(&ssh, 443, Err("tcp 22..22"));
        let mut all = ours.to_vec();
        all.push(Rule {
            from: None,
            to: None,
            ..rule("-1", 0, any4, &[])
        });
        check_rules(&all, 443, Err("-1"));
        let narrowed = [rule("udp", 443, &["10.0.0.0/8"], &[]), ours[1].clone()];
        check_rules(&narrowed, 443, Err("10.0.0.0/8"));
        let mut grouped = ours.to_vec();
        grouped[0].others = 1;
        check_rules(&grouped, 443, Err("other groups"));
        assert_eq!(group_name(443), "runctl-relay-443");
    }

    #[test]
    fn relays_are_known_by_their_role_tag() {
        let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
        assert!(is_relay(&[tag(ROLE_TAG, RELAY_ROLE)]));
        assert!(!is_relay(&[tag(ROLE_TAG, "run")]));
        assert!(!is_relay(&[tag(MANAGED_TAG, "true")]));
    }
}
