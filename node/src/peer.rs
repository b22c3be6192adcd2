//! Node-to-node traffic: the authenticated QUIC links ([`link`]) and what nodes ask of each
//! other over them.
//!
//! Every request carries the sender's ring epoch. The receiver first catches up to that epoch
//! (it may have missed a watch update), then serves the request only if it owns the shard in
//! question at its own epoch and has taken it over; otherwise it answers
//! [`PeerResponse::WrongOwner`] with its epoch, and the sender waits for its own view to move
//! and routes again. Messages are postcard-encoded serde values; [`PEER_PROTOCOL_VERSION`] is
//! checked on every request so that a node of another version is refused clearly.
//!
//! The hand-off requests (`Holdings`, `Export`, `Release`) are served only to the node that the
//! receiver's ring names as the owner of every shard asked ([`handoff_role`]); anyone else gets
//! `Error{Forbidden}`; so is `Replicate` to anyone but the shards' primary ([`replica_role`]).
//! An answer that cannot be encoded, or would not fit in one link frame, is
//! logged and replaced by `Error{Internal}` ([`encode_response`]), never sent empty.

pub mod handoff_role;
pub mod link;
pub mod replica_role;
pub mod replicate;

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use ringpost_coordinator::NodeId;
use ringpost_wire::{DeviceId, MsgId, UserId};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::handoff::{Chunk, Cursor, ShardDigest};
use crate::replication::{RecordPart, ShardAnswer};
use crate::server::Server;
use crate::shard::ShardId;

/// Version of the messages below; bumped on any incompatible change.
/// 2: `Typing` carries `recording`; the presence requests (`PresenceWatch`, `PresenceUnwatch`,
/// `PresenceChanged`) and `PeerResponse::PresenceViews`; the group families joined `SHARD_CFS`
/// and the group requests were added.
/// 3: `Blockers`, `GroupTyping` and `PeerResponse::Users`; group logs may hold receipt records;
/// `Store` carries `require_contact` (broadcast lists) and `expires_at_ms` (statuses).
/// Still 3: `StoreKind::IdentityChanged` was appended (older messages decode unchanged; a node
/// without it refuses only that store, and the upload announcing it answers the error).
pub const PEER_PROTOCOL_VERSION: u16 = 3;
/// How long a forwarded request may take before the sender gives up on that attempt.
pub const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Which kind of inbox entry a [`Store`] creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreKind {
    Message,
    Delivered,
    Read,
    GroupMessage,
    GroupEvent,
    /// A status item ([`crate::status`]).
    Status,
    StatusViewed,
    /// An identity-key change announced to a contact ([`crate::keys::serve`]).
    IdentityChanged,
}

/// Who gets an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Targets {
    /// One ciphertext per device; the set must equal the recipient's devices (minus
    /// [`Store::except`]) or the store answers [`Stored::Mismatched`].
    Exact(Vec<(DeviceId, Vec<u8>)>),
    /// The same body for every device of the recipient (minus [`Store::except`]): receipts.
    AllDevices(Vec<u8>),
}

/// Entries for the devices of one user, executed on that user's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    pub to_user: UserId,
    pub from_user: UserId,
    pub from_device: DeviceId,
    pub msg_id: MsgId,
    pub kind: StoreKind,
    pub targets: Targets,
    /// A device of `to_user` that gets no copy (the sender, when it writes to its own user).
    pub except: Option<DeviceId>,
    pub receipt_msg_ids: Vec<MsgId>,
    /// Deduplicate by (from_user, from_device, msg_id).
    pub dedup: bool,
    /// Store only if `to_user` has `from_user` in its contacts (a broadcast list, see
    /// [`crate::broadcast`]); otherwise answer as if stored and drop it, like a block.
    pub require_contact: bool,
    /// When the entries expire, if sooner than the inbox's retention (a status); 0: retention.
    pub expires_at_ms: u64,
}

/// What a [`Store`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stored {
    /// Durable on the owner.
    Stored {
        server_time_ms: u64,
    },
    Duplicate {
        server_time_ms: u64,
    },
    Full {
        devices: Vec<DeviceId>,
    },
    Mismatched {
        missing: Vec<DeviceId>,
        extra: Vec<DeviceId>,
    },
    UnknownUser,
    /// Not stored: an error code of the client protocol and why.
    Refused {
        code: u16,
        message: String,
        retry_after_ms: u32,
    },
}

