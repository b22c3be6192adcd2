//! Faults: what each kind does when applied and when healed, and the seeded schedule of a
//! scenario.
//!
//! | kind | applied | healed | needs |
//! |---|---|---|---|
//! | `kill-restart` | SIGKILL the node | start it again on the same data dir | — |
//! | `restart-loop` | kill and restart several times in a row, each run short | node running | — |
//! | `pause` | SIGSTOP | SIGCONT | — |
//! | `partition` | the node's link down | link up | netns |
//! | `one-way-partition` | iptables in the node's namespace drops one direction | rule removed | netns, iptables |
//! | `partial-partition` | the node and one client host cannot reach each other; the other can | rules removed | netns, iptables |
//! | `loss` | iptables `statistic` drops a share of packets both ways | rules removed | netns, iptables |
//! | `bandwidth` | tc tbf on the node's and the clients' links | qdiscs removed | netns, tc |
//! | `delay` | the relay delays TCP chunks (with jitter) | relay clean | relay |
//! | `relay-reset` | the relay aborts every TCP connection (RST) | — | relay |
//! | `udp-chaos` | the relay drops, duplicates, reorders and delays QUIC datagrams | relay clean | relay |
//! | `disk-full` | fill the node's tmpfs data dir | remove the filler (and maybe kill -9, restart) | netns (root: mount) |
//! | `fsync-fail` | libfiu: fsync and fdatasync fail with EIO | disabled (and maybe kill -9, restart) | libfiu |
//! | `clock-skew` | libfaketime: the node's wall clock jumps, and the node restarts on it | real time, restart | libfaketime |
//! | `leader-kill` | SIGKILL the coordinator leader (`ctl status`), wait for a new one | the replica restarted, all agree on a leader | cluster |
//! | `node-join` | start a node (a fresh data dir if it ran before), wait until it is active | — | cluster |
//! | `node-drain` | `ctl drain`, wait until the node handed off its shards and exited 0 | — | cluster |
//! | `node-loss` | cut a node off from the client hosts (netns), SIGKILL it for good, wait until it is marked down, `ctl remove` it | — (it stays gone) | cluster |
//! | `coord-partition` | iptables DROP both ways between a node and every coordinator replica (its clients still reach it), wait until it is marked down | rules removed, wait until it is active again | cluster, netns, iptables |
//! | `primary-partition` | `coord-partition` plus iptables DROP of the node's peer port both ways (the other nodes cannot reach it nor it them; its clients still can), wait until it is marked down | rules removed, wait until it is active again | cluster, netns, iptables |
//! | `zone-loss` | `node-loss` for every node of a zone at once (a zoned run): cut off from the clients together, killed together, each marked down and removed | — (they stay gone) | cluster |
//! | `node-restart` | SIGTERM a node, wait until it is marked down (its shards fail over) | start it on its data dir, wait until it is active and back in as many in-sync sets as before | cluster |
//! | `replica-lag` | the peer relay (only this node's peer address leads through it) delays every datagram of the links to it, wait until a primary drops it from an in-sync set | relay clean, wait until it is back in as many in-sync sets as before | cluster |
//! | `peer-partition` | iptables in a node's namespace drops its peer-link traffic (UDP on the peer port) in one or both directions: it cannot forward to, or be forwarded to by, the other nodes; clients and coordinators still reach it | rules removed | cluster, netns, iptables |
//! | `abuse-<attack>` | start an attacker ([`crate::attack`]) on the `attacker` host: connections that never say Hello, slow readers, floods, malformed frames, peer-port junk | the attacker stops and reports what it saw | — (`abuse-peer`: cluster) |
//! | `peer-chaos` | the peer relay (every node-to-node QUIC datagram passes it) delays, drops, duplicates and reorders | relay clean | cluster |
//!
//! The membership kinds (`leader-kill` to `replica-lag`) live in [`membership`].
//!
//! In a cluster run the node faults (`kill-restart` to `clock-skew`, and the peer kinds) act on
//! the node the plan names ([`PlannedFault::node`], drawn by the seed); otherwise on `node1`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::attack::Attack;
use crate::relay::Impairment;
use crate::scenario::Rig;

pub mod membership;

/// Rule comment that marks our iptables rules.
const IPTABLES_COMMENT: &str = "ringpost-chaos";

