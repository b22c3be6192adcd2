//! The prekey requests of a device, executed on its user's owner (a claim on the claimed
//! user's): uploads (verified by [`Keys::upload`], then an identity change announced to the
//! user's contacts), claims (the claimed user's one-time key budget, then the low-key event)
//! and counts.
//!
//! Identity changes reach contacts as inbox entries of kind `IdentityChanged` through the same
//! path as a status ([`crate::status`]): one [`Store`] per contact on the contact's owner, for
//! every device, stored only if the contact has the uploader in its own contacts and does not
//! block it. The entry's `msg_id` is derived from the key, so a repeated announcement is
//! stored once per contact (the dedup window).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use ringpost_wire::{
    DeviceId, Done, ErrorCode, Frame, MsgId, PrekeyBundle, PrekeyClaim, PrekeyCount, PrekeyUpload,
    UserId,
};
use tracing::{debug, warn};

use super::{Keys, KeysError};
use crate::peer::{Store, StoreKind, Stored, Targets};
use crate::server::{account_error, error, frames, keys_error, refused, task_failed, Server};
use crate::session::Answer;

/// Contacts an identity change is stored for at once (like a status's audience).
pub const ANNOUNCE_STORES_IN_FLIGHT: usize = crate::status::STATUS_STORES_IN_FLIGHT;

/// Counters of the prekeys service, rendered as `ringpost_keys_*`.
#[derive(Debug, Default)]
pub struct KeysMetrics {
    pub uploads: AtomicU64,
    pub uploads_refused: AtomicU64,
    pub one_time_handed: AtomicU64,
    pub fallback_only: AtomicU64,
    pub over_budget: AtomicU64,
    pub low_events: AtomicU64,
    pub identity_announcements: AtomicU64,
}

impl KeysMetrics {
    /// Appends the counters in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let counters: [(&str, &str, &AtomicU64); 7] = [
            ("uploads", "Prekey uploads stored.", &self.uploads),
            (
                "uploads_refused",
                "Prekey uploads refused (a bad key length or signature, a bound).",
                &self.uploads_refused,
            ),
            (
                "one_time_handed",
                "One-time prekeys handed out by claims.",
                &self.one_time_handed,
            ),
            (
                "fallback_only",
                "Device bundles handed out without a one-time prekey (ran out, or over budget).",
                &self.fallback_only,
            ),
            (
                "over_budget",
                "Claims past the claimed user's one-time prekey budget (answered with the fallback).",
                &self.over_budget,
            ),
            (
                "low_events",
                "Unprompted PrekeyCount frames sent to devices that crossed the low watermark.",
                &self.low_events,
            ),
            (
                "identity_announcements",
                "Identity-key changes announced to a user's contacts.",
                &self.identity_announcements,
            ),
        ];
        crate::metrics::write_counters(out, "ringpost_keys_", "_total", &counters);
    }
}

/// The `msg_id` of the announcement of `identity_key`: the first 16 bytes of its SHA-256.
pub fn announcement_id(identity_key: &[u8]) -> MsgId {
    let digest = ring::digest::digest(&ring::digest::SHA256, identity_key);
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest.as_ref()[..16]);
    id
}

/// Stores `device`'s upload (a local user's, already charged to its budget) and, if its
/// identity key is new, announces it to the user's contacts before answering `Done`.
pub fn upload(
    server: &Arc<Server>,
    user: UserId,
    device: DeviceId,
    upload: PrekeyUpload,
) -> BoxFuture<'static, Answer> {
    let server = server.clone();
    Box::pin(async move {
        let identity_key = upload.identity_key.clone();
        // Up to 101 signature checks and a synced write: off the async workers.
        let keys = server.keys.clone();
        let uploaded = tokio::task::spawn_blocking(move || keys.upload(user, device, &upload))
            .await
            .unwrap_or_else(|e| Err(task_failed(e)));
        let m = &server.keys_metrics;
        let uploaded = match uploaded {
            Ok(u) => u,
            Err(e) => {
                if !matches!(e, KeysError::Storage(_)) {
                    m.uploads_refused.fetch_add(1, Relaxed);
                }
                return keys_error(e);
            }
        };
        m.uploads.fetch_add(1, Relaxed);
        if uploaded.announce {
            if let Err(answer) = announce(&server, user, device, identity_key).await {
                return answer;
            }
        }
        frames(Done {})
    })
}

