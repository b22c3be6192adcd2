//! The node's part in the cluster: join the coordinator, become active, heartbeat (which also
//! renews the node's write lease), follow the views the coordinator commits, install each
//! epoch's ring, take over the shards it gains (the pulling side of a hand-off), and leave when
//! drained. The node talks to the coordinator only through `ringpost_coordinator::client`.
//!
//! Hand-off, as the new owner of a set of shards sees it:
//! 1. The ring of the new epoch says it owns shards it has not taken over yet; requests for
//!    their users wait (see [`crate::routing`]).
//! 2. It asks every other live member which of those shards it holds rows for
//!    (`Holdings`); each first closes them for writes in its inbox writer and waits for the
//!    writer, so its copy is final.
//! 3. For each held shard it pulls the rows in chunks (`Export`), checks they belong to the
//!    shard, writes them, syncs, and sends the digest of what it got (`Release`); the old
//!    owner compares it with its own copy and deletes that copy only if they match (else the
//!    shard is pulled again).
//! 4. Then the shards are ready and served.
//!
//! A draining node owns no shards, so its users are redirected and its shards pulled by their
//! new owners; once it holds no rows it removes itself from the cluster and the process ends.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ringpost_coordinator::protocol::ErrorCode;
use ringpost_coordinator::{
    ClusterSecret, ClusterView, Coordinator, CoordinatorClient, EmbeddedConfig, MemberState,
    NodeId, NodeInfo,
};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::handoff::{self, Digest};
use crate::node_key::NodeKey;
use crate::peer::{link, PeerRequest, PeerResponse};
use crate::ring::Ring;
use crate::server::Server;
use crate::shard::ShardId;

/// Bytes asked for per hand-off chunk.
pub const HANDOFF_CHUNK_BYTES: u32 = 256 * 1024;
/// Times one shard is pulled again after its digest did not match before the hand-off is
/// retried from the start.
pub const HANDOFF_PULLS_MAX: u32 = 3;
/// Pause before retrying a hand-off that failed (a peer unreachable, the ring moving).
pub const HANDOFF_RETRY_PAUSE: Duration = Duration::from_millis(300);
/// Dedup records expiring within this margin are left out of hand-off digests: either side
/// may drop them at any moment.
pub const DIGEST_DEDUP_MARGIN_MS: u64 = 60 * 60 * 1000;
/// How long a starting node waits for the coordinator to have a leader and a cluster.
pub const COORDINATOR_WAIT: Duration = Duration::from_secs(60);
/// How often a draining node checks whether its shards have all been taken over.
pub const DRAIN_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// How a node joins a standalone coordinator.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Client addresses of the coordinator replicas (any one will do).
    pub coordinators: Vec<SocketAddr>,
    pub secret: ClusterSecret,
    /// Where the peer link listens (UDP).
    pub listen_peer: SocketAddr,
    /// What other nodes dial for the peer link; defaults to the bound address.
    pub advertise_peer: Option<String>,
    /// Client addresses announced to the cluster (for redirects); default to the bound ones.
    pub advertise_ws: Option<String>,
    pub advertise_wss: Option<String>,
    pub advertise_quic: Option<String>,
    pub zone: String,
    /// Keep-alive and idle timeout of the peer links.
    pub peer_liveness: link::PeerLiveness,
}

/// A running link: its tasks, the embedded coordinator if any, and the "left the cluster"
/// signal of a drained node.
pub struct ClusterLink {
    tasks: Vec<JoinHandle<()>>,
    embedded: Option<Coordinator>,
    peers: Option<link::PeerNet>,
    left: watch::Receiver<bool>,
}