/// Largest filler written to make the disk full, in bytes (the tmpfs is far smaller).
const FILLER_BYTES_MAX: u64 = 1 << 30;

/// One fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FaultKind {
    KillRestart,
    RestartLoop {
        kills: u32,
    },
    Pause,
    Partition,
    /// `inbound`: packets to the node are dropped; otherwise packets from it.
    OneWayPartition {
        inbound: bool,
    },
    /// The node and this client host are cut off from each other.
    PartialPartition {
        host: String,
    },
    Loss {
        percent: u32,
    },
    Bandwidth {
        kbit: u32,
    },
    Delay {
        delay_ms: u32,
        jitter_ms: u32,
    },
    RelayReset,
    UdpChaos {
        loss_percent: u32,
        duplicate_percent: u32,
        reorder_percent: u32,
        jitter_ms: u32,
    },
    /// `restart`: after freeing the space, kill -9 and restart the node (what an operator does
    /// when it stays stuck), which also checks that what it acked survives a crash.
    DiskFull {
        restart: bool,
    },
    FsyncFail {
        restart: bool,
    },
    /// Seconds the node's wall clock is moved (negative: back).
    ClockSkew {
        offset_s: i64,
    },
    /// kill -9 the coordinator leader; restarted when the fault heals.
    LeaderKill,
    /// Node `node` starts and joins the cluster.
    NodeJoin {
        node: u64,
    },
    /// Node `node` is drained (`ctl drain`) and leaves.
    NodeDrain {
        node: u64,
    },
    /// Node `node` is killed for good and removed (`ctl remove`). With namespaces it is first
    /// cut off from the client hosts for `offline_ms` (its users' devices drop off, messages
    /// to them queue there), so that the kill takes queued messages with it.
    NodeLoss {
        node: u64,
        offline_ms: u64,
    },
    /// Node `node` cannot reach any coordinator replica, nor they it (iptables, both ways);
    /// its clients and peers still reach it. It must stop acking writes once its lease runs
    /// out, be marked down, and be re-activated when the partition heals.
    CoordPartition {
        node: u64,
    },
    /// Node `node` is cut off from every coordinator replica and from the other nodes' peer
    /// links (both ways); its clients still reach it. A replicating primary must stop acking
    /// (its replica writes time out and it cannot drop the replica without the coordinator,
    /// then its lease ends), its shards fail over to their in-sync replicas, and it is
    /// re-activated when the partition heals.
    PrimaryPartition {
        node: u64,
    },
    /// Every node of zone `zone` ([`crate::cluster::ZONES`]) is cut off from the client hosts
    /// for `offline_ms` (namespaces only), then killed at once for good and removed.
    ZoneLoss {
        zone: String,
        offline_ms: u64,
    },
    /// A rolling restart's step: node `node` is stopped (SIGTERM) until it is marked down, then
    /// restarted on its data dir; healed once it is back in its in-sync sets.
    NodeRestart {
        node: u64,
    },
    /// Node `node`'s peer links pass the peer relay, which delays them `delay_ms` each way until
    /// a primary drops the node from an in-sync set; healed once it is back in its sets.
    ReplicaLag {
        node: u64,
        delay_ms: u32,
    },
    /// The node's peer link is cut: `inbound` drops what other nodes send it, `outbound` what
    /// it sends them (both: a full partition from its peers). Clients and coordinators still
    /// reach it, so no membership changes: forwarded requests must fail and be retried.
    PeerPartition {
        inbound: bool,
        outbound: bool,
    },
    /// Every node-to-node datagram (through the peer relay) is delayed by `delay_ms` plus up
    /// to `jitter_ms`, and a share dropped, duplicated and reordered.
    PeerChaos {
        delay_ms: u32,
        jitter_ms: u32,
        loss_percent: u32,
        duplicate_percent: u32,
        reorder_percent: u32,
    },
    /// An attacker abuses the node (or, for [`Attack::Peer`], a cluster node's peer port) for
    /// the fault's length while the honest workload runs.
    Abuse {
        attack: Attack,
    },
}

