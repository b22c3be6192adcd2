//! The scenarios' shared machinery: what a worker runs for each scenario ([`worker`]), the
//! per-device task every scenario is built from ([`device`]), and the recorder that turns its
//! events into histograms and a time series.
//!
//! A device task connects and authenticates (at most `connect_concurrency` at once per
//! worker), then loops over one `select!`: frames from the node (`Deliver`s are acknowledged
//! in one `DeliverAck` per read burst; `SendAck`s and errors settle sends), sends that are due
//! by its [`SendPlan`], protocol pings every `Welcome.ping_interval_ms`, and mode changes from
//! its worker ([`Mode`]). It owns both halves of its connection, so nothing is queued between
//! tasks.
//!
//! Timestamps travel in the messages: a body starts with the time it was due (nanoseconds since
//! the worker's epoch), the run's nonce and the sender's index; a `msg_id` is the time it was
//! actually sent, the run's nonce and the sender's count. Both ends of every pair live in the
//! same worker, so one clock serves.

pub mod chat;
pub mod drain;
pub mod group;
pub mod idle;
pub mod million;
pub mod storm;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use bytes::{BufMut, BytesMut};
use hdrhistogram::Histogram;
use ringpost_wire::{DeviceId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::time::Instant;

use crate::accounts::Account;
use crate::loadclient::{Connected, Connector, Incoming, Link};
use crate::stats::{self, IntervalReport};
use crate::worker::{WorkerCtx, PROGRESS_INTERVAL};

/// Bytes at the front of every message body: due time (8), run nonce (4), sender index (4).
pub const BODY_HEADER_BYTES: usize = 16;

/// Sequence numbers per `DeliverAck` (the protocol's `ACK_SEQS_MAX`).
pub const ACK_SEQS_PER_FRAME: usize = ringpost_wire::limits::ACK_SEQS_MAX;

/// Request ids with this bit set are acknowledgements; the others are sends. Lets an `Error`
/// about a send be told from one about an ack without remembering every request.
const ACK_REQ_BIT: u32 = 1 << 31;

/// Shortest ping interval honoured, whatever `Welcome` says.
const PING_INTERVAL_MIN: Duration = Duration::from_millis(500);

/// A send of an open-loop schedule that leaves more than this after its due time counts as
/// sent late (held back by a full window, or by a generator behind its schedule). Tokio's
/// timers fire up to a millisecond late, so the bound sits well above that.
pub const SENT_LATE_AFTER: Duration = Duration::from_millis(5);

/// What the worker runs, with the scenario's parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Spec {
    Idle(idle::Spec),
    Chat(chat::Spec),
    OfflineDrain(drain::Spec),
    ReconnectStorm(storm::Spec),
    Million(million::Spec),
}

/// Runs this worker's part of its scenario; the returned value is its final report.
pub async fn worker(ctx: &mut WorkerCtx) -> Result<Value> {
    match ctx.spec.scenario.clone() {
        Spec::Idle(s) => idle::worker(ctx, s).await,
        Spec::Chat(s) => chat::worker(ctx, s).await,
        Spec::OfflineDrain(s) => drain::worker(ctx, s).await,
        Spec::ReconnectStorm(s) => storm::worker(ctx, s).await,
        Spec::Million(s) => million::worker(ctx, s).await,
    }
}

/// What device tasks are told to do; every task of a worker watches one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stay connected: receive, acknowledge, ping.
    Hold,
    /// Send by the plan, starting at `start`.
    Send { start: Instant },
    /// Stop sending; keep receiving.
    Drain,
    /// Close the connection (a reset) and end.
    Close,
}

/// What a device sends.
#[derive(Debug, Clone)]
pub struct SendPlan {
    /// Recipients, taken in turn (each has one device).
    pub to: Vec<(UserId, DeviceId)>,
    /// Time between sends; `None`: as fast as the window allows.
    pub interval: Option<Duration>,
    /// First send this long after the start (spreads senders over an interval).
    pub offset: Duration,
    /// Sends without a `SendAck` at most.
    pub window: usize,
    /// Messages to send in all; `None`: until the mode changes.
    pub limit: Option<u64>,
    pub msg_bytes: usize,
}

/// When a device learns its [`SendPlan`].
#[derive(Debug)]
pub enum PlanOf {
    /// From the start (`None`: it only receives).
    Start(Option<SendPlan>),
    /// Once connected (`chat --pairing`): the device reports the node its connection ended on
    /// (the sender is dropped unsent if it does not connect), then keeps receiving,
    /// acknowledging and pinging until its plan arrives (`None`, or a dropped sender: it only
    /// receives).
    AfterConnect {
        node: oneshot::Sender<Option<u64>>,
        plan: oneshot::Receiver<Option<SendPlan>>,
    },
}

/// What feeds the time series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesOf {
    /// Connections established (and their connect latency).
    Connects,
    /// Messages delivered (and their delivery latency).
    Deliveries,
}

