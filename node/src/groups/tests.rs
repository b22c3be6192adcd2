//! The group service on a real RocksDB: states, the log, send dedup and permissions.

use super::*;
use crate::storage::suite::rocks_fixture;
use ringpost_wire::{Body, GroupInvite};

const G: GroupId = [3; 16];
const CODE: [u8; GROUP_INVITE_CODE_BYTES] = [4; GROUP_INVITE_CODE_BYTES];

fn service() -> (Groups, Option<tempfile::TempDir>) {
    let (engine, dir) = rocks_fixture();
    (Groups::new(engine, 64), dir)
}

fn event_of(record: &LogRecord) -> GroupEvent {
    let LogBody::Event { frame, .. } = &record.body else {
        panic!("not an event: {record:?}");
    };
    match Frame::decode(frame).unwrap().body {
        Body::GroupEvent(e) => e,
        other => panic!("not a GroupEvent: {other:?}"),
    }
}

/// Drains the log the way the fan-out does (every member stored at once).
fn drain(g: &Groups) -> Vec<LogRecord> {
    let mut out = Vec::new();
    while let Some(mut r) = g.next_record(&G).unwrap() {
        out.push(r.clone());
        r.pending.clear();
        g.progress(&r).unwrap();
    }
    out
}

#[test]
fn create_update_and_send_are_logged_in_group_order() {
    let (g, _dir) = service();
    let info = g.create(G, 1, &[2, 3], b"meta", 10).unwrap();
    assert_eq!((info.version, info.members.clone()), (1, vec![1, 2, 3]));
    let mut u = GroupUpdate::new(G);
    u.add = vec![4];
    u.remove = vec![3];
    assert_eq!(g.update(1, &u, CODE, 11).unwrap().members, vec![1, 2, 4]);
    let sent = g.send(2, 1, &G, [9; 16], b"ciphertext", 12).unwrap();
    assert_eq!(
        sent,
        Sent::New {
            seq: 3,
            server_time_ms: 12
        }
    );

    let log = drain(&g);
    assert_eq!(log.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(event_of(&log[0]).added, vec![1, 2, 3]);
    let change = event_of(&log[1]);
    assert_eq!(
        (change.added.clone(), change.removed.clone()),
        (vec![4], vec![3])
    );
    assert!(change.rotate_sender_keys);
    // The removed member hears of its removal; the new one of its addition.
    assert_eq!(log[1].pending, vec![1, 2, 3, 4]);
    // A message goes to the members when it was sequenced.
    assert_eq!(log[2].pending, vec![1, 2, 4]);
    assert!(matches!(log[2].body, LogBody::Message { from_user: 2, .. }));
    assert!(g.next_record(&G).unwrap().is_none());
}

#[test]
fn a_resend_is_deduplicated_per_sending_device() {
    let (g, _dir) = service();
    g.create(G, 1, &[2], b"", 0).unwrap();
    let first = g.send(2, 1, &G, [9; 16], b"x", 5).unwrap();
    assert_eq!(
        g.send(2, 1, &G, [9; 16], b"x", 6).unwrap(),
        Sent::Duplicate {
            seq: 2,
            server_time_ms: 5
        }
    );
    assert!(matches!(first, Sent::New { seq: 2, .. }));
    // Another device (or user) with the same msg_id is not suppressed by it.
    assert!(matches!(
        g.send(2, 2, &G, [9; 16], b"x", 7).unwrap(),
        Sent::New { seq: 3, .. }
    ));
    assert!(matches!(
        g.send(1, 1, &G, [9; 16], b"x", 8).unwrap(),
        Sent::New { seq: 4, .. }
    ));
    // Past the window the id is new again, and the expired rows are pruned by later sends.
    let later = 8 + GROUP_SEND_DEDUP_MS + 1;
    assert!(matches!(
        g.send(2, 1, &G, [9; 16], b"x", later).unwrap(),
        Sent::New { seq: 5, .. }
    ));
    // The new record of the reused key survived the pruning of its expired predecessor.
    assert!(matches!(
        g.send(2, 1, &G, [9; 16], b"x", later + 1).unwrap(),
        Sent::Duplicate { seq: 5, .. }
    ));
    let from = g.row(&G, TAG_DEDUP_BY_EXPIRY, &[]);
    let rows = g
        .engine
        .scan(Cf::Groups, &from, &prefix_end(&from), 100)
        .unwrap();
    assert_eq!(rows.len(), 1, "only the live dedup record is indexed");
}

#[test]
fn non_members_and_non_admins_are_refused_and_nothing_is_logged() {
    let (g, _dir) = service();
    g.create(G, 1, &[2], b"", 0).unwrap();
    drain(&g);
    assert!(matches!(
        g.send(7, 1, &G, [1; 16], b"x", 1),
        Err(GroupError::NotMember)
    ));
    assert!(matches!(g.info(7, &G), Err(GroupError::NotMember)));
    let mut u = GroupUpdate::new(G);
    u.add = vec![5];
    assert!(matches!(
        g.update(2, &u, CODE, 1),
        Err(GroupError::Forbidden(_))
    ));
    assert!(matches!(
        g.update(1, &GroupUpdate::new([8; 16]), CODE, 1),
        Err(GroupError::NotFound)
    ));
    assert!(g.next_record(&G).unwrap().is_none());
    assert_eq!(g.load(&G).unwrap().unwrap().seq, 1);
    assert_eq!(GroupError::NotMember.code(), ErrorCode::Forbidden);
}

#[test]
fn invite_join_and_leave() {
    let (g, _dir) = service();
    g.create(G, 1, &[2], b"", 0).unwrap();
    let mut u = GroupUpdate::new(G);
    u.invite = GroupInvite::Create;
    assert_eq!(g.update(1, &u, CODE, 1).unwrap().invite_code[..], CODE);
    let mut join = GroupUpdate::new(G);
    join.join_code = CODE.to_vec().into();
    assert_eq!(
        g.update(9, &join, [0; 16], 2).unwrap().members,
        vec![1, 2, 9]
    );
    let mut leave = GroupUpdate::new(G);
    leave.leave = true;
    let after = g.update(2, &leave, [0; 16], 3).unwrap();
    assert!(
        after.members.is_empty(),
        "a leaver no longer sees the group"
    );
    assert_eq!(g.info(1, &G).unwrap().members, vec![1, 9]);
    let log = drain(&g);
    assert_eq!(event_of(log.last().unwrap()).removed, vec![2]);
}

#[test]
fn the_add_policy_hook_is_asked_for_every_added_user() {
    let (g, _dir) = service();
    assert!(g.set_add_policy(Arc::new(|_adder, added| added != 13)));
    assert!(matches!(
        g.create(G, 1, &[2, 13], b"", 0),
        Err(GroupError::Forbidden(_))
    ));
    g.create(G, 1, &[2], b"", 0).unwrap();
    let mut u = GroupUpdate::new(G);
    u.add = vec![13];
    assert!(matches!(
        g.update(1, &u, CODE, 1),
        Err(GroupError::Forbidden(_))
    ));
}

#[test]
fn the_largest_group_message_fits_one_append_for_a_member_with_every_device() {
    use crate::inbox::{Entry, APPEND_BYTES_MAX};
    use ringpost_wire::limits::{DEVICES_PER_USER_MAX, GROUP_CIPHERTEXT_BYTES_MAX};
    let body = fanout::entry_body(&G, u64::MAX, &vec![0; GROUP_CIPHERTEXT_BYTES_MAX]);
    let entry = Entry::message(u64::MAX, u32::MAX, [0; 16], body.into());
    assert!(DEVICES_PER_USER_MAX * entry.encoded_len() <= APPEND_BYTES_MAX);
}

#[test]
fn pending_groups_lists_each_group_with_records_once() {
    let (g, _dir) = service();
    let other: GroupId = {
        // Another group on the same shard as G.
        let mut id = G;
        let mut n = 0u8;
        loop {
            id[15] = n;
            if id != G && g.shard(&id) == g.shard(&G) {
                break id;
            }
            n += 1;
        }
    };
    g.create(G, 1, &[], b"", 0).unwrap();
    g.send(1, 1, &G, [1; 16], b"x", 1).unwrap();
    g.create(other, 1, &[], b"", 0).unwrap();
    let mut found = g.pending_groups(g.shard(&G)).unwrap();
    found.sort();
    let mut want = vec![G, other];
    want.sort();
    assert_eq!(found, want);
}

mod fan_out;
mod receipts;

#[test]
fn an_update_that_changes_nothing_takes_no_seq_and_logs_nothing() {
    let (g, _dir) = service();
    g.create(G, 1, &[2, 3], b"meta", 0).unwrap();
    let mut remove = GroupUpdate::new(G);
    remove.remove = vec![3];
    assert_eq!(g.update(1, &remove, CODE, 1).unwrap().version, 2);
    // The retry of an update whose answer was lost: answered with the group as it is.
    let again = g.update(1, &remove, CODE, 2).unwrap();
    assert_eq!((again.version, again.members), (2, vec![1, 2]));
    let mut add_member = GroupUpdate::new(G);
    add_member.add = vec![2];
    add_member.meta = b"meta".to_vec().into();
    assert_eq!(g.update(1, &add_member, CODE, 3).unwrap().version, 2);
    let log = drain(&g);
    assert_eq!(log.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
    // The next real change and message take the next numbers.
    let mut add = GroupUpdate::new(G);
    add.add = vec![3];
    assert_eq!(g.update(1, &add, CODE, 4).unwrap().version, 3);
    assert!(matches!(
        g.send(2, 1, &G, [9; 16], b"x", 5).unwrap(),
        Sent::New { seq: 4, .. }
    ));
}

#[test]
fn a_resend_after_leaving_gets_the_first_answer() {
    let (g, _dir) = service();
    g.create(G, 1, &[2], b"", 0).unwrap();
    let first = g.send(2, 1, &G, [9; 16], b"x", 5).unwrap();
    assert!(matches!(first, Sent::New { seq: 2, .. }));
    let mut leave = GroupUpdate::new(G);
    leave.leave = true;
    g.update(2, &leave, CODE, 6).unwrap();
    // The answer to the first attempt was lost; the retry must not turn it into a refusal.
    assert_eq!(
        g.send(2, 1, &G, [9; 16], b"x", 7).unwrap(),
        Sent::Duplicate {
            seq: 2,
            server_time_ms: 5
        }
    );
    // A new message from a former member is refused.
    assert!(matches!(
        g.send(2, 1, &G, [8; 16], b"x", 8),
        Err(GroupError::NotMember)
    ));
}

/// Exactly one synced write reached the engine, and it put group rows only (the rows a
/// replicating engine ships to the group shard's replicas): nothing was sequenced.
#[track_caller]
fn assert_one_synced_write_of_group_rows(engine: &Recording) {
    let synced = engine.synced.lock().unwrap();
    assert_eq!(synced.len(), 1, "one synced write");
    assert!(synced[0]
        .ops
        .iter()
        .all(|op| matches!(op, crate::storage::Op::Put { cf: Cf::Groups, .. })));
}

/// A [`Recording`] engine over a fresh RocksDB.
fn recording() -> (Arc<Recording>, Option<tempfile::TempDir>) {
    let (inner, dir) = rocks_fixture();
    let engine = Arc::new(Recording {
        inner,
        synced: Mutex::new(Vec::new()),
        fail: std::sync::atomic::AtomicBool::new(false),
    });
    (engine, dir)
}

/// Records the synced writes that reach the engine, and can fail them.
struct Recording {
    inner: Arc<dyn Engine>,
    synced: Mutex<Vec<WriteBatch>>,
    fail: std::sync::atomic::AtomicBool,
}

impl Engine for Recording {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(cf, key)
    }
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        if self.fail.load(Relaxed) {
            return Err(StorageError::Other("not replicated".into()));
        }
        if sync {
            self.synced.lock().unwrap().push(batch.clone());
        }
        self.inner.write(batch, sync)
    }
    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        self.inner.scan(cf, from, to, limit)
    }
    fn last_in(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, StorageError> {
        self.inner.last_in(cf, from, to)
    }
}

