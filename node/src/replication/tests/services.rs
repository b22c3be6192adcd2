//! The services write through a replicating primary whose sink applies every record to a
//! second RocksDB: after every kind of write, each shard's rows are the same on both.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ringpost_wire::{CodeChannel, UserId};

use super::*;
use crate::accounts::{Accounts, AccountsConfig, CodeSender, SendFuture};
use crate::clock::ExpiryClock;
use crate::handoff::shard_digest;
use crate::inbox::{
    Append, AppendOutcome, Entry, EntryKind, Inbox, InboxConfig, RETENTION_MS_DEFAULT,
};
use crate::keys::Keys;
use crate::replication::{read_position, ReplicatingEngine};
use crate::shard::shard_of;
use crate::storage::Cf;

const SHARD_COUNT: u16 = 8;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[derive(Default)]
struct Codes(Mutex<Vec<String>>);

impl CodeSender for Codes {
    fn send<'a>(&'a self, _phone: UserId, code: &'a str, _channel: CodeChannel) -> SendFuture<'a> {
        self.0.lock().unwrap().push(code.to_owned());
        Box::pin(async { Ok(()) })
    }
}

/// A primary's services on a [`ReplicatingEngine`].
struct Primary {
    engine: Arc<dyn Engine>,
    inbox: Inbox,
    accounts: Accounts,
    keys: Keys,
    codes: Arc<Codes>,
}

impl Primary {
    fn start(inner: Arc<dyn Engine>, sink: Arc<ApplySink>) -> Primary {
        let engine: Arc<dyn Engine> = Arc::new(ReplicatingEngine::new(inner, sink, 1));
        let codes = Arc::new(Codes::default());
        let inbox = Inbox::start(
            engine.clone(),
            InboxConfig {
                shard_count: SHARD_COUNT,
                ..InboxConfig::default()
            },
        )
        .unwrap();
        let accounts = Accounts::new(
            engine.clone(),
            codes.clone(),
            AccountsConfig {
                shard_count: SHARD_COUNT,
                ..AccountsConfig::default()
            },
        );
        let keys = Keys::new(engine.clone(), SHARD_COUNT);
        Primary {
            engine,
            inbox,
            accounts,
            keys,
            codes,
        }
    }

    /// Registers `phone` with a primary device and a linked device 2, and uploads prekeys.
    async fn register(&self, phone: UserId, t: u64) {
        self.accounts
            .request_code(phone, CodeChannel::Sms, t)
            .await
            .unwrap();
        let code = self.codes.0.lock().unwrap().last().unwrap().clone();
        self.accounts.verify(phone, &code, "", "phone", t).unwrap();
        let link = self.accounts.issue_link_code(phone, 1, t).unwrap();
        self.accounts.link(phone, &link.code, "laptop", t).unwrap();
        for device in [1, 2] {
            let signer = ringpost_client::prekeys::DeviceKeys::from_seed([device as u8; 32]);
            self.keys
                .upload(phone, device, &signer.upload(None, 0..4))
                .unwrap();
        }
    }

    /// Messages `ids` from `from` to both devices of each of `to`, all queued at once so the
    /// writer groups them.
    async fn send_all(&self, from: UserId, to: &[UserId], ids: std::ops::Range<u8>, t: u64) {
        let mut sends = Vec::new();
        for &user in to {
            for id in ids.clone() {
                let entry = Entry::message(from, 1, [id; 16], Bytes::from_static(b"ciphertext"));
                let inbox = self.inbox.clone();
                sends.push(tokio::spawn(async move {
                    inbox
                        .append(Append {
                            to_user: user,
                            dedup: Some((from, 1, [id; 16])),
                            entries: vec![(1, entry.clone()), (2, entry)],
                            now_ms: t,
                        })
                        .await
                }));
            }
        }
        for send in sends {
            let outcome = send.await.unwrap().unwrap();
            assert!(
                matches!(outcome, AppendOutcome::Stored { .. }),
                "{outcome:?}"
            );
        }
    }
}

