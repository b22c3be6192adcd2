//! The replicated state machine, sans-IO: [`ClusterState::apply`] takes a committed
//! [`Command`] and its log index and changes the state deterministically. Every replica applies
//! the same commands in the same order, so every replica computes the same epoch.
//!
//! Transitions (anything else is [`StateError::InvalidTransition`]):
//!
//! | command  | from                         | to       | epoch bump            |
//! |----------|------------------------------|----------|-----------------------|
//! | join     | absent, down                 | joining  | no                    |
//! | join     | joining, active, draining    | same     | no (addresses update) |
//! | activate | joining, draining, active    | active   | if it was not active  |
//! | drain    | joining, active, draining, down | draining | if it was active   |
//! | remove   | any                          | absent   | if it was active      |
//! | mark_down| joining, active, draining    | down     | if it was active      |
//! | revive   | down                         | joining  | no                    |
//! | set_replication | (cluster-wide: factor 1..=3) | —   | if the copies change  |
//!
//! The epoch is computed, not hand-maintained: after each command the placement key (the
//! shard-owning members with their zones, and the copies per shard, `min(replication factor,
//! active members)`) is compared with the key before it, and the epoch increments iff they
//! differ. So the table every node computes (primaries and replicas) changes only with the
//! epoch: raising the factor from 2 to 3 on a three-node cluster bumps it, on a two-node cluster
//! it does not (still two copies), and neither moves a primary. A join that changes an active
//! member's zone bumps it too (replica placement follows zones).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::types::{
    effective_copies, ClusterView, Member, MemberState, NodeId, NodeInfo, MAX_CLUSTER_ID_BYTES,
    MAX_MEMBERS, MAX_NODES_PER_COMMAND, MAX_REPLICATION_FACTOR, MAX_SHARD_COUNT,
};

/// Shortest node heartbeat interval accepted at `init`.
pub const MIN_HEARTBEAT_INTERVAL_MS: u64 = 10;
/// Longest node heartbeat interval accepted at `init`.
pub const MAX_HEARTBEAT_INTERVAL_MS: u64 = 60_000;
/// Largest missed-heartbeat limit accepted at `init`.
pub const MAX_HEARTBEAT_MISS_LIMIT: u32 = 100;
/// Largest replication factor versions before `set_replication` accepted at `init`. An `init`
/// already committed with such a factor still applies (its log and snapshots stay readable),
/// and the view reports it capped at [`MAX_REPLICATION_FACTOR`]; new requests are held to that.
pub const LEGACY_MAX_REPLICATION_FACTOR: u32 = 16;

/// Parameters set when the cluster is created. All are fixed for its life except the
/// replication factor (`set_replication`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Cluster id.
    pub cluster_id: String,
    /// Shard count.
    pub shard_count: u32,
    /// Replication factor: copies wanted of each shard, the primary included.
    pub replication_factor: u32,
    /// How often nodes heartbeat.
    pub heartbeat_interval_ms: u64,
    /// Missed heartbeats before the leader marks a node down.
    pub heartbeat_miss_limit: u32,
}

impl ClusterConfig {
    /// Checks every bound: what a new `init` request must satisfy.
    pub fn validate(&self) -> Result<(), StateError> {
        self.validate_with(MAX_REPLICATION_FACTOR)
    }

    /// Checks every bound as a committed `init` (or a snapshot) must satisfy it: an older
    /// version may have committed a replication factor up to [`LEGACY_MAX_REPLICATION_FACTOR`].
    fn validate_committed(&self) -> Result<(), StateError> {
        self.validate_with(LEGACY_MAX_REPLICATION_FACTOR)
    }

