//! [`ReplicatingEngine`]: the primary's side of shard replication, as an [`Engine`] wrapper.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use ringpost_coordinator::NodeId;

use super::position::{position_key, read_catch_up, read_position, Position};
use super::record::{RecordKind, ShardLogRecord};
use super::split::{split, touches_shards};
use crate::handoff::{export_chunk, Chunk, Cursor};
use crate::ring::Ring;
use crate::shard::ShardId;
use crate::shard_rows::SHARD_CFS;
use crate::storage::{Cf, Engine, Op, Result, StorageError, WriteBatch};

/// Why records were not shipped. The sink's own words, for the log and the caller's error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ShipError(pub String);

/// Where the primary's records go: to the shard's replicas ([`super::NetworkSink`]; tests
/// also apply them to a second engine in-process).
pub trait ShardLogSink: Send + Sync + 'static {
    /// Takes the records of one committed batch, one per shard it touched, in shard order.
    /// Called in LSN order for each shard, one call at a time, after the batch is written
    /// locally; the primary's `write` returns only once this does, so an implementation
    /// returns `Ok` only once the replicas have the records (durably if `sync`: a synced write
    /// with no shard ops still calls `ship` with no records, so that replicas make the records
    /// they applied unsynced durable too, as a local synced write does).
    ///
    /// On `Err` the records may have reached some replicas, or none: a replica that misses one
    /// refuses the next as a gap ([`super::apply`]) and catches up.
    fn ship(&self, records: Vec<ShardLogRecord>, sync: bool) -> Result<(), ShipError>;

    /// [`ShardLogSink::ship`] in two steps: hands the records on (in the order of the calls,
    /// which is LSN order per shard) and returns what is left to wait for. The engine calls it
    /// under the lock that orders its writes and waits after releasing it, so one write waiting
    /// for its replicas holds up no other writer (nor a blocking thread per writer behind it).
    /// The default ships at once and leaves nothing to wait for.
    fn queue(&self, records: Vec<ShardLogRecord>, sync: bool) -> Result<Shipping, ShipError> {
        self.ship(records, sync).map(|()| Shipping::done())
    }
}

/// Records a sink has taken and not yet seen on the replicas (see [`ShardLogSink::queue`]).
#[must_use = "a write is acknowledged only once its records are waited for"]
pub struct Shipping(Option<Box<dyn FnOnce() -> Result<(), ShipError> + Send>>);

impl Shipping {
    /// Nothing to wait for.
    pub fn done() -> Shipping {
        Shipping(None)
    }

    /// Waiting is `wait`.
    pub fn waiting(wait: impl FnOnce() -> Result<(), ShipError> + Send + 'static) -> Shipping {
        Shipping(Some(Box::new(wait)))
    }

    /// Blocks until the replicas have the records (durably for a synced write), or fails as
    /// [`ShardLogSink::ship`] does.
    pub fn wait(self) -> Result<(), ShipError> {
        self.0.map_or(Ok(()), |wait| wait())
    }
}

