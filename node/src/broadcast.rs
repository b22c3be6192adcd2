//! Broadcast lists: one `BroadcastSend` is a 1:1 message to each of up to
//! [`BROADCAST_RECIPIENTS_MAX`] users, stored on every recipient's owner concurrently as an
//! ordinary [`Store`] (so dedup, durability, ordering and blocking are those of `Send`), with
//! [`Store::require_contact`] set: the recipient's owner, where its contact list lives, drops
//! the message unless the recipient has the sender as a contact, and answers as if it had
//! stored it, so the sender learns nothing about who saved its number.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use futures::future::BoxFuture;
use ringpost_wire::limits::{BROADCAST_RECIPIENTS_MAX, BROADCAST_RESULT_DEVICES_MAX};
use ringpost_wire::{
    BroadcastAck, BroadcastResult, BroadcastSend, DeviceId, ErrorCode, Frame, SendStatus, UserId,
};

use crate::peer::{Store, StoreKind, Stored, Targets};
use crate::server::{error, Server};
use crate::session::Answer;

/// Counters of broadcast lists, rendered as `ringpost_broadcast_*`.
#[derive(Debug, Default)]
pub struct BroadcastMetrics {
    pub sends: AtomicU64,
    pub recipients_stored: AtomicU64,
    pub recipients_duplicate: AtomicU64,
    pub recipients_rejected: AtomicU64,
    /// Recipients whose owner dropped the message: the sender is not their contact.
    pub recipients_not_contact: AtomicU64,
}

impl BroadcastMetrics {
    /// Appends the counters in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let counters: [(&str, &str, &AtomicU64); 5] = [
            ("sends", "BroadcastSend frames answered.", &self.sends),
            (
                "recipients_stored",
                "Broadcast recipients answered Ok (stored, or dropped by a block or missing contact).",
                &self.recipients_stored,
            ),
            (
                "recipients_duplicate",
                "Broadcast recipients answered from the dedup record.",
                &self.recipients_duplicate,
            ),
            (
                "recipients_rejected",
                "Broadcast recipients not stored (mismatched devices, full inbox, unknown, unreachable).",
                &self.recipients_rejected,
            ),
            (
                "recipients_not_contact",
                "Broadcast recipients dropped on this node because they do not have the sender as a contact.",
                &self.recipients_not_contact,
            ),
        ];
        crate::metrics::write_counters(out, "ringpost_broadcast_", "_total", &counters);
    }
}

/// A `BroadcastSend`'s ciphertexts grouped by recipient, in the order recipients first appear.
pub type Recipients = Vec<(UserId, Vec<(DeviceId, Vec<u8>)>)>;

/// Groups `send`'s ciphertexts by recipient and checks them: not empty, at most
/// [`BROADCAST_RECIPIENTS_MAX`] users, never the sender, one ciphertext per device.
pub fn recipients(sender: UserId, send: &BroadcastSend) -> Result<Recipients, Answer> {
    if send.ciphertexts.is_empty() {
        return Err(error(
            ErrorCode::Malformed,
            "a BroadcastSend needs recipients",
        ));
    }
    let mut index: HashMap<UserId, usize> = HashMap::new();
    let mut out: Recipients = Vec::new();
    for c in &send.ciphertexts {
        if c.user == sender {
            return Err(error(
                ErrorCode::Forbidden,
                "the sender cannot be a broadcast recipient (Send to yourself to sync devices)",
            ));
        }
        let i = match index.get(&c.user) {
            Some(&i) => i,
            None => {
                if out.len() == BROADCAST_RECIPIENTS_MAX {
                    return Err(error(
                        ErrorCode::LimitExceeded,
                        &format!("more than {BROADCAST_RECIPIENTS_MAX} broadcast recipients"),
                    ));
                }
                index.insert(c.user, out.len());
                out.push((c.user, Vec::new()));
                out.len() - 1
            }
        };
        let devices = &mut out[i].1;
        if devices.iter().any(|(d, _)| *d == c.device) {
            return Err(error(
                ErrorCode::Malformed,
                "two ciphertexts for the same device",
            ));
        }
        devices.push((c.device, c.body.to_vec()));
    }
    Ok(out)
}

