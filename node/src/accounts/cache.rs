//! [`DeviceCache`]: a bounded in-memory cache of users' device lists, in front of the accounts
//! family, for the device-list check on every `Send`.
//!
//! CLOCK eviction over a fixed number of slots, split into [`CACHE_SHARDS`] independently locked
//! parts so that concurrent sends rarely contend. Entries are invalidated by the accounts service
//! on every change it makes. A read that races with a change cannot re-insert the old list: each
//! part has a generation bumped by every invalidation, and a fill is only kept if the generation
//! it observed before reading storage is still current.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use ringpost_wire::limits::DEVICES_PER_USER_MAX;
use ringpost_wire::{DeviceId, UserId};

/// Independently locked parts of the cache.
pub(crate) const CACHE_SHARDS: usize = 16;

/// A device list stored inline (no allocation per entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeviceSet {
    ids: [DeviceId; DEVICES_PER_USER_MAX],
    len: u8,
}

impl DeviceSet {
    /// The first [`DEVICES_PER_USER_MAX`] ids of `ids` (an account never has more).
    pub fn new(ids: &[DeviceId]) -> DeviceSet {
        let mut set = DeviceSet {
            ids: [0; DEVICES_PER_USER_MAX],
            len: 0,
        };
        for (slot, id) in set.ids.iter_mut().zip(ids) {
            *slot = *id;
            set.len += 1;
        }
        set
    }

    pub fn as_slice(&self) -> &[DeviceId] {
        &self.ids[..usize::from(self.len)]
    }
}

struct Slot {
    user: UserId,
    devices: DeviceSet,
    referenced: bool,
}

struct Part {
    index: HashMap<UserId, usize>,
    slots: Vec<Slot>,
    hand: usize,
    capacity: usize,
    generation: u64,
}

/// See the module documentation. Worst-case memory: about 64 bytes per entry (a 32-byte slot
/// plus the hash index at its load factor), so `capacity` × 64 bytes.
pub(crate) struct DeviceCache {
    parts: Box<[Mutex<Part>]>,
}

impl DeviceCache {
    /// A cache of at most `capacity` users (0 disables caching).
    pub fn new(capacity: usize) -> DeviceCache {
        let per_part = capacity.div_ceil(CACHE_SHARDS);
        let parts = (0..CACHE_SHARDS)
            .map(|_| {
                Mutex::new(Part {
                    index: HashMap::new(),
                    slots: Vec::new(),
                    hand: 0,
                    capacity: per_part,
                    generation: 0,
                })
            })
            .collect();
        DeviceCache { parts }
    }

    fn part(&self, user: UserId) -> MutexGuard<'_, Part> {
        // Fibonacci hashing; the top bits pick the part.
        let h = user.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let i = (h >> 32) as usize % self.parts.len();
        // A panic while holding the lock cannot leave a part half-updated in a way that
        // matters (at worst an entry is missing), so poisoning is ignored.
        self.parts[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, user: UserId) -> Option<DeviceSet> {
        let mut part = self.part(user);
        let i = *part.index.get(&user)?;
        let slot = &mut part.slots[i];
        slot.referenced = true;
        Some(slot.devices)
    }

    /// The generation to pass to [`DeviceCache::fill`]; read it before reading storage.
    pub fn generation(&self, user: UserId) -> u64 {
        self.part(user).generation
    }

    /// Caches `devices` for `user`, unless the part was invalidated since `generation`.
    pub fn fill(&self, user: UserId, devices: DeviceSet, generation: u64) {
        let mut part = self.part(user);
        if part.generation != generation || part.capacity == 0 {
            return;
        }
        if let Some(&i) = part.index.get(&user) {
            part.slots[i].devices = devices;
            return;
        }
        if part.slots.len() < part.capacity {
            let i = part.slots.len();
            part.slots.push(Slot {
                user,
                devices,
                referenced: false,
            });
            part.index.insert(user, i);
            return;
        }
        // CLOCK: clear reference bits until an unreferenced slot comes round; at most two
        // turns of the hand.
        let victim = loop {
            let hand = part.hand % part.slots.len();
            part.hand = hand + 1;
            let slot = &mut part.slots[hand];
            if slot.referenced {
                slot.referenced = false;
            } else {
                break hand;
            }
        };
        let old = part.slots[victim].user;
        part.index.remove(&old);
        part.slots[victim] = Slot {
            user,
            devices,
            referenced: false,
        };
        part.index.insert(user, victim);
    }

    /// Forgets `user` and fences off fills that started before this call.
    pub fn invalidate(&self, user: UserId) {
        let mut part = self.part(user);
        part.generation = part.generation.wrapping_add(1);
        if let Some(i) = part.index.remove(&user) {
            part.slots.swap_remove(i);
            if i < part.slots.len() {
                let moved = part.slots[i].user;
                part.index.insert(moved, i);
            }
        }
    }

