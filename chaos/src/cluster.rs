//! A real cluster for the membership scenarios: [`REPLICAS`] `ringpost-coordinator` replicas,
//! each on its own host, created once with `ringpost-coordinator init`, and `ctl` run from the
//! operator's host (`ops`) to ask who leads, which members are up, and to drain and remove
//! nodes. The nodes themselves are [`crate::node::NodeProcess`]es with a
//! [`crate::node::NodeRole::Member`] role; the run ([`crate::scenario::Rig`]) owns them, since
//! faults act on them.
//!
//! Chaos depends on the client SDK only (DESIGN.md), so it reads `ctl --json` output with its
//! own small types ([`ReplicaStatus`], [`View`]) holding just the fields it needs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::coordinator::CoordinatorProcess;
use crate::hosts::{Host, Network};
use crate::node::MemberConfig;
use crate::sys;

/// Coordinator replicas of a run.
pub const REPLICAS: u64 = 3;

/// Nodes a cluster run starts with (scenarios may add one).
pub const NODES: u64 = 3;

/// Nodes a zoned cluster run ([`crate::scenario::Needs::zones`]) starts with: [`ZONES`], two
/// nodes each.
pub const ZONED_NODES: u64 = 4;

/// The zones of a zoned run and their nodes. Zone `a` holds the clients' entry points (nodes 1
/// and 2, which must outlive the faults), so `zone-loss` takes zone `b`. With two zones and
/// factor 2, zone-aware placement puts every shard's two copies in different zones.
pub const ZONES: [(&str, [u64; 2]); 2] = [("a", [1, 2]), ("b", [3, 4])];

/// The zone of node `node_id` in a zoned run (`None`: not one of [`ZONES`]' nodes).
pub fn zone_of(node_id: u64) -> Option<&'static str> {
    ZONES
        .iter()
        .find(|(_, nodes)| nodes.contains(&node_id))
        .map(|(zone, _)| *zone)
}

/// The nodes of zone `zone` in a zoned run (empty: no such zone).
pub fn zone_nodes(zone: &str) -> Vec<u64> {
    ZONES
        .iter()
        .find(|(z, _)| *z == zone)
        .map_or_else(Vec::new, |(_, nodes)| nodes.to_vec())
}

/// Shards of the run's cluster: enough to spread users over the nodes, few enough that a
/// hand-off takes milliseconds.
pub const SHARD_COUNT: u16 = 256;

/// Node heartbeats: a node is marked down after [`HEARTBEAT_MISS_LIMIT`] × [`HEARTBEAT_MS`] =
/// 2 s of silence.
pub const HEARTBEAT_MS: u64 = 250;
pub const HEARTBEAT_MISS_LIMIT: u32 = 8;

/// Time one `ctl` or `init` call may take.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(10);

/// Time `init` is retried while the replicas come up.
const INIT_TIMEOUT: Duration = Duration::from_secs(20);

/// How often a wait for a leader or a member state asks again.
const POLL: Duration = Duration::from_millis(50);

/// One replica's answer in `ctl --json status`.
#[derive(Debug, Clone, Deserialize)]
struct StatusEntry {
    addr: String,
    #[serde(default)]
    status: Option<ReplicaStatus>,
    #[serde(default)]
    error: Option<String>,
}

/// What a replica says about itself and the cluster.
#[derive(Debug, Clone, Deserialize)]
pub struct ReplicaStatus {
    #[serde(default)]
    pub leader_id: Option<u64>,
    pub raft_role: String,
    pub term: u64,
    pub replica: ReplicaInfo,
    pub view: View,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReplicaInfo {
    pub replica_id: u64,
}

/// The cluster view: its epoch, members and in-sync sets.
#[derive(Debug, Clone, Deserialize)]
pub struct View {
    pub epoch: u64,
    pub members: Vec<Member>,
    /// Each shard's in-sync set, primary first (only shards that have one: a shard gets its
    /// first when a replicating primary first writes it).
    #[serde(default)]
    pub in_sync_replicas: std::collections::BTreeMap<u32, Vec<u64>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Member {
    pub info: MemberInfo,
    /// `joining`, `active`, `draining`, `down`.
    pub state: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MemberInfo {
    pub node_id: u64,
}

impl View {
    /// The state of a member, `None` if it is not one.
    pub fn state_of(&self, node_id: u64) -> Option<&str> {
        self.members
            .iter()
            .find(|m| m.info.node_id == node_id)
            .map(|m| m.state.as_str())
    }

    /// In how many in-sync sets node `node_id` is, as the primary and as a replica.
    pub fn in_sync_of(&self, node_id: u64) -> InSync {
        let mut count = InSync::default();
        for set in self.in_sync_replicas.values() {
            match set.iter().position(|&n| n == node_id) {
                Some(0) => count.primary += 1,
                Some(_) => count.replica += 1,
                None => {}
            }
        }
        count
    }

    /// `1 active, 2 down`, for details.
    pub fn describe(&self) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{} {}", m.info.node_id, m.state))
            .collect();
        format!("epoch {}: {}", self.epoch, members.join(", "))
    }
}

/// A node's share of the in-sync sets ([`View::in_sync_of`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InSync {
    /// Sets it leads.
    pub primary: usize,
    /// Sets it is a follower in.
    pub replica: usize,
}

impl InSync {
    pub fn total(&self) -> usize {
        self.primary + self.replica
    }
}

impl std::fmt::Display for InSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} as primary, {} as replica",
            self.primary, self.replica
        )
    }
}

