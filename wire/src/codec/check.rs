//! Every length bound of the protocol, and the checks that enforce them on both sides of the
//! wire: [`sent`] on an owned frame before it is encoded, [`received`] on a verified flatbuffer
//! before anything is copied out of it. Each bound is one named constant used by both sides, so
//! a sender and a receiver can never disagree on a field's name or limit.
//!
//! Lists are checked before their elements, so the work done on a hostile frame is bounded by
//! the limits, not by how many elements the frame claims.

use flatbuffers::{Follow, Vector};

use super::DecodeError;
use crate::frame::*;
use crate::generated as fb;
use crate::limits::*;
use crate::view::{DeliverAckView, Hot, ReceiptView, SendView};

/// A bound was broken; converted into the sending or receiving side's error type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Violation {
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    WrongLength {
        field: &'static str,
        len: usize,
        expected: usize,
    },
}

/// At most `max` elements (lists) or bytes (strings, byte strings) in `field`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Max {
    pub(crate) field: &'static str,
    pub(crate) max: usize,
}

impl Max {
    const fn new(field: &'static str, max: usize) -> Max {
        Max { field, max }
    }

    fn check(self, len: usize) -> Result<(), Violation> {
        if len > self.max {
            return Err(Violation::TooLong {
                field: self.field,
                len,
                max: self.max,
            });
        }
        Ok(())
    }
}

/// Exactly `len` bytes in `field`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exact {
    pub(crate) field: &'static str,
    pub(crate) len: usize,
}

impl Exact {
    fn check(self, len: usize) -> Result<(), Violation> {
        if len != self.len {
            return Err(Violation::WrongLength {
                field: self.field,
                len,
                expected: self.len,
            });
        }
        Ok(())
    }
}

const AUTH_TOKEN: Exact = Exact {
    field: "Auth.token",
    len: TOKEN_BYTES,
};
const HELLO_USER_AGENT: Max = Max::new("Hello.user_agent", STRING_BYTES_MAX);
const REDIRECT_WS_URL: Max = Max::new("Redirect.ws_url", STRING_BYTES_MAX);
const REDIRECT_QUIC_ADDR: Max = Max::new("Redirect.quic_addr", STRING_BYTES_MAX);
const REGISTER_VERIFY_CODE: Max = Max::new("RegisterVerify.code", STRING_BYTES_MAX);
const REGISTER_VERIFY_PIN: Max = Max::new("RegisterVerify.pin", STRING_BYTES_MAX);
const REGISTER_VERIFY_DEVICE_NAME: Max = Max::new("RegisterVerify.device_name", STRING_BYTES_MAX);
const REGISTERED_TOKEN: Exact = Exact {
    field: "Registered.token",
    len: TOKEN_BYTES,
};
const LINK_CODE_CODE: Max = Max::new("LinkCode.code", STRING_BYTES_MAX);
const LINK_DEVICE_CODE: Max = Max::new("LinkDevice.code", STRING_BYTES_MAX);
const LINK_DEVICE_DEVICE_NAME: Max = Max::new("LinkDevice.device_name", STRING_BYTES_MAX);
const SET_REGISTRATION_LOCK_PIN: Max = Max::new("SetRegistrationLock.pin", STRING_BYTES_MAX);
const DEVICE_LIST_DEVICES: Max = Max::new("DeviceList.devices", DEVICES_PER_USER_MAX);
const SEND_CIPHERTEXTS: Max = Max::new("Send.ciphertexts", SEND_CIPHERTEXTS_MAX);
const DEVICE_CIPHERTEXT_BODY: Max = Max::new("DeviceCiphertext.body", CIPHERTEXT_BYTES_MAX);
const SEND_ACK_MISMATCHED: Max = Max::new("SendAck.mismatched", SEND_CIPHERTEXTS_MAX);
const MISMATCHED_DEVICES_MISSING: Max = Max::new("MismatchedDevices.missing", DEVICES_PER_USER_MAX);
const MISMATCHED_DEVICES_EXTRA: Max = Max::new("MismatchedDevices.extra", SEND_CIPHERTEXTS_MAX);
const SEND_ACK_FULL_DEVICES: Max = Max::new("SendAck.full_devices", SEND_CIPHERTEXTS_MAX);
const DELIVER_BODY: Max = Max::new("Deliver.body", CIPHERTEXT_BYTES_MAX);
const DELIVER_RECEIPT_MSG_IDS: Max = Max::new("Deliver.receipt_msg_ids", RECEIPT_MSG_IDS_MAX);
const DELIVER_ACK_SEQS: Max = Max::new("DeliverAck.seqs", ACK_SEQS_MAX);
const RECEIPT_MSG_IDS: Max = Max::new("Receipt.msg_ids", RECEIPT_MSG_IDS_MAX);
const PRESENCE_SUBSCRIBE_USERS: Max = Max::new("PresenceSubscribe.users", PRESENCE_USERS_MAX);
const CONTACTS_UPDATE_ADD: Max = Max::new("ContactsUpdate.add", PRIVACY_CONTACTS_MAX);
const CONTACTS_UPDATE_REMOVE: Max = Max::new("ContactsUpdate.remove", PRIVACY_CONTACTS_MAX);
const CONTACTS_UPDATE_BLOCK: Max = Max::new("ContactsUpdate.block", PRIVACY_CONTACTS_MAX);
const CONTACTS_UPDATE_UNBLOCK: Max = Max::new("ContactsUpdate.unblock", PRIVACY_CONTACTS_MAX);
const SIGNED_PREKEY_KEY: Max = Max::new("SignedPrekey.key", KEY_BYTES_MAX);
const SIGNED_PREKEY_SIGNATURE: Max = Max::new("SignedPrekey.signature", SIGNATURE_BYTES_MAX);
const ONE_TIME_PREKEY_KEY: Max = Max::new("OneTimePrekey.key", KEY_BYTES_MAX);
const ONE_TIME_PREKEY_SIGNATURE: Max = Max::new("OneTimePrekey.signature", SIGNATURE_BYTES_MAX);
const PREKEY_UPLOAD_IDENTITY_KEY: Max = Max::new("PrekeyUpload.identity_key", KEY_BYTES_MAX);
const PREKEY_UPLOAD_ONE_TIME: Max = Max::new("PrekeyUpload.one_time", PREKEYS_PER_UPLOAD_MAX);
const DEVICE_BUNDLE_IDENTITY_KEY: Max = Max::new("DeviceBundle.identity_key", KEY_BYTES_MAX);
const PREKEY_BUNDLE_DEVICES: Max = Max::new("PrekeyBundle.devices", DEVICES_PER_USER_MAX);
const GROUP_CREATE_MEMBERS: Max = Max::new("GroupCreate.members", GROUP_MEMBERS_MAX);
const GROUP_CREATE_META: Max = Max::new("GroupCreate.meta", GROUP_META_BYTES_MAX);
const GROUP_UPDATE_ADD: Max = Max::new("GroupUpdate.add", GROUP_MEMBERS_MAX);
const GROUP_UPDATE_REMOVE: Max = Max::new("GroupUpdate.remove", GROUP_MEMBERS_MAX);
const GROUP_UPDATE_PROMOTE: Max = Max::new("GroupUpdate.promote", GROUP_MEMBERS_MAX);
const GROUP_UPDATE_DEMOTE: Max = Max::new("GroupUpdate.demote", GROUP_MEMBERS_MAX);
const GROUP_UPDATE_META: Max = Max::new("GroupUpdate.meta", GROUP_META_BYTES_MAX);
const GROUP_INFO_MEMBERS: Max = Max::new("GroupInfo.members", GROUP_MEMBERS_MAX);
const GROUP_INFO_ADMINS: Max = Max::new("GroupInfo.admins", GROUP_MEMBERS_MAX);
const GROUP_INFO_META: Max = Max::new("GroupInfo.meta", GROUP_META_BYTES_MAX);
const GROUP_INFO_INVITE_CODE: Max = Max::new("GroupInfo.invite_code", GROUP_INVITE_CODE_BYTES);
const GROUP_UPDATE_JOIN_CODE: Max = Max::new("GroupUpdate.join_code", GROUP_INVITE_CODE_BYTES);
const BROADCAST_SEND_CIPHERTEXTS: Max =
    Max::new("BroadcastSend.ciphertexts", BROADCAST_CIPHERTEXTS_MAX);
