//! The receipt outbox: `delivered` receipts whose sender lives on another node (or whose
//! sender's shard this node cannot write right now) wait here until they are stored there.
//!
//! An ack that makes a message's first acknowledgement records the receipt in the SAME batch as
//! the ack: in the sender's device inboxes when the sender is local, else as a row in the
//! acking user's outbox, a reserved device ([`OUTBOX_DEVICE`]) of that user's inbox. The outbox
//! therefore lives in the acking user's shard and moves with it in a hand-off, and a crash
//! between the ack and the receipt loses neither: both or neither are on disk. The node's
//! outbox task (`crate::outbox`) stores each row on the sender's owner with a dedup key (so a
//! row sent twice after a crash is stored once) and then acks it like any entry.

use bytes::{BufMut, Bytes};
use ringpost_wire::{DeviceId, MsgId, UserId};
use sha2::{Digest, Sha256};

use super::entry::{Entry, EntryKind};

/// The device id of a user's receipt outbox. No client device ever has it: accounts hand out
/// small device ids (a user has at most `DEVICES_PER_USER_MAX`).
pub const OUTBOX_DEVICE: DeviceId = DeviceId::MAX;

/// One `delivered` receipt waiting to be stored on its recipient's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxReceipt {
    /// Who gets the receipt: the sender of the acknowledged messages.
    pub to_user: UserId,
    /// The user and device that acknowledged them.
    pub from_user: UserId,
    pub from_device: DeviceId,
    /// The receipt's own id (see [`receipt_id`]).
    pub msg_id: MsgId,
    pub msg_ids: Vec<MsgId>,
}

impl OutboxReceipt {
    /// The outbox row: a `Delivered` entry whose body is the recipient's user id.
    pub fn to_entry(&self) -> Entry {
        let mut body = Vec::with_capacity(8);
        body.put_u64(self.to_user);
        Entry {
            kind: EntryKind::Delivered,
            receipt_msg_ids: self.msg_ids.clone(),
            ..Entry::message(
                self.from_user,
                self.from_device,
                self.msg_id,
                Bytes::from(body),
            )
        }
    }

    /// The receipt an outbox row holds, or `None` if the row is not one.
    pub fn from_entry(entry: &Entry) -> Option<Self> {
        let to: [u8; 8] = entry.body.as_ref().try_into().ok()?;
        (entry.kind == EntryKind::Delivered).then(|| OutboxReceipt {
            to_user: u64::from_be_bytes(to),
            from_user: entry.from_user,
            from_device: entry.from_device,
            msg_id: entry.msg_id,
            msg_ids: entry.receipt_msg_ids.clone(),
        })
    }
}

/// The id of a receipt about `msg_ids`: the message's own id for one message (as receipts
/// always had), else the first 16 bytes of SHA-256 over the ids. A receipt the node makes again
/// for the same messages (an ack redelivered after a crash) gets the same id, so clients
/// deduplicating by (sender, kind, id) drop it, while a receipt about other messages never
/// shares an id with it.
pub fn receipt_id(msg_ids: &[MsgId]) -> MsgId {
    match msg_ids {
        [one] => *one,
        many => {
            let mut h = Sha256::new();
            for id in many {
                h.update(id);
            }
            let digest = h.finalize();
            let mut id = [0; 16];
            id.copy_from_slice(&digest[..16]);
            id
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_roundtrip_and_foreign_entries_are_not_rows() {
        let r = OutboxReceipt {
            to_user: 42,
            from_user: 7,
            from_device: 2,
            msg_id: [9; 16],
            msg_ids: vec![[1; 16], [2; 16]],
        };
        assert_eq!(OutboxReceipt::from_entry(&r.to_entry()), Some(r));
        let message = Entry::message(1, 1, [0; 16], Bytes::from_static(&[0; 8]));
        assert_eq!(OutboxReceipt::from_entry(&message), None);
        let short = Entry {
            kind: EntryKind::Delivered,
            ..Entry::message(1, 1, [0; 16], Bytes::from_static(&[0; 7]))
        };
        assert_eq!(OutboxReceipt::from_entry(&short), None);
    }

    #[test]
    fn receipt_ids_are_stable_and_distinct() {
        assert_eq!(receipt_id(&[[5; 16]]), [5; 16]);
        let ab = receipt_id(&[[1; 16], [2; 16]]);
        assert_eq!(ab, receipt_id(&[[1; 16], [2; 16]]));
        assert_ne!(ab, receipt_id(&[[2; 16], [1; 16]]));
        assert_ne!(ab, receipt_id(&[[1; 16], [2; 16], [3; 16]]));
        assert_ne!(ab, [1; 16]);
    }
}
