//! Groups: a group lives on its own shard (the shard of its id's first 8 bytes, hashed like a
//! user id), and that shard's owner keeps its state and its durable fan-out log.
//!
//! - [`state`]: one group's state and the rules that change it, sans-IO.
//! - [`Groups`] (here): the storage of states, send dedup and the fan-out log, one synced
//!   write per operation, serialised per group.
//! - [`serve`]: the requests of devices (`GroupCreate`, `GroupUpdate`, `GroupInfoRequest`,
//!   `GroupSend`), executed here when this node owns the group, else forwarded to its owner
//!   over the peer link ([`crate::peer::PeerRequest::Group`]).
//! - [`blocks`]: a create or an add asks the added users' owners whether they block the
//!   actor, before the group's lock is taken.
//! - [`receipts`]: members' delivered and read watermarks, aggregated into one receipt per
//!   sender once every member passed its messages.
//! - [`typing`]: a member's typing indicator, sent on to the other members' nodes.
//! - [`fanout`]: drains each group's log in sequence order, one peer batch per destination
//!   node, until every member's owner stored the record (a member whose owner is unreachable
//!   is retried later, without holding up the others); resumes from the log after a restart
//!   or when the shard comes to this node.
//!
//! Every change and every message takes the next group sequence number and is one record in
//! the log; a record is acknowledged (the creator's `GroupInfo`, the sender's `SendAck`) once
//! it is durable (synced, and replicated when the node replicates), and delivered to members'
//! inboxes afterwards, in order.

pub mod blocks;
pub mod fanout;
pub mod receipts;
pub mod serve;
pub mod state;
pub mod typing;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use ringpost_wire::limits::GROUP_INVITE_CODE_BYTES;
use ringpost_wire::{
    DeviceId, ErrorCode, Frame, GroupEvent, GroupId, GroupInfo, GroupUpdate, MsgId, UserId,
};
use serde::{Deserialize, Serialize};

use crate::shard::{shard_of, ShardId};
use crate::storage::{key, prefix_end, Cf, Engine, StorageError, WriteBatch};
use state::GroupState;

/// How long a `GroupSend`'s (sender device, msg_id) is remembered: a resend within this
/// window gets the same `SendAck` and is not sequenced again (the 1:1 retry horizon).
pub const GROUP_SEND_DEDUP_MS: u64 = 24 * 60 * 60 * 1000;
/// Expired send-dedup rows one send prunes (with their index rows). Each send adds one, so
/// a group's dedup rows stay bounded by its sends in one window plus this slack.
pub const GROUP_DEDUP_PRUNE_MAX: usize = 16;
/// Per-group locks are striped over this many mutexes (a read-modify-write of one group's
/// row holds one; unrelated groups rarely share one).
const LOCK_STRIPES: usize = 64;

/// Row tags inside a group's key range in [`Cf::Groups`].
const TAG_STATE: u8 = 0;
const TAG_DEDUP: u8 = 1;
const TAG_DEDUP_BY_EXPIRY: u8 = 2;

/// Why a group operation failed. Each maps to a stable wire code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupError {
    #[error("no such group")]
    NotFound,
    /// The asker is not a member (answered like `NotFound` would leak nothing more: the
    /// group id is a random secret shared by its members).
    #[error("not a member of this group")]
    NotMember,
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("limit exceeded: {0}")]
    LimitExceeded(&'static str),
    #[error("malformed: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl GroupError {
    pub fn code(&self) -> ErrorCode {
        match self {
            GroupError::NotFound => ErrorCode::NotFound,
            GroupError::NotMember | GroupError::Forbidden(_) => ErrorCode::Forbidden,
            GroupError::LimitExceeded(_) => ErrorCode::LimitExceeded,
            GroupError::Malformed(_) => ErrorCode::Malformed,
            GroupError::Storage(_) => ErrorCode::StorageUnavailable,
        }
    }
}

/// The id groups are routed by: the first 8 bytes of the group id, as a user id is.
pub fn route_id(group: &GroupId) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&group[..8]);
    u64::from_be_bytes(b)
}

