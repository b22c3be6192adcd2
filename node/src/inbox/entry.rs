//! [`Entry`]: what the inbox stores for one device, and its binary encoding.
//!
//! Layout (format 2), integers big-endian:
//! `version u8 | kind u8 | flags u8 | from_user u64 | from_device u32 | msg_id [16] |
//!  server_time_ms u64 | expires_at_ms u64 | body_len u32 | body | receipts_len u16 |
//!  receipt msg_ids [16]*`. Format 1 is the same without `flags` (read as no flags).
//!
//! A group message stored by reference (flag [`FLAG_BODY_REF`], see `inbox/bodies.rs`) keeps
//! only `group | group_seq` as its body; the body itself is stored once per shard in
//! [`Cf::GroupBodies`]. [`Entry::decode`] returns such an entry as stored; `Inbox::read`
//! resolves it.
//!
//! [`Cf::GroupBodies`]: crate::storage::Cf::GroupBodies

use bytes::{BufMut, Bytes};
use ringpost_wire::{DeliverKind, DeviceId, MsgId, UserId};

use super::codec::{corrupt, Reader};
use crate::storage::StorageError;

const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;
const CF: &str = "inbox";
/// Bytes of a format-2 entry besides its body and receipts.
const FIXED_BYTES: usize = 1 + 1 + 1 + 8 + 4 + 16 + 8 + 8 + 4 + 2;
/// Flag bit of [`Entry::sole_copy`].
const FLAG_SOLE_COPY: u8 = 0b1;
/// Flag bit of an entry whose body is a reference to a shared group message body.
const FLAG_BODY_REF: u8 = 0b10;

/// What an entry is. The stored byte is the discriminant, equal to the wire's
/// [`DeliverKind`] value (checked by a test), so an entry maps to a `Deliver` one to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EntryKind {
    /// A ciphertext for this device.
    Message = 0,
    /// A device of `from_user` acked `receipt_msg_ids`.
    Delivered = 1,
    /// `from_user` read `receipt_msg_ids`.
    Read = 2,
    /// A group message; the body is `group | group_seq | ciphertext` ([`crate::groups`]).
    GroupMessage = 3,
    /// A group change; the body is `group | group_seq | GroupEvent frame`.
    GroupEvent = 4,
    /// A status item ([`crate::status`]); expires 24 hours after it was posted.
    Status = 5,
    /// `from_user` viewed the statuses `receipt_msg_ids`.
    StatusViewed = 6,
    /// `from_user`'s device `from_device` published a new identity key, the body
    /// ([`crate::keys::serve`]).
    IdentityChanged = 7,
}

impl EntryKind {
    /// Whether entries of this kind have a row in the expiry index ([`Cf::InboxExpiry`]):
    /// those that expire before the retention, so that the periodic expiry finds them by time
    /// rather than once the older entries of their device have gone.
    ///
    /// [`Cf::InboxExpiry`]: crate::storage::Cf::InboxExpiry
    pub(crate) fn indexes_expiry(self) -> bool {
        self == EntryKind::Status
    }

    fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(EntryKind::Message),
            1 => Some(EntryKind::Delivered),
            2 => Some(EntryKind::Read),
            3 => Some(EntryKind::GroupMessage),
            4 => Some(EntryKind::GroupEvent),
            5 => Some(EntryKind::Status),
            6 => Some(EntryKind::StatusViewed),
            7 => Some(EntryKind::IdentityChanged),
            _ => None,
        }
    }
}

impl From<EntryKind> for DeliverKind {
    fn from(kind: EntryKind) -> Self {
        match kind {
            EntryKind::Message => DeliverKind::Message,
            EntryKind::Delivered => DeliverKind::Delivered,
            EntryKind::Read => DeliverKind::Read,
            EntryKind::GroupMessage => DeliverKind::GroupMessage,
            EntryKind::GroupEvent => DeliverKind::GroupEvent,
            EntryKind::Status => DeliverKind::Status,
            EntryKind::StatusViewed => DeliverKind::StatusViewed,
            EntryKind::IdentityChanged => DeliverKind::IdentityChanged,
        }
    }
}

/// One stored inbox entry for one device: a message ciphertext or a receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub from_user: UserId,
    pub from_device: DeviceId,
    pub msg_id: MsgId,
    /// Set by [`Inbox::append`](super::Inbox::append) to its `now_ms`.
    pub server_time_ms: u64,
    /// Set by [`Inbox::append`](super::Inbox::append) to `now_ms + retention`, or kept if it is
    /// non-zero and sooner than that (an entry that must expire early, like a status). Reads
    /// skip an expired entry at once; the expiry sweep deletes it once it is the oldest entry
    /// of its device on disk (entries of one retention expire in seq order), or, for a kind
    /// that [indexes its expiry](EntryKind::indexes_expiry), by its expiry index row.
    pub expires_at_ms: u64,
    /// Opaque ciphertext (empty for receipts).
    pub body: Bytes,
    /// The messages a `Delivered` or `Read` receipt is about.
    pub receipt_msg_ids: Vec<MsgId>,
    /// Set by the inbox on a message stored for exactly one device of its recipient: that
    /// device's ack is the message's first, so its `delivered` receipt needs no bookkeeping.
    pub sole_copy: bool,
}

