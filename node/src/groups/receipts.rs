//! Group receipts, aggregated on the group's owner: each member reports a watermark per kind
//! (`GroupReceipt{group, kind, up_to_seq}`: "I received, or read, everything up to this group
//! sequence"); the owner keeps one watermark per member and kind, and an index of the group's
//! recent messages (seq → sender, sender device, msg_id). When every current member other
//! than a message's sender has passed it, the sender gets one receipt for it: a fan-out log
//! record with only the sender pending, written in the same synced batch as the watermark
//! that completed it, so it is neither lost nor sent twice by the owner. The log delivers it
//! as a `Deliver` of kind `Delivered` or `Read` with `group` set and the message ids (at most
//! `RECEIPT_MSG_IDS_MAX` per entry; all the messages one watermark completes for one sender
//! are coalesced). The sender's inbox therefore holds one entry per completed batch, never
//! one per member.
//!
//! Rows in [`Cf::Groups`], inside the group's key range:
//! - `TAG_WATERMARK | kind | user` → seq (u64 BE): at most one per member and kind
//!   (added members start at the seq of the change that added them; removed ones are deleted).
//! - `TAG_INDEX | seq` → `from_user | from_device | msg_id | flags`: one per message among the
//!   last [`GROUP_RECEIPT_INDEX_SEQS`] group sequence numbers; deleted once both receipts
//!   went out, or when it falls out of that window (then its sender gets no aggregated
//!   receipt for it).
//! - `TAG_NEXT_RECEIPT` → the next receipt record's number (its log key's suffix).

use ringpost_wire::limits::RECEIPT_MSG_IDS_MAX;
use ringpost_wire::{DeviceId, GroupId, MsgId, ReceiptKind, UserId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::state::GroupState;
use super::{GroupError, Groups, LogBody, LogRecord};
use crate::storage::{Cf, WriteBatch};

/// How many of a group's latest sequence numbers keep their message in the receipt index.
/// A message older than that gets no aggregated receipt. Costs at most this many rows of
/// 37 bytes (plus keys) per group, and one scan of at most this many rows per `GroupReceipt`.
pub const GROUP_RECEIPT_INDEX_SEQS: u64 = 1024;

pub(super) const TAG_WATERMARK: u8 = 3;
pub(super) const TAG_INDEX: u8 = 4;
const TAG_NEXT_RECEIPT: u8 = 5;

const FLAG_DELIVERED: u8 = 1;
const FLAG_READ: u8 = 2;
const INDEX_VALUE_BYTES: usize = 8 + 4 + 16 + 1;

/// A receipt kind as stored (in keys and in [`LogBody::Receipt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Delivered,
    Read,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Delivered => 0,
            Kind::Read => 1,
        }
    }
    fn flag(self) -> u8 {
        match self {
            Kind::Delivered => FLAG_DELIVERED,
            Kind::Read => FLAG_READ,
        }
    }
}

/// The id of an aggregated receipt's inbox entry: the group's first 8 bytes and the record's
/// number with the top bit set, so it never equals an event's id (`fanout::event_msg_id`).
pub fn receipt_msg_id(group: &GroupId, number: u64) -> MsgId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&group[..8]);
    id[8..].copy_from_slice(&(number | 1 << 63).to_be_bytes());
    id
}

/// One indexed message.
struct Indexed {
    seq: u64,
    from_user: UserId,
    msg_id: MsgId,
    flags: u8,
    row: Vec<u8>,
}

/// Per kind: the smallest watermark over the members (with its member) and the second
/// smallest. A message from `s` is passed by everyone but `s` up to
/// `if s == lowest_user { second } else { lowest }`.
#[derive(Debug, Clone, Copy)]
struct Floor {
    lowest: u64,
    lowest_user: Option<UserId>,
    second: u64,
}

impl Floor {
    fn of(members: &[UserId], marks: &BTreeMap<UserId, u64>) -> Floor {
        let mut f = Floor {
            lowest: u64::MAX,
            lowest_user: None,
            second: u64::MAX,
        };
        for &m in members {
            let w = marks.get(&m).copied().unwrap_or(0);
            if w < f.lowest {
                f.second = f.lowest;
                f.lowest = w;
                f.lowest_user = Some(m);
            } else if w < f.second {
                f.second = w;
            }
        }
        f
    }
    fn passed(&self, sender: UserId) -> u64 {
        if Some(sender) == self.lowest_user {
            self.second
        } else {
            self.lowest
        }
    }
}

impl Groups {
    fn watermark_prefix(&self, group: &GroupId, kind: Kind) -> Vec<u8> {
        self.row(group, TAG_WATERMARK, &[&[kind.byte()]])
    }

