//! Typed owned frames: what tests, the SDK and the node's control paths build and match on.
//! Every type here has a table of the same name in `schema/ringpost.fbs`; `Frame::encode` and
//! `Frame::decode` convert through the generated code and enforce [`crate::limits`].

use bytes::Bytes;

/// A user: the E.164 phone number as an integer (at most 15 digits), as WhatsApp's JIDs are.
pub type UserId = u64;
/// A device of a user: 1 is the primary, linked devices count up from 2.
pub type DeviceId = u32;
/// 16 client-chosen bytes; (sender device, msg_id) is the idempotency key of a send.
pub type MsgId = [u8; 16];
/// 16 server-chosen random bytes.
pub type GroupId = [u8; 16];

/// One frame on the wire. `req` is chosen by the client for a request and echoed in the reply
/// (and in an `Error` about it); frames the server sends unprompted carry `req == 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub req: u32,
    pub body: Body,
}

impl Frame {
    pub fn new(req: u32, body: impl Into<Body>) -> Self {
        Frame {
            req,
            body: body.into(),
        }
    }
}

/// Every frame type. Direction is noted as c→s (client to server) or s→c.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Hello(Hello),
    Welcome(Welcome),
    Redirect(Redirect),
    RegisterRequest(RegisterRequest),
    RegisterChallenge(RegisterChallenge),
    RegisterVerify(RegisterVerify),
    Registered(Registered),
    LinkCodeRequest(LinkCodeRequest),
    LinkCode(LinkCode),
    LinkDevice(LinkDevice),
    RemoveDevice(RemoveDevice),
    SetRegistrationLock(SetRegistrationLock),
    DeviceListRequest(DeviceListRequest),
    DeviceList(DeviceList),
    Send(Send),
    SendAck(SendAck),
    Deliver(Deliver),
    DeliverAck(DeliverAck),
    Receipt(Receipt),
    PresenceSubscribe(PresenceSubscribe),
    PresenceUpdate(PresenceUpdate),
    SetPrivacy(SetPrivacy),
    Typing(Typing),
    PrekeyUpload(PrekeyUpload),
    PrekeyClaim(PrekeyClaim),
    PrekeyBundle(PrekeyBundle),
    PrekeyCountRequest(PrekeyCountRequest),
    PrekeyCount(PrekeyCount),
    GroupCreate(GroupCreate),
    GroupUpdate(GroupUpdate),
    GroupInfoRequest(GroupInfoRequest),
    GroupInfo(GroupInfo),
    MediaUploadRequest(MediaUploadRequest),
    MediaUploadGrant(MediaUploadGrant),
    Ping(Ping),
    Pong(Pong),
    Done(Done),
    Error(Error),
    GoingAway(GoingAway),
    Migrate(Migrate),
    ContactsUpdate(ContactsUpdate),
    GroupSend(GroupSend),
    GroupEvent(GroupEvent),
    GroupReceipt(GroupReceipt),
    BroadcastSend(BroadcastSend),
    BroadcastAck(BroadcastAck),
    StatusPost(StatusPost),
    PushRegister(PushRegister),
}

/// Which side may send a frame type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Sent by clients only (c→s).
    ToServer,
    /// Sent by the server only (s→c).
    ToClient,
    /// Sent by either side.
    Both,
}

