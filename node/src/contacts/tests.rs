//! Tests of the contacts service, each run against the in-memory and the RocksDB engine.

use super::*;
use crate::storage::suite::{mem_fixture, rocks_fixture, Fixture};

const SHARDS: u16 = 64;

fn service(f: &Fixture) -> Contacts {
    Contacts::new(f.0.clone(), SHARDS)
}

fn add(users: &[UserId]) -> ContactsUpdate {
    ContactsUpdate {
        add: users.to_vec(),
        ..Default::default()
    }
}

fn lists_add_remove_and_replace(f: Fixture) {
    let c = service(&f);
    assert_eq!(c.contacts(1).unwrap(), Vec::<UserId>::new());
    c.update(1, &add(&[5, 3, 1, 3])).unwrap();
    // Itself is ignored, duplicates collapse, the list is ascending.
    assert_eq!(c.contacts(1).unwrap(), vec![3, 5]);
    assert!(c.is_contact(1, 3).unwrap());
    assert!(!c.is_contact(3, 1).unwrap(), "contact lists are one-way");
    c.update(
        1,
        &ContactsUpdate {
            add: vec![7],
            remove: vec![3],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.contacts(1).unwrap(), vec![5, 7]);
    c.update(
        1,
        &ContactsUpdate {
            replace: true,
            add: vec![9, 5],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.contacts(1).unwrap(), vec![5, 9]);
    assert_eq!(c.settings(1).unwrap().contacts, 2);
    // Another user's rows are its own, even on the same shard.
    assert_eq!(c.contacts(2).unwrap(), Vec::<UserId>::new());
}

fn blocks_and_unblocks(f: Fixture) {
    let c = service(&f);
    assert!(!c.is_blocked(1, 2).unwrap());
    c.update(
        1,
        &ContactsUpdate {
            block: vec![2, 4],
            ..Default::default()
        },
    )
    .unwrap();
    assert!(c.is_blocked(1, 2).unwrap());
    assert!(!c.is_blocked(2, 1).unwrap());
    assert_eq!(c.blocked(1).unwrap(), vec![2, 4]);
    c.update(
        1,
        &ContactsUpdate {
            unblock: vec![2],
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!c.is_blocked(1, 2).unwrap());
    assert_eq!(c.settings(1).unwrap().blocked, 1);
}

fn lists_are_bounded(f: Fixture) {
    let c = service(&f);
    let many: Vec<UserId> = (100..100 + CONTACTS_MAX as u64).collect();
    c.update(1, &add(&many)).unwrap();
    let err = c.update(1, &add(&[5])).unwrap_err();
    assert_eq!(err.code(), ErrorCode::LimitExceeded);
    // Refused whole: nothing changed.
    assert!(!c.is_contact(1, 5).unwrap());
    assert_eq!(c.contacts(1).unwrap().len(), CONTACTS_MAX);
    // Replacing shrinks it again.
    c.update(
        1,
        &ContactsUpdate {
            replace: true,
            add: vec![5],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.contacts(1).unwrap(), vec![5]);
    let many: Vec<UserId> = (100..101 + BLOCKED_MAX as u64).collect();
    let err = c
        .update(
            1,
            &ContactsUpdate {
                block: many,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::LimitExceeded);
    assert!(c.blocked(1).unwrap().is_empty());
}

fn grants_follow_privacy_and_blocks(f: Fixture) {
    let c = service(&f);
    let everything = Grant {
        online: true,
        last_seen: true,
    };
    assert_eq!(c.grant(1, 2).unwrap(), everything, "defaults: everyone");
    c.update(1, &add(&[2])).unwrap();
    c.set_privacy(1, Visibility::Contacts, Visibility::Nobody)
        .unwrap();
    assert_eq!(
        c.grant(1, 2).unwrap(),
        Grant {
            online: false,
            last_seen: true
        }
    );
    assert_eq!(c.grant(1, 3).unwrap(), Grant::default());
    c.set_privacy(1, Visibility::Everyone, Visibility::Contacts)
        .unwrap();
    assert_eq!(c.grant(1, 2).unwrap(), everything);
    assert_eq!(
        c.grant(1, 3).unwrap(),
        Grant {
            online: false,
            last_seen: true
        }
    );
    // A block hides everything, whatever the settings say.
    c.update(
        1,
        &ContactsUpdate {
            block: vec![2],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.grant(1, 2).unwrap(), Grant::default());
    assert_eq!(c.grant(1, 1).unwrap(), everything, "a user sees itself");
}

fn settings_and_last_seen_persist(f: Fixture) {
    let c = service(&f);
    c.update(1, &add(&[2])).unwrap();
    c.set_privacy(1, Visibility::Nobody, Visibility::Contacts)
        .unwrap();
    c.set_last_seen(1, 12_345).unwrap();
    // A fresh service over the same engine reads the same.
    let again = service(&f);
    assert_eq!(
        again.settings(1).unwrap(),
        Settings {
            last_seen: Visibility::Nobody,
            online: Visibility::Contacts,
            contacts: 1,
            blocked: 0,
            last_seen_ms: 12_345,
        }
    );
    // Every row is led by the owner's shard.
    let shard = shard_of(1, SHARDS);
    let rows =
        f.0.scan(Cf::Contacts, b"", &[0xff, 0xff], 100)
            .expect("scan");
    assert_eq!(rows.len(), 2);
    for (k, _) in rows {
        assert_eq!(k[..2], shard.to_be_bytes());
    }
}

fn corrupt_settings_are_an_error(f: Fixture) {
    let c = service(&f);
    let mut b = WriteBatch::new();
    b.put(Cf::Contacts, c.settings_key(1), vec![1, 9, 0]);
    f.0.write(b, true).unwrap();
    assert!(matches!(c.settings(1), Err(StorageError::Corrupt { .. })));
}

macro_rules! both_engines {
    ($($case:ident),* $(,)?) => {
        mod mem {
            $(#[test] fn $case() { super::$case(super::mem_fixture()) })*
        }
        mod rocks {
            $(#[test] fn $case() { super::$case(super::rocks_fixture()) })*
        }
    };
}

both_engines!(
    lists_add_remove_and_replace,
    blocks_and_unblocks,
    lists_are_bounded,
    grants_follow_privacy_and_blocks,
    settings_and_last_seen_persist,
    corrupt_settings_are_an_error,
);
