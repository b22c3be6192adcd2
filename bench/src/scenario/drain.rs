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
    let stale_before = sh.counters.stale.load(Relaxed);
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
    // Receivers stay connected, and senders keep acknowledging the `delivered` receipts the
    // receivers' acks make the node store for them, until the parent has seen the node's
    // inbox back where it was.
    ctx.phase(
        "delivered",
        json!({
            "drained": sh.counters.delivered.load(Relaxed) - delivered_before,
            "stale_in_drain": sh.counters.stale.load(Relaxed) - stale_before,
        }),
    )
    .await?;
    let _ = recv_tx.send(Mode::Close);
    let _ = send_tx.send(Mode::Close);
    let outcomes = join_all(receivers).await;
    join_all(senders).await;
    ctx.connector.close_all();

    let drained = sh.counters.delivered.load(Relaxed) - delivered_before;
    let mut drain_time = stats::new_histogram();
    let mut last_ns = 0;
    for o in &outcomes {
        if let Some(done) = o.complete_ns {
            stats::record_us(&mut drain_time, done.saturating_sub(t0_ns) / 1000);
            last_ns = last_ns.max(done.saturating_sub(t0_ns));
        }
    }
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
    let queued_n: u64 = queued
        .iter()
        .filter_map(|q| q.get("queued")?.as_u64())
        .sum();
    let after_queue = before.inbox_entries();
    // The gauge is polled from the go-ahead on; the target is known once the receivers say
    // how many leftovers of earlier runs they drained.
    let (target_tx, target_rx) = watch::channel(None);
    let go_at = Instant::now();
    let deadline = go_at + Duration::from_secs_f64(a.timeout);
    fleet.go();
    let progress = move |d, _| b.set_position(d);
    let delivered = async {
        let delivered = fleet.wait("delivered", &progress).await?;
        let stale: u64 = delivered
            .iter()
            .filter_map(|d| d.get("stale_in_drain")?.as_u64())
            .sum();
        let _ = target_tx.send(after_queue.map(|n| inbox_target(n, queued_n, stale)));
        Ok::<_, anyhow::Error>(stale)
    };
    let poll = async {
        Ok(match after_queue {
            Some(_) => Some(wait_for_inbox(&setup, target_rx, go_at, deadline).await),
            None => None,
        })
    };
    let (stale, inbox) = tokio::try_join!(delivered, poll)?;
    bar.finish_and_clear();
    let after = setup.snapshot_with_generator(&pids).await;
    fleet.go();
    let datas = fleet.wait(DONE, &|_, _| {}).await?;
    let merged = Merged::of(&datas)?;
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
    let mut errors_detail = merged.error_detail();
    let mut errors = merged.errors();
    r.set("inbox_entries_before_queue", before_queue.inbox_entries());
    r.set("inbox_entries_after_queue", before.inbox_entries());
    match &inbox {
        Some(w) => {
            r.set("inbox_entries_target", w.target);
            r.set("inbox_entries_at_end", w.last);
            r.set(
                "drain_inbox_empty_s",
                w.reached_s.map(|s| (s * 1000.0).round() / 1000.0),
            );
            match w.reached_s {
                Some(s) => {
                    let rate = round2(drained as f64 / s.max(1e-9));
                    r.set("processed_per_s", rate);
                    r.row(
                        "inbox back",
                        format!(
                            "{s:.3} s after the go-ahead the node's inbox held {} entries (target \
                             {}): every ack and every delivered receipt processed ({rate:.0} \
                             msgs/s; polled every {} ms)",
                            w.last.unwrap_or(0),
                            w.target,
                            INBOX_POLL_INTERVAL.as_millis()
                        ),
                    );
                }
                None => {
                    r.row(
                        "inbox back",
                        format!(
                            "NOT within {:.0} s: the node's inbox still held {} entries (target {})",
                            a.timeout,
                            w.last.map_or("?".into(), |n| n.to_string()),
                            w.target
                        ),
                    );
                    if stale == 0 {
                        errors += 1;
                        errors_detail["inbox_not_back"] = 1.into();
                    }
                }
            }
            if stale > 0 {
                r.row(
                    "caution",
                    format!(
                        "{stale} messages of earlier runs were still queued to these devices: \
                         their receipts may go to devices not in this run, so the inbox target \
                         is approximate; use a fresh --data-dir for an exact one"
                    ),
                );
            }
        }
        None => r.row(
            "inbox back",
            "not measured (no --admin: the node's /metrics is needed)".into(),
        ),
    }
    r.set("inbox_leftovers_drained", stale);
    r.set("receipts", merged.get("receipts"));
    r.set_row("errors", errors, "errors", errors.to_string());
    r.set("errors_detail", errors_detail);
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

