//! A running replica: storage, Raft, the two listeners and the failure detector, and the handle
//! that stops them ([`Coordinator`]). Also the embedded single-replica mode for `ringpost-node dev`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{Config, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::auth::ClusterSecret;
use crate::client::{ClientError, CoordinatorClient};
use crate::detector::FailureDetector;
use crate::metrics::MetricsProbe;
use crate::network::PeerNetworkFactory;
use crate::protocol::{InitSpec, WireError, MAX_APPEND_ENTRIES, SNAPSHOT_CHUNK_BYTES};
use crate::raft_types::Raft;
use crate::service::Service;
use crate::state::ClusterConfig;
use crate::store::StoreError;
use crate::types::{ClusterView, NodeId, ReplicaInfo, StatusReport, DEFAULT_SHARD_COUNT};

/// How long an embedded replica may take to elect itself and re-apply its log at start.
const EMBEDDED_START_WAIT: Duration = Duration::from_secs(10);

/// How long [`Coordinator::shutdown`] waits for the store to close.
const STORE_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Default maximum of concurrent client connections per replica.
pub const DEFAULT_MAX_CLIENT_CONNECTIONS: usize = 4096;

/// Raft timing. Failover takes about one election timeout plus a round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTimings {
    /// Leader-to-follower heartbeat interval.
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max_ms: u64,
}

impl Default for RaftTimings {
    fn default() -> Self {
        RaftTimings {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
        }
    }
}

/// Everything a replica needs to run.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// This replica's id (not 0).
    pub replica_id: NodeId,
    /// RocksDB directory for the Raft log, vote and snapshots.
    pub data_dir: PathBuf,
    /// Where to listen for other replicas (port 0: any).
    pub raft_listen: SocketAddr,
    /// Where to listen for nodes and `ctl` (port 0: any).
    pub client_listen: SocketAddr,
    /// Where to serve `/metrics` and `/healthz` over plain HTTP (port 0: any); `None`: not
    /// at all.
    pub admin_listen: Option<SocketAddr>,
    /// Address other replicas use; default: the bound raft address.
    pub raft_advertise: Option<String>,
    /// Address clients are sent to in leader hints; default: the bound client address.
    pub client_advertise: Option<String>,
    /// The cluster secret.
    pub secret: ClusterSecret,
    /// Raft timing.
    pub timings: RaftTimings,
    /// Take a snapshot (and allow purging the log) every this many applied entries.
    pub snapshot_every_entries: u64,
    /// Concurrent client connections, at most.
    pub max_client_connections: usize,
}

impl CoordinatorConfig {
    /// A config with defaults for everything but the id, directory and secret; listens on
    /// 127.0.0.1 with OS-chosen ports, no admin listener.
    pub fn new(replica_id: NodeId, data_dir: impl Into<PathBuf>, secret: ClusterSecret) -> Self {
        let any: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
        CoordinatorConfig {
            replica_id,
            data_dir: data_dir.into(),
            raft_listen: any,
            client_listen: any,
            admin_listen: None,
            raft_advertise: None,
            client_advertise: None,
            secret,
            timings: RaftTimings::default(),
            snapshot_every_entries: 1000,
            max_client_connections: DEFAULT_MAX_CLIENT_CONNECTIONS,
        }
    }

    /// Checks the configuration as [`Coordinator::start`] does before it binds or opens the
    /// store, and does neither (`ringpost-coordinator run --check-config`).
    pub fn check(&self) -> Result<(), CoordinatorError> {
        self.raft_config().map(drop)
    }

    /// The openraft configuration, checked (by us and by openraft).
    fn raft_config(&self) -> Result<Config, CoordinatorError> {
        if self.replica_id == 0 {
            return Err(CoordinatorError::Config("replica id 0 is reserved".into()));
        }
        let t = self.timings;
        Config {
            cluster_name: "ringpost-coordinator".into(),
            heartbeat_interval: t.heartbeat_interval_ms,
            election_timeout_min: t.election_timeout_min_ms,
            election_timeout_max: t.election_timeout_max_ms,
            max_payload_entries: MAX_APPEND_ENTRIES,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries.max(1)),
            max_in_snapshot_log_to_keep: self.snapshot_every_entries.max(1),
            ..Config::default()
        }
        .validate()
        .map_err(|e| CoordinatorError::Config(e.to_string()))
    }
}

/// Why a replica could not start or an operation on its handle failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A listener could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Configuration refused (by us or by openraft).
    #[error("invalid config: {0}")]
    Config(String),
    /// Raft failed to start.
    #[error("raft: {0}")]
    Raft(String),
    /// A request was refused.
    #[error("{0}")]
    Refused(WireError),
    /// The embedded client could not connect.
    #[error("client: {0}")]
    Client(#[from] ClientError),
}

