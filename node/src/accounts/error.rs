//! [`AccountError`]: why an accounts operation failed, with its stable wire code.

use ringpost_wire::ErrorCode;

use super::sender::CodeSendError;
use crate::storage::StorageError;

/// Why an operation of [`super::Accounts`] failed. Every variant maps to one stable
/// [`ErrorCode`] ([`AccountError::code`]); nothing was changed unless the variant says so.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The phone number is not a possible E.164 number (0, or more than 15 digits).
    #[error("invalid phone number")]
    InvalidPhone,
    /// A string argument (device name, code, PIN) is longer than its bound.
    #[error("{what} is longer than {max_bytes} bytes")]
    TooLong {
        what: &'static str,
        max_bytes: usize,
    },
    /// A push token with characters its provider never uses (APNs: hex digits; FCM and
    /// webhook: printable ASCII without spaces). Nothing was stored.
    #[error("invalid push token: {0}")]
    InvalidPushToken(&'static str),
    /// A value is outside its bound (PIN too short, device counter exhausted).
    #[error("limit exceeded: {0}")]
    LimitExceeded(&'static str),
    /// Wrong verification or link code. The attempt was counted.
    #[error("wrong verification code")]
    VerificationFailed,
    /// The code expired, was already used, or was never issued.
    #[error("verification code expired or not issued")]
    VerificationExpired,
    /// Too many wrong codes for this code: request a new one.
    #[error("too many wrong attempts; request a new code")]
    TooManyAttempts,
    /// The account has a registration lock and the PIN was missing or wrong. The failure was
    /// counted; the verification code stays valid.
    #[error("registration lock: missing or wrong PIN")]
    RegistrationLocked,
    /// Wrong user, device or token.
    #[error("bad credentials")]
    BadCredentials,
    /// Authenticated, but not allowed (e.g. a linked device acting as the primary).
    #[error("forbidden")]
    Forbidden,
    /// No such account or device.
    #[error("not found")]
    NotFound,
    /// The account already has [`ringpost_wire::limits::DEVICES_PER_USER_MAX`] devices.
    #[error("device limit reached")]
    DeviceLimit,
    /// Throttled: retry after `retry_after_ms`.
    #[error("rate limited; retry after {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
    /// The code could not be delivered; a new one may be requested at once.
    #[error("verification code delivery failed: {0}")]
    Delivery(#[source] CodeSendError),
    /// Hashing a PIN failed (bad parameters); nothing was changed.
    #[error("PIN hashing failed: {0}")]
    PinHash(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl AccountError {
    /// The stable wire code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            AccountError::InvalidPhone | AccountError::NotFound => ErrorCode::NotFound,
            AccountError::InvalidPushToken(_) => ErrorCode::Malformed,
            AccountError::TooLong { .. } | AccountError::LimitExceeded(_) => {
                ErrorCode::LimitExceeded
            }
            AccountError::VerificationFailed => ErrorCode::VerificationFailed,
            AccountError::VerificationExpired => ErrorCode::VerificationExpired,
            AccountError::TooManyAttempts => ErrorCode::TooManyAttempts,
            AccountError::RegistrationLocked => ErrorCode::RegistrationLocked,
            AccountError::BadCredentials => ErrorCode::BadCredentials,
            AccountError::Forbidden => ErrorCode::Forbidden,
            AccountError::DeviceLimit => ErrorCode::DeviceLimit,
            AccountError::RateLimited { .. } => ErrorCode::RateLimited,
            AccountError::Delivery(_) | AccountError::PinHash(_) => ErrorCode::Internal,
            AccountError::Storage(StorageError::Corrupt { .. }) => ErrorCode::Internal,
            AccountError::Storage(_) => ErrorCode::StorageUnavailable,
        }
    }

    /// Milliseconds to wait before retrying, for the `Error` frame (0 when not throttled).
    pub fn retry_after_ms(&self) -> u32 {
        match self {
            AccountError::RateLimited { retry_after_ms } => {
                u32::try_from(*retry_after_ms).unwrap_or(u32::MAX)
            }
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable() {
        let cases: Vec<(AccountError, ErrorCode)> = vec![
            (AccountError::InvalidPhone, ErrorCode::NotFound),
            (
                AccountError::TooLong {
                    what: "x",
                    max_bytes: 1,
                },
                ErrorCode::LimitExceeded,
            ),
            (AccountError::LimitExceeded("x"), ErrorCode::LimitExceeded),
            (
                AccountError::VerificationFailed,
                ErrorCode::VerificationFailed,
            ),
            (
                AccountError::VerificationExpired,
                ErrorCode::VerificationExpired,
            ),
            (AccountError::TooManyAttempts, ErrorCode::TooManyAttempts),
            (
                AccountError::RegistrationLocked,
                ErrorCode::RegistrationLocked,
            ),
            (AccountError::BadCredentials, ErrorCode::BadCredentials),
            (AccountError::Forbidden, ErrorCode::Forbidden),
            (AccountError::NotFound, ErrorCode::NotFound),
            (AccountError::DeviceLimit, ErrorCode::DeviceLimit),
            (
                AccountError::RateLimited { retry_after_ms: 5 },
                ErrorCode::RateLimited,
            ),
            (
                AccountError::Delivery(CodeSendError::Timeout),
                ErrorCode::Internal,
            ),
            (AccountError::PinHash("x".into()), ErrorCode::Internal),
            (
                AccountError::Storage(StorageError::Corrupt {
                    cf: "accounts",
                    detail: "x".into(),
                }),
                ErrorCode::Internal,
            ),
            (
                AccountError::Storage(StorageError::NoSpace("x".into())),
                ErrorCode::StorageUnavailable,
            ),
            (
                AccountError::Storage(StorageError::Io("x".into())),
                ErrorCode::StorageUnavailable,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
        }
    }

    #[test]
    fn retry_after_saturates() {
        assert_eq!(
            AccountError::RateLimited {
                retry_after_ms: 1500
            }
            .retry_after_ms(),
            1500
        );
        assert_eq!(
            AccountError::RateLimited {
                retry_after_ms: u64::MAX
            }
            .retry_after_ms(),
            u32::MAX
        );
        assert_eq!(AccountError::Forbidden.retry_after_ms(), 0);
    }
}
