//! The inbox's test suite: every case runs against the in-memory and the RocksDB engine.

use std::sync::atomic::AtomicBool;
use std::sync::{Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use super::keys::dedup_key;
use super::*;
use crate::storage::rocks::{RocksConfig, RocksEngine};
use crate::storage::suite::{mem_fixture, Fixture};
use crate::storage::{Result as StorageResult, WriteBatch};

const A: UserId = 1_000;
const B: UserId = 2_000;

/// Wall-clock now: RocksDB's dedup compaction filter compares expiries with the real clock,
/// so tests use realistic times.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn config() -> InboxConfig {
    InboxConfig {
        shard_count: 16,
        ..InboxConfig::default()
    }
}

fn msg(from: UserId, from_device: DeviceId, id: u8, body: &'static str) -> Entry {
    Entry::message(
        from,
        from_device,
        [id; 16],
        Bytes::from_static(body.as_bytes()),
    )
}

/// A message from `from`/`from_device` to every given device of `to`, deduped.
fn send(
    from: UserId,
    from_device: DeviceId,
    to: UserId,
    devices: &[DeviceId],
    id: u8,
    now_ms: u64,
) -> Append {
    Append {
        to_user: to,
        dedup: Some((from, from_device, [id; 16])),
        entries: devices
            .iter()
            .map(|d| (*d, msg(from, from_device, id, "ciphertext")))
            .collect(),
        now_ms,
    }
}

fn stored_seqs(outcome: AppendOutcome) -> Vec<(DeviceId, u64)> {
    match outcome {
        AppendOutcome::Stored { seqs, .. } => seqs,
        other => panic!("expected Stored, got {other:?}"),
    }
}

fn seqs_of(entries: &[(u64, Entry)]) -> Vec<u64> {
    entries.iter().map(|(s, _)| *s).collect()
}

/// Pending entries actually on disk, the sum of the stored counts and the gauge must always
/// agree; and every pending seq a counter accounts for must be on disk.
fn assert_counts_match_disk(engine: &dyn Engine, inbox: &Inbox) {
    let on_disk = pending_entries_on_disk(engine);
    assert_eq!(
        count_entries(engine).unwrap(),
        on_disk,
        "stored counts drifted from entries"
    );
    assert_eq!(inbox.entries_total(), on_disk, "gauge drifted from entries");
}

/// The receipts waiting in a user's outbox: (to user, acknowledged msg ids).
fn outbox_of(inbox: &Inbox, user: UserId, t: u64) -> Vec<(UserId, Vec<MsgId>)> {
    inbox
        .read(user, OUTBOX_DEVICE, 0, 100, t)
        .unwrap()
        .into_iter()
        .map(|(_, e)| {
            let r = OutboxReceipt::from_entry(&e).expect("an outbox row");
            assert_eq!(r.msg_id, receipt_id(&r.msg_ids));
            (r.to_user, r.msg_ids)
        })
        .collect()
}

/// Acks a user's whole outbox, as the node's outbox task does once the receipts are stored.
async fn clear_outbox(inbox: &Inbox, user: UserId, t: u64) {
    let seqs = seqs_of(&inbox.read(user, OUTBOX_DEVICE, 0, 100, t).unwrap());
    inbox.ack(user, OUTBOX_DEVICE, seqs, t).await.unwrap();
}

/// Reopens a fixture's engine as after a restart (RocksDB: closed and opened again).
fn reopen(fixture: Fixture) -> Fixture {
    match fixture {
        (engine, Some(dir)) => {
            assert_eq!(
                Arc::strong_count(&engine),
                1,
                "someone still holds the database"
            );
            drop(engine);
            let engine = RocksEngine::open(dir.path(), &RocksConfig::for_tests()).unwrap();
            (Arc::new(engine), Some(dir))
        }
        mem => mem,
    }
}

/// Wraps an engine; writes fail with an I/O error while `fail` is set. With `written` set too,
/// the batch is written first: an fsync that fails after the WAL append, whose batch is found
/// on disk after all (RocksDB replays it at the next open).
struct FailingEngine {
    inner: Arc<dyn Engine>,
    fail: AtomicBool,
    written: AtomicBool,
}

impl Engine for FailingEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> StorageResult<Option<Vec<u8>>> {
        self.inner.get(cf, key)
    }
    fn write(&self, batch: WriteBatch, sync: bool) -> StorageResult<()> {
        if self.fail.load(Ordering::SeqCst) {
            if self.written.load(Ordering::SeqCst) {
                self.inner.write(batch, sync)?;
            }
            return Err(StorageError::Io("injected: fsync failed".into()));
        }
        self.inner.write(batch, sync)
    }
    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> StorageResult<Vec<(Vec<u8>, Vec<u8>)>> {
        self.inner.scan(cf, from, to, limit)
    }
    fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> StorageResult<Option<(Vec<u8>, Vec<u8>)>> {
        self.inner.last_in(cf, from, to)
    }
}

/// Wraps an engine; every write waits at a gate until the test opens it, and counts itself
/// as entered first. Lets a test hold the writer inside a commit while it queues requests.
struct GatedEngine {
    inner: Arc<dyn Engine>,
    open: Mutex<bool>,
    opened: Condvar,
    entered: AtomicU64,
}

