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
//! In-sync replica sets (ISRs, issue 19; `in_sync_replicas`): a shard has an entry once its
//! primary has brought a replica in sync (`expand_isr`). The entry lists the shard's in-sync
//! copies, **its primary first**: from then on the shard's primary is the entry's first node,
//! not the ring's hash owner, so a primary only ever changes to a node that holds every
//! acknowledged write. Entries change by
//!
//! | command | by | effect | epoch bump |
//! |---------|----|--------|------------|
//! | expand_isr | the shard's primary, at the current epoch | adds an active node (creates the entry `[primary, node]`) | no |
//! | shrink_isr | the shard's primary, at the current epoch | removes a non-primary node (creates the entry `[primary]`) | no |
//! | transfer_primary | the shard's primary, at the current epoch | moves an active in-sync node to the front | yes |
//! | mark_down N | the failure detector | where N was first, the first active other node takes its place (none: the entry stays, and the first of its nodes active again takes it); elsewhere N leaves entries whose primary is active | if a primary moved |
//! | activate N | the node | N becomes the primary of entries it is in whose primary is not active | if a primary moved |
//! | remove N | the operator | N leaves every entry; an entry left empty is dropped (its shard's data is given up) | if a primary moved |
//!
//! Commands "by the shard's primary" name the proposer and its epoch: a proposal from a node
//! that is not (or no longer) the primary at the current epoch is refused, so a deposed primary
//! can never shrink or grow a set. Each names many shards at once (a replica failing affects
//! every shard it replicates), bounded by [`MAX_SHARDS_PER_COMMAND`].
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
/// replication factor (`set_replication`) and the heartbeat timing (`set_heartbeat`, never to a
/// shorter timeout).
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

/// Checks a `set_heartbeat` against `current`: the bounds `init` applies, and a timeout
/// (`interval_ms × miss_limit`) no shorter than the current one. Nodes write under a lease of
/// `(miss_limit − 1) × interval` from their last acknowledged heartbeat, computed from the view
/// they hold; after a shorter timeout the leader could mark a node down (and fail its shards
/// over) while it still held a lease from the longer one.
pub fn validate_heartbeat(
    current: &ClusterConfig,
    interval_ms: u64,
    miss_limit: u32,
) -> Result<(), StateError> {
    let mut next = current.clone();
    next.heartbeat_interval_ms = interval_ms;
    next.heartbeat_miss_limit = miss_limit;
    next.validate_committed()?;
    let timeout = |c: &ClusterConfig| c.heartbeat_interval_ms * u64::from(c.heartbeat_miss_limit);
    if timeout(&next) < timeout(current) {
        return Err(StateError::Invalid(format!(
            "a heartbeat timeout of {} ms ({interval_ms} ms x {miss_limit}) is shorter than the \
             current {} ms: leases granted under the current one could outlive it (only a \
             longer or equal timeout can be set on a running cluster)",
            timeout(&next),
            timeout(current)
        )));
    }
    Ok(())
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
    /// A change to in-sync replica sets, proposed by the primary of every shard it names.
    Isr(IsrChange),
    /// The operator changes the failure detector's timing (`ctl set-heartbeat`): only to a
    /// timeout (interval × miss limit) no shorter than the current one, so no lease a node holds
    /// under the old timing outlives the new timeout.
    SetHeartbeat {
        /// How often nodes heartbeat, within the bounds `init` accepts.
        interval_ms: u64,
        /// Missed heartbeats before the leader marks a node down.
        miss_limit: u32,
    },
}

/// What a shard's primary asks of its shards' in-sync sets (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsrChange {
    /// The proposing node: the primary of every shard in `shards`.
    pub primary: NodeId,
    /// The epoch the proposer computed that from; must be the current one.
    pub epoch: u64,
    /// The shards (at most [`MAX_SHARDS_PER_COMMAND`], each below the shard count).
    pub shards: Vec<u32>,
    /// The node added, removed or promoted, and how.
    pub op: IsrOp,
}