    /// Forgets everything (e.g. when shard ownership changes and another node may have
    /// changed accounts meanwhile).
    pub fn clear(&self) {
        for part in self.parts.iter() {
            let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
            part.generation = part.generation.wrapping_add(1);
            part.index.clear();
            part.slots.clear();
            part.hand = 0;
        }
    }

    /// Forgets every cached user for whom `forget` holds (e.g. the users of one shard) and,
    /// like [`DeviceCache::invalidate`], fences off every fill that started before this call.
    /// Visits every slot: O(capacity).
    pub fn forget_where(&self, mut forget: impl FnMut(UserId) -> bool) {
        for part in self.parts.iter() {
            let mut guard = part.lock().unwrap_or_else(|e| e.into_inner());
            let part = &mut *guard;
            part.generation = part.generation.wrapping_add(1);
            part.slots.retain(|slot| !forget(slot.user));
            part.index.clear();
            part.index.extend(
                part.slots
                    .iter()
                    .enumerate()
                    .map(|(i, slot)| (slot.user, i)),
            );
            part.hand = 0;
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).slots.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_set_is_bounded() {
        assert_eq!(DeviceSet::new(&[1, 2]).as_slice(), &[1, 2]);
        assert_eq!(DeviceSet::new(&[]).as_slice(), &[] as &[DeviceId]);
        assert_eq!(
            DeviceSet::new(&[1, 2, 3, 4, 5, 6, 7]).as_slice().len(),
            DEVICES_PER_USER_MAX
        );
    }

    #[test]
    fn fill_get_invalidate() {
        let c = DeviceCache::new(100);
        assert_eq!(c.get(1), None);
        let g = c.generation(1);
        c.fill(1, DeviceSet::new(&[1, 3]), g);
        assert_eq!(c.get(1).unwrap().as_slice(), &[1, 3]);
        c.invalidate(1);
        assert_eq!(c.get(1), None);
        // A fill that read storage before the invalidation is dropped.
        c.fill(1, DeviceSet::new(&[1]), g);
        assert_eq!(c.get(1), None);
        let g = c.generation(1);
        c.fill(1, DeviceSet::new(&[1]), g);
        assert_eq!(c.get(1).unwrap().as_slice(), &[1]);
        c.clear();
        assert_eq!(c.get(1), None);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn forget_where_keeps_the_others_and_fences_fills() {
        let cap = CACHE_SHARDS * 8;
        let c = DeviceCache::new(cap);
        let generations: Vec<u64> = (0..40u64).map(|user| c.generation(user)).collect();
        for user in 0..40u64 {
            c.fill(user, DeviceSet::new(&[1]), generations[user as usize]);
        }
        let cached: Vec<u64> = (0..40u64).filter(|&u| c.get(u).is_some()).collect();
        c.forget_where(|user| user % 2 == 0);
        for &user in &cached {
            assert_eq!(c.get(user).is_some(), user % 2 == 1, "user {user}");
        }
        assert_eq!(c.len(), cached.iter().filter(|&&u| u % 2 == 1).count());
        // A fill that read storage before the call is dropped.
        c.fill(2, DeviceSet::new(&[1]), generations[2]);
        assert_eq!(c.get(2), None);
        // Index and slots still agree: fills, evictions and invalidations keep working.
        for user in 1000..1200u64 {
            let g = c.generation(user);
            c.fill(user, DeviceSet::new(&[2]), g);
            assert!(c.len() <= cap);
        }
        for user in (1..40u64).step_by(2).chain(1000..1200) {
            c.invalidate(user);
            assert_eq!(c.get(user), None);
        }
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn stays_within_capacity_and_keeps_hot_entries() {
        let cap = CACHE_SHARDS * 4;
        let c = DeviceCache::new(cap);
        for user in 0..10_000u64 {
            let g = c.generation(user);
            c.fill(user, DeviceSet::new(&[1]), g);
            // User 7 is read constantly: CLOCK keeps it.
            if user >= 7 {
                assert!(c.get(7).is_some(), "hot entry evicted at {user}");
            }
            assert!(c.len() <= cap);
        }
        // Invalidate entries in the middle of parts, then keep filling: indexes stay right.
        for user in 9_990..10_000u64 {
            c.invalidate(user);
        }
        for user in 20_000..20_100u64 {
            let g = c.generation(user);
            c.fill(user, DeviceSet::new(&[1, 2]), g);
        }
        for user in 20_000..20_100u64 {
            if let Some(set) = c.get(user) {
                assert_eq!(set.as_slice(), &[1, 2]);
            }
        }
        assert!(c.len() <= cap);
    }

    #[test]
    fn zero_capacity_disables() {
        let c = DeviceCache::new(0);
        let g = c.generation(5);
        c.fill(5, DeviceSet::new(&[1]), g);
        assert_eq!(c.get(5), None);
    }
}
