//! The inbox on a replica (issue 19): replicated records move the entries gauge as a hand-off
//! import does, and a shard this node becomes the primary of is adopted by the writer.
//!
//! [`Inbox::entries_total`] is the sum of the per-device counts stored on this node, replica
//! copies included: it is computed from every stored counter at start, so the records a replica
//! applies must move it by what they change in stored counts, or a restart would count them
//! and the running node would not.

use std::collections::HashMap;

use super::device::Stored;
use super::keys::parse_meta_key;
use super::writer::Request;
use super::{count_entries_in, Inbox, InboxError};
use crate::replication::{self, read_position, Applied, ApplyError, RecordKind, ShardLogRecord};
use crate::shard::ShardId;
use crate::storage::{Cf, Engine, Op, StorageError};

impl Inbox {
    /// Applies records shipped by a shard's primary to `engine` — this node's own database, never
    /// a [`crate::replication::ReplicatingEngine`] (which would ship them on) — with
    /// [`replication::apply`], and moves [`Inbox::entries_total`] by the change in stored
    /// counts of the records it wrote (not those it skipped as already applied).
    pub fn apply_replicated(
        &self,
        engine: &dyn Engine,
        records: &[ShardLogRecord],
    ) -> Result<Applied, ApplyError> {
        // The change each record would make if written, against the stored counts as the
        // records before it in this call leave them, following `apply`'s rules for which are
        // written (a re-sent log record is not; a snapshot chunk is, and a first one clears
        // the shard).
        let mut at: HashMap<ShardId, u64> = HashMap::new();
        let mut overlay = Overlay::default();
        let mut deltas = Vec::with_capacity(records.len());
        for r in records {
            let lsn = match at.get(&r.shard) {
                Some(&lsn) => lsn,
                None => read_position(engine, r.shard)?.lsn,
            };
            let delta = match r.kind {
                RecordKind::Log if r.lsn <= lsn => 0,
                RecordKind::Log => pending_delta(engine, &r.ops, &mut overlay)?,
                RecordKind::Snapshot { index: 0, .. } => {
                    let mut ops = replication::snapshot_clears(r.shard);
                    ops.extend(r.ops.iter().cloned());
                    pending_delta(engine, &ops, &mut overlay)?
                }
                RecordKind::Snapshot { .. } => pending_delta(engine, &r.ops, &mut overlay)?,
            };
            let next = match r.kind {
                RecordKind::Log => lsn.max(r.lsn),
                RecordKind::Snapshot { .. } => r.lsn,
            };
            at.insert(r.shard, next);
            deltas.push(delta);
        }
        let (written, result) = replication::apply_each(engine, records);
        // Whatever was written (all of it, or a prefix before a refusal) moves the gauge.
        let delta = (deltas.iter().zip(&written))
            .filter(|(_, &w)| w)
            .fold(0i64, |sum, (d, _)| sum.saturating_add(*d));
        self.move_entries_total(delta);
        result
    }

    /// Makes `shard`, whose rows came by replication, this node's to serve: the writer drops
    /// what it cached (its counters may predate the replicated rows) and learns the users with
    /// receipts waiting in the shard's outbox. Call before the shard is served; the accounts
    /// cache is the caller's ([`crate::accounts::Accounts::forget_cached_shard`]).
    pub async fn adopt_shard(&self, shard: ShardId) -> Result<(), InboxError> {
        if shard >= self.inner.config.shard_count {
            return Err(InboxError::Invalid("no such shard"));
        }
        self.call(|reply| Request::AdoptShard { shard, reply })
            .await
    }

    fn move_entries_total(&self, delta: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        let total = &self.inner.entries_total;
        if delta >= 0 {
            total.fetch_add(delta.unsigned_abs(), Relaxed);
        } else {
            // Never below zero, whatever a peer sent.
            let _ = total.fetch_update(Relaxed, Relaxed, |t| {
                Some(t.saturating_sub(delta.unsigned_abs()))
            });
        }
    }
}

/// Stored counters as the ops of one call leave them, before they are written.
#[derive(Default)]
struct Overlay {
    /// Counters an op of this call wrote or deleted (0), by key.
    seen: HashMap<Vec<u8>, u64>,
    /// Ranges an op of this call deleted; a counter in one and not in `seen` is gone.
    cleared: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Overlay {
    fn pending(&self, engine: &dyn Engine, key: &[u8]) -> Result<u64, StorageError> {
        if let Some(&pending) = self.seen.get(key) {
            return Ok(pending);
        }
        if self
            .cleared
            .iter()
            .any(|(from, to)| key >= from.as_slice() && key < to.as_slice())
        {
            return Ok(0);
        }
        on_disk(engine, key)
    }
}

fn on_disk(engine: &dyn Engine, key: &[u8]) -> Result<u64, StorageError> {
    match engine.get(Cf::InboxMeta, key)? {
        Some(bytes) => Ok(Stored::decode(&bytes)?.pending()),
        None => Ok(0),
    }
}

/// How much `ops` change the stored pending counts: each counter put adds its count minus the
/// one it replaces, each counter delete or range delete subtracts what it removes, all against
/// the counters as earlier ops of the call left them.
fn pending_delta(
    engine: &dyn Engine,
    ops: &[Op],
    overlay: &mut Overlay,
) -> Result<i64, StorageError> {
    let mut delta = 0i64;
    for op in ops {
        match op {
            Op::Put {
                cf: Cf::InboxMeta,
                key,
                value,
            } if parse_meta_key(key).is_some() => {
                let new = Stored::decode(value)?.pending();
                let old = overlay.pending(engine, key)?;
                delta = delta
                    .saturating_add(signed(new))
                    .saturating_sub(signed(old));
                overlay.seen.insert(key.clone(), new);
            }
            Op::Delete {
                cf: Cf::InboxMeta,
                key,
            } => {
                let old = overlay.pending(engine, key)?;
                delta = delta.saturating_sub(signed(old));
                overlay.seen.insert(key.clone(), 0);
            }
            Op::DeleteRange {
                cf: Cf::InboxMeta,
                from,
                to,
            } => {
                let in_range = |k: &[u8]| k >= from.as_slice() && k < to.as_slice();
                // What is stored in the range, corrected for counters an earlier op of this
                // call changed, and for ranges it already deleted.
                let mut removed = count_entries_in(engine, from, to, &mut Vec::new())?;
                for (key, pending) in overlay.seen.iter_mut().filter(|(k, _)| in_range(k)) {
                    removed = removed
                        .saturating_sub(on_disk(engine, key)?)
                        .saturating_add(*pending);
                    *pending = 0;
                }
                for (cf_from, cf_to) in &overlay.cleared {
                    let (lo, hi) = (cf_from.max(from), cf_to.min(to));
                    if lo < hi {
                        let mut already = count_entries_in(engine, lo, hi, &mut Vec::new())?;
                        // Counters in `seen` were corrected above.
                        for key in overlay.seen.keys() {
                            if key.as_slice() >= lo.as_slice() && key.as_slice() < hi.as_slice() {
                                already = already.saturating_sub(on_disk(engine, key)?);
                            }
                        }
                        removed = removed.saturating_sub(already);
                    }
                }
                overlay.cleared.push((from.clone(), to.clone()));
                delta = delta.saturating_sub(signed(removed));
            }
            _ => {}
        }
    }
    Ok(delta)
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