/// What an ack needs to know of the entry it acknowledges. The connection keeps it for every
/// entry in flight (taken from the entry when it was delivered), so an ack reads nothing back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHeader {
    pub kind: EntryKind,
    pub from_user: UserId,
    pub from_device: DeviceId,
    pub msg_id: MsgId,
    pub sole_copy: bool,
}

impl Entry {
    /// What an ack of this entry needs to know.
    pub fn header(&self) -> EntryHeader {
        EntryHeader {
            kind: self.kind,
            from_user: self.from_user,
            from_device: self.from_device,
            msg_id: self.msg_id,
            sole_copy: self.sole_copy,
        }
    }

    /// A message entry with a zero `server_time_ms`/`expires_at_ms` (the inbox sets them).
    pub fn message(from_user: UserId, from_device: DeviceId, msg_id: MsgId, body: Bytes) -> Self {
        Self {
            kind: EntryKind::Message,
            from_user,
            from_device,
            msg_id,
            server_time_ms: 0,
            expires_at_ms: 0,
            body,
            receipt_msg_ids: Vec::new(),
            sole_copy: false,
        }
    }

    /// The stored size: what this entry costs on disk and in a group commit.
    pub fn encoded_len(&self) -> usize {
        FIXED_BYTES + self.body.len() + 16 * self.receipt_msg_ids.len()
    }

    /// Encodes the entry. Callers bound the body and receipt list first (see
    /// [`super::ENTRY_BODY_BYTES_MAX`], [`super::RECEIPT_MSG_IDS_MAX`]); lengths beyond the
    /// format's fields would not fit and are rejected there, never truncated here.
    pub(crate) fn encode(&self) -> Vec<u8> {
        self.encode_with(0, &self.body)
    }

    /// Encodes the entry with `body_ref` (a shared body's `group | group_seq`) in place of its
    /// body, flagged as a reference.
    pub(crate) fn encode_body_ref(&self, body_ref: &[u8]) -> Vec<u8> {
        self.encode_with(FLAG_BODY_REF, body_ref)
    }

    fn encode_with(&self, flags: u8, body: &[u8]) -> Vec<u8> {
        debug_assert!(u32::try_from(body.len()).is_ok());
        debug_assert!(u16::try_from(self.receipt_msg_ids.len()).is_ok());
        let mut out =
            Vec::with_capacity(FIXED_BYTES + body.len() + 16 * self.receipt_msg_ids.len());
        let sole_copy = if self.sole_copy { FLAG_SOLE_COPY } else { 0 };
        out.put_u8(FORMAT_V2);
        out.put_u8(self.kind as u8);
        out.put_u8(flags | sole_copy);
        out.put_u64(self.from_user);
        out.put_u32(self.from_device);
        out.put_slice(&self.msg_id);
        out.put_u64(self.server_time_ms);
        out.put_u64(self.expires_at_ms);
        out.put_u32(body.len() as u32);
        out.put_slice(body);
        out.put_u16(self.receipt_msg_ids.len() as u16);
        for id in &self.receipt_msg_ids {
            out.put_slice(id);
        }
        out
    }

    /// Decodes an entry; the body is a zero-copy slice of `value`. An entry stored by reference
    /// comes back with the reference as its body: see [`Entry::decode_stored`].
    pub(crate) fn decode(value: Bytes) -> Result<Self, StorageError> {
        Self::decode_stored(value).map(|(entry, _)| entry)
    }

