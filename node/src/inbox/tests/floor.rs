//! Acks as a floor: crashes that lose unsynced writes, receipts written with their acks, reads
//! from the floor, bulk removal, and counters from before floors existed.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::super::device::encode_v1;
use super::*;
use crate::storage::mem::MemEngine;
use crate::storage::Op;

/// An engine that models what a crash keeps: every write is visible at once, but only synced
/// writes (and every write before one) survive [`CrashEngine::crash`], as with a WAL whose
/// unsynced tail is lost with the machine.
#[derive(Default)]
struct CrashEngine {
    visible: MemEngine,
    durable: MemEngine,
    unsynced: Mutex<Vec<WriteBatch>>,
    /// Every batch written, for tests of what the writer writes.
    log: Mutex<Vec<WriteBatch>>,
}

impl CrashEngine {
    /// What a restarted node finds: the durable writes only.
    fn crash(&self) -> Arc<CrashEngine> {
        let after = CrashEngine::default();
        for cf in Cf::ALL {
            let mut batch = WriteBatch::new();
            for (k, v) in self
                .durable
                .scan(cf, &[], &[0xff, 0xff, 0xff], usize::MAX)
                .unwrap()
            {
                batch.put(cf, k, v);
            }
            after.visible.write(batch.clone(), true).unwrap();
            after.durable.write(batch, true).unwrap();
        }
        Arc::new(after)
    }
}

impl Engine for CrashEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> StorageResult<Option<Vec<u8>>> {
        self.visible.get(cf, key)
    }
    fn write(&self, batch: WriteBatch, sync: bool) -> StorageResult<()> {
        self.log.lock().unwrap().push(batch.clone());
        self.visible.write(batch.clone(), false)?;
        let mut unsynced = self.unsynced.lock().unwrap();
        unsynced.push(batch);
        if sync {
            for b in unsynced.drain(..) {
                self.durable.write(b, true)?;
            }
        }
        Ok(())
    }
    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> StorageResult<Vec<(Vec<u8>, Vec<u8>)>> {
        self.visible.scan(cf, from, to, limit)
    }
    fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> StorageResult<Option<(Vec<u8>, Vec<u8>)>> {
        self.visible.last_in(cf, from, to)
    }
}

fn start(engine: &Arc<CrashEngine>) -> Inbox {
    Inbox::start(Arc::clone(engine) as Arc<dyn Engine>, config()).unwrap()
}

/// A sole-copy message from A's device 1 to B's device 1.
fn to_b(id: u8, t: u64) -> Append {
    send(A, 1, B, &[1], id, t)
}

/// Acks as the node does: headers known, A's devices named so receipts go to A's inbox.
async fn ack_as_node(inbox: &Inbox, seqs: &[u64], t: u64) -> Vec<Acked> {
    let delivered = inbox.read(B, 1, 0, READ_ENTRIES_MAX, t).unwrap();
    let seqs = seqs
        .iter()
        .map(|s| {
            let header = delivered
                .iter()
                .find(|(seq, _)| seq == s)
                .map(|(_, e)| e.header());
            (*s, header)
        })
        .collect();
    inbox
        .ack_with(AckRequest {
            user: B,
            device: 1,
            seqs,
            senders: vec![(A, vec![1])],
            now_ms: t,
        })
        .await
        .unwrap()
}

/// The msg ids A's device 1 holds delivered receipts for.
fn receipted(inbox: &Inbox, t: u64) -> BTreeSet<u8> {
    inbox
        .read(A, 1, 0, READ_ENTRIES_MAX, t)
        .unwrap()
        .into_iter()
        .filter(|(_, e)| e.kind == EntryKind::Delivered)
        .flat_map(|(_, e)| e.receipt_msg_ids)
        .map(|id| id[0])
        .collect()
}

#[derive(Debug, Clone)]
enum Action {
    Send,
    /// Ack this many of the oldest pending seqs, in order.
    Ack(usize),
    /// Ack one pending seq out of order (the k-th pending, modulo).
    AckOne(usize),
    Sync,
    Trim,
    Crash,
}

