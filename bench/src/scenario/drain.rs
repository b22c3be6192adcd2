//! `offline-drain`: senders queue M messages to devices that are offline, then those devices
//! connect all at once and drain their inboxes. Figures: the enqueue rate (durable `SendAck`s
//! per second), the drain rate (messages per second from the first reconnect until the last
//! device has everything), and each device's time to a full drain.
//!
//! A device drains through the node's delivery window (`Welcome.deliver_window` entries in
//! flight, 64 by default), so one device's drain is bounded by that window per round trip;
//! many devices drain in parallel.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use super::idle::round2;
use super::{device, join_all, Merged, Mode, SendPlan, SeriesOf, Shared, SERIES_INTERVAL_MS};
use crate::report::Report;
use crate::run::{self, Common, Setup};
use crate::stats::{self, Percentiles};
use crate::worker::{Fleet, WorkerCtx, DONE, PROGRESS_INTERVAL};

/// `offline-drain` options.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Args {
    /// Offline devices (each with one sender queueing to it).
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Messages queued in all, spread evenly over the devices (at most the node's inbox quota,
    /// 50000 by default, per device).
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Sends awaiting their SendAck per sender, at most.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Ciphertext bytes per message (at least 16).
    #[arg(long, default_value_t = 128)]
    pub msg_bytes: usize,
    /// Seconds allowed for queueing, and again for draining.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
}

/// An `offline-drain` worker's parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub per_device: u64,
    pub window: usize,
    pub msg_bytes: usize,
    pub timeout_s: f64,
}

