//! Admin HTTP on its own port: `/metrics` (Prometheus text format: the node's metrics, the
//! standard `process_*` ones, and in `dev` the embedded coordinator's `ringpost_coord_*`),
//! `/healthz` (the process is
//! up), `/readyz` (accepting clients: an active member holding a lease that has taken over every
//! shard it owns, whose storage takes writes, not shutting down), `/placement` (the shard
//! placement of the current epoch, summarised per member; `/placement?shard=N` for one shard's
//! nodes). A deliberately tiny HTTP/1.1 responder: one request per connection, bounded head,
//! bounded time, bounded answers.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use ringpost_coordinator::admin::{read_request_line, respond};
use ringpost_coordinator::NodeId;
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::ring::Ring;
use crate::server::Server;

/// Largest request head the admin port reads.
pub use ringpost_coordinator::admin::ADMIN_HEAD_BYTES_MAX;
/// Time a client has to send its request.
pub const ADMIN_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; more wait in the kernel's accept queue.
pub const ADMIN_CONNECTIONS_MAX: usize = 64;

/// Serves the admin port until the listener fails.
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS_MAX));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(ADMIN_READ_TIMEOUT, handle(stream, server)).await;
            drop(permit);
        });
    }
}

async fn handle(mut stream: TcpStream, server: Arc<Server>) -> std::io::Result<()> {
    let Some((method, target)) = read_request_line(&mut stream).await? else {
        return Ok(());
    };
    let (method, target) = (method.as_str(), target.as_str());
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match (method, path) {
        ("GET", "/metrics") => {
            server.metrics.inbox_entries.store(
                server.inbox.entries_total() as i64,
                std::sync::atomic::Ordering::Relaxed,
            );
            server.metrics.storage_failing_seconds.store(
                server
                    .inbox
                    .storage_failing()
                    .map_or(0, |(for_, _)| for_.as_secs().max(1) as i64),
                std::sync::atomic::Ordering::Relaxed,
            );
            let ready = !server.is_shutting_down() && server.not_ready_reason().is_none();
            server
                .metrics
                .ready
                .store(i64::from(ready), std::sync::atomic::Ordering::Relaxed);
            server.metrics.unauthenticated.store(
                server.admission.unauthenticated() as i64,
                std::sync::atomic::Ordering::Relaxed,
            );
            if let Some(peers) = server.peers.get() {
                server
                    .metrics
                    .peer_dials_refused
                    .store(peers.refused_dials(), std::sync::atomic::Ordering::Relaxed);
            }
            let mut body = server.metrics.render_with(&server.groups.metrics);
            server.presence.metrics.render(&mut body);
            server.inbox.group_bodies().render(&mut body);
            server.broadcast.render(&mut body);
            server.status.metrics.render(&mut body);
            if let Some(push) = server.push.get() {
                push.metrics.render(&mut body);
            }
            server.keys_metrics.render(&mut body);
            if let Some(media) = server.media.get() {
                media.metrics.render(&mut body);
            }
            if let Some(coordinator) = server.embedded_coordinator.get() {
                coordinator.render(&mut body);
            }
            ringpost_coordinator::process_metrics::ProcessStats::read().render(&mut body);
            respond(&mut stream, 200, "text/plain; version=0.0.4", &body).await
        }
        ("GET", "/healthz") => respond(&mut stream, 200, "text/plain", "ok\n").await,
        ("GET", "/readyz") => {
            if server.is_shutting_down() {
                respond(&mut stream, 503, "text/plain", "shutting down\n").await
            } else if let Some(why) = server.not_ready_reason() {
                respond(&mut stream, 503, "text/plain", &format!("{why}\n")).await
            } else {
                respond(&mut stream, 200, "text/plain", "ready\n").await
            }
        }
        ("GET", "/placement") => {
            let ring = server.routing.ring();
            match placement(&ring, server.node_id, query) {
                Ok(body) => respond(&mut stream, 200, "text/plain", &body).await,
                Err(why) => respond(&mut stream, 400, "text/plain", &why).await,
            }
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/placement") => {
            respond(&mut stream, 405, "text/plain", "method not allowed\n").await
        }
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "not found: try /metrics, /healthz, /readyz or /placement\n",
            )
            .await
        }
    }
}