impl GatedEngine {
    fn new(inner: Arc<dyn Engine>) -> Self {
        Self {
            inner,
            open: Mutex::new(false),
            opened: Condvar::new(),
            entered: AtomicU64::new(0),
        }
    }
    fn open_gate(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl Engine for GatedEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> StorageResult<Option<Vec<u8>>> {
        self.inner.get(cf, key)
    }
    fn write(&self, batch: WriteBatch, sync: bool) -> StorageResult<()> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        drop(open);
        self.inner.write(batch, sync)
    }
    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> StorageResult<Vec<(Vec<u8>, Vec<u8>)>> {
        self.inner.scan(cf, from, to, limit)
    }
    fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> StorageResult<Option<(Vec<u8>, Vec<u8>)>> {
        self.inner.last_in(cf, from, to)
    }
}

/// Polls `cond` (yielding to the runtime) until it holds; fails after ~10 s.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Records every group commit's size.
fn recording_observer() -> (CommitObserver, Arc<Mutex<Vec<usize>>>) {
    let groups = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&groups);
    let observer: CommitObserver =
        Arc::new(move |_latency, requests| sink.lock().unwrap().push(requests));
    (observer, groups)
}

// ---- Cases, each run against MemEngine and RocksEngine (see `inbox_suite!`). ----

async fn append_then_read_in_order(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    for (i, id) in [3u8, 1, 2].into_iter().enumerate() {
        let seqs = stored_seqs(
            inbox
                .append(send(A, 1, B, &[1, 2], id, t + i as u64))
                .await
                .unwrap(),
        );
        let n = i as u64 + 1;
        assert_eq!(seqs, vec![(1, n), (2, n)]);
    }
    let all = inbox.read(B, 1, 0, 100, t).unwrap();
    assert_eq!(seqs_of(&all), vec![1, 2, 3]);
    assert_eq!(
        all.iter().map(|(_, e)| e.msg_id[0]).collect::<Vec<_>>(),
        vec![3, 1, 2],
        "append order"
    );
    let (_, first) = &all[0];
    assert_eq!(
        (first.server_time_ms, first.expires_at_ms),
        (t, t + RETENTION_MS_DEFAULT)
    );
    assert_eq!(
        (first.from_user, first.from_device, first.kind),
        (A, 1, EntryKind::Message)
    );
    assert_eq!(first.body, Bytes::from_static(b"ciphertext"));
    assert_eq!(seqs_of(&inbox.read(B, 1, 1, 100, t).unwrap()), vec![2, 3]);
    assert_eq!(seqs_of(&inbox.read(B, 1, 0, 2, t).unwrap()), vec![1, 2]);
    assert_eq!(
        seqs_of(&inbox.read(B, 1, 3, 100, t).unwrap()),
        Vec::<u64>::new()
    );
    assert!(inbox.read(B, 1, u64::MAX, 100, t).unwrap().is_empty());
    assert!(inbox.read(B, 1, 0, 0, t).unwrap().is_empty());
    assert_eq!(
        seqs_of(&inbox.read(B, 2, 0, 100, t).unwrap()),
        vec![1, 2, 3]
    );
    assert!(inbox.read(B, 3, 0, 100, t).unwrap().is_empty());
    assert!(inbox.read(A, 1, 0, 100, t).unwrap().is_empty());
    assert_eq!(inbox.entries_total(), 6);
    assert_counts_match_disk(&*engine, &inbox);
    // The gauge is loaded from the counters at start.
    drop(inbox);
    let inbox = Inbox::start(engine, config()).unwrap();
    assert_eq!(inbox.entries_total(), 6);
}

async fn dedup_catches_retries_within_the_window(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    stored_seqs(inbox.append(send(A, 1, B, &[1], 7, t)).await.unwrap());
    // A retry of the same (sender device, msg_id) to the same user: the original time.
    let retry = inbox.append(send(A, 1, B, &[1], 7, t + 50)).await.unwrap();
    assert_eq!(retry, AppendOutcome::Duplicate { server_time_ms: t });
    // Another device of the sender may reuse the id: a different message.
    assert_eq!(
        stored_seqs(inbox.append(send(A, 2, B, &[1], 7, t + 60)).await.unwrap()),
        vec![(1, 2)]
    );
    // Another user cannot suppress it either.
    assert_eq!(
        stored_seqs(inbox.append(send(9, 1, B, &[1], 7, t + 70)).await.unwrap()),
        vec![(1, 3)]
    );
    // The same key to another recipient is its own message.
    assert_eq!(
        stored_seqs(inbox.append(send(A, 1, 3, &[1], 7, t + 80)).await.unwrap()),
        vec![(1, 1)]
    );
    // No dedup key: never a duplicate.
    let mut plain = send(A, 1, B, &[1], 7, t + 90);
    plain.dedup = None;
    assert_eq!(
        stored_seqs(inbox.append(plain.clone()).await.unwrap()),
        vec![(1, 4)]
    );
    assert_eq!(
        stored_seqs(inbox.append(plain).await.unwrap()),
        vec![(1, 5)]
    );
    assert_eq!(inbox.read(B, 1, 0, 100, t).unwrap().len(), 5);
    // An append with no entries only records its key (e.g. a receipt to one's only device).
    let bare = Append {
        to_user: B,
        dedup: Some((A, 3, [42; 16])),
        entries: Vec::new(),
        now_ms: t,
    };
    assert_eq!(
        inbox.append(bare.clone()).await.unwrap(),
        AppendOutcome::Stored {
            server_time_ms: t,
            seqs: vec![]
        }
    );
    assert_eq!(
        inbox.append(bare).await.unwrap(),
        AppendOutcome::Duplicate { server_time_ms: t }
    );
    // After the window the key is free again.
    let later = t + DEDUP_WINDOW_MS_DEFAULT;
    assert_eq!(
        stored_seqs(inbox.append(send(A, 1, B, &[1], 7, later)).await.unwrap()),
        vec![(1, 6)]
    );
    assert_counts_match_disk(&*engine, &inbox);
}

