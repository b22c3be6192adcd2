//! Measures leader failover on three in-process replicas (real TCP, real RocksDB in a tempdir):
//! each round shuts the leader down, times until a survivor is leader and until a client write
//! commits, then restarts the old leader on its data directory and ports.
//!
//! `cargo run -p ringpost-coordinator --example failover -- [rounds]` (default 5).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ringpost_coordinator::client::InitParams;
use ringpost_coordinator::{
    ClusterSecret, Coordinator, CoordinatorClient, CoordinatorConfig, NodeInfo, RaftTimings,
};

const TIMINGS: RaftTimings = RaftTimings {
    heartbeat_interval_ms: 50,
    election_timeout_min_ms: 300,
    election_timeout_max_ms: 600,
};

fn config(
    id: u64,
    dir: &std::path::Path,
    raft: SocketAddr,
    client: SocketAddr,
) -> CoordinatorConfig {
    let mut c = CoordinatorConfig::new(id, dir.join(format!("r{id}")), secret());
    c.raft_listen = raft;
    c.client_listen = client;
    c.timings = TIMINGS;
    c
}

fn secret() -> ClusterSecret {
    ClusterSecret::new(b"failover-example-secret".to_vec()).expect("secret")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(5), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut replicas = Vec::new();
    for id in 1..=3 {
        replicas.push(Some(
            Coordinator::start(config(id, dir.path(), any, any)).await?,
        ));
    }
    let addrs: Vec<_> = replicas.iter().flatten().map(|r| r.client_addr()).collect();
    let params = InitParams {
        heartbeat_interval_ms: 60_000,
        ..InitParams::default()
    };
    ringpost_coordinator::client::init_cluster(addrs.clone(), secret(), params).await?;
    let client = CoordinatorClient::connect(addrs, secret()).await?;
    println!(
        "election timeout {}-{} ms, raft heartbeat {} ms",
        TIMINGS.election_timeout_min_ms,
        TIMINGS.election_timeout_max_ms,
        TIMINGS.heartbeat_interval_ms
    );
    let (mut elected_ms, mut committed_ms) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        client.join(NodeInfo::new(100 + round as u64)).await?;
        let i = loop {
            if let Some(i) = replicas
                .iter()
                .position(|r| r.as_ref().is_some_and(|r| r.is_leader()))
            {
                break i;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let old = replicas[i].take().expect("leader");
        let (id, raft, client_addr) = (old.replica_id(), old.raft_addr(), old.client_addr());
        let probes: Vec<_> = replicas.iter().flatten().map(|r| r.role_probe()).collect();
        let killed = Instant::now();
        old.shutdown().await;
        let elected = tokio::spawn(async move {
            while !probes.iter().any(|p| p.is_leader()) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            killed.elapsed()
        });
        client.join(NodeInfo::new(200 + round as u64)).await?;
        let committed = killed.elapsed();
        let elected = elected.await?;
        println!(
            "round {round}: leader {id} down; new leader after {} ms, first write committed after {} ms",
            elected.as_millis(),
            committed.as_millis()
        );
        elected_ms.push(elected.as_millis());
        committed_ms.push(committed.as_millis());
        replicas[i] = Some(Coordinator::start(config(id, dir.path(), raft, client_addr)).await?);
        // Let the restarted replica catch up before the next round.
        let target = client.view().await?.revision;
        replicas[i]
            .as_ref()
            .expect("restarted")
            .wait_for_revision(target, Duration::from_secs(10))
            .await
            .ok_or_else(|| anyhow::anyhow!("restarted replica {id} did not catch up"))?;
    }
    elected_ms.sort_unstable();
    committed_ms.sort_unstable();
    println!(
        "new leader: min {} / median {} / max {} ms; first commit: min {} / median {} / max {} ms",
        elected_ms[0],
        elected_ms[elected_ms.len() / 2],
        elected_ms[elected_ms.len() - 1],
        committed_ms[0],
        committed_ms[committed_ms.len() / 2],
        committed_ms[committed_ms.len() - 1]
    );
    for r in replicas.into_iter().flatten() {
        r.shutdown().await;
    }
    Ok(())
}
