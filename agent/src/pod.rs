//! A RunPod pod's agent asks RunPod to stop or terminate its own pod, with the key RunPod
//! scopes to the pod and puts in its environment (`RUNPOD_API_KEY`, `RUNPOD_POD_ID`): no
//! user key is ever on the pod. A cluster's pod cannot be acted on alone (RunPod manages
//! it through its cluster): to terminate, it deletes its cluster, which ends every pod of
//! it, as a gang ends together.

use std::time::Duration;

/// POSTs `{"action": ACTION}` to `API/v2/pods/$RUNPOD_POD_ID/action`; tried a few times.
/// Refused because the pod is a cluster's (HTTP 400), a terminate deletes the cluster.
pub async fn act(api: &str, action: &'static str) -> Result<(), String> {
    let key = std::env::var("RUNPOD_API_KEY")
        .map_err(|_| "RUNPOD_API_KEY is not in this pod's environment".to_owned())?;
    let pod = std::env::var("RUNPOD_POD_ID")
        .map_err(|_| "RUNPOD_POD_ID is not in this pod's environment".to_owned())?;
    if !is_id(&pod) {
        return Err(format!("RUNPOD_POD_ID {pod:?} is not a pod id"));
    }
    let api = api.trim_end_matches('/');
    let url = format!("{api}/v2/pods/{pod}/action");
    let body = format!("{{\"action\":\"{action}\"}}");
    let mut last = String::new();
    for attempt in 1..=5u32 {
        match send("POST", &url, &key, Some(body.clone())).await {
            Ok((200..=299, _)) => return Ok(()),
            // The pod is already where it was asked to go, or already gone.
            Ok((404 | 409, _)) => return Ok(()),
            Ok((400, _)) if action == "terminate" => {
                if let Some(cluster) = cluster_of(api, &key, &pod).await? {
                    return end_cluster(api, &key, &cluster).await;
                }
                last = "RunPod answered HTTP 400".into();
            }
            Ok((status, _)) => last = format!("RunPod answered HTTP {status}"),
            Err(e) => last = e,
        }
        tracing::warn!("asking RunPod to {action} this pod: {last} (attempt {attempt})");
        tokio::time::sleep(Duration::from_secs(u64::from(attempt) * 2)).await;
    }
    Err(format!("RunPod did not {action} this pod: {last}"))
}

/// The cluster pod `pod` is a member of, as RunPod describes the pod.
async fn cluster_of(api: &str, key: &str, pod: &str) -> Result<Option<String>, String> {
    let (status, body) = send("GET", &format!("{api}/v2/pods/{pod}"), key, None).await?;
    if status != 200 {
        return Err(format!(
            "describing this pod: RunPod answered HTTP {status}"
        ));
    }
    let described: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("describing this pod: {e}"))?;
    Ok(described
        .pointer("/cluster/id")
        .and_then(|id| id.as_str())
        .filter(|id| is_id(id))
        .map(str::to_owned))
}

/// Deletes cluster `id` (and so every pod of it); tried a few times.
async fn end_cluster(api: &str, key: &str, id: &str) -> Result<(), String> {
    tracing::warn!("this pod is one of cluster {id}'s: deleting the cluster, which ends them all");
    let url = format!("{api}/v2/clusters/{id}");
    let mut last = String::new();
    for attempt in 1..=5u32 {
        match send("DELETE", &url, key, None).await {
            Ok((200..=299 | 404, _)) => return Ok(()),
            Ok((status, _)) => last = format!("RunPod answered HTTP {status}"),
            Err(e) => last = e,
        }
        tracing::warn!("deleting cluster {id}: {last} (attempt {attempt})");
        tokio::time::sleep(Duration::from_secs(u64::from(attempt) * 2)).await;
    }
    Err(format!("RunPod did not delete cluster {id}: {last}"))
}

/// RunPod's ids: letters, digits, `_` and `-`, so one is always one URL path segment.
fn is_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One request with the pod's key: its status and body.
async fn send(
    method: &'static str,
    url: &str,
    key: &str,
    body: Option<String>,
) -> Result<(u16, String), String> {
    let (url, bearer) = (url.to_owned(), format!("Bearer {key}"));
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let response = match (method, body) {
            ("GET", _) => agent.get(&url).header("Authorization", &bearer).call(),
            ("DELETE", _) => agent.delete(&url).header("Authorization", &bearer).call(),
            (_, body) => agent
                .post(&url)
                .header("Authorization", &bearer)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or_default()),
        };
        let response = response.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let text = response
            .into_body()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        Ok((status, text))
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_runpods_id_characters_reach_a_url() {
        for good in ["abc123", "cluster_abc-123"] {
            assert!(is_id(good), "{good}");
        }
        for bad in ["", "..", "a/b", "a?b", "a b", "a%2f", &"x".repeat(65)] {
            assert!(!is_id(bad), "{bad:?}");
        }
    }
}
