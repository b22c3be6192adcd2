//! `malformed`: random and mutated frames over ws and QUIC, before `Hello`, after an anonymous
//! `Hello` and after an authenticated one; now and then a WebSocket text message, a frame over
//! the size bound, or bytes that break the transport framing. Each connection is used until
//! the node closes it (or for a few frames), then another is opened.
//!
//! Mutated frames start from frames about attacker users only, so a mutation that happens to
//! decode never reaches an honest device.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use ringpost_client::wire::limits::FRAME_BYTES_MAX;
use ringpost_client::wire::{
    Body, CodeChannel, DeliverAck, Hello, Ping, PrekeyClaim, RegisterRequest, Send,
};
use ringpost_client::{Auth, ClientError, Connection, DeviceCiphertext, Endpoint, Frame};

use super::{junk, register, AttackSpec, Pace, Tally, FIRST_ATTACKER_USER};

/// Bad frames per second, at most, over all connections.
pub const MALFORMED_FRAMES_PER_S_MAX: u32 = 400;

/// Connections at once.
const MALFORMED_CONNECTIONS: usize = 4;

/// Bad frames sent on one connection before it is dropped and another opened.
const FRAMES_PER_CONNECTION_MAX: u32 = 40;

/// Time given to the node's answer to each bad frame.
const ANSWER_WAIT: Duration = Duration::from_millis(20);

