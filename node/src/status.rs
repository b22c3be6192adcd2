//! Status (24-hour stories). A `StatusPost` is served on the poster's owner (where its device is
//! connected and its contact list lives): the audience is resolved from that list and the
//! frame's `users`, then the one ciphertext (encrypted with the poster's status sender key,
//! which the client hands out pairwise) is stored for every device of every audience member on
//! its owner, as a [`Store`] of kind `Status` that requires the poster in the member's own
//! contacts (checked there, like a broadcast list's) and expires [`STATUS_TTL_MS`] after the
//! post in every inbox, drained or not. The poster's other devices get a copy. View receipts
//! are `Receipt{kind: StatusViewed}`, stored in the poster's inbox like read receipts.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ringpost_wire::{DeviceId, ErrorCode, SendStatus, StatusAudience, StatusPost, UserId};

use crate::peer::{Store, StoreKind, Stored, Targets};
use crate::server::{error, refused, send_ack, Server};
use crate::session::Answer;

/// How long a status lives after it is posted: 24 hours.
pub const STATUS_TTL_MS: u64 = 24 * 3600 * 1000;
/// Statuses one user may post, sustained: one per this period (30 an hour).
pub const STATUS_POST_PERIOD: Duration = Duration::from_secs(120);
/// Statuses one user may post at once before [`STATUS_POST_PERIOD`] applies.
pub const STATUS_POST_BURST: u32 = 10;
/// Audience members stored for at once: bounds a post's in-flight stores (and peer requests)
/// to this many; an audience is at most `CONTACTS_MAX` (4096).
pub const STATUS_STORES_IN_FLIGHT: usize = 64;

/// Posting limits and counters of statuses.
pub struct Status {
    limiter: DefaultKeyedRateLimiter<UserId>,
    ttl_ms: u64,
    pub metrics: StatusMetrics,
}

/// Counters of statuses, rendered as `ringpost_status_*`.
#[derive(Debug, Default)]
pub struct StatusMetrics {
    pub posts: AtomicU64,
    pub posts_limited: AtomicU64,
    pub recipients: AtomicU64,
    pub recipients_failed: AtomicU64,
    /// Audience members whose owner (this node) dropped a status: they do not have the poster
    /// as a contact.
    pub not_contact: AtomicU64,
}

impl Status {
    pub fn new(ttl_ms: u64) -> Status {
        let burst = NonZeroU32::new(STATUS_POST_BURST).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(STATUS_POST_PERIOD)
            .unwrap_or(Quota::per_hour(NonZeroU32::MIN))
            .allow_burst(burst);
        Status {
            limiter: RateLimiter::keyed(quota),
            ttl_ms: ttl_ms.clamp(1, STATUS_TTL_MS),
            metrics: StatusMetrics::default(),
        }
    }

    /// Drops idle limiter state (called with the node's other prunes).
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

impl StatusMetrics {
    /// Appends the counters in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let counters: [(&str, &str, &AtomicU64); 5] = [
            ("posts", "Status items posted by this node's users.", &self.posts),
            (
                "posts_limited",
                "Status posts refused by the posting limit.",
                &self.posts_limited,
            ),
            (
                "recipients",
                "Audience members a status was stored for (or dropped by their owner).",
                &self.recipients,
            ),
            (
                "recipients_failed",
                "Audience members a status could not be stored for (full inbox, unreachable).",
                &self.recipients_failed,
            ),
            (
                "not_contact",
                "Statuses dropped on this node: the audience member does not have the poster as a contact.",
                &self.not_contact,
            ),
        ];
        crate::metrics::write_counters(out, "ringpost_status_", "_total", &counters);
    }
}

/// The audience of a status: `contacts` (the poster's, ascending) narrowed by the frame.
pub fn audience(contacts: &[UserId], how: StatusAudience, users: &[UserId]) -> Vec<UserId> {
    let users: std::collections::HashSet<UserId> = users.iter().copied().collect();
    let listed = |u: &UserId| users.contains(u);
    match how {
        StatusAudience::Contacts => contacts.to_vec(),
        StatusAudience::ContactsExcept => contacts.iter().copied().filter(|u| !listed(u)).collect(),
        StatusAudience::OnlyShareWith => contacts.iter().copied().filter(listed).collect(),
    }
}

