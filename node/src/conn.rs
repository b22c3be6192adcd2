//! The connection driver shared by every transport: it moves frames between a [`Transport`] and
//! a [`Session`], executes the session's requests on the [`Server`], delivers inbox entries
//! inside the session's window (the ones handed to it as they are stored, else read from the
//! inbox), and closes when asked (replaced, reaped, shutting down, or its user moved to another
//! node: then it tells the device `Migrate` to the new owner).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use rand::Rng;
use ringpost_wire::limits::MIGRATE_RECONNECT_AFTER_MS_MAX;
use ringpost_wire::{ErrorCode, Frame, Migrate, Redirect, UserId};
use tracing::{debug, warn};

use crate::metrics::Transport as TransportKind;
use crate::registry::{CloseReason, ConnShared, Handed};
use crate::routing::Route;
use crate::server::Server;
use crate::session::{Answer, Peer, Session, Step, REQUESTS_IN_FLIGHT_MAX};
use crate::transport::{Incoming, Transport, TransportError};

/// How long a client whose user moved to a node without a client address this node knows waits
/// before reconnecting (`GoingAway`: its reconnect then follows the `Redirect` of the node it
/// reaches). Devices the node can tell where to go get a `Migrate` instead.
pub const MOVED_RECONNECT_AFTER_MS: u32 = 50;
/// The `GoingAway` delay after an ack that was not written (`Conn::handle_ack_answer`):
/// long enough for a moved shard's new owner to be in the ring the client is redirected by.
pub const ACK_FAILED_RECONNECT_AFTER_MS: u32 = 100;

/// Default interval over which the reconnects of devices whose user moved are spread: each
/// gets a `Migrate` whose `reconnect_after_ms` is drawn uniformly from `[0, this]`, so N moved
/// devices reconnect at about N / 2 s each second, and a device is away at most 2 s plus its
/// reconnect.
pub const MIGRATE_SPREAD_MS_DEFAULT: u32 = 2_000;
/// Largest migrate interval (`--migrate-spread-ms`): the wire's bound on
/// `Migrate.reconnect_after_ms`, one minute, the longest a move may keep a device offline.
pub const MIGRATE_SPREAD_MS_MAX: u32 = MIGRATE_RECONNECT_AFTER_MS_MAX;

/// Events handled back to back before the frames they produced are written: bounds how long a
/// busy connection delays its writes (and its share of a worker) for the sake of batching.
pub const EVENTS_PER_WRITE_MAX: usize = 32;
/// Frames queued before they are written even if more events are ready. Memory: this many
/// encoded frames (plus what one event adds), at most a few MiB for maximal `Deliver`s.
pub const FRAMES_PER_WRITE_MAX: usize = 64;
/// Bytes of encoded frames queued before they are written: inbox deliveries stop at it until
/// the queue is written (a client that does not read gets nothing more, and a write it does not
/// take within the transport's write timeout closes it). Worst case per connection: this plus
/// one frame (128 KiB) queued, and as much again while a WebSocket write concatenates them.
pub const OUT_BYTES_MAX: usize = 256 * 1024;

type Pending = FuturesOrdered<BoxFuture<'static, (u32, Answer)>>;
type Acks = FuturesUnordered<BoxFuture<'static, (u32, Answer)>>;

/// What woke the connection (see [`Conn::poll_event`]).
enum Event {
    Notified,
    Answer(u32, Answer),
    AckAnswer(u32, Answer),
    Read(Result<Incoming, TransportError>),
}

/// What the connection loop should do after handling an event.
enum Flow {
    Continue,
    Close(Option<(ErrorCode, String)>),
    /// Nothing in flight and nothing to read: park without a task ([`Park`]).
    Park,
}

/// How a connection was admitted: its place among the unauthenticated ones, and when it was
/// accepted (registry clock), which starts its handshake deadline.
pub struct Admitted {
    pub permit: crate::admission::Permit,
    pub accepted_ms: u64,
    /// The client's address (for budgets charged to it).
    pub source: std::net::IpAddr,
}

