//! Prometheus metrics of a replica, named `ringpost_coord_<what>_<unit>`: its Raft state (from
//! openraft's metrics channel and the store's commit index), the cluster view it has applied,
//! and counters of its client listener and failure detector. [`render`] is sans-IO: it turns a
//! [`RaftSample`], a view and the counters into the text exposition format, so it is tested
//! without a running replica. Labels are bounded: a member state (4 values), a Raft role
//! (5 values), a replica id (at most [`crate::protocol::MAX_REPLICAS`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use openraft::{RaftMetrics, ServerState};
use tokio::sync::watch;

use crate::raft_types::RaftNode;
use crate::store::CommittedIndex;
use crate::types::{ClusterView, MemberState, NodeId};

/// Renders a replica's `ringpost_coord_*` metrics; cheap to clone, and holds nothing that keeps
/// the replica's store open (so it may outlive [`crate::Coordinator::shutdown`]). An
/// embedding process appends them to its own `/metrics` (the node does, in `dev`).
#[derive(Clone)]
pub struct MetricsProbe {
    pub(crate) raft: watch::Receiver<RaftMetrics<NodeId, RaftNode>>,
    pub(crate) views: watch::Receiver<Option<Arc<ClusterView>>>,
    pub(crate) committed: CommittedIndex,
    pub(crate) counters: Arc<CoordMetrics>,
}

impl MetricsProbe {
    /// Appends the metrics, in the Prometheus text format, to `out`.
    pub fn render(&self, out: &mut String) {
        let sample = RaftSample::from_raft(&self.raft.borrow(), self.committed.get());
        let view = self.views.borrow().clone();
        render(out, &sample, view.as_deref(), &self.counters);
    }
}

/// Counters and gauges the replica keeps itself (the rest is read at each scrape).
#[derive(Debug, Default)]
pub(crate) struct CoordMetrics {
    /// Client connections open now (authenticated or in their handshake).
    pub(crate) client_connections: AtomicI64,
    /// The bound on them (`--max-client-connections`).
    pub(crate) client_connections_max: AtomicI64,
    /// Client connections closed at accept because [`Self::client_connections_max`] were open.
    pub(crate) client_refused: AtomicU64,
    /// Client connections whose handshake failed (wrong secret, timeout, garbage).
    pub(crate) client_handshakes_failed: AtomicU64,
    /// Node heartbeats this replica answered as the leader.
    pub(crate) heartbeats: AtomicU64,
    /// Nodes this replica marked down as the leader (committed `mark_down` commands).
    pub(crate) nodes_marked_down: AtomicU64,
}

/// A replica's Raft role, as a metric label.
fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

const ROLES: [ServerState; 5] = [
    ServerState::Leader,
    ServerState::Follower,
    ServerState::Candidate,
    ServerState::Learner,
    ServerState::Shutdown,
];

const MEMBER_STATES: [MemberState; 4] = [
    MemberState::Joining,
    MemberState::Active,
    MemberState::Draining,
    MemberState::Down,
];

/// What the metrics need from openraft's [`RaftMetrics`] plus the store's commit index, as
/// plain values (so tests build one by hand).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RaftSample {
    pub(crate) replica_id: NodeId,
    pub(crate) role: ServerState,
    pub(crate) term: u64,
    pub(crate) leader: Option<NodeId>,
    pub(crate) last_log_index: Option<u64>,
    /// The last index this replica knows to be committed (saved by the log store).
    pub(crate) committed_index: Option<u64>,
    pub(crate) last_applied_index: Option<u64>,
    pub(crate) snapshot_index: Option<u64>,
    /// Replicas in the Raft voter set.
    pub(crate) voters: usize,
    /// Leader only, once a quorum has acknowledged it: time since the last quorum ack.
    pub(crate) quorum_ack_age_ms: Option<u64>,
    /// Leader only: each other voter's last matched log index (`None`: nothing matched yet).
    pub(crate) matched: Option<BTreeMap<NodeId, Option<u64>>>,
}