/// A request from one node to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    Store(Store),
    /// A typing indicator for the connected devices of `to`.
    Typing {
        to: UserId,
        from_user: UserId,
        from_device: DeviceId,
        typing: bool,
        recording: bool,
    },
    /// A client request about another user answered by that user's owner: an encoded
    /// `DeviceListRequest` or `PrekeyClaim` frame. The answer is [`PeerResponse::Frames`].
    Query {
        from_user: UserId,
        from_device: DeviceId,
        frame: Vec<u8>,
    },
    /// Hand-off, asked by a shard's new owner: which of these shards (none of which the
    /// receiver owns at `epoch`) does the receiver hold rows for? The receiver first closes
    /// them for writes and waits for its writer, so nothing is committed to them afterwards.
    /// Like `Export` and `Release`, refused with `Error{Forbidden}` unless the sender owns
    /// every shard asked at the receiver's epoch.
    Holdings {
        shards: Vec<ShardId>,
    },
    /// Hand-off: the next chunk of a shard's rows (only for the shard's owner).
    Export {
        shard: ShardId,
        from: Option<Cursor>,
        max_bytes: u32,
    },
    /// Hand-off: the new owner has stored the shard durably (digest of what it received,
    /// leaving out dedup records expiring by `dedup_cutoff_ms`); the receiver deletes its copy
    /// if it still matches (only for the shard's owner).
    Release {
        shard: ShardId,
        digest: ShardDigest,
        dedup_cutoff_ms: u64,
    },
    /// Replication, from a shard's primary to its replicas: records of the shards' logs, in
    /// LSN order per shard, several shards per frame; a record larger than a frame comes in
    /// consecutive parts over consecutive requests ([`crate::replication::part`]). Served only
    /// if the receiver's ring (at the sender's epoch or later) names the sender as the primary
    /// of every shard named and the receiver as one of its replicas ([`replica_role`]).
    /// Answered with [`PeerResponse::Replicated`].
    Replicate {
        parts: Vec<RecordPart>,
    },
    // ---- presence ([`crate::presence`]) -------------------------------------------------
    /// To the owner of `targets` (at most PRESENCE_USERS_MAX): their states and the grants of
    /// `viewers` (at most PRESENCE_VIEWERS_PER_CALL_MAX); with `register`, the sender is
    /// interested in their changes from now on. Answered with [`PeerResponse::PresenceViews`].
    PresenceWatch {
        register: bool,
        targets: Vec<UserId>,
        viewers: Vec<UserId>,
    },
    /// To the owner: the sender no longer watches `targets`. Answered with `Done`.
    PresenceUnwatch {
        targets: Vec<UserId>,
    },
    /// From the owner to an interested node: `target` changed (its raw state; with
    /// `policy_changed`, its privacy, contacts or blocks, so grants must be asked again).
    /// Answered with `Done`, or `Error{NotFound}` if no viewer there watches it any more.
    PresenceChanged {
        target: UserId,
        raw: crate::presence::RawPresence,
        policy_changed: bool,
    },
    // --- groups (crate::groups) ---
    /// A device's group request (`GroupCreate`, `GroupUpdate`, `GroupInfoRequest`,
    /// `GroupSend`, encoded) for the owner of `group`'s shard; a create's id is `group`.
    /// Answered with [`PeerResponse::Frames`].
    Group {
        from_user: UserId,
        from_device: DeviceId,
        group: ringpost_wire::GroupId,
        frame: Vec<u8>,
    },
    /// A group's fan-out: one log record for the members the receiver owns. Answered with
    /// [`PeerResponse::GroupStored`], one result per member in order.
    GroupFanout(crate::groups::fanout::GroupBatch),
    /// Which of `users` (the receiver's, at most `GROUP_MEMBERS_MAX`) block `actor`? Asked by
    /// a group's owner before a create or an add. Answered with [`PeerResponse::Users`].
    Blockers {
        actor: UserId,
        users: Vec<UserId>,
    },
    /// A group's typing indicator for the connected devices of `to` (members of `group` the
    /// receiver owns, at most `GROUP_MEMBERS_MAX`), from the group's owner. Answered `Done`.
    GroupTyping {
        group: ringpost_wire::GroupId,
        to: Vec<UserId>,
        from_user: UserId,
        from_device: DeviceId,
        typing: bool,
        recording: bool,
    },
}

/// A request and the epoch it was routed at.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u16,
    pub epoch: u64,
    pub request: PeerRequest,
}

/// The answer to a [`PeerRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerResponse {
    Stored(Stored),
    Done,
    Frames(Vec<Vec<u8>>),
    Holdings(Vec<ShardId>),
    Chunk(Chunk),
    /// The shard's rows changed since the digest was taken: pull again.
    DigestMismatch,
    /// The receiver does not own (or no longer holds) what was asked at its `epoch`.
    WrongOwner {
        epoch: u64,
    },
    /// The request could not be served: an error code of the client protocol and why.
    Error {
        code: u16,
        message: String,
    },
    /// The answer to `Replicate`: per shard named, how far the copy is (applied LSN) or why it
    /// refused the records.
    Replicated(Vec<ShardAnswer>),
    /// The answer to `PresenceWatch`, one per target asked.
    PresenceViews(Vec<crate::presence::PresenceView>),
    /// The answer to `GroupFanout`.
    GroupStored(Vec<Stored>),
    /// The answer to `Blockers`.
    Users(Vec<UserId>),
}

