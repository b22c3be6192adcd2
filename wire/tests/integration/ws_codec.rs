//! WebSocket framing (`ringpost_wire::ws`): the RFC 6455 §5.7 examples, every rejection rule,
//! and properties: encode→decode round trips, any split of the input decodes the same, garbage
//! never panics.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use ringpost_wire::ws::{
    close_payload, encode_frame, encode_header, Decoder, Message, OpCode, Role, WsError,
    CONTROL_PAYLOAD_BYTES_MAX,
};

const MAX: usize = 128 * 1024;
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn server() -> Decoder {
    Decoder::new(Role::Server, MAX)
}

fn client() -> Decoder {
    Decoder::new(Role::Client, MAX)
}

/// Decodes everything decodable in `src`: the messages, then the error if one stopped it.
fn drain(decoder: &mut Decoder, src: &mut BytesMut) -> (Vec<Message>, Option<WsError>) {
    let mut messages = Vec::new();
    loop {
        match decoder.decode(src) {
            Ok(Some(message)) => messages.push(message),
            Ok(None) => return (messages, None),
            Err(error) => return (messages, Some(error)),
        }
    }
}

/// Decodes `bytes` as one buffer; the result must consume everything.
fn decode_all(mut decoder: Decoder, bytes: &[u8]) -> Vec<Message> {
    let mut src = BytesMut::from(bytes);
    let (messages, error) = drain(&mut decoder, &mut src);
    assert_eq!(error, None);
    assert!(src.is_empty(), "{} bytes left over", src.len());
    assert!(!decoder.message_in_progress());
    messages
}

/// The first error decoding `bytes`, which must come before any message.
fn first_error(mut decoder: Decoder, bytes: &[u8]) -> WsError {
    let mut src = BytesMut::from(bytes);
    match drain(&mut decoder, &mut src) {
        (messages, Some(error)) => {
            assert!(
                !decoder.message_in_progress(),
                "an error drops the reassembly buffer"
            );
            assert!(messages.is_empty(), "{messages:?} before {error}");
            error
        }
        (messages, None) => panic!("expected an error, decoded {messages:?}"),
    }
}

fn frame(opcode: OpCode, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = encode_header(opcode, fin, payload.len(), mask)
        .as_bytes()
        .to_vec();
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        ringpost_wire::ws::apply_mask(&mut out[start..], key);
    }
    out
}

fn binary(bytes: &[u8]) -> Message {
    Message::Binary(Bytes::copy_from_slice(bytes))
}

// --- RFC 6455 §5.7 examples --------------------------------------------------------------

#[test]
fn rfc_single_frame_unmasked_text() {
    let bytes = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
    let messages = decode_all(client().accept_text(true), &bytes);
    assert_eq!(messages, [Message::Text(Bytes::from_static(b"Hello"))]);
    assert_eq!(frame(OpCode::Text, true, b"Hello", None), bytes);
}

#[test]
fn rfc_single_frame_masked_text() {
    let bytes = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    let messages = decode_all(server().accept_text(true), &bytes);
    assert_eq!(messages, [Message::Text(Bytes::from_static(b"Hello"))]);
    let mut encoded = BytesMut::new();
    encode_frame(OpCode::Text, b"Hello", Some(MASK), &mut encoded);
    assert_eq!(&encoded[..], bytes);
}

#[test]
fn rfc_fragmented_unmasked_text() {
    let bytes = [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f];
    let messages = decode_all(client().accept_text(true), &bytes);
    assert_eq!(messages, [Message::Text(Bytes::from_static(b"Hello"))]);
}

