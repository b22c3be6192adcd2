//! Verified flatbuffers into owned frames, and the enum mappings both ways. The caller has run
//! [`super::check::received`] on the frame, so every bound already holds; the conversion still
//! returns errors instead of assuming, so no input can make it panic.

use bytes::Bytes;
use flatbuffers::Vector;

use super::check::required;
use super::DecodeError;
use crate::frame::*;
use crate::generated as fb;

/// Where owned byte strings come from: copied out of a borrowed buffer, or shared with the
/// `Bytes` the frame arrived in (no copy; the frame's buffer lives as long as any part of it).
#[derive(Clone, Copy)]
pub(crate) enum Source<'s> {
    Copy,
    Share(&'s Bytes),
}

impl Source<'_> {
    fn bytes(self, part: &[u8]) -> Bytes {
        match self {
            Source::Copy => Bytes::copy_from_slice(part),
            Source::Share(buf) => share(buf, part),
        }
    }

    fn vec(self, v: Option<Vector<'_, u8>>) -> Bytes {
        v.map_or_else(Bytes::new, |v| self.bytes(v.bytes()))
    }
}

/// `part` as a slice of `buf` without copying. `part` always lies inside `buf` (it was read out
/// of the buffer verified from `buf`); should it ever not, it is copied rather than trusted
/// (`Bytes::slice_ref` would panic).
fn share(buf: &Bytes, part: &[u8]) -> Bytes {
    let start = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= buf.len() && !part.is_empty() => buf.slice(start..end),
        _ => Bytes::copy_from_slice(part),
    }
}

fn string(s: Option<&str>) -> String {
    s.unwrap_or_default().to_owned()
}

fn scalars<'a, T>(v: Option<Vector<'a, T>>) -> Vec<T>
where
    T: flatbuffers::Follow<'a, Inner = T> + 'a,
{
    v.map_or_else(Vec::new, |v| v.iter().collect())
}

fn msg_ids(v: Option<Vector<'_, fb::MsgId>>) -> Vec<MsgId> {
    v.map_or_else(Vec::new, |v| v.iter().map(|id| id.0).collect())
}

/// Maps an owned enum to the schema's and back. The schema's enums are open (any `u8`); a value
/// this build does not know is an error on receipt (`UnknownEnumValue`, a malformed frame):
/// silently mapping it to some default could turn, say, an unknown `SendStatus` into `Ok`.
macro_rules! enum_mapping {
    ($own:ident { $($v:ident),* $(,)? }) => {
        impl $own {
            pub(crate) fn to_fb(self) -> fb::$own {
                match self { $($own::$v => fb::$own::$v,)* }
            }

            pub(crate) fn received(
                field: &'static str,
                value: fb::$own,
            ) -> Result<$own, DecodeError> {
                match value {
                    $(fb::$own::$v => Ok($own::$v),)*
                    other => Err(DecodeError::UnknownEnumValue { field, value: other.0 }),
                }
            }
        }
    };
}

enum_mapping!(CodeChannel { Sms, Voice });
enum_mapping!(SendStatus {
    Ok,
    MismatchedDevices,
    InboxFull,
    UnknownUser
});
enum_mapping!(DeliverKind {
    Message,
    Delivered,
    Read,
    GroupMessage,
    GroupEvent,
    Status,
    StatusViewed,
    IdentityChanged
});
enum_mapping!(StatusAudience {
    Contacts,
    ContactsExcept,
    OnlyShareWith
});
enum_mapping!(PushProvider { Webhook, Apns, Fcm });
enum_mapping!(GroupPermission {
    Unchanged,
    Members,
    Admins
});
enum_mapping!(GroupInvite {
    Keep,
    Create,
    Revoke
});
enum_mapping!(ReceiptKind {
    Delivered,
    Read,
    StatusViewed
});
enum_mapping!(Visibility {
    Everyone,
    Contacts,
    Nobody
});

fn signed_prekey(src: Source<'_>, k: fb::SignedPrekey<'_>) -> SignedPrekey {
    SignedPrekey {
        id: k.id(),
        key: src.vec(k.key()),
        signature: src.vec(k.signature()),
    }
}

