//! [`ClientError`]: everything the SDK can fail with, and [`ServerErrorCode`], the code of an
//! `Error` frame as the server sent it.

use std::time::Duration;

use ringpost_wire::ws::{HandshakeError, WsError};
use ringpost_wire::{DecodeError, EncodeError, ErrorCode};

/// The code of a server `Error` frame: a known [`ErrorCode`], or a value this build does not know
/// (clients treat unknown codes as fatal, per the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerErrorCode {
    Known(ErrorCode),
    Unknown(u16),
}

impl ServerErrorCode {
    pub fn from_u16(code: u16) -> Self {
        ErrorCode::from_u16(code).map_or(Self::Unknown(code), Self::Known)
    }

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        match self {
            Self::Known(code) => code.as_u16(),
            Self::Unknown(code) => code,
        }
    }

    /// The known code, if it is one.
    pub fn known(self) -> Option<ErrorCode> {
        match self {
            Self::Known(code) => Some(code),
            Self::Unknown(_) => None,
        }
    }
}

impl PartialEq<ErrorCode> for ServerErrorCode {
    fn eq(&self, other: &ErrorCode) -> bool {
        *self == Self::Known(*other)
    }
}

/// Compares the wire value, so `code == ErrorCode::RateLimited.as_u16()` works too.
impl PartialEq<u16> for ServerErrorCode {
    fn eq(&self, other: &u16) -> bool {
        self.as_u16() == *other
    }
}

impl std::fmt::Display for ServerErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Known(code) => code.fmt(f),
            Self::Unknown(code) => write!(f, "Unknown({code})"),
        }
    }
}

/// Why an SDK operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `ws://`, `wss://` or `quic://` followed by `host[:port]`.
    #[error("invalid url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// A socket operation failed (connect refused, reset, ...).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// TLS setup or the TLS handshake failed (untrusted certificate, unreadable CA file, ...).
    #[error("tls: {0}")]
    Tls(String),
    /// The QUIC connection could not be set up or was lost with a transport error.
    #[error("quic: {0}")]
    Quic(String),
    /// The WebSocket upgrade was refused or its answer was invalid.
    #[error("websocket handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// The server broke WebSocket framing.
    #[error("websocket: {0}")]
    WebSocket(#[from] WsError),
    /// The server sent bytes that are not a valid frame.
    #[error("decode: {0}")]
    Decode(#[from] DecodeError),
    /// A frame we were asked to send breaks a protocol bound; nothing was sent.
    #[error("encode: {0}")]
    Encode(#[from] EncodeError),
    /// The server sent a valid frame that makes no sense here (e.g. a `Pong` to a `Send`).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server answered with an `Error` frame.
    #[error("server error {code}: {message}")]
    Server {
        code: ServerErrorCode,
        message: String,
        /// Wait this long before retrying (rate limits, back-pressure); 0 if not said.
        retry_after_ms: u32,
        /// The server closes the connection after this error.
        fatal: bool,
    },
    /// The operation did not finish in time; `what` says which one.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The connection dropped while the request was in flight, or none is up. The request may or
    /// may not have been executed: retry it idempotently (a `Send` with the same msg_id).
    #[error("disconnected")]
    Disconnected,
    /// The node does not own the user a request was about and closed the connection; the
    /// request must be made again at the owner ([`crate::Endpoint::redirect_target`]). Only
    /// anonymous requests (register, verify, link) get this; `Hello` redirects are followed
    /// by the client itself.
    #[error("redirected to the owner of user {} (ws {:?}, quic {:?})", .0.user, .0.ws_url, .0.quic_addr)]
    Redirected(ringpost_wire::Redirect),
    /// The servers redirected more often than `ClientConfig::max_redirects` allows.
    #[error("redirected more than {max} times (last target {last})")]
    TooManyRedirects { max: u32, last: String },
    /// The client was closed by the application, or gave up reconnecting.
    #[error("client closed")]
    Closed,
}

impl ClientError {
    /// The known error code of a [`ClientError::Server`] error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => code.known(),
            _ => None,
        }
    }

    /// How long the server asked us to wait before retrying, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Server { retry_after_ms, .. } if *retry_after_ms > 0 => {
                Some(Duration::from_millis(u64::from(*retry_after_ms)))
            }
            _ => None,
        }
    }

    /// Whether reconnecting cannot help: the credentials are wrong or revoked, this connection was
    /// replaced by a newer one of the same device, the version is not spoken, the URL is bad, or
    /// the application closed the client.
    pub fn is_terminal(&self) -> bool {
        match self {
            Self::InvalidUrl { .. } | Self::Closed => true,
            Self::Server { code, .. } => matches!(
                code,
                ServerErrorCode::Known(
                    ErrorCode::BadCredentials
                        | ErrorCode::Forbidden
                        | ErrorCode::UnsupportedVersion
                        | ErrorCode::Unauthenticated
                ) | ServerErrorCode::Unknown(_)
            ),
            _ => false,
        }
    }

    /// The error a server `Error` frame stands for.
    pub(crate) fn from_server(error: ringpost_wire::Error) -> Self {
        Self::Server {
            code: ServerErrorCode::from_u16(error.code),
            message: error.message,
            retry_after_ms: error.retry_after_ms,
            fatal: error.fatal,
        }
    }

    /// Maps an IO error from a TLS stream: rustls errors travel inside `io::Error`.
    pub(crate) fn from_tls_io(error: std::io::Error) -> Self {
        match error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => Self::Tls(tls.to_string()),
            None => Self::Io(error),
        }
    }
}

/// Results of SDK operations.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_compare_with_error_codes() {
        assert_eq!(
            ServerErrorCode::from_u16(20),
            ServerErrorCode::Known(ErrorCode::RateLimited)
        );
        assert!(ServerErrorCode::from_u16(20) == ErrorCode::RateLimited);
        assert!(ServerErrorCode::from_u16(20) == 20u16);
        assert!(ServerErrorCode::from_u16(999) == 999u16);
        assert_eq!(
            ServerErrorCode::from_u16(999),
            ServerErrorCode::Unknown(999)
        );
        assert_eq!(ServerErrorCode::from_u16(999).as_u16(), 999);
    }

    #[test]
    fn terminal_errors() {
        let server = |code: u16| ClientError::Server {
            code: ServerErrorCode::from_u16(code),
            message: String::new(),
            retry_after_ms: 0,
            fatal: true,
        };
        assert!(server(ErrorCode::BadCredentials.as_u16()).is_terminal());
        assert!(server(ErrorCode::Forbidden.as_u16()).is_terminal());
        assert!(server(999).is_terminal());
        assert!(!server(ErrorCode::ShuttingDown.as_u16()).is_terminal());
        assert!(!server(ErrorCode::RateLimited.as_u16()).is_terminal());
        assert!(!ClientError::Disconnected.is_terminal());
        assert!(!ClientError::Timeout("x").is_terminal());
    }
}
