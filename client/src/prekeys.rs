//! Prekeys as the node expects them (docs/protocol.md, "Prekeys"): [`prekey_signing_message`]
//! (the format, from [`ringpost_wire::prekeys`]), [`verify_prekey_signature`] for a claimer
//! checking a bundle, and [`DeviceKeys`], a small signer for tests and tools (bench, chaos)
//! that makes valid uploads.
//!
//! [`DeviceKeys`] holds a real Ed25519 identity signing key; its Curve25519 keys (the identity
//! key's second half and every prekey) are X25519-shaped 32-byte values derived from its seed,
//! not keys anyone holds the private half of: enough for the node, which verifies signatures
//! and never does key agreement, and for load and fault tests. A messenger uses the SDK's
//! Olm keys instead.

use bytes::Bytes;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use ringpost_wire::prekeys::{
    signing_key, signing_message, CURVE_KEY_BYTES, IDENTITY_KEY_BYTES, KIND_ONE_TIME, KIND_SIGNED,
};
use ringpost_wire::{DeviceBundle, OneTimePrekey, PrekeyUpload, SignedPrekey};

pub use ringpost_wire::prekeys::{
    signing_message as prekey_signing_message, KIND_ONE_TIME as PREKEY_KIND_ONE_TIME,
    KIND_SIGNED as PREKEY_KIND_SIGNED,
};

/// Whether `signature` is `identity_key`'s Ed25519 signature over the prekey `key` of `kind`
/// with id `key_id`. `false` for any wrong length.
pub fn verify_prekey_signature(
    identity_key: &[u8],
    kind: u8,
    key_id: u32,
    key: &[u8],
    signature: &[u8],
) -> bool {
    let (Some(signer), Ok(key)) = (
        signing_key(identity_key),
        <&[u8; CURVE_KEY_BYTES]>::try_from(key),
    ) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, signer)
        .verify(&signing_message(kind, key_id, key), signature)
        .is_ok()
}

/// Whether every signature in a claimed device bundle verifies against its identity key.
pub fn verify_bundle(bundle: &DeviceBundle) -> bool {
    let ik = &bundle.identity_key;
    let signed_ok = bundle
        .signed_prekey
        .as_ref()
        .is_none_or(|s| verify_prekey_signature(ik, KIND_SIGNED, s.id, &s.key, &s.signature));
    let one_time_ok = bundle
        .one_time
        .as_ref()
        .is_none_or(|k| verify_prekey_signature(ik, KIND_ONE_TIME, k.id, &k.key, &k.signature));
    signed_ok && one_time_ok
}

/// A device's identity signing key and the keys derived from its seed (see the module
/// documentation). The same seed gives the same keys, so a seeded test reproduces its uploads.
pub struct DeviceKeys {
    seed: [u8; 32],
    signing: Ed25519KeyPair,
}

impl std::fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKeys")
            .field("identity_key", &self.identity_key())
            .finish_non_exhaustive()
    }
}

impl DeviceKeys {
    /// Keys from a random seed.
    pub fn generate() -> DeviceKeys {
        DeviceKeys::from_seed(rand::random())
    }

    /// Keys from `seed`.
    pub fn from_seed(seed: [u8; 32]) -> DeviceKeys {
        // A 32-byte seed is always a valid Ed25519 private key.
        let signing = Ed25519KeyPair::from_seed_unchecked(&seed)
            .unwrap_or_else(|_| unreachable!("any 32 bytes are an Ed25519 seed"));
        DeviceKeys { seed, signing }
    }

    /// The 64-byte identity key: Ed25519 signing key, then Curve25519 identity key.
    pub fn identity_key(&self) -> Bytes {
        let mut ik = Vec::with_capacity(IDENTITY_KEY_BYTES);
        ik.extend_from_slice(self.signing.public_key().as_ref());
        ik.extend_from_slice(&self.curve_key(0, 0));
        Bytes::from(ik)
    }

    /// The Ed25519 signature over the prekey `key` of `kind` with id `key_id`.
    pub fn sign(&self, kind: u8, key_id: u32, key: &[u8; CURVE_KEY_BYTES]) -> Bytes {
        let message = signing_message(kind, key_id, key);
        Bytes::copy_from_slice(self.signing.sign(&message).as_ref())
    }

