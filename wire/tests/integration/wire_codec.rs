//! Frame::encode / Frame::decode: round trips for every frame type, every bound enforced on both
//! sides, and every kind of bad input answered with the right error and never a panic.

use crate::frames;

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use ringpost_wire::codec::{FieldBound, BOUNDS};
use ringpost_wire::generated as fb;
use ringpost_wire::limits::*;
use ringpost_wire::view::FrameView;
use ringpost_wire::*;

/// Cases per frame type in the round-trip test.
const ROUND_TRIP_CASES_PER_KIND: u32 = 64;

#[test]
fn every_frame_type_round_trips() {
    for &kind in FrameKind::ALL {
        let mut runner = TestRunner::new(Config::with_cases(ROUND_TRIP_CASES_PER_KIND));
        runner
            .run(&frames::frame_of(kind), |frame| {
                let bytes = frame
                    .encode()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(bytes.len() <= FRAME_BYTES_MAX);
                prop_assert_eq!(&Frame::decode(&bytes).unwrap(), &frame);
                prop_assert_eq!(&Frame::decode_bytes(&bytes).unwrap(), &frame);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
    }
}

#[test]
fn decode_bytes_shares_the_buffer() {
    let body = Bytes::from(vec![7u8; 1000]);
    let frame = Frame::new(
        1,
        Send {
            msg_id: [1; 16],
            to: 2,
            ciphertexts: vec![DeviceCiphertext {
                user: 2,
                device: 1,
                body: body.clone(),
            }],
        },
    );
    let bytes = frame.encode().unwrap();
    let Body::Send(send) = Frame::decode_bytes(&bytes).unwrap().body else {
        panic!("not a Send")
    };
    let shared = &send.ciphertexts[0].body;
    assert_eq!(shared, &body);
    let range = bytes.as_ptr() as usize..bytes.as_ptr() as usize + bytes.len();
    assert!(
        range.contains(&(shared.as_ptr() as usize)),
        "the ciphertext was copied"
    );
}

#[test]
fn encoding_is_deterministic_and_small() {
    let ping = Frame::new(3, Ping { nonce: 9 });
    let a = ping.encode().unwrap();
    // A refused oversize frame in between must not disturb the reused builder.
    let huge = Frame::new(
        1,
        Send {
            msg_id: [0; 16],
            to: 1,
            ciphertexts: vec![
                DeviceCiphertext {
                    user: 1,
                    device: 1,
                    body: Bytes::from(vec![0; CIPHERTEXT_BYTES_MAX]),
                };
                SEND_CIPHERTEXTS_MAX
            ],
        },
    );
    assert!(matches!(
        huge.encode(),
        Err(EncodeError::FrameTooLarge { .. })
    ));
    assert_eq!(ping.encode().unwrap(), a);
    assert!(a.len() <= 56, "a Ping takes {} bytes", a.len());
}

#[test]
fn encode_refuses_a_frame_over_the_frame_bound() {
    let frame = Frame::new(
        1,
        Send {
            msg_id: [0; 16],
            to: 1,
            ciphertexts: vec![
                DeviceCiphertext {
                    user: 1,
                    device: 1,
                    body: Bytes::from(vec![0; CIPHERTEXT_BYTES_MAX]),
                };
                2
            ],
        },
    );
    match frame.encode() {
        Err(EncodeError::FrameTooLarge { len, max }) => {
            assert!(len > FRAME_BYTES_MAX);
            assert_eq!(max, FRAME_BYTES_MAX);
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    // The receiving side refuses the same frame by its size alone.
    let bytes = frame.encode_unchecked();
    assert_eq!(
        Frame::decode(&bytes),
        Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: FRAME_BYTES_MAX
        })
    );
}

/// The largest legal instance of each table-heavy frame type decodes: the verifier's own bounds
/// (tables, depth, apparent size) leave room for every legal frame.
#[test]
fn maximal_legal_frames_decode() {
    let key = Bytes::from(vec![1; KEY_BYTES_MAX]);
    let signed = SignedPrekey {
        id: 1,
        key: key.clone(),
        signature: Bytes::from(vec![2; SIGNATURE_BYTES_MAX]),
    };
    let one_time = OneTimePrekey {
        id: 2,
        key: key.clone(),
        signature: Bytes::from(vec![3; SIGNATURE_BYTES_MAX]),
    };
    let users = |n: usize| (0..n as u64).collect::<Vec<_>>();
    let bodies: Vec<Body> = vec![
        Body::PrekeyUpload(PrekeyUpload {
            identity_key: key.clone(),
            signed_prekey: Some(signed.clone()),
            one_time: vec![one_time.clone(); PREKEYS_PER_UPLOAD_MAX],
        }),
        Body::PrekeyBundle(PrekeyBundle {
            user: 1,
            devices: vec![
                DeviceBundle {
                    device: 1,
                    identity_key: key.clone(),
                    signed_prekey: Some(signed),
                    one_time: Some(one_time),
                };
                DEVICES_PER_USER_MAX
            ],
        }),
        Body::SendAck(SendAck {
            msg_id: [3; 16],
            status: SendStatus::MismatchedDevices,
            server_time_ms: 1,
            mismatched: vec![
                MismatchedDevices {
                    user: 1,
                    missing: vec![1; DEVICES_PER_USER_MAX],
                    extra: vec![2; SEND_CIPHERTEXTS_MAX],
                };
                SEND_CIPHERTEXTS_MAX
            ],
            full_devices: vec![DeviceCiphertextRef { user: 1, device: 2 }; SEND_CIPHERTEXTS_MAX],
            group_seq: u64::MAX,
        }),
        Body::GroupInfo(GroupInfo {
            group: [4; 16],
            version: 1,
            members: users(GROUP_MEMBERS_MAX),
            admins: users(GROUP_MEMBERS_MAX),
            meta: Bytes::from(vec![5; GROUP_META_BYTES_MAX]),
            send: GroupPermission::Admins,
            edit: GroupPermission::Members,
            invite_code: Bytes::from(vec![9; 16]),
        }),
        Body::GroupUpdate(GroupUpdate {
            group: [4; 16],
            add: users(GROUP_MEMBERS_MAX),
            remove: users(GROUP_MEMBERS_MAX),
            promote: users(GROUP_MEMBERS_MAX),
            demote: users(GROUP_MEMBERS_MAX),
            meta: Bytes::from(vec![5; GROUP_META_BYTES_MAX]),
            leave: false,
            send: GroupPermission::Admins,
            edit: GroupPermission::Members,
            invite: GroupInvite::Create,
            join_code: Bytes::new(),
        }),
        Body::Deliver(Deliver {
            seq: 1,
            kind: DeliverKind::Message,
            from_user: 1,
            from_device: 1,
            msg_id: [6; 16],
            server_time_ms: 1,
            body: Bytes::from(vec![7; CIPHERTEXT_BYTES_MAX]),
            receipt_msg_ids: vec![[8; 16]; RECEIPT_MSG_IDS_MAX],
            group: None,
            group_seq: 0,
        }),
        Body::Send(Send {
            msg_id: [9; 16],
            to: 1,
            ciphertexts: vec![
                DeviceCiphertext {
                    user: 1,
                    device: 1,
                    body: Bytes::from(vec![0; frames::SEND_BODY_BYTES_MAX]),
                };
                SEND_CIPHERTEXTS_MAX
            ],
        }),
        Body::ContactsUpdate(ContactsUpdate {
            add: users(PRIVACY_CONTACTS_MAX),
            ..Default::default()
        }),
    ];
    for body in bodies {
        let frame = Frame::new(u32::MAX, body);
        let bytes = frame
            .encode()
            .unwrap_or_else(|e| panic!("{}: {e}", frame.body.name()));
        assert_eq!(
            Frame::decode(&bytes).as_ref(),
            Ok(&frame),
            "{}",
            frame.body.name()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Every bound, on both sides
// ---------------------------------------------------------------------------------------------

fn blob(len: usize) -> Bytes {
    Bytes::from(vec![0xA5; len])
}

fn text(len: usize) -> String {
    "x".repeat(len)
}

fn ids(len: usize) -> Vec<u64> {
    (0..len as u64).collect()
}

/// A frame whose bounded `field` has length `len` and is otherwise minimal.
fn frame_with(field: &str, len: usize) -> Frame {
    let token = Bytes::from(vec![1; TOKEN_BYTES]);
    let hello = |auth_token: Bytes, user_agent: String| {
        Body::Hello(Hello {
            protocol_version: 1,
            auth: Some(Auth {
                user: 1,
                device: 1,
                token: auth_token,
            }),
            user_agent,
        })
    };
    let redirect = |ws_url: String, quic_addr: String| {
        Body::Redirect(Redirect {
            user: 1,
            epoch: 1,
            ws_url,
            quic_addr,
        })
    };
    let migrate = |ws_url: String, quic_addr: String, reconnect_after_ms: u32| {
        Body::Migrate(Migrate {
            user: 1,
            epoch: 1,
            ws_url,
            quic_addr,
            reconnect_after_ms,
        })
    };
    let register_verify = |code: String, pin: String, device_name: String| {
        Body::RegisterVerify(RegisterVerify {
            phone: 1,
            code,
            pin,
            device_name,
        })
    };
    let link_device = |code: String, device_name: String| {
        Body::LinkDevice(LinkDevice {
            user: 1,
            code,
            device_name,
        })
    };
    let send = |n: usize, body_len: usize| {
        Body::Send(Send {
            msg_id: [1; 16],
            to: 2,
            ciphertexts: vec![
                DeviceCiphertext {
                    user: 2,
                    device: 1,
                    body: blob(body_len)
                };
                n
            ],
        })
    };
    let send_ack = |n: usize, missing: usize, extra: usize, full: usize| {
        Body::SendAck(SendAck {
            msg_id: [1; 16],
            status: SendStatus::MismatchedDevices,
            server_time_ms: 1,
            mismatched: vec![
                MismatchedDevices {
                    user: 1,
                    missing: vec![1; missing],
                    extra: vec![2; extra]
                };
                n
            ],
            full_devices: vec![DeviceCiphertextRef { user: 1, device: 1 }; full],
            group_seq: u64::MAX,
        })
    };
    let deliver = |body_len: usize, receipts: usize| {
        Body::Deliver(Deliver {
            seq: 1,
            kind: DeliverKind::Read,
            from_user: 1,
            from_device: 1,
            msg_id: [1; 16],
            server_time_ms: 1,
            body: blob(body_len),
            receipt_msg_ids: vec![[2; 16]; receipts],
            group: None,
            group_seq: 0,
        })
    };
    let signed = |key: usize, signature: usize| SignedPrekey {
        id: 1,
        key: blob(key),
        signature: blob(signature),
    };
    let one_time = |key: usize, signature: usize| OneTimePrekey {
        id: 1,
        key: blob(key),
        signature: blob(signature),
    };
    let upload = |identity: usize, signed: SignedPrekey, one_time: Vec<OneTimePrekey>| {
        Body::PrekeyUpload(PrekeyUpload {
            identity_key: blob(identity),
            signed_prekey: Some(signed),
            one_time,
        })
    };
    let bundle = |n: usize, identity: usize| {
        Body::PrekeyBundle(PrekeyBundle {
            user: 1,
            devices: vec![
                DeviceBundle {
                    device: 1,
                    identity_key: blob(identity),
                    signed_prekey: None,
                    one_time: None
                };
                n
            ],
        })
    };
    let update = |lists: [usize; 4], meta: usize| {
        Body::GroupUpdate(GroupUpdate {
            group: [1; 16],
            add: ids(lists[0]),
            remove: ids(lists[1]),
            promote: ids(lists[2]),
            demote: ids(lists[3]),
            meta: blob(meta),
            leave: false,
            send: GroupPermission::Admins,
            edit: GroupPermission::Members,
            invite: GroupInvite::Create,
            join_code: Bytes::new(),
        })
    };
    let info = |members: usize, admins: usize, meta: usize| {
        Body::GroupInfo(GroupInfo {
            group: [1; 16],
            version: 1,
            members: ids(members),
            admins: ids(admins),
            meta: blob(meta),
            send: GroupPermission::Admins,
            edit: GroupPermission::Members,
            invite_code: Bytes::from(vec![9; 16]),
        })
    };
    let media_request = |size: u64, sha256: Bytes, content_type: String| {
        Body::MediaUploadRequest(MediaUploadRequest {
            size,
            sha256,
            content_type,
        })
    };
    let grant = |media_id: String, upload_url: String, download_url: String| {
        Body::MediaUploadGrant(MediaUploadGrant {
            media_id,
            upload_url,
            download_url,
            expires_at_ms: 1,
        })
    };
    let body = match field {
        "Auth.token" => hello(blob(len), String::new()),
        "Hello.user_agent" => hello(token, text(len)),
        "Redirect.ws_url" => redirect(text(len), String::new()),
        "Redirect.quic_addr" => redirect(String::new(), text(len)),
        "RegisterVerify.code" => register_verify(text(len), String::new(), String::new()),
        "RegisterVerify.pin" => register_verify(String::new(), text(len), String::new()),
        "RegisterVerify.device_name" => register_verify(String::new(), String::new(), text(len)),
        "Registered.token" => Body::Registered(Registered {
            user: 1,
            device: 1,
            token: blob(len),
        }),
        "LinkCode.code" => Body::LinkCode(LinkCode {
            code: text(len),
            expires_in_ms: 1,
        }),
        "LinkDevice.code" => link_device(text(len), String::new()),
        "LinkDevice.device_name" => link_device(String::new(), text(len)),
        "SetRegistrationLock.pin" => {
            Body::SetRegistrationLock(SetRegistrationLock { pin: text(len) })
        }
        "DeviceList.devices" => Body::DeviceList(DeviceList {
            user: 1,
            devices: vec![1; len],
        }),
        "Send.ciphertexts" => send(len, 1),
        "DeviceCiphertext.body" => send(1, len),
        "SendAck.mismatched" => send_ack(len, 0, 0, 0),
        "MismatchedDevices.missing" => send_ack(1, len, 0, 0),
        "MismatchedDevices.extra" => send_ack(1, 0, len, 0),
        "SendAck.full_devices" => send_ack(0, 0, 0, len),
        "Deliver.body" => deliver(len, 0),
        "Deliver.receipt_msg_ids" => deliver(0, len),
        "DeliverAck.seqs" => Body::DeliverAck(DeliverAck { seqs: ids(len) }),
        "Receipt.msg_ids" => Body::Receipt(Receipt {
            msg_id: [1; 16],
            to: 1,
            kind: ReceiptKind::Read,
            msg_ids: vec![[3; 16]; len],
        }),
        "PresenceSubscribe.users" => Body::PresenceSubscribe(PresenceSubscribe { users: ids(len) }),
        "ContactsUpdate.add" => Body::ContactsUpdate(ContactsUpdate {
            add: ids(len),
            ..Default::default()
        }),
        "ContactsUpdate.remove" => Body::ContactsUpdate(ContactsUpdate {
            remove: ids(len),
            ..Default::default()
        }),
        "ContactsUpdate.block" => Body::ContactsUpdate(ContactsUpdate {
            block: ids(len),
            ..Default::default()
        }),
        "ContactsUpdate.unblock" => Body::ContactsUpdate(ContactsUpdate {
            unblock: ids(len),
            ..Default::default()
        }),
        "SignedPrekey.key" => upload(1, signed(len, 1), vec![]),
        "SignedPrekey.signature" => upload(1, signed(1, len), vec![]),
        "OneTimePrekey.key" => upload(1, signed(1, 1), vec![one_time(len, 1)]),
        "OneTimePrekey.signature" => upload(1, signed(1, 1), vec![one_time(1, len)]),
        "PrekeyUpload.identity_key" => upload(len, signed(1, 1), vec![]),
        "PrekeyUpload.one_time" => upload(1, signed(1, 1), vec![one_time(1, 1); len]),
        "DeviceBundle.identity_key" => bundle(1, len),
        "PrekeyBundle.devices" => bundle(len, 1),
        "GroupCreate.members" => Body::GroupCreate(GroupCreate {
            members: ids(len),
            meta: Bytes::new(),
        }),
        "GroupCreate.meta" => Body::GroupCreate(GroupCreate {
            members: vec![],
            meta: blob(len),
        }),
        "GroupUpdate.add" => update([len, 0, 0, 0], 0),
        "GroupUpdate.remove" => update([0, len, 0, 0], 0),
        "GroupUpdate.promote" => update([0, 0, len, 0], 0),
        "GroupUpdate.demote" => update([0, 0, 0, len], 0),
        "GroupUpdate.meta" => update([0; 4], len),
        "GroupInfo.members" => info(len, 0, 0),
        "GroupInfo.admins" => info(0, len, 0),
        "GroupInfo.meta" => info(0, 0, len),
        "GroupInfo.invite_code" => Body::GroupInfo(GroupInfo {
            invite_code: blob(len),
            ..group_info()
        }),
        "GroupUpdate.join_code" => Body::GroupUpdate(GroupUpdate {
            join_code: blob(len),
            ..GroupUpdate::new([1; 16])
        }),
        "BroadcastSend.ciphertexts" => Body::BroadcastSend(BroadcastSend {
            msg_id: [1; 16],
            ciphertexts: (0..len)
                .map(|i| DeviceCiphertext {
                    user: i as u64,
                    device: 1,
                    body: Bytes::new(),
                })
                .collect(),
        }),
        "StatusPost.users" => Body::StatusPost(StatusPost {
            msg_id: [1; 16],
            audience: StatusAudience::OnlyShareWith,
            users: ids(len),
            body: Bytes::new(),
        }),
        "StatusPost.body" => Body::StatusPost(StatusPost {
            msg_id: [1; 16],
            audience: StatusAudience::Contacts,
            users: vec![],
            body: blob(len),
        }),
        "PushRegister.token" => Body::PushRegister(PushRegister {
            provider: PushProvider::Apns,
            token: text(len),
        }),
        "BroadcastAck.results" => broadcast_ack(len, 0),
        "BroadcastResult.missing" => broadcast_ack(1, len),
        "BroadcastResult.extra" => Body::BroadcastAck(BroadcastAck {
            results: vec![BroadcastResult {
                extra: vec![2; len],
                ..broadcast_result()
            }],
            ..ack_of(vec![])
        }),
        "BroadcastResult.full_devices" => Body::BroadcastAck(BroadcastAck {
            results: vec![BroadcastResult {
                full_devices: vec![2; len],
                ..broadcast_result()
            }],
            ..ack_of(vec![])
        }),
        "GroupSend.body" => Body::GroupSend(GroupSend {
            group: [1; 16],
            msg_id: [2; 16],
            body: blob(len),
        }),
        "GroupEvent.added" => Body::GroupEvent(GroupEvent {
            added: ids(len),
            ..Default::default()
        }),
        "GroupEvent.removed" => Body::GroupEvent(GroupEvent {
            removed: ids(len),
            ..Default::default()
        }),
        "GroupEvent.promoted" => Body::GroupEvent(GroupEvent {
            promoted: ids(len),
            ..Default::default()
        }),
        "GroupEvent.demoted" => Body::GroupEvent(GroupEvent {
            demoted: ids(len),
            ..Default::default()
        }),
        "MediaUploadRequest.size" => media_request(len as u64, blob(32), String::new()),
        "MediaUploadRequest.sha256" => media_request(1, blob(len), String::new()),
        "MediaUploadRequest.content_type" => media_request(1, blob(32), text(len)),
        "MediaUploadGrant.media_id" => grant(text(len), String::new(), String::new()),
        "MediaUploadGrant.upload_url" => grant(String::new(), text(len), String::new()),
        "MediaUploadGrant.download_url" => grant(String::new(), String::new(), text(len)),
        "Error.message" => Body::Error(Error {
            code: ErrorCode::Internal.as_u16(),
            message: text(len),
            retry_after_ms: 0,
            fatal: false,
        }),
        "GoingAway.reason" => Body::GoingAway(GoingAway {
            reconnect_after_ms: 1,
            reason: text(len),
        }),
        "Migrate.ws_url" => migrate(text(len), String::new(), 0),
        "Migrate.quic_addr" => migrate(String::new(), text(len), 0),
        "Migrate.reconnect_after_ms" => migrate(
            String::new(),
            String::new(),
            u32::try_from(len).expect("the bound fits a u32"),
        ),
        other => panic!("no test frame for bounded field {other}: add one"),
    };
    Frame::new(5, body)
}

fn group_info() -> GroupInfo {
    GroupInfo {
        group: [1; 16],
        version: 1,
        members: vec![],
        admins: vec![],
        meta: Bytes::new(),
        send: GroupPermission::Members,
        edit: GroupPermission::Members,
        invite_code: Bytes::new(),
    }
}

/// For every bound: a frame at the bound passes both sides; one past it (and, for exact
/// lengths, one short of it) is refused by the sender and, built without checks, by the
/// receiver, with the same field and numbers.
#[test]
fn every_bound_is_enforced_on_both_sides() {
    assert!(BOUNDS.len() >= 48, "BOUNDS lost entries: {}", BOUNDS.len());
    for &FieldBound {
        field,
        limit: bound,
        exact,
    } in BOUNDS
    {
        let ok = frame_with(field, bound);
        let bytes = ok
            .encode()
            .unwrap_or_else(|e| panic!("{field} at its bound: {e}"));
        assert_eq!(
            Frame::decode(&bytes).as_ref(),
            Ok(&ok),
            "{field} at its bound"
        );

        let mut bad_lens = vec![bound + 1];
        if exact {
            bad_lens.push(bound - 1);
            bad_lens.push(0);
        }
        for len in bad_lens {
            let bad = frame_with(field, len);
            let (encode_err, decode_err) = if exact {
                (
                    EncodeError::WrongLength {
                        field,
                        len,
                        expected: bound,
                    },
                    DecodeError::WrongLength {
                        field,
                        len,
                        expected: bound,
                    },
                )
            } else {
                (
                    EncodeError::LimitExceeded {
                        field,
                        len,
                        max: bound,
                    },
                    DecodeError::LimitExceeded {
                        field,
                        len,
                        max: bound,
                    },
                )
            };
            assert_eq!(
                bad.encode(),
                Err(encode_err.clone()),
                "{field} = {len}: encode"
            );
            let unchecked = bad.encode_unchecked();
            assert_eq!(
                Frame::decode(&unchecked),
                Err(decode_err.clone()),
                "{field} = {len}"
            );
            assert_eq!(
                FrameView::parse(&unchecked).err(),
                Some(decode_err.clone()),
                "{field} = {len}: view"
            );
            assert_eq!(encode_err.code(), decode_err.code(), "{field}: codes");
            assert_eq!(
                FrameView::req_of(&unchecked),
                Some(bad.req),
                "{field}: req_of"
            );
        }
    }
}

#[test]
fn bounds_are_named_once() {
    let mut fields: Vec<&str> = BOUNDS.iter().map(|b| b.field).collect();
    fields.sort_unstable();
    let before = fields.len();
    fields.dedup();
    assert_eq!(before, fields.len(), "a field appears twice in BOUNDS");
}

// ---------------------------------------------------------------------------------------------
// Bad input: the right error, never a panic
// ---------------------------------------------------------------------------------------------

/// Builds a frame by hand with the generated builders: `body` builds the body table.
fn raw_frame(
    version: u16,
    tag: u8,
    body: impl FnOnce(
        &mut FlatBufferBuilder<'static>,
    ) -> Option<flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>>,
) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let body = body(&mut fbb);
    let root = fb::Frame::create(
        &mut fbb,
        &fb::FrameArgs {
            version,
            req: 1,
            body_type: fb::Body(tag),
            body,
        },
    );
    fbb.finish_minimal(root);
    fbb.finished_data().to_vec()
}

fn ping_table(
    fbb: &mut FlatBufferBuilder<'static>,
) -> Option<flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>> {
    Some(fb::Ping::create(fbb, &fb::PingArgs { nonce: 1 }).as_union_value())
}

#[test]
fn raw_frame_helper_builds_valid_frames() {
    let bytes = raw_frame(PROTOCOL_VERSION, fb::Body::Ping.0, ping_table);
    assert_eq!(Frame::decode(&bytes), Ok(Frame::new(1, Ping { nonce: 1 })));
}

#[test]
fn empty_input_is_empty() {
    assert_eq!(Frame::decode(&[]), Err(DecodeError::Empty));
    assert_eq!(FrameView::req_of(&[]), None);
    assert_eq!(DecodeError::Empty.code(), ErrorCode::Malformed);
}

#[test]
fn oversize_input_is_too_large_before_anything_else() {
    for len in [FRAME_BYTES_MAX + 1, 4 * FRAME_BYTES_MAX] {
        let buf = vec![0u8; len];
        let err = Frame::decode(&buf).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLarge {
                len,
                max: FRAME_BYTES_MAX
            }
        );
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    }
}

#[test]
fn wrong_frame_version_is_unsupported() {
    for version in [0, 2, u16::MAX] {
        let bytes = raw_frame(version, fb::Body::Ping.0, ping_table);
        let err = Frame::decode(&bytes).unwrap_err();
        assert_eq!(err, DecodeError::UnsupportedVersion { got: version });
        assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
    }
}

#[test]
fn unknown_union_tag_is_unknown_frame_type() {
    for tag in [fb::Body::ENUM_MAX + 1, 200, u8::MAX] {
        let bytes = raw_frame(PROTOCOL_VERSION, tag, ping_table);
        let err = Frame::decode(&bytes).unwrap_err();
        assert_eq!(err, DecodeError::UnknownFrameType { tag });
        assert_eq!(err.code(), ErrorCode::UnknownFrameType);
        assert_eq!(FrameView::req_of(&bytes), Some(1));
        assert_eq!(FrameView::parse(&bytes).err(), Some(err));
    }
}

#[test]
fn missing_or_inconsistent_body_is_refused() {
    let none = raw_frame(PROTOCOL_VERSION, fb::Body::NONE.0, |_| None);
    assert_eq!(
        Frame::decode(&none),
        Err(DecodeError::MissingField("Frame.body"))
    );
    // A tag without its table is a broken union: the verifier refuses it.
    let tag_only = raw_frame(PROTOCOL_VERSION, fb::Body::Ping.0, |_| None);
    assert!(matches!(
        Frame::decode(&tag_only),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn missing_ids_are_missing_fields() {
    type Build =
        fn(&mut FlatBufferBuilder<'static>) -> flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>;
    let cases: [(fb::Body, &str, Build); 8] = [
        (fb::Body::Send, "Send.msg_id", |f| {
            fb::Send::create(f, &fb::SendArgs::default()).as_union_value()
        }),
        (fb::Body::SendAck, "SendAck.msg_id", |f| {
            fb::SendAck::create(f, &fb::SendAckArgs::default()).as_union_value()
        }),
        (fb::Body::Deliver, "Deliver.msg_id", |f| {
            fb::Deliver::create(f, &fb::DeliverArgs::default()).as_union_value()
        }),
        (fb::Body::Receipt, "Receipt.msg_id", |f| {
            fb::Receipt::create(f, &fb::ReceiptArgs::default()).as_union_value()
        }),
        (fb::Body::GroupUpdate, "GroupUpdate.group", |f| {
            fb::GroupUpdate::create(f, &fb::GroupUpdateArgs::default()).as_union_value()
        }),
        (fb::Body::GroupInfoRequest, "GroupInfoRequest.group", |f| {
            fb::GroupInfoRequest::create(f, &fb::GroupInfoRequestArgs::default()).as_union_value()
        }),
        (fb::Body::GroupInfo, "GroupInfo.group", |f| {
            fb::GroupInfo::create(f, &fb::GroupInfoArgs::default()).as_union_value()
        }),
        (fb::Body::GroupReceipt, "GroupReceipt.group", |f| {
            fb::GroupReceipt::create(f, &fb::GroupReceiptArgs::default()).as_union_value()
        }),
    ];
    for (tag, field, build) in cases {
        let bytes = raw_frame(PROTOCOL_VERSION, tag.0, |f| Some(build(f)));
        let err = Frame::decode(&bytes).unwrap_err();
        assert_eq!(err, DecodeError::MissingField(field));
        assert_eq!(err.code(), ErrorCode::Malformed);
        assert_eq!(FrameView::parse(&bytes).err(), Some(err), "{field}: view");
    }
}

#[test]
fn unknown_enum_values_are_refused() {
    let id = fb::MsgId([1; 16]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "RegisterRequest.channel",
            raw_frame(PROTOCOL_VERSION, fb::Body::RegisterRequest.0, |f| {
                let args = fb::RegisterRequestArgs {
                    phone: 1,
                    channel: fb::CodeChannel(9),
                };
                Some(fb::RegisterRequest::create(f, &args).as_union_value())
            }),
        ),
        (
            "PushRegister.provider",
            raw_frame(PROTOCOL_VERSION, fb::Body::PushRegister.0, |f| {
                let args = fb::PushRegisterArgs {
                    provider: fb::PushProvider(9),
                    token: None,
                };
                Some(fb::PushRegister::create(f, &args).as_union_value())
            }),
        ),
        (
            "SendAck.status",
            raw_frame(PROTOCOL_VERSION, fb::Body::SendAck.0, |f| {
                let args = fb::SendAckArgs {
                    msg_id: Some(&id),
                    status: fb::SendStatus(9),
                    ..Default::default()
                };
                Some(fb::SendAck::create(f, &args).as_union_value())
            }),
        ),
        (
            "Deliver.kind",
            raw_frame(PROTOCOL_VERSION, fb::Body::Deliver.0, |f| {
                let args = fb::DeliverArgs {
                    msg_id: Some(&id),
                    kind: fb::DeliverKind(9),
                    ..Default::default()
                };
                Some(fb::Deliver::create(f, &args).as_union_value())
            }),
        ),
        (
            "Receipt.kind",
            raw_frame(PROTOCOL_VERSION, fb::Body::Receipt.0, |f| {
                let args = fb::ReceiptArgs {
                    msg_id: Some(&id),
                    kind: fb::ReceiptKind(9),
                    ..Default::default()
                };
                Some(fb::Receipt::create(f, &args).as_union_value())
            }),
        ),
        (
            "SetPrivacy.last_seen",
            raw_frame(PROTOCOL_VERSION, fb::Body::SetPrivacy.0, |f| {
                let args = fb::SetPrivacyArgs {
                    last_seen: fb::Visibility(9),
                    ..Default::default()
                };
                Some(fb::SetPrivacy::create(f, &args).as_union_value())
            }),
        ),
    ];
    for (field, bytes) in cases {
        let err = Frame::decode(&bytes).unwrap_err();
        assert_eq!(err, DecodeError::UnknownEnumValue { field, value: 9 });
        assert_eq!(err.code(), ErrorCode::Malformed);
        assert_eq!(FrameView::parse(&bytes).err(), Some(err), "{field}: view");
    }
}

/// Ten ciphertext slots all pointing at one 60 KiB table: each bound holds and the frame is
/// small, but expanding it would copy 600 KiB. The verifier's apparent-size bound refuses it.
#[test]
fn shared_offsets_cannot_amplify_a_frame() {
    let id = fb::MsgId([1; 16]);
    let bytes = raw_frame(PROTOCOL_VERSION, fb::Body::Send.0, |f| {
        let body = f.create_vector(&vec![0u8; 60 * 1024]);
        let one = fb::DeviceCiphertext::create(
            f,
            &fb::DeviceCiphertextArgs {
                user: 1,
                device: 1,
                body: Some(body),
            },
        );
        let ciphertexts = f.create_vector(&[one; SEND_CIPHERTEXTS_MAX]);
        let args = fb::SendArgs {
            msg_id: Some(&id),
            to: 1,
            ciphertexts: Some(ciphertexts),
        };
        Some(fb::Send::create(f, &args).as_union_value())
    });
    assert!(bytes.len() < FRAME_BYTES_MAX);
    let err = Frame::decode(&bytes).unwrap_err();
    assert!(matches!(err, DecodeError::Malformed(_)), "{err:?}");
}

/// More tables than any legal frame has is refused by the verifier, whatever the list bounds
/// would have said.
#[test]
fn too_many_tables_are_refused() {
    let frame = Frame::new(
        1,
        PrekeyUpload {
            identity_key: Bytes::new(),
            signed_prekey: None,
            one_time: vec![
                OneTimePrekey {
                    id: 1,
                    key: Bytes::new(),
                    signature: Bytes::new(),
                };
                VERIFY_TABLES_MAX + 1
            ],
        },
    );
    let bytes = frame.encode_unchecked();
    assert!(bytes.len() < FRAME_BYTES_MAX);
    let err = Frame::decode(&bytes).unwrap_err();
    assert!(matches!(err, DecodeError::Malformed(_)), "{err:?}");
}

#[test]
fn invalid_utf8_is_malformed() {
    let frame = Frame::new(
        1,
        Error {
            code: 1,
            message: "abc".into(),
            retry_after_ms: 0,
            fatal: false,
        },
    );
    let mut bytes = frame.encode().unwrap().to_vec();
    let at = bytes.windows(3).position(|w| w == b"abc").unwrap();
    bytes[at] = 0xFF;
    assert!(matches!(
        Frame::decode(&bytes),
        Err(DecodeError::Malformed(_))
    ));
}

/// A sample of frames of every type, for the exhaustive truncation test.
fn sample_frames() -> Vec<Frame> {
    let mut runner = TestRunner::deterministic();
    FrameKind::ALL
        .iter()
        .flat_map(|&kind| {
            let strategy = frames::frame_of(kind);
            (0..2)
                .map(|_| strategy.new_tree(&mut runner).expect("strategy").current())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn truncated_frames_are_refused_at_every_length() {
    for frame in sample_frames() {
        let bytes = frame.encode().unwrap();
        // Prefixes of big frames: every length near both ends, then a stride through the middle.
        let lens = (0..bytes.len()).filter(|&n| n < 512 || bytes.len() - n < 512 || n % 61 == 0);
        for n in lens {
            let result = Frame::decode(&bytes[..n]);
            let name = frame.body.name();
            match (n, result) {
                (0, Err(DecodeError::Empty)) => {}
                (_, Err(DecodeError::Malformed(_))) => {}
                // Cutting off only alignment padding after the first-built object leaves every
                // referenced byte in place: the same frame.
                (_, Ok(decoded)) if decoded == frame && bytes.len() - n < 8 => {}
                (n, other) => panic!(
                    "{name} truncated to {n} of {} bytes: {other:?}",
                    bytes.len()
                ),
            }
        }
    }
}

proptest! {
    #![proptest_config(Config::with_cases(2048))]

    /// Random bytes: decoding never panics, and the view and the owned decoder agree.
    #[test]
    fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
        let owned = Frame::decode(&buf);
        let view = FrameView::parse(&buf).and_then(|v| v.to_owned_frame());
        prop_assert_eq!(owned, view);
    }

    /// Valid frames with a few bytes changed: the hardest inputs for a verifier.
    #[test]
    fn mutated_frames_never_panic(
        frame in frames::frame(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = frame.encode().unwrap().to_vec();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let owned = Frame::decode(&bytes);
        let view = FrameView::parse(&bytes).and_then(|v| v.to_owned_frame());
        prop_assert_eq!(&owned, &view);
        if let Ok(decoded) = owned {
            // Whatever was accepted passes the sender's bounds too (re-encoding may still exceed
            // the frame bound: the input may have shared one table between two offsets).
            let again = decoded.encode();
            prop_assert!(
                again.is_ok() || matches!(again, Err(EncodeError::FrameTooLarge { .. })),
                "{:?}", again
            );
        }
    }
}

fn broadcast_result() -> BroadcastResult {
    BroadcastResult {
        user: 1,
        status: SendStatus::MismatchedDevices,
        missing: vec![],
        extra: vec![],
        full_devices: vec![],
        error: 0,
        retry_after_ms: 0,
    }
}

fn ack_of(results: Vec<BroadcastResult>) -> BroadcastAck {
    BroadcastAck {
        msg_id: [1; 16],
        server_time_ms: 1,
        results,
    }
}

fn broadcast_ack(results: usize, missing: usize) -> Body {
    let result = BroadcastResult {
        missing: vec![2; missing],
        ..broadcast_result()
    };
    Body::BroadcastAck(ack_of(vec![result; results]))
}