fn op() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => Just(Action::Send),
        3 => (1usize..5).prop_map(Action::Ack),
        1 => (0usize..8).prop_map(Action::AckOne),
        1 => Just(Action::Sync),
        1 => Just(Action::Trim),
        1 => Just(Action::Crash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever point a crash hits, every acknowledged send (a durable `SendAck`) is delivered
    /// until its ack was made durable, and never after; and a message whose ack survived has
    /// its receipt too.
    #[test]
    fn a_crash_redelivers_and_never_loses(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let t = now();
            let mut engine = Arc::new(CrashEngine::default());
            let mut inbox = start(&engine);
            // Model: msg id by seq of every stored message; seqs acked (visible); seqs whose
            // ack is durable.
            let mut sent: BTreeMap<u64, u8> = BTreeMap::new();
            let mut acked_visible: BTreeSet<u64> = BTreeSet::new();
            let mut acked_durable: BTreeSet<u64> = BTreeSet::new();
            let mut next_id = 0u8;
            for op in ops {
                match op {
                    Action::Send => {
                        next_id = next_id.wrapping_add(1);
                        let seqs = stored_seqs(inbox.append(to_b(next_id, t)).await.unwrap());
                        // A synced append makes every earlier ack durable too.
                        acked_durable.extend(acked_visible.iter().copied());
                        sent.insert(seqs[0].1, next_id);
                    }
                    Action::Ack(n) => {
                        let pending: Vec<u64> = sent.keys().copied()
                            .filter(|s| !acked_visible.contains(s)).take(n).collect();
                        if pending.is_empty() { continue; }
                        let acked = ack_as_node(&inbox, &pending, t).await;
                        assert_eq!(acked.len(), pending.len());
                        assert!(acked.iter().all(|a| a.first_ack));
                        acked_visible.extend(pending);
                    }
                    Action::AckOne(k) => {
                        let pending: Vec<u64> = sent.keys().copied()
                            .filter(|s| !acked_visible.contains(s)).collect();
                        if pending.is_empty() { continue; }
                        let seq = pending[k % pending.len()];
                        ack_as_node(&inbox, &[seq], t).await;
                        acked_visible.insert(seq);
                    }
                    Action::Sync => {
                        inbox.sync_barrier().await.unwrap();
                        acked_durable.extend(acked_visible.iter().copied());
                    }
                    Action::Trim => {
                        inbox.trim().await.unwrap();
                    }
                    Action::Crash => {
                        drop(inbox);
                        engine = engine.crash();
                        inbox = start(&engine);
                        acked_visible = acked_durable.clone();
                    }
                }
                // Every pending message is readable, nothing acked is.
                let readable: Vec<u64> = seqs_of(&inbox.read(B, 1, 0, READ_ENTRIES_MAX, t).unwrap());
                let expected: Vec<u64> = sent.keys().copied()
                    .filter(|s| !acked_visible.contains(s)).collect();
                assert_eq!(readable, expected);
                assert!(acked_durable.iter().all(|s| !readable.contains(s)),
                    "a durably acked entry is delivered again");
                // Receipts: exactly the acked messages' (acks and receipts share batches).
                let want: BTreeSet<u8> = acked_visible.iter().map(|s| sent[s]).collect();
                assert_eq!(receipted(&inbox, t), want);
                assert_eq!(inbox.entries_total(), (expected.len() + receipted_entries(&inbox, t)) as u64);
                assert_counts_match_disk(&*engine, &inbox);
            }
        });
    }
}

/// Every op the writer wrote since the log was last cleared, in order.
fn written_ops(engine: &CrashEngine) -> Vec<Op> {
    let log = engine.log.lock().unwrap();
    log.iter().flat_map(|b| b.ops.clone()).collect()
}

fn receipted_entries(inbox: &Inbox, t: u64) -> usize {
    inbox.read(A, 1, 0, READ_ENTRIES_MAX, t).unwrap().len()
}

/// The receipt of a message is in the same batch as its ack: a crash keeps both or neither, so
/// a crash between "the ack" and "the receipt" cannot lose the receipt.
#[tokio::test]
async fn a_delivered_receipt_survives_a_crash_between_ack_and_receipt() {
    let t = now();
    let engine = Arc::new(CrashEngine::default());
    let inbox = start(&engine);
    stored_seqs(inbox.append(to_b(1, t)).await.unwrap());
    // The ack and its receipt are written, not synced; the machine dies.
    let acked = ack_as_node(&inbox, &[1], t).await;
    assert!(acked[0].first_ack);
    assert_eq!(receipted(&inbox, t), BTreeSet::from([1]));
    drop(inbox);
    let engine = engine.crash();
    let inbox = start(&engine);
    // Neither survived: the message is delivered again, and its ack makes the receipt again.
    assert_eq!(seqs_of(&inbox.read(B, 1, 0, 10, t).unwrap()), vec![1]);
    assert!(receipted(&inbox, t).is_empty());
    assert!(ack_as_node(&inbox, &[1], t).await[0].first_ack);
    // This time a synced write follows (any append): both survive.
    stored_seqs(inbox.append(to_b(2, t)).await.unwrap());
    drop(inbox);
    let engine = engine.crash();
    let inbox = start(&engine);
    assert_eq!(seqs_of(&inbox.read(B, 1, 0, 10, t).unwrap()), vec![2]);
    assert_eq!(receipted(&inbox, t), BTreeSet::from([1]));
    assert_counts_match_disk(&*engine, &inbox);
}

