//! Media attachments as encrypted blobs (docs/protocol.md#media).
//!
//! 1. [`encrypt_media`] encrypts the attachment with a fresh random 32-byte key (AES-256-GCM,
//!    `ring`); the result carries the key and the SHA-256 of the ciphertext.
//! 2. [`Client::upload_media`] asks the node for a grant and PUTs the ciphertext to it; it
//!    returns the media id and the download URL.
//! 3. The application sends URL, key and hash in an end-to-end-encrypted message.
//! 4. The recipient calls [`download_media`] (a `Range` resumes an interrupted download),
//!    checks the hash with [`sha256`], and decrypts with [`decrypt_media`].
//!
//! The node only ever sees ciphertext, its size and its hash.
//!
//! ```no_run
//! # async fn f(client: ringpost_client::Client) -> Result<(), ringpost_client::media::MediaError> {
//! use ringpost_client::media::{decrypt_media, download_media, encrypt_media};
//! let sealed = encrypt_media(b"a photo")?;
//! let uploaded = client.upload_media(sealed.ciphertext.clone(), "image/jpeg").await?;
//! // ... send uploaded.download_url, sealed.key and sealed.sha256 in a message ...
//! let blob = download_media(&uploaded.download_url, ..).await?;
//! assert_eq!(decrypt_media(&sealed.key, &blob)?, b"a photo");
//! # Ok(()) }
//! ```

use std::ops::{Bound, RangeBounds};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use ringpost_wire::{Body, MediaUploadGrant, MediaUploadRequest};

use crate::client::Client;
use crate::error::ClientError;
use crate::tls::{client_config, TlsOptions, TlsUse};

/// Bytes a sealed blob adds to its plaintext: a 12-byte nonce before it, a 16-byte tag after.
pub const MEDIA_OVERHEAD_BYTES: usize = NONCE_LEN + 16;
/// Time to connect to a media listener.
pub const MEDIA_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An upload or download that moves no bytes for this long fails.
pub const MEDIA_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a media operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The grant request failed (the node refused it: size, budget, media disabled, ...).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The HTTP exchange failed (connection refused or reset, timeout, ...).
    #[error("media http: {0}")]
    Http(String),
    /// The media listener answered with an error status; `message` is its explanation.
    #[error("media server answered {status}: {message}")]
    Status { status: u16, message: String },
    /// Decryption failed: a wrong key, or an altered or truncated blob.
    #[error("the blob does not decrypt with this key (wrong key, or altered or truncated)")]
    Decrypt,
    /// The request or answer made no sense (an empty range, a grant for another blob, ...).
    #[error("media: {0}")]
    Invalid(String),
}

/// An attachment sealed by [`encrypt_media`].
#[derive(Clone)]
pub struct SealedMedia {
    /// The random key: send it only inside an end-to-end-encrypted message.
    pub key: [u8; 32],
    /// SHA-256 of `ciphertext`: the media id's bytes, checked by the node on upload and by the
    /// recipient on download.
    pub sha256: [u8; 32],
    /// Nonce, AES-256-GCM ciphertext and tag: what is uploaded.
    pub ciphertext: Bytes,
}

impl std::fmt::Debug for SealedMedia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedMedia")
            .field("sha256", &hex::encode(self.sha256))
            .field("len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Encrypts `plaintext` with a fresh random key (AES-256-GCM; the blob is
/// `nonce || ciphertext || tag`, [`MEDIA_OVERHEAD_BYTES`] longer than the plaintext).
pub fn encrypt_media(plaintext: &[u8]) -> Result<SealedMedia, MediaError> {
    let rng = SystemRandom::new();
    let mut key = [0u8; 32];
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut key)
        .and_then(|()| rng.fill(&mut nonce))
        .map_err(|_| MediaError::Invalid("the system random generator failed".into()))?;
    let sealing = aead_key(&key)?;
    let mut blob = Vec::with_capacity(plaintext.len() + MEDIA_OVERHEAD_BYTES);
    blob.extend_from_slice(&nonce);
    blob.extend_from_slice(plaintext);
    let tag = sealing
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut blob[NONCE_LEN..],
        )
        .map_err(|_| MediaError::Invalid("encryption failed".into()))?;
    blob.extend_from_slice(tag.as_ref());
    Ok(SealedMedia {
        key,
        sha256: sha256(&blob),
        ciphertext: Bytes::from(blob),
    })
}

