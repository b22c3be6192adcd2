//! The client QUIC listener's driver: a few tasks (shards, one per runtime worker) run
//! quinn-proto's sans-IO endpoint and every connection on it.
//!
//! quinn (the crate over quinn-proto) gives each connection a task of its own, a channel from
//! the endpoint task to it (tokio's first block of 32 events, about 7 KiB), a timer and a
//! transmit buffer, and keeps them for the connection's life: about 9 KiB an idle client
//! connection held beside quinn-proto's own state (heaptrack, BENCHMARKS.md, eleventh stop on
//! issue 22). Here a shard hands each datagram to its connection directly, keeps every
//! connection's timer in one heap, and builds every datagram in one buffer. What a
//! connection owns beyond quinn-proto's [`proto::Connection`] is one small [`Shared`] record
//! (its lock, two wakers and a few flags) and its slot in the driver's table.
//!
//! A session task (the connection's [`super::QuicTransport`]) reads and writes the control
//! stream under the connection's lock, then, when that gave the connection something to send,
//! queues the connection for the driver, which sends it on its next turn (as quinn's
//! connection task did). The driver wakes the session when its stream becomes readable or
//! writable, when what it sent was acknowledged, and when the connection is lost.
//!
//! Bounds: receives come in batches of [`quinn_udp::BATCH_SIZE`] into one fixed buffer
//! (`BATCH_SIZE` × 64 KiB, 2 MiB on Linux, for GRO); a turn handles at most [`RECV_BATCHES`]
//! batches before it looks at its queue and timers; a connection sends at most
//! [`TRANSMITS_PER_TURN`] datagrams (or GSO batches) a turn. quinn-proto bounds incoming
//! handshakes and their buffered bytes (`ServerConfig::max_incoming`).
//!
//! Shards: each shard is a quinn-proto endpoint of its own with its share of the connections;
//! the connection ids it issues carry its number in their first byte. Shard 0 receives every
//! datagram on the one UDP socket and passes each to the shard its destination connection id
//! names (a client's first packets, whose id the client chose, go by a hash of that id), in
//! batches; every shard sends on the socket itself. A connection's packets are processed on its
//! shard's task alone, so connections spread over the runtime's workers and a client that
//! changes address stays with its shard.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use quinn_proto as proto;
use quinn_proto::{ConnectionError, ConnectionHandle, Dir, StreamEvent, StreamId, VarInt};
use quinn_udp::{RecvMeta, UdpSocketState};
use tokio::sync::{mpsc, Notify};

/// Shards at most (a connection id's first byte names its shard).
pub const SHARDS_MAX: usize = 64;
/// Length of the connection ids the node issues (quinn's default).
const CID_LEN: usize = 8;
/// Datagrams at most waiting for a shard from shard 0; past it they are dropped (and counted),
/// as a full socket buffer would: QUIC resends. Memory: up to this many datagrams of up to
/// 1,500 bytes (each a `BytesMut` of its own), about 12 MiB per shard at the worst.
pub const FORWARD_QUEUE_MAX: usize = 8192;
/// Receive batches a turn handles before it serves its queue and timers.
pub const RECV_BATCHES: usize = 16;
/// Datagrams (or GSO batches) one connection sends in one turn; one with more is queued for
/// the next turn, so one fast sender cannot hold the others up.
pub const TRANSMITS_PER_TURN: usize = 20;
/// The largest UDP payload received (GRO may join datagrams up to this).
const RECV_BUF_BYTES: usize = 64 * 1024;
/// GSO segments at most in one send (as quinn).
const GSO_SEGMENTS_MAX: usize = 10;

/// A QUIC endpoint served by one driver task. Cloning shares it; when every handle is gone the
/// driver closes what is left and stops.
#[derive(Clone)]
pub struct Endpoint {
    handle: Arc<Handle>,
}

struct Handle {
    shards: Arc<[Arc<EndpointShared>]>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        for shard in self.shards.iter() {
            shard.command(Command::Stop);
        }
    }
}

/// The UDP socket: shard 0 receives on it, every shard sends on it.
struct Io {
    socket: tokio::net::UdpSocket,
    udp: UdpSocketState,
    local: SocketAddr,
    counters: Arc<Counters>,
}

/// What an endpoint counts (the node's `/metrics` shows them).
#[derive(Default, Debug)]
pub struct Counters {
    /// Datagrams not sent because the socket's send buffer was full (QUIC resends them).
    pub send_dropped: AtomicU64,
    /// Datagrams dropped because their shard had [`FORWARD_QUEUE_MAX`] waiting.
    pub forward_dropped: AtomicU64,
}

/// What a shard's driver shares with the handles, the sessions and the other shards.
struct EndpointShared {
    io: Arc<Io>,
    queue: Mutex<Queue>,
    wake: Notify,
    /// Connections the shard holds (accepted and not yet drained).
    open: AtomicUsize,
}

#[derive(Default)]
struct Queue {
    /// Connections a session gave something to send.
    dirty: Vec<Arc<Shared>>,
    commands: Vec<Command>,
    /// Datagrams shard 0 received for this shard.
    forwarded: Vec<Datagram>,
}

/// A received datagram.
struct Datagram {
    remote: SocketAddr,
    dst_ip: Option<IpAddr>,
    ecn: Option<proto::EcnCodepoint>,
    data: BytesMut,
}

