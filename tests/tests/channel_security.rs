//! Adversarial tests of the agent channel against a real daemon on loopback: each asserts
//! the refusal and its message. The "agent" here is this test, speaking the protocol
//! through the same library the real agent uses.

use std::net::SocketAddr;
use std::time::Duration;

use controller::db::Db;
use protocol::framed::{read_frame, write_frame};
use protocol::tls::{self, CertificateAuthority, Identity};
use protocol::{
    AgentMsg, ControllerMsg, EnrollToken, ErrorKind, Fingerprint, Hello, InstanceName, RunCursor,
};
use tests::Home;

struct Controller {
    home: Home,
    addr: SocketAddr,
    pin: Fingerprint,
}

fn controller() -> Controller {
    let home = Home::new();
    let status = home.json(&["status"]);
    let addr = status["quic_addr"]
        .as_str()
        .expect("quic addr")
        .parse()
        .expect("socket addr");
    let pin = status["ca_sha256"]
        .as_str()
        .expect("ca")
        .parse()
        .expect("fingerprint");
    Controller { home, addr, pin }
}

impl Controller {
    fn db(&self) -> Db {
        Db::open(&self.home.path().join("state.db")).expect("open the daemon's database")
    }

    fn mint(&self, instance: &str, ttl: Duration) -> EnrollToken {
        let name: InstanceName = instance.parse().expect("valid name");
        let expires = controller::daemon::now_ms() + ttl.as_millis() as u64;
        self.db().mint_token(&name, expires).expect("mint")
    }

    async fn connect(
        &self,
        pin: Fingerprint,
        identity: Option<&Identity>,
    ) -> anyhow::Result<quinn::Connection> {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        let config = tls::client_config(pin, identity)?;
        Ok(endpoint
            .connect_with(config, self.addr, tls::SERVER_NAME)?
            .await?)
    }

    /// Opens the control stream, sends `msgs`, and collects answers until the controller
    /// ends the stream or closes the connection.
    async fn exchange(
        &self,
        conn: &quinn::Connection,
        msgs: &[AgentMsg],
    ) -> anyhow::Result<Vec<ControllerMsg>> {
        let (mut send, mut recv) = conn.open_bi().await?;
        for msg in msgs {
            write_frame(&mut send, msg).await?;
        }
        let mut answers = Vec::new();
        loop {
            match tokio::time::timeout(
                Duration::from_secs(10),
                read_frame::<_, ControllerMsg>(&mut recv),
            )
            .await?
            {
                Ok(Some(msg)) => answers.push(msg),
                Ok(None) => return Ok(answers),
                Err(e) if answers.is_empty() => return Err(e.into()),
                Err(_) => return Ok(answers),
            }
        }
    }

    /// Enrolls with `token`, returning the identity on success or the refusal.
    async fn enroll(&self, token: &EnrollToken) -> Result<Identity, protocol::WireError> {
        let (key_pem, csr_der) = tls::agent_key_and_csr().expect("csr");
        let conn = self
            .connect(self.pin, None)
            .await
            .expect("connect to enroll");
        let answers = self
            .exchange(
                &conn,
                &[
                    hello(),
                    AgentMsg::Enroll {
                        token: token.clone(),
                        csr_der,
                    },
                ],
            )
            .await
            .expect("exchange");
        for answer in answers {
            match answer {
                ControllerMsg::Enrolled { cert_der, .. } => {
                    return Ok(Identity {
                        cert_pem: tls::der_to_pem(&cert_der),
                        key_pem,
                    });
                }
                ControllerMsg::Error(e) => return Err(e),
                _ => {}
            }
        }
        panic!("enrollment got neither a certificate nor an error");
    }
}

fn hello() -> AgentMsg {
    AgentMsg::Hello(Hello::new("runctl-agent test"))
}

