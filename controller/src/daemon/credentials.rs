//! Handing store credentials to agents whose hosts have none (pods): what each run may
//! reach is recorded when it starts; one task per agent session hands the agent
//! credentials for its instance's live runs when the session starts, when a run is about
//! to start, and again with a third of their life left. Policy is `crate::credentials`'s;
//! this only drives it.

use std::sync::Arc;
use std::time::Duration;

use protocol::{ControllerMsg, InstanceName, RunId, RunSpec};
use tokio::sync::{mpsc, oneshot};

use super::{Daemon, now_ms};
use crate::credentials::{self, Grant, Source};
use crate::error::{ErrorCode, UserError};

/// How soon a failed hand-over is tried again.
const RETRY: Duration = Duration::from_secs(30);

/// How often an agent with no run that needs credentials is looked at again.
const IDLE: Duration = Duration::from_secs(3600);

fn grants_key(run: &RunId) -> String {
    format!("store_grants:{run}")
}

/// Whether `instance`'s agent needs credentials handed to it.
pub(super) fn needed(d: &Daemon, instance: &InstanceName) -> bool {
    d.db.instance(instance)
        .ok()
        .flatten()
        .is_some_and(|row| !row.provider.capabilities().own_store_credentials)
}

/// Records what `spec`'s run may reach, for the credentials of its instance.
pub(super) fn remember(d: &Daemon, spec: &RunSpec) -> Result<(), UserError> {
    let grants = credentials::grants_of(spec)?;
    let json = serde_json::to_string(&grants).expect("grants serialize");
    d.db.set_setting(&grants_key(&spec.run), &json)
        .map_err(|e| UserError::new(ErrorCode::Internal, format!("{e:#}")))
}

/// What a hand-over did.
enum HandedOver {
    /// No live run on the instance uses the store: nothing was sent.
    Nothing,
    /// Credentials were sent, expiring then (Unix ms; `None`: they do not).
    Until(Option<u64>),
}

/// Issues credentials for `instance`'s live runs that use the store and sends them on
/// `tx`.
async fn hand_over(
    d: &Arc<Daemon>,
    instance: &InstanceName,
    handed: bool,
    tx: &mpsc::Sender<ControllerMsg>,
) -> Result<HandedOver, UserError> {
    let internal = |e: anyhow::Error| UserError::new(ErrorCode::Internal, format!("{e:#}"));
    let mut runs = Vec::new();
    let mut grants: Vec<Grant> = Vec::new();
    for row in d.db.runs_on(instance).map_err(internal)? {
        if row.state.is_terminal() {
            continue;
        }
        let Some(json) = d.db.setting(&grants_key(&row.id)).map_err(internal)? else {
            continue;
        };
        let run_grants: Vec<Grant> = serde_json::from_str(&json)
            .map_err(|e| internal(anyhow::anyhow!("run {}'s recorded grants: {e}", row.id)))?;
        if !run_grants.is_empty() {
            runs.push(row.id);
            grants.extend(run_grants);
        }
    }
    if runs.is_empty() {
        return Ok(HandedOver::Nothing);
    }
    if !handed {
        return Err(UserError::new(
            ErrorCode::Agent,
            format!(
                "the agent on {instance} is too old to take store credentials from the controller"
            ),
        )
        .resolve("relaunch the instance with this version of runctl"));
    }
    let source = Source::of(&d.config).ok_or_else(|| {
        UserError::new(
            ErrorCode::BadInput,
            format!("{instance} has no store credentials of its own and none are configured"),
        )
        .resolve("set store_role_arn or store_profile under [runpod]")
    })?;
    let creds = credentials::issue(&d.config, &source, instance.as_str(), runs, &grants).await?;
    let expires = creds.expires_at_ms;
    tracing::info!(
        %instance,
        runs = creds.runs.len(),
        expires_in_s = expires.map(|at| at.saturating_sub(now_ms()) / 1000),
        "store credentials handed over"
    );
    tx.send(ControllerMsg::StoreCredentials(creds))
        .await
        .map_err(|_| {
            UserError::new(
                ErrorCode::Agent,
                format!("the agent on {instance} disconnected"),
            )
        })?;
    Ok(HandedOver::Until(expires))
}

/// A request to hand credentials over now, answered when they are sent.
pub(super) type Request = oneshot::Sender<Result<(), UserError>>;

/// Hands `instance`'s agent credentials for as long as its session lasts (the caller
/// aborts this when it ends): at once, when `requests` asks (a run is starting), and
/// again with a third of their life left.
pub(super) async fn keep_renewed(
    d: Arc<Daemon>,
    instance: InstanceName,
    handed: bool,
    tx: mpsc::Sender<ControllerMsg>,
    mut requests: mpsc::Receiver<Request>,
) {
    let mut wait = Duration::ZERO;
    loop {
        let asked = tokio::select! {
            () = tokio::time::sleep(wait) => None,
            Some(reply) = requests.recv() => Some(reply),
        };
        let result = hand_over(&d, &instance, handed, &tx).await;
        wait = match &result {
            Ok(HandedOver::Until(expires)) => credentials::renew_in(now_ms(), *expires),
            // No run needs them; a run that starts asks.
            Ok(HandedOver::Nothing) => IDLE,
            Err(e) => {
                tracing::warn!(%instance, "handing over store credentials failed: {}", e.message);
                RETRY
            }
        };
        if let Some(reply) = asked {
            let _ = reply.send(result.map(|_| ()));
        }
    }
}
