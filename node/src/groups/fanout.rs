//! The fan-out of a group's log: one task per group with pending records, draining them in
//! sequence order. For each record it groups the pending members by their owner node and
//! sends one [`GroupBatch`] per destination node (the body once); each destination stores an
//! inbox entry per member device, deduplicated by (sender, sender device, msg_id) per member,
//! so a record fanned out twice (after a crash, a lost progress write, a primary change) is
//! stored once. A record leaves the log only when every member's owner answered (members whose
//! owner could not be reached stay pending in it).
//!
//! # Order without head-of-line blocking
//! The invariant: a member never gets a record stored before an earlier record that was owed
//! to it. Members on healthy nodes do not wait for a member on an unreachable one.
//!
//! - The task reads the log in windows of up to [`FANOUT_WINDOW`] records, in log order, from
//!   a cursor (the key of the last record it went through). A *sweep* goes from the head of
//!   the log to its end. New records always sort after every existing one, so a sweep that
//!   goes on from its cursor finds them.
//! - In a window each pending member is routed once; each destination (this node, or a peer)
//!   gets its batches one record after the other, in log order, and destinations run
//!   concurrently. Progress is written per record once the window is done (a record is
//!   deleted when nobody is pending).
//! - A member whose store fails (not settled: unreachable owner, moving shard) is *held*: it
//!   is skipped for every later record of the sweep, where it stays pending. So it cannot get
//!   a later record before the one it missed.
//! - At the end of the log: if nobody is held, the task looks again from the head (and stops
//!   when the log is empty). Otherwise it waits for the retry pause ([`FANOUT_RETRY_PAUSE`],
//!   doubling to [`FANOUT_RETRY_PAUSE_MAX`]) or for a [`kick`], whichever comes first. A kick
//!   (new records) goes on from the cursor, the held members still skipped: the others get
//!   new records at once. The end of the pause starts a new sweep from the head with nobody
//!   held: each held member's owner is asked again from that member's oldest pending record.
//!
//! A retry sweep still asks the unreachable node for its members' oldest record; the window
//! it is in finishes (and the next is read) only when that call fails (a dial's handshake
//! timeout, at most [`crate::peer::PEER_CALL_TIMEOUT`]). Members on healthy nodes get that
//! window's records without waiting, but later records wait for it: once per retry sweep.
//!
//! Each record still costs one peer call per destination node; sending a window's records to
//! a node in one call would need a new peer request (and a protocol version).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ringpost_coordinator::NodeId;
use ringpost_wire::{DeviceId, ErrorCode, GroupId, MsgId, UserId};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::{route_id, LogBody, LogRecord};
use crate::peer::{PeerRequest, PeerResponse, Store, StoreKind, Stored, Targets};
use crate::routing::Route;
use crate::server::Server;
use crate::shard::ShardId;

/// First pause before retrying a pass that left members pending; doubled up to
/// [`FANOUT_RETRY_PAUSE_MAX`].
pub const FANOUT_RETRY_PAUSE: Duration = Duration::from_millis(100);
pub const FANOUT_RETRY_PAUSE_MAX: Duration = Duration::from_secs(5);
/// How many log records the fan-out reads and sends at once. Each destination node gets the
/// window's batches for its members one after the other (in log order), destinations in
/// parallel; a larger window keeps more records in memory (each up to a group message).
pub const FANOUT_WINDOW: usize = 32;

/// One record for the members one node owns: the body once, the members listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupBatch {
    pub group: GroupId,
    pub group_seq: u64,
    pub kind: StoreKind,
    pub from_user: UserId,
    pub from_device: DeviceId,
    pub msg_id: MsgId,
    /// The entry body: `group | group_seq (u64 BE) | payload` (see [`entry_body`]).
    pub body: Vec<u8>,
    /// At most `GROUP_MEMBERS_MAX` (plus the removed of one change).
    pub members: Vec<UserId>,
}