/// Counters of a worker, shared by its device tasks.
#[derive(Debug, Default)]
pub struct Counters {
    pub connected: AtomicU64,
    pub connect_failed: AtomicU64,
    pub sent: AtomicU64,
    pub acked_ok: AtomicU64,
    pub send_refused: AtomicU64,
    pub inflight: AtomicU64,
    pub delivered: AtomicU64,
    pub stale: AtomicU64,
    pub receipts: AtomicU64,
    pub closed_by_node: AtomicU64,
    pub transport_errors: AtomicU64,
    pub error_frames: AtomicU64,
    /// Devices that received every message they expected.
    pub complete: AtomicU64,
    /// Open-loop sends due in the measured window that were sent (before sending stopped).
    pub due_sent: AtomicU64,
    /// Of `due_sent`, those that left more than [`SENT_LATE_AFTER`] after their due time.
    pub due_sent_late: AtomicU64,
    /// Open-loop sends due in the measured window that were never sent: the window was full
    /// or the sender behind its schedule when sending stopped. Each counts in the latency
    /// histogram with the time from its due time to the end of sending.
    pub due_unsent: AtomicU64,
}

/// Histograms and the series, behind one lock taken once per read burst.
pub struct Recorder {
    pub latency: Histogram<u64>,
    pub ack_latency: Histogram<u64>,
    pub connect_latency: Histogram<u64>,
    series_of: SeriesOf,
    series_start_ns: u64,
    interval_ns: u64,
    series: Vec<(u64, u64, Histogram<u64>)>,
    /// Only sends due (and deliveries received) in `[window.0, window.1)` count.
    window_ns: (u64, u64),
    pub delivered_in_window: u64,
}

impl Recorder {
    fn new(series_of: SeriesOf, interval: Duration) -> Recorder {
        Recorder {
            latency: stats::new_histogram(),
            ack_latency: stats::new_histogram(),
            connect_latency: stats::new_histogram(),
            series_of,
            series_start_ns: 0,
            interval_ns: interval.as_nanos().max(1) as u64,
            series: Vec::new(),
            window_ns: (0, u64::MAX),
            delivered_in_window: 0,
        }
    }

    /// Starts the series at `start_ns` and counts only `[from_ns, to_ns)`.
    pub fn set_window(&mut self, start_ns: u64, from_ns: u64, to_ns: u64) {
        self.series_start_ns = start_ns;
        self.series.clear();
        self.window_ns = (from_ns, to_ns);
    }

    fn series_slot(&mut self, at_ns: u64) -> Option<&mut (u64, u64, Histogram<u64>)> {
        let i = (at_ns.checked_sub(self.series_start_ns)? / self.interval_ns) as usize;
        /// Intervals kept at most (a day of 1 s intervals): bounds a runaway series.
        const SERIES_INTERVALS_MAX: usize = 86_400;
        if i >= SERIES_INTERVALS_MAX {
            return None;
        }
        while self.series.len() <= i {
            self.series.push((0, 0, stats::new_histogram()));
        }
        Some(&mut self.series[i])
    }

    fn in_window(&self, ns: u64) -> bool {
        ns >= self.window_ns.0 && ns < self.window_ns.1
    }

    /// The measured window, `[from, to)` in nanoseconds since the worker's epoch.
    pub fn window_ns(&self) -> (u64, u64) {
        self.window_ns
    }

    fn apply(&mut self, events: &mut Vec<Event>) {
        for e in events.drain(..) {
            match e {
                Event::Delivered { due_ns, at_ns } => {
                    let us = at_ns.saturating_sub(due_ns) / 1000;
                    if self.in_window(due_ns) {
                        stats::record_us(&mut self.latency, us);
                    }
                    if self.in_window(at_ns) {
                        self.delivered_in_window += 1;
                    }
                    if self.series_of == SeriesOf::Deliveries {
                        if let Some(s) = self.series_slot(at_ns) {
                            s.0 += 1;
                            stats::record_us(&mut s.2, us);
                        }
                    }
                }
                Event::Acked { sent_ns, at_ns } => {
                    if self.in_window(sent_ns) {
                        stats::record_us(
                            &mut self.ack_latency,
                            at_ns.saturating_sub(sent_ns) / 1000,
                        );
                    }
                    if self.series_of == SeriesOf::Deliveries {
                        if let Some(s) = self.series_slot(at_ns) {
                            s.1 += 1;
                        }
                    }
                }
                Event::Connected { started_ns, at_ns } => {
                    let us = at_ns.saturating_sub(started_ns) / 1000;
                    stats::record_us(&mut self.connect_latency, us);
                    if self.series_of == SeriesOf::Connects {
                        if let Some(s) = self.series_slot(at_ns) {
                            s.0 += 1;
                            stats::record_us(&mut s.2, us);
                        }
                    }
                }
            }
        }
    }

