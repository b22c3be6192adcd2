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
//! fails. A replica that does not answer a request within [`REPLICA_ACK_TIMEOUT_MS`] fails
//! every record of that request: the write is refused (nothing is acknowledged; a client
//! retries, and its retry is deduplicated). An unsynced write (acknowledged floors) does not
//! wait: its records ride with the next batch, unless a queue holds more than
//! [`REPLICA_QUEUE_BYTES_MAX`], when it waits too (back-pressure).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use ringpost_coordinator::NodeId;
use tokio::sync::mpsc as tokio_mpsc;
use tracing::warn;

use super::engine::{ShardLogSink, ShipError};
use super::part::{
    RecordPart, PART_BYTES_MIN, PART_HEADER_BYTES_MAX, REPLICATE_FRAME_BYTES_MAX,
    REPLICATE_PARTS_MAX,
};
use super::record::ShardLogRecord;
use super::serve::{ReplicaOutcome, ShardAnswer};
use crate::shard::ShardId;

/// How long a replica has to answer one `Replicate` request before the records in it are
/// failed (and with them the writes waiting for them). Twice a slow fsync plus a round trip
/// with a margin; the in-sync set (next step) will drop such a replica instead of failing.
pub const REPLICA_ACK_TIMEOUT_MS: u64 = 2_000;
/// Encoded record bytes queued for one replica node beyond which even an unsynced write waits
/// for its records. Memory: this much per replica node, plus one ship call's records.
pub const REPLICA_QUEUE_BYTES_MAX: usize = 64 * 1024 * 1024;

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
    links: OnceLock<Arc<dyn ReplicaLinks>>,
    /// One per replica node ever shipped to (a stream of a node that left idles, costing a
    /// parked task).
    streams: Mutex<HashMap<NodeId, Stream>>,
}

struct Stream {
    /// One message per ship call, so that a call's records for the node go in one request.
    tx: tokio_mpsc::UnboundedSender<Vec<Item>>,
    queued_bytes: Arc<AtomicUsize>,
}

/// What a ship call learns of one of its items: the node, the shards it is about (a record's
/// own; for a flush, those of the unsynced records that failed since the last one), and
/// whether the node has them.
type Reply = mpsc::Sender<(NodeId, Vec<ShardId>, Result<(), String>)>;

enum Item {
    /// A record for the node; `reply` once it is applied or failed. `synced`: its ship call
    /// waits for the reply (else a failure is kept for the next flush to report).
    Record {
        record: Arc<Encoded>,
        reply: Reply,
        synced: bool,
        _queued: Queued,
    },
    /// `reply` once everything queued before has been answered (`Err` if an unsynced record
    /// failed since the last flush): a synced write with no records of this node's.
    Flush { reply: Reply },
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
    /// A sink whose streams run on `runtime`.
    pub fn new(runtime: tokio::runtime::Handle) -> Arc<NetworkSink> {
        Arc::new(NetworkSink {
            runtime,
            links: OnceLock::new(),
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// Gives the sink its network (once; later calls are ignored).
    pub fn bind(&self, links: Arc<dyn ReplicaLinks>) {
        let _ = self.links.set(links);
    }

    fn stream<'a>(
        &self,
        streams: &'a mut HashMap<NodeId, Stream>,
        node: NodeId,
        links: &Arc<dyn ReplicaLinks>,
    ) -> &'a Stream {
        streams.entry(node).or_insert_with(|| {
            let (tx, rx) = tokio_mpsc::unbounded_channel();
            self.runtime.spawn(run_stream(node, rx, links.clone()));
            Stream {
                tx,
                queued_bytes: Arc::new(AtomicUsize::new(0)),
            }
        })
    }
}

impl ShardLogSink for NetworkSink {
    fn ship(&self, records: Vec<ShardLogRecord>, sync: bool) -> Result<(), ShipError> {
        let Some(links) = self.links.get() else {
            return Ok(());
        };
        let (reply, replies) = mpsc::channel();
        let mut expected = 0usize;
        let mut over_bound = false;
        {
            let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
            let mut batches: Vec<(NodeId, Vec<Item>)> = Vec::new();
            for record in records {
                let nodes = links.must_have(record.shard);
                if nodes.is_empty() {
                    continue;
                }
                let encoded = Arc::new(Encoded {
                    shard: record.shard,
                    lsn: record.lsn,
                    bytes: record.encode(),
                });
                for node in nodes {
                    let stream = self.stream(&mut streams, node, links);
                    let bytes = encoded.bytes.len();
                    let queued = stream.queued_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
                    over_bound |= queued > REPLICA_QUEUE_BYTES_MAX;
                    let item = Item::Record {
                        record: encoded.clone(),
                        reply: reply.clone(),
                        synced: sync,
                        _queued: Queued {
                            counter: stream.queued_bytes.clone(),
                            bytes,
                        },
                    };
                    match batches.iter_mut().find(|(n, _)| *n == node) {
                        Some((_, items)) => items.push(item),
                        None => batches.push((node, vec![item])),
                    }
                    expected += 1;
                }
            }
            if sync {
                // Records shipped unsynced earlier to other nodes become durable with this
                // write, as they do locally.
                for &node in streams.keys() {
                    if batches.iter().all(|(n, _)| *n != node) {
                        let item = Item::Flush {
                            reply: reply.clone(),
                        };
                        batches.push((node, vec![item]));
                        expected += 1;
                    }
                }
            }
            for (node, items) in batches {
                let sent = streams.get(&node).map(|s| s.tx.send(items).is_ok());
                if sent != Some(true) {
                    return Err(ShipError(format!("the stream to node {node} has stopped")));
                }
            }
        }
        drop(reply);
        if !sync && !over_bound {
            return Ok(());
        }
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
            for (node, shards) in applied {
                if let Err(e) = links.confirm_in_sync(node, shards) {
                    first_error.get_or_insert(format!("replica node {node}: {e}"));
                }
            }
        }
        // A replica that lacks records is dropped from the shards' in-sync sets; only if that
        // fails does the write fail (the rest of the set has the records).
        for (node, (mut shards, e)) in missing {
            shards.sort_unstable();
            shards.dedup();
            if let Err(why) = links.drop_from_in_sync(node, shards) {
                warn!(replica = node, error = %why, "cannot drop a failed replica from the in-sync sets");
                first_error.get_or_insert(format!("replica node {node}: {e}"));
            }
        }
        first_error.map_or(Ok(()), |e| Err(ShipError(e)))
    }
}

