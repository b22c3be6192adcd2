//! The frame decoder: bytes in, one complete [`Message`] out, every RFC 6455 §5 rule enforced.

use bytes::{Buf, Bytes, BytesMut};

use super::encode::OpCode;
use super::mask::apply_mask;
use super::CONTROL_PAYLOAD_BYTES_MAX;

/// Which end of the connection a [`Decoder`] serves; it decides the masking rule (RFC 6455 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Decodes frames sent by a client: every frame must be masked.
    Server,
    /// Decodes frames sent by a server: no frame may be masked.
    Client,
}

/// One complete message or control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A binary message, reassembled if it was fragmented. Ringpost's only data message.
    Binary(Bytes),
    /// A text message, valid UTF-8. Only returned by a decoder built with
    /// [`Decoder::accept_text`]; otherwise a text frame is [`WsError::TextNotSupported`].
    Text(Bytes),
    /// A ping; answer with a pong carrying the same payload (at most 125 bytes).
    Ping(Bytes),
    /// A pong: a ping's answer, or an unsolicited heartbeat.
    Pong(Bytes),
    /// The peer started (or answered) the closing handshake. `code` is `None` when the close
    /// frame had no payload; otherwise it is a valid code ([`is_valid_close_code`]) and `reason`
    /// is the UTF-8 reason, at most 123 bytes.
    Close {
        /// The close status code, if the peer sent one.
        code: Option<u16>,
        /// The peer's reason, possibly empty.
        reason: String,
    },
}

/// A framing violation. The connection cannot be trusted after one: send a close frame with
/// [`WsError::close_code`] (and the message as reason, if wanted) and close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// A server received an unmasked frame.
    #[error("frame is not masked; clients must mask every frame")]
    Unmasked,
    /// A client received a masked frame.
    #[error("frame is masked; servers must not mask frames")]
    Masked,
    /// RSV1-3 set, but no extension was negotiated. Holds the three bits.
    #[error("reserved bits {0:#05b} are set but no extension was negotiated")]
    ReservedBits(u8),
    /// An opcode RFC 6455 reserves. Holds the four bits.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A ping, pong or close frame with more than 125 bytes of payload.
    #[error("control frame payload is longer than 125 bytes")]
    ControlTooLong,
    /// A ping, pong or close frame without FIN.
    #[error("control frame is fragmented")]
    ControlFragmented,
    /// A continuation frame with no fragmented message in progress.
    #[error("continuation frame without a fragmented message in progress")]
    UnexpectedContinuation,
    /// A text or binary frame started while a fragmented message was still in progress.
    #[error("new message started before the fragmented message in progress was finished")]
    ExpectedContinuation,
    /// A 64-bit payload length with the most significant bit set.
    #[error("64-bit payload length has its most significant bit set")]
    LengthMsbSet,
    /// The message (this frame plus earlier fragments) is larger than the decoder's limit.
    #[error("message of at least {len} bytes exceeds the limit of {max} bytes")]
    MessageTooBig {
        /// Bytes announced so far: earlier fragments plus this frame's declared length.
        len: u64,
        /// The decoder's `max_message`.
        max: usize,
    },
    /// A close frame with a one-byte payload (a code needs two).
    #[error("close frame payload is 1 byte; a close code needs 2")]
    CloseTooShort,
    /// A close code that may not be sent (e.g. 1005, 1006, 1015) or is unassigned.
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// A close reason that is not valid UTF-8.
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
    /// A text message that is not valid UTF-8 (only with [`Decoder::accept_text`]).
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// A text frame, and the decoder does not accept text.
    #[error("text messages are not supported; send binary messages")]
    TextNotSupported,
}

impl WsError {
    /// The close code to send before closing (RFC 6455 §7.4.1): 1009 for a message too big,
    /// 1007 for invalid UTF-8, 1003 for a text message, 1002 for everything else.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::MessageTooBig { .. } => 1009,
            Self::InvalidCloseReason | Self::InvalidUtf8 => 1007,
            Self::TextNotSupported => 1003,
            Self::Unmasked
            | Self::Masked
            | Self::ReservedBits(_)
            | Self::UnknownOpcode(_)
            | Self::ControlTooLong
            | Self::ControlFragmented
            | Self::UnexpectedContinuation
            | Self::ExpectedContinuation
            | Self::LengthMsbSet
            | Self::CloseTooShort
            | Self::InvalidCloseCode(_) => 1002,
        }
    }
}

/// Whether a peer may send `code` in a close frame: 1000–1003, 1007–1014 (RFC 6455 §7.4.1 and
/// the IANA registry), and 3000–4999 (libraries and applications). 1004 is reserved; 1005, 1006
/// and 1015 only ever describe a close locally and must not be sent.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Decodes frames into messages for one connection.
///
/// Sans-IO: [`Decoder::decode`] takes the connection's input bytes and consumes whole frames
/// only, so whatever remains in the input after it returns `Ok(None)` is a partial frame the
/// driver keeps until more bytes arrive. The decoder itself is a few words; its only buffer is
/// the reassembly of a fragmented message, which exists only while one is in progress.
#[derive(Debug)]
pub struct Decoder {
    /// Fragments of the message in progress, unmasked; `None` when no message is in progress
    /// (the idle state: no allocation).
    partial: Option<BytesMut>,
    /// Largest message, in bytes, whether in one frame or the sum of its fragments.
    max_message: usize,
    role: Role,
    /// The message in `partial` started with a text frame.
    partial_is_text: bool,
    accept_text: bool,
}