    /// The series as reported to the parent.
    pub fn series_report(&self) -> Result<Vec<IntervalReport>> {
        self.series
            .iter()
            .map(|(delivered, acked, h)| {
                Ok(IntervalReport {
                    delivered: *delivered,
                    acked: *acked,
                    latency: if h.is_empty() {
                        String::new()
                    } else {
                        stats::encode(h)?
                    },
                })
            })
            .collect()
    }
}

/// One thing that happened at a device, recorded in a burst.
enum Event {
    Delivered { due_ns: u64, at_ns: u64 },
    Acked { sent_ns: u64, at_ns: u64 },
    Connected { started_ns: u64, at_ns: u64 },
}

/// Everything a worker's device tasks share.
pub struct Shared {
    pub connector: Arc<Connector>,
    epoch: std::time::Instant,
    /// Connection attempts in flight at once.
    connect_slots: Semaphore,
    /// Marks this run's messages: leftovers of earlier runs in an inbox are told apart.
    pub nonce: u32,
    pub counters: Counters,
    pub recorder: Mutex<Recorder>,
    error_codes: Mutex<BTreeMap<u16, u64>>,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    pub fn new(
        connector: Arc<Connector>,
        connect_concurrency: usize,
        series_of: SeriesOf,
        interval: Duration,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            connector,
            epoch: std::time::Instant::now(),
            connect_slots: Semaphore::new(connect_concurrency.max(1)),
            nonce: rand::random(),
            counters: Counters::default(),
            recorder: Mutex::new(Recorder::new(series_of, interval)),
            error_codes: Mutex::new(BTreeMap::new()),
            first_error: Mutex::new(None),
        })
    }

    /// Nanoseconds since this worker's epoch.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// `Instant` → nanoseconds since the epoch.
    pub fn ns_of(&self, at: Instant) -> u64 {
        at.into_std()
            .saturating_duration_since(self.epoch)
            .as_nanos() as u64
    }

    fn note_error(&self, what: &str, e: impl std::fmt::Display) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(format!("{what}: {e}"));
        }
    }

    fn note_code(&self, code: u16) {
        *self
            .error_codes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(code)
            .or_default() += 1;
    }

    /// Errors of every kind so far.
    pub fn errors(&self) -> u64 {
        let c = &self.counters;
        c.connect_failed.load(Relaxed)
            + c.send_refused.load(Relaxed)
            + c.closed_by_node.load(Relaxed)
            + c.transport_errors.load(Relaxed)
            + c.error_frames.load(Relaxed)
    }

    /// The counters, error breakdown and histograms, as a worker reports them.
    pub fn report(&self) -> Result<Value> {
        let c = &self.counters;
        let r = self.recorder.lock().unwrap_or_else(|p| p.into_inner());
        let codes: BTreeMap<String, u64> = self
            .error_codes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(code, n)| (error_name(*code), *n))
            .collect();
        Ok(json!({
            "connected": c.connected.load(Relaxed),
            "connect_failed": c.connect_failed.load(Relaxed),
            "sent": c.sent.load(Relaxed),
            "acked_ok": c.acked_ok.load(Relaxed),
            "send_refused": c.send_refused.load(Relaxed),
            "delivered": c.delivered.load(Relaxed),
            "delivered_in_window": r.delivered_in_window,
            "stale_delivered": c.stale.load(Relaxed),
            "receipts": c.receipts.load(Relaxed),
            "closed_by_node": c.closed_by_node.load(Relaxed),
            "transport_errors": c.transport_errors.load(Relaxed),
            "error_frames": c.error_frames.load(Relaxed),
            "error_codes": codes,
            "complete": c.complete.load(Relaxed),
            "due_sent": c.due_sent.load(Relaxed),
            "due_sent_late": c.due_sent_late.load(Relaxed),
            "due_unsent": c.due_unsent.load(Relaxed),
            "first_error": *self.first_error.lock().unwrap_or_else(|p| p.into_inner()),
            "latency": stats::encode(&r.latency)?,
            "ack_latency": stats::encode(&r.ack_latency)?,
            "connect_latency": stats::encode(&r.connect_latency)?,
            "series": r.series_report()?,
        }))
    }
}

/// `RateLimited(20)` for a known code, the number otherwise.
pub fn error_name(code: u16) -> String {
    match ringpost_wire::ErrorCode::from_u16(code) {
        Some(c) => c.to_string(),
        None => code.to_string(),
    }
}

/// What one device task saw, in nanoseconds since its worker's epoch.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceOutcome {
    /// When the connection attempt started (after waiting for a connect slot).
    pub started_ns: u64,
    pub connected_ns: Option<u64>,
    pub first_delivery_ns: Option<u64>,
    /// When the device had received every message it expected.
    pub complete_ns: Option<u64>,
    pub delivered: u64,
}

/// A send in progress at one device.
struct Sender {
    plan: SendPlan,
    index: u32,
    next_due: Instant,
    next_to: usize,
    inflight: usize,
    sent: u64,
    req: u32,
    /// The recorder's measured window when sending started (nanoseconds since the epoch).
    window_ns: (u64, u64),
    /// Sending started and has not stopped: [`Sender::stop`] still has to account for it.
    started: bool,
}

