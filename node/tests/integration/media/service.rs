//! The media service on real sockets: [`Media`] and its HTTP listener on 127.0.0.1:0 with a
//! clock the test moves, driven by the SDK's HTTP helpers. Each scenario takes a fresh store,
//! so the local directory and the S3 bucket run the same checks.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use bytes::Bytes;
use ringpost_client::media::{sha256, MediaError, MediaHttp};
use ringpost_node::media::store::StoreConfig;
use ringpost_node::media::{Media, MediaConfig, BLOB_TTL_MS, UPLOAD_URL_TTL_MS};
use ringpost_wire::{MediaUploadGrant, MediaUploadRequest};

const MINUTE: u64 = 60_000;
const DAY: u64 = 24 * 60 * MINUTE;

pub struct Rig {
    pub media: Arc<Media>,
    clock: Arc<AtomicU64>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Rig {
    pub async fn start(store: StoreConfig) -> Rig {
        Self::start_with(store, |_| {}).await
    }

    /// [`Rig::start`] with the configuration changed by `edit`.
    pub async fn start_with(store: StoreConfig, edit: impl FnOnce(&mut MediaConfig)) -> Rig {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let clock = Arc::new(AtomicU64::new(now));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let c = clock.clone();
        let mut config = MediaConfig::new(base, store, vec![42; 32]);
        edit(&mut config);
        let media = Media::new(config, Arc::new(move || c.load(SeqCst))).expect("media service");
        let server = tokio::spawn(ringpost_node::media::http::serve(listener, media.clone()));
        Rig {
            media,
            clock,
            server,
        }
    }

    pub fn now(&self) -> u64 {
        self.clock.load(SeqCst)
    }

    pub fn advance(&self, ms: u64) {
        self.clock.fetch_add(ms, SeqCst);
    }

    /// A grant for `blob` as device 1 of user 15550001.
    pub fn grant(&self, blob: &[u8]) -> MediaUploadGrant {
        self.media
            .grant(
                15550001,
                1,
                &MediaUploadRequest {
                    size: blob.len() as u64,
                    sha256: Bytes::copy_from_slice(&sha256(blob)),
                    content_type: "application/octet-stream".into(),
                },
            )
            .expect("grant")
    }

    pub async fn stored(&self) -> Vec<String> {
        self.media.store().list().await.expect("listing the store")
    }
}

fn http() -> &'static MediaHttp {
    MediaHttp::shared().expect("media http client")
}

