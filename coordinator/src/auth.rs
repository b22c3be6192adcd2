//! Shared-secret authentication, sans-IO: the HMAC-SHA256 challenge-response both ends run when
//! a connection opens, and the per-frame MACs that follow.
//!
//! Every value is `HMAC-SHA256(key, label || fixed-length fields)`; all fields after the label
//! have fixed lengths, so no two inputs concatenate to the same bytes.
//!
//! - client proof: `HMAC(secret, "ringpost-coordinator/1" 0 channel 0 "client-proof" sn cn)`
//! - server proof: the same with `"server-proof"`: the client checks the server knows the secret
//!   too, so a client never sends a request to an impostor.
//! - session keys: the same with `"key-c2s"` / `"key-s2c"`; each frame in direction d carries
//!   `HMAC(key_d, seq_be64 || payload)`, `seq` counting frames from 0, so a frame cannot be
//!   altered, replayed, reordered or reflected.
//!
//! The channel label (`raft` or `client`) keeps a proof for one port from being used on the other.
//! Frames are authenticated, not encrypted: the coordinator carries no secrets of users.

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Shortest accepted cluster secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;
/// Longest accepted cluster secret, in bytes.
pub const MAX_SECRET_BYTES: usize = 1024;
/// Length of each side's handshake nonce.
pub(crate) const NONCE_BYTES: usize = 32;
/// Length of a proof and of a frame tag (SHA-256 output).
pub(crate) const TAG_BYTES: usize = 32;

const PROTOCOL_LABEL: &[u8] = b"ringpost-coordinator/1";

/// Why a secret was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cluster secret must be {MIN_SECRET_BYTES}..={MAX_SECRET_BYTES} bytes, got {0}")]
pub struct SecretLengthError(pub usize);

/// The cluster's shared secret: every replica, node and `ctl` holds the same one.
#[derive(Clone)]
pub struct ClusterSecret(Arc<[u8]>);

impl ClusterSecret {
    /// Wraps a secret after checking its length.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, SecretLengthError> {
        let bytes = bytes.into();
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&bytes.len()) {
            return Err(SecretLengthError(bytes.len()));
        }
        Ok(ClusterSecret(bytes.into()))
    }

    /// A fresh random secret (32 bytes), e.g. for an embedded coordinator.
    pub fn random() -> Self {
        let mut b = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        ClusterSecret(Arc::from(&b[..]))
    }

    /// The secret's bytes, for other protocols of the same cluster that authenticate with it
    /// (the nodes' peer links). Never log them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length.
        <HmacSha256 as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

/// Which listener a connection is for; part of every MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChannelKind {
    /// Replica to replica (Raft RPCs).
    Raft,
    /// Node or `ctl` to a replica.
    Client,
}

impl ChannelKind {
    pub(crate) fn byte(self) -> u8 {
        match self {
            ChannelKind::Raft => b'R',
            ChannelKind::Client => b'C',
        }
    }
}