/// Parameters of an embedded single-replica coordinator. The cluster it creates has the default
/// replication factor ([`crate::types::DEFAULT_REPLICATION_FACTOR`]); with its one node that is
/// one copy per shard.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Data directory (a `raft/` directory is created inside).
    pub data_dir: PathBuf,
    /// Shard count at first start (ignored afterwards: it is fixed at `init`).
    pub shard_count: u32,
    /// Node heartbeat interval at first start.
    pub heartbeat_interval_ms: u64,
    /// Missed heartbeats before a node is marked down, at first start.
    pub heartbeat_miss_limit: u32,
}

impl EmbeddedConfig {
    /// Defaults: [`DEFAULT_SHARD_COUNT`] shards, 1 s heartbeats, 5 misses.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EmbeddedConfig {
            data_dir: data_dir.into(),
            shard_count: DEFAULT_SHARD_COUNT,
            heartbeat_interval_ms: 1000,
            heartbeat_miss_limit: 5,
        }
    }
}

/// Reads one replica's Raft role without a round trip.
#[derive(Clone)]
pub struct RoleProbe(watch::Receiver<openraft::RaftMetrics<u64, crate::raft_types::RaftNode>>);

impl RoleProbe {
    /// Whether the replica is the leader now.
    pub fn is_leader(&self) -> bool {
        self.0.borrow().state == ServerState::Leader
    }

    /// The leader the replica knows of.
    pub fn current_leader(&self) -> Option<NodeId> {
        self.0.borrow().current_leader
    }

    /// The replica's current term.
    pub fn term(&self) -> u64 {
        self.0.borrow().current_term
    }
}

/// A running replica. Dropping it without [`Coordinator::shutdown`] aborts its tasks.
pub struct Coordinator {
    svc: Service,
    raft_addr: SocketAddr,
    client_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    store_closed: crate::store::ClosedWhenGone,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, CoordinatorError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| CoordinatorError::Bind { addr, source })
}

impl Coordinator {
    /// Opens the store, binds both listeners and starts Raft. An uninitialized replica waits to
    /// be contacted by the leader or to receive `init`.
    pub async fn start(config: CoordinatorConfig) -> Result<Coordinator, CoordinatorError> {
        let raft_config = config.raft_config()?;

        let raft_listener = bind(config.raft_listen).await?;
        let client_listener = bind(config.client_listen).await?;
        let admin_listener = match config.admin_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let local = |l: &TcpListener, a| {
            l.local_addr()
                .map_err(|source| CoordinatorError::Bind { addr: a, source })
        };
        let raft_addr = local(&raft_listener, config.raft_listen)?;
        let client_addr = local(&client_listener, config.client_listen)?;
        let admin_addr = match (&admin_listener, config.admin_listen) {
            (Some(l), Some(a)) => Some(local(l, a)?),
            _ => None,
        };
        let me = ReplicaInfo {
            replica_id: config.replica_id,
            raft_addr: config
                .raft_advertise
                .clone()
                .unwrap_or_else(|| raft_addr.to_string()),
            client_addr: config
                .client_advertise
                .clone()
                .unwrap_or_else(|| client_addr.to_string()),
        };

        let (view_tx, views) = watch::channel(None);
        let (log, sm, store_closed) = crate::store::open_tracked(&config.data_dir, view_tx)?;
        let committed = log.committed_index();
        let network = PeerNetworkFactory {
            secret: config.secret.clone(),
        };
        let raft = Raft::new(config.replica_id, Arc::new(raft_config), network, log, sm)
            .await
            .map_err(|e| CoordinatorError::Raft(e.to_string()))?;

        let svc = Service {
            raft: raft.clone(),
            me,
            views,
            detector: Arc::new(Mutex::new(FailureDetector::new())),
            metrics: Arc::default(),
            committed,
            pushed_view: Arc::default(),
            marking_down: Default::default(),
        };
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(crate::network::serve_peers(
            raft_listener,
            raft,
            config.secret.clone(),
            stop.clone(),
        ));
        tasks.spawn(crate::api::serve_clients(
            client_listener,
            svc.clone(),
            config.secret.clone(),
            config.max_client_connections,
            stop.clone(),
        ));
        if let Some(l) = admin_listener {
            tasks.spawn(crate::admin::serve_admin(
                l,
                svc.metrics_probe(),
                stop.clone(),
            ));
        }
        tasks.spawn(crate::service::run_failure_detector(svc.clone(), stop));
        tracing::info!(replica = config.replica_id, %raft_addr, %client_addr, admin_addr = ?admin_addr, "coordinator replica started");
        Ok(Coordinator {
            svc,
            raft_addr,
            client_addr,
            admin_addr,
            shutdown,
            tasks,
            store_closed,
        })
    }

