//! `ringpost-bench million`: a cluster on this one host holding N idle authenticated
//! WebSocket connections (a million by default), the load generator included.
//!
//! A process may open 20,000 files here and the limit cannot be raised, so the run starts a
//! real cluster on loopback: one coordinator and `--nodes` nodes (`ringpost-node run`), each
//! owning a share of the ring, and spreads the devices over worker processes of ~16,000
//! connections each, every worker on its own source address (127.0.0.2, .3, …). Each worker
//! connects its devices with the lean client (following redirects to each user's node), then
//! holds every connection as a bare descriptor on one thread (`scenario::million`).
//!
//! The run, in order: register the devices that the accounts file lacks (kept in `--dir`, so
//! only the first run pays), connect half, measure, connect the rest, measure, hold for
//! `--hold` seconds pinging at the interval the nodes advertise, measure (keepalive CPU per
//! ping), check that every connection answers a `Ping`, and send `--messages` messages between
//! random connected pairs, counting what arrives.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::loadclient::{ClientKind, Transport};
use crate::report::{self, Report};
use crate::run::{self, Common, Setup, CLOCK_TICKS_PER_S};
use crate::scenario::million::nap;
use crate::scenario::{self, million as m};
use crate::stats::{self, Percentiles};
use crate::sysmem::{self, KernelMem, Machine};
use crate::worker::{Fleet, DONE};

/// Connections one worker process holds at most (its open-file limit is 20,000 here).
pub const CONNECTIONS_PER_WORKER: usize = 16_000;

/// Nodes started at once; the next batch starts when these are ready.
const START_BATCH: usize = 8;

/// How long a node has to say it is ready.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a cluster directory keeps its coordinator's loopback ports (client, Raft, admin),
/// chosen free on the first run: a one-replica Raft group keeps its address.
const COORDINATOR_PORTS_FILE: &str = "coordinator-ports";

/// `million` options.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Args {
    /// Directory for the cluster's data, logs and the accounts file; reused by the next run
    /// with the same --nodes (registration is the slow part of a first run).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The node binary; by default `ringpost-node` beside this one.
    #[arg(long, value_name = "BIN")]
    pub node_bin: Option<PathBuf>,
    /// The coordinator binary; by default `ringpost-coordinator` beside this one.
    #[arg(long, value_name = "BIN")]
    pub coordinator_bin: Option<PathBuf>,
    /// Connections (devices) to open and hold.
    #[arg(long, default_value_t = 1_000_000)]
    pub connections: usize,
    /// Nodes to start; 0: connections ÷ --per-node, rounded up.
    #[arg(long, default_value_t = 0)]
    pub nodes: usize,
    /// Average connections per node when --nodes is 0. Each node may open 20,000 files and the
    /// ring's shares differ by ~10% (128 virtual nodes each), so the average stays well below.
    #[arg(long, default_value_t = 14_000)]
    pub per_node: usize,
    /// The nodes' WebSocket driver.
    #[arg(long, default_value = "uring")]
    pub ws_driver: String,
    /// The keepalive interval the nodes advertise (`--ping-interval-ms`); the nodes close a
    /// connection silent for --idle-timeout-ms.
    #[arg(long, default_value_t = 300_000)]
    pub ping_interval_ms: u32,
    #[arg(long, default_value_t = 900_000)]
    pub idle_timeout_ms: u32,
    /// Each node's RocksDB block cache and memtables, in MiB (`--rocksdb-block-cache-mib`,
    /// `--rocksdb-write-buffer-mib`): with dozens of nodes on one host, their defaults (256
    /// each) would take the memory the connections need.
    #[arg(long, default_value_t = 8)]
    pub rocksdb_block_cache_mib: u32,
    #[arg(long, default_value_t = 16)]
    pub rocksdb_write_buffer_mib: u32,
    /// The nodes' peer-link keep-alive and idle timeout (`--peer-keep-alive-ms`,
    /// `--peer-idle-timeout-ms`). Each node links to every other: at the nodes' defaults (1 s
    /// and 5 s), 72 idle nodes spent 1.3 of this host's two cores on keep-alives alone.
    #[arg(long, default_value_t = 10_000)]
    pub peer_keep_alive_ms: u64,
    #[arg(long, default_value_t = 30_000)]
    pub peer_idle_timeout_ms: u32,
    /// How long a replica has to answer a replication request (the nodes'
    /// `--replica-ack-timeout-ms`). At the nodes' default (2 s), run nine's replicas on a host
    /// at load average 275-412 missed it 74,594 times: each miss drops the replica from the
    /// shard's in-sync set, and each drop costs a catch-up.
    #[arg(long, default_value_t = 10_000)]
    pub replica_ack_timeout_ms: u64,
    /// The cluster's heartbeat timing (`ringpost-coordinator init`, or `ctl set-heartbeat` on a
    /// cluster made before with a shorter timeout). At the defaults (1 s, 5 missed), nodes
    /// starved of CPU while 72 of them started on two cores missed heartbeats, were marked down
    /// (215 times in one start), and each mark-down moved shards and made more work.
    #[arg(long, default_value_t = 2_000)]
    pub heartbeat_interval_ms: u64,
    #[arg(long, default_value_t = 15)]
    pub heartbeat_miss_limit: u32,
    /// Seconds to wait after connecting before measuring memory.
    #[arg(long, default_value_t = 5.0)]
    pub settle: f64,
    /// Seconds to hold every connection, pinging, before the ping check (keepalive CPU is
    /// measured over it).
    #[arg(long, default_value_t = 120.0)]
    pub hold: f64,
    /// Seconds the nodes' CPU is measured with no connection before the run: their
    /// background (peer links, heartbeats, timers), subtracted from the keepalive and storm
    /// figures. It starts once the nodes are quiet (`--storm-quiet-cpu-percent`, waiting up to
    /// `--answer-timeout`): nodes restarted on their data first catch up the replicas that
    /// missed their last records, which is no background.
    #[arg(long, default_value_t = 20.0)]
    pub background: f64,
    /// Messages sent between random pairs of connected devices at the end.
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Devices dropped at the end, each sent a message while away, and reconnected all at
    /// once (the reconnect storm): the time until every one is back and has its message.
    #[arg(long, default_value_t = 100_000)]
    pub storm: usize,
    /// Before the background is measured and before the storm, wait (up to
    /// `--answer-timeout`) until the nodes together use less than this share of one core (%)
    /// over 2 s: catch-ups after a restart are done; the queued messages are stored and
    /// replicated.
    #[arg(long, default_value_t = 50.0)]
    pub storm_quiet_cpu_percent: f64,
    /// Seconds the ping check and the messages wait for their answers.
    #[arg(long, default_value_t = 60.0)]
    pub answer_timeout: f64,
    /// Connection attempts in flight per worker.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Registrations in flight at once (first run).
    #[arg(long, default_value_t = 256)]
    pub register_concurrency: usize,
    /// Write the run's figures to this file as one JSON object.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Only start the cluster, register the devices the accounts file lacks, and stop: the
    /// measured run then starts from nodes that did not just register a million devices.
    #[arg(long)]
    pub register_only: bool,
}

