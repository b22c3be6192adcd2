//! [`Token`]: a device's bearer credential. Only its SHA-256 is stored, and stored hashes are
//! compared in constant time.

use bytes::Bytes;
use rand::rngs::OsRng;
use rand::RngCore;
use ringpost_wire::limits::TOKEN_BYTES;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// SHA-256 output, the stored form of tokens and codes.
pub(crate) type Hash32 = [u8; 32];

/// A device's authentication token: [`TOKEN_BYTES`] bytes from the OS random source, handed to
/// the device once (in `Registered`) and stored only as its SHA-256. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token([u8; TOKEN_BYTES]);

impl Token {
    /// A fresh random token.
    pub fn generate() -> Token {
        let mut bytes = [0u8; TOKEN_BYTES];
        OsRng.fill_bytes(&mut bytes);
        Token(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; TOKEN_BYTES] {
        &self.0
    }

    /// The token as the wire carries it.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(&self.0)
    }

    /// The stored form.
    pub(crate) fn hash(&self) -> Hash32 {
        sha256(&self.0)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

pub(crate) fn sha256(data: &[u8]) -> Hash32 {
    Sha256::digest(data).into()
}

/// SHA-256 over several parts (no separators: callers pass fixed-width parts first).
pub(crate) fn sha256_parts(parts: &[&[u8]]) -> Hash32 {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Constant-time equality of two hashes: the time taken does not depend on where they differ.
pub(crate) fn hash_eq(a: &Hash32, b: &Hash32) -> bool {
    bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_redacted() {
        let a = Token::generate();
        let b = Token::generate();
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "Token(<redacted>)");
        assert_eq!(a.to_bytes().as_ref(), a.as_bytes());
        assert!(hash_eq(&a.hash(), &sha256(a.as_bytes())));
        assert!(!hash_eq(&a.hash(), &b.hash()));
    }

    #[test]
    fn sha256_parts_concatenates() {
        assert_eq!(sha256_parts(&[b"ab", b"c"]), sha256(b"abc"));
    }
}
