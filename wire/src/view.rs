//! Verified zero-copy views for the node's hot path.
//!
//! [`FrameView::parse`] runs every check [`crate::Frame::decode`] runs (it is the first half of
//! it) and copies nothing: `Send` ciphertexts, `DeliverAck` sequence numbers and `Receipt` ids
//! are read straight out of the received buffer. The frame types the node handles per message
//! have typed views ([`FrameView::send`], [`FrameView::deliver_ack`], [`FrameView::receipt`],
//! [`FrameView::typing`], [`FrameView::ping`]); the rest are rare control frames, taken owned with
//! [`FrameView::to_owned_frame`].
//!
//! ```
//! use ringpost_wire::{view::FrameView, Frame, FrameKind, Ping};
//!
//! let bytes = Frame::new(7, Ping { nonce: 42 }).encode().unwrap();
//! let view = FrameView::parse(&bytes).unwrap();
//! assert_eq!((view.req(), view.kind()), (7, FrameKind::Ping));
//! assert_eq!(view.ping().map(|p| p.nonce), Some(42));
//! ```

use flatbuffers::{ForwardsUOffset, Vector, VectorIter, VerifierOptions};

use crate::codec::{owned_body, received, DecodeError, Source};
use crate::frame::{DeviceId, Frame, FrameKind, MsgId, Ping, ReceiptKind, Typing, UserId};
use crate::generated as fb;
use crate::limits::{
    FRAME_BYTES_MAX, PROTOCOL_VERSION, VERIFY_APPARENT_BYTES_MAX, VERIFY_DEPTH_MAX,
    VERIFY_TABLES_MAX,
};

/// The verifier's bounds: its work on any input is linear in the input's size.
const VERIFIER_OPTIONS: VerifierOptions = VerifierOptions {
    max_depth: VERIFY_DEPTH_MAX,
    max_tables: VERIFY_TABLES_MAX,
    max_apparent_size: VERIFY_APPARENT_BYTES_MAX,
    // flatc's builders (every language's) write the terminator; a string without one is not
    // from a conforming encoder.
    ignore_missing_null_terminator: false,
};

/// A verified frame borrowed from its buffer. Cheap to clone (no allocation).
#[derive(Clone)]
pub struct FrameView<'a> {
    root: fb::Frame<'a>,
    req: u32,
    kind: FrameKind,
    hot: Hot<'a>,
}

