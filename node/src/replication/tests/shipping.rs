//! The network sink against in-process replicas on real RocksDB, reached through
//! [`ReplicaLinks`] that encode every request as a peer frame (checked against the frame bound)
//! and serve it with [`serve_parts`], as a replica node does.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use ringpost_coordinator::NodeId;

use super::*;
use crate::peer::link::PEER_FRAME_BYTES_MAX;
use crate::peer::{encode_request, Envelope, PeerRequest};
use crate::replication::sink::{REPLICA_ACK_TIMEOUT_MS, REPLICA_DOWN_MS};
use crate::replication::{
    read_position, serve_parts, NetworkSink, Reassembly, RecordPart, ReplicaLinks,
    ReplicatingEngine, ShardAnswer,
};
use crate::storage::{key, Cf, StorageError, WriteBatch};

/// Replica nodes in this process; shard `s` is placed on `placement[s]` besides the primary.
struct Local {
    placement: HashMap<ShardId, Vec<NodeId>>,
    replicas: HashMap<NodeId, Arc<dyn Engine>>,
    assembly: Arc<Mutex<HashMap<NodeId, Reassembly>>>,
    /// Nodes that take requests and never answer.
    silent: Mutex<HashSet<NodeId>>,
    /// Per request: the node and how many parts.
    requests: Mutex<Vec<(NodeId, usize)>>,
}

impl ReplicaLinks for Local {
    fn must_have(&self, shard: ShardId) -> Vec<NodeId> {
        self.placement.get(&shard).cloned().unwrap_or_default()
    }

    fn replicate(
        &self,
        node: NodeId,
        parts: Vec<RecordPart>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<ShardAnswer>, String>> {
        self.requests.lock().unwrap().push((node, parts.len()));
        let frame = encode_request(7, PeerRequest::Replicate { parts }).expect("fits a frame");
        assert!(frame.len() <= PEER_FRAME_BYTES_MAX);
        let silent = self.silent.lock().unwrap().contains(&node);
        let engine = self.replicas[&node].clone();
        let assembly = self.assembly.clone();
        Box::pin(async move {
            if silent {
                tokio::time::sleep(timeout * 2).await;
                return Err("timed out".into());
            }
            let envelope: Envelope = postcard::from_bytes(&frame).unwrap();
            let PeerRequest::Replicate { parts } = envelope.request else {
                unreachable!()
            };
            let answers = tokio::task::spawn_blocking(move || {
                let mut all = assembly.lock().unwrap();
                let a = all.entry(node).or_default();
                serve_parts(&*engine, a, parts).answers
            })
            .await
            .unwrap();
            Ok(answers)
        })
    }
}

struct Rig {
    primary: Arc<ReplicatingEngine>,
    bare: Arc<dyn Engine>,
    links: Arc<Local>,
    _dirs: Vec<tempfile::TempDir>,
}

/// A primary (node 1) and replica nodes 2 and 3; shard 1 on both, shard 2 on node 2, shard 3
/// on none.
fn rig() -> Rig {
    rig_with_ack_timeout(Duration::from_millis(REPLICA_ACK_TIMEOUT_MS))
}

/// [`rig`], with the sink giving each replica `ack_timeout` to answer.
fn rig_with_ack_timeout(ack_timeout: Duration) -> Rig {
    let (primary, d1) = rocks();
    let (r2, d2) = rocks();
    let (r3, d3) = rocks();
    let links = Arc::new(Local {
        placement: HashMap::from([(1, vec![2, 3]), (2, vec![2]), (3, vec![])]),
        replicas: HashMap::from([(2, r2 as Arc<dyn Engine>), (3, r3 as Arc<dyn Engine>)]),
        assembly: Default::default(),
        silent: Default::default(),
        requests: Default::default(),
    });
    let sink = NetworkSink::new(tokio::runtime::Handle::current(), ack_timeout);
    sink.bind(links.clone());
    let bare: Arc<dyn Engine> = primary;
    Rig {
        primary: Arc::new(ReplicatingEngine::new(bare.clone(), sink, 1)),
        bare,
        links,
        _dirs: vec![d1, d2, d3],
    }
}

impl Rig {
    async fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        let engine = self.primary.clone();
        tokio::task::spawn_blocking(move || engine.write(batch, sync))
            .await
            .unwrap()
    }

    fn replica(&self, node: NodeId) -> &dyn Engine {
        &*self.links.replicas[&node]
    }

    fn assert_same(&self, shard: ShardId, node: NodeId) {
        assert_eq!(
            rows_of(&*self.bare, shard),
            rows_of(self.replica(node), shard),
            "shard {shard} on node {node}"
        );
        assert_eq!(
            read_position(&*self.bare, shard).unwrap(),
            read_position(self.replica(node), shard).unwrap()
        );
    }
}

