//! `million`'s worker: devices connect and authenticate over `ws://` as in `idle`, then each
//! connection leaves tokio. Its socket goes to the worker's holder thread, which keeps it as a
//! bare file descriptor: no task, no buffer, no reactor registration. That is what lets one
//! machine hold a million connections with both ends on it (the kernel already spends ~5 KiB
//! per socket, twice per connection).
//!
//! The holder thread keeps every connection alive the way a phone would: it visits each one
//! once per `0.9 × Welcome.ping_interval_ms` and writes one protocol `Ping`, and it reads (and
//! drops) what arrives within a keepalive tick of its arrival: each connection is in an epoll
//! set (edge-triggered, about 200 bytes of kernel memory), polled every tick without waiting.
//! Bytes left unread for a ping interval would cost the kernel a page per socket (it charges
//! queued data in whole pages against `net.ipv4.tcp_mem`): with a million held, 682,872 pages
//! (2.6 GiB), over a 24 GiB host's default limit.
//!
//! At the parent's word it checks that every connection still answers a `Ping`
//! ([`check_pings`]) and sends messages between random pairs of its connections, counting the
//! `SendAck`s and `Deliver`s that come back ([`messages`]). While a phase waits for answers
//! it sleeps in `epoll_wait` and decodes only the connections the phase watches that have
//! something new, so 63 generator processes waiting on 10,000 answers cost the host's two
//! cores nothing between arrivals (an earlier version re-read every watched connection every
//! 2 ms, and starved the nodes it measured).

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use rand::Rng;
use ringpost_wire::limits::FRAME_BYTES_MAX;
use ringpost_wire::ws::{self, Decoder, Message, OpCode, Role};
use ringpost_wire::{Body, DeliverAck, DeviceCiphertext, Frame, Ping, Pong};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{oneshot, Semaphore};

use crate::accounts::Account;
use crate::loadclient::Connector;
use crate::stats::{self, Percentiles};
use crate::worker::{WorkerCtx, PROGRESS_INTERVAL};

/// What a `million` worker needs beyond its accounts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// Messages this worker sends between random pairs of its connections at the end.
    pub messages: usize,
    /// How long the ping check and the messages wait for their answers.
    pub answer_timeout_ms: u64,
    /// Connections this worker drops at the end, queues a message to each while it is away,
    /// and reconnects all at once (the reconnect storm); 0: none.
    #[serde(default)]
    pub storm: usize,
}

/// Phase names, in order: the first half connected, all connected, the ping check done.
pub const HALF: &str = "half";
pub const CONNECTED: &str = "connected";
pub const PINGED: &str = "pinged";
/// The storm's devices are away and a message is queued to each.
pub const STORM_QUEUED: &str = "storm_queued";

/// How often the holder thread wakes to keep connections alive: each tick visits the share of
/// connections due in it, so pings are spread evenly over the interval.
const KEEPALIVE_TICK: Duration = Duration::from_millis(50);

/// A connection is pinged this fraction of `Welcome.ping_interval_ms` after the last time, so a
/// late tick never lets it reach the interval.
const PING_EARLY: f64 = 0.9;

/// Bytes read at once from a held connection.
const READ_CHUNK: usize = 4096;

/// Readiness events taken from the epoll set at once.
const EPOLL_EVENTS: usize = 1024;

/// Sends written before the holder reads answers, so a burst stays within the sockets'
/// buffers and the node's per-connection budgets.
const SEND_BATCH: usize = 2000;

/// Storm messages a worker has unanswered at once while it queues them (63 workers: ~2,000
/// in the cluster at a time). Each is stored and replicated before its `SendAck`; sent all at
/// once, 100,000 of them kept writes waiting on their replicas past the ack timeout on this
/// host, and the replicas left behind were still being caught up when the storm began.
const STORM_SEND_WINDOW: usize = 32;

/// The body of a bench message: this tag, then the pair's index.
const BODY_TAG: &[u8; 8] = b"rp-1m-v1";

/// While the storm's devices reconnect (each one a command), the longest the holder waits for
/// the next command before it reads what arrived for those already back.
const STORM_POLL: Duration = Duration::from_millis(2);

/// One held connection.
struct Held {
    sock: TcpStream,
    /// Index of its account in the worker's list.
    account: u32,
}

/// What the async side asks of the holder thread.
enum Cmd {
    /// A connection, with the bytes read past its `Welcome`.
    Add(Held, BytesMut),
    CheckPings {
        timeout: Duration,
        reply: oneshot::Sender<Value>,
    },
    Messages {
        count: usize,
        timeout: Duration,
        reply: oneshot::Sender<Value>,
    },
    /// Drop `count` connections and queue a message to each of their devices.
    StormDown {
        count: usize,
        timeout: Duration,
        reply: oneshot::Sender<(Vec<usize>, Value)>,
    },
    /// The storm's reconnections start now.
    StormStart(Instant),
    /// Wait until every storm device got its message.
    StormWait {
        timeout: Duration,
        reply: oneshot::Sender<Value>,
    },
}

