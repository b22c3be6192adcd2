//! Where blobs live: a local directory (the default) or S3-compatible object storage through
//! `object_store`. Both take an upload as a stream of chunks that is committed only once the
//! caller has checked its size and hash, and serve byte ranges.
//!
//! Local layout: `DIR/blobs/ab/abcd…` (the id's first two hex digits fan the files out) and
//! `DIR/tmp/` for uploads in progress (emptied at start). A commit is fsync of the file, its
//! modification time set to the upload time (what the expiry sweep reads), rename into place,
//! fsync of the directory. S3: objects `blobs/<id>`; a blob up to [`S3_SINGLE_PUT_BYTES_MAX`] is
//! buffered and put at once, a larger one goes up as a multipart upload that is completed at
//! commit or aborted (S3 shows nothing of an incomplete multipart upload).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt};
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// Bytes a local upload buffers before writing to its temporary file.
pub const LOCAL_WRITE_BUFFER_BYTES: usize = 256 * 1024;
/// Bytes of one chunk of a local download.
pub const LOCAL_READ_CHUNK_BYTES: usize = 64 * 1024;
/// Blobs up to this size are buffered in memory and put to S3 in one request; larger ones are
/// uploaded in parts of this size. Worst case per upload in flight: this much buffered, plus
/// [`S3_PARTS_IN_FLIGHT_MAX`] parts being sent.
pub const S3_SINGLE_PUT_BYTES_MAX: usize = 5 * 1024 * 1024;
/// Parts of one multipart upload sent at once.
pub const S3_PARTS_IN_FLIGHT_MAX: usize = 2;

/// A temporary upload file untouched this long is removed by the sweep (one hour; an upload
/// URL lives 15 minutes).
pub const TMP_STALE_MS: u64 = 3_600_000;

