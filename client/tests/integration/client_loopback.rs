//! The SDK against a tiny in-test node built from the wire codec, on real sockets on 127.0.0.1:
//! WebSocket (plain and TLS) and QUIC. The test plays the node frame by frame, so every client
//! behaviour (handshake, masking, correlation, dedup, acks, redirects, reconnects, keepalive) is
//! checked without the real node.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ringpost_client::wire::ws::{self, Decoder, Message, OpCode, Role};
use ringpost_client::wire::{
    framing, Body, Deliver, DeliverKind, Done, Error as ErrorFrame, GoingAway, Hello, Migrate,
    Pong, Redirect, Registered, SendStatus, Typing, Welcome,
};
use ringpost_client::{
    Auth, Client, ClientConfig, ClientError, Connection, Endpoint, ErrorCode, Event, Frame,
    TlsOptions,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Every wait in these tests is bounded by this.
const STEP: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ---------------------------------------------------------------------------------------------
// A tiny node
// ---------------------------------------------------------------------------------------------

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum ServerIo {
    Ws {
        io: Box<dyn Io>,
        decoder: Decoder,
        buf: BytesMut,
    },
    Quic {
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        buf: BytesMut,
    },
}

/// One accepted client connection, after the WebSocket upgrade or the QUIC stream opened.
struct ServerConn {
    io: ServerIo,
}

impl ServerConn {
    /// The next frame; `None` when the client closed.
    async fn recv(&mut self) -> Option<Frame> {
        match &mut self.io {
            ServerIo::Ws { io, decoder, buf } => loop {
                match decoder.decode(buf).expect("client broke WebSocket framing") {
                    Some(Message::Binary(b)) => return Some(Frame::decode(&b).expect("bad frame")),
                    Some(Message::Close { .. }) => return None,
                    Some(other) => panic!("unexpected message {other:?}"),
                    None => {
                        buf.reserve(4096);
                        match io.read_buf(buf).await {
                            Ok(0) | Err(_) => return None,
                            Ok(_) => {}
                        }
                    }
                }
            },
            ServerIo::Quic { recv, buf, .. } => loop {
                if let Some(frame) = framing::decode_prefixed(buf).expect("bad prefix") {
                    return Some(Frame::decode(&frame).expect("bad frame"));
                }
                match recv.read_chunk(usize::MAX, true).await {
                    Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                    _ => return None,
                }
            },
        }
    }

    /// The next frame, skipping keepalive pings.
    async fn recv_request(&mut self) -> Option<Frame> {
        loop {
            let frame = self.recv().await?;
            if frame.req == 0 && matches!(frame.body, Body::Ping(_)) {
                continue;
            }
            return Some(frame);
        }
    }

    async fn send_bytes(&mut self, encoded: &[u8]) {
        match &mut self.io {
            ServerIo::Ws { io, .. } => {
                let mut out = BytesMut::new();
                ws::encode_frame(OpCode::Binary, encoded, None, &mut out);
                let _ = io.write_all(&out).await;
                let _ = io.flush().await;
            }
            ServerIo::Quic { send, .. } => {
                let prefix = framing::length_prefix(encoded.len()).unwrap();
                let _ = send.write_all(&prefix).await;
                let _ = send.write_all(encoded).await;
            }
        }
    }

    async fn send(&mut self, frame: Frame) {
        self.send_bytes(&frame.encode().unwrap()).await;
    }

    /// Reads `Hello` and answers `Welcome`; returns the `Hello`.
    async fn welcome(&mut self) -> Hello {
        let frame = within("Hello", self.recv())
            .await
            .expect("closed before Hello");
        let Body::Hello(hello) = frame.body else {
            panic!("first frame is {}", frame.body.name())
        };
        self.send(Frame::new(frame.req, welcome())).await;
        hello
    }

    /// Closes abruptly (no close frame / QUIC close with code 9).
    async fn drop_connection(self) {
        match self.io {
            ServerIo::Ws { mut io, .. } => {
                let _ = io.shutdown().await;
            }
            ServerIo::Quic { conn, .. } => conn.close(9u32.into(), b"dropped"),
        }
    }
}

fn welcome() -> Welcome {
    Welcome {
        protocol_version: 1,
        node_id: 7,
        epoch: 1,
        server_time_ms: 0,
        ping_interval_ms: 30_000,
        idle_timeout_ms: 90_000,
        deliver_window: 64,
        frame_bytes_max: 128 * 1024,
    }
}

/// A listening tiny node: accepted connections arrive on `conns`.
struct TestServer {
    url: String,
    conns: mpsc::Receiver<ServerConn>,
    _quic: Option<quinn::Endpoint>,
}

impl TestServer {
    async fn ws() -> TestServer {
        Self::websocket(None).await
    }

    async fn wss(ca: &TestCa) -> TestServer {
        Self::websocket(Some(ca.acceptor())).await
    }

    async fn websocket(tls: Option<tokio_rustls::TlsAcceptor>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, conns) = mpsc::channel(16);
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let io: Box<dyn Io> = match tls {
                        Some(acceptor) => match acceptor.accept(tcp).await {
                            Ok(s) => Box::new(s),
                            Err(_) => return,
                        },
                        None => Box::new(tcp),
                    };
                    if let Some(conn) = upgrade(io).await {
                        let _ = tx.send(conn).await;
                    }
                });
            }
        });
        TestServer {
            url: format!("{scheme}://localhost:{port}"),
            conns,
            _quic: None,
        }
    }

    async fn quic(ca: &TestCa) -> TestServer {
        let endpoint =
            quinn::Endpoint::server(ca.quic_server_config(), "127.0.0.1:0".parse().unwrap())
                .unwrap();
        let port = endpoint.local_addr().unwrap().port();
        let (tx, conns) = mpsc::channel(16);
        let accepting = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let Ok((send, recv)) = conn.accept_bi().await else {
                        return;
                    };
                    let io = ServerIo::Quic {
                        conn,
                        send,
                        recv,
                        buf: BytesMut::new(),
                    };
                    let _ = tx.send(ServerConn { io }).await;
                });
            }
        });
        TestServer {
            url: format!("quic://127.0.0.1:{port}"),
            conns,
            _quic: Some(endpoint),
        }
    }

    async fn accept(&mut self) -> ServerConn {
        within("accept", self.conns.recv())
            .await
            .expect("server stopped")
    }
}

/// The server side of the WebSocket upgrade, checked with the wire codec.
async fn upgrade(mut io: Box<dyn Io>) -> Option<ServerConn> {
    let mut head = BytesMut::new();
    loop {
        match ws::parse_request(&head) {
            Ok(Some((request, used))) => {
                io.write_all(&ws::accept_response(&request)).await.ok()?;
                let _ = head.split_to(used);
                return Some(ServerConn {
                    io: ServerIo::Ws {
                        io,
                        decoder: Decoder::new(Role::Server, 128 * 1024),
                        buf: head,
                    },
                });
            }
            Ok(None) => {
                head.reserve(4096);
                if io.read_buf(&mut head).await.ok()? == 0 {
                    return None;
                }
            }
            Err(e) => panic!("client sent a bad upgrade request: {e}"),
        }
    }
}

