//! [`Connection`]: one transport connection to a node (WebSocket, WebSocket over TLS, or QUIC),
//! moving whole frames. No handshake beyond the transport's own, no reconnects, no correlation:
//! that is [`crate::Client`]. Tests of the node's input handling use this directly, including
//! its raw methods that send what a well-behaved client never would.
//!
//! # IO model and memory
//! A connection is two halves, a reader and a writer, driven inline by whoever holds them; it
//! spawns no task (QUIC connections share one quinn endpoint driver per runtime). The
//! [`crate::Client`] puts the reader in its one task per connection and lets request callers
//! write directly under a lock, so there is no send queue. What an idle connection owns beyond
//! the kernel's socket, measured against a dev node with 2000 connections: over `ws://` about
//! 0.6 KiB (no read buffer: it waits for readiness and reserves [`READ_CHUNK_BYTES`] only to
//! read); over `wss://` about 9 KiB (one such chunk plus rustls' state); over QUIC about 30 KiB
//! of quinn connection state on the shared endpoint (its buffers bounded by the `QUIC_*`
//! windows). A [`crate::Client`] adds its task, state and queues, about 9 KiB.

mod quic;
mod ws;

use bytes::Bytes;
use ringpost_wire::ws::OpCode;
use ringpost_wire::Frame;

use crate::endpoint::{Endpoint, Scheme};
use crate::error::{ClientError, Result};
use crate::tls::{self, TlsOptions, TlsUse};

pub use self::quic::{
    QUIC_CLOSE_LINGER_MS, QUIC_CLOSE_REASON_WAIT_MS, QUIC_CONNECTION_RECEIVE_WINDOW_BYTES,
    QUIC_IDLE_TIMEOUT_MS, QUIC_SEND_WINDOW_BYTES, QUIC_STREAM_RECEIVE_WINDOW_BYTES,
};
pub use self::ws::READ_CHUNK_BYTES;

/// How long [`Connection::recv`] spends answering the node's close before reporting it.
pub const CLOSE_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// How the node closed the connection, when it said: the WebSocket close code and reason, or the
/// QUIC application close code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerClose {
    pub code: Option<u32>,
    pub reason: String,
}

/// What the reader produced.
pub(crate) enum Inbound {
    /// One complete frame's bytes (not yet decoded).
    Frame(Bytes),
    /// A WebSocket ping to answer with a pong.
    Ping(Bytes),
    /// The node closed the connection (with its reason, if it gave one).
    Closed(Option<PeerClose>),
}

/// The reading half of a connection.
pub(crate) enum Reader {
    Ws(ws::WsReader),
    Quic(quic::QuicReader),
}

impl Reader {
    /// The next thing from the node. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Result<Inbound> {
        match self {
            Reader::Ws(r) => r.next().await,
            Reader::Quic(r) => r.next().await,
        }
    }
}

/// The writing half of a connection.
///
/// A write cancelled half way (its future dropped) leaves a partial frame on the stream, after
/// which nothing written can be parsed by the node: the writer then refuses every further write
/// with [`ClientError::Disconnected`], and its owner drops the connection.
pub(crate) struct Writer {
    io: WriteIo,
    /// A write started and did not finish.
    torn: bool,
    /// [`Writer::close`] ran: later closes do nothing.
    closed: bool,
}

enum WriteIo {
    Ws(ws::WsWriter),
    Quic(quic::QuicWriter),
}

impl Writer {
    /// Sends encoded frame bytes as one WebSocket binary message or one length-prefixed QUIC
    /// frame.
    pub(crate) async fn send_message(&mut self, payload: &[u8]) -> Result<()> {
        self.guarded(|io| async move {
            match io {
                WriteIo::Ws(w) => w.send(OpCode::Binary, payload).await,
                WriteIo::Quic(w) => w.send_prefixed(payload).await,
            }
        })
        .await
    }

    async fn send_text(&mut self, text: &str) -> Result<()> {
        self.guarded(|io| async move {
            match io {
                WriteIo::Ws(w) => w.send(OpCode::Text, text.as_bytes()).await,
                WriteIo::Quic(_) => Err(ClientError::Protocol(
                    "text messages exist only on WebSocket".to_string(),
                )),
            }
        })
        .await
    }

    async fn write_transport_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.guarded(|io| async move {
            match io {
                WriteIo::Ws(w) => w.write_all(bytes).await,
                WriteIo::Quic(w) => w.write_all(bytes).await,
            }
        })
        .await
    }

    /// Answers a WebSocket ping.
    pub(crate) async fn pong(&mut self, payload: &Bytes) -> Result<()> {
        self.guarded(|io| async move {
            match io {
                WriteIo::Ws(w) => w.pong(payload).await,
                WriteIo::Quic(_) => Ok(()),
            }
        })
        .await
    }

    /// Closes cleanly: a WebSocket close frame (1000), or a QUIC close (code 0).
    pub(crate) async fn close(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        match &mut self.io {
            WriteIo::Ws(w) if !self.torn => w.close(1000, "").await,
            WriteIo::Ws(_) => Ok(()),
            WriteIo::Quic(w) => w.close().await,
        }
    }

    async fn guarded<'a, F, Fut>(&'a mut self, write: F) -> Result<()>
    where
        F: FnOnce(&'a mut WriteIo) -> Fut,
        Fut: std::future::Future<Output = Result<()>> + 'a,
    {
        if self.torn {
            return Err(ClientError::Disconnected);
        }
        self.torn = true;
        let result = write(&mut self.io).await;
        // A failed write may also have left part of a frame behind: stay torn.
        if result.is_ok() {
            self.torn = false;
        }
        result
    }
}

