//! The inbox's single writer: one thread owns every mutation and commits them in groups.
//!
//! The loop blocks for one request, then takes whatever else is already queued (up to
//! [`InboxConfig::group_requests_max`] requests and [`InboxConfig::group_bytes_max`] bytes),
//! runs the logic of all of them against one [`Group`] (an overlay of what this group changed,
//! over the writer's [`DeviceCache`] and the engine), writes the resulting batch with ONE write,
//! and only then answers each request. Because one thread does all of this, the dedup check,
//! seq allocation, quota check and floor moves never race.
//!
//! A group is synced when any request in it needs durability before its answer (appends,
//! device drops, shard drops, barriers). Acks, expiry and trims do not: a lost ack only
//! redelivers, which at-least-once allows, and it is made durable by the next synced group
//! (the WAL is one log). An ack's `delivered` receipt is written in the same batch as the ack
//! (in the sender's inboxes, or the acking user's outbox), so both or neither survive a crash.
//!
//! The device cache holds only what is on disk: a group's changes enter it after their write
//! succeeded, and a failed write empties it. The `entries_total` gauge likewise moves by a
//! group's delta only once its write succeeded.
//!
//! Acknowledged entries stay on disk below their device's floor until trimmed in bulk: one
//! range delete per device once [`TRIM_SEQS_MIN`] of them gathered, and a periodic
//! [`Request::Trim`] for the rest (point deletes for a device with at most
//! [`TRIM_POINT_DELETES_MAX`] of them).
//!
//! Hand-off requests (import, shard drop, sync barrier) each form a group of their own: they
//! touch whole shards, which the overlay of per-device state does not model, and an import's
//! write is the only one not synced that must not be made visible as a success before the
//! barrier that ends it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ringpost_wire::{DeviceId, MsgId, UserId};
use tokio::sync::{mpsc, oneshot};

use super::bodies::{body_row_key, count_key, BodyCount, GroupBodyCounters, BODY_REF_LEN};
use super::cache::{Cached, DeviceCache, DeviceKey};
use super::device::{AckEffect, DeviceMeta, Stored, ACKED_ABOVE_MAX};
use super::entry::{Entry, EntryHeader, EntryKind};
use super::gate::ShardGate;
use super::keys::{
    dedup_key, device_prefix, expiry_key, inbox_key, parse_expiry_key, parse_inbox_key,
    parse_meta_key,
};
use super::outbox::{receipt_id, OutboxReceipt, OUTBOX_DEVICE};
use super::records::DedupRecord;
use super::{
    count_entries_in, AckRequest, Acked, Append, AppendOutcome, InboxConfig, InboxError,
    OutboxQueue, RECEIPT_MSG_IDS_MAX,
};
use crate::shard::{shard_of, ShardId};
use crate::shard_rows::{Row, SHARD_CFS};
use crate::storage::{key, prefix_end, Cf, Engine, StorageError, WriteBatch};

pub(crate) type Reply<T> = oneshot::Sender<Result<T, InboxError>>;

/// Bytes a request is charged for in a group besides its payload (ids, reply channel).
const REQUEST_OVERHEAD_BYTES: usize = 64;

/// A device's acknowledged entries are range-deleted in the group that lets this many gather
/// below its floor; fewer wait for the periodic trim. Disk: up to this many acknowledged
/// entries per active device linger until then.
pub const TRIM_SEQS_MIN: u64 = 64;

/// A trim of at most this many acknowledged entries of a device deletes them one by one
/// instead of with a range delete. RocksDB fragments every range tombstone of a memtable again
/// for the first read after each write that adds one, and every read seeks through them: in a
/// reconnect storm (100,000 devices back, one entry each, trimmed by the periodic pass in
/// thousands of range tombstones at once) that cost 5% of the nodes' CPU, where a point
/// tombstone costs a read nothing outside its own device. A device's seqs are consecutive, so
/// the entries below its floor are exactly these keys (one already expired is deleted again,
/// harmlessly).
pub const TRIM_POINT_DELETES_MAX: u64 = 8;

/// Devices one periodic trim request trims below their floors: bounds that group's
/// batch (per device one range tombstone, or at most [`TRIM_POINT_DELETES_MAX`] point
/// tombstones: 32,768 keys, ~1 MiB) and how long it holds the writer.
pub const TRIM_DEVICES_PER_PASS: usize = 4096;

// A trim pass's point deletes fit one shard-log record with room for the rest of its group.
const _: () = assert!(
    TRIM_DEVICES_PER_PASS as u64 * TRIM_POINT_DELETES_MAX
        <= crate::replication::record::RECORD_OPS_MAX as u64 / 4
);

/// One mutation, queued for the writer.
pub(crate) enum Request {
    Append {
        append: Append,
        reply: Reply<AppendOutcome>,
    },
    Ack {
        ack: AckRequest,
        reply: Reply<Vec<Acked>>,
    },
    DropDevice {
        user: UserId,
        device: DeviceId,
        reply: Reply<u64>,
    },
    /// Inbox keys found expired by a scan; the writer checks each again before deleting it.
    ExpireEntries {
        keys: Vec<Vec<u8>>,
        now_ms: u64,
        reply: Reply<u64>,
    },
    /// Expiry index keys of expired entries ([`Cf::InboxExpiry`]); the writer checks each
    /// entry again before deleting it with its row, and deletes rows whose entry is gone.
    ExpireIndexed {
        keys: Vec<Vec<u8>>,
        now_ms: u64,
        reply: Reply<u64>,
    },
    /// Dedup keys found expired by a scan; the writer checks each again before deleting it.
    ExpireDedup {
        keys: Vec<Vec<u8>>,
        now_ms: u64,
        reply: Reply<u64>,
    },
    /// Shared body keys found expired by a scan; the writer checks each again.
    ExpireBodies {
        keys: Vec<Vec<u8>>,
        now_ms: u64,
        reply: Reply<u64>,
    },
    /// Range-deletes acknowledged entries of quiet devices the cache knows to have some.
    Trim {
        reply: Reply<u64>,
        /// Filled in by the writer when it takes the request.
        devices: Vec<DeviceKey>,
    },
    /// Hand-off rows of a closed shard, already validated; written unsynced.
    Import {
        shard: ShardId,
        rows: Vec<Row>,
        reply: Reply<i64>,
    },
    /// Deletes every row of a closed shard.
    DropShard { shard: ShardId, reply: Reply<u64> },
    /// A shard whose rows came by replication becomes this node's to serve: forget what is
    /// cached, learn the users with receipts in its outbox.
    AdoptShard { shard: ShardId, reply: Reply<()> },
    /// A synced write, even of nothing: answered once everything before it is durable.
    SyncBarrier { reply: Reply<()> },
}

impl Request {
    /// What the request weighs against [`InboxConfig::group_bytes_max`].
    fn cost_bytes(&self) -> usize {
        REQUEST_OVERHEAD_BYTES
            + match self {
                Request::Append { append, .. } => append
                    .entries
                    .iter()
                    .map(|(_, e)| e.encoded_len())
                    .sum::<usize>(),
                Request::Ack { ack, .. } => 48 * ack.seqs.len(),
                Request::DropDevice { .. } => 0,
                Request::Trim { devices, .. } => 32 * devices.len(),
                Request::ExpireEntries { keys, .. }
                | Request::ExpireIndexed { keys, .. }
                | Request::ExpireDedup { keys, .. }
                | Request::ExpireBodies { keys, .. } => keys.iter().map(Vec::len).sum(),
                Request::Import { rows, .. } => rows.iter().map(Row::encoded_len).sum(),
                Request::DropShard { .. }
                | Request::AdoptShard { .. }
                | Request::SyncBarrier { .. } => 0,
            }
    }

