//! The RunPod pod start command (`cloud-init/pod-start.sh`, rendered by
//! `provider::runpod::start`), run by a real `sh`: it downloads the static agent over HTTP
//! with whichever of curl or python3 the image has, checks its SHA-256, writes the config
//! owner-only on the pod's volume, and becomes the agent's supervisor; a wrong hash leaves
//! nothing installed; a restarted container reuses the verified agent without a download.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::procstat::{self, ProcStat};
use controller::provider::runpod::start;
use protocol::agent_config::AgentConfigFile;

/// Serves `dir` over HTTP on loopback; killed when dropped.
struct Files(Child, u16);

impl Files {
    fn serve(dir: &Path) -> Self {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(
                "import functools, http.server, sys\n\
                 h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])\n\
                 h.log_message = lambda *a: None\n\
                 s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), h)\n\
                 print(s.server_address[1], flush=True)\n\
                 s.serve_forever()",
            )
            .arg(dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("file server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("port");
        let port = line.trim().parse().expect("a port");
        Files(child, port)
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config() -> AgentConfigFile {
    config_named("runpod-3fa9c1")
}

fn config_named(name: &str) -> AgentConfigFile {
    AgentConfigFile::new(
        name.parse().expect("name"),
        // Nobody listens there: the agent redials while the test looks at it.
        vec!["tcp://127.0.0.1:9".parse().expect("endpoint")],
        "ab".repeat(32).parse().expect("fingerprint"),
        protocol::EnrollToken::from_random([7; 32]),
        "state".into(),
    )
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned()
}

/// A directory of links to the tools the script needs, without curl or wget: an image
/// with python3 only.
fn python_only_path(dir: &Path) -> String {
    // The interpreter itself, not a shim (pyenv's is a bash script).
    let python = Command::new("python3")
        .arg("-c")
        .arg("import os, sys; print(os.path.realpath(sys.executable))")
        .output()
        .expect("python3");
    let python = String::from_utf8_lossy(&python.stdout).trim().to_owned();
    std::os::unix::fs::symlink(&python, dir.join("python3")).expect("link");
    for tool in ["sh", "mkdir", "rm", "chmod", "mv", "cat", "cut", "sleep"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .expect("command -v");
        let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
        assert!(!path.is_empty(), "{tool} is on this machine");
        std::os::unix::fs::symlink(&path, dir.join(tool)).expect("link");
    }
    dir.display().to_string()
}

/// Runs the start script with `root` as the pod's volume.
fn start_pod(script: &str, root: &Path, path: Option<&str>, log: &Path) -> Child {
    start_member(script, root, path, log, None)
}

/// Runs the start script as a cluster's pod of `rank` (RunPod's `NODE_RANK`) would.
fn start_member(
    script: &str,
    root: &Path,
    path: Option<&str>,
    log: &Path,
    rank: Option<&str>,
) -> Child {
    let mut command = Command::new("sh");
    command.env_remove("NODE_RANK");
    if let Some(rank) = rank {
        command.env("NODE_RANK", rank);
    }
    command
        .arg("-c")
        .arg(script)
        .env("RUNCTL_POD_ROOT", root)
        .env("RUNCTL_INSTALL_ATTEMPTS", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"));
    if let Some(path) = path {
        command.env("PATH", path);
    }
    command.spawn().expect("start the pod script")
}

/// Waits until `pid` is the agent's supervisor with an agent child, then stops it.
fn supervises_then_stops(mut pod: Child, log: &Path) {
    let pid = pod.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let child = procstat::pids()
            .into_iter()
            .any(|p| ProcStat::of(p).is_some_and(|s| s.ppid == pid && s.state != 'Z'));
        // Exec'd: its arguments are the agent's, not the script's (which names them too).
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.get(1) == Some(&&b"--supervise"[..]) && child {
            break;
        }
        if let Some(status) = pod.try_wait().expect("wait") {
            panic!(
                "the script exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the script never became the supervisor"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("stop the pod");
    let status = pod.wait().expect("wait");
    // 0 once the agent has its handler in place, 143 (SIGTERM's shell status) before.
    assert!(
        matches!(status.code(), Some(0 | 143)),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn the_start_script_installs_a_verified_agent_and_becomes_its_supervisor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = dir.path().join("served");
    std::fs::create_dir(&served).expect("dir");
    std::fs::copy(tests::bin("runctl-agent"), served.join("runctl-agent")).expect("copy");
    let sha256 = sha256_of(&served.join("runctl-agent"));
    let files = Files::serve(&served);
    let url = format!("http://127.0.0.1:{}/runctl-agent", files.1);
    let config = config();
    let script = |sha256: &str| {
        start::script(&start::Params {
            configs: std::slice::from_ref(&config),
            agent_url: &url,
            agent_sha256: sha256,
        })
        .expect("script")
    };
    let log = dir.path().join("pod.log");

    // A wrong hash: refused, nothing installed under the final name or half-downloaded.
    let bad = dir.path().join("bad");
    let status = start_pod(&script(&"0".repeat(64)), &bad, None, &log)
        .wait()
        .expect("wait");
    assert_eq!(status.code(), Some(1));
    assert!(
        std::fs::read_to_string(&log)
            .expect("log")
            .contains("could not download a verified agent")
    );
    assert!(!bad.join("bin/runctl-agent").exists());
    assert!(!bad.join("bin/runctl-agent.download").exists());

    // An image with curl (this machine's PATH).
    let root = dir.path().join("workspace");
    supervises_then_stops(start_pod(&script(&sha256), &root, None, &log), &log);
    let bin = root.join("bin/runctl-agent");
    assert_eq!(sha256_of(&bin), sha256);
    assert_eq!(
        std::fs::metadata(&bin).expect("bin").permissions().mode() & 0o777,
        0o700
    );
    let written = root.join("agent.toml");
    assert_eq!(
        std::fs::metadata(&written)
            .expect("config")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let back: AgentConfigFile =
        toml::from_str(&std::fs::read_to_string(&written).expect("read")).expect("the same config");
    assert_eq!(back.instance, config.instance);
    assert_eq!(back.ca_sha256, config.ca_sha256);

    // The container restarted, the download URL long expired: the verified agent is reused.
    drop(files);
    supervises_then_stops(start_pod(&script(&sha256), &root, None, &log), &log);
    assert!(
        std::fs::read_to_string(&log)
            .expect("log")
            .contains("already installed")
    );

    // An image with python3 and no curl or wget.
    let files = Files::serve(&served);
    let url = format!("http://127.0.0.1:{}/runctl-agent", files.1);
    let tools = dir.path().join("tools");
    std::fs::create_dir(&tools).expect("dir");
    let path = python_only_path(&tools);
    let python_root = dir.path().join("python-only");
    let script = start::script(&start::Params {
        configs: std::slice::from_ref(&config),
        agent_url: &url,
        agent_sha256: &sha256,
    })
    .expect("script");
    supervises_then_stops(start_pod(&script, &python_root, Some(&path), &log), &log);
    assert_eq!(sha256_of(&python_root.join("bin/runctl-agent")), sha256);
}

#[test]
fn each_pod_of_a_cluster_writes_the_config_of_its_own_rank() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = dir.path().join("served");
    std::fs::create_dir(&served).expect("dir");
    std::fs::copy(tests::bin("runctl-agent"), served.join("runctl-agent")).expect("copy");
    let sha256 = sha256_of(&served.join("runctl-agent"));
    let files = Files::serve(&served);
    let url = format!("http://127.0.0.1:{}/runctl-agent", files.1);
    let configs = [config_named("runpod-aaaaa0"), config_named("runpod-bbbbb1")];
    let script = start::script(&start::Params {
        configs: &configs,
        agent_url: &url,
        agent_sha256: &sha256,
    })
    .expect("script");
    let log = dir.path().join("pod.log");
    for (rank, config) in configs.iter().enumerate() {
        let root = dir.path().join(format!("node{rank}"));
        let pod = start_member(&script, &root, None, &log, Some(&rank.to_string()));
        supervises_then_stops(pod, &log);
        let back: AgentConfigFile =
            toml::from_str(&std::fs::read_to_string(root.join("agent.toml")).expect("read"))
                .expect("a config");
        assert_eq!(back.instance, config.instance, "node {rank}");
        assert_eq!(back.token, config.token, "node {rank}");
    }
    // A rank the cluster does not have, or none at all: no agent, and a reason.
    for rank in [Some("2"), Some("x"), None] {
        let root = dir.path().join("stray");
        let status = start_member(&script, &root, None, &log, rank)
            .wait()
            .expect("wait");
        assert_eq!(status.code(), Some(2), "{rank:?}");
        assert!(
            std::fs::read_to_string(&log)
                .expect("log")
                .contains("not a rank of this cluster's 2 nodes"),
            "{rank:?}"
        );
        assert!(!root.join("agent.toml").exists(), "{rank:?}");
    }
}
