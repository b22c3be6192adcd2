//! The generic webhook provider: a JSON POST to the operator's endpoint, which relays the
//! wake-up however it likes.
//!
//! Body: `{"token":"…","user":15551234567,"device":2,"collapse_key":"ringpost-wake"}`.
//! Headers: `Authorization: Bearer …` when configured; `X-Ringpost-Signature:
//! sha256=<hex HMAC-SHA256(secret, body)>` when a secret is configured. Answers: 2xx sent,
//! 410 the token is dead, 429 and 5xx retried (honouring `Retry-After` seconds), others refused.

use hmac::{Hmac, Mac};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use sha2::Sha256;

use super::config::WebhookConfig;
use super::providers::{by_status, transport_failure, Answer, Wake, COLLAPSE_KEY};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-ringpost-signature";

pub struct Webhook {
    config: WebhookConfig,
    client: reqwest::Client,
}

impl Webhook {
    pub fn new(config: WebhookConfig, client: reqwest::Client) -> Webhook {
        Webhook { config, client }
    }

    pub async fn send(&self, wake: Wake<'_>) -> Answer {
        let body = serde_json::json!({
            "token": wake.token,
            "user": wake.user,
            "device": wake.device,
            "collapse_key": COLLAPSE_KEY,
        })
        .to_string();
        let mut req = self
            .client
            .post(&self.config.url)
            .header(CONTENT_TYPE, "application/json");
        if let Some(token) = &self.config.bearer_token {
            req = req.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(secret) = &self.config.hmac_secret {
            req = req.header(
                SIGNATURE_HEADER,
                signature(secret.as_bytes(), body.as_bytes()),
            );
        }
        match req.body(body).send().await {
            Err(e) => transport_failure("webhook", &e),
            Ok(resp) if resp.status().as_u16() == 410 => {
                Answer::TokenInvalid("webhook answered 410 Gone".into())
            }
            Ok(resp) => by_status("webhook", resp.status().as_u16(), resp.headers(), ""),
        }
    }
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