#[test]
fn a_duplicate_is_answered_only_after_a_synced_write_of_its_record() {
    let (engine, _dir) = recording();
    let g = Groups::new(engine.clone(), 64);
    g.create(G, 1, &[2], b"", 0).unwrap();
    assert!(matches!(
        g.send(2, 1, &G, [9; 16], b"x", 5).unwrap(),
        Sent::New { seq: 2, .. }
    ));
    engine.synced.lock().unwrap().clear();
    // The store cannot make the dedup row durable (say its replicas refuse this node): the
    // retry is refused, not answered from the local row.
    engine.fail.store(true, Relaxed);
    assert!(matches!(
        g.send(2, 1, &G, [9; 16], b"x", 6),
        Err(GroupError::Storage(_))
    ));
    engine.fail.store(false, Relaxed);
    assert_eq!(
        g.send(2, 1, &G, [9; 16], b"x", 7).unwrap(),
        Sent::Duplicate {
            seq: 2,
            server_time_ms: 5
        }
    );
    // The duplicate's answer followed a synced write of the dedup row in the group's shard
    // (the one a replicating engine ships to the shard's replicas), and sequenced nothing.
    assert_one_synced_write_of_group_rows(&engine);
    assert_eq!(g.load(&G).unwrap().unwrap().seq, 2);
}

