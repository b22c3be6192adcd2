//! Minimal clients of the peers `compare` measures Ringpost against, on tokio TCP:
//!
//! - MQTT 3.1.1 (mosquitto): CONNECT with a clean session and no keep-alive, SUBSCRIBE to the
//!   device's own topic `u/<user>` at QoS 1, PUBLISH at QoS 1 to the peer's topic (the
//!   broker's PUBACK is the send's acknowledgement), PUBACK for every PUBLISH received.
//! - core NATS (nats-server): CONNECT (not verbose), SUB `u.<user>`, PUB to the peer's
//!   subject, PONG to the server's PINGs. Core NATS has no acknowledgements: a send is settled
//!   as soon as it is written, and TCP back-pressure is the only flow control.
//!
//! Only what the workloads use is implemented; anything else the broker sends is skipped.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

/// Largest packet or message accepted from a broker, in bytes.
pub const PEER_PACKET_BYTES_MAX: usize = 1024 * 1024;

/// Bytes reserved per read.
pub const PEER_READ_RESERVE_BYTES: usize = 8 * 1024;

/// Which peer protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerProtocol {
    Mqtt,
    Nats,
}

impl PeerProtocol {
    pub fn name(self) -> &'static str {
        match self {
            PeerProtocol::Mqtt => "mqtt",
            PeerProtocol::Nats => "nats",
        }
    }
}

/// What a peer connection received, in the terms the scenarios use.
#[derive(Debug)]
pub enum PeerEvent {
    /// A message for this device; `ack` is the MQTT packet id to PUBACK.
    Message { body: Bytes, ack: Option<u16> },
    /// The broker acknowledged our PUBLISH (MQTT).
    Acked { sent_ns: u64 },
    /// Nothing the workload cares about.
    Other,
}

/// One connection to a peer broker.
pub struct PeerConn {
    pub protocol: PeerProtocol,
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    out: BytesMut,
    next_packet_id: u16,
    /// MQTT packet id → when the PUBLISH was sent (ns since the worker's epoch).
    sent_at: HashMap<u16, u64>,
    closed: bool,
}

/// Connects to `addr` as device `user` (from `source`) and subscribes to its own topic.
pub async fn connect(
    protocol: PeerProtocol,
    addr: SocketAddr,
    source: Option<IpAddr>,
    user: u64,
) -> Result<PeerConn> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        super::bind_source(&socket, ip)?;
    }
    socket.set_zero_linger()?;
    let stream: TcpStream = socket
        .connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    let (rd, wr) = stream.into_split();
    let mut c = PeerConn {
        protocol,
        rd,
        wr,
        buf: BytesMut::new(),
        out: BytesMut::new(),
        next_packet_id: 0,
        sent_at: HashMap::new(),
        closed: false,
    };
    match protocol {
        PeerProtocol::Mqtt => {
            let client_id = format!("bench-{user}");
            let mut var = BytesMut::new();
            put_str(&mut var, "MQTT");
            var.put_u8(4); // protocol level 3.1.1
            var.put_u8(0x02); // clean session
            var.put_u16(0); // no keep-alive: idle connections need no pings
            put_str(&mut var, &client_id);
            put_packet(&mut c.out, 0x10, &var);
            c.flush().await?;
            let (kind, body) = c.mqtt_packet_wait().await?;
            if kind >> 4 != 2 || body.len() < 2 || body[1] != 0 {
                bail!("MQTT CONNACK refused: {body:?}");
            }
            let mut sub = BytesMut::new();
            sub.put_u16(c.packet_id());
            put_str(&mut sub, &format!("u/{user}"));
            sub.put_u8(1);
            put_packet(&mut c.out, 0x82, &sub);
            c.flush().await?;
            loop {
                let (kind, _) = c.mqtt_packet_wait().await?;
                if kind >> 4 == 9 {
                    break;
                }
            }
        }
        PeerProtocol::Nats => {
            c.out.put_slice(
                format!("CONNECT {{\"verbose\":false,\"pedantic\":false,\"name\":\"bench-{user}\"}}\r\nSUB u.{user} 1\r\nPING\r\n")
                    .as_bytes(),
            );
            c.flush().await?;
            // INFO, then (after our PING) PONG: the subscription is in place.
            loop {
                c.fill().await?;
                if let Some(pos) = find(&c.buf, b"PONG\r\n") {
                    c.buf.advance(pos + 6);
                    break;
                }
                if let Some(pos) = find(&c.buf, b"-ERR") {
                    bail!("NATS refused: {}", String::from_utf8_lossy(&c.buf[pos..]));
                }
            }
        }
    }
    Ok(c)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u16(s.len() as u16);
    b.put_slice(s.as_bytes());
}

/// Appends an MQTT packet: fixed header byte, remaining length (variable-length), body.
pub fn put_packet(out: &mut BytesMut, first: u8, body: &[u8]) {
    out.put_u8(first);
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            break;
        }
    }
    out.put_slice(body);
}

/// Takes one MQTT packet off the front of `buf`: `(first byte, body)`, or `None` if
/// incomplete.
pub fn take_mqtt_packet(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            bail!("MQTT remaining length is malformed");
        }
    }
    if len > PEER_PACKET_BYTES_MAX {
        bail!("MQTT packet of {len} bytes is over the bound");
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let first = buf[0];
    buf.advance(i);
    Ok(Some((first, buf.split_to(len).freeze())))
}

impl PeerConn {
    fn packet_id(&mut self) -> u16 {
        self.next_packet_id = self.next_packet_id.wrapping_add(1).max(1);
        self.next_packet_id
    }

