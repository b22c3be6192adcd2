//! Owned frames into flatbuffers, through the generated builders. No checks here: the caller
//! ([`super::with_encoded`]) has already enforced the limits, or deliberately skipped them
//! ([`crate::Frame::encode_unchecked`]).
//!
//! Empty strings and vectors are left out of the buffer (a reader treats an absent one as
//! empty), and scalars equal to their schema default cost nothing: a `Ping` is 56 bytes.

use flatbuffers::{FlatBufferBuilder, Push, UnionWIPOffset, Vector, WIPOffset};

use crate::frame::*;
use crate::generated as fb;
use crate::limits::PROTOCOL_VERSION;

type Fbb<'b> = FlatBufferBuilder<'b>;
type Off<T> = WIPOffset<T>;

/// Builds `frame` into `fbb` (which must be reset) and finishes the buffer.
pub(super) fn frame(fbb: &mut Fbb<'_>, frame: &Frame) {
    let body = body(fbb, &frame.body);
    let root = fb::Frame::create(
        fbb,
        &fb::FrameArgs {
            version: PROTOCOL_VERSION,
            req: frame.req,
            body_type: fb::Body(frame.body.kind().tag()),
            body: Some(body),
        },
    );
    fbb.finish_minimal(root);
}

fn string<'b>(fbb: &mut Fbb<'b>, s: &str) -> Option<Off<&'b str>> {
    (!s.is_empty()).then(|| fbb.create_string(s))
}

fn bytes<'b>(fbb: &mut Fbb<'b>, b: &[u8]) -> Option<Off<Vector<'b, u8>>> {
    (!b.is_empty()).then(|| fbb.create_vector(b))
}

fn scalars<'b, T: Push + Copy>(fbb: &mut Fbb<'b>, v: &[T]) -> Option<Off<Vector<'b, T::Output>>> {
    (!v.is_empty()).then(|| fbb.create_vector(v))
}

fn msg_ids<'b>(fbb: &mut Fbb<'b>, ids: &[MsgId]) -> Option<Off<Vector<'b, fb::MsgId>>> {
    (!ids.is_empty()).then(|| fbb.create_vector_from_iter(ids.iter().map(|id| fb::MsgId(*id))))
}

/// A vector of tables: each element built by `one`, then the vector of their offsets.
fn tables<'b, T, U>(
    fbb: &mut Fbb<'b>,
    items: &[T],
    mut one: impl FnMut(&mut Fbb<'b>, &T) -> Off<U>,
) -> Option<Off<Vector<'b, flatbuffers::ForwardsUOffset<U>>>> {
    if items.is_empty() {
        return None;
    }
    let offsets: Vec<Off<U>> = items.iter().map(|item| one(fbb, item)).collect();
    Some(fbb.create_vector(&offsets))
}

fn signed_prekey<'b>(fbb: &mut Fbb<'b>, k: &SignedPrekey) -> Off<fb::SignedPrekey<'b>> {
    let args = fb::SignedPrekeyArgs {
        id: k.id,
        key: bytes(fbb, &k.key),
        signature: bytes(fbb, &k.signature),
    };
    fb::SignedPrekey::create(fbb, &args)
}

fn one_time_prekey<'b>(fbb: &mut Fbb<'b>, k: &OneTimePrekey) -> Off<fb::OneTimePrekey<'b>> {
    let args = fb::OneTimePrekeyArgs {
        id: k.id,
        key: bytes(fbb, &k.key),
        signature: bytes(fbb, &k.signature),
    };
    fb::OneTimePrekey::create(fbb, &args)
}

