//! [`DeviceMeta`]: where one device's queue stands: the next seq to hand out and the
//! acknowledged floor, and its binary encoding (InboxMeta family).
//!
//! An ack does not delete the entry it names: it moves the device's floor. Every seq up to
//! `floor` is acknowledged (or expired, or dropped); seqs above it that were acknowledged out
//! of order wait in `acked_above` until the floor reaches them. The number of entries a device
//! still has to receive is derived, never stored: `next_seq - 1 - floor - acked_above.len()`.
//! Reads start at `floor + 1`, so they never wade through acknowledged entries; those are
//! removed from disk in bulk later (range deletes below the floor, see `writer.rs`).
//!
//! Layouts, integers big-endian:
//! - format 2: `version u8 = 2 | next_seq u64 | floor u64 | above_len u16 | above seq u64*`;
//! - format 1 (written before acks moved a floor): `version u8 = 1 | next_seq u64 | count u64`.
//!   Its acknowledged entries were deleted one by one, so the entries on disk are exactly the
//!   pending ones; [`Stored::Legacy`] keeps that until the writer converts the record.

use bytes::BufMut;

use super::codec::{corrupt, Reader};
use crate::storage::StorageError;

const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;
const CF: &str = "inbox_meta";

/// Seqs acknowledged out of order that one device may have waiting above its floor. An ack
/// beyond this is not recorded (the entry stays pending and is delivered again after a
/// reconnect, which at-least-once allows). Memory and record size: 8 bytes each, so at most
/// 8 KiB per device, and nothing for a device that acks in order (every client does).
pub const ACKED_ABOVE_MAX: usize = 1024;

/// A device's queue position. `next_seq` only ever grows: it survives acks, expiry, restarts
/// and [`Inbox::drop_device`](super::Inbox::drop_device), so a seq is never handed out twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceMeta {
    /// The seq the next entry of this device gets. Seqs start at 1.
    pub next_seq: u64,
    /// Every seq `<= floor` is acknowledged, expired or dropped.
    pub floor: u64,
    /// Seqs above `floor + 1` acknowledged out of order, ascending, below `next_seq`.
    pub acked_above: Vec<u64>,
}

impl Default for DeviceMeta {
    fn default() -> Self {
        Self {
            next_seq: 1,
            floor: 0,
            acked_above: Vec::new(),
        }
    }
}

/// What an ack did to one seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckEffect {
    /// The seq was pending and is now acknowledged.
    Acked,
    /// Already acknowledged, or never handed out: nothing changed.
    NotPending,
    /// Pending, but [`ACKED_ABOVE_MAX`] out-of-order acks already wait: not recorded.
    Overflow,
}

impl DeviceMeta {
    /// Entries stored and not acknowledged.
    pub fn pending(&self) -> u64 {
        (self.next_seq - 1)
            .saturating_sub(self.floor)
            .saturating_sub(self.acked_above.len() as u64)
    }

    /// Whether `seq` was handed out and is not acknowledged.
    pub fn is_pending(&self, seq: u64) -> bool {
        seq > self.floor && seq < self.next_seq && self.acked_above.binary_search(&seq).is_err()
    }

    /// Acknowledges `seq`, moving the floor over every acknowledged seq that now follows it.
    pub fn ack(&mut self, seq: u64) -> AckEffect {
        if !self.is_pending(seq) {
            return AckEffect::NotPending;
        }
        if seq == self.floor + 1 {
            self.floor = seq;
            let run = self
                .acked_above
                .iter()
                .zip(self.floor + 1..)
                .take_while(|(acked, want)| **acked == *want)
                .count();
            if run > 0 {
                self.floor += run as u64;
                self.acked_above.drain(..run);
            }
            return AckEffect::Acked;
        }
        if self.acked_above.len() >= ACKED_ABOVE_MAX {
            return AckEffect::Overflow;
        }
        match self.acked_above.binary_search(&seq) {
            Ok(_) => AckEffect::NotPending,
            Err(at) => {
                self.acked_above.insert(at, seq);
                AckEffect::Acked
            }
        }
    }

    /// Acknowledges everything handed out so far (the device was dropped). Returns how many
    /// entries were pending.
    pub fn ack_all(&mut self) -> u64 {
        let pending = self.pending();
        self.floor = self.next_seq - 1;
        self.acked_above.clear();
        pending
    }

    /// Allocates the next seq.
    pub fn allocate(&mut self) -> Option<u64> {
        let seq = self.next_seq;
        self.next_seq = seq.checked_add(1)?;
        Some(seq)
    }

    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(self.acked_above.len() <= ACKED_ABOVE_MAX);
        let mut out = Vec::with_capacity(1 + 8 + 8 + 2 + 8 * self.acked_above.len());
        out.put_u8(FORMAT_V2);
        out.put_u64(self.next_seq);
        out.put_u64(self.floor);
        out.put_u16(self.acked_above.len() as u16);
        for seq in &self.acked_above {
            out.put_u64(*seq);
        }
        out
    }
}

