//! The inbox's single writer: one thread owns every mutation and commits them in groups.
//!
//! The loop blocks for one request, then takes whatever else is already queued (up to
//! [`InboxConfig::group_requests_max`] requests and [`InboxConfig::group_bytes_max`] bytes),
//! runs the logic of all of them against one [`Group`] (an overlay of what this group changed,
//! over the engine), writes the resulting batch with ONE synced write, and only then answers
//! each request. Because one thread does all of this, the dedup check, seq allocation and quota
//! check never race.
//!
//! Nothing is cached between groups: each group reads the counters it needs from the engine,
//! so after a failed write (whose batch was never applied) nothing in memory can drift from
//! disk. The only cross-group state is the `entries_total` gauge, which moves by a group's
//! delta only once its write succeeded.
//!
//! Hand-off requests (import, shard drop, sync barrier) each form a group of their own: they
//! touch whole shards, which the overlay of per-device state does not model, and an import's
//! write is the only one not synced.

use std::collections::btree_map::Entry as MapEntry;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ringpost_wire::{DeviceId, UserId};
use tokio::sync::{mpsc, oneshot};

use super::entry::{Entry, EntryKind};
use super::gate::ShardGate;
use super::keys::{dedup_key, device_prefix, inbox_key, parse_inbox_key, parse_meta_key};
use super::records::{DedupRecord, DeviceMeta};
use super::{count_entries_in, Acked, Append, AppendOutcome, InboxConfig, InboxError};
use crate::handoff::{Row, SHARD_CFS};
use crate::shard::{shard_of, ShardId};
use crate::storage::{key, prefix_end, Cf, Engine, StorageError, WriteBatch};

pub(crate) type Reply<T> = oneshot::Sender<Result<T, InboxError>>;

/// Bytes a request is charged for in a group besides its payload (ids, reply channel).
const REQUEST_OVERHEAD_BYTES: usize = 64;

/// One mutation, queued for the writer.
pub(crate) enum Request {
    Append {
        append: Append,
        reply: Reply<AppendOutcome>,
    },
    Ack {
        user: UserId,
        device: DeviceId,
        seqs: Vec<u64>,
        now_ms: u64,
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
    /// Dedup keys found expired by a scan; the writer checks each again before deleting it.
    ExpireDedup {
        keys: Vec<Vec<u8>>,
        now_ms: u64,
        reply: Reply<u64>,
    },
    /// Hand-off rows of a closed shard, already validated; written unsynced.
    Import {
        shard: ShardId,
        rows: Vec<Row>,
        reply: Reply<i64>,
    },
    /// Deletes every row of a closed shard.
    DropShard { shard: ShardId, reply: Reply<u64> },
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
                Request::Ack { seqs, .. } => 8 * seqs.len(),
                Request::DropDevice { .. } => 0,
                Request::ExpireEntries { keys, .. } | Request::ExpireDedup { keys, .. } => {
                    keys.iter().map(Vec::len).sum()
                }
                Request::Import { rows, .. } => rows.iter().map(Row::encoded_len).sum(),
                Request::DropShard { .. } | Request::SyncBarrier { .. } => 0,
            }
    }

    /// Whether the request must be a group of its own (see the module documentation).
    fn is_exclusive(&self) -> bool {
        matches!(
            self,
            Request::Import { .. } | Request::DropShard { .. } | Request::SyncBarrier { .. }
        )
    }
}