/// An [`Engine`] that turns every committed batch into per-shard log records.
///
/// `write(batch, sync)`:
/// 1. [`split`] the batch; node-local batches (only [`Cf::Meta`]) pass straight through.
/// 2. Build one [`ShardLogRecord`] per shard touched, at the shard's next LSN and the current
///    epoch, and [`ShardLogRecord::check`] it: a batch that breaks a rule or bound is refused
///    before anything is written (no service writes such a batch; see [`super::SplitError`]).
///    A batch that writes a position itself is refused too: positions move only with records
///    here, or in a [`WriteBatch::local`] batch (a hand-off import, a dropped copy), which is
///    written as it is with no record at all.
/// 3. Append each shard's new [`Position`] to the batch and write it with `sync`: the data and
///    the positions are one atomic batch, so after a crash the stored position is exactly the
///    last record whose data is stored, and the LSNs continue from it.
/// 4. Queue the records to the sink ([`ShardLogSink::queue`]), release the lock, wait for
///    them and return the sink's error, if any, as [`StorageError::Replication`].
///
/// Why the local write stays when the sink fails: the caller gets an error and acknowledges
/// nothing, so the write is one the protocol already allows to be lost or kept (at-least-once:
/// a client's retry is deduplicated on this node). The shard's LSN has advanced, so the next
/// record shipped is one past the missing one and a replica that lacks it refuses it as a gap
/// rather than diverging silently.
///
/// Steps 2 to 4 up to the queueing run under one lock, so records of a shard are allocated,
/// written and queued in LSN order with no holes: a failed local write allocates nothing (and,
/// since RocksDB may have written a batch it reported as failed, the cached positions are
/// dropped and read back from disk). The price is that writes of different services no longer
/// share an fsync while a sink is set; the inbox writer, which carries nearly all the load, is
/// one thread anyway. The wait for the replicas is outside the lock: when it was inside, one
/// synced write waiting out a slow replica (up to the ack timeout) held every other writer of
/// the node, each on a blocking thread; under the million's reconnect storm that was ~420
/// threads per node, and a replica whose blocking pool was full could not apply records
/// either, so its primaries timed out in turn.
///
/// Exactly one wrapper may write a database: each caches the positions it wrote. Records this
/// node applies as a replica go to [`ReplicatingEngine::inner`], below the wrapper (never
/// through it, which would ship them on); the cache is dropped at every new epoch, when roles
/// may change (see [`ReplicatingEngine::set_epoch`]).
///
/// Memory: one cached [`Position`] (24 bytes with its key) per shard written, at most 65535.
pub struct ReplicatingEngine {
    inner: Arc<dyn Engine>,
    sink: Arc<dyn ShardLogSink>,
    epoch: AtomicU64,
    /// The ring the epoch came from, and this node's id, once [`ReplicatingEngine::set_ring`]
    /// gave them: a write to a shard this node is not the primary of at that epoch is refused.
    /// Held (read) while a write takes its epoch, so the two never disagree.
    fence: RwLock<Option<Fence>>,
    /// Positions read or written so far; held across allocate, write and ship.
    positions: Mutex<Positions>,
    /// Shards whose cached position is to be forgotten at the next write
    /// ([`ReplicatingEngine::forget_position`]): held only for a push or a drain, so an async
    /// task may take it (never `positions`, which a write holds while it waits for replicas).
    forgotten: Mutex<Vec<ShardId>>,
}

/// Who may write which shard: the ring of the current epoch and this node's id.
#[derive(Clone)]
struct Fence {
    me: NodeId,
    ring: Arc<Ring>,
}

/// The cached positions and the epoch they were cached at. A shard's role on this node (its
/// primary, or a replica applying records below this wrapper) changes only with the epoch, so
/// the cache is dropped when the epoch moves: a shard this node was a replica of is read back
/// from disk when it becomes the primary.
#[derive(Default)]
struct Positions {
    epoch: u64,
    shards: HashMap<ShardId, Position>,
}

impl Positions {
    fn at_epoch(&mut self, epoch: u64) -> &mut HashMap<ShardId, Position> {
        if self.epoch != epoch {
            self.shards.clear();
            self.epoch = epoch;
        }
        &mut self.shards
    }
}

