//! Request floods of attacker devices and anonymous connections: `ack-flood`, `prekey-drain`,
//! `register-flood`. Each counts the node's answers by kind and checks what the node must never
//! do, whatever the load.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rand::Rng;
use ringpost_client::prekeys::DeviceKeys;
use ringpost_client::wire::{Body, DeliverAck, Hello};
use ringpost_client::{dev, Client, ClientError, Connection, Endpoint, Frame};

use super::{
    client_of, error_name, is_rate_limited, register, until_stopped, AttackSpec, Pace, Tally,
    FIRST_ATTACKER_USER,
};

/// `DeliverAck` frames per second, at most, over all flooding devices (256 seqs each).
pub const ACK_FRAMES_PER_S_MAX: u32 = 3_000;

/// Devices flooding acks.
const ACK_FLOODERS: u64 = 2;

/// `PrekeyClaim`s per second, at most, over all claimers.
pub const CLAIMS_PER_S_MAX: u32 = 300;

/// Users claiming the victim's prekeys.
const CLAIMERS: u64 = 3;

/// One-time prekeys the victim uploads (the most one upload may carry).
const VICTIM_PREKEYS: u32 = 100;

/// The budget of claims of one user by one user (docs/protocol.md "Request budgets", charged
/// per (claiming user, claimed user)): burst, and refills per minute.
const CLAIM_BURST: u64 = 10;
const CLAIMS_PER_MIN: u64 = 10;

/// Register steps (a `RegisterRequest` or a `RegisterVerify`) per second, at most.
pub const REGISTER_STEPS_PER_S_MAX: u32 = 100;

/// Anonymous connections flooding registrations.
const REGISTER_FLOODERS: usize = 4;

/// Wrong codes tried after each request.
const WRONG_CODES_PER_NUMBER: u32 = 4;

/// Answers drained after this many frames sent.
const DRAIN_EVERY: u32 = 32;

/// An attacker device's raw connection, welcomed.
async fn raw_device(spec: &AttackSpec, phone: u64) -> Result<Connection> {
    let auth = register(spec, phone).await?;
    let endpoint = Endpoint::parse(&spec.ws_url)?;
    let tls = spec.tls();
    let mut conn = Connection::open(&endpoint, &tls).await?;
    conn.send(&Frame::new(
        1,
        Hello {
            protocol_version: 1,
            auth: Some(auth),
            user_agent: "ringpost-chaos attacker".into(),
        },
    ))
    .await?;
    match conn.recv().await? {
        Some(Frame {
            body: Body::Welcome(_),
            ..
        }) => Ok(conn),
        other => anyhow::bail!("attacker {phone} not welcomed: {other:?}"),
    }
}

/// Reads whatever answers are ready without waiting; `false` once the node closed.
async fn drain_ready(conn: &mut Connection, tally: &Tally) -> bool {
    loop {
        match tokio::time::timeout(Duration::ZERO, conn.recv()).await {
            Err(_) => return true,
            Ok(Ok(Some(frame))) => count_answer(&frame, tally),
            Ok(Ok(None)) => return false,
            Ok(Err(e @ ClientError::Decode(_))) => {
                tally.violation(format!("the node sent a frame our decoder refuses: {e}"));
                return false;
            }
            Ok(Err(_)) => return false,
        }
    }
}

fn count_answer(frame: &Frame, tally: &Tally) {
    match &frame.body {
        Body::Error(e) => {
            let name = ringpost_client::ErrorCode::from_u16(e.code)
                .map_or_else(|| format!("code {}", e.code), |c| format!("{c:?}"));
            tally.add(&format!("answered Error {name}"), 1);
        }
        other => tally.add(&format!("answered {}", other.name()), 1),
    }
}

