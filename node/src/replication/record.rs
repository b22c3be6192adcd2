//! [`ShardLogRecord`]: one entry of a shard's replication log, and its binary encoding.
//!
//! ```text
//! record:       version u8 (= 3) | shard u16 | lsn u64 | epoch u64 | base epoch u64
//!               | op count u32 | op*
//! snapshot:     version u8 (= 4) | shard u16 | lsn u64 | epoch u64 | base epoch u64
//!               | flags u8 | session u64 | index u32 | op count u32 | put*
//!               (flags: 1 = last chunk)
//! put:          0 u8 | cf u8 | key len u16 | key | value len u32 | value
//! delete:       1 u8 | cf u8 | key len u16 | key
//! delete_range: 2 u8 | cf u8 | from len u16 | from | to len u16 | to
//! ```
//! Integers are big-endian; `cf` is an index into [`SHARD_CFS`] (append-only, so a family's
//! index never changes). Versions 1 and 2 (without the base epoch) are refused: a record whose
//! predecessor's epoch is unknown cannot be checked against a copy. The decoder takes
//! untrusted bytes: it never panics, allocates in proportion to the input only, and checks
//! every bound below and [`ShardLogRecord::check`].
//! The encoder's caller checks the same things before a record is written anywhere.

use crate::inbox::GROUP_BYTES_MAX_DEFAULT;
use crate::shard::ShardId;
use crate::shard_rows::{ROW_KEY_BYTES_MAX, ROW_VALUE_BYTES_MAX, SHARD_CFS};
use crate::storage::{key, prefix_end, Cf, Op};

use super::split::op_cf;

/// The encoding's version byte of a log record.
pub const RECORD_VERSION: u8 = 3;
/// The version byte of a snapshot chunk ([`RecordKind::Snapshot`]).
pub const SNAPSHOT_VERSION: u8 = 4;
const FLAG_LAST: u8 = 1;
/// Most ops in one record. An inbox group commit writes a few ops per request (an entry per
/// device, its counters, a dedup record) for at most a few hundred requests; this is far above
/// that. Memory: about 56 bytes per op besides its keys and values.
pub const RECORD_OPS_MAX: usize = 128 * 1024;
/// Longest key (or range bound) in a record: the longest a hand-off row may have.
pub const RECORD_KEY_BYTES_MAX: usize = ROW_KEY_BYTES_MAX;
/// Longest value in a record: the longest a hand-off row may have.
pub const RECORD_VALUE_BYTES_MAX: usize = ROW_VALUE_BYTES_MAX;
/// Most encoded bytes of one record. Memory: a replica decoding one holds about twice this at
/// worst (the bytes and the ops). Above any inbox group at its default size (checked below),
/// which is the largest batch any service writes.
pub const RECORD_BYTES_MAX: usize = 32 * 1024 * 1024;
/// `version | shard | lsn | epoch | base epoch | op count`.
pub const RECORD_HEADER_BYTES: usize = 1 + 2 + 8 + 8 + 8 + 4;
/// What a snapshot chunk's header adds: `flags | session | index`.
pub const SNAPSHOT_HEADER_EXTRA_BYTES: usize = 1 + 8 + 4;
/// The smallest op: a delete of a 3-byte key.
const OP_BYTES_MIN: usize = 1 + 1 + 2 + 3;

const _: () = {
    // A default group commit (plus the one request that may exceed it) fits in one record with
    // room for framing.
    assert!(2 * GROUP_BYTES_MAX_DEFAULT + RECORD_VALUE_BYTES_MAX <= RECORD_BYTES_MAX);
    assert!(RECORD_KEY_BYTES_MAX <= u16::MAX as usize);
    assert!(RECORD_VALUE_BYTES_MAX <= u32::MAX as usize);
    assert!(SHARD_CFS.len() <= u8::MAX as usize);
};

const TAG_PUT: u8 = 0;
const TAG_DELETE: u8 = 1;
const TAG_DELETE_RANGE: u8 = 2;