pub async fn worker(ctx: &mut WorkerCtx, spec: Spec) -> Result<Value> {
    let sh = Shared::new(
        ctx.connector.clone(),
        ctx.spec.connect_concurrency,
        SeriesOf::Deliveries,
        Duration::from_millis(SERIES_INTERVAL_MS),
    );
    let accounts = ctx.accounts.clone();
    let pairs = accounts.len() / 2;
    let (send_tx, send_rx) = watch::channel(Mode::Hold);
    let senders: Vec<_> = (0..pairs)
        .map(|i| {
            let to = &accounts[2 * i + 1];
            let plan = SendPlan {
                to: vec![(to.user, to.device)],
                interval: None,
                offset: Duration::ZERO,
                window: spec.window.max(1),
                limit: Some(spec.per_device),
                msg_bytes: spec.msg_bytes,
            };
            tokio::spawn(device(
                sh.clone(),
                accounts[2 * i].clone(),
                Some(plan),
                i as u32,
                0,
                send_rx.clone(),
            ))
        })
        .collect();
    let n = pairs as u64;
    super::report_progress(
        ctx,
        &sh,
        |s| s.counters.connected.load(Relaxed),
        |s| s.counters.connected.load(Relaxed) + s.counters.connect_failed.load(Relaxed) >= n,
    )
    .await;
    ctx.phase("connected", json!({})).await?;

    // Queue.
    let t_queue = Instant::now();
    let _ = send_tx.send(Mode::Send { start: t_queue });
    let total = spec.per_device * n;
    let deadline = t_queue + Duration::from_secs_f64(spec.timeout_s);
    loop {
        let c = &sh.counters;
        let answered =
            c.acked_ok.load(Relaxed) + c.send_refused.load(Relaxed) + c.error_frames.load(Relaxed);
        ctx.progress(c.acked_ok.load(Relaxed), sh.errors());
        if answered >= total || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let queued_s = t_queue.elapsed().as_secs_f64();
    let queued = sh.counters.acked_ok.load(Relaxed);
    let _ = send_tx.send(Mode::Drain);
    ctx.phase("queued", json!({ "queued": queued, "queued_s": queued_s }))
        .await?;

    // Drain.
    let t0 = Instant::now();
    let t0_ns = sh.ns_of(t0);
    sh.recorder
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .set_window(t0_ns, t0_ns, u64::MAX);
    let delivered_before = sh.counters.delivered.load(Relaxed);
    let (recv_tx, recv_rx) = watch::channel(Mode::Hold);
    let expect = spec.per_device;
    let receivers: Vec<_> = (0..pairs)
        .map(|i| {
            tokio::spawn(device(
                sh.clone(),
                accounts[2 * i + 1].clone(),
                None,
                i as u32,
                expect,
                recv_rx.clone(),
            ))
        })
        .collect();
    let deadline = t0 + Duration::from_secs_f64(spec.timeout_s);
    loop {
        let c = &sh.counters;
        ctx.progress(c.delivered.load(Relaxed) - delivered_before, sh.errors());
        let ended = c.complete.load(Relaxed)
            + c.connect_failed.load(Relaxed)
            + c.closed_by_node.load(Relaxed)
            + c.transport_errors.load(Relaxed)
            >= n;
        if ended || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(PROGRESS_INTERVAL.min(Duration::from_millis(20))).await;
    }
    let _ = recv_tx.send(Mode::Close);
    let _ = send_tx.send(Mode::Close);
    let outcomes = join_all(receivers).await;
    join_all(senders).await;
    ctx.connector.close_all();

    let mut drain_time = stats::new_histogram();
    let mut last_ns = 0;
    for o in &outcomes {
        if let Some(done) = o.complete_ns {
            stats::record_us(&mut drain_time, done.saturating_sub(t0_ns) / 1000);
            last_ns = last_ns.max(done.saturating_sub(t0_ns));
        }
    }
    let drained = sh.counters.delivered.load(Relaxed) - delivered_before;
    let mut report = sh.report()?;
    report["lost"] = queued.saturating_sub(drained).into();
    report["queued"] = queued.into();
    report["queued_s"] = queued_s.into();
    report["drained"] = drained.into();
    report["drain_s"] = (last_ns as f64 / 1e9).into();
    report["drain_time"] = stats::encode(&drain_time)?.into();
    Ok(report)
}

pub async fn run(c: &Common, a: &Args) -> Result<Report> {
    if a.devices == 0 || a.messages < a.devices as u64 {
        bail!("--messages must be at least --devices, and --devices at least 1");
    }
    let setup = Setup::new(c).await?;
    let accounts_n = a.devices * 2;
    let accounts = setup.accounts(c, accounts_n).await?;
    let (workers, in_process) = run::plan_workers(c, accounts_n);
    let ranges = run::split(accounts_n, workers, 2);
    let per_device = a.messages / a.devices as u64;
    let spec = Spec {
        per_device,
        window: a.window,
        msg_bytes: a.msg_bytes,
        timeout_s: a.timeout,
    };
    let specs = setup.specs(
        c,
        workers,
        |i| accounts[ranges[i].clone()].to_vec(),
        |_| super::Spec::OfflineDrain(spec.clone()),
    );
    let loadavg_before = crate::sysmem::loadavg_1m();
    let mut fleet = Fleet::start(specs, in_process).await?;
    let pids = fleet.pids();
    let bar = run::bar(c, "connecting", a.devices as u64);
    let b = bar.clone();
    fleet
        .wait("connected", &move |d, _| b.set_position(d))
        .await?;
    bar.finish_and_clear();
    let total = per_device * a.devices as u64;
    let bar = run::bar(c, "queueing", total);
    let b = bar.clone();
    let before_queue = setup.snapshot_with_generator(&pids).await;
    fleet.go();
    let queued = fleet.wait("queued", &move |d, _| b.set_position(d)).await?;
    bar.finish_and_clear();
    let before = setup.snapshot_with_generator(&pids).await;
    let bar = run::bar(c, "draining", total);
    let b = bar.clone();
    fleet.go();
    let datas = fleet.wait(DONE, &move |d, _| b.set_position(d)).await?;
    bar.finish_and_clear();
    let after = setup.snapshot_with_generator(&pids).await;
    let merged = Merged::of(&datas)?;
    let queued_n: u64 = queued
        .iter()
        .filter_map(|q| q.get("queued")?.as_u64())
        .sum();
    let queued_s = queued
        .iter()
        .filter_map(|q| q.get("queued_s")?.as_f64())
        .fold(0.0, f64::max);
    let drained: u64 = datas
        .iter()
        .filter_map(|d| d.get("drained")?.as_u64())
        .sum();
    let drain_s = datas
        .iter()
        .filter_map(|d| d.get("drain_s")?.as_f64())
        .fold(0.0, f64::max);
    let drain_time =
        stats::merge_encoded(datas.iter().filter_map(|d| d.get("drain_time")?.as_str()))?;

    let mut r = Report::new(
        "offline-drain",
        setup.transport_name(),
        a.devices as u64 * 2,
        merged.errors(),
    );
    r.series = merged.series.clone();
    r.series_label = "delivered msgs/s".into();
    r.set_row(
        "queued",
        queued_n,
        "queued",
        format!(
            "{queued_n} of {total} messages in {queued_s:.2} s ({:.0}/s, durable SendAcks)",
            queued_n as f64 / queued_s.max(1e-9)
        ),
    );
    r.set(
        "enqueued_per_s",
        round2(queued_n as f64 / queued_s.max(1e-9)),
    );
    r.set_percentiles(
        "ack_latency_ms",
        "send→SendAck",
        Percentiles::of(&merged.ack_latency),
    );
    let rate = round2(drained as f64 / drain_s.max(1e-9));
    r.set_row(
        "delivered_per_s",
        rate,
        "drain rate",
        format!(
            "{rate:.0} msgs/s ({drained} delivered to {} devices in {drain_s:.2} s)",
            a.devices
        ),
    );
    r.set("drained", drained);
    r.set("drain_s", round2(drain_s));
    r.set_percentiles(
        "drain_time_ms",
        "per-device drain",
        Percentiles::of(&drain_time),
    );
    r.set_percentiles(
        "connect_latency_ms",
        "connect→Welcome",
        Percentiles::of(&merged.connect_latency),
    );
    r.set("errors_detail", merged.error_detail());
    if let Some(e) = &merged.first_error {
        r.row("first error", e.clone());
    }
    super::chat::server_side(&mut r, &before, &after);
    before_queue.cpu_until(&before).report(
        &mut r,
        "enqueue_",
        "enqueue CPU",
        Some((queued_n, "queued")),
    );
    before
        .cpu_until(&after)
        .report(&mut r, "", "drain CPU", Some((drained, "delivered")));
    run::probe_disk(&setup, &mut r).await;
    run::finish(
        c,
        &setup,
        r,
        serde_json::to_value(a)?,
        "queued → delivered",
        loadavg_before,
    )
}