/// The coordinator side of a run's cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The `ringpost-coordinator` binary (also for `init` and `ctl`).
    pub bin: PathBuf,
    pub secret_file: PathBuf,
    /// Every node appends registration codes here.
    pub codes_file: PathBuf,
    pub replicas: Vec<CoordinatorProcess>,
    /// Where `init` and `ctl` run.
    pub ops: Host,
}

impl Cluster {
    /// Client addresses of every replica, comma-separated (dead ones too: clients fail over).
    pub fn coordinators(&self) -> String {
        self.replicas
            .iter()
            .map(CoordinatorProcess::client_addr)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// How node `node_id` joins this cluster.
    pub fn member_config(&self, node_id: u64) -> MemberConfig {
        MemberConfig {
            node_id,
            coordinators: self.coordinators(),
            secret_file: self.secret_file.clone(),
            shard_count: SHARD_COUNT,
            codes_file: self.codes_file.clone(),
            advertise_ws: None,
            advertise_peer: None,
            replicate: false,
            zone: None,
        }
    }

    /// Starts every replica and creates the cluster.
    pub async fn start(&mut self, net: &Network) -> Result<()> {
        for replica in &mut self.replicas {
            replica.start(net).await?;
        }
        let deadline = tokio::time::Instant::now() + INIT_TIMEOUT;
        loop {
            let args = [
                "init".to_string(),
                "--coordinator".into(),
                self.coordinators(),
                "--secret-file".into(),
                self.secret_file.display().to_string(),
                "--shard-count".into(),
                SHARD_COUNT.to_string(),
                "--heartbeat-interval-ms".into(),
                HEARTBEAT_MS.to_string(),
                "--heartbeat-miss-limit".into(),
                HEARTBEAT_MISS_LIMIT.to_string(),
            ];
            match self.run(&args).await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e.context("ringpost-coordinator init"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Runs `ringpost-coordinator ARGS` on the operator's host; its stdout.
    async fn run(&self, args: &[String]) -> Result<String> {
        let mut argv = vec![self.bin.display().to_string()];
        argv.extend(args.iter().cloned());
        let full = self.ops.command(&argv);
        let rest: Vec<&str> = full[1..].iter().map(String::as_str).collect();
        sys::run_timeout(&full[0], &rest, CTL_TIMEOUT).await
    }

    /// `ctl --json ARGS` against every replica; its stdout.
    pub async fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec![
            "ctl".to_string(),
            "--json".into(),
            "--coordinator".into(),
            self.coordinators(),
            "--secret-file".into(),
            self.secret_file.display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        self.run(&all).await
    }

    /// Every replica that answers, with what it says.
    pub async fn status(&self) -> Result<Vec<ReplicaStatus>> {
        let text = self.ctl(&["status"]).await?;
        let entries: Vec<StatusEntry> =
            serde_json::from_str(&text).context("reading `ctl --json status`")?;
        Ok(entries
            .into_iter()
            .filter_map(|e| {
                if let Some(error) = &e.error {
                    tracing::debug!(addr = %e.addr, %error, "replica did not answer");
                }
                e.status
            })
            .collect())
    }

    /// The leader as the replicas see it: the one that says it leads, in the highest term.
    pub async fn leader(&self) -> Result<Option<(u64, u64)>> {
        let status = self.status().await?;
        Ok(status
            .iter()
            .filter(|s| s.raft_role == "leader")
            .max_by_key(|s| s.term)
            .map(|s| (s.replica.replica_id, s.term)))
    }

    /// Waits until some replica leads; it and its term.
    pub async fn wait_leader(&self, limit: Duration) -> Result<(u64, u64)> {
        let started = tokio::time::Instant::now();
        loop {
            if let Ok(Some(leader)) = self.leader().await {
                return Ok(leader);
            }
            if started.elapsed() >= limit {
                bail!("no coordinator replica led within {limit:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until a replica other than `old` leads; the new leader and the time it took.
    pub async fn wait_new_leader(&self, old: u64, limit: Duration) -> Result<(u64, Duration)> {
        let started = tokio::time::Instant::now();
        loop {
            if let Ok(Some((leader, _))) = self.leader().await {
                if leader != old {
                    return Ok((leader, started.elapsed()));
                }
            }
            if started.elapsed() >= limit {
                bail!("no replica but {old} took the lead within {limit:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until every replica answers and names the same leader; the time it took.
    pub async fn wait_all_agree(&self, limit: Duration) -> Result<Duration> {
        let started = tokio::time::Instant::now();
        loop {
            if let Ok(status) = self.status().await {
                let leaders: Vec<Option<u64>> = status.iter().map(|s| s.leader_id).collect();
                if status.len() == self.replicas.len()
                    && leaders[0].is_some()
                    && leaders.iter().all(|l| *l == leaders[0])
                {
                    return Ok(started.elapsed());
                }
            }
            if started.elapsed() >= limit {
                bail!("the replicas did not agree on a leader within {limit:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The cluster view, from the leader.
    pub async fn view(&self) -> Result<View> {
        let text = self.ctl(&["members"]).await?;
        serde_json::from_str(&text).context("reading `ctl --json members`")
    }

    /// Waits until `want` holds for node `node_id`'s state (`None`: not a member); the view
    /// then and the time it took.
    pub async fn wait_member(
        &self,
        node_id: u64,
        want: impl Fn(Option<&str>) -> bool,
        limit: Duration,
    ) -> Result<(View, Duration)> {
        let started = tokio::time::Instant::now();
        loop {
            let last = match self.view().await {
                Ok(view) if want(view.state_of(node_id)) => return Ok((view, started.elapsed())),
                Ok(view) => view.describe(),
                Err(e) => format!("{e:#}"),
            };
            if started.elapsed() >= limit {
                bail!(
                    "node {node_id} did not reach the expected state within {limit:?} (last: \
                     {last})"
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops every replica (SIGTERM).
    pub async fn stop(&mut self, net: &Network) {
        for replica in &mut self.replicas {
            if replica.is_running() {
                replica.terminate(net).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctl_json_reads_into_our_types() {
        let status = r#"[
          {"addr":"127.0.0.1:7941","status":{"last_applied_index":8,"leader_id":1,
            "raft_role":"leader","replica":{"client_addr":"a","raft_addr":"b","replica_id":1},
            "term":3,"view":{"epoch":3,"members":[{"info":{"node_id":1,"ws_url":"ws://x"},
            "state":"active","state_since_ms":1}]}}},
          {"addr":"127.0.0.1:7942","error":"coordinator unavailable"}
        ]"#;
        let entries: Vec<StatusEntry> = serde_json::from_str(status).unwrap();
        assert_eq!(entries.len(), 2);
        let s = entries[0].status.as_ref().unwrap();
        assert_eq!((s.replica.replica_id, s.term, s.leader_id), (1, 3, Some(1)));
        assert!(entries[1].status.is_none() && entries[1].error.is_some());
        assert_eq!(s.view.state_of(1), Some("active"));
        assert_eq!(s.view.state_of(2), None);
        assert_eq!(s.view.describe(), "epoch 3: 1 active");
        assert!(s.view.in_sync_replicas.is_empty(), "absent: none");
    }

    #[test]
    fn in_sync_sets_read_from_ctl_json_and_count_per_node() {
        let members = r#"{"epoch":9,"members":[],"replication_factor":2,
          "in_sync_replicas":{"3":[1,3],"7":[3],"12":[2,1],"40":[3,2]}}"#;
        let view: View = serde_json::from_str(members).unwrap();
        assert_eq!(view.in_sync_replicas.get(&12), Some(&vec![2, 1]));
        assert_eq!(
            view.in_sync_of(3),
            InSync {
                primary: 2,
                replica: 1
            }
        );
        assert_eq!(view.in_sync_of(1).to_string(), "1 as primary, 1 as replica");
        assert_eq!(view.in_sync_of(4).total(), 0);
    }

    #[test]
    fn zones_split_the_zoned_nodes_in_two_and_spare_the_entry_points() {
        let all: Vec<u64> = ZONES.iter().flat_map(|(_, nodes)| *nodes).collect();
        assert_eq!(all, (1..=ZONED_NODES).collect::<Vec<_>>());
        for node in 1..=ZONED_NODES {
            let zone = zone_of(node).expect("every zoned node has a zone");
            assert!(zone_nodes(zone).contains(&node));
        }
        assert_eq!(zone_of(ZONED_NODES + 1), None);
        assert!(zone_nodes("nowhere").is_empty());
        // The entry points (nodes 1 and 2) share a zone, so losing the other zone spares them.
        assert_eq!(zone_of(1), zone_of(2));
        assert_eq!(zone_nodes("b"), vec![3, 4]);
    }
}