/// The ops one committed batch made to one shard, at its place `lsn` in the shard's log,
/// written by the primary of `epoch`; or, of kind [`RecordKind::Snapshot`], a chunk of the
/// shard's rows as the primary holds them at `lsn` (catch-up, see [`crate::replication::apply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLogRecord {
    pub shard: ShardId,
    /// Position in the shard's log: 1 for its first record, then +1 for each. For a snapshot
    /// chunk, the primary's position when it read the chunk's rows.
    pub lsn: u64,
    /// The epoch the primary wrote (or cut) the record at.
    pub epoch: u64,
    /// The epoch of the primary's own log entry the record builds on: for a log record, that of
    /// record `lsn - 1` (0 for the first); for a snapshot chunk, that of record `lsn` (the rows
    /// include it). A copy applies a log record only if its position is `(lsn - 1, base_epoch)`
    /// (Raft's prevLogTerm check): else it holds a different history and needs a snapshot.
    pub base_epoch: u64,
    /// In the order the batch applied them; each inside `shard` (see [`ShardLogRecord::check`]).
    pub ops: Vec<Op>,
    pub kind: RecordKind,
}

/// What a [`ShardLogRecord`] is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RecordKind {
    /// One committed batch's ops: an entry of the shard's log.
    #[default]
    Log,
    /// Rows of the shard read by its primary at the record's LSN, in key order from where
    /// chunk `index - 1` of the same catch-up `session` stopped; only puts. The first chunk
    /// (`index` 0) replaces the replica's copy of the shard (everything else in it is deleted
    /// first); until the `last` has been applied the copy is incomplete and is never promoted.
    Snapshot {
        session: u64,
        index: u32,
        last: bool,
    },
}

impl ShardLogRecord {
    /// A log record (the common kind), written after a record of `base_epoch`.
    pub fn log(
        shard: ShardId,
        lsn: u64,
        epoch: u64,
        base_epoch: u64,
        ops: Vec<Op>,
    ) -> ShardLogRecord {
        ShardLogRecord {
            shard,
            lsn,
            epoch,
            base_epoch,
            ops,
            kind: RecordKind::Log,
        }
    }
}

/// Why a record is refused: its bytes do not decode, or it breaks a bound or a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("shard log record: unknown version {0}")]
    Version(u8),
    #[error("shard log record: truncated")]
    Truncated,
    #[error("shard log record: {0} bytes after its last op")]
    TrailingBytes(usize),
    #[error("shard log record: {what} is {len}, above the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// The record, or its op `index`, breaks a rule (`index` is `None` for the record itself).
    #[error("shard log record of shard {shard} (op {index:?}): {reason}")]
    Invalid {
        shard: ShardId,
        index: Option<usize>,
        reason: &'static str,
    },
}

