//! Certificates and rustls configurations for `wss://` and QUIC.
//!
//! `dev` generates a throwaway CA and a `localhost` certificate signed by it on first start
//! (`DATA_DIR/tls/`), so clients can trust the CA file instead of disabling verification.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN of the client protocol over QUIC.
pub const ALPN_CLIENT: &[u8] = b"ringpost/1";

/// Paths of a certificate chain and its key (PEM).
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signed `cert`, for clients to trust (dev only).
    pub ca: Option<PathBuf>,
}

/// The rustls crypto provider every TLS configuration in the node uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Returns the dev certificate under `dir`, generating a CA and a certificate for localhost,
/// 127.0.0.1 and ::1 if they do not exist yet.
pub fn dev_certificate(dir: &Path) -> Result<CertPaths> {
    let paths = CertPaths {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        ca: Some(dir.join("ca.pem")),
    };
    if paths.cert.exists() && paths.key.exists() {
        return Ok(paths);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Ringpost dev CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Ringpost dev node");
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;

    write_private(&paths.key, key.serialize_pem().as_bytes())?;
    std::fs::write(&paths.cert, cert.pem())?;
    if let Some(ca) = &paths.ca {
        std::fs::write(ca, ca_cert.pem())?;
    }
    Ok(paths)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

/// Loads a PEM certificate chain and private key.
pub fn load(paths: &CertPaths) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let cert_pem = std::fs::read(&paths.cert)
        .with_context(|| format!("reading certificate {}", paths.cert.display()))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", paths.cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "no certificate in {}",
        paths.cert.display()
    );
    let key_pem = std::fs::read(&paths.key)
        .with_context(|| format!("reading key {}", paths.key.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("parsing {}", paths.key.display()))?
        .with_context(|| format!("no private key in {}", paths.key.display()))?;
    Ok((certs, key))
}

/// A TLS server configuration for the given ALPN protocols (none for WebSocket over TLS).
pub fn server_config(
    paths: &CertPaths,
    alpn: &[&[u8]],
    tls13_only: bool,
) -> Result<rustls::ServerConfig> {
    let (certs, key) = load(paths)?;
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certificate_is_generated_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let a = dev_certificate(dir.path()).unwrap();
        let first = std::fs::read(&a.cert).unwrap();
        let b = dev_certificate(dir.path()).unwrap();
        assert_eq!(
            first,
            std::fs::read(&b.cert).unwrap(),
            "reused, not regenerated"
        );
        server_config(&a, &[ALPN_CLIENT], true).unwrap();
        server_config(&a, &[], false).unwrap();
    }
}
