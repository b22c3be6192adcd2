//! `slow-reader`: attacker devices whose connections get large messages and never read them.
//! Each slow device says `Hello`, reads its `Welcome`, and then never reads again; an attacker
//! sender sends them 60 KiB messages round robin. The node may queue only its per-connection
//! output budget for each; when the attack ends, each connection is drained to see whether the
//! node had closed it meanwhile.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use rand::Rng;
use ringpost_client::wire::{Body, Hello};
use ringpost_client::{Connection, DeviceCiphertext, Endpoint, Frame};

use super::{client_of, register, until_stopped, AttackSpec, Pace, Tally, FIRST_ATTACKER_USER};

/// Devices that never read.
pub const SLOW_READERS: u64 = 6;

/// Messages the attacker sender sends per second, at most (under the node's per-device send
/// budget the chaos node runs with, 200/s).
pub const SLOW_SENDS_PER_S_MAX: u32 = 40;

/// Size of each message body.
const BODY_BYTES: usize = 60 * 1024;

/// Time to drain one connection at the end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) async fn run(spec: Arc<AttackSpec>, tally: Tally) -> Result<()> {
    let sender_phone = FIRST_ATTACKER_USER + 100;
    let sender = register(&spec, sender_phone).await?;
    let mut slow = Vec::new();
    let endpoint = Endpoint::parse(&spec.ws_url)?;
    let tls = spec.tls();
    for i in 0..SLOW_READERS {
        let auth = register(&spec, FIRST_ATTACKER_USER + 110 + i).await?;
        let mut conn = Connection::open(&endpoint, &tls).await?;
        conn.send(&Frame::new(
            1,
            Hello {
                protocol_version: 1,
                auth: Some(auth.clone()),
                user_agent: "ringpost-chaos slow reader".into(),
            },
        ))
        .await?;
        match conn.recv().await? {
            Some(Frame {
                body: Body::Welcome(_),
                ..
            }) => {}
            other => anyhow::bail!("slow reader {} not welcomed: {other:?}", auth.user),
        }
        slow.push((auth.user, conn));
    }
    tally.add("slow devices connected", slow.len() as u64);
    let client = client_of(&spec, sender).await?;
    let mut rng = crate::seeded(spec.seed, "attack-slow-reader");
    let mut pace = Pace::new(SLOW_SENDS_PER_S_MAX);
    let users: Vec<u64> = slow.iter().map(|(u, _)| *u).collect();
    let send_loop = async {
        let mut i = 0usize;
        loop {
            let to = users[i % users.len()];
            i += 1;
            let mut body = vec![0u8; BODY_BYTES];
            rng.fill(&mut body[..]);
            let answer = client
                .send(
                    to,
                    rng.gen(),
                    vec![DeviceCiphertext {
                        user: to,
                        device: 1,
                        body: Bytes::from(body),
                    }],
                )
                .await;
            match answer {
                Ok(ack) => tally.add(&format!("sends answered {:?}", ack.status), 1),
                Err(e) => tally.error(&e),
            }
            pace.tick().await;
        }
    };
    tokio::select! {
        _ = send_loop => {}
        _ = until_stopped(&spec) => {}
    }
    client.close().await;
    // Did the node close them meanwhile? Reading now drains what the kernel holds first.
    // What was waiting for each (the node's queue and the kernel's buffers): at most the
    // delivery window, and the node stops queueing at its output budget.
    // All at once: the fault heals when the attacker is done.
    let mut drains = tokio::task::JoinSet::new();
    for (_, mut conn) in slow {
        let tally = tally.clone();
        drains.spawn(async move {
            let frames = std::sync::atomic::AtomicU64::new(0);
            let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
                while let Ok(Some(_)) = conn.recv_raw().await {
                    frames.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .await;
            tally.max(
                "most frames waiting for one slow connection",
                frames.into_inner(),
            );
            match drained {
                Ok(()) => tally.add("slow connections the node had closed", 1),
                Err(_) => tally.add("slow connections still open at the end", 1),
            }
        });
    }
    while drains.join_next().await.is_some() {}
    Ok(())
}
