//! The prekey signature format: what a device signs and the node verifies before it stores an
//! upload (docs/protocol.md, "Prekeys"). Fixed: SDKs sign exactly these bytes.
//!
//! - `PrekeyUpload.identity_key` is [`IDENTITY_KEY_BYTES`]: the device's Ed25519 public signing
//!   key ([`SIGNING_KEY_BYTES`]) followed by its Curve25519 identity key
//!   ([`CURVE_KEY_BYTES`]).
//! - `SignedPrekey.key` (the fallback key) and every `OneTimePrekey.key` are
//!   [`CURVE_KEY_BYTES`] Curve25519 public keys.
//! - Every signature is an Ed25519 signature ([`SIGNATURE_BYTES`]) by the identity signing key
//!   over [`signing_message`]: `"ringpost prekey v1\0" | kind:u8 | key_id:u32 big-endian |
//!   key`, kind [`KIND_SIGNED`] for the signed (fallback) prekey, [`KIND_ONE_TIME`] for a
//!   one-time prekey.
//!
//! No cryptography here (the wire crate has no such dependency): the node verifies with
//! `ring`, the client crate signs with it (`ringpost_client::prekeys`).

/// The context every signed message starts with (19 bytes, the NUL included).
pub const SIGNING_CONTEXT: &[u8; 19] = b"ringpost prekey v1\0";
/// Bytes of an identity key: Ed25519 signing key, then Curve25519 identity key.
pub const IDENTITY_KEY_BYTES: usize = SIGNING_KEY_BYTES + CURVE_KEY_BYTES;
/// Bytes of an Ed25519 public key.
pub const SIGNING_KEY_BYTES: usize = 32;
/// Bytes of a Curve25519 public key (a signed or one-time prekey).
pub const CURVE_KEY_BYTES: usize = 32;
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
/// The kind byte of the signed (fallback) prekey's message.
pub const KIND_SIGNED: u8 = 1;
/// The kind byte of a one-time prekey's message.
pub const KIND_ONE_TIME: u8 = 2;
/// Bytes of a signed message.
pub const SIGNING_MESSAGE_BYTES: usize = SIGNING_CONTEXT.len() + 1 + 4 + CURVE_KEY_BYTES;

/// The bytes signed for the prekey `key` (exactly [`CURVE_KEY_BYTES`]) with id `key_id`, of
/// `kind` ([`KIND_SIGNED`] or [`KIND_ONE_TIME`]).
pub fn signing_message(
    kind: u8,
    key_id: u32,
    key: &[u8; CURVE_KEY_BYTES],
) -> [u8; SIGNING_MESSAGE_BYTES] {
    let mut m = [0u8; SIGNING_MESSAGE_BYTES];
    let (context, rest) = m.split_at_mut(SIGNING_CONTEXT.len());
    context.copy_from_slice(SIGNING_CONTEXT);
    rest[0] = kind;
    rest[1..5].copy_from_slice(&key_id.to_be_bytes());
    rest[5..].copy_from_slice(key);
    m
}

/// The Ed25519 signing key of a well-formed identity key (its first 32 bytes).
pub fn signing_key(identity_key: &[u8]) -> Option<&[u8; SIGNING_KEY_BYTES]> {
    if identity_key.len() != IDENTITY_KEY_BYTES {
        return None;
    }
    identity_key[..SIGNING_KEY_BYTES].try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_context_kind_id_key() {
        let key = [0xabu8; CURVE_KEY_BYTES];
        let m = signing_message(KIND_ONE_TIME, 0x0102_0304, &key);
        assert_eq!(m.len(), 56);
        assert_eq!(&m[..19], b"ringpost prekey v1\0");
        assert_eq!(m[19], 2);
        assert_eq!(&m[20..24], &[1, 2, 3, 4]);
        assert_eq!(&m[24..], &key[..]);
        assert_eq!(signing_message(KIND_SIGNED, 0, &key)[19], 1);
    }

    #[test]
    fn the_signing_key_is_the_first_half_of_a_64_byte_identity() {
        let mut ik = [0u8; 64];
        ik[..32].fill(1);
        ik[32..].fill(2);
        assert_eq!(signing_key(&ik), Some(&[1u8; 32]));
        assert_eq!(signing_key(&ik[..63]), None);
        assert_eq!(signing_key(&[0u8; 65]), None);
    }
}
