//! A hostile controller against a real agent session over QUIC on loopback: every sync
//! stream that could reach outside the run's tree, smuggle special files or blow up in
//! size is refused with a message that crosses the wire, and nothing is written; so is
//! every access stream (exec, forward, copy) outside the agent's policy, and a stream
//! kind the agent does not know.

use std::sync::Arc;
use std::time::Duration;

use agent::runs::Runs;
use protocol::delta::{Delta, Op, Source};
use protocol::framed::{read_frame, write_frame};
use protocol::manifest::Entry;
use protocol::tls::{self, CertificateAuthority, Identity};
use protocol::{
    AgentMsg, BulkOpen, ContentHash, ControllerMsg, Hello, Manifest, RunId, SyncDone, SyncGo,
    SyncHave, SyncOpen,
};

struct Hostile {
    conn: quinn::Connection,
    dir: tempfile::TempDir,
    _agent: tokio::task::JoinHandle<()>,
    _control: (quinn::SendStream, quinn::RecvStream),
}

/// A controller endpoint with its own CA, and a real agent session connected to it.
async fn hostile_controller() -> Hostile {
    hostile_controller_with(protocol::agent_config::Access::default()).await
}

/// The same, with the agent's `[access]` policy given.
async fn hostile_controller_with(policy: protocol::agent_config::Access) -> Hostile {
    let ca = CertificateAuthority::generate().expect("ca");
    let server = ca.issue_server_identity().expect("server identity");
    let endpoint = quinn::Endpoint::server(
        tls::server_config(&ca, &server).expect("server config"),
        "127.0.0.1:0".parse().expect("addr"),
    )
    .expect("endpoint");
    let addr = endpoint.local_addr().expect("addr");
    let (key_pem, csr) = tls::agent_key_and_csr().expect("csr");
    let name = "victim".parse().expect("name");
    let cert = ca
        .sign_agent_csr(&csr, &name, Duration::from_secs(3600))
        .expect("sign");
    let identity = Identity {
        cert_pem: tls::der_to_pem(&cert),
        key_pem,
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let runs = Arc::new(
        Runs::open(
            &dir.path().join("state"),
            agent::eventlog::DEFAULT_MAX_BYTES,
            agent::workspace::DiskLimits::default(),
            tokio::sync::mpsc::unbounded_channel().0,
            None,
        )
        .expect("runs"),
    );
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    let config = tls::client_config(ca.fingerprint(), Some(&identity)).expect("client config");
    let connecting = client
        .connect_with(config, addr, tls::SERVER_NAME)
        .expect("connect");
    let incoming = endpoint.accept().await.expect("incoming");
    let (agent_conn, conn) = tokio::join!(connecting, incoming);
    let (agent_conn, conn) = (
        agent_conn.expect("agent side"),
        conn.expect("controller side"),
    );
    std::fs::create_dir_all(dir.path().join("home")).expect("home");
    let access = Arc::new(agent::access::Access::new(
        policy,
        &dir.path().join("state"),
        dir.path().join("home"),
        runs.clone(),
    ));
    let agent = tokio::spawn(async move {
        let connected = std::sync::atomic::AtomicBool::new(false);
        let (_stats_tx, stats) = tokio::sync::watch::channel(None);
        let (_closing_tx, closing) = tokio::sync::watch::channel(false);
        let _ = agent::session::serve(agent_conn, &runs, &access, &connected, stats, closing, None)
            .await;
        drop(client);
    });
    let (mut send, mut recv) = conn.accept_bi().await.expect("control stream");
    let hello: Option<AgentMsg> = read_frame(&mut recv).await.expect("hello");
    assert!(matches!(hello, Some(AgentMsg::Hello(_))));
    write_frame(
        &mut send,
        &ControllerMsg::Hello(Hello::new("hostile 0.0.0")),
    )
    .await
    .expect("hello back");
    let ready: Option<AgentMsg> = read_frame(&mut recv).await.expect("ready");
    assert!(matches!(ready, Some(AgentMsg::Ready { .. })));
    Hostile {
        conn,
        dir,
        _agent: agent,
        _control: (send, recv),
    }
}

impl Hostile {
    /// Sends one sync whose delta is `ops` (computed against the agent's empty tree) and
    /// whose content stream is `tar` verbatim; returns the agent's answer.
    async fn sync(&self, ops: Vec<Op>, tar: Vec<u8>, delta_bytes: Option<u64>) -> SyncDone {
        let run: RunId = RunId::from_random([7; 6]);
        let (mut send, mut recv) = self.conn.open_bi().await.expect("stream");
        let open = SyncOpen {
            run,
            known_root: None,
            create: true,
        };
        write_frame(&mut send, &BulkOpen::Sync(open))
            .await
            .expect("open");
        let have: SyncHave = read_frame(&mut recv).await.expect("have").expect("have");
        let mut manifest = vec![0u8; have.manifest_bytes as usize];
        recv.read_exact(&mut manifest).await.expect("manifest");
        // The tree the ops claim to produce, so only their content is wrong.
        let mut target = Manifest::default();
        for op in &ops {
            let entry = match op {
                Op::Write {
                    hash, size_bytes, ..
                } => Entry::File {
                    hash: *hash,
                    size_bytes: *size_bytes,
                    executable: false,
                },
                Op::Symlink { target, .. } => Entry::Symlink {
                    target: target.clone(),
                },
                _ => Entry::Dir,
            };
            target.entries.insert(op.path().to_owned(), entry);
        }
        let delta = Delta {
            base: Manifest::default().root(),
            target: target.root(),
            ops,
        };
        let blob = protocol::codec::encode_blob(&delta).expect("encode");
        let go = SyncGo::Apply {
            delta_bytes: delta_bytes.unwrap_or(blob.len() as u64),
            restart: false,
        };
        write_frame(&mut send, &go).await.expect("go");
        let mut raw = blob;
        raw.extend(tar);
        let compressed = zstd::encode_all(&raw[..], 3).expect("zstd");
        let _ = send.write_all(&compressed).await;
        let _ = send.finish();
        read_frame(&mut recv).await.expect("done").expect("done")
    }

    fn assert_untouched(&self) {
        let mut found = Vec::new();
        find_named(self.dir.path(), "evil", &mut found);
        assert!(found.is_empty(), "written: {found:?}");
        assert!(!self.dir.path().parent().expect("tmp").join("evil").exists());
    }
}

fn find_named(dir: &std::path::Path, name: &str, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name() == name {
            out.push(entry.path());
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            find_named(&entry.path(), name, out);
        }
    }
}