impl FaultKind {
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::KillRestart => "kill-restart",
            FaultKind::RestartLoop { .. } => "restart-loop",
            FaultKind::Pause => "pause",
            FaultKind::Partition => "partition",
            FaultKind::OneWayPartition { .. } => "one-way-partition",
            FaultKind::PartialPartition { .. } => "partial-partition",
            FaultKind::Loss { .. } => "loss",
            FaultKind::Bandwidth { .. } => "bandwidth",
            FaultKind::Delay { .. } => "delay",
            FaultKind::RelayReset => "relay-reset",
            FaultKind::UdpChaos { .. } => "udp-chaos",
            FaultKind::DiskFull { .. } => "disk-full",
            FaultKind::FsyncFail { .. } => "fsync-fail",
            FaultKind::ClockSkew { .. } => "clock-skew",
            FaultKind::LeaderKill => "leader-kill",
            FaultKind::NodeJoin { .. } => "node-join",
            FaultKind::NodeDrain { .. } => "node-drain",
            FaultKind::NodeLoss { .. } => "node-loss",
            FaultKind::CoordPartition { .. } => "coord-partition",
            FaultKind::PeerPartition { .. } => "peer-partition",
            FaultKind::PrimaryPartition { .. } => "primary-partition",
            FaultKind::ZoneLoss { .. } => "zone-loss",
            FaultKind::NodeRestart { .. } => "node-restart",
            FaultKind::ReplicaLag { .. } => "replica-lag",
            FaultKind::PeerChaos { .. } => "peer-chaos",
            FaultKind::Abuse { attack } => attack.name(),
        }
    }

    /// Whether it changes the membership of a cluster (and needs one).
    pub fn is_membership(&self) -> bool {
        matches!(
            self,
            FaultKind::LeaderKill
                | FaultKind::NodeJoin { .. }
                | FaultKind::NodeDrain { .. }
                | FaultKind::NodeLoss { .. }
                | FaultKind::CoordPartition { .. }
                | FaultKind::PrimaryPartition { .. }
                | FaultKind::ZoneLoss { .. }
                | FaultKind::NodeRestart { .. }
                | FaultKind::ReplicaLag { .. }
        )
    }

    /// The node a membership fault acts on.
    pub fn member_node(&self) -> Option<u64> {
        match self {
            FaultKind::NodeJoin { node }
            | FaultKind::NodeDrain { node }
            | FaultKind::NodeLoss { node, .. }
            | FaultKind::CoordPartition { node }
            | FaultKind::PrimaryPartition { node }
            | FaultKind::NodeRestart { node }
            | FaultKind::ReplicaLag { node, .. } => Some(*node),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            FaultKind::RestartLoop { kills } => format!("{kills} kills in a row"),
            FaultKind::OneWayPartition { inbound: true } => "clients -> node dropped".into(),
            FaultKind::OneWayPartition { inbound: false } => "node -> clients dropped".into(),
            FaultKind::PartialPartition { host } => format!("node <-> {host} cut"),
            FaultKind::Loss { percent } => format!("{percent}% of packets dropped both ways"),
            FaultKind::Bandwidth { kbit } => format!("{kbit} kbit/s"),
            FaultKind::Delay {
                delay_ms,
                jitter_ms,
            } => format!("{delay_ms} ms + 0..{jitter_ms} ms per chunk"),
            FaultKind::UdpChaos {
                loss_percent,
                duplicate_percent,
                reorder_percent,
                jitter_ms,
            } => format!(
                "{loss_percent}% lost, {duplicate_percent}% duplicated, {reorder_percent}% \
                 reordered, 0..{jitter_ms} ms jitter"
            ),
            FaultKind::ClockSkew { offset_s } => format!("node clock {offset_s:+} s"),
            FaultKind::DiskFull { restart: true } | FaultKind::FsyncFail { restart: true } => {
                "then kill -9 and restart".into()
            }
            FaultKind::LeaderKill => "kill -9 the coordinator leader, restart it after".into(),
            FaultKind::NodeJoin { node } => format!("node {node} joins"),
            FaultKind::NodeDrain { node } => format!("ctl drain {node}"),
            FaultKind::NodeLoss { node, offline_ms } => format!(
                "node {node} cut off from the clients for {offline_ms} ms (namespaces only), \
                 then kill -9 for good and ctl remove {node}"
            ),
            FaultKind::CoordPartition { node } => {
                format!("node {node} <-> every coordinator replica cut, clients still reach it")
            }
            FaultKind::PrimaryPartition { node } => format!(
                "node {node} <-> every coordinator replica and every peer cut, clients still \
                 reach it"
            ),
            FaultKind::ZoneLoss { zone, offline_ms } => format!(
                "zone {zone} (nodes {:?}) cut off from the clients for {offline_ms} ms \
                 (namespaces only), then every node of it kill -9 at once for good and ctl \
                 remove",
                crate::cluster::zone_nodes(zone)
            ),
            FaultKind::NodeRestart { node } => {
                format!("node {node} SIGTERM until marked down, then restarted on its data dir")
            }
            FaultKind::ReplicaLag { node, delay_ms } => {
                format!("node {node}'s peer links delayed {delay_ms} ms each way")
            }
            FaultKind::PeerPartition { inbound, outbound } => match (inbound, outbound) {
                (true, true) => "peer link cut both ways".into(),
                (true, false) => "peers -> node dropped".into(),
                _ => "node -> peers dropped".into(),
            },
            FaultKind::PeerChaos {
                delay_ms,
                jitter_ms,
                loss_percent,
                duplicate_percent,
                reorder_percent,
            } => format!(
                "node-to-node datagrams: {delay_ms} ms + 0..{jitter_ms} ms, {loss_percent}% lost, \
                 {duplicate_percent}% duplicated, {reorder_percent}% reordered"
            ),
            FaultKind::Abuse { attack } => attack.describe(),
            _ => String::new(),
        }
    }

    /// Whether the node's data directory must be a tmpfs of ours.
    pub fn needs_tmpfs(&self) -> bool {
        matches!(self, FaultKind::DiskFull { .. })
    }

    /// Whether it acts on one node (in a cluster, the one the plan names): the process,
    /// network, storage, clock and peer-link faults; not the relay's client-side faults (the
    /// relay fronts every node) nor the membership ones (they name their node themselves).
    pub fn acts_on_a_node(&self) -> bool {
        !self.is_membership()
            && !matches!(
                self,
                FaultKind::Delay { .. }
                    | FaultKind::RelayReset
                    | FaultKind::UdpChaos { .. }
                    | FaultKind::PeerChaos { .. }
                    | FaultKind::Abuse { .. }
            )
    }
}

