//! Media as encrypted blobs, over real sockets and real HTTP:
//! - a real `ringpost-node dev` process: grants over the client protocol, the SDK's encrypt,
//!   upload and ranged download, the per-device upload budget, and the size limit;
//! - the media service and its HTTP listener on 127.0.0.1:0 with a clock the test moves
//!   (expiry without sleeping), against the local directory and against a real S3-compatible
//!   server (moto, started by the test; see `media/moto.rs`).

use crate::e2e_harness as harness;
#[path = "media/moto.rs"]
mod moto;
#[path = "media/service.rs"]
mod service;

use bytes::Bytes;
use ringpost_client::media::{decrypt_media, download_media, encrypt_media, sha256, MediaError};
use ringpost_client::{dev, ClientConfig, ClientError, ErrorCode};
use ringpost_node::media::store::{S3Config, StoreConfig};

use harness::TestNode;
use service::Rig;

/// A dev node (its media listener on a free port, a local directory in its data dir).
fn media_node(extra: &[&str]) -> TestNode {
    TestNode::start_with(extra)
}

async fn register(node: &TestNode, phone: u64) -> ringpost_client::Client {
    let config = ClientConfig::new(node.url("ws")).with_ca_file(node.ca_file());
    dev::register_device(config, phone, node.codes_file())
        .await
        .unwrap_or_else(|e| panic!("registering {phone}: {e}"))
        .0
}

/// Blob files under the dev node's media directory.
fn blob_files(node: &TestNode) -> Vec<String> {
    let mut out = Vec::new();
    let blobs = node.dir.path().join("media").join("blobs");
    for fan in std::fs::read_dir(blobs).expect("media/blobs exists") {
        for f in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            out.push(f.unwrap().file_name().to_string_lossy().into_owned());
        }
    }
    out
}

#[tokio::test]
async fn an_encrypted_attachment_round_trips_through_a_dev_node() {
    let node = media_node(&[]);
    let alice = register(&node, 15551110001).await;
    let plaintext: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let sealed = encrypt_media(&plaintext).unwrap();
    let uploaded = alice
        .upload_media(sealed.ciphertext.clone(), "image/jpeg")
        .await
        .expect("upload");
    assert_eq!(uploaded.media_id, hex::encode(sealed.sha256));
    assert!(uploaded.download_url.len() <= 256);
    assert_eq!(blob_files(&node), vec![uploaded.media_id.clone()]);
    // The recipient downloads (here in two parts, as after an interrupted download), checks
    // the hash and decrypts.
    let first = download_media(&uploaded.download_url, ..500_000)
        .await
        .unwrap();
    let rest = download_media(&uploaded.download_url, 500_000..)
        .await
        .unwrap();
    let blob = [first, rest].concat();
    assert_eq!(sha256(&blob), sealed.sha256);
    assert_eq!(decrypt_media(&sealed.key, &blob).unwrap(), plaintext);
    // The same attachment sent again (same ciphertext) is stored once.
    let again = alice
        .upload_media(sealed.ciphertext.clone(), "image/jpeg")
        .await
        .unwrap();
    assert_eq!(again.media_id, uploaded.media_id);
    assert_eq!(blob_files(&node).len(), 1);
    // Nothing of the plaintext is on the node's disk.
    let stored = std::fs::read(
        node.dir
            .path()
            .join("media/blobs")
            .join(&uploaded.media_id[..2])
            .join(&uploaded.media_id),
    )
    .unwrap();
    assert_eq!(stored, sealed.ciphertext);
}

#[tokio::test]
async fn grants_are_limited_per_device_and_by_size() {
    let node = media_node(&["--media-uploads-per-hour", "2", "--media-bytes-max", "1000"]);
    let alice = register(&node, 15551110002).await;
    let bob = register(&node, 15551110003).await;
    let refused = |r: Result<_, ClientError>, code: ErrorCode| match r {
        Err(e) if e.code() == Some(code) => e.to_string(),
        other => panic!("expected {code:?}, got {other:?}"),
    };
    // Over the node's size limit, and an empty blob: refused, and not charged.
    let why = refused(
        alice.media_grant(1001, [1; 32], "").await,
        ErrorCode::LimitExceeded,
    );
    assert!(why.contains("1000"), "{why}");
    refused(
        alice.media_grant(0, [1; 32], "").await,
        ErrorCode::Malformed,
    );
    alice.media_grant(1000, [1; 32], "").await.expect("first");
    alice.media_grant(10, [2; 32], "").await.expect("second");
    let why = refused(
        alice.media_grant(10, [3; 32], "").await,
        ErrorCode::RateLimited,
    );
    assert!(why.contains("media uploads"), "{why}");
    // Another device's budget is its own.
    bob.media_grant(10, [3; 32], "").await.expect("bob's first");
    // Through the SDK the refusal is the server's error.
    match alice.upload_media(Bytes::from_static(b"x"), "").await {
        Err(MediaError::Client(e)) => assert_eq!(e.code(), Some(ErrorCode::RateLimited)),
        other => panic!("expected RateLimited, got {other:?}"),
    }
}