    fn validate_with(&self, max_replication_factor: u32) -> Result<(), StateError> {
        let bad = |m: String| Err(StateError::Invalid(m));
        if self.cluster_id.is_empty() || self.cluster_id.len() > MAX_CLUSTER_ID_BYTES {
            return bad(format!(
                "cluster_id must be 1..={MAX_CLUSTER_ID_BYTES} bytes"
            ));
        }
        if !self
            .cluster_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return bad("cluster_id may hold only [A-Za-z0-9._-]".into());
        }
        if !(1..=MAX_SHARD_COUNT).contains(&self.shard_count) {
            return bad(format!("shard_count must be 1..={MAX_SHARD_COUNT}"));
        }
        if !(1..=max_replication_factor).contains(&self.replication_factor) {
            return bad(format!(
                "replication_factor must be 1..={MAX_REPLICATION_FACTOR}"
            ));
        }
        if !(MIN_HEARTBEAT_INTERVAL_MS..=MAX_HEARTBEAT_INTERVAL_MS)
            .contains(&self.heartbeat_interval_ms)
        {
            return bad(format!(
                "heartbeat_interval_ms must be {MIN_HEARTBEAT_INTERVAL_MS}..={MAX_HEARTBEAT_INTERVAL_MS}"
            ));
        }
        if !(1..=MAX_HEARTBEAT_MISS_LIMIT).contains(&self.heartbeat_miss_limit) {
            return bad(format!(
                "heartbeat_miss_limit must be 1..={MAX_HEARTBEAT_MISS_LIMIT}"
            ));
        }
        Ok(())
    }
}

/// A change to the cluster state: the application payload of a Raft log entry.
///
/// Times (`at_ms`) are the proposing leader's wall clock, carried in the entry so that applying it
/// is deterministic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Create the cluster (once).
    Init(ClusterConfig),
    /// A node joins or re-announces its addresses.
    Join {
        /// The node.
        info: NodeInfo,
        /// Leader wall clock.
        at_ms: u64,
    },
    /// A node starts owning shards.
    Activate {
        /// The node.
        node_id: NodeId,
        /// Leader wall clock.
        at_ms: u64,
    },
    /// A node hands its shards off.
    Drain {
        /// The node.
        node_id: NodeId,
        /// Leader wall clock.
        at_ms: u64,
    },
    /// A node is forgotten.
    Remove {
        /// The node.
        node_id: NodeId,
    },
    /// The failure detector saw these nodes miss too many heartbeats.
    MarkDown {
        /// The nodes (at most [`MAX_NODES_PER_COMMAND`]).
        node_ids: Vec<NodeId>,
        /// Leader wall clock.
        at_ms: u64,
    },
    /// A down node heartbeated again.
    Revive {
        /// The node.
        node_id: NodeId,
        /// Leader wall clock.
        at_ms: u64,
    },
    /// The operator changes the replication factor (`ctl set-replication`).
    SetReplication {
        /// Copies wanted of each shard, 1..=[`MAX_REPLICATION_FACTOR`].
        factor: u32,
    },
}

/// Checks a replication factor asked for by `set_replication`; the service checks it before
/// proposing and `apply` again, so a bad entry can never change the state.
pub fn validate_replication_factor(factor: u32) -> Result<(), StateError> {
    if (1..=MAX_REPLICATION_FACTOR).contains(&factor) {
        Ok(())
    } else {
        Err(StateError::Invalid(format!(
            "replication factor must be 1..={MAX_REPLICATION_FACTOR}, not {factor}"
        )))
    }
}

/// What the ring nodes compute depends on, and nothing else: the shard-owning members with
/// their zones, and the copies per shard. The epoch changes iff this does.
#[derive(Debug, PartialEq, Eq)]
struct PlacementKey {
    owners: Vec<(NodeId, String)>,
    copies: u32,
}