enum Command {
    Accept(proto::Incoming, Arc<Shared>),
    Refuse(proto::Incoming),
    CloseAll(VarInt, Bytes),
    Stop,
}

impl EndpointShared {
    fn command(&self, command: Command) {
        lock(&self.queue).commands.push(command);
        self.wake.notify_one();
    }
}

/// The endpoint's incoming connections, in arrival order.
pub struct Incomings {
    rx: mpsc::UnboundedReceiver<(proto::Incoming, usize)>,
    shards: Arc<[Arc<EndpointShared>]>,
}

impl Incomings {
    /// The next connection attempt; `None` once the endpoint stopped.
    pub async fn next(&mut self) -> Option<Incoming> {
        let (inner, shard) = self.rx.recv().await?;
        Some(Incoming {
            inner: Some(inner),
            shared: self.shards[shard].clone(),
        })
    }
}

/// A client's first packet: accept it or refuse it (dropping it refuses it).
pub struct Incoming {
    inner: Option<proto::Incoming>,
    shared: Arc<EndpointShared>,
}

impl Incoming {
    /// The client's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner
            .as_ref()
            .map(|i| i.remote_address())
            .expect("an incoming connection not yet decided")
    }

    /// Begins the handshake; the result resolves once the client opened its control stream.
    pub fn accept(mut self) -> Connecting {
        let shared = Arc::new(Shared::default());
        let incoming = self.inner.take().expect("decided once");
        self.shared
            .command(Command::Accept(incoming, shared.clone()));
        Connecting {
            conn: Some(ConnRef {
                shared,
                endpoint: self.shared.clone(),
            }),
        }
    }

    /// Refuses the connection (the client is told so at once).
    pub fn refuse(mut self) {
        if let Some(incoming) = self.inner.take() {
            self.shared.command(Command::Refuse(incoming));
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(incoming) = self.inner.take() {
            self.shared.command(Command::Refuse(incoming));
        }
    }
}

/// A connection in its handshake.
pub struct Connecting {
    conn: Option<ConnRef>,
}

impl Future for Connecting {
    type Output = Result<(ConnRef, StreamId), ConnectionError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let conn = self.conn.as_ref().expect("polled after it resolved");
        let mut st = conn.lock();
        if let Some(e) = &st.lost {
            return Poll::Ready(Err(e.clone()));
        }
        if let Some(id) = st.stream {
            drop(st);
            return Poll::Ready(Ok((self.conn.take().expect("checked above"), id)));
        }
        set_waker(&mut st.reader, cx);
        Poll::Pending
    }
}

/// One connection's state, shared by the driver and the session.
#[derive(Default)]
pub(super) struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
pub(super) struct State {
    /// `None` until the driver accepted the connection.
    pub conn: Option<proto::Connection>,
    /// The control stream, once the client opened it.
    stream: Option<StreamId>,
    /// Why the connection ended (the session reads no more once set).
    pub lost: Option<ConnectionError>,
    /// The session's read (or, before it, the handshake's) waker.
    reader: Option<Waker>,
    /// The session's write or close waker.
    writer: Option<Waker>,
    /// Everything written to the control stream and its end was acknowledged.
    pub finished: bool,
    /// Queued for the driver.
    queued: bool,
    /// The session let go of the connection before the driver accepted it.
    abandoned: bool,
    /// quinn-proto's handle of the connection (the driver's index of it).
    handle_index: Option<usize>,
}

fn set_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves quinn-proto's state as it was at the panic;
    // carrying on is no worse than quinn's own connection task after one.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The session's reference to its connection; dropping it closes the connection.
pub struct ConnRef {
    shared: Arc<Shared>,
    endpoint: Arc<EndpointShared>,
}

impl ConnRef {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    /// Queues the connection for the driver (it has something to send). Call with the lock.
    pub(super) fn queue(&self, st: &mut State) {
        if !st.queued {
            st.queued = true;
            lock(&self.endpoint.queue).dirty.push(self.shared.clone());
            self.endpoint.wake.notify_one();
        }
    }

    /// Registers the reader's waker (under the lock the caller holds).
    pub(super) fn wait_readable(st: &mut State, cx: &Context<'_>) {
        set_waker(&mut st.reader, cx);
    }

    /// Registers the writer's waker (under the lock the caller holds).
    pub(super) fn wait_writable(st: &mut State, cx: &Context<'_>) {
        set_waker(&mut st.writer, cx);
    }

    /// Closes the connection with an application error code and reason.
    pub(super) fn close(&self, code: u32, reason: &[u8]) {
        let mut st = self.lock();
        if let Some(conn) = st.conn.as_mut() {
            if !conn.is_closed() {
                conn.close(
                    Instant::now(),
                    VarInt::from_u32(code),
                    Bytes::copy_from_slice(reason),
                );
                self.queue(&mut st);
            }
        } else {
            st.abandoned = true;
        }
    }
}

impl Drop for ConnRef {
    fn drop(&mut self) {
        self.close(super::CLOSE_NORMAL, b"");
    }
}

/// The driver's record of a connection.
struct Entry {
    shared: Arc<Shared>,
    /// When quinn-proto next wants `handle_timeout`.
    deadline: Option<Instant>,
    /// The earliest time this connection has in the heap.
    armed: Option<Instant>,
}

