//! The shard → node table of one ring epoch, computed from the coordinator's view.
//!
//! Every node computes the same table from the same [`ClusterView`]: the active members are
//! placed on a consistent-hash ring ([`hashring`], SipHash with fixed keys) with
//! [`VNODES_PER_NODE`] virtual nodes each, and each shard is owned by the first virtual node at
//! or after the shard's point. Adding or removing a member therefore moves only the shards
//! next to its virtual nodes (about `1/n` of them), which keeps hand-offs small.
//!
//! A [`Ring`] is immutable; the node swaps the whole snapshot (an `Arc`) when the epoch changes.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use hashring::HashRing;
use ringpost_coordinator::{ClusterView, Member, MemberState, NodeId};
use ringpost_wire::UserId;

use crate::shard::{shard_of, ShardId};

/// Virtual nodes per member. More spread the shards more evenly (the spread of one member's
/// share is roughly `1/sqrt(VNODES_PER_NODE)`), at the cost of a slightly larger ring to
/// compute once per epoch (microseconds).
pub const VNODES_PER_NODE: u32 = 128;

/// One point of a member on the ring. Hashed from fixed little-endian bytes so that every
/// node, whatever its platform, places it at the same point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VNode {
    node: NodeId,
    index: u32,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut bytes = [0u8; 12];
        bytes[..8].copy_from_slice(&self.node.to_le_bytes());
        bytes[8..].copy_from_slice(&self.index.to_le_bytes());
        state.write(&bytes);
    }
}

/// A shard's point on the ring.
struct ShardPoint(ShardId);

impl Hash for ShardPoint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&[b's', b'h', (self.0 >> 8) as u8, self.0 as u8]);
    }
}

/// The routing table of one epoch.
#[derive(Debug, Clone)]
pub struct Ring {
    pub epoch: u64,
    pub shard_count: u16,
    /// Owner of each shard; empty when no member is active.
    owners: Box<[NodeId]>,
    /// Every member of the view (any state), by id.
    members: BTreeMap<NodeId, Member>,
}

impl Ring {
    /// The table for a view. `shard_count` is the cluster's (views carry it as `u32`; a value
    /// that does not fit is clamped, which `init` never allows).
    pub fn from_view(view: &ClusterView) -> Ring {
        let shard_count = u16::try_from(view.shard_count.max(1)).unwrap_or(u16::MAX);
        let owners: Vec<NodeId> = view.owners().map(Member::node_id).collect();
        Ring::build(
            view.epoch,
            shard_count,
            &owners,
            view.members.iter().cloned(),
        )
    }

    fn build(
        epoch: u64,
        shard_count: u16,
        owners: &[NodeId],
        members: impl Iterator<Item = Member>,
    ) -> Ring {
        let mut ring = HashRing::new();
        ring.batch_add(
            owners
                .iter()
                .flat_map(|&node| (0..VNODES_PER_NODE).map(move |index| VNode { node, index }))
                .collect(),
        );
        let owners = if ring.is_empty() {
            Box::default()
        } else {
            (0..shard_count)
                .map(|s| ring.get(&ShardPoint(s)).map_or(0, |v| v.node))
                .collect()
        };
        Ring {
            epoch,
            shard_count,
            owners,
            members: members.map(|m| (m.node_id(), m)).collect(),
        }
    }

    /// A ring with no members (before the node has joined).
    pub fn empty(shard_count: u16) -> Ring {
        Ring::build(0, shard_count, &[], std::iter::empty())
    }

    /// The ring as it would be if every `down` (or `joining`) member were active: a shard
    /// whose owner there is such a member may have its rows on that member, which cannot hand
    /// them off until it is active again (or removed for good).
    pub fn with_down_members(&self) -> Ring {
        let owners: Vec<NodeId> = self
            .members
            .values()
            .filter(|m| m.state != MemberState::Draining)
            .map(Member::node_id)
            .collect();
        Ring::build(
            self.epoch,
            self.shard_count,
            &owners,
            self.members.values().cloned(),
        )
    }

    /// The owner of a shard, if any member is active.
    pub fn owner(&self, shard: ShardId) -> Option<NodeId> {
        self.owners.get(usize::from(shard)).copied()
    }

    /// The shard of a user under this cluster's shard count.
    pub fn shard_of(&self, user: UserId) -> ShardId {
        shard_of(user, self.shard_count)
    }

