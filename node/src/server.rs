//! The shared state of a running node and the execution of session requests against the shard
//! services (accounts, keys, inbox), the registry of connected devices and the rate limits.

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ringpost_wire::{
    Body, DeliverKind, DeviceCiphertextRef, DeviceId, DeviceList, Done, ErrorCode, Frame, LinkCode,
    MismatchedDevices, MsgId, PrekeyCount, RegisterChallenge, Registered, SendAck, SendStatus,
    UserId,
};
use tracing::{info, warn};

use crate::accounts::{AccountError, Accounts};
use crate::inbox::{Acked, Append, AppendOutcome, Entry, EntryKind, Inbox, InboxError};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::registry::{CloseReason, Registry};
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            node_id: 1,
            shard_count: crate::shard::SHARD_COUNT_DEFAULT,
            device_rate_per_s: DEVICE_RATE_PER_S,
            device_burst: DEVICE_BURST,
            keepalive: Default::default(),
        }
    }
}

/// Everything a connection's requests act on.
pub struct Server {
    pub node_id: u64,
    pub config: ServerConfig,
    epoch: AtomicU64,
    pub accounts: Arc<Accounts>,
    pub keys: Arc<Keys>,
    pub inbox: Inbox,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    limiter: DefaultKeyedRateLimiter<(UserId, DeviceId)>,
    shutting_down: AtomicBool,
    /// Decides what has expired; see [`crate::clock`].
    pub expiry_clock: crate::clock::ExpiryClock,
    started: Instant,
    started_unix_ms: u64,
}

impl Server {
    pub fn new(
        config: ServerConfig,
        accounts: Accounts,
        keys: Keys,
        inbox: Inbox,
        metrics: Arc<Metrics>,
        expiry_clock: crate::clock::ExpiryClock,
    ) -> Arc<Server> {
        let rate = NonZeroU32::new(config.device_rate_per_s.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.device_burst.max(1)).unwrap_or(NonZeroU32::MIN);
        Arc::new(Server {
            node_id: config.node_id,
            epoch: AtomicU64::new(1),
            accounts: Arc::new(accounts),
            keys: Arc::new(keys),
            inbox,
            registry: Registry::default(),
            metrics,
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            shutting_down: AtomicBool::new(false),
            expiry_clock,
            started: Instant::now(),
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

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Relaxed)
    }

    /// The coordinator committed a new ring epoch.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Relaxed);
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
    }