/// A fault at a time in the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedFault {
    pub id: u32,
    /// From the start of sending.
    pub at: Duration,
    /// How long the fault lasts (for `relay-reset`, nothing: it is instantaneous).
    pub duration: Duration,
    pub kind: FaultKind,
    /// In a cluster run, the node a node fault acts on ([`FaultKind::acts_on_a_node`]);
    /// `None`: `node1` (the only node of a single-node run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
}

/// A menu entry: a fault kind maker and its duration range in milliseconds.
pub type Menu = Vec<(fn(&mut ChaCha8Rng) -> FaultKind, (u64, u64))>;

/// Faults one after another from `menu`, separated by quiet gaps, from a warm-up after the
/// start until a cool-down before the end of `window`, so the run ends healed.
pub fn plan(seed: u64, window: Duration, menu: &Menu) -> Vec<PlannedFault> {
    const WARMUP: Duration = Duration::from_secs(2);
    const COOLDOWN: Duration = Duration::from_secs(3);
    const FAULTS_MAX: usize = 500;
    let mut rng = crate::seeded(seed, "faults");
    let mut out = Vec::new();
    if menu.is_empty() {
        return out;
    }
    let mut t = WARMUP;
    while out.len() < FAULTS_MAX {
        let (make, (lo, hi)) = &menu[rng.gen_range(0..menu.len())];
        let kind = make(&mut rng);
        let duration = Duration::from_millis(rng.gen_range(*lo..=*hi));
        if t + duration + COOLDOWN > window {
            break;
        }
        out.push(PlannedFault {
            id: out.len() as u32 + 1,
            at: t,
            duration,
            kind,
            node: None,
        });
        t += duration + Duration::from_millis(rng.gen_range(1_000..3_000));
    }
    out
}

/// Names, for every node fault of a cluster run's plan, the node it acts on: one of
/// `1..=nodes`, drawn from the seed.
pub fn assign_nodes(plan: &mut [PlannedFault], seed: u64, nodes: u64) {
    let mut rng = crate::seeded(seed, "fault-nodes");
    for fault in plan.iter_mut().filter(|f| f.kind.acts_on_a_node()) {
        fault.node = Some(rng.gen_range(1..=nodes));
    }
}

