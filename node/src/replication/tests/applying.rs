//! A replica's apply: in order, idempotent, gaps and stale epochs refused.

use super::*;
use crate::replication::{read_position, Applied, ApplyError, Position};
use crate::storage::{key, Cf, Op};

fn rec(shard: ShardId, lsn: u64, epoch: u64) -> ShardLogRecord {
    rec_after(shard, lsn, epoch, if lsn > 1 { epoch } else { 0 })
}

/// A record of `epoch` written after a record of `base_epoch`.
fn rec_after(shard: ShardId, lsn: u64, epoch: u64, base_epoch: u64) -> ShardLogRecord {
    ShardLogRecord {
        shard,
        lsn,
        epoch,
        base_epoch,
        ops: vec![Op::Put {
            cf: Cf::Accounts,
            key: key(shard, &[&lsn.to_be_bytes()]),
            value: epoch.to_be_bytes().to_vec(),
        }],
        kind: RecordKind::Log,
    }
}

fn count(engine: &dyn Engine, shard: ShardId) -> usize {
    engine
        .scan(Cf::Accounts, &key(shard, &[]), &key(shard + 1, &[]), 1000)
        .unwrap()
        .len()
}

#[test]
fn applies_in_order_skips_duplicates_and_refuses_a_gap() {
    let (replica, _dir) = rocks();
    let applied = apply(&*replica, &[rec(4, 1, 1), rec(4, 2, 1), rec(6, 1, 1)]).unwrap();
    assert_eq!(
        applied,
        Applied {
            written: 3,
            skipped: 0
        }
    );
    // A re-send of what is here, then the next one: the duplicates are skipped.
    let applied = apply(&*replica, &[rec(4, 1, 1), rec(4, 2, 1), rec(4, 3, 1)]).unwrap();
    assert_eq!(
        applied,
        Applied {
            written: 1,
            skipped: 2
        }
    );
    assert_eq!(count(&*replica, 4), 3);
    assert_eq!(
        read_position(&*replica, 4).unwrap(),
        Position {
            lsn: 3,
            epoch: 1,
            fence: 1
        }
    );

    // 4 is applied, 6 is a gap: 5 is needed; 4 stays written.
    let err = apply(&*replica, &[rec(4, 4, 1), rec(4, 6, 1), rec(6, 2, 1)]).unwrap_err();
    assert!(
        matches!(
            err,
            ApplyError::Gap {
                shard: 4,
                applied: 4,
                got: 6,
                needs: 5
            }
        ),
        "{err}"
    );
    assert_eq!(read_position(&*replica, 4).unwrap().lsn, 4);
    assert_eq!(count(&*replica, 4), 4);
    assert_eq!(
        read_position(&*replica, 6).unwrap().lsn,
        1,
        "nothing after the gap"
    );
    // A shard the replica never saw starts at 1.
    assert!(matches!(
        apply(&*replica, &[rec(9, 2, 1)]),
        Err(ApplyError::Gap { needs: 1, .. })
    ));
}

#[test]
fn epochs_fence_old_primaries_and_detect_divergence() {
    let (replica, _dir) = rocks();
    apply(&*replica, &[rec(4, 1, 2), rec(4, 2, 2)]).unwrap();
    // The next record from a deposed primary (epoch 1) is refused.
    assert!(matches!(
        apply(&*replica, &[rec(4, 3, 1)]),
        Err(ApplyError::StaleEpoch {
            epoch: 1,
            applied_epoch: 2,
            ..
        })
    ));
    // So are its re-sends of LSNs this copy holds: whether its LSN 2 is the one here is not
    // known, and an answer "applied" would let it acknowledge a write the new primary lacks.
    assert!(matches!(
        apply(&*replica, &[rec(4, 2, 1)]),
        Err(ApplyError::StaleEpoch { .. })
    ));
    // The current primary's re-sends are skipped.
    assert_eq!(apply(&*replica, &[rec(4, 2, 2)]).unwrap().skipped, 1);
    // A new primary (epoch 3) whose LSN 2 is not the one here: this copy needs a snapshot.
    assert!(matches!(
        apply(&*replica, &[rec(4, 2, 3)]),
        Err(ApplyError::Diverged {
            lsn: 2,
            epoch: 3,
            ..
        })
    ));
    // Nor does its LSN 3 (written after its own LSN 2 of epoch 3) follow on.
    assert!(matches!(
        apply(&*replica, &[rec_after(4, 3, 3, 3)]),
        Err(ApplyError::Diverged { lsn: 3, .. })
    ));
    // A new primary that took over at LSN 2 (its LSN 2 is the one of epoch 2 here) does.
    apply(&*replica, &[rec_after(4, 3, 3, 2)]).unwrap();
    assert_eq!(
        read_position(&*replica, 4).unwrap(),
        Position {
            lsn: 3,
            epoch: 3,
            fence: 3
        }
    );
}

