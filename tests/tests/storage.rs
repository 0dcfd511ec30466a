//! The storage engine against a real S3 server (SeaweedFS on loopback, started by
//! `scripts/test.sh`): multipart round trips, pagination, a server that drops connections
//! or goes away mid-transfer, a missing bucket, a disk that fills during a pull.

use std::path::Path;

use storage::transfer::{ContentHash, Engine, Tuning, part_size, verify_file};
use storage::{ObjectStore, Store, StoreConfig, StoreError};
use tests::SmallDisk;
use tests::s3::{Fault, FaultProxy, S3Env};

async fn store(endpoint: &str, bucket: &str) -> Store {
    let config = StoreConfig::S3 {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint.to_owned()),
        force_path_style: true,
        profile: None,
    };
    storage::connect(&config)
        .await
        .expect("connect")
        .bucket(bucket)
        .expect("bucket")
}

fn random_file(path: &Path, len: usize) {
    std::fs::write(path, tests::noise(len, len as u64)).expect("write");
}

fn file_hash(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).expect("read"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_multipart_round_trip_arrives_intact() {
    let Some(env) = S3Env::get("multipart round trip") else {
        return;
    };
    let prefix = S3Env::unique_prefix("round-trip");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("big.bin");
    random_file(&src, 200 << 20);
    let engine = Engine::new(store(&env.endpoint, &env.bucket).await, Tuning::default());
    let key = format!("{prefix}big.bin");
    let up = engine.upload_file(&src, &key).await.expect("upload");
    assert_eq!(up.size, 200 << 20);
    assert_eq!(
        up.hash.part_size,
        part_size(200 << 20, Tuning::default().part_size)
    );
    let meta = engine
        .store()
        .head(&key)
        .await
        .expect("head")
        .expect("exists");
    assert_eq!(meta.size, 200 << 20);
    let dest = dir.path().join("back/big.bin");
    let down = engine
        .download_file(&key, &dest, None)
        .await
        .expect("download");
    assert_eq!(down.fetched, 200 << 20);
    assert_eq!(file_hash(&src), file_hash(&dest));
    verify_file(&dest, &up.hash).expect("content hash matches");
    engine.delete_all(vec![key.clone()]).await.expect("delete");
    assert!(engine.store().head(&key).await.expect("head").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_follows_every_page() {
    let Some(env) = S3Env::get("pagination") else {
        return;
    };
    let prefix = S3Env::unique_prefix("pages");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut items = Vec::new();
    for i in 0..1_100 {
        let path = dir.path().join(format!("f{i:04}"));
        std::fs::write(&path, i.to_string()).expect("write");
        items.push((path, format!("{prefix}f{i:04}")));
    }
    let engine = Engine::new(store(&env.endpoint, &env.bucket).await, Tuning::default());
    engine.upload_all(items).await.expect("upload");
    let listing = engine.store().list(&prefix, false).await.expect("list");
    assert_eq!(
        listing.objects.len(),
        1_100,
        "ListObjectsV2 pages are 1,000 long"
    );
    let out = dir.path().join("out");
    let pulled = engine.download_prefix(&prefix, &out).await.expect("pull");
    assert_eq!((pulled.files, pulled.skipped), (1_100, 0));
    assert_eq!(std::fs::read(out.join("f1099")).expect("read"), b"1099");
    let again = engine.download_prefix(&prefix, &out).await.expect("pull");
    assert_eq!(
        (again.skipped, again.fetched),
        (1_100, 0),
        "present and identical"
    );
    let keys = listing.objects.into_iter().map(|o| o.key).collect();
    engine.delete_all(keys).await.expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dropping_connections_mid_transfer_costs_retries_not_data() {
    let Some(env) = S3Env::get("dropped connections") else {
        return;
    };
    let proxy = FaultProxy::start(&env.endpoint).await;
    let prefix = S3Env::unique_prefix("drops");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("mid.bin");
    random_file(&src, 40 << 20);
    let engine = Engine::new(
        store(&proxy.endpoint(), &env.bucket).await,
        Tuning::default(),
    );
    let key = format!("{prefix}mid.bin");
    engine.upload_file(&src, &key).await.expect("upload");
    // Every connection now dies 12 MiB into what the server sends: with 5 MiB parts on
    // kept-alive connections, the third part on each one is cut midway and retried on a
    // fresh connection; the download completes and is whole.
    proxy.set(Fault::DropEachAfter(12 << 20));
    let small_parts = Tuning {
        part_size: 5 << 20,
        download_part_size: 5 << 20,
        multipart_threshold: 5 << 20,
        ..Tuning::default()
    };
    let dest = dir.path().join("mid.out");
    let engine2 = Engine::new(engine.store().clone(), small_parts);
    engine2
        .download_file(&key, &dest, None)
        .await
        .expect("download with drops");
    assert_eq!(file_hash(&src), file_hash(&dest));
    proxy.set(Fault::Pass);
    engine.delete_all(vec![key]).await.expect("delete");
}

/// Uploads 40 MiB in 5 MiB parts through a fault proxy set to `fault`, within 120 s (a
/// fault must cost retries, never a hang), then reads it back past the proxy: the object
/// is whole and its content hash is the file's. The proxy, for its counters.
async fn upload_through(test: &str, fault: Fault) -> Option<FaultProxy> {
    let env = S3Env::get(test)?;
    let proxy = FaultProxy::start(&env.endpoint).await;
    let key = format!("{}faulty.bin", S3Env::unique_prefix("faulty"));
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("faulty.bin");
    random_file(&src, 40 << 20);
    proxy.set(fault);
    let small_parts = Tuning {
        part_size: 5 << 20,
        multipart_threshold: 5 << 20,
        ..Tuning::default()
    };
    let engine = Engine::new(store(&proxy.endpoint(), &env.bucket).await, small_parts);
    let started = std::time::Instant::now();
    let uploaded = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        engine.upload_file(&src, &key),
    )
    .await
    .expect("the upload was retried, not waited on forever")
    .expect("upload under the fault");
    eprintln!("{test}: the upload took {:?}", started.elapsed());
    let direct = Engine::new(store(&env.endpoint, &env.bucket).await, Tuning::default());
    let dest = dir.path().join("back.bin");
    direct
        .download_file(&key, &dest, None)
        .await
        .expect("download");
    assert_eq!(file_hash(&src), file_hash(&dest));
    assert_eq!(uploaded.size, 40 << 20);
    direct.delete_all(vec![key]).await.expect("delete");
    Some(proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_bucket_answering_slowdown_costs_retries_not_data() {
    // The first eight connections (the upload's first parts, in parallel, and their first
    // retries) are answered 503 SlowDown, as S3 throttles a busy prefix.
    let Some(proxy) = upload_through("slowdown", Fault::SlowDown(8)).await else {
        return;
    };
    assert_eq!(proxy.slowed_down(), 8, "the throttling happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_by_the_server_going_away_resumes_where_it_stopped() {
    let Some(env) = S3Env::get("resumed download") else {
        return;
    };
    let proxy = FaultProxy::start(&env.endpoint).await;
    let prefix = S3Env::unique_prefix("resume");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("data.bin");
    random_file(&src, 64 << 20);
    let tuning = Tuning {
        concurrency: 2,
        attempts: 2,
        download_part_size: 8 << 20,
        ..Tuning::default()
    };
    let engine = Engine::new(store(&proxy.endpoint(), &env.bucket).await, tuning);
    let key = format!("{prefix}data.bin");
    engine.upload_file(&src, &key).await.expect("upload");
    proxy.set(Fault::DownAfter(30 << 20));
    let dest = dir.path().join("pulled/data.bin");
    let err = engine
        .download_file(&key, &dest, None)
        .await
        .expect_err("the server went away");
    assert!(err.is_retryable(), "{err}");
    assert!(!dest.exists(), "nothing is presented as complete");
    proxy.set(Fault::Pass);
    let engine = Engine::new(engine.store().clone(), tuning);
    let down = engine
        .download_file(&key, &dest, None)
        .await
        .expect("resumed");
    assert!(
        down.fetched <= (64 << 20) - (16 << 20),
        "resumed with only the missing parts: fetched {} of {}",
        down.fetched,
        64 << 20
    );
    assert_eq!(file_hash(&src), file_hash(&dest));
    engine.delete_all(vec![key]).await.expect("delete");
}

// (scripts/test.sh starts SeaweedFS with -s3.autoCreateBucket=false: like S3, a PUT to a
// missing bucket is refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_named() {
    let Some(env) = S3Env::get("missing bucket") else {
        return;
    };
    let bucket = format!("runctl-missing-{}", std::process::id());
    let engine = Engine::new(store(&env.endpoint, &bucket).await, Tuning::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("x");
    std::fs::write(&src, b"x").expect("write");
    for err in [
        engine.store().list("", false).await.expect_err("list"),
        engine.store().head("x").await.expect_err("head"),
        engine.upload_file(&src, "x").await.expect_err("upload"),
        engine
            .download_file("x", &dir.path().join("y"), None)
            .await
            .expect_err("download"),
    ] {
        assert!(matches!(err, StoreError::NoSuchBucket { .. }), "{err:?}");
        assert!(err.to_string().contains(&bucket), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filling_during_a_pull_fails_clearly_and_presents_nothing() {
    let Some(env) = S3Env::get("disk full") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let small = dir.path().join("small");
    let Some(_disk) = SmallDisk::mount("disk full during a pull", &small, "24m") else {
        return;
    };
    let prefix = S3Env::unique_prefix("disk-full");
    let src = dir.path().join("big.bin");
    random_file(&src, 48 << 20);
    let engine = Engine::new(store(&env.endpoint, &env.bucket).await, Tuning::default());
    let key = format!("{prefix}big.bin");
    engine.upload_file(&src, &key).await.expect("upload");
    let err = engine
        .download_prefix(&prefix, &small)
        .await
        .expect_err("the disk is too small");
    assert!(err.to_string().contains("No space left"), "{err}");
    assert!(
        !small.join("big.bin").exists(),
        "no partial file under the real name"
    );
    engine.delete_all(vec![key]).await.expect("delete");
}

#[test]
fn content_hash_of_an_empty_file_is_stable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("empty");
    std::fs::write(&p, b"").expect("write");
    let a = ContentHash::of_file(&p, 8 << 20).expect("hash");
    let b = ContentHash::of_file(&p, 8 << 20).expect("hash");
    assert_eq!(a, b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_stalled_mid_part_is_abandoned_and_retried_not_hung() {
    // One part's connection hangs 3 MiB into its body: the server holds it open and reads
    // nothing more, as a wedged load balancer does. No error ever comes back on it.
    let Some(proxy) = upload_through("stalled upload", Fault::StallUpOnceAfter(3 << 20)).await
    else {
        return;
    };
    assert_eq!(proxy.stalled(), 1, "a part's connection stalled");
    proxy.set(Fault::Pass);
}
