//! [`Client`]: a device's session with the cluster. It connects (following redirects), keeps one
//! connection up (reconnecting with backoff and re-authenticating), correlates requests with
//! their answers, and hands deliveries and other events to the application exactly once.
//!
//! # Shape
//! `Client` is a cheap cloneable handle; every method takes `&self`, so many tasks can send at
//! once (requests are pipelined on the one connection). Behind it:
//! - one driver task that owns the connection's reader: answers go to the waiting
//!   request, deliveries and other unprompted frames to the event queue;
//! - the connection's writer, behind an async lock that request callers take directly (no send
//!   queue, no second task);
//! - a bounded event queue ([`EVENT_QUEUE_MAX`]) read by [`Client::next_event`], which drops
//!   deliveries it already handed out ([`crate::DedupSet`]) and acknowledges in batches, written
//!   by a short task of their own so that `next_event` never waits on a write (it is
//!   cancel-safe: see its doc).
//!
//! Dropping the last handle closes the connection and stops the driver.
//!
//! # Delivery guarantees
//! The node delivers every stored message at least once, until the device acks it. The SDK acks
//! a delivery once it has handed it out (with `auto_ack`), so one lost to a disconnect between
//! hand-out and ack comes back after the reconnect; the SDK recognises it by
//! (kind, sender device, msg_id) and acks it again without handing it out. The application sees
//! each message once, as long as it arrives within [`crate::DEDUP_CAPACITY_DEFAULT`] deliveries
//! (configurable) of the first copy.

mod config;
pub(crate) mod driver;
mod event;
mod link;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringpost_wire::limits::ACK_SEQS_MAX;
use ringpost_wire::{
    Auth, Body, CodeChannel, ContactsUpdate, Deliver, DeliverAck, DeviceCiphertext, DeviceId,
    DeviceListRequest, Frame, LinkCode, LinkCodeRequest, LinkDevice, MsgId, OneTimePrekey, Ping,
    PrekeyBundle, PrekeyClaim, PrekeyCountRequest, PrekeyUpload, PresenceSubscribe, Receipt,
    ReceiptKind, RegisterChallenge, RegisterRequest, RegisterVerify, Registered, RemoveDevice,
    Send, SendAck, SetPrivacy, SetRegistrationLock, SignedPrekey, Typing, UserId, Visibility,
    Welcome,
};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

pub use self::config::{
    ClientConfig, CONNECT_TIMEOUT_DEFAULT, MAX_REDIRECTS_DEFAULT, RECONNECT_ATTEMPTS_MAX_DEFAULT,
    REQUEST_TIMEOUT_DEFAULT, USER_AGENT_DEFAULT,
};
pub use self::driver::{
    CLOSE_TIMEOUT, DEAD_AFTER_PING_INTERVALS, PING_INTERVAL_MIN, RECONNECT_STABLE_AFTER,
};
pub use self::event::Event;
pub use self::link::WRITE_TIMEOUT;
use self::link::{establish, Link};
use crate::dedup::{DedupKey, DedupSet};
use crate::endpoint::Endpoint;
use crate::error::{ClientError, Result};

/// Takes the expected body out of an answer, or says what came instead.
macro_rules! expect {
    ($frame:expr, $kind:ident) => {
        match $frame.body {
            ::ringpost_wire::Body::$kind(value) => Ok(value),
            ::ringpost_wire::Body::Redirect(r) => Err($crate::error::ClientError::Redirected(r)),
            other => Err($crate::error::ClientError::Protocol(format!(
                "expected {}, got {}",
                stringify!($kind),
                other.name()
            ))),
        }
    };
}

/// Events (deliveries, receipts, typing, presence, connection changes) queued for the
/// application. Deliveries wait for room (the node sends at most its window, 64, unacked at a
/// time, so they cannot pile up much further); typing and presence are dropped when it is full.
/// Worst case per client: this many queued items of about 150 bytes plus their bodies, each
/// body at most one frame.
pub const EVENT_QUEUE_MAX: usize = 256;

/// Requests a client keeps in flight at once; more wait for a slot. The node reads at most 64
/// ahead per connection, so more would only sit in socket buffers. Each costs one pending-map
/// entry and a oneshot channel (about 100 bytes).
pub const REQUESTS_IN_FLIGHT_MAX: usize = 256;

