//! QUIC on quinn: ALPN `ringpost/1`, one bidirectional control stream opened by the client,
//! frames behind a u32 big-endian length prefix (`ringpost_wire::framing`).
//!
//! Connections share a few quinn endpoints (one UDP socket and one driver task each) per
//! process instead of one each: tens of thousands of sockets and driver tasks would cost the
//! load generator more than the node, and the node tells connections apart by connection id.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::VarInt;
use ringpost_wire::framing;

/// Endpoints (UDP sockets, each with its own driver task) a process spreads its QUIC
/// connections over: enough to use both cores, few enough to cost nothing.
pub const QUIC_ENDPOINTS_PER_PROCESS: usize = 8;

/// Flow-control window of the control stream toward us: one maximal frame and its prefix with
/// room for the next. The worst-case receive buffer per connection.
pub const QUIC_STREAM_RECEIVE_WINDOW_BYTES: u32 = 256 * 1024;

/// Connection-wide receive window (one stream, so little more than the stream's).
pub const QUIC_CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 320 * 1024;

/// Unacknowledged bytes in flight toward the node, per connection.
pub const QUIC_SEND_WINDOW_BYTES: u64 = 256 * 1024;

/// A connection that hears nothing for this long is dead (protocol pings keep it busy).
pub const QUIC_IDLE_TIMEOUT_MS: u32 = 120_000;

/// Shared endpoints and the client configuration for one process.
pub struct QuicDialer {
    endpoints: Vec<quinn::Endpoint>,
    next: AtomicUsize,
    config: quinn::ClientConfig,
}

impl QuicDialer {
    /// Binds [`QUIC_ENDPOINTS_PER_PROCESS`] UDP sockets on `source` (any address when `None`).
    pub fn new(
        crypto: Arc<rustls::ClientConfig>,
        source: Option<IpAddr>,
        v6: bool,
    ) -> Result<Self> {
        let crypto = QuicClientConfig::try_from(crypto).map_err(|e| anyhow!("QUIC TLS: {e}"))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(0u32.into())
            .max_concurrent_uni_streams(0u32.into())
            .stream_receive_window(QUIC_STREAM_RECEIVE_WINDOW_BYTES.into())
            .receive_window(QUIC_CONNECTION_RECEIVE_WINDOW_BYTES.into())
            .send_window(QUIC_SEND_WINDOW_BYTES)
            .datagram_receive_buffer_size(None)
            .keep_alive_interval(None)
            .max_idle_timeout(Some(VarInt::from_u32(QUIC_IDLE_TIMEOUT_MS).into()));
        config.transport_config(Arc::new(t));
        let bind_ip = source.unwrap_or(if v6 {
            IpAddr::from([0u16; 8])
        } else {
            IpAddr::from([0u8; 4])
        });
        let endpoints = (0..QUIC_ENDPOINTS_PER_PROCESS)
            .map(|_| quinn::Endpoint::client(SocketAddr::new(bind_ip, 0)))
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("bind UDP on {bind_ip}"))?;
        Ok(QuicDialer {
            endpoints,
            next: AtomicUsize::new(0),
            config,
        })
    }

    /// Connects to `addr` (TLS name `server_name`) and opens the control stream.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<(QuicReader, QuicWriter)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        let conn = self.endpoints[i]
            .connect_with(self.config.clone(), addr, server_name)?
            .await
            .context("QUIC handshake")?;
        let (send, recv) = conn.open_bi().await.context("QUIC open stream")?;
        Ok((
            QuicReader {
                recv,
                partial: BytesMut::new(),
                closed: false,
            },
            QuicWriter {
                send,
                conn,
                out: BytesMut::new(),
            },
        ))
    }

    /// Closes every endpoint's connections at once (used when the run ends).
    pub fn close_all(&self) {
        for e in &self.endpoints {
            e.close(VarInt::from_u32(0), b"bench done");
        }
    }
}

/// The node's half of the control stream.
pub struct QuicReader {
    recv: quinn::RecvStream,
    /// A partial frame; empty between frames.
    partial: BytesMut,
    closed: bool,
}

impl QuicReader {
    /// The next frame already read, without waiting.
    pub fn buffered(&mut self) -> Result<Option<Bytes>> {
        Ok(framing::decode_prefixed(&mut self.partial)?)
    }

    /// The next frame; `Ok(None)` once the node closed. Cancel-safe (quinn's `read_chunk`).
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(Some(frame));
            }
            if self.closed {
                return Ok(None);
            }
            match self.recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => {
                    if self.partial.is_empty() {
                        self.partial = BytesMut::from(chunk.bytes);
                    } else {
                        self.partial.extend_from_slice(&chunk.bytes);
                    }
                }
                Ok(None) => {
                    self.closed = true;
                    return Ok(None);
                }
                Err(quinn::ReadError::ConnectionLost(
                    quinn::ConnectionError::ApplicationClosed(_)
                    | quinn::ConnectionError::LocallyClosed,
                )) => {
                    self.closed = true;
                    return Ok(None);
                }
                Err(e) => return Err(anyhow!("QUIC read: {e}")),
            }
        }
    }
}

/// Our half of the control stream, and the connection it keeps alive.
pub struct QuicWriter {
    send: quinn::SendStream,
    conn: quinn::Connection,
    out: BytesMut,
}

impl QuicWriter {
    /// Queues one encoded frame behind its length prefix.
    pub fn push(&mut self, frame: &[u8]) -> Result<()> {
        let prefix = framing::length_prefix(frame.len())?;
        self.out.reserve(prefix.len() + frame.len());
        self.out.put_slice(&prefix);
        self.out.put_slice(frame);
        Ok(())
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            let out = self.out.split().freeze();
            self.send.write_chunk(out).await.context("QUIC write")?;
        }
        Ok(())
    }

    /// Closes the connection at once (no linger: the node sees an application close).
    pub fn close(&mut self) {
        let _ = self.send.finish();
        self.conn.close(VarInt::from_u32(0), b"bench closed");
    }
}

impl Drop for QuicWriter {
    fn drop(&mut self) {
        self.conn.close(VarInt::from_u32(0), b"bench dropped");
    }
}
