//! Media as encrypted blobs. A client encrypts an attachment with a random key, asks for a grant
//! over its connection (`MediaUploadRequest{size, sha256, content_type}`), PUTs the ciphertext
//! to the granted URL on the node's media listener, and sends the download URL, the key and the
//! hash in its (end-to-end encrypted) message. The node never sees a key.
//!
//! - [`url`]: the pre-signed URLs (HMAC-SHA256 over method, id, size, device and expiry).
//! - [`store`]: where blobs live: a local directory or S3-compatible object storage.
//! - [`http`]: the media HTTP listener: PUT verifies size and hash while it streams and commits
//!   only then; GET serves byte ranges.
//!
//! Blobs are content-addressed: the id is the hex SHA-256 of the ciphertext, so identical
//! ciphertext is stored once (a second upload of it replaces it with the same bytes and renews
//! its upload time). A blob lives [`BLOB_TTL_MS`] (30 days) from its last upload; a periodic
//! sweep ([`Media::sweep`]) deletes older ones. Grants are charged to the device's media budget
//! ([`crate::budgets::Charge::MediaUpload`]).

pub mod http;
pub mod store;
pub mod url;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use ringpost_wire::limits::{MEDIA_BYTES_MAX, MEDIA_SHA256_BYTES};
use ringpost_wire::{DeviceId, ErrorCode, MediaUploadGrant, MediaUploadRequest, UserId};

use self::store::{BlobStore, StoreConfig};
use self::url::{Grant, UrlSigner};

/// How long an upload URL is accepted after its grant (15 minutes).
pub const UPLOAD_URL_TTL_MS: u64 = 15 * 60 * 1000;
/// How long a blob lives after its upload, and a download URL after its grant (30 days).
pub const BLOB_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// How often expired blobs are deleted.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);
/// Uploads a device may be granted per hour (the burst is the same).
pub const MEDIA_UPLOADS_PER_HOUR_DEFAULT: u32 = 100;

/// Media settings of a node.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// The media listener's URL as clients reach it (`http://host:port`, or the https URL of a
    /// proxy in front of it); at most [`url::MEDIA_BASE_URL_BYTES_MAX`] bytes.
    pub public_url: String,
    pub store: StoreConfig,
    /// The HMAC key of the URLs (at least 16 bytes); see [`url_key`].
    pub url_key: Vec<u8>,
    /// Largest blob granted (at most [`MEDIA_BYTES_MAX`]).
    pub blob_bytes_max: u64,
    pub upload_url_ttl_ms: u64,
    pub blob_ttl_ms: u64,
    /// A media connection whose answer the client has read nothing of for this long is closed
    /// (default [`http::MEDIA_WRITE_STALL_TIMEOUT`], 30 s).
    pub write_stall_ms: u64,
    /// A local store grants and takes an upload only if its filesystem keeps at least this much
    /// free after it, so media never fills the disk the node's database is on (default
    /// [`LOCAL_FREE_BYTES_MIN_DEFAULT`]). Object storage has no such check.
    pub local_free_bytes_min: u64,
}

/// See [`MediaConfig::local_free_bytes_min`]: 2 GiB.
pub const LOCAL_FREE_BYTES_MIN_DEFAULT: u64 = 2 << 30;

impl MediaConfig {
    /// Checks what [`Media::new`] checks, without opening a local store (which creates its
    /// directories): the blob limit, the public URL and the key; an S3 store's client is built
    /// (that reaches no network). For `ringpost-node run --check-config`.
    pub fn check(&self) -> Result<(), String> {
        self.signer()?;
        if let StoreConfig::S3(_) = &self.store {
            BlobStore::open(&self.store)?;
        }
        Ok(())
    }

