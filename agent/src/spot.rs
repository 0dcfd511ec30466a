//! EC2 spot notices, from instance metadata with IMDSv2: a session token (PUT), then
//! `instance-life-cycle` once (only spot instances are polled), then every 5 s
//! `spot/instance-action` (an interruption: the runs' process groups get their spot signal)
//! and `events/recommendations/rebalance` (recorded, no signal). The endpoint is
//! configurable, so tests run against a local metadata double. Parsing is pure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::Notice;
use serde::Deserialize;

use crate::runs::Runs;

pub const POLL: Duration = Duration::from_secs(5);
const TOKEN_TTL_SECS: u64 = 21_600;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceAction {
    pub action: String,
    pub time: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct Rebalance {
    #[serde(rename = "noticeTime")]
    notice_time: String,
}

/// The body of `spot/instance-action`, if it is a notice.
pub fn parse_instance_action(body: &str) -> Option<InstanceAction> {
    serde_json::from_str(body).ok()
}

/// The body of `events/recommendations/rebalance`: the notice time, if it is one.
pub fn parse_rebalance(body: &str) -> Option<String> {
    serde_json::from_str::<Rebalance>(body)
        .ok()
        .map(|r| r.notice_time)
}

/// A blocking IMDSv2 client (run it on a blocking thread).
#[derive(Debug)]
struct Imds {
    endpoint: String,
    agent: ureq::Agent,
    token: Option<(String, Instant)>,
}

impl Imds {
    fn new(endpoint: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Imds {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            agent,
            token: None,
        }
    }

    fn token(&mut self) -> Result<String, String> {
        if let Some((token, expires)) = &self.token
            && Instant::now() < *expires
        {
            return Ok(token.clone());
        }
        let mut response = self
            .agent
            .put(format!("{}/latest/api/token", self.endpoint))
            .header(
                "X-aws-ec2-metadata-token-ttl-seconds",
                TOKEN_TTL_SECS.to_string(),
            )
            .send_empty()
            .map_err(|e| format!("asking {} for a metadata token: {e}", self.endpoint))?;
        if response.status() != 200 {
            return Err(format!(
                "{} refused a metadata token: HTTP {}",
                self.endpoint,
                response.status()
            ));
        }
        let token = response
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("reading a metadata token: {e}"))?;
        let expires = Instant::now() + Duration::from_secs(TOKEN_TTL_SECS - 60);
        self.token = Some((token.clone(), expires));
        Ok(token)
    }

    /// The body at `path` under `latest/meta-data/`, or `None` for 404.
    fn get(&mut self, path: &str) -> Result<Option<String>, String> {
        let token = self.token()?;
        let url = format!("{}/latest/meta-data/{path}", self.endpoint);
        let mut response = self
            .agent
            .get(&url)
            .header("X-aws-ec2-metadata-token", &token)
            .call()
            .map_err(|e| format!("reading {url}: {e}"))?;
        match response.status().as_u16() {
            200 => response
                .body_mut()
                .read_to_string()
                .map(Some)
                .map_err(|e| format!("reading {url}: {e}")),
            404 => Ok(None),
            401 => {
                self.token = None;
                Err(format!("{url}: the metadata token was refused"))
            }
            status => Err(format!("{url}: HTTP {status}")),
        }
    }
}

/// Polls for spot notices for as long as the agent runs; returns at once when the instance
/// is not spot.
pub async fn watch(endpoint: String, runs: Arc<Runs>) {
    let mut imds = Imds::new(&endpoint);
    // Whether this is a spot instance; asked until the endpoint answers.
    loop {
        let Some((back, answer)) = blocking(imds, |imds| imds.get("instance-life-cycle")).await
        else {
            return;
        };
        imds = back;
        match answer {
            Ok(Some(kind)) if kind.trim() == "spot" => break,
            Ok(other) => {
                tracing::info!(
                    "not a spot instance ({}): no interruption notices to watch",
                    other.as_deref().unwrap_or("no life cycle")
                );
                return;
            }
            Err(e) => {
                tracing::warn!("instance metadata unreachable, retrying: {e}");
                tokio::time::sleep(POLL).await;
            }
        }
    }
    tracing::info!("spot instance: watching for interruption notices every {POLL:?}");
    let mut seen_action: Option<InstanceAction> = None;
    let mut seen_rebalance: Option<String> = None;
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        let Some((back, answers)) = blocking(imds, |imds| {
            (
                imds.get("spot/instance-action"),
                imds.get("events/recommendations/rebalance"),
            )
        })
        .await
        else {
            return;
        };
        imds = back;
        match answers.0 {
            Ok(Some(body)) => {
                if let Some(action) = parse_instance_action(&body)
                    && seen_action.as_ref() != Some(&action)
                {
                    tracing::warn!(
                        "spot interruption notice: {} at {}",
                        action.action,
                        action.time
                    );
                    runs.interrupt_all(&action.action, &action.time);
                    seen_action = Some(action);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("polling spot/instance-action: {e}"),
        }
        match answers.1 {
            Ok(Some(body)) => {
                if let Some(time) = parse_rebalance(&body)
                    && seen_rebalance.as_ref() != Some(&time)
                {
                    tracing::warn!("rebalance recommendation at {time}");
                    runs.notify_all(Notice::RebalanceRecommended { time: time.clone() });
                    seen_rebalance = Some(time);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("polling the rebalance recommendation: {e}"),
        }
    }
}

/// Runs `f` on a blocking thread with the client, and hands the client back; `None`
/// (logged) if the thread failed, which ends the watch.
async fn blocking<T: Send + 'static>(
    mut imds: Imds,
    f: impl FnOnce(&mut Imds) -> T + Send + 'static,
) -> Option<(Imds, T)> {
    let endpoint = imds.endpoint.clone();
    let result = tokio::task::spawn_blocking(move || {
        let out = f(&mut imds);
        (imds, out)
    })
    .await;
    if let Err(e) = &result {
        tracing::error!("a metadata request to {endpoint} failed ({e}); no more spot notices");
    }
    result.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices() {
        assert_eq!(
            parse_instance_action(r#"{"action": "terminate", "time": "2026-11-28T08:22:00Z"}"#),
            Some(InstanceAction {
                action: "terminate".into(),
                time: "2026-11-28T08:22:00Z".into()
            })
        );
        assert_eq!(parse_instance_action("<html>404 - Not Found</html>"), None);
        assert_eq!(parse_instance_action(r#"{"action": "stop"}"#), None);
        assert_eq!(
            parse_rebalance(r#"{"noticeTime": "2026-11-28T08:17:00Z"}"#),
            Some("2026-11-28T08:17:00Z".into())
        );
        assert_eq!(parse_rebalance(""), None);
    }
}
