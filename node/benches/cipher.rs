//! Protection per QUIC packet and per TLS 1.3 record: the node's keys
//! (`transport::cipher`, which keep only their bytes and expand ring's key for each packet or
//! record) against rustls' ring keys (which keep ring's expanded key). QUIC: seal = AEAD seal +
//! header protection, as quinn sends a packet; open = header protection removed + AEAD open,
//! as it receives one; a 64-byte payload (a ping, an ack, a receipt) and a 1,200-byte one (a
//! full datagram). TLS: sealing a 64-byte and a 16 KiB (full) record.
//!
//! `cargo bench -p ringpost-node --bench cipher`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringpost_node::transport::cipher;
use rustls::quic::{DirectionalKeys, Keys, Suite, Version};
use rustls::{CipherSuite, Side, SupportedCipherSuite};

/// `provider`'s TLS 1.3 suite `suite`.
fn tls13(
    provider: &rustls::crypto::CryptoProvider,
    suite: CipherSuite,
) -> &'static rustls::Tls13CipherSuite {
    provider
        .cipher_suites
        .iter()
        .find_map(|cs| match cs {
            SupportedCipherSuite::Tls13(s) if s.common.suite == suite => Some(*s),
            _ => None,
        })
        .expect("the suite")
}

fn suite(provider: &rustls::crypto::CryptoProvider) -> Suite {
    tls13(provider, CipherSuite::TLS13_AES_128_GCM_SHA256)
        .quic_suite()
        .expect("QUIC")
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
    let ours = suite(&cipher::provider());
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

fn records(c: &mut Criterion) {
    use rustls::crypto::cipher::{AeadKey, Iv, OutboundChunks, OutboundPlainMessage};
    use rustls::{ContentType, ProtocolVersion};
    let aead = |provider: &rustls::crypto::CryptoProvider| {
        tls13(provider, CipherSuite::TLS13_AES_256_GCM_SHA384).aead_alg
    };
    let ours = aead(&cipher::provider());
    let rings = aead(&rustls::crypto::ring::default_provider());
    let mut group = c.benchmark_group("tls_record");
    group.throughput(Throughput::Elements(1));
    for len in [64usize, 16_384] {
        let plain = vec![7u8; len];
        for (name, alg) in [("ours", ours), ("ring", rings)] {
            let mut sealer = alg.encrypter(AeadKey::from([9; 32]), Iv::new([3; 12]));
            let mut seq = 0;
            group.bench_with_input(
                BenchmarkId::new(format!("seal_{name}"), len),
                &(),
                |b, _| {
                    b.iter(|| {
                        seq += 1;
                        let msg = OutboundPlainMessage {
                            typ: ContentType::ApplicationData,
                            version: ProtocolVersion::TLSv1_2,
                            payload: OutboundChunks::Single(&plain),
                        };
                        sealer.encrypt(msg, seq).expect("sealed")
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, protection, records);
criterion_main!(benches);
