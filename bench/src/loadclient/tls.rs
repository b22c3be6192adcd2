//! TLS configurations for `wss://` and QUIC: trust the CA file given (the dev node writes one to
//! `DATA_DIR/tls/ca.pem`). Built once per run and shared by every connection through an `Arc`,
//! so a connection costs a TLS session, not a parsed root store.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// ALPN of the client protocol over QUIC (docs/protocol.md).
pub const ALPN_QUIC: &[u8] = b"ringpost/1";

/// Largest CA file read, in bytes.
pub const CA_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// The rustls client configuration trusting the certificates in `ca_file`. `quic` selects TLS
/// 1.3 only and the `ringpost/1` ALPN.
pub fn client_config(ca_file: &Path, quic: bool) -> Result<Arc<rustls::ClientConfig>> {
    let len = std::fs::metadata(ca_file)
        .with_context(|| format!("CA file {}", ca_file.display()))?
        .len();
    if len > CA_FILE_BYTES_MAX {
        bail!(
            "CA file {} is larger than {CA_FILE_BYTES_MAX} bytes",
            ca_file.display()
        );
    }
    let pem = std::fs::read(ca_file).with_context(|| format!("CA file {}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("CA file {}", ca_file.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("CA file {}", ca_file.display()))?;
    }
    if roots.is_empty() {
        bail!("CA file {} holds no PEM certificate", ca_file.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider);
    let builder = if quic {
        builder.with_protocol_versions(&[&rustls::version::TLS13])?
    } else {
        builder.with_safe_default_protocol_versions()?
    };
    let mut config = builder.with_root_certificates(roots).with_no_client_auth();
    if quic {
        config.alpn_protocols = vec![ALPN_QUIC.to_vec()];
    }
    Ok(Arc::new(config))
}
