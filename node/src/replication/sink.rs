//! [`NetworkSink`]: the primary's [`ShardLogSink`] that ships records to the replicas over
//! peer links and waits for them.
//!
//! One stream per replica node, a tokio task fed by a queue: it takes everything queued for its
//! node, packs it into one `Replicate` request ([`REPLICATE_FRAME_BYTES_MAX`], records larger
//! than the rest of a frame continue in the next one as [`RecordPart`]s) and waits for the
//! answer before it sends the next. So a replica costs one round trip and one fsync per batch,
//! whatever the batch holds, and records of a shard reach it in LSN order.
//!
//! [`ShardLogSink::ship`] runs on the inbox writer's thread or a blocking thread (never an async
//! worker: it blocks). It queues each record for every node [`ReplicaLinks::must_have`] names
//! for its shard and, for a synced write, waits until each of them has applied it durably, or
//! fails. A replica that does not answer a request within the sink's ack timeout
//! ([`REPLICA_ACK_TIMEOUT_MS`] unless the node is told otherwise) fails every record of that
//! request: the write is refused (nothing is acknowledged; a client
//! retries, and its retry is deduplicated). An unsynced write (acknowledged floors) does not
//! wait: its records ride with the next batch, unless a queue holds more than
//! [`REPLICA_QUEUE_BYTES_MAX`], when it waits too (back-pressure).
//!
//! Catch-up. A placed replica outside a shard's in-sync set (newly placed, dropped after a
//! failure, or an old primary back after a failover) is a *follower*: it gets the shard's
//! records too, but nobody waits for them. Its stream catches it up: it asks the
//! [`ReplicatingEngine`] for a consistent cut of the shard ([`ReplicatingEngine::cut`]: the
//! shard's position and its next rows, read under the lock that orders writes and shipping)
//! and queues it as a snapshot chunk ([`RecordKind::Snapshot`]) right there, between the
//! records it covers and those it does not; records of the shard queued before the first
//! chunk are dropped (the snapshot holds them). One chunk per shard is in flight at a time, at
//! most [`CATCH_UPS_PER_REPLICA`] shards per replica node. When the last chunk is cut, the node
//! becomes *joining* for the shard: every later record of it is waited for, as for an in-sync
//! replica, so once the last chunk is applied the node holds every acknowledged write and is
//! proposed into the in-sync set ([`ReplicaLinks::caught_up`]). A failure on the way (a chunk
//! refused, a record missed, the link down) abandons the catch-up and the node leaves
//! *joining*; the next scan (every [`CATCH_UP_SCAN_MS`], [`ReplicaLinks::catch_up_candidates`])
//! starts it over after a pause ([`catch_up_retry_delay`]: [`CATCH_UP_RETRY_MS`], doubling
//! with each failure in a row up to [`CATCH_UP_RETRY_MAX_MS`], with jitter), so that a loaded
//! replica, or one whose answers time out, is not sent the same snapshots again every second.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ringpost_coordinator::NodeId;
use tokio::sync::mpsc as tokio_mpsc;
use tracing::{debug, warn};

use super::engine::{ReplicatingEngine, ShardLogSink, ShipError, Shipping};
use super::part::{
    RecordPart, PART_BYTES_MIN, PART_HEADER_BYTES_MAX, REPLICATE_FRAME_BYTES_MAX,
    REPLICATE_PARTS_MAX,
};
use super::record::{RecordKind, ShardLogRecord};
use super::serve::{ReplicaOutcome, ShardAnswer};
use crate::handoff::{Chunk, Cursor};
use crate::shard::ShardId;

/// How long a replica has to answer one `Replicate` request before the records in it are
/// failed (and with them the writes waiting for them), by default: twice a slow fsync plus a
/// round trip, with a margin. The primary then drops the replica from the shards' in-sync sets,
/// and it needs a catch-up to come back. `--replica-ack-timeout-ms` sets it per node, within
/// [`REPLICA_ACK_TIMEOUT_MS_MIN`]..=[`REPLICA_ACK_TIMEOUT_MS_MAX`]: longer keeps a slow
/// replica (an overloaded host) in sync, at the price of a dead one holding its shards'
/// writes that long before it is dropped.
pub const REPLICA_ACK_TIMEOUT_MS: u64 = 2_000;
/// The shortest ack timeout a node accepts: below a few fsyncs and round trips, healthy
/// replicas would be dropped.
pub const REPLICA_ACK_TIMEOUT_MS_MIN: u64 = 100;
/// The longest ack timeout a node accepts: a dead replica holds writes this long.
pub const REPLICA_ACK_TIMEOUT_MS_MAX: u64 = 60_000;
/// Encoded record bytes queued for one replica node beyond which even an unsynced write waits
/// for its records. Memory: this much per replica node, plus one ship call's records.
pub const REPLICA_QUEUE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// After a request to a replica node fails (no answer in time, or the link is down), what is
/// queued for it within this long fails at once instead of waiting out another timeout: the
/// primary drops the node from the shards' in-sync sets and goes on. The first request after
/// it probes the node again.
pub const REPLICA_DOWN_MS: u64 = 500;
/// Shards one replica node is caught up on at a time. Memory: one chunk each in flight
/// ([`CATCH_UP_CHUNK_BYTES`]).
pub const CATCH_UPS_PER_REPLICA: usize = 8;
/// Shards caught up at once over every replica node together. [`CATCH_UPS_PER_REPLICA`] alone
/// lets a node of a large cluster, whose shards have replicas on most other nodes, run dozens
/// of times as many (a 72-node cluster restarting on one host: ~250 MB per node). Memory:
/// `CATCH_UPS_PER_NODE × CATCH_UP_CHUNKS_IN_FLIGHT × CATCH_UP_CHUNK_BYTES` (32 MiB) per node at
/// most, whatever the cluster's size.
pub const CATCH_UPS_PER_NODE: usize = 16;
/// Snapshot chunks of one shard's catch-up queued or in flight at a time: a large shard moves
/// in requests of up to a frame, not one chunk per round trip. Memory: this many chunks per
/// catch-up, so `CATCH_UPS_PER_REPLICA × CATCH_UP_CHUNKS_IN_FLIGHT × CATCH_UP_CHUNK_BYTES`
/// (16 MiB) per replica node at most.
pub const CATCH_UP_CHUNKS_IN_FLIGHT: usize = 8;
/// Rows' bytes per snapshot chunk. Each chunk holds up the primary's writes for one read of
/// this much (the cut), so it is kept small; a replica applies it in one synced batch.
pub const CATCH_UP_CHUNK_BYTES: usize = 256 * 1024;
/// How often the primary looks for followers to catch up.
pub const CATCH_UP_SCAN_MS: u64 = 500;
/// How long a shard's catch-up to a node waits after one failed before it starts over.
pub const CATCH_UP_RETRY_MS: u64 = 1_000;
/// The longest such pause, after many failures in a row.
pub const CATCH_UP_RETRY_MAX_MS: u64 = 60_000;

