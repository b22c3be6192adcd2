//! What every scenario's parent side shares: the options naming the node under test, finding
//! (or starting) it, accounts, planning workers and source addresses, probing the server's
//! memory and CPU, progress bars, and writing the outputs.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{json, Value};

use crate::accounts::{self, Account, REGISTER_CONCURRENCY_DEFAULT};
use crate::loadclient::peer::PeerProtocol;
use crate::loadclient::{ClientKind, Dialer, Target, Transport};
use crate::node::{self, Samples, SpawnedNode};
use crate::report::{self, Report};
use crate::sysmem::{self, KernelMem, Machine};
use crate::worker::{WorkerSpec, CONNECTIONS_PER_PROCESS_MAX};

/// Clock ticks per second in `/proc/PID/stat` CPU times (`USER_HZ`, 100 on Linux).
pub const CLOCK_TICKS_PER_S: f64 = 100.0;

/// The node's gauge of entries stored in device inboxes (messages and receipts not yet acked).
pub const INBOX_ENTRIES_GAUGE: &str = "ringpost_inbox_entries";

/// CPU ticks below which a CPU figure is flagged as imprecise: ±1 tick is ±1 % at 100.
pub const CPU_TICKS_PRECISE_MIN: u64 = 100;

/// Connection attempts in flight per worker by default.
pub const CONNECT_CONCURRENCY_DEFAULT: usize = 256;

/// Source addresses on loopback start here (worker i uses 127.0.0.(2 + i)), so no worker
/// shares the ephemeral ports of another or of anything else on 127.0.0.1.
pub const SOURCE_IP_FIRST: u8 = 2;

/// Where the node under test is, and how to talk to it.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Common {
    /// Node URL (ws://, wss:// or quic://). Repeat it for a cluster: connections are spread
    /// over the targets round robin, and redirects to a user's owner are followed. Start the
    /// node with --device-rate 1000000 --device-burst 1000000: the bench does not pace itself
    /// to the per-device rate limit (200 sends/s by default), and refused sends count as errors.
    #[arg(long = "target", value_name = "URL")]
    pub targets: Vec<String>,
    /// Start a dev node from this binary for the run instead of --target (listeners on
    /// 127.0.0.1 port 0, per-device rate limit raised to 1000000/s, killed at the end).
    #[arg(long, value_name = "BIN", conflicts_with = "targets")]
    pub spawn_node: Option<PathBuf>,
    /// Data directory of the spawned node; a temporary one (removed afterwards) if not given.
    /// Give one, with --accounts, to reuse registrations across runs.
    #[arg(long, requires = "spawn_node")]
    pub data_dir: Option<PathBuf>,
    /// Transport of the run; by default the scheme of the first --target, or ws.
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,
    /// CA certificate to trust for wss and quic (the dev node prints its path).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// The node's verification-codes file (DATA_DIR/verification-codes.txt), for registering
    /// the devices a run needs.
    #[arg(long)]
    pub codes_file: Option<PathBuf>,
    /// Admin URL of the node (http://host:port): connections and message counters from
    /// /metrics, and the server's pid when it is local.
    #[arg(long)]
    pub admin: Option<String>,
    /// Pid of a local node, for its memory (VmRSS) and CPU; found from --admin's port if not
    /// given.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Accounts cache: `user device token_hex` per line. Read first; devices registered by the
    /// run are appended, so the next run against the same node skips registration.
    #[arg(long, value_name = "FILE")]
    pub accounts: Option<PathBuf>,
    /// Which client drives Ringpost devices: the lean load client, or the client SDK (a
    /// driver task, request correlation and an event queue per device; for measuring what the
    /// SDK costs, not for idle or storm runs at scale).
    #[arg(long, value_enum, default_value_t = ClientKind::Lean)]
    pub client: ClientKind,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = REGISTER_CONCURRENCY_DEFAULT)]
    pub register_concurrency: usize,
    /// Connection attempts (TCP/TLS/QUIC, WebSocket and Hello) in flight at once per worker.
    #[arg(long, default_value_t = CONNECT_CONCURRENCY_DEFAULT)]
    pub connect_concurrency: usize,
    /// Worker processes; 0: one in this process, or as many as the open-file limit needs
    /// (one per 18000 connections).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Write the run's figures and configuration to this file as one JSON object.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw latency percentiles and throughput over time to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// The node under test, found or started.
