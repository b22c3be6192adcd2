//! [`InboxError`]: why an inbox call failed. Each variant maps to a stable wire code.

use ringpost_wire::ErrorCode;

use crate::shard::ShardId;
use crate::storage::StorageError;

/// Why an inbox call failed. On any error nothing of that call was made durable, except that a
/// call whose future was dropped after it was queued may still complete (callers retry with the
/// same dedup key, which is what makes that safe).
#[derive(Debug, Clone, thiserror::Error)]
pub enum InboxError {
    /// Storage failed (disk full, fsync failed, corrupt record): nothing was acknowledged.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A list or byte count in the request is above its bound.
    #[error("{what} is {len}, above the limit of {max}")]
    LimitExceeded {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// The request is inconsistent (a caller bug, not client input that got this far).
    #[error("invalid inbox request: {0}")]
    Invalid(&'static str),
    /// The shard is closed for appends on this node (it is being handed off, or was): nothing
    /// was stored; the sender refreshes its routing and retries at the owner.
    #[error("shard {shard} does not take appends on this node")]
    WrongOwner { shard: ShardId },
    /// The writer thread is gone (the node is shutting down).
    #[error("the inbox is shut down")]
    Closed,
}

impl InboxError {
    /// The code a client is told.
    pub fn code(&self) -> ErrorCode {
        match self {
            InboxError::Storage(StorageError::Corrupt { .. }) => ErrorCode::Internal,
            InboxError::Storage(_) => ErrorCode::StorageUnavailable,
            InboxError::LimitExceeded { .. } => ErrorCode::LimitExceeded,
            InboxError::Invalid(_) => ErrorCode::Internal,
            InboxError::WrongOwner { .. } => ErrorCode::WrongOwner,
            InboxError::Closed => ErrorCode::ShuttingDown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable() {
        let cases = [
            (
                InboxError::Storage(StorageError::NoSpace("x".into())),
                ErrorCode::StorageUnavailable,
            ),
            (
                InboxError::Storage(StorageError::Io("x".into())),
                ErrorCode::StorageUnavailable,
            ),
            (
                InboxError::Storage(StorageError::Other("x".into())),
                ErrorCode::StorageUnavailable,
            ),
            (
                InboxError::Storage(StorageError::Corrupt {
                    cf: "inbox",
                    detail: "x".into(),
                }),
                ErrorCode::Internal,
            ),
            (
                InboxError::LimitExceeded {
                    what: "x",
                    len: 2,
                    max: 1,
                },
                ErrorCode::LimitExceeded,
            ),
            (InboxError::Invalid("x"), ErrorCode::Internal),
            (InboxError::WrongOwner { shard: 3 }, ErrorCode::WrongOwner),
            (InboxError::Closed, ErrorCode::ShuttingDown),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
        }
    }
}