fn one_time_prekey(src: Source<'_>, k: fb::OneTimePrekey<'_>) -> OneTimePrekey {
    OneTimePrekey {
        id: k.id(),
        key: src.vec(k.key()),
        signature: src.vec(k.signature()),
    }
}

/// The body table of a frame whose tag was checked to be `kind`'s.
fn table<T>(body: Option<T>) -> Result<T, DecodeError> {
    body.ok_or(DecodeError::MissingField("Frame.body"))
}

/// Converts a checked frame's body of type `kind` into its owned form.
pub(crate) fn body(
    root: fb::Frame<'_>,
    kind: FrameKind,
    src: Source<'_>,
) -> Result<Body, DecodeError> {
    use FrameKind as K;
    Ok(match kind {
        K::Hello => {
            let t = table(root.body_as_hello())?;
            Body::Hello(Hello {
                protocol_version: t.protocol_version(),
                auth: t.auth().map(|a| Auth {
                    user: a.user(),
                    device: a.device(),
                    token: src.vec(a.token()),
                }),
                user_agent: string(t.user_agent()),
            })
        }
        K::Welcome => {
            let t = table(root.body_as_welcome())?;
            Body::Welcome(Welcome {
                protocol_version: t.protocol_version(),
                node_id: t.node_id(),
                epoch: t.epoch(),
                server_time_ms: t.server_time_ms(),
                ping_interval_ms: t.ping_interval_ms(),
                idle_timeout_ms: t.idle_timeout_ms(),
                deliver_window: t.deliver_window(),
                frame_bytes_max: t.frame_bytes_max(),
            })
        }
        K::Redirect => {
            let t = table(root.body_as_redirect())?;
            Body::Redirect(Redirect {
                user: t.user(),
                epoch: t.epoch(),
                ws_url: string(t.ws_url()),
                quic_addr: string(t.quic_addr()),
            })
        }
        K::RegisterRequest => {
            let t = table(root.body_as_register_request())?;
            Body::RegisterRequest(RegisterRequest {
                phone: t.phone(),
                channel: CodeChannel::received("RegisterRequest.channel", t.channel())?,
            })
        }
        K::RegisterChallenge => {
            let t = table(root.body_as_register_challenge())?;
            Body::RegisterChallenge(RegisterChallenge {
                expires_in_ms: t.expires_in_ms(),
                retry_after_ms: t.retry_after_ms(),
            })
        }
        K::RegisterVerify => {
            let t = table(root.body_as_register_verify())?;
            Body::RegisterVerify(RegisterVerify {
                phone: t.phone(),
                code: string(t.code()),
                pin: string(t.pin()),
                device_name: string(t.device_name()),
            })
        }
        K::Registered => {
            let t = table(root.body_as_registered())?;
            Body::Registered(Registered {
                user: t.user(),
                device: t.device(),
                token: src.vec(t.token()),
            })
        }
        K::LinkCodeRequest => {
            table(root.body_as_link_code_request())?;
            Body::LinkCodeRequest(LinkCodeRequest {})
        }
        K::LinkCode => {
            let t = table(root.body_as_link_code())?;
            Body::LinkCode(LinkCode {
                code: string(t.code()),
                expires_in_ms: t.expires_in_ms(),
            })
        }
        K::LinkDevice => {
            let t = table(root.body_as_link_device())?;
            Body::LinkDevice(LinkDevice {
                user: t.user(),
                code: string(t.code()),
                device_name: string(t.device_name()),
            })
        }
        K::RemoveDevice => {
            let t = table(root.body_as_remove_device())?;
            Body::RemoveDevice(RemoveDevice { device: t.device() })
        }
        K::SetRegistrationLock => {
            let t = table(root.body_as_set_registration_lock())?;
            Body::SetRegistrationLock(SetRegistrationLock {
                pin: string(t.pin()),
            })
        }
        K::DeviceListRequest => {
            let t = table(root.body_as_device_list_request())?;
            Body::DeviceListRequest(DeviceListRequest { user: t.user() })
        }
        K::DeviceList => {
            let t = table(root.body_as_device_list())?;
            Body::DeviceList(DeviceList {
                user: t.user(),
                devices: scalars(t.devices()),
            })
        }
        K::Send => {
            let t = table(root.body_as_send())?;
            Body::Send(Send {
                msg_id: required("Send.msg_id", t.msg_id())?.0,
                to: t.to(),
                ciphertexts: t
                    .ciphertexts()
                    .unwrap_or_default()
                    .iter()
                    .map(|c| DeviceCiphertext {
                        user: c.user(),
                        device: c.device(),
                        body: src.vec(c.body()),
                    })
                    .collect(),
            })
        }
        K::SendAck => {
            let t = table(root.body_as_send_ack())?;
            Body::SendAck(SendAck {
                msg_id: required("SendAck.msg_id", t.msg_id())?.0,
                status: SendStatus::received("SendAck.status", t.status())?,
                server_time_ms: t.server_time_ms(),
                mismatched: t
                    .mismatched()
                    .unwrap_or_default()
                    .iter()
                    .map(|m| MismatchedDevices {
                        user: m.user(),
                        missing: scalars(m.missing()),
                        extra: scalars(m.extra()),
                    })
                    .collect(),
                full_devices: t
                    .full_devices()
                    .unwrap_or_default()
                    .iter()
                    .map(|d| DeviceCiphertextRef {
                        user: d.user(),
                        device: d.device(),
                    })
                    .collect(),
                group_seq: t.group_seq(),
            })
        }
        K::Deliver => {
            let t = table(root.body_as_deliver())?;
            Body::Deliver(Deliver {
                seq: t.seq(),
                kind: DeliverKind::received("Deliver.kind", t.kind())?,
                from_user: t.from_user(),
                from_device: t.from_device(),
                msg_id: required("Deliver.msg_id", t.msg_id())?.0,
                server_time_ms: t.server_time_ms(),
                body: src.vec(t.body()),
                receipt_msg_ids: msg_ids(t.receipt_msg_ids()),
                group: t.group().map(|g| g.0),
                group_seq: t.group_seq(),
            })
        }
        K::DeliverAck => {
            let t = table(root.body_as_deliver_ack())?;
            Body::DeliverAck(DeliverAck {
                seqs: scalars(t.seqs()),
            })
        }
        K::Receipt => {
            let t = table(root.body_as_receipt())?;
            Body::Receipt(Receipt {
                msg_id: required("Receipt.msg_id", t.msg_id())?.0,
                to: t.to(),
                kind: ReceiptKind::received("Receipt.kind", t.kind())?,
                msg_ids: msg_ids(t.msg_ids()),
            })
        }
        K::PresenceSubscribe => {
            let t = table(root.body_as_presence_subscribe())?;
            Body::PresenceSubscribe(PresenceSubscribe {
                users: scalars(t.users()),
            })
        }
        K::PresenceUpdate => {
            let t = table(root.body_as_presence_update())?;
            Body::PresenceUpdate(PresenceUpdate {
                user: t.user(),
                online: t.online(),
                last_seen_ms: t.last_seen_ms(),
            })
        }
        K::SetPrivacy => {
            let t = table(root.body_as_set_privacy())?;
            Body::SetPrivacy(SetPrivacy {
                last_seen: Visibility::received("SetPrivacy.last_seen", t.last_seen())?,
                online: Visibility::received("SetPrivacy.online", t.online())?,
            })
        }
        K::Typing => {
            let t = table(root.body_as_typing())?;
            Body::Typing(Typing {
                user: t.user(),
                device: t.device(),
                typing: t.typing(),
                recording: t.recording(),
                group: t.group().map(|g| g.0),
            })
        }
        K::PrekeyUpload => {
            let t = table(root.body_as_prekey_upload())?;
            Body::PrekeyUpload(PrekeyUpload {
                identity_key: src.vec(t.identity_key()),
                signed_prekey: t.signed_prekey().map(|k| signed_prekey(src, k)),
                one_time: t
                    .one_time()
                    .unwrap_or_default()
                    .iter()
                    .map(|k| one_time_prekey(src, k))
                    .collect(),
            })
        }
        K::PrekeyClaim => {
            let t = table(root.body_as_prekey_claim())?;
            Body::PrekeyClaim(PrekeyClaim {
                user: t.user(),
                device: t.device(),
            })
        }
        K::PrekeyBundle => {
            let t = table(root.body_as_prekey_bundle())?;
            Body::PrekeyBundle(PrekeyBundle {
                user: t.user(),
                devices: t
                    .devices()
                    .unwrap_or_default()
                    .iter()
                    .map(|d| DeviceBundle {
                        device: d.device(),
                        identity_key: src.vec(d.identity_key()),
                        signed_prekey: d.signed_prekey().map(|k| signed_prekey(src, k)),
                        one_time: d.one_time().map(|k| one_time_prekey(src, k)),
                    })
                    .collect(),
            })
        }
        K::PrekeyCountRequest => {
            table(root.body_as_prekey_count_request())?;
            Body::PrekeyCountRequest(PrekeyCountRequest {})
        }
        K::PrekeyCount => {
            let t = table(root.body_as_prekey_count())?;
            Body::PrekeyCount(PrekeyCount { count: t.count() })
        }
        K::GroupCreate => {
            let t = table(root.body_as_group_create())?;
            Body::GroupCreate(GroupCreate {
                members: scalars(t.members()),
                meta: src.vec(t.meta()),
            })
        }
        K::GroupUpdate => {
            let t = table(root.body_as_group_update())?;
            Body::GroupUpdate(GroupUpdate {
                group: required("GroupUpdate.group", t.group())?.0,
                add: scalars(t.add()),
                remove: scalars(t.remove()),
                promote: scalars(t.promote()),
                demote: scalars(t.demote()),
                meta: src.vec(t.meta()),
                leave: t.leave(),
                send: GroupPermission::received("GroupUpdate.send", t.send())?,
                edit: GroupPermission::received("GroupUpdate.edit", t.edit())?,
                invite: GroupInvite::received("GroupUpdate.invite", t.invite())?,
                join_code: src.vec(t.join_code()),
            })
        }
        K::GroupReceipt => {
            let t = table(root.body_as_group_receipt())?;
            Body::GroupReceipt(GroupReceipt {
                group: required("GroupReceipt.group", t.group())?.0,
                kind: ReceiptKind::received("GroupReceipt.kind", t.kind())?,
                up_to_seq: t.up_to_seq(),
            })
        }
        K::GroupInfoRequest => {
            let t = table(root.body_as_group_info_request())?;
            Body::GroupInfoRequest(GroupInfoRequest {
                group: required("GroupInfoRequest.group", t.group())?.0,
            })
        }
        K::GroupInfo => {
            let t = table(root.body_as_group_info())?;
            Body::GroupInfo(GroupInfo {
                group: required("GroupInfo.group", t.group())?.0,
                version: t.version(),
                members: scalars(t.members()),
                admins: scalars(t.admins()),
                meta: src.vec(t.meta()),
                send: GroupPermission::received("GroupInfo.send", t.send())?,
                edit: GroupPermission::received("GroupInfo.edit", t.edit())?,
                invite_code: src.vec(t.invite_code()),
            })
        }
        K::StatusPost => {
            let t = table(root.body_as_status_post())?;
            Body::StatusPost(StatusPost {
                msg_id: required("StatusPost.msg_id", t.msg_id())?.0,
                audience: StatusAudience::received("StatusPost.audience", t.audience())?,
                users: scalars(t.users()),
                body: src.vec(t.body()),
            })
        }
        K::PushRegister => {
            let t = table(root.body_as_push_register())?;
            Body::PushRegister(PushRegister {
                provider: PushProvider::received("PushRegister.provider", t.provider())?,
                token: string(t.token()),
            })
        }
        K::BroadcastSend => {
            let t = table(root.body_as_broadcast_send())?;
            Body::BroadcastSend(BroadcastSend {
                msg_id: required("BroadcastSend.msg_id", t.msg_id())?.0,
                ciphertexts: t
                    .ciphertexts()
                    .unwrap_or_default()
                    .iter()
                    .map(|c| DeviceCiphertext {
                        user: c.user(),
                        device: c.device(),
                        body: src.vec(c.body()),
                    })
                    .collect(),
            })
        }
        K::BroadcastAck => {
            let t = table(root.body_as_broadcast_ack())?;
            let mut results = Vec::new();
            for r in t.results().unwrap_or_default() {
                results.push(BroadcastResult {
                    user: r.user(),
                    status: SendStatus::received("BroadcastResult.status", r.status())?,
                    missing: scalars(r.missing()),
                    extra: scalars(r.extra()),
                    full_devices: scalars(r.full_devices()),
                    error: r.error(),
                    retry_after_ms: r.retry_after_ms(),
                });
            }
            Body::BroadcastAck(BroadcastAck {
                msg_id: required("BroadcastAck.msg_id", t.msg_id())?.0,
                server_time_ms: t.server_time_ms(),
                results,
            })
        }
        K::GroupSend => {
            let t = table(root.body_as_group_send())?;
            Body::GroupSend(GroupSend {
                group: required("GroupSend.group", t.group())?.0,
                msg_id: required("GroupSend.msg_id", t.msg_id())?.0,
                body: src.vec(t.body()),
            })
        }
        K::GroupEvent => {
            let t = table(root.body_as_group_event())?;
            Body::GroupEvent(GroupEvent {
                group: required("GroupEvent.group", t.group())?.0,
                seq: t.seq(),
                actor: t.actor(),
                added: scalars(t.added()),
                removed: scalars(t.removed()),
                promoted: scalars(t.promoted()),
                demoted: scalars(t.demoted()),
                meta_changed: t.meta_changed(),
                settings_changed: t.settings_changed(),
                rotate_sender_keys: t.rotate_sender_keys(),
            })
        }
        K::MediaUploadRequest => {
            let t = table(root.body_as_media_upload_request())?;
            Body::MediaUploadRequest(MediaUploadRequest {
                size: t.size(),
                sha256: src.vec(t.sha256()),
                content_type: string(t.content_type()),
            })
        }
        K::MediaUploadGrant => {
            let t = table(root.body_as_media_upload_grant())?;
            Body::MediaUploadGrant(MediaUploadGrant {
                media_id: string(t.media_id()),
                upload_url: string(t.upload_url()),
                download_url: string(t.download_url()),
                expires_at_ms: t.expires_at_ms(),
            })
        }
        K::Ping => Body::Ping(Ping {
            nonce: table(root.body_as_ping())?.nonce(),
        }),
        K::Pong => Body::Pong(Pong {
            nonce: table(root.body_as_pong())?.nonce(),
        }),
        K::Done => {
            table(root.body_as_done())?;
            Body::Done(Done {})
        }
        K::Error => {
            let t = table(root.body_as_error())?;
            Body::Error(Error {
                code: t.code(),
                message: string(t.message()),
                retry_after_ms: t.retry_after_ms(),
                fatal: t.fatal(),
            })
        }
        K::GoingAway => {
            let t = table(root.body_as_going_away())?;
            Body::GoingAway(GoingAway {
                reconnect_after_ms: t.reconnect_after_ms(),
                reason: string(t.reason()),
            })
        }
        K::Migrate => {
            let t = table(root.body_as_migrate())?;
            Body::Migrate(Migrate {
                user: t.user(),
                epoch: t.epoch(),
                ws_url: string(t.ws_url()),
                quic_addr: string(t.quic_addr()),
                reconnect_after_ms: t.reconnect_after_ms(),
            })
        }
        K::ContactsUpdate => {
            let t = table(root.body_as_contacts_update())?;
            Body::ContactsUpdate(ContactsUpdate {
                replace: t.replace(),
                add: scalars(t.add()),
                remove: scalars(t.remove()),
                block: scalars(t.block()),
                unblock: scalars(t.unblock()),
            })
        }
    })
}