    /// Whether the request must be a group of its own (see the module documentation).
    fn is_exclusive(&self) -> bool {
        matches!(
            self,
            Request::Import { .. }
                | Request::DropShard { .. }
                | Request::AdoptShard { .. }
                | Request::SyncBarrier { .. }
        )
    }

    /// Whether its answer may only be sent once its write is durable.
    fn needs_sync(&self) -> bool {
        match self {
            Request::Append { .. }
            | Request::DropDevice { .. }
            | Request::DropShard { .. }
            | Request::AdoptShard { .. }
            | Request::SyncBarrier { .. } => true,
            Request::Ack { .. }
            | Request::ExpireEntries { .. }
            | Request::ExpireIndexed { .. }
            | Request::ExpireDedup { .. }
            | Request::ExpireBodies { .. }
            | Request::Trim { .. }
            | Request::Import { .. } => false,
        }
    }
}

/// How a group's batch is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Synced; an empty batch is not written at all.
    Synced,
    /// Not synced: acks, expiry, trims, a hand-off import (made durable by a later synced
    /// write, or redone after a crash).
    Unsynced,
    /// Synced even when empty: a sync barrier.
    Barrier,
}

/// The writer thread's state.
pub(crate) struct Writer {
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) config: InboxConfig,
    pub(crate) entries_total: Arc<AtomicU64>,
    pub(crate) gate: Arc<ShardGate>,
    pub(crate) rx: mpsc::Receiver<Request>,
    pub(crate) health: Arc<StorageHealth>,
    pub(crate) outbox: Arc<OutboxQueue>,
    pub(crate) cache: DeviceCache,
    pub(crate) bodies: Arc<GroupBodyCounters>,
}

/// Whether the last durable write succeeded: set by the writer thread, read by `/readyz` and
/// the metrics. A failed group commit marks storage failing; the next successful synced one
/// clears it.
#[derive(Default)]
pub struct StorageHealth {
    failing: std::sync::Mutex<Option<(Instant, String)>>,
}

impl StorageHealth {
    /// Since when writes fail, and the latest error; `None` while they succeed.
    pub fn failing(&self) -> Option<(std::time::Duration, String)> {
        let guard = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .map(|(since, error)| (since.elapsed(), error.clone()))
    }

    fn record(&self, result: Result<(), &StorageError>) {
        let mut guard = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => *guard = None,
            // Written here, not confirmed by the replicas; or refused because a shard moved:
            // the disk is not what failed.
            Err(StorageError::Replication(_) | StorageError::NotPrimary(_)) => {}
            Err(e) => {
                let since = guard
                    .as_ref()
                    .map_or_else(Instant::now, |(since, _)| *since);
                *guard = Some((since, e.to_string()));
            }
        }
    }
}

impl Writer {
    /// Runs until every sender is gone and the queue is drained.
    pub(crate) fn run(mut self) {
        // A request taken from the queue that did not fit in the previous group.
        let mut carried: Option<Request> = None;
        loop {
            let first = match carried.take() {
                Some(r) => r,
                None => match self.rx.blocking_recv() {
                    Some(r) => r,
                    None => return,
                },
            };
            let mut bytes = first.cost_bytes();
            let alone = first.is_exclusive();
            let mut group = vec![first];
            while !alone && group.len() < self.config.group_requests_max {
                let Ok(next) = self.rx.try_recv() else { break };
                let cost = next.cost_bytes();
                if next.is_exclusive() || bytes + cost > self.config.group_bytes_max {
                    carried = Some(next);
                    break;
                }
                bytes += cost;
                group.push(next);
            }
            self.commit_group(group);
        }
    }

    fn commit_group(&mut self, requests: Vec<Request>) {
        debug_assert!(
            requests.len() == 1 || !requests.iter().any(Request::is_exclusive),
            "a hand-off request shares a group"
        );
        let durability = if matches!(requests.as_slice(), [Request::SyncBarrier { .. }]) {
            Durability::Barrier
        } else if requests.iter().any(Request::needs_sync) {
            Durability::Synced
        } else {
            Durability::Unsynced
        };
        let mut requests = requests;
        for r in &mut requests {
            if let Request::Trim { devices, .. } = r {
                *devices = self.cache.quiet_untrimmed(TRIM_DEVICES_PER_PASS);
            }
        }
        let mut group = Group::new(&*self.engine, &self.config, &self.gate, &self.cache);
        let mut done: Vec<Done> = requests.into_iter().map(|r| group.handle(r)).collect();
        let outcome = group.finish();
        let mut synced = false;
        let result = if outcome.batch.is_empty() && durability != Durability::Barrier {
            // Nothing to write: duplicates of durable records, acks of unknown seqs.
            Ok(())
        } else if durability == Durability::Unsynced {
            self.engine.write(outcome.batch, false)
        } else {
            synced = true;
            let started = Instant::now();
            let result = self.engine.write(outcome.batch, true);
            if let Some(observe) = &self.config.observer {
                observe(started.elapsed(), done.len());
            }
            result
        };
        // Only a synced write tells whether storage works (a failing one also marks it).
        if synced || result.is_err() {
            self.health.record(result.as_ref().map(|_| ()));
        }
        match result {
            Ok(()) => {
                if outcome.invalidate_cache {
                    self.cache.clear();
                } else {
                    for (key, cached) in outcome.devices {
                        self.cache.put(key, cached);
                    }
                    self.cache.evict();
                }
                let delta = outcome.entries_delta;
                if delta >= 0 {
                    self.entries_total
                        .fetch_add(delta.unsigned_abs(), Ordering::Relaxed);
                } else {
                    self.entries_total
                        .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
                }
                if let Some(hook) = &self.config.on_stored {
                    for (user, device, seq, entry) in &outcome.stored {
                        if *device != OUTBOX_DEVICE {
                            hook(*user, *device, *seq, entry);
                        }
                    }
                }
                if !outcome.outbox_users.is_empty() {
                    self.outbox.add(outcome.outbox_users);
                }
                let (stored, refs) = outcome.bodies_stored;
                self.bodies.stored.fetch_add(stored, Ordering::Relaxed);
                self.bodies.refs.fetch_add(refs, Ordering::Relaxed);
            }
            Err(err) => {
                tracing::error!(error = %err, requests = done.len(), "inbox group commit failed");
                // The batch may or may not have reached the WAL: read the counters again.
                self.cache.clear();
                // If it did, receipts it put in outboxes wait there, and the retried ack is no
                // first ack: have the outboxes looked at (an empty one costs a scan).
                if !outcome.outbox_users.is_empty() {
                    self.outbox.add(outcome.outbox_users);
                }
                // Entries it stored may be there too, handed to no connection: their devices'
                // connections read their inboxes again.
                if let Some(hook) = &self.config.on_unsure {
                    let mut devices: Vec<(UserId, DeviceId)> = (outcome.stored.iter())
                        .filter(|(_, device, _, _)| *device != OUTBOX_DEVICE)
                        .map(|(user, device, _, _)| (*user, *device))
                        .collect();
                    devices.sort_unstable();
                    devices.dedup();
                    for (user, device) in devices {
                        hook(user, device);
                    }
                }
                for d in &mut done {
                    d.fail(&err);
                }
            }
        }
        for d in done {
            d.send();
        }
    }
}

