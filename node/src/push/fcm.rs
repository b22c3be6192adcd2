//! Firebase Cloud Messaging, HTTP v1 API, authenticated as a service account.
//!
//! An access token comes from OAuth2's JWT-bearer grant: an RS256 assertion signed with the
//! service account's key, POSTed to the token URL; it is cached until a minute before it
//! expires (and dropped on a 401). A push is `POST {url}/v1/projects/{project}/messages:send`
//! with `{"message":{"token","android":{"collapse_key","priority":"high"},"data":{...}}}`, a
//! data-only message the app handles by connecting. Answers: 200 sent; 404 (`UNREGISTERED`),
//! a 400 `INVALID_ARGUMENT` about `message.token`, or any error with `errorCode`
//! `UNREGISTERED`, the token is dead; 401 retried with a new access token; 429 and 5xx retried;
//! others refused.

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};

use super::config::{FcmConfig, FCM_TOKEN_URL_DEFAULT};
use super::jwt::Rs256Signer;
use super::providers::{
    bounded_body, by_status, retry_after_ms, transport_failure, Answer, ProviderError, Wake,
    COLLAPSE_KEY,
};

/// The OAuth2 scope of FCM sends.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Lifetime asked for in an assertion (Google's maximum).
pub const ASSERTION_TTL_S: u64 = 60 * 60;
/// An access token is replaced this long before it expires.
pub const ACCESS_TOKEN_MARGIN_S: u64 = 60;

pub struct Fcm {
    client: reqwest::Client,
    send_url: String,
    token_url: String,
    client_email: String,
    signer: Rs256Signer,
    /// The access token and when it expires (seconds since the Unix epoch). An async lock: one
    /// exchange at a time, the others wait for its token.
    access: tokio::sync::Mutex<Option<(String, u64)>>,
}

#[derive(serde::Deserialize)]
struct ServiceAccount {
    project_id: String,
    client_email: String,
    private_key: String,
    #[serde(default)]
    token_uri: Option<String>,
}

impl Fcm {
    pub fn new(config: &FcmConfig, client: reqwest::Client) -> Result<Fcm, ProviderError> {
        let account: ServiceAccount =
            serde_json::from_str(&config.service_account_json).map_err(|e| {
                ProviderError::Config {
                    provider: "FCM",
                    what: format!("service account file: {e}"),
                }
            })?;
        let signer = Rs256Signer::from_pem(account.private_key.as_bytes()).map_err(|source| {
            ProviderError::Key {
                provider: "FCM",
                source,
            }
        })?;
        let token_url = config
            .token_url
            .clone()
            .or(account.token_uri)
            .unwrap_or_else(|| FCM_TOKEN_URL_DEFAULT.to_owned());
        Ok(Fcm {
            client,
            send_url: format!(
                "{}/v1/projects/{}/messages:send",
                config.url.trim_end_matches('/'),
                account.project_id
            ),
            token_url,
            client_email: account.client_email,
            signer,
            access: tokio::sync::Mutex::new(None),
        })
    }

    async fn access_token(&self, now_s: u64) -> Result<String, Answer> {
        let mut access = self.access.lock().await;
        if let Some((token, expires_s)) = &*access {
            if now_s.saturating_add(ACCESS_TOKEN_MARGIN_S) < *expires_s {
                return Ok(token.clone());
            }
        }
        let assertion = self
            .signer
            .assertion(&serde_json::json!({
                "iss": self.client_email,
                "scope": SCOPE,
                "aud": self.token_url,
                "iat": now_s,
                "exp": now_s + ASSERTION_TTL_S,
            }))
            .map_err(|e| Answer::Refused(format!("FCM assertion: {e}")))?;
        // The assertion is base64url and dots: nothing to escape.
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let resp = self
            .client
            .post(&self.token_url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|e| transport_failure("FCM token endpoint", &e))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = bounded_body(resp).await;
        if !(200..300).contains(&status) {
            // Wrong credentials stay wrong, but a revoked key may be replaced: retried within
            // the attempt bound rather than dropped at once.
            return Err(Answer::Retry {
                retry_after_ms: retry_after_ms(&headers),
                why: format!(
                    "FCM token endpoint answered {status}: {}",
                    String::from_utf8_lossy(&body)
                ),
            });
        }
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let (Some(token), Some(expires_in)) = (
            parsed["access_token"].as_str(),
            parsed["expires_in"].as_u64(),
        ) else {
            return Err(Answer::Retry {
                retry_after_ms: None,
                why: "FCM token endpoint: no access_token/expires_in in its answer".into(),
            });
        };
        *access = Some((token.to_owned(), now_s.saturating_add(expires_in)));
        Ok(token.to_owned())
    }

    async fn forget_access_token(&self) {
        *self.access.lock().await = None;
    }

    pub async fn send(&self, wake: Wake<'_>, now_s: u64) -> Answer {
        let access = match self.access_token(now_s).await {
            Ok(t) => t,
            Err(answer) => return answer,
        };
        let body = serde_json::json!({
            "message": {
                "token": wake.token,
                "android": {"collapse_key": COLLAPSE_KEY, "priority": "high"},
                "data": {"ringpost": "wake"},
            }
        })
        .to_string();
        let sent = self
            .client
            .post(&self.send_url)
            .header(AUTHORIZATION, format!("Bearer {access}"))
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => return transport_failure("FCM", &e),
        };
        let status = resp.status().as_u16();
        if status == 200 {
            return Answer::Sent;
        }
        let headers = resp.headers().clone();
        let body = bounded_body(resp).await;
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let error = &error["error"];
        let status_name = error["status"].as_str().unwrap_or_default().to_owned();
        let details = error["details"].as_array().cloned().unwrap_or_default();
        let unregistered = details
            .iter()
            .any(|d| d["errorCode"].as_str() == Some("UNREGISTERED"));
        let about_token = details.iter().any(|d| {
            d["fieldViolations"].as_array().is_some_and(|v| {
                v.iter()
                    .any(|f| f["field"].as_str() == Some("message.token"))
            })
        });
        match status {
            404 => Answer::TokenInvalid(format!("FCM answered 404 {status_name}")),
            _ if unregistered => {
                Answer::TokenInvalid(format!("FCM answered {status} UNREGISTERED"))
            }
            400 if status_name == "INVALID_ARGUMENT" && about_token => {
                Answer::TokenInvalid("FCM answered 400 INVALID_ARGUMENT on message.token".into())
            }
            401 => {
                self.forget_access_token().await;
                Answer::Retry {
                    retry_after_ms: None,
                    why: "FCM answered 401: access token refused".into(),
                }
            }
            _ => by_status("FCM", status, &headers, &status_name),
        }
    }
}
