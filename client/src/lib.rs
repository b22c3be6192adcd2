//! Ringpost Rust SDK: what tests, the load generator (`ringpost-bench`) and the chaos suite use to
//! talk to a node.
//!
//! Two layers:
//! - [`Connection`] ([`connection`]): one transport connection (`ws://`, `wss://`, `quic://`)
//!   moving whole frames, plus raw writes for tests of the node's input handling. No protocol
//!   logic beyond framing.
//! - [`Client`] ([`client`]): a device's session. It says `Hello`, follows `Redirect`s (and a
//!   `Migrate` straight to its user's new node), correlates
//!   requests and answers (pipelined from any number of tasks), pings, reconnects with
//!   exponential backoff and full jitter ([`backoff`]) and re-authenticates, and hands out
//!   [`Event`]s: deliveries exactly once ([`dedup`]) with batched acks, receipts, typing,
//!   presence, and connection changes.
//!
//! [`crypto`] adds end-to-end encryption on top: [`crypto::SecureClient`] wraps a `Client` and
//! speaks plaintext to the application, Olm and Megolm ciphertext (vodozemac) to the node.
//! [`prekeys`] signs prekey uploads the way the node verifies them.
//! [`media`] encrypts attachments with a random key and uploads and downloads them as blobs.
//!
//! [`dev`] runs the registration flow against a dev node, which writes verification codes to a
//! file. [`Endpoint`] parses node URLs; [`TlsOptions`] says which roots to trust.
//!
//! ```no_run
//! # async fn f() -> Result<(), ringpost_client::ClientError> {
//! use ringpost_client::{Client, ClientConfig, Event};
//! let client = Client::connect(ClientConfig::new("quic://127.0.0.1:4433").with_ca_file("ca.pem")).await?;
//! println!("rtt {:?}", client.ping().await?);
//! while let Some(event) = client.next_event().await {
//!     if let Event::Message(m) = event { println!("{} bytes from {}", m.body.len(), m.from_user) }
//! }
//! # Ok(()) }
//! ```
//!
//! Every bound that costs memory per client is a named constant with its cost in its doc line:
//! [`EVENT_QUEUE_MAX`], [`REQUESTS_IN_FLIGHT_MAX`], [`ACKS_PENDING_MAX`],
//! [`DEDUP_CAPACITY_DEFAULT`], [`connection::READ_CHUNK_BYTES`], and the QUIC windows in
//! [`connection`].

#![forbid(unsafe_code)]

pub mod backoff;
pub mod client;
pub mod connection;
pub mod crypto;
pub mod dedup;
pub mod dev;
pub mod endpoint;
pub mod error;
pub mod media;
pub mod prekeys;
pub mod tls;

pub use backoff::{Backoff, RECONNECT_BACKOFF_BASE, RECONNECT_BACKOFF_CAP};
pub use client::{
    new_msg_id, Client, ClientConfig, Event, ACKS_PENDING_MAX, EVENT_QUEUE_MAX,
    REQUESTS_IN_FLIGHT_MAX,
};
pub use connection::{Connection, PeerClose};
pub use dedup::{DedupKey, DedupSet, DEDUP_CAPACITY_DEFAULT};
pub use endpoint::{Endpoint, Scheme};
pub use error::{ClientError, Result, ServerErrorCode};
pub use tls::TlsOptions;

/// The protocol crate, and the types an SDK user needs most, re-exported so a test or tool can
/// depend on this crate alone.
pub use ringpost_wire as wire;
pub use ringpost_wire::{
    Auth, Deliver, DeliverKind, DeviceCiphertext, DeviceId, ErrorCode, Frame, MsgId, ReceiptKind,
    Registered, SendAck, SendStatus, UserId,
};
