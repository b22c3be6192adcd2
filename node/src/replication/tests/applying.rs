//! A replica's apply: in order, idempotent, gaps and stale epochs refused.

use super::*;
use crate::replication::{read_position, Applied, ApplyError, Position};
use crate::storage::{key, Cf, Op};

fn rec(shard: ShardId, lsn: u64, epoch: u64) -> ShardLogRecord {
    ShardLogRecord {
        shard,
        lsn,
        epoch,
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
        Position { lsn: 3, epoch: 1 }
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
    // Its re-sends of old LSNs are harmless and skipped.
    assert_eq!(apply(&*replica, &[rec(4, 2, 1)]).unwrap().skipped, 1);
    // A new primary (epoch 3) whose LSN 2 is not the one here: this copy needs a snapshot.
    assert!(matches!(
        apply(&*replica, &[rec(4, 2, 3)]),
        Err(ApplyError::Diverged {
            lsn: 2,
            epoch: 3,
            ..
        })
    ));
    // Its LSN 3 follows on.
    apply(&*replica, &[rec(4, 3, 3)]).unwrap();
    assert_eq!(
        read_position(&*replica, 4).unwrap(),
        Position { lsn: 3, epoch: 3 }
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
