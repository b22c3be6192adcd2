//! The storage side of a shard hand-off: moving every row of one shard from its old owner to
//! its new owner when cluster membership changes.
//!
//! Every column family but [`Cf::Meta`] keys its rows by the shard id (big-endian `u16`) first,
//! so a shard is one contiguous key range per family ([`SHARD_CFS`]). The old owner exports
//! the range in bounded [`Chunk`]s ([`export_chunk`], resumable from a [`Cursor`]); the new
//! owner checks each chunk ([`validate_rows`]) and writes it raw through the inbox writer
//! ([`Inbox::import`]), the node's single writer for hand-off rows, so seqs, counters, dedup
//! records and accounts move exactly. Both then compare a [`ShardDigest`] ([`shard_digest`]).
//! The network part (who pulls what from whom) lives elsewhere; this module does no IO.
//!
//! The sequence, `s` being the shard:
//! 1. New owner: accepts no append to `s` until the import is complete (its router does not
//!    serve `s` yet, or `inbox.set_writable(s, false)`): imported counters replace local ones.
//! 2. Old owner: `inbox.set_writable(s, false)` then `inbox.sync_barrier().await`. From then on
//!    no append to `s` commits, and every append that did is durable and in what is exported.
//!    Acks, expiry and `drop_device` still run on a closed shard, and accounts and prekeys are
//!    not fenced by the inbox: the router must stop sending `s`'s requests to the old owner, or
//!    the digests of step 4 differ and the hand-off is retried.
//! 3. Chunks: old owner `export_chunk(engine, s, cursor, CHUNK_BYTES_DEFAULT)`, new owner
//!    `validate_rows` (to tell the peer what is wrong) and `inbox.import(s, rows).await`, until
//!    `next` is `None`; then [`finish_import`] (durable, no stale cached device lists).
//! 4. Both sides compare [`ShardDigest`]s with the same dedup cutoff: the new owner's of the
//!    rows it received (a [`Digest`] fed chunk by chunk), the old owner's of its copy
//!    ([`shard_digest`]).
//! 5. Old owner: [`drop_shard`]; an abandoned import is cleaned up the same way on the new
//!    owner.
//!
//! A shard's replication log position ([`Cf::ShardLog`](crate::storage::Cf::ShardLog)) is one
//! of its rows and moves like the others: the new owner's log continues where the old owner's
//! stopped, and the digests cover it.
//!
//! Export reads without a snapshot: a row changed between two chunks may be exported in either
//! state. The digest comparison is what catches it.

mod digest;
mod error;

pub use digest::{Digest, ShardDigest};
pub use error::HandoffError;

use crate::accounts::Accounts;
use crate::inbox::Inbox;
use crate::shard::ShardId;
use crate::shard_rows::{check_key, check_row};
pub use crate::shard_rows::{
    Row, RowsError, CHUNK_BYTES_MAX, CHUNK_ROWS_MAX, ROW_HEADER_BYTES, ROW_KEY_BYTES_MAX,
    ROW_VALUE_BYTES_MAX, SHARD_CFS,
};
use crate::storage::{prefix_end, successor, Engine};

/// Chunk size a puller asks for. Memory: one chunk in flight costs about this on each side,
/// plus the rows of one scan on the exporting side ([`EXPORT_SCAN_ROWS`]).
pub const CHUNK_BYTES_DEFAULT: usize = 256 * 1024;
/// Rows one engine scan of [`export_chunk`] reads at a time. Memory: at most this many rows of
/// up to [`ROW_VALUE_BYTES_MAX`] (32 MiB at the very worst, ~8 MiB of maximal inbox entries).
pub const EXPORT_SCAN_ROWS: usize = 64;

const _: () = {
    // Any valid row fits in a chunk on its own.
    assert!(ROW_HEADER_BYTES + ROW_KEY_BYTES_MAX + ROW_VALUE_BYTES_MAX <= CHUNK_BYTES_MAX);
    assert!(CHUNK_BYTES_DEFAULT <= CHUNK_BYTES_MAX);
    assert!(SHARD_CFS.len() <= u8::MAX as usize);
};

/// Where the next chunk of an export starts: after `after` in family `cf`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    /// Index into [`SHARD_CFS`].
    pub cf: u8,
    /// The last key sent.
    pub after: Vec<u8>,
}

/// Consecutive rows of one shard, in family order then key order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Chunk {
    /// At least one row unless the shard had nothing left.
    pub rows: Vec<Row>,
    /// Where to continue; `None` when the shard is finished.
    pub next: Option<Cursor>,
}

