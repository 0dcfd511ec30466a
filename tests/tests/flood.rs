//! An exposed daemon under a flood of unauthenticated QUIC connections (real daemon and
//! agent processes on loopback; the flood is this test, speaking QUIC through quinn): each
//! attempt completes the handshake without a certificate, sends `Hello` and the start of
//! a frame, and then sits on it. The daemon must stay small and keep serving a real agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use protocol::framed::write_frame;
use protocol::{AgentMsg, Hello};
use tests::{Home, stderr, stdout};

const ATTEMPTS: usize = 5000;
const IN_FLIGHT: usize = 500;
/// Generous: measured about a third of this (see BENCHMARKS.md).
const RSS_BOUND_KIB: u64 = 150 * 1024;

fn rss_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[derive(Debug, Default)]
struct Tally {
    handshaken: AtomicUsize,
    closed_by_daemon: AtomicUsize,
    refused: AtomicUsize,
}

async fn one(
    endpoint: quinn::Endpoint,
    addr: std::net::SocketAddr,
    client: quinn::ClientConfig,
    tally: Arc<Tally>,
) {
    let conn = match endpoint.connect_with(client, addr, protocol::tls::SERVER_NAME) {
        Ok(connecting) => match connecting.await {
            Ok(conn) => conn,
            Err(_) => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
        },
        Err(_) => return,
    };
    tally.handshaken.fetch_add(1, Ordering::Relaxed);
    if let Ok((mut send, _recv)) = conn.open_bi().await {
        let _ = write_frame(&mut send, &AgentMsg::Hello(Hello::new("flood"))).await;
        // The header of a big frame, then a little of its body, and never the rest.
        let _ = send.write_all(&60_000u32.to_be_bytes()).await;
        let _ = send.write_all(&[0u8; 1000]).await;
        if tokio::time::timeout(Duration::from_secs(30), conn.closed())
            .await
            .is_ok()
        {
            tally.closed_by_daemon.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn a_flood_of_strangers_leaves_the_daemon_small_and_serving() {
    let home = Home::new();
    assert!(home.run(&["launch", "--name", "real"]).status.success());
    let status = home.json(&["status"]);
    let addr: std::net::SocketAddr = status["quic_addr"]
        .as_str()
        .expect("addr")
        .parse()
        .expect("addr");
    let pin: protocol::Fingerprint = status["ca_sha256"]
        .as_str()
        .expect("ca")
        .parse()
        .expect("pin");
    let pid = home.daemon_pid().expect("daemon pid");
    let before = rss_kib(pid, "VmRSS:");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let flood = {
        let tally = tally.clone();
        rt.spawn(async move {
            let client = protocol::tls::client_config(pin, None).expect("client config");
            let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
            let mut tasks = tokio::task::JoinSet::new();
            // A few client endpoints, so the flood is not limited by one socket's driver.
            let endpoints: Vec<quinn::Endpoint> = (0..4)
                .map(|_| {
                    quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint")
                })
                .collect();
            for i in 0..ATTEMPTS {
                let permit = slots.clone().acquire_owned().await.expect("semaphore");
                let (endpoint, client, tally) =
                    (endpoints[i % 4].clone(), client.clone(), tally.clone());
                tasks.spawn(async move {
                    one(endpoint, addr, client, tally).await;
                    drop(permit);
                });
            }
            while tasks.join_next().await.is_some() {}
        })
    };

    // A real agent is served meanwhile: a run on it starts, streams and ends.
    std::thread::sleep(Duration::from_secs(2));
    let served_started = Instant::now();
    let out = home.run(&[
        "run",
        "--on",
        "real",
        "--",
        "echo",
        "served during the flood",
    ]);
    let served = served_started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "served during the flood");
    let during = rss_kib(pid, "VmRSS:");

    rt.block_on(flood).expect("flood");
    let took = started.elapsed();
    let peak = rss_kib(pid, "VmHWM:");
    let after = rss_kib(pid, "VmRSS:");
    eprintln!(
        "flood: {ATTEMPTS} attempts in {took:.1?} ({} handshaken, {} closed by the daemon, {} refused); \
         daemon RSS {} MiB before, {} MiB during, {} MiB peak, {} MiB after; a real run was served in {served:.2?}",
        tally.handshaken.load(Ordering::Relaxed),
        tally.closed_by_daemon.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        before / 1024,
        during / 1024,
        peak / 1024,
        after / 1024,
    );
    assert!(
        peak < RSS_BOUND_KIB,
        "the daemon peaked at {} MiB",
        peak / 1024
    );
    // Every stranger that got in was shown the door by the daemon's deadline.
    assert_eq!(
        tally.closed_by_daemon.load(Ordering::Relaxed),
        tally.handshaken.load(Ordering::Relaxed),
        "{tally:?}"
    );
    // And the daemon still serves after it.
    let out = home.run(&["run", "--on", "real", "--", "echo", "after"]);
    assert_eq!(stdout(&out).trim(), "after", "{}", stderr(&out));
}
