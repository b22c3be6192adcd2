//! The wire crate's integration tests, in one test binary rather than one per file, so that a
//! build compiles and links them once. Run one module with a filter, e.g.
//! `cargo nextest run -p ringpost-wire --test integration wire_fuzz_seeds::`.

#[allow(dead_code)] // the tests use a part of it
#[path = "support/frames.rs"]
mod frames;

mod wire_codec;
mod wire_codes;
mod wire_framing;
mod wire_fuzz_seeds;
mod wire_protocol_doc;
mod wire_view;
mod ws_codec;
mod ws_handshake;