/// Why a command was refused. Refusals are deterministic, so every replica refuses the same
/// commands, and none of them changes the state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateError {
    /// The cluster was not created yet.
    #[error("cluster not initialized")]
    NotInitialized,
    /// `init` on a cluster that exists with another id.
    #[error("cluster already initialized as {cluster_id}")]
    AlreadyInitialized {
        /// The existing cluster id.
        cluster_id: String,
    },
    /// No member with this id.
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// The member is in a state the command does not apply to.
    #[error("node {node_id} is {state}: cannot {command}")]
    InvalidTransition {
        /// The node.
        node_id: NodeId,
        /// Its state.
        state: MemberState,
        /// The refused command.
        command: String,
    },
    /// A join of a node id whose member is bound to another node key.
    #[error(
        "node {node_id} is bound to another node key: the node that joined with this id first \
         holds it (if its data directory was lost for good, `ctl remove {node_id}` first, or \
         give the new node another id)"
    )]
    NodeKeyMismatch {
        /// The node.
        node_id: NodeId,
    },
    /// The cluster already holds [`MAX_MEMBERS`] members.
    #[error("cluster is full ({MAX_MEMBERS} members)")]
    TooManyMembers,
    /// A bound or format check failed.
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// The outcome of applying one log entry: the Raft response type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyOutcome {
    /// A blank or membership entry: nothing for the application.
    Nothing,
    /// The command was applied; `revision` is the view revision after it.
    Applied {
        /// View revision after the command.
        revision: u64,
    },
    /// The command was refused; the state is unchanged.
    Refused(StateError),
}

/// The whole replicated state. Snapshots are this struct, serialized.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    config: Option<ClusterConfig>,
    epoch: u64,
    revision: u64,
    members: BTreeMap<NodeId, Member>,
    in_sync_replicas: BTreeMap<u32, Vec<NodeId>>,
}

impl ClusterState {
    /// Whether `init` was applied.
    pub fn is_initialized(&self) -> bool {
        self.config.is_some()
    }

    /// Current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Revision (log index of the last change).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The view nodes see, or `None` before `init`.
    pub fn view(&self) -> Option<ClusterView> {
        let c = self.config.as_ref()?;
        Some(ClusterView {
            cluster_id: c.cluster_id.clone(),
            epoch: self.epoch,
            revision: self.revision,
            shard_count: c.shard_count,
            replication_factor: c.replication_factor.min(MAX_REPLICATION_FACTOR),
            heartbeat_interval_ms: c.heartbeat_interval_ms,
            heartbeat_miss_limit: c.heartbeat_miss_limit,
            members: self.members.values().cloned().collect(),
            in_sync_replicas: self.in_sync_replicas.clone(),
        })
    }

    /// Checks the bounds a deserialized state (a snapshot from a peer) must satisfy.
    pub fn validate(&self) -> Result<(), StateError> {
        if let Some(c) = &self.config {
            c.validate_committed()?;
        }
        if self.members.len() > MAX_MEMBERS {
            return Err(StateError::TooManyMembers);
        }
        for (id, m) in &self.members {
            if *id != m.info.node_id {
                return Err(StateError::Invalid(format!("member key {id} != node id")));
            }
            m.info.validate().map_err(StateError::Invalid)?;
        }
        Ok(())
    }

    fn placement_key(&self) -> PlacementKey {
        let owners: Vec<(NodeId, String)> = self
            .members
            .values()
            .filter(|m| m.state.owns_shards())
            .map(|m| (m.node_id(), m.info.zone.clone()))
            .collect();
        let factor = self
            .config
            .as_ref()
            .map_or(1, |c| c.replication_factor.min(MAX_REPLICATION_FACTOR));
        PlacementKey {
            copies: effective_copies(factor, owners.len()),
            owners,
        }
    }

    /// Applies a committed command at log `index`. On `Ok` the state may have changed (and then
    /// `revision == index`); on `Err` it has not changed at all.
    pub fn apply(&mut self, index: u64, command: &Command) -> Result<u64, StateError> {
        let placement_before = self.placement_key();
        let changed = self.apply_inner(command)?;
        if changed {
            self.revision = index;
            if self.placement_key() != placement_before {
                self.epoch += 1;
            }
        }
        Ok(self.revision)
    }

