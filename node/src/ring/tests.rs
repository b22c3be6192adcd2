//! The ring's tests: primaries pinned and balanced, replica placement checked against the
//! obvious walk it optimises, zone spreading, and how little a new member moves.

use super::*;
use proptest::prelude::*;
use ringpost_coordinator::{testing, NodeInfo};

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
        1,
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
    let view = testing::view(
        7,
        64,
        1,
        &[
            (1, MemberState::Active),
            (2, MemberState::Draining),
            (3, MemberState::Down),
            (4, MemberState::Joining),
        ],
    );
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

/// A ring of active members `(id, zone)` with replication factor `rf`.
fn zoned(shards: u16, rf: u32, nodes: &[(NodeId, &str)]) -> Ring {
    let ids: Vec<NodeId> = nodes.iter().map(|n| n.0).collect();
    Ring::build(
        1,
        shards,
        &ids,
        rf,
        nodes.iter().map(|&(id, zone)| Member {
            info: NodeInfo {
                zone: zone.into(),
                ..NodeInfo::new(id)
            },
            state: MemberState::Active,
            state_since_ms: 0,
        }),
    )
}

fn zone_of(r: &Ring, node: NodeId) -> &str {
    r.member(node).map_or("", |m| m.info.zone.as_str())
}

/// The owners as the ring computed them before replicas existed: the first virtual node at or
/// after the shard's point.
fn owners_before_replicas(ids: &[NodeId], shards: u16) -> Vec<NodeId> {
    let mut ring = HashRing::new();
    ring.batch_add(
        ids.iter()
            .flat_map(|&node| (0..VNODES_PER_NODE).map(move |index| VNode { node, index }))
            .collect(),
    );
    (0..shards)
        .map(|s| ring.get(&ShardPoint(s)).unwrap().node)
        .collect()
}

/// The placement rule as written in `replicas`, by walking the ring one virtual node at a
/// time: the model the precomputed table must match.
fn placement_by_walking(nodes: &[(NodeId, &str)], rf: u32, shards: u16) -> Vec<Vec<NodeId>> {
    let ids: Vec<NodeId> = nodes.iter().map(|n| n.0).collect();
    let domain = |node: NodeId| {
        let zone = nodes.iter().find(|n| n.0 == node).unwrap().1;
        if zone.is_empty() {
            format!("node {node}")
        } else {
            format!("zone {zone}")
        }
    };
    let mut ring = HashRing::new();
    ring.batch_add(
        ids.iter()
            .flat_map(|&node| (0..VNODES_PER_NODE).map(move |index| VNode { node, index }))
            .collect(),
    );
    let clockwise: Vec<VNode> = ring.clone().into_iter().collect();
    let copies = (rf as usize).min(ids.len());
    (0..shards)
        .map(|s| {
            let primary = *ring.get(&ShardPoint(s)).unwrap();
            let start = clockwise.iter().position(|v| *v == primary).unwrap();
            let mut set = vec![primary.node];
            let mut used = vec![domain(primary.node)];
            for i in 1..clockwise.len() {
                let node = clockwise[(start + i) % clockwise.len()].node;
                if set.len() < copies && !used.contains(&domain(node)) {
                    set.push(node);
                    used.push(domain(node));
                }
            }
            for i in 1..clockwise.len() {
                let node = clockwise[(start + i) % clockwise.len()].node;
                if set.len() < copies && !set.contains(&node) {
                    set.push(node);
                }
            }
            set
        })
        .collect()
}

#[test]
fn primaries_do_not_move_when_replicas_are_added() {
    let ids = [3, 9, 14, 20, 21];
    let before = owners_before_replicas(&ids, 4096);
    for rf in 1..=3 {
        let r = zoned(4096, rf, &ids.map(|id| (id, "")));
        assert_eq!(r.copies(), rf as usize);
        for s in 0..4096 {
            assert_eq!(
                r.owner(s),
                Some(before[usize::from(s)]),
                "rf {rf} shard {s}"
            );
            assert_eq!(r.replicas(s)[0], before[usize::from(s)]);
        }
    }
}

#[test]
fn replica_sets_are_distinct_nodes() {
    let r = zoned(4096, 3, &[(1, ""), (2, ""), (3, ""), (4, ""), (5, "")]);
    for s in 0..4096 {
        let set = r.replicas(s);
        assert_eq!(set.len(), 3);
        assert!(
            set[0] != set[1] && set[0] != set[2] && set[1] != set[2],
            "{set:?}"
        );
    }
    assert!(r.replicas(4096).is_empty(), "out of range: no nodes");
    // Every node is a replica of some shards and the copies add up.
    let counts = r.placement_counts();
    assert_eq!(counts.len(), 5);
    assert_eq!(counts.values().map(|c| c.primary).sum::<u32>(), 4096);
    assert_eq!(counts.values().map(|c| c.replica).sum::<u32>(), 2 * 4096);
    for (node, c) in &counts {
        assert_eq!(r.shards_of(*node).count() as u32, c.primary);
        assert_eq!(r.replica_shards_of(*node).count() as u32, c.replica);
        // 1638 each if perfect: replicas follow the primaries' balance.
        assert!((1200..=2100).contains(&c.replica), "node {node}: {c:?}");
    }
}

