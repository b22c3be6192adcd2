//! Prometheus metrics, named `ringpost_<area>_<what>_<unit>`. Plain atomics, rendered in the
//! text exposition format by [`Metrics::render`]. Labels are a fixed, small set (transport
//! names, frame directions); never a user id.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Transports, as metric label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ws = 0,
    Wss = 1,
    Quic = 2,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::Ws, Transport::Wss, Transport::Quic];
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Wss => "wss",
            Transport::Quic => "quic",
        }
    }
}

/// A histogram with fixed buckets in seconds (upper bounds), cumulative on render.
#[derive(Debug)]
pub struct Histogram {
    bounds_s: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// Buckets for latencies from 50 µs to 5 s.
pub const LATENCY_BUCKETS_S: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

impl Histogram {
    pub fn new(bounds_s: &'static [f64]) -> Self {
        Histogram {
            bounds_s,
            counts: (0..=bounds_s.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self
            .bounds_s
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(self.bounds_s.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.bounds_s.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds_s.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {}", self.count.load(Relaxed));
    }
}

/// Every metric of a node.
#[derive(Debug)]
pub struct Metrics {
    pub connections: [AtomicI64; 3],
    pub connections_accepted: [AtomicU64; 3],
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub frames_rejected: AtomicU64,
    pub messages_accepted: AtomicU64,
    pub messages_duplicate: AtomicU64,
    pub messages_delivered: AtomicU64,
    pub messages_acked: AtomicU64,
    /// Acks not written (storage failed, or a shard in their batch moved): the device was
    /// asked to reconnect.
    pub acks_failed: AtomicU64,
    pub messages_rejected: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Connections refused at accept by the bounds on unauthenticated ones.
    pub preauth_refused: AtomicU64,
    /// The client QUIC listener's dropped datagrams (its driver counts them).
    pub quic: std::sync::Arc<crate::transport::quic::driver::Counters>,
    /// Copied from the peer network at each scrape.
    pub peer_dials_refused: AtomicU64,
    /// Connections not authenticated yet (handshake, before `Hello`, anonymous sessions).
    pub unauthenticated: AtomicI64,
    /// Connections a task is serving now (see [`crate::conn`]: an idle one has none).
    pub connection_tasks: AtomicI64,
    /// Whether the ws listener is driven by io_uring (else tokio).
    pub ws_uring: std::sync::atomic::AtomicBool,
    /// Whether the wss listener is driven by io_uring (else tokio).
    pub wss_uring: std::sync::atomic::AtomicBool,
    pub inbox_entries: AtomicI64,
    /// Seconds durable writes have been failing (0 while they succeed).
    pub storage_failing_seconds: AtomicI64,
    pub wal_sync: Histogram,
    pub commit_group_requests: AtomicU64,
    pub commits: AtomicU64,
    pub send_ack: Histogram,
    /// Requests this node sent to other nodes (forwards, queries, hand-off steps, replication).
    pub peer_requests_sent: AtomicU64,
    /// Requests other nodes sent to this one.
    pub peer_requests_served: AtomicU64,
    /// Forwards another node refused with `WrongOwner` (its view or ours was stale).
    pub peer_wrong_owner: AtomicU64,
    /// Shards pulled from another node by a hand-off, and their rows.
    pub handoff_shards: AtomicU64,
    pub handoff_rows: AtomicU64,
    /// Shard log records (and their encoded bytes) applied here as a replica; re-sends skipped
    /// are not counted.
    pub replicate_records_applied: AtomicU64,
    pub replicate_bytes_applied: AtomicU64,
    /// Round trips of `Replicate` requests to replicas, answered or refused.
    pub replicate_round_trip: Histogram,
    /// Catch-ups (a shard's snapshot to a replica) this node finished as the primary, their
    /// chunks' bytes, and those it abandoned (each starts over).
    pub catch_ups_done: AtomicU64,
    pub catch_up_bytes: AtomicU64,
    pub catch_ups_failed: AtomicU64,
    /// The ring epoch this node routes at, the shards it owns, and how many of them it has
    /// taken over (serves).
    pub ring_epoch: AtomicI64,
    pub shards_owned: AtomicI64,
    pub shards_ready: AtomicI64,
    /// 1 while `/readyz` would answer 200, else 0 (set at each scrape).
    pub ready: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections: Default::default(),
            connections_accepted: Default::default(),
            frames_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            frames_rejected: AtomicU64::new(0),
            messages_accepted: AtomicU64::new(0),
            messages_duplicate: AtomicU64::new(0),
            messages_delivered: AtomicU64::new(0),
            messages_acked: AtomicU64::new(0),
            acks_failed: AtomicU64::new(0),
            messages_rejected: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            preauth_refused: AtomicU64::new(0),
            quic: Default::default(),
            peer_dials_refused: AtomicU64::new(0),
            unauthenticated: AtomicI64::new(0),
            connection_tasks: AtomicI64::new(0),
            ws_uring: std::sync::atomic::AtomicBool::new(false),
            wss_uring: std::sync::atomic::AtomicBool::new(false),
            inbox_entries: AtomicI64::new(0),
            storage_failing_seconds: AtomicI64::new(0),
            wal_sync: Histogram::new(LATENCY_BUCKETS_S),
            commit_group_requests: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            send_ack: Histogram::new(LATENCY_BUCKETS_S),
            peer_requests_sent: AtomicU64::new(0),
            peer_requests_served: AtomicU64::new(0),
            peer_wrong_owner: AtomicU64::new(0),
            handoff_shards: AtomicU64::new(0),
            handoff_rows: AtomicU64::new(0),
            replicate_records_applied: AtomicU64::new(0),
            replicate_bytes_applied: AtomicU64::new(0),
            replicate_round_trip: Histogram::new(LATENCY_BUCKETS_S),
            catch_ups_done: AtomicU64::new(0),
            catch_up_bytes: AtomicU64::new(0),
            catch_ups_failed: AtomicU64::new(0),
            ring_epoch: AtomicI64::new(0),
            shards_owned: AtomicI64::new(0),
            shards_ready: AtomicI64::new(0),
            ready: AtomicI64::new(0),
        }
    }
}

impl Metrics {
    pub fn connection_opened(&self, t: Transport) {
        self.connections[t as usize].fetch_add(1, Relaxed);
        self.connections_accepted[t as usize].fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self, t: Transport) {
        self.connections[t as usize].fetch_sub(1, Relaxed);
    }