macro_rules! frame_types {
    ($($t:ident = $tag:literal $dir:ident),* $(,)?) => {
        $(impl From<$t> for Body { fn from(v: $t) -> Self { Body::$t(v) } })*

        impl Body {
            /// The frame type's name, for logs and metrics (bounded cardinality).
            pub fn name(&self) -> &'static str {
                self.kind().name()
            }

            /// The frame type without its content.
            pub fn kind(&self) -> FrameKind {
                match self { $(Body::$t(_) => FrameKind::$t,)* }
            }
        }

        /// Every frame type without its content: what [`crate::view::FrameView::kind`] reports
        /// before anything is copied, and a bounded label for metrics. The discriminant is the
        /// `Body` union tag on the wire (stable: new types are appended).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum FrameKind {
            $($t = $tag,)*
        }

        impl FrameKind {
            /// Every frame type, in tag order.
            pub const ALL: &'static [FrameKind] = &[$(FrameKind::$t,)*];

            /// The union tag on the wire.
            pub fn tag(self) -> u8 {
                self as u8
            }

            /// The frame type of a union tag; `None` for 0 (no body) and tags this build does
            /// not know.
            pub fn from_tag(tag: u8) -> Option<FrameKind> {
                match tag {
                    $($tag => Some(FrameKind::$t),)*
                    _ => None,
                }
            }

            /// The type's name, as in the schema (e.g. `"DeliverAck"`).
            pub fn name(self) -> &'static str {
                match self { $(FrameKind::$t => stringify!($t),)* }
            }

            /// Which side may send this frame type.
            pub fn direction(self) -> Direction {
                match self { $(FrameKind::$t => Direction::$dir,)* }
            }
        }

        // The tags above are the schema's: a reordered or missing union member fails the build.
        $(const _: () = assert!(FrameKind::$t as u8 == crate::generated::Body::$t.0);)*
        const _: () = assert!(
            FrameKind::ALL.len() == crate::generated::Body::ENUM_MAX as usize
        );
    };
}

frame_types!(
    Hello = 1 ToServer,
    Welcome = 2 ToClient,
    Redirect = 3 ToClient,
    RegisterRequest = 4 ToServer,
    RegisterChallenge = 5 ToClient,
    RegisterVerify = 6 ToServer,
    Registered = 7 ToClient,
    LinkCodeRequest = 8 ToServer,
    LinkCode = 9 ToClient,
    LinkDevice = 10 ToServer,
    RemoveDevice = 11 ToServer,
    SetRegistrationLock = 12 ToServer,
    DeviceListRequest = 13 ToServer,
    DeviceList = 14 ToClient,
    Send = 15 ToServer,
    SendAck = 16 ToClient,
    Deliver = 17 ToClient,
    DeliverAck = 18 ToServer,
    Receipt = 19 ToServer,
    PresenceSubscribe = 20 ToServer,
    PresenceUpdate = 21 ToClient,
    SetPrivacy = 22 ToServer,
    Typing = 23 Both,
    PrekeyUpload = 24 ToServer,
    PrekeyClaim = 25 ToServer,
    PrekeyBundle = 26 ToClient,
    PrekeyCountRequest = 27 ToServer,
    PrekeyCount = 28 ToClient,
    GroupCreate = 29 ToServer,
    GroupUpdate = 30 ToServer,
    GroupInfoRequest = 31 ToServer,
    GroupInfo = 32 ToClient,
    MediaUploadRequest = 33 ToServer,
    MediaUploadGrant = 34 ToClient,
    Ping = 35 ToServer,
    Pong = 36 ToClient,
    Done = 37 ToClient,
    Error = 38 ToClient,
    GoingAway = 39 ToClient,
    Migrate = 40 ToClient,
    ContactsUpdate = 41 ToServer,
    GroupSend = 42 ToServer,
    GroupEvent = 43 ToClient,
    GroupReceipt = 44 ToServer,
    BroadcastSend = 45 ToServer,
    BroadcastAck = 46 ToClient,
    StatusPost = 47 ToServer,
    PushRegister = 48 ToServer,
);

impl std::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Credentials of a registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub user: UserId,
    pub device: DeviceId,
    /// [`crate::limits::TOKEN_BYTES`] random bytes issued in `Registered`.
    pub token: Bytes,
}

/// c→s, first frame of every connection. Without `auth` the connection may only register or
/// link a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u16,
    pub auth: Option<Auth>,
    /// Free text, at most [`crate::limits::STRING_BYTES_MAX`] bytes.
    pub user_agent: String,
}

