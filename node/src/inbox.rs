//! The offline inbox: per-device queues of entries (message ciphertexts and receipts) waiting
//! to be delivered and acked, with sender dedup and a per-device quota.
//!
//! - Storage: five column families (key layouts in `inbox/keys.rs`): [`Cf::Inbox`] holds the
//!   entries, `shard | user | device | seq`, so a device's drain is one ordered prefix scan;
//!   [`Cf::InboxMeta`] holds each device's position (`inbox/device.rs`: next seq and the
//!   acknowledged floor); [`Cf::Dedup`] remembers each (recipient, sender device, msg_id) for
//!   the dedup window; [`Cf::GroupBodies`] holds a group message's body once per shard, with
//!   the count of that shard's entries referring to it (`inbox/bodies.rs`); [`Cf::InboxExpiry`]
//!   indexes by expiry time the entries that expire before the retention (statuses), written
//!   and deleted in the same batch as the entry. The shard is the recipient's.
//! - Writes: one writer thread (`inbox/writer.rs`) owns every mutation and commits them in
//!   groups, one write per group, synced when any request in it needs durability; callers
//!   `await` their answer, which comes only after the write. The queue in front of it is
//!   bounded, so a slow disk pushes back on senders instead of growing memory.
//! - Acks move a floor instead of deleting entries (`inbox/device.rs`); acknowledged entries
//!   are range-deleted in bulk below it. An ack's `delivered` receipt is written in the same
//!   batch as the ack: into the sender's inboxes when the sender is local, else into the
//!   acking user's receipt outbox (`inbox/outbox.rs`), which the node drains to the sender's
//!   owner.
//! - Reads ([`Inbox::read`]) go straight to the engine on the caller's thread, from the floor.
//!   Fresh entries also reach connected devices without a read: the writer hands every stored
//!   entry to [`InboxConfig::on_stored`] once it is written.
//! - Time is an input (`now_ms`) everywhere, so tests control it.
//!
//! Seqs of a device start at 1 and only grow: `next_seq` is persisted with every append and
//! survives acks, expiry, [`Inbox::drop_device`] and restarts, so a seq is never handed out twice.
//!
//! Shard hand-off (see [`crate::handoff`]): the writer is also the node's single writer of
//! whole shards ([`Inbox::import`], [`Inbox::drop_shard`]), and it fences appends per shard
//! ([`Inbox::set_writable`], [`Inbox::sync_barrier`]).

mod bodies;
mod cache;
mod codec;
mod device;
mod entry;
mod error;
mod gate;
mod keys;
mod outbox;
mod records;
mod replica;
mod writer;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use ringpost_wire::{DeviceId, MsgId, UserId};
use tokio::sync::{mpsc, oneshot, Notify};

pub use bodies::GroupBodyCounters;
pub use device::ACKED_ABOVE_MAX;
pub use entry::{Entry, EntryHeader, EntryKind};
pub use error::InboxError;
pub use outbox::{receipt_id, OutboxReceipt, OUTBOX_DEVICE};
pub use writer::{TRIM_DEVICES_PER_PASS, TRIM_POINT_DELETES_MAX, TRIM_SEQS_MIN};

use crate::shard::{shard_of, ShardId, SHARD_COUNT_DEFAULT};
use crate::shard_rows::{self, Row};
use crate::storage::{key, prefix_end, successor, Cf, Engine, StorageError};
use cache::DeviceCache;
use device::Stored;
use gate::ShardGate;
/// Length of a device's prefix in [`Cf::Inbox`](crate::storage::Cf::Inbox): the family's
/// prefix extractor and bloom filters use it.
pub(crate) use keys::DEVICE_PREFIX_LEN;
use keys::{device_prefix, inbox_key, parse_inbox_key, parse_meta_key};
use records::DedupRecord;
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
    // A hand-off carries any entry the inbox stores.
    assert!(2 * APPEND_BYTES_MAX <= crate::shard_rows::ROW_VALUE_BYTES_MAX);
};

