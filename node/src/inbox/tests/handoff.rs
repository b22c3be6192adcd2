//! Hand-off tests of the inbox: the per-shard write fence, imports, shard drops and the sync
//! barrier. Engine-parameterised cases run on MemEngine and RocksEngine.

use std::collections::BTreeSet;

use ringpost_wire::ErrorCode;

use super::*;
use crate::handoff::{export_chunk, shard_digest, Digest, Row, SHARD_CFS};
use crate::inbox::keys::parse_inbox_key;
use crate::storage::key;

/// The `nth` user (from 10 000) whose shard is, or is not, `shard`.
fn user(in_shard: bool, shard: ShardId, nth: usize) -> UserId {
    (10_000u64..)
        .filter(|&u| (shard_of(u, config().shard_count) == shard) == in_shard)
        .nth(nth)
        .expect("users exist in every shard")
}

fn cf_index(cf: Cf) -> u8 {
    SHARD_CFS
        .iter()
        .position(|&c| c == cf)
        .expect("a shard family") as u8
}

/// Every row of `shard`, exported in chunks of `max_bytes`.
fn export_rows(engine: &dyn Engine, shard: ShardId, max_bytes: usize) -> Vec<Vec<Row>> {
    let mut chunks = Vec::new();
    let mut cursor = None;
    loop {
        let chunk = export_chunk(engine, shard, cursor.as_ref(), max_bytes).unwrap();
        chunks.push(chunk.rows);
        match chunk.next {
            Some(next) => cursor = Some(next),
            None => return chunks,
        }
    }
}

async fn closed_shard_refuses_appends_while_others_commit(fixture: Fixture) {
    let (inner, _dir) = fixture;
    let gated = Arc::new(GatedEngine::new(inner));
    let (observer, groups) = recording_observer();
    let inbox = Inbox::start(
        Arc::clone(&gated) as Arc<dyn Engine>,
        InboxConfig {
            observer: Some(observer),
            ..config()
        },
    )
    .unwrap();
    let t = now();
    let closed = shard_of(B, config().shard_count);
    let open = user(false, closed, 0);
    // The first append holds the writer inside its write while appends to both shards queue.
    let first = tokio::spawn({
        let inbox = inbox.clone();
        async move { inbox.append(send(A, 1, open, &[1], 0, t)).await }
    });
    wait_until("the writer is inside the first write", || {
        gated.entered.load(Ordering::SeqCst) == 1
    })
    .await;
    let mut tasks = Vec::new();
    for id in 1..=6u8 {
        let to = if id % 2 == 0 { B } else { open };
        let inbox = inbox.clone();
        let task = tokio::spawn(async move { inbox.append(send(A, 1, to, &[1, 2], id, t)).await });
        tasks.push((to, task));
    }
    wait_until("6 requests are queued", || inbox.queued() == 6).await;
    inbox.set_writable(closed, false);
    assert!(!inbox.is_writable(closed));
    assert!(inbox.is_writable(shard_of(open, config().shard_count)));
    gated.open_gate();

    stored_seqs(first.await.unwrap().unwrap());
    for (to, task) in tasks {
        let result = task.await.unwrap();
        if to == B {
            let err = result.unwrap_err();
            assert!(
                matches!(err, InboxError::WrongOwner { shard } if shard == closed),
                "{err}"
            );
            assert_eq!(err.code(), ErrorCode::WrongOwner);
        } else {
            stored_seqs(result.unwrap());
        }
    }
    assert_eq!(
        *groups.lock().unwrap(),
        vec![1, 6],
        "the refused appends were in the group that committed the others"
    );
    assert!(inbox.read(B, 1, 0, 100, t).unwrap().is_empty());
    assert_eq!(inbox.entries_total(), 1 + 3 * 2);
    assert_counts_match_disk(&*gated, &inbox);

    // A refused append left nothing: no dedup record (not a duplicate now), no seq used.
    inbox.set_writable(closed, true);
    assert_eq!(
        stored_seqs(inbox.append(send(A, 1, B, &[1, 2], 2, t)).await.unwrap()),
        vec![(1, 1), (2, 1)]
    );
    // Acks, drop_device and expiry still run on a closed shard.
    inbox.set_writable(closed, false);
    assert_eq!(inbox.ack(B, 1, vec![1], t).await.unwrap().len(), 1);
    assert_eq!(inbox.drop_device(B, 2).await.unwrap(), 1);
    inbox.set_writable(closed, true);
    stored_seqs(inbox.append(send(A, 1, B, &[1], 7, t + 1)).await.unwrap());
    inbox.set_writable(closed, false);
    // Eight entries, and the receipt the ack left in B's outbox.
    assert_eq!(inbox.expire(t + 1 + RETENTION_MS_DEFAULT).await.unwrap(), 9);
    assert_eq!(inbox.entries_total(), 0);
    assert_counts_match_disk(&*gated, &inbox);
}