#[test]
fn rfc_ping_and_masked_pong() {
    let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
    assert_eq!(
        decode_all(client(), &ping),
        [Message::Ping(Bytes::from_static(b"Hello"))]
    );
    let pong = [
        0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    assert_eq!(
        decode_all(server(), &pong),
        [Message::Pong(Bytes::from_static(b"Hello"))]
    );
    assert_eq!(frame(OpCode::Ping, true, b"Hello", None), ping);
    assert_eq!(frame(OpCode::Pong, true, b"Hello", Some(MASK)), pong);
}

#[test]
fn rfc_256_byte_binary() {
    let payload: Vec<u8> = (0..256).map(|i| i as u8).collect();
    let mut bytes = vec![0x82, 0x7e, 0x01, 0x00];
    bytes.extend_from_slice(&payload);
    assert_eq!(decode_all(client(), &bytes), [binary(&payload)]);
    assert_eq!(frame(OpCode::Binary, true, &payload, None), bytes);
}

#[test]
fn rfc_64_kib_binary() {
    let payload: Vec<u8> = (0..65536).map(|i| (i % 251) as u8).collect();
    let mut bytes = vec![0x82, 0x7f, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00];
    bytes.extend_from_slice(&payload);
    assert_eq!(decode_all(client(), &bytes), [binary(&payload)]);
    assert_eq!(frame(OpCode::Binary, true, &payload, None), bytes);
}

// --- accepted shapes ---------------------------------------------------------------------

#[test]
fn control_frames_interleave_with_a_fragmented_message() {
    let mut decoder = server();
    let mut src = BytesMut::new();
    src.put_slice(&frame(OpCode::Binary, false, b"ab", Some(MASK)));
    src.put_slice(&frame(OpCode::Ping, true, b"p", Some([1, 2, 3, 4])));
    assert_eq!(
        decoder.decode(&mut src),
        Ok(Some(Message::Ping(Bytes::from_static(b"p"))))
    );
    assert!(decoder.message_in_progress());
    src.put_slice(&frame(
        OpCode::Continuation,
        false,
        b"cd",
        Some([5, 6, 7, 8]),
    ));
    src.put_slice(&frame(OpCode::Pong, true, b"", Some(MASK)));
    assert_eq!(
        decoder.decode(&mut src),
        Ok(Some(Message::Pong(Bytes::new())))
    );
    src.put_slice(&frame(
        OpCode::Close,
        true,
        &close_payload(1000, "bye"),
        Some(MASK),
    ));
    let close = Message::Close {
        code: Some(1000),
        reason: "bye".into(),
    };
    assert_eq!(decoder.decode(&mut src), Ok(Some(close)));
    src.put_slice(&frame(OpCode::Continuation, true, b"e", Some(MASK)));
    assert_eq!(decoder.decode(&mut src), Ok(Some(binary(b"abcde"))));
    assert!(!decoder.message_in_progress(), "idle again: no buffer");
    assert_eq!(decoder.decode(&mut src), Ok(None));
    assert!(src.is_empty());
}

#[test]
fn empty_fragments_and_empty_messages() {
    let mut bytes = frame(OpCode::Binary, false, b"", None);
    bytes.extend(frame(OpCode::Continuation, false, b"", None));
    bytes.extend(frame(OpCode::Continuation, true, b"", None));
    bytes.extend(frame(OpCode::Binary, true, b"", None));
    assert_eq!(decode_all(client(), &bytes), [binary(b""), binary(b"")]);
}

#[test]
fn one_call_returns_one_message_and_keeps_the_rest() {
    let mut src = BytesMut::new();
    encode_frame(OpCode::Binary, b"one", None, &mut src);
    encode_frame(OpCode::Binary, b"two", None, &mut src);
    src.put_slice(&[0x82, 0x05, b't']); // a partial third frame
    let mut decoder = client();
    assert_eq!(decoder.decode(&mut src), Ok(Some(binary(b"one"))));
    assert_eq!(decoder.decode(&mut src), Ok(Some(binary(b"two"))));
    assert_eq!(decoder.decode(&mut src), Ok(None));
    assert_eq!(
        &src[..],
        &[0x82, 0x05, b't'],
        "the partial frame is left for the driver"
    );
}

#[test]
fn a_message_of_exactly_max_message_is_accepted() {
    let payload = vec![7u8; 1000];
    let bytes = frame(OpCode::Binary, true, &payload, None);
    assert_eq!(
        decode_all(Decoder::new(Role::Client, 1000), &bytes),
        [binary(&payload)]
    );
    let mut bytes = frame(OpCode::Binary, false, &payload[..600], None);
    bytes.extend(frame(OpCode::Continuation, true, &payload[600..], None));
    assert_eq!(
        decode_all(Decoder::new(Role::Client, 1000), &bytes),
        [binary(&payload)]
    );
}

#[test]
fn control_frames_are_not_bounded_by_max_message() {
    let ping = frame(OpCode::Ping, true, &[1; CONTROL_PAYLOAD_BYTES_MAX], None);
    let messages = decode_all(Decoder::new(Role::Client, 10), &ping);
    assert_eq!(
        messages,
        [Message::Ping(Bytes::from(vec![
            1;
            CONTROL_PAYLOAD_BYTES_MAX
        ]))]
    );
}

#[test]
fn close_frames() {
    let empty = decode_all(client(), &frame(OpCode::Close, true, b"", None));
    assert_eq!(
        empty,
        [Message::Close {
            code: None,
            reason: String::new()
        }]
    );
    for code in [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
        let bytes = frame(OpCode::Close, true, &close_payload(code, "né"), None);
        let close = Message::Close {
            code: Some(code),
            reason: "né".into(),
        };
        assert_eq!(decode_all(client(), &bytes), [close]);
    }
}

#[test]
fn accepted_text_must_be_utf8_even_across_fragments() {
    // "é" is 0xc3 0xa9; splitting it across fragments is fine.
    let mut bytes = frame(OpCode::Text, false, b"caf\xc3", Some(MASK));
    bytes.extend(frame(OpCode::Continuation, true, b"\xa9", Some(MASK)));
    let messages = decode_all(server().accept_text(true), &bytes);
    assert_eq!(messages, [Message::Text(Bytes::from("café"))]);

    let bytes = frame(OpCode::Text, true, b"caf\xc3", Some(MASK));
    let error = first_error(server().accept_text(true), &bytes);
    assert_eq!(error, WsError::InvalidUtf8);
    assert_eq!(error.close_code(), 1007);
}

// --- every rejection rule ----------------------------------------------------------------

#[test]
fn text_is_refused_by_default_as_soon_as_the_header_arrives() {
    let error = first_error(server(), &[0x81]);
    assert_eq!(error, WsError::TextNotSupported);
    assert_eq!(error.close_code(), 1003);
    assert_eq!(
        first_error(client(), &[0x01, 0x00]),
        WsError::TextNotSupported
    );
}

#[test]
fn server_requires_masked_frames() {
    let error = first_error(server(), &frame(OpCode::Binary, true, b"x", None));
    assert_eq!(error, WsError::Unmasked);
    assert_eq!(error.close_code(), 1002);
    assert_eq!(first_error(server(), &[0x89, 0x00]), WsError::Unmasked);
}

#[test]
fn client_rejects_masked_frames() {
    let error = first_error(client(), &frame(OpCode::Binary, true, b"x", Some(MASK)));
    assert_eq!(error, WsError::Masked);
    assert_eq!(error.close_code(), 1002);
}

#[test]
fn reserved_bits_are_rejected() {
    for (bit, rsv) in [(0x40, 0b100), (0x20, 0b010), (0x10, 0b001), (0x70, 0b111)] {
        assert_eq!(
            first_error(client(), &[0x82 | bit, 0x00]),
            WsError::ReservedBits(rsv)
        );
        assert_eq!(
            first_error(server(), &[0x82 | bit]),
            WsError::ReservedBits(rsv)
        );
    }
}

#[test]
fn unknown_opcodes_are_rejected() {
    for opcode in [0x3, 0x4, 0x5, 0x6, 0x7, 0xb, 0xc, 0xd, 0xe, 0xf] {
        assert_eq!(
            first_error(client(), &[0x80 | opcode, 0x00]),
            WsError::UnknownOpcode(opcode)
        );
    }
}

#[test]
fn control_frames_longer_than_125_bytes_are_rejected_from_the_header() {
    for opcode in [0x88, 0x89, 0x8a] {
        assert_eq!(
            first_error(client(), &[opcode, 126]),
            WsError::ControlTooLong
        );
        assert_eq!(
            first_error(client(), &[opcode, 127]),
            WsError::ControlTooLong
        );
        assert_eq!(
            first_error(server(), &[opcode, 0x80 | 126]),
            WsError::ControlTooLong
        );
    }
}

#[test]
fn fragmented_control_frames_are_rejected() {
    for opcode in [0x08, 0x09, 0x0a] {
        assert_eq!(
            first_error(client(), &[opcode, 0x00]),
            WsError::ControlFragmented
        );
        assert_eq!(first_error(server(), &[opcode]), WsError::ControlFragmented);
    }
}

#[test]
fn continuation_without_a_start_is_rejected() {
    let bytes = frame(OpCode::Continuation, true, b"x", None);
    assert_eq!(
        first_error(client(), &bytes),
        WsError::UnexpectedContinuation
    );
    let bytes = frame(OpCode::Continuation, false, b"x", Some(MASK));
    assert_eq!(
        first_error(server(), &bytes),
        WsError::UnexpectedContinuation
    );
    assert_eq!(
        first_error(server(), &[0x80]),
        WsError::UnexpectedContinuation
    );
    // A complete message ends the fragment sequence.
    let mut decoder = client();
    let mut src = BytesMut::from(&frame(OpCode::Binary, true, b"a", None)[..]);
    src.put_slice(&frame(OpCode::Continuation, true, b"b", None));
    assert_eq!(decoder.decode(&mut src), Ok(Some(binary(b"a"))));
    assert_eq!(
        decoder.decode(&mut src),
        Err(WsError::UnexpectedContinuation)
    );
}

#[test]
fn a_new_message_inside_a_fragmented_one_is_rejected() {
    for opcode in [OpCode::Binary, OpCode::Text] {
        let mut decoder = client().accept_text(true);
        let mut src = BytesMut::from(&frame(OpCode::Binary, false, b"a", None)[..]);
        src.put_slice(&frame(opcode, true, b"b", None));
        assert_eq!(decoder.decode(&mut src), Err(WsError::ExpectedContinuation));
        assert!(
            !decoder.message_in_progress(),
            "an error drops the reassembly buffer"
        );
    }
}

#[test]
fn oversized_frames_are_rejected_before_their_payload_arrives() {
    let limit = 1000;
    let decoder = || Decoder::new(Role::Client, limit);
    // 7-bit, 16-bit and 64-bit lengths; only the header is supplied.
    assert!(matches!(
        first_error(Decoder::new(Role::Client, 100), &[0x82, 101]),
        WsError::MessageTooBig { len: 101, max: 100 }
    ));
    let error = first_error(decoder(), &[0x82, 126, 0x03, 0xe9]);
    assert_eq!(
        error,
        WsError::MessageTooBig {
            len: 1001,
            max: limit
        }
    );
    assert_eq!(error.close_code(), 1009);
    let error = first_error(decoder(), &[0x82, 127, 0, 0, 0x10, 0, 0, 0, 0, 0]);
    assert_eq!(
        error,
        WsError::MessageTooBig {
            len: 1 << 44,
            max: limit
        }
    );
    // Masked: refused before the masking key arrives.
    let error = first_error(
        Decoder::new(Role::Server, limit),
        &[0x82, 0x80 | 126, 0x03, 0xe9],
    );
    assert_eq!(
        error,
        WsError::MessageTooBig {
            len: 1001,
            max: limit
        }
    );
}

#[test]
fn fragments_summing_over_the_limit_are_rejected_at_the_offending_header() {
    let mut decoder = Decoder::new(Role::Client, 1000);
    let mut src = BytesMut::from(&frame(OpCode::Binary, false, &[0; 600], None)[..]);
    src.put_slice(&frame(OpCode::Continuation, false, &[0; 400], None));
    src.put_slice(&[0x80, 0x01]); // one more byte announced, none sent
    assert_eq!(
        decoder.decode(&mut src),
        Err(WsError::MessageTooBig {
            len: 1001,
            max: 1000
        })
    );
    assert!(!decoder.message_in_progress());
}

#[test]
fn length_with_the_most_significant_bit_set_is_rejected() {
    let bytes = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
    assert_eq!(first_error(client(), &bytes), WsError::LengthMsbSet);
    assert_eq!(
        first_error(Decoder::new(Role::Client, usize::MAX), &bytes),
        WsError::LengthMsbSet
    );
}

#[test]
fn huge_lengths_with_an_unbounded_decoder_wait_instead_of_overflowing() {
    let mut decoder = Decoder::new(Role::Server, usize::MAX);
    let mut src = BytesMut::from(&[0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..]);
    src.put_slice(&MASK);
    let result = decoder.decode(&mut src);
    if usize::BITS == 64 {
        assert_eq!(result, Ok(None));
    } else {
        assert!(matches!(result, Err(WsError::MessageTooBig { .. })));
    }
}

#[test]
fn bad_close_payloads_are_rejected() {
    let error = first_error(client(), &frame(OpCode::Close, true, &[0x03], None));
    assert_eq!(error, WsError::CloseTooShort);
    assert_eq!(error.close_code(), 1002);
    for code in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535,
    ] {
        let bytes = frame(OpCode::Close, true, &code.to_be_bytes(), Some(MASK));
        let error = first_error(server(), &bytes);
        assert_eq!(error, WsError::InvalidCloseCode(code));
        assert_eq!(error.close_code(), 1002);
    }
    let bytes = frame(OpCode::Close, true, b"\x03\xe8\xff\xfe", None);
    let error = first_error(client(), &bytes);
    assert_eq!(error, WsError::InvalidCloseReason);
    assert_eq!(error.close_code(), 1007);
}