/// Default of [`InboxConfig::retention_ms`]: unacked entries expire after 30 days.
pub const RETENTION_MS_DEFAULT: u64 = 30 * DAY_MS;
/// Default of [`InboxConfig::dedup_window_ms`]: the retry horizon the protocol promises (a
/// `Send` repeated within a day gets the original `SendAck`). Disk: one record of about 60
/// bytes per message for that long, e.g. ~100 GB at a sustained 20k msgs/s, ~6 GB at 1k/s.
pub const DEDUP_WINDOW_MS_DEFAULT: u64 = DAY_MS;
/// Default of [`InboxConfig::device_quota`]. Disk: up to this many entries of up to
/// [`ENTRY_BODY_BYTES_MAX`] per device (a few MiB for typical 1 KiB messages).
pub const DEVICE_QUOTA_DEFAULT: u64 = 50_000;
/// Default of [`InboxConfig::device_cache_max`]. Memory: about 100 bytes per device (more for
/// one with out-of-order acks waiting, at most [`ACKED_ABOVE_MAX`] × 8 bytes), so ~25 MiB.
pub const DEVICE_CACHE_MAX_DEFAULT: usize = 256 * 1024;
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

/// Called by the writer for every entry it stored, once the write is done: `(user, device,
/// seq, entry)`, in seq order per device. The node hands it to the device's connection, which
/// then delivers it without reading it back. Runs on the writer thread: keep it cheap and
/// never block.
pub type StoredHook = Arc<dyn Fn(UserId, DeviceId, u64, &Entry) + Send + Sync>;

/// Called for every device a group commit reported failed had entries for: the batch may be on
/// disk all the same (an fsync that failed after the WAL append), so the device's connection
/// should read its inbox again rather than wait for the next entry handed to it. The node wakes
/// the connection ([`crate::registry::Registry::wake`]).
pub type UnsureHook = Arc<dyn Fn(UserId, DeviceId) + Send + Sync>;

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
    /// Devices whose counters the writer keeps in memory between groups.
    pub device_cache_max: usize,
    /// Metrics hook, see [`CommitObserver`].
    pub observer: Option<CommitObserver>,
    /// Delivery hook, see [`StoredHook`].
    pub on_stored: Option<StoredHook>,
    /// See [`UnsureHook`].
    pub on_unsure: Option<UnsureHook>,
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
            device_cache_max: DEVICE_CACHE_MAX_DEFAULT,
            observer: None,
            on_stored: None,
            on_unsure: None,
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
            .field("device_cache_max", &self.device_cache_max)
            .field("observer", &self.observer.is_some())
            .field("on_stored", &self.on_stored.is_some())
            .field("on_unsure", &self.on_unsure.is_some())
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
            (
                self.device_cache_max > 0,
                "device_cache_max must be positive",
            ),
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
    /// the inbox (to `now_ms` and `now_ms + retention`, or the entry's own non-zero
    /// `expires_at_ms` if that is sooner: a status's). May be empty: a deduped append then only
    /// records its key.
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

/// A device acknowledging entries: see [`Inbox::ack_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRequest {
    pub user: UserId,
    pub device: DeviceId,
    /// The seqs, each with its entry's header when the caller knows it (it delivered the
    /// entry); an unknown header is read back from disk.
    pub seqs: Vec<(u64, Option<EntryHeader>)>,
    /// Senders whose devices this node may store a `delivered` receipt for in the ack's own
    /// batch, with their device lists (users it owns and serves). Receipts to anyone else go
    /// to the acking user's outbox.
    pub senders: Vec<(UserId, Vec<DeviceId>)>,
    pub now_ms: u64,
}

/// One entry acknowledged by [`Inbox::ack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub seq: u64,
    pub kind: EntryKind,
    pub from_user: UserId,
    pub from_device: DeviceId,
    pub msg_id: MsgId,
    /// The first ack of this message by any device of the recipient: its `delivered` receipt
    /// was written with the ack. Only ever set for messages from another user.
    pub first_ack: bool,
}

/// Users whose receipt outbox has rows to send: filled by the writer after each commit that
/// wrote some (and at start, and by hand-off imports), taken by the node's outbox task.
#[derive(Default)]
pub struct OutboxQueue {
    pending: Mutex<BTreeSet<UserId>>,
    notify: Notify,
}

impl OutboxQueue {
    fn add(&self, users: impl IntoIterator<Item = UserId>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let before = pending.len();
        pending.extend(users);
        if pending.len() > before {
            self.notify.notify_one();
        }
    }

    /// Waits until some user's outbox has rows, then takes the set of such users.
    pub async fn next(&self) -> BTreeSet<UserId> {
        loop {
            let taken =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
            if !taken.is_empty() {
                return taken;
            }
            self.notify.notified().await;
        }
    }

    /// Puts users back whose rows could not be sent yet (retried on the next [`Self::next`]).
    pub fn retry_later(&self, users: impl IntoIterator<Item = UserId>) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(users);
    }
}

