//! RunPod: pods from its REST API v2 (create, describe, list, the `start`/`stop`/
//! `terminate` actions, delete, the GPU catalog) and, for interruptible (spot) pods,
//! GraphQL's `podRentInterruptable`, which v2 does not offer. Written from the published
//! OpenAPI document (`../shared/reference/runpod-openapi-v2.json`) and the GraphQL shapes
//! of the `runpod` package; tests run against the double in `tests/runpod_double.py`.
//!
//! The API key travels only in the `Authorization` header, never in a URL, a log line or
//! a run spec; `ApiKey`'s `Debug` redacts it.

pub mod launch;
pub mod plan;
pub mod start;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, UserError};

/// The production API; `[runpod] api_url` (or `RUNPOD_API_URL`) points elsewhere.
pub const API_URL: &str = "https://api.runpod.io";
/// The production GraphQL endpoint, for interruptible pods.
pub const GRAPHQL_URL: &str = "https://api.runpod.io/graphql";

/// How many times a call answered 429 or 5xx is tried in all.
const ATTEMPTS: u32 = 4;

/// How to launch a pod (`launch --provider runpod`, `run --provider runpod`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunpodLaunch {
    /// A GPU type of the catalog, by id or name (`NVIDIA A100 80GB PCIe`, `A100 PCIe`).
    pub gpu: String,
    /// GPUs on the pod.
    pub gpus: u32,
    /// An interruptible pod, bid for at `max_price`.
    pub spot: bool,
    /// The most per hour for the whole pod (spot: turned into RunPod's bid per GPU;
    /// default the on-demand price).
    pub max_price: Option<f64>,
    /// The image (default `[runpod] image`).
    pub image: Option<String>,
    /// The data center (default `[runpod] datacenter`, else RunPod's choice).
    pub datacenter: Option<String>,
    /// Container disk in GB (default `[runpod] disk_gb`).
    pub disk_gb: Option<u32>,
    /// A network volume to mount at /workspace instead of the pod's own volume.
    pub volume: Option<String>,
}

/// A RunPod API key; shown as `rpa_…(redacted)` wherever it is printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(redacted)")
    }
}

impl ApiKey {
    /// The key from `RUNPOD_API_KEY` (`env`), else from the file `[runpod] api_key_file`
    /// names (its first line); refused, before any call, when neither has one.
    pub fn find(env: Option<String>, file: Option<&Path>) -> Result<Self, UserError> {
        if let Some(key) = env.map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()) {
            return Ok(ApiKey(key));
        }
        let missing = || {
            UserError::new(ErrorCode::BadInput, "no RunPod API key: RUNPOD_API_KEY is not set")
                .resolve("make a key in the RunPod console (Settings, API Keys), then export RUNPOD_API_KEY=... before starting the daemon")
                .resolve("or put it in a file only you can read and set api_key_file = \"PATH\" under [runpod] in config.toml")
        };
        let Some(path) = file else {
            return Err(missing());
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            UserError::new(
                ErrorCode::BadInput,
                format!(
                    "cannot read the RunPod API key file {}: {e}",
                    path.display()
                ),
            )
            .resolve("fix [runpod] api_key_file in config.toml, or set RUNPOD_API_KEY")
        })?;
        let key = text.lines().next().unwrap_or_default().trim().to_owned();
        if key.is_empty() {
            return Err(UserError::new(
                ErrorCode::BadInput,
                format!("the RunPod API key file {} is empty", path.display()),
            )
            .resolve("write the key on its first line, or set RUNPOD_API_KEY"));
        }
        Ok(ApiKey(key))
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

/// A pod's lifecycle status (`PodStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PodStatus {
    Provisioning,
    Starting,
    /// The container is healthy, which may be before its start command has done anything.
    Running,
    /// Stopped (the container exited).
    Exited,
    Error,
    Terminated,
}

/// A state transition on a pod (`PodAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodAction {
    Start,
    Stop,
    Restart,
    Terminate,
}

