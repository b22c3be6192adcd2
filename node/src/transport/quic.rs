//! QUIC over quinn: ALPN `ringpost/1`, one bidirectional control stream opened by the client,
//! carrying frames with a u32 big-endian length prefix.
//!
//! Reads take the chunks quinn already buffered (`read_chunk`), so the driver owns no read
//! buffer; only a partial frame's bytes are kept between chunks.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Result;
use bytes::{Bytes, BytesMut};
use quinn_proto as proto;
use quinn_proto::{ConnectionError, StreamId};
use ringpost_wire::{framing, ErrorCode};

use super::cipher;
use super::tls::{self, CertPaths};
use super::{Incoming, Transport, TransportError, WRITE_TIMEOUT_MS};

mod crypto;
pub mod driver;
pub use crypto::ServerCrypto;
use driver::{ConnRef, Connecting};

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

/// One client connection's control stream, served by the endpoint's [`driver`].
pub struct QuicTransport {
    conn: ConnRef,
    stream: StreamId,
    partial: BytesMut,
}

impl QuicTransport {
    /// Waits for the handshake and for the client to open its control stream.
    pub async fn accept(connecting: Connecting) -> Result<QuicTransport, ConnectionError> {
        let (conn, stream) = connecting.await?;
        Ok(QuicTransport {
            conn,
            stream,
            partial: BytesMut::new(),
        })
    }

    /// Takes what the control stream has received (under the connection's lock): `Ready(true)`
    /// when bytes were added to `partial`, `Ready(false)` at the stream's or the connection's
    /// end, `Pending` (the waker kept) when nothing has arrived.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut st = self.conn.lock();
        if st.lost.is_some() {
            return Poll::Ready(false);
        }
        let Some(conn) = st.conn.as_mut() else {
            return Poll::Ready(false);
        };
        let mut stream = conn.recv_stream(self.stream);
        let Ok(mut chunks) = stream.read(true) else {
            return Poll::Ready(false);
        };
        let mut got = false;
        let mut ended = false;
        loop {
            match chunks.next(usize::MAX) {
                Ok(Some(chunk)) => {
                    got = true;
                    if self.partial.is_empty() {
                        // Usually a chunk holds whole frames: take it without copying.
                        self.partial = BytesMut::from(chunk.bytes);
                    } else {
                        self.partial.extend_from_slice(&chunk.bytes);
                    }
                }
                Ok(None) | Err(proto::ReadError::Reset(_)) => {
                    ended = true;
                    break;
                }
                Err(proto::ReadError::Blocked) => break,
            }
        }
        // Reading may open the client's flow-control window: the driver sends that.
        if chunks.finalize().should_transmit() {
            self.conn.queue(&mut st);
        }
        if got {
            Poll::Ready(true)
        } else if ended {
            Poll::Ready(false)
        } else {
            ConnRef::wait_readable(&mut st, cx);
            Poll::Pending
        }
    }

    /// Writes as many of `chunks` as the stream takes now; `Ready` once all are written.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        chunks: &mut [Bytes],
        done: &mut usize,
    ) -> Poll<Result<(), TransportError>> {
        let mut st = self.conn.lock();
        if let Some(e) = &st.lost {
            return Poll::Ready(Err(TransportError::Io(std::io::Error::other(e.clone()))));
        }
        let Some(conn) = st.conn.as_mut() else {
            return Poll::Ready(Err(TransportError::Io(std::io::Error::other(
                "connection closed",
            ))));
        };
        let mut wrote = false;
        let result = loop {
            if *done == chunks.len() {
                break Poll::Ready(Ok(()));
            }
            match conn
                .send_stream(self.stream)
                .write_chunks(&mut chunks[*done..])
            {
                Ok(written) => {
                    wrote |= written.bytes > 0;
                    *done += written.chunks;
                }
                Err(proto::WriteError::Blocked) => {
                    ConnRef::wait_writable(&mut st, cx);
                    break Poll::Pending;
                }
                Err(e) => break Poll::Ready(Err(TransportError::Io(std::io::Error::other(e)))),
            }
        };
        if wrote {
            self.conn.queue(&mut st);
        }
        result
    }

    /// Ends the control stream; `Ready` once the client acknowledged all of it (or the
    /// connection ended).
    fn poll_finished(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.conn.lock();
        if st.finished || st.lost.is_some() {
            return Poll::Ready(());
        }
        match st.conn.as_mut() {
            Some(conn) if !conn.is_closed() => match conn.send_stream(self.stream).stopped() {
                Ok(None) => {}
                _ => return Poll::Ready(()),
            },
            _ => return Poll::Ready(()),
        }
        ConnRef::wait_writable(&mut st, cx);
        Poll::Pending
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
            if !std::task::ready!(self.poll_receive(cx)) {
                return Poll::Ready(Ok(Incoming::Closed));
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
        let mut done = 0;
        let write = std::future::poll_fn(|cx| self.poll_write(cx, &mut chunks, &mut done));
        tokio::time::timeout(Duration::from_millis(WRITE_TIMEOUT_MS), write)
            .await
            .map_err(|_| TransportError::WriteTimeout)?
    }

    async fn close(&mut self, error: Option<(ErrorCode, &str)>) {
        {
            let mut st = self.conn.lock();
            if let Some(conn) = st.conn.as_mut() {
                if conn.send_stream(self.stream).finish().is_ok() {
                    self.conn.queue(&mut st);
                }
            }
        }
        let (code, reason) = match error {
            None => (CLOSE_NORMAL, ""),
            Some((ErrorCode::ShuttingDown, r)) => (CLOSE_GOING_AWAY, r),
            Some((_, r)) => (CLOSE_PROTOCOL, r),
        };
        // Give the peer a moment to receive what was written before the close frame.
        let finished = std::future::poll_fn(|cx| self.poll_finished(cx));
        let _ = tokio::time::timeout(Duration::from_millis(200), finished).await;
        self.conn.close(code, reason.as_bytes());
    }
}

/// What tests of the QUIC listener share.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use crate::transport::tls::{self, CertPaths};

    /// A quinn client endpoint on loopback that trusts `cert`'s CA and speaks ALPN
    /// `ringpost/1` over TLS 1.3.
    pub fn client(cert: &CertPaths) -> quinn::Endpoint {
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(cert.ca.as_ref().expect("a dev certificate's CA")).unwrap();
        for c in rustls_pemfile::certs(&mut &ca[..]) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut client_tls = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_tls.alpn_protocols = vec![tls::ALPN_CLIENT.to_vec()];
        let client_crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(client_tls)).unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(quinn::ClientConfig::new(Arc::new(client_crypto)));
        client
    }
}