const BROADCAST_ACK_RESULTS: Max = Max::new("BroadcastAck.results", BROADCAST_RECIPIENTS_MAX);
const BROADCAST_RESULT_MISSING: Max =
    Max::new("BroadcastResult.missing", BROADCAST_RESULT_DEVICES_MAX);
const BROADCAST_RESULT_EXTRA: Max = Max::new("BroadcastResult.extra", BROADCAST_RESULT_DEVICES_MAX);
const BROADCAST_RESULT_FULL_DEVICES: Max =
    Max::new("BroadcastResult.full_devices", BROADCAST_RESULT_DEVICES_MAX);
const STATUS_POST_USERS: Max = Max::new("StatusPost.users", PRIVACY_CONTACTS_MAX);
const STATUS_POST_BODY: Max = Max::new("StatusPost.body", CIPHERTEXT_BYTES_MAX);
const PUSH_REGISTER_TOKEN: Max = Max::new("PushRegister.token", PUSH_TOKEN_BYTES_MAX);
const GROUP_SEND_BODY: Max = Max::new("GroupSend.body", GROUP_CIPHERTEXT_BYTES_MAX);
const GROUP_EVENT_ADDED: Max = Max::new("GroupEvent.added", GROUP_MEMBERS_MAX);
const GROUP_EVENT_REMOVED: Max = Max::new("GroupEvent.removed", GROUP_MEMBERS_MAX);
const GROUP_EVENT_PROMOTED: Max = Max::new("GroupEvent.promoted", GROUP_MEMBERS_MAX);
const GROUP_EVENT_DEMOTED: Max = Max::new("GroupEvent.demoted", GROUP_MEMBERS_MAX);
const MEDIA_UPLOAD_REQUEST_SIZE: Max =
    Max::new("MediaUploadRequest.size", MEDIA_BYTES_MAX as usize);
