//! Wake-up pushes end to end: a real `ringpost-node dev` process, real clients, and local HTTP
//! servers on 127.0.0.1 standing in for the providers (a webhook, APNs over HTTP/2 and TLS with
//! a certificate made here, FCM HTTP v1 with its OAuth2 token endpoint). Backoff is configured
//! short (tens of milliseconds), so no test sleeps; every wait is for an event, with a timeout.

use crate::e2e_harness as harness;
#[path = "push/stand_in.rs"]
mod stand_in;

use std::time::Duration;

use bytes::Bytes;
use harness::TestNode;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256};
use ringpost_client::{dev, Client, ClientConfig};
use ringpost_node::push::jwt::decode_unverified;
use ringpost_node::push::webhook_signature;
use ringpost_wire::{
    Body, DeviceCiphertext, MsgId, PushProvider, PushRegister, Registered, SendStatus, UserId,
};
use stand_in::{Reply, StandIn, ACCESS_TOKEN};

const ALICE: UserId = 15_550_000_101;
const BOB: UserId = 15_550_000_102;
const WAIT: Duration = Duration::from_secs(30);
const FCM_KEY_PEM: &str = include_str!("push/fcm-test-key.pem");

/// Flags making retries fast and bounded: 20 ms doubling to 200 ms, 5 calls.
const FAST_RETRY: [&str; 6] = [
    "--push-backoff-base-ms",
    "20",
    "--push-backoff-max-ms",
    "200",
    "--push-attempts-max",
    "5",
];

fn webhook_node(hook: &StandIn, secrets: &tempfile::TempDir) -> TestNode {
    webhook_node_with(hook, secrets, &[])
}

fn webhook_node_with(hook: &StandIn, secrets: &tempfile::TempDir, extra: &[&str]) -> TestNode {
    let secret = secrets.path().join("hmac");
    std::fs::write(&secret, "hmac-secret\n").unwrap();
    let url = format!("{}/wake", hook.url);
    let secret = secret.to_string_lossy().to_string();
    let mut args = vec![
        "--push-webhook-url",
        &url,
        "--push-webhook-token",
        "relay-bearer",
        "--push-webhook-hmac-secret-file",
        &secret,
    ];
    args.extend(FAST_RETRY);
    args.extend(extra);
    TestNode::start_with(&args)
}

fn config(node: &TestNode) -> ClientConfig {
    ClientConfig::new(node.url("ws")).with_ca_file(node.ca_file())
}

async fn register(node: &TestNode, phone: UserId) -> (Client, Registered) {
    dev::register_device(config(node), phone, &node.codes_file())
        .await
        .unwrap_or_else(|e| panic!("registering {phone}: {e}"))
}

async fn push_register(client: &Client, provider: PushProvider, token: &str) {
    let answer = client
        .request(PushRegister {
            provider,
            token: token.into(),
        })
        .await
        .unwrap();
    assert!(
        matches!(answer.body, Body::Done(_)),
        "PushRegister answered {answer:?}"
    );
}

fn msg_id(n: u32) -> MsgId {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&n.to_be_bytes());
    id[15] = 0x5e;
    id
}

async fn send(alice: &Client, n: u32) {
    let body = DeviceCiphertext {
        user: BOB,
        device: 1,
        body: Bytes::from(format!("message {n}")),
    };
    let ack = alice.send(BOB, msg_id(n), vec![body]).await.unwrap();
    assert_eq!(ack.status, SendStatus::Ok, "message {n}");
}