#[tokio::test]
async fn a_node_without_a_media_listener_says_so() {
    // `run` without --listen-media: no media.
    let node = TestNode::start_args(
        [
            "run",
            "--data-dir",
            "{dir}",
            "--listen-ws",
            "127.0.0.1:0",
            "--listen-admin",
            "127.0.0.1:0",
            "--codes-file",
            "{dir}/verification-codes.txt",
        ]
        .map(String::from)
        .to_vec(),
    );
    let alice = register(&node, 15551110004).await;
    match alice.media_grant(10, [1; 32], "").await {
        Err(e) => {
            assert_eq!(e.code(), Some(ErrorCode::NotImplemented));
            assert!(e.to_string().contains("media is not enabled"), "{e}");
        }
        Ok(g) => panic!("granted {g:?}"),
    }
}

// The local directory.

fn local() -> (tempfile::TempDir, StoreConfig) {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreConfig::Local {
        dir: dir.path().join("media"),
    };
    (dir, store)
}

#[tokio::test]
async fn local_round_trip_with_ranges() {
    let (_dir, store) = local();
    service::round_trip_with_ranges(&Rig::start(store).await).await;
}

#[tokio::test]
async fn local_wrong_hash_or_size_stores_nothing() {
    let (dir, store) = local();
    service::wrong_hash_or_size_stores_nothing(&Rig::start(store).await).await;
    let tmp = std::fs::read_dir(dir.path().join("media/tmp"))
        .unwrap()
        .count();
    assert_eq!(tmp, 0, "refused uploads leave no temporary file");
}

#[tokio::test]
async fn local_a_reader_that_reads_nothing_is_cut_off() {
    let (_dir, store) = local();
    let rig = Rig::start_with(store, |c| c.write_stall_ms = 1_000).await;
    service::a_reader_that_reads_nothing_is_cut_off(&rig).await;
}

#[tokio::test]
async fn local_a_full_store_refuses_grants_and_uploads() {
    let (dir, store) = local();
    let free = {
        let s = nix::sys::statvfs::statvfs(dir.path()).unwrap();
        s.blocks_available() as u64 * s.fragment_size() as u64
    };
    let rig = Rig::start_with(store, |c| {
        c.local_free_bytes_min = free.saturating_sub(64 << 20)
    })
    .await;
    service::a_full_local_store_refuses_grants_and_uploads(&rig).await;
}

#[tokio::test]
async fn local_forged_urls_are_refused() {
    let (_dir, store) = local();
    service::forged_urls_are_refused(&Rig::start(store).await).await;
}

#[tokio::test]
async fn local_identical_ciphertext_is_stored_once() {
    let (_dir, store) = local();
    service::identical_ciphertext_is_stored_once(&Rig::start(store).await).await;
}

#[tokio::test]
async fn local_urls_and_blobs_expire() {
    let (_dir, store) = local();
    service::urls_and_blobs_expire(&Rig::start(store).await).await;
}

// S3, against moto.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backend_passes_the_same_checks_against_a_real_s3_server() {
    let moto = tokio::task::spawn_blocking(moto::Moto::start)
        .await
        .unwrap();
    let store = |bucket: &str| {
        moto.create_bucket(bucket);
        StoreConfig::S3(S3Config {
            bucket: bucket.into(),
            endpoint: moto.endpoint.clone(),
            region: "us-east-1".into(),
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
        })
    };
    service::round_trip_with_ranges(&Rig::start(store("round-trip")).await).await;
    service::wrong_hash_or_size_stores_nothing(&Rig::start(store("refusals")).await).await;
    service::forged_urls_are_refused(&Rig::start(store("forged")).await).await;
    service::identical_ciphertext_is_stored_once(&Rig::start(store("dedup")).await).await;
    service::urls_and_blobs_expire(&Rig::start(store("expiry")).await).await;
    drop(moto);
}

/// Throughput of a 50 MiB blob on loopback through the local directory store (a measurement,
/// not a check; ignored by default):
/// `cargo nextest run -p ringpost-node --test media --run-ignored only --no-capture media_throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run it on purpose"]
async fn media_throughput_50_mib() {
    let (_dir, store) = local();
    let rig = Rig::start(store).await;
    let http = ringpost_client::media::MediaHttp::shared().unwrap();
    let data = service::blob(50 * 1024 * 1024);
    let mib = data.len() as f64 / (1024.0 * 1024.0);
    for round in 0..3 {
        let g = rig.grant(&data);
        let t = std::time::Instant::now();
        http.put(&g.upload_url, data.clone()).await.unwrap();
        let up = t.elapsed();
        let t = std::time::Instant::now();
        let back = http.get(&g.download_url, ..).await.unwrap();
        let down = t.elapsed();
        assert_eq!(back.len(), data.len());
        println!(
            "round {round}: upload {:.0} MiB/s ({:?}), download {:.0} MiB/s ({:?})",
            mib / up.as_secs_f64(),
            up,
            mib / down.as_secs_f64(),
            down
        );
    }
}
