//! RunPod's API client against the double (`fixtures/runpod_double.py`, written from the
//! published API documents: no RunPod emulator exists). Each refusal leaves nothing
//! running or billed, checked against the double's own state.

use std::time::{Duration, Instant};
use tests::s3::{Fault, FaultProxy};

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
    runpod_home_with(double, test, "")
}

/// [`runpod_home`] with `extra` lines in its `[runpod]` table.
fn runpod_home_with(
    double: &RunPodDouble,
    test: &str,
    extra: &str,
) -> Option<(tests::Home, tests::s3::S3Env)> {
    let s3 = tests::s3::S3Env::get(test)?;
    let endpoint = s3.endpoint.clone();
    runpod_home_via(double, test, s3, &endpoint, extra)
}

/// [`runpod_home_with`], its store reached at `endpoint` (a fault proxy in front of it).
fn runpod_home_via(
    double: &RunPodDouble,
    test: &str,
    s3: tests::s3::S3Env,
    endpoint: &str,
    extra: &str,
) -> Option<(tests::Home, tests::s3::S3Env)> {
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
    let port = tests::free_daemon_port();
    let prefix = tests::s3::S3Env::unique_prefix(test);
    let home = tests::Home::new();
    let config = format!(
        "[daemon]\nlisten = \"127.0.0.1:{port}\"\nstop_grace_secs = 3\n{storage}\
         [runpod]\napi_url = \"{api}\"\ngraphql_url = \"{graphql}\"\n\
         controller_endpoint = \"127.0.0.1:{port}\"\n\
         artifacts = \"s3://{bucket}/{prefix}artifacts\"\n\
         agent_binary = \"{agent}\"\nenroll_timeout_secs = 60\n{extra}",
        storage = s3.config_toml(endpoint),
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

/// A profile whose credentials come from a `credential_process` that hands out the S3
/// server's keys valid for `secs` and counts how often it was asked; the directory, the
/// environment pointing the AWS SDK at it, and the count file.
fn expiring_profile(
    s3: &tests::s3::S3Env,
    secs: u32,
) -> (
    tempfile::TempDir,
    Vec<(&'static str, String)>,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().expect("profile dir");
    let count = dir.path().join("issued");
    let script = dir.path().join("creds.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho issued >> '{count}'\nexp=$(date -u -d '+{secs} seconds' +%Y-%m-%dT%H:%M:%SZ)\n\
             printf '{{\"Version\":1,\"AccessKeyId\":\"%s\",\"SecretAccessKey\":\"%s\",\"Expiration\":\"%s\"}}' '{key}' '{secret}' \"$exp\"\n",
            count = count.display(),
            key = s3.access_key,
            secret = s3.secret_key,
        ),
    )
    .expect("write script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let config = dir.path().join("config");
    std::fs::write(
        &config,
        format!(
            "[profile pods]\ncredential_process = {}\n",
            script.display()
        ),
    )
    .expect("write aws config");
    let envs = vec![
        ("AWS_CONFIG_FILE", config.display().to_string()),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.path().join("none").display().to_string(),
        ),
    ];
    (dir, envs, count)
}

fn lines_in(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

fn pod_logs(double: &RunPodDouble) -> String {
    double
        .pods()
        .iter()
        .map(|p| p["dir"].as_str().unwrap_or_default().to_owned())
        .map(|d| std::fs::read_to_string(format!("{d}/container.log")).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The objects under `prefix` of the test bucket, listed with the S3 server's own keys
/// (no daemon involved).
fn objects_under(home: &tests::Home, s3: &tests::s3::S3Env, prefix: &str) -> String {
    let out = cli(home, s3, None)
        .args(["--output", "json", "s3", "ls", "--recursive", prefix])
        .output()
        .expect("s3 ls");
    tests::stdout(&out)
}

/// A project holding the pod trainer (`fixtures/pod_trainer.py`), and a fresh checkpoint
/// prefix in the test bucket for `test`.
fn trainer_project(s3: &tests::s3::S3Env, test: &str) -> (tempfile::TempDir, String) {
    let project = tempfile::tempdir().expect("project");
    std::fs::copy(
        tests::fixture("pod_trainer.py"),
        project.path().join("pod_trainer.py"),
    )
    .expect("copy trainer");
    let base = format!(
        "s3://{}/{}ck",
        s3.bucket,
        tests::s3::S3Env::unique_prefix(test)
    );
    (project, base)
}

/// Starts `argv` from `project` on a new pod (`extra` launch options), detached, with
/// checkpoints to `base`, by `cmd`; the run's id.
fn detach_on_pod(
    double: &RunPodDouble,
    mut cmd: std::process::Command,
    extra: &[&str],
    base: &str,
    project: &std::path::Path,
    argv: &[&str],
) -> String {
    let out = cmd
        .args(["--output", "json", "run", "--detach"])
        .args(["--provider", "runpod", "--gpu", "A100 PCIe"])
        .args(extra)
        .args(["--setup", "none", "--checkpoints", base, "--workdir"])
        .arg(project)
        .arg("--")
        .args(argv)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}\npod: {}",
        tests::stderr(&out),
        pod_logs(double)
    );
    tests::json_output(&out, &["run"])["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

#[test]
fn a_pod_is_handed_store_credentials_renewed_and_waits_for_them_while_the_laptop_is_away() {
    let double = RunPodDouble::start();
    let Some((home, s3)) = runpod_home_with(&double, "runpod_handed", "store_profile = \"pods\"\n")
    else {
        return;
    };
    let (_profile, profile_env, issued) = expiring_profile(&s3, 20);
    let (project, base) = trainer_project(&s3, "runpod_handed");
    let cue = project.path().join("cue");
    let laptop = || {
        let mut cmd = cli(&home, &s3, Some(KEY));
        cmd.envs(profile_env.clone());
        cmd
    };
    let cue_arg = cue.display().to_string();
    let run = detach_on_pod(
        &double,
        laptop(),
        &[],
        &base,
        project.path(),
        &["python3", "pod_trainer.py", "handed", &cue_arg],
    );
    let prefix = format!("{base}/{run}/");
    // Nothing secret is where RunPod's API would show it.
    let pods = double.pods();
    assert_eq!(pods.len(), 1, "{pods:?}");
    let shown = pods[0].to_string();
    assert!(
        !shown.contains(&s3.secret_key),
        "the secret is on show: {shown}"
    );
    assert!(
        !shown.contains("AWS_ACCESS_KEY_ID"),
        "store keys in the pod's env: {shown}"
    );
    // The first checkpoint arrives with handed credentials, and they are renewed.
    home.wait_until("one.bin in the store", Duration::from_secs(60), || {
        objects_under(&home, &s3, &prefix).contains("one.bin")
    });
    home.wait_until("a renewal", Duration::from_secs(40), || {
        lines_in(&issued) >= 2
    });

    // The laptop goes away; the credentials the pod holds expire.
    let pid = home.daemon_pid().expect("a daemon");
    assert!(home.run(&["shutdown"]).status.success());
    let gone = Instant::now();
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
        assert!(
            gone.elapsed() < Duration::from_secs(20),
            "the daemon stayed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(22));
    std::fs::write(&cue, "").expect("cue");
    std::thread::sleep(Duration::from_secs(6));
    let held = objects_under(&home, &s3, &prefix);
    assert!(
        !held.contains("two.bin"),
        "uploaded with expired credentials: {held}"
    );
    let log = pod_logs(&double);
    assert!(
        log.contains("store requests wait for the controller to renew its credentials"),
        "the wait is not in the agent's log:\n{log}"
    );

    // Back: the agent reconnects, is handed fresh ones, and the upload goes through.
    let out = laptop().args(["list"]).output().expect("list");
    assert!(out.status.success(), "{}", tests::stderr(&out));
    home.wait_until("two.bin in the store", Duration::from_secs(60), || {
        objects_under(&home, &s3, &prefix).contains("two.bin")
    });
    let log = pod_logs(&double);
    assert!(log.contains("store requests resume"), "{log}");
    std::fs::write(cue.with_extension("end"), "").expect("cue");
    home.wait_until("the run to succeed", Duration::from_secs(60), || {
        home.json(&["logs", &run])
            .get("state")
            .is_some_and(|s| s == "succeeded")
    });
}

/// Starts `argv` of the pod trainer's project (made for `test`), detached, on a new pod
/// with `extra` launch options, its store credentials from an expiring profile: the run's
/// id, the project, the checkpoint base, and the profile (kept alive by the caller).
fn trainer_on_pod(
    double: &RunPodDouble,
    home: &tests::Home,
    s3: &tests::s3::S3Env,
    test: &str,
    extra: &[&str],
    argv: &[&str],
) -> (String, tempfile::TempDir, String, tempfile::TempDir) {
    let (profile, profile_env, _) = expiring_profile(s3, 3600);
    let (project, base) = trainer_project(s3, test);
    let mut cmd = cli(home, s3, Some(KEY));
    cmd.envs(profile_env);
    let run = detach_on_pod(double, cmd, extra, &base, project.path(), argv);
    (run, project, base, profile)
}

#[test]
fn an_interrupted_pod_signals_its_run_which_ends_interrupted_with_its_last_checkpoint_kept() {
    let double = RunPodDouble::start();
    let Some((home, s3)) = runpod_home_with(&double, "runpod_spot", "store_profile = \"pods\"\n")
    else {
        return;
    };
    let (run, _project, base, _profile) = trainer_on_pod(
        &double,
        &home,
        &s3,
        "runpod_spot",
        &["--spot"],
        &["python3", "pod_trainer.py", "spot", "-"],
    );
    let prefix = format!("{base}/{run}/");
    home.wait_until("step-1.bin in the store", Duration::from_secs(60), || {
        objects_under(&home, &s3, &prefix).contains("step-1.bin")
    });
    let pods = double.pods();
    assert_eq!(pods[0]["interruptible"], true, "{pods:?}");
    let id = pods[0]["id"].as_str().expect("pod id").to_owned();
    double.interrupt(&id);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = home.json(&["logs", &run]);
        if logs.get("state").is_some_and(|s| s == "interrupted") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run did not end interrupted: {}\npod: {}",
            logs.get("state").cloned().unwrap_or_default(),
            pod_logs(&double)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The checkpoint saved on the signal made it out before SIGKILL.
    let listed = objects_under(&home, &s3, &prefix);
    assert!(
        listed.contains("final.bin"),
        "{listed}\npod: {}",
        pod_logs(&double)
    );
    let (names, latest) = home.checkpoint_names(&run);
    assert!(names.contains(&"final.bin".to_owned()), "{names:?}");
    assert_eq!(latest.as_deref(), Some("final.bin"));
    let logs = tests::stdout(&home.run(&["logs", &run]));
    assert!(logs.contains("interrupted: saving"), "{logs}");
}

#[test]
fn a_pod_interrupted_mid_upload_still_gets_its_final_checkpoint_out_and_presents_nothing_torn() {
    let double = RunPodDouble::start();
    let Some(s3) = tests::s3::S3Env::get("runpod_spot_mid_upload") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let proxy = rt.block_on(FaultProxy::start(&s3.endpoint));
    let Some((home, s3)) = runpod_home_via(
        &double,
        "runpod_spot_mid_upload",
        s3,
        &proxy.endpoint(),
        "store_profile = \"pods\"\n",
    ) else {
        return;
    };
    // The trainer waits for this file (outside its project) before its big save.
    let scratch = tempfile::tempdir().expect("tempdir");
    let cue = scratch.path().join("cue");
    let (run, _project, base, _profile) = trainer_on_pod(
        &double,
        &home,
        &s3,
        "runpod_spot_mid_upload",
        &["--spot"],
        &[
            "python3",
            "pod_trainer.py",
            "spot-big",
            cue.to_str().expect("utf8"),
        ],
    );
    let prefix = format!("{base}/{run}/");
    home.wait_until("step-1.bin in the store", Duration::from_secs(60), || {
        objects_under(&home, &s3, &prefix).contains("step-1.bin")
    });
    // A slow uplink (4 MB/s): big.bin (40 MB) takes ten seconds to upload. The spot
    // notice comes a quarter of the way in, and the pod is killed 5 s after it.
    proxy.set(Fault::ThrottleUp(4_000_000));
    std::fs::write(&cue, b"").expect("cue");
    home.wait_until(
        "big.bin a quarter uploaded",
        Duration::from_secs(60),
        || proxy.sent_up() > 10_000_000,
    );
    let id = double.pods()[0]["id"].as_str().expect("pod id").to_owned();
    double.interrupt(&id);
    home.wait_until(
        "the run to end interrupted",
        Duration::from_secs(30),
        || {
            home.json(&["logs", &run])
                .get("state")
                .is_some_and(|s| s == "interrupted")
        },
    );
    // The checkpoint saved on the signal got out ahead of the older one still uploading,
    // and LATEST names it.
    let (names, latest) = home.checkpoint_names(&run);
    assert!(
        names.contains(&"final.bin".to_owned()),
        "{names:?}\npod: {}",
        pod_logs(&double)
    );
    assert_eq!(latest.as_deref(), Some("final.bin"));
    // big.bin is in the store whole, or not at all: never a torn object under its name.
    proxy.set(Fault::Pass);
    let listed = objects_under(&home, &s3, &prefix);
    if names.contains(&"big.bin".to_owned()) {
        let out = tempfile::tempdir().expect("tempdir");
        let got = home.run(&[
            "checkpoint",
            "download",
            &run,
            "big.bin",
            "--to",
            &out.path().display().to_string(),
        ]);
        assert!(got.status.success(), "{}", tests::stderr(&got));
        assert_eq!(
            std::fs::metadata(out.path().join("big.bin"))
                .expect("big.bin")
                .len(),
            40_000_000
        );
    } else {
        assert!(!listed.contains("/big.bin\""), "{listed}");
    }
}

#[test]
fn a_cost_cap_on_a_pod_stops_its_run_the_graceful_way_at_the_pods_price() {
    let double = RunPodDouble::start();
    let Some((home, s3)) = runpod_home_with(&double, "runpod_budget", "store_profile = \"pods\"\n")
    else {
        return;
    };
    // $1.64/h: two cents last 44 s from the launch.
    let (run, _project, _base, _profile) = trainer_on_pod(
        &double,
        &home,
        &s3,
        "runpod_budget",
        &["--max-cost", "0.02"],
        &["python3", "pod_trainer.py", "spot", "-"],
    );
    let status = home.json(&["status"]);
    assert_eq!(
        status["budgets"][0]["budget"]["price_micros_per_hour"], 1_640_000,
        "{status}"
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let logs = home.json(&["logs", &run]);
        if logs.get("state").is_some_and(|s| s == "budget_exceeded") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run did not end budget_exceeded: {}\npod: {}",
            logs.get("state").cloned().unwrap_or_default(),
            pod_logs(&double)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let logs = home.run(&["logs", &run]);
    assert!(
        tests::stderr(&logs).contains("budget reached: the $0.02 cost cap"),
        "{}",
        tests::stderr(&logs)
    );
    assert!(
        tests::stdout(&logs).contains("interrupted: saving"),
        "the trainer got its stop signal"
    );
    let (names, latest) = home.checkpoint_names(&run);
    assert!(names.contains(&"final.bin".to_owned()), "{names:?}");
    assert_eq!(latest.as_deref(), Some("final.bin"));
    // Launched for the run, so gone with it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !double.pods().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the pod outlived its run: {:?}",
            double.pods()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The STS call itself, against moto's STS (moto does not enforce session policies or
/// expiry: the policy's content is checked by `controller::credentials`'s unit tables).
#[tokio::test]
async fn assumed_role_credentials_come_back_with_their_expiry_for_the_runs_named() {
    let Some(endpoint) = std::env::var("RUNCTL_TEST_EC2_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
    else {
        assert!(
            std::env::var("RUNCTL_REQUIRE_EC2").is_err(),
            "RUNCTL_TEST_EC2_ENDPOINT is required under scripts/test.sh"
        );
        eprintln!("SKIPPED assume role: no moto server (run scripts/test.sh)");
        return;
    };
    use controller::credentials::{Grant, Source, issue};
    let config: controller::config::Config =
        toml::from_str("[storage]\nregion = \"us-east-1\"\n").expect("config");
    let source = Source::AssumeRole {
        role_arn: "arn:aws:iam::123456789012:role/runctl-pods".into(),
        lifetime: Duration::from_secs(900),
        sts_endpoint: Some(endpoint),
    };
    let run: protocol::RunId = "run-0123456789ab".parse().expect("run id");
    let grants = [Grant {
        bucket: "ckpt".into(),
        prefix: "runs/run-0123456789ab/".into(),
        write: true,
    }];
    let before = std::time::SystemTime::now();
    let creds = issue(
        &config,
        &source,
        "runpod-3fa9c1",
        vec![run.clone()],
        &grants,
    )
    .await
    .expect("assumed");
    assert!(creds.access_key_id.starts_with("ASIA"), "{creds:?}");
    assert!(creds.session_token.is_some(), "{creds:?}");
    assert_eq!(creds.runs, [run]);
    let expires = creds.expires_at_ms.expect("an expiry");
    let issued = before
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(
        (issued + 800_000..issued + 1_000_000).contains(&expires),
        "900 s from now, not {} s",
        (expires as i64 - issued as i64) / 1000
    );
    assert!(
        !format!("{creds:?}").contains(&creds.secret_access_key),
        "the secret is in Debug"
    );
}

#[test]
fn a_run_that_needs_the_store_on_a_pod_with_no_credentials_to_hand_is_refused_before_launch() {
    let double = RunPodDouble::start();
    let Some((home, s3)) = runpod_home(&double, "runpod_no_creds") else {
        return;
    };
    let out = cli(&home, &s3, Some(KEY))
        .args(["run", "--provider", "runpod", "--gpu", "A100 PCIe"])
        .args(["--checkpoints", &format!("s3://{}/ck", s3.bucket)])
        .args(["--", "true"])
        .output()
        .expect("run");
    let err = tests::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("store_role_arn") && err.contains("store_profile"),
        "{err}"
    );
    assert!(double.pods().is_empty(), "{:?}", double.pods());
}

/// A pod as RunPod's are: in a network of its own with no UDP, reaching the daemon, the
/// store and RunPod's API only at this machine's address on its link.
#[test]
fn a_pod_with_no_udp_dials_back_over_tcp_and_runs_with_the_store_through_its_link() {
    let Some(net) = tests::runpod::PodNet::new("runpod_no_udp") else {
        return;
    };
    let Some(s3) = tests::s3::S3Env::get("runpod_no_udp") else {
        return;
    };
    let Some(agent) = std::env::var("RUNCTL_STATIC_AGENT")
        .ok()
        .filter(|a| !a.is_empty())
    else {
        assert!(std::env::var("RUNCTL_REQUIRE_S3").is_err());
        eprintln!("SKIPPED runpod_no_udp: no static agent (run scripts/test.sh)");
        return;
    };
    let host = tests::runpod::PodNet::HOST;
    let double = RunPodDouble::start_with(Some(&net.netns), host);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // The store as the pod sees it: this machine's address on the pod's link.
    let store = runtime.block_on(tests::s3::FaultProxy::start_on(
        &format!("{host}:0"),
        &s3.endpoint,
    ));
    let port = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let prefix = tests::s3::S3Env::unique_prefix("runpod_no_udp");
    let home = tests::Home::new();
    let (_profile, profile_env, _) = expiring_profile(&s3, 3600);
    std::fs::write(
        home.path().join("config.toml"),
        format!(
            "[daemon]\nlisten = \"0.0.0.0:{port}\"\nstop_grace_secs = 3\n{storage}\
             [runpod]\napi_url = \"{api}\"\ngraphql_url = \"{graphql}\"\n\
             controller_endpoint = \"{host}:{port}\"\n\
             artifacts = \"s3://{bucket}/{prefix}artifacts\"\n\
             agent_binary = \"{agent}\"\nenroll_timeout_secs = 60\nstore_profile = \"pods\"\n",
            storage = s3.config_toml(&store.endpoint()),
            api = double.api(),
            graphql = double.graphql(),
            bucket = s3.bucket,
        ),
    )
    .expect("config");
    let project = tempfile::tempdir().expect("project");
    let base = format!("s3://{}/{prefix}ck", s3.bucket);
    let started = Instant::now();
    let out = cli(&home, &s3, Some(KEY))
        .envs(profile_env)
        .args(["run", "--provider", "runpod", "--gpu", "A100 PCIe"])
        .args(["--setup", "none", "--checkpoints", &base, "--workdir"])
        .arg(project.path())
        .args([
            "--",
            "sh",
            "-c",
            "echo first output; echo weights > \"$RUNCTL_CHECKPOINT_DIR/c.bin\"",
        ])
        .output()
        .expect("run");
    let took = started.elapsed();
    let err = tests::stderr(&out);
    let daemon_log = std::fs::read_to_string(home.path().join("daemon.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{err}\npod: {}\ndaemon: {daemon_log}",
        pod_logs(&double)
    );
    assert!(
        tests::stdout(&out).contains("first output"),
        "{}",
        tests::stdout(&out)
    );
    eprintln!("launch to the run's end on the double, UDP dropped: {took:.1?}\n{err}");
    // Over TCP, since UDP goes nowhere from the pod.
    let connected: Vec<&str> = daemon_log
        .lines()
        .filter(|l| l.contains("connected from"))
        .collect();
    assert!(
        !connected.is_empty() && connected.iter().all(|l| l.contains("tcp")),
        "{connected:?}"
    );
    let listed = objects_under(&home, &s3, &format!("{base}/"));
    assert!(listed.contains("c.bin"), "{listed}");
    drop(runtime);
}

/// The instance named in `list` for pod launches: its row.
fn listed(home: &tests::Home, name: &str) -> serde_json::Value {
    let list = home.json(&["list"]);
    list["instances"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["instance"]["name"] == name).cloned())
        .unwrap_or_else(|| panic!("{name} is not listed: {list}"))
}

#[test]
fn a_kept_pod_is_listed_with_its_price_stopped_started_and_terminated_leaving_other_pods_alone() {
    let double = RunPodDouble::start();
    let Some((home, s3)) = runpod_home(&double, "runpod_lifecycle") else {
        return;
    };
    // Someone else's pod in the same account: never listed as runctl's, never touched.
    let theirs = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(client(&double, KEY).create_pod(&pod("their-notebook", A100, 1)))
        .expect("their pod")
        .id;
    let out = cli(&home, &s3, Some(KEY))
        .args(["--output", "json", "launch", "--provider", "runpod"])
        .args(["--gpu", "A100 PCIe", "--name", "kept", "--wait"])
        .output()
        .expect("launch");
    assert!(
        out.status.success(),
        "{}\npod: {}",
        tests::stderr(&out),
        pod_logs(&double)
    );
    let row = listed(&home, "kept");
    assert_eq!(row["instance"]["provider"], "runpod", "{row}");
    assert_eq!(row["connected"], true, "{row}");
    assert_eq!(row["cloud"]["price_per_hour"], 1.64, "{row}");
    assert!(row["cost"].as_f64().is_some(), "{row}");
    let list = home.json(&["list"]);
    assert!(!list.to_string().contains("their-notebook"), "{list}");
    let ours = || {
        double
            .pods()
            .into_iter()
            .find(|p| p["name"] == "runctl-kept")
            .expect("our pod")
    };

    let out = cli(&home, &s3, Some(KEY))
        .args(["stop", "kept"])
        .output()
        .expect("stop");
    assert!(out.status.success(), "{}", tests::stderr(&out));
    assert_eq!(ours()["status"], "EXITED", "{}", ours());
    home.wait_until("kept to show stopped", Duration::from_secs(20), || {
        listed(&home, "kept")["instance"]["state"] == "stopped"
    });
    let out = cli(&home, &s3, Some(KEY))
        .args(["start", "kept"])
        .output()
        .expect("start");
    assert!(out.status.success(), "{}", tests::stderr(&out));
    // Its container starts again from the volume: the same agent, the same identity.
    home.wait_until("kept's agent back", Duration::from_secs(60), || {
        listed(&home, "kept")["connected"] == true
    });
    let out = cli(&home, &s3, Some(KEY))
        .args(["run", "--on", "kept", "--no-checkpoints", "--setup", "none"])
        .args(["--", "echo", "after a restart"])
        .output()
        .expect("run");
    assert!(
        tests::stdout(&out).contains("after a restart"),
        "{}\npod: {}\ndaemon: {}",
        tests::stderr(&out),
        pod_logs(&double),
        std::fs::read_to_string(home.path().join("daemon.log")).unwrap_or_default()
    );

    let out = cli(&home, &s3, Some(KEY))
        .args(["terminate", "kept"])
        .output()
        .expect("terminate");
    assert!(out.status.success(), "{}", tests::stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(30);
    while double.pods().iter().any(|p| p["name"] == "runctl-kept") {
        assert!(Instant::now() < deadline, "{:?}", double.pods());
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = double.pods();
    assert!(
        left.len() == 1 && left[0]["id"] == theirs.as_str() && left[0]["status"] == "RUNNING",
        "their pod was touched: {left:?}"
    );
}

#[test]
fn end_stop_leaves_the_pod_stopped_by_its_own_agent_with_its_volume() {
    let double = RunPodDouble::start();
    let Some((home, s3)) = runpod_home(&double, "runpod_end_stop") else {
        return;
    };
    let out = cli(&home, &s3, Some(KEY))
        .args([
            "run",
            "--provider",
            "runpod",
            "--gpu",
            "A100 PCIe",
            "--end",
            "stop",
        ])
        .args(["--no-checkpoints", "--setup", "none"])
        .args(["--", "sh", "-c", "echo done > /dev/null; echo finished"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}\npod: {}",
        tests::stderr(&out),
        pod_logs(&double)
    );
    assert!(tests::stdout(&out).contains("finished"));
    // The pod's agent asked RunPod (with the pod's own key) to stop it: EXITED, not gone.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let pods = double.pods();
        assert_eq!(pods.len(), 1, "the pod was terminated: {pods:?}");
        if pods[0]["status"] == "EXITED" {
            break;
        }
        assert!(Instant::now() < deadline, "never stopped: {pods:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let daemon = home.daemon_pid();
    let name = home.json(&["list"])["instances"][0]["instance"]["name"]
        .as_str()
        .expect("name")
        .to_owned();
    home.wait_until("the pod to show stopped", Duration::from_secs(20), || {
        listed(&home, &name)["instance"]["state"] == "stopped"
    });
    assert_eq!(home.daemon_pid(), daemon);
    let out = cli(&home, &s3, Some(KEY))
        .args(["terminate", &name])
        .output()
        .expect("terminate");
    assert!(out.status.success(), "{}", tests::stderr(&out));
}

#[test]
fn network_volumes_are_made_listed_mounted_in_their_datacenter_only_and_deleted_when_free() {
    let double = RunPodDouble::start();
    let Some((home, s3)) = runpod_home(&double, "runpod_volumes") else {
        return;
    };
    let cmd = |args: &[&str]| {
        cli(&home, &s3, Some(KEY))
            .args(["--output", "json"])
            .args(args)
            .output()
            .expect("runctl-controller")
    };
    let out = cmd(&[
        "volume",
        "create",
        "--provider",
        "runpod",
        "--size",
        "50",
        "--datacenter",
        "US-KS-2",
        "--name",
        "data",
    ]);
    assert!(out.status.success(), "{}", tests::stderr(&out));
    let made = tests::json_output(&out, &["volume", "create"]);
    let id = made["id"].as_str().expect("id").to_owned();
    assert_eq!(made["name"], "runctl-data", "{made}");
    // Someone else's volume is not runctl's to list or delete.
    let theirs: serde_json::Value = ureq::post(format!("{}/v2/network-volumes", double.api()))
        .header("Authorization", format!("Bearer {KEY}"))
        .send_json(serde_json::json!({"name": "their-data", "size": 10, "dataCenter": "US-KS-2"}))
        .expect("their volume")
        .into_body()
        .read_json()
        .expect("json");
    let out = cmd(&["volume", "list", "--provider", "runpod"]);
    let listed = tests::stdout(&out);
    assert!(
        listed.contains(&id) && !listed.contains("their-data"),
        "{listed}"
    );
    let out = cmd(&[
        "volume",
        "delete",
        "--provider",
        "runpod",
        theirs["id"].as_str().expect("id"),
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", tests::stderr(&out));

    // Another data center: refused before anything is made.
    let out = cli(&home, &s3, Some(KEY))
        .args([
            "launch",
            "--provider",
            "runpod",
            "--gpu",
            "A100 PCIe",
            "--volume",
            &id,
        ])
        .args(["--datacenter", "EU-RO-1"])
        .output()
        .expect("launch");
    let err = tests::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is in data center US-KS-2") && err.contains("--datacenter US-KS-2"),
        "{err}"
    );
    assert!(double.pods().is_empty(), "{:?}", double.pods());

    // Its own: the pod goes there with the volume at /workspace.
    let out = cmd(&[
        "launch",
        "--provider",
        "runpod",
        "--gpu",
        "A100 PCIe",
        "--volume",
        &id,
        "--name",
        "withvol",
        "--wait",
    ]);
    assert!(
        out.status.success(),
        "{}\npod: {}",
        tests::stderr(&out),
        pod_logs(&double)
    );
    let pods = double.pods();
    assert_eq!(pods[0]["dataCenterId"], "US-KS-2", "{pods:?}");
    assert_eq!(
        pods[0]["mounts"]["network"][0]["volumeId"],
        id.as_str(),
        "{pods:?}"
    );
    assert_eq!(
        pods[0]["mounts"]["network"][0]["path"], "/workspace",
        "{pods:?}"
    );
    // In use: RunPod refuses, and says why.
    let out = cli(&home, &s3, Some(KEY))
        .args(["volume", "delete", "--provider", "runpod", &id])
        .output()
        .expect("delete");
    assert_ne!(out.status.code(), Some(0));
    assert!(
        tests::stderr(&out).contains("in use"),
        "{}",
        tests::stderr(&out)
    );
    assert!(cmd(&["terminate", "withvol"]).status.success());
    let out = cmd(&["volume", "delete", "--provider", "runpod", &id]);
    assert!(out.status.success(), "{}", tests::stderr(&out));
    let out = cmd(&["volume", "list", "--provider", "runpod"]);
    assert!(
        !tests::stdout(&out).contains(&id),
        "{}",
        tests::stdout(&out)
    );
}

#[test]
fn a_pod_whose_image_ignores_the_start_command_is_reported_and_terminated() {
    let double = RunPodDouble::start();
    let Some((home, s3)) = runpod_home(&double, "runpod_ignores_args") else {
        return;
    };
    let config = home.path().join("config.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("enroll_timeout_secs = 60", "enroll_timeout_secs = 8"),
    )
    .expect("config");
    let out = cli(&home, &s3, Some(KEY))
        .args([
            "launch",
            "--provider",
            "runpod",
            "--gpu",
            "A100 PCIe",
            "--wait",
        ])
        .args(["--image", "someone/trainer:ignores-args"])
        .output()
        .expect("launch");
    let err = tests::stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("did not enroll") || err.contains("enroll"),
        "{err}"
    );
    assert!(err.contains("entrypoint ignores its arguments"), "{err}");
    // Nothing left billed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !double.pods().is_empty() {
        assert!(
            Instant::now() < deadline,
            "left running: {:?}",
            double.pods()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_interrupted_spot_pod_is_relaunched_and_its_run_resumes_from_the_last_checkpoint() {
    let double = RunPodDouble::start();
    let Some((home, s3)) =
        runpod_home_with(&double, "runpod_relaunch", "store_profile = \"pods\"\n")
    else {
        return;
    };
    let (_profile, profile_env, _) = expiring_profile(&s3, 3600);
    let (project, base) = trainer_project(&s3, "runpod_relaunch");
    let mut cmd = cli(&home, &s3, Some(KEY));
    cmd.envs(profile_env);
    let run = detach_on_pod(
        &double,
        cmd,
        &["--spot", "--on-interrupt", "relaunch:1"],
        &base,
        project.path(),
        &["python3", "pod_trainer.py", "relaunch", "-"],
    );
    let prefix = format!("{base}/{run}/");
    home.wait_until("step-1.bin in the store", Duration::from_secs(60), || {
        objects_under(&home, &s3, &prefix).contains("step-1.bin")
    });
    let first = double.pods()[0]["id"].as_str().expect("pod id").to_owned();
    double.interrupt(&first);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let logs = home.json(&["logs", &run]);
        if logs.get("state").is_some_and(|s| s == "succeeded") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run was not relaunched to success: {logs}\npod: {}",
            pod_logs(&double)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let logs = home.run(&["logs", &run]);
    let (out, err) = (tests::stdout(&logs), tests::stderr(&logs));
    assert!(out.contains("interrupted: saving"), "{out}");
    assert!(out.contains("resumed from final.bin"), "{out}");
    assert!(
        err.contains("started again (attempt 2) after a spot interruption of runpod-"),
        "{err}"
    );
    // Two pods for one run: the interrupted one terminated, its replacement gone with the
    // run.
    let list = home.json(&["list", "--all"]);
    assert_eq!(list["runs"].as_array().map(Vec::len), Some(1), "{list}");
    home.wait_until("both pods terminated", Duration::from_secs(30), || {
        let list = home.json(&["list", "--all"]);
        list["instances"].as_array().is_some_and(|i| {
            i.len() == 2 && i.iter().all(|i| i["instance"]["state"] == "terminated")
        })
    });
    assert!(double.pods().is_empty(), "{:?}", double.pods());
}

/// Waits until the double holds no pod and no cluster, and both of the gang's records say
/// terminated.
fn cluster_gone(double: &RunPodDouble, home: &tests::Home) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !double.pods().is_empty() || !double.clusters().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the cluster is still there: {:?}",
            double.clusters()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let list = home.json(&["list", "--all"]);
    let instances = list["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 2, "{list}");
    assert!(
        instances
            .iter()
            .all(|i| i["instance"]["state"] == "terminated"),
        "{list}"
    );
}

/// Node 0 listens at `MASTER_ADDR:MASTER_PORT`, node 1 dials it and says where it is from.
const MEET: &str = r#"
import os, socket, time
rank, addr, port = int(os.environ["RANK"]), os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
print(f"node {rank} of {os.environ['WORLD_SIZE']} meets at {addr}:{port}", flush=True)
if rank == 0:
    with socket.create_server((addr, port)) as server:
        conn, _ = server.accept()
        print("node 0 heard:", conn.recv(200).decode(), flush=True)
else:
    for _ in range(150):
        try:
            conn = socket.create_connection((addr, port))
            break
        except OSError:
            time.sleep(0.2)
    conn.sendall(f"hello from node {rank} at {os.environ['NODE_ADDR']}".encode())
"#;

#[test]
fn a_gang_on_runpod_is_one_cluster_whose_nodes_meet_on_its_network_and_go_with_the_run() {
    let double = RunPodDouble::start();
    let Some((home, s3)) = runpod_home(&double, "runpod_gang") else {
        return;
    };
    let project = tempfile::tempdir().expect("project");
    std::fs::write(project.path().join("meet.py"), MEET).expect("write");
    let out = cli(&home, &s3, Some(KEY))
        .args(["run", "--provider", "runpod", "--gpu", "A100 PCIe"])
        .args(["--nodes", "2", "--launcher", "none"])
        .args(["--no-checkpoints", "--setup", "none", "--workdir"])
        .arg(project.path())
        .args(["--", "python3", "meet.py"])
        .output()
        .expect("run");
    let (stdout, err) = (tests::stdout(&out), tests::stderr(&out));
    assert!(
        out.status.success(),
        "{err}\n{stdout}\npods: {}",
        pod_logs(&double)
    );
    assert!(
        err.contains("cost: 2 x $1.64/h = $3.28/h for the gang"),
        "{err}"
    );
    assert!(err.contains("cluster cluster_"), "{err}");
    for node in 0..2 {
        assert!(
            err.contains(&format!("[node {node}] agent enrolled")),
            "{err}"
        );
    }
    // Both nodes meet at node 0's address on the cluster's network, and reach it.
    let meets: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" meets at 127.65."))
        .collect();
    assert_eq!(meets.len(), 2, "{stdout}");
    let at = meets[0].rsplit(' ').next().expect("address");
    assert!(at.ends_with(".2:29500"), "node 0's cluster address: {at}");
    for node in 0..2 {
        assert!(
            stdout.contains(&format!("[node {node}] node {node} of 2 meets at {at}")),
            "{stdout}"
        );
    }
    let ip1 = at.replace(".2:29500", ".3");
    assert!(
        stdout.contains(&format!(
            "[node 0] node 0 heard: hello from node 1 at {ip1}"
        )),
        "{stdout}"
    );
    // Launched for the run, the cluster went with it.
    cluster_gone(&double, &home);
}

#[test]
fn a_runpod_cluster_whose_node_never_enrolls_keeps_nothing_and_refusals_make_nothing() {
    let double = RunPodDouble::start();
    let Some((home, s3)) = runpod_home(&double, "runpod_gang_none") else {
        return;
    };
    // Refused before anything is made: a cluster has no spot pods, and its pods cannot be
    // stopped.
    for (extra, said) in [
        (&["--spot"][..], "no interruptible pods"),
        (&["--end", "stop"][..], "cannot stop a cluster's pods"),
    ] {
        let out = cli(&home, &s3, Some(KEY))
            .args(["run", "--provider", "runpod", "--gpu", "A100 PCIe"])
            .args(["--nodes", "2", "--launcher", "none", "--setup", "none"])
            .args(extra)
            .args(["--", "true"])
            .output()
            .expect("run");
        let err = tests::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(said), "{err}");
        assert!(double.clusters().is_empty() && double.pods().is_empty());
    }
    let config = home.path().join("config.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("enroll_timeout_secs = 60", "enroll_timeout_secs = 10"),
    )
    .expect("config");
    home.run(&["shutdown"]);
    double.quiet_rank(1);
    let out = cli(&home, &s3, Some(KEY))
        .args(["run", "--provider", "runpod", "--gpu", "A100 PCIe"])
        .args(["--nodes", "2", "--launcher", "none", "--setup", "none"])
        .args(["--", "true"])
        .output()
        .expect("run");
    let err = tests::stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("node 1 of 2 could not be launched, so none is kept"),
        "{err}"
    );
    assert!(err.contains("did not enroll"), "{err}");
    cluster_gone(&double, &home);
}

#[test]
fn a_runpod_gang_that_ends_while_the_laptop_is_away_deletes_its_own_cluster() {
    let double = RunPodDouble::start();
    let Some((home, s3)) = runpod_home(&double, "runpod_gang_away") else {
        return;
    };
    let project = tempfile::tempdir().expect("project");
    let out = cli(&home, &s3, Some(KEY))
        .args(["--output", "json", "run", "--detach"])
        .args(["--provider", "runpod", "--gpu", "A100 PCIe"])
        .args(["--nodes", "2", "--launcher", "none"])
        .args(["--no-checkpoints", "--setup", "none", "--workdir"])
        .arg(project.path())
        .args(["--", "sleep", "3"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}\npods: {}",
        tests::stderr(&out),
        pod_logs(&double)
    );
    assert_eq!(double.clusters().len(), 1);
    // The laptop goes away; the nodes end, wait for it a while (the agent's delivery
    // bound, 30 s), then power off: a cluster's pod cannot be terminated alone, so its
    // agent deletes the cluster with the pod's own key.
    home.run(&["shutdown"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !double.pods().is_empty() || !double.clusters().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the cluster outlived its run with nobody watching: {:?}\npods: {}",
            double.clusters(),
            pod_logs(&double)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every container's log, gone pods' too.
    let logs: String = std::fs::read_dir(double.dir.path())
        .expect("the double's dir")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("container.log")).ok())
        .collect();
    assert!(
        logs.contains("deleting the cluster, which ends them all"),
        "{logs}"
    );
    // Back, the daemon finds both pods gone.
    home.wait_until("both pods recorded gone", Duration::from_secs(30), || {
        let list = cli(&home, &s3, Some(KEY))
            .args(["--output", "json", "list", "--all"])
            .output()
            .expect("list");
        let list = tests::json_output(&list, &["list"]);
        list["instances"].as_array().is_some_and(|i| {
            i.len() == 2 && i.iter().all(|i| i["instance"]["state"] == "terminated")
        })
    });
}
