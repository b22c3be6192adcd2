//! Frame encoding: opcodes, a stack-allocated [`FrameHeader`], whole frames and close payloads.

use bytes::{BufMut, Bytes, BytesMut};

use super::mask::apply_mask;
use super::{CONTROL_PAYLOAD_BYTES_MAX, FRAME_HEADER_BYTES_MAX};

/// A frame opcode (RFC 6455 §5.2). The other values are reserved and rejected by the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    /// Continues a fragmented text or binary message.
    Continuation = 0x0,
    /// Starts a text message.
    Text = 0x1,
    /// Starts a binary message; Ringpost sends every frame as one.
    Binary = 0x2,
    /// Starts or answers the closing handshake.
    Close = 0x8,
    /// Asks the peer for a pong with the same payload.
    Ping = 0x9,
    /// Answers a ping, or is sent unsolicited as a one-way heartbeat.
    Pong = 0xA,
}

impl OpCode {
    /// The opcode for the low four bits of a frame's first byte, or `None` if it is reserved.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    /// Control frames (close, ping, pong) carry at most 125 bytes and are never fragmented.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// An encoded frame header: up to [`FRAME_HEADER_BYTES_MAX`] bytes on the stack.
///
/// Write [`FrameHeader::as_bytes`] and then the payload (vectored, e.g. with `write_vectored`),
/// so the payload is never copied into a per-connection buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    bytes: [u8; FRAME_HEADER_BYTES_MAX],
    len: u8,
}

impl FrameHeader {
    /// The header's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl AsRef<[u8]> for FrameHeader {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::fmt::Debug for FrameHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameHeader({:02x?})", self.as_bytes())
    }
}

/// Encodes the header of a frame carrying `payload_len` bytes.
///
/// With `mask` the header says the payload is masked with that key and the caller must mask the
/// payload itself ([`apply_mask`]); clients mask every frame, servers never do. The length is
/// always encoded in its shortest form. Control frames must have `fin` set and at most 125 bytes
/// (checked in debug builds; the peer would reject them).
pub fn encode_header(
    opcode: OpCode,
    fin: bool,
    payload_len: usize,
    mask: Option<[u8; 4]>,
) -> FrameHeader {
    debug_assert!(
        !opcode.is_control() || (fin && payload_len <= CONTROL_PAYLOAD_BYTES_MAX),
        "control frames must be unfragmented and at most 125 bytes"
    );
    let mut bytes = [0u8; FRAME_HEADER_BYTES_MAX];
    bytes[0] = (u8::from(fin) << 7) | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut len = 2;
    if payload_len < 126 {
        // Lossless: checked just above.
        bytes[1] = mask_bit | payload_len as u8;
    } else if let Ok(len16) = u16::try_from(payload_len) {
        bytes[1] = mask_bit | 126;
        bytes[2..4].copy_from_slice(&len16.to_be_bytes());
        len = 4;
    } else {
        bytes[1] = mask_bit | 127;
        bytes[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        len = 10;
    }
    if let Some(key) = mask {
        bytes[len..len + 4].copy_from_slice(&key);
        len += 4;
    }
    FrameHeader {
        bytes,
        len: len as u8,
    }
}

/// Appends one complete, unfragmented frame (FIN set) to `dst`.
///
/// With `mask` the payload is masked as it is written (the client side); without, it is copied
/// as is (the server side). Servers with a payload already in a `Bytes` should prefer
/// [`encode_header`] and a vectored write, which copies nothing.
pub fn encode_frame(opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>, dst: &mut BytesMut) {
    let header = encode_header(opcode, true, payload.len(), mask);
    dst.reserve(header.as_bytes().len() + payload.len());
    dst.put_slice(header.as_bytes());
    let start = dst.len();
    dst.put_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut dst[start..], key);
    }
}

/// Builds a close frame payload: the code (big-endian) and a UTF-8 reason.
///
/// The reason is truncated at a character boundary so the payload fits in a control frame
/// (123 bytes of reason). Send a code the peer will accept ([`super::is_valid_close_code`]);
/// 1005 and 1006 in particular are never sent.
pub fn close_payload(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(CONTROL_PAYLOAD_BYTES_MAX - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = BytesMut::with_capacity(2 + end);
    payload.put_u16(code);
    payload.put_slice(&reason.as_bytes()[..end]);
    payload.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths_use_the_shortest_form() {
        let cases: [(usize, &[u8]); 6] = [
            (0, &[0x82, 0x00]),
            (125, &[0x82, 125]),
            (126, &[0x82, 126, 0x00, 126]),
            (65535, &[0x82, 126, 0xff, 0xff]),
            (65536, &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
            (1 << 40, &[0x82, 127, 0, 0, 1, 0, 0, 0, 0, 0]),
        ];
        for (len, want) in cases {
            assert_eq!(
                encode_header(OpCode::Binary, true, len, None).as_bytes(),
                want
            );
        }
    }

    #[test]
    fn header_with_mask_and_without_fin() {
        let header = encode_header(OpCode::Text, false, 3, Some([1, 2, 3, 4]));
        assert_eq!(header.as_bytes(), &[0x01, 0x83, 1, 2, 3, 4]);
    }

    #[test]
    fn opcodes_round_trip_and_reserved_values_are_none() {
        for value in 0..16u8 {
            match OpCode::from_u8(value) {
                Some(op) => assert_eq!(op as u8, value),
                None => assert!(matches!(value, 3..=7 | 0xB..=0xF)),
            }
        }
        assert!(OpCode::Ping.is_control() && OpCode::Pong.is_control());
        assert!(OpCode::Close.is_control() && !OpCode::Binary.is_control());
        assert!(!OpCode::Continuation.is_control() && !OpCode::Text.is_control());
    }

    #[test]
    fn close_payload_truncates_at_a_char_boundary() {
        assert_eq!(&close_payload(1000, "")[..], &[0x03, 0xe8]);
        assert_eq!(&close_payload(1009, "big")[..], b"\x03\xf1big");
        let long = "é".repeat(100); // 200 bytes
        let payload = close_payload(1002, &long);
        assert!(payload.len() <= CONTROL_PAYLOAD_BYTES_MAX);
        assert_eq!(
            payload.len(),
            2 + 122,
            "61 two-byte characters fit in 123 bytes"
        );
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }
}