/// Delivery seqs waiting to be acknowledged (handed out, ack not yet written, or written to a
/// connection that then dropped). Beyond it the oldest are forgotten: the node redelivers those
/// after a reconnect and the SDK acks the duplicates then.
pub const ACKS_PENDING_MAX: usize = 4 * ACK_SEQS_MAX;

/// What the event queue holds. Both are boxed so a slot is two words: the queue allocates its
/// slots in blocks of 32, and the first block exists for as long as the client does.
pub(crate) enum Queued {
    Deliver(Box<Deliver>),
    Event(Box<Event>),
}

/// The current connection, as request callers see it.
#[derive(Clone)]
pub(crate) enum LinkState {
    Up(Arc<Link>),
    /// Between connections: requests wait (within their timeout).
    Reconnecting,
    /// Closed for good: requests fail with [`ClientError::Closed`].
    Closed,
}

/// State shared by the handles and the driver.
pub(crate) struct Shared {
    pub(crate) config: ClientConfig,
    /// The device this client is (set by `Hello` credentials, or by registering or linking on an
    /// anonymous connection); used for every reconnect.
    auth: Mutex<Option<Auth>>,
    pub(crate) state: watch::Sender<LinkState>,
    pub(crate) welcome: Mutex<Welcome>,
    pub(crate) reconnects: AtomicU64,
    /// `Redirect`s followed by every connect and reconnect.
    pub(crate) redirects_followed: AtomicU64,
    /// Reconnects that went straight to the node a `Migrate` named and were welcomed there.
    pub(crate) migrations: AtomicU64,
    next_req: AtomicU32,
    events: tokio::sync::Mutex<mpsc::Receiver<Queued>>,
    dedup: Mutex<DedupSet>,
    acks: Mutex<Vec<u64>>,
    /// Held while acks are written, so flushes go out one at a time and in order, and
    /// [`Client::close`] waits for one under way.
    ack_writer: tokio::sync::Mutex<()>,
    /// Set while a task spawned by [`Shared::flush_acks_soon`] runs (at most one at a time).
    ack_task_running: AtomicBool,
    /// The runtime the client was connected on: ack tasks are spawned there, so
    /// `next_event` may be polled from anywhere.
    runtime: tokio::runtime::Handle,
    request_slots: Semaphore,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn auth(&self) -> Option<Auth> {
        lock(&self.auth).clone()
    }

    fn queue_ack(&self, seq: u64) {
        let mut acks = lock(&self.acks);
        acks.push(seq);
        if acks.len() > ACKS_PENDING_MAX {
            let excess = acks.len() - ACKS_PENDING_MAX;
            acks.drain(..excess);
        }
    }

    /// Writes the queued acks on a task of its own (unless one is already at it), so the caller
    /// never waits on a write and cannot tear one by being cancelled.
    fn flush_acks_soon(self: &Arc<Self>) {
        if lock(&self.acks).is_empty() || self.ack_task_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = self.clone();
        self.runtime.spawn(async move {
            loop {
                let all_written = shared.flush_acks().await;
                shared.ack_task_running.store(false, Ordering::Release);
                // Acks queued after the flush took its batch but before the flag dropped found
                // this task running and left them to it. Without a connection they wait for
                // the next `Reconnected`.
                if !all_written
                    || lock(&shared.acks).is_empty()
                    || shared.ack_task_running.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
        });
    }

    /// Writes the queued acks on the current connection, if one is up; keeps them otherwise
    /// (and keeps whatever a cancelled or failed write did not get out). `true` if everything
    /// it took was written.
    async fn flush_acks(&self) -> bool {
        let _writing = self.ack_writer.lock().await;
        let mut batch = Unwritten {
            shared: self,
            seqs: std::mem::take(&mut *lock(&self.acks)),
            written: 0,
        };
        if batch.seqs.is_empty() {
            return true;
        }
        let link = match &*self.state.borrow() {
            LinkState::Up(link) if !link.is_dead() => Some(link.clone()),
            _ => None,
        };
        let Some(link) = link else {
            return false;
        };
        while batch.written < batch.seqs.len() {
            let end = batch.seqs.len().min(batch.written + ACK_SEQS_MAX);
            let ack = Frame::new(
                0,
                DeliverAck {
                    seqs: batch.seqs[batch.written..end].to_vec(),
                },
            );
            if link.write(&ack).await.is_err() {
                return false;
            }
            batch.written = end;
        }
        true
    }
}

/// Acks taken off the queue for writing: whatever was not written goes back to the front of
/// the queue when this is dropped (written, failed or cancelled).
struct Unwritten<'a> {
    shared: &'a Shared,
    seqs: Vec<u64>,
    written: usize,
}