/// A throwaway CA and a certificate for localhost and 127.0.0.1 signed by it.
struct TestCa {
    dir: tempfile::TempDir,
    cert: rustls::pki_types::CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl TestCa {
    fn new() -> TestCa {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        TestCa {
            dir,
            cert: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    fn options(&self) -> TlsOptions {
        TlsOptions::ca_file(self.dir.path().join("ca.pem"))
    }

    fn server_config(&self, alpn: Option<&[u8]>) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)
            .unwrap();
        if let Some(alpn) = alpn {
            config.alpn_protocols = vec![alpn.to_vec()];
        }
        config
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::new(self.server_config(None)))
    }

    fn quic_server_config(&self) -> quinn::ServerConfig {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(
            self.server_config(Some(b"ringpost/1")),
        )
        .unwrap();
        quinn::ServerConfig::with_crypto(Arc::new(crypto))
    }
}

/// A client config with quick reconnects, for `url`.
fn config(url: &str) -> ClientConfig {
    ClientConfig {
        backoff_base: Duration::from_millis(5),
        backoff_cap: Duration::from_millis(50),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        ..ClientConfig::new(url)
    }
}

fn auth() -> Auth {
    Auth {
        user: 15550001,
        device: 1,
        token: Bytes::from_static(&[7; 32]),
    }
}

/// Connects a client while the tiny node welcomes it.
async fn connected(server: &mut TestServer, config: ClientConfig) -> (Client, ServerConn, Hello) {
    let connecting = tokio::spawn(Client::connect(config));
    let mut conn = server.accept().await;
    let hello = conn.welcome().await;
    let client = within("connect", connecting).await.unwrap().unwrap();
    (client, conn, hello)
}

fn deliver(seq: u64, from_user: u64, msg: u8) -> Frame {
    Frame::new(
        0,
        Deliver {
            seq,
            kind: DeliverKind::Message,
            from_user,
            from_device: 1,
            msg_id: [msg; 16],
            server_time_ms: 1,
            body: Bytes::from(vec![msg; 10]),
            receipt_msg_ids: vec![],
            group: None,
            group_seq: 0,
        },
    )
}

async fn next_event(client: &Client) -> Event {
    within("event", client.next_event())
        .await
        .expect("event stream ended")
}

// ---------------------------------------------------------------------------------------------
// Connection: handshake, masking, framing
// ---------------------------------------------------------------------------------------------

/// Reads one raw client frame header and payload off `tcp`: (first byte, mask key, unmasked
/// payload).
async fn read_raw_frame(tcp: &mut TcpStream) -> (u8, Option<[u8; 4]>, Vec<u8>) {
    let mut head = [0u8; 2];
    tcp.read_exact(&mut head).await.unwrap();
    let len = match head[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            tcp.read_exact(&mut l).await.unwrap();
            usize::from(u16::from_be_bytes(l))
        }
        127 => {
            let mut l = [0u8; 8];
            tcp.read_exact(&mut l).await.unwrap();
            usize::try_from(u64::from_be_bytes(l)).unwrap()
        }
        n => usize::from(n),
    };
    let mask = if head[1] & 0x80 != 0 {
        let mut m = [0u8; 4];
        tcp.read_exact(&mut m).await.unwrap();
        Some(m)
    } else {
        None
    };
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.unwrap();
    if let Some(m) = mask {
        ws::apply_mask(&mut payload, m);
    }
    (head[0], mask, payload)
}

#[tokio::test]
async fn ws_connection_handshake_masking_and_framing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "ws://127.0.0.1:{}/v1/ws",
        listener.local_addr().unwrap().port()
    );
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = BytesMut::new();
        let request = loop {
            tcp.read_buf(&mut head).await.unwrap();
            if let Some((request, used)) = ws::parse_request(&head).unwrap() {
                assert_eq!(used, head.len(), "nothing after the head yet");
                break request;
            }
        };
        assert_eq!(request.path, "/v1/ws");
        // The upgrade answer and a first frame in one write: the client must keep the bytes
        // that follow the head.
        let mut out = BytesMut::from(&ws::accept_response(&request)[..]);
        let first = Frame::new(0, Pong { nonce: 1 }).encode().unwrap();
        ws::encode_frame(OpCode::Binary, &first, None, &mut out);
        tcp.write_all(&out).await.unwrap();

        // Two frames from the client: masked, FIN + binary, with different random keys.
        let (b0, mask_a, payload) = read_raw_frame(&mut tcp).await;
        assert_eq!(b0, 0x82);
        let frame = Frame::decode(&payload).unwrap();
        assert_eq!(
            frame,
            Frame::new(5, ringpost_client::wire::Ping { nonce: 9 })
        );
        let (_, mask_b, payload) = read_raw_frame(&mut tcp).await;
        assert_eq!(payload, b"raw bytes");
        let (mask_a, mask_b) = (mask_a.expect("masked"), mask_b.expect("masked"));
        // Masks are random: the chance that two are equal is 2^-32.
        assert_ne!(mask_a, mask_b);
        // A text message, then the raw transport bytes (here: an unmasked pong the client
        // wrote itself).
        let (b0, mask, payload) = read_raw_frame(&mut tcp).await;
        assert_eq!((b0, payload.as_slice()), (0x81, &b"hello"[..]));
        assert!(mask.is_some());
        let (b0, mask, _) = read_raw_frame(&mut tcp).await;
        assert_eq!((b0, mask), (0x8A, None));

        // A large frame, written in pieces; then a ping the client must answer; then a close.
        let big = Frame::new(
            0,
            Deliver {
                seq: 1,
                kind: DeliverKind::Message,
                from_user: 2,
                from_device: 1,
                msg_id: [3; 16],
                server_time_ms: 4,
                body: Bytes::from(vec![0xab; 60_000]),
                receipt_msg_ids: vec![],
                group: None,
                group_seq: 0,
            },
        );
        let mut out = BytesMut::new();
        ws::encode_frame(OpCode::Binary, &big.encode().unwrap(), None, &mut out);
        for piece in out.chunks(7_000) {
            tcp.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut ping = BytesMut::new();
        ws::encode_frame(OpCode::Ping, b"are you there", None, &mut ping);
        tcp.write_all(&ping).await.unwrap();
        let (b0, mask, payload) = read_raw_frame(&mut tcp).await;
        assert_eq!((b0, payload.as_slice()), (0x8A, &b"are you there"[..]));
        assert!(mask.is_some(), "the pong is masked too");
        let mut close = BytesMut::new();
        ws::encode_frame(
            OpCode::Close,
            &ws::close_payload(1001, "bye"),
            None,
            &mut close,
        );
        tcp.write_all(&close).await.unwrap();
    });

    let endpoint = Endpoint::parse(&url).unwrap();
    let mut conn = within("open", Connection::open(&endpoint, &TlsOptions::default()))
        .await
        .unwrap();
    let first = within("first frame", conn.recv()).await.unwrap().unwrap();
    assert_eq!(first, Frame::new(0, Pong { nonce: 1 }));
    conn.send(&Frame::new(5, ringpost_client::wire::Ping { nonce: 9 }))
        .await
        .unwrap();
    conn.send_raw(b"raw bytes").await.unwrap();
    conn.send_text("hello").await.unwrap();
    let mut pong = BytesMut::new();
    ws::encode_frame(OpCode::Pong, b"", None, &mut pong);
    conn.send_transport_bytes(&pong).await.unwrap();

    let big = within("big frame", conn.recv()).await.unwrap().unwrap();
    let Body::Deliver(d) = big.body else { panic!() };
    assert_eq!(d.body.len(), 60_000);
    // The ping is answered inside recv; then the close ends the stream.
    assert!(within("close", conn.recv()).await.unwrap().is_none());
    let close = conn.peer_close().unwrap();
    assert_eq!((close.code, close.reason.as_str()), (Some(1001), "bye"));
    within("server", server).await.unwrap();
}