/// A handled request: its reply channel and the answer to send once the group is committed.
enum Done {
    Append(Reply<AppendOutcome>, Result<AppendOutcome, InboxError>),
    Ack(Reply<Vec<Acked>>, Result<Vec<Acked>, InboxError>),
    Count(Reply<u64>, Result<u64, InboxError>),
    Delta(Reply<i64>, Result<i64, InboxError>),
    Unit(Reply<()>, Result<(), InboxError>),
}

impl Done {
    /// The group's write failed: every answer that was going to be a success becomes the error.
    fn fail(&mut self, err: &StorageError) {
        let err = || InboxError::Storage(err.clone());
        match self {
            Done::Append(_, r @ Ok(_)) => *r = Err(err()),
            Done::Ack(_, r @ Ok(_)) => *r = Err(err()),
            Done::Count(_, r @ Ok(_)) => *r = Err(err()),
            Done::Delta(_, r @ Ok(_)) => *r = Err(err()),
            Done::Unit(_, r @ Ok(_)) => *r = Err(err()),
            _ => {}
        }
    }

    fn send(self) {
        // A caller that stopped waiting (its future was dropped) is not an error here.
        match self {
            Done::Append(tx, r) => drop(tx.send(r)),
            Done::Ack(tx, r) => drop(tx.send(r)),
            Done::Count(tx, r) => drop(tx.send(r)),
            Done::Delta(tx, r) => drop(tx.send(r)),
            Done::Unit(tx, r) => drop(tx.send(r)),
        }
    }
}

/// A device as this group sees it.
struct Slot {
    cached: Cached,
    /// The counters changed: write them.
    dirty: bool,
    /// Range-delete what is acknowledged below the floor in this group.
    trim: bool,
}

/// A dedup record as this group sees them (`None`: absent or deleted).
struct DedupSlot {
    record: Option<DedupRecord>,
    dirty: bool,
}

/// A shared group message body as this group sees it, by its count row's key.
struct BodySlot {
    /// `None`: absent or deleted.
    count: Option<BodyCount>,
    /// The body, when loaded for an append or created by this group.
    body: Option<Bytes>,
    /// Created by this group: write the body row.
    body_new: bool,
    dirty: bool,
}

/// What a group leaves to write and to do once written.
struct Outcome {
    batch: WriteBatch,
    entries_delta: i64,
    /// Every device the group loaded, as it is once the batch is written.
    devices: Vec<(DeviceKey, Cached)>,
    /// Entries stored, for the stored hook (which hands them to connections).
    stored: Vec<(UserId, DeviceId, u64, Entry)>,
    /// Users whose outbox got rows.
    outbox_users: Vec<UserId>,
    /// Whole shards were rewritten: forget every cached device.
    invalidate_cache: bool,
    /// Shared bodies created and entries stored by reference.
    bodies_stored: (u64, u64),
}

/// The state of one group commit: the batch being built and an overlay of every record this
/// group read or changed, so later requests in the group see earlier ones' effects.
///
/// Every handler first loads what it needs (the only fallible part: engine reads and decoding)
/// and only then mutates the overlay and the batch, so a request that fails leaves no trace.
pub(crate) struct Group<'a> {
    engine: &'a dyn Engine,
    config: &'a InboxConfig,
    gate: &'a ShardGate,
    cache: &'a DeviceCache,
    batch: WriteBatch,
    slots: HashMap<DeviceKey, Slot>,
    dedups: BTreeMap<Vec<u8>, DedupSlot>,
    /// Shared bodies this group read or changed, by key.
    bodies: BTreeMap<Vec<u8>, BodySlot>,
    /// Entries this group stored by reference (not on disk yet): inbox key → body key.
    new_refs: BTreeMap<Vec<u8>, Vec<u8>>,
    bodies_stored: (u64, u64),
    stored: Vec<(UserId, DeviceId, u64, Entry)>,
    outbox_users: Vec<UserId>,
    entries_delta: i64,
    invalidate_cache: bool,
}

impl<'a> Group<'a> {
    pub(crate) fn new(
        engine: &'a dyn Engine,
        config: &'a InboxConfig,
        gate: &'a ShardGate,
        cache: &'a DeviceCache,
    ) -> Self {
        Self {
            engine,
            config,
            gate,
            cache,
            batch: WriteBatch::new(),
            slots: HashMap::new(),
            dedups: BTreeMap::new(),
            bodies: BTreeMap::new(),
            new_refs: BTreeMap::new(),
            bodies_stored: (0, 0),
            stored: Vec::new(),
            outbox_users: Vec::new(),
            entries_delta: 0,
            invalidate_cache: false,
        }
    }

    fn handle(&mut self, request: Request) -> Done {
        match request {
            Request::Append { append, reply } => Done::Append(reply, self.handle_append(append)),
            Request::Ack { ack, reply } => Done::Ack(reply, self.handle_ack(ack)),
            Request::DropDevice {
                user,
                device,
                reply,
            } => Done::Count(reply, self.handle_drop_device(user, device)),
            Request::ExpireEntries {
                keys,
                now_ms,
                reply,
            } => Done::Count(reply, self.handle_expire_entries(&keys, now_ms)),
            Request::ExpireIndexed {
                keys,
                now_ms,
                reply,
            } => Done::Count(reply, self.handle_expire_indexed(&keys, now_ms)),
            Request::ExpireDedup {
                keys,
                now_ms,
                reply,
            } => Done::Count(reply, self.handle_expire_dedup(&keys, now_ms)),
            Request::ExpireBodies {
                keys,
                now_ms,
                reply,
            } => Done::Count(reply, self.handle_expire_bodies(&keys, now_ms)),
            Request::Trim { reply, devices } => Done::Count(reply, self.handle_trim(devices)),
            Request::Import { shard, rows, reply } => {
                Done::Delta(reply, self.handle_import(shard, rows))
            }
            Request::DropShard { shard, reply } => {
                Done::Count(reply, self.handle_drop_shard(shard))
            }
            Request::AdoptShard { shard, reply } => {
                Done::Unit(reply, self.handle_adopt_shard(shard))
            }
            Request::SyncBarrier { reply } => Done::Unit(reply, Ok(())),
        }
    }

