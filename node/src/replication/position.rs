//! [`Position`]: how far a shard's log goes in this node's copy of the shard.

use crate::shard::ShardId;
use crate::storage::{key, Cf, Engine, StorageError};

/// The byte after the shard prefix in a position's key (keys may not be the bare prefix).
const POSITION_TAG: u8 = 0;
/// Version byte of the stored value.
const POSITION_VERSION: u8 = 2;
/// `version u8 | lsn u64 | epoch u64 | fence u64`, big-endian.
const POSITION_BYTES: usize = 1 + 8 + 8 + 8;
/// The first version, without the fence: `version u8 (= 1) | lsn u64 | epoch u64`. Read as a
/// fence equal to the epoch.
const POSITION_V1: u8 = 1;
const POSITION_V1_BYTES: usize = 1 + 8 + 8;

/// The last record of a shard's log that this node's copy of the shard includes. A shard never
/// written through the replication layer is at LSN 0, epoch 0: its first record is LSN 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    pub lsn: u64,
    /// The epoch of the record at `lsn` (of the primary that wrote it). Two copies whose
    /// positions are equal hold the same log up to `lsn`: one primary writes an epoch's records,
    /// and a record is applied only on top of the record it was written after (its
    /// [`base_epoch`](super::ShardLogRecord::base_epoch)).
    pub epoch: u64,
    /// The latest epoch of any primary this copy took a record or snapshot from (at least
    /// `epoch`; a snapshot leaves `epoch` at the epoch of the primary's record at `lsn`). A
    /// primary of an earlier epoch was deposed: what it sends is refused, never counted as
    /// applied (Raft's current term, where `epoch` is the last entry's term).
    pub fence: u64,
}

impl Position {
    /// The position after a record of `epoch` at `lsn`, applied to a copy whose fence was
    /// `fence`.
    pub fn after(lsn: u64, epoch: u64, fence: u64) -> Position {
        Position {
            lsn,
            epoch,
            fence: fence.max(epoch),
        }
    }

    pub fn encode(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(POSITION_BYTES);
        v.push(POSITION_VERSION);
        v.extend_from_slice(&self.lsn.to_be_bytes());
        v.extend_from_slice(&self.epoch.to_be_bytes());
        v.extend_from_slice(&self.fence.to_be_bytes());
        v
    }

    pub fn decode(bytes: &[u8]) -> Result<Position, StorageError> {
        let corrupt = |detail: &str| StorageError::Corrupt {
            cf: "shard_log",
            detail: detail.to_owned(),
        };
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        match (bytes.first(), bytes.len()) {
            (Some(&POSITION_VERSION), POSITION_BYTES) => Ok(Position {
                lsn: word(1),
                epoch: word(9),
                fence: word(17),
            }),
            (Some(&POSITION_V1), POSITION_V1_BYTES) => Ok(Position {
                lsn: word(1),
                epoch: word(9),
                fence: word(9),
            }),
            (Some(&POSITION_VERSION | &POSITION_V1), _) => Err(corrupt(
                "a shard log position is not 17 bytes (version 1) or 25 (version 2)",
            )),
            _ => Err(corrupt("a shard log position has an unknown version")),
        }
    }
}

/// The key of `shard`'s position in [`Cf::ShardLog`].
pub fn position_key(shard: ShardId) -> Vec<u8> {
    key(shard, &[&[POSITION_TAG]])
}

/// `shard`'s position in `engine` (LSN 0, epoch 0 if none is stored).
pub fn read_position(engine: &dyn Engine, shard: ShardId) -> Result<Position, StorageError> {
    match engine.get(Cf::ShardLog, &position_key(shard))? {
        Some(bytes) => Position::decode(&bytes),
        None => Ok(Position::default()),
    }
}

/// The byte after the shard prefix in the key of a catch-up in progress.
const CATCH_UP_TAG: u8 = 1;
/// Version byte of a catch-up marker: `version u8 | session u64 | next chunk index u32`.
const CATCH_UP_VERSION: u8 = 1;

/// The key that marks `shard`'s copy on this node as incomplete: a catch-up (snapshot) has
/// begun and its last chunk has not been applied. Stored in [`Cf::ShardLog`] beside the
/// position, so it never travels in a snapshot (the family is not exported).
pub fn catch_up_key(shard: ShardId) -> Vec<u8> {
    key(shard, &[&[CATCH_UP_TAG]])
}

/// Where a copy is in a catch-up: its session and the index of the chunk it takes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUpMark {
    pub session: u64,
    pub next: u32,
}

impl CatchUpMark {
    pub fn encode(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(13);
        v.push(CATCH_UP_VERSION);
        v.extend_from_slice(&self.session.to_be_bytes());
        v.extend_from_slice(&self.next.to_be_bytes());
        v
    }
}

/// The catch-up `shard`'s copy is in the middle of, if it is.
pub fn read_catch_up(
    engine: &dyn Engine,
    shard: ShardId,
) -> Result<Option<CatchUpMark>, StorageError> {
    let Some(bytes) = engine.get(Cf::ShardLog, &catch_up_key(shard))? else {
        return Ok(None);
    };
    match bytes.as_slice() {
        [CATCH_UP_VERSION, rest @ ..] if rest.len() == 12 => {
            let mut session = [0u8; 8];
            session.copy_from_slice(&rest[..8]);
            let mut next = [0u8; 4];
            next.copy_from_slice(&rest[8..]);
            Ok(Some(CatchUpMark {
                session: u64::from_be_bytes(session),
                next: u32::from_be_bytes(next),
            }))
        }
        _ => Err(StorageError::Corrupt {
            cf: "shard_log",
            detail: "a catch-up marker is not 13 bytes of version 1".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrips_and_refuses_corrupt_values() {
        let p = Position {
            lsn: u64::MAX - 1,
            epoch: 7,
            fence: 9,
        };
        assert_eq!(Position::decode(&p.encode()).unwrap(), p);
        // A version 1 value (no fence) reads with its epoch as the fence.
        let mut v1 = vec![1];
        v1.extend_from_slice(&p.lsn.to_be_bytes());
        v1.extend_from_slice(&p.epoch.to_be_bytes());
        assert_eq!(Position::decode(&v1).unwrap(), Position { fence: 7, ..p });
        let mut bad_version = p.encode();
        bad_version[0] = 9;
        for bad in [&[][..], &p.encode()[..24], &v1[..16], &bad_version[..]] {
            assert!(matches!(
                Position::decode(bad),
                Err(StorageError::Corrupt { .. })
            ));
        }
    }
}