#[test]
fn records_of_a_failed_log_write_are_not_fanned_out_until_a_later_write_succeeds() {
    let (engine, _dir) = recording();
    let g = Groups::new(engine.clone(), 64);
    g.create(G, 1, &[2], b"", 0).unwrap();
    assert_eq!(g.undurable_from(&G), None);
    // The write fails (here before reaching the disk; on a replicating node its local copy
    // stays on disk): the fan-out must not deliver seq 2 or later from this node.
    engine.fail.store(true, Relaxed);
    assert!(g.send(2, 1, &G, [9; 16], b"x", 5).is_err());
    assert_eq!(g.undurable_from(&G), Some(2));
    // A later synced write of the group's shard proves everything before it durable.
    engine.fail.store(false, Relaxed);
    assert!(matches!(
        g.send(2, 1, &G, [8; 16], b"y", 6).unwrap(),
        Sent::New { seq: 2, .. }
    ));
    assert_eq!(g.undurable_from(&G), None);
    // Taking over a shard's log forgets the mark too.
    engine.fail.store(true, Relaxed);
    assert!(g.send(2, 1, &G, [7; 16], b"z", 7).is_err());
    g.forget_undurable(&G);
    assert_eq!(g.undurable_from(&G), None);
}

/// A retried update that finds its change already made (the first attempt's write stayed here
/// but was not confirmed) is answered only after a synced write of the group's state, which a
/// replicating engine ships to the shard's replicas: a store that cannot make it durable fails
/// the retry instead of confirming a change only this node may have.
#[test]
fn an_update_already_applied_is_answered_only_after_a_synced_write_of_the_state() {
    let (engine, _dir) = recording();
    let g = Groups::new(engine.clone(), 64);
    g.create(G, 1, &[2, 3], b"", 0).unwrap();
    let mut u = GroupUpdate::new(G);
    u.remove = vec![3];
    assert_eq!(g.update(1, &u, CODE, 5).unwrap().members, vec![1, 2]);
    engine.synced.lock().unwrap().clear();
    engine.fail.store(true, Relaxed);
    assert!(matches!(
        g.update(1, &u, CODE, 6),
        Err(GroupError::Storage(_))
    ));
    engine.fail.store(false, Relaxed);
    let info = g.update(1, &u, CODE, 7).unwrap();
    assert_eq!((info.version, info.members), (2, vec![1, 2]));
    assert_one_synced_write_of_group_rows(&engine);
    assert_eq!(g.load(&G).unwrap().unwrap().seq, 2);
}