async fn closing_then_barrier_makes_every_stored_append_exportable(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    let closed = shard_of(B, config().shard_count);
    let open = user(false, closed, 0);
    // Four senders append to the shard until the fence stops them; another shard carries on.
    let mut writers = Vec::new();
    for sender in 100..104u64 {
        let inbox = inbox.clone();
        writers.push(tokio::spawn(async move {
            let mut stored = Vec::new();
            for n in 0..10_000u32 {
                let mut msg_id = [0; 16];
                msg_id[..4].copy_from_slice(&n.to_be_bytes());
                let append = Append {
                    to_user: B,
                    dedup: Some((sender, 1, msg_id)),
                    entries: vec![(1, Entry::message(sender, 1, msg_id, Bytes::new()))],
                    now_ms: t,
                };
                match inbox.append(append).await {
                    Ok(outcome) => stored.extend(stored_seqs(outcome)),
                    Err(InboxError::WrongOwner { .. }) => return (stored, true),
                    Err(err) => panic!("{err}"),
                }
            }
            (stored, false)
        }));
    }
    let others = tokio::spawn({
        let inbox = inbox.clone();
        async move {
            for id in 0..50u8 {
                stored_seqs(inbox.append(send(A, 1, open, &[1], id, t)).await.unwrap());
            }
        }
    });
    wait_until("appends are flowing", || inbox.entries_total() >= 40).await;
    inbox.set_writable(closed, false);
    inbox.sync_barrier().await.unwrap();
    let exported: Vec<Row> = export_rows(&*engine, closed, 1000)
        .into_iter()
        .flatten()
        .collect();

    let exported_entries: BTreeSet<(UserId, DeviceId, u64)> = exported
        .iter()
        .filter(|row| row.cf == cf_index(Cf::Inbox))
        .map(|row| {
            let (_, user, device, seq) = parse_inbox_key(&row.key).unwrap();
            (user, device, seq)
        })
        .collect();
    let mut stored_total = 0;
    for writer in writers {
        let (stored, fenced) = writer.await.unwrap();
        assert!(fenced, "a writer ran out of appends before the fence");
        for (device, seq) in &stored {
            assert!(
                exported_entries.contains(&(B, *device, *seq)),
                "stored ({device}, {seq}) is not exported"
            );
        }
        stored_total += stored.len();
    }
    assert!(stored_total > 0);
    assert_eq!(
        exported_entries.len(),
        stored_total,
        "the export holds nothing but stored appends"
    );
    others.await.unwrap();
    // Nothing was committed to the closed shard after the barrier.
    let mut digest = Digest::default();
    exported.iter().for_each(|row| digest.add(row));
    assert_eq!(shard_digest(&*engine, closed, 0).unwrap(), digest.finish());
    assert_counts_match_disk(&*engine, &inbox);
}

async fn import_counts_counters_once_and_drop_subtracts_them(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    let shard = shard_of(B, config().shard_count);
    let open = user(false, shard, 0);
    // The old owner's copy: three messages to each of B's devices 1 and 2.
    let (source_engine, _) = mem_fixture();
    let source = Inbox::start(Arc::clone(&source_engine), config()).unwrap();
    for id in 0..3 {
        stored_seqs(source.append(send(A, 1, B, &[1, 2], id, t)).await.unwrap());
    }
    let chunks = export_rows(&*source_engine, shard, 100);
    assert!(chunks.len() > 3);
    // Here: entries of another shard, and a stale one of B's device 1.
    stored_seqs(inbox.append(send(A, 1, open, &[1, 2], 0, t)).await.unwrap());
    stored_seqs(inbox.append(send(A, 1, B, &[1], 9, t)).await.unwrap());
    assert_eq!(inbox.entries_total(), 3);

    inbox.set_writable(shard, false);
    let mut delta = 0;
    for rows in &chunks {
        delta += inbox.import(shard, rows.clone()).await.unwrap();
    }
    inbox.sync_barrier().await.unwrap();
    // Device 1's imported counter replaces the stale one: 3 - 1; device 2's is new: 3.
    assert_eq!(delta, 5);
    assert_eq!(inbox.entries_total(), 8);
    assert_eq!(
        seqs_of(&inbox.read(B, 1, 0, 100, t).unwrap()),
        vec![1, 2, 3]
    );
    assert_counts_match_disk(&*engine, &inbox);
    for rows in &chunks {
        assert_eq!(inbox.import(shard, rows.clone()).await.unwrap(), 0);
    }
    assert_eq!(inbox.entries_total(), 8);

    // Dropping removes the shard in every family, and only it.
    assert_eq!(inbox.drop_shard(shard).await.unwrap(), 6);
    assert_eq!(inbox.entries_total(), 2);
    assert_eq!(export_rows(&*engine, shard, 1000), vec![Vec::new()]);
    assert_eq!(inbox.read(open, 2, 0, 100, t).unwrap().len(), 1);
    assert_counts_match_disk(&*engine, &inbox);

    // A partial import (entries whose counters never came) counts nothing, and its drop
    // subtracts nothing.
    let entries_only: Vec<Row> = chunks
        .iter()
        .flatten()
        .filter(|row| row.cf == cf_index(Cf::Inbox))
        .cloned()
        .collect();
    assert_eq!(entries_only.len(), 6);
    assert_eq!(inbox.import(shard, entries_only).await.unwrap(), 0);
    assert_eq!(inbox.entries_total(), 2);
    assert_eq!(inbox.drop_shard(shard).await.unwrap(), 0);
    assert_eq!(inbox.entries_total(), 2);
    assert_counts_match_disk(&*engine, &inbox);
}

