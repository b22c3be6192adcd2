//! Live moves on a replicating node (`--replicate`; issue 19, docs/replication.md step 5): a
//! shard whose placement changed (a node joined, drained, failed over or came back) is moved
//! by its in-sync set, never by a hand-off that leaves it unserved.
//!
//! Every [`MOVE_SCAN_MS`] each node looks at the shards that have an in-sync set
//! ([`plan`]):
//! - **Transfer.** The primary of a shard whose hash owner is another active node that is in
//!   the set gives the shard to it (`IsrOp::Transfer`, a Raft command: the epoch moves, the
//!   new primary adopts the shard, which it holds with every acknowledged write since it is in
//!   sync). The new owner got there as a follower: placed, caught up by a snapshot, then
//!   proposed in sync ([`crate::replication::sink`]). So the shard is served throughout, by
//!   the old primary until the epoch moves and by the new one from then on.
//! - **Trim.** The primary of a shard whose placed nodes are all in the set takes the nodes
//!   that are not placed out of it (`IsrOp::Shrink`): the old primary after a transfer, a
//!   drained node, a node that no longer places the shard. When the set is full
//!   ([`MAX_ISR_NODES`]) and a placed node is still outside, one unplaced member goes first to
//!   make room.
//! - **Drop.** A node holding rows of a shard whose set does not name it and which is not
//!   placed on it deletes its copy ([`crate::handoff::drop_shard`], a local batch: nothing is
//!   replicated). The set holds every acknowledged write, so nothing is lost.
//!
//! A shard without a set (never written with replication) still moves by hand-off.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ringpost_coordinator::state::{IsrChange, IsrOp, MAX_ISR_NODES, MAX_SHARDS_PER_COMMAND};
use ringpost_coordinator::{MemberState, NodeId};
use tracing::{debug, info, warn};

use crate::ring::Ring;
use crate::server::Server;
use crate::shard::ShardId;

/// How often a node looks for shards to transfer, trim or drop.
pub const MOVE_SCAN_MS: u64 = 500;

/// What one node should do about the shards of a ring.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Shards to give to their hash owner, by owner.
    pub transfers: BTreeMap<NodeId, Vec<ShardId>>,
    /// Shards to take a node out of the in-sync set of, by node.
    pub trims: BTreeMap<NodeId, Vec<ShardId>>,
    /// Shards with a set that neither names this node nor is placed on it: any copy of them
    /// here is to be dropped.
    pub not_mine: Vec<ShardId>,
}

/// The moves `me` should make on `ring` (see the module documentation).
pub fn plan(ring: &Ring, me: NodeId) -> Plan {
    let mut plan = Plan::default();
    for shard in 0..ring.shard_count {
        let Some(set) = ring.in_sync(shard) else {
            continue;
        };
        let placed = ring.placed(shard);
        if set.first() != Some(&me) {
            if not_mine(ring, me, shard) {
                plan.not_mine.push(shard);
            }
            continue;
        }
        if let Some(&owner) = placed.first() {
            if owner != me
                && set.contains(&owner)
                && ring.state_of(owner) == Some(MemberState::Active)
            {
                plan.transfers.entry(owner).or_default().push(shard);
                continue;
            }
        }
        let unplaced: Vec<NodeId> = (set.iter().skip(1).copied())
            .filter(|n| !placed.contains(n))
            .collect();
        let all_placed_in = placed.iter().all(|n| set.contains(n));
        let trimmed: &[NodeId] = if all_placed_in {
            &unplaced
        } else if set.len() >= MAX_ISR_NODES {
            &unplaced[..unplaced.len().min(1)]
        } else {
            &[]
        };
        for &n in trimmed {
            plan.trims.entry(n).or_default().push(shard);
        }
    }
    plan
}

/// Whether `shard` has an in-sync set on `ring` that does not name `me`, and is not placed on
/// `me` either: a copy of it here is nobody's.
pub fn not_mine(ring: &Ring, me: NodeId, shard: ShardId) -> bool {
    ring.in_sync(shard)
        .is_some_and(|set| !set.contains(&me) && !ring.placed(shard).contains(&me))
}

