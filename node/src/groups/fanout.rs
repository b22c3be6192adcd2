//! The fan-out of a group's log: one task per group with pending records, draining them in
//! sequence order. For each record it groups the pending members by their owner node and
//! sends one [`GroupBatch`] per destination node (the body once); each destination stores an
//! inbox entry per member device, deduplicated by (sender, sender device, msg_id) per member,
//! so a record fanned out twice (after a crash, a lost progress write, a primary change) is
//! stored once. A record leaves the log only when every member's owner answered; members whose
//! owner could not be reached stay pending and the pass is retried with a backoff. The next
//! record starts only then: members see the group in one order, at the price of head-of-line
//! waiting behind an unreachable member's owner.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ringpost_coordinator::NodeId;
use ringpost_wire::{DeviceId, ErrorCode, GroupId, MsgId, UserId};
use serde::{Deserialize, Serialize};
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

/// Which groups have a fan-out task, and whether it must look at the log again.
#[derive(Debug, Default)]
pub struct Fanout {
    running: Mutex<HashMap<GroupId, bool>>,
}

impl Fanout {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<GroupId, bool>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Makes sure `group`'s log is being drained (after a record was written).
pub fn kick(server: &Arc<Server>, group: GroupId) {
    {
        let mut running = server.fanout.running();
        if let Some(again) = running.get_mut(&group) {
            *again = true;
            return;
        }
        running.insert(group, false);
    }
    tokio::spawn(run(Arc::downgrade(server), group));
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
            kick(&server, group);
        }
    });
}

async fn run(server: Weak<Server>, group: GroupId) {
    let mut pause = FANOUT_RETRY_PAUSE;
    loop {
        let Some(server) = server.upgrade() else {
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
        let next = tokio::task::spawn_blocking(move || groups.next_record(&group)).await;
        match next {
            Ok(Ok(None)) => {
                let mut running = server.fanout.running();
                match running.get_mut(&group) {
                    Some(again) if *again => *again = false,
                    _ => {
                        running.remove(&group);
                        return;
                    }
                }
            }
            Ok(Ok(Some(mut record))) => {
                let before = record.pending.len();
                deliver(&server, &mut record).await;
                let left = record.pending.len();
                let groups = server.groups.clone();
                let progress = record.clone();
                let written = tokio::task::spawn_blocking(move || groups.progress(&progress))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                if let Err(e) = &written {
                    warn!(error = %e, "writing group fan-out progress failed");
                }
                if left == 0 && written.is_ok() {
                    pause = FANOUT_RETRY_PAUSE;
                } else {
                    server
                        .groups
                        .metrics
                        .fanout_retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    debug!(
                        seq = record.seq,
                        before, left, "group fan-out pass left members pending"
                    );
                    drop(server);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(FANOUT_RETRY_PAUSE_MAX);
                }
            }
            Ok(Err(e)) => {
                warn!(error = %e, "reading the group log failed; retrying");
                drop(server);
                tokio::time::sleep(FANOUT_RETRY_PAUSE_MAX).await;
            }
            Err(e) => {
                warn!(error = %e, "group log task failed; retrying");
                drop(server);
                tokio::time::sleep(FANOUT_RETRY_PAUSE_MAX).await;
            }
        }
    }
}

/// One pass over a record: every pending member's owner is asked once (a batch per node);
/// `record.pending` keeps those not stored yet.
async fn deliver(server: &Arc<Server>, record: &mut LogRecord) {
    let mut local = Vec::new();
    let mut remote: BTreeMap<NodeId, (u64, Vec<UserId>)> = BTreeMap::new();
    let mut unowned = Vec::new();
    for &m in &record.pending {
        match server.routing.route(m) {
            Route::Local { .. } => local.push(m),
            Route::Remote { node, epoch, .. } => {
                remote.entry(node).or_insert((epoch, vec![])).1.push(m)
            }
            Route::Unowned => unowned.push(m),
        }
    }
    let mut still = unowned;
    if !local.is_empty() {
        let batch = GroupBatch::of(record, local);
        for (m, stored) in store_batch(server, &batch).await {
            if !settled(&stored) {
                still.push(m);
            }
        }
    }
    let calls = remote.into_iter().map(|(node, (epoch, members))| {
        let batch = GroupBatch::of(record, members);
        let server = server.clone();
        async move {
            let members = batch.members.clone();
            server
                .groups
                .metrics
                .fanout_batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match server
                .call_peer(node, epoch, PeerRequest::GroupFanout(batch))
                .await
            {
                Ok(PeerResponse::GroupStored(results)) if results.len() == members.len() => members
                    .into_iter()
                    .zip(results)
                    .filter(|(_, s)| !settled(s))
                    .map(|(m, _)| m)
                    .collect(),
                Ok(other) => {
                    debug!(node, answer = ?other, "group fan-out batch not stored");
                    members
                }
                Err(e) => {
                    debug!(node, error = %e, "group fan-out batch failed");
                    members
                }
            }
        }
    });
    for left in futures::future::join_all(calls).await {
        still.extend::<Vec<UserId>>(left);
    }
    still.sort_unstable();
    record.pending = still;
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
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