/// Encodes a request for [`link::PeerNet::call`]. Fails (rather than sending an empty or
/// truncated body) if the request cannot be serialised or is larger than a link frame.
pub fn encode_request(epoch: u64, request: PeerRequest) -> Result<Bytes, String> {
    let envelope = Envelope {
        version: PEER_PROTOCOL_VERSION,
        epoch,
        request,
    };
    encode_bounded(&envelope).map_err(|e| format!("cannot encode peer request: {e}"))
}

/// Decodes a response; a peer's garbage is an error, never a panic.
pub fn decode_response(bytes: &[u8]) -> Result<PeerResponse, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("undecodable peer response: {e}"))
}

/// Encodes a response. One that cannot be serialised, or that would not fit in a link frame
/// (the link would close rather than send it, failing every call in flight on it), is logged
/// and replaced by an explicit [`PeerResponse::Error`] (`Internal`), never sent as an empty
/// or truncated body.
pub fn encode_response(response: &PeerResponse) -> Bytes {
    encode_or_refuse(response, None)
}

/// [`encode_response`] for any serialisable answer (the error path is testable this way) to
/// node `to`, if known (for the log).
fn encode_or_refuse<T: Serialize>(response: &T, to: Option<NodeId>) -> Bytes {
    match encode_bounded(response) {
        Ok(bytes) => bytes,
        Err(e) => {
            let message = format!("the answer could not be encoded: {e}");
            warn!(peer = ?to, error = %e,
                "peer answer not encoded; answering Error(Internal) instead");
            let refusal = PeerResponse::Error {
                code: ringpost_wire::ErrorCode::Internal as u16,
                message,
            };
            // A short error message always encodes and fits.
            encode_bounded(&refusal).unwrap_or_else(|_| Bytes::from_static(REFUSAL_FALLBACK))
        }
    }
}

/// `value` serialised, if it serialises and fits in one link frame.
fn encode_bounded<T: Serialize>(value: &T) -> Result<Bytes, String> {
    let bytes = postcard::to_allocvec(value).map_err(|e| e.to_string())?;
    if bytes.len() > link::PEER_FRAME_BYTES_MAX {
        return Err(format!(
            "{} bytes, over PEER_FRAME_BYTES_MAX ({})",
            bytes.len(),
            link::PEER_FRAME_BYTES_MAX
        ));
    }
    Ok(Bytes::from(bytes))
}

/// `PeerResponse::Error { code: Internal, message: "" }` in postcard, written out by hand for
/// the case (which cannot happen) where even that fails to encode.
const REFUSAL_FALLBACK: &[u8] = &[7, 50, 0];

/// Serves other nodes' requests on this node's [`Server`].
pub struct NodePeerService {
    /// Weak: the link must not keep a stopped server alive.
    pub server: Weak<Server>,
}

impl link::PeerService for NodePeerService {
    fn call(&self, from: NodeId, request: Bytes) -> BoxFuture<'static, Bytes> {
        let Some(server) = self.server.upgrade() else {
            return Box::pin(async {
                encode_response(&PeerResponse::Error {
                    code: ringpost_wire::ErrorCode::ShuttingDown as u16,
                    message: "node is stopping".into(),
                })
            });
        };
        let envelope: Envelope = match postcard::from_bytes(&request) {
            Ok(e) => e,
            Err(e) => {
                let message = format!("undecodable peer request: {e}");
                return Box::pin(async move {
                    encode_response(&PeerResponse::Error {
                        code: ringpost_wire::ErrorCode::Malformed as u16,
                        message,
                    })
                });
            }
        };
        if envelope.version != PEER_PROTOCOL_VERSION {
            let message = format!(
                "peer protocol version {} is not spoken here ({PEER_PROTOCOL_VERSION})",
                envelope.version
            );
            return Box::pin(async move {
                encode_response(&PeerResponse::Error {
                    code: ringpost_wire::ErrorCode::UnsupportedVersion as u16,
                    message,
                })
            });
        }
        let answer = Server::serve_peer(&server, from, envelope.epoch, envelope.request);
        Box::pin(async move { encode_or_refuse(&answer.await, Some(from)) })
    }
}

/// Keeps `Arc<Server>` out of the signature of callers that only hold the service.
pub fn service(server: &Arc<Server>) -> Arc<NodePeerService> {
    Arc::new(NodePeerService {
        server: Arc::downgrade(server),
    })
}

#[cfg(test)]
mod tests;

/// Peer links look other nodes' keys up in this node's view of the membership. Holds the
/// server weakly: the server holds the peer network, which holds this.
pub struct MembershipKeys(pub Weak<Server>);

impl link::PeerDirectory for MembershipKeys {
    fn node_key(
        &self,
        node: NodeId,
        wait: Duration,
    ) -> BoxFuture<'_, Option<[u8; crate::node_key::PUBLIC_KEY_BYTES]>> {
        Box::pin(async move {
            let server = self.0.upgrade()?;
            server.routing.node_key(node, wait).await
        })
    }
}