/// Runs the moves of this node while it lives (started only on a replicating node).
pub async fn run(server: Weak<Server>) {
    let mut tick = tokio::time::interval(Duration::from_millis(MOVE_SCAN_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Shards not this node's that it is known to hold nothing of (checked once, not every tick:
    // a check reads every family of the shard).
    let mut clean: HashSet<ShardId> = HashSet::new();
    loop {
        tick.tick().await;
        let Some(server) = server.upgrade() else {
            return;
        };
        let ring = server.routing.ring();
        let me = server.node_id;
        if !matches!(
            ring.state_of(me),
            Some(MemberState::Active | MemberState::Draining)
        ) {
            continue;
        }
        let plan = plan(&ring, me);
        propose(&server, &ring, &plan).await;
        let not_mine: HashSet<ShardId> = plan.not_mine.iter().copied().collect();
        clean.retain(|s| not_mine.contains(s));
        for shard in plan.not_mine {
            if clean.contains(&shard) {
                continue;
            }
            match drop_copy(&server, shard).await {
                Ok(()) => {
                    clean.insert(shard);
                }
                Err(e) => {
                    warn!(shard, error = %e, "dropping a copy this node no longer holds a role for failed; retrying")
                }
            }
        }
    }
}

/// Proposes the plan's transfers and trims as this shard's primary at the ring's epoch; a
/// refusal (the epoch moved, the coordinator is away) is tried again at the next scan.
async fn propose(server: &Arc<Server>, ring: &Ring, plan: &Plan) {
    let Some(client) = server.coordinator.get().cloned() else {
        return;
    };
    let me = server.node_id;
    let changes = (plan.transfers.iter().map(|(&n, s)| (IsrOp::Transfer(n), s)))
        .chain(plan.trims.iter().map(|(&n, s)| (IsrOp::Shrink(n), s)));
    for (op, shards) in changes {
        for chunk in shards.chunks(MAX_SHARDS_PER_COMMAND) {
            let change = IsrChange {
                primary: me,
                epoch: ring.epoch,
                shards: chunk.iter().map(|&s| u32::from(s)).collect(),
                op,
            };
            match client.change_isr(change).await {
                Ok(_) => match op {
                    IsrOp::Transfer(to) => info!(
                        to,
                        shards = chunk.len(),
                        epoch = ring.epoch,
                        "gave shards to their placed owner, in sync"
                    ),
                    _ => info!(
                        ?op,
                        shards = chunk.len(),
                        "took a node that is not placed out of in-sync sets"
                    ),
                },
                Err(e) => {
                    debug!(?op, error = %e, "a move was refused; the next scan tries again");
                    return;
                }
            }
        }
    }
}

/// Deletes this node's copy of `shard`, if it holds one and its current ring still says it is
/// not its (checked under [`Server::replica_apply`], so no record or chunk lands meanwhile).
async fn drop_copy(server: &Arc<Server>, shard: ShardId) -> Result<(), String> {
    let _exclusive = server.replica_apply.write().await;
    if !not_mine(&server.routing.ring(), server.node_id, shard) {
        return Ok(());
    }
    let engine = server.engine.clone();
    let holds = tokio::task::spawn_blocking(move || {
        crate::handoff::export_chunk(&*engine, shard, None, 1).map(|c| !c.rows.is_empty())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    if !holds {
        return Ok(());
    }
    server.inbox.set_writable(shard, false);
    let removed = crate::handoff::drop_shard(&server.inbox, &server.accounts, shard)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(engine) = server.replicating.get() {
        engine.forget_position(shard);
    }
    info!(
        shard,
        entries = removed,
        "dropped a copy of a shard this node is neither in sync for nor placed on"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ringpost_coordinator::{testing, MemberState};

    use super::*;

    fn ring(members: &[(NodeId, MemberState)], sets: &[(ShardId, Vec<NodeId>)]) -> Ring {
        let mut view = testing::view(9, 64, 2, members);
        view.in_sync_replicas = sets
            .iter()
            .map(|(s, set)| (u32::from(*s), set.clone()))
            .collect::<BTreeMap<_, _>>();
        Ring::from_view(&view)
    }

    #[test]
    fn a_primary_gives_its_shard_to_an_in_sync_owner_then_trims_what_is_not_placed() {
        let active = |ids: &[NodeId]| -> Vec<(NodeId, MemberState)> {
            ids.iter().map(|&n| (n, MemberState::Active)).collect()
        };
        let plain = ring(&active(&[1, 2, 3]), &[]);
        let shard = 5;
        let placed = plain.placed(shard).to_vec();
        let (owner, replica) = (placed[0], placed[1]);
        let other = [1, 2, 3].into_iter().find(|n| !placed.contains(n)).unwrap();

        // `other` is primary after a failover; the owner is not in sync yet: nothing to do but
        // wait for its catch-up.
        let r = ring(&active(&[1, 2, 3]), &[(shard, vec![other, replica])]);
        let p = plan(&r, other);
        assert!(p.transfers.is_empty() && p.trims.is_empty(), "{p:?}");
        // The owner is in sync: the shard goes to it.
        let r = ring(&active(&[1, 2, 3]), &[(shard, vec![other, replica, owner])]);
        assert_eq!(
            plan(&r, other).transfers,
            BTreeMap::from([(owner, vec![shard])])
        );
        // Transferred: the new primary trims the old one, which is not placed.
        let r = ring(&active(&[1, 2, 3]), &[(shard, vec![owner, other, replica])]);
        let p = plan(&r, owner);
        assert!(p.transfers.is_empty());
        assert_eq!(p.trims, BTreeMap::from([(other, vec![shard])]));
        // Only the primary acts; the old primary keeps its copy while it is in the set.
        assert_eq!(plan(&r, other), Plan::default());
        // Trimmed: the old primary drops its copy.
        let r = ring(&active(&[1, 2, 3]), &[(shard, vec![owner, replica])]);
        assert_eq!(plan(&r, other).not_mine, vec![shard]);
        assert!(plan(&r, owner) == Plan::default() && plan(&r, replica) == Plan::default());
    }

    #[test]
    fn a_full_set_makes_room_for_a_placed_node_and_a_draining_primary_hands_over() {
        let active = |ids: &[NodeId]| -> Vec<(NodeId, MemberState)> {
            ids.iter().map(|&n| (n, MemberState::Active)).collect()
        };
        let mut members = active(&[1, 2, 3, 4, 5]);
        let mut view = testing::view(9, 64, 3, &members);
        let shard = (0..64u16)
            .find(|&s| {
                let r = Ring::from_view(&view);
                !r.placed(s).contains(&4) && !r.placed(s).contains(&5)
            })
            .unwrap();
        let placed = Ring::from_view(&view).placed(shard).to_vec();
        // A full set: two unplaced nodes (4 and 5), the owner and one placed replica.
        view.in_sync_replicas =
            BTreeMap::from([(u32::from(shard), vec![placed[0], 4, 5, placed[1]])]);
        let r = Ring::from_view(&view);
        let p = plan(&r, placed[0]);
        assert_eq!(
            p.trims,
            BTreeMap::from([(4, vec![shard])]),
            "one goes first"
        );

        // A draining primary: the shard is placed elsewhere, and goes to its owner once the
        // owner is in sync.
        members[0].1 = MemberState::Draining;
        let view = testing::view(10, 64, 2, &members);
        let r = Ring::from_view(&view);
        let shard = (0..64u16).find(|&s| !r.placed(s).contains(&1)).unwrap();
        let owner = r.placed(shard)[0];
        let r = ring(&members, &[(shard, vec![1, owner])]);
        assert_eq!(
            plan(&r, 1).transfers,
            BTreeMap::from([(owner, vec![shard])])
        );
    }
}