    /// Connections open now, all transports.
    pub fn connections_total(&self) -> i64 {
        self.connections.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP ringpost_connections Open client connections.\n# TYPE ringpost_connections gauge"
        );
        for t in Transport::ALL {
            let _ = writeln!(
                out,
                "ringpost_connections{{transport=\"{}\"}} {}",
                t.name(),
                self.connections[t as usize].load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ringpost_connections_accepted_total Client connections accepted.\n# TYPE ringpost_connections_accepted_total counter"
        );
        for t in Transport::ALL {
            let _ = writeln!(
                out,
                "ringpost_connections_accepted_total{{transport=\"{}\"}} {}",
                t.name(),
                self.connections_accepted[t as usize].load(Relaxed)
            );
        }
        let counters: [(&str, &str, &AtomicU64); 26] = [
            (
                "ringpost_frames_in_total",
                "Frames received from clients.",
                &self.frames_in,
            ),
            (
                "ringpost_frames_out_total",
                "Frames sent to clients.",
                &self.frames_out,
            ),
            (
                "ringpost_frames_rejected_total",
                "Frames that failed to decode or were refused.",
                &self.frames_rejected,
            ),
            (
                "ringpost_messages_accepted_total",
                "Messages made durable and acknowledged to the sender.",
                &self.messages_accepted,
            ),
            (
                "ringpost_messages_duplicate_total",
                "Sends answered from the dedup record.",
                &self.messages_duplicate,
            ),
            (
                "ringpost_messages_delivered_total",
                "Deliver frames sent to devices.",
                &self.messages_delivered,
            ),
            (
                "ringpost_messages_acked_total",
                "Inbox entries acknowledged by devices (removed from disk in bulk later).",
                &self.messages_acked,
            ),
            (
                "ringpost_acks_failed_total",
                "Acks not written (storage failed, or a shard in their batch moved); the device was asked to reconnect.",
                &self.acks_failed,
            ),
            (
                "ringpost_messages_rejected_total",
                "Sends refused (mismatched devices, inbox full, unknown user).",
                &self.messages_rejected,
            ),
            (
                "ringpost_rate_limited_total",
                "Requests refused by a rate limit.",
                &self.rate_limited,
            ),
            (
                "ringpost_preauth_refused_total",
                "Connections refused at accept: too many unauthenticated ones from their source or in all.",
                &self.preauth_refused,
            ),
            (
                "ringpost_quic_send_dropped_total",
                "QUIC datagrams to clients not sent: the UDP socket's send buffer was full (QUIC resends them).",
                &self.quic.send_dropped,
            ),
            (
                "ringpost_quic_forward_dropped_total",
                "QUIC datagrams from clients dropped because their driver shard had too many waiting (QUIC resends them).",
                &self.quic.forward_dropped,
            ),
            (
                "ringpost_peer_dials_refused_total",
                "Peer-port dials refused: bad or late proofs (wrong secret, wrong node key, not a member) and dials over the per-source or total bound.",
                &self.peer_dials_refused,
            ),
            (
                "ringpost_peer_requests_sent_total",
                "Requests sent to other nodes (forwards, queries, hand-off steps, replication).",
                &self.peer_requests_sent,
            ),
            (
                "ringpost_peer_requests_served_total",
                "Requests served for other nodes.",
                &self.peer_requests_served,
            ),
            (
                "ringpost_peer_wrong_owner_total",
                "Forwards refused by the receiving node with WrongOwner.",
                &self.peer_wrong_owner,
            ),
            (
                "ringpost_handoff_shards_total",
                "Shards taken over from another node.",
                &self.handoff_shards,
            ),
            (
                "ringpost_handoff_rows_total",
                "Rows copied by those hand-offs.",
                &self.handoff_rows,
            ),
            (
                "ringpost_replicate_records_applied_total",
                "Shard log records applied on this node as a replica (re-sends not counted).",
                &self.replicate_records_applied,
            ),
            (
                "ringpost_replicate_applied_bytes_total",
                "Encoded bytes of those records.",
                &self.replicate_bytes_applied,
            ),
            (
                "ringpost_catch_ups_total",
                "Shard catch-ups (snapshot to a replica) this node finished as the primary.",
                &self.catch_ups_done,
            ),
            (
                "ringpost_catch_up_bytes_total",
                "Encoded bytes of the snapshot chunks of those catch-ups.",
                &self.catch_up_bytes,
            ),
            (
                "ringpost_catch_ups_failed_total",
                "Catch-ups abandoned (a chunk or record refused, the link down); each starts over.",
                &self.catch_ups_failed,
            ),
            (
                "ringpost_inbox_commits_total",
                "Synced inbox write groups.",
                &self.commits,
            ),
            (
                "ringpost_inbox_commit_requests_total",
                "Inbox requests carried by those groups.",
                &self.commit_group_requests,
            ),
        ];
        write_counters(&mut out, "", "", &counters);
        let _ = writeln!(
            out,
            "# HELP ringpost_inbox_entries Entries stored in device inboxes.\n# TYPE ringpost_inbox_entries gauge\nringpost_inbox_entries {}",
            self.inbox_entries.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ringpost_storage_failing_seconds Seconds durable writes have been failing (0: they succeed); a node whose storage failed refuses writes until it has reopened its database (it tries every second).\n# TYPE ringpost_storage_failing_seconds gauge\nringpost_storage_failing_seconds {}",
            self.storage_failing_seconds.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ringpost_ws_driver_info What drives the ws listener's connections (--ws-driver; uring falls back to tokio where the kernel refuses it).\n# TYPE ringpost_ws_driver_info gauge\nringpost_ws_driver_info{{driver=\"{}\"}} 1",
            if self.ws_uring.load(Relaxed) { "uring" } else { "tokio" }
        );
        let _ = writeln!(
            out,
            "# HELP ringpost_wss_driver_info What drives the wss listener's connections (--ws-driver, as for ws).\n# TYPE ringpost_wss_driver_info gauge\nringpost_wss_driver_info{{driver=\"{}\"}} 1",
            if self.wss_uring.load(Relaxed) { "uring" } else { "tokio" }
        );
        let gauges: [(&str, &str, &AtomicI64); 6] = [
            (
                "ringpost_ready",
                "1 while the node is ready for clients (what /readyz answers 200 to), else 0.",
                &self.ready,
            ),
            (
                "ringpost_connections_unauthenticated",
                "Connections in their handshake, before Hello, or in an anonymous session.",
                &self.unauthenticated,
            ),
            (
                "ringpost_connection_tasks",
                "Connections with a task serving them now; the others wait with nothing in flight and no task.",
                &self.connection_tasks,
            ),
            (
                "ringpost_ring_epoch",
                "The ring epoch this node routes at.",
                &self.ring_epoch,
            ),
            (
                "ringpost_shards_owned",
                "Shards this node owns at that epoch.",
                &self.shards_owned,
            ),
            (
                "ringpost_shards_ready",
                "Owned shards taken over and served.",
                &self.shards_ready,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Relaxed)
            );
        }
        self.wal_sync.render(
            &mut out,
            "ringpost_inbox_wal_sync_seconds",
            "Latency of a synced inbox write (one group commit).",
        );
        self.send_ack.render(
            &mut out,
            "ringpost_send_ack_seconds",
            "Time from a Send frame's arrival to its SendAck.",
        );
        self.replicate_round_trip.render(
            &mut out,
            "ringpost_replicate_round_trip_seconds",
            "Round trip of one Replicate request to a replica (the batch's send, apply and fsync there).",
        );
        out
    }