pub struct Setup {
    pub transport: Transport,
    /// A peer broker instead of a Ringpost node (`compare`): `urls` holds its `ip:port`.
    pub peer: Option<PeerProtocol>,
    pub urls: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub codes_file: Option<PathBuf>,
    pub admin: Option<String>,
    pub server_pid: Option<u32>,
    /// Every target is on this host's loopback.
    pub loopback: bool,
    pub ipv4: bool,
    /// Killed when the setup is dropped.
    pub node: Option<SpawnedNode>,
}

impl Setup {
    pub async fn new(c: &Common) -> Result<Setup> {
        let mut s = if let Some(bin) = &c.spawn_node {
            let transport = c.transport.unwrap_or(Transport::Ws);
            // Reading its announcement blocks: off the runtime's threads.
            let (bin, dir) = (bin.clone(), c.data_dir.clone());
            let node =
                tokio::task::spawn_blocking(move || SpawnedNode::start(&bin, dir.as_deref()))
                    .await??;
            let url = node
                .url(transport)
                .ok_or_else(|| anyhow!("the node announced no {} listener", transport.name()))?;
            Setup {
                transport,
                peer: None,
                urls: vec![url],
                ca_file: c.ca_file.clone().or_else(|| node.ca_file.clone()),
                codes_file: c.codes_file.clone().or_else(|| Some(node.codes_file())),
                admin: c.admin.clone().or_else(|| node.admin.clone()),
                server_pid: Some(node.pid),
                loopback: true,
                ipv4: true,
                node: Some(node),
            }
        } else {
            if c.targets.is_empty() {
                bail!("give --target URL (repeatable) or --spawn-node BIN");
            }
            let first = Target::resolve(&c.targets[0]).await?;
            let transport = c
                .transport
                .unwrap_or_else(|| Transport::of_scheme(first.endpoint.scheme));
            let mut loopback = true;
            for url in &c.targets {
                let t = Target::resolve(url).await?;
                loopback &= t.addr.ip().is_loopback();
            }
            Setup {
                transport,
                peer: None,
                urls: c.targets.clone(),
                ca_file: c.ca_file.clone(),
                codes_file: c.codes_file.clone(),
                admin: c.admin.clone(),
                server_pid: c.server_pid,
                loopback,
                ipv4: first.addr.is_ipv4(),
                node: None,
            }
        };
        if s.server_pid.is_none() {
            if let Some(admin) = &s.admin {
                let authority = node::admin_authority(admin)?;
                let local = authority.starts_with("127.")
                    || authority.starts_with("localhost")
                    || authority.starts_with("[::1]");
                if local {
                    let port = authority
                        .rsplit_once(':')
                        .and_then(|(_, p)| p.parse().ok())
                        .ok_or_else(|| anyhow!("admin URL {admin} has no port"))?;
                    s.server_pid = Some(sysmem::pid_listening_on(port)?);
                }
            }
        }
        Ok(s)
    }

    /// A dialer for the parent (registration), from no particular source address.
    pub async fn dialer(&self) -> Result<Dialer> {
        Dialer::new(self.transport, &self.urls, self.ca_file.as_deref(), None).await
    }

    /// The server's memory, CPU and counters now.
    pub async fn snapshot(&self) -> Snapshot {
        self.snapshot_of(None).await
    }

    /// [`Setup::snapshot`], with the CPU of every generator process (this one and the child
    /// workers `generator_pids`). Both CPU figures and `at` are read first, together, so
    /// that the scrape that follows does not move the moment they describe.
    pub async fn snapshot_with_generator(&self, generator_pids: &[u32]) -> Snapshot {
        self.snapshot_of(Some(generator_pids)).await
    }

    async fn snapshot_of(&self, generator_pids: Option<&[u32]>) -> Snapshot {
        let at = std::time::Instant::now();
        let server_cpu_ticks = self.server_pid.and_then(cpu_ticks);
        let generator_cpu_ticks = generator_pids.map(bench_cpu_ticks);
        let metrics = match &self.admin {
            Some(a) => node::scrape(a).await.ok(),
            None => None,
        };
        let quic_port = (self.transport == Transport::Quic && self.peer.is_none() && self.loopback)
            .then(|| self.urls.first()?.rsplit_once(':')?.1.parse::<u16>().ok())
            .flatten();
        Snapshot {
            drops: sysmem::DropCounters::read(),
            server_udp_drops: quic_port.and_then(sysmem::udp_drops_on_port),
            rss_kib: self.server_pid.and_then(|p| sysmem::vm_rss_kib(p).ok()),
            kernel: KernelMem::read().ok(),
            metrics,
            server_cpu_ticks,
            generator_cpu_ticks,
            at,
        }
    }