    fn watermarks(&self, group: &GroupId, kind: Kind) -> Result<BTreeMap<UserId, u64>, GroupError> {
        let from = self.watermark_prefix(group, kind);
        let to = crate::storage::prefix_end(&from);
        let mut out = BTreeMap::new();
        let limit = ringpost_wire::limits::GROUP_MEMBERS_MAX * 2;
        for (k, v) in self.engine.scan(Cf::Groups, &from, &to, limit)? {
            let user = k.get(from.len()..).and_then(|b| b.try_into().ok());
            let seq = v.get(..8).and_then(|b| b.try_into().ok());
            if let (Some(user), Some(seq)) = (user, seq) {
                out.insert(u64::from_be_bytes(user), u64::from_be_bytes(seq));
            }
        }
        Ok(out)
    }

    fn put_watermark(
        &self,
        batch: &mut WriteBatch,
        group: &GroupId,
        kind: Kind,
        user: UserId,
        seq: u64,
    ) {
        let mut k = self.watermark_prefix(group, kind);
        k.extend_from_slice(&user.to_be_bytes());
        batch.put(Cf::Groups, k, seq.to_be_bytes().to_vec());
    }

    /// Indexes a message just sequenced at `seq` and drops the one that left the window.
    pub(super) fn index_message(
        &self,
        batch: &mut WriteBatch,
        group: &GroupId,
        seq: u64,
        from_user: UserId,
        from_device: DeviceId,
        msg_id: MsgId,
    ) {
        let mut v = Vec::with_capacity(INDEX_VALUE_BYTES);
        v.extend_from_slice(&from_user.to_be_bytes());
        v.extend_from_slice(&from_device.to_be_bytes());
        v.extend_from_slice(&msg_id);
        v.push(0);
        batch.put(
            Cf::Groups,
            self.row(group, TAG_INDEX, &[&seq.to_be_bytes()]),
            v,
        );
        if let Some(old) = seq.checked_sub(GROUP_RECEIPT_INDEX_SEQS) {
            batch.delete(
                Cf::Groups,
                self.row(group, TAG_INDEX, &[&old.to_be_bytes()]),
            );
        }
    }

    /// Watermark rows after a change: members it added start at its seq (they never get the
    /// messages before it), members it removed lose theirs. Returns the aggregated receipts
    /// the change completed (a removal can complete them), already put in `batch`.
    pub(super) fn membership_changed(
        &self,
        batch: &mut WriteBatch,
        state: &GroupState,
        added: &[UserId],
        removed: &[UserId],
        now_ms: u64,
    ) -> Result<usize, GroupError> {
        let mut overrides = Vec::new();
        for kind in [Kind::Delivered, Kind::Read] {
            for &u in added {
                self.put_watermark(batch, &state.group, kind, u, state.seq);
                overrides.push((kind, u, Some(state.seq)));
            }
            for &u in removed {
                let mut k = self.watermark_prefix(&state.group, kind);
                k.extend_from_slice(&u.to_be_bytes());
                batch.delete(Cf::Groups, k);
                overrides.push((kind, u, None));
            }
        }
        if removed.is_empty() {
            // Adding members never completes a message.
            return Ok(0);
        }
        self.aggregate(batch, state, &overrides, now_ms)
    }

