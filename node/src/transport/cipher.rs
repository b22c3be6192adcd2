//! The client listeners' keys (wss and QUIC): ring's AEAD, with keys that keep only their bytes.
//!
//! rustls' ring keys hold ring's expanded key: an AES-GCM key is about 560 bytes (the AES key
//! schedule and the GHASH table), a QUIC header protection key about 256. A connection holds
//! its keys for life: a TLS 1.3 connection after its handshake one sealing and one opening key
//! (`wss/records.rs`); a QUIC connection six (the 1-RTT pair, the pair of the next key update,
//! which quinn derives as soon as the handshake is done, and the header protection pair):
//! 1.1 and 2.9 KiB per idle connection (heaptrack, BENCHMARKS.md ninth and eleventh stops on
//! issue 22). These keys keep the bytes TLS derived (at most 32, and the 12-byte IV; wiped when
//! dropped) and expand them into ring's key for each record or packet they protect: about 100
//! bytes a key, for about 0.2 µs per record or packet (`cargo bench -p ringpost-node --bench
//! cipher`; BENCHMARKS.md eleventh stop on issue 22).
//!
//! [`provider`] is ring's rustls provider with these keys in its TLS 1.3 suites: the AEAD
//! (`Tls13AeadAlgorithm`) and the QUIC algorithm; key schedules, hashes, signatures and TLS 1.2
//! stay ring's. The protection is what rustls' ring provider does, on ring: TLS 1.3 records per
//! RFC 8446 §5.2 (nonce = IV xor sequence number, the record header as associated data, the
//! inner content type after the plaintext; rustls' code builds the nonce and header and strips
//! the padding), QUIC packets per RFC 9001 §5.3 (nonce = IV xor packet number, the header as
//! associated data) and §5.4 (header protection).

use std::sync::{Arc, OnceLock};

use ring::aead;
use rustls::crypto::cipher::{
    make_tls13_aad, AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter,
    MessageEncrypter, Nonce, OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload,
    Tls13AeadAlgorithm, UnsupportedOperationError,
};
use rustls::crypto::CryptoProvider;
use rustls::quic::{self, Tag};
use rustls::{
    CipherSuite, ConnectionTrafficSecrets, ContentType, Error, ProtocolVersion,
    SupportedCipherSuite, Tls13CipherSuite,
};
use zeroize::Zeroize;

/// The AEAD of one TLS 1.3 suite, for its records and its QUIC packets, producing
/// key-bytes-only keys.
pub struct Algorithm {
    packet: &'static aead::Algorithm,
    header: &'static aead::quic::Algorithm,
    /// RFC 9001 §6.6 and appendix B.
    confidentiality_limit: u64,
    integrity_limit: u64,
}

/// TLS_AES_128_GCM_SHA256.
pub static AES_128_GCM: Algorithm = Algorithm {
    packet: &aead::AES_128_GCM,
    header: &aead::quic::AES_128,
    confidentiality_limit: 1 << 23,
    integrity_limit: 1 << 52,
};

/// TLS_AES_256_GCM_SHA384.
pub static AES_256_GCM: Algorithm = Algorithm {
    packet: &aead::AES_256_GCM,
    header: &aead::quic::AES_256,
    confidentiality_limit: 1 << 23,
    integrity_limit: 1 << 52,
};

/// TLS_CHACHA20_POLY1305_SHA256.
pub static CHACHA20_POLY1305: Algorithm = Algorithm {
    packet: &aead::CHACHA20_POLY1305,
    header: &aead::quic::CHACHA20,
    confidentiality_limit: u64::MAX,
    integrity_limit: 1 << 36,
};

impl Algorithm {
    /// Ours for a TLS 1.3 suite, if it is one of ring's.
    pub fn for_suite(suite: CipherSuite) -> Option<&'static Algorithm> {
        match suite {
            CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(&AES_128_GCM),
            CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(&AES_256_GCM),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some(&CHACHA20_POLY1305),
            _ => None,
        }
    }
}

