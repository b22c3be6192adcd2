//! Proptest strategies for every frame type, within every bound and small enough that any
//! frame they make fits [`FRAME_BYTES_MAX`] (so a round trip must succeed). Shared by the
//! integration tests (`main.rs`).

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use ringpost_wire::limits::*;
use ringpost_wire::*;

/// Free text within [`STRING_BYTES_MAX`]: arbitrary Unicode (at most 64 chars of up to 4
/// bytes), or ASCII up to the exact bound.
pub fn text() -> BoxedStrategy<String> {
    prop_oneof![
        proptest::string::string_regex("\\PC{0,64}").expect("valid regex"),
        proptest::string::string_regex(&format!("[ -~]{{0,{STRING_BYTES_MAX}}}"))
            .expect("valid regex"),
    ]
    .boxed()
}

/// A byte string of at most `max` bytes.
pub fn blob(max: usize) -> BoxedStrategy<Bytes> {
    vec(any::<u8>(), 0..=max).prop_map(Bytes::from).boxed()
}

pub fn token() -> BoxedStrategy<Bytes> {
    vec(any::<u8>(), TOKEN_BYTES).prop_map(Bytes::from).boxed()
}

pub fn users(max: usize) -> BoxedStrategy<Vec<UserId>> {
    vec(any::<u64>(), 0..=max).boxed()
}

pub fn devices(max: usize) -> BoxedStrategy<Vec<DeviceId>> {
    vec(any::<u32>(), 0..=max).boxed()
}

pub fn msg_ids(max: usize) -> BoxedStrategy<Vec<MsgId>> {
    vec(any::<MsgId>(), 0..=max).boxed()
}

fn signed_prekey() -> impl Strategy<Value = SignedPrekey> {
    (any::<u32>(), blob(KEY_BYTES_MAX), blob(SIGNATURE_BYTES_MAX))
        .prop_map(|(id, key, signature)| SignedPrekey { id, key, signature })
}

fn one_time_prekey() -> impl Strategy<Value = OneTimePrekey> {
    (any::<u32>(), blob(KEY_BYTES_MAX), blob(SIGNATURE_BYTES_MAX))
        .prop_map(|(id, key, signature)| OneTimePrekey { id, key, signature })
}

/// Largest ciphertext in a generated `Send`: ten of them stay under the frame bound.
pub const SEND_BODY_BYTES_MAX: usize = FRAME_BYTES_MAX / SEND_CIPHERTEXTS_MAX - 512;

