//! WebSocket over TCP (`ws://`) and over TLS (`wss://`): one binary message is one frame.
//!
//! Reading: try a non-blocking read into the worker's buffer first, wait for readiness only when
//! there is nothing to read, and keep only the leftover bytes of a partial message between
//! reads. The stream (TCP, or TLS over it) is polled once with a no-op waker while the worker's
//! buffer is borrowed, and readiness is awaited on the TCP socket underneath.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ringpost_wire::ws::{self, Decoder, Message, OpCode, Role};
use ringpost_wire::{limits, ErrorCode};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{with_read_buf, Incoming, Transport, TransportError, WRITE_TIMEOUT_MS};

/// The byte stream under the WebSocket.
pub enum WsStream {
    Plain(TcpStream),
    /// Boxed, as the TLS state is larger than the other variants (rustls' connection during
    /// the handshake and for TLS 1.2, the record layer after a TLS 1.3 handshake).
    Tls(Box<super::wss::TlsConn>),
    /// Driven by the listener's io_uring driver ([`super::uring`]).
    #[cfg(target_os = "linux")]
    Uring(super::uring::UringStream),
    /// TLS over a connection of the io_uring driver.
    #[cfg(target_os = "linux")]
    UringTls(Box<super::wss::TlsConn<super::uring::UringStream>>),
}

impl WsStream {
    /// Whether TLS output waits for the next write (see [`super::wss`]).
    fn has_pending_output(&self) -> bool {
        match self {
            WsStream::Tls(s) => s.has_pending_output(),
            #[cfg(target_os = "linux")]
            WsStream::UringTls(s) => s.has_pending_output(),
            _ => false,
        }
    }

    /// Polls one read appended to `dst`: `Ready(Ok(0))` is end of stream; `Pending` registers
    /// `cx` for the socket's readiness. Reads go to the worker's buffer, so only what arrived
    /// is copied to `dst` (which is empty and unallocated between messages).
    ///
    /// `poll_read` rather than `try_read`: a read that fills less than the buffer tells tokio the
    /// socket is drained, so the next read waits for readiness instead of paying a system call
    /// for EAGAIN (one per frame at low rates).
    fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            WsStream::Plain(s) => with_read_buf(|buf| {
                let mut rb = ReadBuf::new(buf);
                Pin::new(s).poll_read(cx, &mut rb).map_ok(|()| {
                    dst.extend_from_slice(rb.filled());
                    rb.filled().len()
                })
            }),
            // Reads into the worker's buffer too, and decrypts into `dst`.
            WsStream::Tls(s) => s.poll_read_some(cx, dst),
            #[cfg(target_os = "linux")]
            WsStream::Uring(s) => s.poll_read_some(cx, dst),
            #[cfg(target_os = "linux")]
            WsStream::UringTls(s) => s.poll_read_some(cx, dst),
        }
    }

    /// Reads at least one byte into `dst` (0 at end of stream).
    pub async fn read_some(&mut self, dst: &mut BytesMut) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_some(cx, dst)).await
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            WsStream::Plain(s) => s.write_all(bytes).await,
            WsStream::Tls(s) => s.write_all(bytes).await,
            #[cfg(target_os = "linux")]
            WsStream::Uring(s) => s.send(Bytes::copy_from_slice(bytes)).await,
            #[cfg(target_os = "linux")]
            WsStream::UringTls(s) => s.write_all(bytes).await,
        }
    }

    /// [`WsStream::write_all`] of a buffer it may keep (io_uring sends it without a copy).
    async fn write_buf(&mut self, bytes: BytesMut) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            WsStream::Uring(s) => s.send(bytes.freeze()).await,
            _ => self.write_all(&bytes).await,
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            WsStream::Plain(s) => s.shutdown().await,
            WsStream::Tls(s) => s.shutdown().await,
            #[cfg(target_os = "linux")]
            WsStream::Uring(s) => {
                s.shutdown();
                Ok(())
            }
            #[cfg(target_os = "linux")]
            WsStream::UringTls(s) => s.shutdown().await,
        };
    }
}

/// Why a WebSocket upgrade failed (the HTTP answer was already written when it could be).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("bad upgrade request: {0}")]
    Handshake(#[from] ws::HandshakeError),
    #[error("peer closed before completing the upgrade")]
    Closed,
}

/// A server-side WebSocket connection after the upgrade.
pub struct WsTransport {
    stream: WsStream,
    decoder: Decoder,
    /// Bytes of a partial WebSocket frame; empty and unallocated while idle.
    partial: BytesMut,
    /// The payload of the latest `Ping` not answered yet. Reads never write (they may be
    /// cancelled at any await, and a half-written control frame would corrupt the stream):
    /// the `Pong` leaves with the next [`Transport::write`]. Only the latest ping is answered
    /// (RFC 6455 §5.5.3), so a ping flood queues one pong at most.
    pong: Option<Bytes>,
    closed: bool,
}

