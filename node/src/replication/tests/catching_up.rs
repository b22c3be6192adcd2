//! Catch-up: a follower that missed records (or holds records the primary never wrote) gets
//! a snapshot of the shard while the primary keeps writing, then every record after it, and
//! is proposed in sync; real RocksDB on both sides, requests encoded as peer frames.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ringpost_coordinator::NodeId;

use super::*;
use crate::peer::{encode_request, Envelope, PeerRequest};
use crate::replication::sink::CatchUpStats;
use crate::replication::{
    apply, read_catch_up, read_position, serve_parts, snapshot_clears, ApplyError, CatchUpMark,
    NetworkSink, Reassembly, RecordPart, ReplicaLinks, ReplicaOutcome, ReplicatingEngine,
    ShardAnswer,
};
use crate::storage::{key, Cf, Op, WriteBatch};

/// The primary (node 1) and replica node 2 in this process. `must` plays the in-sync sets,
/// `followers` the placed replicas outside them; a finished catch-up moves the node into
/// `must` as a committed expand would.
#[derive(Default)]
struct Links {
    must: Mutex<HashMap<ShardId, Vec<NodeId>>>,
    followers: Mutex<HashMap<ShardId, Vec<NodeId>>>,
    replica: Mutex<Option<Arc<dyn Engine>>>,
    assembly: Arc<Mutex<Reassembly>>,
    caught_up: Mutex<Vec<(NodeId, ShardId, CatchUpStats)>>,
    failed: Mutex<Vec<(NodeId, ShardId, String)>>,
    /// When each failure was reported.
    failed_at: Mutex<Vec<Instant>>,
    /// Requests whose snapshot chunks are refused (to test a failed catch-up).
    refuse_chunks: AtomicU64,
    /// Hold the next request carrying a last chunk for a while, then refuse it.
    hold_last: AtomicBool,
    /// A request with a last chunk is being held.
    holding: AtomicBool,
    /// `drop_from_in_sync` calls.
    dropped: Mutex<Vec<(NodeId, ShardId)>>,
    /// `confirm_in_sync` calls.
    confirmed: Mutex<Vec<(NodeId, Vec<ShardId>)>>,
}

impl ReplicaLinks for Links {
    fn must_have(&self, shard: ShardId) -> Vec<NodeId> {
        self.must
            .lock()
            .unwrap()
            .get(&shard)
            .cloned()
            .unwrap_or_default()
    }

    fn followers(&self, shard: ShardId) -> Vec<NodeId> {
        let must = self.must_have(shard);
        let followers = self.followers.lock().unwrap();
        (followers.get(&shard).into_iter().flatten())
            .copied()
            .filter(|n| !must.contains(n))
            .collect()
    }

    fn catch_up_candidates(&self) -> Vec<(NodeId, ShardId)> {
        let shards: Vec<ShardId> = self.followers.lock().unwrap().keys().copied().collect();
        (shards.into_iter())
            .flat_map(|s| self.followers(s).into_iter().map(move |n| (n, s)))
            .collect()
    }

    fn may_catch_up(&self, node: NodeId, shard: ShardId) -> bool {
        self.followers(shard).contains(&node)
    }

    fn in_sync_member(&self, node: NodeId, shard: ShardId) -> bool {
        self.must_have(shard).contains(&node)
    }

    fn confirm_in_sync(&self, node: NodeId, shards: Vec<ShardId>) -> Result<(), String> {
        self.confirmed.lock().unwrap().push((node, shards));
        Ok(())
    }

    fn drop_from_in_sync(&self, node: NodeId, shards: Vec<ShardId>) -> Result<(), String> {
        let mut must = self.must.lock().unwrap();
        for s in shards {
            self.dropped.lock().unwrap().push((node, s));
            must.entry(s).or_default().retain(|&n| n != node);
        }
        Ok(())
    }

    fn caught_up(&self, node: NodeId, shard: ShardId, stats: CatchUpStats) {
        self.must
            .lock()
            .unwrap()
            .entry(shard)
            .or_default()
            .push(node);
        self.caught_up.lock().unwrap().push((node, shard, stats));
    }

    fn catch_up_failed(&self, node: NodeId, shard: ShardId, why: &str) {
        self.failed
            .lock()
            .unwrap()
            .push((node, shard, why.to_owned()));
        self.failed_at.lock().unwrap().push(Instant::now());
    }

