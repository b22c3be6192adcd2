//! The lean load client: connections on the wire crate directly (tokio TCP and the wire crate's
//! sans-IO WebSocket codec, tokio-rustls for `wss://`, quinn for QUIC), with nothing per
//! connection but the socket, a read buffer and the codec state.
//!
//! Why not the SDK for everything: a [`ringpost_client::Client`] runs a driver task with
//! request correlation, an event queue, a dedup set and reconnect logic for every connection.
//! That is right for an application and too much for a generator that holds tens of thousands
//! of connections on the same two cores as the node it measures: its cost would show up as the
//! node's latency. The lean client keeps one task per connection that owns both halves.
//!
//! Every TCP connection is opened with `SO_LINGER` 0, so closing it sends a reset and leaves no
//! `TIME_WAIT` state behind: a storm of 100k reconnects (and the next run) would otherwise run
//! out of source ports.

pub mod peer;
pub mod quic;
pub mod sdk;
pub mod tls;
pub mod ws;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use ringpost_client::{Endpoint, Scheme};
use ringpost_wire::{
    Auth, Body, DeliverAck, DeliverKind, DeviceCiphertext, ErrorCode, Frame, Hello, Ping, Redirect,
    SendStatus, Welcome, PROTOCOL_VERSION,
};
use serde::{Deserialize, Serialize};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

/// Redirects followed by one connection attempt before it counts as an error.
pub const REDIRECTS_MAX: u32 = 3;
/// `Hello`s refused with `WrongOwner` tried again, and the first pause (doubling).
pub const WRONG_OWNER_RETRIES_MAX: u32 = 5;
pub const WRONG_OWNER_RETRY_MS: u64 = 100;

/// Time allowed for a TCP connect, TLS and WebSocket handshakes and the `Hello` answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The `user_agent` of every `Hello`.
pub const USER_AGENT: &str = concat!("ringpost-bench/", env!("CARGO_PKG_VERSION"));

/// Which client drives Ringpost devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    /// The lean load client: one task per connection owning its socket, nothing else.
    Lean,
    /// The client SDK (`ringpost_client::Client`), with its per-connection driver.
    Sdk,
}

/// Which transport a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// WebSocket over TCP.
    Ws,
    /// WebSocket over TLS.
    Wss,
    /// QUIC.
    Quic,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Wss => "wss",
            Transport::Quic => "quic",
        }
    }

    fn scheme(self) -> Scheme {
        match self {
            Transport::Ws => Scheme::Ws,
            Transport::Wss => Scheme::Wss,
            Transport::Quic => Scheme::Quic,
        }
    }

    pub fn of_scheme(scheme: Scheme) -> Transport {
        match scheme {
            Scheme::Ws => Transport::Ws,
            Scheme::Wss => Transport::Wss,
            Scheme::Quic => Transport::Quic,
        }
    }
}

/// One node address, resolved.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint: Endpoint,
    pub addr: SocketAddr,
}

impl Target {
    /// Parses and resolves `url` (`ws://`, `wss://` or `quic://`).
    pub async fn resolve(url: &str) -> Result<Target> {
        let endpoint = Endpoint::parse(url).with_context(|| format!("target {url}"))?;
        let addr = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
            .await
            .with_context(|| format!("resolve {url}"))?
            .next()
            .ok_or_else(|| anyhow!("{url} has no address"))?;
        Ok(Target { endpoint, addr })
    }
}

/// Opens connections to a set of targets (round robin), from one source address.
pub struct Dialer {
    pub transport: Transport,
    targets: Vec<Target>,
    next: AtomicUsize,
    source: Option<IpAddr>,
    tls: Option<tokio_rustls::TlsConnector>,
    quic: Option<quic::QuicDialer>,
    seed: AtomicU64,
}

