//! Which devices of a `chat` run talk to each other (`--pairing`), decided once every device is
//! connected and knows the node its connection ended on (its `Welcome.node_id`, after any
//! redirect to the user's owner node). [`pair`] is a pure function over the devices' nodes;
//! [`Summary`] is what a run reports about the pairs it got.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How `chat` pairs its devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Pairing {
    /// Neighbours in the accounts list (devices 0 and 1, 2 and 3, ...), wherever they ended.
    #[default]
    Any,
    /// Both devices of a pair connected to the same node.
    SameNode,
    /// The two devices of a pair connected to different nodes.
    CrossNode,
}

impl Pairing {
    pub fn name(self) -> &'static str {
        match self {
            Pairing::Any => "any",
            Pairing::SameNode => "same-node",
            Pairing::CrossNode => "cross-node",
        }
    }
}

/// Pairs devices by the node each one's connection ended on: `nodes[i]` is device `i`'s node,
/// `None` when it is unknown (the device did not connect, or the connector cannot tell).
///
/// [`Pairing::Any`] pairs neighbours `(2k, 2k + 1)` whatever their nodes (the behaviour before
/// `--pairing` existed). [`Pairing::SameNode`] and [`Pairing::CrossNode`] pair as many devices
/// of known node as the nodes allow and leave the others out: a node with an odd number of
/// devices leaves one without a same-node partner, and no more than `n - largest node's share`
/// devices can be paired across nodes. Deterministic: the same input gives the same pairs.
pub fn pair(pairing: Pairing, nodes: &[Option<u64>]) -> Vec<(usize, usize)> {
    match pairing {
        Pairing::Any => (0..nodes.len() / 2).map(|k| (2 * k, 2 * k + 1)).collect(),
        Pairing::SameNode => by_node(nodes)
            .values()
            .flat_map(|devices| devices.chunks_exact(2).map(|p| (p[0], p[1])))
            .collect(),
        Pairing::CrossNode => {
            // Devices still unpaired per node, in reverse so `pop` yields them in order.
            let mut left: Vec<Vec<usize>> = by_node(nodes)
                .into_values()
                .map(|mut d| {
                    d.reverse();
                    d
                })
                .collect();
            let mut pairs = Vec::with_capacity(nodes.len() / 2);
            // Always pairing from the two nodes with the most devices left pairs the most
            // devices of a complete multipartite graph. Nodes are few: a scan per pair is fine.
            loop {
                let mut order: Vec<usize> =
                    (0..left.len()).filter(|&i| !left[i].is_empty()).collect();
                order.sort_by_key(|&i| std::cmp::Reverse(left[i].len()));
                let [a, b, ..] = order[..] else {
                    break;
                };
                let (Some(x), Some(y)) = (left[a].pop(), left[b].pop()) else {
                    break;
                };
                pairs.push((x.min(y), x.max(y)));
            }
            pairs.sort_unstable();
            pairs
        }
    }
}

/// Devices of known node, per node (ascending node id, devices in index order).
fn by_node(nodes: &[Option<u64>]) -> BTreeMap<u64, Vec<usize>> {
    let mut out: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        if let Some(n) = node {
            out.entry(*n).or_default().push(i);
        }
    }
    out
}

/// What a run (or one worker of it) got from its pairing; the report's `pairing` key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub mode: Pairing,
    /// `--pairs`.
    pub pairs_requested: usize,
    /// Pairs that send; with `same-node` or `cross-node` possibly fewer than requested.
    pub pairs: usize,
    /// Pairs whose devices ended on the same node, and on different nodes (both known).
    pub same_node_pairs: usize,
    pub cross_node_pairs: usize,
    /// Connected devices per node id.
    pub devices_per_node: BTreeMap<u64, usize>,
    /// Devices of unknown node: not connected, or a peer broker.
    pub devices_unplaced: usize,
}

