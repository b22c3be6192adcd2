//! Three replicas in-process, real openraft, real RocksDB in tempdirs, real TCP on 127.0.0.1:0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringpost_coordinator::client::{ErrorCode, InitParams};
use ringpost_coordinator::{
    ClientError, ClusterSecret, ClusterView, Coordinator, CoordinatorClient, CoordinatorConfig,
    MemberState, NodeInfo, RaftTimings,
};

const WAIT: Duration = Duration::from_secs(15);

fn secret() -> ClusterSecret {
    ClusterSecret::new(b"cluster-membership-test-secret".to_vec()).unwrap()
}

struct Cluster {
    replicas: Vec<Option<Coordinator>>,
    client_addrs: Vec<SocketAddr>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    async fn start(n: u64, params: InitParams) -> Cluster {
        let mut replicas = Vec::new();
        let mut dirs = Vec::new();
        for id in 1..=n {
            let dir = tempfile::tempdir().unwrap();
            let mut c = CoordinatorConfig::new(id, dir.path(), secret());
            c.timings = RaftTimings {
                heartbeat_interval_ms: 50,
                election_timeout_min_ms: 300,
                election_timeout_max_ms: 600,
            };
            replicas.push(Some(Coordinator::start(c).await.unwrap()));
            dirs.push(dir);
        }
        let client_addrs: Vec<SocketAddr> = replicas
            .iter()
            .map(|r| r.as_ref().unwrap().client_addr())
            .collect();
        let view =
            ringpost_coordinator::client::init_cluster(client_addrs.clone(), secret(), params)
                .await
                .unwrap();
        let cluster = Cluster {
            replicas,
            client_addrs,
            _dirs: dirs,
        };
        cluster.converged(view.revision).await;
        cluster
    }

    fn live(&self) -> impl Iterator<Item = &Coordinator> {
        self.replicas.iter().flatten()
    }

    async fn client(&self) -> CoordinatorClient {
        CoordinatorClient::connect(self.client_addrs.clone(), secret())
            .await
            .unwrap()
    }

    fn leader_index(&self) -> Option<usize> {
        self.replicas
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.is_leader()))
    }

    /// Waits until every live replica applied `revision`, and checks they all hold the same view.
    async fn converged(&self, revision: u64) -> Arc<ClusterView> {
        let mut views = Vec::new();
        for r in self.live() {
            let v = r
                .wait_for_revision(revision, WAIT)
                .await
                .unwrap_or_else(|| panic!("replica {} did not reach {revision}", r.replica_id()));
            views.push(v);
        }
        for v in &views[1..] {
            assert_eq!(**v, *views[0], "replicas disagree at revision {revision}");
        }
        views.swap_remove(0)
    }
}

fn node(id: u64) -> NodeInfo {
    NodeInfo {
        ws_url: Some(format!("ws://127.0.0.1:{}/ws", 9000 + id)),
        quic_addr: Some(format!("127.0.0.1:{}", 9100 + id)),
        peer_addr: Some(format!("127.0.0.1:{}", 9200 + id)),
        zone: "z1".into(),
        ..NodeInfo::new(id)
    }
}

