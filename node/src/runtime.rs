//! Starting and stopping a node: open storage, start the services, bind the listeners, run the
//! housekeeping tasks, and shut down gracefully (stop accepting, tell clients `GoingAway`, let
//! in-flight writes finish syncing, close).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::accounts::{
    Accounts, AccountsConfig, CodeSender, HttpCodeSender, HttpCodeSenderConfig, LogCodeSender,
};
use crate::conn::Admitted;
use crate::inbox::{Inbox, InboxConfig};
use crate::keys::Keys;
use crate::metrics::{Metrics, Transport as TransportKind};
use crate::peer::replicate::ServerLinks;
use crate::replication::{NetworkSink, ReplicatingEngine, ShardLogSink};
use crate::server::{Server, ServerConfig};
use crate::storage::rocks::{RocksConfig, RocksEngine};
use crate::storage::Engine;
use crate::transport::quic::{self, QuicTransport};
use crate::transport::tls::{self, CertPaths};
use crate::transport::ws::{WsStream, WsTransport};
use crate::transport::wss::{TlsConn, TlsSocket};

/// How often the keepalive sweep runs.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often expired inbox entries are deleted.
pub const EXPIRE_INTERVAL: Duration = Duration::from_secs(600);
/// How often acknowledged entries lingering below the floors of devices that went quiet are
/// range-deleted (up to `inbox::TRIM_DEVICES_PER_PASS` devices a pass; active devices are
/// trimmed by their own acks).
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);
/// How long shutdown waits for connections to close after `GoingAway`.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What drives the ws and wss listeners' connections (`--ws-driver`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WsDriver {
    /// tokio: epoll readiness, a registration and a read per connection.
    #[default]
    Tokio,
    /// io_uring (Linux 6.0+): one thread per listener accepts, receives into buffers shared by
    /// every connection and sends in batches ([`crate::transport::uring`]).
    Uring,
}

/// Everything needed to start a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub data_dir: PathBuf,
    pub listen_ws: Option<SocketAddr>,
    /// What drives `listen_ws`'s connections.
    pub ws_driver: WsDriver,
    pub listen_wss: Option<SocketAddr>,
    pub listen_quic: Option<SocketAddr>,
    /// Shards of the QUIC listener's driver (0 counts as 1; at most
    /// [`quic::driver::SHARDS_MAX`]).
    pub quic_shards: usize,
    pub listen_admin: Option<SocketAddr>,
    /// TLS certificate for wss and QUIC; `None` generates a dev certificate in the data dir.
    pub tls: Option<CertPaths>,
    /// Extra names (host names, IP addresses) a generated dev certificate covers, besides
    /// localhost and the addresses the node listens on.
    pub tls_names: Vec<String>,
    pub server: ServerConfig,
    pub inbox: InboxConfig,
    pub rocks: RocksConfig,
    /// How verification codes reach users.
    pub codes: CodeDelivery,
    /// Wake-up pushes to devices without a connection (no provider: none are sent).
    pub push: crate::push::PushConfig,
    /// Join a standalone coordinator; `None` runs a single-replica coordinator in this
    /// process and joins it (dev, or a one-node deployment).
    pub cluster: Option<crate::cluster::ClusterOptions>,
    /// Ship every shard write to the shard's replicas over peer links (`--replicate`,
    /// experimental: see docs/replication.md). Only for a node in a cluster (`cluster` set);
    /// off, the services write RocksDB directly, as before replication existed.
    pub replicate: bool,
    /// How long a replica has to answer one replication request before its records fail and
    /// the primary drops it from the shards' in-sync sets (`--replica-ack-timeout-ms`; see
    /// [`crate::replication::sink::REPLICA_ACK_TIMEOUT_MS`]).
    pub replica_ack_timeout: std::time::Duration,
    /// Ship every shard write to this sink instead (tests); takes precedence over `replicate`.
    pub replication: Option<ReplicationOptions>,
    /// The media listener and blob store; `None`: media grants are answered `NotImplemented`.
    pub media: Option<MediaOptions>,
}

/// The media listener and where its blobs go ([`crate::media`]).
#[derive(Debug, Clone)]
pub struct MediaOptions {
    pub listen: SocketAddr,
    /// The URL clients reach the listener at (a proxy's, say); `None`: `http://<bound address>`.
    pub public_url: Option<String>,
    pub store: crate::media::store::StoreConfig,
    /// Largest blob granted (at most `MEDIA_BYTES_MAX`, 100 MiB).
    pub blob_bytes_max: u64,
    /// See [`crate::media::MediaConfig::local_free_bytes_min`].
    pub local_free_bytes_min: u64,
}

/// How a node replicates its shards' writes.
#[derive(Clone)]
pub struct ReplicationOptions {
    /// Where the records of every committed batch go before the write returns.
    pub sink: Arc<dyn ShardLogSink>,
    /// The epoch records are written at.
    pub epoch: u64,
}

