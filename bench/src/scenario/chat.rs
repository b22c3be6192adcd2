//! `chat`: 1:1 pairs, both devices of a pair sending to each other, at a fixed offered rate
//! (open loop: each sender has a schedule, and latency counts from when a message was due, so
//! a stall shows up in full rather than hiding behind the sends it delayed), or saturating with
//! a bounded window of sends awaiting their `SendAck` per device.
//!
//! Figures: send → deliver latency (HDR: p50, p99, p999, max), `SendAck` latency, delivered
//! msgs/s over the measured window (after the warm-up), and errors, including messages the
//! node acknowledged that never arrived.
//!
//! Pairs are made once every device is connected ([`pairing`]): against a cluster,
//! `--pairing same-node` or `cross-node` pairs devices by the node their connections ended on,
//! to tell the latency of a local delivery from one that crosses to another node. Each worker
//! pairs its own devices (both ends of a pair share the worker's clock) and keeps its share of
//! the offered rate, spread over the pairs it could make.

pub mod pairing;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::idle::round2;
use super::{
    device_planned, join_all, Merged, Mode, PlanOf, SendPlan, SeriesOf, Shared, SENT_LATE_AFTER,
    SERIES_INTERVAL_MS,
};
use crate::report::Report;
use crate::run::{self, Common, Setup};
use crate::stats::Percentiles;
use crate::worker::{Fleet, WorkerCtx, DONE, PROGRESS_INTERVAL};
use pairing::{Pairing, Summary};

/// Delay between the go-ahead and the first send, so every worker starts on its schedule.
pub const START_DELAY: Duration = Duration::from_millis(100);

/// Pause after telling devices to stop sending before counting what is still in flight.
pub const DRAIN_GRACE: Duration = Duration::from_millis(100);

/// Offered messages per second per sending device, at most. Bounds the work of counting a
/// stalled sender's unsent messages (one histogram record each) at the end of sending.
pub const RATE_PER_SENDER_MAX: f64 = 100_000.0;

/// Generator CPU, in percent of one core per generator process, above which the report says
/// the generator may be what limits the run (each process's runtime has a thread per core,
/// so this is a hint, not a ceiling).
pub const GENERATOR_BUSY_PERCENT_PER_PROCESS: f64 = 80.0;

/// `chat` options.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Args {
    /// Pairs of devices (each pair is two connections sending to each other).
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Offered messages per second, all senders together; 0: saturate (each device keeps
    /// --window sends in flight).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Sends awaiting their SendAck per device, at most.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Ciphertext bytes per message (at least 16: the bench's timestamp header).
    #[arg(long, default_value_t = 128)]
    pub msg_bytes: usize,
    /// Seconds of sending before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to wait after sending stops for every acknowledged message to arrive.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// Which devices pair up, decided once all are connected: neighbours in the accounts list
    /// (any), or by the node each connection ended on after redirects (same-node, cross-node;
    /// for a cluster). Pairs that cannot be made are left out and the report says so; no pair
    /// at all is an error.
    #[arg(long, value_enum, default_value_t = Pairing::Any)]
    pub pairing: Pairing,
}

/// A `chat` worker's parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// Messages per second per sending device; 0: saturate.
    pub rate_per_sender: f64,
    pub window: usize,
    pub msg_bytes: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub drain_timeout_s: f64,
    /// This worker's first sender among all senders, and their number (spreads schedules).
    pub first_sender: usize,
    pub senders_total: usize,
    pub pairing: Pairing,
}

