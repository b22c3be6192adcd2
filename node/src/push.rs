//! Wake-up pushes to devices that have no connection.
//!
//! How the parts fit:
//! - A device registers a token (`PushRegister`; rows in the accounts family, see
//!   `accounts/push_token.rs`), so it moves and replicates with its user's shard.
//! - The inbox writer hands every stored entry to the node's hook (`runtime.rs`); when the
//!   device has no live connection on this node (its owner, where all its connections are),
//!   [`Push::entry_stored`] queues a wake-up in the [`Schedule`]: at most one pending push per
//!   device, so a burst of messages is one push (coalesced).
//! - [`PushWorker`] (a task) writes the queue's changes to [`Cf::PushQueue`] (node-local, one
//!   row per device, so the queue survives a restart: [`Push::restore`] reads it back), calls
//!   the providers ([`Providers`]: a webhook, APNs, FCM) for pushes that are due, at most
//!   [`PushConfig::concurrency`] at once, and applies their answers: sent, retried with
//!   exponential backoff and jitter up to [`RetryPolicy::attempts_max`] calls, or dropped; a
//!   provider's "token invalid" removes the token.
//! - A device that connects cancels its pending push ([`Push::device_connected`]).
//!
//! A push carries no content: the device's token, and in the webhook's body its user and
//! device and the collapse key. The device connects and drains its inbox.
//!
//! [`Cf::PushQueue`]: crate::storage::Cf::PushQueue

mod apns;
pub mod config;
mod fcm;
pub mod jwt;
mod metrics;
pub mod providers;
pub mod schedule;
mod webhook;
mod worker;

use std::sync::{Mutex, MutexGuard};

use ringpost_wire::{DeviceId, UserId};
use tokio::sync::Notify;

pub use config::{ApnsConfig, ApnsPushType, FcmConfig, PushConfig, WebhookConfig};
pub use metrics::PushMetrics;
pub use providers::{Answer, ProviderError, Providers, Wake, COLLAPSE_KEY};
pub use schedule::{Offer, RetryPolicy, Schedule};
pub use webhook::{signature as webhook_signature, SIGNATURE_HEADER};
pub use worker::PushWorker;

use crate::inbox::EntryKind;
use crate::storage::{successor, Cf, Engine, StorageError};
use schedule::{parse_row_key, Pending};

/// Rows read per step when the queue is restored at start.
const RESTORE_CHUNK_ROWS: usize = 4096;

/// Whether an entry of `kind` wakes its device: messages and group messages and changes do;
/// receipts and statuses wait for the next time the device connects.
pub fn wakes(kind: EntryKind) -> bool {
    matches!(
        kind,
        EntryKind::Message | EntryKind::GroupMessage | EntryKind::GroupEvent
    )
}

/// Wall clock in microseconds since the Unix epoch: the queue's time.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The push service of a node: the queue its hooks feed and its worker drains.
pub struct Push {
    enabled: bool,
    schedule: Mutex<Schedule>,
    /// Wakes the worker: a new push, a cancel to write, a call finished.
    wake: Notify,
    pub metrics: PushMetrics,
}

impl Push {
    /// A push service; with no provider configured it queues nothing.
    pub fn new(config: &PushConfig) -> Push {
        Push {
            enabled: config.enabled(),
            schedule: Mutex::new(Schedule::new(config.retry)),
            wake: Notify::new(),
            metrics: PushMetrics::default(),
        }
    }

    /// Reads back the pushes queued before a restart (at most [`RetryPolicy::queue_max`]);
    /// corrupt rows are logged and skipped. Returns how many.
    pub fn restore(&self, engine: &dyn Engine) -> Result<usize, StorageError> {
        let end = [0xff; 13];
        let mut from = Vec::new();
        let mut restored = 0;
        loop {
            let rows = engine.scan(Cf::PushQueue, &from, &end, RESTORE_CHUNK_ROWS)?;
            let Some((last, _)) = rows.last() else {
                break;
            };
            from = successor(last);
            let mut schedule = self.lock();
            for (k, v) in &rows {
                match (parse_row_key(k), Pending::decode(v)) {
                    (Some(device), Ok(pending)) => {
                        if !schedule.restore(device, pending) {
                            tracing::warn!(restored, "push queue full at restore; the rest waits");
                            return Ok(restored);
                        }
                        restored += 1;
                    }
                    (_, Err(e)) => tracing::warn!(error = %e, "corrupt push queue row skipped"),
                    (None, _) => tracing::warn!("push queue row with a bad key skipped"),
                }
            }
            if rows.len() < RESTORE_CHUNK_ROWS {
                break;
            }
        }
        self.metrics
            .depth
            .store(restored as i64, std::sync::atomic::Ordering::Relaxed);
        Ok(restored)
    }

    /// An entry of `kind` was stored at `now_us` for a device with no connection on this node.
    /// Cheap and never blocks: it runs on the inbox writer's thread.
    pub fn entry_stored(&self, user: UserId, device: DeviceId, kind: EntryKind, now_us: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.enabled || !wakes(kind) {
            return;
        }
        let offered = self.lock().offer((user, device), now_us);
        match offered {
            Offer::Queued => {
                self.metrics.queued.fetch_add(1, Relaxed);
                self.wake.notify_one();
            }
            Offer::Coalesced => {
                self.metrics.coalesced.fetch_add(1, Relaxed);
            }
            Offer::Full => {
                self.metrics.dropped_full.fetch_add(1, Relaxed);
            }
        }
    }

    /// The device connected: it drains its inbox itself, so its pending push is not sent.
    pub fn device_connected(&self, user: UserId, device: DeviceId) {
        if self.lock().cancel((user, device)) {
            self.wake.notify_one();
        }
    }

    /// Pushes pending.
    pub fn depth(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }
}
