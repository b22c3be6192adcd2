//! Replica placement on the ring, sans-IO: given the virtual nodes in clockwise order and the
//! position of each shard's primary, the nodes that hold each shard's copies.
//!
//! The rule (every node computes it, so it must be deterministic and platform-independent):
//! the primary is the owner (unchanged); then, walking clockwise from the primary's virtual
//! node, the next node whose failure domain holds no copy of the shard yet; once every domain
//! holds one, the next distinct nodes clockwise from the primary that hold none. A failure
//! domain is a member's zone; a member with an empty (unknown) zone is a domain of its own, so a
//! cluster without zones places replicas on the next distinct nodes.
//!
//! Cost: walking the ring for each shard could visit most of it (looking for a rare zone), so
//! each walk is answered from a table built once per epoch: for every position, the first
//! [`COPIES_MAX`] distinct domains (and nodes) met clockwise from it. A shard needs at most
//! `COPIES_MAX - 1` lookups, each `O(COPIES_MAX)`; the tables cost `O(positions × COPIES_MAX)`
//! time and `positions × COPIES_MAX × 4` bytes each while the ring is built (6 MiB at the
//! most, for 1024 members × 128 virtual nodes), and are dropped afterwards.

use ringpost_coordinator::types::MAX_REPLICATION_FACTOR;

/// Most copies of a shard (the primary included) a ring places: the coordinator's bound.
pub const COPIES_MAX: usize = MAX_REPLICATION_FACTOR as usize;

/// A position of the ring: an index into the clockwise list of virtual nodes.
type Position = u32;

/// An unused slot of a [`FirstDistinct`] row.
const NONE: Position = Position::MAX;

/// The ring as placement sees it: each position's member (an index into the sorted member
/// list) and failure domain, both small dense integers.
pub(crate) struct RingOrder {
    /// The member at each position, clockwise.
    pub(crate) member: Vec<u32>,
    /// The failure domain of each position's member.
    pub(crate) domain: Vec<u32>,
    /// Distinct members on the ring.
    pub(crate) members: usize,
    /// Distinct domains on the ring.
    pub(crate) domains: usize,
}

/// For each position, the positions of the first [`COPIES_MAX`] distinct keys met walking
/// clockwise from it (itself first), [`NONE`]-padded when the ring holds fewer keys.
struct FirstDistinct(Vec<[Position; COPIES_MAX]>);

impl FirstDistinct {
    /// Two sweeps backwards around the ring: the first computes each row from the positions up
    /// to the end of the list, the second (seeded with position 0's row, which then covers the
    /// whole ring) completes every row with the positions after the wrap.
    fn new(keys: &[u32]) -> FirstDistinct {
        let mut rows = vec![[NONE; COPIES_MAX]; keys.len()];
        let mut next = [NONE; COPIES_MAX];
        for _ in 0..2 {
            for p in (0..keys.len()).rev() {
                let mut row = [NONE; COPIES_MAX];
                row[0] = p as Position;
                let mut len = 1;
                for &q in next.iter().take_while(|&&q| q != NONE) {
                    if len == COPIES_MAX {
                        break;
                    }
                    if keys[q as usize] != keys[p] {
                        row[len] = q;
                        len += 1;
                    }
                }
                rows[p] = row;
                next = row;
            }
        }
        FirstDistinct(rows)
    }

    /// The first position clockwise from `from` whose key `accept`s.
    fn find(&self, from: usize, keys: &[u32], accept: impl Fn(u32) -> bool) -> Option<usize> {
        self.0[from]
            .iter()
            .take_while(|&&q| q != NONE)
            .map(|&q| q as usize)
            .find(|&q| accept(keys[q]))
    }
}

impl RingOrder {
    /// The members holding each shard's copies, primary first, `copies` per shard
    /// (`1..=COPIES_MAX`, at most `self.members`), given the position of each shard's primary.
    /// Writes member indexes, shard after shard, into `out`.
    pub(crate) fn place(&self, primaries: &[Position], copies: usize, out: &mut Vec<u32>) {
        assert!((1..=COPIES_MAX).contains(&copies) && copies <= self.members);
        let n = self.member.len();
        out.reserve(primaries.len() * copies);
        if copies == 1 {
            out.extend(primaries.iter().map(|&p| self.member[p as usize]));
            return;
        }
        let by_domain = FirstDistinct::new(&self.domain);
        // Needed only when some shard runs out of domains before it has its copies.
        let by_member = (self.domains < copies).then(|| FirstDistinct::new(&self.member));
        for &primary in primaries {
            let primary = primary as usize;
            let mut set = [0u32; COPIES_MAX];
            let mut used = [0u32; COPIES_MAX];
            set[0] = self.member[primary];
            used[0] = self.domain[primary];
            let mut len = 1;
            let mut at = primary;
            while len < copies {
                let next = if len < self.domains {
                    // Fewer than COPIES_MAX domains are used and more exist, so one of the
                    // first COPIES_MAX distinct ones from here is unused.
                    let q =
                        by_domain.find((at + 1) % n, &self.domain, |d| !used[..len].contains(&d));
                    q.inspect(|&q| {
                        at = q;
                        used[len] = self.domain[q];
                    })
                } else {
                    // Every domain holds a copy. Fewer than COPIES_MAX members hold one and
                    // more exist, so one of the first COPIES_MAX distinct ones is free.
                    by_member.as_ref().and_then(|t| {
                        t.find((primary + 1) % n, &self.member, |m| {
                            !set[..len].contains(&m)
                        })
                    })
                };
                let Some(q) = next else {
                    unreachable!(
                        "a ring with {} members places {copies} copies",
                        self.members
                    );
                };
                set[len] = self.member[q];
                len += 1;
            }
            out.extend_from_slice(&set[..copies]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first distinct keys by walking, the obvious way.
    fn walk(keys: &[u32], from: usize) -> Vec<Position> {
        let mut seen: Vec<u32> = Vec::new();
        let mut out = Vec::new();
        for i in 0..keys.len() {
            let p = (from + i) % keys.len();
            if !seen.contains(&keys[p]) && out.len() < COPIES_MAX {
                seen.push(keys[p]);
                out.push(p as Position);
            }
        }
        out
    }

    #[test]
    fn first_distinct_matches_a_walk() {
        let rings: [&[u32]; 5] = [
            &[7],
            &[1, 1, 1],
            &[1, 2, 1, 2, 2],
            &[0, 0, 1, 0, 0, 0, 2, 0, 3, 3],
            &[5, 4, 3, 2, 1, 0, 0, 1, 2],
        ];
        for keys in rings {
            let t = FirstDistinct::new(keys);
            for from in 0..keys.len() {
                let row: Vec<Position> = t.0[from]
                    .iter()
                    .copied()
                    .take_while(|&q| q != NONE)
                    .collect();
                assert_eq!(row, walk(keys, from), "{keys:?} from {from}");
            }
        }
    }

    #[test]
    fn places_by_domain_then_by_member() {
        // Members 0..4 in domains 0, 0, 1, 1; ring positions clockwise.
        let order = RingOrder {
            member: vec![0, 1, 0, 2, 1, 3],
            domain: vec![0, 0, 0, 1, 0, 1],
            members: 4,
            domains: 2,
        };
        let mut out = Vec::new();
        // From position 0 (member 0): next other domain is member 2 at position 3; then all
        // domains are used: the next free member clockwise from the primary is member 1.
        order.place(&[0, 5], 3, &mut out);
        assert_eq!(out, [0, 2, 1, 3, 0, 1]);
    }
}
