//! The openraft type configuration: what a log entry carries ([`Command`]), what applying one
//! returns ([`ApplyOutcome`]), and what a replica's address book entry is ([`RaftNode`]).

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{ApplyOutcome, Command};

/// A coordinator replica as Raft membership records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftNode {
    /// `host:port` other replicas send Raft RPCs to.
    pub raft_addr: String,
    /// `host:port` clients use; sent as the leader hint in `NotLeader` answers.
    pub client_addr: String,
}

impl fmt::Display for RaftNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} client={}", self.raft_addr, self.client_addr)
    }
}

openraft::declare_raft_types!(
    /// The coordinator's Raft types.
    pub TypeConfig:
        D = Command,
        R = ApplyOutcome,
        NodeId = u64,
        Node = RaftNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The coordinator's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// Raft's storage error for this config.
pub type StorageError = openraft::StorageError<u64>;
