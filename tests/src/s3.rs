//! The S3 server the storage tests run against (SeaweedFS `weed mini`, started on loopback
//! by `scripts/test.sh`), and a TCP proxy in front of it that can cut connections, to make
//! a server drop mid-transfer on cue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Where the test S3 server is, from the environment `scripts/test.sh` sets.
#[derive(Debug, Clone)]
pub struct S3Env {
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

impl S3Env {
    /// The server, or `None` (with a loud SKIPPED line) when it is not running. Under
    /// `scripts/test.sh` (`RUNCTL_REQUIRE_S3=1`) a missing server fails the test instead.
    pub fn get(test: &str) -> Option<S3Env> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        match (
            var("RUNCTL_TEST_S3_ENDPOINT"),
            var("RUNCTL_TEST_S3_BUCKET"),
            var("AWS_ACCESS_KEY_ID"),
            var("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Some(endpoint), Some(bucket), Some(access_key), Some(secret_key)) => Some(S3Env {
                endpoint,
                bucket,
                access_key,
                secret_key,
            }),
            _ => {
                assert!(
                    var("RUNCTL_REQUIRE_S3").is_none(),
                    "{test}: RUNCTL_TEST_S3_ENDPOINT and friends are not set but the S3 server is required"
                );
                eprintln!("SKIPPED {test}: no S3 server (run scripts/test.sh, which starts one)");
                None
            }
        }
    }

    /// The `[storage]` section of a controller config for this server.
    pub fn config_toml(&self, endpoint: &str) -> String {
        format!(
            "[storage]\nbackend = \"s3\"\nendpoint_url = \"{endpoint}\"\nregion = \"us-east-1\"\nforce_path_style = true\n"
        )
    }

    /// The environment a CLI, daemon or agent needs for this server.
    pub fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// A fresh key prefix, so tests sharing the bucket never meet.
    pub fn unique_prefix(test: &str) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        format!(
            "t/{test}-{}-{}-{}/",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        )
    }
}

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Cut every connection once it has carried this many bytes from the server; new
    /// connections work (a flaky server: retries succeed).
    DropEachAfter(u64),
    /// After this many bytes from the server in all, cut everything and refuse every new
    /// connection (the server went away).
    DownAfter(u64),
    /// Accept connections and forward nothing (a hung server).
    Blackhole,
    /// Answer the first request of each of the next this many connections with S3's
    /// `503 SlowDown` and close it (a throttled bucket); later ones are forwarded.
    SlowDown(u64),
    /// The first connection to carry this many bytes to the server stops there: it
    /// reads nothing more from the client and forwards nothing either way, but stays
    /// open (a server, or a path, that hangs mid-upload). Other connections pass.
    StallUpOnceAfter(u64),
    /// Everything sent to the server, over all connections together, paced to this many
    /// bytes a second (a slow uplink); answers pass freely.
    ThrottleUp(u64),
    /// Everything the server sends, over all connections together, paced to this many
    /// bytes a second (a slow downlink).
    ThrottleDown(u64),
}

/// A loopback TCP proxy to `upstream` whose behaviour can be changed at any time.
#[derive(Debug, Clone)]
pub struct FaultProxy {
    pub addr: std::net::SocketAddr,
    fault: Arc<Mutex<Fault>>,
    total: Arc<AtomicU64>,
    slowed: Arc<AtomicU64>,
    stalled: Arc<AtomicU64>,
    /// Bytes sent to the server since the fault was set.
    up: Arc<AtomicU64>,
    /// When the throttled uplink is next free.
    paced: Arc<tokio::sync::Mutex<tokio::time::Instant>>,
}

impl FaultProxy {
    /// Starts the proxy on the current tokio runtime.
    pub async fn start(upstream: &str) -> FaultProxy {
        FaultProxy::start_on("127.0.0.1:0", upstream).await
    }

