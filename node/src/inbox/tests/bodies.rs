//! Group message bodies stored once per shard: shared by every entry of the shard, counted,
//! released by acks, expiry and device drops, freed at zero, and never miscounted by a failed
//! group commit. Engine-parameterised cases run on MemEngine and RocksEngine.

use std::collections::{BTreeMap, BTreeSet};

use super::super::bodies::{body_row_key, count_key, count_range, BodyCount};
use super::*;
use crate::handoff::{export_chunk, Row};

const GROUP: [u8; 16] = [0x47; 16];
const PAYLOAD: &str = "group ciphertext, long enough to be worth sharing: 0123456789abcdef";

/// The `nth` user (from 10 000) whose shard is, or is not, `shard`.
fn user(in_shard: bool, shard: ShardId, nth: usize) -> UserId {
    (10_000u64..)
        .filter(|&u| (shard_of(u, config().shard_count) == shard) == in_shard)
        .nth(nth)
        .expect("users exist in every shard")
}

/// A group message's entry body: `group | group_seq | payload`.
fn group_body(group_seq: u64, payload: &str) -> Bytes {
    Bytes::from([&GROUP[..], &group_seq.to_be_bytes(), payload.as_bytes()].concat())
}

/// Group message `group_seq` from A's device 1 to the given devices of `to`, deduped per
/// member as the fan-out stores it.
fn fan_out(to: UserId, devices: &[DeviceId], group_seq: u64, payload: &str, t: u64) -> Append {
    let msg_id = [group_seq as u8; 16];
    let entry = Entry {
        kind: EntryKind::GroupMessage,
        ..Entry::message(A, 1, msg_id, group_body(group_seq, payload))
    };
    Append {
        to_user: to,
        dedup: Some((A, 1, msg_id)),
        entries: devices.iter().map(|&d| (d, entry.clone())).collect(),
        now_ms: t,
    }
}

/// Every shared body: count key → (refs, body). Checks that each count has its body and each
/// body its count.
fn body_rows(engine: &dyn Engine) -> BTreeMap<Vec<u8>, (u64, Bytes)> {
    let all = engine
        .scan(Cf::GroupBodies, &[], &[0xff, 0xff], usize::MAX)
        .unwrap();
    let mut bodies = 0;
    let mut out = BTreeMap::new();
    for (k, v) in &all {
        let shard = u16::from_be_bytes([k[0], k[1]]);
        let (from, to) = count_range(shard);
        if *k < from || *k >= to {
            bodies += 1;
            continue;
        }
        let count = BodyCount::decode(v).unwrap();
        let body = engine
            .get(Cf::GroupBodies, &body_row_key(k))
            .unwrap()
            .expect("a count without its body");
        out.insert(k.clone(), (count.refs, Bytes::from(body)));
    }
    assert_eq!(bodies, out.len(), "a body without its count");
    out
}

/// Every body row's count equals the pending entries on disk that refer to it, and no row
/// is left without one.
fn assert_refs_match_disk(engine: &dyn Engine) {
    let mut referring: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for (key, value) in engine
        .scan(Cf::Inbox, &[], &[0xff, 0xff], usize::MAX)
        .unwrap()
    {
        let (shard, user, device, seq) = parse_inbox_key(&key).unwrap();
        let meta = engine
            .get(Cf::InboxMeta, &device_prefix(shard, user, device))
            .unwrap()
            .unwrap();
        if !Stored::decode(&meta).unwrap().may_deliver(seq) {
            continue;
        }
        let (entry, by_ref) = Entry::decode_stored(Bytes::from(value)).unwrap();
        if by_ref {
            *referring
                .entry(count_key(shard, &entry.body).unwrap())
                .or_default() += 1;
        }
    }
    let rows: BTreeMap<Vec<u8>, u64> = body_rows(engine)
        .into_iter()
        .map(|(k, (refs, _))| (k, refs))
        .collect();
    assert_eq!(rows, referring, "body counts drifted from the entries");
}

fn stored_value_len(engine: &dyn Engine, user: UserId, device: DeviceId, seq: u64) -> usize {
    let shard = shard_of(user, config().shard_count);
    engine
        .get(Cf::Inbox, &inbox_key(shard, user, device, seq))
        .unwrap()
        .expect("the entry")
        .len()
}