impl Summary {
    /// The summary of `pairs` made over `nodes` (`pairs_requested`: the devices' half).
    pub fn of(mode: Pairing, nodes: &[Option<u64>], pairs: &[(usize, usize)]) -> Summary {
        let mut s = Summary {
            mode,
            pairs_requested: nodes.len() / 2,
            pairs: pairs.len(),
            ..Summary::default()
        };
        for &(a, b) in pairs {
            match (nodes[a], nodes[b]) {
                (Some(x), Some(y)) if x == y => s.same_node_pairs += 1,
                (Some(_), Some(_)) => s.cross_node_pairs += 1,
                _ => {}
            }
        }
        for node in nodes {
            match node {
                Some(n) => *s.devices_per_node.entry(*n).or_default() += 1,
                None => s.devices_unplaced += 1,
            }
        }
        s
    }

    /// Adds another worker's summary.
    pub fn add(&mut self, other: &Summary) {
        self.pairs_requested += other.pairs_requested;
        self.pairs += other.pairs;
        self.same_node_pairs += other.same_node_pairs;
        self.cross_node_pairs += other.cross_node_pairs;
        for (node, n) in &other.devices_per_node {
            *self.devices_per_node.entry(*node).or_default() += n;
        }
        self.devices_unplaced += other.devices_unplaced;
    }

    /// `node 1: 130, node 2: 141, node 3: 129` (and the unplaced devices).
    pub fn devices_text(&self) -> String {
        let mut parts: Vec<String> = self
            .devices_per_node
            .iter()
            .map(|(node, n)| format!("node {node}: {n}"))
            .collect();
        if self.devices_unplaced > 0 {
            parts.push(format!("unknown: {}", self.devices_unplaced));
        }
        if parts.is_empty() {
            "no device connected".into()
        } else {
            parts.join(", ")
        }
    }

