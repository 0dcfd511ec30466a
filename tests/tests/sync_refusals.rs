//! A hostile controller against a real agent session over QUIC on loopback: every sync
//! stream that could reach outside the run's tree, smuggle special files or blow up in
//! size is refused with a message that crosses the wire, and nothing is written.

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
    let access = Arc::new(agent::access::Access::new(
        policy,
        &dir.path().join("state"),
        runs.clone(),
    ));
    let agent = tokio::spawn(async move {
        let connected = std::sync::atomic::AtomicBool::new(false);
        let (_stats_tx, stats) = tokio::sync::watch::channel(None);
        let (_closing_tx, closing) = tokio::sync::watch::channel(false);
        let _ = agent::session::serve(agent_conn, &runs, &access, &connected, stats, closing).await;
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
