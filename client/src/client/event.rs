//! [`Event`]: what a [`crate::Client`] hands the application besides answers to its requests.

use ringpost_wire::{
    Body, Deliver, DeliverKind, DeviceId, Frame, GoingAway, GroupEvent, GroupId, Migrate, MsgId,
    PresenceUpdate, ReceiptKind, Typing, UserId, Welcome,
};

/// Something that happened on the client's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message for this device (an inbox entry of kind `Message`).
    Message(Deliver),
    /// A group message (kind `GroupMessage`): `group`, `group_seq`, sender and the one
    /// sender-key ciphertext are in the `Deliver`.
    GroupMessage(Deliver),
    /// A group changed (kind `GroupEvent`). `event` is `None` only if the node sent a body
    /// that does not decode as a `GroupEvent` frame. On `rotate_sender_keys`, make a new
    /// sender key and hand it to the members pairwise before the next group send.
    GroupChanged {
        seq: u64,
        group: GroupId,
        group_seq: u64,
        event: Option<GroupEvent>,
    },
    /// A device of `by_user` received these of our messages (sent by the node).
    Delivered {
        seq: u64,
        by_user: UserId,
        by_device: DeviceId,
        /// The receipt's own id, as on the wire (`Deliver.msg_id`): the message's id when the
        /// receipt is about one message, else the first 16 bytes of SHA-256 over `msg_ids` in
        /// order (docs/protocol.md). With (`by_user`, `by_device`) it identifies the receipt,
        /// so a redelivered one can be recognised.
        msg_id: MsgId,
        /// The messages this receipt is about (`Deliver.receipt_msg_ids`).
        msg_ids: Vec<MsgId>,
        server_time_ms: u64,
    },
    /// `by_user` read these of our messages (a receipt sent by their client).
    Read {
        seq: u64,
        by_user: UserId,
        by_device: DeviceId,
        /// The receipt's own id, as on the wire: the idempotency key the reader's client chose
        /// for its `Receipt` ([`crate::Client::receipt`]'s `msg_id`).
        msg_id: MsgId,
        /// The messages this receipt is about.
        msg_ids: Vec<MsgId>,
        server_time_ms: u64,
    },
    /// Every member of `group` (other than us) received (`Delivered`) or read (`Read`) these
    /// of our group messages: the group's owner aggregated the members' `GroupReceipt`s
    /// (docs/protocol.md, "Group receipts"). `up_to_seq` is the highest group seq among them.
    /// May repeat after a reconnect (an entry redelivered): treat a repeat as a no-op.
    GroupReceipt {
        seq: u64,
        group: GroupId,
        kind: ReceiptKind,
        up_to_seq: u64,
        msg_ids: Vec<MsgId>,
        server_time_ms: u64,
    },
    /// A status item a contact posted (kind `Status`): the one ciphertext, encrypted with the
    /// poster's status sender key, is in `body`. It expires 24 hours after `server_time_ms`.
    Status(Deliver),
    /// `by_user` viewed these statuses of ours (kind `StatusViewed`).
    StatusViewed {
        seq: u64,
        by_user: UserId,
        by_device: DeviceId,
        /// The receipt's own id (the viewer's `Receipt.msg_id`).
        msg_id: MsgId,
        /// The statuses viewed.
        msg_ids: Vec<MsgId>,
        server_time_ms: u64,
    },
    /// A contact's device published a new identity key (kind `IdentityChanged`): a
    /// re-registration or a newly linked device. Show a security-code change and set up
    /// sessions with that device again.
    IdentityChanged {
        seq: u64,
        user: UserId,
        device: DeviceId,
        /// The new 64-byte identity key (Ed25519 signing key, then Curve25519 identity key).
        identity_key: bytes::Bytes,
        server_time_ms: u64,
    },
    /// Claims took this device below `PREKEY_LOW_WATERMARK` one-time prekeys (an unprompted
    /// `PrekeyCount`): `count` are left; upload more ([`crate::crypto::SecureClient`] does).
    PrekeysLow { count: u32 },
    /// A contact started or stopped typing to us.
    Typing(Typing),
    /// A subscribed user came online or went away.
    Presence(PresenceUpdate),
    /// The node is going away; the client reconnects after `reconnect_after_ms` (if it
    /// reconnects at all).
    GoingAway(GoingAway),
    /// The cluster moved this device's user to another node: the client reconnects straight
    /// there after `reconnect_after_ms` (at most
    /// [`ringpost_wire::limits::MIGRATE_RECONNECT_AFTER_MS_MAX`]), if it reconnects at all, and
    /// falls back to its usual reconnects (entry point, backoff, redirects) if that fails.
    Migrate(Migrate),
    /// The connection dropped. Requests in flight failed with
    /// [`crate::ClientError::Disconnected`]. With `will_reconnect`, a
    /// [`Event::Reconnected`] follows once a new connection is up; without, this is the last
    /// event.
    Disconnected {
        reason: String,
        will_reconnect: bool,
    },
    /// A new connection is up and authenticated; `reconnects` counts them since connect.
    Reconnected { welcome: Welcome, reconnects: u64 },
}

