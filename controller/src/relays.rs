//! `relay ...`: runctl-relays on EC2, straight from this process to EC2 (the cloud is the
//! truth for relays, as for volumes; the daemon keeps no record of them and never
//! touches them).

use std::time::{Duration, Instant};

use protocol::{Fingerprint, InstanceName};
use serde::Serialize;

use crate::cli::{RelayCommand, RelayProvider};
use crate::config::Config;
use crate::error::{ErrorCode, UserError};
use crate::home::Home;
use crate::ipc::{Request, Response};
use crate::provider::artifact;
use crate::provider::ec2::relay::{self, MonthlyCost, RelayInstance, RelayPlan};
use crate::provider::ec2::{Ec2, prices, userdata};
use crate::report::{Printer, table};

/// How long a new relay may take to be running with a public address.
const COME_UP: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_secs(2);

/// A relay with what it costs and how it relates to this controller.
#[derive(Debug, Serialize)]
pub struct RelayView {
    #[serde(flatten)]
    pub relay: RelayInstance,
    pub address: Option<String>,
    /// It serves this controller's CA (and so would take its registration).
    pub serves_this_controller: bool,
    /// It is the `[daemon] relay` in config.toml.
    pub configured: bool,
    pub monthly: MonthlyCost,
    /// Where the instance price comes from.
    pub price_source: Option<String>,
}

fn view(relay: RelayInstance, config: &Config, ca: Option<&Fingerprint>) -> RelayView {
    let price = prices::on_demand(&relay.instance_type, &config.ec2.prices);
    let address = relay.address();
    RelayView {
        serves_this_controller: ca
            .is_some_and(|ca| relay.ca_sha256.as_deref() == Some(&ca.to_string())),
        configured: address.is_some() && config.daemon.relay == address,
        // The root is 8 GiB unless the AMI asked for more; list shows the usual case.
        monthly: relay::monthly_cost(price.as_ref().map(|p| p.per_hour), 8),
        price_source: price.map(|p| p.source),
        address,
        relay,
    }
}

/// "about $8.09 a month: instance $3.80, public IPv4 $3.65, 8 GiB disk $0.64".
fn cost_words(cost: &MonthlyCost, root_gb: u32, instance_type: &str) -> String {
    match (cost.total, cost.instance) {
        (Some(total), Some(instance)) => format!(
            "about {} a month: {instance_type} {}, public IPv4 {}, {root_gb} GiB disk {}, plus {} per GB it sends",
            prices::dollars(total),
            prices::dollars(instance),
            prices::dollars(cost.public_ipv4),
            prices::dollars(cost.storage),
            prices::dollars(relay::EGRESS_PER_GB),
        ),
        _ => format!(
            "{instance_type}'s price is unknown (add it under [ec2.prices]); public IPv4 {} and {root_gb} GiB disk {} a month, plus {} per GB it sends",
            prices::dollars(cost.public_ipv4),
            prices::dollars(cost.storage),
            prices::dollars(relay::EGRESS_PER_GB),
        ),
    }
}

/// The controller CA's fingerprint from `pki/ca.crt`, if the daemon has made one.
fn controller_ca(home: &Home) -> Option<Fingerprint> {
    let cert_pem = std::fs::read_to_string(home.pki().join("ca.crt")).ok()?;
    protocol::tls::Identity {
        cert_pem,
        key_pem: String::new(),
    }
    .fingerprint()
    .ok()
}

pub async fn relay(
    home: &Home,
    config: &Config,
    printer: Printer,
    cmd: RelayCommand,
) -> anyhow::Result<u8> {
    match cmd {
        RelayCommand::Launch {
            provider: RelayProvider::Ec2,
            name,
            instance_type,
            port,
            ami,
        } => launch(home, config, printer, name, instance_type, port, ami).await,
        RelayCommand::List => {
            let ec2 = Ec2::connect(&config.ec2).await?;
            let ca = controller_ca(home);
            let relays: Vec<RelayView> = ec2
                .relays()
                .await?
                .into_iter()
                .map(|r| view(r, config, ca.as_ref()))
                .collect();
            printer.data(&relays, || list_text(&relays));
            Ok(0)
        }
        RelayCommand::Terminate { relay } => {
            let ec2 = Ec2::connect(&config.ec2).await?;
            let found = ec2.relay(&relay).await?;
            ec2.terminate(&found.id).await?;
            let view = view(found, config, controller_ca(home).as_ref());
            printer.data(&view, || {
                let mut text = format!("terminated relay {} ({})\n", view.relay.name, view.relay.id);
                if view.configured {
                    text.push_str("it is the [daemon] relay in config.toml: remove that line (agents keep their direct paths), or launch another\n");
                }
                text
            });
            Ok(0)
        }
    }
}