    /// The batch to write and what to do once it is written.
    fn finish(mut self) -> Outcome {
        let mut devices = Vec::with_capacity(self.slots.len());
        for ((user, device), mut slot) in self.slots {
            let shard = shard_of(user, self.config.shard_count);
            if slot.dirty {
                self.batch.put(
                    Cf::InboxMeta,
                    device_prefix(shard, user, device),
                    slot.cached.meta.encode(),
                );
            }
            let untrimmed = slot.cached.untrimmed();
            if untrimmed > 0 && (slot.trim || untrimmed >= TRIM_SEQS_MIN) {
                let floor = slot.cached.meta.floor;
                if untrimmed <= TRIM_POINT_DELETES_MAX {
                    for seq in slot.cached.trimmed + 1..=floor {
                        self.batch
                            .delete(Cf::Inbox, inbox_key(shard, user, device, seq));
                    }
                } else {
                    self.batch.delete_range(
                        Cf::Inbox,
                        inbox_key(shard, user, device, slot.cached.trimmed + 1),
                        inbox_key(shard, user, device, floor + 1),
                    );
                }
                slot.cached.trimmed = floor;
            }
            devices.push(((user, device), slot.cached));
        }
        for (key, slot) in &self.dedups {
            match (slot.dirty, &slot.record) {
                (false, _) => {}
                (true, Some(record)) => self.batch.put(Cf::Dedup, key.clone(), record.encode()),
                (true, None) => self.batch.delete(Cf::Dedup, key.clone()),
            }
        }
        for (key, slot) in &self.bodies {
            match (slot.dirty, &slot.count, &slot.body) {
                (false, _, _) => {}
                (true, Some(count), body) => {
                    self.batch.put(Cf::GroupBodies, key.clone(), count.encode());
                    if let (true, Some(body)) = (slot.body_new, body) {
                        self.batch
                            .put(Cf::GroupBodies, body_row_key(key), body.to_vec());
                    }
                }
                (true, None, _) => {
                    self.batch.delete(Cf::GroupBodies, key.clone());
                    self.batch.delete(Cf::GroupBodies, body_row_key(key));
                }
            }
        }
        Outcome {
            batch: self.batch,
            entries_delta: self.entries_delta,
            devices,
            stored: self.stored,
            outbox_users: self.outbox_users,
            invalidate_cache: self.invalidate_cache,
            bodies_stored: self.bodies_stored,
        }
    }

    /// Loads a device into the overlay: from the cache, else from the engine.
    fn load(&mut self, user: UserId, device: DeviceId) -> Result<&mut Slot, StorageError> {
        use std::collections::hash_map::Entry as HashEntry;
        match self.slots.entry((user, device)) {
            HashEntry::Occupied(slot) => Ok(slot.into_mut()),
            HashEntry::Vacant(vacant) => {
                let (cached, dirty) = match self.cache.get(&(user, device)) {
                    Some(cached) => (cached.clone(), false),
                    None => {
                        let shard = shard_of(user, self.config.shard_count);
                        let prefix = device_prefix(shard, user, device);
                        match self.engine.get(Cf::InboxMeta, &prefix)? {
                            None => (Cached::default(), false),
                            Some(bytes) => match Stored::decode(&bytes)? {
                                Stored::Current(meta) => (Cached { meta, trimmed: 0 }, false),
                                Stored::Legacy { next_seq, .. } => {
                                    let meta = convert_legacy(self.engine, &prefix, next_seq)?;
                                    (Cached { meta, trimmed: 0 }, true)
                                }
                            },
                        }
                    }
                };
                Ok(vacant.insert(Slot {
                    cached,
                    dirty,
                    trim: false,
                }))
            }
        }
    }

    /// A device already loaded by [`Self::load`] in this request's load phase.
    fn slot(&mut self, user: UserId, device: DeviceId) -> &mut Slot {
        // Always present after the load phase; the default only keeps this path panic-free.
        self.slots.entry((user, device)).or_insert_with(|| Slot {
            cached: Cached::default(),
            dirty: false,
            trim: false,
        })
    }

    /// Loads a dedup record into the overlay (from the engine the first time).
    fn load_dedup(&mut self, key: &[u8]) -> Result<Option<DedupRecord>, StorageError> {
        if let Some(slot) = self.dedups.get(key) {
            return Ok(slot.record);
        }
        let record = match self.engine.get(Cf::Dedup, key)? {
            Some(bytes) => Some(DedupRecord::decode(&bytes)?),
            None => None,
        };
        self.dedups.insert(
            key.to_vec(),
            DedupSlot {
                record,
                dirty: false,
            },
        );
        Ok(record)
    }

    fn set_dedup(&mut self, key: Vec<u8>, record: Option<DedupRecord>) {
        self.dedups.insert(
            key,
            DedupSlot {
                record,
                dirty: true,
            },
        );
    }

    /// Stores one entry for a loaded device (the apply phase of a request): allocates its seq,
    /// stamps its times. `None` if the device is at its quota or out of seqs.
    fn put_entry(
        &mut self,
        user: UserId,
        device: DeviceId,
        mut entry: Entry,
        now_ms: u64,
    ) -> Option<u64> {
        let quota = self.config.device_quota;
        let retention_ms = self.config.retention_ms;
        let slot = self.slot(user, device);
        if slot.cached.meta.pending() >= quota {
            return None;
        }
        let seq = slot.cached.meta.allocate()?;
        slot.dirty = true;
        entry.server_time_ms = now_ms;
        // An entry may ask to expire sooner than the retention (a status, 24 hours after it
        // was posted); never later.
        let retained_until = now_ms.saturating_add(retention_ms);
        entry.expires_at_ms = match entry.expires_at_ms {
            0 => retained_until,
            asked => asked.min(retained_until),
        };
        let shard = shard_of(user, self.config.shard_count);
        let key = inbox_key(shard, user, device, seq);
        let value = match self.share_body(shard, &entry) {
            Some(body) => {
                self.new_refs.insert(key.clone(), body);
                entry.encode_body_ref(&entry.body[..BODY_REF_LEN])
            }
            None => entry.encode(),
        };
        self.batch.put(Cf::Inbox, key, value);
        if entry.kind.indexes_expiry() {
            let index = expiry_key(shard, entry.expires_at_ms, user, device, seq);
            self.batch.put(Cf::InboxExpiry, index, Vec::new());
        }
        self.stored.push((user, device, seq, entry));
        self.entries_delta += 1;
        Some(seq)
    }

    /// Loads a shared body's count into the overlay (from the engine the first time), and
    /// with `with_body` its body too (an append compares it).
    fn load_body(&mut self, key: &[u8], with_body: bool) -> Result<(), StorageError> {
        if !self.bodies.contains_key(key) {
            let count = match self.engine.get(Cf::GroupBodies, key)? {
                Some(bytes) => Some(BodyCount::decode(&bytes)?),
                None => None,
            };
            let slot = BodySlot {
                count,
                body: None,
                body_new: false,
                dirty: false,
            };
            self.bodies.insert(key.to_vec(), slot);
        }
        let Some(slot) = self.bodies.get_mut(key) else {
            return Ok(());
        };
        if with_body && slot.count.is_some() && slot.body.is_none() {
            slot.body = self
                .engine
                .get(Cf::GroupBodies, &body_row_key(key))?
                .map(Bytes::from);
        }
        Ok(())
    }