impl Drop for Unwritten<'_> {
    fn drop(&mut self) {
        if self.written >= self.seqs.len() {
            return;
        }
        let mut acks = lock(&self.shared.acks);
        let mut kept = self.seqs.split_off(self.written);
        kept.append(&mut acks);
        *acks = kept;
        if acks.len() > ACKS_PENDING_MAX {
            let excess = acks.len() - ACKS_PENDING_MAX;
            acks.drain(..excess);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The last handle going away closes the client.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

/// A device's session with the cluster. Cheap to clone; every clone is the same session.
#[derive(Clone)]
pub struct Client {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.shared().config.url)
            .field("auth", &self.auth().map(|a| (a.user, a.device)))
            .field("reconnects", &self.reconnects())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `config.url`, says `Hello` (with `config.auth` if given), follows redirects
    /// and returns once the node said `Welcome`. Spawns the client's driver task on the current
    /// tokio runtime.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        let established = establish(&config, &config.url, config.auth.as_ref()).await?;
        let link = Arc::new(Link::new(
            established.writer,
            established.endpoint.clone(),
            established.welcome.clone(),
        ));
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE_MAX);
        let (state, _) = watch::channel(LinkState::Up(link.clone()));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            auth: Mutex::new(config.auth.clone()),
            dedup: Mutex::new(DedupSet::new(config.dedup_capacity)),
            config,
            state,
            welcome: Mutex::new(established.welcome.clone()),
            reconnects: AtomicU64::new(0),
            redirects_followed: AtomicU64::new(u64::from(established.redirects)),
            migrations: AtomicU64::new(0),
            next_req: AtomicU32::new(2),
            events: tokio::sync::Mutex::new(events_rx),
            acks: Mutex::new(Vec::new()),
            ack_writer: tokio::sync::Mutex::new(()),
            ack_task_running: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
            request_slots: Semaphore::new(REQUESTS_IN_FLIGHT_MAX),
            shutdown,
        });
        let driver = driver::Driver {
            shared: shared.clone(),
            events: events_tx,
            shutdown: shutdown_rx,
        };
        tokio::spawn(driver.run(established.reader, established.early, link));
        Ok(Client {
            handle: Arc::new(Handle { shared }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// The `Welcome` of the current (or last) connection.
    pub fn welcome(&self) -> Welcome {
        lock(&self.shared().welcome).clone()
    }

    /// The device this client authenticates as, if any (set by registering or linking too).
    pub fn auth(&self) -> Option<Auth> {
        self.shared().auth()
    }

    /// The node the client is connected to now.
    pub fn endpoint(&self) -> Option<Endpoint> {
        match &*self.shared().state.borrow() {
            LinkState::Up(link) => Some(link.endpoint.clone()),
            _ => None,
        }
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        matches!(&*self.shared().state.borrow(), LinkState::Up(link) if !link.is_dead())
    }

    /// Successful reconnects since [`Client::connect`].
    pub fn reconnects(&self) -> u64 {
        self.shared().reconnects.load(Ordering::Acquire)
    }

    /// `Redirect`s followed since connect, by the first connection and every reconnect. A
    /// device that follows a `Migrate` to its user's new node follows none.
    pub fn redirects_followed(&self) -> u64 {
        self.shared().redirects_followed.load(Ordering::Acquire)
    }

    /// Reconnects since connect that went straight to the node a `Migrate` named and were
    /// welcomed there (see [`Event::Migrate`]).
    pub fn migrations(&self) -> u64 {
        self.shared().migrations.load(Ordering::Acquire)
    }

    /// The current connection, waiting (until `deadline`) while the client reconnects.
    async fn link(&self, deadline: Instant) -> Result<Arc<Link>> {
        let mut state = self.shared().state.subscribe();
        let waited = tokio::time::timeout_at(
            deadline,
            state.wait_for(|s| !matches!(s, LinkState::Reconnecting)),
        )
        .await;
        let state = match waited {
            Err(_) => return Err(ClientError::Timeout("waiting for a connection")),
            Ok(Err(_)) => return Err(ClientError::Closed),
            Ok(Ok(state)) => state.clone(),
        };
        match state {
            LinkState::Up(link) => Ok(link),
            LinkState::Closed | LinkState::Reconnecting => Err(ClientError::Closed),
        }
    }

    /// Whether deliveries are acknowledged on hand-out (`ClientConfig::auto_ack`).
    pub fn auto_ack(&self) -> bool {
        self.shared().config.auto_ack
    }

    /// Sends a request and waits for its answer (within `config.request_timeout`). An `Error`
    /// answer is [`ClientError::Server`]; a connection lost meanwhile is
    /// [`ClientError::Disconnected`] (retry idempotently).
    pub async fn request(&self, body: impl Into<Body>) -> Result<Frame> {
        let deadline = Instant::now() + self.shared().config.request_timeout;
        let _slot = tokio::time::timeout_at(deadline, self.shared().request_slots.acquire())
            .await
            .map_err(|_| ClientError::Timeout("waiting for a request slot"))?
            .map_err(|_| ClientError::Closed)?;
        let link = self.link(deadline).await?;
        let (req, reply) = loop {
            let req = self.next_req();
            match link.register(req) {
                Ok(reply) => break (req, reply),
                Err(true) => continue,
                Err(false) => return Err(ClientError::Disconnected),
            }
        };
        // Forgets the request however this function ends (answered, failed, cancelled).
        struct Forget<'a>(&'a Link, u32);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.forget(self.1);
            }
        }
        let _forget = Forget(&link, req);
        let frame = Frame::new(req, body);
        tokio::time::timeout_at(deadline, link.write(&frame))
            .await
            .map_err(|_| ClientError::Timeout("writing a request"))??;
        match tokio::time::timeout_at(deadline, reply).await {
            Err(_) => Err(ClientError::Timeout("waiting for an answer")),
            Ok(Err(_)) => Err(ClientError::Disconnected),
            Ok(Ok(answer)) => answer,
        }
    }

    fn next_req(&self) -> u32 {
        loop {
            let req = self.shared().next_req.fetch_add(1, Ordering::Relaxed);
            if req != 0 {
                return req;
            }
        }
    }

    /// Writes a frame that gets no answer (acks, typing), waiting for a connection if needed.
    async fn fire(&self, body: impl Into<Body>) -> Result<()> {
        let deadline = Instant::now() + self.shared().config.request_timeout;
        let link = self.link(deadline).await?;
        tokio::time::timeout_at(deadline, link.write(&Frame::new(0, body)))
            .await
            .map_err(|_| ClientError::Timeout("writing"))?
    }

    /// Asks for a verification code for `phone` by SMS (anonymous connections).
    pub async fn register_request(&self, phone: UserId) -> Result<RegisterChallenge> {
        let answer = self
            .request(RegisterRequest {
                phone,
                channel: CodeChannel::Sms,
            })
            .await?;
        expect!(answer, RegisterChallenge)
    }

    /// Proves `phone` with `code` and registers this connection as its new primary device
    /// (anonymous connections). From then on the client is that device, reconnects included.
    pub async fn register_verify(
        &self,
        phone: UserId,
        code: &str,
        pin: &str,
        device_name: &str,
    ) -> Result<Registered> {
        let answer = self
            .request(RegisterVerify {
                phone,
                code: code.to_string(),
                pin: pin.to_string(),
                device_name: device_name.to_string(),
            })
            .await?;
        let registered = expect!(answer, Registered)?;
        self.become_device(&registered);
        Ok(registered)
    }

    /// Issues a one-time provisioning code for a new linked device (authenticated primary).
    pub async fn link_code(&self) -> Result<LinkCode> {
        let answer = self.request(LinkCodeRequest {}).await?;
        expect!(answer, LinkCode)
    }

    /// Links this connection to `user` as a new device (anonymous connections). From then on the
    /// client is that device, reconnects included.
    pub async fn link_device(
        &self,
        user: UserId,
        code: &str,
        device_name: &str,
    ) -> Result<Registered> {
        let answer = self
            .request(LinkDevice {
                user,
                code: code.to_string(),
                device_name: device_name.to_string(),
            })
            .await?;
        let registered = expect!(answer, Registered)?;
        self.become_device(&registered);
        Ok(registered)
    }

    fn become_device(&self, registered: &Registered) {
        *lock(&self.shared().auth) = Some(Auth {
            user: registered.user,
            device: registered.device,
            token: registered.token.clone(),
        });
    }

    /// The devices of `user`, ascending.
    pub async fn device_list(&self, user: UserId) -> Result<Vec<DeviceId>> {
        let answer = self.request(DeviceListRequest { user }).await?;
        Ok(expect!(answer, DeviceList)?.devices)
    }

    /// Removes a device of this account.
    pub async fn remove_device(&self, device: DeviceId) -> Result<()> {
        let answer = self.request(RemoveDevice { device }).await?;
        expect!(answer, Done).map(drop)
    }

    /// Sets the registration lock PIN (empty clears it).
    pub async fn set_registration_lock(&self, pin: &str) -> Result<()> {
        let answer = self
            .request(SetRegistrationLock {
                pin: pin.to_string(),
            })
            .await?;
        expect!(answer, Done).map(drop)
    }

    /// Sends a 1:1 message: one ciphertext per device of `to` and per other device of ours.
    /// Returns the node's `SendAck` whatever its status; `Err(Disconnected)` means retry with the
    /// same `msg_id` (the node answers a repeat with the same `SendAck`).
    pub async fn send(
        &self,
        to: UserId,
        msg_id: MsgId,
        ciphertexts: Vec<DeviceCiphertext>,
    ) -> Result<SendAck> {
        let answer = self
            .request(Send {
                msg_id,
                to,
                ciphertexts,
            })
            .await?;
        let ack = expect!(answer, SendAck)?;
        check_msg_id(&ack, msg_id)?;
        Ok(ack)
    }

    /// Sends one message to a broadcast list: one ciphertext per device of each recipient
    /// (at most 256 users, never ourselves). Each recipient gets it as a 1:1 message, if it has
    /// us in its contacts. Returns one result per recipient; re-encrypt and resend (same
    /// `msg_id`) to those answered `MismatchedDevices` or with an `error`.
    pub async fn broadcast_send(
        &self,
        msg_id: MsgId,
        ciphertexts: Vec<DeviceCiphertext>,
    ) -> Result<ringpost_wire::BroadcastAck> {
        let answer = self
            .request(ringpost_wire::BroadcastSend {
                msg_id,
                ciphertexts,
            })
            .await?;
        let ack = expect!(answer, BroadcastAck)?;
        if ack.msg_id != msg_id {
            return Err(ClientError::Protocol(
                "BroadcastAck for another msg_id".into(),
            ));
        }
        Ok(ack)
    }

    /// Posts a status item (a 24-hour story) for `audience` (narrowed by `users`, at most
    /// 4096): `body` is one ciphertext, encrypted with our status sender key, which we hand to
    /// the audience pairwise ourselves. `SendAck{Ok}` once stored for the whole audience.
    pub async fn status_post(
        &self,
        msg_id: MsgId,
        audience: ringpost_wire::StatusAudience,
        users: Vec<UserId>,
        body: bytes::Bytes,
    ) -> Result<SendAck> {
        let answer = self
            .request(ringpost_wire::StatusPost {
                msg_id,
                audience,
                users,
                body,
            })
            .await?;
        let ack = expect!(answer, SendAck)?;
        check_msg_id(&ack, msg_id)?;
        Ok(ack)
    }

    /// Tells `poster` we viewed these of its statuses (several at once: coalesce them).
    pub async fn status_viewed(
        &self,
        poster: UserId,
        msg_id: MsgId,
        statuses: Vec<MsgId>,
    ) -> Result<SendAck> {
        self.receipt(poster, msg_id, ReceiptKind::StatusViewed, statuses)
            .await
    }

    /// Creates a group with these members (we are its first admin); the node picks its id.
    pub async fn group_create(
        &self,
        members: Vec<UserId>,
        meta: bytes::Bytes,
    ) -> Result<ringpost_wire::GroupInfo> {
        let answer = self
            .request(ringpost_wire::GroupCreate { members, meta })
            .await?;
        expect!(answer, GroupInfo)
    }

    /// Changes a group (members, admins, meta, settings, invite code), leaves it, or joins it
    /// with an invite code; answered with the group as we now see it.
    pub async fn group_update(
        &self,
        update: ringpost_wire::GroupUpdate,
    ) -> Result<ringpost_wire::GroupInfo> {
        let answer = self.request(update).await?;
        expect!(answer, GroupInfo)
    }

    /// A group's current state (members only).
    pub async fn group_info(
        &self,
        group: ringpost_wire::GroupId,
    ) -> Result<ringpost_wire::GroupInfo> {
        let answer = self
            .request(ringpost_wire::GroupInfoRequest { group })
            .await?;
        expect!(answer, GroupInfo)
    }

    /// Sends one sender-key ciphertext to every member of `group`. `SendAck{Ok}` means the
    /// message is sequenced and durable in the group's fan-out log; `Err(Disconnected)` means
    /// retry with the same `msg_id` (a repeat from this device is answered, not resent).
    pub async fn group_send(
        &self,
        group: ringpost_wire::GroupId,
        msg_id: MsgId,
        body: bytes::Bytes,
    ) -> Result<SendAck> {
        let answer = self
            .request(ringpost_wire::GroupSend {
                group,
                msg_id,
                body,
            })
            .await?;
        let ack = expect!(answer, SendAck)?;
        check_msg_id(&ack, msg_id)?;
        Ok(ack)
    }

    /// Reports that this user received (`Delivered`) or read (`Read`) every message of
    /// `group` up to group seq `up_to_seq` (a watermark: a lower one than before changes
    /// nothing; `Read` implies `Delivered`). Each sender gets one aggregated
    /// [`Event::GroupReceipt`] once every member passed its message. `Ok` once the group's
    /// owner recorded it.
    pub async fn group_receipt(
        &self,
        group: ringpost_wire::GroupId,
        kind: ReceiptKind,
        up_to_seq: u64,
    ) -> Result<()> {
        let answer = self
            .request(ringpost_wire::GroupReceipt {
                group,
                kind,
                up_to_seq,
            })
            .await?;
        expect!(answer, Done).map(drop)
    }

    /// Tells every device of `to` that these of its messages were delivered or read. `msg_id` is
    /// the receipt's own idempotency key.
    pub async fn receipt(
        &self,
        to: UserId,
        msg_id: MsgId,
        kind: ReceiptKind,
        msg_ids: Vec<MsgId>,
    ) -> Result<SendAck> {
        let answer = self
            .request(Receipt {
                msg_id,
                to,
                kind,
                msg_ids,
            })
            .await?;
        let ack = expect!(answer, SendAck)?;
        check_msg_id(&ack, msg_id)?;
        Ok(ack)
    }

    /// Tells `to`'s connected devices that we are (not) typing. Not stored, not answered; the
    /// node drops more than `TYPING_PER_S_MAX` (2) a second from one device.
    pub async fn typing(&self, to: UserId, typing: bool) -> Result<()> {
        self.fire(Typing {
            user: to,
            device: 0,
            typing,
            recording: false,
            group: None,
        })
        .await
    }

    /// Like [`Client::typing`], for recording a voice note.
    pub async fn recording(&self, to: UserId, recording: bool) -> Result<()> {
        self.fire(Typing {
            user: to,
            device: 0,
            typing: recording,
            recording,
            group: None,
        })
        .await
    }

    /// Tells the other members of `group` that this user is typing (or, with `recording`,
    /// recording a voice note): their connected devices only, never stored, rate-limited
    /// like 1:1 typing. Members that block this user do not get it. No answer.
    pub async fn group_typing(
        &self,
        group: ringpost_wire::GroupId,
        typing: bool,
        recording: bool,
    ) -> Result<()> {
        self.fire(Typing {
            user: 0,
            device: 0,
            typing,
            recording,
            group: Some(group),
        })
        .await
    }

    /// Publishes this device's identity key, signed prekey and one-time prekeys.
    pub async fn prekey_upload(
        &self,
        identity_key: bytes::Bytes,
        signed_prekey: Option<SignedPrekey>,
        one_time: Vec<OneTimePrekey>,
    ) -> Result<()> {
        let answer = self
            .request(PrekeyUpload {
                identity_key,
                signed_prekey,
                one_time,
            })
            .await?;
        expect!(answer, Done).map(drop)
    }

    /// Claims a prekey bundle for every device of `user` (or only `device` if non-zero).
    pub async fn prekey_claim(&self, user: UserId, device: DeviceId) -> Result<PrekeyBundle> {
        let answer = self.request(PrekeyClaim { user, device }).await?;
        expect!(answer, PrekeyBundle)
    }

    /// One-time prekeys this device has left on the node.
    pub async fn prekey_count(&self) -> Result<u32> {
        let answer = self.request(PrekeyCountRequest {}).await?;
        Ok(expect!(answer, PrekeyCount)?.count)
    }

    /// Makes `users` this connection's whole presence subscription set (empty: none). Their
    /// current states arrive as [`Event::Presence`], before this returns, and later changes
    /// the same way, as far as their privacy settings let us see them. A reconnect starts
    /// with no subscription: subscribe again.
    pub async fn presence_subscribe(&self, users: Vec<UserId>) -> Result<()> {
        let answer = self.request(PresenceSubscribe { users }).await?;
        expect!(answer, Done).map(drop)
    }

    /// Sets who may see our last-seen time and that we are online.
    pub async fn set_privacy(&self, last_seen: Visibility, online: Visibility) -> Result<()> {
        let answer = self.request(SetPrivacy { last_seen, online }).await?;
        expect!(answer, Done).map(drop)
    }

    /// Changes our contact list and block list in one step (see [`ContactsUpdate`]).
    pub async fn contacts_update(&self, update: ContactsUpdate) -> Result<()> {
        let answer = self.request(update).await?;
        expect!(answer, Done).map(drop)
    }

    /// Replaces our whole contact list.
    pub async fn set_contacts(&self, contacts: Vec<UserId>) -> Result<()> {
        self.contacts_update(ContactsUpdate {
            replace: true,
            add: contacts,
            ..Default::default()
        })
        .await
    }

    /// Blocks `user`: its messages to us are answered `Ok` and dropped, its typing indicators
    /// are dropped, and it sees none of our presence.
    pub async fn block(&self, user: UserId) -> Result<()> {
        self.contacts_update(ContactsUpdate {
            block: vec![user],
            ..Default::default()
        })
        .await
    }

    /// Unblocks `user`.
    pub async fn unblock(&self, user: UserId) -> Result<()> {
        self.contacts_update(ContactsUpdate {
            unblock: vec![user],
            ..Default::default()
        })
        .await
    }

    /// Pings the node; returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration> {
        let started = Instant::now();
        let nonce: u64 = rand::random();
        let answer = self.request(Ping { nonce }).await?;
        let pong = expect!(answer, Pong)?;
        if pong.nonce != nonce {
            return Err(ClientError::Protocol(format!(
                "Pong carries nonce {}, not {nonce}",
                pong.nonce
            )));
        }
        Ok(started.elapsed())
    }

    /// The next event; `None` once the client is closed or gave up reconnecting (after the last
    /// [`Event::Disconnected`]). Deliveries already handed out are dropped (and acked) here;
    /// with `auto_ack` the rest are acked in batches of up to `ACK_SEQS_MAX`, written (by a task
    /// of their own) when the queue runs empty or a batch is full, and after a reconnect. Call
    /// it from one task at a time (concurrent callers take turns).
    ///
    /// # Cancel safety
    /// This method is cancel-safe: it may be a branch of `tokio::select!`, run under
    /// `tokio::time::timeout`, or be dropped at any other await point, and no event is lost or
    /// handed out twice. Its only await points are taking the turn and waiting on the event
    /// queue, and neither has taken anything when it is dropped; an event taken off the queue
    /// is returned without another await (acks are written by a spawned task, never here).
    pub async fn next_event(&self) -> Option<Event> {
        let shared = &self.handle.shared;
        let mut events = shared.events.lock().await;
        loop {
            let item = match events.try_recv() {
                Ok(item) => item,
                Err(mpsc::error::TryRecvError::Empty) => {
                    shared.flush_acks_soon();
                    // Cancel-safe: `recv` takes nothing out of the queue unless it completes.
                    events.recv().await?
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
            };
            // From here to the return there is no await: whatever was taken is handed out.
            let deliver = match item {
                Queued::Event(event) => {
                    if matches!(*event, Event::Reconnected { .. }) {
                        // Acks that missed the old connection go out on the new one.
                        shared.flush_acks_soon();
                    }
                    return Some(*event);
                }
                Queued::Deliver(deliver) => deliver,
            };
            let fresh = lock(&shared.dedup).insert(&DedupKey::of(&deliver));
            if !fresh || shared.config.auto_ack {
                shared.queue_ack(deliver.seq);
            }
            if !fresh {
                tracing::debug!(seq = deliver.seq, "dropping a delivery already handed out");
                continue;
            }
            if events.is_empty() || lock(&shared.acks).len() >= ACK_SEQS_MAX {
                shared.flush_acks_soon();
            }
            return Some(Event::from_deliver(*deliver));
        }
    }

    /// Acknowledges deliveries by seq (with `auto_ack` off), in frames of up to `ACK_SEQS_MAX`.
    pub async fn ack(&self, seqs: &[u64]) -> Result<()> {
        for chunk in seqs.chunks(ACK_SEQS_MAX) {
            self.fire(DeliverAck {
                seqs: chunk.to_vec(),
            })
            .await?;
        }
        Ok(())
    }

    /// Closes the connection cleanly and stops reconnecting; in-flight requests fail, and
    /// [`Client::next_event`] returns what is queued, then `None`. Other handles see the client
    /// closed.
    pub async fn close(&self) {
        // After any flush under way on its own task (`ack_writer` orders them).
        self.shared().flush_acks().await;
        let shared = self.shared();
        shared.shutdown.send_replace(true);
        let mut state = shared.state.subscribe();
        let closed = state.wait_for(|s| matches!(s, LinkState::Closed));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT * 2, closed).await;
    }
}

