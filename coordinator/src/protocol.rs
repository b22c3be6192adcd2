//! Messages on the two listeners, and their bounds. Both use [`crate::channel`] framing.
//!
//! - Raft port: strict request/response of [`PeerRequest`] / [`PeerResponse`], one outstanding
//!   request per connection.
//! - Client port: request/response of [`ClientRequest`] / [`ClientResponse`], except that after
//!   [`ClientRequest::Watch`] the connection only carries server pushes: a
//!   [`ClientResponse::View`] on every applied change and a [`ClientResponse::Keepalive`] every
//!   [`WATCH_KEEPALIVE`].

use std::time::Duration;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::raft_types::TypeConfig;
use crate::state::ClusterConfig;
use crate::types::{ClusterView, HeartbeatAck, NodeId, NodeInfo, ReplicaInfo, StatusReport};

/// Largest Raft RPC frame. Sized for [`MAX_APPEND_ENTRIES`] of the largest command (an ISR
/// change naming [`crate::state::MAX_SHARDS_PER_COMMAND`] shards, about 30 KiB of JSON; a
/// `mark_down` of every member is about 20 KiB) and for a [`SNAPSHOT_CHUNK_BYTES`] chunk
/// (JSON spells a byte as up to 4 characters). Worst case one such buffer per peer connection.
pub const MAX_PEER_FRAME_BYTES: usize = 16 << 20;
/// Largest client frame: a full [`ClusterView`] at [`crate::types::MAX_MEMBERS`] is about
/// 1.5 MiB, plus in-sync sets for every shard: at most 65,536 shards of
/// [`crate::state::MAX_ISR_NODES`] ids (20 digits at worst), about 6 MiB. Worst case one such
/// buffer per client connection (about 100 KiB for a 4096-shard cluster of small ids).
pub const MAX_CLIENT_FRAME_BYTES: usize = 16 << 20;
/// Most log entries per AppendEntries RPC (openraft `max_payload_entries`).
pub const MAX_APPEND_ENTRIES: u64 = 256;
/// Snapshot chunk size on the wire (openraft `snapshot_max_chunk_size`).
pub const SNAPSHOT_CHUNK_BYTES: u64 = 512 << 10;
/// Largest snapshot a replica accepts from the leader; a chunk past it is refused.
pub const MAX_SNAPSHOT_BYTES: u64 = 64 << 20;
/// Most replicas in the initial replica set.
pub const MAX_REPLICAS: usize = 9;
/// A watch connection carries at least one frame this often, so either end notices a dead peer.
pub const WATCH_KEEPALIVE: Duration = Duration::from_secs(2);

/// Replica-to-replica request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum PeerRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

/// Replica-to-replica response.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum PeerResponse {
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// The request broke a bound (e.g. snapshot too large).
    Refused(String),
}

/// What `init` sends to a replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InitSpec {
    pub(crate) config: ClusterConfig,
    pub(crate) replicas: Vec<ReplicaInfo>,
}

/// Client-to-replica request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ClientRequest {
    /// Who are you (id and addresses)? Any replica.
    Describe,
    /// Raft and cluster status as this replica sees it. Any replica.
    Status,
    /// Linearizable read of the view. Leader only.
    View,
    Join(NodeInfo),
    Heartbeat {
        node_id: NodeId,
    },
    Activate {
        node_id: NodeId,
    },
    Drain {
        node_id: NodeId,
    },
    Remove {
        node_id: NodeId,
    },
    /// Change the replication factor (checked here and again when applied).
    SetReplication {
        factor: u32,
    },
    /// A primary changes its shards' in-sync sets (checked when applied).
    ChangeIsr(crate::state::IsrChange),
    /// Change the heartbeat timing, never to a shorter timeout (checked when applied).
    SetHeartbeat {
        interval_ms: u64,
        miss_limit: u32,
    },
    Init(InitSpec),
    /// Turn this connection into a push stream of views. Any replica.
    Watch,
}