/// Time a cluster node may take to be an active member again after a fault on it healed.
pub const BACK_IN_SERVICE_TIMEOUT: Duration = Duration::from_secs(30);

/// Applies a fault. Returns what was done (for the history).
pub async fn apply(rig: &mut Rig, fault: &PlannedFault) -> Result<String> {
    rig.aim(fault.node)?;
    // A fault on a cluster node: the epoch before it, to tell afterwards whether the cluster
    // reacted (marked it down, moved its shards).
    rig.fault_epoch = match (&rig.cluster, fault.node) {
        (Some(cluster), Some(_)) => Some(cluster.view().await?.epoch),
        _ => None,
    };
    apply_kind(rig, fault).await
}

async fn apply_kind(rig: &mut Rig, fault: &PlannedFault) -> Result<String> {
    let node_host = rig.node().host.clone();
    match &fault.kind {
        FaultKind::KillRestart => {
            let pid = rig.node().pid().unwrap_or(0);
            rig.kill_node().await;
            Ok(format!("SIGKILL pid {pid}"))
        }
        FaultKind::RestartLoop { kills } => {
            let mut pids = Vec::new();
            let per = fault.duration / (*kills).max(1);
            for i in 0..*kills {
                pids.push(rig.node().pid().unwrap_or(0));
                rig.kill_node().await;
                rig.start_node().await?;
                if i + 1 < *kills {
                    // Up for a short, seeded while, then killed again.
                    let up = per.mul_f64(rig.rng.gen_range(0.1..0.6));
                    tokio::time::sleep(up).await;
                }
            }
            Ok(format!("SIGKILL pids {pids:?}, each restarted"))
        }
        FaultKind::Pause => {
            rig.node().pause();
            rig.process_event("stop", "SIGSTOP");
            Ok(format!("SIGSTOP pid {}", rig.node().pid().unwrap_or(0)))
        }
        FaultKind::Partition => {
            let ifname = node_host.ifname.clone().context("partition needs netns")?;
            node_host
                .exec("ip", &["link", "set", &ifname, "down"])
                .await?;
            Ok(format!("{} link {ifname} down", node_host.name))
        }
        FaultKind::OneWayPartition { inbound } => {
            let chain = if *inbound { "INPUT" } else { "OUTPUT" };
            iptables(&node_host, "-I", chain, &drop_rule(None, 0)).await?;
            Ok(format!("iptables {chain} DROP in {}", node_host.name))
        }
        FaultKind::PartialPartition { host } => {
            let peer = rig.net.host(host).ip.to_string();
            iptables(&node_host, "-I", "INPUT", &source_rule(&peer)).await?;
            iptables(&node_host, "-I", "OUTPUT", &dest_rule(&peer)).await?;
            Ok(format!(
                "iptables DROP {peer} both ways in {}",
                node_host.name
            ))
        }
        FaultKind::Loss { percent } => {
            for chain in ["INPUT", "OUTPUT"] {
                iptables(&node_host, "-I", chain, &drop_rule(None, *percent)).await?;
            }
            Ok(format!(
                "iptables statistic {percent}% in {}",
                node_host.name
            ))
        }
        FaultKind::Bandwidth { kbit } => {
            for host in rig.shaped_hosts() {
                let ifname = host.ifname.clone().context("bandwidth needs netns")?;
                let rate = format!("{kbit}kbit");
                host.exec(
                    "tc",
                    &[
                        "qdisc", "add", "dev", &ifname, "root", "tbf", "rate", &rate, "burst",
                        "16kb", "latency", "400ms",
                    ],
                )
                .await?;
            }
            Ok(format!("tc tbf {kbit}kbit on the node and clients"))
        }
        FaultKind::Delay {
            delay_ms,
            jitter_ms,
        } => {
            rig.relay_set(Impairment {
                delay_ms: *delay_ms,
                jitter_ms: *jitter_ms,
                ..Impairment::default()
            })?;
            Ok("relay delay".into())
        }
        FaultKind::RelayReset => {
            rig.relay_reset()?;
            Ok("relay RST to every TCP connection".into())
        }
        FaultKind::UdpChaos {
            loss_percent,
            duplicate_percent,
            reorder_percent,
            jitter_ms,
        } => {
            rig.relay_set(datagram_chaos(
                2,
                *jitter_ms,
                *loss_percent,
                *duplicate_percent,
                *reorder_percent,
            ))?;
            Ok("relay udp chaos".into())
        }
        FaultKind::DiskFull { .. } => {
            let data_dir = rig.node().spec.data_dir.clone();
            let filled = tokio::task::spawn_blocking(move || fill_disk(&data_dir))
                .await
                .context("filler task")??;
            Ok(format!("filled the tmpfs data dir with {filled} bytes"))
        }
        FaultKind::FsyncFail { .. } => {
            for name in FSYNC_FAILPOINTS {
                rig.node()
                    .fiu(&format!("enable name={name},failnum=1,failinfo=5"))
                    .await?;
            }
            Ok(format!(
                "libfiu {} fail with EIO",
                FSYNC_FAILPOINTS.join(", ")
            ))
        }
        FaultKind::ClockSkew { offset_s } => {
            // The node reads the wall clock once at start (and RocksDB's dedup compaction
            // filter at every compaction): move it live, then restart the node so it starts
            // on the skewed clock.
            rig.set_clock(*offset_s)?;
            rig.restart_node().await?;
            Ok(format!(
                "node wall clock {offset_s:+} s, node restarted (SIGTERM)"
            ))
        }
        FaultKind::PeerPartition { inbound, outbound } => {
            for (chain, rule) in peer_rules(*inbound, *outbound) {
                iptables(&node_host, "-I", chain, &rule).await?;
            }
            Ok(format!(
                "iptables DROP udp port {} ({}) in {}",
                crate::node::PORT_PEER,
                fault.kind.describe(),
                node_host.name
            ))
        }
        FaultKind::PeerChaos {
            delay_ms,
            jitter_ms,
            loss_percent,
            duplicate_percent,
            reorder_percent,
        } => {
            rig.peer_relay_set(datagram_chaos(
                *delay_ms,
                *jitter_ms,
                *loss_percent,
                *duplicate_percent,
                *reorder_percent,
            ))?;
            Ok("peer relay chaos".into())
        }
        FaultKind::Abuse { attack } => rig.start_attacker(*attack).await,
        FaultKind::LeaderKill
        | FaultKind::NodeJoin { .. }
        | FaultKind::NodeDrain { .. }
        | FaultKind::NodeLoss { .. }
        | FaultKind::CoordPartition { .. }
        | FaultKind::PrimaryPartition { .. }
        | FaultKind::ZoneLoss { .. }
        | FaultKind::NodeRestart { .. }
        | FaultKind::ReplicaLag { .. } => membership::apply(rig, &fault.kind).await,
    }
}