impl std::fmt::Debug for ReplicationOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationOptions")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// The node's database as the services see it.
pub struct OpenedEngine {
    pub engine: Arc<dyn Engine>,
    /// The wrapper `engine` is, when the node replicates.
    pub replicating: Option<Arc<ReplicatingEngine>>,
}

/// Opens the node's database, wrapped in a [`ReplicatingEngine`] only when `replication` is
/// given: without it, writes cost exactly what they did before replication existed.
pub fn open_engine(
    path: &std::path::Path,
    rocks: &RocksConfig,
    replication: Option<&ReplicationOptions>,
) -> Result<OpenedEngine> {
    let db: Arc<dyn Engine> = Arc::new(
        RocksEngine::open(path, rocks)
            .with_context(|| format!("opening RocksDB in {}", path.display()))?,
    );
    Ok(match replication {
        Some(r) => {
            let wrapper = Arc::new(ReplicatingEngine::new(db, r.sink.clone(), r.epoch));
            OpenedEngine {
                engine: wrapper.clone(),
                replicating: Some(wrapper),
            }
        }
        None => OpenedEngine {
            engine: db,
            replicating: None,
        },
    })
}

/// Accept queue of each TCP listener (the kernel caps it at `net.core.somaxconn`). A reconnect
/// storm arrives faster than one accept loop drains it; with the default of 128 the kernel
/// drops the excess SYNs and clients stall for a 1 s retransmission. Costs nothing until used.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Receive and send buffer asked for on each QUIC UDP socket (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`). Every QUIC client shares the listener's socket, and
/// every peer link the peer socket, so a burst (a handshake storm, a node starved of CPU while
/// its peers replicate to it) overflows the default ~208 KiB, and each dropped datagram costs
/// a loss-recovery timeout that doubles with each loss in a row.
pub const QUIC_SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;

fn listen_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn quic_endpoint(
    config: quinn::ServerConfig,
    addr: SocketAddr,
    shards: usize,
    counters: Arc<quic::driver::Counters>,
) -> std::io::Result<(quic::driver::Endpoint, quic::driver::Incomings)> {
    quic::driver::Endpoint::new(config, quic_socket(addr)?, shards, counters)
}

/// A non-blocking UDP socket bound to `addr` for a QUIC endpoint, with
/// [`QUIC_SOCKET_BUFFER_BYTES`] of receive and send buffer asked for (the client listener's and
/// the peer links').
pub(crate) fn quic_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: a smaller buffer than asked for still works.
    let _ = socket.set_recv_buffer_size(QUIC_SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(QUIC_SOCKET_BUFFER_BYTES);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// How verification codes are delivered.
#[derive(Debug, Clone)]
pub enum CodeDelivery {
    /// Written to the log (and appended to `file` as "<phone> <code>" lines): development only.
    Log { file: Option<PathBuf> },
    /// POSTed to an SMS gateway.
    Http(HttpCodeSenderConfig),
}

/// The addresses a started node listens on.
#[derive(Debug, Clone, Default)]
pub struct Bound {
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub quic: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub media: Option<SocketAddr>,
}

/// A running node.
pub struct Node {
    pub server: Arc<Server>,
    pub bound: Bound,
    pub ca: Option<PathBuf>,
    tasks: JoinSet<()>,
    quic: Option<quic::driver::Endpoint>,
    /// The io_uring drivers of the ws and wss listeners, stopped when the node is.
    #[cfg(target_os = "linux")]
    uring: Vec<Arc<crate::transport::uring::Driver>>,
    cluster: Option<crate::cluster::ClusterLink>,
    /// Where the peer links and the replication streams run (last: it outlives the cluster
    /// link, whose shutdown closes the links on it).
    peer_runtime: Option<PeerRuntime>,
}

/// A runtime of its own for the peer network and the replication streams: one worker thread
/// whose queue holds only peer work. On the client runtime, a replica's answer crossed several
/// tasks (the endpoint's, the connection's, the link's, the stream's), each queued behind
/// every client connection ready to run; in a reconnect storm on a saturated host (72 nodes on
/// two cores) that took over the 10 s ack timeout, replicas were dropped and caught up, and
/// the catch-ups added load. Dropped with its node, without waiting for its tasks.
pub struct PeerRuntime(Option<tokio::runtime::Runtime>);

impl PeerRuntime {
    pub fn new() -> std::io::Result<PeerRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ringpost-peer")
            .enable_all()
            .build()?;
        Ok(PeerRuntime(Some(runtime)))
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(runtime) => runtime.handle().clone(),
            None => unreachable!("the runtime is only taken on drop"),
        }
    }
}

impl Drop for PeerRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            // Not `drop`: that blocks on the tasks, which an async caller may not.
            runtime.shutdown_background();
        }
    }
}