/// Decrypts a blob made by [`encrypt_media`].
pub fn decrypt_media(key: &[u8; 32], blob: &[u8]) -> Result<Vec<u8>, MediaError> {
    if blob.len() < MEDIA_OVERHEAD_BYTES {
        return Err(MediaError::Decrypt);
    }
    let (nonce, sealed) = blob.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| MediaError::Decrypt)?;
    let mut buf = sealed.to_vec();
    let plain_len = aead_key(key)?
        .open_in_place(nonce, Aad::empty(), &mut buf)
        .map_err(|_| MediaError::Decrypt)?
        .len();
    buf.truncate(plain_len);
    Ok(buf)
}

fn aead_key(key: &[u8; 32]) -> Result<LessSafeKey, MediaError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| MediaError::Invalid("bad key".into()))
}

/// A blob uploaded by [`Client::upload_media`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedMedia {
    /// Lowercase hex SHA-256 of the ciphertext.
    pub media_id: String,
    /// Where recipients download it (valid while the blob lives: 30 days).
    pub download_url: String,
}

/// The HTTP client of the media helpers: rustls with the ring provider, trusting what a
/// [`TlsOptions`] says (the platform's roots by default).
#[derive(Debug, Clone)]
pub struct MediaHttp {
    http: reqwest::Client,
}

impl MediaHttp {
    /// A client trusting `tls` for `https://` media URLs.
    pub fn new(tls: &TlsOptions) -> Result<MediaHttp, MediaError> {
        let config =
            client_config(tls, TlsUse::WebSocket).map_err(|e| MediaError::Http(e.to_string()))?;
        Self::with_tls((*config).clone())
    }

    fn with_tls(config: rustls::ClientConfig) -> Result<MediaHttp, MediaError> {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .connect_timeout(MEDIA_CONNECT_TIMEOUT)
            .read_timeout(MEDIA_READ_TIMEOUT)
            .build()
            .map_err(|e| MediaError::Http(e.to_string()))?;
        Ok(MediaHttp { http })
    }

    /// The process-wide client used by [`Client::upload_media`] and [`download_media`]: the
    /// platform's roots (none found: plain `http://` media URLs still work).
    pub fn shared() -> Result<&'static MediaHttp, MediaError> {
        static SHARED: OnceLock<MediaHttp> = OnceLock::new();
        if let Some(h) = SHARED.get() {
            return Ok(h);
        }
        let made = match MediaHttp::new(&TlsOptions::default()) {
            Ok(h) => h,
            Err(_) => {
                let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| MediaError::Http(e.to_string()))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
                MediaHttp::with_tls(config)?
            }
        };
        Ok(SHARED.get_or_init(|| made))
    }

    /// PUTs `ciphertext` to a granted upload URL.
    pub async fn put(&self, upload_url: &str, ciphertext: Bytes) -> Result<(), MediaError> {
        let answer = self
            .http
            .put(upload_url)
            .header("content-type", "application/octet-stream")
            .body(ciphertext)
            .send()
            .await
            .map_err(|e| MediaError::Http(e.to_string()))?;
        check(answer).await.map(|_| ())
    }

    /// GETs `range` of the blob at `download_url` (`..` for all of it).
    pub async fn get(
        &self,
        download_url: &str,
        range: impl RangeBounds<u64>,
    ) -> Result<Bytes, MediaError> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let last = match range.end_bound() {
            Bound::Included(&e) => Some(e),
            Bound::Excluded(&0) => return Err(MediaError::Invalid("an empty range".into())),
            Bound::Excluded(&e) => Some(e - 1),
            Bound::Unbounded => None,
        };
        if last.is_some_and(|l| l < start) {
            return Err(MediaError::Invalid("an empty range".into()));
        }
        let mut request = self.http.get(download_url);
        let ranged = start > 0 || last.is_some();
        if ranged {
            let last = last.map_or(String::new(), |l| l.to_string());
            request = request.header("range", format!("bytes={start}-{last}"));
        }
        let answer = request
            .send()
            .await
            .map_err(|e| MediaError::Http(e.to_string()))?;
        let status = answer.status().as_u16();
        if ranged && status != 206 {
            let message = answer.text().await.unwrap_or_default();
            return Err(MediaError::Status { status, message });
        }
        if ranged {
            let content_range = answer
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !content_range.starts_with(&format!("bytes {start}-")) {
                return Err(MediaError::Invalid(format!(
                    "asked for bytes from {start}, got Content-Range {content_range:?}"
                )));
            }
        }
        check(answer)
            .await?
            .bytes()
            .await
            .map_err(|e| MediaError::Http(e.to_string()))
    }
}