/// ring's rustls provider with these keys: its TLS 1.3 suites are ring's but for their AEAD
/// and QUIC algorithm, which are ours.
pub fn provider() -> Arc<CryptoProvider> {
    static SUITES: OnceLock<Vec<SupportedCipherSuite>> = OnceLock::new();
    let mut provider = rustls::crypto::ring::default_provider();
    let suites = SUITES.get_or_init(|| {
        provider
            .cipher_suites
            .iter()
            .map(|cs| match cs {
                SupportedCipherSuite::Tls13(s) => match Algorithm::for_suite(s.common.suite) {
                    Some(alg) if s.quic.is_some() => {
                        // Once per process (the `OnceLock`): suites are `'static` in rustls.
                        let ours: &'static Tls13CipherSuite =
                            Box::leak(Box::new(Tls13CipherSuite {
                                common: rustls::crypto::CipherSuiteCommon {
                                    suite: s.common.suite,
                                    hash_provider: s.common.hash_provider,
                                    confidentiality_limit: s.common.confidentiality_limit,
                                },
                                hkdf_provider: s.hkdf_provider,
                                aead_alg: alg,
                                quic: Some(alg),
                            }));
                        SupportedCipherSuite::Tls13(ours)
                    }
                    _ => *cs,
                },
                SupportedCipherSuite::Tls12(_) => *cs,
            })
            .collect()
    });
    provider.cipher_suites = suites.clone();
    Arc::new(provider)
}

/// Key bytes, wiped when dropped.
struct KeyBytes {
    bytes: [u8; 32],
    len: u8,
}

impl KeyBytes {
    fn new(key: &AeadKey) -> KeyBytes {
        let key = key.as_ref();
        let mut bytes = [0; 32];
        bytes[..key.len()].copy_from_slice(key);
        KeyBytes {
            bytes,
            len: key.len() as u8,
        }
    }

    fn get(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Drop for KeyBytes {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl quic::Algorithm for Algorithm {
    fn packet_key(&self, key: AeadKey, iv: Iv) -> Box<dyn quic::PacketKey> {
        Box::new(self.key(&key, iv))
    }

    fn header_protection_key(&self, key: AeadKey) -> Box<dyn quic::HeaderProtectionKey> {
        Box::new(HeaderProtectionKey {
            alg: self.header,
            key: KeyBytes::new(&key),
        })
    }

    fn aead_key_len(&self) -> usize {
        self.packet.key_len()
    }
}

impl Algorithm {
    /// The static of a packet algorithm (so a key holds one pointer for algorithm and limits).
    fn for_packet(packet: &'static aead::Algorithm) -> &'static Algorithm {
        [&AES_128_GCM, &AES_256_GCM, &CHACHA20_POLY1305]
            .into_iter()
            .find(|a| a.packet == packet)
            .expect("a packet algorithm of one of ours")
    }
}

impl Tls13AeadAlgorithm for Algorithm {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(self.key(&key, iv))
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(self.key(&key, iv))
    }

    fn key_len(&self) -> usize {
        self.packet.key_len()
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: Iv,
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        Ok(if self.packet == &aead::AES_128_GCM {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        } else if self.packet == &aead::AES_256_GCM {
            ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        } else {
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
        })
    }
}

impl MessageEncrypter for Key {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, Error> {
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        payload.extend_from_chunks(&msg.payload);
        payload.extend_from_slice(&msg.typ.to_array());
        self.expand()
            .seal_in_place_append_tag(
                self.nonce(seq),
                aead::Aad::from(make_tls13_aad(total_len)),
                &mut payload,
            )
            .map_err(|_| Error::EncryptError)?;
        // Every TLS 1.3 record is application data in TLS 1.2's clothes on the outside (§5.1).
        Ok(OutboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            payload,
        ))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + self.alg.packet.tag_len()
    }
}

impl MessageDecrypter for Key {
    fn decrypt<'a>(
        &mut self,
        mut msg: InboundOpaqueMessage<'a>,
        seq: u64,
    ) -> Result<InboundPlainMessage<'a>, Error> {
        let payload = &mut msg.payload;
        if payload.len() < self.alg.packet.tag_len() {
            return Err(Error::DecryptError);
        }
        let aad = aead::Aad::from(make_tls13_aad(payload.len()));
        let plain_len = self
            .expand()
            .open_in_place(self.nonce(seq), aad, payload)
            .map_err(|_| Error::DecryptError)?
            .len();
        payload.truncate(plain_len);
        msg.into_tls13_unpadded_message()
    }
}

/// One direction's key, for TLS 1.3 records or QUIC packets: the algorithm, the key's bytes
/// and the IV.
struct Key {
    alg: &'static Algorithm,
    key: KeyBytes,
    iv: Iv,
}

