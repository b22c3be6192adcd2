//! Shard rows: what moves between nodes when a shard is handed off, and the checks every row
//! passes before it is written. Below both the inbox (the node's single writer of imported
//! rows) and the hand-off protocol (`crate::handoff`), so neither depends on the other for
//! them.

use crate::shard::ShardId;
use crate::storage::{key, Cf};

/// The most [`Row::encoded_len`] bytes one chunk may hold: the hand-off export clamps its
/// budget to it and [`validate_rows`] refuses more. Memory: an import request holds up to this much while
/// queued for the inbox writer.
pub const CHUNK_BYTES_MAX: usize = 4 * 1024 * 1024;
/// The most rows one chunk may hold. Bounds the per-row overhead (about 56 bytes each in
/// memory, so under 1 MiB) that [`CHUNK_BYTES_MAX`] does not see for tiny rows.
pub const CHUNK_ROWS_MAX: usize = 16 * 1024;
/// Longest key a row may have. The longest any service writes is a dedup key (38 bytes).
pub const ROW_KEY_BYTES_MAX: usize = 256;
/// Longest value a row may have: twice the largest any service writes (an inbox entry, at most
/// `inbox::APPEND_BYTES_MAX`, which the inbox checks at compile time).
pub const ROW_VALUE_BYTES_MAX: usize = 512 * 1024;
/// Framing bytes of a row besides its key and value: `cf u8 | key len u32 | value len u32`.
pub const ROW_HEADER_BYTES: usize = 1 + 4 + 4;
/// Every shard-prefixed column family: all but [`Cf::Meta`], [`Cf::BodyStore`] and
/// [`Cf::PushQueue`] (node-local). A row's `cf` is an index into
/// this array, so the order is part of the peer protocol: append only.
pub const SHARD_CFS: [Cf; 12] = [
    Cf::Accounts,
    Cf::Verify,
    Cf::Inbox,
    Cf::InboxMeta,
    Cf::Dedup,
    Cf::Prekeys,
    Cf::ShardLog,
    Cf::Contacts,
    Cf::Groups,
    Cf::GroupLog,
    Cf::GroupBodies,
    Cf::InboxExpiry,
];

/// Whether a family's keys start with the shard id. A `match`, so that a new [`Cf`] does not
/// compile until it is classified here; the check below then requires it in [`SHARD_CFS`].
pub(crate) const fn is_shard_prefixed(cf: Cf) -> bool {
    match cf {
        Cf::Accounts
        | Cf::Verify
        | Cf::Inbox
        | Cf::InboxMeta
        | Cf::Dedup
        | Cf::Prekeys
        | Cf::ShardLog
        | Cf::Contacts
        | Cf::Groups
        | Cf::GroupLog
        | Cf::GroupBodies
        | Cf::InboxExpiry => true,
        Cf::Meta | Cf::BodyStore | Cf::PushQueue => false,
    }
}

// SHARD_CFS holds exactly the shard-prefixed families of `Cf::ALL`, each once.
const _: () = {
    let mut prefixed = 0;
    let mut i = 0;
    while i < Cf::ALL.len() {
        let cf = Cf::ALL[i];
        let mut found = 0;
        let mut j = 0;
        while j < SHARD_CFS.len() {
            if SHARD_CFS[j] as u8 == cf as u8 {
                found += 1;
            }
            j += 1;
        }
        if is_shard_prefixed(cf) {
            prefixed += 1;
            assert!(
                found == 1,
                "a shard-prefixed family is missing from SHARD_CFS"
            );
        } else {
            assert!(
                found == 0,
                "SHARD_CFS holds a family without a shard prefix"
            );
        }
        i += 1;
    }
    assert!(prefixed == SHARD_CFS.len());
};

/// One stored pair of a shard, as it travels between nodes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Row {
    /// Index into [`SHARD_CFS`].
    pub cf: u8,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl Row {
    /// The family this row belongs to, if `cf` is a valid index.
    pub fn column_family(&self) -> Option<Cf> {
        SHARD_CFS.get(usize::from(self.cf)).copied()
    }

    /// Bytes the row counts for in a chunk's budget and in a [`ShardDigest`]: its framing as
    /// hashed.
    pub fn encoded_len(&self) -> usize {
        ROW_HEADER_BYTES + self.key.len() + self.value.len()
    }
}

/// Why rows received for a shard may not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowsError {
    /// A row is not one this shard's hand-off may carry.
    #[error("row {index} of shard {shard}'s hand-off: {reason}")]
    InvalidRow {
        shard: ShardId,
        index: usize,
        reason: &'static str,
    },
    /// More rows or bytes in one chunk than [`CHUNK_ROWS_MAX`] and [`CHUNK_BYTES_MAX`] allow.
    #[error("hand-off chunk of {rows} rows and {bytes} bytes is above the limits")]
    ChunkTooLarge { rows: usize, bytes: usize },
    /// `u16::MAX` is never a shard id.
    #[error("{0} is not a shard id")]
    InvalidShard(ShardId),
}

/// Checks rows received for `shard` before anything is written: within [`CHUNK_ROWS_MAX`] and
/// [`CHUNK_BYTES_MAX`]; each row of a [`SHARD_CFS`] family, its key inside the shard (longer
/// than the bare prefix) and within [`ROW_KEY_BYTES_MAX`], its value within
/// [`ROW_VALUE_BYTES_MAX`]; rows in strictly ascending (family, key) order as exported, so no
/// key repeats. A peer's bug can therefore never write into another shard.
pub fn validate_rows(shard: ShardId, rows: &[Row]) -> Result<(), RowsError> {
    let prefix = shard_prefix(shard)?;
    let bytes = rows
        .iter()
        .fold(0usize, |sum, row| sum.saturating_add(row.encoded_len()));
    if rows.len() > CHUNK_ROWS_MAX || bytes > CHUNK_BYTES_MAX {
        return Err(RowsError::ChunkTooLarge {
            rows: rows.len(),
            bytes,
        });
    }
    let mut previous: Option<&Row> = None;
    for (index, row) in rows.iter().enumerate() {
        let invalid = |reason| RowsError::InvalidRow {
            shard,
            index,
            reason,
        };
        check_row(&prefix, row).map_err(invalid)?;
        if previous.is_some_and(|p| (p.cf, &p.key) >= (row.cf, &row.key)) {
            return Err(invalid("rows are out of order or repeated"));
        }
        previous = Some(row);
    }
    Ok(())
}

/// `shard`'s key prefix; every row of the shard starts with it.
pub fn shard_prefix(shard: ShardId) -> Result<Vec<u8>, RowsError> {
    if shard == ShardId::MAX {
        return Err(RowsError::InvalidShard(shard));
    }
    Ok(key(shard, &[]))
}

/// Why `row` may not travel in a hand-off of the shard with this prefix, if it may not.
pub fn check_row(prefix: &[u8], row: &Row) -> Result<(), &'static str> {
    if row.column_family().is_none() {
        return Err("unknown column family");
    }
    check_key(prefix, &row.key)?;
    if row.value.len() > ROW_VALUE_BYTES_MAX {
        return Err("value is too long");
    }
    Ok(())
}

/// Why `key` may not be a row key of the shard with this prefix, if it may not.
pub fn check_key(prefix: &[u8], key: &[u8]) -> Result<(), &'static str> {
    if !key.starts_with(prefix) {
        return Err("key is outside the shard");
    }
    if key.len() == prefix.len() {
        return Err("key is the bare shard prefix");
    }
    if key.len() > ROW_KEY_BYTES_MAX {
        return Err("key is too long");
    }
    Ok(())
}
