//! The chaos crate's integration tests, in one test binary rather than one per file, so that a
//! build compiles and links them once: the CLI, and scenarios against real nodes and
//! coordinators.

#[allow(dead_code)] // each module uses a part of it
#[path = "support/harness.rs"]
mod harness;

mod chaos_cli;
mod chaos_cluster;
mod chaos_smoke;