/// The pause before a shard's catch-up starts over after its `failures`-th failure in a row
/// (1 for the first): [`CATCH_UP_RETRY_MS`] doubled per earlier failure, capped at
/// [`CATCH_UP_RETRY_MAX_MS`], then scaled into its upper half by `jitter` (in `[0, 1]`) so the
/// shards of one replica that failed together do not all start over together.
pub fn catch_up_retry_delay(failures: u32, jitter: f64) -> Duration {
    crate::backoff::delay(
        Duration::from_millis(CATCH_UP_RETRY_MS),
        Duration::from_millis(CATCH_UP_RETRY_MAX_MS),
        failures,
        jitter,
    )
}

/// What one finished catch-up moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUpStats {
    pub chunks: u64,
    /// Encoded bytes of the chunks.
    pub bytes: u64,
    pub elapsed: Duration,
}

/// The network as the sink sees it; the node implements it over its ring and peer links, tests
/// over an in-process replica.
pub trait ReplicaLinks: Send + Sync + 'static {
    /// The nodes, besides this one, that must hold `shard`'s records before a write returns:
    /// its in-sync set if it has one, else every replica the ring places.
    fn must_have(&self, shard: ShardId) -> Vec<NodeId>;

    /// `node` failed to apply records of `shards`: take it out of their in-sync sets (a
    /// coordinator proposal as their primary) and return once this node's view shows it out,
    /// so the write may be acknowledged without it. `Err` if that cannot be done (the write
    /// fails). Called on a blocking thread. Without in-sync sets, always `Err`.
    fn drop_from_in_sync(&self, node: NodeId, shards: Vec<ShardId>) -> Result<(), String> {
        let _ = shards;
        Err(format!(
            "node {node} cannot be dropped: no in-sync sets here"
        ))
    }

    /// `node` applied a synced write's records of `shards` (so it holds every record of them up
    /// to those): propose it into their in-sync sets where it is not yet. Returns at once,
    /// except for shards that have no in-sync set yet: their first write is acknowledged only
    /// once the coordinator has recorded one (else a primary dying right after it would leave
    /// no replica to promote); `Err` if that does not happen, and the write fails.
    fn confirm_in_sync(&self, node: NodeId, shards: Vec<ShardId>) -> Result<(), String> {
        let _ = (node, shards);
        Ok(())
    }

    /// Whether `node` is in `shard`'s in-sync set now. A synced write's acknowledgement from a
    /// node that was a member when the write was queued proposes nothing: writes wait for their
    /// replicas concurrently, so another write may have dropped the node since, and a dropped
    /// node comes back by a catch-up (whose records are all waited for), never by the
    /// acknowledgement of a record queued before it was dropped (a record queued after the
    /// drop and before such a proposal commits would be waited for by nobody). False by
    /// default: every acknowledging node is proposed.
    fn in_sync_member(&self, node: NodeId, shard: ShardId) -> bool {
        let _ = (node, shard);
        false
    }

    /// The placed replicas of `shard` that are not in [`ReplicaLinks::must_have`]: they get its
    /// records, nobody waits for them, and they are caught up. Empty by default.
    fn followers(&self, shard: ShardId) -> Vec<NodeId> {
        let _ = shard;
        Vec::new()
    }

    /// `(node, shard)` pairs to catch up now: this node's shards' followers. Called every
    /// [`CATCH_UP_SCAN_MS`]; pairs already being caught up are skipped by the sink.
    fn catch_up_candidates(&self) -> Vec<(NodeId, ShardId)> {
        Vec::new()
    }

    /// Whether a catch-up of `shard` to `node` may start: the first chunk replaces `node`'s
    /// copy, so never while the coordinator may count it in the shard's in-sync set (in it, or
    /// proposed into it).
    fn may_catch_up(&self, node: NodeId, shard: ShardId) -> bool {
        let _ = (node, shard);
        false
    }

    /// A catch-up of `shard` to `node` finished: its copy equals this node's and every later
    /// record reaches it and is waited for. Propose it into the shard's in-sync set. Called on
    /// a blocking thread.
    fn caught_up(&self, node: NodeId, shard: ShardId, stats: CatchUpStats) {
        let _ = stats;
        let _ = self.confirm_in_sync(node, vec![shard]);
    }

    /// A catch-up of `shard` to `node` was abandoned (it starts over later).
    fn catch_up_failed(&self, node: NodeId, shard: ShardId, why: &str) {
        let _ = (node, shard, why);
    }

    /// Sends one `Replicate` request to `node`; its answer, or why there is none within
    /// `timeout`.
    fn replicate(
        &self,
        node: NodeId,
        parts: Vec<RecordPart>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<ShardAnswer>, String>>;
}

/// Ships records to replica nodes (see the module documentation). Until [`NetworkSink::bind`]
/// gives it the links, it ships nothing: a node writes no shard data before it has a ring.
pub struct NetworkSink {
    runtime: tokio::runtime::Handle,
    shared: Arc<Shared>,
    /// One per replica node ever shipped to (a stream of a node that left idles, costing a
    /// parked task).
    streams: Mutex<HashMap<NodeId, Stream>>,
}