#[test]
fn error_messages_fit_in_a_close_reason() {
    let error = first_error(
        client(),
        &[0x82, 127, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    );
    let payload = close_payload(error.close_code(), &error.to_string());
    assert_eq!(&payload[2..], error.to_string().as_bytes(), "not truncated");
}

// --- properties --------------------------------------------------------------------------

/// One frame of a generated stream.
#[derive(Debug, Clone)]
enum Piece {
    /// A binary message cut into this many fragments (1 = unfragmented), with a control frame
    /// after each fragment but the last when `interleave` is set.
    Binary {
        payload: Vec<u8>,
        fragments: usize,
        interleave: bool,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(u16, String),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        4 => (proptest::collection::vec(any::<u8>(), 0..300), 1..4usize, any::<bool>())
            .prop_map(|(payload, fragments, interleave)| Piece::Binary { payload, fragments, interleave }),
        1 => proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Piece::Ping),
        1 => proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Piece::Pong),
        1 => (prop_oneof![Just(1000u16), Just(1001), 3000..5000u16], "[a-z é]{0,20}")
            .prop_map(|(code, reason)| Piece::Close(code, reason)),
    ]
}

/// Encodes `pieces` as `role`'s peer would (masking with `mask` when the peer is a client) and
/// returns the bytes with the messages a decoder must produce from them.
fn encode_stream(pieces: &[Piece], peer_masks: bool, mask: [u8; 4]) -> (Vec<u8>, Vec<Message>) {
    let key = peer_masks.then_some(mask);
    let mut out = BytesMut::new();
    let mut expected = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Binary {
                payload,
                fragments,
                interleave,
            } => {
                let size = payload.len().div_ceil(*fragments).max(1);
                let mut chunks: Vec<&[u8]> = payload.chunks(size).collect();
                chunks.resize(chunks.len().max(*fragments), &[]);
                let last = chunks.len() - 1;
                for (i, chunk) in chunks.iter().enumerate() {
                    let opcode = if i == 0 {
                        OpCode::Binary
                    } else {
                        OpCode::Continuation
                    };
                    out.put_slice(&frame(opcode, i == last, chunk, key));
                    if *interleave && i != last {
                        out.put_slice(&frame(OpCode::Ping, true, &[i as u8], key));
                        expected.push(Message::Ping(Bytes::from(vec![i as u8])));
                    }
                }
                expected.push(binary(payload));
            }
            Piece::Ping(p) => {
                encode_frame(OpCode::Ping, p, key, &mut out);
                expected.push(Message::Ping(Bytes::from(p.clone())));
            }
            Piece::Pong(p) => {
                encode_frame(OpCode::Pong, p, key, &mut out);
                expected.push(Message::Pong(Bytes::from(p.clone())));
            }
            Piece::Close(code, reason) => {
                encode_frame(OpCode::Close, &close_payload(*code, reason), key, &mut out);
                expected.push(Message::Close {
                    code: Some(*code),
                    reason: reason.clone(),
                });
            }
        }
    }
    (out.to_vec(), expected)
}

