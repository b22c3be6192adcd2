//! Ringpost client protocol.
//!
//! - `schema/ringpost.fbs` is the source of truth; [`generated`] is what the pinned `flatc`
//!   makes of it (committed; `make gen` regenerates it, `make test` fails when it is stale).
//! - [`frame`] holds typed owned frames for tests, the SDK and control paths, and [`FrameKind`],
//!   the fieldless frame type (union tag, direction, metrics name); [`codec`] converts frames to
//!   and from bytes, enforcing [`limits`] on both sides; [`view`] gives verified zero-copy access
//!   for the node's hot path.
//! - [`framing`] is the QUIC stream framing (u32 big-endian length prefix); [`ws`] is a small
//!   sans-IO RFC 6455 codec (a WebSocket binary message carries exactly one frame).
//! - Every failure has a typed error with a stable [`ErrorCode`]; no input panics.

// `deny`, not `forbid`: flatc's generated accessors use `unsafe` internally (reads at offsets
// the verifier has checked), so only the `generated` module is allowed it. Everything written by
// hand here is safe code.
#![deny(unsafe_code)]

pub mod codec;
pub mod error_code;
pub mod frame;
pub mod framing;
#[allow(
    unsafe_code,
    clippy::all,
    unused_imports,
    dead_code,
    deprecated,
    non_snake_case,
    non_camel_case_types,
    non_upper_case_globals,
    mismatched_lifetime_syntaxes,
    rust_2018_idioms,
    missing_docs
)]
#[rustfmt::skip]
pub mod generated;
pub mod limits;
pub mod prekeys;
pub mod view;
pub mod ws;

pub use codec::{DecodeError, EncodeError};
pub use error_code::ErrorCode;
pub use frame::*;
pub use limits::PROTOCOL_VERSION;