/// What the sink's streams share with it.
struct Shared {
    links: OnceLock<Arc<dyn ReplicaLinks>>,
    /// The engine cuts come from ([`NetworkSink::start_catch_up`]); none: no catch-up.
    source: OnceLock<Weak<ReplicatingEngine>>,
    /// Per shard, the nodes whose catch-up has cut its last chunk: they get every record of
    /// the shard and are waited for, until they fail or are in its in-sync set.
    joining: Mutex<HashMap<ShardId, Vec<NodeId>>>,
    /// The next catch-up session id (started from the clock, so a restarted primary does not
    /// reuse one a replica still holds).
    sessions: AtomicU64,
    /// Catch-ups running over every replica node (at most [`CATCH_UPS_PER_NODE`]).
    catch_ups_running: AtomicUsize,
    /// How long a replica has to answer one request ([`REPLICA_ACK_TIMEOUT_MS`]).
    ack_timeout: Duration,
}

impl Shared {
    /// Takes one of the node's [`CATCH_UPS_PER_NODE`] catch-up slots, if one is free.
    fn take_catch_up_slot(&self) -> bool {
        self.catch_ups_running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < CATCH_UPS_PER_NODE).then_some(n + 1)
            })
            .is_ok()
    }

    fn release_catch_up_slots(&self, n: usize) {
        if n > 0 {
            self.catch_ups_running.fetch_sub(n, Ordering::AcqRel);
        }
    }

    fn leave_joining(&self, node: NodeId, shard: ShardId) {
        let mut joining = self.joining.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(nodes) = joining.get_mut(&shard) {
            nodes.retain(|&n| n != node);
            if nodes.is_empty() {
                joining.remove(&shard);
            }
        }
    }

    fn is_joining(&self, node: NodeId, shard: ShardId) -> bool {
        let joining = self.joining.lock().unwrap_or_else(PoisonError::into_inner);
        joining.get(&shard).is_some_and(|n| n.contains(&node))
    }
}

struct Stream {
    /// One message per ship call, so that a call's records for the node go in one request.
    tx: tokio_mpsc::UnboundedSender<Vec<Item>>,
    queued_bytes: Arc<AtomicUsize>,
    /// A record this stream's node must have was queued unsynced since the last flush: the
    /// next synced write waits for the stream to answer it.
    unflushed: AtomicBool,
}

/// What a ship call learns of one of its items: the node, the shards it is about (a record's
/// own; for a flush, those of the unsynced records that failed since the last one), and
/// whether the node has them.
type Reply = mpsc::Sender<(NodeId, Vec<ShardId>, Result<(), String>)>;

enum Item {
    /// A record for the node; `reply` once it is applied or failed. `synced`: its ship call
    /// waits for the reply (else a failure is kept for the next flush to report). No `reply`:
    /// the node is a follower of the shard, nobody waits.
    Record {
        record: Arc<Encoded>,
        reply: Option<Reply>,
        synced: bool,
        _queued: Queued,
    },
    /// `reply` once everything queued before has been answered (`Err` if an unsynced record
    /// failed since the last flush): a synced write with no records of this node's.
    Flush { reply: Reply },
    /// Catch the node up on `shard`, unless that is under way already.
    Want { shard: ShardId },
    /// A snapshot chunk of a catch-up session, cut where it stands in the queue.
    Chunk {
        record: Arc<Encoded>,
        session: u64,
        next: Option<Cursor>,
        _queued: Queued,
    },
    /// Cutting the next chunk of `shard`'s catch-up `session` failed.
    CutFailed {
        shard: ShardId,
        session: u64,
        error: String,
    },
}

struct Encoded {
    shard: ShardId,
    lsn: u64,
    bytes: Vec<u8>,
}

/// A record's bytes counted in its stream's queue until it is answered.
struct Queued {
    counter: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl NetworkSink {
    /// A sink whose streams run on `runtime`, giving a replica `ack_timeout` to answer each
    /// request (clamped to [`REPLICA_ACK_TIMEOUT_MS_MIN`]..=[`REPLICA_ACK_TIMEOUT_MS_MAX`]).
    pub fn new(runtime: tokio::runtime::Handle, ack_timeout: Duration) -> Arc<NetworkSink> {
        let ack_timeout = ack_timeout.clamp(
            Duration::from_millis(REPLICA_ACK_TIMEOUT_MS_MIN),
            Duration::from_millis(REPLICA_ACK_TIMEOUT_MS_MAX),
        );
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Arc::new(NetworkSink {
            runtime,
            shared: Arc::new(Shared {
                links: OnceLock::new(),
                source: OnceLock::new(),
                joining: Mutex::new(HashMap::new()),
                sessions: AtomicU64::new(clock),
                catch_ups_running: AtomicUsize::new(0),
                ack_timeout,
            }),
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// Gives the sink its network (once; later calls are ignored).
    pub fn bind(&self, links: Arc<dyn ReplicaLinks>) {
        let _ = self.shared.links.set(links);
    }

    /// Starts catching followers up (see the module documentation), cutting snapshots from
    /// `source`, the engine this sink ships for: a task asks the links for candidates every
    /// [`CATCH_UP_SCAN_MS`] while the sink lives.
    pub fn start_catch_up(self: &Arc<Self>, source: Weak<ReplicatingEngine>) {
        if self.shared.source.set(source).is_err() {
            return;
        }
        let sink = Arc::downgrade(self);
        self.runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(CATCH_UP_SCAN_MS));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(sink) = sink.upgrade() else {
                    return;
                };
                let Some(links) = sink.shared.links.get().cloned() else {
                    continue;
                };
                let candidates =
                    match tokio::task::spawn_blocking(move || links.catch_up_candidates()).await {
                        Ok(c) => c,
                        Err(_) => continue,
                    };
                for (node, shard) in candidates {
                    sink.want(node, shard);
                }
                sink.prune_joining();
            }
        });
    }