/// The next rows of `shard`, starting after `from` (or at the start of the shard): every row of
/// every [`SHARD_CFS`] family in order, stopping before the row that would take the chunk past
/// `max_bytes` (clamped to [`CHUNK_BYTES_MAX`]) or [`CHUNK_ROWS_MAX`] rows. A chunk holds at
/// least one row if any is left, so an export always progresses.
///
/// Rows go out as stored. One that the importer would refuse (see [`validate_rows`]) fails the
/// export instead: corruption is reported here, not silently skipped or sent.
pub fn export_chunk(
    engine: &dyn Engine,
    shard: ShardId,
    from: Option<&Cursor>,
    max_bytes: usize,
) -> Result<Chunk, HandoffError> {
    let prefix = shard_prefix(shard)?;
    let end = prefix_end(&prefix);
    let budget = max_bytes.min(CHUNK_BYTES_MAX);
    let (mut cf_index, mut start) = match from {
        None => (0, prefix.clone()),
        Some(cursor) => {
            check_cursor(shard, &prefix, cursor)?;
            (usize::from(cursor.cf), successor(&cursor.after))
        }
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut bytes = 0;
    while let Some(&cf) = SHARD_CFS.get(cf_index) {
        loop {
            let page = engine.scan(cf, &start, &end, EXPORT_SCAN_ROWS)?;
            let page_len = page.len();
            for (key, value) in page {
                let row = Row {
                    // At most SHARD_CFS.len(), checked at compile time to fit.
                    cf: cf_index as u8,
                    key,
                    value,
                };
                let len = row.encoded_len();
                if let Some(last) = rows.last() {
                    if bytes + len > budget || rows.len() == CHUNK_ROWS_MAX {
                        let next = Cursor {
                            cf: last.cf,
                            after: last.key.clone(),
                        };
                        return Ok(Chunk {
                            rows,
                            next: Some(next),
                        });
                    }
                }
                check_row(&prefix, &row).map_err(|reason| HandoffError::InvalidRow {
                    shard,
                    index: rows.len(),
                    reason,
                })?;
                bytes += len;
                rows.push(row);
            }
            match rows.last() {
                Some(last) if page_len == EXPORT_SCAN_ROWS => start = successor(&last.key),
                _ => break,
            }
        }
        cf_index += 1;
        start = prefix.clone();
    }
    Ok(Chunk { rows, next: None })
}

/// Checks rows received for `shard` before anything is written: see
/// [`crate::shard_rows::validate_rows`].
pub fn validate_rows(shard: ShardId, rows: &[Row]) -> Result<(), HandoffError> {
    crate::shard_rows::validate_rows(shard, rows).map_err(HandoffError::from)
}

/// The digest of every row of `shard` in `engine` (see [`Digest`] for `dedup_cutoff_ms`).
/// Reads the shard once, a chunk at a time, on the caller's thread.
pub fn shard_digest(
    engine: &dyn Engine,
    shard: ShardId,
    dedup_cutoff_ms: u64,
) -> Result<ShardDigest, HandoffError> {
    let mut digest = Digest::new(dedup_cutoff_ms);
    let mut cursor = None;
    // Ends: every chunk but the last holds a row, and the cursor only moves forward.
    loop {
        let chunk = export_chunk(engine, shard, cursor.as_ref(), CHUNK_BYTES_DEFAULT)?;
        for row in &chunk.rows {
            digest.add(row);
        }
        match chunk.next {
            Some(next) => cursor = Some(next),
            None => return Ok(digest.finish()),
        }
    }
}

/// Ends an import on the new owner: makes every imported chunk durable
/// ([`Inbox::sync_barrier`]) and forgets device lists cached for the shard's users.
pub async fn finish_import(
    inbox: &Inbox,
    accounts: &Accounts,
    shard: ShardId,
) -> Result<(), HandoffError> {
    inbox.sync_barrier().await?;
    accounts.forget_cached_shard(shard);
    Ok(())
}

/// Deletes this node's copy of `shard` ([`Inbox::drop_shard`], durable on return) and forgets
/// device lists cached for its users: on the old owner once the new one has its copy, or on
/// the new owner to clean up an abandoned import. Close the shard first. Returns how many inbox
/// entries were deleted.
pub async fn drop_shard(
    inbox: &Inbox,
    accounts: &Accounts,
    shard: ShardId,
) -> Result<u64, HandoffError> {
    let removed = inbox.drop_shard(shard).await?;
    accounts.forget_cached_shard(shard);
    Ok(removed)
}

/// `shard`'s key prefix; every row of the shard starts with it.
fn shard_prefix(shard: ShardId) -> Result<Vec<u8>, HandoffError> {
    crate::shard_rows::shard_prefix(shard).map_err(HandoffError::from)
}

fn check_cursor(shard: ShardId, prefix: &[u8], cursor: &Cursor) -> Result<(), HandoffError> {
    let invalid = |reason| HandoffError::InvalidCursor { shard, reason };
    if usize::from(cursor.cf) >= SHARD_CFS.len() {
        return Err(invalid("unknown column family"));
    }
    check_key(prefix, &cursor.after).map_err(invalid)
}

#[cfg(test)]
mod tests;