impl Event {
    /// The event for a delivery.
    pub(crate) fn from_deliver(d: Deliver) -> Event {
        if let (DeliverKind::Delivered | DeliverKind::Read, Some(group)) = (d.kind, d.group) {
            return Event::GroupReceipt {
                seq: d.seq,
                group,
                kind: match d.kind {
                    DeliverKind::Read => ReceiptKind::Read,
                    _ => ReceiptKind::Delivered,
                },
                up_to_seq: d.group_seq,
                msg_ids: d.receipt_msg_ids,
                server_time_ms: d.server_time_ms,
            };
        }
        match d.kind {
            DeliverKind::Message => Event::Message(d),
            DeliverKind::GroupMessage => Event::GroupMessage(d),
            DeliverKind::GroupEvent => Event::GroupChanged {
                seq: d.seq,
                group: d.group.unwrap_or_default(),
                group_seq: d.group_seq,
                event: match Frame::decode(&d.body) {
                    Ok(Frame {
                        body: Body::GroupEvent(e),
                        ..
                    }) => Some(e),
                    _ => None,
                },
            },
            DeliverKind::Delivered => Event::Delivered {
                seq: d.seq,
                by_user: d.from_user,
                by_device: d.from_device,
                msg_id: d.msg_id,
                msg_ids: d.receipt_msg_ids,
                server_time_ms: d.server_time_ms,
            },
            DeliverKind::Status => Event::Status(d),
            DeliverKind::StatusViewed => Event::StatusViewed {
                seq: d.seq,
                by_user: d.from_user,
                by_device: d.from_device,
                msg_id: d.msg_id,
                msg_ids: d.receipt_msg_ids,
                server_time_ms: d.server_time_ms,
            },
            DeliverKind::IdentityChanged => Event::IdentityChanged {
                seq: d.seq,
                user: d.from_user,
                device: d.from_device,
                identity_key: d.body,
                server_time_ms: d.server_time_ms,
            },
            DeliverKind::Read => Event::Read {
                seq: d.seq,
                by_user: d.from_user,
                by_device: d.from_device,
                msg_id: d.msg_id,
                msg_ids: d.receipt_msg_ids,
                server_time_ms: d.server_time_ms,
            },
        }
    }

    /// The inbox seq to acknowledge, for deliveries.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Event::Message(d) | Event::GroupMessage(d) | Event::Status(d) => Some(d.seq),
            Event::StatusViewed { seq, .. } | Event::IdentityChanged { seq, .. } => Some(*seq),
            Event::GroupChanged { seq, .. } => Some(*seq),
            Event::Delivered { seq, .. }
            | Event::Read { seq, .. }
            | Event::GroupReceipt { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}