/// A pod's GPUs (`GpuConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuConfig {
    pub id: String,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// A pod as RunPod describes it (`Pod`): the fields runctl reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub id: String,
    pub name: String,
    pub status: PodStatus,
    #[serde(default)]
    pub gpu: Option<GpuConfig>,
    /// Data center the scheduler placed it in.
    #[serde(default)]
    pub data_center_id: Option<String>,
    /// USD per hour now (0 when exited or terminated).
    #[serde(default)]
    pub cost: f64,
    #[serde(default)]
    pub created_at: Option<String>,
    /// Its cluster, for a member of one (`PodCluster`).
    #[serde(default)]
    pub cluster: Option<PodCluster>,
}

/// A pod's membership in a cluster (`PodCluster`): its rank (`NODE_RANK`) and its address
/// on the cluster's private network, both assigned during provisioning.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PodCluster {
    pub id: String,
    #[serde(default)]
    pub rank: Option<u32>,
    #[serde(default)]
    pub ip: Option<String>,
}

/// A cluster's homogeneous shape (`ClusterCompute`): `pod_count` pods of
/// `gpu_count_per_pod` GPUs of `gpu_type_id` each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterCompute {
    pub gpu_type_id: String,
    pub gpu_count_per_pod: u32,
    pub pod_count: u32,
}

/// `POST /v2/clusters`'s body (`CreateClusterRequest`): a training cluster, its pods all
/// alike (one image, one start command, one environment). Clusters have no interruptible
/// pods and no private registries.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateCluster {
    pub name: String,
    /// Always `TRAINING`: the generic distributed-training cluster.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub compute: ClusterCompute,
    pub image: String,
    pub args: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<u32>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub data_center_ids: Vec<String>,
    pub mounts: Mounts,
}

/// A cluster as RunPod describes it (`Cluster`): the fields runctl reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub data_center_id: Option<String>,
}

#[derive(Deserialize)]
struct ClusterList {
    clusters: Vec<Cluster>,
}

/// A network volume mounted at `path` (`NetworkMount`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkMount {
    pub volume_id: String,
    pub path: String,
}

/// Host-local persistent storage (`PersistentMount`, at least 10 GB).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PersistentMount {
    pub size: u32,
    pub path: String,
}

/// A pod's storage (`Mounts`): one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mounts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent: Option<PersistentMount>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<NetworkMount>,
}

/// `POST /v2/pods`'s body (`CreatePodRequest`): an on-demand GPU pod.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatePod {
    pub name: String,
    pub image: String,
    /// The start command, passed to the image's entrypoint.
    pub args: String,
    /// Container disk in GB (wiped on restart).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<u32>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    pub gpu: GpuConfig,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub data_center_ids: Vec<String>,
    pub mounts: Mounts,
}

/// A GPU type's list price per GPU-hour, per cloud tier.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct GpuPrice {
    pub secure: f64,
    pub community: f64,
}

/// The most GPUs of a type one pod can have, per cloud tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct GpuCount {
    pub secure: u32,
    pub community: u32,
}

/// One entry of the GPU catalog (`GpuType`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuType {
    /// What pod creation takes, e.g. `NVIDIA A100 80GB PCIe`.
    pub id: String,
    pub name: String,
    /// VRAM in GB.
    pub memory: u32,
    pub secure: bool,
    pub community: bool,
    pub price: GpuPrice,
    pub max_count: GpuCount,
}

#[derive(Deserialize)]
struct GpuList {
    gpus: Vec<GpuType>,
}

/// A network volume (`NetworkVolume`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkVolume {
    pub id: String,
    pub name: String,
    /// In GB.
    pub size: u32,
    pub data_center: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolumeList {
    network_volumes: Vec<NetworkVolume>,
}

#[derive(Deserialize)]
struct PodList {
    pods: Vec<Pod>,
}

/// An interruptible pod for GraphQL's `podRentInterruptable`.
#[derive(Debug, Clone, PartialEq)]
pub struct RentInterruptible {
    pub name: String,
    pub image: String,
    pub args: String,
    pub gpu: GpuConfig,
    pub bid_per_gpu: f64,
    pub disk: Option<u32>,
    pub data_center: Option<String>,
    pub network_volume: Option<String>,
    /// Where the volume (network or the pod's own) is mounted.
    pub volume_path: String,
    /// The pod's own volume in GB, when there is no network volume.
    pub volume_gb: Option<u32>,
    pub env: BTreeMap<String, String>,
}

