//! RunPod's API client against the double (`fixtures/runpod_double.py`, written from the
//! published API documents: no RunPod emulator exists). Each refusal leaves nothing
//! running or billed, checked against the double's own state.

use std::time::{Duration, Instant};

use controller::error::ErrorCode;
use controller::provider::runpod::{
    ApiKey, CreatePod, GpuConfig, Mounts, PersistentMount, PodAction, PodStatus, RentInterruptible,
    RunPod, plan,
};
use tests::runpod::{KEY, RunPodDouble};

const A100: &str = "NVIDIA A100 80GB PCIe";

fn client(double: &RunPodDouble, key: &str) -> RunPod {
    let key = ApiKey::find(Some(key.into()), None).expect("a key");
    RunPod::new(&double.api(), &double.graphql(), key)
}

fn pod(name: &str, gpu: &str, count: u32) -> CreatePod {
    CreatePod {
        name: name.into(),
        image: "runpod/base:1.0.0".into(),
        args: "sh -c 'sleep infinity'".into(),
        disk: Some(20),
        env: Default::default(),
        gpu: GpuConfig {
            id: gpu.into(),
            count,
        },
        data_center_ids: vec![],
        mounts: Mounts {
            persistent: Some(PersistentMount {
                size: 20,
                path: "/workspace".into(),
            }),
            network: vec![],
        },
    }
}

async fn wait_for(api: &RunPod, id: &str, status: PodStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = api.pod(id).await.expect("describe").expect("exists").status;
        if now == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} stayed {now:?}, not {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_pod_is_created_described_stopped_started_and_terminated() {
    let double = RunPodDouble::start();
    let api = client(&double, KEY);
    let catalog = api.gpu_types().await.expect("catalog");
    let a100 = plan::find_gpu(&catalog, "a100 pcie").expect("found by name");
    assert_eq!(a100.id, A100);
    assert!(a100.price.secure > 0.0);

    let created = api
        .create_pod(&pod("runctl-runpod-aaaaaa", A100, 2))
        .await
        .expect("created");
    assert_eq!(created.status, PodStatus::Provisioning);
    assert_eq!(created.gpu.as_ref().map(|g| g.count), Some(2));
    wait_for(&api, &created.id, PodStatus::Running).await;
    let listed = api.pods().await.expect("list");
    assert_eq!(
        listed.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        [created.id.as_str()]
    );
    assert!(
        listed[0].cost > 3.0,
        "two A100s at the secure price: {}",
        listed[0].cost
    );

    api.action(&created.id, PodAction::Stop)
        .await
        .expect("stop");
    wait_for(&api, &created.id, PodStatus::Exited).await;
    assert_eq!(
        api.pod(&created.id)
            .await
            .expect("describe")
            .expect("exists")
            .cost,
        0.0,
        "a stopped pod costs nothing"
    );
    let again = api
        .action(&created.id, PodAction::Stop)
        .await
        .expect_err("stopping a stopped pod");
    assert_eq!(again.code, ErrorCode::Conflict, "{}", again.message);
    api.action(&created.id, PodAction::Start)
        .await
        .expect("start");
    wait_for(&api, &created.id, PodStatus::Running).await;
    api.action(&created.id, PodAction::Terminate)
        .await
        .expect("terminate");
    assert!(
        api.pod(&created.id).await.expect("describe").is_none(),
        "gone once terminated"
    );
    assert!(double.pods().is_empty());
}

#[tokio::test]
async fn refusals_say_what_to_do_and_leave_nothing_behind() {
    let double = RunPodDouble::start();
    let wrong = client(&double, "rpa_WRONG");
    let e = wrong.gpu_types().await.expect_err("a wrong key");
    assert_eq!(e.code, ErrorCode::BadInput);
    assert!(e.message.contains("refused the API key"), "{}", e.message);
    assert!(
        e.to_resolve.iter().any(|r| r.contains("RUNPOD_API_KEY")),
        "{:?}",
        e.to_resolve
    );
    let e = wrong
        .create_pod(&pod("runctl-runpod-bbbbbb", A100, 1))
        .await
        .expect_err("a wrong key");
    assert!(e.message.contains("401"), "{}", e.message);

    let api = client(&double, KEY);
    let e = api
        .create_pod(&pod("runctl-runpod-cccccc", "NVIDIA B300", 1))
        .await
        .expect_err("unknown GPU");
    assert!(e.message.contains("unknown GPU type"), "{}", e.message);
    let e = api
        .create_pod(&pod("runctl-runpod-cccccc", A100, 0))
        .await
        .expect_err("no GPUs");
    assert_eq!(e.code, ErrorCode::BadInput);
    assert!(e.message.contains("gpu.count"), "{}", e.message);

    double.set_stock(A100, 0);
    let e = api
        .create_pod(&pod("runctl-runpod-dddddd", A100, 1))
        .await
        .expect_err("no stock");
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("no capacity"), "{}", e.message);

    let rent = |bid: f64| RentInterruptible {
        name: "runctl-runpod-eeeeee".into(),
        image: "runpod/base:1.0.0".into(),
        args: "sh -c true".into(),
        gpu: GpuConfig {
            id: "NVIDIA GeForce RTX 4090".into(),
            count: 1,
        },
        bid_per_gpu: bid,
        disk: Some(20),
        data_center: None,
        network_volume: None,
        volume_path: "/workspace".into(),
        volume_gb: Some(20),
        env: Default::default(),
    };
    let e = api
        .rent_interruptible(&rent(0.01))
        .await
        .expect_err("a bid under the minimum");
    assert_eq!(e.code, ErrorCode::BadInput);
    assert!(e.message.contains("minimum bid"), "{}", e.message);
    assert!(
        double.pods().is_empty(),
        "no refusal left a pod: {:?}",
        double.pods()
    );

    let id = api.rent_interruptible(&rent(0.5)).await.expect("rented");
    let pods = double.pods();
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0]["id"], id.as_str());
    assert_eq!(pods[0]["interruptible"], true);
    assert_eq!(pods[0]["rate"], 0.5);
}