impl Endpoint {
    /// Serves `socket` (non-blocking, bound) as a QUIC server endpoint on the current tokio
    /// runtime, over `shards` driver tasks (at least 1, at most [`SHARDS_MAX`]), counting into
    /// `counters`.
    pub fn new(
        server: proto::ServerConfig,
        socket: std::net::UdpSocket,
        shards: usize,
        counters: Arc<Counters>,
    ) -> io::Result<(Endpoint, Incomings)> {
        let n = shards.clamp(1, SHARDS_MAX);
        let udp = UdpSocketState::new((&socket).into())?;
        let local = socket.local_addr()?;
        let io = Arc::new(Io {
            socket: tokio::net::UdpSocket::from_std(socket)?,
            udp,
            local,
            counters,
        });
        let shared: Arc<[Arc<EndpointShared>]> = (0..n)
            .map(|_| {
                Arc::new(EndpointShared {
                    io: io.clone(),
                    queue: Mutex::new(Queue::default()),
                    wake: Notify::new(),
                    open: AtomicUsize::new(0),
                })
            })
            .collect();
        let server = Arc::new(server);
        // One reset key for every shard: a shard answers only for connections it issued ids
        // for, but the clients see one endpoint.
        let base = proto::EndpointConfig::default();
        let max_gso = io.udp.max_gso_segments().clamp(1, GSO_SEGMENTS_MAX);
        let (tx, rx) = mpsc::unbounded_channel();
        for index in 0..n {
            let mut config = base.clone();
            // One shard needs no id to name it: all eight bytes stay random.
            let shard = (n > 1).then_some(index as u8);
            config.cid_generator(move || Box::new(ShardCids { shard }));
            let endpoint =
                proto::Endpoint::new(Arc::new(config), Some(server.clone()), false, None);
            let driver = Driver {
                index,
                shards: shared.clone(),
                shared: shared[index].clone(),
                max_gso,
                endpoint,
                entries: Vec::new(),
                timers: BinaryHeap::new(),
                incoming: tx.clone(),
                send_buf: Vec::new(),
                response_buf: Vec::new(),
                closing: None,
                outbox: (0..n).map(|_| Vec::new()).collect(),
            };
            tokio::spawn(driver.run());
        }
        let incomings = Incomings {
            rx,
            shards: shared.clone(),
        };
        Ok((
            Endpoint {
                handle: Arc::new(Handle { shards: shared }),
            },
            incomings,
        ))
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.shards[0].io.local
    }

    /// Connections not yet drained.
    pub fn open_connections(&self) -> usize {
        self.handle
            .shards
            .iter()
            .map(|s| s.open.load(Relaxed))
            .sum()
    }

    /// Connections not yet drained, per shard.
    pub fn open_per_shard(&self) -> Vec<usize> {
        self.handle
            .shards
            .iter()
            .map(|s| s.open.load(Relaxed))
            .collect()
    }

    /// Closes every connection (and refuses new ones) with `code` and `reason`.
    pub fn close(&self, code: u32, reason: &[u8]) {
        for shard in self.handle.shards.iter() {
            shard.command(Command::CloseAll(
                VarInt::from_u32(code),
                Bytes::copy_from_slice(reason),
            ));
        }
    }

