//! The failure detector, sans-IO: the leader records node heartbeats and asks which members have
//! been silent for `heartbeat_interval_ms * heartbeat_miss_limit` (both fixed at `init`, so every
//! leader uses the same timeout). Time comes in as `now`.
//!
//! Heartbeats are not replicated: only the leader keeps `last_seen`, in memory. A new leader (a
//! new term) starts every member's clock afresh, so a failover never marks a live node down, at
//! the cost of detecting a node that died just before the failover one timeout later. Marking a
//! node down is a Raft command (`mark_down`) proposed by the driver, so every replica agrees on
//! the resulting epoch.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::types::{ClusterView, MemberState, NodeId};

/// Per-leader heartbeat bookkeeping. Holds at most one entry per member of the last view polled
/// (at most [`crate::types::MAX_MEMBERS`]).
#[derive(Debug, Default)]
pub struct FailureDetector {
    term: Option<u64>,
    last_seen: HashMap<NodeId, Instant>,
}

impl FailureDetector {
    /// An empty detector.
    pub fn new() -> Self {
        Self::default()
    }

    /// A heartbeat (or join) from a member, received by the leader.
    pub fn handle_heartbeat(&mut self, node_id: NodeId, now: Instant) {
        if self.term.is_some() {
            self.last_seen.insert(node_id, now);
        }
    }

    /// This replica is no longer leader: forget everything.
    pub fn handle_step_down(&mut self) {
        self.term = None;
        self.last_seen.clear();
    }

    /// Called periodically on the leader of `term`: returns the members (not already down)
    /// whose last heartbeat is older than the view's timeout.
    pub fn poll_expired(&mut self, term: u64, view: &ClusterView, now: Instant) -> Vec<NodeId> {
        if self.term != Some(term) {
            self.term = Some(term);
            self.last_seen.clear();
        }
        let timeout = Duration::from_millis(
            view.heartbeat_interval_ms
                .saturating_mul(u64::from(view.heartbeat_miss_limit)),
        );
        self.last_seen.retain(|id, _| view.member(*id).is_some());
        let mut expired = Vec::new();
        for m in &view.members {
            if m.state == MemberState::Down {
                continue;
            }
            let seen = *self.last_seen.entry(m.node_id()).or_insert(now);
            if now.saturating_duration_since(seen) > timeout {
                expired.push(m.node_id());
            }
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::types::{Member, NodeInfo};

    fn view(states: &[(NodeId, MemberState)]) -> ClusterView {
        ClusterView {
            cluster_id: "c".into(),
            epoch: 1,
            revision: 1,
            shard_count: 16,
            replication_factor: 1,
            heartbeat_interval_ms: 100,
            heartbeat_miss_limit: 3,
            members: states
                .iter()
                .map(|&(id, state)| Member {
                    info: NodeInfo::new(id),
                    state,
                    state_since_ms: 0,
                })
                .collect(),
            in_sync_replicas: BTreeMap::new(),
        }
    }

    #[test]
    fn silent_members_expire_after_interval_times_limit() {
        let t0 = Instant::now();
        let v = view(&[(1, MemberState::Active), (2, MemberState::Joining)]);
        let mut d = FailureDetector::new();
        assert!(
            d.poll_expired(1, &v, t0).is_empty(),
            "grace at leadership start"
        );
        d.handle_heartbeat(1, t0 + Duration::from_millis(250));
        assert!(d
            .poll_expired(1, &v, t0 + Duration::from_millis(300))
            .is_empty());
        assert_eq!(
            d.poll_expired(1, &v, t0 + Duration::from_millis(301)),
            vec![2]
        );
        assert_eq!(
            d.poll_expired(1, &v, t0 + Duration::from_millis(551)),
            vec![1, 2]
        );
    }

    #[test]
    fn new_term_resets_and_down_members_are_skipped() {
        let t0 = Instant::now();
        let v = view(&[(1, MemberState::Active), (2, MemberState::Down)]);
        let mut d = FailureDetector::new();
        d.poll_expired(1, &v, t0);
        let late = t0 + Duration::from_secs(10);
        assert_eq!(d.poll_expired(1, &v, late), vec![1]);
        assert!(
            d.poll_expired(2, &v, late).is_empty(),
            "new leader, fresh clocks"
        );
        d.handle_step_down();
        d.handle_heartbeat(1, late);
        assert!(d.last_seen.is_empty(), "followers record nothing");
    }

    #[test]
    fn removed_members_are_forgotten() {
        let t0 = Instant::now();
        let mut d = FailureDetector::new();
        d.poll_expired(1, &view(&[(1, MemberState::Active)]), t0);
        d.poll_expired(1, &view(&[]), t0);
        assert!(d.last_seen.is_empty());
    }
}