/// One connection to a node, moving frames. See the module documentation.
pub struct Connection {
    reader: Reader,
    writer: Writer,
    scheme: Scheme,
    peer_close: Option<PeerClose>,
    closed: bool,
}

impl Connection {
    /// Connects to `endpoint`: TCP and the WebSocket upgrade (with TLS for `wss://`), or QUIC on
    /// the runtime's shared quinn endpoint. No time limit of its own: wrap it in
    /// `tokio::time::timeout`.
    pub async fn open(endpoint: &Endpoint, tls: &TlsOptions) -> Result<Connection> {
        let (reader, writer) = match endpoint.scheme {
            Scheme::Ws => {
                let (r, w) = ws::open(endpoint, None).await?;
                (Reader::Ws(r), WriteIo::Ws(w))
            }
            Scheme::Wss => {
                let config = tls::client_config(tls, TlsUse::WebSocket)?;
                let (r, w) = ws::open(endpoint, Some(config)).await?;
                (Reader::Ws(r), WriteIo::Ws(w))
            }
            Scheme::Quic => {
                let config = tls::client_config(tls, TlsUse::Quic)?;
                let (r, w) = quic::open(endpoint, config, None).await?;
                (Reader::Quic(r), WriteIo::Quic(w))
            }
        };
        Ok(Connection::from_parts(reader, writer, endpoint.scheme))
    }

    /// Connects to a `quic://` endpoint through a quinn endpoint the caller provides (its own
    /// UDP socket and source port, for instance). Create it with `quinn::Endpoint::client` on an
    /// address of the target's family.
    pub async fn open_quic_on(
        quic_endpoint: &quinn::Endpoint,
        endpoint: &Endpoint,
        tls: &TlsOptions,
    ) -> Result<Connection> {
        if endpoint.scheme != Scheme::Quic {
            return Err(ClientError::InvalidUrl {
                url: endpoint.to_string(),
                reason: "open_quic_on needs a quic:// endpoint".to_string(),
            });
        }
        let config = tls::client_config(tls, TlsUse::Quic)?;
        let (r, w) = quic::open(endpoint, config, Some(quic_endpoint)).await?;
        Ok(Connection::from_parts(
            Reader::Quic(r),
            WriteIo::Quic(w),
            Scheme::Quic,
        ))
    }

    fn from_parts(reader: Reader, io: WriteIo, scheme: Scheme) -> Connection {
        Connection {
            reader,
            writer: Writer {
                io,
                torn: false,
                closed: false,
            },
            scheme,
            peer_close: None,
            closed: false,
        }
    }

    /// The transport this connection uses.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Encodes `frame` (every protocol bound checked) and sends it.
    pub async fn send(&mut self, frame: &Frame) -> Result<()> {
        let bytes = frame.encode()?;
        self.writer.send_message(&bytes).await
    }

    /// Sends `bytes` as one WebSocket binary message, or behind a length prefix on QUIC, without
    /// any check: for tests of the node's handling of malformed or oversized frames.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.send_message(bytes).await
    }

    /// Sends a WebSocket text message, which the protocol forbids (the node must refuse it).
    /// Fails with [`ClientError::Protocol`] on QUIC.
    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        self.writer.send_text(text).await
    }

    /// Writes bytes straight onto the transport stream, bypassing WebSocket framing or the QUIC
    /// length prefix: for tests of the node's framing checks (an unmasked WebSocket frame, a
    /// length prefix over the bound).
    pub async fn send_transport_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_transport_bytes(bytes).await
    }

    /// The next frame from the node; `Ok(None)` once it has closed the connection (see
    /// [`Connection::peer_close`] for its reason). Answers WebSocket pings on the way.
    pub async fn recv(&mut self) -> Result<Option<Frame>> {
        match self.recv_raw().await? {
            Some(bytes) => Ok(Some(Frame::decode_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Like [`Connection::recv`], without decoding.
    pub async fn recv_raw(&mut self) -> Result<Option<Bytes>> {
        if self.closed {
            return Ok(None);
        }
        loop {
            match self.reader.next().await? {
                Inbound::Frame(bytes) => return Ok(Some(bytes)),
                Inbound::Ping(payload) => self.writer.pong(&payload).await?,
                Inbound::Closed(close) => {
                    self.closed = true;
                    self.peer_close = close;
                    // Complete the closing handshake (best effort: the node may be gone).
                    let _ = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, self.writer.close()).await;
                    return Ok(None);
                }
            }
        }
    }

    /// How the node closed the connection, once [`Connection::recv`] returned `None` and if the
    /// node said (WebSocket close code, QUIC application code).
    pub fn peer_close(&self) -> Option<&PeerClose> {
        self.peer_close.as_ref()
    }

    /// Closes the connection cleanly (WebSocket close 1000, QUIC close 0).
    pub async fn close(mut self) -> Result<()> {
        self.writer.close().await
    }

    pub(crate) fn into_parts(self) -> (Reader, Writer) {
        (self.reader, self.writer)
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("scheme", &self.scheme)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}