impl GroupBatch {
    fn of(record: &LogRecord, members: Vec<UserId>) -> GroupBatch {
        let (kind, from_user, from_device, msg_id, payload) = match &record.body {
            LogBody::Message {
                from_user,
                from_device,
                msg_id,
                body,
            } => (
                StoreKind::GroupMessage,
                *from_user,
                *from_device,
                *msg_id,
                &body[..],
            ),
            LogBody::Event { actor, frame } => (
                StoreKind::GroupEvent,
                *actor,
                0,
                event_msg_id(&record.group, record.seq),
                &frame[..],
            ),
            LogBody::Receipt {
                kind,
                number,
                up_to_seq,
                msg_ids,
            } => {
                // From nobody (user 0): the group's owner speaks for all members. The ids
                // travel as the payload; `store_for` makes them the entry's receipt ids.
                return GroupBatch {
                    group: record.group,
                    group_seq: *up_to_seq,
                    kind: match kind {
                        super::receipts::Kind::Delivered => StoreKind::Delivered,
                        super::receipts::Kind::Read => StoreKind::Read,
                    },
                    from_user: 0,
                    from_device: 0,
                    msg_id: super::receipts::receipt_msg_id(&record.group, *number),
                    body: entry_body(&record.group, *up_to_seq, &msg_ids.concat()),
                    members,
                };
            }
        };
        GroupBatch {
            group: record.group,
            group_seq: record.seq,
            kind,
            from_user,
            from_device,
            msg_id,
            body: entry_body(&record.group, record.seq, payload),
            members,
        }
    }

    /// The store of this batch for one member.
    pub fn store_for(&self, member: UserId) -> Store {
        if matches!(self.kind, StoreKind::Delivered | StoreKind::Read) {
            // An aggregated receipt: `group | up_to_seq` is the body (so `Deliver` names the
            // group), the payload's ids are the receipt's.
            let ids = self.body.get(24..).unwrap_or_default();
            return Store {
                to_user: member,
                from_user: self.from_user,
                from_device: self.from_device,
                msg_id: self.msg_id,
                kind: self.kind,
                targets: Targets::AllDevices(self.body[..24.min(self.body.len())].to_vec()),
                except: None,
                receipt_msg_ids: ids
                    .chunks_exact(16)
                    .filter_map(|c| MsgId::try_from(c).ok())
                    .collect(),
                dedup: true,
                require_contact: false,
                expires_at_ms: 0,
            };
        }
        Store {
            to_user: member,
            from_user: self.from_user,
            from_device: self.from_device,
            msg_id: self.msg_id,
            kind: self.kind,
            targets: Targets::AllDevices(self.body.clone()),
            // The sender's own other devices get a copy; the sending device does not.
            except: (member == self.from_user && self.kind == StoreKind::GroupMessage)
                .then_some(self.from_device),
            receipt_msg_ids: Vec::new(),
            dedup: true,
            require_contact: false,
            expires_at_ms: 0,
        }
    }
}

/// An event's id: the group's first 8 bytes and its seq. Sent as from device 0, which no
/// real device is, so it never meets a client's msg_id in the dedup records.
pub fn event_msg_id(group: &GroupId, seq: u64) -> MsgId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&group[..8]);
    id[8..].copy_from_slice(&seq.to_be_bytes());
    id
}

