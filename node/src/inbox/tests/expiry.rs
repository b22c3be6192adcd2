//! The expiry index: entries that expire before the retention (statuses) leave the disk by
//! time, whatever older entries their device still has, and their index rows go with them.

use super::*;

/// A status from `from`/`from_device` to the given devices of `to`, posted at `posted_ms`:
/// it expires a day later, as [`crate::status`] asks.
fn status(
    from: UserId,
    from_device: DeviceId,
    to: UserId,
    devices: &[DeviceId],
    id: u8,
    posted_ms: u64,
) -> Append {
    let entry = Entry {
        kind: EntryKind::Status,
        expires_at_ms: posted_ms + DAY_MS,
        ..msg(from, from_device, id, "status")
    };
    Append {
        to_user: to,
        dedup: Some((from, from_device, [id; 16])),
        entries: devices.iter().map(|d| (*d, entry.clone())).collect(),
        now_ms: posted_ms,
    }
}

/// Every inbox row on disk, as (user, device, seq).
fn inbox_rows(engine: &dyn Engine) -> Vec<(UserId, DeviceId, u64)> {
    engine
        .scan(Cf::Inbox, &[], &[0xff, 0xff], usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(k, _)| {
            let (_, user, device, seq) = parse_inbox_key(&k).unwrap();
            (user, device, seq)
        })
        .collect()
}

/// Every expiry index row on disk, as (expiry, user, device, seq).
fn index_rows(engine: &dyn Engine) -> Vec<(u64, UserId, DeviceId, u64)> {
    engine
        .scan(Cf::InboxExpiry, &[], &[0xff, 0xff], usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            assert!(v.is_empty());
            let (_, expiry, user, device, seq) = keys::parse_expiry_key(&k).unwrap();
            (expiry, user, device, seq)
        })
        .collect()
}

/// An old 1:1 message still pending, then a status: a day later one expiry pass deletes the
/// status row from disk, though it sits behind the message (the key-order sweep stops at the
/// message), and the message is still delivered.
pub(super) async fn an_expired_status_leaves_disk_behind_older_entries(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    stored_seqs(inbox.append(send(A, 1, B, &[1], 1, t)).await.unwrap());
    let posted = t + 60_000;
    let seqs = stored_seqs(
        inbox
            .append(status(A, 1, B, &[1], 2, posted))
            .await
            .unwrap(),
    );
    assert_eq!(seqs, vec![(1, 2)]);
    assert_eq!(index_rows(&*engine), vec![(posted + DAY_MS, B, 1, 2)]);
    assert_eq!(inbox_rows(&*engine), vec![(B, 1, 1), (B, 1, 2)]);

    // Not yet expired: nothing goes.
    assert_eq!(inbox.expire(posted + DAY_MS - 1).await.unwrap(), 0);
    assert_eq!(inbox_rows(&*engine).len(), 2);

    let later = posted + DAY_MS + 1;
    assert_eq!(inbox.expire(later).await.unwrap(), 1);
    assert_eq!(
        inbox_rows(&*engine),
        vec![(B, 1, 1)],
        "the status row is gone"
    );
    assert!(index_rows(&*engine).is_empty());
    assert_eq!(inbox.entries_total(), 1);
    assert_counts_match_disk(&*engine, &inbox);

    let delivered = inbox.read(B, 1, 0, 100, later).unwrap();
    assert_eq!(seqs_of(&delivered), vec![1]);
    assert_eq!(delivered[0].1.kind, EntryKind::Message);
    // Its ack moves the floor past the expired status too.
    assert_eq!(inbox.ack(B, 1, vec![1], later).await.unwrap().len(), 1);
    clear_outbox(&inbox, B, later).await;
    assert_eq!(inbox.entries_total(), 0);
    assert!(inbox.read(B, 1, 0, 100, later).unwrap().is_empty());
    assert_eq!(inbox.expire(later).await.unwrap(), 0);
    assert_counts_match_disk(&*engine, &inbox);
}

/// An ack (with the header the connection kept, or reading it back) and a dropped device
/// delete the index rows of their statuses in the same batch; a row whose entry is no longer
/// pending is deleted alone by the expiry.
pub(super) async fn status_index_rows_go_with_their_entries(fixture: Fixture) {
    let (engine, _dir) = fixture;
    let inbox = Inbox::start(Arc::clone(&engine), config()).unwrap();
    let t = now();
    stored_seqs(
        inbox
            .append(status(A, 1, B, &[1, 2, 3, 4], 1, t))
            .await
            .unwrap(),
    );
    stored_seqs(
        inbox
            .append(send(A, 1, B, &[1, 2, 3, 4], 2, t))
            .await
            .unwrap(),
    );
    assert_eq!(index_rows(&*engine).len(), 4);

    // Device 1 acks knowing the header, device 2 without.
    let header = inbox.read(B, 1, 0, 1, t).unwrap()[0].1.header();
    assert_eq!(header.kind, EntryKind::Status);
    let acked = inbox
        .ack_with(AckRequest {
            user: B,
            device: 1,
            seqs: vec![(1, Some(header))],
            senders: Vec::new(),
            now_ms: t,
        })
        .await
        .unwrap();
    assert_eq!(acked.len(), 1);
    inbox.ack(B, 2, vec![1], t).await.unwrap();
    let left: Vec<DeviceId> = index_rows(&*engine).iter().map(|r| r.2).collect();
    assert_eq!(left, vec![3, 4]);

    assert_eq!(inbox.drop_device(B, 3).await.unwrap(), 2);
    let left: Vec<DeviceId> = index_rows(&*engine).iter().map(|r| r.2).collect();
    assert_eq!(left, vec![4]);

    // A row whose entry is no longer pending (as after a crash between two of its writes,
    // or a row left behind by a bug) is deleted alone; the message stays.
    let mut stray = WriteBatch::new();
    let shard = shard_of(B, config().shard_count);
    stray.put(
        Cf::InboxExpiry,
        keys::expiry_key(shard, t + DAY_MS, B, 1, 1),
        Vec::new(),
    );
    engine.write(stray, true).unwrap();
    assert_eq!(
        inbox.expire(t + DAY_MS).await.unwrap(),
        1,
        "device 4's status"
    );
    assert!(index_rows(&*engine).is_empty());
    for device in [1, 2, 4] {
        assert_eq!(seqs_of(&inbox.read(B, device, 0, 100, t).unwrap()), vec![2]);
    }
    assert_counts_match_disk(&*engine, &inbox);
}