/// s→c, the answer to an authenticated or anonymous `Hello` the node accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub protocol_version: u16,
    pub node_id: u64,
    pub epoch: u64,
    pub server_time_ms: u64,
    /// The client should send `Ping` at least this often while idle.
    pub ping_interval_ms: u32,
    /// The node closes a connection it has not heard from for this long.
    pub idle_timeout_ms: u32,
    /// Unacknowledged `Deliver`s the node keeps in flight to this device.
    pub deliver_window: u32,
    pub frame_bytes_max: u32,
}

/// s→c: this node does not own the user's shard at `epoch`; connect to the owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub user: UserId,
    pub epoch: u64,
    /// `ws://host:port` or `wss://host:port` of the owner; empty if it has none.
    pub ws_url: String,
    /// `host:port` of the owner's QUIC listener; empty if it has none.
    pub quic_addr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CodeChannel {
    Sms = 0,
    Voice = 1,
}

/// c→s (anonymous): send a verification code to this number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterRequest {
    pub phone: UserId,
    pub channel: CodeChannel,
}

/// s→c: a code was sent; it is valid for `expires_in_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterChallenge {
    pub expires_in_ms: u32,
    /// The earliest time a new code may be requested.
    pub retry_after_ms: u32,
}

/// c→s (anonymous): prove the number and register a new primary device. Replaces every device
/// of an existing account; a registration lock PIN must then be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterVerify {
    pub phone: UserId,
    pub code: String,
    /// The registration lock PIN, empty if none.
    pub pin: String,
    pub device_name: String,
}

/// s→c: the device is registered; keep `token` secret, it is stored only hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub user: UserId,
    pub device: DeviceId,
    pub token: Bytes,
}

/// c→s (authenticated primary): issue a one-time provisioning code for a new linked device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkCodeRequest {}

/// s→c: the provisioning code, to be shown to the new device (e.g. as a QR code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkCode {
    pub code: String,
    pub expires_in_ms: u32,
}

/// c→s (anonymous): link this device to `user` with a provisioning code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkDevice {
    pub user: UserId,
    pub code: String,
    pub device_name: String,
}

/// c→s (authenticated): remove a device of the caller's account (the primary may remove any,
/// a linked device only itself). Revokes its token and drops its inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveDevice {
    pub device: DeviceId,
}

/// c→s (authenticated primary): set the registration lock PIN; empty clears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetRegistrationLock {
    pub pin: String,
}

/// c→s: which devices does `user` have?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceListRequest {
    pub user: UserId,
}

/// s→c: the devices of `user`, ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList {
    pub user: UserId,
    pub devices: Vec<DeviceId>,
}

/// One ciphertext for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCiphertext {
    pub user: UserId,
    pub device: DeviceId,
    pub body: Bytes,
}

/// c→s: a 1:1 message to `to`, one ciphertext per device of `to` and per other device of the
/// sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub msg_id: MsgId,
    pub to: UserId,
    pub ciphertexts: Vec<DeviceCiphertext>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SendStatus {
    /// Durable on the recipient's owner; will be delivered.
    Ok = 0,
    /// The sender's device lists are stale: see `mismatched`. Nothing was stored.
    MismatchedDevices = 1,
    /// A recipient device's inbox is at its quota: see `full_devices`. Nothing was stored.
    InboxFull = 2,
    /// The recipient does not exist. Nothing was stored.
    UnknownUser = 3,
}

/// Stale device list of one user in a `Send`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MismatchedDevices {
    pub user: UserId,
    pub missing: Vec<DeviceId>,
    pub extra: Vec<DeviceId>,
}

/// s→c: the outcome of a `Send`. A repeated (device, msg_id) gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendAck {
    pub msg_id: MsgId,
    pub status: SendStatus,
    pub server_time_ms: u64,
    pub mismatched: Vec<MismatchedDevices>,
    pub full_devices: Vec<DeviceCiphertextRef>,
    /// For a `GroupSend` answered `Ok`: the message's place in the group's order; else 0.
    pub group_seq: u64,
}

