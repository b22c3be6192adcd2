//! [`Digest`]: a running summary of a shard's rows, so that the old and the new owner can check
//! that they hold the same shard without sending it twice.

use sha2::{Digest as _, Sha256};

use super::Row;
use crate::storage::Cf;

/// What both sides of a hand-off compare: equal digests mean equal rows (same families, keys
/// and values, in the same order), up to SHA-256 collisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardDigest {
    /// Rows digested.
    pub rows: u64,
    /// Their [`Row::encoded_len`] summed.
    pub bytes: u64,
    /// SHA-256 over every row as `cf u8 | key len u32 | key | value len u32 | value` (lengths
    /// big-endian), in the order they were added.
    pub hash: [u8; 32],
}

/// Digests rows one at a time, in export order (family, then key), as they are exported,
/// imported or scanned: the result does not depend on how the rows were cut into chunks.
///
/// With [`Digest::new`], dedup records whose expiry (the first 8 bytes of the value, see
/// [`Cf::Dedup`]) is at or before `dedup_cutoff_ms` are left out: an engine may drop them at any
/// moment (RocksDB's compaction filter does, by the wall clock), so a record exported while
/// expired may be gone when the old owner digests its copy again, and the digests differ for
/// no real change. Both sides must use the same cutoff, one not reached before both have
/// digested: e.g. the start of the pull plus an hour. [`Digest::default`] leaves nothing out.
#[derive(Debug, Clone)]
pub struct Digest {
    rows: u64,
    bytes: u64,
    hasher: Sha256,
    dedup_cutoff_ms: u64,
}

/// Digests every row: no dedup record is left out (see [`Digest::new`] for why one may want
/// to).
impl Default for Digest {
    fn default() -> Digest {
        Digest::new(0)
    }
}

impl Digest {
    pub fn new(dedup_cutoff_ms: u64) -> Digest {
        Digest {
            rows: 0,
            bytes: 0,
            hasher: Sha256::new(),
            dedup_cutoff_ms,
        }
    }

    pub fn add(&mut self, row: &Row) {
        if row.column_family() == Some(Cf::Dedup) && self.expired_by_cutoff(&row.value) {
            return;
        }
        self.rows += 1;
        self.bytes += row.encoded_len() as u64;
        // Lengths are bounded far below 4 GiB (`ROW_*_BYTES_MAX`); the framing makes the
        // boundary between key and value part of what is hashed.
        self.hasher.update([row.cf]);
        self.hasher.update(
            u32::try_from(row.key.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        self.hasher.update(&row.key);
        self.hasher.update(
            u32::try_from(row.value.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        self.hasher.update(&row.value);
    }

    pub fn finish(self) -> ShardDigest {
        ShardDigest {
            rows: self.rows,
            bytes: self.bytes,
            hash: self.hasher.finalize().into(),
        }
    }

    /// A value too short to hold an expiry is kept (as the compaction filter keeps it).
    fn expired_by_cutoff(&self, value: &[u8]) -> bool {
        value
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .is_some_and(|expiry| u64::from_be_bytes(expiry) <= self.dedup_cutoff_ms)
    }
}