/// Stores the `IdentityChanged` entry for every contact of `user`, then clears the pending
/// mark. `Err` with the answer to give if some contact's owner refused or could not be
/// reached (the mark stays: the next upload announces again).
async fn announce(
    server: &Arc<Server>,
    user: UserId,
    device: DeviceId,
    identity_key: Bytes,
) -> Result<(), Answer> {
    let contacts = server
        .contacts
        .contacts(user)
        .map_err(|e| error(ErrorCode::Internal, &e.to_string()))?;
    let msg_id = announcement_id(&identity_key);
    let stores: Vec<Store> = contacts
        .into_iter()
        .filter(|&c| c != user)
        .map(|to_user| Store {
            to_user,
            from_user: user,
            from_device: device,
            msg_id,
            kind: StoreKind::IdentityChanged,
            targets: Targets::AllDevices(identity_key.to_vec()),
            except: None,
            receipt_msg_ids: Vec::new(),
            dedup: true,
            require_contact: true,
            expires_at_ms: 0,
        })
        .collect();
    let outcomes: Vec<Stored> = futures::stream::iter(stores)
        .map(|s| server.store(s))
        .buffer_unordered(ANNOUNCE_STORES_IN_FLIGHT)
        .collect()
        .await;
    let mut retry = None;
    for o in outcomes {
        match o {
            Stored::Stored { .. } | Stored::Duplicate { .. } => {}
            // A contact without devices, or with a full inbox: it misses this announcement
            // (its client sees the new key at its next claim).
            Stored::UnknownUser | Stored::Full { .. } | Stored::Mismatched { .. } => {}
            Stored::Refused {
                code,
                message,
                retry_after_ms,
            } => {
                retry.get_or_insert((code, message, retry_after_ms));
            }
        }
    }
    if let Some((code, message, retry_after_ms)) = retry {
        debug!(
            user,
            device, message, "identity announcement: will be retried"
        );
        return Err(refused(code, message, retry_after_ms));
    }
    server
        .keys_metrics
        .identity_announcements
        .fetch_add(1, Relaxed);
    let keys = server.keys.clone();
    let cleared =
        tokio::task::spawn_blocking(move || keys.announced(user, device, &identity_key)).await;
    if let Err(e) = cleared
        .map_err(task_failed)
        .and_then(|r: Result<(), KeysError>| r)
    {
        // Announced again with the next upload; contacts store it once.
        warn!(user, device, error = %e, "clearing an identity announcement failed");
    }
    Ok(())
}

/// A claim of a local user's keys (from a local device, or forwarded by the claimer's node):
/// charged to the claimed user's one-time key budget, then executed; a device whose count this
/// claim took below the watermark is told on its connection.
pub async fn claim(server: &Server, c: PrekeyClaim) -> Answer {
    let devices = match server.accounts.devices(c.user) {
        Ok(d) => d,
        Err(e) => return account_error(e),
    };
    let hand_one_time = server.budgets.hand_one_time(c.user);
    let m = &server.keys_metrics;
    if !hand_one_time {
        m.over_budget.fetch_add(1, Relaxed);
    }
    let which = (c.device != 0).then_some(c.device);
    let keys: Arc<Keys> = server.keys.clone();
    let claimed =
        tokio::task::spawn_blocking(move || keys.claim(c.user, which, &devices, hand_one_time))
            .await
            .unwrap_or_else(|e| Err(task_failed(e)));
    let claimed = match claimed {
        Ok(claimed) => claimed,
        Err(e) => return keys_error(e),
    };
    for b in &claimed.bundles {
        match b.one_time {
            Some(_) => m.one_time_handed.fetch_add(1, Relaxed),
            None => m.fallback_only.fetch_add(1, Relaxed),
        };
    }
    for &(device, count) in &claimed.low {
        // The device's connection is on this node (its user's owner), if it has one; one
        // that is offline asks with PrekeyCountRequest.
        let Some(conn) = server.registry.device(c.user, device) else {
            continue;
        };
        if let Ok(bytes) = Frame::new(0, PrekeyCount { count }).encode() {
            if conn.push(bytes) {
                m.low_events.fetch_add(1, Relaxed);
            }
        }
    }
    frames(PrekeyBundle {
        user: c.user,
        devices: claimed.bundles,
    })
}

/// The one-time prekeys `device` has left.
pub fn count(server: &Server, user: UserId, device: DeviceId) -> Answer {
    match server.keys.count(user, device) {
        Ok(count) => frames(PrekeyCount { count }),
        Err(e) => keys_error(e),
    }
}
