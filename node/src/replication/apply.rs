//! [`apply`]: a replica writes the records its primary shipped.

use std::collections::HashMap;

use super::position::{position_key, read_position, Position};
use super::record::{RecordError, ShardLogRecord};
use crate::shard::ShardId;
use crate::storage::{Cf, Engine, StorageError, WriteBatch};

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
    /// The next record comes from an older epoch than the last one applied: its writer is no
    /// longer the primary (fenced).
    #[error(
        "shard {shard}: record {lsn} is of epoch {epoch}, this copy is at epoch {applied_epoch}"
    )]
    StaleEpoch {
        shard: ShardId,
        lsn: u64,
        epoch: u64,
        applied_epoch: u64,
    },
    /// A record at or below the position from a later epoch than the position's: this copy
    /// holds records the new primary does not have. It needs a snapshot.
    #[error("shard {shard}: record {lsn} of epoch {epoch} rewrites history this copy holds up to {applied:?}")]
    Diverged {
        shard: ShardId,
        lsn: u64,
        epoch: u64,
        applied: Position,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Writes `records` in order into `engine`, one synced batch for the whole call: each applied
/// record's ops and then its shard's new [`Position`] (LSN and epoch), so a crash keeps a prefix
/// of the records with positions that match their data.
///
/// For each record, against its shard's position `p` in this copy:
/// - `lsn <= p.lsn`: already applied (a re-send), skipped; unless its epoch is later than
///   `p.epoch` ([`ApplyError::Diverged`]).
/// - `lsn == p.lsn + 1`: applied, unless its epoch is earlier than `p.epoch`
///   ([`ApplyError::StaleEpoch`]).
/// - `lsn > p.lsn + 1`: refused ([`ApplyError::Gap`], naming the LSN needed).
///
/// On a refusal, the records before it are written (synced) and the error returned.
pub fn apply(engine: &dyn Engine, records: &[ShardLogRecord]) -> Result<Applied, ApplyError> {
    let mut positions: HashMap<ShardId, Position> = HashMap::new();
    let mut batch = WriteBatch::new();
    let mut applied = Applied::default();
    let mut refused = None;
    for record in records {
        let current = match check(engine, &mut positions, record) {
            Ok(current) => current,
            Err(e) => {
                refused = Some(e);
                break;
            }
        };
        if record.lsn <= current.lsn {
            applied.skipped += 1;
            continue;
        }
        let position = Position {
            lsn: record.lsn,
            epoch: record.epoch,
        };
        positions.insert(record.shard, position);
        batch.ops.extend(record.ops.iter().cloned());
        batch.put(Cf::ShardLog, position_key(record.shard), position.encode());
        applied.written += 1;
    }
    if !batch.is_empty() {
        engine.write(batch, true)?;
    }
    match refused {
        Some(e) => Err(e),
        None => Ok(applied),
    }
}

/// Whether `record` may be applied or skipped after the records before it; returns its shard's
/// position before it (read from `engine` the first time, then from `positions`).
fn check(
    engine: &dyn Engine,
    positions: &mut HashMap<ShardId, Position>,
    record: &ShardLogRecord,
) -> Result<Position, ApplyError> {
    record.check()?;
    let shard = record.shard;
    let position = match positions.get(&shard) {
        Some(p) => *p,
        None => {
            let p = read_position(engine, shard)?;
            positions.insert(shard, p);
            p
        }
    };
    if record.lsn <= position.lsn {
        if record.epoch > position.epoch {
            return Err(ApplyError::Diverged {
                shard,
                lsn: record.lsn,
                epoch: record.epoch,
                applied: position,
            });
        }
        return Ok(position);
    }
    if record.lsn > position.lsn + 1 {
        return Err(ApplyError::Gap {
            shard,
            applied: position.lsn,
            got: record.lsn,
            needs: position.lsn + 1,
        });
    }
    if record.epoch < position.epoch {
        return Err(ApplyError::StaleEpoch {
            shard,
            lsn: record.lsn,
            epoch: record.epoch,
            applied_epoch: position.epoch,
        });
    }
    Ok(position)
}
