//! `idle`: devices connect, authenticate and stay, in two steps: half of them, a settling
//! pause and a measurement, then the other half, a pause and a measurement. The server's cost
//! per idle connection is the slope between the two, (RSS at 2N − RSS at N) / N, so neither
//! the allocator's warm-up (arenas, the runtime's first buffers) flatters the figure nor
//! memory the node holds whatever its connections penalises it. The old figure, (RSS at 2N −
//! RSS before the first) / 2N, is reported beside it, labelled. The kernel's socket buffers
//! and slab are measured the same way and reported apart.

use std::sync::atomic::Ordering::Relaxed;
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
    /// again at the end: memory after the hold, and the node's CPU per keepalive ping.
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
}

/// What an `idle` worker needs beyond its accounts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// Connect the first half of the accounts, report phase [`HALF`] and wait for the
    /// go-ahead, then connect the rest.
    pub two_steps: bool,
}

/// The phase a two-step `idle` worker reports when its first half is connected.
pub const HALF: &str = "half";

pub async fn worker(ctx: &mut WorkerCtx, spec: Spec) -> Result<Value> {
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
    let accounts = ctx.accounts.clone();
    let n = accounts.len();
    let first = if spec.two_steps { n / 2 } else { n };
    let connect = |range: std::ops::Range<usize>| -> Vec<_> {
        range
            .map(|i| {
                tokio::spawn(device(
                    sh.clone(),
                    accounts[i].clone(),
                    None,
                    i as u32,
                    0,
                    mode_rx.clone(),
                ))
            })
            .collect()
    };
    let settled = |upto: usize| {
        move |s: &Shared| {
            let c = &s.counters;
            c.connected.load(Relaxed) + c.connect_failed.load(Relaxed) >= upto as u64
        }
    };
    let connected = |s: &Shared| s.counters.connected.load(Relaxed);
    let mut tasks = connect(0..first);
    report_progress(ctx, &sh, connected, settled(first)).await;
    if spec.two_steps {
        ctx.phase(HALF, json!({ "connected": connected(&sh) }))
            .await?;
        tasks.extend(connect(first..n));
        report_progress(ctx, &sh, connected, settled(n)).await;
    }
    ctx.phase("connected", json!({ "connected": connected(&sh) }))
        .await?;
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
    let two_steps = a.connections >= 2;
    let specs = setup.specs(
        c,
        workers,
        |i| accounts[ranges[i].clone()].to_vec(),
        |_| super::Spec::Idle(Spec { two_steps }),
    );
    let loadavg_before = crate::sysmem::loadavg_1m();
    let before = setup.snapshot().await;
    let t0 = std::time::Instant::now();
    let mut fleet = Fleet::start(specs, in_process).await?;
    let bar = run::bar(c, "connecting", a.connections as u64);
    let b = bar.clone();
    let progress = move |done, errors| {
        b.set_position(done);
        b.set_message(format!("{errors} errors"));
    };
    let mut half = None;
    let mut connect_s = 0.0;
    if two_steps {
        let datas = fleet.wait(HALF, &progress).await?;
        connect_s += t0.elapsed().as_secs_f64();
        let connected: u64 = datas
            .iter()
            .filter_map(|d| d.get("connected")?.as_u64())
            .sum();
        tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
        half = Some((setup.snapshot().await, connected));
        bar.set_message("second half");
    }
    let t1 = std::time::Instant::now();
    fleet.go();
    fleet.wait("connected", &progress).await?;
    connect_s += t1.elapsed().as_secs_f64();
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
        Snapshots {
            before: &before,
            half: half.as_ref().map(|(s, n)| (s, *n)),
            after: &after,
            held: held.as_ref(),
        },
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

/// The server's state through an `idle` run.
pub struct Snapshots<'a> {
    /// Before the first connection.
    pub before: &'a run::Snapshot,
    /// After the first half connected and settled, with the connections then (two steps).
    pub half: Option<(&'a run::Snapshot, u64)>,
    /// After all connected and settled.
    pub after: &'a run::Snapshot,
    /// After `--hold`.
    pub held: Option<&'a run::Snapshot>,
}

/// The report from the merged worker figures and the server snapshots.
pub fn assemble(
    setup: &Setup,
    a: &Args,
    m: &Merged,
    snaps: Snapshots<'_>,
    connect_s: f64,
    workers: usize,
) -> Report {
    let Snapshots {
        before,
        half,
        after,
        held,
    } = snaps;
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
            if let Some((slope, at_half, n_half)) =
                slope(half.and_then(|(s, n)| Some((s.rss_kib?, n))), x, connected)
            {
                r.set_row(
                    "server_rss_kib_per_conn_slope",
                    slope,
                    "server RSS/conn",
                    format!(
                        "{slope} KiB  (slope: VmRSS {at_half} KiB at {n_half} → {x} KiB at \
                         {connected} connections)"
                    ),
                );
                r.set("server_rss_kib_at_half", at_half);
                r.set("connections_at_half", n_half);
            }
            r.set_row(
                "server_rss_kib_per_conn",
                per,
                "… from zero",
                format!("{per} KiB  (old figure: VmRSS {b} before the first → {x} KiB, ÷ all)"),
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
                let kernel_half = half.and_then(|(s, n)| Some((s.kernel?.total_kib(), n)));
                if let Some((slope, _, _)) = slope(kernel_half, x.total_kib(), connected) {
                    let per = round2(slope / 2.0);
                    r.set("kernel_kib_per_conn_slope", per);
                }
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
            // Keepalive: the node's CPU over the hold, per frame it read then (the pings; an
            // idle connection sends nothing else).
            let cpu = after.cpu_until(h);
            let pings = after.metric_delta(h, "ringpost_frames_in_total");
            if let (Some(node_s), Some(pings)) = (cpu.node_s, pings) {
                if pings > 0.0 {
                    let us = round2(node_s * 1e6 / pings);
                    r.set("keepalive_pings", pings);
                    r.set_row(
                        "keepalive_node_cpu_us_per_ping",
                        us,
                        "keepalive",
                        format!(
                            "{us} µs of node CPU per ping ({pings:.0} pings in {:.0} s, node CPU \
                             {node_s:.2} s; timer ticks of 10 ms, so short holds are coarse)",
                            cpu.wall_s
                        ),
                    );
                }
            }
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

/// The slope between the half-way measurement (`half`: KiB and connections) and the full
/// one, in KiB per connection, with the half-way figures; `None` without a half-way
/// measurement or without connections between the two.
fn slope(
    half: Option<(u64, u64)>,
    full_kib: u64,
    full_connections: u64,
) -> Option<(f64, u64, u64)> {
    let (half_kib, half_connections) = half?;
    let added = full_connections
        .checked_sub(half_connections)
        .filter(|&n| n > 0)?;
    Some((
        round2((full_kib as f64 - half_kib as f64) / added as f64),
        half_kib,
        half_connections,
    ))
}

/// Rounds to two decimals.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_counts_only_the_second_half() {
        // 10000 KiB at 500 connections, 12500 KiB at 1000: 5 KiB per added connection.
        assert_eq!(
            slope(Some((10_000, 500)), 12_500, 1000),
            Some((5.0, 10_000, 500))
        );
        // Shrinking memory gives a negative slope, reported as it is.
        assert_eq!(slope(Some((10_000, 500)), 9_500, 1000).unwrap().0, -1.0);
        assert_eq!(slope(None, 12_500, 1000), None);
        assert_eq!(
            slope(Some((10_000, 1000)), 12_500, 1000),
            None,
            "none added"
        );
    }
}
