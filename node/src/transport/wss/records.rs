//! TLS 1.3 after the handshake: the record layer, over the keys rustls negotiated.
//!
//! rustls runs every handshake. Once a TLS 1.3 connection is established, the transport asks
//! rustls for its traffic keys and a [`KernelConnection`] (rustls' API for kTLS, which keeps
//! the key schedule so key updates still work) and drops the rest of rustls' connection: its
//! state machine, handshake deframer and record layer, about 2 KiB that an idle connection
//! would otherwise keep for its whole life. What stays is what a connection cannot do without:
//! one sealing and one opening key (from the listener's crypto provider through rustls'
//! `MessageEncrypter`/`MessageDecrypter`: `transport/cipher.rs`, ring's AEAD with keys kept as
//! bytes; rustls builds nonces and additional data and strips padding) and the key schedule's
//! two traffic secrets.
//!
//! What this layer does itself, per RFC 8446 §5: it cuts and parses the 5-byte record headers
//! (every record is `application_data` on the outside, at most 2^14 + 256 bytes of ciphertext
//! and 2^14 of plaintext), counts the sequence numbers, and handles the three kinds of inner
//! content a client may send after the handshake: application data, alerts (`close_notify`
//! ends the stream, `user_canceled` is ignored up to 4 times, any other is fatal) and
//! `KeyUpdate` (at most 32 with no application data between them, as rustls allows; §4.6.3:
//! the receiving key is replaced at once; if the client asks for ours, our `KeyUpdate` is sent
//! ahead of the next write, which then uses the new key). It replaces its own sending key
//! before the cipher suite's confidentiality limit. Any other handshake message, a
//! `KeyUpdate` not at the end of its record, and a handshake message split across records are
//! refused: none has a meaning from a client after a TLS 1.3 handshake with no client
//! authentication. Errors close the connection without an alert (as the rustls path here
//! does).
//!
//! TLS 1.2 connections (a legacy client) stay on rustls for their life.

use std::io;

use bytes::BytesMut;
use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, OutboundChunks,
    OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::{
    ConnectionTrafficSecrets, ContentType, HandshakeType, ProtocolVersion, SupportedCipherSuite,
    Tls13CipherSuite,
};

/// A record's header: content type, legacy version, length.
const HEADER_BYTES: usize = 5;
/// The most plaintext in one record (RFC 8446 §5.1).
pub const PLAINTEXT_MAX: usize = 1 << 14;
/// What sealing adds to a record's plaintext without padding: the header, the inner content
/// type and a 16-byte AEAD tag.
pub const RECORD_OVERHEAD: usize = HEADER_BYTES + 1 + 16;
/// The most ciphertext in one record (§5.2): plaintext, content type, padding and tag.
const CIPHERTEXT_MAX: usize = PLAINTEXT_MAX + 256;
/// `legacy_record_version` of every TLS 1.3 record.
const LEGACY_VERSION: ProtocolVersion = ProtocolVersion::TLSv1_2;
/// Alert descriptions (§6).
const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;
/// `KeyUpdate.request_update` (§4.6.3).
const UPDATE_NOT_REQUESTED: u8 = 0;
const UPDATE_REQUESTED: u8 = 1;
/// `KeyUpdate`s a client may send with no application data between them, and `user_canceled`
/// alerts in all: each costs the node a key derivation or a record for nothing, so a flood of
/// them is refused (rustls' and BoringSSL's bounds, which the connection had before it left
/// rustls).
const KEY_UPDATES_IN_A_ROW_MAX: u8 = 32;
const WARNING_ALERTS_MAX: u8 = 4;

/// What opening the received records found.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Every complete record was opened; the rest waits for more bytes.
    More,
    /// The client sent `close_notify`: nothing after it is read.
    Closed,
}

/// One TLS 1.3 connection's record layer after its handshake.
pub struct Records {
    /// rustls' key schedule: the next traffic secrets at a key update.
    kernel: KernelConnection<ServerConnectionData>,
    suite: &'static Tls13CipherSuite,
    sealer: Box<dyn MessageEncrypter>,
    opener: Box<dyn MessageDecrypter>,
    tx_seq: u64,
    rx_seq: u64,
    /// Records sealed under one key before it is replaced: the suite's confidentiality limit,
    /// less one for the `KeyUpdate` itself.
    tx_limit: u64,
    /// The client asked for our `KeyUpdate`: sent ahead of the next write.
    update_owed: bool,
    peer_closed: bool,
    /// `KeyUpdate`s the client may still send before its next application data.
    key_updates_left: u8,
    /// `user_canceled` alerts the client may still send.
    warning_alerts_left: u8,
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The key and IV of one direction.
fn key_and_iv(secrets: ConnectionTrafficSecrets) -> io::Result<(AeadKey, Iv)> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
        _ => Err(invalid(
            "rustls gave traffic secrets of an AEAD this node does not know",
        )),
    }
}

