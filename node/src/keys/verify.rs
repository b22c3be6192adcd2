//! Verification of a prekey upload against the format of [`ringpost_wire::prekeys`]: exact key
//! lengths, then every signature with `ring`'s Ed25519. The whole upload is refused at the
//! first failure, before anything is stored.
//!
//! Cost: one Ed25519 verification per key, so up to 101 per upload (the signed prekey and
//! `PREKEYS_PER_UPLOAD_MAX` one-time prekeys); `benches/prekeys.rs` measures it. Uploads are
//! budgeted (10 a minute per device), so a device can make its node verify at most about
//! 1000 signatures a minute.

use ring::signature::{UnparsedPublicKey, ED25519};
use ringpost_wire::prekeys::{
    signing_key, signing_message, CURVE_KEY_BYTES, IDENTITY_KEY_BYTES, KIND_ONE_TIME, KIND_SIGNED,
    SIGNATURE_BYTES,
};
use ringpost_wire::PrekeyUpload;

use super::KeysError;

/// Checks every key length and signature of `upload`. `KeyLength` for a key of the wrong
/// length, `BadSignature` for a signature that is missing, of the wrong length, or does not
/// verify.
pub fn upload(upload: &PrekeyUpload) -> Result<(), KeysError> {
    let Some(signer) = signing_key(&upload.identity_key) else {
        return Err(KeysError::KeyLength {
            what: "identity key",
            len: upload.identity_key.len(),
            expected: IDENTITY_KEY_BYTES,
        });
    };
    let signer = UnparsedPublicKey::new(&ED25519, signer);
    let keys = upload
        .signed_prekey
        .iter()
        .map(|k| ("signed prekey", KIND_SIGNED, k.id, &k.key, &k.signature))
        .chain(
            upload
                .one_time
                .iter()
                .map(|k| ("one-time prekey", KIND_ONE_TIME, k.id, &k.key, &k.signature)),
        );
    for (what, kind, id, key, signature) in keys {
        let Ok(key) = <&[u8; CURVE_KEY_BYTES]>::try_from(key.as_ref()) else {
            return Err(KeysError::KeyLength {
                what,
                len: key.len(),
                expected: CURVE_KEY_BYTES,
            });
        };
        let why = if signature.is_empty() {
            "is missing"
        } else if signature.len() != SIGNATURE_BYTES {
            "is not 64 bytes"
        } else if signer
            .verify(&signing_message(kind, id, key), signature)
            .is_err()
        {
            "does not verify with the identity key"
        } else {
            continue;
        };
        return Err(KeysError::BadSignature { what, id, why });
    }
    Ok(())
}
