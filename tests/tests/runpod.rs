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

/// Waits until `path` exists and holds `text`.
fn wait_for_file(path: &std::path::Path, text: &str, bound: Duration) -> String {
    let deadline = Instant::now() + bound;
    loop {
        let now = std::fs::read_to_string(path).unwrap_or_default();
        if now.contains(text) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{} never held {text:?}: {now:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A container that records its RunPod variables and each SIGTERM in its home, and
/// ignores SIGTERM when `stubborn`.
fn recorder(stubborn: bool) -> String {
    let on_term = if stubborn {
        "echo TERM >> signals"
    } else {
        "echo TERM >> signals; exit 0"
    };
    format!(
        "sh -c 'echo $$ > pid; echo \"$RUNPOD_POD_ID $RUNPOD_API_KEY $RUNCTL_POD_ROOT\" > vars; echo started >> starts; trap \"{on_term}\" TERM; while :; do sleep 0.1; done'"
    )
}

#[tokio::test]
async fn a_pods_container_runs_its_start_command_and_gets_signals_as_runpod_sends_them() {
    let double = RunPodDouble::start();
    let api = client(&double, KEY);
    let mut spec = pod("runctl-runpod-ffffff", A100, 1);
    spec.args = recorder(false);
    let created = api.create_pod(&spec).await.expect("created");
    let home = double.dir.path().join(&created.id);
    let vars = wait_for_file(&home.join("vars"), &created.id, Duration::from_secs(10));
    let words: Vec<&str> = vars.split_whitespace().collect();
    assert_eq!(words[0], created.id);
    assert!(words[1].starts_with("rpa_POD"), "a pod-scoped key: {vars}");
    assert!(words[2].ends_with("workspace/runctl"), "{vars}");

    // The pod's own key reaches its pod, and no other.
    let pod_key = client(&double, words[1]);
    assert_eq!(
        pod_key
            .pod(&created.id)
            .await
            .expect("own pod")
            .map(|p| p.id),
        Some(created.id.clone())
    );
    let other = api
        .create_pod(&pod("runctl-runpod-gggggg", A100, 1))
        .await
        .expect("another");
    let e = pod_key
        .action(&other.id, PodAction::Stop)
        .await
        .expect_err("another pod");
    assert_eq!(e.code, ErrorCode::Conflict, "{}", e.message);
    assert!(
        pod_key.pods().await.is_err(),
        "the pod key cannot list the account's pods"
    );

    // A stop is SIGTERM to the container; a start runs the start command again.
    api.action(&created.id, PodAction::Stop)
        .await
        .expect("stop");
    wait_for_file(&home.join("signals"), "TERM", Duration::from_secs(5));
    api.action(&created.id, PodAction::Start)
        .await
        .expect("start");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(home.join("starts"))
        .unwrap_or_default()
        .lines()
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the start command did not run again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An outbid interruptible pod: SIGTERM, SIGKILL 5 s later, the pod stopped.
    let mut rented = RentInterruptible {
        name: "runctl-runpod-hhhhhh".into(),
        image: "runpod/base:1.0.0".into(),
        args: recorder(true),
        gpu: GpuConfig {
            id: A100.into(),
            count: 1,
        },
        bid_per_gpu: 1.0,
        disk: None,
        data_center: None,
        network_volume: None,
        volume_path: "/workspace".into(),
        volume_gb: Some(20),
        env: Default::default(),
    };
    rented.env.insert("RUNCTL_TEST".into(), "1".into());
    let spot = api.rent_interruptible(&rented).await.expect("rented");
    let spot_home = double.dir.path().join(&spot);
    wait_for_file(&spot_home.join("vars"), &spot, Duration::from_secs(10));
    let interrupted = Instant::now();
    double.interrupt(&spot);
    wait_for_file(&spot_home.join("signals"), "TERM", Duration::from_secs(2));
    wait_for(&api, &spot, PodStatus::Exited).await;
    // The stubborn container is killed 5 s after the SIGTERM it ignored.
    let pid: i32 = std::fs::read_to_string(spot_home.join("pid"))
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    let deadline = Instant::now() + Duration::from_secs(15);
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
    {
        assert!(
            Instant::now() < deadline,
            "the interrupted container was never killed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        interrupted.elapsed() >= Duration::from_secs(5),
        "SIGKILL came {:?} after SIGTERM",
        interrupted.elapsed()
    );
}

/// A controller home whose pods come from `double`, with the S3 server for the agent's
/// download and the static agent, or `None` (SKIPPED) outside scripts/test.sh.
fn runpod_home(double: &RunPodDouble, test: &str) -> Option<(tests::Home, tests::s3::S3Env)> {
    let s3 = tests::s3::S3Env::get(test)?;
    let Some(agent) = std::env::var("RUNCTL_STATIC_AGENT")
        .ok()
        .filter(|a| !a.is_empty())
    else {
        assert!(
            std::env::var("RUNCTL_REQUIRE_S3").is_err(),
            "{test}: RUNCTL_STATIC_AGENT is required under scripts/test.sh"
        );
        eprintln!("SKIPPED {test}: no static agent (run scripts/test.sh)");
        return None;
    };
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let prefix = tests::s3::S3Env::unique_prefix(test);
    let home = tests::Home::new();
    let config = format!(
        "[daemon]\nlisten = \"127.0.0.1:{port}\"\nstop_grace_secs = 3\n{storage}\
         [runpod]\napi_url = \"{api}\"\ngraphql_url = \"{graphql}\"\n\
         controller_endpoint = \"127.0.0.1:{port}\"\n\
         artifacts = \"s3://{bucket}/{prefix}artifacts\"\n\
         agent_binary = \"{agent}\"\nenroll_timeout_secs = 60\n",
        storage = s3.config_toml(&s3.endpoint),
        api = double.api(),
        graphql = double.graphql(),
        bucket = s3.bucket,
    );
    std::fs::write(home.path().join("config.toml"), config).expect("write config");
    Some((home, s3))
}

fn cli(home: &tests::Home, s3: &tests::s3::S3Env, key: Option<&str>) -> std::process::Command {
    let mut cmd = home.cli();
    cmd.envs(s3.envs());
    match key {
        Some(key) => cmd.env("RUNPOD_API_KEY", key),
        None => cmd.env_remove("RUNPOD_API_KEY"),
    };
    cmd
}

#[test]
fn a_run_on_a_pod_installs_the_agent_runs_and_terminates_the_pod() {
    let double = RunPodDouble::start();
    let Some((home, s3)) = runpod_home(&double, "runpod_run") else {
        return;
    };
    let project = tempfile::tempdir().expect("project");
    std::fs::write(project.path().join("hello.txt"), "from the laptop\n").expect("write");
    let out = cli(&home, &s3, Some(KEY))
        .args([
            "run",
            "--provider",
            "runpod",
            "--gpu",
            "A100 PCIe",
            "--gpus",
            "2",
        ])
        .args(["--no-checkpoints", "--setup", "none", "--workdir"])
        .arg(project.path())
        .args([
            "--",
            "sh",
            "-c",
            "cat hello.txt; echo \"pod $RUNPOD_POD_ID\"",
        ])
        .output()
        .expect("run");
    let err = tests::stderr(&out);
    let pod_log = || {
        double
            .pods()
            .iter()
            .map(|p| p["dir"].as_str().unwrap_or_default().to_owned())
            .map(|d| std::fs::read_to_string(format!("{d}/container.log")).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(out.status.success(), "{err}\npod: {}", pod_log());
    let stdout = tests::stdout(&out);
    assert!(stdout.contains("from the laptop"), "{stdout}");
    assert!(stdout.contains("pod "), "{stdout}");
    // The phase lines of the launch, and the price before it.
    assert!(err.contains("NVIDIA A100 80GB PCIe x2"), "{err}");
    assert!(err.contains("on-demand $3.28/h"), "{err}");
    assert!(err.contains("agent enrolled"), "{err}");
    // Launched for the run, so gone with it: nothing left billed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !double.pods().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the pod outlived its run: {:?}",
            double.pods()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let list = home.json(&["list"]);
    assert_eq!(
        list["instances"][0]["instance"]["provider"], "runpod",
        "{list}"
    );
    assert_eq!(
        list["instances"][0]["instance"]["state"], "terminated",
        "{list}"
    );
}

#[test]
fn a_launch_without_a_key_or_with_an_unknown_gpu_is_refused_before_anything_is_made() {
    let double = RunPodDouble::start();
    let Some((home, s3)) = runpod_home(&double, "runpod_refusals") else {
        return;
    };
    let out = cli(&home, &s3, None)
        .args(["launch", "--provider", "runpod", "--gpu", "A100 PCIe"])
        .output()
        .expect("launch");
    assert_eq!(out.status.code(), Some(2), "{}", tests::stderr(&out));
    assert!(
        tests::stderr(&out).contains("RUNPOD_API_KEY"),
        "{}",
        tests::stderr(&out)
    );
    assert!(double.pods().is_empty());
    let _ = home.run(&["shutdown"]);

    let out = cli(&home, &s3, Some(KEY))
        .args([
            "launch",
            "--provider",
            "runpod",
            "--gpu",
            "NVIDIA A100 80GB",
        ])
        .output()
        .expect("launch");
    let err = tests::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is not a RunPod GPU type"), "{err}");
    assert!(
        err.contains("NVIDIA A100 80GB PCIe"),
        "the nearest is named: {err}"
    );
    let out = cli(&home, &s3, Some(KEY))
        .args(["launch", "--provider", "runpod", "g5.xlarge"])
        .output()
        .expect("launch");
    assert_eq!(out.status.code(), Some(2), "{}", tests::stderr(&out));
    assert!(double.pods().is_empty(), "{:?}", double.pods());
    let list = home.json(&["list"]);
    assert!(
        list["instances"].as_array().is_some_and(|a| a.is_empty()),
        "{list}"
    );
}