#[test]
fn replicas_spread_over_zones() {
    // 3 zones × 2 nodes, rf 3: every shard has one copy in each zone.
    let nodes = [(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "c"), (6, "c")];
    let r = zoned(4096, 3, &nodes);
    for s in 0..4096 {
        let mut zones: Vec<&str> = r.replicas(s).iter().map(|&n| zone_of(&r, n)).collect();
        zones.sort_unstable();
        assert_eq!(zones, ["a", "b", "c"], "shard {s}: {:?}", r.replicas(s));
    }
    // rf 2: the two copies are always in different zones.
    let r = zoned(4096, 2, &nodes);
    for s in 0..4096 {
        let set = r.replicas(s);
        assert_ne!(zone_of(&r, set[0]), zone_of(&r, set[1]), "shard {s}");
    }
}

#[test]
fn replicas_fall_back_to_the_next_nodes_when_zones_run_out() {
    // 2 zones × 2 nodes, rf 3: both zones hold a copy, the third goes to a distinct node.
    let nodes = [(1, "a"), (2, "a"), (3, "b"), (4, "b")];
    let r = zoned(4096, 3, &nodes);
    for s in 0..4096 {
        let set = r.replicas(s);
        assert_eq!(set.len(), 3);
        assert!(set[0] != set[2] && set[1] != set[2]);
        assert_ne!(zone_of(&r, set[0]), zone_of(&r, set[1]), "zones first");
    }
    // One zone only: the zones give nothing, the next distinct nodes everything.
    let one_zone = zoned(1024, 3, &[(1, "a"), (2, "a"), (3, "a")]);
    let no_zone = zoned(1024, 3, &[(1, ""), (2, ""), (3, "")]);
    for s in 0..1024 {
        assert_eq!(one_zone.replicas(s).len(), 3);
        let mut a = one_zone.replicas(s).to_vec();
        let mut b = no_zone.replicas(s).to_vec();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
    }
}

#[test]
fn a_factor_above_the_member_count_places_every_member_once() {
    let r = zoned(512, 3, &[(7, "a"), (8, "a")]);
    assert_eq!((r.copies(), r.replication_factor()), (2, 3));
    for s in 0..512 {
        let mut set = r.replicas(s).to_vec();
        set.sort_unstable();
        assert_eq!(set, [7, 8]);
    }
    let single = zoned(512, 3, &[(7, "a")]);
    assert!((0..512).all(|s| single.replicas(s) == [7]));
    // Out-of-range factors (a view never carries them) are clamped, not a panic.
    assert_eq!(zoned(64, 0, &[(7, ""), (8, "")]).copies(), 1);
    assert_eq!(
        zoned(64, 99, &[(7, ""), (8, ""), (9, ""), (10, "")]).copies(),
        3
    );
    let empty = Ring::empty(512);
    assert_eq!((empty.copies(), empty.replicas(0)), (0, &[][..]));
}

#[test]
fn a_view_carries_the_replication_factor() {
    let view = testing::view(
        3,
        64,
        2,
        &[
            (1, MemberState::Active),
            (2, MemberState::Active),
            (3, MemberState::Draining),
        ],
    );
    let r = Ring::from_view(&view);
    assert_eq!(r.copies(), 2);
    for s in 0..64 {
        let mut set = r.replicas(s).to_vec();
        set.sort_unstable();
        assert_eq!(set, [1, 2], "a draining member holds no copy");
    }
    assert_eq!(r.with_down_members().copies(), 2);
}

/// Shards whose replica set differs between two rings, and whether every change admits `new`.
fn changed_sets(before: &Ring, after: &Ring, new: NodeId) -> (usize, bool) {
    let changed: Vec<ShardId> = (0..before.shard_count)
        .filter(|&s| before.replicas(s) != after.replicas(s))
        .collect();
    let all_admit_new = changed.iter().all(|&s| after.replicas(s).contains(&new));
    (changed.len(), all_admit_new)
}

#[test]
fn a_new_member_changes_only_its_share_of_the_replica_sets() {
    // rf 2, 9 → 10 members: the new member is one of a shard's first two nodes for about
    // 2/10 of the shards, and only those sets change.
    let nodes: Vec<(NodeId, &str)> = (1..=9).map(|id| (id, "")).collect();
    let before = zoned(4096, 2, &nodes);
    let mut more = nodes.clone();
    more.push((10, ""));
    let after = zoned(4096, 2, &more);
    let (changed, all_admit_new) = changed_sets(&before, &after, 10);
    assert!(all_admit_new);
    let expected = 4096 * 2 / 10;
    assert!(
        (expected / 2..=expected * 3 / 2).contains(&changed),
        "{changed} sets changed, about {expected} expected"
    );

    // With zones (3 × 3, rf 3), a tenth node in zone a: again only sets that admit it.
    let zones = ["a", "b", "c"];
    let nodes: Vec<(NodeId, &str)> = (1..=9).map(|id| (id, zones[id as usize % 3])).collect();
    let before = zoned(4096, 3, &nodes);
    let mut more = nodes.clone();
    more.push((10, "a"));
    let after = zoned(4096, 3, &more);
    let (changed, all_admit_new) = changed_sets(&before, &after, 10);
    assert!(all_admit_new);
    let expected = 4096 * 3 / 10;
    assert!(
        changed <= expected * 3 / 2,
        "{changed} sets changed, about {expected} expected"
    );
}