    fn apply_inner(&mut self, command: &Command) -> Result<bool, StateError> {
        if let Command::Init(config) = command {
            config.validate_committed()?;
            return match &self.config {
                Some(c) if c.cluster_id == config.cluster_id => Ok(false),
                Some(c) => Err(StateError::AlreadyInitialized {
                    cluster_id: c.cluster_id.clone(),
                }),
                None => {
                    self.config = Some(config.clone());
                    Ok(true)
                }
            };
        }
        if self.config.is_none() {
            return Err(StateError::NotInitialized);
        }
        match command {
            Command::Init(_) => Ok(false),
            Command::Join { info, at_ms } => self.join(info, *at_ms),
            Command::Activate { node_id, at_ms } => {
                self.transition(*node_id, "activate", *at_ms, |s| match s {
                    MemberState::Joining | MemberState::Draining | MemberState::Active => {
                        Some(MemberState::Active)
                    }
                    MemberState::Down => None,
                })
            }
            Command::Drain { node_id, at_ms } => {
                self.transition(*node_id, "drain", *at_ms, |_| Some(MemberState::Draining))
            }
            Command::Revive { node_id, at_ms } => {
                self.transition(*node_id, "revive", *at_ms, |s| match s {
                    MemberState::Down => Some(MemberState::Joining),
                    _ => None,
                })
            }
            Command::SetReplication { factor } => {
                validate_replication_factor(*factor)?;
                let Some(c) = self.config.as_mut() else {
                    return Err(StateError::NotInitialized);
                };
                if c.replication_factor == *factor {
                    return Ok(false);
                }
                c.replication_factor = *factor;
                Ok(true)
            }
            Command::Remove { node_id } => match self.members.remove(node_id) {
                Some(_) => Ok(true),
                None => Err(StateError::UnknownNode(*node_id)),
            },
            Command::MarkDown { node_ids, at_ms } => {
                if node_ids.len() > MAX_NODES_PER_COMMAND {
                    return Err(StateError::Invalid("too many node ids".into()));
                }
                // Unknown or already-down nodes are skipped: the detector may race a remove.
                let mut changed = false;
                for id in node_ids {
                    if let Some(m) = self.members.get_mut(id) {
                        if m.state != MemberState::Down {
                            m.state = MemberState::Down;
                            m.state_since_ms = *at_ms;
                            changed = true;
                        }
                    }
                }
                Ok(changed)
            }
        }
    }

    fn join(&mut self, info: &NodeInfo, at_ms: u64) -> Result<bool, StateError> {
        info.validate().map_err(StateError::Invalid)?;
        match self.members.get_mut(&info.node_id) {
            Some(m) => {
                // The first key a member announced is its identity on peer links: another key
                // would let whoever holds the cluster secret take over this node's id.
                if m.info.node_key.is_some() && m.info.node_key != info.node_key {
                    return Err(StateError::NodeKeyMismatch {
                        node_id: info.node_id,
                    });
                }
                let mut changed = m.info != *info;
                m.info = info.clone();
                if m.state == MemberState::Down {
                    m.state = MemberState::Joining;
                    m.state_since_ms = at_ms;
                    changed = true;
                }
                Ok(changed)
            }
            None => {
                if self.members.len() >= MAX_MEMBERS {
                    return Err(StateError::TooManyMembers);
                }
                self.members.insert(
                    info.node_id,
                    Member {
                        info: info.clone(),
                        state: MemberState::Joining,
                        state_since_ms: at_ms,
                    },
                );
                Ok(true)
            }
        }
    }

    fn transition(
        &mut self,
        node_id: NodeId,
        command: &str,
        at_ms: u64,
        next: impl FnOnce(MemberState) -> Option<MemberState>,
    ) -> Result<bool, StateError> {
        let m = self
            .members
            .get_mut(&node_id)
            .ok_or(StateError::UnknownNode(node_id))?;
        let to = next(m.state).ok_or_else(|| StateError::InvalidTransition {
            node_id,
            state: m.state,
            command: command.to_owned(),
        })?;
        if to == m.state {
            return Ok(false);
        }
        m.state = to;
        m.state_since_ms = at_ms;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClusterConfig {
        ClusterConfig {
            cluster_id: "c1".into(),
            shard_count: 4096,
            replication_factor: 1,
            heartbeat_interval_ms: 1000,
            heartbeat_miss_limit: 5,
        }
    }

    fn init() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(1, &Command::Init(config())).unwrap();
        s
    }

