//! `peer`: a cluster node's peer port (UDP, QUIC with ALPN `ringpost-peer/2`) abused from
//! outside the cluster: junk datagrams (random bytes, and long-header packets that look like
//! QUIC Initials), and QUIC dials that finish the handshake and then either say nothing or send
//! a hello with a wrong proof. The node must drop the junk, close silent dials at its handshake
//! deadline, refuse dials past its per-source bound, and close wrong proofs at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::Rng;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::{junk, until_stopped, AttackSpec, Pace, Tally};

/// Junk datagrams per second at a peer port, at most.
pub const PEER_DATAGRAMS_PER_S_MAX: u32 = 2_000;

/// Concurrent unauthenticated dialers per source address (the node allows 8 handshakes per
/// source at once, so some are refused).
pub const PEER_DIALERS_PER_SOURCE: usize = 12;

/// Source addresses the dialers use (the junk uses all).
const DIAL_SOURCES: usize = 2;

/// ALPN of the peer protocol.
const PEER_ALPN: &[u8] = b"ringpost-peer/2";

/// Bytes of a hello's proof: an HMAC (32) and an Ed25519 signature (64).
const PROOF_BYTES: usize = 96;

/// Longest a dial is held before it is dropped by us.
const DIAL_HOLD_MAX: Duration = Duration::from_secs(20);

pub(super) async fn run(spec: Arc<AttackSpec>, tally: Tally) -> Result<()> {
    let target = spec.peer_addr.context("this run has no peer port")?;
    let client_config = quic_client_config()?;
    let mut tasks = tokio::task::JoinSet::new();
    for (s, source) in spec.sources.iter().take(DIAL_SOURCES).enumerate() {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::from((*source, 0)))
            .with_context(|| format!("a QUIC endpoint on {source}"))?;
        endpoint.set_default_client_config(client_config.clone());
        for d in 0..PEER_DIALERS_PER_SOURCE {
            let (spec, tally, endpoint) = (spec.clone(), tally.clone(), endpoint.clone());
            tasks.spawn(async move {
                let mut rng = crate::seeded(spec.seed, &format!("attack-peer-dial-{s}-{d}"));
                tokio::select! {
                    _ = dial_loop(&endpoint, target, &mut rng, &tally) => {}
                    _ = until_stopped(&spec) => {}
                }
                endpoint.close(0u32.into(), b"");
            });
        }
    }
    let junk_task = {
        let (spec, tally) = (spec.clone(), tally.clone());
        tokio::spawn(async move { junk_loop(&spec, target, &tally).await })
    };
    while tasks.join_next().await.is_some() {}
    junk_task.await.context("the junk task")??;
    Ok(())
}

async fn dial_loop(
    endpoint: &quinn::Endpoint,
    target: SocketAddr,
    rng: &mut rand_chacha::ChaCha8Rng,
    tally: &Tally,
) {
    loop {
        let started = tokio::time::Instant::now();
        let connecting = match endpoint.connect(target, "ringpost-peer") {
            Ok(c) => c,
            Err(_) => {
                tally.add("dials that could not start", 1);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let conn = match tokio::time::timeout(Duration::from_secs(5), connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(_)) => {
                tally.add("dials refused in the handshake", 1);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => {
                tally.add("dials unanswered", 1);
                continue;
            }
        };
        let wrong_proof = rng.gen_bool(0.5);
        if wrong_proof {
            // node_id | cluster_id len | cluster_id | mac | signature, both random.
            let mut hello = rng.gen_range(1u64..4).to_be_bytes().to_vec();
            let cluster = b"chaos";
            hello.push(cluster.len() as u8);
            hello.extend_from_slice(cluster);
            hello.extend_from_slice(&junk(rng, PROOF_BYTES)[..]);
            hello.resize(8 + 1 + cluster.len() + PROOF_BYTES, 0);
            if let Ok((mut send, _recv)) = conn.open_bi().await {
                let _ = send.write_all(&hello).await;
            }
        }
        let closed = tokio::time::timeout(DIAL_HOLD_MAX, conn.closed()).await;
        let held = started.elapsed().as_millis() as u64;
        let kind = if wrong_proof {
            "wrong-proof dials"
        } else {
            "silent dials"
        };
        match closed {
            Ok(_) => {
                tally.add(&format!("{kind} closed by the node"), 1);
                tally.max(&format!("{kind}: longest held (ms)"), held);
            }
            Err(_) => tally.add(&format!("{kind} still open after 20 s"), 1),
        }
    }
}

async fn junk_loop(spec: &AttackSpec, target: SocketAddr, tally: &Tally) -> Result<()> {
    let mut sockets = Vec::new();
    for source in &spec.sources {
        let socket = tokio::net::UdpSocket::bind(SocketAddr::from((*source, 0)))
            .await
            .with_context(|| format!("binding {source}"))?;
        sockets.push(socket);
    }
    let mut rng = crate::seeded(spec.seed, "attack-peer-junk");
    let mut pace = Pace::new(PEER_DATAGRAMS_PER_S_MAX);
    while !spec.stopped() {
        let socket = &sockets[rng.gen_range(0..sockets.len())];
        let mut datagram = junk(&mut rng, 1_400).to_vec();
        if rng.gen_bool(0.3) {
            // Long header, Initial, QUIC version 1, random ids and payload, padded to the
            // 1200 bytes a client Initial must have.
            datagram.resize(datagram.len().max(1_200), 0);
            datagram[0] = 0xc0 | (datagram[0] & 0x0f);
            datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
            datagram[5] = 8;
            tally.add("quic-looking datagrams", 1);
        } else {
            tally.add("random datagrams", 1);
        }
        if socket.send_to(&datagram, target).await.is_err() {
            tally.add("datagram send errors", 1);
        }
        pace.tick().await;
    }
    Ok(())
}

/// A QUIC client configuration for the peer ALPN that accepts any certificate (as the nodes'
/// own dialers do; they authenticate by a proof inside the session, which we cannot make).
fn quic_client_config() -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyServerCert(provider.signature_verification_algorithms));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(tls)))
}

/// Any server certificate, the handshake signature still checked.
#[derive(Debug)]
struct AnyServerCert(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
