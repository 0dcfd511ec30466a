//! `run --launcher`, end to end on the local provider: a real DDP job under torchrun (gloo on
//! CPU, PyTorch from PyPI in test.sh's tools venv) whose all-reduce is checked, the
//! environment `--launcher none` gives, a missing torchrun told as such, and the refusals.

use std::process::Output;

use tests::{Home, fixture, stderr, stdout};

/// The directory holding `torchrun` and a `python3` that imports torch, or `None` (SKIPPED)
/// when there is none and none is required.
fn torch_bin(test: &str) -> Option<String> {
    match std::env::var("RUNCTL_TEST_TORCH_BIN") {
        Ok(dir) if std::path::Path::new(&dir).join("torchrun").is_file() => Some(dir),
        _ => {
            assert!(
                std::env::var_os("RUNCTL_REQUIRE_TORCH").is_none(),
                "{test}: RUNCTL_TEST_TORCH_BIN must hold torchrun"
            );
            eprintln!("SKIPPED {test}: no torch (run scripts/test.sh, which installs it)");
            None
        }
    }
}

/// The DDP trainer run under torchrun with `flags`, with `dir` (torch's) first in the
/// daemon's (and so the local agent's) `PATH`.
fn run_ddp(home: &Home, dir: &str, flags: &[&str]) -> Output {
    let path = format!("{dir}:{}", std::env::var("PATH").unwrap_or_default());
    let trainer = fixture("ddp_trainer.py").display().to_string();
    let mut args = vec!["run", "--setup", "none", "--launcher", "torchrun"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "python3", &trainer]);
    home.cli()
        .env("PATH", path)
        .args(&args)
        .output()
        .expect("run runctl-controller")
}