/// What a relay does to datagrams in `udp-chaos` and `peer-chaos`: a delay plus jitter, and
/// shares (in percent) lost, duplicated and held back 40 ms (reordered).
fn datagram_chaos(
    delay_ms: u32,
    jitter_ms: u32,
    loss: u32,
    duplicate: u32,
    reorder: u32,
) -> Impairment {
    let share = |percent: u32| f64::from(percent) / 100.0;
    Impairment {
        delay_ms,
        jitter_ms,
        loss: share(loss),
        duplicate: share(duplicate),
        reorder: share(reorder),
        reorder_ms: 40,
        ..Impairment::default()
    }
}

/// The iptables rules (chain, match) of a peer partition. The node's peer endpoint sends and
/// receives every peer datagram on its one port, so matching that port cuts the peer link and
/// nothing else.
fn peer_rules(inbound: bool, outbound: bool) -> Vec<(&'static str, Vec<String>)> {
    let port = crate::node::PORT_PEER.to_string();
    let mut rules = Vec::new();
    if inbound {
        rules.push((
            "INPUT",
            ["-p", "udp", "--dport", &port].map(String::from).to_vec(),
        ));
    }
    if outbound {
        rules.push((
            "OUTPUT",
            ["-p", "udp", "--sport", &port].map(String::from).to_vec(),
        ));
    }
    rules
}

/// Adds (`op` `-I`) or removes (`-D`) the rules of a peer partition both ways in node
/// `index`'s namespace. Returns what was done.
async fn cut_peer_link(rig: &Rig, index: usize, op: &str) -> Result<String> {
    let host = rig.nodes[index].host.clone();
    for (chain, rule) in peer_rules(true, true) {
        iptables(&host, op, chain, &rule).await?;
    }
    Ok(if op == "-D" {
        format!("peer-port DROP rules removed in {}", host.name)
    } else {
        format!(
            "iptables DROP udp port {} both ways in {}",
            crate::node::PORT_PEER,
            host.name
        )
    })
}