    /// [`FaultProxy::start`], listening on `bind` (e.g. an address a network namespace
    /// reaches).
    pub async fn start_on(bind: &str, upstream: &str) -> FaultProxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .expect("bind proxy");
        let proxy = FaultProxy {
            addr: listener.local_addr().expect("proxy addr"),
            fault: Arc::new(Mutex::new(Fault::Pass)),
            total: Arc::default(),
            slowed: Arc::default(),
            stalled: Arc::default(),
            up: Arc::default(),
            paced: Arc::new(tokio::sync::Mutex::new(tokio::time::Instant::now())),
        };
        let this = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let this = this.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move { this.serve(client, &upstream).await });
            }
        });
        proxy
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().expect("fault lock") = fault;
        self.total.store(0, Ordering::SeqCst);
        self.slowed.store(0, Ordering::SeqCst);
        self.stalled.store(0, Ordering::SeqCst);
        self.up.store(0, Ordering::SeqCst);
    }

    /// Bytes the server sent since the fault was set.
    pub fn sent_down(&self) -> u64 {
        self.total.load(Ordering::SeqCst)
    }

    /// Bytes sent to the server since the fault was set.
    pub fn sent_up(&self) -> u64 {
        self.up.load(Ordering::SeqCst)
    }

    /// How many connections have stalled since the fault was set.
    pub fn stalled(&self) -> u64 {
        self.stalled.load(Ordering::SeqCst)
    }

    /// How many requests were answered `SlowDown` since the fault was set.
    pub fn slowed_down(&self) -> u64 {
        self.slowed.load(Ordering::SeqCst)
    }

    fn fault(&self) -> Fault {
        *self.fault.lock().expect("fault lock")
    }

    async fn serve(&self, mut client: tokio::net::TcpStream, upstream: &str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        match self.fault() {
            Fault::DownAfter(limit) if self.total.load(Ordering::SeqCst) >= limit => return,
            Fault::Blackhole => {
                let mut sink = [0u8; 65536];
                while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            Fault::SlowDown(n) if self.slowed.fetch_add(1, Ordering::SeqCst) < n => {
                return slow_down(client).await;
            }
            Fault::SlowDown(n) => {
                self.slowed.store(n, Ordering::SeqCst);
            }
            _ => {}
        }
        let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
            return;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let hung = Arc::new(tokio::sync::Notify::new());
        let up = {
            let (this, hung) = (self.clone(), hung.clone());
            tokio::spawn(async move { this.forward_up(&mut cr, &mut sw, &hung).await })
        };
        let mut carried = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tokio::select! {
                read = sr.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                // The upload stalled: this connection hangs, both ways, until the fault
                // changes (the client must notice on its own).
                () = hung.notified() => {
                    while matches!(self.fault(), Fault::StallUpOnceAfter(_)) {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    break;
                }
            };
            let allowed = match self.fault() {
                Fault::Pass => n,
                Fault::DropEachAfter(limit) => (limit.saturating_sub(carried) as usize).min(n),
                Fault::DownAfter(limit) => {
                    let total = self.total.load(Ordering::SeqCst);
                    (limit.saturating_sub(total) as usize).min(n)
                }
                Fault::Blackhole => 0,
                Fault::SlowDown(_) | Fault::StallUpOnceAfter(_) | Fault::ThrottleUp(_) => n,
                Fault::ThrottleDown(rate) => {
                    self.pace(n, rate).await;
                    n
                }
            };
            if allowed > 0 && cw.write_all(&buf[..allowed]).await.is_err() {
                break;
            }
            carried += allowed as u64;
            self.total.fetch_add(allowed as u64, Ordering::SeqCst);
            if allowed < n {
                break; // cut mid-transfer
            }
        }
        up.abort();
    }

    /// Copies the client's bytes to the server; returns when the client is done, or
    /// without closing anything when this connection is the one to stall.
    async fn forward_up(
        &self,
        client: &mut tokio::net::tcp::OwnedReadHalf,
        server: &mut tokio::net::tcp::OwnedWriteHalf,
        hung: &tokio::sync::Notify,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut carried = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let allowed = match self.fault() {
                Fault::StallUpOnceAfter(limit) if self.stalled.load(Ordering::SeqCst) == 0 => {
                    (limit.saturating_sub(carried) as usize).min(n)
                }
                Fault::ThrottleUp(rate) => {
                    self.pace(n, rate).await;
                    n
                }
                _ => n,
            };
            if allowed > 0 && server.write_all(&buf[..allowed]).await.is_err() {
                break;
            }
            carried += allowed as u64;
            self.up.fetch_add(allowed as u64, Ordering::SeqCst);
            if allowed < n {
                if self.stalled.fetch_add(1, Ordering::SeqCst) == 0 {
                    hung.notify_one();
                    std::future::pending::<()>().await;
                }
                // Another connection stalled first: forward the rest.
                if server.write_all(&buf[allowed..n]).await.is_err() {
                    break;
                }
                carried += (n - allowed) as u64;
            }
        }
        let _ = server.shutdown().await;
    }

    /// Waits for the throttled uplink's turn to carry `n` bytes at `rate` bytes a second.
    async fn pace(&self, n: usize, rate: u64) {
        let took = std::time::Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
        let done = {
            let mut next = self.paced.lock().await;
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + took;
            *next
        };
        tokio::time::sleep_until(done).await;
    }
}

/// Reads a request's head and answers it as S3 does when a bucket is throttled.
async fn slow_down(mut client: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message><RequestId>FAULTPROXY</RequestId></Error>";
    let answer = format!(
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(answer.as_bytes()).await;
    let _ = client.shutdown().await;
}