    /// The table row.
    pub fn text(&self) -> String {
        let mut text = format!(
            "{}: {} pairs ({} same-node, {} cross-node); devices per node: {}",
            self.mode.name(),
            self.pairs,
            self.same_node_pairs,
            self.cross_node_pairs,
            self.devices_text()
        );
        if self.pairs < self.pairs_requested {
            text.push_str(&format!(
                "; ONLY {} OF {} REQUESTED PAIRS: {} devices had no {} partner and stayed \
                 connected without sending; the offered rate is spread over the pairs used",
                self.pairs,
                self.pairs_requested,
                2 * (self.pairs_requested - self.pairs),
                self.mode.name()
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every device in at most one pair, and each pair as the mode asks.
    fn check(mode: Pairing, nodes: &[Option<u64>], pairs: &[(usize, usize)]) {
        let mut seen = vec![false; nodes.len()];
        for &(a, b) in pairs {
            assert_ne!(a, b);
            for d in [a, b] {
                assert!(!seen[d], "device {d} paired twice");
                seen[d] = true;
            }
            match mode {
                Pairing::Any => assert_eq!(b, a + 1),
                Pairing::SameNode => assert!(nodes[a].is_some() && nodes[a] == nodes[b]),
                Pairing::CrossNode => {
                    assert!(nodes[a].is_some() && nodes[b].is_some() && nodes[a] != nodes[b])
                }
            }
        }
    }

    #[test]
    fn any_pairs_neighbours_whatever_their_nodes() {
        let nodes = [Some(1), Some(1), Some(2), None, Some(3), Some(2)];
        let pairs = pair(Pairing::Any, &nodes);
        assert_eq!(pairs, vec![(0, 1), (2, 3), (4, 5)]);
        let s = Summary::of(Pairing::Any, &nodes, &pairs);
        assert_eq!((s.pairs, s.same_node_pairs, s.cross_node_pairs), (3, 1, 1));
        assert_eq!(s.devices_unplaced, 1);
        assert_eq!(s.devices_per_node, BTreeMap::from([(1, 2), (2, 2), (3, 1)]));
    }

    #[test]
    fn same_node_pairs_within_each_node_and_leaves_odd_ones_out() {
        let nodes = [
            Some(1),
            Some(2),
            Some(1),
            Some(3),
            Some(2),
            Some(1),
            None,
            Some(3),
        ];
        let pairs = pair(Pairing::SameNode, &nodes);
        check(Pairing::SameNode, &nodes, &pairs);
        // Node 1 has three devices (one left over), nodes 2 and 3 two each, one unknown.
        assert_eq!(pairs, vec![(0, 2), (1, 4), (3, 7)]);
        let s = Summary::of(Pairing::SameNode, &nodes, &pairs);
        assert_eq!((s.pairs_requested, s.pairs, s.same_node_pairs), (4, 3, 3));
        assert!(s.text().contains("ONLY 3 OF 4"), "{}", s.text());
    }

    #[test]
    fn cross_node_pairs_as_many_as_the_largest_node_allows() {
        // Balanced: everyone is paired across nodes.
        let nodes: Vec<Option<u64>> = (0..12).map(|i| Some(i % 3)).collect();
        let pairs = pair(Pairing::CrossNode, &nodes);
        check(Pairing::CrossNode, &nodes, &pairs);
        assert_eq!(pairs.len(), 6);
        // Lopsided: 7 devices on node 1, 3 elsewhere: only 3 cross-node pairs exist.
        let mut nodes = vec![Some(1); 7];
        nodes.extend([Some(2), Some(3), Some(2)]);
        let pairs = pair(Pairing::CrossNode, &nodes);
        check(Pairing::CrossNode, &nodes, &pairs);
        assert_eq!(pairs.len(), 3);
        // Odd total with three nodes: 2 + 2 + 1 devices make 2 pairs, the most possible.
        let nodes = [Some(1), Some(2), Some(3), Some(1), Some(2)];
        let pairs = pair(Pairing::CrossNode, &nodes);
        check(Pairing::CrossNode, &nodes, &pairs);
        assert_eq!(pairs.len(), 2);
    }

    #[test]
    fn one_node_has_no_cross_node_pairs() {
        let nodes = vec![Some(7); 10];
        assert!(pair(Pairing::CrossNode, &nodes).is_empty());
        assert_eq!(pair(Pairing::SameNode, &nodes).len(), 5);
        assert!(pair(Pairing::CrossNode, &[None, None]).is_empty());
        assert!(pair(Pairing::SameNode, &[None, None]).is_empty());
    }

    #[test]
    fn pairing_is_the_most_possible_for_many_layouts() {
        // Every layout of up to 8 devices over up to 3 nodes (and unknown): the pair count is
        // the known optimum.
        for n in 0..=8usize {
            for code in 0..4usize.pow(n as u32) {
                let nodes: Vec<Option<u64>> = (0..n)
                    .map(|i| match (code / 4usize.pow(i as u32)) % 4 {
                        0 => None,
                        k => Some(k as u64),
                    })
                    .collect();
                let groups = by_node(&nodes);
                let known: usize = groups.values().map(Vec::len).sum();
                let largest = groups.values().map(Vec::len).max().unwrap_or(0);
                let same = pair(Pairing::SameNode, &nodes);
                check(Pairing::SameNode, &nodes, &same);
                let same_best: usize = groups.values().map(|d| d.len() / 2).sum();
                assert_eq!(same.len(), same_best, "{nodes:?}");
                let cross = pair(Pairing::CrossNode, &nodes);
                check(Pairing::CrossNode, &nodes, &cross);
                assert_eq!(cross.len(), (known / 2).min(known - largest), "{nodes:?}");
            }
        }
    }

    #[test]
    fn summaries_of_workers_add_up() {
        let a = Summary::of(Pairing::CrossNode, &[Some(1), Some(2)], &[(0, 1)]);
        let mut total = Summary::of(Pairing::CrossNode, &[Some(1), Some(1)], &[]);
        total.add(&a);
        assert_eq!((total.pairs_requested, total.pairs), (2, 1));
        assert_eq!(total.cross_node_pairs, 1);
        assert_eq!(total.devices_per_node, BTreeMap::from([(1, 3), (2, 1)]));
        let v = serde_json::to_value(&total).unwrap();
        assert_eq!(v["mode"], "cross-node");
        assert_eq!(v["devices_per_node"]["1"], 3);
        assert_eq!(serde_json::from_value::<Summary>(v).unwrap(), total);
    }
}
