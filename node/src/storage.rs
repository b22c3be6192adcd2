//! The narrow storage interface every shard service is written against.
//!
//! One database per node, one column family per service ([`Cf`]). Every key starts with the
//! shard id as a big-endian `u16` so that a shard is one contiguous range in every family:
//! hand-off is a range scan, dropping a shard is a range delete. The exceptions are node-local:
//! [`Cf::Meta`], and [`Cf::BodyStore`], which only the RocksDB engine writes, to store each
//! group message body once per node behind the logical [`Cf::GroupBodies`] rows.
//!
//! Two engines implement [`Engine`]: [`rocks::RocksEngine`] (the real one) and
//! [`mem::MemEngine`] (for unit tests of the services); both pass the same conformance suite
//! (`storage/suite.rs`).

pub mod mem;
pub mod rocks;
#[cfg(test)]
pub(crate) mod suite;

use crate::shard::ShardId;

/// The column families of a node's database. The set is fixed: adding one is a schema change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    /// `shard | user` → account record (devices, token hashes, registration lock);
    /// `shard | user | 0x01 | device` → the device's push token ([`crate::accounts`]).
    Accounts,
    /// `shard | phone` → pending verification code; `shard | user | 0xff | code` → link code.
    Verify,
    /// `shard | user | device | seq` → inbox entry.
    Inbox,
    /// `shard | user | device` → inbox counters (next seq, entry count).
    InboxMeta,
    /// `shard | to user | sender user | sender device | msg_id` → the `SendAck` given, for the
    /// dedup window.
    ///
    /// Contract with the engines: every value starts with its expiry, a big-endian `u64` of
    /// milliseconds since the Unix epoch. An engine may drop a record once that time has passed
    /// (RocksDB does so in a compaction filter), so readers must treat an expired record as absent.
    Dedup,
    /// `shard | user | device | kind | id` → prekeys.
    Prekeys,
    /// `shard | 0x00` → the shard's log position: the last LSN of the shard's replication log
    /// this node's copy includes, and its epoch ([`crate::replication::Position`]). Written
    /// only by the replication layer (the primary's [`crate::replication::ReplicatingEngine`],
    /// a replica's [`crate::replication::apply`]); moves with the shard in a hand-off.
    ShardLog,
    /// Node-local metadata (`shard` prefix unused): schema version, node id.
    Meta,
    /// `shard | user | kind | ...` → contacts, blocks, privacy and last seen
    /// ([`crate::contacts`]).
    Contacts,
    /// `shard | group | 0x00` → the group's state (members, admins, meta, settings, sequence,
    /// invite code); `shard | group | 0x01 | sender user | sender device | msg_id` → the group
    /// sequence a `GroupSend` got (send dedup). See [`crate::groups`].
    Groups,
    /// `shard | group | seq` → a group change or message not yet fanned out to every member
    /// (the durable fan-out log); deleted once every member's owner stored it.
    GroupLog,
    /// `shard | 0x00 | group | group_seq` → how many inbox entries of the shard refer to a
    /// group message's body; `shard | 0x01 | group | group_seq` → that body, stored once per
    /// shard. Both are deleted when the count drops to zero (`inbox/bodies.rs`).
    ///
    /// These are the logical rows every caller reads and writes (and hand-off and replication
    /// move). The RocksDB engine keeps one physical copy of a body per node: the shard's body
    /// row holds an empty marker and the body lives in [`Cf::BodyStore`]; its reads return the
    /// body, so no caller sees the marker.
    GroupBodies,
    /// `shard | expires_at_ms | user | device | seq` → empty: the inbox's expiry index, one row
    /// per entry that expires before the retention (a status), written and deleted in the same
    /// batch as its entry, so the periodic expiry finds it by time, not behind older entries.
    InboxExpiry,
    /// Node-local, no shard prefix: the RocksDB engine's one copy per node of each group
    /// message body that [`Cf::GroupBodies`] body rows refer to (`storage/rocks/bodies.rs`):
    /// `0x00 | group | group_seq` → how many shard body rows of this node refer to it;
    /// `0x01 | group | group_seq` → the body. Written only by the engine, inside the batch that
    /// writes the shard rows; never part of a shard (not in hand-off, replication or
    /// snapshots, which carry the logical rows). The in-memory engine does not use it.
    BodyStore,
    /// Node-local, no shard prefix: the wake-up pushes waiting to be sent ([`crate::push`]),
    /// `user | device` → attempts, when it is due and when its message was stored. At most one
    /// row per device; it never travels with a shard (a push queued here for a user whose shard
    /// moved is dropped when its turn comes).
    PushQueue,
}

impl Cf {
    pub const ALL: [Cf; 15] = [
        Cf::Accounts,
        Cf::Verify,
        Cf::Inbox,
        Cf::InboxMeta,
        Cf::Dedup,
        Cf::Prekeys,
        Cf::ShardLog,
        Cf::Meta,
        Cf::Contacts,
        Cf::Groups,
        Cf::GroupLog,
        Cf::GroupBodies,
        Cf::InboxExpiry,
        Cf::BodyStore,
        Cf::PushQueue,
    ];