impl ShardLogRecord {
    /// Checks the record against every bound and rule the decoder enforces: a real shard, an
    /// LSN of at least 1, between 1 and [`RECORD_OPS_MAX`] ops, at most [`RECORD_BYTES_MAX`]
    /// encoded; every op of a [`SHARD_CFS`] family and inside the shard: a put's or delete's key
    /// longer than the shard prefix and at most [`RECORD_KEY_BYTES_MAX`], a value at most
    /// [`RECORD_VALUE_BYTES_MAX`], a range delete non-empty and within the shard. Positions
    /// ([`Cf::ShardLog`]) are only ever range-deleted with the rest of a shard: the record's
    /// own LSN and epoch are what moves them.
    pub fn check(&self) -> Result<(), RecordError> {
        let shard = self.shard;
        let invalid = |index, reason| RecordError::Invalid {
            shard,
            index,
            reason,
        };
        if shard == ShardId::MAX {
            return Err(invalid(None, "not a shard id"));
        }
        let snapshot = matches!(self.kind, RecordKind::Snapshot { .. });
        // A snapshot of a shard never written is at LSN 0, and a chunk may be empty (an empty
        // shard, or a last chunk with nothing left).
        if self.lsn == 0 && !snapshot {
            return Err(invalid(None, "LSN 0 (logs start at 1)"));
        }
        if self.ops.is_empty() && !snapshot {
            return Err(invalid(None, "no ops"));
        }
        if self.base_epoch > self.epoch {
            return Err(invalid(None, "a base epoch after the record's epoch"));
        }
        if let Some(index) = self
            .ops
            .iter()
            .position(|op| snapshot && !matches!(op, Op::Put { .. }))
        {
            return Err(invalid(Some(index), "a snapshot chunk holds only puts"));
        }
        too_large("op count", self.ops.len(), RECORD_OPS_MAX)?;
        let prefix = key(shard, &[]);
        let end = prefix_end(&prefix);
        for (index, op) in self.ops.iter().enumerate() {
            let invalid = |reason| invalid(Some(index), reason);
            if !SHARD_CFS.contains(&op_cf(op)) {
                return Err(invalid("a node-local family"));
            }
            match op {
                Op::Put { cf, key, .. } | Op::Delete { cf, key } => {
                    if *cf == Cf::ShardLog {
                        return Err(invalid("a position written as data"));
                    }
                    too_large("key length", key.len(), RECORD_KEY_BYTES_MAX)?;
                    if !key.starts_with(&prefix) || key.len() == prefix.len() {
                        return Err(invalid("key outside the shard"));
                    }
                    if let Op::Put { value, .. } = op {
                        too_large("value length", value.len(), RECORD_VALUE_BYTES_MAX)?;
                    }
                }
                Op::DeleteRange { from, to, .. } => {
                    too_large("range start length", from.len(), RECORD_KEY_BYTES_MAX)?;
                    too_large("range end length", to.len(), RECORD_KEY_BYTES_MAX)?;
                    if !from.starts_with(&prefix) || to > &end {
                        return Err(invalid("range outside the shard"));
                    }
                    if from >= to {
                        return Err(invalid("empty range"));
                    }
                }
            }
        }
        too_large("encoded length", self.encoded_len(), RECORD_BYTES_MAX)
    }

    /// Bytes of [`ShardLogRecord::encode`].
    pub fn encoded_len(&self) -> usize {
        let extra = match self.kind {
            RecordKind::Log => 0,
            RecordKind::Snapshot { .. } => SNAPSHOT_HEADER_EXTRA_BYTES,
        };
        RECORD_HEADER_BYTES
            + extra
            + self
                .ops
                .iter()
                .map(|op| match op {
                    Op::Put { key, value, .. } => 1 + 1 + 2 + key.len() + 4 + value.len(),
                    Op::Delete { key, .. } => 1 + 1 + 2 + key.len(),
                    Op::DeleteRange { from, to, .. } => 1 + 1 + 2 + from.len() + 2 + to.len(),
                })
                .sum::<usize>()
    }