/// libfiu failure points that make syncing fail (RocksDB syncs its WAL with fdatasync and its
/// manifest and directories with fsync).
pub const FSYNC_FAILPOINTS: &[&str] = &["posix/io/sync/fsync", "posix/io/sync/fdatasync"];

/// Heals a fault. Returns what was done. A fault on a cluster node is healed once the node is
/// an active member again (the detail says whether the cluster had marked it down meanwhile).
pub async fn heal(rig: &mut Rig, fault: &PlannedFault) -> Result<String> {
    rig.aim(fault.node)?;
    let mut detail = heal_kind(rig, fault).await?;
    if let (Some(cluster), Some(node), Some(before)) = (&rig.cluster, fault.node, rig.fault_epoch) {
        let (view, took) = cluster
            .wait_member(node, |s| s == Some("active"), BACK_IN_SERVICE_TIMEOUT)
            .await?;
        let reacted = if view.epoch == before {
            "the cluster did not react".to_string()
        } else {
            format!(
                "epoch {before} -> {} (the cluster marked it down and back)",
                view.epoch
            )
        };
        detail.push_str(&format!(
            "; node {node} active {} ms after the heal, {reacted}",
            took.as_millis()
        ));
    }
    Ok(detail)
}

async fn heal_kind(rig: &mut Rig, fault: &PlannedFault) -> Result<String> {
    let node_host = rig.node().host.clone();
    match &fault.kind {
        FaultKind::KillRestart | FaultKind::RestartLoop { .. } => {
            if !rig.node_mut().is_running() {
                rig.start_node().await?;
            }
            Ok(format!(
                "node running, pid {}",
                rig.node().pid().unwrap_or(0)
            ))
        }
        FaultKind::Pause => {
            rig.node().resume();
            rig.process_event("cont", "SIGCONT");
            Ok("SIGCONT".into())
        }
        FaultKind::Partition => {
            let ifname = node_host.ifname.clone().context("partition needs netns")?;
            node_host
                .exec("ip", &["link", "set", &ifname, "up"])
                .await?;
            Ok("link up".into())
        }
        FaultKind::OneWayPartition { inbound } => {
            let chain = if *inbound { "INPUT" } else { "OUTPUT" };
            iptables(&node_host, "-D", chain, &drop_rule(None, 0)).await?;
            Ok("rule removed".into())
        }
        FaultKind::PartialPartition { host } => {
            let peer = rig.net.host(host).ip.to_string();
            iptables(&node_host, "-D", "INPUT", &source_rule(&peer)).await?;
            iptables(&node_host, "-D", "OUTPUT", &dest_rule(&peer)).await?;
            Ok("rules removed".into())
        }
        FaultKind::Loss { percent } => {
            for chain in ["INPUT", "OUTPUT"] {
                iptables(&node_host, "-D", chain, &drop_rule(None, *percent)).await?;
            }
            Ok("rules removed".into())
        }
        FaultKind::Bandwidth { .. } => {
            for host in rig.shaped_hosts() {
                let ifname = host.ifname.clone().context("bandwidth needs netns")?;
                host.exec("tc", &["qdisc", "del", "dev", &ifname, "root"])
                    .await?;
            }
            Ok("qdiscs removed".into())
        }
        FaultKind::Delay { .. } | FaultKind::UdpChaos { .. } => {
            rig.relay_set(Impairment::default())?;
            Ok("relay clean".into())
        }
        FaultKind::RelayReset => Ok(String::new()),
        FaultKind::DiskFull { restart } => {
            let filler = rig.node().spec.data_dir.join(FILLER_NAME);
            std::fs::remove_file(&filler)
                .with_context(|| format!("removing {}", filler.display()))?;
            restart_after_storage(rig, *restart, "filler removed").await
        }
        FaultKind::FsyncFail { restart } => {
            for name in FSYNC_FAILPOINTS {
                rig.node().fiu(&format!("disable name={name}")).await?;
            }
            restart_after_storage(rig, *restart, "libfiu disabled").await
        }
        FaultKind::ClockSkew { .. } => {
            rig.set_clock(0)?;
            rig.restart_node().await?;
            Ok("node wall clock real again, node restarted".into())
        }
        FaultKind::PeerPartition { inbound, outbound } => {
            for (chain, rule) in peer_rules(*inbound, *outbound) {
                iptables(&node_host, "-D", chain, &rule).await?;
            }
            Ok("rules removed".into())
        }
        FaultKind::PeerChaos { .. } => {
            rig.peer_relay_set(Impairment::default())?;
            Ok("peer relay clean".into())
        }
        FaultKind::Abuse { .. } => rig.stop_attacker().await,
        FaultKind::LeaderKill
        | FaultKind::NodeJoin { .. }
        | FaultKind::NodeDrain { .. }
        | FaultKind::NodeLoss { .. }
        | FaultKind::CoordPartition { .. }
        | FaultKind::PrimaryPartition { .. }
        | FaultKind::ZoneLoss { .. }
        | FaultKind::NodeRestart { .. }
        | FaultKind::ReplicaLag { .. } => membership::heal(rig, &fault.kind).await,
    }
}

