//! `reconnect-storm`: N devices connected, all dropped at once (TCP resets, QUIC closes), a
//! message queued for each while they are away, then all reconnect at once. Figures: the time
//! until every device is back (its `Welcome`), and until every device is draining (its first
//! `Deliver`), with per-device percentiles of both.
//!
//! Reconnects go out as fast as `--connect-concurrency` allows per worker (no backoff, no
//! jitter: the worst case for the node).

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
use crate::worker::{Fleet, WorkerCtx, DONE};

/// Devices per worker that queue the messages for the dropped devices.
pub const SENDERS_PER_WORKER: usize = 8;

/// How long the parent waits for the node to notice the drops (its connection gauge falling).
pub const NOTICE_TIMEOUT: Duration = Duration::from_secs(30);

/// `reconnect-storm` options.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Args {
    /// Devices dropped and reconnected.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Messages queued to each device while it is away (0: only measure reconnects).
    #[arg(long, default_value_t = 1)]
    pub queue_per_device: u64,
    /// Sends awaiting their SendAck per sender, at most.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Seconds allowed for each phase.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
}

/// A `reconnect-storm` worker's parameters. Its last `senders` accounts queue the messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub senders: usize,
    pub queue_per_device: u64,
    pub window: usize,
    pub timeout_s: f64,
}

