//! QUIC over quinn: ALPN `ringpost/1`, one bidirectional control stream opened by the client,
//! carrying frames with a u32 big-endian length prefix.
//!
//! Reads take the chunks quinn already buffered (`read_chunk`), so the driver owns no read
//! buffer; only a partial frame's bytes are kept between chunks.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Result;
use bytes::{Bytes, BytesMut};
use quinn::VarInt;
use ringpost_wire::{framing, ErrorCode};

use super::cipher;
use super::tls::{self, CertPaths};
use super::{Incoming, Transport, TransportError, WRITE_TIMEOUT_MS};

mod crypto;
pub use crypto::ServerCrypto;

/// Flow-control window of the control stream. Must hold one maximal frame (128 KiB) plus its
/// prefix; worst-case receive memory per connection when a client fills it.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 256 * 1024;

/// Connection-wide receive window (one stream, so little more than the stream's).
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 320 * 1024;

/// Bytes the node may have unacknowledged in flight to one client: bounds the send buffer a
/// slow client can make us hold.
pub const SEND_WINDOW_BYTES: u64 = 512 * 1024;

/// Streams a client may open: one control stream. Each stream costs state, so no more.
pub const BIDI_STREAMS_MAX: u32 = 1;

/// Application error codes in QUIC CONNECTION_CLOSE.
pub const CLOSE_NORMAL: u32 = 0;
/// The peer violated the protocol.
pub const CLOSE_PROTOCOL: u32 = 1;
/// The node is going away.
pub const CLOSE_GOING_AWAY: u32 = 2;

/// The quinn server configuration: TLS 1.3 with ALPN `ringpost/1` ([`ServerCrypto`], which
/// keeps no TLS state past the handshake but the key-update secrets; packet keys that keep
/// only their bytes, [`cipher`]), transport limits above.
pub fn server_config(cert: &CertPaths, idle_timeout: Duration) -> Result<quinn::ServerConfig> {
    let tls = tls::server_config_with(cert, &[tls::ALPN_CLIENT], true, cipher::provider())?;
    let crypto = ServerCrypto::new(tls)?;
    server_config_with(Arc::new(crypto), idle_timeout)
}

/// [`server_config`] over a given [`ServerCrypto`].
pub fn server_config_with(
    crypto: Arc<ServerCrypto>,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig> {
    let mut config = quinn::ServerConfig::with_crypto(crypto);
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(BIDI_STREAMS_MAX.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(STREAM_RECEIVE_WINDOW_BYTES.into())
        .receive_window(CONNECTION_RECEIVE_WINDOW_BYTES.into())
        .send_window(SEND_WINDOW_BYTES)
        .datagram_receive_buffer_size(None)
        .keep_alive_interval(None)
        .max_idle_timeout(Some(idle_timeout.try_into()?))
        // No path MTU discovery: every datagram is at most 1,200 bytes (QUIC's minimum, which
        // every path carries). quinn's transmit buffer grows by doubling to fit the largest
        // datagram it built and keeps that for the connection's life: a discovery probe (up to
        // 1,452 bytes) made it 2,400 bytes on every connection where 1,200 fit (heaptrack,
        // BENCHMARKS.md eleventh stop on issue 22). A client's traffic is small frames (media
        // goes over HTTP), so larger datagrams would save little.
        .mtu_discovery_config(None);
    config.transport_config(Arc::new(t));
    Ok(config)
}

/// One client connection's control stream.
pub struct QuicTransport {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    partial: BytesMut,
}

impl QuicTransport {
    /// Waits for the client to open its control stream.
    pub async fn accept(conn: quinn::Connection) -> Result<QuicTransport, quinn::ConnectionError> {
        let (send, recv) = conn.accept_bi().await?;
        Ok(QuicTransport {
            conn,
            send,
            recv,
            partial: BytesMut::new(),
        })
    }
}

impl Transport for QuicTransport {
    fn poll_next_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Incoming, TransportError>> {
        loop {
            match framing::decode_prefixed(&mut self.partial) {
                Ok(Some(frame)) => {
                    if self.partial.is_empty() {
                        self.partial = BytesMut::new();
                    }
                    return Poll::Ready(Ok(Incoming::Frame(frame)));
                }
                Ok(None) => {}
                Err(e) => {
                    return Poll::Ready(Err(TransportError::Protocol {
                        code: e.code(),
                        message: e.to_string(),
                    }))
                }
            }
            // A read future made for this poll and dropped after it: quinn keeps the waker
            // with the stream, so nothing is kept between polls (and reads are cancel-safe).
            let read = std::pin::pin!(self.recv.read_chunk(usize::MAX, true));
            match std::task::ready!(read.poll(cx)) {
                Ok(Some(chunk)) => {
                    if self.partial.is_empty() {
                        // Usually a chunk holds whole frames: take it without copying.
                        self.partial = BytesMut::from(chunk.bytes);
                    } else {
                        self.partial.extend_from_slice(&chunk.bytes);
                    }
                }
                Ok(None) => return Poll::Ready(Ok(Incoming::Closed)),
                Err(quinn::ReadError::ConnectionLost(_) | quinn::ReadError::ClosedStream) => {
                    return Poll::Ready(Ok(Incoming::Closed))
                }
                Err(e) => return Poll::Ready(Err(TransportError::Io(std::io::Error::other(e)))),
            }
        }
    }

    async fn write(&mut self, frames: &mut VecDeque<Bytes>) -> Result<(), TransportError> {
        let mut chunks = Vec::with_capacity(frames.len() * 2);
        for f in frames.drain(..) {
            let prefix = framing::length_prefix(f.len()).map_err(|e| TransportError::Protocol {
                code: ErrorCode::Internal,
                message: e.to_string(),
            })?;
            chunks.push(Bytes::copy_from_slice(&prefix));
            chunks.push(f);
        }
        let write = async {
            let mut rest: &mut [Bytes] = &mut chunks;
            while !rest.is_empty() {
                let written = self.send.write_chunks(rest).await?;
                rest = &mut rest[written.chunks..];
            }
            Ok::<_, quinn::WriteError>(())
        };
        tokio::time::timeout(Duration::from_millis(WRITE_TIMEOUT_MS), write)
            .await
            .map_err(|_| TransportError::WriteTimeout)?
            .map_err(|e| TransportError::Io(std::io::Error::other(e)))
    }

    async fn close(&mut self, error: Option<(ErrorCode, &str)>) {
        let _ = self.send.finish();
        let (code, reason) = match error {
            None => (CLOSE_NORMAL, ""),
            Some((ErrorCode::ShuttingDown, r)) => (CLOSE_GOING_AWAY, r),
            Some((_, r)) => (CLOSE_PROTOCOL, r),
        };
        // Give the peer a moment to receive what was written before the close frame.
        let _ = tokio::time::timeout(Duration::from_millis(200), self.send.stopped()).await;
        self.conn.close(VarInt::from_u32(code), reason.as_bytes());
    }
}