#[tokio::test]
async fn ws_upgrade_refusal_is_reported() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://127.0.0.1:{}", listener.local_addr().unwrap().port());
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = BytesMut::new();
        tcp.read_buf(&mut head).await.unwrap();
        let refusal = ws::reject_response(&ws::HandshakeError::SubprotocolRequired);
        tcp.write_all(&refusal).await.unwrap();
    });
    let err = Connection::open(&Endpoint::parse(&url).unwrap(), &TlsOptions::default())
        .await
        .unwrap_err();
    match err {
        ClientError::Handshake(ws::HandshakeError::Rejected { status, reason }) => {
            assert_eq!(status, 400);
            assert!(reason.contains("ringpost.v1"), "{reason}");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn connection_refused_is_an_io_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = Client::connect(config(&format!("ws://127.0.0.1:{port}")))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Io(_)), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Client: correlation, events, dedup, acks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn pipelined_requests_get_their_own_answers() {
    let mut server = TestServer::ws().await;
    let cfg = config(&server.url);
    let (client, mut conn, hello) = connected(&mut server, cfg).await;
    assert_eq!(hello.protocol_version, 1);
    assert!(hello.auth.is_none());
    assert!(hello.user_agent.starts_with("ringpost-client/"));
    assert_eq!(client.welcome().node_id, 7);

    // Twenty requests from twenty tasks at once.
    let tasks: Vec<_> = (0..20u32)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { (i, client.device_list(15550000 + u64::from(i)).await) })
        })
        .collect();
    let mut requests = Vec::new();
    while requests.len() < 20 {
        requests.push(within("request", conn.recv_request()).await.unwrap());
    }
    let mut reqs: Vec<u32> = requests.iter().map(|f| f.req).collect();
    reqs.sort_unstable();
    reqs.dedup();
    assert_eq!(reqs.len(), 20, "request ids are distinct");
    assert!(!reqs.contains(&0));
    // Answer in reverse order; user 15550013 gets an error.
    for frame in requests.into_iter().rev() {
        let Body::DeviceListRequest(r) = frame.body else {
            panic!()
        };
        let answer: Body = if r.user == 15550013 {
            ErrorFrame {
                code: ErrorCode::NotFound.as_u16(),
                message: "no such user".into(),
                retry_after_ms: 0,
                fatal: false,
            }
            .into()
        } else {
            ringpost_client::wire::DeviceList {
                user: r.user,
                devices: vec![1, (r.user % 100) as u32 + 2],
            }
            .into()
        };
        conn.send(Frame::new(frame.req, answer)).await;
    }
    for task in tasks {
        let (i, result) = within("answer", task).await.unwrap();
        if i == 13 {
            let err = result.unwrap_err();
            assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
        } else {
            assert_eq!(result.unwrap(), vec![1, i + 2]);
        }
    }
}

