//! The offline inbox: per-device queues of entries (message ciphertexts and receipts) waiting
//! to be delivered and acked, with sender dedup and a per-device quota.
//!
//! - Storage: three column families (key layouts in `inbox/keys.rs`): [`Cf::Inbox`] holds the
//!   entries, `shard | user | device | seq`, so a device's drain is one ordered prefix scan;
//!   [`Cf::InboxMeta`] holds each device's counters (next seq, entry count); [`Cf::Dedup`]
//!   remembers each (recipient, sender device, msg_id) for the dedup window. The shard is the
//!   recipient's.
//! - Writes: one writer thread (`inbox/writer.rs`) owns every mutation and commits them in
//!   groups, one synced write per group; callers `await` their answer, which comes only after
//!   the write is durable. The queue in front of it is bounded, so a slow disk pushes back on
//!   senders instead of growing memory.
//! - Reads ([`Inbox::read`]) go straight to the engine on the caller's thread.
//! - Time is an input (`now_ms`) everywhere, so tests control it.
//!
//! Seqs of a device start at 1 and only grow: `next_seq` is persisted with every append and
//! survives acks, expiry, [`Inbox::drop_device`] and restarts, so a seq is never handed out twice.
//!
//! Shard hand-off (see [`crate::handoff`]): the writer is also the node's single writer of
//! whole shards ([`Inbox::import`], [`Inbox::drop_shard`]), and it fences appends per shard
//! ([`Inbox::set_writable`], [`Inbox::sync_barrier`]).

mod codec;
mod entry;
mod error;
mod gate;
mod keys;
mod records;
mod writer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use ringpost_wire::{DeviceId, MsgId, UserId};
use tokio::sync::{mpsc, oneshot};

pub use entry::{Entry, EntryKind};
pub use error::InboxError;

use crate::handoff::{self, Row};
use crate::shard::{shard_of, ShardId, SHARD_COUNT_DEFAULT};
use crate::storage::{prefix_end, successor, Cf, Engine, StorageError};
use gate::ShardGate;
use keys::{device_prefix, inbox_key, parse_inbox_key, parse_meta_key, DEVICE_PREFIX_LEN};
use records::{DedupRecord, DeviceMeta};
pub use writer::StorageHealth;
use writer::{Reply, Request, Writer};

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Entries in one [`Append`]: the devices of one user (the wire allows 5 per user) with room
/// for a message plus receipts to each.
pub const APPEND_ENTRIES_MAX: usize = 16;
/// Body bytes of one entry: a whole frame (the wire's ciphertext limit is half of it).
pub const ENTRY_BODY_BYTES_MAX: usize = 128 * 1024;
/// Stored bytes of one [`Append`] (all its entries encoded). With the queue depth this bounds
/// the memory of queued requests: `queue_depth * APPEND_BYTES_MAX` at worst.
pub const APPEND_BYTES_MAX: usize = 256 * 1024;
/// Message ids in one receipt entry (the wire's limit).
pub const RECEIPT_MSG_IDS_MAX: usize = 256;
/// Seqs in one [`Inbox::ack`] call (the wire allows 256 per `DeliverAck`).
pub const ACK_SEQS_MAX: usize = 1024;
/// Entries one [`Inbox::read`] returns at most (a larger `limit` is clamped).
pub const READ_ENTRIES_MAX: usize = 1024;
/// Keys scanned per step of [`Inbox::expire`], and so candidates per writer request: bounds how
/// long one expiry step holds the writer (and the caller's thread) and the memory of a step.
pub const EXPIRE_CHUNK_KEYS_MAX: usize = 512;

// The inbox's bounds admit everything the wire admits, and the largest entries fit both the
// append bound and the entry encoding's length fields. Checked at compile time.
const _: () = {
    use ringpost_wire::limits;
    assert!(APPEND_ENTRIES_MAX >= limits::DEVICES_PER_USER_MAX);
    assert!(ENTRY_BODY_BYTES_MAX >= limits::CIPHERTEXT_BYTES_MAX);
    assert!(RECEIPT_MSG_IDS_MAX >= limits::RECEIPT_MSG_IDS_MAX);
    assert!(ACK_SEQS_MAX >= limits::ACK_SEQS_MAX);
    assert!(APPEND_BYTES_MAX >= ENTRY_BODY_BYTES_MAX + 16 * RECEIPT_MSG_IDS_MAX + 64);
    assert!(ENTRY_BODY_BYTES_MAX <= u32::MAX as usize && RECEIPT_MSG_IDS_MAX <= u16::MAX as usize);
};

/// Default of [`InboxConfig::retention_ms`]: unacked entries expire after 30 days.
pub const RETENTION_MS_DEFAULT: u64 = 30 * DAY_MS;
/// Default of [`InboxConfig::dedup_window_ms`].
pub const DEDUP_WINDOW_MS_DEFAULT: u64 = 7 * DAY_MS;
/// Default of [`InboxConfig::device_quota`]. Disk: up to this many entries of up to
/// [`ENTRY_BODY_BYTES_MAX`] per device (a few MiB for typical 1 KiB messages).
pub const DEVICE_QUOTA_DEFAULT: u64 = 50_000;
/// Default of [`InboxConfig::group_requests_max`].
pub const GROUP_REQUESTS_MAX_DEFAULT: usize = 512;
/// Default of [`InboxConfig::group_bytes_max`]: one group is one WAL write of about this size.
pub const GROUP_BYTES_MAX_DEFAULT: usize = 8 * 1024 * 1024;
/// Default of [`InboxConfig::queue_depth`]. Memory: up to `1024 * APPEND_BYTES_MAX` = 256 MiB
/// queued at the very worst (every request a maximal append); about 1 KiB each typically. A
/// hand-off import holds up to [`crate::handoff::CHUNK_BYTES_MAX`] instead, one per pull in
/// flight.
pub const QUEUE_DEPTH_DEFAULT: usize = 1024;

/// Called by the writer after every group commit attempt with the latency of the synced write
/// and the number of requests in the group. Runs on the writer thread: keep it cheap, and do
/// not capture an [`Inbox`] in it (that handle would keep the writer alive forever).
pub type CommitObserver = Arc<dyn Fn(Duration, usize) + Send + Sync>;

/// Inbox settings.
#[derive(Clone)]
pub struct InboxConfig {
    /// Shards of the cluster (fixed when it is created): decides the key prefix.
    pub shard_count: u16,
    /// How long an unacked entry is kept.
    pub retention_ms: u64,
    /// How long a (recipient, sender device, msg_id) is remembered to answer a retried send
    /// with `Duplicate` (and to send one `delivered` receipt per message).
    pub dedup_window_ms: u64,
    /// Entries one device may have stored; an append to a device at the quota stores nothing.
    pub device_quota: u64,
    /// Requests in one group commit.
    pub group_requests_max: usize,
    /// Bytes (encoded entries, roughly) in one group commit; a single larger request still
    /// forms a group on its own.
    pub group_bytes_max: usize,
    /// Requests queued for the writer before callers wait (back-pressure).
    pub queue_depth: usize,
    /// Metrics hook, see [`CommitObserver`].
    pub observer: Option<CommitObserver>,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            shard_count: SHARD_COUNT_DEFAULT,
            retention_ms: RETENTION_MS_DEFAULT,
            dedup_window_ms: DEDUP_WINDOW_MS_DEFAULT,
            device_quota: DEVICE_QUOTA_DEFAULT,
            group_requests_max: GROUP_REQUESTS_MAX_DEFAULT,
            group_bytes_max: GROUP_BYTES_MAX_DEFAULT,
            queue_depth: QUEUE_DEPTH_DEFAULT,
            observer: None,
        }
    }
}