    fn replicate(
        &self,
        _node: NodeId,
        parts: Vec<RecordPart>,
        _timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<ShardAnswer>, String>> {
        let has_last = parts.iter().any(|p| {
            p.offset == 0
                && ShardLogRecord::decode(&p.bytes)
                    .is_ok_and(|r| matches!(r.kind, RecordKind::Snapshot { last: true, .. }))
        });
        let hold = has_last && self.hold_last.swap(false, Ordering::Relaxed);
        let frame = encode_request(7, PeerRequest::Replicate { parts }).expect("fits a frame");
        let engine = self.replica.lock().unwrap().clone().expect("a replica");
        let assembly = self.assembly.clone();
        let mut refuse = self.refuse_chunks.load(Ordering::Relaxed) > 0;
        if refuse {
            self.refuse_chunks.fetch_sub(1, Ordering::Relaxed);
        }
        refuse |= hold;
        if hold {
            self.holding.store(true, Ordering::Relaxed);
        }
        Box::pin(async move {
            if hold {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let envelope: Envelope = postcard::from_bytes(&frame).unwrap();
            let PeerRequest::Replicate { parts } = envelope.request else {
                unreachable!()
            };
            let answers = tokio::task::spawn_blocking(move || {
                if refuse {
                    // Nothing applied: every shard named is refused.
                    let mut shards: Vec<ShardId> = parts.iter().map(|p| p.shard).collect();
                    shards.dedup();
                    return (shards.into_iter())
                        .map(|shard| ShardAnswer {
                            shard,
                            outcome: ReplicaOutcome::Failed {
                                reason: "refused for the test".into(),
                            },
                        })
                        .collect();
                }
                let mut a = assembly.lock().unwrap();
                serve_parts(&*engine, &mut a, parts).answers
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
    replica: Arc<dyn Engine>,
    links: Arc<Links>,
    _sink: Arc<NetworkSink>,
    _dirs: Vec<tempfile::TempDir>,
}

fn rig() -> Rig {
    let (p, d1) = rocks();
    let (r, d2) = rocks();
    let replica: Arc<dyn Engine> = r;
    let links = Arc::new(Links::default());
    *links.replica.lock().unwrap() = Some(replica.clone());
    let sink = NetworkSink::new(
        tokio::runtime::Handle::current(),
        Duration::from_millis(crate::replication::sink::REPLICA_ACK_TIMEOUT_MS),
    );
    sink.bind(links.clone());
    let bare: Arc<dyn Engine> = p;
    let primary = Arc::new(ReplicatingEngine::new(bare.clone(), sink.clone(), 1));
    Rig {
        primary,
        bare,
        replica,
        links,
        _sink: sink,
        _dirs: vec![d1, d2],
    }
}

impl Rig {
    fn start(&self) {
        self._sink.start_catch_up(Arc::downgrade(&self.primary));
    }

    async fn write(&self, batch: WriteBatch) {
        let engine = self.primary.clone();
        tokio::task::spawn_blocking(move || engine.write(batch, true))
            .await
            .unwrap()
            .unwrap();
    }

    fn follow(&self, shard: ShardId) {
        self.links.followers.lock().unwrap().insert(shard, vec![2]);
    }

    async fn caught_up(&self, shards: &[ShardId]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let done: HashSet<ShardId> = (self.links.caught_up.lock().unwrap().iter())
                .map(|c| c.1)
                .collect();
            if shards.iter().all(|s| done.contains(s)) {
                return;
            }
            assert!(Instant::now() < deadline, "not caught up: {done:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn assert_same(&self, shard: ShardId) {
        let primary = rows_of(&*self.bare, shard);
        let replica = rows_of(&*self.replica, shard);
        assert_eq!(primary.len(), replica.len(), "shard {shard}: row counts");
        assert_eq!(primary, replica, "shard {shard}");
        assert_eq!(read_catch_up(&*self.replica, shard).unwrap(), None);
    }
}

/// A batch of puts, deletes and a range delete on `shard`, its contents a function of `n`.
fn churn(shard: ShardId, n: u32) -> WriteBatch {
    let mut b = WriteBatch::new();
    let k = |i: u32| key(shard, &[b"k", &i.to_be_bytes()]);
    for i in 0..8 {
        b.put(Cf::Inbox, k(n * 8 + i), vec![(n % 251) as u8; 300]);
    }
    b.put(
        Cf::Accounts,
        key(shard, &[b"acct"]),
        n.to_be_bytes().to_vec(),
    );
    if n >= 2 {
        b.delete(Cf::Inbox, k((n - 2) * 8 + 3));
    }
    if n % 10 == 9 {
        b.delete_range(Cf::Inbox, k(n * 8 - 40), k(n * 8 - 20));
    }
    b
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_behind_and_diverged_is_caught_up_under_writes_and_joins() {
    let rig = rig();
    // The replica holds rows of its own in shard 1 (an old primary's unacknowledged writes,
    // past the new primary's LSN) and nothing of shard 2.
    let mut own = WriteBatch::new();
    own.put(Cf::Inbox, key(1, &[b"stale"]), vec![9; 10]);
    own.put(Cf::Dedup, key(1, &[b"stale-dedup"]), vec![9; 10]);
    own.put(
        Cf::ShardLog,
        crate::replication::position_key(1),
        crate::replication::Position {
            lsn: 900,
            epoch: 0,
            fence: 0,
        }
        .encode(),
    );
    rig.replica.write(own, true).unwrap();
    // 300 batches the replica never sees: about 800 KiB per shard, several chunks.
    for n in 0..300 {
        rig.write(churn(1, n)).await;
        rig.write(churn(2, n)).await;
    }
    rig.follow(1);
    rig.follow(2);
    rig.start();
    // Writes go on while the snapshot is taken.
    for n in 300..600 {
        rig.write(churn(1, n)).await;
        rig.write(churn(2, n)).await;
    }
    rig.caught_up(&[1, 2]).await;
    // Joined: every write from here is waited for, and lands.
    for n in 600..620 {
        rig.write(churn(1, n)).await;
        rig.write(churn(2, n)).await;
    }
    rig.assert_same(1);
    rig.assert_same(2);
    assert_eq!(
        read_position(&*rig.replica, 1).unwrap().lsn,
        read_position(&*rig.bare, 1).unwrap().lsn
    );
    let stats = rig.links.caught_up.lock().unwrap().clone();
    assert!(stats.iter().all(|(_, _, s)| s.chunks >= 2), "{stats:?}");
    assert!(rig.links.failed.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_chunk_abandons_the_catch_up_and_it_starts_over() {
    let rig = rig();
    for n in 0..200 {
        rig.write(churn(3, n)).await;
    }
    rig.links.refuse_chunks.store(1, Ordering::Relaxed);
    rig.follow(3);
    rig.start();
    rig.caught_up(&[3]).await;
    assert_eq!(rig.links.failed.lock().unwrap().len(), 1);
    rig.write(churn(3, 999)).await;
    rig.assert_same(3);
}

/// A shard whose catch-up keeps failing is retried later each time: the pause doubles.
#[tokio::test(flavor = "multi_thread")]
async fn a_catch_up_failing_in_a_row_backs_off() {
    use crate::replication::sink::{catch_up_retry_delay, CATCH_UP_RETRY_MS};
    let rig = rig();
    for n in 0..50 {
        rig.write(churn(4, n)).await;
    }
    rig.links.refuse_chunks.store(2, Ordering::Relaxed);
    rig.follow(4);
    rig.start();
    rig.caught_up(&[4]).await;
    let done = Instant::now();
    let at = rig.links.failed_at.lock().unwrap().clone();
    assert_eq!(at.len(), 2, "two refused requests, two failures");
    // Each start over waits at least half its pause (the jitter's lower end).
    let first = catch_up_retry_delay(1, 0.0);
    let second = catch_up_retry_delay(2, 0.0);
    assert_eq!(first, Duration::from_millis(CATCH_UP_RETRY_MS / 2));
    assert_eq!(second, 2 * first);
    assert!(at[1] - at[0] >= first, "{:?}", at[1] - at[0]);
    assert!(done - at[1] >= second, "{:?}", done - at[1]);
    rig.assert_same(4);
}

/// Between its last chunk's cut and its answer, a follower is *joining*: writes wait for it
/// as for an in-sync replica. Here that last chunk is refused, so the write that was waiting
/// drops the node (it never enters the set without that write) and the catch-up starts over.
#[tokio::test(flavor = "multi_thread")]
async fn a_joining_follower_is_waited_for_and_dropped_if_it_fails() {
    let rig = rig();
    for n in 0..5 {
        rig.write(churn(6, n)).await;
    }
    rig.links.hold_last.store(true, Ordering::Relaxed);
    rig.follow(6);
    rig.start();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rig.links.holding.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "the last chunk was never sent");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rig.write(churn(6, 100)).await;
    assert_eq!(rig.links.dropped.lock().unwrap().clone(), vec![(2, 6)]);
    assert!(rig.links.caught_up.lock().unwrap().is_empty());
    // The catch-up starts over and the node joins.
    rig.caught_up(&[6]).await;
    assert_eq!(rig.links.failed.lock().unwrap().len(), 1);
    rig.write(churn(6, 101)).await;
    rig.assert_same(6);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_shard_is_caught_up_in_one_chunk() {
    let rig = rig();
    rig.follow(4);
    rig.start();
    rig.caught_up(&[4]).await;
    rig.write(churn(4, 0)).await;
    rig.assert_same(4);
}

fn chunk(
    shard: ShardId,
    lsn: u64,
    epoch: u64,
    session: u64,
    index: u32,
    last: bool,
) -> ShardLogRecord {
    ShardLogRecord {
        shard,
        lsn,
        epoch,
        base_epoch: epoch,
        ops: vec![Op::Put {
            cf: Cf::Inbox,
            key: key(shard, &[&lsn.to_be_bytes(), &index.to_be_bytes()]),
            value: vec![1],
        }],
        kind: RecordKind::Snapshot {
            session,
            index,
            last,
        },
    }
}

#[test]
fn a_replica_takes_chunks_only_in_their_session_and_position() {
    let (replica, _d) = rocks();
    let log = |lsn: u64, epoch: u64| {
        ShardLogRecord::log(
            5,
            lsn,
            epoch,
            if lsn > 1 { epoch } else { 0 },
            vec![Op::Put {
                cf: Cf::Inbox,
                key: key(5, &[b"log", &lsn.to_be_bytes()]),
                value: vec![2],
            }],
        )
    };
    apply(&*replica, &[log(1, 2), log(2, 2)]).unwrap();
    // The first chunk replaces the copy and marks it.
    apply(&*replica, &[chunk(5, 10, 3, 77, 0, false)]).unwrap();
    let mark = |next| Some(CatchUpMark { session: 77, next });
    assert_eq!(read_catch_up(&*replica, 5).unwrap(), mark(1));
    assert_eq!(
        rows_of(&*replica, 5).iter().filter(|r| r.cf == 2).count(),
        1
    );
    // Another session, a chunk out of order (one before it was lost), or the same session at
    // another position, is refused.
    for bad in [
        chunk(5, 10, 3, 78, 1, false),
        chunk(5, 10, 3, 77, 2, false),
        chunk(5, 11, 3, 77, 1, true),
    ] {
        assert!(matches!(
            apply(&*replica, &[bad]),
            Err(ApplyError::CatchUp { .. })
        ));
    }
    // An older primary's chunk is stale.
    assert!(matches!(
        apply(&*replica, &[chunk(5, 10, 2, 77, 1, true)]),
        Err(ApplyError::StaleEpoch { .. })
    ));
    // Records after the cut (not older than the chunk's epoch), then the last chunk at their
    // position: complete.
    assert!(matches!(
        apply(&*replica, &[log(11, 2)]),
        Err(ApplyError::StaleEpoch { .. })
    ));
    apply(&*replica, &[chunk(5, 10, 3, 77, 1, false)]).unwrap();
    assert_eq!(read_catch_up(&*replica, 5).unwrap(), mark(2));
    apply(&*replica, &[log(11, 3), chunk(5, 11, 3, 77, 2, true)]).unwrap();
    assert_eq!(read_catch_up(&*replica, 5).unwrap(), None);
    assert_eq!(read_position(&*replica, 5).unwrap().lsn, 11);
    // What a replica says of it: catching up until the last chunk.
    let mut a = Reassembly::default();
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
    let served = serve_parts(
        &*replica,
        &mut a,
        vec![whole(chunk(5, 11, 3, 80, 0, false))],
    );
    assert_eq!(
        served.answers[0].outcome,
        ReplicaOutcome::Catching { lsn: 11 }
    );
    let served = serve_parts(&*replica, &mut a, vec![whole(chunk(5, 11, 3, 80, 1, true))]);
    assert_eq!(
        served.answers[0].outcome,
        ReplicaOutcome::Applied { lsn: 11 }
    );
    assert_eq!(
        snapshot_clears(5).len(),
        crate::shard_rows::SHARD_CFS.len() - 1
    );
}

/// Writes wait for their replicas concurrently, so a member's acknowledgement must not propose
/// it again: another write may have dropped it meanwhile, and it comes back by a catch-up.
#[tokio::test(flavor = "multi_thread")]
async fn a_members_acknowledgement_proposes_nothing() {
    let rig = rig();
    rig.links.must.lock().unwrap().insert(3, vec![2]);
    for n in 0..3 {
        rig.write(churn(3, n)).await;
    }
    rig.assert_same(3);
    assert!(
        rig.links.confirmed.lock().unwrap().is_empty(),
        "node 2 was in shard 3's set: {:?}",
        rig.links.confirmed.lock().unwrap()
    );
}
