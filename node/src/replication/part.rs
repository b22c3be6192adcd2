//! [`RecordPart`]: how shard log records travel in peer frames, and [`Reassembly`], a
//! replica putting a record sent in several parts back together.
//!
//! A record may be far larger than a peer frame ([`RECORD_BYTES_MAX`] is 32 MiB: an inbox group
//! commit at its default size fits in one record; [`PEER_FRAME_BYTES_MAX`] is 4 MiB). Cutting it
//! into several records would break what a record promises (one atomic batch on the replica),
//! so the primary sends its encoding in consecutive parts instead, in consecutive frames of
//! one stream, and the replica applies the record only once every part has arrived. Small
//! records share a frame, whole; a large one fills the rest of a frame and continues in the
//! next ones.
//!
//! Memory on the replica: at most one record in assembly per primary that sends to it (a part
//! at offset 0 replaces an unfinished record: its primary gave up on it), so
//! [`RECORD_BYTES_MAX`] per primary at worst, and only for nodes its ring names as the primary
//! of every shard in the frame (checked before any part is kept).

use serde::{Deserialize, Serialize};

use super::record::{RecordError, ShardLogRecord, RECORD_BYTES_MAX};
use crate::peer::link::PEER_FRAME_BYTES_MAX;
use crate::shard::ShardId;

/// Bytes of records (and part headers) one `Replicate` request carries at most: a peer frame
/// less room for the envelope. Memory: one frame on each side while it is in flight.
pub const REPLICATE_FRAME_BYTES_MAX: usize = PEER_FRAME_BYTES_MAX - 64 * 1024;
/// Most parts in one `Replicate` request. A frame of records of one op each holds far fewer;
/// this bounds the replica's work per request (one position read per shard named).
pub const REPLICATE_PARTS_MAX: usize = 16 * 1024;
/// What one part costs in a frame besides its bytes, at most: its header in postcard
/// (varints: shard 3, LSN 10, total 5, offset 5, length 5) with room to spare.
pub const PART_HEADER_BYTES_MAX: usize = 32;
/// A record's remaining bytes are not started in a frame with less room than this left (they
/// go whole or in larger parts into the next frame), so that no frame carries slivers.
pub const PART_BYTES_MIN: usize = 64 * 1024;

/// `bytes` of the encoding of record `(shard, lsn)`, `total_bytes` long, from `offset`.
/// A record sent whole is one part at offset 0 with all its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordPart {
    pub shard: ShardId,
    pub lsn: u64,
    pub total_bytes: u32,
    pub offset: u32,
    pub bytes: Vec<u8>,
}

/// Why a part was refused. The record it belongs to is dropped; the primary's next record of
/// that shard then meets a gap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartError {
    #[error("part of record {lsn} of shard {shard}: {reason}")]
    Invalid {
        shard: ShardId,
        lsn: u64,
        reason: &'static str,
    },
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// One primary's record in assembly on a replica.
#[derive(Debug, Default)]
pub struct Reassembly {
    partial: Option<Partial>,
}

#[derive(Debug)]
struct Partial {
    shard: ShardId,
    lsn: u64,
    total: usize,
    bytes: Vec<u8>,
}

impl Reassembly {
    /// Bytes held for an unfinished record.
    pub fn held_bytes(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.bytes.len())
    }

    /// Takes the next part from this primary: the record, once its last part is here.
    ///
    /// A part at offset 0 starts a record (dropping an unfinished one); any other part must
    /// continue the record in assembly exactly where it stopped. The finished bytes must
    /// decode to a record of the part's shard and LSN.
    pub fn add(&mut self, part: RecordPart) -> Result<Option<ShardLogRecord>, PartError> {
        let invalid = |reason| PartError::Invalid {
            shard: part.shard,
            lsn: part.lsn,
            reason,
        };
        let total = part.total_bytes as usize;
        let offset = part.offset as usize;
        if total == 0 || total > RECORD_BYTES_MAX {
            self.partial = None;
            return Err(invalid("total length is 0 or above the record bound"));
        }
        if part.bytes.is_empty() || offset.saturating_add(part.bytes.len()) > total {
            self.partial = None;
            return Err(invalid("empty, or past the record's end"));
        }
        if offset == 0 {
            self.partial = None;
            if part.bytes.len() == total {
                return finish(part.shard, part.lsn, &part.bytes).map(Some);
            }
            self.partial = Some(Partial {
                shard: part.shard,
                lsn: part.lsn,
                total,
                bytes: part.bytes,
            });
            return Ok(None);
        }
        let continues = self.partial.as_ref().is_some_and(|p| {
            p.shard == part.shard
                && p.lsn == part.lsn
                && p.total == total
                && p.bytes.len() == offset
        });
        if !continues {
            self.partial = None;
            return Err(invalid("does not continue the record in assembly"));
        }
        let Some(mut partial) = self.partial.take() else {
            return Err(invalid("does not continue the record in assembly"));
        };
        partial.bytes.extend_from_slice(&part.bytes);
        if partial.bytes.len() < partial.total {
            self.partial = Some(partial);
            return Ok(None);
        }
        finish(partial.shard, partial.lsn, &partial.bytes).map(Some)
    }
}