impl ClusterLink {
    /// Starts a single-replica coordinator inside this process (dev), joins it and becomes
    /// active. No lease: the coordinator shares the node's fate.
    pub async fn start_embedded(
        data_dir: &std::path::Path,
        node_id: NodeId,
        bound: &crate::runtime::Bound,
        server: Arc<Server>,
    ) -> Result<ClusterLink> {
        let config = EmbeddedConfig {
            shard_count: u32::from(server.config.shard_count),
            ..EmbeddedConfig::new(data_dir.join("coordinator"))
        };
        let (coordinator, client) = Coordinator::start_embedded(config)
            .await
            .context("starting the embedded coordinator")?;
        let key = NodeKey::load_or_create(data_dir).context("loading the node key")?;
        let mut info = NodeInfo::new(node_id);
        info.node_key = Some(key.public_hex());
        info.ws_url = bound.ws.map(|a| format!("ws://{a}"));
        info.wss_url = bound.wss.map(|a| format!("wss://{a}"));
        info.quic_addr = bound.quic.map(|a| a.to_string());
        let _ = server.embedded_coordinator.set(coordinator.metrics_probe());
        let mut link = Self::join(client, info, server, false).await?;
        link.embedded = Some(coordinator);
        Ok(link)
    }

    /// Joins a standalone coordinator: starts the peer link, announces this node, becomes
    /// active and holds a write lease renewed by its heartbeats.
    pub async fn start(
        options: ClusterOptions,
        peer_runtime: Option<tokio::runtime::Handle>,
        data_dir: &std::path::Path,
        node_id: NodeId,
        bound: &crate::runtime::Bound,
        server: Arc<Server>,
    ) -> Result<ClusterLink> {
        let key = Arc::new(NodeKey::load_or_create(data_dir).context("loading the node key")?);
        let client =
            CoordinatorClient::connect(options.coordinators.clone(), options.secret.clone())
                .await
                .context("connecting to the coordinator")?;
        // The replicas may still be electing a leader (they start together with the nodes).
        let waiting = Instant::now();
        let view = loop {
            match client.view().await {
                Ok(view) => break view,
                Err(e) if waiting.elapsed() < COORDINATOR_WAIT => {
                    info!(error = %e, "waiting for the coordinator");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e).context("reading the cluster view"),
            }
        };
        anyhow::ensure!(
            view.shard_count == u32::from(server.config.shard_count),
            "the cluster has {} shards but this node was started with {}",
            view.shard_count,
            server.config.shard_count
        );
        let start = link::PeerNet::start(
            link::PeerConfig {
                node_id,
                cluster_id: view.cluster_id.clone(),
                secret: Arc::new(options.secret.expose().to_vec()),
                key: key.clone(),
                directory: Arc::new(crate::peer::MembershipKeys(Arc::downgrade(&server))),
                bind: options.listen_peer,
                liveness: options.peer_liveness,
            },
            crate::peer::service(&server),
        );
        // On the peer runtime when the node has one: the network's tasks stay where it starts.
        let peers = match peer_runtime {
            Some(runtime) => runtime
                .spawn(start)
                .await
                .context("the peer link's start did not finish")?,
            None => start.await,
        }
        .context("starting the peer link")?;
        let peer_addr = peers.local_addr();
        info!(%peer_addr, "peer link listening");
        let _ = server.peers.set(peers.clone());
        server.routing.require_lease();

        let mut info = NodeInfo::new(node_id);
        info.node_key = Some(key.public_hex());
        info.ws_url = options
            .advertise_ws
            .or_else(|| bound.ws.map(|a| format!("ws://{a}")));
        info.wss_url = options
            .advertise_wss
            .or_else(|| bound.wss.map(|a| format!("wss://{a}")));
        info.quic_addr = options
            .advertise_quic
            .or_else(|| bound.quic.map(|a| a.to_string()));
        info.peer_addr = Some(
            options
                .advertise_peer
                .unwrap_or_else(|| peer_addr.to_string()),
        );
        info.zone = options.zone;
        let mut link = Self::join(client, info, server, true).await?;
        link.peers = Some(peers);
        Ok(link)
    }