    /// Forgets joining nodes that are no longer followers of the shard: in its in-sync set now
    /// (which makes them waited for), or no longer placed on it.
    fn prune_joining(&self) {
        let Some(links) = self.shared.links.get() else {
            return;
        };
        let mut joining = (self.shared.joining.lock()).unwrap_or_else(PoisonError::into_inner);
        joining.retain(|&shard, nodes| {
            let followers = links.followers(shard);
            nodes.retain(|n| followers.contains(n));
            !nodes.is_empty()
        });
    }

    /// Asks `node`'s stream to catch it up on `shard` (it ignores the request if it is doing
    /// so already).
    pub fn want(&self, node: NodeId, shard: ShardId) {
        let Some(links) = self.shared.links.get() else {
            return;
        };
        if self.shared.is_joining(node, shard) {
            return;
        }
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let stream = self.stream(&mut streams, node, links);
        let _ = stream.tx.send(vec![Item::Want { shard }]);
    }

    fn stream<'a>(
        &self,
        streams: &'a mut HashMap<NodeId, Stream>,
        node: NodeId,
        links: &Arc<dyn ReplicaLinks>,
    ) -> &'a Stream {
        streams.entry(node).or_insert_with(|| {
            let (tx, rx) = tokio_mpsc::unbounded_channel();
            let queued_bytes = Arc::new(AtomicUsize::new(0));
            self.runtime.spawn(run_stream(
                node,
                rx,
                tx.downgrade(),
                links.clone(),
                self.shared.clone(),
                queued_bytes.clone(),
            ));
            Stream {
                tx,
                queued_bytes,
                unflushed: AtomicBool::new(false),
            }
        })
    }
}

impl ShardLogSink for NetworkSink {
    fn ship(&self, records: Vec<ShardLogRecord>, sync: bool) -> Result<(), ShipError> {
        self.queue(records, sync)?.wait()
    }

    fn queue(&self, records: Vec<ShardLogRecord>, sync: bool) -> Result<Shipping, ShipError> {
        let Some(links) = self.shared.links.get().cloned() else {
            return Ok(Shipping::done());
        };
        let links = &links;
        let (reply, replies) = mpsc::channel();
        let mut expected = 0usize;
        let mut over_bound = false;
        // Nodes in a shard's in-sync set as its record is queued: their acknowledgements
        // confirm nothing (see `ReplicaLinks::in_sync_member`).
        let mut members: HashSet<(NodeId, ShardId)> = HashSet::new();
        {
            let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
            let joining = self
                .shared
                .joining
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Per node, its items, and whether it must have one of them.
            let mut batches: Vec<(NodeId, Vec<Item>, bool)> = Vec::new();
            for record in records {
                let mut nodes = links.must_have(record.shard);
                for &n in joining.get(&record.shard).into_iter().flatten() {
                    if !nodes.contains(&n) {
                        nodes.push(n);
                    }
                }
                let must = nodes.len();
                for n in links.followers(record.shard) {
                    if !nodes.contains(&n) {
                        nodes.push(n);
                    }
                }
                if nodes.is_empty() {
                    continue;
                }
                let encoded = Arc::new(Encoded {
                    shard: record.shard,
                    lsn: record.lsn,
                    bytes: record.encode(),
                });
                for (i, node) in nodes.into_iter().enumerate() {
                    let must_have = i < must;
                    if must_have && sync && links.in_sync_member(node, record.shard) {
                        members.insert((node, record.shard));
                    }
                    let stream = self.stream(&mut streams, node, links);
                    let bytes = encoded.bytes.len();
                    let queued = stream.queued_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
                    if !must_have && queued > REPLICA_QUEUE_BYTES_MAX {
                        // A follower that does not keep up misses the record, and is caught up
                        // again; its queue stays bounded.
                        stream.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                        continue;
                    }
                    over_bound |= must_have && queued > REPLICA_QUEUE_BYTES_MAX;
                    if must_have && !sync {
                        stream.unflushed.store(true, Ordering::Relaxed);
                    }
                    let item = Item::Record {
                        record: encoded.clone(),
                        reply: must_have.then(|| reply.clone()),
                        synced: sync,
                        _queued: Queued {
                            counter: stream.queued_bytes.clone(),
                            bytes,
                        },
                    };
                    match batches.iter_mut().find(|(n, _, _)| *n == node) {
                        Some((_, items, any_must)) => {
                            items.push(item);
                            *any_must |= must_have;
                        }
                        None => batches.push((node, vec![item], must_have)),
                    }
                    if must_have {
                        expected += 1;
                    }
                }
            }
            drop(joining);
            if sync {
                // Records shipped unsynced earlier to nodes that must have them are waited for
                // with this write, as they are made durable with it locally.
                for (&node, stream) in streams.iter() {
                    let covered = batches.iter().any(|(n, _, must)| *n == node && *must);
                    if !covered && stream.unflushed.swap(false, Ordering::Relaxed) {
                        let item = Item::Flush {
                            reply: reply.clone(),
                        };
                        match batches.iter_mut().find(|(n, _, _)| *n == node) {
                            Some((_, items, _)) => items.push(item),
                            None => batches.push((node, vec![item], true)),
                        }
                        expected += 1;
                    }
                }
            }
            for (node, items, _) in batches {
                let sent = streams.get(&node).map(|s| s.tx.send(items).is_ok());
                if sent != Some(true) {
                    return Err(ShipError(format!("the stream to node {node} has stopped")));
                }
            }
        }
        drop(reply);
        if !sync && !over_bound {
            return Ok(Shipping::done());
        }
        let (links, shared) = (links.clone(), self.shared.clone());
        Ok(Shipping::waiting(move || {
            wait_for_replicas(&replies, expected, sync, &members, &*links, &shared)
        }))
    }
}