impl Dialer {
    /// `targets` must all use `transport`'s scheme; `ca_file` is needed for `wss` and `quic`.
    pub async fn new(
        transport: Transport,
        urls: &[String],
        ca_file: Option<&std::path::Path>,
        source: Option<IpAddr>,
    ) -> Result<Dialer> {
        if urls.is_empty() {
            bail!("no target given");
        }
        let mut targets = Vec::with_capacity(urls.len());
        for url in urls {
            let t = Target::resolve(url).await?;
            if t.endpoint.scheme != transport.scheme() {
                bail!("target {url} is not a {} URL", transport.name());
            }
            targets.push(t);
        }
        let need_ca = || {
            ca_file.ok_or_else(|| {
                anyhow!(
                    "{} needs --ca-file (the dev node prints its CA path)",
                    transport.name()
                )
            })
        };
        let (tls, quic) = match transport {
            Transport::Ws => (None, None),
            Transport::Wss => {
                let config = tls::client_config(need_ca()?, false)?;
                (Some(tokio_rustls::TlsConnector::from(config)), None)
            }
            Transport::Quic => {
                let config = tls::client_config(need_ca()?, true)?;
                let v6 = targets[0].addr.is_ipv6();
                (None, Some(quic::QuicDialer::new(config, source, v6)?))
            }
        };
        Ok(Dialer {
            transport,
            targets,
            next: AtomicUsize::new(0),
            source,
            tls,
            quic,
            seed: AtomicU64::new(rand::random()),
        })
    }

    /// Opens a transport connection to the next target (no `Hello` yet).
    pub async fn connect(&self) -> Result<Conn> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len();
        let target = self.targets[i].clone();
        self.connect_to(&target).await
    }

    async fn connect_to(&self, target: &Target) -> Result<Conn> {
        let seed = self
            .seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        let ep = &target.endpoint;
        match self.transport {
            Transport::Ws => {
                let mut tcp = self.tcp(target.addr).await?;
                let leftover =
                    ws::handshake(&mut tcp, &ep.authority(), &ep.path, key(seed)).await?;
                let (r, w) = tcp.into_split();
                Ok(Conn {
                    reader: FrameReader::Ws(ws::WsReader::new(r, leftover)),
                    writer: FrameWriter::Ws(ws::WsWriter::new(w, seed)),
                })
            }
            Transport::Wss => {
                let tcp = self.tcp(target.addr).await?;
                let Some(connector) = &self.tls else {
                    bail!("no TLS configuration")
                };
                let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
                    .map_err(|e| anyhow!("TLS name {}: {e}", ep.host))?;
                let mut tls = connector
                    .connect(name, tcp)
                    .await
                    .context("TLS handshake")?;
                let leftover =
                    ws::handshake(&mut tls, &ep.authority(), &ep.path, key(seed)).await?;
                let (r, w) = tokio::io::split(tls);
                Ok(Conn {
                    reader: FrameReader::Wss(ws::WsReader::new(r, leftover)),
                    writer: FrameWriter::Wss(ws::WsWriter::new(w, seed)),
                })
            }
            Transport::Quic => {
                let Some(q) = &self.quic else {
                    bail!("no QUIC endpoint")
                };
                let (r, w) = q.connect(target.addr, &ep.host).await?;
                Ok(Conn {
                    reader: FrameReader::Quic(r),
                    writer: FrameWriter::Quic(w),
                })
            }
        }
    }

    async fn tcp(&self, addr: SocketAddr) -> Result<TcpStream> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = self.source {
            bind_source(&socket, ip)?;
        }
        socket.set_zero_linger()?;
        let stream = socket
            .connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Connects and authenticates as `auth`, following redirects. Bounded by
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect_device(&self, auth: &Auth) -> Result<(Conn, Welcome)> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_device_inner(auth))
            .await
            .map_err(|_| anyhow!("connect and Hello timed out after {CONNECT_TIMEOUT:?}"))?
    }

    /// As a client does (docs/protocol.md): a `Hello` refused with `WrongOwner` (the user's
    /// data is being handed over) is tried again on a new connection after `retry_after_ms`,
    /// or a backoff from [`WRONG_OWNER_RETRY_MS`], up to [`WRONG_OWNER_RETRIES_MAX`] times.
    async fn connect_device_inner(&self, auth: &Auth) -> Result<(Conn, Welcome)> {
        let mut retries = 0u32;
        loop {
            let e = match self.connect_device_once(auth).await {
                Err(e) => e,
                done => return done,
            };
            let wrong_owner = e
                .downcast_ref::<NodeError>()
                .filter(|n| n.code == ErrorCode::WrongOwner.as_u16());
            match wrong_owner {
                Some(n) if retries < WRONG_OWNER_RETRIES_MAX => {
                    let backoff = WRONG_OWNER_RETRY_MS << retries;
                    let wait = u64::from(n.retry_after_ms).max(backoff);
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                _ => return Err(e),
            }
        }
    }

    async fn connect_device_once(&self, auth: &Auth) -> Result<(Conn, Welcome)> {
        let mut conn = self.connect().await?;
        for _ in 0..=REDIRECTS_MAX {
            match conn.hello(Some(auth.clone())).await? {
                HelloOutcome::Welcome(w) => return Ok((conn, w)),
                HelloOutcome::Redirect(r) => {
                    conn.abort().await;
                    conn = self.connect_redirected(&r).await?;
                }
            }
        }
        bail!("more than {REDIRECTS_MAX} redirects")
    }

    /// Opens a transport connection to the node a `Redirect` names (no `Hello` yet).
    pub async fn connect_redirected(&self, r: &Redirect) -> Result<Conn> {
        let url = match self.transport {
            Transport::Ws | Transport::Wss => r.ws_url.clone(),
            Transport::Quic if r.quic_addr.contains("://") => r.quic_addr.clone(),
            Transport::Quic => format!("quic://{}", r.quic_addr),
        };
        let target = Target::resolve(&url).await?;
        self.connect_to(&target).await
    }

    /// Closes every QUIC connection at once (the end of a run); nothing for TCP.
    pub fn close_all(&self) {
        if let Some(q) = &self.quic {
            q.close_all();
        }
    }
}

