//! What a replica does with each client request, independent of the listener: proposals through
//! Raft, leader checks, linearizable reads, `init`, and the failure-detector driver.
//!
//! Writes go through `Raft::client_write` on this replica; a follower answers
//! [`ErrorCode::NotLeader`] with the leader's client address, and the client retries there (the
//! client follows hints; replicas never forward).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::ServerState;
use tokio::sync::watch;

use crate::detector::FailureDetector;
use crate::metrics::{CoordMetrics, MetricsProbe};
use crate::protocol::{ErrorCode, InitSpec, LeaderHint, WireError, MAX_REPLICAS};
use crate::raft_types::{Raft, RaftNode};
use crate::state::{ApplyOutcome, Command};
use crate::store::CommittedIndex;
use crate::types::{
    ClusterView, HeartbeatAck, MemberState, NodeId, NodeInfo, ReplicaInfo, StatusReport,
    MAX_ADDRESS_BYTES,
};

/// How long `init` waits for the new cluster to elect a leader.
const INIT_LEADER_WAIT: Duration = Duration::from_secs(10);
/// Longest a heartbeat waits for a `mark_down` of its node in flight ([`MarkingDown`]); past
/// it, the heartbeat gets an error (no lease) and the node tries again at its next one.
const MARK_DOWN_WAIT_MS: u64 = 5_000;
/// Failure-detector tick before `init` (nothing to watch yet).
const IDLE_TICK: Duration = Duration::from_millis(200);

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Shared by the client listener, the detector driver and the [`crate::Coordinator`] handle.
#[derive(Clone)]
pub(crate) struct Service {
    pub(crate) raft: Raft,
    pub(crate) me: ReplicaInfo,
    pub(crate) views: watch::Receiver<Option<Arc<ClusterView>>>,
    pub(crate) detector: Arc<Mutex<FailureDetector>>,
    /// The replica's own counters (the rest of its metrics is read at each scrape).
    pub(crate) metrics: Arc<CoordMetrics>,
    /// The commit index the log store last saved.
    pub(crate) committed: CommittedIndex,
    /// The last view pushed to watchers, serialized once for all of them.
    pub(crate) pushed_view: Arc<Mutex<Option<EncodedView>>>,
    /// Nodes a `mark_down` is being proposed for.
    pub(crate) marking_down: MarkingDown,
}

/// The nodes a `mark_down` is being proposed for. A heartbeat from one of them waits until that
/// write is done and is answered from the view after it. Answered from the view before it, the
/// node was told "active" (a lease) by a leader about to commit it down: its shards then failed
/// over while it held that lease, and it stayed down until its next heartbeat revived it. The
/// detector decides on heartbeats it has seen, so a node that heartbeats between the decision
/// and the commit is down once the commit lands; this makes its heartbeat say so.
#[derive(Clone)]
pub(crate) struct MarkingDown(watch::Sender<BTreeSet<NodeId>>);

impl Default for MarkingDown {
    fn default() -> Self {
        MarkingDown(watch::channel(BTreeSet::new()).0)
    }
}

impl MarkingDown {
    /// Marks `nodes` as being marked down until the guard is dropped.
    fn begin(&self, nodes: &[NodeId]) -> MarkingDownGuard {
        self.0.send_modify(|s| s.extend(nodes));
        MarkingDownGuard {
            set: self.clone(),
            nodes: nodes.to_vec(),
        }
    }

    /// Resolves once no `mark_down` of `node` is in flight.
    async fn settled(&self, node: NodeId) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|s| !s.contains(&node)).await;
    }
}

/// Ends a [`MarkingDown::begin`] when the write is done (or its task is dropped).
struct MarkingDownGuard {
    set: MarkingDown,
    nodes: Vec<NodeId>,
}

impl Drop for MarkingDownGuard {
    fn drop(&mut self) {
        self.set.0.send_modify(|s| {
            for n in &self.nodes {
                s.remove(n);
            }
        });
    }
}

/// A view's `ClientResponse::View` frame payload.
pub(crate) struct EncodedView {
    pub(crate) revision: u64,
    pub(crate) payload: Arc<Vec<u8>>,
}

impl Service {
    fn view_now(&self) -> Result<Arc<ClusterView>, WireError> {
        self.views
            .borrow()
            .clone()
            .ok_or_else(|| WireError::new(ErrorCode::NotInitialized, "cluster not initialized"))
    }

    fn leader_hint(&self, leader: Option<NodeId>, node: Option<&RaftNode>) -> WireError {
        match (leader, node) {
            (Some(id), Some(n)) if id != self.me.replica_id => WireError {
                code: ErrorCode::NotLeader,
                message: format!(
                    "replica {} is not the leader; leader is {id}",
                    self.me.replica_id
                ),
                leader: Some(LeaderHint {
                    replica_id: id,
                    client_addr: n.client_addr.clone(),
                }),
            },
            _ => WireError::new(ErrorCode::NoLeader, "no leader known; retry"),
        }
    }