/// The lines of stdout holding `needle`, sorted (ranks and nodes interleave).
fn lines_with(out: &Output, needle: &str) -> Vec<String> {
    let mut lines: Vec<String> = stdout(out)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

#[test]
fn a_ddp_job_runs_under_torchrun_with_two_processes_and_its_all_reduce_is_right() {
    let test = "a_ddp_job_runs_under_torchrun_with_two_processes_and_its_all_reduce_is_right";
    let Some(bin) = torch_bin(test) else { return };
    let home = Home::new();
    let out = run_ddp(&home, &bin, &["--nproc-per-node", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("launcher: torchrun, 1 node x 2 processes"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        lines_with(&out, "rank "),
        [
            "rank 0/2 local 0 node 0 replicas equal all-reduce 3 expected 3",
            "rank 1/2 local 1 node 0 replicas equal all-reduce 3 expected 3",
        ],
        "{}",
        stdout(&out)
    );
}

#[test]
fn without_a_launcher_the_command_gets_the_environment_of_its_one_process() {
    let home = Home::new();
    let show = "echo $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $NODE_RANK $NNODES \
                $NPROC_PER_NODE $RUNCTL_NODE_RANK $MASTER_ADDR; echo port=$MASTER_PORT";
    let out = home.run(&["run", "--launcher", "none", "--", "sh", "-c", show]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("0 1 0 1 0 1 1 0 127.0.0.1"), "{text}");
    let port: u16 = lines
        .next()
        .and_then(|l| l.strip_prefix("port="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MASTER_PORT in {text}"));
    assert_ne!(port, 0);

    // And a run with no --launcher gets none of it.
    let out = home.run(&["run", "--", "sh", "-c", "echo [$RANK$MASTER_ADDR$NNODES]"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "[]\n");
}

#[test]
fn a_run_under_torchrun_where_torch_is_not_installed_fails_saying_what_to_install() {
    let home = Home::new();
    // The system PATH only: test.sh keeps the tools venv (and its torchrun) off it.
    let out = home.run(&["run", "--launcher", "torchrun", "--", "python3", "-c", "1"]);
    // 127, as a shell says a command it cannot find.
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("could not start \"torchrun\"")
            && text.contains("install torch in the run's environment")
            && text.contains("--launcher none"),
        "{text}"
    );
}

#[test]
fn bad_launches_are_refused_before_anything_runs() {
    let home = Home::new();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--nproc-per-node", "2"],
            "--nproc-per-node 2 is torchrun's",
        ),
        (
            &["--launcher", "none", "--nproc-per-node", "2"],
            "with --launcher none each node runs one process",
        ),
        (
            &["--launcher", "torchrun", "--nproc-per-node", "0"],
            "a node runs 1 to 256 processes",
        ),
        (&["--launcher", "mpirun"], "invalid value 'mpirun'"),
    ];
    for (flags, want) in cases {
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--", "true"]);
        let out = home.run(&args);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{flags:?}: {}", stderr(&out));
    }
    let list = home.json(&["list"]);
    assert_eq!(list["runs"].as_array().map(Vec::len), Some(0), "{list}");
}

#[test]
fn under_torchrun_a_node_runs_a_process_per_gpu_by_default() {
    let test = "under_torchrun_a_node_runs_a_process_per_gpu_by_default";
    let Some(bin) = torch_bin(test) else { return };
    // The nvidia-smi double reports one GPU.
    let home = Home::with_config(&format!(
        "[local.agent]\nnvidia_smi = \"{}\"\n",
        fixture("nvidia-smi").display()
    ));
    let out = run_ddp(&home, &bin, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        lines_with(&out, "rank "),
        ["rank 0/1 local 0 node 0 replicas equal all-reduce 1 expected 1"],
        "{}",
        stdout(&out)
    );
}

// --- gangs: `run --nodes N` on N local instances ------------------------------------------

#[test]
fn a_two_node_ddp_job_meets_at_node_0_and_its_all_reduce_is_right() {
    let test = "a_two_node_ddp_job_meets_at_node_0_and_its_all_reduce_is_right";
    let Some(bin) = torch_bin(test) else { return };
    let home = Home::new();
    let path = format!("{bin}:{}", std::env::var("PATH").unwrap_or_default());
    let trainer = fixture("ddp_trainer.py").display().to_string();
    // torchrun by default: the command is python3 and there are two nodes.
    let out = home
        .cli()
        .env("PATH", path)
        .args([
            "run",
            "--setup",
            "none",
            "--nodes",
            "2",
            "--nproc-per-node",
            "1",
            "--",
            "python3",
            &trainer,
        ])
        .output()
        .expect("run runctl-controller");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("launching 2 local instances together, one per node")
            && text.contains("nodes: 0 on local-")
            && text.contains("launcher: torchrun, 2 nodes x 1 process"),
        "{text}"
    );
    assert_eq!(
        lines_with(&out, "] rank "),
        [
            "[node 0] rank 0/2 local 0 node 0 replicas equal all-reduce 3 expected 3",
            "[node 1] rank 1/2 local 0 node 1 replicas equal all-reduce 3 expected 3",
        ],
        "{}",
        stdout(&out)
    );
    // One run, two instances, both launched for it and gone with it.
    let list = home.json(&["list"]);
    let runs = list["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1, "{list}");
    let nodes = list["nodes"][0][1].as_array().expect("the run's nodes");
    assert_eq!(nodes.len(), 2, "{list}");
    assert_eq!(
        runs[0]["instance"], nodes[0],
        "node 0's is the run's instance"
    );
    home.wait_until(
        "both nodes terminated",
        std::time::Duration::from_secs(30),
        || {
            let list = home.json(&["list"]);
            list["instances"].as_array().is_some_and(|i| {
                i.len() == 2 && i.iter().all(|i| i["instance"]["state"] == "terminated")
            })
        },
    );
}

/// Kills (SIGKILL) the agent of the first run's node 1; its instance and the agent's pid.
fn kill_node1_agent(home: &Home) -> (String, i64) {
    let list = home.json(&["list"]);
    let node1 = list["nodes"][0][1][1].as_str().expect("node 1").to_owned();
    let pid = list["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|i| i["instance"]["name"] == node1.as_str())
        .and_then(|i| i["instance"]["pid"].as_i64())
        .expect("node 1's agent pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill node 1's agent");
    (node1, pid)
}

/// The run's id from `run --detach`'s JSON.
fn detached(home: &Home, args: &[&str]) -> String {
    let run = home.json(args);
    run["id"].as_str().expect("a run id").to_owned()
}

#[test]
fn every_node_gets_its_rank_and_one_master_and_logs_tell_the_nodes_apart() {
    let home = Home::new();
    let show = "echo $RANK $WORLD_SIZE $LOCAL_RANK $NODE_RANK $NNODES $RUNCTL_NODE_RANK $MASTER_ADDR $MASTER_PORT";
    let out = home.run(&["run", "--nodes", "2", "--", "sh", "-c", show]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("launcher: no launcher, 2 nodes x 1 process"),
        "{}",
        stderr(&out)
    );
    let lines = lines_with(&out, "[node ");
    assert_eq!(lines.len(), 2, "{lines:?}");
    let port = lines[0].rsplit(' ').next().expect("a port").to_owned();
    assert!(port.parse::<u16>().is_ok_and(|p| p != 0), "{lines:?}");
    assert_eq!(
        lines,
        [
            format!("[node 0] 0 2 0 0 2 0 127.0.0.1 {port}"),
            format!("[node 1] 1 2 0 1 2 1 127.0.0.1 {port}"),
        ],
        "one MASTER_ADDR and MASTER_PORT for both"
    );

    // `logs` merges the nodes, `--node` keeps one, a node that is not there is refused.
    let run = detached(
        &home,
        &[
            "run",
            "--detach",
            "--nodes",
            "2",
            "--",
            "sh",
            "-c",
            "echo hello from $NODE_RANK",
        ],
    );
    home.wait_until("the run ended", std::time::Duration::from_secs(60), || {
        home.json(&["logs", &run])["state"] == "succeeded"
    });
    let all = home.run(&["logs", &run]);
    assert_eq!(
        lines_with(&all, "hello"),
        ["[node 0] hello from 0", "[node 1] hello from 1"],
        "{}",
        stdout(&all)
    );
    let one = home.run(&["logs", &run, "--node", "1"]);
    assert_eq!(stdout(&one), "[node 1] hello from 1\n", "{}", stderr(&one));
    let none = home.run(&["logs", &run, "--node", "2"]);
    assert_eq!(none.status.code(), Some(2), "{}", stderr(&none));
    assert!(
        stderr(&none).contains("has no node 2: its nodes are 0 to 1"),
        "{}",
        stderr(&none)
    );
    let json = home.run(&["--output", "json", "logs", &run, "--node", "0"]);
    let first: serde_json::Value = serde_json::from_str(
        stdout(&json)
            .lines()
            .find(|l| l.contains("hello"))
            .expect("a line"),
    )
    .expect("JSON");
    assert_eq!(first["node"], 0, "{first}");
}

#[test]
fn a_node_that_fails_stops_the_others_and_the_run_fails_naming_it() {
    let home = Home::new();
    // Node 1 fails after a moment; node 0 would run for ten minutes.
    let script = "if [ \"$NODE_RANK\" = 1 ]; then sleep 1; echo giving up; exit 3; fi; \
                  echo waiting; exec sleep 600";
    let started = std::time::Instant::now();
    let out = home.run(&[
        "run",
        "--nodes",
        "2",
        "--stop-grace",
        "2",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "node 0 was stopped, not waited for"
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("[node 1] ended: the process exited with 3"),
        "{text}"
    );
    assert!(
        text.contains("[node 0] ended: the process was killed by signal 15"),
        "{text}"
    );
    let runs = home.json(&["list"]);
    let run = runs["runs"][0]["id"].as_str().expect("a run").to_owned();
    let status = home.json(&["logs", &run]);
    assert_eq!(status["state"], "failed", "{status}");
    assert_eq!(
        status["error"], "node 1: the process exited with 3",
        "{status}"
    );
}

#[test]
fn bad_gangs_are_refused_before_anything_is_launched() {
    let home = Home::new();
    let cases: &[(&[&str], &str, i32)] = &[
        (&["--nodes", "0"], "a run has at least one node", 2),
        (&["--nodes", "65"], "a run has at most 64 nodes", 2),
        (
            &["--nodes", "2", "--on", "local-000000"],
            "cannot be used with",
            2,
        ),
        (
            &[
                "--nodes",
                "2",
                "--launcher",
                "none",
                "--nproc-per-node",
                "2",
            ],
            "with --launcher none each node runs one process",
            2,
        ),
    ];
    for (flags, want, code) in cases {
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--", "true"]);
        let out = home.run(&args);
        assert_eq!(
            out.status.code(),
            Some(*code),
            "{flags:?}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains(want), "{flags:?}: {}", stderr(&out));
    }
    let list = home.json(&["list"]);
    assert_eq!(list["runs"].as_array().map(Vec::len), Some(0), "{list}");
    assert_eq!(
        list["instances"].as_array().map(Vec::len),
        Some(0),
        "{list}"
    );
}

#[test]
fn checkpoints_come_from_node_0_unless_every_node_is_asked_for() {
    let home = Home::new();
    let save = "echo $NODE_RANK > \"$RUNCTL_CHECKPOINT_DIR/step-$NODE_RANK.txt\"";
    let out = home.run(&["run", "--nodes", "2", "--", "sh", "-c", save]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run = home.json(&["list"])["runs"][0]["id"]
        .as_str()
        .expect("a run")
        .to_owned();
    let (names, latest) = home.checkpoint_names(&run);
    assert_eq!(names, ["step-0.txt"], "node 1 pushed nothing");
    assert_eq!(latest.as_deref(), Some("step-0.txt"));

    let out = home.run(&[
        "run",
        "--nodes",
        "2",
        "--checkpoints-from",
        "all",
        "--",
        "sh",
        "-c",
        save,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let list = home.json(&["list"]);
    let run = list["runs"][1]["id"].as_str().expect("a run").to_owned();
    let (names, _) = home.checkpoint_names(&run);
    assert_eq!(names, ["step-0.txt"], "node 0's at the run's prefix");
    let ls = home.json(&[
        "s3",
        "ls",
        "--recursive",
        &format!("s3://runctl/checkpoints/{run}-node1/"),
    ]);
    assert!(ls.to_string().contains("step-1.txt"), "{ls}");
    assert!(!ls.to_string().contains("step-0.txt"), "{ls}");

    let out = home.run(&["run", "--checkpoints-from", "all", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--nodes"), "{}", stderr(&out));
}

#[test]
fn a_node_whose_agent_dies_is_lost_and_the_gang_stops() {
    let home = Home::new();
    // Each node sleeps under a name of its own, to be found (and found gone) after.
    let marker = format!("gang-lost-{}", std::process::id());
    let script = format!("echo up $NODE_RANK; exec -a {marker}-$NODE_RANK sleep 600");
    let run = detached(
        &home,
        &[
            "run",
            "--detach",
            "--nodes",
            "2",
            "--stop-grace",
            "2",
            "--",
            "bash",
            "-c",
            &script,
        ],
    );
    home.wait_until("both nodes up", std::time::Duration::from_secs(30), || {
        let out = home.run(&["logs", &run]);
        stdout(&out).contains("[node 0] up 0") && stdout(&out).contains("[node 1] up 1")
    });
    let (node1, pid) = kill_node1_agent(&home);
    home.wait_until("the run ended", std::time::Duration::from_secs(30), || {
        home.json(&["logs", &run])["state"] == "failed"
    });
    let row = home.json(&["logs", &run]);
    assert_eq!(
        row["error"],
        format!("node 1: its agent on {node1} (pid {pid}) died"),
        "{row}"
    );
    let text = stderr(&home.run(&["logs", &run]));
    assert!(
        text.contains("[node 0] ended: the process was killed by signal 15"),
        "node 0 was stopped: {text}"
    );
    // Node 1's process did not outlive its agent.
    let left = std::process::Command::new("pgrep")
        .args(["-f", &format!("{marker}-1")])
        .output()
        .expect("pgrep");
    assert!(left.stdout.is_empty(), "left running: {}", stdout(&left));
}

#[test]
fn a_gang_whose_node_dies_starts_again_from_latest_and_finishes_right() {
    let test = "a_gang_whose_node_dies_starts_again_from_latest_and_finishes_right";
    let Some(bin) = torch_bin(test) else { return };
    let home = Home::new();
    let path = format!("{bin}:{}", std::env::var("PATH").unwrap_or_default());
    let trainer = fixture("ddp_resume_trainer.py").display().to_string();
    let args = [
        "--output",
        "json",
        "run",
        "--detach",
        "--setup",
        "none",
        "--nodes",
        "2",
        "--nproc-per-node",
        "1",
        "--restart",
        "on-failure:2",
        "--stop-grace",
        "2",
        "--",
        "python3",
        &trainer,
    ];
    let out = home
        .cli()
        .env("PATH", &path)
        .args(args)
        .output()
        .expect("run runctl-controller");
    let run = tests::json_output(&out, &args)["id"]
        .as_str()
        .expect("a run id")
        .to_owned();
    // Mid-run, once node 0 has pushed a checkpoint: node 1's agent dies.
    home.wait_until(
        "node 0's first checkpoint in the store",
        std::time::Duration::from_secs(90),
        // (The bucket itself comes with the first checkpoint.)
        || home.json(&["checkpoint", "list", &run])["latest"].is_string(),
    );
    let (node1, pid) = kill_node1_agent(&home);
    home.wait_until("the run ended", std::time::Duration::from_secs(180), || {
        let state = home.json(&["logs", &run])["state"].clone();
        !matches!(
            state.as_str(),
            Some("pending" | "syncing" | "setting_up" | "pulling_data" | "running")
        )
    });
    let logs = home.run(&["logs", &run]);
    let text = format!("{}{}", stdout(&logs), stderr(&logs));
    let row = home.json(&["logs", &run]);
    assert_eq!(row["state"], "succeeded", "{row}\n{text}");
    assert!(
        text.contains(&format!(
            "started again (attempt 2) after node 1: its agent on {node1} (pid {pid}) died"
        )),
        "{text}"
    );
    // Attempt 1 started fresh; attempt 2 resumed on both nodes from node 0's LATEST, and
    // each rank's total is what an uninterrupted run gives.
    assert_eq!(lines_with(&logs, "(fresh)").len(), 2, "{text}");
    let resumed = lines_with(&logs, "starts at step");
    let resumed: Vec<&String> = resumed.iter().filter(|l| l.contains("resumed")).collect();
    assert_eq!(resumed.len(), 2, "{text}");
    assert!(
        resumed.iter().all(|l| !l.contains("starts at step 0 ")),
        "{text}"
    );
    let done = lines_with(&logs, "done:");
    assert_eq!(done.len(), 2, "{text}");
    for line in &done {
        let (total, expected) = line.split_once(" expected ").expect("a done line");
        let total = total.rsplit(' ').next().expect("the total");
        assert!(expected.starts_with(&format!("{total} ")), "{line}");
        assert!(line.contains("(resumed from step-"), "{line}");
    }
    home.wait_until(
        "both nodes terminated",
        std::time::Duration::from_secs(30),
        || {
            let list = home.json(&["list"]);
            list["instances"].as_array().is_some_and(|i| {
                i.len() == 2 && i.iter().all(|i| i["instance"]["state"] == "terminated")
            })
        },
    );
}
