//! The shared state of a running node and the execution of session requests against the shard
//! services (accounts, keys, inbox), the registry of connected devices and the rate limits.

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ringpost_wire::{
    Body, DeviceCiphertextRef, DeviceId, DeviceList, Done, ErrorCode, Frame, LinkCode,
    MismatchedDevices, MsgId, RegisterChallenge, Registered, SendAck, SendStatus, UserId,
};
use tracing::{info, warn};

use crate::accounts::{AccountError, Accounts};
use crate::inbox::{
    AckRequest, Append, AppendOutcome, Entry, EntryHeader, EntryKind, Inbox, InboxError,
};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::peer::{Store, StoreKind, Stored, Targets};
use crate::registry::{CloseReason, Registry};
use crate::routing::{Route, Routing};
use crate::session::{Answer, Request};

/// Sends, receipts and typing indicators one device may make per second, sustained.
pub const DEVICE_RATE_PER_S: u32 = 200;
/// Burst allowance on top of the sustained rate.
pub const DEVICE_BURST: u32 = 400;
/// Devices tracked by the rate limiter are pruned of idle state this often, which bounds its
/// memory by the devices active in the last interval.
pub const RATE_LIMITER_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Node-wide settings the request handlers need.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub node_id: u64,
    pub shard_count: u16,
    pub device_rate_per_s: u32,
    pub device_burst: u32,
    pub keepalive: crate::session::Keepalive,
    /// Bounds on connections that have not authenticated (see [`crate::admission`]).
    pub preauth: crate::admission::PreAuthLimits,
    /// Budgets of the requests other than sends, receipts and typing (see [`crate::budgets`]).
    pub budgets: crate::budgets::BudgetConfig,
    /// Reconnects of devices whose user moved to another node are spread over this many
    /// milliseconds (`Migrate.reconnect_after_ms` is drawn from `[0, this]`); at most
    /// [`crate::conn::MIGRATE_SPREAD_MS_MAX`].
    pub migrate_spread_ms: u32,
    /// How long a status lives after it is posted ([`crate::status::STATUS_TTL_MS`]; tests
    /// shorten it).
    pub status_ttl_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            node_id: 1,
            shard_count: crate::shard::SHARD_COUNT_DEFAULT,
            device_rate_per_s: DEVICE_RATE_PER_S,
            device_burst: DEVICE_BURST,
            keepalive: Default::default(),
            preauth: Default::default(),
            budgets: Default::default(),
            migrate_spread_ms: crate::conn::MIGRATE_SPREAD_MS_DEFAULT,
            status_ttl_ms: crate::status::STATUS_TTL_MS,
        }
    }
}

/// Everything a connection's requests act on.
pub struct Server {
    pub node_id: u64,
    pub config: ServerConfig,
    /// The ring snapshot, shard readiness and coordinator lease.
    pub routing: Routing,
    /// Links to the other nodes (set once the node has joined a multi-node cluster).
    pub(crate) peers: std::sync::OnceLock<crate::peer::link::PeerNet>,
    /// Keeps each conversation's stores in order while one is forwarded or retried.
    pub(crate) order: Arc<crate::forward::order::ConversationOrder>,
    /// The node's database, for shard hand-offs (every service owns its own column families).
    pub(crate) engine: Arc<dyn crate::storage::Engine>,
    /// The replicating wrapper `engine` is, when the node replicates (`--replicate`): its epoch
    /// follows the ring, and records received as a replica go below it.
    pub(crate) replicating: std::sync::OnceLock<Arc<crate::replication::ReplicatingEngine>>,
    /// The coordinator this node joined (a standalone one): a primary proposes its shards'
    /// in-sync set changes through it.
    pub(crate) coordinator: std::sync::OnceLock<ringpost_coordinator::CoordinatorClient>,
    /// The embedded coordinator's metrics (dev: a cluster of one), served on this node's
    /// `/metrics` since that coordinator has no admin port of its own.
    pub(crate) embedded_coordinator: std::sync::OnceLock<ringpost_coordinator::MetricsProbe>,
    /// Records other nodes are sending in parts, one in assembly per primary (see
    /// [`crate::replication::part`]).
    pub(crate) replica_parts: std::sync::Mutex<
        std::collections::HashMap<ringpost_coordinator::NodeId, crate::replication::Reassembly>,
    >,
    /// Held shared while records received as a replica are applied, and exclusively while
    /// [`crate::moves`] checks that a copy is no longer this node's and drops it: a catch-up
    /// can never land between the check and the drop.
    pub(crate) replica_apply: tokio::sync::RwLock<()>,
    pub accounts: Arc<Accounts>,
    pub keys: Arc<Keys>,
    pub inbox: Inbox,
    /// Contacts, blocks and privacy ([`crate::contacts`]), and presence ([`crate::presence`]).
    pub contacts: Arc<crate::contacts::Contacts>,
    pub presence: crate::presence::Presence,
    /// Group states and fan-out logs of the groups this node owns ([`crate::groups`]).
    pub groups: Arc<crate::groups::Groups>,
    pub(crate) fanout: crate::groups::fanout::Fanout,
    pub broadcast: crate::broadcast::BroadcastMetrics,
    /// Statuses' posting limits and counters ([`crate::status`]).
    pub status: crate::status::Status,
    pub registry: Arc<Registry>,
    /// Wake-up pushes to devices without a connection ([`crate::push`]); set by the runtime.
    pub push: std::sync::OnceLock<Arc<crate::push::Push>>,
    /// Places of unauthenticated connections (see [`crate::admission`]).
    pub admission: Arc<crate::admission::Admission>,
    pub metrics: Arc<Metrics>,
    /// Media grants ([`crate::media`]); unset when the node has no media listener.
    pub media: std::sync::OnceLock<Arc<crate::media::Media>>,
    limiter: DefaultKeyedRateLimiter<(UserId, DeviceId)>,
    pub(crate) budgets: crate::budgets::Budgets,
    /// Counters of uploads, claims, low-key events and identity announcements.
    pub keys_metrics: crate::keys::serve::KeysMetrics,
    shutting_down: AtomicBool,
    /// Decides what has expired; see [`crate::clock`].
    pub expiry_clock: crate::clock::ExpiryClock,
    started: Instant,
    started_unix_ms: u64,
    /// The runtime that serves connections: a parked connection woken from another thread
    /// (the inbox writer, the IO driver) gets its task here (see [`crate::conn`]).
    pub(crate) conn_runtime: std::sync::OnceLock<tokio::runtime::Handle>,
}