impl Records {
    /// Takes over `conn` once its TLS 1.3 handshake is done and everything it produced has
    /// been taken (the unbuffered API's `WriteTraffic` state); `Err` gives back a connection
    /// that is not TLS 1.3 untouched.
    pub fn take_over(
        conn: Box<UnbufferedServerConnection>,
    ) -> Result<io::Result<Box<Records>>, Box<UnbufferedServerConnection>> {
        let suite = match conn.negotiated_cipher_suite() {
            Some(SupportedCipherSuite::Tls13(suite))
                if conn.protocol_version() == Some(ProtocolVersion::TLSv1_3) =>
            {
                suite
            }
            _ => return Err(conn),
        };
        Ok(Self::from_conn(*conn, suite).map(Box::new))
    }

    fn from_conn(
        conn: UnbufferedServerConnection,
        suite: &'static Tls13CipherSuite,
    ) -> io::Result<Records> {
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let (tx_key, tx_iv) = key_and_iv(tx)?;
        let (rx_key, rx_iv) = key_and_iv(rx)?;
        Ok(Records {
            kernel,
            suite,
            sealer: suite.aead_alg.encrypter(tx_key, tx_iv),
            opener: suite.aead_alg.decrypter(rx_key, rx_iv),
            tx_seq,
            rx_seq,
            tx_limit: suite.common.confidentiality_limit.saturating_sub(1).max(1),
            update_owed: false,
            peer_closed: false,
            key_updates_left: KEY_UPDATES_IN_A_ROW_MAX,
            warning_alerts_left: WARNING_ALERTS_MAX,
        })
    }