/// What cluster-partition seed 3 hit: a primary cut off from its replicas kept writing records
/// nobody else has (LSNs 2 to 5 of epoch 6); two failovers later the shard's primary has other
/// records at those LSNs (epoch 7) and writes LSN 6 at epoch 8. The LSNs line up, but LSN 6
/// was written after a record of epoch 7, and this copy's LSN 5 is of epoch 6: refused as
/// diverged (a snapshot replaces the copy), never applied on top of the stale records.
#[test]
fn a_record_on_top_of_another_history_is_refused_even_when_the_lsns_line_up() {
    let (replica, _dir) = rocks();
    apply(&*replica, &[rec(4, 1, 5)]).unwrap();
    let stale: Vec<_> = (2..=5)
        .map(|lsn| rec_after(4, lsn, 6, 5 + u64::from(lsn > 2)))
        .collect();
    apply(&*replica, &stale).unwrap();
    let err = apply(&*replica, &[rec_after(4, 6, 8, 7)]).unwrap_err();
    assert!(
        matches!(
            err,
            ApplyError::Diverged {
                lsn: 6,
                epoch: 8,
                applied: Position {
                    lsn: 5,
                    epoch: 6,
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(count(&*replica, 4), 5, "nothing written");
    // The epoch-7 primary's records at the LSNs this copy holds are refused the same way.
    assert!(matches!(
        apply(&*replica, &[rec_after(4, 3, 7, 5)]),
        Err(ApplyError::Diverged { .. })
    ));
}

/// A snapshot leaves the copy at the primary's own position: the primary's next record (written
/// after its record of an older epoch) follows on, and a primary older than the snapshot's is
/// fenced although the copy's last record is of its epoch.
#[test]
fn after_a_snapshot_the_primarys_next_record_follows_and_older_primaries_are_fenced() {
    let (replica, _dir) = rocks();
    apply(&*replica, &[rec(4, 1, 1), rec(4, 2, 1)]).unwrap();
    // The primary of epoch 3 holds LSN 7 of epoch 2 and has written nothing at epoch 3 yet.
    let chunk = ShardLogRecord {
        shard: 4,
        lsn: 7,
        epoch: 3,
        base_epoch: 2,
        ops: vec![Op::Put {
            cf: Cf::Accounts,
            key: key(4, &[b"snap"]),
            value: vec![1],
        }],
        kind: RecordKind::Snapshot {
            session: 1,
            index: 0,
            last: true,
        },
    };
    apply(&*replica, &[chunk]).unwrap();
    assert_eq!(
        read_position(&*replica, 4).unwrap(),
        Position {
            lsn: 7,
            epoch: 2,
            fence: 3
        }
    );
    // The old primary of epoch 2 is fenced, at the next LSN as at an old one.
    for r in [rec_after(4, 8, 2, 2), rec(4, 7, 2)] {
        assert!(matches!(
            apply(&*replica, &[r]),
            Err(ApplyError::StaleEpoch { .. })
        ));
    }
    // The snapshot's primary: a re-send of what the snapshot holds is skipped, its next follows.
    assert_eq!(apply(&*replica, &[rec(4, 7, 3)]).unwrap().skipped, 1);
    apply(&*replica, &[rec_after(4, 8, 3, 2)]).unwrap();
    assert_eq!(
        read_position(&*replica, 4).unwrap(),
        Position {
            lsn: 8,
            epoch: 3,
            fence: 3
        }
    );
}

#[test]
fn invalid_records_are_refused_before_anything_is_written() {
    let (replica, _dir) = rocks();
    let mut outside = rec(4, 1, 1);
    outside.ops.push(Op::Put {
        cf: Cf::Accounts,
        key: key(5, &[b"x"]),
        value: Vec::new(),
    });
    assert!(matches!(
        apply(&*replica, &[outside]),
        Err(ApplyError::Record(_))
    ));
    assert_eq!(count(&*replica, 4) + count(&*replica, 5), 0);
    assert_eq!(read_position(&*replica, 4).unwrap(), Position::default());
}