/// Serves one connection until it closes. Never panics on peer input.
///
/// The connection is registered when this is called; the future serves it until it waits with
/// nothing in flight, then parks it (see [`Park`]): a connection that is idle has no task.
/// A plain `fn` that builds the state and returns the driving future, rather than an
/// `async fn`: an `async fn` moves its arguments into locals and its future keeps both copies
/// (rustc #62958).
pub fn serve<T: Transport + 'static>(
    server: Arc<Server>,
    transport: T,
    kind: TransportKind,
    admitted: Admitted,
) -> impl std::future::Future<Output = ()> + Send {
    server.metrics.connection_opened(kind);
    let _ = server
        .conn_runtime
        .get_or_init(tokio::runtime::Handle::current);
    let limits = server.config.preauth;
    let shared = server.registry.open(
        admitted.accepted_ms + u64::from(limits.handshake_timeout_ms),
        server.config.keepalive.idle_timeout_ms,
    );
    let conn = Conn {
        session: Session::new(
            server.now_ms(),
            server.node_id,
            server.epoch(),
            server.config.keepalive,
        ),
        server,
        shared,
        out: VecDeque::new(),
        out_bytes: 0,
        pending: None,
        acks: None,
        bound: None,
        permit: Some(admitted.permit),
        anonymous: false,
        source: admitted.source,
        kind,
    };
    let park = Arc::new(Park {
        state: Mutex::new(Parking::Running { woken: false }),
    });
    drive(park, Box::new(Live { conn, transport }))
}

/// What a connection keeps for its life, in one allocation that moves between the task serving
/// it and its [`Park`].
struct Live<T> {
    conn: Conn,
    transport: T,
}

/// Where a connection waits while it has nothing in flight (no request executing, no ack, no
/// output queued): its [`Live`] state, and no task. The park is the waker every source of the
/// connection holds while it waits (the socket's readiness, [`ConnShared`]'s wake-ups), so
/// whichever fires first gives the connection a task again on the node's runtime.
///
/// An idle connection then costs its state and this (a mutex and a pointer), not a task (a
/// tokio task's header, scheduler links and the driving future's own state: about 250 bytes
/// more per connection). Waking a parked connection costs one task spawn.
struct Park<T> {
    state: Mutex<Parking<T>>,
}

enum Parking<T> {
    /// A task serves the connection. `woken`: a source fired since the task last armed the
    /// park (see [`Park::arm`]), so the task must look again before it parks.
    Running {
        woken: bool,
    },
    Parked(Box<Live<T>>),
    /// The connection closed: wake-ups still held by its sources do nothing.
    Done,
}

impl<T> Park<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Parking<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets earlier wake-ups: called before the sources are polled with the park's waker,
    /// so any wake-up after it is one those polls may have missed.
    fn arm(&self) {
        if let Parking::Running { woken } = &mut *self.lock() {
            *woken = false;
        }
    }
}

impl<T: Transport + 'static> std::task::Wake for Park<T> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut state = self.lock();
        match &mut *state {
            Parking::Running { woken } => *woken = true,
            Parking::Done => {}
            Parking::Parked(_) => {
                let Parking::Parked(live) =
                    std::mem::replace(&mut *state, Parking::Running { woken: false })
                else {
                    unreachable!()
                };
                drop(state);
                match live.conn.server.conn_runtime.get().cloned() {
                    Some(runtime) => drop(runtime.spawn(drive(self.clone(), live))),
                    // Unreachable: `serve` sets it before the first park.
                    None => warn!("a parked connection was woken without a runtime"),
                }
            }
        }
    }
}