    async fn join(
        client: CoordinatorClient,
        info: NodeInfo,
        server: Arc<Server>,
        lease: bool,
    ) -> Result<ClusterLink> {
        let node_id = info.node_id;
        client.join(info).await.context("joining the cluster")?;
        let _ = server.coordinator.set(client.clone());
        // A node the failure detector marked down while it was away cannot be activated; a
        // heartbeat revives it (down → joining) first. For any other node it is only a
        // heartbeat. The detector may still mark it down between the two: it decided on a
        // heartbeat older than ours, and its `mark_down` committed after our heartbeat was
        // answered (seen with 72 nodes starting on two cores). Activation is then refused as
        // an invalid transition, and a new heartbeat revives the node again.
        let mut refused = 0;
        let (view, sent) = loop {
            client
                .heartbeat(node_id)
                .await
                .context("the first heartbeat")?;
            let sent = Instant::now();
            match client.activate(node_id).await {
                Ok(view) => break (view, sent),
                Err(e)
                    if e.code() == Some(ErrorCode::InvalidTransition)
                        && refused < ACTIVATE_REFUSALS_MAX =>
                {
                    refused += 1;
                    warn!(error = %e, refused, "activation refused: heartbeating and trying again");
                }
                Err(e) => return Err(e).context("activating"),
            }
        };
        let lease_for = lease_duration(&view);
        if lease {
            server.routing.renew_lease(sent, lease_for);
        }
        info!(node_id, epoch = view.epoch, cluster = %view.cluster_id, "joined the cluster");

        let kick = Arc::new(Notify::new());
        let (left_tx, left) = watch::channel(false);
        let interval = Duration::from_millis(view.heartbeat_interval_ms.max(10));
        // Heartbeats have a connection of their own: the client serializes its requests, so a
        // heartbeat could queue behind in-sync set changes, each waiting for a commit on a
        // loaded coordinator, and time out (heartbeats timed out with 72 nodes on two cores).
        let heartbeats = (client.separate().await).context("connecting for heartbeats")?;
        let heartbeat = {
            let client = heartbeats;
            let server = server.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut giving_up = false;
                loop {
                    tick.tick().await;
                    // A replicating node whose storage fails gives its shards up: without
                    // heartbeats it is marked down, its shards fail over to their in-sync
                    // replicas and it is placed nowhere, instead of refusing writes until its
                    // disk works again. Then it heartbeats, is re-activated, caught up, and
                    // given its shards back. A blip shorter than the miss limit changes nothing.
                    if server.replicating.get().is_some() {
                        match server.inbox.storage_failing() {
                            Some((_, error)) if !giving_up => {
                                warn!(error = %error, "storage failing: heartbeats stop, so that this node's shards fail over to their in-sync replicas");
                                giving_up = true;
                                continue;
                            }
                            Some(_) => continue,
                            None if giving_up => {
                                info!("storage works again: heartbeating");
                                giving_up = false;
                            }
                            None => {}
                        }
                    }
                    let sent = Instant::now();
                    match tokio::time::timeout(lease_for, client.heartbeat(node_id)).await {
                        Ok(Ok(ack)) => {
                            // Only a member that still owns (or is handing off) its shards
                            // may keep writing: a node marked down has had its shards given
                            // away without a hand-off from it.
                            let owning =
                                matches!(ack.state, MemberState::Active | MemberState::Draining);
                            if lease && owning {
                                server.routing.renew_lease(sent, lease_for);
                            }
                            if ack.state == MemberState::Joining {
                                // Marked down while we were away: come back.
                                warn!("this node was marked down; re-activating");
                                if let Err(e) = client.activate(node_id).await {
                                    warn!(error = %e, "re-activating failed");
                                }
                            }
                        }
                        Ok(Err(e)) => warn!(error = %e, "heartbeat to the coordinator failed"),
                        Err(_) => warn!("heartbeat to the coordinator timed out"),
                    }
                }
            })
        };
        let mut watch = client.watch().await.context("watching the cluster view")?;
        apply_view(&server, &view, &kick);
        apply_view(&server, &watch.current(), &kick);
        let watcher = {
            let server = server.clone();
            let kick = kick.clone();
            tokio::spawn(async move {
                loop {
                    match watch.changed().await {
                        Ok(view) => apply_view(&server, &view, &kick),
                        Err(e) => {
                            error!(error = %e, "cluster watch ended");
                            return;
                        }
                    }
                }
            })
        };
        let handoff = tokio::spawn(handoff_loop(server.clone(), kick));
        let drain = tokio::spawn(drain_watch(server, client, node_id, left_tx));
        Ok(ClusterLink {
            tasks: vec![heartbeat, watcher, handoff, drain],
            embedded: None,
            peers: None,
            left,
        })
    }

    /// Resolves when this node has been drained and has left the cluster.
    pub async fn left(&self) {
        let mut left = self.left.clone();
        let _ = left.wait_for(|&l| l).await;
    }

    /// Stops heartbeating, closes the peer links and shuts the embedded coordinator down.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(p) = self.peers {
            p.shutdown().await;
        }
        if let Some(c) = self.embedded {
            c.shutdown().await;
        }
    }
}