/// A group entry's stored body: the group and its seq in front of the payload, so that the
/// inbox keeps one entry format; [`split_entry_body`] takes them apart for `Deliver`.
pub fn entry_body(group: &GroupId, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(24 + payload.len());
    b.extend_from_slice(group);
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// `(group, group_seq, payload)` of a group entry's body; `None` if it is too short.
pub fn split_entry_body(body: &[u8]) -> Option<(GroupId, u64, &[u8])> {
    let group: GroupId = body.get(..16)?.try_into().ok()?;
    let seq = u64::from_be_bytes(body.get(16..24)?.try_into().ok()?);
    Some((group, seq, &body[24..]))
}

/// A group's fan-out task as [`kick`] sees it.
#[derive(Debug, Default)]
struct Task {
    /// A record was written since the task last found the log empty.
    again: AtomicBool,
    /// Wakes the task from a retry pause: new records to fan out to the members not held.
    wake: Notify,
}

/// Which groups have a fan-out task, and whether it must look at the log again.
#[derive(Debug, Default)]
pub struct Fanout {
    running: Mutex<HashMap<GroupId, Arc<Task>>>,
}

impl Fanout {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<GroupId, Arc<Task>>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Makes sure `group`'s log is being drained (after a record was written).
pub fn kick(server: &Arc<Server>, group: GroupId) {
    let task = {
        let mut running = server.fanout.running();
        if let Some(task) = running.get(&group) {
            task.again.store(true, Relaxed);
            task.wake.notify_one();
            return;
        }
        let task = Arc::new(Task::default());
        running.insert(group, task.clone());
        task
    };
    tokio::spawn(run(Arc::downgrade(server), group, task));
}

/// Resumes the fan-out of every group of these shards with records in its log (the shards
/// became this node's: at start, after a hand-off, or on a primary change).
pub fn resume(server: &Arc<Server>, shards: &[ShardId]) {
    let server = server.clone();
    let shards = shards.to_vec();
    tokio::spawn(async move {
        let groups = server.groups.clone();
        let found = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            for s in shards {
                match groups.pending_groups(s) {
                    Ok(g) => all.extend(g),
                    Err(e) => warn!(shard = s, error = %e, "scanning the group log failed"),
                }
            }
            all
        })
        .await
        .unwrap_or_default();
        for group in found {
            // The log this node now owns is the durable one (replicated, or caught up).
            server.groups.forget_undurable(&group);
            kick(&server, group);
        }
    });
}

/// Where a group's task is in its log, and who it skips (see the module doc).
struct Sweep {
    /// The key of the last record this sweep went through; `None`: the sweep starts at the
    /// head of the log.
    cursor: Option<Vec<u8>>,
    /// Members a store failed for in this sweep: skipped until the next sweep from the head
    /// (after the retry pause), so that nobody gets a later record before an earlier one.
    held: BTreeSet<UserId>,
    /// A progress write failed: the log lists members that were stored; a sweep from the head
    /// repeats those stores (deduplicated) and writes it again.
    dirty: bool,
}

impl Sweep {
    fn from_head() -> Sweep {
        Sweep {
            cursor: None,
            held: BTreeSet::new(),
            dirty: false,
        }
    }
}

async fn run(weak: Weak<Server>, group: GroupId, task: Arc<Task>) {
    let mut pause = FANOUT_RETRY_PAUSE;
    let mut sweep = Sweep::from_head();
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let Some(server) = weak.upgrade() else {
            return;
        };
        let stop = |server: &Server| {
            server.fanout.running().remove(&group);
        };
        // Only the group's owner fans out; a new owner resumes from the (replicated or
        // handed-off) log. While the shard is still this node's but not writable (no lease,
        // a hand-off under way) the task waits rather than stops: nothing else would restart
        // it when the shard becomes writable again.
        match server.routing.route(route_id(&group)) {
            Route::Local { .. } => {
                if server.serves_here(route_id(&group)).is_some() {
                    drop(server);
                    sweep = Sweep::from_head();
                    tokio::time::sleep(FANOUT_RETRY_PAUSE_MAX).await;
                    continue;
                }
            }
            Route::Remote { .. } | Route::Unowned => {
                stop(&server);
                return;
            }
        }
        let groups = server.groups.clone();
        let after = sweep.cursor.clone();
        let window = tokio::task::spawn_blocking(move || {
            groups.pending_records(&group, after.as_deref(), FANOUT_WINDOW)
        })
        .await;
        let window = match window {
            Ok(Ok(window)) => window,
            Ok(Err(e)) => {
                warn!(error = %e, "reading the group log failed; retrying");
                drop(server);
                sweep = Sweep::from_head();
                tokio::time::sleep(FANOUT_RETRY_PAUSE_MAX).await;
                continue;
            }
            Err(e) => {
                warn!(error = %e, "group log task failed; retrying");
                drop(server);
                sweep = Sweep::from_head();
                tokio::time::sleep(FANOUT_RETRY_PAUSE_MAX).await;
                continue;
            }
        };
        // Only records known durable: a log write that has not returned (or failed to
        // replicate) is on this node's disk, but may be dropped when the node is caught up
        // as a follower; delivering it would hand members a record that never was.
        let mut window = window;
        if let Some(from) = server.groups.undurable_from(&group) {
            window.retain(|(_, r)| r.seq < from);
        }
        if let Some((last, _)) = window.last() {
            let last = last.clone();
            let records: Vec<LogRecord> = window.into_iter().map(|(_, r)| r).collect();
            fan_out_window(&server, &records, &mut sweep).await;
            sweep.cursor = Some(last);
            continue;
        }
        // The end of the log.
        if sweep.cursor.is_none() {
            // From the head: the log is empty.
            let mut running = server.fanout.running();
            if task.again.swap(false, Relaxed) {
                continue;
            }
            running.remove(&group);
            return;
        }
        if sweep.held.is_empty() && !sweep.dirty {
            // Every record behind the cursor is done: look at the log again from its head.
            pause = FANOUT_RETRY_PAUSE;
            retry_at = None;
            sweep.cursor = None;
            continue;
        }
        // Members are held: wait for their retry, or for new records for the others.
        let deadline = *retry_at.get_or_insert_with(|| {
            let at = tokio::time::Instant::now() + pause;
            pause = (pause * 2).min(FANOUT_RETRY_PAUSE_MAX);
            at
        });
        debug!(
            held = sweep.held.len(),
            dirty = sweep.dirty,
            "group fan-out left members pending"
        );
        drop(server);
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                // Retry everyone, from the head of the log.
                retry_at = None;
                sweep = Sweep::from_head();
                if let Some(server) = weak.upgrade() {
                    server.groups.metrics.fanout_retries.fetch_add(1, Relaxed);
                }
            }
            _ = task.wake.notified() => {
                // New records: on from the cursor, the held members still skipped.
            }
        }
    }
}

