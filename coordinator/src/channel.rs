//! An authenticated, framed TCP connection: the handshake of [`crate::auth`] on open, then
//! length-prefixed serde_json frames, each followed by its HMAC tag.
//!
//! Handshake (fixed sizes, no parsing):
//! 1. server → client: `MAGIC(8) | channel(1) | server_nonce(32)`
//! 2. client → server: `MAGIC(8) | channel(1) | client_nonce(32) | client_proof(32)`
//! 3. server → client: `server_proof(32)`, or the server closes the connection.
//!
//! A peer that does not know the secret learns the magic and a random nonce, nothing else.
//!
//! Frame: `len: u32 BE | payload: len bytes of JSON | tag: 32 bytes`, `len <= max_frame_bytes`
//! (checked before anything is allocated).

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};

use crate::auth::{ChannelKind, ClusterSecret, FrameMac, Handshake, NONCE_BYTES, TAG_BYTES};

/// Protocol magic and version at the start of both handshake messages.
const MAGIC: [u8; 8] = *b"RPCOORD1";
/// The handshake (connect included) must finish within this.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Socket error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Connect or handshake took longer than allowed.
    #[error("timed out")]
    Timeout,
    /// The other end does not speak this protocol (or this version).
    #[error("not a ringpost coordinator endpoint (bad magic)")]
    BadMagic,
    /// Connected to the raft port with a client, or the other way round.
    #[error("wrong channel: expected {expected:?}, got {got:?}")]
    WrongChannel {
        /// What we expected.
        expected: char,
        /// What the other end is.
        got: char,
    },
    /// The other end does not know the cluster secret (or we do not).
    #[error("authentication failed (wrong cluster secret?)")]
    AuthFailed,
    /// A frame longer than the bound.
    #[error("frame of {len} bytes exceeds the {max} byte bound")]
    FrameTooLarge {
        /// Announced or attempted length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A frame whose tag does not verify: tampered, replayed or reordered.
    #[error("frame authentication failed")]
    BadTag,
    /// A frame that is not the expected JSON message.
    #[error("malformed frame: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Reading half of a [`Channel`].
pub(crate) struct ChannelReader {
    io: OwnedReadHalf,
    mac: FrameMac,
    max_frame_bytes: usize,
}

/// Writing half of a [`Channel`].
pub(crate) struct ChannelWriter {
    io: OwnedWriteHalf,
    mac: FrameMac,
    max_frame_bytes: usize,
}

/// An authenticated connection.
pub(crate) struct Channel {
    pub(crate) reader: ChannelReader,
    pub(crate) writer: ChannelWriter,
}

impl Channel {
    /// Connects and runs the client side of the handshake, all within [`HANDSHAKE_TIMEOUT`] or
    /// `timeout`, whichever is shorter.
    pub(crate) async fn connect(
        addr: impl ToSocketAddrs,
        secret: &ClusterSecret,
        kind: ChannelKind,
        max_frame_bytes: usize,
        timeout: Duration,
    ) -> Result<Channel, ChannelError> {
        let timeout = timeout.min(HANDSHAKE_TIMEOUT);
        tokio::time::timeout(timeout, async {
            let stream = TcpStream::connect(addr).await?;
            Self::client_handshake(stream, secret, kind, max_frame_bytes).await
        })
        .await
        .map_err(|_| ChannelError::Timeout)?
    }

    async fn client_handshake(
        mut stream: TcpStream,
        secret: &ClusterSecret,
        kind: ChannelKind,
        max_frame_bytes: usize,
    ) -> Result<Channel, ChannelError> {
        stream.set_nodelay(true)?;
        let mut hello = [0u8; 8 + 1 + NONCE_BYTES];
        stream.read_exact(&mut hello).await?;
        check_magic_and_kind(&hello[..9], kind)?;
        let mut server_nonce = [0u8; NONCE_BYTES];
        server_nonce.copy_from_slice(&hello[9..]);
        let client_nonce = crate::auth::nonce();
        let hs = Handshake::new(secret, kind, server_nonce, client_nonce);
        let mut reply = Vec::with_capacity(9 + NONCE_BYTES + TAG_BYTES);
        reply.extend_from_slice(&MAGIC);
        reply.push(kind.byte());
        reply.extend_from_slice(&client_nonce);
        reply.extend_from_slice(&hs.client_proof());
        stream.write_all(&reply).await?;
        let mut proof = [0u8; TAG_BYTES];
        match stream.read_exact(&mut proof).await {
            Ok(_) => {}
            // The server closes without a word when our proof is wrong.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ChannelError::AuthFailed)
            }
            Err(e) => return Err(e.into()),
        }
        if !hs.verify_server_proof(&proof) {
            return Err(ChannelError::AuthFailed);
        }
        let (send, recv) = hs.frame_macs();
        Ok(Self::from_parts(stream, send, recv, max_frame_bytes))
    }

    /// Runs the server side of the handshake on an accepted stream, within [`HANDSHAKE_TIMEOUT`].
    pub(crate) async fn accept(
        stream: TcpStream,
        secret: &ClusterSecret,
        kind: ChannelKind,
        max_frame_bytes: usize,
    ) -> Result<Channel, ChannelError> {
        tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            Self::server_handshake(stream, secret, kind, max_frame_bytes),
        )
        .await
        .map_err(|_| ChannelError::Timeout)?
    }

    async fn server_handshake(
        mut stream: TcpStream,
        secret: &ClusterSecret,
        kind: ChannelKind,
        max_frame_bytes: usize,
    ) -> Result<Channel, ChannelError> {
        stream.set_nodelay(true)?;
        let server_nonce = crate::auth::nonce();
        let mut hello = Vec::with_capacity(9 + NONCE_BYTES);
        hello.extend_from_slice(&MAGIC);
        hello.push(kind.byte());
        hello.extend_from_slice(&server_nonce);
        stream.write_all(&hello).await?;
        let mut reply = [0u8; 9 + NONCE_BYTES + TAG_BYTES];
        stream.read_exact(&mut reply).await?;
        check_magic_and_kind(&reply[..9], kind)?;
        let mut client_nonce = [0u8; NONCE_BYTES];
        client_nonce.copy_from_slice(&reply[9..9 + NONCE_BYTES]);
        let hs = Handshake::new(secret, kind, server_nonce, client_nonce);
        if !hs.verify_client_proof(&reply[9 + NONCE_BYTES..]) {
            return Err(ChannelError::AuthFailed);
        }
        stream.write_all(&hs.server_proof()).await?;
        let (recv, send) = hs.frame_macs();
        Ok(Self::from_parts(stream, send, recv, max_frame_bytes))
    }

    fn from_parts(stream: TcpStream, send: FrameMac, recv: FrameMac, max: usize) -> Channel {
        let (r, w) = stream.into_split();
        Channel {
            reader: ChannelReader {
                io: r,
                mac: recv,
                max_frame_bytes: max,
            },
            writer: ChannelWriter {
                io: w,
                mac: send,
                max_frame_bytes: max,
            },
        }
    }

    pub(crate) async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), ChannelError> {
        self.writer.send(msg).await
    }

    pub(crate) async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, ChannelError> {
        self.reader.recv().await
    }

    /// A request followed by its response, within `timeout`.
    pub(crate) async fn call<Q: Serialize, A: DeserializeOwned>(
        &mut self,
        request: &Q,
        timeout: Duration,
    ) -> Result<A, ChannelError> {
        tokio::time::timeout(timeout, async {
            self.send(request).await?;
            self.recv().await
        })
        .await
        .map_err(|_| ChannelError::Timeout)?
    }
}