    /// Waits until every connection has drained.
    pub async fn wait_idle(&self) {
        while self.open_connections() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// Connection ids of [`CID_LEN`] random bytes, the first of them the issuing shard's number
/// when there are shards.
struct ShardCids {
    shard: Option<u8>,
}

impl proto::ConnectionIdGenerator for ShardCids {
    fn generate_cid(&mut self) -> proto::ConnectionId {
        let mut id = [0u8; CID_LEN];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
        if let Some(shard) = self.shard {
            id[0] = shard;
        }
        proto::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The shard of `n` a datagram belongs to: the one its destination connection id names, or
/// for an id the client chose (its first packets), one picked by a hash of that id, so all of
/// them go to the same shard.
fn shard_of(datagram: &[u8], n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let dcid = match datagram.first() {
        // Short header: the id follows the first byte; ours are CID_LEN long.
        Some(first) if first & 0x80 == 0 => datagram.get(1..1 + CID_LEN),
        // Long header: first byte, version (4), id length, id.
        Some(_) => datagram
            .get(5)
            .and_then(|&len| datagram.get(6..6 + usize::from(len))),
        None => None,
    };
    match dcid {
        Some(id) if id.len() == CID_LEN && usize::from(id[0]) < n => usize::from(id[0]),
        Some(id) => {
            let hash = id.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            (hash % n as u64) as usize
        }
        None => 0,
    }
}

struct Driver {
    /// This shard's number; shard 0 also receives for the others.
    index: usize,
    shards: Arc<[Arc<EndpointShared>]>,
    shared: Arc<EndpointShared>,
    endpoint: proto::Endpoint,
    /// Indexed by quinn-proto's connection handle (its slab index).
    entries: Vec<Option<Entry>>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    incoming: mpsc::UnboundedSender<(proto::Incoming, usize)>,
    max_gso: usize,
    send_buf: Vec<u8>,
    response_buf: Vec<u8>,
    /// Set by [`Endpoint::close`]: new connections are refused, later ones closed with it.
    closing: Option<(VarInt, Bytes)>,
    /// Shard 0's datagrams for each shard, handed over after each receive batch.
    outbox: Vec<Vec<Datagram>>,
}

impl Driver {
    async fn run(mut self) {
        let receives = self.index == 0;
        let batch = quinn_udp::BATCH_SIZE;
        // GRO joins datagrams up to 64 KiB, so one receive never needs more than that. Only
        // shard 0 receives.
        let mut recv_buf = vec![0u8; if receives { RECV_BUF_BYTES * batch } else { 0 }];
        let mut metas = vec![RecvMeta::default(); batch];
        loop {
            let now = Instant::now();
            if !self.serve_queue(now) {
                break;
            }
            let more = receives && self.receive(&mut recv_buf, &mut metas);
            self.fire_timers(Instant::now());
            if more {
                tokio::task::yield_now().await;
                continue;
            }
            let deadline = self.timers.peek().map(|Reverse((t, _))| *t);
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let io = self.shared.io.clone();
            let readable = async {
                if receives {
                    io.socket.readable().await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                biased;
                _ = self.shared.wake.notified() => {}
                _ = readable => {}
                _ = sleep => {}
            }
        }
        // What is left is closed: the sessions see their connections lost.
        let now = Instant::now();
        for i in 0..self.entries.len() {
            if let Some(entry) = &self.entries[i] {
                let shared = entry.shared.clone();
                {
                    let mut st = lock(&shared.state);
                    if let Some(conn) = st.conn.as_mut() {
                        conn.close(now, VarInt::from_u32(super::CLOSE_GOING_AWAY), Bytes::new());
                    }
                }
                self.drive(i, now);
                let wakers = {
                    let mut st = lock(&shared.state);
                    st.lost.get_or_insert(ConnectionError::LocallyClosed);
                    [st.reader.take(), st.writer.take()]
                };
                wakers.into_iter().flatten().for_each(Waker::wake);
            }
        }
        self.shared.open.store(0, Relaxed);
    }

    /// Serves the commands and the connections sessions queued; false once told to stop.
    fn serve_queue(&mut self, now: Instant) -> bool {
        let (dirty, commands, forwarded) = {
            let mut q = lock(&self.shared.queue);
            (
                std::mem::take(&mut q.dirty),
                std::mem::take(&mut q.commands),
                std::mem::take(&mut q.forwarded),
            )
        };
        let mut touched = Vec::new();
        for datagram in forwarded {
            self.handle_datagram(now, datagram, &mut touched);
        }
        for i in touched {
            self.drive(i, now);
        }
        for command in commands {
            match command {
                Command::Accept(incoming, shared) => self.accept(incoming, shared, now),
                Command::Refuse(incoming) => self.refuse(incoming),
                Command::CloseAll(code, reason) => {
                    self.closing = Some((code, reason.clone()));
                    for i in 0..self.entries.len() {
                        if let Some(entry) = &self.entries[i] {
                            let shared = entry.shared.clone();
                            if let Some(conn) = lock(&shared.state).conn.as_mut() {
                                conn.close(now, code, reason.clone());
                            }
                            self.drive(i, now);
                        }
                    }
                }
                Command::Stop => return false,
            }
        }
        for shared in dirty {
            let index = {
                let mut st = lock(&shared.state);
                st.queued = false;
                st.handle_index
            };
            let ours = index.and_then(|i| match self.entries.get(i) {
                Some(Some(e)) if Arc::ptr_eq(&e.shared, &shared) => Some(i),
                _ => None,
            });
            if let Some(i) = ours {
                self.drive(i, now);
            }
        }
        true
    }

    fn accept(&mut self, incoming: proto::Incoming, shared: Arc<Shared>, now: Instant) {
        if self.closing.is_some() || lock(&shared.state).abandoned {
            self.refuse(incoming);
            let mut st = lock(&shared.state);
            st.lost = Some(ConnectionError::LocallyClosed);
            let w = st.reader.take();
            drop(st);
            w.into_iter().for_each(Waker::wake);
            return;
        }
        self.response_buf.clear();
        match self
            .endpoint
            .accept(incoming, now, &mut self.response_buf, None)
        {
            Ok((ch, conn)) => {
                {
                    let mut st = lock(&shared.state);
                    st.conn = Some(conn);
                    st.handle_index = Some(ch.0);
                }
                if self.entries.len() <= ch.0 {
                    self.entries.resize_with(ch.0 + 1, || None);
                }
                self.entries[ch.0] = Some(Entry {
                    shared,
                    deadline: None,
                    armed: None,
                });
                self.shared.open.fetch_add(1, Relaxed);
                self.drive(ch.0, now);
            }
            Err(e) => {
                if let Some(t) = e.response {
                    let buf = std::mem::take(&mut self.response_buf);
                    self.send(&t, &buf);
                    self.response_buf = buf;
                }
                let mut st = lock(&shared.state);
                st.lost = Some(e.cause);
                let w = st.reader.take();
                drop(st);
                w.into_iter().for_each(Waker::wake);
            }
        }
    }

    /// Receives what the socket holds, up to [`RECV_BATCHES`] batches, handling this shard's
    /// datagrams and handing the others' over; true if there may be more.
    fn receive(&mut self, recv_buf: &mut [u8], metas: &mut [RecvMeta]) -> bool {
        let now = Instant::now();
        let n = self.shards.len();
        let chunk = recv_buf.len() / metas.len();
        let io = self.shared.io.clone();
        let mut touched = Vec::new();
        for _ in 0..RECV_BATCHES {
            let mut iovs: Vec<IoSliceMut<'_>> =
                recv_buf.chunks_mut(chunk).map(IoSliceMut::new).collect();
            let got = io.socket.try_io(tokio::io::Interest::READABLE, || {
                io.udp.recv((&io.socket).into(), &mut iovs, metas)
            });
            let count = match got {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    // ICMP errors and the like: nothing to do but go on.
                    tracing::debug!(error = %e, "quic receive failed");
                    continue;
                }
            };
            for (meta, buf) in metas.iter().zip(iovs.iter()).take(count) {
                let mut data = BytesMut::from(&buf[..meta.len]);
                while !data.is_empty() {
                    let datagram = Datagram {
                        remote: meta.addr,
                        dst_ip: meta.dst_ip,
                        ecn: meta.ecn.map(proto_ecn),
                        data: data.split_to(meta.stride.min(data.len())),
                    };
                    let shard = shard_of(&datagram.data, n);
                    if shard == self.index {
                        self.handle_datagram(now, datagram, &mut touched);
                    } else {
                        self.outbox[shard].push(datagram);
                    }
                }
            }
            for i in touched.drain(..) {
                self.drive(i, now);
            }
            for (shard, out) in self.outbox.iter_mut().enumerate() {
                if out.is_empty() {
                    continue;
                }
                let to = &self.shards[shard];
                let mut q = lock(&to.queue);
                let room = FORWARD_QUEUE_MAX.saturating_sub(q.forwarded.len());
                if out.len() > room {
                    let dropped = out.len() - room;
                    out.truncate(room);
                    io.counters
                        .forward_dropped
                        .fetch_add(dropped as u64, Relaxed);
                }
                q.forwarded.append(out);
                drop(q);
                to.wake.notify_one();
            }
        }
        true
    }

    /// Hands one datagram to this shard's endpoint; `touched` collects the connections it
    /// went to (each driven once after a batch).
    fn handle_datagram(&mut self, now: Instant, d: Datagram, touched: &mut Vec<usize>) {
        self.response_buf.clear();
        match self.endpoint.handle(
            now,
            d.remote,
            d.dst_ip,
            d.ecn,
            d.data,
            &mut self.response_buf,
        ) {
            Some(proto::DatagramEvent::ConnectionEvent(ch, event)) => {
                if let Some(Some(entry)) = self.entries.get(ch.0) {
                    let shared = entry.shared.clone();
                    if let Some(conn) = lock(&shared.state).conn.as_mut() {
                        conn.handle_event(event);
                    }
                    if !touched.contains(&ch.0) {
                        touched.push(ch.0);
                    }
                }
            }
            Some(proto::DatagramEvent::NewConnection(incoming)) => {
                if self.closing.is_some() {
                    self.refuse(incoming);
                } else if let Err(mpsc::error::SendError((incoming, _))) =
                    self.incoming.send((incoming, self.index))
                {
                    // Nobody accepts any more.
                    self.endpoint.ignore(incoming);
                }
            }
            Some(proto::DatagramEvent::Response(t)) => {
                let b = std::mem::take(&mut self.response_buf);
                self.send(&t, &b);
                self.response_buf = b;
            }
            None => {}
        }
    }

    /// Refuses a connection attempt (the client is told at once).
    fn refuse(&mut self, incoming: proto::Incoming) {
        self.response_buf.clear();
        let t = self.endpoint.refuse(incoming, &mut self.response_buf);
        let buf = std::mem::take(&mut self.response_buf);
        self.send(&t, &buf);
        self.response_buf = buf;
    }

    /// Handles the timeouts that fell due.
    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((t, i))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(Some(entry)) = self.entries.get_mut(i) else {
                continue;
            };
            if entry.armed == Some(t) {
                entry.armed = None;
            }
            if entry.deadline.is_some_and(|d| d <= now) {
                let shared = entry.shared.clone();
                if let Some(conn) = lock(&shared.state).conn.as_mut() {
                    conn.handle_timeout(now);
                }
                self.drive(i, now);
            } else {
                let d = entry.deadline;
                self.arm(i, d);
            }
        }
    }

    fn arm(&mut self, i: usize, deadline: Option<Instant>) {
        let Some(Some(entry)) = self.entries.get_mut(i) else {
            return;
        };
        entry.deadline = deadline;
        if let Some(d) = deadline {
            if entry.armed.is_none_or(|a| d < a) {
                entry.armed = Some(d);
                self.timers.push(Reverse((d, i)));
            }
        }
    }

    /// Runs connection `i` after something happened to it: what it has for the endpoint, what
    /// it has to send, what it tells the session, and its next timeout.
    fn drive(&mut self, i: usize, now: Instant) {
        let Some(Some(entry)) = self.entries.get(i) else {
            return;
        };
        let shared = entry.shared.clone();
        let ch = ConnectionHandle(i);
        let mut guard = lock(&shared.state);
        let st = &mut *guard;
        let Some(conn) = st.conn.as_mut() else {
            return;
        };
        let mut drained = false;
        let mut sent = 0;
        loop {
            while sent < TRANSMITS_PER_TURN {
                self.send_buf.clear();
                let Some(t) = conn.poll_transmit(now, self.max_gso, &mut self.send_buf) else {
                    break;
                };
                let buf = std::mem::take(&mut self.send_buf);
                self.send(&t, &buf);
                self.send_buf = buf;
                sent += 1;
            }
            let mut again = false;
            while let Some(event) = conn.poll_endpoint_events() {
                drained |= event.is_drained();
                if let Some(back) = self.endpoint.handle_event(ch, event) {
                    conn.handle_event(back);
                    again = true;
                }
            }
            if !again || sent >= TRANSMITS_PER_TURN {
                break;
            }
        }
        let mut wake_reader = false;
        let mut wake_writer = false;
        while let Some(event) = conn.poll() {
            match event {
                proto::Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    if st.stream.is_none() {
                        st.stream = conn.streams().accept(Dir::Bi);
                    }
                    wake_reader = true;
                }
                proto::Event::Stream(StreamEvent::Readable { .. }) => wake_reader = true,
                proto::Event::Stream(StreamEvent::Writable { .. }) => wake_writer = true,
                proto::Event::Stream(StreamEvent::Finished { .. }) => {
                    st.finished = true;
                    wake_writer = true;
                }
                proto::Event::Stream(StreamEvent::Stopped { .. }) => wake_writer = true,
                proto::Event::ConnectionLost { reason } => {
                    st.lost.get_or_insert(reason);
                    wake_reader = true;
                    wake_writer = true;
                }
                _ => {}
            }
        }
        let deadline = conn.poll_timeout();
        if sent >= TRANSMITS_PER_TURN && !st.queued {
            // More to send: next turn.
            st.queued = true;
            lock(&self.shared.queue).dirty.push(shared.clone());
            self.shared.wake.notify_one();
        }
        if drained {
            st.lost.get_or_insert(ConnectionError::LocallyClosed);
            wake_reader = true;
            wake_writer = true;
            st.conn = None;
            st.handle_index = None;
        }
        let reader = wake_reader.then(|| st.reader.take()).flatten();
        let writer = wake_writer.then(|| st.writer.take()).flatten();
        drop(guard);
        if drained {
            self.entries[i] = None;
            self.shared.open.fetch_sub(1, Relaxed);
        } else {
            self.arm(i, deadline);
        }
        reader.into_iter().chain(writer).for_each(Waker::wake);
    }

    fn send(&self, t: &proto::Transmit, buf: &[u8]) {
        let transmit = quinn_udp::Transmit {
            destination: t.destination,
            ecn: t.ecn.map(udp_ecn),
            contents: &buf[..t.size],
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        };
        let io = &self.shared.io;
        let sent = io.socket.try_io(tokio::io::Interest::WRITABLE, || {
            io.udp.send((&io.socket).into(), &transmit)
        });
        if let Err(e) = sent {
            if e.kind() == io::ErrorKind::WouldBlock {
                io.counters.send_dropped.fetch_add(1, Relaxed);
            } else {
                tracing::debug!(error = %e, to = %t.destination, "quic send failed");
            }
        }
    }
}

fn proto_ecn(ecn: quinn_udp::EcnCodepoint) -> proto::EcnCodepoint {
    match ecn {
        quinn_udp::EcnCodepoint::Ect0 => proto::EcnCodepoint::Ect0,
        quinn_udp::EcnCodepoint::Ect1 => proto::EcnCodepoint::Ect1,
        quinn_udp::EcnCodepoint::Ce => proto::EcnCodepoint::Ce,
    }
}

fn udp_ecn(ecn: proto::EcnCodepoint) -> quinn_udp::EcnCodepoint {
    match ecn {
        proto::EcnCodepoint::Ect0 => quinn_udp::EcnCodepoint::Ect0,
        proto::EcnCodepoint::Ect1 => quinn_udp::EcnCodepoint::Ect1,
        proto::EcnCodepoint::Ce => quinn_udp::EcnCodepoint::Ce,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use ringpost_wire::framing;

    use super::*;
    use crate::transport::quic::{server_config, testing, QuicTransport, CLOSE_GOING_AWAY};
    use crate::transport::{tls, Incoming as Read, Transport};

    struct Setup {
        _dir: tempfile::TempDir,
        endpoint: Endpoint,
        incomings: Incomings,
        client: quinn::Endpoint,
    }

    fn setup(idle: Duration) -> Setup {
        setup_sharded(idle, 1)
    }

    fn setup_sharded(idle: Duration, shards: usize) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let cert = tls::dev_certificate(dir.path(), &[]).unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let (endpoint, incomings) = Endpoint::new(
            server_config(&cert, idle).unwrap(),
            socket,
            shards,
            Arc::default(),
        )
        .unwrap();
        let client = testing::client(&cert);
        Setup {
            _dir: dir,
            endpoint,
            incomings,
            client,
        }
    }

    fn prefixed(frame: &[u8]) -> Vec<u8> {
        let mut v = framing::length_prefix(frame.len()).unwrap().to_vec();
        v.extend_from_slice(frame);
        v
    }

    async fn read_frame(recv: &mut quinn::RecvStream) -> Option<Vec<u8>> {
        let mut len = [0u8; 4];
        recv.read_exact(&mut len).await.ok()?;
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        recv.read_exact(&mut frame).await.unwrap();
        Some(frame)
    }

    /// A client connected through the driver, its control stream open (a first frame,
    /// "hello", sent and read), and the server's transport.
    async fn open(
        s: &mut Setup,
    ) -> (
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
        QuicTransport,
    ) {
        let connecting = s
            .client
            .connect(s.endpoint.local_addr(), "localhost")
            .unwrap();
        let client = async {
            let c = connecting.await.unwrap();
            let (mut send, recv) = c.open_bi().await.unwrap();
            send.write_all(&prefixed(b"hello")).await.unwrap();
            (c, send, recv)
        };
        let server = async {
            let incoming = s.incomings.next().await.unwrap();
            let mut t = QuicTransport::accept(incoming.accept()).await.unwrap();
            match t.next_frame().await.unwrap() {
                Read::Frame(f) => assert_eq!(&f[..], b"hello"),
                _ => panic!("expected the first frame"),
            }
            t
        };
        let ((c, send, recv), t) = tokio::join!(client, server);
        (c, send, recv, t)
    }

    async fn until_drained(endpoint: &Endpoint) {
        tokio::time::timeout(Duration::from_secs(10), endpoint.wait_idle())
            .await
            .expect("every connection drained");
    }

    /// 4 MB each way: more than the stream's and the connection's receive windows (256 and
    /// 320 KiB) and the node's send window (512 KiB), so both directions go on only as the
    /// driver sends flow-control credit and wakes a blocked writer.
    #[tokio::test]
    async fn frames_pass_both_ways_past_every_flow_control_window() {
        tokio::time::timeout(Duration::from_secs(60), frames_both_ways())
            .await
            .expect("4 MB each way within a minute");
    }

    async fn frames_both_ways() {
        let mut s = setup(Duration::from_secs(30));
        let (c, mut send, mut recv, mut t) = open(&mut s).await;
        const FRAMES: usize = 40;
        const BYTES: usize = 100 * 1024;
        let upload = async {
            for i in 0..FRAMES {
                send.write_all(&prefixed(&vec![i as u8; BYTES]))
                    .await
                    .unwrap();
            }
        };
        let receive = async {
            for i in 0..FRAMES {
                match t.next_frame().await.unwrap() {
                    Read::Frame(f) => assert!(f.len() == BYTES && f.iter().all(|&b| b == i as u8)),
                    _ => panic!("frame {i} missing"),
                }
            }
        };
        tokio::join!(upload, receive);

        let download = async {
            for i in 0..FRAMES {
                let f = read_frame(&mut recv).await.expect("a frame");
                assert!(f.len() == BYTES && f.iter().all(|&b| b == (i as u8) ^ 0xff));
            }
            // Then the stream's end, and the connection's close with code 0.
            assert!(read_frame(&mut recv).await.is_none());
        };
        let reply = async {
            let mut frames: VecDeque<Bytes> = (0..FRAMES)
                .map(|i| Bytes::from(vec![(i as u8) ^ 0xff; BYTES]))
                .collect();
            t.write(&mut frames).await.unwrap();
            t.close(None).await;
        };
        tokio::join!(download, reply);
        match c.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, VarInt::from_u32(0))
            }
            e => panic!("closed with {e}"),
        }
        drop(t);
        until_drained(&s.endpoint).await;
    }

    /// `close` sends every open connection the code and reason, refuses new ones, and the
    /// driver lets go of each connection once it has drained.
    #[tokio::test]
    async fn closing_the_endpoint_tells_every_client_and_refuses_new_ones() {
        let mut s = setup(Duration::from_secs(30));
        let (c1, _s1, _r1, mut t1) = open(&mut s).await;
        let (c2, _s2, _r2, mut t2) = open(&mut s).await;
        assert_eq!(s.endpoint.open_connections(), 2);
        s.endpoint.close(CLOSE_GOING_AWAY, b"node shutting down");
        for c in [c1, c2] {
            match c.closed().await {
                quinn::ConnectionError::ApplicationClosed(close) => {
                    assert_eq!(close.error_code, VarInt::from_u32(CLOSE_GOING_AWAY));
                    assert_eq!(&close.reason[..], b"node shutting down");
                }
                e => panic!("closed with {e}"),
            }
        }
        for t in [&mut t1, &mut t2] {
            assert!(matches!(t.next_frame().await.unwrap(), Read::Closed));
        }
        until_drained(&s.endpoint).await;
        let refused = s
            .client
            .connect(s.endpoint.local_addr(), "localhost")
            .unwrap()
            .await;
        assert!(
            matches!(refused, Err(quinn::ConnectionError::ConnectionClosed(_))),
            "{refused:?}"
        );
    }

    /// A connection nobody speaks on times out on the driver's timers: the session reads its
    /// end, and the driver lets go of it.
    #[tokio::test]
    async fn a_silent_connection_times_out() {
        let mut s = setup(Duration::from_millis(400));
        let (c, _send, _recv, mut t) = open(&mut s).await;
        let end = tokio::time::timeout(Duration::from_secs(10), t.next_frame())
            .await
            .expect("the idle timeout fired");
        assert!(matches!(end.unwrap(), Read::Closed));
        assert!(matches!(c.closed().await, quinn::ConnectionError::TimedOut));
        drop(t);
        until_drained(&s.endpoint).await;
    }

    /// A refused connection, and one whose handshake the node gave up on before the driver
    /// took it: the clients are told, and nothing is left on the endpoint.
    #[tokio::test]
    async fn refused_and_abandoned_handshakes_leave_nothing() {
        let mut s = setup(Duration::from_secs(30));
        let addr = s.endpoint.local_addr();
        for abandon in [false, true] {
            let attempt = s.client.connect(addr, "localhost").unwrap();
            let incoming = s.incomings.next().await.unwrap();
            if abandon {
                drop(incoming.accept());
            } else {
                incoming.refuse();
            }
            let result = tokio::time::timeout(Duration::from_secs(10), attempt)
                .await
                .expect("the client was told");
            match result {
                Err(_) => {}
                // The driver may have taken the handshake and sent its first flight before
                // the session let go: then the close follows it.
                Ok(c) if abandon => assert!(matches!(
                    c.closed().await,
                    quinn::ConnectionError::ApplicationClosed(_)
                )),
                Ok(_) => panic!("a refused connection was accepted"),
            }
        }
        until_drained(&s.endpoint).await;
        // And the endpoint still serves the next client.
        let (_c, _send, _recv, _t) = open(&mut s).await;
        assert_eq!(s.endpoint.open_connections(), 1);
    }

    /// Three shards: connections spread over them (shard 0 receives every datagram and hands
    /// the others theirs by connection id), and stay with their shard when the client's
    /// address changes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_spread_over_shards_and_keep_to_them_across_an_address_change() {
        let mut s = setup_sharded(Duration::from_secs(30), 3);
        let mut conns = Vec::new();
        for _ in 0..12 {
            conns.push(open(&mut s).await);
        }
        let per_shard = s.endpoint.open_per_shard();
        assert_eq!(per_shard.iter().sum::<usize>(), 12);
        assert!(
            per_shard.iter().filter(|&&n| n > 0).count() >= 2,
            "spread: {per_shard:?}"
        );
        async fn echo(
            round: u8,
            conns: &mut [(
                quinn::Connection,
                quinn::SendStream,
                quinn::RecvStream,
                QuicTransport,
            )],
        ) {
            for (i, (_c, send, recv, t)) in conns.iter_mut().enumerate() {
                let msg = vec![round, i as u8, 7];
                send.write_all(&prefixed(&msg)).await.unwrap();
                let Read::Frame(f) = t.next_frame().await.unwrap() else {
                    panic!("connection {i}: no frame");
                };
                assert_eq!(&f[..], &msg[..]);
                t.write(&mut VecDeque::from([f])).await.unwrap();
                assert_eq!(read_frame(recv).await.unwrap(), msg);
            }
        }
        echo(1, &mut conns).await;
        // Every connection of the client moves to a new port.
        let before = s.client.local_addr().unwrap();
        s.client
            .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
        assert_ne!(s.client.local_addr().unwrap(), before);
        echo(2, &mut conns).await;
        assert_eq!(s.endpoint.open_per_shard(), per_shard);
        for (c, ..) in &conns {
            assert!(c.close_reason().is_none());
        }
    }

    #[test]
    fn connection_ids_name_their_shard_only_when_there_are_shards() {
        use proto::ConnectionIdGenerator;
        let mut sharded = ShardCids { shard: Some(3) };
        let mut single = ShardCids { shard: None };
        let firsts: Vec<u8> = (0..64).map(|_| single.generate_cid()[0]).collect();
        assert!(
            firsts.iter().any(|&b| b != firsts[0]),
            "one shard: the first byte is random too"
        );
        for _ in 0..64 {
            let id = sharded.generate_cid();
            assert_eq!((id.len(), id[0]), (CID_LEN, 3));
            assert_eq!(shard_of(&[&[0x41][..], &id[..]].concat(), 4), 3);
        }
    }

    #[test]
    fn a_datagram_goes_to_the_shard_its_connection_id_names() {
        let ours = |shard: u8| {
            let mut id = [0x5a; CID_LEN];
            id[0] = shard;
            id
        };
        // Short header: first byte, then the id.
        let short = |id: &[u8]| [&[0x41][..], id, &[1, 2, 3]].concat();
        // Long header: first byte, version, id length, id, then the source id.
        let long = |id: &[u8]| [&[0xc0, 0, 0, 0, 1, id.len() as u8][..], id, &[8]].concat();
        for shard in 0..4u8 {
            assert_eq!(shard_of(&short(&ours(shard)), 4), usize::from(shard));
            assert_eq!(shard_of(&long(&ours(shard)), 4), usize::from(shard));
            assert_eq!(shard_of(&short(&ours(shard)), 1), 0);
        }
        // An id the client chose (20 bytes here, as quinn's): the same shard every time.
        let chosen = [0xab; 20];
        let first = shard_of(&long(&chosen), 4);
        assert!(first < 4);
        assert_eq!(shard_of(&long(&chosen), 4), first);
        // An id naming a shard that is not there, and datagrams too short to have an id.
        assert!(shard_of(&short(&ours(9)), 4) < 4);
        for d in [
            &[][..],
            &[0x41][..],
            &[0xc0, 0, 0][..],
            &[0xc0, 0, 0, 0, 1, 20, 1][..],
        ] {
            assert_eq!(shard_of(d, 4), 0);
        }
    }

    /// When the last handle goes, the driver closes what is left as the node going away.
    #[tokio::test]
    async fn dropping_the_endpoint_closes_its_connections() {
        let mut s = setup(Duration::from_secs(30));
        let (c, _send, _recv, mut t) = open(&mut s).await;
        let Setup {
            endpoint, client, ..
        } = s;
        drop(endpoint);
        match c.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, VarInt::from_u32(CLOSE_GOING_AWAY))
            }
            e => panic!("closed with {e}"),
        }
        assert!(matches!(t.next_frame().await.unwrap(), Read::Closed));
        drop(client);
    }
}
