//! Counters of the push service, rendered as `ringpost_push_*`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::metrics::Histogram;

/// Buckets of the push latency (a message stored → its provider accepted the wake-up): from
/// 1 ms on loopback to the tens of minutes of a push retried through a provider outage.
pub const PUSH_LATENCY_BUCKETS_S: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0,
];

#[derive(Debug)]
pub struct PushMetrics {
    /// Wake-ups queued (a device without a connection got an entry and had none pending).
    pub queued: AtomicU64,
    /// Entries for a device that already had a push pending: nothing added.
    pub coalesced: AtomicU64,
    /// Wake-ups dropped because the queue was full.
    pub dropped_full: AtomicU64,
    /// Pushes a provider accepted.
    pub sent: AtomicU64,
    /// Provider calls that failed and were retried or given up.
    pub failed: AtomicU64,
    /// Pushes dropped after the last attempt failed.
    pub gave_up: AtomicU64,
    /// Pushes dropped without a call or after a final refusal (no token, provider not
    /// configured, the shard moved, a request the provider never takes).
    pub dropped: AtomicU64,
    /// Tokens removed because their provider said they are dead.
    pub tokens_removed: AtomicU64,
    /// Pending pushes (copied from the queue at each scrape).
    pub depth: AtomicI64,
    /// Time from the inbox write to the provider's acceptance.
    pub latency: Histogram,
}

impl Default for PushMetrics {
    fn default() -> Self {
        PushMetrics {
            queued: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            dropped_full: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            gave_up: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            tokens_removed: AtomicU64::new(0),
            depth: AtomicI64::new(0),
            latency: Histogram::new(PUSH_LATENCY_BUCKETS_S),
        }
    }
}

impl PushMetrics {
    pub fn render(&self, out: &mut String) {
        let counters: [(&str, &str, &AtomicU64); 8] = [
            ("ringpost_push_queued_total", "Wake-up pushes queued for devices without a connection.", &self.queued),
            ("ringpost_push_coalesced_total", "Inbox entries for a device whose push was already pending (nothing added).", &self.coalesced),
            ("ringpost_push_dropped_full_total", "Wake-ups dropped because the push queue was full.", &self.dropped_full),
            ("ringpost_push_sent_total", "Pushes a provider accepted.", &self.sent),
            ("ringpost_push_failed_total", "Provider calls that failed (retried, or given up after the last attempt).", &self.failed),
            ("ringpost_push_gave_up_total", "Pushes dropped after their last attempt failed.", &self.gave_up),
            ("ringpost_push_dropped_total", "Pushes dropped without a provider call or after a final refusal (no token, provider not configured, shard moved).", &self.dropped),
            ("ringpost_push_tokens_removed_total", "Push tokens removed because their provider called them invalid.", &self.tokens_removed),
        ];
        crate::metrics::write_counters(out, "", "", &counters);
        let _ = writeln!(
            out,
            "# HELP ringpost_push_queue_depth Pushes pending (at most one per device).\n# TYPE ringpost_push_queue_depth gauge\nringpost_push_queue_depth {}",
            self.depth.load(Relaxed)
        );
        self.latency.render(
            out,
            "ringpost_push_latency_seconds",
            "Time from the inbox write that queued a push to the provider accepting it (retries included).",
        );
    }
}