fn check_magic_and_kind(head: &[u8], kind: ChannelKind) -> Result<(), ChannelError> {
    if head[..8] != MAGIC {
        return Err(ChannelError::BadMagic);
    }
    if head[8] != kind.byte() {
        return Err(ChannelError::WrongChannel {
            expected: kind.byte() as char,
            got: head[8] as char,
        });
    }
    Ok(())
}

/// A message's frame payload, for [`ChannelWriter::send_encoded`].
pub(crate) fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ChannelError> {
    Ok(serde_json::to_vec(msg)?)
}

impl ChannelWriter {
    /// Serializes, signs and writes one frame (one `write_all`).
    pub(crate) async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), ChannelError> {
        self.send_encoded(&encode(msg)?).await
    }

    /// Signs and writes one frame of a payload from [`encode`]: a message sent to many
    /// channels is serialized once.
    pub(crate) async fn send_encoded(&mut self, payload: &[u8]) -> Result<(), ChannelError> {
        if payload.len() > self.max_frame_bytes {
            return Err(ChannelError::FrameTooLarge {
                len: payload.len(),
                max: self.max_frame_bytes,
            });
        }
        let tag = self.mac.sign(payload);
        let mut frame = Vec::with_capacity(4 + payload.len() + TAG_BYTES);
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.extend_from_slice(&tag);
        self.io.write_all(&frame).await?;
        Ok(())
    }
}

