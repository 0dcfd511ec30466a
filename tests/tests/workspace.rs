//! A kept instance as a warm workspace, end to end with a real local agent: a new run's
//! tree is seeded from what the instance holds (only changed content travels), each run
//! keeps its own tree, and the agent's store survives between runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::{Home, SmallDisk, snapshot, stderr};

fn write(root: &Path, rel: &str, content: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, content).expect("write");
}

/// A project of `n` small Python-like files in a few directories.
fn project(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..n {
        let body = format!(
            "# module {i}\nimport math\n\ndef f{i}(x):\n    return math.sqrt(x) * {i} + {}\n",
            i * 7919 % 104_729
        )
        .repeat(8);
        write(
            dir.path(),
            &format!("pkg{}/mod{i}.py", i % 10),
            body.as_bytes(),
        );
    }
    dir
}

fn run_dir(home: &Home, instance: &str, run: &str) -> PathBuf {
    home.path()
        .join("local")
        .join(instance)
        .join("state/runs")
        .join(run)
}

/// The `synced ...` line `run` prints, and the bytes on the wire it names.
fn sync_line(out: &std::process::Output) -> (String, f64) {
    let err = stderr(out);
    let line = err
        .lines()
        .find(|l| l.contains("synced ") && l.contains("on the wire"))
        .unwrap_or_else(|| panic!("no sync line in:\n{err}"))
        .to_owned();
    let wire = line
        .split(" on the wire")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .expect("a size");
    let (value, unit) = wire.split_once(' ').expect("value and unit");
    let value: f64 = value.parse().expect("a number");
    let scale = match unit {
        "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        other => panic!("unit {other}"),
    };
    (line, value * scale)
}

#[test]
fn a_second_run_sends_only_what_changed_and_gets_its_own_tree() {
    let home = Home::new();
    let project = project(400);
    let workdir = project.path().to_str().expect("utf8");
    // Run 1 edits a file of its own tree: run 2 must never see that.
    let first = home.run(&[
        "run",
        "--keep",
        "--workdir",
        workdir,
        "--",
        "sh",
        "-c",
        "echo edited-by-run-1 >> pkg0/mod0.py; echo one",
    ]);
    assert!(first.status.success(), "{}", stderr(&first));
    let (line1, wire1) = sync_line(&first);
    let listed = home.json(&["list"]);
    let instance = listed["instances"][0]["instance"]["name"]
        .as_str()
        .expect("instance")
        .to_owned();

    // Three files edited, one added, one deleted.
    let mut changed = Vec::new();
    for (i, rel) in ["pkg1/mod1.py", "pkg2/mod2.py", "pkg3/mod3.py"]
        .iter()
        .enumerate()
    {
        let body = format!("# edited {i}\nprint('changed {i}')\n").repeat(20);
        write(project.path(), rel, body.as_bytes());
        changed.push(body.into_bytes());
    }
    write(project.path(), "new.py", b"print('new')\n");
    changed.push(b"print('new')\n".to_vec());
    std::fs::remove_file(project.path().join("pkg4/mod4.py")).expect("delete");

    let second = home.run(&[
        "--output",
        "json",
        "run",
        "--on",
        &instance,
        "--workdir",
        workdir,
        "--",
        "true",
    ]);
    assert!(second.status.success(), "{}", stderr(&second));
    let (line2, wire2) = sync_line(&second);
    let zstd: usize = changed
        .iter()
        .map(|c| zstd::encode_all(&c[..], 3).expect("zstd").len())
        .sum();
    let bound = 2.0 * zstd as f64 + 4096.0;
    eprintln!("run 1: {line1}\nrun 2: {line2}\nbound {bound} (zstd of the changes {zstd})");
    assert!(line2.contains("already on the instance"), "{line2}");
    assert!(
        wire2 <= bound,
        "run 2 sent {wire2} bytes, over {bound}: {line2}"
    );
    assert!(wire2 * 5.0 < wire1, "run 1 {wire1}, run 2 {wire2}");

    // Run 2's tree is the project, byte for byte: not run 1's edit, not the deleted file.
    let out: serde_json::Value = serde_json::from_slice(
        second
            .stdout
            .split(|b| *b == b'\n')
            .rfind(|l| !l.is_empty())
            .expect("json"),
    )
    .expect("run json");
    let run2 = out["id"].as_str().expect("id");
    let tree2 = run_dir(&home, &instance, run2).join("work");
    assert_eq!(snapshot(&tree2, &[]), snapshot(project.path(), &[]));
    // Run 2's files are its own, not links into the store or run 1's tree.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(tree2.join("pkg5/mod5.py")).expect("meta");
    assert_eq!(meta.nlink(), 1);
    let _ = home.run(&["terminate", &instance]);
}

