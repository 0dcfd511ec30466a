//! The EC2 provider against moto's EC2 server and the SeaweedFS S3 server that
//! `scripts/test.sh` starts on loopback: launch checks and refusals, what a launch creates
//! (tags, IMDSv2, the security group, user-data that passes `cloud-init schema`), the
//! lifecycle, volumes, and a simulated boot in which the user-data's own install steps
//! fetch the static agent by its presigned URL, check its hash and start it, and the agent
//! dials back and runs a job end to end; a relay launched, kept apart from runs, booted
//! the same way and registered with; a cost cap held by the agent while the daemon is
//! stopped, the run's last checkpoint in the store. Each test works in a region of its own, so they
//! never see each other's instances.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use controller::config::Ec2Config;
use controller::provider::ec2::Ec2;
use tests::s3::S3Env;
use tests::{Home, Imds, fixture, stderr, stdout};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Where moto, the static agent and the tools are, from `scripts/test.sh`.
#[derive(Debug, Clone)]
struct Ec2Env {
    endpoint: String,
    s3: S3Env,
    agent: PathBuf,
    relay: PathBuf,
    python: PathBuf,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The servers and binaries, or `None` (with a loud SKIPPED line) when they are missing.
/// Under `scripts/test.sh` (`RUNCTL_REQUIRE_EC2=1`) a missing one fails the test instead.
fn ec2_env(test: &str) -> Option<Ec2Env> {
    let s3 = S3Env::get(test)?;
    match (
        var("RUNCTL_TEST_EC2_ENDPOINT"),
        var("RUNCTL_STATIC_AGENT"),
        var("RUNCTL_STATIC_RELAY"),
        var("RUNCTL_TEST_PYTHON"),
    ) {
        (Some(endpoint), Some(agent), Some(relay), Some(python)) => Some(Ec2Env {
            endpoint,
            s3,
            agent: agent.into(),
            relay: relay.into(),
            python: python.into(),
        }),
        _ => {
            assert!(
                var("RUNCTL_REQUIRE_EC2").is_none(),
                "{test}: RUNCTL_TEST_EC2_ENDPOINT, RUNCTL_STATIC_AGENT, RUNCTL_STATIC_RELAY and RUNCTL_TEST_PYTHON are required"
            );
            eprintln!("SKIPPED {test}: no EC2 server or static binaries (run scripts/test.sh)");
            None
        }
    }
}

/// A controller home for `region`, whose daemon listens where its agents are told to dial.
struct Cloud {
    home: Home,
    env: Ec2Env,
    region: String,
    prefix: String,
}

impl Cloud {
    fn new(env: &Ec2Env, test: &str, region: &str, extra_ec2: &str) -> Cloud {
        let home = Home::new();
        let port = tests::free_daemon_port();
        let prefix = S3Env::unique_prefix(test);
        let config = format!(
            "[daemon]\nlisten = \"127.0.0.1:{port}\"\nstop_grace_secs = 3\n\
             {storage}checkpoints = \"s3://{bucket}/{prefix}ckpt\"\n\
             [ec2]\nregion = \"{region}\"\nendpoint_url = \"{ec2}\"\n\
             controller_endpoint = \"127.0.0.1:{port}\"\n\
             artifacts = \"s3://{bucket}/{prefix}artifacts\"\n\
             agent_binary = \"{agent}\"\nenroll_timeout_secs = 120\n{extra_ec2}",
            storage = env.s3.config_toml(&env.s3.endpoint),
            bucket = env.s3.bucket,
            ec2 = env.endpoint,
            agent = env.agent.display(),
        );
        std::fs::write(home.path().join("config.toml"), config).expect("write config");
        Cloud {
            home,
            env: env.clone(),
            region: region.into(),
            prefix,
        }
    }

    /// Shortens how long a launch waits for its agent (before the daemon starts).
    fn enroll_timeout(&self, secs: u64) {
        let config = self.home.path().join("config.toml");
        let text = std::fs::read_to_string(&config).expect("config");
        std::fs::write(
            &config,
            text.replace(
                "enroll_timeout_secs = 120",
                &format!("enroll_timeout_secs = {secs}"),
            ),
        )
        .expect("write");
    }

    fn cli(&self) -> Command {
        let mut cmd = self.home.cli();
        cmd.envs(self.env.s3.envs());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cli()
            .args(args)
            .output()
            .expect("run runctl-controller")
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self
            .cli()
            .arg("--output")
            .arg("json")
            .args(args)
            .output()
            .expect("run");
        assert!(out.status.success(), "{args:?} failed: {}", stderr(&out));
        tests::json_output(&out, args)
    }

    /// Runs `args` and checks it fails with `code`, saying `needle`.
    fn refused(&self, args: &[&str], code: i32, needle: &str) {
        let out = self.run(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in: {err}"
        );
    }

    async fn ec2(&self) -> Ec2 {
        let config = Ec2Config {
            region: Some(self.region.clone()),
            endpoint_url: Some(self.env.endpoint.clone()),
            ..Ec2Config::default()
        };
        Ec2::connect(&config).await.expect("EC2 client")
    }