/// A (user, device) pair without a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCiphertextRef {
    pub user: UserId,
    pub device: DeviceId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DeliverKind {
    /// `body` is a ciphertext for this device.
    Message = 0,
    /// The server saw a device of `from_user` ack `receipt_msg_ids`.
    Delivered = 1,
    /// `from_user` read `receipt_msg_ids`.
    Read = 2,
    /// `body` is a group message (one sender-key ciphertext for the whole group `group`);
    /// `group_seq` is its place in the group's order.
    GroupMessage = 3,
    /// `body` is an encoded [`Frame`] holding a [`GroupEvent`]: the group changed.
    GroupEvent = 4,
    /// `body` is a status item `from_user` posted; it expires 24 hours after `server_time_ms`.
    Status = 5,
    /// `from_user` viewed the statuses `receipt_msg_ids` this user posted.
    StatusViewed = 6,
    /// A contact's device (`from_user`, `from_device`) published a new identity key: `body`
    /// is the 64-byte key ([`crate::prekeys`]). Show a security-code change.
    IdentityChanged = 7,
}

/// s→c: one inbox entry for this device. Ack it by `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    pub seq: u64,
    pub kind: DeliverKind,
    pub from_user: UserId,
    pub from_device: DeviceId,
    pub msg_id: MsgId,
    pub server_time_ms: u64,
    pub body: Bytes,
    pub receipt_msg_ids: Vec<MsgId>,
    /// `GroupMessage` and `GroupEvent`: the group and its sequence number. `Delivered` and
    /// `Read` with `group` set: a group's aggregated receipt, `group_seq` the highest seq
    /// among `receipt_msg_ids` (see [`GroupReceipt`]).
    pub group: Option<GroupId>,
    pub group_seq: u64,
}

/// c→s: these entries are safely stored by the client; the server deletes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverAck {
    pub seqs: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReceiptKind {
    Delivered = 0,
    Read = 1,
    /// `msg_ids` are statuses of `to` this user viewed.
    StatusViewed = 2,
}

/// c→s: tell `to` (every device) that these of its messages were read. Routed like a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub msg_id: MsgId,
    pub to: UserId,
    pub kind: ReceiptKind,
    pub msg_ids: Vec<MsgId>,
}

/// c→s: tell me when these users come and go (subject to their privacy settings); replaces
/// the connection's subscription set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceSubscribe {
    pub users: Vec<UserId>,
}

/// s→c: `user` is online, or was last seen at `last_seen_ms` (0: hidden or unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceUpdate {
    pub user: UserId,
    pub online: bool,
    pub last_seen_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Visibility {
    Everyone = 0,
    Contacts = 1,
    Nobody = 2,
}

/// c→s: who may see my last-seen time and that I am online.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetPrivacy {
    pub last_seen: Visibility,
    pub online: Visibility,
}

/// c→s with `user` = recipient (or `group`); s→c with `user` = sender. Never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Typing {
    pub user: UserId,
    pub device: DeviceId,
    pub typing: bool,
    /// Recording a voice note rather than typing.
    pub recording: bool,
    /// Typing in this group (c→s: `user` is ignored; s→c: `user` is the member typing).
    pub group: Option<GroupId>,
}

/// c→s: change my contact list (`add` replaces it when `replace`) and my block list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContactsUpdate {
    pub replace: bool,
    pub add: Vec<UserId>,
    pub remove: Vec<UserId>,
    pub block: Vec<UserId>,
    pub unblock: Vec<UserId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPrekey {
    pub id: u32,
    pub key: Bytes,
    pub signature: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneTimePrekey {
    pub id: u32,
    pub key: Bytes,
    /// The identity key's Ed25519 signature over the key ([`crate::prekeys`]); required in an
    /// upload. The node hands it out with the key, so the claimer can check it too.
    pub signature: Bytes,
}

/// c→s: publish this device's identity key, signed prekey and a batch of one-time prekeys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrekeyUpload {
    pub identity_key: Bytes,
    pub signed_prekey: Option<SignedPrekey>,
    pub one_time: Vec<OneTimePrekey>,
}