#[test]
fn placement_is_the_walk_in_chosen_layouts() {
    let layouts: [&[(NodeId, &str)]; 5] = [
        &[(1, "a"), (2, "a"), (3, "b"), (4, "b")],
        &[(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "c"), (6, "c")],
        &[(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, ""), (6, "")],
        &[(1, "a"), (2, "a"), (3, "a")],
        &[(1, ""), (2, ""), (3, ""), (4, "")],
    ];
    for nodes in layouts {
        for rf in 1..=3 {
            let r = zoned(1024, rf, nodes);
            let walked = placement_by_walking(nodes, rf, 1024);
            for s in 0..1024 {
                assert_eq!(
                    r.replicas(s),
                    &walked[usize::from(s)][..],
                    "{nodes:?} rf {rf}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The precomputed table is the walk the rule describes, for any members, zones (some
    /// unknown) and factor; and the sets spread over as many zones as they can.
    #[test]
    fn placement_is_the_walk(
        nodes in proptest::collection::btree_map(1u64..500, 0usize..3, 1..9),
        rf in 1u32..=3,
    ) {
        // Few zones, so that shards often run out of them.
        let zones = ["", "a", "b"];
        let nodes: Vec<(NodeId, &str)> = nodes.into_iter().map(|(id, z)| (id, zones[z])).collect();
        let r = zoned(256, rf, &nodes);
        let walked = placement_by_walking(&nodes, rf, 256);
        let domains: std::collections::BTreeSet<String> = nodes
            .iter()
            .map(|&(id, z)| if z.is_empty() { format!("n{id}") } else { z.to_string() })
            .collect();
        for s in 0..256 {
            prop_assert_eq!(r.replicas(s), &walked[usize::from(s)][..], "shard {}", s);
            let spread: std::collections::BTreeSet<String> = r
                .replicas(s)
                .iter()
                .map(|&n| {
                    let z = zone_of(&r, n);
                    if z.is_empty() { format!("n{n}") } else { z.to_string() }
                })
                .collect();
            prop_assert_eq!(spread.len(), r.copies().min(domains.len()));
        }
    }

    /// A new member changes only the sets it enters; the order members are listed in does
    /// not matter.
    #[test]
    fn a_new_member_changes_only_the_sets_it_enters(
        nodes in proptest::collection::btree_map(1u64..500, 0usize..4, 1..7),
        new_zone in 0usize..4,
        rf in 1u32..=3,
    ) {
        let zones = ["", "a", "b", "c"];
        let nodes: Vec<(NodeId, &str)> = nodes.into_iter().map(|(id, z)| (id, zones[z])).collect();
        let before = zoned(512, rf, &nodes);
        let mut reversed = nodes.clone();
        reversed.reverse();
        let same = zoned(512, rf, &reversed);
        prop_assert!((0..512).all(|s| before.replicas(s) == same.replicas(s)));
        let mut more = nodes.clone();
        more.push((1000, zones[new_zone]));
        let after = zoned(512, rf, &more);
        let (_, all_admit_new) = changed_sets(&before, &after, 1000);
        prop_assert!(all_admit_new);
    }
}

#[test]
fn an_in_sync_set_fixes_the_primary_and_leads_the_shards_nodes() {
    let mut view = testing::view(
        3,
        64,
        2,
        &[
            (1, MemberState::Down),
            (2, MemberState::Active),
            (3, MemberState::Active),
        ],
    );
    let plain = Ring::from_view(&view);
    // Shard 5 failed over to node 3 (its set: 3 then the down node 1): whatever the hash says,
    // 3 is its primary, then 1, then the placed nodes not in the set.
    view.in_sync_replicas.insert(5, vec![3, 1]);
    // Out of range and empty entries are ignored.
    view.in_sync_replicas.insert(64, vec![2]);
    view.in_sync_replicas.insert(6, vec![]);
    let r = Ring::from_view(&view);
    assert_eq!(r.owner(5), Some(3));
    assert_eq!(r.in_sync(5), Some(&[3, 1][..]));
    let mut expected = vec![3, 1];
    expected.extend(plain.replicas(5).iter().filter(|n| ![3, 1].contains(n)));
    assert_eq!(r.replicas(5), &expected[..]);
    // Every other shard is placed as before and has no set.
    for s in (0..64).filter(|&s| s != 5) {
        assert_eq!(r.replicas(s), plain.replicas(s), "shard {s}");
        assert_eq!(r.in_sync(s), None);
    }
    assert!(r.shards_of(3).any(|s| s == 5));
    assert_eq!(r.with_down_members().owner(5), Some(3));
}
