//! The client SDK's integration tests against real nodes on loopback, in one test binary
//! rather than one per file, so that a build compiles and links them once.

mod client_loopback;
mod e2ee_cluster;
