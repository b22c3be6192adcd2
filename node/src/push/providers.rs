//! The providers a wake-up push goes through, behind one call: [`Providers::send`]. Each
//! provider turns its HTTP answer into an [`Answer`]; the worker turns that into the queue's
//! [`Outcome`](super::schedule::Outcome).

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use ringpost_wire::{DeviceId, PushProvider, UserId};

use super::apns::Apns;
use super::config::PushConfig;
use super::fcm::Fcm;
use super::jwt::JwtError;
use super::webhook::Webhook;

/// Every push of a device carries this collapse key (`apns-collapse-id`, FCM `collapse_key`):
/// a provider holding several for an unreachable device delivers only the last.
pub const COLLAPSE_KEY: &str = "ringpost-wake";
/// Bytes of a provider's answer read at most (its error reason); the rest is ignored.
pub const RESPONSE_BYTES_MAX: usize = 16 * 1024;
/// A provider's `Retry-After` honoured at most; a longer one is cut to this.
pub const RETRY_AFTER_MS_MAX: u64 = 60 * 60 * 1000;

/// One wake-up to send.
#[derive(Debug, Clone, Copy)]
pub struct Wake<'a> {
    pub user: UserId,
    pub device: DeviceId,
    pub token: &'a str,
}

/// A provider's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Accepted.
    Sent,
    /// Try again later (connection error, timeout, 429, 5xx, an expired credential).
    Retry {
        retry_after_ms: Option<u64>,
        why: String,
    },
    /// The token is dead: remove it.
    TokenInvalid(String),
    /// Refused for good (a request the provider will never take): drop the push.
    Refused(String),
}

/// Why the providers could not be set up from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{provider}: {what}")]
    Config {
        provider: &'static str,
        what: String,
    },
    #[error("{provider} key: {source}")]
    Key {
        provider: &'static str,
        #[source]
        source: JwtError,
    },
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The configured providers.
pub struct Providers {
    webhook: Option<Webhook>,
    apns: Option<Apns>,
    fcm: Option<Fcm>,
}

impl Providers {
    pub fn new(config: &PushConfig) -> Result<Providers, ProviderError> {
        Ok(Providers {
            webhook: match &config.webhook {
                Some(c) => Some(Webhook::new(c.clone(), http_client(config, false)?)),
                None => None,
            },
            apns: match &config.apns {
                Some(c) => Some(Apns::new(c.clone(), http_client(config, true)?)?),
                None => None,
            },
            fcm: match &config.fcm {
                Some(c) => Some(Fcm::new(c, http_client(config, false)?)?),
                None => None,
            },
        })
    }

    /// Whether pushes through `provider` can be sent by this node.
    pub fn has(&self, provider: PushProvider) -> bool {
        match provider {
            PushProvider::Webhook => self.webhook.is_some(),
            PushProvider::Apns => self.apns.is_some(),
            PushProvider::Fcm => self.fcm.is_some(),
        }
    }

    /// Sends `wake` through `provider`; `now_s` is the wall clock (token lifetimes).
    pub async fn send(&self, provider: PushProvider, wake: Wake<'_>, now_s: u64) -> Answer {
        match provider {
            PushProvider::Webhook => match &self.webhook {
                Some(w) => w.send(wake).await,
                None => Answer::Refused("no webhook configured".into()),
            },
            PushProvider::Apns => match &self.apns {
                Some(a) => a.send(wake, now_s).await,
                None => Answer::Refused("APNs is not configured".into()),
            },
            PushProvider::Fcm => match &self.fcm {
                Some(f) => f.send(wake, now_s).await,
                None => Answer::Refused("FCM is not configured".into()),
            },
        }
    }
}

/// An HTTP client for provider calls: rustls (ring) with the system's roots plus
/// [`PushConfig::extra_ca_pem`], the configured timeout, and with `http2_only` HTTP/2 alone
/// (APNs speaks nothing else).
fn http_client(config: &PushConfig, http2_only: bool) -> Result<reqwest::Client, ProviderError> {
    let timeout = Duration::from_millis(config.timeout_ms.max(1));
    let mut b = reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config(config, http2_only)?)
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .redirect(reqwest::redirect::Policy::none());
    if http2_only {
        b = b.http2_prior_knowledge();
    }
    Ok(b.build()?)
}

/// The TLS side of [`http_client`]: reqwest is built without a TLS provider of its own
/// (`rustls-no-provider`), so the node hands it a finished rustls configuration, with the
/// ALPN protocols reqwest would otherwise set.
fn tls_config(
    config: &PushConfig,
    http2_only: bool,
) -> Result<rustls::ClientConfig, ProviderError> {
    let bad = |what: String| ProviderError::Config {
        provider: "push",
        what,
    };
    let mut roots = rustls::RootCertStore::empty();
    // The system's roots. None at all is no error here: an `http://` webhook needs none, and
    // an `https://` call fails its handshake and is retried like any transport failure.
    let (_added, _unparsable) =
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(pem) = &config.extra_ca_pem {
        let mut extra = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| bad(format!("the extra CA file: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("the extra CA file: {e}")))?;
            extra += 1;
        }
        if extra == 0 {
            return Err(bad("the extra CA file holds no certificate".into()));
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = if http2_only {
        vec![b"h2".to_vec()]
    } else {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    };
    Ok(tls)
}

/// `Retry-After` in seconds (the form providers use), capped at [`RETRY_AFTER_MS_MAX`].
pub(super) fn retry_after_ms(headers: &HeaderMap) -> Option<u64> {
    let s: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(s.saturating_mul(1000).min(RETRY_AFTER_MS_MAX))
}

/// Reads at most [`RESPONSE_BYTES_MAX`] of a response body (a provider's error reason).
pub(super) async fn bounded_body(mut resp: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = RESPONSE_BYTES_MAX - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= RESPONSE_BYTES_MAX {
            break;
        }
    }
    body
}

/// A call that failed before any answer: always worth another try.
pub(super) fn transport_failure(provider: &str, e: &reqwest::Error) -> Answer {
    Answer::Retry {
        retry_after_ms: None,
        why: format!("{provider}: {e}"),
    }
}

/// The answer to a status without a provider-specific meaning: 2xx sent, 429 and 5xx retried,
/// any other refused.
pub(super) fn by_status(provider: &str, status: u16, headers: &HeaderMap, reason: &str) -> Answer {
    match status {
        200..=299 => Answer::Sent,
        429 | 500..=599 => Answer::Retry {
            retry_after_ms: retry_after_ms(headers),
            why: format!("{provider} answered {status} {reason}"),
        },
        _ => Answer::Refused(format!("{provider} answered {status} {reason}")),
    }
}
