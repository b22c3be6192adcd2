//! TLS for `wss://` on rustls' unbuffered API: the transport owns every buffer, so an idle
//! connection holds none. (rustls' buffered `ServerConnection` keeps a 4 KiB receive buffer per
//! connection for its whole life, more than everything else an idle connection holds.)
//!
//! Received TLS bytes go to the worker's read buffer and are kept per connection only while a
//! record is incomplete; records are decrypted into the caller's buffer (the WebSocket
//! decoder's partial message). Writes encrypt a batch of frames into one buffer that lives for
//! that write. TLS output made while reading (a post-handshake message, e.g. the answer to the
//! client's key update) is held until the next write, which sends it first: reads never write.
//!
//! Once a TLS 1.3 handshake is done, rustls' connection is dropped and [`records`] carries the
//! traffic on rustls' keys: an idle connection keeps two AEAD keys and the key schedule's
//! secrets, not rustls' state machine, deframer and record layer.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::with_read_buf;

mod records;
use records::{Opened, Records, PLAINTEXT_MAX, RECORD_OVERHEAD};

/// The TLS server configuration for `wss://` listeners: [`super::tls::server_config`] over
/// [`super::cipher::provider`] (keys kept as bytes), with secret extraction on, which
/// [`records`] needs to take a connection over from rustls.
pub fn server_config(paths: &super::tls::CertPaths) -> anyhow::Result<rustls::ServerConfig> {
    let mut config = super::tls::server_config_with(paths, &[], false, super::cipher::provider())?;
    config.enable_secret_extraction = true;
    Ok(config)
}

/// Who holds a connection's TLS state.
enum Tls {
    /// rustls: the handshake, and a TLS 1.2 connection for its life.
    Rustls(Box<UnbufferedServerConnection>),
    /// A TLS 1.3 connection after its handshake.
    Records(Box<Records>),
    /// Taking over from rustls failed: nothing more is read or written.
    Failed,
}

/// The byte stream under TLS: a tokio TCP socket, or a connection of the io_uring driver.
pub trait TlsSocket: Send + 'static {
    /// Polls one read, appended to `dst`: `Ready(Ok(0))` at end of stream.
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut BytesMut,
    ) -> Poll<io::Result<usize>>;
    /// Writes `bytes` whole.
    fn send(&mut self, bytes: Vec<u8>) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// Shuts the sending side (the peer reads end of stream).
    fn close_write(&mut self) -> impl std::future::Future<Output = io::Result<()>> + Send;
}

impl TlsSocket for TcpStream {
    /// Through the worker's read buffer: only what arrived is copied to `dst`.
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        with_read_buf(|buf| {
            let mut rb = ReadBuf::new(buf);
            Pin::new(&mut *self).poll_read(cx, &mut rb).map_ok(|()| {
                dst.extend_from_slice(rb.filled());
                rb.filled().len()
            })
        })
    }

    async fn send(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        AsyncWriteExt::write_all(self, &bytes).await
    }

    async fn close_write(&mut self) -> io::Result<()> {
        AsyncWriteExt::shutdown(self).await
    }
}

#[cfg(target_os = "linux")]
impl TlsSocket for super::uring::UringStream {
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        self.poll_read_some(cx, dst)
    }

    async fn send(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        super::uring::UringStream::send(self, bytes::Bytes::from(bytes)).await
    }

    async fn close_write(&mut self) -> io::Result<()> {
        self.shutdown();
        Ok(())
    }
}

/// A server-side TLS connection over a byte stream (tokio's TCP by default).
pub struct TlsConn<S = TcpStream> {
    tcp: S,
    tls: Tls,
    /// Received TLS bytes not processed yet (an incomplete record); empty and unallocated
    /// between records.
    incoming: BytesMut,
    /// TLS output not sent yet: the handshake's, or what a read produced. Sent ahead of the
    /// next write; empty and unallocated otherwise.
    out: Vec<u8>,
    /// Plaintext decrypted by a write's processing (a record completed since the last read),
    /// given to the next read.
    stash: BytesMut,
}

/// Where processing the received bytes left the connection.
enum Progress {
    /// The handshake is done and nothing is left to decrypt: wait for more bytes (or write).
    Established,
    /// The handshake needs more bytes from the client.
    NeedData,
    /// The client sent close_notify, or the connection is closed.
    Closed,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the TLS connection is closed")
}