/// A process this run started; killed (SIGKILL) and reaped when dropped.
struct Proc {
    child: Child,
    name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cluster on loopback: its processes and where to reach them.
pub struct LocalCluster {
    coordinator: Proc,
    nodes: Vec<Proc>,
    pub ws_urls: Vec<String>,
    pub admins: Vec<String>,
    pub codes_file: PathBuf,
}

impl LocalCluster {
    /// Starts (and, the first time, initialises) one coordinator and `nodes` nodes with data
    /// under `dir`, and waits until every node is ready.
    fn start(a: &Args, nodes: usize) -> Result<LocalCluster> {
        let dir = &a.dir;
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let sibling = |name: &str| -> Result<PathBuf> {
            let me = std::env::current_exe().context("find own executable")?;
            Ok(me.with_file_name(name))
        };
        let coord_bin = match &a.coordinator_bin {
            Some(b) => b.clone(),
            None => sibling("ringpost-coordinator")?,
        };
        let node_bin = match &a.node_bin {
            Some(b) => b.clone(),
            None => sibling("ringpost-node")?,
        };
        for b in [&coord_bin, &node_bin] {
            if !b.exists() {
                bail!("{} does not exist (build it, or name it)", b.display());
            }
        }
        let secret = dir.join("secret");
        if !secret.exists() {
            let bytes: [u8; 32] = rand::random();
            std::fs::write(&secret, hex::encode(bytes))?;
        }
        let codes_file = dir.join("verification-codes.txt");
        if !codes_file.exists() {
            std::fs::write(&codes_file, "")?;
        }
        let [client_port, raft_port, admin_port] = coordinator_ports(dir)?;
        let client = format!("127.0.0.1:{client_port}");
        // The coordinator runs at a higher priority than the nodes (`nice -n -10`, when allowed):
        // in a fleet it has hosts of its own, here it shares two cores with 72 nodes, and a
        // starved leader answers heartbeats late and marks live nodes down.
        let coordinator = spawn(
            Path::new("nice"),
            "coordinator",
            dir,
            &[
                "-n",
                "-10",
                &coord_bin.to_string_lossy(),
                "run",
                "--replica-id",
                "1",
                "--data-dir",
                &dir.join("coord").to_string_lossy(),
                "--client-listen",
                &client,
                "--raft-listen",
                &format!("127.0.0.1:{raft_port}"),
                "--admin-listen",
                &format!("127.0.0.1:{admin_port}"),
                "--secret-file",
                &secret.to_string_lossy(),
            ],
        )?;
        let marker = dir.join("initialized");
        if !marker.exists() {
            let t = Instant::now();
            loop {
                let out = Command::new(&coord_bin)
                    .args(["init", "--coordinator", &client, "--secret-file"])
                    .arg(&secret)
                    .arg("--heartbeat-interval-ms")
                    .arg(a.heartbeat_interval_ms.to_string())
                    .arg("--heartbeat-miss-limit")
                    .arg(a.heartbeat_miss_limit.to_string())
                    .output()?;
                if out.status.success() {
                    std::fs::write(&marker, "")?;
                    break;
                }
                if t.elapsed() > Duration::from_secs(30) {
                    bail!(
                        "coordinator init failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                nap(Duration::from_millis(200));
            }
        }
        set_heartbeat(&coord_bin, &client, &secret, a)?;
        let mut procs: Vec<Proc> = Vec::with_capacity(nodes);
        let (mut ws_urls, mut admins) = (Vec::new(), Vec::new());
        // In batches, each ready before the next starts: dozens of nodes opening their
        // databases at once on two cores kept some from reaching the coordinator in time.
        for first in (1..=nodes).step_by(START_BATCH) {
            for n in first..=(first + START_BATCH - 1).min(nodes) {
                let node_dir = dir.join(format!("node{n}"));
                let args: Vec<String> = vec![
                    "run".into(),
                    "--data-dir".into(),
                    node_dir.to_string_lossy().into(),
                    "--node-id".into(),
                    n.to_string(),
                    // Port 0: each node advertises the ports it got, and prints them.
                    "--listen-ws".into(),
                    "127.0.0.1:0".into(),
                    "--listen-admin".into(),
                    "127.0.0.1:0".into(),
                    // Each node its own loopback address for its peer links, as each host has
                    // its own in a fleet: a node admits PEER_HANDSHAKES_PER_SOURCE_MAX link
                    // handshakes per source address at once, and 71 nodes dialling one node
                    // from 127.0.0.1 were refused (run eleven: replication failed, sends with it).
                    "--listen-peer".into(),
                    format!("{}:0", peer_address(n)),
                    "--coordinator".into(),
                    client.clone(),
                    "--cluster-secret-file".into(),
                    secret.to_string_lossy().into(),
                    "--codes-file".into(),
                    codes_file.to_string_lossy().into(),
                    "--ws-driver".into(),
                    a.ws_driver.clone(),
                    "--device-rate".into(),
                    "1000000".into(),
                    "--device-burst".into(),
                    "1000000".into(),
                    // Registration is paced per source address and per second by default; the
                    // whole run registers from a few addresses.
                    "--codes-per-second".into(),
                    "1000000".into(),
                    "--codes-per-source-per-hour".into(),
                    "1000000000".into(),
                    "--ping-interval-ms".into(),
                    a.ping_interval_ms.to_string(),
                    "--idle-timeout-ms".into(),
                    a.idle_timeout_ms.to_string(),
                    // Dozens of nodes share this host: RocksDB's caches at their defaults (256 MiB
                    // of block cache and of memtables each) would fill it on their own.
                    "--rocksdb-block-cache-mib".into(),
                    a.rocksdb_block_cache_mib.to_string(),
                    "--rocksdb-write-buffer-mib".into(),
                    a.rocksdb_write_buffer_mib.to_string(),
                    "--peer-keep-alive-ms".into(),
                    a.peer_keep_alive_ms.to_string(),
                    "--peer-idle-timeout-ms".into(),
                    a.peer_idle_timeout_ms.to_string(),
                    "--replica-ack-timeout-ms".into(),
                    a.replica_ack_timeout_ms.to_string(),
                ];
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                procs.push(spawn(&node_bin, &format!("node{n}"), dir, &args)?);
            }
            let t = Instant::now();
            for (i, proc) in procs.iter_mut().enumerate().skip(first - 1) {
                let out = dir.join(format!("node{}.out", i + 1));
                loop {
                    let text = std::fs::read_to_string(&out).unwrap_or_default();
                    if text.contains("ringpost node ready") {
                        let url = |prefix: &str| {
                            text.lines()
                                .find_map(|l| l.strip_prefix(prefix))
                                .map(str::to_string)
                                .ok_or_else(|| anyhow!("{} printed no `{prefix}` line", proc.name))
                        };
                        ws_urls.push(url("listening ws ")?);
                        admins.push(url("listening admin ")?);
                        break;
                    }
                    if let Some(status) = proc.child.try_wait()? {
                        bail!(
                            "{} exited ({status}); its log: {}",
                            proc.name,
                            dir.join(format!("node{}.log", i + 1)).display()
                        );
                    }
                    if t.elapsed() > NODE_READY_TIMEOUT {
                        bail!("{} was not ready after {NODE_READY_TIMEOUT:?}", proc.name);
                    }
                    nap(Duration::from_millis(100));
                }
            }
        }
        Ok(LocalCluster {
            coordinator,
            nodes: procs,
            ws_urls,
            admins,
            codes_file,
        })
    }

    fn node_pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|p| p.child.id()).collect()
    }
}

/// The coordinator's client, Raft and admin ports for cluster directory `dir`: the ones of
/// earlier runs, or three free loopback ports now.
fn coordinator_ports(dir: &Path) -> Result<[u16; 3]> {
    let file = dir.join(COORDINATOR_PORTS_FILE);
    if let Ok(text) = std::fs::read_to_string(&file) {
        let ports: Vec<u16> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("{} holds no ports", file.display()))?;
        return ports
            .try_into()
            .map_err(|_| anyhow!("{} should hold three ports", file.display()));
    }
    // Held together while choosing, so the three differ.
    let held: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let mut ports = [0u16; 3];
    for (p, l) in ports.iter_mut().zip(&held) {
        *p = l.local_addr()?.port();
    }
    std::fs::write(&file, format!("{} {} {}\n", ports[0], ports[1], ports[2]))?;
    Ok(ports)
}