/// Replica-to-client response or push.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ClientResponse {
    Described(ReplicaInfo),
    Status(Box<StatusReport>),
    View(Box<ClusterView>),
    Heartbeat(HeartbeatAck),
    Error(WireError),
    Keepalive,
}

/// Stable error codes of the client protocol. The numbers never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The cluster was not created yet (`init`).
    NotInitialized,
    /// `init` of a cluster that exists with another id.
    AlreadyInitialized,
    /// No member with this node id.
    UnknownNode,
    /// The member's state does not allow the operation.
    InvalidTransition,
    /// The cluster holds the maximum number of members.
    TooManyMembers,
    /// The request broke a bound or is malformed.
    InvalidRequest,
    /// This replica is not the leader; see the leader hint.
    NotLeader,
    /// No leader is known right now (election in progress); retry.
    NoLeader,
    /// The replica is shutting down.
    ShuttingDown,
    /// Anything else: a storage or internal failure.
    Internal,
    /// A join of a node id bound to another node key.
    NodeKeyMismatch,
    /// An ISR change from a node that is not the shard's primary at the current epoch.
    NotPrimary,
}

impl ErrorCode {
    /// The stable numeric code.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::NotInitialized => 1,
            ErrorCode::AlreadyInitialized => 2,
            ErrorCode::UnknownNode => 3,
            ErrorCode::InvalidTransition => 4,
            ErrorCode::TooManyMembers => 5,
            ErrorCode::InvalidRequest => 6,
            ErrorCode::NotLeader => 7,
            ErrorCode::NoLeader => 8,
            ErrorCode::ShuttingDown => 9,
            ErrorCode::Internal => 10,
            ErrorCode::NodeKeyMismatch => 11,
            ErrorCode::NotPrimary => 12,
        }
    }

    /// Whether the same request may succeed later or elsewhere without change.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::NotLeader | ErrorCode::NoLeader | ErrorCode::ShuttingDown
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}({})", self, self.code())
    }
}

/// Where the leader is, as a follower knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderHint {
    /// Leader replica id.
    pub replica_id: NodeId,
    /// Leader client address.
    pub client_addr: String,
}

/// An error answer on the client protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// With [`ErrorCode::NotLeader`]: where to go.
    pub leader: Option<LeaderHint>,
}

impl WireError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
            leader: None,
        }
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl From<crate::state::StateError> for WireError {
    fn from(e: crate::state::StateError) -> Self {
        use crate::state::StateError as S;
        let code = match &e {
            S::NotInitialized => ErrorCode::NotInitialized,
            S::AlreadyInitialized { .. } => ErrorCode::AlreadyInitialized,
            S::UnknownNode(_) => ErrorCode::UnknownNode,
            S::InvalidTransition { .. } => ErrorCode::InvalidTransition,
            S::TooManyMembers => ErrorCode::TooManyMembers,
            S::Invalid(_) => ErrorCode::InvalidRequest,
            S::NodeKeyMismatch { .. } => ErrorCode::NodeKeyMismatch,
            S::NotPrimary { .. } => ErrorCode::NotPrimary,
        };
        WireError::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_stable_and_distinct() {
        let all = [
            ErrorCode::NotInitialized,
            ErrorCode::AlreadyInitialized,
            ErrorCode::UnknownNode,
            ErrorCode::InvalidTransition,
            ErrorCode::TooManyMembers,
            ErrorCode::InvalidRequest,
            ErrorCode::NotLeader,
            ErrorCode::NoLeader,
            ErrorCode::ShuttingDown,
            ErrorCode::Internal,
            ErrorCode::NodeKeyMismatch,
            ErrorCode::NotPrimary,
        ];
        let codes: std::collections::BTreeSet<u16> = all.iter().map(|c| c.code()).collect();
        assert_eq!(codes.len(), all.len());
        assert_eq!(ErrorCode::NotLeader.code(), 7);
    }
}