async fn quota_full_stores_nothing(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(
        Arc::clone(&engine),
        InboxConfig {
            device_quota: 3,
            ..config()
        },
    )
    .unwrap();
    let t = now();
    for id in 0..3 {
        stored_seqs(inbox.append(send(A, 1, B, &[1], id, t)).await.unwrap());
    }
    stored_seqs(inbox.append(send(A, 1, B, &[2], 10, t)).await.unwrap());
    let full = inbox.append(send(A, 1, B, &[1, 2], 11, t)).await.unwrap();
    assert_eq!(full, AppendOutcome::Full { devices: vec![1] });
    assert_eq!(
        inbox.read(B, 2, 0, 100, t).unwrap().len(),
        1,
        "nothing stored for device 2 either"
    );
    assert_eq!(inbox.read(B, 1, 0, 100, t).unwrap().len(), 3);
    // Two entries for one device in one append count twice against its quota.
    let mut two = send(A, 1, B, &[2, 2, 2], 12, t);
    two.dedup = None;
    assert_eq!(
        inbox.append(two).await.unwrap(),
        AppendOutcome::Full { devices: vec![2] }
    );
    // A Full append left no dedup record: the retry after an ack is stored.
    inbox.ack(B, 1, vec![1], t).await.unwrap();
    assert_eq!(
        stored_seqs(inbox.append(send(A, 1, B, &[1, 2], 11, t)).await.unwrap()),
        vec![(1, 4), (2, 2)]
    );
    assert_counts_match_disk(&*engine, &inbox);
}

async fn ack_deletes_own_entries_and_receipts_once(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    // A's device 1 sends to B's devices 1 and 2, and a copy to A's own device 2.
    stored_seqs(inbox.append(send(A, 1, B, &[1, 2], 5, t)).await.unwrap());
    stored_seqs(inbox.append(send(A, 1, A, &[2], 5, t)).await.unwrap());
    // A message without a dedup key, and a receipt entry.
    let mut plain = send(A, 1, B, &[1, 2], 6, t);
    plain.dedup = None;
    stored_seqs(inbox.append(plain).await.unwrap());
    let receipt = Entry {
        kind: EntryKind::Read,
        receipt_msg_ids: vec![[1; 16]],
        ..Entry::message(A, 1, [8; 16], Bytes::new())
    };
    stored_seqs(
        inbox
            .append(Append {
                to_user: B,
                dedup: None,
                entries: vec![(1, receipt)],
                now_ms: t,
            })
            .await
            .unwrap(),
    );

    // Device 2 of B can only touch its own inbox: seq 3 exists only on device 1.
    assert!(inbox.ack(B, 2, vec![3, 99], t).await.unwrap().is_empty());
    assert_eq!(inbox.read(B, 1, 0, 100, t).unwrap().len(), 3);

    let acked = inbox
        .ack(B, 1, vec![1, 2, 3, 2, 1_000], t + 1)
        .await
        .unwrap();
    let summary: Vec<_> = acked
        .iter()
        .map(|a| (a.seq, a.kind, a.msg_id[0], a.first_ack))
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, EntryKind::Message, 5, true),
            (2, EntryKind::Message, 6, true),
            (3, EntryKind::Read, 8, false),
        ]
    );
    assert!(inbox.read(B, 1, 0, 100, t).unwrap().is_empty());
    assert_eq!(
        inbox.read(B, 2, 0, 100, t).unwrap().len(),
        2,
        "device 2 untouched"
    );
    // The two first acks made one receipt for A, written with the ack into B's outbox (A's
    // devices were not named as local senders).
    assert_eq!(outbox_of(&inbox, B, t), vec![(A, vec![[5; 16], [6; 16]])]);
    assert_eq!(inbox.outbox().next().await, BTreeSet::from([B]));
    // Acking again: unknown seqs, nothing happens.
    assert!(inbox
        .ack(B, 1, vec![1, 2, 3], t + 2)
        .await
        .unwrap()
        .is_empty());
    // The other device's acks are not first acks.
    let acked = inbox.ack(B, 2, vec![1, 2], t + 3).await.unwrap();
    assert_eq!(
        acked.iter().map(|a| a.first_ack).collect::<Vec<_>>(),
        vec![false, false]
    );
    // A's own copy: no receipt to oneself.
    let own = inbox.ack(A, 2, vec![1], t + 4).await.unwrap();
    assert_eq!(own.len(), 1);
    assert!(!own[0].first_ack);
    // The receipt flag does not make the message a duplicate-forever: still the original.
    assert_eq!(
        inbox.append(send(A, 1, B, &[1], 5, t + 5)).await.unwrap(),
        AppendOutcome::Duplicate { server_time_ms: t }
    );
    assert_eq!(inbox.entries_total(), 1, "the outbox row");
    assert_counts_match_disk(&*engine, &inbox);
    clear_outbox(&inbox, B, t).await;
    assert_eq!(inbox.entries_total(), 0);
    assert_counts_match_disk(&*engine, &inbox);
}