#[tokio::test]
async fn deliveries_are_handed_out_once_and_acked() {
    let mut server = TestServer::ws().await;
    let cfg = config(&server.url).with_auth(auth());
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    conn.send(deliver(1, 15550002, 0xa1)).await;
    conn.send(deliver(2, 15550002, 0xa2)).await;
    // A redelivery of the first message under a new seq (as after a lost ack).
    conn.send(deliver(3, 15550002, 0xa1)).await;
    conn.send(Frame::new(
        0,
        Typing {
            user: 15550002,
            device: 1,
            typing: true,
            recording: false,
            group: None,
        },
    ))
    .await;
    conn.send(deliver(4, 15550002, 0xa3)).await;

    let mut got = Vec::new();
    while got.len() < 4 {
        match next_event(&client).await {
            Event::Message(d) => got.push(format!("msg {:x} seq {}", d.msg_id[0], d.seq)),
            Event::Typing(t) => got.push(format!("typing {}", t.user)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        got,
        [
            "msg a1 seq 1",
            "msg a2 seq 2",
            "typing 15550002",
            "msg a3 seq 4"
        ]
    );
    // Every seq is acked, the duplicate's too.
    let mut acked = Vec::new();
    while acked.len() < 4 {
        let frame = within("ack", conn.recv_request()).await.unwrap();
        assert_eq!(frame.req, 0, "acks are not requests");
        let Body::DeliverAck(ack) = frame.body else {
            panic!("{}", frame.body.name())
        };
        assert!(ack.seqs.len() <= ringpost_client::wire::limits::ACK_SEQS_MAX);
        acked.extend(ack.seqs);
    }
    acked.sort_unstable();
    assert_eq!(acked, [1, 2, 3, 4]);
}

/// A receipt as the node sends it: a `Deliver` of kind `kind` from the device that acked (or
/// read) our messages `about`, under the receipt's own `msg_id`.
fn receipt_frame(seq: u64, kind: DeliverKind, msg_id: [u8; 16], about: Vec<[u8; 16]>) -> Frame {
    Frame::new(
        0,
        Deliver {
            seq,
            kind,
            from_user: 15550002,
            from_device: 3,
            msg_id,
            server_time_ms: 42,
            body: Bytes::new(),
            receipt_msg_ids: about,
            group: None,
            group_seq: 0,
        },
    )
}

#[tokio::test]
async fn receipt_events_carry_their_own_msg_id() {
    let mut server = TestServer::ws().await;
    let cfg = config(&server.url).with_auth(auth());
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    // About one message: the receipt's id is that message's id.
    conn.send(receipt_frame(
        1,
        DeliverKind::Delivered,
        [0xa1; 16],
        vec![[0xa1; 16]],
    ))
    .await;
    // Coalesced: the node's id for the list (the first 16 bytes of SHA-256 over the ids; the
    // SDK hands on whatever is on the wire, so any value shows it).
    let coalesced = [0xc0; 16];
    conn.send(receipt_frame(
        2,
        DeliverKind::Delivered,
        coalesced,
        vec![[0xa2; 16], [0xa3; 16]],
    ))
    .await;
    // A read receipt: the id the reader's client chose.
    conn.send(receipt_frame(
        3,
        DeliverKind::Read,
        [0x7e; 16],
        vec![[0xa1; 16]],
    ))
    .await;
    assert_eq!(
        next_event(&client).await,
        Event::Delivered {
            seq: 1,
            by_user: 15550002,
            by_device: 3,
            msg_id: [0xa1; 16],
            msg_ids: vec![[0xa1; 16]],
            server_time_ms: 42,
        }
    );
    assert_eq!(
        next_event(&client).await,
        Event::Delivered {
            seq: 2,
            by_user: 15550002,
            by_device: 3,
            msg_id: coalesced,
            msg_ids: vec![[0xa2; 16], [0xa3; 16]],
            server_time_ms: 42,
        }
    );
    assert_eq!(
        next_event(&client).await,
        Event::Read {
            seq: 3,
            by_user: 15550002,
            by_device: 3,
            msg_id: [0x7e; 16],
            msg_ids: vec![[0xa1; 16]],
            server_time_ms: 42,
        }
    );
}

#[tokio::test]
async fn manual_acks_when_auto_ack_is_off() {
    let mut server = TestServer::ws().await;
    let cfg = ClientConfig {
        auto_ack: false,
        ..config(&server.url).with_auth(auth())
    };
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    conn.send(deliver(10, 15550002, 1)).await;
    conn.send(deliver(11, 15550002, 1)).await; // duplicate: acked by the SDK anyway
    let Event::Message(d) = next_event(&client).await else {
        panic!()
    };
    assert_eq!(d.seq, 10);
    conn.send(deliver(12, 15550002, 2)).await;
    let Event::Message(d2) = next_event(&client).await else {
        panic!()
    };
    assert_eq!(d2.seq, 12);
    let Body::DeliverAck(ack) = within("dup ack", conn.recv_request()).await.unwrap().body else {
        panic!()
    };
    assert_eq!(ack.seqs, [11], "only the duplicate is acked by the SDK");
    let seqs: Vec<u64> = (0..300).map(|i| 1000 + i).chain([10, 12]).collect();
    client.ack(&seqs).await.unwrap();
    let mut acked = Vec::new();
    while acked.len() < seqs.len() {
        let Body::DeliverAck(ack) = within("ack", conn.recv_request()).await.unwrap().body else {
            panic!()
        };
        assert!(ack.seqs.len() <= 256, "batches respect ACK_SEQS_MAX");
        acked.extend(ack.seqs);
    }
    assert_eq!(acked, seqs);
}

#[tokio::test]
async fn send_returns_the_ack_and_checks_its_msg_id() {
    let mut server = TestServer::ws().await;
    let cfg = config(&server.url).with_auth(auth());
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    let msg_id = ringpost_client::new_msg_id();
    let sending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .send(
                    15550002,
                    msg_id,
                    vec![ringpost_client::DeviceCiphertext {
                        user: 15550002,
                        device: 1,
                        body: Bytes::from_static(b"ct"),
                    }],
                )
                .await
        }
    });
    let frame = within("send", conn.recv_request()).await.unwrap();
    let Body::Send(send) = &frame.body else {
        panic!()
    };
    assert_eq!((send.to, send.msg_id), (15550002, msg_id));
    conn.send(Frame::new(
        frame.req,
        ringpost_client::SendAck {
            msg_id,
            status: SendStatus::InboxFull,
            server_time_ms: 5,
            mismatched: vec![],
            full_devices: vec![],
            group_seq: 0,
        },
    ))
    .await;
    let ack = within("ack", sending).await.unwrap().unwrap();
    assert_eq!(ack.status, SendStatus::InboxFull);
}

#[tokio::test]
async fn requests_time_out_and_late_answers_are_ignored() {
    let mut server = TestServer::ws().await;
    let cfg = ClientConfig {
        request_timeout: Duration::from_millis(200),
        ..config(&server.url)
    };
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    let err = client.prekey_count().await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout(_)), "{err}");
    let late = conn.recv_request().await.unwrap();
    conn.send(Frame::new(late.req, Done {})).await;
    // The connection is still fine.
    let pinging = tokio::spawn({
        let client = client.clone();
        async move { client.ping().await }
    });
    let ping = within("ping", conn.recv_request()).await.unwrap();
    let Body::Ping(p) = ping.body else { panic!() };
    conn.send(Frame::new(ping.req, Pong { nonce: p.nonce }))
        .await;
    within("pong", pinging).await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Redirects
// ---------------------------------------------------------------------------------------------

async fn redirect_to(conn: &mut ServerConn, target: &str) {
    let frame = within("Hello", conn.recv()).await.unwrap();
    conn.send(Frame::new(
        frame.req,
        Redirect {
            user: 15550001,
            epoch: 2,
            ws_url: target.to_string(),
            quic_addr: String::new(),
        },
    ))
    .await;
}

