//! The shard → node table of one ring epoch, computed from the coordinator's view.
//!
//! Every node computes the same table from the same [`ClusterView`]: the active members are
//! placed on a consistent-hash ring ([`hashring`], SipHash with fixed keys) with
//! [`VNODES_PER_NODE`] virtual nodes each, and each shard is owned by the first virtual node at
//! or after the shard's point. Adding or removing a member therefore moves only the shards
//! next to its virtual nodes (about `1/n` of them), which keeps hand-offs small.
//!
//! Each shard is placed on `copies = min(replication factor, active members)` nodes: its owner
//! (the primary, as above) first, then replicas chosen walking clockwise on the same ring,
//! preferring zones that hold no copy yet (see [`replicas`] for the rule). The table is
//! computed once per epoch, so [`Ring::replicas`] is a slice lookup. Placement only: the data
//! path that fills the replicas does not exist yet.
//!
//! A shard with an in-sync replica set in the view (`ClusterView::in_sync_replicas`, primary
//! first) is the exception: its primary is the set's first node, wherever the hash puts it
//! (after a failover, or while a live move has not flipped yet), and its nodes are the set's
//! nodes followed by the placed ones not in it ([`Ring::in_sync`] gives the set itself).
//!
//! A [`Ring`] is immutable; the node swaps the whole snapshot (an `Arc`) when the epoch changes.

mod replicas;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use hashring::HashRing;
use ringpost_coordinator::types::effective_copies;
use ringpost_coordinator::{ClusterView, Member, MemberState, NodeId};
use ringpost_wire::UserId;

use self::replicas::RingOrder;
pub use self::replicas::COPIES_MAX;
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
    /// The replication factor of the view (copies wanted per shard).
    replication_factor: u32,
    /// Copies each shard has: `min(replication_factor, active members)`; 0 when none is active.
    copies: usize,
    /// The nodes of each shard, primary first: shard `s` is `placement[s * copies..][..copies]`.
    /// Empty when no member is active.
    placement: Box<[NodeId]>,
    /// Every member of the view (any state), by id.
    members: BTreeMap<NodeId, Member>,
    /// Per shard, its in-sync set if the view gives it one; empty when the view has none.
    isr: Box<[Option<InSync>]>,
}

/// A shard's nodes when it has an in-sync set: the set first (`nodes[..in_sync]`, primary
/// first), then the placed nodes not in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InSync {
    nodes: Box<[NodeId]>,
    in_sync: usize,
}

impl Ring {
    /// The table for a view. `shard_count` is the cluster's (views carry it as `u32`; a value
    /// that does not fit is clamped, which `init` never allows).
    pub fn from_view(view: &ClusterView) -> Ring {
        let shard_count = u16::try_from(view.shard_count.max(1)).unwrap_or(u16::MAX);
        let owners: Vec<NodeId> = view.owners().map(Member::node_id).collect();
        let mut ring = Ring::build(
            view.epoch,
            shard_count,
            &owners,
            view.replication_factor,
            view.members.iter().cloned(),
        );
        ring.set_in_sync(&view.in_sync_replicas);
        ring
    }

    /// Applies the view's in-sync sets (see the module doc). Entries for shards out of range
    /// or empty are ignored (the coordinator never makes them).
    fn set_in_sync(&mut self, sets: &BTreeMap<u32, Vec<NodeId>>) {
        if sets.is_empty() {
            return;
        }
        let mut isr = vec![None; usize::from(self.shard_count)];
        for (&shard, set) in sets {
            let Some(slot) = isr.get_mut(shard as usize) else {
                continue;
            };
            if set.is_empty() {
                continue;
            }
            let placed = self.placed(shard as ShardId);
            let mut nodes = set.clone();
            nodes.extend(placed.iter().filter(|n| !set.contains(n)));
            *slot = Some(InSync {
                nodes: nodes.into_boxed_slice(),
                in_sync: set.len(),
            });
        }
        self.isr = isr.into_boxed_slice();
    }

    fn build(
        epoch: u64,
        shard_count: u16,
        owners: &[NodeId],
        replication_factor: u32,
        members: impl Iterator<Item = Member>,
    ) -> Ring {
        let members: BTreeMap<NodeId, Member> = members.map(|m| (m.node_id(), m)).collect();
        let mut ids = owners.to_vec();
        ids.sort_unstable();
        ids.dedup();
        // A view always carries 1..=COPIES_MAX; anything else is clamped, never a panic.
        let factor = replication_factor.max(1);
        let copies = (effective_copies(factor, ids.len()) as usize).min(COPIES_MAX);
        let mut ring = HashRing::new();
        ring.batch_add(
            ids.iter()
                .flat_map(|&node| (0..VNODES_PER_NODE).map(move |index| VNode { node, index }))
                .collect(),
        );
        let placement = if ring.is_empty() {
            Box::default()
        } else {
            place(&ring, &ids, &members, shard_count, copies)
        };
        Ring {
            epoch,
            shard_count,
            replication_factor,
            copies,
            placement,
            members,
            isr: Box::default(),
        }
    }

    /// A ring with no members (before the node has joined).
    pub fn empty(shard_count: u16) -> Ring {
        Ring::build(0, shard_count, &[], 1, std::iter::empty())
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
        let mut ring = Ring::build(
            self.epoch,
            self.shard_count,
            &owners,
            self.replication_factor,
            self.members.values().cloned(),
        );
        ring.isr = self.isr.clone();
        ring
    }