/// The reconnect storm, as the holder tracks it.
struct Storm {
    nonce: u64,
    /// Storm message index of each storm device's account.
    of_account: HashMap<u32, usize>,
    delivered: Vec<bool>,
    /// Connections that reconnected and have not received their message yet.
    waiting: HashSet<usize>,
    started: Option<Instant>,
    last_delivery: Duration,
    stray: u64,
}

/// The holder thread's counters, read by the async side for reports.
#[derive(Default)]
struct HolderStats {
    pings: AtomicU64,
    ping_writes_failed: AtomicU64,
    closed_by_node: AtomicU64,
    bytes_read: AtomicU64,
}

pub async fn worker(ctx: &mut WorkerCtx, spec: Spec) -> Result<Value> {
    let Connector::Ringpost(dialer) = &*ctx.connector else {
        bail!("million runs Ringpost's lean client only");
    };
    if dialer.transport != crate::loadclient::Transport::Ws {
        bail!("million holds plain ws:// connections only");
    }
    let accounts: Arc<Vec<Account>> = Arc::new(ctx.accounts.clone());
    let stats = Arc::new(HolderStats::default());
    let (cmd_tx, cmd_rx) = std_mpsc::channel::<Cmd>();
    let ping_every = Arc::new(AtomicU64::new(0));
    let holder = {
        let (accounts, stats, ping_every) = (accounts.clone(), stats.clone(), ping_every.clone());
        std::thread::Builder::new()
            .name("holder".into())
            .spawn(move || holder_main(cmd_rx, accounts, stats, ping_every))?
    };
    let n = accounts.len();
    let half = n / 2;
    let mut connect = Connecting::default();
    connect
        .run(ctx, &accounts, 0..half, &cmd_tx, &ping_every)
        .await;
    ctx.phase(HALF, json!({ "connected": connect.connected }))
        .await?;
    connect
        .run(ctx, &accounts, half..n, &cmd_tx, &ping_every)
        .await;
    ctx.phase(
        CONNECTED,
        json!({
            "connected": connect.connected,
            "failed": connect.failed,
            "first_error": connect.first_error,
            "leftover_bytes": connect.leftover_bytes,
            "connect_latency": stats::encode(&connect.latency)?,
        }),
    )
    .await?;
    // Holding: the thread pings on its own until the parent says the hold is over.
    let (tx, rx) = oneshot::channel();
    cmd_tx
        .send(Cmd::CheckPings {
            timeout: Duration::from_millis(spec.answer_timeout_ms),
            reply: tx,
        })
        .map_err(|_| anyhow!("the holder thread ended"))?;
    let pinged = rx.await.map_err(|_| anyhow!("the holder thread ended"))?;
    let keepalive = json!({
        "pings": stats.pings.load(Relaxed),
        "ping_writes_failed": stats.ping_writes_failed.load(Relaxed),
        "closed_by_node": stats.closed_by_node.load(Relaxed),
        "bytes_read": stats.bytes_read.load(Relaxed),
    });
    ctx.phase(PINGED, json!({ "check": pinged, "keepalive": keepalive }))
        .await?;
    let (tx, rx) = oneshot::channel();
    cmd_tx
        .send(Cmd::Messages {
            count: spec.messages,
            timeout: Duration::from_millis(spec.answer_timeout_ms),
            reply: tx,
        })
        .map_err(|_| anyhow!("the holder thread ended"))?;
    let messages = rx.await.map_err(|_| anyhow!("the holder thread ended"))?;
    let storm = if spec.storm > 0 {
        let timeout = Duration::from_millis(spec.answer_timeout_ms);
        let (tx, rx) = oneshot::channel();
        cmd_tx
            .send(Cmd::StormDown {
                count: spec.storm,
                timeout,
                reply: tx,
            })
            .map_err(|_| anyhow!("the holder thread ended"))?;
        let (away, queued) = rx.await.map_err(|_| anyhow!("the holder thread ended"))?;
        ctx.phase(STORM_QUEUED, queued.clone()).await?;
        // Every worker starts here at the parent's word: all the devices come back at once.
        let t0 = Instant::now();
        cmd_tx
            .send(Cmd::StormStart(t0))
            .map_err(|_| anyhow!("the holder thread ended"))?;
        let mut back = Connecting::default();
        back.run(ctx, &accounts, away, &cmd_tx, &ping_every).await;
        let all_connected_s = t0.elapsed().as_secs_f64();
        let (tx, rx) = oneshot::channel();
        cmd_tx
            .send(Cmd::StormWait { timeout, reply: tx })
            .map_err(|_| anyhow!("the holder thread ended"))?;
        let waited = rx.await.map_err(|_| anyhow!("the holder thread ended"))?;
        json!({
            "queued": queued,
            "reconnected": back.connected,
            "reconnect_failed": back.failed,
            "first_error": back.first_error,
            "all_connected_s": all_connected_s,
            "connect_latency": stats::encode(&back.latency)?,
            "delivered": waited,
        })
    } else {
        Value::Null
    };
    // Closing the channel ends the thread, which drops (resets) every connection.
    drop(cmd_tx);
    let _ = tokio::task::spawn_blocking(move || holder.join()).await;
    Ok(json!({ "messages": messages, "storm": storm }))
}