    /// The apply phase of storing a group message (its body loaded by [`Self::load_body`]):
    /// takes a reference to the shard's shared body, creating it, and returns its key. `None`
    /// stores the entry whole: not a group message, or a different body under the same group
    /// seq (a sender's bug; it must not overwrite what other entries refer to).
    fn share_body(&mut self, shard: ShardId, entry: &Entry) -> Option<Vec<u8>> {
        if entry.kind != EntryKind::GroupMessage {
            return None;
        }
        let key = count_key(shard, &entry.body)?;
        let slot = self.bodies.get_mut(&key)?;
        match (&mut slot.count, &slot.body) {
            (Some(count), Some(body)) if *body == entry.body => {
                count.refs = count.refs.checked_add(1)?;
                count.expires_at_ms = count.expires_at_ms.max(entry.expires_at_ms);
            }
            (Some(_), _) => {
                tracing::warn!("a group message body differs from the one shared; stored whole");
                return None;
            }
            (None, _) => {
                slot.count = Some(BodyCount {
                    refs: 1,
                    expires_at_ms: entry.expires_at_ms,
                });
                slot.body = Some(entry.body.clone());
                slot.body_new = true;
                self.bodies_stored.0 += 1;
            }
        }
        slot.dirty = true;
        self.bodies_stored.1 += 1;
        Some(key)
    }

    /// Drops one reference to a shared body (loaded by [`Self::load_body`]); the last one
    /// deletes it.
    fn release_body(&mut self, key: &[u8]) {
        let Some(slot) = self.bodies.get_mut(key) else {
            tracing::error!("releasing a group message body that was not loaded");
            return;
        };
        match &mut slot.count {
            Some(count) if count.refs > 1 => count.refs -= 1,
            Some(_) => {
                slot.count = None;
                slot.body = None;
                slot.body_new = false;
            }
            // Deleted by the expiry backstop, or a partial hand-off import.
            None => return,
        }
        slot.dirty = true;
    }

    /// The key of the shared body a stored entry refers to, if it is stored by reference, its
    /// header, and the key of its expiry index row if it has one (read back from disk unless
    /// this group stored it). Part of a load phase.
    fn read_stored(
        &self,
        shard: ShardId,
        user: UserId,
        device: DeviceId,
        seq: u64,
    ) -> Result<StoredRefs, StorageError> {
        let key = inbox_key(shard, user, device, seq);
        if let Some(body) = self.new_refs.get(&key) {
            return Ok(StoredRefs {
                body: Some(body.clone()),
                ..StoredRefs::default()
            });
        }
        let Some(value) = self.engine.get(Cf::Inbox, &key)? else {
            return Ok(StoredRefs::default());
        };
        match Entry::decode_stored(Bytes::from(value)) {
            Ok((entry, by_ref)) => Ok(StoredRefs {
                header: Some(entry.header()),
                body: by_ref.then(|| count_key(shard, &entry.body)).flatten(),
                expiry: entry
                    .kind
                    .indexes_expiry()
                    .then(|| expiry_key(shard, entry.expires_at_ms, user, device, seq)),
            }),
            Err(err) => {
                tracing::error!(%err, user, device, seq, "inbox entry does not decode");
                Ok(StoredRefs::default())
            }
        }
    }

    fn handle_append(&mut self, append: Append) -> Result<AppendOutcome, InboxError> {
        let Append {
            to_user,
            dedup,
            entries,
            now_ms,
        } = append;
        let shard = shard_of(to_user, self.config.shard_count);
        if !self.gate.is_writable(shard) {
            return Err(InboxError::WrongOwner { shard });
        }

        // Load phase.
        let dedup_key = dedup.map(|(sender_user, sender_device, msg_id)| {
            dedup_key(shard, to_user, sender_user, sender_device, &msg_id)
        });
        if let Some(key) = &dedup_key {
            if let Some(record) = self.load_dedup(key)? {
                if record.is_live(now_ms) {
                    // Written again, unchanged: the duplicate is answered only once this
                    // group's synced write is durable, and on a replicating node once the
                    // shard's in-sync replicas have applied it. Replicas take a shard's records
                    // in order and refuse gaps, so that proves they hold the original too:
                    // the original's own write may have failed to replicate (its local write
                    // stays), and a retry answered from the local record alone would
                    // acknowledge a message only this node has (issue 19's chaos
                    // `primary-partition` lost such messages).
                    self.set_dedup(key.clone(), Some(record));
                    return Ok(AppendOutcome::Duplicate {
                        server_time_ms: record.server_time_ms,
                    });
                }
            }
        }
        let mut per_device: BTreeMap<DeviceId, u64> = BTreeMap::new();
        for (device, _) in &entries {
            *per_device.entry(*device).or_default() += 1;
        }
        let mut full = Vec::new();
        let quota = self.config.device_quota;
        for (&device, &adding) in &per_device {
            let meta = &self.load(to_user, device)?.cached.meta;
            if meta.pending().saturating_add(adding) > quota {
                full.push(device);
            }
            if meta.next_seq.checked_add(adding).is_none() {
                return Err(InboxError::Invalid("the device's seq space is exhausted"));
            }
        }
        if !full.is_empty() {
            return Ok(AppendOutcome::Full { devices: full });
        }
        for (_, entry) in &entries {
            if entry.kind == EntryKind::GroupMessage {
                if let Some(key) = count_key(shard, &entry.body) {
                    self.load_body(&key, true)?;
                }
            }
        }

        // Apply phase: nothing below can fail (quota and seq space were checked above).
        let sole_copy = entries.len() == 1;
        let mut seqs = Vec::with_capacity(entries.len());
        for (device, mut entry) in entries {
            entry.sole_copy = sole_copy && entry.kind == EntryKind::Message;
            if let Some(seq) = self.put_entry(to_user, device, entry, now_ms) {
                seqs.push((device, seq));
            }
        }
        if let Some(key) = dedup_key {
            let record = DedupRecord {
                expires_at_ms: now_ms.saturating_add(self.config.dedup_window_ms),
                server_time_ms: now_ms,
                receipt_sent: false,
            };
            self.set_dedup(key, Some(record));
        }
        Ok(AppendOutcome::Stored {
            server_time_ms: now_ms,
            seqs,
        })
    }

