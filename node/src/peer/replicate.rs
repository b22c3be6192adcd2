//! Shard replication over peer links: the node's [`ReplicaLinks`] (the primary's side, used
//! by [`crate::replication::NetworkSink`]) and the serving of `Replicate` (the replica's side).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ringpost_coordinator::state::{IsrChange, IsrOp, MAX_ISR_NODES, MAX_SHARDS_PER_COMMAND};
use ringpost_coordinator::NodeId;
use tracing::{debug, info, warn};

use super::replica_role::replicate_refusal;
use super::{decode_response, encode_request, PeerRequest, PeerResponse};
use crate::replication::sink::CatchUpStats;
use crate::replication::{serve_parts_with, RecordPart, ReplicaLinks, ReplicaOutcome, ShardAnswer};
use crate::ring::Ring;
use crate::server::Server;
use crate::shard::ShardId;

/// The node's network for its replication sink: the ring says who must have a shard, the peer
/// links carry the records. Holds the server weakly (the server holds the engine, which holds
/// the sink, which holds this).
pub struct ServerLinks {
    server: Weak<Server>,
    runtime: tokio::runtime::Handle,
    /// `(node, shard)` pairs this node has proposed into an in-sync set and not yet seen there:
    /// each is proposed once at a time. Bounded by replicas × shards.
    proposing: Arc<Mutex<HashSet<(NodeId, ShardId)>>>,
    /// `(node, shard)` pairs an expand was sent for (answered or not: a proposal that timed out
    /// may commit later) and not yet seen in the view or shrunk since: a replica that fails is
    /// shrunk out of these shards too. Bounded by replicas × shards.
    expand_sent: Arc<Mutex<HashSet<(NodeId, ShardId)>>>,
    /// Expands to send, batched: see [`Expands`].
    expands: Arc<Mutex<Expands>>,
}

/// The expands of in-sync sets this node has to propose, batched like a group commit: while
/// one batch is with the coordinator, the shards caught up meanwhile collect here and go
/// together when it returns. Catch-ups end in bursts (a node that joins takes over shards by
/// the dozen), and each command the coordinator commits is a view revision every node
/// receives, so one proposal per shard made a joining cluster's views churn.
#[derive(Default)]
struct Expands {
    /// Shards per (replica, ring epoch the catch-up was against): one command each (chunked
    /// by [`MAX_SHARDS_PER_COMMAND`]). Bounded by replicas × shards.
    waiting: BTreeMap<(NodeId, u64), BTreeSet<ShardId>>,
    /// A task is sending batches ([`send_expands`]); it takes `waiting` until it finds it
    /// empty.
    sending: bool,
}

/// Longest a primary waits for the coordinator to take a failed replica out of its shards'
/// in-sync sets (and for its own view to show it) before the write fails instead.
pub const IN_SYNC_CHANGE_TIMEOUT_MS: u64 = 2_000;

impl ServerLinks {
    pub fn new(server: Weak<Server>, runtime: tokio::runtime::Handle) -> ServerLinks {
        ServerLinks {
            server,
            runtime,
            proposing: Arc::default(),
            expand_sent: Arc::default(),
            expands: Arc::default(),
        }
    }
}

impl ReplicaLinks for ServerLinks {
    /// The shard's in-sync set if it has one, else every replica the ring places, besides
    /// this node.
    fn must_have(&self, shard: ShardId) -> Vec<NodeId> {
        let Some(server) = self.server.upgrade() else {
            return Vec::new();
        };
        let ring = server.routing.ring();
        (ring
            .in_sync(shard)
            .unwrap_or_else(|| ring.replicas(shard))
            .iter())
        .copied()
        .filter(|&n| n != server.node_id)
        .collect()
    }

    fn in_sync_member(&self, node: NodeId, shard: ShardId) -> bool {
        self.server.upgrade().is_some_and(|server| {
            (server.routing.ring().in_sync(shard)).is_some_and(|set| set.contains(&node))
        })
    }

    /// The placed nodes of a shard this node is the primary of by its in-sync set that are not
    /// in the set ([`followers_in`]). A shard without a set waits for every placed replica (no
    /// followers).
    fn followers(&self, shard: ShardId) -> Vec<NodeId> {
        let Some(server) = self.server.upgrade() else {
            return Vec::new();
        };
        followers_in(&server.routing.ring(), server.node_id, shard)
    }

