//! Prekey upload verification: the Ed25519 checks the node makes before it stores an upload
//! (`keys::verify`), for a full upload (the signed prekey and 100 one-time prekeys, 101
//! signatures) and for one signature. No storage: only the CPU an upload costs the node.
//!
//! `cargo bench -p ringpost-node --bench prekeys`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringpost_client::prekeys::DeviceKeys;
use ringpost_node::keys::verify;
use ringpost_wire::limits::PREKEYS_PER_UPLOAD_MAX;

fn verification(c: &mut Criterion) {
    let keys = DeviceKeys::from_seed([1; 32]);
    let full = keys.upload(Some(1), 0..PREKEYS_PER_UPLOAD_MAX as u32);
    let one = keys.upload(Some(1), 0..0);
    let mut group = c.benchmark_group("prekey_verify");
    group.throughput(Throughput::Elements(1 + PREKEYS_PER_UPLOAD_MAX as u64));
    group.bench_function("full_upload_101_signatures", |b| {
        b.iter(|| verify::upload(std::hint::black_box(&full)).expect("verifies"))
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_signature", |b| {
        b.iter(|| verify::upload(std::hint::black_box(&one)).expect("verifies"))
    });
    group.finish();
}

criterion_group!(benches, verification);
criterion_main!(benches);