/// c→s: hand me a bundle for every device of `user` (or only `device` if non-zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrekeyClaim {
    pub user: UserId,
    pub device: DeviceId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBundle {
    pub device: DeviceId,
    pub identity_key: Bytes,
    pub signed_prekey: Option<SignedPrekey>,
    /// Consumed by this claim. `None` means the fallback (`signed_prekey`) is to be used:
    /// the device ran out, or its user's keys are claimed faster than the per-target budget.
    pub one_time: Option<OneTimePrekey>,
}

/// s→c: the answer to `PrekeyClaim`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrekeyBundle {
    pub user: UserId,
    pub devices: Vec<DeviceBundle>,
}

/// c→s: how many one-time prekeys do I have left?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrekeyCountRequest {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrekeyCount {
    pub count: u32,
}

/// c→s: create a group with these members (the creator is its first admin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCreate {
    pub members: Vec<UserId>,
    /// Encrypted title and the like; the server stores it opaquely.
    pub meta: Bytes,
}

/// c→s (admin): change a group's members, admins or metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupUpdate {
    pub group: GroupId,
    pub add: Vec<UserId>,
    pub remove: Vec<UserId>,
    pub promote: Vec<UserId>,
    pub demote: Vec<UserId>,
    /// Replaces the metadata when non-empty.
    pub meta: Bytes,
    /// The sender leaves (nothing else may be asked with it).
    pub leave: bool,
    /// Who may send (admins only).
    pub send: GroupPermission,
    /// Who may change `meta` (admins only).
    pub edit: GroupPermission,
    pub invite: GroupInvite,
    /// A non-member joins with the invite code (nothing else may be asked with it).
    pub join_code: Bytes,
}

impl GroupUpdate {
    /// An update of `group` that changes nothing yet.
    pub fn new(group: GroupId) -> Self {
        GroupUpdate {
            group,
            add: vec![],
            remove: vec![],
            promote: vec![],
            demote: vec![],
            meta: Bytes::new(),
            leave: false,
            send: GroupPermission::Unchanged,
            edit: GroupPermission::Unchanged,
            invite: GroupInvite::Keep,
            join_code: Bytes::new(),
        }
    }
}

/// Who may do something in a group; `Unchanged` only in a [`GroupUpdate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum GroupPermission {
    #[default]
    Unchanged = 0,
    Members = 1,
    Admins = 2,
}

/// What a [`GroupUpdate`] does to the invite code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum GroupInvite {
    #[default]
    Keep = 0,
    Create = 1,
    Revoke = 2,
}

/// c→s: one message to every member of `group`, encrypted once with the sender's sender key.
/// Answered by `SendAck`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSend {
    pub group: GroupId,
    /// Scoped to the sending device.
    pub msg_id: MsgId,
    pub body: Bytes,
}

/// s→c, only inside the body of a `Deliver` of kind `GroupEvent`: what changed in a group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupEvent {
    pub group: GroupId,
    pub seq: u64,
    pub actor: UserId,
    pub added: Vec<UserId>,
    pub removed: Vec<UserId>,
    pub promoted: Vec<UserId>,
    pub demoted: Vec<UserId>,
    pub meta_changed: bool,
    pub settings_changed: bool,
    /// Membership changed: every member makes a new sender key before its next send.
    pub rotate_sender_keys: bool,
}

/// c→s: this user received (`Delivered`) or read (`Read`) every message of `group` up to
/// and including group sequence `up_to_seq` (a watermark; a lower one changes nothing).
/// Answered by `Done`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupReceipt {
    pub group: GroupId,
    pub kind: ReceiptKind,
    pub up_to_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfoRequest {
    pub group: GroupId,
}

/// s→c: a group's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub group: GroupId,
    pub version: u64,
    pub members: Vec<UserId>,
    pub admins: Vec<UserId>,
    pub meta: Bytes,
    pub send: GroupPermission,
    pub edit: GroupPermission,
    /// The invite code; empty for non-admins or when there is none.
    pub invite_code: Bytes,
}

/// c→s: I want to upload an encrypted blob of `size` bytes whose SHA-256 is `sha256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaUploadRequest {
    pub size: u64,
    /// Exactly 32 bytes: the SHA-256 of the ciphertext.
    pub sha256: Bytes,
    /// Informational, at most `STRING_BYTES_MAX` bytes.
    pub content_type: String,
}