impl std::fmt::Debug for InboxConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxConfig")
            .field("shard_count", &self.shard_count)
            .field("retention_ms", &self.retention_ms)
            .field("dedup_window_ms", &self.dedup_window_ms)
            .field("device_quota", &self.device_quota)
            .field("group_requests_max", &self.group_requests_max)
            .field("group_bytes_max", &self.group_bytes_max)
            .field("queue_depth", &self.queue_depth)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

impl InboxConfig {
    fn validate(&self) -> Result<(), InboxError> {
        let checks = [
            (self.shard_count > 0, "shard_count must be positive"),
            (self.retention_ms > 0, "retention_ms must be positive"),
            (self.dedup_window_ms > 0, "dedup_window_ms must be positive"),
            (self.device_quota > 0, "device_quota must be positive"),
            (
                self.group_requests_max > 0,
                "group_requests_max must be positive",
            ),
            (self.group_bytes_max > 0, "group_bytes_max must be positive"),
            (self.queue_depth > 0, "queue_depth must be positive"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, why)) => Err(InboxError::Invalid(why)),
            None => Ok(()),
        }
    }
}

/// The idempotency key of a send: `(sender user, sender device, client-chosen msg_id)`.
pub type DedupKey = (UserId, DeviceId, MsgId);

/// Entries for the devices of one user, stored all or nothing.
#[derive(Debug, Clone)]
pub struct Append {
    pub to_user: UserId,
    /// When set, a second append with the same key within the dedup window stores nothing and
    /// returns the first one's time. Every entry must then come from this sender and carry this
    /// `msg_id` (it is also the key its `delivered` receipt is tracked under).
    pub dedup: Option<DedupKey>,
    /// `(device, entry)` pairs; `server_time_ms` and `expires_at_ms` of the entries are set by
    /// the inbox (to `now_ms` and `now_ms + retention`). May be empty: a deduped append then
    /// only records its key.
    pub entries: Vec<(DeviceId, Entry)>,
    pub now_ms: u64,
}

/// What an [`Inbox::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Durable. The seqs are in the order of [`Append::entries`].
    Stored {
        server_time_ms: u64,
        seqs: Vec<(DeviceId, u64)>,
    },
    /// The same dedup key was stored within the window: nothing new was stored.
    Duplicate { server_time_ms: u64 },
    /// These devices are at their quota: nothing was stored for any device.
    Full { devices: Vec<DeviceId> },
}

/// One entry deleted by [`Inbox::ack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub seq: u64,
    pub kind: EntryKind,
    pub from_user: UserId,
    pub from_device: DeviceId,
    pub msg_id: MsgId,
    /// The first ack of this message by any device of the recipient: route exactly one
    /// `delivered` receipt to the sender. Only ever set for messages from another user.
    pub first_ack: bool,
}

/// What one expiry pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ExpireReport {
    entries: u64,
    dedup_records: u64,
}

/// A handle to the inbox service. Cheap to clone; the writer thread stops (after answering
/// everything queued) when the last handle is dropped, and that drop waits for it.
#[derive(Clone)]
pub struct Inbox {
    inner: Arc<Inner>,
}

struct Inner {
    /// `Some` until drop, which closes the queue first and then joins the writer.
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    engine: Arc<dyn Engine>,
    config: InboxConfig,
    entries_total: Arc<AtomicU64>,
    gate: Arc<ShardGate>,
    health: Arc<StorageHealth>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue lets the writer drain what is queued and return.
        self.tx.take();
        if let Some(writer) = self.writer.take() {
            if writer.thread().id() != std::thread::current().id() && writer.join().is_err() {
                tracing::error!("inbox writer thread panicked");
            }
        }
    }
}