impl Server {
    pub fn new(
        config: ServerConfig,
        engine: Arc<dyn crate::storage::Engine>,
        accounts: Accounts,
        keys: Keys,
        inbox: Inbox,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        expiry_clock: crate::clock::ExpiryClock,
    ) -> Arc<Server> {
        let rate = NonZeroU32::new(config.device_rate_per_s.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.device_burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let engine_for_groups = engine.clone();
        Arc::new(Server {
            node_id: config.node_id,
            routing: Routing::new(config.node_id, config.shard_count),
            peers: std::sync::OnceLock::new(),
            order: Default::default(),
            contacts: Arc::new(crate::contacts::Contacts::new(
                engine.clone(),
                config.shard_count,
            )),
            engine,
            replicating: std::sync::OnceLock::new(),
            coordinator: std::sync::OnceLock::new(),
            embedded_coordinator: std::sync::OnceLock::new(),
            replica_parts: Default::default(),
            replica_apply: tokio::sync::RwLock::new(()),
            accounts: Arc::new(accounts),
            keys: Arc::new(keys),
            inbox,
            presence: Default::default(),
            groups: Arc::new(crate::groups::Groups::new(
                engine_for_groups,
                config.shard_count,
            )),
            fanout: Default::default(),
            broadcast: Default::default(),
            status: crate::status::Status::new(config.status_ttl_ms),
            registry,
            push: std::sync::OnceLock::new(),
            admission: crate::admission::Admission::new(config.preauth),
            metrics,
            media: std::sync::OnceLock::new(),
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            budgets: crate::budgets::Budgets::new(config.budgets),
            keys_metrics: Default::default(),
            shutting_down: AtomicBool::new(false),
            expiry_clock,
            started: Instant::now(),
            conn_runtime: std::sync::OnceLock::new(),
            started_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            config,
        })
    }

    /// Wall-clock milliseconds since the Unix epoch, monotonic within this process.
    pub fn now_ms(&self) -> u64 {
        self.started_unix_ms + self.started.elapsed().as_millis() as u64
    }

    /// The time expiry decisions use: never ahead of monotonic time since the last run.
    pub fn expiry_now_ms(&self) -> u64 {
        self.expiry_clock.now_ms(self.now_ms())
    }

    /// The database without the replicating wrapper: where records received as a replica are
    /// applied (through the wrapper they would be shipped on).
    pub(crate) fn replica_engine(&self) -> Arc<dyn crate::storage::Engine> {
        match self.replicating.get() {
            Some(r) => r.inner().clone(),
            None => self.engine.clone(),
        }
    }

    /// Makes `engine`, the wrapper this server's engine is, follow the ring's epoch.
    pub fn set_replicating(&self, engine: Arc<crate::replication::ReplicatingEngine>) {
        engine.set_ring(self.node_id, self.routing.ring());
        let _ = self.replicating.set(engine);
    }

    /// The ring epoch this node routes at.
    pub fn epoch(&self) -> u64 {
        self.routing.epoch()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Relaxed)
    }

