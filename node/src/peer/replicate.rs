//! Shard replication over peer links: the node's [`ReplicaLinks`] (the primary's side, used
//! by [`crate::replication::NetworkSink`]) and the serving of `Replicate` (the replica's side).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ringpost_coordinator::NodeId;

use super::replica_role::replicate_refusal;
use super::{decode_response, encode_request, PeerRequest, PeerResponse};
use crate::replication::{serve_parts_with, RecordPart, ReplicaLinks, ShardAnswer};
use crate::server::Server;
use crate::shard::ShardId;

/// The node's network for its replication sink: the ring says who must have a shard, the peer
/// links carry the records. Holds the server weakly (the server holds the engine, which holds
/// the sink, which holds this).
pub struct ServerLinks(pub Weak<Server>);

impl ReplicaLinks for ServerLinks {
    /// Every replica the ring places, besides this node (the in-sync set replaces this).
    fn must_have(&self, shard: ShardId) -> Vec<NodeId> {
        let Some(server) = self.0.upgrade() else {
            return Vec::new();
        };
        let ring = server.routing.ring();
        (ring.replicas(shard).iter())
            .copied()
            .filter(|&n| n != server.node_id)
            .collect()
    }

    fn replicate(
        &self,
        node: NodeId,
        parts: Vec<RecordPart>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<ShardAnswer>, String>> {
        let server = self.0.clone();
        Box::pin(async move {
            let server = server.upgrade().ok_or("the node is stopping")?;
            let peers = server.peers.get().ok_or("this node has no peer links")?;
            let ring = server.routing.ring();
            let addr = (ring.member(node).and_then(|m| m.info.peer_addr.clone()))
                .ok_or_else(|| format!("node {node} advertises no peer address"))?;
            let request = encode_request(ring.epoch, PeerRequest::Replicate { parts })?;
            server.metrics.peer_requests_sent.fetch_add(1, Relaxed);
            let started = Instant::now();
            let bytes = peers
                .call(node, &addr, request, timeout)
                .await
                .map_err(|e| e.to_string())?;
            server
                .metrics
                .replicate_round_trip
                .observe(started.elapsed());
            match decode_response(&bytes)? {
                PeerResponse::Replicated(answers) => Ok(answers),
                PeerResponse::WrongOwner { epoch } => {
                    server.metrics.peer_wrong_owner.fetch_add(1, Relaxed);
                    Err(format!(
                        "node {node} at epoch {epoch} does not take these shards' records from \
                         this node at epoch {}",
                        ring.epoch
                    ))
                }
                PeerResponse::Error { code, message } => {
                    Err(format!("node {node} refused (code {code}): {message}"))
                }
                other => Err(format!("node {node} answered Replicate with {other:?}")),
            }
        })
    }
}

/// Serves `Replicate` from node `from`, sent at its `epoch` (the caller has caught up to it if
/// it could): checks the roles ([`replicate_refusal`]), then applies the parts on a blocking
/// thread into the bare database, synced, and answers per shard.
pub(crate) async fn serve(
    server: &Arc<Server>,
    from: NodeId,
    epoch: u64,
    parts: Vec<RecordPart>,
) -> PeerResponse {
    let mut shards: Vec<ShardId> = parts.iter().map(|p| p.shard).collect();
    shards.sort_unstable();
    shards.dedup();
    let ring = server.routing.ring();
    if let Some(refusal) = replicate_refusal(&ring, server.node_id, from, epoch, &shards) {
        return refusal;
    }
    let engine = server.replica_engine();
    let inbox = server.inbox.clone();
    let mut assembly = {
        let mut all = (server.replica_parts.lock()).unwrap_or_else(PoisonError::into_inner);
        all.remove(&from).unwrap_or_default()
    };
    let served = tokio::task::spawn_blocking(move || {
        // Through the inbox, so that its entries gauge counts the replica's copy too.
        let apply = |records: &[_]| inbox.apply_replicated(&*engine, records);
        let served = serve_parts_with(&*engine, &mut assembly, parts, &apply);
        (served, assembly)
    })
    .await;
    let (served, assembly) = match served {
        Ok(done) => done,
        Err(e) => {
            return PeerResponse::Error {
                code: ringpost_wire::ErrorCode::Internal.as_u16(),
                message: format!("applying records failed: {e}"),
            }
        }
    };
    if assembly.held_bytes() > 0 {
        let mut all = (server.replica_parts.lock()).unwrap_or_else(PoisonError::into_inner);
        all.insert(from, assembly);
    }
    let m = &server.metrics;
    m.replicate_records_applied
        .fetch_add(served.records_applied, Relaxed);
    m.replicate_bytes_applied
        .fetch_add(served.bytes_applied, Relaxed);
    PeerResponse::Replicated(served.answers)
}