pub async fn worker(ctx: &mut WorkerCtx, spec: Spec) -> Result<Value> {
    let sh = Shared::new(
        ctx.connector.clone(),
        ctx.spec.connect_concurrency,
        SeriesOf::Connects,
        Duration::from_millis(SERIES_INTERVAL_MS),
    );
    let accounts = ctx.accounts.clone();
    let n_victims = accounts.len().saturating_sub(spec.senders);
    let (victims, senders) = accounts.split_at(n_victims);
    let (vic_tx, vic_rx) = watch::channel(Mode::Hold);
    let (send_tx, send_rx) = watch::channel(Mode::Hold);
    let victim_tasks: Vec<_> = victims
        .iter()
        .enumerate()
        .map(|(i, a)| {
            tokio::spawn(device(
                sh.clone(),
                a.clone(),
                None,
                i as u32,
                0,
                vic_rx.clone(),
            ))
        })
        .collect();
    let chunk = n_victims.div_ceil(senders.len().max(1)).max(1);
    let sender_tasks: Vec<_> = senders
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let to: Vec<_> = victims
                .iter()
                .skip(i * chunk)
                .take(chunk)
                .map(|v| (v.user, v.device))
                .collect();
            let plan = (!to.is_empty() && spec.queue_per_device > 0).then(|| SendPlan {
                limit: Some(to.len() as u64 * spec.queue_per_device),
                to,
                interval: None,
                offset: Duration::ZERO,
                window: spec.window.max(1),
                msg_bytes: 64,
            });
            tokio::spawn(device(
                sh.clone(),
                a.clone(),
                plan,
                i as u32,
                0,
                send_rx.clone(),
            ))
        })
        .collect();
    let n = accounts.len() as u64;
    super::report_progress(
        ctx,
        &sh,
        |s| s.counters.connected.load(Relaxed),
        |s| s.counters.connected.load(Relaxed) + s.counters.connect_failed.load(Relaxed) >= n,
    )
    .await;
    let connected_first = sh.counters.connected.load(Relaxed);
    ctx.phase("connected", json!({})).await?;

    // Drop every victim at once.
    let _ = vic_tx.send(Mode::Close);
    join_all(victim_tasks).await;
    ctx.phase("dropped", json!({})).await?;

    // Queue while they are away.
    let total = n_victims as u64 * spec.queue_per_device;
    let t_queue = Instant::now();
    if total > 0 {
        let _ = send_tx.send(Mode::Send { start: t_queue });
        let deadline = t_queue + Duration::from_secs_f64(spec.timeout_s);
        loop {
            let c = &sh.counters;
            let answered = c.acked_ok.load(Relaxed)
                + c.send_refused.load(Relaxed)
                + c.error_frames.load(Relaxed);
            ctx.progress(c.acked_ok.load(Relaxed), sh.errors());
            if answered >= total || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let queued = sh.counters.acked_ok.load(Relaxed);
    ctx.phase(
        "queued",
        json!({ "queued": queued, "queued_s": t_queue.elapsed().as_secs_f64() }),
    )
    .await?;

    // The storm.
    let t0 = Instant::now();
    let t0_ns = sh.ns_of(t0);
    sh.recorder
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .set_window(t0_ns, t0_ns, u64::MAX);
    let connected_before = sh.counters.connected.load(Relaxed);
    let failed_before = sh.counters.connect_failed.load(Relaxed);
    let (back_tx, back_rx) = watch::channel(Mode::Hold);
    let expect = spec.queue_per_device;
    let back_tasks: Vec<_> = victims
        .iter()
        .enumerate()
        .map(|(i, a)| {
            tokio::spawn(device(
                sh.clone(),
                a.clone(),
                None,
                i as u32,
                expect,
                back_rx.clone(),
            ))
        })
        .collect();
    let deadline = t0 + Duration::from_secs_f64(spec.timeout_s);
    let nv = n_victims as u64;
    loop {
        let c = &sh.counters;
        let back = c.connected.load(Relaxed) - connected_before;
        let failed = c.connect_failed.load(Relaxed) - failed_before;
        ctx.progress(back, sh.errors());
        let all_back = back + failed >= nv;
        let draining = expect == 0 || c.complete.load(Relaxed) + failed >= nv;
        if (all_back && draining) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = back_tx.send(Mode::Close);
    let _ = send_tx.send(Mode::Close);
    let outcomes = join_all(back_tasks).await;
    join_all(sender_tasks).await;
    ctx.connector.close_all();

    let mut back = stats::new_histogram();
    let mut draining = stats::new_histogram();
    let (mut back_n, mut draining_n) = (0u64, 0u64);
    for o in &outcomes {
        if let Some(at) = o.connected_ns {
            stats::record_us(&mut back, at.saturating_sub(t0_ns) / 1000);
            back_n += 1;
        }
        if let Some(at) = o.first_delivery_ns {
            stats::record_us(&mut draining, at.saturating_sub(t0_ns) / 1000);
            draining_n += 1;
        }
    }
    let mut report = sh.report()?;
    report["victims"] = nv.into();
    report["connected_first"] = connected_first.into();
    report["queued"] = queued.into();
    report["back"] = back_n.into();
    report["draining"] = draining_n.into();
    report["back_time"] = stats::encode(&back)?.into();
    report["draining_time"] = stats::encode(&draining)?.into();
    report["lost"] = queued
        .saturating_sub(sh.counters.delivered.load(Relaxed))
        .into();
    Ok(report)
}

pub async fn run(c: &Common, a: &Args) -> Result<Report> {
    if a.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let setup = Setup::new(c).await?;
    let (workers, in_process) = run::plan_workers(c, a.connections + SENDERS_PER_WORKER);
    let total_accounts = a.connections + workers * SENDERS_PER_WORKER;
    let accounts = setup.accounts(c, total_accounts).await?;
    let victims = &accounts[..a.connections];
    let senders = &accounts[a.connections..];
    let ranges = run::split(a.connections, workers, 1);
    let spec = Spec {
        senders: SENDERS_PER_WORKER,
        queue_per_device: a.queue_per_device,
        window: a.window,
        timeout_s: a.timeout,
    };
    let specs = setup.specs(
        c,
        workers,
        |i| {
            let mut v = victims[ranges[i].clone()].to_vec();
            v.extend_from_slice(&senders[i * SENDERS_PER_WORKER..(i + 1) * SENDERS_PER_WORKER]);
            v
        },
        |_| super::Spec::ReconnectStorm(spec.clone()),
    );
    let loadavg_before = crate::sysmem::loadavg_1m();
    let mut fleet = Fleet::start(specs, in_process).await?;
    let bar = run::bar(c, "connecting", total_accounts as u64);
    let b = bar.clone();
    fleet
        .wait("connected", &move |d, _| b.set_position(d))
        .await?;
    bar.finish_and_clear();
    fleet.go();
    fleet.wait("dropped", &|_, _| {}).await?;
    let noticed_s = wait_for_drops(&setup, (workers * SENDERS_PER_WORKER) as f64).await;
    let bar = run::bar(c, "queueing", a.connections as u64 * a.queue_per_device);
    let b = bar.clone();
    fleet.go();
    let queued = fleet.wait("queued", &move |d, _| b.set_position(d)).await?;
    bar.finish_and_clear();
    let bar = run::bar(c, "reconnecting", a.connections as u64);
    let b = bar.clone();
    let pids = fleet.pids();
    let before = setup.snapshot_with_generator(&pids).await;
    fleet.go();
    let datas = fleet.wait(DONE, &move |d, _| b.set_position(d)).await?;
    bar.finish_and_clear();
    let after = setup.snapshot_with_generator(&pids).await;
    let m = Merged::of(&datas)?;
    let back = stats::merge_encoded(datas.iter().filter_map(|d| d.get("back_time")?.as_str()))?;
    let draining = stats::merge_encoded(
        datas
            .iter()
            .filter_map(|d| d.get("draining_time")?.as_str()),
    )?;
    let sum = |k: &str| datas.iter().filter_map(|d| d.get(k)?.as_u64()).sum::<u64>();
    let queued_n: u64 = queued
        .iter()
        .filter_map(|q| q.get("queued")?.as_u64())
        .sum();

    let mut r = Report::new(
        "reconnect-storm",
        setup.transport_name(),
        a.connections as u64,
        m.errors(),
    );
    r.series = m.series.clone();
    r.series_label = "reconnects/s".into();
    let back_n = sum("back");
    let all_back_s = back.max() as f64 / 1e6;
    r.set_row(
        "all_back_s",
        round2(all_back_s),
        "all back",
        format!(
            "{back_n} of {} devices back (Welcome) within {all_back_s:.2} s",
            a.connections
        ),
    );
    r.set_percentiles("back_time_ms", "per-device back", Percentiles::of(&back));
    if a.queue_per_device > 0 {
        let draining_n = sum("draining");
        let all_draining_s = draining.max() as f64 / 1e6;
        r.set_row(
            "all_draining_s",
            round2(all_draining_s),
            "all draining",
            format!("{draining_n} of {} devices got their first queued message within {all_draining_s:.2} s ({queued_n} queued)", a.connections),
        );
        r.set_percentiles(
            "draining_time_ms",
            "per-device draining",
            Percentiles::of(&draining),
        );
    }
    if let Some(s) = noticed_s {
        r.set_row(
            "server_noticed_drops_s",
            round2(s),
            "drops noticed",
            format!("node's connection gauge fell within {s:.2} s of the drop"),
        );
    }
    r.set_percentiles(
        "connect_latency_ms",
        "connect→Welcome",
        Percentiles::of(&m.connect_latency),
    );
    r.set("errors_detail", m.error_detail());
    if let Some(e) = &m.first_error {
        r.row("first error", e.clone());
    }
    super::chat::server_side(&mut r, &before, &after);
    before.cpu_until(&after).report(&mut r, "", "CPU", None);
    run::probe_disk(&setup, &mut r).await;
    run::finish(
        c,
        &setup,
        r,
        serde_json::to_value(a)?,
        "connect attempt → Welcome",
        loadavg_before,
    )
}

/// Polls /metrics until the node's connection gauge is down to about `remaining`; the seconds
/// it took, or `None` without an admin port (then it just waits a second).
async fn wait_for_drops(setup: &Setup, remaining: f64) -> Option<f64> {
    let t = std::time::Instant::now();
    let Some(admin) = &setup.admin else {
        tokio::time::sleep(Duration::from_secs(1)).await;
        return None;
    };
    while t.elapsed() < NOTICE_TIMEOUT {
        if let Ok(m) = crate::node::scrape(admin).await {
            if crate::node::sum_of(&m, "ringpost_connections") <= remaining {
                return Some(t.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}
