//! The node's own key: an Ed25519 key pair kept in its data directory (`node.key`, PKCS#8 DER,
//! mode 0600), made at the node's first start. Its public half is announced at `join`; the
//! coordinator binds the node id to the first key it sees for it, and peer links accept a node
//! only if it signs their handshake with the key its id is bound to (`peer/link.rs`).
//!
//! The key lives with the data because it is the data's identity: a node whose data directory
//! is lost for good comes back as a new node (a new key), which the coordinator refuses under
//! the old id until the operator has removed that member (`ctl remove N`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ::ring::rand::SystemRandom;
use ::ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use anyhow::{bail, Context, Result};

/// File name of the key in the data directory.
pub const NODE_KEY_FILE: &str = "node.key";
/// Bytes of an Ed25519 public key.
pub const PUBLIC_KEY_BYTES: usize = 32;
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
/// Largest key file read (a PKCS#8 Ed25519 key is 83 bytes); anything larger is not ours.
const KEY_FILE_BYTES_MAX: u64 = 4096;

/// This node's key pair.
pub struct NodeKey {
    pair: Ed25519KeyPair,
    public: [u8; PUBLIC_KEY_BYTES],
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", self.public_hex())
    }
}

impl NodeKey {
    /// Loads `dir/node.key`, or makes and stores a new key if there is none. A file that is
    /// there but unreadable or malformed is an error, never replaced: replacing it would give
    /// the node a new identity that the cluster refuses.
    pub fn load_or_create(dir: &Path) -> Result<NodeKey> {
        let path = dir.join(NODE_KEY_FILE);
        match fs::metadata(&path) {
            Ok(meta) => {
                if meta.len() > KEY_FILE_BYTES_MAX {
                    bail!("{} is {} bytes: not a node key", path.display(), meta.len());
                }
                let der = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                Self::from_pkcs8(&der).with_context(|| {
                    format!(
                        "{} is not an Ed25519 key in PKCS#8 (restore it from a backup, or \
                         remove the member with `ctl remove` and start this node afresh)",
                        path.display()
                    )
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(&path),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// A key held only in memory (tests, and nodes without a data directory).
    pub fn ephemeral() -> Result<NodeKey> {
        let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("cannot generate an Ed25519 key"))?;
        Self::from_pkcs8(der.as_ref())
    }

    /// The key a 32-byte seed determines: for tests and tools that need a known key. A node's
    /// real key comes from [`NodeKey::load_or_create`].
    pub fn from_seed(seed: &[u8; 32]) -> Result<NodeKey> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|e| anyhow::anyhow!("bad seed: {e}"))?;
        let mut public = [0u8; PUBLIC_KEY_BYTES];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(NodeKey { pair, public })
    }

    fn from_pkcs8(der: &[u8]) -> Result<NodeKey> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| anyhow::anyhow!("malformed key: {e}"))?;
        let mut public = [0u8; PUBLIC_KEY_BYTES];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(NodeKey { pair, public })
    }

    /// Makes a key and stores it atomically: written to a temporary file, synced, renamed,
    /// and the directory synced, so a crash leaves either no key or the whole key.
    fn create(path: &PathBuf) -> Result<NodeKey> {
        let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("cannot generate an Ed25519 key"))?;
        let tmp = path.with_extension("key.tmp");
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(der.as_ref())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("syncing {}", dir.display()))?;
        }
        Self::from_pkcs8(der.as_ref())
    }

    /// The public key.
    pub fn public(&self) -> [u8; PUBLIC_KEY_BYTES] {
        self.public
    }

    /// The public key as announced at `join` (lower-case hex).
    pub fn public_hex(&self) -> String {
        hex::encode(self.public)
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_BYTES] {
        let mut sig = [0u8; SIGNATURE_BYTES];
        sig.copy_from_slice(self.pair.sign(message).as_ref());
        sig
    }
}

/// Whether `signature` is `public`'s signature of `message`.
pub fn verify(public: &[u8; PUBLIC_KEY_BYTES], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public)
        .verify(message, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_loaded_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let first = NodeKey::load_or_create(dir.path()).unwrap();
        let again = NodeKey::load_or_create(dir.path()).unwrap();
        assert_eq!(first.public(), again.public());
        assert_eq!(first.public_hex().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(NODE_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let sig = first.sign(b"hello");
        assert!(verify(&again.public(), b"hello", &sig));
        assert!(!verify(&again.public(), b"hellp", &sig));
        assert!(!verify(&again.public(), b"hello", &sig[..63]));
        let other = NodeKey::ephemeral().unwrap();
        assert!(!verify(&other.public(), b"hello", &sig));
    }

    #[test]
    fn a_damaged_key_file_is_an_error_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODE_KEY_FILE);
        fs::write(&path, b"not a key").unwrap();
        let err = NodeKey::load_or_create(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("not an Ed25519 key"), "{err:#}");
        assert_eq!(fs::read(&path).unwrap(), b"not a key");
        fs::write(&path, vec![0u8; 5000]).unwrap();
        assert!(NodeKey::load_or_create(dir.path()).is_err());
    }
}