fn tar_entry(name: &str, kind: tar::EntryType, data: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, data).expect("append");
    builder.into_inner().expect("finish")
}

fn write_op(path: &str, data: &[u8]) -> Op {
    Op::Write {
        path: path.to_owned(),
        hash: ContentHash::of(data),
        size_bytes: data.len() as u64,
        executable: false,
        source: Source::Stream,
    }
}

fn check(done: &SyncDone, expected: &str) {
    let err = done.result.as_ref().expect_err(expected);
    assert_eq!(err.kind, protocol::ErrorKind::SyncFailed, "{err:?}");
    assert!(err.message.contains(expected), "{}", err.message);
}

#[tokio::test]
async fn hostile_sync_streams_are_refused_over_the_wire() {
    let h = hostile_controller().await;
    let data = b"evil payload";
    let entry = tar_entry("0", tar::EntryType::Regular, data);

    let done = h
        .sync(vec![write_op("../evil", data)], entry.clone(), None)
        .await;
    check(&done, "escapes the work tree");
    let done = h
        .sync(vec![write_op("/tmp/evil", data)], entry.clone(), None)
        .await;
    check(&done, "escapes the work tree");
    let link = Op::Symlink {
        path: "evil".into(),
        target: "../../../../etc/passwd".into(),
    };
    check(
        &h.sync(vec![link], Vec::new(), None).await,
        "points outside",
    );

    let through = vec![
        Op::Mkdir { path: "d".into() },
        Op::Symlink {
            path: "l".into(),
            target: "d".into(),
        },
        write_op("l/evil", data),
    ];
    let done = h.sync(through, entry.clone(), None).await;
    check(&done, "its parent is not a directory");

    let device = tar_entry("0", tar::EntryType::Char, b"");
    let done = h.sync(vec![write_op("evil", data)], device, None).await;
    check(&done, "only regular files");
    let renamed = tar_entry("../evil", tar::EntryType::Regular, data);
    let done = h.sync(vec![write_op("evil", data)], renamed, None).await;
    check(&done, "is not the content");

    let done = h.sync(Vec::new(), Vec::new(), Some(u64::MAX)).await;
    check(&done, "unpacks to more than");
    h.assert_untouched();
}

impl Hostile {
    /// Opens a stream with `open` (already encoded as a frame) and returns the stream.
    async fn open_raw(&self, frame: &[u8]) -> (quinn::SendStream, quinn::RecvStream) {
        let (mut send, recv) = self.conn.open_bi().await.expect("stream");
        send.write_all(frame).await.expect("open");
        (send, recv)
    }