    /// The leader as this replica knows it, without a round trip.
    fn not_leader(&self) -> Option<WireError> {
        let m = self.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            return None;
        }
        let node = m
            .current_leader
            .and_then(|id| m.membership_config.membership().get_node(&id).cloned());
        Some(self.leader_hint(m.current_leader, node.as_ref()))
    }

    /// Proposes a command; `Ok` once applied on this (leader) replica.
    pub(crate) async fn write(&self, cmd: Command) -> Result<Arc<ClusterView>, WireError> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => match resp.data {
                ApplyOutcome::Applied { .. } | ApplyOutcome::Nothing => self.view_now(),
                ApplyOutcome::Refused(e) => Err(e.into()),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(self.leader_hint(f.leader_id, f.leader_node.as_ref()))
            }
            Err(RaftError::APIError(e)) => Err(WireError::new(ErrorCode::Internal, e.to_string())),
            Err(RaftError::Fatal(e)) => Err(WireError::new(ErrorCode::ShuttingDown, e.to_string())),
        }
    }

    /// Linearizable read of the view (leader only).
    pub(crate) async fn read_view(&self) -> Result<Arc<ClusterView>, WireError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => self.view_now(),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(self.leader_hint(f.leader_id, f.leader_node.as_ref()))
            }
            Err(RaftError::APIError(e)) => Err(WireError::new(ErrorCode::NoLeader, e.to_string())),
            Err(RaftError::Fatal(e)) => Err(WireError::new(ErrorCode::ShuttingDown, e.to_string())),
        }
    }

    pub(crate) async fn join(&self, info: NodeInfo) -> Result<Arc<ClusterView>, WireError> {
        info.validate()
            .map_err(|m| WireError::new(ErrorCode::InvalidRequest, m))?;
        let node_id = info.node_id;
        let view = self
            .write(Command::Join {
                info,
                at_ms: now_ms(),
            })
            .await?;
        self.record_heartbeat(node_id);
        Ok(view)
    }

    /// Changes the replication factor; a factor out of bounds is refused before it is proposed.
    pub(crate) async fn set_replication(&self, factor: u32) -> Result<Arc<ClusterView>, WireError> {
        crate::state::validate_replication_factor(factor)?;
        self.write(Command::SetReplication { factor }).await
    }

    fn record_heartbeat(&self, node_id: NodeId) {
        if let Ok(mut d) = self.detector.lock() {
            d.handle_heartbeat(node_id, Instant::now());
        }
    }

    /// A node heartbeat. Leader only (cheap check, no quorum round): a deposed leader that does
    /// not know it yet may record it, which at worst delays a `down` by one timeout.
    pub(crate) async fn heartbeat(&self, node_id: NodeId) -> Result<HeartbeatAck, WireError> {
        if let Some(e) = self.not_leader() {
            return Err(e);
        }
        if self.view_now()?.member(node_id).is_none() {
            let e = WireError::new(ErrorCode::UnknownNode, format!("unknown node {node_id}"));
            return Err(e);
        }
        // Recorded before the check below, and the detector begins a `mark_down` under the
        // same lock it decides under: either it saw this heartbeat, or the wait sees its write.
        self.record_heartbeat(node_id);
        self.metrics
            .heartbeats
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bound = Duration::from_millis(MARK_DOWN_WAIT_MS);
        if (tokio::time::timeout(bound, self.marking_down.settled(node_id)).await).is_err() {
            // No answer rather than a lease the write may still break.
            let e = format!("a mark_down of node {node_id} is still being written; retry");
            return Err(WireError::new(ErrorCode::Internal, e));
        }
        let view = self.view_now()?;
        let member = view.member(node_id).ok_or_else(|| {
            WireError::new(ErrorCode::UnknownNode, format!("unknown node {node_id}"))
        })?;
        if member.state != MemberState::Down {
            return Ok(HeartbeatAck {
                state: member.state,
                epoch: view.epoch,
            });
        }
        tracing::info!(node_id, "down node heartbeated: reviving as joining");
        let view = self
            .write(Command::Revive {
                node_id,
                at_ms: now_ms(),
            })
            .await?;
        let state = view.member(node_id).map_or(MemberState::Down, |m| m.state);
        Ok(HeartbeatAck {
            state,
            epoch: view.epoch,
        })
    }

    /// What renders this replica's `ringpost_coord_*` metrics.
    pub(crate) fn metrics_probe(&self) -> MetricsProbe {
        MetricsProbe {
            raft: self.raft.metrics(),
            views: self.views.clone(),
            committed: self.committed.clone(),
            counters: self.metrics.clone(),
        }
    }

    pub(crate) fn status(&self) -> StatusReport {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let replicas = membership
            .nodes()
            .filter(|(id, _)| voters.contains(id))
            .map(|(id, n)| ReplicaInfo {
                replica_id: *id,
                raft_addr: n.raft_addr.clone(),
                client_addr: n.client_addr.clone(),
            })
            .collect();
        StatusReport {
            replica: self.me.clone(),
            raft_role: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .to_owned(),
            term: m.current_term,
            leader_id: m.current_leader,
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            replicas,
            view: self.views.borrow().as_deref().cloned(),
        }
    }

    /// Creates the cluster: initializes Raft with the replica set (if not yet), waits for a
    /// leader, and proposes the cluster config. Safe to repeat with the same spec.
    pub(crate) async fn init(&self, spec: InitSpec) -> Result<Arc<ClusterView>, WireError> {
        let invalid = |m: String| WireError::new(ErrorCode::InvalidRequest, m);
        spec.config.validate()?;
        if spec.replicas.is_empty() || spec.replicas.len() > MAX_REPLICAS {
            return Err(invalid(format!(
                "replica set must have 1..={MAX_REPLICAS} replicas"
            )));
        }
        let mut nodes = BTreeMap::new();
        for r in &spec.replicas {
            if r.raft_addr.len() > MAX_ADDRESS_BYTES || r.client_addr.len() > MAX_ADDRESS_BYTES {
                return Err(invalid("replica address too long".into()));
            }
            let node = RaftNode {
                raft_addr: r.raft_addr.clone(),
                client_addr: r.client_addr.clone(),
            };
            if nodes.insert(r.replica_id, node).is_some() {
                return Err(invalid(format!("replica id {} listed twice", r.replica_id)));
            }
        }
        if !nodes.contains_key(&self.me.replica_id) {
            return Err(invalid(format!(
                "replica set does not include the replica asked ({})",
                self.me.replica_id
            )));
        }
        match self.raft.initialize(nodes).await {
            Ok(()) => tracing::info!(replicas = spec.replicas.len(), "raft initialized"),
            // Already initialized (a retry, or another replica went first): carry on.
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
            Err(RaftError::APIError(e)) => return Err(invalid(e.to_string())),
            Err(RaftError::Fatal(e)) => {
                return Err(WireError::new(ErrorCode::ShuttingDown, e.to_string()))
            }
        }
        let _ = self
            .raft
            .wait(Some(INIT_LEADER_WAIT))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await;
        self.write(Command::Init(spec.config)).await
    }
}