impl Sender {
    fn new(plan: SendPlan, index: u32) -> Sender {
        Sender {
            plan,
            index,
            next_due: never(),
            next_to: 0,
            inflight: 0,
            sent: 0,
            req: 0,
            window_ns: (0, u64::MAX),
            started: false,
        }
    }

    fn can_send(&self) -> bool {
        self.inflight < self.plan.window && self.plan.limit.is_none_or(|l| self.sent < l)
    }

    /// Starts the schedule at `start` (plus this sender's offset), measuring in the recorder's
    /// window as it is now.
    fn start(&mut self, start: Instant, sh: &Shared) {
        self.next_due = start + self.plan.offset;
        self.window_ns = sh
            .recorder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .window_ns();
        self.started = true;
    }

    /// Books the next send if one may leave at `now` and returns the time it was due (`now`
    /// for a saturating plan): window, counts, and the open loop's schedule.
    fn next_send(&mut self, now: Instant, acknowledged: bool, sh: &Shared) -> Option<Instant> {
        if !self.can_send() || self.next_due > now {
            return None;
        }
        let due = match self.plan.interval {
            Some(i) => {
                let due = self.next_due;
                let due_ns = sh.ns_of(due);
                if due_ns >= self.window_ns.0 && due_ns < self.window_ns.1 {
                    sh.counters.due_sent.fetch_add(1, Relaxed);
                    if now.saturating_duration_since(due) > SENT_LATE_AFTER {
                        sh.counters.due_sent_late.fetch_add(1, Relaxed);
                    }
                }
                self.next_due = due + i;
                due
            }
            None => {
                self.next_due = now;
                now
            }
        };
        self.sent += 1;
        sh.counters.sent.fetch_add(1, Relaxed);
        if acknowledged {
            self.inflight += 1;
            sh.counters.inflight.fetch_add(1, Relaxed);
        }
        Some(due)
    }

    /// Queues every send that is due and fits the window (at most a window's worth at once:
    /// without acknowledgements, NATS sends are settled when written).
    fn push_due(&mut self, link: &mut Link, sh: &Shared) -> Result<()> {
        let now = Instant::now();
        let acknowledged = link.acknowledges_sends();
        let mut burst = 0;
        while burst < self.plan.window {
            let Some(due) = self.next_send(now, acknowledged, sh) else {
                break;
            };
            burst += 1;
            let to = self.plan.to[self.next_to % self.plan.to.len()];
            self.next_to += 1;
            let sent_ns = sh.now_ns();
            let mut msg_id = [0u8; 16];
            // (sender device, msg_id) is the node's idempotency key for 7 days: the run's
            // nonce keeps a later run (same devices, same schedule, times a few µs apart)
            // from repeating an id and being answered as a duplicate of an old message.
            msg_id[..8].copy_from_slice(&sent_ns.to_le_bytes());
            msg_id[8..12].copy_from_slice(&sh.nonce.to_le_bytes());
            msg_id[12..].copy_from_slice(&((self.sent - 1) as u32).to_le_bytes());
            let mut body = BytesMut::with_capacity(self.plan.msg_bytes.max(BODY_HEADER_BYTES));
            body.put_u64_le(sh.ns_of(due));
            body.put_u32_le(sh.nonce);
            body.put_u32_le(self.index);
            body.resize(self.plan.msg_bytes.max(BODY_HEADER_BYTES), 0x5a);
            self.req = if self.req + 1 >= ACK_REQ_BIT {
                1
            } else {
                self.req + 1
            };
            link.push_send(self.req, to, msg_id, body.freeze(), sent_ns)?;
        }
        Ok(())
    }

    /// Ends the schedule at `stop`. Every message of an open-loop schedule that fell due in
    /// the measured window before `stop` but was never sent (the window was full, or the
    /// sender behind) counts in the latency histogram as late by `stop` − its due time: it
    /// had not left when sending ended, so that is a lower bound of its real latency, and
    /// leaving it out would make the percentiles a lower bound of the sent ones only.
    fn stop(&mut self, stop: Instant, sh: &Shared) {
        if !std::mem::replace(&mut self.started, false) {
            return;
        }
        let Some(interval) = self.plan.interval else {
            return;
        };
        let left = self
            .plan
            .limit
            .map_or(u64::MAX, |l| l.saturating_sub(self.sent));
        let stop_ns = sh.ns_of(stop);
        let unsent = unsent_latencies_us(
            sh.ns_of(self.next_due),
            interval.as_nanos().max(1) as u64,
            self.window_ns,
            stop_ns,
            left,
        );
        let mut n = 0;
        let mut r = sh.recorder.lock().unwrap_or_else(|p| p.into_inner());
        for us in unsent {
            stats::record_us(&mut r.latency, us);
            n += 1;
        }
        drop(r);
        sh.counters.due_unsent.fetch_add(n, Relaxed);
        self.next_due = never();
    }

