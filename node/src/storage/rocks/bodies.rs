//! Group message bodies stored once per node ([`Cf::BodyStore`]).
//!
//! The inbox stores a group message's body once per destination shard ([`Cf::GroupBodies`],
//! `inbox/bodies.rs`): the shard rows must move with their shard (hand-off, replication,
//! snapshots, drops). A node owns a few thousand shards, so a large group's members on one
//! node are nearly all in distinct shards and the body would still be stored almost once per
//! member. The engine therefore keeps the logical rows and deduplicates their bytes on disk:
//!
//! - a shard's body row (`shard | 0x01 | group | group_seq`) is written with an empty value, a
//!   marker meaning "the body is in the store";
//! - the store holds `0x00 | group | group_seq` → `format u8 | refs u64`, how many shard body
//!   rows of this node hold the marker, and `0x01 | group | group_seq` → the body;
//! - reads of a marker return the store's body, under one RocksDB snapshot, so every caller
//!   (delivery, hand-off export, catch-up snapshots, digests) sees the logical row.
//!
//! A count moves only when a marker row appears or goes, so re-applying a put (a replication
//! re-send, a repeated hand-off import) or deleting an absent row changes nothing. The engine
//! reads each affected row's current state (a point get per body row op: one per shard and
//! group message, not per member) and range deletes are scanned for the markers they remove;
//! one mutex serialises these read-modify-writes, and only batches touching body rows take it.
//!
//! A body row with a non-empty value holds its body in place: rows written before this store
//! existed, and a put whose body differs from the one stored under the same `group |
//! group_seq` (no service writes one; kept so the engine returns exactly what was written).
//! Such rows are read as they are and are not counted.
//!
//! [`Cf::BodyStore`]: crate::storage::Cf::BodyStore
//! [`Cf::GroupBodies`]: crate::storage::Cf::GroupBodies

use std::collections::HashMap;

use rocksdb::{ColumnFamily, DB};

use super::{classify, handle, RocksEngine, Seek};
use crate::storage::{group_body_ref, Cf, Op, Result, StorageError, WriteBatch};

const COUNT_TAG: u8 = 0;
const BODY_TAG: u8 = 1;
const FORMAT: u8 = 1;
const COUNT_LEN: usize = 1 + 8;

/// The store key of `group | group_seq` under `tag`.
fn store_key(tag: u8, body_ref: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + body_ref.len());
    k.push(tag);
    k.extend_from_slice(body_ref);
    k
}

fn encode_count(refs: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(COUNT_LEN);
    out.push(FORMAT);
    out.extend_from_slice(&refs.to_be_bytes());
    out
}

fn decode_count(value: &[u8]) -> Result<u64> {
    let corrupt = |detail: String| StorageError::Corrupt {
        cf: Cf::BodyStore.name(),
        detail,
    };
    match value {
        [FORMAT, refs @ ..] if refs.len() == 8 => {
            let mut be = [0u8; 8];
            be.copy_from_slice(refs);
            Ok(u64::from_be_bytes(be))
        }
        [FORMAT, ..] => Err(corrupt(format!("a count of {} bytes", value.len()))),
        [format, ..] => Err(corrupt(format!("unknown count format {format}"))),
        [] => Err(corrupt("an empty count".into())),
    }
}

/// Whether `batch` writes a [`Cf::GroupBodies`] body row (or may, for a range delete), so
/// [`RocksEngine::write`] must translate it under the store's lock.
pub(super) fn touches_bodies(batch: &WriteBatch) -> bool {
    batch.ops.iter().any(|op| match op {
        Op::Put {
            cf: Cf::GroupBodies,
            key,
            ..
        }
        | Op::Delete {
            cf: Cf::GroupBodies,
            key,
        } => group_body_ref(key).is_some(),
        Op::DeleteRange {
            cf: Cf::GroupBodies,
            from,
            to,
        } => from < to,
        _ => false,
    })
}

/// What a shard body row holds on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowState {
    Absent,
    /// The empty marker: counted in the store.
    Shared,
    /// The body itself (written before the store, or differing from the stored one).
    InPlace,
}

impl RowState {
    fn of(value: Option<&[u8]>) -> Self {
        match value {
            None => RowState::Absent,
            Some([]) => RowState::Shared,
            Some(_) => RowState::InPlace,
        }
    }
}