    /// The URL signer, after the checks of everything but the store.
    fn signer(&self) -> Result<UrlSigner, String> {
        if self.blob_bytes_max == 0 || self.blob_bytes_max > MEDIA_BYTES_MAX {
            return Err(format!(
                "the media blob limit must be 1 to {MEDIA_BYTES_MAX} bytes, not {}",
                self.blob_bytes_max
            ));
        }
        UrlSigner::new(&self.url_key, &self.public_url)
    }

    pub fn new(public_url: String, store: StoreConfig, url_key: Vec<u8>) -> MediaConfig {
        MediaConfig {
            public_url,
            store,
            url_key,
            blob_bytes_max: MEDIA_BYTES_MAX,
            upload_url_ttl_ms: UPLOAD_URL_TTL_MS,
            blob_ttl_ms: BLOB_TTL_MS,
            write_stall_ms: http::MEDIA_WRITE_STALL_TIMEOUT.as_millis() as u64,
            local_free_bytes_min: LOCAL_FREE_BYTES_MIN_DEFAULT,
        }
    }
}

/// Milliseconds since the Unix epoch, as the media service sees them (tests move it).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The wall clock.
pub fn wall_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    })
}

/// Counters of the media service, rendered on `/metrics`.
#[derive(Debug, Default)]
pub struct MediaMetrics {
    pub grants: AtomicU64,
    pub uploads_stored: AtomicU64,
    pub uploads_refused: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub bytes_downloaded: AtomicU64,
    pub denied: AtomicU64,
    pub swept: AtomicU64,
    pub write_stalls: AtomicU64,
}

impl MediaMetrics {
    /// Appends the media metrics in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        for (name, help, v) in [
            (
                "ringpost_media_grants_total",
                "media upload grants given",
                &self.grants,
            ),
            (
                "ringpost_media_uploads_stored_total",
                "media uploads verified and committed",
                &self.uploads_stored,
            ),
            (
                "ringpost_media_uploads_refused_total",
                "media uploads refused for their size or hash, or failed",
                &self.uploads_refused,
            ),
            (
                "ringpost_media_uploaded_bytes_total",
                "bytes of committed media uploads",
                &self.bytes_uploaded,
            ),
            (
                "ringpost_media_downloaded_bytes_total",
                "bytes of media served",
                &self.bytes_downloaded,
            ),
            (
                "ringpost_media_denied_total",
                "media requests refused for a forged or expired URL",
                &self.denied,
            ),
            (
                "ringpost_media_blobs_expired_total",
                "blobs deleted by the expiry sweep",
                &self.swept,
            ),
            (
                "ringpost_media_write_stalls_total",
                "media connections closed because the client read nothing of the answer for write_stall_ms",
                &self.write_stalls,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
    }
}

/// Why a grant is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("an empty blob cannot be uploaded")]
    Empty,
    #[error("a blob of {size} bytes exceeds this node's media limit of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error("MediaUploadRequest.sha256 must be the 32-byte SHA-256 of the ciphertext")]
    BadHash,
    #[error("this node's media storage is full; try again later")]
    StorageFull,
}

impl GrantError {
    pub fn code(&self) -> ErrorCode {
        match self {
            GrantError::Empty | GrantError::BadHash => ErrorCode::Malformed,
            GrantError::TooLarge { .. } => ErrorCode::LimitExceeded,
            GrantError::StorageFull => ErrorCode::StorageUnavailable,
        }
    }
}

/// The media service of a node.
pub struct Media {
    config: MediaConfig,
    signer: UrlSigner,
    store: BlobStore,
    clock: Clock,
    pub metrics: MediaMetrics,
}

impl std::fmt::Debug for Media {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Media")
            .field("public_url", &self.config.public_url)
            .field("store", &self.config.store)
            .finish_non_exhaustive()
    }
}

impl Media {
    /// Opens the store and checks the configuration.
    pub fn new(config: MediaConfig, clock: Clock) -> Result<Arc<Media>, String> {
        let signer = config.signer()?;
        let store = BlobStore::open(&config.store)?;
        Ok(Arc::new(Media {
            config,
            signer,
            store,
            clock,
            metrics: MediaMetrics::default(),
        }))
    }