#[tokio::test]
async fn redirects_are_followed_up_to_the_limit() {
    let mut a = TestServer::ws().await;
    let mut b = TestServer::ws().await;
    let connecting = tokio::spawn(Client::connect(config(&a.url).with_auth(auth())));
    let mut first = a.accept().await;
    redirect_to(&mut first, &b.url).await;
    let mut second = b.accept().await;
    let hello = second.welcome().await;
    assert_eq!(
        hello.auth,
        Some(auth()),
        "the owner gets the same credentials"
    );
    let client = within("connect", connecting).await.unwrap().unwrap();
    assert_eq!(client.endpoint().unwrap(), Endpoint::parse(&b.url).unwrap());

    // With no redirects allowed, the first one is an error.
    let cfg = ClientConfig {
        max_redirects: 0,
        ..config(&a.url)
    };
    let connecting = tokio::spawn(Client::connect(cfg));
    let mut conn = a.accept().await;
    redirect_to(&mut conn, &b.url).await;
    let err = within("connect", connecting).await.unwrap().unwrap_err();
    assert!(
        matches!(err, ClientError::TooManyRedirects { max: 0, .. }),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Reconnects
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn reconnects_after_a_drop_and_fails_requests_in_flight() {
    let mut server = TestServer::ws().await;
    let cfg = config(&server.url).with_auth(auth());
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    assert_eq!(client.reconnects(), 0);
    let asking = tokio::spawn({
        let client = client.clone();
        async move { client.prekey_count().await }
    });
    let _request = within("request", conn.recv_request()).await.unwrap();
    conn.drop_connection().await;
    let err = within("request", asking).await.unwrap().unwrap_err();
    assert!(matches!(err, ClientError::Disconnected), "{err}");
    let Event::Disconnected { will_reconnect, .. } = next_event(&client).await else {
        panic!()
    };
    assert!(will_reconnect);

    // The client comes back with the same credentials.
    let mut conn = server.accept().await;
    assert_eq!(conn.welcome().await.auth, Some(auth()));
    let Event::Reconnected { reconnects, .. } = next_event(&client).await else {
        panic!()
    };
    assert_eq!(reconnects, 1);
    assert_eq!(client.reconnects(), 1);
    // The same event stream goes on.
    conn.send(deliver(5, 15550002, 9)).await;
    let Event::Message(d) = next_event(&client).await else {
        panic!()
    };
    assert_eq!(d.seq, 5);
}

#[tokio::test]
async fn requests_made_while_reconnecting_wait_for_the_new_connection() {
    let mut server = TestServer::ws().await;
    let cfg = config(&server.url).with_auth(auth());
    let (client, conn, _) = connected(&mut server, cfg).await;
    conn.drop_connection().await;
    assert!(matches!(
        next_event(&client).await,
        Event::Disconnected { .. }
    ));
    let asking = tokio::spawn({
        let client = client.clone();
        async move { client.prekey_count().await }
    });
    let mut conn = server.accept().await;
    conn.welcome().await;
    let request = within("request", conn.recv_request()).await.unwrap();
    conn.send(Frame::new(
        request.req,
        ringpost_client::wire::PrekeyCount { count: 42 },
    ))
    .await;
    assert_eq!(within("count", asking).await.unwrap().unwrap(), 42);
}

#[tokio::test]
async fn going_away_reconnects_after_the_delay() {
    let mut server = TestServer::ws().await;
    let cfg = config(&server.url).with_auth(auth());
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    conn.send(Frame::new(
        0,
        GoingAway {
            reconnect_after_ms: 100,
            reason: "draining".into(),
        },
    ))
    .await;
    let Event::GoingAway(g) = next_event(&client).await else {
        panic!()
    };
    assert_eq!(g.reason, "draining");
    let started = std::time::Instant::now();
    let Event::Disconnected {
        will_reconnect: true,
        ..
    } = next_event(&client).await
    else {
        panic!()
    };
    let mut conn = server.accept().await;
    assert!(started.elapsed() >= Duration::from_millis(90));
    conn.welcome().await;
    assert!(matches!(
        next_event(&client).await,
        Event::Reconnected { reconnects: 1, .. }
    ));
}

fn migrate_to(ws_url: &str) -> Frame {
    Frame::new(
        0,
        Migrate {
            user: 15550001,
            epoch: 3,
            ws_url: ws_url.to_string(),
            quic_addr: String::new(),
            reconnect_after_ms: 20,
        },
    )
}

/// Reads the `Migrate` event and the `Disconnected` that follows it.
async fn migrate_events(client: &Client) -> Migrate {
    let Event::Migrate(m) = next_event(client).await else {
        panic!("expected Migrate")
    };
    let Event::Disconnected {
        will_reconnect: true,
        reason,
    } = next_event(client).await
    else {
        panic!("expected Disconnected")
    };
    assert!(reason.contains("moved"), "{reason}");
    m
}

#[tokio::test]
async fn migrate_reconnects_straight_to_the_named_node() {
    let mut entry = TestServer::ws().await;
    let mut owner = TestServer::ws().await;
    let cfg = config(&entry.url).with_auth(auth());
    let (client, mut conn, _) = connected(&mut entry, cfg).await;
    conn.send(migrate_to(&owner.url)).await;
    let m = migrate_events(&client).await;
    assert_eq!((m.epoch, m.reconnect_after_ms), (3, 20));

    // The new owner gets the same credentials; the entry point is not asked again.
    let mut moved = owner.accept().await;
    assert_eq!(moved.welcome().await.auth, Some(auth()));
    assert!(matches!(
        next_event(&client).await,
        Event::Reconnected { reconnects: 1, .. }
    ));
    assert_eq!(
        client.endpoint().unwrap(),
        Endpoint::parse(&owner.url).unwrap()
    );
    assert_eq!(client.migrations(), 1);
    assert_eq!(client.redirects_followed(), 0);
    assert!(
        entry.conns.try_recv().is_err(),
        "the entry point was dialled"
    );
    // The same event stream goes on over the new connection.
    moved.send(deliver(8, 15550002, 4)).await;
    let Event::Message(d) = next_event(&client).await else {
        panic!()
    };
    assert_eq!(d.seq, 8);
}

#[tokio::test]
async fn migrate_to_a_node_that_redirects_falls_back_to_the_usual_reconnect() {
    let mut entry = TestServer::ws().await;
    let mut owner = TestServer::ws().await;
    let cfg = config(&entry.url).with_auth(auth());
    let (client, mut conn, _) = connected(&mut entry, cfg).await;
    conn.send(migrate_to(&owner.url)).await;
    migrate_events(&client).await;

    // The ring moved again: the named node redirects. The client does not follow it from
    // there, but reconnects as usual (the last node first, here the entry point).
    let mut stale = owner.accept().await;
    redirect_to(&mut stale, &owner.url).await;
    let mut back = entry.accept().await;
    back.welcome().await;
    assert!(matches!(
        next_event(&client).await,
        Event::Reconnected { reconnects: 1, .. }
    ));
    assert_eq!(
        client.endpoint().unwrap(),
        Endpoint::parse(&entry.url).unwrap()
    );
    assert_eq!(client.migrations(), 0);
}

#[tokio::test]
async fn migrate_to_an_unreachable_node_falls_back_to_the_usual_reconnect() {
    let mut entry = TestServer::ws().await;
    // A port nothing listens on any more.
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone_url = format!("ws://127.0.0.1:{}", gone.local_addr().unwrap().port());
    drop(gone);
    let cfg = config(&entry.url).with_auth(auth());
    let (client, mut conn, _) = connected(&mut entry, cfg).await;
    conn.send(migrate_to(&gone_url)).await;
    migrate_events(&client).await;
    let mut back = entry.accept().await;
    back.welcome().await;
    assert!(matches!(
        next_event(&client).await,
        Event::Reconnected { reconnects: 1, .. }
    ));
    assert_eq!(client.migrations(), 0);
}

#[tokio::test]
async fn redirects_followed_are_counted() {
    let mut a = TestServer::ws().await;
    let mut b = TestServer::ws().await;
    let connecting = tokio::spawn(Client::connect(config(&a.url).with_auth(auth())));
    let mut first = a.accept().await;
    redirect_to(&mut first, &b.url).await;
    let mut second = b.accept().await;
    second.welcome().await;
    let client = within("connect", connecting).await.unwrap().unwrap();
    assert_eq!(client.redirects_followed(), 1);
    // A reconnect through the entry point that is redirected again counts too.
    second.drop_connection().await;
    assert!(matches!(
        next_event(&client).await,
        Event::Disconnected { .. }
    ));
    let mut third = b.accept().await;
    redirect_to(&mut third, &a.url).await;
    let mut fourth = a.accept().await;
    fourth.welcome().await;
    assert!(matches!(
        next_event(&client).await,
        Event::Reconnected { .. }
    ));
    assert_eq!(client.redirects_followed(), 2);
}

#[tokio::test]
async fn bad_credentials_stop_reconnecting() {
    let mut server = TestServer::ws().await;
    let cfg = config(&server.url).with_auth(auth());
    let (client, conn, _) = connected(&mut server, cfg).await;
    conn.drop_connection().await;
    assert!(matches!(
        next_event(&client).await,
        Event::Disconnected {
            will_reconnect: true,
            ..
        }
    ));
    let mut conn = server.accept().await;
    let hello = within("Hello", conn.recv()).await.unwrap();
    conn.send(Frame::new(
        hello.req,
        ErrorFrame {
            code: ErrorCode::BadCredentials.as_u16(),
            message: "device removed".into(),
            retry_after_ms: 0,
            fatal: true,
        },
    ))
    .await;
    let Event::Disconnected {
        will_reconnect,
        reason,
    } = next_event(&client).await
    else {
        panic!()
    };
    assert!(!will_reconnect);
    assert!(reason.contains("device removed"), "{reason}");
    assert!(within("end", client.next_event()).await.is_none());
    assert!(matches!(
        client.prekey_count().await,
        Err(ClientError::Closed)
    ));
}

#[tokio::test]
async fn a_fatal_error_on_a_live_connection_is_reported() {
    let mut server = TestServer::ws().await;
    let cfg = ClientConfig {
        reconnect: false,
        ..config(&server.url).with_auth(auth())
    };
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    conn.send(Frame::new(
        0,
        ErrorFrame {
            code: ErrorCode::Forbidden.as_u16(),
            message: "replaced by a newer connection of this device".into(),
            retry_after_ms: 0,
            fatal: true,
        },
    ))
    .await;
    conn.drop_connection().await;
    let Event::Disconnected {
        will_reconnect,
        reason,
    } = next_event(&client).await
    else {
        panic!()
    };
    assert!(!will_reconnect);
    assert!(reason.contains("replaced"), "{reason}");
    assert!(within("end", client.next_event()).await.is_none());
}

#[tokio::test]
async fn registering_on_an_anonymous_connection_makes_the_client_that_device() {
    let mut server = TestServer::ws().await;
    let cfg = config(&server.url);
    let (client, mut conn, hello) = connected(&mut server, cfg).await;
    assert!(hello.auth.is_none());
    let verifying = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .register_verify(15550009, "123456", "", "phone")
                .await
        }
    });
    let frame = within("verify", conn.recv_request()).await.unwrap();
    let Body::RegisterVerify(v) = &frame.body else {
        panic!()
    };
    assert_eq!((v.phone, v.code.as_str()), (15550009, "123456"));
    let token = Bytes::from_static(&[9; 32]);
    conn.send(Frame::new(
        frame.req,
        Registered {
            user: 15550009,
            device: 1,
            token: token.clone(),
        },
    ))
    .await;
    let registered = within("registered", verifying).await.unwrap().unwrap();
    assert_eq!(registered.user, 15550009);
    conn.drop_connection().await;
    let mut conn = server.accept().await;
    let hello = conn.welcome().await;
    assert_eq!(
        hello.auth,
        Some(Auth {
            user: 15550009,
            device: 1,
            token
        })
    );
}