async fn receipt_is_tracked_past_the_dedup_window(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    stored_seqs(inbox.append(send(A, 1, B, &[1, 2, 3], 5, t)).await.unwrap());
    // Both acks come after the dedup record expired (and was removed by expiry, or on RocksDB
    // is left for compaction to drop: expired either way).
    let late = t + DEDUP_WINDOW_MS_DEFAULT + 1;
    assert_eq!(
        inbox.expire_report(late).await.unwrap(),
        ExpireReport {
            entries: 0,
            dedup_records: if engine.drops_expired_dedup() { 0 } else { 1 },
            ..ExpireReport::default()
        }
    );
    let first = inbox.ack(B, 1, vec![1], late).await.unwrap();
    let second = inbox.ack(B, 2, vec![1], late + 1000).await.unwrap();
    assert!(first[0].first_ack);
    assert!(!second[0].first_ack);
    // One acked in the window and one after it: the flag outlives the original window.
    stored_seqs(inbox.append(send(A, 1, B, &[1, 2], 6, t)).await.unwrap());
    assert!(
        inbox
            .ack(B, 1, vec![2], t + DEDUP_WINDOW_MS_DEFAULT - 1)
            .await
            .unwrap()[0]
            .first_ack
    );
    inbox.expire(t + DEDUP_WINDOW_MS_DEFAULT + 1).await.unwrap();
    assert!(
        !inbox
            .ack(B, 2, vec![2], t + DEDUP_WINDOW_MS_DEFAULT + 1)
            .await
            .unwrap()[0]
            .first_ack
    );
    assert_counts_match_disk(&*engine, &inbox);
}