/// Checks `opts` as [`Node::start`] does before it opens storage or binds a listener, and
/// does neither: the TLS certificate and key load (for wss and QUIC), the push providers and
/// the SMS gateway can be configured (their key files parse), and the media limits, public URL
/// and S3 settings are valid. `Node::start` runs it first. `ringpost-node run --check-config`.
pub fn check_options(opts: &NodeOptions) -> Result<()> {
    crate::push::Providers::new(&opts.push).context("configuring push providers")?;
    if let CodeDelivery::Http(config) = &opts.codes {
        HttpCodeSender::new(config.clone()).context("configuring the SMS gateway")?;
    }
    // Without a certificate, `start` generates a dev one in the data dir: nothing to check.
    if let Some(cert) = &opts.tls {
        if opts.listen_wss.is_some() {
            crate::transport::wss::server_config(cert).context("the wss certificate")?;
        }
        if opts.listen_quic.is_some() {
            let idle = Duration::from_millis(u64::from(opts.server.keepalive.idle_timeout_ms));
            quic::server_config(cert, idle).context("the QUIC certificate")?;
        }
    }
    if let Some(m) = &opts.media {
        // The real key (from the cluster secret, or DATA_DIR/media-url.key) is 32 bytes.
        media_config(m, m.listen, vec![0; 32])
            .check()
            .map_err(|e| anyhow::anyhow!("media: {e}"))?;
    }
    Ok(())
}

/// The media configuration of a node whose media listener is bound to `bound`.
fn media_config(m: &MediaOptions, bound: SocketAddr, key: Vec<u8>) -> crate::media::MediaConfig {
    let public_url = m
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{bound}"));
    let mut config = crate::media::MediaConfig::new(public_url, m.store.clone(), key);
    config.blob_bytes_max = m.blob_bytes_max;
    config.local_free_bytes_min = m.local_free_bytes_min;
    config
}