/// A stored InboxMeta record as decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stored {
    Current(DeviceMeta),
    /// Format 1: `count` entries on disk, all of them pending.
    Legacy {
        next_seq: u64,
        count: u64,
    },
}

impl Stored {
    pub fn decode(value: &[u8]) -> Result<Self, StorageError> {
        let mut r = Reader::new(value);
        let truncated = || corrupt(CF, "truncated");
        let version = r.u8().ok_or_else(|| corrupt(CF, "empty record"))?;
        let stored = match version {
            FORMAT_V1 => {
                let next_seq = r.u64().ok_or_else(truncated)?;
                let count = r.u64().ok_or_else(truncated)?;
                if count == 0 {
                    Stored::Current(DeviceMeta {
                        next_seq,
                        floor: next_seq.saturating_sub(1),
                        acked_above: Vec::new(),
                    })
                } else {
                    Stored::Legacy { next_seq, count }
                }
            }
            FORMAT_V2 => {
                let next_seq = r.u64().ok_or_else(truncated)?;
                let floor = r.u64().ok_or_else(truncated)?;
                let above = usize::from(r.u16().ok_or_else(truncated)?);
                if above > ACKED_ABOVE_MAX {
                    return Err(corrupt(CF, format!("{above} out-of-order acks")));
                }
                let mut acked_above = Vec::with_capacity(above);
                for _ in 0..above {
                    acked_above.push(r.u64().ok_or_else(truncated)?);
                }
                let ordered = acked_above.windows(2).all(|w| w[0] < w[1]);
                let bounded = acked_above
                    .first()
                    .is_none_or(|&s| s > floor.saturating_add(1))
                    && acked_above.last().is_none_or(|&s| s < next_seq);
                if floor >= next_seq || !ordered || !bounded {
                    return Err(corrupt(CF, "floor or out-of-order acks out of range"));
                }
                Stored::Current(DeviceMeta {
                    next_seq,
                    floor,
                    acked_above,
                })
            }
            other => return Err(corrupt(CF, format!("unknown meta format {other}"))),
        };
        if !r.is_done() {
            return Err(corrupt(CF, "trailing bytes"));
        }
        let next_seq = match &stored {
            Stored::Current(m) => m.next_seq,
            Stored::Legacy { next_seq, .. } => *next_seq,
        };
        if next_seq == 0 {
            return Err(corrupt(CF, "next_seq is 0"));
        }
        Ok(stored)
    }

    /// Entries stored and not acknowledged.
    pub fn pending(&self) -> u64 {
        match self {
            Stored::Current(m) => m.pending(),
            Stored::Legacy { count, .. } => *count,
        }
    }

    /// Where a read of the device's pending entries starts: seqs above this.
    pub fn read_floor(&self) -> u64 {
        match self {
            Stored::Current(m) => m.floor,
            // Format 1 deleted acknowledged entries: everything on disk is pending.
            Stored::Legacy { .. } => 0,
        }
    }

    /// Whether a read may return `seq` (above the floor, not acknowledged out of order).
    pub fn may_deliver(&self, seq: u64) -> bool {
        match self {
            Stored::Current(m) => m.is_pending(seq),
            Stored::Legacy { .. } => true,
        }
    }
}