/// A fresh random nonce.
pub(crate) fn nonce() -> [u8; NONCE_BYTES] {
    let mut n = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

fn derive(
    secret: &ClusterSecret,
    kind: ChannelKind,
    purpose: &[u8],
    server_nonce: &[u8; NONCE_BYTES],
    client_nonce: &[u8; NONCE_BYTES],
) -> HmacSha256 {
    let mut m = secret.mac();
    m.update(PROTOCOL_LABEL);
    m.update(&[0, kind.byte(), 0]);
    m.update(purpose);
    m.update(server_nonce);
    m.update(client_nonce);
    m
}

/// The handshake values of one connection, computed by both ends from the two nonces.
pub(crate) struct Handshake {
    secret: ClusterSecret,
    kind: ChannelKind,
    server_nonce: [u8; NONCE_BYTES],
    client_nonce: [u8; NONCE_BYTES],
}

impl Handshake {
    pub(crate) fn new(
        secret: &ClusterSecret,
        kind: ChannelKind,
        server_nonce: [u8; NONCE_BYTES],
        client_nonce: [u8; NONCE_BYTES],
    ) -> Self {
        Handshake {
            secret: secret.clone(),
            kind,
            server_nonce,
            client_nonce,
        }
    }

    fn derive(&self, purpose: &[u8]) -> HmacSha256 {
        derive(
            &self.secret,
            self.kind,
            purpose,
            &self.server_nonce,
            &self.client_nonce,
        )
    }

    pub(crate) fn client_proof(&self) -> [u8; TAG_BYTES] {
        self.derive(b"client-proof").finalize().into_bytes().into()
    }

    pub(crate) fn server_proof(&self) -> [u8; TAG_BYTES] {
        self.derive(b"server-proof").finalize().into_bytes().into()
    }

    /// Constant-time check of the client's proof.
    pub(crate) fn verify_client_proof(&self, proof: &[u8]) -> bool {
        self.derive(b"client-proof").verify_slice(proof).is_ok()
    }

    /// Constant-time check of the server's proof.
    pub(crate) fn verify_server_proof(&self, proof: &[u8]) -> bool {
        self.derive(b"server-proof").verify_slice(proof).is_ok()
    }

    /// (client-to-server, server-to-client) frame authenticators.
    pub(crate) fn frame_macs(&self) -> (FrameMac, FrameMac) {
        let key = |p: &[u8]| -> [u8; TAG_BYTES] { self.derive(p).finalize().into_bytes().into() };
        (
            FrameMac::new(key(b"key-c2s")),
            FrameMac::new(key(b"key-s2c")),
        )
    }
}

/// Signs or verifies the frames of one direction of one connection, in order.
pub(crate) struct FrameMac {
    key: [u8; TAG_BYTES],
    seq: u64,
}

impl FrameMac {
    fn new(key: [u8; TAG_BYTES]) -> Self {
        FrameMac { key, seq: 0 }
    }

    fn mac(&self) -> HmacSha256 {
        let mut m =
            <HmacSha256 as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        m.update(&self.seq.to_be_bytes());
        m
    }

    /// Tag for the next outgoing frame.
    pub(crate) fn sign(&mut self, payload: &[u8]) -> [u8; TAG_BYTES] {
        let mut m = self.mac();
        m.update(payload);
        self.seq += 1;
        m.finalize().into_bytes().into()
    }

    /// Checks the tag of the next incoming frame (constant time).
    pub(crate) fn verify(&mut self, payload: &[u8], tag: &[u8]) -> bool {
        let mut m = self.mac();
        m.update(payload);
        self.seq += 1;
        m.verify_slice(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn secret_bounds() {
        assert!(ClusterSecret::new(vec![0; MIN_SECRET_BYTES - 1]).is_err());
        assert!(ClusterSecret::new(vec![0; MAX_SECRET_BYTES + 1]).is_err());
        assert!(ClusterSecret::new(vec![0; MIN_SECRET_BYTES]).is_ok());
        assert_eq!(
            format!("{:?}", secret("0123456789abcdef")),
            "ClusterSecret(<redacted>)"
        );
    }

    #[test]
    fn proofs_need_the_same_secret_channel_and_nonces() {
        let (sn, cn) = (nonce(), nonce());
        let good = Handshake::new(&secret("0123456789abcdef"), ChannelKind::Raft, sn, cn);
        let proof = good.client_proof();
        assert!(good.verify_client_proof(&proof));
        assert!(!good.verify_server_proof(&proof), "roles differ");
        let wrong_secret = Handshake::new(&secret("0123456789abcdeX"), ChannelKind::Raft, sn, cn);
        assert!(!wrong_secret.verify_client_proof(&proof));
        let wrong_channel =
            Handshake::new(&secret("0123456789abcdef"), ChannelKind::Client, sn, cn);
        assert!(!wrong_channel.verify_client_proof(&proof));
        let replayed = Handshake::new(&secret("0123456789abcdef"), ChannelKind::Raft, nonce(), cn);
        assert!(!replayed.verify_client_proof(&proof));
        assert!(!good.verify_client_proof(&proof[..31]));
    }

    #[test]
    fn frame_macs_are_ordered_and_directional() {
        let h = Handshake::new(
            &secret("0123456789abcdef"),
            ChannelKind::Client,
            nonce(),
            nonce(),
        );
        let (mut c2s_tx, _) = h.frame_macs();
        let (mut c2s_rx, mut s2c_rx) = h.frame_macs();
        let t0 = c2s_tx.sign(b"a");
        let t1 = c2s_tx.sign(b"b");
        assert!(!s2c_rx.verify(b"a", &t0), "reflected frame");
        assert!(!c2s_rx.verify(b"b", &t1), "out of order");
        let (mut fresh, _) = h.frame_macs();
        assert!(fresh.verify(b"a", &t0));
        assert!(fresh.verify(b"b", &t1));
        let (mut tampered, _) = h.frame_macs();
        assert!(!tampered.verify(b"x", &t0));
    }
}
