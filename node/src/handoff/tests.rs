//! Tests of export, validation and digests (on the in-memory and the RocksDB engine), and of a
//! whole hand-off through the inbox and accounts services.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ringpost_wire::{CodeChannel, DeviceId, UserId};

use super::*;
use crate::accounts::{AccountError, AccountsConfig, CodeSender, SendFuture};
use crate::inbox::{Append, AppendOutcome, Entry, EntryKind, InboxConfig};
use crate::keys::Keys;
use crate::shard::shard_of;
use crate::storage::suite::{mem_fixture, Fixture};
use crate::storage::WriteBatch;
use crate::storage::{key, Cf};

/// Shards populated by the export tests: both ends of the id space and neighbours.
const POPULATED: [ShardId; 5] = [0, 1, 2, u16::MAX - 2, u16::MAX - 1];

fn cf_index(cf: Cf) -> u8 {
    SHARD_CFS
        .iter()
        .position(|&c| c == cf)
        .expect("a shard family") as u8
}

fn row(cf: Cf, key: Vec<u8>, value: Vec<u8>) -> Row {
    Row {
        cf: cf_index(cf),
        key,
        value,
    }
}

/// Writes rows of varied sizes into every family (the node-local ones too) for each populated shard, plus
/// keys beyond the last shard id; returns what each shard holds, in export order.
fn populate(engine: &dyn Engine) -> BTreeMap<ShardId, Vec<Row>> {
    let mut batch = WriteBatch::new();
    let mut model: BTreeMap<ShardId, Vec<Row>> = BTreeMap::new();
    for &shard in &POPULATED {
        for (i, cf) in Cf::ALL.into_iter().enumerate() {
            for n in 0..12u8 {
                let tail = [n, 0xff, (i as u8).wrapping_mul(n)];
                let key = key(shard, &[&tail[..1 + usize::from(n % 3)]]);
                let len = (usize::from(n) * 37 + i * 11) % 300;
                let value: Vec<u8> = (0..len).map(|b| (b as u8) ^ n).collect();
                batch.put(cf, key.clone(), value.clone());
                if crate::shard_rows::is_shard_prefixed(cf) {
                    model.entry(shard).or_default().push(row(cf, key, value));
                }
            }
        }
    }
    // Rows under the prefix `0xffff`, which is no shard: never part of the last shard.
    for cf in SHARD_CFS {
        batch.put(cf, vec![0xff, 0xff, 1], vec![1]);
        batch.put(cf, vec![0xff, 0xff], vec![2]);
    }
    engine.write(batch, true).unwrap();
    for rows in model.values_mut() {
        rows.sort_by(|a, b| (a.cf, &a.key).cmp(&(b.cf, &b.key)));
    }
    model
}

/// Every chunk of `shard`, from the start.
fn export_all(engine: &dyn Engine, shard: ShardId, max_bytes: usize) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut cursor = None;
    for _ in 0..100_000 {
        let chunk = export_chunk(engine, shard, cursor.as_ref(), max_bytes).unwrap();
        cursor = chunk.next.clone();
        chunks.push(chunk);
        if cursor.is_none() {
            return chunks;
        }
    }
    panic!("the export of shard {shard} does not end");
}

fn digest_of(rows: &[Row]) -> ShardDigest {
    let mut digest = Digest::default();
    for row in rows {
        digest.add(row);
    }
    digest.finish()
}