/// The format-1 encoding, for tests of the conversion.
#[cfg(test)]
pub(crate) fn encode_v1(next_seq: u64, count: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(17);
    out.put_u8(FORMAT_V1);
    out.put_u64(next_seq);
    out.put_u64(count);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn meta(next_seq: u64) -> DeviceMeta {
        DeviceMeta {
            next_seq,
            ..DeviceMeta::default()
        }
    }

    #[test]
    fn in_order_acks_move_the_floor_and_nothing_waits() {
        let mut m = meta(6);
        assert_eq!(m.pending(), 5);
        for seq in 1..=5 {
            assert_eq!(m.ack(seq), AckEffect::Acked);
            assert!(m.acked_above.is_empty());
            assert_eq!(m.floor, seq);
        }
        assert_eq!(m.pending(), 0);
        assert_eq!(m.ack(5), AckEffect::NotPending, "again");
        assert_eq!(m.ack(6), AckEffect::NotPending, "never handed out");
        assert_eq!(m.ack(0), AckEffect::NotPending);
    }

    #[test]
    fn out_of_order_acks_wait_then_fold_into_the_floor() {
        let mut m = meta(10);
        assert_eq!(m.ack(3), AckEffect::Acked);
        assert_eq!(m.ack(5), AckEffect::Acked);
        assert_eq!(m.ack(3), AckEffect::NotPending);
        assert_eq!((m.floor, m.acked_above.clone()), (0, vec![3, 5]));
        assert_eq!(m.pending(), 7);
        assert!(!m.is_pending(3) && m.is_pending(4));
        assert_eq!(m.ack(1), AckEffect::Acked);
        assert_eq!((m.floor, m.acked_above.clone()), (1, vec![3, 5]));
        assert_eq!(m.ack(2), AckEffect::Acked);
        assert_eq!((m.floor, m.acked_above.clone()), (3, vec![5]));
        assert_eq!(m.ack(4), AckEffect::Acked);
        assert_eq!((m.floor, m.acked_above.clone()), (5, vec![]));
        assert_eq!(m.pending(), 4);
    }

    #[test]
    fn out_of_order_acks_are_bounded() {
        let mut m = meta(ACKED_ABOVE_MAX as u64 + 10);
        for seq in 2..(ACKED_ABOVE_MAX as u64 + 2) {
            assert_eq!(m.ack(seq), AckEffect::Acked);
        }
        let last = ACKED_ABOVE_MAX as u64 + 2;
        assert_eq!(m.ack(last), AckEffect::Overflow);
        assert!(m.is_pending(last), "an overflowing ack is not recorded");
        assert_eq!(m.ack(1), AckEffect::Acked);
        assert_eq!(m.floor, last - 1);
        assert_eq!(m.ack(last), AckEffect::Acked);
    }

    #[test]
    fn ack_all_and_allocate() {
        let mut m = meta(1);
        assert_eq!(m.allocate(), Some(1));
        assert_eq!(m.allocate(), Some(2));
        assert_eq!(m.ack(2), AckEffect::Acked);
        assert_eq!(m.ack_all(), 1);
        assert_eq!((m.floor, m.pending()), (2, 0));
        assert_eq!(m.allocate(), Some(3), "seqs keep growing");
        let mut full = meta(u64::MAX);
        assert_eq!(full.allocate(), None);
    }

    #[test]
    fn formats_roundtrip_and_reject_garbage() {
        let m = DeviceMeta {
            next_seq: 100,
            floor: 40,
            acked_above: vec![42, 50, 99],
        };
        let bytes = m.encode();
        assert_eq!(Stored::decode(&bytes).unwrap(), Stored::Current(m.clone()));
        for len in 0..bytes.len() {
            assert!(Stored::decode(&bytes[..len]).is_err(), "{len}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Stored::decode(&long).is_err());
        let mut v9 = bytes.clone();
        v9[0] = 9;
        assert!(Stored::decode(&v9).is_err());
        for bad in [
            DeviceMeta {
                next_seq: 5,
                floor: 5,
                acked_above: vec![],
            },
            DeviceMeta {
                next_seq: 10,
                floor: 2,
                acked_above: vec![3],
            },
            DeviceMeta {
                next_seq: 10,
                floor: 2,
                acked_above: vec![6, 5],
            },
            DeviceMeta {
                next_seq: 10,
                floor: 2,
                acked_above: vec![10],
            },
        ] {
            assert!(Stored::decode(&bad.encode()).is_err(), "{bad:?}");
        }
        // Format 1: an empty queue converts on the spot, a non-empty one is legacy.
        assert_eq!(
            Stored::decode(&encode_v1(7, 0)).unwrap(),
            Stored::Current(DeviceMeta {
                next_seq: 7,
                floor: 6,
                acked_above: vec![]
            })
        );
        let legacy = Stored::decode(&encode_v1(7, 2)).unwrap();
        assert_eq!(
            legacy,
            Stored::Legacy {
                next_seq: 7,
                count: 2
            }
        );
        assert_eq!((legacy.pending(), legacy.read_floor()), (2, 0));
        assert!(Stored::decode(&encode_v1(0, 0)).is_err());
    }

    proptest! {
        /// Any sequence of acks leaves the floor and the waiting acks describing exactly the
        /// set of seqs acknowledged so far (up to the bound), and survives encoding.
        #[test]
        fn floor_tracks_the_acked_set(next_seq in 1u64..200, acks in proptest::collection::vec(0u64..220, 0..300)) {
            let mut m = meta(next_seq);
            let mut acked = BTreeSet::new();
            for seq in acks {
                let effect = m.ack(seq);
                let was_pending = seq >= 1 && seq < next_seq && !acked.contains(&seq);
                prop_assert_eq!(effect == AckEffect::NotPending, !was_pending);
                if effect == AckEffect::Acked {
                    acked.insert(seq);
                }
                for s in 1..next_seq {
                    prop_assert_eq!(m.is_pending(s), !acked.contains(&s), "seq {}", s);
                }
                prop_assert_eq!(m.pending(), next_seq - 1 - acked.len() as u64);
                prop_assert!(m.acked_above.first().is_none_or(|&s| s > m.floor + 1));
                prop_assert_eq!(Stored::decode(&m.encode()).unwrap(), Stored::Current(m.clone()));
            }
        }
    }
}