async fn restart_after_storage(rig: &mut Rig, restart: bool, done: &str) -> Result<String> {
    if !restart {
        return Ok(done.to_string());
    }
    let pid = rig.node().pid().unwrap_or(0);
    rig.kill_node().await;
    rig.start_node().await?;
    Ok(format!("{done}; SIGKILL pid {pid}, restarted"))
}

fn drop_rule(_peer: Option<&str>, percent: u32) -> Vec<String> {
    let mut rule = Vec::new();
    if percent > 0 {
        rule.extend(
            [
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &format!("{:.2}", f64::from(percent) / 100.0),
            ]
            .map(String::from),
        );
    }
    // Never the loopback: only traffic on the run's link.
    rule.extend(["!", "-i", "lo"].map(String::from));
    rule
}

fn source_rule(peer: &str) -> Vec<String> {
    ["-s", peer].map(String::from).to_vec()
}

fn dest_rule(peer: &str) -> Vec<String> {
    ["-d", peer].map(String::from).to_vec()
}

async fn iptables(host: &crate::hosts::Host, op: &str, chain: &str, rule: &[String]) -> Result<()> {
    let mut rule = rule.to_vec();
    if chain == "OUTPUT" {
        // `-i` is not valid on OUTPUT: match the outgoing side instead.
        for part in rule.iter_mut() {
            if part == "-i" {
                *part = "-o".into();
            }
        }
    }
    let mut args: Vec<&str> = vec!["-w", "5", op, chain];
    args.extend(rule.iter().map(String::as_str));
    args.extend(["-m", "comment", "--comment", IPTABLES_COMMENT, "-j", "DROP"]);
    host.exec("iptables", &args).await?;
    Ok(())
}

/// Name of the file that fills the node's tmpfs.
pub const FILLER_NAME: &str = "chaos-filler";

/// Writes zeros into `dir/FILLER_NAME` until the filesystem is full. Returns the bytes written.
fn fill_disk(dir: &Path) -> Result<u64> {
    use std::io::Write;
    let path = dir.join(FILLER_NAME);
    let mut file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 512] {
        let zeros = vec![0u8; chunk];
        while written < FILLER_BYTES_MAX {
            match file.write(&zeros) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => return Err(e).context("filling the disk"),
            }
        }
    }
    let _ = file.sync_all();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn menu() -> Menu {
        vec![
            (|_| FaultKind::Pause, (500, 2_000)),
            (
                |rng| FaultKind::Loss {
                    percent: rng.gen_range(5..30),
                },
                (1_000, 3_000),
            ),
        ]
    }

    #[test]
    fn plans_are_fixed_by_the_seed_sequential_and_healed_before_the_end() {
        let window = Duration::from_secs(40);
        let a = plan(9, window, &menu());
        assert_eq!(a, plan(9, window, &menu()));
        assert_ne!(a, plan(10, window, &menu()));
        assert!(!a.is_empty());
        for pair in a.windows(2) {
            assert!(
                pair[0].at + pair[0].duration < pair[1].at,
                "one fault at a time"
            );
        }
        let last = a.last().unwrap();
        assert!(last.at + last.duration + Duration::from_secs(3) <= window);
        assert!(plan(9, Duration::from_secs(1), &menu()).is_empty());
    }
}