/// Activations refused as invalid transitions (the node marked down again between its
/// heartbeat and its activation) that `join` answers with a new heartbeat before it gives up.
const ACTIVATE_REFUSALS_MAX: u32 = 5;

/// The lease a heartbeat buys: the coordinator marks a node down after
/// `heartbeat_miss_limit` missed intervals; the node stops writing one interval before that.
fn lease_duration(view: &ClusterView) -> Duration {
    let interval = view.heartbeat_interval_ms.max(10);
    Duration::from_millis(interval * u64::from(view.heartbeat_miss_limit.max(2) - 1))
}

/// Installs the ring of a view if its epoch, a member's addresses or the replication factor
/// changed. (The coordinator bumps the epoch whenever the placement changes; a new factor that
/// leaves the copies as they were is installed too, so the node reports it.)
fn apply_view(server: &Arc<Server>, view: &ClusterView, kick: &Notify) {
    let current = server.routing.ring();
    let ring = Ring::from_view(view);
    let same_members = current.members().eq(ring.members());
    let same_factor = current.replication_factor() == ring.replication_factor()
        && current.copies() == ring.copies();
    if ring.epoch == current.epoch && same_members && same_factor && ring.same_in_sync(&current) {
        return;
    }
    if ring.epoch < current.epoch {
        return; // views only move forward; an older one is a late duplicate
    }
    if ring.epoch != current.epoch {
        info!(
            epoch = ring.epoch,
            owners = view.owners().count(),
            "ring epoch changed"
        );
    }
    if let Some(peers) = server.peers.get() {
        for m in current.members() {
            if ring.member(m.node_id()).is_none() {
                peers.forget(m.node_id());
            }
        }
        // Links to every live member are dialed now, while the view changes, rather than by
        // the first write or forward that needs one (perhaps under load). A link that exists
        // is kept; one that failed is dialed again.
        for m in ring.members() {
            if m.state == MemberState::Down || m.node_id() == server.node_id {
                continue;
            }
            if let Some(addr) = &m.info.peer_addr {
                peers.warm(m.node_id(), addr);
            }
        }
    }
    let pending = server.install_ring(ring);
    server.presence_ring_changed();
    if !pending.is_empty() {
        kick.notify_one();
    }
}