fn list_text(relays: &[RelayView]) -> String {
    if relays.is_empty() {
        return "no relays (runctl-controller relay launch --provider ec2 starts one)\n".into();
    }
    let mut t = table(&[
        "RELAY",
        "ID",
        "STATE",
        "ADDRESS",
        "TYPE",
        "PER MONTH",
        "CONTROLLER",
    ]);
    for r in relays {
        t.add_row(vec![
            format!("{}{}", r.relay.name, if r.configured { " *" } else { "" }),
            r.relay.id.clone(),
            r.relay.state.clone(),
            r.address.clone().unwrap_or_else(|| "-".into()),
            r.relay.instance_type.clone(),
            r.monthly
                .total
                .map(prices::dollars)
                .unwrap_or_else(|| "?".into()),
            if r.serves_this_controller {
                "this one".into()
            } else {
                format!(
                    "another ({})",
                    r.relay
                        .ca_sha256
                        .as_deref()
                        .map_or("?", |c| &c[..c.len().min(12)])
                )
            },
        ]);
    }
    let mut text = format!("{t}\n");
    if relays.iter().any(|r| r.configured) {
        text.push_str("* the [daemon] relay in config.toml\n");
    }
    text
}

#[derive(Debug, Serialize)]
struct Launched {
    #[serde(flatten)]
    view: RelayView,
    root_gb: u32,
    /// What to put under `[daemon]` in config.toml.
    config_line: String,
}

