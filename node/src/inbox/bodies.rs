//! Group message bodies stored once per shard ([`Cf::GroupBodies`]).
//!
//! A group message fanned out to a node is stored for every member device there. Instead of a
//! full copy in each entry, the writer keeps one body per (recipients' shard, group message)
//! and a count of the entries of that shard that refer to it; each such entry holds only
//! `group | group_seq` (flagged as a reference, see `inbox/entry.rs`). The shard prefix keeps a
//! shard one unit for hand-off and replication, so the saving is per destination shard:
//! members in the same shard share one body, members in different shards each pay for one.
//! That is the logical layout, which every caller sees; on disk the RocksDB engine keeps one
//! copy per node, each shard's body row being a marker (`storage/rocks/bodies.rs`).
//!
//! Two rows per body, so that taking or releasing a reference rewrites 17 bytes, never the
//! body (which is written once, in the batch of the first entry referring to it):
//! - count: `shard | 0x00 | group [16] | group_seq u64` →
//!   `version u8 | refs u64 | expires_at_ms u64`, the latest expiry of the entries referring;
//! - body: `shard | 0x01 | group | group_seq` → the entry body as sent
//!   (`group | group_seq | ciphertext`).
//!
//! Every change of a count happens in the writer's group commit that stores, acknowledges,
//! expires or drops the entry (the writer's overlay holds the rows a group read or changed),
//! so a crash leaves counts and entries consistent; the batch that releases the last reference
//! deletes both rows. The inbox's expiry pass also deletes bodies past their expiry (a
//! backstop: reads skip expired entries anyway).
//!
//! [`Cf::GroupBodies`]: crate::storage::Cf::GroupBodies

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BufMut;

use super::codec::{corrupt, Reader};
use crate::shard::ShardId;
use crate::storage::{key, StorageError, GROUP_BODY_REF_LEN, GROUP_BODY_TAG};

/// Bytes of a reference, and of a row key after the shard and tag: `group [16] | group_seq
/// u64`, the front of every group message body.
pub(crate) const BODY_REF_LEN: usize = GROUP_BODY_REF_LEN;

const COUNT_TAG: u8 = 0;
const BODY_TAG: u8 = GROUP_BODY_TAG;
const FORMAT: u8 = 1;
const CF: &str = "group_bodies";

/// The count row key of the shared body for a group message entry body (or reference)
/// `group | group_seq | ...` in `shard`; `None` if it is too short to name one.
pub(crate) fn count_key(shard: ShardId, body: &[u8]) -> Option<Vec<u8>> {
    Some(key(shard, &[&[COUNT_TAG], body.get(..BODY_REF_LEN)?]))
}

/// The body row key that goes with a count row key.
pub(crate) fn body_row_key(count_key: &[u8]) -> Vec<u8> {
    let mut k = count_key.to_vec();
    if let Some(tag) = k.get_mut(2) {
        *tag = BODY_TAG;
    }
    k
}

/// `[from, to)` of the count rows of `shard`.
pub(crate) fn count_range(shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    (key(shard, &[&[COUNT_TAG]]), key(shard, &[&[BODY_TAG]]))
}

/// How many entries refer to a shared body, and until when the latest of them lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BodyCount {
    pub(crate) refs: u64,
    pub(crate) expires_at_ms: u64,
}

impl BodyCount {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17);
        out.put_u8(FORMAT);
        out.put_u64(self.refs);
        out.put_u64(self.expires_at_ms);
        out
    }

    pub(crate) fn decode(value: &[u8]) -> Result<Self, StorageError> {
        let mut r = Reader::new(value);
        let short = || corrupt(CF, "body count is truncated");
        let version = r.u8().ok_or_else(short)?;
        if version != FORMAT {
            return Err(corrupt(CF, format!("unknown body count format {version}")));
        }
        let refs = r.u64().ok_or_else(short)?;
        let expires_at_ms = r.u64().ok_or_else(short)?;
        if !r.is_done() {
            return Err(corrupt(CF, "body count has trailing bytes"));
        }
        Ok(Self {
            refs,
            expires_at_ms,
        })
    }
}

/// Counters of shared bodies, rendered as `ringpost_group_bodies_stored_total` (rows created)
/// and `ringpost_group_body_refs_total` (group message entries stored by reference): their
/// ratio is how many entries share one body.
#[derive(Debug, Default)]
pub struct GroupBodyCounters {
    pub(crate) stored: AtomicU64,
    pub(crate) refs: AtomicU64,
}

impl GroupBodyCounters {
    /// `(bodies stored, entries stored by reference)` since start.
    pub fn get(&self) -> (u64, u64) {
        (
            self.stored.load(Ordering::Relaxed),
            self.refs.load(Ordering::Relaxed),
        )
    }

    /// Appends the counters in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let (stored, refs) = self.get();
        let _ = writeln!(
            out,
            "# HELP ringpost_group_bodies_stored_total Group message bodies stored (once per destination shard).\n# TYPE ringpost_group_bodies_stored_total counter\nringpost_group_bodies_stored_total {stored}\n# HELP ringpost_group_body_refs_total Group message inbox entries stored as a reference to a shared body.\n# TYPE ringpost_group_body_refs_total counter\nringpost_group_body_refs_total {refs}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_roundtrip_and_reject_bad_bytes() {
        let c = BodyCount {
            refs: 7,
            expires_at_ms: 1_700_000_000_000,
        };
        let bytes = c.encode();
        assert_eq!(BodyCount::decode(&bytes).unwrap(), c);
        for len in 0..bytes.len() {
            assert!(BodyCount::decode(&bytes[..len]).is_err());
        }
        let mut version = bytes.clone();
        version[0] = 9;
        assert!(BodyCount::decode(&version).is_err());
        let mut trailing = bytes;
        trailing.push(0);
        assert!(BodyCount::decode(&trailing).is_err());
    }

    #[test]
    fn keys_are_shard_tag_group_and_seq() {
        let body = [[1u8; 16].as_slice(), &5u64.to_be_bytes(), b"ciphertext"].concat();
        let k = count_key(3, &body).unwrap();
        assert_eq!(k.len(), 2 + 1 + BODY_REF_LEN);
        assert_eq!(&k[..3], &[0, 3, COUNT_TAG]);
        assert_eq!(&k[3..], &body[..BODY_REF_LEN]);
        assert_eq!(count_key(3, &body[..BODY_REF_LEN]), Some(k.clone()));
        assert_eq!(count_key(3, &body[..BODY_REF_LEN - 1]), None);
        let b = body_row_key(&k);
        assert_eq!((b[2], &b[3..]), (BODY_TAG, &k[3..]));
        let (from, to) = count_range(3);
        assert!(from <= k && k < to && to <= b);
        assert!(b < count_range(4).0);
    }
}