/// Where a member's stores go during one window.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    Local,
    Remote(NodeId, u64),
}

/// Fans a window of records (in log order) out to their pending members not held, and
/// writes each record's progress. Each destination gets its batches in log order, one call
/// after the other; destinations run concurrently. A member whose store fails is skipped for
/// the window's later records and added to `sweep.held`.
async fn fan_out_window(server: &Arc<Server>, records: &[LogRecord], sweep: &mut Sweep) {
    // Each member is routed once for the window, so its records all go one way, in order.
    let mut routes: HashMap<UserId, Option<Dest>> = HashMap::new();
    let mut chains: BTreeMap<Dest, Vec<(usize, Vec<UserId>)>> = BTreeMap::new();
    for (i, record) in records.iter().enumerate() {
        let mut by_dest: BTreeMap<Dest, Vec<UserId>> = BTreeMap::new();
        for &m in &record.pending {
            if sweep.held.contains(&m) {
                continue;
            }
            let dest = *routes
                .entry(m)
                .or_insert_with(|| match server.routing.route(m) {
                    Route::Local { .. } => Some(Dest::Local),
                    Route::Remote { node, epoch, .. } => Some(Dest::Remote(node, epoch)),
                    Route::Unowned => None,
                });
            match dest {
                Some(d) => by_dest.entry(d).or_default().push(m),
                // Nobody to store for it now: held (it stays pending here and after).
                None => {
                    sweep.held.insert(m);
                }
            }
        }
        for (d, members) in by_dest {
            chains.entry(d).or_default().push((i, members));
        }
    }
    let calls = chains
        .into_iter()
        .map(|(dest, batches)| chain(server, dest, records, batches));
    let mut settled: Vec<Vec<UserId>> = vec![Vec::new(); records.len()];
    for (done, failed) in futures::future::join_all(calls).await {
        for (i, members) in done {
            settled[i].extend(members);
        }
        sweep.held.extend(failed);
    }
    let progressed: Vec<LogRecord> = records
        .iter()
        .zip(settled)
        .filter(|(_, s)| !s.is_empty())
        .map(|(r, s)| {
            let mut r = r.clone();
            r.pending.retain(|m| !s.contains(m));
            r
        })
        .collect();
    if progressed.is_empty() {
        return;
    }
    let groups = server.groups.clone();
    let written = tokio::task::spawn_blocking(move || {
        let mut failed = false;
        for record in &progressed {
            if let Err(e) = groups.progress(record) {
                warn!(error = %e, seq = record.seq, "writing group fan-out progress failed");
                failed = true;
            }
        }
        failed
    })
    .await;
    match written {
        Ok(false) => {}
        Ok(true) => sweep.dirty = true,
        Err(e) => {
            warn!(error = %e, "group fan-out progress task failed");
            sweep.dirty = true;
        }
    }
}