/// The `/placement` answer: with no query, the epoch's factor and copies, this node's counts,
/// and one line per member (at most `ringpost_coordinator::types::MAX_MEMBERS`, about 60 bytes
/// each); with `shard=N`, that shard's nodes.
fn placement(ring: &Ring, me: NodeId, query: &str) -> Result<String, String> {
    let mut out = String::new();
    if let Some(shard) = query.strip_prefix("shard=") {
        let shard = shard
            .parse::<u16>()
            .ok()
            .filter(|&s| s < ring.shard_count)
            .ok_or_else(|| format!("shard must be 0..{}\n", ring.shard_count))?;
        let nodes = ring.replicas(shard);
        let _ = write!(out, "shard {shard} at epoch {}: ", ring.epoch);
        match nodes.split_first() {
            None => out.push_str("no active member\n"),
            Some((primary, replicas)) => {
                let _ = write!(out, "primary {primary}, replicas");
                if replicas.is_empty() {
                    out.push_str(" none");
                }
                for r in replicas {
                    let _ = write!(out, " {r}");
                }
                out.push('\n');
            }
        }
        return Ok(out);
    }
    if !query.is_empty() {
        return Err("the only query is shard=N\n".into());
    }
    let counts = ring.placement_counts();
    let _ = writeln!(
        out,
        "epoch {}: replication factor {}, copies per shard {}, shards {}",
        ring.epoch,
        ring.replication_factor(),
        ring.copies(),
        ring.shard_count
    );
    out.push_str("placement only: replicas are assigned but shard data is not replicated yet\n");
    let mine = counts.get(&me).copied().unwrap_or_default();
    let _ = writeln!(
        out,
        "this node {me}: primary for {} shards, replica for {}",
        mine.primary, mine.replica
    );
    let _ = writeln!(
        out,
        "{:>8}  {:<9} {:<16} {:>8} {:>8}",
        "NODE", "STATE", "ZONE", "PRIMARY", "REPLICA"
    );
    for m in ring.members() {
        let c = counts.get(&m.node_id()).copied().unwrap_or_default();
        let zone = match m.info.zone.as_str() {
            "" => "-",
            z => z,
        };
        let _ = writeln!(
            out,
            "{:>8}  {:<9} {:<16} {:>8} {:>8}",
            m.node_id(),
            m.state.as_str(),
            zone,
            c.primary,
            c.replica
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use ringpost_coordinator::{ClusterView, Member, MemberState, NodeInfo};

    use super::*;

    fn ring() -> Ring {
        let member = |id, zone: &str, state| Member {
            info: NodeInfo {
                zone: zone.into(),
                ..NodeInfo::new(id)
            },
            state,
            state_since_ms: 0,
        };
        Ring::from_view(&ClusterView {
            cluster_id: "c".into(),
            epoch: 4,
            revision: 9,
            shard_count: 64,
            replication_factor: 3,
            heartbeat_interval_ms: 100,
            heartbeat_miss_limit: 5,
            members: vec![
                member(1, "a", MemberState::Active),
                member(2, "b", MemberState::Active),
                member(3, "", MemberState::Joining),
            ],
            in_sync_replicas: Default::default(),
        })
    }

    #[test]
    fn summary_counts_every_copy() {
        let r = ring();
        let out = placement(&r, 1, "").unwrap();
        assert!(
            out.starts_with("epoch 4: replication factor 3, copies per shard 2, shards 64\n"),
            "{out}"
        );
        assert!(out.contains("not replicated yet"), "{out}");
        let p1 = r.shards_of(1).count();
        assert!(
            out.contains(&format!(
                "this node 1: primary for {p1} shards, replica for {}",
                64 - p1
            )),
            "{out}"
        );
        let joining = out.lines().find(|l| l.contains("joining")).unwrap();
        assert!(joining.ends_with("0        0"), "{joining}");
        assert_eq!(out.lines().count(), 4 + 3, "{out}");
    }

    #[test]
    fn one_shard_and_bad_queries() {
        let r = ring();
        let out = placement(&r, 1, "shard=7").unwrap();
        let (p, o) = (r.replicas(7)[0], r.replicas(7)[1]);
        assert_eq!(
            out,
            format!("shard 7 at epoch 4: primary {p}, replicas {o}\n")
        );
        for bad in ["shard=64", "shard=-1", "shard=x", "verbose=1"] {
            assert!(placement(&r, 1, bad).is_err(), "{bad}");
        }
        let empty = Ring::empty(8);
        assert_eq!(
            placement(&empty, 1, "shard=0").unwrap(),
            "shard 0 at epoch 0: no active member\n"
        );
    }
}