impl ChannelReader {
    /// Reads, verifies and decodes one frame. Not cancel-safe: a caller that may drop this future
    /// half-way must drop the connection too.
    pub(crate) async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, ChannelError> {
        let mut len = [0u8; 4];
        self.io.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > self.max_frame_bytes {
            return Err(ChannelError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        let mut buf = vec![0u8; len + TAG_BYTES];
        self.io.read_exact(&mut buf).await?;
        let (payload, tag) = buf.split_at(len);
        if !self.mac.verify(payload, tag) {
            return Err(ChannelError::BadTag);
        }
        Ok(serde_json::from_slice(payload)?)
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::new(s.as_bytes().to_vec()).unwrap()
    }

    async fn pair(
        server_secret: ClusterSecret,
        client_secret: ClusterSecret,
        server_kind: ChannelKind,
        client_kind: ChannelKind,
    ) -> (Result<Channel, ChannelError>, Result<Channel, ChannelError>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            Channel::accept(s, &server_secret, server_kind, 1024).await
        });
        let client =
            Channel::connect(addr, &client_secret, client_kind, 1024, HANDSHAKE_TIMEOUT).await;
        (server.await.unwrap(), client)
    }

    #[tokio::test]
    async fn frames_round_trip_both_ways() {
        let s = secret("0123456789abcdef");
        let (server, client) = pair(s.clone(), s, ChannelKind::Raft, ChannelKind::Raft).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        client.send(&vec![1u32, 2, 3]).await.unwrap();
        assert_eq!(server.recv::<Vec<u32>>().await.unwrap(), vec![1, 2, 3]);
        server.send(&"pong").await.unwrap();
        assert_eq!(client.recv::<String>().await.unwrap(), "pong");
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_on_both_ends() {
        let (server, client) = pair(
            secret("0123456789abcdef"),
            secret("fedcba9876543210"),
            ChannelKind::Raft,
            ChannelKind::Raft,
        )
        .await;
        assert!(matches!(server, Err(ChannelError::AuthFailed)));
        assert!(matches!(client, Err(ChannelError::AuthFailed)));
    }

    #[tokio::test]
    async fn wrong_channel_is_refused() {
        let s = secret("0123456789abcdef");
        let (_, client) = pair(s.clone(), s, ChannelKind::Raft, ChannelKind::Client).await;
        assert!(matches!(client, Err(ChannelError::WrongChannel { .. })));
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_allocation() {
        let s = secret("0123456789abcdef");
        let (server, client) = pair(s.clone(), s, ChannelKind::Raft, ChannelKind::Raft).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        assert!(matches!(
            client.send(&"x".repeat(2000)).await,
            Err(ChannelError::FrameTooLarge { .. })
        ));
        // A forged header announcing 4 GiB.
        client
            .writer
            .io
            .write_all(&u32::MAX.to_be_bytes())
            .await
            .unwrap();
        assert!(matches!(
            server.recv::<String>().await,
            Err(ChannelError::FrameTooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn tampered_frame_is_refused() {
        let s = secret("0123456789abcdef");
        let (server, client) = pair(s.clone(), s, ChannelKind::Raft, ChannelKind::Raft).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        let payload = b"\"hi\"";
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(payload);
        frame.extend_from_slice(&[0u8; TAG_BYTES]);
        client.writer.io.write_all(&frame).await.unwrap();
        assert!(matches!(
            server.recv::<String>().await,
            Err(ChannelError::BadTag)
        ));
    }
}
