//! WebSocket (plain or TLS) on the wire crate's sans-IO codec: the upgrade handshake, then one
//! binary message per frame. Generic over the byte stream so `ws://` (a TCP half) and `wss://`
//! (a TLS half) share every line.

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use ringpost_wire::limits::FRAME_BYTES_MAX;
use ringpost_wire::ws::{self, Decoder, Message, OpCode, Role};
use std::cell::RefCell;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Size of each worker thread's read buffer. Reads land there and only what arrived is copied
/// to the connection, which holds no buffer while it waits: the generator's idle connections
/// cost little more than the node's (at 8 KiB reserved per connection, as before, a million
/// would have needed 8 GiB for read buffers alone).
pub const READ_BUF_BYTES: usize = 64 * 1024;

thread_local! {
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_BUF_BYTES].into_boxed_slice());
}

/// The upgrade handshake on `io`: send the request, read until the `101` answer is complete.
/// Returns the bytes read past the answer (frames the node sent right away).
pub async fn handshake<S>(io: &mut S, host: &str, path: &str, key: [u8; 16]) -> Result<BytesMut>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(&ws::client_request(host, path, key)).await?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(consumed) = ws::parse_response(&buf, key)? {
            let _ = buf.split_to(consumed);
            return Ok(buf);
        }
        if buf.len() > ws::HANDSHAKE_HEAD_BYTES_MAX {
            bail!(
                "WebSocket handshake answer longer than {} bytes",
                ws::HANDSHAKE_HEAD_BYTES_MAX
            );
        }
        buf.reserve(1024);
        if io.read_buf(&mut buf).await? == 0 {
            bail!("connection closed during the WebSocket handshake");
        }
    }
}

/// The reading half: whole frames out of WebSocket binary messages.
pub struct WsReader<R> {
    io: R,
    buf: BytesMut,
    decoder: Decoder,
    closed: bool,
}

impl<R: AsyncRead + Unpin> WsReader<R> {
    pub fn new(io: R, leftover: BytesMut) -> Self {
        WsReader {
            io,
            buf: leftover,
            decoder: Decoder::new(Role::Client, FRAME_BYTES_MAX),
            closed: false,
        }
    }

    /// The stream and the bytes read from it but not decoded yet.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.io, self.buf)
    }

    /// The next frame already read, without waiting. `Ok(None)`: none is complete yet.
    pub fn buffered(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.closed {
                return Ok(None);
            }
            match self
                .decoder
                .decode(&mut self.buf)
                .map_err(|e| anyhow!("WebSocket: {e}"))?
            {
                Some(Message::Binary(frame)) => return Ok(Some(frame)),
                // The node answers pings itself and sends none; nothing to do for either.
                Some(Message::Ping(_) | Message::Pong(_)) => continue,
                Some(Message::Close { .. }) => {
                    self.closed = true;
                    return Ok(None);
                }
                Some(Message::Text(_)) => bail!("the node sent a text message"),
                None => return Ok(None),
            }
        }
    }

    /// The next frame; `Ok(None)` once the node closed. Cancel-safe: a read either lands in the
    /// buffer or does not happen.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(Some(frame));
            }
            if self.closed {
                return Ok(None);
            }
            if self.buf.is_empty() && self.buf.capacity() > 0 {
                // Nothing partial: wait holding no buffer.
                self.buf = BytesMut::new();
            }
            let (io, buf) = (&mut self.io, &mut self.buf);
            let n = std::future::poll_fn(|cx| {
                READ_BUF.with(|b| {
                    let mut b = b.borrow_mut();
                    let mut rb = ReadBuf::new(&mut b[..]);
                    match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) => {
                            buf.extend_from_slice(rb.filled());
                            Poll::Ready(Ok(rb.filled().len()))
                        }
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        Poll::Pending => Poll::Pending,
                    }
                })
            })
            .await
            .context("read")?;
            if n == 0 {
                self.closed = true;
                return Ok(None);
            }
        }
    }
}

/// The next masking key from an xorshift64* state (non-zero): RFC 6455 wants unpredictable
/// keys to protect proxies from browsers' scripts; a load generator talking to its own node
/// only needs them to vary.
pub fn next_mask(state: &mut u64) -> [u8; 4] {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    ((x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32).to_ne_bytes()
}

/// The writing half: frames are masked into one buffer and written together.
pub struct WsWriter<W> {
    io: W,
    out: BytesMut,
    /// State of the masking-key generator ([`next_mask`]).
    mask_state: u64,
}

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    pub fn new(io: W, seed: u64) -> Self {
        WsWriter {
            io,
            out: BytesMut::new(),
            mask_state: seed | 1,
        }
    }

    fn next_mask(&mut self) -> [u8; 4] {
        next_mask(&mut self.mask_state)
    }

    /// The stream; `None` while frames are queued and not written.
    pub fn into_inner(self) -> Option<W> {
        self.out.is_empty().then_some(self.io)
    }

    /// Queues one encoded frame as a binary message.
    pub fn push(&mut self, frame: &[u8]) {
        let mask = self.next_mask();
        ws::encode_frame(OpCode::Binary, frame, Some(mask), &mut self.out);
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await.context("write")?;
            self.io.flush().await.context("flush")?;
        }
        // Written: hold no buffer until the next frame.
        self.out = BytesMut::new();
        Ok(())
    }
}
