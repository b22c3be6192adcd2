//! Hard limits of the protocol. Every frame, list and string on the wire is bounded; a peer that
//! exceeds a bound gets `Error{code}` (see [`crate::ErrorCode`]) and, where the stream can no
//! longer be trusted, a clean close. Each bound says what it costs at worst.

/// Protocol version spoken by this build. A `Hello` or frame carrying another version is refused
/// with [`crate::ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest encoded frame, in bytes (128 KiB). Worst case per connection: one frame being
/// assembled, so 128 KiB while a maximal frame is in flight, nothing when idle.
pub const FRAME_BYTES_MAX: usize = 128 * 1024;

/// Largest single ciphertext inside a `Send` or `Deliver` (the frame bound still applies to the
/// sum). Stored once per recipient device: an inbox entry is at most this plus ~64 bytes.
pub const CIPHERTEXT_BYTES_MAX: usize = 64 * 1024;

/// Devices per user: one primary and up to four linked devices.
pub const DEVICES_PER_USER_MAX: usize = 5;

/// Largest ciphertext of a `GroupSend`: a member's node stores one copy per device of the
/// member in one commit, and five copies of this (with their headers) fit its 256 KiB bound.
pub const GROUP_CIPHERTEXT_BYTES_MAX: usize = 48 * 1024;

/// Ciphertexts in one `Send`: every device of the recipient plus every other device of the
/// sender.
pub const SEND_CIPHERTEXTS_MAX: usize = 2 * DEVICES_PER_USER_MAX;

/// Distinct recipients of one `BroadcastSend` (a broadcast list's size).
pub const BROADCAST_RECIPIENTS_MAX: usize = 256;

/// Ciphertexts in one `BroadcastSend`: every device of every recipient. The frame itself is
/// still bounded by [`FRAME_BYTES_MAX`], which is what bounds the bytes a node holds for one.
pub const BROADCAST_CIPHERTEXTS_MAX: usize = BROADCAST_RECIPIENTS_MAX * DEVICES_PER_USER_MAX;

/// Devices named in one field of a `BroadcastResult` (as in `MismatchedDevices`).
pub const BROADCAST_RESULT_DEVICES_MAX: usize = SEND_CIPHERTEXTS_MAX;

/// Sequence numbers acknowledged by one `DeliverAck`, and message ids in one receipt.
pub const ACK_SEQS_MAX: usize = 256;

/// Message ids referenced by one receipt.
pub const RECEIPT_MSG_IDS_MAX: usize = 256;

/// Users in one presence subscription frame; the node bounds the total per connection separately.
pub const PRESENCE_USERS_MAX: usize = 256;

/// One-time prekeys in one upload.
pub const PREKEYS_PER_UPLOAD_MAX: usize = 100;

/// Public key bytes (Curve25519 keys are 32 bytes, plus a type byte).
pub const KEY_BYTES_MAX: usize = 64;

/// A claim that takes a device's one-time prekeys below this many makes the node send that
/// device's connection an unprompted `PrekeyCount` (once per crossing), so it uploads more
/// before senders fall back to its signed prekey.
pub const PREKEY_LOW_WATERMARK: u32 = 10;

/// Signature bytes (Ed25519/XEdDSA signatures are 64 bytes).
pub const SIGNATURE_BYTES_MAX: usize = 96;

/// Members of one group, and members changed by one update.
pub const GROUP_MEMBERS_MAX: usize = 1024;

/// Encrypted group metadata (title, description, avatar reference).
pub const GROUP_META_BYTES_MAX: usize = 4 * 1024;

/// Any free-text string: device names, user agents, error messages, codes, URLs.
pub const STRING_BYTES_MAX: usize = 256;

/// Device authentication token length (random, 32 bytes).
pub const TOKEN_BYTES: usize = 32;

/// Longest push token a device may register (`PushRegister.token`). APNs device tokens are 64
/// hex characters and FCM registration tokens about 160; the bound leaves room for both to
/// grow. Storage: one such row per device on its user's owner (and its replicas).
pub const PUSH_TOKEN_BYTES_MAX: usize = 4096;

/// Client-chosen message id length.
pub const MSG_ID_BYTES: usize = 16;

