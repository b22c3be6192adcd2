//! `group`: `--groups` groups of `--members` devices each, `--senders` of every group sending
//! `GroupSend` at a fixed offered rate (open loop: every message that fell due is sent, late if
//! the generator fell behind, and its latency counts from when it was due), every member device
//! acknowledging its deliveries (the SDK's batched `DeliverAck`).
//!
//! Figures: group messages/s sent and member deliveries/s over the measured window (after the
//! warm-up), latency from a message's due time to its first and to its last member's delivery
//! (HDR: p50, p99, p999, max), `SendAck` latency, the nodes' CPU per member delivery, and
//! deliveries that never arrived (lost: must be 0) or arrived twice.
//!
//! Every device runs on the client SDK ([`ringpost_client::Client`]) in this process (no worker
//! fleet): each connects to a `--target` round robin and follows the node's redirect to its
//! owner, as `chat` does, so against a cluster the members spread over its nodes by ownership.
//! A group is created by its first member; its first `--senders` members send.
//!
//! Body layout: due time (8 bytes, nanoseconds since the run's epoch), the run's nonce (4), the
//! message's index in the run (4), zero padding to `--msg-bytes`. Deliveries of another run
//! (left in inboxes of reused `--accounts`) are counted as stale and otherwise ignored.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use ringpost_client::{Client, ClientConfig, Event};
use ringpost_wire::{GroupId, SendStatus};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::idle::round2;
use crate::accounts::Account;
use crate::report::Report;
use crate::run::{self, Common, Setup};
use crate::stats::{self, Percentiles};

/// Members per group, at most (the node's limit, the creator included).
pub const MEMBERS_MAX: usize = 1024;

/// Bytes at the front of every body: due time (8), run nonce (4), message index (4).
pub const GROUP_BODY_HEADER_BYTES: usize = 16;

/// Offered group messages per second per sending device, at most.
pub const RATE_PER_SENDER_MAX: f64 = 10_000.0;

/// Delay between the end of setup and the first send.
pub const START_DELAY: Duration = Duration::from_millis(100);

/// How often the drain checks whether every acknowledged message has reached every member.
pub const DRAIN_POLL: Duration = Duration::from_millis(20);

/// `group` options.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Args {
    /// Groups.
    #[arg(long, default_value_t = 1)]
    pub groups: usize,
    /// Members per group, the creator included (2 to 1024): one device each, every one a
    /// distinct registered user.
    #[arg(long, default_value_t = 8)]
    pub members: usize,
    /// Sending members per group.
    #[arg(long, default_value_t = 1)]
    pub senders: usize,
    /// Offered group messages per second, all senders together (open loop).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Ciphertext bytes per group message (at least 16: the bench's header).
    #[arg(long, default_value_t = 128)]
    pub msg_bytes: usize,
    /// Seconds of sending before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to wait after sending stops for every acknowledged message to reach every
    /// member.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// Pid of a node process whose CPU counts (repeat it for every node of a cluster); by
    /// default the spawned node, or the one found from --admin / --server-pid.
    #[arg(long = "node-pid", value_name = "PID")]
    pub node_pids: Vec<u32>,
    /// Admin URL of a local node whose CPU counts, its pid found from the port it listens on
    /// (repeat it for every node of a cluster; adds to --node-pid).
    #[arg(long = "node-admin", value_name = "URL")]
    pub node_admins: Vec<String>,
}

/// One group message of the run.
struct Msg {
    due_ns: u64,
    /// Members that should get it (every member but the sender); 0 until its `SendAck{Ok}`.
    expected: u32,
    delivered: u32,
    /// Member deliveries seen, by member index in its group (detects duplicates).
    seen: Vec<u64>,
    first_ns: Option<u64>,
    last_ns: u64,
}