/// Serves a connection until it parks or closes.
async fn drive<T: Transport + 'static>(park: Arc<Park<T>>, mut live: Box<Live<T>>) {
    let metrics = live.conn.server.metrics.clone();
    metrics
        .connection_tasks
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let flow = loop {
        let Live { conn, transport } = &mut *live;
        match conn.run(transport, &park).await {
            Flow::Park => {
                let mut state = park.lock();
                if let Parking::Running { woken: true } = *state {
                    // Woken after the sources were polled: look again.
                    *state = Parking::Running { woken: false };
                    continue;
                }
                *state = Parking::Parked(live);
                metrics
                    .connection_tasks
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            flow => break flow,
        }
    };
    *park.lock() = Parking::Done;
    let Live {
        mut conn,
        mut transport,
    } = *live;
    if let Flow::Close(error) = flow {
        // Boxed, like every write: see `Conn::run`.
        Box::pin(async {
            if !conn.out.is_empty() {
                let _ = transport.write(&mut conn.out).await;
            }
            transport
                .close(error.as_ref().map(|(c, m)| (*c, m.as_str())))
                .await;
        })
        .await;
    }
    let server = &conn.server;
    server.registry.close(&conn.shared, conn.bound);
    server.presence_connection_closed(conn.shared.id, conn.bound);
    server.metrics.connection_closed(conn.kind);
    metrics
        .connection_tasks
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

struct Conn {
    server: Arc<Server>,
    session: Session,
    shared: Arc<ConnShared>,
    /// Encoded frames waiting to be written; empty (and unallocated) when idle.
    out: VecDeque<Bytes>,
    /// Their bytes (see [`OUT_BYTES_MAX`]).
    out_bytes: usize,
    /// Requests executing, answered in the order they arrived (so `SendAck`s go out in commit
    /// order). Allocated only while there are some.
    pending: Option<Box<Pending>>,
    /// Acks executing. Nothing waits for them, so they are not in line with `pending` (a
    /// `SendAck` never queues behind an ack); only a failure is answered. Allocated only while
    /// there are some.
    acks: Option<Box<Acks>>,
    /// The device this connection is bound to in the registry.
    bound: Option<(u64, u32)>,
    /// Its place among unauthenticated connections, given back once it is a device's.
    permit: Option<crate::admission::Permit>,
    /// Whether its anonymous session's deadline is set.
    anonymous: bool,
    source: std::net::IpAddr,
    kind: TransportKind,
}

impl Conn {
    /// Serves the connection until it closes ([`Flow::Close`]) or waits with nothing in flight
    /// ([`Flow::Park`]: every source then holds `park`'s waker).
    async fn run<T: Transport + 'static>(
        &mut self,
        transport: &mut T,
        park: &Arc<Park<T>>,
    ) -> Flow {
        loop {
            if let Flow::Close(e) = self.deliver() {
                return Flow::Close(e);
            }
            if !self.out.is_empty() || transport.has_control_output() {
                let n = self.out.len() as u64;
                // Boxed: a write's future (its timeout's timer, the transport's write state)
                // lives only while writing (one allocation per batch of frames).
                if let Err(e) = Box::pin(transport.write(&mut self.out)).await {
                    debug!(conn = self.shared.id, error = %e, "write failed");
                    return Flow::Close(None);
                }
                self.server
                    .metrics
                    .frames_out
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                self.out = VecDeque::new();
                self.out_bytes = 0;
            }
            if self.session.is_closed() {
                return Flow::Close(None);
            }
            let flow = if self.pending.is_none() && self.acks.is_none() {
                // Nothing in flight: poll the sources with the park's waker, and park if none
                // is ready. Whatever fires next gives the connection a task again.
                park.arm();
                let waker = std::task::Waker::from(park.clone());
                match self.poll_event(transport, &mut Context::from_waker(&waker)) {
                    Poll::Ready(event) => self.handle_event(event),
                    Poll::Pending => return Flow::Park,
                }
            } else {
                self.next_event(transport).await
            };
            if let Flow::Close(e) = flow {
                return Flow::Close(e);
            }
            // Handle whatever else is ready before writing, so that the answers and deliveries
            // of a burst leave in one vectored write instead of one write each.
            for _ in 1..EVENTS_PER_WRITE_MAX {
                if self.session.is_closed()
                    || self.out.len() >= FRAMES_PER_WRITE_MAX
                    || transport.has_control_output()
                {
                    break;
                }
                match futures::FutureExt::now_or_never(self.next_event(transport)) {
                    Some(Flow::Close(e)) => return Flow::Close(e),
                    Some(_) => {}
                    None => break,
                }
            }
        }
    }

    /// Waits for one event and handles it: a wake-up, an answer, an ack done, or a frame read.
    async fn next_event<T: Transport>(&mut self, transport: &mut T) -> Flow {
        let event = std::future::poll_fn(|cx| self.poll_event(transport, cx)).await;
        self.handle_event(event)
    }

    fn handle_event(&mut self, event: Event) -> Flow {
        match event {
            Event::Notified => self.handle_notified(),
            Event::Answer(req, answer) => self.handle_answer(req, answer),
            Event::AckAnswer(req, answer) => self.handle_ack_answer(req, answer),
            Event::Read(read) => self.handle_read(read),
        }
    }

    /// Polls the event sources in priority order: wake-ups (closing, deliveries), answers,
    /// acks, then (while fewer than [`REQUESTS_IN_FLIGHT_MAX`] requests are executing) the
    /// transport. Poll functions all the way down, so a waiting connection keeps no futures:
    /// every source keeps the task's waker itself.
    fn poll_event<T: Transport>(&mut self, transport: &mut T, cx: &mut Context<'_>) -> Poll<Event> {
        if self.shared.poll_notified(cx).is_ready() {
            return Poll::Ready(Event::Notified);
        }
        let answers = match self.pending.as_mut() {
            Some(p) => {
                if let Poll::Ready(Some((req, answer))) = p.poll_next_unpin(cx) {
                    return Poll::Ready(Event::Answer(req, answer));
                }
                p.len()
            }
            None => 0,
        };
        let acks = match self.acks.as_mut() {
            Some(a) => {
                if let Poll::Ready(Some((req, answer))) = a.poll_next_unpin(cx) {
                    return Poll::Ready(Event::AckAnswer(req, answer));
                }
                a.len()
            }
            None => 0,
        };
        if answers + acks < REQUESTS_IN_FLIGHT_MAX {
            if let Poll::Ready(read) = transport.poll_next_frame(cx) {
                return Poll::Ready(Event::Read(read));
            }
        }
        Poll::Pending
    }

    fn handle_notified(&mut self) -> Flow {
        match self.shared.close_reason() {
            CloseReason::None => {}
            CloseReason::Removed => {
                return self.close_with(
                    ErrorCode::BadCredentials,
                    "this device was removed from its account",
                )
            }
            CloseReason::Replaced => {
                return self.close_with(
                    ErrorCode::Forbidden,
                    "replaced by a newer connection of this device",
                )
            }
            CloseReason::Expired => {
                let why = match (self.permit.is_some(), self.anonymous) {
                    (false, _) => "idle timeout",
                    (true, false) => "no Hello within the handshake deadline",
                    (true, true) => "anonymous session deadline",
                };
                debug!(conn = self.shared.id, why, "reaping connection");
                return Flow::Close(None);
            }
            CloseReason::Moved => {
                match self.bound.and_then(|(user, _)| self.migrate(user)) {
                    Some(migrate) => {
                        debug!(
                            conn = self.shared.id,
                            epoch = migrate.epoch,
                            after_ms = migrate.reconnect_after_ms,
                            "user moved: migrating the device to its new node"
                        );
                        self.push_frame(&Frame::new(0, migrate));
                    }
                    None => self.push_frame(&Frame::new(
                        0,
                        ringpost_wire::GoingAway {
                            reconnect_after_ms: MOVED_RECONNECT_AFTER_MS,
                            reason: "this user now belongs to another node; reconnect".into(),
                        },
                    )),
                }
                return Flow::Close(Some((
                    ErrorCode::WrongOwner,
                    "this user now belongs to another node".into(),
                )));
            }
            CloseReason::ShuttingDown => {
                self.push_frame(&Frame::new(
                    0,
                    ringpost_wire::GoingAway {
                        reconnect_after_ms: 1_000,
                        reason: "node shutting down".into(),
                    },
                ));
                return Flow::Close(Some((ErrorCode::ShuttingDown, "node shutting down".into())));
            }
        }
        if self.shared.take_woken() {
            self.session.handle_wake();
        }
        for frame in self.shared.take_pushed() {
            self.out_bytes += frame.len();
            self.out.push_back(frame);
        }
        Flow::Continue
    }

    /// The `Migrate` for this connection's device, whose `user` moved: to the owner the
    /// current ring names, with the addresses a `Redirect` would carry. `None` when no other
    /// node owns the user (or the user is back here), or the owner has no client address.
    fn migrate(&self, user: UserId) -> Option<Migrate> {
        let Route::Remote { node, epoch, .. } = self.server.routing.route(user) else {
            return None;
        };
        let Answer::Redirect(redirect) = self.server.redirect(user, node, epoch) else {
            return None;
        };
        migrate_for(
            redirect,
            self.server.config.migrate_spread_ms,
            &mut rand::thread_rng(),
        )
    }

    fn handle_read(&mut self, read: Result<Incoming, TransportError>) -> Flow {
        let bytes = match read {
            Ok(Incoming::Frame(bytes)) => bytes,
            Ok(Incoming::Closed) => return Flow::Close(None),
            // The run loop writes it.
            Ok(Incoming::Control) => return Flow::Continue,
            Err(TransportError::Protocol { code, message }) => {
                self.server
                    .metrics
                    .frames_rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return self.close_with(code, &message);
            }
            Err(e) => {
                debug!(conn = self.shared.id, error = %e, "read failed");
                return Flow::Close(None);
            }
        };
        self.server
            .metrics
            .frames_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = self.server.now_ms();
        self.shared.touch(self.server.registry.now_ms());
        let steps = match Frame::decode(&bytes) {
            Ok(frame) => self.session.handle_frame(frame, now),
            Err(e) => {
                self.server
                    .metrics
                    .frames_rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let req = ringpost_wire::view::FrameView::req_of(&bytes).unwrap_or(0);
                self.session.handle_bad_frame(req, e.code(), e.to_string())
            }
        };
        self.apply(steps)
    }

    /// A `DeliverAck`'s outcome. An ack that was not written (storage failed, or its batch
    /// was refused because a shard in it moved) leaves its entries unacknowledged, but this
    /// connection handed them out already and would not send them again: the error is sent,
    /// then `GoingAway`, and the connection closes, so the client reconnects at once and gets
    /// every unacknowledged entry again (docs/protocol.md). Over budget (`RateLimited`) is only
    /// answered: reconnecting would not help.
    fn handle_ack_answer(&mut self, req: u32, answer: Answer) -> Flow {
        let failed = match &answer {
            Answer::Error { code, message, .. } if *code != ErrorCode::RateLimited => {
                Some((*code, message.clone()))
            }
            _ => None,
        };
        let flow = self.handle_answer(req, answer);
        let Some((code, message)) = failed else {
            return flow;
        };
        if let Flow::Close(e) = flow {
            return Flow::Close(e);
        }
        debug!(conn = self.shared.id, ?code, %message, "an ack was not written: reconnecting the device");
        self.server
            .metrics
            .acks_failed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.push_frame(&Frame::new(
            0,
            ringpost_wire::GoingAway {
                reconnect_after_ms: ACK_FAILED_RECONNECT_AFTER_MS,
                reason: "an acknowledgement was not written; reconnect to get the \
                    unacknowledged entries again"
                    .into(),
            },
        ));
        Flow::Close(Some((code, message)))
    }

    fn handle_answer(&mut self, req: u32, answer: Answer) -> Flow {
        let steps = self.session.handle_answer(req, answer);
        self.follow_peer();
        self.apply(steps)
    }

    /// Follows the session's peer into the registry and the admission counts: a device's
    /// connection is bound to it and no longer counts as unauthenticated (no deadline but the
    /// idle timeout); an anonymous session gets its own deadline, which activity never extends.
    fn follow_peer(&mut self) {
        match self.session.peer() {
            Peer::Device { user, device } if self.bound.is_none() => {
                self.bound = Some((user, device));
                self.server.registry.bind(&self.shared, user, device);
                if let Some(push) = self.server.push.get() {
                    push.device_connected(user, device);
                }
                self.server.presence_device_bound(user);
                self.shared.set_deadline_ms(None);
                self.permit = None;
            }
            Peer::Anonymous if !self.anonymous => {
                self.anonymous = true;
                let session_ms = self.server.config.preauth.anonymous_session_ms;
                self.shared
                    .set_deadline_ms(Some(self.server.registry.now_ms() + u64::from(session_ms)));
            }
            _ => {}
        }
    }

    fn apply(&mut self, steps: Vec<Step>) -> Flow {
        for step in steps {
            match step {
                Step::Write(frame) => {
                    self.follow_peer();
                    self.push_frame(&frame)
                }
                Step::Execute { req, request } => {
                    let fut = self.server.execute(request, Some(self.source));
                    let pending = self
                        .pending
                        .get_or_insert_with(|| Box::new(FuturesOrdered::new()));
                    pending.push_back(Box::pin(async move { (req, fut.await) }));
                    // Poll once now so the request reaches its service (e.g. the inbox
                    // writer's queue) in arrival order: commit order follows frame order.
                    if let Poll::Ready(Some((req, answer))) =
                        futures::FutureExt::now_or_never(std::future::poll_fn(|cx| {
                            Poll::Ready(pending.poll_next_unpin(cx))
                        }))
                        .unwrap_or(Poll::Pending)
                    {
                        if let Flow::Close(e) = self.handle_answer(req, answer) {
                            return Flow::Close(e);
                        }
                    }
                }
                Step::Ack {
                    req,
                    user,
                    device,
                    seqs,
                } => {
                    let fut = self.server.ack(user, device, seqs);
                    let acks = self
                        .acks
                        .get_or_insert_with(|| Box::new(FuturesUnordered::new()));
                    acks.push(Box::pin(async move { (req, fut.await) }));
                    // Poll once now so the ack reaches the inbox writer's queue in frame order.
                    if let Poll::Ready(Some((req, answer))) =
                        futures::FutureExt::now_or_never(std::future::poll_fn(|cx| {
                            Poll::Ready(acks.poll_next_unpin(cx))
                        }))
                        .unwrap_or(Poll::Pending)
                    {
                        if let Flow::Close(e) = self.handle_ack_answer(req, answer) {
                            return Flow::Close(e);
                        }
                    }
                }
                Step::Close(frame) => {
                    let message = match &frame.body {
                        ringpost_wire::Body::Error(e) => e.message.clone(),
                        _ => String::new(),
                    };
                    let code = match &frame.body {
                        ringpost_wire::Body::Error(e) => {
                            ErrorCode::from_u16(e.code).unwrap_or(ErrorCode::Internal)
                        }
                        _ => ErrorCode::Internal,
                    };
                    self.push_frame(&frame);
                    return Flow::Close(Some((code, message)));
                }
            }
        }
        if self.pending.as_ref().is_some_and(|p| p.is_empty()) {
            self.pending = None;
        }
        if self.acks.as_ref().is_some_and(|a| a.is_empty()) {
            self.acks = None;
        }
        Flow::Continue
    }

    /// Queues inbox entries while the session's window has room: those handed to this
    /// connection as they were stored when they continue its cursor, else read from the inbox.
    fn deliver(&mut self) -> Flow {
        let Peer::Device { user, device } = self.session.peer() else {
            return Flow::Continue;
        };
        while self.out_bytes < OUT_BYTES_MAX {
            let Some((after, limit)) = self.session.poll_fetch() else {
                break;
            };
            let entries = match self.shared.take_handed(after, limit) {
                Handed::Next(entries) if !entries.is_empty() => entries,
                Handed::Next(_) | Handed::Gap => {
                    match self.server.inbox.read(
                        user,
                        device,
                        after,
                        limit,
                        self.server.expiry_now_ms(),
                    ) {
                        Ok(entries) => entries,
                        Err(e) => {
                            warn!(conn = self.shared.id, error = %e, "inbox read failed");
                            self.session.handle_fetch_failed();
                            break;
                        }
                    }
                }
            };
            // Deliver while the output budget lasts (at least one entry); the rest is read
            // again once the queue is written. Telling the session the read was exactly as long
            // as what was delivered keeps it fetching after them.
            let mut fetched = Vec::with_capacity(entries.len());
            for (seq, entry) in &entries {
                if !fetched.is_empty() && self.out_bytes >= OUT_BYTES_MAX {
                    break;
                }
                self.push_frame(&crate::server::deliver_frame(*seq, entry));
                fetched.push((*seq, entry.header()));
            }
            let limit = if fetched.len() < entries.len() {
                fetched.len()
            } else {
                limit
            };
            self.session.handle_fetched(&fetched, limit);
            self.server
                .metrics
                .messages_delivered
                .fetch_add(fetched.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Flow::Continue
    }

    /// Queues `frame`. A frame the node cannot encode (a bug: some bound not enforced where
    /// the frame was made) is logged and answered with an `Internal` error in its place, so
    /// the client is never left waiting for an answer that will not come.
    fn push_frame(&mut self, frame: &Frame) {
        match frame.encode() {
            Ok(bytes) => {
                self.out_bytes += bytes.len();
                self.out.push_back(bytes)
            }
            Err(e) => {
                warn!(conn = self.shared.id, frame = frame.body.name(), error = %e, "cannot encode frame");
                let fatal = matches!(&frame.body, ringpost_wire::Body::Error(e) if e.fatal);
                let stand_in = Frame::new(
                    frame.req,
                    ringpost_wire::Error {
                        code: ErrorCode::Internal.as_u16(),
                        message: format!("the node could not encode its {}", frame.body.name()),
                        retry_after_ms: 0,
                        fatal,
                    },
                );
                if let Ok(bytes) = stand_in.encode() {
                    self.out_bytes += bytes.len();
                    self.out.push_back(bytes);
                }
            }
        }
    }

    fn close_with(&mut self, code: ErrorCode, message: &str) -> Flow {
        let message = ringpost_wire::limits::bounded_text(message.to_string());
        let error = ringpost_wire::Error {
            code: code.as_u16(),
            message: message.clone(),
            retry_after_ms: 0,
            fatal: true,
        };
        self.push_frame(&Frame::new(0, error));
        Flow::Close(Some((code, message)))
    }
}

/// The `Migrate` that sends a moved device where `redirect` sends it, after a delay drawn
/// uniformly from `[0, spread_ms]` (`spread_ms` capped at [`MIGRATE_SPREAD_MS_MAX`]). `None` if
/// the new owner has no client address: the device is told `GoingAway` instead.
pub fn migrate_for(redirect: Redirect, spread_ms: u32, rng: &mut impl Rng) -> Option<Migrate> {
    if redirect.ws_url.is_empty() && redirect.quic_addr.is_empty() {
        return None;
    }
    Some(Migrate {
        user: redirect.user,
        epoch: redirect.epoch,
        ws_url: redirect.ws_url,
        quic_addr: redirect.quic_addr,
        reconnect_after_ms: rng.gen_range(0..=spread_ms.min(MIGRATE_SPREAD_MS_MAX)),
    })
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn redirect(ws_url: &str, quic_addr: &str) -> Redirect {
        Redirect {
            user: 15550001,
            epoch: 9,
            ws_url: ws_url.into(),
            quic_addr: quic_addr.into(),
        }
    }

    #[test]
    fn a_migrate_carries_what_a_redirect_would() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let m = migrate_for(redirect("wss://b:443", "b:443"), 0, &mut rng).unwrap();
        assert_eq!(
            m,
            Migrate {
                user: 15550001,
                epoch: 9,
                ws_url: "wss://b:443".into(),
                quic_addr: "b:443".into(),
                reconnect_after_ms: 0,
            }
        );
        // One address is enough; the client picks the one its transport speaks.
        assert!(migrate_for(redirect("", "b:443"), 10, &mut rng).is_some());
        assert!(migrate_for(redirect("ws://b:80", ""), 10, &mut rng).is_some());
        assert_eq!(migrate_for(redirect("", ""), 10, &mut rng), None);
    }

    #[test]
    fn migrate_delays_are_spread_over_the_interval_and_bounded() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let spread = 1_000;
        let delays: Vec<u32> = (0..2_000)
            .map(|_| {
                migrate_for(redirect("ws://b:80", ""), spread, &mut rng)
                    .unwrap()
                    .reconnect_after_ms
            })
            .collect();
        assert!(delays.iter().all(|&d| d <= spread));
        // Uniform over [0, spread]: every tenth of the interval gets some (2,000 draws, ~200
        // expected per tenth; a seeded run, so this cannot flake).
        for tenth in 0..10 {
            let (lo, hi) = (tenth * 100, tenth * 100 + 100);
            assert!(
                delays.iter().any(|&d| d >= lo && d < hi),
                "no delay in [{lo}, {hi})"
            );
        }
        // An interval over the wire's bound is cut to it, so the frame always encodes.
        for _ in 0..100 {
            let m = migrate_for(redirect("ws://b:80", ""), u32::MAX, &mut rng).unwrap();
            assert!(m.reconnect_after_ms <= MIGRATE_RECONNECT_AFTER_MS_MAX);
            Frame::new(0, m).encode().unwrap();
        }
    }
}