fn put(b: &mut WriteBatch, shard: ShardId, tail: &[u8], value: Vec<u8>) {
    b.put(Cf::Inbox, key(shard, &[tail]), value);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_synced_write_returns_once_every_replica_has_it_and_one_request_per_node() {
    let rig = rig();
    let mut b = WriteBatch::new();
    for n in 0..50u8 {
        put(&mut b, 1 + u16::from(n % 3), &[n], vec![n; 100]);
    }
    rig.write(b, true).await.unwrap();
    rig.assert_same(1, 2);
    rig.assert_same(1, 3);
    rig.assert_same(2, 2);
    // Shard 3 has no replicas: nothing shipped for it anywhere.
    assert!(rows_of(rig.replica(2), 3).is_empty() && rows_of(rig.replica(3), 3).is_empty());
    // Node 2 got shards 1 and 2 in one request; node 3 shard 1.
    let mut requests = rig.links.requests.lock().unwrap().clone();
    requests.sort_unstable();
    assert_eq!(requests, vec![(2, 2), (3, 1)]);

    // A write only to a shard without replicas costs no request.
    let mut b = WriteBatch::new();
    put(&mut b, 3, b"x", vec![1]);
    rig.write(b, true).await.unwrap();
    assert_eq!(rig.links.requests.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_larger_than_a_frame_goes_in_parts_and_lands_whole() {
    let rig = rig();
    // About 12 MiB in one record: at least three frames.
    let mut b = WriteBatch::new();
    for n in 0..24u8 {
        put(&mut b, 2, &[n], vec![n; 512 * 1024]);
    }
    put(&mut b, 1, b"small", vec![1]);
    rig.write(b, true).await.unwrap();
    rig.assert_same(2, 2);
    rig.assert_same(1, 2);
    rig.assert_same(1, 3);
    let to_2 = (rig.links.requests.lock().unwrap().iter())
        .filter(|(n, _)| *n == 2)
        .count();
    assert!(to_2 >= 3, "{to_2} requests");
    assert_eq!(rig.links.assembly.lock().unwrap()[&2].held_bytes(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn unsynced_records_ride_along_and_a_synced_barrier_waits_for_them() {
    let rig = rig();
    let mut b = WriteBatch::new();
    put(&mut b, 2, b"floor", vec![1]);
    rig.write(b, false).await.unwrap();
    // A synced write of nothing to replicate: every stream is flushed.
    rig.write(WriteBatch::new(), true).await.unwrap();
    rig.assert_same(2, 2);
    assert_eq!(read_position(rig.replica(2), 2).unwrap().lsn, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_replica_fails_the_write_and_a_gap_is_reported_after() {
    // The sink's ack timeout, not the default, is what a replica is given.
    let rig = rig_with_ack_timeout(Duration::from_millis(1_500));
    rig.links.silent.lock().unwrap().insert(3);
    let mut b = WriteBatch::new();
    put(&mut b, 1, b"a", vec![1]);
    let err = rig.write(b, true).await.unwrap_err();
    assert!(
        matches!(&err, StorageError::Replication(m)
            if m.contains("replica node 3") && m.contains("no answer within 1500 ms")),
        "{err}"
    );
    // Written here and on node 2 all the same (at-least-once: nothing was acknowledged).
    rig.assert_same(1, 2);

    // Node 3 answers again, but for a while it counts as down: a write fails at once rather
    // than waiting out another timeout.
    rig.links.silent.lock().unwrap().clear();
    let mut b = WriteBatch::new();
    put(&mut b, 1, b"b", vec![2]);
    let err = rig.write(b, true).await.unwrap_err();
    assert!(
        matches!(&err, StorageError::Replication(m) if m.contains("unreachable")),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(REPLICA_DOWN_MS)).await;
    // Then it is tried again, and lacks record 1: the next write is refused with the gap.
    let mut b = WriteBatch::new();
    put(&mut b, 1, b"b", vec![2]);
    let err = rig.write(b, true).await.unwrap_err();
    assert!(
        matches!(&err, StorageError::Replication(m) if m.contains("needs record 1")),
        "{err}"
    );
    rig.assert_same(1, 2);
    assert_eq!(read_position(rig.replica(3), 1).unwrap().lsn, 0);
    // Shard 2 (not on node 3) is not held up by it.
    let mut b = WriteBatch::new();
    put(&mut b, 2, b"c", vec![3]);
    rig.write(b, true).await.unwrap();
    rig.assert_same(2, 2);
}

#[test]
fn the_replica_applies_good_shards_and_answers_each_refusal() {
    let (replica, _d) = rocks();
    let record = |shard: ShardId, lsn: u64| ShardLogRecord {
        shard,
        lsn,
        epoch: 1,
        base_epoch: u64::from(lsn > 1),
        ops: vec![crate::storage::Op::Put {
            cf: Cf::Inbox,
            key: key(shard, &[&lsn.to_be_bytes()]),
            value: vec![1],
        }],
        kind: RecordKind::Log,
    };
    let whole = |r: ShardLogRecord| {
        let bytes = r.encode();
        RecordPart {
            shard: r.shard,
            lsn: r.lsn,
            total_bytes: bytes.len() as u32,
            offset: 0,
            bytes,
        }
    };
    let mut a = Reassembly::default();
    // Shard 4 has a gap in the middle of the request; shards 5 and 6 around it apply.
    let parts = vec![
        whole(record(5, 1)),
        whole(record(4, 2)),
        whole(record(6, 1)),
        whole(record(5, 2)),
    ];
    let served = serve_parts(&*replica, &mut a, parts);
    use crate::replication::ReplicaOutcome::*;
    assert_eq!(
        served
            .answers
            .iter()
            .map(|a| (a.shard, a.outcome.clone()))
            .collect::<Vec<_>>(),
        vec![
            (5, Applied { lsn: 2 }),
            (
                4,
                Gap {
                    applied: 0,
                    needs: 1
                }
            ),
            (6, Applied { lsn: 1 }),
        ]
    );
    assert_eq!(served.records_applied, 3);
    // A re-send is applied nowhere and counted as nothing; the position answers.
    let served = serve_parts(&*replica, &mut a, vec![whole(record(5, 2))]);
    assert_eq!(served.answers[0].outcome, Applied { lsn: 2 });
    assert_eq!(served.records_applied, 0);
}