    fn handle_ack(&mut self, ack: AckRequest) -> Result<Vec<Acked>, InboxError> {
        let AckRequest {
            user,
            device,
            seqs,
            senders,
            now_ms,
        } = ack;
        let shard = shard_of(user, self.config.shard_count);

        // Load phase: the device, the header of every pending seq (read back only when the
        // caller did not know it), the dedup records tracking multi-device receipts, and every
        // device a receipt may be stored for.
        let meta = self.load(user, device)?.cached.meta.clone();
        let mut seen = BTreeSet::new();
        let mut found: Vec<(u64, Option<EntryHeader>, StoredRefs)> = Vec::new();
        for (seq, header) in seqs {
            if !meta.is_pending(seq) || !seen.insert(seq) {
                continue;
            }
            // A group message may hold a reference to a shared body, and an entry that
            // indexes its expiry has an index row keyed by it: read it back for those.
            let (header, refs) = match header {
                Some(h) if h.kind != EntryKind::GroupMessage && !h.kind.indexes_expiry() => {
                    (Some(h), StoredRefs::default())
                }
                known => {
                    let refs = self.read_stored(shard, user, device, seq)?;
                    (known.or(refs.header), refs)
                }
            };
            if let Some(key) = &refs.body {
                self.load_body(key, false)?;
            }
            found.push((seq, header, refs));
        }
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let mut receipt_targets: BTreeSet<UserId> = BTreeSet::new();
        for (_, header, _) in &found {
            let Some(h) = header.filter(|h| receipt_due(user, h)) else {
                continue;
            };
            if !h.sole_copy {
                self.load_dedup(&receipt_key(shard, user, &h))?;
            }
            receipt_targets.insert(h.from_user);
        }
        let mut local: HashMap<UserId, &[DeviceId]> = HashMap::new();
        for to in &receipt_targets {
            let devices = senders
                .iter()
                .find(|(u, _)| u == to)
                .map(|(_, d)| d.as_slice())
                .filter(|_| {
                    self.gate
                        .is_writable(shard_of(*to, self.config.shard_count))
                });
            match devices {
                Some(devices) => {
                    for &d in devices {
                        self.load(*to, d)?;
                    }
                    local.insert(*to, devices);
                }
                None => {
                    self.load(user, OUTBOX_DEVICE)?;
                }
            }
        }

        // Apply phase.
        let mut acked = Vec::with_capacity(found.len());
        let mut receipts: BTreeMap<UserId, Vec<MsgId>> = BTreeMap::new();
        for (seq, header, refs) in found {
            let slot = self.slot(user, device);
            match slot.cached.meta.ack(seq) {
                AckEffect::Acked => slot.dirty = true,
                AckEffect::NotPending => continue,
                AckEffect::Overflow => {
                    tracing::debug!(
                        user,
                        device,
                        seq,
                        max = ACKED_ABOVE_MAX,
                        "out-of-order acks over the bound; the entry stays pending"
                    );
                    continue;
                }
            }
            self.entries_delta -= 1;
            if let Some(key) = refs.body {
                self.release_body(&key);
            }
            if let Some(key) = refs.expiry {
                self.batch.delete(Cf::InboxExpiry, key);
            }
            let Some(h) = header else { continue };
            let first_ack = receipt_due(user, &h)
                && (h.sole_copy || self.mark_receipt_sent(receipt_key(shard, user, &h), now_ms));
            if first_ack {
                receipts.entry(h.from_user).or_default().push(h.msg_id);
            }
            acked.push(Acked {
                seq,
                kind: h.kind,
                from_user: h.from_user,
                from_device: h.from_device,
                msg_id: h.msg_id,
                first_ack,
            });
        }
        for (to, ids) in receipts {
            for chunk in ids.chunks(RECEIPT_MSG_IDS_MAX) {
                let receipt = OutboxReceipt {
                    to_user: to,
                    from_user: user,
                    from_device: device,
                    msg_id: receipt_id(chunk),
                    msg_ids: chunk.to_vec(),
                };
                match local.get(&to) {
                    Some(devices) => {
                        let entry = Entry {
                            kind: EntryKind::Delivered,
                            receipt_msg_ids: receipt.msg_ids.clone(),
                            ..Entry::message(user, device, receipt.msg_id, Bytes::new())
                        };
                        for &d in *devices {
                            if self.put_entry(to, d, entry.clone(), now_ms).is_none() {
                                tracing::warn!(
                                    user = to,
                                    device = d,
                                    "inbox full: a delivered receipt is dropped"
                                );
                            }
                        }
                    }
                    None => {
                        if self
                            .put_entry(user, OUTBOX_DEVICE, receipt.to_entry(), now_ms)
                            .is_some()
                        {
                            tracing::debug!(
                                user,
                                device,
                                to,
                                receipt = %hex::encode(receipt.msg_id),
                                "a delivered receipt waits in the outbox"
                            );
                            self.outbox_users.push(user);
                        } else {
                            tracing::warn!(
                                user,
                                "receipt outbox full: a delivered receipt is dropped"
                            );
                        }
                    }
                }
            }
        }
        Ok(acked)
    }

    /// Records that a `delivered` receipt is being sent for this message; `true` the first time.
    ///
    /// A record missing or expired (the dedup window is shorter than retention) is recreated
    /// with the flag set, and a record whose flag is set lives at least one more dedup window,
    /// so devices acking within a window of each other yield one receipt.
    fn mark_receipt_sent(&mut self, key: Vec<u8>, now_ms: u64) -> bool {
        let renewed_until = now_ms.saturating_add(self.config.dedup_window_ms);
        let current = self.dedups.get(&key).and_then(|slot| slot.record);
        match current {
            Some(record) if record.is_live(now_ms) && record.receipt_sent => false,
            Some(record) if record.is_live(now_ms) => {
                let record = DedupRecord {
                    receipt_sent: true,
                    expires_at_ms: record.expires_at_ms.max(renewed_until),
                    ..record
                };
                self.set_dedup(key, Some(record));
                true
            }
            _ => {
                let record = DedupRecord {
                    expires_at_ms: renewed_until,
                    server_time_ms: now_ms,
                    receipt_sent: true,
                };
                self.set_dedup(key, Some(record));
                true
            }
        }
    }

    fn handle_drop_device(&mut self, user: UserId, device: DeviceId) -> Result<u64, InboxError> {
        let shard = shard_of(user, self.config.shard_count);
        // Load phase: the shared bodies its pending entries refer to (at most its quota).
        let meta = self.load(user, device)?.cached.meta.clone();
        let (bodies, expiries) = self.pending_refs(shard, user, device, &meta)?;
        for key in &bodies {
            self.load_body(key, false)?;
        }

        // Apply phase.
        for key in &bodies {
            self.release_body(key);
        }
        for key in expiries {
            self.batch.delete(Cf::InboxExpiry, key);
        }
        let slot = self.slot(user, device);
        // The counters stay (everything acknowledged) so next_seq keeps growing if the id
        // comes back.
        let removed = slot.cached.meta.ack_all();
        slot.dirty = true;
        slot.cached.trimmed = slot.cached.meta.floor;
        let prefix = device_prefix(shard, user, device);
        let end = prefix_end(&prefix);
        self.batch.delete_range(Cf::Inbox, prefix, end);
        self.entries_delta -= signed(removed);
        Ok(removed)
    }

    /// The body key of every pending entry of a device stored by reference, once per entry,
    /// and the expiry index key of every pending entry that has one: on disk from the floor
    /// up, and stored by this group.
    fn pending_refs(
        &self,
        shard: ShardId,
        user: UserId,
        device: DeviceId,
        meta: &DeviceMeta,
    ) -> Result<(RowKeys, RowKeys), StorageError> {
        const PAGE: usize = 1024;
        let prefix = device_prefix(shard, user, device);
        let end = prefix_end(&prefix);
        let mut refs = Vec::new();
        let mut expiries = Vec::new();
        let mut from = inbox_key(shard, user, device, meta.floor.saturating_add(1));
        loop {
            let page = self.engine.scan(Cf::Inbox, &from, &end, PAGE)?;
            for (key, value) in &page {
                let Some((_, _, _, seq)) = parse_inbox_key(key) else {
                    continue;
                };
                if !meta.is_pending(seq) || self.new_refs.contains_key(key) {
                    continue;
                }
                match Entry::decode_stored(Bytes::copy_from_slice(value)) {
                    Ok((entry, by_ref)) => {
                        if by_ref {
                            refs.extend(count_key(shard, &entry.body));
                        }
                        if entry.kind.indexes_expiry() {
                            let index = expiry_key(shard, entry.expires_at_ms, user, device, seq);
                            expiries.push(index);
                        }
                    }
                    Err(err) => {
                        tracing::error!(%err, user, device, seq, "inbox entry does not decode")
                    }
                }
            }
            match page.last() {
                Some((last, _)) if page.len() == PAGE => from = crate::storage::successor(last),
                _ => break,
            }
        }
        for (key, body) in self.new_refs.range(prefix.clone()..end) {
            let pending = parse_inbox_key(key).is_some_and(|(_, _, _, seq)| meta.is_pending(seq));
            if pending {
                refs.push(body.clone());
            }
        }
        for (u, d, seq, entry) in &self.stored {
            if (*u, *d) == (user, device) && entry.kind.indexes_expiry() {
                expiries.push(expiry_key(shard, entry.expires_at_ms, user, device, *seq));
            }
        }
        Ok((refs, expiries))
    }