/// What one expiry pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ExpireReport {
    entries: u64,
    dedup_records: u64,
    bodies: u64,
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
    outbox: Arc<OutboxQueue>,
    bodies: Arc<GroupBodyCounters>,
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
    /// Loads the entry count (and the users with receipts in their outbox) and starts the
    /// writer thread.
    pub fn start(engine: Arc<dyn Engine>, config: InboxConfig) -> Result<Inbox, InboxError> {
        config.validate()?;
        let mut outbox_users = Vec::new();
        let total = count_entries_in(&*engine, &[], &[0xff, 0xff], &mut outbox_users)?;
        let entries_total = Arc::new(AtomicU64::new(total));
        let gate = Arc::new(ShardGate::new(config.shard_count));
        let health = Arc::new(StorageHealth::default());
        let outbox = Arc::new(OutboxQueue::default());
        outbox.add(outbox_users);
        let bodies = Arc::new(GroupBodyCounters::default());
        let (tx, rx) = mpsc::channel(config.queue_depth);
        let writer = Writer {
            engine: Arc::clone(&engine),
            config: config.clone(),
            entries_total: Arc::clone(&entries_total),
            gate: Arc::clone(&gate),
            rx,
            health: Arc::clone(&health),
            outbox: Arc::clone(&outbox),
            cache: DeviceCache::new(config.device_cache_max),
            bodies: Arc::clone(&bodies),
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
                outbox,
                bodies,
            }),
        })
    }

    /// Counters of group message bodies stored once per shard (for metrics).
    pub fn group_bodies(&self) -> &GroupBodyCounters {
        &self.inner.bodies
    }

    /// Stores entries for devices of one user, all or nothing; returns once they are durable.
    pub async fn append(&self, append: Append) -> Result<AppendOutcome, InboxError> {
        validate_append(&append)?;
        self.call(|reply| Request::Append { append, reply }).await
    }

    /// Acknowledges the given entries of this device (seqs not pending are ignored), reading
    /// their headers back, with every receipt going to the outbox. See [`Inbox::ack_with`].
    pub async fn ack(
        &self,
        user: UserId,
        device: DeviceId,
        seqs: Vec<u64>,
        now_ms: u64,
    ) -> Result<Vec<Acked>, InboxError> {
        self.ack_with(AckRequest {
            user,
            device,
            seqs: seqs.into_iter().map(|s| (s, None)).collect(),
            senders: Vec::new(),
            now_ms,
        })
        .await
    }

    /// Acknowledges entries of a device: moves its floor (the entries are removed in bulk
    /// later) and writes the `delivered` receipt of every message this makes a first ack, in
    /// the same batch. Says which entries were acknowledged and which of them were first acks.
    ///
    /// The write is not synced: a crash may lose it, and the entries (with their receipts still
    /// owed) are then delivered again. It is durable once any later synced write is.
    pub async fn ack_with(&self, ack: AckRequest) -> Result<Vec<Acked>, InboxError> {
        if ack.seqs.len() > ACK_SEQS_MAX {
            return Err(InboxError::LimitExceeded {
                what: "acked seqs",
                len: ack.seqs.len(),
                max: ACK_SEQS_MAX,
            });
        }
        if ack.senders.len() > ACK_SEQS_MAX {
            return Err(InboxError::LimitExceeded {
                what: "receipt senders",
                len: ack.senders.len(),
                max: ACK_SEQS_MAX,
            });
        }
        if ack.seqs.is_empty() {
            return Ok(Vec::new());
        }
        self.call(|reply| Request::Ack { ack, reply }).await
    }

    /// Range-deletes acknowledged entries that linger below the floors of devices no write
    /// touched since the previous call (up to [`TRIM_DEVICES_PER_PASS`] devices a call; active
    /// devices are trimmed by their own acks). Returns how many devices it trimmed.
    pub async fn trim(&self) -> Result<u64, InboxError> {
        self.call(|reply| Request::Trim {
            reply,
            devices: Vec::new(),
        })
        .await
    }

    /// The users whose receipt outbox has rows to send.
    pub fn outbox(&self) -> &OutboxQueue {
        &self.inner.outbox
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

    /// Writes one chunk of hand-off rows of `shard` (of any [`crate::shard_rows::SHARD_CFS`] family, as
    /// exported by its old owner) in one batch, NOT synced: an import ends with
    /// [`Inbox::sync_barrier`] ([`crate::handoff::finish_import`]). Rows are checked with
    /// [`crate::shard_rows::validate_rows`] first (call it yourself to learn why rows are refused);
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
        if let Err(err) = shard_rows::validate_rows(shard, &rows) {
            tracing::warn!(%err, shard, "refusing hand-off rows");
            return Err(InboxError::Invalid("hand-off rows failed validation"));
        }
        self.call(|reply| Request::Import { shard, rows, reply })
            .await
    }

    /// Deletes every row of `shard` in every [`crate::shard_rows::SHARD_CFS`] family (range deletes, one
    /// synced write) and subtracts what its counters held from [`Inbox::entries_total`], which
    /// it returns. Close the shard first ([`Inbox::set_writable`]): an append committed after
    /// the drop would stay behind. [`crate::handoff::drop_shard`] also updates the accounts cache.
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

    /// Up to `limit` (at most [`READ_ENTRIES_MAX`]) unexpired, unacknowledged entries of a
    /// device with `seq > after_seq`, in seq order. Reads the engine on the caller's thread:
    /// the device's counters, then its entries from the floor up.
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
        let prefix = device_prefix(shard, user, device);
        let stored = match self.inner.engine.get(Cf::InboxMeta, &prefix)? {
            Some(bytes) => Stored::decode(&bytes)?,
            None => return Ok(Vec::new()),
        };
        let first_seq = first_seq.max(stored.read_floor().saturating_add(1));
        let end = prefix_end(&prefix);
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
                if !stored.may_deliver(seq) {
                    // Acknowledged out of order, not yet below the floor.
                    continue;
                }
                let (mut entry, by_ref) = Entry::decode_stored(Bytes::from(value))?;
                if entry.expires_at_ms > now_ms {
                    if by_ref {
                        let body_key = bodies::count_key(shard, &entry.body)
                            .map(|count| bodies::body_row_key(&count))
                            .unwrap_or_default();
                        let Some(body) = self.inner.engine.get(Cf::GroupBodies, &body_key)? else {
                            // Only a bug or a partial hand-off import leaves this: the entry
                            // cannot be delivered, and waits for its expiry.
                            tracing::error!(user, device, seq, "a group message's body is gone");
                            continue;
                        };
                        entry.body = Bytes::from(body);
                    }
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
    /// the writer. First the expiry index ([`Cf::InboxExpiry`]): per shard, only the rows of
    /// entries expired by `now_ms`, so an entry that expires before the retention (a status)
    /// goes in the first call after its expiry even when older entries of its device are still
    /// pending. Then it scans every stored entry key once per call except that, within a device,
    /// it stops at the first unexpired entry (entries of one retention expire in seq order
    /// unless the clock went back, which only delays their deletion; reads skip them anyway),
    /// and scans every dedup
    /// record unless the engine drops expired ones itself ([`Engine::drops_expired_dedup`]:
    /// RocksDB does, in compaction). The scans run on the caller's thread, [`EXPIRE_CHUNK_KEYS_MAX`] keys at a time.
    ///
    /// Returns how many entries were deleted (dedup records are only logged).
    pub async fn expire(&self, now_ms: u64) -> Result<usize, InboxError> {
        let report = self.expire_report(now_ms).await?;
        tracing::debug!(
            entries = report.entries,
            dedup_records = report.dedup_records,
            group_bodies = report.bodies,
            "inbox expiry"
        );
        Ok(usize::try_from(report.entries).unwrap_or(usize::MAX))
    }

    async fn expire_report(&self, now_ms: u64) -> Result<ExpireReport, InboxError> {
        let mut report = ExpireReport::default();
        for shard in 0..self.inner.config.shard_count {
            report.entries += self
                .expire_scan(
                    Cf::InboxExpiry,
                    key(shard, &[]),
                    &keys::expiry_range_end(shard, now_ms),
                    // The range holds only rows expired by `now_ms`.
                    |_| true,
                    |keys, reply| Request::ExpireIndexed {
                        keys,
                        now_ms,
                        reply,
                    },
                )
                .await?;
        }

        // Above every shard-prefixed key: shard ids are below u16::MAX.
        let end = [0xff, 0xff];
        let mut from = Vec::new();
        loop {
            // A pass reads every stored key: let the runtime's other tasks (connections) run
            // between pages.
            tokio::task::yield_now().await;
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

        // Shared bodies past their expiry (a backstop: their entries released them). Only the
        // count rows are scanned, shard by shard.
        for shard in 0..self.inner.config.shard_count {
            let (from, to) = bodies::count_range(shard);
            report.bodies += self
                .expire_scan(
                    Cf::GroupBodies,
                    from,
                    &to,
                    |value| {
                        bodies::BodyCount::decode(value).is_ok_and(|c| c.expires_at_ms <= now_ms)
                    },
                    |keys, reply| Request::ExpireBodies {
                        keys,
                        now_ms,
                        reply,
                    },
                )
                .await?;
        }

        if self.inner.engine.drops_expired_dedup() {
            return Ok(report);
        }
        report.dedup_records += self
            .expire_scan(
                Cf::Dedup,
                Vec::new(),
                &end,
                |value| DedupRecord::decode(value).is_ok_and(|r| !r.is_live(now_ms)),
                |keys, reply| Request::ExpireDedup {
                    keys,
                    now_ms,
                    reply,
                },
            )
            .await?;
        Ok(report)
    }

    /// Pages through `[from, to)` of `cf`, a bounded page at a time (yielding between pages),
    /// and has the writer delete the keys whose values `expired` says are past their time;
    /// returns how many it deleted (the writer checks each again under its lock).
    async fn expire_scan(
        &self,
        cf: Cf,
        mut from: Vec<u8>,
        to: &[u8],
        expired: impl Fn(&[u8]) -> bool,
        request: impl Fn(Vec<Vec<u8>>, Reply<u64>) -> Request,
    ) -> Result<u64, InboxError> {
        let mut deleted = 0;
        loop {
            tokio::task::yield_now().await;
            let page = self
                .inner
                .engine
                .scan(cf, &from, to, EXPIRE_CHUNK_KEYS_MAX)?;
            let Some((last, _)) = page.last() else { break };
            let next = successor(last);
            let done = page.len() < EXPIRE_CHUNK_KEYS_MAX;
            let keys: Vec<Vec<u8>> = page
                .into_iter()
                .filter(|(_, value)| expired(value))
                .map(|(key, _)| key)
                .collect();
            if !keys.is_empty() {
                deleted += self.call(|reply| request(keys, reply)).await?;
            }
            if done {
                break;
            }
            from = next;
        }
        Ok(deleted)
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

/// Pending entries on disk (above their device's floor, not acknowledged out of order); the
/// acknowledged ones may linger until trimmed. For tests that check the counters.
#[cfg(test)]
pub(crate) fn pending_entries_on_disk(engine: &dyn Engine) -> u64 {
    let mut pending = 0;
    for (key, _) in engine
        .scan(Cf::Inbox, &[], &[0xff, 0xff], usize::MAX)
        .unwrap()
    {
        let (shard, user, device, seq) = parse_inbox_key(&key).unwrap();
        let meta = engine
            .get(Cf::InboxMeta, &device_prefix(shard, user, device))
            .unwrap()
            .expect("an entry without counters");
        if Stored::decode(&meta).unwrap().may_deliver(seq) {
            pending += 1;
        }
    }
    pending
}

/// Sums the pending entries of every device, in pages.
#[cfg(test)]
fn count_entries(engine: &dyn Engine) -> Result<u64, StorageError> {
    // Above every shard-prefixed key: shard ids are below u16::MAX.
    count_entries_in(engine, &[], &[0xff, 0xff], &mut Vec::new())
}

/// Sums the pending entries of the devices whose counters' keys are in `[from, end)`, in
/// pages, and collects the users whose receipt outbox has rows.
fn count_entries_in(
    engine: &dyn Engine,
    from: &[u8],
    end: &[u8],
    outbox_users: &mut Vec<UserId>,
) -> Result<u64, StorageError> {
    const PAGE: usize = 4096;
    let mut from = from.to_vec();
    let mut total = 0u64;
    loop {
        let page = engine.scan(Cf::InboxMeta, &from, end, PAGE)?;
        for (key, value) in &page {
            let Some((_, user, device)) = parse_meta_key(key) else {
                return Err(codec::corrupt("inbox_meta", "malformed meta key"));
            };
            let pending = Stored::decode(value)?.pending();
            total = total.saturating_add(pending);
            if device == OUTBOX_DEVICE && pending > 0 {
                outbox_users.push(user);
            }
        }
        match page.last() {
            Some((last, _)) if page.len() == PAGE => from = successor(last),
            _ => return Ok(total),
        }
    }
}

#[cfg(test)]
mod tests;