/// Runs the failure detector until `shutdown`: on the leader, proposes `mark_down` for members
/// silent for longer than the view's timeout.
pub(crate) async fn run_failure_detector(svc: Service, mut shutdown: watch::Receiver<bool>) {
    loop {
        let tick = svc.views.borrow().as_ref().map_or(IDLE_TICK, |v| {
            Duration::from_millis((v.heartbeat_interval_ms / 2).max(5))
        });
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = crate::service::stopped(&mut shutdown) => return,
        }
        let (state, term) = {
            let m = svc.raft.metrics();
            let m = m.borrow();
            (m.state, m.current_term)
        };
        let Some(view) = svc.views.borrow().clone() else {
            continue;
        };
        let (expired, _marking) = {
            let Ok(mut d) = svc.detector.lock() else {
                return;
            };
            if state != ServerState::Leader {
                d.handle_step_down();
                continue;
            }
            let expired = d.poll_expired(term, &view, Instant::now());
            if expired.is_empty() {
                continue;
            }
            let marking = svc.marking_down.begin(&expired);
            (expired, marking)
        };
        tracing::warn!(nodes = ?expired, "nodes missed heartbeats: marking down");
        let count = expired.len() as u64;
        match svc
            .write(Command::MarkDown {
                node_ids: expired,
                at_ms: now_ms(),
            })
            .await
        {
            Ok(v) => {
                svc.metrics
                    .nodes_marked_down
                    .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(epoch = v.epoch, "marked down");
            }
            Err(e) => tracing::warn!(error = %e, "mark_down not committed"),
        }
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heartbeat's wait ends when the `mark_down` of its node is done, however that write
    /// ended (the guard is dropped), and does not wait for other nodes' writes.
    #[tokio::test]
    async fn a_heartbeat_waits_for_its_nodes_mark_down_only() {
        let marking = MarkingDown::default();
        let guard = marking.begin(&[3, 5]);
        let waiting = tokio::spawn({
            let marking = marking.clone();
            async move { marking.settled(3).await }
        });
        tokio::time::timeout(Duration::from_secs(5), marking.settled(4))
            .await
            .expect("node 4 is not being marked down");
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "node 3's mark_down is in flight");
        drop(guard);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the wait ends with the write")
            .unwrap();
        assert!(marking.0.borrow().is_empty());
    }
}