/// A WebSocket key from a seed (it only has to vary).
fn key(seed: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&seed.to_le_bytes());
    k[8..].copy_from_slice(&seed.rotate_left(29).wrapping_mul(31).to_le_bytes());
    k
}

/// What a `Hello` got.
pub enum HelloOutcome {
    Welcome(Welcome),
    Redirect(Redirect),
}

/// The node refused a `Hello` or a request with `Error{code}`.
#[derive(Debug)]
pub struct NodeError {
    pub code: u16,
    pub message: String,
    pub retry_after_ms: u32,
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match ErrorCode::from_u16(self.code) {
            Some(code) => write!(f, "node error {code}: {}", self.message)?,
            None => write!(f, "node error {}: {}", self.code, self.message)?,
        }
        if self.retry_after_ms > 0 {
            write!(f, " (retry after {} ms)", self.retry_after_ms)?;
        }
        Ok(())
    }
}

impl std::error::Error for NodeError {}

/// Reading half of a connection.
pub enum FrameReader {
    Ws(ws::WsReader<OwnedReadHalf>),
    Wss(ws::WsReader<tokio::io::ReadHalf<TlsStream<TcpStream>>>),
    Quic(quic::QuicReader),
}

/// Writing half of a connection.
pub enum FrameWriter {
    Ws(ws::WsWriter<OwnedWriteHalf>),
    Wss(ws::WsWriter<tokio::io::WriteHalf<TlsStream<TcpStream>>>),
    Quic(quic::QuicWriter),
}

impl FrameReader {
    /// The next encoded frame; `Ok(None)` once the node closed. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        match self {
            FrameReader::Ws(r) => r.next().await,
            FrameReader::Wss(r) => r.next().await,
            FrameReader::Quic(r) => r.next().await,
        }
    }

    /// The next encoded frame already received, without waiting.
    pub fn buffered(&mut self) -> Result<Option<Bytes>> {
        match self {
            FrameReader::Ws(r) => r.buffered(),
            FrameReader::Wss(r) => r.buffered(),
            FrameReader::Quic(r) => r.buffered(),
        }
    }

    /// The next decoded frame; `Ok(None)` once the node closed.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>> {
        match self.next().await? {
            Some(bytes) => Ok(Some(Frame::decode(&bytes)?)),
            None => Ok(None),
        }
    }
}

impl FrameWriter {
    /// Queues an encoded frame; [`FrameWriter::flush`] writes it.
    pub fn push_encoded(&mut self, frame: &[u8]) -> Result<()> {
        match self {
            FrameWriter::Ws(w) => w.push(frame),
            FrameWriter::Wss(w) => w.push(frame),
            FrameWriter::Quic(w) => w.push(frame)?,
        }
        Ok(())
    }

    /// Encodes and queues a frame.
    pub fn push(&mut self, frame: &Frame) -> Result<()> {
        let bytes = frame.encode()?;
        self.push_encoded(&bytes)
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        match self {
            FrameWriter::Ws(w) => w.flush().await,
            FrameWriter::Wss(w) => w.flush().await,
            FrameWriter::Quic(w) => w.flush().await,
        }
    }

    /// Encodes, queues and writes one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<()> {
        self.push(frame)?;
        self.flush().await
    }
}