/// What every task of the run records into.
struct Shared {
    epoch: Instant,
    nonce: u32,
    msgs: Mutex<Vec<Msg>>,
    /// Measured window, nanoseconds since `epoch` (set before sending starts).
    window: Mutex<(u64, u64)>,
    ack_latency: Mutex<Histogram<u64>>,
    sent: AtomicU64,
    acked_ok: AtomicU64,
    send_errors: AtomicU64,
    delivered: AtomicU64,
    delivered_in_window: AtomicU64,
    duplicates: AtomicU64,
    stale: AtomicU64,
    disconnects: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn new(nonce: u32) -> Shared {
        Shared {
            epoch: Instant::now(),
            nonce,
            msgs: Mutex::new(Vec::new()),
            window: Mutex::new((u64::MAX, u64::MAX)),
            ack_latency: Mutex::new(stats::new_histogram()),
            sent: AtomicU64::new(0),
            acked_ok: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            delivered_in_window: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }

    fn now_ns(&self) -> u64 {
        self.ns_of(Instant::now())
    }

    fn ns_of(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn error(&self, e: String) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(e);
    }

    /// Records member `member`'s delivery of a message with this body.
    fn delivered(&self, member: usize, mut body: &[u8]) {
        let now = self.now_ns();
        if body.len() < GROUP_BODY_HEADER_BYTES {
            self.stale.fetch_add(1, Relaxed);
            return;
        }
        let _due = body.get_u64();
        let (nonce, index) = (body.get_u32(), body.get_u32() as usize);
        if nonce != self.nonce {
            self.stale.fetch_add(1, Relaxed);
            return;
        }
        let (from, to) = *self.window.lock().unwrap_or_else(|p| p.into_inner());
        let mut msgs = self.msgs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(m) = msgs.get_mut(index) else {
            self.stale.fetch_add(1, Relaxed);
            return;
        };
        let (word, bit) = (member / 64, 1u64 << (member % 64));
        if m.seen.get(word).is_none_or(|w| w & bit != 0) {
            self.duplicates.fetch_add(1, Relaxed);
            return;
        }
        m.seen[word] |= bit;
        m.delivered += 1;
        m.first_ns.get_or_insert(now);
        m.last_ns = m.last_ns.max(now);
        drop(msgs);
        self.delivered.fetch_add(1, Relaxed);
        if (from..to).contains(&now) {
            self.delivered_in_window.fetch_add(1, Relaxed);
        }
    }

    /// Deliveries still missing of acknowledged messages.
    fn missing(&self) -> u64 {
        let msgs = self.msgs.lock().unwrap_or_else(|p| p.into_inner());
        msgs.iter()
            .map(|m| u64::from(m.expected.saturating_sub(m.delivered)))
            .sum()
    }
}

/// One member device.
struct Member {
    client: Arc<Client>,
    /// Its index in its group.
    index: usize,
}

pub async fn run(c: &Common, a: &Args) -> Result<Report> {
    if c.chart.is_some() {
        bail!("group keeps no per-second series to chart: leave out --chart");
    }
    if c.workers > 0 {
        bail!("group runs every device in this process on the client SDK: leave out --workers");
    }
    if a.groups == 0 {
        bail!("--groups must be at least 1");
    }
    if !(2..=MEMBERS_MAX).contains(&a.members) {
        bail!("--members must be 2 to {MEMBERS_MAX}");
    }
    if a.senders == 0 || a.senders > a.members {
        bail!("--senders must be 1 to --members ({})", a.members);
    }
    let senders = a.groups * a.senders;
    if !a.rate.is_finite() || a.rate <= 0.0 || a.rate / senders as f64 > RATE_PER_SENDER_MAX {
        bail!(
            "--rate must be above 0 and at most {RATE_PER_SENDER_MAX} group messages/s per \
             sending device ({senders} senders)"
        );
    }
    if a.msg_bytes < GROUP_BODY_HEADER_BYTES {
        bail!("--msg-bytes must be at least {GROUP_BODY_HEADER_BYTES}");
    }
    let finite = [a.duration, a.warmup, a.drain_timeout]
        .iter()
        .all(|x| x.is_finite());
    if !finite || a.duration <= 0.0 || a.warmup < 0.0 || a.drain_timeout < 0.0 {
        bail!("--duration must be above 0, --warmup and --drain-timeout at least 0");
    }
    let setup = Setup::new(c).await?;
    let mut node_pids = a.node_pids.clone();
    for admin in &a.node_admins {
        let authority = crate::node::admin_authority(admin)?;
        let port = authority
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| anyhow!("admin URL {admin} has no port"))?;
        node_pids.push(crate::sysmem::pid_listening_on(port)?);
    }
    if node_pids.is_empty() {
        node_pids.extend(setup.server_pid);
    }
    node_pids.sort_unstable();
    node_pids.dedup();