/// Acks write no tombstone per entry: the floor moves, and acknowledged entries go in range
/// deletes, one per [`TRIM_SEQS_MIN`] entries of a device or per periodic trim of more than
/// [`TRIM_POINT_DELETES_MAX`].
#[tokio::test]
async fn acknowledged_entries_are_removed_in_bulk() {
    let t = now();
    let engine = Arc::new(CrashEngine::default());
    let inbox = start(&engine);
    let n = 3 * TRIM_SEQS_MIN + 10;
    for i in 0..n {
        stored_seqs(inbox.append(to_b(i as u8, t)).await.unwrap());
        ack_as_node(&inbox, &[i + 1], t).await;
    }
    let ops = written_ops(&engine);
    let point_deletes = ops
        .iter()
        .filter(|op| matches!(op, Op::Delete { cf: Cf::Inbox, .. }))
        .count();
    let range_deletes = ops
        .iter()
        .filter(|op| matches!(op, Op::DeleteRange { cf: Cf::Inbox, .. }))
        .count();
    assert_eq!(point_deletes, 0);
    assert_eq!(range_deletes as u64, n / TRIM_SEQS_MIN);
    // The 10 left below the floor go with the periodic trim once the device is quiet for a
    // whole pass; after it, B's device has nothing on disk, and no read ever saw an
    // acknowledged entry.
    assert_eq!(
        inbox.trim().await.unwrap(),
        0,
        "B's device acked in this pass: active devices trim themselves"
    );
    assert_eq!(
        inbox.trim().await.unwrap(),
        1,
        "quiet for a whole pass: B's device (A's receipts are not acked)"
    );
    let b_keys = engine
        .scan(
            Cf::Inbox,
            &device_prefix(shard_of(B, 16), B, 1),
            &prefix_end(&device_prefix(shard_of(B, 16), B, 1)),
            usize::MAX,
        )
        .unwrap();
    assert!(b_keys.is_empty(), "{} entries left", b_keys.len());
    assert_eq!(inbox.trim().await.unwrap(), 0, "nothing left to trim");
    assert_counts_match_disk(&*engine, &inbox);
}

/// A periodic trim of a device with few acknowledged entries deletes each of them (no range
/// tombstone, which every later read of the memtable would pay for) and nothing else.
#[tokio::test]
async fn a_short_trim_deletes_entries_one_by_one() {
    let t = now();
    let engine = Arc::new(CrashEngine::default());
    let inbox = start(&engine);
    let n = TRIM_POINT_DELETES_MAX;
    for i in 0..n + 1 {
        stored_seqs(inbox.append(to_b(i as u8, t)).await.unwrap());
    }
    // Out of order: the floor reaches n only with the last ack.
    let mut acks: Vec<u64> = (2..=n).collect();
    acks.push(1);
    for seq in acks {
        ack_as_node(&inbox, &[seq], t).await;
    }
    engine.log.lock().unwrap().clear();
    assert_eq!(inbox.trim().await.unwrap(), 0, "acked in this pass");
    assert_eq!(inbox.trim().await.unwrap(), 1, "quiet for a whole pass");
    let shard = shard_of(B, 16);
    let ops = written_ops(&engine);
    let deleted: Vec<Vec<u8>> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Delete { cf: Cf::Inbox, key } => Some(key.clone()),
            _ => None,
        })
        .collect();
    let expected: Vec<Vec<u8>> = (1..=n).map(|seq| inbox_key(shard, B, 1, seq)).collect();
    assert_eq!(deleted, expected);
    assert!(
        !ops.iter()
            .any(|op| matches!(op, Op::DeleteRange { cf: Cf::Inbox, .. })),
        "no range tombstone"
    );
    let prefix = device_prefix(shard, B, 1);
    let left = engine
        .scan(Cf::Inbox, &prefix, &prefix_end(&prefix), usize::MAX)
        .unwrap();
    assert_eq!(left.len(), 1, "only the unacknowledged entry stays");
    assert_eq!(seqs_of(&inbox.read(B, 1, 0, 10, t).unwrap()), vec![n + 1]);
    assert_eq!(inbox.trim().await.unwrap(), 0, "nothing left to trim");
    assert_counts_match_disk(&*engine, &inbox);
}