fn decoder_for(peer_masks: bool) -> Decoder {
    if peer_masks {
        server()
    } else {
        client()
    }
}

/// Feeds `bytes` in the given chunk sizes (cycled), decoding after each chunk.
fn decode_chunked(
    mut decoder: Decoder,
    bytes: &[u8],
    sizes: &[usize],
) -> (Vec<Message>, Option<WsError>) {
    let mut src = BytesMut::new();
    let mut messages = Vec::new();
    let mut rest = bytes;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at(size.clamp(1, rest.len()));
        rest = later;
        src.put_slice(now);
        let (mut got, error) = drain(&mut decoder, &mut src);
        messages.append(&mut got);
        if error.is_some() {
            return (messages, error);
        }
    }
    (messages, None)
}

proptest! {
    #[test]
    fn round_trip_single_frames(
        payload in proptest::collection::vec(any::<u8>(), 0..70_000),
        mask in proptest::option::of(any::<[u8; 4]>()),
        kind in 0..3u8,
    ) {
        let (opcode, payload) = match kind {
            0 => (OpCode::Binary, payload),
            1 => (OpCode::Ping, payload[..payload.len().min(125)].to_vec()),
            _ => (OpCode::Pong, payload[..payload.len().min(125)].to_vec()),
        };
        let mut src = BytesMut::new();
        encode_frame(opcode, &payload, mask, &mut src);
        let header = encode_header(opcode, true, payload.len(), mask);
        prop_assert_eq!(&src[..header.as_bytes().len()], header.as_bytes());
        let mut decoder = decoder_for(mask.is_some());
        let message = decoder.decode(&mut src).unwrap().unwrap();
        let payload = Bytes::from(payload);
        let want = match opcode {
            OpCode::Binary => Message::Binary(payload),
            OpCode::Ping => Message::Ping(payload),
            _ => Message::Pong(payload),
        };
        prop_assert_eq!(message, want);
        prop_assert!(src.is_empty());
    }

    #[test]
    fn round_trip_text(text in "\\PC{0,200}", mask in any::<[u8; 4]>()) {
        let mut src = BytesMut::new();
        encode_frame(OpCode::Text, text.as_bytes(), Some(mask), &mut src);
        let mut decoder = server().accept_text(true);
        prop_assert_eq!(decoder.decode(&mut src), Ok(Some(Message::Text(Bytes::from(text)))));
    }

    #[test]
    fn round_trip_streams(
        pieces in proptest::collection::vec(piece(), 0..8),
        peer_masks in any::<bool>(),
        mask in any::<[u8; 4]>(),
    ) {
        let (bytes, expected) = encode_stream(&pieces, peer_masks, mask);
        prop_assert_eq!(decode_all(decoder_for(peer_masks), &bytes), expected);
    }

    /// The input split in two at every byte boundary decodes to the same messages, and so does
    /// the input fed one byte at a time.
    #[test]
    fn every_split_decodes_the_same(
        pieces in proptest::collection::vec(piece(), 1..5),
        peer_masks in any::<bool>(),
        mask in any::<[u8; 4]>(),
    ) {
        let (bytes, expected) = encode_stream(&pieces, peer_masks, mask);
        for split in 0..=bytes.len() {
            let mut decoder = decoder_for(peer_masks);
            let mut src = BytesMut::from(&bytes[..split]);
            let (mut messages, error) = drain(&mut decoder, &mut src);
            prop_assert_eq!(error, None);
            src.put_slice(&bytes[split..]);
            let (mut rest, error) = drain(&mut decoder, &mut src);
            prop_assert_eq!(error, None);
            messages.append(&mut rest);
            prop_assert_eq!(&messages, &expected, "split at {}", split);
            prop_assert!(src.is_empty());
            prop_assert!(!decoder.message_in_progress());
        }
        let (messages, error) = decode_chunked(decoder_for(peer_masks), &bytes, &[1]);
        prop_assert_eq!(error, None);
        prop_assert_eq!(messages, expected);
    }

    /// Random bytes never panic, and any chunking of them gives the same messages and the
    /// same error as the whole (errors are raised as soon as the bytes prove them).
    #[test]
    fn garbage_never_panics_and_chunking_does_not_matter(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        sizes in proptest::collection::vec(1..40usize, 1..8),
        server_role in any::<bool>(),
        accept_text in any::<bool>(),
        max_message in prop_oneof![0..64usize, Just(MAX)],
    ) {
        let role = if server_role { Role::Server } else { Role::Client };
        let decoder = || Decoder::new(role, max_message).accept_text(accept_text);
        let whole = decode_chunked(decoder(), &bytes, &[bytes.len().max(1)]);
        let chunked = decode_chunked(decoder(), &bytes, &sizes);
        prop_assert_eq!(whole, chunked);
    }

    /// Garbage that starts with a valid header shape gets far enough to exercise lengths,
    /// fragments and close payloads.
    #[test]
    fn plausible_garbage_never_panics(
        frames in proptest::collection::vec(
            (0..16u8, any::<bool>(), any::<bool>(), proptest::collection::vec(any::<u8>(), 0..140)),
            0..10,
        ),
        server_role in any::<bool>(),
    ) {
        let mut bytes = Vec::new();
        for (opcode, fin, masked, payload) in frames {
            bytes.push((u8::from(fin) << 7) | opcode);
            bytes.push((u8::from(masked) << 7) | payload.len().min(127) as u8);
            bytes.extend_from_slice(&payload);
        }
        let role = if server_role { Role::Server } else { Role::Client };
        let mut decoder = Decoder::new(role, 256).accept_text(true);
        let mut src = BytesMut::from(&bytes[..]);
        let _ = drain(&mut decoder, &mut src);
    }
}