    /// The owner (primary) of a shard, if any member is active.
    pub fn owner(&self, shard: ShardId) -> Option<NodeId> {
        self.replicas(shard).first().copied()
    }

    /// The nodes a shard is placed on, primary first, then its replicas; [`Ring::copies`] of
    /// them, distinct. Empty when no member is active (or the shard is out of range). For a
    /// shard with an in-sync set: the set (its primary first), then the placed nodes not in it.
    pub fn replicas(&self, shard: ShardId) -> &[NodeId] {
        if let Some(Some(set)) = self.isr.get(usize::from(shard)) {
            return &set.nodes;
        }
        self.placed(shard)
    }

    /// The shard's in-sync set, primary first, if the view gives it one. Its primary waits for
    /// every node of it before it acknowledges a write.
    pub fn in_sync(&self, shard: ShardId) -> Option<&[NodeId]> {
        match self.isr.get(usize::from(shard)) {
            Some(Some(set)) => Some(&set.nodes[..set.in_sync]),
            _ => None,
        }
    }

    /// Whether both rings give every shard the same in-sync set (a view can change them
    /// without changing the epoch or the members).
    pub fn same_in_sync(&self, other: &Ring) -> bool {
        self.isr == other.isr
    }

    /// Where the hash ring places a shard, whatever its in-sync set says: its hash owner
    /// first, then its replicas ([`Ring::copies`] of them).
    pub fn placed(&self, shard: ShardId) -> &[NodeId] {
        let start = usize::from(shard) * self.copies;
        self.placement
            .get(start..start + self.copies)
            .unwrap_or_default()
    }

    /// Copies each shard has at this epoch: `min(replication factor, active members)`.
    pub fn copies(&self) -> usize {
        self.copies
    }

    /// The replication factor of the view this ring was computed from.
    pub fn replication_factor(&self) -> u32 {
        self.replication_factor
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

    /// The shards a node owns (is primary for), ascending.
    pub fn shards_of(&self, node: NodeId) -> impl Iterator<Item = ShardId> + '_ {
        (0..self.shard_count).filter(move |&s| self.owner(s) == Some(node))
    }

    /// The shards a node holds a replica of (not the primary), ascending.
    pub fn replica_shards_of(&self, node: NodeId) -> impl Iterator<Item = ShardId> + '_ {
        (0..self.shard_count).filter(move |&s| self.replicas(s).iter().skip(1).any(|&n| n == node))
    }

    /// For every node that holds a copy of some shard: how many shards it is the primary for
    /// and how many it holds a replica of. One pass over the table; at most one entry per
    /// active member.
    pub fn placement_counts(&self) -> BTreeMap<NodeId, PlacementCount> {
        let mut counts: BTreeMap<NodeId, PlacementCount> = BTreeMap::new();
        for s in 0..self.shard_count {
            for (i, &node) in self.replicas(s).iter().enumerate() {
                let c = counts.entry(node).or_default();
                if i == 0 {
                    c.primary += 1;
                } else {
                    c.replica += 1;
                }
            }
        }
        counts
    }
}

/// How many shards one node holds, as primary and as replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlacementCount {
    /// Shards it owns (serves and accepts writes for).
    pub primary: u32,
    /// Shards it is placed as a replica of.
    pub replica: u32,
}

/// The placement table: each shard's primary from `ring`, then its replicas (see [`replicas`]).
/// `ids` are the ring's members, sorted and distinct; `copies` is `1..=min(COPIES_MAX, ids.len())`.
fn place(
    ring: &HashRing<VNode>,
    ids: &[NodeId],
    members: &BTreeMap<NodeId, Member>,
    shard_count: u16,
    copies: usize,
) -> Box<[NodeId]> {
    let slot = |node: NodeId| ids.binary_search(&node).map_or(0, |i| i as u32);
    // Failure domains: one per known zone, one per member with no zone.
    let mut zones: HashMap<&str, u32> = HashMap::new();
    let mut domain_of_slot = Vec::with_capacity(ids.len());
    let mut domains = 0u32;
    for id in ids {
        let zone = members.get(id).map_or("", |m| m.info.zone.as_str());
        let d = if zone.is_empty() {
            domains += 1;
            domains - 1
        } else {
            *zones.entry(zone).or_insert_with(|| {
                domains += 1;
                domains - 1
            })
        };
        domain_of_slot.push(d);
    }
    // The virtual nodes clockwise, and where each one sits.
    let clockwise: Vec<VNode> = ring.clone().into_iter().collect();
    let mut position_of = vec![0u32; ids.len() * VNODES_PER_NODE as usize];
    let mut member = Vec::with_capacity(clockwise.len());
    for (p, v) in clockwise.iter().enumerate() {
        let m = slot(v.node);
        position_of[m as usize * VNODES_PER_NODE as usize + v.index as usize] = p as u32;
        member.push(m);
    }
    let domain = member.iter().map(|&m| domain_of_slot[m as usize]).collect();
    let order = RingOrder {
        member,
        domain,
        members: ids.len(),
        domains: domains as usize,
    };
    let primaries: Vec<u32> = (0..shard_count)
        .map(|s| {
            ring.get(&ShardPoint(s)).map_or(0, |v| {
                position_of[slot(v.node) as usize * VNODES_PER_NODE as usize + v.index as usize]
            })
        })
        .collect();
    let mut out = Vec::new();
    order.place(&primaries, copies, &mut out);
    out.into_iter().map(|m| ids[m as usize]).collect()
}