/// Reads start at the floor and skip what was acknowledged out of order; acks of seqs not
/// pending change nothing.
#[tokio::test]
async fn reads_start_at_the_floor() {
    let t = now();
    let engine = Arc::new(CrashEngine::default());
    let inbox = start(&engine);
    for i in 0..6 {
        stored_seqs(inbox.append(to_b(i, t)).await.unwrap());
    }
    assert_eq!(inbox.ack(B, 1, vec![1, 2, 4], t).await.unwrap().len(), 3);
    assert_eq!(seqs_of(&inbox.read(B, 1, 0, 10, t).unwrap()), vec![3, 5, 6]);
    assert_eq!(seqs_of(&inbox.read(B, 1, 3, 10, t).unwrap()), vec![5, 6]);
    assert!(inbox
        .ack(B, 1, vec![1, 4, 7, 0], t)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(inbox.ack(B, 1, vec![3], t).await.unwrap().len(), 1);
    assert_eq!(seqs_of(&inbox.read(B, 1, 0, 10, t).unwrap()), vec![5, 6]);
    assert_eq!(
        inbox.entries_total(),
        2 + 2,
        "two pending, and an outbox row for each ack"
    );
    assert_counts_match_disk(&*engine, &inbox);
}

/// Counters written before floors existed (format 1) keep working: their entries were deleted
/// one by one, so the floor is rebuilt from what is on disk when the device is next touched.
#[tokio::test]
async fn format_1_counters_convert_on_first_touch() {
    let t = now();
    let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
    let shard = shard_of(B, 16);
    // Seqs 1..=6 were handed out; 1, 2 and 4 were acked (deleted) under format 1.
    let mut batch = WriteBatch::new();
    for seq in [3u64, 5, 6] {
        let mut e = msg(A, 1, seq as u8, "old");
        e.expires_at_ms = t + RETENTION_MS_DEFAULT;
        e.server_time_ms = t;
        batch.put(Cf::Inbox, inbox_key(shard, B, 1, seq), e.encode());
    }
    batch.put(Cf::InboxMeta, device_prefix(shard, B, 1), encode_v1(7, 3));
    engine.write(batch, true).unwrap();

    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    assert_eq!(inbox.entries_total(), 3);
    assert_eq!(seqs_of(&inbox.read(B, 1, 0, 10, t).unwrap()), vec![3, 5, 6]);
    assert_counts_match_disk(&*engine, &inbox);
    // The first ack converts the record: 4 was acked long ago, so acking 3 lifts the floor to
    // 4, and 5 and 6 stay pending.
    assert_eq!(inbox.ack(B, 1, vec![3], t).await.unwrap().len(), 1);
    assert_eq!(seqs_of(&inbox.read(B, 1, 0, 10, t).unwrap()), vec![5, 6]);
    let meta = engine
        .get(Cf::InboxMeta, &device_prefix(shard, B, 1))
        .unwrap()
        .unwrap();
    assert_eq!(
        super::super::device::Stored::decode(&meta).unwrap(),
        super::super::device::Stored::Current(super::super::device::DeviceMeta {
            next_seq: 7,
            floor: 4,
            acked_above: vec![],
        })
    );
    assert_eq!(
        stored_seqs(inbox.append(to_b(9, t)).await.unwrap()),
        vec![(1, 7)]
    );
    assert_counts_match_disk(&*engine, &inbox);
}

/// Out-of-order acks beyond the bound are not recorded: the entry stays pending (and is
/// delivered again), nothing grows without bound.
#[tokio::test]
async fn out_of_order_acks_are_bounded() {
    let t = now();
    let engine = Arc::new(CrashEngine::default());
    let inbox = Inbox::start(
        Arc::clone(&engine) as Arc<dyn Engine>,
        InboxConfig {
            device_quota: 2 * ACKED_ABOVE_MAX as u64,
            ..config()
        },
    )
    .unwrap();
    let n = ACKED_ABOVE_MAX as u64 + 3;
    for i in 0..n {
        let mut a = to_b(0, t);
        a.dedup = None;
        a.entries[0].1.msg_id = [(i % 251) as u8; 16];
        stored_seqs(inbox.append(a).await.unwrap());
    }
    // Everything but seq 1, in pages of the wire's limit.
    let all: Vec<u64> = (2..=n).collect();
    let mut recorded = 0;
    for page in all.chunks(ACK_SEQS_MAX) {
        recorded += inbox.ack(B, 1, page.to_vec(), t).await.unwrap().len();
    }
    assert_eq!(recorded, ACKED_ABOVE_MAX);
    assert_eq!(
        seqs_of(&inbox.read(B, 1, 0, 10, t).unwrap()),
        vec![1, n - 1, n]
    );
    assert_eq!(inbox.ack(B, 1, vec![1], t).await.unwrap().len(), 1);
    assert_eq!(
        seqs_of(&inbox.read(B, 1, 0, 10, t).unwrap()),
        vec![n - 1, n]
    );
    assert_counts_match_disk(&*engine, &inbox);
}