    /// The owner of a user's shard.
    pub fn owner_of(&self, user: UserId) -> Option<NodeId> {
        self.owner(self.shard_of(user))
    }

    /// A member of the view, in any state.
    pub fn member(&self, node: NodeId) -> Option<&Member> {
        self.members.get(&node)
    }

    /// Every member of the view.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// The state of a member, if it is one.
    pub fn state_of(&self, node: NodeId) -> Option<MemberState> {
        self.member(node).map(|m| m.state)
    }

    /// The shards a node owns, ascending.
    pub fn shards_of(&self, node: NodeId) -> impl Iterator<Item = ShardId> + '_ {
        self.owners
            .iter()
            .enumerate()
            .filter(move |(_, &o)| o == node)
            .map(|(s, _)| s as ShardId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ringpost_coordinator::NodeInfo;

    fn member(id: NodeId, state: MemberState) -> Member {
        Member {
            info: NodeInfo::new(id),
            state,
            state_since_ms: 0,
        }
    }

    fn ring(epoch: u64, shards: u16, active: &[NodeId]) -> Ring {
        Ring::build(
            epoch,
            shards,
            active,
            active.iter().map(|&id| member(id, MemberState::Active)),
        )
    }

    #[test]
    fn placement_is_pinned() {
        // Every node must compute the same table, in every version: a change here moves data.
        let r = ring(1, 4096, &[1, 2, 3]);
        let first: Vec<NodeId> = (0..8).map(|s| r.owner(s).unwrap()).collect();
        assert_eq!(first, PINNED_FIRST_OWNERS);
    }

    const PINNED_FIRST_OWNERS: [NodeId; 8] = [2, 3, 2, 3, 1, 1, 3, 2];

    #[test]
    fn shares_are_balanced() {
        let r = ring(1, 4096, &[1, 2, 3, 4, 5]);
        for n in 1..=5 {
            let share = r.shards_of(n).count();
            // 819 each if perfect; 128 virtual nodes keep every share within ±25%.
            assert!((614..=1024).contains(&share), "node {n} owns {share}");
        }
    }

    #[test]
    fn only_active_members_own_shards() {
        let view = ClusterView {
            cluster_id: "c".into(),
            epoch: 7,
            revision: 9,
            shard_count: 64,
            replication_factor: 1,
            heartbeat_interval_ms: 100,
            heartbeat_miss_limit: 5,
            members: vec![
                member(1, MemberState::Active),
                member(2, MemberState::Draining),
                member(3, MemberState::Down),
                member(4, MemberState::Joining),
            ],
            in_sync_replicas: Default::default(),
        };
        let r = Ring::from_view(&view);
        assert_eq!(r.epoch, 7);
        assert!((0..64).all(|s| r.owner(s) == Some(1)));
        assert_eq!(r.state_of(2), Some(MemberState::Draining));
        assert_eq!(r.members().count(), 4);
        assert_eq!(Ring::empty(64).owner(0), None);
    }

    proptest! {
        /// Adding a member moves shards only to it; removing one moves only its shards.
        #[test]
        fn membership_changes_move_the_minimum(
            ids in proptest::collection::btree_set(1u64..1000, 2..8),
            extra in 1000u64..2000,
        ) {
            let ids: Vec<NodeId> = ids.into_iter().collect();
            let before = ring(1, 1024, &ids);
            let mut more = ids.clone();
            more.push(extra);
            let after = ring(2, 1024, &more);
            for s in 0..1024 {
                let (a, b) = (before.owner(s).unwrap(), after.owner(s).unwrap());
                prop_assert!(a == b || b == extra);
            }
            let gone = ids[0];
            let fewer: Vec<NodeId> = ids[1..].to_vec();
            let after = ring(3, 1024, &fewer);
            for s in 0..1024 {
                let (a, b) = (before.owner(s).unwrap(), after.owner(s).unwrap());
                prop_assert!(a == b || a == gone);
                prop_assert!(b != gone);
            }
        }

        /// The order members are listed in does not matter.
        #[test]
        fn table_is_independent_of_member_order(
            ids in proptest::collection::btree_set(1u64..1000, 1..6),
        ) {
            let ids: Vec<NodeId> = ids.into_iter().collect();
            let mut reversed = ids.clone();
            reversed.reverse();
            let (a, b) = (ring(1, 512, &ids), ring(1, 512, &reversed));
            prop_assert!((0..512).all(|s| a.owner(s) == b.owner(s)));
        }
    }
}