    fn catch_up_candidates(&self) -> Vec<(NodeId, ShardId)> {
        let Some(server) = self.server.upgrade() else {
            return Vec::new();
        };
        let ring = server.routing.ring();
        let me = server.node_id;
        (0..ring.shard_count)
            .filter(|&s| ring.owner(s) == Some(me))
            .flat_map(|s| followers_in(&ring, me, s).into_iter().map(move |n| (n, s)))
            .collect()
    }

    fn may_catch_up(&self, node: NodeId, shard: ShardId) -> bool {
        let Some(server) = self.server.upgrade() else {
            return false;
        };
        let proposed = (self.expand_sent.lock())
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&(node, shard));
        !proposed && followers_in(&server.routing.ring(), server.node_id, shard).contains(&node)
    }

    fn caught_up(&self, node: NodeId, shard: ShardId, stats: CatchUpStats) {
        if let Some(server) = self.server.upgrade() {
            server.metrics.catch_ups_done.fetch_add(1, Relaxed);
            server
                .metrics
                .catch_up_bytes
                .fetch_add(stats.bytes, Relaxed);
        }
        info!(
            replica = node,
            shard,
            chunks = stats.chunks,
            bytes = stats.bytes,
            ms = stats.elapsed.as_millis() as u64,
            "caught a replica up; proposing it in sync"
        );
        let _ = self.confirm_in_sync(node, vec![shard]);
    }

    fn catch_up_failed(&self, node: NodeId, shard: ShardId, why: &str) {
        if let Some(server) = self.server.upgrade() {
            server.metrics.catch_ups_failed.fetch_add(1, Relaxed);
        }
        warn!(replica = node, shard, error = %why, "catching a replica up failed; it starts over");
    }

    fn drop_from_in_sync(&self, node: NodeId, shards: Vec<ShardId>) -> Result<(), String> {
        let server = self.server.upgrade().ok_or("the node is stopping")?;
        let client = (server.coordinator.get().cloned())
            .ok_or("no coordinator to change in-sync sets with")?;
        let timeout = Duration::from_millis(IN_SYNC_CHANGE_TIMEOUT_MS);
        let me = server.node_id;
        let sent = self.expand_sent.clone();
        let change = async {
            let out = |ring: &crate::ring::Ring| -> Vec<ShardId> {
                (shards.iter().copied())
                    .filter(|&s| ring.in_sync(s).is_none_or(|set| set.contains(&node)))
                    .collect()
            };
            let ring = server.routing.ring();
            // Also where an expand of the node was sent and is not in the view: it may still
            // commit, and a shrink proposed after it is ordered after it.
            let mut left = out(&ring);
            {
                let sent = sent.lock().unwrap_or_else(PoisonError::into_inner);
                left.extend((shards.iter().copied()).filter(|&s| sent.contains(&(node, s))));
            }
            left.sort_unstable();
            left.dedup();
            if left.iter().any(|&s| ring.owner(s) != Some(me)) {
                return Err("this node is no longer the primary of every shard".to_owned());
            }
            for chunk in left.chunks(MAX_SHARDS_PER_COMMAND) {
                client
                    .change_isr(IsrChange {
                        primary: me,
                        epoch: ring.epoch,
                        shards: chunk.iter().map(|&s| u32::from(s)).collect(),
                        op: IsrOp::Shrink(node),
                    })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            {
                let mut sent = sent.lock().unwrap_or_else(PoisonError::into_inner);
                for s in &left {
                    sent.remove(&(node, *s));
                }
            }
            // Committed; acknowledge once this node's own view has it (the watch brings it).
            while !out(&server.routing.ring()).is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        };
        // On a blocking thread (the sink's contract), so blocking on the runtime is allowed.
        let done = self
            .runtime
            .block_on(async { tokio::time::timeout(timeout, change).await });
        let result = done.unwrap_or_else(|_| {
            Err(format!(
                "the coordinator did not take node {node} out within {IN_SYNC_CHANGE_TIMEOUT_MS} ms"
            ))
        });
        if result.is_ok() {
            warn!(
                replica = node,
                shards = shards.len(),
                "dropped a replica that failed to apply records from its shards' in-sync sets"
            );
        }
        result
    }

    fn confirm_in_sync(&self, node: NodeId, shards: Vec<ShardId>) -> Result<(), String> {
        let Some(server) = self.server.upgrade() else {
            return Ok(());
        };
        let Some(client) = server.coordinator.get().cloned() else {
            return Ok(());
        };
        let ring = server.routing.ring();
        let me = server.node_id;
        // Shards with no set yet: their write is acknowledged only once one is recorded, so
        // that a replica holding it can be promoted.
        let first: Vec<ShardId> = (shards.iter().copied())
            .filter(|&s| ring.owner(s) == Some(me) && ring.in_sync(s).is_none())
            .collect();
        let wanted: Vec<ShardId> = {
            let mut proposing = self
                .proposing
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let seen =
                |&(n, s): &(NodeId, ShardId)| ring.in_sync(s).is_some_and(|set| set.contains(&n));
            proposing.retain(|p| !seen(p));
            let mut sent = self
                .expand_sent
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            sent.retain(|p| !seen(p));
            let wanted: Vec<ShardId> = (shards.into_iter())
                .filter(|&s| ring.owner(s) == Some(me))
                .filter(|&s| !ring.in_sync(s).is_some_and(|set| set.contains(&node)))
                .filter(|&s| proposing.insert((node, s)))
                .collect();
            sent.extend(wanted.iter().map(|&s| (node, s)));
            wanted
        };
        let start = !wanted.is_empty()
            && (self.expands.lock().unwrap_or_else(PoisonError::into_inner))
                .queue(node, ring.epoch, wanted);
        if start {
            let propose = move |change: IsrChange| {
                let client = client.clone();
                async move {
                    client
                        .change_isr(change)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
            };
            let send = send_expands(me, propose, self.expands.clone(), self.proposing.clone());
            self.runtime.spawn(send);
        }
        if first.is_empty() {
            return Ok(());
        }
        let recorded = async {
            while first
                .iter()
                .any(|&s| server.routing.ring().in_sync(s).is_none())
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        let timeout = Duration::from_millis(IN_SYNC_CHANGE_TIMEOUT_MS);
        // On a blocking thread (the sink's contract), so blocking on the runtime is allowed.
        self.runtime
            .block_on(async { tokio::time::timeout(timeout, recorded).await })
            .map_err(|_| {
                format!(
                    "the coordinator recorded no in-sync set for {} shard(s) within \
                     {IN_SYNC_CHANGE_TIMEOUT_MS} ms",
                    first.len()
                )
            })
    }

    fn replicate(
        &self,
        node: NodeId,
        parts: Vec<RecordPart>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<ShardAnswer>, String>> {
        let server = self.server.clone();
        Box::pin(async move {
            let server = server.upgrade().ok_or("the node is stopping")?;
            let peers = server.peers.get().ok_or("this node has no peer links")?;
            let ring = server.routing.ring();
            let addr = (ring.member(node).and_then(|m| m.info.peer_addr.clone()))
                .ok_or_else(|| format!("node {node} advertises no peer address"))?;
            let mut shards: Vec<ShardId> = parts.iter().map(|p| p.shard).collect();
            shards.dedup();
            let request = encode_request(ring.epoch, PeerRequest::Replicate { parts })?;
            server.metrics.peer_requests_sent.fetch_add(1, Relaxed);
            let started = Instant::now();
            let bytes = peers
                .call(node, &addr, request, timeout)
                .await
                .map_err(|e| e.to_string())?;
            server
                .metrics
                .replicate_round_trip
                .observe(started.elapsed());
            // A refusal of the whole request is an answer, not an unreachable node: every shard
            // in it failed (so its writes fail, or it is dropped), and the stream goes on.
            let refused = |reason: String| {
                let mut seen = Vec::new();
                (shards.iter().copied())
                    .filter(|s| {
                        let new = !seen.contains(s);
                        seen.push(*s);
                        new
                    })
                    .map(|shard| ShardAnswer {
                        shard,
                        outcome: ReplicaOutcome::Failed {
                            reason: reason.clone(),
                        },
                    })
                    .collect::<Vec<_>>()
            };
            match decode_response(&bytes)? {
                PeerResponse::Replicated(answers) => Ok(answers),
                PeerResponse::WrongOwner { epoch } => {
                    server.metrics.peer_wrong_owner.fetch_add(1, Relaxed);
                    Ok(refused(format!(
                        "node {node} at epoch {epoch} does not take these shards' records from \
                         this node at epoch {}",
                        ring.epoch
                    )))
                }
                PeerResponse::Error { code, message } => Ok(refused(format!(
                    "node {node} refused (code {code}): {message}"
                ))),
                other => Err(format!("node {node} answered Replicate with {other:?}")),
            }
        })
    }
}

impl Expands {
    /// Queues `shards` of `node`, caught up against the ring of `epoch`. True when no sender
    /// runs: the caller starts one ([`send_expands`]).
    fn queue(&mut self, node: NodeId, epoch: u64, shards: Vec<ShardId>) -> bool {
        self.waiting
            .entry((node, epoch))
            .or_default()
            .extend(shards);
        !std::mem::replace(&mut self.sending, true)
    }

    /// Everything queued, or `None`, and then the sender stops (under the same lock, so a
    /// shard queued after this starts a new one).
    fn take(&mut self) -> Option<BTreeMap<(NodeId, u64), BTreeSet<ShardId>>> {
        if self.waiting.is_empty() {
            self.sending = false;
            return None;
        }
        Some(std::mem::take(&mut self.waiting))
    }
}

/// Sends the waiting expands in batches until none is left (see [`Expands`]): each batch is
/// one command per replica and epoch (chunked by [`MAX_SHARDS_PER_COMMAND`]), all sent at
/// once. A command that fails takes its pairs out of `proposing`: the next synced write that
/// reaches the replica proposes them again.
async fn send_expands<F, Fut>(
    me: NodeId,
    propose: F,
    expands: Arc<Mutex<Expands>>,
    proposing: Arc<Mutex<HashSet<(NodeId, ShardId)>>>,
) where
    F: Fn(IsrChange) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    loop {
        let batch = (expands.lock().unwrap_or_else(PoisonError::into_inner)).take();
        let Some(batch) = batch else {
            return;
        };
        let sends = batch.into_iter().map(|((node, epoch), shards)| {
            let propose = &propose;
            let proposing = &proposing;
            async move {
                let shards: Vec<ShardId> = shards.into_iter().collect();
                for chunk in shards.chunks(MAX_SHARDS_PER_COMMAND) {
                    let change = IsrChange {
                        primary: me,
                        epoch,
                        shards: chunk.iter().map(|&s| u32::from(s)).collect(),
                        op: IsrOp::Expand(node),
                    };
                    if let Err(e) = propose(change).await {
                        // The epoch moved, or the coordinator is away.
                        debug!(replica = node, error = %e, "proposing a replica in sync failed");
                        let mut proposing =
                            proposing.lock().unwrap_or_else(PoisonError::into_inner);
                        for &s in chunk {
                            proposing.remove(&(node, s));
                        }
                    }
                }
            }
        });
        futures::future::join_all(sends).await;
    }
}

pub(crate) fn followers_in(ring: &Ring, me: NodeId, shard: ShardId) -> Vec<NodeId> {
    let Some(set) = ring.in_sync(shard) else {
        return Vec::new();
    };
    if set.first() != Some(&me) {
        return Vec::new();
    }
    (ring.placed(shard).iter())
        .copied()
        .filter(|n| !set.contains(n))
        .take(MAX_ISR_NODES.saturating_sub(set.len()))
        .collect()
}

/// Serves `Replicate` from node `from`, sent at its `epoch` (the caller has caught up to it if
/// it could): checks the roles ([`replicate_refusal`]), then applies the parts on a blocking
/// thread into the bare database, synced, and answers per shard.
pub(crate) async fn serve(
    server: &Arc<Server>,
    from: NodeId,
    epoch: u64,
    parts: Vec<RecordPart>,
) -> PeerResponse {
    let mut shards: Vec<ShardId> = parts.iter().map(|p| p.shard).collect();
    shards.sort_unstable();
    shards.dedup();
    let _applying = server.replica_apply.read().await;
    let ring = server.routing.ring();
    // Roles are checked per shard: a request that mixes a shard whose primary just moved
    // (records queued before the sender learned it) with others is served for the others.
    let mut refused: Vec<ShardAnswer> = Vec::new();
    let mut whole = None;
    for &shard in &shards {
        if let Some(refusal) = replicate_refusal(&ring, server.node_id, from, epoch, &[shard]) {
            let reason = match &refusal {
                PeerResponse::Error { message, .. } => message.clone(),
                PeerResponse::WrongOwner { epoch: at } => format!(
                    "this node is at epoch {at}, the sender at {epoch}, and shard {shard}'s \
                     roles differ"
                ),
                other => format!("{other:?}"),
            };
            refused.push(ShardAnswer {
                shard,
                outcome: ReplicaOutcome::Failed { reason },
            });
            whole.get_or_insert(refusal);
        }
    }
    if refused.len() == shards.len() {
        if let Some(refusal) = whole {
            return refusal;
        }
    }
    let parts: Vec<RecordPart> = (parts.into_iter())
        .filter(|p| !refused.iter().any(|r| r.shard == p.shard))
        .collect();
    let engine = server.replica_engine();
    let inbox = server.inbox.clone();
    let mut assembly = {
        let mut all = (server.replica_parts.lock()).unwrap_or_else(PoisonError::into_inner);
        all.remove(&from).unwrap_or_default()
    };
    let served = tokio::task::spawn_blocking(move || {
        // Through the inbox, so that its entries gauge counts the replica's copy too.
        let apply = |records: &[_]| inbox.apply_replicated(&*engine, records);
        let served = serve_parts_with(&*engine, &mut assembly, parts, &apply);
        (served, assembly)
    })
    .await;
    let (served, assembly) = match served {
        Ok(done) => done,
        Err(e) => {
            return PeerResponse::Error {
                code: ringpost_wire::ErrorCode::Internal.as_u16(),
                message: format!("applying records failed: {e}"),
            }
        }
    };
    if assembly.held_bytes() > 0 {
        let mut all = (server.replica_parts.lock()).unwrap_or_else(PoisonError::into_inner);
        all.insert(from, assembly);
    }
    let m = &server.metrics;
    m.replicate_records_applied
        .fetch_add(served.records_applied, Relaxed);
    m.replicate_bytes_applied
        .fetch_add(served.bytes_applied, Relaxed);
    let mut answers = served.answers;
    answers.extend(refused);
    PeerResponse::Replicated(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(node: NodeId, epoch: u64, shards: &[u32]) -> IsrChange {
        IsrChange {
            primary: 1,
            epoch,
            shards: shards.to_vec(),
            op: IsrOp::Expand(node),
        }
    }

    /// Shards caught up while a proposal is with the coordinator wait for it and then go
    /// together, one command per replica and epoch; a failed command's pairs may be proposed
    /// again; the sender stops when nothing waits, and the next shard starts a new one.
    #[tokio::test]
    async fn expands_caught_up_during_a_proposal_go_in_one_command_each() {
        let expands = Arc::new(Mutex::new(Expands::default()));
        let proposing: Arc<Mutex<HashSet<(NodeId, ShardId)>>> = Arc::default();
        let sent: Arc<Mutex<Vec<IsrChange>>> = Arc::default();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let propose = {
            let (sent, gate) = (sent.clone(), gate.clone());
            move |change: IsrChange| {
                let refused = change.epoch == 6;
                sent.lock().unwrap().push(change);
                let gate = gate.clone();
                async move {
                    gate.acquire().await.unwrap().forget();
                    if refused {
                        Err("epoch 6 is not the current one".to_string())
                    } else {
                        Ok(())
                    }
                }
            }
        };
        proposing.lock().unwrap().extend([(2, 1), (3, 5), (3, 6)]);
        assert!(expands.lock().unwrap().queue(2, 7, vec![1]));
        let sender = tokio::spawn(send_expands(1, propose, expands.clone(), proposing.clone()));
        while sent.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        // The first command is with the "coordinator": these wait, and start no sender.
        for s in (2..=10).rev() {
            assert!(!expands.lock().unwrap().queue(2, 7, vec![s]));
        }
        assert!(!expands.lock().unwrap().queue(3, 7, vec![5]));
        assert!(!expands.lock().unwrap().queue(3, 6, vec![6]));
        gate.add_permits(4);
        sender.await.unwrap();
        let sent = sent.lock().unwrap().clone();
        assert_eq!(sent[0], expand(2, 7, &[1]));
        let mut rest = sent[1..].to_vec();
        rest.sort_by_key(|c| (format!("{:?}", c.op), c.epoch));
        assert_eq!(
            rest,
            vec![
                expand(2, 7, &[2, 3, 4, 5, 6, 7, 8, 9, 10]),
                expand(3, 6, &[6]),
                expand(3, 7, &[5]),
            ]
        );
        let proposing = proposing.lock().unwrap().clone();
        assert_eq!(
            proposing,
            HashSet::from([(2, 1), (3, 5)]),
            "the refused pair may be proposed again"
        );
        assert!(
            expands.lock().unwrap().queue(2, 7, vec![11]),
            "the sender stopped: the next shard starts one"
        );
    }
}
