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

/// The trainer's lines, one per rank, sorted.
fn rank_lines(out: &Output) -> Vec<String> {
    let mut lines: Vec<String> = stdout(out)
        .lines()
        .filter(|l| l.starts_with("rank "))
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
        rank_lines(&out),
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
        rank_lines(&out),
        ["rank 0/1 local 0 node 0 replicas equal all-reduce 1 expected 1"],
        "{}",
        stdout(&out)
    );
}