    /// [`Metrics::render`] with the group service's counters (`ringpost_group_*`) appended.
    pub fn render_with(&self, groups: &crate::groups::GroupMetrics) -> String {
        let mut out = self.render();
        groups.render(&mut out);
        out
    }
}

/// Writes Prometheus counters named `{prefix}{name}{suffix}`, each with its HELP and TYPE lines.
pub fn write_counters(
    out: &mut String,
    prefix: &str,
    suffix: &str,
    counters: &[(&str, &str, &AtomicU64)],
) {
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP {prefix}{name}{suffix} {help}\n# TYPE {prefix}{name}{suffix} counter\n{prefix}{name}{suffix} {}",
            v.load(Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(LATENCY_BUCKETS_S);
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_millis(2));
        h.observe(Duration::from_secs(10));
        let mut out = String::new();
        h.render(&mut out, "x", "y");
        assert!(out.contains("x_bucket{le=\"0.00005\"} 1"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.0025\"} 2"), "{out}");
        assert!(out.contains("x_bucket{le=\"5\"} 2"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3"), "{out}");
        assert!(out.contains("x_count 3"), "{out}");
    }

    #[test]
    fn render_names_every_transport() {
        let m = Metrics::default();
        m.connection_opened(Transport::Quic);
        let out = m.render();
        assert!(out.contains("ringpost_connections{transport=\"quic\"} 1"));
        assert!(out.contains("ringpost_connections{transport=\"ws\"} 0"));
        assert!(out.contains("\nringpost_ready 0\n"), "{out}");
        m.ready.store(1, Relaxed);
        assert!(m.render().contains("\nringpost_ready 1\n"));
    }
}
