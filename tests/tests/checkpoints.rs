//! Data and checkpoints end to end, against the real S3 server (SeaweedFS on loopback,
//! started by `scripts/test.sh`): checkpoints saved by direct write, by rename and as a
//! directory arrive intact with `LATEST` right; one still being written is not uploaded
//! early; retention; an agent restarted with an unuploaded checkpoint uploads it;
//! `--resume-from`; a data pull that skips what is present; and the bad cases (no
//! credentials, a wrong key, a missing bucket) as the user sees them.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tests::s3::{Fault, FaultProxy, S3Env};
use tests::{Home, SmallDisk, stderr, stdout};

const TRAINER: &str = "tests/fixtures/ckpt_trainer.py";

/// What the trainer fixture writes for `name`: the name and a dash, repeated.
fn content(name: &str, size: usize) -> Vec<u8> {
    let unit = format!("{name}-").into_bytes();
    unit.iter().copied().cycle().take(size).collect()
}

/// A home whose runs push checkpoints to a fresh prefix of the test bucket via `endpoint`.
fn s3_home(env: &S3Env, endpoint: &str, test: &str) -> (Home, String) {
    let prefix = S3Env::unique_prefix(test);
    let base = format!("s3://{}/{}", env.bucket, prefix.trim_end_matches('/'));
    let home = Home::with_config(&format!(
        "{}checkpoints = \"{base}\"\n",
        env.config_toml(endpoint)
    ));
    (home, base)
}

fn run_ok(home: &Home, args: &[&str]) -> (String, String) {
    let out = home.run(args);
    let (o, e) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{args:?}\n{o}\n{e}");
    (o, e)
}

fn run_id(stderr_text: &str) -> String {
    stderr_text
        .split_whitespace()
        .find(|w| w.starts_with("run-"))
        .expect("the run id is reported")
        .to_owned()
}

fn checkpoint_names(home: &Home, run: &str) -> (Vec<String>, Option<String>) {
    home.checkpoint_names(run)
}

fn download(home: &Home, run: &str, name: &str, to: &Path) {
    run_ok(
        home,
        &[
            "checkpoint",
            "download",
            run,
            name,
            "--to",
            &to.display().to_string(),
        ],
    );
}

#[test]
fn checkpoints_saved_by_write_by_rename_and_as_a_directory_arrive_intact() {
    let Some(env) = S3Env::get("checkpoint kinds") else {
        return;
    };
    let (home, _) = s3_home(&env, &env.endpoint, "kinds");
    let (_, err) = run_ok(&home, &["run", "--", "python3", TRAINER, "kinds"]);
    let run = run_id(&err);
    for name in ["direct.bin", "renamed.bin", "step-3"] {
        assert!(
            err.contains(&format!("runctl: checkpoint {name} saved to s3://")),
            "{name}: {err}"
        );
    }
    let (names, latest) = checkpoint_names(&home, &run);
    assert_eq!(names, ["direct.bin", "renamed.bin", "step-3"]);
    assert_eq!(
        latest.as_deref(),
        Some("step-3"),
        "the newest save is LATEST"
    );
    let out = tempfile::tempdir().expect("tempdir");
    for name in ["direct.bin", "renamed.bin", "step-3"] {
        download(&home, &run, name, out.path());
    }
    assert_eq!(
        std::fs::read(out.path().join("direct.bin")).expect("read"),
        content("direct.bin", 3_000_000)
    );
    assert_eq!(
        std::fs::read(out.path().join("renamed.bin")).expect("read"),
        content("renamed.bin", 2_000_000)
    );
    for i in 0..3 {
        assert_eq!(
            std::fs::read(out.path().join(format!("step-3/shards/{i}.bin"))).expect("read"),
            content(&format!("shard{i}"), 100_000 * (i + 1))
        );
    }
    // The temporary name of the renamed one never reached the store.
    let ls = home.json(&["s3", "ls", "--recursive", &format!("s3://{}/", env.bucket)]);
    assert!(!ls.to_string().contains("renamed.bin.tmp"), "{ls}");
    // And a later run resumes from the newest: the directory.
    let (o, _) = run_ok(
        &home,
        &[
            "run",
            "--resume-from",
            &run,
            "--",
            "python3",
            "-c",
            "import os; p=os.environ['RUNCTL_RESUME_FROM']; print(os.path.basename(p), sorted(os.listdir(os.path.join(p, 'shards'))))",
        ],
    );
    assert_eq!(o.trim(), "step-3 ['0.bin', '1.bin', '2.bin']");
}

