//! Scenarios and the run.
//!
//! A run: create the hosts (`node1`, `client1`, `client2`, and `relay` when the scenario puts a
//! relay between the clients and the node), start the node, register the population, start one
//! workload process per client host, apply the seeded fault schedule during the sending window,
//! let the system settle (until every acked message has arrived, or [`SETTLE_MAX`]), stop
//! everything, merge the histories and check them.
//!
//! A cluster scenario ([`Needs::cluster`]) runs a real cluster instead of the dev node: three
//! coordinator replicas (`coord1`..`coord3`), three nodes (`node1`..`node3`, and `node4` when the
//! scenario adds one; four in two zones from the start for [`Needs::zones`]), each on its own
//! host, and an `ops` host for `ringpost-coordinator ctl`.
//! The population is registered through `node1` and spread over the nodes by the ring; the
//! devices of `client1` enter through `node1` and those of `client2` through `node2`, nodes that
//! stay (the SDK reconnects alternately to its last node and its entry point, so the entry
//! point must outlive the faults), and are redirected to their user's owner.
//!
//! Everything a run starts is torn down when it ends, however it ends: the [`Rig`] removes its
//! processes, mounts, namespaces and links when dropped, and `ringpost-chaos cleanup` removes
//! what a killed run left.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tokio::process::Child;

use crate::attack::{Attack, AttackSpec, AttackSummary};
use crate::check;
use crate::cluster::{self, Cluster};
use crate::coordinator::{CoordinatorProcess, CoordinatorSpec};
use crate::faults::{self, FaultKind, Menu, PlannedFault};
use crate::history::{self, Clock, Event, HistoryWriter, MemberAction, Phase};
use crate::hosts::{Host, Mode, Network};
use crate::node::{self, NodeProcess, NodeRole, NodeSpec};
use crate::probe::ProbeSummary;
use crate::relay::{self, Impairment};
use crate::report::{AbuseReport, RunReport, Verdict};
use crate::sys::{self, ProcId};
use crate::workload::{UserPlan, WorkloadSpec};

/// Longest wait, after the sending window, for every acked message to arrive.
pub const SETTLE_MAX: Duration = Duration::from_secs(120);

/// A run is settled once nothing new happened for this long (and nothing is missing).
pub const SETTLE_QUIET: Duration = Duration::from_secs(2);

/// How often the settle loop reads the histories.
const SETTLE_POLL: Duration = Duration::from_secs(1);

/// Time registration of the population may take.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(120);

/// Time the workload processes get to connect before sending starts.
const WORKLOAD_WARMUP: Duration = Duration::from_secs(2);

/// Time a workload process gets to exit after the stop file appears.
const WORKLOAD_EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Users in the population (each with one or two devices, by seed).
pub const USERS: u64 = 6;

/// Users in a cluster run's population: more, so the ring gives every node some (with 12,
/// node 3, the one `join-drain` and `node-loss` take away, owns several; the run's notes list
/// who lived where).
pub const USERS_CLUSTER: u64 = 12;

/// First phone number of the population.
pub const FIRST_USER: u64 = 15_550_001;

/// Messages per second per device.
pub const RATE_PER_DEVICE: f64 = 4.0;

/// Share of received messages answered with a read receipt.
pub const RECEIPT_FRACTION: f64 = 0.3;

/// Size of the tmpfs data dir of `disk-full` runs.
pub const TMPFS_SIZE: &str = "64m";

/// An abuse scenario's honest SendAck p99 may be at most this many times the baseline's.
pub const ABUSE_P99_FACTOR: f64 = 2.0;

/// A baseline p99 under this counts as this (milliseconds): below it, scheduling noise on a
/// shared machine, not the node, decides the comparison.
pub const ABUSE_P99_FLOOR_MS: f64 = 10.0;

/// The node's resident memory may not exceed this during an abuse run (MiB): a dev node under
/// the workload uses about 40-60 MiB, and every attack is bounded so that a node whose bounds
/// hold stays far below (a 128 KiB buffer for each of the preauth attack's 2000 connections
/// alone would pass it).
pub const ABUSE_RSS_BOUND_MIB: u64 = 256;

/// Source addresses the attacker host uses (its own and more on the same subnet): enough for
/// the preauth attack to be over the per-source cap on each and past it in total.
pub const ATTACK_SOURCES: u8 = 6;

/// First last octet of the attacker's extra source addresses.
const ATTACK_SOURCE_FIRST_OCTET: u8 = 200;

/// Time an attacker or the probe gets to stop and write its summary.
const ATTACKER_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a scenario needs from the machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    /// Network namespaces (root): network faults, tmpfs mounts.
    pub netns: bool,
    pub iptables: bool,
    pub tc: bool,
    pub fiu: bool,
    pub faketime: bool,
    /// A relay between the clients and the node.
    pub relay: bool,
    /// A multi-node cluster (three coordinator replicas, three nodes) instead of the dev node:
    /// needs the `ringpost-coordinator` binary.
    pub cluster: bool,
    /// The clients speak QUIC (through the relay's UDP side).
    pub quic: bool,
    /// Cluster nodes run with `--replicate` (issue 19): every shard has an in-sync replica, so
    /// no loss is excused by a removed node.
    pub replicate: bool,
    /// The cluster starts with [`cluster::ZONED_NODES`] nodes in two zones
    /// ([`cluster::ZONES`], node flag `--zone`) instead of [`cluster::NODES`] without zones.
    pub zones: bool,
}

impl Needs {
    /// The nodes a cluster run starts with (the plan may add one).
    pub fn cluster_nodes(&self) -> u64 {
        if self.zones {
            cluster::ZONED_NODES
        } else {
            cluster::NODES
        }
    }
}

/// One scenario.
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub needs: Needs,
    /// Sending window when `--duration` is not given.
    pub window: Duration,
    pub schedule: Schedule,
}

/// How a scenario's faults are chosen.
#[derive(Clone, Copy)]
pub enum Schedule {
    /// Drawn one after another from a menu ([`faults::plan`]).
    Menu(fn() -> Menu),
    /// A fixed sequence (membership changes, which build on each other), its times drawn from
    /// the seed's RNG within the window.
    Script(fn(&mut ChaCha8Rng, Duration) -> Vec<PlannedFault>),
}

impl Schedule {
    /// The faults of a run.
    pub fn plan(&self, seed: u64, window: Duration) -> Vec<PlannedFault> {
        match self {
            Schedule::Menu(menu) => faults::plan(seed, window, &menu()),
            Schedule::Script(script) => script(&mut crate::seeded(seed, "faults"), window),
        }
    }
}

fn no_faults() -> Menu {
    Vec::new()
}

/// The node `join-drain` drains and `node-loss` loses: one that is nobody's entry point.
pub const VICTIM_NODE: u64 = 3;

/// The node `join-drain` adds.
pub const JOINING_NODE: u64 = 4;

fn leader_kill_menu() -> Menu {
    // Down for a few seconds each time, then restarted; the plan's gaps (1-3 s) let it catch up
    // before the next leader dies.
    vec![(|_| FaultKind::LeaderKill, (2_000, 5_000))]
}

/// A fault at `at_fraction` of the window (moved by up to ±5 % by the seed), lasting `duration`.
fn scripted(
    rng: &mut ChaCha8Rng,
    window: Duration,
    id: u32,
    at_fraction: f64,
    duration: Duration,
    kind: FaultKind,
) -> PlannedFault {
    let fraction = (at_fraction + rng.gen_range(-0.05..0.05)).clamp(0.05, 0.9);
    PlannedFault {
        id,
        at: window.mul_f64(fraction),
        duration,
        kind,
        node: None,
    }
}

/// A 4th node joins early, node 3 drains in the middle, node 3 comes back (fresh data dir) late.
fn join_drain_script(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    let s = Duration::from_secs;
    vec![
        scripted(
            rng,
            window,
            1,
            0.15,
            s(1),
            FaultKind::NodeJoin { node: JOINING_NODE },
        ),
        scripted(
            rng,
            window,
            2,
            0.4,
            s(1),
            FaultKind::NodeDrain { node: VICTIM_NODE },
        ),
        scripted(
            rng,
            window,
            3,
            0.7,
            s(1),
            FaultKind::NodeJoin { node: VICTIM_NODE },
        ),
    ]
}

/// Node 3 is cut off from its users a quarter into the window (namespaces only), killed 3 s
/// later and removed once it is marked down.
fn node_loss_script(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    vec![scripted(
        rng,
        window,
        1,
        0.25,
        Duration::from_secs(1),
        FaultKind::NodeLoss {
            node: VICTIM_NODE,
            offline_ms: 3_000,
        },
    )]
}

/// How long `coord-partition` cuts node 3 off from the coordinators: twice the down threshold
/// ([`cluster::HEARTBEAT_MISS_LIMIT`] × [`cluster::HEARTBEAT_MS`] = 2 s).
const COORD_PARTITION: Duration =
    Duration::from_millis(2 * cluster::HEARTBEAT_MISS_LIMIT as u64 * cluster::HEARTBEAT_MS);

/// Node 3 is cut off from every coordinator replica (its clients still reach it) a third into
/// the window for [`COORD_PARTITION`], then the partition heals (namespaces only).
fn coord_partition_script(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    vec![scripted(
        rng,
        window,
        1,
        0.3,
        COORD_PARTITION,
        FaultKind::CoordPartition { node: VICTIM_NODE },
    )]
}

/// Node 3 is cut off from the coordinators and its peers this long: three times the down
/// threshold, so its shards have failed over and its devices retried there for a while.
const PRIMARY_PARTITION: Duration =
    Duration::from_millis(3 * cluster::HEARTBEAT_MISS_LIMIT as u64 * cluster::HEARTBEAT_MS);

/// Node 3 is cut off from every coordinator replica and from its peers (its clients still
/// reach it) a third into the window for [`PRIMARY_PARTITION`], then the partition heals
/// (namespaces only).
fn primary_partition_script(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    vec![scripted(
        rng,
        window,
        1,
        0.3,
        PRIMARY_PARTITION,
        FaultKind::PrimaryPartition { node: VICTIM_NODE },
    )]
}

/// The zone `zone-loss` takes away: the one without the entry points.
pub const LOST_ZONE: &str = "b";

/// Zone [`LOST_ZONE`] is cut off from its users a quarter into the window (namespaces only),
/// every node of it killed 3 s later and removed once marked down.
fn zone_loss_script(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    vec![scripted(
        rng,
        window,
        1,
        0.25,
        Duration::from_secs(1),
        FaultKind::ZoneLoss {
            zone: LOST_ZONE.into(),
            offline_ms: 3_000,
        },
    )]
}

/// How long a rolling restart leaves each node stopped (it is marked down after 2 s, so its
/// shards fail over before it is back).
const RESTART_DOWN: Duration = Duration::from_secs(4);

/// Every node restarted in turn, node 1 first, at 10 %, 40 % and 70 % of the window.
fn rolling_restart_script(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    (1..=cluster::NODES)
        .map(|node| {
            let id = node as u32;
            let at = 0.1 + 0.3 * f64::from(id - 1);
            scripted(
                rng,
                window,
                id,
                at,
                RESTART_DOWN,
                FaultKind::NodeRestart { node },
            )
        })
        .collect()
}

/// Delay the peer relay adds to each datagram of the slowed replica's links, each way: a replica
/// write's round trip (two of them) is over `REPLICA_ACK_TIMEOUT_MS` (2 s).
const REPLICA_LAG_MS: u32 = 1_500;

/// Node 3's peer links are slowed a quarter into the window until a primary drops it from an
/// in-sync set, for at least 8 s, then healed.
fn replica_lag_script(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    vec![scripted(
        rng,
        window,
        1,
        0.25,
        Duration::from_secs(8),
        FaultKind::ReplicaLag {
            node: VICTIM_NODE,
            delay_ms: REPLICA_LAG_MS,
        },
    )]
}

/// The attack of an abuse scenario: one fault from about 15 % to 85 % of the window.
fn abuse_script(rng: &mut ChaCha8Rng, window: Duration, attack: Attack) -> Vec<PlannedFault> {
    let at = window.mul_f64(0.15 + rng.gen_range(0.0..0.02));
    let end = window.mul_f64(0.85);
    vec![PlannedFault {
        id: 1,
        at,
        duration: end.saturating_sub(at),
        kind: FaultKind::Abuse { attack },
        node: None,
    }]
}

fn abuse_preauth(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    abuse_script(rng, window, Attack::Preauth)
}

fn abuse_slow_reader(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    abuse_script(rng, window, Attack::SlowReader)
}

fn abuse_ack_flood(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    abuse_script(rng, window, Attack::AckFlood)
}

fn abuse_prekey_drain(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    abuse_script(rng, window, Attack::PrekeyDrain)
}

fn abuse_register_flood(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    abuse_script(rng, window, Attack::RegisterFlood)
}

fn abuse_malformed(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    abuse_script(rng, window, Attack::Malformed)
}

fn abuse_peer(rng: &mut ChaCha8Rng, window: Duration) -> Vec<PlannedFault> {
    abuse_script(rng, window, Attack::Peer)
}