    /// Decodes an entry, and whether its body is a reference to a shared group message body
    /// (then the body is that reference, `group | group_seq`).
    pub(crate) fn decode_stored(value: Bytes) -> Result<(Self, bool), StorageError> {
        let mut r = Reader::new(&value);
        let short = || corrupt(CF, "entry is truncated");
        let version = r.u8().ok_or_else(short)?;
        if version != FORMAT_V1 && version != FORMAT_V2 {
            return Err(corrupt(CF, format!("unknown entry format {version}")));
        }
        let kind_byte = r.u8().ok_or_else(short)?;
        let kind = EntryKind::from_u8(kind_byte)
            .ok_or_else(|| corrupt(CF, format!("unknown entry kind {kind_byte}")))?;
        let flags = if version == FORMAT_V2 {
            r.u8().ok_or_else(short)?
        } else {
            0
        };
        if flags & !(FLAG_SOLE_COPY | FLAG_BODY_REF) != 0 {
            return Err(corrupt(CF, format!("unknown entry flags {flags:#04x}")));
        }
        let from_user = r.u64().ok_or_else(short)?;
        let from_device = r.u32().ok_or_else(short)?;
        let msg_id = r.array::<16>().ok_or_else(short)?;
        let server_time_ms = r.u64().ok_or_else(short)?;
        let expires_at_ms = r.u64().ok_or_else(short)?;
        let body_len = r.u32().ok_or_else(short)? as usize;
        let body_start = r.position();
        r.bytes(body_len).ok_or_else(short)?;
        let receipts = usize::from(r.u16().ok_or_else(short)?);
        if value.len() - r.position() != 16 * receipts {
            return Err(corrupt(CF, "receipt list length does not match the record"));
        }
        let mut receipt_msg_ids = Vec::with_capacity(receipts);
        for _ in 0..receipts {
            receipt_msg_ids.push(r.array::<16>().ok_or_else(short)?);
        }
        debug_assert!(r.is_done());
        let body = value.slice(body_start..body_start + body_len);
        let body_ref = flags & FLAG_BODY_REF != 0;
        if body_ref && (kind != EntryKind::GroupMessage || body_len != super::bodies::BODY_REF_LEN)
        {
            return Err(corrupt(CF, "a body reference of the wrong kind or length"));
        }
        let entry = Self {
            kind,
            from_user,
            from_device,
            msg_id,
            server_time_ms,
            expires_at_ms,
            body,
            receipt_msg_ids,
            sole_copy: flags & FLAG_SOLE_COPY != 0,
        };
        Ok((entry, body_ref))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        Entry {
            kind: EntryKind::Read,
            from_user: u64::MAX,
            from_device: 3,
            msg_id: [7; 16],
            server_time_ms: 1_700_000_000_000,
            expires_at_ms: 1_702_592_000_000,
            body: Bytes::from_static(b"ciphertext"),
            receipt_msg_ids: vec![[1; 16], [2; 16]],
            sole_copy: true,
        }
    }

    #[test]
    fn roundtrips() {
        for e in [sample(), Entry::message(1, 2, [0; 16], Bytes::new())] {
            let bytes = e.encode();
            assert_eq!(bytes.len(), e.encoded_len());
            assert_eq!(Entry::decode(Bytes::from(bytes)).unwrap(), e);
        }
    }

    #[test]
    fn kinds_match_the_wire_values() {
        for kind in [
            EntryKind::Message,
            EntryKind::Delivered,
            EntryKind::Read,
            EntryKind::GroupMessage,
            EntryKind::GroupEvent,
            EntryKind::Status,
            EntryKind::StatusViewed,
            EntryKind::IdentityChanged,
        ] {
            assert_eq!(kind as u8, DeliverKind::from(kind) as u8);
            assert_eq!(EntryKind::from_u8(kind as u8), Some(kind));
        }
        assert_eq!(EntryKind::from_u8(8), None);
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let good = sample().encode();
        for len in 0..good.len() {
            let err = Entry::decode(Bytes::copy_from_slice(&good[..len])).unwrap_err();
            assert!(
                matches!(err, StorageError::Corrupt { cf: "inbox", .. }),
                "{len}: {err}"
            );
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(Entry::decode(Bytes::from(trailing)).is_err());
        let mut version = good.clone();
        version[0] = 3;
        assert!(Entry::decode(Bytes::from(version)).is_err());
        let mut kind = good.clone();
        kind[1] = 9;
        assert!(Entry::decode(Bytes::from(kind)).is_err());
        let mut flags = good.clone();
        flags[2] = 0x80;
        assert!(Entry::decode(Bytes::from(flags)).is_err());
        let mut body_len = good;
        body_len[47..51].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Entry::decode(Bytes::from(body_len)).is_err());
    }

    #[test]
    fn format_1_still_decodes() {
        let e = Entry {
            sole_copy: false,
            ..sample()
        };
        let mut v1 = e.encode();
        v1.remove(2);
        v1[0] = 1;
        assert_eq!(Entry::decode(Bytes::from(v1)).unwrap(), e);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = Entry::decode(Bytes::from(bytes));
        }

        #[test]
        fn any_entry_roundtrips(
            kind in 0u8..3,
            from_user: u64,
            from_device: u32,
            msg_id: [u8; 16],
            server_time_ms: u64,
            expires_at_ms: u64,
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            receipt_msg_ids in proptest::collection::vec(proptest::prelude::any::<[u8; 16]>(), 0..20),
            sole_copy: bool,
        ) {
            let entry = Entry {
                kind: EntryKind::from_u8(kind).unwrap(),
                from_user,
                from_device,
                msg_id,
                server_time_ms,
                expires_at_ms,
                body: Bytes::from(body),
                receipt_msg_ids,
                sole_copy,
            };
            proptest::prop_assert_eq!(Entry::decode(Bytes::from(entry.encode())).unwrap(), entry);
        }
    }
}