/// Group id length (server-assigned, random).
pub const GROUP_ID_BYTES: usize = 16;
/// Length of a group invite code (server-chosen random bytes).
pub const GROUP_INVITE_CODE_BYTES: usize = 16;

/// Largest media object a grant may be asked for (100 MiB).
pub const MEDIA_BYTES_MAX: u64 = 100 * 1024 * 1024;

/// Length of `MediaUploadRequest.sha256`: a SHA-256 digest of the ciphertext (exact).
pub const MEDIA_SHA256_BYTES: usize = 32;

/// Largest `Migrate.reconnect_after_ms` (one minute): how long a node may keep a moved device
/// away from its new owner. A node spreads the reconnects of a moved shard's devices over at most
/// this long; a client waits at most this long, whatever a frame says.
pub const MIGRATE_RECONNECT_AFTER_MS_MAX: u32 = 60_000;

/// Users in each list of one `ContactsUpdate` (`add`, `remove`, `block`, `unblock`): 32 KiB of
/// ids, a quarter of a frame.
pub const PRIVACY_CONTACTS_MAX: usize = 4096;

/// Contacts one user keeps (on its owner's shard): at worst 4096 rows of 12 bytes of key.
pub const CONTACTS_MAX: usize = 4096;

/// Users one user blocks (on its owner's shard): at worst 4096 rows of 12 bytes of key.
pub const BLOCKED_MAX: usize = 4096;

/// Typing indicators a device may send per second; the node drops (silently) what is over it.
pub const TYPING_PER_S_MAX: u32 = 2;

// Bounds on the flatbuffers verifier's work per frame. A frame is verified before any field is
// read, and verification must cost no more than a small multiple of the frame's size even for a
// hostile buffer (a DAG of offsets all pointing at one large table, for instance).

/// Deepest table nesting the verifier follows. The schema nests at most 4 deep (Frame →
/// PrekeyBundle → DeviceBundle → SignedPrekey); the headroom lets a new nested table land
/// without a lockstep change here. Bounds the verifier's recursion.
pub const VERIFY_DEPTH_MAX: usize = 8;

/// Tables the verifier visits in one frame. The largest legal frame has 1282 (a
/// `BroadcastSend` with [`BROADCAST_CIPHERTEXTS_MAX`] ciphertexts); a frame over this is
/// malformed whatever its list lengths say. Verification stays linear in the frame size
/// ([`VERIFY_APPARENT_BYTES_MAX`]).
pub const VERIFY_TABLES_MAX: usize = 2048;

/// Bytes the verifier may read in one frame, counting bytes reached twice (through shared
/// offsets) twice: twice the frame bound, so verification is linear in the frame size.
pub const VERIFY_APPARENT_BYTES_MAX: usize = 2 * FRAME_BYTES_MAX;

const _: () = assert!(3 + PREKEYS_PER_UPLOAD_MAX < VERIFY_TABLES_MAX);
const _: () = assert!(2 + BROADCAST_CIPHERTEXTS_MAX < VERIFY_TABLES_MAX);

/// `text` cut to at most [`STRING_BYTES_MAX`] bytes on a character boundary, ending in "…" when
/// it was cut. For text a server or client makes itself (error messages, close reasons), which
/// must always fit the frame it goes in: an over-long message would make the frame unencodable
/// and the answer would never leave.
pub fn bounded_text(mut text: String) -> String {
    if text.len() <= STRING_BYTES_MAX {
        return text;
    }
    const ELLIPSIS: &str = "…";
    let mut end = STRING_BYTES_MAX - ELLIPSIS.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(ELLIPSIS);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_text_keeps_short_text_and_cuts_long_text_on_a_char_boundary() {
        assert_eq!(bounded_text("short".into()), "short");
        let exact = "x".repeat(STRING_BYTES_MAX);
        assert_eq!(bounded_text(exact.clone()), exact);
        for pad in 0..4 {
            let long = format!("{}{}", "y".repeat(pad), "é".repeat(STRING_BYTES_MAX));
            let cut = bounded_text(long.clone());
            assert!(cut.len() <= STRING_BYTES_MAX, "{}", cut.len());
            assert!(cut.ends_with('…'));
            assert!(long.starts_with(cut.trim_end_matches('…')));
        }
    }
}
