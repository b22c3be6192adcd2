//! Ringpost Rust SDK.
