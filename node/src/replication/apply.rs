//! [`apply`]: a replica writes the records its primary shipped.

use std::collections::HashMap;

use super::position::{
    catch_up_key, position_key, read_catch_up, read_position, CatchUpMark, Position,
};
use super::record::{RecordError, RecordKind, ShardLogRecord};
use crate::shard::ShardId;
use crate::shard_rows::SHARD_CFS;
use crate::storage::{key, prefix_end, Cf, Engine, Op, StorageError, WriteBatch};

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Records written.
    pub written: usize,
    /// Records at or below the shard's position: already here (a re-send), not written again.
    pub skipped: usize,
}

/// Why a record was refused. Every record before it in the call is written and durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApplyError {
    /// The record breaks a bound or rule ([`ShardLogRecord::check`]).
    #[error(transparent)]
    Record(#[from] RecordError),
    /// Records are missing between this copy's position and the record: the primary must send
    /// `needs` next (or a snapshot, if it no longer has it).
    #[error("shard {shard}: record {got} does not follow {applied}; LSN {needs} is needed next")]
    Gap {
        shard: ShardId,
        applied: u64,
        got: u64,
        needs: u64,
    },
    /// The record comes from an older epoch than a record or snapshot this copy took
    /// (its [`Position::fence`]): its writer is no longer the primary (fenced).
    #[error(
        "shard {shard}: record {lsn} is of epoch {epoch}, this copy is at epoch {applied_epoch}"
    )]
    StaleEpoch {
        shard: ShardId,
        lsn: u64,
        epoch: u64,
        applied_epoch: u64,
    },
    /// The copy's log differs from the record's writer's: a record at or below the position
    /// from a later epoch than the position's, or the next record written after a record of
    /// another epoch than the copy's last. This copy holds records the primary does not have
    /// (or lacks some it has at the same LSNs). It needs a snapshot.
    #[error("shard {shard}: record {lsn} of epoch {epoch} rewrites history this copy holds up to {applied:?}")]
    Diverged {
        shard: ShardId,
        lsn: u64,
        epoch: u64,
        applied: Position,
    },
    /// A snapshot chunk that does not continue the catch-up this copy is in (another session,
    /// or the copy moved since the previous chunk): the primary starts the catch-up over.
    #[error("shard {shard}: snapshot chunk at {lsn} refused: {reason}")]
    CatchUp {
        shard: ShardId,
        lsn: u64,
        reason: &'static str,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Writes `records` in order into `engine`, one synced batch for the whole call: each applied
/// record's ops and then its shard's new [`Position`] (LSN, epoch, fence), so a crash keeps a prefix
/// of the records with positions that match their data.
///
/// Every record of an epoch earlier than `p.fence` (the latest epoch this copy took anything
/// from) is refused as stale ([`ApplyError::StaleEpoch`]): its writer was deposed, and what it
/// sends is never counted as held here. Otherwise, for each log record against its shard's
/// position `p` in this copy:
/// - `lsn <= p.lsn`: if its epoch is `p.epoch` (or `p.fence`, right after a snapshot from that
///   epoch's primary), already applied (a re-send) and skipped: one primary writes an epoch's
///   records, and this copy's log matches that primary's up to `p.lsn` (below). If its epoch is
///   later, this copy's record there is another one ([`ApplyError::Diverged`]).
/// - `lsn == p.lsn + 1`: applied if it was written after a record of `p.epoch`
///   ([`ShardLogRecord::base_epoch`]); else this copy's record at `p.lsn` is not the writer's
///   ([`ApplyError::Diverged`]). This is what keeps a copy that took records its primary could
///   not replicate (cut off, then deposed) from taking the next primary's records on top of
///   them when the LSNs happen to line up.
/// - `lsn > p.lsn + 1`: refused ([`ApplyError::Gap`], naming the LSN needed).
///
/// A snapshot chunk ([`RecordKind::Snapshot`]) from an epoch earlier than `p.fence` is refused
/// as stale. The first chunk of a session (index 0) deletes every row of the shard in this
/// copy, then writes its rows, sets the position to the chunk's LSN and base epoch (the
/// primary's own position) and marks the copy as catching up in `session` ([`read_catch_up`]).
/// A later chunk must be the next index of that session, at exactly the position the copy has
/// (the log records the primary wrote between the two chunks come between them, so the copy is
/// where the primary was when it read the chunk), else [`ApplyError::CatchUp`]. The last chunk
/// removes the mark: from then on the copy equals the primary's at that position, and the log
/// records after it keep it so.
///
/// Why this is exact: the rows up to the previous chunk's last key equal the primary's at that
/// chunk's LSN; the records applied since move both copies alike; the new chunk carries the
/// primary's rows for the next keys at the current LSN, and every row past them in this copy
/// was written by those records, which the primary holds too. So when the last chunk lands,
/// every key matches.
///
/// On a refusal, the records before it are written (synced) and the error returned.
pub fn apply(engine: &dyn Engine, records: &[ShardLogRecord]) -> Result<Applied, ApplyError> {
    apply_each(engine, records).1
}

/// [`apply`], also saying for each record whether it was written (a re-send skipped, a refused
/// record and those after it are not; the vector is as long as `records`).
pub fn apply_each(
    engine: &dyn Engine,
    records: &[ShardLogRecord],
) -> (Vec<bool>, Result<Applied, ApplyError>) {
    let mut copies: HashMap<ShardId, Copy> = HashMap::new();
    let mut batch = WriteBatch::new();
    let mut applied = Applied::default();
    let mut written = vec![false; records.len()];
    let mut refused = None;
    for (i, record) in records.iter().enumerate() {
        match step(engine, &mut copies, record, &mut batch) {
            Ok(true) => {
                applied.written += 1;
                written[i] = true;
            }
            Ok(false) => applied.skipped += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    if !batch.is_empty() {
        if let Err(e) = engine.write(batch, true) {
            return (vec![false; records.len()], Err(e.into()));
        }
    }
    match refused {
        Some(e) => (written, Err(e)),
        None => (written, Ok(applied)),
    }
}

/// A shard's copy as the records before the current one in the call leave it.
#[derive(Debug, Clone, Copy)]
struct Copy {
    position: Position,
    /// The catch-up in progress, if one is.
    catch_up: Option<CatchUpMark>,
}

/// The ops a first snapshot chunk starts with: every row of the shard in this copy goes,
/// except its position and catch-up mark ([`Cf::ShardLog`]), which the chunk sets.
pub fn snapshot_clears(shard: ShardId) -> Vec<Op> {
    let prefix = key(shard, &[]);
    let end = prefix_end(&prefix);
    (SHARD_CFS.iter().copied())
        .filter(|&cf| cf != Cf::ShardLog)
        .map(|cf| Op::DeleteRange {
            cf,
            from: prefix.clone(),
            to: end.clone(),
        })
        .collect()
}

/// Checks `record` against its shard's copy and adds what it writes to `batch`; `Ok(false)` if
/// it is already applied (a re-send).
fn step(
    engine: &dyn Engine,
    copies: &mut HashMap<ShardId, Copy>,
    record: &ShardLogRecord,
    batch: &mut WriteBatch,
) -> Result<bool, ApplyError> {
    record.check()?;
    let shard = record.shard;
    let copy = match copies.get(&shard) {
        Some(c) => *c,
        None => {
            let c = Copy {
                position: read_position(engine, shard)?,
                catch_up: read_catch_up(engine, shard)?,
            };
            copies.insert(shard, c);
            c
        }
    };
    let position = copy.position;
    let mut catch_up = copy.catch_up;
    // Its writer was deposed: this copy took records of a later epoch.
    let stale = ApplyError::StaleEpoch {
        shard,
        lsn: record.lsn,
        epoch: record.epoch,
        applied_epoch: position.fence.max(position.epoch),
    };
    if record.epoch < position.fence.max(position.epoch) {
        return Err(stale);
    }
    let diverged = ApplyError::Diverged {
        shard,
        lsn: record.lsn,
        epoch: record.epoch,
        applied: position,
    };
    let after = match record.kind {
        RecordKind::Log => {
            if record.lsn <= position.lsn {
                // The writer of `fence` wrote or cut everything here up to `lsn` (a snapshot
                // leaves `epoch` below `fence` until the next record).
                if record.epoch != position.epoch && record.epoch != position.fence {
                    return Err(diverged);
                }
                return Ok(false);
            }
            if record.lsn > position.lsn + 1 {
                return Err(ApplyError::Gap {
                    shard,
                    applied: position.lsn,
                    got: record.lsn,
                    needs: position.lsn + 1,
                });
            }
            if record.base_epoch != position.epoch {
                return Err(diverged);
            }
            batch.ops.extend(record.ops.iter().cloned());
            Position::after(record.lsn, record.epoch, position.fence)
        }
        RecordKind::Snapshot {
            session,
            index,
            last,
        } => {
            let refuse = |reason| ApplyError::CatchUp {
                shard,
                lsn: record.lsn,
                reason,
            };
            if index == 0 {
                batch.ops.extend(snapshot_clears(shard));
            } else if catch_up.map(|m| m.session) != Some(session) {
                return Err(refuse("this copy is not in that catch-up session"));
            } else if catch_up.map(|m| m.next) != Some(index) {
                return Err(refuse("the chunk does not follow the last one applied"));
            } else if (position.lsn, position.epoch) != (record.lsn, record.base_epoch) {
                return Err(refuse("this copy is not at the chunk's position"));
            }
            batch.ops.extend(record.ops.iter().cloned());
            if last {
                batch.delete(Cf::ShardLog, catch_up_key(shard));
                catch_up = None;
            } else {
                let mark = CatchUpMark {
                    session,
                    next: index.saturating_add(1),
                };
                batch.put(Cf::ShardLog, catch_up_key(shard), mark.encode());
                catch_up = Some(mark);
            }
            Position {
                lsn: record.lsn,
                epoch: record.base_epoch,
                fence: position.fence.max(record.epoch),
            }
        }
    };
    let position = after;
    batch.put(Cf::ShardLog, position_key(shard), position.encode());
    copies.insert(shard, Copy { position, catch_up });
    Ok(true)
}