#[cfg(test)]
mod footprint {
    use std::mem::size_of;

    use super::{serve, Conn, Live};
    use crate::transport::{quic::QuicTransport, ws::WsTransport};

    fn returned_size<A, B, C, D, R, F: Fn(A, B, C, D) -> R>(_: &F) -> usize {
        size_of::<R>()
    }

    /// An idle connection keeps its state ([`Live`]: the `Conn` and the transport, in one
    /// allocation) and no task or future. The future that serves it while it has work holds
    /// that state boxed, and writes and the close run boxed; a future inlined by mistake (a
    /// TLS handshake is 1.2 KiB) fails this.
    #[test]
    fn an_idle_connection_keeps_its_state_and_no_futures() {
        assert_eq!(
            size_of::<Live<WsTransport>>(),
            size_of::<Conn>() + size_of::<WsTransport>()
        );
        assert!(
            size_of::<Live<QuicTransport>>() <= size_of::<Conn>() + size_of::<QuicTransport>() + 8
        );
        for (name, size) in [
            ("ws", returned_size(&serve::<WsTransport>)),
            ("quic", returned_size(&serve::<QuicTransport>)),
        ] {
            // It lives only while the connection has work (today 480 bytes for ws).
            assert!(size <= 512, "{name}: the serving future is {size} bytes");
        }
    }
}