    /// Executes one session request. Synchronous checks run now; the returned future waits
    /// only for storage.
    pub fn execute(self: &Arc<Self>, request: Request) -> BoxFuture<'static, Answer> {
        let server = self.clone();
        if self.is_shutting_down() {
            return Box::pin(async { error(ErrorCode::ShuttingDown, "node is shutting down") });
        }
        match request {
            Request::Authenticate(auth) => Box::pin(async move {
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
            Request::Anonymous(body) => Box::pin(async move { server.anonymous(body).await }),
            Request::Device { user, device, body } => server.device_request(user, device, body),
        }
    }

    async fn anonymous(&self, body: Body) -> Answer {
        let now = self.now_ms();
        match body {
            Body::RegisterRequest(r) => {
                match self.accounts.request_code(r.phone, r.channel, now).await {
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
        if let Err(e) = self.keys.drop_device(user, device) {
            warn!(user, device, error = %e, "dropping a removed device's keys failed");
        }
        if let Some(conn) = self.registry.device(user, device) {
            conn.ask_close(CloseReason::Replaced);
        }
    }

    fn rate_limited(&self, user: UserId, device: DeviceId) -> Option<Answer> {
        match self.limiter.check_key(&(user, device)) {
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
        match body {
            Body::Send(send) => {
                if let Some(limited) = self.rate_limited(user, device) {
                    return Box::pin(async move { limited });
                }
                self.send(user, device, send)
            }
            Body::DeliverAck(ack) => {
                let now = self.now_ms();
                Box::pin(async move {
                    match server.inbox.ack(user, device, ack.seqs, now).await {
                        Ok(acked) => {
                            server
                                .metrics
                                .messages_acked
                                .fetch_add(acked.len() as u64, Relaxed);
                            server.route_delivered_receipts(user, device, acked).await;
                            Answer::Frames(vec![])
                        }
                        Err(e) => inbox_error(e),
                    }
                })
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
                self.typing(user, device, t);
                Box::pin(async { Answer::Frames(vec![]) })
            }
            other => Box::pin(async move { server.device_control(user, device, other).await }),
        }
    }

    async fn device_control(&self, user: UserId, device: DeviceId, body: Body) -> Answer {
        let now = self.now_ms();
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
            Body::PrekeyUpload(u) => {
                let keys = self.keys.clone();
                let uploaded = tokio::task::spawn_blocking(move || {
                    keys.upload(
                        user,
                        device,
                        &u.identity_key,
                        u.signed_prekey.as_ref(),
                        &u.one_time,
                    )
                })
                .await;
                match uploaded.unwrap_or_else(|e| Err(task_failed(e))) {
                    Ok(_) => frames(Done {}),
                    Err(e) => keys_error(e),
                }
            }
            Body::PrekeyClaim(c) => {
                let devices = match self.accounts.devices(c.user) {
                    Ok(d) => d,
                    Err(e) => return account_error(e),
                };
                let which = (c.device != 0).then_some(c.device);
                let keys = self.keys.clone();
                let claimed =
                    tokio::task::spawn_blocking(move || keys.claim(c.user, which, &devices)).await;
                match claimed.unwrap_or_else(|e| Err(task_failed(e))) {
                    Ok(devices) => frames(ringpost_wire::PrekeyBundle {
                        user: c.user,
                        devices,
                    }),
                    Err(e) => keys_error(e),
                }
            }
            Body::PrekeyCountRequest(_) => match self.keys.count(user, device) {
                Ok(count) => frames(PrekeyCount { count }),
                Err(e) => keys_error(e),
            },
            Body::PresenceSubscribe(_) | Body::SetPrivacy(_) => error(
                ErrorCode::NotImplemented,
                "presence is not served by this node version yet",
            ),
            Body::GroupCreate(_) | Body::GroupUpdate(_) | Body::GroupInfoRequest(_) => error(
                ErrorCode::NotImplemented,
                "groups are not served by this node version yet",
            ),
            Body::MediaUploadRequest(_) => error(
                ErrorCode::NotImplemented,
                "media upload grants are not served by this node version yet",
            ),
            other => error(
                ErrorCode::UnexpectedFrame,
                &format!("{} is not a request", other.name()),
            ),
        }
    }

    /// A 1:1 message: check the device lists, store one entry per recipient device (and per
    /// other device of the sender), then acknowledge.
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

        // Who must get a copy: every device of the recipient, and every other device of the
        // sender. A stale view on the sender's side gets MismatchedDevices and stores nothing.
        let to_devices = match self.accounts.devices(send.to) {
            Ok(d) if d.is_empty() => {
                return Box::pin(async move { send_ack(msg_id, SendStatus::UnknownUser, now) })
            }
            Ok(d) => d,
            Err(AccountError::NotFound) => {
                return Box::pin(async move { send_ack(msg_id, SendStatus::UnknownUser, now) })
            }
            Err(e) => return Box::pin(async move { account_error(e) }),
        };
        let own_devices: Vec<DeviceId> = if send.to == user {
            Vec::new()
        } else {
            match self.accounts.devices(user) {
                Ok(d) => d.into_iter().filter(|&d| d != device).collect(),
                Err(e) => return Box::pin(async move { account_error(e) }),
            }
        };
        let to_expected: Vec<DeviceId> = if send.to == user {
            to_devices.into_iter().filter(|&d| d != device).collect()
        } else {
            to_devices
        };

        let mut to_given = BTreeSet::new();
        let mut own_given = BTreeSet::new();
        let mut to_entries = Vec::with_capacity(send.ciphertexts.len());
        let mut own_entries = Vec::new();
        for c in send.ciphertexts {
            let entry = Entry {
                kind: EntryKind::Message,
                from_user: user,
                from_device: device,
                msg_id,
                server_time_ms: now,
                // The inbox stamps both times when it stores the entry.
                expires_at_ms: 0,
                body: c.body,
                receipt_msg_ids: Vec::new(),
            };
            if c.user == send.to {
                if !to_given.insert(c.device) {
                    return Box::pin(async move {
                        error(ErrorCode::Malformed, "two ciphertexts for the same device")
                    });
                }
                to_entries.push((c.device, entry));
            } else if c.user == user {
                if !own_given.insert(c.device) {
                    return Box::pin(async move {
                        error(ErrorCode::Malformed, "two ciphertexts for the same device")
                    });
                }
                own_entries.push((c.device, entry));
            } else {
                return Box::pin(async move {
                    error(
                        ErrorCode::Forbidden,
                        "a Send carries ciphertexts only for the recipient's and the sender's devices",
                    )
                });
            }
        }
        let mut mismatched = Vec::new();
        if let Some(m) = mismatch(send.to, &to_expected, &to_given) {
            mismatched.push(m);
        }
        if send.to != user {
            if let Some(m) = mismatch(user, &own_devices, &own_given) {
                mismatched.push(m);
            }
        }
        if !mismatched.is_empty() {
            self.metrics.messages_rejected.fetch_add(1, Relaxed);
            return Box::pin(async move {
                Answer::Frames(vec![Frame::new(
                    0,
                    SendAck {
                        msg_id,
                        status: SendStatus::MismatchedDevices,
                        server_time_ms: now,
                        mismatched,
                        full_devices: vec![],
                    },
                )])
            });
        }

        let dedup = Some((user, device, msg_id));
        let to_user = send.to;
        let to_append = Append {
            to_user,
            dedup,
            entries: to_entries,
            now_ms: now,
        };
        let own_append = (!own_entries.is_empty()).then_some(Append {
            to_user: user,
            dedup,
            entries: own_entries,
            now_ms: now,
        });
        Box::pin(async move {
            // Both appends reach the writer's queue on this future's first poll, which the
            // connection driver does at once: commit order follows frame order.
            let (to_result, own_result) = match own_append {
                Some(own) => {
                    let (a, b) =
                        futures::join!(server.inbox.append(to_append), server.inbox.append(own));
                    (a, Some(b))
                }
                None => (server.inbox.append(to_append).await, None),
            };
            let mut ack = SendAck {
                msg_id,
                status: SendStatus::Ok,
                server_time_ms: now,
                mismatched: vec![],
                full_devices: vec![],
            };
            match to_result {
                Ok(AppendOutcome::Stored {
                    server_time_ms,
                    seqs,
                }) => {
                    ack.server_time_ms = server_time_ms;
                    for (d, _) in seqs {
                        server.registry.wake(to_user, d);
                    }
                    server.metrics.messages_accepted.fetch_add(1, Relaxed);
                }
                Ok(AppendOutcome::Duplicate { server_time_ms }) => {
                    ack.server_time_ms = server_time_ms;
                    server.metrics.messages_duplicate.fetch_add(1, Relaxed);
                }
                Ok(AppendOutcome::Full { devices }) => {
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
                Err(e) => return inbox_error(e),
            }
            // The sender's other devices: their copies are a courtesy sync. If one of those
            // inboxes is full the message still went to the recipient; the device is named in
            // `full_devices` so the client knows that device will miss it.
            match own_result {
                Some(Ok(AppendOutcome::Stored { seqs, .. })) => {
                    for (d, _) in seqs {
                        server.registry.wake(user, d);
                    }
                }
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

    /// A read (or delivered) receipt from a client: stored for every device of `to`, like a
    /// message, so it reaches devices that are offline now.
    fn receipt(
        self: &Arc<Self>,
        user: UserId,
        device: DeviceId,
        r: ringpost_wire::Receipt,
    ) -> BoxFuture<'static, Answer> {
        let server = self.clone();
        let now = self.now_ms();
        let kind = match r.kind {
            ringpost_wire::ReceiptKind::Read => EntryKind::Read,
            ringpost_wire::ReceiptKind::Delivered => EntryKind::Delivered,
        };
        let devices = match self.accounts.devices(r.to) {
            Ok(d) => d,
            Err(AccountError::NotFound) => {
                return Box::pin(async move { send_ack(r.msg_id, SendStatus::UnknownUser, now) })
            }
            Err(e) => return Box::pin(async move { account_error(e) }),
        };
        let entries = devices
            .iter()
            .filter(|&&d| !(r.to == user && d == device))
            .map(|&d| {
                (
                    d,
                    self.receipt_entry(kind, user, device, r.msg_id, r.msg_ids.clone(), now),
                )
            })
            .collect();
        let append = Append {
            to_user: r.to,
            dedup: Some((user, device, r.msg_id)),
            entries,
            now_ms: now,
        };
        Box::pin(async move {
            match server.inbox.append(append).await {
                Ok(AppendOutcome::Stored {
                    server_time_ms,
                    seqs,
                }) => {
                    for (d, _) in seqs {
                        server.registry.wake(r.to, d);
                    }
                    send_ack(r.msg_id, SendStatus::Ok, server_time_ms)
                }
                Ok(AppendOutcome::Duplicate { server_time_ms }) => {
                    send_ack(r.msg_id, SendStatus::Ok, server_time_ms)
                }
                Ok(AppendOutcome::Full { .. }) => send_ack(r.msg_id, SendStatus::InboxFull, now),
                Err(e) => inbox_error(e),
            }
        })
    }

    fn receipt_entry(
        &self,
        kind: EntryKind,
        from_user: UserId,
        from_device: DeviceId,
        msg_id: MsgId,
        msg_ids: Vec<MsgId>,
        now: u64,
    ) -> Entry {
        Entry {
            kind,
            from_user,
            from_device,
            msg_id,
            server_time_ms: now,
            expires_at_ms: 0, // set by the inbox
            body: Bytes::new(),
            receipt_msg_ids: msg_ids,
        }
    }

    /// The first device of `user` to ack a message makes the server tell the sender's devices
    /// that it was delivered. The inbox reports `first_ack` exactly once per message.
    async fn route_delivered_receipts(&self, user: UserId, device: DeviceId, acked: Vec<Acked>) {
        let now = self.now_ms();
        for a in acked.into_iter().filter(|a| a.first_ack) {
            let devices = match self.accounts.devices(a.from_user) {
                Ok(d) => d,
                Err(_) => continue,
            };
            let entries = devices
                .iter()
                .map(|&d| {
                    (
                        d,
                        self.receipt_entry(
                            EntryKind::Delivered,
                            user,
                            device,
                            a.msg_id,
                            vec![a.msg_id],
                            now,
                        ),
                    )
                })
                .collect();
            let append = Append {
                to_user: a.from_user,
                dedup: None,
                entries,
                now_ms: now,
            };
            match self.inbox.append(append).await {
                Ok(AppendOutcome::Stored { seqs, .. }) => {
                    for (d, _) in seqs {
                        self.registry.wake(a.from_user, d);
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "storing a delivered receipt failed"),
            }
        }
    }

    /// Typing indicators go only to the recipient's connected devices and are never stored.
    fn typing(&self, user: UserId, device: DeviceId, t: ringpost_wire::Typing) {
        let Ok(devices) = self.accounts.devices(t.user) else {
            return;
        };
        let frame = Frame::new(
            0,
            ringpost_wire::Typing {
                user,
                device,
                typing: t.typing,
            },
        );
        let Ok(bytes) = frame.encode() else { return };
        for d in devices {
            if let Some(conn) = self.registry.device(t.user, d) {
                conn.push(bytes.clone());
            }
        }
    }

    /// `Deliver` frames for a device's inbox entries after `after_seq`.
    pub fn read_deliveries(
        &self,
        user: UserId,
        device: DeviceId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Frame>, InboxError> {
        let entries = self
            .inbox
            .read(user, device, after_seq, limit, self.expiry_now_ms())?;
        Ok(entries
            .into_iter()
            .map(|(seq, e)| {
                Frame::new(
                    0,
                    ringpost_wire::Deliver {
                        seq,
                        kind: match e.kind {
                            EntryKind::Message => DeliverKind::Message,
                            EntryKind::Delivered => DeliverKind::Delivered,
                            EntryKind::Read => DeliverKind::Read,
                        },
                        from_user: e.from_user,
                        from_device: e.from_device,
                        msg_id: e.msg_id,
                        server_time_ms: e.server_time_ms,
                        body: e.body,
                        receipt_msg_ids: e.receipt_msg_ids,
                    },
                )
            })
            .collect())
    }
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
async fn blocking<T: Send + 'static>(
    accounts: &Arc<Accounts>,
    f: impl FnOnce(&Accounts) -> Result<T, AccountError> + Send + 'static,
) -> Result<T, AccountError> {
    let accounts = accounts.clone();
    tokio::task::spawn_blocking(move || f(&accounts))
        .await
        .unwrap_or(Err(AccountError::LimitExceeded("account task failed")))
}

/// A blocking task that panicked or was cancelled.
fn task_failed(e: tokio::task::JoinError) -> crate::keys::KeysError {
    crate::keys::KeysError::Storage(crate::storage::StorageError::Other(format!(
        "task failed: {e}"
    )))
}

fn frames(body: impl Into<Body>) -> Answer {
    Answer::Frames(vec![Frame::new(0, body)])
}

fn send_ack(msg_id: MsgId, status: SendStatus, now: u64) -> Answer {
    frames(SendAck {
        msg_id,
        status,
        server_time_ms: now,
        mismatched: vec![],
        full_devices: vec![],
    })
}

fn error(code: ErrorCode, message: &str) -> Answer {
    Answer::Error {
        code,
        message: message.to_string(),
        retry_after_ms: 0,
    }
}

fn account_error(e: AccountError) -> Answer {
    Answer::Error {
        code: e.code(),
        message: e.to_string(),
        retry_after_ms: e.retry_after_ms(),
    }
}

fn inbox_error(e: InboxError) -> Answer {
    Answer::Error {
        code: e.code(),
        message: e.to_string(),
        retry_after_ms: 0,
    }
}

fn keys_error(e: crate::keys::KeysError) -> Answer {
    Answer::Error {
        code: e.code(),
        message: e.to_string(),
        retry_after_ms: 0,
    }
}