async fn a_group_message_is_stored_once_per_shard(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    let shard = shard_of(B, config().shard_count);
    let (c, d) = (user(true, shard, 0), user(true, shard, 1));
    let elsewhere = user(false, shard, 0);
    for (to, devices) in [
        (B, &[1, 2][..]),
        (c, &[1, 2, 3]),
        (d, &[1]),
        (elsewhere, &[1]),
    ] {
        stored_seqs(
            inbox
                .append(fan_out(to, devices, 5, PAYLOAD, t))
                .await
                .unwrap(),
        );
    }
    // One row in B's shard shared by six entries, one in the other shard.
    let rows = body_rows(&*engine);
    let counts: Vec<u64> = rows.values().map(|(refs, _)| *refs).collect();
    assert_eq!(rows.len(), 2, "{counts:?}");
    assert!(counts.contains(&6) && counts.contains(&1), "{counts:?}");
    assert!(rows.values().all(|(_, b)| *b == group_body(5, PAYLOAD)));
    assert_eq!(inbox.group_bodies().get(), (2, 7));
    // Each entry holds only the reference; reads give the whole body back.
    let full = Entry {
        kind: EntryKind::GroupMessage,
        ..Entry::message(A, 1, [5; 16], group_body(5, PAYLOAD))
    };
    assert_eq!(
        stored_value_len(&*engine, c, 3, 1),
        full.encoded_len() - PAYLOAD.len()
    );
    for (to, device) in [(B, 1), (B, 2), (c, 3), (d, 1), (elsewhere, 1)] {
        let read = inbox.read(to, device, 0, 10, t).unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].1.body, group_body(5, PAYLOAD), "{to}/{device}");
        assert_eq!(read[0].1.kind, EntryKind::GroupMessage);
    }
    // The fan-out stored twice (a retry): a duplicate stores nothing and counts nothing.
    assert!(matches!(
        inbox
            .append(fan_out(c, &[1, 2, 3], 5, PAYLOAD, t))
            .await
            .unwrap(),
        AppendOutcome::Duplicate { .. }
    ));
    assert_eq!(inbox.group_bodies().get(), (2, 7));
    assert_refs_match_disk(&*engine);
    assert_counts_match_disk(&*engine, &inbox);

    // A different body under the same group seq (a sender's bug) does not overwrite the shared
    // one: it is stored whole.
    let mut other = fan_out(B, &[3], 5, "another body", t);
    other.dedup = None;
    stored_seqs(inbox.append(other).await.unwrap());
    assert_eq!(
        inbox.read(B, 3, 0, 10, t).unwrap()[0].1.body,
        group_body(5, "another body")
    );
    assert_eq!(
        inbox.read(B, 1, 0, 10, t).unwrap()[0].1.body,
        group_body(5, PAYLOAD)
    );
    inbox.ack(B, 3, vec![1], t).await.unwrap();
    assert_refs_match_disk(&*engine);
}

async fn acks_release_references_and_the_last_frees_the_body(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    let shard = shard_of(B, config().shard_count);
    let c = user(true, shard, 0);
    stored_seqs(
        inbox
            .append(fan_out(B, &[1, 2], 1, PAYLOAD, t))
            .await
            .unwrap(),
    );
    stored_seqs(inbox.append(fan_out(c, &[1], 1, PAYLOAD, t)).await.unwrap());
    stored_seqs(
        inbox
            .append(fan_out(B, &[1, 2], 2, PAYLOAD, t))
            .await
            .unwrap(),
    );
    let refs = || -> Vec<u64> { body_rows(&*engine).values().map(|(r, _)| *r).collect() };
    assert_eq!(refs(), vec![3, 2]);

    // An ack whose header the connection knows (it delivered the entry).
    let delivered = inbox.read(B, 1, 0, 10, t).unwrap();
    let acked = inbox
        .ack_with(AckRequest {
            user: B,
            device: 1,
            seqs: vec![(1, Some(delivered[0].1.header()))],
            senders: Vec::new(),
            now_ms: t,
        })
        .await
        .unwrap();
    assert_eq!(acked.len(), 1);
    assert_eq!(refs(), vec![2, 2]);
    // Acking it again, or a seq that does not exist, changes nothing.
    assert!(inbox.ack(B, 1, vec![1, 77], t).await.unwrap().is_empty());
    assert_eq!(refs(), vec![2, 2]);
    // An ack that reads the header back.
    inbox.ack(B, 2, vec![1, 2], t).await.unwrap();
    assert_eq!(refs(), vec![1, 1]);
    assert_refs_match_disk(&*engine);
    inbox.ack(c, 1, vec![1], t).await.unwrap();
    assert_eq!(refs(), vec![1], "the first message's body is freed");
    inbox.ack(B, 1, vec![2], t).await.unwrap();
    assert!(body_rows(&*engine).is_empty());
    assert_refs_match_disk(&*engine);
    assert_eq!(inbox.entries_total(), 0);
}