    /// Stops taking requests and asks every connection to close with `GoingAway`.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Relaxed);
        self.registry.close_all(CloseReason::ShuttingDown);
    }

    /// Periodic housekeeping: prune idle rate-limiter state.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.budgets.prune();
        self.presence.prune();
        self.status.prune();
    }

    /// Executes one session request. Synchronous checks run now; the returned future waits
    /// only for storage.
    /// Executes a session's request. `source` is the client's address, for the budgets that
    /// are charged to it.
    pub fn execute(
        self: &Arc<Self>,
        request: Request,
        source: Option<std::net::IpAddr>,
    ) -> BoxFuture<'static, Answer> {
        let server = self.clone();
        if self.is_shutting_down() {
            return Box::pin(async { error(ErrorCode::ShuttingDown, "node is shutting down") });
        }
        match request {
            Request::Authenticate(auth) => Box::pin(async move {
                if let Err(elsewhere) = server.gate(auth.user).await {
                    return elsewhere;
                }
                match server
                    .accounts
                    .authenticate(auth.user, auth.device, &auth.token)
                {
                    Ok(()) => Answer::Authenticated {
                        user: auth.user,
                        device: auth.device,
                        frames: vec![],
                    },
                    Err(e) => account_error(e),
                }
            }),
            Request::Anonymous(body) => {
                Box::pin(async move { server.anonymous(body, source).await })
            }
            Request::Device { user, device, body } => server.device_request(user, device, body),
        }
    }

    async fn anonymous(&self, body: Body, source: Option<std::net::IpAddr>) -> Answer {
        let now = self.now_ms();
        // Accounts live on their user's owner: register and link there.
        let user = match &body {
            Body::RegisterRequest(r) => Some(r.phone),
            Body::RegisterVerify(v) => Some(v.phone),
            Body::LinkDevice(l) => Some(l.user),
            _ => None,
        };
        if let Some(user) = user {
            if let Err(elsewhere) = self.gate(user).await {
                return elsewhere;
            }
        }
        match body {
            Body::RegisterRequest(r) => {
                if let Some(refused) = self.budgets.charge_code(source) {
                    self.metrics.rate_limited.fetch_add(1, Relaxed);
                    return refused;
                }
                // The code's synced write off the async workers; the gateway call on them.
                let phone = r.phone;
                let issued = match blocking(&self.accounts, move |a| a.issue_code(phone, now)).await
                {
                    Ok(issued) => issued,
                    Err(e) => return account_error(e),
                };
                let sent = match self.accounts.deliver_code(&issued, r.channel).await {
                    Err(crate::accounts::AccountError::Delivery(e)) => {
                        let withdrawn = issued.clone();
                        if let Err(w) =
                            blocking(&self.accounts, move |a| a.withdraw_code(&withdrawn)).await
                        {
                            warn!(phone, error = %w, "withdrawing an undelivered code failed");
                        }
                        Err(crate::accounts::AccountError::Delivery(e))
                    }
                    other => other,
                };
                match sent {
                    Ok(c) => frames(RegisterChallenge {
                        expires_in_ms: c.expires_in_ms,
                        retry_after_ms: c.retry_after_ms,
                    }),
                    Err(e) => account_error(e),
                }
            }
            Body::RegisterVerify(v) => {
                // Argon2 (registration lock) and a synced write: off the async workers.
                let accounts = self.accounts.clone();
                let verified = tokio::task::spawn_blocking(move || {
                    accounts.verify(v.phone, &v.code, &v.pin, &v.device_name, now)
                })
                .await;
                match verified {
                    Ok(Ok(verified)) => {
                        let r = verified.registered;
                        // The new primary reuses device id 1: the old devices' inboxes and keys
                        // go before the new one is served.
                        for old in verified.removed_devices {
                            self.forget_device(r.user, old).await;
                        }
                        info!(user = r.user, device = r.device, "device registered");
                        Answer::Authenticated {
                            user: r.user,
                            device: r.device,
                            frames: vec![Frame::new(
                                0,
                                Registered {
                                    user: r.user,
                                    device: r.device,
                                    token: r.token.to_bytes(),
                                },
                            )],
                        }
                    }
                    Ok(Err(e)) => account_error(e),
                    Err(_) => error(ErrorCode::Internal, "verification task failed"),
                }
            }
            Body::LinkDevice(l) => match blocking(&self.accounts, move |a| {
                a.link(l.user, &l.code, &l.device_name, now)
                    .map(|r| (l.user, r))
            })
            .await
            {
                Ok((user, (device, token))) => {
                    let l = ringpost_wire::LinkDevice {
                        user,
                        code: String::new(),
                        device_name: String::new(),
                    };
                    info!(user = l.user, device, "device linked");
                    Answer::Authenticated {
                        user: l.user,
                        device,
                        frames: vec![Frame::new(
                            0,
                            Registered {
                                user: l.user,
                                device,
                                token: token.to_bytes(),
                            },
                        )],
                    }
                }
                Err(e) => account_error(e),
            },
            other => error(
                ErrorCode::Unauthenticated,
                &format!("{} needs an authenticated connection", other.name()),
            ),
        }
    }

    /// Drops everything a removed device had: its inbox, its keys, its connection.
    async fn forget_device(&self, user: UserId, device: DeviceId) {
        if let Err(e) = self.inbox.drop_device(user, device).await {
            warn!(user, device, error = %e, "dropping a removed device's inbox failed");
        }
        // A synced write (and, on a replicating node, a wait for the replicas): not on an
        // async worker.
        let keys = self.keys.clone();
        let dropped = tokio::task::spawn_blocking(move || keys.drop_device(user, device)).await;
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(user, device, error = %e, "dropping a removed device's keys failed")
            }
            Err(e) => {
                warn!(user, device, error = %e, "dropping a removed device's keys: task failed")
            }
        }
        if let Some(conn) = self.registry.device(user, device) {
            conn.ask_close(CloseReason::Removed);
        }
    }

    /// Charges a request to the device's budget (see [`crate::budgets`]): `Some(answer)` when
    /// it is over budget.
    pub(crate) fn over_budget(
        &self,
        user: UserId,
        device: DeviceId,
        charge: crate::budgets::Charge,
    ) -> Option<Answer> {
        let refused = self.budgets.charge(user, device, charge);
        if refused.is_some() {
            self.metrics.rate_limited.fetch_add(1, Relaxed);
        }
        refused
    }

    fn rate_limited(&self, user: UserId, device: DeviceId) -> Option<Answer> {
        self.rate_limited_n(user, device, NonZeroU32::MIN)
    }

    /// [`Server::rate_limited`] charged `n` times at once (a broadcast, once per recipient).
    fn rate_limited_n(&self, user: UserId, device: DeviceId, n: NonZeroU32) -> Option<Answer> {
        let checked = match self.limiter.check_key_n(&(user, device), n) {
            Ok(checked) => checked,
            // More than the burst: can never pass.
            Err(_) => {
                self.metrics.rate_limited.fetch_add(1, Relaxed);
                return Some(error(
                    ErrorCode::LimitExceeded,
                    &format!(
                        "{n} sends at once exceed the burst of {}",
                        self.config.device_burst
                    ),
                ));
            }
        };
        match checked {
            Ok(()) => None,
            Err(not_until) => {
                self.metrics.rate_limited.fetch_add(1, Relaxed);
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                Some(Answer::Error {
                    code: ErrorCode::RateLimited,
                    message: format!(
                        "rate limit of {} per second exceeded; retry in {} ms",
                        self.config.device_rate_per_s,
                        wait.as_millis().max(1)
                    ),
                    retry_after_ms: wait.as_millis().clamp(1, u128::from(u32::MAX)) as u32,
                })
            }
        }
    }

    fn device_request(
        self: &Arc<Self>,
        user: UserId,
        device: DeviceId,
        body: Body,
    ) -> BoxFuture<'static, Answer> {
        let server = self.clone();
        // A device is connected to its user's owner; after an epoch change moved the user its
        // connection is being closed, and nothing more is served on it.
        if let Some(moved) = self.serves_here(user) {
            return Box::pin(async move { moved });
        }
        match body {
            Body::Send(send) => {
                if let Some(limited) = self.rate_limited(user, device) {
                    return Box::pin(async move { limited });
                }
                self.send(user, device, send)
            }
            Body::Receipt(r) => {
                if let Some(limited) = self.rate_limited(user, device) {
                    return Box::pin(async move { limited });
                }
                self.receipt(user, device, r)
            }
            Body::Typing(t) => {
                if let Some(limited) = self.rate_limited(user, device) {
                    return Box::pin(async move { limited });
                }
                // Over TYPING_PER_S_MAX: dropped without an answer, like the indicator itself.
                if self.presence.typing_allowed(user, device) {
                    self.typing(user, device, t);
                }
                Box::pin(async { Answer::Frames(vec![]) })
            }
            // Broadcast lists (crate::broadcast), charged once per recipient.
            Body::BroadcastSend(b) => {
                let recipients = match crate::broadcast::recipients(user, &b) {
                    Ok(r) => r,
                    Err(refused) => return Box::pin(async move { refused }),
                };
                let n = NonZeroU32::new(recipients.len() as u32).unwrap_or(NonZeroU32::MIN);
                if let Some(limited) = self.rate_limited_n(user, device, n) {
                    return Box::pin(async move { limited });
                }
                crate::broadcast::send(self, user, device, b.msg_id, recipients)
            }
            // Prekey uploads (crate::keys::serve): an identity change is stored for the user's
            // contacts before the answer.
            Body::PrekeyUpload(u) => {
                let charge = crate::budgets::Charge::KeyUpload;
                if let Some(refused) = self.over_budget(user, device, charge) {
                    return Box::pin(async move { refused });
                }
                crate::keys::serve::upload(self, user, device, u)
            }
            // Statuses (crate::status), charged to the messaging limit and the posting limit.
            Body::StatusPost(p) => {
                if let Some(limited) = self.rate_limited(user, device) {
                    return Box::pin(async move { limited });
                }
                crate::status::post(self, user, device, p)
            }
            // Contacts and presence (crate::presence::serve).
            Body::PresenceSubscribe(_) | Body::SetPrivacy(_) | Body::ContactsUpdate(_) => {
                let charge = match &body {
                    Body::PresenceSubscribe(_) => crate::budgets::Charge::Lookup,
                    _ => crate::budgets::Charge::AccountChange,
                };
                if let Some(refused) = self.over_budget(user, device, charge) {
                    return Box::pin(async move { refused });
                }
                Box::pin(async move {
                    match body {
                        Body::PresenceSubscribe(s) => {
                            server.presence_subscribe(user, device, s.users).await
                        }
                        Body::SetPrivacy(p) => {
                            server.set_privacy(user, p.last_seen, p.online).await
                        }
                        Body::ContactsUpdate(u) => server.contacts_update(user, u).await,
                        _ => error(ErrorCode::Internal, "unreachable"),
                    }
                })
            }
            // Groups (crate::groups): executed on the group's owner.
            Body::GroupSend(_) => {
                if let Some(limited) = self.rate_limited(user, device) {
                    return Box::pin(async move { limited });
                }
                crate::groups::serve::request(self, user, device, body)
            }
            Body::GroupReceipt(_) => {
                if let Some(limited) = self.rate_limited(user, device) {
                    return Box::pin(async move { limited });
                }
                crate::groups::serve::request(self, user, device, body)
            }
            Body::GroupCreate(_) | Body::GroupUpdate(_) | Body::GroupInfoRequest(_) => {
                let charge = match &body {
                    Body::GroupInfoRequest(_) => crate::budgets::Charge::Lookup,
                    _ => crate::budgets::Charge::AccountChange,
                };
                if let Some(refused) = self.over_budget(user, device, charge) {
                    return Box::pin(async move { refused });
                }
                crate::groups::serve::request(self, user, device, body)
            }
            // Media (crate::media): a grant is signed here; the upload goes to the media listener.
            Body::MediaUploadRequest(r) => {
                let answer = self.media_grant(user, device, &r);
                Box::pin(async move { answer })
            }
            other => Box::pin(async move { server.device_control(user, device, other).await }),
        }
    }

    /// Answers a `MediaUploadRequest`: checked, then charged to the device's media budget.
    fn media_grant(
        &self,
        user: UserId,
        device: DeviceId,
        request: &ringpost_wire::MediaUploadRequest,
    ) -> Answer {
        let Some(media) = self.media.get() else {
            return error(
                ErrorCode::NotImplemented,
                "media is not enabled on this node (it has no media listener)",
            );
        };
        if let Err(e) = media.check(request) {
            return error(e.code(), &e.to_string());
        }
        if let Some(refused) = self.over_budget(user, device, crate::budgets::Charge::MediaUpload) {
            return refused;
        }
        match media.grant(user, device, request) {
            Ok(grant) => frames(grant),
            Err(e) => error(e.code(), &e.to_string()),
        }
    }

    pub(crate) async fn device_control(
        &self,
        user: UserId,
        device: DeviceId,
        body: Body,
    ) -> Answer {
        let now = self.now_ms();
        // Questions about another user go to its owner; one whose shard is here but not taken
        // over yet (or while this node has no lease) waits for it or gets a retryable error,
        // never a final NotFound.
        use crate::budgets::Charge;
        let charge = match &body {
            Body::DeviceListRequest(_) => Some(Charge::Lookup),
            Body::PrekeyClaim(c) => Some(Charge::ClaimOf(c.user)),
            Body::LinkCodeRequest(_)
            | Body::RemoveDevice(_)
            | Body::SetRegistrationLock(_)
            | Body::PushRegister(_) => Some(Charge::AccountChange),
            _ => None,
        };
        if let Some(refused) = charge.and_then(|c| self.over_budget(user, device, c)) {
            return refused;
        }
        let about = match &body {
            Body::DeviceListRequest(r) => Some(r.user),
            Body::PrekeyClaim(c) => Some(c.user),
            _ => None,
        };
        if let Some(target) = about {
            if !self.is_local(target) {
                return self.query(user, device, target, body).await;
            }
            if let Err(answer) = self.gate(target).await {
                return answer;
            }
        }
        match body {
            Body::DeviceListRequest(r) => match self.accounts.devices(r.user) {
                Ok(devices) => frames(DeviceList {
                    user: r.user,
                    devices,
                }),
                Err(e) => account_error(e),
            },
            Body::LinkCodeRequest(_) => match blocking(&self.accounts, move |a| {
                a.issue_link_code(user, device, now)
            })
            .await
            {
                Ok(c) => frames(LinkCode {
                    code: c.code,
                    expires_in_ms: c.expires_in_ms,
                }),
                Err(e) => account_error(e),
            },
            Body::RemoveDevice(r) => match blocking(&self.accounts, move |a| {
                a.remove_device(user, device, r.device)
            })
            .await
            {
                Ok(()) => {
                    self.forget_device(user, r.device).await;
                    frames(Done {})
                }
                Err(e) => account_error(e),
            },
            Body::SetRegistrationLock(l) => {
                match blocking(&self.accounts, move |a| {
                    a.set_registration_lock(user, device, &l.pin)
                })
                .await
                {
                    Ok(()) => frames(Done {}),
                    Err(e) => account_error(e),
                }
            }
            Body::PushRegister(r) => match blocking(&self.accounts, move |a| {
                a.set_push_token(user, device, r.provider, &r.token)
            })
            .await
            {
                Ok(()) => frames(Done {}),
                Err(e) => account_error(e),
            },
            Body::PrekeyClaim(c) => crate::keys::serve::claim(self, c).await,
            Body::PrekeyCountRequest(_) => crate::keys::serve::count(self, user, device),
            // Served by `device_request` (see `crate::keys::serve`).
            Body::PrekeyUpload(_) => error(
                ErrorCode::Internal,
                "prekey uploads are not control requests",
            ),
            // Served by `device_request` (see `crate::presence::serve`).
            Body::PresenceSubscribe(_) | Body::SetPrivacy(_) | Body::ContactsUpdate(_) => error(
                ErrorCode::Internal,
                "contacts and presence requests are not control requests",
            ),
            Body::GroupCreate(_)
            | Body::GroupUpdate(_)
            | Body::GroupInfoRequest(_)
            | Body::GroupSend(_)
            | Body::GroupReceipt(_) => error(
                ErrorCode::UnexpectedFrame,
                "groups are not served by this node version yet",
            ),
            other => error(
                ErrorCode::UnexpectedFrame,
                &format!("{} is not a request", other.name()),
            ),
        }
    }

    /// A 1:1 message: check the device lists, store one entry per recipient device (on the
    /// recipient's owner, which may be another node) and per other device of the sender (here),
    /// then acknowledge.
    ///
    /// The recipient's entries are stored first (the recipient's list is checked by its owner);
    /// the sender's own copies only once that succeeded, so a refused send (mismatched devices,
    /// full inbox, unknown user) stores nothing, as `SendStatus` promises. The own copies of
    /// pipelined sends still keep frame order: recipient stores complete in commit order and
    /// their continuations run in the order they are woken.
    fn send(
        self: &Arc<Self>,
        user: UserId,
        device: DeviceId,
        send: ringpost_wire::Send,
    ) -> BoxFuture<'static, Answer> {
        let started = Instant::now();
        let server = self.clone();
        let now = self.now_ms();
        let msg_id = send.msg_id;
        let to_user = send.to;

        let mut to_given = BTreeSet::new();
        let mut own_given = BTreeSet::new();
        let mut to_targets = Vec::with_capacity(send.ciphertexts.len());
        let mut own_entries = Vec::new();
        for c in send.ciphertexts {
            let given = if c.user == to_user {
                &mut to_given
            } else if c.user == user {
                &mut own_given
            } else {
                return Box::pin(async move {
                    error(
                        ErrorCode::Forbidden,
                        "a Send carries ciphertexts only for the recipient's and the sender's devices",
                    )
                });
            };
            if !given.insert(c.device) {
                return Box::pin(async move {
                    error(ErrorCode::Malformed, "two ciphertexts for the same device")
                });
            }
            if c.user == to_user {
                to_targets.push((c.device, c.body.to_vec()));
            } else {
                own_entries.push((c.device, Entry::message(user, device, msg_id, c.body)));
            }
        }

        // The sender's other devices: its user is local (its connection is here).
        let mut mismatched = Vec::new();
        if to_user != user {
            let own_devices: Vec<DeviceId> = match self.accounts.devices(user) {
                Ok(d) => d.into_iter().filter(|&d| d != device).collect(),
                Err(e) => return Box::pin(async move { account_error(e) }),
            };
            mismatched.extend(mismatch(user, &own_devices, &own_given));
            // A recipient this node serves has its list checked now too, so nothing is stored
            // on a mismatch. (One whose shard is local but not taken over yet is left to
            // `store`, which waits for the hand-off or answers a retryable error: its account
            // is not here yet, and "unknown user" would be final.)
            if self.serves_here(to_user).is_none() {
                match self.accounts.devices(to_user) {
                    Ok(d) if !d.is_empty() => mismatched.extend(mismatch(to_user, &d, &to_given)),
                    Ok(_) | Err(AccountError::NotFound) => {
                        return Box::pin(
                            async move { send_ack(msg_id, SendStatus::UnknownUser, now) },
                        )
                    }
                    Err(e) => return Box::pin(async move { account_error(e) }),
                }
            }
        }
        if !mismatched.is_empty() {
            self.metrics.messages_rejected.fetch_add(1, Relaxed);
            return Box::pin(async move { mismatched_ack(msg_id, now, mismatched) });
        }

        let to_store = self.store(Store {
            to_user,
            from_user: user,
            from_device: device,
            msg_id,
            kind: StoreKind::Message,
            targets: Targets::Exact(to_targets),
            except: (to_user == user).then_some(device),
            receipt_msg_ids: Vec::new(),
            dedup: true,
            require_contact: false,
            expires_at_ms: 0,
        });
        let own_append = (!own_entries.is_empty()).then_some(Append {
            to_user: user,
            dedup: Some((user, device, msg_id)),
            entries: own_entries,
            now_ms: now,
        });
        Box::pin(async move {
            // The recipient store reaches its queue (the writer's, or the peer link's) on this
            // future's first poll, which the connection driver does at once: commit order
            // follows frame order.
            let to_result = to_store.await;
            let mut ack = SendAck {
                msg_id,
                status: SendStatus::Ok,
                server_time_ms: now,
                mismatched: vec![],
                full_devices: vec![],
                group_seq: 0,
            };
            match to_result {
                Stored::Stored { server_time_ms } => {
                    ack.server_time_ms = server_time_ms;
                    server.metrics.messages_accepted.fetch_add(1, Relaxed);
                }
                Stored::Duplicate { server_time_ms } => {
                    ack.server_time_ms = server_time_ms;
                    server.metrics.messages_duplicate.fetch_add(1, Relaxed);
                }
                Stored::Full { devices } => {
                    ack.status = SendStatus::InboxFull;
                    ack.full_devices = devices
                        .into_iter()
                        .map(|device| DeviceCiphertextRef {
                            user: to_user,
                            device,
                        })
                        .collect();
                    server.metrics.messages_rejected.fetch_add(1, Relaxed);
                }
                Stored::Mismatched { missing, extra } => {
                    server.metrics.messages_rejected.fetch_add(1, Relaxed);
                    let m = MismatchedDevices {
                        user: to_user,
                        missing,
                        extra,
                    };
                    return mismatched_ack(msg_id, now, vec![m]);
                }
                Stored::UnknownUser => return send_ack(msg_id, SendStatus::UnknownUser, now),
                Stored::Refused {
                    code,
                    message,
                    retry_after_ms,
                } => return refused(code, message, retry_after_ms),
            }
            // The sender's other devices: their copies are a courtesy sync. If one of those
            // inboxes is full the message still went to the recipient; the device is named in
            // `full_devices` so the client knows that device will miss it.
            let own_result = match own_append {
                Some(own) => Some(server.inbox.append(own).await),
                None => None,
            };
            match own_result {
                // The inbox hands stored entries to their devices' connections.
                Some(Ok(AppendOutcome::Stored { .. })) => {}
                Some(Ok(AppendOutcome::Full { devices })) => ack.full_devices.extend(
                    devices
                        .into_iter()
                        .map(|device| DeviceCiphertextRef { user, device }),
                ),
                Some(Ok(AppendOutcome::Duplicate { .. })) | None => {}
                Some(Err(e)) => return inbox_error(e),
            }
            server.metrics.send_ack.observe(started.elapsed());
            Answer::Frames(vec![Frame::new(0, ack)])
        })
    }

    /// A read (or delivered) receipt from a client: stored for every device of `to` (on its
    /// owner), like a message, so it reaches devices that are offline now.
    fn receipt(
        self: &Arc<Self>,
        user: UserId,
        device: DeviceId,
        r: ringpost_wire::Receipt,
    ) -> BoxFuture<'static, Answer> {
        let now = self.now_ms();
        let kind = match r.kind {
            ringpost_wire::ReceiptKind::Read => StoreKind::Read,
            ringpost_wire::ReceiptKind::Delivered => StoreKind::Delivered,
            ringpost_wire::ReceiptKind::StatusViewed => StoreKind::StatusViewed,
        };
        let msg_id = r.msg_id;
        let stored = self.store(Store {
            to_user: r.to,
            from_user: user,
            from_device: device,
            msg_id,
            kind,
            targets: Targets::AllDevices(Vec::new()),
            except: (r.to == user).then_some(device),
            receipt_msg_ids: r.msg_ids,
            dedup: true,
            require_contact: false,
            expires_at_ms: 0,
        });
        Box::pin(async move {
            match stored.await {
                Stored::Stored { server_time_ms } | Stored::Duplicate { server_time_ms } => {
                    send_ack(msg_id, SendStatus::Ok, server_time_ms)
                }
                Stored::Full { .. } => send_ack(msg_id, SendStatus::InboxFull, now),
                Stored::UnknownUser => send_ack(msg_id, SendStatus::UnknownUser, now),
                // Receipts go to every device: the owner never finds a mismatch.
                Stored::Mismatched { .. } => send_ack(msg_id, SendStatus::Ok, now),
                Stored::Refused {
                    code,
                    message,
                    retry_after_ms,
                } => refused(code, message, retry_after_ms),
            }
        })
    }

    /// A device acknowledges inbox entries (`DeliverAck`): the inbox moves its floor and
    /// writes, in the same batch, the `delivered` receipt of every message this is the first
    /// ack of. Senders this node serves get theirs stored directly (so the ack passes their
    /// device lists along), when the node does not replicate or the sender shares the acking
    /// user's shard; any other sender's receipt goes through the acking user's outbox
    /// (`crate::outbox`). Answers nothing unless it fails.
    pub fn ack(
        self: &Arc<Self>,
        user: UserId,
        device: DeviceId,
        seqs: Vec<(u64, Option<EntryHeader>)>,
    ) -> BoxFuture<'static, Answer> {
        if let Some(moved) = self.serves_here(user) {
            return Box::pin(async move { moved });
        }
        let n = u32::try_from(seqs.len()).unwrap_or(u32::MAX);
        if let Some(refused) = self.over_budget(user, device, crate::budgets::Charge::AckSeqs(n)) {
            return Box::pin(async move { refused });
        }
        // A replicated batch is atomic per shard only: the receipt must not be written in
        // another shard than the ack's `delivered` mark, or a failure that lands one shard's
        // record and not the other's (a replica lost between the two) leaves the mark without
        // the receipt. Such receipts go through the outbox, which lives in the acker's shard.
        let own_shard = match self.routing.route(user) {
            Route::Local { shard } => Some(shard),
            _ => None,
        };
        let replicating = self.replicating.get().is_some();
        let mut senders: Vec<(UserId, Vec<DeviceId>)> = Vec::new();
        for header in seqs.iter().filter_map(|(_, h)| h.as_ref()) {
            let sender = header.from_user;
            if header.kind != EntryKind::Message
                || sender == user
                || senders.iter().any(|(u, _)| *u == sender)
                || self.serves_here(sender).is_some()
            {
                continue;
            }
            if replicating
                && !matches!(self.routing.route(sender), Route::Local { shard } if Some(shard) == own_shard)
            {
                continue;
            }
            if let Ok(devices) = self.accounts.devices(sender) {
                senders.push((sender, devices));
            }
        }
        let request = AckRequest {
            user,
            device,
            seqs,
            senders,
            now_ms: self.now_ms(),
        };
        let server = self.clone();
        Box::pin(async move {
            match server.inbox.ack_with(request).await {
                Ok(acked) => {
                    server
                        .metrics
                        .messages_acked
                        .fetch_add(acked.len() as u64, Relaxed);
                    Answer::Frames(vec![])
                }
                Err(e) => inbox_error(e),
            }
        })
    }

    /// Typing indicators go only to the recipient's connected devices (on its owner) and are
    /// never stored.
    fn typing(self: &Arc<Self>, user: UserId, device: DeviceId, t: ringpost_wire::Typing) {
        if t.group.is_some() {
            // To a group: its owner sends it on to the members (crate::groups::typing).
            let request = crate::groups::serve::request(self, user, device, Body::Typing(t));
            tokio::spawn(request);
            return;
        }
        match self.routing.route(t.user) {
            Route::Local { .. } => {
                self.push_typing(t.user, user, device, t.typing, t.recording, None)
            }
            Route::Remote { node, epoch, .. } => {
                let server = self.clone();
                tokio::spawn(async move {
                    let request = crate::peer::PeerRequest::Typing {
                        to: t.user,
                        from_user: user,
                        from_device: device,
                        typing: t.typing,
                        recording: t.recording,
                    };
                    // Best effort, like the indicator itself.
                    let _ = server.call_peer(node, epoch, request).await;
                });
            }
            Route::Unowned => {}
        }
    }

    /// Shows `from`'s typing state on the connected devices of `to` (a local user), unless
    /// `to` blocks `from` (then it is dropped silently).
    pub(crate) fn push_typing(
        &self,
        to: UserId,
        from_user: UserId,
        from_device: DeviceId,
        typing: bool,
        recording: bool,
        group: Option<ringpost_wire::GroupId>,
    ) {
        if to != from_user && self.contacts.is_blocked(to, from_user).unwrap_or(true) {
            self.presence.metrics.typing_dropped.fetch_add(1, Relaxed);
            return;
        }
        let Ok(devices) = self.accounts.devices(to) else {
            return;
        };
        let frame = Frame::new(
            0,
            ringpost_wire::Typing {
                user: from_user,
                device: from_device,
                typing,
                recording,
                group,
            },
        );
        let Ok(bytes) = frame.encode() else { return };
        for d in devices {
            if let Some(conn) = self.registry.device(to, d) {
                conn.push(bytes.clone());
            }
        }
    }
}