    async fn fill(&mut self) -> Result<()> {
        self.buf.reserve(PEER_READ_RESERVE_BYTES);
        if self.rd.read_buf(&mut self.buf).await? == 0 {
            self.closed = true;
            bail!("the broker closed the connection");
        }
        Ok(())
    }

    async fn mqtt_packet_wait(&mut self) -> Result<(u8, Bytes)> {
        loop {
            if let Some(p) = take_mqtt_packet(&mut self.buf)? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    /// The next event already read, without waiting.
    pub fn buffered(&mut self) -> Result<Option<PeerEvent>> {
        match self.protocol {
            PeerProtocol::Mqtt => {
                let Some((first, body)) = take_mqtt_packet(&mut self.buf)? else {
                    return Ok(None);
                };
                Ok(Some(match first >> 4 {
                    3 => {
                        // PUBLISH: topic, packet id if QoS > 0, payload.
                        let qos = (first >> 1) & 3;
                        if body.len() < 2 {
                            bail!("MQTT PUBLISH too short");
                        }
                        let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
                        let mut at = 2 + tlen;
                        let ack = if qos > 0 {
                            let id = body
                                .get(at..at + 2)
                                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                                .ok_or_else(|| anyhow!("MQTT PUBLISH without packet id"))?;
                            at += 2;
                            Some(id)
                        } else {
                            None
                        };
                        PeerEvent::Message {
                            body: body.slice(at.min(body.len())..),
                            ack,
                        }
                    }
                    4 => {
                        // PUBACK
                        let id = u16::from_be_bytes([
                            body.first().copied().unwrap_or(0),
                            body.get(1).copied().unwrap_or(0),
                        ]);
                        match self.sent_at.remove(&id) {
                            Some(sent_ns) => PeerEvent::Acked { sent_ns },
                            None => PeerEvent::Other,
                        }
                    }
                    _ => PeerEvent::Other,
                }))
            }
            PeerProtocol::Nats => {
                let Some(eol) = find(&self.buf, b"\r\n") else {
                    if self.buf.len() > PEER_PACKET_BYTES_MAX {
                        bail!("NATS line over the bound");
                    }
                    return Ok(None);
                };
                if self.buf.starts_with(b"MSG ") {
                    let line = std::str::from_utf8(&self.buf[..eol])
                        .map_err(|_| anyhow!("NATS line not UTF-8"))?;
                    let len: usize = line
                        .rsplit(' ')
                        .next()
                        .and_then(|l| l.parse().ok())
                        .ok_or_else(|| anyhow!("NATS MSG without length: {line}"))?;
                    if len > PEER_PACKET_BYTES_MAX {
                        bail!("NATS message of {len} bytes is over the bound");
                    }
                    if self.buf.len() < eol + 2 + len + 2 {
                        return Ok(None);
                    }
                    self.buf.advance(eol + 2);
                    let body = self.buf.split_to(len).freeze();
                    self.buf.advance(2);
                    return Ok(Some(PeerEvent::Message { body, ack: None }));
                }
                let is_ping = self.buf.starts_with(b"PING");
                if self.buf.starts_with(b"-ERR") {
                    let line = String::from_utf8_lossy(&self.buf[..eol]).into_owned();
                    bail!("NATS: {line}");
                }
                self.buf.advance(eol + 2);
                if is_ping {
                    self.out.put_slice(b"PONG\r\n");
                }
                Ok(Some(PeerEvent::Other))
            }
        }
    }

    /// The next event; `Ok(None)` once the broker closed. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<PeerEvent>> {
        loop {
            if let Some(e) = self.buffered()? {
                return Ok(Some(e));
            }
            if self.closed {
                return Ok(None);
            }
            self.buf.reserve(PEER_READ_RESERVE_BYTES);
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                self.closed = true;
                return Ok(None);
            }
        }
    }

    /// Queues a message to device `to`; `sent_ns` is remembered for the MQTT PUBACK.
    pub fn push_send(&mut self, to: u64, body: &[u8], sent_ns: u64) {
        match self.protocol {
            PeerProtocol::Mqtt => {
                let id = self.packet_id();
                self.sent_at.insert(id, sent_ns);
                let topic = format!("u/{to}");
                let mut b = BytesMut::with_capacity(2 + topic.len() + 2 + body.len());
                put_str(&mut b, &topic);
                b.put_u16(id);
                b.put_slice(body);
                put_packet(&mut self.out, 0x32, &b);
            }
            PeerProtocol::Nats => {
                self.out
                    .put_slice(format!("PUB u.{to} {}\r\n", body.len()).as_bytes());
                self.out.put_slice(body);
                self.out.put_slice(b"\r\n");
            }
        }
    }

    /// Queues the acknowledgement of a received message (MQTT PUBACK).
    pub fn push_ack(&mut self, packet_id: u16) {
        if self.protocol == PeerProtocol::Mqtt {
            self.out.put_slice(&[0x40, 0x02]);
            self.out.put_u16(packet_id);
        }
    }

    /// Whether a send is acknowledged (MQTT) or settled when written (NATS).
    pub fn acknowledges_sends(&self) -> bool {
        self.protocol == PeerProtocol::Mqtt
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            self.wr.write_all(&self.out).await.context("write")?;
            self.out.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_packets_round_trip_with_long_lengths() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 200_000] {
            let body = vec![7u8; len];
            let mut buf = BytesMut::new();
            put_packet(&mut buf, 0x32, &body);
            let mut partial = BytesMut::from(&buf[..buf.len() - 1]);
            assert!(take_mqtt_packet(&mut partial).unwrap().is_none() || len == 0);
            let (first, got) = take_mqtt_packet(&mut buf).unwrap().unwrap();
            assert_eq!((first, got.len()), (0x32, len));
            assert!(buf.is_empty());
        }
    }
}