#[test]
fn a_checkpoint_still_being_written_is_not_uploaded_early() {
    let Some(env) = S3Env::get("checkpoint being written") else {
        return;
    };
    let (home, base) = s3_home(&env, &env.endpoint, "slow");
    let row = home.json(&["run", "--detach", "--", "python3", TRAINER, "slow"]);
    let run = row["id"].as_str().expect("id").to_owned();
    home.wait_until("half-written", Duration::from_secs(30), || {
        stdout(&home.run(&["logs", &run])).contains("half-written")
    });
    // The file is open and half written for 4 s: nothing of it may be in the store.
    std::thread::sleep(Duration::from_secs(2));
    let prefix = format!("{base}/{run}/");
    let ls = home.json(&["s3", "ls", "--recursive", &prefix]);
    assert_eq!(ls["objects"].as_array().map(Vec::len), Some(0), "{ls}");
    home.wait_until("the run to end", Duration::from_secs(30), || {
        home.json(&["logs", &run])
            .get("state")
            .is_some_and(|s| s == "succeeded")
    });
    let (names, latest) = checkpoint_names(&home, &run);
    assert_eq!(names, ["slow.bin"]);
    assert_eq!(latest.as_deref(), Some("slow.bin"));
    let info = home.json(&["checkpoint", "info", &run]);
    assert_eq!(
        info["bytes"], 2_000_000,
        "the whole file, once closed: {info}"
    );
}

#[test]
fn retention_keeps_the_newest_n() {
    let Some(env) = S3Env::get("retention") else {
        return;
    };
    let (home, _) = s3_home(&env, &env.endpoint, "keep");
    let (_, err) = run_ok(
        &home,
        &[
            "run",
            "--keep-checkpoints",
            "2",
            "--",
            "python3",
            TRAINER,
            "many",
        ],
    );
    let run = run_id(&err);
    let (names, latest) = checkpoint_names(&home, &run);
    assert_eq!(names, ["ckpt-3.bin", "ckpt-4.bin"], "{err}");
    assert_eq!(latest.as_deref(), Some("ckpt-4.bin"));
    assert!(err.contains("checkpoint ckpt-0.bin deleted from"), "{err}");
    // The pruned objects are gone, not just unlisted.
    let ls = home.json(&["s3", "ls", "--recursive", &format!("s3://{}/", env.bucket)]);
    assert!(
        !ls.to_string().contains(&format!("{run}/ckpt-0.bin")),
        "{ls}"
    );
    // Pruning by hand never deletes the latest.
    let pruned = home.json(&["checkpoint", "prune", "--keep", "0", &run]);
    assert_eq!(
        pruned["deleted"],
        serde_json::json!(["ckpt-3.bin"]),
        "{pruned}"
    );
    assert_eq!(checkpoint_names(&home, &run).0, ["ckpt-4.bin"]);
}