/// The typed view of a hot-path frame type, captured while checking it (so its required fields
/// are known to be present without checking again).
#[derive(Clone)]
pub(crate) enum Hot<'a> {
    Send(SendView<'a>),
    DeliverAck(DeliverAckView<'a>),
    Receipt(ReceiptView<'a>),
    Typing(Typing),
    Ping(Ping),
    Other,
}

impl<'a> FrameView<'a> {
    /// Verifies `buf` as one frame: size (1 ..= [`FRAME_BYTES_MAX`] bytes), flatbuffers
    /// structure (with bounded work), `Frame.version`, the frame type, and every bound,
    /// required field and enum value of the body. Copies nothing.
    pub fn parse(buf: &'a [u8]) -> Result<FrameView<'a>, DecodeError> {
        if buf.is_empty() {
            return Err(DecodeError::Empty);
        }
        if buf.len() > FRAME_BYTES_MAX {
            return Err(DecodeError::TooLarge {
                len: buf.len(),
                max: FRAME_BYTES_MAX,
            });
        }
        let root = flatbuffers::root_with_opts::<fb::Frame<'_>>(&VERIFIER_OPTIONS, buf)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if root.version() != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                got: root.version(),
            });
        }
        let tag = root.body_type().0;
        if tag == fb::Body::NONE.0 {
            return Err(DecodeError::MissingField("Frame.body"));
        }
        let kind = FrameKind::from_tag(tag).ok_or(DecodeError::UnknownFrameType { tag })?;
        let hot = received(root, kind)?;
        Ok(FrameView {
            root,
            req: root.req(),
            kind,
            hot,
        })
    }

    /// The request id of a frame [`FrameView::parse`] refused, when the root table is sound
    /// enough to read one (it refused a bound, the frame type, the version or something inside
    /// the body, such as a string that is not UTF-8): the node echoes it in `Error{code}` so the
    /// client can tell which request failed. `None` for bytes whose root table cannot be read.
    pub fn req_of(buf: &[u8]) -> Option<u32> {
        if buf.is_empty() || buf.len() > FRAME_BYTES_MAX {
            return None;
        }
        match flatbuffers::root_with_opts::<fb::Frame<'_>>(&VERIFIER_OPTIONS, buf) {
            Ok(root) => Some(root.req()),
            Err(_) => root_req_unverified(buf),
        }
    }

    /// The request id: chosen by the client, echoed in the reply; 0 for unprompted frames.
    pub fn req(&self) -> u32 {
        self.req
    }

    /// The frame type.
    pub fn kind(&self) -> FrameKind {
        self.kind
    }

    /// The frame as owned types (copies every list and byte string). Never fails for a view
    /// that [`FrameView::parse`] returned: the same checks already passed; the `Result` is kept
    /// so that no input, however it got here, can make the conversion panic.
    pub fn to_owned_frame(&self) -> Result<Frame, DecodeError> {
        Ok(Frame {
            req: self.req,
            body: owned_body(self.root, self.kind, Source::Copy)?,
        })
    }

    /// The `Send` body, if this is one.
    pub fn send(&self) -> Option<SendView<'a>> {
        match self.hot {
            Hot::Send(v) => Some(v),
            _ => None,
        }
    }

    /// The `DeliverAck` body, if this is one.
    pub fn deliver_ack(&self) -> Option<DeliverAckView<'a>> {
        match self.hot {
            Hot::DeliverAck(v) => Some(v),
            _ => None,
        }
    }

    /// The `Receipt` body, if this is one.
    pub fn receipt(&self) -> Option<ReceiptView<'a>> {
        match self.hot {
            Hot::Receipt(v) => Some(v),
            _ => None,
        }
    }

    /// The `Typing` body, if this is one (all scalars, so owned).
    pub fn typing(&self) -> Option<Typing> {
        match &self.hot {
            Hot::Typing(v) => Some(v.clone()),
            _ => None,
        }
    }

    /// The `Ping` body, if this is one (all scalars, so owned).
    pub fn ping(&self) -> Option<Ping> {
        match &self.hot {
            Hot::Ping(v) => Some(v.clone()),
            _ => None,
        }
    }

    /// The verified flatbuffers root, for [`crate::Frame::decode_bytes`].
    pub(crate) fn root(&self) -> fb::Frame<'a> {
        self.root
    }
}

impl std::fmt::Debug for FrameView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameView")
            .field("req", &self.req)
            .field("kind", &self.kind)
            .finish()
    }
}

/// A `Send` read in place.
#[derive(Clone, Copy)]
pub struct SendView<'a> {
    pub(crate) msg_id: &'a MsgId,
    pub(crate) to: UserId,
    pub(crate) ciphertexts: Vector<'a, ForwardsUOffset<fb::DeviceCiphertext<'a>>>,
}

impl<'a> SendView<'a> {
    /// The client-chosen message id.
    pub fn msg_id(&self) -> &'a MsgId {
        self.msg_id
    }

    /// The recipient user.
    pub fn to(&self) -> UserId {
        self.to
    }

    /// `(user, device, ciphertext)` for each addressed device, in frame order (at most
    /// [`crate::limits::SEND_CIPHERTEXTS_MAX`]).
    pub fn ciphertexts(&self) -> Ciphertexts<'a> {
        Ciphertexts {
            inner: self.ciphertexts.iter(),
        }
    }
}

impl std::fmt::Debug for SendView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendView")
            .field("msg_id", &self.msg_id)
            .field("to", &self.to)
            .field("ciphertexts", &self.ciphertexts.len())
            .finish()
    }
}

/// The ciphertexts of a [`SendView`]: `(user, device, body)`, the body borrowed from the frame.
#[derive(Clone)]
pub struct Ciphertexts<'a> {
    inner: VectorIter<'a, ForwardsUOffset<fb::DeviceCiphertext<'a>>>,
}