/// A RunPod account's API: REST v2, and GraphQL for what v2 lacks.
#[derive(Debug, Clone)]
pub struct RunPod {
    http: ureq::Agent,
    api: String,
    graphql: String,
    key: ApiKey,
}

/// One HTTP answer: its status and body.
struct Answer {
    status: u16,
    body: String,
}

impl RunPod {
    /// A client for the API at `api` (REST, without `/v2`) and `graphql`.
    pub fn new(api: &str, graphql: &str, key: ApiKey) -> Self {
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .user_agent(concat!("runctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        RunPod {
            http,
            api: api.trim_end_matches('/').to_owned(),
            graphql: graphql.to_owned(),
            key,
        }
    }

    /// One call, tried again with backoff while RunPod answers 429 or 5xx.
    async fn call(
        &self,
        what: &str,
        method: &'static str,
        url: String,
        body: Option<serde_json::Value>,
    ) -> Result<Answer, UserError> {
        let mut wait = Duration::from_millis(500);
        for attempt in 1..=ATTEMPTS {
            let (http, bearer, url2, body2) = (
                self.http.clone(),
                self.key.bearer(),
                url.clone(),
                body.clone(),
            );
            let answer =
                tokio::task::spawn_blocking(move || send(&http, method, &url2, &bearer, body2))
                    .await
                    .map_err(|e| UserError::new(ErrorCode::Internal, format!("{what}: {e}")))?;
            let answer = match answer {
                Ok(answer) => answer,
                Err(e) if attempt < ATTEMPTS => {
                    tracing::warn!("{what}: {e}; trying again in {wait:?}");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    continue;
                }
                Err(e) => {
                    return Err(UserError::new(
                        ErrorCode::Internal,
                        format!("{what}: cannot reach RunPod's API: {e}"),
                    )
                    .resolve("check the network, or RunPod's status page"));
                }
            };
            if (200..300).contains(&answer.status) {
                return Ok(answer);
            }
            let problem: plan::Problem = serde_json::from_str(&answer.body).unwrap_or_default();
            let (error, retry) = plan::rest_error(what, answer.status, &problem);
            if retry && attempt < ATTEMPTS {
                tracing::warn!("{what}: {}; trying again in {wait:?}", error.message);
                tokio::time::sleep(wait).await;
                wait *= 2;
                continue;
            }
            return Err(error);
        }
        unreachable_attempts(what)
    }

    fn parse<T: serde::de::DeserializeOwned>(what: &str, answer: &Answer) -> Result<T, UserError> {
        serde_json::from_str(&answer.body).map_err(|e| {
            UserError::new(
                ErrorCode::Internal,
                format!("{what}: RunPod's answer did not parse: {e}"),
            )
        })
    }

    /// The GPU catalog, with list prices.
    pub async fn gpu_types(&self) -> Result<Vec<GpuType>, UserError> {
        let what = "listing RunPod's GPU types";
        let answer = self
            .call(what, "GET", format!("{}/v2/catalog/gpus", self.api), None)
            .await?;
        Ok(Self::parse::<GpuList>(what, &answer)?.gpus)
    }

    /// Creates an on-demand pod; it starts PROVISIONING.
    pub async fn create_pod(&self, pod: &CreatePod) -> Result<Pod, UserError> {
        let what = format!("creating pod {}", pod.name);
        let body = serde_json::to_value(pod)
            .map_err(|e| UserError::new(ErrorCode::Internal, format!("{what}: {e}")))?;
        let answer = self
            .call(&what, "POST", format!("{}/v2/pods", self.api), Some(body))
            .await?;
        Self::parse(&what, &answer)
    }

    /// The pod `id`, or `None` when RunPod no longer knows it.
    pub async fn pod(&self, id: &str) -> Result<Option<Pod>, UserError> {
        let what = format!("describing pod {id}");
        match self
            .call(
                &what,
                "GET",
                format!("{}/v2/pods/{}", self.api, path_segment(id)?),
                None,
            )
            .await
        {
            Ok(answer) => Self::parse(&what, &answer).map(Some),
            Err(e) if e.code == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every pod of the account, clusters' members included (the caller picks runctl's own
    /// by name and record).
    pub async fn pods(&self) -> Result<Vec<Pod>, UserError> {
        let what = "listing RunPod pods";
        let url = format!("{}/v2/pods?includeClusterPods=true", self.api);
        let answer = self.call(what, "GET", url, None).await?;
        Ok(Self::parse::<PodList>(what, &answer)?.pods)
    }

    /// Creates a cluster; its pods start PROVISIONING, their ranks not yet assigned.
    pub async fn create_cluster(&self, cluster: &CreateCluster) -> Result<Cluster, UserError> {
        let what = format!("creating cluster {}", cluster.name);
        let body = serde_json::to_value(cluster)
            .map_err(|e| UserError::new(ErrorCode::Internal, format!("{what}: {e}")))?;
        let answer = self
            .call(
                &what,
                "POST",
                format!("{}/v2/clusters", self.api),
                Some(body),
            )
            .await?;
        Self::parse(&what, &answer)
    }

    /// Every cluster of the account.
    pub async fn clusters(&self) -> Result<Vec<Cluster>, UserError> {
        let what = "listing RunPod clusters";
        let answer = self
            .call(what, "GET", format!("{}/v2/clusters", self.api), None)
            .await?;
        Ok(Self::parse::<ClusterList>(what, &answer)?.clusters)
    }

    /// Cluster `id`'s member pods, or `None` when RunPod no longer knows it.
    pub async fn cluster_pods(&self, id: &str) -> Result<Option<Vec<Pod>>, UserError> {
        let what = format!("listing cluster {id}'s pods");
        let url = format!("{}/v2/clusters/{}/pods", self.api, path_segment(id)?);
        match self.call(&what, "GET", url, None).await {
            Ok(answer) => Ok(Some(Self::parse::<PodList>(&what, &answer)?.pods)),
            Err(e) if e.code == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes cluster `id` and so terminates every pod of it; one already gone is fine.
    pub async fn delete_cluster(&self, id: &str) -> Result<(), UserError> {
        let what = format!("deleting cluster {id}");
        let url = format!("{}/v2/clusters/{}", self.api, path_segment(id)?);
        match self.call(&what, "DELETE", url, None).await {
            Err(e) if e.code != ErrorCode::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every network volume of the account.
    pub async fn volumes(&self) -> Result<Vec<NetworkVolume>, UserError> {
        let what = "listing RunPod network volumes";
        let answer = self
            .call(
                what,
                "GET",
                format!("{}/v2/network-volumes", self.api),
                None,
            )
            .await?;
        Ok(Self::parse::<VolumeList>(what, &answer)?.network_volumes)
    }

    /// The network volume `id`, or `None` when RunPod does not know it.
    pub async fn volume(&self, id: &str) -> Result<Option<NetworkVolume>, UserError> {
        let what = format!("describing network volume {id}");
        let url = format!("{}/v2/network-volumes/{}", self.api, path_segment(id)?);
        match self.call(&what, "GET", url, None).await {
            Ok(answer) => Self::parse(&what, &answer).map(Some),
            Err(e) if e.code == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a network volume of `size_gb` in `datacenter`.
    pub async fn create_volume(
        &self,
        name: &str,
        size_gb: u32,
        datacenter: &str,
    ) -> Result<NetworkVolume, UserError> {
        let what = format!("creating network volume {name}");
        let body = serde_json::json!({ "name": name, "size": size_gb, "dataCenter": datacenter });
        let answer = self
            .call(
                &what,
                "POST",
                format!("{}/v2/network-volumes", self.api),
                Some(body),
            )
            .await?;
        Self::parse(&what, &answer)
    }

    /// Deletes network volume `id` (RunPod refuses one a pod mounts).
    pub async fn delete_volume(&self, id: &str) -> Result<(), UserError> {
        let what = format!("deleting network volume {id}");
        let url = format!("{}/v2/network-volumes/{}", self.api, path_segment(id)?);
        self.call(&what, "DELETE", url, None).await?;
        Ok(())
    }

    /// Starts, stops, restarts or terminates pod `id`.
    pub async fn action(&self, id: &str, action: PodAction) -> Result<(), UserError> {
        let what = format!(
            "{} pod {id}",
            match action {
                PodAction::Start => "starting",
                PodAction::Stop => "stopping",
                PodAction::Restart => "restarting",
                PodAction::Terminate => "terminating",
            }
        );
        self.call(
            &what,
            "POST",
            format!("{}/v2/pods/{}/action", self.api, path_segment(id)?),
            Some(serde_json::json!({ "action": action })),
        )
        .await?;
        Ok(())
    }

    /// Rents an interruptible pod at `bid_per_gpu` (GraphQL; v2 has no spot). Its errors
    /// come back with HTTP 200, in `errors`.
    pub async fn rent_interruptible(&self, pod: &RentInterruptible) -> Result<String, UserError> {
        let what = format!("renting interruptible pod {}", pod.name);
        let env: Vec<serde_json::Value> = pod
            .env
            .iter()
            .map(|(k, v)| serde_json::json!({ "key": k, "value": v }))
            .collect();
        let mut input = serde_json::json!({
            "name": pod.name,
            "imageName": pod.image,
            "dockerArgs": pod.args,
            "gpuTypeId": pod.gpu.id,
            "gpuCount": pod.gpu.count,
            "bidPerGpu": pod.bid_per_gpu,
            "cloudType": "SECURE",
            "volumeMountPath": pod.volume_path,
            "env": env,
        });
        let fields = input.as_object_mut().expect("a JSON object");
        if let Some(disk) = pod.disk {
            fields.insert("containerDiskInGb".into(), disk.into());
        }
        if let Some(dc) = &pod.data_center {
            fields.insert("dataCenterId".into(), dc.clone().into());
        }
        if let Some(volume) = &pod.network_volume {
            fields.insert("networkVolumeId".into(), volume.clone().into());
        }
        if let Some(gb) = pod.volume_gb {
            fields.insert("volumeInGb".into(), gb.into());
        }
        let body = serde_json::json!({
            "query": "mutation Rent($input: PodRentInterruptableInput!) { podRentInterruptable(input: $input) { id desiredStatus costPerHr } }",
            "variables": { "input": input },
        });
        let answer = self
            .call(&what, "POST", self.graphql.clone(), Some(body))
            .await?;
        #[derive(Deserialize)]
        struct Rented {
            id: String,
        }
        #[derive(Deserialize)]
        struct Data {
            #[serde(rename = "podRentInterruptable")]
            rent: Option<Rented>,
        }
        #[derive(Deserialize)]
        struct Message {
            message: String,
        }
        #[derive(Deserialize)]
        struct Reply {
            data: Option<Data>,
            #[serde(default)]
            errors: Vec<Message>,
        }
        let reply: Reply = Self::parse(&what, &answer)?;
        if !reply.errors.is_empty() {
            let messages: Vec<String> = reply.errors.into_iter().map(|m| m.message).collect();
            return Err(plan::graphql_error(&what, &messages));
        }
        reply
            .data
            .and_then(|d| d.rent)
            .map(|r| r.id)
            .ok_or_else(|| plan::graphql_error(&what, &["RunPod returned no pod".into()]))
    }
}

/// A RunPod id as one URL path segment: letters, digits, `_` and `-` (`cluster_abc123`).
fn path_segment(id: &str) -> Result<&str, UserError> {
    if !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Ok(id)
    } else {
        Err(UserError::new(
            ErrorCode::BadInput,
            format!("{id:?} is not a RunPod id"),
        ))
    }
}

fn unreachable_attempts<T>(what: &str) -> Result<T, UserError> {
    Err(UserError::new(
        ErrorCode::Internal,
        format!("{what}: no answer after {ATTEMPTS} tries"),
    ))
}

/// Sends one request (blocking) and reads the whole answer.
fn send(
    http: &ureq::Agent,
    method: &str,
    url: &str,
    bearer: &str,
    body: Option<serde_json::Value>,
) -> Result<Answer, ureq::Error> {
    let response = match (method, body) {
        ("GET", _) => http.get(url).header("Authorization", bearer).call()?,
        ("DELETE", _) => http.delete(url).header("Authorization", bearer).call()?,
        (_, Some(body)) => http
            .post(url)
            .header("Authorization", bearer)
            .send_json(&body)?,
        (_, None) => http
            .post(url)
            .header("Authorization", bearer)
            .send_empty()?,
    };
    let status = response.status().as_u16();
    let body = response.into_body().read_to_string()?;
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_comes_from_the_environment_then_the_file_and_is_never_shown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("key");
        std::fs::write(&file, "rpa_FROMFILE\nignored\n").expect("write");
        let key = ApiKey::find(Some(" rpa_ENV \n".into()), Some(&file)).expect("env");
        assert_eq!(key.bearer(), "Bearer rpa_ENV");
        assert_eq!(format!("{key:?}"), "ApiKey(redacted)");
        let key = ApiKey::find(None, Some(&file)).expect("file");
        assert_eq!(key.bearer(), "Bearer rpa_FROMFILE");
        let key = ApiKey::find(Some(String::new()), Some(&file)).expect("an empty env falls back");
        assert_eq!(key.bearer(), "Bearer rpa_FROMFILE");

        let none = ApiKey::find(None, None).expect_err("no key");
        assert_eq!(none.code, ErrorCode::BadInput);
        assert!(none.message.contains("RUNPOD_API_KEY"), "{}", none.message);
        std::fs::write(&file, "\n").expect("write");
        assert!(
            ApiKey::find(None, Some(&file))
                .expect_err("empty")
                .message
                .contains("empty")
        );
        let missing = ApiKey::find(None, Some(&dir.path().join("nope"))).expect_err("missing");
        assert!(
            missing.message.contains("cannot read"),
            "{}",
            missing.message
        );
    }

    #[test]
    fn pod_ids_cannot_leave_their_path_segment() {
        assert!(path_segment("abc123XYZ").is_ok());
        assert!(path_segment("cluster_abc-123").is_ok());
        for bad in [
            "",
            "../pods",
            "..",
            "a/b",
            "a?b=c",
            "a b",
            "a%2f",
            &"x".repeat(65),
        ] {
            assert!(path_segment(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_create_body_has_the_published_shape() {
        let body = CreatePod {
            name: "runctl-runpod-abcdef".into(),
            image: "runpod/base:1.0.0".into(),
            args: "sh -c 'echo hi'".into(),
            disk: Some(20),
            env: BTreeMap::from([("A".to_owned(), "1".to_owned())]),
            gpu: GpuConfig {
                id: "NVIDIA A100 80GB PCIe".into(),
                count: 2,
            },
            data_center_ids: vec!["US-TX-3".into()],
            mounts: Mounts {
                persistent: Some(PersistentMount {
                    size: 20,
                    path: "/workspace".into(),
                }),
                network: vec![],
            },
        };
        let json = serde_json::to_value(&body).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "name": "runctl-runpod-abcdef",
                "image": "runpod/base:1.0.0",
                "args": "sh -c 'echo hi'",
                "disk": 20,
                "env": {"A": "1"},
                "gpu": {"id": "NVIDIA A100 80GB PCIe", "count": 2},
                "dataCenterIds": ["US-TX-3"],
                "mounts": {"persistent": {"size": 20, "path": "/workspace"}},
            })
        );
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "id": "abc123", "name": "x", "status": "RUNNING", "actions": ["stop"],
            "gpu": {"id": "NVIDIA A100 80GB PCIe", "count": 1}, "cost": 1.64,
            "dataCenterId": "US-TX-3", "createdAt": "2026-12-03T09:00:00Z", "extra": true
        }))
        .expect("a pod with fields runctl does not read");
        assert_eq!((pod.status, pod.cost), (PodStatus::Running, 1.64));
    }
}