async fn expiry_and_device_drops_release_references(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    let shard = shard_of(B, config().shard_count);
    let c = user(true, shard, 0);
    stored_seqs(
        inbox
            .append(fan_out(B, &[1, 2], 1, PAYLOAD, t))
            .await
            .unwrap(),
    );
    stored_seqs(
        inbox
            .append(fan_out(c, &[1, 2], 1, PAYLOAD, t))
            .await
            .unwrap(),
    );
    // A later message to B only, which outlives the first.
    let later = t + 1_000;
    stored_seqs(
        inbox
            .append(fan_out(B, &[1], 2, PAYLOAD, later))
            .await
            .unwrap(),
    );

    // Dropping a device releases its pending entries' references, acknowledged ones not twice.
    inbox.ack(c, 2, vec![1], t).await.unwrap();
    assert_eq!(inbox.drop_device(c, 2).await.unwrap(), 0);
    assert_eq!(inbox.drop_device(c, 1).await.unwrap(), 1);
    let refs = || -> Vec<u64> { body_rows(&*engine).values().map(|(r, _)| *r).collect() };
    assert_eq!(refs(), vec![2, 1]);
    assert_refs_match_disk(&*engine);

    // Expiry releases the expired entries' references: the first body goes with them.
    assert_eq!(inbox.expire(t + RETENTION_MS_DEFAULT).await.unwrap(), 2);
    assert_eq!(refs(), vec![1]);
    assert_refs_match_disk(&*engine);
    assert_eq!(inbox.expire(later + RETENTION_MS_DEFAULT).await.unwrap(), 1);
    assert!(body_rows(&*engine).is_empty());
    assert_eq!(inbox.entries_total(), 0);

    // A body whose count never reached zero (a leak) does not outlive its expiry.
    let mut batch = WriteBatch::new();
    let mut put = |group_seq, expires_at_ms| {
        let key = count_key(shard, &group_body(group_seq, "")).unwrap();
        let count = BodyCount {
            refs: 3,
            expires_at_ms,
        };
        batch.put(Cf::GroupBodies, key.clone(), count.encode());
        batch.put(
            Cf::GroupBodies,
            body_row_key(&key),
            group_body(group_seq, PAYLOAD).to_vec(),
        );
        key
    };
    put(9, t);
    let live_key = put(10, t + 1);
    engine.write(batch, true).unwrap();
    inbox.expire(t).await.unwrap();
    assert_eq!(
        body_rows(&*engine).into_keys().collect::<Vec<_>>(),
        vec![live_key]
    );
}

/// A group commit that fails changes no count; one reported failed that reached the disk all
/// the same leaves counts that match its entries.
async fn a_failed_group_commit_changes_no_count(fixture: Fixture) {
    let (inner, _dir) = fixture;
    let failing = Arc::new(FailingEngine {
        inner,
        fail: AtomicBool::new(false),
        written: AtomicBool::new(false),
    });
    let engine = Arc::clone(&failing) as Arc<dyn Engine>;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    let shard = shard_of(B, config().shard_count);
    let c = user(true, shard, 0);
    stored_seqs(
        inbox
            .append(fan_out(B, &[1, 2], 1, PAYLOAD, t))
            .await
            .unwrap(),
    );
    let before = body_rows(&*engine);

    failing.fail.store(true, Ordering::SeqCst);
    assert!(inbox.append(fan_out(c, &[1], 1, PAYLOAD, t)).await.is_err());
    assert!(inbox.append(fan_out(c, &[1], 2, PAYLOAD, t)).await.is_err());
    assert!(inbox.ack(B, 1, vec![1], t).await.is_err());
    assert!(inbox.drop_device(B, 2).await.is_err());
    assert!(inbox.expire(t + RETENTION_MS_DEFAULT).await.is_err());
    assert_eq!(body_rows(&*engine), before);
    assert_eq!(inbox.group_bodies().get(), (1, 2));

    // Reported failed, written all the same: the next groups read the counts from disk.
    failing.written.store(true, Ordering::SeqCst);
    assert!(inbox.append(fan_out(c, &[1], 1, PAYLOAD, t)).await.is_err());
    assert!(inbox.ack(B, 1, vec![1], t).await.is_err());
    failing.fail.store(false, Ordering::SeqCst);
    assert_refs_match_disk(&*engine);
    assert!(matches!(
        inbox.append(fan_out(c, &[1], 1, PAYLOAD, t)).await.unwrap(),
        AppendOutcome::Duplicate { .. }
    ));
    inbox.ack(B, 2, vec![1], t).await.unwrap();
    inbox.ack(c, 1, vec![1], t).await.unwrap();
    assert!(body_rows(&*engine).is_empty());
    assert_refs_match_disk(&*engine);
    assert_counts_match_disk(&*engine, &inbox);
}

