//! `FrameView::parse` on arbitrary bytes: never panics, and every accessor of an accepted view
//! works (the typed views read straight out of the buffer).

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringpost_wire::view::FrameView;

fuzz_target!(|data: &[u8]| {
    let Ok(view) = FrameView::parse(data) else {
        return;
    };
    let _ = (view.req(), view.kind().name(), view.kind().direction());
    if let Some(send) = view.send() {
        let mut bytes = 0usize;
        for (_user, _device, body) in send.ciphertexts() {
            bytes += body.len();
        }
        assert!(bytes <= data.len());
        let _ = (send.msg_id(), send.to());
    }
    if let Some(ack) = view.deliver_ack() {
        assert!(ack.seqs().count() <= ringpost_wire::limits::ACK_SEQS_MAX);
    }
    if let Some(receipt) = view.receipt() {
        let _ = (receipt.msg_id(), receipt.to(), receipt.kind());
        assert!(receipt.msg_ids().count() <= ringpost_wire::limits::RECEIPT_MSG_IDS_MAX);
    }
    let _ = (view.typing(), view.ping());
    let owned = view.to_owned_frame().expect("a parsed view converts");
    assert_eq!(owned.body.kind(), view.kind());
    assert_eq!(owned.req, view.req());
});
