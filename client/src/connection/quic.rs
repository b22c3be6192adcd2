//! QUIC over quinn: ALPN `ringpost/1`, one bidirectional stream opened by the client, frames
//! behind a u32 big-endian length prefix (`ringpost_wire::framing`).
//!
//! Connections share a quinn endpoint (one UDP socket and one driver task) per tokio runtime and
//! address family: an endpoint keeps a receive buffer sized for a batch of GRO datagrams, so one
//! per connection measured ~200 KiB resident each against ~30 KiB for a connection on a shared
//! one. The shared endpoint lives as long as a connection uses it (weak registry, pruned on each
//! open), and is per runtime because its driver task runs on the runtime that created it: the
//! parallel tests of one process each have their own. A caller that wants its own socket (a
//! distinct source port per connection, say) passes an endpoint to
//! [`super::Connection::open_quic_on`].

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::VarInt;
use ringpost_wire::framing::{self, LENGTH_PREFIX_BYTES};

use super::{Inbound, PeerClose};
use crate::endpoint::Endpoint;
use crate::error::{ClientError, Result};

/// Flow-control window of the stream toward us. Holds one maximal frame (128 KiB) and its prefix
/// with room for the next; the worst-case receive buffer per connection when the node fills it.
pub const QUIC_STREAM_RECEIVE_WINDOW_BYTES: u32 = 256 * 1024;

/// Connection-wide receive window: one stream, so little more than the stream's.
pub const QUIC_CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 320 * 1024;

/// Bytes we keep unacknowledged in flight to the node: bounds our send buffer per connection.
pub const QUIC_SEND_WINDOW_BYTES: u64 = 256 * 1024;

/// A QUIC connection that hears nothing for this long is dead. The SDK's protocol pings
/// (`Welcome.ping_interval_ms`, 30 s by default) keep a live one busy; this catches a peer that
/// vanished when pings are off.
pub const QUIC_IDLE_TIMEOUT_MS: u32 = 120_000;

/// How long closing the last connection of a shared endpoint waits for the node to receive the
/// close before the socket goes away.
pub const QUIC_CLOSE_LINGER_MS: u64 = 250;

/// After the node finished its stream, how long a read waits for its CONNECTION_CLOSE to report
/// the close code and reason ([`super::PeerClose`]).
pub const QUIC_CLOSE_REASON_WAIT_MS: u64 = 250;

/// Application close code for a normal close (the node uses the same values).
pub const QUIC_CLOSE_NORMAL: u32 = 0;

/// The shared transport configuration: windows above, no streams or datagrams from the server.
fn transport_config() -> Arc<quinn::TransportConfig> {
    static CONFIG: OnceLock<Arc<quinn::TransportConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut t = quinn::TransportConfig::default();
            t.max_concurrent_bidi_streams(0u32.into())
                .max_concurrent_uni_streams(0u32.into())
                .stream_receive_window(QUIC_STREAM_RECEIVE_WINDOW_BYTES.into())
                .receive_window(QUIC_CONNECTION_RECEIVE_WINDOW_BYTES.into())
                .send_window(QUIC_SEND_WINDOW_BYTES)
                .datagram_receive_buffer_size(None)
                .keep_alive_interval(None)
                .max_idle_timeout(Some(VarInt::from_u32(QUIC_IDLE_TIMEOUT_MS).into()));
            Arc::new(t)
        })
        .clone()
}

/// A quinn client endpoint shared by the connections of one runtime (see the module docs).
pub(crate) struct SharedEndpoint {
    endpoint: quinn::Endpoint,
}

/// Live shared endpoints: (runtime, IPv6?, endpoint). At most two per live tokio runtime.
static SHARED_ENDPOINTS: Mutex<Vec<(tokio::runtime::Id, bool, Weak<SharedEndpoint>)>> =
    Mutex::new(Vec::new());

/// The shared endpoint of the current runtime for the family of `addr`, created if needed.
fn shared_endpoint(addr: SocketAddr) -> Result<Arc<SharedEndpoint>> {
    let runtime = tokio::runtime::Handle::current().id();
    let v6 = addr.is_ipv6();
    let mut all = SHARED_ENDPOINTS.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|(_, _, weak)| weak.strong_count() > 0);
    let found = all
        .iter()
        .filter(|(r, family, _)| *r == runtime && *family == v6)
        .find_map(|(_, _, weak)| weak.upgrade());
    if let Some(shared) = found {
        return Ok(shared);
    }
    let bind: SocketAddr = if v6 {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let shared = Arc::new(SharedEndpoint {
        endpoint: quinn::Endpoint::client(bind)?,
    });
    all.push((runtime, v6, Arc::downgrade(&shared)));
    Ok(shared)
}

/// The reading side: the node's half of the stream.
pub(crate) struct QuicReader {
    recv: quinn::RecvStream,
    conn: quinn::Connection,
    /// Bytes of a partial frame; empty and unallocated between frames.
    partial: BytesMut,
}

/// The writing side: our half of the stream, and what keeps the connection alive.
pub(crate) struct QuicWriter {
    send: quinn::SendStream,
    conn: quinn::Connection,
    /// The runtime's shared endpoint this connection keeps alive; `None` when the caller
    /// passed one.
    endpoint: Option<Arc<SharedEndpoint>>,
}

