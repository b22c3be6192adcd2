//! Prekey signatures: what a device signs when it publishes a prekey, and the check a sender
//! makes on a claimed bundle before it uses a key (docs/protocol.md, "End-to-end encryption in
//! the SDK").
//!
//! A device's `identity_key` on the wire is 64 bytes: its Ed25519 signing key (32) then its
//! Curve25519 identity key (32). Every prekey carries an Ed25519 signature by that signing key
//! over [`signing_payload`]:
//! `b"ringpost prekey v1\0" || kind:u8 || key_id:u32 big-endian || key (32 bytes)`, kind
//! [`KIND_SIGNED`] for the signed (fallback) prekey and [`KIND_ONE_TIME`] for a one-time prekey.

use ringpost_wire::{DeviceBundle, DeviceId, UserId};
use vodozemac::olm::Account;
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};

use super::error::CryptoError;

/// The domain separation prefix of every prekey signature.
pub const PREKEY_SIGNATURE_CONTEXT: &[u8] = b"ringpost prekey v1\0";
/// Kind byte of the signed prekey (the vodozemac fallback key).
pub const KIND_SIGNED: u8 = 1;
/// Kind byte of a one-time prekey.
pub const KIND_ONE_TIME: u8 = 2;
/// Bytes of a published identity key: Ed25519 (32) then Curve25519 (32).
pub const IDENTITY_KEY_BYTES: usize = 64;
/// Bytes of a Curve25519 prekey.
pub const PREKEY_BYTES: usize = 32;
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;

const PAYLOAD_BYTES: usize = PREKEY_SIGNATURE_CONTEXT.len() + 1 + 4 + PREKEY_BYTES;

/// The bytes signed for a prekey of `kind` with id `key_id`.
pub fn signing_payload(kind: u8, key_id: u32, key: &[u8; PREKEY_BYTES]) -> [u8; PAYLOAD_BYTES] {
    let mut out = [0u8; PAYLOAD_BYTES];
    let context = PREKEY_SIGNATURE_CONTEXT.len();
    out[..context].copy_from_slice(PREKEY_SIGNATURE_CONTEXT);
    out[context] = kind;
    out[context + 1..context + 5].copy_from_slice(&key_id.to_be_bytes());
    out[context + 5..].copy_from_slice(key);
    out
}

/// Signs a prekey with the account's Ed25519 identity key.
pub fn sign_prekey(
    account: &Account,
    kind: u8,
    key_id: u32,
    key: &Curve25519PublicKey,
) -> [u8; SIGNATURE_BYTES] {
    account
        .sign(signing_payload(kind, key_id, key.as_bytes()))
        .to_bytes()
}

/// The 64-byte identity key an account publishes.
pub fn identity_key_bytes(account: &Account) -> [u8; IDENTITY_KEY_BYTES] {
    let keys = account.identity_keys();
    let mut out = [0u8; IDENTITY_KEY_BYTES];
    out[..32].copy_from_slice(keys.ed25519.as_bytes());
    out[32..].copy_from_slice(keys.curve25519.as_bytes());
    out
}

/// A device's bundle after its signatures were checked: the keys to start a session with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedBundle {
    pub device: DeviceId,
    pub signing_key: Ed25519PublicKey,
    pub identity_key: Curve25519PublicKey,
    /// The prekey to start the session with: the one-time prekey if the bundle carried one with
    /// a valid signature, else the signed (fallback) prekey.
    pub prekey: Curve25519PublicKey,
    /// Whether `prekey` is a one-time prekey.
    pub one_time: bool,
}

/// Checks a claimed bundle of `user`'s device. The signed prekey must be present and correctly
/// signed. A one-time prekey is used only if its own signature verifies; one without a valid
/// signature is ignored (the signed prekey is used instead), never trusted.
pub fn verify_bundle(user: UserId, bundle: &DeviceBundle) -> Result<VerifiedBundle, CryptoError> {
    let bad = |reason: String| CryptoError::BadBundle {
        user,
        device: bundle.device,
        reason,
    };
    let identity: &[u8; IDENTITY_KEY_BYTES] =
        bundle.identity_key.as_ref().try_into().map_err(|_| {
            bad(format!(
                "identity key is {} bytes, not {IDENTITY_KEY_BYTES}",
                bundle.identity_key.len()
            ))
        })?;
    let mut ed = [0u8; 32];
    ed.copy_from_slice(&identity[..32]);
    let signing_key =
        Ed25519PublicKey::from_slice(&ed).map_err(|e| bad(format!("Ed25519 key: {e}")))?;
    let identity_key = curve_key(&identity[32..]).map_err(&bad)?;
    let signed = bundle
        .signed_prekey
        .as_ref()
        .ok_or_else(|| bad("no signed prekey".to_string()))?;
    let signed_key = curve_key(&signed.key).map_err(&bad)?;
    check_signature(
        &signing_key,
        KIND_SIGNED,
        signed.id,
        &signed_key,
        &signed.signature,
    )
    .map_err(|e| bad(format!("signed prekey {}: {e}", signed.id)))?;
    let one_time = bundle.one_time.as_ref().and_then(|k| {
        let key = curve_key(&k.key).ok()?;
        match check_signature(&signing_key, KIND_ONE_TIME, k.id, &key, &k.signature) {
            Ok(()) => Some(key),
            Err(e) => {
                tracing::warn!(user, device = bundle.device, id = k.id, error = %e,
                    "ignoring a one-time prekey without a valid signature; using the signed prekey");
                None
            }
        }
    });
    Ok(VerifiedBundle {
        device: bundle.device,
        signing_key,
        identity_key,
        prekey: one_time.unwrap_or(signed_key),
        one_time: one_time.is_some(),
    })
}