fn kill_menu() -> Menu {
    vec![
        (|_| FaultKind::KillRestart, (300, 3_000)),
        (|_| FaultKind::KillRestart, (300, 3_000)),
        (
            |rng| FaultKind::RestartLoop {
                kills: rng.gen_range(3..6),
            },
            (3_000, 6_000),
        ),
    ]
}

fn pause_menu() -> Menu {
    vec![(|_| FaultKind::Pause, (500, 6_000))]
}

fn partition_menu() -> Menu {
    vec![
        (|_| FaultKind::Partition, (1_000, 6_000)),
        (
            |rng| FaultKind::OneWayPartition {
                inbound: rng.gen_bool(0.5),
            },
            (1_000, 6_000),
        ),
        (
            |rng| FaultKind::PartialPartition {
                host: if rng.gen_bool(0.5) {
                    "client1"
                } else {
                    "client2"
                }
                .into(),
            },
            (1_000, 6_000),
        ),
    ]
}

fn network_menu() -> Menu {
    vec![
        (
            |rng| FaultKind::Loss {
                percent: rng.gen_range(5..=30),
            },
            (2_000, 6_000),
        ),
        (
            |rng| FaultKind::Bandwidth {
                kbit: rng.gen_range(64..=512),
            },
            (2_000, 6_000),
        ),
    ]
}

fn relay_tcp_menu() -> Menu {
    vec![
        (
            |rng| FaultKind::Delay {
                delay_ms: rng.gen_range(20..=300),
                jitter_ms: rng.gen_range(0..=300),
            },
            (2_000, 6_000),
        ),
        (|_| FaultKind::RelayReset, (0, 0)),
    ]
}

fn relay_udp_menu() -> Menu {
    vec![(
        |rng| FaultKind::UdpChaos {
            loss_percent: rng.gen_range(0..=20),
            duplicate_percent: rng.gen_range(0..=20),
            reorder_percent: rng.gen_range(0..=30),
            jitter_ms: rng.gen_range(0..=80),
        },
        (2_000, 6_000),
    )]
}

fn disk_menu() -> Menu {
    vec![(
        |rng| FaultKind::DiskFull {
            restart: rng.gen_bool(0.5),
        },
        (1_000, 5_000),
    )]
}

fn fsync_menu() -> Menu {
    vec![(
        |rng| FaultKind::FsyncFail {
            restart: rng.gen_bool(0.5),
        },
        (1_000, 5_000),
    )]
}

fn clock_menu() -> Menu {
    vec![(
        |rng| {
            // Hours to days, both ways; never past the 30-day expiry.
            let choices = [-3 * 86_400, -7_200, -60, 60, 3_600, 86_400, 7 * 86_400];
            FaultKind::ClockSkew {
                offset_s: choices[rng.gen_range(0..choices.len())],
            }
        },
        (2_000, 6_000),
    )]
}

fn clock_jump_menu() -> Menu {
    vec![(
        |rng| FaultKind::ClockSkew {
            // Past the 30-day retention: a node booting with a clock this far ahead.
            offset_s: rng.gen_range(31..=60) * 86_400,
        },
        (2_000, 6_000),
    )]
}

fn mixed_menu() -> Menu {
    let mut menu = kill_menu();
    menu.extend(pause_menu());
    menu.extend(partition_menu());
    menu.extend(network_menu());
    menu.extend(relay_tcp_menu());
    // Storage faults end with a restart here: a node left stuck refusing would make the rest
    // of the run prove little.
    menu.push((|_| FaultKind::DiskFull { restart: true }, (1_000, 5_000)));
    menu.push((|_| FaultKind::FsyncFail { restart: true }, (1_000, 5_000)));
    menu.extend(clock_menu());
    menu
}

fn peer_partition_menu() -> Menu {
    vec![
        (
            |_| FaultKind::PeerPartition {
                inbound: true,
                outbound: true,
            },
            (1_000, 6_000),
        ),
        (
            |rng| {
                let inbound = rng.gen_bool(0.5);
                FaultKind::PeerPartition {
                    inbound,
                    outbound: !inbound,
                }
            },
            (1_000, 6_000),
        ),
    ]
}

fn cluster_partition_menu() -> Menu {
    let mut menu = partition_menu();
    menu.extend(peer_partition_menu());
    menu
}

fn peer_chaos_menu() -> Menu {
    vec![(
        |rng| FaultKind::PeerChaos {
            delay_ms: rng.gen_range(0..=150),
            jitter_ms: rng.gen_range(0..=150),
            loss_percent: rng.gen_range(0..=20),
            duplicate_percent: rng.gen_range(0..=20),
            reorder_percent: rng.gen_range(0..=30),
        },
        (2_000, 6_000),
    )]
}

fn cluster_slow_net_menu() -> Menu {
    let mut menu = relay_tcp_menu();
    menu.extend(peer_chaos_menu());
    menu
}

fn cluster_storage_menu() -> Menu {
    let mut menu = disk_menu();
    menu.extend(fsync_menu());
    menu
}

fn cluster_mixed_menu() -> Menu {
    let mut menu = mixed_menu();
    menu.extend(peer_partition_menu());
    menu.extend(peer_chaos_menu());
    menu.extend(leader_kill_menu());
    menu.push((
        |_| FaultKind::CoordPartition { node: VICTIM_NODE },
        (
            COORD_PARTITION.as_millis() as u64,
            COORD_PARTITION.as_millis() as u64,
        ),
    ));
    menu
}