    /// The record's bytes. Call [`ShardLogRecord::check`] first: lengths above the bounds do
    /// not fit their fields (they are cut, and the decoder refuses the result).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(match self.kind {
            RecordKind::Log => RECORD_VERSION,
            RecordKind::Snapshot { .. } => SNAPSHOT_VERSION,
        });
        out.extend_from_slice(&self.shard.to_be_bytes());
        out.extend_from_slice(&self.lsn.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.base_epoch.to_be_bytes());
        if let RecordKind::Snapshot {
            session,
            index,
            last,
        } = self.kind
        {
            out.push(if last { FLAG_LAST } else { 0 });
            out.extend_from_slice(&session.to_be_bytes());
            out.extend_from_slice(&index.to_be_bytes());
        }
        out.extend_from_slice(&len_u32(self.ops.len()).to_be_bytes());
        for op in &self.ops {
            let cf_index = SHARD_CFS
                .iter()
                .position(|&c| c == op_cf(op))
                .unwrap_or(SHARD_CFS.len()) as u8;
            match op {
                Op::Put { key, value, .. } => {
                    out.extend_from_slice(&[TAG_PUT, cf_index]);
                    put_bytes16(&mut out, key);
                    out.extend_from_slice(&len_u32(value.len()).to_be_bytes());
                    out.extend_from_slice(value);
                }
                Op::Delete { key, .. } => {
                    out.extend_from_slice(&[TAG_DELETE, cf_index]);
                    put_bytes16(&mut out, key);
                }
                Op::DeleteRange { from, to, .. } => {
                    out.extend_from_slice(&[TAG_DELETE_RANGE, cf_index]);
                    put_bytes16(&mut out, from);
                    put_bytes16(&mut out, to);
                }
            }
        }
        out
    }

    /// Decodes and checks one record (see the module documentation).
    pub fn decode(bytes: &[u8]) -> Result<ShardLogRecord, RecordError> {
        too_large("encoded length", bytes.len(), RECORD_BYTES_MAX)?;
        let mut r = Reader { bytes };
        let version = r.u8()?;
        if version != RECORD_VERSION && version != SNAPSHOT_VERSION {
            return Err(RecordError::Version(version));
        }
        let shard = r.u16()?;
        let lsn = r.u64()?;
        let epoch = r.u64()?;
        let base_epoch = r.u64()?;
        let kind = if version == SNAPSHOT_VERSION {
            let flags = r.u8()?;
            if flags & !FLAG_LAST != 0 {
                return Err(RecordError::Invalid {
                    shard,
                    index: None,
                    reason: "unknown snapshot flags",
                });
            }
            RecordKind::Snapshot {
                session: r.u64()?,
                index: r.u32()?,
                last: flags & FLAG_LAST != 0,
            }
        } else {
            RecordKind::Log
        };
        let count = r.u32()? as usize;
        too_large("op count", count, RECORD_OPS_MAX)?;
        // Allocate for what the remaining bytes can hold, not for what the count claims.
        let mut ops = Vec::with_capacity(count.min(r.bytes.len() / OP_BYTES_MIN));
        for index in 0..count {
            let tag = r.u8()?;
            let cf = *SHARD_CFS
                .get(usize::from(r.u8()?))
                .ok_or(RecordError::Invalid {
                    shard,
                    index: Some(index),
                    reason: "unknown column family",
                })?;
            let op = match tag {
                TAG_PUT => {
                    let key = r.bytes16()?;
                    let len = r.u32()? as usize;
                    too_large("value length", len, RECORD_VALUE_BYTES_MAX)?;
                    let value = r.take(len)?.to_vec();
                    Op::Put { cf, key, value }
                }
                TAG_DELETE => Op::Delete {
                    cf,
                    key: r.bytes16()?,
                },
                TAG_DELETE_RANGE => Op::DeleteRange {
                    cf,
                    from: r.bytes16()?,
                    to: r.bytes16()?,
                },
                _ => {
                    return Err(RecordError::Invalid {
                        shard,
                        index: Some(index),
                        reason: "unknown op",
                    })
                }
            };
            ops.push(op);
        }
        if !r.bytes.is_empty() {
            return Err(RecordError::TrailingBytes(r.bytes.len()));
        }
        let record = ShardLogRecord {
            shard,
            lsn,
            epoch,
            base_epoch,
            ops,
            kind,
        };
        record.check()?;
        Ok(record)
    }
}

fn too_large(what: &'static str, len: usize, max: usize) -> Result<(), RecordError> {
    if len > max {
        return Err(RecordError::TooLarge { what, len, max });
    }
    Ok(())
}

/// Lengths are checked against bounds far below `u32::MAX` before encoding.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn put_bytes16(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.bytes.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A key: `len u16 | bytes`, at most [`RECORD_KEY_BYTES_MAX`].
    fn bytes16(&mut self) -> Result<Vec<u8>, RecordError> {
        let len = usize::from(self.u16()?);
        too_large("key length", len, RECORD_KEY_BYTES_MAX)?;
        Ok(self.take(len)?.to_vec())
    }
}