    fn settle(&mut self, sh: &Shared) {
        if self.inflight > 0 {
            self.inflight -= 1;
            sh.counters.inflight.fetch_sub(1, Relaxed);
        }
    }
}

/// The latencies, in µs at `stop_ns`, of the unsent messages of an open-loop schedule whose
/// next message was due at `next_due_ns` and the rest every `interval_ns` after it: those due
/// in `[window.0, min(window.1, stop_ns))`, at most `left` of them (what the plan's limit
/// still allows).
fn unsent_latencies_us(
    next_due_ns: u64,
    interval_ns: u64,
    window_ns: (u64, u64),
    stop_ns: u64,
    left: u64,
) -> impl Iterator<Item = u64> {
    let end_ns = window_ns.1.min(stop_ns);
    (0..left)
        .map(move |k| next_due_ns.saturating_add(k.saturating_mul(interval_ns)))
        .take_while(move |&due| due < end_ns)
        .filter(move |&due| due >= window_ns.0)
        .map(move |due| (stop_ns - due) / 1000)
}

/// A far-away instant for a `sleep_until` that must not fire.
fn never() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// One device: connect and authenticate, then serve `mode` until it says [`Mode::Close`].
/// `expect`: the messages this device should receive before it counts as complete (0: none).
pub async fn device(
    sh: Arc<Shared>,
    account: Account,
    plan: Option<SendPlan>,
    index: u32,
    expect: u64,
    mode: watch::Receiver<Mode>,
) -> DeviceOutcome {
    device_planned(sh, account, PlanOf::Start(plan), index, expect, mode).await
}

/// [`device`], with its plan given at the start or once it is connected.
pub async fn device_planned(
    sh: Arc<Shared>,
    account: Account,
    plan: PlanOf,
    index: u32,
    expect: u64,
    mut mode: watch::Receiver<Mode>,
) -> DeviceOutcome {
    let mut out = DeviceOutcome::default();
    let connected = {
        let Ok(_permit) = sh.connect_slots.acquire().await else {
            return out;
        };
        if *mode.borrow() == Mode::Close {
            return out;
        }
        // Connect latency counts from here: waiting for a slot is the generator's own queue.
        out.started_ns = sh.now_ns();
        sh.connector.connect(&account.auth()).await
    };
    let Connected {
        mut link,
        ping_every,
        node,
    } = match connected {
        Ok(c) => c,
        Err(e) => {
            sh.counters.connect_failed.fetch_add(1, Relaxed);
            sh.note_error("connect", format!("{e:#}"));
            return out;
        }
    };
    let at_ns = sh.now_ns();
    out.connected_ns = Some(at_ns);
    sh.counters.connected.fetch_add(1, Relaxed);
    let mut events = vec![Event::Connected {
        started_ns: out.started_ns,
        at_ns,
    }];
    sh.recorder
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .apply(&mut events);

    // Peers need no pings: a timer that never fires keeps one select! for both.
    let ping_every = ping_every.map_or(Duration::from_secs(86_400), |p| p.max(PING_INTERVAL_MIN));
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    let new_sender = |plan: SendPlan| Sender::new(plan, index);
    let (mut sender, mut pending_plan) = match plan {
        PlanOf::Start(plan) => (plan.map(new_sender), None),
        PlanOf::AfterConnect {
            node: node_tx,
            plan,
        } => {
            let _ = node_tx.send(node);
            (None, Some(plan))
        }
    };
    let mut acks: Vec<u64> = Vec::new();
    let mut ack_req = 0u32;
    let mut current = *mode.borrow_and_update();
    if let (Mode::Send { start }, Some(s)) = (current, sender.as_mut()) {
        s.start(start, &sh);
    }
    loop {
        if current == Mode::Close {
            break;
        }
        let sending =
            matches!(current, Mode::Send { .. }) && sender.as_ref().is_some_and(Sender::can_send);
        let due = sender.as_ref().map_or_else(never, |s| s.next_due);
        let step: Result<bool> = tokio::select! {
            biased;
            r = link.next() => match r {
                Ok(Some(first)) => {
                    let mut event = Some(first);
                    let mut result = Ok(true);
                    while let Some(e) = event {
                        handle(e, &sh, &mut sender, &mut acks, &mut events, &mut out, expect);
                        event = match link.buffered() {
                            Ok(e) => e,
                            Err(e) => {
                                result = Err(e);
                                None
                            }
                        };
                    }
                    if !events.is_empty() {
                        sh.recorder.lock().unwrap_or_else(|p| p.into_inner()).apply(&mut events);
                    }
                    if !acks.is_empty() {
                        ack_req = ack_req.wrapping_add(1);
                        if let Err(e) = link.push_acks(&acks, ACK_REQ_BIT | (ack_req & !ACK_REQ_BIT), ACK_SEQS_PER_FRAME) {
                            result = Err(e);
                        }
                        acks.clear();
                    }
                    if matches!(current, Mode::Send { .. }) {
                        if let Some(s) = sender.as_mut() {
                            if let Err(e) = s.push_due(&mut link, &sh) {
                                result = Err(e);
                            }
                        }
                    }
                    match result {
                        Ok(_) => link.flush().await.map(|_| true),
                        Err(e) => Err(e),
                    }
                }
                Ok(None) => {
                    sh.counters.closed_by_node.fetch_add(1, Relaxed);
                    sh.note_error("connection", "closed by the server");
                    Ok(false)
                }
                Err(e) => Err(e),
            },
            _ = tokio::time::sleep_until(due), if sending => {
                match sender.as_mut().map(|s| s.push_due(&mut link, &sh)) {
                    Some(Err(e)) => Err(e),
                    _ => link.flush().await.map(|_| true),
                }
            }
            _ = ping.tick() => {
                match link.push_ping(ACK_REQ_BIT, sh.now_ns()) {
                    Ok(()) => link.flush().await.map(|_| true),
                    Err(e) => Err(e),
                }
            }
            plan = plan_when_told(&mut pending_plan), if pending_plan.is_some() => {
                pending_plan = None;
                sender = plan.map(new_sender);
                if let (Mode::Send { start }, Some(s)) = (current, sender.as_mut()) {
                    s.start(start, &sh);
                }
                Ok(true)
            }
            changed = mode.changed() => {
                if changed.is_err() {
                    Ok(false)
                } else {
                    current = *mode.borrow_and_update();
                    if let Some(s) = sender.as_mut() {
                        match current {
                            Mode::Send { start } => s.start(start, &sh),
                            _ => s.stop(Instant::now(), &sh),
                        }
                    }
                    Ok(true)
                }
            }
        };
        match step {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                sh.counters.transport_errors.fetch_add(1, Relaxed);
                sh.note_error("connection", format!("{e:#}"));
                break;
            }
        }
    }
    if let Some(s) = sender.as_mut() {
        // Sending ended with the connection if it had not before.
        s.stop(Instant::now(), &sh);
        // Sends that will never be answered no longer count as in flight.
        sh.counters.inflight.fetch_sub(s.inflight as u64, Relaxed);
    }
    link.abort().await;
    out
}