/// An S3-compatible bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// `http(s)://host:port` of an S3-compatible service; empty: AWS for `region`.
    pub endpoint: String,
    pub region: String,
    /// Empty: from the environment (`AWS_ACCESS_KEY_ID`, …), as object_store reads it.
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// Which backend, chosen in node.toml (`media_store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Local { dir: PathBuf },
    S3(S3Config),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("media storage io: {0}")]
    Io(#[from] std::io::Error),
    #[error("object storage: {0}")]
    Object(#[from] object_store::Error),
}

/// The blob storage of a node.
#[derive(Debug, Clone)]
pub enum BlobStore {
    Local(Arc<LocalDir>),
    S3(Arc<dyn ObjectStore>),
}

#[derive(Debug)]
pub struct LocalDir {
    blobs: PathBuf,
    tmp: PathBuf,
}

fn object_path(id: &str) -> object_store::path::Path {
    object_store::path::Path::from(format!("blobs/{id}"))
}

fn ms_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl BlobStore {
    /// Bytes an unprivileged writer may still use on the local directory's filesystem;
    /// `None` for object storage (no limit of ours) or if the filesystem cannot say.
    pub fn free_bytes(&self) -> Option<u64> {
        match self {
            BlobStore::Local(dir) => {
                let s = nix::sys::statvfs::statvfs(&dir.blobs).ok()?;
                Some((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
            }
            BlobStore::S3(_) => None,
        }
    }

    /// Opens (and for a local directory, creates) the store.
    pub fn open(config: &StoreConfig) -> Result<BlobStore, String> {
        match config {
            StoreConfig::Local { dir } => {
                let blobs = dir.join("blobs");
                let tmp = dir.join("tmp");
                std::fs::create_dir_all(&blobs)
                    .map_err(|e| format!("creating {}: {e}", blobs.display()))?;
                // Uploads a crash interrupted: never committed, never referenced.
                let _ = std::fs::remove_dir_all(&tmp);
                std::fs::create_dir_all(&tmp)
                    .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
                Ok(BlobStore::Local(Arc::new(LocalDir { blobs, tmp })))
            }
            StoreConfig::S3(c) => {
                // reqwest is built without a crypto provider of its own: ring, as everywhere
                // else in the node (an error only means one is installed already).
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&c.bucket)
                    .with_region(if c.region.is_empty() {
                        "us-east-1"
                    } else {
                        &c.region
                    });
                if !c.endpoint.is_empty() {
                    b = b
                        .with_endpoint(&c.endpoint)
                        .with_allow_http(c.endpoint.starts_with("http://"));
                }
                if !c.access_key_id.is_empty() {
                    b = b.with_access_key_id(&c.access_key_id);
                }
                if !c.secret_access_key.is_empty() {
                    b = b.with_secret_access_key(&c.secret_access_key);
                }
                let store = b
                    .build()
                    .map_err(|e| format!("configuring S3 bucket {:?}: {e}", c.bucket))?;
                Ok(BlobStore::S3(Arc::new(store)))
            }
        }
    }

    /// Starts an upload of blob `id` of `size` bytes.
    pub async fn begin(&self, id: &str, size: u64) -> Result<Upload, StoreError> {
        match self {
            BlobStore::Local(dir) => {
                let tmp = dir.tmp.join(format!("{id}.{:016x}", rand::random::<u64>()));
                let file = tokio::fs::File::create(&tmp).await?;
                Ok(Upload::Local {
                    dir: dir.clone(),
                    id: id.to_string(),
                    tmp,
                    file: tokio::io::BufWriter::with_capacity(LOCAL_WRITE_BUFFER_BYTES, file),
                })
            }
            BlobStore::S3(store) if size as usize <= S3_SINGLE_PUT_BYTES_MAX => {
                Ok(Upload::S3Small {
                    store: store.clone(),
                    id: id.to_string(),
                    buf: BytesMut::with_capacity(size as usize),
                })
            }
            BlobStore::S3(store) => {
                let upload = store.put_multipart(&object_path(id)).await?;
                Ok(Upload::S3Parts(Box::new(
                    object_store::WriteMultipart::new_with_chunk_size(
                        upload,
                        S3_SINGLE_PUT_BYTES_MAX,
                    ),
                )))
            }
        }
    }

    /// The size of blob `id`, or `None` when there is none.
    pub async fn size(&self, id: &str) -> Result<Option<u64>, StoreError> {
        match self {
            BlobStore::Local(dir) => match tokio::fs::metadata(dir.path(id)).await {
                Ok(m) => Ok(Some(m.len())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e.into()),
            },
            BlobStore::S3(store) => match store.head(&object_path(id)).await {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            },
        }
    }

    /// `len` bytes of blob `id` from `start` (within its size), as a stream of chunks.
    pub async fn read(
        &self,
        id: &str,
        start: u64,
        len: u64,
    ) -> Result<BoxStream<'static, Result<Bytes, std::io::Error>>, StoreError> {
        match self {
            BlobStore::Local(dir) => {
                let mut file = tokio::fs::File::open(dir.path(id)).await?;
                file.seek(std::io::SeekFrom::Start(start)).await?;
                let stream =
                    futures::stream::try_unfold((file, len), |(mut file, left)| async move {
                        if left == 0 {
                            return Ok(None);
                        }
                        let want = left.min(LOCAL_READ_CHUNK_BYTES as u64) as usize;
                        let mut buf = BytesMut::zeroed(want);
                        let n = file.read(&mut buf).await?;
                        if n == 0 {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "blob shorter than its size",
                            ));
                        }
                        buf.truncate(n);
                        Ok(Some((buf.freeze(), (file, left - n as u64))))
                    });
                Ok(stream.boxed())
            }
            BlobStore::S3(store) => {
                let options = object_store::GetOptions {
                    range: Some(object_store::GetRange::Bounded(start..start + len)),
                    ..Default::default()
                };
                let result = store.get_opts(&object_path(id), options).await?;
                Ok(result
                    .into_stream()
                    .map(|r| r.map_err(std::io::Error::other))
                    .boxed())
            }
        }
    }

    /// Deletes every blob uploaded more than `ttl_ms` before `now_ms`; returns how many.
    pub async fn sweep(&self, now_ms: u64, ttl_ms: u64) -> Result<u64, StoreError> {
        let cutoff = now_ms.saturating_sub(ttl_ms);
        match self {
            BlobStore::Local(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || dir.sweep(cutoff))
                    .await
                    .map_err(std::io::Error::other)?
                    .map_err(StoreError::from)
            }
            BlobStore::S3(store) => {
                let mut listing = store.list(Some(&object_store::path::Path::from("blobs")));
                let mut deleted = 0;
                while let Some(meta) = listing.next().await {
                    let meta = meta?;
                    let uploaded =
                        u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0);
                    if uploaded <= cutoff {
                        match store.delete(&meta.location).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Ok(deleted)
            }
        }
    }

    /// Ids of the stored blobs (tests and operators; a full listing).
    pub async fn list(&self) -> Result<Vec<String>, StoreError> {
        match self {
            BlobStore::Local(dir) => {
                let dir = dir.clone();
                let mut ids = Vec::new();
                tokio::task::spawn_blocking(move || -> std::io::Result<Vec<String>> {
                    dir.each_blob(|path, _| {
                        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                            ids.push(name.to_string());
                        }
                        Ok(())
                    })?;
                    Ok(ids)
                })
                .await
                .map_err(std::io::Error::other)?
                .map_err(StoreError::from)
            }
            BlobStore::S3(store) => {
                let mut listing = store.list(Some(&object_store::path::Path::from("blobs")));
                let mut ids = Vec::new();
                while let Some(meta) = listing.next().await {
                    if let Some(name) = meta?.location.filename() {
                        ids.push(name.to_string());
                    }
                }
                Ok(ids)
            }
        }
    }
}