    /// Starts a one-replica coordinator in-process (for `ringpost-node dev`), creates the
    /// cluster on first start, and returns it with a client connected to it over loopback TCP,
    /// used exactly like a remote one. The secret is random per process.
    pub async fn start_embedded(
        config: EmbeddedConfig,
    ) -> Result<(Coordinator, CoordinatorClient), CoordinatorError> {
        let secret = ClusterSecret::random();
        let mut c = CoordinatorConfig::new(1, config.data_dir.join("raft"), secret.clone());
        // One replica: it elects itself after one timeout; keep that short.
        c.timings = RaftTimings {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
        };
        let coordinator = Coordinator::start(c).await?;
        let initialized = coordinator
            .svc
            .raft
            .is_initialized()
            .await
            .map_err(|e| CoordinatorError::Raft(e.to_string()))?;
        if !initialized {
            let spec = InitSpec {
                config: ClusterConfig {
                    cluster_id: crate::client::random_cluster_id(),
                    shard_count: config.shard_count,
                    replication_factor: crate::types::DEFAULT_REPLICATION_FACTOR,
                    heartbeat_interval_ms: config.heartbeat_interval_ms,
                    heartbeat_miss_limit: config.heartbeat_miss_limit,
                },
                replicas: vec![coordinator.svc.me.clone()],
            };
            coordinator
                .svc
                .init(spec)
                .await
                .map_err(CoordinatorError::Refused)?;
        }
        // After a restart the view appears once the log is re-applied.
        let mut views = coordinator.svc.views.clone();
        tokio::time::timeout(EMBEDDED_START_WAIT, views.wait_for(Option::is_some))
            .await
            .map_err(|_| CoordinatorError::Raft("embedded replica did not apply its log".into()))?
            .map_err(|e| CoordinatorError::Raft(e.to_string()))?;
        let client = CoordinatorClient::connect(vec![coordinator.client_addr], secret).await?;
        Ok((coordinator, client))
    }

    /// This replica's id.
    pub fn replica_id(&self) -> NodeId {
        self.svc.me.replica_id
    }

    /// The bound Raft address.
    pub fn raft_addr(&self) -> SocketAddr {
        self.raft_addr
    }

    /// The bound client address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The bound admin (`/metrics`) address, if it has an admin listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// What renders this replica's `ringpost_coord_*` metrics (what its admin port serves,
    /// without the process metrics), for an embedding process that serves its own `/metrics`.
    pub fn metrics_probe(&self) -> MetricsProbe {
        self.svc.metrics_probe()
    }

    /// This replica's applied view (may lag the leader); `None` before `init`.
    pub fn view(&self) -> Option<Arc<ClusterView>> {
        self.svc.views.borrow().clone()
    }

    /// A receiver of this replica's applied views.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<ClusterView>>> {
        self.svc.views.clone()
    }

    /// Raft and cluster status as this replica sees it.
    pub fn status(&self) -> StatusReport {
        self.svc.status()
    }

    /// Whether this replica is the Raft leader now.
    pub fn is_leader(&self) -> bool {
        self.svc.raft.metrics().borrow().state == ServerState::Leader
    }

    /// A cheap, cloneable handle on this replica's Raft role (for tests and health checks).
    pub fn role_probe(&self) -> RoleProbe {
        RoleProbe(self.svc.raft.metrics())
    }

    /// The leader this replica knows of.
    pub fn current_leader(&self) -> Option<NodeId> {
        self.svc.raft.metrics().borrow().current_leader
    }

    /// Waits until this replica has applied the view at `revision` or later.
    pub async fn wait_for_revision(
        &self,
        revision: u64,
        timeout: Duration,
    ) -> Option<Arc<ClusterView>> {
        let mut rx = self.svc.views.clone();
        let r = tokio::time::timeout(
            timeout,
            rx.wait_for(|v| v.as_ref().is_some_and(|v| v.revision >= revision)),
        )
        .await;
        match r {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        }
    }

    /// Stops the listeners, the detector and Raft, and waits for them.
    pub async fn shutdown(self) {
        let replica_id = self.svc.me.replica_id;
        let _ = self.shutdown.send(true);
        if let Err(e) = self.svc.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        let mut tasks = self.tasks;
        while tasks.join_next().await.is_some() {}
        // openraft's workers let go of the store shortly after `shutdown` returns; wait for it
        // so the data directory can be reopened at once.
        drop(self.svc);
        let mut store_closed = self.store_closed;
        if !store_closed.wait(STORE_CLOSE_WAIT).await {
            tracing::warn!("store still open {STORE_CLOSE_WAIT:?} after shutdown");
        }
        tracing::info!(replica = replica_id, "coordinator replica stopped");
    }
}