/// Takes over the shards this node owns but has not taken over yet, whenever there are some.
async fn handoff_loop(server: Arc<Server>, kick: Arc<Notify>) {
    let mut warned = 0;
    loop {
        let ring = server.routing.ring();
        let me = server.node_id;
        let pending: Vec<ShardId> = ring
            .shards_of(me)
            .filter(|&s| !server.routing.is_ready(s))
            .collect();
        if pending.is_empty() {
            kick.notified().await;
            continue;
        }
        // Shards last owned by a member that is down wait for it: serving them empty would
        // answer its users as if they did not exist, and split their data in two.
        let shadow = ring.with_down_members();
        let (blocked, pending): (Vec<ShardId>, Vec<ShardId>) =
            pending.into_iter().partition(|&s| {
                shadow.owner(s).is_some_and(|o| {
                    matches!(
                        ring.state_of(o),
                        Some(MemberState::Down | MemberState::Joining)
                    )
                })
            });
        // Shards this node is primary of by their in-sync set hold every acknowledged write
        // here already (it was their replica): adopt them, pull nothing.
        let (adopted, pending): (Vec<ShardId>, Vec<ShardId>) = pending
            .into_iter()
            .partition(|&s| ring.in_sync(s).is_some_and(|set| set.contains(&me)));
        if !adopted.is_empty() {
            match adopt(&server, &adopted).await {
                Ok(()) if server.routing.epoch() == ring.epoch => {
                    server.set_shards_ready(&adopted);
                    crate::groups::fanout::resume(&server, &adopted);
                    info!(
                        epoch = ring.epoch,
                        shards = adopted.len(),
                        "adopted in-sync shards"
                    );
                }
                Ok(()) => continue, // the ring moved meanwhile
                Err(e) => {
                    warn!(epoch = ring.epoch, error = %e, "adopting in-sync shards failed; retrying");
                    let _ = tokio::time::timeout(HANDOFF_RETRY_PAUSE, kick.notified()).await;
                    continue;
                }
            }
        }
        if pending.is_empty() {
            if !blocked.is_empty() {
                warn_once_per_epoch(&mut warned, ring.epoch, blocked.len());
            }
            kick.notified().await;
            continue;
        }
        let started = Instant::now();
        match take_over(&server, &ring, &pending).await {
            Ok(pulled) if server.routing.epoch() == ring.epoch => {
                server.set_shards_ready(&pending);
                crate::groups::fanout::resume(&server, &pending);
                info!(
                    epoch = ring.epoch,
                    shards = pending.len(),
                    pulled,
                    ms = started.elapsed().as_millis() as u64,
                    "took over shards"
                );
            }
            Ok(_) => {} // the ring moved meanwhile: start over with the new one
            Err(e) => {
                warn!(epoch = ring.epoch, error = %e, "hand-off failed; retrying");
                let _ = tokio::time::timeout(HANDOFF_RETRY_PAUSE, kick.notified()).await;
            }
        }
    }
}

/// Makes shards whose rows came by replication this node's to serve (see
/// [`crate::inbox::Inbox::adopt_shard`]): the writer's and the accounts cache's state of them
/// is dropped, and the replicating engine's cached position.
async fn adopt(server: &Arc<Server>, shards: &[ShardId]) -> Result<(), String> {
    for &shard in shards {
        if let Some(engine) = server.replicating.get() {
            engine.forget_position(shard);
        }
        server
            .inbox
            .adopt_shard(shard)
            .await
            .map_err(|e| format!("shard {shard}: {e}"))?;
        server.accounts.forget_cached_shard(shard);
    }
    Ok(())
}

/// Says once per epoch that some shards wait for a down member.
fn warn_once_per_epoch(warned: &mut u64, epoch: u64, shards: usize) {
    if *warned != epoch {
        *warned = epoch;
        warn!(
            epoch,
            shards,
            "shards wait for a down member to come back (or `ctl remove` it to give up its unreplicated data)"
        );
    }
}

/// Pulls `pending` shards from every live member that holds rows for them. Returns how many
/// shards had rows somewhere.
async fn take_over(
    server: &Arc<Server>,
    ring: &Ring,
    pending: &[ShardId],
) -> Result<usize, String> {
    let mut pulled = 0;
    for member in ring.members() {
        let node = member.node_id();
        // A down member cannot answer (the shards it last owned are not pending here, see
        // `handoff_loop`); a joining one owns nothing yet.
        if node == server.node_id
            || !matches!(member.state, MemberState::Active | MemberState::Draining)
        {
            continue;
        }
        let held = match server
            .call_peer(
                node,
                ring.epoch,
                PeerRequest::Holdings {
                    shards: pending.to_vec(),
                },
            )
            .await?
        {
            PeerResponse::Holdings(held) => held,
            other => return Err(format!("node {node} answered Holdings with {other:?}")),
        };
        for shard in held {
            if !pending.contains(&shard) {
                return Err(format!(
                    "node {node} offered shard {shard}, which was not asked"
                ));
            }
            pull_shard(server, ring.epoch, node, shard).await?;
            pulled += 1;
        }
    }
    Ok(pulled)
}