impl LocalDir {
    fn path(&self, id: &str) -> PathBuf {
        self.blobs.join(&id[..2.min(id.len())]).join(id)
    }

    /// Calls `f(path, modified_ms)` for every blob file.
    fn each_blob(
        &self,
        mut f: impl FnMut(&Path, u64) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        for fan in std::fs::read_dir(&self.blobs)? {
            let fan = fan?;
            if !fan.file_type()?.is_dir() {
                continue;
            }
            for blob in std::fs::read_dir(fan.path())? {
                let blob = blob?;
                let modified = blob.metadata()?.modified().map_or(0, ms_of);
                f(&blob.path(), modified)?;
            }
        }
        Ok(())
    }

    fn sweep(&self, cutoff_ms: u64) -> std::io::Result<u64> {
        // Uploads whose connection went away without a commit or an abort (by the real clock:
        // they are younger than an upload URL's life while they may still be in progress).
        let stale = ms_of(SystemTime::now()).saturating_sub(TMP_STALE_MS);
        for entry in std::fs::read_dir(&self.tmp)? {
            let entry = entry?;
            if entry.metadata()?.modified().map_or(0, ms_of) <= stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let mut deleted = 0;
        self.each_blob(|path, modified| {
            if modified <= cutoff_ms {
                match std::fs::remove_file(path) {
                    Ok(()) => deleted += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })?;
        Ok(deleted)
    }
}

/// An upload in progress: written chunk by chunk, then committed or aborted.
pub enum Upload {
    Local {
        dir: Arc<LocalDir>,
        id: String,
        tmp: PathBuf,
        file: tokio::io::BufWriter<tokio::fs::File>,
    },
    S3Small {
        store: Arc<dyn ObjectStore>,
        id: String,
        buf: BytesMut,
    },
    S3Parts(Box<object_store::WriteMultipart>),
}

impl Upload {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        match self {
            Upload::Local { file, .. } => file.write_all(chunk).await?,
            Upload::S3Small { buf, .. } => buf.extend_from_slice(chunk),
            Upload::S3Parts(w) => {
                w.wait_for_capacity(S3_PARTS_IN_FLIGHT_MAX).await?;
                w.write(chunk);
            }
        }
        Ok(())
    }

    /// Makes the upload the blob, recorded as uploaded at `now_ms`.
    pub async fn commit(self, now_ms: u64) -> Result<(), StoreError> {
        match self {
            Upload::Local {
                dir,
                id,
                tmp,
                mut file,
            } => {
                file.flush().await?;
                let file = file.into_inner().into_std().await;
                let tmp_left = tmp.clone();
                let done = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    file.sync_all()?;
                    file.set_modified(UNIX_EPOCH + Duration::from_millis(now_ms))?;
                    drop(file);
                    let path = dir.path(&id);
                    let parent = path.parent().unwrap_or(&dir.blobs).to_path_buf();
                    std::fs::create_dir_all(&parent)?;
                    std::fs::rename(&tmp, &path)?;
                    std::fs::File::open(&parent)?.sync_all()
                })
                .await
                .map_err(std::io::Error::other)?;
                if done.is_err() {
                    let _ = std::fs::remove_file(&tmp_left);
                }
                Ok(done?)
            }
            Upload::S3Small { store, id, buf } => {
                store.put(&object_path(&id), buf.freeze().into()).await?;
                Ok(())
            }
            Upload::S3Parts(w) => {
                w.finish().await?;
                Ok(())
            }
        }
    }

    /// Drops the upload: nothing of it is stored.
    pub async fn abort(self) {
        match self {
            Upload::Local { tmp, file, .. } => {
                drop(file);
                let _ = tokio::fs::remove_file(&tmp).await;
            }
            Upload::S3Small { .. } => {}
            Upload::S3Parts(w) => {
                if let Err(e) = w.abort().await {
                    tracing::warn!(error = %e, "aborting a multipart media upload failed; a bucket lifecycle rule for incomplete uploads reclaims it");
                }
            }
        }
    }
}