impl<'a> Iterator for Ciphertexts<'a> {
    type Item = (UserId, DeviceId, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let c = self.inner.next()?;
        Some((
            c.user(),
            c.device(),
            c.body().map_or(&[][..], |b| b.bytes()),
        ))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl ExactSizeIterator for Ciphertexts<'_> {}

/// A `DeliverAck` read in place.
#[derive(Clone, Copy)]
pub struct DeliverAckView<'a> {
    pub(crate) seqs: Vector<'a, u64>,
}

impl<'a> DeliverAckView<'a> {
    /// The acknowledged sequence numbers, in frame order (at most
    /// [`crate::limits::ACK_SEQS_MAX`]).
    pub fn seqs(&self) -> impl ExactSizeIterator<Item = u64> + Clone + 'a {
        self.seqs.iter()
    }
}

impl std::fmt::Debug for DeliverAckView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliverAckView")
            .field("seqs", &self.seqs.len())
            .finish()
    }
}

/// A `Receipt` read in place.
#[derive(Clone, Copy)]
pub struct ReceiptView<'a> {
    pub(crate) msg_id: &'a MsgId,
    pub(crate) to: UserId,
    pub(crate) kind: ReceiptKind,
    pub(crate) msg_ids: Vector<'a, fb::MsgId>,
}

impl<'a> ReceiptView<'a> {
    /// The receipt's own id (its idempotency key).
    pub fn msg_id(&self) -> &'a MsgId {
        self.msg_id
    }

    /// The user whose messages these are.
    pub fn to(&self) -> UserId {
        self.to
    }

    pub fn kind(&self) -> ReceiptKind {
        self.kind
    }

    /// The ids of the messages delivered or read, in frame order (at most
    /// [`crate::limits::RECEIPT_MSG_IDS_MAX`]).
    pub fn msg_ids(&self) -> impl ExactSizeIterator<Item = &'a MsgId> + Clone + 'a {
        self.msg_ids.iter().map(|id| &id.0)
    }
}

impl std::fmt::Debug for ReceiptView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiptView")
            .field("msg_id", &self.msg_id)
            .field("to", &self.to)
            .field("kind", &self.kind)
            .field("msg_ids", &self.msg_ids.len())
            .finish()
    }
}

/// `Frame.req` read straight from the root table with every offset bounds-checked, without
/// verifying the rest of the buffer (the body may be what the verifier refused). A scalar read
/// this way can be wrong for a corrupt buffer, never unsafe: it is only echoed in an error.
fn root_req_unverified(buf: &[u8]) -> Option<u32> {
    let u16_at = |at: usize| {
        Some(u16::from_le_bytes(
            buf.get(at..at.checked_add(2)?)?.try_into().ok()?,
        ))
    };
    let u32_at = |at: usize| {
        Some(u32::from_le_bytes(
            buf.get(at..at.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    let table = u32_at(0)? as usize;
    // A table starts with the signed distance back to its vtable.
    let back = u32_at(table)? as i32;
    let vtable = usize::try_from(i64::try_from(table).ok()? - i64::from(back)).ok()?;
    let vtable_len = usize::from(u16_at(vtable)?);
    let slot = usize::from(fb::Frame::VT_REQ);
    if slot + 2 > vtable_len {
        return Some(0);
    }
    match usize::from(u16_at(vtable + slot)?) {
        0 => Some(0),
        field => u32_at(table.checked_add(field)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frame, Hello};

    #[test]
    fn req_of_reads_the_request_id_of_a_frame_whose_body_is_refused() {
        let frame = Frame::new(
            4242,
            Hello {
                protocol_version: crate::PROTOCOL_VERSION,
                auth: None,
                user_agent: "MARKER".into(),
            },
        );
        let mut bytes = frame.encode().unwrap().to_vec();
        assert_eq!(FrameView::req_of(&bytes), Some(4242));
        let at = bytes.windows(6).position(|w| w == b"MARKER").unwrap();
        bytes[at] = 0xff;
        assert!(FrameView::parse(&bytes).is_err());
        assert_eq!(FrameView::req_of(&bytes), Some(4242));
    }

    #[test]
    fn req_of_never_panics_on_truncated_or_mutated_bytes() {
        let bytes = Frame::new(7, crate::frame::Ping { nonce: 9 })
            .encode()
            .unwrap();
        for len in 0..bytes.len() {
            let _ = FrameView::req_of(&bytes[..len]);
        }
        for at in 0..bytes.len() {
            for value in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = bytes.to_vec();
                b[at] = value;
                let _ = FrameView::req_of(&b);
            }
        }
    }
}