/// Node `n`'s (from 1) address for its peer links: 127.1.0.1, 127.1.0.2, … (loopback, apart
/// from the workers' 127.0.0.x).
fn peer_address(n: usize) -> std::net::Ipv4Addr {
    let n = n.clamp(1, 0xffff) as u16;
    std::net::Ipv4Addr::new(127, 1, (n >> 8) as u8, (n & 0xff) as u8)
}

/// Starts `bin args` with stdout to `DIR/NAME.out` and stderr to `DIR/NAME.log`.
/// Sets the heartbeat timing of `a` on a cluster made before (a no-op if it has it already).
/// A cluster with a longer timeout keeps it: `set-heartbeat` never shortens one, and the run
/// says so and goes on.
fn set_heartbeat(coord_bin: &Path, client: &str, secret: &Path, a: &Args) -> Result<()> {
    let t = Instant::now();
    loop {
        let out = Command::new(coord_bin)
            .args(["ctl", "--coordinator", client, "--secret-file"])
            .arg(secret)
            .args(["set-heartbeat", "--interval-ms"])
            .arg(a.heartbeat_interval_ms.to_string())
            .arg("--miss-limit")
            .arg(a.heartbeat_miss_limit.to_string())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return Ok(());
        }
        if stderr.contains("shorter than the current") {
            eprintln!("million: keeping the cluster's longer heartbeat timeout: {stderr}");
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("coordinator set-heartbeat failed: {stderr}");
        }
        nap(Duration::from_millis(200));
    }
}