impl Node {
    /// Opens storage, starts services and binds every listener.
    pub async fn start(opts: NodeOptions) -> Result<Node> {
        check_options(&opts)?;
        std::fs::create_dir_all(&opts.data_dir)
            .with_context(|| format!("creating data dir {}", opts.data_dir.display()))?;
        let mut replication = opts.replication.clone();
        let mut network_sink = None;
        let peer_runtime = match opts.cluster {
            Some(_) => Some(PeerRuntime::new().context("starting the peer runtime")?),
            None => None,
        };
        if opts.replicate && replication.is_none() {
            if let Some(peer_runtime) = &peer_runtime {
                let sink = NetworkSink::new(peer_runtime.handle(), opts.replica_ack_timeout);
                replication = Some(ReplicationOptions {
                    sink: sink.clone(),
                    epoch: 0, // the ring's, once the node has one
                });
                network_sink = Some(sink);
                info!("replicating shard writes to their replicas (experimental)");
            } else {
                warn!("--replicate ignored: a node without a coordinator has no replicas");
            }
        }
        let OpenedEngine {
            engine,
            replicating,
        } = open_engine(&opts.data_dir.join("db"), &opts.rocks, replication.as_ref())?;
        let metrics = Arc::new(Metrics::default());
        let registry = Arc::new(crate::registry::Registry::default());
        // Checked before anything starts: a bad key or CA file is a configuration error.
        let providers = Arc::new(
            crate::push::Providers::new(&opts.push).context("configuring push providers")?,
        );
        let push = Arc::new(crate::push::Push::new(&opts.push));
        let restored = push.restore(&*engine).context("reading the push queue")?;
        if restored > 0 {
            info!(restored, "push queue restored");
        }
        let inbox_config = {
            let mut c = opts.inbox.clone();
            c.shard_count = opts.server.shard_count;
            // Stored entries go straight to their devices' connections; a device without one
            // (all of a user's connections are on its owner, this node) gets a wake-up push.
            let r = registry.clone();
            let p = push.clone();
            c.on_stored = Some(Arc::new(move |user, device, seq, entry| {
                match r.device(user, device) {
                    Some(conn) => conn.hand(seq, entry),
                    None => p.entry_stored(user, device, entry.kind, crate::push::now_us()),
                }
            }));
            let r = registry.clone();
            c.on_unsure = Some(Arc::new(move |user, device| r.wake(user, device)));
            let m = metrics.clone();
            c.observer = Some(Arc::new(move |d: Duration, n: usize| {
                m.wal_sync.observe(d);
                m.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                m.commit_group_requests
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }));
            c
        };
        let inbox = Inbox::start(engine.clone(), inbox_config).context("starting the inbox")?;
        metrics.inbox_entries.store(
            inbox.entries_total() as i64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let sender: Arc<dyn CodeSender> = match &opts.codes {
            CodeDelivery::Log { file } => Arc::new(LogCodeSender::new(file.clone())),
            CodeDelivery::Http(config) => Arc::new(
                HttpCodeSender::new(config.clone()).context("configuring the SMS gateway")?,
            ),
        };
        let accounts_config = AccountsConfig {
            shard_count: opts.server.shard_count,
            ..AccountsConfig::default()
        };
        let accounts = Accounts::new(engine.clone(), sender, accounts_config);
        let keys = Keys::new(engine.clone(), opts.server.shard_count);
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let expiry_clock = crate::clock::ExpiryClock::load(engine.clone(), wall_ms)
            .context("loading the expiry clock")?;
        let mut server_config = opts.server.clone();
        if matches!(opts.codes, CodeDelivery::Log { .. }) {
            // Codes written to a log cost nothing: no SMS budget to protect.
            server_config.budgets.codes_per_source = None;
            server_config.budgets.codes_total = None;
        }
        let server = Server::new(
            server_config,
            engine.clone(),
            accounts,
            keys,
            inbox,
            registry,
            metrics,
            expiry_clock,
        );
        if let Some(replicating) = replicating {
            server.set_replicating(replicating);
        }
        let _ = server.push.set(push.clone());
        if let Some(sink) = network_sink {
            sink.bind(Arc::new(ServerLinks::new(
                Arc::downgrade(&server),
                tokio::runtime::Handle::current(),
            )));
            if let Some(engine) = server.replicating.get() {
                sink.start_catch_up(Arc::downgrade(engine));
            }
            tokio::spawn(crate::moves::run(Arc::downgrade(&server)));
        }

        let (cert, ca) = match &opts.tls {
            Some(c) => (c.clone(), c.ca.clone()),
            None if opts.listen_wss.is_some() || opts.listen_quic.is_some() => {
                let mut names = opts.tls_names.clone();
                for addr in [opts.listen_wss, opts.listen_quic].into_iter().flatten() {
                    if !addr.ip().is_unspecified() {
                        names.push(addr.ip().to_string());
                    }
                }
                let c = tls::dev_certificate(&opts.data_dir.join("tls"), &names)?;
                let ca = c.ca.clone();
                (c, ca)
            }
            None => (
                CertPaths {
                    cert: PathBuf::new(),
                    key: PathBuf::new(),
                    ca: None,
                },
                None,
            ),
        };

        let mut tasks = JoinSet::new();
        let mut bound = Bound::default();
        #[cfg(target_os = "linux")]
        let mut uring = Vec::new();
        if let Some(addr) = opts.listen_ws {
            let l = listen_tcp(addr).with_context(|| format!("binding ws {addr}"))?;
            bound.ws = Some(l.local_addr()?);
            #[cfg(target_os = "linux")]
            let l = match start_uring(opts.ws_driver, l, "ws")? {
                Ok((driver, accepted)) => {
                    let accepting = accept_ws_uring(driver.clone(), accepted, None, server.clone());
                    tasks.spawn(accepting);
                    server.metrics.ws_uring.store(true, Relaxed);
                    uring.push(driver);
                    None
                }
                Err(l) => Some(l),
            };
            #[cfg(not(target_os = "linux"))]
            let l = {
                if opts.ws_driver == WsDriver::Uring {
                    warn!("io_uring is Linux only: the ws and wss listeners use tokio");
                }
                Some(l)
            };
            if let Some(l) = l {
                tasks.spawn(accept_ws(l, None, server.clone()));
            }
        }
        if let Some(addr) = opts.listen_wss {
            let l = listen_tcp(addr).with_context(|| format!("binding wss {addr}"))?;
            bound.wss = Some(l.local_addr()?);
            let config = Arc::new(crate::transport::wss::server_config(&cert)?);
            #[cfg(target_os = "linux")]
            let l = match start_uring(opts.ws_driver, l, "wss")? {
                Ok((driver, accepted)) => {
                    let tls = Some(config.clone());
                    tasks.spawn(accept_ws_uring(
                        driver.clone(),
                        accepted,
                        tls,
                        server.clone(),
                    ));
                    server.metrics.wss_uring.store(true, Relaxed);
                    uring.push(driver);
                    None
                }
                Err(l) => Some(l),
            };
            #[cfg(not(target_os = "linux"))]
            let l = Some(l);
            if let Some(l) = l {
                tasks.spawn(accept_ws(l, Some(config), server.clone()));
            }
        }
        let mut endpoint = None;
        if let Some(addr) = opts.listen_quic {
            let config = quic::server_config(
                &cert,
                Duration::from_millis(u64::from(opts.server.keepalive.idle_timeout_ms)),
            )?;
            let (ep, incomings) =
                quic_endpoint(config, addr, opts.quic_shards, server.metrics.quic.clone())
                    .with_context(|| format!("binding quic {addr}"))?;
            bound.quic = Some(ep.local_addr());
            tasks.spawn(accept_quic(incomings, server.clone()));
            endpoint = Some(ep);
        }
        if let Some(addr) = opts.listen_admin {
            let l = listen_tcp(addr).with_context(|| format!("binding admin {addr}"))?;
            bound.admin = Some(l.local_addr()?);
            tasks.spawn(crate::admin::serve(l, server.clone()));
        }
        if let Some(m) = &opts.media {
            let l = listen_tcp(m.listen).with_context(|| format!("binding media {}", m.listen))?;
            let addr = l.local_addr()?;
            bound.media = Some(addr);
            let secret = opts.cluster.as_ref().map(|c| c.secret.expose());
            let key = crate::media::url_key(&opts.data_dir, secret).map_err(anyhow::Error::msg)?;
            let config = media_config(m, addr, key);
            let media = crate::media::Media::new(config, crate::media::wall_clock())
                .map_err(|e| anyhow::anyhow!("media: {e}"))?;
            let _ = server.media.set(media.clone());
            tasks.spawn(crate::media::http::serve(l, media.clone()));
            let s = Arc::downgrade(&server);
            tasks.spawn(crate::media::sweep_periodically(media, move || {
                // The expiry clock: a wall clock that jumped ahead deletes nothing early.
                s.upgrade().map_or(0, |s| s.expiry_now_ms())
            }));
        }
        tasks.spawn(housekeeping(server.clone()));
        if opts.push.enabled() || push.depth() > 0 {
            let owner = Arc::downgrade(&server);
            let worker = crate::push::PushWorker {
                push,
                // The queue is node-local: the database itself, not the replicating wrapper.
                engine: server.replica_engine(),
                accounts: server.accounts.clone(),
                providers,
                owns: Arc::new(move |user| owner.upgrade().is_some_and(|s| s.is_local(user))),
                concurrency: opts.push.concurrency,
            };
            // Not before the node serves its shards: until then it owns no user, and the
            // pushes restored from disk would be dropped as not this node's.
            let ready = server.clone();
            tasks.spawn(async move {
                ready.wait_ready().await;
                drop(ready);
                worker.run().await
            });
        }
        tasks.spawn(crate::outbox::run(server.clone()));
        tasks.spawn(server.clone().presence_retry_registrations());
        let cluster = match opts.cluster.clone() {
            Some(options) => {
                crate::cluster::ClusterLink::start(
                    options,
                    peer_runtime.as_ref().map(PeerRuntime::handle),
                    &opts.data_dir,
                    opts.server.node_id,
                    &bound,
                    server.clone(),
                )
                .await?
            }
            None => {
                crate::cluster::ClusterLink::start_embedded(
                    &opts.data_dir,
                    opts.server.node_id,
                    &bound,
                    server.clone(),
                )
                .await?
            }
        };
        let cluster = Some(cluster);
        Ok(Node {
            server,
            bound,
            ca,
            tasks,
            quic: endpoint,
            #[cfg(target_os = "linux")]
            uring,
            cluster,
            peer_runtime,
        })
    }

    /// Resolves once the node is ready for clients (what `/readyz` reports): an active member
    /// with a lease that has taken over its shards. Client listeners accept from then on.
    pub async fn ready(&self) {
        let log_why = async {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            every.tick().await;
            loop {
                every.tick().await;
                if let Some(why) = self.server.not_ready_reason() {
                    info!(why, "not ready for clients yet");
                }
            }
        };
        tokio::select! {
            _ = self.server.wait_ready() => {}
            _ = log_why => {}
        }
    }

    /// Resolves when the node has been drained and has left the cluster (it should then stop).
    pub async fn left_cluster(&self) {
        match &self.cluster {
            Some(c) => c.left().await,
            None => std::future::pending().await,
        }
    }

    /// Graceful shutdown: stop accepting, send `GoingAway`, wait for connections to close (up
    /// to [`SHUTDOWN_GRACE`]), then stop. Every acknowledged write was already synced.
    pub async fn shutdown(mut self) {
        info!("shutting down: no new connections, telling clients to go away");
        self.tasks.abort_all();
        self.server.begin_shutdown();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while !self.server.registry.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(ep) = self.quic.take() {
            ep.close(quic::CLOSE_GOING_AWAY, b"node shutting down");
            let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
        }
        while self.tasks.join_next().await.is_some() {}
        if let Some(cluster) = self.cluster.take() {
            cluster.shutdown().await;
        }
        // The links are closed: what is left on the peer runtime stops with it.
        drop(self.peer_runtime.take());
        info!(left = self.server.registry.len(), "shutdown complete");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        for driver in self.uring.drain(..) {
            driver.stop();
        }
    }
}

/// The io_uring driver of a ws or wss listener and the connections it accepts.
#[cfg(target_os = "linux")]
type Uring = (
    Arc<crate::transport::uring::Driver>,
    tokio::sync::mpsc::UnboundedReceiver<std::io::Result<crate::transport::uring::Accepted>>,
);

/// Starts the io_uring driver for a WebSocket listener (`listener`: "ws" or "wss") when
/// `driver` asks for it and the kernel allows it; otherwise gives the listener back for tokio
/// (saying why io_uring was refused).
#[cfg(target_os = "linux")]
fn start_uring(
    driver: WsDriver,
    l: TcpListener,
    listener: &'static str,
) -> Result<Result<Uring, TcpListener>> {
    if driver != WsDriver::Uring {
        return Ok(Err(l));
    }
    if let Some(why) = crate::transport::uring::unsupported_reason() {
        warn!(%why, listener, "io_uring refused: the listener uses tokio");
        return Ok(Err(l));
    }
    let l = l
        .into_std()
        .with_context(|| format!("the {listener} listener"))?;
    let started = crate::transport::uring::Driver::start(l)
        .with_context(|| format!("starting the io_uring driver of the {listener} listener"))?;
    info!(
        listener,
        recv_buffers = crate::transport::uring::RECV_BUFS,
        recv_buffer_bytes = crate::transport::uring::RECV_BUF_BYTES,
        "connections are driven by io_uring"
    );
    Ok(Ok(started))
}

/// What both WebSocket accept loops do with a new connection: refuse it while shutting down
/// or past the bounds on unauthenticated connections (`None`), else admit it.
fn admit_ws(server: &Server, peer: SocketAddr) -> Option<Admitted> {
    if server.is_shutting_down() {
        return None;
    }
    let accepted = server.registry.now_ms();
    match server.admission.admit(peer.ip()) {
        Ok(permit) => Some(Admitted {
            permit,
            accepted_ms: accepted,
            source: peer.ip(),
        }),
        Err(bound) => {
            server.metrics.preauth_refused.fetch_add(1, Relaxed);
            tracing::debug!(%peer, ?bound, "too many unauthenticated connections; refused");
            None
        }
    }
}

/// The accept loop of a ws or wss (`tls`) listener driven by io_uring: the driver accepts,
/// this admits.
#[cfg(target_os = "linux")]
async fn accept_ws_uring(
    driver: Arc<crate::transport::uring::Driver>,
    mut accepted: tokio::sync::mpsc::UnboundedReceiver<
        std::io::Result<crate::transport::uring::Accepted>,
    >,
    tls: Option<Arc<rustls::ServerConfig>>,
    server: Arc<Server>,
) {
    let kind = if tls.is_some() {
        TransportKind::Wss
    } else {
        TransportKind::Ws
    };
    // Not accepting until ready, as on the tokio path.
    server.wait_ready().await;
    driver.start_accepting();
    while let Some(next) = accepted.recv().await {
        let (stream, peer) = match next {
            Ok(s) => s,
            Err(e) => {
                warn!(transport = kind.name(), error = %e, "accept failed; raise the open-file limit if this is EMFILE");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                driver.start_accepting();
                continue;
            }
        };
        match (admit_ws(&server, peer), &tls) {
            (Some(admitted), None) => {
                tokio::spawn(serve_ws_stream(
                    server.clone(),
                    WsStream::Uring(stream),
                    kind,
                    admitted,
                ));
            }
            (Some(admitted), Some(config)) => {
                let config = config.clone();
                let wrap = |tls| WsStream::UringTls(Box::new(tls));
                tokio::spawn(serve_tls(server.clone(), stream, config, wrap, admitted));
            }
            // Over TLS the refusal is the connection's close, as on the tokio path.
            (None, Some(_)) => {}
            (None, None) if server.is_shutting_down() => {}
            (None, None) => {
                // A WebSocket client learns why; the stream closes once this is sent.
                let mut stream = stream;
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        stream.send(bytes::Bytes::from_static(PREAUTH_REFUSED_HTTP)),
                    )
                    .await;
                });
            }
        }
    }
}

