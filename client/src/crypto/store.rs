//! [`Store`]: the one file per device that holds its end-to-end encryption state, encrypted at
//! rest with a 32-byte key the application supplies.
//!
//! File format (docs/protocol.md, "End-to-end encryption in the SDK"):
//! `magic "RPE2EE\0" (7) | version:u8 = 1 | nonce (12) | ChaCha20-Poly1305(key, nonce,
//! aad = the first 8 bytes, state)`. A wrong key or any altered byte fails the tag check, so it
//! is told apart from a good file and nothing is overwritten. Writes are atomic: a temporary
//! file beside it, written and fsynced, renamed over the old one, and the directory fsynced.

use std::io::Write;
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};

use super::error::{CryptoError, CryptoResult};

/// The first bytes of a store file: a magic and the format version.
pub const STORE_HEADER: &[u8; 8] = b"RPE2EE\0\x01";
/// Largest store file read. The state is bounded (see [`crate::crypto::machine`]) to a few MiB.
pub const STORE_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// The encrypted state file of one device.
pub struct Store {
    path: PathBuf,
    key: LessSafeKey,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// The store at `path`, opened with `key` (nothing is read yet).
    pub fn new(path: impl Into<PathBuf>, key: &[u8; 32]) -> Store {
        let key = UnboundKey::new(&CHACHA20_POLY1305, key)
            .map(LessSafeKey::new)
            // A 32-byte key is always the right length for ChaCha20-Poly1305.
            .unwrap_or_else(|_| unreachable!("ChaCha20-Poly1305 takes 32-byte keys"));
        Store {
            path: path.into(),
            key,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> CryptoError {
        CryptoError::StoreIo {
            path: self.path.clone(),
            source,
        }
    }

    /// The decrypted state, or `None` if there is no file yet.
    pub fn load(&self) -> CryptoResult<Option<Vec<u8>>> {
        let len = match std::fs::metadata(&self.path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        if len > STORE_BYTES_MAX {
            return Err(CryptoError::StoreFormat {
                path: self.path.clone(),
                reason: format!("{len} bytes, more than {STORE_BYTES_MAX}"),
            });
        }
        let mut bytes = std::fs::read(&self.path).map_err(|e| self.io(e))?;
        let head = STORE_HEADER.len();
        if bytes.len() < head + NONCE_LEN + CHACHA20_POLY1305.tag_len()
            || bytes[..head - 1] != STORE_HEADER[..head - 1]
        {
            return Err(CryptoError::StoreFormat {
                path: self.path.clone(),
                reason: "not a Ringpost E2EE store".to_string(),
            });
        }
        if bytes[head - 1] != STORE_HEADER[head - 1] {
            return Err(CryptoError::StoreFormat {
                path: self.path.clone(),
                reason: format!("store format version {} is not spoken", bytes[head - 1]),
            });
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[head..head + NONCE_LEN]);
        let sealed = &mut bytes[head + NONCE_LEN..];
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(STORE_HEADER),
                sealed,
            )
            .map_err(|_| CryptoError::StoreKey {
                path: self.path.clone(),
            })?;
        Ok(Some(plain.to_vec()))
    }

    /// Replaces the file with `state`, encrypted, atomically.
    pub fn save(&self, state: &[u8]) -> CryptoResult<()> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut sealed = state.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(STORE_HEADER),
                &mut sealed,
            )
            .map_err(|_| CryptoError::Olm("sealing the store failed".to_string()))?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(STORE_HEADER)?;
            file.write_all(&nonce)?;
            file.write_all(&sealed)?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&tmp, &self.path)?;
            let dir = match self.path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.io(e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_wrong_key_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.e2ee");
        let store = Store::new(&path, &[1; 32]);
        assert!(store.load().unwrap().is_none());
        store.save(b"secret state").unwrap();
        assert_eq!(store.load().unwrap().unwrap(), b"secret state");
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"secret"), "encrypted at rest");
        store.save(b"second").unwrap();
        assert_eq!(store.load().unwrap().unwrap(), b"second");
        assert!(!dir.path().join("device.e2ee.tmp").exists());

        let wrong = Store::new(&path, &[2; 32]);
        assert!(matches!(wrong.load(), Err(CryptoError::StoreKey { .. })));
        assert_eq!(
            store.load().unwrap().unwrap(),
            b"second",
            "nothing was changed"
        );

        let mut damaged = std::fs::read(&path).unwrap();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        assert!(matches!(store.load(), Err(CryptoError::StoreKey { .. })));
        std::fs::write(&path, b"hello").unwrap();
        assert!(matches!(store.load(), Err(CryptoError::StoreFormat { .. })));
        let mut newer = STORE_HEADER.to_vec();
        newer[7] = 9;
        newer.extend_from_slice(&[0; 40]);
        std::fs::write(&path, &newer).unwrap();
        assert!(matches!(store.load(), Err(CryptoError::StoreFormat { .. })));
    }
}