/// How often the parent asks the node's `/metrics` for its inbox gauge after the last
/// `Deliver`: the resolution of `drain_inbox_empty_s`, at the cost of one scrape each.
pub const INBOX_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The inbox gauge value at which the drain is over: what the node held after queueing, less
/// the messages queued (each deleted when its recipient acks it), less messages of earlier
/// runs the receivers drained and acked. The `delivered` receipts the receivers' acks make
/// are inbox entries too (stored for the senders, however the node batches them) until the
/// senders ack them; the senders stay connected and ack every receipt, so receipts add
/// nothing once all is done, and the gauge reaching the target means the node processed
/// every ack: the receivers' and the senders'.
pub fn inbox_target(after_queue: u64, queued: u64, leftovers_drained: u64) -> u64 {
    after_queue
        .saturating_sub(queued)
        .saturating_sub(leftovers_drained)
}

/// What [`wait_for_inbox`] saw.
#[derive(Debug, Clone, Copy)]
pub struct InboxWait {
    pub target: u64,
    /// The gauge value read when the target was reached, or the last one read.
    pub last: Option<u64>,
    /// Seconds from `since` to the first answer at or below the target (an upper bound of
    /// when it got there, by up to [`INBOX_POLL_INTERVAL`] and one scrape).
    pub reached_s: Option<f64>,
}

/// Polls the node's inbox gauge every [`INBOX_POLL_INTERVAL`] from `since` until an answer is
/// at or below the target `target` says once it is known (answers read before then count
/// too), or `deadline`. Keeps every answer until the target is known: at most `deadline −
/// since` ÷ [`INBOX_POLL_INTERVAL`] of them.
pub async fn wait_for_inbox(
    setup: &Setup,
    target: watch::Receiver<Option<u64>>,
    since: Instant,
    deadline: Instant,
) -> InboxWait {
    let mut answers: Vec<(f64, u64)> = Vec::new();
    loop {
        if let Some(n) = setup.inbox_entries().await {
            answers.push((since.elapsed().as_secs_f64(), n));
        }
        let known = *target.borrow();
        if let Some(t) = known {
            if let Some(&(s, n)) = answers.iter().find(|(_, n)| *n <= t) {
                return InboxWait {
                    target: t,
                    last: Some(n),
                    reached_s: Some(s),
                };
            }
            // Only the latest matters from now on.
            answers.drain(..answers.len().saturating_sub(1));
        }
        if Instant::now() >= deadline {
            return InboxWait {
                target: known.unwrap_or(0),
                last: answers.last().map(|&(_, n)| n),
                reached_s: None,
            };
        }
        tokio::time::sleep(INBOX_POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbox_target_is_the_inbox_without_this_runs_messages_and_leftovers() {
        // 50 entries of other devices, 1000 queued by this run.
        assert_eq!(inbox_target(1050, 1000, 0), 50);
        // 7 of the 50 were leftovers to this run's receivers, drained and acked.
        assert_eq!(inbox_target(1050, 1000, 7), 43);
        // Never below empty.
        assert_eq!(inbox_target(10, 1000, 7), 0);
    }
}