/// Copies one shard from `node`, then has it release its copy.
async fn pull_shard(
    server: &Arc<Server>,
    epoch: u64,
    node: NodeId,
    shard: ShardId,
) -> Result<(), String> {
    for attempt in 1..=HANDOFF_PULLS_MAX {
        // Dedup records expiring within the hour may vanish on either side meanwhile.
        let dedup_cutoff_ms = server.now_ms() + DIGEST_DEDUP_MARGIN_MS;
        let mut digest = Digest::new(dedup_cutoff_ms);
        let mut cursor = None;
        let mut rows_total = 0usize;
        loop {
            let request = PeerRequest::Export {
                shard,
                from: cursor.take(),
                max_bytes: HANDOFF_CHUNK_BYTES,
            };
            let chunk = match server.call_peer(node, epoch, request).await? {
                PeerResponse::Chunk(chunk) => chunk,
                other => return Err(format!("node {node} answered Export with {other:?}")),
            };
            handoff::validate_rows(shard, &chunk.rows).map_err(|e| e.to_string())?;
            for row in &chunk.rows {
                digest.add(row);
            }
            rows_total += chunk.rows.len();
            server
                .inbox
                .import(shard, chunk.rows)
                .await
                .map_err(|e| format!("importing shard {shard}: {e}"))?;
            match chunk.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        handoff::finish_import(&server.inbox, &server.accounts, shard)
            .await
            .map_err(|e| format!("syncing shard {shard}: {e}"))?;
        let release = PeerRequest::Release {
            shard,
            digest: digest.finish(),
            dedup_cutoff_ms,
        };
        match server.call_peer(node, epoch, release).await? {
            PeerResponse::Done => {
                server.metrics.handoff_shards.fetch_add(1, Relaxed);
                server
                    .metrics
                    .handoff_rows
                    .fetch_add(rows_total as u64, Relaxed);
                info!(shard, from = node, rows = rows_total, "shard taken over");
                return Ok(());
            }
            PeerResponse::DigestMismatch => {
                warn!(
                    shard,
                    from = node,
                    attempt,
                    "shard changed during its hand-off; pulling again"
                );
            }
            other => return Err(format!("node {node} answered Release with {other:?}")),
        }
    }
    Err(format!(
        "shard {shard} kept changing on node {node} during {HANDOFF_PULLS_MAX} pulls"
    ))
}

/// A draining node leaves once every shard it held has been taken over.
async fn drain_watch(
    server: Arc<Server>,
    client: CoordinatorClient,
    node_id: NodeId,
    left: watch::Sender<bool>,
) {
    let started = loop {
        if server.routing.ring().state_of(node_id) == Some(MemberState::Draining) {
            break Instant::now();
        }
        tokio::time::sleep(DRAIN_CHECK_INTERVAL).await;
    };
    info!("draining: users are redirected, shards are being taken over");
    loop {
        tokio::time::sleep(DRAIN_CHECK_INTERVAL).await;
        let engine = server.engine.clone();
        let shards = server.config.shard_count;
        let holds = tokio::task::spawn_blocking(move || {
            (0..shards).any(|s| {
                handoff::export_chunk(&*engine, s, None, 1).map_or(true, |c| !c.rows.is_empty())
            })
        })
        .await
        .unwrap_or(true);
        if holds {
            continue;
        }
        match client.remove(node_id).await {
            Ok(_) => {
                info!(
                    ms = started.elapsed().as_millis() as u64,
                    "drained: every shard was taken over; this node left the cluster"
                );
                let _ = left.send(true);
                return;
            }
            Err(e) => warn!(error = %e, "leaving the cluster failed; retrying"),
        }
    }
}
