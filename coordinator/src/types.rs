//! The public data model: what a node announces ([`NodeInfo`]), what the coordinator keeps about
//! it ([`Member`]), and the replicated view every node computes its ring from ([`ClusterView`]).
//!
//! Every string and list here has a bound (the `MAX_*` constants), checked when a request enters
//! the coordinator and again when a command is applied, so a bad client can never grow the
//! replicated state past them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A node's (and a coordinator replica's) id. Chosen by the operator, never 0.
pub type NodeId = u64;

/// Longest advertised address or URL, in bytes. A member costs at most about five of these.
pub const MAX_ADDRESS_BYTES: usize = 256;
/// Longest zone name, in bytes.
pub const MAX_ZONE_BYTES: usize = 64;
/// Longest cluster id, in bytes.
pub const MAX_CLUSTER_ID_BYTES: usize = 64;
/// Most members a cluster may hold. With [`MAX_ADDRESS_BYTES`] per address the worst-case
/// serialized view is about 1.5 MiB, which is what sizes the client frame bound.
pub const MAX_MEMBERS: usize = 1024;
/// Most shards a cluster may be created with (a shard id is a big-endian u16 in node keys).
pub const MAX_SHARD_COUNT: u32 = 65_536;
/// Default shard count for `init`.
pub const DEFAULT_SHARD_COUNT: u32 = 4096;
/// Largest replication factor (copies of a shard, the primary included) accepted at `init` and
/// by `set_replication`. Nodes precompute at most this many nodes per shard each epoch.
pub const MAX_REPLICATION_FACTOR: u32 = 3;
/// Replication factor of a new cluster: two copies once two nodes are active (a one-node
/// cluster has one, see [`ClusterView::copies`]).
pub const DEFAULT_REPLICATION_FACTOR: u32 = 2;
/// Most node ids one `MarkDown` command may carry (one per member at worst).
pub const MAX_NODES_PER_COMMAND: usize = MAX_MEMBERS;
/// Length of a node key as announced: an Ed25519 public key (32 bytes) in lower-case hex.
pub const NODE_KEY_HEX_BYTES: usize = 64;

/// What a node announces when it joins: its id and the addresses others reach it on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's id, unique in the cluster, not 0.
    pub node_id: NodeId,
    /// Plain WebSocket URL clients are redirected to, e.g. `ws://10.0.0.5:8080/ws`.
    pub ws_url: Option<String>,
    /// TLS WebSocket URL, e.g. `wss://n5.example.com/ws`.
    pub wss_url: Option<String>,
    /// QUIC `host:port` for clients.
    pub quic_addr: Option<String>,
    /// `host:port` other nodes use for node-to-node links.
    pub peer_addr: Option<String>,
    /// Failure domain (availability zone, rack); empty if unknown.
    pub zone: String,
    /// The node's own Ed25519 public key (lower-case hex, [`NODE_KEY_HEX_BYTES`] long), with
    /// which it proves its id on peer links. The first join that carries one binds the id to
    /// it: a later join of the same id with another key (or none) is refused until the member
    /// is removed. `None` only in state written before nodes had keys.
    #[serde(default)]
    pub node_key: Option<String>,
}

impl NodeInfo {
    /// A node with only an id; the addresses are filled in by the caller.
    pub fn new(node_id: NodeId) -> Self {
        NodeInfo {
            node_id,
            ws_url: None,
            wss_url: None,
            quic_addr: None,
            peer_addr: None,
            zone: String::new(),
            node_key: None,
        }
    }

    /// The node key's 32 bytes, if it announced a well-formed one.
    pub fn node_key_bytes(&self) -> Option<[u8; 32]> {
        let hex = self.node_key.as_deref()?;
        if hex.len() != NODE_KEY_HEX_BYTES {
            return None;
        }
        let mut key = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let digit = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            key[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(key)
    }

    /// Checks every bound; the coordinator refuses a join that fails it.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_id == 0 {
            return Err("node_id 0 is reserved".into());
        }
        for (name, value) in [
            ("ws_url", &self.ws_url),
            ("wss_url", &self.wss_url),
            ("quic_addr", &self.quic_addr),
            ("peer_addr", &self.peer_addr),
        ] {
            if let Some(v) = value {
                if v.len() > MAX_ADDRESS_BYTES {
                    return Err(format!("{name} longer than {MAX_ADDRESS_BYTES} bytes"));
                }
                if v.chars().any(char::is_control) {
                    return Err(format!("{name} contains control characters"));
                }
            }
        }
        if self.zone.len() > MAX_ZONE_BYTES {
            return Err(format!("zone longer than {MAX_ZONE_BYTES} bytes"));
        }
        if self.zone.chars().any(char::is_control) {
            return Err("zone contains control characters".into());
        }
        if self.node_key.is_some() && self.node_key_bytes().is_none() {
            return Err(format!(
                "node_key must be {NODE_KEY_HEX_BYTES} lower-case hex digits (an Ed25519 public key)"
            ));
        }
        Ok(())
    }
}

/// Where a member is in its life. Only [`MemberState::Active`] members own shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Known, not yet owning shards (fresh join, or back after being down).
    Joining,
    /// Owns shards.
    Active,
    /// Handing its shards off; owns none.
    Draining,
    /// Missed too many heartbeats; owns none until it heartbeats again and is re-activated.
    Down,
}

impl MemberState {
    /// Whether a member in this state owns shards (is on the ring).
    pub fn owns_shards(self) -> bool {
        matches!(self, MemberState::Active)
    }