#[tokio::test]
async fn keepalive_pings_and_drops_a_silent_node() {
    let mut server = TestServer::ws().await;
    let cfg = ClientConfig {
        ping_interval: Some(Duration::from_millis(60)),
        ..config(&server.url).with_auth(auth())
    };
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    // Pings arrive (with req 0) and the node stays silent.
    let ping = within("ping", conn.recv()).await.unwrap();
    assert!(matches!(ping.body, Body::Ping(_)) && ping.req == 0);
    let started = std::time::Instant::now();
    let Event::Disconnected { reason, .. } = next_event(&client).await else {
        panic!()
    };
    assert!(reason.contains("nothing heard"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // It reconnects to the same node.
    server.accept().await.welcome().await;
    assert!(matches!(
        next_event(&client).await,
        Event::Reconnected { .. }
    ));
    drop(conn);
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_connection() {
    let mut server = TestServer::ws().await;
    let cfg = config(&server.url);
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    let other = client.clone();
    drop(client);
    // Still open: another handle exists.
    other.typing(15550002, true).await.unwrap();
    let typing = within("typing", conn.recv_request()).await.unwrap();
    assert!(matches!(typing.body, Body::Typing(_)) && typing.req == 0);
    drop(other);
    assert!(within("close", conn.recv()).await.is_none());
}

#[tokio::test]
async fn close_is_clean_and_final() {
    let mut server = TestServer::ws().await;
    let cfg = config(&server.url);
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    within("close", client.close()).await;
    assert!(within("closed", conn.recv()).await.is_none());
    assert!(!client.is_connected());
    assert!(matches!(client.ping().await, Err(ClientError::Closed)));
    assert!(within("end", client.next_event()).await.is_none());
}

// ---------------------------------------------------------------------------------------------
// TLS and QUIC
// ---------------------------------------------------------------------------------------------

async fn round_trip(server: &mut TestServer, tls: TlsOptions) {
    let cfg = ClientConfig {
        tls,
        ..config(&server.url).with_auth(auth())
    };
    let (client, mut conn, hello) = connected(server, cfg).await;
    assert_eq!(hello.auth, Some(auth()));
    let pinging = tokio::spawn({
        let client = client.clone();
        async move { client.ping().await }
    });
    let ping = within("ping", conn.recv_request()).await.unwrap();
    let Body::Ping(p) = ping.body else { panic!() };
    conn.send(Frame::new(ping.req, Pong { nonce: p.nonce }))
        .await;
    within("pong", pinging).await.unwrap().unwrap();
    // Close to a maximal frame each way (two ciphertexts of 64 KiB would not fit one frame).
    let big = |len: usize| ringpost_client::DeviceCiphertext {
        user: 15550002,
        device: 1,
        body: Bytes::from(vec![7u8; len]),
    };
    let sending = tokio::spawn({
        let client = client.clone();
        let cts = vec![
            big(ringpost_client::wire::limits::CIPHERTEXT_BYTES_MAX),
            big(60 * 1024),
        ];
        async move { client.send(15550002, [1; 16], cts).await }
    });
    let send = within("send", conn.recv_request()).await.unwrap();
    let Body::Send(s) = &send.body else { panic!() };
    assert_eq!(s.ciphertexts.len(), 2);
    conn.send(Frame::new(
        send.req,
        ringpost_client::SendAck {
            msg_id: [1; 16],
            status: SendStatus::Ok,
            server_time_ms: 1,
            mismatched: vec![],
            full_devices: vec![],
            group_seq: 0,
        },
    ))
    .await;
    within("send ack", sending).await.unwrap().unwrap();
    let mut big_deliver = deliver(1, 15550002, 3);
    if let Body::Deliver(d) = &mut big_deliver.body {
        d.body = Bytes::from(vec![
            3u8;
            ringpost_client::wire::limits::CIPHERTEXT_BYTES_MAX
        ]);
    }
    conn.send(big_deliver).await;
    let Event::Message(d) = next_event(&client).await else {
        panic!()
    };
    assert_eq!(
        d.body.len(),
        ringpost_client::wire::limits::CIPHERTEXT_BYTES_MAX
    );
    // Reconnect over the same transport.
    conn.drop_connection().await;
    assert!(matches!(
        next_event(&client).await,
        Event::Disconnected { .. }
    ));
    // Kept until the end: dropping a quinn connection closes it.
    let mut conn = server.accept().await;
    conn.welcome().await;
    assert!(matches!(
        next_event(&client).await,
        Event::Reconnected { .. }
    ));
    client.close().await;
    assert!(within("closed", conn.recv()).await.is_none());
}

#[tokio::test]
async fn wss_round_trip() {
    let ca = TestCa::new();
    let mut server = TestServer::wss(&ca).await;
    round_trip(&mut server, ca.options()).await;
}

#[tokio::test]
async fn quic_round_trip() {
    let ca = TestCa::new();
    let mut server = TestServer::quic(&ca).await;
    round_trip(&mut server, ca.options()).await;
}

#[tokio::test]
async fn untrusted_certificates_are_refused() {
    let ca = TestCa::new();
    let other = TestCa::new();
    let wss = TestServer::wss(&ca).await;
    let err = Client::connect(ClientConfig {
        tls: other.options(),
        ..config(&wss.url)
    })
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::Tls(_)), "{err}");
    let quic = TestServer::quic(&ca).await;
    let err = Client::connect(ClientConfig {
        tls: other.options(),
        ..config(&quic.url)
    })
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::Tls(_)), "{err}");
}

