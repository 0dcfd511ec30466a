//! A RunPod pod's agent asks RunPod to stop or terminate its own pod, with the key RunPod
//! scopes to the pod and puts in its environment (`RUNPOD_API_KEY`, `RUNPOD_POD_ID`): no
//! user key is ever on the pod.

use std::time::Duration;

/// POSTs `{"action": ACTION}` to `API/v2/pods/$RUNPOD_POD_ID/action`; tried a few times.
pub async fn act(api: &str, action: &'static str) -> Result<(), String> {
    let key = std::env::var("RUNPOD_API_KEY")
        .map_err(|_| "RUNPOD_API_KEY is not in this pod's environment".to_owned())?;
    let pod = std::env::var("RUNPOD_POD_ID")
        .map_err(|_| "RUNPOD_POD_ID is not in this pod's environment".to_owned())?;
    if pod.is_empty() || !pod.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("RUNPOD_POD_ID {pod:?} is not a pod id"));
    }
    let url = format!("{}/v2/pods/{pod}/action", api.trim_end_matches('/'));
    let mut last = String::new();
    for attempt in 1..=5u32 {
        let (url, bearer) = (url.clone(), format!("Bearer {key}"));
        let sent = tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .into();
            agent
                .post(&url)
                .header("Authorization", &bearer)
                .header("Content-Type", "application/json")
                .send(format!("{{\"action\":\"{action}\"}}"))
                .map(|r| r.status().as_u16())
        })
        .await
        .map_err(|e| e.to_string())?;
        match sent {
            Ok(200..=299) => return Ok(()),
            // The pod is already where it was asked to go, or already gone.
            Ok(404 | 409) => return Ok(()),
            Ok(status) => last = format!("RunPod answered HTTP {status}"),
            Err(e) => last = e.to_string(),
        }
        tracing::warn!("asking RunPod to {action} this pod: {last} (attempt {attempt})");
        tokio::time::sleep(Duration::from_secs(u64::from(attempt) * 2)).await;
    }
    Err(format!("RunPod did not {action} this pod: {last}"))
}