    fn join(id: NodeId) -> Command {
        Command::Join {
            info: NodeInfo::new(id),
            at_ms: 0,
        }
    }

    fn join_with_key(id: NodeId, key: Option<&str>) -> Command {
        let mut info = NodeInfo::new(id);
        info.node_key = key.map(str::to_owned);
        Command::Join { info, at_ms: 0 }
    }

    #[test]
    fn the_first_node_key_binds_the_id_until_removed() {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let mut s = init();
        // A member from before node keys takes the first key it announces.
        s.apply(2, &join_with_key(1, None)).unwrap();
        s.apply(3, &join_with_key(1, Some(&a))).unwrap();
        // The same key re-joins (a restart); another key or none is refused, state unchanged.
        s.apply(4, &join_with_key(1, Some(&a))).unwrap();
        let before = s.clone();
        for other in [Some(b.as_str()), None] {
            assert_eq!(
                s.apply(5, &join_with_key(1, other)),
                Err(StateError::NodeKeyMismatch { node_id: 1 })
            );
            assert_eq!(s, before);
        }
        let view = s.view().unwrap();
        assert_eq!(
            view.member(1).unwrap().info.node_key.as_deref(),
            Some(a.as_str())
        );
        // Removing the member frees the id for a new key.
        s.apply(6, &Command::Remove { node_id: 1 }).unwrap();
        s.apply(7, &join_with_key(1, Some(&b))).unwrap();
        assert_eq!(
            s.view()
                .unwrap()
                .member(1)
                .unwrap()
                .info
                .node_key
                .as_deref(),
            Some(b.as_str())
        );
    }

    #[test]
    fn refuses_everything_before_init() {
        let mut s = ClusterState::default();
        assert_eq!(s.apply(1, &join(1)), Err(StateError::NotInitialized));
        assert!(s.view().is_none());
    }

    #[test]
    fn init_is_idempotent_for_the_same_id_only() {
        let mut s = init();
        assert_eq!(s.apply(2, &Command::Init(config())), Ok(1));
        let mut other = config();
        other.cluster_id = "c2".into();
        assert!(matches!(
            s.apply(3, &Command::Init(other)),
            Err(StateError::AlreadyInitialized { .. })
        ));
        let mut bad = config();
        bad.shard_count = 0;
        assert!(matches!(
            ClusterState::default().apply(1, &Command::Init(bad)),
            Err(StateError::Invalid(_))
        ));
    }

    #[test]
    fn epoch_follows_the_owner_set() {
        let mut s = init();
        let e0 = s.epoch();
        s.apply(2, &join(1)).unwrap();
        assert_eq!(s.epoch(), e0, "joining owns nothing");
        s.apply(
            3,
            &Command::Activate {
                node_id: 1,
                at_ms: 0,
            },
        )
        .unwrap();
        assert_eq!(s.epoch(), e0 + 1);
        // Activate again: no change, no revision bump.
        s.apply(
            4,
            &Command::Activate {
                node_id: 1,
                at_ms: 0,
            },
        )
        .unwrap();
        assert_eq!((s.epoch(), s.revision()), (e0 + 1, 3));
        // Re-join of an active node keeps it active.
        s.apply(5, &join(1)).unwrap();
        assert_eq!(
            s.view().unwrap().member(1).unwrap().state,
            MemberState::Active
        );
        s.apply(
            6,
            &Command::Drain {
                node_id: 1,
                at_ms: 0,
            },
        )
        .unwrap();
        assert_eq!(s.epoch(), e0 + 2);
        s.apply(7, &Command::Remove { node_id: 1 }).unwrap();
        assert_eq!(s.epoch(), e0 + 2, "a draining node owned nothing");
        assert!(s.view().unwrap().members.is_empty());
    }

