//! QUIC stream framing: each frame is preceded by its length as a big-endian `u32`. A pure
//! codec (bytes in, bytes out, no IO), in the manner of rumqttd's `read(&mut BytesMut, max)`.
//!
//! A framing error means the stream can no longer be trusted (the next frame boundary is
//! unknown): report it with `Error{code}` and close the stream.
//!
//! ```
//! use bytes::BytesMut;
//! use ringpost_wire::{framing, Frame, Ping};
//!
//! let mut stream = BytesMut::new();
//! framing::encode_prefixed(&Frame::new(1, Ping { nonce: 5 }), &mut stream).unwrap();
//! let frame = framing::decode_prefixed(&mut stream).unwrap().unwrap();
//! assert_eq!(Frame::decode(&frame).unwrap(), Frame::new(1, Ping { nonce: 5 }));
//! assert!(stream.is_empty());
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codec::{with_encoded, DecodeError, EncodeError};
use crate::frame::Frame;
use crate::limits::FRAME_BYTES_MAX;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// The prefix for a frame of `len` bytes, for vectored writes (`[prefix, frame]`) of a frame
/// encoded with [`Frame::encode`]. Refuses what a receiver would refuse: 0 bytes, or more than
/// [`FRAME_BYTES_MAX`].
pub fn length_prefix(len: usize) -> Result<[u8; LENGTH_PREFIX_BYTES], EncodeError> {
    if len == 0 {
        return Err(EncodeError::Empty);
    }
    if len > FRAME_BYTES_MAX {
        return Err(EncodeError::FrameTooLarge {
            len,
            max: FRAME_BYTES_MAX,
        });
    }
    // FRAME_BYTES_MAX fits a u32, so this never saturates.
    Ok(u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes())
}

/// Encodes `frame` and appends it, behind its length prefix, to `dst`. On error `dst` is left
/// as it was.
pub fn encode_prefixed(frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
    with_encoded(frame, |encoded| {
        let prefix = length_prefix(encoded.len())?;
        dst.reserve(LENGTH_PREFIX_BYTES + encoded.len());
        dst.put_slice(&prefix);
        dst.put_slice(encoded);
        Ok(())
    })?
}

/// Takes one complete frame (without its prefix) off the front of `src`, or `None` if `src`
/// does not hold a whole one yet (then `src` is left untouched: read more and call again).
///
/// A declared length of 0, or over [`FRAME_BYTES_MAX`], is refused as soon as the prefix is
/// in, before any of the frame is buffered. This function never reserves room for the
/// declared length: four bytes from a peer must not make us allocate 128 KiB, so the buffer
/// grows only with bytes actually received. The returned frame shares `src`'s memory.
pub fn decode_prefixed(src: &mut BytesMut) -> Result<Option<Bytes>, DecodeError> {
    let Some(prefix) = src.get(..LENGTH_PREFIX_BYTES) else {
        return Ok(None);
    };
    let mut declared = [0u8; LENGTH_PREFIX_BYTES];
    declared.copy_from_slice(prefix);
    let len = usize::try_from(u32::from_be_bytes(declared)).unwrap_or(usize::MAX);
    if len == 0 {
        return Err(DecodeError::Empty);
    }
    if len > FRAME_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            len,
            max: FRAME_BYTES_MAX,
        });
    }
    if src.len() - LENGTH_PREFIX_BYTES < len {
        return Ok(None);
    }
    src.advance(LENGTH_PREFIX_BYTES);
    Ok(Some(src.split_to(len).freeze()))
}
