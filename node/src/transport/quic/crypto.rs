//! QUIC's TLS for client connections: rustls' QUIC connection for the handshake, then only the
//! secrets the connection's 1-RTT key updates derive from.
//!
//! quinn's own session (`quinn::crypto::rustls::QuicServerConfig`) keeps rustls' whole
//! connection (state machine, deframer buffer, queues) for the connection's life (4.0 KiB per
//! idle connection measured, BENCHMARKS.md ninth stop on issue 22),
//! though after the handshake a server uses it for nothing but the next key update. This one
//! drops it once the handshake is done and its last handshake bytes (the session tickets)
//! were taken, and keeps the `Secrets` rustls handed over with the 1-RTT keys.
//!
//! What a session can no longer do once rustls is gone, and why that is fine here: read more
//! handshake data (a client has nothing left to send a server that asks for no client
//! certificate: anything it sends is refused with `unexpected_message`), export keying
//! material (clients authenticate in-band with `Hello`; peer links, which do export it, keep
//! quinn's session), report the client's certificates (none are asked for).

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use quinn_proto::crypto::{
    self, ExportKeyingMaterialError, HeaderKey, KeyPair, Keys, PacketKey, UnsupportedVersion,
};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{ConnectionId, Side, TransportError, TransportErrorCode};
use rustls::quic::{Connection, KeyChange, Secrets, ServerConnection, Suite, Version};

/// TLS alert `unexpected_message`, sent as a QUIC CRYPTO_ERROR.
const ALERT_UNEXPECTED_MESSAGE: u8 = 10;

/// The server side of QUIC's TLS: [`crypto::ServerConfig`] for client-facing endpoints.
pub struct ServerCrypto {
    tls: Arc<rustls::ServerConfig>,
    /// quinn's configuration over the same rustls one: initial keys and retry tags, which need
    /// no session.
    quinn: quinn::crypto::rustls::QuicServerConfig,
    /// The suite initial packets are protected with (TLS_AES_128_GCM_SHA256).
    initial: Suite,
    /// Sessions that still hold rustls' connection: those handshaking.
    holding: Arc<AtomicUsize>,
}

impl ServerCrypto {
    /// Over `tls`, which must allow TLS 1.3 and offer TLS_AES_128_GCM_SHA256 (as QUIC requires).
    pub fn new(tls: rustls::ServerConfig) -> anyhow::Result<ServerCrypto> {
        let tls = Arc::new(tls);
        let quinn = quinn::crypto::rustls::QuicServerConfig::try_from(tls.clone())?;
        let initial = tls
            .crypto_provider()
            .cipher_suites
            .iter()
            .find_map(|cs| match (cs.suite(), cs.tls13()) {
                (rustls::CipherSuite::TLS13_AES_128_GCM_SHA256, Some(s)) => s.quic_suite(),
                _ => None,
            })
            .ok_or_else(|| anyhow::anyhow!("the TLS provider has no TLS_AES_128_GCM_SHA256"))?;
        Ok(ServerCrypto {
            tls,
            quinn,
            initial,
            holding: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Sessions of this configuration still holding rustls' connection (handshakes under way).
    pub fn handshakes_held(&self) -> usize {
        self.holding.load(Relaxed)
    }
}

/// The QUIC versions rustls speaks, by wire number (as quinn maps them).
fn version(number: u32) -> Result<Version, UnsupportedVersion> {
    match number {
        0xff00_001d..=0xff00_0020 => Ok(Version::V1Draft),
        0x0000_0001 | 0xff00_0021..=0xff00_0022 => Ok(Version::V1),
        _ => Err(UnsupportedVersion),
    }
}

impl crypto::ServerConfig for ServerCrypto {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, UnsupportedVersion> {
        self.quinn.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.quinn.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        number: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        // quinn calls this only for a version `initial_keys` accepted.
        let version = version(number).unwrap_or(Version::V1);
        let mut encoded = Vec::new();
        params.write(&mut encoded);
        let tls = ServerConnection::new(self.tls.clone(), version, encoded)
            .map(|conn| {
                self.holding.fetch_add(1, Relaxed);
                Box::new(Handshake {
                    conn: Connection::Server(conn),
                    holding: self.holding.clone(),
                })
            })
            // Only a configuration without TLS 1.3 fails here, and `new` checked for it.
            .map_err(|e| tracing::error!(error = %e, "QUIC TLS session refused"))
            .ok();
        Box::new(Session {
            version,
            initial: self.initial,
            tls,
            got_handshake_data: false,
            handshake_data: None,
            next: None,
        })
    }
}

/// rustls' connection while it is needed, counted in [`ServerCrypto::handshakes_held`].
struct Handshake {
    /// Always `Connection::Server` (the enum exports keying material; the variant does not).
    conn: Connection,
    holding: Arc<AtomicUsize>,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.holding.fetch_sub(1, Relaxed);
    }
}

/// One connection's TLS.
struct Session {
    version: Version,
    initial: Suite,
    /// Until the handshake is done and written.
    tls: Option<Box<Handshake>>,
    got_handshake_data: bool,
    /// ALPN and SNI, kept when `tls` goes.
    handshake_data: Option<(Option<Vec<u8>>, Option<String>)>,
    /// The secrets of the next 1-RTT key update, from rustls' last key change.
    next: Option<Secrets>,
}

fn boxed_keys(keys: rustls::quic::Keys) -> Keys {
    Keys {
        header: KeyPair {
            local: Box::new(keys.local.header) as Box<dyn HeaderKey>,
            remote: Box::new(keys.remote.header),
        },
        packet: KeyPair {
            local: Box::new(keys.local.packet) as Box<dyn PacketKey>,
            remote: Box::new(keys.remote.packet),
        },
    }
}

fn server_name(conn: &Connection) -> Option<String> {
    match conn {
        Connection::Server(s) => s.server_name().map(String::from),
        Connection::Client(_) => None,
    }
}

impl Session {
    fn snapshot_handshake_data(conn: &Connection) -> (Option<Vec<u8>>, Option<String>) {
        (conn.alpn_protocol().map(<[u8]>::to_vec), server_name(conn))
    }
}

impl crypto::Session for Session {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        let side = match side {
            Side::Client => rustls::Side::Client,
            Side::Server => rustls::Side::Server,
        };
        boxed_keys(self.initial.keys(dst_cid, side, self.version))
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        if !self.got_handshake_data {
            return None;
        }
        let (protocol, server_name) = match (&self.tls, &self.handshake_data) {
            (Some(tls), _) => Self::snapshot_handshake_data(&tls.conn),
            (None, Some(kept)) => kept.clone(),
            (None, None) => return None,
        };
        Some(Box::new(quinn::crypto::rustls::HandshakeData {
            protocol,
            server_name,
        }))
    }

    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        // No client certificates are asked for.
        None
    }

