//! Stable numeric error codes carried by `Error{code}` and used by decode errors. Values never
//! change meaning; new ones are only added.

/// Every error a peer can be told about. `as u16` is the wire value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The bytes are not a valid frame (bad flatbuffer, bad length prefix, missing field).
    Malformed = 1,
    /// The frame is larger than [`crate::limits::FRAME_BYTES_MAX`].
    FrameTooLarge = 2,
    /// The protocol version is not spoken by this node.
    UnsupportedVersion = 3,
    /// The frame type is unknown to this node, or not valid in this direction.
    UnknownFrameType = 4,
    /// A list or string is longer than its bound.
    LimitExceeded = 5,
    /// The frame is not valid in the connection's current state (e.g. `Send` before `Hello`).
    UnexpectedFrame = 6,
    /// A WebSocket text frame, or another transport-level protocol violation.
    TransportProtocol = 7,
    /// The connection must authenticate first.
    Unauthenticated = 10,
    /// Wrong user, device or token.
    BadCredentials = 11,
    /// Authenticated, but not allowed to do this.
    Forbidden = 12,
    /// Too many requests; retry after `retry_after_ms`.
    RateLimited = 20,
    /// A recipient inbox is at its quota.
    InboxFull = 21,
    /// The sender's device list is stale.
    MismatchedDevices = 22,
    /// Wrong verification or provisioning code.
    VerificationFailed = 30,
    /// The code expired or was never issued.
    VerificationExpired = 31,
    /// Too many wrong codes; wait and request a new one.
    TooManyAttempts = 32,
    /// The account has a registration lock and the PIN was missing or wrong.
    RegistrationLocked = 33,
    /// A `PrekeyUpload` signature is missing or does not verify against the upload's identity
    /// signing key ([`crate::prekeys`]); nothing of the upload was stored.
    BadSignature = 34,
    /// No such user, device or group.
    NotFound = 40,
    /// The account already has the most devices allowed.
    DeviceLimit = 41,
    /// The node failed internally; the request may be retried.
    Internal = 50,
    /// Storage is unavailable (disk full, fsync failed): nothing was acknowledged.
    StorageUnavailable = 51,
    /// This node does not own the shard at the caller's epoch.
    WrongOwner = 52,
    /// The node is shutting down or draining.
    ShuttingDown = 53,
    /// The feature exists in the protocol but this node does not serve it yet.
    NotImplemented = 60,
}

impl ErrorCode {
    /// Every code, for exhaustive tests and documentation.
    pub const ALL: [ErrorCode; 25] = [
        ErrorCode::Malformed,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownFrameType,
        ErrorCode::LimitExceeded,
        ErrorCode::UnexpectedFrame,
        ErrorCode::TransportProtocol,
        ErrorCode::Unauthenticated,
        ErrorCode::BadCredentials,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::InboxFull,
        ErrorCode::MismatchedDevices,
        ErrorCode::VerificationFailed,
        ErrorCode::VerificationExpired,
        ErrorCode::TooManyAttempts,
        ErrorCode::RegistrationLocked,
        ErrorCode::BadSignature,
        ErrorCode::NotFound,
        ErrorCode::DeviceLimit,
        ErrorCode::Internal,
        ErrorCode::StorageUnavailable,
        ErrorCode::WrongOwner,
        ErrorCode::ShuttingDown,
        ErrorCode::NotImplemented,
    ];

    pub fn as_u16(self) -> u16 {
        self as u16
    }

    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_u16() == code)
    }

    /// Whether the connection is closed after reporting this error. `Malformed` is not: a
    /// frame that fails to verify inside sound transport framing leaves the stream usable
    /// (a broken length prefix or WebSocket header is reported as `FrameTooLarge` or
    /// `TransportProtocol` and does close).
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            ErrorCode::FrameTooLarge
                | ErrorCode::UnsupportedVersion
                | ErrorCode::TransportProtocol
                | ErrorCode::BadCredentials
                | ErrorCode::ShuttingDown
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}({})", self, *self as u16)
    }
}
