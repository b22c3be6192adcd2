//! Bad input, abuse and shutdown: every case gets a clear answer and hurts nobody else.

use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use ringpost_client::{Client, ClientError, Connection, Endpoint, TlsOptions};
use ringpost_wire::{
    limits, Auth, Body, DeliverAck, ErrorCode, Frame, Hello, SendStatus, PROTOCOL_VERSION,
};

use super::harness::TestNode;
use super::messaging::{auth, config, msg_id, next_message, register, to_device, ALICE, BOB};

const WAIT: Duration = Duration::from_secs(10);

async fn raw(node: &TestNode, transport: &str) -> Connection {
    let endpoint = Endpoint::parse(&node.url(transport)).unwrap();
    Connection::open(&endpoint, &TlsOptions::ca_file(node.ca_file()))
        .await
        .unwrap()
}

async fn hello(conn: &mut Connection, auth: Option<Auth>) -> Frame {
    let f = Frame::new(
        1,
        Hello {
            protocol_version: PROTOCOL_VERSION,
            auth,
            user_agent: "raw".into(),
        },
    );
    conn.send(&f).await.unwrap();
    recv(conn).await.expect("an answer to Hello")
}

async fn recv(conn: &mut Connection) -> Option<Frame> {
    tokio::time::timeout(WAIT, conn.recv())
        .await
        .expect("answer in time")
        .ok()
        .flatten()
}

fn error_code(f: &Frame) -> Option<ErrorCode> {
    match &f.body {
        Body::Error(e) => ErrorCode::from_u16(e.code),
        _ => None,
    }
}

#[tokio::test]
async fn malformed_truncated_oversize_and_wrong_version_frames_get_errors_while_others_carry_on() {
    bad_frames_get_errors_on(&TestNode::start()).await;
}

/// Bad frames over ws and QUIC get errors (an oversize one closes the connection) while a
/// well-behaved pair carries on.
pub async fn bad_frames_get_errors_on(node: &TestNode) {
    let (alice, _) = register(node, "ws", ALICE).await;
    let (bob, _) = register(node, "quic", BOB).await;

    for transport in ["ws", "quic"] {
        // Garbage that is a sound transport frame but no flatbuffer: an error, and the
        // connection stays usable.
        let mut c = raw(node, transport).await;
        assert!(matches!(hello(&mut c, None).await.body, Body::Welcome(_)));
        c.send_raw(b"this is not a flatbuffer").await.unwrap();
        let f = recv(&mut c).await.expect("error frame");
        assert_eq!(
            error_code(&f),
            Some(ErrorCode::Malformed),
            "{transport}: {f:?}"
        );
        c.send(&Frame::new(9, ringpost_wire::Ping { nonce: 3 }))
            .await
            .unwrap();
        assert_eq!(
            recv(&mut c).await.unwrap().body,
            Body::Pong(ringpost_wire::Pong { nonce: 3 })
        );

        // A truncated frame.
        let ping = Frame::new(10, ringpost_wire::Ping { nonce: 4 })
            .encode()
            .unwrap();
        c.send_raw(&ping[..ping.len() / 2]).await.unwrap();
        let f = recv(&mut c).await.expect("error frame");
        assert_eq!(
            error_code(&f),
            Some(ErrorCode::Malformed),
            "{transport}: {f:?}"
        );

        // An oversize frame: refused and the connection closed.
        c.send_raw(&vec![0u8; limits::FRAME_BYTES_MAX + 1])
            .await
            .unwrap();
        let mut closed_with = None;
        while let Ok(Ok(Some(f))) = tokio::time::timeout(WAIT, c.recv()).await {
            closed_with = error_code(&f);
        }
        assert_eq!(closed_with, Some(ErrorCode::FrameTooLarge), "{transport}");
    }

    // A frame of an unknown protocol version, and a Hello of one.
    let mut c = raw(node, "ws").await;
    let f = Frame::new(
        1,
        Hello {
            protocol_version: 99,
            auth: None,
            user_agent: String::new(),
        },
    );
    c.send(&f).await.unwrap();
    assert_eq!(
        error_code(&recv(&mut c).await.unwrap()),
        Some(ErrorCode::UnsupportedVersion)
    );

    // Meanwhile the well-behaved pair never noticed.
    let ack = alice
        .send(BOB, msg_id(1), vec![to_device(BOB, 1, "still here")])
        .await
        .unwrap();
    assert_eq!(ack.status, SendStatus::Ok);
    assert_eq!(&next_message(&bob).await.body[..], b"still here");
}