async fn accept_ws(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    server: Arc<Server>,
) {
    let kind = if tls.is_some() {
        TransportKind::Wss
    } else {
        TransportKind::Ws
    };
    // Bound (so the cluster learns the address) but not accepting until ready: a client that
    // connects early waits in the listen backlog instead of being told `WrongOwner`.
    server.wait_ready().await;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(transport = kind.name(), error = %e, "accept failed; raise the open-file limit if this is EMFILE");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(admitted) = admit_ws(&server, peer) else {
            if tls.is_none() && !server.is_shutting_down() {
                // Best effort and never blocking: a WebSocket client learns why.
                let _ = tcp.try_write(PREAUTH_REFUSED_HTTP);
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(serve_ws(server.clone(), tcp, tls.clone(), kind, admitted));
    }
}

/// One WebSocket connection's TLS handshake (wss) and upgrade, bounded by the handshake
/// timeout. The connection is then served by a task of its own ([`crate::conn::serve`]), so
/// what it keeps for its life holds none of the handshake's state (a TLS connection under way
/// is about 1.2 KiB).
async fn serve_ws(
    server: Arc<Server>,
    tcp: tokio::net::TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    kind: TransportKind,
    admitted: Admitted,
) {
    match tls {
        None => serve_ws_stream(server, WsStream::Plain(tcp), kind, admitted).await,
        Some(config) => {
            let wrap = |tls| WsStream::Tls(Box::new(tls));
            serve_tls(server, tcp, config, wrap, admitted).await
        }
    }
}

/// A wss connection's TLS handshake over `socket` (tokio's TCP or the io_uring driver's), then
/// its upgrade over the stream `wrap` makes of it, both within the handshake timeout.
async fn serve_tls<S: TlsSocket>(
    server: Arc<Server>,
    socket: S,
    config: Arc<rustls::ServerConfig>,
    wrap: impl FnOnce(TlsConn<S>) -> WsStream,
    admitted: Admitted,
) {
    let peer = admitted.source;
    let timeout = Duration::from_millis(server.config.preauth.handshake_timeout_ms.into());
    // The TLS handshake and the upgrade share the one deadline.
    let deadline = tokio::time::Instant::now() + timeout;
    match tokio::time::timeout_at(deadline, TlsConn::accept(socket, config)).await {
        Ok(Ok(tls)) => {
            serve_ws_upgrade(server, wrap(tls), TransportKind::Wss, admitted, deadline).await
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "tls handshake failed"),
        Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
    }
}

/// A WebSocket connection's upgrade over `stream`, bounded by the handshake timeout.
async fn serve_ws_stream(
    server: Arc<Server>,
    stream: WsStream,
    kind: TransportKind,
    admitted: Admitted,
) {
    let timeout = Duration::from_millis(server.config.preauth.handshake_timeout_ms.into());
    let deadline = tokio::time::Instant::now() + timeout;
    serve_ws_upgrade(server, stream, kind, admitted, deadline).await
}

async fn serve_ws_upgrade(
    server: Arc<Server>,
    stream: WsStream,
    kind: TransportKind,
    admitted: Admitted,
    deadline: tokio::time::Instant,
) {
    let peer = admitted.source;
    match tokio::time::timeout_at(deadline, WsTransport::accept(stream)).await {
        Ok(Ok(transport)) => drop(tokio::spawn(crate::conn::serve(
            server, transport, kind, admitted,
        ))),
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "websocket upgrade failed"),
        Err(_) => tracing::debug!(%peer, "websocket upgrade timed out"),
    }
}