#[tokio::test]
async fn quic_connection_raw_frames_and_close_reason() {
    let ca = TestCa::new();
    let mut server = TestServer::quic(&ca).await;
    let endpoint = Endpoint::parse(&server.url).unwrap();
    let mut conn = within("open", Connection::open(&endpoint, &ca.options()))
        .await
        .unwrap();
    conn.send(&Frame::new(3, ringpost_client::wire::Ping { nonce: 4 }))
        .await
        .unwrap();
    let mut node = server.accept().await;
    assert_eq!(
        node.recv().await.unwrap(),
        Frame::new(3, ringpost_client::wire::Ping { nonce: 4 })
    );
    // send_raw puts the length prefix in front of anything, even bytes that are no frame.
    conn.send_raw(
        &Frame::new(4, ringpost_client::wire::Ping { nonce: 5 })
            .encode()
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(node.recv().await.unwrap().req, 4);
    assert!(conn.send_text("no text on QUIC").await.is_err());
    node.send(Frame::new(0, Pong { nonce: 1 })).await;
    assert_eq!(
        within("pong", conn.recv()).await.unwrap().unwrap(),
        Frame::new(0, Pong { nonce: 1 })
    );
    node.drop_connection().await;
    assert!(within("closed", conn.recv()).await.unwrap().is_none());
    let close = conn.peer_close().unwrap();
    assert_eq!((close.code, close.reason.as_str()), (Some(9), "dropped"));
}

#[tokio::test]
async fn shared_quic_endpoint_carries_many_connections() {
    let ca = TestCa::new();
    let mut server = TestServer::quic(&ca).await;
    let endpoint = Endpoint::parse(&server.url).unwrap();
    let shared = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut conns = Vec::new();
    for i in 0..5u32 {
        let mut conn = Connection::open_quic_on(&shared, &endpoint, &ca.options())
            .await
            .unwrap();
        conn.send(&Frame::new(i + 1, ringpost_client::wire::Ping { nonce: 0 }))
            .await
            .unwrap();
        conns.push(conn);
    }
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(server.accept().await.recv().await.unwrap().req);
    }
    seen.sort_unstable();
    assert_eq!(seen, [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn frames_over_the_bound_are_refused_before_sending() {
    let mut server = TestServer::ws().await;
    let cfg = config(&server.url).with_auth(auth());
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    let big = ringpost_client::DeviceCiphertext {
        user: 15550002,
        device: 1,
        body: Bytes::from(vec![
            7u8;
            ringpost_client::wire::limits::CIPHERTEXT_BYTES_MAX
        ]),
    };
    let err = client
        .send(15550002, [1; 16], vec![big.clone(), big])
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Encode(_)), "{err}");
    // Nothing reached the node and the connection is still usable.
    client.typing(15550002, false).await.unwrap();
    let frame = within("typing", conn.recv_request()).await.unwrap();
    assert!(matches!(frame.body, Body::Typing(_)));
}

#[tokio::test]
async fn a_connection_replaced_by_the_same_device_does_not_fight_back() {
    // The node tells a replaced connection `Forbidden` (not marked fatal) and closes it.
    let mut server = TestServer::ws().await;
    let cfg = config(&server.url).with_auth(auth());
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    conn.send(Frame::new(
        0,
        ErrorFrame {
            code: ErrorCode::Forbidden.as_u16(),
            message: "replaced by a newer connection of this device".into(),
            retry_after_ms: 0,
            fatal: false,
        },
    ))
    .await;
    conn.drop_connection().await;
    let Event::Disconnected {
        will_reconnect,
        reason,
    } = next_event(&client).await
    else {
        panic!()
    };
    assert!(!will_reconnect, "{reason}");
    assert!(reason.contains("replaced"), "{reason}");
    assert!(within("end", client.next_event()).await.is_none());

    // A non-fatal error followed by other frames is not a reason to stop.
    let cfg = config(&server.url).with_auth(auth());
    let (client, mut conn, _) = connected(&mut server, cfg).await;
    conn.send(Frame::new(
        0,
        ErrorFrame {
            code: ErrorCode::Forbidden.as_u16(),
            message: "not allowed to tell them you are typing".into(),
            retry_after_ms: 0,
            fatal: false,
        },
    ))
    .await;
    conn.send(deliver(1, 15550002, 1)).await;
    assert!(matches!(next_event(&client).await, Event::Message(_)));
    conn.drop_connection().await;
    assert!(matches!(
        next_event(&client).await,
        Event::Disconnected {
            will_reconnect: true,
            ..
        }
    ));
}

#[tokio::test]
async fn closing_while_reconnecting_is_prompt() {
    let mut server = TestServer::ws().await;
    let cfg = ClientConfig {
        // The first retry waits up to 60 s: the client is certainly still waiting below.
        backoff_base: Duration::from_secs(60),
        backoff_cap: Duration::from_secs(60),
        ..config(&server.url).with_auth(auth())
    };
    let (client, conn, _) = connected(&mut server, cfg).await;
    conn.drop_connection().await;
    assert!(matches!(
        next_event(&client).await,
        Event::Disconnected {
            will_reconnect: true,
            ..
        }
    ));
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.prekey_count().await }
    });
    let started = std::time::Instant::now();
    within("close", client.close()).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    let err = within("request", waiting).await.unwrap().unwrap_err();
    assert!(matches!(err, ClientError::Closed), "{err}");
    assert!(within("end", client.next_event()).await.is_none());
}

