//! The primary's wrapper: records per shard, LSNs persisted with the data, failures.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::replication::{read_position, Position, ReplicatingEngine};
use crate::storage::{key, prefix_end, Cf, Op, Result, StorageError, WriteBatch};

fn put(b: &mut WriteBatch, shard: ShardId, tail: &[u8]) {
    b.put(Cf::Inbox, key(shard, &[tail]), tail.to_vec());
}

#[test]
fn a_batch_is_one_record_per_shard_in_order_and_local_ops_stay_local() {
    let (primary, _d1) = rocks();
    let (replica, _d2) = rocks();
    let sink = ApplySink::new(replica.clone());
    let engine = ReplicatingEngine::new(primary.clone(), sink.clone(), 1);

    // A group commit of 100 messages to two shards, with a node-local write in it.
    let mut b = WriteBatch::new();
    for n in 0..100u8 {
        put(&mut b, [3, 9][usize::from(n % 2)], &[n]);
    }
    b.put(Cf::Meta, b"local".to_vec(), b"x".to_vec());
    b.delete(Cf::Inbox, key(9, &[&[1]]));
    engine.write(b.clone(), true).unwrap();

    let records = sink.records();
    assert_eq!(records.len(), 2);
    assert_eq!((records[0].shard, records[0].lsn), (3, 1));
    assert_eq!((records[1].shard, records[1].lsn), (9, 1));
    let of = |shard: ShardId| -> Vec<Op> {
        b.ops
            .iter()
            .filter(|op| match op {
                Op::Put { key, .. } | Op::Delete { key, .. } => {
                    key.starts_with(&shard.to_be_bytes())
                }
                Op::DeleteRange { .. } => false,
            })
            .filter(|op| !matches!(op, Op::Put { cf: Cf::Meta, .. }))
            .cloned()
            .collect()
    };
    assert_eq!(records[0].ops, of(3));
    assert_eq!(records[1].ops, of(9));
    assert_eq!(replica.get(Cf::Inbox, &key(9, &[&[1]])).unwrap(), None);
    assert_eq!(rows_of(&*primary, 9), rows_of(&*replica, 9));
    assert_eq!(
        primary.get(Cf::Meta, b"local").unwrap(),
        Some(b"x".to_vec())
    );
    assert_eq!(replica.get(Cf::Meta, b"local").unwrap(), None);

    // Node-local only: not shipped at all when unsynced; a synced one ships no records.
    let mut local = WriteBatch::new();
    local.put(Cf::Meta, b"clock".to_vec(), b"1".to_vec());
    engine.write(local.clone(), false).unwrap();
    assert_eq!(sink.shipped.lock().unwrap().len(), 1);
    engine.write(WriteBatch::new(), true).unwrap();
    assert_eq!(
        sink.shipped.lock().unwrap().last(),
        Some(&(Vec::new(), true))
    );
}

#[test]
fn lsns_continue_from_the_persisted_position_after_a_restart() {
    let primary_dir = tempfile::tempdir().unwrap();
    let (replica, _d2) = rocks();
    let sink = ApplySink::new(replica.clone());
    for round in 0..3u8 {
        let inner =
            Arc::new(RocksEngine::open(primary_dir.path(), &RocksConfig::for_tests()).unwrap());
        let engine = ReplicatingEngine::new(inner.clone(), sink.clone(), 1);
        for n in 0..4u8 {
            let mut b = WriteBatch::new();
            put(&mut b, 5, &[round, n]);
            engine.write(b, n % 2 == 0).unwrap();
        }
        // A clean close has every write durable.
        engine.write(WriteBatch::new(), true).unwrap();
        assert_eq!(
            read_position(&*inner, 5).unwrap(),
            Position {
                lsn: u64::from(round + 1) * 4,
                epoch: 1,
                fence: 1
            }
        );
    }
    let lsns: Vec<u64> = sink.records().iter().map(|r| r.lsn).collect();
    assert_eq!(lsns, (1..=12).collect::<Vec<_>>());
    assert_eq!(read_position(&*replica, 5).unwrap().lsn, 12);
}

#[test]
fn a_failed_ship_keeps_the_local_write_and_the_replica_sees_a_gap() {
    let (primary, _d1) = rocks();
    let (replica, _d2) = rocks();
    let sink = ApplySink::new(replica.clone());
    let engine = ReplicatingEngine::new(primary.clone(), sink.clone(), 1);
    let mut b = WriteBatch::new();
    put(&mut b, 5, b"one");
    engine.write(b, true).unwrap();

    sink.lose_next.store(true, Ordering::Relaxed);
    let mut b = WriteBatch::new();
    put(&mut b, 5, b"two");
    let err = engine.write(b, true).unwrap_err();
    assert!(matches!(err, StorageError::Replication(_)), "{err}");
    assert!(primary
        .get(Cf::Inbox, &key(5, &[b"two"]))
        .unwrap()
        .is_some());

    // The next record is LSN 3: the replica, at 1, refuses it and names LSN 2.
    let mut b = WriteBatch::new();
    put(&mut b, 5, b"three");
    let err = engine.write(b, true).unwrap_err();
    assert!(
        err.to_string()
            .contains("record 3 does not follow 1; LSN 2 is needed next"),
        "{err}"
    );
    assert_eq!(read_position(&*replica, 5).unwrap().lsn, 1);
    assert_eq!(read_position(&*primary, 5).unwrap().lsn, 3);
}