async fn accept_quic(mut incomings: quic::driver::Incomings, server: Arc<Server>) {
    server.wait_ready().await;
    while let Some(incoming) = incomings.next().await {
        if server.is_shutting_down() {
            incoming.refuse();
            continue;
        }
        let accepted = server.registry.now_ms();
        let peer = incoming.remote_address();
        let permit = match server.admission.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(bound) => {
                server.metrics.preauth_refused.fetch_add(1, Relaxed);
                tracing::debug!(%peer, ?bound, "too many unauthenticated connections; refused");
                incoming.refuse();
                continue;
            }
        };
        let admitted = Admitted {
            permit,
            accepted_ms: accepted,
            source: peer.ip(),
        };
        tokio::spawn(serve_quic(server.clone(), incoming, admitted));
    }
}

/// One QUIC connection's handshake and the opening of its control stream, bounded by the
/// handshake timeout; then, as in [`serve_ws`], a task of its own serves the connection.
async fn serve_quic(server: Arc<Server>, incoming: quic::driver::Incoming, admitted: Admitted) {
    let peer = admitted.source;
    let timeout = Duration::from_millis(server.config.preauth.handshake_timeout_ms.into());
    let setup = QuicTransport::accept(incoming.accept());
    match tokio::time::timeout(timeout, setup).await {
        Ok(Ok(transport)) => drop(tokio::spawn(crate::conn::serve(
            server,
            transport,
            TransportKind::Quic,
            admitted,
        ))),
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "quic handshake failed"),
        Err(_) => tracing::debug!(%peer, "quic handshake timed out"),
    }
}