#[tokio::test]
async fn websocket_text_frames_and_wrong_subprotocols_are_refused_clearly() {
    let node = TestNode::start();
    let mut c = raw(&node, "ws").await;
    c.send_text("hello").await.unwrap();
    let mut last = None;
    while let Ok(Ok(Some(f))) = tokio::time::timeout(WAIT, c.recv()).await {
        last = error_code(&f);
    }
    assert_eq!(last, Some(ErrorCode::TransportProtocol));
    let close = c.peer_close().map(|p| p.code);
    assert_eq!(
        close,
        Some(Some(1003)),
        "text frames close with 1003 (unsupported data)"
    );

    // An upgrade without our subprotocol gets a plain HTTP 400 that says why.
    let addr = node.ws.trim_start_matches("ws://").to_string();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Protocol: chat\r\n\r\n",
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("ringpost.v1"), "{answer}");
}

#[tokio::test]
async fn a_flood_hits_the_rate_limit_with_a_retry_hint() {
    let node = TestNode::start_with(&["--device-rate", "5", "--device-burst", "5"]);
    let (alice, _) = register(&node, "ws", ALICE).await;
    let (_bob, _) = register(&node, "ws", BOB).await;
    let mut limited = 0;
    for n in 0..30u32 {
        match alice
            .send(BOB, msg_id(n), vec![to_device(BOB, 1, "x")])
            .await
        {
            Ok(ack) => assert_eq!(ack.status, SendStatus::Ok),
            Err(ClientError::Server {
                code,
                retry_after_ms,
                ..
            }) => {
                assert_eq!(code, ErrorCode::RateLimited.as_u16());
                assert!(retry_after_ms > 0);
                limited += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(limited >= 20, "{limited} of 30 were limited");
    let (_, metrics) = node.admin_get("/metrics");
    assert!(
        metrics.contains(&format!("ringpost_rate_limited_total {limited}")),
        "{metrics}"
    );
}

#[tokio::test]
async fn wrong_tokens_are_refused_and_a_device_cannot_touch_another_inbox() {
    let node = TestNode::start();
    let (alice, _) = register(&node, "ws", ALICE).await;
    let (bob, bob_reg) = register(&node, "ws", BOB).await;
    bob.close().await;
    drop(bob);
    let (_mallory, mallory_reg) = register(&node, "ws", 15_550_000_666).await;
    alice
        .send(BOB, msg_id(1), vec![to_device(BOB, 1, "for bob only")])
        .await
        .unwrap();

    // Mallory's own token with Bob's identity: refused and closed.
    let mut c = raw(&node, "quic").await;
    let forged = Auth {
        user: BOB,
        device: 1,
        token: mallory_reg.token.clone(),
    };
    assert_eq!(
        error_code(&hello(&mut c, Some(forged)).await),
        Some(ErrorCode::BadCredentials)
    );
    assert!(
        recv(&mut c).await.is_none(),
        "closed after refusing credentials"
    );

    // A random token: refused.
    let mut c = raw(&node, "ws").await;
    let random = Auth {
        user: BOB,
        device: 1,
        token: Bytes::from(vec![9u8; limits::TOKEN_BYTES]),
    };
    assert_eq!(
        error_code(&hello(&mut c, Some(random)).await),
        Some(ErrorCode::BadCredentials)
    );

    // Mallory acks every seq she can think of: only her own (empty) inbox is touched.
    let mut m = raw(&node, "ws").await;
    assert!(matches!(
        hello(&mut m, Some(auth(&mallory_reg))).await.body,
        Body::Welcome(_)
    ));
    m.send(&Frame::new(
        0,
        DeliverAck {
            seqs: (1..=200).collect(),
        },
    ))
    .await
    .unwrap();
    m.send(&Frame::new(5, ringpost_wire::Ping { nonce: 1 }))
        .await
        .unwrap();
    assert!(matches!(recv(&mut m).await.unwrap().body, Body::Pong(_)));

    let bob = Client::connect(config(&node, "ws").with_auth(auth(&bob_reg)))
        .await
        .unwrap();
    assert_eq!(&next_message(&bob).await.body[..], b"for bob only");
}

#[tokio::test]
async fn sigterm_tells_clients_to_go_away_and_exits_cleanly() {
    let mut node = TestNode::start();
    let mut c = raw(&node, "ws").await;
    assert!(matches!(hello(&mut c, None).await.body, Body::Welcome(_)));
    let stopper = tokio::task::spawn_blocking(move || {
        let ok = node.terminate();
        (ok, node)
    });
    let mut saw_going_away = false;
    while let Ok(Ok(Some(f))) = tokio::time::timeout(WAIT, c.recv()).await {
        saw_going_away |= matches!(f.body, Body::GoingAway(_));
    }
    let (exited_ok, _node) = stopper.await.unwrap();
    assert!(saw_going_away, "clients are told to go away");
    assert!(exited_ok, "the node exits 0 after SIGTERM");
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let node = TestNode::start();
    // The node says it is ready only once /readyz does (and accepts clients only then).
    assert_eq!(node.admin_get("/readyz"), (200, "ready\n".to_string()));
    let (_alice, _) = register(&node, "wss", ALICE).await;
    assert_eq!(node.admin_get("/healthz").0, 200);
    assert_eq!(node.admin_get("/readyz").0, 200);
    assert_eq!(node.admin_get("/nope").0, 404);
    let (status, metrics) = node.admin_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("ringpost_connections{transport=\"wss\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ringpost_inbox_wal_sync_seconds_bucket"),
        "{metrics}"
    );
}

/// `frame` encoded, with the first occurrence of `marker` (a string field's value) made
/// invalid UTF-8.
fn with_invalid_utf8(frame: &Frame, marker: &str) -> Vec<u8> {
    let mut bytes = frame.encode().unwrap().to_vec();
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
        .expect("marker in the encoded frame");
    bytes[at] = 0xff;
    bytes[at + 1] = 0xfe;
    bytes
}

#[tokio::test]
async fn invalid_utf8_in_any_string_field_is_answered_with_an_error() {
    let node = TestNode::start();
    let (_alice, alice_reg) = register(&node, "ws", ALICE).await;
    const BAD: &str = "MARKER-MARKER";

    // Requests an anonymous connection may send: each answered with an error for its own
    // request id, and the connection stays usable.
    let anonymous: Vec<Frame> = vec![
        Frame::new(
            11,
            ringpost_wire::RegisterVerify {
                phone: BOB,
                code: BAD.into(),
                pin: String::new(),
                device_name: "phone".into(),
            },
        ),
        Frame::new(
            12,
            ringpost_wire::RegisterVerify {
                phone: BOB,
                code: "123456".into(),
                pin: BAD.into(),
                device_name: "phone".into(),
            },
        ),
        Frame::new(
            13,
            ringpost_wire::RegisterVerify {
                phone: BOB,
                code: "123456".into(),
                pin: String::new(),
                device_name: BAD.into(),
            },
        ),
        Frame::new(
            14,
            ringpost_wire::LinkDevice {
                user: ALICE,
                code: BAD.into(),
                device_name: "laptop".into(),
            },
        ),
        Frame::new(
            15,
            ringpost_wire::LinkDevice {
                user: ALICE,
                code: "123456".into(),
                device_name: BAD.into(),
            },
        ),
    ];
    for transport in ["ws", "quic"] {
        let mut c = raw(&node, transport).await;
        assert!(matches!(hello(&mut c, None).await.body, Body::Welcome(_)));
        for frame in &anonymous {
            c.send_raw(&with_invalid_utf8(frame, BAD)).await.unwrap();
            let f = recv(&mut c).await.expect("an answer");
            assert_eq!(f.req, frame.req, "{transport} {}: {f:?}", frame.body.name());
            assert_eq!(error_code(&f), Some(ErrorCode::Malformed), "{f:?}");
            match &f.body {
                Body::Error(e) => assert!(e.message.len() <= limits::STRING_BYTES_MAX),
                other => panic!("{other:?}"),
            }
        }
        c.send(&Frame::new(9, ringpost_wire::Ping { nonce: 7 }))
            .await
            .unwrap();
        assert_eq!(
            recv(&mut c).await.unwrap().body,
            Body::Pong(ringpost_wire::Pong { nonce: 7 })
        );
    }

    // A device's request.
    let mut c = raw(&node, "ws").await;
    assert!(matches!(
        hello(&mut c, Some(auth(&alice_reg))).await.body,
        Body::Welcome(_)
    ));
    let lock = Frame::new(21, ringpost_wire::SetRegistrationLock { pin: BAD.into() });
    c.send_raw(&with_invalid_utf8(&lock, BAD)).await.unwrap();
    let f = recv(&mut c).await.expect("an answer");
    assert_eq!((f.req, error_code(&f)), (21, Some(ErrorCode::Malformed)));

    // A Hello whose user agent is invalid: an error, then the connection closes.
    for transport in ["ws", "quic"] {
        let mut c = raw(&node, transport).await;
        let hello = Frame::new(
            1,
            Hello {
                protocol_version: PROTOCOL_VERSION,
                auth: None,
                user_agent: BAD.into(),
            },
        );
        c.send_raw(&with_invalid_utf8(&hello, BAD)).await.unwrap();
        let f = recv(&mut c).await.expect("an error before the close");
        assert_eq!(
            error_code(&f),
            Some(ErrorCode::Malformed),
            "{transport}: {f:?}"
        );
        assert!(recv(&mut c).await.is_none(), "{transport}: closed after it");
    }
}

/// Reads frames until the node closes the connection; panics if it stays open for `within`.
async fn closed_within(conn: &mut Connection, within: Duration, ping: bool) {
    let deadline = tokio::time::Instant::now() + within;
    let mut nonce = 0;
    loop {
        if ping {
            nonce += 1;
            if conn
                .send(&Frame::new(0, ringpost_wire::Ping { nonce }))
                .await
                .is_err()
            {
                return;
            }
        }
        match tokio::time::timeout_at(
            deadline,
            tokio::time::timeout(Duration::from_millis(200), conn.recv()),
        )
        .await
        {
            Err(_) => panic!("still open after {within:?}"),
            Ok(Ok(Ok(None) | Err(_))) => return,
            Ok(Ok(Ok(Some(f)))) if matches!(f.body, Body::Error(_)) => {}
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn pings_do_not_keep_an_unauthenticated_connection_open() {
    let node = TestNode::start_with(&[
        "--handshake-timeout-ms",
        "1000",
        "--anonymous-session-ms",
        "2000",
    ]);
    // Before Hello: pings are answered, but the handshake deadline holds.
    for transport in ["ws", "quic"] {
        let mut c = raw(&node, transport).await;
        c.send(&Frame::new(1, ringpost_wire::Ping { nonce: 1 }))
            .await
            .unwrap();
        assert!(matches!(recv(&mut c).await.unwrap().body, Body::Pong(_)));
        closed_within(&mut c, Duration::from_secs(6), true).await;
    }
    // An anonymous session: closed at its deadline, however busy.
    let mut c = raw(&node, "ws").await;
    assert!(matches!(hello(&mut c, None).await.body, Body::Welcome(_)));
    closed_within(&mut c, Duration::from_secs(8), true).await;

    // A device's connection is not bound by either.
    let (alice, _) = register(&node, "ws", ALICE).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    alice
        .send(
            ALICE,
            msg_id(1),
            vec![to_device(ALICE, 1, "still connected")],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn unauthenticated_connections_are_bounded_per_source() {
    let node = TestNode::start_with(&["--preauth-per-source-max", "3"]);
    let (_, alice_reg) = register(&node, "ws", ALICE).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(raw(&node, "ws").await);
    }
    // The fourth from this address is refused, over WebSocket and over QUIC.
    let endpoint = Endpoint::parse(&node.url("ws")).unwrap();
    let refused = Connection::open(&endpoint, &TlsOptions::ca_file(node.ca_file())).await;
    assert!(
        refused.is_err(),
        "a fourth unauthenticated connection was accepted"
    );
    let endpoint = Endpoint::parse(&node.url("quic")).unwrap();
    let refused = Connection::open(&endpoint, &TlsOptions::ca_file(node.ca_file())).await;
    assert!(
        refused.is_err(),
        "a fourth unauthenticated QUIC connection was accepted"
    );
    let (_, metrics) = node.admin_get("/metrics");
    assert!(
        metrics.contains("ringpost_preauth_refused_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ringpost_connections_unauthenticated 3"),
        "{metrics}"
    );

    // One of them authenticates: it no longer counts, so another may connect.
    let mut first = idle.remove(0);
    assert!(matches!(
        hello(&mut first, Some(auth(&alice_reg))).await.body,
        Body::Welcome(_)
    ));
    let mut fourth = raw(&node, "ws").await;
    assert!(matches!(
        hello(&mut fourth, None).await.body,
        Body::Welcome(_)
    ));

    // Closing one gives its place back.
    drop(idle.remove(0));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match Connection::open(
            &Endpoint::parse(&node.url("ws")).unwrap(),
            &TlsOptions::ca_file(node.ca_file()),
        )
        .await
        {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the place of a closed connection was not given back: {e}"),
        }
    }
}

#[tokio::test]
async fn one_user_cannot_drain_another_users_prekeys() {
    let node = TestNode::start();
    let (_alice, _) = register(&node, "ws", ALICE).await;
    let (_bob, bob_reg) = register(&node, "ws", BOB).await;
    let (_carol, _) = register(&node, "ws", 15_550_000_003).await;
    let mut c = raw(&node, "ws").await;
    assert!(matches!(
        hello(&mut c, Some(auth(&bob_reg))).await.body,
        Body::Welcome(_)
    ));
    let claim = |req, user| Frame::new(req, ringpost_wire::PrekeyClaim { user, device: 0 });
    for req in 1..=10 {
        c.send(&claim(req, ALICE)).await.unwrap();
        // Served (these users uploaded no keys, so the answer says so).
        let f = recv(&mut c).await.unwrap();
        assert_eq!(f.req, req);
        assert_ne!(error_code(&f), Some(ErrorCode::RateLimited), "{req}: {f:?}");
    }
    c.send(&claim(11, ALICE)).await.unwrap();
    let f = recv(&mut c).await.unwrap();
    assert_eq!((f.req, error_code(&f)), (11, Some(ErrorCode::RateLimited)));
    match &f.body {
        Body::Error(e) => assert!(e.retry_after_ms > 0, "{e:?}"),
        other => panic!("{other:?}"),
    }
    // Claims of another user are still served.
    c.send(&claim(12, 15_550_000_003)).await.unwrap();
    let f = recv(&mut c).await.unwrap();
    assert_eq!(f.req, 12);
    assert_ne!(error_code(&f), Some(ErrorCode::RateLimited), "{f:?}");
}

#[tokio::test]
async fn a_removed_device_is_told_so() {
    let node = TestNode::start();
    let (alice, _) = register(&node, "ws", ALICE).await;
    let (_laptop, laptop_reg) = ringpost_client::dev::link_device(config(&node, "ws"), &alice)
        .await
        .unwrap();
    let mut old = raw(&node, "ws").await;
    assert!(matches!(
        hello(&mut old, Some(auth(&laptop_reg))).await.body,
        Body::Welcome(_)
    ));
    // The primary removes the laptop: its connection learns why it is closed.
    alice.remove_device(laptop_reg.device).await.unwrap();
    let mut told = None;
    while let Some(f) = recv(&mut old).await {
        if let Body::Error(e) = &f.body {
            told = Some((error_code(&f), e.message.clone(), e.fatal));
        }
    }
    let (code, message, fatal) = told.expect("an error before the close");
    assert_eq!(code, Some(ErrorCode::BadCredentials));
    assert!(message.contains("removed"), "{message}");
    assert!(fatal);
}