pub async fn worker(ctx: &mut WorkerCtx, spec: Spec) -> Result<Value> {
    let sh = Shared::new(
        ctx.connector.clone(),
        ctx.spec.connect_concurrency,
        SeriesOf::Deliveries,
        Duration::from_millis(SERIES_INTERVAL_MS),
    );
    let (mode_tx, mode_rx) = watch::channel(Mode::Hold);
    let accounts = ctx.accounts.clone();
    if !accounts.len().is_multiple_of(2) {
        bail!("chat needs whole pairs");
    }
    let mut tasks = Vec::with_capacity(accounts.len());
    let mut node_rxs = Vec::with_capacity(accounts.len());
    let mut plan_txs = Vec::with_capacity(accounts.len());
    for (i, me) in accounts.iter().enumerate() {
        let (node_tx, node_rx) = oneshot::channel();
        let (plan_tx, plan_rx) = oneshot::channel();
        node_rxs.push(node_rx);
        plan_txs.push(plan_tx);
        tasks.push(tokio::spawn(device_planned(
            sh.clone(),
            me.clone(),
            PlanOf::AfterConnect {
                node: node_tx,
                plan: plan_rx,
            },
            (spec.first_sender + i) as u32,
            0,
            mode_rx.clone(),
        )));
    }
    let n = accounts.len() as u64;
    super::report_progress(
        ctx,
        &sh,
        |s| s.counters.connected.load(Relaxed),
        |s| s.counters.connected.load(Relaxed) + s.counters.connect_failed.load(Relaxed) >= n,
    )
    .await;
    // Every device has connected or failed: each says its node, or dropped its sender.
    let mut nodes = Vec::with_capacity(accounts.len());
    for rx in node_rxs {
        nodes.push(rx.await.ok().flatten());
    }
    let pairs = pairing::pair(spec.pairing, &nodes);
    // This worker's share of the offered rate, spread over the senders it could pair.
    let senders = pairs.len() * 2;
    let rate_per_sender = spec.rate_per_sender * accounts.len() as f64 / senders.max(1) as f64;
    let interval = (rate_per_sender > 0.0).then(|| Duration::from_secs_f64(1.0 / rate_per_sender));
    let mut plans: Vec<Option<SendPlan>> = vec![None; accounts.len()];
    let sending = pairs.iter().flat_map(|&(a, b)| [(a, b), (b, a)]);
    for (k, (me, peer)) in sending.enumerate() {
        // Senders spread evenly over the interval; with every device paired, sender `k` of the
        // run is device `k`, as before pairing existed.
        let slot = spec.first_sender + k * accounts.len() / senders;
        let offset = interval.map_or(Duration::ZERO, |iv| {
            iv.mul_f64(slot as f64 / spec.senders_total.max(1) as f64)
        });
        plans[me] = Some(SendPlan {
            to: vec![(accounts[peer].user, accounts[peer].device)],
            interval,
            offset,
            window: spec.window.max(1),
            limit: None,
            msg_bytes: spec.msg_bytes,
        });
    }
    for (tx, plan) in plan_txs.into_iter().zip(plans) {
        let _ = tx.send(plan);
    }
    let summary = Summary::of(spec.pairing, &nodes, &pairs);
    ctx.phase("connected", serde_json::to_value(&summary)?)
        .await?;

    let start = Instant::now() + START_DELAY;
    let start_ns = sh.ns_of(start);
    let from_ns = start_ns + (spec.warmup_s * 1e9) as u64;
    let to_ns = from_ns + (spec.duration_s * 1e9) as u64;
    sh.recorder
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .set_window(start_ns, from_ns, to_ns);
    let _ = mode_tx.send(Mode::Send { start });
    let end = start + Duration::from_secs_f64(spec.warmup_s + spec.duration_s);
    while Instant::now() < end {
        ctx.progress(sh.counters.delivered.load(Relaxed), sh.errors());
        tokio::time::sleep(PROGRESS_INTERVAL.min(end.saturating_duration_since(Instant::now())))
            .await;
    }
    let _ = mode_tx.send(Mode::Drain);
    // Devices see the mode change a moment later and may send once more meanwhile.
    tokio::time::sleep(DRAIN_GRACE).await;
    let drain_end = Instant::now() + Duration::from_secs_f64(spec.drain_timeout_s);
    loop {
        let c = &sh.counters;
        let expected = if ctx.connector.acknowledges_sends() {
            c.acked_ok.load(Relaxed)
        } else {
            c.sent.load(Relaxed)
        };
        let settled = c.inflight.load(Relaxed) == 0 && c.delivered.load(Relaxed) >= expected;
        if settled || Instant::now() >= drain_end {
            break;
        }
        ctx.progress(c.delivered.load(Relaxed), sh.errors());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained_s = Instant::now().saturating_duration_since(end).as_secs_f64();
    let _ = mode_tx.send(Mode::Close);
    join_all(tasks).await;
    ctx.connector.close_all();
    let c = &sh.counters;
    // Without acknowledgements (core NATS) every message sent should arrive.
    let expected = if ctx.connector.acknowledges_sends() {
        c.acked_ok.load(Relaxed)
    } else {
        c.sent.load(Relaxed)
    };
    let lost = expected.saturating_sub(c.delivered.load(Relaxed));
    let mut report = sh.report()?;
    report["lost"] = lost.into();
    report["drained_s"] = drained_s.into();
    Ok(report)
}

pub async fn run(c: &Common, a: &Args) -> Result<Report> {
    if a.pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    let setup = Setup::new(c).await?;
    run_with(c, &setup, a).await
}

/// `chat` against a node (or peer) already set up.
pub async fn run_with(c: &Common, setup: &Setup, a: &Args) -> Result<Report> {
    let devices = a.pairs * 2;
    if a.rate / devices.max(1) as f64 > RATE_PER_SENDER_MAX {
        bail!(
            "--rate {} over {devices} sending devices is more than {RATE_PER_SENDER_MAX} msgs/s \
             per device; give more --pairs",
            a.rate
        );
    }
    let accounts = setup.accounts(c, devices).await?;
    let (workers, in_process) = run::plan_workers(c, devices);
    let ranges = run::split(devices, workers, 2);
    let spec_of = |i: usize| {
        super::Spec::Chat(Spec {
            rate_per_sender: a.rate / devices as f64,
            window: a.window,
            msg_bytes: a.msg_bytes,
            warmup_s: a.warmup,
            duration_s: a.duration,
            drain_timeout_s: a.drain_timeout,
            first_sender: ranges[i].start,
            senders_total: devices,
            pairing: a.pairing,
        })
    };
    let specs = setup.specs(
        c,
        workers,
        |i| accounts[ranges[i].clone()].to_vec(),
        spec_of,
    );
    let loadavg_before = crate::sysmem::loadavg_1m();
    let mut fleet = Fleet::start(specs, in_process).await?;
    let bar = run::bar(c, "connecting", devices as u64);
    let b = bar.clone();
    let placed = fleet
        .wait("connected", &move |done, errors| {
            b.set_position(done);
            b.set_message(format!("{errors} errors"));
        })
        .await?;
    bar.finish_and_clear();
    let mut pairing = Summary {
        mode: a.pairing,
        ..Summary::default()
    };
    for p in placed {
        pairing.add(&serde_json::from_value(p).context("a worker's pairing")?);
    }
    if pairing.pairs == 0 {
        bail!(
            "--pairing {}: no pair can be made of the {} devices (devices per node: {}); \
             same-node needs two devices on one node, cross-node devices on at least two nodes \
             (give every node of the cluster with --target)",
            a.pairing.name(),
            devices,
            pairing.devices_text()
        );
    }
    // CPU is measured over the window the delivered count covers: from the end of the
    // warm-up to the end of sending, as each worker counts from its go-ahead (which reaches
    // it within a pipe's latency of this one).
    let pids = fleet.pids();
    let go_at = Instant::now();
    let from = go_at + START_DELAY + Duration::from_secs_f64(a.warmup);
    let to = from + Duration::from_secs_f64(a.duration);
    fleet.go();
    let bar = run::bar(c, "chatting", 0);
    bar.set_length(if a.rate > 0.0 {
        (a.rate * (a.warmup + a.duration)) as u64
    } else {
        0
    });
    let b = bar.clone();
    let window = async {
        tokio::time::sleep_until(from).await;
        let before = setup.snapshot_with_generator(&pids).await;
        tokio::time::sleep_until(to).await;
        let after = setup.snapshot_with_generator(&pids).await;
        Ok::<_, anyhow::Error>((before, after))
    };
    let progress = move |done, errors| {
        b.set_position(done);
        b.set_message(format!("delivered, {errors} errors"));
    };
    let (datas, (before, after)) = tokio::try_join!(fleet.wait(DONE, &progress), window)?;
    bar.finish_and_clear();
    let merged = Merged::of(&datas)?;
    let drained_s = datas
        .iter()
        .filter_map(|d| d.get("drained_s")?.as_f64())
        .fold(0.0, f64::max);
    let mut report = assemble(setup.transport_name(), a, &merged, fleet.len(), &pairing);
    report.set_row(
        "drain_s",
        round2(drained_s),
        "drain",
        format!("{drained_s:.2} s after sending stopped"),
    );
    server_side(&mut report, &before, &after);
    let cpu = before.cpu_until(&after);
    cpu.report(
        &mut report,
        "",
        "CPU",
        Some((merged.get("delivered_in_window"), "delivered")),
    );
    generator_hint(&mut report, &cpu, 1 + pids.len());
    run::probe_disk(setup, &mut report).await;
    run::finish(
        c,
        setup,
        report,
        serde_json::to_value(a)?,
        "send → deliver",
        loadavg_before,
    )
}

/// The report from the merged worker figures.
pub fn assemble(
    transport: &str,
    a: &Args,
    m: &Merged,
    workers: usize,
    pairing: &Summary,
) -> Report {
    let mut r = Report::new("chat", transport, m.get("connected"), m.errors());
    r.series = m.series.clone();
    r.series_label = "delivered msgs/s".into();
    let mode = if a.rate > 0.0 {
        format!("{:.0} msgs/s offered", a.rate)
    } else {
        format!("saturating, window {} per device", a.window)
    };
    r.set_row(
        "pairs",
        a.pairs,
        "pairs",
        format!(
            "{} ({mode}, {} B messages, {workers} worker(s))",
            a.pairs, a.msg_bytes
        ),
    );
    r.set_row("pairing", pairing, "pairing", pairing.text());
    if a.rate > 0.0 {
        r.set("offered_per_s", a.rate);
    }
    let delivered_per_s = round2(m.get("delivered_in_window") as f64 / a.duration.max(1e-9));
    r.set_row(
        "delivered_per_s",
        delivered_per_s,
        "delivered/s",
        format!(
            "{delivered_per_s:.0} msgs/s over {:.1} s after {:.1} s warm-up",
            a.duration, a.warmup
        ),
    );
    r.set_percentiles("latency_ms", "send→deliver", Percentiles::of(&m.latency));
    if a.rate > 0.0 {
        let (sent, late, unsent) = (
            m.get("due_sent"),
            m.get("due_sent_late"),
            m.get("due_unsent"),
        );
        r.set_row(
            "open_loop",
            json!({
                "due": sent + unsent,
                "sent": sent,
                "sent_late": late,
                "unsent": unsent,
                "sent_late_after_ms": SENT_LATE_AFTER.as_secs_f64() * 1000.0,
            }),
            "schedule",
            format!(
                "{} fell due in the measured window: {sent} sent ({late} more than {} ms late), \
                 {unsent} never sent (counted in send→deliver as late by the end of sending)",
                sent + unsent,
                SENT_LATE_AFTER.as_millis()
            ),
        );
    }
    r.set_percentiles(
        "ack_latency_ms",
        "send→SendAck",
        Percentiles::of(&m.ack_latency),
    );
    r.set_row(
        "messages",
        json!({
            "sent": m.get("sent"),
            "acked_ok": m.get("acked_ok"),
            "delivered": m.get("delivered"),
            "receipts": m.get("receipts"),
            "stale_delivered": m.get("stale_delivered"),
            "lost": m.get("lost"),
        }),
        "messages",
        format!(
            "{} sent, {} acked, {} delivered, {} receipts, {} acked but not delivered within the drain \
             timeout, {} left over from earlier runs",
            m.get("sent"),
            m.get("acked_ok"),
            m.get("delivered"),
            m.get("receipts"),
            m.get("lost"),
            m.get("stale_delivered")
        ),
    );
    r.set("errors_detail", m.error_detail());
    if !m.error_codes.is_empty() {
        r.row("error codes", format!("{:?}", m.error_codes));
    }
    if m.error_codes.keys().any(|k| k.starts_with("RateLimited")) {
        r.row(
            "hint",
            "the node's per-device rate limit refused sends: start it with --device-rate 1000000 \
             --device-burst 1000000 (the bench does not pace itself to it)"
                .into(),
        );
    }
    if let Some(e) = &m.first_error {
        r.row("first error", e.clone());
    }
    r
}

/// Says so when the generator's CPU suggests it, rather than the node, may be the limit.
pub fn generator_hint(r: &mut Report, cpu: &run::CpuUse, processes: usize) {
    let Some(g) = cpu.generator_s else {
        return;
    };
    let percent = g / cpu.wall_s.max(1e-9) * 100.0;
    if percent > GENERATOR_BUSY_PERCENT_PER_PROCESS * processes as f64 {
        r.row(
            "hint",
            format!(
                "the load generator used {percent:.0}% of a core over {processes} process(es): it \
                 may be the limit; spread it with --workers N (see generator_cpu_us_per_msg)"
            ),
        );
    }
}

/// Server-side figures between two snapshots: drops, and the node's own view of commit and
/// ack latency (Prometheus buckets: upper bounds). CPU is reported by [`run::CpuUse`].
pub fn server_side(r: &mut Report, before: &run::Snapshot, after: &run::Snapshot) {
    before.report_drops(after, r);
    if let Some(acc) = before.metric_delta(after, "ringpost_messages_accepted_total") {
        r.set("server_messages_accepted", acc);
    }
    let wal = before.metric_quantile_ms(after, "ringpost_inbox_wal_sync_seconds", 0.99);
    let wal50 = before.metric_quantile_ms(after, "ringpost_inbox_wal_sync_seconds", 0.5);
    let ack = before.metric_quantile_ms(after, "ringpost_send_ack_seconds", 0.99);
    let commits = before.metric_delta(after, "ringpost_inbox_commits_total");
    let reqs = before.metric_delta(after, "ringpost_inbox_commit_requests_total");
    if wal.is_some() || ack.is_some() {
        r.set("server_wal_sync_p99_ms_le", wal);
        r.set("server_wal_sync_p50_ms_le", wal50);
        r.set("server_send_ack_p99_ms_le", ack);
        r.set("server_inbox_commits", commits);
        r.set("server_inbox_commit_requests", reqs);
        let mut parts = Vec::new();
        if let (Some(v50), Some(v)) = (wal50, wal) {
            parts.push(format!("WAL sync p50 ≤ {v50} ms, p99 ≤ {v} ms"));
        }
        if let Some(v) = ack {
            parts.push(format!("Send→SendAck p99 ≤ {v} ms"));
        }
        if let (Some(c), Some(q)) = (commits, reqs) {
            if c > 0.0 {
                let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
                parts.push(format!(
                    "{:.0} synced commits/s of {:.1} requests each",
                    c / secs,
                    q / c
                ));
            }
        }
        r.row(
            "node says",
            format!("{} (its histogram buckets: upper bounds)", parts.join(", ")),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{MEASURED_KEYS, REQUIRED_KEYS};
    use crate::stats;

    /// A worker's final report as `Shared::report` writes it, with made-up figures.
    fn worker_report(delivered: u64) -> Value {
        let mut h = stats::new_histogram();
        for i in 0..delivered {
            stats::record_us(&mut h, 500 + i);
        }
        let enc = stats::encode(&h).unwrap();
        let empty = stats::encode(&stats::new_histogram()).unwrap();
        json!({
            "connected": 4, "connect_failed": 0, "sent": delivered, "acked_ok": delivered,
            "send_refused": 0, "delivered": delivered, "delivered_in_window": delivered,
            "stale_delivered": 0, "receipts": delivered, "closed_by_node": 0,
            "transport_errors": 0, "error_frames": 0, "error_codes": {}, "complete": 0,
            "first_error": null, "latency": enc, "ack_latency": enc, "connect_latency": empty,
            "series": [{"delivered": delivered, "acked": delivered, "latency": enc}],
            "lost": 0, "drained_s": 0.1,
        })
    }

    #[test]
    fn chat_report_has_every_key_scripts_read() {
        let m = Merged::of(&[worker_report(100), worker_report(300)]).unwrap();
        let a = Args {
            pairs: 4,
            rate: 0.0,
            window: 16,
            msg_bytes: 128,
            warmup: 1.0,
            duration: 2.0,
            drain_timeout: 5.0,
            pairing: Pairing::Any,
        };
        let nodes = vec![Some(1); 8];
        let pairing = Summary::of(a.pairing, &nodes, &pairing::pair(a.pairing, &nodes));
        let r = assemble("ws", &a, &m, 2, &pairing);
        let v = r.to_json();
        for k in REQUIRED_KEYS {
            assert!(v.get(k).is_some(), "{k}");
        }
        for k in ["delivered_per_s", "latency_ms", "ack_latency_ms"] {
            assert!(MEASURED_KEYS.contains(&k));
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["connections"], 8);
        assert_eq!(v["pairing"]["mode"], "any");
        assert_eq!(v["pairing"]["pairs"], 4);
        assert_eq!(v["errors"], 0);
        assert_eq!(v["delivered_per_s"], 200.0);
        assert_eq!(v["latency_ms"]["count"], 400);
        assert_eq!(r.series.len(), 1);
        assert_eq!(r.series[0].delivered_per_s, 400.0);
    }

    #[test]
    fn open_loop_runs_say_how_many_fell_due_and_were_sent() {
        let mut w = worker_report(10);
        w["due_sent"] = 10.into();
        w["due_sent_late"] = 4.into();
        w["due_unsent"] = 6.into();
        let m = Merged::of(&[w.clone(), w]).unwrap();
        let mut a = Args {
            pairs: 4,
            rate: 100.0,
            window: 16,
            msg_bytes: 128,
            warmup: 1.0,
            duration: 2.0,
            drain_timeout: 5.0,
            pairing: Pairing::Any,
        };
        let nodes = vec![Some(1); 8];
        let pairing = Summary::of(a.pairing, &nodes, &pairing::pair(a.pairing, &nodes));
        let v = assemble("ws", &a, &m, 2, &pairing).to_json();
        assert_eq!(v["open_loop"]["due"], 32);
        assert_eq!(v["open_loop"]["sent"], 20);
        assert_eq!(v["open_loop"]["sent_late"], 8);
        assert_eq!(v["open_loop"]["unsent"], 12);
        a.rate = 0.0;
        let v = assemble("ws", &a, &m, 2, &pairing).to_json();
        assert!(
            v.get("open_loop").is_none(),
            "saturating runs have no schedule"
        );
    }

    #[test]
    fn lost_messages_and_refusals_are_errors() {
        let mut w = worker_report(10);
        w["lost"] = 3.into();
        w["send_refused"] = 2.into();
        w["error_codes"] = json!({"RateLimited(20)": 2});
        let m = Merged::of(&[w]).unwrap();
        assert_eq!(m.errors(), 5);
        assert_eq!(m.error_detail()["error_codes"]["RateLimited(20)"], 2);
    }
}