/// s→c: signed URLs for the upload and later downloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaUploadGrant {
    pub media_id: String,
    pub upload_url: String,
    pub download_url: String,
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    pub nonce: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pong {
    pub nonce: u64,
}

/// s→c: the request `req` succeeded and has no other answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {}

/// s→c: the request `req` (or, with `req == 0`, the connection) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// A stable [`crate::ErrorCode`] value; unknown values must be treated as fatal by clients.
    pub code: u16,
    pub message: String,
    /// Milliseconds to wait before retrying, when the error is a rate limit or back-pressure.
    pub retry_after_ms: u32,
    /// The server closes the connection after this frame.
    pub fatal: bool,
}

/// s→c: the node is shutting down or shedding load; reconnect (anywhere) after the delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoingAway {
    pub reconnect_after_ms: u32,
    pub reason: String,
}

/// s→c: a ring change moved the user's shard to another node at `epoch`. Reconnect straight to
/// that node (chosen from `ws_url` and `quic_addr` as for a [`Redirect`]) after
/// `reconnect_after_ms`, at most [`crate::limits::MIGRATE_RECONNECT_AFTER_MS_MAX`]. The node
/// closes the connection after this frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrate {
    pub user: UserId,
    pub epoch: u64,
    /// `ws://host:port` or `wss://host:port` of the new owner; empty if it has none.
    pub ws_url: String,
    /// `host:port` of the new owner's QUIC listener; empty if it has none.
    pub quic_addr: String,
    /// Wait this long before reconnecting: the node draws it per connection from its migrate
    /// interval, so the devices of a moved shard do not all reconnect at once.
    pub reconnect_after_ms: u32,
}

/// c→s: one message to several users (a broadcast list), one ciphertext per device of each
/// recipient (grouped by `DeviceCiphertext::user`). Answered by `BroadcastAck`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastSend {
    /// (sender device, recipient, msg_id) is the idempotency key, as for `Send`.
    pub msg_id: MsgId,
    pub ciphertexts: Vec<DeviceCiphertext>,
}

/// The outcome of a `BroadcastSend` for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastResult {
    pub user: UserId,
    /// As in `SendAck`, for this recipient alone; meaningless when `error` is set.
    pub status: SendStatus,
    pub missing: Vec<DeviceId>,
    pub extra: Vec<DeviceId>,
    pub full_devices: Vec<DeviceId>,
    /// Non-zero: nothing was stored for this recipient; an error code to retry it on.
    pub error: u16,
    pub retry_after_ms: u32,
}

/// s→c: one result per recipient of a `BroadcastSend`, in the order they first appear in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastAck {
    pub msg_id: MsgId,
    pub server_time_ms: u64,
    pub results: Vec<BroadcastResult>,
}

/// Who a status item is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum StatusAudience {
    /// Every user in the poster's contact list.
    #[default]
    Contacts = 0,
    /// The poster's contacts except `users`.
    ContactsExcept = 1,
    /// Only those of `users` in the poster's contact list.
    OnlyShareWith = 2,
}

/// c→s: post a status item (one ciphertext for the whole audience). Answered by `SendAck`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusPost {
    pub msg_id: MsgId,
    pub audience: StatusAudience,
    pub users: Vec<UserId>,
    pub body: Bytes,
}

/// Which push service a device's token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[repr(u8)]
pub enum PushProvider {
    /// The operator's own HTTP endpoint.
    #[default]
    Webhook = 0,
    /// Apple Push Notification service.
    Apns = 1,
    /// Firebase Cloud Messaging (HTTP v1).
    Fcm = 2,
}

/// c→s (authenticated): wake this device through `provider` with `token` while it has no
/// connection; an empty `token` unregisters. Answered by `Done`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRegister {
    pub provider: PushProvider,
    /// At most [`crate::limits::PUSH_TOKEN_BYTES_MAX`] bytes.
    pub token: String,
}