    #[test]
    fn down_and_back() {
        let mut s = init();
        s.apply(2, &join(1)).unwrap();
        s.apply(
            3,
            &Command::Activate {
                node_id: 1,
                at_ms: 0,
            },
        )
        .unwrap();
        let e = s.epoch();
        let down = Command::MarkDown {
            node_ids: vec![1, 99],
            at_ms: 5,
        };
        s.apply(4, &down).unwrap();
        assert_eq!(s.epoch(), e + 1);
        assert_eq!(s.apply(5, &down), Ok(4), "already down: no change");
        assert!(matches!(
            s.apply(
                6,
                &Command::Activate {
                    node_id: 1,
                    at_ms: 0
                }
            ),
            Err(StateError::InvalidTransition { .. })
        ));
        s.apply(
            7,
            &Command::Revive {
                node_id: 1,
                at_ms: 0,
            },
        )
        .unwrap();
        assert_eq!(
            s.view().unwrap().member(1).unwrap().state,
            MemberState::Joining
        );
        assert_eq!(s.epoch(), e + 1);
    }

    #[test]
    fn refusals_leave_state_unchanged() {
        let mut s = init();
        s.apply(2, &join(1)).unwrap();
        let before = s.clone();
        let mut bad = NodeInfo::new(2);
        bad.zone = "z".repeat(1000);
        assert!(s
            .apply(
                3,
                &Command::Join {
                    info: bad,
                    at_ms: 0
                }
            )
            .is_err());
        assert!(s.apply(4, &Command::Remove { node_id: 9 }).is_err());
        assert!(s
            .apply(
                5,
                &Command::Revive {
                    node_id: 1,
                    at_ms: 0
                }
            )
            .is_err());
        assert_eq!(s, before);
    }

    fn activate(id: NodeId) -> Command {
        Command::Activate {
            node_id: id,
            at_ms: 0,
        }
    }

    fn set_replication(factor: u32) -> Command {
        Command::SetReplication { factor }
    }

    #[test]
    fn set_replication_bumps_the_epoch_only_when_the_copies_change() {
        let mut s = init(); // factor 1
        let mut index = 1;
        let mut step = |s: &mut ClusterState, c: Command| {
            index += 1;
            s.apply(index, &c)
        };
        step(&mut s, join(1)).unwrap();
        step(&mut s, activate(1)).unwrap();
        let e = s.epoch();
        // One active member: one copy whatever the factor, so no new epoch, but a new revision
        // (nodes and `ctl status` see the factor).
        let r = s.revision();
        step(&mut s, set_replication(2)).unwrap();
        assert_eq!(s.epoch(), e);
        assert!(s.revision() > r);
        assert_eq!(s.view().unwrap().replication_factor, 2);
        assert_eq!(s.view().unwrap().copies(), 1);
        // The second member changes the owners and the copies: one bump, not two.
        step(&mut s, join(2)).unwrap();
        step(&mut s, activate(2)).unwrap();
        assert_eq!(s.epoch(), e + 1);
        assert_eq!(s.view().unwrap().copies(), 2);
        // 2 → 3 with two members: still two copies.
        step(&mut s, set_replication(3)).unwrap();
        assert_eq!(s.epoch(), e + 1);
        step(&mut s, join(3)).unwrap();
        step(&mut s, activate(3)).unwrap();
        assert_eq!((s.epoch(), s.view().unwrap().copies()), (e + 2, 3));
        // 3 → 1 with three members: placement changes.
        step(&mut s, set_replication(1)).unwrap();
        assert_eq!((s.epoch(), s.view().unwrap().copies()), (e + 3, 1));
        // The same factor again changes nothing at all.
        let before = s.clone();
        assert_eq!(step(&mut s, set_replication(1)), Ok(before.revision()));
        assert_eq!(s, before);
    }

