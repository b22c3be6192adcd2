//! Owned frames to bytes and back, enforcing [`crate::limits`] on both sides of the wire.
//!
//! - [`Frame::encode`] checks every bound of the owned frame (the same bounds the receiver
//!   checks), builds it with a per-thread `FlatBufferBuilder` that is reset, not reallocated,
//!   for each frame, and refuses a result over [`FRAME_BYTES_MAX`].
//! - [`Frame::decode`] is [`FrameView::parse`] (size, flatbuffers verification with bounded
//!   work, version, frame type, every bound, required fields, enum values) followed by a copy
//!   into owned types. It allocates at most a small multiple of the input's size and never
//!   panics, whatever the input.
//!
//! Unknown enum values inside a known frame type (say `SendStatus` 9) are rejected as
//! [`DecodeError::UnknownEnumValue`] (a malformed frame): mapping them to a default could turn an
//! unknown status into `Ok`. New enum values therefore need a new protocol version, or a
//! capability the peer announced.

mod build;
mod check;
mod convert;

use std::cell::RefCell;

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;

pub(crate) use self::check::received;
pub use self::check::{FieldBound, BOUNDS};
pub(crate) use self::convert::{body as owned_body, Source};

use self::check::Violation;
use crate::error_code::ErrorCode;
use crate::frame::Frame;
use crate::limits::FRAME_BYTES_MAX;
use crate::view::FrameView;

/// Why bytes are not an acceptable frame. Every variant maps to a stable [`ErrorCode`] through
/// [`DecodeError::code`]; the node sends that code back in `Error{code}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Zero bytes, or a length prefix of zero.
    #[error("empty frame")]
    Empty,
    /// The frame (or a length prefix) is larger than the frame bound.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// The flatbuffers verifier rejected the bytes (bad offsets, bad UTF-8, too deep, too many
    /// tables, ...). The message is the verifier's, for logs only.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// `Frame.version` is not [`crate::PROTOCOL_VERSION`].
    #[error("unsupported frame version {got}")]
    UnsupportedVersion { got: u16 },
    /// The `Body` union tag is not a frame type this build knows.
    #[error("unknown frame type {tag}")]
    UnknownFrameType { tag: u8 },
    /// A list, string or byte string is longer than its bound (or `MediaUploadRequest.size`
    /// larger than its bound).
    #[error("{field} has length {len}, more than the limit of {max}")]
    LimitExceeded {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// A fixed-length byte string (a token) has another length.
    #[error("{field} has length {len}, expected exactly {expected}")]
    WrongLength {
        field: &'static str,
        len: usize,
        expected: usize,
    },
    /// A field the protocol requires is absent (an id, or the frame's body).
    #[error("missing required field {0}")]
    MissingField(&'static str),
    /// An enum field holds a value this build does not know.
    #[error("{field} has unknown value {value}")]
    UnknownEnumValue { field: &'static str, value: u8 },
}

impl DecodeError {
    /// The stable code to report to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownFrameType { .. } => ErrorCode::UnknownFrameType,
            DecodeError::LimitExceeded { .. } => ErrorCode::LimitExceeded,
            DecodeError::Empty
            | DecodeError::Malformed(_)
            | DecodeError::WrongLength { .. }
            | DecodeError::MissingField(_)
            | DecodeError::UnknownEnumValue { .. } => ErrorCode::Malformed,
        }
    }
}

/// Why an owned frame cannot be sent. The sending side enforces the same bounds as the
/// receiving side, so a frame that encodes is one every peer of this version accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded frame is larger than [`FRAME_BYTES_MAX`] (each list and string may be within
    /// its bound while the sum is not, e.g. ten 64 KiB ciphertexts).
    #[error("encoded frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    /// A list, string or byte string is longer than its bound.
    #[error("{field} has length {len}, more than the limit of {max}")]
    LimitExceeded {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// A fixed-length byte string (a token) has another length.
    #[error("{field} has length {len}, expected exactly {expected}")]
    WrongLength {
        field: &'static str,
        len: usize,
        expected: usize,
    },
    /// A length prefix of zero was asked for (no frame is empty).
    #[error("empty frame")]
    Empty,
}

impl EncodeError {
    /// The code a receiver would report for the same frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            EncodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            EncodeError::LimitExceeded { .. } => ErrorCode::LimitExceeded,
            EncodeError::WrongLength { .. } | EncodeError::Empty => ErrorCode::Malformed,
        }
    }
}