/// One store entry as the ops of the batch so far leave it.
#[derive(Debug)]
struct StoreEntry {
    refs: u64,
    /// A body this batch writes; `None` while the one on disk (if any) stands. Bodies on disk
    /// are not loaded: a batch releasing many (a shard drop) holds no bodies in memory.
    body_new: Option<Vec<u8>>,
}

/// Translates the body row ops of one batch into marker rows and store updates, tracking what
/// earlier ops of the same batch did (a snapshot's first chunk range-deletes a shard and then
/// puts its rows again).
pub(super) struct BodyBatch<'a> {
    db: &'a DB,
    shard_cf: &'a ColumnFamily,
    store_cf: &'a ColumnFamily,
    rows: HashMap<Vec<u8>, RowState>,
    store: HashMap<Vec<u8>, StoreEntry>,
}

impl<'a> BodyBatch<'a> {
    pub(super) fn new(db: &'a DB) -> Result<Self> {
        Ok(Self {
            db,
            shard_cf: handle(db, Cf::GroupBodies)?,
            store_cf: handle(db, Cf::BodyStore)?,
            rows: HashMap::new(),
            store: HashMap::new(),
        })
    }

    fn row(&mut self, key: &[u8]) -> Result<RowState> {
        if let Some(state) = self.rows.get(key) {
            return Ok(*state);
        }
        let value =
            (self.db.get_pinned_cf(self.shard_cf, key)).map_err(|e| classify(e.into_string()))?;
        Ok(RowState::of(value.as_deref()))
    }

    fn entry(&mut self, body_ref: &[u8]) -> Result<&mut StoreEntry> {
        if !self.store.contains_key(body_ref) {
            let count = (self
                .db
                .get_pinned_cf(self.store_cf, store_key(COUNT_TAG, body_ref)))
            .map_err(|e| classify(e.into_string()))?;
            let refs = count.map_or(Ok(0), |v| decode_count(&v))?;
            let entry = StoreEntry {
                refs,
                body_new: None,
            };
            self.store.insert(body_ref.to_vec(), entry);
        }
        Ok(self.store.get_mut(body_ref).expect("inserted above"))
    }

    /// Drops one reference of a marker row being removed or overwritten.
    fn release(&mut self, body_ref: &[u8]) -> Result<()> {
        let entry = self.entry(body_ref)?;
        // A marker without a count would be a bug or a damaged store: never below zero.
        entry.refs = entry.refs.saturating_sub(1);
        Ok(())
    }

    /// Whether the body of a live store entry is `value`.
    fn stored_body_is(&self, body_ref: &[u8], value: &[u8]) -> Result<bool> {
        if let Some(body) = self.store.get(body_ref).and_then(|e| e.body_new.as_deref()) {
            return Ok(body == value);
        }
        let body = (self
            .db
            .get_pinned_cf(self.store_cf, store_key(BODY_TAG, body_ref)))
        .map_err(|e| classify(e.into_string()))?;
        Ok(body.as_deref() == Some(value))
    }

    /// The value to write for a put of `value` to the body row `key` (`body_ref` its group
    /// and seq): the empty marker, with a reference taken in the store, or the value itself.
    pub(super) fn put(&mut self, key: &[u8], body_ref: &[u8], value: Vec<u8>) -> Result<Vec<u8>> {
        if self.row(key)? == RowState::Shared {
            // A re-put (re-applied record, repeated import): release, then take again.
            self.release(body_ref)?;
        }
        let refs = self.entry(body_ref)?.refs;
        let physical = if refs == 0 {
            // No marker refers to the store's body (if any is left): this one replaces it.
            let entry = self.entry(body_ref)?;
            entry.refs = 1;
            entry.body_new = Some(value);
            Vec::new()
        } else if self.stored_body_is(body_ref, &value)? {
            self.entry(body_ref)?.refs += 1;
            Vec::new()
        } else if value.is_empty() {
            // An empty body would read as the marker. Only a broken writer sends one.
            return Err(StorageError::Other(format!(
                "an empty group body row conflicts with the body stored for {}",
                hex(body_ref)
            )));
        } else {
            value
        };
        let state = RowState::of(Some(physical.as_slice()));
        self.rows.insert(key.to_vec(), state);
        Ok(physical)
    }