/// What a frame header says, once it is complete and valid.
struct FrameHead {
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    header_len: usize,
    payload_len: usize,
}

impl Decoder {
    /// A decoder for `role` that refuses messages over `max_message` bytes and text messages.
    pub fn new(role: Role, max_message: usize) -> Self {
        Self {
            partial: None,
            max_message,
            role,
            partial_is_text: false,
            accept_text: false,
        }
    }

    /// Whether text messages are returned as [`Message::Text`] (after UTF-8 validation) instead
    /// of being refused with [`WsError::TextNotSupported`]. For tools and tests; the node and the
    /// SDK speak binary only.
    pub fn accept_text(mut self, accept: bool) -> Self {
        self.accept_text = accept;
        self
    }

    /// The role this decoder was built for.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The largest message this decoder accepts, in bytes.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Whether a fragmented message is in progress, i.e. whether the decoder owns a buffer.
    pub fn message_in_progress(&self) -> bool {
        self.partial.is_some()
    }

    /// Decodes the next complete message from the front of `src`.
    ///
    /// Returns `Ok(None)` when `src` holds no complete message yet: complete frames (fragments
    /// and their interleaved control frames excepted, which are returned at once) have been
    /// consumed and the rest, at most one partial frame, is left in `src`. Call again after
    /// every read until it returns `Ok(None)`; one call returns at most one message.
    ///
    /// Violations are reported as soon as the bytes that prove them have arrived; in particular
    /// a frame announcing more than `max_message` bytes is refused when its length is read,
    /// before any of its payload is buffered. After an error the reassembly buffer is dropped
    /// and the connection must be closed ([`WsError::close_code`]); what is left in `src` is
    /// unspecified (the offending frame may or may not have been consumed), so discard it.
    ///
    /// A single-frame message is split off `src` and unmasked in place, without a copy, so the
    /// returned `Bytes` shares `src`'s allocation: hand it on and drop it, or copy it, rather
    /// than holding it for long. Fragmented messages are reassembled into a buffer of their own.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WsError> {
        let result = self.decode_inner(src);
        if result.is_err() {
            self.partial = None;
        }
        result
    }

    fn decode_inner(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WsError> {
        loop {
            let Some(head) = self.parse_head(src)? else {
                return Ok(None);
            };
            let frame_len = head.header_len + head.payload_len;
            if src.len() < frame_len {
                return Ok(None);
            }
            let mut payload = src.split_to(frame_len);
            payload.advance(head.header_len);
            if let Some(key) = head.mask {
                apply_mask(&mut payload, key);
            }
            match head.opcode {
                OpCode::Ping => return Ok(Some(Message::Ping(payload.freeze()))),
                OpCode::Pong => return Ok(Some(Message::Pong(payload.freeze()))),
                OpCode::Close => return parse_close(&payload).map(Some),
                OpCode::Binary | OpCode::Text if head.fin => {
                    return self.finish(head.opcode == OpCode::Text, payload).map(Some);
                }
                OpCode::Binary | OpCode::Text => {
                    // Copied, not kept as a slice of `src`: a slice would pin the driver's
                    // whole read buffer for as long as the peer takes to finish the message.
                    self.partial_is_text = head.opcode == OpCode::Text;
                    self.partial = Some(BytesMut::from(&payload[..]));
                }
                OpCode::Continuation => {
                    // parse_head refuses a continuation without a message in progress.
                    let Some(partial) = self.partial.as_mut() else {
                        return Err(WsError::UnexpectedContinuation);
                    };
                    partial.extend_from_slice(&payload);
                    if head.fin {
                        let whole = self.partial.take().unwrap_or_default();
                        return self.finish(self.partial_is_text, whole).map(Some);
                    }
                }
            }
        }
    }

    fn finish(&self, is_text: bool, payload: BytesMut) -> Result<Message, WsError> {
        if is_text {
            std::str::from_utf8(&payload).map_err(|_| WsError::InvalidUtf8)?;
            Ok(Message::Text(payload.freeze()))
        } else {
            Ok(Message::Binary(payload.freeze()))
        }
    }

    /// Parses and validates the frame header at the front of `src`, rejecting each violation as
    /// soon as the bytes showing it are present. `None`: the header is not complete yet.
    fn parse_head(&self, src: &[u8]) -> Result<Option<FrameHead>, WsError> {
        let Some(&b0) = src.first() else {
            return Ok(None);
        };
        let fin = b0 & 0x80 != 0;
        let rsv = (b0 >> 4) & 0x7;
        if rsv != 0 {
            return Err(WsError::ReservedBits(rsv));
        }
        let opcode = OpCode::from_u8(b0 & 0xf).ok_or(WsError::UnknownOpcode(b0 & 0xf))?;
        match opcode {
            _ if opcode.is_control() && !fin => return Err(WsError::ControlFragmented),
            OpCode::Continuation if self.partial.is_none() => {
                return Err(WsError::UnexpectedContinuation);
            }
            OpCode::Text | OpCode::Binary if self.partial.is_some() => {
                return Err(WsError::ExpectedContinuation);
            }
            OpCode::Text if !self.accept_text => return Err(WsError::TextNotSupported),
            _ => {}
        }

        let Some(&b1) = src.get(1) else {
            return Ok(None);
        };
        let masked = b1 & 0x80 != 0;
        match (self.role, masked) {
            (Role::Server, false) => return Err(WsError::Unmasked),
            (Role::Client, true) => return Err(WsError::Masked),
            _ => {}
        }
        let len7 = b1 & 0x7f;
        if opcode.is_control() && usize::from(len7) > CONTROL_PAYLOAD_BYTES_MAX {
            return Err(WsError::ControlTooLong);
        }

        let (declared_len, mut header_len) = match len7 {
            126 => {
                let Some(&[hi, lo]) = src.get(2..4) else {
                    return Ok(None);
                };
                (u64::from(u16::from_be_bytes([hi, lo])), 4)
            }
            127 => {
                let Some(bytes) = src.get(2..10) else {
                    return Ok(None);
                };
                let mut be = [0u8; 8];
                be.copy_from_slice(bytes);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(WsError::LengthMsbSet);
                }
                (len, 10)
            }
            len => (u64::from(len), 2),
        };
        // Control frames are bounded above (125); data frames by what is left of max_message,
        // checked before the masking key or any payload is waited for.
        let payload_len = if opcode.is_control() {
            usize::from(len7)
        } else {
            let used = self.partial.as_ref().map_or(0, BytesMut::len);
            let room = self.max_message.saturating_sub(used);
            match usize::try_from(declared_len) {
                Ok(len) if len <= room => len,
                _ => {
                    return Err(WsError::MessageTooBig {
                        len: (used as u64).saturating_add(declared_len),
                        max: self.max_message,
                    })
                }
            }
        };

        let mask = if masked {
            let Some(&[k0, k1, k2, k3]) = src.get(header_len..header_len + 4) else {
                return Ok(None);
            };
            header_len += 4;
            Some([k0, k1, k2, k3])
        } else {
            None
        };
        Ok(Some(FrameHead {
            fin,
            opcode,
            mask,
            header_len,
            payload_len,
        }))
    }
}