/// The answer to a WebSocket client refused by the bounds on unauthenticated connections.
const PREAUTH_REFUSED_HTTP: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Storage that failed for [`STORAGE_RECOVERY_AFTER`] is reopened (every
/// [`STORAGE_RECOVERY_INTERVAL`] until it works), then a synced barrier through the inbox
/// writer proves it and clears the failure: a node whose disk filled up or whose fsync failed
/// takes writes again once the fault is gone, without a restart.
pub const STORAGE_RECOVERY_AFTER: Duration = Duration::from_secs(1);
/// A failed attempt costs little (opening fails at its first sync), so a node comes back
/// within about a second of its disk.
pub const STORAGE_RECOVERY_INTERVAL: Duration = Duration::from_secs(1);

async fn recover_storage(server: &Arc<Server>, last: &mut Option<tokio::time::Instant>) {
    let Some((failing_for, error)) = server.inbox.storage_failing() else {
        return;
    };
    if failing_for < STORAGE_RECOVERY_AFTER
        || last.is_some_and(|t| t.elapsed() < STORAGE_RECOVERY_INTERVAL)
    {
        return;
    }
    *last = Some(tokio::time::Instant::now());
    let engine = server.engine.clone();
    match tokio::task::spawn_blocking(move || engine.recover()).await {
        Ok(Ok(())) => match server.inbox.sync_barrier().await {
            Ok(()) => info!(
                failed_for_s = failing_for.as_secs(),
                %error,
                "storage reopened after a failure; taking writes again"
            ),
            Err(e) => warn!(error = %e, "storage reopened but a synced write still fails"),
        },
        Ok(Err(e)) => warn!(error = %e, "storage still failing: reopening the database failed"),
        Err(e) => warn!(error = %e, "storage recovery task failed"),
    }
}

async fn housekeeping(server: Arc<Server>) {
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    // The first expiry pass waits a whole interval: at start the node has connections to
    // accept, and a pass reads every stored key.
    let mut expire = tokio::time::interval_at(
        tokio::time::Instant::now() + EXPIRE_INTERVAL,
        EXPIRE_INTERVAL,
    );
    let mut trim =
        tokio::time::interval_at(tokio::time::Instant::now() + TRIM_INTERVAL, TRIM_INTERVAL);
    let mut prune = tokio::time::interval(crate::server::RATE_LIMITER_PRUNE_INTERVAL);
    let mut last_recovery: Option<tokio::time::Instant> = None;
    let mut clock_failing = false;
    loop {
        tokio::select! {
            _ = sweep.tick() => {
                recover_storage(&server, &mut last_recovery).await;
                // Unsynced, but RocksDB may queue it behind the inbox writer's fsync: not on
                // an async worker. Logged once per failure, not every second.
                let s = server.clone();
                let persisted =
                    tokio::task::spawn_blocking(move || s.expiry_clock.persist(s.now_ms())).await;
                match persisted {
                    Ok(Ok(())) => clock_failing = false,
                    Ok(Err(e)) if !clock_failing => {
                        clock_failing = true;
                        warn!(error = %e, "persisting the expiry clock failed");
                    }
                    Ok(Err(_)) => {}
                    Err(e) => warn!(error = %e, "persisting the expiry clock: task failed"),
                }
                let reaped = server.registry.sweep();
                if reaped > 0 {
                    tracing::debug!(reaped, "keepalive sweep");
                }
                server.metrics.inbox_entries.store(
                    server.inbox.entries_total() as i64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            _ = expire.tick() => match server.inbox.expire(server.expiry_now_ms()).await {
                Ok(n) if n > 0 => info!(expired = n, "deleted expired inbox entries"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "expiring inbox entries failed"),
            },
            _ = trim.tick() => if let Err(e) = server.inbox.trim().await {
                warn!(error = %e, "trimming acknowledged inbox entries failed");
            },
            _ = prune.tick() => server.prune(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::replication::{read_position, ShardLogRecord, ShipError};
    use crate::storage::{key, Cf, WriteBatch};

    #[derive(Default)]
    struct Count(Mutex<usize>);

    impl ShardLogSink for Count {
        fn ship(&self, records: Vec<ShardLogRecord>, _sync: bool) -> Result<(), ShipError> {
            *self.0.lock().unwrap() += records.len();
            Ok(())
        }
    }

    fn write_to_shard_3(engine: &dyn Engine) {
        let mut b = WriteBatch::new();
        b.put(Cf::Accounts, key(3, &[b"user"]), b"v".to_vec());
        engine.write(b, true).unwrap();
    }

    #[test]
    fn the_engine_replicates_only_when_given_a_sink() {
        let dir = tempfile::tempdir().unwrap();
        let plain = open_engine(&dir.path().join("a"), &RocksConfig::for_tests(), None)
            .unwrap()
            .engine;
        write_to_shard_3(&*plain);
        assert_eq!(read_position(&*plain, 3).unwrap().lsn, 0, "no log kept");

        let sink = Arc::new(Count::default());
        let replication = ReplicationOptions {
            sink: sink.clone(),
            epoch: 1,
        };
        let path = dir.path().join("b");
        let replicated = open_engine(&path, &RocksConfig::for_tests(), Some(&replication))
            .unwrap()
            .engine;
        write_to_shard_3(&*replicated);
        assert_eq!(read_position(&*replicated, 3).unwrap().lsn, 1);
        assert_eq!(*sink.0.lock().unwrap(), 1);
    }
}
