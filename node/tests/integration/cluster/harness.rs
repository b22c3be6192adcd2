//! A real cluster on loopback: `ringpost-coordinator run` replicas and `ringpost-node run`
//! nodes as child processes on kernel-picked ports, killed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ringpost_client::{Client, ClientConfig};
use ringpost_coordinator::{ClusterSecret, ClusterView, CoordinatorClient, StatusReport};

pub use crate::e2e_harness::TestNode;

pub const SECRET: &str = "cluster-test-secret-0123456789";
/// Shards of test clusters: enough to spread users, few enough to hand off quickly.
pub const SHARDS: u16 = 256;
/// Node heartbeats: a node is marked down after 8 × 250 ms = 2 s of silence (generous: the
/// test machine may be busy with other tests).
pub const HEARTBEAT_MS: u64 = 250;
pub const MISS_LIMIT: u32 = 8;

/// The `ringpost-coordinator` binary next to `ringpost-node` (the workspace builds both); built
/// on demand when only this crate's tests were built.
fn coordinator_bin() -> PathBuf {
    let node = PathBuf::from(env!("CARGO_BIN_EXE_ringpost-node"));
    let bin = node.with_file_name("ringpost-coordinator");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "-p",
                "ringpost-coordinator",
                "--bin",
                "ringpost-coordinator",
            ])
            .status()
            .expect("run cargo build for the coordinator");
        assert!(status.success(), "building ringpost-coordinator failed");
    }
    bin
}

/// Reads a child's stdout lines on a thread (so the child never blocks on a full pipe).
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    rx
}

pub struct Replica {
    child: Option<Child>,
    pub id: u64,
    pub client_addr: SocketAddr,
    /// `http://host:port` of its admin listener (`/metrics`).
    pub admin_url: String,
}

impl Replica {
    fn start(id: u64, dir: &Path) -> Replica {
        let mut child = Command::new(coordinator_bin())
            .args(["run", "--replica-id", &id.to_string()])
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--raft-listen",
                "127.0.0.1:0",
                "--client-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args([
                "--election-timeout-min-ms",
                "300",
                "--election-timeout-max-ms",
                "600",
            ])
            .env("RINGPOST_COORD_SECRET", SECRET)
            .env("RINGPOST_COORD_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ringpost-coordinator");
        let rx = lines(&mut child);
        let (mut client_addr, mut admin_url) = (None, None);
        while client_addr.is_none() || admin_url.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("replica printed its addresses");
            if let Some(a) = line.strip_prefix("listening client ") {
                client_addr = Some(a.parse().expect("client address"));
            } else if let Some(a) = line.strip_prefix("listening admin ") {
                admin_url = Some(a.to_owned());
            }
        }
        Replica {
            child: Some(child),
            id,
            client_addr: client_addr.unwrap_or_else(|| unreachable!()),
            admin_url: admin_url.unwrap_or_else(|| unreachable!()),
        }
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_alive(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub replicas: Vec<Replica>,
    pub nodes: Vec<TestNode>,
    pub node_ids: Vec<u64>,
    /// Extra arguments of every node started (e.g. `--replicate`).
    pub node_args: Vec<String>,
}

impl TestCluster {
    /// `replicas` coordinators (initialised as one cluster) and `nodes` nodes joined to it.
    pub fn start(replicas: u64, nodes: u64) -> TestCluster {
        Self::start_with(replicas, nodes, &[])
    }

    /// [`TestCluster::start`] with `node_args` added to every node's arguments.
    pub fn start_with(replicas: u64, nodes: u64, node_args: &[&str]) -> TestCluster {
        Self::start_configured(replicas, nodes, node_args, HEARTBEAT_MS, MISS_LIMIT)
    }