fn export_reassembles_each_shard_exactly(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let model = populate(&*engine);
    for (&shard, expected) in &model {
        for max_bytes in [0, 1, 100, 1000, CHUNK_BYTES_DEFAULT] {
            let chunks = export_all(&*engine, shard, max_bytes);
            for (i, chunk) in chunks.iter().enumerate() {
                assert!(
                    !chunk.rows.is_empty() || chunks.len() == 1,
                    "shard {shard}, {max_bytes} B: chunk {i} is empty"
                );
                validate_rows(shard, &chunk.rows).unwrap();
                let bytes: usize = chunk.rows.iter().map(Row::encoded_len).sum();
                assert!(
                    bytes <= max_bytes.max(chunk.rows[0].encoded_len()),
                    "shard {shard}: a chunk of {bytes} B for a budget of {max_bytes} B"
                );
            }
            let rows: Vec<Row> = chunks.into_iter().flat_map(|c| c.rows).collect();
            assert_eq!(&rows, expected, "shard {shard}, chunks of {max_bytes} B");
            assert_eq!(
                digest_of(&rows),
                shard_digest(&*engine, shard, 0).unwrap(),
                "shard {shard}"
            );
        }
    }
    assert_eq!(
        export_all(&*engine, 3, 1000),
        vec![Chunk {
            rows: Vec::new(),
            next: None
        }]
    );
}

fn export_refuses_rows_the_importer_would_refuse(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let mut batch = WriteBatch::new();
    batch.put(Cf::Inbox, key(3, &[]), vec![1]);
    batch.put(
        Cf::Prekeys,
        key(4, &[&[1]]),
        vec![0; ROW_VALUE_BYTES_MAX + 1],
    );
    engine.write(batch, true).unwrap();
    for shard in [3, 4] {
        assert!(
            matches!(
                export_chunk(&*engine, shard, None, CHUNK_BYTES_DEFAULT),
                Err(HandoffError::InvalidRow { index: 0, .. })
            ),
            "shard {shard}"
        );
    }
}

/// Chunk bounds: a row larger than the budget still goes alone, and a chunk never holds more
/// than [`CHUNK_ROWS_MAX`] rows however small.
fn chunks_respect_their_bounds(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let mut batch = WriteBatch::new();
    for n in 0..CHUNK_ROWS_MAX as u32 + 10 {
        batch.put(Cf::Verify, key(9, &[&n.to_be_bytes()]), Vec::new());
    }
    batch.put(Cf::Prekeys, key(9, &[&[1]]), vec![7; 10_000]);
    engine.write(batch, true).unwrap();
    let chunks = export_all(&*engine, 9, CHUNK_BYTES_MAX);
    let sizes: Vec<usize> = chunks.iter().map(|c| c.rows.len()).collect();
    assert_eq!(sizes, vec![CHUNK_ROWS_MAX, 11]);
    let chunks = export_all(&*engine, 9, 10);
    let last = chunks.last().unwrap();
    assert_eq!(last.rows.len(), 1);
    assert_eq!(last.rows[0].value.len(), 10_000);
}

