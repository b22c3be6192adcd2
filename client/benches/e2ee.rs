//! End-to-end encryption cost per message, on the SDK's own state machine (no network, no
//! store writes): Olm encrypt + decrypt of one 1:1 message on an established session, Megolm
//! encrypt + decrypt of one group message, and the bytes each ciphertext adds to a 100-byte
//! plaintext (printed before the timings).
//!
//! `cargo bench -p ringpost-client --bench e2ee`

use std::collections::BTreeSet;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringpost_client::crypto::envelope::Envelope;
use ringpost_client::crypto::{prekeys, Machine, RotationPolicy};
use ringpost_client::wire::DeviceBundle;

const PLAINTEXT_BYTES: usize = 100;

/// Alice (1/1) with an outbound session to Bob (2/1), started from a one-time key.
fn pair() -> (Machine, Machine) {
    let mut alice = Machine::new(1, 1);
    let mut bob = Machine::new(2, 1);
    let upload = bob.prekey_upload(1);
    bob.mark_published();
    let bundle = DeviceBundle {
        device: 1,
        identity_key: upload.identity_key.clone(),
        signed_prekey: upload.signed_prekey.clone(),
        one_time: upload.one_time.first().cloned(),
    };
    let verified = prekeys::verify_bundle(2, &bundle).expect("bundle verifies");
    alice.start_session(2, &verified).expect("session");
    (alice, bob)
}

fn overheads() {
    let text = Envelope::App(Bytes::from(vec![b'x'; PLAINTEXT_BYTES]));
    let (mut alice, mut bob) = pair();
    let prekey = alice.encrypt(2, 1, &text).expect("encrypt");
    bob.decrypt(1, 1, &prekey).expect("decrypt");
    let reply = bob.encrypt(1, 1, &text).expect("encrypt");
    alice.decrypt(2, 1, &reply).expect("decrypt");
    let normal = alice.encrypt(2, 1, &text).expect("encrypt");
    let group = [1; 16];
    let members: BTreeSet<u64> = [1, 2].into();
    alice.prepare_outbound(group, &members, 0, RotationPolicy::default());
    let megolm = alice
        .group_encrypt(&group, &[b'x'; PLAINTEXT_BYTES])
        .expect("group encrypt");
    let Some(Envelope::GroupKey { session_key, .. }) = alice.group_key_envelope(group) else {
        unreachable!()
    };
    println!(
        "overhead for a {PLAINTEXT_BYTES}-byte plaintext: Olm pre-key {} B, Olm normal {} B, \
         Megolm {} B; a group key share (Olm normal) is {} B",
        prekey.len() - PLAINTEXT_BYTES,
        normal.len() - PLAINTEXT_BYTES,
        megolm.len() - PLAINTEXT_BYTES,
        alice
            .encrypt(2, 1, &Envelope::GroupKey { group, session_key })
            .expect("encrypt")
            .len(),
    );
}

fn olm(c: &mut Criterion) {
    overheads();
    let text = Envelope::App(Bytes::from(vec![b'x'; PLAINTEXT_BYTES]));
    let (mut alice, mut bob) = pair();
    // Establish both ways, so the measured messages are normal ones.
    let first = alice.encrypt(2, 1, &text).expect("encrypt");
    bob.decrypt(1, 1, &first).expect("decrypt");
    let reply = bob.encrypt(1, 1, &text).expect("encrypt");
    alice.decrypt(2, 1, &reply).expect("decrypt");
    let mut group = c.benchmark_group("e2ee");
    group.throughput(Throughput::Elements(1));
    group.bench_function("olm_encrypt_decrypt_100B", |b| {
        b.iter(|| {
            let body = alice.encrypt(2, 1, &text).expect("encrypt");
            bob.decrypt(1, 1, &body).expect("decrypt")
        })
    });
    let id = [1; 16];
    let members: BTreeSet<u64> = [1, 2].into();
    let policy = RotationPolicy {
        messages_max: u32::MAX,
        age_ms_max: u64::MAX,
    };
    alice.prepare_outbound(id, &members, 0, policy);
    let Some(Envelope::GroupKey { session_key, .. }) = alice.group_key_envelope(id) else {
        unreachable!()
    };
    bob.add_inbound(id, 1, 1, &session_key).expect("inbound");
    let plain = [b'x'; PLAINTEXT_BYTES];
    group.bench_function("megolm_encrypt_decrypt_100B", |b| {
        b.iter(|| {
            let body = alice.group_encrypt(&id, &plain).expect("encrypt");
            bob.group_decrypt(id, 1, 1, &body).expect("decrypt")
        })
    });
    group.finish();
}

criterion_group!(benches, olm);
criterion_main!(benches);
