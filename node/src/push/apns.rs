//! Apple Push Notification service: HTTP/2 over TLS with token authentication.
//!
//! `POST {url}/3/device/{token}` with `authorization: bearer <ES256 JWT>` (signed with the
//! team's `.p8` key, cached for [`PROVIDER_TOKEN_TTL_S`]), `apns-topic`, `apns-push-type`
//! (`background` at priority 5, or `alert` at 10), `apns-collapse-id` and `apns-expiration`
//! (a day). Answers: 200 sent; 410 (`Unregistered`) and 400 `BadDeviceToken` /
//! `DeviceTokenNotForTopic` the token is dead; 403 `ExpiredProviderToken` /
//! `InvalidProviderToken` retried with a fresh provider token; 429 and 5xx retried; others
//! refused.

use std::sync::Mutex;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};

use super::config::{ApnsConfig, ApnsPushType};
use super::jwt::Es256Signer;
use super::providers::{
    bounded_body, by_status, transport_failure, Answer, ProviderError, Wake, COLLAPSE_KEY,
};

/// How long one provider token is used. Apple refuses tokens older than an hour and throttles
/// providers that make new ones more often than every 20 minutes.
pub const PROVIDER_TOKEN_TTL_S: u64 = 50 * 60;
/// `apns-expiration`: how long Apple keeps trying an unreachable device.
pub const EXPIRATION_S: u64 = 24 * 60 * 60;

pub struct Apns {
    config: ApnsConfig,
    client: reqwest::Client,
    signer: Es256Signer,
    /// The provider token in use and when it was made (seconds since the Unix epoch).
    token: Mutex<Option<(String, u64)>>,
}

impl Apns {
    pub fn new(config: ApnsConfig, client: reqwest::Client) -> Result<Apns, ProviderError> {
        let signer = Es256Signer::from_pem(config.key_pem.as_bytes()).map_err(|source| {
            ProviderError::Key {
                provider: "APNs",
                source,
            }
        })?;
        for (what, v) in [
            ("key id", &config.key_id),
            ("team id", &config.team_id),
            ("topic", &config.topic),
        ] {
            if v.is_empty() {
                return Err(ProviderError::Config {
                    provider: "APNs",
                    what: format!("the {what} is missing"),
                });
            }
        }
        Ok(Apns {
            config,
            client,
            signer,
            token: Mutex::new(None),
        })
    }

    fn provider_token(&self, now_s: u64) -> Result<String, Answer> {
        let mut cached = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((jwt, made_s)) = &*cached {
            if now_s.saturating_sub(*made_s) < PROVIDER_TOKEN_TTL_S {
                return Ok(jwt.clone());
            }
        }
        let jwt = self
            .signer
            .provider_token(&self.config.key_id, &self.config.team_id, now_s)
            .map_err(|e| Answer::Refused(format!("APNs provider token: {e}")))?;
        *cached = Some((jwt.clone(), now_s));
        Ok(jwt)
    }

    fn forget_provider_token(&self) {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub async fn send(&self, wake: Wake<'_>, now_s: u64) -> Answer {
        let jwt = match self.provider_token(now_s) {
            Ok(jwt) => jwt,
            Err(answer) => return answer,
        };
        let (push_type, priority, body) = match self.config.push_type {
            ApnsPushType::Background => ("background", "5", r#"{"aps":{"content-available":1}}"#),
            ApnsPushType::Alert => (
                "alert",
                "10",
                r#"{"aps":{"alert":{"loc-key":"RINGPOST_NEW_MESSAGE"},"mutable-content":1}}"#,
            ),
        };
        // The token was checked to be hex digits when it was registered.
        let url = format!(
            "{}/3/device/{}",
            self.config.url.trim_end_matches('/'),
            wake.token
        );
        let sent = self
            .client
            .post(url)
            .header(AUTHORIZATION, format!("bearer {jwt}"))
            .header(CONTENT_TYPE, "application/json")
            .header("apns-topic", &self.config.topic)
            .header("apns-push-type", push_type)
            .header("apns-priority", priority)
            .header("apns-collapse-id", COLLAPSE_KEY)
            .header("apns-expiration", (now_s + EXPIRATION_S).to_string())
            .body(body)
            .send()
            .await;
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => return transport_failure("APNs", &e),
        };
        let status = resp.status().as_u16();
        if status == 200 {
            return Answer::Sent;
        }
        let headers = resp.headers().clone();
        let body = bounded_body(resp).await;
        let reason = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_owned))
            .unwrap_or_default();
        match (status, reason.as_str()) {
            (410, _) | (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => {
                Answer::TokenInvalid(format!("APNs answered {status} {reason}"))
            }
            (403, "ExpiredProviderToken" | "InvalidProviderToken") => {
                self.forget_provider_token();
                Answer::Retry {
                    retry_after_ms: None,
                    why: format!("APNs answered {status} {reason}"),
                }
            }
            _ => by_status("APNs", status, &headers, &reason),
        }
    }
}
