//! [`serve_parts`]: a replica applying the parts of one `Replicate` request, and the answer it
//! gives per shard ([`ShardAnswer`]).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::apply::{apply, Applied, ApplyError};
use super::part::{Reassembly, RecordPart};
use super::position::{read_catch_up, read_position};
use super::record::{RecordKind, ShardLogRecord};
use crate::shard::ShardId;
use crate::storage::Engine;

/// How far a replica's copy of one shard is after a `Replicate` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardAnswer {
    pub shard: ShardId,
    pub outcome: ReplicaOutcome,
}

/// What became of one shard's records; the kinds of [`ApplyError`] the primary acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaOutcome {
    /// The copy includes every record up to `lsn`, durably (a record still in assembly is not
    /// in it yet).
    Applied { lsn: u64 },
    /// The copy is at `lsn`, durably, but is in the middle of a catch-up: it lacks rows the
    /// snapshot's remaining chunks bring. It may not enter the in-sync set yet.
    Catching { lsn: u64 },
    /// Records are missing: the copy is at `applied`, the primary must send `needs` next (or a
    /// snapshot).
    Gap { applied: u64, needs: u64 },
    /// The records come from an epoch older than the copy's: their writer is fenced.
    StaleEpoch { applied_epoch: u64 },
    /// The copy holds records the primary does not have: it needs a snapshot.
    Diverged {
        applied_lsn: u64,
        applied_epoch: u64,
    },
    /// A part or record broke a rule, or storage failed: why.
    Failed { reason: String },
}

impl ReplicaOutcome {
    fn of(e: &ApplyError) -> ReplicaOutcome {
        match e {
            ApplyError::Gap { applied, needs, .. } => ReplicaOutcome::Gap {
                applied: *applied,
                needs: *needs,
            },
            ApplyError::StaleEpoch { applied_epoch, .. } => ReplicaOutcome::StaleEpoch {
                applied_epoch: *applied_epoch,
            },
            ApplyError::Diverged { applied, .. } => ReplicaOutcome::Diverged {
                applied_lsn: applied.lsn,
                applied_epoch: applied.epoch,
            },
            ApplyError::CatchUp { .. } | ApplyError::Record(_) | ApplyError::Storage(_) => {
                ReplicaOutcome::Failed {
                    reason: e.to_string(),
                }
            }
        }
    }
}

/// What one request did, for the answer and the metrics.
#[derive(Debug, Default)]
pub struct Served {
    /// One per shard named in the request, in the order first named.
    pub answers: Vec<ShardAnswer>,
    /// Records written (not re-sends) and their encoded bytes.
    pub records_applied: u64,
    pub bytes_applied: u64,
}

/// Applies `parts` (from one primary, whose records in assembly are `assembly`) to `engine`:
/// every record completed by them, in order, in one synced batch ([`apply`]). A shard whose
/// part or record is refused gets its error and nothing more of this request; the other
/// shards' records are applied all the same (a refusal costs one more batch: [`apply`] stops at
/// the first, the records before it stay written and are skipped as re-sends the second time).
///
/// Blocking (reads and an fsync): run it on a blocking thread. `engine` is the bare database,
/// never a replicating wrapper, which would ship the records on.
pub fn serve_parts(
    engine: &dyn Engine,
    assembly: &mut Reassembly,
    parts: Vec<RecordPart>,
) -> Served {
    serve_parts_with(engine, assembly, parts, &|records| apply(engine, records))
}