/// Random bytes (a stand-in for ciphertext).
pub fn blob(len: usize) -> Bytes {
    let mut b = vec![0u8; len];
    for chunk in b.chunks_mut(8) {
        let r = rand::random::<u64>().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    Bytes::from(b)
}

#[track_caller]
fn status(result: Result<impl std::fmt::Debug, MediaError>, want: u16, contains: &str) {
    match result {
        Err(MediaError::Status { status, message }) => {
            assert_eq!(status, want, "{message}");
            assert!(message.contains(contains), "{message:?} lacks {contains:?}");
        }
        other => panic!("expected status {want}, got {other:?}"),
    }
}

/// Larger than one S3 part (5 MiB), so an S3 upload goes up in parts; not a multiple of any
/// buffer size.
pub const BIG: usize = 6 * 1024 * 1024 + 12_345;

pub async fn round_trip_with_ranges(rig: &Rig) {
    let data = blob(BIG);
    let g = rig.grant(&data);
    assert_eq!(g.media_id, hex::encode(sha256(&data)));
    assert_eq!(g.expires_at_ms, rig.now() + UPLOAD_URL_TTL_MS);
    http()
        .put(&g.upload_url, data.clone())
        .await
        .expect("upload");
    assert_eq!(rig.stored().await, vec![g.media_id.clone()]);
    let all = http().get(&g.download_url, ..).await.expect("download");
    assert!(all == data, "the whole blob comes back");
    let part = http()
        .get(&g.download_url, 1_000_000..2_500_000)
        .await
        .expect("a range");
    assert!(part == data.slice(1_000_000..2_500_000));
    // Resuming after an interruption: everything from an offset.
    let rest = http()
        .get(&g.download_url, (BIG - 777) as u64..)
        .await
        .unwrap();
    assert!(rest == data.slice(BIG - 777..));
    status(
        http().get(&g.download_url, BIG as u64..).await,
        416,
        "outside",
    );
}

/// A client that asks for a blob and reads nothing of it loses the connection once the
/// node's writes have been blocked for `write_stall_ms`; a client that reads gets it whole.
pub async fn a_reader_that_reads_nothing_is_cut_off(rig: &Rig) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Far more than loopback's socket buffers hold, so the node's writes block.
    let data = blob(48 << 20);
    let g = rig.grant(&data);
    http()
        .put(&g.upload_url, data.clone())
        .await
        .expect("upload");
    let url = g.download_url.strip_prefix("http://").expect("an http URL");
    let (host, path) = url.split_at(url.find('/').expect("a path"));
    let mut tcp = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while rig.media.metrics.write_stalls.load(SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled connection was never closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // What the socket buffers held arrives, then the end: never the whole blob.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got < data.len(), "{got} bytes read of {}", data.len());
    let all = http().get(&g.download_url, ..).await.expect("download");
    assert!(all == data, "a reading client gets it whole");
}

/// A local store whose filesystem would keep less than `local_free_bytes_min` free refuses
/// the grant (`StorageUnavailable`) and, for a grant made before it filled, the upload (507);
/// a blob that fits is granted and stored. `reserve` is the filesystem's free space less
/// 64 MiB, set by the caller.
pub async fn a_full_local_store_refuses_grants_and_uploads(rig: &Rig) {
    let small = blob(1024);
    let g = rig.grant(&small);
    http()
        .put(&g.upload_url, small.clone())
        .await
        .expect("a blob that fits");
    let big = blob(1024);
    let request = |size: u64| MediaUploadRequest {
        size,
        sha256: Bytes::copy_from_slice(&sha256(&big)),
        content_type: "application/octet-stream".into(),
    };
    // 96 MiB would leave less than the reserve.
    match rig.media.grant(15550001, 1, &request(96 << 20)) {
        Err(e) => assert_eq!(
            e.code(),
            ringpost_wire::ErrorCode::StorageUnavailable,
            "{e}"
        ),
        Ok(g) => panic!("granted {g:?}"),
    }
    // A grant given when there was room: its upload is refused once there is none.
    let url = rig.media.signer().url(
        &hex::encode(sha256(&big)),
        &ringpost_node::media::url::Grant::Upload {
            size: 96 << 20,
            user: 15550001,
            device: 1,
            expires_at_ms: rig.now() + MINUTE,
        },
    );
    status(http().put(&url, big).await, 507, "full");
    assert_eq!(rig.stored().await, vec![g.media_id]);
}

pub async fn wrong_hash_or_size_stores_nothing(rig: &Rig) {
    let data = blob(BIG);
    let g = rig.grant(&data);
    let mut other = data.to_vec();
    other[BIG / 2] ^= 1;
    status(
        http().put(&g.upload_url, Bytes::from(other)).await,
        400,
        "SHA-256",
    );
    status(
        http().put(&g.upload_url, data.slice(..BIG - 1)).await,
        400,
        "grant is for",
    );
    let mut longer = data.to_vec();
    longer.push(0);
    status(
        http().put(&g.upload_url, Bytes::from(longer)).await,
        400,
        "grant is for",
    );
    assert!(rig.stored().await.is_empty(), "nothing stored");
    status(http().get(&g.download_url, ..).await, 404, "no such media");
    // The same grant still takes the right bytes.
    http().put(&g.upload_url, data).await.expect("upload");
    assert_eq!(rig.stored().await.len(), 1);
}

pub async fn forged_urls_are_refused(rig: &Rig) {
    let data = blob(1000);
    let g = rig.grant(&data);
    http()
        .put(&g.upload_url, data.clone())
        .await
        .expect("upload");
    let flip_tag = |url: &str| {
        let (head, tag) = url.rsplit_once("&t=").unwrap();
        let mut tag = tag.to_string();
        let first = if tag.starts_with('A') { "B" } else { "A" };
        tag.replace_range(..1, first);
        format!("{head}&t={tag}")
    };
    status(
        http().put(&flip_tag(&g.upload_url), data.clone()).await,
        403,
        "forged",
    );
    status(
        http().get(&flip_tag(&g.download_url), ..).await,
        403,
        "forged",
    );
    // A larger size, another device, a later expiry: each breaks the signature.
    let bigger = g.upload_url.replace("s=1000&", "s=1001&");
    status(http().put(&bigger, blob(1001)).await, 403, "forged");
    let other_device = g.upload_url.replace("&d=15550001.1&", "&d=15550001.2&");
    status(http().put(&other_device, data.clone()).await, 403, "forged");
    let (head, _) = g.download_url.split_once("?e=").unwrap();
    let (_, tail) = g.download_url.split_once("&t=").unwrap();
    let later = format!("{head}?e={}&t={tail}", u64::MAX / 2);
    status(http().get(&later, ..).await, 403, "forged");
    // An upload URL does not download, nor a download URL upload.
    status(http().get(&g.upload_url, ..).await, 403, "");
    status(http().put(&g.download_url, data).await, 403, "");
}

pub async fn identical_ciphertext_is_stored_once(rig: &Rig) {
    let data = blob(50_000);
    let first = rig.grant(&data);
    http().put(&first.upload_url, data.clone()).await.unwrap();
    rig.advance(MINUTE);
    let second = rig.grant(&data);
    assert_eq!(first.media_id, second.media_id);
    http().put(&second.upload_url, data.clone()).await.unwrap();
    assert_eq!(rig.stored().await, vec![first.media_id.clone()], "one copy");
    // Both download URLs serve it.
    assert!(http().get(&first.download_url, ..).await.unwrap() == data);
    assert!(http().get(&second.download_url, ..).await.unwrap() == data);
}

pub async fn urls_and_blobs_expire(rig: &Rig) {
    let data = blob(4096);
    let late = rig.grant(&data);
    rig.advance(UPLOAD_URL_TTL_MS);
    status(
        http().put(&late.upload_url, data.clone()).await,
        403,
        "expired",
    );
    assert!(rig.stored().await.is_empty());
    let g = rig.grant(&data);
    http().put(&g.upload_url, data.clone()).await.unwrap();
    let uploaded = rig.now();
    // Within 30 days of its upload the sweep keeps it.
    assert_eq!(rig.media.sweep(uploaded + 29 * DAY).await.unwrap(), 0);
    assert_eq!(rig.stored().await.len(), 1);
    // The download URL lives as long as the blob.
    rig.advance(BLOB_TTL_MS - MINUTE);
    assert!(http().get(&g.download_url, ..).await.unwrap() == data);
    rig.advance(2 * MINUTE);
    status(http().get(&g.download_url, ..).await, 403, "expired");
    // Past 30 days the sweep deletes it, and a fresh download URL finds nothing.
    assert_eq!(
        rig.media
            .sweep(uploaded + BLOB_TTL_MS + 2 * MINUTE)
            .await
            .unwrap(),
        1
    );
    assert!(rig.stored().await.is_empty());
    let fresh = rig.grant(&data);
    status(
        http().get(&fresh.download_url, ..).await,
        404,
        "no such media",
    );
}