/// The `Deliver` frame of an inbox entry.
pub fn deliver_frame(seq: u64, e: &Entry) -> Frame {
    // A group's aggregated receipt has `group | up_to_seq` as its body (`groups::receipts`).
    let group_receipt =
        matches!(e.kind, EntryKind::Delivered | EntryKind::Read) && e.body.len() == 24;
    if group_receipt || matches!(e.kind, EntryKind::GroupMessage | EntryKind::GroupEvent) {
        if let Some((group, group_seq, payload)) = crate::groups::fanout::split_entry_body(&e.body)
        {
            return Frame::new(
                0,
                ringpost_wire::Deliver {
                    seq,
                    kind: e.kind.into(),
                    from_user: e.from_user,
                    from_device: e.from_device,
                    msg_id: e.msg_id,
                    server_time_ms: e.server_time_ms,
                    body: e.body.slice(24..24 + payload.len()),
                    receipt_msg_ids: e.receipt_msg_ids.clone(),
                    group: Some(group),
                    group_seq,
                },
            );
        }
    }
    Frame::new(
        0,
        ringpost_wire::Deliver {
            seq,
            kind: e.kind.into(),
            from_user: e.from_user,
            from_device: e.from_device,
            msg_id: e.msg_id,
            server_time_ms: e.server_time_ms,
            body: e.body.clone(),
            receipt_msg_ids: e.receipt_msg_ids.clone(),
            group: None,
            group_seq: 0,
        },
    )
}

