//! The byte formats the SDK puts into ciphertext fields (docs/protocol.md, "End-to-end
//! encryption in the SDK"):
//!
//! - a 1:1 ciphertext (`DeviceCiphertext.body`, `Deliver.body` of kind `Message`):
//!   `version:u8 = 1 | olm_type:u8 (0 pre-key, 1 normal) | olm message`;
//! - a group ciphertext (`GroupSend.body`, `Deliver.body` of kind `GroupMessage`):
//!   `version:u8 = 1 | session_id (32 bytes, the Megolm session's Ed25519 key) | megolm message`;
//! - the plaintext inside an Olm message, the envelope: `kind:u8 | ...`, kind
//!   [`ENVELOPE_APP`] followed by the application's bytes, or [`ENVELOPE_GROUP_KEY`] followed by
//!   the group id (16) and a Megolm session key.

use bytes::Bytes;
use ringpost_wire::GroupId;
use vodozemac::megolm::MegolmMessage;
use vodozemac::olm::OlmMessage;

/// Version byte of a 1:1 ciphertext.
pub const OLM_BODY_VERSION: u8 = 1;
/// Version byte of a group ciphertext.
pub const GROUP_BODY_VERSION: u8 = 1;
/// Envelope kind: an application message.
pub const ENVELOPE_APP: u8 = 1;
/// Envelope kind: a Megolm session key for a group.
pub const ENVELOPE_GROUP_KEY: u8 = 2;
/// Bytes of a Megolm session id on the wire.
pub const SESSION_ID_BYTES: usize = 32;

/// What one Olm message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    /// Application bytes.
    App(Bytes),
    /// The sender's Megolm session key for `group` (vodozemac `SessionKey` bytes).
    GroupKey {
        group: GroupId,
        session_key: Vec<u8>,
    },
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Envelope::App(body) => {
                let mut out = Vec::with_capacity(1 + body.len());
                out.push(ENVELOPE_APP);
                out.extend_from_slice(body);
                out
            }
            Envelope::GroupKey { group, session_key } => {
                let mut out = Vec::with_capacity(1 + group.len() + session_key.len());
                out.push(ENVELOPE_GROUP_KEY);
                out.extend_from_slice(group);
                out.extend_from_slice(session_key);
                out
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope, String> {
        match bytes.split_first() {
            Some((&ENVELOPE_APP, rest)) => Ok(Envelope::App(Bytes::copy_from_slice(rest))),
            Some((&ENVELOPE_GROUP_KEY, rest)) if rest.len() > 16 => {
                let mut group = GroupId::default();
                group.copy_from_slice(&rest[..16]);
                Ok(Envelope::GroupKey {
                    group,
                    session_key: rest[16..].to_vec(),
                })
            }
            Some((&ENVELOPE_GROUP_KEY, _)) => Err("group key envelope too short".to_string()),
            Some((kind, _)) => Err(format!("unknown envelope kind {kind}")),
            None => Err("empty envelope".to_string()),
        }
    }
}

/// A 1:1 ciphertext body for one Olm message.
pub fn encode_olm(message: &OlmMessage) -> Bytes {
    let (kind, bytes) = message.to_parts();
    let mut out = Vec::with_capacity(2 + bytes.len());
    out.push(OLM_BODY_VERSION);
    // 0 or 1: vodozemac's message types.
    out.push(u8::try_from(kind).unwrap_or(u8::MAX));
    out.extend_from_slice(&bytes);
    Bytes::from(out)
}

/// Parses a 1:1 ciphertext body.
pub fn decode_olm(body: &[u8]) -> Result<OlmMessage, String> {
    match body {
        [OLM_BODY_VERSION, kind, rest @ ..] => {
            OlmMessage::from_parts(usize::from(*kind), rest).map_err(|e| e.to_string())
        }
        [version, ..] => Err(format!("unknown 1:1 ciphertext version {version}")),
        [] => Err("empty ciphertext".to_string()),
    }
}

/// A group ciphertext body.
pub fn encode_group(session_id: &[u8; SESSION_ID_BYTES], message: &MegolmMessage) -> Bytes {
    let bytes = message.to_bytes();
    let mut out = Vec::with_capacity(1 + SESSION_ID_BYTES + bytes.len());
    out.push(GROUP_BODY_VERSION);
    out.extend_from_slice(session_id);
    out.extend_from_slice(&bytes);
    Bytes::from(out)
}

/// Parses a group ciphertext body into its session id and Megolm message.
pub fn decode_group(body: &[u8]) -> Result<([u8; SESSION_ID_BYTES], MegolmMessage), String> {
    match body.split_first() {
        Some((&GROUP_BODY_VERSION, rest)) if rest.len() > SESSION_ID_BYTES => {
            let mut id = [0u8; SESSION_ID_BYTES];
            id.copy_from_slice(&rest[..SESSION_ID_BYTES]);
            let message =
                MegolmMessage::from_bytes(&rest[SESSION_ID_BYTES..]).map_err(|e| e.to_string())?;
            Ok((id, message))
        }
        Some((&GROUP_BODY_VERSION, _)) => Err("group ciphertext too short".to_string()),
        Some((version, _)) => Err(format!("unknown group ciphertext version {version}")),
        None => Err("empty ciphertext".to_string()),
    }
}

/// The raw 32 bytes of a vodozemac session id (unpadded base64 of an Ed25519 key).
pub fn session_id_bytes(session_id: &str) -> Option<[u8; SESSION_ID_BYTES]> {
    vodozemac::base64_decode(session_id).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_bad_ones_are_refused() {
        let app = Envelope::App(Bytes::from_static(b"hi"));
        assert_eq!(Envelope::decode(&app.encode()).unwrap(), app);
        let key = Envelope::GroupKey {
            group: [3; 16],
            session_key: vec![1, 2, 3],
        };
        assert_eq!(Envelope::decode(&key.encode()).unwrap(), key);
        assert!(Envelope::decode(&[]).is_err());
        assert!(Envelope::decode(&[9, 1]).is_err());
        assert!(Envelope::decode(&[ENVELOPE_GROUP_KEY, 1, 2]).is_err());
        assert!(decode_olm(&[]).is_err());
        assert!(decode_olm(&[2, 0, 1]).is_err());
        assert!(decode_olm(&[1, 7, 1]).is_err());
        assert!(decode_olm(&[1, 0, 1, 2, 3]).is_err());
        assert!(decode_group(&[1; 20]).is_err());
        assert!(decode_group(&[1; 200]).is_err());
        assert!(decode_group(&[]).is_err());
    }
}
