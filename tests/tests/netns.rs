//! Reachability through real kernel networking: network namespaces, veth links, nftables
//! NAT and filters, all made by the test and removed after it, with no route out of the
//! machine. The daemon sits behind one NAT, the agent behind another, the relay on the
//! "public" segment between them:
//!
//! ```text
//!  dlan 198.19.1.2 (daemon) -- dnat (masquerade) 198.18.0.2 --+
//!                                                              pub 198.18.0.1 / 198.18.1.1 (relay)
//!  alan 198.19.2.2 (agent)  -- anat (masquerade) 198.18.1.2 --+
//! ```
//!
//! Needs root (CI runs as root); says SKIPPED otherwise.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::reach::{RelayProcess, ca, quic_port, repoint_agent, sh, use_relay, wait_for_path};
use tests::{Home, stderr, stdout};

const NAMESPACES: [&str; 5] = ["dlan", "dnat", "pub", "anat", "alan"];

/// One test's topology; its namespaces are deleted when it is dropped.
struct Net {
    prefix: String,
}

impl Net {
    /// Builds the topology, or says SKIPPED and returns `None` where it cannot be built.
    fn new(tag: &str) -> Option<Net> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "SKIPPED: the network-namespace tests need root (scripts/test.sh runs them in CI)"
            );
            return None;
        }
        for tool in ["ip", "nft"] {
            if Command::new(tool).arg("-V").output().is_err() {
                eprintln!(
                    "SKIPPED: `{tool}` is not installed (scripts/test.sh installs iproute2 and nftables)"
                );
                return None;
            }
        }
        let net = Net {
            prefix: format!("rc{}{tag}", std::process::id() % 100_000),
        };
        net.build();
        Some(net)
    }

    fn ns(&self, which: &str) -> String {
        format!("{}-{which}", self.prefix)
    }

    fn ip(&self, ns: &str, args: &str) {
        sh(Command::new("ip")
            .args(["netns", "exec", &self.ns(ns), "ip"])
            .args(args.split_whitespace()));
    }

    /// Runs `nft -f -` in `ns` with `rules`.
    fn nft(&self, ns: &str, rules: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("write rules");
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn link(&self, a: (&str, &str, &str), b: (&str, &str, &str)) {
        sh(Command::new("ip").args([
            "link",
            "add",
            a.1,
            "netns",
            &self.ns(a.0),
            "type",
            "veth",
            "peer",
            "name",
            b.1,
            "netns",
            &self.ns(b.0),
        ]));
        for (ns, dev, addr) in [a, b] {
            self.ip(ns, &format!("addr add {addr} dev {dev}"));
            self.ip(ns, &format!("link set {dev} up"));
        }
    }

    fn build(&self) {
        for ns in NAMESPACES {
            sh(Command::new("ip").args(["netns", "add", &self.ns(ns)]));
            self.ip(ns, "link set lo up");
        }
        self.link(
            ("dlan", "eth0", "198.19.1.2/24"),
            ("dnat", "in0", "198.19.1.1/24"),
        );
        self.link(
            ("dnat", "out0", "198.18.0.2/24"),
            ("pub", "d0", "198.18.0.1/24"),
        );
        self.link(
            ("alan", "eth0", "198.19.2.2/24"),
            ("anat", "in0", "198.19.2.1/24"),
        );
        self.link(
            ("anat", "out0", "198.18.1.2/24"),
            ("pub", "a0", "198.18.1.1/24"),
        );
        self.ip("dlan", "route add default via 198.19.1.1");
        self.ip("alan", "route add default via 198.19.2.1");
        self.ip("dnat", "route add default via 198.18.0.1");
        self.ip("anat", "route add default via 198.18.1.1");
        // pub knows only its own two segments: the private sides are unreachable from it.
        for ns in ["dnat", "anat", "pub"] {
            sh(Command::new("ip").args([
                "netns",
                "exec",
                &self.ns(ns),
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
            ]));
        }
        for ns in ["dnat", "anat"] {
            self.nft(
                ns,
                "table ip nat {\n  chain post {\n    type nat hook postrouting priority 100;\n    oifname \"out0\" masquerade\n  }\n}\n",
            );
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in NAMESPACES {
            // Whatever still runs inside goes with it (daemon, relay, agents, tcpdump).
            tests::delete_netns(&self.ns(ns));
        }
    }
}

/// A daemon in `dlan` registered with a relay in `pub`, and one local instance whose agent
/// has been moved into `alan` with every endpoint an EC2 agent would be given.
struct Setup {
    home: Home,
    relay: RelayProcess,
    _agent: tests::reach::AgentProcess,
    net: Net,
}

fn setup(tag: &str, agent_rules: Option<&str>) -> Option<Setup> {
    let net = Net::new(tag)?;
    let home = Home::new().in_netns(&net.ns("dlan"));
    let config = home.path().join("config.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("127.0.0.1:0", "0.0.0.0:0")).expect("config");
    let relay = RelayProcess::start(&ca(&home), "0.0.0.0:0", None, Some(&net.ns("pub")));
    let relay_port = relay.addr.port();
    use_relay(&home, &format!("198.18.0.1:{relay_port}"));
    let launched = home.run(&["launch", "--name", "n1"]);
    assert!(
        launched.status.success(),
        "launch: {}{}",
        stdout(&launched),
        stderr(&launched)
    );
    if let Some(rules) = agent_rules {
        net.nft("alan", rules);
    }
    let port = quic_port(&home);
    let endpoints = [
        format!("udp://198.19.1.2:{port}"),
        format!("tcp://198.19.1.2:{port}"),
        format!("udp+relay://198.18.1.1:{relay_port}"),
        format!("tcp+relay://198.18.1.1:{relay_port}"),
    ];
    let agent = repoint_agent(&home, "n1", &endpoints, Some(&net.ns("alan")));
    Some(Setup {
        home,
        relay,
        _agent: agent,
        net,
    })
}

fn project(extra: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in extra {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    dir
}

fn run_on(home: &Home, root: &std::path::Path, argv: &[&str]) -> (String, String) {
    let root = root.display().to_string();
    let mut args = vec![
        "run",
        "--on",
        "n1",
        "--root",
        &root,
        "--workdir",
        &root,
        "--",
    ];
    args.extend_from_slice(argv);
    let out = home.run(&args);
    let (o, e) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "stdout: {o}\nstderr: {e}");
    (o, e)
}

const TRAIN: &str = "import os, sys\nmarker = sys.argv[1]\nfor i in range(1, 21):\n    print(f'{marker} {i}', flush=True)\nckpt = os.environ['RUNCTL_CHECKPOINT_DIR']\nwith open(os.path.join(ckpt, '.tmp'), 'w') as f:\n    f.write('weights ' + marker)\nos.rename(os.path.join(ckpt, '.tmp'), os.path.join(ckpt, 'ckpt-1.txt'))\nprint('saved', flush=True)\n";

#[test]
fn behind_two_nats_the_relay_carries_a_run_end_to_end() {
    let Some(s) = setup("a", None) else { return };
    // Direct is impossible: the daemon's address is private behind its NAT.
    let port = quic_port(&s.home);
    let direct = Command::new("ip")
        .args(["netns", "exec", &s.net.ns("alan"), "python3", "-c"])
        .arg(format!(
            "import socket; socket.create_connection(('198.19.1.2', {port}), timeout=2)"
        ))
        .output()
        .expect("python3");
    assert!(
        !direct.status.success(),
        "the agent reached the NATed daemon directly"
    );
    wait_for_path(&s.home, "n1", "udp via relay", Duration::from_secs(30));

    // A capture on the relay's host for the whole run: the marker the run prints must
    // never cross it in plaintext.
    let pcap = tempfile::NamedTempFile::new().expect("pcap");
    let mut capture = Command::new("ip")
        .args([
            "netns",
            "exec",
            &s.net.ns("pub"),
            "tcpdump",
            "-i",
            "any",
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(pcap.path())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (scripts/test.sh installs it)");
    let mut err = BufReader::new(capture.stderr.take().expect("stderr")).lines();
    // tcpdump says "listening on ..." once it captures.
    assert!(
        err.by_ref()
            .take(5)
            .any(|l| l.is_ok_and(|l| l.contains("listening"))),
        "tcpdump did not start"
    );
    std::thread::spawn(move || for _ in err {});

    let marker = "MARKER-5f3a9c";
    let root = project(&[("train.py", TRAIN)]);
    let (out, errors) = run_on(&s.home, root.path(), &["python3", "train.py", marker]);
    let expected: Vec<String> = (1..=20)
        .map(|i| format!("{marker} {i}"))
        .chain(["saved".to_owned()])
        .collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), expected, "{errors}");
    let run = errors
        .split_whitespace()
        .find(|w| w.starts_with("run-"))
        .expect("run id")
        .to_owned();
    let listed = s.home.json(&["checkpoint", "list", &run]);
    assert_eq!(listed["latest"], "ckpt-1.txt", "{listed}");

    // `stop` reaches a run through the relay too.
    let started = s
        .home
        .json(&["run", "--on", "n1", "--detach", "--", "sleep", "600"]);
    let id = started["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{started}"))
        .to_owned();
    // So does exec: a stream of the same session.
    let out = s
        .home
        .run(&["exec", &id, "--", "sh", "-c", "echo relayed-$RUNCTL_RUN_ID"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("relayed-{id}\n"));
    let stopped = s.home.json(&["stop", &id]);
    assert_eq!(stopped["state"], "stopped", "{stopped}");

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(capture.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = capture.wait();
    let bytes = std::fs::read(pcap.path()).expect("read pcap");
    assert!(
        bytes.len() > 10_000,
        "the capture saw the run's traffic ({} bytes)",
        bytes.len()
    );
    assert!(
        !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the marker crossed the relay in plaintext"
    );
    drop(s.relay);
}

#[test]
fn with_udp_dropped_the_agent_falls_back_to_tcp() {
    let rules = "table inet block {\n  chain out {\n    type filter hook output priority 0;\n    meta l4proto udp drop\n  }\n}\n";
    let Some(s) = setup("b", Some(rules)) else {
        return;
    };
    let took = wait_for_path(&s.home, "n1", "tcp via relay", Duration::from_secs(30));
    eprintln!("tcp fallback: connected over tcp via relay {took:.1?} after the agent started");
    assert!(took < Duration::from_secs(10), "fallback took {took:?}");
    let root = project(&[("train.py", TRAIN)]);
    let (out, _) = run_on(&s.home, root.path(), &["python3", "train.py", "over-tcp"]);
    assert!(out.contains("over-tcp 20"), "{out}");

    // exec and cp ride the same path: streams of the session, over TCP through the relay.
    let started = s.home.json(&[
        "run",
        "--on",
        "n1",
        "--root",
        &root.path().display().to_string(),
        "--detach",
        "--",
        "sleep",
        "600",
    ]);
    let run = started["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{started}"))
        .to_owned();
    let out = s
        .home
        .run(&["exec", &run, "--", "sh", "-c", "echo via-$((6*7)); ls"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("via-42\n"), "{}", stdout(&out));
    assert!(stdout(&out).contains("train.py"), "{}", stdout(&out));
    let local = tempfile::tempdir().expect("local");
    let blob: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 241) as u8).collect();
    std::fs::write(local.path().join("blob.bin"), &blob).expect("write");
    let up = s.home.run(&[
        "cp",
        &local.path().join("blob.bin").display().to_string(),
        &format!("{run}:blob.bin"),
    ]);
    assert_eq!(up.status.code(), Some(0), "{}", stderr(&up));
    let back = local.path().join("back.bin");
    let down = s.home.run(&[
        "cp",
        &format!("{run}:blob.bin"),
        &back.display().to_string(),
    ]);
    assert_eq!(down.status.code(), Some(0), "{}", stderr(&down));
    assert!(
        std::fs::read(&back).expect("read") == blob,
        "the copy came back whole"
    );
    drop(s.relay);
}

#[test]
fn the_daemons_nat_changing_address_mid_run_loses_nothing() {
    let Some(s) = setup("c", None) else { return };
    wait_for_path(&s.home, "n1", "udp via relay", Duration::from_secs(30));
    let mut attached = tests::CountedRun::start(&s.home, &["--on", "n1"], 400, 0.05);
    attached.read(30);
    // The laptop moves: its NAT's outside address changes, so the relay link's TCP
    // connection is dead from one packet to the next.
    s.net.ip("dnat", "addr del 198.18.0.2/24 dev out0");
    s.net.ip("dnat", "addr add 198.18.0.3/24 dev out0");
    s.net.ip("dnat", "route replace default via 198.18.0.1");
    attached.finish();
    // The move really cut the link: the daemon registered again from its new address.
    let log = std::fs::read_to_string(s.home.path().join("daemon.log")).expect("daemon log");
    assert!(
        log.matches("registered with relay").count() >= 2,
        "the daemon never re-registered:\n{log}"
    );
    drop(s.relay);
}

#[test]
fn the_relay_killed_and_restarted_mid_run_loses_and_repeats_no_line() {
    let Some(Setup {
        home,
        relay,
        _agent: agent,
        net,
    }) = setup("e", None)
    else {
        return;
    };
    wait_for_path(&home, "n1", "udp via relay", Duration::from_secs(30));
    let mut attached = tests::CountedRun::start(&home, &["--on", "n1"], 300, 0.05);
    attached.read(30);
    // The relay's host loses the process (SIGKILL) and starts it again a second later on
    // the same port with the same key: both NATed sides must find their way back alone.
    let ca = relay.ca.clone();
    let (state, addr) = relay.kill();
    std::thread::sleep(Duration::from_secs(1));
    let _relay = RelayProcess::start(&ca, &addr.to_string(), Some(state), Some(&net.ns("pub")));
    attached.finish();
    let log = std::fs::read_to_string(home.path().join("daemon.log")).expect("daemon log");
    assert!(
        log.matches("registered with relay").count() >= 2,
        "the daemon never re-registered:\n{log}"
    );
    drop(agent);
}

/// Writes `count` blobs of 2 MiB of incompressible bytes into `root`, and `check.py`,
/// which prints each one's SHA-256; returns what it must print.
fn blobs(root: &std::path::Path, count: u64) -> Vec<String> {
    let mut expected = Vec::new();
    for i in 0..count {
        let data = tests::noise(2 * 1024 * 1024, i);
        let name = format!("blob-{i:03}.bin");
        expected.push(format!("{} {name}", sha256_hex(&data)));
        std::fs::write(root.join(&name), &data).expect("write");
    }
    let check = "import glob, hashlib\nfor p in sorted(glob.glob('blob-*.bin')):\n    print(hashlib.sha256(open(p, 'rb').read()).hexdigest(), p)\n";
    std::fs::write(root.join("check.py"), check).expect("write");
    expected
}

#[test]
fn five_percent_loss_during_a_100_mb_sync_still_delivers_the_tree_exactly() {
    let Some(s) = setup("d", None) else { return };
    wait_for_path(&s.home, "n1", "udp via relay", Duration::from_secs(30));
    s.net.nft(
        "anat",
        "table inet loss {\n  chain lossy {\n    type filter hook forward priority 0;\n    meta l4proto udp numgen random mod 100 < 5 drop\n  }\n}\n",
    );
    let root = tempfile::tempdir().expect("tempdir");
    let local = blobs(root.path(), 50);
    let (out, errors) = run_on(&s.home, root.path(), &["python3", "check.py"]);
    assert_eq!(out.lines().collect::<Vec<_>>(), local, "{errors}");
    drop(s.relay);
}

/// SeaweedFS inside `pub`, at 198.18.1.1: a store the agent reaches only across its NAT
/// (and whatever loss the test puts there), and the daemon across its own.
struct PubStore {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl PubStore {
    const ENDPOINT: &str = "http://198.18.1.1:8433";

    fn start(net: &Net) -> Option<PubStore> {
        let Ok(weed) = which_weed() else {
            eprintln!("SKIPPED: no `weed` (scripts/test.sh installs SeaweedFS)");
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("ip")
            .args(["netns", "exec", &net.ns("pub")])
            .arg(weed)
            .args([
                "mini",
                "-ip=198.18.1.1",
                "-ip.bind=0.0.0.0",
                "-s3.port=8433",
            ])
            .args(["-s3.autoCreateBucket=false", "-admin.ui=false"])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-dir={}", dir.path().display()))
            // Ports of its own: SeaweedFS names its Unix sockets after them
            // (/tmp/seaweedfs-*-<port>.sock, gRPC's too), and a network namespace does not
            // separate the filesystem, so with the defaults it took over the sockets of the
            // S3 server scripts/test.sh runs on the host, and each reached the other.
            .args(["-master.port=9433", "-volume.port=8180", "-filer.port=8988"])
            .args(["-admin.port=23746", "-webdav.port=7433"])
            .env("S3_BUCKET", "runctl-test")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start weed");
        Some(PubStore { child, _dir: dir })
    }
}

impl Drop for PubStore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which_weed() -> Result<std::path::PathBuf, ()> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| std::path::Path::new(d).join("weed"))
        .find(|p| p.is_file())
        .ok_or(())
}

#[test]
fn five_percent_loss_during_a_200_mb_sync_and_a_1_gib_checkpoint_delivers_both_exactly() {
    lossy_sync_and_checkpoint("l", 5);
}

/// The same at 20 % loss: a long test, run before a release (`RUNCTL_LONG_TESTS=1`).
#[test]
fn twenty_percent_loss_during_a_200_mb_sync_and_a_1_gib_checkpoint_delivers_both_exactly() {
    if std::env::var_os("RUNCTL_LONG_TESTS").is_none() {
        eprintln!("SKIPPED: a long test (20 % loss); run it with RUNCTL_LONG_TESTS=1");
        return;
    }
    lossy_sync_and_checkpoint("m", 20);
}

/// A run whose agent loses `percent` of its packets, both ways and every kind (QUIC to
/// the daemon, TCP to the store): a 200 MB tree arrives exactly, and the 1 GiB checkpoint
/// it saves reaches the store whole and comes back byte for byte.
fn lossy_sync_and_checkpoint(tag: &str, percent: u32) {
    let Some(s) = setup(tag, None) else { return };
    let Some(_store) = PubStore::start(&s.net) else {
        return;
    };
    let config = s.home.path().join("config.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        format!(
            "{text}[storage]\nbackend = \"s3\"\nendpoint_url = \"{}\"\nregion = \"us-east-1\"\nforce_path_style = true\ncheckpoints = \"s3://runctl-test/lossy-{tag}\"\n",
            PubStore::ENDPOINT
        ),
    )
    .expect("config");
    // The config is read when the daemon starts: start it again with the store.
    let _ = s.home.run(&["shutdown"]);
    s.home
        .wait_until("the store in pub", Duration::from_secs(60), || {
            s.home
                .run(&["s3", "ls", "s3://runctl-test/"])
                .status
                .success()
        });
    wait_for_path(&s.home, "n1", "udp via relay", Duration::from_secs(30));
    s.net.nft(
        "anat",
        &format!(
            "table inet loss {{\n  chain lossy {{\n    type filter hook forward priority 0;\n    numgen random mod 100 < {percent} counter drop\n  }}\n}}\n"
        ),
    );
    let root = tempfile::tempdir().expect("tempdir");
    let local = blobs(root.path(), 100);
    let save = "import hashlib, os, random\nblock = random.Random(7).randbytes(1 << 20)\nckpt = os.environ['RUNCTL_CHECKPOINT_DIR']\nh = hashlib.sha256()\nwith open(os.path.join(ckpt, '.big'), 'wb') as f:\n    for _ in range(1024):\n        f.write(block)\n        h.update(block)\nos.rename(os.path.join(ckpt, '.big'), os.path.join(ckpt, 'big.bin'))\nprint('saved', h.hexdigest(), flush=True)\n";
    std::fs::write(root.path().join("save.py"), save).expect("write");
    let started = std::time::Instant::now();
    let (out, errors) = run_on(
        &s.home,
        root.path(),
        &["sh", "-c", "python3 check.py && python3 save.py"],
    );
    eprintln!(
        "{percent} % loss: 200 MB synced, checked, 1 GiB saved and pushed in {:?}",
        started.elapsed()
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..100],
        local.iter().map(String::as_str).collect::<Vec<_>>()[..],
        "{errors}"
    );
    let saved = lines[100]
        .strip_prefix("saved ")
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        errors.contains("runctl: checkpoint big.bin saved to s3://"),
        "{errors}"
    );
    // Back from the store (the daemon's side has no loss), byte for byte.
    let run = s.home.json(&["list"])["runs"][0]["id"]
        .as_str()
        .expect("run id")
        .to_owned();
    let back = tempfile::tempdir().expect("tempdir");
    let got = s.home.run(&[
        "checkpoint",
        "download",
        &run,
        "big.bin",
        "--to",
        &back.path().display().to_string(),
    ]);
    assert!(got.status.success(), "{}", stderr(&got));
    let data = std::fs::read(back.path().join("big.bin")).expect("read");
    assert_eq!(data.len(), 1 << 30);
    assert_eq!(sha256_hex(&data), saved);
    // The loss was real: the kernel dropped packets of this run.
    let listed = Command::new("ip")
        .args([
            "netns",
            "exec",
            &s.net.ns("anat"),
            "nft",
            "list",
            "table",
            "inet",
            "loss",
        ])
        .output()
        .expect("nft list");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let dropped: u64 = listed
        .split("packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {listed}"));
    eprintln!("{percent} % loss: the kernel dropped {dropped} packets");
    assert!(dropped > 1_000, "{listed}");
    drop(s.relay);
}

fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Prints `step N` every 100 ms for `secs` seconds and saves a checkpoint (write, then
/// rename) every 100 steps.
fn steady(secs: u32) -> String {
    format!(
        "import os, time\nckpt = os.environ['RUNCTL_CHECKPOINT_DIR']\nfor i in range(1, {}):\n    print(f'step {{i}}', flush=True)\n    if i % 100 == 0:\n        tmp = os.path.join(ckpt, '.tmp')\n        with open(tmp, 'w') as f:\n            f.write(f'weights at {{i}}')\n        os.rename(tmp, os.path.join(ckpt, f'ckpt-{{i}}.txt'))\n    time.sleep(0.1)\n",
        secs * 10 + 1
    )
}

fn logged_steps(home: &Home, run: &str) -> Vec<String> {
    stdout(&home.run(&["logs", run]))
        .lines()
        .filter(|l| l.starts_with("step "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn an_agent_cut_off_for_a_minute_keeps_training_and_pushing_and_the_controller_catches_up() {
    cut_off("p", Duration::from_secs(60));
}

/// The same for ten minutes: a long test, run before a release (`RUNCTL_LONG_TESTS=1`).
#[test]
fn an_agent_cut_off_for_ten_minutes_keeps_training_and_pushing_and_the_controller_catches_up() {
    if std::env::var_os("RUNCTL_LONG_TESTS").is_none() {
        eprintln!("SKIPPED: a long test (a 10-minute partition); run it with RUNCTL_LONG_TESTS=1");
        return;
    }
    cut_off("q", Duration::from_secs(600));
}

/// A run on an agent whose host loses every link for `partition`, while the run prints
/// and checkpoints: it keeps going, its checkpoints reach the store, and once the link is
/// back the daemon has every line once, in order.
fn cut_off(tag: &str, partition: Duration) {
    let Some(s) = setup(tag, None) else { return };
    wait_for_path(&s.home, "n1", "udp via relay", Duration::from_secs(30));
    // The run outlasts the partition by 20 s.
    let secs = partition.as_secs() as u32 + 20;
    let total = secs * 10;
    let root = project(&[("train.py", &steady(secs))]);
    let dir = root.path().display().to_string();
    let started = s.home.json(&[
        "run",
        "--on",
        "n1",
        "--detach",
        "--keep-checkpoints",
        "0",
        "--root",
        &dir,
        "--workdir",
        &dir,
        "--",
        "python3",
        "train.py",
    ]);
    let run = started["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{started}"))
        .to_owned();
    s.home
        .wait_until("the first steps", Duration::from_secs(30), || {
            logged_steps(&s.home, &run).len() >= 20
        });

    // Nothing in or out of the agent's host but loopback, for a minute.
    s.net.nft(
        "alan",
        "table inet partition {\n  chain in {\n    type filter hook input priority -10;\n    iifname != \"lo\" drop\n  }\n  chain out {\n    type filter hook output priority -10;\n    oifname != \"lo\" drop\n  }\n}\n",
    );
    let cut = std::time::Instant::now();
    s.home.wait_until(
        "the daemon to see the agent gone",
        Duration::from_secs(60),
        || s.home.json(&["list"])["instances"][0]["connected"] == false,
    );
    let during = logged_steps(&s.home, &run).len();
    std::thread::sleep(partition.saturating_sub(cut.elapsed()));
    assert_eq!(
        logged_steps(&s.home, &run).len(),
        during,
        "nothing reached the daemon during the partition"
    );
    assert_eq!(s.home.json(&["list"])["runs"][0]["state"], "running");
    s.net.nft("alan", "delete table inet partition\n");

    // The agent redials (its backoff is capped at 15 s) and the daemon replays the minute
    // it missed; the run, which never stopped, finishes. Every step once, in order.
    let out = s.home.run(&["logs", "--follow", &run]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let steps = logged_steps(&s.home, &run);
    let expected: Vec<String> = (1..=total).map(|i| format!("step {i}")).collect();
    assert_eq!(steps, expected, "every step once, in order");
    // Every checkpoint saved, during the partition too, is in the store.
    let (names, latest) = s.home.checkpoint_names(&run);
    assert_eq!(latest, Some(format!("ckpt-{total}.txt")), "{names:?}");
    for i in (100..=total).step_by(100) {
        assert!(names.contains(&format!("ckpt-{i}.txt")), "{names:?}");
    }
}