/// Writes the batch, then reports a failure (RocksDB may do this: a batch in the WAL whose
/// sync failed), or fails before writing.
struct Flaky {
    inner: Arc<dyn Engine>,
    fail_after_writing: AtomicBool,
}

impl Engine for Flaky {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(cf, key)
    }
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        self.inner.write(batch, sync)?;
        if self.fail_after_writing.swap(false, Ordering::Relaxed) {
            return Err(StorageError::Io("injected: fsync failed".into()));
        }
        Ok(())
    }
    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.inner.scan(cf, from, to, limit)
    }
    fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.inner.last_in(cf, from, to)
    }
}

#[test]
fn a_write_reported_failed_but_stored_does_not_reuse_its_lsn() {
    let (primary, _d1) = rocks();
    let (replica, _d2) = rocks();
    let sink = ApplySink::new(replica.clone());
    let flaky = Arc::new(Flaky {
        inner: primary.clone(),
        fail_after_writing: AtomicBool::new(false),
    });
    let engine = ReplicatingEngine::new(flaky.clone(), sink.clone(), 1);
    let mut b = WriteBatch::new();
    put(&mut b, 5, b"one");
    engine.write(b, true).unwrap();
    flaky.fail_after_writing.store(true, Ordering::Relaxed);
    let mut b = WriteBatch::new();
    put(&mut b, 5, b"two");
    assert!(matches!(engine.write(b, true), Err(StorageError::Io(_))));
    assert_eq!(read_position(&*primary, 5).unwrap().lsn, 2);
    assert_eq!(sink.records().len(), 1, "a failed write ships nothing");
    // LSN 2 is taken by the stored batch: the next is 3, a gap for the replica (which needs a
    // snapshot), never a second, different LSN 2.
    let mut b = WriteBatch::new();
    put(&mut b, 5, b"three");
    let err = engine.write(b, true).unwrap_err();
    assert!(err.to_string().contains("LSN 2 is needed"), "{err}");
}

#[test]
fn refused_batches_write_nothing_and_take_no_lsn() {
    let (primary, _d1) = rocks();
    let (replica, _d2) = rocks();
    let sink = ApplySink::new(replica.clone());
    let engine = ReplicatingEngine::new(primary.clone(), sink.clone(), 4);

    let mut across = WriteBatch::new();
    put(&mut across, 1, b"a");
    across.delete_range(Cf::Inbox, key(1, &[b"a"]), key(2, &[b"a"]));
    let err = engine.write(across, true).unwrap_err();
    assert!(
        err.to_string().contains("spans more than one shard"),
        "{err}"
    );

    // A hand-off import brings a position: refused on a replicating node.
    let mut import = WriteBatch::new();
    put(&mut import, 1, b"a");
    import.put(
        Cf::ShardLog,
        crate::replication::position_key(1),
        Position {
            lsn: 9,
            epoch: 1,
            fence: 1,
        }
        .encode(),
    );
    let err = engine.write(import, true).unwrap_err();
    assert!(err.to_string().contains("position"), "{err}");

    let mut too_big = WriteBatch::new();
    too_big.put(
        Cf::Inbox,
        key(1, &[b"a"]),
        vec![0; crate::replication::record::RECORD_VALUE_BYTES_MAX + 1],
    );
    assert!(engine.write(too_big, true).is_err());

    assert!(rows_of(&*primary, 1).is_empty());
    assert!(sink.records().is_empty());

    // A shard last written at a later epoch: this node is a stale primary.
    let mut b = WriteBatch::new();
    put(&mut b, 2, b"a");
    ReplicatingEngine::new(primary.clone(), sink.clone(), 6)
        .write(b, true)
        .unwrap();
    let mut b = WriteBatch::new();
    put(&mut b, 2, b"b");
    let err = engine.write(b, true).unwrap_err();
    assert!(err.to_string().contains("epoch 6"), "{err}");
    engine.set_epoch(6);
    let mut b = WriteBatch::new();
    put(&mut b, 2, b"b");
    engine.write(b, true).unwrap();
    assert_eq!(
        read_position(&*replica, 2).unwrap(),
        Position {
            lsn: 2,
            epoch: 6,
            fence: 6
        }
    );
    assert_eq!(rows_of(&*primary, 2), rows_of(&*replica, 2));
}