fn mismatch(
    user: UserId,
    expected: &[DeviceId],
    given: &BTreeSet<DeviceId>,
) -> Option<MismatchedDevices> {
    let missing: Vec<DeviceId> = expected
        .iter()
        .copied()
        .filter(|d| !given.contains(d))
        .collect();
    let extra: Vec<DeviceId> = given
        .iter()
        .copied()
        .filter(|d| !expected.contains(d))
        .collect();
    (!missing.is_empty() || !extra.is_empty()).then_some(MismatchedDevices {
        user,
        missing,
        extra,
    })
}

/// Runs an account operation that may hash a PIN or sync a write on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    accounts: &Arc<Accounts>,
    f: impl FnOnce(&Accounts) -> Result<T, AccountError> + Send + 'static,
) -> Result<T, AccountError> {
    let accounts = accounts.clone();
    tokio::task::spawn_blocking(move || f(&accounts))
        .await
        .unwrap_or(Err(AccountError::LimitExceeded("account task failed")))
}

/// A blocking task that panicked or was cancelled.
pub(crate) fn task_failed(e: tokio::task::JoinError) -> crate::keys::KeysError {
    crate::keys::KeysError::Storage(crate::storage::StorageError::Other(format!(
        "task failed: {e}"
    )))
}

pub(crate) fn frames(body: impl Into<Body>) -> Answer {
    Answer::Frames(vec![Frame::new(0, body)])
}