/// Time to open a connection.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn run(spec: Arc<AttackSpec>, tally: Tally) -> Result<()> {
    let auth = register(&spec, FIRST_ATTACKER_USER + 500).await?;
    let pace = Arc::new(tokio::sync::Mutex::new(Pace::new(
        MALFORMED_FRAMES_PER_S_MAX,
    )));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..MALFORMED_CONNECTIONS {
        let (spec, tally, pace, auth) = (spec.clone(), tally.clone(), pace.clone(), auth.clone());
        tasks.spawn(async move {
            let mut rng = crate::seeded(spec.seed, &format!("attack-malformed-{i}"));
            while !spec.stopped() {
                let quic = spec.quic_url.is_some() && rng.gen_bool(0.5);
                let url = if quic {
                    spec.quic_url.clone().unwrap_or_default()
                } else {
                    spec.ws_url.clone()
                };
                one_connection(&spec, &url, quic, &auth, &mut rng, &tally, &pace).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn one_connection(
    spec: &AttackSpec,
    url: &str,
    quic: bool,
    auth: &Auth,
    rng: &mut ChaCha8Rng,
    tally: &Tally,
    pace: &tokio::sync::Mutex<Pace>,
) {
    let transport = if quic { "quic" } else { "ws" };
    let Ok(endpoint) = Endpoint::parse(url) else {
        return;
    };
    let tls = spec.tls();
    let mut conn = match tokio::time::timeout(OPEN_TIMEOUT, Connection::open(&endpoint, &tls)).await
    {
        Ok(Ok(c)) => c,
        _ => {
            tally.add(&format!("{transport} connect errors"), 1);
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
    };
    tally.add(&format!("{transport} connections"), 1);
    // Before Hello, after an anonymous one, or after an authenticated one.
    let stage = rng.gen_range(0..3);
    if stage > 0 {
        let hello = Hello {
            protocol_version: 1,
            auth: (stage == 2).then(|| auth.clone()),
            user_agent: "ringpost-chaos malformed".into(),
        };
        if conn.send(&Frame::new(1, hello)).await.is_err() {
            return;
        }
        match tokio::time::timeout(OPEN_TIMEOUT, conn.recv()).await {
            Ok(Ok(Some(Frame {
                body: Body::Welcome(_),
                ..
            }))) => {}
            _ => {
                tally.add(&format!("{transport} Hello not welcomed"), 1);
                return;
            }
        }
    }
    let mut answered_error = false;
    for _ in 0..FRAMES_PER_CONNECTION_MAX {
        if spec.stopped() {
            break;
        }
        pace.lock().await.tick().await;
        let sent = match rng.gen_range(0..100) {
            0..=39 => conn.send_raw(&junk(rng, 2_048)).await,
            40..=89 => conn.send_raw(&mutated(rng)).await,
            90..=93 if !quic => conn.send_text("not a frame").await,
            94..=96 => {
                let big = vec![0u8; FRAME_BYTES_MAX + 1 + rng.gen_range(0..1024)];
                conn.send_raw(&big).await
            }
            _ => conn.send_transport_bytes(&junk(rng, 64)).await,
        };
        tally.add("bad frames sent", 1);
        if sent.is_err() {
            tally.add(&format!("{transport} closed by the node (write failed)"), 1);
            return;
        }
        loop {
            match tokio::time::timeout(ANSWER_WAIT, conn.recv()).await {
                Err(_) => break,
                Ok(Ok(Some(frame))) => {
                    if let Body::Error(e) = &frame.body {
                        answered_error = true;
                        let name = ringpost_client::ErrorCode::from_u16(e.code)
                            .map_or_else(|| format!("code {}", e.code), |c| format!("{c:?}"));
                        tally.add(&format!("answered Error {name}"), 1);
                    } else {
                        tally.add(&format!("answered {}", frame.body.name()), 1);
                    }
                }
                Ok(Ok(None)) | Ok(Err(ClientError::Disconnected)) => {
                    let how = if answered_error {
                        "after an Error"
                    } else {
                        "without an Error"
                    };
                    tally.add(&format!("{transport} closed by the node {how}"), 1);
                    return;
                }
                Ok(Err(e @ ClientError::Decode(_))) => {
                    tally.violation(format!("the node sent a frame our decoder refuses: {e}"));
                    return;
                }
                Ok(Err(_)) => {
                    tally.add(&format!("{transport} closed by the node (reset)"), 1);
                    return;
                }
            }
        }
    }
    let _ = tokio::time::timeout(OPEN_TIMEOUT, conn.close()).await;
}

/// A valid frame about attacker users, then mutated: bytes flipped, cut short, extended, or a
/// 32-bit field overwritten with an extreme value.
fn mutated(rng: &mut ChaCha8Rng) -> Bytes {
    let other = FIRST_ATTACKER_USER + 501;
    let body: Body = match rng.gen_range(0..6) {
        0 => Hello {
            protocol_version: 1,
            auth: None,
            user_agent: "x".repeat(rng.gen_range(0..64)),
        }
        .into(),
        1 => Ping { nonce: rng.gen() }.into(),
        2 => DeliverAck {
            seqs: (0..rng.gen_range(0..256)).map(|_| rng.gen()).collect(),
        }
        .into(),
        3 => PrekeyClaim {
            user: other,
            device: 0,
        }
        .into(),
        4 => RegisterRequest {
            phone: other,
            channel: CodeChannel::Sms,
        }
        .into(),
        _ => Send {
            msg_id: rng.gen(),
            to: other,
            ciphertexts: vec![DeviceCiphertext {
                user: other,
                device: 1,
                body: junk(rng, 256),
            }],
        }
        .into(),
    };
    let Ok(encoded) = Frame::new(rng.gen(), body).encode() else {
        return junk(rng, 64);
    };
    let mut bytes = encoded.to_vec();
    match rng.gen_range(0..4) {
        0 => {
            for _ in 0..rng.gen_range(1..=8) {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] ^= 1 << rng.gen_range(0..8);
            }
        }
        1 => bytes.truncate(rng.gen_range(0..bytes.len())),
        2 => bytes.extend_from_slice(&junk(rng, 128)),
        _ => {
            if bytes.len() >= 4 {
                let i = rng.gen_range(0..bytes.len() - 3);
                let value: u32 = [0, 1, 0x7fff_ffff, 0xffff_ffff, 0xffff_fff0][rng.gen_range(0..5)];
                bytes[i..i + 4].copy_from_slice(&value.to_le_bytes());
            }
        }
    }
    Bytes::from(bytes)
}