    fn early_crypto(&self) -> Option<(Box<dyn HeaderKey>, Box<dyn PacketKey>)> {
        let keys = self.tls.as_ref()?.conn.zero_rtt_keys()?;
        Some((Box::new(keys.header), Box::new(keys.packet)))
    }

    fn early_data_accepted(&self) -> Option<bool> {
        None
    }

    fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.conn.is_handshaking())
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        let Some(tls) = self.tls.as_mut() else {
            if buf.is_empty() {
                return Ok(false);
            }
            // `next` is set once the handshake got as far as the 1-RTT keys; without it the
            // session never started (logged in `start_session`).
            let reason = match self.next {
                Some(_) => "TLS data after the handshake",
                None => "no TLS session",
            };
            return Err(TransportError {
                code: TransportErrorCode::crypto(ALERT_UNEXPECTED_MESSAGE),
                frame: None,
                reason: reason.into(),
            });
        };
        let conn = &mut tls.conn;
        conn.read_hs(buf).map_err(|e| TransportError {
            code: match conn.alert() {
                Some(alert) => TransportErrorCode::crypto(alert.into()),
                None => TransportErrorCode::PROTOCOL_VIOLATION,
            },
            frame: None,
            reason: format!("TLS error: {e}"),
        })?;
        if !self.got_handshake_data
            && (conn.alpn_protocol().is_some()
                || server_name(conn).is_some()
                || !conn.is_handshaking())
        {
            // As quinn does: the client's hello was read (or the handshake is over).
            self.got_handshake_data = true;
            return Ok(true);
        }
        Ok(false)
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        let Some(tls) = self.tls.as_ref() else {
            return Ok(None);
        };
        match tls.conn.quic_transport_parameters() {
            None => Ok(None),
            Some(mut bytes) => Ok(Some(TransportParameters::read(Side::Server, &mut bytes)?)),
        }
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        let tls = self.tls.as_mut()?;
        let before = buf.len();
        match tls.conn.write_hs(buf) {
            Some(KeyChange::Handshake { keys }) => Some(boxed_keys(keys)),
            Some(KeyChange::OneRtt { keys, next }) => {
                self.next = Some(next);
                Some(boxed_keys(keys))
            }
            None => {
                // quinn writes until a call yields nothing: once that happens after the
                // handshake, rustls has nothing more to say on this connection.
                if buf.len() == before && !tls.conn.is_handshaking() && self.next.is_some() {
                    self.handshake_data = Some(Self::snapshot_handshake_data(&tls.conn));
                    self.tls = None;
                }
                None
            }
        }
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn PacketKey>>> {
        let keys = self.next.as_mut()?.next_packet_keys();
        Some(KeyPair {
            local: Box::new(keys.local),
            remote: Box::new(keys.remote),
        })
    }

    fn is_valid_retry(&self, _orig: &ConnectionId, _header: &[u8], _payload: &[u8]) -> bool {
        // Only a client receives a Retry.
        false
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        let tls = self.tls.as_ref().ok_or(ExportKeyingMaterialError)?;
        tls.conn
            .export_keying_material(output, label, Some(context))
            .map(|_| ())
            .map_err(|_| ExportKeyingMaterialError)
    }
}