    /// Opens every complete record in `incoming` (consumed from it), appending application
    /// data to `plain`.
    pub fn open(&mut self, incoming: &mut BytesMut, plain: &mut BytesMut) -> io::Result<Opened> {
        loop {
            if self.peer_closed {
                return Ok(Opened::Closed);
            }
            let Some(header) = incoming.get(..HEADER_BYTES) else {
                return Ok(Opened::More);
            };
            let typ = ContentType::from(header[0]);
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if typ != ContentType::ApplicationData {
                return Err(invalid(format!(
                    "a TLS 1.3 record of type {typ:?} after the handshake (only application_data \
                     is valid)"
                )));
            }
            if len > CIPHERTEXT_MAX {
                return Err(invalid(format!(
                    "a TLS record of {len} bytes (record_overflow: at most {CIPHERTEXT_MAX})"
                )));
            }
            if incoming.len() < HEADER_BYTES + len {
                return Ok(Opened::More);
            }
            let mut record = incoming.split_to(HEADER_BYTES + len);
            let seq = self.rx_seq;
            self.rx_seq = seq
                .checked_add(1)
                .ok_or_else(|| invalid("the client's record sequence number wrapped"))?;
            let sealed =
                InboundOpaqueMessage::new(typ, LEGACY_VERSION, &mut record[HEADER_BYTES..]);
            let message = self.opener.decrypt(sealed, seq).map_err(tls_error)?;
            if message.payload.len() > PLAINTEXT_MAX {
                return Err(invalid(format!(
                    "a TLS record with {} bytes of plaintext (record_overflow: at most \
                     {PLAINTEXT_MAX})",
                    message.payload.len()
                )));
            }
            match message.typ {
                ContentType::ApplicationData => {
                    self.key_updates_left = KEY_UPDATES_IN_A_ROW_MAX;
                    plain.extend_from_slice(message.payload)
                }
                ContentType::Alert => match *message.payload {
                    [_, CLOSE_NOTIFY] => self.peer_closed = true,
                    [_, USER_CANCELED] => {
                        self.warning_alerts_left =
                            self.warning_alerts_left.checked_sub(1).ok_or_else(|| {
                                invalid(format!(
                                    "more than {WARNING_ALERTS_MAX} user_canceled alerts"
                                ))
                            })?;
                    }
                    [_, description] => {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            format!("the client sent TLS alert {description}"),
                        ))
                    }
                    _ => return Err(invalid("a malformed TLS alert")),
                },
                ContentType::Handshake => self.post_handshake(message.payload)?,
                other => {
                    return Err(invalid(format!(
                        "a TLS 1.3 record with inner content type {other:?} after the handshake"
                    )))
                }
            }
        }
    }

    /// The handshake messages of one record after the handshake: only `KeyUpdate`, last.
    fn post_handshake(&mut self, mut messages: &[u8]) -> io::Result<()> {
        if messages.is_empty() {
            return Err(invalid("an empty TLS handshake record"));
        }
        while let [typ, a, b, c, rest @ ..] = messages {
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            if rest.len() < len {
                return Err(invalid(
                    "a post-handshake message split across TLS records (not supported)",
                ));
            }
            let (body, after) = rest.split_at(len);
            messages = after;
            match (HandshakeType::from(*typ), body) {
                (HandshakeType::KeyUpdate, [request]) if messages.is_empty() => {
                    self.key_updates_left =
                        self.key_updates_left.checked_sub(1).ok_or_else(|| {
                            invalid(format!(
                                "more than {KEY_UPDATES_IN_A_ROW_MAX} KeyUpdates with no \
                                 application data between them"
                            ))
                        })?;
                    let (seq, secrets) = self.kernel.update_rx_secret().map_err(tls_error)?;
                    let (key, iv) = key_and_iv(secrets)?;
                    self.opener = self.suite.aead_alg.decrypter(key, iv);
                    self.rx_seq = seq;
                    match *request {
                        UPDATE_NOT_REQUESTED => {}
                        UPDATE_REQUESTED => self.update_owed = true,
                        other => return Err(invalid(format!("a KeyUpdate with request {other}"))),
                    }
                }
                (HandshakeType::KeyUpdate, _) => {
                    return Err(invalid(
                        "a malformed KeyUpdate, or one not at the end of its record",
                    ))
                }
                (other, _) => {
                    return Err(invalid(format!(
                        "a {other:?} handshake message from the client after the handshake"
                    )))
                }
            }
        }
        if messages.is_empty() {
            Ok(())
        } else {
            Err(invalid(
                "a post-handshake message split across TLS records (not supported)",
            ))
        }
    }

    /// Seals `plain` as application data (records of at most [`PLAINTEXT_MAX`]), appended to
    /// `out`, after any `KeyUpdate` owed.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        out.reserve(plain.len() + plain.len().div_ceil(PLAINTEXT_MAX) * RECORD_OVERHEAD);
        for chunk in plain.chunks(PLAINTEXT_MAX) {
            self.seal_record(ContentType::ApplicationData, chunk, out)?;
        }
        Ok(())
    }

    /// Seals a `close_notify` alert, appended to `out`.
    pub fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        // AlertLevel warning (1): TLS 1.3 ignores the level, and close_notify has always had it.
        self.seal_record(ContentType::Alert, &[1, CLOSE_NOTIFY], out)
    }

    /// Whether the next write starts with a `KeyUpdate`.
    #[cfg(test)]
    pub fn key_update_owed(&self) -> bool {
        self.update_owed
    }

    fn seal_record(
        &mut self,
        typ: ContentType,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        if self.update_owed || self.tx_seq >= self.tx_limit {
            self.update_tx(out)?;
        }
        self.seal_one(typ, payload, out)
    }

    /// Sends our `KeyUpdate` under the current key, then seals with the next one.
    fn update_tx(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let key_update = [
            u8::from(HandshakeType::KeyUpdate),
            0,
            0,
            1,
            UPDATE_NOT_REQUESTED,
        ];
        self.seal_one(ContentType::Handshake, &key_update, out)?;
        let (seq, secrets) = self.kernel.update_tx_secret().map_err(tls_error)?;
        let (key, iv) = key_and_iv(secrets)?;
        self.sealer = self.suite.aead_alg.encrypter(key, iv);
        self.tx_seq = seq;
        self.update_owed = false;
        Ok(())
    }

    fn seal_one(&mut self, typ: ContentType, payload: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let message = OutboundPlainMessage {
            typ,
            version: LEGACY_VERSION,
            payload: OutboundChunks::Single(payload),
        };
        let sealed = self
            .sealer
            .encrypt(message, self.tx_seq)
            .map_err(tls_error)?;
        self.tx_seq += 1;
        out.extend_from_slice(&sealed.encode());
        Ok(())
    }

    /// Records sealed under the current sending key.
    #[cfg(test)]
    pub fn tx_seq(&self) -> u64 {
        self.tx_seq
    }

    /// Lowers the sending key's record limit (tests: key updates without 2^23 records).
    #[cfg(test)]
    pub fn set_tx_limit(&mut self, records: u64) {
        self.tx_limit = records.max(1);
    }
}