impl WsTransport {
    /// Reads the HTTP upgrade request, answers it, and returns the transport. The caller
    /// bounds the time this may take.
    pub async fn accept(mut stream: WsStream) -> Result<WsTransport, UpgradeError> {
        let mut head = BytesMut::new();
        loop {
            match ws::parse_request(&head) {
                Ok(Some((request, used))) => {
                    stream.write_all(&ws::accept_response(&request)).await?;
                    let _ = head.split_to(used);
                    let partial = if head.is_empty() {
                        BytesMut::new()
                    } else {
                        head
                    };
                    return Ok(WsTransport {
                        stream,
                        decoder: Decoder::new(Role::Server, limits::FRAME_BYTES_MAX),
                        partial,
                        pong: None,
                        closed: false,
                    });
                }
                Ok(None) => {
                    if stream.read_some(&mut head).await? == 0 {
                        return Err(UpgradeError::Closed);
                    }
                }
                Err(e) => {
                    let _ = stream.write_all(&ws::reject_response(&e)).await;
                    stream.shutdown().await;
                    return Err(e.into());
                }
            }
        }
    }

    async fn send_control(&mut self, opcode: OpCode, payload: &[u8]) -> io::Result<()> {
        let mut out = BytesMut::with_capacity(payload.len() + ws::FRAME_HEADER_BYTES_MAX);
        ws::encode_frame(opcode, payload, None, &mut out);
        self.stream.write_all(&out).await
    }
}

