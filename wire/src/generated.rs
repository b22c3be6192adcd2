//! What `flatc` 25.12.19 makes of `schema/ringpost.fbs`: zero-copy table accessors, builders and
//! the verifier. Do not edit `generated/`: `scripts/gen-wire.sh` regenerates it and
//! `scripts/gen-wire.sh --check` fails when it is stale. The rest of the crate uses these types
//! only through [`crate::codec`] and [`crate::view`].
//!
//! The generated accessors use `unsafe` internally (reads at offsets the verifier has checked);
//! every entry point in this crate verifies a buffer with `flatbuffers::root_with_opts` before
//! touching it, so no unverified buffer reaches them.

include!("generated/ringpost_generated.rs");

pub use self::ringpost::*;