/// No failure detection during this test: nodes do not heartbeat.
fn quiet() -> InitParams {
    InitParams {
        shard_count: 256,
        heartbeat_interval_ms: 60_000,
        heartbeat_miss_limit: 100,
        ..InitParams::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_give_every_replica_the_same_epochs() {
    let cluster = Cluster::start(3, quiet()).await;
    assert!(cluster.leader_index().is_some(), "a leader was elected");
    let client = cluster.client().await;
    let mut watch = client.watch().await.unwrap();
    let e0 = watch.current().epoch;
    assert_eq!(watch.current().shard_count, 256);

    let steps: Vec<(&str, u64, u64)> = vec![
        ("join", 10, e0),
        ("join", 11, e0),
        ("activate", 10, e0 + 1),
        ("activate", 11, e0 + 2),
        ("join", 11, e0 + 2), // re-join of an active node keeps it active
        ("drain", 10, e0 + 3),
        ("remove", 10, e0 + 3), // a draining node owned nothing
        ("remove", 11, e0 + 4),
    ];
    let mut last_revision = 0;
    for (op, id, epoch) in steps {
        let view = match op {
            "join" => client.join(node(id)).await,
            "activate" => client.activate(id).await,
            "drain" => client.drain(id).await,
            "remove" => client.remove(id).await,
            _ => unreachable!(),
        }
        .unwrap();
        assert_eq!(view.epoch, epoch, "after {op} {id}");
        let agreed = cluster.converged(view.revision).await;
        assert_eq!(
            agreed.epoch, epoch,
            "every replica has epoch {epoch} after {op} {id}"
        );
        assert!(view.revision >= last_revision);
        last_revision = view.revision;
    }

    // The watch saw the changes pushed, in order, ending at the final view.
    // (`changed` hands out strictly newer views; it may skip intermediate ones.)
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    let mut latest = 0;
    while latest < last_revision {
        assert!(Instant::now() < deadline, "watch did not catch up");
        let v = tokio::time::timeout(WAIT, watch.changed())
            .await
            .unwrap()
            .unwrap();
        seen.push(v.revision);
        latest = v.revision;
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "revisions increase: {seen:?}"
    );
    assert_eq!(watch.current().epoch, e0 + 4);
    assert!(client.members().await.unwrap().is_empty());

    // Errors carry stable codes.
    let err = client.activate(99).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownNode));
    let mut bad = node(12);
    bad.zone = "z".repeat(1000);
    assert_eq!(
        client.join(bad).await.unwrap_err().code(),
        Some(ErrorCode::InvalidRequest)
    );

    // Status from every replica names the same leader.
    let leaders: Vec<_> = cluster.live().map(|r| r.status().leader_id).collect();
    assert!(
        leaders.iter().all(|l| l.is_some() && *l == leaders[0]),
        "{leaders:?}"
    );
    for r in cluster.live() {
        assert_eq!(r.status().replicas.len(), 3);
    }
    for r in cluster.replicas.into_iter().flatten() {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_factor_is_replicated_cluster_state() {
    let cluster = Cluster::start(3, quiet()).await;
    let client = cluster.client().await;
    let v = client.view().await.unwrap();
    assert_eq!((v.replication_factor, v.copies()), (2, 0), "the default");
    for id in [10, 11, 12] {
        client.join(node(id)).await.unwrap();
        client.activate(id).await.unwrap();
    }
    let before = client.view().await.unwrap();
    assert_eq!(before.copies(), 2);

    // 2 -> 3 with three active nodes: the copies change, so does the epoch, on every replica.
    let raised = client.set_replication(3).await.unwrap();
    assert_eq!((raised.replication_factor, raised.copies()), (3, 3));
    assert_eq!(raised.epoch, before.epoch + 1);
    let agreed = cluster.converged(raised.revision).await;
    assert_eq!((agreed.epoch, agreed.replication_factor), (raised.epoch, 3));

    // Refused before it is proposed, with a stable code; nothing changes.
    for bad in [0, 4] {
        assert_eq!(
            client.set_replication(bad).await.unwrap_err().code(),
            Some(ErrorCode::InvalidRequest)
        );
    }
    let after = client.view().await.unwrap();
    assert_eq!(after.revision, raised.revision);

    // Draining one node leaves two copies: one bump for both changes.
    let drained = client.drain(12).await.unwrap();
    assert_eq!((drained.epoch, drained.copies()), (raised.epoch + 1, 2));
    for r in cluster.replicas.into_iter().flatten() {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_node_is_marked_down_through_raft_and_comes_back() {
    let params = InitParams {
        shard_count: 64,
        heartbeat_interval_ms: 100,
        heartbeat_miss_limit: 3,
        ..InitParams::default()
    };
    let cluster = Cluster::start(3, params).await;
    let client = cluster.client().await;
    client.join(node(20)).await.unwrap();
    client.join(node(21)).await.unwrap();
    client.activate(20).await.unwrap();
    let before = client.activate(21).await.unwrap();

    // Node 21 heartbeats; node 20 stays silent.
    let hb_client = client.clone();
    let heartbeats = tokio::spawn(async move {
        loop {
            let _ = hb_client.heartbeat(21).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut watch = client.watch().await.unwrap();
    let down = tokio::time::timeout(WAIT, async {
        loop {
            let v = watch.current();
            if v.member(20).is_some_and(|m| m.state == MemberState::Down) {
                return v;
            }
            watch.changed().await.unwrap();
        }
    })
    .await
    .expect("node 20 marked down");
    assert_eq!(
        down.epoch,
        before.epoch + 1,
        "losing an owner bumps the epoch once"
    );
    assert_eq!(down.member(21).unwrap().state, MemberState::Active);
    let agreed = cluster.converged(down.revision).await;
    assert_eq!(agreed.member(20).unwrap().state, MemberState::Down);

    // It heartbeats again: back as joining, same epoch; activating it bumps the epoch.
    let ack = client.heartbeat(20).await.unwrap();
    assert_eq!(ack.state, MemberState::Joining);
    assert_eq!(ack.epoch, down.epoch);
    let v = client.activate(20).await.unwrap();
    assert_eq!(v.epoch, down.epoch + 1);
    heartbeats.abort();

    assert_eq!(
        client.heartbeat(777).await.unwrap_err().code(),
        Some(ErrorCode::UnknownNode)
    );
    for r in cluster.replicas.into_iter().flatten() {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_shutdown_elects_a_new_leader_and_clients_keep_working() {
    let mut cluster = Cluster::start(3, quiet()).await;
    let client = cluster.client().await;
    let mut watch = client.watch().await.unwrap();
    client.join(node(30)).await.unwrap();
    let before = client.activate(30).await.unwrap();
    cluster.converged(before.revision).await;

    let old = cluster.leader_index().expect("leader");
    let old_id = cluster.replicas[old].as_ref().unwrap().replica_id();
    let old_replica = cluster.replicas[old].take().unwrap();
    let killed = Instant::now();
    old_replica.shutdown().await;

    // Watch the survivors' Raft metrics for the new leader while the client writes.
    let survivors: Vec<_> = cluster.live().map(|r| r.role_probe()).collect();
    let elected = tokio::spawn(async move {
        loop {
            if survivors.iter().any(|p| p.is_leader()) {
                return killed.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });

    // The client keeps working: its next write reaches the new leader.
    let view = client.join(node(31)).await.unwrap();
    let committed = killed.elapsed();
    let elected = tokio::time::timeout(WAIT, elected).await.unwrap().unwrap();
    let new = cluster.leader_index().expect("new leader");
    let new_id = cluster.replicas[new].as_ref().unwrap().replica_id();
    assert_ne!(new_id, old_id);
    println!(
        "failover: leader {old_id} shut down; replica {new_id} elected after {} ms; \
         first client write committed after {} ms (election timeout 300-600 ms)",
        elected.as_millis(),
        committed.as_millis()
    );
    assert_eq!(view.epoch, before.epoch);
    assert!(view.member(31).is_some());
    let agreed = cluster.converged(view.revision).await;
    assert_eq!(agreed.members.len(), 2);

    // The watch moved to a surviving replica and sees the new member.
    tokio::time::timeout(WAIT, async {
        while watch.current().member(31).is_none() {
            watch.changed().await.unwrap();
        }
    })
    .await
    .expect("watch follows the failover");

    // Reads and status keep working too.
    assert_eq!(client.members().await.unwrap().len(), 2);
    for r in cluster.replicas.into_iter().flatten() {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_on_both_ports() {
    let cluster = Cluster::start(1, quiet()).await;
    let r = cluster.live().next().unwrap();
    let wrong = ClusterSecret::new(b"not-the-cluster-secret".to_vec()).unwrap();

    let err = ringpost_coordinator::testing::handshake_raft_port(r.raft_addr(), &wrong)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ringpost_coordinator::ChannelError::AuthFailed),
        "{err}"
    );
    ringpost_coordinator::testing::handshake_raft_port(r.raft_addr(), &secret())
        .await
        .expect("the right secret is accepted");

    let err = CoordinatorClient::connect(vec![r.client_addr()], wrong)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Auth), "{err}");

    // Garbage instead of a handshake gets nothing but the challenge, then a close.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(r.client_addr())
        .await
        .unwrap();
    s.write_all(&[0u8; 73]).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf.len(), 8 + 1 + 32, "only the challenge was sent");

    // The replica is unharmed.
    let client = cluster.client().await;
    client.join(node(40)).await.unwrap();
    for r in cluster.replicas.into_iter().flatten() {
        r.shutdown().await;
    }
}