    /// [`TestCluster::start_with`] with nodes heartbeating every `heartbeat_ms`, marked down
    /// after `miss_limit` missed heartbeats.
    pub fn start_configured(
        replicas: u64,
        nodes: u64,
        node_args: &[&str],
        heartbeat_ms: u64,
        miss_limit: u32,
    ) -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("secret"), SECRET).expect("secret file");
        let replicas: Vec<Replica> = (1..=replicas)
            .map(|id| Replica::start(id, &dir.path().join(format!("coord{id}"))))
            .collect();
        let addrs: Vec<String> = replicas.iter().map(|r| r.client_addr.to_string()).collect();
        let out = Command::new(coordinator_bin())
            .args(["init", "--shard-count", &SHARDS.to_string()])
            .args(["--heartbeat-interval-ms", &heartbeat_ms.to_string()])
            .args(["--heartbeat-miss-limit", &miss_limit.to_string()])
            .args(["--coordinator", &addrs.join(",")])
            .env("RINGPOST_COORD_SECRET", SECRET)
            .output()
            .expect("run coordinator init");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cluster = TestCluster {
            dir,
            replicas,
            nodes: Vec::new(),
            node_ids: Vec::new(),
            node_args: node_args.iter().map(|a| a.to_string()).collect(),
        };
        for _ in 0..nodes {
            cluster.add_node();
        }
        cluster
    }

    fn coordinator_arg(&self) -> String {
        self.replicas
            .iter()
            .filter(|r| r.is_alive())
            .map(|r| r.client_addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts one more node (ids 1, 2, ...); returns its index.
    pub fn add_node(&mut self) -> usize {
        let id = self.node_ids.len() as u64 + 1;
        let codes = self.codes_file();
        let mut args: Vec<String> = [
            "run",
            "--data-dir",
            "{dir}",
            "--node-id",
            &id.to_string(),
            "--listen-ws",
            "127.0.0.1:0",
            "--listen-admin",
            "127.0.0.1:0",
            "--listen-peer",
            "127.0.0.1:0",
            "--shard-count",
            &SHARDS.to_string(),
            "--coordinator",
            &self.coordinator_arg(),
            "--cluster-secret-file",
            &self.dir.path().join("secret").to_string_lossy(),
            "--codes-file",
            &codes.to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.node_args.iter().cloned());
        self.nodes.push(TestNode::start_args(args));
        self.node_ids.push(id);
        self.nodes.len() - 1
    }

    /// Verification codes of every node (they share one file).
    pub fn codes_file(&self) -> PathBuf {
        self.dir.path().join("verification-codes.txt")
    }

    pub async fn coordinator(&self) -> CoordinatorClient {
        let addrs = self
            .replicas
            .iter()
            .filter(|r| r.is_alive())
            .map(|r| r.client_addr)
            .collect();
        CoordinatorClient::connect(addrs, ClusterSecret::new(SECRET).expect("secret"))
            .await
            .expect("connect to the coordinator")
    }

    pub async fn view(&self) -> ClusterView {
        self.coordinator().await.view().await.expect("view")
    }

    /// Status of one live replica.
    pub async fn status_of(&self, replica: usize) -> StatusReport {
        let addr = self.replicas[replica].client_addr;
        let c = CoordinatorClient::connect(vec![addr], ClusterSecret::new(SECRET).expect("secret"))
            .await
            .expect("connect to a replica");
        c.status().await.expect("status")
    }

    /// The index (in `nodes`) of the node with this id.
    pub fn index_of(&self, node_id: u64) -> usize {
        self.node_ids
            .iter()
            .position(|&id| id == node_id)
            .expect("known node id")
    }

    pub fn config(&self, node: usize) -> ClientConfig {
        ClientConfig {
            request_timeout: Duration::from_secs(20),
            ..ClientConfig::new(self.nodes[node].url("ws"))
        }
    }

    /// Registers `phone` through node `via` (it may be redirected to the owner).
    pub async fn register(&self, via: usize, phone: u64) -> Client {
        let (client, _) =
            ringpost_client::dev::register_device(self.config(via), phone, self.codes_file())
                .await
                .expect("register");
        client
    }

    /// Runs `ringpost-coordinator ctl ARGS` against the live replicas; returns stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(coordinator_bin())
            .args(["ctl", "--coordinator", &self.coordinator_arg()])
            .args(args)
            .env("RINGPOST_COORD_SECRET", SECRET)
            .output()
            .expect("run ctl");
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A two-thread runtime, as the cluster tests run their clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The ring test clusters of these active nodes place users on (factor 1).
pub fn ring_of(nodes: &[u64]) -> ringpost_node::ring::Ring {
    let active: Vec<_> = (nodes.iter())
        .map(|&id| (id, ringpost_coordinator::MemberState::Active))
        .collect();
    ringpost_node::ring::Ring::from_view(&ringpost_coordinator::testing::view(
        1,
        u32::from(SHARDS),
        1,
        &active,
    ))
}

/// The first `n` user ids from `base` whose owner `want` accepts.
pub fn users_where(
    ring: &ringpost_node::ring::Ring,
    base: u64,
    n: usize,
    want: impl Fn(u64) -> bool,
) -> Vec<ringpost_wire::UserId> {
    (base..)
        .filter(|&u| ring.owner_of(u).is_some_and(&want))
        .take(n)
        .collect()
}

/// The first `n` user ids from `base` that `node` owns.
pub fn users_on(
    ring: &ringpost_node::ring::Ring,
    base: u64,
    n: usize,
    node: u64,
) -> Vec<ringpost_wire::UserId> {
    users_where(ring, base, n, |owner| owner == node)
}

/// Runs a client request until it succeeds, sleeping out retryable refusals for up to 40 s;
/// panics on `Forbidden` or once the time is up.
pub async fn retrying<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ringpost_client::ClientError>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e)
                if std::time::Instant::now() < deadline
                    && e.code() != Some(ringpost_wire::ErrorCode::Forbidden) =>
            {
                tokio::time::sleep(e.retry_after().unwrap_or(Duration::from_millis(200))).await;
            }
            Err(e) => panic!("request failed: {e}"),
        }
    }
}

impl TestCluster {
    /// A metric of the node at `index` in `nodes` (0 when it is not exported).
    pub fn metric_at(&self, index: usize, name: &str) -> i64 {
        let (status, body) = self.nodes[index].admin_get("/metrics");
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .map_or(0, |v| v as i64)
    }

    /// A metric of node `node_id` (0 when it is not exported).
    pub fn metric(&self, node_id: u64, name: &str) -> i64 {
        self.metric_at(self.index_of(node_id), name)
    }
}
