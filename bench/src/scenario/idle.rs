//! `idle`: N devices connect, authenticate and stay. The server's resident memory before the
//! first connection and after the last (plus a settling pause), divided by the connections,
//! is its cost per idle connection; the kernel's socket buffers and slab are measured the same
//! way and reported apart.

use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::{
    device, join_all, report_progress, Merged, Mode, SeriesOf, Shared, SERIES_INTERVAL_MS,
};
use crate::report::Report;
use crate::run::{self, Common, Setup};
use crate::stats::Percentiles;
use crate::worker::{Fleet, WorkerCtx, DONE};

/// `idle` options.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Args {
    /// Connections (devices) to open and hold.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Seconds to wait after the last connection before measuring (lets allocators and the
    /// node's sweeps settle).
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Seconds to hold the connections after measuring (pinging as the node asks), measuring
    /// again at the end.
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
}

/// What an `idle` worker needs beyond its accounts: nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {}

pub async fn worker(ctx: &mut WorkerCtx, _spec: Spec) -> Result<Value> {
    let sh = Shared::new(
        ctx.connector.clone(),
        ctx.spec.connect_concurrency,
        SeriesOf::Connects,
        Duration::from_millis(SERIES_INTERVAL_MS),
    );
    let start = sh.now_ns();
    sh.recorder
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .set_window(start, 0, u64::MAX);
    let (mode_tx, mode_rx) = watch::channel(Mode::Hold);
    let n = ctx.accounts.len() as u64;
    let tasks: Vec<_> = ctx
        .accounts
        .iter()
        .enumerate()
        .map(|(i, a)| {
            tokio::spawn(device(
                sh.clone(),
                a.clone(),
                None,
                i as u32,
                0,
                mode_rx.clone(),
            ))
        })
        .collect();
    let settled = |s: &Shared| {
        let c = &s.counters;
        c.connected.load(std::sync::atomic::Ordering::Relaxed)
            + c.connect_failed.load(std::sync::atomic::Ordering::Relaxed)
            >= n
    };
    report_progress(
        ctx,
        &sh,
        |s| {
            s.counters
                .connected
                .load(std::sync::atomic::Ordering::Relaxed)
        },
        settled,
    )
    .await;
    ctx.phase("connected", json!({})).await?;
    let _ = mode_tx.send(Mode::Close);
    join_all(tasks).await;
    ctx.connector.close_all();
    sh.report()
}

pub async fn run(c: &Common, a: &Args) -> Result<Report> {
    let setup = Setup::new(c).await?;
    run_with(c, &setup, a).await
}

/// `idle` against a node (or peer) already set up.
pub async fn run_with(c: &Common, setup: &Setup, a: &Args) -> Result<Report> {
    let accounts = setup.accounts(c, a.connections).await?;
    let (workers, in_process) = run::plan_workers(c, a.connections);
    let ranges = run::split(accounts.len(), workers, 1);
    let specs = setup.specs(
        c,
        workers,
        |i| accounts[ranges[i].clone()].to_vec(),
        |_| super::Spec::Idle(Spec {}),
    );
    let loadavg_before = crate::sysmem::loadavg_1m();
    let before = setup.snapshot().await;
    let t0 = std::time::Instant::now();
    let mut fleet = Fleet::start(specs, in_process).await?;
    let bar = run::bar(c, "connecting", a.connections as u64);
    let b = bar.clone();
    fleet
        .wait("connected", &move |done, errors| {
            b.set_position(done);
            b.set_message(format!("{errors} errors"));
        })
        .await?;
    let connect_s = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    let after = setup.snapshot().await;
    let held = if a.hold > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
        Some(setup.snapshot().await)
    } else {
        None
    };
    fleet.go();
    let datas = fleet.wait(DONE, &|_, _| {}).await?;
    let merged = Merged::of(&datas)?;
    let report = assemble(
        setup,
        a,
        &merged,
        &before,
        &after,
        held.as_ref(),
        connect_s,
        fleet.len(),
    );
    run::finish(
        c,
        setup,
        report,
        serde_json::to_value(a)?,
        "connect → Welcome",
        loadavg_before,
    )
}

/// The report from the merged worker figures and the server snapshots.
#[allow(clippy::too_many_arguments)]
pub fn assemble(
    setup: &Setup,
    a: &Args,
    m: &Merged,
    before: &run::Snapshot,
    after: &run::Snapshot,
    held: Option<&run::Snapshot>,
    connect_s: f64,
    workers: usize,
) -> Report {
    let connected = m.get("connected");
    let mut r = Report::new("idle", setup.transport_name(), connected, m.errors());
    r.series = m.series.clone();
    r.series_label = "connections/s".into();
    r.set_row(
        "requested",
        a.connections,
        "requested",
        a.connections.to_string(),
    );
    r.set("errors_detail", m.error_detail());
    if connected > 0 {
        if let (Some(b), Some(x)) = (before.rss_kib, after.rss_kib) {
            let per = round2((x as f64 - b as f64) / connected as f64);
            r.set_row(
                "server_rss_kib_per_conn",
                per,
                "server RSS/conn",
                format!("{per} KiB  (VmRSS {b} → {x} KiB)"),
            );
            r.set("server_rss_kib_before", b);
            r.set("server_rss_kib_after", x);
        }
        if let (Some(b), Some(x)) = (before.kernel, after.kernel) {
            let delta = x.total_kib() as f64 - b.total_kib() as f64;
            r.set(
                "kernel_delta",
                json!({ "before": b, "after": x, "total_kib": delta }),
            );
            if setup.loopback {
                // Both ends of a loopback connection are sockets of this host.
                let per = round2(delta / connected as f64 / 2.0);
                r.set_row(
                    "kernel_kib_per_conn",
                    per,
                    "kernel/conn",
                    format!(
                        "{per} KiB per socket (socket buffers + slab; both ends are on this host, \
                         so half of {:.0} KiB / conn)",
                        delta / connected as f64
                    ),
                );
            }
        }
        if let Some(h) = held {
            if let (Some(b), Some(x)) = (before.rss_kib, h.rss_kib) {
                let per = round2((x as f64 - b as f64) / connected as f64);
                r.set_row(
                    "server_rss_kib_per_conn_after_hold",
                    per,
                    "after hold",
                    format!("{per} KiB/conn  ({:.0} s)", a.hold),
                );
            }
        }
    }
    if let Some(n) = after
        .metrics
        .as_ref()
        .map(|m| crate::node::sum_of(m, "ringpost_connections"))
    {
        r.set_row(
            "server_connections",
            n,
            "node says",
            format!("{n} connections (/metrics)"),
        );
    }
    r.set_percentiles(
        "connect_latency_ms",
        "connect→Welcome",
        Percentiles::of(&m.connect_latency),
    );
    r.set_row(
        "connect_s",
        round2(connect_s),
        "connect time",
        format!(
            "{connect_s:.2} s  ({:.0} connections/s, {workers} worker(s))",
            connected as f64 / connect_s.max(1e-9)
        ),
    );
    before.report_drops(after, &mut r);
    if let Some(e) = &m.first_error {
        r.row("first error", e.clone());
    }
    r
}

/// Rounds to two decimals.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