/// The waiting half of [`NetworkSink::queue`]: `expected` answers on `replies`, then the
/// in-sync sets brought in line with them.
fn wait_for_replicas(
    replies: &mpsc::Receiver<(NodeId, Vec<ShardId>, Result<(), String>)>,
    expected: usize,
    sync: bool,
    members: &HashSet<(NodeId, ShardId)>,
    links: &dyn ReplicaLinks,
    shared: &Shared,
) -> Result<(), ShipError> {
    // Every answer, not just up to the first failure: when `ship` returns, no record of
    // this call is still on its way.
    let mut first_error = None;
    let mut applied: HashMap<NodeId, Vec<ShardId>> = HashMap::new();
    let mut missing: HashMap<NodeId, (Vec<ShardId>, String)> = HashMap::new();
    for _ in 0..expected {
        match replies.recv() {
            Ok((node, shards, Ok(()))) => applied.entry(node).or_default().extend(shards),
            Ok((node, shards, Err(e))) if shards.is_empty() => {
                first_error.get_or_insert(format!("replica node {node}: {e}"));
            }
            Ok((node, shards, Err(e))) => {
                let (missed, _) = missing.entry(node).or_insert_with(|| (Vec::new(), e));
                missed.extend(shards);
            }
            // Every reply sender is gone: nothing more will come.
            Err(_) => {
                first_error.get_or_insert("a replica stream stopped".to_owned());
                break;
            }
        }
    }
    if sync {
        for (node, mut shards) in applied {
            shards.retain(|&shard| !members.contains(&(node, shard)));
            if shards.is_empty() {
                continue;
            }
            if let Err(e) = links.confirm_in_sync(node, shards) {
                first_error.get_or_insert(format!("replica node {node}: {e}"));
            }
        }
    }
    // A replica that lacks records is dropped from the shards' in-sync sets; only if that
    // fails does the write fail (the rest of the set has the records). A joining node
    // stops joining: its catch-up starts over.
    for (node, (mut shards, e)) in missing {
        shards.sort_unstable();
        shards.dedup();
        for &shard in &shards {
            shared.leave_joining(node, shard);
        }
        if let Err(why) = links.drop_from_in_sync(node, shards) {
            warn!(replica = node, error = %why, "cannot drop a failed replica from the in-sync sets");
            first_error.get_or_insert(format!("replica node {node}: {e}"));
        }
    }
    first_error.map_or(Ok(()), |e| Err(ShipError(e)))
}

/// One replica node's stream: sends what is queued, a frame at a time, answers each item, and
/// runs the node's catch-ups.
async fn run_stream(
    node: NodeId,
    mut rx: tokio_mpsc::UnboundedReceiver<Vec<Item>>,
    tx: tokio_mpsc::WeakUnboundedSender<Vec<Item>>,
    links: Arc<dyn ReplicaLinks>,
    shared: Arc<Shared>,
    queued_bytes: Arc<AtomicUsize>,
) {
    let timeout = shared.ack_timeout;
    let mut queue: VecDeque<Item> = VecDeque::new();
    // Bytes of the front record already sent in earlier frames.
    let mut sent = 0usize;
    // Why something unsynced failed since the last flush, if it did, and the shards it was of.
    let mut failed: Option<(String, Vec<ShardId>)> = None;
    let mut catch_ups = CatchUps {
        node,
        links: links.clone(),
        shared,
        tx,
        queued_bytes,
        active: HashMap::new(),
        waiting: VecDeque::new(),
        queued: HashSet::new(),
        retry_after: HashMap::new(),
    };
    // Until when the node counts as down, and why (see REPLICA_DOWN_MS).
    let mut down: Option<(Instant, String)> = None;
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(items) => catch_ups.intake(items, &mut queue),
                None => return,
            }
        }
        while let Ok(items) = rx.try_recv() {
            catch_ups.intake(items, &mut queue);
        }
        catch_ups.start();
        let (parts, finished) = pack(&mut queue, &mut sent);
        if parts.is_empty() {
            answer(node, finished, None, &mut failed, &mut catch_ups);
            continue;
        }
        down = down.filter(|(until, _)| Instant::now() < *until);
        let result = match &down {
            Some((_, why)) => Err(format!("the node is unreachable ({why})")),
            None => {
                match tokio::time::timeout(timeout, links.replicate(node, parts, timeout)).await {
                    Ok(Ok(answers)) => Ok(answers),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
                }
            }
        };
        match result {
            Ok(answers) => answer(node, finished, Some(&answers), &mut failed, &mut catch_ups),
            Err(e) => {
                if down.is_none() {
                    warn!(replica = node, error = %e, "replicating to a node failed");
                    let until = Instant::now() + Duration::from_millis(REPLICA_DOWN_MS);
                    down = Some((until, e.clone()));
                }
                let mut lost = finished;
                if sent > 0 {
                    // The front record's parts so far are lost with this frame: fail it too.
                    sent = 0;
                    lost.extend(queue.pop_front());
                }
                for item in lost {
                    match item {
                        Item::Record {
                            synced: false,
                            reply: Some(_),
                            ref record,
                            ..
                        } => note_failed(&mut failed, &e, record.shard),
                        Item::Chunk {
                            ref record,
                            session,
                            ..
                        } if catch_ups.in_session(record.shard, session) => {
                            catch_ups.abandon(record.shard, &e);
                        }
                        _ => {}
                    }
                    reply_to(node, item, Err(e.clone()));
                }
            }
        }
        catch_ups.cut_next();
    }
}

/// The catch-ups of one replica node (see the module documentation), run by its stream.
struct CatchUps {
    node: NodeId,
    links: Arc<dyn ReplicaLinks>,
    shared: Arc<Shared>,
    /// The stream's own queue, for the cuts (weak: the stream ends when the sink drops it).
    tx: tokio_mpsc::WeakUnboundedSender<Vec<Item>>,
    queued_bytes: Arc<AtomicUsize>,
    /// At most [`CATCH_UPS_PER_REPLICA`].
    active: HashMap<ShardId, Active>,
    /// Wanted, in order; each shard once.
    waiting: VecDeque<ShardId>,
    /// The shards in `waiting`: every scan wants every follower again, so finding one must not
    /// cost a pass over the queue.
    queued: HashSet<ShardId>,
    /// Shards whose last catch-up failed: when they may start over, and how many failed in a
    /// row (a finished catch-up clears its shard). At most one entry per shard.
    retry_after: HashMap<ShardId, Backoff>,
}

