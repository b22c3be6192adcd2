//! The node's integration tests, in one test binary rather than one per file, so that a build
//! compiles and links them once: real `ringpost-node` and `ringpost-coordinator` processes, real
//! sockets and real RocksDB, driven through the client SDK.
//!
//! Run one module's tests with a filter, e.g.
//! `cargo nextest run -p ringpost-node --test integration cluster::`.

/// A coordinator and `ringpost-node run` processes on loopback (the `cluster*` modules).
#[allow(dead_code)] // each cluster module uses a part of it
#[path = "cluster/harness.rs"]
mod cluster_harness;
/// One `ringpost-node dev` process (the `e2e`, `media` and `push` modules).
#[allow(dead_code)] // each module uses a part of it
#[path = "e2e/harness.rs"]
mod e2e_harness;

mod cluster;
mod cluster_broadcast;
mod cluster_group_receipts;
mod cluster_groups;
mod cluster_keys;
mod cluster_presence;
mod e2e;
mod media;
mod push;