/// Parses an (unmasked) close payload: empty, or a valid code and a UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Message, WsError> {
    match *payload {
        [] => Ok(Message::Close {
            code: None,
            reason: String::new(),
        }),
        [_] => Err(WsError::CloseTooShort),
        [hi, lo, ref reason @ ..] => {
            let code = u16::from_be_bytes([hi, lo]);
            if !is_valid_close_code(code) {
                return Err(WsError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidCloseReason)?;
            Ok(Message::Close {
                code: Some(code),
                reason: reason.to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_is_a_handful_of_words() {
        // An idle connection holds one of these; keep it small (DESIGN.md, "What an idle
        // connection costs").
        assert!(
            std::mem::size_of::<Decoder>() <= 48,
            "{}",
            std::mem::size_of::<Decoder>()
        );
    }

    #[test]
    fn close_codes() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1014, 3000, 4999,
        ] {
            assert!(is_valid_close_code(code), "{code}");
        }
        for code in [
            0,
            999,
            1004,
            1005,
            1006,
            1015,
            1016,
            2000,
            2999,
            5000,
            u16::MAX,
        ] {
            assert!(!is_valid_close_code(code), "{code}");
        }
    }

    #[test]
    fn every_error_has_a_close_code_and_a_message() {
        let errors = [
            WsError::Unmasked,
            WsError::Masked,
            WsError::ReservedBits(4),
            WsError::UnknownOpcode(3),
            WsError::ControlTooLong,
            WsError::ControlFragmented,
            WsError::UnexpectedContinuation,
            WsError::ExpectedContinuation,
            WsError::LengthMsbSet,
            WsError::MessageTooBig { len: 10, max: 5 },
            WsError::CloseTooShort,
            WsError::InvalidCloseCode(1005),
            WsError::InvalidCloseReason,
            WsError::InvalidUtf8,
            WsError::TextNotSupported,
        ];
        for error in errors {
            assert!(matches!(error.close_code(), 1002 | 1003 | 1007 | 1009));
            assert!(is_valid_close_code(error.close_code()));
            // The message must fit a close frame's reason.
            assert!(
                error.to_string().len() <= CONTROL_PAYLOAD_BYTES_MAX - 2,
                "{error}"
            );
        }
    }
}