impl Drop for CatchUps {
    /// A replica node's stream that ends gives back the slots of its catch-ups.
    fn drop(&mut self) {
        self.shared.release_catch_up_slots(self.active.len());
    }
}

/// A shard's failed catch-ups in a row, and when the next may start.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    failures: u32,
}

/// One shard's catch-up in progress.
struct Active {
    session: u64,
    /// Where the next chunk starts (`None` before the first).
    cursor: Option<Cursor>,
    /// The index of the next chunk to cut.
    next_index: u32,
    /// A cut is under way (cuts are one at a time: each starts where the last stopped).
    cutting: bool,
    /// Chunks queued or in flight, not answered yet.
    in_flight: usize,
    /// The last chunk has been cut.
    cut_all: bool,
    chunks: u64,
    bytes: u64,
    since: Instant,
}

impl CatchUps {
    /// Takes a message from the sink (or from a cut) into the stream.
    fn intake(&mut self, items: Vec<Item>, queue: &mut VecDeque<Item>) {
        for item in items {
            match item {
                Item::Want { shard } => {
                    let later = self
                        .retry_after
                        .get(&shard)
                        .is_some_and(|b| b.until > Instant::now());
                    if !later && !self.active.contains_key(&shard) && !self.queued.contains(&shard)
                    {
                        self.waiting.push_back(shard);
                        self.queued.insert(shard);
                    }
                }
                Item::CutFailed {
                    shard,
                    session,
                    error,
                } => {
                    if self
                        .active
                        .get(&shard)
                        .is_some_and(|a| a.session == session)
                    {
                        self.abandon(shard, &error);
                    }
                }
                // A follower's record of a shard whose snapshot is not cut yet: the snapshot
                // holds it.
                Item::Record {
                    reply: None,
                    ref record,
                    ..
                } if (self.active.get(&record.shard)).is_some_and(|a| a.next_index == 0) => {}
                Item::Chunk {
                    ref record,
                    session,
                    ref next,
                    ..
                } => {
                    let shard = record.shard;
                    match self.active.get_mut(&shard) {
                        Some(a) if a.session == session => {
                            a.cutting = false;
                            a.next_index += 1;
                            a.in_flight += 1;
                            a.cut_all = next.is_none();
                            a.cursor = next.clone();
                            a.chunks += 1;
                            a.bytes += record.bytes.len() as u64;
                            queue.push_back(item);
                        }
                        // A session abandoned meanwhile: its last cut made the node joining.
                        _ if next.is_none() => self.shared.leave_joining(self.node, shard),
                        _ => {}
                    }
                }
                other => queue.push_back(other),
            }
        }
    }

    /// Whether `shard`'s catch-up under way is `session`.
    fn in_session(&self, shard: ShardId, session: u64) -> bool {
        self.active
            .get(&shard)
            .is_some_and(|a| a.session == session)
    }

    /// Starts waiting catch-ups while fewer than [`CATCH_UPS_PER_REPLICA`] run for this node
    /// and fewer than [`CATCH_UPS_PER_NODE`] for all of them; one left waiting is started by a
    /// later call (the next scan's candidates bring one).
    fn start(&mut self) {
        while self.active.len() < CATCH_UPS_PER_REPLICA && !self.waiting.is_empty() {
            if !self.shared.take_catch_up_slot() {
                break;
            }
            let Some(shard) = self.waiting.pop_front() else {
                self.shared.release_catch_up_slots(1);
                break;
            };
            self.queued.remove(&shard);
            if self.shared.is_joining(self.node, shard)
                || !self.links.may_catch_up(self.node, shard)
            {
                self.shared.release_catch_up_slots(1);
                continue;
            }
            let session = self.shared.sessions.fetch_add(1, Ordering::Relaxed);
            debug!(replica = self.node, shard, session, "catching a replica up");
            self.active.insert(
                shard,
                Active {
                    session,
                    cursor: None,
                    next_index: 0,
                    cutting: false,
                    in_flight: 0,
                    cut_all: false,
                    chunks: 0,
                    bytes: 0,
                    since: Instant::now(),
                },
            );
        }
        self.cut_next();
    }

    /// Asks for the next chunk of every catch-up that has room for one in flight.
    fn cut_next(&mut self) {
        let ready =
            |a: &Active| !a.cutting && !a.cut_all && a.in_flight < CATCH_UP_CHUNKS_IN_FLIGHT;
        for (&shard, a) in self.active.iter_mut().filter(|(_, a)| ready(a)) {
            a.cutting = true;
            let cut = Cut {
                node: self.node,
                shard,
                session: a.session,
                index: a.next_index,
                cursor: a.cursor.clone(),
                shared: self.shared.clone(),
                tx: self.tx.clone(),
                queued_bytes: self.queued_bytes.clone(),
            };
            tokio::task::spawn_blocking(move || cut.run());
        }
    }

    /// A chunk of `shard`'s catch-up `session` was answered with `outcome` (the shard's state
    /// after the whole request, which may hold later chunks too).
    fn answered(
        &mut self,
        shard: ShardId,
        session: u64,
        chunk_lsn: u64,
        last: bool,
        outcome: Option<&ReplicaOutcome>,
    ) {
        if !self.in_session(shard, session) {
            return; // abandoned: its chunks' answers no longer matter
        }
        let ok = match outcome {
            Some(ReplicaOutcome::Applied { lsn }) => *lsn >= chunk_lsn,
            Some(ReplicaOutcome::Catching { lsn }) => !last && *lsn >= chunk_lsn,
            _ => false,
        };
        if !ok {
            let why = match outcome {
                Some(o) => format!("the snapshot chunk was answered with {o:?}"),
                None => "no answer for the snapshot chunk".to_owned(),
            };
            self.abandon(shard, &why);
            return;
        }
        if !last {
            if let Some(a) = self.active.get_mut(&shard) {
                a.in_flight = a.in_flight.saturating_sub(1);
            }
            return;
        }
        let Some(a) = self.active.remove(&shard) else {
            return;
        };
        self.shared.release_catch_up_slots(1);
        self.retry_after.remove(&shard);
        let stats = CatchUpStats {
            chunks: a.chunks,
            bytes: a.bytes,
            elapsed: a.since.elapsed(),
        };
        let (links, node) = (self.links.clone(), self.node);
        tokio::task::spawn_blocking(move || links.caught_up(node, shard, stats));
    }