#[test]
fn dropping_a_shard_keeps_its_position_moving_forward() {
    let (primary, _d1) = rocks();
    let (replica, _d2) = rocks();
    let sink = ApplySink::new(replica.clone());
    let engine = ReplicatingEngine::new(primary.clone(), sink.clone(), 1);
    let mut b = WriteBatch::new();
    put(&mut b, 0x00ff, b"a");
    b.put(Cf::InboxMeta, key(0x00ff, &[b"m"]), b"1".to_vec());
    engine.write(b, true).unwrap();
    let from = key(0x00ff, &[]);
    let mut drop = WriteBatch::new();
    for cf in crate::shard_rows::SHARD_CFS {
        drop.delete_range(cf, from.clone(), prefix_end(&from));
    }
    engine.write(drop, true).unwrap();
    let rows = rows_of(&*primary, 0x00ff);
    assert_eq!(rows.len(), 1, "only the position is left: {rows:?}");
    assert_eq!(rows, rows_of(&*replica, 0x00ff));
    assert_eq!(read_position(&*primary, 0x00ff).unwrap().lsn, 2);
}

#[test]
fn a_hand_off_moves_the_position_and_the_new_owner_continues_the_log() {
    let (old_owner, _d1) = rocks();
    let (new_owner, _d2) = rocks();
    let (replica, _d3) = rocks();
    let sink = ApplySink::new(replica.clone());
    let engine = ReplicatingEngine::new(old_owner.clone(), sink.clone(), 1);
    for n in 0..3u8 {
        let mut b = WriteBatch::new();
        put(&mut b, 5, &[n]);
        engine.write(b, true).unwrap();
    }
    // Today's hand-off: rows copied raw onto a node that does not replicate yet.
    let rows = rows_of(&*old_owner, 5);
    let mut import = WriteBatch::new();
    for row in &rows {
        import.put(
            row.column_family().unwrap(),
            row.key.clone(),
            row.value.clone(),
        );
    }
    new_owner.write(import, true).unwrap();
    assert_eq!(
        crate::handoff::shard_digest(&*old_owner, 5, 0).unwrap(),
        crate::handoff::shard_digest(&*new_owner, 5, 0).unwrap()
    );
    // The new owner's first record is LSN 4: the replica takes it with no gap.
    let engine = ReplicatingEngine::new(new_owner.clone(), sink.clone(), 2);
    let mut b = WriteBatch::new();
    put(&mut b, 5, b"moved");
    engine.write(b, true).unwrap();
    assert_eq!(
        read_position(&*replica, 5).unwrap(),
        Position {
            lsn: 4,
            epoch: 2,
            fence: 2
        }
    );
    assert_eq!(rows_of(&*new_owner, 5), rows_of(&*replica, 5));
}