    let devices = a.groups * a.members;
    let accounts = setup.accounts(c, devices).await?;
    let loadavg_before = crate::sysmem::loadavg_1m();
    let sh = Arc::new(Shared::new(rand::random()));

    let bar = run::bar(c, "connecting", devices as u64);
    let members = connect_all(&setup, c, &accounts, a.members, &bar).await?;
    bar.finish_and_clear();
    let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
    for m in &members {
        *per_node.entry(m.client.welcome().node_id).or_default() += 1;
    }

    // Every member reads its events from here on: group events are acked and ignored.
    let mut readers = JoinSet::new();
    for m in &members {
        let (client, sh, index) = (m.client.clone(), sh.clone(), m.index);
        readers.spawn(async move {
            while let Some(e) = client.next_event().await {
                match e {
                    Event::GroupMessage(d) => sh.delivered(index, &d.body),
                    Event::Disconnected { reason, .. } => {
                        sh.disconnects.fetch_add(1, Relaxed);
                        sh.error(format!("a member was disconnected: {reason:?}"));
                        break;
                    }
                    _ => {}
                }
            }
        });
    }

    let bar = run::bar(c, "creating", a.groups as u64);
    let mut groups: Vec<GroupId> = Vec::with_capacity(a.groups);
    for g in 0..a.groups {
        let of_group = &members[g * a.members..(g + 1) * a.members];
        let others = of_group[1..]
            .iter()
            .map(|m| accounts[g * a.members + m.index].user)
            .collect();
        let info = of_group[0]
            .client
            .group_create(others, Bytes::new())
            .await
            .map_err(|e| anyhow!("GroupCreate of group {g}: {e}"))?;
        if info.members.len() != a.members {
            bail!(
                "group {g} has {} members, asked for {}",
                info.members.len(),
                a.members
            );
        }
        groups.push(info.group);
        bar.inc(1);
    }
    bar.finish_and_clear();

