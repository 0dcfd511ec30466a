//! Reaching the daemon by every carrier, on loopback with real processes: the agent pinned
//! to TLS over TCP, to a real `runctl-relay` over UDP and over TCP, a relay restarted
//! mid-run, and the refusals the relay and the channel owe strangers. (Paths decided by
//! the network itself, NAT and blocked UDP, are in `netns.rs`.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protocol::tls;
use tests::reach::{RelayProcess, ca, quic_port, repoint_agent, use_relay};
use tests::{Home, stderr, stdout};

fn wait_for_path(home: &Home, instance: &str, path: &str) {
    tests::reach::wait_for_path(home, instance, path, Duration::from_secs(30));
}

/// A small project to sync.
fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("train.py"),
        "import sys\nfor i in range(1, 51):\n    print(f'step {i}', flush=True)\nprint(open('data.txt').read().strip())\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("data.txt"), "payload-ok\n").expect("write");
    dir
}

fn run_on(home: &Home, instance: &str, root: &std::path::Path) {
    let out = home.run(&[
        "run",
        "--on",
        instance,
        "--root",
        &root.display().to_string(),
        "--workdir",
        &root.display().to_string(),
        "--",
        "python3",
        "train.py",
    ]);
    let (o, e) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "stdout: {o}\nstderr: {e}");
    let expected: Vec<String> = (1..=50)
        .map(|i| format!("step {i}"))
        .chain(["payload-ok".to_owned()])
        .collect();
    assert_eq!(o.lines().collect::<Vec<_>>(), expected, "stderr: {e}");
}

#[test]
fn an_agent_on_tcp_only_syncs_and_runs() {
    let home = Home::new();
    assert!(home.run(&["launch", "--name", "tcp1"]).status.success());
    wait_for_path(&home, "tcp1", "udp direct");
    let port = quic_port(&home);
    let _agent = repoint_agent(&home, "tcp1", &[format!("tcp://127.0.0.1:{port}")], None);
    wait_for_path(&home, "tcp1", "tcp direct");
    let root = project();
    run_on(&home, "tcp1", root.path());
    let list = home.json(&["list"]);
    assert!(
        list["instances"][0]["path"]["path"] == "tcp direct",
        "list shows the path: {list}"
    );
}

/// A home whose daemon registers with a fresh relay for its CA.
fn home_with_relay() -> (Home, RelayProcess) {
    let home = Home::new();
    let relay = RelayProcess::start(&ca(&home), "127.0.0.1:0", None, None);
    use_relay(&home, &relay.addr.to_string());
    (home, relay)
}

#[test]
fn runs_work_through_a_relay_over_udp_and_tcp() {
    let (home, relay) = home_with_relay();
    assert!(home.run(&["launch", "--name", "via1"]).status.success());
    let root = project();
    for (scheme, path) in [
        ("udp+relay", "udp via relay"),
        ("tcp+relay", "tcp via relay"),
    ] {
        let _agent = repoint_agent(&home, "via1", &[format!("{scheme}://{}", relay.addr)], None);
        wait_for_path(&home, "via1", path);
        run_on(&home, "via1", root.path());
    }
    let status = stdout(&home.run(&["status"]));
    assert!(status.contains("registered"), "{status}");
    assert!(status.contains("via1: tcp via relay, rtt"), "{status}");
}