/// Executes a `BroadcastSend` from `user`'s `device` (rate-limited by the caller): one store per
/// recipient, all in flight at once, answered by one `BroadcastAck`.
pub fn send(
    server: &Arc<Server>,
    user: UserId,
    device: DeviceId,
    msg_id: ringpost_wire::MsgId,
    recipients: Recipients,
) -> BoxFuture<'static, Answer> {
    let now = server.now_ms();
    // Each store starts on the first poll of its future; `join_all` polls them all at once, so
    // the owners are asked concurrently, and each conversation keeps its order with the
    // sender's 1:1 sends (see `crate::forward::order`).
    let stores: Vec<_> = recipients
        .into_iter()
        .map(|(to_user, targets)| {
            let stored = server.store(Store {
                to_user,
                from_user: user,
                from_device: device,
                msg_id,
                kind: StoreKind::Message,
                targets: Targets::Exact(targets),
                except: None,
                receipt_msg_ids: Vec::new(),
                dedup: true,
                require_contact: true,
                expires_at_ms: 0,
            });
            async move { (to_user, stored.await) }
        })
        .collect();
    let server = server.clone();
    Box::pin(async move {
        let outcomes = futures::future::join_all(stores).await;
        let m = &server.broadcast;
        m.sends.fetch_add(1, Relaxed);
        let mut server_time_ms = now;
        let results = outcomes
            .into_iter()
            .map(|(to_user, stored)| {
                let (counter, result) = result_of(to_user, stored, &mut server_time_ms);
                match counter {
                    Outcome::Stored => &m.recipients_stored,
                    Outcome::Duplicate => &m.recipients_duplicate,
                    Outcome::Rejected => &m.recipients_rejected,
                }
                .fetch_add(1, Relaxed);
                result
            })
            .collect();
        Answer::Frames(vec![Frame::new(
            0,
            BroadcastAck {
                msg_id,
                server_time_ms,
                results,
            },
        )])
    })
}

enum Outcome {
    Stored,
    Duplicate,
    Rejected,
}

/// The `BroadcastResult` of one recipient's store; `server_time_ms` becomes the latest time an
/// owner stamped.
fn result_of(user: UserId, stored: Stored, server_time_ms: &mut u64) -> (Outcome, BroadcastResult) {
    let mut r = BroadcastResult {
        user,
        status: SendStatus::Ok,
        missing: vec![],
        extra: vec![],
        full_devices: vec![],
        error: 0,
        retry_after_ms: 0,
    };
    let capped = |mut v: Vec<DeviceId>| {
        v.truncate(BROADCAST_RESULT_DEVICES_MAX);
        v
    };
    let outcome = match stored {
        Stored::Stored { server_time_ms: t } => {
            *server_time_ms = (*server_time_ms).max(t);
            Outcome::Stored
        }
        Stored::Duplicate { server_time_ms: t } => {
            *server_time_ms = (*server_time_ms).max(t);
            Outcome::Duplicate
        }
        Stored::Mismatched { missing, extra } => {
            r.status = SendStatus::MismatchedDevices;
            r.missing = capped(missing);
            r.extra = capped(extra);
            Outcome::Rejected
        }
        Stored::Full { devices } => {
            r.status = SendStatus::InboxFull;
            r.full_devices = capped(devices);
            Outcome::Rejected
        }
        Stored::UnknownUser => {
            r.status = SendStatus::UnknownUser;
            Outcome::Rejected
        }
        Stored::Refused {
            code,
            retry_after_ms,
            ..
        } => {
            // A zero code would read as success; whatever the owner said, nothing was stored.
            r.error = if code == 0 {
                ErrorCode::Internal.as_u16()
            } else {
                code
            };
            r.retry_after_ms = retry_after_ms;
            Outcome::Rejected
        }
    };
    (outcome, r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringpost_wire::DeviceCiphertext;

    fn frame(cts: &[(UserId, DeviceId)]) -> BroadcastSend {
        BroadcastSend {
            msg_id: [7; 16],
            ciphertexts: cts
                .iter()
                .map(|&(user, device)| DeviceCiphertext {
                    user,
                    device,
                    body: bytes::Bytes::from_static(b"x"),
                })
                .collect(),
        }
    }

    fn code(a: Answer) -> ErrorCode {
        match a {
            Answer::Error { code, .. } => code,
            _ => panic!("not an error"),
        }
    }

    #[test]
    fn recipients_are_grouped_in_first_appearance_order() {
        let r = recipients(1, &frame(&[(3, 1), (2, 1), (3, 2)])).unwrap();
        let users: Vec<_> = r.iter().map(|(u, d)| (*u, d.len())).collect();
        assert_eq!(users, vec![(3, 2), (2, 1)]);
    }

    #[test]
    fn bad_recipient_lists_are_refused() {
        assert_eq!(
            code(recipients(1, &frame(&[])).unwrap_err()),
            ErrorCode::Malformed
        );
        assert_eq!(
            code(recipients(1, &frame(&[(2, 1), (1, 2)])).unwrap_err()),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(recipients(1, &frame(&[(2, 1), (2, 1)])).unwrap_err()),
            ErrorCode::Malformed
        );
        let many: Vec<_> = (0..=BROADCAST_RECIPIENTS_MAX as u64)
            .map(|u| (u + 10, 1))
            .collect();
        assert_eq!(
            code(recipients(1, &frame(&many)).unwrap_err()),
            ErrorCode::LimitExceeded
        );
        assert!(recipients(1, &frame(&many[..BROADCAST_RECIPIENTS_MAX])).is_ok());
    }

    #[test]
    fn a_refusal_never_reads_as_success() {
        let mut t = 0;
        let (_, r) = result_of(
            5,
            Stored::Refused {
                code: 0,
                message: String::new(),
                retry_after_ms: 9,
            },
            &mut t,
        );
        assert_ne!(r.error, 0);
        assert_eq!(r.retry_after_ms, 9);
    }
}
