//! FrameView: the zero-copy path agrees with the owned decoder on every frame.

use crate::frames;

use proptest::prelude::*;
use ringpost_wire::view::FrameView;
use ringpost_wire::*;

fn check_agreement(frame: &Frame) -> Result<(), TestCaseError> {
    let bytes = frame
        .encode()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let view = FrameView::parse(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(view.req(), frame.req);
    prop_assert_eq!(view.kind(), frame.body.kind());
    prop_assert_eq!(&view.to_owned_frame().unwrap(), frame);

    // Exactly one typed view is present, and only for its own frame type.
    prop_assert_eq!(view.send().is_some(), matches!(frame.body, Body::Send(_)));
    prop_assert_eq!(
        view.deliver_ack().is_some(),
        matches!(frame.body, Body::DeliverAck(_))
    );
    prop_assert_eq!(
        view.receipt().is_some(),
        matches!(frame.body, Body::Receipt(_))
    );
    prop_assert_eq!(
        view.typing().is_some(),
        matches!(frame.body, Body::Typing(_))
    );
    prop_assert_eq!(view.ping().is_some(), matches!(frame.body, Body::Ping(_)));

    match &frame.body {
        Body::Send(send) => {
            let v = view.send().unwrap();
            prop_assert_eq!(v.msg_id(), &send.msg_id);
            prop_assert_eq!(v.to(), send.to);
            prop_assert_eq!(v.ciphertexts().len(), send.ciphertexts.len());
            let seen: Vec<_> = v.ciphertexts().collect();
            let want: Vec<_> = send
                .ciphertexts
                .iter()
                .map(|c| (c.user, c.device, &c.body[..]))
                .collect();
            prop_assert_eq!(seen, want);
        }
        Body::DeliverAck(ack) => {
            let v = view.deliver_ack().unwrap();
            prop_assert_eq!(v.seqs().len(), ack.seqs.len());
            prop_assert_eq!(v.seqs().collect::<Vec<_>>(), ack.seqs.clone());
        }
        Body::Receipt(receipt) => {
            let v = view.receipt().unwrap();
            prop_assert_eq!(v.msg_id(), &receipt.msg_id);
            prop_assert_eq!(v.to(), receipt.to);
            prop_assert_eq!(v.kind(), receipt.kind);
            prop_assert_eq!(v.msg_ids().len(), receipt.msg_ids.len());
            prop_assert_eq!(
                v.msg_ids().copied().collect::<Vec<_>>(),
                receipt.msg_ids.clone()
            );
        }
        Body::Typing(typing) => prop_assert_eq!(&view.typing().unwrap(), typing),
        Body::Ping(ping) => prop_assert_eq!(&view.ping().unwrap(), ping),
        _ => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn view_agrees_with_owned_decode(frame in frames::frame()) {
        check_agreement(&frame)?;
    }

    /// The hot-path types get extra cases of their own.
    #[test]
    fn hot_path_views_agree(
        frame in prop_oneof![
            frames::frame_of(FrameKind::Send),
            frames::frame_of(FrameKind::DeliverAck),
            frames::frame_of(FrameKind::Receipt),
            frames::frame_of(FrameKind::Typing),
            frames::frame_of(FrameKind::Ping),
        ]
    ) {
        check_agreement(&frame)?;
    }
}

#[test]
fn send_view_borrows_the_ciphertexts() {
    let frame = Frame::new(
        9,
        Send {
            msg_id: [4; 16],
            to: 77,
            ciphertexts: vec![
                DeviceCiphertext {
                    user: 77,
                    device: 1,
                    body: vec![1, 2, 3].into(),
                },
                DeviceCiphertext {
                    user: 77,
                    device: 2,
                    body: bytes::Bytes::new(),
                },
            ],
        },
    );
    let bytes = frame.encode().unwrap();
    let view = FrameView::parse(&bytes).unwrap();
    let send = view.send().unwrap();
    let range = bytes.as_ptr() as usize..bytes.as_ptr() as usize + bytes.len();
    let (user, device, body) = send.ciphertexts().next().unwrap();
    assert_eq!((user, device, body), (77, 1, &[1u8, 2, 3][..]));
    assert!(
        range.contains(&(body.as_ptr() as usize)),
        "the body was copied"
    );
    assert!(
        range.contains(&(send.msg_id().as_ptr() as usize)),
        "the msg_id was copied"
    );
    assert_eq!(send.ciphertexts().nth(1), Some((77, 2, &[][..])));
    assert_eq!(format!("{view:?}"), "FrameView { req: 9, kind: Send }");
}

#[test]
fn frame_kind_names_and_directions() {
    assert_eq!(FrameKind::DeliverAck.name(), "DeliverAck");
    assert_eq!(FrameKind::DeliverAck.to_string(), "DeliverAck");
    assert_eq!(Body::from(Ping { nonce: 1 }).name(), "Ping");
    assert_eq!(FrameKind::Typing.direction(), Direction::Both);
    assert_eq!(FrameKind::Send.direction(), Direction::ToServer);
    assert_eq!(FrameKind::Deliver.direction(), Direction::ToClient);
    for &kind in FrameKind::ALL {
        assert_eq!(FrameKind::from_tag(kind.tag()), Some(kind));
    }
    assert_eq!(FrameKind::from_tag(0), None);
    let past_the_last = u8::try_from(FrameKind::ALL.len() + 1).unwrap();
    assert_eq!(FrameKind::from_tag(past_the_last), None);
}