    /// A member's `GroupReceipt`: raises its watermark (a read one raises the delivered one
    /// too; one beyond the group's seq counts as the group's seq) and logs the aggregated
    /// receipts it completed. The number of receipt records logged.
    pub fn receipt(
        &self,
        user: UserId,
        group: &GroupId,
        kind: ReceiptKind,
        up_to_seq: u64,
        now_ms: u64,
    ) -> Result<usize, GroupError> {
        let _held = self.lock(group);
        let state = self.load(group)?.ok_or(GroupError::NotFound)?;
        if state.members.binary_search(&user).is_err() {
            return Err(GroupError::NotMember);
        }
        self.metrics
            .receipts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seq = up_to_seq.min(state.seq);
        let kinds: &[Kind] = match kind {
            ReceiptKind::Delivered => &[Kind::Delivered],
            ReceiptKind::Read => &[Kind::Delivered, Kind::Read],
            ReceiptKind::StatusViewed => {
                return Err(GroupError::Malformed(
                    "a group receipt's kind is Delivered or Read",
                ))
            }
        };
        let mut batch = WriteBatch::new();
        let mut overrides = Vec::new();
        for &k in kinds {
            let mut row = self.watermark_prefix(group, k);
            row.extend_from_slice(&user.to_be_bytes());
            let old = match self.engine.get(Cf::Groups, &row)? {
                Some(v) => v
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0),
                None => 0,
            };
            if seq > old {
                batch.put(Cf::Groups, row, seq.to_be_bytes().to_vec());
                overrides.push((k, user, Some(seq)));
            }
        }
        if overrides.is_empty() {
            return Ok(0);
        }
        let logged = self.aggregate(&mut batch, &state, &overrides, now_ms)?;
        // Synced: a receipt record must not be lost once its index flags are set.
        self.write_logged(group, state.seq, batch)?;
        Ok(logged)
    }

    /// Finds the indexed messages every member but their sender has passed, per kind, marks
    /// them in the index and puts one receipt record per sender and kind (per
    /// `RECEIPT_MSG_IDS_MAX` ids) in the log. `overrides` are watermark changes already in
    /// `batch` (not yet readable).
    fn aggregate(
        &self,
        batch: &mut WriteBatch,
        state: &GroupState,
        overrides: &[(Kind, UserId, Option<u64>)],
        now_ms: u64,
    ) -> Result<usize, GroupError> {
        let group = &state.group;
        let mut floors = Vec::with_capacity(2);
        for kind in [Kind::Delivered, Kind::Read] {
            let mut marks = self.watermarks(group, kind)?;
            for &(_, u, seq) in overrides.iter().filter(|o| o.0 == kind) {
                match seq {
                    Some(s) => marks.insert(u, s),
                    None => marks.remove(&u),
                };
            }
            floors.push((kind, Floor::of(&state.members, &marks)));
        }
        let top = floors
            .iter()
            .map(|(_, f)| f.second)
            .max()
            .unwrap_or(0)
            .min(state.seq);
        let from = self.row(group, TAG_INDEX, &[]);
        let to = self.row(group, TAG_INDEX, &[&top.saturating_add(1).to_be_bytes()]);
        let mut done: BTreeMap<(u8, UserId), Vec<(u64, MsgId)>> = BTreeMap::new();
        for (row, v) in
            self.engine
                .scan(Cf::Groups, &from, &to, GROUP_RECEIPT_INDEX_SEQS as usize)?
        {
            let Some(m) = decode_index(row, &v, from.len()) else {
                continue;
            };
            let mut flags = m.flags;
            for (kind, floor) in &floors {
                if flags & kind.flag() == 0 && m.seq <= floor.passed(m.from_user) {
                    flags |= kind.flag();
                    done.entry((kind.byte(), m.from_user))
                        .or_default()
                        .push((m.seq, m.msg_id));
                }
            }
            if flags == FLAG_DELIVERED | FLAG_READ {
                batch.delete(Cf::Groups, m.row);
            } else if flags != m.flags {
                let mut v = v.to_vec();
                v[INDEX_VALUE_BYTES - 1] = flags;
                batch.put(Cf::Groups, m.row, v);
            }
        }
        if done.is_empty() {
            return Ok(0);
        }
        let next_row = self.row(group, TAG_NEXT_RECEIPT, &[]);
        let mut number = match self.engine.get(Cf::Groups, &next_row)? {
            Some(v) => v
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0),
            None => 0,
        };
        let mut logged = 0;
        // Delivered (kind byte 0) before read, per sender.
        for ((kind_byte, sender), ids) in done {
            let kind = if kind_byte == 0 {
                Kind::Delivered
            } else {
                Kind::Read
            };
            for chunk in ids.chunks(RECEIPT_MSG_IDS_MAX) {
                let record = LogRecord {
                    group: *group,
                    seq: state.seq,
                    server_time_ms: now_ms,
                    body: LogBody::Receipt {
                        kind,
                        number,
                        up_to_seq: chunk.iter().map(|(s, _)| *s).max().unwrap_or(0),
                        msg_ids: chunk.iter().map(|(_, id)| *id).collect(),
                    },
                    pending: vec![sender],
                };
                batch.put(Cf::GroupLog, self.record_key(&record), record.encode()?);
                number += 1;
                logged += 1;
            }
        }
        batch.put(Cf::Groups, next_row, number.to_be_bytes().to_vec());
        self.metrics
            .receipts_aggregated
            .fetch_add(logged as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(logged)
    }
}

fn decode_index(row: Vec<u8>, v: &[u8], prefix: usize) -> Option<Indexed> {
    let seq = u64::from_be_bytes(row.get(prefix..prefix + 8)?.try_into().ok()?);
    if v.len() != INDEX_VALUE_BYTES {
        return None;
    }
    Some(Indexed {
        seq,
        from_user: u64::from_be_bytes(v[..8].try_into().ok()?),
        msg_id: v[12..28].try_into().ok()?,
        flags: v[28],
        row,
    })
}
