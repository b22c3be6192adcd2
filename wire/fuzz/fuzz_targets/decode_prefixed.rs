//! The QUIC stream decoder on an arbitrary stream delivered in arbitrary pieces: never panics,
//! never yields a frame out of bounds, and the pieces do not change what comes out.

#![no_main]

use bytes::{BufMut, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use ringpost_wire::framing::decode_prefixed;
use ringpost_wire::limits::FRAME_BYTES_MAX;
use ringpost_wire::{DecodeError, Frame};

/// Every frame the stream yields, and the error that stopped it (if any), feeding `chunk`
/// bytes at a time.
fn run(stream: &[u8], chunk: usize) -> (Vec<Bytes>, Option<DecodeError>) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.put_slice(piece);
        loop {
            match decode_prefixed(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(!frame.is_empty() && frame.len() <= FRAME_BYTES_MAX);
                    let _ = Frame::decode(&frame);
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let whole = run(stream, stream.len().max(1));
    let pieces = run(stream, usize::from(chunk).max(1));
    assert_eq!(whole, pieces, "the chunking changed the frames");
});