impl Algorithm {
    fn key(&self, key: &AeadKey, iv: Iv) -> Key {
        Key {
            alg: Algorithm::for_packet(self.packet),
            key: KeyBytes::new(key),
            iv,
        }
    }
}

impl Key {
    /// ring's key, expanded for one record or packet. The length is the algorithm's: TLS
    /// derived it by `key_len`/`aead_key_len`.
    fn expand(&self) -> aead::LessSafeKey {
        let unbound = aead::UnboundKey::new(self.alg.packet, self.key.get())
            .expect("a key of the algorithm's length");
        aead::LessSafeKey::new(unbound)
    }

    /// The nonce of record or packet number `n`: the IV xor `n`.
    fn nonce(&self, n: u64) -> aead::Nonce {
        aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, n).0)
    }
}

impl quic::PacketKey for Key {
    fn encrypt_in_place(
        &self,
        packet_number: u64,
        header: &[u8],
        payload: &mut [u8],
    ) -> Result<Tag, Error> {
        let tag = self
            .expand()
            .seal_in_place_separate_tag(self.nonce(packet_number), aead::Aad::from(header), payload)
            .map_err(|_| Error::EncryptError)?;
        Ok(Tag::from(tag.as_ref()))
    }

    fn decrypt_in_place<'a>(
        &self,
        packet_number: u64,
        header: &[u8],
        payload: &'a mut [u8],
    ) -> Result<&'a [u8], Error> {
        let plain = self
            .expand()
            .open_in_place(self.nonce(packet_number), aead::Aad::from(header), payload)
            .map_err(|_| Error::DecryptError)?;
        Ok(plain)
    }

    fn tag_len(&self) -> usize {
        self.alg.packet.tag_len()
    }

    fn confidentiality_limit(&self) -> u64 {
        self.alg.confidentiality_limit
    }

    fn integrity_limit(&self) -> u64 {
        self.alg.integrity_limit
    }
}

struct HeaderProtectionKey {
    alg: &'static aead::quic::Algorithm,
    key: KeyBytes,
}

impl HeaderProtectionKey {
    /// RFC 9001 §5.4.1: the mask's first byte masks the first byte's low 4 (long header) or 5
    /// (short header) bits, the rest the packet number, whose length is in the first byte's
    /// unmasked low two bits. Nothing changes on an error.
    fn xor_in_place(
        &self,
        sample: &[u8],
        first: &mut u8,
        packet_number: &mut [u8],
        unmasking: bool,
    ) -> Result<(), Error> {
        let key = aead::quic::HeaderProtectionKey::new(self.alg, self.key.get())
            .map_err(|_| Error::General("header protection key of a wrong length".into()))?;
        let mask = key
            .new_mask(sample)
            .map_err(|_| Error::General("sample of invalid length".into()))?;
        let (first_mask, pn_mask) = mask.split_first().expect("a 5-byte mask");
        if packet_number.len() > pn_mask.len() {
            return Err(Error::General("packet number too long".into()));
        }
        let bits = if *first & 0x80 != 0 { 0x0f } else { 0x1f };
        let plain_first = if unmasking {
            *first ^ (first_mask & bits)
        } else {
            *first
        };
        let pn_len = usize::from(plain_first & 0x03) + 1;
        *first ^= first_mask & bits;
        for (b, m) in packet_number.iter_mut().zip(pn_mask).take(pn_len) {
            *b ^= m;
        }
        Ok(())
    }
}

impl quic::HeaderProtectionKey for HeaderProtectionKey {
    fn encrypt_in_place(
        &self,
        sample: &[u8],
        first: &mut u8,
        packet_number: &mut [u8],
    ) -> Result<(), Error> {
        self.xor_in_place(sample, first, packet_number, false)
    }

    fn decrypt_in_place(
        &self,
        sample: &[u8],
        first: &mut u8,
        packet_number: &mut [u8],
    ) -> Result<(), Error> {
        self.xor_in_place(sample, first, packet_number, true)
    }