macro_rules! engine_cases {
    ($fixture:path) => {
        #[test]
        fn export_reassembles_each_shard_exactly() {
            super::export_reassembles_each_shard_exactly($fixture());
        }
        #[test]
        fn export_refuses_rows_the_importer_would_refuse() {
            super::export_refuses_rows_the_importer_would_refuse($fixture());
        }
        #[test]
        fn chunks_respect_their_bounds() {
            super::chunks_respect_their_bounds($fixture());
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn hand_off_through_the_services_moves_the_shard_exactly() {
            super::hand_off_through_the_services_moves_the_shard_exactly($fixture, $fixture).await;
        }
    };
}

mod mem_engine {
    engine_cases!(crate::storage::suite::mem_fixture);
}

mod rocks_engine {
    engine_cases!(crate::storage::suite::rocks_fixture);
}

#[test]
fn shard_cfs_are_the_shard_prefixed_families() {
    let prefixed: Vec<Cf> = Cf::ALL
        .into_iter()
        .filter(|&cf| crate::shard_rows::is_shard_prefixed(cf))
        .collect();
    let mut listed = SHARD_CFS.to_vec();
    listed.sort();
    assert_eq!(listed, prefixed);
    assert!(!SHARD_CFS.contains(&Cf::Meta));
}

#[test]
fn digest_changes_with_any_byte() {
    let rows = vec![
        row(Cf::Accounts, key(5, &[&[1, 2]]), vec![3, 4, 5]),
        row(Cf::Inbox, key(5, &[&[9]]), Vec::new()),
        row(Cf::Prekeys, key(5, &[&[7, 7, 7]]), vec![0; 20]),
    ];
    let base = digest_of(&rows);
    assert_eq!(base, digest_of(&rows.clone()), "deterministic");
    assert_eq!(
        (base.rows, base.bytes),
        (3, 3 * ROW_HEADER_BYTES as u64 + (4 + 3 + 5) + (3 + 20))
    );
    let mut variants: Vec<Vec<Row>> = Vec::new();
    for i in 0..rows.len() {
        for at in 0..rows[i].key.len() {
            let mut v = rows.clone();
            v[i].key[at] ^= 1;
            variants.push(v);
        }
        for at in 0..rows[i].value.len() {
            let mut v = rows.clone();
            v[i].value[at] ^= 0x80;
            variants.push(v);
        }
        let mut v = rows.clone();
        v[i].cf ^= 1;
        variants.push(v);
        let mut v = rows.clone();
        v.remove(i);
        variants.push(v);
    }
    // The same bytes framed differently: the last key byte moved into the value.
    let mut v = rows.clone();
    let moved = v[0].key.pop().unwrap();
    v[0].value.insert(0, moved);
    variants.push(v);
    let mut v = rows.clone();
    v.swap(0, 2);
    variants.push(v);
    for (i, v) in variants.iter().enumerate() {
        assert_ne!(digest_of(v), base, "variant {i}: {v:?}");
    }
}

#[test]
fn digest_cutoff_leaves_out_only_expired_dedup_records() {
    let dedup = |expiry: u64| row(Cf::Dedup, key(5, &[&[1]]), expiry.to_be_bytes().to_vec());
    let inbox = row(Cf::Inbox, key(5, &[&[2]]), 10u64.to_be_bytes().to_vec());
    let digest = |cutoff: u64, rows: &[Row]| {
        let mut d = Digest::new(cutoff);
        rows.iter().for_each(|r| d.add(r));
        d.finish()
    };
    let without = digest(100, std::slice::from_ref(&inbox));
    assert_eq!(digest(100, &[dedup(100), inbox.clone()]), without);
    assert_eq!(digest(100, &[dedup(99), inbox.clone()]), without);
    assert_ne!(digest(100, &[dedup(101), inbox.clone()]), without);
    let short = row(Cf::Dedup, key(5, &[&[1]]), vec![0; 7]);
    assert_ne!(
        digest(100, &[short, inbox.clone()]),
        without,
        "kept, as RocksDB keeps it"
    );
    assert_eq!(
        digest(100, std::slice::from_ref(&inbox)).rows,
        1,
        "entries are never left out"
    );
    assert_eq!(
        digest_of(&[dedup(1), inbox]).rows,
        2,
        "the default leaves nothing out"
    );
}

#[test]
fn validate_rows_refuses_what_is_not_this_shards() {
    let shard = 7;
    let ok = vec![
        row(Cf::Accounts, key(shard, &[&[1]]), vec![1]),
        row(Cf::Accounts, key(shard, &[&[2]]), Vec::new()),
        row(Cf::Inbox, key(shard, &[&[1]]), vec![0; ROW_VALUE_BYTES_MAX]),
        row(
            Cf::Prekeys,
            key(shard, &[&[0; ROW_KEY_BYTES_MAX - 2]]),
            vec![1],
        ),
    ];
    validate_rows(shard, &ok).unwrap();
    validate_rows(shard, &[]).unwrap();
    let invalid_row = |rows: Vec<Row>, at: usize| match validate_rows(shard, &rows) {
        Err(HandoffError::InvalidRow {
            shard: 7, index, ..
        }) => assert_eq!(index, at),
        other => panic!("expected row {at} refused, got {other:?} for {rows:?}"),
    };
    let with = |at: usize, r: Row| {
        let mut rows = ok.clone();
        rows[at] = r;
        rows
    };
    invalid_row(with(1, row(Cf::Accounts, key(8, &[&[2]]), vec![])), 1);
    invalid_row(with(0, row(Cf::Accounts, key(6, &[&[2]]), vec![])), 0);
    invalid_row(with(1, row(Cf::Accounts, key(shard, &[]), vec![])), 1);
    invalid_row(with(0, row(Cf::Accounts, vec![0], vec![])), 0);
    invalid_row(with(0, row(Cf::Accounts, Vec::new(), vec![])), 0);
    let mut bad_cf = ok.clone();
    bad_cf[2].cf = SHARD_CFS.len() as u8;
    invalid_row(bad_cf, 2);
    let mut bad_cf = ok.clone();
    bad_cf[2].cf = u8::MAX;
    invalid_row(bad_cf, 2);
    let mut long_key = ok.clone();
    long_key[3].key.push(0);
    invalid_row(long_key, 3);
    let mut long_value = ok.clone();
    long_value[2].value.push(0);
    invalid_row(long_value, 2);
    let mut unordered = ok.clone();
    unordered.swap(0, 1);
    invalid_row(unordered, 1);
    let mut repeated = ok.clone();
    repeated[1] = repeated[0].clone();
    invalid_row(repeated, 1);

    let tiny: Vec<Row> = (0..=CHUNK_ROWS_MAX as u32)
        .map(|n| row(Cf::Verify, key(shard, &[&n.to_be_bytes()]), Vec::new()))
        .collect();
    assert!(matches!(
        validate_rows(shard, &tiny),
        Err(HandoffError::ChunkTooLarge { .. })
    ));
    let heavy: Vec<Row> = (0..CHUNK_BYTES_MAX / ROW_VALUE_BYTES_MAX + 1)
        .map(|n| {
            row(
                Cf::Inbox,
                key(shard, &[&[n as u8]]),
                vec![0; ROW_VALUE_BYTES_MAX],
            )
        })
        .collect();
    assert!(matches!(
        validate_rows(shard, &heavy),
        Err(HandoffError::ChunkTooLarge { .. })
    ));
    assert!(matches!(
        validate_rows(u16::MAX, &[]),
        Err(HandoffError::InvalidShard(u16::MAX))
    ));
}

#[test]
fn cursors_from_a_peer_are_checked() {
    let (engine, _dir) = mem_fixture();
    let shard = 7;
    for cursor in [
        Cursor {
            cf: SHARD_CFS.len() as u8,
            after: key(shard, &[&[1]]),
        },
        Cursor {
            cf: 0,
            after: key(shard + 1, &[&[1]]),
        },
        Cursor {
            cf: 0,
            after: key(shard, &[]),
        },
    ] {
        assert!(
            matches!(
                export_chunk(&*engine, shard, Some(&cursor), 100),
                Err(HandoffError::InvalidCursor { shard: 7, .. })
            ),
            "{cursor:?}"
        );
    }
    assert!(matches!(
        export_chunk(&*engine, u16::MAX, None, 100),
        Err(HandoffError::InvalidShard(_))
    ));
}

#[test]
fn chunks_and_digests_roundtrip_through_postcard() {
    let chunk = Chunk {
        rows: vec![
            row(Cf::Accounts, key(7, &[&[1]]), vec![0, 255, 7]),
            row(Cf::Dedup, key(7, &[&[2]]), Vec::new()),
        ],
        next: Some(Cursor {
            cf: 4,
            after: key(7, &[&[2]]),
        }),
    };
    let bytes = postcard::to_allocvec(&chunk).unwrap();
    assert_eq!(postcard::from_bytes::<Chunk>(&bytes).unwrap(), chunk);
    let digest = digest_of(&chunk.rows);
    let bytes = postcard::to_allocvec(&digest).unwrap();
    assert_eq!(postcard::from_bytes::<ShardDigest>(&bytes).unwrap(), digest);
}

// ---- A whole hand-off through the services. ----

const SHARD_COUNT: u16 = 16;
/// The shard handed off; its neighbours are populated too.
const MOVED: ShardId = 5;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Keeps every verification code it is asked to send.
#[derive(Default)]
struct Codes(Mutex<Vec<(UserId, String)>>);

impl CodeSender for Codes {
    fn send<'a>(&'a self, phone: UserId, code: &'a str, _channel: CodeChannel) -> SendFuture<'a> {
        self.0.lock().unwrap().push((phone, code.to_owned()));
        Box::pin(async { Ok(()) })
    }
}

/// One node's storage and services.
struct Node {
    engine: Arc<dyn Engine>,
    inbox: Inbox,
    accounts: Accounts,
    keys: Keys,
    codes: Arc<Codes>,
    _dir: Option<tempfile::TempDir>,
}

impl Node {
    fn start((engine, dir): Fixture) -> Node {
        let codes = Arc::new(Codes::default());
        let inbox = Inbox::start(
            Arc::clone(&engine),
            InboxConfig {
                shard_count: SHARD_COUNT,
                ..InboxConfig::default()
            },
        )
        .unwrap();
        let accounts = Accounts::new(
            Arc::clone(&engine),
            codes.clone(),
            AccountsConfig {
                shard_count: SHARD_COUNT,
                ..AccountsConfig::default()
            },
        );
        let keys = Keys::new(Arc::clone(&engine), SHARD_COUNT);
        Node {
            engine,
            inbox,
            accounts,
            keys,
            codes,
            _dir: dir,
        }
    }

    /// Registers `phone` with a primary and one linked device; returns the primary's token.
    async fn register(&self, phone: UserId, t: u64) -> Vec<u8> {
        self.accounts
            .request_code(phone, CodeChannel::Sms, t)
            .await
            .unwrap();
        let code = self.codes.0.lock().unwrap().last().unwrap().1.clone();
        let verified = self.accounts.verify(phone, &code, "", "phone", t).unwrap();
        let link = self.accounts.issue_link_code(phone, 1, t).unwrap();
        self.accounts.link(phone, &link.code, "laptop", t).unwrap();
        verified.registered.token.as_bytes().to_vec()
    }

    /// Three messages from `from` to devices 1 and 2 of `to`.
    async fn send(&self, from: UserId, to: UserId, t: u64) {
        for id in 0..3u8 {
            let entry = Entry::message(from, 1, [id; 16], Bytes::from_static(b"ciphertext"));
            let append = Append {
                to_user: to,
                dedup: Some((from, 1, [id; 16])),
                entries: vec![(1, entry.clone()), (2, entry)],
                now_ms: t,
            };
            let outcome = self.inbox.append(append).await.unwrap();
            assert!(
                matches!(outcome, AppendOutcome::Stored { .. }),
                "{outcome:?}"
            );
        }
    }

    /// A status from `from` to devices 1 and 2 of `to`: its entries have expiry index rows.
    async fn post_status(&self, from: UserId, to: UserId, t: u64) {
        let entry = Entry {
            kind: EntryKind::Status,
            expires_at_ms: t + 24 * 60 * 60 * 1000,
            ..Entry::message(from, 1, [0xee; 16], Bytes::from_static(b"status"))
        };
        let append = Append {
            to_user: to,
            dedup: Some((from, 1, [0xee; 16])),
            entries: vec![(1, entry.clone()), (2, entry)],
            now_ms: t,
        };
        let outcome = self.inbox.append(append).await.unwrap();
        assert!(
            matches!(outcome, AppendOutcome::Stored { .. }),
            "{outcome:?}"
        );
    }

    /// The shard's rows of `cf`.
    fn rows_in(&self, cf: Cf, shard: ShardId) -> Vec<(Vec<u8>, Vec<u8>)> {
        let from = key(shard, &[]);
        let to = crate::storage::prefix_end(&from);
        self.engine.scan(cf, &from, &to, usize::MAX).unwrap()
    }

    fn inbox_of(&self, user: UserId, device: DeviceId, t: u64) -> Vec<(u64, Entry)> {
        self.inbox.read(user, device, 0, 100, t).unwrap()
    }

    /// Pending entries on disk (acknowledged ones linger below their floors until trimmed).
    fn entries_on_disk(&self) -> u64 {
        crate::inbox::pending_entries_on_disk(&*self.engine)
    }
}

/// Phone numbers in `shard`.
fn phones_in(shard: ShardId) -> impl Iterator<Item = UserId> {
    (15_550_000_000u64..).filter(move |&p| shard_of(p, SHARD_COUNT) == shard)
}

async fn hand_off_through_the_services_moves_the_shard_exactly(
    source_fixture: fn() -> Fixture,
    target_fixture: fn() -> Fixture,
) {
    let t = now();
    let cutoff = t + 60 * 60 * 1000;
    let source = Node::start(source_fixture());
    let target = Node::start(target_fixture());
    let sender = phones_in(0).next().unwrap();
    source.register(sender, t).await;

    // The source holds two users in the moved shard and one in each neighbour, with entries,
    // a receipt's dedup record, linked devices and prekeys.
    let mut moved_users = Vec::new();
    for shard in [MOVED - 1, MOVED, MOVED + 1] {
        let users: Vec<UserId> = phones_in(shard).take(2).collect();
        for &user in &users {
            let token = source.register(user, t).await;
            source.send(sender, user, t).await;
            source.inbox.ack(user, 1, vec![1], t).await.unwrap();
            let signer = ringpost_client::prekeys::DeviceKeys::from_seed([9; 32]);
            source
                .keys
                .upload(user, 1, &signer.upload(None, 0..3))
                .unwrap();
            if shard == MOVED {
                source.post_status(sender, user, t).await;
                moved_users.push((user, token));
            }
        }
    }
    // The target has shards of its own, and a stale account of a moved user whose device
    // list it cached (it owned the shard long ago).
    let (stale, _) = moved_users[0];
    let own = phones_in(MOVED - 1).nth(5).unwrap();
    target.register(own, t).await;
    target.send(sender, own, t).await;
    target
        .accounts
        .request_code(stale, CodeChannel::Sms, t)
        .await
        .unwrap();
    let code = target.codes.0.lock().unwrap().last().unwrap().1.clone();
    target.accounts.verify(stale, &code, "", "old", t).unwrap();
    assert_eq!(target.accounts.devices(stale).unwrap(), vec![1]);
    let neighbours_before: Vec<ShardDigest> = [MOVED - 1, MOVED + 1]
        .map(|s| shard_digest(&*target.engine, s, cutoff).unwrap())
        .to_vec();
    let target_entries_before = target.inbox.entries_total();
    let source_entries_before = source.inbox.entries_total();
    // Two users, eight entries each (three messages and a status to two devices), one acked,
    // whose receipt waits in the user's outbox.
    let moved_entries = 2 * (7 + 1);
    // The statuses' expiry index rows are part of the shard.
    let moved_index_rows = source.rows_in(Cf::InboxExpiry, MOVED);
    assert_eq!(moved_index_rows.len(), 4);

    // Old owner: close and barrier. New owner: pull in small chunks, digest what it got.
    source.inbox.set_writable(MOVED, false);
    source.inbox.sync_barrier().await.unwrap();
    let mut received = Digest::new(cutoff);
    let mut cursor = None;
    let mut chunks = Vec::new();
    loop {
        let chunk = export_chunk(&*source.engine, MOVED, cursor.as_ref(), 200).unwrap();
        validate_rows(MOVED, &chunk.rows).unwrap();
        chunk.rows.iter().for_each(|r| received.add(r));
        target
            .inbox
            .import(MOVED, chunk.rows.clone())
            .await
            .unwrap();
        cursor = chunk.next.clone();
        chunks.push(chunk);
        if cursor.is_none() {
            break;
        }
    }
    assert!(chunks.len() > 10, "{} chunks", chunks.len());
    finish_import(&target.inbox, &target.accounts, MOVED)
        .await
        .unwrap();

    let received = received.finish();
    assert_eq!(target.rows_in(Cf::InboxExpiry, MOVED), moved_index_rows);
    assert_eq!(
        received,
        shard_digest(&*source.engine, MOVED, cutoff).unwrap()
    );
    assert_eq!(
        received,
        shard_digest(&*target.engine, MOVED, cutoff).unwrap()
    );
    for (i, s) in [MOVED - 1, MOVED + 1].into_iter().enumerate() {
        assert_eq!(
            shard_digest(&*target.engine, s, cutoff).unwrap(),
            neighbours_before[i],
            "neighbour {s} changed"
        );
    }
    for (user, token) in &moved_users {
        for device in [1, 2] {
            assert_eq!(
                target.inbox_of(*user, device, t),
                source.inbox_of(*user, device, t)
            );
        }
        assert_eq!(target.accounts.devices(*user).unwrap(), vec![1, 2]);
        target.accounts.authenticate(*user, 1, token).unwrap();
        assert_eq!(target.keys.count(*user, 1).unwrap(), 3);
    }
    assert_eq!(
        target.inbox.entries_total(),
        target_entries_before + moved_entries
    );
    assert_eq!(target.inbox.entries_total(), target.entries_on_disk());
    let restarted = Inbox::start(
        Arc::clone(&target.engine),
        InboxConfig {
            shard_count: SHARD_COUNT,
            ..InboxConfig::default()
        },
    )
    .unwrap();
    assert_eq!(restarted.entries_total(), target.inbox.entries_total());
    drop(restarted);

    // Importing a chunk again changes nothing.
    for chunk in &chunks {
        assert_eq!(
            target
                .inbox
                .import(MOVED, chunk.rows.clone())
                .await
                .unwrap(),
            0
        );
    }
    assert_eq!(
        received,
        shard_digest(&*target.engine, MOVED, cutoff).unwrap()
    );
    // Counters and dedup records moved: seqs continue, a retried send is a duplicate.
    let (user, _) = moved_users[1];
    let entry = Entry::message(sender, 1, [0; 16], Bytes::from_static(b"again"));
    let retried = Append {
        to_user: user,
        dedup: Some((sender, 1, [0; 16])),
        entries: vec![(1, entry.clone())],
        now_ms: t,
    };
    assert!(matches!(
        target.inbox.append(retried.clone()).await.unwrap(),
        AppendOutcome::Duplicate { .. }
    ));
    let fresh = Append {
        dedup: Some((sender, 1, [9; 16])),
        entries: vec![(1, Entry::message(sender, 1, [9; 16], Bytes::new()))],
        ..retried
    };
    match target.inbox.append(fresh).await.unwrap() {
        AppendOutcome::Stored { seqs, .. } => assert_eq!(seqs, vec![(1, 5)]),
        other => panic!("{other:?}"),
    }

    // The old owner drops its copy: exactly that shard, and its gauge follows.
    assert_eq!(source.accounts.devices(user).unwrap(), vec![1, 2]);
    let removed = drop_shard(&source.inbox, &source.accounts, MOVED)
        .await
        .unwrap();
    assert_eq!(removed, moved_entries);
    assert_eq!(
        export_all(&*source.engine, MOVED, CHUNK_BYTES_DEFAULT),
        vec![Chunk {
            rows: Vec::new(),
            next: None
        }]
    );
    assert!(matches!(
        source.accounts.devices(user),
        Err(AccountError::NotFound)
    ));
    for s in [MOVED - 1, MOVED + 1] {
        assert!(shard_digest(&*source.engine, s, cutoff).unwrap().rows > 0);
        for user in phones_in(s).take(2) {
            assert_eq!(source.inbox_of(user, 2, t).len(), 3);
            assert_eq!(source.accounts.devices(user).unwrap(), vec![1, 2]);
        }
    }
    assert_eq!(
        source.inbox.entries_total(),
        source_entries_before - moved_entries
    );
    assert_eq!(source.inbox.entries_total(), source.entries_on_disk());
}