/// The hook a group add asks: may `adder` add `added` to a group? Called on the group's
/// owner, with the group's lock held, so it must answer from local state without waiting;
/// none is installed by default. Blocking is not checked here (block lists live on the added
/// users' owners): [`blocks::check_adds`] asks them before the request takes the lock.
pub type AddPolicy = Arc<dyn Fn(UserId, UserId) -> bool + Send + Sync>;

/// What a group message or change carries through the log to members' inboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogBody {
    /// A `GroupSend`: one sender-key ciphertext for all.
    Message {
        from_user: UserId,
        from_device: DeviceId,
        msg_id: MsgId,
        body: Vec<u8>,
    },
    /// A change: an encoded `GroupEvent` frame, sent by `actor`.
    Event { actor: UserId, frame: Vec<u8> },
    /// An aggregated receipt for one sender (its only pending user): every member passed
    /// these messages ([`receipts`]). Logged after the record at `seq`, numbered `number`.
    Receipt {
        kind: receipts::Kind,
        number: u64,
        /// The highest group seq among `msg_ids`.
        up_to_seq: u64,
        /// At most `RECEIPT_MSG_IDS_MAX`.
        msg_ids: Vec<MsgId>,
    },
}

/// One record of a group's fan-out log (`Cf::GroupLog`, `shard | group | seq`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub group: GroupId,
    pub seq: u64,
    pub server_time_ms: u64,
    pub body: LogBody,
    /// Users whose owner has not stored it yet (the members when it was sequenced, plus the
    /// removed ones for a change that removed them). Shrinks as the fan-out progresses.
    pub pending: Vec<UserId>,
}

impl LogRecord {
    fn encode(&self) -> Result<Vec<u8>, StorageError> {
        postcard::to_allocvec(self).map_err(|e| StorageError::Other(e.to_string()))
    }
    pub fn decode(bytes: &[u8]) -> Result<LogRecord, StorageError> {
        postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt {
            cf: "group_log",
            detail: e.to_string(),
        })
    }
}

/// What a `GroupSend` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Sequenced at `seq` and durable in the log.
    New { seq: u64, server_time_ms: u64 },
    /// The same (sender device, msg_id) was sequenced before, at `seq`.
    Duplicate { seq: u64, server_time_ms: u64 },
}

/// Counters of the group service, rendered as `ringpost_group_*`.
#[derive(Debug, Default)]
pub struct GroupMetrics {
    pub created: AtomicU64,
    pub updates: AtomicU64,
    pub sends: AtomicU64,
    pub sends_duplicate: AtomicU64,
    pub refused: AtomicU64,
    pub forwarded: AtomicU64,
    pub log_records_done: AtomicU64,
    pub fanout_batches: AtomicU64,
    pub fanout_member_stores: AtomicU64,
    pub fanout_retries: AtomicU64,
    pub receipts: AtomicU64,
    pub receipts_aggregated: AtomicU64,
    pub adds_blocked: AtomicU64,
    pub typing: AtomicU64,
}

impl GroupMetrics {
    /// Appends the counters in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let counters: [(&str, &str, &AtomicU64); 14] = [
            ("created", "Groups created.", &self.created),
            ("updates", "Group changes applied.", &self.updates),
            ("sends", "Group messages sequenced.", &self.sends),
            (
                "sends_duplicate",
                "Group sends answered from the dedup record.",
                &self.sends_duplicate,
            ),
            ("refused", "Group requests refused.", &self.refused),
            (
                "forwarded",
                "Group requests forwarded to the group's owner.",
                &self.forwarded,
            ),
            (
                "log_records_done",
                "Fan-out log records stored for every member and deleted.",
                &self.log_records_done,
            ),
            (
                "fanout_batches",
                "Fan-out batches sent to another node (one per destination node per record).",
                &self.fanout_batches,
            ),
            (
                "fanout_member_stores",
                "Member inbox stores made by fan-outs (one per member per record).",
                &self.fanout_member_stores,
            ),
            (
                "fanout_retries",
                "Fan-out retry sweeps for members left pending.",
                &self.fanout_retries,
            ),
            (
                "receipts",
                "GroupReceipt watermarks recorded by the group's owner.",
                &self.receipts,
            ),
            (
                "receipts_aggregated",
                "Aggregated receipts logged for senders (one per sender, kind and batch of ids).",
                &self.receipts_aggregated,
            ),
            (
                "adds_blocked",
                "Group creates and adds refused because an added user blocks the actor.",
                &self.adds_blocked,
            ),
            (
                "typing",
                "Group typing indicators sent on by the group's owner.",
                &self.typing,
            ),
        ];
        crate::metrics::write_counters(out, "ringpost_group_", "_total", &counters);
    }
}