/// One connection: both halves, owned by one task.
pub struct Conn {
    pub reader: FrameReader,
    pub writer: FrameWriter,
}

impl Conn {
    /// Says `Hello` (anonymous without `auth`) and waits for its answer.
    pub async fn hello(&mut self, auth: Option<Auth>) -> Result<HelloOutcome> {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            auth,
            user_agent: USER_AGENT.to_string(),
        };
        self.writer.send(&Frame::new(1, hello)).await?;
        loop {
            let Some(frame) = self.reader.next_frame().await? else {
                bail!("the node closed the connection before answering Hello");
            };
            match frame.body {
                Body::Welcome(w) => return Ok(HelloOutcome::Welcome(w)),
                Body::Redirect(r) => return Ok(HelloOutcome::Redirect(r)),
                Body::Error(e) => {
                    return Err(NodeError {
                        code: e.code,
                        message: e.message,
                        retry_after_ms: e.retry_after_ms,
                    }
                    .into())
                }
                _ => continue,
            }
        }
    }

    /// Sends a request with id `req` and waits for the frame answering it, skipping others
    /// (unprompted `Deliver`s are left unacknowledged: the node sends them again later).
    pub async fn request(&mut self, req: u32, body: impl Into<Body>) -> Result<Frame> {
        self.writer.send(&Frame::new(req, body)).await?;
        loop {
            let Some(frame) = self.reader.next_frame().await? else {
                bail!("the node closed the connection");
            };
            if frame.req != req {
                continue;
            }
            if let Body::Error(e) = frame.body {
                return Err(NodeError {
                    code: e.code,
                    message: e.message,
                    retry_after_ms: e.retry_after_ms,
                }
                .into());
            }
            return Ok(frame);
        }
    }

    /// The plain-TCP socket under a `ws://` connection, out of tokio's reactor (non-blocking),
    /// with the bytes read and not decoded yet: a connection held this way costs its file
    /// descriptor and nothing else in this process. `None` for wss and QUIC, or with frames
    /// queued and not written.
    pub fn into_std_tcp(self) -> Option<(std::net::TcpStream, BytesMut)> {
        let (FrameReader::Ws(r), FrameWriter::Ws(w)) = (self.reader, self.writer) else {
            return None;
        };
        let (r, leftover) = r.into_parts();
        let tcp = r.reunite(w.into_inner()?).ok()?;
        Some((tcp.into_std().ok()?, leftover))
    }

    /// Closes the connection abruptly: a TCP reset (`SO_LINGER` 0) or a QUIC close.
    pub async fn abort(self) {
        match self.writer {
            FrameWriter::Quic(mut w) => w.close(),
            // Dropping both halves closes the socket, and linger 0 makes that a reset.
            FrameWriter::Ws(_) | FrameWriter::Wss(_) => {}
        }
    }
}

/// Opens the connections of a run: to Ringpost nodes, or to a peer broker (`compare`).
pub enum Connector {
    Ringpost(Dialer),
    /// Ringpost through the client SDK (`--client sdk`).
    Sdk(sdk::SdkConnector),
    Peer {
        protocol: peer::PeerProtocol,
        addr: SocketAddr,
        source: Option<IpAddr>,
    },
}

/// A device's connection, as [`Connector::connect`] opens it.
pub struct Connected {
    pub link: Link,
    /// How often it must ping (`None`: never).
    pub ping_every: Option<Duration>,
    /// The node it ended on, after any redirect (`Welcome.node_id`); `None` for a peer broker.
    pub node: Option<u64>,
}

impl Connector {
    /// Connects and authenticates as `auth` (peers: subscribes to the device's own topic).
    pub async fn connect(&self, auth: &Auth) -> Result<Connected> {
        match self {
            Connector::Ringpost(d) => {
                let (conn, welcome) = d.connect_device(auth).await?;
                Ok(Connected {
                    link: Link::Ringpost(conn),
                    ping_every: Some(Duration::from_millis(u64::from(welcome.ping_interval_ms))),
                    node: Some(welcome.node_id),
                })
            }
            Connector::Sdk(s) => {
                let link = s.connect(auth).await?;
                Ok(Connected {
                    node: Some(link.node_id()),
                    link: Link::Sdk(link),
                    ping_every: None,
                })
            }
            Connector::Peer {
                protocol,
                addr,
                source,
            } => {
                let work = peer::connect(*protocol, *addr, *source, auth.user);
                let conn = tokio::time::timeout(CONNECT_TIMEOUT, work)
                    .await
                    .map_err(|_| anyhow!("connect timed out after {CONNECT_TIMEOUT:?}"))??;
                Ok(Connected {
                    link: Link::Peer(conn),
                    ping_every: None,
                    node: None,
                })
            }
        }
    }