async fn launch(
    home: &Home,
    config: &Config,
    printer: Printer,
    name: Option<InstanceName>,
    instance_type: Option<String>,
    port: Option<u16>,
    ami: Option<String>,
) -> anyhow::Result<u8> {
    let kind = instance_type.unwrap_or_else(|| config.relay.instance_type.clone());
    let port = port.unwrap_or(config.relay.port);
    let name = match name {
        Some(name) => name.to_string(),
        None => format!("relay-{}", hex::encode(rand::random::<[u8; 3]>())),
    };
    // Checked before anything costs: the binary, where it goes, the CA it will serve.
    let binary = artifact::static_binary(
        config.relay.binary.as_deref(),
        "runctl-relay",
        "build it: scripts/build-static-agent.sh --relay, then set binary under [relay] in config.toml to the path it prints",
    )?;
    let artifacts = artifact::location(config)?;
    let ca = match controller_ca(home) {
        Some(ca) => ca,
        None => {
            // The daemon makes the CA on its first start.
            let Response::Status(_) = crate::ipc::Client::call(home, &Request::Status).await?
            else {
                anyhow::bail!("unexpected answer to status");
            };
            controller_ca(home).ok_or_else(|| {
                UserError::new(ErrorCode::Internal, "the daemon has no CA in pki/ca.crt")
            })?
        }
    };
    let ec2 = Ec2::connect(&config.ec2).await?;
    if ec2.relays().await?.iter().any(|r| r.name == name) {
        return Err(UserError::new(
            ErrorCode::Conflict,
            format!("a relay named {name} exists in {}", ec2.region),
        )
        .resolve("pick another --name, or relay terminate the old one")
        .into());
    }
    let info = ec2.instance_type(&kind).await?;
    let image = ec2
        .image(
            ami.as_deref().or(config.relay.ami.as_deref()),
            relay::AMI_NAME,
            relay::AMI_OWNER,
        )
        .await?;
    let root_gb = relay::root_gb(&image);
    let price = prices::on_demand(&kind, &config.ec2.prices);
    let cost = relay::monthly_cost(price.as_ref().map(|p| p.per_hour), root_gb);
    printer.progress(&format!(
        "{kind}: {} vCPU, {:.1} GiB; AMI {} ({})",
        info.vcpus, info.memory_gib, image.id, image.name
    ));
    printer.progress(&cost_words(&cost, root_gb, &kind));
    let security_group = ec2
        .relay_security_group(config.ec2.subnet.as_deref(), port)
        .await?;
    let (url, sha256) = artifact::publish(
        &config.storage.store_config(home.root()),
        &binary,
        &artifacts,
        "relay",
        Duration::from_secs(config.ec2.presign_secs),
    )
    .await?;
    printer.progress(&format!("runctl-relay {} published", &sha256[..12]));
    let user_data = userdata::render_relay(&userdata::RelayParams {
        name: &name,
        ca_sha256: &ca,
        port,
        relay_url: &url,
        relay_sha256: &sha256,
    })
    .map_err(|e| UserError::new(ErrorCode::Internal, format!("rendering the user-data: {e}")))?;
    let plan = RelayPlan {
        name: name.clone(),
        instance_type: kind.clone(),
        image,
        root_gb,
        security_group,
        subnet: config.ec2.subnet.clone(),
        port,
        ca_sha256: ca.to_string(),
        user_data,
        client_token: format!("runctl-{name}-{}", hex::encode(rand::random::<[u8; 4]>())),
    };
    let launched = ec2.run_relay(&plan).await?;
    printer.progress(&format!("requested {} ({})", launched.id, ec2.region));
    // It comes up with an address, or it is not left behind.
    let up = match wait_until_up(&ec2, &launched.id).await {
        Ok(up) => up,
        Err(e) => {
            let _ = ec2.terminate(&launched.id).await;
            return Err(e
                .resolve(format!(
                    "{} was terminated; try again, or another type or subnet",
                    launched.id
                ))
                .into());
        }
    };
    let address = up.address().unwrap_or_default();
    let config_line = format!("relay = \"{address}\"");
    let mut view = view(up, config, Some(&ca));
    view.monthly = cost;
    let out = Launched {
        view,
        root_gb,
        config_line,
    };
    printer.data(&out, || launched_text(&out, config, &kind));
    Ok(0)
}

fn launched_text(out: &Launched, config: &Config, kind: &str) -> String {
    let r = &out.view;
    let mut text = format!(
        "relay {} ({}) is up at {}\n  {}\n  runctl-relay starts within a minute or two of boot.\n",
        r.relay.name,
        r.relay.id,
        r.address.as_deref().unwrap_or("-"),
        cost_words(&r.monthly, out.root_gb, kind),
    );
    let verb = match &config.daemon.relay {
        Some(old) => format!("replace relay = \"{old}\" under [daemon] in config.toml with"),
        None => "to use it, add under [daemon] in config.toml:".into(),
    };
    text.push_str(&format!(
        "  {verb}\n    {}\n  then runctl-controller shutdown (the daemon starts again on the next command and registers)\n",
        out.config_line
    ));
    text
}

/// Polls until the instance runs with a public address; the last state in the error.
async fn wait_until_up(ec2: &Ec2, id: &str) -> Result<RelayInstance, UserError> {
    let started = Instant::now();
    let mut last = String::from("not listed yet");
    while started.elapsed() < COME_UP {
        // EC2's reads are eventually consistent: a new instance may be missing a while.
        if let Some(r) = ec2.relays().await?.into_iter().find(|r| r.id == id) {
            match (r.state.as_str(), &r.public_ip) {
                ("running", Some(_)) => return Ok(r),
                ("running", None) => last = "running without a public address".into(),
                ("shutting-down" | "stopping" | "stopped", _) => {
                    return Err(UserError::new(
                        ErrorCode::Conflict,
                        format!("relay {id} went {} while starting", r.state),
                    ));
                }
                (state, _) => last = state.to_owned(),
            }
        }
        tokio::time::sleep(POLL).await;
    }
    Err(UserError::new(
        ErrorCode::Internal,
        format!("relay {id} was not running with a public address after {COME_UP:?} ({last})"),
    ))
}