    #[test]
    fn set_replication_is_bounded_and_needs_a_cluster() {
        assert_eq!(
            ClusterState::default().apply(1, &set_replication(2)),
            Err(StateError::NotInitialized)
        );
        let mut s = init();
        let before = s.clone();
        for bad in [0, MAX_REPLICATION_FACTOR + 1, u32::MAX] {
            assert!(matches!(
                s.apply(2, &set_replication(bad)),
                Err(StateError::Invalid(_))
            ));
        }
        assert_eq!(s, before);
        assert!(validate_replication_factor(MAX_REPLICATION_FACTOR).is_ok());
        let mut over = config();
        over.replication_factor = MAX_REPLICATION_FACTOR + 1;
        assert!(
            over.validate().is_err(),
            "a new init is held to the new bound"
        );
    }

    #[test]
    fn a_legacy_init_with_a_large_factor_still_applies() {
        // Versions before set_replication accepted up to 16 at init; their logs replay, and
        // the view reports the factor capped.
        let mut legacy = config();
        legacy.replication_factor = 5;
        let mut s = ClusterState::default();
        s.apply(1, &Command::Init(legacy)).unwrap();
        assert!(s.validate().is_ok());
        assert_eq!(s.view().unwrap().replication_factor, MAX_REPLICATION_FACTOR);
        let snapshot: ClusterState =
            serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert!(snapshot.validate().is_ok());
        // A snapshot written before this command existed reads as before.
        let old = r#"{"config":{"cluster_id":"c1","shard_count":64,"replication_factor":1,
            "heartbeat_interval_ms":1000,"heartbeat_miss_limit":5},"epoch":3,"revision":9,
            "members":{},"in_sync_replicas":{}}"#;
        let old: ClusterState = serde_json::from_str(old).unwrap();
        assert_eq!(
            (old.epoch(), old.view().unwrap().replication_factor),
            (3, 1)
        );
    }

    #[test]
    fn a_zone_change_of_an_active_member_is_a_new_epoch() {
        let mut s = init();
        s.apply(2, &join(1)).unwrap();
        let mut zoned = NodeInfo::new(1);
        zoned.zone = "a".into();
        s.apply(
            3,
            &Command::Join {
                info: zoned.clone(),
                at_ms: 0,
            },
        )
        .unwrap();
        let e = s.epoch();
        assert_eq!(e, 0, "a joining member places nothing");
        s.apply(4, &activate(1)).unwrap();
        zoned.zone = "b".into();
        s.apply(
            5,
            &Command::Join {
                info: zoned,
                at_ms: 0,
            },
        )
        .unwrap();
        assert_eq!(s.epoch(), e + 2);
        // A new address alone moves nothing.
        let mut moved = s.view().unwrap().member(1).unwrap().info.clone();
        moved.ws_url = Some("ws://elsewhere/ws".into());
        s.apply(
            6,
            &Command::Join {
                info: moved,
                at_ms: 0,
            },
        )
        .unwrap();
        assert_eq!((s.epoch(), s.revision()), (e + 2, 6));
    }

    #[test]
    fn member_limit() {
        let mut s = init();
        for id in 1..=MAX_MEMBERS as u64 {
            s.apply(id + 1, &join(id)).unwrap();
        }
        assert_eq!(
            s.apply(9999, &join(MAX_MEMBERS as u64 + 1)),
            Err(StateError::TooManyMembers)
        );
        assert!(s.validate().is_ok());
    }

    #[test]
    fn same_commands_same_state() {
        let cmds = [
            join(3),
            join(1),
            Command::Activate {
                node_id: 3,
                at_ms: 1,
            },
            Command::Activate {
                node_id: 1,
                at_ms: 2,
            },
            Command::MarkDown {
                node_ids: vec![3],
                at_ms: 3,
            },
            set_replication(3),
            Command::Remove { node_id: 1 },
        ];
        let run = || {
            let mut s = init();
            for (i, c) in cmds.iter().enumerate() {
                let _ = s.apply(i as u64 + 2, c);
            }
            s
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        let round_trip: ClusterState =
            serde_json::from_slice(&serde_json::to_vec(&a).unwrap()).unwrap();
        assert_eq!(round_trip, a);
    }
}