impl RaftSample {
    /// Reads a sample from openraft's metrics and the commit index the log store last saved.
    pub(crate) fn from_raft(m: &RaftMetrics<NodeId, RaftNode>, committed: Option<u64>) -> Self {
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        RaftSample {
            replica_id: m.id,
            role: m.state,
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            committed_index: committed,
            last_applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            voters: voters.len(),
            quorum_ack_age_ms: m.millis_since_quorum_ack,
            matched: m.replication.as_ref().map(|r| {
                (r.iter())
                    .filter(|(id, _)| **id != m.id && voters.contains(id))
                    .map(|(id, log)| (*id, log.map(|l| l.index)))
                    .collect()
            }),
        }
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

/// An optional log index as a gauge value: -1 when there is none yet.
fn index(i: Option<u64>) -> i128 {
    i.map_or(-1, i128::from)
}

/// Appends every `ringpost_coord_*` metric to `out`.
pub(crate) fn render(
    out: &mut String,
    raft: &RaftSample,
    view: Option<&ClusterView>,
    c: &CoordMetrics,
) {
    gauge(
        out,
        "ringpost_coord_replica_id",
        "This replica's id.",
        raft.replica_id,
    );
    gauge(
        out,
        "ringpost_coord_is_leader",
        "1 if this replica is the Raft leader, else 0.",
        u8::from(raft.role == ServerState::Leader),
    );
    gauge(
        out,
        "ringpost_coord_leader_id",
        "The leader this replica knows of (0: none known).",
        raft.leader.unwrap_or(0),
    );
    let _ = writeln!(
        out,
        "# HELP ringpost_coord_raft_role This replica's Raft role (1 for the current one).\n# TYPE ringpost_coord_raft_role gauge"
    );
    for role in ROLES {
        let _ = writeln!(
            out,
            "ringpost_coord_raft_role{{role=\"{}\"}} {}",
            role_name(role),
            u8::from(raft.role == role)
        );
    }
    gauge(
        out,
        "ringpost_coord_term",
        "The current Raft term (a new term per election).",
        raft.term,
    );
    gauge(
        out,
        "ringpost_coord_last_log_index",
        "Index of the last entry in this replica's Raft log (-1: empty).",
        index(raft.last_log_index),
    );
    gauge(
        out,
        "ringpost_coord_committed_index",
        "Index of the last entry this replica knows is committed (-1: none).",
        index(raft.committed_index),
    );
    gauge(
        out,
        "ringpost_coord_last_applied_index",
        "Index of the last entry applied to this replica's state machine (-1: none).",
        index(raft.last_applied_index),
    );
    gauge(
        out,
        "ringpost_coord_snapshot_index",
        "Index of the last entry in this replica's latest snapshot (-1: no snapshot).",
        index(raft.snapshot_index),
    );
    gauge(
        out,
        "ringpost_coord_voters",
        "Replicas in the Raft voter set.",
        raft.voters,
    );
    if raft.role == ServerState::Leader {
        if let Some(ms) = raft.quorum_ack_age_ms {
            gauge(
                out,
                "ringpost_coord_quorum_ack_age_seconds",
                "Leader only: time since a quorum last acknowledged this leader.",
                ms as f64 / 1000.0,
            );
        }
        if let Some(matched) = &raft.matched {
            let _ = writeln!(
                out,
                "# HELP ringpost_coord_replication_lag_entries Leader only: log entries a replica lacks (last log index minus its matched index).\n# TYPE ringpost_coord_replication_lag_entries gauge"
            );
            let last = index(raft.last_log_index);
            for (id, m) in matched {
                let lag = (last - index(*m)).max(0);
                let _ = writeln!(
                    out,
                    "ringpost_coord_replication_lag_entries{{replica=\"{id}\"}} {lag}"
                );
            }
        }
    }

    gauge(
        out,
        "ringpost_coord_initialized",
        "1 once this replica has applied the cluster's init, else 0.",
        u8::from(view.is_some()),
    );
    let _ = writeln!(
        out,
        "# HELP ringpost_coord_members Members (nodes) by state in this replica's applied view.\n# TYPE ringpost_coord_members gauge"
    );
    for state in MEMBER_STATES {
        let n = view.map_or(0, |v| v.members.iter().filter(|m| m.state == state).count());
        let _ = writeln!(
            out,
            "ringpost_coord_members{{state=\"{}\"}} {n}",
            state.as_str()
        );
    }
    gauge(
        out,
        "ringpost_coord_ring_epoch",
        "Ring epoch of this replica's applied view (0 before init).",
        view.map_or(0, |v| v.epoch),
    );
    gauge(
        out,
        "ringpost_coord_view_revision",
        "Raft log index of the last change to the applied view (0 before init).",
        view.map_or(0, |v| v.revision),
    );
    gauge(
        out,
        "ringpost_coord_shards",
        "Shards of the cluster (fixed at init; 0 before).",
        view.map_or(0, |v| v.shard_count),
    );
    gauge(
        out,
        "ringpost_coord_replication_factor",
        "Copies wanted of each shard, the primary included.",
        view.map_or(0, |v| v.replication_factor),
    );
    gauge(
        out,
        "ringpost_coord_shard_copies",
        "Copies each shard is placed on now: the factor, or fewer while fewer nodes are active.",
        view.map_or(0, ClusterView::copies),
    );
    gauge(
        out,
        "ringpost_coord_isr_shards",
        "Shards that have an in-sync replica set.",
        view.map_or(0, |v| v.in_sync_replicas.len()),
    );
    gauge(
        out,
        "ringpost_coord_isr_shards_under_replicated",
        "Shards whose in-sync replica set has fewer nodes than the copies placed.",
        view.map_or(0, |v| {
            let copies = v.copies() as usize;
            (v.in_sync_replicas.values())
                .filter(|nodes| nodes.len() < copies)
                .count()
        }),
    );

    gauge(
        out,
        "ringpost_coord_client_connections",
        "Client connections (nodes, ctl) open now.",
        c.client_connections.load(Relaxed),
    );
    gauge(
        out,
        "ringpost_coord_client_connections_max",
        "The bound on client connections (--max-client-connections).",
        c.client_connections_max.load(Relaxed),
    );
    counter(
        out,
        "ringpost_coord_client_refused_total",
        "Client connections closed at accept: the bound was reached.",
        c.client_refused.load(Relaxed),
    );
    counter(
        out,
        "ringpost_coord_client_handshakes_failed_total",
        "Client connections whose handshake failed (wrong secret, timeout, not our protocol).",
        c.client_handshakes_failed.load(Relaxed),
    );
    counter(
        out,
        "ringpost_coord_heartbeats_total",
        "Node heartbeats this replica answered as the leader.",
        c.heartbeats.load(Relaxed),
    );
    counter(
        out,
        "ringpost_coord_nodes_marked_down_total",
        "Nodes this replica marked down as the leader (missed heartbeats).",
        c.nodes_marked_down.load(Relaxed),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    fn leader() -> RaftSample {
        RaftSample {
            replica_id: 1,
            role: ServerState::Leader,
            term: 7,
            leader: Some(1),
            last_log_index: Some(42),
            committed_index: Some(41),
            last_applied_index: Some(40),
            snapshot_index: None,
            voters: 3,
            quorum_ack_age_ms: Some(120),
            matched: Some(BTreeMap::from([(2, Some(42)), (3, None)])),
        }
    }

    fn follower() -> RaftSample {
        RaftSample {
            replica_id: 2,
            role: ServerState::Follower,
            leader: Some(1),
            quorum_ack_age_ms: None,
            matched: None,
            ..leader()
        }
    }

    fn rendered(raft: &RaftSample, view: Option<&ClusterView>) -> String {
        let mut out = String::new();
        render(&mut out, raft, view, &CoordMetrics::default());
        out
    }

    /// The sample lines (name, labels and value) of the exposition.
    fn samples(out: &str) -> Vec<&str> {
        out.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn leader_reports_its_raft_state_and_replication_lag() {
        let out = rendered(&leader(), None);
        for line in [
            "ringpost_coord_replica_id 1",
            "ringpost_coord_is_leader 1",
            "ringpost_coord_leader_id 1",
            "ringpost_coord_raft_role{role=\"leader\"} 1",
            "ringpost_coord_raft_role{role=\"candidate\"} 0",
            "ringpost_coord_term 7",
            "ringpost_coord_last_log_index 42",
            "ringpost_coord_committed_index 41",
            "ringpost_coord_last_applied_index 40",
            "ringpost_coord_snapshot_index -1",
            "ringpost_coord_voters 3",
            "ringpost_coord_quorum_ack_age_seconds 0.12",
            "ringpost_coord_replication_lag_entries{replica=\"2\"} 0",
            "ringpost_coord_replication_lag_entries{replica=\"3\"} 43",
            "ringpost_coord_initialized 0",
            "ringpost_coord_ring_epoch 0",
        ] {
            assert!(samples(&out).contains(&line), "missing {line:?} in\n{out}");
        }
    }

    #[test]
    fn follower_has_no_leader_only_series() {
        let out = rendered(&follower(), None);
        assert!(
            samples(&out).contains(&"ringpost_coord_is_leader 0"),
            "{out}"
        );
        assert!(
            samples(&out).contains(&"ringpost_coord_leader_id 1"),
            "{out}"
        );
        assert!(!out.contains("quorum_ack_age"), "{out}");
        assert!(!out.contains("replication_lag"), "{out}");
        let none = RaftSample {
            leader: None,
            role: ServerState::Candidate,
            ..follower()
        };
        let out = rendered(&none, None);
        assert!(
            samples(&out).contains(&"ringpost_coord_leader_id 0"),
            "{out}"
        );
        assert!(
            samples(&out).contains(&"ringpost_coord_raft_role{role=\"candidate\"} 1"),
            "{out}"
        );
    }

    #[test]
    fn members_are_counted_by_state_every_state_present() {
        let mut view = testing::view(
            5,
            64,
            2,
            &[
                (1, MemberState::Active),
                (2, MemberState::Active),
                (3, MemberState::Down),
                (4, MemberState::Joining),
            ],
        );
        // One shard fully in sync (2 copies), one with its primary alone.
        view.in_sync_replicas.insert(0, vec![1, 2]);
        view.in_sync_replicas.insert(1, vec![2]);
        let out = rendered(&leader(), Some(&view));
        for line in [
            "ringpost_coord_initialized 1",
            "ringpost_coord_members{state=\"active\"} 2",
            "ringpost_coord_members{state=\"joining\"} 1",
            "ringpost_coord_members{state=\"draining\"} 0",
            "ringpost_coord_members{state=\"down\"} 1",
            "ringpost_coord_ring_epoch 5",
            "ringpost_coord_view_revision 5",
            "ringpost_coord_shards 64",
            "ringpost_coord_replication_factor 2",
            "ringpost_coord_shard_copies 2",
            "ringpost_coord_isr_shards 2",
            "ringpost_coord_isr_shards_under_replicated 1",
        ] {
            assert!(samples(&out).contains(&line), "missing {line:?} in\n{out}");
        }
    }

    #[test]
    fn every_series_has_help_and_type_once() {
        let c = CoordMetrics::default();
        c.heartbeats.store(9, Relaxed);
        c.client_connections.store(3, Relaxed);
        let view = testing::view(1, 16, 2, &[(1, MemberState::Active)]);
        let mut out = String::new();
        render(&mut out, &leader(), Some(&view), &c);
        assert!(
            out.contains("\nringpost_coord_heartbeats_total 9\n"),
            "{out}"
        );
        assert!(
            out.contains("\nringpost_coord_client_connections 3\n"),
            "{out}"
        );
        let mut typed = std::collections::BTreeSet::new();
        for l in out.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(typed.insert(name), "{name} typed twice");
                assert!(name.starts_with("ringpost_coord_"), "{name}");
            }
        }
        for l in samples(&out) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(typed.contains(name), "{name} has no TYPE line");
            let value = l.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
    }
}
