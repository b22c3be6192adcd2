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

/// Names every dev certificate covers.
const DEV_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A dev CA and a node certificate signed by it, in `dir` (generated on first use, reused
/// after). The certificate names localhost, 127.0.0.1, ::1 and `extra_names` (host names or IP
/// addresses: `dev --tls-name`, and the addresses the node listens on); when a later start asks
/// for names the certificate lacks, it is issued again, by the same CA when its key is there.
pub fn dev_certificate(dir: &Path, extra_names: &[String]) -> Result<CertPaths> {
    let paths = CertPaths {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        ca: Some(dir.join("ca.pem")),
    };
    let names_file = dir.join("names.txt");
    let mut names: Vec<String> = DEV_NAMES.iter().map(|n| n.to_string()).collect();
    for n in extra_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let issued: Vec<String> = match std::fs::read_to_string(&names_file) {
        Ok(text) => text.lines().map(str::to_string).collect(),
        // Written before names were recorded: it covers the defaults.
        Err(_) => DEV_NAMES.iter().map(|n| n.to_string()).collect(),
    };
    let covered = names.iter().all(|n| issued.contains(n));
    if paths.cert.exists() && paths.key.exists() && covered {
        return Ok(paths);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key_path = dir.join("ca-key.pem");
    let ca_pem = paths
        .ca
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok());
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).ok();
    let (ca_cert, ca_key) = match (ca_pem, ca_key_pem) {
        (Some(_), Some(key_pem)) => {
            // Reissue under the CA clients already trust.
            let ca_key = rcgen::KeyPair::from_pem(&key_pem)?;
            let ca_cert = dev_ca_params()?.self_signed(&ca_key)?;
            (ca_cert, ca_key)
        }
        _ => {
            let ca_key = rcgen::KeyPair::generate()?;
            let ca_cert = dev_ca_params()?.self_signed(&ca_key)?;
            write_private(&ca_key_path, ca_key.serialize_pem().as_bytes())?;
            if let Some(ca) = &paths.ca {
                std::fs::write(ca, ca_cert.pem())?;
            }
            (ca_cert, ca_key)
        }
    };
    let mut all = issued;
    for n in names {
        if !all.contains(&n) {
            all.push(n);
        }
    }
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(all.clone())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Ringpost dev node");
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    write_private(&paths.key, key.serialize_pem().as_bytes())?;
    std::fs::write(&paths.cert, cert.pem())?;
    std::fs::write(&names_file, all.join("\n"))?;
    Ok(paths)
}

fn dev_ca_params() -> Result<rcgen::CertificateParams> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Ringpost dev CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    Ok(ca_params)
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
    server_config_with(paths, alpn, tls13_only, provider())
}

/// [`server_config`] over a given crypto provider.
pub fn server_config_with(
    paths: &CertPaths,
    alpn: &[&[u8]],
    tls13_only: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::ServerConfig> {
    let (certs, key) = load(paths)?;
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
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
        let a = dev_certificate(dir.path(), &[]).unwrap();
        let first = std::fs::read(&a.cert).unwrap();
        let b = dev_certificate(dir.path(), &["127.0.0.1".into()]).unwrap();
        assert_eq!(
            first,
            std::fs::read(&b.cert).unwrap(),
            "reused, not regenerated"
        );
        server_config(&a, &[ALPN_CLIENT], true).unwrap();
        server_config(&a, &[], false).unwrap();
    }

    /// Whether `cert` verifies for `name` against `ca`.
    fn verifies(paths: &CertPaths, name: &str) -> bool {
        use rustls::client::danger::ServerCertVerifier;
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(paths.ca.as_ref().unwrap()).unwrap();
        for c in rustls_pemfile::certs(&mut &ca[..]) {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder(std::sync::Arc::new(roots))
            .build()
            .unwrap();
        let pem = std::fs::read(&paths.cert).unwrap();
        let cert = rustls_pemfile::certs(&mut &pem[..])
            .next()
            .unwrap()
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        verifier
            .verify_server_cert(&cert, &[], &name, &[], rustls::pki_types::UnixTime::now())
            .is_ok()
    }

    #[test]
    fn a_dev_certificate_names_what_it_is_asked_to_and_keeps_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        let a = dev_certificate(dir.path(), &[]).unwrap();
        let ca = std::fs::read(a.ca.as_ref().unwrap()).unwrap();
        assert!(verifies(&a, "localhost"));
        assert!(!verifies(&a, "198.18.0.2"));
        let b = dev_certificate(dir.path(), &["198.18.0.2".into(), "node-a.test".into()]).unwrap();
        assert!(verifies(&b, "198.18.0.2"));
        assert!(verifies(&b, "node-a.test"));
        assert!(verifies(&b, "127.0.0.1"), "the defaults stay");
        assert_eq!(
            ca,
            std::fs::read(b.ca.as_ref().unwrap()).unwrap(),
            "same CA"
        );
        // Names issued once stay covered.
        let c = dev_certificate(dir.path(), &["node-b.test".into()]).unwrap();
        assert!(verifies(&c, "198.18.0.2") && verifies(&c, "node-b.test"));
    }
}