/// Builds a one-module wheel (`NAME-0.1-py3-none-any.whl`) in `dir`, with Python.
fn wheel(dir: &Path, name: &str, value: u32) -> String {
    let file = format!("{name}-0.1-py3-none-any.whl");
    let script = format!(
        r#"
import base64, hashlib, zipfile
files = {{
    "{name}/__init__.py": "VALUE = {value}\n",
    "{name}-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
    "{name}-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: runctl-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}}
record = []
with zipfile.ZipFile("{file}", "w") as z:
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{{path}},sha256={{digest}},{{len(data)}}")
        z.writestr(path, data)
    record.append("{name}-0.1.dist-info/RECORD,,")
    z.writestr("{name}-0.1.dist-info/RECORD", "\n".join(record) + "\n")
"#
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .current_dir(dir)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    file
}

/// A project whose requirements.txt installs `tinypkg` (VALUE = 7) from a wheel beside it,
/// with `show` as show.py; the wheel's file name.
fn tinypkg_project(show: &[u8]) -> (tempfile::TempDir, String) {
    let project = tempfile::tempdir().expect("tempdir");
    let wheel = wheel(project.path(), "tinypkg", 7);
    write(
        project.path(),
        "requirements.txt",
        format!("./{wheel}\n").as_bytes(),
    );
    write(project.path(), "show.py", show);
    (project, wheel)
}

#[test]
fn an_environment_is_reused_on_the_same_key_and_never_changed_by_a_run() {
    let home = Home::new();
    let (project, wheel) = tinypkg_project(
        b"import tinypkg, sys\nprint('value', tinypkg.VALUE)\ntry:\n    import extra_mod\n    print('extra seen')\nexcept ImportError:\n    print('no extra')\n",
    );
    // Writes a module into the run's environment, as an install inside the run would.
    write(
        project.path(),
        "install.py",
        b"import sysconfig, pathlib\npathlib.Path(sysconfig.get_paths()['purelib'], 'extra_mod.py').write_text('X = 1\\n')\nprint('installed')\n",
    );
    let workdir = project.path().to_str().expect("utf8");
    let run = |on: Option<&str>, argv: &[&str]| {
        let mut args = vec!["run", "--workdir", workdir];
        match on {
            Some(instance) => args.extend(["--on", instance]),
            None => args.push("--keep"),
        }
        args.push("--");
        args.extend(argv);
        let out = home.run(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        (stderr(&out), tests::stdout(&out))
    };

    let (err1, out1) = run(None, &["python3", "show.py"]);
    assert!(err1.contains("setup: "), "run 1 sets up: {err1}");
    assert!(out1.contains("value 7"), "{out1}");
    let listed = home.json(&["list"]);
    let instance = listed["instances"][0]["instance"]["name"]
        .as_str()
        .expect("instance")
        .to_owned();

    // Same key: reused, no setup step, and an install inside this run stays in it.
    let (err2, out2) = run(
        Some(&instance),
        &["sh", "-c", "python3 install.py && python3 show.py"],
    );
    assert!(
        err2.contains("runctl: environment reused (built "),
        "{err2}"
    );
    assert!(!err2.contains("setup: "), "{err2}");
    assert!(
        out2.contains("installed") && out2.contains("extra seen"),
        "{out2}"
    );

    let (err3, out3) = run(Some(&instance), &["python3", "show.py"]);
    assert!(err3.contains("runctl: environment reused"), "{err3}");
    assert!(
        out3.contains("value 7") && out3.contains("no extra"),
        "run 2's install leaked: {out3}"
    );

    // A changed requirements.txt is a new key: set up afresh.
    let wheel2 = self::wheel(project.path(), "tinypkg2", 9);
    write(
        project.path(),
        "requirements.txt",
        format!("./{wheel}\n./{wheel2}\n").as_bytes(),
    );
    let (err4, out4) = run(Some(&instance), &["python3", "show.py"]);
    assert!(err4.contains("setup: "), "{err4}");
    assert!(!err4.contains("environment reused"), "{err4}");
    assert!(out4.contains("value 7"), "{out4}");
    let _ = home.run(&["terminate", &instance]);
}

/// Saves three checkpoints, each closed after writing (so each is pushed), then ends.
const SAVES_THREE: &str = "import os, time\nd = os.environ['RUNCTL_CHECKPOINT_DIR']\nfor i in range(3):\n    with open(os.path.join(d, f'step-{i}.pt'), 'wb') as f:\n        f.write(os.urandom(200_000))\n    time.sleep(0.05)\nprint('saved')\n";

/// A first run that keeps its (new) instance; returns the instance.
fn kept_run(home: &Home, workdir: &str, argv: &[&str]) -> String {
    let mut args = vec!["run", "--keep", "--workdir", workdir, "--"];
    args.extend(argv);
    let out = home.run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    instance_of(home)
}

fn instance_of(home: &Home) -> String {
    home.json(&["list"])["instances"][0]["instance"]["name"]
        .as_str()
        .expect("instance")
        .to_owned()
}

fn runs_of(home: &Home) -> Vec<String> {
    let mut runs: Vec<(u64, String)> = home.json(&["list"])["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| {
            (
                r["created_ms"].as_u64().expect("created"),
                r["id"].as_str().expect("id").to_owned(),
            )
        })
        .collect();
    runs.sort();
    runs.into_iter().map(|(_, id)| id).collect()
}

#[test]
fn pruning_keeps_the_newest_runs_and_the_newest_checkpoint_and_survives_a_crash() {
    let home = Home::with_config("[agent]\nkeep_runs = 1\nkeep_local_checkpoints = 1\n");
    let project = tempfile::tempdir().expect("tempdir");
    write(project.path(), "save.py", SAVES_THREE.as_bytes());
    write(
        project.path(),
        "lib/data.py",
        b"X = 1\n".repeat(100).as_slice(),
    );
    let workdir = project.path().to_str().expect("utf8");
    let instance = kept_run(&home, workdir, &["python3", "save.py"]);
    for _ in 0..2 {
        let out = home.run(&[
            "run",
            "--on",
            &instance,
            "--workdir",
            workdir,
            "--",
            "python3",
            "save.py",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let runs = runs_of(&home);
    assert_eq!(runs.len(), 3);
    let dir = |run: &str| run_dir(&home, &instance, run);
    let pruned = |run: &str| !dir(run).join("work").exists();
    home.wait_until(
        "the two older runs pruned",
        std::time::Duration::from_secs(20),
        || pruned(&runs[0]) && pruned(&runs[1]),
    );
    let checkpoints = |run: &str| {
        let mut names: Vec<String> = std::fs::read_dir(dir(run).join("checkpoints"))
            .expect("checkpoint dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    home.wait_until(
        "stored checkpoints but the newest deleted",
        std::time::Duration::from_secs(20),
        || runs.iter().all(|r| checkpoints(r) == ["step-2.pt"]),
    );
    // The newest run is whole. The older runs' logs are gone from the instance once the
    // controller said it stored them (the newest keeps its own), and every run's log is
    // still there to read, from the controller.
    assert!(dir(&runs[2]).join("work/save.py").is_file());
    home.wait_until(
        "the older runs' logs deleted from the instance",
        std::time::Duration::from_secs(20),
        || !dir(&runs[0]).join("log").exists() && !dir(&runs[1]).join("log").exists(),
    );
    assert!(dir(&runs[2]).join("log").exists());
    assert!(dir(&runs[0]).join("log-stored").exists());
    for run in &runs {
        let out = home.run(&["logs", run]);
        assert!(tests::stdout(&out).contains("saved"), "{}", stderr(&out));
    }
    // The disk use is reported.
    let listed = home.json(&["list"]);
    let disk = &listed["instances"][0]["disk"];
    assert!(
        disk["checkpoints_bytes"].as_u64().expect("reported") >= 3 * 200_000,
        "{disk}"
    );
    assert_eq!(disk["ended_runs"].as_u64(), Some(3), "{disk}");

    // An agent killed mid-prune leaves trash and half-written files; its next start
    // clears them, and a new run is seeded and runs as usual.
    home.kill_agent();
    // The daemon must see the old connection gone, or the next run could pick it.
    home.wait_until(
        "the killed agent's connection gone",
        std::time::Duration::from_secs(45),
        || home.json(&["list"])["instances"][0]["connected"] == false,
    );
    let run2 = dir(&runs[2]);
    std::fs::create_dir_all(run2.join(".trash-work-0badc0de/sub")).expect("trash");
    std::fs::write(run2.join(".trash-work-0badc0de/sub/f.py"), b"half deleted").expect("trash");
    std::fs::create_dir_all(run2.join("checkpoints/.trash-step-1.pt-0badc0de")).expect("trash");
    let state = home.path().join("local").join(&instance).join("state");
    std::fs::write(state.join("store/tmp/half-written"), b"x").expect("store tmp");
    std::fs::create_dir_all(state.join("envs/.new-abc-0badc0de/venv")).expect("half env");
    std::fs::write(state.join("store/trees/run-000000000000.tree"), b"torn").expect("torn record");
    let mut agent = home.restart_agent(&instance);
    home.wait_until("the agent back", std::time::Duration::from_secs(20), || {
        home.json(&["list"])["instances"][0]["connected"] == true
    });
    let out = home.run(&[
        "run",
        "--on",
        &instance,
        "--workdir",
        workdir,
        "--",
        "python3",
        "-c",
        "print('after')",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already on the instance"),
        "{}",
        stderr(&out)
    );
    assert!(!run2.join(".trash-work-0badc0de").exists());
    assert!(!run2.join("checkpoints/.trash-step-1.pt-0badc0de").exists());
    assert!(!state.join("store/tmp/half-written").exists());
    assert!(!state.join("envs/.new-abc-0badc0de").exists());
    assert!(!state.join("store/trees/run-000000000000.tree").exists());
    let _ = home.run(&["terminate", &instance]);
    let _ = agent.wait();
}

#[test]
fn a_disk_too_full_to_start_a_run_refuses_it_and_says_what_takes_the_space() {
    let home = Home::with_config("[agent]\nmin_free = \"24MiB\"\n");
    let local = home.path().join("local");
    let Some(_disk) = SmallDisk::mount("disk too full for a run", &local, "64m") else {
        return;
    };
    let project = tempfile::tempdir().expect("tempdir");
    write(
        project.path(),
        "fill.py",
        b"import os\nwith open(os.path.join(os.environ['RUNCTL_DATA_DIR'], 'dataset.bin'), 'wb') as f:\n    f.write(b'\\0' * (48 << 20))\nprint('filled')\n",
    );
    let workdir = project.path().to_str().expect("utf8");
    let instance = kept_run(&home, workdir, &["python3", "fill.py"]);
    let second = home.run(&["run", "--on", &instance, "--workdir", workdir, "--", "true"]);
    let err = stderr(&second);
    assert!(!second.status.success(), "{err}");
    for needed in [
        "free on",
        "min_free",
        "data (never pruned) 48.0 MiB",
        "To free space",
    ] {
        assert!(err.contains(needed), "{needed:?} missing from: {err}");
    }
    // The refusal cost nothing: the first run's tree and data are there.
    let runs = runs_of(&home);
    assert!(
        run_dir(&home, &instance, &runs[0])
            .join("work/fill.py")
            .is_file()
    );
    assert!(
        local
            .join(&instance)
            .join("state/data/dataset.bin")
            .is_file()
    );
    let _ = home.run(&["terminate", &instance]);
}

#[test]
fn a_disk_filling_during_a_sync_fails_it_clearly_and_leaves_every_tree_whole() {
    let home = Home::with_config("[agent]\nmin_free = \"1MiB\"\n");
    let local = home.path().join("local");
    let Some(_disk) = SmallDisk::mount("disk full during a sync", &local, "48m") else {
        return;
    };
    let project = project(50);
    let workdir = project.path().to_str().expect("utf8");
    let instance = kept_run(&home, workdir, &["true"]);
    let first = runs_of(&home)[0].clone();
    let first_tree = run_dir(&home, &instance, &first).join("work");
    let before = snapshot(&first_tree, &[]);
    let free_before = free_bytes(&local);
    // 64 MB that does not compress: more than the instance's disk holds.
    write(project.path(), "weights.bin", &tests::noise(64 << 20, 1));
    let out = home.run(&["run", "--on", &instance, "--workdir", workdir, "--", "true"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("No space left"),
        "the user is told the disk is full: {err}"
    );
    // The first run's tree is as it was, and what the failed sync wrote is gone.
    assert_eq!(snapshot(&first_tree, &[]), before);
    let free_after = free_bytes(&local);
    assert!(
        free_after + (1 << 20) >= free_before,
        "the failed sync left {} bytes behind",
        free_before.saturating_sub(free_after)
    );
    // With the file gone again, the next run syncs and runs.
    std::fs::remove_file(project.path().join("weights.bin")).expect("rm");
    let out = home.run(&["run", "--on", &instance, "--workdir", workdir, "--", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = home.run(&["terminate", &instance]);
}

fn free_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).expect("statvfs");
    st.blocks_available() as u64 * st.fragment_size() as u64
}

#[test]
fn an_agent_killed_mid_setup_saves_no_half_built_environment_and_the_next_run_sets_up_afresh() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let bin = scratch.path().join("bin");
    let waiting = scratch.path().join("uv-waiting");
    let real_uv = which("uv");
    let Some(real_uv) = real_uv else {
        eprintln!("SKIPPED agent killed mid-setup: no uv in PATH (scripts/test.sh installs it)");
        return;
    };
    // A uv that hangs (as a big install does) until the test has killed the agent.
    write(
        &bin,
        "uv",
        format!(
            "#!/bin/sh\ntouch {waiting}\nwhile [ ! -e {go} ]; do sleep 0.1; done\nexec {real} \"$@\"\n",
            waiting = waiting.display(),
            go = scratch.path().join("go").display(),
            real = real_uv.display()
        )
        .as_bytes(),
    );
    std::fs::set_permissions(
        bin.join("uv"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let home = Home::new();
    // The daemon (and so the local agent it starts) finds that uv first.
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let started = home
        .cli()
        .env("PATH", &path)
        .arg("status")
        .output()
        .expect("status");
    assert!(started.status.success(), "{}", stderr(&started));
    let (project, _) = tinypkg_project(b"import tinypkg\nprint('value', tinypkg.VALUE)\n");
    let workdir = project.path().to_str().expect("utf8");
    let mut first = home
        .cli()
        .args([
            "run",
            "--keep",
            "--workdir",
            workdir,
            "--",
            "python3",
            "show.py",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run");
    home.wait_until("setup to be under way", Duration::from_secs(60), || {
        waiting.exists()
    });
    let instance = instance_of(&home);
    let run = runs_of(&home)[0].clone();
    home.kill_agent();
    let _ = first.kill();
    let _ = first.wait();
    // The hung setup step dies too, as on EC2 systemd (KillMode=mixed) ends what is left
    // in the agent's cgroup before it starts the agent again.
    tests::kill_processes_with_arg(&scratch.path().display().to_string());
    let mut agent = home.restart_agent(&instance);
    home.wait_until("the run to end as lost", Duration::from_secs(30), || {
        home.json(&["logs", &run])
            .get("state")
            .is_some_and(|s| s == "failed")
    });
    // Nothing half-built was kept for later runs to reuse.
    let envs = home.path().join("local").join(&instance).join("state/envs");
    let kept: Vec<_> = std::fs::read_dir(&envs)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(kept.is_empty(), "{kept:?}");
    // The next run sets up afresh and runs; the one after reuses what it built.
    std::fs::write(scratch.path().join("go"), b"").expect("go");
    let run_on = |expect_reuse: bool| {
        let out = home.run(&[
            "run",
            "--on",
            &instance,
            "--workdir",
            workdir,
            "--",
            "python3",
            "show.py",
        ]);
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        assert!(tests::stdout(&out).contains("value 7"));
        assert_eq!(err.contains("environment reused"), expect_reuse, "{err}");
        assert_eq!(err.contains("setup: "), !expect_reuse, "{err}");
    };
    run_on(false);
    run_on(true);
    let _ = home.run(&["terminate", &instance]);
    let _ = agent.kill();
    let _ = agent.wait();
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .ok()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}