    /// Launches without waiting for the agent; returns the runctl name and the `i-` id.
    fn launch(&self, args: &[&str]) -> (String, String) {
        let mut all = vec!["launch", "--provider", "ec2", "--no-wait"];
        all.extend_from_slice(args);
        let view = self.json(&all);
        (
            view["instance"]["name"].as_str().expect("name").to_owned(),
            view["cloud"]["cloud_id"]
                .as_str()
                .expect("cloud id")
                .to_owned(),
        )
    }
}

/// A child process killed when dropped, so a failing test leaves no agent behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How many instances are not terminated (terminated ones stay listed a while, as on AWS).
async fn live(ec2: &Ec2) -> usize {
    ec2.instances(&[])
        .await
        .expect("list")
        .iter()
        .filter(|i| i.state != "terminated")
        .count()
}

/// The state of any instance (relays included), straight from DescribeInstances.
async fn state_of(ec2: &Ec2, id: &str) -> String {
    let out = match ec2
        .client()
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
    {
        Ok(out) => out,
        Err(e) => match controller::provider::ec2::api_error("describe", e) {
            e if e.code == controller::error::ErrorCode::NotFound => return "gone".into(),
            e => panic!("describe {id}: {e}"),
        },
    };
    out.reservations()
        .first()
        .and_then(|r| r.instances().first())
        .and_then(|i| i.state())
        .and_then(|s| s.name())
        .map_or_else(|| "gone".into(), |n| n.as_str().to_owned())
}

async fn wait_state(ec2: &Ec2, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = state_of(ec2, id).await;
        if state == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} stayed {state}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[test]
fn static_binaries_are_static_and_load_no_library() {
    for (var_name, package) in [
        ("RUNCTL_STATIC_AGENT", "agent"),
        ("RUNCTL_STATIC_RELAY", "relay"),
    ] {
        let Some(binary) = var(var_name).map(PathBuf::from) else {
            assert!(
                var("RUNCTL_REQUIRE_EC2").is_none(),
                "{var_name} is required"
            );
            eprintln!(
                "SKIPPED static {package} check: build it with scripts/build-static-agent.sh and set {var_name}"
            );
            continue;
        };
        check_static(&binary, package);
    }
}

/// `binary` is a static x86-64 executable that runs, and nothing among `package`'s
/// dependencies loads a shared library at run time.
fn check_static(binary: &Path, package: &str) {
    let file = Command::new("file").arg(binary).output().expect("file");
    let kind = stdout(&file);
    assert!(
        kind.contains("statically linked") || kind.contains("static-pie linked"),
        "{kind}"
    );
    assert!(kind.contains("x86-64"), "{kind}");
    let ldd = Command::new("ldd").arg(binary).output().expect("ldd");
    let said = format!("{}{}", stdout(&ldd), stderr(&ldd));
    assert!(
        said.contains("not a dynamic executable") || said.contains("statically linked"),
        "{said}"
    );
    let version = Command::new(binary)
        .arg("--version")
        .output()
        .expect("run it");
    assert!(version.status.success(), "{}", stderr(&version));

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tree = Command::new(cargo)
        .args([
            "tree",
            "-p",
            package,
            "-e",
            "normal,features",
            "--prefix",
            "none",
            "--locked",
            "--offline",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .current_dir(tests::repo_root())
        .output()
        .expect("cargo tree");
    assert!(tree.status.success(), "{}", stderr(&tree));
    let tree = stdout(&tree);
    if package == "agent" {
        assert!(
            tree.contains("hickory-resolver"),
            "names resolve without NSS"
        );
    }
    for loader in [
        "libloading ",
        "dlopen",
        "openssl-sys",
        "native-tls",
        "nvml-wrapper",
        "libudev-sys",
        "libdbus-sys",
        "sysinfo feature \"gpu\"",
    ] {
        assert!(!tree.contains(loader), "the {package} depends on {loader}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn launch_refuses_bad_input_and_leaves_nothing_behind() {
    let Some(env) = ec2_env("launch_refuses_bad_input") else {
        return;
    };
    let cloud = Cloud::new(&env, "refusals", "us-east-2", "max_running = 1\n");
    let ec2 = cloud.ec2().await;
    for (args, code, needle) in [
        (vec!["g5.nonsense"], 2, "g5.nonsense"),
        (vec!["G5"], 2, "not an instance type"),
        (vec![], 2, "needs an instance type"),
        (
            vec!["--ami", "ami-xyz", "g5.xlarge"],
            2,
            "not a valid ami- id",
        ),
        (
            vec!["--ami", "ami-0123456789abcdef0", "g5.xlarge"],
            3,
            "ami-0123456789abcdef0",
        ),
        (
            vec!["--ami", "ami-0a1b2c3d4e5f607bb", "g5.xlarge"],
            2,
            "no EBS root device",
        ),
        (
            vec!["--ami", "ami-0a1b2c3d4e5f607aa", "g5.xlarge"],
            2,
            "not x86_64",
        ),
        (
            vec!["--volume-snapshot", "snap-1", "g5.xlarge"],
            2,
            "not a valid snap- id",
        ),
        (
            vec!["--volume-snapshot", "snap-0123456789abcdef0", "g5.xlarge"],
            3,
            "snap-0123456789abcdef0",
        ),
        (
            vec!["--spot", "--max-price", "0.000001", "g5.xlarge"],
            7,
            "above the maximum",
        ),
    ] {
        let mut all = vec!["launch", "--provider", "ec2", "--no-wait"];
        all.extend(args);
        cloud.refused(&all, code, needle);
    }
    cloud.refused(
        &["launch", "--spot", "--no-wait"],
        2,
        "apply to --provider ec2",
    );
    let elsewhere = Cloud::new(&env, "refusals", "us-west-1", "");
    elsewhere.refused(
        &["launch", "--provider", "ec2", "--no-wait", "g5.xlarge"],
        7,
        "does not offer g5.xlarge in us-west-1",
    );
    assert_eq!(live(&elsewhere.ec2().await).await, 0);
    drop(elsewhere);
    assert_eq!(live(&ec2).await, 0, "a refused launch left an instance");

    // The limit: one may run, the second is refused with the way out.
    let (name, id) = cloud.launch(&["g5.xlarge"]);
    cloud.refused(
        &["launch", "--provider", "ec2", "--no-wait", "g5.xlarge"],
        4,
        "the limit is 1",
    );
    assert_eq!(live(&ec2).await, 1);
    cloud.refused(&["start", &name], 4, "is not stopped");
    let done = cloud.json(&["terminate", &name]);
    assert_eq!(done["instance"]["state"], "terminated");
    wait_state(&ec2, &id, "terminated").await;

    // Set-up mistakes, each named with its fix.
    let unreachable = Cloud::new(&env, "refusals", "us-east-2", "");
    let config =
        std::fs::read_to_string(unreachable.home.path().join("config.toml")).expect("config");
    let without = |needle: &str| {
        config
            .lines()
            .filter(|l| !l.starts_with(needle))
            .collect::<Vec<_>>()
            .join("\n")
    };
    std::fs::write(
        unreachable.home.path().join("config.toml"),
        without("controller_endpoint"),
    )
    .expect("write");
    unreachable.refused(
        &["launch", "--provider", "ec2", "g5.xlarge"],
        2,
        "controller_endpoint",
    );
    drop(unreachable);

    let no_bucket = Cloud::new(&env, "refusals", "us-east-2", "");
    let config =
        std::fs::read_to_string(no_bucket.home.path().join("config.toml")).expect("config");
    std::fs::write(
        no_bucket.home.path().join("config.toml"),
        config.replace(
            &format!("s3://{}/{}artifacts", env.s3.bucket, no_bucket.prefix),
            "s3://runctl-no-such-bucket/x",
        ),
    )
    .expect("write");
    no_bucket.refused(
        &["launch", "--provider", "ec2", "--no-wait", "g5.xlarge"],
        3,
        "does not exist",
    );
    drop(no_bucket);

    let no_credentials = Cloud::new(&env, "refusals", "us-east-2", "");
    let out = no_credentials
        .home
        .cli()
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
        .env("AWS_CONFIG_FILE", "/nonexistent/config")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args(["launch", "--provider", "ec2", "--no-wait", "g5.xlarge"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("credentials"), "{}", stderr(&out));
    drop(no_credentials);

    assert_eq!(
        ec2.instances(&[])
            .await
            .expect("list")
            .iter()
            .filter(|i| i.state != "terminated")
            .count(),
        0,
        "nothing is left running"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_launch_is_tagged_locked_down_and_installs_the_agent() {
    let Some(env) = ec2_env("launch_tags") else {
        return;
    };
    let cloud = Cloud::new(&env, "launch-tags", "us-west-2", "");
    let ec2 = cloud.ec2().await;
    let (name, id) = cloud.launch(&[
        "--spot",
        "--volume-size",
        "20",
        "--name",
        "gpu-a",
        "g5.xlarge",
    ]);
    assert_eq!(name, "gpu-a");

    let out = ec2
        .client()
        .describe_instances()
        .instance_ids(&id)
        .send()
        .await
        .expect("describe");
    let instance = &out.reservations()[0].instances()[0];
    let tag =
        |key: &str| controller::provider::ec2::tag_value(instance.tags(), key).map(str::to_owned);
    assert_eq!(tag("runctl:managed").as_deref(), Some("true"));
    assert_eq!(tag("runctl:instance").as_deref(), Some("gpu-a"));
    assert_eq!(tag("Name").as_deref(), Some("runctl-gpu-a"));
    assert_eq!(
        instance
            .metadata_options()
            .and_then(|m| m.http_tokens())
            .map(|t| t.as_str()),
        Some("required"),
        "IMDSv2 only"
    );
    assert_eq!(
        instance.instance_lifecycle().map(|l| l.as_str()),
        Some("spot")
    );
    let group = instance.security_groups()[0]
        .group_id()
        .expect("group")
        .to_owned();
    let groups = ec2
        .client()
        .describe_security_groups()
        .group_ids(&group)
        .send()
        .await
        .expect("groups");
    assert_eq!(
        groups.security_groups()[0].group_name(),
        Some("runctl-agent")
    );
    assert!(
        groups.security_groups()[0].ip_permissions().is_empty(),
        "no inbound rule"
    );
    let shutdown = ec2
        .client()
        .describe_instance_attribute()
        .instance_id(&id)
        .attribute("instanceInitiatedShutdownBehavior".into())
        .send()
        .await
        .expect("attribute");
    assert_eq!(
        shutdown
            .instance_initiated_shutdown_behavior()
            .and_then(|v| v.value()),
        Some("terminate")
    );
    let devices: Vec<&str> = instance
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.device_name())
        .collect();
    assert!(
        devices.contains(&"/dev/sda1") && devices.contains(&"/dev/sdf"),
        "{devices:?}"
    );

    // The user-data: small, valid cloud-config, carrying the agent's hash and URL.
    let user_data = ec2.user_data(&id).await.expect("user-data");
    assert!(user_data.len() < 16 * 1024, "{} bytes", user_data.len());
    assert!(user_data.starts_with("#cloud-config\n"));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("user-data.yaml");
    std::fs::write(&file, &user_data).expect("write");
    let schema = Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(&file)
        .output()
        .expect("cloud-init schema (apt-get install cloud-init)");
    assert!(
        schema.status.success(),
        "cloud-init schema refused the user-data: {}{}",
        stdout(&schema),
        stderr(&schema)
    );
    let sha = Command::new("sha256sum")
        .arg(&env.agent)
        .output()
        .expect("sha256sum");
    let sha = stdout(&sha)
        .split_whitespace()
        .next()
        .expect("hash")
        .to_owned();
    assert!(
        user_data.contains(&sha),
        "the user-data names the agent's hash"
    );
    assert!(user_data.contains("X-Amz-Signature="), "a presigned URL");

    // Published once per hash: a second launch reuses it.
    let (second, second_id) = cloud.launch(&["g5.xlarge"]);
    let listing = cloud.run(&[
        "s3",
        "ls",
        "--recursive",
        &format!("s3://{}/{}artifacts/", env.s3.bucket, cloud.prefix),
    ]);
    let objects: Vec<String> = stdout(&listing).lines().map(str::to_owned).collect();
    assert_eq!(objects.len(), 1, "{objects:?} {}", stderr(&listing));
    assert!(
        objects[0].contains(&format!("agent/{sha}/runctl-agent")),
        "{objects:?}"
    );

    // list and status: types, prices, costs.
    let list = cloud.json(&["list"]);
    let rows = list["instances"].as_array().expect("instances");
    assert_eq!(rows.len(), 2);
    let on_demand = rows
        .iter()
        .find(|r| r["instance"]["name"] == second.as_str())
        .expect("second");
    assert_eq!(on_demand["cloud"]["instance_type"], "g5.xlarge");
    assert_eq!(on_demand["cloud"]["price_per_hour"], 1.006);
    assert!(on_demand["cost"].as_f64().is_some());
    let status = cloud.run(&["status"]);
    assert!(
        stdout(&status).starts_with("2 instances running ($1.01/h), 0 runs active"),
        "{}",
        stdout(&status)
    );

    for (name, id) in [(&name, &id), (&second, &second_id)] {
        cloud.json(&["terminate", name]);
        wait_state(&ec2, id, "terminated").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_start_and_terminate_follow_the_cloud() {
    let Some(env) = ec2_env("lifecycle") else {
        return;
    };
    let cloud = Cloud::new(&env, "lifecycle", "ap-southeast-2", "");
    cloud.enroll_timeout(5);
    let ec2 = cloud.ec2().await;
    let (name, id) = cloud.launch(&["g5.xlarge"]);
    let stopped = cloud.json(&["stop", &name]);
    assert_eq!(stopped["instance"]["state"], "stopped");
    wait_state(&ec2, &id, "stopped").await;
    // The enrollment watch of a --no-wait launch gives up on an instance the user stopped
    // rather than terminating it.
    let log = cloud.home.path().join("daemon.log");
    cloud.home.wait_until(
        "the enrollment watch to give up",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&log)
                .is_ok_and(|text| text.contains(&format!("{name} ({id}) was stopped meanwhile")))
        },
    );
    assert_eq!(state_of(&ec2, &id).await, "stopped");
    cloud.refused(&["stop", &name], 4, "already stopped");
    let started = cloud.json(&["start", &name]);
    assert_eq!(started["instance"]["state"], "launching");
    wait_state(&ec2, &id, "running").await;
    cloud.refused(&["start", &name], 4, "is not stopped");
    let done = cloud.json(&["terminate", &name]);
    assert_eq!(done["instance"]["state"], "terminated");
    assert!(done["cost"].as_f64().is_some(), "{done}");
    wait_state(&ec2, &id, "terminated").await;
    cloud.refused(&["terminate", &name], 4, "already terminated");

    let (spot, spot_id) = cloud.launch(&["--spot", "g5.xlarge"]);
    cloud.refused(&["stop", &spot], 4, "spot instance");
    cloud.refused(&["stop", "--force", &spot], 4, "spot instance");
    cloud.json(&["terminate", &spot]);
    wait_state(&ec2, &spot_id, "terminated").await;

    // A local instance has no power to cut: refused before its agent is touched.
    let local = cloud.json(&["launch", "--provider", "local"]);
    let local = local["instance"]["name"].as_str().expect("name").to_owned();
    cloud.refused(&["stop", "--force", &local], 4, "not a cloud instance");
    let list = cloud.json(&["list"]);
    let row = list["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|r| r["instance"]["name"] == local.as_str())
        .expect("listed");
    assert_eq!(row["connected"], true, "{row}");
    cloud.json(&["terminate", &local]);

    // An instance terminated behind runctl's back is seen as such.
    let (gone, gone_id) = cloud.launch(&["g5.xlarge"]);
    ec2.terminate(&gone_id).await.expect("terminate directly");
    let list = cloud.json(&["list"]);
    let row = list["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|r| r["instance"]["name"] == gone.as_str())
        .expect("listed");
    assert_eq!(row["instance"]["state"], "terminated");
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_are_guarded() {
    let Some(env) = ec2_env("volumes") else {
        return;
    };
    let cloud = Cloud::new(&env, "volumes", "eu-central-1", "");
    let ec2 = cloud.ec2().await;
    let (name, id) = cloud.launch(&["g5.xlarge"]);
    let created = cloud.json(&[
        "volume",
        "create",
        "--size",
        "10",
        "--instance",
        &name,
        "--persistent",
        "--name",
        "data",
    ]);
    let vol = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["guards"][0], "runctl:persistent");
    let zone = created["zone"].as_str().expect("zone").to_owned();
    let listed = cloud.json(&["volume", "list"]);
    assert!(
        listed
            .as_array()
            .expect("list")
            .iter()
            .any(|v| v["id"] == vol.as_str())
    );

    let attached = cloud.json(&["volume", "attach", &vol, &name]);
    assert_eq!(attached["attached_to"][0], id.as_str());
    cloud.refused(&["volume", "delete", &vol], 4, "attached");
    cloud.refused(&["volume", "delete", "--force", &vol], 4, "attached");
    cloud.json(&["volume", "detach", &vol]);
    cloud.refused(&["volume", "delete", &vol], 4, "runctl:persistent");
    let snapshot = cloud.json(&["volume", "snapshot", &vol]);
    let snap = snapshot["id"].as_str().expect("snapshot").to_owned();
    cloud.json(&["volume", "delete", "--force", &vol]);
    let restored = cloud.json(&["volume", "restore", &snap, "--instance", &name]);
    assert_eq!(restored["zone"], zone.as_str());
    let restored = restored["id"].as_str().expect("id").to_owned();
    cloud.json(&["volume", "delete", &restored]);

    cloud.refused(&["volume", "delete", "vol-xyz"], 2, "not a valid vol- id");
    cloud.refused(
        &["volume", "restore", "snap-1", "--zone", &zone],
        2,
        "not a valid snap- id",
    );
    cloud.refused(
        &["volume", "attach", &vol, &name, "--device", "/dev/sda1"],
        2,
        "device name",
    );
    cloud.refused(
        &["volume", "attach", "vol-0123456789abcdef0", "i-xyz"],
        3,
        "vol-0123456789abcdef0",
    );
    // A volume runctl did not make is left alone.
    let foreign = ec2
        .client()
        .create_volume()
        .availability_zone(&zone)
        .size(1)
        .send()
        .await
        .expect("create");
    let foreign = foreign.volume_id().expect("id");
    cloud.refused(
        &["volume", "delete", "--force", foreign],
        4,
        "not created by runctl",
    );
    cloud.json(&["terminate", &name]);
}

/// Boots the instance from its user-data in `sandbox` (tests/fixtures/simulate_boot.py).
fn simulate_boot(env: &Ec2Env, user_data: &Path, sandbox: &Path, attempts: &str) -> Child {
    let log = std::fs::File::create(sandbox.with_extension("log")).expect("log");
    Command::new(&env.python)
        .arg(fixture("simulate_boot.py"))
        .arg(user_data)
        .arg(sandbox)
        .envs(env.s3.envs())
        .env("RUNCTL_INSTALL_ATTEMPTS", attempts)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("simulate boot")
}

/// Starts `run --provider ec2 --instance-type g5.xlarge EXTRA -- python3 train.py` and
/// returns it with the instance it launched (running, its agent not yet installed) and
/// that instance's user-data.
async fn start_run(
    cloud: &Cloud,
    ec2: &Ec2,
    project: &Path,
    extra: &[&str],
) -> (Child, String, String) {
    std::fs::write(
        project.join("train.py"),
        "import os\nprint('hello from ec2', os.environ['RUNCTL_RUN_ID'])\n",
    )
    .expect("write");
    start_command(cloud, ec2, project, extra, &["python3", "train.py"]).await
}

/// As `start_run`, for `command` instead of train.py.
async fn start_command(
    cloud: &Cloud,
    ec2: &Ec2,
    project: &Path,
    extra: &[&str],
    command: &[&str],
) -> (Child, String, String) {
    let before: Vec<String> = ec2
        .instances(&[])
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.id)
        .collect();
    let run = cloud
        .cli()
        .args([
            "run",
            "--provider",
            "ec2",
            "--instance-type",
            "g5.xlarge",
            "--workdir",
        ])
        .arg(project)
        .args(extra)
        .arg("--")
        .args(command)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = Instant::now() + Duration::from_secs(90);
    let id = loop {
        let found = ec2.instances(&[]).await.expect("list");
        if let Some(i) = found
            .iter()
            .find(|i| i.state == "running" && !before.contains(&i.id))
        {
            break i.id.clone();
        }
        assert!(Instant::now() < deadline, "no instance was launched");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let user_data = ec2.user_data(&id).await.expect("user-data");
    (run, id, user_data)
}

/// Waits for the run to end; fails with the run's and the boot's output if it failed.
async fn finish_run(run: Child, root: &Path) -> Output {
    let output = tokio::task::spawn_blocking(move || run.wait_with_output())
        .await
        .expect("join")
        .expect("run output");
    let boot_log = std::fs::read_to_string(root.with_extension("log")).unwrap_or_default();
    assert!(
        output.status.success(),
        "run failed: {}\n--- boot log ---\n{boot_log}",
        stderr(&output)
    );
    assert!(
        stdout(&output).contains("hello from ec2 run-"),
        "{}",
        stdout(&output)
    );
    output
}

#[tokio::test(flavor = "multi_thread")]
async fn a_simulated_boot_installs_the_agent_which_runs_the_job() {
    let Some(env) = ec2_env("simulated_boot") else {
        return;
    };
    let cloud = Cloud::new(&env, "boot", "eu-west-1", "");
    let ec2 = cloud.ec2().await;
    let project = tempfile::tempdir().expect("project");
    let (run, id, user_data) = start_run(&cloud, &ec2, project.path(), &[]).await;
    let dir = tempfile::tempdir().expect("sandbox");
    let file = dir.path().join("user-data.yaml");
    std::fs::write(&file, &user_data).expect("write");

    // A binary that is not the one hashed is refused and never installed.
    let hash_at = user_data.find("sha256='").expect("hash") + "sha256='".len();
    let mut tampered = user_data.clone();
    tampered.replace_range(hash_at..hash_at + 64, &"0".repeat(64));
    let tampered_file = dir.path().join("tampered.yaml");
    std::fs::write(&tampered_file, tampered).expect("write");
    let bad_root = dir.path().join("tampered-root");
    let status = simulate_boot(&env, &tampered_file, &bad_root, "1")
        .wait()
        .expect("wait");
    assert!(!status.success(), "a wrong hash must fail the install");
    assert!(!bad_root.join("usr/local/bin/runctl-agent").exists());

    let root = dir.path().join("root");
    let agent = Reaped(simulate_boot(&env, &file, &root, "3"));
    let output = finish_run(run, &root).await;
    drop(agent);
    let phases = stderr(&output);
    for phase in ["requested", "running", "agent enrolled"] {
        assert!(phases.contains(phase), "no {phase:?} phase in: {phases}");
    }

    // What the install left: the agent (executable), its config (owner-only), the unit.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .expect(p)
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("usr/local/bin/runctl-agent"), 0o755);
    assert_eq!(mode("var/lib/runctl/agent.toml"), 0o600);
    assert!(
        root.join("etc/systemd/system/runctl-agent.service")
            .is_file()
    );
    let systemctl = std::fs::read_to_string(root.join("systemctl.log")).unwrap_or_default();
    assert!(
        systemctl.contains("enable --now runctl-agent.service"),
        "{systemctl}"
    );

    // The run's end terminated the instance launched for it.
    wait_state(&ec2, &id, "terminated").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn end_stop_stops_the_instance_through_the_api() {
    let Some(env) = ec2_env("end_stop") else {
        return;
    };
    let cloud = Cloud::new(&env, "end-stop", "ca-central-1", "");
    let ec2 = cloud.ec2().await;
    let project = tempfile::tempdir().expect("project");
    cloud.refused(
        &[
            "run",
            "--provider",
            "ec2",
            "--instance-type",
            "g5.xlarge",
            "--spot",
            "--end",
            "stop",
            "--",
            "true",
        ],
        2,
        "spot instance cannot be stopped",
    );
    let (run, id, user_data) = start_run(&cloud, &ec2, project.path(), &["--end", "stop"]).await;
    let dir = tempfile::tempdir().expect("sandbox");
    let file = dir.path().join("user-data.yaml");
    std::fs::write(&file, &user_data).expect("write");
    let root = dir.path().join("root");
    let agent = Reaped(simulate_boot(&env, &file, &root, "3"));
    finish_run(run, &root).await;
    // Not powered off from inside (that would terminate it): stopped through the API.
    wait_state(&ec2, &id, "stopped").await;
    drop(agent);
    let systemctl = std::fs::read_to_string(root.join("systemctl.log")).unwrap_or_default();
    assert!(!systemctl.contains("poweroff"), "{systemctl}");
    let list = cloud.json(&["list"]);
    assert_eq!(list["instances"][0]["instance"]["state"], "stopped");
    cloud.json(&[
        "terminate",
        list["instances"][0]["instance"]["name"]
            .as_str()
            .expect("name"),
    ]);
    wait_state(&ec2, &id, "terminated").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cost_cap_holds_while_the_daemon_is_away_and_the_checkpoint_is_in_the_store() {
    let Some(env) = ec2_env("budget") else {
        return;
    };
    // $360/h is 10 cents a second: a $5 cap is reached 50 s after the launch.
    let cloud = Cloud::new(
        &env,
        "budget",
        "eu-west-3",
        "[ec2.prices]\n\"g5.xlarge\" = 360.0\n",
    );
    let ec2 = cloud.ec2().await;
    // A type without a known price is refused before anything is made.
    cloud.refused(
        &[
            "run",
            "--provider",
            "ec2",
            "--instance-type",
            "m5.large",
            "--max-cost",
            "5",
            "--",
            "true",
        ],
        2,
        "--max-cost needs the instance's price per hour",
    );
    assert_eq!(live(&ec2).await, 0, "nothing launched");

    let project = tempfile::tempdir().expect("project");
    let trainer = fixture("ckpt_trainer.py").display().to_string();
    let (run, id, user_data) = start_command(
        &cloud,
        &ec2,
        project.path(),
        &["--max-cost", "5", "--detach"],
        &["python3", &trainer, "until-stopped"],
    )
    .await;
    let dir = tempfile::tempdir().expect("sandbox");
    let file = dir.path().join("user-data.yaml");
    std::fs::write(&file, &user_data).expect("write");
    let root = dir.path().join("root");
    let _agent = Reaped(simulate_boot(&env, &file, &root, "3"));
    let started = tokio::task::spawn_blocking(move || run.wait_with_output())
        .await
        .expect("join")
        .expect("run output");
    let boot_log = || std::fs::read_to_string(root.with_extension("log")).unwrap_or_default();
    assert!(
        started.status.success(),
        "{}\n--- boot log ---\n{}",
        stderr(&started),
        boot_log()
    );
    let run = stdout(&started).trim().to_owned();
    assert!(
        stderr(&started).contains("budget: stops at $5.00 ("),
        "{}",
        stderr(&started)
    );
    let list = cloud.json(&["list"]);
    let launched_ms = list["instances"][0]["instance"]["created_ms"]
        .as_u64()
        .expect("created_ms");
    let deadline = Instant::now() + Duration::from_secs(40);
    while !stdout(&cloud.run(&["logs", &run])).contains("training") {
        assert!(
            Instant::now() < deadline,
            "the trainer never started: {}",
            boot_log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let status = cloud.json(&["status"]);
    assert_eq!(status["budgets"][0]["run"], run.as_str(), "{status}");
    assert_eq!(
        status["budgets"][0]["budget"]["max_cost_micros"], 5_000_000,
        "{status}"
    );
    let text = stdout(&cloud.run(&["status"]));
    assert!(text.contains(" of $5.00 ("), "{text}");

    // The daemon goes away before the cap; the agent holds it.
    assert!(cloud.run(&["shutdown"]).status.success());
    let now = now_ms();
    tokio::time::sleep(Duration::from_millis(
        (launched_ms + 53_000).saturating_sub(now),
    ))
    .await;
    assert!(cloud.home.daemon_pid().is_none(), "no daemon at the cap");
    let back = now_ms();
    let follow = cloud.run(&["logs", "-f", &run]);
    assert_eq!(follow.status.code(), Some(1), "{}", stderr(&follow));
    assert!(
        stderr(&follow).contains("budget reached: the $5.00 cost cap ($5."),
        "{}",
        stderr(&follow)
    );
    let out = cloud.run(&["--output", "json", "logs", &run]);
    let notice = stdout(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["kind"]["notice"].get("budget_exceeded").is_some())
        .expect("a budget notice");
    let at = notice["at_ms"].as_u64().expect("at_ms");
    assert!(at < back, "the agent stopped the run on its own");
    assert!(at >= launched_ms + 50_000, "not before the cap");
    let runs = cloud.json(&["list"])["runs"].clone();
    assert_eq!(runs[0]["state"], "budget_exceeded", "{runs}");
    let listed = cloud.json(&["checkpoint", "list", &run]);
    assert_eq!(listed["latest"], "final.bin", "{listed}");
    // Its end action: the instance launched for it is terminated.
    wait_state(&ec2, &id, "terminated").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_gone_mid_launch_leaves_no_instance_behind() {
    let Some(env) = ec2_env("client_gone") else {
        return;
    };
    let cloud = Cloud::new(&env, "client-gone", "ap-northeast-1", "");
    let ec2 = cloud.ec2().await;
    let project = tempfile::tempdir().expect("project");
    let (mut run, id, user_data) = start_run(&cloud, &ec2, project.path(), &[]).await;
    // The laptop's side vanishes while the launch waits for the agent.
    run.kill().expect("kill the CLI");
    run.wait().expect("reap the CLI");
    let dir = tempfile::tempdir().expect("sandbox");
    let file = dir.path().join("user-data.yaml");
    std::fs::write(&file, &user_data).expect("write");
    let root = dir.path().join("root");
    let _agent = Reaped(simulate_boot(&env, &file, &root, "3"));
    // The launch and the run went on without it, and the run's end ended the instance.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let list = cloud.json(&["list"]);
        if list["runs"][0]["state"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "the run did not go on: {list}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_state(&ec2, &id, "terminated").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_whose_agent_never_enrolls_is_terminated() {
    let Some(env) = ec2_env("never_enrolls") else {
        return;
    };
    let cloud = Cloud::new(&env, "never-enrolls", "eu-north-1", "");
    cloud.enroll_timeout(5);
    let ec2 = cloud.ec2().await;
    // Waiting: the launch fails, says why, and ends the instance.
    let waiting = cloud
        .cli()
        .args([
            "launch",
            "--provider",
            "ec2",
            "--wait",
            "--name",
            "waits",
            "g5.xlarge",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("launch");
    // Not waiting: nobody watches, and the instance is still ended in time.
    let (name, id) = cloud.launch(&["g5.xlarge"]);
    let waited = tokio::task::spawn_blocking(move || waiting.wait_with_output())
        .await
        .expect("join")
        .expect("launch output");
    assert_eq!(waited.status.code(), Some(6), "{}", stderr(&waited));
    assert!(
        stderr(&waited).contains("did not enroll"),
        "{}",
        stderr(&waited)
    );
    assert!(
        stderr(&waited).contains("terminating i-"),
        "{}",
        stderr(&waited)
    );
    wait_state(&ec2, &id, "terminated").await;
    assert_eq!(live(&ec2).await, 0, "no instance is left running");
    let list = cloud.json(&["list"]);
    for row in list["instances"].as_array().expect("instances") {
        assert_eq!(row["instance"]["state"], "terminated", "{name}: {row}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_killed_mid_launch_leaves_no_instance_running_unwatched() {
    let Some(env) = ec2_env("killed_mid_launch") else {
        return;
    };
    let cloud = Cloud::new(&env, "killed-mid-launch", "eu-south-2", "");
    cloud.enroll_timeout(8);
    let ec2 = cloud.ec2().await;
    // One launch recorded its instance, then the daemon died while it waited for the
    // agent (which never comes); the other died between RunInstances and recording the id.
    let (_, watched) = cloud.launch(&["g5.xlarge"]);
    let (unrecorded_name, unrecorded) = cloud.launch(&["g5.xlarge"]);
    let pid = cloud.home.daemon_pid().expect("daemon pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill daemon");
    cloud
        .home
        .wait_until("the daemon to be gone", Duration::from_secs(10), || {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
        });
    let db = rusqlite::Connection::open(cloud.home.path().join("state.db")).expect("db");
    db.execute(
        "DELETE FROM cloud_instances WHERE name = ?1",
        [&unrecorded_name],
    )
    .expect("forget the id");
    drop(db);
    // The next command brings a daemon back: it finds the unrecorded one by its name tag
    // and ends it at once, and ends the other when its enrollment window closes.
    let list = cloud.json(&["list"]);
    assert_eq!(
        list["instances"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );
    wait_state(&ec2, &unrecorded, "terminated").await;
    wait_state(&ec2, &watched, "terminated").await;
    assert_eq!(live(&ec2).await, 0, "no instance is left running");
    let list = cloud.json(&["list", "--all"]);
    for row in list["instances"].as_array().expect("instances") {
        assert_eq!(row["instance"]["state"], "terminated", "{row}");
    }
}

/// `relay launch` against moto: refusals first (nothing launched), then a relay with the
/// relay's tags, IMDSv2, a public address and a group admitting its one port; runs never
/// see it; its user-data boots the static relay, which takes this daemon's registration;
/// a group someone widened is refused; `relay terminate` ends it.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_is_launched_apart_from_runs_boots_and_takes_the_registration() {
    let Some(env) = ec2_env("relay_launch") else {
        return;
    };
    let port = tests::free_daemon_port();
    let relay_config = format!(
        "[relay]\nbinary = \"{}\"\nport = {port}\n",
        env.relay.display()
    );
    let cloud = Cloud::new(&env, "relay", "ap-south-1", "");
    let config_path = cloud.home.path().join("config.toml");
    let text = std::fs::read_to_string(&config_path).expect("config");
    std::fs::write(&config_path, format!("{text}{relay_config}")).expect("write");
    let ec2 = cloud.ec2().await;

    // Refused before anything costs.
    cloud.refused(
        &[
            "relay",
            "launch",
            "--provider",
            "ec2",
            "--ami",
            "ami-0123456789abcdef0",
        ],
        3,
        "ami-0123456789abcdef0",
    );
    cloud.refused(
        &[
            "relay",
            "launch",
            "--provider",
            "ec2",
            "--instance-type",
            "a1.medium",
        ],
        2,
        "not an x86_64 type",
    );
    cloud.refused(&["relay", "launch"], 2, "--provider");
    assert!(ec2.relays().await.expect("relays").is_empty());

    let launched = cloud.json(&["relay", "launch", "--provider", "ec2", "--name", "relay-t1"]);
    let id = launched["id"].as_str().expect("id").to_owned();
    let address = launched["address"].as_str().expect("address").to_owned();
    assert!(address.ends_with(&format!(":{port}")), "{launched}");
    assert_eq!(launched["config_line"], format!("relay = \"{address}\""));
    assert_eq!(launched["serves_this_controller"], true);
    assert!(
        launched["monthly"]["total"].as_f64().expect("cost") > 7.0,
        "{launched}"
    );

    let out = ec2
        .client()
        .describe_instances()
        .instance_ids(&id)
        .send()
        .await
        .expect("describe");
    let instance = &out.reservations()[0].instances()[0];
    let tag =
        |key: &str| controller::provider::ec2::tag_value(instance.tags(), key).map(str::to_owned);
    let ca = tests::reach::ca(&cloud.home);
    assert_eq!(tag("runctl:role").as_deref(), Some("relay"));
    assert_eq!(tag("runctl:relay").as_deref(), Some("relay-t1"));
    assert_eq!(tag("runctl:ca"), Some(ca.clone()));
    assert_eq!(
        instance.instance_type().map(|t| t.as_str()),
        Some("t3.nano")
    );
    assert_eq!(
        instance
            .metadata_options()
            .and_then(|m| m.http_tokens())
            .map(|t| t.as_str()),
        Some("required")
    );
    assert!(instance.public_ip_address().is_some());
    let groups = ec2
        .client()
        .describe_security_groups()
        .filters(controller::provider::ec2::filter(
            "group-name",
            &[&format!("runctl-relay-{port}")],
        ))
        .send()
        .await
        .expect("groups");
    let group = &groups.security_groups()[0];
    let mut rules: Vec<(String, Option<i32>)> = group
        .ip_permissions()
        .iter()
        .map(|p| {
            (
                p.ip_protocol().unwrap_or_default().to_owned(),
                p.from_port(),
            )
        })
        .collect();
    rules.sort();
    assert_eq!(
        rules,
        [
            ("tcp".to_owned(), Some(port as i32)),
            ("udp".to_owned(), Some(port as i32))
        ]
    );

    // Runs never see it: not an instance of the controller's, not foreign, not terminable.
    assert!(ec2.instances(&[]).await.expect("instances").is_empty());
    let list = cloud.json(&["list"]);
    assert_eq!(list["foreign"], serde_json::json!([]), "{list}");
    cloud.refused(&["terminate", "relay-t1"], 3, "relay-t1");
    let relays = cloud.json(&["relay", "list"]);
    assert_eq!(relays.as_array().map(Vec::len), Some(1), "{relays}");
    assert_eq!(relays[0]["name"], "relay-t1");
    assert_eq!(relays[0]["configured"], false);

    // Its user-data installs the static relay by its presigned URL and starts it for this
    // CA; the daemon registers with it (on loopback here, not the moto address).
    let user_data = ec2.user_data(&id).await.expect("user-data");
    assert!(user_data.contains(&format!("RUNCTL_RELAY_CA_SHA256={ca}")));
    let dir = tempfile::tempdir().expect("sandbox");
    let file = dir.path().join("user-data.yaml");
    std::fs::write(
        &file,
        user_data.replace(
            "RUNCTL_RELAY_LISTEN=0.0.0.0:",
            "RUNCTL_RELAY_LISTEN=127.0.0.1:",
        ),
    )
    .expect("write");
    let root = dir.path().join("root");
    let _relay = Reaped(simulate_boot(&env, &file, &root, "3"));
    let text = std::fs::read_to_string(&config_path).expect("config");
    std::fs::write(
        &config_path,
        text.replace(
            "[daemon]\n",
            &format!("[daemon]\nrelay = \"127.0.0.1:{port}\"\n"),
        ),
    )
    .expect("write");
    assert!(cloud.run(&["shutdown"]).status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = cloud.json(&["status"]);
        if status["relay"]["registered"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon never registered with the booted relay: {status}\n{}",
            std::fs::read_to_string(root.with_extension("log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.join("usr/local/bin/runctl-relay"))
        .expect("installed")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);

    // A relay group someone widened is not reused.
    ec2.client()
        .authorize_security_group_ingress()
        .group_id(group.group_id().expect("group id"))
        .ip_protocol("tcp")
        .from_port(22)
        .to_port(22)
        .cidr_ip("0.0.0.0/0")
        .send()
        .await
        .expect("widen");
    cloud.refused(
        &["relay", "launch", "--provider", "ec2"],
        4,
        "not the relay's any more",
    );
    assert_eq!(ec2.relays().await.expect("relays").len(), 1);

    let ended = cloud.json(&["relay", "terminate", "relay-t1"]);
    assert_eq!(ended["id"], id.as_str());
    wait_state(&ec2, &id, "terminated").await;
    cloud.refused(&["relay", "terminate", "relay-t1"], 3, "no relay relay-t1");
}

#[test]
fn doctor_checks_credentials_the_instance_profile_the_agent_reach_and_the_clock() {
    let Some(env) = ec2_env("doctor_checks") else {
        return;
    };
    let profile = format!("runctl-doctor-{}", std::process::id());
    let cloud = Cloud::new(
        &env,
        "doctor_checks",
        "us-west-1",
        &format!("instance_profile = \"{profile}\"\n"),
    );
    let doctor = || {
        let out = cloud.run(&["--output", "json", "doctor"]);
        let checks: Vec<serde_json::Value> =
            serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
        (out.status.code(), checks)
    };
    let status_of = |checks: &[serde_json::Value], name: &str| {
        let check = checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {checks:?}"));
        (
            check["status"].as_str().expect("status").to_owned(),
            check.to_string(),
        )
    };

    let (code, checks) = doctor();
    assert_eq!(
        code,
        Some(1),
        "the missing instance profile fails it: {checks:?}"
    );
    for name in [
        "config",
        "daemon",
        "store",
        "local",
        "ec2 credentials",
        "clock",
        "ec2 agent",
        "ec2 reach",
    ] {
        let (status, check) = status_of(&checks, name);
        assert_eq!(status, "ok", "{check}");
    }
    assert!(
        status_of(&checks, "store")
            .1
            .contains("wrote, read and deleted a probe")
    );
    assert!(
        status_of(&checks, "ec2 credentials")
            .1
            .contains("account 123456789012")
    );
    let (status, check) = status_of(&checks, "ec2 instance profile");
    assert_eq!(status, "fail", "{check}");
    assert!(
        check.contains("NoSuchEntity") && check.contains("create-instance-profile"),
        "{check}"
    );
    // moto answers Service Quotas only for VPC: the quota cannot be read, said as a warning.
    assert_eq!(status_of(&checks, "ec2 gpu quota").0, "warn");

    // With the profile (and a role in it) created, every needed check passes.
    let made = Command::new(&env.python)
        .args([
            "-c",
            "import boto3, sys\n\
             iam = boto3.client('iam', endpoint_url=sys.argv[1], region_name='us-east-1')\n\
             iam.create_role(RoleName=sys.argv[2], AssumeRolePolicyDocument='{}')\n\
             iam.create_instance_profile(InstanceProfileName=sys.argv[2])\n\
             iam.add_role_to_instance_profile(InstanceProfileName=sys.argv[2], RoleName=sys.argv[2])\n",
            &env.endpoint,
            &profile,
        ])
        .envs(env.s3.envs())
        .output()
        .expect("boto3");
    assert!(made.status.success(), "{}", stderr(&made));
    let (code, checks) = doctor();
    let (status, check) = status_of(&checks, "ec2 instance profile");
    assert_eq!(status, "ok", "{check}");
    assert!(check.contains(&format!("role {profile}")), "{check}");
    assert_eq!(code, Some(0), "{checks:?}");

    // Human output: one line per check.
    let out = cloud.run(&["doctor"]);
    let text = stdout(&out);
    assert!(
        text.lines().any(|l| l.starts_with("ok")
            && l.contains("ec2 reach")
            && l.contains("directly at 127.0.0.1:")),
        "{text}"
    );
}

/// Starts `run --provider ec2 --nodes 2 EXTRA -- COMMAND` and returns it with the ids of
/// the two instances it launched (running, their agents not yet installed).
async fn start_gang(
    cloud: &Cloud,
    ec2: &Ec2,
    project: &Path,
    extra: &[&str],
    command: &[&str],
) -> (Child, Vec<String>) {
    let run = cloud
        .cli()
        .args([
            "run",
            "--provider",
            "ec2",
            "--instance-type",
            "g5.xlarge",
            "--nodes",
            "2",
            "--workdir",
        ])
        .arg(project)
        .args(extra)
        .arg("--")
        .args(command)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let mut run = run;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let running: Vec<String> = ec2
            .instances(&[])
            .await
            .expect("list")
            .into_iter()
            .filter(|i| i.state == "running")
            .map(|i| i.id)
            .collect();
        if running.len() == 2 {
            return (run, running);
        }
        if let Ok(Some(_)) = run.try_wait() {
            let out = run.wait_with_output().expect("output");
            panic!(
                "the run ended before its gang was launched: {}",
                stderr(&out)
            );
        }
        assert!(
            Instant::now() < deadline,
            "the gang's instances were not launched"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Boots instance `id` from its user-data in a sandbox under `dir`.
async fn boot(env: &Ec2Env, ec2: &Ec2, id: &str, dir: &Path) -> Reaped {
    let user_data = ec2.user_data(id).await.expect("user-data");
    let file = dir.join(format!("{id}.yaml"));
    std::fs::write(&file, user_data).expect("write");
    Reaped(simulate_boot(env, &file, &dir.join(id), "3"))
}

/// Whether the gang's placement group and security group still exist.
async fn gang_place_exists(ec2: &Ec2, name: &str) -> (bool, bool) {
    let groups = ec2
        .client()
        .describe_security_groups()
        .filters(controller::provider::ec2::filter("group-name", &[name]))
        .send()
        .await
        .expect("security groups");
    let placement = ec2
        .client()
        .describe_placement_groups()
        .send()
        .await
        .expect("placement groups");
    (
        placement
            .placement_groups()
            .iter()
            .any(|g| g.group_name() == Some(name)),
        !groups.security_groups().is_empty(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gang_shares_one_placement_group_and_zone_behind_a_members_only_group() {
    let Some(env) = ec2_env("ec2_gang") else {
        return;
    };
    let cloud = Cloud::new(
        &env,
        "gang",
        "sa-east-1",
        "[ec2.prices]\n\"g5.xlarge\" = 1.006\n",
    );
    let ec2 = cloud.ec2().await;
    let project = tempfile::tempdir().expect("project");
    let show = "echo node $NODE_RANK of $NNODES meets at $MASTER_ADDR:$MASTER_PORT";
    let (run, ids) = start_gang(
        &cloud,
        &ec2,
        project.path(),
        &["--launcher", "none"],
        &["sh", "-c", show],
    )
    .await;
    // One placement group, one zone, one security group of the gang's own.
    let described = ec2
        .client()
        .describe_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await
        .expect("describe");
    let instances: Vec<_> = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .collect();
    assert_eq!(instances.len(), 2);
    let places: Vec<(String, String)> = instances
        .iter()
        .map(|i| {
            let p = i.placement().expect("placement");
            (
                p.group_name().unwrap_or_default().to_owned(),
                p.availability_zone().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let gang = places[0].0.clone();
    assert!(gang.starts_with("runctl-gang-run-"), "{gang}");
    assert_eq!(places[0], places[1], "one placement group, one zone");
    let groups: Vec<Vec<String>> = instances
        .iter()
        .map(|i| {
            i.security_groups()
                .iter()
                .map(|g| g.group_id().unwrap_or_default().to_owned())
                .collect()
        })
        .collect();
    assert_eq!(groups[0], groups[1]);
    assert_eq!(groups[0].len(), 1, "{groups:?}");
    let sg = groups[0][0].clone();
    let rules = ec2
        .client()
        .describe_security_groups()
        .group_ids(&sg)
        .send()
        .await
        .expect("group");
    let rules = rules.security_groups()[0].ip_permissions();
    assert_eq!(rules.len(), 1, "one inbound rule: {rules:?}");
    assert_eq!(rules[0].ip_protocol(), Some("-1"), "every port");
    assert!(rules[0].ip_ranges().is_empty() && rules[0].ipv6_ranges().is_empty());
    let sources: Vec<_> = rules[0]
        .user_id_group_pairs()
        .iter()
        .map(|p| p.group_id().unwrap_or_default())
        .collect();
    assert_eq!(sources, [sg.as_str()], "its own members only");
    let dir = tempfile::tempdir().expect("sandbox");
    let mut agents = Vec::new();
    for id in &ids {
        agents.push(boot(&env, &ec2, id, dir.path()).await);
    }
    let output = tokio::task::spawn_blocking(move || run.wait_with_output())
        .await
        .expect("join")
        .expect("run output");
    drop(agents);
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("cost: 2 x $1.01/h = $2.01/h for the gang"),
        "{text}"
    );
    for node in 0..2 {
        assert!(text.contains(&format!("[node {node}] ready")), "{text}");
    }

    // Both nodes meet at node 0's private address.
    let list = cloud.json(&["list", "--all"]);
    assert_eq!(
        gang,
        format!(
            "runctl-gang-{}",
            list["runs"][0]["id"].as_str().expect("run")
        )
    );
    let node0 = list["nodes"][0][1][0].as_str().expect("node 0").to_owned();
    let ip0 = instances
        .iter()
        .find(|i| {
            controller::provider::ec2::tag_value(i.tags(), "runctl:instance")
                == Some(node0.as_str())
        })
        .and_then(|i| i.private_ip_address())
        .expect("node 0's private address")
        .to_owned();
    let out = stdout(&output);
    for node in 0..2 {
        assert!(
            out.contains(&format!(
                "[node {node}] node {node} of 2 meets at {ip0}:29500"
            )),
            "{out}"
        );
    }

    // The run's end took the instances, then the gang's place.
    for id in &ids {
        wait_state(&ec2, id, "terminated").await;
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    while gang_place_exists(&ec2, &gang).await != (false, false) {
        assert!(Instant::now() < deadline, "{gang} was not deleted");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gang_whose_node_never_comes_up_keeps_nothing() {
    let Some(env) = ec2_env("ec2_gang_none") else {
        return;
    };
    let cloud = Cloud::new(&env, "gang-none", "eu-west-2", "");
    cloud.enroll_timeout(8);
    let ec2 = cloud.ec2().await;
    let project = tempfile::tempdir().expect("project");
    let (run, ids) = start_gang(
        &cloud,
        &ec2,
        project.path(),
        &["--launcher", "none"],
        &["true"],
    )
    .await;
    // One node comes up; the other never does.
    let dir = tempfile::tempdir().expect("sandbox");
    let agent = boot(&env, &ec2, &ids[0], dir.path()).await;
    let output = tokio::task::spawn_blocking(move || run.wait_with_output())
        .await
        .expect("join")
        .expect("run output");
    drop(agent);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(6), "{text}");
    assert!(
        text.contains("of 2 could not be launched, so none is kept (1 made and terminated)"),
        "{text}"
    );
    for id in &ids {
        wait_state(&ec2, id, "terminated").await;
    }
    let list = cloud.json(&["list", "--all"]);
    assert_eq!(list["runs"].as_array().map(Vec::len), Some(0), "{list}");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let placement = ec2
            .client()
            .describe_placement_groups()
            .send()
            .await
            .expect("placement groups");
        let left: Vec<_> = placement
            .placement_groups()
            .iter()
            .filter_map(|g| g.group_name())
            .filter(|n| n.starts_with("runctl-gang-"))
            .map(str::to_owned)
            .collect();
        let mut gone = true;
        for name in &left {
            gone &= gang_place_exists(&ec2, name).await == (false, false);
        }
        if gone {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// --- managed spot: `run --spot --on-interrupt relaunch[:N]` ------------------------------

/// A trainer for the relaunch tests: `train.py TOTAL` runs steps to TOTAL (0.2 s each),
/// saving `step-NNN` after each; resumed, it carries on after the step it was given; on
/// SIGTERM (the spot signal) it saves where it is and exits.
const SPOT_TRAINER: &str = r#"
import os, signal, sys, time
ckpt = os.environ["RUNCTL_CHECKPOINT_DIR"]
total = int(sys.argv[1])
resume = os.environ.get("RUNCTL_RESUME_FROM")
step = int(open(resume).read()) + 1 if resume else 0
print(f"starts at step {step} ({'resumed from ' + os.path.basename(resume) if resume else 'fresh'})", flush=True)
def save(n):
    tmp = os.path.join(ckpt, f".step-{n:03}")
    with open(tmp, "w") as f:
        f.write(str(n))
    os.rename(tmp, os.path.join(ckpt, f"step-{n:03}"))
def interrupted(*_):
    print(f"interrupted at step {step}", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, interrupted)
while step < total:
    time.sleep(0.2)
    save(step)
    step += 1
print(f"done: {total} steps", flush=True)
"#;

const SPOT_NOTICE: &str = r#"{"action": "terminate", "time": "2026-12-07T17:00:00Z"}"#;

/// A home for managed-spot runs: agents poll `imds` for notices, the daemon watches every
/// second, g5.xlarge has a price.
fn spot_cloud(env: &Ec2Env, test: &str, region: &str, imds: &Imds) -> (Cloud, tempfile::TempDir) {
    let cloud = Cloud::new(
        env,
        test,
        region,
        &format!(
            "metadata_endpoint = \"http://127.0.0.1:{}\"\n[ec2.prices]\n\"g5.xlarge\" = 1.006\n",
            imds.port
        ),
    );
    let config = cloud.home.path().join("config.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace(
            "stop_grace_secs = 3\n",
            "stop_grace_secs = 3\nwatch_secs = 1\n",
        ),
    )
    .expect("write");
    let project = tempfile::tempdir().expect("project");
    std::fs::write(project.path().join("train.py"), SPOT_TRAINER).expect("write");
    (cloud, project)
}

/// The run, once it is listed and node 0 has pushed its first checkpoint.
async fn checkpointed_run(cloud: &Cloud) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let run_id = loop {
        let list = cloud.json(&["list", "--all"]);
        if let Some(id) = list["runs"][0]["id"].as_str() {
            break id.to_owned();
        }
        assert!(Instant::now() < deadline, "no run: {list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    while !cloud.json(&["checkpoint", "list", &run_id])["latest"].is_string() {
        assert!(Instant::now() < deadline, "no checkpoint was pushed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    run_id
}

/// The first running instance launched for `run` other than `not`, waited for.
async fn replacement(ec2: &Ec2, run: &str, not: &str) -> String {
    replacements(ec2, run, &[not.to_owned()], 1).await.remove(0)
}

/// Milliseconds from `noticed` to the first output line after the run started again.
fn notice_to_first_line(cloud: &Cloud, run_id: &str, noticed: u64) -> u64 {
    let events = tests::events_of(cloud.cli(), run_id);
    let first_line = events
        .iter()
        .skip_while(|e| e["kind"]["notice"].get("started_again").is_none())
        .find(|e| e["kind"].get("output").is_some())
        .expect("the replacement's first line");
    let at = first_line["at_ms"].as_u64().expect("at_ms");
    at.saturating_sub(noticed)
}

fn the_run(cloud: &Cloud) -> String {
    cloud.json(&["list", "--all"])["runs"][0]["id"]
        .as_str()
        .expect("a run")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spot_run_interrupted_is_relaunched_and_resumes_from_its_checkpoint() {
    let Some(env) = ec2_env("relaunch") else {
        return;
    };
    let imds = Imds::start();
    let (cloud, project) = spot_cloud(&env, "relaunch", "ap-northeast-2", &imds);
    let ec2 = cloud.ec2().await;
    let (run, first, _) = start_command(
        &cloud,
        &ec2,
        project.path(),
        &["--spot", "--on-interrupt", "relaunch:2"],
        &["python3", "train.py", "40"],
    )
    .await;
    let dir = tempfile::tempdir().expect("sandbox");
    let agent = boot(&env, &ec2, &first, dir.path()).await;
    let run_id = checkpointed_run(&cloud).await;

    // The notice: the trainer saves and goes, the daemon relaunches.
    imds.notice("instance-action.json", SPOT_NOTICE);
    let noticed = now_ms();
    let second = replacement(&ec2, &run_id, &first).await;
    wait_state(&ec2, &first, "terminated").await;
    drop(agent);
    imds.withdraw("instance-action.json");
    let agent = boot(&env, &ec2, &second, dir.path()).await;
    let output = tokio::task::spawn_blocking(move || run.wait_with_output())
        .await
        .expect("join")
        .expect("run output");
    drop(agent);
    let (out, err) = (stdout(&output), stderr(&output));
    assert!(output.status.success(), "{err}");
    assert!(out.contains("starts at step 0 (fresh)"), "{out}");
    assert!(out.contains("interrupted at step"), "{out}");
    let resumed = out
        .lines()
        .find(|l| l.contains("(resumed from step-"))
        .unwrap_or_else(|| panic!("no resumed start: {out}"));
    assert!(!resumed.starts_with("starts at step 0 "), "{resumed}");
    assert!(out.contains("done: 40 steps"), "{out}");
    assert!(
        err.contains("spot interruption notice: the instance will terminate"),
        "{err}"
    );
    assert!(
        err.contains("started again (attempt 2) after a spot interruption of ec2-")
            && err.contains("; relaunch 1 on ec2-")
            && err.contains("/h"),
        "{err}"
    );
    // One run, one log: the replacement's lines follow the first instance's.
    eprintln!(
        "relaunch: spot notice to the replacement's first output line: {} ms (the test boots the replacement once it is seen running)",
        notice_to_first_line(&cloud, &run_id, noticed)
    );
    let row = cloud.json(&["logs", &run_id]);
    assert_eq!(row["state"], "succeeded", "{row}");
    assert_eq!(the_run(&cloud), run_id, "still one run");
    wait_state(&ec2, &second, "terminated").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spot_run_interrupted_while_the_daemon_is_away_is_relaunched_when_it_is_back() {
    let Some(env) = ec2_env("relaunch_away") else {
        return;
    };
    let imds = Imds::start();
    let (cloud, project) = spot_cloud(&env, "relaunch-away", "us-east-1", &imds);
    let ec2 = cloud.ec2().await;
    let (run, first, _) = start_command(
        &cloud,
        &ec2,
        project.path(),
        &["--spot", "--on-interrupt", "relaunch:1", "--detach"],
        &["python3", "train.py", "100000"],
    )
    .await;
    let dir = tempfile::tempdir().expect("sandbox");
    let agent = boot(&env, &ec2, &first, dir.path()).await;
    let started = tokio::task::spawn_blocking(move || run.wait_with_output())
        .await
        .expect("join")
        .expect("run output");
    assert!(started.status.success(), "{}", stderr(&started));
    let run_id = checkpointed_run(&cloud).await;

    // The laptop sleeps; the instance is taken back meanwhile.
    let out = cloud.run(&["shutdown"]);
    assert!(out.status.success(), "{}", stderr(&out));
    imds.notice("instance-action.json", SPOT_NOTICE);
    tokio::time::sleep(Duration::from_secs(3)).await;
    ec2.terminate(&first).await.expect("reclaim");
    drop(agent);
    imds.withdraw("instance-action.json");

    // Back: the daemon finds the instance gone and relaunches.
    let out = cloud.run(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let second = replacement(&ec2, &run_id, &first).await;
    let agent = boot(&env, &ec2, &second, dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logs = cloud.run(&["logs", &run_id]);
        if stdout(&logs).contains("(resumed from step-") {
            let err = stderr(&logs);
            assert!(
                err.contains("started again (attempt 2) after ec2-")
                    && err.contains("was found gone at"),
                "{err}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replacement did not resume: {}{}\n--- daemon log ---\n{}",
            stdout(&logs),
            stderr(&logs),
            std::fs::read_to_string(cloud.home.path().join("daemon.log")).unwrap_or_default()
                + &std::fs::read_to_string(dir.path().join(format!("{second}.log")))
                    .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A second interruption is one more than relaunch:1 allows: the run ends saying so.
    imds.notice("instance-action.json", SPOT_NOTICE);
    let deadline = Instant::now() + Duration::from_secs(60);
    let row = loop {
        let row = cloud.json(&["logs", &run_id]);
        if row["state"] == "interrupted" {
            break row;
        }
        assert!(Instant::now() < deadline, "the run did not end: {row}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    drop(agent);
    assert!(
        row["error"].as_str().is_some_and(|e| e
            .contains("interrupted again after 1 relaunch (--on-interrupt relaunch:1 allows 1)")),
        "{row}"
    );
    assert_eq!(the_run(&cloud), run_id, "still one run");
    wait_state(&ec2, &second, "terminated").await;
}

/// The `count` running instances launched for `run` other than `not`, waited for.
async fn replacements(ec2: &Ec2, run: &str, not: &[String], count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let found = ec2
            .client()
            .describe_instances()
            .filters(controller::provider::ec2::filter("tag:runctl:run", &[run]))
            .filters(controller::provider::ec2::filter(
                "instance-state-name",
                &["running"],
            ))
            .send()
            .await
            .expect("describe");
        let ids: Vec<String> = found
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| i.instance_id())
            .filter(|id| !not.iter().any(|n| n == id))
            .map(str::to_owned)
            .collect();
        if ids.len() == count {
            return ids;
        }
        assert!(
            Instant::now() < deadline,
            "{count} replacements were not launched: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spot_gang_interrupted_is_relaunched_whole_and_resumes_from_node_0s_checkpoint() {
    let Some(env) = ec2_env("relaunch_gang") else {
        return;
    };
    let imds = Imds::start();
    let (cloud, project) = spot_cloud(&env, "relaunch-gang", "ap-southeast-3", &imds);
    let ec2 = cloud.ec2().await;
    let (run, first) = start_gang(
        &cloud,
        &ec2,
        project.path(),
        &[
            "--spot",
            "--on-interrupt",
            "relaunch:1",
            "--launcher",
            "none",
        ],
        &["python3", "train.py", "120"],
    )
    .await;
    let dir = tempfile::tempdir().expect("sandbox");
    let mut agents = Vec::new();
    for id in &first {
        agents.push(boot(&env, &ec2, id, dir.path()).await);
    }
    let run_id = checkpointed_run(&cloud).await;

    // The notice reaches both nodes (one metadata double): the gang ends interrupted and
    // is relaunched whole, on two new instances in a place of their own.
    imds.notice("instance-action.json", SPOT_NOTICE);
    let noticed = now_ms();
    let second = replacements(&ec2, &run_id, &first, 2).await;
    for id in &first {
        wait_state(&ec2, id, "terminated").await;
    }
    drop(agents);
    imds.withdraw("instance-action.json");
    let mut agents = Vec::new();
    for id in &second {
        agents.push(boot(&env, &ec2, id, dir.path()).await);
    }
    let output = tokio::task::spawn_blocking(move || run.wait_with_output())
        .await
        .expect("join")
        .expect("run output");
    drop(agents);
    let (out, err) = (stdout(&output), stderr(&output));
    assert!(output.status.success(), "{err}\n{out}");
    for node in 0..2 {
        assert!(
            out.contains(&format!("[node {node}] starts at step 0 (fresh)")),
            "{out}"
        );
        let resumed = out
            .lines()
            .find(|l| {
                l.starts_with(&format!("[node {node}] starts at step"))
                    && l.contains("(resumed from step-")
            })
            .unwrap_or_else(|| panic!("node {node} did not resume: {out}"));
        assert!(!resumed.contains("starts at step 0 "), "{resumed}");
        assert!(
            out.contains(&format!("[node {node}] done: 120 steps")),
            "{out}"
        );
    }
    assert!(
        err.contains("started again (attempt 2) after a spot interruption of ec2-")
            && err.contains("; relaunch 1 on ec2-")
            && err.contains(", 2 x $"),
        "{err}"
    );
    eprintln!(
        "gang relaunch: spot notice to the new gang's first output line: {} ms (the test boots the replacements once it sees both running)",
        notice_to_first_line(&cloud, &run_id, noticed)
    );
    let row = cloud.json(&["logs", &run_id]);
    assert_eq!(row["state"], "succeeded", "{row}");
    assert_eq!(the_run(&cloud), run_id, "still one run");
    // Both gangs' places are gone with their instances.
    for id in &second {
        wait_state(&ec2, id, "terminated").await;
    }
    for place in [
        format!("runctl-gang-{run_id}"),
        format!("runctl-gang-{run_id}-r1"),
    ] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while gang_place_exists(&ec2, &place).await != (false, false) {
            assert!(Instant::now() < deadline, "{place} was not deleted");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[test]
fn relaunch_is_refused_where_it_cannot_apply() {
    let Some(env) = ec2_env("relaunch_refused") else {
        return;
    };
    let cloud = Cloud::new(&env, "relaunch-refused", "us-east-2", "");
    let base = ["run", "--provider", "ec2", "--instance-type", "g5.xlarge"];
    let with = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "true"]);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    for (extra, needle) in [
        (vec!["--on-interrupt", "relaunch"], "is for spot instances"),
        (vec!["--spot", "--on-interrupt", "relaunch:0"], "at least 1"),
    ] {
        let args = with(&extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cloud.refused(&args, 2, needle);
    }
}

/// `launch --no-wait` of `types` (JSON output), and what it said.
fn launch_types(cloud: &Cloud, types: &str) -> (std::process::Output, String) {
    let out = cloud
        .cli()
        .args([
            "--output",
            "json",
            "launch",
            "--provider",
            "ec2",
            "--no-wait",
        ])
        .arg(types)
        .output()
        .expect("launch");
    let err = stderr(&out);
    (out, err)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zone_without_the_type_gives_way_to_one_with_it() {
    let Some(env) = ec2_env("zones") else {
        return;
    };
    // In ap-southeast-2 g5.xlarge is sold in zones b and c, not in a, where EC2 (moto)
    // puts an instance asked for without a zone: refused there (`Unsupported`, as EC2
    // says it), then launched in the next zone that has it.
    let cloud = Cloud::new(&env, "zones", "ap-southeast-2", "");
    let (out, err) = launch_types(&cloud, "g5.xlarge");
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("g5.xlarge in ap-southeast-2a: ") && err.contains("; trying ap-southeast-2b"),
        "{err}"
    );
    assert!(err.contains("in ap-southeast-2b (on-demand)"), "{err}");
    let view = tests::json_output(&out, &["launch"]);
    let name = view["instance"]["name"].as_str().expect("name").to_owned();
    cloud.json(&["terminate", &name]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_next_instance_type_is_tried_when_ec2_has_none_of_one() {
    let Some(env) = ec2_env("instance_types") else {
        return;
    };
    // il-central-1 sells g5.xlarge, and neither p5.48xlarge nor p4d.24xlarge.
    let cloud = Cloud::new(&env, "instance-types", "il-central-1", "");
    let (out, err) = launch_types(&cloud, "p5.48xlarge,p4d.24xlarge,g5.xlarge");
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(
            "p5.48xlarge: EC2 does not offer p5.48xlarge in il-central-1; trying p4d.24xlarge"
        ) && err.contains(
            "p4d.24xlarge: EC2 does not offer p4d.24xlarge in il-central-1; trying g5.xlarge"
        ),
        "{err}"
    );
    let view = tests::json_output(&out, &["launch"]);
    assert_eq!(view["cloud"]["instance_type"], "g5.xlarge", "{view}");
    let name = view["instance"]["name"].as_str().expect("name").to_owned();
    cloud.json(&["terminate", &name]);

    // None to be had: the last shortage is the answer, with the types tried.
    cloud.refused(
        &[
            "launch",
            "--provider",
            "ec2",
            "--no-wait",
            "p5.48xlarge,p4d.24xlarge",
        ],
        7,
        "none of p5.48xlarge, p4d.24xlarge could be launched; p4d.24xlarge: EC2 does not offer",
    );
    // A malformed type in the list is refused before anything is asked.
    cloud.refused(
        &["launch", "--provider", "ec2", "--no-wait", "g5.xlarge,x"],
        2,
        "x",
    );
    assert_eq!(live(&cloud.ec2().await).await, 0);
}