/// One destination's batches of a window, in log order: `(record index, members)`. Returns
/// who was stored (or settled otherwise) per record, and the members a store failed for (each
/// skipped from its failure on).
async fn chain(
    server: &Arc<Server>,
    dest: Dest,
    records: &[LogRecord],
    batches: Vec<(usize, Vec<UserId>)>,
) -> (Vec<(usize, Vec<UserId>)>, BTreeSet<UserId>) {
    let mut done = Vec::new();
    let mut failed = BTreeSet::new();
    for (i, mut members) in batches {
        members.retain(|m| !failed.contains(m));
        if members.is_empty() {
            continue;
        }
        let batch = GroupBatch::of(&records[i], members);
        let results: Vec<(UserId, bool)> = match dest {
            Dest::Local => store_batch(server, &batch)
                .await
                .into_iter()
                .map(|(m, s)| (m, settled(&s)))
                .collect(),
            Dest::Remote(node, epoch) => {
                let members = batch.members.clone();
                server.groups.metrics.fanout_batches.fetch_add(1, Relaxed);
                match server
                    .call_peer(node, epoch, PeerRequest::GroupFanout(batch))
                    .await
                {
                    Ok(PeerResponse::GroupStored(results)) if results.len() == members.len() => {
                        members
                            .into_iter()
                            .zip(results)
                            .map(|(m, s)| (m, settled(&s)))
                            .collect()
                    }
                    Ok(other) => {
                        debug!(node, answer = ?other, "group fan-out batch not stored");
                        members.into_iter().map(|m| (m, false)).collect()
                    }
                    Err(e) => {
                        debug!(node, error = %e, "group fan-out batch failed");
                        members.into_iter().map(|m| (m, false)).collect()
                    }
                }
            }
        };
        let mut stored = Vec::new();
        for (m, ok) in results {
            if ok {
                stored.push(m);
            } else {
                failed.insert(m);
            }
        }
        if !stored.is_empty() {
            done.push((i, stored));
        }
    }
    (done, failed)
}

/// Whether a member's store is final: stored, a duplicate, or a refusal no retry fixes (the
/// account is gone, its inbox is full: that member misses this one record, as with 1:1).
fn settled(stored: &Stored) -> bool {
    match stored {
        Stored::Stored { .. } | Stored::Duplicate { .. } | Stored::UnknownUser => true,
        Stored::Mismatched { .. } => true,
        Stored::Full { .. } => {
            debug!("a group member's inbox is full; it misses one group record");
            true
        }
        Stored::Refused { .. } => false,
    }
}

/// Stores a batch for members this node owns (the serving side of a
/// [`PeerRequest::GroupFanout`], and the owner's own members): one entry per member device,
/// deduplicated per member. Members not served here now are answered `Refused(WrongOwner)`.
pub async fn store_batch(server: &Arc<Server>, batch: &GroupBatch) -> Vec<(UserId, Stored)> {
    let stores = batch.members.iter().map(|&m| {
        let server = server.clone();
        let store = batch.store_for(m);
        async move {
            let stored = match server.routing.route(m) {
                Route::Local { shard }
                    if server.routing.is_ready(shard) && server.routing.lease_valid() =>
                {
                    server
                        .groups
                        .metrics
                        .fanout_member_stores
                        .fetch_add(1, Relaxed);
                    server.store_local(store).await
                }
                _ => Stored::Refused {
                    code: ErrorCode::WrongOwner.as_u16(),
                    message: format!("user {m} is not served here"),
                    retry_after_ms: 0,
                },
            };
            (m, stored)
        }
    });
    futures::future::join_all(stores).await
}
