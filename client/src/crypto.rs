//! End-to-end encryption in the SDK, with vodozemac (Olm for 1:1, Megolm for groups).
//!
//! - [`SecureClient`] ([`secure_client`]) wraps a [`crate::Client`]: the application sends and
//!   receives plaintext; the node routes ciphertext only.
//! - [`Machine`] ([`machine`]): the device's state (account, sessions, group sessions, device
//!   lists), without IO.
//! - [`Store`] ([`store`]): that state in one file, encrypted at rest, replaced atomically.
//! - [`prekeys`]: what a prekey signature covers and how a claimed bundle is verified.
//! - [`envelope`]: the bytes inside ciphertext fields.
//!
//! The formats are specified in docs/protocol.md, "End-to-end encryption in the SDK", so that a
//! client written from the document alone interoperates.
//!
//! ```no_run
//! # async fn f(client: ringpost_client::Client) -> Result<(), ringpost_client::crypto::CryptoError> {
//! use ringpost_client::crypto::{SecureClient, SecureConfig, SecureEvent};
//! // `client` is a registered device connected with `auto_ack: false`.
//! let secure = SecureClient::open(client, SecureConfig::new("device.e2ee", [7; 32])).await?;
//! secure.send(15550002, ringpost_client::new_msg_id(), "hello".into()).await?;
//! while let Some(event) = secure.next_event().await {
//!     if let SecureEvent::Message(m) = event { println!("{:?}", m.body) }
//! }
//! # Ok(()) }
//! ```

pub mod envelope;
pub mod error;
pub mod machine;
pub mod prekeys;
pub mod secure_client;
pub mod store;

pub use error::{CryptoError, CryptoResult};
pub use machine::{Machine, RotationPolicy};
pub use secure_client::{Plaintext, SecureClient, SecureConfig, SecureEvent};
pub use store::Store;