fn spawn(bin: &Path, name: &str, dir: &Path, args: &[&str]) -> Result<Proc> {
    let out = std::fs::File::create(dir.join(format!("{name}.out")))?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    Ok(Proc {
        child,
        name: name.to_string(),
    })
}

/// The whole host at one moment: every node, the coordinator, the generator, the kernel.
#[derive(Debug, Clone, Serialize)]
struct HostSnapshot {
    #[serde(skip)]
    at: Option<Instant>,
    node_rss_kib: u64,
    node_rss_kib_max: u64,
    /// Proportional set size: shared pages (the binary) split between the processes.
    node_pss_kib: u64,
    coordinator_rss_kib: u64,
    generator_rss_kib: u64,
    node_cpu_ticks: u64,
    generator_cpu_ticks: u64,
    kernel: Option<KernelMem>,
    mem_available_kib: u64,
    /// Sums over every node's /metrics.
    connections: f64,
    frames_in: f64,
    nodes_scraped: usize,
    /// Host-wide drop counters (every process counts).
    drops: sysmem::DropCounters,
}

async fn snapshot(cluster: &LocalCluster, generator_pids: &[u32]) -> HostSnapshot {
    let at = Instant::now();
    let pids = cluster.node_pids();
    let rss: Vec<u64> = pids
        .iter()
        .map(|&p| sysmem::vm_rss_kib(p).unwrap_or(0))
        .collect();
    let node_cpu_ticks = pids.iter().filter_map(|&p| run::cpu_ticks(p)).sum();
    let generator_cpu_ticks = run::bench_cpu_ticks(generator_pids);
    let generator_rss_kib = std::iter::once(std::process::id())
        .chain(generator_pids.iter().copied())
        .map(|p| sysmem::vm_rss_kib(p).unwrap_or(0))
        .sum();
    let (mut connections, mut frames_in, mut scraped) = (0.0, 0.0, 0);
    for admin in &cluster.admins {
        if let Ok(s) = crate::node::scrape(admin).await {
            connections += crate::node::sum_of(&s, "ringpost_connections");
            frames_in += crate::node::sum_of(&s, "ringpost_frames_in_total");
            scraped += 1;
        }
    }
    HostSnapshot {
        at: Some(at),
        node_rss_kib: rss.iter().sum(),
        node_rss_kib_max: rss.iter().copied().max().unwrap_or(0),
        node_pss_kib: pids.iter().filter_map(|&p| pss_kib(p)).sum(),
        coordinator_rss_kib: sysmem::vm_rss_kib(cluster.coordinator.child.id()).unwrap_or(0),
        generator_rss_kib,
        node_cpu_ticks,
        generator_cpu_ticks,
        kernel: KernelMem::read().ok(),
        mem_available_kib: meminfo_kib("MemAvailable:").unwrap_or(0),
        connections,
        frames_in,
        nodes_scraped: scraped,
        drops: sysmem::DropCounters::read(),
    }
}

/// `Pss` of a process from `/proc/PID/smaps_rollup`, in KiB.
fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    field_kib(&text, "Pss:")
}

fn meminfo_kib(name: &str) -> Option<u64> {
    field_kib(&std::fs::read_to_string("/proc/meminfo").ok()?, name)
}

fn field_kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How the cluster settled before a measurement (the background, the storm).
struct Quiet {
    /// Seconds waited.
    waited_s: f64,
    /// The nodes' CPU over the last window, in % of one core.
    cpu_percent: f64,
}

/// Window over which [`settle_quiet`] measures the nodes' CPU.
const QUIET_WINDOW: Duration = Duration::from_secs(2);

/// Waits until the nodes together use less than `percent` of one core over a
/// [`QUIET_WINDOW`], or `at_most`.
async fn settle_quiet(cluster: &LocalCluster, percent: f64, at_most: Duration) -> Quiet {
    let t0 = Instant::now();
    let ticks = || -> u64 {
        cluster
            .node_pids()
            .iter()
            .filter_map(|&p| run::cpu_ticks(p))
            .sum()
    };
    loop {
        let (from, at) = (ticks(), Instant::now());
        tokio::time::sleep(QUIET_WINDOW).await;
        let cpu_s = ticks().saturating_sub(from) as f64 / CLOCK_TICKS_PER_S;
        let cpu_percent = 100.0 * cpu_s / at.elapsed().as_secs_f64();
        if cpu_percent < percent || t0.elapsed() >= at_most {
            return Quiet {
                waited_s: t0.elapsed().as_secs_f64(),
                cpu_percent,
            };
        }
    }
}

/// The nodes' CPU seconds per second between two snapshots.
fn cpu_rate(from: &HostSnapshot, to: &HostSnapshot) -> f64 {
    let wall = match (from.at, to.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => return 0.0,
    };
    let cpu = to.node_cpu_ticks.saturating_sub(from.node_cpu_ticks) as f64 / CLOCK_TICKS_PER_S;
    if wall > 0.0 {
        cpu / wall
    } else {
        0.0
    }
}