// ---------------------------------------------------------------------------------------------
// Cancel safety of `next_event`
// ---------------------------------------------------------------------------------------------

/// A message `seq` whose msg_id is its seq, so thousands are distinct.
fn numbered(seq: u64) -> Frame {
    let mut msg_id = [0u8; 16];
    msg_id[..8].copy_from_slice(&seq.to_be_bytes());
    Frame::new(
        0,
        Deliver {
            seq,
            kind: DeliverKind::Message,
            from_user: 15550002,
            from_device: 1,
            msg_id,
            server_time_ms: 1,
            body: Bytes::from_static(b"cancel-safe"),
            receipt_msg_ids: vec![],
            group: None,
            group_seq: 0,
        },
    )
}

/// The tiny node playing one device's inbox the way the real node does: every connection gets
/// the entries not acked yet, in seq order (so an ack lost with a connection means a
/// redelivery), at most the `Welcome`'s window unacked at a time, and a `DeliverAck` removes
/// entries. Serves `conn`, then every reconnect, and
/// publishes how many entries are left on `left`.
async fn serve_inbox(
    mut server: TestServer,
    mut conn: ServerConn,
    count: u64,
    left: tokio::sync::watch::Sender<usize>,
) {
    let mut inbox: std::collections::BTreeSet<u64> = (1..=count).collect();
    loop {
        // Entries up to `sent` went out on this connection.
        let mut sent = 0;
        loop {
            let window_full = inbox.range(..=sent).count() >= welcome().deliver_window as usize;
            let next = inbox
                .range(sent + 1..)
                .next()
                .copied()
                .filter(|_| !window_full);
            tokio::select! {
                biased;
                frame = conn.recv() => match frame {
                    None => break,
                    Some(Frame { body: Body::DeliverAck(ack), .. }) => {
                        for seq in ack.seqs {
                            inbox.remove(&seq);
                        }
                        left.send_replace(inbox.len());
                    }
                    Some(_) => {}
                },
                _ = std::future::ready(()), if next.is_some() => {
                    let seq = next.unwrap_or_default();
                    conn.send(numbered(seq)).await;
                    sent = seq;
                }
            }
        }
        let Some(mut next) = server.conns.recv().await else {
            return;
        };
        next.welcome().await;
        conn = next;
    }
}

/// Polls `fut` once: its output if it is ready, `None` (and `fut` dropped) if it is pending.
async fn poll_once<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        std::task::Poll::Ready(output) => std::task::Poll::Ready(Some(output)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

/// `next_event` may be dropped at any await point (by `select!` or `timeout`) and no event is
/// lost or handed out twice. Another task writes at the same time (typing indicators), as an
/// application sending while it receives does, so the client's writes have to wait now and then.
async fn next_event_is_cancel_safe(mut server: TestServer, tls: TlsOptions) {
    const COUNT: u64 = 10_000;
    let cfg = ClientConfig {
        tls,
        ..config(&server.url).with_auth(auth())
    };
    let (client, conn, _) = connected(&mut server, cfg).await;
    let (left, mut inbox_left) = tokio::sync::watch::channel(COUNT as usize);
    let node = tokio::spawn(serve_inbox(server, conn, COUNT, left));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let typist = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client.typing(15550002, true).await;
                tokio::task::yield_now().await;
            }
        }
    });

    let mut seen = std::collections::HashMap::<u64, u32>::new();
    let (mut cancelled, mut reconnects) = (0u64, 0u64);
    let mut on_event =
        |event: Option<Event>, seen: &mut std::collections::HashMap<u64, u32>| match event
            .expect("events ended")
        {
            Event::Message(d) => {
                let seq = u64::from_be_bytes(d.msg_id[..8].try_into().unwrap());
                *seen.entry(seq).or_default() += 1;
            }
            Event::Reconnected { .. } => reconnects += 1,
            Event::Disconnected { .. } => {}
            other => panic!("unexpected {other:?}"),
        };
    // No progress for this long means an event was lost (a lost ack would only delay it until
    // a reconnect, and nothing here drops the connection).
    let stalled_after = Duration::from_secs(5);
    let mut progress = std::time::Instant::now();
    let mut round: u64 = 0;
    while (seen.len() as u64) < COUNT {
        let before = seen.len();
        assert!(
            progress.elapsed() < stalled_after,
            "stuck at {before} of {COUNT} messages, {} not acked on the node \
             ({cancelled} calls cancelled, {reconnects} reconnects)",
            *inbox_left.borrow()
        );
        round += 1;
        let tiny = Duration::from_micros(round % 40);
        match round % 3 {
            // Dropped the first time it is pending, wherever that is.
            0 => match poll_once(client.next_event()).await {
                Some(event) => on_event(event, &mut seen),
                None => {
                    cancelled += 1;
                    tokio::task::yield_now().await;
                }
            },
            1 => tokio::select! {
                event = client.next_event() => on_event(event, &mut seen),
                _ = tokio::time::sleep(tiny) => cancelled += 1,
            },
            _ => match tokio::time::timeout(tiny, client.next_event()).await {
                Ok(event) => on_event(event, &mut seen),
                Err(_) => cancelled += 1,
            },
        }
        if seen.len() > before {
            progress = std::time::Instant::now();
        }
    }
    // Anything handed out twice would arrive right after the last first copy.
    while let Ok(event) =
        tokio::time::timeout(Duration::from_millis(300), client.next_event()).await
    {
        on_event(event, &mut seen);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    within("typist", typist).await.unwrap();
    let twice: Vec<u64> = seen
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(&s, _)| s)
        .collect();
    assert!(twice.is_empty(), "handed out more than once: {twice:?}");
    assert_eq!(seen.len() as u64, COUNT);
    assert!(cancelled > 0, "the test cancelled no call");
    // And every delivery was acked: no ack was lost with a cancelled call either.
    within("all acked", inbox_left.wait_for(|&n| n == 0))
        .await
        .unwrap();
    eprintln!("{cancelled} calls cancelled, {reconnects} reconnects");
    node.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_event_is_cancel_safe_over_ws() {
    next_event_is_cancel_safe(TestServer::ws().await, TlsOptions::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_event_is_cancel_safe_over_quic() {
    let ca = TestCa::new();
    let server = TestServer::quic(&ca).await;
    next_event_is_cancel_safe(server, ca.options()).await;
}
