//! QUIC packet protection per packet: the node's keys (`transport::quic::keys`, which keep
//! only their bytes and expand ring's key for each packet) against rustls' ring keys (which
//! keep ring's expanded key). Seal = AEAD seal + header protection, as quinn sends a packet;
//! open = header protection removed + AEAD open, as it receives one. A 64-byte payload (a
//! ping, an ack, a receipt) and a 1,200-byte one (a full datagram).
//!
//! `cargo bench -p ringpost-node --bench quic_keys`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringpost_node::transport::quic::keys;
use rustls::quic::{DirectionalKeys, Keys, Suite, Version};
use rustls::{CipherSuite, Side, SupportedCipherSuite};

fn suite(provider: &rustls::crypto::CryptoProvider) -> Suite {
    provider
        .cipher_suites
        .iter()
        .find_map(|cs| match cs {
            SupportedCipherSuite::Tls13(s)
                if s.common.suite == CipherSuite::TLS13_AES_128_GCM_SHA256 =>
            {
                s.quic_suite()
            }
            _ => None,
        })
        .expect("AES-128-GCM")
}

const HEADER: usize = 9;

/// Seals `packet` (header, payload, room for the tag) as packet `pn` and protects its header.
fn seal(keys: &DirectionalKeys, pn: u64, packet: &mut [u8]) {
    let tag_at = packet.len() - 16;
    let (header, rest) = packet.split_at_mut(HEADER);
    let tag = keys
        .packet
        .encrypt_in_place(pn, header, &mut rest[..tag_at - HEADER])
        .expect("sealed");
    rest[tag_at - HEADER..].copy_from_slice(tag.as_ref());
    let (header, rest) = packet.split_at_mut(HEADER);
    let (first, pn_bytes) = header.split_at_mut(1);
    keys.header
        .encrypt_in_place(&rest[..16], &mut first[0], &mut pn_bytes[4..8])
        .expect("protected");
}

/// Removes the header protection and opens the packet.
fn open(keys: &DirectionalKeys, pn: u64, packet: &mut [u8]) {
    let (header, rest) = packet.split_at_mut(HEADER);
    let (first, pn_bytes) = header.split_at_mut(1);
    keys.header
        .decrypt_in_place(&rest[..16], &mut first[0], &mut pn_bytes[4..8])
        .expect("unprotected");
    let (header, rest) = packet.split_at_mut(HEADER);
    keys.packet
        .decrypt_in_place(pn, header, rest)
        .expect("opened");
}

fn protection(c: &mut Criterion) {
    let ours = suite(&keys::provider());
    let rings = suite(&rustls::crypto::ring::default_provider());
    let mut group = c.benchmark_group("quic_packet");
    for payload in [64usize, 1200] {
        group.throughput(Throughput::Elements(1));
        for (name, suite) in [("ours", &ours), ("ring", &rings)] {
            let sender: Keys = suite.keys(&[7; 8], Side::Server, Version::V1);
            let receiver: Keys = suite.keys(&[7; 8], Side::Client, Version::V1);
            let mut packet = vec![0x41u8; HEADER + payload + 16];
            group.bench_with_input(
                BenchmarkId::new(format!("seal_{name}"), payload),
                &(),
                |b, _| b.iter(|| seal(&sender.local, 5, std::hint::black_box(&mut packet))),
            );
            let mut sealed = vec![0x41u8; HEADER + payload + 16];
            seal(&sender.local, 5, &mut sealed);
            group.bench_with_input(
                BenchmarkId::new(format!("open_{name}"), payload),
                &(),
                |b, _| {
                    b.iter_batched_ref(
                        || sealed.clone(),
                        |p| open(&receiver.remote, 5, p),
                        criterion::BatchSize::SmallInput,
                    )
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, protection);
criterion_main!(benches);