#[test]
fn a_relay_restarted_mid_run_loses_and_duplicates_no_log_line() {
    let (home, relay) = home_with_relay();
    assert!(home.run(&["launch", "--name", "via2"]).status.success());
    let _agent = repoint_agent(
        &home,
        "via2",
        &[format!("udp+relay://{}", relay.addr)],
        None,
    );
    wait_for_path(&home, "via2", "udp via relay");
    let mut attached = tests::CountedRun::start(&home, &["--on", "via2"], 300, 0.02);
    attached.read(40);
    // The relay dies and comes back on the same port with the same identity; the daemon
    // re-registers and the agent's session comes back on its own.
    let ca = relay.ca.clone();
    let (state, addr) = relay.kill();
    std::thread::sleep(Duration::from_secs(1));
    let _relay = RelayProcess::start(&ca, &addr.to_string(), Some(state), None);
    attached.finish();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Registers with `relay` under `client` and says whether the relay answered (a refused
/// registration is closed without an answer).
async fn try_register(
    relay: SocketAddr,
    client: (&tls::Identity, &rustls::pki_types::CertificateDer<'static>),
) -> bool {
    let config =
        tls::outer_client_config(protocol::relay::ALPN_REGISTER, Some(client)).expect("config");
    let tcp = tokio::net::TcpStream::connect(relay)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from(tls::RELAY_NAME).expect("name");
    let Ok(mut stream) = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    else {
        return false;
    };
    let mut ping = Vec::new();
    protocol::relay::Frame::Ping.encode(&mut ping);
    let mut record = Vec::new();
    protocol::carrier::put_record(&mut record, &[&ping]).expect("fits");
    use tokio::io::AsyncWriteExt;
    if stream.write_all(&record).await.is_err() || stream.flush().await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    matches!(
        tokio::time::timeout(
            Duration::from_secs(5),
            protocol::carrier::read_record(&mut stream, &mut buf)
        )
        .await,
        Ok(Ok(true))
    )
}

#[test]
fn the_relay_refuses_strangers_and_cannot_pass_for_the_controller() {
    let home = Home::new();
    let pki = controller::pki::load_or_create(&home.path().join("pki")).expect("pki");
    let relay = RelayProcess::start(&ca(&home), "127.0.0.1:0", None, None);
    let rt = runtime();
    rt.block_on(async {
        // The controller's own registration certificate is accepted...
        assert!(try_register(relay.addr, (&pki.relay_client, pki.ca.cert_der())).await);
        // ...one from another CA is not...
        let other = tls::CertificateAuthority::generate().expect("ca");
        let foreign = other.issue_relay_client_identity().expect("identity");
        assert!(!try_register(relay.addr, (&foreign, other.cert_der())).await);
        // ...nor is an agent certificate from the right CA (it names an instance).
        let (key_pem, csr) = tls::agent_key_and_csr().expect("csr");
        let cert = pki
            .ca
            .sign_agent_csr(
                &csr,
                &"gpu-1".parse().expect("name"),
                Duration::from_secs(3600),
            )
            .expect("sign");
        let agent = tls::Identity {
            cert_pem: tls::der_to_pem(&cert),
            key_pem,
        };
        assert!(!try_register(relay.addr, (&agent, pki.ca.cert_der())).await);
        // ...nor the server certificate presented as a client.
        assert!(!try_register(relay.addr, (&pki.server, pki.ca.cert_der())).await);

        // The relay's own certificate, presented by a QUIC server, is not the controller.
        let relay_id = tls::Identity {
            cert_pem: std::fs::read_to_string(relay.state.path().join("relay.crt")).expect("crt"),
            key_pem: std::fs::read_to_string(relay.state.path().join("relay.key")).expect("key"),
        };
        let fake_ca = tls::CertificateAuthority::generate().expect("ca");
        let server = tls::server_config(&fake_ca, &relay_id).expect("server config");
        let fake = quinn::Endpoint::server(server, "127.0.0.1:0".parse().expect("addr"))
            .expect("endpoint");
        let fake_addr = fake.local_addr().expect("addr");
        let accepting = fake.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                tokio::spawn(async move {
                    let _ = incoming.await;
                });
            }
        });
        let client = tls::client_config(pki.ca.fingerprint(), None).expect("client");
        let dial = agent::dial::attempt(
            &format!("udp://{fake_addr}").parse().expect("endpoint"),
            client,
        )
        .await;
        let err = dial.expect_err("the relay's certificate must not pass for the controller");
        assert!(format!("{err:#}").contains("pinned fingerprint"), "{err:#}");
    });
}

#[test]
fn an_agent_certificate_from_another_ca_gets_no_session_through_the_relay() {
    let (home, relay) = home_with_relay();
    let pin: protocol::Fingerprint = ca(&home).parse().expect("fingerprint");
    let other = tls::CertificateAuthority::generate().expect("ca");
    let (key_pem, csr) = tls::agent_key_and_csr().expect("csr");
    let cert = other
        .sign_agent_csr(
            &csr,
            &"gpu-1".parse().expect("name"),
            Duration::from_secs(3600),
        )
        .expect("sign");
    let foreign = tls::Identity {
        cert_pem: tls::der_to_pem(&cert),
        key_pem,
    };
    let rt = runtime();
    rt.block_on(async {
        for scheme in ["udp+relay", "tcp+relay"] {
            let client = tls::client_config(pin, Some(&foreign)).expect("client");
            let endpoint = format!("{scheme}://{}", relay.addr)
                .parse()
                .expect("endpoint");
            // The handshake may complete on the client's side; the refusal shows on the
            // first stream operation (quinn reports a rejected client certificate there).
            let refused = match agent::dial::attempt(&endpoint, client).await {
                Err(_) => true,
                Ok(dialed) => {
                    let (mut send, mut recv) = match dialed.conn.open_bi().await {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                    let hello = protocol::AgentMsg::Hello(protocol::Hello::new("test"));
                    let _ = protocol::framed::write_frame(&mut send, &hello).await;
                    tokio::time::timeout(
                        Duration::from_secs(10),
                        protocol::framed::read_frame::<_, protocol::ControllerMsg>(&mut recv),
                    )
                    .await
                    .map_or(true, |r| {
                        !matches!(r, Ok(Some(protocol::ControllerMsg::Hello(_))))
                    })
                }
            };
            assert!(
                refused,
                "{scheme}: a foreign agent certificate got a session"
            );
        }
    });
}