/// The connect phases' tallies.
struct Connecting {
    connected: u64,
    failed: u64,
    first_error: Option<String>,
    leftover_bytes: u64,
    latency: Histogram<u64>,
}

impl Default for Connecting {
    fn default() -> Self {
        Connecting {
            connected: 0,
            failed: 0,
            first_error: None,
            leftover_bytes: 0,
            latency: stats::new_histogram(),
        }
    }
}

impl Connecting {
    /// Connects and authenticates the accounts at `indices` (at most `connect_concurrency`
    /// at once), handing each connection to the holder thread as soon as it is welcomed.
    async fn run(
        &mut self,
        ctx: &WorkerCtx,
        accounts: &Arc<Vec<Account>>,
        indices: impl IntoIterator<Item = usize>,
        cmd_tx: &std_mpsc::Sender<Cmd>,
        ping_every: &Arc<AtomicU64>,
    ) {
        let slots = Arc::new(Semaphore::new(ctx.spec.connect_concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for i in indices {
            let (connector, accounts, slots) =
                (ctx.connector.clone(), accounts.clone(), slots.clone());
            tasks.spawn(async move {
                let _permit = slots.acquire_owned().await?;
                let Connector::Ringpost(dialer) = &*connector else {
                    bail!("not a Ringpost connector");
                };
                let t = Instant::now();
                let (conn, welcome) = dialer.connect_device(&accounts[i].auth()).await?;
                let us = t.elapsed().as_micros().min(u64::MAX as u128) as u64;
                let (sock, leftover) = conn
                    .into_std_tcp()
                    .ok_or_else(|| anyhow!("the connection is not plain TCP"))?;
                Ok((i, sock, leftover, us, welcome.ping_interval_ms))
            });
        }
        let mut last = Instant::now();
        while let Some(r) = tasks.join_next().await {
            match r.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok((i, sock, leftover, us, ping_ms)) => {
                    ping_every.store(u64::from(ping_ms), Relaxed);
                    self.leftover_bytes += leftover.len() as u64;
                    stats::record_us(&mut self.latency, us);
                    let held = Held {
                        sock,
                        account: i as u32,
                    };
                    if cmd_tx.send(Cmd::Add(held, leftover)).is_ok() {
                        self.connected += 1;
                    } else {
                        self.failed += 1;
                    }
                }
                Err(e) => {
                    self.failed += 1;
                    self.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
            if last.elapsed() >= PROGRESS_INTERVAL {
                ctx.progress(self.connected, self.failed);
                last = Instant::now();
            }
        }
        ctx.progress(self.connected, self.failed);
    }
}

/// The holder thread: owns every connection of the worker until the command channel closes.
fn holder_main(
    cmds: std_mpsc::Receiver<Cmd>,
    accounts: Arc<Vec<Account>>,
    stats: Arc<HolderStats>,
    ping_every: Arc<AtomicU64>,
) {
    let now = Instant::now();
    let mut h = Holder {
        // Without it (an exotic kernel) arrivals are read at each connection's next visit,
        // and the connections a phase watches are read at every poll.
        epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).ok(),
        conns: Vec::new(),
        accounts,
        stats,
        ping_every,
        last_tick: now,
        next_tick: now + KEEPALIVE_TICK,
        cursor: 0,
        carry: 0.0,
        masks: 0x9e37_79b9_7f4a_7c15,
        buf: vec![0u8; READ_CHUNK],
        watched: HashMap::new(),
        ready: Vec::new(),
        storm: None,
    };
    loop {
        let mut wait = h.next_tick.saturating_duration_since(Instant::now());
        if h.storm.as_ref().is_some_and(|s| !s.waiting.is_empty()) {
            // Reconnections keep arriving as commands: between them, the storm's devices are
            // read as soon as something arrives for them.
            wait = wait.min(STORM_POLL);
            h.poll(Duration::ZERO);
            h.storm_poll();
        }
        match cmds.recv_timeout(wait) {
            Ok(Cmd::Add(held, leftover)) => h.add(held, leftover),
            Ok(Cmd::StormDown {
                count,
                timeout,
                reply,
            }) => {
                let _ = reply.send(h.storm_down(count, timeout));
            }
            Ok(Cmd::StormStart(t0)) => {
                if let Some(storm) = h.storm.as_mut() {
                    storm.started = Some(t0);
                }
            }
            Ok(Cmd::StormWait { timeout, reply }) => {
                let _ = reply.send(h.storm_wait(timeout));
            }
            Ok(Cmd::CheckPings { timeout, reply }) => {
                let _ = reply.send(h.check_pings(timeout));
            }
            Ok(Cmd::Messages {
                count,
                timeout,
                reply,
            }) => {
                let _ = reply.send(h.messages(count, timeout));
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                h.poll(Duration::ZERO);
                h.tick_if_due();
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// What one read of a held connection found.
enum Drained {
    /// Bytes were read (possibly none); the connection is open.
    Open,
    /// The node closed it (or it failed).
    Closed,
}

struct Holder {
    /// Every held connection, edge-triggered, with its index as the event's data.
    epoll: Option<Epoll>,
    conns: Vec<Option<Held>>,
    accounts: Arc<Vec<Account>>,
    stats: Arc<HolderStats>,
    /// `Welcome.ping_interval_ms` (0 until the first connection is welcomed).
    ping_every: Arc<AtomicU64>,
    last_tick: Instant,
    next_tick: Instant,
    /// The next connection the keepalive visits.
    cursor: usize,
    /// Fractional visits owed from earlier ticks.
    carry: f64,
    /// Masking-key generator state (RFC 6455 wants keys to vary; they need not be secret here).
    masks: u64,
    buf: Vec<u8>,
    /// The connections whose frames a phase reads (the rest are read and dropped), with the
    /// bytes read and not yet decoded.
    watched: HashMap<usize, BytesMut>,
    /// Watched connections that read something since the phase last looked (or were just
    /// added with bytes read past their `Welcome`). May repeat; [`Holder::take_ready`] dedups.
    ready: Vec<usize>,
    storm: Option<Storm>,
}

impl Holder {
    /// Takes a connection; one the storm waits for is watched for its message.
    fn add(&mut self, held: Held, leftover: BytesMut) {
        let i = self.conns.len();
        let awaited = self
            .storm
            .as_mut()
            .filter(|s| s.of_account.contains_key(&held.account));
        if let Some(storm) = awaited {
            storm.waiting.insert(i);
            self.watched.insert(i, leftover);
            // The leftover may hold its message already.
            self.ready.push(i);
        }
        if let Some(epoll) = &self.epoll {
            let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
            // Adding reports bytes that arrived before it. Not in the set: read at its
            // visits only.
            let _ = epoll.add(&held.sock, EpollEvent::new(flags, i as u64));
        }
        self.conns.push(Some(held));
    }

    /// From now on the frames connection `i` receives are kept for the phase to read.
    fn watch(&mut self, i: usize) {
        self.watched.entry(i).or_default();
    }

    fn unwatch(&mut self, i: usize) {
        self.watched.remove(&i);
    }

    /// Reads what arrived, waiting up to `timeout` for the first arrival (whole milliseconds,
    /// rounded up): an unwatched connection's bytes are dropped, a watched one's are kept and
    /// it joins `ready`.
    fn poll(&mut self, timeout: Duration) {
        let Some(epoll) = &self.epoll else {
            nap(timeout);
            let watched: Vec<usize> = self.watched.keys().copied().collect();
            for i in watched {
                self.read(i);
            }
            return;
        };
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128);
        let mut wait = EpollTimeout::try_from(ms).unwrap_or(EpollTimeout::MAX);
        let mut events = [EpollEvent::empty(); EPOLL_EVENTS];
        let mut arrived = Vec::new();
        loop {
            // Interrupted: whatever is ready is still reported at the next poll.
            let n = epoll.wait(&mut events, wait).unwrap_or(0);
            wait = EpollTimeout::ZERO;
            arrived.extend(events[..n].iter().map(|e| e.data() as usize));
            if n < events.len() {
                break;
            }
        }
        for i in arrived {
            self.read(i);
        }
    }

    /// Reads everything connection `i` has (edge-triggered readiness needs that): kept if it
    /// is watched, dropped if not.
    fn read(&mut self, i: usize) {
        let Some(held) = self.conns.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        let keep = self.watched.get_mut(&i);
        let watched = keep.is_some();
        if let Drained::Closed = drain(&mut held.sock, &mut self.buf, keep, &self.stats) {
            self.stats.closed_by_node.fetch_add(1, Relaxed);
            self.conns[i] = None;
        }
        if watched {
            self.ready.push(i);
        }
    }

    /// The watched connections that read something (or closed) since the last call.
    fn take_ready(&mut self) -> Vec<usize> {
        let mut ready = std::mem::take(&mut self.ready);
        ready.sort_unstable();
        ready.dedup();
        ready
    }

    /// The frames complete in watched connection `i`'s bytes.
    fn frames_of(&mut self, i: usize) -> Vec<Frame> {
        self.watched.get_mut(&i).map(frames).unwrap_or_default()
    }

    /// Runs the keepalive if its tick is due. Phases that wait call it, so a long phase
    /// leaves no connection unpinged.
    fn tick_if_due(&mut self) {
        let now = Instant::now();
        if now < self.next_tick {
            return;
        }
        let interval_ms = self.ping_every.load(Relaxed);
        if interval_ms > 0 {
            let every = Duration::from_millis(interval_ms).mul_f64(PING_EARLY);
            self.keepalive_tick(every, now - self.last_tick);
        }
        self.last_tick = now;
        self.next_tick += KEEPALIVE_TICK;
        if self.next_tick < now {
            // Behind (a long step ran): the missed ticks' visits are owed (`carry`), not
            // their wake-ups.
            self.next_tick = now + KEEPALIVE_TICK;
        }
    }

    /// Drops `count` random open connections (a reset each), then has other open connections
    /// send a message to each of their devices, waiting up to `timeout` for every `SendAck`.
    /// Returns the dropped devices' account indices and what happened.
    fn storm_down(&mut self, count: usize, timeout: Duration) -> (Vec<usize>, Value) {
        let mut open: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].is_some())
            .collect();
        let mut rng = rand::thread_rng();
        let count = count.min(open.len().saturating_sub(1));
        let mut away = Vec::with_capacity(count);
        for _ in 0..count {
            let at = rng.gen_range(0..open.len());
            let i = open.swap_remove(at);
            let held = self.conns[i].take().expect("open");
            self.unwatch(i);
            away.push(held.account as usize);
            // Linger 0 was set when it connected: this is a reset, as a phone losing its
            // network looks to the node once it notices.
            drop(held);
        }
        let nonce: u64 = rand::random();
        let mut of_account = HashMap::with_capacity(count);
        let mut acked = vec![false; count];
        let (mut refused, mut write_failed) = (0u64, 0u64);
        let mut first_refusal = None;
        let mut senders = Vec::new();
        let t0 = Instant::now();
        // At most STORM_SEND_WINDOW unanswered at once: the next send goes out as an answer
        // comes back, so the cluster stores the burst at its own pace.
        let (mut next, mut in_flight) = (0usize, 0usize);
        while (next < count || in_flight > 0) && t0.elapsed() < timeout {
            while next < count && in_flight < STORM_SEND_WINDOW {
                let k = next;
                next += 1;
                let to = self.accounts[away[k]].clone();
                of_account.insert(away[k] as u32, k);
                let from = open[rng.gen_range(0..open.len())];
                let bytes = self.message_to(&to, nonce, k, k as u32 + 1);
                self.watch(from);
                senders.push(from);
                let Some(held) = self.conns[from].as_mut() else {
                    write_failed += 1;
                    acked[k] = true; // not waited for
                    continue;
                };
                if write_all_nonblocking(&mut held.sock, &bytes, Duration::from_secs(5)) {
                    in_flight += 1;
                } else {
                    write_failed += 1;
                    acked[k] = true;
                }
            }
            self.poll(timeout.saturating_sub(t0.elapsed()).min(KEEPALIVE_TICK));
            self.tick_if_due();
            for i in self.take_ready() {
                for frame in self.frames_of(i) {
                    let req = frame.req as usize;
                    if !(1..=next).contains(&req) || acked[req - 1] {
                        continue;
                    }
                    let refusal = match frame.body {
                        Body::SendAck(a) if a.status == ringpost_wire::SendStatus::Ok => None,
                        Body::SendAck(a) => Some(format!("{:?}", a.status)),
                        Body::Error(e) => Some(format!("{:?}: {}", e.code, e.message)),
                        _ => continue,
                    };
                    acked[req - 1] = true;
                    in_flight -= 1;
                    if let Some(r) = refusal {
                        refused += 1;
                        first_refusal.get_or_insert(r);
                    }
                }
            }
        }
        for i in senders {
            self.unwatch(i);
        }
        self.ready.clear();
        let queued = acked.iter().filter(|&&a| a).count() as u64 - refused - write_failed;
        self.storm = Some(Storm {
            nonce,
            of_account,
            delivered: vec![false; count],
            waiting: HashSet::new(),
            started: None,
            last_delivery: Duration::ZERO,
            stray: 0,
        });
        let report = json!({
            "away": count as u64,
            "queued": queued,
            "refused": refused,
            "first_refusal": first_refusal,
            "write_failed": write_failed,
            "queue_s": t0.elapsed().as_secs_f64(),
        });
        (away, report)
    }

    /// Reads what the storm's reconnected devices received since the last call: each
    /// `Deliver` is acknowledged, and the storm's message marks its device done.
    fn storm_poll(&mut self) {
        let Some(mut storm) = self.storm.take() else {
            return;
        };
        for i in self.take_ready() {
            if !storm.waiting.contains(&i) {
                continue;
            }
            let mut seqs = Vec::new();
            let mut done = false;
            for frame in self.frames_of(i) {
                if let Body::Deliver(d) = frame.body {
                    seqs.push(d.seq);
                    match parse_body(&d.body, storm.nonce) {
                        Some(k) if k < storm.delivered.len() => {
                            if !storm.delivered[k] {
                                storm.delivered[k] = true;
                                if let Some(t0) = storm.started {
                                    storm.last_delivery = t0.elapsed();
                                }
                            }
                            done = true;
                        }
                        _ => storm.stray += 1,
                    }
                }
            }
            if !seqs.is_empty() {
                let ack = self.ws_message(&Frame::new(0, DeliverAck { seqs }));
                if let Some(held) = self.conns[i].as_mut() {
                    let _ = write_all_nonblocking(&mut held.sock, &ack, Duration::from_secs(5));
                }
            }
            if done || self.conns[i].is_none() {
                storm.waiting.remove(&i);
                self.unwatch(i);
            }
        }
        self.storm = Some(storm);
    }

    /// Waits up to `timeout` for every storm device that reconnected to get its message.
    fn storm_wait(&mut self, timeout: Duration) -> Value {
        let t0 = Instant::now();
        while self.storm.as_ref().is_some_and(|s| !s.waiting.is_empty()) && t0.elapsed() < timeout {
            self.poll(timeout.saturating_sub(t0.elapsed()).min(KEEPALIVE_TICK));
            self.tick_if_due();
            self.storm_poll();
        }
        let Some(storm) = self.storm.as_ref() else {
            return Value::Null;
        };
        json!({
            "delivered": storm.delivered.iter().filter(|&&d| d).count() as u64,
            "still_waiting": storm.waiting.len() as u64,
            "last_delivery_s": storm.last_delivery.as_secs_f64(),
            "stray_deliveries": storm.stray,
        })
    }

    /// A bench message to `to`: one ciphertext for its device, `k` in the body and msg_id.
    fn message_to(&mut self, to: &Account, nonce: u64, k: usize, req: u32) -> Vec<u8> {
        let mut body = BODY_TAG.to_vec();
        body.extend_from_slice(&nonce.to_le_bytes());
        body.extend_from_slice(&(k as u64).to_le_bytes());
        let mut msg_id = [0u8; 16];
        msg_id[..8].copy_from_slice(&nonce.to_le_bytes());
        msg_id[8..].copy_from_slice(&(k as u64).to_le_bytes());
        let send = ringpost_wire::Send {
            msg_id,
            to: to.user,
            ciphertexts: vec![DeviceCiphertext {
                user: to.user,
                device: to.device,
                body: Bytes::from(body),
            }],
        };
        self.ws_message(&Frame::new(req, send))
    }

    fn next_mask(&mut self) -> [u8; 4] {
        crate::loadclient::ws::next_mask(&mut self.masks)
    }

    /// `frame` as one masked WebSocket binary message.
    fn ws_message(&mut self, frame: &Frame) -> Vec<u8> {
        let encoded = frame.encode().expect("bench frames encode");
        let mut out = BytesMut::with_capacity(encoded.len() + 14);
        let mask = self.next_mask();
        ws::encode_frame(OpCode::Binary, &encoded, Some(mask), &mut out);
        out.to_vec()
    }

    /// Visits the connections due for `elapsed` since the last tick: with `n` connections and
    /// interval `every`, `n × elapsed / every` of them (at most one round), in a round.
    fn keepalive_tick(&mut self, every: Duration, elapsed: Duration) {
        let n = self.conns.len();
        if n == 0 {
            return;
        }
        let share = elapsed.as_secs_f64() / every.as_secs_f64().max(1e-3);
        self.carry = (self.carry + n as f64 * share).min(n as f64);
        let visits = self.carry.floor() as usize;
        self.carry -= visits as f64;
        let ping = self.ws_message(&Frame::new(0, Ping { nonce: 0 }));
        for _ in 0..visits {
            let i = self.cursor % n;
            self.cursor = (self.cursor + 1) % n;
            self.read(i);
            let Some(held) = self.conns[i].as_mut() else {
                continue;
            };
            match held.sock.write(&ping) {
                Ok(k) if k == ping.len() => {
                    self.stats.pings.fetch_add(1, Relaxed);
                }
                _ => {
                    self.stats.ping_writes_failed.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Pings every connection with one nonce and waits up to `timeout` for each `Pong`.
    fn check_pings(&mut self, timeout: Duration) -> Value {
        let nonce: u64 = rand::random();
        let ping = self.ws_message(&Frame::new(7, Ping { nonce }));
        let mut pending: HashSet<usize> = HashSet::new();
        let mut write_failed = 0u64;
        let mut closed = 0u64;
        for i in 0..self.conns.len() {
            if self.conns[i].is_none() {
                continue;
            }
            // What came before is dropped (a keepalive `Pong`); what comes after is kept.
            self.read(i);
            let Some(held) = self.conns[i].as_mut() else {
                closed += 1;
                continue;
            };
            self.watched.insert(i, BytesMut::new());
            match held.sock.write(&ping) {
                Ok(k) if k == ping.len() => {
                    pending.insert(i);
                }
                _ => {
                    write_failed += 1;
                    self.unwatch(i);
                }
            }
        }
        let asked = pending.len() as u64 + write_failed;
        let t0 = Instant::now();
        let mut answered = 0u64;
        let mut latest_answer = Duration::ZERO;
        while !pending.is_empty() && t0.elapsed() < timeout {
            self.poll(timeout.saturating_sub(t0.elapsed()).min(KEEPALIVE_TICK));
            self.tick_if_due();
            for i in self.take_ready() {
                if !pending.contains(&i) {
                    continue;
                }
                let got = self
                    .frames_of(i)
                    .iter()
                    .any(|f| matches!(f.body, Body::Pong(Pong { nonce: n }) if n == nonce));
                if got {
                    answered += 1;
                    latest_answer = t0.elapsed();
                } else if self.conns[i].is_some() {
                    continue;
                } else {
                    closed += 1;
                }
                pending.remove(&i);
                self.unwatch(i);
            }
        }
        for &i in &pending {
            self.unwatch(i);
        }
        self.ready.clear();
        json!({
            "held": self.conns.iter().filter(|c| c.is_some()).count() as u64,
            "asked": asked,
            "answered": answered,
            "unanswered": pending.len() as u64,
            "write_failed": write_failed,
            "closed": closed,
            "last_answer_ms": latest_answer.as_secs_f64() * 1000.0,
        })
    }

    /// Sends `count` messages, each between a random pair of distinct open connections, and
    /// waits up to `timeout` for every `SendAck` at the sender and `Deliver` at the recipient
    /// (acknowledged at once).
    fn messages(&mut self, count: usize, timeout: Duration) -> Value {
        let open: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].is_some())
            .collect();
        if open.len() < 2 || count == 0 {
            return json!({ "sent": 0, "requested": count, "open": open.len() });
        }
        let mut rng = rand::thread_rng();
        let pairs: Vec<(usize, usize)> = (0..count)
            .map(|_| loop {
                let a = open[rng.gen_range(0..open.len())];
                let b = open[rng.gen_range(0..open.len())];
                if a != b {
                    break (a, b);
                }
            })
            .collect();
        let nonce: u64 = rand::random();
        let mut sent_at: Vec<Option<Instant>> = vec![None; count];
        let mut acked = vec![false; count];
        let mut delivered = vec![false; count];
        let mut latency = stats::new_histogram();
        let (mut refused, mut duplicates, mut write_failed, mut stray) = (0u64, 0u64, 0u64, 0u64);
        let mut first_refusal: Option<String> = None;
        let t0 = Instant::now();
        for batch in (0..count).collect::<Vec<_>>().chunks(SEND_BATCH) {
            // Send a batch, then read until it settles (or the time runs out).
            for &k in batch {
                let (a, b) = pairs[k];
                self.watch(a);
                self.watch(b);
                let Some(to) = self.conns[b].as_ref().map(|h| h.account as usize) else {
                    continue; // closed by the node since: not sent
                };
                let to = self.accounts[to].clone();
                let bytes = self.message_to(&to, nonce, k, k as u32 + 1);
                let Some(held) = self.conns[a].as_mut() else {
                    continue;
                };
                if write_all_nonblocking(&mut held.sock, &bytes, Duration::from_secs(5)) {
                    sent_at[k] = Some(Instant::now());
                } else {
                    write_failed += 1;
                }
            }
            let settled = |acked: &[bool], delivered: &[bool]| {
                batch
                    .iter()
                    .all(|&k| sent_at[k].is_none() || (acked[k] && delivered[k]))
            };
            while !settled(&acked, &delivered) && t0.elapsed() < timeout {
                self.poll(timeout.saturating_sub(t0.elapsed()).min(KEEPALIVE_TICK));
                self.tick_if_due();
                for i in self.take_ready() {
                    let mut seqs = Vec::new();
                    for frame in self.frames_of(i) {
                        let req = frame.req as usize;
                        match frame.body {
                            Body::SendAck(a) if (1..=count).contains(&req) => {
                                if a.status == ringpost_wire::SendStatus::Ok {
                                    acked[req - 1] = true;
                                } else {
                                    refused += 1;
                                    first_refusal.get_or_insert_with(|| format!("{:?}", a.status));
                                }
                            }
                            Body::Error(e) if (1..=count).contains(&req) => {
                                refused += 1;
                                first_refusal
                                    .get_or_insert_with(|| format!("{:?}: {}", e.code, e.message));
                            }
                            Body::Deliver(d) => {
                                seqs.push(d.seq);
                                match parse_body(&d.body, nonce) {
                                    Some(k) if k < count && pairs[k].1 == i => {
                                        if delivered[k] {
                                            duplicates += 1;
                                        } else {
                                            delivered[k] = true;
                                            if let Some(s) = sent_at[k] {
                                                let us = s.elapsed().as_micros() as u64;
                                                stats::record_us(&mut latency, us);
                                            }
                                        }
                                    }
                                    _ => stray += 1,
                                }
                            }
                            _ => {}
                        }
                    }
                    if !seqs.is_empty() {
                        let ack = self.ws_message(&Frame::new(0, DeliverAck { seqs }));
                        if let Some(held) = self.conns[i].as_mut() {
                            let _ =
                                write_all_nonblocking(&mut held.sock, &ack, Duration::from_secs(5));
                        }
                    }
                }
            }
        }
        for &(a, b) in &pairs {
            self.unwatch(a);
            self.unwatch(b);
        }
        self.ready.clear();
        let elapsed = t0.elapsed();
        let sent = sent_at.iter().filter(|s| s.is_some()).count() as u64;
        json!({
            "requested": count,
            "sent": sent,
            "acked": acked.iter().filter(|&&a| a).count() as u64,
            "delivered": delivered.iter().filter(|&&d| d).count() as u64,
            "duplicates": duplicates,
            "refused": refused,
            "first_refusal": first_refusal,
            "write_failed": write_failed,
            "stray_deliveries": stray,
            "elapsed_s": elapsed.as_secs_f64(),
            "latency_ms": Percentiles::of(&latency),
        })
    }
}

/// Reads what `sock` has (non-blocking) until it would block. With `keep`, the bytes are
/// appended there; without, they are dropped (keepalive: `Pong`s, nothing else is expected).
fn drain(
    sock: &mut TcpStream,
    buf: &mut [u8],
    mut keep: Option<&mut BytesMut>,
    stats: &HolderStats,
) -> Drained {
    loop {
        match sock.read(buf) {
            Ok(0) => return Drained::Closed,
            Ok(n) => {
                stats.bytes_read.fetch_add(n as u64, Relaxed);
                if let Some(k) = keep.as_deref_mut() {
                    k.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Drained::Open,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Drained::Closed,
        }
    }
}

/// The protocol frames complete in `buf` (consumed from it). Undecodable input ends the list:
/// the connection's later checks fail instead.
fn frames(buf: &mut BytesMut) -> Vec<Frame> {
    let mut decoder = Decoder::new(Role::Client, FRAME_BYTES_MAX);
    let mut out = Vec::new();
    while let Ok(Some(m)) = decoder.decode(buf) {
        if let Message::Binary(b) = m {
            if let Ok(f) = Frame::decode(&b) {
                out.push(f);
            }
        }
    }
    out
}

/// A bench message's pair index, if `body` is one of this run's (`nonce`).
fn parse_body(body: &[u8], nonce: u64) -> Option<usize> {
    let rest = body.strip_prefix(BODY_TAG.as_slice())?;
    let n: [u8; 8] = rest.get(..8)?.try_into().ok()?;
    let k: [u8; 8] = rest.get(8..)?.try_into().ok()?;
    (u64::from_le_bytes(n) == nonce).then(|| u64::from_le_bytes(k) as usize)
}

/// Writes all of `bytes` to a non-blocking socket, waiting while it would block, up to `limit`.
fn write_all_nonblocking(sock: &mut TcpStream, mut bytes: &[u8], limit: Duration) -> bool {
    let t0 = Instant::now();
    while !bytes.is_empty() {
        match sock.write(bytes) {
            Ok(0) => return false,
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if t0.elapsed() > limit {
                    return false;
                }
                nap(Duration::from_millis(1));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// Sleeps the calling thread: only plain threads call it (the holder thread here, and
/// `million`'s cluster start in `spawn_blocking`), never a runtime worker.
#[allow(clippy::disallowed_methods)]
pub fn nap(d: Duration) {
    std::thread::sleep(d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_and_foreign_ones_are_strays() {
        let nonce: u64 = 0x1234_5678_9abc_def0;
        let mut body = BODY_TAG.to_vec();
        body.extend_from_slice(&nonce.to_le_bytes());
        body.extend_from_slice(&42u64.to_le_bytes());
        assert_eq!(parse_body(&body, nonce), Some(42));
        assert_eq!(parse_body(&body, nonce + 1), None, "another run's");
        assert_eq!(parse_body(&body[..body.len() - 1], nonce), None, "short");
        assert_eq!(parse_body(b"hello", nonce), None);
    }

    #[test]
    fn frames_decodes_whole_messages_and_keeps_the_rest() {
        let mut server = BytesMut::new();
        let pong = Frame::new(7, ringpost_wire::Pong { nonce: 9 })
            .encode()
            .unwrap();
        ws::encode_frame(OpCode::Binary, &pong, None, &mut server);
        ws::encode_frame(OpCode::Binary, &pong, None, &mut server);
        let whole = server.len();
        let mut buf = BytesMut::from(&server[..whole - 3]);
        let got = frames(&mut buf);
        assert_eq!(got.len(), 1, "one whole frame, the second is partial");
        assert!(matches!(
            got[0].body,
            Body::Pong(ringpost_wire::Pong { nonce: 9 })
        ));
        buf.extend_from_slice(&server[whole - 3..]);
        assert_eq!(frames(&mut buf).len(), 1, "the rest completes the second");
    }
}