async fn seqs_are_never_reused_across_restarts(fixture: Fixture) {
    let t = now();
    let (engine, dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    for id in 0..3 {
        stored_seqs(inbox.append(send(A, 1, B, &[1], id, t)).await.unwrap());
    }
    assert_eq!(inbox.ack(B, 1, vec![1, 2, 3], t).await.unwrap().len(), 3);
    clear_outbox(&inbox, B, t).await;
    assert_eq!(inbox.entries_total(), 0);
    drop(inbox);

    let (engine, dir) = reopen((engine, dir));
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    assert_eq!(
        stored_seqs(inbox.append(send(A, 1, B, &[1], 10, t)).await.unwrap()),
        vec![(1, 4)]
    );
    // Dropping the device keeps its counter too.
    assert_eq!(inbox.drop_device(B, 1).await.unwrap(), 1);
    drop(inbox);

    let (engine, _dir) = reopen((engine, dir));
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    assert_eq!(inbox.entries_total(), 0);
    assert_eq!(
        stored_seqs(inbox.append(send(A, 1, B, &[1], 11, t)).await.unwrap()),
        vec![(1, 5)]
    );
    assert_counts_match_disk(&*engine, &inbox);
}

async fn expiry_deletes_old_entries_and_dedup_records(fixture: Fixture) {
    let (engine, _dir) = fixture;
    // Minutes, not milliseconds: RocksDB's compaction filter may drop dedup records once
    // the real clock passes their expiry, which must not happen while the test runs.
    const S: u64 = 1_000;
    let retention_ms = 1_000 * S;
    let dedup_window_ms = 500 * S;
    let inbox = Inbox::start(
        Arc::clone(&engine),
        InboxConfig {
            retention_ms,
            dedup_window_ms,
            ..config()
        },
    )
    .unwrap();
    let t = now();
    stored_seqs(inbox.append(send(A, 1, B, &[1, 2], 1, t)).await.unwrap());
    stored_seqs(
        inbox
            .append(send(A, 1, B, &[1], 2, t + 600 * S))
            .await
            .unwrap(),
    );
    stored_seqs(
        inbox
            .append(send(A, 1, 3, &[1], 3, t + 100 * S))
            .await
            .unwrap(),
    );
    // Reads skip expired entries before expiry deletes them.
    assert_eq!(
        seqs_of(&inbox.read(B, 1, 0, 100, t + retention_ms).unwrap()),
        vec![2]
    );
    assert!(inbox
        .read(B, 2, 0, 100, t + retention_ms)
        .unwrap()
        .is_empty());
    assert_eq!(
        inbox.expire_report(t + 499 * S).await.unwrap(),
        ExpireReport::default()
    );
    // An engine that drops expired dedup records in compaction is not scanned for them.
    let dedup = |n| if engine.drops_expired_dedup() { 0 } else { n };
    assert_eq!(
        inbox.expire_report(t + retention_ms).await.unwrap(),
        ExpireReport {
            entries: 2,
            dedup_records: dedup(2),
            ..ExpireReport::default()
        }
    );
    assert_eq!(inbox.entries_total(), 2);
    assert_counts_match_disk(&*engine, &inbox);
    assert_eq!(
        inbox.expire_report(t + retention_ms).await.unwrap(),
        ExpireReport::default(),
        "idempotent"
    );
    assert_eq!(
        inbox.expire_report(t + 1_600 * S).await.unwrap(),
        ExpireReport {
            entries: 2,
            dedup_records: dedup(1),
            ..ExpireReport::default()
        }
    );
    assert_eq!(inbox.entries_total(), 0);
    assert_eq!(
        engine
            .scan(Cf::Dedup, &[], &[0xff, 0xff], 10)
            .unwrap()
            .is_empty(),
        !engine.drops_expired_dedup()
    );
    assert_counts_match_disk(&*engine, &inbox);
    // Expired entries' seqs are not reused either.
    assert_eq!(
        stored_seqs(
            inbox
                .append(send(A, 1, B, &[1], 4, t + 2_000 * S))
                .await
                .unwrap()
        ),
        vec![(1, 3)]
    );
}

/// An entry stored with its own, earlier expiry (a status) between two ordinary messages: reads
/// skip it once it has expired, while the device has not drained; the sweep deletes it (and
/// counts it acknowledged) once it is the oldest entry of its device on disk.
async fn an_entry_may_expire_before_the_retention(fixture: Fixture) {
    let (engine, _dir) = fixture;
    const S: u64 = 1_000;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    stored_seqs(inbox.append(send(A, 1, B, &[1], 1, t)).await.unwrap());
    let mut short = send(A, 1, B, &[1], 2, t);
    short.entries[0].1.expires_at_ms = t + 10 * S;
    stored_seqs(inbox.append(short).await.unwrap());
    // An expiry past the retention is cut to it.
    let mut long = send(A, 1, B, &[1], 3, t);
    long.entries[0].1.expires_at_ms = u64::MAX;
    stored_seqs(inbox.append(long).await.unwrap());

    let all = inbox.read(B, 1, 0, 100, t).unwrap();
    let expiries: Vec<_> = all.iter().map(|(_, e)| e.expires_at_ms).collect();
    assert_eq!(
        expiries,
        vec![
            t + RETENTION_MS_DEFAULT,
            t + 10 * S,
            t + RETENTION_MS_DEFAULT
        ]
    );
    let later = t + 20 * S;
    assert_eq!(
        seqs_of(&inbox.read(B, 1, 0, 100, later).unwrap()),
        vec![1, 3]
    );
    // The older message is still on disk in front of it: the sweep stops there (readers skip
    // it all the same, and the sweep deletes it once it is the oldest entry on disk).
    assert_eq!(inbox.expire(later).await.unwrap(), 0);
    assert_counts_match_disk(&*engine, &inbox);

    // In front of the inbox (device 2 got only the short one and then a message), the sweep
    // deletes it, counted as acknowledged.
    let mut short = send(A, 1, B, &[2], 4, t);
    short.entries[0].1.expires_at_ms = t + 10 * S;
    stored_seqs(inbox.append(short).await.unwrap());
    stored_seqs(inbox.append(send(A, 1, B, &[2], 5, t)).await.unwrap());
    assert_eq!(inbox.expire(later).await.unwrap(), 1);
    assert_eq!(seqs_of(&inbox.read(B, 2, 0, 100, t).unwrap()), vec![2]);
    assert_eq!(inbox.entries_total(), 4);
    assert_counts_match_disk(&*engine, &inbox);
}

async fn expiry_pages_through_many_devices(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(
        Arc::clone(&engine),
        InboxConfig {
            retention_ms: 1_000,
            ..config()
        },
    )
    .unwrap();
    let t = now();
    // More keys than one expiry chunk, spread over users, with live entries in between.
    let mut expected = 0;
    for user in 0..40u64 {
        for i in 0..30u8 {
            let at = if user % 3 == 0 && i >= 20 {
                t + 5_000
            } else {
                expected += 1;
                t
            };
            let mut a = send(A, 1, 10_000 + user, &[1], i, at);
            a.dedup = None;
            stored_seqs(inbox.append(a).await.unwrap());
        }
    }
    assert_eq!(inbox.expire(t + 1_000).await.unwrap() as u64, expected);
    assert_eq!(inbox.entries_total(), 40 * 30 - expected);
    assert_counts_match_disk(&*engine, &inbox);
}

async fn drop_device_removes_its_entries_only(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    for id in 0..4 {
        stored_seqs(inbox.append(send(A, 1, B, &[1, 2], id, t)).await.unwrap());
    }
    assert_eq!(inbox.drop_device(B, 1).await.unwrap(), 4);
    assert!(inbox.read(B, 1, 0, 100, t).unwrap().is_empty());
    assert_eq!(inbox.read(B, 2, 0, 100, t).unwrap().len(), 4);
    assert_eq!(inbox.entries_total(), 4);
    assert_eq!(inbox.drop_device(B, 1).await.unwrap(), 0, "idempotent");
    assert_eq!(inbox.drop_device(B, 9).await.unwrap(), 0, "unknown device");
    assert!(inbox.ack(B, 1, vec![1, 2], t).await.unwrap().is_empty());
    assert_counts_match_disk(&*engine, &inbox);
}

async fn group_commit_groups_queued_requests(fixture: Fixture) {
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
    // The first request is taken alone and holds the writer inside its write.
    let first = tokio::spawn({
        let inbox = inbox.clone();
        async move { inbox.append(send(A, 1, B, &[1], 0, t)).await }
    });
    wait_until("the writer is inside the first write", || {
        gated.entered.load(Ordering::SeqCst) == 1
    })
    .await;
    // Meanwhile 99 more queue up, from 99 tasks, one of them a duplicate of another.
    let mut tasks = Vec::new();
    for i in 1..100u64 {
        let inbox = inbox.clone();
        let id = if i == 99 { 98 } else { i as u8 };
        tasks.push(tokio::spawn(async move {
            inbox.append(send(A, 1, B, &[1, 2], id, t)).await
        }));
    }
    wait_until("99 requests are queued", || inbox.queued() == 99).await;
    gated.open_gate();
    assert_eq!(stored_seqs(first.await.unwrap().unwrap()), vec![(1, 1)]);
    let mut duplicates = 0;
    for task in tasks {
        match task.await.unwrap().unwrap() {
            AppendOutcome::Stored { .. } => {}
            AppendOutcome::Duplicate { server_time_ms } => {
                assert_eq!(server_time_ms, t);
                duplicates += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(duplicates, 1, "a duplicate within one group is caught");
    assert_eq!(
        *groups.lock().unwrap(),
        vec![1, 99],
        "100 requests, 2 commits"
    );
    assert_eq!(
        seqs_of(&inbox.read(B, 1, 0, 1000, t).unwrap()),
        (1..=99).collect::<Vec<_>>()
    );
    assert_eq!(inbox.entries_total(), 1 + 98 * 2);
    assert_counts_match_disk(&*gated, &inbox);
}

async fn group_limits_split_groups(fixture: Fixture) {
    let (inner, _dir) = fixture;
    let gated = Arc::new(GatedEngine::new(inner));
    let (observer, groups) = recording_observer();
    let config = InboxConfig {
        group_requests_max: 10,
        observer: Some(observer),
        ..config()
    };
    let inbox = Inbox::start(Arc::clone(&gated) as Arc<dyn Engine>, config).unwrap();
    let t = now();
    let first = tokio::spawn({
        let inbox = inbox.clone();
        async move { inbox.append(send(A, 1, B, &[1], 0, t)).await }
    });
    wait_until("the writer is inside the first write", || {
        gated.entered.load(Ordering::SeqCst) == 1
    })
    .await;
    let mut tasks = Vec::new();
    for i in 1..=25u8 {
        let inbox = inbox.clone();
        tasks.push(tokio::spawn(async move {
            inbox.append(send(A, 1, B, &[1], i, t)).await
        }));
    }
    wait_until("25 requests are queued", || inbox.queued() == 25).await;
    gated.open_gate();
    first.await.unwrap().unwrap();
    for task in tasks {
        stored_seqs(task.await.unwrap().unwrap());
    }
    assert_eq!(*groups.lock().unwrap(), vec![1, 10, 10, 5]);
}

async fn concurrent_appends_get_unique_ordered_seqs(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let (observer, groups) = recording_observer();
    let inbox = Inbox::start(
        Arc::clone(&engine),
        InboxConfig {
            observer: Some(observer),
            ..config()
        },
    )
    .unwrap();
    let t = now();
    let mut tasks = Vec::new();
    for sender in 0..20u64 {
        let inbox = inbox.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for id in 0..10u8 {
                let out = inbox
                    .append(send(100 + sender, 1, B, &[1, 2], id, t))
                    .await
                    .unwrap();
                seqs.push(stored_seqs(out)[0].1);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let seqs = task.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one sender's messages keep their order"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=200).collect::<Vec<_>>());
    assert_eq!(groups.lock().unwrap().iter().sum::<usize>(), 200);
    assert_counts_match_disk(&*engine, &inbox);
}

async fn failed_writes_fail_every_request_and_leave_no_drift(fixture: Fixture) {
    let (inner, _dir) = fixture;
    let failing = Arc::new(FailingEngine {
        inner,
        fail: AtomicBool::new(false),
        written: AtomicBool::new(false),
    });
    let engine = Arc::clone(&failing) as Arc<dyn Engine>;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    stored_seqs(inbox.append(send(A, 1, B, &[1, 2], 1, t)).await.unwrap());
    stored_seqs(inbox.append(send(A, 1, B, &[1], 2, t)).await.unwrap());
    assert!(inbox.storage_failing().is_none());

    failing.fail.store(true, Ordering::SeqCst);
    let err = inbox
        .append(send(A, 1, B, &[1, 2], 3, t))
        .await
        .unwrap_err();
    assert!(
        matches!(err, InboxError::Storage(StorageError::Io(_))),
        "{err}"
    );
    assert_eq!(err.code(), ringpost_wire::ErrorCode::StorageUnavailable);
    assert!(matches!(
        inbox.ack(B, 1, vec![1], t).await,
        Err(InboxError::Storage(_))
    ));
    assert!(matches!(
        inbox.drop_device(B, 2).await,
        Err(InboxError::Storage(_))
    ));
    assert!(matches!(
        inbox.expire(t + RETENTION_MS_DEFAULT).await,
        Err(InboxError::Storage(_))
    ));
    // Nothing changed: not on disk, not in the gauge.
    assert_eq!(seqs_of(&inbox.read(B, 1, 0, 100, t).unwrap()), vec![1, 2]);
    assert_eq!(inbox.entries_total(), 3);
    assert_counts_match_disk(&*engine, &inbox);
    // `/readyz` reports it, with the error.
    let (_, why) = inbox.storage_failing().expect("storage is failing");
    assert!(!why.is_empty());

    failing.fail.store(false, Ordering::SeqCst);
    // The failed append left no dedup record and consumed no seq that was handed out.
    assert_eq!(
        stored_seqs(inbox.append(send(A, 1, B, &[1, 2], 3, t)).await.unwrap()),
        vec![(1, 3), (2, 2)]
    );
    assert!(
        inbox.storage_failing().is_none(),
        "a synced write clears it"
    );
    let acked = inbox.ack(B, 1, vec![1], t).await.unwrap();
    assert!(
        acked[0].first_ack,
        "the failed ack did not consume the receipt"
    );
    assert_eq!(
        inbox.entries_total(),
        5,
        "four pending, the receipt in B's outbox"
    );
    assert_counts_match_disk(&*engine, &inbox);
}

/// An ack whose group commit is reported failed but whose batch is on disk all the same (a
/// failed fsync after the WAL append): its delivered receipt sits in the acking user's outbox,
/// and the retried ack is no first ack, so nothing else would ever send it. The outbox is told
/// about the user anyway. Used to be: the receipt waited there until the node restarted
/// (chaos `cluster-storage` lost such receipts).
async fn an_ack_reported_failed_but_written_still_sends_its_receipt(fixture: Fixture) {
    let (inner, _dir) = fixture;
    let failing = Arc::new(FailingEngine {
        inner,
        fail: AtomicBool::new(false),
        written: AtomicBool::new(true),
    });
    let engine = Arc::clone(&failing) as Arc<dyn Engine>;
    let unsure = Arc::new(Mutex::new(Vec::new()));
    let seen = unsure.clone();
    let config = InboxConfig {
        on_unsure: Some(Arc::new(move |user, device| {
            seen.lock().unwrap().push((user, device))
        })),
        ..config()
    };
    let inbox = Inbox::start(Arc::clone(&engine), config).unwrap();
    let t = now();
    stored_seqs(inbox.append(send(A, 1, B, &[1], 5, t)).await.unwrap());
    failing.fail.store(true, Ordering::SeqCst);
    // A message whose append is reported failed but is on disk: its device is named, so that
    // its connection reads the inbox again (the entry was handed to none).
    assert!(inbox.append(send(A, 1, B, &[1], 6, t)).await.is_err());
    assert_eq!(unsure.lock().unwrap().clone(), vec![(B, 1)]);
    assert_eq!(seqs_of(&inbox.read(B, 1, 0, 100, t).unwrap()), vec![1, 2]);
    assert!(inbox.ack(B, 1, vec![1, 2], t).await.is_err());
    failing.fail.store(false, Ordering::SeqCst);
    // The ack's batch is on disk: the receipt for A is in B's outbox...
    assert_eq!(outbox_of(&inbox, B, t), vec![(A, vec![[5; 16], [6; 16]])]);
    // ...the retried ack is no first ack...
    assert!(inbox.ack(B, 1, vec![1, 2], t).await.unwrap().is_empty());
    // ...and the outbox sender learns of B all the same.
    let next = tokio::time::timeout(Duration::from_secs(10), inbox.outbox().next()).await;
    assert_eq!(next.ok(), Some(BTreeSet::from([B])));
}

async fn shutdown_answers_queued_requests_and_joins(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    let tasks: Vec<_> = (0..20u8)
        .map(|i| {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.append(send(A, 1, B, &[1], i, t)).await })
        })
        .collect();
    drop(inbox);
    for task in tasks {
        stored_seqs(task.await.unwrap().unwrap());
    }
    // Every handle is gone and the writer joined: it no longer holds the engine.
    assert_eq!(Arc::strong_count(&engine), 1);
    assert_eq!(count_entries(&*engine).unwrap(), 20);
}

macro_rules! inbox_suite {
    ($fixture:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                super::$case($fixture()).await;
            }
        )*
    };
}

macro_rules! inbox_cases {
    ($fixture:path) => {
        inbox_suite!($fixture;
            append_then_read_in_order,
            dedup_catches_retries_within_the_window,
            quota_full_stores_nothing,
            ack_deletes_own_entries_and_receipts_once,
            receipt_is_tracked_past_the_dedup_window,
            seqs_are_never_reused_across_restarts,
            expiry_deletes_old_entries_and_dedup_records,
            expiry_pages_through_many_devices,
            an_entry_may_expire_before_the_retention,
            drop_device_removes_its_entries_only,
            group_commit_groups_queued_requests,
            group_limits_split_groups,
            concurrent_appends_get_unique_ordered_seqs,
            failed_writes_fail_every_request_and_leave_no_drift,
            an_ack_reported_failed_but_written_still_sends_its_receipt,
            shutdown_answers_queued_requests_and_joins,
            an_expired_status_leaves_disk_behind_older_entries,
            status_index_rows_go_with_their_entries,
        );
    };
}

mod mem_engine {
    inbox_cases!(crate::storage::suite::mem_fixture);
}

mod rocks_engine {
    inbox_cases!(crate::storage::suite::rocks_fixture);
}

/// Hand-off: the write fence, imports, shard drops and the sync barrier.
mod handoff;

/// Acks as a floor: crashes, receipts with their acks, bulk removal, old counters.
mod floor;

/// Group message bodies stored once per shard and reference-counted.
mod bodies;

/// The expiry index of entries that expire before the retention (statuses).
mod expiry;
use expiry::{
    an_expired_status_leaves_disk_behind_older_entries, status_index_rows_go_with_their_entries,
};

// ---- Engine-independent checks. ----

#[tokio::test]
async fn requests_over_their_bounds_are_refused() {
    let (engine, _dir) = mem_fixture();
    let inbox = Inbox::start(engine, config()).unwrap();
    let t = now();
    let too_many = send(A, 1, B, &[1; APPEND_ENTRIES_MAX + 1], 1, t);
    assert!(matches!(
        inbox.append(too_many).await,
        Err(InboxError::LimitExceeded { .. })
    ));
    let mut big = send(A, 1, B, &[1], 1, t);
    big.entries[0].1.body = Bytes::from(vec![0; ENTRY_BODY_BYTES_MAX + 1]);
    let err = inbox.append(big).await.unwrap_err();
    assert_eq!(err.code(), ringpost_wire::ErrorCode::LimitExceeded);
    let mut heavy = send(A, 1, B, &[1, 2, 3], 1, t);
    for (_, e) in &mut heavy.entries {
        e.body = Bytes::from(vec![0; ENTRY_BODY_BYTES_MAX]);
    }
    assert!(matches!(
        inbox.append(heavy).await,
        Err(InboxError::LimitExceeded {
            what: "append bytes",
            ..
        })
    ));
    let mut receipts = send(A, 1, B, &[1], 1, t);
    receipts.entries[0].1.receipt_msg_ids = vec![[0; 16]; RECEIPT_MSG_IDS_MAX + 1];
    assert!(matches!(
        inbox.append(receipts).await,
        Err(InboxError::LimitExceeded { .. })
    ));
    let mut mismatched = send(A, 1, B, &[1], 1, t);
    mismatched.entries[0].1.from_device = 2;
    assert!(matches!(
        inbox.append(mismatched).await,
        Err(InboxError::Invalid(_))
    ));
    let acks = vec![1; ACK_SEQS_MAX + 1];
    assert!(matches!(
        inbox.ack(B, 1, acks, t).await,
        Err(InboxError::LimitExceeded { .. })
    ));
    assert!(inbox.ack(B, 1, Vec::new(), t).await.unwrap().is_empty());
    assert_eq!(inbox.entries_total(), 0);
}

#[test]
fn invalid_configs_are_refused() {
    for config in [
        InboxConfig {
            shard_count: 0,
            ..config()
        },
        InboxConfig {
            queue_depth: 0,
            ..config()
        },
        InboxConfig {
            group_requests_max: 0,
            ..config()
        },
        InboxConfig {
            device_quota: 0,
            ..config()
        },
    ] {
        assert!(matches!(
            Inbox::start(mem_fixture().0, config),
            Err(InboxError::Invalid(_))
        ));
    }
}

#[test]
fn corrupt_counters_fail_start_instead_of_guessing() {
    let (engine, _dir) = mem_fixture();
    let mut b = WriteBatch::new();
    b.put(Cf::InboxMeta, device_prefix(1, B, 1), vec![9, 9]);
    engine.write(b, true).unwrap();
    assert!(matches!(
        Inbox::start(engine, config()),
        Err(InboxError::Storage(StorageError::Corrupt {
            cf: "inbox_meta",
            ..
        }))
    ));
}

#[tokio::test]
async fn corrupt_entries_are_reported_by_read_and_deletable_by_ack() {
    let (engine, _dir) = mem_fixture();
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    stored_seqs(inbox.append(send(A, 1, B, &[1], 1, t)).await.unwrap());
    let shard = shard_of(B, config().shard_count);
    let mut b = WriteBatch::new();
    b.put(Cf::Inbox, inbox_key(shard, B, 1, 1), vec![1, 0, 0]);
    engine.write(b, true).unwrap();
    let err = inbox.read(B, 1, 0, 10, t).unwrap_err();
    assert_eq!(err.code(), ringpost_wire::ErrorCode::Internal);
    assert!(
        inbox.ack(B, 1, vec![1], t).await.unwrap().is_empty(),
        "deleted, not reported"
    );
    assert!(inbox.read(B, 1, 0, 10, t).unwrap().is_empty());
    assert_counts_match_disk(&*engine, &inbox);
}

#[test]
fn dedup_keys_use_the_recipients_shard() {
    let k = dedup_key(shard_of(B, 16), B, A, 1, &[0; 16]);
    assert_eq!(k[..2], shard_of(B, 16).to_be_bytes());
}