    fn handle_expire_entries(&mut self, keys: &[Vec<u8>], now_ms: u64) -> Result<u64, InboxError> {
        // Load phase: re-check each candidate; an ack may have acknowledged it meanwhile.
        // (key, user, device, seq, pending, shared body it refers to, expiry index row)
        type Candidate = (
            Vec<u8>,
            UserId,
            DeviceId,
            u64,
            bool,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
        );
        let mut candidates: Vec<Candidate> = Vec::new();
        for key in keys {
            let Some((shard, user, device, seq)) = parse_inbox_key(key) else {
                continue;
            };
            if shard != shard_of(user, self.config.shard_count) {
                tracing::warn!(
                    user,
                    device,
                    shard,
                    "inbox entry under a foreign shard; not expiring"
                );
                continue;
            }
            let pending = self.load(user, device)?.cached.meta.is_pending(seq);
            if !pending {
                // Acknowledged and not trimmed yet: delete it all the same.
                candidates.push((key.clone(), user, device, seq, false, None, None));
                continue;
            }
            let Some(value) = self.engine.get(Cf::Inbox, key)? else {
                continue;
            };
            match Entry::decode_stored(Bytes::from(value)) {
                Ok((entry, by_ref)) if entry.expires_at_ms <= now_ms => {
                    let body = by_ref.then(|| count_key(shard, &entry.body)).flatten();
                    if let Some(body) = &body {
                        self.load_body(body, false)?;
                    }
                    let index = entry
                        .kind
                        .indexes_expiry()
                        .then(|| expiry_key(shard, entry.expires_at_ms, user, device, seq));
                    candidates.push((key.clone(), user, device, seq, true, body, index))
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::error!(%err, user, device, "inbox entry does not decode; not expiring")
                }
            }
        }

        // Apply phase.
        let mut expired = 0u64;
        for (key, user, device, seq, pending, body, index) in candidates {
            if pending {
                let slot = self.slot(user, device);
                if slot.cached.meta.ack(seq) != AckEffect::Acked {
                    continue;
                }
                slot.dirty = true;
                expired += 1;
                self.entries_delta -= 1;
                if let Some(body) = body {
                    self.release_body(&body);
                }
            }
            if let Some(index) = index {
                self.batch.delete(Cf::InboxExpiry, index);
            }
            self.batch.delete(Cf::Inbox, key);
        }
        Ok(expired)
    }

    /// Deletes the entries that expiry index rows found expired point at, with their rows,
    /// whatever entries older than them their device still has pending. A row whose entry is
    /// gone, acknowledged, or not the one it names (its expiry differs) is deleted alone.
    ///
    /// An expired entry is acknowledged out of order; if its device already has
    /// [`ACKED_ABOVE_MAX`] such acks waiting, it stays (with its row) until a later pass: a
    /// seq left pending without its entry would hold the floor back for good.
    fn handle_expire_indexed(&mut self, keys: &[Vec<u8>], now_ms: u64) -> Result<u64, InboxError> {
        struct Candidate {
            index: Vec<u8>,
            user: UserId,
            device: DeviceId,
            seq: u64,
            /// The entry to delete with its body reference: `None` deletes the row alone.
            entry: Option<(Vec<u8>, Option<Vec<u8>>)>,
        }
        // Load phase: re-check each entry; an ack may have acknowledged it meanwhile.
        let mut candidates = Vec::new();
        for index in keys {
            let Some((shard, expires_at_ms, user, device, seq)) = parse_expiry_key(index) else {
                tracing::error!("malformed inbox expiry key; deleted");
                self.batch.delete(Cf::InboxExpiry, index.clone());
                continue;
            };
            if shard != shard_of(user, self.config.shard_count) {
                tracing::warn!(
                    user,
                    device,
                    shard,
                    "expiry row under a foreign shard; kept"
                );
                continue;
            }
            if expires_at_ms > now_ms {
                continue;
            }
            let mut candidate = Candidate {
                index: index.clone(),
                user,
                device,
                seq,
                entry: None,
            };
            let key = inbox_key(shard, user, device, seq);
            let pending = self.load(user, device)?.cached.meta.is_pending(seq);
            let value = if pending {
                self.engine.get(Cf::Inbox, &key)?
            } else {
                None
            };
            if let Some(value) = value {
                match Entry::decode_stored(Bytes::from(value)) {
                    Ok((entry, by_ref)) if entry.expires_at_ms == expires_at_ms => {
                        let body = by_ref.then(|| count_key(shard, &entry.body)).flatten();
                        if let Some(body) = &body {
                            self.load_body(body, false)?;
                        }
                        candidate.entry = Some((key, body));
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::error!(%err, user, device, "inbox entry does not decode; not expiring")
                    }
                }
            }
            candidates.push(candidate);
        }

        // Apply phase.
        let mut expired = 0u64;
        for c in candidates {
            if let Some((key, body)) = c.entry {
                let slot = self.slot(c.user, c.device);
                match slot.cached.meta.ack(c.seq) {
                    AckEffect::Acked => slot.dirty = true,
                    AckEffect::Overflow => {
                        tracing::debug!(
                            user = c.user,
                            device = c.device,
                            seq = c.seq,
                            "out-of-order acks over the bound; an expired entry waits"
                        );
                        continue;
                    }
                    // Acknowledged by a request earlier in this group, which released it.
                    AckEffect::NotPending => {
                        self.batch.delete(Cf::InboxExpiry, c.index);
                        continue;
                    }
                }
                expired += 1;
                self.entries_delta -= 1;
                if let Some(body) = body {
                    self.release_body(&body);
                }
                self.batch.delete(Cf::Inbox, key);
            }
            self.batch.delete(Cf::InboxExpiry, c.index);
        }
        Ok(expired)
    }

    fn handle_expire_dedup(&mut self, keys: &[Vec<u8>], now_ms: u64) -> Result<u64, InboxError> {
        let mut expired = Vec::new();
        for key in keys {
            if let Some(record) = self.load_dedup(key)? {
                if !record.is_live(now_ms) {
                    expired.push(key.clone());
                }
            }
        }
        let n = expired.len() as u64;
        for key in expired {
            self.set_dedup(key, None);
        }
        Ok(n)
    }