    async fn open(&self, open: &BulkOpen) -> (quinn::SendStream, quinn::RecvStream) {
        self.open_raw(&protocol::codec::encode(open).expect("encode"))
            .await
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("state/audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

fn copy_open(path: &str) -> protocol::streams::CopyOpen {
    protocol::streams::CopyOpen {
        place: protocol::streams::Place::Home,
        path: path.into(),
        who: "mallory@elsewhere".into(),
    }
}

fn zstd_of(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 1).expect("zstd")
}

#[tokio::test]
async fn hostile_access_streams_are_refused_over_the_wire() {
    use protocol::ErrorKind;
    use protocol::streams::*;
    let policy = protocol::agent_config::Access {
        allow_shell: false,
        ..Default::default()
    };
    let h = hostile_controller_with(policy).await;
    let bound = Duration::from_secs(10);

    // A stream kind from the future: answered "unsupported", not dropped or hung.
    let (_send, mut recv) = h.open_raw(&[0, 0, 0, 1, 99]).await;
    let answer: Option<AgentMsg> = tokio::time::timeout(bound, read_frame(&mut recv))
        .await
        .expect("answered in time")
        .expect("a frame");
    match answer {
        Some(AgentMsg::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::Unsupported);
            assert!(
                e.message.contains("does not know this kind of stream"),
                "{}",
                e.message
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Exec and shell are off.
    let exec = BulkOpen::Exec(ExecOpen {
        place: Place::Home,
        argv: vec!["touch".into(), "/tmp/runctl-hostile-exec".into()],
        tty: None,
        term: None,
        stdin: false,
        who: "mallory@elsewhere".into(),
    });
    let (_send, mut recv) = h.open(&exec).await;
    match read_frame::<_, ExecOutput>(&mut recv).await.expect("frame") {
        Some(ExecOutput::Started(Err(e))) => assert_eq!(e.kind, ErrorKind::Forbidden),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!std::path::Path::new("/tmp/runctl-hostile-exec").exists());

    // A forward beyond the loopback, checked or not.
    for check_only in [true, false] {
        let forward = BulkOpen::Forward(ForwardOpen {
            host: "10.255.0.1".into(),
            port: 22,
            check_only,
            who: "mallory@elsewhere".into(),
        });
        let (_send, mut recv) = h.open(&forward).await;
        let ready: ForwardReady = read_frame(&mut recv).await.expect("frame").expect("answer");
        assert_eq!(
            ready.result.expect_err("refused").kind,
            ErrorKind::Forbidden
        );
    }

    // Copies out of the home, or from outside the roots.
    for path in ["../state/identity", "/etc/passwd", "../../.."] {
        let (_send, mut recv) = h.open(&BulkOpen::CopyOut(copy_open(path))).await;
        let head: CopyHead = read_frame(&mut recv).await.expect("frame").expect("answer");
        let e = head.result.expect_err(path);
        assert_eq!(e.kind, ErrorKind::Forbidden, "{path}: {e:?}");
    }

    // A copy in whose tar climbs out, or holds another name, or lies about its size:
    // refused once its bytes show it, with nothing written anywhere.
    let source = CopySource {
        name: "outputs".into(),
        kind: CopyKind::Dir,
        bytes: 12,
        files: 1,
    };
    let cases: Vec<(&str, Vec<u8>, CopySource)> = vec![
        (
            "climbs out",
            tar_entry(
                "outputs/../../evil",
                tar::EntryType::Regular,
                b"evil payload",
            ),
            source.clone(),
        ),
        (
            "another name",
            tar_entry("evil", tar::EntryType::Regular, b"evil payload"),
            source.clone(),
        ),
        (
            "a device",
            tar_entry("outputs/evil", tar::EntryType::Char, b""),
            source.clone(),
        ),
        (
            "larger than announced",
            tar_entry("outputs/evil", tar::EntryType::Regular, &vec![0u8; 8 << 20]),
            source.clone(),
        ),
    ];
    for (what, tar, source) in cases {
        let (mut send, mut recv) = h.open(&BulkOpen::CopyIn(copy_open("landing"))).await;
        write_frame(&mut send, &CopyInHead { source })
            .await
            .expect("head");
        let ready: CopyReady = read_frame(&mut recv).await.expect("frame").expect("ready");
        assert!(ready.result.is_ok(), "{what}: {ready:?}");
        // The agent may stop reading as soon as it has seen enough.
        let _ = send.write_all(&zstd_of(&tar)).await;
        let _ = send.finish();
        let done: CopyDone = tokio::time::timeout(bound, read_frame(&mut recv))
            .await
            .expect("answered in time")
            .expect("frame")
            .expect("done");
        assert!(done.result.is_err(), "{what}: {done:?}");
        let home = h.dir.path().join("home");
        let left: Vec<_> = std::fs::read_dir(&home).expect("ls").flatten().collect();
        assert!(left.is_empty(), "{what}: left {left:?}");
        let mut found = Vec::new();
        find_named(h.dir.path(), "evil", &mut found);
        assert!(found.is_empty(), "{what}: written {found:?}");
    }
    // A copy in to a path outside the roots is refused before any byte.
    let (mut send, mut recv) = h.open(&BulkOpen::CopyIn(copy_open("/etc/evil"))).await;
    write_frame(
        &mut send,
        &CopyInHead {
            source: source.clone(),
        },
    )
    .await
    .expect("head");
    let ready: CopyReady = read_frame(&mut recv).await.expect("frame").expect("ready");
    assert_eq!(
        ready.result.expect_err("outside").kind,
        ErrorKind::Forbidden
    );

    // Each is a line in the audit log, with who asked.
    let audit = h.audit();
    assert_eq!(audit.len(), 11, "{audit:?}");
    assert!(
        audit.iter().all(|l| l["who"] == "mallory@elsewhere"),
        "{audit:?}"
    );
    let refused = audit
        .iter()
        .filter(|l| l["end"].as_str().is_some_and(|e| e.starts_with("refused")))
        .count();
    assert_eq!(refused, 1 + 2 + 3 + 1, "{audit:?}");
}