    /// The node's `ringpost_inbox_entries` gauge now (`None` without an admin port, or for a
    /// peer broker). The node refreshes the gauge on every `/metrics` request.
    pub async fn inbox_entries(&self) -> Option<u64> {
        if self.peer.is_some() {
            return None;
        }
        let samples = node::scrape(self.admin.as_deref()?).await.ok()?;
        samples
            .contains_key(INBOX_ENTRIES_GAUGE)
            .then(|| node::sum_of(&samples, INBOX_ENTRIES_GAUGE).max(0.0) as u64)
    }

    /// A peer broker listening on `addr`, run as process `pid`.
    pub fn peer(protocol: PeerProtocol, addr: std::net::SocketAddr, pid: u32) -> Setup {
        Setup {
            transport: Transport::Ws,
            peer: Some(protocol),
            urls: vec![addr.to_string()],
            ca_file: None,
            codes_file: None,
            admin: None,
            server_pid: Some(pid),
            loopback: addr.ip().is_loopback(),
            ipv4: addr.is_ipv4(),
            node: None,
        }
    }

    /// What the reports call the transport: `ws`, `wss`, `quic`, or the peer's protocol.
    pub fn transport_name(&self) -> &'static str {
        match self.peer {
            Some(p) => p.name(),
            None => self.transport.name(),
        }
    }

    /// The registered devices a run needs: from the cache, registered otherwise. Peers need no
    /// registration: their devices are numbered from 1.
    pub async fn accounts(&self, c: &Common, needed: usize) -> Result<Vec<Account>> {
        if self.peer.is_some() {
            return Ok((1..=needed as u64)
                .map(|user| Account {
                    user,
                    device: 1,
                    token: [0; 32],
                })
                .collect());
        }
        let cached = match &c.accounts {
            Some(p) => accounts::load_cache(p)?.len(),
            None => 0,
        };
        let bar = bar(c, "registering", needed.saturating_sub(cached) as u64);
        let dialer = Arc::new(self.dialer().await?);
        let b = bar.clone();
        let out = accounts::ensure(
            dialer,
            self.codes_file.as_deref(),
            c.accounts.as_deref(),
            needed,
            c.register_concurrency,
            move |n| b.inc(n),
        )
        .await;
        bar.finish_and_clear();
        out
    }

    /// Specs for `units` workers: `accounts_of(i)` gives worker i's accounts.
    pub fn specs(
        &self,
        c: &Common,
        workers: usize,
        accounts_of: impl Fn(usize) -> Vec<Account>,
        scenario: impl Fn(usize) -> crate::scenario::Spec,
    ) -> Vec<WorkerSpec> {
        (0..workers)
            .map(|i| WorkerSpec {
                index: i,
                transport: self.transport,
                peer: self.peer,
                client: c.client,
                targets: self.urls.clone(),
                ca_file: self.ca_file.clone(),
                source_ip: self.source_ip(i, workers),
                connect_concurrency: c.connect_concurrency,
                accounts: accounts_of(i).iter().map(Account::line).collect(),
                scenario: scenario(i),
            })
            .collect()
    }

    /// Worker i's source address: 127.0.0.(2 + i) when there are several workers on loopback
    /// (IPv4), else the kernel's choice.
    fn source_ip(&self, i: usize, workers: usize) -> Option<IpAddr> {
        if workers <= 1 || !self.loopback || !self.ipv4 {
            return None;
        }
        let last = u8::try_from(usize::from(SOURCE_IP_FIRST) + i).ok()?;
        Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
    }

    /// A description of the node for the report.
    pub fn describe(&self) -> Value {
        let bin = self.node.as_ref().map(|n| {
            let modified = std::fs::metadata(&n.bin)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            json!({ "path": n.bin, "modified_unix_s": modified })
        });
        json!({
            "system": self.peer.map_or("ringpost", PeerProtocol::name),
            "spawned_bin": bin,
            "targets": self.urls,
            "admin": self.admin,
            "server_pid": self.server_pid,
            "spawned": self.node.is_some(),
        })
    }
}