fn refusal(answers: &[ControllerMsg]) -> protocol::WireError {
    answers
        .iter()
        .find_map(|m| match m {
            ControllerMsg::Error(e) => Some(e.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("expected a refusal, got {answers:?}"))
}

#[tokio::test]
async fn a_token_enrolls_once_and_is_then_burnt() {
    let c = controller();
    let token = c.mint("agent-a", Duration::from_secs(60));
    let identity = c.enroll(&token).await.expect("first use enrolls");
    assert!(identity.cert_pem.contains("BEGIN CERTIFICATE"));

    let reused = c.enroll(&token).await.expect_err("second use is refused");
    assert_eq!(reused.kind, ErrorKind::TokenReused);
    assert_eq!(reused.message, "the enrollment token was already used");

    // The issued certificate opens an authenticated session.
    let conn = c
        .connect(c.pin, Some(&identity))
        .await
        .expect("mTLS connect");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    write_frame(&mut send, &hello()).await.expect("hello");
    let answer: ControllerMsg = read_frame(&mut recv)
        .await
        .expect("read")
        .expect("an answer");
    assert!(matches!(answer, ControllerMsg::Hello(_)), "{answer:?}");
}

#[tokio::test]
async fn expired_and_unknown_tokens_are_refused() {
    let c = controller();
    let expired = c.mint("agent-b", Duration::ZERO);
    let e = c.enroll(&expired).await.expect_err("expired");
    assert_eq!(e.kind, ErrorKind::TokenExpired);
    assert_eq!(e.message, "the enrollment token has expired");

    let unknown = EnrollToken::from_random([0x5a; 32]);
    let e = c.enroll(&unknown).await.expect_err("unknown");
    assert_eq!(e.kind, ErrorKind::TokenUnknown);
    assert_eq!(
        e.message,
        "the enrollment token is unknown to this controller"
    );
}

#[tokio::test]
async fn a_client_pinning_another_ca_refuses_the_controller() {
    let c = controller();
    let other = CertificateAuthority::generate().expect("ca");
    let err = c
        .connect(other.fingerprint(), None)
        .await
        .expect_err("pin mismatch");
    let text = format!("{err:#}");
    assert!(
        text.contains("does not match the pinned fingerprint"),
        "{text}"
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let c = controller();
    let rogue_ca = CertificateAuthority::generate().expect("ca");
    let (key_pem, csr) = tls::agent_key_and_csr().expect("csr");
    let cert = rogue_ca
        .sign_agent_csr(
            &csr,
            &"agent-c".parse().expect("name"),
            Duration::from_secs(3600),
        )
        .expect("sign");
    let identity = Identity {
        cert_pem: tls::der_to_pem(&cert),
        key_pem,
    };
    // quinn reports a rejected client certificate on the first stream use, not at connect.
    let result = match c.connect(c.pin, Some(&identity)).await {
        Err(e) => Err(e),
        Ok(conn) => {
            c.exchange(&conn, &[hello(), AgentMsg::Ready { runs: vec![] }])
                .await
        }
    };
    let err = result.expect_err("the handshake is refused");
    let text = format!("{err:#}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");
}

#[tokio::test]
async fn without_a_certificate_only_enrollment_is_allowed() {
    let c = controller();
    let conn = c.connect(c.pin, None).await.expect("connect");
    let answers = c
        .exchange(&conn, &[hello(), AgentMsg::Ready { runs: vec![] }])
        .await
        .expect("exchange");
    let e = refusal(&answers);
    assert_eq!(e.kind, ErrorKind::Unauthenticated);
    assert!(e.message.contains("it may only enroll"), "{}", e.message);
}

#[tokio::test]
async fn an_incompatible_protocol_version_is_refused_by_name() {
    let c = controller();
    let conn = c.connect(c.pin, None).await.expect("connect");
    let old = AgentMsg::Hello(Hello {
        protocol_version: 999,
        software: "runctl-agent 9.9.9".into(),
        features: vec![],
    });
    let e = refusal(&c.exchange(&conn, &[old]).await.expect("exchange"));
    assert_eq!(e.kind, ErrorKind::VersionMismatch);
    assert!(
        e.message.contains("runctl-agent 9.9.9 speaks 999"),
        "{}",
        e.message
    );
    assert!(
        e.message
            .contains(&format!("speaks {}", protocol::PROTOCOL_VERSION)),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn a_frame_over_the_size_limit_is_refused() {
    // Over the unauthenticated limit (64 KiB) though well under the session limit: a
    // stranger cannot make the daemon hold a big frame for it.
    for len in [
        protocol::MAX_FRAME_BYTES + 1,
        protocol::tls::MAX_UNAUTHENTICATED_FRAME_BYTES + 1,
    ] {
        frame_refused(len).await;
    }
}

#[tokio::test]
async fn a_stranger_that_never_finishes_hello_is_closed_by_the_deadline() {
    let c = controller();
    let conn = c.connect(c.pin, None).await.expect("connect");
    let (mut send, _recv) = conn.open_bi().await.expect("stream");
    // Half a frame header, then nothing.
    send.write_all(&[0, 0]).await.expect("write");
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(20), conn.closed()).await;
    assert!(closed.is_ok(), "the daemon closes a silent stranger");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "closed after {:?}",
        started.elapsed()
    );
}

async fn frame_refused(len: usize) {
    let c = controller();
    let conn = c.connect(c.pin, None).await.expect("connect");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let header = (len as u32).to_be_bytes();
    send.write_all(&header).await.expect("write header");
    send.write_all(&[0u8; 1024]).await.expect("write some body");
    let answer: ControllerMsg = read_frame(&mut recv)
        .await
        .expect("read")
        .expect("an answer");
    let ControllerMsg::Error(e) = answer else {
        panic!("expected a refusal, got {answer:?}")
    };
    assert_eq!(e.kind, ErrorKind::BadRequest);
    assert!(e.message.contains("exceeds the limit"), "{}", e.message);
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    assert!(closed.is_ok(), "the controller closes the connection");
}

#[tokio::test]
async fn a_terminated_instances_certificate_is_revoked() {
    let c = controller();
    assert!(c.home.run(&["launch", "--name", "victim"]).status.success());
    let identity = agent::identity::load(&c.home.path().join("local/victim/state"))
        .expect("read identity")
        .expect("the agent enrolled");
    assert!(c.home.run(&["terminate", "victim"]).status.success());

    let conn = c
        .connect(c.pin, Some(&identity))
        .await
        .expect("TLS still verifies");
    let e = refusal(&c.exchange(&conn, &[hello()]).await.expect("exchange"));
    assert_eq!(e.kind, ErrorKind::CertificateRevoked);
    assert!(e.message.contains("revoked"), "{}", e.message);
}

#[tokio::test]
async fn an_agent_cannot_act_on_another_instances_run() {
    let c = controller();
    assert!(c.home.run(&["launch", "--name", "owner"]).status.success());
    let started = c
        .home
        .json(&["run", "--on", "owner", "--detach", "--", "sleep", "30"]);
    let run: protocol::RunId = started["id"].as_str().expect("id").parse().expect("run id");

    let token = c.mint("intruder", Duration::from_secs(60));
    let identity = c.enroll(&token).await.expect("enroll");
    let conn = c.connect(c.pin, Some(&identity)).await.expect("connect");
    let forged = AgentMsg::Events {
        run: run.clone(),
        events: vec![protocol::RunEvent {
            seq: 1_000,
            at_ms: 0,
            kind: protocol::EventKind::Ended(protocol::RunEnd::Exited {
                code: 0,
                stop_requested: false,
            }),
        }],
    };
    let claim = AgentMsg::Ready {
        runs: vec![RunCursor {
            run: run.clone(),
            last_seq: 5,
            ended: false,
        }],
    };
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    for msg in [hello(), claim, forged] {
        write_frame(&mut send, &msg).await.expect("write");
    }
    let mut refused = None;
    for _ in 0..4 {
        match tokio::time::timeout(
            Duration::from_secs(10),
            read_frame::<_, ControllerMsg>(&mut recv),
        )
        .await
        {
            Ok(Ok(Some(ControllerMsg::Error(e)))) => {
                refused = Some(e);
                break;
            }
            Ok(Ok(Some(ControllerMsg::Hello(_)))) => continue,
            other => panic!("unexpected: {other:?}"),
        }
    }
    let e = refused.expect("a refusal");
    assert_eq!(e.kind, ErrorKind::NotYourRun);
    assert!(
        e.message.contains("does not belong to intruder"),
        "{}",
        e.message
    );
    let list = c.home.json(&["list"]);
    assert_eq!(
        list["runs"][0]["state"], "running",
        "the forged end changed nothing"
    );
    let stopped = c.home.json(&["stop", run.as_str()]);
    assert_eq!(stopped["state"], "stopped");
}

/// An enrolled agent played by the test: its session says `Hello` and `Ready`, keeps
/// reading its control stream, and notes whether the daemon ever opens a stream to it.
struct FakeAgent {
    _conn: quinn::Connection,
    control: tokio::task::JoinHandle<()>,
    opened: tokio::task::JoinHandle<bool>,
}

impl FakeAgent {
    async fn connect(c: &Controller, identity: &Identity, hello: Hello) -> FakeAgent {
        let conn = c.connect(c.pin, Some(identity)).await.expect("connect");
        let (mut send, mut recv) = conn.open_bi().await.expect("control");
        write_frame(&mut send, &AgentMsg::Hello(hello))
            .await
            .expect("hello");
        write_frame(&mut send, &AgentMsg::Ready { runs: vec![] })
            .await
            .expect("ready");
        let control = tokio::spawn(async move {
            while let Ok(Some(_)) = read_frame::<_, ControllerMsg>(&mut recv).await {}
            drop(send);
        });
        let opened = {
            let conn = conn.clone();
            tokio::spawn(async move { conn.accept_bi().await.is_ok() })
        };
        FakeAgent {
            _conn: conn,
            control,
            opened,
        }
    }

    fn was_opened(&self) -> bool {
        self.opened.is_finished()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.control.abort();
        self.opened.abort();
    }
}

/// An agent one protocol version older (no `streams` feature) is told "not supported" by
/// name, without a stream being opened to it; and a certificate of one instance never
/// receives another instance's streams.
#[tokio::test]
async fn streams_go_only_to_agents_that_serve_them_and_only_to_their_own_instance() {
    use controller::db::{InstanceRow, InstanceState};
    let c = controller();
    let old: InstanceName = "old-1".parse().expect("name");
    c.db()
        .insert_instance(&InstanceRow {
            name: old.clone(),
            provider: controller::provider::ProviderKind::Local,
            state: InstanceState::Running,
            created_ms: controller::daemon::now_ms(),
            terminated_ms: None,
            pid: None,
            for_run: None,
        })
        .expect("instance row");
    let identity = c
        .enroll(&c.mint("old-1", Duration::from_secs(60)))
        .await
        .expect("enroll");
    let previous = Hello {
        protocol_version: protocol::PROTOCOL_VERSION - 1,
        software: "runctl-agent 0.0.9".into(),
        features: vec![
            "carriers".into(),
            "store".into(),
            "store-credentials".into(),
        ],
    };
    let old_agent = FakeAgent::connect(&c, &identity, previous).await;
    let c = std::sync::Arc::new(c);
    let c2 = c.clone();
    let out = tokio::task::spawn_blocking(move || {
        c2.home
            .wait_until("old-1 to be connected", Duration::from_secs(20), || {
                c2.home.json(&["list"])["instances"]
                    .as_array()
                    .is_some_and(|all| {
                        all.iter()
                            .any(|i| i["instance"]["name"] == "old-1" && i["connected"] == true)
                    })
            });
        c2.home.run(&["exec", "old-1", "--", "true"])
    })
    .await
    .expect("exec");
    let err = tests::stderr(&out);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("does not support streams"), "{err}");

    // Nor is a run with a secret started on it: the value is never sent.
    let c2 = c.clone();
    let out = tokio::task::spawn_blocking(move || {
        c2.home
            .cli()
            .env("RUNCTL_TEST_SECRET", "s3cr3t-for-an-old-agent")
            .args([
                "run",
                "--on",
                "old-1",
                "--secret",
                "RUNCTL_TEST_SECRET",
                "--",
                "true",
            ])
            .output()
            .expect("run")
    })
    .await
    .expect("run");
    let err = tests::stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("cannot take --secret"), "{err}");
    assert!(err.contains("does not support secrets"), "{err}");
    assert!(err.contains("upgrade"), "{err}");
    assert!(
        !old_agent.was_opened(),
        "no stream was opened to the old agent"
    );

    // Another instance's certificate, on an agent that serves streams, gets nothing of
    // owner's run: exec reaches owner.
    let identity = c
        .enroll(&c.mint("intruder", Duration::from_secs(60)))
        .await
        .expect("enroll");
    let intruder = FakeAgent::connect(&c, &identity, Hello::new("runctl-agent test")).await;
    let c2 = c.clone();
    let (out, run) = tokio::task::spawn_blocking(move || {
        assert!(c2.home.run(&["launch", "--name", "owner"]).status.success());
        let started = c2
            .home
            .json(&["run", "--on", "owner", "--detach", "--", "sleep", "30"]);
        let run = started["id"].as_str().expect("id").to_owned();
        (
            c2.home
                .run(&["exec", &run, "--", "sh", "-c", "echo $RUNCTL_RUN_ID"]),
            run,
        )
    })
    .await
    .expect("exec");
    assert_eq!(
        tests::stdout(&out),
        format!("{run}\n"),
        "{}",
        tests::stderr(&out)
    );
    assert!(
        !intruder.was_opened(),
        "the intruder's session got no stream"
    );
    assert!(!old_agent.was_opened(), "nor did the old agent's");
}

#[test]
fn an_agents_certificate_is_renewed_over_its_session_before_it_expires() {
    // A 15-second certificate: renewed at 10 s, over the session, with no token (the
    // enrollment token is burnt); the old one then expires and the agent goes on.
    let home = Home::with_config("agent_cert_secs = 15\n");
    let launched = std::time::Instant::now();
    let out = home.run(&["launch", "--name", "renewer"]);
    assert!(out.status.success(), "{}", tests::stderr(&out));
    let state = home.path().join("local/renewer/state");
    let first = agent::identity::load(&state)
        .expect("read identity")
        .expect("the agent enrolled");
    let (from, until) = protocol::tls::validity(&first.cert_pem).expect("validity");
    assert_eq!(
        until - from,
        15 + tls::BACKDATE.as_secs(),
        "the configured lifetime"
    );
    home.wait_until("the certificate renewed", Duration::from_secs(30), || {
        agent::identity::load(&state)
            .ok()
            .flatten()
            .is_some_and(|now| now.cert_pem != first.cert_pem)
    });
    let renewed = agent::identity::load(&state)
        .expect("read identity")
        .expect("an identity");
    assert_ne!(renewed.key_pem, first.key_pem, "a new key too");
    let (new_from, _) = protocol::tls::validity(&renewed.cert_pem).expect("validity");
    assert!(
        new_from >= from + 8,
        "renewed two thirds in: {from} -> {new_from}"
    );
    // Past the first certificate's end, a new session (the daemon restarted) is made
    // with the renewed one, and the instance still runs runs.
    let left = Duration::from_secs(17).saturating_sub(launched.elapsed());
    std::thread::sleep(left);
    assert!(home.run(&["shutdown"]).status.success());
    let out = home.run(&[
        "run",
        "--on",
        "renewer",
        "--setup",
        "none",
        "--",
        "echo",
        "still here",
    ]);
    assert!(
        out.status.success() && tests::stdout(&out).contains("still here"),
        "{}\n{}",
        tests::stderr(&out),
        std::fs::read_to_string(home.path().join("daemon.log")).unwrap_or_default()
    );
    let log = std::fs::read_to_string(home.path().join("daemon.log")).unwrap_or_default();
    assert!(log.contains("renewed renewer's certificate"), "{log}");
}
