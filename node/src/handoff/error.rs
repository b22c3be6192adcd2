//! [`HandoffError`]: why exporting, checking or importing a shard's rows failed.

use crate::inbox::InboxError;
use crate::shard::ShardId;
use crate::shard_rows::RowsError;
use crate::storage::StorageError;

/// Why a hand-off step failed. Nothing of a failed import was counted; rows of a failed import
/// may have been written (unsynced), so an abandoned import is cleaned up with
/// [`super::drop_shard`].
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The local engine failed to read the rows.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The inbox writer failed a barrier or a drop.
    #[error(transparent)]
    Inbox(#[from] InboxError),
    /// A row is not one this shard's hand-off may carry: a peer bug, or a malformed record on
    /// the exporting side (which refuses to send it rather than have the importer refuse it).
    #[error("row {index} of shard {shard}'s hand-off: {reason}")]
    InvalidRow {
        shard: ShardId,
        index: usize,
        reason: &'static str,
    },
    /// More rows or bytes in one chunk than [`super::CHUNK_ROWS_MAX`] and
    /// [`super::CHUNK_BYTES_MAX`] allow.
    #[error("hand-off chunk of {rows} rows and {bytes} bytes is above the limits")]
    ChunkTooLarge { rows: usize, bytes: usize },
    /// A cursor does not point into this shard (a peer bug).
    #[error("invalid hand-off cursor for shard {shard}: {reason}")]
    InvalidCursor {
        shard: ShardId,
        reason: &'static str,
    },
    /// `u16::MAX` is never a shard id (shard counts are at most `u16::MAX`, and
    /// [`crate::storage::prefix_end`] relies on it).
    #[error("{0} is not a shard id")]
    InvalidShard(ShardId),
}

impl From<RowsError> for HandoffError {
    fn from(e: RowsError) -> Self {
        match e {
            RowsError::InvalidRow {
                shard,
                index,
                reason,
            } => HandoffError::InvalidRow {
                shard,
                index,
                reason,
            },
            RowsError::ChunkTooLarge { rows, bytes } => HandoffError::ChunkTooLarge { rows, bytes },
            RowsError::InvalidShard(shard) => HandoffError::InvalidShard(shard),
        }
    }
}