impl std::fmt::Debug for ReplicatingEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatingEngine")
            .field("epoch", &self.epoch.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ReplicatingEngine {
    /// Wraps `inner`; records are written at `epoch` (see [`ReplicatingEngine::set_epoch`]).
    pub fn new(inner: Arc<dyn Engine>, sink: Arc<dyn ShardLogSink>, epoch: u64) -> Self {
        Self {
            inner,
            sink,
            epoch: AtomicU64::new(epoch),
            fence: RwLock::new(None),
            positions: Mutex::new(Positions {
                epoch,
                shards: HashMap::new(),
            }),
            forgotten: Mutex::new(Vec::new()),
        }
    }

    /// The epoch of the records written from now on. A shard whose stored position is at a
    /// later epoch is refused: a newer primary wrote it, this node is behind.
    pub fn set_epoch(&self, epoch: u64) {
        let _fence = self.fence.write().unwrap_or_else(PoisonError::into_inner);
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    /// Follows `ring`: records are written at its epoch, and only for shards whose primary it
    /// makes `me` (the first node of [`Ring::replicas`], the node replicas take records
    /// from). A write touching any other shard is refused before anything is written.
    ///
    /// Why: a replica skips a record whose LSN it holds already unless its epoch is later
    /// ([`super::apply`]), which is sound only if one node writes a shard at an epoch. A node
    /// that lost a shard while a write of it was in flight would otherwise log that write at
    /// the new epoch, under the LSN the new primary is about to use: the new primary's record
    /// would then look applied on this copy, be acknowledged, and be lost if this copy is
    /// promoted later (chaos cluster-partition seed 3: an acked read receipt lost).
    pub fn set_ring(&self, me: NodeId, ring: Arc<Ring>) {
        let mut fence = self.fence.write().unwrap_or_else(PoisonError::into_inner);
        self.epoch.store(ring.epoch, Ordering::Relaxed);
        *fence = Some(Fence { me, ring });
    }

    /// The engine this one writes into.
    pub fn inner(&self) -> &Arc<dyn Engine> {
        &self.inner
    }

    /// Forgets the cached position of `shard`, so the next write reads it from disk: call it
    /// when the shard's rows (and position) were written by another primary's records, as a
    /// replica, and this node is about to write it as the primary.
    ///
    /// Never blocks on a write in progress (a write holds the positions while it waits for the
    /// replicas, which may take a timeout and a coordinator round trip): the shard is noted and
    /// forgotten by the next write, cut or local write, before it reads any position.
    pub fn forget_position(&self, shard: ShardId) {
        self.forgotten
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(shard);
    }

    /// The positions cache at the current epoch, with the shards noted by
    /// [`ReplicatingEngine::forget_position`] forgotten.
    fn positions(&self) -> std::sync::MutexGuard<'_, Positions> {
        let epoch = self.epoch.load(Ordering::Relaxed);
        let mut cache = self
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let forgotten = std::mem::take(
            &mut *self
                .forgotten
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let shards = cache.at_epoch(epoch);
        for shard in forgotten {
            shards.remove(&shard);
        }
        cache
    }

    /// One chunk of a consistent snapshot of `shard` for a catch-up (see
    /// [`super::apply`]): under the lock that orders this wrapper's writes and shipping, reads
    /// the shard's position and its next rows after `from` (at most `max_bytes`, every
    /// [`SHARD_CFS`](crate::shard_rows::SHARD_CFS) family but the positions'), and calls `emit`
    /// with them while still holding it. So whatever `emit` queues to a replica comes after
    /// every record at or below the position and before every record after it. The chunk's
    /// `next` is `None` when the shard is finished.
    ///
    /// Holds up this node's writes for one chunk's read (a few scans of at most `max_bytes`).
    /// Refused if this node's own copy is incomplete (it is catching up itself).
    pub fn cut(
        &self,
        shard: ShardId,
        from: Option<&Cursor>,
        max_bytes: usize,
        emit: &mut dyn FnMut(Position, u64, Chunk),
    ) -> Result<()> {
        let epoch = self.epoch.load(Ordering::Relaxed);
        let mut cache = self.positions();
        let positions = cache.at_epoch(epoch);
        if read_catch_up(&*self.inner, shard)?.is_some() {
            return Err(StorageError::Other(format!(
                "shard {shard}: this node's own copy is catching up"
            )));
        }
        let position = match positions.get(&shard) {
            Some(p) => *p,
            None => read_position(&*self.inner, shard)?,
        };
        let mut chunk = export_chunk(&*self.inner, shard, from, max_bytes)
            .map_err(|e| StorageError::Other(e.to_string()))?;
        let positions_cf = SHARD_CFS.iter().position(|&cf| cf == Cf::ShardLog);
        let positions_cf = positions_cf.map(|i| i as u8);
        chunk.rows.retain(|row| Some(row.cf) != positions_cf);
        if chunk.next.as_ref().map(|c| c.cf) == positions_cf {
            chunk.next = None; // the positions' family is last: nothing else is left
        }
        emit(position, epoch, chunk);
        Ok(())
    }

    /// A [`WriteBatch::local`] batch: written as it is, under the lock (it may carry
    /// positions), and the cached positions of the shards it touches are forgotten.
    fn write_local(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let per_shard = split(&batch).map_err(|e| StorageError::Other(e.to_string()))?;
        let mut cache = self.positions();
        for (shard, _) in &per_shard {
            cache.shards.remove(shard);
        }
        self.inner.write(batch, sync)
    }

    fn write_replicated(&self, mut batch: WriteBatch, sync: bool) -> Result<()> {
        let per_shard = split(&batch).map_err(|e| StorageError::Other(e.to_string()))?;
        if let Some(index) = batch.ops.iter().position(writes_a_position) {
            return Err(StorageError::Other(format!(
                "op {index} of the batch writes a shard log position: only a local batch \
                 (a hand-off import) may"
            )));
        }
        let (epoch, fence) = {
            let fence = self.fence.read().unwrap_or_else(PoisonError::into_inner);
            (self.epoch.load(Ordering::Relaxed), fence.clone())
        };
        if let Some(Fence { me, ring }) = &fence {
            if let Some(shard) = per_shard
                .iter()
                .map(|(shard, _)| *shard)
                .find(|&shard| ring.owner(shard) != Some(*me))
            {
                return Err(StorageError::NotPrimary(format!(
                    "shard {shard}: node {me} is not its primary at epoch {epoch}"
                )));
            }
        }
        let mut cache = self.positions();
        let positions = cache.at_epoch(epoch);
        let mut records = Vec::with_capacity(per_shard.len());
        // Each record's shard position once it is written.
        let mut after = Vec::with_capacity(per_shard.len());
        for (shard, ops) in per_shard {
            let current = match positions.get(&shard) {
                Some(p) => *p,
                None => read_position(&*self.inner, shard)?,
            };
            if current.fence.max(current.epoch) > epoch {
                return Err(StorageError::Other(format!(
                    "shard {shard} was written at epoch {}, after this node's epoch {epoch}",
                    current.fence.max(current.epoch)
                )));
            }
            let record = ShardLogRecord {
                shard,
                lsn: current.lsn + 1,
                epoch,
                base_epoch: current.epoch,
                ops,
                kind: RecordKind::Log,
            };
            record
                .check()
                .map_err(|e| StorageError::Other(e.to_string()))?;
            after.push(Position::after(record.lsn, epoch, current.fence));
            records.push(record);
        }
        for (r, position) in records.iter().zip(&after) {
            batch.put(Cf::ShardLog, position_key(r.shard), position.encode());
        }
        if let Err(e) = self.inner.write(batch, sync) {
            // The batch may be on disk all the same: read the positions back next time.
            positions.clear();
            return Err(e);
        }
        for (r, position) in records.iter().zip(after) {
            positions.insert(r.shard, position);
        }
        let shipping = self
            .sink
            .queue(records, sync)
            .map_err(|e| StorageError::Replication(e.0))?;
        // Queued in order; the wait needs no lock.
        drop(cache);
        shipping.wait().map_err(|e| StorageError::Replication(e.0))
    }
}

/// A put or delete of a position; a range delete of a whole shard (dropping it) may cover one.
fn writes_a_position(op: &Op) -> bool {
    matches!(
        op,
        Op::Put {
            cf: Cf::ShardLog,
            ..
        } | Op::Delete {
            cf: Cf::ShardLog,
            ..
        }
    )
}

impl Engine for ReplicatingEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(cf, key)
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        if batch.local {
            return self.write_local(batch, sync);
        }
        if touches_shards(&batch) {
            return self.write_replicated(batch, sync);
        }
        if !sync {
            return self.inner.write(batch, false);
        }
        // A synced write of node-local data, or of nothing (a barrier): the replicas sync too.
        let order = self
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.inner.write(batch, true)?;
        let shipping = self
            .sink
            .queue(Vec::new(), true)
            .map_err(|e| StorageError::Replication(e.0))?;
        drop(order);
        shipping.wait().map_err(|e| StorageError::Replication(e.0))
    }

    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.inner.scan(cf, from, to, limit)
    }

    fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.inner.last_in(cf, from, to)
    }

    fn drops_expired_dedup(&self) -> bool {
        self.inner.drops_expired_dedup()
    }

    /// Reopens the inner engine and forgets the cached positions: a write that failed may be
    /// on disk after all, and its position with it.
    fn recover(&self) -> Result<()> {
        let mut cache = self
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        cache.shards.clear();
        self.inner.recover()
    }
}