impl Transport for WsTransport {
    /// It only reads (into `partial`, which keeps what was read) and decodes; control replies
    /// are queued for [`Transport::write`].
    fn poll_next_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Incoming, TransportError>> {
        loop {
            if self.closed {
                return Poll::Ready(Ok(Incoming::Closed));
            }
            let decoded = self.decoder.decode(&mut self.partial);
            if self.partial.is_empty() && self.partial.capacity() > 0 {
                // Give the allocation back: an idle connection holds no buffer.
                self.partial = BytesMut::new();
            }
            match decoded {
                Ok(Some(Message::Binary(frame))) => return Poll::Ready(Ok(Incoming::Frame(frame))),
                Ok(Some(Message::Ping(payload))) => {
                    self.pong = Some(Bytes::copy_from_slice(&payload));
                }
                Ok(Some(Message::Pong(_))) => {}
                Ok(Some(Message::Close { .. })) => {
                    // The peer closed: the connection ends, and `close` answers with our Close.
                    self.closed = true;
                    return Poll::Ready(Ok(Incoming::Closed));
                }
                Ok(Some(Message::Text(_))) => {
                    return Poll::Ready(Err(TransportError::Protocol {
                        code: ErrorCode::TransportProtocol,
                        message: "text frames are not part of the protocol: send each frame as one binary message".into(),
                    }));
                }
                Ok(None) if self.has_control_output() => return Poll::Ready(Ok(Incoming::Control)),
                Ok(None) => match self.stream.poll_read_some(cx, &mut self.partial) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Incoming::Closed)),
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => return Poll::Pending,
                },
                Err(ws::WsError::TextNotSupported) => {
                    return Poll::Ready(Err(TransportError::Protocol {
                        code: ErrorCode::TransportProtocol,
                        message: "text frames are not part of the protocol: send each frame as one binary message".into(),
                    }));
                }
                Err(e) => {
                    let code = if e.close_code() == 1009 {
                        ErrorCode::FrameTooLarge
                    } else {
                        ErrorCode::TransportProtocol
                    };
                    return Poll::Ready(Err(TransportError::Protocol {
                        code,
                        message: e.to_string(),
                    }));
                }
            }
        }
    }

    fn has_control_output(&self) -> bool {
        self.pong.is_some() || self.stream.has_pending_output()
    }

    async fn write(&mut self, frames: &mut VecDeque<Bytes>) -> Result<(), TransportError> {
        // One contiguous write per batch: headers interleaved with payloads, one syscall.
        let total: usize = frames
            .iter()
            .map(|f| f.len() + ws::FRAME_HEADER_BYTES_MAX)
            .sum::<usize>()
            + self
                .pong
                .as_ref()
                .map_or(0, |p| p.len() + ws::FRAME_HEADER_BYTES_MAX);
        let mut out = BytesMut::with_capacity(total);
        if let Some(payload) = self.pong.take() {
            ws::encode_frame(OpCode::Pong, &payload, None, &mut out);
        }
        for f in frames.drain(..) {
            let header = ws::encode_header(OpCode::Binary, true, f.len(), None);
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(&f);
        }
        tokio::time::timeout(
            Duration::from_millis(WRITE_TIMEOUT_MS),
            self.stream.write_buf(out),
        )
        .await
        .map_err(|_| TransportError::WriteTimeout)??;
        Ok(())
    }

    async fn close(&mut self, error: Option<(ErrorCode, &str)>) {
        let (code, reason) = match error {
            Some((ErrorCode::FrameTooLarge, r)) => (1009, r),
            Some((ErrorCode::TransportProtocol, r)) if r.starts_with("text frames") => (1003, r),
            Some((ErrorCode::TransportProtocol | ErrorCode::Malformed, r)) => (1002, r),
            Some((ErrorCode::ShuttingDown, r)) => (1001, r),
            Some((_, r)) => (1008, r),
            None => (1000, ""),
        };
        // A close reason is at most 123 bytes.
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let payload = ws::close_payload(code, &reason[..end]);
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.send_control(OpCode::Close, &payload),
        )
        .await;
        self.stream.shutdown().await;
        // Lingering close: read and discard what the peer still sends (e.g. the rest of an
        // oversize message) until it closes, so the kernel does not answer with a reset that
        // could destroy our close frame before the peer reads it. Bounded in time and bytes.
        let drain = async {
            let mut discarded = 0usize;
            let mut sink = BytesMut::new();
            while discarded < LINGER_BYTES_MAX {
                match self.stream.read_some(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => discarded += n,
                }
                sink.clear();
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
}

/// How long a closing connection keeps reading (and discarding) the peer's bytes.
const LINGER: Duration = Duration::from_secs(1);
/// How much it discards at most.
const LINGER_BYTES_MAX: usize = 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A server transport over loopback TCP, and the client's end of the socket.
    async fn pair() -> (WsTransport, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let transport = WsTransport {
            stream: WsStream::Plain(server),
            decoder: Decoder::new(Role::Server, limits::FRAME_BYTES_MAX),
            partial: BytesMut::new(),
            pong: None,
            closed: false,
        };
        (transport, client)
    }

    async fn client_sends(client: &mut TcpStream, opcode: OpCode, payload: &[u8]) {
        let mut out = BytesMut::new();
        ws::encode_frame(opcode, payload, Some([1, 2, 3, 4]), &mut out);
        client.write_all(&out).await.unwrap();
    }

    #[tokio::test]
    async fn reads_never_write_and_a_ping_flood_is_answered_by_one_pong_on_the_next_write() {
        let (mut t, mut client) = pair().await;
        let mut flood = BytesMut::new();
        for i in 0..100u8 {
            ws::encode_frame(OpCode::Ping, &[i], Some([1, 2, 3, 4]), &mut flood);
        }
        ws::encode_frame(OpCode::Binary, b"frame", Some([1, 2, 3, 4]), &mut flood);
        client.write_all(&flood).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Reading handles every ping and returns the frame, without writing anything: a read
        // cancelled at any point cannot leave half a control frame on the stream.
        match t.next_frame().await.unwrap() {
            Incoming::Frame(f) => assert_eq!(&f[..], b"frame"),
            other => panic!("{other:?}"),
        }
        let mut probe = [0u8; 64];
        assert!(
            client.try_read(&mut probe).is_err(),
            "the read path wrote to the socket"
        );
        assert!(t.has_control_output());
        // The next write carries one pong, for the latest ping, ahead of the frames.
        t.write(&mut VecDeque::new()).await.unwrap();
        assert!(!t.has_control_output());
        let mut got = BytesMut::new();
        let mut decoder = Decoder::new(Role::Client, limits::FRAME_BYTES_MAX);
        let message = loop {
            if let Some(m) = decoder.decode(&mut got).unwrap() {
                break m;
            }
            let n = client.read_buf(&mut got).await.unwrap();
            assert!(n > 0);
        };
        assert!(
            matches!(message, Message::Pong(ref p) if p[..] == [99]),
            "{message:?}"
        );
        assert!(decoder.decode(&mut got).unwrap().is_none(), "one pong only");
    }

    #[tokio::test]
    async fn a_lone_ping_is_reported_so_the_driver_writes_the_pong() {
        let (mut t, mut client) = pair().await;
        client_sends(&mut client, OpCode::Ping, b"p").await;
        assert!(matches!(t.next_frame().await.unwrap(), Incoming::Control));
        // A dropped read loses nothing: the pong is still queued.
        let _ = futures::FutureExt::now_or_never(t.next_frame());
        assert!(t.has_control_output());
    }
}