impl Inbox {
    /// Loads the entry count and starts the writer thread.
    pub fn start(engine: Arc<dyn Engine>, config: InboxConfig) -> Result<Inbox, InboxError> {
        config.validate()?;
        let entries_total = Arc::new(AtomicU64::new(count_entries(&*engine)?));
        let gate = Arc::new(ShardGate::new(config.shard_count));
        let health = Arc::new(StorageHealth::default());
        let (tx, rx) = mpsc::channel(config.queue_depth);
        let writer = Writer {
            engine: Arc::clone(&engine),
            config: config.clone(),
            entries_total: Arc::clone(&entries_total),
            gate: Arc::clone(&gate),
            rx,
            health: Arc::clone(&health),
        };
        let handle = std::thread::Builder::new()
            .name("inbox-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StorageError::Other(format!("cannot start the inbox writer: {e}")))?;
        Ok(Inbox {
            inner: Arc::new(Inner {
                tx: Some(tx),
                writer: Some(handle),
                engine,
                config,
                entries_total,
                gate,
                health,
            }),
        })
    }

    /// Stores entries for devices of one user, all or nothing; returns once they are durable.
    pub async fn append(&self, append: Append) -> Result<AppendOutcome, InboxError> {
        validate_append(&append)?;
        self.call(|reply| Request::Append { append, reply }).await
    }

    /// Deletes the given entries of this device (unknown seqs are ignored) once durable, and
    /// says which were deleted and which of them are a message's first ack.
    pub async fn ack(
        &self,
        user: UserId,
        device: DeviceId,
        seqs: Vec<u64>,
        now_ms: u64,
    ) -> Result<Vec<Acked>, InboxError> {
        if seqs.len() > ACK_SEQS_MAX {
            return Err(InboxError::LimitExceeded {
                what: "acked seqs",
                len: seqs.len(),
                max: ACK_SEQS_MAX,
            });
        }
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        self.call(|reply| Request::Ack {
            user,
            device,
            seqs,
            now_ms,
            reply,
        })
        .await
    }

    /// Deletes every stored entry of a device (its counters stay, so seqs keep growing if the
    /// device id is used again). Returns how many entries were deleted.
    pub async fn drop_device(&self, user: UserId, device: DeviceId) -> Result<u64, InboxError> {
        self.call(|reply| Request::DropDevice {
            user,
            device,
            reply,
        })
        .await
    }

    /// Opens or closes `shard` for appends on this node (all are open at start). An append to a
    /// closed shard is answered [`InboxError::WrongOwner`] and stores nothing; acks, expiry and
    /// [`Inbox::drop_device`] still run. The writer reads the flag when it handles an append.
    ///
    /// The fence: once `set_writable(s, false)` has returned and a [`Inbox::sync_barrier`]
    /// called after it has answered, no append to `s` commits until `s` is opened again, and
    /// every append to `s` that was or will be answered `Stored` is durable, so an export of
    /// `s` started after the barrier sees all of them. (An append handled before the writer
    /// received the barrier is committed before the barrier answers; one handled after it
    /// sees the flag cleared, the queue ordering the two.)
    pub fn set_writable(&self, shard: ShardId, writable: bool) {
        let known = self.inner.gate.set(shard, writable);
        debug_assert!(known, "no shard {shard}");
        if !known {
            tracing::error!(
                shard,
                writable,
                "set_writable of a shard that does not exist"
            );
        }
    }

    /// Whether `shard` takes appends on this node (`false` for a shard that does not exist).
    pub fn is_writable(&self, shard: ShardId) -> bool {
        self.inner.gate.is_writable(shard)
    }

    /// Answers once every request queued before it is committed and durable: a synced write
    /// (of nothing) after them, which syncs the unsynced writes of [`Inbox::import`] too. Use
    /// it to end an import, and after closing a shard (see [`Inbox::set_writable`]).
    pub async fn sync_barrier(&self) -> Result<(), InboxError> {
        self.call(|reply| Request::SyncBarrier { reply }).await
    }

    /// Writes one chunk of hand-off rows of `shard` (of any [`handoff::SHARD_CFS`] family, as
    /// exported by its old owner) in one batch, NOT synced: an import ends with
    /// [`Inbox::sync_barrier`] ([`handoff::finish_import`]). Rows are checked with
    /// [`handoff::validate_rows`] first (call it yourself to learn why rows are refused);
    /// refused rows store nothing.
    ///
    /// No append to `shard` may be accepted on this node until the import is complete (the
    /// router's readiness or [`Inbox::set_writable`]): imported counters replace local ones,
    /// so seqs handed out meanwhile would be handed out again.
    ///
    /// Returns the change of [`Inbox::entries_total`]: the gauge is the sum of the stored
    /// per-device counts (as computed at start), so an imported counter adds its count minus
    /// that of the counter it replaces; entries rows do not count by themselves. Importing the
    /// same chunk again therefore changes nothing, and a partial import (entries whose counters
    /// never came) is not counted and leaves nothing to subtract when [`Inbox::drop_shard`]
    /// cleans it up, before or after a restart.
    pub async fn import(&self, shard: ShardId, rows: Vec<Row>) -> Result<i64, InboxError> {
        self.check_shard(shard)?;
        if let Err(err) = handoff::validate_rows(shard, &rows) {
            tracing::warn!(%err, shard, "refusing hand-off rows");
            return Err(InboxError::Invalid("hand-off rows failed validation"));
        }
        self.call(|reply| Request::Import { shard, rows, reply })
            .await
    }

    /// Deletes every row of `shard` in every [`handoff::SHARD_CFS`] family (range deletes, one
    /// synced write) and subtracts what its counters held from [`Inbox::entries_total`], which
    /// it returns. Close the shard first ([`Inbox::set_writable`]): an append committed after
    /// the drop would stay behind. [`handoff::drop_shard`] also updates the accounts cache.
    pub async fn drop_shard(&self, shard: ShardId) -> Result<u64, InboxError> {
        self.check_shard(shard)?;
        self.call(|reply| Request::DropShard { shard, reply }).await
    }

    fn check_shard(&self, shard: ShardId) -> Result<(), InboxError> {
        if shard < self.inner.config.shard_count {
            Ok(())
        } else {
            Err(InboxError::Invalid("no such shard"))
        }
    }

    /// Up to `limit` (at most [`READ_ENTRIES_MAX`]) unexpired entries of a device with
    /// `seq > after_seq`, in seq order. Reads the engine on the caller's thread.
    pub fn read(
        &self,
        user: UserId,
        device: DeviceId,
        after_seq: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<(u64, Entry)>, InboxError> {
        let limit = limit.min(READ_ENTRIES_MAX);
        let Some(first_seq) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        let shard = shard_of(user, self.inner.config.shard_count);
        let end = prefix_end(&device_prefix(shard, user, device));
        let mut from = inbox_key(shard, user, device, first_seq);
        let mut out = Vec::new();
        // Expired entries are skipped, so this may take several pages; the device's quota
        // bounds how many.
        while out.len() < limit {
            let page = self.inner.engine.scan(Cf::Inbox, &from, &end, limit)?;
            let page_len = page.len();
            let Some(next) = page.last().map(|(k, _)| successor(k)) else {
                break;
            };
            for (key, value) in page {
                let Some((_, _, _, seq)) = parse_inbox_key(&key) else {
                    return Err(codec::corrupt("inbox", "malformed inbox key").into());
                };
                let entry = Entry::decode(Bytes::from(value))?;
                if entry.expires_at_ms > now_ms {
                    out.push((seq, entry));
                    if out.len() == limit {
                        break;
                    }
                }
            }
            if page_len < limit {
                break;
            }
            from = next;
        }
        Ok(out)
    }

    /// Deletes expired entries and expired dedup records, one bounded chunk at a time through
    /// the writer. Scans every stored entry key once per call except that, within a device,
    /// it stops at the first unexpired entry (entries expire in seq order unless the clock went
    /// back, which only delays their deletion; reads skip them anyway), and scans every dedup
    /// record. The scans run on the caller's thread, [`EXPIRE_CHUNK_KEYS_MAX`] keys at a time.
    ///
    /// Returns how many entries were deleted (dedup records are only logged).
    pub async fn expire(&self, now_ms: u64) -> Result<usize, InboxError> {
        let report = self.expire_report(now_ms).await?;
        tracing::debug!(
            entries = report.entries,
            dedup_records = report.dedup_records,
            "inbox expiry"
        );
        Ok(usize::try_from(report.entries).unwrap_or(usize::MAX))
    }

    async fn expire_report(&self, now_ms: u64) -> Result<ExpireReport, InboxError> {
        let mut report = ExpireReport::default();
        // Above every shard-prefixed key: shard ids are below u16::MAX.
        let end = [0xff, 0xff];
        let mut from = Vec::new();
        loop {
            let page = self
                .inner
                .engine
                .scan(Cf::Inbox, &from, &end, EXPIRE_CHUNK_KEYS_MAX)?;
            let Some((last, _)) = page.last() else { break };
            let mut next = successor(last);
            let done = page.len() < EXPIRE_CHUNK_KEYS_MAX;
            let mut keys = Vec::new();
            let mut live_device: Option<Vec<u8>> = None;
            for (key, value) in page {
                let Some(prefix) = key.get(..DEVICE_PREFIX_LEN) else {
                    continue;
                };
                if live_device.as_deref() == Some(prefix) {
                    continue;
                }
                match Entry::decode(Bytes::from(value)) {
                    Ok(entry) if entry.expires_at_ms <= now_ms => keys.push(key),
                    Ok(_) => live_device = Some(prefix.to_vec()),
                    Err(err) => tracing::error!(%err, "inbox entry does not decode; not expiring"),
                }
            }
            if let Some(prefix) = live_device {
                // Skip the rest of that device if the page ended inside it.
                next = next.max(prefix_end(&prefix));
            }
            if !keys.is_empty() {
                report.entries += self
                    .call(|reply| Request::ExpireEntries {
                        keys,
                        now_ms,
                        reply,
                    })
                    .await?;
            }
            if done {
                break;
            }
            from = next;
        }

        let mut from = Vec::new();
        loop {
            let page = self
                .inner
                .engine
                .scan(Cf::Dedup, &from, &end, EXPIRE_CHUNK_KEYS_MAX)?;
            let Some((last, _)) = page.last() else { break };
            let next = successor(last);
            let done = page.len() < EXPIRE_CHUNK_KEYS_MAX;
            let keys: Vec<Vec<u8>> = page
                .into_iter()
                .filter(|(_, value)| DedupRecord::decode(value).is_ok_and(|r| !r.is_live(now_ms)))
                .map(|(key, _)| key)
                .collect();
            if !keys.is_empty() {
                report.dedup_records += self
                    .call(|reply| Request::ExpireDedup {
                        keys,
                        now_ms,
                        reply,
                    })
                    .await?;
            }
            if done {
                break;
            }
            from = next;
        }
        Ok(report)
    }

    /// Since when durable writes fail and the latest error (disk full, fsync failed); `None`
    /// while they succeed. RocksDB stops taking writes after a failed WAL sync, so a node
    /// whose storage failed serves no writes until it is restarted (see the operations guide).
    pub fn storage_failing(&self) -> Option<(std::time::Duration, String)> {
        self.inner.health.failing()
    }

    /// Entries stored on this node (a gauge for metrics).
    pub fn entries_total(&self) -> u64 {
        self.inner.entries_total.load(Ordering::Relaxed)
    }

    async fn call<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T, InboxError> {
        let tx = self.inner.tx.as_ref().ok_or(InboxError::Closed)?;
        let (reply, answer) = oneshot::channel();
        tx.send(request(reply))
            .await
            .map_err(|_| InboxError::Closed)?;
        answer.await.map_err(|_| InboxError::Closed)?
    }

    /// Requests waiting in the writer's queue.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.inner
            .tx
            .as_ref()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }
}

/// Checks an append's bounds and consistency before it takes a place in the queue.
fn validate_append(append: &Append) -> Result<(), InboxError> {
    let limit = |what, len, max| {
        if len > max {
            Err(InboxError::LimitExceeded { what, len, max })
        } else {
            Ok(())
        }
    };
    limit(
        "entries in an append",
        append.entries.len(),
        APPEND_ENTRIES_MAX,
    )?;
    let mut bytes = 0;
    for (_, entry) in &append.entries {
        limit("entry body bytes", entry.body.len(), ENTRY_BODY_BYTES_MAX)?;
        limit(
            "receipt msg ids",
            entry.receipt_msg_ids.len(),
            RECEIPT_MSG_IDS_MAX,
        )?;
        bytes += entry.encoded_len();
        if let Some(key) = append.dedup {
            if (entry.from_user, entry.from_device, entry.msg_id) != key {
                return Err(InboxError::Invalid(
                    "an entry does not match the append's dedup key",
                ));
            }
        }
    }
    limit("append bytes", bytes, APPEND_BYTES_MAX)
}

/// Sums the entry counts of every device, in pages.
fn count_entries(engine: &dyn Engine) -> Result<u64, StorageError> {
    // Above every shard-prefixed key: shard ids are below u16::MAX.
    count_entries_in(engine, &[], &[0xff, 0xff])
}

/// Sums the entry counts of the devices whose counters' keys are in `[from, end)`, in pages.
fn count_entries_in(engine: &dyn Engine, from: &[u8], end: &[u8]) -> Result<u64, StorageError> {
    const PAGE: usize = 4096;
    let mut from = from.to_vec();
    let mut total = 0u64;
    loop {
        let page = engine.scan(Cf::InboxMeta, &from, end, PAGE)?;
        for (key, value) in &page {
            if parse_meta_key(key).is_none() {
                return Err(codec::corrupt("inbox_meta", "malformed meta key"));
            }
            total = total.saturating_add(DeviceMeta::decode(value)?.count);
        }
        match page.last() {
            Some((last, _)) if page.len() == PAGE => from = successor(last),
            _ => return Ok(total),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::{Condvar, Mutex};
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::keys::dedup_key;
    use super::*;
    use crate::storage::rocks::{RocksConfig, RocksEngine};
    use crate::storage::suite::{mem_fixture, Fixture};
    use crate::storage::{Result as StorageResult, WriteBatch};

    const A: UserId = 1_000;
    const B: UserId = 2_000;

    /// Wall-clock now: RocksDB's dedup compaction filter compares expiries with the real clock,
    /// so tests use realistic times.
    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    fn config() -> InboxConfig {
        InboxConfig {
            shard_count: 16,
            ..InboxConfig::default()
        }
    }

    fn msg(from: UserId, from_device: DeviceId, id: u8, body: &'static str) -> Entry {
        Entry::message(
            from,
            from_device,
            [id; 16],
            Bytes::from_static(body.as_bytes()),
        )
    }

    /// A message from `from`/`from_device` to every given device of `to`, deduped.
    fn send(
        from: UserId,
        from_device: DeviceId,
        to: UserId,
        devices: &[DeviceId],
        id: u8,
        now_ms: u64,
    ) -> Append {
        Append {
            to_user: to,
            dedup: Some((from, from_device, [id; 16])),
            entries: devices
                .iter()
                .map(|d| (*d, msg(from, from_device, id, "ciphertext")))
                .collect(),
            now_ms,
        }
    }

    fn stored_seqs(outcome: AppendOutcome) -> Vec<(DeviceId, u64)> {
        match outcome {
            AppendOutcome::Stored { seqs, .. } => seqs,
            other => panic!("expected Stored, got {other:?}"),
        }
    }

    fn seqs_of(entries: &[(u64, Entry)]) -> Vec<u64> {
        entries.iter().map(|(s, _)| *s).collect()
    }

    /// Entries actually on disk and the sum of the stored counts: they must always agree with
    /// each other and with the gauge.
    fn assert_counts_match_disk(engine: &dyn Engine, inbox: &Inbox) {
        let on_disk = engine
            .scan(Cf::Inbox, &[], &[0xff, 0xff], usize::MAX)
            .unwrap()
            .len() as u64;
        assert_eq!(
            count_entries(engine).unwrap(),
            on_disk,
            "stored counts drifted from entries"
        );
        assert_eq!(inbox.entries_total(), on_disk, "gauge drifted from entries");
    }

    /// Reopens a fixture's engine as after a restart (RocksDB: closed and opened again).
    fn reopen(fixture: Fixture) -> Fixture {
        match fixture {
            (engine, Some(dir)) => {
                assert_eq!(
                    Arc::strong_count(&engine),
                    1,
                    "someone still holds the database"
                );
                drop(engine);
                let engine = RocksEngine::open(dir.path(), &RocksConfig::for_tests()).unwrap();
                (Arc::new(engine), Some(dir))
            }
            mem => mem,
        }
    }

    /// Wraps an engine; writes fail with an I/O error while `fail` is set.
    struct FailingEngine {
        inner: Arc<dyn Engine>,
        fail: AtomicBool,
    }

    impl Engine for FailingEngine {
        fn get(&self, cf: Cf, key: &[u8]) -> StorageResult<Option<Vec<u8>>> {
            self.inner.get(cf, key)
        }
        fn write(&self, batch: WriteBatch, sync: bool) -> StorageResult<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(StorageError::Io("injected: fsync failed".into()));
            }
            self.inner.write(batch, sync)
        }
        fn scan(
            &self,
            cf: Cf,
            from: &[u8],
            to: &[u8],
            limit: usize,
        ) -> StorageResult<Vec<(Vec<u8>, Vec<u8>)>> {
            self.inner.scan(cf, from, to, limit)
        }
        fn last_in(
            &self,
            cf: Cf,
            from: &[u8],
            to: &[u8],
        ) -> StorageResult<Option<(Vec<u8>, Vec<u8>)>> {
            self.inner.last_in(cf, from, to)
        }
    }

    /// Wraps an engine; every write waits at a gate until the test opens it, and counts itself
    /// as entered first. Lets a test hold the writer inside a commit while it queues requests.
    struct GatedEngine {
        inner: Arc<dyn Engine>,
        open: Mutex<bool>,
        opened: Condvar,
        entered: AtomicU64,
    }

    impl GatedEngine {
        fn new(inner: Arc<dyn Engine>) -> Self {
            Self {
                inner,
                open: Mutex::new(false),
                opened: Condvar::new(),
                entered: AtomicU64::new(0),
            }
        }
        fn open_gate(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    impl Engine for GatedEngine {
        fn get(&self, cf: Cf, key: &[u8]) -> StorageResult<Option<Vec<u8>>> {
            self.inner.get(cf, key)
        }
        fn write(&self, batch: WriteBatch, sync: bool) -> StorageResult<()> {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            drop(open);
            self.inner.write(batch, sync)
        }
        fn scan(
            &self,
            cf: Cf,
            from: &[u8],
            to: &[u8],
            limit: usize,
        ) -> StorageResult<Vec<(Vec<u8>, Vec<u8>)>> {
            self.inner.scan(cf, from, to, limit)
        }
        fn last_in(
            &self,
            cf: Cf,
            from: &[u8],
            to: &[u8],
        ) -> StorageResult<Option<(Vec<u8>, Vec<u8>)>> {
            self.inner.last_in(cf, from, to)
        }
    }

    /// Polls `cond` (yielding to the runtime) until it holds; fails after ~10 s.
    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("timed out waiting until {what}");
    }

    /// Records every group commit's size.
    fn recording_observer() -> (CommitObserver, Arc<Mutex<Vec<usize>>>) {
        let groups = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&groups);
        let observer: CommitObserver =
            Arc::new(move |_latency, requests| sink.lock().unwrap().push(requests));
        (observer, groups)
    }

    // ---- Cases, each run against MemEngine and RocksEngine (see `inbox_suite!`). ----

    async fn append_then_read_in_order(fixture: Fixture) {
        let (engine, _dir) = fixture;
        let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
        let t = now();
        for (i, id) in [3u8, 1, 2].into_iter().enumerate() {
            let seqs = stored_seqs(
                inbox
                    .append(send(A, 1, B, &[1, 2], id, t + i as u64))
                    .await
                    .unwrap(),
            );
            let n = i as u64 + 1;
            assert_eq!(seqs, vec![(1, n), (2, n)]);
        }
        let all = inbox.read(B, 1, 0, 100, t).unwrap();
        assert_eq!(seqs_of(&all), vec![1, 2, 3]);
        assert_eq!(
            all.iter().map(|(_, e)| e.msg_id[0]).collect::<Vec<_>>(),
            vec![3, 1, 2],
            "append order"
        );
        let (_, first) = &all[0];
        assert_eq!(
            (first.server_time_ms, first.expires_at_ms),
            (t, t + RETENTION_MS_DEFAULT)
        );
        assert_eq!(
            (first.from_user, first.from_device, first.kind),
            (A, 1, EntryKind::Message)
        );
        assert_eq!(first.body, Bytes::from_static(b"ciphertext"));
        assert_eq!(seqs_of(&inbox.read(B, 1, 1, 100, t).unwrap()), vec![2, 3]);
        assert_eq!(seqs_of(&inbox.read(B, 1, 0, 2, t).unwrap()), vec![1, 2]);
        assert_eq!(
            seqs_of(&inbox.read(B, 1, 3, 100, t).unwrap()),
            Vec::<u64>::new()
        );
        assert!(inbox.read(B, 1, u64::MAX, 100, t).unwrap().is_empty());
        assert!(inbox.read(B, 1, 0, 0, t).unwrap().is_empty());
        assert_eq!(
            seqs_of(&inbox.read(B, 2, 0, 100, t).unwrap()),
            vec![1, 2, 3]
        );
        assert!(inbox.read(B, 3, 0, 100, t).unwrap().is_empty());
        assert!(inbox.read(A, 1, 0, 100, t).unwrap().is_empty());
        assert_eq!(inbox.entries_total(), 6);
        assert_counts_match_disk(&*engine, &inbox);
        // The gauge is loaded from the counters at start.
        drop(inbox);
        let inbox = Inbox::start(engine, config()).unwrap();
        assert_eq!(inbox.entries_total(), 6);
    }

    async fn dedup_catches_retries_within_the_window(fixture: Fixture) {
        let (engine, _dir) = fixture;
        let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
        let t = now();
        stored_seqs(inbox.append(send(A, 1, B, &[1], 7, t)).await.unwrap());
        // A retry of the same (sender device, msg_id) to the same user: the original time.
        let retry = inbox.append(send(A, 1, B, &[1], 7, t + 50)).await.unwrap();
        assert_eq!(retry, AppendOutcome::Duplicate { server_time_ms: t });
        // Another device of the sender may reuse the id: a different message.
        assert_eq!(
            stored_seqs(inbox.append(send(A, 2, B, &[1], 7, t + 60)).await.unwrap()),
            vec![(1, 2)]
        );
        // Another user cannot suppress it either.
        assert_eq!(
            stored_seqs(inbox.append(send(9, 1, B, &[1], 7, t + 70)).await.unwrap()),
            vec![(1, 3)]
        );
        // The same key to another recipient is its own message.
        assert_eq!(
            stored_seqs(inbox.append(send(A, 1, 3, &[1], 7, t + 80)).await.unwrap()),
            vec![(1, 1)]
        );
        // No dedup key: never a duplicate.
        let mut plain = send(A, 1, B, &[1], 7, t + 90);
        plain.dedup = None;
        assert_eq!(
            stored_seqs(inbox.append(plain.clone()).await.unwrap()),
            vec![(1, 4)]
        );
        assert_eq!(
            stored_seqs(inbox.append(plain).await.unwrap()),
            vec![(1, 5)]
        );
        assert_eq!(inbox.read(B, 1, 0, 100, t).unwrap().len(), 5);
        // An append with no entries only records its key (e.g. a receipt to one's only device).
        let bare = Append {
            to_user: B,
            dedup: Some((A, 3, [42; 16])),
            entries: Vec::new(),
            now_ms: t,
        };
        assert_eq!(
            inbox.append(bare.clone()).await.unwrap(),
            AppendOutcome::Stored {
                server_time_ms: t,
                seqs: vec![]
            }
        );
        assert_eq!(
            inbox.append(bare).await.unwrap(),
            AppendOutcome::Duplicate { server_time_ms: t }
        );
        // After the window the key is free again.
        let later = t + DEDUP_WINDOW_MS_DEFAULT;
        assert_eq!(
            stored_seqs(inbox.append(send(A, 1, B, &[1], 7, later)).await.unwrap()),
            vec![(1, 6)]
        );
        assert_counts_match_disk(&*engine, &inbox);
    }

    async fn quota_full_stores_nothing(fixture: Fixture) {
        let (engine, _dir) = fixture;
        let inbox = Inbox::start(
            Arc::clone(&engine),
            InboxConfig {
                device_quota: 3,
                ..config()
            },
        )
        .unwrap();
        let t = now();
        for id in 0..3 {
            stored_seqs(inbox.append(send(A, 1, B, &[1], id, t)).await.unwrap());
        }
        stored_seqs(inbox.append(send(A, 1, B, &[2], 10, t)).await.unwrap());
        let full = inbox.append(send(A, 1, B, &[1, 2], 11, t)).await.unwrap();
        assert_eq!(full, AppendOutcome::Full { devices: vec![1] });
        assert_eq!(
            inbox.read(B, 2, 0, 100, t).unwrap().len(),
            1,
            "nothing stored for device 2 either"
        );
        assert_eq!(inbox.read(B, 1, 0, 100, t).unwrap().len(), 3);
        // Two entries for one device in one append count twice against its quota.
        let mut two = send(A, 1, B, &[2, 2, 2], 12, t);
        two.dedup = None;
        assert_eq!(
            inbox.append(two).await.unwrap(),
            AppendOutcome::Full { devices: vec![2] }
        );
        // A Full append left no dedup record: the retry after an ack is stored.
        inbox.ack(B, 1, vec![1], t).await.unwrap();
        assert_eq!(
            stored_seqs(inbox.append(send(A, 1, B, &[1, 2], 11, t)).await.unwrap()),
            vec![(1, 4), (2, 2)]
        );
        assert_counts_match_disk(&*engine, &inbox);
    }

    async fn ack_deletes_own_entries_and_receipts_once(fixture: Fixture) {
        let (engine, _dir) = fixture;
        let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
        let t = now();
        // A's device 1 sends to B's devices 1 and 2, and a copy to A's own device 2.
        stored_seqs(inbox.append(send(A, 1, B, &[1, 2], 5, t)).await.unwrap());
        stored_seqs(inbox.append(send(A, 1, A, &[2], 5, t)).await.unwrap());
        // A message without a dedup key, and a receipt entry.
        let mut plain = send(A, 1, B, &[1, 2], 6, t);
        plain.dedup = None;
        stored_seqs(inbox.append(plain).await.unwrap());
        let receipt = Entry {
            kind: EntryKind::Read,
            receipt_msg_ids: vec![[1; 16]],
            ..Entry::message(A, 1, [8; 16], Bytes::new())
        };
        stored_seqs(
            inbox
                .append(Append {
                    to_user: B,
                    dedup: None,
                    entries: vec![(1, receipt)],
                    now_ms: t,
                })
                .await
                .unwrap(),
        );

        // Device 2 of B can only touch its own inbox: seq 3 exists only on device 1.
        assert!(inbox.ack(B, 2, vec![3, 99], t).await.unwrap().is_empty());
        assert_eq!(inbox.read(B, 1, 0, 100, t).unwrap().len(), 3);

        let acked = inbox
            .ack(B, 1, vec![1, 2, 3, 2, 1_000], t + 1)
            .await
            .unwrap();
        let summary: Vec<_> = acked
            .iter()
            .map(|a| (a.seq, a.kind, a.msg_id[0], a.first_ack))
            .collect();
        assert_eq!(
            summary,
            vec![
                (1, EntryKind::Message, 5, true),
                (2, EntryKind::Message, 6, true),
                (3, EntryKind::Read, 8, false),
            ]
        );
        assert!(inbox.read(B, 1, 0, 100, t).unwrap().is_empty());
        assert_eq!(
            inbox.read(B, 2, 0, 100, t).unwrap().len(),
            2,
            "device 2 untouched"
        );
        // Acking again: unknown seqs, nothing happens.
        assert!(inbox
            .ack(B, 1, vec![1, 2, 3], t + 2)
            .await
            .unwrap()
            .is_empty());
        // The other device's acks are not first acks.
        let acked = inbox.ack(B, 2, vec![1, 2], t + 3).await.unwrap();
        assert_eq!(
            acked.iter().map(|a| a.first_ack).collect::<Vec<_>>(),
            vec![false, false]
        );
        // A's own copy: no receipt to oneself.
        let own = inbox.ack(A, 2, vec![1], t + 4).await.unwrap();
        assert_eq!(own.len(), 1);
        assert!(!own[0].first_ack);
        // The receipt flag does not make the message a duplicate-forever: still the original.
        assert_eq!(
            inbox.append(send(A, 1, B, &[1], 5, t + 5)).await.unwrap(),
            AppendOutcome::Duplicate { server_time_ms: t }
        );
        assert_eq!(inbox.entries_total(), 0);
        assert_counts_match_disk(&*engine, &inbox);
    }

    async fn receipt_is_tracked_past_the_dedup_window(fixture: Fixture) {
        let (engine, _dir) = fixture;
        let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
        let t = now();
        stored_seqs(inbox.append(send(A, 1, B, &[1, 2, 3], 5, t)).await.unwrap());
        // Both acks come after the dedup record expired (and was removed by expiry).
        let late = t + DEDUP_WINDOW_MS_DEFAULT + 1;
        assert_eq!(
            inbox.expire_report(late).await.unwrap(),
            ExpireReport {
                entries: 0,
                dedup_records: 1
            }
        );
        let first = inbox.ack(B, 1, vec![1], late).await.unwrap();
        let second = inbox.ack(B, 2, vec![1], late + 1000).await.unwrap();
        assert!(first[0].first_ack);
        assert!(!second[0].first_ack);
        // One acked in the window and one after it: the flag outlives the original window.
        stored_seqs(inbox.append(send(A, 1, B, &[1, 2], 6, t)).await.unwrap());
        assert!(
            inbox
                .ack(B, 1, vec![2], t + DEDUP_WINDOW_MS_DEFAULT - 1)
                .await
                .unwrap()[0]
                .first_ack
        );
        inbox.expire(t + DEDUP_WINDOW_MS_DEFAULT + 1).await.unwrap();
        assert!(
            !inbox
                .ack(B, 2, vec![2], t + DEDUP_WINDOW_MS_DEFAULT + 1)
                .await
                .unwrap()[0]
                .first_ack
        );
        assert_counts_match_disk(&*engine, &inbox);
    }

    async fn seqs_are_never_reused_across_restarts(fixture: Fixture) {
        let t = now();
        let (engine, dir) = fixture;
        let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
        for id in 0..3 {
            stored_seqs(inbox.append(send(A, 1, B, &[1], id, t)).await.unwrap());
        }
        assert_eq!(inbox.ack(B, 1, vec![1, 2, 3], t).await.unwrap().len(), 3);
        assert_eq!(inbox.entries_total(), 0);
        drop(inbox);

        let (engine, dir) = reopen((engine, dir));
        let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
        assert_eq!(
            stored_seqs(inbox.append(send(A, 1, B, &[1], 10, t)).await.unwrap()),
            vec![(1, 4)]
        );
        // Dropping the device keeps its counter too.
        assert_eq!(inbox.drop_device(B, 1).await.unwrap(), 1);
        drop(inbox);

        let (engine, _dir) = reopen((engine, dir));
        let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
        assert_eq!(inbox.entries_total(), 0);
        assert_eq!(
            stored_seqs(inbox.append(send(A, 1, B, &[1], 11, t)).await.unwrap()),
            vec![(1, 5)]
        );
        assert_counts_match_disk(&*engine, &inbox);
    }

    async fn expiry_deletes_old_entries_and_dedup_records(fixture: Fixture) {
        let (engine, _dir) = fixture;
        // Minutes, not milliseconds: RocksDB's compaction filter may drop dedup records once
        // the real clock passes their expiry, which must not happen while the test runs.
        const S: u64 = 1_000;
        let retention_ms = 1_000 * S;
        let dedup_window_ms = 500 * S;
        let inbox = Inbox::start(
            Arc::clone(&engine),
            InboxConfig {
                retention_ms,
                dedup_window_ms,
                ..config()
            },
        )
        .unwrap();
        let t = now();
        stored_seqs(inbox.append(send(A, 1, B, &[1, 2], 1, t)).await.unwrap());
        stored_seqs(
            inbox
                .append(send(A, 1, B, &[1], 2, t + 600 * S))
                .await
                .unwrap(),
        );
        stored_seqs(
            inbox
                .append(send(A, 1, 3, &[1], 3, t + 100 * S))
                .await
                .unwrap(),
        );
        // Reads skip expired entries before expiry deletes them.
        assert_eq!(
            seqs_of(&inbox.read(B, 1, 0, 100, t + retention_ms).unwrap()),
            vec![2]
        );
        assert!(inbox
            .read(B, 2, 0, 100, t + retention_ms)
            .unwrap()
            .is_empty());
        assert_eq!(
            inbox.expire_report(t + 499 * S).await.unwrap(),
            ExpireReport::default()
        );
        assert_eq!(
            inbox.expire_report(t + retention_ms).await.unwrap(),
            ExpireReport {
                entries: 2,
                dedup_records: 2
            }
        );
        assert_eq!(inbox.entries_total(), 2);
        assert_counts_match_disk(&*engine, &inbox);
        assert_eq!(
            inbox.expire_report(t + retention_ms).await.unwrap(),
            ExpireReport::default(),
            "idempotent"
        );
        assert_eq!(
            inbox.expire_report(t + 1_600 * S).await.unwrap(),
            ExpireReport {
                entries: 2,
                dedup_records: 1
            }
        );
        assert_eq!(inbox.entries_total(), 0);
        assert!(engine
            .scan(Cf::Dedup, &[], &[0xff, 0xff], 10)
            .unwrap()
            .is_empty());
        assert_counts_match_disk(&*engine, &inbox);
        // Expired entries' seqs are not reused either.
        assert_eq!(
            stored_seqs(
                inbox
                    .append(send(A, 1, B, &[1], 4, t + 2_000 * S))
                    .await
                    .unwrap()
            ),
            vec![(1, 3)]
        );
    }

    async fn expiry_pages_through_many_devices(fixture: Fixture) {
        let (engine, _dir) = fixture;
        let inbox = Inbox::start(
            Arc::clone(&engine),
            InboxConfig {
                retention_ms: 1_000,
                ..config()
            },
        )
        .unwrap();
        let t = now();
        // More keys than one expiry chunk, spread over users, with live entries in between.
        let mut expected = 0;
        for user in 0..40u64 {
            for i in 0..30u8 {
                let at = if user % 3 == 0 && i >= 20 {
                    t + 5_000
                } else {
                    expected += 1;
                    t
                };
                let mut a = send(A, 1, 10_000 + user, &[1], i, at);
                a.dedup = None;
                stored_seqs(inbox.append(a).await.unwrap());
            }
        }
        assert_eq!(inbox.expire(t + 1_000).await.unwrap() as u64, expected);
        assert_eq!(inbox.entries_total(), 40 * 30 - expected);
        assert_counts_match_disk(&*engine, &inbox);
    }

    async fn drop_device_removes_its_entries_only(fixture: Fixture) {
        let (engine, _dir) = fixture;
        let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
        let t = now();
        for id in 0..4 {
            stored_seqs(inbox.append(send(A, 1, B, &[1, 2], id, t)).await.unwrap());
        }
        assert_eq!(inbox.drop_device(B, 1).await.unwrap(), 4);
        assert!(inbox.read(B, 1, 0, 100, t).unwrap().is_empty());
        assert_eq!(inbox.read(B, 2, 0, 100, t).unwrap().len(), 4);
        assert_eq!(inbox.entries_total(), 4);
        assert_eq!(inbox.drop_device(B, 1).await.unwrap(), 0, "idempotent");
        assert_eq!(inbox.drop_device(B, 9).await.unwrap(), 0, "unknown device");
        assert!(inbox.ack(B, 1, vec![1, 2], t).await.unwrap().is_empty());
        assert_counts_match_disk(&*engine, &inbox);
    }

    async fn group_commit_groups_queued_requests(fixture: Fixture) {
        let (inner, _dir) = fixture;
        let gated = Arc::new(GatedEngine::new(inner));
        let (observer, groups) = recording_observer();
        let inbox = Inbox::start(
            Arc::clone(&gated) as Arc<dyn Engine>,
            InboxConfig {
                observer: Some(observer),
                ..config()
            },
        )
        .unwrap();
        let t = now();
        // The first request is taken alone and holds the writer inside its write.
        let first = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.append(send(A, 1, B, &[1], 0, t)).await }
        });
        wait_until("the writer is inside the first write", || {
            gated.entered.load(Ordering::SeqCst) == 1
        })
        .await;
        // Meanwhile 99 more queue up, from 99 tasks, one of them a duplicate of another.
        let mut tasks = Vec::new();
        for i in 1..100u64 {
            let inbox = inbox.clone();
            let id = if i == 99 { 98 } else { i as u8 };
            tasks.push(tokio::spawn(async move {
                inbox.append(send(A, 1, B, &[1, 2], id, t)).await
            }));
        }
        wait_until("99 requests are queued", || inbox.queued() == 99).await;
        gated.open_gate();
        assert_eq!(stored_seqs(first.await.unwrap().unwrap()), vec![(1, 1)]);
        let mut duplicates = 0;
        for task in tasks {
            match task.await.unwrap().unwrap() {
                AppendOutcome::Stored { .. } => {}
                AppendOutcome::Duplicate { server_time_ms } => {
                    assert_eq!(server_time_ms, t);
                    duplicates += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(duplicates, 1, "a duplicate within one group is caught");
        assert_eq!(
            *groups.lock().unwrap(),
            vec![1, 99],
            "100 requests, 2 commits"
        );
        assert_eq!(
            seqs_of(&inbox.read(B, 1, 0, 1000, t).unwrap()),
            (1..=99).collect::<Vec<_>>()
        );
        assert_eq!(inbox.entries_total(), 1 + 98 * 2);
        assert_counts_match_disk(&*gated, &inbox);
    }

    async fn group_limits_split_groups(fixture: Fixture) {
        let (inner, _dir) = fixture;
        let gated = Arc::new(GatedEngine::new(inner));
        let (observer, groups) = recording_observer();
        let config = InboxConfig {
            group_requests_max: 10,
            observer: Some(observer),
            ..config()
        };
        let inbox = Inbox::start(Arc::clone(&gated) as Arc<dyn Engine>, config).unwrap();
        let t = now();
        let first = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.append(send(A, 1, B, &[1], 0, t)).await }
        });
        wait_until("the writer is inside the first write", || {
            gated.entered.load(Ordering::SeqCst) == 1
        })
        .await;
        let mut tasks = Vec::new();
        for i in 1..=25u8 {
            let inbox = inbox.clone();
            tasks.push(tokio::spawn(async move {
                inbox.append(send(A, 1, B, &[1], i, t)).await
            }));
        }
        wait_until("25 requests are queued", || inbox.queued() == 25).await;
        gated.open_gate();
        first.await.unwrap().unwrap();
        for task in tasks {
            stored_seqs(task.await.unwrap().unwrap());
        }
        assert_eq!(*groups.lock().unwrap(), vec![1, 10, 10, 5]);
    }

    async fn concurrent_appends_get_unique_ordered_seqs(fixture: Fixture) {
        let (engine, _dir) = fixture;
        let (observer, groups) = recording_observer();
        let inbox = Inbox::start(
            Arc::clone(&engine),
            InboxConfig {
                observer: Some(observer),
                ..config()
            },
        )
        .unwrap();
        let t = now();
        let mut tasks = Vec::new();
        for sender in 0..20u64 {
            let inbox = inbox.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for id in 0..10u8 {
                    let out = inbox
                        .append(send(100 + sender, 1, B, &[1, 2], id, t))
                        .await
                        .unwrap();
                    seqs.push(stored_seqs(out)[0].1);
                }
                seqs
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            let seqs = task.await.unwrap();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "one sender's messages keep their order"
            );
            all.extend(seqs);
        }
        all.sort_unstable();
        assert_eq!(all, (1..=200).collect::<Vec<_>>());
        assert_eq!(groups.lock().unwrap().iter().sum::<usize>(), 200);
        assert_counts_match_disk(&*engine, &inbox);
    }

    async fn failed_writes_fail_every_request_and_leave_no_drift(fixture: Fixture) {
        let (inner, _dir) = fixture;
        let failing = Arc::new(FailingEngine {
            inner,
            fail: AtomicBool::new(false),
        });
        let engine = Arc::clone(&failing) as Arc<dyn Engine>;
        let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
        let t = now();
        stored_seqs(inbox.append(send(A, 1, B, &[1, 2], 1, t)).await.unwrap());
        stored_seqs(inbox.append(send(A, 1, B, &[1], 2, t)).await.unwrap());
        assert!(inbox.storage_failing().is_none());

        failing.fail.store(true, Ordering::SeqCst);
        let err = inbox
            .append(send(A, 1, B, &[1, 2], 3, t))
            .await
            .unwrap_err();
        assert!(
            matches!(err, InboxError::Storage(StorageError::Io(_))),
            "{err}"
        );
        assert_eq!(err.code(), ringpost_wire::ErrorCode::StorageUnavailable);
        assert!(matches!(
            inbox.ack(B, 1, vec![1], t).await,
            Err(InboxError::Storage(_))
        ));
        assert!(matches!(
            inbox.drop_device(B, 2).await,
            Err(InboxError::Storage(_))
        ));
        assert!(matches!(
            inbox.expire(t + RETENTION_MS_DEFAULT).await,
            Err(InboxError::Storage(_))
        ));
        // Nothing changed: not on disk, not in the gauge.
        assert_eq!(seqs_of(&inbox.read(B, 1, 0, 100, t).unwrap()), vec![1, 2]);
        assert_eq!(inbox.entries_total(), 3);
        assert_counts_match_disk(&*engine, &inbox);
        // `/readyz` reports it, with the error.
        let (_, why) = inbox.storage_failing().expect("storage is failing");
        assert!(!why.is_empty());

        failing.fail.store(false, Ordering::SeqCst);
        // The failed append left no dedup record and consumed no seq that was handed out.
        assert_eq!(
            stored_seqs(inbox.append(send(A, 1, B, &[1, 2], 3, t)).await.unwrap()),
            vec![(1, 3), (2, 2)]
        );
        assert!(
            inbox.storage_failing().is_none(),
            "a synced write clears it"
        );
        let acked = inbox.ack(B, 1, vec![1], t).await.unwrap();
        assert!(
            acked[0].first_ack,
            "the failed ack did not consume the receipt"
        );
        assert_eq!(inbox.entries_total(), 4);
        assert_counts_match_disk(&*engine, &inbox);
    }

    async fn shutdown_answers_queued_requests_and_joins(fixture: Fixture) {
        let (engine, _dir) = fixture;
        let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
        let t = now();
        let tasks: Vec<_> = (0..20u8)
            .map(|i| {
                let inbox = inbox.clone();
                tokio::spawn(async move { inbox.append(send(A, 1, B, &[1], i, t)).await })
            })
            .collect();
        drop(inbox);
        for task in tasks {
            stored_seqs(task.await.unwrap().unwrap());
        }
        // Every handle is gone and the writer joined: it no longer holds the engine.
        assert_eq!(Arc::strong_count(&engine), 1);
        assert_eq!(count_entries(&*engine).unwrap(), 20);
    }

    macro_rules! inbox_suite {
        ($fixture:path; $($case:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case($fixture()).await;
                }
            )*
        };
    }

    macro_rules! inbox_cases {
        ($fixture:path) => {
            inbox_suite!($fixture;
                append_then_read_in_order,
                dedup_catches_retries_within_the_window,
                quota_full_stores_nothing,
                ack_deletes_own_entries_and_receipts_once,
                receipt_is_tracked_past_the_dedup_window,
                seqs_are_never_reused_across_restarts,
                expiry_deletes_old_entries_and_dedup_records,
                expiry_pages_through_many_devices,
                drop_device_removes_its_entries_only,
                group_commit_groups_queued_requests,
                group_limits_split_groups,
                concurrent_appends_get_unique_ordered_seqs,
                failed_writes_fail_every_request_and_leave_no_drift,
                shutdown_answers_queued_requests_and_joins,
            );
        };
    }

    mod mem_engine {
        inbox_cases!(crate::storage::suite::mem_fixture);
    }

    mod rocks_engine {
        inbox_cases!(crate::storage::suite::rocks_fixture);
    }

    /// Hand-off: the write fence, imports, shard drops and the sync barrier.
    mod handoff;

    // ---- Engine-independent checks. ----

    #[tokio::test]
    async fn requests_over_their_bounds_are_refused() {
        let (engine, _dir) = mem_fixture();
        let inbox = Inbox::start(engine, config()).unwrap();
        let t = now();
        let too_many = send(A, 1, B, &[1; APPEND_ENTRIES_MAX + 1], 1, t);
        assert!(matches!(
            inbox.append(too_many).await,
            Err(InboxError::LimitExceeded { .. })
        ));
        let mut big = send(A, 1, B, &[1], 1, t);
        big.entries[0].1.body = Bytes::from(vec![0; ENTRY_BODY_BYTES_MAX + 1]);
        let err = inbox.append(big).await.unwrap_err();
        assert_eq!(err.code(), ringpost_wire::ErrorCode::LimitExceeded);
        let mut heavy = send(A, 1, B, &[1, 2, 3], 1, t);
        for (_, e) in &mut heavy.entries {
            e.body = Bytes::from(vec![0; ENTRY_BODY_BYTES_MAX]);
        }
        assert!(matches!(
            inbox.append(heavy).await,
            Err(InboxError::LimitExceeded {
                what: "append bytes",
                ..
            })
        ));
        let mut receipts = send(A, 1, B, &[1], 1, t);
        receipts.entries[0].1.receipt_msg_ids = vec![[0; 16]; RECEIPT_MSG_IDS_MAX + 1];
        assert!(matches!(
            inbox.append(receipts).await,
            Err(InboxError::LimitExceeded { .. })
        ));
        let mut mismatched = send(A, 1, B, &[1], 1, t);
        mismatched.entries[0].1.from_device = 2;
        assert!(matches!(
            inbox.append(mismatched).await,
            Err(InboxError::Invalid(_))
        ));
        let acks = vec![1; ACK_SEQS_MAX + 1];
        assert!(matches!(
            inbox.ack(B, 1, acks, t).await,
            Err(InboxError::LimitExceeded { .. })
        ));
        assert!(inbox.ack(B, 1, Vec::new(), t).await.unwrap().is_empty());
        assert_eq!(inbox.entries_total(), 0);
    }

    #[test]
    fn invalid_configs_are_refused() {
        for config in [
            InboxConfig {
                shard_count: 0,
                ..config()
            },
            InboxConfig {
                queue_depth: 0,
                ..config()
            },
            InboxConfig {
                group_requests_max: 0,
                ..config()
            },
            InboxConfig {
                device_quota: 0,
                ..config()
            },
        ] {
            assert!(matches!(
                Inbox::start(mem_fixture().0, config),
                Err(InboxError::Invalid(_))
            ));
        }
    }

    #[test]
    fn corrupt_counters_fail_start_instead_of_guessing() {
        let (engine, _dir) = mem_fixture();
        let mut b = WriteBatch::new();
        b.put(Cf::InboxMeta, device_prefix(1, B, 1), vec![9, 9]);
        engine.write(b, true).unwrap();
        assert!(matches!(
            Inbox::start(engine, config()),
            Err(InboxError::Storage(StorageError::Corrupt {
                cf: "inbox_meta",
                ..
            }))
        ));
    }

    #[tokio::test]
    async fn corrupt_entries_are_reported_by_read_and_deletable_by_ack() {
        let (engine, _dir) = mem_fixture();
        let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
        let t = now();
        stored_seqs(inbox.append(send(A, 1, B, &[1], 1, t)).await.unwrap());
        let shard = shard_of(B, config().shard_count);
        let mut b = WriteBatch::new();
        b.put(Cf::Inbox, inbox_key(shard, B, 1, 1), vec![1, 0, 0]);
        engine.write(b, true).unwrap();
        let err = inbox.read(B, 1, 0, 10, t).unwrap_err();
        assert_eq!(err.code(), ringpost_wire::ErrorCode::Internal);
        assert!(
            inbox.ack(B, 1, vec![1], t).await.unwrap().is_empty(),
            "deleted, not reported"
        );
        assert!(inbox.read(B, 1, 0, 10, t).unwrap().is_empty());
        assert_counts_match_disk(&*engine, &inbox);
    }

    #[test]
    fn dedup_keys_use_the_recipients_shard() {
        let k = dedup_key(shard_of(B, 16), B, A, 1, &[0; 16]);
        assert_eq!(k[..2], shard_of(B, 16).to_be_bytes());
    }
}
