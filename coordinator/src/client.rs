//! The client API: the only way nodes and `ctl` talk to the coordinator.
//!
//! A [`CoordinatorClient`] holds one authenticated connection to one replica at a time, and
//! serializes its requests on it. Reads of local status go to whichever replica it is connected
//! to; writes, heartbeats and [`CoordinatorClient::view`] need the leader: a follower answers
//! `NotLeader` with the leader's client address and the client reconnects there and retries
//! (replicas never forward). Connection failures move on to the next configured address. Every
//! call gives up after [`ClientOptions::retry_budget`].
//!
//! [`CoordinatorClient::watch`] opens a second connection on which the replica pushes every new
//! view; a background task reconnects (to any replica) when it breaks, and only ever hands out
//! views newer than the last one (by `revision`), so a reconnect to a lagging replica never
//! moves a node backwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::auth::ChannelKind;
pub use crate::auth::ClusterSecret;
use crate::channel::{Channel, ChannelError};
use crate::protocol::{
    ClientRequest, ClientResponse, InitSpec, MAX_CLIENT_FRAME_BYTES, WATCH_KEEPALIVE,
};
pub use crate::protocol::{ErrorCode, LeaderHint, WireError};
use crate::state::ClusterConfig;
pub use crate::types::{
    ClusterView, HeartbeatAck, Member, MemberState, NodeId, NodeInfo, ReplicaInfo, StatusReport,
};

/// First retry delay; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(25);
/// Longest delay between retries (and between watch reconnects). Short, so a client notices a
/// new leader soon after an election; at worst a client polls a leaderless cluster 4 times/s.
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// Timeouts and retry budget of a client.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// Connect plus handshake, per address.
    pub connect_timeout: Duration,
    /// One request and its answer.
    pub request_timeout: Duration,
    /// Total time one call may spend retrying (leader changes, reconnects).
    pub retry_budget: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            retry_budget: Duration::from_secs(15),
        }
    }
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No address given.
    #[error("no coordinator addresses given")]
    NoAddresses,
    /// The coordinator refused our secret (or is not ours).
    #[error("authentication failed: wrong cluster secret?")]
    Auth,
    /// The coordinator answered with an error.
    #[error("coordinator refused: {0}")]
    Server(WireError),
    /// Nothing reachable, or no leader, within the retry budget.
    #[error("coordinator unavailable: {0}")]
    Unavailable(String),
    /// The other end broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The watch task ended.
    #[error("watch closed")]
    Closed,
}

impl ClientError {
    /// The coordinator's error code, if the coordinator answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code),
            _ => None,
        }
    }
}

impl From<ChannelError> for ClientError {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::AuthFailed => ClientError::Auth,
            ChannelError::BadMagic
            | ChannelError::WrongChannel { .. }
            | ChannelError::BadTag
            | ChannelError::Decode(_)
            | ChannelError::FrameTooLarge { .. } => ClientError::Protocol(e.to_string()),
            ChannelError::Io(_) | ChannelError::Timeout => ClientError::Unavailable(e.to_string()),
        }
    }
}

struct Conn {
    channel: Option<Channel>,
    /// Index into `addrs` of the next address to try.
    next: usize,
    /// The leader's address, from the last hint.
    leader: Option<SocketAddr>,
}

struct Inner {
    addrs: Vec<SocketAddr>,
    secret: ClusterSecret,
    options: ClientOptions,
    conn: Mutex<Conn>,
}

/// A client of the coordinator. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct CoordinatorClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CoordinatorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorClient")
            .field("addrs", &self.inner.addrs)
            .finish_non_exhaustive()
    }
}

async fn connect_any(
    addrs: &[SocketAddr],
    start: usize,
    secret: &ClusterSecret,
    timeout: Duration,
) -> Result<(Channel, usize), ClientError> {
    let mut last = ClientError::NoAddresses;
    for i in 0..addrs.len() {
        let idx = (start + i) % addrs.len();
        match Channel::connect(
            addrs[idx],
            secret,
            ChannelKind::Client,
            MAX_CLIENT_FRAME_BYTES,
            timeout,
        )
        .await
        {
            Ok(ch) => return Ok((ch, idx)),
            Err(ChannelError::AuthFailed) => return Err(ClientError::Auth),
            Err(e) => last = e.into(),
        }
    }
    Err(last)
}

impl CoordinatorClient {
    /// Connects to the first reachable replica of `addrs` (any replica will do).
    pub async fn connect(
        addrs: Vec<SocketAddr>,
        secret: ClusterSecret,
    ) -> Result<Self, ClientError> {
        Self::connect_with(addrs, secret, ClientOptions::default()).await
    }

