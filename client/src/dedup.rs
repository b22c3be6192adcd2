//! [`DedupSet`]: the SDK's memory of which deliveries it already handed to the application, so
//! a redelivered inbox entry (its ack was lost in a disconnect) reaches the application once.

use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;

use ringpost_wire::{DeliverKind, DeviceId, MsgId, UserId};

/// Deliveries remembered by default. A duplicate can only come from an entry that was handed
/// out but whose ack did not reach the node before a disconnect: at most the node's delivery
/// window (64) plus one ack batch per reconnect, so this covers many reconnects in a row. Cost:
/// about 18 bytes per remembered delivery (an 8-byte fingerprint in a set and in a ring), so
/// 18 KiB per client when full, nothing until deliveries arrive.
pub const DEDUP_CAPACITY_DEFAULT: usize = 1024;

/// What identifies a delivery for deduplication: its kind, the sending device and its msg_id
/// (a receipt's own id for receipts; the server's `delivered` receipts carry the message's id,
/// hence the kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupKey {
    pub kind: DeliverKind,
    pub from_user: UserId,
    pub from_device: DeviceId,
    pub msg_id: MsgId,
}

impl std::hash::Hash for DedupKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.kind as u8).hash(state);
        self.from_user.hash(state);
        self.from_device.hash(state);
        self.msg_id.hash(state);
    }
}

impl DedupKey {
    /// The key of a delivery.
    pub fn of(deliver: &ringpost_wire::Deliver) -> Self {
        DedupKey {
            kind: deliver.kind,
            from_user: deliver.from_user,
            from_device: deliver.from_device,
            msg_id: deliver.msg_id,
        }
    }
}

/// A set of the last `capacity` keys inserted (first in, first out).
///
/// Keys are stored as 64-bit fingerprints under a per-process random key (SipHash), not whole
/// (29 bytes each): two distinct deliveries collide with probability about `capacity / 2^64`
/// per delivery, which is far below any other failure rate of the system.
#[derive(Debug)]
pub struct DedupSet {
    capacity: usize,
    hasher: std::collections::hash_map::RandomState,
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

impl DedupSet {
    /// A set remembering at most `capacity` keys (at least one). Allocates nothing until used.
    pub fn new(capacity: usize) -> Self {
        DedupSet {
            capacity: capacity.max(1),
            hasher: Default::default(),
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Records `key`; `true` if it was not already remembered (hand the delivery out), `false`
    /// for a duplicate. When full, the oldest key is forgotten.
    pub fn insert(&mut self, key: &DedupKey) -> bool {
        let fingerprint = self.hasher.hash_one(key);
        if !self.set.insert(fingerprint) {
            return false;
        }
        self.order.push_back(fingerprint);
        if self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.set.remove(&oldest);
            }
        }
        debug_assert_eq!(self.set.len(), self.order.len());
        true
    }

    /// Whether `key` is remembered.
    pub fn contains(&self, key: &DedupKey) -> bool {
        self.set.contains(&self.hasher.hash_one(key))
    }

    /// Keys remembered now (at most the capacity).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> DedupKey {
        DedupKey {
            kind: DeliverKind::Message,
            from_user: 15550000 + n,
            from_device: 1,
            msg_id: [(n % 251) as u8; 16],
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let mut set = DedupSet::new(8);
        assert!(set.insert(&key(1)));
        assert!(!set.insert(&key(1)));
        assert!(set.contains(&key(1)));
        assert!(!set.contains(&key(2)));
        let receipt = DedupKey {
            kind: DeliverKind::Delivered,
            ..key(1)
        };
        assert!(set.insert(&receipt), "the kind is part of the key");
    }

    #[test]
    fn stays_within_capacity_and_forgets_the_oldest() {
        let mut set = DedupSet::new(100);
        for n in 0..10_000 {
            assert!(set.insert(&key(n)));
            assert!(set.len() <= 100);
        }
        assert_eq!(set.len(), 100);
        assert!(set.set.len() <= 100);
        assert!(set.contains(&key(9_999)) && set.contains(&key(9_900)));
        assert!(!set.contains(&key(9_899)), "the oldest were forgotten");
        assert!(set.insert(&key(0)), "forgotten keys are new again");
    }

    #[test]
    fn zero_capacity_means_one() {
        let mut set = DedupSet::new(0);
        assert_eq!(set.capacity(), 1);
        assert!(set.insert(&key(1)));
        assert!(!set.insert(&key(1)));
        assert!(set.insert(&key(2)));
        assert_eq!(set.len(), 1);
    }
}