    /// Whether sends are acknowledged (Ringpost, MQTT QoS 1) or not (core NATS).
    pub fn acknowledges_sends(&self) -> bool {
        !matches!(
            self,
            Connector::Peer {
                protocol: peer::PeerProtocol::Nats,
                ..
            }
        )
    }

    /// Closes every QUIC connection at once (the end of a run); nothing for TCP.
    pub fn close_all(&self) {
        if let Connector::Ringpost(d) = self {
            d.close_all();
        }
    }
}

/// What a link received, in the scenarios' terms.
#[derive(Debug)]
pub enum Incoming {
    /// A message for this device; `ack` acknowledges it (a Ringpost seq, an MQTT packet id).
    Message {
        body: Bytes,
        ack: Option<u64>,
    },
    /// A delivery receipt (Ringpost), acknowledged like a message.
    Receipt {
        ack: u64,
    },
    /// The answer to one of our sends; `sent_ns` is when it was sent.
    SendAck {
        ok: bool,
        sent_ns: u64,
        status: String,
    },
    /// An `Error` frame about request `req` (0: the connection).
    Error {
        code: u16,
        req: u32,
        message: String,
    },
    Other,
}

/// One device's connection, whichever system it talks to.
pub enum Link {
    Ringpost(Conn),
    Sdk(sdk::SdkLink),
    Peer(peer::PeerConn),
}

impl Link {
    fn translate_frame(bytes: &Bytes) -> Result<Incoming> {
        let frame = Frame::decode(bytes)?;
        Ok(match frame.body {
            Body::Deliver(d) => match d.kind {
                DeliverKind::Message | DeliverKind::GroupMessage => Incoming::Message {
                    body: d.body,
                    ack: Some(d.seq),
                },
                // Not a message the bench counts; acked like a receipt.
                DeliverKind::Delivered
                | DeliverKind::Read
                | DeliverKind::GroupEvent
                | DeliverKind::Status
                | DeliverKind::StatusViewed
                | DeliverKind::IdentityChanged => Incoming::Receipt { ack: d.seq },
            },
            Body::SendAck(a) => {
                let mut sent = [0u8; 8];
                sent.copy_from_slice(&a.msg_id[..8]);
                Incoming::SendAck {
                    ok: a.status == SendStatus::Ok,
                    sent_ns: u64::from_le_bytes(sent),
                    status: format!("{:?}", a.status),
                }
            }
            Body::Error(e) => Incoming::Error {
                code: e.code,
                req: frame.req,
                message: e.message,
            },
            _ => Incoming::Other,
        })
    }

    fn translate_peer(e: peer::PeerEvent) -> Incoming {
        match e {
            peer::PeerEvent::Message { body, ack } => Incoming::Message {
                body,
                ack: ack.map(u64::from),
            },
            peer::PeerEvent::Acked { sent_ns } => Incoming::SendAck {
                ok: true,
                sent_ns,
                status: "Ok".into(),
            },
            peer::PeerEvent::Other => Incoming::Other,
        }
    }