#[test]
fn an_agent_restarted_with_an_unuploaded_checkpoint_uploads_it() {
    let Some(env) = S3Env::get("agent restart with a pending checkpoint") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let proxy = rt.block_on(FaultProxy::start(&env.endpoint));
    let (home, _) = s3_home(&env, &proxy.endpoint(), "restart");
    let scratch = tempfile::tempdir().expect("tempdir");
    let go = scratch.path().join("go");
    let row = home.json(&[
        "run",
        "--detach",
        "--env",
        &format!("GO_FILE={}", go.display()),
        "--",
        "python3",
        TRAINER,
        "hold",
    ]);
    let run = row["id"].as_str().expect("id").to_owned();
    let instance = row["instance"].as_str().expect("instance").to_owned();
    home.wait_until("ready", Duration::from_secs(30), || {
        stdout(&home.run(&["logs", &run])).contains("ready")
    });
    // The store stops answering; the trainer saves; the upload hangs; the agent dies.
    proxy.set(Fault::Blackhole);
    std::fs::write(&go, b"").expect("go");
    home.wait_until("saved", Duration::from_secs(30), || {
        stdout(&home.run(&["logs", &run])).contains("saved")
    });
    std::thread::sleep(Duration::from_millis(500));
    home.kill_agent();
    proxy.set(Fault::Pass);
    assert!(
        checkpoint_names(&home, &run).0.is_empty(),
        "nothing reached the store"
    );
    let mut agent = home.restart_agent(&instance);
    home.wait_until(
        "the checkpoint to be uploaded",
        Duration::from_secs(60),
        || checkpoint_names(&home, &run).0 == ["held.bin"],
    );
    let out = tempfile::tempdir().expect("tempdir");
    download(&home, &run, "held.bin", out.path());
    assert_eq!(
        std::fs::read(out.path().join("held.bin")).expect("read"),
        content("held.bin", 6_000_000)
    );
    home.wait_until("the run to end as lost", Duration::from_secs(30), || {
        home.json(&["logs", &run])
            .get("state")
            .is_some_and(|s| s == "failed")
    });
    let logs = stderr(&home.run(&["logs", &run]));
    assert!(logs.contains("checkpoint held.bin saved to"), "{logs}");
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn data_is_pulled_before_the_trainer_and_skipped_when_present() {
    let Some(env) = S3Env::get("data pull") else {
        return;
    };
    let (home, _) = s3_home(&env, &env.endpoint, "data");
    let src = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(src.path().join("sub")).expect("mkdir");
    std::fs::write(src.path().join("a.bin"), content("a", 30 << 20)).expect("write");
    std::fs::write(src.path().join("sub/b.txt"), b"bee").expect("write");
    let prefix = format!("s3://{}/{}", env.bucket, S3Env::unique_prefix("dataset"));
    let up = home.json(&[
        "s3",
        "cp",
        "--recursive",
        &src.path().display().to_string(),
        &prefix,
    ]);
    assert_eq!(up["files"], 2, "{up}");
    let data = format!("{prefix}=ds");
    let launched = home.json(&["launch", "--name", "data-box"]);
    assert_eq!(launched["connected"], true, "{launched}");
    let args = [
        "run", "--on", "data-box", "--data", &data, "--", "python3", TRAINER, "data",
    ];
    let (o, e) = run_ok(&home, &args);
    assert_eq!(
        o,
        format!("data ds/a.bin {}\ndata ds/sub/b.txt 3\n", 30 << 20),
        "{e}"
    );
    assert!(
        e.contains("runctl: pulling data [") && e.contains("2/2 files"),
        "{e}"
    );
    // The same agent pulls again: both files are present and identical, nothing moves.
    let (o2, e2) = run_ok(&home, &args);
    assert_eq!(o, o2);
    assert!(e2.contains("2 already present"), "{e2}");
    // Alongside: the process starts before the pull has finished.
    let data2 = format!("{prefix}=ds2");
    let out = home.run(&[
        "--output", "json", "run", "--on", "data-box", "--pull-alongside", "--data", &data2,
        "--", "python3", "-c",
        "import os, time\nd = os.path.join(os.environ['RUNCTL_DATA_DIR'], 'ds2')\nprint('started', flush=True)\n\
while not all(os.path.exists(os.path.join(d, p)) for p in ('a.bin', 'sub/b.txt')): time.sleep(0.01)\n\
time.sleep(1)",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let kinds: Vec<Value> = stdout(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("kind").cloned())
        .collect();
    let started = kinds.iter().position(|k| k.get("started").is_some());
    let pulled = kinds
        .iter()
        .position(|k| k["pull"]["done"] == true)
        .expect("the pull finished and said so");
    assert!(started.expect("started") < pulled, "{kinds:?}");
    // A missing source fails the run with the reason, before the trainer starts.
    let out = home.run(&[
        "run",
        "--data",
        &format!("s3://{}/no/such/prefix/x.bin", "runctl-missing-bucket"),
        "--",
        "python3",
        "-c",
        "print('must not run')",
    ]);
    let (o3, e3) = (stdout(&out), stderr(&out));
    assert_ne!(out.status.code(), Some(0));
    assert!(!o3.contains("must not run"), "{o3}");
    assert!(
        e3.contains("runctl-missing-bucket") && e3.contains("does not exist"),
        "{e3}"
    );
}

#[test]
fn bad_credentials_and_a_missing_bucket_are_explained() {
    let Some(env) = S3Env::get("bad credentials") else {
        return;
    };
    let home = Home::with_config(&env.config_toml(&env.endpoint));
    let bucket = format!("s3://{}/", env.bucket);
    // No credentials anywhere.
    let out = home
        .cli()
        .args(["s3", "ls", &bucket])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no credentials"), "{}", stderr(&out));
    // A wrong secret.
    let out = home
        .cli()
        .args(["s3", "ls", &bucket])
        .env("AWS_SECRET_ACCESS_KEY", "wrong")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("access denied"), "{}", stderr(&out));
    // A bucket that does not exist.
    let out = home.run(&["s3", "ls", "s3://runctl-missing-bucket/"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    // Nothing to resume from.
    let out = home.run(&["run", "--resume-from", "run-000000000000", "--", "true"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("pushed no checkpoints"),
        "{}",
        stderr(&out)
    );
    // And as JSON for scripts.
    let json: Value = home.json(&["s3", "ls", "s3://runctl-missing-bucket/"]);
    assert_eq!(json["error"]["code"], "not_found", "{json}");
}

#[test]
fn a_checkpoint_cut_short_by_a_full_disk_is_held_back_and_latest_stays_whole() {
    let Some(env) = S3Env::get("checkpoint on a full disk") else {
        return;
    };
    let (home, _) = s3_home(&env, &env.endpoint, "full-disk");
    std::fs::write(
        home.path().join("config.toml"),
        format!(
            "{}[agent]\nmin_free = \"1MiB\"\n",
            std::fs::read_to_string(home.path().join("config.toml")).expect("config")
        ),
    )
    .expect("config");
    // The instance's whole disk (its agent state, runs and checkpoints) is 48 MiB.
    let Some(_disk) = SmallDisk::mount(
        "checkpoint on a full disk",
        &home.path().join("local"),
        "48m",
    ) else {
        return;
    };
    let out = home.run(&["run", "--keep", "--", "python3", TRAINER, "fill-disk"]);
    let err = stderr(&out);
    assert_ne!(
        out.status.code(),
        Some(0),
        "the trainer died of ENOSPC\n{err}"
    );
    let run = run_id(&err);
    let instance = err
        .split_whitespace()
        .find(|w| w.starts_with("local-"))
        .expect("the instance is named");
    // The good checkpoint is in the store and is LATEST; the torn one never reached it.
    let (names, latest) = checkpoint_names(&home, &run);
    assert_eq!(names, ["step-1.bin"], "{err}");
    assert_eq!(latest.as_deref(), Some("step-1.bin"));
    assert!(
        err.contains("checkpoint step-2.bin not uploaded")
            && err.contains("disk")
            && err.contains("cut short"),
        "the user is told why: {err}"
    );
    assert!(
        err.contains("No space left"),
        "the trainer's own error: {err}"
    );
    // On the instance, the torn file is kept aside, under a name nothing resumes from.
    let dir = home
        .path()
        .join("local")
        .join(instance)
        .join("state/runs")
        .join(&run)
        .join("checkpoints");
    assert!(dir.join("step-2.bin.incomplete").is_file());
    assert!(!dir.join("step-2.bin").exists());
    let _ = home.run(&["terminate", instance]);
}

#[test]
fn an_agent_killed_mid_pull_presents_nothing_partial_and_the_next_pull_resumes() {
    let Some(env) = S3Env::get("agent killed mid-pull") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let proxy = rt.block_on(FaultProxy::start(&env.endpoint));
    let (home, _) = s3_home(&env, &proxy.endpoint(), "killed-mid-pull");
    let src = tempfile::tempdir().expect("tempdir");
    // Ten parts of 32 MiB: the agent fetches eight at a time.
    const SIZE: usize = 320 << 20;
    std::fs::write(src.path().join("a.bin"), content("a", SIZE)).expect("write");
    let prefix = format!("s3://{}/{}", env.bucket, S3Env::unique_prefix("pulled"));
    run_ok(
        &home,
        &[
            "s3",
            "cp",
            "--recursive",
            &src.path().display().to_string(),
            &prefix,
        ],
    );
    let launched = home.json(&["launch", "--name", "pull-box"]);
    assert_eq!(launched["connected"], true, "{launched}");
    // A slow link (64 MB/s): the agent dies once the first eight parts are in, most of
    // the way into the pull.
    proxy.set(Fault::ThrottleDown(64_000_000));
    let data = format!("{prefix}=ds");
    let mut attached = home
        .cli()
        .args(["run", "--on", "pull-box", "--data", &data, "--"])
        .args(["python3", TRAINER, "data"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run");
    home.wait_until("most of the pull", Duration::from_secs(60), || {
        proxy.sent_down() > (SIZE as u64) * 85 / 100
    });
    home.kill_agent();
    let run = home.json(&["list"])["runs"][0]["id"]
        .as_str()
        .expect("run id")
        .to_owned();
    let data_dir = home.path().join("local/pull-box/state/data/ds");
    assert!(
        !data_dir.join("a.bin").exists(),
        "nothing partial under the real name"
    );
    // The agent comes back (as systemd would start it): the run is over, and says why.
    proxy.set(Fault::Pass);
    let mut agent = home.restart_agent("pull-box");
    home.wait_until("the run to end", Duration::from_secs(30), || {
        home.json(&["logs", &run])
            .get("state")
            .is_some_and(|s| s == "failed")
    });
    let _ = attached.kill();
    let _ = attached.wait();
    let logs = stderr(&home.run(&["logs", &run]));
    assert!(logs.contains("agent"), "the run's end says why: {logs}");
    // The next pull takes up where the first stopped: what arrived is not fetched again.
    let (o, e) = run_ok(
        &home,
        &[
            "run", "--on", "pull-box", "--data", &data, "--", "python3", TRAINER, "data",
        ],
    );
    assert_eq!(o, format!("data ds/a.bin {SIZE}\n"), "{e}");
    let fetched = proxy.sent_down();
    eprintln!("the pull after the restart fetched {fetched} of {SIZE} bytes");
    assert!(
        fetched <= (SIZE as u64) / 4,
        "the second pull fetched {fetched} of {SIZE} bytes"
    );
    assert_eq!(
        std::fs::read(data_dir.join("a.bin")).expect("read"),
        content("a", SIZE)
    );
    let _ = home.run(&["terminate", "pull-box"]);
    let _ = agent.kill();
    let _ = agent.wait();
}