    pub(super) fn delete(&mut self, key: &[u8], body_ref: &[u8]) -> Result<()> {
        if self.row(key)? == RowState::Shared {
            self.release(body_ref)?;
        }
        self.rows.insert(key.to_vec(), RowState::Absent);
        Ok(())
    }

    /// Releases every marker row in `[from, to)` (on disk, or put earlier in the batch).
    pub(super) fn delete_range(&mut self, from: &[u8], to: &[u8]) -> Result<()> {
        let mut in_range: Vec<(Vec<u8>, RowState)> = Vec::new();
        let mut it = (self.db).raw_iterator_cf_opt(
            self.shard_cf,
            RocksEngine::bounded_read(Cf::GroupBodies, from, to, Seek::Forward),
        );
        it.seek(from);
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if group_body_ref(key).is_some() && !self.rows.contains_key(key) {
                in_range.push((key.to_vec(), RowState::of(Some(value))));
            }
            it.next();
        }
        it.status().map_err(|e| classify(e.into_string()))?;
        drop(it);
        let earlier = self
            .rows
            .iter()
            .filter(|(k, _)| k.as_slice() >= from && k.as_slice() < to);
        in_range.extend(earlier.map(|(k, state)| (k.clone(), *state)));
        for (key, state) in in_range {
            if state == RowState::Shared {
                if let Some(body_ref) = group_body_ref(&key) {
                    self.release(body_ref)?;
                }
            }
            self.rows.insert(key, RowState::Absent);
        }
        Ok(())
    }

    /// Adds the store's changes to `rb`: a count at zero deletes the entry.
    pub(super) fn finish(self, rb: &mut rocksdb::WriteBatch) {
        for (body_ref, entry) in self.store {
            if entry.refs == 0 {
                rb.delete_cf(self.store_cf, store_key(COUNT_TAG, &body_ref));
                rb.delete_cf(self.store_cf, store_key(BODY_TAG, &body_ref));
                continue;
            }
            let count = encode_count(entry.refs);
            rb.put_cf(self.store_cf, store_key(COUNT_TAG, &body_ref), count);
            if let Some(body) = entry.body_new {
                rb.put_cf(self.store_cf, store_key(BODY_TAG, &body_ref), body);
            }
        }
    }
}