/// Entries stored and released within one group commit (not on disk yet when released): the
/// overlay counts them, and the body row is never written.
async fn references_taken_and_released_in_one_group(fixture: Fixture) {
    let (inner, _dir) = fixture;
    let gated = Arc::new(GatedEngine::new(inner));
    let engine = Arc::clone(&gated) as Arc<dyn Engine>;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    let shard = shard_of(B, config().shard_count);
    let c = user(true, shard, 0);
    // The first append holds the writer inside its write while the rest queue into one group.
    let first = tokio::spawn({
        let inbox = inbox.clone();
        async move { inbox.append(send(A, 1, B, &[1], 0, t)).await }
    });
    wait_until("the first write", || {
        gated.entered.load(Ordering::SeqCst) == 1
    })
    .await;
    let queued = tokio::spawn({
        let inbox = inbox.clone();
        async move {
            let stored = (
                inbox.append(fan_out(B, &[1, 2], 1, PAYLOAD, t)),
                inbox.append(fan_out(c, &[1], 1, PAYLOAD, t)),
                // B's device 1 got seq 1 from the first append: the group message is seq 2.
                inbox.ack(B, 1, vec![2], t),
                inbox.drop_device(B, 2),
            );
            let (b, c_stored, acked, dropped) =
                tokio::join!(stored.0, stored.1, stored.2, stored.3);
            (
                b.unwrap(),
                c_stored.unwrap(),
                acked.unwrap(),
                dropped.unwrap(),
            )
        }
    });
    wait_until("four queued requests", || inbox.queued() == 4).await;
    gated.open_gate();
    stored_seqs(first.await.unwrap().unwrap());
    let (_, _, acked, dropped) = queued.await.unwrap();
    // Acknowledged (its header was not known, so it is not reported), and dropped.
    assert!(acked.is_empty());
    assert_eq!(seqs_of(&inbox.read(B, 1, 0, 10, t).unwrap()), vec![1]);
    assert_eq!(dropped, 1);
    // Only c's reference is left.
    let rows = body_rows(&*engine);
    assert_eq!(rows.values().map(|(r, _)| *r).collect::<Vec<_>>(), vec![1]);
    assert_refs_match_disk(&*engine);
    assert_counts_match_disk(&*engine, &inbox);
}