fn check_msg_id(ack: &SendAck, msg_id: MsgId) -> Result<()> {
    if ack.msg_id != msg_id {
        return Err(ClientError::Protocol(
            "SendAck for another msg_id".to_string(),
        ));
    }
    Ok(())
}

/// A fresh random message id.
pub fn new_msg_id() -> MsgId {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle client holds its driver task, its shared state and the event queue's first block
    /// of 32 slots; keep them small (the load generator and chaos hold thousands of clients).
    #[tokio::test]
    async fn an_idle_client_is_small() {
        assert_eq!(
            std::mem::size_of::<Queued>(),
            16,
            "event queue slots are two words"
        );
        assert!(
            std::mem::size_of::<Shared>() <= 768,
            "{}",
            std::mem::size_of::<Shared>()
        );

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = bytes::BytesMut::new();
            loop {
                tcp.read_buf(&mut head).await.unwrap();
                if let Some((request, _)) = ringpost_wire::ws::parse_request(&head).unwrap() {
                    let answer = ringpost_wire::ws::accept_response(&request);
                    tcp.write_all(&answer).await.unwrap();
                    break;
                }
            }
        });
        let endpoint = Endpoint::parse(&format!("ws://127.0.0.1:{port}")).unwrap();
        let conn = crate::Connection::open(&endpoint, &Default::default())
            .await
            .unwrap();
        let (reader, writer) = conn.into_parts();
        let welcome = Welcome {
            protocol_version: 1,
            node_id: 1,
            epoch: 1,
            server_time_ms: 0,
            ping_interval_ms: 30_000,
            idle_timeout_ms: 90_000,
            deliver_window: 64,
            frame_bytes_max: 128 * 1024,
        };
        let link = Arc::new(Link::new(writer, endpoint, welcome.clone()));
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE_MAX);
        let (state, _) = watch::channel(LinkState::Up(link.clone()));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            auth: Mutex::new(None),
            dedup: Mutex::new(DedupSet::new(1)),
            config: ClientConfig::new("ws://unused"),
            state,
            welcome: Mutex::new(welcome),
            reconnects: AtomicU64::new(0),
            redirects_followed: AtomicU64::new(0),
            migrations: AtomicU64::new(0),
            next_req: AtomicU32::new(2),
            events: tokio::sync::Mutex::new(events_rx),
            acks: Mutex::new(Vec::new()),
            ack_writer: tokio::sync::Mutex::new(()),
            ack_task_running: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
            request_slots: Semaphore::new(1),
            shutdown,
        });
        let driver = driver::Driver {
            shared,
            events: events_tx,
            shutdown: shutdown_rx,
        };
        let task = driver.run(reader, Vec::new(), link);
        // The reconnect handshake is boxed, so it does not count here.
        let bytes = std::mem::size_of_val(&task);
        assert!(
            bytes <= 3 * 1024,
            "the driver task's future is {bytes} bytes"
        );
    }
}