    /// Gives up `shard`'s catch-up; it may start over after [`catch_up_retry_delay`].
    fn abandon(&mut self, shard: ShardId, why: &str) {
        if self.active.remove(&shard).is_none() {
            return;
        }
        self.shared.release_catch_up_slots(1);
        self.shared.leave_joining(self.node, shard);
        let failures = self
            .retry_after
            .get(&shard)
            .map_or(1, |b| b.failures.saturating_add(1));
        let until = Instant::now() + catch_up_retry_delay(failures, rand::random::<f64>());
        self.retry_after.insert(shard, Backoff { until, failures });
        self.links.catch_up_failed(self.node, shard, why);
    }
}

/// Cutting one snapshot chunk, on a blocking thread.
struct Cut {
    node: NodeId,
    shard: ShardId,
    session: u64,
    index: u32,
    cursor: Option<Cursor>,
    shared: Arc<Shared>,
    tx: tokio_mpsc::WeakUnboundedSender<Vec<Item>>,
    queued_bytes: Arc<AtomicUsize>,
}

impl Cut {
    fn run(self) {
        let send = |items: Vec<Item>| {
            if let Some(tx) = self.tx.upgrade() {
                let _ = tx.send(items);
            }
        };
        let failed = |error: String| {
            vec![Item::CutFailed {
                shard: self.shard,
                session: self.session,
                error,
            }]
        };
        let Some(engine) = self.shared.source.get().and_then(Weak::upgrade) else {
            send(failed("the node is stopping".to_owned()));
            return;
        };
        let mut emit = |position: super::Position, epoch: u64, chunk: Chunk| {
            let last = chunk.next.is_none();
            let record = ShardLogRecord {
                shard: self.shard,
                lsn: position.lsn,
                epoch,
                base_epoch: position.epoch,
                ops: chunk.rows.into_iter().filter_map(row_op).collect(),
                kind: RecordKind::Snapshot {
                    session: self.session,
                    index: self.index,
                    last,
                },
            };
            if let Err(e) = record.check() {
                send(failed(e.to_string()));
                return;
            }
            let bytes = record.encode();
            if last {
                // From here on every record of the shard goes to the node and is waited for.
                let mut joining =
                    (self.shared.joining.lock()).unwrap_or_else(PoisonError::into_inner);
                let nodes = joining.entry(self.shard).or_default();
                if !nodes.contains(&self.node) {
                    nodes.push(self.node);
                }
            }
            self.queued_bytes.fetch_add(bytes.len(), Ordering::Relaxed);
            let queued = Queued {
                counter: self.queued_bytes.clone(),
                bytes: bytes.len(),
            };
            send(vec![Item::Chunk {
                record: Arc::new(Encoded {
                    shard: self.shard,
                    lsn: position.lsn,
                    bytes,
                }),
                session: self.session,
                next: chunk.next,
                _queued: queued,
            }]);
        };
        if let Err(e) = engine.cut(
            self.shard,
            self.cursor.as_ref(),
            CATCH_UP_CHUNK_BYTES,
            &mut emit,
        ) {
            send(failed(e.to_string()));
        }
    }
}

/// A snapshot row as the put that writes it.
fn row_op(row: crate::handoff::Row) -> Option<crate::storage::Op> {
    let cf = row.column_family()?;
    Some(crate::storage::Op::Put {
        cf,
        key: row.key,
        value: row.value,
    })
}

/// Takes from the front of `queue` what fits in one request: the parts, and the items finished
/// by it (records whose last part is in it, and the flushes between them).
fn pack(queue: &mut VecDeque<Item>, sent: &mut usize) -> (Vec<RecordPart>, Vec<Item>) {
    let mut parts = Vec::new();
    let mut finished = Vec::new();
    let mut bytes = 0usize;
    while let Some(front) = queue.front() {
        let record = match front {
            Item::Record { record, .. } | Item::Chunk { record, .. } => record.clone(),
            Item::Flush { .. } | Item::Want { .. } | Item::CutFailed { .. } => {
                finished.extend(queue.pop_front());
                continue;
            }
        };
        let room = REPLICATE_FRAME_BYTES_MAX.saturating_sub(bytes + PART_HEADER_BYTES_MAX);
        let left = record.bytes.len() - *sent;
        if parts.len() == REPLICATE_PARTS_MAX
            || (!parts.is_empty() && left > room && room < PART_BYTES_MIN)
        {
            break;
        }
        let take = left.min(room);
        parts.push(RecordPart {
            shard: record.shard,
            lsn: record.lsn,
            total_bytes: u32::try_from(record.bytes.len()).unwrap_or(u32::MAX),
            offset: u32::try_from(*sent).unwrap_or(u32::MAX),
            bytes: record.bytes[*sent..*sent + take].to_vec(),
        });
        bytes += PART_HEADER_BYTES_MAX + take;
        *sent += take;
        if *sent < record.bytes.len() {
            break; // the frame is full; the record continues in the next
        }
        *sent = 0;
        finished.extend(queue.pop_front());
    }
    (parts, finished)
}