/// [`serve_parts`], writing complete records with `apply_records` (which must write them to
/// `engine` as [`apply`] does; the node's inbox also moves its entries gauge,
/// [`crate::inbox::Inbox::apply_replicated`]).
pub fn serve_parts_with(
    engine: &dyn Engine,
    assembly: &mut Reassembly,
    parts: Vec<RecordPart>,
    apply_records: &dyn Fn(&[ShardLogRecord]) -> Result<Applied, ApplyError>,
) -> Served {
    let mut order: Vec<ShardId> = Vec::new();
    let mut failed: BTreeMap<ShardId, ReplicaOutcome> = BTreeMap::new();
    let mut records: Vec<(ShardLogRecord, usize)> = Vec::new();
    for part in parts {
        let shard = part.shard;
        if !order.contains(&shard) {
            order.push(shard);
        }
        if failed.contains_key(&shard) {
            continue;
        }
        let bytes = part.total_bytes as usize;
        match assembly.add(part) {
            Ok(Some(record)) => records.push((record, bytes)),
            Ok(None) => {}
            Err(e) => {
                failed.insert(
                    shard,
                    ReplicaOutcome::Failed {
                        reason: e.to_string(),
                    },
                );
            }
        }
    }
    records.retain(|(r, _)| !failed.contains_key(&r.shard));

    let mut before: HashMap<ShardId, u64> = HashMap::new();
    for (r, _) in &records {
        if let std::collections::hash_map::Entry::Vacant(v) = before.entry(r.shard) {
            match read_position(engine, r.shard) {
                Ok(p) => {
                    v.insert(p.lsn);
                }
                Err(e) => {
                    failed.insert(
                        r.shard,
                        ReplicaOutcome::Failed {
                            reason: e.to_string(),
                        },
                    );
                }
            }
        }
    }
    records.retain(|(r, _)| !failed.contains_key(&r.shard));

    // Ends: every round either applies all that is left or takes one more shard out.
    let mut batch: Vec<ShardLogRecord> = records.iter().map(|(r, _)| r.clone()).collect();
    while !batch.is_empty() {
        match apply_records(&batch) {
            Ok(_) => break,
            Err(e) => {
                let shard = match &e {
                    ApplyError::Gap { shard, .. }
                    | ApplyError::StaleEpoch { shard, .. }
                    | ApplyError::Diverged { shard, .. }
                    | ApplyError::CatchUp { shard, .. } => Some(*shard),
                    ApplyError::Record(_) | ApplyError::Storage(_) => None,
                };
                let outcome = ReplicaOutcome::of(&e);
                match shard {
                    Some(shard) => {
                        failed.insert(shard, outcome);
                        batch.retain(|r| r.shard != shard);
                    }
                    None => {
                        for r in &batch {
                            failed.entry(r.shard).or_insert_with(|| outcome.clone());
                        }
                        break;
                    }
                }
            }
        }
    }

    let mut served = Served::default();
    let mut after: HashMap<ShardId, u64> = HashMap::new();
    let mut refused: Vec<ShardId> = Vec::new();
    for shard in order {
        let position = read_position(engine, shard)
            .and_then(|p| Ok((p, read_catch_up(engine, shard)?.is_some())));
        if let Ok((p, _)) = &position {
            after.insert(shard, p.lsn);
        }
        let outcome = match (failed.remove(&shard), position) {
            (Some(outcome), _) => {
                refused.push(shard);
                outcome
            }
            (None, Ok((p, false))) => ReplicaOutcome::Applied { lsn: p.lsn },
            (None, Ok((p, true))) => ReplicaOutcome::Catching { lsn: p.lsn },
            (None, Err(e)) => ReplicaOutcome::Failed {
                reason: e.to_string(),
            },
        };
        served.answers.push(ShardAnswer { shard, outcome });
    }
    for (r, bytes) in &records {
        let written = match r.kind {
            RecordKind::Log => {
                let was = before.get(&r.shard).copied().unwrap_or(u64::MAX);
                let now = after.get(&r.shard).copied().unwrap_or(0);
                r.lsn > was && r.lsn <= now
            }
            // A chunk of a shard that was not refused was written.
            RecordKind::Snapshot { .. } => !refused.contains(&r.shard),
        };
        if written {
            served.records_applied += 1;
            served.bytes_applied += *bytes as u64;
        }
    }
    served
}