impl From<Violation> for DecodeError {
    fn from(v: Violation) -> Self {
        match v {
            Violation::TooLong { field, len, max } => {
                DecodeError::LimitExceeded { field, len, max }
            }
            Violation::WrongLength {
                field,
                len,
                expected,
            } => DecodeError::WrongLength {
                field,
                len,
                expected,
            },
        }
    }
}

impl From<Violation> for EncodeError {
    fn from(v: Violation) -> Self {
        match v {
            Violation::TooLong { field, len, max } => {
                EncodeError::LimitExceeded { field, len, max }
            }
            Violation::WrongLength {
                field,
                len,
                expected,
            } => EncodeError::WrongLength {
                field,
                len,
                expected,
            },
        }
    }
}

/// Capacity of a fresh per-thread builder: most frames are far smaller, and it grows (by
/// doubling) to the largest frame the thread has encoded.
const BUILDER_START_BYTES: usize = 1024;

thread_local! {
    /// One builder per thread, reused for every frame the thread encodes. Worst case per
    /// thread: 256 KiB (the doubling past a 128 KiB frame); a builder that grew beyond the
    /// frame bound while building a frame that was then refused is dropped, not kept.
    static BUILDER: RefCell<Option<FlatBufferBuilder<'static>>> = const { RefCell::new(None) };
}

/// Runs `f` with the thread's builder, reset. The builder is taken out of the thread-local for
/// the call, so a panic in `f` cannot leave a half-built state behind for the next frame, and a
/// nested call (or one during thread teardown) simply gets a fresh builder.
fn with_builder<R>(f: impl FnOnce(&mut FlatBufferBuilder<'static>) -> R) -> R {
    let cached = BUILDER.try_with(|cell| cell.try_borrow_mut().ok().and_then(|mut b| b.take()));
    let mut fbb = cached
        .ok()
        .flatten()
        .unwrap_or_else(|| FlatBufferBuilder::with_capacity(BUILDER_START_BYTES));
    fbb.reset();
    let out = f(&mut fbb);
    if fbb.unfinished_data().len() <= FRAME_BYTES_MAX {
        // `try_with` fails only during thread teardown; then the builder is simply dropped.
        let _ = BUILDER.try_with(|cell| {
            if let Ok(mut slot) = cell.try_borrow_mut() {
                *slot = Some(fbb);
            }
        });
    }
    out
}

/// Checks `frame` against every bound, builds it, and hands the encoded bytes to `f` (which
/// copies them where they need to go: a `Bytes`, or a stream buffer behind a length prefix).
pub(crate) fn with_encoded<R>(frame: &Frame, f: impl FnOnce(&[u8]) -> R) -> Result<R, EncodeError> {
    check::sent(&frame.body)?;
    with_builder(|fbb| {
        build::frame(fbb, frame);
        let data = fbb.unfinished_data();
        if data.len() > FRAME_BYTES_MAX {
            return Err(EncodeError::FrameTooLarge {
                len: data.len(),
                max: FRAME_BYTES_MAX,
            });
        }
        Ok(f(data))
    })
}

impl Frame {
    /// Encodes the frame, enforcing every bound the receiver enforces. One allocation: the
    /// returned buffer.
    pub fn encode(&self) -> Result<Bytes, EncodeError> {
        with_encoded(self, Bytes::copy_from_slice)
    }

    /// Encodes the frame *without* checking any bound, the frame bound included. Only for
    /// tests of a receiver (a node must answer an over-limit frame with `Error{code}`); real
    /// traffic goes through [`Frame::encode`].
    pub fn encode_unchecked(&self) -> Bytes {
        with_builder(|fbb| {
            build::frame(fbb, self);
            Bytes::copy_from_slice(fbb.unfinished_data())
        })
    }

    /// Decodes one frame: [`FrameView::parse`] (every check), then a copy into owned types.
    pub fn decode(buf: &[u8]) -> Result<Frame, DecodeError> {
        FrameView::parse(buf)?.to_owned_frame()
    }

    /// Like [`Frame::decode`], but byte strings (ciphertexts, keys, tokens, metadata) share
    /// `buf`'s memory instead of being copied; the whole of `buf` then lives as long as any of
    /// them does.
    pub fn decode_bytes(buf: &Bytes) -> Result<Frame, DecodeError> {
        let view = FrameView::parse(buf)?;
        Ok(Frame {
            req: view.req(),
            body: owned_body(view.root(), view.kind(), Source::Share(buf))?,
        })
    }
}