/// Every scenario.
pub fn catalogue() -> Vec<Scenario> {
    let s = |secs| Duration::from_secs(secs);
    vec![
        Scenario {
            name: "smoke",
            about: "no faults: everything acked arrives once, in order, to the right devices",
            needs: Needs::default(),
            window: s(8),
            schedule: Schedule::Menu(no_faults),
        },
        Scenario {
            name: "kill-restart",
            about: "kill -9 the node and restart it on the same data dir, also in quick loops",
            needs: Needs::default(),
            window: s(30),
            schedule: Schedule::Menu(kill_menu),
        },
        Scenario {
            name: "pause",
            about: "SIGSTOP / SIGCONT the node",
            needs: Needs::default(),
            window: s(30),
            schedule: Schedule::Menu(pause_menu),
        },
        Scenario {
            name: "partition",
            about: "client <-> node partitions: link down, one-way, partial (one client host)",
            needs: Needs {
                netns: true,
                iptables: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(partition_menu),
        },
        Scenario {
            name: "loss",
            about: "random packet loss (iptables) and a bandwidth limit (tc tbf)",
            needs: Needs {
                netns: true,
                iptables: true,
                tc: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(network_menu),
        },
        Scenario {
            name: "slow-net",
            about: "WebSocket through the TCP relay: delay and jitter, connection resets",
            needs: Needs {
                relay: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(relay_tcp_menu),
        },
        Scenario {
            name: "quic-chaos",
            about: "QUIC through the UDP relay: loss, duplication, reordering, jitter",
            needs: Needs {
                relay: true,
                quic: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(relay_udp_menu),
        },
        Scenario {
            name: "disk-full",
            about: "the node's data dir (a small tmpfs) fills up, then frees",
            needs: Needs {
                netns: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(disk_menu),
        },
        Scenario {
            name: "fsync-fail",
            about: "fsync and fdatasync fail with EIO (libfiu), then work again",
            needs: Needs {
                fiu: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(fsync_menu),
        },
        Scenario {
            name: "clock-skew",
            about: "the node's wall clock jumps hours to days, both ways (libfaketime)",
            needs: Needs {
                faketime: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(clock_menu),
        },
        Scenario {
            name: "clock-jump",
            about: "the node restarts with its clock 31-60 days ahead (past the 30-day retention) \
                    and back: acked messages still queued must survive",
            needs: Needs {
                faketime: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(clock_jump_menu),
        },
        Scenario {
            name: "mixed",
            about: "all of the above that a single node supports, one after another",
            needs: Needs {
                netns: true,
                iptables: true,
                tc: true,
                fiu: true,
                faketime: true,
                relay: true,
                ..Needs::default()
            },
            window: s(60),
            schedule: Schedule::Menu(mixed_menu),
        },
        Scenario {
            name: "cluster-kill-restart",
            about: "cluster: kill -9 a node (drawn by the seed) and restart it on its data dir, \
                    also in loops; down longer than 2 s it is marked down and re-activated",
            needs: Needs {
                cluster: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(kill_menu),
        },
        Scenario {
            name: "cluster-pause",
            about: "cluster: SIGSTOP / SIGCONT a node; paused past its lease it must refuse what \
                    waited in its sockets, and is marked down and re-activated",
            needs: Needs {
                cluster: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(pause_menu),
        },
        Scenario {
            name: "cluster-partition",
            about: "cluster: a node cut from its clients (link down, one-way, partial) or from \
                    its peers (peer link cut one or both ways)",
            needs: Needs {
                netns: true,
                iptables: true,
                cluster: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(cluster_partition_menu),
        },
        Scenario {
            name: "cluster-loss",
            about: "cluster: packet loss and a bandwidth limit on a node's link (clients, peers \
                    and coordinators alike)",
            needs: Needs {
                netns: true,
                iptables: true,
                tc: true,
                cluster: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(network_menu),
        },
        Scenario {
            name: "cluster-slow-net",
            about: "cluster: clients reach every node through the TCP relay (delay, jitter, \
                    resets) and nodes reach each other through the UDP relay (delay, loss, \
                    duplication, reordering)",
            needs: Needs {
                relay: true,
                cluster: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(cluster_slow_net_menu),
        },
        Scenario {
            name: "cluster-storage",
            about: "cluster: a node's disk fills up (tmpfs) or its fsyncs fail (libfiu); it must \
                    refuse, not ack and lose, also what other nodes forward to it",
            needs: Needs {
                netns: true,
                fiu: true,
                cluster: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(cluster_storage_menu),
        },
        Scenario {
            name: "cluster-storage-replicated",
            about: "cluster-storage with every node on --replicate (factor 2): a node whose \
                    storage fails stops heartbeating, its shards fail over to their in-sync \
                    replicas, and it is caught up and given them back once its disk works; \
                    nothing acked may be lost",
            needs: Needs {
                netns: true,
                fiu: true,
                cluster: true,
                replicate: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(cluster_storage_menu),
        },
        Scenario {
            name: "cluster-clock-skew",
            about: "cluster: a node restarts with its wall clock hours to days off (libfaketime), \
                    then on the real one, while the others keep the real time",
            needs: Needs {
                faketime: true,
                cluster: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(clock_menu),
        },
        Scenario {
            name: "cluster-mixed",
            about: "cluster: every node fault above on a node drawn by the seed, peer-link cuts \
                    and chaos, coordinator leader kills, one after another",
            needs: Needs {
                netns: true,
                iptables: true,
                tc: true,
                fiu: true,
                faketime: true,
                relay: true,
                cluster: true,
                ..Needs::default()
            },
            window: s(60),
            schedule: Schedule::Menu(cluster_mixed_menu),
        },
        Scenario {
            name: "leader-kill",
            about: "kill -9 the coordinator leader again and again (restarted after 2-5 s); the \
                    nodes keep serving",
            needs: Needs {
                cluster: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Menu(leader_kill_menu),
        },
        Scenario {
            name: "join-drain",
            about: "node 4 joins, node 3 drains away (exits 0), node 3 comes back with a fresh \
                    data dir, all under load",
            needs: Needs {
                cluster: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Script(join_drain_script),
        },
        Scenario {
            name: "node-loss",
            about: "kill -9 node 3 for good, ctl remove it once it is down: with replication \
                    (the default) its shards fail over and nothing is lost; with \
                    RINGPOST_REPLICATE=false only what lived there alone may be lost, and the \
                    report counts it apart",
            needs: Needs {
                cluster: true,
                ..Needs::default()
            },
            window: s(20),
            schedule: Schedule::Script(node_loss_script),
        },
        Scenario {
            name: "node-loss-replicated",
            about: "node-loss with every node running --replicate (factor 2): node 3 is killed \
                    for good and removed; its shards fail over to their in-sync replicas, and \
                    nothing acked may be lost",
            needs: Needs {
                cluster: true,
                replicate: true,
                ..Needs::default()
            },
            window: s(20),
            schedule: Schedule::Script(node_loss_script),
        },
        Scenario {
            name: "coord-partition",
            about: "node 3 cut off from all three coordinator replicas for 4 s (iptables, both \
                    ways; clients still reach it): its lease runs out and it refuses writes \
                    (WrongOwner, retried) before it is marked down; healed, it heartbeats, is \
                    re-activated and serves again; nothing acked is lost",
            needs: Needs {
                netns: true,
                iptables: true,
                cluster: true,
                ..Needs::default()
            },
            window: s(20),
            schedule: Schedule::Script(coord_partition_script),
        },
        Scenario {
            name: "primary-partition",
            about: "replicated (--replicate, factor 2): node 3 cut off from the coordinators \
                    and from its peers for 6 s (iptables, both ways; clients still reach it): \
                    it must stop acking, its shards fail over to their in-sync replicas, and \
                    nothing it acked is lost; healed, it is re-activated",
            needs: Needs {
                netns: true,
                iptables: true,
                cluster: true,
                replicate: true,
                ..Needs::default()
            },
            window: s(20),
            schedule: Schedule::Script(primary_partition_script),
        },
        Scenario {
            name: "zone-loss",
            about: "replicated (--replicate, factor 2), four nodes in two zones (every shard \
                    has a copy in each): both nodes of zone b killed -9 at once for good and \
                    removed; nothing acked may be lost",
            needs: Needs {
                cluster: true,
                replicate: true,
                zones: true,
                ..Needs::default()
            },
            window: s(20),
            schedule: Schedule::Script(zone_loss_script),
        },
        Scenario {
            name: "replica-lag",
            about: "replicated (--replicate): node 3's peer links slowed 1.5 s each way (peer \
                    relay) until a primary drops it from an in-sync set, then healed: it must \
                    rejoin its sets (catch-up); nothing acked may be lost",
            needs: Needs {
                cluster: true,
                replicate: true,
                ..Needs::default()
            },
            window: s(30),
            schedule: Schedule::Script(replica_lag_script),
        },
        Scenario {
            name: "rolling-restart",
            about: "replicated (--replicate): every node in turn stopped (SIGTERM) until marked \
                    down, then restarted on its data dir; each must rejoin its in-sync sets \
                    (catch-up) before the next; nothing acked may be lost",
            needs: Needs {
                cluster: true,
                replicate: true,
                ..Needs::default()
            },
            window: s(40),
            schedule: Schedule::Script(rolling_restart_script),
        },
        Scenario {
            name: "abuse-preauth",
            about: "thousands of TCP and WebSocket connections that never say Hello, from six \
                    source addresses (past the per-source cap), reopened as the node closes them",
            needs: Needs::default(),
            window: s(20),
            schedule: Schedule::Script(abuse_preauth),
        },
        Scenario {
            name: "abuse-slow-reader",
            about: "devices that are sent 60 KiB messages and never read their socket",
            needs: Needs::default(),
            window: s(20),
            schedule: Schedule::Script(abuse_slow_reader),
        },
        Scenario {
            name: "abuse-ack-flood",
            about: "devices sending DeliverAcks of 256 random seqs as fast as the node takes them \
                    (bounded at 3000 frames/s)",
            needs: Needs::default(),
            window: s(20),
            schedule: Schedule::Script(abuse_ack_flood),
        },
        Scenario {
            name: "abuse-prekey-drain",
            about: "three users claim one user's prekeys in a loop; no more may be handed out \
                    than the claim budget allows",
            needs: Needs::default(),
            window: s(20),
            schedule: Schedule::Script(abuse_prekey_drain),
        },
        Scenario {
            name: "abuse-register-flood",
            about: "RegisterRequest floods for honest and random numbers, each followed by \
                    RegisterVerify with wrong codes; no wrong code may register",
            needs: Needs::default(),
            window: s(20),
            schedule: Schedule::Script(abuse_register_flood),
        },
        Scenario {
            name: "abuse-malformed",
            about: "random and mutated frames, text messages, oversized frames and broken \
                    framing over ws and QUIC, before and after Hello",
            needs: Needs::default(),
            window: s(20),
            schedule: Schedule::Script(abuse_malformed),
        },
        Scenario {
            name: "abuse-peer",
            about: "cluster: junk datagrams (random, and QUIC-Initial-looking) at node 1's peer \
                    port while the cluster serves",
            needs: Needs {
                cluster: true,
                ..Needs::default()
            },
            window: s(20),
            schedule: Schedule::Script(abuse_peer),
        },
    ]
}

pub fn find(name: &str) -> Option<Scenario> {
    catalogue().into_iter().find(|s| s.name == name)
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub seed: u64,
    pub duration: Option<Duration>,
    /// Where logs, histories and the node's data go (default under [`crate::hosts::base_dir`]`/runs`).
    pub run_dir: Option<PathBuf>,
    pub node_bin: PathBuf,
    /// The `ringpost-coordinator` binary, for cluster scenarios (`Err`: why there is none).
    pub coordinator_bin: Result<PathBuf, String>,
    /// This executable (the workload and relay run as its subcommands).
    pub self_bin: PathBuf,
    pub force_loopback: bool,
    pub settle_max: Duration,
    /// Groups in the workload (`--groups`; 0: the 1:1 workload alone).
    pub groups: u32,
    /// Membership changes per group during the run (`--group-changes`).
    pub group_changes: u32,
}

/// The parts of a run that faults act on.
pub struct Rig {
    pub net: Network,
    /// The nodes: `node1` first (the node the single-node faults act on), then, in a cluster,
    /// the other members, by node id.
    pub nodes: Vec<NodeProcess>,
    /// The index in [`Rig::nodes`] of the node the current fault acts on ([`Rig::aim`]).
    target: usize,
    /// The cluster's epoch when the current fault on a cluster node was applied.
    pub fault_epoch: Option<u64>,
    /// The coordinator replicas and how to reach them (cluster scenarios).
    pub cluster: Option<Cluster>,
    pub history: Arc<HistoryWriter>,
    /// For random choices inside faults (seeded).
    pub rng: ChaCha8Rng,
    pub run_dir: PathBuf,
    relay_control: Option<PathBuf>,
    relay_reset: u64,
    /// The control file of the peer relay, through which the nodes of a cluster reach each
    /// other when the plan impairs their links.
    peer_relay_control: Option<PathBuf>,
    /// The relay processes (clients' and peers').
    relays: Vec<(Child, ProcId)>,
    workloads: Vec<(String, Child, ProcId)>,
    /// Our tmpfs data dirs.
    tmpfs: Vec<PathBuf>,
    /// Attackers started so far (each gets its own files).
    attacks_started: u32,
    /// What the setup observed, for the report (users per node in a cluster).
    notes: Vec<String>,
    /// The attacker of an abuse fault while it runs: its process and files.
    attacker: Option<Spawned>,
    /// What the last attacker reported.
    attack_summary: Option<AttackSummary>,
    /// The probe of an abuse scenario's runs (the node's RSS and /readyz).
    probe: Option<Spawned>,
    probe_summary: Option<ProbeSummary>,
    /// The population's numbers (an attack may target them).
    victims: Vec<u64>,
    opts: Option<RunOptions>,
    /// What faults found wrong that the history cannot show (a node that never rejoined its
    /// in-sync sets): each fails the run, which still goes on to be checked.
    pub findings: Vec<String>,
    /// A node's in-sync sets before a fault that takes it out of them, to compare at the heal.
    pub rejoin_before: std::collections::HashMap<u64, cluster::InSync>,
}

/// A helper process of the run (attacker, probe): its process, stop file and summary file.
struct Spawned {
    child: Child,
    id: ProcId,
    stop_file: PathBuf,
    summary: PathBuf,
}

impl Spawned {
    /// Tells it to stop, waits (killing it after [`ATTACKER_EXIT_TIMEOUT`]); whether it exited
    /// on its own.
    async fn stop(mut self, net: &Network) -> bool {
        let _ = std::fs::write(&self.stop_file, b"");
        let exited = tokio::time::timeout(ATTACKER_EXIT_TIMEOUT, self.child.wait())
            .await
            .is_ok();
        if !exited {
            self.id.signal_group(nix::sys::signal::Signal::SIGKILL);
            let _ = self.child.wait().await;
        }
        net.untrack_process(self.id);
        exited
    }
}

impl Rig {
    /// The node the current fault acts on: `node1` unless [`Rig::aim`] named another.
    pub fn node(&self) -> &NodeProcess {
        &self.nodes[self.target]
    }

    pub fn node_mut(&mut self) -> &mut NodeProcess {
        &mut self.nodes[self.target]
    }

    /// Makes node `node_id` (`None`: node 1) the one [`Rig::node`] and the node faults act on.
    pub fn aim(&mut self, node_id: Option<u64>) -> Result<()> {
        self.target = self.node_index(node_id.unwrap_or(1))?;
        Ok(())
    }

    /// The index in [`Rig::nodes`] of the node with this cluster node id.
    pub fn node_index(&self, node_id: u64) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.node_id() == node_id)
            .with_context(|| format!("this run has no node {node_id}"))
    }

    pub fn process_event(&self, action: &str, detail: &str) {
        self.history.record(Event::Process {
            node: self.node().spec.name.clone(),
            action: action.into(),
            pid: self.node().pid().unwrap_or(0),
            detail: detail.into(),
        });
    }

    /// Records a membership step of node `node_id`.
    pub fn member_event(&self, node_id: u64, action: MemberAction, detail: &str) {
        self.history.record(Event::Member {
            node_id,
            action,
            detail: detail.into(),
        });
    }

    pub async fn kill_node(&mut self) {
        self.process_event("kill", "SIGKILL");
        let target = self.target;
        self.nodes[target].kill9(&self.net).await;
    }

    /// Starts the node the current fault acts on (a cluster member: and records it as ready).
    pub async fn start_node(&mut self) -> Result<()> {
        if self.cluster.is_some() {
            self.start_member(self.target).await?;
            return Ok(());
        }
        let target = self.target;
        let pid = self.nodes[target].start(&self.net).await?;
        self.history.record(Event::Process {
            node: self.node().spec.name.clone(),
            action: "ready".into(),
            pid,
            detail: format!("start #{}", self.node().starts),
        });
        Ok(())
    }

    /// Starts cluster member `index` (of [`Rig::nodes`]) and records it; its pid.
    pub async fn start_member(&mut self, index: usize) -> Result<u32> {
        let node = &mut self.nodes[index];
        let pid = node.start(&self.net).await?;
        self.history.record(Event::Process {
            node: node.spec.name.clone(),
            action: "ready".into(),
            pid,
            detail: format!("start #{}", node.starts),
        });
        let detail = format!("{} pid {pid}", node.spec.data_dir.display());
        self.member_event(self.nodes[index].node_id(), MemberAction::Ready, &detail);
        Ok(pid)
    }

    /// Restarts the node gracefully (SIGTERM, then start on the same data dir).
    pub async fn restart_node(&mut self) -> Result<()> {
        self.process_event("term", "SIGTERM");
        let target = self.target;
        self.nodes[target].terminate(&self.net).await;
        self.start_node().await
    }

    /// The hosts whose links a bandwidth limit shapes: the node's, and the clients'.
    pub fn shaped_hosts(&self) -> Vec<Host> {
        let node = &self.node().spec.name;
        self.net
            .hosts
            .iter()
            .filter(|h| &h.name == node || h.name.starts_with("client"))
            .cloned()
            .collect()
    }

    pub fn relay_set(&mut self, mut impairment: Impairment) -> Result<()> {
        let path = self
            .relay_control
            .clone()
            .context("this run has no relay")?;
        impairment.reset = self.relay_reset;
        relay::write_control(&path, &impairment)
    }

    pub fn relay_reset(&mut self) -> Result<()> {
        self.relay_reset += 1;
        self.relay_set(Impairment::default())
    }

    /// What the peer relay does to node-to-node datagrams from now on.
    pub fn peer_relay_set(&mut self, impairment: Impairment) -> Result<()> {
        let path = self
            .peer_relay_control
            .clone()
            .context("this run has no peer relay")?;
        relay::write_control(&path, &impairment)
    }

    /// Moves the node's wall clock `offset_s` seconds from the real time (libfaketime re-reads
    /// its file every second).
    pub fn set_clock(&mut self, offset_s: i64) -> Result<()> {
        let path = self
            .node()
            .faketime_file
            .clone()
            .context("this node does not run under libfaketime")?;
        std::fs::write(&path, format!("{offset_s:+}\n"))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Starts an attacker on the `attacker` host against the node the fault acts on.
    pub async fn start_attacker(&mut self, attack: Attack) -> Result<String> {
        let opts = self.opts.clone().context("the run's options are not set")?;
        let host = self.net.host("attacker").clone();
        let mut sources = vec![host.ip];
        let [a, b, c, _] = host.ip.octets();
        for k in 1..ATTACK_SOURCES {
            let ip = std::net::Ipv4Addr::new(a, b, c, ATTACK_SOURCE_FIRST_OCTET + k);
            // In loopback mode every 127.x address is already local.
            if let Some(ifname) = &host.ifname {
                let cidr = format!("{ip}/24");
                host.exec("ip", &["addr", "add", &cidr, "dev", ifname])
                    .await?;
            }
            sources.push(ip);
        }
        let node = self.node();
        let dev = matches!(node.spec.role, node::NodeRole::Dev);
        let n = self.attacks_started;
        let spec = AttackSpec {
            attack,
            seed: opts.seed ^ u64::from(n),
            ws_url: node.ws_url(),
            quic_url: dev.then(|| node.quic_url()),
            peer_addr: (!dev).then(|| std::net::SocketAddr::from((node.host.ip, node::PORT_PEER))),
            ca_file: dev.then(|| node.ca_file()),
            codes_file: node.codes_file(),
            sources: sources.clone(),
            victims: self.victims.clone(),
            stop_file: self.run_dir.join(format!("attack-{n}-stop")),
            summary: self.run_dir.join(format!("attack-{n}-summary.json")),
        };
        self.attacks_started += 1;
        let spec_path = self.run_dir.join(format!("attack-{n}.json"));
        std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;
        let argv = vec![
            opts.self_bin.display().to_string(),
            "attack".into(),
            "--spec".into(),
            spec_path.display().to_string(),
        ];
        let log = self.run_dir.join(format!("attacker-{n}.log"));
        let (child, id) = spawn_on(&self.net, &host, "attacker", &argv, &log)?;
        self.attacker = Some(Spawned {
            child,
            id,
            stop_file: spec.stop_file,
            summary: spec.summary,
        });
        Ok(format!(
            "attacker on {} ({} source addresses)",
            host.name,
            sources.len()
        ))
    }

    /// Stops the attacker and reads what it saw.
    pub async fn stop_attacker(&mut self) -> Result<String> {
        let spawned = self.attacker.take().context("no attacker is running")?;
        let summary_path = spawned.summary.clone();
        let exited = spawned.stop(&self.net).await;
        let summary = AttackSummary::read(&summary_path).with_context(|| {
            format!(
                "the attacker left no summary (exited on its own: {exited}); see its log in {}",
                self.run_dir.display()
            )
        })?;
        let detail = format!("attacker stopped; it saw: {}", summary.describe());
        self.attack_summary = Some(summary);
        Ok(detail)
    }

    /// Starts the probe (node RSS and /readyz) on `client1`.
    async fn start_probe(&mut self) -> Result<()> {
        let opts = self.opts.clone().context("the run's options are not set")?;
        let node = &self.nodes[0];
        let pid = node.pid().context("the node is not running")?;
        let admin = format!("{}:{}", node.host.ip, node::PORT_ADMIN);
        let stop_file = self.run_dir.join("probe-stop");
        let summary = self.run_dir.join("probe-summary.json");
        let argv = vec![
            opts.self_bin.display().to_string(),
            "probe".into(),
            "--pid".into(),
            pid.to_string(),
            "--admin".into(),
            admin,
            "--stop-file".into(),
            stop_file.display().to_string(),
            "--out".into(),
            summary.display().to_string(),
        ];
        let host = self.net.host("client1").clone();
        let log = self.run_dir.join("probe.log");
        let (child, id) = spawn_on(&self.net, &host, "probe", &argv, &log)?;
        self.probe = Some(Spawned {
            child,
            id,
            stop_file,
            summary,
        });
        Ok(())
    }

    async fn stop_probe(&mut self) -> Result<()> {
        if let Some(spawned) = self.probe.take() {
            let path = spawned.summary.clone();
            spawned.stop(&self.net).await;
            self.probe_summary = Some(ProbeSummary::read(&path)?);
        }
        Ok(())
    }

    /// Stops everything gracefully (workloads, relay, node), then removes the hosts.
    async fn shutdown(&mut self) {
        if let Some(spawned) = self.attacker.take() {
            spawned.stop(&self.net).await;
        }
        if let Some(spawned) = self.probe.take() {
            spawned.stop(&self.net).await;
        }
        for (_, child, id) in &mut self.workloads {
            if tokio::time::timeout(WORKLOAD_EXIT_TIMEOUT, child.wait())
                .await
                .is_err()
            {
                id.signal_group(nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait().await;
            }
        }
        for (mut child, id) in std::mem::take(&mut self.relays) {
            id.signal_group(nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait().await;
        }
        // Nodes first (their clients are gone), then the coordinators.
        for node in &mut self.nodes {
            if node.is_running() {
                node.terminate(&self.net).await;
            }
        }
        if let Some(cluster) = &mut self.cluster {
            cluster.stop(&self.net).await;
        }
        for mount in std::mem::take(&mut self.tmpfs) {
            crate::hosts::unmount(&mount).await;
            self.net.untrack_mount(&mount);
        }
        self.net.teardown().await;
    }
}

/// Runs one scenario and reports.
pub async fn run(scenario: &Scenario, opts: &RunOptions) -> RunReport {
    let (mode, mode_note) = Mode::detect(opts.force_loopback);
    if let (true, Err(why)) = (scenario.needs.cluster, &opts.coordinator_bin) {
        return RunReport::not_run(
            scenario.name,
            opts.seed,
            mode.as_str(),
            Verdict::Unsupported,
            format!("needs a multi-node cluster: {why}"),
        );
    }
    if scenario.needs.netns && mode == Mode::Loopback {
        return RunReport::not_run(
            scenario.name,
            opts.seed,
            mode.as_str(),
            Verdict::Unsupported,
            format!(
                "needs network namespaces (root): {}",
                mode_note.unwrap_or_default()
            ),
        );
    }
    if let Some(note) = &mode_note {
        eprintln!("ringpost-chaos: {note}");
    }
    let started = std::time::Instant::now();
    let window = opts.duration.unwrap_or(scenario.window);
    // An abuse scenario first runs the same seed without the attack: the baseline.
    let baseline = if has_abuse(&scenario.schedule.plan(opts.seed, window)) {
        match run_inner(scenario, opts, mode, true).await {
            Ok(report) => Some(report),
            Err(e) => {
                let mut report = RunReport::not_run(
                    scenario.name,
                    opts.seed,
                    mode.as_str(),
                    Verdict::Error,
                    format!("the baseline run (without the attack) failed: {e:#}"),
                );
                report.wall_ms = started.elapsed().as_millis() as u64;
                return report;
            }
        }
    } else {
        None
    };
    let mut report = match run_inner(scenario, opts, mode, false).await {
        Ok(report) => report,
        Err(e) => RunReport::not_run(
            scenario.name,
            opts.seed,
            mode.as_str(),
            Verdict::Error,
            format!("{e:#}"),
        ),
    };
    if let Some(baseline) = baseline {
        judge_abuse(&mut report, &baseline);
    }
    report.wall_ms = started.elapsed().as_millis() as u64;
    if let Some(note) = mode_note {
        report.notes.push(note);
    }
    report
}

async fn ensure_tools(needs: &Needs) -> Result<()> {
    if needs.iptables {
        sys::ensure_tool("iptables", "iptables").await?;
    }
    if needs.tc {
        sys::ensure_tool("tc", "iproute2").await?;
    }
    if needs.fiu {
        sys::ensure_tool("fiu-ctrl", "fiu-utils").await?;
        if !Path::new("/usr/lib/fiu/fiu_posix_preload.so").exists() {
            bail!("libfiu's preload library is missing: install Debian fiu-utils");
        }
    }
    if needs.faketime {
        sys::ensure_tool("faketime", "faketime").await?;
        if !Path::new(node::FAKETIME_LIB).exists() {
            bail!(
                "{} is missing: install Debian libfaketime",
                node::FAKETIME_LIB
            );
        }
    }
    Ok(())
}

fn default_run_dir(name: &str, seed: u64) -> PathBuf {
    crate::hosts::base_dir()
        .join("runs")
        .join(format!("{name}-{}-{seed}", crate::hosts::run_id()))
}

/// The population: `users` users ([`USERS`], [`USERS_CLUSTER`]) with one or two devices each,
/// alternating between the two client hosts.
pub fn population(seed: u64, users: u64) -> Vec<UserPlan> {
    let mut rng = crate::seeded(seed, "population");
    (0..users)
        .map(|i| UserPlan {
            user: FIRST_USER + i,
            devices: rng.gen_range(1..=2),
            host: format!("client{}", 1 + i % 2),
        })
        .collect()
}

fn spawn_on(
    net: &Network,
    host: &Host,
    what: &str,
    argv: &[String],
    log: &Path,
) -> Result<(Child, ProcId)> {
    let full = host.command(argv);
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let child = tokio::process::Command::new(&full[0])
        .args(&full[1..])
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let id = child
        .id()
        .and_then(ProcId::of)
        .with_context(|| format!("{what} exited at once; see {}", log.display()))?;
    net.track_process(what, id);
    Ok((child, id))
}

/// Whether a plan has an attack (an abuse scenario's).
fn has_abuse(plan: &[PlannedFault]) -> bool {
    plan.iter()
        .any(|f| matches!(f.kind, FaultKind::Abuse { .. }))
}

/// Judges an abuse run against its baseline: the baseline must pass, and with the attack the
/// node must have stayed ready, under [`ABUSE_RSS_BOUND_MIB`], and the honest clients' SendAck
/// p99 within [`ABUSE_P99_FACTOR`] of the baseline's.
fn judge_abuse(report: &mut RunReport, baseline: &RunReport) {
    let Some(abuse) = report.abuse.as_mut() else {
        return;
    };
    if let Some(b) = &baseline.abuse {
        abuse.baseline_p99_ms = Some(b.honest_p99_ms);
        abuse.baseline_sends = Some(b.honest_sends);
        abuse.baseline_rss_peak_kib = Some(b.rss_peak_kib);
        abuse.p99_limit_ms = Some(ABUSE_P99_FACTOR * b.honest_p99_ms.max(ABUSE_P99_FLOOR_MS));
    }
    let line = abuse.describe();
    report.notes.push(format!(
        "abuse: {line}; baseline run (same seed, no attack) in {}",
        baseline.run_dir
    ));
    if report.verdict != Verdict::Pass {
        return;
    }
    let mut failures = Vec::new();
    if baseline.verdict != Verdict::Pass {
        report.verdict = Verdict::Error;
        report.reason = format!(
            "the baseline run (without the attack) did not pass: {} {}",
            baseline.verdict.as_str(),
            baseline.reason
        );
        return;
    }
    if let Some(attacker) = &abuse.attacker {
        failures.extend(attacker.violations.iter().cloned());
    }
    if abuse.readyz_failed > 0 || abuse.readyz_ok == 0 {
        failures.push(format!(
            "/readyz failed {} times ({} ok){}",
            abuse.readyz_failed,
            abuse.readyz_ok,
            abuse
                .readyz_first_failure
                .as_ref()
                .map_or_else(String::new, |f| format!(": first {f}"))
        ));
    }
    if abuse.rss_peak_kib > abuse.rss_bound_kib || abuse.rss_peak_kib == 0 {
        failures.push(format!(
            "node RSS peak {} MiB over the bound of {} MiB (or never sampled)",
            abuse.rss_peak_kib / 1024,
            abuse.rss_bound_kib / 1024
        ));
    }
    if let Some(limit) = abuse.p99_limit_ms {
        if abuse.honest_p99_ms > limit {
            failures.push(format!(
                "honest SendAck p99 {:.0} ms over {limit:.0} ms ({ABUSE_P99_FACTOR}x the \
                 baseline's {:.0} ms)",
                abuse.honest_p99_ms,
                abuse.baseline_p99_ms.unwrap_or_default()
            ));
        }
    }
    if abuse.honest_sends == 0 {
        failures.push("no honest send was acked during the attack".into());
    }
    if failures.is_empty() {
        report.reason = format!("no violation; {line}");
    } else {
        report.verdict = Verdict::Fail;
        report.reason = format!("abuse: {}", failures.join("; "));
    }
}

/// Honest send -> `SendAck{Ok}` latency p99 (ms) of the sends first made in
/// `[from_us, to_us]`, and how many there were.
fn honest_p99(records: &[history::Record], from_us: u64, to_us: u64) -> (f64, u64) {
    use std::collections::HashMap;
    let mut first_send: HashMap<(history::Dev, history::MsgId), u64> = HashMap::new();
    let mut latencies = Vec::new();
    for r in records {
        match &r.event {
            Event::Send { from, msg_id, .. } => {
                first_send.entry((*from, *msg_id)).or_insert(r.t_us);
            }
            Event::SendAck {
                from,
                msg_id,
                status,
                ..
            } if status == check::STATUS_OK => {
                if let Some(&sent) = first_send.get(&(*from, *msg_id)) {
                    if (from_us..=to_us).contains(&sent) {
                        latencies.push(r.t_us.saturating_sub(sent));
                    }
                }
            }
            _ => {}
        }
    }
    if latencies.is_empty() {
        return (0.0, 0);
    }
    latencies.sort_unstable();
    let at = ((latencies.len() - 1) as f64 * 0.99).round() as usize;
    (latencies[at] as f64 / 1000.0, latencies.len() as u64)
}

async fn run_inner(
    scenario: &Scenario,
    opts: &RunOptions,
    mode: Mode,
    baseline: bool,
) -> Result<RunReport> {
    ensure_tools(&scenario.needs).await?;
    let seed = opts.seed;
    let window = opts.duration.unwrap_or(scenario.window);
    let run_dir = opts
        .run_dir
        .clone()
        .unwrap_or_else(|| default_run_dir(scenario.name, seed));
    // The baseline of an abuse scenario: the same run without the attack, beside it.
    let run_dir = if baseline {
        let mut name = run_dir.file_name().unwrap_or_default().to_os_string();
        name.push("-baseline");
        run_dir.with_file_name(name)
    } else {
        run_dir
    };
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let run_dir = run_dir.canonicalize()?;
    let full_plan = scenario.schedule.plan(seed, window);
    let mut plan = full_plan.clone();
    if baseline {
        plan.retain(|f| !matches!(f.kind, FaultKind::Abuse { .. }));
    }
    if scenario.needs.cluster {
        faults::assign_nodes(&mut plan, seed, scenario.needs.cluster_nodes());
    }
    if mode == Mode::Loopback {
        if let Some(f) = plan.iter().find(|f| needs_netns(&f.kind)) {
            bail!("fault {} needs network namespaces (root)", f.kind.name());
        }
    }

    // Private copies of the binaries: the cargo target dir may be shared, and a build elsewhere
    // must not swap the node (restarted many times) or the workload under a running scenario.
    let mut opts = opts.clone();
    let bin_dir = run_dir.join("bin");
    opts.node_bin = snapshot_binary(&opts.node_bin, &bin_dir.join("ringpost-node"))?;
    opts.self_bin = snapshot_binary(&opts.self_bin, &bin_dir.join("ringpost-chaos"))?;
    let coordinator_bin = match (&opts.coordinator_bin, scenario.needs.cluster) {
        (Ok(bin), true) => Some(snapshot_binary(bin, &bin_dir.join("ringpost-coordinator"))?),
        _ => None,
    };
    let opts = &opts;

    // A cluster has its nodes 1..=node_count (the plan may add one) and coordinators.
    let node_count = if scenario.needs.cluster {
        plan.iter()
            .filter_map(|f| f.kind.member_node())
            .max()
            .unwrap_or(0)
            .max(scenario.needs.cluster_nodes())
    } else {
        1
    };
    let mut names: Vec<String> = Vec::new();
    if scenario.needs.cluster {
        names.extend((1..=cluster::REPLICAS).map(|i| format!("coord{i}")));
    }
    names.extend((1..=node_count).map(|i| format!("node{i}")));
    names.extend(["client1".to_string(), "client2".to_string()]);
    if scenario.needs.cluster {
        names.push("ops".into());
    }
    if has_abuse(&plan) {
        names.push("attacker".into());
    }
    if scenario.needs.relay
        || plan.iter().any(|f| {
            uses_relay(&f.kind)
                || matches!(
                    f.kind,
                    FaultKind::PeerChaos { .. } | FaultKind::ReplicaLag { .. }
                )
        })
    {
        names.push("relay".into());
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let net = Network::create(mode, &run_dir, &names).await?;
    let clock = Clock::new();
    let history = Arc::new(HistoryWriter::create(
        &run_dir.join("history-orchestrator.jsonl"),
        "orchestrator",
        clock,
    )?);
    history.record(Event::Meta {
        scenario: scenario.name.into(),
        seed,
        mode: mode.as_str().into(),
    });
    let cluster = coordinator_bin.map(|bin| Cluster {
        replicas: (1..=cluster::REPLICAS)
            .map(|i| {
                let name = format!("coord{i}");
                let spec = CoordinatorSpec {
                    replica_id: i,
                    bin: bin.clone(),
                    data_dir: run_dir.join(format!("{name}-data")),
                    log: run_dir.join(format!("{name}.log")),
                    secret_file: run_dir.join("secret"),
                    name: name.clone(),
                };
                CoordinatorProcess::new(spec, net.host(&name).clone())
            })
            .collect(),
        bin,
        secret_file: run_dir.join("secret"),
        codes_file: run_dir.join("verification-codes.txt"),
        ops: net.host("ops").clone(),
    });
    let uses_fiu = scenario.needs.fiu
        || plan
            .iter()
            .any(|f| matches!(f.kind, FaultKind::FsyncFail { .. }));
    let nodes: Vec<NodeProcess> = (1..=node_count)
        .map(|i| {
            let name = format!("node{i}");
            let spec = NodeSpec {
                role: match &cluster {
                    Some(cluster) => NodeRole::Member(crate::node::MemberConfig {
                        replicate: scenario.needs.replicate,
                        zone: scenario
                            .needs
                            .zones
                            .then(|| cluster::zone_of(i).map(String::from))
                            .flatten(),
                        ..cluster.member_config(i)
                    }),
                    None => NodeRole::Dev,
                },
                bin: opts.node_bin.clone(),
                data_dir: run_dir.join(format!("{name}-data")),
                log: run_dir.join(format!("{name}.log")),
                device_rate: 200,
                device_burst: 400,
                fiu_ctrl: uses_fiu.then(|| run_dir.join("fiu-ctrl")),
                tls_names: Vec::new(),
                name: name.clone(),
            };
            NodeProcess::new(spec, net.host(&name).clone())
        })
        .collect();
    let mut rig = Rig {
        nodes,
        cluster,
        net,
        history: history.clone(),
        rng: crate::seeded(seed, "fault-internals"),
        run_dir: run_dir.clone(),
        target: 0,
        fault_epoch: None,
        relay_control: None,
        relay_reset: 0,
        peer_relay_control: None,
        relays: Vec::new(),
        workloads: Vec::new(),
        tmpfs: Vec::new(),
        notes: Vec::new(),
        attacks_started: 0,
        attacker: None,
        attack_summary: None,
        probe: None,
        probe_summary: None,
        victims: Vec::new(),
        opts: Some(opts.clone()),
        findings: Vec::new(),
        rejoin_before: Default::default(),
    };
    let result = drive(&mut rig, scenario, opts, window, &plan, clock).await;
    // Stop the workloads first (the stop file), then everything else, whatever happened.
    let _ = std::fs::write(run_dir.join("stop"), b"");
    rig.shutdown().await;
    // The binary copies are only needed while the run goes (40 MB each run).
    let _ = std::fs::remove_dir_all(run_dir.join("bin"));
    let origin_us = result?;

    // Merge and check.
    let mut records = Vec::new();
    for entry in std::fs::read_dir(&run_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("history-") && name.ends_with(".jsonl") {
            records.extend(history::read(&entry.path())?);
        }
    }
    let records = history::merge(records);
    let history_path = run_dir.join("history.jsonl");
    history::write_all(&history_path, &records)?;
    let checked = check::check(&records);
    let mut report = RunReport::not_run(
        scenario.name,
        seed,
        mode.as_str(),
        Verdict::Pass,
        String::new(),
    );
    report.duration_ms = window.as_millis() as u64;
    report.run_dir = run_dir.display().to_string();
    report.history = history_path.display().to_string();
    report.notes = std::mem::take(&mut rig.notes);
    report.notes.extend(observations(&records, &checked));
    let replicated_loss = lost_despite_replicas(&scenario.needs, &checked.counts);
    let passed = checked.passed() && !replicated_loss;
    if let Some(attack) = full_plan
        .iter()
        .find(|f| matches!(f.kind, FaultKind::Abuse { .. }))
    {
        let from_us = origin_us + attack.at.as_micros() as u64;
        let to_us = from_us + attack.duration.as_micros() as u64;
        let (p99, sends) = honest_p99(&records, from_us, to_us);
        let probe = rig.probe_summary.take().unwrap_or_default();
        report.abuse = Some(AbuseReport {
            attack: attack.kind.name().into(),
            window_start_ms: attack.at.as_millis() as u64,
            window_end_ms: (attack.at + attack.duration).as_millis() as u64,
            honest_p99_ms: p99,
            honest_sends: sends,
            rss_first_kib: probe.rss_first_kib,
            rss_peak_kib: probe.rss_peak_kib,
            rss_bound_kib: ABUSE_RSS_BOUND_MIB * 1024,
            readyz_ok: probe.readyz_ok,
            readyz_failed: probe.readyz_failed,
            readyz_first_failure: probe.readyz_first_failure,
            attacker: rig.attack_summary.take(),
            ..AbuseReport::default()
        });
    }
    report.replicated = scenario.needs.replicate;
    report.absorb(checked, origin_us);
    report.notes.extend(membership_notes(&report));
    if !passed {
        report.verdict = Verdict::Fail;
        let kinds: Vec<String> = crate::check::CheckReport {
            violations: report.violations.clone(),
            ..Default::default()
        }
        .by_kind()
        .iter()
        .map(|(k, n)| format!("{n} {k:?}").to_lowercase())
        .collect();
        report.reason = failure_reason(
            &kinds,
            report.unreplicated_summary(),
            replicated_loss,
            &rig.findings,
        );
    } else if !rig.findings.is_empty() {
        report.verdict = Verdict::Fail;
        report.reason = format!("no invariant violation, but: {}", rig.findings.join("; "));
    } else if report.counts.acked == 0 {
        report.verdict = Verdict::Fail;
        report.reason = "no message was acked: the run proves nothing".into();
    } else if report.faults.len() < plan.len() {
        report.verdict = Verdict::Error;
        report.reason = format!(
            "only {} of {} faults applied",
            report.faults.len(),
            plan.len()
        );
    } else if report.notes.iter().any(|n| n.starts_with("availability:")) {
        report.reason = "no violation; warning: the node stayed unavailable after a storage \
                         fault healed (see notes)"
            .into();
    } else if let Some(summary) = report.unreplicated_summary() {
        report.reason = format!("no violation; {summary}");
    }
    Ok(report)
}

/// Why a run whose history failed the checks fails: the violations by kind, the losses with a
/// removed node (a failure of their own when every node replicated, else expected), and what
/// the faults found.
fn failure_reason(
    kinds: &[String],
    unreplicated: Option<String>,
    replicated_loss: bool,
    findings: &[String],
) -> String {
    let mut parts = Vec::new();
    if !kinds.is_empty() {
        parts.push(format!("invariant violations: {}", kinds.join(", ")));
    }
    match unreplicated {
        Some(summary) if replicated_loss => {
            parts.push(format!("although every node replicated, {summary}"));
        }
        Some(summary) => parts.push(format!("besides, {summary} (expected)")),
        None => {}
    }
    parts.extend(findings.iter().cloned());
    parts.join("; ")
}

/// What each membership fault did and how long the cluster took (from the faults' details),
/// and what a removed node took with it.
fn membership_notes(report: &RunReport) -> Vec<String> {
    let mut notes = Vec::new();
    for f in &report.faults {
        if ![
            "leader-kill",
            "node-join",
            "node-drain",
            "node-loss",
            "coord-partition",
            "primary-partition",
            "zone-loss",
            "node-restart",
            "replica-lag",
        ]
        .contains(&f.kind.as_str())
        {
            continue;
        }
        let end = f
            .end_ms
            .map_or_else(|| "never healed".to_string(), |e| format!("to {e} ms"));
        notes.push(format!(
            "membership #{} {} ({} ms {end}): {}",
            f.id, f.kind, f.start_ms, f.detail
        ));
    }
    if let Some(summary) = report.unreplicated_summary().filter(|_| report.replicated) {
        for r in &report.removed_nodes {
            notes.push(format!(
                "node {} was killed at {} ms and removed at {} ms; its shards failed over to \
                 their in-sync replicas",
                r.node_id, r.killed_ms, r.removed_ms
            ));
        }
        notes.push(format!(
            "with a removed node: {summary}; any loss is a violation"
        ));
    } else if let Some(summary) = report.unreplicated_summary() {
        for r in &report.removed_nodes {
            let users: Vec<String> = r.users.iter().map(u64::to_string).collect();
            notes.push(format!(
                "node {} was killed at {} ms and removed at {} ms; users that lived only there: \
                 {} (their accounts went with it: their devices cannot log in again and sends \
                 to them are refused)",
                r.node_id,
                r.killed_ms,
                r.removed_ms,
                if users.is_empty() {
                    "none".to_string()
                } else {
                    users.join(", ")
                }
            ));
        }
        notes.push(format!(
            "lost with a removed node: {summary}; listed as `lost_unreplicated` in the JSON \
             report, not as violations. Every other acked message was checked as usual."
        ));
    }
    notes
}

/// With replicas a removed node takes nothing with it: any loss the checker would put down to
/// a removed node's single copy fails the run.
fn lost_despite_replicas(needs: &Needs, counts: &crate::check::Counts) -> bool {
    needs.replicate
        && (counts.lost_unreplicated
            + counts.lost_unreplicated_receipts
            + counts.lost_unreplicated_delivered_receipts
            + counts.group_lost_unreplicated)
            > 0
}

/// Copies a binary into the run dir and returns the new path (a copy, not a hard link: a
/// linker may rewrite its output in place). This process's own binary is read through
/// /proc/self/exe, the very file running now.
fn snapshot_binary(from: &Path, to: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(to.parent().unwrap_or(Path::new(".")))?;
    let _ = std::fs::remove_file(to);
    let is_self = std::env::current_exe().is_ok_and(|me| me == from);
    let source = if is_self {
        PathBuf::from("/proc/self/exe")
    } else {
        from.to_path_buf()
    };
    std::fs::copy(&source, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(to.to_path_buf())
}

fn needs_netns(kind: &FaultKind) -> bool {
    matches!(
        kind,
        FaultKind::Partition
            | FaultKind::OneWayPartition { .. }
            | FaultKind::PartialPartition { .. }
            | FaultKind::Loss { .. }
            | FaultKind::Bandwidth { .. }
            | FaultKind::DiskFull { .. }
            | FaultKind::CoordPartition { .. }
            | FaultKind::PrimaryPartition { .. }
            | FaultKind::PeerPartition { .. }
    )
}

fn uses_relay(kind: &FaultKind) -> bool {
    matches!(
        kind,
        FaultKind::Delay { .. } | FaultKind::RelayReset | FaultKind::UdpChaos { .. }
    )
}

/// Where the workload connects and registers.
struct Entry {
    /// The entry point of `client1`'s devices and of registration.
    client1: String,
    /// The entry point of `client2`'s devices.
    client2: String,
    ca_file: Option<PathBuf>,
    codes_file: PathBuf,
}

impl Entry {
    fn url(&self, host: &str) -> String {
        if host == "client2" {
            self.client2.clone()
        } else {
            self.client1.clone()
        }
    }
}

/// Everything from the node's start to the end of settling. Returns the start of sending
/// (Unix microseconds), the origin of the report's times.
async fn drive(
    rig: &mut Rig,
    scenario: &Scenario,
    opts: &RunOptions,
    window: Duration,
    plan: &[PlannedFault],
    clock: Clock,
) -> Result<u64> {
    let run_dir = rig.run_dir.clone();
    let entry = if rig.cluster.is_some() {
        start_cluster(rig, scenario, opts, plan).await?
    } else {
        start_dev_node(rig, scenario, opts, plan).await?
    };

    // Register the population, from client1.
    let users = if rig.cluster.is_some() {
        USERS_CLUSTER
    } else {
        USERS
    };
    let population = population(opts.seed, users);
    rig.victims = population.iter().map(|u| u.user).collect();
    // An abuse scenario's runs (with the attack and the baseline) watch the node.
    if has_abuse(&scenario.schedule.plan(opts.seed, window)) {
        rig.start_probe().await?;
    }
    let spec_for = |host: &str, start_at_us: u64| WorkloadSpec {
        host: host.into(),
        url: entry.url(host),
        ca_file: entry.ca_file.clone(),
        codes_file: entry.codes_file.clone(),
        seed: opts.seed,
        population: population.clone(),
        credentials: run_dir.join("credentials.json"),
        history: run_dir.join(format!("history-{host}.jsonl")),
        start_at_us,
        send_ms: window.as_millis() as u64,
        rate_per_device: RATE_PER_DEVICE,
        receipt_fraction: RECEIPT_FRACTION,
        stop_file: run_dir.join("stop"),
        groups: opts.groups,
        group_changes: opts.group_changes,
        deadline_us: start_at_us
            + (window + crate::workload::RETRY_GRACE + opts.settle_max + WORKLOAD_EXIT_TIMEOUT)
                .as_micros() as u64,
    };
    let register_spec = run_dir.join("workload-register.json");
    std::fs::write(
        &register_spec,
        serde_json::to_vec_pretty(&spec_for("client1", clock.now_us()))?,
    )?;
    let client1 = rig.net.host("client1").clone();
    let argv = vec![
        opts.self_bin.display().to_string(),
        "workload".into(),
        "--spec".into(),
        register_spec.display().to_string(),
        "--register".into(),
    ];
    let log = run_dir.join("register.log");
    let (mut child, id) = spawn_on(&rig.net, &client1, "register", &argv, &log)?;
    let status = tokio::time::timeout(REGISTER_TIMEOUT, child.wait()).await;
    rig.net.untrack_process(id);
    match status {
        Ok(Ok(status)) if status.success() => {}
        Ok(_) => bail!(
            "registering the population failed; see {}:\n{}",
            log.display(),
            node::log_tail(&log, 0)
        ),
        Err(_) => {
            id.signal_group(nix::sys::signal::Signal::SIGKILL);
            bail!("registering the population took over {REGISTER_TIMEOUT:?}")
        }
    }
    if rig.cluster.is_some() {
        let credentials = crate::workload::read_credentials(&run_dir.join("credentials.json"))?;
        rig.notes.push(format!(
            "users by owner node at registration (entry points: client1 node 1, client2 node \
             2): {}",
            users_by_node(&credentials)
        ));
    }

    // The workloads.
    let start_at_us = clock.now_us() + WORKLOAD_WARMUP.as_micros() as u64;
    for host in ["client1", "client2"] {
        let path = run_dir.join(format!("workload-{host}.json"));
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&spec_for(host, start_at_us))?,
        )?;
        let argv = vec![
            opts.self_bin.display().to_string(),
            "workload".into(),
            "--spec".into(),
            path.display().to_string(),
        ];
        let h = rig.net.host(host).clone();
        let log = run_dir.join(format!("workload-{host}.log"));
        let (child, id) = spawn_on(&rig.net, &h, host, &argv, &log)?;
        rig.workloads.push((host.to_string(), child, id));
    }

    // The faults.
    let start = tokio::time::Instant::now() + WORKLOAD_WARMUP;
    for fault in plan {
        tokio::time::sleep_until(start + fault.at).await;
        check_workloads(rig)?;
        let target = fault_target(fault);
        // The window opens before the fault is applied and closes after it healed, so it
        // covers every moment the fault could act.
        rig.history.record(Event::Fault {
            id: fault.id,
            kind: fault.kind.name().into(),
            phase: Phase::Start,
            target: target.clone(),
            detail: fault.kind.describe(),
        });
        let applied = faults::apply(rig, fault)
            .await
            .with_context(|| format!("applying fault {} ({})", fault.id, fault.kind.name()))?;
        tokio::time::sleep_until(start + fault.at + fault.duration).await;
        let healed = faults::heal(rig, fault)
            .await
            .with_context(|| format!("healing fault {} ({})", fault.id, fault.kind.name()))?;
        let describe = fault.kind.describe();
        rig.history.record(Event::Fault {
            id: fault.id,
            kind: fault.kind.name().into(),
            phase: Phase::End,
            target,
            detail: [describe, applied, healed]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    tokio::time::sleep_until(start + window).await;
    check_workloads(rig)?;

    // Settle: until every acked message arrived and nothing moved for a while.
    let settle_deadline = tokio::time::Instant::now() + opts.settle_max;
    loop {
        tokio::time::sleep(SETTLE_POLL).await;
        let (settled, last_us) = settled(&run_dir)?;
        let quiet = clock.now_us().saturating_sub(last_us) >= SETTLE_QUIET.as_micros() as u64;
        if (settled && quiet) || tokio::time::Instant::now() >= settle_deadline {
            break;
        }
        check_workloads(rig)?;
    }
    rig.stop_probe().await?;
    Ok(start_at_us)
}

/// The dev node (and the relay in front of it, if any): where the workload connects.
async fn start_dev_node(
    rig: &mut Rig,
    scenario: &Scenario,
    opts: &RunOptions,
    plan: &[PlannedFault],
) -> Result<Entry> {
    prepare_nodes(rig, scenario, plan).await?;
    let relay_ip = rig
        .net
        .hosts
        .iter()
        .find(|h| h.name == "relay")
        .map(|h| h.ip);
    // The node's dev certificate names its own listen addresses; clients behind the relay
    // connect to the relay's.
    rig.node_mut().spec.tls_names = relay_ip.iter().map(|ip| ip.to_string()).collect();
    rig.history.record(Event::Process {
        node: "node1".into(),
        action: "start".into(),
        pid: 0,
        detail: opts.node_bin.display().to_string(),
    });
    rig.start_node().await?;

    // The relay, if any, in front of the node.
    let node_ip = rig.node().host.ip;
    let mut url = rig.node().ws_url();
    if let Some(relay_ip) = relay_ip {
        let tcp = vec![format!(
            "{relay_ip}:{}={node_ip}:{}",
            node::PORT_WS,
            node::PORT_WS
        )];
        let udp = vec![format!(
            "{relay_ip}:{}={node_ip}:{}",
            node::PORT_QUIC,
            node::PORT_QUIC
        )];
        rig.relay_control = Some(start_relay(rig, opts, "relay", &tcp, &udp).await?);
        url = if scenario.needs.quic {
            format!("quic://{relay_ip}:{}", node::PORT_QUIC)
        } else {
            format!("ws://{relay_ip}:{}", node::PORT_WS)
        };
    } else if scenario.needs.quic {
        url = rig.node().quic_url();
    }
    Ok(Entry {
        client1: url.clone(),
        client2: url,
        ca_file: Some(rig.node().ca_file()),
        codes_file: rig.node().codes_file(),
    })
}

/// Gets the data dirs and clocks of the nodes ready for the plan's faults: a tmpfs of
/// [`TMPFS_SIZE`] as the data dir for `disk-full`, a libfaketime file of its own for the clock
/// faults. In a cluster every node gets them (the seed picks which one a fault hits).
async fn prepare_nodes(rig: &mut Rig, scenario: &Scenario, plan: &[PlannedFault]) -> Result<()> {
    let tmpfs = plan.iter().any(|f| f.kind.needs_tmpfs());
    let faketime = scenario.needs.faketime
        || plan
            .iter()
            .any(|f| matches!(f.kind, FaultKind::ClockSkew { .. }));
    for index in 0..rig.nodes.len() {
        let data_dir = rig.nodes[index].spec.data_dir.clone();
        std::fs::create_dir_all(&data_dir)?;
        if tmpfs {
            rig.net.track_mount(&data_dir)?;
            let shown = data_dir.display().to_string();
            let size = format!("size={TMPFS_SIZE}");
            sys::run("mount", &["-t", "tmpfs", "-o", &size, "tmpfs", &shown]).await?;
            rig.tmpfs.push(data_dir);
        }
        if faketime {
            let file = rig
                .run_dir
                .join(format!("faketime-{}", rig.nodes[index].spec.name));
            std::fs::write(&file, "+0\n")?;
            rig.nodes[index].faketime_file = Some(file);
        }
    }
    Ok(())
}

/// Starts a relay (`ringpost-chaos relay`) named `name` on the `relay` host with these routes
/// (`LISTEN=TARGET`) and a clean control file; waits until it listens. Returns the control
/// file.
async fn start_relay(
    rig: &mut Rig,
    opts: &RunOptions,
    name: &str,
    tcp: &[String],
    udp: &[String],
) -> Result<PathBuf> {
    let control = rig.run_dir.join(format!("{name}.json"));
    relay::write_control(&control, &Impairment::default())?;
    let mut argv: Vec<String> = vec![opts.self_bin.display().to_string(), "relay".into()];
    for route in tcp {
        argv.extend(["--tcp".to_string(), route.clone()]);
    }
    for route in udp {
        argv.extend(["--udp".to_string(), route.clone()]);
    }
    argv.extend([
        "--control".into(),
        control.display().to_string(),
        "--seed".into(),
        // Each relay its own random stream (the clients' relay the run's seed).
        if name == "relay" {
            opts.seed
        } else {
            opts.seed ^ 0x9e37_79b9_7f4a_7c15
        }
        .to_string(),
    ]);
    let log = rig.run_dir.join(format!("{name}.log"));
    let host = rig.net.host("relay").clone();
    let spawned = spawn_on(&rig.net, &host, name, &argv, &log)?;
    rig.relays.push(spawned);
    wait_for_line(&log, "relay ready", Duration::from_secs(15)).await?;
    Ok(control)
}

/// The coordinator replicas, `init`, and the first [`cluster::NODES`] nodes: where the
/// workload connects (`client1` through node 1, `client2` through node 2).
///
/// With a client relay, every node advertises (for redirects) the relay's port that leads to
/// it, so every client connection passes the relay; with a peer relay, every node advertises
/// its peer address the same way, so every node-to-node datagram passes it.
async fn start_cluster(
    rig: &mut Rig,
    scenario: &Scenario,
    opts: &RunOptions,
    plan: &[PlannedFault],
) -> Result<Entry> {
    let run_dir = rig.run_dir.clone();
    prepare_nodes(rig, scenario, plan).await?;
    let client_relay = scenario.needs.relay || plan.iter().any(|f| uses_relay(&f.kind));
    // Peer chaos impairs every node's links; replica lag only the slowed node's.
    let peer_chaos = plan
        .iter()
        .any(|f| matches!(f.kind, FaultKind::PeerChaos { .. }));
    let lagging: Vec<u64> = plan
        .iter()
        .filter_map(|f| match f.kind {
            FaultKind::ReplicaLag { node, .. } => Some(node),
            _ => None,
        })
        .collect();
    let peer_relay = peer_chaos || !lagging.is_empty();
    let relay_ip = rig
        .net
        .hosts
        .iter()
        .find(|h| h.name == "relay")
        .map(|h| h.ip);
    let mut client_urls = Vec::new();
    if let (true, Some(relay_ip)) = (client_relay, relay_ip) {
        let mut tcp = Vec::new();
        for node in &mut rig.nodes {
            let id = node.node_id();
            let port = node::PORT_WS + id as u16;
            tcp.push(format!(
                "{relay_ip}:{port}={}:{}",
                node.host.ip,
                node::PORT_WS
            ));
            let url = format!("ws://{relay_ip}:{port}");
            node.advertise_ws(&url);
            client_urls.push((id, url));
        }
        rig.relay_control = Some(start_relay(rig, opts, "relay", &tcp, &[]).await?);
    }
    if let (true, Some(relay_ip)) = (peer_relay, relay_ip) {
        let mut udp = Vec::new();
        for node in &mut rig.nodes {
            if !peer_chaos && !lagging.contains(&node.node_id()) {
                continue;
            }
            let port = node::PORT_PEER + node.node_id() as u16;
            udp.push(format!(
                "{relay_ip}:{port}={}:{}",
                node.host.ip,
                node::PORT_PEER
            ));
            node.advertise_peer(&format!("{relay_ip}:{port}"));
        }
        rig.peer_relay_control = Some(start_relay(rig, opts, "peer-relay", &[], &udp).await?);
    }
    let cluster = rig.cluster.as_mut().context("not a cluster run")?;
    // The secret is the run's own (the namespaces are the only ones that can reach it anyway).
    let secret = format!(
        "ringpost-chaos-{}-{:016x}",
        rig.net.run_id,
        rig.rng.gen::<u64>()
    );
    std::fs::write(&cluster.secret_file, &secret)
        .with_context(|| format!("writing {}", cluster.secret_file.display()))?;
    std::fs::write(&cluster.codes_file, b"")?;
    cluster.start(&rig.net).await?;
    for replica in &cluster.replicas {
        rig.history.record(Event::Process {
            node: replica.spec.name.clone(),
            action: "ready".into(),
            pid: replica.pid().unwrap_or(0),
            detail: "start #1".into(),
        });
    }
    let first_nodes = scenario.needs.cluster_nodes();
    for node_id in 1..=first_nodes {
        let index = rig.node_index(node_id)?;
        rig.start_member(index).await?;
    }
    let cluster = rig.cluster.as_ref().context("not a cluster run")?;
    let mut view = None;
    for node_id in 1..=first_nodes {
        let (v, _) = cluster
            .wait_member(
                node_id,
                |s| s == Some("active"),
                faults::membership::JOIN_TIMEOUT,
            )
            .await?;
        view = Some(v);
    }
    let zones = if scenario.needs.zones {
        let zones: Vec<String> = cluster::ZONES
            .iter()
            .map(|(zone, nodes)| format!("zone {zone}: nodes {nodes:?}"))
            .collect();
        format!("; {}", zones.join(", "))
    } else {
        String::new()
    };
    if let Some(view) = view {
        rig.notes.push(format!(
            "cluster: {} coordinator replicas, {} shards, heartbeats every {} ms (down after {} \
             missed); view {}{zones}",
            cluster::REPLICAS,
            cluster::SHARD_COUNT,
            cluster::HEARTBEAT_MS,
            cluster::HEARTBEAT_MISS_LIMIT,
            view.describe()
        ));
    }
    let node = |id: u64| -> Result<String> {
        if let Some((_, url)) = client_urls.iter().find(|(n, _)| *n == id) {
            return Ok(url.clone());
        }
        Ok(rig.nodes[rig.node_index(id)?].ws_url())
    };
    Ok(Entry {
        client1: node(1)?,
        client2: node(2)?,
        ca_file: None,
        codes_file: run_dir.join("verification-codes.txt"),
    })
}

/// Which users the ring gave each node, as registration saw it.
fn users_by_node(credentials: &[crate::workload::Credential]) -> String {
    use std::collections::BTreeMap;
    let mut by_node: BTreeMap<u64, std::collections::BTreeSet<u64>> = BTreeMap::new();
    for c in credentials {
        if let Some(node) = c.node {
            by_node.entry(node).or_default().insert(c.user);
        }
    }
    let parts: Vec<String> = by_node
        .iter()
        .map(|(node, users)| {
            let users: Vec<String> = users.iter().map(u64::to_string).collect();
            format!("node {node}: {}", users.join(" "))
        })
        .collect();
    parts.join("; ")
}

fn fault_target(fault: &PlannedFault) -> String {
    let node = format!("node{}", fault.node.unwrap_or(1));
    match &fault.kind {
        FaultKind::PartialPartition { host } => format!("{node}<->{host}"),
        FaultKind::Delay { .. } | FaultKind::RelayReset | FaultKind::UdpChaos { .. } => {
            "relay".into()
        }
        FaultKind::PeerChaos { .. } => "peer-relay".into(),
        FaultKind::PeerPartition { .. } => format!("{node}<->peers"),
        FaultKind::Bandwidth { .. } => format!("{node},client1,client2"),
        FaultKind::LeaderKill => "coordinator leader".into(),
        FaultKind::NodeJoin { node }
        | FaultKind::NodeDrain { node }
        | FaultKind::NodeLoss { node, .. } => format!("node{node}"),
        FaultKind::CoordPartition { node } => format!("node{node}<->coord1,coord2,coord3"),
        FaultKind::PrimaryPartition { node } => {
            format!("node{node}<->coord1,coord2,coord3,peers")
        }
        FaultKind::NodeRestart { node } => format!("node{node}"),
        FaultKind::ReplicaLag { node, .. } => format!("peer-relay->node{node}"),
        FaultKind::ZoneLoss { zone, .. } => {
            let nodes: Vec<String> = cluster::zone_nodes(zone)
                .iter()
                .map(|n| format!("node{n}"))
                .collect();
            format!("zone {zone}: {}", nodes.join(","))
        }
        _ => node,
    }
}

fn check_workloads(rig: &mut Rig) -> Result<()> {
    for (host, child, _) in &mut rig.workloads {
        if let Ok(Some(status)) = child.try_wait() {
            let log = rig.run_dir.join(format!("workload-{host}.log"));
            bail!(
                "the workload on {host} exited early ({status}); see {}:\n{}",
                log.display(),
                node::log_tail(&log, 0)
            );
        }
    }
    // In a cluster nothing exits unless a fault made it: a crash is a finding.
    if let Some(cluster) = &mut rig.cluster {
        for node in &mut rig.nodes {
            if let Some(status) = node.exited() {
                bail!(
                    "{} exited on its own ({status}); see {}:\n{}",
                    node.spec.name,
                    node.spec.log.display(),
                    node::log_tail(&node.spec.log, 0)
                );
            }
        }
        for replica in &mut cluster.replicas {
            if let Some(status) = replica.exited() {
                bail!(
                    "{} exited on its own ({status}); see {}:\n{}",
                    replica.spec.name,
                    replica.spec.log.display(),
                    node::log_tail(&replica.spec.log, 0)
                );
            }
        }
    }
    Ok(())
}

/// Whether every workload finished sending and everything acked or owed arrived (no `Lost` of
/// any subject: messages, read receipts, `delivered` receipts); and the time of the last event.
fn settled(run_dir: &Path) -> Result<(bool, u64)> {
    let mut records = Vec::new();
    for entry in std::fs::read_dir(run_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // The orchestrator's too: its membership events explain losses with a removed node.
        if name.starts_with("history-") && name.ends_with(".jsonl") {
            records.extend(history::read(&entry.path())?);
        }
    }
    let last_us = records.iter().map(|r| r.t_us).max().unwrap_or(0);
    let done = records
        .iter()
        .filter(|r| matches!(&r.event, Event::Workload { phase, .. } if phase == "sending_done"))
        .count();
    if done < 2 {
        return Ok((false, last_us));
    }
    let report = check::check(&history::merge(records));
    let missing = report
        .violations
        .iter()
        .any(|v| v.kind == check::ViolationKind::Lost);
    Ok((!missing, last_us))
}

async fn wait_for_line(path: &Path, needle: &str, limit: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "no {needle:?} in {} after {limit:?}:\n{}",
                path.display(),
                node::log_tail(path, 0)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the run saw besides violations: refusals, unknown outcomes, reconnects, the node's
/// clock as the acks showed it.
/// Send-to-ack and ack-to-delivery latencies, outside faults and during each kind of fault:
/// evidence that a fault did something (a bandwidth limit or a delay shows here even when
/// nothing breaks).
fn latency_notes(records: &[history::Record], checked: &check::CheckReport) -> Vec<String> {
    use std::collections::{BTreeMap, HashMap};
    let mut first_send: HashMap<(history::Dev, history::MsgId), u64> = HashMap::new();
    let mut by_kind: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in records {
        match &r.event {
            Event::Send { from, msg_id, .. } => {
                first_send.entry((*from, *msg_id)).or_insert(r.t_us);
            }
            Event::SendAck {
                from,
                msg_id,
                status,
                ..
            } if status == check::STATUS_OK => {
                let Some(&sent) = first_send.get(&(*from, *msg_id)) else {
                    continue;
                };
                let kind = checked
                    .faults
                    .iter()
                    .find(|f| f.start_us <= sent && f.end_us.is_none_or(|end| sent <= end))
                    .map_or_else(|| "no fault".to_string(), |f| f.kind.clone());
                by_kind
                    .entry(kind)
                    .or_default()
                    .push(r.t_us.saturating_sub(sent));
            }
            _ => {}
        }
    }
    let mut parts = Vec::new();
    for (kind, mut lat) in by_kind {
        lat.sort_unstable();
        let at = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
        parts.push(format!(
            "{kind}: n={} p50 {:.0} ms p99 {:.0} ms max {:.0} ms",
            lat.len(),
            at(0.5),
            at(0.99),
            at(1.0)
        ));
    }
    if parts.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "send -> SendAck latency by sending time: {}",
        parts.join("; ")
    )]
}

/// In a cluster: which users moved between nodes, as the nodes that welcomed their devices
/// show (evidence that a join or a drain moved someone).
fn user_moves(records: &[history::Record]) -> Vec<String> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut paths: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut nodes = BTreeSet::new();
    for r in records {
        if let Event::Connection {
            at,
            up: true,
            node: Some(node),
            ..
        } = &r.event
        {
            nodes.insert(*node);
            let path = paths.entry(at.user).or_default();
            if path.last() != Some(node) {
                path.push(*node);
            }
        }
    }
    if nodes.len() <= 1 {
        return Vec::new();
    }
    let moved: Vec<String> = paths
        .iter()
        .filter(|(_, path)| path.len() > 1)
        .map(|(user, path)| {
            let hops: Vec<String> = path.iter().map(u64::to_string).collect();
            format!("{user} {}", hops.join("->"))
        })
        .collect();
    vec![format!(
        "users that moved between nodes (the nodes that welcomed their devices): {}",
        if moved.is_empty() {
            "none".to_string()
        } else {
            moved.join(", ")
        }
    )]
}

fn observations(records: &[history::Record], checked: &check::CheckReport) -> Vec<String> {
    let c = &checked.counts;
    let mut notes = vec![format!(
        "{} messages sent: {} acked, {} refused, {} of unknown outcome ({} of those delivered \
         anyway); {} deliveries expected, {} made",
        c.sent,
        c.acked,
        c.refused,
        c.unknown,
        c.delivered_unacked,
        c.expected_deliveries,
        c.delivered
    )];
    notes.push(format!(
        "{} read receipts sent, {} acked, {} delivered; {} delivered receipts from the node ({} \
         owed to sender devices); {} connection drops seen by devices",
        c.receipts_sent,
        c.receipts_acked,
        c.receipts_delivered,
        c.delivered_receipts,
        c.delivered_receipts_due,
        c.disconnects
    ));
    if c.storage_refusals > 0 || c.storage_acked > 0 {
        notes.push(format!(
            "storage faults: {} attempts refused with StorageUnavailable, {} messages acked \
             while a storage fault was active ({} of them lost)",
            c.storage_refusals, c.storage_acked, c.storage_acked_lost
        ));
    }
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    let mut skew_max_ms: i64 = 0;
    for r in records {
        match &r.event {
            Event::SendError { error, .. } => {
                let key: String = error.chars().take(60).collect();
                *errors.entry(key).or_default() += 1;
            }
            Event::SendAck { server_time_ms, .. } if *server_time_ms > 0 => {
                let skew = *server_time_ms as i64 - (r.t_us / 1_000) as i64;
                if skew.abs() > skew_max_ms.abs() {
                    skew_max_ms = skew;
                }
            }
            _ => {}
        }
    }
    if !errors.is_empty() {
        let mut top: Vec<(String, u64)> = errors.into_iter().collect();
        top.sort_by_key(|b| std::cmp::Reverse(b.1));
        let shown: Vec<String> = top
            .iter()
            .take(5)
            .map(|(e, n)| format!("{n}x {e}"))
            .collect();
        notes.push(format!("send errors (retried): {}", shown.join("; ")));
    }
    // Did the node take writes again once a storage fault healed (before anything else
    // happened to it)?
    let mut windows: Vec<&check::FaultWindow> = checked.faults.iter().collect();
    windows.sort_by_key(|f| f.start_us);
    for (i, fault) in windows.iter().enumerate() {
        if !check::STORAGE_FAULT_KINDS.contains(&fault.kind.as_str()) {
            continue;
        }
        let Some(healed_us) = fault.end_us else {
            continue;
        };
        let until_us = windows.get(i + 1).map_or(u64::MAX, |next| next.start_us);
        let from_us = healed_us + 2_000_000;
        let in_gap = |r: &&history::Record| r.t_us > from_us && r.t_us < until_us;
        let refused = records
            .iter()
            .filter(in_gap)
            .filter(|r| {
                matches!(&r.event, Event::SendError { code, .. }
                    if *code == Some(check::CODE_STORAGE_UNAVAILABLE))
            })
            .count();
        let acked = records
            .iter()
            .filter(in_gap)
            .filter(|r| matches!(&r.event, Event::SendAck { status, .. } if status == "Ok"))
            .count();
        if refused > 0 {
            notes.push(format!(
                "availability: after {} #{} healed ({}), the node kept refusing: {refused} sends \
                 answered StorageUnavailable from 2 s after the heal until the next fault or the \
                 end, {acked} acked (it should have reopened its database within a second)",
                fault.kind, fault.id, fault.detail
            ));
        }
    }
    notes.extend(latency_notes(records, checked));
    notes.extend(user_moves(records));
    // Above a minute: a replayed SendAck (a retry answered with the original) is older by the
    // retry's delay, not by a clock offset.
    if skew_max_ms.abs() > 60_000 {
        notes.push(format!(
            "largest node clock offset seen in SendAcks: {:+} s",
            skew_max_ms / 1_000
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_has_a_unique_name_and_cluster_ones_plan_faults() {
        let all = catalogue();
        let mut names: Vec<&str> = all.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        for s in all.iter().filter(|s| s.needs.cluster) {
            let plan = s.schedule.plan(1, s.window);
            assert!(!plan.is_empty(), "{} plans nothing", s.name);
        }
        // Every single-node fault scenario has a cluster counterpart.
        for s in all.iter().filter(|s| !s.needs.cluster && s.name != "smoke") {
            let kinds: std::collections::BTreeSet<&str> = (1..20)
                .flat_map(|seed| s.schedule.plan(seed, s.window))
                .map(|f| f.kind.name())
                .collect();
            for kind in kinds {
                // QUIC through the relay: the cluster's nodes speak ws only. The attacks
                // target the dev node's client listeners; one cluster node is like it.
                if kind == "udp-chaos" || kind.starts_with("abuse-") {
                    continue;
                }
                let covered = all.iter().filter(|c| c.needs.cluster).any(|c| {
                    (1..20)
                        .flat_map(|seed| c.schedule.plan(seed, c.window))
                        .any(|f| f.kind.name() == kind)
                });
                assert!(covered, "{kind} (from {}) never runs in a cluster", s.name);
            }
        }
    }

    #[test]
    fn scripts_are_fixed_by_the_seed_ordered_and_inside_the_window() {
        for window in [Duration::from_secs(10), Duration::from_secs(30)] {
            for script in [join_drain_script, node_loss_script, coord_partition_script] {
                let schedule = Schedule::Script(script);
                let a = schedule.plan(5, window);
                assert_eq!(a, schedule.plan(5, window));
                for pair in a.windows(2) {
                    assert!(pair[0].at + pair[0].duration <= pair[1].at, "{a:?}");
                }
                for f in &a {
                    assert!(f.at + f.duration < window, "{f:?} in {window:?}");
                }
            }
        }
        // The replicated scripts, in their scenarios' windows (a rolling restart needs its 40 s).
        for name in [
            "primary-partition",
            "zone-loss",
            "replica-lag",
            "rolling-restart",
        ] {
            let scenario = find(name).expect("scenario");
            assert!(scenario.needs.replicate && scenario.needs.cluster, "{name}");
            for seed in 1..20 {
                let plan = scenario.schedule.plan(seed, scenario.window);
                assert_eq!(plan, scenario.schedule.plan(seed, scenario.window));
                for pair in plan.windows(2) {
                    assert!(pair[0].at + pair[0].duration <= pair[1].at, "{plan:?}");
                }
                for f in &plan {
                    assert!(f.at + f.duration < scenario.window, "{f:?}");
                    assert!(!f.kind.acts_on_a_node(), "{name} names its nodes: {f:?}");
                    // A node the run starts.
                    if let Some(node) = f.kind.member_node() {
                        assert!(node <= scenario.needs.cluster_nodes(), "{f:?}");
                    }
                }
            }
        }
        let restarts: Vec<FaultKind> = Schedule::Script(rolling_restart_script)
            .plan(1, Duration::from_secs(40))
            .into_iter()
            .map(|f| f.kind)
            .collect();
        assert_eq!(
            restarts,
            (1..=cluster::NODES)
                .map(|node| FaultKind::NodeRestart { node })
                .collect::<Vec<_>>(),
            "every node restarted once, in turn"
        );
        let plan = Schedule::Script(join_drain_script).plan(1, Duration::from_secs(30));
        let kinds: Vec<FaultKind> = plan.into_iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            vec![
                FaultKind::NodeJoin { node: JOINING_NODE },
                FaultKind::NodeDrain { node: VICTIM_NODE },
                FaultKind::NodeJoin { node: VICTIM_NODE },
            ]
        );
    }

    #[test]
    fn abuse_scenarios_plan_one_attack_inside_the_window() {
        let abuse: Vec<Scenario> = catalogue()
            .into_iter()
            .filter(|s| s.name.starts_with("abuse-"))
            .collect();
        assert_eq!(abuse.len(), 7);
        for s in &abuse {
            for window in [Duration::from_secs(10), s.window] {
                let plan = s.schedule.plan(3, window);
                assert_eq!(plan, s.schedule.plan(3, window), "fixed by the seed");
                assert_eq!(plan.len(), 1, "{}", s.name);
                let f = &plan[0];
                assert_eq!(f.kind.name(), s.name);
                assert!(!f.kind.acts_on_a_node(), "the attacker aims at node 1");
                assert!(
                    f.at >= window.mul_f64(0.1) && f.at + f.duration < window,
                    "{f:?}"
                );
            }
        }
    }

    fn record(t_us: u64, event: Event) -> history::Record {
        history::Record {
            t_us,
            src: "t".into(),
            n: 0,
            event,
        }
    }

    #[test]
    fn honest_p99_counts_the_sends_started_in_the_window() {
        let from = history::Dev { user: 1, device: 1 };
        let mut records = Vec::new();
        // 100 sends at 1 ms, 2 ms, ... 100 ms of latency, started at 1_000_000 + i; one more,
        // started before the window, with a huge latency.
        for i in 0..=100u64 {
            let msg_id = history::MsgId([i as u8; 16]);
            let start = if i == 0 { 10 } else { 1_000_000 + i };
            let latency = if i == 0 { 9_000_000 } else { i * 1_000 };
            records.push(record(
                start,
                Event::Send {
                    from,
                    to_user: 2,
                    msg_id,
                    attempt: 1,
                    recipients: vec![],
                },
            ));
            records.push(record(
                start + latency,
                Event::SendAck {
                    from,
                    msg_id,
                    attempt: 1,
                    status: "Ok".into(),
                    server_time_ms: 0,
                    group_seq: 0,
                },
            ));
        }
        let (p99, n) = honest_p99(&records, 1_000_000, 2_000_000);
        assert_eq!(n, 100);
        assert_eq!(p99, 99.0);
        assert_eq!(honest_p99(&records, 3_000_000, 4_000_000), (0.0, 0));
    }

    #[test]
    fn a_replicated_run_excuses_no_loss_with_a_removed_node() {
        let mut counts = crate::check::Counts::default();
        let replicated = Needs {
            cluster: true,
            replicate: true,
            ..Needs::default()
        };
        let single = Needs {
            replicate: false,
            ..replicated
        };
        assert!(!lost_despite_replicas(&replicated, &counts));
        counts.lost_unreplicated_delivered_receipts = 1;
        assert!(lost_despite_replicas(&replicated, &counts));
        assert!(!lost_despite_replicas(&single, &counts));
        let scenario = find("node-loss-replicated").expect("scenario");
        assert!(scenario.needs.replicate && scenario.needs.cluster);
    }

    #[test]
    fn failure_reasons_name_only_what_failed() {
        let kinds = vec!["2 lost".to_string()];
        let summary = || Some("3 acked messages lost with removed node 3".to_string());
        // A replicated run that lost only with a removed node: no empty violation list.
        assert_eq!(
            failure_reason(&[], summary(), true, &[]),
            "although every node replicated, 3 acked messages lost with removed node 3"
        );
        assert_eq!(
            failure_reason(&kinds, summary(), false, &[]),
            "invariant violations: 2 lost; besides, 3 acked messages lost with removed node 3 \
             (expected)"
        );
        assert_eq!(
            failure_reason(&kinds, None, false, &["node 3 did not rejoin".to_string()]),
            "invariant violations: 2 lost; node 3 did not rejoin"
        );
    }

    fn abuse_run(p99_ms: f64, rss_mib: u64) -> RunReport {
        let mut r = RunReport::not_run("abuse-x", 1, "loopback", Verdict::Pass, String::new());
        r.abuse = Some(AbuseReport {
            attack: "abuse-x".into(),
            honest_p99_ms: p99_ms,
            honest_sends: 100,
            rss_first_kib: 1024,
            rss_peak_kib: rss_mib * 1024,
            rss_bound_kib: ABUSE_RSS_BOUND_MIB * 1024,
            readyz_ok: 10,
            ..AbuseReport::default()
        });
        r
    }

    #[test]
    fn an_abuse_run_passes_only_within_its_bounds() {
        let baseline = abuse_run(20.0, 40);
        let judged = |mut r: RunReport| {
            judge_abuse(&mut r, &baseline);
            r
        };
        let ok = judged(abuse_run(39.0, 60));
        assert_eq!(ok.verdict, Verdict::Pass, "{}", ok.reason);
        let abuse = ok.abuse.unwrap();
        assert_eq!(abuse.baseline_p99_ms, Some(20.0));
        assert_eq!(abuse.p99_limit_ms, Some(40.0));
        assert_eq!(abuse.baseline_rss_peak_kib, Some(40 * 1024));

        let slow = judged(abuse_run(41.0, 60));
        assert_eq!(slow.verdict, Verdict::Fail);
        assert!(slow.reason.contains("p99"), "{}", slow.reason);

        let fat = judged(abuse_run(10.0, ABUSE_RSS_BOUND_MIB + 1));
        assert_eq!(fat.verdict, Verdict::Fail);
        assert!(fat.reason.contains("RSS"), "{}", fat.reason);

        let mut down = abuse_run(10.0, 60);
        down.abuse.as_mut().unwrap().readyz_failed = 1;
        let down = judged(down);
        assert_eq!(down.verdict, Verdict::Fail);
        assert!(down.reason.contains("/readyz"), "{}", down.reason);

        let mut caught = abuse_run(10.0, 60);
        caught.abuse.as_mut().unwrap().attacker = Some(AttackSummary {
            violations: vec!["a wrong code registered".into()],
            ..AttackSummary::default()
        });
        let caught = judged(caught);
        assert_eq!(caught.verdict, Verdict::Fail);
        assert!(caught.reason.contains("wrong code"), "{}", caught.reason);

        // A tiny baseline counts as the floor.
        let mut quick = abuse_run(19.0, 60);
        judge_abuse(&mut quick, &abuse_run(1.0, 40));
        assert_eq!(quick.verdict, Verdict::Pass, "{}", quick.reason);
        assert_eq!(
            quick.abuse.unwrap().p99_limit_ms,
            Some(ABUSE_P99_FACTOR * ABUSE_P99_FLOOR_MS)
        );

        // A failed baseline proves nothing.
        let mut broken = baseline.clone();
        broken.verdict = Verdict::Fail;
        let mut r = abuse_run(10.0, 60);
        judge_abuse(&mut r, &broken);
        assert_eq!(r.verdict, Verdict::Error);
    }

    #[test]
    fn cluster_node_faults_name_a_node_and_the_others_do_not() {
        let mixed = find("cluster-mixed").unwrap();
        let mut targets = std::collections::BTreeSet::new();
        for seed in 1..10 {
            let mut plan = mixed.schedule.plan(seed, mixed.window);
            faults::assign_nodes(&mut plan, seed, cluster::NODES);
            let mut again = mixed.schedule.plan(seed, mixed.window);
            faults::assign_nodes(&mut again, seed, cluster::NODES);
            assert_eq!(plan, again, "the seed fixes the targets");
            for f in &plan {
                assert_eq!(f.node.is_some(), f.kind.acts_on_a_node(), "{f:?}");
                targets.extend(f.node);
            }
        }
        assert_eq!(targets, (1..=cluster::NODES).collect());
    }

    #[test]
    fn zone_loss_takes_a_whole_zone_of_a_zoned_cluster_and_spares_the_entry_points() {
        let scenario = find("zone-loss").expect("scenario");
        assert!(scenario.needs.zones);
        assert_eq!(scenario.needs.cluster_nodes(), cluster::ZONED_NODES);
        assert_eq!(Needs::default().cluster_nodes(), cluster::NODES);
        let plan = scenario.schedule.plan(1, scenario.window);
        let [fault] = plan.as_slice() else {
            panic!("one fault: {plan:?}")
        };
        let FaultKind::ZoneLoss { zone, .. } = &fault.kind else {
            panic!("{fault:?}")
        };
        let lost = cluster::zone_nodes(zone);
        assert_eq!(lost.len(), 2, "every node of the zone");
        assert!(
            !lost.contains(&1) && !lost.contains(&2),
            "entry points stay"
        );
        assert_eq!(fault_target(fault), "zone b: node3,node4");
    }

    #[test]
    fn cluster_populations_are_larger_and_alternate_hosts() {
        let small = population(1, USERS);
        let large = population(1, USERS_CLUSTER);
        assert_eq!(small.len() as u64, USERS);
        assert_eq!(large.len() as u64, USERS_CLUSTER);
        let key = |p: &[UserPlan]| -> Vec<(u64, u32, String)> {
            p.iter()
                .map(|u| (u.user, u.devices, u.host.clone()))
                .collect()
        };
        assert_eq!(
            key(&small),
            key(&large[..small.len()]),
            "the same seed, the same start"
        );
        assert!(large.iter().all(|u| (1..=2).contains(&u.devices)));
        assert_eq!(large[0].host, "client1");
        assert_eq!(large[1].host, "client2");
    }
}