    /// The signed (fallback) prekey with id `id`, signed.
    pub fn signed_prekey(&self, id: u32) -> SignedPrekey {
        let key = self.curve_key(KIND_SIGNED, id);
        SignedPrekey {
            id,
            signature: self.sign(KIND_SIGNED, id, &key),
            key: Bytes::copy_from_slice(&key),
        }
    }

    /// The one-time prekey with id `id`, signed.
    pub fn one_time_prekey(&self, id: u32) -> OneTimePrekey {
        let key = self.curve_key(KIND_ONE_TIME, id);
        OneTimePrekey {
            id,
            signature: self.sign(KIND_ONE_TIME, id, &key),
            key: Bytes::copy_from_slice(&key),
        }
    }

    /// An upload of the identity key, the signed prekey `signed` (if any) and the one-time
    /// prekeys `one_time` (at most `PREKEYS_PER_UPLOAD_MAX` ids, or the node refuses it).
    pub fn upload(
        &self,
        signed: Option<u32>,
        one_time: impl IntoIterator<Item = u32>,
    ) -> PrekeyUpload {
        PrekeyUpload {
            identity_key: self.identity_key(),
            signed_prekey: signed.map(|id| self.signed_prekey(id)),
            one_time: one_time
                .into_iter()
                .map(|id| self.one_time_prekey(id))
                .collect(),
        }
    }

    /// An X25519-shaped public key for (`kind`, `id`): SHA-256 over the seed and both.
    fn curve_key(&self, kind: u8, id: u32) -> [u8; CURVE_KEY_BYTES] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"ringpost test curve key\0");
        ctx.update(&self.seed);
        ctx.update(&[kind]);
        ctx.update(&id.to_be_bytes());
        let mut key = [0u8; CURVE_KEY_BYTES];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_verify_and_tampering_is_caught() {
        let keys = DeviceKeys::from_seed([7; 32]);
        let upload = keys.upload(Some(3), 10..12);
        assert_eq!(upload.identity_key.len(), 64);
        let ik = &upload.identity_key;
        let spk = upload.signed_prekey.as_ref().unwrap();
        assert_eq!((spk.key.len(), spk.signature.len()), (32, 64));
        assert!(verify_prekey_signature(
            ik,
            KIND_SIGNED,
            spk.id,
            &spk.key,
            &spk.signature
        ));
        for k in &upload.one_time {
            assert!(verify_prekey_signature(
                ik,
                KIND_ONE_TIME,
                k.id,
                &k.key,
                &k.signature
            ));
            // The kind and the id are signed too.
            assert!(!verify_prekey_signature(
                ik,
                KIND_SIGNED,
                k.id,
                &k.key,
                &k.signature
            ));
            assert!(!verify_prekey_signature(
                ik,
                KIND_ONE_TIME,
                k.id + 1,
                &k.key,
                &k.signature
            ));
        }
        let other = DeviceKeys::from_seed([8; 32]);
        let k = &upload.one_time[0];
        assert!(!verify_prekey_signature(
            &other.identity_key(),
            KIND_ONE_TIME,
            k.id,
            &k.key,
            &k.signature
        ));
        assert!(!verify_prekey_signature(
            &ik[..63],
            KIND_ONE_TIME,
            k.id,
            &k.key,
            &k.signature
        ));
        // The same seed gives the same keys.
        assert_eq!(
            DeviceKeys::from_seed([7; 32]).upload(Some(3), 10..12),
            upload
        );
        assert_ne!(other.identity_key(), keys.identity_key());
        let bundle = DeviceBundle {
            device: 1,
            identity_key: upload.identity_key.clone(),
            signed_prekey: upload.signed_prekey.clone(),
            one_time: Some(upload.one_time[1].clone()),
        };
        assert!(verify_bundle(&bundle));
        let forged = DeviceBundle {
            identity_key: other.identity_key(),
            ..bundle
        };
        assert!(!verify_bundle(&forged));
    }
}