pub(crate) fn send_ack(msg_id: MsgId, status: SendStatus, now: u64) -> Answer {
    frames(SendAck {
        msg_id,
        status,
        server_time_ms: now,
        mismatched: vec![],
        full_devices: vec![],
        group_seq: 0,
    })
}

fn mismatched_ack(msg_id: MsgId, now: u64, mismatched: Vec<MismatchedDevices>) -> Answer {
    frames(SendAck {
        msg_id,
        status: SendStatus::MismatchedDevices,
        server_time_ms: now,
        mismatched,
        full_devices: vec![],
        group_seq: 0,
    })
}

/// An answer for a request another node (or the routing layer) refused.
pub(crate) fn refused(code: u16, message: String, retry_after_ms: u32) -> Answer {
    Answer::Error {
        code: ErrorCode::from_u16(code).unwrap_or(ErrorCode::Internal),
        message,
        retry_after_ms,
    }
}

pub(crate) fn error(code: ErrorCode, message: &str) -> Answer {
    Answer::Error {
        code,
        message: message.to_string(),
        retry_after_ms: 0,
    }
}

pub(crate) fn account_error(e: AccountError) -> Answer {
    Answer::Error {
        code: e.code(),
        message: e.to_string(),
        retry_after_ms: e.retry_after_ms(),
    }
}

pub(crate) fn inbox_error(e: InboxError) -> Answer {
    Answer::Error {
        code: e.code(),
        message: e.to_string(),
        retry_after_ms: 0,
    }
}

pub(crate) fn keys_error(e: crate::keys::KeysError) -> Answer {
    Answer::Error {
        code: e.code(),
        message: e.to_string(),
        retry_after_ms: 0,
    }
}
