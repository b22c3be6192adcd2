//! `Frame::decode` on arbitrary bytes: never panics, agrees with the zero-copy path, and
//! whatever it accepts passes the sender's bounds too.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use ringpost_wire::view::FrameView;
use ringpost_wire::{EncodeError, Frame};

fuzz_target!(|data: &[u8]| {
    let decoded = Frame::decode(data);
    let shared = Frame::decode_bytes(&Bytes::copy_from_slice(data));
    assert_eq!(decoded, shared, "decode and decode_bytes disagree");
    let viewed = FrameView::parse(data).and_then(|v| v.to_owned_frame());
    assert_eq!(decoded, viewed, "decode and the view disagree");

    match decoded {
        Ok(frame) => match frame.encode() {
            // Sharing one table between two offsets can make the re-encoding bigger than the
            // input; every other refusal would mean the two sides disagree on a bound.
            Ok(bytes) => assert_eq!(Frame::decode(&bytes).as_ref(), Ok(&frame)),
            Err(EncodeError::FrameTooLarge { .. }) => {}
            Err(e) => panic!("decoded {frame:?} but encoding it fails: {e}"),
        },
        Err(e) => {
            let _ = e.code();
            let _ = e.to_string();
        }
    }
});