    /// Lower-case name, as on the wire and in `ctl` output.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Active => "active",
            MemberState::Draining => "draining",
            MemberState::Down => "down",
        }
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node as the coordinator keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// What the node announced at its last join.
    pub info: NodeInfo,
    /// Its state.
    pub state: MemberState,
    /// Leader wall clock (ms since the Unix epoch) when `state` was last set; bookkeeping only,
    /// never used for decisions.
    pub state_since_ms: u64,
}

impl Member {
    /// The member's node id.
    pub fn node_id(&self) -> NodeId {
        self.info.node_id
    }
}

/// The replicated cluster state as nodes see it; nodes compute the ring from it.
///
/// Views are totally ordered by `revision` (the Raft log index of the last change): a client that
/// sees a view never sees an older one afterwards. `epoch` changes exactly when the placement
/// nodes compute from the view can change: the set of members that own shards (the `active`
/// ones), the zone of one of them, or the number of copies per shard ([`ClusterView::copies`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// Random id fixed at `init`.
    pub cluster_id: String,
    /// Ring epoch: incremented whenever the placement changes (see the type's documentation).
    pub epoch: u64,
    /// Raft log index of the last change to this view.
    pub revision: u64,
    /// Number of shards, fixed at `init`.
    pub shard_count: u32,
    /// Copies wanted of each shard, the primary included (1..=[`MAX_REPLICATION_FACTOR`]); set
    /// at `init`, changed by `set_replication`. A shard has [`ClusterView::copies`] of them.
    pub replication_factor: u32,
    /// How often nodes should heartbeat, fixed at `init`.
    pub heartbeat_interval_ms: u64,
    /// Missed heartbeats after which the leader marks a node down, fixed at `init`.
    pub heartbeat_miss_limit: u32,
    /// Every member, sorted by node id.
    pub members: Vec<Member>,
    /// In-sync replica sets of the shards that have one, each **primary first**: such a
    /// shard's primary is its entry's first node, not the hash owner (see
    /// [`crate::state`] for how entries change).
    pub in_sync_replicas: BTreeMap<u32, Vec<NodeId>>,
}

impl ClusterView {
    /// The member with this id.
    pub fn member(&self, node_id: NodeId) -> Option<&Member> {
        self.members
            .binary_search_by_key(&node_id, Member::node_id)
            .ok()
            .map(|i| &self.members[i])
    }

    /// Members that own shards, by node id.
    pub fn owners(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.state.owns_shards())
    }

    /// Nodes each shard is placed on (its primary and its replicas): the replication factor,
    /// or fewer while fewer members are active; 0 when none is.
    pub fn copies(&self) -> u32 {
        effective_copies(self.replication_factor, self.owners().count())
    }
}

/// Copies of each shard with replication factor `factor` and `active` shard-owning members:
/// `min(factor, active)`. One definition, used by the coordinator (to decide when the epoch
/// changes) and by nodes (to compute placement).
pub fn effective_copies(factor: u32, active: usize) -> u32 {
    factor.min(u32::try_from(active).unwrap_or(u32::MAX))
}

/// One coordinator replica as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// Replica id.
    pub replica_id: NodeId,
    /// Address other replicas reach it on.
    pub raft_addr: String,
    /// Address clients reach it on.
    pub client_addr: String,
}

/// What one replica says about itself and the cluster (`ctl status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The answering replica.
    pub replica: ReplicaInfo,
    /// Its Raft role: `leader`, `follower`, `candidate` or `learner`.
    pub raft_role: String,
    /// Current Raft term.
    pub term: u64,
    /// Current leader, if known.
    pub leader_id: Option<NodeId>,
    /// Last log index, if any.
    pub last_log_index: Option<u64>,
    /// Last applied log index, if any.
    pub last_applied_index: Option<u64>,
    /// The voting replica set.
    pub replicas: Vec<ReplicaInfo>,
    /// This replica's applied view (may lag the leader); `None` before `init`.
    pub view: Option<ClusterView>,
}

/// The leader's answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// The node's state after the heartbeat (a down node comes back as `joining`).
    pub state: MemberState,
    /// Current ring epoch.
    pub epoch: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_info_bounds() {
        let mut n = NodeInfo::new(7);
        assert!(n.validate().is_ok());
        n.ws_url = Some("x".repeat(MAX_ADDRESS_BYTES + 1));
        assert!(n.validate().is_err());
        n.ws_url = Some("ws://a\n".into());
        assert!(n.validate().is_err());
        n.ws_url = None;
        n.zone = "z".repeat(MAX_ZONE_BYTES + 1);
        assert!(n.validate().is_err());
        n.zone.clear();
        assert!(NodeInfo::new(0).validate().is_err());
        for bad in ["ab", &"A".repeat(64), &"g".repeat(64), &"0".repeat(66)] {
            n.node_key = Some(bad.to_string());
            assert!(n.validate().is_err(), "{bad}");
        }
        n.node_key = Some(format!("{}ff", "0a".repeat(31)));
        assert!(n.validate().is_ok());
        let key = n.node_key_bytes().unwrap();
        assert_eq!((key[0], key[30], key[31]), (0x0a, 0x0a, 0xff));
    }

    #[test]
    fn copies_are_capped_by_active_members() {
        assert_eq!(effective_copies(2, 0), 0);
        assert_eq!(effective_copies(2, 1), 1);
        assert_eq!(effective_copies(2, 5), 2);
        assert_eq!(effective_copies(3, 3), 3);
    }

    #[test]
    fn only_active_owns_shards() {
        assert!(MemberState::Active.owns_shards());
        for s in [
            MemberState::Joining,
            MemberState::Draining,
            MemberState::Down,
        ] {
            assert!(!s.owns_shards());
        }
    }
}