const MEDIA_UPLOAD_REQUEST_SHA256: Exact = Exact {
    field: "MediaUploadRequest.sha256",
    len: MEDIA_SHA256_BYTES,
};
const MEDIA_UPLOAD_REQUEST_CONTENT_TYPE: Max =
    Max::new("MediaUploadRequest.content_type", STRING_BYTES_MAX);
const MEDIA_UPLOAD_GRANT_MEDIA_ID: Max = Max::new("MediaUploadGrant.media_id", STRING_BYTES_MAX);
const MEDIA_UPLOAD_GRANT_UPLOAD_URL: Max =
    Max::new("MediaUploadGrant.upload_url", STRING_BYTES_MAX);
const MEDIA_UPLOAD_GRANT_DOWNLOAD_URL: Max =
    Max::new("MediaUploadGrant.download_url", STRING_BYTES_MAX);
const ERROR_MESSAGE: Max = Max::new("Error.message", STRING_BYTES_MAX);
const GOING_AWAY_REASON: Max = Max::new("GoingAway.reason", STRING_BYTES_MAX);
const MIGRATE_WS_URL: Max = Max::new("Migrate.ws_url", STRING_BYTES_MAX);
const MIGRATE_QUIC_ADDR: Max = Max::new("Migrate.quic_addr", STRING_BYTES_MAX);
const MIGRATE_RECONNECT_AFTER_MS: Max = Max::new(
    "Migrate.reconnect_after_ms",
    MIGRATE_RECONNECT_AFTER_MS_MAX as usize,
);

/// One bounded field of the protocol, as enforced on both sides of the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldBound {
    /// `Table.field`, as in the schema and in errors.
    pub field: &'static str,
    /// Elements (lists) or bytes (strings, byte strings); for `MediaUploadRequest.size`, bytes
    /// of the media object; for `Migrate.reconnect_after_ms`, milliseconds.
    pub limit: usize,
    /// The length must be exactly `limit` (tokens), rather than at most.
    pub exact: bool,
}

impl Max {
    const fn bound(self) -> FieldBound {
        FieldBound {
            field: self.field,
            limit: self.max,
            exact: false,
        }
    }
}

impl Exact {
    const fn bound(self) -> FieldBound {
        FieldBound {
            field: self.field,
            limit: self.len,
            exact: true,
        }
    }
}

/// Every bounded field, for documentation and tests.
pub const BOUNDS: &[FieldBound] = &[
    AUTH_TOKEN.bound(),
    HELLO_USER_AGENT.bound(),
    REDIRECT_WS_URL.bound(),
    REDIRECT_QUIC_ADDR.bound(),
    REGISTER_VERIFY_CODE.bound(),
    REGISTER_VERIFY_PIN.bound(),
    REGISTER_VERIFY_DEVICE_NAME.bound(),
    REGISTERED_TOKEN.bound(),
    LINK_CODE_CODE.bound(),
    LINK_DEVICE_CODE.bound(),
    LINK_DEVICE_DEVICE_NAME.bound(),
    SET_REGISTRATION_LOCK_PIN.bound(),
    DEVICE_LIST_DEVICES.bound(),
    SEND_CIPHERTEXTS.bound(),
    DEVICE_CIPHERTEXT_BODY.bound(),
    SEND_ACK_MISMATCHED.bound(),
    MISMATCHED_DEVICES_MISSING.bound(),
    MISMATCHED_DEVICES_EXTRA.bound(),
    SEND_ACK_FULL_DEVICES.bound(),
    DELIVER_BODY.bound(),
    DELIVER_RECEIPT_MSG_IDS.bound(),
    DELIVER_ACK_SEQS.bound(),
    RECEIPT_MSG_IDS.bound(),
    PRESENCE_SUBSCRIBE_USERS.bound(),
    CONTACTS_UPDATE_ADD.bound(),
    CONTACTS_UPDATE_REMOVE.bound(),
    CONTACTS_UPDATE_BLOCK.bound(),
    CONTACTS_UPDATE_UNBLOCK.bound(),
    SIGNED_PREKEY_KEY.bound(),
    SIGNED_PREKEY_SIGNATURE.bound(),
    ONE_TIME_PREKEY_KEY.bound(),
    ONE_TIME_PREKEY_SIGNATURE.bound(),
    PREKEY_UPLOAD_IDENTITY_KEY.bound(),
    PREKEY_UPLOAD_ONE_TIME.bound(),
    DEVICE_BUNDLE_IDENTITY_KEY.bound(),
    PREKEY_BUNDLE_DEVICES.bound(),
    GROUP_CREATE_MEMBERS.bound(),
    GROUP_CREATE_META.bound(),
    GROUP_UPDATE_ADD.bound(),
    GROUP_UPDATE_REMOVE.bound(),
    GROUP_UPDATE_PROMOTE.bound(),
    GROUP_UPDATE_DEMOTE.bound(),
    GROUP_UPDATE_META.bound(),
    GROUP_INFO_MEMBERS.bound(),
    GROUP_INFO_ADMINS.bound(),
    GROUP_INFO_META.bound(),
    GROUP_INFO_INVITE_CODE.bound(),
    GROUP_UPDATE_JOIN_CODE.bound(),
    GROUP_SEND_BODY.bound(),
    BROADCAST_SEND_CIPHERTEXTS.bound(),
    STATUS_POST_USERS.bound(),
    STATUS_POST_BODY.bound(),
    PUSH_REGISTER_TOKEN.bound(),
    BROADCAST_ACK_RESULTS.bound(),
    BROADCAST_RESULT_MISSING.bound(),
    BROADCAST_RESULT_EXTRA.bound(),
    BROADCAST_RESULT_FULL_DEVICES.bound(),
    GROUP_EVENT_ADDED.bound(),
    GROUP_EVENT_REMOVED.bound(),
    GROUP_EVENT_PROMOTED.bound(),
    GROUP_EVENT_DEMOTED.bound(),
    MEDIA_UPLOAD_REQUEST_SIZE.bound(),
    MEDIA_UPLOAD_REQUEST_SHA256.bound(),
    MEDIA_UPLOAD_REQUEST_CONTENT_TYPE.bound(),
    MEDIA_UPLOAD_GRANT_MEDIA_ID.bound(),
    MEDIA_UPLOAD_GRANT_UPLOAD_URL.bound(),
    MEDIA_UPLOAD_GRANT_DOWNLOAD_URL.bound(),
    ERROR_MESSAGE.bound(),
    GOING_AWAY_REASON.bound(),
    MIGRATE_WS_URL.bound(),
    MIGRATE_QUIC_ADDR.bound(),
    MIGRATE_RECONNECT_AFTER_MS.bound(),
];