    /// Deletes shared bodies past their expiry: every entry referring to one has expired by
    /// then, so this only catches a count that never reached zero.
    fn handle_expire_bodies(&mut self, keys: &[Vec<u8>], now_ms: u64) -> Result<u64, InboxError> {
        for key in keys {
            self.load_body(key, false)?;
        }
        let mut expired = 0;
        for key in keys {
            let Some(slot) = self.bodies.get_mut(key) else {
                continue;
            };
            let Some(count) = slot.count.filter(|c| c.expires_at_ms <= now_ms) else {
                continue;
            };
            tracing::warn!(
                refs = count.refs,
                "an expired group message body still had references; deleted"
            );
            slot.count = None;
            slot.body = None;
            slot.body_new = false;
            slot.dirty = true;
            expired += 1;
        }
        Ok(expired)
    }

    /// Marks up to [`TRIM_DEVICES_PER_PASS`] quiet devices with acknowledged entries on disk
    /// (see [`DeviceCache::quiet_untrimmed`]) for a range delete in this group. Returns how
    /// many.
    fn handle_trim(&mut self, devices: Vec<DeviceKey>) -> Result<u64, InboxError> {
        for &(user, device) in &devices {
            self.load(user, device)?.trim = true;
        }
        Ok(devices.len() as u64)
    }

    /// Writes hand-off rows (validated by [`super::Inbox::import`]) as they are. The only rows
    /// that change the gauge are counters: each adds its pending count minus that of the
    /// counter it replaces, the gauge being the sum of the stored counts.
    fn handle_import(&mut self, shard: ShardId, rows: Vec<Row>) -> Result<i64, InboxError> {
        // Load phase.
        let mut delta = 0i64;
        let mut puts = Vec::with_capacity(rows.len());
        let mut outbox_users = Vec::new();
        for row in rows {
            let cf = row
                .column_family()
                .ok_or(InboxError::Invalid("hand-off row of an unknown family"))?;
            if cf == Cf::InboxMeta {
                let Some((s, user, device)) = parse_meta_key(&row.key) else {
                    return Err(InboxError::Invalid("hand-off row is not an inbox counter"));
                };
                if s != shard {
                    return Err(InboxError::Invalid("hand-off row is not an inbox counter"));
                }
                let imported = Stored::decode(&row.value)?.pending();
                let replaced = match self.engine.get(Cf::InboxMeta, &row.key)? {
                    Some(bytes) => Stored::decode(&bytes)?.pending(),
                    None => 0,
                };
                delta = delta
                    .saturating_add(signed(imported))
                    .saturating_sub(signed(replaced));
                if device == OUTBOX_DEVICE && imported > 0 {
                    outbox_users.push(user);
                }
            }
            puts.push((cf, row.key, row.value));
        }

        // Apply phase.
        for (cf, key, value) in puts {
            self.batch.put(cf, key, value);
        }
        // The shard is not served yet: its rows (and log position) arrive as they were.
        self.batch.local = true;
        self.entries_delta = self.entries_delta.saturating_add(delta);
        self.outbox_users.extend(outbox_users);
        self.invalidate_cache = true;
        Ok(delta)
    }

    /// Drops every cached device (the shard's counters may have changed under the cache, by
    /// replication) and queues the shard's users with receipts waiting in their outbox.
    fn handle_adopt_shard(&mut self, shard: ShardId) -> Result<(), InboxError> {
        let from = key(shard, &[]);
        let end = prefix_end(&from);
        let mut outbox_users = Vec::new();
        count_entries_in(self.engine, &from, &end, &mut outbox_users)?;
        self.outbox_users.extend(outbox_users);
        self.invalidate_cache = true;
        Ok(())
    }

    /// Range-deletes the shard in every family; subtracts what its counters held.
    fn handle_drop_shard(&mut self, shard: ShardId) -> Result<u64, InboxError> {
        let from = key(shard, &[]);
        let end = prefix_end(&from);
        let removed = count_entries_in(self.engine, &from, &end, &mut Vec::new())?;
        for cf in SHARD_CFS {
            self.batch.delete_range(cf, from.clone(), end.clone());
        }
        // This node's own copy of a shard it does not serve: nothing to replicate.
        self.batch.local = true;
        self.entries_delta = self.entries_delta.saturating_sub(signed(removed));
        self.invalidate_cache = true;
        Ok(removed)
    }
}

/// Keys of rows to load or delete.
type RowKeys = Vec<Vec<u8>>;

/// What [`Group::read_stored`] learns of a stored entry.
#[derive(Default)]
struct StoredRefs {
    header: Option<EntryHeader>,
    /// The shared body it refers to, if it is stored by reference.
    body: Option<Vec<u8>>,
    /// Its expiry index row, if its kind has one.
    expiry: Option<Vec<u8>>,
}

/// Rebuilds the floor of a format-1 record, whose acknowledged entries were deleted one by
/// one: the floor sits below the first entry on disk, and the seqs missing above it (deleted
/// out of order) are acknowledged ones.
fn convert_legacy(
    engine: &dyn Engine,
    prefix: &[u8],
    next_seq: u64,
) -> Result<DeviceMeta, StorageError> {
    let shard_user_device = parse_meta_key(prefix);
    let end = prefix_end(prefix);
    let mut meta = DeviceMeta {
        next_seq,
        floor: next_seq - 1,
        acked_above: Vec::new(),
    };
    let mut from = prefix.to_vec();
    let mut expected: Option<u64> = None;
    const PAGE: usize = 1024;
    loop {
        let page = engine.scan(Cf::Inbox, &from, &end, PAGE)?;
        for (key, _) in &page {
            let Some((_, _, _, seq)) = parse_inbox_key(key) else {
                continue;
            };
            match expected {
                None => meta.floor = seq.saturating_sub(1).min(next_seq - 1),
                Some(want) => {
                    for gap in want..seq {
                        if meta.acked_above.len() < ACKED_ABOVE_MAX {
                            meta.acked_above.push(gap);
                        }
                    }
                }
            }
            expected = Some(seq + 1);
        }
        match page.last() {
            Some((last, _)) if page.len() == PAGE => from = crate::storage::successor(last),
            _ => break,
        }
    }
    if let Some(want) = expected {
        for gap in want..next_seq {
            if meta.acked_above.len() < ACKED_ABOVE_MAX {
                meta.acked_above.push(gap);
            }
        }
    }
    if meta.acked_above.len() >= ACKED_ABOVE_MAX {
        tracing::warn!(
            device = ?shard_user_device,
            "format-1 inbox counters with more holes than the bound; some stay pending"
        );
    }
    Ok(meta)
}

/// A count as a gauge delta (counts never come near `i64::MAX`).
fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Whether acknowledging this entry owes its sender a `delivered` receipt: only messages from
/// another user (a user's own devices get no receipts).
fn receipt_due(user: UserId, header: &EntryHeader) -> bool {
    header.kind == EntryKind::Message && header.from_user != user
}

/// The dedup key under which a `delivered` receipt for a message stored for several devices is
/// tracked.
fn receipt_key(shard: ShardId, user: UserId, header: &EntryHeader) -> Vec<u8> {
    dedup_key(
        shard,
        user,
        header.from_user,
        header.from_device,
        &header.msg_id,
    )
}
