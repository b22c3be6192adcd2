//! [`ClientConfig`]: everything a [`crate::Client`] needs to know, with defaults that suit tests.

use std::path::PathBuf;
use std::time::Duration;

use ringpost_wire::Auth;

use crate::backoff::{RECONNECT_BACKOFF_BASE, RECONNECT_BACKOFF_CAP};
use crate::dedup::DEDUP_CAPACITY_DEFAULT;
use crate::tls::TlsOptions;

/// Time allowed for one connection attempt by default: transport, TLS, upgrade and `Hello` up to
/// `Welcome` (each redirect hop gets its own).
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// Redirects followed by default before [`crate::ClientError::TooManyRedirects`]. One is the
/// normal case (any node → owner); the rest covers an epoch change during the connect.
pub const MAX_REDIRECTS_DEFAULT: u32 = 3;

/// Time a request waits by default for its answer (including, if the client is reconnecting,
/// for the connection to come back).
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Reconnect attempts in a row before a client gives up (and reports
/// [`crate::Event::Disconnected`] with `will_reconnect: false`). With the default backoff cap,
/// about 80 minutes of trying.
pub const RECONNECT_ATTEMPTS_MAX_DEFAULT: u32 = 1_000;

/// The `user_agent` sent in `Hello` by default.
pub const USER_AGENT_DEFAULT: &str = concat!("ringpost-client/", env!("CARGO_PKG_VERSION"));

/// How a [`crate::Client`] connects and behaves. Build one with [`ClientConfig::new`] and adjust
/// fields, or with struct update syntax from `ClientConfig::default()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `ws://host:port`, `wss://host:port` or `quic://host:port`.
    pub url: String,
    pub tls: TlsOptions,
    /// Credentials of a registered device; `None` connects anonymously (to register or link).
    pub auth: Option<Auth>,
    pub user_agent: String,
    /// Time allowed for each connection attempt (and each redirect hop).
    pub connect_timeout: Duration,
    /// Redirects followed per connection attempt.
    pub max_redirects: u32,
    /// Time a request waits for its answer.
    pub request_timeout: Duration,
    /// Acknowledge each delivery once it is handed out by [`crate::Client::next_event`]
    /// (batched). When `false`, call [`crate::Client::ack`]; duplicates the SDK drops are
    /// acknowledged either way.
    pub auto_ack: bool,
    /// Reconnect after the connection drops or the node says `GoingAway`.
    pub reconnect: bool,
    /// Backoff ceiling of the first reconnect attempt (doubling per attempt).
    pub backoff_base: Duration,
    /// Largest backoff ceiling.
    pub backoff_cap: Duration,
    /// Reconnect attempts in a row before giving up.
    pub reconnect_attempts_max: u32,
    /// How often to ping the node; `None` uses `Welcome.ping_interval_ms`. A connection that
    /// hears nothing for [`crate::client::DEAD_AFTER_PING_INTERVALS`] intervals is dropped.
    pub ping_interval: Option<Duration>,
    /// Deliveries remembered for deduplication.
    pub dedup_capacity: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            url: String::new(),
            tls: TlsOptions::default(),
            auth: None,
            user_agent: USER_AGENT_DEFAULT.to_string(),
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
            max_redirects: MAX_REDIRECTS_DEFAULT,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            auto_ack: true,
            reconnect: true,
            backoff_base: RECONNECT_BACKOFF_BASE,
            backoff_cap: RECONNECT_BACKOFF_CAP,
            reconnect_attempts_max: RECONNECT_ATTEMPTS_MAX_DEFAULT,
            ping_interval: None,
            dedup_capacity: DEDUP_CAPACITY_DEFAULT,
        }
    }
}

impl ClientConfig {
    /// The defaults, connecting to `url` anonymously.
    pub fn new(url: impl Into<String>) -> Self {
        ClientConfig {
            url: url.into(),
            ..ClientConfig::default()
        }
    }

    /// Trust the CA certificates in `path` (the dev node's `tls/ca.pem`).
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls = TlsOptions::ca_file(path);
        self
    }

    /// Authenticate as this device.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = Some(auth);
        self
    }
}
