//! Ringpost coordinator: the Raft-replicated membership service.
//!
//! It keeps, replicated with openraft on 1, 3 or 5 replicas: the cluster id and shard count
//! (fixed at `init`), the replication factor (`set_replication`), the members (nodes) with their addresses, zone and
//! state, the ring epoch, and room for per-shard in-sync replica sets. Nodes talk to it only
//! through [`client`]; see `coordinator/README.md` for the state machine, the protocol and the
//! failure detector in one page.
//!
//! How the parts fit:
//! - [`state`]: the replicated state machine, sans-IO (`apply(index, command)`).
//! - [`detector`]: the failure detector, sans-IO (`handle_heartbeat`, `poll_expired(now)`).
//! - `store`: RocksDB log, vote and snapshots (openraft storage v2, passes its conformance suite).
//! - `auth` + `channel`: HMAC-SHA256 challenge-response and per-frame MACs over TCP, bounded
//!   length-prefixed JSON frames ([`protocol`] names the bounds).
//! - `network`: Raft RPCs between replicas; `api` + `service`: the client listener.
//! - `admin` + `metrics`: the admin listener (`/metrics`, `/healthz`) and the
//!   `ringpost_coord_*` metrics it renders; [`process_metrics`]: the standard `process_*`
//!   metrics from `/proc`, which the node renders too.
//! - [`Coordinator`]: a running replica (or an embedded single-replica one).

#![forbid(unsafe_code)]

pub mod admin;
mod api;
mod auth;
mod channel;
pub mod client;
mod coordinator;
pub mod detector;
mod metrics;
mod network;
pub mod process_metrics;
pub mod protocol;
mod raft_types;
mod service;
pub mod state;
mod store;
pub mod types;

pub use admin::{ADMIN_CONNECTIONS_MAX, ADMIN_HEAD_BYTES_MAX, ADMIN_TIMEOUT};
pub use auth::{ClusterSecret, SecretLengthError, MAX_SECRET_BYTES, MIN_SECRET_BYTES};
pub use channel::ChannelError;
pub use client::{ClientError, ClientOptions, CoordinatorClient, InitParams, ViewWatch};
pub use coordinator::{
    Coordinator, CoordinatorConfig, CoordinatorError, EmbeddedConfig, RaftTimings, RoleProbe,
    DEFAULT_MAX_CLIENT_CONNECTIONS,
};
pub use metrics::MetricsProbe;
pub use network::{MAX_PEER_CONNECTIONS, PEER_IDLE_TIMEOUT};
pub use raft_types::RaftNode;
pub use store::StoreError;
pub use types::{ClusterView, HeartbeatAck, Member, MemberState, NodeId, NodeInfo, StatusReport};

/// Test support: raw access to the authenticated channel, to check that a peer with the wrong
/// secret is refused on the Raft port. Not part of the stable API.
#[doc(hidden)]
pub mod testing {
    use std::net::SocketAddr;
    use std::time::Duration;

    use crate::auth::{ChannelKind, ClusterSecret};
    use crate::channel::{Channel, ChannelError};

    /// A view for tests: cluster `c`, revision = `epoch`, heartbeats every 100 ms (down after
    /// 5 missed), `members` in the given states with no addresses, no in-sync sets.
    pub fn view(
        epoch: u64,
        shard_count: u32,
        replication_factor: u32,
        members: &[(crate::NodeId, crate::MemberState)],
    ) -> crate::ClusterView {
        let mut members: Vec<crate::Member> = (members.iter())
            .map(|&(id, state)| crate::Member {
                info: crate::NodeInfo::new(id),
                state,
                state_since_ms: 0,
            })
            .collect();
        members.sort_by_key(crate::Member::node_id);
        crate::ClusterView {
            cluster_id: "c".into(),
            epoch,
            revision: epoch,
            shard_count,
            replication_factor,
            heartbeat_interval_ms: 100,
            heartbeat_miss_limit: 5,
            members,
            in_sync_replicas: Default::default(),
        }
    }

    /// Connects to a replica's Raft port and runs the handshake; `Ok` iff authenticated.
    pub async fn handshake_raft_port(
        addr: SocketAddr,
        secret: &ClusterSecret,
    ) -> Result<(), ChannelError> {
        Channel::connect(
            addr,
            secret,
            ChannelKind::Raft,
            1024,
            Duration::from_secs(2),
        )
        .await
        .map(drop)
    }
}