impl std::fmt::Debug for ServerCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCrypto")
            .field("handshakes_held", &self.handshakes_held())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tls;
    use std::time::Duration;

    /// A server endpoint on loopback with a [`ServerCrypto`], and a client configuration
    /// trusting its dev certificate.
    fn endpoints(dir: &std::path::Path) -> (Arc<ServerCrypto>, quinn::Endpoint, quinn::Endpoint) {
        let cert = tls::dev_certificate(dir, &[]).unwrap();
        let crypto = Arc::new(
            ServerCrypto::new(
                tls::server_config_with(
                    &cert,
                    &[tls::ALPN_CLIENT],
                    true,
                    crate::transport::cipher::provider(),
                )
                .unwrap(),
            )
            .unwrap(),
        );
        let config =
            super::super::server_config_with(crypto.clone(), Duration::from_secs(30)).unwrap();
        let server = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let client = super::super::testing::client(&cert);
        (crypto, server, client)
    }

    /// A client connected to a server of [`endpoints`]: the crypto, both endpoints (kept open
    /// while the connections are used), the client's and the server's connection.
    async fn connected(
        dir: &std::path::Path,
    ) -> (
        Arc<ServerCrypto>,
        (quinn::Endpoint, quinn::Endpoint),
        quinn::Connection,
        quinn::Connection,
    ) {
        let (crypto, server, client) = endpoints(dir);
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            (server, conn)
        });
        let c = client.connect(addr, "localhost").unwrap().await.unwrap();
        let (server, s) = accept.await.unwrap();
        (crypto, (server, client), c, s)
    }

    /// Sends `msg` on a new stream of `from` and reads it on `to`'s next accepted stream.
    async fn round_trip(from: &quinn::Connection, to: &quinn::Connection, msg: &[u8]) {
        let (mut send, _recv) = from.open_bi().await.unwrap();
        send.write_all(msg).await.unwrap();
        send.finish().unwrap();
        let (_send, mut recv) = to.accept_bi().await.unwrap();
        assert_eq!(recv.read_to_end(1 << 16).await.unwrap(), msg);
    }

    #[tokio::test]
    async fn a_connection_keeps_no_tls_connection_after_its_handshake_and_still_updates_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (crypto, _endpoints, c, s) = connected(dir.path()).await;
        round_trip(&c, &s, b"hello").await;

        // The server's session let go of rustls once the handshake was written.
        let t0 = std::time::Instant::now();
        while crypto.handshakes_held() != 0 && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            crypto.handshakes_held(),
            0,
            "rustls' connection was dropped"
        );
        let data = s.handshake_data().expect("handshake data kept");
        let data = data
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap();
        assert_eq!(data.protocol.as_deref(), Some(tls::ALPN_CLIENT));
        assert_eq!(data.server_name.as_deref(), Some("localhost"));

        // Key updates from either side derive from the kept secrets; traffic goes on.
        for i in 0..4u8 {
            if i % 2 == 0 {
                s.force_key_update();
            } else {
                c.force_key_update();
            }
            round_trip(&c, &s, &[i; 3000]).await;
            round_trip(&s, &c, &[i; 3000]).await;
        }
        assert!(c.close_reason().is_none() && s.close_reason().is_none());
        // A server session exports nothing once rustls is gone.
        assert!(s
            .export_keying_material(&mut [0; 32], b"label", b"")
            .is_err());
    }

    /// Client connections send no datagram over 1,200 bytes: no path MTU discovery (whose
    /// probes would double quinn's per-connection transmit buffer), even where the path
    /// (loopback) carries far larger ones.
    #[tokio::test]
    async fn a_client_connection_keeps_to_1200_byte_datagrams() {
        let dir = tempfile::tempdir().unwrap();
        let (_crypto, _endpoints, c, s) = connected(dir.path()).await;
        // Discovery, where on, raises the MTU within milliseconds of the handshake here.
        for _ in 0..10 {
            round_trip(&s, &c, &[7; 20_000]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(s.stats().path.current_mtu, 1200);
        assert_eq!(s.stats().path.sent_plpmtud_probes, 0);
    }

    #[test]
    fn versions_are_those_quinn_speaks() {
        assert!(matches!(version(1), Ok(Version::V1)));
        assert!(matches!(version(0xff00_001d), Ok(Version::V1Draft)));
        assert!(version(0x6b33_43cf).is_err(), "QUIC v2 is not offered");
        assert!(version(0).is_err());
    }
}
