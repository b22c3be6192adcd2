//! The node's link to the coordinator: join, become active, heartbeat, and follow the ring
//! epoch the coordinator commits. The node talks to the coordinator only through
//! `ringpost_coordinator::client`.
//!
//! Today a node serves every shard (the single-member ring); routing between several nodes
//! (redirects, forwarding, drain) builds on the epoch this module keeps current.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ringpost_coordinator::{
    Coordinator, CoordinatorClient, EmbeddedConfig, MemberState, NodeId, NodeInfo,
};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::runtime::Bound;
use crate::server::Server;

/// A running link: the heartbeat and watch tasks, and the embedded coordinator if any.
pub struct ClusterLink {
    tasks: Vec<JoinHandle<()>>,
    embedded: Option<Coordinator>,
}

impl ClusterLink {
    /// Starts a single-replica coordinator inside this process (dev), joins it and becomes
    /// active.
    pub async fn start_embedded(
        data_dir: &std::path::Path,
        node_id: NodeId,
        bound: &Bound,
        server: Arc<Server>,
    ) -> Result<ClusterLink> {
        let config = EmbeddedConfig {
            shard_count: u32::from(server.config.shard_count),
            ..EmbeddedConfig::new(data_dir.join("coordinator"))
        };
        let (coordinator, client) = Coordinator::start_embedded(config)
            .await
            .context("starting the embedded coordinator")?;
        let mut link = Self::join(client, node_id, bound, server).await?;
        link.embedded = Some(coordinator);
        Ok(link)
    }

    async fn join(
        client: CoordinatorClient,
        node_id: NodeId,
        bound: &Bound,
        server: Arc<Server>,
    ) -> Result<ClusterLink> {
        let mut info = NodeInfo::new(node_id);
        info.ws_url = bound.ws.map(|a| format!("ws://{a}"));
        info.wss_url = bound.wss.map(|a| format!("wss://{a}"));
        info.quic_addr = bound.quic.map(|a| a.to_string());
        client.join(info).await.context("joining the cluster")?;
        let view = client.activate(node_id).await.context("activating")?;
        server.set_epoch(view.epoch);
        info!(node_id, epoch = view.epoch, cluster = %view.cluster_id, "joined the cluster");

        let interval = Duration::from_millis(view.heartbeat_interval_ms.max(100));
        let heartbeat = {
            let client = client.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                loop {
                    tick.tick().await;
                    match client.heartbeat(node_id).await {
                        Ok(ack) if ack.state == MemberState::Joining => {
                            // Marked down while we were away: come back.
                            if let Err(e) = client.activate(node_id).await {
                                warn!(error = %e, "re-activating after being marked down failed");
                            }
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "heartbeat to the coordinator failed"),
                    }
                }
            })
        };
        let mut watch = client.watch().await.context("watching the cluster view")?;
        let watcher = tokio::spawn(async move {
            loop {
                match watch.changed().await {
                    Ok(view) => {
                        if view.epoch != server.epoch() {
                            info!(epoch = view.epoch, "ring epoch changed");
                            server.set_epoch(view.epoch);
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "cluster watch ended");
                        return;
                    }
                }
            }
        });
        Ok(ClusterLink {
            tasks: vec![heartbeat, watcher],
            embedded: None,
        })
    }

    /// Stops heartbeating and shuts the embedded coordinator down.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(c) = self.embedded {
            c.shutdown().await;
        }
    }
}