/// The change an [`IsrChange`] makes to each of its shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsrOp {
    /// This active node has every write of the shards (caught up, and the primary waits for
    /// it from now on).
    Expand(NodeId),
    /// This node is no longer waited for: the primary acknowledges without it from now on.
    Shrink(NodeId),
    /// This active in-sync node becomes the primary (a live move): the proposer stays in sync.
    Transfer(NodeId),
}

/// Most shards one ISR command may name (a default cluster's every shard; a primary of more
/// sends several). Bounds a command at about 30 KiB of JSON.
pub const MAX_SHARDS_PER_COMMAND: usize = 4096;
/// Most nodes an ISR entry may hold: the copies of the largest factor, plus an old primary
/// that stays in sync while its shard moves away.
pub const MAX_ISR_NODES: usize = MAX_REPLICATION_FACTOR as usize + 1;

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
    /// An ISR change from a node that is not the primary of a shard it names, or not at the
    /// current epoch (a deposed or lagging primary).
    #[error("node {node_id} is not the primary of shard {shard} at epoch {epoch}")]
    NotPrimary {
        /// The proposer.
        node_id: NodeId,
        /// The first shard it is not the primary of (or every shard, at a stale epoch).
        shard: u32,
        /// The current epoch.
        epoch: u64,
    },
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
        let shard_count = self.config.as_ref().map_or(0, |c| c.shard_count);
        for (shard, entry) in &self.in_sync_replicas {
            let mut distinct = entry.clone();
            distinct.sort_unstable();
            distinct.dedup();
            if *shard >= shard_count
                || entry.is_empty()
                || entry.len() > MAX_ISR_NODES
                || distinct.len() != entry.len()
            {
                return Err(StateError::Invalid(format!(
                    "in-sync set of shard {shard} is malformed: {entry:?}"
                )));
            }
        }
        Ok(())
    }

    /// The primary of `shard` by its ISR entry, if it has one (else the ring's hash owner).
    pub fn isr_primary(&self, shard: u32) -> Option<NodeId> {
        self.in_sync_replicas
            .get(&shard)
            .and_then(|e| e.first())
            .copied()
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
        let primaries_before: Vec<(u32, NodeId)> = self
            .in_sync_replicas
            .iter()
            .map(|(&shard, entry)| (shard, entry[0]))
            .collect();
        let changed = self.apply_inner(command)?;
        if changed {
            self.revision = index;
            // An entry made by a first expand names the hash owner, which proposed it: no
            // primary moves. One that changes its first node, or is dropped, moves one.
            let primary_moved = primaries_before
                .iter()
                .any(|&(shard, p)| self.isr_primary(shard) != Some(p));
            if primary_moved || self.placement_key() != placement_before {
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
                let changed = self.transition(*node_id, "activate", *at_ms, |s| match s {
                    MemberState::Joining | MemberState::Draining | MemberState::Active => {
                        Some(MemberState::Active)
                    }
                    MemberState::Down => None,
                })?;
                Ok(self.take_waiting_isrs(*node_id) || changed)
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
                Some(_) => {
                    self.leave_isrs(*node_id, true);
                    Ok(true)
                }
                None => Err(StateError::UnknownNode(*node_id)),
            },
            Command::Isr(change) => self.change_isr(change),
            Command::SetHeartbeat {
                interval_ms,
                miss_limit,
            } => {
                let Some(c) = self.config.as_mut() else {
                    return Err(StateError::NotInitialized);
                };
                validate_heartbeat(c, *interval_ms, *miss_limit)?;
                if (c.heartbeat_interval_ms, c.heartbeat_miss_limit) == (*interval_ms, *miss_limit)
                {
                    return Ok(false);
                }
                c.heartbeat_interval_ms = *interval_ms;
                c.heartbeat_miss_limit = *miss_limit;
                Ok(true)
            }
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
                for id in node_ids {
                    changed |= self.leave_isrs(*id, false);
                }
                Ok(changed)
            }
        }
    }

    /// Makes `node`, just activated, the primary of every ISR entry it is in whose primary is
    /// not active (it had no active node to fail over to).
    fn take_waiting_isrs(&mut self, node: NodeId) -> bool {
        let mut changed = false;
        let members = &self.members;
        let active = |n: &NodeId| {
            members
                .get(n)
                .is_some_and(|m| m.state == MemberState::Active)
        };
        for entry in self.in_sync_replicas.values_mut() {
            if active(&entry[0]) {
                continue;
            }
            if let Some(at) = entry.iter().position(|&n| n == node) {
                if at > 0 {
                    entry[..=at].rotate_right(1);
                    changed = true;
                }
            }
        }
        changed
    }

    /// Takes `node` (down, or `removed`) out of ISR entries. Where it was the primary, the first
    /// active other node of the entry takes its place; if there is none, a down node stays (the
    /// shard waits for the first of its in-sync nodes to be back) and a removed one drops the
    /// entry (its data is given up). Where it was not, it leaves the entry if the primary is
    /// active (which then no longer waits for it), or if it is removed.
    fn leave_isrs(&mut self, node: NodeId, removed: bool) -> bool {
        let mut changed = false;
        let members = &self.members;
        let active = |n: &NodeId| {
            members
                .get(n)
                .is_some_and(|m| m.state == MemberState::Active)
        };
        self.in_sync_replicas.retain(|_, entry| {
            let Some(at) = entry.iter().position(|&n| n == node) else {
                return true;
            };
            if at > 0 {
                // An active primary stops waiting for it; behind a primary that is not active
                // it stays, as it may be the first one back (see `take_waiting_isrs`).
                if removed || active(&entry[0]) {
                    entry.remove(at);
                    changed = true;
                }
                return true;
            }
            match entry.iter().skip(1).position(active) {
                Some(i) => {
                    entry.remove(0);
                    entry[..=i].rotate_right(1);
                    changed = true;
                    true
                }
                None if removed => {
                    changed = true;
                    false
                }
                // The others are not active: the entry stays as it is, and the first of its
                // nodes to be active again takes the shard (see `activate`).
                None => true,
            }
        });
        changed
    }

    fn change_isr(&mut self, change: &IsrChange) -> Result<bool, StateError> {
        let shard_count = self.config.as_ref().map_or(0, |c| c.shard_count);
        if change.shards.len() > MAX_SHARDS_PER_COMMAND {
            return Err(StateError::Invalid(format!(
                "an ISR change names at most {MAX_SHARDS_PER_COMMAND} shards"
            )));
        }
        if let Some(&bad) = change.shards.iter().find(|&&s| s >= shard_count) {
            return Err(StateError::Invalid(format!(
                "shard {bad} is not below the shard count {shard_count}"
            )));
        }
        let not_primary = |shard| StateError::NotPrimary {
            node_id: change.primary,
            shard,
            epoch: self.epoch,
        };
        if change.epoch != self.epoch {
            return Err(not_primary(change.shards.first().copied().unwrap_or(0)));
        }
        let state = |n: NodeId| self.members.get(&n).map(|m| m.state);
        let (IsrOp::Expand(node) | IsrOp::Shrink(node) | IsrOp::Transfer(node)) = change.op;
        if node == change.primary {
            return Err(StateError::Invalid(
                "an ISR change names the proposing primary itself".into(),
            ));
        }
        if matches!(change.op, IsrOp::Expand(_) | IsrOp::Transfer(_))
            && state(node) != Some(MemberState::Active)
        {
            return Err(StateError::Invalid(format!(
                "node {node} is not active: it cannot join an in-sync set or become a primary"
            )));
        }
        // Check every shard first: a refused command changes nothing.
        for &shard in &change.shards {
            match self.in_sync_replicas.get(&shard) {
                Some(entry) if entry[0] != change.primary => return Err(not_primary(shard)),
                Some(entry) => {
                    if let IsrOp::Expand(_) = change.op {
                        if entry.len() >= MAX_ISR_NODES && !entry.contains(&node) {
                            return Err(StateError::Invalid(format!(
                                "shard {shard} has {MAX_ISR_NODES} in-sync nodes already"
                            )));
                        }
                    }
                    if let IsrOp::Transfer(_) = change.op {
                        if !entry.contains(&node) {
                            return Err(StateError::Invalid(format!(
                                "node {node} is not in sync for shard {shard}"
                            )));
                        }
                    }
                }
                // No entry: the primary is the ring's hash owner, which only the nodes
                // compute; the proposer computed it at this very epoch, so it is believed.
                // A first expand creates the entry, and so does a first shrink (the entry
                // `[primary]`: no replica is in sync, so none may be promoted).
                None if matches!(change.op, IsrOp::Transfer(_)) => {
                    return Err(StateError::Invalid(format!(
                        "shard {shard} has no in-sync set to change"
                    )))
                }
                None => {}
            }
        }
        let mut changed = false;
        for &shard in &change.shards {
            let entry = self.in_sync_replicas.entry(shard).or_insert_with(|| {
                changed = true;
                vec![change.primary]
            });
            match change.op {
                IsrOp::Expand(n) if !entry.contains(&n) => {
                    entry.push(n);
                    changed = true;
                }
                IsrOp::Shrink(n) => {
                    let before = entry.len();
                    entry.retain(|&m| m != n);
                    changed |= entry.len() != before;
                }
                IsrOp::Transfer(n) => {
                    let at = entry.iter().position(|&m| m == n).unwrap_or(0);
                    entry[..=at].rotate_right(1);
                    changed = true;
                }
                IsrOp::Expand(_) => {}
            }
        }
        Ok(changed)
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

    /// Nodes 1, 2, 3 joined and active (epoch 3), at log index 10.
    fn three_active() -> ClusterState {
        let mut s = init();
        let mut index = 1;
        for id in 1..=3 {
            index += 1;
            s.apply(index, &join(id)).unwrap();
            index += 1;
            s.apply(
                index,
                &Command::Activate {
                    node_id: id,
                    at_ms: 0,
                },
            )
            .unwrap();
        }
        s
    }

    fn isr(primary: NodeId, epoch: u64, shards: &[u32], op: IsrOp) -> Command {
        Command::Isr(IsrChange {
            primary,
            epoch,
            shards: shards.to_vec(),
            op,
        })
    }

    fn entry(s: &ClusterState, shard: u32) -> Option<Vec<NodeId>> {
        s.view().unwrap().in_sync_replicas.get(&shard).cloned()
    }

    fn mark_down(node_ids: &[NodeId]) -> Command {
        Command::MarkDown {
            node_ids: node_ids.to_vec(),
            at_ms: 0,
        }
    }

    #[test]
    fn only_the_current_primary_changes_an_in_sync_set() {
        let mut s = three_active();
        let e = s.epoch();
        s.apply(20, &isr(1, e, &[0, 1], IsrOp::Expand(2))).unwrap();
        assert_eq!(entry(&s, 0), Some(vec![1, 2]));
        assert_eq!(entry(&s, 1), Some(vec![1, 2]));
        assert_eq!(s.epoch(), e, "an expand moves no primary");
        assert_eq!(s.isr_primary(0), Some(1));

        let before = s.clone();
        let refused = [
            // Another node, a stale epoch, the primary itself, a non-member, an unknown shard.
            (isr(2, e, &[0], IsrOp::Expand(3)), "not the primary"),
            (isr(1, e - 1, &[0], IsrOp::Expand(3)), "not the primary"),
            (isr(1, e, &[0], IsrOp::Shrink(1)), "itself"),
            (isr(1, e, &[0], IsrOp::Expand(9)), "not active"),
            (isr(1, e, &[4096], IsrOp::Expand(3)), "shard count"),
            // One bad shard refuses the whole command: shard 2 has no set to transfer in.
            (isr(1, e, &[0, 2], IsrOp::Transfer(2)), "no in-sync set"),
            (isr(1, e, &[0], IsrOp::Transfer(3)), "not in sync"),
        ];
        for (command, why) in refused {
            let err = s.apply(21, &command).unwrap_err();
            assert!(err.to_string().contains(why), "{err} / {why}");
            assert_eq!(s, before);
        }
        let too_many = isr(1, e, &vec![0; MAX_SHARDS_PER_COMMAND + 1], IsrOp::Expand(3));
        assert!(s.apply(21, &too_many).is_err());

        // A first shrink records that no replica is in sync: the primary alone, pinned.
        s.apply(21, &isr(1, e, &[9], IsrOp::Shrink(2))).unwrap();
        assert_eq!(entry(&s, 9), Some(vec![1]));
        assert_eq!(s.epoch(), e);
        s.apply(22, &isr(1, e, &[0], IsrOp::Expand(3))).unwrap();
        s.apply(23, &isr(1, e, &[0], IsrOp::Shrink(2))).unwrap();
        assert_eq!(entry(&s, 0), Some(vec![1, 3]));
        // A transfer (live move) makes an in-sync node the primary, at a new epoch.
        s.apply(24, &isr(1, e, &[0], IsrOp::Transfer(3))).unwrap();
        assert_eq!(entry(&s, 0), Some(vec![3, 1]));
        assert_eq!(s.epoch(), e + 1);
        // The old primary can no longer change it.
        assert!(matches!(
            s.apply(25, &isr(1, e + 1, &[0], IsrOp::Shrink(3))),
            Err(StateError::NotPrimary {
                node_id: 1,
                shard: 0,
                ..
            })
        ));
    }

    #[test]
    fn a_down_primary_fails_over_to_an_active_in_sync_node_only() {
        let mut s = three_active();
        let e = s.epoch();
        s.apply(20, &isr(1, e, &[0], IsrOp::Expand(2))).unwrap();
        s.apply(21, &isr(1, e, &[0], IsrOp::Expand(3))).unwrap();
        s.apply(22, &isr(2, e, &[5], IsrOp::Expand(1))).unwrap();
        // Node 3 is only a replica somewhere: it leaves shard 0's set.
        // Node 1 goes down: shard 0 fails over to 2, the first active other node; shard 5
        // (primary 2) just drops it.
        s.apply(23, &mark_down(&[1])).unwrap();
        assert_eq!(entry(&s, 0), Some(vec![2, 3]));
        assert_eq!(entry(&s, 5), Some(vec![2]));
        assert!(s.epoch() > e);
        // Node 2 and then node 3 go down: shard 0 moves to 3, then has nobody active left and
        // keeps its last primary; the shard waits for it.
        s.apply(24, &mark_down(&[2])).unwrap();
        assert_eq!(entry(&s, 0), Some(vec![3]));
        assert_eq!(entry(&s, 5), Some(vec![2]));
        let e = s.epoch();
        s.apply(25, &mark_down(&[3])).unwrap();
        assert_eq!(entry(&s, 0), Some(vec![3]));
        // A down node that comes back is active again only through revive + activate; shard
        // 0's set holds only 3, so node 1 coming back does not take it.
        s.apply(
            26,
            &Command::Revive {
                node_id: 1,
                at_ms: 0,
            },
        )
        .unwrap();
        s.apply(
            27,
            &Command::Activate {
                node_id: 1,
                at_ms: 0,
            },
        )
        .unwrap();
        assert_eq!(entry(&s, 0), Some(vec![3]));
        assert_eq!(s.isr_primary(0), Some(3));
        assert!(s.epoch() > e, "node 1 owns shards again");
    }

    #[test]
    fn a_waiting_shard_goes_to_the_first_in_sync_node_that_is_active_again() {
        let mut s = three_active();
        let e = s.epoch();
        s.apply(20, &isr(1, e, &[0], IsrOp::Expand(2))).unwrap();
        // Both down at once: nobody active to fail over to, the set stays as it was.
        s.apply(21, &mark_down(&[1, 2])).unwrap();
        assert_eq!(entry(&s, 0), Some(vec![1, 2]));
        // Node 2 is back first and takes the shard (it has every acknowledged write).
        s.apply(
            22,
            &Command::Revive {
                node_id: 2,
                at_ms: 0,
            },
        )
        .unwrap();
        let e = s.epoch();
        s.apply(
            23,
            &Command::Activate {
                node_id: 2,
                at_ms: 0,
            },
        )
        .unwrap();
        assert_eq!(entry(&s, 0), Some(vec![2, 1]));
        assert!(s.epoch() > e);
    }

    #[test]
    fn removing_a_node_gives_up_only_sets_it_held_alone() {
        let mut s = three_active();
        let e = s.epoch();
        s.apply(20, &isr(1, e, &[0], IsrOp::Expand(2))).unwrap();
        s.apply(21, &isr(3, e, &[7], IsrOp::Expand(1))).unwrap();
        s.apply(22, &isr(3, e, &[7], IsrOp::Shrink(1))).unwrap();
        s.apply(23, &Command::Remove { node_id: 1 }).unwrap();
        assert_eq!(entry(&s, 0), Some(vec![2]));
        assert_eq!(entry(&s, 7), Some(vec![3]));
        s.apply(24, &Command::Remove { node_id: 3 }).unwrap();
        assert_eq!(entry(&s, 7), None, "its only copy is given up");
    }

    #[test]
    fn malformed_in_sync_sets_in_a_snapshot_are_refused() {
        let mut s = three_active();
        let e = s.epoch();
        s.apply(20, &isr(1, e, &[0], IsrOp::Expand(2))).unwrap();
        assert!(s.validate().is_ok());
        for bad in [vec![], vec![1, 1], vec![1, 2, 3, 4, 5]] {
            let mut t = s.clone();
            t.in_sync_replicas.insert(0, bad);
            assert!(t.validate().is_err());
        }
        let mut t = s.clone();
        t.in_sync_replicas.insert(4096, vec![1]);
        assert!(t.validate().is_err());
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

    fn set_heartbeat(interval_ms: u64, miss_limit: u32) -> Command {
        Command::SetHeartbeat {
            interval_ms,
            miss_limit,
        }
    }

    /// The timing can grow (a new revision, no new epoch) but the timeout never shrinks, and
    /// `init`'s bounds hold; a refused change changes nothing.
    #[test]
    fn set_heartbeat_only_lengthens_the_timeout() {
        assert_eq!(
            ClusterState::default().apply(1, &set_heartbeat(2000, 10)),
            Err(StateError::NotInitialized)
        );
        let mut s = init(); // 1000 ms x 5
        s.apply(2, &join(1)).unwrap();
        s.apply(3, &activate(1)).unwrap();
        let (e, r) = (s.epoch(), s.revision());
        s.apply(4, &set_heartbeat(2000, 10)).unwrap();
        let v = s.view().unwrap();
        assert_eq!(
            (v.heartbeat_interval_ms, v.heartbeat_miss_limit),
            (2000, 10)
        );
        assert_eq!(s.epoch(), e, "the ring does not change");
        assert!(s.revision() > r);
        // The same 20 s timeout at another interval: allowed.
        s.apply(5, &set_heartbeat(4000, 5)).unwrap();
        let before = s.clone();
        for (i, (interval, limit)) in [(1000, 19), (4000, 4), (5, 10_000), (60_001, 1), (4000, 0)]
            .into_iter()
            .enumerate()
        {
            assert!(
                matches!(
                    s.apply(6 + i as u64, &set_heartbeat(interval, limit)),
                    Err(StateError::Invalid(_))
                ),
                "{interval} ms x {limit}"
            );
        }
        assert_eq!(s, before);
        assert_eq!(
            s.apply(20, &set_heartbeat(4000, 5)),
            Ok(before.revision()),
            "the same timing again changes nothing"
        );
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