fn per_conn(before: u64, after: u64, n: u64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    ((after as f64 - before as f64) / n as f64 * 100.0).round() / 100.0
}

/// Says so when the kernel's TCP memory limit (`net.ipv4.tcp_mem`, in pages, for every TCP
/// socket of the host) is below what `connections` could need with both ends here. The kernel
/// charges a socket whole pages for what waits in its queues, so a page per connection is the
/// ceiling when data waits on every one (as it did before the holder read on arrival: 682,872
/// pages with a million held). Reading on arrival, run twelve peaked at 84,796 pages, but it
/// ran with the limit raised: the default was not tried. Above the limit the kernel drops
/// segments and every connection slows.
fn warn_if_tcp_mem_is_short(connections: usize) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem") else {
        return;
    };
    let Some(max_pages) = text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    // One page per generator socket, and a quarter again for the nodes' sockets in motion.
    let want = connections as u64 * 5 / 4;
    if max_pages < want {
        eprintln!(
            "million: net.ipv4.tcp_mem allows {max_pages} pages of TCP buffers; {connections} \
             connections with both ends here need about {want}: raise it, e.g. `sysctl -w \
             net.ipv4.tcp_mem=\"{} {} {}\"`",
            want / 2,
            want * 3 / 4,
            want
        );
    }
}