/// Appends what `write` writes to `buf`: it is given `guess` bytes first, and as many as it
/// says it needs (`needs`) if that was too few.
fn append<E>(
    buf: &mut Vec<u8>,
    guess: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needs: fn(&E) -> Option<usize>,
) -> io::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let start = buf.len();
    let mut room = guess;
    loop {
        buf.resize(start + room, 0);
        match write(&mut buf[start..]) {
            Ok(n) => {
                buf.truncate(start + n);
                return Ok(());
            }
            Err(e) => match needs(&e) {
                Some(required) if required > room => room = required,
                _ => {
                    buf.truncate(start);
                    return Err(io::Error::other(e));
                }
            },
        }
    }
}

fn encode_needs(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encrypt_needs(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

impl<S: TlsSocket> TlsConn<S> {
    /// Runs the server handshake on `tcp`. The caller bounds the time it may take.
    pub async fn accept(tcp: S, config: Arc<rustls::ServerConfig>) -> io::Result<TlsConn<S>> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut this = TlsConn {
            tcp,
            tls: Tls::Rustls(Box::new(conn)),
            incoming: BytesMut::new(),
            out: Vec::new(),
            stash: BytesMut::new(),
        };
        loop {
            let mut plain = BytesMut::new();
            let progress = this.process(&mut plain)?;
            if !plain.is_empty() {
                // The client's first bytes arrived with its Finished: keep them for the reader.
                this.stash = plain;
            }
            this.send_out().await?;
            match progress {
                Progress::Established => {
                    this.take_over()?;
                    return Ok(this);
                }
                Progress::Closed => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed during the TLS handshake",
                    ))
                }
                Progress::NeedData => {
                    let n = std::future::poll_fn(|cx| this.poll_read_tls(cx)).await?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the client closed during the TLS handshake",
                        ));
                    }
                }
            }
        }
    }

    /// Hands an established TLS 1.3 connection from rustls to [`Records`].
    fn take_over(&mut self) -> io::Result<()> {
        let Tls::Rustls(conn) = std::mem::replace(&mut self.tls, Tls::Failed) else {
            return Ok(());
        };
        self.tls = match Records::take_over(conn) {
            Ok(records) => Tls::Records(records?),
            Err(tls12) => Tls::Rustls(tls12),
        };
        Ok(())
    }

    /// Frees the receive buffer once nothing is left in it.
    fn release_incoming(&mut self) {
        if self.incoming.is_empty() && self.incoming.capacity() > 0 {
            self.incoming = BytesMut::new();
        }
    }

    /// Processes every complete record received, appending application data to `plain` and
    /// TLS output to `out`.
    fn process(&mut self, plain: &mut BytesMut) -> io::Result<Progress> {
        let conn = match &mut self.tls {
            Tls::Rustls(conn) => conn,
            Tls::Records(records) => {
                let opened = records.open(&mut self.incoming, plain)?;
                self.release_incoming();
                return Ok(match opened {
                    Opened::More => Progress::Established,
                    Opened::Closed => Progress::Closed,
                });
            }
            Tls::Failed => return Err(closed()),
        };
        loop {
            let UnbufferedStatus { discard, state } =
                conn.process_tls_records(&mut self.incoming[..]);
            let mut extra = 0;
            let progress = match state {
                // The connection ends: what is left unprocessed does not matter.
                Err(e) => return Err(tls_error(e)),
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        extra += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    None
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    append(&mut self.out, 1024, |b| data.encode(b), encode_needs)?;
                    None
                }
                // Sent by the caller before it waits for anything (`send_out`), in order.
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    data.done();
                    None
                }
                Ok(ConnectionState::BlockedHandshake) => Some(Progress::NeedData),
                Ok(ConnectionState::WriteTraffic(_)) => Some(Progress::Established),
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Some(Progress::Closed),
                // Early data is not enabled; rustls may add states.
                Ok(other) => {
                    return Err(io::Error::other(format!("unexpected TLS state {other:?}")))
                }
            };
            self.incoming.advance(discard + extra);
            if self.incoming.is_empty() && self.incoming.capacity() > 0 {
                self.incoming = BytesMut::new();
            }
            if let Some(progress) = progress {
                return Ok(progress);
            }
        }
    }

    /// Polls one read of TLS bytes from the socket into `incoming` (0 at end of stream).
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.tcp.poll_read_into(cx, &mut self.incoming)
    }

    /// Polls for application data, appended to `dst`: `Ready(Ok(0))` when the client closed.
    pub fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        if !self.stash.is_empty() {
            let n = self.stash.len();
            dst.extend_from_slice(&std::mem::take(&mut self.stash));
            return Poll::Ready(Ok(n));
        }
        loop {
            let before = dst.len();
            let progress = self.process(dst)?;
            let n = dst.len() - before;
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            if let Progress::Closed = progress {
                return Poll::Ready(Ok(0));
            }
            match self.poll_read_tls(cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The connection's TLS 1.3 record layer, once rustls handed it over.
    #[cfg(test)]
    fn records(&mut self) -> Option<&mut Records> {
        match &mut self.tls {
            Tls::Records(r) => Some(r),
            _ => None,
        }
    }

    /// Whether TLS output made while reading waits for the next write.
    pub fn has_pending_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Encrypts `plain` (or, with `None`, a close_notify alert) after any pending TLS output
    /// into one buffer, and writes it.
    async fn encrypt_and_write(&mut self, plain: Option<&[u8]>) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.out);
        let conn = match &mut self.tls {
            Tls::Rustls(conn) => conn,
            Tls::Records(records) => {
                match plain {
                    Some(p) => records.seal(p, &mut buf)?,
                    None => records.seal_close_notify(&mut buf)?,
                }
                return self.tcp.send(buf).await;
            }
            Tls::Failed => return Err(closed()),
        };
        loop {
            let UnbufferedStatus { discard, state } =
                conn.process_tls_records(&mut self.incoming[..]);
            let mut extra = 0;
            let done = match state {
                // The connection ends: what is left unprocessed does not matter.
                Err(e) => return Err(tls_error(e)),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    match plain {
                        Some(p) => {
                            let guess = p.len() + (p.len() / PLAINTEXT_MAX + 1) * RECORD_OVERHEAD;
                            append(&mut buf, guess, |b| traffic.encrypt(p, b), encrypt_needs)?
                        }
                        None => append(
                            &mut buf,
                            64,
                            |b| traffic.queue_close_notify(b),
                            encrypt_needs,
                        )?,
                    }
                    true
                }
                // A record completed since the last read: keep its data for the next read.
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        extra += record.discard;
                        self.stash.extend_from_slice(record.payload);
                    }
                    false
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    append(&mut buf, 1024, |b| data.encode(b), encode_needs)?;
                    false
                }
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    data.done();
                    false
                }
                // The client's close_notify (reported once): we may still write.
                Ok(ConnectionState::PeerClosed) => false,
                Ok(ConnectionState::Closed) => return Err(closed()),
                Ok(other) => {
                    return Err(io::Error::other(format!(
                        "cannot write in TLS state {other:?}"
                    )))
                }
            };
            self.incoming.advance(discard + extra);
            if done {
                break;
            }
        }
        self.tcp.send(buf).await
    }

    /// Writes `plain` as application data.
    pub async fn write_all(&mut self, plain: &[u8]) -> io::Result<()> {
        self.encrypt_and_write(Some(plain)).await
    }

    /// Sends any pending TLS output (the handshake's).
    async fn send_out(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        self.tcp.send(out).await
    }

    /// Sends close_notify and shuts the socket's write side.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.encrypt_and_write(None).await?;
        self.tcp.close_write().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::transport::tls;

    /// A dev certificate's server configuration, and a client configuration (TLS `versions`)
    /// trusting its CA.
    fn configs(
        dir: &std::path::Path,
        versions: &[&'static rustls::SupportedProtocolVersion],
        client_provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let paths = tls::dev_certificate(dir, &[]).unwrap();
        let server = server_config(&paths).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(paths.ca.unwrap()).unwrap();
        for cert in rustls_pemfile::certs(&mut &ca[..]) {
            roots.add(cert.unwrap()).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(client_provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A server `TlsConn` and a tokio-rustls client over loopback, handshake done.
    async fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (
        TlsConn,
        tokio_rustls::client::TlsStream<TcpStream>,
        tempfile::TempDir,
    ) {
        pair_with(versions, tls::provider()).await
    }

    /// [`pair`] with a client on the given provider (rustls' own keys, not the node's).
    async fn pair_with(
        versions: &[&'static rustls::SupportedProtocolVersion],
        client_provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> (
        TlsConn,
        tokio_rustls::client::TlsStream<TcpStream>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (server_config, client_config) = configs(dir.path(), versions, client_provider);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(client_config)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap()
        };
        let server = async {
            let (tcp, _) = listener.accept().await.unwrap();
            TlsConn::accept(tcp, server_config).await.unwrap()
        };
        let (client, server) = tokio::join!(client, server);
        (server, client, dir)
    }

    async fn read_exactly(conn: &mut TlsConn, n: usize) -> BytesMut {
        let mut got = BytesMut::new();
        while got.len() < n {
            let read = std::future::poll_fn(|cx| conn.poll_read_some(cx, &mut got));
            let k = tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .unwrap()
                .unwrap();
            assert!(k > 0, "closed after {} of {n} bytes", got.len());
        }
        got
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn data_crosses_both_ways_in_tls_13_and_12_and_an_idle_connection_holds_no_buffer() {
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let (mut server, mut client, _dir) = pair(versions).await;
            // Larger than a record (16 KiB) and than the worker's read buffer (64 KiB).
            let big = pattern(200_000);
            let (_, got) = tokio::join!(
                async { client.write_all(&big).await.unwrap() },
                read_exactly(&mut server, big.len())
            );
            assert_eq!(&got[..], &big[..]);
            server.write_all(&big).await.unwrap();
            let mut back = vec![0u8; big.len()];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, big);
            assert_eq!(server.incoming.capacity(), 0, "{versions:?}");
            assert_eq!(
                server.records().is_some(),
                versions[0] == &rustls::version::TLS13,
                "TLS 1.3 runs on our record layer, TLS 1.2 on rustls"
            );
            assert_eq!(server.out.capacity(), 0);
            assert_eq!(server.stash.capacity(), 0);
        }
    }

    /// Every TLS 1.3 suite works between a rustls client on ring's keys and the node's keys
    /// (`transport/cipher.rs`), from the handshake to the records after a key update each way.
    #[tokio::test]
    async fn every_tls13_suite_carries_data_on_the_nodes_keys() {
        for suite in [
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let mut provider = rustls::crypto::ring::default_provider();
            provider.cipher_suites.retain(|cs| cs.suite() == suite);
            let (mut server, mut client, _dir) =
                pair_with(&[&rustls::version::TLS13], Arc::new(provider)).await;
            assert_eq!(
                client
                    .get_ref()
                    .1
                    .negotiated_cipher_suite()
                    .unwrap()
                    .suite(),
                suite
            );
            assert!(server.records().is_some());
            let data = pattern(40_000);
            for round in 0..2 {
                if round == 1 {
                    client.get_mut().1.refresh_traffic_keys().unwrap();
                }
                let (_, got) = tokio::join!(
                    async { client.write_all(&data).await.unwrap() },
                    read_exactly(&mut server, data.len())
                );
                assert_eq!(&got[..], &data[..], "{suite:?}");
                server.write_all(&data).await.unwrap();
                let mut back = vec![0u8; data.len()];
                client.read_exact(&mut back).await.unwrap();
                assert_eq!(back, data, "{suite:?}");
            }
        }
    }

    #[tokio::test]
    async fn traffic_goes_on_across_client_key_updates() {
        let (mut server, mut client, _dir) = pair(&[&rustls::version::TLS13]).await;
        for round in 0..3u8 {
            // A KeyUpdate asking for ours: rustls answers it with the next write's records.
            client.get_mut().1.refresh_traffic_keys().unwrap();
            client.write_all(&[round; 16]).await.unwrap();
            let got = read_exactly(&mut server, 16).await;
            assert_eq!(&got[..], &[round; 16]);
            assert!(!server.has_pending_output(), "reads never write");
            assert!(server.records().unwrap().key_update_owed());
            server.write_all(&[round; 6]).await.unwrap();
            let mut back = [0u8; 6];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, [round; 6]);
        }
    }

    #[tokio::test]
    async fn close_notify_goes_both_ways() {
        let (mut server, mut client, _dir) = pair(&[&rustls::version::TLS13]).await;
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut all = Vec::new();
        // A clean end: close_notify, not a truncation error.
        client.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"bye");
        client.shutdown().await.unwrap();
        let mut sink = BytesMut::new();
        let n = std::future::poll_fn(|cx| server.poll_read_some(cx, &mut sink))
            .await
            .unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn the_server_replaces_its_key_before_the_limit_and_the_client_follows() {
        let (mut server, mut client, _dir) = pair(&[&rustls::version::TLS13]).await;
        // Three records per key: a 40 KB write is three records, so every write crosses a
        // key update, and the next write starts with one.
        server.records().unwrap().set_tx_limit(3);
        for round in 0..6u8 {
            let data = vec![round; 40_000];
            server.write_all(&data).await.unwrap();
            let mut back = vec![0u8; data.len()];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, data, "round {round}");
            assert!(
                server.records().unwrap().tx_seq() <= 3,
                "the key was replaced"
            );
            // The client's direction is untouched by ours.
            client.write_all(&[round; 5]).await.unwrap();
            assert_eq!(&read_exactly(&mut server, 5).await[..], &[round; 5]);
        }
    }

    #[tokio::test]
    async fn a_flood_of_key_updates_without_data_is_refused() {
        let (mut server, mut client, _dir) = pair(&[&rustls::version::TLS13]).await;
        // 32 in a row are taken; application data starts the count again.
        for _ in 0..32 {
            client.get_mut().1.refresh_traffic_keys().unwrap();
            client.flush().await.unwrap();
        }
        client.write_all(b"x").await.unwrap();
        assert_eq!(&read_exactly(&mut server, 1).await[..], b"x");
        for _ in 0..33 {
            client.get_mut().1.refresh_traffic_keys().unwrap();
            client.flush().await.unwrap();
        }
        let mut sink = BytesMut::new();
        let read = std::future::poll_fn(|cx| server.poll_read_some(cx, &mut sink));
        let e = match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Err(e)) => e,
            Ok(Ok(n)) => panic!("read {n} bytes where a refusal was due"),
            Err(_) => panic!("the 33rd KeyUpdate in a row was taken"),
        };
        assert!(e.to_string().contains("KeyUpdates"), "{e}");
    }

    /// Bytes the client writes under the TLS layer, as an attacker on the path would.
    async fn raw_to_server(bytes: &[u8]) -> io::Error {
        let (mut server, mut client, _dir) = pair(&[&rustls::version::TLS13]).await;
        client.get_mut().0.write_all(bytes).await.unwrap();
        let mut sink = BytesMut::new();
        let read = std::future::poll_fn(|cx| server.poll_read_some(cx, &mut sink));
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("the server decides at once")
            .expect_err("refused")
    }

    #[tokio::test]
    async fn forged_oversize_and_plaintext_records_are_refused_without_a_panic() {
        let mut forged = vec![23, 3, 3, 0, 40];
        forged.extend_from_slice(&[0x5a; 40]);
        let e = raw_to_server(&forged).await;
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let e = raw_to_server(&[23, 3, 3, 0xff, 0xff]).await;
        assert!(e.to_string().contains("record_overflow"), "{e}");
        // A plaintext handshake record after the handshake.
        let e = raw_to_server(&[22, 3, 3, 0, 5, 24, 0, 0, 1, 0]).await;
        assert!(e.to_string().contains("only application_data"), "{e}");
        // Too short to hold a tag.
        let e = raw_to_server(&[23, 3, 3, 0, 1, 0]).await;
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    #[tokio::test]
    async fn an_established_tls13_connection_keeps_no_rustls_connection() {
        let (mut server, _client, _dir) = pair(&[&rustls::version::TLS13]).await;
        assert!(server.records().is_some());
        // The connection itself, inline in its boxed transport: rustls' connection (1.2 KiB
        // inline, its deframer and state machine behind it) is gone; the two AEAD keys are
        // behind the record layer's two boxes.
        let bytes = std::mem::size_of::<TlsConn>();
        assert!(bytes <= 768, "TlsConn is {bytes} bytes");
    }

    #[tokio::test]
    async fn a_client_that_does_not_speak_tls_is_refused_without_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (server_config, _) = configs(dir.path(), &[&rustls::version::TLS13], tls::provider());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let refused = TlsConn::accept(accepted, server_config).await;
        assert!(refused.is_err());
        // Half a handshake, then the client goes away.
        let (server_config, _) = configs(dir.path(), &[&rustls::version::TLS13], tls::provider());
        let tcp = TcpStream::connect(addr).await.unwrap();
        drop(tcp);
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(TlsConn::accept(accepted, server_config).await.is_err());
    }
}