/// The plan a [`PlanOf::AfterConnect`] device waits for (`None` if its sender went away);
/// never resolves without a receiver.
async fn plan_when_told(rx: &mut Option<oneshot::Receiver<Option<SendPlan>>>) -> Option<SendPlan> {
    match rx {
        Some(rx) => rx.await.ok().flatten(),
        None => std::future::pending().await,
    }
}

fn handle(
    e: Incoming,
    sh: &Shared,
    sender: &mut Option<Sender>,
    acks: &mut Vec<u64>,
    events: &mut Vec<Event>,
    out: &mut DeviceOutcome,
    expect: u64,
) {
    match e {
        Incoming::Message { body: b, ack } => {
            if let Some(a) = ack {
                acks.push(a);
            }
            let ours = b.len() >= BODY_HEADER_BYTES
                && u32::from_le_bytes([b[8], b[9], b[10], b[11]]) == sh.nonce;
            if !ours {
                sh.counters.stale.fetch_add(1, Relaxed);
                return;
            }
            let mut due = [0u8; 8];
            due.copy_from_slice(&b[..8]);
            let at_ns = sh.now_ns();
            events.push(Event::Delivered {
                due_ns: u64::from_le_bytes(due),
                at_ns,
            });
            sh.counters.delivered.fetch_add(1, Relaxed);
            out.delivered += 1;
            if out.first_delivery_ns.is_none() {
                out.first_delivery_ns = Some(at_ns);
            }
            if expect > 0 && out.delivered == expect {
                out.complete_ns = Some(at_ns);
                sh.counters.complete.fetch_add(1, Relaxed);
            }
        }
        Incoming::Receipt { ack } => {
            acks.push(ack);
            sh.counters.receipts.fetch_add(1, Relaxed);
        }
        Incoming::SendAck {
            ok,
            sent_ns,
            status,
        } => {
            if let Some(s) = sender.as_mut() {
                s.settle(sh);
            }
            if ok {
                sh.counters.acked_ok.fetch_add(1, Relaxed);
                events.push(Event::Acked {
                    sent_ns,
                    at_ns: sh.now_ns(),
                });
            } else {
                sh.counters.send_refused.fetch_add(1, Relaxed);
                sh.note_error("send", format!("SendAck {status}"));
            }
        }
        Incoming::Error { code, req, message } => {
            sh.counters.error_frames.fetch_add(1, Relaxed);
            sh.note_code(code);
            sh.note_error(
                "node",
                format!("{} (req {req}): {message}", error_name(code)),
            );
            if req != 0 && req & ACK_REQ_BIT == 0 {
                if let Some(s) = sender.as_mut() {
                    s.settle(sh);
                }
            }
        }
        Incoming::Other => {}
    }
}