/// A metric of the node's `/metrics` (the sum over its label sets), read until `done` holds.
async fn wait_metric(node: &TestNode, name: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = tokio::task::block_in_place(|| node.admin_get("/metrics"));
        let value: f64 = body
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if done(value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {value}, still not what the test waits for"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bob registers a token and goes offline; Alice is connected. Returns Bob's credentials.
async fn bob_offline_alice_online(
    node: &TestNode,
    provider: PushProvider,
    token: &str,
) -> (Client, Registered) {
    let (bob, bob_reg) = register(node, BOB).await;
    push_register(&bob, provider, token).await;
    bob.close().await;
    let (alice, _) = register(node, ALICE).await;
    // Bob's connection is gone from the node (not only from the client) before Alice sends.
    wait_metric(node, "ringpost_connections", |n| n == 1.0).await;
    let _ = bob_reg.user;
    (alice, bob_reg)
}

fn assert_webhook_call(r: &stand_in::Recorded, token: &str) {
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/wake");
    assert_eq!(r.header("authorization"), "Bearer relay-bearer");
    assert_eq!(
        r.header("x-ringpost-signature"),
        webhook_signature(b"hmac-secret", &r.body),
        "the body is signed with the configured secret"
    );
    let body = r.json();
    assert_eq!(body["token"], token);
    assert_eq!(body["user"], BOB);
    assert_eq!(body["device"], 1);
    assert_eq!(body["collapse_key"], "ringpost-wake");
    assert_eq!(
        body.as_object().unwrap().len(),
        4,
        "nothing about the message: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_an_offline_device_wakes_it_through_the_webhook() {
    let mut hook = StandIn::plain().await;
    let secrets = tempfile::tempdir().unwrap();
    let node = webhook_node(&hook, &secrets);
    let (alice, _) = bob_offline_alice_online(&node, PushProvider::Webhook, "bob-token").await;
    send(&alice, 1).await;
    let call = hook.next_request().await;
    assert_webhook_call(&call, "bob-token");
    wait_metric(&node, "ringpost_push_sent_total", |n| n == 1.0).await;
    wait_metric(&node, "ringpost_push_latency_seconds_count", |n| n == 1.0).await;
    wait_metric(&node, "ringpost_push_queue_depth", |n| n == 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_device_gets_no_push_and_connecting_cancels_a_pending_one() {
    let mut hook = StandIn::plain().await;
    let secrets = tempfile::tempdir().unwrap();
    let node = webhook_node(&hook, &secrets);
    let (bob, bob_reg) = register(&node, BOB).await;
    push_register(&bob, PushProvider::Webhook, "bob-token").await;
    let (alice, _) = register(&node, ALICE).await;
    // Connected: messages are delivered, nothing is queued.
    send(&alice, 1).await;
    send(&alice, 2).await;
    bob.close().await;
    wait_metric(&node, "ringpost_connections", |n| n == 1.0).await;
    assert_eq!(
        wait_metric(&node, "ringpost_push_queued_total", |_| true).await,
        0.0
    );

    // Offline: a push, failing with a long Retry-After so that it stays pending.
    hook.reply_next(Reply {
        status: 503,
        headers: vec![("retry-after", "3600".into())],
        body: String::new(),
    });
    send(&alice, 3).await;
    assert_webhook_call(&hook.next_request().await, "bob-token");
    wait_metric(&node, "ringpost_push_failed_total", |n| n == 1.0).await;
    wait_metric(&node, "ringpost_push_queue_depth", |n| n == 1.0).await;
    // Bob connects: the pending push is cancelled.
    let bob = Client::connect(config(&node).with_auth(ringpost_wire::Auth {
        user: bob_reg.user,
        device: bob_reg.device,
        token: bob_reg.token.clone(),
    }))
    .await
    .unwrap();
    wait_metric(&node, "ringpost_push_queue_depth", |n| n == 0.0).await;
    bob.close().await;
    wait_metric(&node, "ringpost_connections", |n| n == 1.0).await;
    // Offline again: a new message is a new push at once (not coalesced into the cancelled one,
    // which would wait an hour).
    send(&alice, 4).await;
    assert_webhook_call(&hook.next_request().await, "bob-token");
    wait_metric(&node, "ringpost_push_sent_total", |n| n == 1.0).await;
    assert_eq!(
        wait_metric(&node, "ringpost_push_coalesced_total", |_| true).await,
        0.0
    );
    assert!(hook.try_next_request().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_error_is_retried_with_backoff() {
    let mut hook = StandIn::plain().await;
    let secrets = tempfile::tempdir().unwrap();
    let node = webhook_node(&hook, &secrets);
    let (alice, _) = bob_offline_alice_online(&node, PushProvider::Webhook, "bob-token").await;
    hook.reply_next(Reply::status(503));
    hook.reply_next(Reply::status(500));
    send(&alice, 1).await;
    for _ in 0..3 {
        assert_webhook_call(&hook.next_request().await, "bob-token");
    }
    wait_metric(&node, "ringpost_push_sent_total", |n| n == 1.0).await;
    assert_eq!(
        wait_metric(&node, "ringpost_push_failed_total", |_| true).await,
        2.0
    );
    wait_metric(&node, "ringpost_push_queue_depth", |n| n == 0.0).await;
    assert!(hook.try_next_request().is_none(), "sent once, not again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_while_a_push_is_pending_are_coalesced() {
    let mut hook = StandIn::plain().await;
    let secrets = tempfile::tempdir().unwrap();
    let node = webhook_node(&hook, &secrets);
    let (alice, _) = bob_offline_alice_online(&node, PushProvider::Webhook, "bob-token").await;
    let release = hook.hold_next();
    send(&alice, 1).await;
    let first = hook.next_request().await;
    // Three more messages stored while the push is pending (its call in flight).
    for n in 2..=4 {
        send(&alice, n).await;
    }
    assert_eq!(
        wait_metric(&node, "ringpost_push_coalesced_total", |_| true).await,
        3.0
    );
    release.send(Reply::status(200)).unwrap();
    assert_webhook_call(&first, "bob-token");
    wait_metric(&node, "ringpost_push_sent_total", |n| n == 1.0).await;
    // Sent: the next message is a new push, and it is the next call the provider sees.
    send(&alice, 5).await;
    assert_webhook_call(&hook.next_request().await, "bob-token");
    wait_metric(&node, "ringpost_push_sent_total", |n| n == 2.0).await;
    assert_eq!(
        wait_metric(&node, "ringpost_push_queued_total", |_| true).await,
        2.0,
        "five messages, two pushes"
    );
    assert!(hook.try_next_request().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_webhook_token_is_removed_on_410() {
    let mut hook = StandIn::plain().await;
    let secrets = tempfile::tempdir().unwrap();
    let node = webhook_node(&hook, &secrets);
    let (alice, _) = bob_offline_alice_online(&node, PushProvider::Webhook, "bob-token").await;
    hook.reply_next(Reply::status(410));
    send(&alice, 1).await;
    assert_webhook_call(&hook.next_request().await, "bob-token");
    wait_metric(&node, "ringpost_push_tokens_removed_total", |n| n == 1.0).await;
    // No token: the next message queues nothing that reaches a provider.
    send(&alice, 2).await;
    wait_metric(&node, "ringpost_push_dropped_total", |n| n == 1.0).await;
    assert!(hook.try_next_request().is_none());
    assert_eq!(
        wait_metric(&node, "ringpost_push_sent_total", |_| true).await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_survives_a_restart() {
    let mut hook = StandIn::plain().await;
    let secrets = tempfile::tempdir().unwrap();
    let mut node = webhook_node(&hook, &secrets);
    let (alice, _) = bob_offline_alice_online(&node, PushProvider::Webhook, "bob-token").await;
    // The call is in flight (its row written before it) when the node is killed.
    let _held = hook.hold_next();
    send(&alice, 1).await;
    assert_webhook_call(&hook.next_request().await, "bob-token");
    alice.close().await;
    tokio::task::block_in_place(|| node.restart()); // SIGKILL, then the same data directory
                                                    // Restored from disk and sent by the new process.
    assert_webhook_call(&hook.next_request().await, "bob-token");
    wait_metric(&node, "ringpost_push_sent_total", |n| n == 1.0).await;
    wait_metric(&node, "ringpost_push_queue_depth", |n| n == 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_over_http2_with_a_provider_token_and_a_dead_token_removed() {
    let mut apns = StandIn::tls_h2().await;
    let files = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key_file = files.path().join("AuthKey_KEY1234567.p8");
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let ca_file = files.path().join("apns-ca.pem");
    std::fs::write(&ca_file, apns.ca_pem.as_ref().unwrap()).unwrap();
    let (key_file, ca_file) = (
        key_file.to_string_lossy().to_string(),
        ca_file.to_string_lossy().to_string(),
    );
    let mut args = vec![
        "--push-apns-key-file",
        &key_file,
        "--push-apns-key-id",
        "KEY1234567",
        "--push-apns-team-id",
        "TEAM123456",
        "--push-apns-topic",
        "com.example.ringpost",
        "--push-apns-url",
        &apns.url,
        "--push-ca-file",
        &ca_file,
    ];
    args.extend(FAST_RETRY);
    let node = TestNode::start_with(&args);
    let token = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    let (alice, _) = bob_offline_alice_online(&node, PushProvider::Apns, token).await;
    send(&alice, 1).await;
    let call = apns.next_request().await;
    assert_eq!(call.version, hyper::Version::HTTP_2);
    assert_eq!(call.method, "POST");
    assert_eq!(call.path, format!("/3/device/{token}"));
    assert_eq!(call.header("apns-topic"), "com.example.ringpost");
    assert_eq!(call.header("apns-push-type"), "background");
    assert_eq!(call.header("apns-priority"), "5");
    assert_eq!(call.header("apns-collapse-id"), "ringpost-wake");
    assert_eq!(
        call.json(),
        serde_json::json!({"aps": {"content-available": 1}})
    );
    let jwt = call
        .header("authorization")
        .strip_prefix("bearer ")
        .unwrap();
    let (header, claims, input, sig) = decode_unverified(jwt).unwrap();
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], "KEY1234567");
    assert_eq!(claims["iss"], "TEAM123456");
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.public_key_raw())
        .verify(input.as_bytes(), &sig)
        .expect("the provider token is signed with the .p8 key");
    wait_metric(&node, "ringpost_push_sent_total", |n| n == 1.0).await;

    // The device uninstalled the app: 410 Unregistered removes the token.
    apns.reply_next(Reply::json(
        410,
        serde_json::json!({"reason": "Unregistered"}),
    ));
    send(&alice, 2).await;
    let call = apns.next_request().await;
    assert_eq!(
        call.header("authorization"),
        format!("bearer {jwt}"),
        "the provider token is reused"
    );
    wait_metric(&node, "ringpost_push_tokens_removed_total", |n| n == 1.0).await;
    send(&alice, 3).await;
    wait_metric(&node, "ringpost_push_dropped_total", |n| n == 1.0).await;
    assert!(apns.try_next_request().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_http_v1_with_oauth_and_unregistered_tokens_removed() {
    let mut fcm = StandIn::plain().await;
    let files = tempfile::tempdir().unwrap();
    let account = serde_json::json!({
        "type": "service_account",
        "project_id": "ringpost-test",
        "private_key_id": "k1",
        "private_key": FCM_KEY_PEM,
        "client_email": "push@ringpost-test.iam.gserviceaccount.com",
        "token_uri": format!("{}/token", fcm.url),
    });
    let account_file = files.path().join("service-account.json");
    std::fs::write(&account_file, account.to_string()).unwrap();
    let account_file = account_file.to_string_lossy().to_string();
    let mut args = vec![
        "--push-fcm-service-account-file",
        &account_file,
        "--push-fcm-url",
        &fcm.url,
    ];
    args.extend(FAST_RETRY);
    let node = TestNode::start_with(&args);
    let token = "fcm:APA91b-registration_token";
    let (alice, _) = bob_offline_alice_online(&node, PushProvider::Fcm, token).await;
    // First a transient 503, then accepted.
    fcm.reply_next(Reply::status(503));
    send(&alice, 1).await;

    let exchange = fcm.next_token_request().await;
    assert_eq!(exchange.method, "POST");
    let form = String::from_utf8(exchange.body.clone()).unwrap();
    let assertion = form
        .strip_prefix("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=")
        .expect("a JWT-bearer grant");
    let (header, claims, input, sig) = decode_unverified(assertion).unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(claims["iss"], "push@ringpost-test.iam.gserviceaccount.com");
    assert_eq!(
        claims["scope"],
        "https://www.googleapis.com/auth/firebase.messaging"
    );
    assert_eq!(claims["aud"], format!("{}/token", fcm.url));
    let der = rustls_pemfile::private_key(&mut FCM_KEY_PEM.as_bytes())
        .unwrap()
        .unwrap();
    let pair = ring::signature::RsaKeyPair::from_pkcs8(der.secret_der()).unwrap();
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, pair.public().as_ref())
        .verify(input.as_bytes(), &sig)
        .expect("the assertion is signed with the service account key");

    for _ in 0..2 {
        let call = fcm.next_request().await;
        assert_eq!(call.path, "/v1/projects/ringpost-test/messages:send");
        assert_eq!(
            call.header("authorization"),
            format!("Bearer {ACCESS_TOKEN}")
        );
        let body = call.json();
        assert_eq!(body["message"]["token"], token);
        assert_eq!(body["message"]["android"]["collapse_key"], "ringpost-wake");
        assert_eq!(body["message"]["android"]["priority"], "high");
    }
    wait_metric(&node, "ringpost_push_sent_total", |n| n == 1.0).await;

    // UNREGISTERED removes the token; the access token is cached (no second exchange).
    fcm.reply_next(Reply::json(
        404,
        serde_json::json!({"error": {"code": 404, "status": "NOT_FOUND", "details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}
        ]}}),
    ));
    send(&alice, 2).await;
    fcm.next_request().await;
    wait_metric(&node, "ringpost_push_tokens_removed_total", |n| n == 1.0).await;
    send(&alice, 3).await;
    wait_metric(&node, "ringpost_push_dropped_total", |n| n == 1.0).await;
    assert!(fcm.try_next_request().is_none());
    assert!(
        fcm.try_next_token_request().is_none(),
        "one token exchange for every call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_push_tokens_are_refused() {
    let hook = StandIn::plain().await;
    let secrets = tempfile::tempdir().unwrap();
    let node = webhook_node(&hook, &secrets);
    let (bob, _) = register(&node, BOB).await;
    for (provider, token) in [
        (PushProvider::Apns, "not/hex"),
        (PushProvider::Fcm, "with space"),
        (PushProvider::Webhook, &"x".repeat(4097)[..]),
    ] {
        let answer = bob
            .request(PushRegister {
                provider,
                token: token.into(),
            })
            .await;
        // The SDK refuses to encode the long one; the node refuses the others.
        let refused = answer.expect_err("a bad token is refused").to_string();
        assert!(
            token.len() > 4096 || refused.contains("invalid push token"),
            "{provider:?}: {refused}"
        );
    }
}

/// Push latency on loopback: 1000 offline devices, one message each, sent one after another
/// (each after the previous push arrived); for each, the time from the sender's `SendAck`
/// (after the inbox write, so a lower bound) and from before the `Send` (an upper bound) to
/// the webhook stand-in having the request. Prints p50/p99/max; asserts nothing about time.
///
/// `cargo test -p ringpost-node --test push -- --ignored --nocapture push_latency_on_loopback`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn push_latency_on_loopback() {
    use std::time::Instant;
    const DEVICES: u64 = 1000;
    let mut hook = StandIn::plain().await;
    let secrets = tempfile::tempdir().unwrap();
    // The sender's rate limit is not what this measures.
    let node = webhook_node_with(
        &hook,
        &secrets,
        &["--device-rate", "100000", "--device-burst", "100000"],
    );
    let first = 15_550_100_000u64;
    let registered = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for user in first..first + DEVICES {
        let permit = registered.clone().acquire_owned().await.unwrap();
        let (cfg, codes) = (config(&node), node.codes_file());
        tasks.spawn(async move {
            let (c, _) = dev::register_device(cfg, user, &codes).await.unwrap();
            push_register(&c, PushProvider::Webhook, &format!("token-{user}")).await;
            c.close().await;
            drop(permit);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let (alice, _) = register(&node, ALICE).await;
    wait_metric(&node, "ringpost_connections", |n| n == 1.0).await;
    let (mut from_ack, mut from_send) = (Vec::new(), Vec::new());
    for (n, user) in (first..first + DEVICES).enumerate() {
        let body = DeviceCiphertext {
            user,
            device: 1,
            body: Bytes::from_static(b"x"),
        };
        let before = Instant::now();
        let ack = alice
            .send(user, msg_id(n as u32), vec![body])
            .await
            .unwrap();
        let acked = Instant::now();
        assert_eq!(ack.status, SendStatus::Ok);
        let call = hook.next_request().await;
        assert_eq!(call.json()["user"], user);
        from_ack.push(call.received.saturating_duration_since(acked));
        from_send.push(call.received.saturating_duration_since(before));
    }
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
    };
    for (what, v) in [
        ("SendAck → provider", &mut from_ack),
        ("Send → provider", &mut from_send),
    ] {
        println!(
            "push latency {what}: p50 {:?} p99 {:?} max {:?} over {} pushes",
            pct(v, 0.50),
            pct(v, 0.99),
            pct(v, 1.0),
            v.len()
        );
    }
    let (_, metrics) = tokio::task::block_in_place(|| node.admin_get("/metrics"));
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("ringpost_push_latency_seconds"))
    {
        println!("{line}");
    }
}