/// Posts a status from `user`'s `device` (a local user): answered `SendAck{Ok}` once it is
/// durable for every audience member that has the poster as a contact (and on the poster's
/// other devices); an audience member whose owner could not be reached makes the post answer
/// that error, to be retried with the same `msg_id` (the others are deduplicated).
pub fn post(
    server: &Arc<Server>,
    user: UserId,
    device: DeviceId,
    p: StatusPost,
) -> BoxFuture<'static, Answer> {
    let m = &server.status.metrics;
    if server.status.limiter.check_key(&user).is_err() {
        m.posts_limited.fetch_add(1, Relaxed);
        return Box::pin(async move {
            Answer::Error {
                code: ErrorCode::RateLimited,
                message: format!(
                    "at most {STATUS_POST_BURST} statuses at once, then one every {} s",
                    STATUS_POST_PERIOD.as_secs()
                ),
                retry_after_ms: STATUS_POST_PERIOD.as_millis() as u32,
            }
        });
    }
    let contacts = match server.contacts.contacts(user) {
        Ok(c) => c,
        Err(e) => {
            let answer = error(ErrorCode::Internal, &e.to_string());
            return Box::pin(async move { answer });
        }
    };
    let members = audience(&contacts, p.audience, &p.users);
    let now = server.now_ms();
    let expires_at_ms = now.saturating_add(server.status.ttl_ms);
    let store = |to_user: UserId, require_contact: bool| Store {
        to_user,
        from_user: user,
        from_device: device,
        msg_id: p.msg_id,
        kind: StoreKind::Status,
        targets: Targets::AllDevices(p.body.to_vec()),
        except: (to_user == user).then_some(device),
        receipt_msg_ids: Vec::new(),
        dedup: true,
        require_contact,
        expires_at_ms,
    };
    // The poster's other devices first (its own user, local), then the audience.
    let stores: Vec<Store> = std::iter::once(store(user, false))
        .chain(members.into_iter().map(|u| store(u, true)))
        .collect();
    m.posts.fetch_add(1, Relaxed);
    let server = server.clone();
    let msg_id = p.msg_id;
    Box::pin(async move {
        let outcomes: Vec<Stored> = futures::stream::iter(stores)
            .map(|s| server.store(s))
            .buffer_unordered(STATUS_STORES_IN_FLIGHT)
            .collect()
            .await;
        let m = &server.status.metrics;
        let mut retry = None;
        for o in outcomes {
            match o {
                Stored::Stored { .. } | Stored::Duplicate { .. } => {
                    m.recipients.fetch_add(1, Relaxed);
                }
                // A member without devices left, or a full inbox: that member misses this one
                // status (as a group member does).
                Stored::UnknownUser | Stored::Full { .. } | Stored::Mismatched { .. } => {
                    m.recipients_failed.fetch_add(1, Relaxed);
                }
                Stored::Refused {
                    code,
                    message,
                    retry_after_ms,
                } => {
                    m.recipients_failed.fetch_add(1, Relaxed);
                    retry.get_or_insert((code, message, retry_after_ms));
                }
            }
        }
        match retry {
            Some((code, message, retry_after_ms)) => refused(code, message, retry_after_ms),
            None => send_ack(msg_id, SendStatus::Ok, now),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_come_from_the_contact_list() {
        let contacts = [2, 3, 4];
        assert_eq!(
            audience(&contacts, StatusAudience::Contacts, &[9]),
            vec![2, 3, 4]
        );
        assert_eq!(
            audience(&contacts, StatusAudience::ContactsExcept, &[3, 9]),
            vec![2, 4]
        );
        // Only contacts, whatever else is listed.
        assert_eq!(
            audience(&contacts, StatusAudience::OnlyShareWith, &[4, 9]),
            vec![4]
        );
    }

    #[test]
    fn posting_is_limited_per_user() {
        let s = Status::new(STATUS_TTL_MS);
        for _ in 0..STATUS_POST_BURST {
            assert!(s.limiter.check_key(&1).is_ok());
        }
        assert!(s.limiter.check_key(&1).is_err());
        assert!(s.limiter.check_key(&2).is_ok(), "per user");
    }
}