/// How a group's batch is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Synced; an empty batch is not written at all.
    Synced,
    /// Not synced: a hand-off import, made durable by the barrier that ends it.
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

    fn commit_group(&self, requests: Vec<Request>) {
        debug_assert!(
            requests.len() == 1 || !requests.iter().any(Request::is_exclusive),
            "a hand-off request shares a group"
        );
        let mut group = Group::new(&*self.engine, &self.config, &self.gate);
        let mut done: Vec<Done> = requests.into_iter().map(|r| group.handle(r)).collect();
        let (batch, entries_delta, durability) = group.finish();
        // Only a synced write tells whether storage works (a failing one also marks it).
        let synced = !(batch.is_empty() && durability != Durability::Barrier)
            && durability != Durability::Unsynced;
        let result = if batch.is_empty() && durability != Durability::Barrier {
            // Nothing to make durable: duplicates of durable records, acks of unknown seqs.
            Ok(())
        } else if durability == Durability::Unsynced {
            self.engine.write(batch, false)
        } else {
            let started = Instant::now();
            let result = self.engine.write(batch, true);
            if let Some(observe) = &self.config.observer {
                observe(started.elapsed(), done.len());
            }
            result
        };
        if synced || result.is_err() {
            self.health.record(result.as_ref().map(|_| ()));
        }
        match result {
            Ok(()) => {
                if entries_delta >= 0 {
                    self.entries_total
                        .fetch_add(entries_delta.unsigned_abs(), Ordering::Relaxed);
                } else {
                    self.entries_total
                        .fetch_sub(entries_delta.unsigned_abs(), Ordering::Relaxed);
                }
            }
            Err(err) => {
                tracing::error!(error = %err, requests = done.len(), "inbox group commit failed");
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

/// A device's counters as this group sees them.
struct MetaSlot {
    meta: DeviceMeta,
    dirty: bool,
}

/// A dedup record as this group sees them (`None`: absent or deleted).
struct DedupSlot {
    record: Option<DedupRecord>,
    dirty: bool,
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
    batch: WriteBatch,
    metas: BTreeMap<(UserId, DeviceId), MetaSlot>,
    dedups: BTreeMap<Vec<u8>, DedupSlot>,
    /// Inbox keys deleted by this group (they are still on disk until the write).
    deleted: HashSet<Vec<u8>>,
    /// Devices whose stored entries this group range-deleted.
    dropped: HashSet<(UserId, DeviceId)>,
    entries_delta: i64,
    durability: Durability,
}

impl<'a> Group<'a> {
    pub(crate) fn new(
        engine: &'a dyn Engine,
        config: &'a InboxConfig,
        gate: &'a ShardGate,
    ) -> Self {
        Self {
            engine,
            config,
            gate,
            batch: WriteBatch::new(),
            metas: BTreeMap::new(),
            dedups: BTreeMap::new(),
            deleted: HashSet::new(),
            dropped: HashSet::new(),
            entries_delta: 0,
            durability: Durability::Synced,
        }
    }

    fn handle(&mut self, request: Request) -> Done {
        match request {
            Request::Append { append, reply } => Done::Append(reply, self.handle_append(append)),
            Request::Ack {
                user,
                device,
                seqs,
                now_ms,
                reply,
            } => Done::Ack(reply, self.handle_ack(user, device, &seqs, now_ms)),
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
            Request::ExpireDedup {
                keys,
                now_ms,
                reply,
            } => Done::Count(reply, self.handle_expire_dedup(&keys, now_ms)),
            Request::Import { shard, rows, reply } => {
                Done::Delta(reply, self.handle_import(shard, rows))
            }
            Request::DropShard { shard, reply } => {
                Done::Count(reply, self.handle_drop_shard(shard))
            }
            Request::SyncBarrier { reply } => {
                self.durability = Durability::Barrier;
                Done::Unit(reply, Ok(()))
            }
        }
    }

    /// The batch to write, the change of the stored entry count it makes, and how to write it.
    fn finish(mut self) -> (WriteBatch, i64, Durability) {
        for ((user, device), slot) in &self.metas {
            if slot.dirty {
                let shard = shard_of(*user, self.config.shard_count);
                self.batch.put(
                    Cf::InboxMeta,
                    device_prefix(shard, *user, *device),
                    slot.meta.encode(),
                );
            }
        }
        for (key, slot) in &self.dedups {
            match (slot.dirty, &slot.record) {
                (false, _) => {}
                (true, Some(record)) => self.batch.put(Cf::Dedup, key.clone(), record.encode()),
                (true, None) => self.batch.delete(Cf::Dedup, key.clone()),
            }
        }
        (self.batch, self.entries_delta, self.durability)
    }

    /// Loads a device's counters into the overlay (from the engine the first time).
    fn load_meta(&mut self, user: UserId, device: DeviceId) -> Result<&mut MetaSlot, StorageError> {
        match self.metas.entry((user, device)) {
            MapEntry::Occupied(slot) => Ok(slot.into_mut()),
            MapEntry::Vacant(vacant) => {
                let shard = shard_of(user, self.config.shard_count);
                let meta = match self
                    .engine
                    .get(Cf::InboxMeta, &device_prefix(shard, user, device))?
                {
                    Some(bytes) => DeviceMeta::decode(&bytes)?,
                    None => DeviceMeta::default(),
                };
                Ok(vacant.insert(MetaSlot { meta, dirty: false }))
            }
        }
    }

    /// A device's counters, already loaded by [`Self::load_meta`] in this request's load phase.
    fn meta_mut(&mut self, user: UserId, device: DeviceId) -> &mut MetaSlot {
        // Always occupied by the load phase; the default only keeps this path panic-free.
        self.metas
            .entry((user, device))
            .or_insert_with(|| MetaSlot {
                meta: DeviceMeta::default(),
                dirty: false,
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
        for (&device, &adding) in &per_device {
            let meta = self.load_meta(to_user, device)?.meta;
            if meta.count.saturating_add(adding) > self.config.device_quota {
                full.push(device);
            }
            if meta.next_seq.checked_add(adding).is_none() {
                return Err(InboxError::Invalid("the device's seq space is exhausted"));
            }
        }
        if !full.is_empty() {
            return Ok(AppendOutcome::Full { devices: full });
        }

        // Apply phase: nothing below can fail.
        let server_time_ms = now_ms;
        let expires_at_ms = now_ms.saturating_add(self.config.retention_ms);
        let mut seqs = Vec::with_capacity(entries.len());
        for (device, mut entry) in entries {
            let slot = self.meta_mut(to_user, device);
            let seq = slot.meta.next_seq;
            slot.meta.next_seq += 1;
            slot.meta.count += 1;
            slot.dirty = true;
            entry.server_time_ms = server_time_ms;
            entry.expires_at_ms = expires_at_ms;
            self.batch.put(
                Cf::Inbox,
                inbox_key(shard, to_user, device, seq),
                entry.encode(),
            );
            seqs.push((device, seq));
        }
        self.entries_delta += seqs.len() as i64;
        if let Some(key) = dedup_key {
            let record = DedupRecord {
                expires_at_ms: now_ms.saturating_add(self.config.dedup_window_ms),
                server_time_ms,
                receipt_sent: false,
            };
            self.set_dedup(key, Some(record));
        }
        Ok(AppendOutcome::Stored {
            server_time_ms,
            seqs,
        })
    }

    fn handle_ack(
        &mut self,
        user: UserId,
        device: DeviceId,
        seqs: &[u64],
        now_ms: u64,
    ) -> Result<Vec<Acked>, InboxError> {
        if self.dropped.contains(&(user, device)) {
            // Everything this device had on disk is already deleted by this group.
            return Ok(Vec::new());
        }
        let shard = shard_of(user, self.config.shard_count);

        // Load phase.
        let mut seen = BTreeSet::new();
        let mut found: Vec<(u64, Vec<u8>, Option<Entry>)> = Vec::new();
        for &seq in seqs {
            if !seen.insert(seq) {
                continue;
            }
            let key = inbox_key(shard, user, device, seq);
            if self.deleted.contains(&key) {
                continue;
            }
            let Some(value) = self.engine.get(Cf::Inbox, &key)? else {
                continue;
            };
            // A corrupt entry is still deleted when acked (deleting needs no decoding); it just
            // cannot be reported or receipted.
            let entry = match Entry::decode(Bytes::from(value)) {
                Ok(entry) => Some(entry),
                Err(err) => {
                    tracing::error!(%err, user, device, seq, "acked inbox entry does not decode");
                    None
                }
            };
            found.push((seq, key, entry));
        }
        if found.is_empty() {
            return Ok(Vec::new());
        }
        self.load_meta(user, device)?;
        for (_, _, entry) in &found {
            if let Some(key) = entry.as_ref().and_then(|e| receipt_key(shard, user, e)) {
                self.load_dedup(&key)?;
            }
        }

        // Apply phase.
        let mut acked = Vec::with_capacity(found.len());
        let deleted = found.len() as u64;
        for (seq, key, entry) in found {
            self.batch.delete(Cf::Inbox, key.clone());
            self.deleted.insert(key);
            let Some(entry) = entry else { continue };
            let first_ack = match receipt_key(shard, user, &entry) {
                Some(key) => self.mark_receipt_sent(key, &entry, now_ms),
                None => false,
            };
            acked.push(Acked {
                seq,
                kind: entry.kind,
                from_user: entry.from_user,
                from_device: entry.from_device,
                msg_id: entry.msg_id,
                first_ack,
            });
        }
        self.remove_entries(user, device, deleted);
        Ok(acked)
    }

    /// Records that a `delivered` receipt is being sent for this message; `true` the first time.
    ///
    /// A record missing or expired (the dedup window is shorter than retention) is recreated
    /// with the flag set, and a record whose flag is set lives at least one more dedup window,
    /// so devices acking within a window of each other yield one receipt.
    fn mark_receipt_sent(&mut self, key: Vec<u8>, entry: &Entry, now_ms: u64) -> bool {
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
                    server_time_ms: entry.server_time_ms,
                    receipt_sent: true,
                };
                self.set_dedup(key, Some(record));
                true
            }
        }
    }

    /// Lowers a device's count (and the group's delta) by `n` deleted entries.
    fn remove_entries(&mut self, user: UserId, device: DeviceId, n: u64) {
        let slot = self.meta_mut(user, device);
        // The count is maintained in the same batches as the entries, so this is a bug.
        debug_assert!(
            slot.meta.count >= n,
            "inbox count {} below {n} deletions",
            slot.meta.count
        );
        if slot.meta.count < n {
            tracing::error!(
                user,
                device,
                count = slot.meta.count,
                n,
                "inbox count below deletions"
            );
        }
        slot.meta.count = slot.meta.count.saturating_sub(n);
        slot.dirty = true;
        self.entries_delta -= n as i64;
    }

    fn handle_drop_device(&mut self, user: UserId, device: DeviceId) -> Result<u64, InboxError> {
        let shard = shard_of(user, self.config.shard_count);
        let removed = self.load_meta(user, device)?.meta.count;
        let prefix = device_prefix(shard, user, device);
        let end = prefix_end(&prefix);
        self.batch.delete_range(Cf::Inbox, prefix, end);
        self.dropped.insert((user, device));
        // The counters stay (with count 0) so next_seq keeps growing if the id comes back.
        self.remove_entries(user, device, removed);
        Ok(removed)
    }

    fn handle_expire_entries(&mut self, keys: &[Vec<u8>], now_ms: u64) -> Result<u64, InboxError> {
        // Load phase: re-check each candidate; an ack may have deleted it meanwhile.
        let mut expired: Vec<(Vec<u8>, UserId, DeviceId)> = Vec::new();
        for key in keys {
            let Some((shard, user, device, _)) = parse_inbox_key(key) else {
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
            if self.deleted.contains(key) || self.dropped.contains(&(user, device)) {
                continue;
            }
            let Some(value) = self.engine.get(Cf::Inbox, key)? else {
                continue;
            };
            match Entry::decode(Bytes::from(value)) {
                Ok(entry) if entry.expires_at_ms <= now_ms => {
                    expired.push((key.clone(), user, device))
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::error!(%err, user, device, "inbox entry does not decode; not expiring")
                }
            }
        }
        for (_, user, device) in &expired {
            self.load_meta(*user, *device)?;
        }

        // Apply phase.
        let n = expired.len() as u64;
        for (key, user, device) in expired {
            self.batch.delete(Cf::Inbox, key.clone());
            self.deleted.insert(key);
            self.remove_entries(user, device, 1);
        }
        Ok(n)
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

    /// Writes hand-off rows (validated by [`super::Inbox::import`]) as they are. The only rows
    /// that change the gauge are counters: each adds its count minus that of the counter it
    /// replaces, the gauge being the sum of the stored counts.
    fn handle_import(&mut self, shard: ShardId, rows: Vec<Row>) -> Result<i64, InboxError> {
        // Load phase.
        let mut delta = 0i64;
        let mut puts = Vec::with_capacity(rows.len());
        for row in rows {
            let cf = row
                .column_family()
                .ok_or(InboxError::Invalid("hand-off row of an unknown family"))?;
            if cf == Cf::InboxMeta {
                if parse_meta_key(&row.key).is_none_or(|(s, _, _)| s != shard) {
                    return Err(InboxError::Invalid("hand-off row is not an inbox counter"));
                }
                let imported = DeviceMeta::decode(&row.value)?.count;
                let replaced = match self.engine.get(Cf::InboxMeta, &row.key)? {
                    Some(bytes) => DeviceMeta::decode(&bytes)?.count,
                    None => 0,
                };
                delta = delta
                    .saturating_add(signed(imported))
                    .saturating_sub(signed(replaced));
            }
            puts.push((cf, row.key, row.value));
        }

        // Apply phase.
        for (cf, key, value) in puts {
            self.batch.put(cf, key, value);
        }
        self.entries_delta = self.entries_delta.saturating_add(delta);
        self.durability = Durability::Unsynced;
        Ok(delta)
    }

    /// Range-deletes the shard in every family; subtracts what its counters held.
    fn handle_drop_shard(&mut self, shard: ShardId) -> Result<u64, InboxError> {
        let from = key(shard, &[]);
        let end = prefix_end(&from);
        let removed = count_entries_in(self.engine, &from, &end)?;
        for cf in SHARD_CFS {
            self.batch.delete_range(cf, from.clone(), end.clone());
        }
        self.entries_delta = self.entries_delta.saturating_sub(signed(removed));
        Ok(removed)
    }
}

/// A count as a gauge delta (counts never come near `i64::MAX`).
fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The dedup key under which a `delivered` receipt for this acked entry is tracked, if one is
/// due: only for messages from another user (a user's own devices get no receipts).
fn receipt_key(shard: crate::shard::ShardId, user: UserId, entry: &Entry) -> Option<Vec<u8>> {
    (entry.kind == EntryKind::Message && entry.from_user != user).then(|| {
        dedup_key(
            shard,
            user,
            entry.from_user,
            entry.from_device,
            &entry.msg_id,
        )
    })
}