/// The group service: states, send dedup and the fan-out log of the groups this node owns.
pub struct Groups {
    engine: Arc<dyn Engine>,
    shard_count: u16,
    locks: Vec<Mutex<()>>,
    add_policy: OnceLock<AddPolicy>,
    /// Per group, the lowest seq of a log write not known durable (in flight, or failed to
    /// sync or replicate): the fan-out delivers only records below it. A later synced write
    /// of the group clears it (replicas take a shard's records in order and refuse gaps, so
    /// its success proves the earlier ones are held too), as does [`fanout::resume`].
    undurable: Mutex<std::collections::HashMap<GroupId, u64>>,
    pub metrics: GroupMetrics,
}

impl Groups {
    pub fn new(engine: Arc<dyn Engine>, shard_count: u16) -> Groups {
        Groups {
            engine,
            shard_count,
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            add_policy: OnceLock::new(),
            undurable: Mutex::new(std::collections::HashMap::new()),
            metrics: GroupMetrics::default(),
        }
    }

    fn undurable_map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<GroupId, u64>> {
        self.undurable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes a batch that logs `group`'s records from `seq` on, synced (and replicated on a
    /// replicating node); until it has returned Ok the fan-out leaves those records alone.
    fn write_logged(&self, group: &GroupId, seq: u64, batch: WriteBatch) -> Result<(), GroupError> {
        {
            let mut undurable = self.undurable_map();
            let from = undurable.entry(*group).or_insert(seq);
            *from = (*from).min(seq);
        }
        self.engine.write(batch, true)?;
        self.undurable_map().remove(group);
        Ok(())
    }

    /// The lowest seq of `group`'s log not known durable on this node, if any.
    pub fn undurable_from(&self, group: &GroupId) -> Option<u64> {
        self.undurable_map().get(group).copied()
    }

    /// Forgets what was not known durable of `group` (its shard's log became this node's:
    /// what is on disk now is the durable copy).
    pub fn forget_undurable(&self, group: &GroupId) {
        self.undurable_map().remove(group);
    }

    /// Installs the blocking check group adds ask (see [`AddPolicy`]); once.
    pub fn set_add_policy(&self, policy: AddPolicy) -> bool {
        self.add_policy.set(policy).is_ok()
    }

    pub fn shard(&self, group: &GroupId) -> ShardId {
        shard_of(route_id(group), self.shard_count)
    }

    fn lock(&self, group: &GroupId) -> std::sync::MutexGuard<'_, ()> {
        let stripe = (route_id(group) ^ u64::from(group[15])) as usize % LOCK_STRIPES;
        // A panic while holding it leaves nothing half-written (one batch per operation).
        self.locks[stripe]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn row(&self, group: &GroupId, tag: u8, rest: &[&[u8]]) -> Vec<u8> {
        let mut parts: Vec<&[u8]> = vec![&group[..], std::slice::from_ref(&tag)];
        parts.extend_from_slice(rest);
        key(self.shard(group), &parts)
    }

    pub fn log_key(&self, group: &GroupId, seq: u64) -> Vec<u8> {
        key(self.shard(group), &[&group[..], &seq.to_be_bytes()])
    }

    /// A record's key in the log: a receipt sorts right after the record at its seq.
    pub fn record_key(&self, record: &LogRecord) -> Vec<u8> {
        let mut k = self.log_key(&record.group, record.seq);
        if let LogBody::Receipt { number, .. } = record.body {
            k.extend_from_slice(&number.to_be_bytes());
        }
        k
    }

    /// The group's state, if it exists here.
    pub fn load(&self, group: &GroupId) -> Result<Option<GroupState>, GroupError> {
        match self
            .engine
            .get(Cf::Groups, &self.row(group, TAG_STATE, &[]))?
        {
            None => Ok(None),
            Some(bytes) => Ok(Some(postcard::from_bytes(&bytes).map_err(|e| {
                StorageError::Corrupt {
                    cf: "groups",
                    detail: e.to_string(),
                }
            })?)),
        }
    }

    fn put_state(&self, batch: &mut WriteBatch, state: &GroupState) -> Result<(), GroupError> {
        let bytes = postcard::to_allocvec(state).map_err(|e| StorageError::Other(e.to_string()))?;
        batch.put(Cf::Groups, self.row(&state.group, TAG_STATE, &[]), bytes);
        Ok(())
    }

    fn put_event(
        &self,
        batch: &mut WriteBatch,
        state: &GroupState,
        event: &GroupEvent,
        now_ms: u64,
    ) -> Result<LogRecord, GroupError> {
        let frame = Frame::new(0, event.clone())
            .encode()
            .map_err(|_| GroupError::LimitExceeded("the group event does not fit a frame"))?;
        let mut pending = state.members.clone();
        pending.extend(event.removed.iter().copied());
        pending.sort_unstable();
        pending.dedup();
        let record = LogRecord {
            group: state.group,
            seq: event.seq,
            server_time_ms: now_ms,
            body: LogBody::Event {
                actor: event.actor,
                frame: frame.to_vec(),
            },
            pending,
        };
        batch.put(
            Cf::GroupLog,
            self.log_key(&state.group, record.seq),
            record.encode()?,
        );
        Ok(record)
    }

    /// Creates group `group` (an id the caller drew at random) with `creator` as its admin.
    pub fn create(
        &self,
        group: GroupId,
        creator: UserId,
        members: &[UserId],
        meta: &[u8],
        now_ms: u64,
    ) -> Result<GroupInfo, GroupError> {
        let _held = self.lock(&group);
        if self.load(&group)?.is_some() {
            // 128 random bits collide only if the caller reused an id: refuse, never merge.
            return Err(GroupError::Malformed("the group id is taken"));
        }
        if let Some(policy) = self.add_policy.get() {
            if members.iter().any(|&m| m != creator && !policy(creator, m)) {
                return Err(GroupError::Forbidden(
                    "a user cannot be added to this group",
                ));
            }
        }
        let (state, event) = GroupState::create(group, creator, members, meta)?;
        let mut batch = WriteBatch::new();
        self.put_state(&mut batch, &state)?;
        self.put_event(&mut batch, &state, &event, now_ms)?;
        self.write_logged(&group, event.seq, batch)?;
        self.metrics.created.fetch_add(1, Relaxed);
        state.info_for(creator)
    }

    /// Applies a `GroupUpdate` by `actor` and logs its event; the new state as `actor` sees it
    /// (or, after a leave, with no members listed: `actor` no longer sees the group).
    pub fn update(
        &self,
        actor: UserId,
        update: &GroupUpdate,
        invite_code: [u8; GROUP_INVITE_CODE_BYTES],
        now_ms: u64,
    ) -> Result<GroupInfo, GroupError> {
        let _held = self.lock(&update.group);
        let mut state = self.load(&update.group)?.ok_or(GroupError::NotFound)?;
        let before = state.seq;
        let allow_all = |_: UserId, _: UserId| true;
        let event = match self.add_policy.get() {
            // Every user an update adds is checked here (blocks: `blocks::check_adds`).
            Some(policy) => state.apply(actor, update, invite_code, &|a, b| policy(a, b))?,
            None => state.apply(actor, update, invite_code, &allow_all)?,
        };
        if state.seq == before {
            // The update changed nothing (e.g. a retry of one already applied): answered with
            // the group as it is, but only once that state is durable on the shard's in-sync
            // replicas, as a repeated send is (`send`): the state row is written again, synced
            // and shipped. The first attempt's write may have failed to replicate (its local
            // copy stays), and a node deposed without knowing it still answers from that copy:
            // the replicas' gap and epoch checks refuse this write in both cases, so the retry
            // fails instead of confirming a change only this node has (chaos
            // `cluster-partition` seed 3 answered a removal that way and lost it).
            let mut batch = WriteBatch::new();
            self.put_state(&mut batch, &state)?;
            self.write_logged(&update.group, state.seq, batch)?;
            return state.info_for(actor);
        }
        let mut batch = WriteBatch::new();
        self.put_state(&mut batch, &state)?;
        self.put_event(&mut batch, &state, &event, now_ms)?;
        self.membership_changed(&mut batch, &state, &event.added, &event.removed, now_ms)?;
        self.write_logged(&update.group, event.seq, batch)?;
        self.metrics.updates.fetch_add(1, Relaxed);
        match state.info_for(actor) {
            Ok(info) => Ok(info),
            Err(_) => Ok(GroupInfo {
                group: state.group,
                version: state.seq,
                members: vec![],
                admins: vec![],
                meta: Default::default(),
                send: Default::default(),
                edit: Default::default(),
                invite_code: Default::default(),
            }),
        }
    }

    /// The group as `asker` sees it (members only).
    pub fn info(&self, asker: UserId, group: &GroupId) -> Result<GroupInfo, GroupError> {
        let state = self.load(group)?.ok_or(GroupError::NotFound)?;
        state.info_for(asker)
    }

    /// Sequences a `GroupSend` and makes it durable in the log (or finds it was before).
    pub fn send(
        &self,
        from_user: UserId,
        from_device: DeviceId,
        group: &GroupId,
        msg_id: MsgId,
        body: &[u8],
        now_ms: u64,
    ) -> Result<Sent, GroupError> {
        let _held = self.lock(group);
        let mut state = self.load(group)?.ok_or(GroupError::NotFound)?;
        let dedup_key = self.row(
            group,
            TAG_DEDUP,
            &[
                &from_user.to_be_bytes(),
                &from_device.to_be_bytes(),
                &msg_id,
            ],
        );
        if let Some(v) = self.engine.get(Cf::Groups, &dedup_key)? {
            if let Some((expires, seq, at)) = decode_dedup(&v) {
                if expires > now_ms {
                    // A repeat gets the first answer, even if the sender has left since, but
                    // only once the record is durable: the dedup row is written again, synced,
                    // and on a replicating node shipped to the shard's in-sync replicas, which
                    // take a shard's records in order and refuse gaps. So an Ok proves they
                    // hold the original log record too. The original's own write may have
                    // failed to replicate (its local copy stays, and is dropped when this node
                    // is caught up as a follower): answered from the local row alone, the
                    // retry would acknowledge a message only this node has (chaos
                    // `cluster-partition` lost two that way; the inbox does the same).
                    let mut batch = WriteBatch::new();
                    batch.put(Cf::Groups, dedup_key.clone(), v.clone());
                    self.write_logged(group, seq, batch)?;
                    return Ok(Sent::Duplicate {
                        seq,
                        server_time_ms: at,
                    });
                }
            }
        }
        state.may_send(from_user)?;
        state.seq += 1;
        let seq = state.seq;
        let mut batch = WriteBatch::new();
        // Pruning first: an expired row may have this send's key, which is put below.
        self.prune_dedup(&mut batch, group, now_ms)?;
        self.put_state(&mut batch, &state)?;
        let record = LogRecord {
            group: *group,
            seq,
            server_time_ms: now_ms,
            body: LogBody::Message {
                from_user,
                from_device,
                msg_id,
                body: body.to_vec(),
            },
            pending: state.members.clone(),
        };
        batch.put(Cf::GroupLog, self.log_key(group, seq), record.encode()?);
        self.index_message(&mut batch, group, seq, from_user, from_device, msg_id);
        let expires = now_ms.saturating_add(GROUP_SEND_DEDUP_MS);
        let mut value = Vec::with_capacity(24);
        value.extend_from_slice(&expires.to_be_bytes());
        value.extend_from_slice(&seq.to_be_bytes());
        value.extend_from_slice(&now_ms.to_be_bytes());
        batch.put(Cf::Groups, dedup_key.clone(), value);
        let by_expiry = self.row(group, TAG_DEDUP_BY_EXPIRY, &[&expires.to_be_bytes()]);
        let mut index_key = by_expiry;
        index_key.extend_from_slice(&dedup_key);
        batch.put(Cf::Groups, index_key, Vec::new());
        self.write_logged(group, seq, batch)?;
        self.metrics.sends.fetch_add(1, Relaxed);
        Ok(Sent::New {
            seq,
            server_time_ms: now_ms,
        })
    }

    /// Deletes up to [`GROUP_DEDUP_PRUNE_MAX`] expired dedup rows of `group`.
    fn prune_dedup(
        &self,
        batch: &mut WriteBatch,
        group: &GroupId,
        now_ms: u64,
    ) -> Result<(), GroupError> {
        let from = self.row(group, TAG_DEDUP_BY_EXPIRY, &[]);
        let to = self.row(group, TAG_DEDUP_BY_EXPIRY, &[&now_ms.to_be_bytes()]);
        for (index_key, _) in self
            .engine
            .scan(Cf::Groups, &from, &to, GROUP_DEDUP_PRUNE_MAX)?
        {
            let dedup_key = index_key[from.len() + 8..].to_vec();
            batch.delete(Cf::Groups, dedup_key);
            batch.delete(Cf::Groups, index_key);
        }
        Ok(())
    }

    /// The first log record of `group` still to fan out.
    pub fn next_record(&self, group: &GroupId) -> Result<Option<LogRecord>, GroupError> {
        let from = key(self.shard(group), &[&group[..]]);
        let to = prefix_end(&from);
        match self.engine.scan(Cf::GroupLog, &from, &to, 1)?.pop() {
            Some((_, v)) => Ok(Some(LogRecord::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` log records of `group` in log order (seq order, a receipt right after
    /// the record at its seq), each with its key; only those after the key `after` when given
    /// (the fan-out's cursor). New records always sort after every existing one (the seq only
    /// grows, and a receipt's number with it), so a scan from a cursor misses none written
    /// since.
    pub fn pending_records(
        &self,
        group: &GroupId,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, LogRecord)>, GroupError> {
        let start = key(self.shard(group), &[&group[..]]);
        let to = prefix_end(&start);
        let from = match after {
            // The first key above `k`.
            Some(k) => [k, &[0]].concat(),
            None => start,
        };
        self.engine
            .scan(Cf::GroupLog, &from, &to, limit)?
            .into_iter()
            .map(|(k, v)| Ok((k, LogRecord::decode(&v)?)))
            .collect()
    }

    /// Records the fan-out's progress: the record is done (deleted) when nobody is pending,
    /// else rewritten with who still is. Not synced: a lost progress write only repeats
    /// stores that the destinations deduplicate.
    pub fn progress(&self, record: &LogRecord) -> Result<(), GroupError> {
        let mut batch = WriteBatch::new();
        let k = self.record_key(record);
        if record.pending.is_empty() {
            batch.delete(Cf::GroupLog, k);
            self.metrics.log_records_done.fetch_add(1, Relaxed);
        } else {
            batch.put(Cf::GroupLog, k, record.encode()?);
        }
        self.engine.write(batch, false)?;
        Ok(())
    }

    /// Groups of `shard` with log records pending (each once).
    pub fn pending_groups(&self, shard: ShardId) -> Result<Vec<GroupId>, GroupError> {
        let mut groups: Vec<GroupId> = Vec::new();
        let mut from = key(shard, &[]);
        let to = prefix_end(&from);
        loop {
            let rows = self.engine.scan(Cf::GroupLog, &from, &to, 1)?;
            let Some((k, _)) = rows.into_iter().next() else {
                break;
            };
            let Some(g) = k.get(2..18).and_then(|g| GroupId::try_from(g).ok()) else {
                break;
            };
            groups.push(g);
            // Skip the rest of this group's records.
            from = prefix_end(&key(shard, &[&g[..]]));
        }
        Ok(groups)
    }
}

fn decode_dedup(v: &[u8]) -> Option<(u64, u64, u64)> {
    let n =
        |i: usize| -> Option<u64> { Some(u64::from_be_bytes(v.get(i..i + 8)?.try_into().ok()?)) };
    Some((n(0)?, n(8)?, n(16)?))
}

#[cfg(test)]
mod tests;