async fn hand_off_requests_commit_alone(fixture: Fixture) {
    let (inner, _dir) = fixture;
    let gated = Arc::new(GatedEngine::new(inner));
    let (observer, groups) = recording_observer();
    let inbox = Inbox::start(
        Arc::clone(&gated) as Arc<dyn Engine>,
        InboxConfig {
            observer: Some(observer),
            ..config()
        },
    )
    .unwrap();
    let t = now();
    let imported = shard_of(B, config().shard_count);
    let open = user(false, imported, 0);
    let first = tokio::spawn({
        let inbox = inbox.clone();
        async move { inbox.append(send(A, 1, open, &[1], 0, t)).await.map(|_| ()) }
    });
    wait_until("the writer is inside the first write", || {
        gated.entered.load(Ordering::SeqCst) == 1
    })
    .await;
    // Queued in this order: append, import, append, barrier, append.
    let mut tasks = Vec::new();
    for step in 0..5u8 {
        let handle = inbox.clone();
        tasks.push(tokio::spawn(async move {
            let inbox = handle;
            match step {
                1 => {
                    let row = Row {
                        cf: cf_index(Cf::Prekeys),
                        key: key(imported, &[&[1]]),
                        value: vec![1],
                    };
                    inbox
                        .import(imported, vec![row])
                        .await
                        .map(|delta| assert_eq!(delta, 0))
                }
                3 => inbox.sync_barrier().await,
                _ => inbox
                    .append(send(A, 1, open, &[1], step + 1, t))
                    .await
                    .map(|_| ()),
            }
        }));
        let queued = usize::from(step) + 1;
        wait_until("the next request is queued", || inbox.queued() == queued).await;
    }
    gated.open_gate();
    first.await.unwrap().unwrap();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    // Six writes, one per request; five observed: the import's write is not synced.
    assert_eq!(gated.entered.load(Ordering::SeqCst), 6);
    assert_eq!(*groups.lock().unwrap(), vec![1; 5]);
    assert_eq!(
        gated.get(Cf::Prekeys, &key(imported, &[&[1]])).unwrap(),
        Some(vec![1])
    );
}

macro_rules! handoff_cases {
    ($fixture:path) => {
        inbox_suite!($fixture;
            closed_shard_refuses_appends_while_others_commit,
            closing_then_barrier_makes_every_stored_append_exportable,
            import_counts_counters_once_and_drop_subtracts_them,
            hand_off_requests_commit_alone,
        );
    };
}

mod mem_engine {
    handoff_cases!(crate::storage::suite::mem_fixture);
}

mod rocks_engine {
    handoff_cases!(crate::storage::suite::rocks_fixture);
}

#[tokio::test]
async fn import_refuses_foreign_rows_corrupt_counters_and_unknown_shards() {
    let (engine, _dir) = mem_fixture();
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let entry = |shard| Row {
        cf: cf_index(Cf::Inbox),
        key: inbox_key(shard, B, 1, 1),
        value: vec![1],
    };
    assert!(matches!(
        inbox.import(4, vec![entry(3)]).await,
        Err(InboxError::Invalid(_))
    ));
    assert!(matches!(
        inbox.import(16, vec![entry(16)]).await,
        Err(InboxError::Invalid(_))
    ));
    assert!(matches!(
        inbox.drop_shard(16).await,
        Err(InboxError::Invalid(_))
    ));
    let counter = |value| Row {
        cf: cf_index(Cf::InboxMeta),
        key: device_prefix(3, B, 1),
        value,
    };
    assert!(matches!(
        inbox.import(3, vec![entry(3), counter(vec![9, 9])]).await,
        Err(InboxError::Storage(StorageError::Corrupt { .. }))
    ));
    let not_a_counter = Row {
        key: key(3, &[&[1]]),
        ..counter(Vec::new())
    };
    assert!(matches!(
        inbox.import(3, vec![entry(3), not_a_counter]).await,
        Err(InboxError::Invalid(_))
    ));
    for cf in SHARD_CFS {
        assert!(
            engine.scan(cf, &[], &[0xff, 0xff], 10).unwrap().is_empty(),
            "{cf:?}: a refused import stored something"
        );
    }
    assert_eq!(inbox.entries_total(), 0);
}

#[tokio::test]
async fn sync_barrier_reports_a_failed_sync() {
    let failing = Arc::new(FailingEngine {
        inner: mem_fixture().0,
        fail: AtomicBool::new(true),
        written: AtomicBool::new(false),
    });
    let inbox = Inbox::start(failing as Arc<dyn Engine>, config()).unwrap();
    assert!(matches!(
        inbox.sync_barrier().await,
        Err(InboxError::Storage(StorageError::Io(_)))
    ));
}