    /// The column family's name in RocksDB.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Accounts => "accounts",
            Cf::Verify => "verify",
            Cf::Inbox => "inbox",
            Cf::InboxMeta => "inbox_meta",
            Cf::Dedup => "dedup",
            Cf::Prekeys => "prekeys",
            Cf::ShardLog => "shard_log",
            Cf::Meta => "meta",
            Cf::Contacts => "contacts",
            Cf::Groups => "groups",
            Cf::GroupLog => "group_log",
            Cf::GroupBodies => "group_bodies",
            Cf::InboxExpiry => "inbox_expiry",
            Cf::BodyStore => "body_store",
            Cf::PushQueue => "push_queue",
        }
    }
}

/// The tag of a [`Cf::GroupBodies`] body row (`shard | tag | group | group_seq`); count rows
/// have tag 0.
pub(crate) const GROUP_BODY_TAG: u8 = 1;
/// Bytes of `group [16] | group_seq u64`: what names a group message's body.
pub(crate) const GROUP_BODY_REF_LEN: usize = 16 + 8;

/// The `group | group_seq` a [`Cf::GroupBodies`] key names if it is a body row key; `None` for
/// a count row or any other key.
pub(crate) fn group_body_ref(key: &[u8]) -> Option<&[u8]> {
    (key.len() == 2 + 1 + GROUP_BODY_REF_LEN && key[2] == GROUP_BODY_TAG).then(|| &key[3..])
}

/// One mutation in a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
    /// Deletes every key in `[from, to)`.
    DeleteRange {
        cf: Cf,
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

/// Mutations applied atomically by [`Engine::write`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<Op>,
    /// The node managing its own copy of shards it does not serve: a hand-off import into a
    /// shard not served yet, or the drop of a copy it no longer holds. A replicating engine
    /// writes such a batch as it is, with no log record: nothing is shipped, no LSN moves
    /// (the positions it carries or deletes are written as they are).
    pub local: bool,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put {
            cf,
            key: key.into(),
            value: value.into(),
        });
    }
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete {
            cf,
            key: key.into(),
        });
    }
    pub fn delete_range(&mut self, cf: Cf, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        self.ops.push(Op::DeleteRange {
            cf,
            from: from.into(),
            to: to.into(),
        });
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// Why storage failed. Every variant but [`StorageError::Replication`] means "nothing was made
/// durable by this call".
///
/// `Clone` so that one failed group commit can report the same error to every request in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// The device is full; writes fail until space is freed.
    #[error("storage is full: {0}")]
    NoSpace(String),
    /// An I/O error, including a failed fsync: the database stops accepting writes.
    #[error("storage I/O error: {0}")]
    Io(String),
    /// Stored bytes did not decode.
    #[error("corrupt record in {cf}: {detail}")]
    Corrupt { cf: &'static str, detail: String },
    /// Anything else the engine reports.
    #[error("storage error: {0}")]
    Other(String),
    /// The write is durable on this node, but it was not confirmed to have reached the shard's
    /// replicas ([`crate::replication::ReplicatingEngine`]). The caller must treat it as a
    /// failure and acknowledge nothing: a client's retry is then a duplicate (at-least-once),
    /// and the replicas detect the missing record as a gap and catch up.
    #[error("not replicated: {0}")]
    Replication(String),
    /// Refused before anything was written: the batch touches a shard this node is not the
    /// primary of at its ring epoch ([`crate::replication::ReplicatingEngine::set_ring`]; the
    /// shard moved while the batch was being built). Nothing is wrong with the disk.
    #[error("not written: {0}")]
    NotPrimary(String),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A key-value engine with column families, atomic batches and ordered scans.
pub trait Engine: Send + Sync + 'static {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Applies `batch` atomically. With `sync`, returns only once the batch is durable (the WAL
    /// is fsynced); callers batch many logical writes into one synced write. A synced write
    /// also makes every write that returned before it durable (the WAL is one append-only log),
    /// and that holds for an empty batch too: it is how a barrier syncs earlier unsynced writes.
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()>;

    /// Up to `limit` pairs with `from <= key < to`, in key order.
    fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize)
        -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// The last pair with `from <= key < to`, if any.
    fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>>;

    /// Whether the engine drops expired [`Cf::Dedup`] records by itself (in compaction, by
    /// the expiry at the front of each value), so the inbox's periodic expiry need not scan
    /// them: at production rates that family holds a day of records, billions of keys.
    fn drops_expired_dedup(&self) -> bool {
        false
    }

    /// After a failed durable write, makes the engine take writes again if it can (RocksDB:
    /// reopen the database); an error if it cannot yet (e.g. the disk is still full). Engines
    /// that never refuse writes after a failure do nothing.
    fn recover(&self) -> Result<()> {
        Ok(())
    }
}

/// The exclusive upper bound of all keys starting with `prefix`: the prefix with its last
/// non-`0xff` byte incremented and everything after it removed.
///
/// Edge case: a prefix made only of `0xff` bytes (or empty) has no finite bound. The result is
/// then `0xff` repeated `prefix.len() + 1` times, which covers the keys with that prefix except
/// those continuing with another `0xff`. Keys built by [`key`] never hit this: shard ids are
/// below `u16::MAX`, so their first two bytes are never both `0xff`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes: every key with this prefix sorts before a longer run of 0xff.
    vec![0xff; prefix.len() + 1]
}

/// The smallest key after `key`: a scan resuming after `key` starts here.
pub fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

/// Builds a key: the shard id first, big-endian, then the given parts.
pub fn key(shard: ShardId, parts: &[&[u8]]) -> Vec<u8> {
    let len = 2 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut k = Vec::with_capacity(len);
    k.extend_from_slice(&shard.to_be_bytes());
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}