/// How many workers `connections` need, and whether they run in this process.
pub fn plan_workers(c: &Common, connections: usize) -> (usize, bool) {
    // Room for the runtime, pipes and files under this process's open-file limit.
    let per_process = sysmem::open_files_limit().map_or(CONNECTIONS_PER_PROCESS_MAX, |l| {
        (l.saturating_sub(2000) as usize).clamp(100, CONNECTIONS_PER_PROCESS_MAX)
    });
    let needed = connections.div_ceil(per_process).max(1);
    let workers = c.workers.max(needed);
    (workers, workers == 1 && c.workers == 0)
}

/// Splits `n` items into `parts` nearly equal runs of multiples of `unit` (pairs stay whole).
pub fn split(n: usize, parts: usize, unit: usize) -> Vec<std::ops::Range<usize>> {
    let units = n / unit;
    let parts = parts.max(1);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for i in 0..parts {
        let take = units / parts + usize::from(i < units % parts);
        out.push(start * unit..(start + take) * unit);
        start += take;
    }
    out
}

/// The server's state at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub drops: sysmem::DropCounters,
    /// Drops counted by the node's own QUIC socket (QUIC runs on a local node only).
    pub server_udp_drops: Option<u64>,
    pub rss_kib: Option<u64>,
    pub kernel: Option<KernelMem>,
    pub metrics: Option<Samples>,
    pub server_cpu_ticks: Option<u64>,
    /// CPU of every generator process (the bench and its child workers), when asked for.
    pub generator_cpu_ticks: Option<u64>,
    pub at: std::time::Instant,
}

impl Snapshot {
    /// Adds the machine's drop counters' growth between two snapshots to `r`.
    pub fn report_drops(&self, later: &Snapshot, r: &mut Report) {
        let d = later.drops.since(&self.drops);
        r.set("drops", d);
        if let (Some(b), Some(a)) = (self.server_udp_drops, later.server_udp_drops) {
            let n = a.saturating_sub(b);
            r.set("server_udp_socket_drops", n);
            r.row(
                "node's UDP socket",
                format!("{n} datagrams dropped on its full receive buffer"),
            );
        }
        if d.listen_overflows > 0 || d.udp_rcvbuf_errors > 0 {
            r.row(
                "kernel drops",
                format!(
                    "{} SYNs dropped on full accept queues, {} datagrams on full UDP receive buffers \
                     (machine-wide; each costs a retransmit, 1 s for a SYN)",
                    d.listen_overflows, d.udp_rcvbuf_errors
                ),
            );
        }
    }

    /// CPU used between two snapshots.
    pub fn cpu_until(&self, later: &Snapshot) -> CpuUse {
        let secs =
            |a: Option<u64>, b: Option<u64>| Some(b?.checked_sub(a?)? as f64 / CLOCK_TICKS_PER_S);
        CpuUse {
            wall_s: later.at.saturating_duration_since(self.at).as_secs_f64(),
            node_s: secs(self.server_cpu_ticks, later.server_cpu_ticks),
            generator_s: secs(self.generator_cpu_ticks, later.generator_cpu_ticks),
        }
    }

    /// The node's inbox gauge in this snapshot's scrape.
    pub fn inbox_entries(&self) -> Option<u64> {
        let m = self.metrics.as_ref()?;
        m.contains_key(INBOX_ENTRIES_GAUGE)
            .then(|| node::sum_of(m, INBOX_ENTRIES_GAUGE).max(0.0) as u64)
    }

    /// A counter's growth between two snapshots.
    pub fn metric_delta(&self, later: &Snapshot, name: &str) -> Option<f64> {
        Some(
            node::sum_of(later.metrics.as_ref()?, name)
                - node::sum_of(self.metrics.as_ref()?, name),
        )
    }

    /// A server-side histogram quantile over the interval between two snapshots, in ms.
    pub fn metric_quantile_ms(&self, later: &Snapshot, name: &str, q: f64) -> Option<f64> {
        let d = node::delta(later.metrics.as_ref()?, self.metrics.as_ref()?);
        node::histogram_quantile(&d, name, q).map(|s| s * 1000.0)
    }
}

/// CPU time (utime + stime, all threads, in [`CLOCK_TICKS_PER_S`] ticks: 10 ms steps) used
/// between two snapshots.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuUse {
    /// Wall-clock time between the snapshots.
    pub wall_s: f64,
    /// The node's (or peer broker's) CPU.
    pub node_s: Option<f64>,
    /// Every generator process's CPU together.
    pub generator_s: Option<f64>,
}

impl CpuUse {
    /// Percent of one core over the interval.
    fn percent(&self, cpu_s: Option<f64>) -> Option<f64> {
        let s = cpu_s?;
        (self.wall_s > 0.0).then(|| (s / self.wall_s * 100.0).round())
    }