/// Hand-off carries the body rows with the entries, and a shard drop removes them.
async fn bodies_move_with_their_shard(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    let shard = shard_of(B, config().shard_count);
    let (source_engine, _) = crate::storage::suite::mem_fixture();
    let source = Inbox::start(Arc::clone(&source_engine), config()).unwrap();
    stored_seqs(
        source
            .append(fan_out(B, &[1, 2], 1, PAYLOAD, t))
            .await
            .unwrap(),
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut cursor = None;
    loop {
        let chunk = export_chunk(&*source_engine, shard, cursor.as_ref(), 1 << 20).unwrap();
        rows.extend(chunk.rows);
        match chunk.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    inbox.set_writable(shard, false);
    inbox.import(shard, rows.clone()).await.unwrap();
    inbox.sync_barrier().await.unwrap();
    inbox.set_writable(shard, true);
    assert_eq!(body_rows(&*engine), body_rows(&*source_engine));
    // Exported again from this engine (on RocksDB: body rows resolved from the node's store),
    // the shard is the same rows, body bytes included.
    let mut again: Vec<Row> = Vec::new();
    let mut cursor = None;
    loop {
        let chunk = export_chunk(&*engine, shard, cursor.as_ref(), 1 << 20).unwrap();
        again.extend(chunk.rows);
        match chunk.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(again, rows);
    assert_eq!(
        inbox.read(B, 2, 0, 10, t).unwrap()[0].1.body,
        group_body(1, PAYLOAD)
    );
    inbox.ack(B, 2, vec![1], t).await.unwrap();
    assert_refs_match_disk(&*engine);

    inbox.set_writable(shard, false);
    inbox.drop_shard(shard).await.unwrap();
    assert!(body_rows(&*engine).is_empty());
}

/// Counts the bytes written to [`Cf::GroupBodies`].
struct CountingEngine {
    inner: Arc<dyn Engine>,
    body_bytes: AtomicU64,
}

impl Engine for CountingEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> StorageResult<Option<Vec<u8>>> {
        self.inner.get(cf, key)
    }
    fn write(&self, batch: WriteBatch, sync: bool) -> StorageResult<()> {
        for op in &batch.ops {
            if let crate::storage::Op::Put {
                cf: Cf::GroupBodies,
                key,
                value,
            } = op
            {
                let n = (key.len() + value.len()) as u64;
                self.body_bytes.fetch_add(n, Ordering::SeqCst);
            }
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

/// Taking a reference in a later commit rewrites the count, not the body: the body's bytes are
/// written once however the members' stores are grouped.
async fn later_references_do_not_rewrite_the_body(fixture: Fixture) {
    let (inner, _dir) = fixture;
    let counting = Arc::new(CountingEngine {
        inner,
        body_bytes: AtomicU64::new(0),
    });
    let inbox = Inbox::start(Arc::clone(&counting) as Arc<dyn Engine>, config()).unwrap();
    let t = now();
    let shard = shard_of(B, config().shard_count);
    let payload = "x".repeat(4096);
    for nth in 0..4 {
        let to = user(true, shard, nth);
        stored_seqs(
            inbox
                .append(fan_out(to, &[1, 2], 1, &payload, t))
                .await
                .unwrap(),
        );
    }
    let written = counting.body_bytes.load(Ordering::SeqCst);
    let once = group_body(1, &payload).len() as u64;
    assert!(
        written < once + 4 * 64,
        "{written} bytes written for a {once}-byte body"
    );
    assert_eq!(inbox.group_bodies().get(), (1, 8));
}

/// Logical bytes (keys and values) one group message costs a destination node, with the
/// brief's numbers: 256 shards over 3 nodes, a 256-member group (~85 members on this node, one
/// device each), a 1 KiB ciphertext. Printed for the record; asserted: one body per shard.
#[tokio::test]
async fn bytes_per_group_message_per_destination_node() {
    let config = InboxConfig {
        shard_count: 256,
        ..InboxConfig::default()
    };
    let (engine, _dir) = crate::storage::suite::mem_fixture();
    let inbox = Inbox::start(Arc::clone(&engine), config.clone()).unwrap();
    let t = now();
    // This node's shards: a third of them.
    let members: Vec<UserId> = (10_000u64..)
        .filter(|&u| shard_of(u, 256).is_multiple_of(3))
        .take(85)
        .collect();
    let payload = "c".repeat(1024);
    for &m in &members {
        stored_seqs(
            inbox
                .append(fan_out(m, &[1], 1, &payload, t))
                .await
                .unwrap(),
        );
    }
    let shards: BTreeSet<ShardId> = members.iter().map(|&m| shard_of(m, 256)).collect();
    let bytes = |cf| -> usize {
        engine
            .scan(cf, &[], &[0xff, 0xff], usize::MAX)
            .unwrap()
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum()
    };
    let (entries, bodies) = (bytes(Cf::Inbox), bytes(Cf::GroupBodies));
    let (counters, dedup) = (bytes(Cf::InboxMeta), bytes(Cf::Dedup));
    let whole_copies = members.len()
        * (super::super::keys::INBOX_KEY_LEN
            + Entry {
                kind: EntryKind::GroupMessage,
                ..Entry::message(A, 1, [1; 16], group_body(1, &payload))
            }
            .encoded_len());
    eprintln!(
        "{} members in {} shards: entries {entries} B + bodies {bodies} B = {} B \
         (whole copies: {whole_copies} B); plus dedup records {dedup} B and device counters \
         {counters} B",
        members.len(),
        shards.len(),
        entries + bodies
    );
    assert_eq!(inbox.group_bodies().get(), (shards.len() as u64, 85));
    assert!(entries + bodies < whole_copies);
}

/// Physical bytes one group message costs a destination node on RocksDB, with the numbers of
/// the test above (85 members in a third of 256 shards, a 1 KiB ciphertext): every shard keeps
/// its logical body row, but on disk it is an empty marker and the body is stored once for
/// the node ([`Cf::BodyStore`]). Printed for the record; asserted: one physical body.
#[tokio::test]
async fn physical_bytes_per_group_message_per_destination_node() {
    let config = InboxConfig {
        shard_count: 256,
        ..InboxConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let rocks = Arc::new(
        crate::storage::rocks::RocksEngine::open(
            dir.path(),
            &crate::storage::rocks::RocksConfig::for_tests(),
        )
        .unwrap(),
    );
    let engine: Arc<dyn Engine> = Arc::clone(&rocks) as Arc<dyn Engine>;
    let inbox = Inbox::start(Arc::clone(&engine), config.clone()).unwrap();
    let t = now();
    let members: Vec<UserId> = (10_000u64..)
        .filter(|&u| shard_of(u, 256).is_multiple_of(3))
        .take(85)
        .collect();
    let payload = "c".repeat(1024);
    for &m in &members {
        stored_seqs(
            inbox
                .append(fan_out(m, &[1], 1, &payload, t))
                .await
                .unwrap(),
        );
    }
    let shards: BTreeSet<ShardId> = members.iter().map(|&m| shard_of(m, 256)).collect();
    let bytes = |pairs: &[(Vec<u8>, Vec<u8>)]| -> usize {
        pairs.iter().map(|(k, v)| k.len() + v.len()).sum()
    };
    let logical = engine
        .scan(Cf::GroupBodies, &[], &[0xff, 0xff], usize::MAX)
        .unwrap();
    let (shard_rows, store) = (
        rocks.raw_pairs(Cf::GroupBodies),
        rocks.raw_pairs(Cf::BodyStore),
    );
    let entries = bytes(&rocks.raw_pairs(Cf::Inbox));
    eprintln!(
        "{} members in {} shards: entries {entries} B + body rows {} B (markers and counts) + \
         store {} B = {} B; logical body rows {} B",
        members.len(),
        shards.len(),
        bytes(&shard_rows),
        bytes(&store),
        entries + bytes(&shard_rows) + bytes(&store),
        bytes(&logical),
    );
    // One count and one body in the store, for the whole node.
    assert_eq!(store.len(), 2, "{store:?}");
    assert_eq!(store[1].1, group_body(1, &payload).to_vec());
    // Every shard keeps its count and body rows; the body rows are markers.
    assert_eq!(shard_rows.len(), 2 * shards.len());
    let (counts, markers): (Vec<_>, Vec<_>) =
        (shard_rows.iter()).partition(|(k, _)| crate::storage::group_body_ref(k).is_none());
    assert_eq!(counts.len(), shards.len());
    assert!(markers.iter().all(|(_, v)| v.is_empty()));
    // Read back, each shard's body row is the whole body.
    assert_eq!(logical.len(), 2 * shards.len());
    let whole = group_body(1, &payload).to_vec();
    let resolved = logical.iter().filter(|(_, v)| *v == whole).count();
    assert_eq!(resolved, shards.len());
    // Per shard a count row and a marker (keys and 17-byte count); once, the store's count
    // and body.
    assert_eq!(bytes(&shard_rows), shards.len() * (2 * 27 + 17));
    assert_eq!(bytes(&store), (25 + 9) + (25 + whole.len()));
    assert_eq!(inbox.group_bodies().get(), (shards.len() as u64, 85));
}

macro_rules! bodies_cases {
    ($fixture:path) => {
        inbox_suite!($fixture;
            a_group_message_is_stored_once_per_shard,
            acks_release_references_and_the_last_frees_the_body,
            expiry_and_device_drops_release_references,
            a_failed_group_commit_changes_no_count,
            references_taken_and_released_in_one_group,
            bodies_move_with_their_shard,
            later_references_do_not_rewrite_the_body,
        );
    };
}

mod mem_engine {
    bodies_cases!(crate::storage::suite::mem_fixture);
}

mod rocks_engine {
    bodies_cases!(crate::storage::suite::rocks_fixture);
}