    fn sample_len(&self) -> usize {
        self.alg.sample_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::quic::{DirectionalKeys, Keys, Version};
    use rustls::Side;

    /// The QUIC side of `suite` in `provider`.
    fn suite_of(provider: &CryptoProvider, suite: CipherSuite) -> quic::Suite {
        provider
            .cipher_suites
            .iter()
            .find_map(|cs| match cs {
                SupportedCipherSuite::Tls13(s) if s.common.suite == suite => s.quic_suite(),
                _ => None,
            })
            .unwrap()
    }

    fn ring_suite(suite: CipherSuite) -> quic::Suite {
        suite_of(&rustls::crypto::ring::default_provider(), suite)
    }

    fn our_suite(suite: CipherSuite) -> quic::Suite {
        suite_of(&provider(), suite)
    }

    /// RFC 9001 appendix A.2: the client's Initial packet protection, byte for byte.
    #[test]
    fn the_rfc_9001_client_initial_is_protected_byte_for_byte() {
        let dcid = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];
        let keys =
            our_suite(CipherSuite::TLS13_AES_128_GCM_SHA256).keys(&dcid, Side::Client, Version::V1);
        // The header of appendix A.2 (packet number 2, 4-byte encoding), a PADDING-free
        // payload: the CRYPTO frame's first bytes, then zeros to the length the header gives.
        let header: Vec<u8> = hex("c300000001088394c8f03e5157080000449e00000002");
        let mut payload = hex(
            "060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868\
            04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578\
            616d706c652e636f6dff01000100000a00080006001d00170018001000070005\
            04616c706e000500050100000000003300260024001d00209370b2c9caa47fba\
            baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400\
            0d0010000e0403050306030203080408050806002d00020101001c0002400100\
            3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000\
            75300901100f088394c8f03e51570806048000ffff",
        );
        payload.resize(1162, 0);
        let mut packet = header.clone();
        packet.extend_from_slice(&payload);
        let (h, p) = packet.split_at_mut(header.len());
        let tag = keys.local.packet.encrypt_in_place(2, h, p).unwrap();
        packet.extend_from_slice(tag.as_ref());
        let pn_offset = 18;
        let (h, rest) = packet.split_at_mut(pn_offset + 4);
        let (first, pn) = h.split_at_mut(1);
        keys.local
            .header
            .encrypt_in_place(&rest[..16], &mut first[0], &mut pn[pn_offset - 1..])
            .unwrap();
        // Appendix A.2's protected packet begins and ends so.
        assert_eq!(
            packet[..34],
            hex("c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11d242")
        );
        assert_eq!(
            packet[packet.len() - 16..],
            hex("e221af44860018ab0856972e194cd934")
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Seals a packet of `plain` with `seal`, protects its header, then removes the protection
    /// and opens it with `open`; also checks a flipped bit is refused.
    fn round_trip(seal: &DirectionalKeys, open: &DirectionalKeys, pn: u64, first: u8) {
        let header = [first, 1, 2, 3, 4, 0, 0, 0, 9];
        let plain: Vec<u8> = (0..100u8).collect();
        let mut packet = header.to_vec();
        packet.extend_from_slice(&plain);
        let (h, p) = packet.split_at_mut(header.len());
        let tag = seal.packet.encrypt_in_place(pn, h, p).unwrap();
        packet.extend_from_slice(tag.as_ref());
        let sample = packet[9..25].to_vec();
        let (f, pn_bytes) = packet[..9].split_at_mut(1);
        seal.header
            .encrypt_in_place(&sample, &mut f[0], &mut pn_bytes[4..8])
            .unwrap();
        assert_ne!(&packet[..9], &header[..], "the header is protected");

        let mut tampered = packet.clone();
        let (f, pn_bytes) = packet[..9].split_at_mut(1);
        open.header
            .decrypt_in_place(&sample, &mut f[0], &mut pn_bytes[4..8])
            .unwrap();
        assert_eq!(&packet[..9], &header[..]);
        let (h, p) = packet.split_at_mut(9);
        assert_eq!(open.packet.decrypt_in_place(pn, h, p).unwrap(), &plain[..]);

        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let (f, pn_bytes) = tampered[..9].split_at_mut(1);
        open.header
            .decrypt_in_place(&sample, &mut f[0], &mut pn_bytes[4..8])
            .unwrap();
        let (h, p) = tampered.split_at_mut(9);
        assert!(open.packet.decrypt_in_place(pn, h, p).is_err());
    }

    /// Packets sealed by ring's keys open with ours and the other way round, for every suite,
    /// long and short headers; a flipped bit is refused.
    #[test]
    fn our_keys_and_rings_protect_the_same_packets() {
        for suite in [
            CipherSuite::TLS13_AES_128_GCM_SHA256,
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let cid = [7u8; 8];
            let ours: Keys = our_suite(suite).keys(&cid, Side::Client, Version::V1);
            let rings: Keys = ring_suite(suite).keys(&cid, Side::Server, Version::V1);
            for keys in [&ours.local, &ours.remote] {
                assert_eq!(keys.packet.tag_len(), rings.local.packet.tag_len());
                assert_eq!(
                    keys.packet.integrity_limit(),
                    rings.local.packet.integrity_limit()
                );
                assert_eq!(
                    keys.packet.confidentiality_limit(),
                    rings.local.packet.confidentiality_limit()
                );
            }
            for (pn, first) in [(0u64, 0x41), (77, 0xc3), (1 << 40, 0x43)] {
                round_trip(&ours.local, &rings.remote, pn, first);
                round_trip(&rings.local, &ours.remote, pn, first);
            }
        }
    }

    /// The TLS 1.3 AEAD of `suite` in `provider`.
    fn aead_of(provider: &CryptoProvider, suite: CipherSuite) -> &'static dyn Tls13AeadAlgorithm {
        provider
            .cipher_suites
            .iter()
            .find_map(|cs| match cs {
                SupportedCipherSuite::Tls13(s) if s.common.suite == suite => Some(s.aead_alg),
                _ => None,
            })
            .unwrap()
    }

    /// TLS 1.3 records sealed by our keys are byte for byte ring's, and each side opens the
    /// other's; a flipped bit is refused. (The suites with 32-byte keys: rustls builds a key
    /// of another length only from a key schedule; AES-128-GCM records are in the wss tests.)
    #[test]
    fn our_record_keys_seal_what_rings_do() {
        use rustls::crypto::cipher::OutboundChunks;
        let ring = rustls::crypto::ring::default_provider();
        let ours = provider();
        for suite in [
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let (key, iv) = ([0x5a; 32], [0xa5; 12]);
            let mut ring_sealer = aead_of(&ring, suite).encrypter(AeadKey::from(key), Iv::new(iv));
            let mut our_sealer = aead_of(&ours, suite).encrypter(AeadKey::from(key), Iv::new(iv));
            let mut ring_opener = aead_of(&ring, suite).decrypter(AeadKey::from(key), Iv::new(iv));
            let mut our_opener = aead_of(&ours, suite).decrypter(AeadKey::from(key), Iv::new(iv));
            assert_eq!(
                our_sealer.encrypted_payload_len(100),
                ring_sealer.encrypted_payload_len(100)
            );
            for (seq, len) in [(0u64, 0usize), (1, 100), (1 << 40, 16_384)] {
                let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let message = |payload| OutboundPlainMessage {
                    typ: ContentType::ApplicationData,
                    version: ProtocolVersion::TLSv1_2,
                    payload,
                };
                let theirs = ring_sealer
                    .encrypt(message(OutboundChunks::Single(&plain)), seq)
                    .unwrap()
                    .encode();
                let mine = our_sealer
                    .encrypt(message(OutboundChunks::Single(&plain)), seq)
                    .unwrap()
                    .encode();
                assert_eq!(mine, theirs, "{suite:?} record {seq}");
                for (sealed, opener) in [(&mine, &mut ring_opener), (&theirs, &mut our_opener)] {
                    let mut body = sealed[5..].to_vec();
                    let opened = opener
                        .decrypt(
                            InboundOpaqueMessage::new(
                                ContentType::ApplicationData,
                                ProtocolVersion::TLSv1_2,
                                &mut body,
                            ),
                            seq,
                        )
                        .unwrap();
                    assert_eq!(opened.typ, ContentType::ApplicationData);
                    assert_eq!(opened.payload, &plain[..]);
                }
                let mut tampered = mine[5..].to_vec();
                tampered[0] ^= 1;
                assert!(our_opener
                    .decrypt(
                        InboundOpaqueMessage::new(
                            ContentType::ApplicationData,
                            ProtocolVersion::TLSv1_2,
                            &mut tampered,
                        ),
                        seq,
                    )
                    .is_err());
            }
        }
    }

    #[test]
    fn a_key_is_small() {
        assert!(size_of::<Key>() <= 64, "{}", size_of::<Key>());
        assert!(size_of::<HeaderProtectionKey>() <= 48);
    }
}