    // Schedules: sender j of all `senders` sends every `interval`, shifted by j/senders of it.
    let interval = Duration::from_secs_f64(senders as f64 / a.rate);
    let start = Instant::now() + START_DELAY;
    let from = start + Duration::from_secs_f64(a.warmup);
    let to = from + Duration::from_secs_f64(a.duration);
    let (from_ns, to_ns) = (sh.ns_of(from), sh.ns_of(to));
    *sh.window.lock().unwrap_or_else(|p| p.into_inner()) = (from_ns, to_ns);
    let mut sending = JoinSet::new();
    for g in 0..a.groups {
        for s in 0..a.senders {
            let j = g * a.senders + s;
            let client = members[g * a.members + s].client.clone();
            let offset = interval.mul_f64(j as f64 / senders as f64);
            let (sh, group, a) = (sh.clone(), groups[g], a.clone());
            sending.spawn(sender(sh, client, group, start + offset, interval, to, a));
        }
    }
    let pids = node_pids.clone();
    let window = async {
        tokio::time::sleep_until(from).await;
        // CPU first, together, so that the scrape that follows does not move their moment.
        let before = (node_ticks(&pids), own_ticks(), Instant::now());
        let drops_before = setup.snapshot().await;
        tokio::time::sleep_until(to).await;
        let after = (node_ticks(&pids), own_ticks(), Instant::now());
        let drops_after = setup.snapshot().await;
        ((before, drops_before), (after, drops_after))
    };
    let bar = run::bar(c, "sending", 0);
    bar.set_length((a.rate * (a.warmup + a.duration)) as u64);
    let progress = async {
        while Instant::now() < to {
            bar.set_position(sh.sent.load(Relaxed));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let (before, after) = tokio::join!(window, progress).0;
    bar.finish_and_clear();
    // Every send that fell due has started; wait for their answers.
    while let Some(r) = sending.join_next().await {
        r.context("a sender task")?;
    }
    let drain_start = Instant::now();
    let drain_end = drain_start + Duration::from_secs_f64(a.drain_timeout);
    while sh.missing() > 0 && Instant::now() < drain_end {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let drained_s = drain_start.elapsed().as_secs_f64();
    readers.abort_all();
    for m in &members {
        m.client.close().await;
    }

    let (mut latency_last, mut latency_first) = (stats::new_histogram(), stats::new_histogram());
    let (mut due_in_window, mut acked_in_window) = (0u64, 0u64);
    let lost = sh.missing();
    {
        let msgs = sh.msgs.lock().unwrap_or_else(|p| p.into_inner());
        for m in msgs.iter().filter(|m| (from_ns..to_ns).contains(&m.due_ns)) {
            due_in_window += 1;
            if m.expected == 0 {
                continue;
            }
            acked_in_window += 1;
            if let Some(first) = m.first_ns {
                stats::record_us(&mut latency_first, first.saturating_sub(m.due_ns) / 1000);
            }
            if m.delivered >= m.expected {
                stats::record_us(&mut latency_last, m.last_ns.saturating_sub(m.due_ns) / 1000);
            }
        }
    }
    let connected = members.len() as u64;
    let send_errors = sh.send_errors.load(Relaxed);
    let duplicates = sh.duplicates.load(Relaxed);
    let disconnects = sh.disconnects.load(Relaxed);
    let errors = send_errors + lost + duplicates + disconnects;
    let mut r = Report::new("group", setup.transport_name(), connected, errors);
    r.series_label = "member deliveries/s".into();
    r.set_row(
        "groups",
        json!({ "groups": a.groups, "members": a.members, "senders_per_group": a.senders }),
        "groups",
        format!(
            "{} of {} members, {} sender(s) each ({:.1} group msgs/s offered, {} B messages)",
            a.groups, a.members, a.senders, a.rate, a.msg_bytes
        ),
    );
    r.set("offered_per_s", a.rate);
    let nodes_text = per_node
        .iter()
        .map(|(n, k)| format!("node {n}: {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    r.set_row(
        "members_per_node",
        per_node
            .iter()
            .map(|(n, k)| (n.to_string(), *k))
            .collect::<BTreeMap<_, _>>(),
        "members on",
        nodes_text,
    );
    let group_per_s = round2(acked_in_window as f64 / a.duration);
    r.set_row(
        "group_messages_per_s",
        group_per_s,
        "group msgs/s",
        format!(
            "{group_per_s:.1} sent and acknowledged (of {due_in_window} due in the {:.1} s \
             window after {:.1} s warm-up)",
            a.duration, a.warmup
        ),
    );
    let in_window = sh.delivered_in_window.load(Relaxed);
    let delivered_per_s = round2(in_window as f64 / a.duration);
    r.set_row(
        "delivered_per_s",
        delivered_per_s,
        "delivered/s",
        format!("{delivered_per_s:.0} member deliveries/s over the window"),
    );
    r.set_percentiles(
        "latency_ms",
        "send→last member",
        Percentiles::of(&latency_last),
    );
    r.set_percentiles(
        "first_latency_ms",
        "send→first member",
        Percentiles::of(&latency_first),
    );
    let ack = sh
        .ack_latency
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    r.set_percentiles("ack_latency_ms", "send→SendAck", Percentiles::of(&ack));
    let (sent, acked) = (sh.sent.load(Relaxed), sh.acked_ok.load(Relaxed));
    let (delivered, stale) = (sh.delivered.load(Relaxed), sh.stale.load(Relaxed));
    r.set_row(
        "messages",
        json!({
            "sent": sent, "acked_ok": acked, "send_errors": send_errors,
            "member_deliveries": delivered, "lost": lost, "duplicates": duplicates,
            "stale_delivered": stale, "disconnects": disconnects,
        }),
        "messages",
        format!(
            "{sent} group messages sent, {acked} acked, {send_errors} refused or failed; \
             {delivered} member deliveries, {lost} missing after the drain, {duplicates} \
             duplicates, {stale} left over from earlier runs, {disconnects} disconnects"
        ),
    );
    r.set("lost", lost);
    r.set_row(
        "drain_s",
        round2(drained_s),
        "drain",
        format!("{drained_s:.2} s after sending stopped"),
    );
    if let Some(e) = sh
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    {
        r.set("errors_detail", json!({ "first_error": e }));
        r.row("first error", e);
    }
    let ((before, drops_before), (after, drops_after)) = (before, after);
    drops_before.report_drops(&drops_after, &mut r);
    let secs =
        |b: Option<u64>, a: Option<u64>| Some(a?.checked_sub(b?)? as f64 / run::CLOCK_TICKS_PER_S);
    let cpu = run::CpuUse {
        wall_s: after.2.saturating_duration_since(before.2).as_secs_f64(),
        node_s: secs(before.0, after.0),
        generator_s: secs(Some(before.1), Some(after.1)),
    };
    r.set("node_pids", &node_pids);
    cpu.report(&mut r, "", "CPU", Some((in_window, "member delivery")));
    let per_delivery = r.get("node_cpu_us_per_msg").cloned();
    r.set("node_cpu_us_per_member_delivery", per_delivery);
    if node_pids.is_empty() {
        r.row(
            "hint",
            "no node pid: give --node-admin URL (or --node-pid PID) for every local node to get \
             the node CPU per member delivery"
                .into(),
        );
    }
    run::probe_disk(&setup, &mut r).await;
    run::finish(
        c,
        &setup,
        r,
        serde_json::to_value(a)?,
        "send → last member",
        loadavg_before,
    )
}

/// Connects every account (at most `connect_concurrency` at once), following redirects to
/// each device's owner.
async fn connect_all(
    setup: &Setup,
    c: &Common,
    accounts: &[Account],
    members: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<Member>> {
    let limit = Arc::new(Semaphore::new(c.connect_concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for (i, acc) in accounts.iter().enumerate() {
        let url = setup.urls[i % setup.urls.len()].clone();
        let mut config = ClientConfig::new(url).with_auth(acc.auth());
        if let Some(ca) = &setup.ca_file {
            config = config.with_ca_file(ca.clone());
        }
        config.reconnect = false;
        let (limit, user) = (limit.clone(), acc.user);
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let client = Client::connect(config)
                .await
                .map_err(|e| anyhow!("connect user {user}: {e}"))?;
            Ok::<_, anyhow::Error>((i, client))
        });
    }
    let mut clients: Vec<Option<Arc<Client>>> = vec![None; accounts.len()];
    while let Some(r) = tasks.join_next().await {
        let (i, client) = r.context("a connect task")??;
        clients[i] = Some(Arc::new(client));
        bar.inc(1);
    }
    clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            Ok(Member {
                client: c.ok_or_else(|| anyhow!("device {i} did not connect"))?,
                index: i % members,
            })
        })
        .collect()
}

/// One sending member: a `GroupSend` every `interval` from `first` until `end` (open loop:
/// each starts at its due time, or at once when the loop is behind), each awaited in its own
/// task so a slow answer never delays the next send.
async fn sender(
    sh: Arc<Shared>,
    client: Arc<Client>,
    group: GroupId,
    first: Instant,
    interval: Duration,
    end: Instant,
    a: Args,
) {
    let mut inflight = JoinSet::new();
    let mut due = first;
    while due < end {
        tokio::time::sleep_until(due).await;
        let due_ns = sh.ns_of(due);
        let index = {
            let mut msgs = sh.msgs.lock().unwrap_or_else(|p| p.into_inner());
            msgs.push(Msg {
                due_ns,
                expected: 0,
                delivered: 0,
                seen: vec![0; a.members.div_ceil(64)],
                first_ns: None,
                last_ns: 0,
            });
            msgs.len() - 1
        };
        let mut body = BytesMut::with_capacity(a.msg_bytes);
        body.put_u64(due_ns);
        body.put_u32(sh.nonce);
        body.put_u32(index as u32);
        body.resize(a.msg_bytes, 0);
        let mut msg_id = [0u8; 16];
        msg_id[..4].copy_from_slice(&sh.nonce.to_be_bytes());
        msg_id[4..8].copy_from_slice(&(index as u32).to_be_bytes());
        msg_id[8..].copy_from_slice(&rand::random::<u64>().to_be_bytes());
        let (sh, client, body, expected) = (
            sh.clone(),
            client.clone(),
            body.freeze(),
            (a.members - 1) as u32,
        );
        sh.sent.fetch_add(1, Relaxed);
        inflight.spawn(async move {
            let sent_ns = sh.now_ns();
            match client.group_send(group, msg_id, body).await {
                Ok(ack) if ack.status == SendStatus::Ok => {
                    let us = sh.now_ns().saturating_sub(sent_ns) / 1000;
                    stats::record_us(
                        &mut sh.ack_latency.lock().unwrap_or_else(|p| p.into_inner()),
                        us,
                    );
                    sh.acked_ok.fetch_add(1, Relaxed);
                    let mut msgs = sh.msgs.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(m) = msgs.get_mut(index) {
                        m.expected = expected;
                    }
                }
                Ok(ack) => {
                    sh.send_errors.fetch_add(1, Relaxed);
                    sh.error(format!("GroupSend answered {:?}", ack.status));
                }
                Err(e) => {
                    sh.send_errors.fetch_add(1, Relaxed);
                    sh.error(format!("GroupSend: {e}"));
                }
            }
        });
        due += interval;
        // Reap finished sends as we go, without waiting.
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

/// CPU ticks of these node processes together (`None` without any, or if one is gone).
fn node_ticks(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| run::cpu_ticks(p)).sum()
}

/// This process's CPU ticks.
fn own_ticks() -> u64 {
    run::bench_cpu_ticks(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(nonce: u32, index: u32) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u64(0);
        b.put_u32(nonce);
        b.put_u32(index);
        b.resize(32, 0);
        b.to_vec()
    }

    #[test]
    fn deliveries_count_once_per_member_and_other_runs_are_stale() {
        let sh = Shared::new(7);
        for expected in [3, 0] {
            sh.msgs.lock().unwrap().push(Msg {
                due_ns: 0,
                expected,
                delivered: 0,
                seen: vec![0; 2],
                first_ns: None,
                last_ns: 0,
            });
        }
        assert_eq!(sh.missing(), 3, "an unacknowledged message expects nothing");
        sh.delivered(1, &body(7, 0));
        sh.delivered(70, &body(7, 0));
        sh.delivered(1, &body(7, 0));
        sh.delivered(2, &body(8, 0));
        sh.delivered(2, &body(7, 9));
        sh.delivered(2, &[0; 4]);
        assert_eq!(sh.delivered.load(Relaxed), 2);
        assert_eq!(sh.duplicates.load(Relaxed), 1);
        assert_eq!(sh.stale.load(Relaxed), 3);
        assert_eq!(sh.missing(), 1);
        sh.delivered(3, &body(7, 0));
        assert_eq!(sh.missing(), 0);
        let m = &sh.msgs.lock().unwrap()[0];
        assert!(m.first_ns.is_some_and(|f| f <= m.last_ns));
    }
}
