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
//! `SendAck`s and `Deliver`s that come back ([`messages`]).

use std::collections::HashMap;
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
use ringpost_wire::{Body, DeliverAck, DeviceCiphertext, Frame, Ping};
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

/// The body of a bench message: this tag, then the pair's index.
const BODY_TAG: &[u8; 8] = b"rp-1m-v1";

/// How often the holder looks at the storm's reconnected devices while it waits for their
/// messages.
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
    waiting: Vec<usize>,
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
    let mut h = Holder {
        // Without it (an exotic kernel) arrivals are read at each connection's next visit.
        epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).ok(),
        conns: Vec::new(),
        accounts,
        stats,
        cursor: 0,
        carry: 0.0,
        masks: 0x9e37_79b9_7f4a_7c15,
        buf: vec![0u8; READ_CHUNK],
        partial: HashMap::new(),
        storm: None,
    };
    let mut next_tick = Instant::now() + KEEPALIVE_TICK;
    loop {
        let mut wait = next_tick.saturating_duration_since(Instant::now());
        if h.storm.as_ref().is_some_and(|s| !s.waiting.is_empty()) {
            wait = wait.min(STORM_POLL);
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
                h.drain_ready();
                let interval_ms = ping_every.load(Relaxed);
                if interval_ms > 0 {
                    h.keepalive_tick(Duration::from_millis(interval_ms).mul_f64(PING_EARLY));
                }
                next_tick += KEEPALIVE_TICK;
                if next_tick < Instant::now() {
                    // Behind (a long command ran): skip the missed ticks, not their work.
                    next_tick = Instant::now() + KEEPALIVE_TICK;
                }
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
    /// Every held connection, with its index as the event's data.
    epoll: Option<Epoll>,
    conns: Vec<Option<Held>>,
    accounts: Arc<Vec<Account>>,
    stats: Arc<HolderStats>,
    /// The next connection the keepalive visits.
    cursor: usize,
    /// Fractional visits owed from earlier ticks.
    carry: f64,
    /// Masking-key generator state (RFC 6455 wants keys to vary; they need not be secret here).
    masks: u64,
    buf: Vec<u8>,
    /// Bytes read and not yet decoded, of connections whose frames the holder reads.
    partial: HashMap<usize, BytesMut>,
    storm: Option<Storm>,
}

impl Holder {
    /// Takes a connection; one the storm waits for is watched for its message.
    fn add(&mut self, held: Held, leftover: BytesMut) {
        let i = self.conns.len();
        let watched = self
            .storm
            .as_mut()
            .filter(|s| s.of_account.contains_key(&held.account));
        if let Some(storm) = watched {
            storm.waiting.push(i);
            self.partial.insert(i, leftover);
        }
        if let Some(epoll) = &self.epoll {
            let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
            // Not in the set: read at its visits only.
            let _ = epoll.add(&held.sock, EpollEvent::new(flags, i as u64));
        }
        self.conns.push(Some(held));
    }

    /// Reads and drops what arrived on connections since the last call, without waiting.
    /// Connections whose frames the storm reads are left to it.
    fn drain_ready(&mut self) {
        let Some(epoll) = &self.epoll else {
            return;
        };
        let mut events = [EpollEvent::empty(); EPOLL_EVENTS];
        loop {
            let n = epoll.wait(&mut events, EpollTimeout::ZERO).unwrap_or(0);
            for event in &events[..n] {
                let i = event.data() as usize;
                if self.partial.contains_key(&i) {
                    continue;
                }
                let Some(held) = self.conns.get_mut(i).and_then(Option::as_mut) else {
                    continue;
                };
                if let Drained::Closed = drain(&mut held.sock, &mut self.buf, None, &self.stats) {
                    self.stats.closed_by_node.fetch_add(1, Relaxed);
                    self.conns[i] = None;
                }
            }
            if n < events.len() {
                return;
            }
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
            self.partial.remove(&i);
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
        let t0 = Instant::now();
        for batch in (0..count).collect::<Vec<_>>().chunks(SEND_BATCH) {
            let mut senders = Vec::with_capacity(batch.len());
            for &k in batch {
                let to = self.accounts[away[k]].clone();
                of_account.insert(away[k] as u32, k);
                let from = open[rng.gen_range(0..open.len())];
                let bytes = self.message_to(&to, nonce, k, k as u32 + 1);
                let held = self.conns[from].as_mut().expect("open");
                if write_all_nonblocking(&mut held.sock, &bytes, Duration::from_secs(5)) {
                    senders.push(from);
                } else {
                    write_failed += 1;
                    acked[k] = true; // not waited for
                }
            }
            senders.sort_unstable();
            senders.dedup();
            while !batch.iter().all(|&k| acked[k]) && t0.elapsed() < timeout {
                let mut progress = false;
                for &i in &senders {
                    for frame in self.read_frames(i) {
                        progress = true;
                        let req = frame.req as usize;
                        if !(1..=count).contains(&req) {
                            continue;
                        }
                        match frame.body {
                            Body::SendAck(a) if a.status == ringpost_wire::SendStatus::Ok => {
                                acked[req - 1] = true;
                            }
                            Body::SendAck(a) => {
                                acked[req - 1] = true;
                                refused += 1;
                                first_refusal.get_or_insert_with(|| format!("{:?}", a.status));
                            }
                            Body::Error(e) => {
                                acked[req - 1] = true;
                                refused += 1;
                                first_refusal
                                    .get_or_insert_with(|| format!("{:?}: {}", e.code, e.message));
                            }
                            _ => {}
                        }
                    }
                }
                if !progress {
                    nap(Duration::from_millis(2));
                }
            }
        }
        let queued = acked.iter().filter(|&&a| a).count() as u64 - refused - write_failed;
        self.storm = Some(Storm {
            nonce,
            of_account,
            delivered: vec![false; count],
            waiting: Vec::new(),
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

    /// Reads what the storm's reconnected devices received: each `Deliver` is acknowledged,
    /// and the storm's message marks its device done.
    fn storm_poll(&mut self) {
        let Some(mut storm) = self.storm.take() else {
            return;
        };
        let waiting = std::mem::take(&mut storm.waiting);
        for i in waiting {
            let mut seqs = Vec::new();
            let mut done = false;
            for frame in self.read_frames(i) {
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
            if !done && self.conns[i].is_some() {
                storm.waiting.push(i);
            } else {
                self.partial.remove(&i);
            }
        }
        self.storm = Some(storm);
    }

    /// Waits up to `timeout` for every storm device that reconnected to get its message.
    fn storm_wait(&mut self, timeout: Duration) -> Value {
        let t0 = Instant::now();
        while self.storm.as_ref().is_some_and(|s| !s.waiting.is_empty()) && t0.elapsed() < timeout {
            self.storm_poll();
            nap(STORM_POLL);
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

    /// The frames connection `i` received since the last call (non-blocking); a connection
    /// the node closed is dropped.
    fn read_frames(&mut self, i: usize) -> Vec<Frame> {
        let Some(held) = self.conns[i].as_mut() else {
            return Vec::new();
        };
        let buf = self.partial.entry(i).or_default();
        if let Drained::Closed = drain(&mut held.sock, &mut self.buf, Some(buf), &self.stats) {
            self.conns[i] = None;
        }
        frames(buf)
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

    /// Visits the connections due in one tick: with `n` connections and interval `every`,
    /// `n × tick / every` of them, in a round.
    fn keepalive_tick(&mut self, every: Duration) {
        let n = self.conns.len();
        if n == 0 {
            return;
        }
        self.carry += n as f64 * KEEPALIVE_TICK.as_secs_f64() / every.as_secs_f64().max(1e-3);
        let visits = (self.carry.floor() as usize).min(n);
        self.carry -= visits as f64;
        let ping = self.ws_message(&Frame::new(0, Ping { nonce: 0 }));
        for _ in 0..visits {
            let i = self.cursor % n;
            self.cursor = (self.cursor + 1) % n;
            let Some(held) = self.conns[i].as_mut() else {
                continue;
            };
            if let Drained::Closed = drain(&mut held.sock, &mut self.buf, None, &self.stats) {
                self.stats.closed_by_node.fetch_add(1, Relaxed);
                self.conns[i] = None;
                continue;
            }
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
        let mut pending: Vec<usize> = Vec::new();
        let mut write_failed = 0u64;
        let mut closed = 0u64;
        for i in 0..self.conns.len() {
            let Some(held) = self.conns[i].as_mut() else {
                continue;
            };
            if let Drained::Closed = drain(&mut held.sock, &mut self.buf, None, &self.stats) {
                closed += 1;
                self.conns[i] = None;
                continue;
            }
            match held.sock.write(&ping) {
                Ok(k) if k == ping.len() => pending.push(i),
                _ => write_failed += 1,
            }
        }
        let asked = pending.len() as u64 + write_failed;
        let t0 = Instant::now();
        let mut partial: HashMap<usize, BytesMut> = HashMap::new();
        let mut answered = 0u64;
        let mut latest_answer = Duration::ZERO;
        while !pending.is_empty() && t0.elapsed() < timeout {
            let mut still = Vec::with_capacity(pending.len());
            for i in pending {
                let Some(held) = self.conns[i].as_mut() else {
                    continue;
                };
                let buf = partial.entry(i).or_default();
                let state = drain(&mut held.sock, &mut self.buf, Some(buf), &self.stats);
                let mut got = false;
                for frame in frames(buf) {
                    if let Body::Pong(p) = frame.body {
                        got |= p.nonce == nonce;
                    }
                }
                if got {
                    answered += 1;
                    latest_answer = t0.elapsed();
                    partial.remove(&i);
                } else if let Drained::Closed = state {
                    closed += 1;
                    partial.remove(&i);
                    self.conns[i] = None;
                } else {
                    still.push(i);
                }
            }
            pending = still;
            if !pending.is_empty() {
                nap(Duration::from_millis(20));
            }
        }
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
        let mut partial: HashMap<usize, BytesMut> = HashMap::new();
        let t0 = Instant::now();
        for batch in (0..count).collect::<Vec<_>>().chunks(SEND_BATCH) {
            // Send a batch, then read until it settles (or the time runs out).
            let mut watch: Vec<usize> = Vec::new();
            for &k in batch {
                let (a, b) = pairs[k];
                let to =
                    self.accounts[self.conns[b].as_ref().expect("open").account as usize].clone();
                let bytes = self.message_to(&to, nonce, k, k as u32 + 1);
                let held = self.conns[a].as_mut().expect("open");
                if write_all_nonblocking(&mut held.sock, &bytes, Duration::from_secs(5)) {
                    sent_at[k] = Some(Instant::now());
                } else {
                    write_failed += 1;
                }
                watch.push(a);
                watch.push(b);
            }
            watch.sort_unstable();
            watch.dedup();
            let settled = |acked: &[bool], delivered: &[bool]| {
                batch
                    .iter()
                    .all(|&k| sent_at[k].is_none() || (acked[k] && delivered[k]))
            };
            while !settled(&acked, &delivered) && t0.elapsed() < timeout {
                let mut progress = false;
                for &i in &watch {
                    let Some(held) = self.conns[i].as_mut() else {
                        continue;
                    };
                    let buf = partial.entry(i).or_default();
                    if let Drained::Closed =
                        drain(&mut held.sock, &mut self.buf, Some(buf), &self.stats)
                    {
                        self.conns[i] = None;
                    }
                    let mut seqs = Vec::new();
                    for frame in frames(buf) {
                        progress = true;
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
                if !progress {
                    nap(Duration::from_millis(2));
                }
            }
        }
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
