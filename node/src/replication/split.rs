//! [`split`]: a write batch cut into the op lists of the shards it touches.

use std::collections::BTreeMap;

use crate::shard::ShardId;
use crate::shard_rows::is_shard_prefixed;
use crate::storage::{prefix_end, Cf, Op, WriteBatch};

/// Why a batch cannot be cut into per-shard records. Nothing of it is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// A key of a shard-prefixed family is shorter than a shard id, or starts with
    /// `u16::MAX`, which is never a shard.
    #[error("op {index} of the batch: a {cf} key without a shard prefix")]
    NoShard { index: usize, cf: &'static str },
    /// A range delete covers keys of more than one shard. No service issues one (dropping a
    /// shard is one range per family, within the shard), and replicating one would need a
    /// record in every shard it covers, up to all of them: refused rather than split.
    #[error("op {index} of the batch: a {cf} range delete spans more than one shard")]
    RangeAcrossShards { index: usize, cf: &'static str },
}

/// The ops of `batch` on each shard it touches, in shard order, each list in the batch's order.
///
/// Ops of node-local families ([`Cf::Meta`], [`Cf::BodyStore`]) are in none: they stay on this node. An empty or
/// inverted range delete, which deletes nothing on any engine, is left out too. Every other op
/// belongs to exactly one shard: its key's first two bytes (big-endian), or for a range delete
/// its `from`'s, with `to` at most the end of that shard's prefix.
pub fn split(batch: &WriteBatch) -> Result<Vec<(ShardId, Vec<Op>)>, SplitError> {
    let mut shards: BTreeMap<ShardId, Vec<Op>> = BTreeMap::new();
    for (index, op) in batch.ops.iter().enumerate() {
        let cf = op_cf(op);
        if !is_shard_prefixed(cf) {
            continue;
        }
        let no_shard = || SplitError::NoShard {
            index,
            cf: cf.name(),
        };
        let shard = match op {
            Op::Put { key, .. } | Op::Delete { key, .. } => {
                shard_of_key(key).ok_or_else(no_shard)?
            }
            Op::DeleteRange { from, to, .. } => {
                if from >= to {
                    continue;
                }
                let shard = shard_of_key(from).ok_or_else(no_shard)?;
                if to.as_slice() > prefix_end(&from[..2]).as_slice() {
                    return Err(SplitError::RangeAcrossShards {
                        index,
                        cf: cf.name(),
                    });
                }
                shard
            }
        };
        shards.entry(shard).or_default().push(op.clone());
    }
    Ok(shards.into_iter().collect())
}

/// Whether `batch` has an op to replicate (an op [`split`] would put in a shard's list, or
/// one it would refuse), without allocating.
pub(crate) fn touches_shards(batch: &WriteBatch) -> bool {
    batch.ops.iter().any(|op| match op {
        Op::DeleteRange { cf, from, to } => is_shard_prefixed(*cf) && from < to,
        Op::Put { cf, .. } | Op::Delete { cf, .. } => is_shard_prefixed(*cf),
    })
}

pub(crate) fn op_cf(op: &Op) -> Cf {
    match op {
        Op::Put { cf, .. } | Op::Delete { cf, .. } | Op::DeleteRange { cf, .. } => *cf,
    }
}

/// The shard a key belongs to: its first two bytes, big-endian; `None` if it is shorter or
/// they are `u16::MAX`.
pub(crate) fn shard_of_key(key: &[u8]) -> Option<ShardId> {
    let shard = ShardId::from_be_bytes([*key.first()?, *key.get(1)?]);
    (shard != ShardId::MAX).then_some(shard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::key;

    #[test]
    fn ops_go_to_their_shards_in_order_and_local_ops_stay_local() {
        let mut b = WriteBatch::new();
        b.put(Cf::Inbox, key(2, &[b"a"]), b"1".to_vec());
        b.put(Cf::Meta, b"clock".to_vec(), b"x".to_vec());
        b.delete(Cf::Accounts, key(1, &[b"u"]));
        b.delete_range(Cf::Inbox, key(2, &[]), prefix_end(&key(2, &[])));
        b.put(Cf::Inbox, key(2, &[b"b"]), b"2".to_vec());
        // Empty and inverted ranges delete nothing: not replicated.
        b.delete_range(Cf::Inbox, key(3, &[b"z"]), key(3, &[b"a"]));
        b.delete_range(Cf::Inbox, key(3, &[b"z"]), key(3, &[b"z"]));
        let split = split(&b).unwrap();
        assert_eq!(
            split,
            vec![
                (1, vec![b.ops[2].clone()]),
                (
                    2,
                    vec![b.ops[0].clone(), b.ops[3].clone(), b.ops[4].clone()]
                ),
            ]
        );
        assert!(touches_shards(&b));
        let mut local = WriteBatch::new();
        local.put(Cf::Meta, b"clock".to_vec(), b"x".to_vec());
        assert!(!touches_shards(&local));
        assert_eq!(super::split(&local).unwrap(), vec![]);
    }

    #[test]
    fn a_whole_shard_range_is_one_shard_even_at_a_carry() {
        // Shard 0x00ff's prefix ends at [0x01]: the range is still within the shard.
        for shard in [0, 0x00ff, 0xfffe] {
            let mut b = WriteBatch::new();
            let from = key(shard, &[]);
            b.delete_range(Cf::Dedup, from.clone(), prefix_end(&from));
            assert_eq!(split(&b).unwrap().len(), 1, "shard {shard}");
        }
    }

    #[test]
    fn refuses_ranges_across_shards_and_keys_without_a_shard() {
        let mut b = WriteBatch::new();
        b.delete_range(Cf::Inbox, key(2, &[b"a"]), key(3, &[b"a"]));
        assert!(matches!(
            split(&b),
            Err(SplitError::RangeAcrossShards { index: 0, .. })
        ));
        for bad in [vec![], vec![7], vec![0xff, 0xff, 1]] {
            let mut b = WriteBatch::new();
            b.put(Cf::Meta, b"ok".to_vec(), b"".to_vec());
            b.put(Cf::Prekeys, bad.clone(), b"v".to_vec());
            assert!(
                matches!(split(&b), Err(SplitError::NoShard { index: 1, .. })),
                "{bad:?}"
            );
        }
        let mut b = WriteBatch::new();
        b.delete_range(Cf::Inbox, vec![1], vec![9]);
        assert!(matches!(split(&b), Err(SplitError::NoShard { .. })));
    }
}
