//! Pre-signed media URLs: what the node grants and what its HTTP listener accepts. Sans-IO: the
//! time comes in as `now_ms`, so expiry is tested without waiting.
//!
//! ```text
//! upload:   {base}/m/{id}?s={size}&d={user}.{device}&e={expires_at_ms}&t={tag}   (PUT)
//! download: {base}/m/{id}?e={expires_at_ms}&t={tag}                              (GET, HEAD)
//! ```
//!
//! `id` is the lowercase hex SHA-256 of the ciphertext; `tag` is the unpadded base64url
//! HMAC-SHA256, under the node's media URL key, of the method, the id, and (for an upload) the
//! size and the requesting device, and the expiry. Any change to any of them (or a tag made
//! with another key) is a forgery; a tag is compared in constant time.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use ringpost_wire::{DeviceId, UserId};

/// Length of a media id: the hex of a SHA-256 digest.
pub const MEDIA_ID_HEX_LEN: usize = 64;

/// Longest base URL the listener may be announced under: the longest upload URL (a 9-digit
/// size, a 20-digit user, a 10-digit device, a 13-digit expiry and a 43-byte tag) then still
/// fits `STRING_BYTES_MAX` (256).
pub const MEDIA_BASE_URL_BYTES_MAX: usize = 72;

/// Domain separation of the signed strings (a tag for anything else never verifies here).
const DOMAIN: &str = "ringpost-media-url-v1";

/// What a verified URL grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// PUT exactly `size` bytes whose SHA-256 is the id, for `user`'s `device`.
    Upload {
        size: u64,
        user: UserId,
        device: DeviceId,
        expires_at_ms: u64,
    },
    /// GET (or HEAD) the blob.
    Download { expires_at_ms: u64 },
}

impl Grant {
    pub fn expires_at_ms(&self) -> u64 {
        match *self {
            Grant::Upload { expires_at_ms, .. } | Grant::Download { expires_at_ms } => {
                expires_at_ms
            }
        }
    }
}

/// Why a URL is refused (all answered 403, except an unknown id shape: 404).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not a media id (64 lowercase hex digits)")]
    BadId,
    #[error("the URL is missing its {0} parameter or it is malformed")]
    Malformed(&'static str),
    #[error("the URL's signature does not verify (forged or altered URL)")]
    Forged,
    #[error("the URL expired at {expires_at_ms} (now {now_ms}); ask for a new grant")]
    Expired { expires_at_ms: u64, now_ms: u64 },
}

/// Signs and verifies media URLs with one key.
pub struct UrlSigner {
    key: hmac::Key,
    base: String,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlSigner")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl UrlSigner {
    /// `base` is the listener's public URL (`http://host:port`, no trailing slash needed).
    pub fn new(key: &[u8], base: &str) -> Result<UrlSigner, String> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!(
                "media public URL {base:?} must start with http:// or https://"
            ));
        }
        if base.len() > MEDIA_BASE_URL_BYTES_MAX {
            return Err(format!(
                "media public URL {base:?} is {} bytes; at most {MEDIA_BASE_URL_BYTES_MAX} keep \
                 granted URLs within the protocol's 256-byte strings",
                base.len()
            ));
        }
        if key.len() < 16 {
            return Err("the media URL key must be at least 16 bytes".into());
        }
        Ok(UrlSigner {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            base,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn message(id: &str, grant: &Grant) -> String {
        match *grant {
            Grant::Upload {
                size,
                user,
                device,
                expires_at_ms,
            } => format!("{DOMAIN}\nPUT\n{id}\n{size}\n{user}.{device}\n{expires_at_ms}"),
            Grant::Download { expires_at_ms } => {
                format!("{DOMAIN}\nGET\n{id}\n{expires_at_ms}")
            }
        }
    }

    fn tag(&self, id: &str, grant: &Grant) -> String {
        URL_SAFE_NO_PAD.encode(hmac::sign(&self.key, Self::message(id, grant).as_bytes()))
    }

    /// The URL for `grant` of blob `id`.
    pub fn url(&self, id: &str, grant: &Grant) -> String {
        let tag = self.tag(id, grant);
        match *grant {
            Grant::Upload {
                size,
                user,
                device,
                expires_at_ms,
            } => format!(
                "{}/m/{id}?s={size}&d={user}.{device}&e={expires_at_ms}&t={tag}",
                self.base
            ),
            Grant::Download { expires_at_ms } => {
                format!("{}/m/{id}?e={expires_at_ms}&t={tag}", self.base)
            }
        }
    }

    /// Verifies the query of a request for blob `id` (`upload`: a PUT) at `now_ms`.
    pub fn verify(
        &self,
        id: &str,
        query: &str,
        upload: bool,
        now_ms: u64,
    ) -> Result<Grant, UrlError> {
        if !is_media_id(id) {
            return Err(UrlError::BadId);
        }
        let param = |name: &'static str| -> Result<&str, UrlError> {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                .ok_or(UrlError::Malformed(name))
        };
        let number = |name: &'static str| -> Result<u64, UrlError> {
            let v = param(name)?;
            // Digits only: no sign, no leading '+', no second spelling of one URL.
            if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(UrlError::Malformed(name));
            }
            v.parse().map_err(|_| UrlError::Malformed(name))
        };
        let expires_at_ms = number("e")?;
        let grant = if upload {
            let (user, device) = param("d")?
                .split_once('.')
                .ok_or(UrlError::Malformed("d"))?;
            let digits =
                |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
            if !digits(user) || !digits(device) {
                return Err(UrlError::Malformed("d"));
            }
            Grant::Upload {
                size: number("s")?,
                user: user.parse().map_err(|_| UrlError::Malformed("d"))?,
                device: device.parse().map_err(|_| UrlError::Malformed("d"))?,
                expires_at_ms,
            }
        } else {
            Grant::Download { expires_at_ms }
        };
        let tag = URL_SAFE_NO_PAD
            .decode(param("t")?)
            .map_err(|_| UrlError::Forged)?;
        hmac::verify(&self.key, Self::message(id, &grant).as_bytes(), &tag)
            .map_err(|_| UrlError::Forged)?;
        // Checked after the signature: an attacker learns nothing from the order.
        if now_ms >= expires_at_ms {
            return Err(UrlError::Expired {
                expires_at_ms,
                now_ms,
            });
        }
        Ok(grant)
    }
}