fn finish(shard: ShardId, lsn: u64, bytes: &[u8]) -> Result<ShardLogRecord, PartError> {
    let record = ShardLogRecord::decode(bytes)?;
    if record.shard != shard || record.lsn != lsn {
        return Err(PartError::Invalid {
            shard,
            lsn,
            reason: "the bytes are another record",
        });
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{key, Cf, Op};

    fn record(shard: ShardId, lsn: u64, value_bytes: usize) -> ShardLogRecord {
        ShardLogRecord {
            shard,
            lsn,
            epoch: 1,
            base_epoch: u64::from(lsn > 1),
            ops: vec![Op::Put {
                cf: Cf::Inbox,
                key: key(shard, &[b"k"]),
                value: vec![7; value_bytes],
            }],
            kind: super::super::record::RecordKind::Log,
        }
    }

    fn parts_of(r: &ShardLogRecord, size: usize) -> Vec<RecordPart> {
        let bytes = r.encode();
        bytes
            .chunks(size)
            .enumerate()
            .map(|(i, c)| RecordPart {
                shard: r.shard,
                lsn: r.lsn,
                total_bytes: bytes.len() as u32,
                offset: (i * size) as u32,
                bytes: c.to_vec(),
            })
            .collect()
    }

    #[test]
    fn a_record_in_parts_comes_back_whole_once_its_last_part_is_in() {
        let r = record(3, 9, 10_000);
        let mut a = Reassembly::default();
        let parts = parts_of(&r, 3_000);
        assert_eq!(parts.len(), 4);
        for p in &parts[..3] {
            assert_eq!(a.add(p.clone()).unwrap(), None);
        }
        assert_eq!(a.held_bytes(), 9_000);
        assert_eq!(a.add(parts[3].clone()).unwrap(), Some(r.clone()));
        assert_eq!(a.held_bytes(), 0);
        // Whole, in one part.
        assert_eq!(a.add(parts_of(&r, 1 << 20).remove(0)).unwrap(), Some(r));
    }

    #[test]
    fn parts_out_of_order_or_lying_are_refused_and_drop_the_record() {
        let r = record(3, 9, 10_000);
        let parts = parts_of(&r, 3_000);
        let mut a = Reassembly::default();
        // A continuation with nothing in assembly, or skipping a part.
        assert!(a.add(parts[1].clone()).is_err());
        a.add(parts[0].clone()).unwrap();
        assert!(a.add(parts[2].clone()).is_err());
        assert_eq!(a.held_bytes(), 0, "the record was dropped");
        // Another record's continuation.
        a.add(parts[0].clone()).unwrap();
        let mut other = parts[1].clone();
        other.lsn = 10;
        assert!(a.add(other).is_err());
        // A new record at offset 0 replaces an unfinished one.
        a.add(parts[0].clone()).unwrap();
        a.add(parts[0].clone()).unwrap();
        assert_eq!(a.held_bytes(), 3_000);
        // Lengths: zero, above the bound, past the end, empty.
        for bad in [
            RecordPart {
                total_bytes: 0,
                ..parts[0].clone()
            },
            RecordPart {
                total_bytes: RECORD_BYTES_MAX as u32 + 1,
                ..parts[0].clone()
            },
            RecordPart {
                offset: 9_500,
                ..parts[3].clone()
            },
            RecordPart {
                bytes: vec![],
                ..parts[0].clone()
            },
        ] {
            assert!(
                a.add(bad.clone()).is_err(),
                "{:?}",
                (bad.total_bytes, bad.offset)
            );
        }
        // Bytes of another record under this record's name.
        let mut wrong = parts_of(&record(4, 9, 10), 1 << 20).remove(0);
        wrong.shard = 3;
        assert!(matches!(a.add(wrong), Err(PartError::Invalid { .. })));
        // Garbage.
        let garbage = RecordPart {
            shard: 3,
            lsn: 1,
            total_bytes: 5,
            offset: 0,
            bytes: vec![1, 2, 3, 4, 5],
        };
        assert!(matches!(a.add(garbage), Err(PartError::Record(_))));
    }

    #[test]
    fn a_part_header_costs_at_most_its_bound() {
        let part = RecordPart {
            shard: ShardId::MAX,
            lsn: u64::MAX,
            total_bytes: u32::MAX,
            offset: u32::MAX,
            bytes: vec![0; 100_000],
        };
        let encoded = postcard::to_allocvec(&part).unwrap();
        assert!(encoded.len() - part.bytes.len() <= PART_HEADER_BYTES_MAX);
    }
}