fn phones_in(shard: ShardId) -> impl Iterator<Item = UserId> {
    (15_550_000_000u64..).filter(move |&p| shard_of(p, SHARD_COUNT) == shard)
}

/// Every shard's rows (positions included) are the same on both, and so are their digests;
/// returns how many rows there are in all.
fn assert_replicated(primary: &dyn Engine, replica: &dyn Engine, when: &str) -> usize {
    let mut total = 0;
    for shard in 0..SHARD_COUNT {
        let rows = rows_of(primary, shard);
        let copy = rows_of(replica, shard);
        if rows != copy {
            let at = rows
                .iter()
                .zip(&copy)
                .position(|(a, b)| a != b)
                .unwrap_or(rows.len().min(copy.len()));
            panic!(
                "{when}: shard {shard} differs at row {at} of {} (primary) and {} (replica): \
                 {:?} / {:?}",
                rows.len(),
                copy.len(),
                rows.get(at),
                copy.get(at)
            );
        }
        assert_eq!(
            shard_digest(primary, shard, 0).unwrap(),
            shard_digest(replica, shard, 0).unwrap(),
            "{when}: shard {shard}"
        );
        assert_eq!(
            read_position(primary, shard).unwrap(),
            read_position(replica, shard).unwrap(),
            "{when}: shard {shard}"
        );
        total += rows.len();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_write_reaches_the_replica_exactly() {
    let t = now();
    let primary_dir = tempfile::tempdir().unwrap();
    let open = || -> Arc<dyn Engine> {
        Arc::new(RocksEngine::open(primary_dir.path(), &RocksConfig::for_tests()).unwrap())
    };
    let (replica, _replica_dir) = rocks();
    let sink = ApplySink::new(replica.clone());
    let inner = open();
    let node = Primary::start(inner.clone(), sink.clone());

    // Accounts, links and prekeys: two users in every shard, and a sender.
    let sender = phones_in(0).nth(5).unwrap();
    node.register(sender, t).await;
    let users: Vec<UserId> = (0..SHARD_COUNT)
        .flat_map(|s| phones_in(s).take(2))
        .collect();
    for &user in &users {
        node.register(user, t).await;
    }
    let rows = assert_replicated(&*inner, &*replica, "after registration");
    assert!(rows > 0);

    // Messages, grouped: a group commit is one record per shard it touches. Then a status to
    // every user, whose entries have expiry index rows.
    node.send_all(sender, &users, 0..5, t).await;
    for &user in &users {
        let entry = Entry {
            kind: EntryKind::Status,
            expires_at_ms: t + 24 * 60 * 60 * 1000,
            ..Entry::message(sender, 1, [0xee; 16], Bytes::from_static(b"status"))
        };
        let append = Append {
            to_user: user,
            dedup: Some((sender, 1, [0xee; 16])),
            entries: vec![(1, entry.clone()), (2, entry)],
            now_ms: t,
        };
        let outcome = node.inbox.append(append).await.unwrap();
        assert!(
            matches!(outcome, AppendOutcome::Stored { .. }),
            "{outcome:?}"
        );
    }
    let index_rows = |engine: &dyn Engine| {
        engine
            .scan(Cf::InboxExpiry, &[], &[0xff, 0xff], usize::MAX)
            .unwrap()
            .len()
    };
    assert_eq!(index_rows(&*replica), 2 * users.len());
    for (records, _) in sink.shipped.lock().unwrap().iter() {
        let shards: Vec<ShardId> = records.iter().map(|r| r.shard).collect();
        assert!(shards.windows(2).all(|w| w[0] < w[1]), "{shards:?}");
    }
    assert_replicated(&*inner, &*replica, "after appends");

    // Acks (with their delivered receipts), a prekey claim, a removed device.
    for &user in &users {
        node.inbox.ack(user, 1, vec![1, 2, 3], t).await.unwrap();
    }
    node.keys.claim(users[0], None, &[1, 2], true).unwrap();
    node.accounts.remove_device(users[1], 1, 2).unwrap();
    node.keys.drop_device(users[1], 2).unwrap();
    node.inbox.drop_device(users[1], 2).await.unwrap();
    node.inbox.trim().await.unwrap();
    assert_replicated(&*inner, &*replica, "after acks and a removed device");
    // A status expires a day after it was posted, behind the unacknowledged messages.
    assert!(node.inbox.expire(t + 24 * 60 * 60 * 1000).await.unwrap() > 0);
    assert_eq!(index_rows(&*inner), 0);
    assert_replicated(&*inner, &*replica, "after the statuses expired");

    // Expiry deletes every unacknowledged entry; a shard is dropped.
    let expired = node
        .inbox
        .expire(t + RETENTION_MS_DEFAULT + 1)
        .await
        .unwrap();
    assert!(expired > 0);
    assert_replicated(&*inner, &*replica, "after expiry");
    // A dropped copy is this node's own business (a local batch): nothing is shipped, the
    // replica keeps its copy.
    let dropped = shard_of(users[4], SHARD_COUNT);
    node.inbox.set_writable(dropped, false);
    let shipped = sink.shipped.lock().unwrap().len();
    let kept = rows_of(&*replica, dropped);
    crate::handoff::drop_shard(&node.inbox, &node.accounts, dropped)
        .await
        .unwrap();
    assert!(
        rows_of(&*inner, dropped).is_empty(),
        "nothing left, position included"
    );
    assert_eq!(sink.shipped.lock().unwrap().len(), shipped);
    assert_eq!(rows_of(&*replica, dropped), kept);
    // The shard left both (the replica drops its copy too), so the copies agree again; the
    // shard's log starts over at LSN 1 if this node writes it again.
    let mut gone = crate::storage::WriteBatch::new();
    gone.ops = crate::replication::snapshot_clears(dropped);
    gone.delete_range(
        Cf::ShardLog,
        crate::storage::key(dropped, &[]),
        crate::storage::prefix_end(&crate::storage::key(dropped, &[])),
    );
    replica.write(gone, true).unwrap();
    assert_replicated(&*inner, &*replica, "after a shard drop");

    // The expiry clock is node-local: not replicated.
    let clock = ExpiryClock::load(node.engine.clone(), t).unwrap();
    let shipped = sink.shipped.lock().unwrap().len();
    clock.persist(t + 1).unwrap();
    assert_eq!(sink.shipped.lock().unwrap().len(), shipped);
    assert!(inner
        .get(Cf::Meta, b"expiry_clock_watermark_ms")
        .unwrap()
        .is_some());
    assert_eq!(
        replica.get(Cf::Meta, b"expiry_clock_watermark_ms").unwrap(),
        None
    );

    // Restart the primary: its LSNs continue from the positions on disk, so the replica takes
    // the next records without a gap (a gap would fail the sink, and so the writes).
    let positions: Vec<u64> = (0..SHARD_COUNT)
        .map(|s| read_position(&*inner, s).unwrap().lsn)
        .collect();
    drop(clock);
    drop(node);
    drop(inner);
    let inner = open();
    let node = Primary::start(inner.clone(), sink.clone());
    node.send_all(sender, &users[..4], 10..12, t).await;
    node.inbox.ack(users[0], 1, vec![6], t).await.unwrap();
    node.register(phones_in(dropped).nth(3).unwrap(), t).await;
    assert_replicated(&*inner, &*replica, "after a restart");
    for s in (0..SHARD_COUNT).filter(|&s| s != dropped) {
        assert!(read_position(&*inner, s).unwrap().lsn >= positions[usize::from(s)]);
    }
    let lsns_per_shard = |shard| -> Vec<u64> {
        sink.records()
            .iter()
            .filter(|r| r.shard == shard)
            .map(|r| r.lsn)
            .collect()
    };
    for s in (0..SHARD_COUNT).filter(|&s| s != dropped) {
        let lsns = lsns_per_shard(s);
        assert_eq!(
            lsns,
            (1..=lsns.len() as u64).collect::<Vec<_>>(),
            "shard {s}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_replicas_did_not_confirm_fails_without_marking_storage_failing() {
    let (inner, _d1) = rocks();
    let (replica, _d2) = rocks();
    let sink = ApplySink::new(replica.clone());
    let primary = Primary::start(inner, sink.clone());
    let to = phones_in(1).next().unwrap();
    let entry = Entry::message(7, 1, [1; 16], Bytes::from_static(b"ciphertext"));
    sink.lose_next
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let refused = primary
        .inbox
        .append(Append {
            to_user: to,
            dedup: Some((7, 1, [1; 16])),
            entries: vec![(1, entry)],
            now_ms: now(),
        })
        .await;
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("replica unreachable")),
        "{refused:?}"
    );
    // The client retries. The message is stored here (the local write stays), but a duplicate
    // is acknowledged only through a write the replica takes, and it lacks the original: the
    // retry is refused too, never answered from this node's copy alone.
    let retry = primary
        .inbox
        .append(Append {
            to_user: to,
            dedup: Some((7, 1, [1; 16])),
            entries: vec![(
                1,
                Entry::message(7, 1, [1; 16], Bytes::from_static(b"ciphertext")),
            )],
            now_ms: now(),
        })
        .await;
    assert!(
        matches!(&retry, Err(e) if e.to_string().contains("does not follow")),
        "{retry:?}"
    );
    // The disk is fine: the node stays ready, and other shards take writes (this one's
    // replica lacks a record now: it refuses the next as a gap until catch-up exists).
    assert!(primary.inbox.storage_failing().is_none());
    primary
        .send_all(7, &[phones_in(2).next().unwrap()], 2..3, now())
        .await;
    assert!(primary.inbox.storage_failing().is_none());
}

/// A one-time key a claim answered is gone from the replica before the answer, and a claim
/// whose removal did not reach the replica answers no key: whatever the replica, promoted,
/// hands out later, no key is handed out twice.
#[test]
fn a_claimed_one_time_key_is_never_handed_out_again_by_a_promoted_replica() {
    let (inner, _dir) = rocks();
    let (replica, _replica_dir) = rocks();
    let sink = ApplySink::new(replica.clone());
    let engine: Arc<dyn Engine> = Arc::new(ReplicatingEngine::new(inner, sink.clone(), 1));
    let primary = Keys::new(engine, SHARD_COUNT);
    let user: UserId = 15_550_123_456;
    let signer = ringpost_client::prekeys::DeviceKeys::from_seed([5; 32]);
    primary
        .upload(user, 1, &signer.upload(Some(1), 0..6))
        .unwrap();
    let on_replica = Keys::new(replica.clone(), SHARD_COUNT);
    assert_eq!(on_replica.count(user, 1).unwrap(), 6);

    let mut answered = Vec::new();
    for _ in 0..2 {
        let c = primary.claim(user, None, &[1], true).unwrap();
        answered.push(c.bundles[0].one_time.as_ref().unwrap().id);
        // The removal is on the replica by the time the claim answers.
        assert_eq!(
            on_replica.count(user, 1).unwrap() as usize,
            6 - answered.len()
        );
    }
    // The replica is lost on the way: the claim fails and answers no key.
    sink.lose_next.store(true, Ordering::Relaxed);
    let err = primary.claim(user, None, &[1], true).unwrap_err();
    assert!(
        matches!(
            err,
            crate::keys::KeysError::Storage(crate::storage::StorageError::Replication(_))
        ),
        "{err}"
    );
    assert_eq!(err.code(), ringpost_wire::ErrorCode::StorageUnavailable);

    // The primary fails; the replica is promoted and serves the rest.
    let mut handed_later = Vec::new();
    while let Some(k) = on_replica.claim(user, None, &[1], true).unwrap().bundles[0]
        .one_time
        .clone()
    {
        handed_later.push(k.id);
    }
    assert_eq!(answered, vec![0, 1]);
    // The key the failed claim popped is handed out once, by the replica (its client never
    // got it); none of the answered ones is.
    assert_eq!(handed_later, vec![2, 3, 4, 5]);
}
