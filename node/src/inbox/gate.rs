//! [`ShardGate`]: the shards this node's inbox accepts appends for (the write fence of a
//! hand-off).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::shard::ShardId;

/// One writable flag per shard, all set at start (a single node owns every shard). Memory:
/// one byte per shard.
///
/// The flags are read by the inbox writer thread for every append it handles and written by
/// [`super::Inbox::set_writable`]. The fence's guarantee does not rest on the ordering of these
/// atomics alone: a [`super::Inbox::sync_barrier`] sent after the flag is cleared travels through
/// the writer's queue, whose send/receive orders the store before every append the writer
/// handles after receiving the barrier.
#[derive(Debug)]
pub(crate) struct ShardGate {
    writable: Box<[AtomicBool]>,
}

impl ShardGate {
    pub(crate) fn new(shard_count: u16) -> ShardGate {
        ShardGate {
            writable: (0..shard_count).map(|_| AtomicBool::new(true)).collect(),
        }
    }

    /// `false` if there is no such shard.
    pub(crate) fn set(&self, shard: ShardId, writable: bool) -> bool {
        match self.writable.get(usize::from(shard)) {
            Some(flag) => {
                flag.store(writable, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// A shard that does not exist is not writable.
    pub(crate) fn is_writable(&self, shard: ShardId) -> bool {
        self.writable
            .get(usize::from(shard))
            .is_some_and(|flag| flag.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_starts_writable_and_flips_alone() {
        let gate = ShardGate::new(4);
        assert!((0..4).all(|s| gate.is_writable(s)));
        assert!(gate.set(2, false));
        assert_eq!(
            (0..4).map(|s| gate.is_writable(s)).collect::<Vec<_>>(),
            vec![true, true, false, true]
        );
        assert!(gate.set(2, true));
        assert!(gate.is_writable(2));
        assert!(!gate.set(4, true), "no such shard");
        assert!(!gate.is_writable(4));
    }
}
