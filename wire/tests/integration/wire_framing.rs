//! QUIC stream framing: a stream cut anywhere yields the same frames; bad prefixes are refused
//! before anything is buffered.

use crate::frames;

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use ringpost_wire::framing::{
    decode_prefixed, encode_prefixed, length_prefix, LENGTH_PREFIX_BYTES,
};
use ringpost_wire::limits::FRAME_BYTES_MAX;
use ringpost_wire::*;

/// Feeds `stream` to the decoder in the given chunk sizes and returns every frame it yields.
fn feed(stream: &[u8], cuts: &[usize]) -> Result<Vec<Frame>, DecodeError> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = stream;
    let mut cuts = cuts.iter().copied().cycle();
    while !rest.is_empty() {
        let n = cuts.next().unwrap_or(1).clamp(1, rest.len());
        buf.put_slice(&rest[..n]);
        rest = &rest[n..];
        while let Some(frame) = decode_prefixed(&mut buf)? {
            out.push(Frame::decode(&frame)?);
        }
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_stream_split_anywhere_yields_the_same_frames(
        sent in proptest::collection::vec(frames::frame(), 1..6),
        cuts in proptest::collection::vec(1usize..4096, 1..16),
    ) {
        let mut stream = BytesMut::new();
        for frame in &sent {
            encode_prefixed(frame, &mut stream).unwrap();
        }
        prop_assert_eq!(feed(&stream, &cuts).unwrap(), sent.clone());
        // And one byte at a time.
        prop_assert_eq!(feed(&stream, &[1]).unwrap(), sent);
    }

    /// Random bytes on the stream never panic the decoder.
    #[test]
    fn garbage_streams_never_panic(stream in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut buf = BytesMut::from(&stream[..]);
        while let Ok(Some(frame)) = decode_prefixed(&mut buf) {
            let _ = Frame::decode(&frame);
        }
    }
}

#[test]
fn encode_prefixed_matches_length_prefix_and_encode() {
    let frame = Frame::new(2, Pong { nonce: 8 });
    let encoded = frame.encode().unwrap();
    let mut stream = BytesMut::new();
    encode_prefixed(&frame, &mut stream).unwrap();
    assert_eq!(
        &stream[..LENGTH_PREFIX_BYTES],
        &length_prefix(encoded.len()).unwrap()
    );
    assert_eq!(&stream[LENGTH_PREFIX_BYTES..], &encoded[..]);
    assert_eq!(
        length_prefix(0x0102_0304 & 0xFFFF).unwrap(),
        [0, 0, 0x03, 0x04]
    );
}

#[test]
fn length_prefix_refuses_what_a_receiver_refuses() {
    assert_eq!(length_prefix(0), Err(EncodeError::Empty));
    assert_eq!(
        length_prefix(FRAME_BYTES_MAX + 1),
        Err(EncodeError::FrameTooLarge {
            len: FRAME_BYTES_MAX + 1,
            max: FRAME_BYTES_MAX
        })
    );
    assert_eq!(
        length_prefix(FRAME_BYTES_MAX).unwrap(),
        (FRAME_BYTES_MAX as u32).to_be_bytes()
    );
}

#[test]
fn partial_prefix_and_partial_frame_wait_for_more() {
    let mut buf = BytesMut::from(&[0u8, 0, 0][..]);
    assert_eq!(decode_prefixed(&mut buf), Ok(None));
    assert_eq!(buf.len(), 3);
    let mut buf = BytesMut::from(&[0u8, 0, 0, 10, 1, 2, 3][..]);
    assert_eq!(decode_prefixed(&mut buf), Ok(None));
    assert_eq!(buf.len(), 7, "a partial frame is left in place");
}

#[test]
fn zero_length_is_refused() {
    let mut buf = BytesMut::from(&[0u8, 0, 0, 0, 9, 9][..]);
    assert_eq!(decode_prefixed(&mut buf), Err(DecodeError::Empty));
}

#[test]
fn oversize_length_is_refused_before_buffering() {
    for declared in [FRAME_BYTES_MAX as u32 + 1, u32::MAX] {
        let mut buf = BytesMut::from(&declared.to_be_bytes()[..]);
        let capacity = buf.capacity();
        assert_eq!(
            decode_prefixed(&mut buf),
            Err(DecodeError::TooLarge {
                len: declared as usize,
                max: FRAME_BYTES_MAX
            })
        );
        assert_eq!(
            buf.capacity(),
            capacity,
            "nothing was reserved for the declared length"
        );
    }
    // At the bound, the decoder waits (and reserves nothing either).
    let mut buf = BytesMut::from(&(FRAME_BYTES_MAX as u32).to_be_bytes()[..]);
    let capacity = buf.capacity();
    assert_eq!(decode_prefixed(&mut buf), Ok(None));
    assert_eq!(buf.capacity(), capacity);
}

#[test]
fn encode_prefixed_leaves_dst_alone_on_error() {
    let mut stream = BytesMut::from(&b"keep"[..]);
    let bad = Frame::new(
        1,
        DeliverAck {
            seqs: vec![0; limits::ACK_SEQS_MAX + 1],
        },
    );
    assert!(matches!(
        encode_prefixed(&bad, &mut stream),
        Err(EncodeError::LimitExceeded {
            field: "DeliverAck.seqs",
            ..
        })
    ));
    assert_eq!(&stream[..], b"keep");
}
