//! Ringpost edge node.
//!
//! - [`transport`]: thin IO drivers (WebSocket over TCP or TLS, QUIC) that turn bytes into
//!   frames; [`conn`] drives one connection; [`session`] is its sans-IO state machine.
//! - [`server`]: executes session requests on the shard services: [`accounts`], [`keys`],
//!   [`inbox`], over the [`storage`] engine (RocksDB); [`registry`] knows who is connected.
//! - [`push`]: wakes devices without a connection through a webhook, APNs or FCM.
//! - [`runtime`]: starts and stops a node; [`admin`] serves `/metrics`, `/healthz`, `/readyz`.
//! - [`media`]: encrypted blobs: signed upload and download URLs, the media HTTP listener, and
//!   the blob store (a local directory or S3-compatible object storage).
//!
//! `docs/architecture.md` is the guided tour.

pub mod accounts;
pub mod admin;
pub mod admission;
pub mod backoff;
pub mod broadcast;
pub mod budgets;
pub mod clock;
pub mod cluster;
pub mod conn;
pub mod contacts;
pub mod forward;
pub mod groups;
pub mod handoff;
pub mod inbox;
pub mod keys;
pub mod media;
pub mod metrics;
pub mod moves;
pub mod node_key;
pub mod outbox;
pub mod peer;
pub mod presence;
pub mod push;
pub mod registry;
pub mod replication;
pub mod ring;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod session;
pub mod shard;
pub mod shard_rows;
pub mod status;
pub mod storage;
#[cfg(test)]
mod test_bytes;
pub mod transport;
