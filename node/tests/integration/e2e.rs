//! End-to-end tests: a real `ringpost-node dev` process, real sockets (ws, wss, QUIC), real
//! RocksDB, driven through the client SDK (and raw connections where a test needs to send
//! what the SDK never would).

#[path = "e2e/groups.rs"]
mod groups;
use crate::e2e_harness as harness;
#[path = "e2e/keys.rs"]
mod keys;
#[path = "e2e/messaging.rs"]
mod messaging;
#[path = "e2e/operations.rs"]
mod operations;
#[path = "e2e/robustness.rs"]
mod robustness;
#[path = "e2e/uring.rs"]
mod uring;
