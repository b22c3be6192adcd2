//! WebSocket over TCP or TLS: the client side of the upgrade, masked frames out, one binary
//! message per frame in. Framing is `ringpost_wire::ws`; this file only moves bytes.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use ringpost_wire::limits::FRAME_BYTES_MAX;
use ringpost_wire::ws::{self, Decoder, Message, OpCode, Role};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{Inbound, PeerClose};
use crate::endpoint::Endpoint;
use crate::error::{ClientError, Result};

/// Bytes reserved for one read. Over plain TCP the buffer is reserved only once the socket is
/// readable and dropped again when it holds no partial message, so an idle connection owns none;
/// over TLS (whose reads cannot wait for readiness) an idle connection holds this much.
pub const READ_CHUNK_BYTES: usize = 8 * 1024;

/// The reading side of a WebSocket.
pub(crate) struct WsReader {
    io: ReadIo,
    decoder: Decoder,
    /// Bytes of a partial WebSocket frame; empty and unallocated between messages.
    partial: BytesMut,
}

enum ReadIo {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<TlsStream<TcpStream>>),
}

/// The writing side of a WebSocket.
pub(crate) struct WsWriter {
    io: WriteIo,
}

enum WriteIo {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

/// Either a TCP or a TLS stream, before the split.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    async fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(bytes).await?,
            Stream::Tls(s) => {
                s.write_all(bytes).await.map_err(ClientError::from_tls_io)?;
                s.flush().await.map_err(ClientError::from_tls_io)?;
            }
        }
        Ok(())
    }

    async fn read_buf(&mut self, buf: &mut BytesMut) -> Result<usize> {
        buf.reserve(READ_CHUNK_BYTES);
        Ok(match self {
            Stream::Plain(s) => s.read_buf(buf).await?,
            Stream::Tls(s) => s.read_buf(buf).await.map_err(ClientError::from_tls_io)?,
        })
    }
}

/// Connects, runs TLS if `tls` is given, and performs the upgrade offering `ringpost.v1`.
pub(crate) async fn open(
    endpoint: &Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(WsReader, WsWriter)> {
    let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
    tcp.set_nodelay(true)?;
    let mut stream = match tls {
        None => Stream::Plain(tcp),
        Some(config) => {
            let name = ServerName::try_from(endpoint.host.clone())
                .map_err(|e| ClientError::Tls(format!("server name {}: {e}", endpoint.host)))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(ClientError::from_tls_io)?;
            Stream::Tls(Box::new(tls))
        }
    };

    let key: [u8; 16] = rand::random();
    let host = if (endpoint.scheme == crate::Scheme::Ws && endpoint.port == 80)
        || (endpoint.scheme == crate::Scheme::Wss && endpoint.port == 443)
    {
        bracketed(&endpoint.host)
    } else {
        endpoint.authority()
    };
    stream
        .write_all(&ws::client_request(&host, &endpoint.path, key))
        .await?;
    let mut head = BytesMut::new();
    let consumed = loop {
        if let Some(consumed) = ws::parse_response(&head, key)? {
            break consumed;
        }
        if stream.read_buf(&mut head).await? == 0 {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed the connection during the WebSocket upgrade",
            )));
        }
    };
    // Whatever followed the head is already WebSocket frames.
    let _ = head.split_to(consumed);
    let partial = if head.is_empty() {
        BytesMut::new()
    } else {
        head
    };
    let decoder = Decoder::new(Role::Client, FRAME_BYTES_MAX);
    let (read, write) = match stream {
        Stream::Plain(s) => {
            let (r, w) = s.into_split();
            (ReadIo::Plain(r), WriteIo::Plain(w))
        }
        Stream::Tls(s) => {
            let (r, w) = tokio::io::split(*s);
            (ReadIo::Tls(r), WriteIo::Tls(w))
        }
    };
    Ok((
        WsReader {
            io: read,
            decoder,
            partial,
        },
        WsWriter { io: write },
    ))
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

impl WsReader {
    /// The next message. Cancel-safe: a read is either complete or has not happened.
    pub(crate) async fn next(&mut self) -> Result<Inbound> {
        loop {
            let decoded = self.decoder.decode(&mut self.partial);
            if self.partial.is_empty() && self.partial.capacity() > 0 {
                // Give the allocation back (a returned message keeps its own part alive).
                self.partial = BytesMut::new();
            }
            match decoded? {
                Some(Message::Binary(frame)) => return Ok(Inbound::Frame(frame)),
                Some(Message::Ping(payload)) => return Ok(Inbound::Ping(payload)),
                Some(Message::Pong(_)) => {}
                Some(Message::Close { code, reason }) => {
                    return Ok(Inbound::Closed(Some(PeerClose {
                        code: code.map(u32::from),
                        reason,
                    })))
                }
                Some(Message::Text(_)) => {
                    // The decoder refuses text unless told otherwise; keep the rule here too.
                    return Err(ClientError::Protocol(
                        "server sent a text message".to_string(),
                    ));
                }
                None => {
                    if self.read_some().await? == 0 {
                        return Ok(Inbound::Closed(None));
                    }
                }
            }
        }
    }

    async fn read_some(&mut self) -> Result<usize> {
        match &mut self.io {
            ReadIo::Plain(r) => loop {
                r.readable().await?;
                self.partial.reserve(READ_CHUNK_BYTES);
                match r.try_read_buf(&mut self.partial) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e.into()),
                }
            },
            ReadIo::Tls(r) => {
                self.partial.reserve(READ_CHUNK_BYTES);
                r.read_buf(&mut self.partial)
                    .await
                    .map_err(ClientError::from_tls_io)
            }
        }
    }
}

impl WsWriter {
    /// Writes one unfragmented message with a fresh random mask (RFC 6455 §5.3).
    pub(crate) async fn send(&mut self, opcode: OpCode, payload: &[u8]) -> Result<()> {
        let mut out = BytesMut::with_capacity(payload.len() + ws::FRAME_HEADER_BYTES_MAX);
        ws::encode_frame(opcode, payload, Some(rand::random()), &mut out);
        self.write_all(&out).await
    }

    /// Writes bytes as they are, after the upgrade: for tests of the server's framing checks.
    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.io {
            WriteIo::Plain(w) => w.write_all(bytes).await?,
            WriteIo::Tls(w) => {
                w.write_all(bytes).await.map_err(ClientError::from_tls_io)?;
                w.flush().await.map_err(ClientError::from_tls_io)?;
            }
        }
        Ok(())
    }

    /// Sends a close frame and shuts the write side down.
    pub(crate) async fn close(&mut self, code: u16, reason: &str) -> Result<()> {
        let sent = self
            .send(OpCode::Close, &ws::close_payload(code, reason))
            .await;
        let shut = match &mut self.io {
            WriteIo::Plain(w) => w.shutdown().await,
            WriteIo::Tls(w) => w.shutdown().await,
        };
        sent?;
        Ok(shut?)
    }

    /// Answers a ping.
    pub(crate) async fn pong(&mut self, payload: &Bytes) -> Result<()> {
        self.send(OpCode::Pong, payload).await
    }
}