async fn check(answer: reqwest::Response) -> Result<reqwest::Response, MediaError> {
    let status = answer.status();
    if status.is_success() {
        return Ok(answer);
    }
    let message = answer.text().await.unwrap_or_default().trim().to_string();
    Err(MediaError::Status {
        status: status.as_u16(),
        message,
    })
}

/// Downloads `range` of a blob (`..` for all of it; `n..` resumes after `n` bytes).
pub async fn download_media(
    download_url: &str,
    range: impl RangeBounds<u64>,
) -> Result<Bytes, MediaError> {
    MediaHttp::shared()?.get(download_url, range).await
}

impl Client {
    /// Asks the node for an upload grant for a blob of `size` bytes whose SHA-256 is `sha256`.
    pub async fn media_grant(
        &self,
        size: u64,
        sha256: [u8; 32],
        content_type: &str,
    ) -> Result<MediaUploadGrant, ClientError> {
        let answer = self
            .request(MediaUploadRequest {
                size,
                sha256: Bytes::copy_from_slice(&sha256),
                content_type: content_type.to_string(),
            })
            .await?;
        match answer.body {
            Body::MediaUploadGrant(g) => Ok(g),
            other => Err(ClientError::Protocol(format!(
                "expected MediaUploadGrant, got {}",
                other.name()
            ))),
        }
    }

    /// Uploads `ciphertext` (see [`encrypt_media`]): a grant, then a PUT through the shared
    /// [`MediaHttp`]. Returns the media id and the URL recipients download it from.
    pub async fn upload_media(
        &self,
        ciphertext: Bytes,
        content_type: &str,
    ) -> Result<UploadedMedia, MediaError> {
        self.upload_media_with(MediaHttp::shared()?, ciphertext, content_type)
            .await
    }

    /// [`Client::upload_media`] through a given HTTP client (e.g. trusting a private CA).
    pub async fn upload_media_with(
        &self,
        http: &MediaHttp,
        ciphertext: Bytes,
        content_type: &str,
    ) -> Result<UploadedMedia, MediaError> {
        let hash = sha256(&ciphertext);
        let grant = self
            .media_grant(ciphertext.len() as u64, hash, content_type)
            .await?;
        if grant.media_id != hex::encode(hash) {
            return Err(MediaError::Invalid(format!(
                "the node granted media id {} for a blob whose SHA-256 is {}",
                grant.media_id,
                hex::encode(hash)
            )));
        }
        http.put(&grant.upload_url, ciphertext).await?;
        Ok(UploadedMedia {
            media_id: grant.media_id,
            download_url: grant.download_url,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_media_round_trips_and_detects_tampering() {
        let sealed = encrypt_media(b"attachment").unwrap();
        assert_eq!(sealed.ciphertext.len(), 10 + MEDIA_OVERHEAD_BYTES);
        assert_eq!(sealed.sha256, sha256(&sealed.ciphertext));
        assert_eq!(
            decrypt_media(&sealed.key, &sealed.ciphertext).unwrap(),
            b"attachment"
        );
        let mut altered = sealed.ciphertext.to_vec();
        altered[NONCE_LEN] ^= 1;
        assert!(matches!(
            decrypt_media(&sealed.key, &altered),
            Err(MediaError::Decrypt)
        ));
        assert!(matches!(
            decrypt_media(&[0; 32], &sealed.ciphertext),
            Err(MediaError::Decrypt)
        ));
        assert!(matches!(
            decrypt_media(&sealed.key, &altered[..5]),
            Err(MediaError::Decrypt)
        ));
        let again = encrypt_media(b"attachment").unwrap();
        assert_ne!(again.key, sealed.key, "a fresh key each time");
        assert_ne!(again.sha256, sealed.sha256);
    }
}
