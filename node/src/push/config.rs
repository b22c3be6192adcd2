//! What the operator configures for push (node.toml / flags, docs/operations.md): which
//! providers, their credentials, and the queue's retry policy and bounds.

use super::schedule::RetryPolicy;

/// Default of [`RetryPolicy::attempts_max`]: with the default backoff the last try is about
/// 4 minutes after the first (1 + 2 + 4 + ... + 64 s, jittered down to half).
pub const ATTEMPTS_MAX_DEFAULT: u32 = 8;
/// Default of [`RetryPolicy::backoff_base_ms`].
pub const BACKOFF_BASE_MS_DEFAULT: u64 = 1000;
/// Default of [`RetryPolicy::backoff_max_ms`].
pub const BACKOFF_MAX_MS_DEFAULT: u64 = 5 * 60 * 1000;
/// Default of [`RetryPolicy::queue_max`]: about 25 MiB of schedule at worst.
pub const QUEUE_MAX_DEFAULT: usize = 256 * 1024;
/// Default of [`PushConfig::concurrency`]: provider calls in flight at once. Each holds one
/// request and response (a few KiB) and, over HTTP/1.1, a connection.
pub const CONCURRENCY_DEFAULT: usize = 64;
/// Default of [`PushConfig::timeout_ms`]: one provider call, connect included.
pub const TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Production APNs endpoint.
pub const APNS_URL_DEFAULT: &str = "https://api.push.apple.com";
/// Production FCM endpoint.
pub const FCM_URL_DEFAULT: &str = "https://fcm.googleapis.com";
/// Google's OAuth2 token endpoint (a service account file names its own `token_uri`).
pub const FCM_TOKEN_URL_DEFAULT: &str = "https://oauth2.googleapis.com/token";

/// A generic HTTP webhook: the node POSTs `{"token","user","device","collapse_key"}`.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub url: String,
    /// Sent as `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// Signs each body: `X-Ringpost-Signature: sha256=<hex HMAC-SHA256(secret, body)>`.
    pub hmac_secret: Option<String>,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("bearer_token", &self.bearer_token.as_ref().map(|_| "…"))
            .field("hmac_secret", &self.hmac_secret.as_ref().map(|_| "…"))
            .finish()
    }
}

/// How APNs shows the push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApnsPushType {
    /// `content-available: 1`, priority 5: the app is woken in the background to fetch.
    #[default]
    Background,
    /// A visible alert (localised by the app from `loc-key` `RINGPOST_NEW_MESSAGE`), priority 10.
    Alert,
}

/// Apple Push Notification service, token-based authentication.
#[derive(Clone, PartialEq, Eq)]
pub struct ApnsConfig {
    /// The `.p8` signing key (PKCS#8 PEM), as read from its file.
    pub key_pem: String,
    pub key_id: String,
    pub team_id: String,
    /// `apns-topic`: the app's bundle id.
    pub topic: String,
    /// Base URL ([`APNS_URL_DEFAULT`]; `https://api.sandbox.push.apple.com` for development).
    pub url: String,
    pub push_type: ApnsPushType,
}

impl std::fmt::Debug for ApnsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsConfig")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("topic", &self.topic)
            .field("url", &self.url)
            .field("push_type", &self.push_type)
            .finish_non_exhaustive()
    }
}

/// Firebase Cloud Messaging HTTP v1 with a service account.
#[derive(Clone, PartialEq, Eq)]
pub struct FcmConfig {
    /// The service account's JSON key file, as read (`project_id`, `client_email`,
    /// `private_key`, `token_uri`).
    pub service_account_json: String,
    /// Base URL ([`FCM_URL_DEFAULT`]); messages go to `{url}/v1/projects/{project}/messages:send`.
    pub url: String,
    /// Overrides the file's `token_uri`.
    pub token_url: Option<String>,
}

impl std::fmt::Debug for FcmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmConfig")
            .field("url", &self.url)
            .field("token_url", &self.token_url)
            .finish_non_exhaustive()
    }
}

/// Push settings of a node. `Default`: no provider, so nothing is queued.
#[derive(Debug, Clone, PartialEq)]
pub struct PushConfig {
    pub webhook: Option<WebhookConfig>,
    pub apns: Option<ApnsConfig>,
    pub fcm: Option<FcmConfig>,
    /// Extra CA certificates (PEM) trusted for provider connections besides the system's: a
    /// private relay, or the stand-ins of the tests.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// See [`TIMEOUT_MS_DEFAULT`].
    pub timeout_ms: u64,
    /// See [`CONCURRENCY_DEFAULT`].
    pub concurrency: usize,
    pub retry: RetryPolicy,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            webhook: None,
            apns: None,
            fcm: None,
            extra_ca_pem: None,
            timeout_ms: TIMEOUT_MS_DEFAULT,
            concurrency: CONCURRENCY_DEFAULT,
            retry: RetryPolicy {
                attempts_max: ATTEMPTS_MAX_DEFAULT,
                backoff_base_ms: BACKOFF_BASE_MS_DEFAULT,
                backoff_max_ms: BACKOFF_MAX_MS_DEFAULT,
                queue_max: QUEUE_MAX_DEFAULT,
            },
        }
    }
}

impl PushConfig {
    /// Whether any provider is configured (else nothing is queued).
    pub fn enabled(&self) -> bool {
        self.webhook.is_some() || self.apns.is_some() || self.fcm.is_some()
    }
}
