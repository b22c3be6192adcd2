//! The coordinator's integration tests, in one test binary rather than one per file, so that a
//! build compiles and links them once: the CLI, replicas as real processes, and the embedded
//! single-replica coordinator.

mod cli_binary;
mod cluster_membership;
mod embedded_single;