/// The logical value of the [`Cf::GroupBodies`] row `key` whose stored value is `value`: a
/// marker is replaced by the store's body, read with `get_store`; anything else is as stored.
pub(super) fn resolve(
    key: &[u8],
    value: Vec<u8>,
    get_store: impl Fn(&[u8]) -> Result<Option<Vec<u8>>>,
) -> Result<Vec<u8>> {
    let Some(body_ref) = group_body_ref(key) else {
        return Ok(value);
    };
    if !value.is_empty() {
        return Ok(value);
    }
    get_store(&store_key(BODY_TAG, body_ref))?.ok_or_else(|| StorageError::Corrupt {
        cf: Cf::GroupBodies.name(),
        detail: format!(
            "a body row refers to {}, missing from the store",
            hex(body_ref)
        ),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::rocks::RocksConfig;
    use crate::storage::{key, prefix_end, Engine, GROUP_BODY_TAG};

    const BODY_REF: [u8; 24] = [7; 24];

    fn body(text: &str) -> Vec<u8> {
        [&BODY_REF[..], text.as_bytes()].concat()
    }

    /// The body row of `BODY_REF` in `shard`.
    fn row_key(shard: u16) -> Vec<u8> {
        key(shard, &[&[GROUP_BODY_TAG], &BODY_REF])
    }

    fn open() -> (RocksEngine, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let e = RocksEngine::open(dir.path(), &RocksConfig::for_tests()).unwrap();
        (e, dir)
    }

    fn write(e: &RocksEngine, f: impl FnOnce(&mut WriteBatch)) {
        let mut b = WriteBatch::new();
        f(&mut b);
        e.write(b, true).unwrap();
    }

    /// The store's entry of `BODY_REF`: `(refs, body)`, or `None` with no row at all.
    fn stored(e: &RocksEngine) -> Option<(u64, Vec<u8>)> {
        let rows = e.raw_pairs(Cf::BodyStore);
        if rows.is_empty() {
            return None;
        }
        assert_eq!(rows.len(), 2, "a count and a body: {rows:?}");
        assert_eq!(rows[0].0, store_key(COUNT_TAG, &BODY_REF));
        assert_eq!(rows[1].0, store_key(BODY_TAG, &BODY_REF));
        Some((decode_count(&rows[0].1).unwrap(), rows[1].1.clone()))
    }

    /// The physical value of the body row of `shard`.
    fn raw_row(e: &RocksEngine, shard: u16) -> Option<Vec<u8>> {
        (e.raw_pairs(Cf::GroupBodies).into_iter())
            .find(|(k, _)| *k == row_key(shard))
            .map(|(_, v)| v)
    }

    #[test]
    fn two_shards_share_one_physical_body_and_read_it_back() {
        let (e, _dir) = open();
        let b = body("ciphertext");
        write(&e, |w| {
            w.put(Cf::GroupBodies, row_key(1), b.clone());
            w.put(Cf::GroupBodies, row_key(2), b.clone());
        });
        assert_eq!(stored(&e), Some((2, b.clone())));
        assert_eq!(raw_row(&e, 1), Some(Vec::new()));
        assert_eq!(raw_row(&e, 2), Some(Vec::new()));
        assert_eq!(
            e.get(Cf::GroupBodies, &row_key(1)).unwrap(),
            Some(b.clone())
        );
        let all = e.scan(Cf::GroupBodies, &[], &[0xff], 10).unwrap();
        assert_eq!(all, vec![(row_key(1), b.clone()), (row_key(2), b.clone())]);
        let last = e
            .last_in(Cf::GroupBodies, &key(1, &[]), &key(2, &[]))
            .unwrap();
        assert_eq!(last, Some((row_key(1), b.clone())));
        // A third shard in a later batch takes a reference without rewriting the body.
        write(&e, |w| w.put(Cf::GroupBodies, row_key(3), b.clone()));
        assert_eq!(stored(&e), Some((3, b.clone())));
    }

    #[test]
    fn re_puts_do_not_count_twice_and_the_last_delete_frees_the_body() {
        let (e, _dir) = open();
        let b = body("x");
        write(&e, |w| {
            w.put(Cf::GroupBodies, row_key(1), b.clone());
            w.put(Cf::GroupBodies, row_key(1), b.clone());
        });
        // A replication re-send or a repeated import.
        write(&e, |w| w.put(Cf::GroupBodies, row_key(1), b.clone()));
        write(&e, |w| w.put(Cf::GroupBodies, row_key(2), b.clone()));
        assert_eq!(stored(&e), Some((2, b.clone())));
        write(&e, |w| w.delete(Cf::GroupBodies, row_key(1)));
        // Deleting a row that is gone releases nothing.
        write(&e, |w| w.delete(Cf::GroupBodies, row_key(1)));
        assert_eq!(stored(&e), Some((1, b.clone())));
        assert_eq!(e.get(Cf::GroupBodies, &row_key(2)).unwrap(), Some(b));
        write(&e, |w| w.delete(Cf::GroupBodies, row_key(2)));
        assert_eq!(stored(&e), None);
        assert_eq!(e.get(Cf::GroupBodies, &row_key(2)).unwrap(), None);
    }

    #[test]
    fn a_shard_drop_leaves_the_other_shards_body() {
        let (e, _dir) = open();
        let b = body("kept");
        let count_key = key(1, &[&[0], &BODY_REF]);
        write(&e, |w| {
            w.put(Cf::GroupBodies, count_key.clone(), vec![1; 17]);
            w.put(Cf::GroupBodies, row_key(1), b.clone());
            w.put(Cf::GroupBodies, row_key(2), b.clone());
        });
        let shard_1 = key(1, &[]);
        write(&e, |w| {
            w.delete_range(Cf::GroupBodies, shard_1.clone(), prefix_end(&shard_1))
        });
        assert_eq!(stored(&e), Some((1, b.clone())));
        assert_eq!(e.get(Cf::GroupBodies, &count_key).unwrap(), None);
        assert_eq!(
            e.get(Cf::GroupBodies, &row_key(2)).unwrap(),
            Some(b.clone())
        );
        // A snapshot's first chunk: clear the shard and put its rows again, in one batch.
        let shard_2 = key(2, &[]);
        write(&e, |w| {
            w.delete_range(Cf::GroupBodies, shard_2.clone(), prefix_end(&shard_2));
            w.put(Cf::GroupBodies, row_key(2), b.clone());
        });
        assert_eq!(stored(&e), Some((1, b.clone())));
        // A put then a range delete over it, in one batch.
        write(&e, |w| {
            w.put(Cf::GroupBodies, row_key(1), b.clone());
            w.delete_range(Cf::GroupBodies, shard_1.clone(), prefix_end(&shard_1));
        });
        assert_eq!(stored(&e), Some((1, b.clone())));
        write(&e, |w| {
            w.delete_range(Cf::GroupBodies, shard_2.clone(), prefix_end(&shard_2))
        });
        assert_eq!(stored(&e), None);
    }

    #[test]
    fn rows_of_an_older_version_read_as_stored_and_are_not_counted() {
        let (e, _dir) = open();
        let b = body("old");
        e.raw_put(Cf::GroupBodies, &row_key(1), &b);
        e.raw_put(Cf::GroupBodies, &row_key(2), &b);
        assert_eq!(
            e.get(Cf::GroupBodies, &row_key(1)).unwrap(),
            Some(b.clone())
        );
        assert_eq!(stored(&e), None);
        // Deleting one releases nothing; putting over the other moves it to the store.
        write(&e, |w| w.delete(Cf::GroupBodies, row_key(1)));
        write(&e, |w| w.put(Cf::GroupBodies, row_key(2), b.clone()));
        assert_eq!(stored(&e), Some((1, b.clone())));
        assert_eq!(raw_row(&e, 2), Some(Vec::new()));
        e.raw_put(Cf::GroupBodies, &row_key(3), &b);
        let shard_3 = key(3, &[]);
        write(&e, |w| {
            w.delete_range(Cf::GroupBodies, shard_3.clone(), prefix_end(&shard_3))
        });
        assert_eq!(stored(&e), Some((1, b)));
    }

    #[test]
    fn a_differing_body_is_kept_in_place() {
        let (e, _dir) = open();
        let (a, b) = (body("a"), body("b"));
        write(&e, |w| w.put(Cf::GroupBodies, row_key(1), a.clone()));
        write(&e, |w| w.put(Cf::GroupBodies, row_key(2), b.clone()));
        assert_eq!(stored(&e), Some((1, a.clone())));
        assert_eq!(raw_row(&e, 2), Some(b.clone()));
        assert_eq!(e.get(Cf::GroupBodies, &row_key(1)).unwrap(), Some(a));
        assert_eq!(e.get(Cf::GroupBodies, &row_key(2)).unwrap(), Some(b));
        // An empty value would read as the marker: refused, nothing written.
        let mut w = WriteBatch::new();
        w.put(Cf::GroupBodies, row_key(3), Vec::new());
        assert!(e.write(w, true).is_err());
        assert_eq!(e.get(Cf::GroupBodies, &row_key(3)).unwrap(), None);
    }

    #[test]
    fn a_marker_without_its_body_is_reported_corrupt() {
        let (e, _dir) = open();
        e.raw_put(Cf::GroupBodies, &row_key(1), &[]);
        assert!(matches!(
            e.get(Cf::GroupBodies, &row_key(1)),
            Err(StorageError::Corrupt { .. })
        ));
        assert!(e.scan(Cf::GroupBodies, &[], &[0xff], 10).is_err());
    }

    #[test]
    fn counts_roundtrip_and_reject_bad_bytes() {
        for refs in [0, 1, 55, u64::MAX] {
            assert_eq!(decode_count(&encode_count(refs)).unwrap(), refs);
        }
        let good = encode_count(3);
        for len in 0..good.len() {
            assert!(decode_count(&good[..len]).is_err());
        }
        assert!(decode_count(&[[9u8].as_slice(), &3u64.to_be_bytes()].concat()).is_err());
        assert!(decode_count(&[good.as_slice(), &[0]].concat()).is_err());
    }

    #[test]
    fn row_states_tell_markers_from_bodies() {
        assert_eq!(RowState::of(None), RowState::Absent);
        assert_eq!(RowState::of(Some(&[])), RowState::Shared);
        assert_eq!(RowState::of(Some(&[0])), RowState::InPlace);
    }
}