pub async fn run(a: &Args) -> Result<()> {
    if a.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let nodes = if a.nodes > 0 {
        a.nodes
    } else {
        a.connections.div_ceil(a.per_node.max(1))
    };
    warn_if_tcp_mem_is_short(a.connections);
    let machine_before = Machine::read();
    let t_start = Instant::now();
    let cluster = {
        let a = a.clone();
        tokio::task::spawn_blocking(move || LocalCluster::start(&a, nodes)).await??
    };
    let started_s = t_start.elapsed().as_secs_f64();
    if !a.quiet {
        eprintln!(
            "{nodes} nodes and a coordinator up in {started_s:.1} s (data and logs in {})",
            a.dir.display()
        );
    }
    let common = Common {
        targets: cluster.ws_urls.clone(),
        spawn_node: None,
        data_dir: None,
        transport: Some(Transport::Ws),
        ca_file: None,
        codes_file: Some(cluster.codes_file.clone()),
        admin: None,
        server_pid: None,
        accounts: Some(a.dir.join("accounts.txt")),
        client: ClientKind::Lean,
        register_concurrency: a.register_concurrency,
        connect_concurrency: a.connect_concurrency,
        workers: a.connections.div_ceil(CONNECTIONS_PER_WORKER),
        json: a.json.clone(),
        chart: None,
        quiet: a.quiet,
    };
    let setup = Setup {
        transport: Transport::Ws,
        peer: None,
        urls: cluster.ws_urls.clone(),
        ca_file: None,
        codes_file: Some(cluster.codes_file.clone()),
        admin: None,
        server_pid: None,
        loopback: true,
        ipv4: true,
        node: None,
    };
    let t_reg = Instant::now();
    let accounts = setup.accounts(&common, a.connections).await?;
    let register_s = t_reg.elapsed().as_secs_f64();
    if a.register_only {
        println!(
            "{} devices in {} ({register_s:.1} s)",
            accounts.len(),
            a.dir.join("accounts.txt").display()
        );
        return Ok(());
    }
    let (workers, _) = run::plan_workers(&common, a.connections);
    let ranges = run::split(accounts.len(), workers, 1);
    let answer_timeout_ms = (a.answer_timeout * 1000.0) as u64;
    let specs = setup.specs(
        &common,
        workers,
        |i| accounts[ranges[i].clone()].to_vec(),
        |i| {
            let share = ranges[i].len() * a.messages / accounts.len().max(1);
            scenario::Spec::Million(m::Spec {
                messages: share,
                answer_timeout_ms,
                storm: ranges[i].len() * a.storm.min(accounts.len()) / accounts.len().max(1),
            })
        },
    );
    let bg_quiet = settle_quiet(
        &cluster,
        a.storm_quiet_cpu_percent,
        Duration::from_secs_f64(a.answer_timeout),
    )
    .await;
    let bg_start = snapshot(&cluster, &[]).await;
    tokio::time::sleep(Duration::from_secs_f64(a.background)).await;
    let loadavg_before = sysmem::loadavg_1m();
    let before = snapshot(&cluster, &[]).await;
    let background_s_per_s = cpu_rate(&bg_start, &before);
    let mut fleet = Fleet::start(specs, false).await?;
    let gen = fleet.pids();
    let bar = run::bar(&common, "connecting", a.connections as u64);
    let b = bar.clone();
    let progress = move |done, errors| {
        b.set_position(done);
        b.set_message(format!("{errors} errors"));
    };
    let t0 = Instant::now();
    let halves = fleet.wait(m::HALF, &progress).await?;
    let mut connect_s = t0.elapsed().as_secs_f64();
    let n_half: u64 = halves
        .iter()
        .filter_map(|d| d.get("connected")?.as_u64())
        .sum();
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    let half = snapshot(&cluster, &gen).await;
    let t1 = Instant::now();
    fleet.go();
    let connected_data = fleet.wait(m::CONNECTED, &progress).await?;
    connect_s += t1.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let sum = |datas: &[Value], key: &str| -> u64 {
        datas.iter().filter_map(|d| d.get(key)?.as_u64()).sum()
    };
    let connected = sum(&connected_data, "connected");
    let failed = sum(&connected_data, "failed");
    let first_error = connected_data
        .iter()
        .find_map(|d| d.get("first_error")?.as_str().map(String::from));
    let connect_latency = stats::merge_encoded(
        connected_data
            .iter()
            .filter_map(|d| d.get("connect_latency")?.as_str()),
    )?;
    if !a.quiet {
        eprintln!("{connected} connected, {failed} failed in {connect_s:.1} s; settling, then holding {:.0} s", a.hold);
    }
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    let after = snapshot(&cluster, &gen).await;
    tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
    let held = snapshot(&cluster, &gen).await;
    fleet.go();
    let pinged = fleet.wait(m::PINGED, &|_, _| {}).await?;
    let checked = |key: &str| -> u64 {
        pinged
            .iter()
            .filter_map(|d| d.get("check")?.get(key)?.as_u64())
            .sum()
    };
    let keepalive = |key: &str| -> u64 {
        pinged
            .iter()
            .filter_map(|d| d.get("keepalive")?.get(key)?.as_u64())
            .sum()
    };
    if !a.quiet {
        eprintln!(
            "ping check: {} of {} answered; sending {} messages",
            checked("answered"),
            checked("asked"),
            a.messages
        );
    }
    let end_pre_messages = snapshot(&cluster, &gen).await;
    fleet.go();
    let storm_snaps = if a.storm > 0 {
        let queued = fleet.wait(m::STORM_QUEUED, &|_, _| {}).await?;
        let away: u64 = queued.iter().filter_map(|d| d.get("away")?.as_u64()).sum();
        // The storm starts on a quiet cluster: replication the queueing left behind (a
        // replica caught up, a late apply) would otherwise be timed as the storm's.
        let quiet = settle_quiet(
            &cluster,
            a.storm_quiet_cpu_percent,
            Duration::from_secs_f64(a.answer_timeout),
        )
        .await;
        if !a.quiet {
            eprintln!(
                "{away} devices away with a message queued to each; the nodes at {:.0}% of a core after {:.1} s; all come back now",
                quiet.cpu_percent, quiet.waited_s
            );
        }
        let before_storm = snapshot(&cluster, &gen).await;
        fleet.go();
        Some((queued, before_storm, quiet))
    } else {
        None
    };
    let done = fleet.wait(DONE, &|_, _| {}).await?;
    let after_storm = snapshot(&cluster, &gen).await;
    let msg = |key: &str| -> u64 {
        done.iter()
            .filter_map(|d| d.get("messages")?.get(key)?.as_u64())
            .sum()
    };
    let msg_p99 = done
        .iter()
        .filter_map(|d| d.get("messages")?.get("latency_ms")?.get("p99")?.as_f64())
        .fold(0.0_f64, f64::max);
    let msg_p50s: Vec<f64> = done
        .iter()
        .filter_map(|d| d.get("messages")?.get("latency_ms")?.get("p50")?.as_f64())
        .collect();

    // The report.
    let mut r = Report::new("million", "ws", connected, failed);
    r.set_row(
        "nodes",
        nodes,
        "nodes",
        format!(
            "{nodes} nodes ({} driver) + 1 coordinator, {} worker processes",
            a.ws_driver,
            fleet.len()
        ),
    );
    r.set_row(
        "requested",
        a.connections,
        "requested",
        a.connections.to_string(),
    );
    r.set("registration_s", register_s);
    r.set("cluster_start_s", started_s);
    r.set_row(
        "connect_s",
        (connect_s * 100.0).round() / 100.0,
        "connect time",
        format!(
            "{connect_s:.1} s to connect and authenticate all ({:.0} connections/s)",
            connected as f64 / connect_s.max(1e-9)
        ),
    );
    r.set_percentiles(
        "connect_latency_ms",
        "connect→Welcome",
        Percentiles::of(&connect_latency),
    );
    if let Some(e) = &first_error {
        r.row("first error", e.clone());
    }
    r.set_row(
        "server_connections",
        after.connections,
        "nodes say",
        format!(
            "{:.0} connections (sum of the nodes' /metrics, {} of {nodes} scraped)",
            after.connections, after.nodes_scraped
        ),
    );
    let added = connected.saturating_sub(n_half);
    let slope = per_conn(half.node_rss_kib, after.node_rss_kib, added);
    r.set_row(
        "server_rss_kib_per_conn_slope",
        slope,
        "node RSS/conn",
        format!(
            "{slope} KiB (slope over all nodes: {} → {} KiB from {n_half} to {connected} connections)",
            half.node_rss_kib, after.node_rss_kib
        ),
    );
    let from_zero = per_conn(before.node_rss_kib, after.node_rss_kib, connected);
    let after_hold = per_conn(before.node_rss_kib, held.node_rss_kib, connected);
    r.set_row(
        "server_rss_kib_per_conn",
        from_zero,
        "… from zero",
        format!(
            "{from_zero} KiB (all nodes' RSS {} MiB before, {} MiB with every connection; PSS {} MiB; largest node {} MiB)",
            before.node_rss_kib / 1024,
            after.node_rss_kib / 1024,
            after.node_pss_kib / 1024,
            after.node_rss_kib_max / 1024
        ),
    );
    r.set_row(
        "server_rss_kib_per_conn_after_hold",
        after_hold,
        "after hold",
        format!(
            "{after_hold} KiB/conn (all nodes {} MiB after {:.0} s)",
            held.node_rss_kib / 1024,
            a.hold
        ),
    );
    let gen_slope = per_conn(half.generator_rss_kib, after.generator_rss_kib, added);
    r.set_row(
        "generator_rss_kib_per_conn_slope",
        gen_slope,
        "generator/conn",
        format!(
            "{gen_slope} KiB (slope; every generator process: {} MiB with every connection)",
            after.generator_rss_kib / 1024
        ),
    );
    if let (Some(h), Some(x), Some(b)) = (half.kernel, after.kernel, before.kernel) {
        let k = per_conn(h.total_kib(), x.total_kib(), added * 2);
        r.set_row(
            "kernel_kib_per_conn_slope",
            k,
            "kernel/socket",
            format!(
                "{k} KiB per socket (slope; slab {} → {} MiB, TCP buffers {} MiB; two sockets per connection)",
                b.slab_kib / 1024,
                x.slab_kib / 1024,
                x.tcp_mem_pages * sysmem::PAGE_BYTES / 1024 / 1024
            ),
        );
        r.set("kernel", json!({ "before": b, "half": h, "after": x }));
    }
    r.set_row(
        "coordinator_rss_kib",
        after.coordinator_rss_kib,
        "coordinator",
        format!("{} MiB RSS", after.coordinator_rss_kib / 1024),
    );
    r.set_row(
        "mem_available_kib",
        after.mem_available_kib,
        "host memory",
        format!(
            "{} MiB available with every connection held ({} MiB before the run)",
            after.mem_available_kib / 1024,
            before.mem_available_kib / 1024
        ),
    );
    let pings = held.frames_in - after.frames_in;
    let node_s =
        held.node_cpu_ticks.saturating_sub(after.node_cpu_ticks) as f64 / CLOCK_TICKS_PER_S;
    let gen_s = held
        .generator_cpu_ticks
        .saturating_sub(after.generator_cpu_ticks) as f64
        / CLOCK_TICKS_PER_S;
    let wall = held
        .at
        .zip(after.at)
        .map_or(0.0, |(h, x)| h.duration_since(x).as_secs_f64());
    if pings > 0.0 {
        let us = (node_s * 1e6 / pings * 100.0).round() / 100.0;
        let background_s = background_s_per_s * wall;
        let net = ((node_s - background_s).max(0.0) * 1e6 / pings * 100.0).round() / 100.0;
        r.set("keepalive_pings", pings);
        r.set("keepalive_node_cpu_us_per_ping_gross", us);
        r.set(
            "nodes_background_cpu_percent",
            (background_s_per_s * 1000.0).round() / 10.0,
        );
        r.set_row(
            "keepalive_node_cpu_us_per_ping",
            net,
            "keepalive",
            format!(
                "{net} µs of node CPU per ping, less the nodes' background ({us} µs with it; {pings:.0} pings in {wall:.0} s; all nodes {node_s:.1} s = {:.0}% of a core, of which background {:.0}% measured with no connection; generator {gen_s:.1} s)",
                node_s / wall.max(1e-9) * 100.0,
                background_s_per_s * 100.0
            ),
        );
    }
    r.set(
        "background_settle_s",
        (bg_quiet.waited_s * 10.0).round() / 10.0,
    );
    r.set(
        "generator_keepalive",
        json!({
            "pings": keepalive("pings"),
            "ping_writes_failed": keepalive("ping_writes_failed"),
            "closed_by_node": keepalive("closed_by_node"),
        }),
    );
    r.set_row(
        "ping_check_answered",
        checked("answered"),
        "ping check",
        format!(
            "{} of {} held connections answered a Ping at the end ({} unanswered, {} closed, {} writes failed)",
            checked("answered"),
            checked("asked"),
            checked("unanswered"),
            checked("closed"),
            checked("write_failed")
        ),
    );
    r.set("ping_check_asked", checked("asked"));
    r.set_row(
        "messages_delivered",
        msg("delivered"),
        "messages",
        format!(
            "{} of {} sent between random pairs delivered ({} SendAck ok, {} refused, {} duplicates, {} write failures); worst worker's p99 {msg_p99:.1} ms, median p50 {:.1} ms",
            msg("delivered"),
            msg("sent"),
            msg("acked"),
            msg("refused"),
            msg("duplicates"),
            msg("write_failed"),
            median(&msg_p50s)
        ),
    );
    r.set("messages_sent", msg("sent"));
    r.set("messages_acked", msg("acked"));
    r.set("messages_duplicates", msg("duplicates"));
    if let Some((queued, before_storm, quiet)) = &storm_snaps {
        r.set("storm_settle_s", (quiet.waited_s * 10.0).round() / 10.0);
        r.set(
            "storm_start_nodes_cpu_percent",
            (quiet.cpu_percent * 10.0).round() / 10.0,
        );
        report_storm(
            &mut r,
            queued,
            &done,
            before_storm,
            &after_storm,
            background_s_per_s,
        )?;
    }
    r.set("snapshots", json!({ "before": before, "half": half, "after": after, "held": held, "end": end_pre_messages }));
    r.set("config", json!({ "million": a }));
    let mut machine = Machine::read();
    machine.loadavg_1m_before_run = loadavg_before;
    r.set("machine", machine);
    r.set("machine_at_start", machine_before);
    r.set(
        "date_unix_s",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    r.set("note", report::SHARED_CORES_NOTE);
    print!("{}", r.table());
    if let Some(path) = &a.json {
        report::write_json(path, &r.to_json())?;
        println!("  json: {}", path.display());
    }
    drop(fleet);
    drop(cluster);
    if connected < a.connections as u64 {
        return Err(anyhow!(
            "{} of {} connections failed",
            a.connections as u64 - connected,
            a.connections
        ));
    }
    Ok(())
}

/// The reconnect storm's rows: devices away and queued, how long until all were connected and
/// had their message, and the nodes' CPU per returning device.
fn report_storm(
    r: &mut Report,
    queued: &[Value],
    done: &[Value],
    before: &HostSnapshot,
    after: &HostSnapshot,
    background_s_per_s: f64,
) -> Result<()> {
    let q = |key: &str| -> u64 { queued.iter().filter_map(|d| d.get(key)?.as_u64()).sum() };
    // Each worker's value at `path` under its "storm" object.
    let values = |path: &[&str]| -> Vec<Value> {
        done.iter()
            .filter_map(|d| {
                let mut v = d.get("storm")?;
                for p in path {
                    v = v.get(*p)?;
                }
                Some(v.clone())
            })
            .collect()
    };
    let sum = |path: &[&str]| -> u64 { values(path).iter().filter_map(Value::as_u64).sum() };
    let max = |path: &[&str]| -> f64 {
        values(path)
            .iter()
            .filter_map(Value::as_f64)
            .fold(0.0, f64::max)
    };
    let latency = stats::merge_encoded(
        done.iter()
            .filter_map(|d| d.get("storm")?.get("connect_latency")?.as_str()),
    )?;
    let away = q("away");
    let reconnected = sum(&["reconnected"]);
    let delivered = sum(&["delivered", "delivered"]);
    let all_connected_s = max(&["all_connected_s"]);
    let last_delivery_s = max(&["delivered", "last_delivery_s"]);
    let wall = match (before.at, after.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let node_s = (after.node_cpu_ticks.saturating_sub(before.node_cpu_ticks) as f64
        / CLOCK_TICKS_PER_S
        - background_s_per_s * wall)
        .max(0.0);
    r.set_row(
        "storm_s",
        (last_delivery_s * 100.0).round() / 100.0,
        "reconnect storm",
        format!(
            "{reconnected} of {away} devices back in {all_connected_s:.2} s, {delivered} with their queued message by {last_delivery_s:.2} s ({} queued, {} refused; {} reconnects failed)",
            q("queued"),
            q("refused"),
            sum(&["reconnect_failed"])
        ),
    );
    r.set_percentiles(
        "storm_connect_latency_ms",
        "storm connect",
        Percentiles::of(&latency),
    );
    if reconnected > 0 {
        let us = (node_s * 1e6 / reconnected as f64).round();
        let gross_s =
            after.node_cpu_ticks.saturating_sub(before.node_cpu_ticks) as f64 / CLOCK_TICKS_PER_S;
        let gross_us = (gross_s * 1e6 / reconnected as f64).round();
        let generator_s = after
            .generator_cpu_ticks
            .saturating_sub(before.generator_cpu_ticks) as f64
            / CLOCK_TICKS_PER_S;
        let generator_us = (generator_s * 1e6 / reconnected as f64).round();
        r.set_row(
            "storm_node_cpu_us_per_device",
            us,
            "storm CPU",
            format!("{us} µs of node CPU per returning device (connect, authenticate, deliver, ack; {node_s:.1} s over all nodes in {wall:.1} s, less their background; {gross_us} µs with it); the generator {generator_us} µs"),
        );
        r.set("storm_node_cpu_us_per_device_gross", gross_us);
        r.set("storm_generator_cpu_us_per_device", generator_us);
    }
    // Peer links are QUIC: a datagram dropped on a node's full receive buffer waits for loss
    // recovery, whose timer doubles with each loss in a row.
    let drops = after.drops.since(&before.drops);
    r.set_row(
        "storm_udp_rcvbuf_drops",
        drops.udp_rcvbuf_errors,
        "storm drops",
        format!(
            "{} UDP datagrams dropped on full receive buffers (peer links), {} SYNs on full accept queues (host-wide counters)",
            drops.udp_rcvbuf_errors, drops.listen_overflows
        ),
    );
    r.set("storm_listen_overflows", drops.listen_overflows);
    r.set("storm_away", away);
    r.set("storm_reconnected", reconnected);
    r.set("storm_delivered", delivered);
    r.set("storm_all_connected_s", all_connected_s);
    r.set(
        "storm_first_error",
        done.iter().find_map(|d| {
            d.get("storm")?
                .get("first_error")?
                .as_str()
                .map(String::from)
        }),
    );
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_has_its_own_peer_address_on_loopback() {
        assert_eq!(peer_address(1).to_string(), "127.1.0.1");
        assert_eq!(peer_address(72).to_string(), "127.1.0.72");
        assert_eq!(peer_address(300).to_string(), "127.1.1.44");
        let all: std::collections::HashSet<_> = (1..=1000).map(peer_address).collect();
        assert_eq!(all.len(), 1000);
        assert!(all.iter().all(|a| a.is_loopback()));
    }

    #[test]
    fn per_conn_is_the_growth_per_connection() {
        assert_eq!(per_conn(1000, 3000, 1000), 2.0);
        assert_eq!(per_conn(1000, 900, 100), -1.0);
        assert_eq!(per_conn(1000, 3000, 0), 0.0);
    }

    #[test]
    fn rollup_fields_parse() {
        let text = "00-ff ---p 0 0 [rollup]\nRss:  44112 kB\nPss:  33220 kB\n";
        assert_eq!(field_kib(text, "Pss:"), Some(33_220));
        assert_eq!(field_kib(text, "Swap:"), None);
    }
}
