//! The writer's memory of device counters: one thread owns every mutation, so it keeps what it
//! wrote instead of reading it back for the next group.
//!
//! The cache only ever holds what is on disk: a group's changes enter it after their write
//! succeeded, and any failed write (or a hand-off that rewrote whole shards) empties it, so the
//! next group reads the engine again. Entries are evicted once [`DeviceCache::capacity`] is
//! passed; an evicted device is simply read again when next touched.

use std::collections::{HashMap, HashSet};

use ringpost_wire::{DeviceId, UserId};

use super::device::DeviceMeta;

pub(crate) type DeviceKey = (UserId, DeviceId);

/// What the writer knows of one device.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cached {
    pub meta: DeviceMeta,
    /// Entries up to this seq are deleted from disk (0: not known, so a trim starts at 1).
    pub trimmed: u64,
}

/// A cached device and the trim pass during which a group last touched it.
#[derive(Debug)]
struct Slot {
    cached: Cached,
    pass: u64,
}

impl Cached {
    /// Acknowledged entries still on disk below the floor.
    pub fn untrimmed(&self) -> u64 {
        self.meta.floor.saturating_sub(self.trimmed)
    }
}

#[derive(Debug)]
pub(crate) struct DeviceCache {
    map: HashMap<DeviceKey, Slot>,
    /// Periodic trim passes so far: a device touched during the current pass is active, and
    /// its own acks will trim it.
    pass: u64,
    /// Devices whose floor is above what was trimmed: the periodic trim's work list.
    untrimmed: HashSet<DeviceKey>,
    capacity: usize,
}

impl DeviceCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            pass: 0,
            untrimmed: HashSet::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn get(&self, key: &DeviceKey) -> Option<&Cached> {
        self.map.get(key).map(|slot| &slot.cached)
    }

    /// Takes what a committed group knows of a device.
    pub fn put(&mut self, key: DeviceKey, cached: Cached) {
        if cached.untrimmed() > 0 {
            self.untrimmed.insert(key);
        } else {
            self.untrimmed.remove(&key);
        }
        let pass = self.pass;
        self.map.insert(key, Slot { cached, pass });
    }

    /// Up to `n` devices with acknowledged entries left on disk that no group touched since
    /// the previous call (quiet devices: an active one is trimmed by its own acks, in batches
    /// of `TRIM_SEQS_MIN`, and trimming every device at once would be one burst of range
    /// tombstones). Starts a new pass.
    pub fn quiet_untrimmed(&mut self, n: usize) -> Vec<DeviceKey> {
        let pass = self.pass;
        self.pass += 1;
        self.untrimmed
            .iter()
            .filter(|key| self.map.get(*key).is_some_and(|slot| slot.pass < pass))
            .take(n)
            .copied()
            .collect()
    }

    /// Up to `n` devices with acknowledged entries left on disk.
    #[cfg(test)]
    pub fn untrimmed(&self, n: usize) -> Vec<DeviceKey> {
        self.untrimmed.iter().take(n).copied().collect()
    }

    /// Forgets everything: after a failed write, or a hand-off that rewrote shards.
    pub fn clear(&mut self) {
        self.map = HashMap::new();
        self.untrimmed = HashSet::new();
    }

    /// Evicts devices down to three quarters of the capacity once it is passed, trimmed ones
    /// first (an evicted untrimmed device keeps its acknowledged entries on disk until it is
    /// touched again or they expire).
    pub fn evict(&mut self) {
        if self.map.len() <= self.capacity {
            return;
        }
        let target = self.capacity - self.capacity / 4;
        let mut excess = self.map.len() - target;
        let untrimmed = &self.untrimmed;
        self.map.retain(|key, _| {
            if excess > 0 && !untrimmed.contains(key) {
                excess -= 1;
                false
            } else {
                true
            }
        });
        if excess > 0 {
            let map = &mut self.map;
            self.untrimmed.retain(|key| {
                if excess > 0 {
                    excess -= 1;
                    map.remove(key);
                    false
                } else {
                    true
                }
            });
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(floor: u64, trimmed: u64) -> Cached {
        Cached {
            meta: DeviceMeta {
                next_seq: floor + 1,
                floor,
                acked_above: Vec::new(),
            },
            trimmed,
        }
    }

    #[test]
    fn tracks_untrimmed_devices_and_evicts_trimmed_ones_first() {
        let mut c = DeviceCache::new(8);
        for user in 0..8 {
            c.put((user, 1), cached(10, if user < 2 { 0 } else { 10 }));
        }
        let mut dirty = c.untrimmed(100);
        dirty.sort_unstable();
        assert_eq!(dirty, vec![(0, 1), (1, 1)]);
        c.put((8, 1), cached(5, 5));
        c.evict();
        assert_eq!(c.len(), 6);
        assert!(c.get(&(0, 1)).is_some() && c.get(&(1, 1)).is_some());
        c.put((0, 1), cached(10, 10));
        assert_eq!(c.untrimmed(100), vec![(1, 1)]);
        c.clear();
        assert_eq!(c.len(), 0);
        assert!(c.untrimmed(100).is_empty());
    }

    #[test]
    fn quiet_devices_are_those_untouched_for_a_whole_pass() {
        let mut c = DeviceCache::new(8);
        c.put((1, 1), cached(10, 0));
        c.put((2, 1), cached(10, 0));
        assert!(c.quiet_untrimmed(10).is_empty(), "touched in this pass");
        c.put((2, 1), cached(11, 0));
        assert_eq!(c.quiet_untrimmed(10), vec![(1, 1)]);
        let mut quiet = c.quiet_untrimmed(10);
        quiet.sort_unstable();
        assert_eq!(quiet, vec![(1, 1), (2, 1)]);
        assert_eq!(c.quiet_untrimmed(1).len(), 1, "bounded");
    }

    #[test]
    fn evicts_untrimmed_devices_when_nothing_else_is_left() {
        let mut c = DeviceCache::new(4);
        for user in 0..5 {
            c.put((user, 1), cached(3, 0));
        }
        c.evict();
        assert_eq!(c.len(), 3);
        assert_eq!(c.untrimmed(100).len(), 3);
    }
}