    /// The next event; `Ok(None)` once the other side closed. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Incoming>> {
        match self {
            Link::Ringpost(c) => match c.reader.next().await? {
                Some(b) => Ok(Some(Self::translate_frame(&b)?)),
                None => Ok(None),
            },
            Link::Sdk(s) => s.next().await,
            Link::Peer(p) => Ok(p.next().await?.map(Self::translate_peer)),
        }
    }

    /// The next event already read, without waiting.
    pub fn buffered(&mut self) -> Result<Option<Incoming>> {
        match self {
            Link::Ringpost(c) => match c.reader.buffered()? {
                Some(b) => Ok(Some(Self::translate_frame(&b)?)),
                None => Ok(None),
            },
            Link::Sdk(s) => s.buffered(),
            Link::Peer(p) => Ok(p.buffered()?.map(Self::translate_peer)),
        }
    }

    /// Queues a message to `to` (user, device). `msg_id` starts with `sent_ns`.
    pub fn push_send(
        &mut self,
        req: u32,
        to: (u64, u32),
        msg_id: [u8; 16],
        body: Bytes,
        sent_ns: u64,
    ) -> Result<()> {
        match self {
            Link::Ringpost(c) => {
                let send = ringpost_wire::Send {
                    msg_id,
                    to: to.0,
                    ciphertexts: vec![DeviceCiphertext {
                        user: to.0,
                        device: to.1,
                        body,
                    }],
                };
                c.writer.push(&Frame::new(req, send))
            }
            Link::Sdk(s) => {
                s.push_send(req, to, msg_id, body, sent_ns);
                Ok(())
            }
            Link::Peer(p) => {
                p.push_send(to.0, &body, sent_ns);
                Ok(())
            }
        }
    }

    /// Queues acknowledgements of received messages (one frame per `per_frame` for Ringpost).
    pub fn push_acks(&mut self, acks: &[u64], req: u32, per_frame: usize) -> Result<()> {
        match self {
            Link::Ringpost(c) => {
                for chunk in acks.chunks(per_frame.max(1)) {
                    c.writer.push(&Frame::new(
                        req,
                        DeliverAck {
                            seqs: chunk.to_vec(),
                        },
                    ))?;
                }
                Ok(())
            }
            // The SDK acknowledges deliveries itself.
            Link::Sdk(_) => Ok(()),
            Link::Peer(p) => {
                for &a in acks {
                    p.push_ack(a as u16);
                }
                Ok(())
            }
        }
    }

    /// Queues a protocol ping (Ringpost only; peers need none).
    pub fn push_ping(&mut self, req: u32, nonce: u64) -> Result<()> {
        match self {
            Link::Ringpost(c) => c.writer.push(&Frame::new(req, Ping { nonce })),
            Link::Sdk(_) | Link::Peer(_) => Ok(()),
        }
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        match self {
            Link::Ringpost(c) => c.writer.flush().await,
            Link::Sdk(_) => Ok(()),
            Link::Peer(p) => p.flush().await,
        }
    }

    /// Whether sends get an acknowledgement (Ringpost `SendAck`, MQTT PUBACK) or are settled
    /// once written (core NATS).
    pub fn acknowledges_sends(&self) -> bool {
        match self {
            Link::Ringpost(_) | Link::Sdk(_) => true,
            Link::Peer(p) => p.acknowledges_sends(),
        }
    }

    /// Closes abruptly (TCP reset, QUIC close).
    pub async fn abort(self) {
        match self {
            Link::Ringpost(c) => c.abort().await,
            Link::Sdk(s) => s.close().await,
            Link::Peer(p) => drop(p),
        }
    }
}

/// Binds `socket` to the source address `ip`, leaving its port to `connect`.
///
/// `IP_BIND_ADDRESS_NO_PORT` makes the kernel choose the port at connect time, when it knows
/// the destination: a port need only be unique per destination, and the choice takes the
/// connect path's hashed lookup. A plain bind to port 0 must find a port free for every
/// destination, searching the bind buckets, which at scale is the whole cost of connecting:
/// in `million`, at 886,000 connections (about 14,000 per source address, over 72 node ports),
/// that search (`inet_csk_get_port`, `inet_bind2_bucket_find`) took 87% of both cores and new
/// connections all but stopped. Where the option is refused (not Linux), the plain bind.
pub(crate) fn bind_source(socket: &TcpSocket, ip: IpAddr) -> Result<()> {
    #[cfg(target_os = "linux")]
    if ip.is_ipv4() {
        // Best effort: a kernel without the option still binds, only slower at scale.
        let _ = nix::sys::socket::setsockopt(
            socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        );
    }
    socket
        .bind(SocketAddr::new(ip, 0))
        .with_context(|| format!("bind {ip}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's socket leaves its port to connect (Linux), and still connects from its
    /// source address.
    #[tokio::test]
    async fn a_source_address_is_bound_without_a_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        let source: IpAddr = "127.0.0.3".parse().unwrap();
        bind_source(&socket, source).unwrap();
        #[cfg(target_os = "linux")]
        assert!(nix::sys::socket::getsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort
        )
        .unwrap());
        assert_eq!(
            socket.local_addr().unwrap().port(),
            0,
            "no port before connect"
        );
        let stream = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let local = stream.local_addr().unwrap();
        assert_eq!(local.ip(), source);
        assert_ne!(local.port(), 0);
    }
}