pub(super) async fn ack_flood(spec: Arc<AttackSpec>, tally: Tally) -> Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..ACK_FLOODERS {
        let (spec, tally) = (spec.clone(), tally.clone());
        tasks.spawn(async move {
            let phone = FIRST_ATTACKER_USER + 300 + i;
            let mut rng = crate::seeded(spec.seed, &format!("attack-ack-{i}"));
            let mut pace = Pace::new(ACK_FRAMES_PER_S_MAX / ACK_FLOODERS as u32);
            while !spec.stopped() {
                let mut conn = match raw_device(&spec, phone).await {
                    Ok(c) => c,
                    Err(e) => {
                        tally.note(format!("ack flooder {phone}: {e:#}"));
                        return;
                    }
                };
                let mut sent = 0u32;
                let open = loop {
                    if spec.stopped() {
                        break true;
                    }
                    let base: u64 = rng.gen();
                    let seqs: Vec<u64> = if rng.gen_bool(0.2) {
                        // Scattered over the whole range, extremes included.
                        let mut s: Vec<u64> = (0..254).map(|_| rng.gen()).collect();
                        s.extend([0, u64::MAX]);
                        s
                    } else {
                        (0..256).map(|k| base.wrapping_add(k)).collect()
                    };
                    let frame = Frame::new(rng.gen_range(1..u32::MAX), DeliverAck { seqs });
                    if conn.send(&frame).await.is_err() {
                        break false;
                    }
                    tally.add("DeliverAck frames sent", 1);
                    sent += 1;
                    if sent.is_multiple_of(DRAIN_EVERY) && !drain_ready(&mut conn, &tally).await {
                        break false;
                    }
                    pace.tick().await;
                };
                if !open {
                    tally.add("connections the node closed", 1);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

pub(super) async fn prekey_drain(spec: Arc<AttackSpec>, tally: Tally) -> Result<()> {
    let victim_phone = FIRST_ATTACKER_USER + 400;
    let victim = client_of(&spec, register(&spec, victim_phone).await?).await?;
    let mut rng = crate::seeded(spec.seed, "attack-prekeys");
    // Signed as the node verifies them (docs/protocol.md "Prekeys"), from the run's seed.
    let upload = DeviceKeys::from_seed(rng.gen()).upload(Some(1), 1..=VICTIM_PREKEYS);
    victim
        .prekey_upload(upload.identity_key, upload.signed_prekey, upload.one_time)
        .await?;
    let mut claimers = Vec::new();
    for i in 0..CLAIMERS {
        claimers
            .push(client_of(&spec, register(&spec, FIRST_ATTACKER_USER + 410 + i).await?).await?);
    }
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in &claimers {
        let (spec, tally, client) = (spec.clone(), tally.clone(), client.clone());
        tasks.spawn(async move {
            let mut pace = Pace::new(CLAIMS_PER_S_MAX / CLAIMERS as u32);
            while !spec.stopped() {
                match client.prekey_claim(victim_phone, 0).await {
                    Ok(bundle) => {
                        for device in &bundle.devices {
                            if device.one_time.is_some() {
                                tally.add("one-time prekeys handed out", 1);
                            } else {
                                tally.add("bundles without a one-time prekey", 1);
                            }
                        }
                    }
                    Err(e) => tally.error(&e),
                }
                pace.tick().await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let left = victim.prekey_count().await?;
    let handed = u64::from(VICTIM_PREKEYS - left.min(VICTIM_PREKEYS));
    // Each claimer has its own budget for the victim; one more each for a refill at the edge.
    let allowed = CLAIMERS * (CLAIM_BURST + (elapsed.as_secs() * CLAIMS_PER_MIN).div_ceil(60) + 1);
    tally.note(format!(
        "the victim has {left} of {VICTIM_PREKEYS} one-time prekeys left after {:.0} s of \
         claims by {CLAIMERS} users ({handed} taken; their claim budgets allow {allowed})",
        elapsed.as_secs_f64()
    ));
    if handed > allowed {
        tally.violation(format!(
            "{handed} one-time prekeys of one user were handed out to {CLAIMERS} users in {:.0} \
             s; their budgets of claims of one user allow {allowed}",
            elapsed.as_secs_f64()
        ));
    }
    for c in claimers {
        c.close().await;
    }
    victim.close().await;
    Ok(())
}

pub(super) async fn register_flood(spec: Arc<AttackSpec>, tally: Tally) -> Result<()> {
    let pace = Arc::new(tokio::sync::Mutex::new(Pace::new(REGISTER_STEPS_PER_S_MAX)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..REGISTER_FLOODERS {
        let (spec, tally, pace) = (spec.clone(), tally.clone(), pace.clone());
        tasks.spawn(async move {
            let mut rng = crate::seeded(spec.seed, &format!("attack-register-{i}"));
            let client = loop {
                match Client::connect(spec.config()).await {
                    Ok(c) => break c,
                    Err(_) if !spec.stopped() => {
                        tally.add("connect errors", 1);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(_) => return,
                }
            };
            let flood = async {
                loop {
                    let victim = !spec.victims.is_empty() && rng.gen_bool(0.5);
                    let phone = if victim {
                        spec.victims[rng.gen_range(0..spec.victims.len())]
                    } else {
                        FIRST_ATTACKER_USER + 1_000 + rng.gen_range(0..100_000)
                    };
                    pace.lock().await.tick().await;
                    match client.register_request(phone).await {
                        Ok(_) => tally.add("RegisterRequest answered RegisterChallenge", 1),
                        Err(e) => tally.add(&format!("RegisterRequest {}", error_name(&e)), 1),
                    }
                    // Never the right code: for an honest user's number, the newest code the
                    // node wrote for it is avoided (a lucky guess would take the account).
                    let right = if victim {
                        dev::read_code(&spec.codes_file, phone, Duration::from_millis(200))
                            .await
                            .ok()
                            .and_then(|c| c.parse::<u32>().ok())
                    } else {
                        None
                    };
                    for k in 0..WRONG_CODES_PER_NUMBER {
                        let code = match right {
                            Some(right) => (right + 1 + k) % 1_000_000,
                            None => rng.gen_range(0..1_000_000),
                        };
                        pace.lock().await.tick().await;
                        let answer = client
                            .register_verify(phone, &format!("{code:06}"), "", "attacker")
                            .await;
                        match answer {
                            Ok(_) if victim => tally.violation(format!(
                                "RegisterVerify with a wrong code registered honest user {phone}"
                            )),
                            Ok(_) => tally.add("RegisterVerify guessed right (by chance)", 1),
                            Err(e) if is_rate_limited(&e) => {
                                tally.add("RegisterVerify error RateLimited", 1)
                            }
                            Err(e) => tally.add(&format!("RegisterVerify {}", error_name(&e)), 1),
                        }
                    }
                }
            };
            tokio::select! {
                _ = flood => {}
                _ = until_stopped(&spec) => {}
            }
            client.close().await;
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}