/// Reports progress (`done` from `count`, errors) every [`PROGRESS_INTERVAL`] until `until`
/// returns true.
pub async fn report_progress(
    ctx: &WorkerCtx,
    sh: &Shared,
    count: impl Fn(&Shared) -> u64,
    until: impl Fn(&Shared) -> bool,
) {
    loop {
        ctx.progress(count(sh), sh.errors());
        if until(sh) {
            break;
        }
        tokio::time::sleep(PROGRESS_INTERVAL).await;
    }
}

/// Waits until every task in `tasks` is done and returns their outcomes.
pub async fn join_all(tasks: Vec<tokio::task::JoinHandle<DeviceOutcome>>) -> Vec<DeviceOutcome> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(o) = t.await {
            out.push(o);
        }
    }
    out
}

/// Interval of every time series, in milliseconds.
pub const SERIES_INTERVAL_MS: u64 = 1000;

/// The counter names a worker reports, summed by [`Merged::of`].
const COUNTERS: [&str; 17] = [
    "connected",
    "connect_failed",
    "sent",
    "acked_ok",
    "send_refused",
    "delivered",
    "delivered_in_window",
    "stale_delivered",
    "receipts",
    "closed_by_node",
    "transport_errors",
    "error_frames",
    "complete",
    "lost",
    "due_sent",
    "due_sent_late",
    "due_unsent",
];

/// Every worker's final report, merged exactly.
#[derive(Debug)]
pub struct Merged {
    pub sums: BTreeMap<String, u64>,
    pub error_codes: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    pub latency: Histogram<u64>,
    pub ack_latency: Histogram<u64>,
    pub connect_latency: Histogram<u64>,
    pub series: Vec<stats::SeriesPoint>,
}

impl Merged {
    pub fn of(datas: &[Value]) -> Result<Merged> {
        let mut sums = BTreeMap::new();
        for name in COUNTERS {
            let total = datas.iter().filter_map(|d| d.get(name)?.as_u64()).sum();
            sums.insert(name.to_string(), total);
        }
        let mut error_codes = BTreeMap::new();
        for d in datas {
            if let Some(codes) = d.get("error_codes").and_then(Value::as_object) {
                for (k, v) in codes {
                    *error_codes.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
                }
            }
        }
        let hist =
            |key: &str| stats::merge_encoded(datas.iter().filter_map(|d| d.get(key)?.as_str()));
        let series: Vec<Vec<IntervalReport>> = datas
            .iter()
            .map(|d| {
                serde_json::from_value(d.get("series").cloned().unwrap_or(Value::Null))
                    .unwrap_or_default()
            })
            .collect();
        Ok(Merged {
            sums,
            error_codes,
            first_error: datas
                .iter()
                .find_map(|d| d.get("first_error")?.as_str().map(str::to_string)),
            latency: hist("latency")?,
            ack_latency: hist("ack_latency")?,
            connect_latency: hist("connect_latency")?,
            series: stats::merge_series(&series, SERIES_INTERVAL_MS as f64 / 1000.0)?,
        })
    }

    pub fn get(&self, name: &str) -> u64 {
        self.sums.get(name).copied().unwrap_or(0)
    }

    /// Errors of every kind: failed connects, refused sends, connections the node closed,
    /// transport failures, `Error` frames, and messages acknowledged but never delivered.
    pub fn errors(&self) -> u64 {
        [
            "connect_failed",
            "send_refused",
            "closed_by_node",
            "transport_errors",
            "error_frames",
            "lost",
        ]
        .iter()
        .map(|k| self.get(k))
        .sum()
    }

