//! A small sans-IO RFC 6455 WebSocket codec, for both ends of a connection.
//!
//! The node's WebSocket transports (tokio over TCP or TLS, and io_uring), the Rust client SDK and
//! the load generator all speak WebSocket through this module. It has three parts:
//!
//! - the opening handshake ([`parse_request`], [`accept_response`], [`reject_response`] on the
//!   server; [`client_request`], [`parse_response`] on the client), bounded to
//!   [`HANDSHAKE_HEAD_BYTES_MAX`] bytes and [`HANDSHAKE_HEADERS_MAX`] header fields;
//! - the frame [`Decoder`], which turns bytes into one complete [`Message`] at a time and enforces
//!   every framing rule of RFC 6455 §5 (masking by role, no reserved bits, known opcodes, short
//!   unfragmented control frames, fragment sequencing, a message size limit, valid close frames);
//! - encoding: [`encode_header`] returns a [`FrameHeader`] on the stack so a driver can write
//!   header and payload vectored without copying the payload; [`encode_frame`] writes a whole
//!   (optionally masked) frame into a buffer; [`close_payload`] builds a close body.
//!
//! # Why sans-IO
//! Every function here takes bytes and returns bytes or a decision; none owns a socket, a timer or
//! a runtime. The same code therefore serves three IO drivers (tokio, TLS, io_uring) and the
//! client, and every rule is unit- and property-tested without a network (DESIGN.md, "Inside the
//! node"; STYLE.md, rule 1).
//!
//! # Why no idle buffers
//! A host holds millions of idle connections, so an idle connection must own almost nothing
//! (DESIGN.md, "What an idle connection costs"). This codec owns no read or write buffer:
//! - the driver reads into a buffer of its own and passes it to [`Decoder::decode`]; whatever is
//!   left after the last complete frame is the only per-connection input state, and it exists
//!   only while a frame is partial. The decoder does not reserve room for a frame whose header
//!   announced a large payload: ten bytes of header must not make the node allocate 128 KiB;
//! - the [`Decoder`] is a few words ([`Decoder::new`]; a test keeps it at most 48 bytes). Its
//!   reassembly buffer exists only while a fragmented message is in progress, and is dropped as
//!   soon as the message completes or the decoder reports an error;
//! - a single-frame message (the normal case: Ringpost sends one frame per message) is returned
//!   as a [`bytes::Bytes`] split off the input buffer and unmasked in place, without a copy. That
//!   `Bytes` shares the input buffer's allocation until it is dropped;
//! - outgoing frames are a stack [`FrameHeader`] plus the caller's payload `Bytes`, so the send
//!   queue holds only the payloads and is empty when idle.
//!
//! # What this codec deliberately does not do
//! - Extensions. None is negotiated, so every reserved bit must be zero. permessage-deflate in
//!   particular would cost a 32 KiB+ window per connection to compress ciphertext, which does not
//!   compress.
//! - Text messages, by default. Ringpost carries binary flatbuffers only; a [`Decoder`] rejects a
//!   text frame as soon as its header is read with [`WsError::TextNotSupported`] (close code
//!   1003), so the driver has one path for every violation: close with
//!   [`WsError::close_code`]. Tools that need text can opt in with [`Decoder::accept_text`], and
//!   then receive [`Message::Text`] after UTF-8 validation.
//! - Streaming a message before it is complete. Messages are bounded by `max_message` (the node
//!   uses [`crate::limits::FRAME_BYTES_MAX`]), so returning them whole is simpler and costs at
//!   most one bounded message per connection, and only while it is in flight.
//! - State after a close. When [`Decoder::decode`] returns [`Message::Close`], the caller answers
//!   it and stops decoding; the decoder does not track the closing handshake.

mod decoder;
mod encode;
mod handshake;
mod http;
mod mask;

pub use decoder::{is_valid_close_code, Decoder, Message, Role, WsError};
pub use encode::{close_payload, encode_frame, encode_header, FrameHeader, OpCode};
pub use handshake::{
    accept_key, accept_response, client_request, parse_request, parse_response, reject_response,
    HandshakeError, HandshakeRequest,
};
pub use mask::apply_mask;

/// The WebSocket subprotocol Ringpost speaks. Clients offer it in `Sec-WebSocket-Protocol`; the
/// server refuses a handshake that does not offer it and echoes it when it accepts.
pub const SUBPROTOCOL: &str = "ringpost.v1";

/// The GUID appended to the client's key before hashing (RFC 6455 §1.3).
pub const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest handshake head (request or response line, header fields and the empty line), in
/// bytes. A connection mid-handshake holds at most this much; anything longer is refused.
pub const HANDSHAKE_HEAD_BYTES_MAX: usize = 8 * 1024;

/// Most header fields accepted in a handshake head. Parsing is a single pass with no per-field
/// allocation; the bound keeps a head of thousands of one-byte fields from being worth sending.
pub const HANDSHAKE_HEADERS_MAX: usize = 64;

/// Largest payload of a control frame (ping, pong, close), in bytes (RFC 6455 §5.5).
pub const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;

/// Largest frame header: 2 bytes, an 8-byte extended length and a 4-byte masking key.
pub const FRAME_HEADER_BYTES_MAX: usize = 14;