    pub fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    pub fn config(&self) -> &MediaConfig {
        &self.config
    }

    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// The URL signer (for tools and tests that sign URLs themselves).
    pub fn signer(&self) -> &UrlSigner {
        &self.signer
    }

    /// Whether `request` can be granted (checked before it is charged to a budget).
    pub fn check(&self, request: &MediaUploadRequest) -> Result<(), GrantError> {
        if request.size == 0 {
            return Err(GrantError::Empty);
        }
        if request.size > self.config.blob_bytes_max {
            return Err(GrantError::TooLarge {
                size: request.size,
                max: self.config.blob_bytes_max,
            });
        }
        if request.sha256.len() != MEDIA_SHA256_BYTES {
            return Err(GrantError::BadHash);
        }
        if !self.has_room(request.size) {
            return Err(GrantError::StorageFull);
        }
        Ok(())
    }

    /// The grant for `user`'s `device` to upload the blob `request` describes.
    pub fn grant(
        &self,
        user: UserId,
        device: DeviceId,
        request: &MediaUploadRequest,
    ) -> Result<MediaUploadGrant, GrantError> {
        self.check(request)?;
        let id = hex::encode(&request.sha256);
        let now = self.now_ms();
        let upload_expires = now.saturating_add(self.config.upload_url_ttl_ms);
        let upload_url = self.signer.url(
            &id,
            &Grant::Upload {
                size: request.size,
                user,
                device,
                expires_at_ms: upload_expires,
            },
        );
        let download_url = self.signer.url(
            &id,
            &Grant::Download {
                expires_at_ms: now.saturating_add(self.config.blob_ttl_ms),
            },
        );
        self.metrics.grants.fetch_add(1, Relaxed);
        Ok(MediaUploadGrant {
            media_id: id,
            upload_url,
            download_url,
            expires_at_ms: upload_expires,
        })
    }

    /// Whether the store takes a blob of `size` bytes now
    /// ([`MediaConfig::local_free_bytes_min`]).
    pub fn has_room(&self, size: u64) -> bool {
        match self.store.free_bytes() {
            Some(free) => free >= size.saturating_add(self.config.local_free_bytes_min),
            None => true,
        }
    }

    /// Deletes the blobs uploaded more than the blob lifetime before `now_ms`.
    pub async fn sweep(&self, now_ms: u64) -> Result<u64, store::StoreError> {
        let n = self.store.sweep(now_ms, self.config.blob_ttl_ms).await?;
        self.metrics.swept.fetch_add(n, Relaxed);
        Ok(n)
    }
}

/// Runs [`Media::sweep`] every [`SWEEP_INTERVAL`] at the time `now_ms` gives.
pub async fn sweep_periodically(media: Arc<Media>, now_ms: impl Fn() -> u64) {
    let mut every = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        every.tick().await;
        match media.sweep(now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "deleted expired media blobs"),
            Err(e) => tracing::warn!(error = %e, "the media expiry sweep failed"),
        }
    }
}

/// Key of the media URLs. With a cluster secret, derived from it, so every node signs and
/// verifies the same URLs (a client may download through any node of a shared bucket);
/// without one, 32 random bytes kept in `DATA_DIR/media-url.key`.
pub fn url_key(data_dir: &Path, cluster_secret: Option<&[u8]>) -> Result<Vec<u8>, String> {
    if let Some(secret) = cluster_secret {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        return Ok(ring::hmac::sign(&key, b"ringpost media url key v1")
            .as_ref()
            .to_vec());
    }
    let path = data_dir.join("media-url.key");
    match std::fs::read(&path) {
        Ok(k) if k.len() >= 16 => return Ok(k),
        Ok(_) => return Err(format!("{} is shorter than 16 bytes", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    }
    let key: [u8; 32] = rand::random();
    let tmp = data_dir.join("media-url.key.tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(&key)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(key.to_vec())
}
