//! Prekeys against a real node process: verified uploads, claims that never share a key under
//! load, the claimed user's one-time key budget, and the low-key event on a live connection.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ringpost_client::prekeys::{verify_bundle, DeviceKeys};
use ringpost_client::{Client, ClientError, Event};
use ringpost_wire::limits::PREKEY_LOW_WATERMARK;
use ringpost_wire::{ErrorCode, PrekeyUpload, UserId};

use super::harness::TestNode;
use super::messaging::register;

const WAIT: Duration = Duration::from_secs(20);

async fn send_upload(c: &Client, u: PrekeyUpload) -> Result<(), ClientError> {
    c.prekey_upload(u.identity_key, u.signed_prekey, u.one_time)
        .await
}

fn code(r: Result<(), ClientError>) -> Option<ErrorCode> {
    r.err().and_then(|e| e.code())
}

#[tokio::test]
async fn forged_signatures_and_wrong_key_lengths_are_refused_and_nothing_is_stored() {
    let node = TestNode::start();
    let victim: UserId = 15_556_000_001;
    let (v, _) = register(&node, "ws", victim).await;
    let (claimer, _) = register(&node, "ws", 15_556_000_002).await;
    let keys = DeviceKeys::from_seed([1; 32]);
    let good = keys.upload(Some(1), 0..20);

    // One one-time key signed by another identity (an attacker substituting keys).
    let mut forged = good.clone();
    forged.one_time[7] = DeviceKeys::from_seed([2; 32]).one_time_prekey(7);
    let err = send_upload(&v, forged).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadSignature), "{err}");
    // The signed prekey's signature missing.
    let mut unsigned = good.clone();
    if let Some(s) = unsigned.signed_prekey.as_mut() {
        s.signature = Default::default();
    }
    assert_eq!(
        code(send_upload(&v, unsigned).await),
        Some(ErrorCode::BadSignature)
    );
    // A 33-byte identity key.
    let mut short = good.clone();
    short.identity_key = short.identity_key.slice(..33);
    assert_eq!(
        code(send_upload(&v, short).await),
        Some(ErrorCode::Malformed)
    );
    // Nothing of them was stored.
    assert_eq!(v.prekey_count().await.unwrap(), 0);
    let err = claimer.prekey_claim(victim, 0).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");

    // The good upload is stored, and what a claim hands out verifies.
    send_upload(&v, good).await.unwrap();
    assert_eq!(v.prekey_count().await.unwrap(), 20);
    let bundle = claimer.prekey_claim(victim, 0).await.unwrap();
    assert_eq!(bundle.devices.len(), 1);
    assert!(verify_bundle(&bundle.devices[0]));
    assert_eq!(bundle.devices[0].identity_key, keys.identity_key());
    assert_eq!(bundle.devices[0].one_time.as_ref().map(|k| k.id), Some(0));
}

#[tokio::test]
async fn concurrent_claims_never_share_a_key_and_the_claimed_users_budget_holds() {
    let node = TestNode::start();
    let victim: UserId = 15_556_100_000;
    let (v, _) = register(&node, "ws", victim).await;
    let keys = DeviceKeys::from_seed([3; 32]);
    // 200 keys: more than the claimed user's one-time key budget (burst 100).
    send_upload(&v, keys.upload(Some(1), 0..100)).await.unwrap();
    send_upload(&v, keys.upload(None, 100..200)).await.unwrap();
    // 12 claimers, each within its own budgets (10 claims of one user at once).
    let claimers = 12;
    let claims_each = 10;
    let mut clients = Vec::new();
    for i in 0..claimers {
        clients.push(register(&node, "ws", 15_556_100_001 + i).await.0);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in clients {
        for _ in 0..claims_each {
            let c = c.clone();
            tasks.spawn(async move { c.prekey_claim(victim, 0).await });
        }
    }
    let mut handed = Vec::new();
    let mut fallback = 0;
    while let Some(r) = tasks.join_next().await {
        let bundle = r.unwrap().expect("every claim is answered");
        assert_eq!(bundle.devices.len(), 1);
        let d = &bundle.devices[0];
        assert!(verify_bundle(d));
        assert!(d.signed_prekey.is_some(), "the fallback is always there");
        match &d.one_time {
            Some(k) => handed.push(k.id),
            None => fallback += 1,
        }
    }
    let elapsed = started.elapsed();
    let unique: BTreeSet<u32> = handed.iter().copied().collect();
    assert_eq!(
        unique.len(),
        handed.len(),
        "a one-time key handed out twice"
    );
    assert_eq!(handed.len() + fallback, (claimers * claims_each) as usize);
    // The budget: 100 at once, then one every 2 s (30 a minute).
    let allowed = 100 + (elapsed.as_secs() as usize / 2) + 1;
    assert!(
        handed.len() >= 100 && handed.len() <= allowed,
        "{} one-time keys handed out in {elapsed:?} (budget {allowed})",
        handed.len()
    );
    assert!(fallback > 0, "past the budget claims get the fallback");
    // The lowest ids went first, and what is left is exactly what was not handed out.
    assert_eq!(unique, (0..handed.len() as u32).collect());
    assert_eq!(v.prekey_count().await.unwrap() as usize, 200 - handed.len());
}

/// Waits for `n` `PrekeysLow` events (and nothing else of note) on `c`.
async fn low_events(c: &Client, n: usize) -> Vec<u32> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(WAIT, c.next_event()).await {
            Ok(Some(Event::PrekeysLow { count })) => got.push(count),
            Ok(Some(_)) => {}
            Ok(None) => panic!("client closed after {got:?}"),
            Err(_) => panic!("waited for {n} low-key events, got {got:?}"),
        }
    }
    got
}

#[tokio::test]
async fn the_low_key_event_reaches_the_live_connection_once_per_crossing() {
    let node = TestNode::start();
    let victim: UserId = 15_556_200_000;
    let (v, _) = register(&node, "ws", victim).await;
    let (a, _) = register(&node, "ws", 15_556_200_001).await;
    let (b, _) = register(&node, "ws", 15_556_200_002).await;
    let keys = DeviceKeys::from_seed([4; 32]);
    let w = PREKEY_LOW_WATERMARK;
    send_upload(&v, keys.upload(Some(1), 0..w + 2))
        .await
        .unwrap();
    // Ten claims take it from w+2 to 2: the third crosses the watermark, the other seven below
    // it send nothing.
    for _ in 0..10 {
        a.prekey_claim(victim, 0).await.unwrap();
    }
    // An upload re-arms it, and another crossing sends a second event. Pushes to a connection
    // keep their order, so once the second arrives any event of the claims in between would
    // have arrived before it.
    send_upload(&v, keys.upload(None, 100..100 + w))
        .await
        .unwrap();
    assert_eq!(v.prekey_count().await.unwrap(), w + 2);
    for _ in 0..3 {
        b.prekey_claim(victim, 0).await.unwrap();
    }
    assert_eq!(low_events(&v, 2).await, vec![w - 1, w - 1]);
    assert_eq!(v.prekey_count().await.unwrap(), w - 1);
    let (status, metrics) = node.admin_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("ringpost_keys_low_events_total 2"),
        "{metrics}"
    );
}
