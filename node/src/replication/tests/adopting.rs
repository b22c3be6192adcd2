//! A replica's inbox: replicated records move its entries gauge exactly as the primary's own
//! writes moved the primary's, and adopting a shard makes its writer continue the primary's
//! counters instead of what it had cached.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ringpost_wire::UserId;

use super::*;
use crate::inbox::{Append, AppendOutcome, Entry, Inbox, InboxConfig};
use crate::replication::ReplicatingEngine;
use crate::shard::shard_of;

const SHARD_COUNT: u16 = 8;

/// Keeps what it is shipped, applies nothing.
#[derive(Default)]
struct Collect(Mutex<Vec<ShardLogRecord>>);

impl ShardLogSink for Collect {
    fn ship(&self, records: Vec<ShardLogRecord>, _sync: bool) -> Result<(), ShipError> {
        self.0.lock().unwrap().extend(records);
        Ok(())
    }
}

impl Collect {
    fn take(&self) -> Vec<ShardLogRecord> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn inbox(engine: Arc<dyn Engine>) -> Inbox {
    let config = InboxConfig {
        shard_count: SHARD_COUNT,
        ..InboxConfig::default()
    };
    Inbox::start(engine, config).unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Appends message `id` for devices 1 and 2 of `user`; returns device 1's seq.
async fn send(inbox: &Inbox, user: UserId, id: u8) -> u64 {
    let entry = Entry::message(7, 1, [id; 16], Bytes::from_static(b"ciphertext"));
    let outcome = inbox
        .append(Append {
            to_user: user,
            dedup: Some((7, 1, [id; 16])),
            entries: vec![(1, entry.clone()), (2, entry)],
            now_ms: now(),
        })
        .await
        .unwrap();
    match outcome {
        AppendOutcome::Stored { seqs, .. } => seqs[0].1,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn replicated_counts_move_the_gauge_and_an_adopted_shard_continues_the_primarys_seqs() {
    let (primary_db, _p) = rocks();
    let (replica_db, _r) = rocks();
    let sink = Arc::new(Collect::default());
    let primary = inbox(Arc::new(ReplicatingEngine::new(
        primary_db,
        sink.clone(),
        1,
    )));
    let replica_db: Arc<dyn Engine> = replica_db;
    let replica = inbox(replica_db.clone());
    let user: UserId = (15_550_000_000..)
        .find(|&u| shard_of(u, SHARD_COUNT) == 3)
        .unwrap();

    // The replica owned the shard once and cached device 1's counters (next seq 2).
    assert_eq!(send(&replica, user, 0).await, 1);
    assert_eq!(replica.entries_total(), 2);

    // The primary stores five messages for both devices (seqs 1..=5, replacing the replica's
    // old copy of seq 1) and ships them.
    for id in 1..=5 {
        send(&primary, user, id).await;
    }
    let records = sink.take();
    assert!(!records.is_empty());
    replica.apply_replicated(&*replica_db, &records).unwrap();
    assert_eq!(primary.entries_total(), 10);
    assert_eq!(replica.entries_total(), 10, "counters replaced, not added");
    // A re-send is skipped and counts nothing.
    let again = replica.apply_replicated(&*replica_db, &records).unwrap();
    assert_eq!(again.written, 0);
    assert_eq!(replica.entries_total(), 10);

    // Acks (made durable by the next synced write) move both gauges alike: 3 entries fewer,
    // and one delivered receipt waiting in the user's outbox (its sender lives elsewhere).
    primary.ack(user, 1, vec![1, 2, 3], now()).await.unwrap();
    primary.sync_barrier().await.unwrap();
    replica
        .apply_replicated(&*replica_db, &sink.take())
        .unwrap();
    assert_eq!(primary.entries_total(), 8);
    assert_eq!(replica.entries_total(), 8);

    // Adopted, the replica continues the primary's seqs: 6, not the 2 it had cached.
    replica.adopt_shard(3).await.unwrap();
    assert_eq!(send(&replica, user, 6).await, 6);
    assert_eq!(replica.entries_total(), 10);

    // The old primary drops its copy (the shard moved away): a local write of its own, which
    // ships nothing; the new primary keeps its copy and its count.
    primary.drop_shard(3).await.unwrap();
    assert!(sink.take().is_empty());
    assert_eq!(primary.entries_total(), 0);
    assert_eq!(replica.entries_total(), 10);
    assert!(replica.adopt_shard(SHARD_COUNT).await.is_err());
}