/// One replica node's stream: sends what is queued, a frame at a time, and answers each item.
async fn run_stream(
    node: NodeId,
    mut rx: tokio_mpsc::UnboundedReceiver<Vec<Item>>,
    links: Arc<dyn ReplicaLinks>,
) {
    let timeout = Duration::from_millis(REPLICA_ACK_TIMEOUT_MS);
    let mut queue: VecDeque<Item> = VecDeque::new();
    // Bytes of the front record already sent in earlier frames.
    let mut sent = 0usize;
    // Why something unsynced failed since the last flush, if it did, and the shards it was of.
    let mut failed: Option<(String, Vec<ShardId>)> = None;
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(items) => queue.extend(items),
                None => return,
            }
        }
        while let Ok(items) = rx.try_recv() {
            queue.extend(items);
        }
        let (parts, finished) = pack(&mut queue, &mut sent);
        if parts.is_empty() {
            answer(node, finished, None, &mut failed);
            continue;
        }
        let result =
            match tokio::time::timeout(timeout, links.replicate(node, parts, timeout)).await {
                Ok(Ok(answers)) => Ok(answers),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!("no answer within {REPLICA_ACK_TIMEOUT_MS} ms")),
            };
        match result {
            Ok(answers) => answer(node, finished, Some(&answers), &mut failed),
            Err(e) => {
                warn!(replica = node, error = %e, "replicating to a node failed");
                let mut lost = finished;
                if sent > 0 {
                    // The front record's parts so far are lost with this frame: fail it too.
                    sent = 0;
                    lost.extend(queue.pop_front());
                }
                for item in lost {
                    if let Item::Record {
                        synced: false,
                        ref record,
                        ..
                    } = item
                    {
                        note_failed(&mut failed, &e, record.shard);
                    }
                    reply_to(node, item, Err(e.clone()));
                }
            }
        }
    }
}

/// Takes from the front of `queue` what fits in one request: the parts, and the items finished
/// by it (records whose last part is in it, and the flushes between them).
fn pack(queue: &mut VecDeque<Item>, sent: &mut usize) -> (Vec<RecordPart>, Vec<Item>) {
    let mut parts = Vec::new();
    let mut finished = Vec::new();
    let mut bytes = 0usize;
    while let Some(front) = queue.front() {
        let record = match front {
            Item::Flush { .. } => {
                finished.extend(queue.pop_front());
                continue;
            }
            Item::Record { record, .. } => record.clone(),
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
) {
    for item in finished {
        match item {
            Item::Record {
                ref record, synced, ..
            } => {
                let outcome = answers
                    .and_then(|a| a.iter().find(|a| a.shard == record.shard))
                    .map(|a| &a.outcome);
                let result = match outcome {
                    Some(ReplicaOutcome::Applied { lsn }) if *lsn >= record.lsn => Ok(()),
                    Some(other) => Err(describe(record, other)),
                    None => Err(format!("no answer for shard {}", record.shard)),
                };
                if let Err(e) = &result {
                    warn!(replica = node, shard = record.shard, lsn = record.lsn, error = %e,
                        "a replica did not apply a record");
                    if !synced {
                        note_failed(failed, e, record.shard);
                    }
                }
                reply_to(node, item, result);
            }
            Item::Flush { .. } => {
                let (result, shards) = match failed.take() {
                    Some((e, shards)) => (Err(e), shards),
                    None => (Ok(()), Vec::new()),
                };
                reply_flush(node, item, shards, result);
            }
        }
    }
}

fn describe(record: &Encoded, outcome: &ReplicaOutcome) -> String {
    let (shard, lsn) = (record.shard, record.lsn);
    match outcome {
        ReplicaOutcome::Applied { lsn: applied } => {
            format!("shard {shard}: record {lsn} not applied (the copy is at {applied})")
        }
        ReplicaOutcome::Gap { applied, needs } => format!(
            "shard {shard}: the copy is at {applied} and needs record {needs} (catch-up is \
             not built yet)"
        ),
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
        Item::Record { reply, record, .. } => (reply, vec![record.shard]),
        Item::Flush { reply } => (reply, shards),
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