/// Builds the body table and returns it as a union value.
fn body(fbb: &mut Fbb<'_>, body: &Body) -> Off<UnionWIPOffset> {
    match body {
        Body::Hello(b) => {
            let auth = b.auth.as_ref().map(|a| {
                let args = fb::AuthArgs {
                    user: a.user,
                    device: a.device,
                    token: bytes(fbb, &a.token),
                };
                fb::Auth::create(fbb, &args)
            });
            let args = fb::HelloArgs {
                protocol_version: b.protocol_version,
                auth,
                user_agent: string(fbb, &b.user_agent),
            };
            fb::Hello::create(fbb, &args).as_union_value()
        }
        Body::Welcome(b) => {
            let args = fb::WelcomeArgs {
                protocol_version: b.protocol_version,
                node_id: b.node_id,
                epoch: b.epoch,
                server_time_ms: b.server_time_ms,
                ping_interval_ms: b.ping_interval_ms,
                idle_timeout_ms: b.idle_timeout_ms,
                deliver_window: b.deliver_window,
                frame_bytes_max: b.frame_bytes_max,
            };
            fb::Welcome::create(fbb, &args).as_union_value()
        }
        Body::Redirect(b) => {
            let args = fb::RedirectArgs {
                user: b.user,
                epoch: b.epoch,
                ws_url: string(fbb, &b.ws_url),
                quic_addr: string(fbb, &b.quic_addr),
            };
            fb::Redirect::create(fbb, &args).as_union_value()
        }
        Body::RegisterRequest(b) => {
            let args = fb::RegisterRequestArgs {
                phone: b.phone,
                channel: b.channel.to_fb(),
            };
            fb::RegisterRequest::create(fbb, &args).as_union_value()
        }
        Body::RegisterChallenge(b) => {
            let args = fb::RegisterChallengeArgs {
                expires_in_ms: b.expires_in_ms,
                retry_after_ms: b.retry_after_ms,
            };
            fb::RegisterChallenge::create(fbb, &args).as_union_value()
        }
        Body::RegisterVerify(b) => {
            let args = fb::RegisterVerifyArgs {
                phone: b.phone,
                code: string(fbb, &b.code),
                pin: string(fbb, &b.pin),
                device_name: string(fbb, &b.device_name),
            };
            fb::RegisterVerify::create(fbb, &args).as_union_value()
        }
        Body::Registered(b) => {
            let args = fb::RegisteredArgs {
                user: b.user,
                device: b.device,
                token: bytes(fbb, &b.token),
            };
            fb::Registered::create(fbb, &args).as_union_value()
        }
        Body::LinkCodeRequest(LinkCodeRequest {}) => {
            fb::LinkCodeRequest::create(fbb, &fb::LinkCodeRequestArgs {}).as_union_value()
        }
        Body::LinkCode(b) => {
            let args = fb::LinkCodeArgs {
                code: string(fbb, &b.code),
                expires_in_ms: b.expires_in_ms,
            };
            fb::LinkCode::create(fbb, &args).as_union_value()
        }
        Body::LinkDevice(b) => {
            let args = fb::LinkDeviceArgs {
                user: b.user,
                code: string(fbb, &b.code),
                device_name: string(fbb, &b.device_name),
            };
            fb::LinkDevice::create(fbb, &args).as_union_value()
        }
        Body::RemoveDevice(b) => {
            let args = fb::RemoveDeviceArgs { device: b.device };
            fb::RemoveDevice::create(fbb, &args).as_union_value()
        }
        Body::SetRegistrationLock(b) => {
            let args = fb::SetRegistrationLockArgs {
                pin: string(fbb, &b.pin),
            };
            fb::SetRegistrationLock::create(fbb, &args).as_union_value()
        }
        Body::DeviceListRequest(b) => {
            let args = fb::DeviceListRequestArgs { user: b.user };
            fb::DeviceListRequest::create(fbb, &args).as_union_value()
        }
        Body::DeviceList(b) => {
            let args = fb::DeviceListArgs {
                user: b.user,
                devices: scalars(fbb, &b.devices),
            };
            fb::DeviceList::create(fbb, &args).as_union_value()
        }
        Body::Send(b) => {
            let ciphertexts = tables(fbb, &b.ciphertexts, |fbb, c| {
                let args = fb::DeviceCiphertextArgs {
                    user: c.user,
                    device: c.device,
                    body: bytes(fbb, &c.body),
                };
                fb::DeviceCiphertext::create(fbb, &args)
            });
            let msg_id = fb::MsgId(b.msg_id);
            let args = fb::SendArgs {
                msg_id: Some(&msg_id),
                to: b.to,
                ciphertexts,
            };
            fb::Send::create(fbb, &args).as_union_value()
        }
        Body::SendAck(b) => {
            let mismatched = tables(fbb, &b.mismatched, |fbb, m| {
                let args = fb::MismatchedDevicesArgs {
                    user: m.user,
                    missing: scalars(fbb, &m.missing),
                    extra: scalars(fbb, &m.extra),
                };
                fb::MismatchedDevices::create(fbb, &args)
            });
            let full_devices = tables(fbb, &b.full_devices, |fbb, d| {
                let args = fb::DeviceCiphertextRefArgs {
                    user: d.user,
                    device: d.device,
                };
                fb::DeviceCiphertextRef::create(fbb, &args)
            });
            let msg_id = fb::MsgId(b.msg_id);
            let args = fb::SendAckArgs {
                msg_id: Some(&msg_id),
                status: b.status.to_fb(),
                server_time_ms: b.server_time_ms,
                mismatched,
                full_devices,
                group_seq: b.group_seq,
            };
            fb::SendAck::create(fbb, &args).as_union_value()
        }
        Body::Deliver(b) => {
            let msg_id = fb::MsgId(b.msg_id);
            let group = b.group.map(fb::GroupId);
            let args = fb::DeliverArgs {
                seq: b.seq,
                kind: b.kind.to_fb(),
                from_user: b.from_user,
                from_device: b.from_device,
                msg_id: Some(&msg_id),
                server_time_ms: b.server_time_ms,
                body: bytes(fbb, &b.body),
                receipt_msg_ids: msg_ids(fbb, &b.receipt_msg_ids),
                group: group.as_ref(),
                group_seq: b.group_seq,
            };
            fb::Deliver::create(fbb, &args).as_union_value()
        }
        Body::DeliverAck(b) => {
            let args = fb::DeliverAckArgs {
                seqs: scalars(fbb, &b.seqs),
            };
            fb::DeliverAck::create(fbb, &args).as_union_value()
        }
        Body::Receipt(b) => {
            let msg_id = fb::MsgId(b.msg_id);
            let args = fb::ReceiptArgs {
                msg_id: Some(&msg_id),
                to: b.to,
                kind: b.kind.to_fb(),
                msg_ids: msg_ids(fbb, &b.msg_ids),
            };
            fb::Receipt::create(fbb, &args).as_union_value()
        }
        Body::PresenceSubscribe(b) => {
            let args = fb::PresenceSubscribeArgs {
                users: scalars(fbb, &b.users),
            };
            fb::PresenceSubscribe::create(fbb, &args).as_union_value()
        }
        Body::PresenceUpdate(b) => {
            let args = fb::PresenceUpdateArgs {
                user: b.user,
                online: b.online,
                last_seen_ms: b.last_seen_ms,
            };
            fb::PresenceUpdate::create(fbb, &args).as_union_value()
        }
        Body::SetPrivacy(b) => {
            let args = fb::SetPrivacyArgs {
                last_seen: b.last_seen.to_fb(),
                online: b.online.to_fb(),
            };
            fb::SetPrivacy::create(fbb, &args).as_union_value()
        }
        Body::Typing(b) => {
            let group = b.group.map(fb::GroupId);
            let args = fb::TypingArgs {
                user: b.user,
                device: b.device,
                typing: b.typing,
                recording: b.recording,
                group: group.as_ref(),
            };
            fb::Typing::create(fbb, &args).as_union_value()
        }
        Body::PrekeyUpload(b) => {
            let identity_key = bytes(fbb, &b.identity_key);
            let signed_prekey = b.signed_prekey.as_ref().map(|k| signed_prekey(fbb, k));
            let one_time = tables(fbb, &b.one_time, one_time_prekey);
            let args = fb::PrekeyUploadArgs {
                identity_key,
                signed_prekey,
                one_time,
            };
            fb::PrekeyUpload::create(fbb, &args).as_union_value()
        }
        Body::PrekeyClaim(b) => {
            let args = fb::PrekeyClaimArgs {
                user: b.user,
                device: b.device,
            };
            fb::PrekeyClaim::create(fbb, &args).as_union_value()
        }
        Body::PrekeyBundle(b) => {
            let devices = tables(fbb, &b.devices, |fbb, d| {
                let args = fb::DeviceBundleArgs {
                    device: d.device,
                    identity_key: bytes(fbb, &d.identity_key),
                    signed_prekey: d.signed_prekey.as_ref().map(|k| signed_prekey(fbb, k)),
                    one_time: d.one_time.as_ref().map(|k| one_time_prekey(fbb, k)),
                };
                fb::DeviceBundle::create(fbb, &args)
            });
            let args = fb::PrekeyBundleArgs {
                user: b.user,
                devices,
            };
            fb::PrekeyBundle::create(fbb, &args).as_union_value()
        }
        Body::PrekeyCountRequest(PrekeyCountRequest {}) => {
            fb::PrekeyCountRequest::create(fbb, &fb::PrekeyCountRequestArgs {}).as_union_value()
        }
        Body::PrekeyCount(b) => {
            let args = fb::PrekeyCountArgs { count: b.count };
            fb::PrekeyCount::create(fbb, &args).as_union_value()
        }
        Body::GroupCreate(b) => {
            let args = fb::GroupCreateArgs {
                members: scalars(fbb, &b.members),
                meta: bytes(fbb, &b.meta),
            };
            fb::GroupCreate::create(fbb, &args).as_union_value()
        }
        Body::GroupUpdate(b) => {
            let group = fb::GroupId(b.group);
            let args = fb::GroupUpdateArgs {
                group: Some(&group),
                add: scalars(fbb, &b.add),
                remove: scalars(fbb, &b.remove),
                promote: scalars(fbb, &b.promote),
                demote: scalars(fbb, &b.demote),
                meta: bytes(fbb, &b.meta),
                leave: b.leave,
                send: b.send.to_fb(),
                edit: b.edit.to_fb(),
                invite: b.invite.to_fb(),
                join_code: bytes(fbb, &b.join_code),
            };
            fb::GroupUpdate::create(fbb, &args).as_union_value()
        }
        Body::GroupReceipt(b) => {
            let group = fb::GroupId(b.group);
            let args = fb::GroupReceiptArgs {
                group: Some(&group),
                kind: b.kind.to_fb(),
                up_to_seq: b.up_to_seq,
            };
            fb::GroupReceipt::create(fbb, &args).as_union_value()
        }
        Body::GroupInfoRequest(b) => {
            let group = fb::GroupId(b.group);
            let args = fb::GroupInfoRequestArgs {
                group: Some(&group),
            };
            fb::GroupInfoRequest::create(fbb, &args).as_union_value()
        }
        Body::GroupInfo(b) => {
            let group = fb::GroupId(b.group);
            let args = fb::GroupInfoArgs {
                group: Some(&group),
                version: b.version,
                members: scalars(fbb, &b.members),
                admins: scalars(fbb, &b.admins),
                meta: bytes(fbb, &b.meta),
                send: b.send.to_fb(),
                edit: b.edit.to_fb(),
                invite_code: bytes(fbb, &b.invite_code),
            };
            fb::GroupInfo::create(fbb, &args).as_union_value()
        }
        Body::GroupSend(b) => {
            let group = fb::GroupId(b.group);
            let msg_id = fb::MsgId(b.msg_id);
            let args = fb::GroupSendArgs {
                group: Some(&group),
                msg_id: Some(&msg_id),
                body: bytes(fbb, &b.body),
            };
            fb::GroupSend::create(fbb, &args).as_union_value()
        }
        Body::GroupEvent(b) => {
            let group = fb::GroupId(b.group);
            let args = fb::GroupEventArgs {
                group: Some(&group),
                seq: b.seq,
                actor: b.actor,
                added: scalars(fbb, &b.added),
                removed: scalars(fbb, &b.removed),
                promoted: scalars(fbb, &b.promoted),
                demoted: scalars(fbb, &b.demoted),
                meta_changed: b.meta_changed,
                settings_changed: b.settings_changed,
                rotate_sender_keys: b.rotate_sender_keys,
            };
            fb::GroupEvent::create(fbb, &args).as_union_value()
        }
        Body::StatusPost(b) => {
            let msg_id = fb::MsgId(b.msg_id);
            let args = fb::StatusPostArgs {
                msg_id: Some(&msg_id),
                audience: b.audience.to_fb(),
                users: scalars(fbb, &b.users),
                body: bytes(fbb, &b.body),
            };
            fb::StatusPost::create(fbb, &args).as_union_value()
        }
        Body::PushRegister(b) => {
            let args = fb::PushRegisterArgs {
                provider: b.provider.to_fb(),
                token: string(fbb, &b.token),
            };
            fb::PushRegister::create(fbb, &args).as_union_value()
        }
        Body::BroadcastSend(b) => {
            let ciphertexts = tables(fbb, &b.ciphertexts, |fbb, c| {
                let args = fb::DeviceCiphertextArgs {
                    user: c.user,
                    device: c.device,
                    body: bytes(fbb, &c.body),
                };
                fb::DeviceCiphertext::create(fbb, &args)
            });
            let msg_id = fb::MsgId(b.msg_id);
            let args = fb::BroadcastSendArgs {
                msg_id: Some(&msg_id),
                ciphertexts,
            };
            fb::BroadcastSend::create(fbb, &args).as_union_value()
        }
        Body::BroadcastAck(b) => {
            let results = tables(fbb, &b.results, |fbb, r| {
                let args = fb::BroadcastResultArgs {
                    user: r.user,
                    status: r.status.to_fb(),
                    missing: scalars(fbb, &r.missing),
                    extra: scalars(fbb, &r.extra),
                    full_devices: scalars(fbb, &r.full_devices),
                    error: r.error,
                    retry_after_ms: r.retry_after_ms,
                };
                fb::BroadcastResult::create(fbb, &args)
            });
            let msg_id = fb::MsgId(b.msg_id);
            let args = fb::BroadcastAckArgs {
                msg_id: Some(&msg_id),
                server_time_ms: b.server_time_ms,
                results,
            };
            fb::BroadcastAck::create(fbb, &args).as_union_value()
        }
        Body::MediaUploadRequest(b) => {
            let args = fb::MediaUploadRequestArgs {
                size: b.size,
                sha256: bytes(fbb, &b.sha256),
                content_type: string(fbb, &b.content_type),
            };
            fb::MediaUploadRequest::create(fbb, &args).as_union_value()
        }
        Body::MediaUploadGrant(b) => {
            let args = fb::MediaUploadGrantArgs {
                media_id: string(fbb, &b.media_id),
                upload_url: string(fbb, &b.upload_url),
                download_url: string(fbb, &b.download_url),
                expires_at_ms: b.expires_at_ms,
            };
            fb::MediaUploadGrant::create(fbb, &args).as_union_value()
        }
        Body::Ping(b) => fb::Ping::create(fbb, &fb::PingArgs { nonce: b.nonce }).as_union_value(),
        Body::Pong(b) => fb::Pong::create(fbb, &fb::PongArgs { nonce: b.nonce }).as_union_value(),
        Body::Done(Done {}) => fb::Done::create(fbb, &fb::DoneArgs {}).as_union_value(),
        Body::Error(b) => {
            let args = fb::ErrorArgs {
                code: b.code,
                message: string(fbb, &b.message),
                retry_after_ms: b.retry_after_ms,
                fatal: b.fatal,
            };
            fb::Error::create(fbb, &args).as_union_value()
        }
        Body::GoingAway(b) => {
            let args = fb::GoingAwayArgs {
                reconnect_after_ms: b.reconnect_after_ms,
                reason: string(fbb, &b.reason),
            };
            fb::GoingAway::create(fbb, &args).as_union_value()
        }
        Body::Migrate(b) => {
            let args = fb::MigrateArgs {
                user: b.user,
                epoch: b.epoch,
                ws_url: string(fbb, &b.ws_url),
                quic_addr: string(fbb, &b.quic_addr),
                reconnect_after_ms: b.reconnect_after_ms,
            };
            fb::Migrate::create(fbb, &args).as_union_value()
        }
        Body::ContactsUpdate(b) => {
            let args = fb::ContactsUpdateArgs {
                replace: b.replace,
                add: scalars(fbb, &b.add),
                remove: scalars(fbb, &b.remove),
                block: scalars(fbb, &b.block),
                unblock: scalars(fbb, &b.unblock),
            };
            fb::ContactsUpdate::create(fbb, &args).as_union_value()
        }
    }
}