/// Answers the items a request finished, from the replica's `answers` (`None`: no request was
/// needed, only flushes).
fn answer(
    node: NodeId,
    finished: Vec<Item>,
    answers: Option<&[ShardAnswer]>,
    failed: &mut Option<(String, Vec<ShardId>)>,
    catch_ups: &mut CatchUps,
) {
    let outcome_of = |shard: ShardId| {
        answers
            .and_then(|a| a.iter().find(|a| a.shard == shard))
            .map(|a| &a.outcome)
    };
    // Refused records, logged once per answer: a replica that lacks a record refuses every
    // later one of the shard as a gap, and one line each (the million's reconnect storm wrote
    // 198,302 in two minutes) buries the first, which says why.
    let mut refused: Option<(ShardId, u64, String)> = None;
    let mut refused_count = 0u64;
    for item in finished {
        match item {
            // A follower's record: nobody waits, and a follower that misses one is caught up.
            Item::Record { reply: None, .. } => {}
            Item::Record {
                ref record, synced, ..
            } => {
                let result = match outcome_of(record.shard) {
                    Some(ReplicaOutcome::Applied { lsn }) if *lsn >= record.lsn => Ok(()),
                    Some(other) => Err(describe(record, other)),
                    None => Err(format!("no answer for shard {}", record.shard)),
                };
                if let Err(e) = &result {
                    refused_count += 1;
                    refused.get_or_insert_with(|| (record.shard, record.lsn, e.clone()));
                    if !synced {
                        note_failed(failed, e, record.shard);
                    }
                }
                reply_to(node, item, result);
            }
            Item::Chunk {
                ref record,
                session,
                ref next,
                ..
            } => {
                let last = next.is_none();
                let outcome = outcome_of(record.shard);
                catch_ups.answered(record.shard, session, record.lsn, last, outcome);
            }
            Item::Flush { .. } => {
                let (result, shards) = match failed.take() {
                    Some((e, shards)) => (Err(e), shards),
                    None => (Ok(()), Vec::new()),
                };
                reply_flush(node, item, shards, result);
            }
            Item::Want { .. } | Item::CutFailed { .. } => {}
        }
    }
    if let Some((shard, lsn, e)) = refused {
        warn!(replica = node, shard, lsn, records = refused_count, error = %e,
            "a replica did not apply records (the first is named)");
    }
}

fn describe(record: &Encoded, outcome: &ReplicaOutcome) -> String {
    let (shard, lsn) = (record.shard, record.lsn);
    match outcome {
        ReplicaOutcome::Applied { lsn: applied } => {
            format!("shard {shard}: record {lsn} not applied (the copy is at {applied})")
        }
        ReplicaOutcome::Catching { lsn: applied } => {
            format!("shard {shard}: record {lsn} reached a copy that is catching up (at {applied})")
        }
        ReplicaOutcome::Gap { applied, needs } => {
            format!("shard {shard}: the copy is at {applied} and needs record {needs}")
        }
        ReplicaOutcome::StaleEpoch { applied_epoch } => {
            format!("shard {shard}: the copy is at epoch {applied_epoch}, after this primary's")
        }
        ReplicaOutcome::Diverged {
            applied_lsn,
            applied_epoch,
        } => format!(
            "shard {shard}: the copy holds records up to {applied_lsn} of epoch \
             {applied_epoch} that this primary does not"
        ),
        ReplicaOutcome::Failed { reason } => format!("shard {shard}: {reason}"),
    }
}

fn reply_to(node: NodeId, item: Item, result: Result<(), String>) {
    reply_flush(node, item, Vec::new(), result);
}

/// Answers an item; a record answers for its own shard, a flush for `shards`.
fn reply_flush(node: NodeId, item: Item, shards: Vec<ShardId>, result: Result<(), String>) {
    let (reply, shards) = match item {
        Item::Record {
            reply: Some(reply),
            record,
            ..
        } => (reply, vec![record.shard]),
        Item::Flush { reply } => (reply, shards),
        _ => return,
    };
    // The ship call may have returned already (an unsynced write, or an earlier failure).
    let _ = reply.send((node, shards, result));
}

/// Remembers that an unsynced record of `shard` failed, for the next flush to report.
fn note_failed(failed: &mut Option<(String, Vec<ShardId>)>, e: &str, shard: ShardId) {
    let (_, shards) = failed.get_or_insert_with(|| (e.to_owned(), Vec::new()));
    if !shards.contains(&shard) {
        shards.push(shard);
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    #[test]
    fn catch_up_retries_double_up_to_the_cap_with_jitter_in_the_upper_half() {
        let ms = |f, j| catch_up_retry_delay(f, j).as_millis() as u64;
        assert_eq!(ms(1, 1.0), CATCH_UP_RETRY_MS);
        assert_eq!(ms(1, 0.0), CATCH_UP_RETRY_MS / 2);
        assert_eq!(ms(2, 1.0), 2 * CATCH_UP_RETRY_MS);
        assert_eq!(ms(4, 1.0), 8 * CATCH_UP_RETRY_MS);
        assert_eq!(ms(40, 1.0), CATCH_UP_RETRY_MAX_MS);
        assert_eq!(ms(u32::MAX, 0.5), CATCH_UP_RETRY_MAX_MS * 3 / 4);
        assert_eq!(ms(0, 1.0), CATCH_UP_RETRY_MS, "0 counts as the first");
    }

    /// The ack timeout a node is given is kept within its bounds.
    #[tokio::test]
    async fn the_ack_timeout_is_clamped_to_its_bounds() {
        let timeout = |ms| {
            let sink =
                NetworkSink::new(tokio::runtime::Handle::current(), Duration::from_millis(ms));
            sink.shared.ack_timeout.as_millis() as u64
        };
        assert_eq!(timeout(0), REPLICA_ACK_TIMEOUT_MS_MIN);
        assert_eq!(timeout(10_000), 10_000);
        assert_eq!(timeout(u64::MAX / 2), REPLICA_ACK_TIMEOUT_MS_MAX);
    }

    /// However many replica nodes ask, at most `CATCH_UPS_PER_NODE` catch-ups hold a slot, and
    /// a released slot is taken again.
    #[tokio::test]
    async fn catch_up_slots_are_bounded_per_node() {
        let sink = NetworkSink::new(
            tokio::runtime::Handle::current(),
            Duration::from_millis(REPLICA_ACK_TIMEOUT_MS),
        );
        let shared = &sink.shared;
        let taken = (0..CATCH_UPS_PER_NODE * 4)
            .filter(|_| shared.take_catch_up_slot())
            .count();
        assert_eq!(taken, CATCH_UPS_PER_NODE);
        assert!(!shared.take_catch_up_slot());
        shared.release_catch_up_slots(2);
        assert!(shared.take_catch_up_slot());
        assert!(shared.take_catch_up_slot());
        assert!(!shared.take_catch_up_slot());
    }
}