/// `MediaUploadRequest.size` (or another scalar bound) as a length (saturating where `usize` is narrower than 64 bits).
fn size_len(size: u64) -> usize {
    usize::try_from(size).unwrap_or(usize::MAX)
}

// ---------------------------------------------------------------------------------------------
// Sending side
// ---------------------------------------------------------------------------------------------

fn sent_signed_prekey(k: &SignedPrekey) -> Result<(), Violation> {
    SIGNED_PREKEY_KEY.check(k.key.len())?;
    SIGNED_PREKEY_SIGNATURE.check(k.signature.len())
}

fn sent_one_time_prekey(k: &OneTimePrekey) -> Result<(), Violation> {
    ONE_TIME_PREKEY_KEY.check(k.key.len())?;
    ONE_TIME_PREKEY_SIGNATURE.check(k.signature.len())
}

/// Checks an owned body against every bound before it is encoded.
pub(crate) fn sent(body: &Body) -> Result<(), Violation> {
    match body {
        Body::Hello(b) => {
            if let Some(auth) = &b.auth {
                AUTH_TOKEN.check(auth.token.len())?;
            }
            HELLO_USER_AGENT.check(b.user_agent.len())
        }
        Body::Redirect(b) => {
            REDIRECT_WS_URL.check(b.ws_url.len())?;
            REDIRECT_QUIC_ADDR.check(b.quic_addr.len())
        }
        Body::RegisterVerify(b) => {
            REGISTER_VERIFY_CODE.check(b.code.len())?;
            REGISTER_VERIFY_PIN.check(b.pin.len())?;
            REGISTER_VERIFY_DEVICE_NAME.check(b.device_name.len())
        }
        Body::Registered(b) => REGISTERED_TOKEN.check(b.token.len()),
        Body::LinkCode(b) => LINK_CODE_CODE.check(b.code.len()),
        Body::LinkDevice(b) => {
            LINK_DEVICE_CODE.check(b.code.len())?;
            LINK_DEVICE_DEVICE_NAME.check(b.device_name.len())
        }
        Body::SetRegistrationLock(b) => SET_REGISTRATION_LOCK_PIN.check(b.pin.len()),
        Body::DeviceList(b) => DEVICE_LIST_DEVICES.check(b.devices.len()),
        Body::Send(b) => {
            SEND_CIPHERTEXTS.check(b.ciphertexts.len())?;
            b.ciphertexts
                .iter()
                .try_for_each(|c| DEVICE_CIPHERTEXT_BODY.check(c.body.len()))
        }
        Body::SendAck(b) => {
            SEND_ACK_MISMATCHED.check(b.mismatched.len())?;
            for m in &b.mismatched {
                MISMATCHED_DEVICES_MISSING.check(m.missing.len())?;
                MISMATCHED_DEVICES_EXTRA.check(m.extra.len())?;
            }
            SEND_ACK_FULL_DEVICES.check(b.full_devices.len())
        }
        Body::Deliver(b) => {
            DELIVER_BODY.check(b.body.len())?;
            DELIVER_RECEIPT_MSG_IDS.check(b.receipt_msg_ids.len())
        }
        Body::DeliverAck(b) => DELIVER_ACK_SEQS.check(b.seqs.len()),
        Body::Receipt(b) => RECEIPT_MSG_IDS.check(b.msg_ids.len()),
        Body::PresenceSubscribe(b) => PRESENCE_SUBSCRIBE_USERS.check(b.users.len()),
        Body::ContactsUpdate(b) => {
            CONTACTS_UPDATE_ADD.check(b.add.len())?;
            CONTACTS_UPDATE_REMOVE.check(b.remove.len())?;
            CONTACTS_UPDATE_BLOCK.check(b.block.len())?;
            CONTACTS_UPDATE_UNBLOCK.check(b.unblock.len())
        }
        Body::PrekeyUpload(b) => {
            PREKEY_UPLOAD_IDENTITY_KEY.check(b.identity_key.len())?;
            if let Some(k) = &b.signed_prekey {
                sent_signed_prekey(k)?;
            }
            PREKEY_UPLOAD_ONE_TIME.check(b.one_time.len())?;
            b.one_time.iter().try_for_each(sent_one_time_prekey)
        }
        Body::PrekeyBundle(b) => {
            PREKEY_BUNDLE_DEVICES.check(b.devices.len())?;
            for d in &b.devices {
                DEVICE_BUNDLE_IDENTITY_KEY.check(d.identity_key.len())?;
                if let Some(k) = &d.signed_prekey {
                    sent_signed_prekey(k)?;
                }
                if let Some(k) = &d.one_time {
                    sent_one_time_prekey(k)?;
                }
            }
            Ok(())
        }
        Body::GroupCreate(b) => {
            GROUP_CREATE_MEMBERS.check(b.members.len())?;
            GROUP_CREATE_META.check(b.meta.len())
        }
        Body::GroupUpdate(b) => {
            GROUP_UPDATE_ADD.check(b.add.len())?;
            GROUP_UPDATE_REMOVE.check(b.remove.len())?;
            GROUP_UPDATE_PROMOTE.check(b.promote.len())?;
            GROUP_UPDATE_DEMOTE.check(b.demote.len())?;
            GROUP_UPDATE_META.check(b.meta.len())?;
            GROUP_UPDATE_JOIN_CODE.check(b.join_code.len())
        }
        Body::GroupInfo(b) => {
            GROUP_INFO_MEMBERS.check(b.members.len())?;
            GROUP_INFO_ADMINS.check(b.admins.len())?;
            GROUP_INFO_META.check(b.meta.len())?;
            GROUP_INFO_INVITE_CODE.check(b.invite_code.len())
        }
        Body::GroupSend(b) => GROUP_SEND_BODY.check(b.body.len()),
        Body::StatusPost(b) => {
            STATUS_POST_USERS.check(b.users.len())?;
            STATUS_POST_BODY.check(b.body.len())
        }
        Body::PushRegister(b) => PUSH_REGISTER_TOKEN.check(b.token.len()),
        Body::BroadcastSend(b) => {
            BROADCAST_SEND_CIPHERTEXTS.check(b.ciphertexts.len())?;
            for c in &b.ciphertexts {
                DEVICE_CIPHERTEXT_BODY.check(c.body.len())?;
            }
            Ok(())
        }
        Body::BroadcastAck(b) => {
            BROADCAST_ACK_RESULTS.check(b.results.len())?;
            for r in &b.results {
                BROADCAST_RESULT_MISSING.check(r.missing.len())?;
                BROADCAST_RESULT_EXTRA.check(r.extra.len())?;
                BROADCAST_RESULT_FULL_DEVICES.check(r.full_devices.len())?;
            }
            Ok(())
        }
        Body::GroupEvent(b) => {
            GROUP_EVENT_ADDED.check(b.added.len())?;
            GROUP_EVENT_REMOVED.check(b.removed.len())?;
            GROUP_EVENT_PROMOTED.check(b.promoted.len())?;
            GROUP_EVENT_DEMOTED.check(b.demoted.len())
        }
        Body::MediaUploadRequest(b) => {
            MEDIA_UPLOAD_REQUEST_SIZE.check(size_len(b.size))?;
            MEDIA_UPLOAD_REQUEST_SHA256.check(b.sha256.len())?;
            MEDIA_UPLOAD_REQUEST_CONTENT_TYPE.check(b.content_type.len())
        }
        Body::MediaUploadGrant(b) => {
            MEDIA_UPLOAD_GRANT_MEDIA_ID.check(b.media_id.len())?;
            MEDIA_UPLOAD_GRANT_UPLOAD_URL.check(b.upload_url.len())?;
            MEDIA_UPLOAD_GRANT_DOWNLOAD_URL.check(b.download_url.len())
        }
        Body::Error(b) => ERROR_MESSAGE.check(b.message.len()),
        Body::GoingAway(b) => GOING_AWAY_REASON.check(b.reason.len()),
        Body::Migrate(b) => {
            MIGRATE_WS_URL.check(b.ws_url.len())?;
            MIGRATE_QUIC_ADDR.check(b.quic_addr.len())?;
            MIGRATE_RECONNECT_AFTER_MS.check(size_len(u64::from(b.reconnect_after_ms)))
        }
        // Only scalars and fixed-size ids: nothing to bound.
        Body::Welcome(_)
        | Body::RegisterRequest(_)
        | Body::RegisterChallenge(_)
        | Body::LinkCodeRequest(_)
        | Body::RemoveDevice(_)
        | Body::DeviceListRequest(_)
        | Body::PresenceUpdate(_)
        | Body::SetPrivacy(_)
        | Body::Typing(_)
        | Body::PrekeyClaim(_)
        | Body::PrekeyCountRequest(_)
        | Body::PrekeyCount(_)
        | Body::GroupInfoRequest(_)
        | Body::GroupReceipt(_)
        | Body::Ping(_)
        | Body::Pong(_)
        | Body::Done(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Receiving side
// ---------------------------------------------------------------------------------------------

fn str_len(s: Option<&str>) -> usize {
    s.map_or(0, str::len)
}

fn vec_len<'a, T: Follow<'a> + 'a>(v: Option<Vector<'a, T>>) -> usize {
    v.map_or(0, |v| v.len())
}

/// A field the schema cannot mark required (a struct in a table) but the protocol does.
pub(crate) fn required<T>(field: &'static str, value: Option<T>) -> Result<T, DecodeError> {
    value.ok_or(DecodeError::MissingField(field))
}

/// The body table of a frame whose tag was checked to be `kind`'s. The verifier has rejected a
/// tag without a table, so the error is for completeness, not a case that occurs.
fn table<T>(body: Option<T>) -> Result<T, DecodeError> {
    body.ok_or(DecodeError::MissingField("Frame.body"))
}

fn received_signed_prekey(k: fb::SignedPrekey<'_>) -> Result<(), Violation> {
    SIGNED_PREKEY_KEY.check(vec_len(k.key()))?;
    SIGNED_PREKEY_SIGNATURE.check(vec_len(k.signature()))
}

fn received_one_time_prekey(k: fb::OneTimePrekey<'_>) -> Result<(), Violation> {
    ONE_TIME_PREKEY_KEY.check(vec_len(k.key()))?;
    ONE_TIME_PREKEY_SIGNATURE.check(vec_len(k.signature()))
}

/// Checks a verified frame's body of type `kind` against every bound, every required field and
/// every enum, and returns the typed view of the hot-path frame types.
pub(crate) fn received<'a>(root: fb::Frame<'a>, kind: FrameKind) -> Result<Hot<'a>, DecodeError> {
    use FrameKind as K;
    match kind {
        K::Hello => {
            let t = table(root.body_as_hello())?;
            if let Some(auth) = t.auth() {
                AUTH_TOKEN.check(vec_len(auth.token()))?;
            }
            HELLO_USER_AGENT.check(str_len(t.user_agent()))?;
        }
        K::Redirect => {
            let t = table(root.body_as_redirect())?;
            REDIRECT_WS_URL.check(str_len(t.ws_url()))?;
            REDIRECT_QUIC_ADDR.check(str_len(t.quic_addr()))?;
        }
        K::RegisterRequest => {
            let t = table(root.body_as_register_request())?;
            CodeChannel::received("RegisterRequest.channel", t.channel())?;
        }
        K::RegisterVerify => {
            let t = table(root.body_as_register_verify())?;
            REGISTER_VERIFY_CODE.check(str_len(t.code()))?;
            REGISTER_VERIFY_PIN.check(str_len(t.pin()))?;
            REGISTER_VERIFY_DEVICE_NAME.check(str_len(t.device_name()))?;
        }
        K::Registered => {
            let t = table(root.body_as_registered())?;
            REGISTERED_TOKEN.check(vec_len(t.token()))?;
        }
        K::LinkCode => {
            let t = table(root.body_as_link_code())?;
            LINK_CODE_CODE.check(str_len(t.code()))?;
        }
        K::LinkDevice => {
            let t = table(root.body_as_link_device())?;
            LINK_DEVICE_CODE.check(str_len(t.code()))?;
            LINK_DEVICE_DEVICE_NAME.check(str_len(t.device_name()))?;
        }
        K::SetRegistrationLock => {
            let t = table(root.body_as_set_registration_lock())?;
            SET_REGISTRATION_LOCK_PIN.check(str_len(t.pin()))?;
        }
        K::DeviceList => {
            let t = table(root.body_as_device_list())?;
            DEVICE_LIST_DEVICES.check(vec_len(t.devices()))?;
        }
        K::Send => {
            let t = table(root.body_as_send())?;
            let msg_id = required("Send.msg_id", t.msg_id())?;
            let ciphertexts = t.ciphertexts().unwrap_or_default();
            SEND_CIPHERTEXTS.check(ciphertexts.len())?;
            for c in ciphertexts {
                DEVICE_CIPHERTEXT_BODY.check(vec_len(c.body()))?;
            }
            return Ok(Hot::Send(SendView {
                msg_id: &msg_id.0,
                to: t.to(),
                ciphertexts,
            }));
        }
        K::SendAck => {
            let t = table(root.body_as_send_ack())?;
            required("SendAck.msg_id", t.msg_id())?;
            SendStatus::received("SendAck.status", t.status())?;
            let mismatched = t.mismatched().unwrap_or_default();
            SEND_ACK_MISMATCHED.check(mismatched.len())?;
            for m in mismatched {
                MISMATCHED_DEVICES_MISSING.check(vec_len(m.missing()))?;
                MISMATCHED_DEVICES_EXTRA.check(vec_len(m.extra()))?;
            }
            SEND_ACK_FULL_DEVICES.check(vec_len(t.full_devices()))?;
        }
        K::Deliver => {
            let t = table(root.body_as_deliver())?;
            required("Deliver.msg_id", t.msg_id())?;
            DeliverKind::received("Deliver.kind", t.kind())?;
            DELIVER_BODY.check(vec_len(t.body()))?;
            DELIVER_RECEIPT_MSG_IDS.check(vec_len(t.receipt_msg_ids()))?;
        }
        K::DeliverAck => {
            let t = table(root.body_as_deliver_ack())?;
            let seqs = t.seqs().unwrap_or_default();
            DELIVER_ACK_SEQS.check(seqs.len())?;
            return Ok(Hot::DeliverAck(DeliverAckView { seqs }));
        }
        K::Receipt => {
            let t = table(root.body_as_receipt())?;
            let msg_id = required("Receipt.msg_id", t.msg_id())?;
            let kind = ReceiptKind::received("Receipt.kind", t.kind())?;
            let msg_ids = t.msg_ids().unwrap_or_default();
            RECEIPT_MSG_IDS.check(msg_ids.len())?;
            return Ok(Hot::Receipt(ReceiptView {
                msg_id: &msg_id.0,
                to: t.to(),
                kind,
                msg_ids,
            }));
        }
        K::PresenceSubscribe => {
            let t = table(root.body_as_presence_subscribe())?;
            PRESENCE_SUBSCRIBE_USERS.check(vec_len(t.users()))?;
        }
        K::SetPrivacy => {
            let t = table(root.body_as_set_privacy())?;
            Visibility::received("SetPrivacy.last_seen", t.last_seen())?;
            Visibility::received("SetPrivacy.online", t.online())?;
        }
        K::ContactsUpdate => {
            let t = table(root.body_as_contacts_update())?;
            CONTACTS_UPDATE_ADD.check(vec_len(t.add()))?;
            CONTACTS_UPDATE_REMOVE.check(vec_len(t.remove()))?;
            CONTACTS_UPDATE_BLOCK.check(vec_len(t.block()))?;
            CONTACTS_UPDATE_UNBLOCK.check(vec_len(t.unblock()))?;
        }
        K::Typing => {
            let t = table(root.body_as_typing())?;
            return Ok(Hot::Typing(Typing {
                user: t.user(),
                device: t.device(),
                typing: t.typing(),
                recording: t.recording(),
                group: t.group().map(|g| g.0),
            }));
        }
        K::PrekeyUpload => {
            let t = table(root.body_as_prekey_upload())?;
            PREKEY_UPLOAD_IDENTITY_KEY.check(vec_len(t.identity_key()))?;
            if let Some(k) = t.signed_prekey() {
                received_signed_prekey(k)?;
            }
            let one_time = t.one_time().unwrap_or_default();
            PREKEY_UPLOAD_ONE_TIME.check(one_time.len())?;
            one_time.iter().try_for_each(received_one_time_prekey)?;
        }
        K::PrekeyBundle => {
            let t = table(root.body_as_prekey_bundle())?;
            let devices = t.devices().unwrap_or_default();
            PREKEY_BUNDLE_DEVICES.check(devices.len())?;
            for d in devices {
                DEVICE_BUNDLE_IDENTITY_KEY.check(vec_len(d.identity_key()))?;
                if let Some(k) = d.signed_prekey() {
                    received_signed_prekey(k)?;
                }
                if let Some(k) = d.one_time() {
                    received_one_time_prekey(k)?;
                }
            }
        }
        K::GroupCreate => {
            let t = table(root.body_as_group_create())?;
            GROUP_CREATE_MEMBERS.check(vec_len(t.members()))?;
            GROUP_CREATE_META.check(vec_len(t.meta()))?;
        }
        K::GroupUpdate => {
            let t = table(root.body_as_group_update())?;
            required("GroupUpdate.group", t.group())?;
            GROUP_UPDATE_ADD.check(vec_len(t.add()))?;
            GROUP_UPDATE_REMOVE.check(vec_len(t.remove()))?;
            GROUP_UPDATE_PROMOTE.check(vec_len(t.promote()))?;
            GROUP_UPDATE_DEMOTE.check(vec_len(t.demote()))?;
            GROUP_UPDATE_META.check(vec_len(t.meta()))?;
            GROUP_UPDATE_JOIN_CODE.check(vec_len(t.join_code()))?;
            GroupPermission::received("GroupUpdate.send", t.send())?;
            GroupPermission::received("GroupUpdate.edit", t.edit())?;
            GroupInvite::received("GroupUpdate.invite", t.invite())?;
        }
        K::GroupReceipt => {
            let t = table(root.body_as_group_receipt())?;
            required("GroupReceipt.group", t.group())?;
            ReceiptKind::received("GroupReceipt.kind", t.kind())?;
        }
        K::GroupInfoRequest => {
            let t = table(root.body_as_group_info_request())?;
            required("GroupInfoRequest.group", t.group())?;
        }
        K::GroupInfo => {
            let t = table(root.body_as_group_info())?;
            required("GroupInfo.group", t.group())?;
            GROUP_INFO_MEMBERS.check(vec_len(t.members()))?;
            GROUP_INFO_ADMINS.check(vec_len(t.admins()))?;
            GROUP_INFO_META.check(vec_len(t.meta()))?;
            GROUP_INFO_INVITE_CODE.check(vec_len(t.invite_code()))?;
            GroupPermission::received("GroupInfo.send", t.send())?;
            GroupPermission::received("GroupInfo.edit", t.edit())?;
        }
        K::StatusPost => {
            let t = table(root.body_as_status_post())?;
            required("StatusPost.msg_id", t.msg_id())?;
            StatusAudience::received("StatusPost.audience", t.audience())?;
            STATUS_POST_USERS.check(vec_len(t.users()))?;
            STATUS_POST_BODY.check(vec_len(t.body()))?;
        }
        K::PushRegister => {
            let t = table(root.body_as_push_register())?;
            PushProvider::received("PushRegister.provider", t.provider())?;
            PUSH_REGISTER_TOKEN.check(str_len(t.token()))?;
        }
        K::BroadcastSend => {
            let t = table(root.body_as_broadcast_send())?;
            required("BroadcastSend.msg_id", t.msg_id())?;
            let ciphertexts = t.ciphertexts().unwrap_or_default();
            BROADCAST_SEND_CIPHERTEXTS.check(ciphertexts.len())?;
            for c in ciphertexts {
                DEVICE_CIPHERTEXT_BODY.check(vec_len(c.body()))?;
            }
        }
        K::BroadcastAck => {
            let t = table(root.body_as_broadcast_ack())?;
            required("BroadcastAck.msg_id", t.msg_id())?;
            let results = t.results().unwrap_or_default();
            BROADCAST_ACK_RESULTS.check(results.len())?;
            for r in results {
                SendStatus::received("BroadcastResult.status", r.status())?;
                BROADCAST_RESULT_MISSING.check(vec_len(r.missing()))?;
                BROADCAST_RESULT_EXTRA.check(vec_len(r.extra()))?;
                BROADCAST_RESULT_FULL_DEVICES.check(vec_len(r.full_devices()))?;
            }
        }
        K::GroupSend => {
            let t = table(root.body_as_group_send())?;
            required("GroupSend.group", t.group())?;
            required("GroupSend.msg_id", t.msg_id())?;
            GROUP_SEND_BODY.check(vec_len(t.body()))?;
        }
        K::GroupEvent => {
            let t = table(root.body_as_group_event())?;
            required("GroupEvent.group", t.group())?;
            GROUP_EVENT_ADDED.check(vec_len(t.added()))?;
            GROUP_EVENT_REMOVED.check(vec_len(t.removed()))?;
            GROUP_EVENT_PROMOTED.check(vec_len(t.promoted()))?;
            GROUP_EVENT_DEMOTED.check(vec_len(t.demoted()))?;
        }
        K::MediaUploadRequest => {
            let t = table(root.body_as_media_upload_request())?;
            MEDIA_UPLOAD_REQUEST_SIZE.check(size_len(t.size()))?;
            MEDIA_UPLOAD_REQUEST_SHA256.check(vec_len(t.sha256()))?;
            MEDIA_UPLOAD_REQUEST_CONTENT_TYPE.check(str_len(t.content_type()))?;
        }
        K::MediaUploadGrant => {
            let t = table(root.body_as_media_upload_grant())?;
            MEDIA_UPLOAD_GRANT_MEDIA_ID.check(str_len(t.media_id()))?;
            MEDIA_UPLOAD_GRANT_UPLOAD_URL.check(str_len(t.upload_url()))?;
            MEDIA_UPLOAD_GRANT_DOWNLOAD_URL.check(str_len(t.download_url()))?;
        }
        K::Ping => {
            let t = table(root.body_as_ping())?;
            return Ok(Hot::Ping(Ping { nonce: t.nonce() }));
        }
        K::Error => {
            let t = table(root.body_as_error())?;
            ERROR_MESSAGE.check(str_len(t.message()))?;
        }
        K::GoingAway => {
            let t = table(root.body_as_going_away())?;
            GOING_AWAY_REASON.check(str_len(t.reason()))?;
        }
        K::Migrate => {
            let t = table(root.body_as_migrate())?;
            MIGRATE_WS_URL.check(str_len(t.ws_url()))?;
            MIGRATE_QUIC_ADDR.check(str_len(t.quic_addr()))?;
            MIGRATE_RECONNECT_AFTER_MS.check(size_len(u64::from(t.reconnect_after_ms())))?;
        }
        // Only scalars: the verifier has checked everything there is to check.
        K::Welcome
        | K::RegisterChallenge
        | K::LinkCodeRequest
        | K::RemoveDevice
        | K::DeviceListRequest
        | K::PresenceUpdate
        | K::PrekeyClaim
        | K::PrekeyCountRequest
        | K::PrekeyCount
        | K::Pong
        | K::Done => {}
    }
    Ok(Hot::Other)
}