/// 64 lowercase hex digits.
pub fn is_media_id(id: &str) -> bool {
    id.len() == MEDIA_ID_HEX_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn signer() -> UrlSigner {
        UrlSigner::new(&[7; 32], "http://127.0.0.1:7781/").unwrap()
    }

    fn query(url: &str) -> &str {
        url.split_once('?').unwrap().1
    }

    fn upload() -> Grant {
        Grant::Upload {
            size: 100,
            user: 15551234567,
            device: 2,
            expires_at_ms: 1_000,
        }
    }

    #[test]
    fn a_signed_url_verifies_until_it_expires() {
        let s = signer();
        let url = s.url(ID, &upload());
        assert!(url.starts_with("http://127.0.0.1:7781/m/9f86"));
        assert_eq!(s.verify(ID, query(&url), true, 999), Ok(upload()));
        assert_eq!(
            s.verify(ID, query(&url), true, 1_000),
            Err(UrlError::Expired {
                expires_at_ms: 1_000,
                now_ms: 1_000
            })
        );
        let get = s.url(ID, &Grant::Download { expires_at_ms: 5 });
        assert!(s.verify(ID, query(&get), false, 4).is_ok());
    }

    #[test]
    fn any_change_is_a_forgery() {
        let s = signer();
        let url = s.url(ID, &upload());
        let q = query(&url);
        for (from, to) in [
            ("s=100", "s=101"),
            ("d=15551234567.2", "d=15551234567.3"),
            ("e=1000", "e=9000"),
        ] {
            assert_eq!(
                s.verify(ID, &q.replace(from, to), true, 0),
                Err(UrlError::Forged),
                "{from} -> {to}"
            );
        }
        let other = ID.replace('9', "8");
        assert_eq!(s.verify(&other, q, true, 0), Err(UrlError::Forged));
        // An upload URL is no download URL, and another key's tag does not verify.
        assert_eq!(s.verify(ID, q, false, 0), Err(UrlError::Forged));
        let other_key = UrlSigner::new(&[8; 32], "http://127.0.0.1:7781").unwrap();
        assert_eq!(other_key.verify(ID, q, true, 0), Err(UrlError::Forged));
        assert_eq!(
            s.verify(ID, "s=1&d=1.1&e=5", true, 0),
            Err(UrlError::Malformed("t"))
        );
        assert_eq!(
            s.verify(ID, "s=-1&d=1.1&e=5&t=x", true, 0),
            Err(UrlError::Malformed("s"))
        );
        assert_eq!(s.verify("../etc/passwd", q, true, 0), Err(UrlError::BadId));
        assert_eq!(
            s.verify(&ID.to_uppercase(), q, true, 0),
            Err(UrlError::BadId)
        );
    }

    #[test]
    fn the_longest_url_fits_the_protocol_string_bound() {
        let base = format!("https://{}", "m".repeat(MEDIA_BASE_URL_BYTES_MAX - 8));
        let s = UrlSigner::new(&[1; 32], &base).unwrap();
        let url = s.url(
            ID,
            &Grant::Upload {
                size: ringpost_wire::limits::MEDIA_BYTES_MAX,
                user: u64::MAX,
                device: u32::MAX,
                expires_at_ms: 9_999_999_999_999,
            },
        );
        assert!(
            url.len() <= ringpost_wire::limits::STRING_BYTES_MAX,
            "{}",
            url.len()
        );
        assert!(UrlSigner::new(&[1; 32], &format!("{base}x")).is_err());
        assert!(UrlSigner::new(&[1; 32], "ftp://x").is_err());
    }
}