    /// Microseconds of CPU per message, `messages` counted over the same interval.
    fn us_per(cpu_s: Option<f64>, messages: u64) -> Option<f64> {
        let s = cpu_s?;
        (messages > 0).then(|| (s * 1e6 / messages as f64 * 100.0).round() / 100.0)
    }

    /// Adds the interval's CPU to `r`: `server_cpu_percent` and `bench_cpu_percent` (% of
    /// one core), and with `messages` (how many were delivered, or `what` else, over this
    /// same interval) `node_cpu_us_per_msg` and `generator_cpu_us_per_msg`, each key
    /// prefixed with `prefix`; `cpu_window_s` and `cpu_window_messages` say what they divide.
    pub fn report(&self, r: &mut Report, prefix: &str, label: &str, messages: Option<(u64, &str)>) {
        let node_pct = self.percent(self.node_s);
        let gen_pct = self.percent(self.generator_s);
        if let Some(p) = node_pct {
            r.set(&format!("{prefix}server_cpu_percent"), p);
        }
        if let Some(p) = gen_pct {
            r.set(&format!("{prefix}bench_cpu_percent"), p);
        }
        r.set(
            &format!("{prefix}cpu_window_s"),
            (self.wall_s * 1000.0).round() / 1000.0,
        );
        r.set(&format!("{prefix}node_cpu_s"), self.node_s);
        r.set(&format!("{prefix}generator_cpu_s"), self.generator_s);
        let mut text = match (node_pct, gen_pct) {
            (Some(n), Some(g)) => format!("node {n:.0}%, load generator {g:.0}%"),
            (Some(n), None) => format!("node {n:.0}%"),
            (None, Some(g)) => format!("load generator {g:.0}%"),
            (None, None) => "not measured (no local node pid)".into(),
        };
        text.push_str(&format!(
            " of one core over {:.2} s (the machine has 2, shared)",
            self.wall_s
        ));
        if let Some((m, what)) = messages {
            let node = Self::us_per(self.node_s, m);
            let generator = Self::us_per(self.generator_s, m);
            r.set(&format!("{prefix}cpu_window_messages"), m);
            r.set(&format!("{prefix}node_cpu_us_per_msg"), node);
            r.set(&format!("{prefix}generator_cpu_us_per_msg"), generator);
            let show = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
            text.push_str(&format!(
                "; per message {what}: node {} µs, generator {} µs (of {m} messages)",
                show(node),
                show(generator)
            ));
        }
        let ticks = |s: Option<f64>| s.map_or(u64::MAX, |s| (s * CLOCK_TICKS_PER_S) as u64);
        if ticks(self.node_s).min(ticks(self.generator_s)) < CPU_TICKS_PRECISE_MIN {
            text.push_str(&format!(
                " [imprecise: CPU is counted in {:.0} ms ticks, and this window holds few]",
                1000.0 / CLOCK_TICKS_PER_S
            ));
        }
        r.row(label, text);
    }
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(0) ... utime(11) stime(12).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU of this process and `pids` (the workers), in clock ticks.
pub fn bench_cpu_ticks(pids: &[u32]) -> u64 {
    std::iter::once(std::process::id())
        .chain(pids.iter().copied())
        .filter_map(cpu_ticks)
        .sum()
}

/// A progress bar (hidden with --quiet or when stderr is not a terminal).
pub fn bar(c: &Common, what: &str, len: u64) -> ProgressBar {
    if c.quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Probes the disk the node writes to (its data dir when spawned, else the temp dir) and adds
/// the fdatasync latency to `r`: durable acknowledgements cost at least one of these.
pub async fn probe_disk(setup: &Setup, r: &mut Report) {
    if setup.peer.is_some() {
        return;
    }
    let dir = setup
        .node
        .as_ref()
        .map_or_else(std::env::temp_dir, |n| n.data_dir.clone());
    if let Ok(Ok(p)) = tokio::task::spawn_blocking(move || sysmem::fdatasync_probe(&dir)).await {
        r.set_row(
            "disk_fdatasync_ms",
            p,
            "disk now",
            format!(
                "4 KiB write + fdatasync p50 {:.3} ms, p99 {:.3} ms (probed after the run)",
                p.p50, p.p99
            ),
        );
    }
}

/// Adds the common fields (configuration, machine, date, node), prints the table and writes
/// the JSON and chart files asked for. `loadavg_1m_before_run`: [`sysmem::loadavg_1m`] read
/// right before the run started its load.
pub fn finish(
    c: &Common,
    setup: &Setup,
    mut report: Report,
    config: Value,
    latency_what: &str,
    loadavg_1m_before_run: Option<f64>,
) -> Result<Report> {
    let bad_credentials = report
        .get("errors_detail")
        .and_then(|d| d.get("first_error"))
        .and_then(Value::as_str)
        .is_some_and(|e| e.contains("BadCredentials"));
    if bad_credentials {
        report.row(
            "hint",
            "the node refused the devices' tokens: the --accounts file belongs to another node or \
             data directory; remove it or pass another"
                .into(),
        );
    }
    report.set("config", json!({ "common": c, "scenario": config }));
    report.set("node", setup.describe());
    let mut machine = Machine::read();
    machine.loadavg_1m_before_run = loadavg_1m_before_run;
    if let Some(l) = loadavg_1m_before_run {
        report.row(
            "load before",
            format!("1-minute load average {l:.2} right before the run"),
        );
    }
    report.set("machine", machine);
    report.set(
        "date_unix_s",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    report.set("note", report::SHARED_CORES_NOTE);
    report.set("series", report.series.clone());
    for k in report::REQUIRED_KEYS {
        if report.get(k).is_none() {
            bail!("internal: report lacks required key {k}");
        }
    }
    print!("{}", report.table());
    if let Some(path) = &c.json {
        report::write_json(path, &report.to_json())?;
        println!("  json: {}", path.display());
    }
    if let Some(path) = &c.chart {
        let title = format!(
            "ringpost-bench {} over {}",
            report.get("scenario").and_then(Value::as_str).unwrap_or(""),
            report
                .get("transport")
                .and_then(Value::as_str)
                .unwrap_or("")
        );
        crate::chart::draw(
            path,
            &title,
            &report.series,
            &report.series_label,
            latency_what,
        )
        .with_context(|| format!("chart {}", path.display()))?;
        println!("  chart: {}", path.display());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_units_whole_and_covers_everything() {
        let parts = split(10, 3, 2);
        assert_eq!(parts, vec![0..4, 4..8, 8..10]);
        let parts = split(7, 2, 1);
        assert_eq!(parts, vec![0..4, 4..7]);
        assert_eq!(split(4, 1, 2), vec![0..4]);
    }

    fn snapshot_at(at: std::time::Instant, node: u64, generator: u64) -> Snapshot {
        Snapshot {
            drops: sysmem::DropCounters::default(),
            server_udp_drops: None,
            rss_kib: None,
            kernel: None,
            metrics: None,
            server_cpu_ticks: Some(node),
            generator_cpu_ticks: Some(generator),
            at,
        }
    }

    #[test]
    fn cpu_per_message_divides_the_same_interval() {
        let t = std::time::Instant::now();
        let before = snapshot_at(t, 1_000, 50);
        // 2 s later: the node used 150 ticks (1.5 s), the generators 40 (0.4 s).
        let after = snapshot_at(t + Duration::from_secs(2), 1_150, 90);
        let cpu = before.cpu_until(&after);
        assert_eq!(cpu.node_s, Some(1.5));
        assert_eq!(cpu.generator_s, Some(0.4));
        let mut r = Report::new("chat", "ws", 2, 0);
        cpu.report(&mut r, "", "CPU", Some((30_000, "delivered")));
        let v = r.to_json();
        assert_eq!(v["server_cpu_percent"], 75.0);
        assert_eq!(v["bench_cpu_percent"], 20.0);
        assert_eq!(v["node_cpu_us_per_msg"], 50.0);
        assert_eq!(v["generator_cpu_us_per_msg"], 13.33);
        assert_eq!(v["cpu_window_messages"], 30_000);
        assert!(r.table().contains("node 50.0 µs, generator 13.3 µs"));
        // Nothing delivered: no per-message figure, still the percentages.
        let mut r = Report::new("chat", "ws", 2, 0);
        cpu.report(&mut r, "enqueue_", "CPU", Some((0, "queued")));
        let v = r.to_json();
        assert!(v["enqueue_node_cpu_us_per_msg"].is_null());
        assert_eq!(v["enqueue_server_cpu_percent"], 75.0);
    }

    #[test]
    fn own_cpu_ticks_are_readable() {
        assert!(cpu_ticks(std::process::id()).is_some());
    }
}