/// Resolves the endpoint's host, connects on `shared` or a fresh endpoint, and opens the stream.
pub(crate) async fn open(
    endpoint: &Endpoint,
    crypto: Arc<rustls::ClientConfig>,
    shared: Option<&quinn::Endpoint>,
) -> Result<(QuicReader, QuicWriter)> {
    let addr = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
        .await?
        .next()
        .ok_or_else(|| {
            ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} has no address", endpoint.host),
            ))
        })?;
    let own = match shared {
        Some(_) => None,
        None => Some(shared_endpoint(addr)?),
    };
    let quic_endpoint = match (shared, &own) {
        (Some(endpoint), _) => endpoint,
        (None, Some(own)) => &own.endpoint,
        (None, None) => unreachable!("own is set when shared is not"),
    };
    let crypto = QuicClientConfig::try_from(crypto).map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config());
    let conn = quic_endpoint
        .connect_with(config, addr, &endpoint.host)
        .map_err(|e| ClientError::Quic(e.to_string()))?
        .await
        .map_err(connection_error)?;
    let (send, recv) = conn.open_bi().await.map_err(connection_error)?;
    Ok((
        QuicReader {
            recv,
            conn: conn.clone(),
            partial: BytesMut::new(),
        },
        QuicWriter {
            send,
            conn,
            endpoint: own,
        },
    ))
}

fn connection_error(e: quinn::ConnectionError) -> ClientError {
    match e {
        // A failed TLS handshake is a transport error in the CRYPTO_ERROR range (RFC 9000
        // §20.1: 0x0100-0x01ff, the TLS alert in the low byte).
        quinn::ConnectionError::TransportError(t)
            if (0x100..=0x1ff).contains(&u64::from(t.code)) =>
        {
            ClientError::Tls(t.to_string())
        }
        quinn::ConnectionError::ConnectionClosed(c)
            if (0x100..=0x1ff).contains(&u64::from(c.error_code)) =>
        {
            ClientError::Tls(c.to_string())
        }
        quinn::ConnectionError::TimedOut => ClientError::Timeout("QUIC connection"),
        other => ClientError::Quic(other.to_string()),
    }
}

fn peer_close(e: &quinn::ConnectionError) -> Option<PeerClose> {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => Some(PeerClose {
            code: u32::try_from(close.error_code.into_inner()).ok(),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        }),
        _ => None,
    }
}

impl QuicReader {
    /// The next frame. Cancel-safe: quinn's `read_chunk` either returns a chunk or reads nothing.
    pub(crate) async fn next(&mut self) -> Result<Inbound> {
        loop {
            if let Some(frame) = framing::decode_prefixed(&mut self.partial)? {
                if self.partial.is_empty() {
                    self.partial = BytesMut::new();
                }
                return Ok(Inbound::Frame(frame));
            }
            match self.recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => {
                    if self.partial.is_empty() {
                        // Usually a chunk holds whole frames: take it without copying.
                        self.partial = BytesMut::from(chunk.bytes);
                    } else {
                        self.partial.extend_from_slice(&chunk.bytes);
                    }
                }
                Ok(None) => {
                    // The node finishes its stream and then closes the connection with a code
                    // and reason: wait a moment for them.
                    let wait = Duration::from_millis(QUIC_CLOSE_REASON_WAIT_MS);
                    let closed = tokio::time::timeout(wait, self.conn.closed()).await;
                    return Ok(Inbound::Closed(closed.ok().as_ref().and_then(peer_close)));
                }
                Err(quinn::ReadError::ConnectionLost(e)) => {
                    return match peer_close(&e) {
                        Some(close) => Ok(Inbound::Closed(Some(close))),
                        None if matches!(e, quinn::ConnectionError::LocallyClosed) => {
                            Ok(Inbound::Closed(None))
                        }
                        None => Err(connection_error(e)),
                    }
                }
                Err(quinn::ReadError::Reset(code)) => {
                    return Ok(Inbound::Closed(Some(PeerClose {
                        code: u32::try_from(code.into_inner()).ok(),
                        reason: "stream reset".into(),
                    })))
                }
                Err(quinn::ReadError::ClosedStream) => return Ok(Inbound::Closed(None)),
                Err(e) => return Err(ClientError::Quic(e.to_string())),
            }
        }
    }
}

impl QuicWriter {
    /// Writes `payload` behind its length prefix. The prefix is not checked against the frame
    /// bound, so tests can send what a well-behaved client never would.
    pub(crate) async fn send_prefixed(&mut self, payload: &[u8]) -> Result<()> {
        let len = u32::try_from(payload.len()).map_err(|_| {
            ClientError::Protocol("a QUIC frame is at most u32::MAX bytes".to_string())
        })?;
        let mut out = BytesMut::with_capacity(LENGTH_PREFIX_BYTES + payload.len());
        out.put_u32(len);
        out.put_slice(payload);
        self.write_all(&out).await
    }

    /// Writes bytes on the stream as they are.
    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.send.write_all(bytes).await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(e) => connection_error(e),
            other => ClientError::Quic(other.to_string()),
        })
    }

    /// Finishes the stream and closes the connection. If it was the last connection on the
    /// shared endpoint, waits briefly for the close to reach the node before the endpoint goes.
    pub(crate) async fn close(&mut self) -> Result<()> {
        let _ = self.send.finish();
        self.conn
            .close(VarInt::from_u32(QUIC_CLOSE_NORMAL), b"client closed");
        if let Some(shared) = &self.endpoint {
            if Arc::strong_count(shared) == 1 {
                let linger = Duration::from_millis(QUIC_CLOSE_LINGER_MS);
                let _ = tokio::time::timeout(linger, shared.endpoint.wait_idle()).await;
            }
        }
        Ok(())
    }
}

impl Drop for QuicWriter {
    fn drop(&mut self) {
        // Without this a dropped connection lingers until its idle timeout.
        self.conn
            .close(VarInt::from_u32(QUIC_CLOSE_NORMAL), b"client dropped");
    }
}