/// A body of type `kind`, anywhere within its bounds.
pub fn body(kind: FrameKind) -> BoxedStrategy<Body> {
    use FrameKind as K;
    match kind {
        K::Hello => (
            any::<u16>(),
            proptest::option::of((any::<u64>(), any::<u32>(), token())),
            text(),
        )
            .prop_map(|(protocol_version, auth, user_agent)| {
                Body::Hello(Hello {
                    protocol_version,
                    auth: auth.map(|(user, device, token)| Auth {
                        user,
                        device,
                        token,
                    }),
                    user_agent,
                })
            })
            .boxed(),
        K::Welcome => (
            any::<u16>(),
            any::<(u64, u64, u64)>(),
            any::<(u32, u32, u32, u32)>(),
        )
            .prop_map(
                |(protocol_version, (node_id, epoch, server_time_ms), (a, b, c, d))| {
                    Body::Welcome(Welcome {
                        protocol_version,
                        node_id,
                        epoch,
                        server_time_ms,
                        ping_interval_ms: a,
                        idle_timeout_ms: b,
                        deliver_window: c,
                        frame_bytes_max: d,
                    })
                },
            )
            .boxed(),
        K::Redirect => (any::<u64>(), any::<u64>(), text(), text())
            .prop_map(|(user, epoch, ws_url, quic_addr)| {
                Body::Redirect(Redirect {
                    user,
                    epoch,
                    ws_url,
                    quic_addr,
                })
            })
            .boxed(),
        K::RegisterRequest => (
            any::<u64>(),
            prop_oneof![Just(CodeChannel::Sms), Just(CodeChannel::Voice)],
        )
            .prop_map(|(phone, channel)| Body::RegisterRequest(RegisterRequest { phone, channel }))
            .boxed(),
        K::RegisterChallenge => any::<(u32, u32)>()
            .prop_map(|(expires_in_ms, retry_after_ms)| {
                Body::RegisterChallenge(RegisterChallenge {
                    expires_in_ms,
                    retry_after_ms,
                })
            })
            .boxed(),
        K::RegisterVerify => (any::<u64>(), text(), text(), text())
            .prop_map(|(phone, code, pin, device_name)| {
                Body::RegisterVerify(RegisterVerify {
                    phone,
                    code,
                    pin,
                    device_name,
                })
            })
            .boxed(),
        K::Registered => (any::<u64>(), any::<u32>(), token())
            .prop_map(|(user, device, token)| {
                Body::Registered(Registered {
                    user,
                    device,
                    token,
                })
            })
            .boxed(),
        K::LinkCodeRequest => Just(Body::LinkCodeRequest(LinkCodeRequest {})).boxed(),
        K::LinkCode => (text(), any::<u32>())
            .prop_map(|(code, expires_in_ms)| {
                Body::LinkCode(LinkCode {
                    code,
                    expires_in_ms,
                })
            })
            .boxed(),
        K::LinkDevice => (any::<u64>(), text(), text())
            .prop_map(|(user, code, device_name)| {
                Body::LinkDevice(LinkDevice {
                    user,
                    code,
                    device_name,
                })
            })
            .boxed(),
        K::RemoveDevice => any::<u32>()
            .prop_map(|device| Body::RemoveDevice(RemoveDevice { device }))
            .boxed(),
        K::SetRegistrationLock => text()
            .prop_map(|pin| Body::SetRegistrationLock(SetRegistrationLock { pin }))
            .boxed(),
        K::DeviceListRequest => any::<u64>()
            .prop_map(|user| Body::DeviceListRequest(DeviceListRequest { user }))
            .boxed(),
        K::DeviceList => (any::<u64>(), devices(DEVICES_PER_USER_MAX))
            .prop_map(|(user, devices)| Body::DeviceList(DeviceList { user, devices }))
            .boxed(),
        K::Send => (
            any::<MsgId>(),
            any::<u64>(),
            vec(
                (any::<u64>(), any::<u32>(), blob(SEND_BODY_BYTES_MAX))
                    .prop_map(|(user, device, body)| DeviceCiphertext { user, device, body }),
                0..=SEND_CIPHERTEXTS_MAX,
            ),
        )
            .prop_map(|(msg_id, to, ciphertexts)| {
                Body::Send(Send {
                    msg_id,
                    to,
                    ciphertexts,
                })
            })
            .boxed(),
        K::SendAck => (
            any::<MsgId>(),
            prop_oneof![
                Just(SendStatus::Ok),
                Just(SendStatus::MismatchedDevices),
                Just(SendStatus::InboxFull),
                Just(SendStatus::UnknownUser),
            ],
            any::<u64>(),
            vec(
                (
                    any::<u64>(),
                    devices(DEVICES_PER_USER_MAX),
                    devices(SEND_CIPHERTEXTS_MAX),
                )
                    .prop_map(|(user, missing, extra)| MismatchedDevices {
                        user,
                        missing,
                        extra,
                    }),
                0..=SEND_CIPHERTEXTS_MAX,
            ),
            vec(
                (any::<u64>(), any::<u32>())
                    .prop_map(|(user, device)| DeviceCiphertextRef { user, device }),
                0..=SEND_CIPHERTEXTS_MAX,
            ),
        )
            .prop_map(
                |(msg_id, status, server_time_ms, mismatched, full_devices)| {
                    Body::SendAck(SendAck {
                        msg_id,
                        status,
                        server_time_ms,
                        mismatched,
                        full_devices,
                        group_seq: server_time_ms ^ 0x5a5a,
                    })
                },
            )
            .boxed(),
        K::Deliver => (
            any::<(u64, u64, u32, u64)>(),
            prop_oneof![
                Just(DeliverKind::Message),
                Just(DeliverKind::Delivered),
                Just(DeliverKind::Read),
                Just(DeliverKind::Status),
                Just(DeliverKind::StatusViewed),
                Just(DeliverKind::IdentityChanged),
            ],
            any::<MsgId>(),
            blob(CIPHERTEXT_BYTES_MAX),
            msg_ids(RECEIPT_MSG_IDS_MAX),
        )
            .prop_map(
                |((seq, from_user, from_device, server_time_ms), kind, msg_id, body, ids)| {
                    Body::Deliver(Deliver {
                        seq,
                        kind,
                        from_user,
                        from_device,
                        msg_id,
                        server_time_ms,
                        body,
                        receipt_msg_ids: ids,
                        group: None,
                        group_seq: 0,
                    })
                },
            )
            .boxed(),
        K::DeliverAck => vec(any::<u64>(), 0..=ACK_SEQS_MAX)
            .prop_map(|seqs| Body::DeliverAck(DeliverAck { seqs }))
            .boxed(),
        K::Receipt => (
            any::<MsgId>(),
            any::<u64>(),
            prop_oneof![
                Just(ReceiptKind::Delivered),
                Just(ReceiptKind::Read),
                Just(ReceiptKind::StatusViewed)
            ],
            msg_ids(RECEIPT_MSG_IDS_MAX),
        )
            .prop_map(|(msg_id, to, kind, msg_ids)| {
                Body::Receipt(Receipt {
                    msg_id,
                    to,
                    kind,
                    msg_ids,
                })
            })
            .boxed(),
        K::PresenceSubscribe => users(PRESENCE_USERS_MAX)
            .prop_map(|users| Body::PresenceSubscribe(PresenceSubscribe { users }))
            .boxed(),
        K::PresenceUpdate => (any::<u64>(), any::<bool>(), any::<u64>())
            .prop_map(|(user, online, last_seen_ms)| {
                Body::PresenceUpdate(PresenceUpdate {
                    user,
                    online,
                    last_seen_ms,
                })
            })
            .boxed(),
        K::SetPrivacy => (
            prop_oneof![
                Just(Visibility::Everyone),
                Just(Visibility::Contacts),
                Just(Visibility::Nobody),
            ],
            prop_oneof![
                Just(Visibility::Everyone),
                Just(Visibility::Contacts),
                Just(Visibility::Nobody),
            ],
        )
            .prop_map(|(last_seen, online)| Body::SetPrivacy(SetPrivacy { last_seen, online }))
            .boxed(),
        K::Typing => (
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(any::<GroupId>()),
        )
            .prop_map(|(user, device, typing, recording, group)| {
                Body::Typing(Typing {
                    user,
                    device,
                    typing,
                    recording,
                    group,
                })
            })
            .boxed(),
        K::PrekeyUpload => (
            blob(KEY_BYTES_MAX),
            proptest::option::of(signed_prekey()),
            vec(one_time_prekey(), 0..=PREKEYS_PER_UPLOAD_MAX),
        )
            .prop_map(|(identity_key, signed_prekey, one_time)| {
                Body::PrekeyUpload(PrekeyUpload {
                    identity_key,
                    signed_prekey,
                    one_time,
                })
            })
            .boxed(),
        K::PrekeyClaim => (any::<u64>(), any::<u32>())
            .prop_map(|(user, device)| Body::PrekeyClaim(PrekeyClaim { user, device }))
            .boxed(),
        K::PrekeyBundle => (
            any::<u64>(),
            vec(
                (
                    any::<u32>(),
                    blob(KEY_BYTES_MAX),
                    proptest::option::of(signed_prekey()),
                    proptest::option::of(one_time_prekey()),
                )
                    .prop_map(|(device, identity_key, signed_prekey, one_time)| {
                        DeviceBundle {
                            device,
                            identity_key,
                            signed_prekey,
                            one_time,
                        }
                    }),
                0..=DEVICES_PER_USER_MAX,
            ),
        )
            .prop_map(|(user, devices)| Body::PrekeyBundle(PrekeyBundle { user, devices }))
            .boxed(),
        K::PrekeyCountRequest => Just(Body::PrekeyCountRequest(PrekeyCountRequest {})).boxed(),
        K::PrekeyCount => any::<u32>()
            .prop_map(|count| Body::PrekeyCount(PrekeyCount { count }))
            .boxed(),
        K::GroupCreate => (users(GROUP_MEMBERS_MAX), blob(GROUP_META_BYTES_MAX))
            .prop_map(|(members, meta)| Body::GroupCreate(GroupCreate { members, meta }))
            .boxed(),
        K::GroupUpdate => (
            any::<GroupId>(),
            users(GROUP_MEMBERS_MAX),
            users(GROUP_MEMBERS_MAX),
            users(GROUP_MEMBERS_MAX),
            users(GROUP_MEMBERS_MAX),
            blob(GROUP_META_BYTES_MAX),
        )
            .prop_map(|(group, add, remove, promote, demote, meta)| {
                Body::GroupUpdate(GroupUpdate {
                    group,
                    add,
                    remove,
                    promote,
                    demote,
                    meta,
                    leave: false,
                    send: GroupPermission::Admins,
                    edit: GroupPermission::Members,
                    invite: GroupInvite::Create,
                    join_code: Bytes::new(),
                })
            })
            .boxed(),
        K::GroupReceipt => (
            any::<GroupId>(),
            prop_oneof![Just(ReceiptKind::Delivered), Just(ReceiptKind::Read)],
            any::<u64>(),
        )
            .prop_map(|(group, kind, up_to_seq)| {
                Body::GroupReceipt(GroupReceipt {
                    group,
                    kind,
                    up_to_seq,
                })
            })
            .boxed(),
        K::GroupInfoRequest => any::<GroupId>()
            .prop_map(|group| Body::GroupInfoRequest(GroupInfoRequest { group }))
            .boxed(),
        K::GroupInfo => (
            any::<GroupId>(),
            any::<u64>(),
            users(GROUP_MEMBERS_MAX),
            users(GROUP_MEMBERS_MAX),
            blob(GROUP_META_BYTES_MAX),
        )
            .prop_map(|(group, version, members, admins, meta)| {
                Body::GroupInfo(GroupInfo {
                    group,
                    version,
                    members,
                    admins,
                    meta,
                    send: GroupPermission::Admins,
                    edit: GroupPermission::Members,
                    invite_code: Bytes::from(vec![9; 16]),
                })
            })
            .boxed(),
        K::MediaUploadRequest => (
            0..=MEDIA_BYTES_MAX,
            proptest::collection::vec(any::<u8>(), MEDIA_SHA256_BYTES),
            text(),
        )
            .prop_map(|(size, sha256, content_type)| {
                Body::MediaUploadRequest(MediaUploadRequest {
                    size,
                    sha256: Bytes::from(sha256),
                    content_type,
                })
            })
            .boxed(),
        K::MediaUploadGrant => (text(), text(), text(), any::<u64>())
            .prop_map(|(media_id, upload_url, download_url, expires_at_ms)| {
                Body::MediaUploadGrant(MediaUploadGrant {
                    media_id,
                    upload_url,
                    download_url,
                    expires_at_ms,
                })
            })
            .boxed(),
        K::Ping => any::<u64>()
            .prop_map(|nonce| Body::Ping(Ping { nonce }))
            .boxed(),
        K::Pong => any::<u64>()
            .prop_map(|nonce| Body::Pong(Pong { nonce }))
            .boxed(),
        K::Done => Just(Body::Done(Done {})).boxed(),
        K::Error => (any::<u16>(), text(), any::<u32>(), any::<bool>())
            .prop_map(|(code, message, retry_after_ms, fatal)| {
                Body::Error(Error {
                    code,
                    message,
                    retry_after_ms,
                    fatal,
                })
            })
            .boxed(),
        K::GoingAway => (any::<u32>(), text())
            .prop_map(|(reconnect_after_ms, reason)| {
                Body::GoingAway(GoingAway {
                    reconnect_after_ms,
                    reason,
                })
            })
            .boxed(),
        K::Migrate => (
            any::<u64>(),
            any::<u64>(),
            text(),
            text(),
            0..=MIGRATE_RECONNECT_AFTER_MS_MAX,
        )
            .prop_map(|(user, epoch, ws_url, quic_addr, reconnect_after_ms)| {
                Body::Migrate(Migrate {
                    user,
                    epoch,
                    ws_url,
                    quic_addr,
                    reconnect_after_ms,
                })
            })
            .boxed(),
        K::ContactsUpdate => (
            any::<bool>(),
            users(PRIVACY_CONTACTS_MAX / 4),
            users(PRIVACY_CONTACTS_MAX / 4),
            users(PRIVACY_CONTACTS_MAX / 4),
            users(PRIVACY_CONTACTS_MAX / 4),
        )
            .prop_map(|(replace, add, remove, block, unblock)| {
                Body::ContactsUpdate(ContactsUpdate {
                    replace,
                    add,
                    remove,
                    block,
                    unblock,
                })
            })
            .boxed(),
        K::BroadcastSend => (
            any::<MsgId>(),
            vec(
                (any::<u64>(), any::<u32>(), blob(64))
                    .prop_map(|(user, device, body)| DeviceCiphertext { user, device, body }),
                0..=BROADCAST_CIPHERTEXTS_MAX,
            ),
        )
            .prop_map(|(msg_id, ciphertexts)| {
                Body::BroadcastSend(BroadcastSend {
                    msg_id,
                    ciphertexts,
                })
            })
            .boxed(),
        K::StatusPost => (
            any::<MsgId>(),
            prop_oneof![
                Just(StatusAudience::Contacts),
                Just(StatusAudience::ContactsExcept),
                Just(StatusAudience::OnlyShareWith),
            ],
            users(PRIVACY_CONTACTS_MAX),
            blob(1024),
        )
            .prop_map(|(msg_id, audience, users, body)| {
                Body::StatusPost(StatusPost {
                    msg_id,
                    audience,
                    users,
                    body,
                })
            })
            .boxed(),
        K::PushRegister => (
            prop_oneof![
                Just(PushProvider::Webhook),
                Just(PushProvider::Apns),
                Just(PushProvider::Fcm),
            ],
            text(),
        )
            .prop_map(|(provider, token)| Body::PushRegister(PushRegister { provider, token }))
            .boxed(),
        K::BroadcastAck => (
            any::<MsgId>(),
            any::<u64>(),
            vec(
                (
                    any::<u64>(),
                    prop_oneof![
                        Just(SendStatus::Ok),
                        Just(SendStatus::MismatchedDevices),
                        Just(SendStatus::InboxFull),
                        Just(SendStatus::UnknownUser),
                    ],
                    devices(BROADCAST_RESULT_DEVICES_MAX),
                    devices(BROADCAST_RESULT_DEVICES_MAX),
                    any::<(u16, u32)>(),
                )
                    .prop_map(
                        |(user, status, missing, extra, (error, retry_after_ms))| BroadcastResult {
                            user,
                            status,
                            full_devices: extra.clone(),
                            missing,
                            extra,
                            error,
                            retry_after_ms,
                        },
                    ),
                0..=64,
            ),
        )
            .prop_map(|(msg_id, server_time_ms, results)| {
                Body::BroadcastAck(BroadcastAck {
                    msg_id,
                    server_time_ms,
                    results,
                })
            })
            .boxed(),
        K::GroupSend => (
            any::<GroupId>(),
            any::<MsgId>(),
            blob(GROUP_CIPHERTEXT_BYTES_MAX),
        )
            .prop_map(|(group, msg_id, body)| {
                Body::GroupSend(GroupSend {
                    group,
                    msg_id,
                    body,
                })
            })
            .boxed(),
        K::GroupEvent => (
            (any::<GroupId>(), any::<u64>(), any::<u64>()),
            users(GROUP_MEMBERS_MAX),
            users(GROUP_MEMBERS_MAX),
            any::<(bool, bool, bool)>(),
        )
            .prop_map(|((group, seq, actor), added, removed, flags)| {
                Body::GroupEvent(GroupEvent {
                    group,
                    seq,
                    actor,
                    added,
                    removed,
                    promoted: vec![],
                    demoted: vec![],
                    meta_changed: flags.0,
                    settings_changed: flags.1,
                    rotate_sender_keys: flags.2,
                })
            })
            .boxed(),
    }
}

/// A frame of type `kind` with any request id.
pub fn frame_of(kind: FrameKind) -> BoxedStrategy<Frame> {
    (any::<u32>(), body(kind))
        .prop_map(|(req, body)| Frame { req, body })
        .boxed()
}

/// A frame of any type.
pub fn frame() -> BoxedStrategy<Frame> {
    proptest::sample::select(FrameKind::ALL)
        .prop_flat_map(frame_of)
        .boxed()
}