    /// [`CoordinatorClient::connect`] with explicit timeouts.
    pub async fn connect_with(
        addrs: Vec<SocketAddr>,
        secret: ClusterSecret,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::NoAddresses);
        }
        let (channel, idx) = connect_any(&addrs, 0, &secret, options.connect_timeout).await?;
        let next = (idx + 1) % addrs.len();
        Ok(CoordinatorClient {
            inner: Arc::new(Inner {
                addrs,
                secret,
                options,
                conn: Mutex::new(Conn {
                    channel: Some(channel),
                    next,
                    leader: None,
                }),
            }),
        })
    }

    /// Another client of the same replicas, with its own connection: its requests never wait
    /// behind this one's (which are serialized on one connection). A node heartbeats on one of
    /// these, so that no heartbeat queues behind writes waiting for their commits.
    pub async fn separate(&self) -> Result<CoordinatorClient, ClientError> {
        let i = &self.inner;
        Self::connect_with(i.addrs.clone(), i.secret.clone(), i.options).await
    }

    /// Joins (or re-announces) a node. A new node is `joining`; call
    /// [`CoordinatorClient::activate`] when it is ready to own shards. A known node keeps its
    /// state (a `down` one becomes `joining`). Returns the view after the join.
    pub async fn join(&self, info: NodeInfo) -> Result<ClusterView, ClientError> {
        self.expect_view(ClientRequest::Join(info)).await
    }

    /// Tells the leader the node is alive. Call every `view.heartbeat_interval_ms`. A node that
    /// was marked `down` comes back as `joining` (see [`HeartbeatAck::state`]) and must activate
    /// again.
    pub async fn heartbeat(&self, node_id: NodeId) -> Result<HeartbeatAck, ClientError> {
        match self.call(ClientRequest::Heartbeat { node_id }).await? {
            ClientResponse::Heartbeat(ack) => Ok(ack),
            other => Err(unexpected(&other)),
        }
    }

    /// Makes a node own shards (`joining`/`draining` → `active`); bumps the epoch.
    pub async fn activate(&self, node_id: NodeId) -> Result<ClusterView, ClientError> {
        self.expect_view(ClientRequest::Activate { node_id }).await
    }

    /// Starts draining a node (→ `draining`); bumps the epoch if it was active.
    pub async fn drain(&self, node_id: NodeId) -> Result<ClusterView, ClientError> {
        self.expect_view(ClientRequest::Drain { node_id }).await
    }

    /// Forgets a node; bumps the epoch if it was active. `UnknownNode` if it is not a member
    /// (also when a retry follows a lost answer to a successful remove).
    pub async fn remove(&self, node_id: NodeId) -> Result<ClusterView, ClientError> {
        self.expect_view(ClientRequest::Remove { node_id }).await
    }

    /// Sets the replication factor (copies of each shard, the primary included,
    /// 1..=[`crate::types::MAX_REPLICATION_FACTOR`]). Bumps the epoch iff the copies per shard
    /// change (`min(factor, active members)`); primaries never move. Placement only: the data
    /// path that fills the replicas is not there yet.
    pub async fn set_replication(&self, factor: u32) -> Result<ClusterView, ClientError> {
        self.expect_view(ClientRequest::SetReplication { factor })
            .await
    }

    /// Sets the failure detector's timing: nodes heartbeat every `interval_ms`, and are marked
    /// down after `miss_limit` missed. Refused (`InvalidRequest`) if the timeout
    /// (`interval_ms × miss_limit`) is shorter than the current one, or out of `init`'s bounds.
    pub async fn set_heartbeat(
        &self,
        interval_ms: u64,
        miss_limit: u32,
    ) -> Result<ClusterView, ClientError> {
        self.expect_view(ClientRequest::SetHeartbeat {
            interval_ms,
            miss_limit,
        })
        .await
    }

    /// As the primary of `change.shards` at `change.epoch`, changes their in-sync replica sets
    /// (see [`crate::state`]); refused with `NotPrimary` if this node is not (or no longer)
    /// their primary at the current epoch. Returns the view with the change.
    pub async fn change_isr(
        &self,
        change: crate::state::IsrChange,
    ) -> Result<ClusterView, ClientError> {
        self.expect_view(ClientRequest::ChangeIsr(change)).await
    }

    /// Linearizable read of the whole view (served by the leader).
    pub async fn view(&self) -> Result<ClusterView, ClientError> {
        self.expect_view(ClientRequest::View).await
    }

    /// Linearizable read of the member list (served by the leader).
    pub async fn members(&self) -> Result<Vec<Member>, ClientError> {
        Ok(self.view().await?.members)
    }

    /// Status of the replica this client is connected to (any replica; not linearizable).
    pub async fn status(&self) -> Result<StatusReport, ClientError> {
        match self.call(ClientRequest::Status).await? {
            ClientResponse::Status(s) => Ok(*s),
            other => Err(unexpected(&other)),
        }
    }

    /// Opens a push stream of views: the current one, then every change.
    pub async fn watch(&self) -> Result<ViewWatch, ClientError> {
        let deadline = Instant::now() + self.inner.options.retry_budget;
        let mut start = 0;
        let mut backoff = MIN_BACKOFF;
        let (channel, first) = loop {
            let attempt = async {
                let (mut ch, idx) = connect_any(
                    &self.inner.addrs,
                    start,
                    &self.inner.secret,
                    self.inner.options.connect_timeout,
                )
                .await?;
                start = idx + 1;
                ch.send(&ClientRequest::Watch).await?;
                let first = next_view(&mut ch).await?;
                Ok::<_, ClientError>((ch, first))
            };
            match attempt.await {
                Ok(x) => break x,
                Err(ClientError::Auth) => return Err(ClientError::Auth),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        let (tx, rx) = watch::channel(Arc::new(first));
        let task = tokio::spawn(watch_task(self.inner.clone(), channel, start, tx));
        Ok(ViewWatch { rx, task })
    }

    async fn expect_view(&self, req: ClientRequest) -> Result<ClusterView, ClientError> {
        match self.call(req).await? {
            ClientResponse::View(v) => Ok(*v),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends `req`, following leader hints and failing over between addresses, within the retry
    /// budget.
    async fn call(&self, req: ClientRequest) -> Result<ClientResponse, ClientError> {
        let opts = self.inner.options;
        let deadline = Instant::now() + opts.retry_budget;
        let mut backoff = MIN_BACKOFF;
        let mut conn = self.inner.conn.lock().await;
        // Whether the last answer was a hint we followed without sleeping: two stale hints in a
        // row (replicas pointing at each other mid-election) must not spin.
        let mut followed_hint = false;
        loop {
            let err = match self.try_once(&mut conn, &req).await {
                Ok(ClientResponse::Error(e)) => {
                    if e.code == ErrorCode::NotLeader {
                        let hint = e.leader.as_ref().and_then(|l| l.client_addr.parse().ok());
                        conn.channel = None;
                        conn.leader = hint;
                        if hint.is_some() && !followed_hint && Instant::now() < deadline {
                            followed_hint = true;
                            continue;
                        }
                    }
                    if !e.code.is_retryable() {
                        return Err(ClientError::Server(e));
                    }
                    ClientError::Server(e)
                }
                Ok(resp) => return Ok(resp),
                Err(ClientError::Auth) => return Err(ClientError::Auth),
                Err(e) => {
                    conn.channel = None;
                    conn.leader = None;
                    e
                }
            };
            followed_hint = false;
            if Instant::now() + backoff >= deadline {
                return Err(match err {
                    ClientError::Server(e) => ClientError::Unavailable(e.to_string()),
                    other => other,
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn try_once(
        &self,
        conn: &mut Conn,
        req: &ClientRequest,
    ) -> Result<ClientResponse, ClientError> {
        let opts = self.inner.options;
        if conn.channel.is_none() {
            let hinted = match conn.leader {
                Some(addr) => Channel::connect(
                    addr,
                    &self.inner.secret,
                    ChannelKind::Client,
                    MAX_CLIENT_FRAME_BYTES,
                    opts.connect_timeout,
                )
                .await
                .ok(),
                None => None,
            };
            let ch = match hinted {
                Some(ch) => ch,
                None => {
                    conn.leader = None;
                    let (ch, idx) = connect_any(
                        &self.inner.addrs,
                        conn.next,
                        &self.inner.secret,
                        opts.connect_timeout,
                    )
                    .await?;
                    conn.next = (idx + 1) % self.inner.addrs.len();
                    ch
                }
            };
            conn.channel = Some(ch);
        }
        // Out of `conn` while the request is in flight: if the caller drops this future after
        // the request went out, the connection is dropped with it, so its late answer can
        // never be read as the answer to the next request.
        let Some(mut ch) = conn.channel.take() else {
            return Err(ClientError::Unavailable("no connection".into()));
        };
        let answer = ch.call(req, opts.request_timeout).await?;
        conn.channel = Some(ch);
        Ok(answer)
    }
}

fn unexpected(resp: &ClientResponse) -> ClientError {
    ClientError::Protocol(format!("unexpected response: {resp:?}"))
}

/// Reads pushes until a view arrives; a silent connection (no keepalive) is an error.
async fn next_view(ch: &mut Channel) -> Result<ClusterView, ClientError> {
    loop {
        let frame = tokio::time::timeout(WATCH_KEEPALIVE * 3, ch.recv::<ClientResponse>())
            .await
            .map_err(|_| ClientError::Unavailable("watch stream silent".into()))??;
        match frame {
            ClientResponse::View(v) => return Ok(*v),
            ClientResponse::Keepalive => {}
            ClientResponse::Error(e) => return Err(ClientError::Server(e)),
            other => return Err(unexpected(&other)),
        }
    }
}

async fn watch_task(
    inner: Arc<Inner>,
    mut channel: Channel,
    mut start: usize,
    tx: watch::Sender<Arc<ClusterView>>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        loop {
            match next_view(&mut channel).await {
                Ok(v) => {
                    backoff = MIN_BACKOFF;
                    tx.send_if_modified(|cur| {
                        let newer = v.revision > cur.revision || v.cluster_id != cur.cluster_id;
                        if newer {
                            *cur = Arc::new(v);
                        }
                        newer
                    });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "watch stream broke; reconnecting");
                    break;
                }
            }
        }
        // Reconnect until it works or the ViewWatch is dropped (which aborts this task).
        loop {
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            let Ok((mut ch, idx)) = connect_any(
                &inner.addrs,
                start,
                &inner.secret,
                inner.options.connect_timeout,
            )
            .await
            else {
                continue;
            };
            start = idx + 1;
            if ch.send(&ClientRequest::Watch).await.is_ok() {
                channel = ch;
                break;
            }
        }
    }
}

/// A stream of cluster views pushed by the coordinator. Dropping it stops the background task.
#[derive(Debug)]
pub struct ViewWatch {
    rx: watch::Receiver<Arc<ClusterView>>,
    task: JoinHandle<()>,
}

impl ViewWatch {
    /// The newest view received.
    pub fn current(&self) -> Arc<ClusterView> {
        self.rx.borrow().clone()
    }

    /// Waits for a view newer than the last one returned (or than the first one), and returns
    /// it. Intermediate views may be skipped; each view is complete.
    pub async fn changed(&mut self) -> Result<Arc<ClusterView>, ClientError> {
        self.rx.changed().await.map_err(|_| ClientError::Closed)?;
        Ok(self.rx.borrow_and_update().clone())
    }

    /// The underlying receiver, e.g. to `select!` on.
    pub fn receiver(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.rx.clone()
    }
}

impl Drop for ViewWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fresh random cluster id (`c-` and 16 hex digits).
pub fn random_cluster_id() -> String {
    format!("c-{:016x}", rand::random::<u64>())
}

/// Parameters of a new cluster, for [`init_cluster`].
#[derive(Debug, Clone)]
pub struct InitParams {
    /// Cluster id; a random one if `None`.
    pub cluster_id: Option<String>,
    /// Shard count (default [`crate::types::DEFAULT_SHARD_COUNT`]).
    pub shard_count: u32,
    /// Replication factor (default [`crate::types::DEFAULT_REPLICATION_FACTOR`]).
    pub replication_factor: u32,
    /// Node heartbeat interval (default 1000 ms).
    pub heartbeat_interval_ms: u64,
    /// Missed heartbeats before a node is marked down (default 5).
    pub heartbeat_miss_limit: u32,
}

impl Default for InitParams {
    fn default() -> Self {
        InitParams {
            cluster_id: None,
            shard_count: crate::types::DEFAULT_SHARD_COUNT,
            replication_factor: crate::types::DEFAULT_REPLICATION_FACTOR,
            heartbeat_interval_ms: 1000,
            heartbeat_miss_limit: 5,
        }
    }
}

/// Creates a cluster whose replica set is exactly the replicas at `addrs` (each is asked for
/// its id and advertised addresses, so ports chosen at start are fine). Safe to repeat with the
/// same explicit `cluster_id`; a different id on an existing cluster is `AlreadyInitialized`.
pub async fn init_cluster(
    addrs: Vec<SocketAddr>,
    secret: ClusterSecret,
    params: InitParams,
) -> Result<ClusterView, ClientError> {
    if addrs.is_empty() {
        return Err(ClientError::NoAddresses);
    }
    let mut replicas = Vec::with_capacity(addrs.len());
    for addr in &addrs {
        let c = CoordinatorClient::connect(vec![*addr], secret.clone()).await?;
        match c.call(ClientRequest::Describe).await? {
            ClientResponse::Described(r) => replicas.push(r),
            other => return Err(unexpected(&other)),
        }
    }
    let spec = InitSpec {
        config: ClusterConfig {
            cluster_id: params.cluster_id.unwrap_or_else(random_cluster_id),
            shard_count: params.shard_count,
            replication_factor: params.replication_factor,
            heartbeat_interval_ms: params.heartbeat_interval_ms,
            heartbeat_miss_limit: params.heartbeat_miss_limit,
        },
        replicas,
    };
    let client = CoordinatorClient::connect(addrs, secret).await?;
    client.expect_view(ClientRequest::Init(spec)).await
}