/// Group body rows ship as the logical rows, whole bodies and not the primary's on-disk
/// markers, and the replica's engine stores one body for all its shards too.
#[test]
fn group_bodies_ship_whole_and_are_stored_once_on_the_replica() {
    let (primary, _d1) = rocks();
    let (replica, _d2) = rocks();
    let sink = ApplySink::new(replica.clone());
    let engine = ReplicatingEngine::new(primary.clone(), sink.clone(), 1);
    let body_ref = [4u8; 24];
    let body = [&body_ref[..], b"group ciphertext"].concat();
    let row_key = |shard: ShardId| key(shard, &[&[crate::storage::GROUP_BODY_TAG], &body_ref]);
    let mut b = WriteBatch::new();
    for shard in [3, 9] {
        b.put(Cf::GroupBodies, row_key(shard), body.clone());
    }
    engine.write(b, true).unwrap();

    let shipped: Vec<Op> = (sink.records().into_iter())
        .flat_map(|r| r.ops)
        .filter(|op| {
            matches!(
                op,
                Op::Put {
                    cf: Cf::GroupBodies,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(
        shipped,
        [3, 9]
            .map(|shard| Op::Put {
                cf: Cf::GroupBodies,
                key: row_key(shard),
                value: body.clone(),
            })
            .to_vec()
    );
    for shard in [3, 9] {
        assert_eq!(rows_of(&*primary, shard), rows_of(&*replica, shard));
        assert_eq!(
            replica.get(Cf::GroupBodies, &row_key(shard)).unwrap(),
            Some(body.clone())
        );
    }
    for node in [&primary, &replica] {
        let store = node.raw_pairs(Cf::BodyStore);
        assert_eq!(store.len(), 2, "one count and one body: {store:?}");
        assert_eq!(store[1].1, body);
        let markers = node.raw_pairs(Cf::GroupBodies);
        assert!(markers.iter().all(|(_, v)| v.is_empty()), "{markers:?}");
    }
}

#[test]
fn a_node_writes_only_the_shards_it_is_the_primary_of_at_its_epoch() {
    use ringpost_coordinator::{testing, MemberState};
    let (primary, _d1) = rocks();
    let (replica, _d2) = rocks();
    let sink = ApplySink::new(replica.clone());
    let engine = ReplicatingEngine::new(primary.clone(), sink.clone(), 1);
    let active = [(1, MemberState::Active), (2, MemberState::Active)];
    let ring = Arc::new(crate::ring::Ring::from_view(&testing::view(
        5, 64, 2, &active,
    )));
    let mine = (0..64).find(|&s| ring.owner(s) == Some(1)).unwrap();
    let theirs = (0..64).find(|&s| ring.owner(s) == Some(2)).unwrap();
    engine.set_ring(1, ring);

    // Its own shard: logged at the ring's epoch.
    let mut b = WriteBatch::new();
    put(&mut b, mine, b"a");
    engine.write(b, true).unwrap();
    let records = sink.records();
    assert_eq!(
        (records[0].shard, records[0].lsn, records[0].epoch),
        (mine, 1, 5)
    );

    // A batch touching a shard node 2 is the primary of (a write admitted before the ring
    // moved): refused whole, nothing written or shipped, no LSN taken.
    let mut b = WriteBatch::new();
    put(&mut b, mine, b"b");
    put(&mut b, theirs, b"c");
    let err = engine.write(b, true).unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "shard {theirs}: node 1 is not its primary at epoch 5"
        )),
        "{err}"
    );
    assert_eq!(primary.get(Cf::Inbox, &key(mine, &[b"b"])).unwrap(), None);
    assert_eq!(primary.get(Cf::Inbox, &key(theirs, &[b"c"])).unwrap(), None);
    assert_eq!(
        read_position(&*primary, theirs).unwrap(),
        Position::default()
    );
    assert_eq!(sink.records().len(), 1);
    let mut b = WriteBatch::new();
    put(&mut b, mine, b"d");
    engine.write(b, true).unwrap();
    assert_eq!(read_position(&*primary, mine).unwrap().lsn, 2);
}

/// A sink whose synced writes wait until the test lets them go, as a slow replica's would.
struct HeldSink {
    queued: Mutex<Vec<(ShardId, u64)>>,
    release: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl ShardLogSink for HeldSink {
    fn ship(&self, records: Vec<ShardLogRecord>, sync: bool) -> Result<(), ShipError> {
        self.queue(records, sync)?.wait()
    }

    fn queue(
        &self,
        records: Vec<ShardLogRecord>,
        sync: bool,
    ) -> Result<crate::replication::Shipping, ShipError> {
        let mut queued = self.queued.lock().unwrap();
        queued.extend(records.iter().map(|r| (r.shard, r.lsn)));
        if !sync {
            return Ok(crate::replication::Shipping::done());
        }
        let release = self
            .release
            .lock()
            .unwrap()
            .take()
            .expect("one synced write");
        Ok(crate::replication::Shipping::waiting(move || {
            release
                .recv()
                .map_err(|_| ShipError("the test ended".into()))
        }))
    }
}

#[test]
fn a_write_waiting_for_its_replicas_holds_up_no_other_writer() {
    let (primary, _d) = rocks();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let sink = Arc::new(HeldSink {
        queued: Mutex::new(Vec::new()),
        release: Mutex::new(Some(release_rx)),
    });
    let engine = Arc::new(ReplicatingEngine::new(primary.clone(), sink.clone(), 1));
    // A synced write to shard 4 waits for its replicas...
    let slow = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            let mut b = WriteBatch::new();
            put(&mut b, 4, b"slow");
            engine.write(b, true)
        })
    };
    while sink.queued.lock().unwrap().is_empty() {
        std::thread::yield_now();
    }
    // ... while other writes, to its shard and another, go through. (Before, they waited on
    // the engine's lock until the slow one's replicas answered: this test hung.)
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    {
        let engine = engine.clone();
        std::thread::spawn(move || {
            for (shard, tail) in [(4, b"next"), (7, b"else")] {
                let mut b = WriteBatch::new();
                put(&mut b, shard, tail);
                done_tx.send(engine.write(b, false)).unwrap();
            }
        });
    }
    for _ in 0..2 {
        let written = done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a write went through while another waited for its replicas");
        written.unwrap();
    }
    assert!(!slow.is_finished(), "the synced write still waits");
    assert_eq!(
        *sink.queued.lock().unwrap(),
        vec![(4, 1), (4, 2), (7, 1)],
        "queued in LSN order per shard"
    );
    release_tx.send(()).unwrap();
    slow.join().unwrap().unwrap();
    assert!(primary
        .get(Cf::Inbox, &key(4, &[b"next"]))
        .unwrap()
        .is_some());
}