fn curve_key(bytes: &[u8]) -> Result<Curve25519PublicKey, String> {
    let key: [u8; PREKEY_BYTES] = bytes.try_into().map_err(|_| {
        format!(
            "Curve25519 key is {} bytes, not {PREKEY_BYTES}",
            bytes.len()
        )
    })?;
    Ok(Curve25519PublicKey::from_bytes(key))
}

fn check_signature(
    signing_key: &Ed25519PublicKey,
    kind: u8,
    key_id: u32,
    key: &Curve25519PublicKey,
    signature: &[u8],
) -> Result<(), String> {
    let signature = Ed25519Signature::from_slice(signature).map_err(|e| e.to_string())?;
    signing_key
        .verify(&signing_payload(kind, key_id, key.as_bytes()), &signature)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use ringpost_wire::{OneTimePrekey, SignedPrekey};

    use super::*;

    fn bundle(account: &Account, spk_id: u32, otk_id: u32) -> DeviceBundle {
        let spk = Curve25519PublicKey::from_bytes([9; 32]);
        let otk = Curve25519PublicKey::from_bytes([7; 32]);
        DeviceBundle {
            device: 2,
            identity_key: Bytes::copy_from_slice(&identity_key_bytes(account)),
            signed_prekey: Some(SignedPrekey {
                id: spk_id,
                key: Bytes::copy_from_slice(spk.as_bytes()),
                signature: Bytes::copy_from_slice(&sign_prekey(account, KIND_SIGNED, spk_id, &spk)),
            }),
            one_time: Some(OneTimePrekey {
                id: otk_id,
                key: Bytes::copy_from_slice(otk.as_bytes()),
                signature: Bytes::copy_from_slice(&sign_prekey(
                    account,
                    KIND_ONE_TIME,
                    otk_id,
                    &otk,
                )),
            }),
        }
    }

    #[test]
    fn the_payload_is_the_documented_bytes() {
        let payload = signing_payload(KIND_ONE_TIME, 0x0102_0304, &[0xaa; 32]);
        let mut want = b"ringpost prekey v1\0".to_vec();
        want.extend_from_slice(&[2, 1, 2, 3, 4]);
        want.extend_from_slice(&[0xaa; 32]);
        assert_eq!(payload.as_slice(), want.as_slice());
    }

    #[test]
    fn a_signed_bundle_verifies_and_prefers_the_one_time_key() {
        let account = Account::new();
        let verified = verify_bundle(5, &bundle(&account, 1, 2)).unwrap();
        assert!(verified.one_time);
        assert_eq!(verified.prekey.as_bytes(), &[7; 32]);
        assert_eq!(verified.identity_key, account.curve25519_key());
        assert_eq!(verified.signing_key, account.ed25519_key());
    }

    #[test]
    fn an_unsigned_or_missigned_one_time_key_falls_back_to_the_signed_prekey() {
        let account = Account::new();
        let mut b = bundle(&account, 1, 2);
        b.one_time.as_mut().unwrap().signature = Bytes::new();
        let verified = verify_bundle(5, &b).unwrap();
        assert!(!verified.one_time);
        assert_eq!(verified.prekey.as_bytes(), &[9; 32]);
        // A signature for another id does not carry over.
        let mut b = bundle(&account, 1, 2);
        b.one_time.as_mut().unwrap().id = 3;
        assert!(!verify_bundle(5, &b).unwrap().one_time);
        // Nor does the signed-prekey kind.
        let mut b = bundle(&account, 2, 2);
        b.one_time.as_mut().unwrap().signature =
            b.signed_prekey.as_ref().unwrap().signature.clone();
        b.one_time.as_mut().unwrap().key = b.signed_prekey.as_ref().unwrap().key.clone();
        assert!(!verify_bundle(5, &b).unwrap().one_time);
    }

    #[test]
    fn a_bad_signed_prekey_or_identity_is_refused() {
        let account = Account::new();
        let other = Account::new();
        let mut b = bundle(&account, 1, 2);
        b.identity_key = Bytes::copy_from_slice(&identity_key_bytes(&other));
        assert!(matches!(
            verify_bundle(5, &b),
            Err(CryptoError::BadBundle { .. })
        ));
        let mut b = bundle(&account, 1, 2);
        b.signed_prekey.as_mut().unwrap().id = 9;
        assert!(matches!(
            verify_bundle(5, &b),
            Err(CryptoError::BadBundle { .. })
        ));
        let mut b = bundle(&account, 1, 2);
        b.identity_key = b.identity_key.slice(..32);
        assert!(matches!(
            verify_bundle(5, &b),
            Err(CryptoError::BadBundle { .. })
        ));
        let mut b = bundle(&account, 1, 2);
        b.signed_prekey = None;
        assert!(matches!(
            verify_bundle(5, &b),
            Err(CryptoError::BadBundle { .. })
        ));
    }
}
