//! TLS for `wss://` and QUIC: rustls with the ring provider, trusting either a CA file (the dev
//! node writes one to `DATA_DIR/tls/ca.pem`) or the platform's roots.
//!
//! Building a rustls configuration parses every trusted certificate, which is far more work than
//! a handshake; the load generator opens tens of thousands of connections, so configurations are
//! cached process-wide ([`TLS_CONFIGS_CACHED_MAX`]) and shared through an `Arc`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::error::{ClientError, Result};

/// ALPN of the client protocol over QUIC.
pub const ALPN_QUIC: &[u8] = b"ringpost/1";

/// Largest CA file read, in bytes: a bundle of a few hundred roots fits.
pub const CA_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Distinct TLS configurations kept (per CA file and transport). Each holds its parsed roots
/// (about 100 KiB for a platform bundle) and rustls' session cache (256 sessions); a process uses
/// one or two.
pub const TLS_CONFIGS_CACHED_MAX: usize = 8;

/// What a client trusts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsOptions {
    /// Trust only the certificates in this PEM file (e.g. the dev node's `tls/ca.pem`); `None`
    /// trusts the platform's roots.
    pub ca_file: Option<PathBuf>,
}

impl TlsOptions {
    /// Trust only the CA certificates in `path`.
    pub fn ca_file(path: impl Into<PathBuf>) -> Self {
        TlsOptions {
            ca_file: Some(path.into()),
        }
    }
}

/// Which transport a configuration is for: QUIC needs TLS 1.3 and the ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum TlsUse {
    WebSocket,
    Quic,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CacheKey {
    options: TlsOptions,
    /// The CA file's modification time and length: a regenerated CA is picked up.
    stamp: Option<(SystemTime, u64)>,
    usage: TlsUse,
}

/// Most recently used last.
static CACHE: Mutex<Vec<(CacheKey, Arc<rustls::ClientConfig>)>> = Mutex::new(Vec::new());

/// The rustls configuration for `options` and `usage`, from the cache when it is there.
pub(crate) fn client_config(
    options: &TlsOptions,
    usage: TlsUse,
) -> Result<Arc<rustls::ClientConfig>> {
    let stamp = match &options.ca_file {
        Some(path) => {
            let meta = std::fs::metadata(path).map_err(|e| ca_error(path, e))?;
            Some((
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            ))
        }
        None => None,
    };
    let key = CacheKey {
        options: options.clone(),
        stamp,
        usage,
    };
    {
        let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = cache.iter().position(|(k, _)| *k == key) {
            let entry = cache.remove(i);
            let config = entry.1.clone();
            cache.push(entry);
            return Ok(config);
        }
    }
    // Built outside the lock: reading a platform bundle takes milliseconds.
    let config = Arc::new(build(options, usage)?);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= TLS_CONFIGS_CACHED_MAX {
        cache.remove(0);
    }
    cache.push((key, config.clone()));
    Ok(config)
}

fn build(options: &TlsOptions, usage: TlsUse) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match &options.ca_file {
        Some(path) => {
            for cert in read_ca_file(path)? {
                roots
                    .add(cert)
                    .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(ClientError::Tls(format!(
                    "no trusted root certificates found on this platform ({} errors); \
                     give a CA file",
                    native.errors.len()
                )));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider);
    let builder = match usage {
        TlsUse::WebSocket => builder.with_safe_default_protocol_versions(),
        TlsUse::Quic => builder.with_protocol_versions(&[&rustls::version::TLS13]),
    }
    .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut config = builder.with_root_certificates(roots).with_no_client_auth();
    if usage == TlsUse::Quic {
        config.alpn_protocols = vec![ALPN_QUIC.to_vec()];
    }
    Ok(config)
}

fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let len = std::fs::metadata(path)
        .map_err(|e| ca_error(path, e))?
        .len();
    if len > CA_FILE_BYTES_MAX {
        return Err(ClientError::Tls(format!(
            "{}: {len} bytes is more than CA_FILE_BYTES_MAX",
            path.display()
        )));
    }
    let pem = std::fs::read(path).map_err(|e| ca_error(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ClientError::Tls(format!(
            "{}: no PEM certificates",
            path.display()
        )));
    }
    Ok(certs)
}

fn ca_error(path: &Path, error: std::io::Error) -> ClientError {
    ClientError::Tls(format!("CA file {}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn ca_file_configs_are_cached_and_refreshed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca_pem()).unwrap();
        let options = TlsOptions::ca_file(&path);
        let a = client_config(&options, TlsUse::Quic).unwrap();
        let b = client_config(&options, TlsUse::Quic).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "second lookup is cached");
        assert_eq!(a.alpn_protocols, vec![ALPN_QUIC.to_vec()]);
        let ws = client_config(&options, TlsUse::WebSocket).unwrap();
        assert!(ws.alpn_protocols.is_empty());

        // A regenerated CA (different length) is a new configuration.
        std::fs::write(&path, format!("{}\n\n", ca_pem())).unwrap();
        let c = client_config(&options, TlsUse::Quic).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn bad_ca_files_are_tls_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TlsOptions::ca_file(dir.path().join("missing.pem"));
        assert!(matches!(
            client_config(&missing, TlsUse::WebSocket),
            Err(ClientError::Tls(_))
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem").unwrap();
        assert!(matches!(
            client_config(&TlsOptions::ca_file(&empty), TlsUse::WebSocket),
            Err(ClientError::Tls(_))
        ));
    }
}