    /// The error breakdown for the report.
    pub fn error_detail(&self) -> Value {
        json!({
            "connect_failed": self.get("connect_failed"),
            "send_refused": self.get("send_refused"),
            "closed_by_node": self.get("closed_by_node"),
            "transport_errors": self.get("transport_errors"),
            "error_frames": self.get("error_frames"),
            "lost": self.get("lost"),
            "error_codes": self.error_codes,
            "first_error": self.first_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadclient::peer::PeerProtocol;

    fn shared() -> Arc<Shared> {
        let connector = Connector::Peer {
            protocol: PeerProtocol::Mqtt,
            addr: "127.0.0.1:1".parse().unwrap(),
            source: None,
        };
        Shared::new(
            Arc::new(connector),
            1,
            SeriesOf::Deliveries,
            Duration::from_millis(SERIES_INTERVAL_MS),
        )
    }

    fn plan(interval: Option<Duration>, window: usize) -> SendPlan {
        SendPlan {
            to: vec![(2, 1)],
            interval,
            offset: Duration::ZERO,
            window,
            limit: None,
            msg_bytes: 64,
        }
    }

    /// An open-loop sender due every 1 ms over a 100 ms window gets only its window's worth
    /// (4) out before sending stops; the node answers none of them. Every one of the 100
    /// messages due must count in the latency histogram, the unsent ones as late by the end
    /// of sending, or p99 describes only the 4 that left in time.
    #[test]
    fn messages_due_but_never_sent_count_as_late() {
        let sh = shared();
        let start = Instant::now() + Duration::from_millis(10);
        let from_ns = sh.ns_of(start);
        let to_ns = from_ns + 100_000_000;
        sh.recorder
            .lock()
            .unwrap()
            .set_window(from_ns, from_ns, to_ns);
        let mut s = Sender::new(plan(Some(Duration::from_millis(1)), 4), 0);
        s.start(start, &sh);
        let end = start + Duration::from_millis(100);
        let mut dues = Vec::new();
        while let Some(due) = s.next_send(end, true, &sh) {
            dues.push(due);
        }
        assert_eq!(dues.len(), 4, "the window holds 4");
        // The 4 sent arrive at the end of sending.
        let mut events: Vec<Event> = dues
            .iter()
            .map(|&d| Event::Delivered {
                due_ns: sh.ns_of(d),
                at_ns: sh.ns_of(end),
            })
            .collect();
        sh.recorder.lock().unwrap().apply(&mut events);
        s.stop(end, &sh);

        let c = &sh.counters;
        assert_eq!(c.due_sent.load(Relaxed), 4);
        assert_eq!(c.due_sent_late.load(Relaxed), 4, "all left ≥ 96 ms late");
        assert_eq!(c.due_unsent.load(Relaxed), 96);
        let r = sh.recorder.lock().unwrap();
        assert_eq!(
            r.latency.len(),
            100,
            "every message due in the window counts"
        );
        // Due at 0..100 ms, all still waiting at 100 ms: latencies 1..=100 ms.
        let p99_ms = r.latency.value_at_quantile(0.99) as f64 / 1000.0;
        assert!((98.0..=100.1).contains(&p99_ms), "p99 {p99_ms} ms");
        let p50_ms = r.latency.value_at_quantile(0.5) as f64 / 1000.0;
        assert!((49.0..=51.0).contains(&p50_ms), "p50 {p50_ms} ms");
    }

    #[test]
    fn a_sender_on_schedule_leaves_nothing_unsent_and_stops_once() {
        let sh = shared();
        let start = Instant::now();
        let from_ns = sh.ns_of(start);
        sh.recorder
            .lock()
            .unwrap()
            .set_window(from_ns, from_ns, from_ns + 10_000_000);
        let mut s = Sender::new(plan(Some(Duration::from_millis(1)), 1000), 0);
        s.start(start, &sh);
        // Sent exactly on time, each at its due time.
        for k in 0..10 {
            let now = start + Duration::from_millis(k);
            assert!(s.next_send(now, true, &sh).is_some(), "send {k}");
            assert!(s.next_send(now, true, &sh).is_none(), "one per interval");
        }
        s.stop(start + Duration::from_millis(10), &sh);
        s.stop(start + Duration::from_millis(50), &sh);
        let c = &sh.counters;
        assert_eq!(c.due_sent.load(Relaxed), 10);
        assert_eq!(c.due_sent_late.load(Relaxed), 0);
        assert_eq!(c.due_unsent.load(Relaxed), 0);
        assert!(sh.recorder.lock().unwrap().latency.is_empty());
    }

    #[test]
    fn saturating_senders_have_no_schedule_to_miss() {
        let sh = shared();
        let mut s = Sender::new(plan(None, 2), 0);
        let start = Instant::now();
        s.start(start, &sh);
        let now = start + Duration::from_millis(5);
        assert_eq!(s.next_send(now, true, &sh), Some(now));
        assert_eq!(s.next_send(now, true, &sh), Some(now));
        assert_eq!(s.next_send(now, true, &sh), None, "window full");
        s.stop(now + Duration::from_secs(1), &sh);
        assert_eq!(sh.counters.due_unsent.load(Relaxed), 0);
        assert_eq!(sh.counters.due_sent.load(Relaxed), 0);
        assert!(sh.recorder.lock().unwrap().latency.is_empty());
    }

    #[test]
    fn unsent_are_those_due_in_the_window_before_the_stop_within_the_limit() {
        let window = (100, 200);
        let all: Vec<u64> = unsent_latencies_us(50, 10, window, 1_000_150, u64::MAX).collect();
        // Due at 100, 110, ..., 190: ten of them.
        assert_eq!(all.len(), 10);
        assert_eq!(all[0], (1_000_150 - 100) / 1000);
        // Stopped at 150 (connection lost): only those due before then.
        assert_eq!(
            unsent_latencies_us(50, 10, window, 150, u64::MAX).count(),
            5
        );
        // The plan's limit allows 8 more from 50: due 50..=120, of which 100..=120 count.
        assert_eq!(unsent_latencies_us(50, 10, window, 1_000_150, 8).count(), 3);
        assert_eq!(
            unsent_latencies_us(250, 10, window, 1_000_150, 8).count(),
            0
        );
    }
}
