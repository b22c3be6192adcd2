//! The conformance suite every [`Engine`] must pass.
//!
//! Each case is a plain function over a fresh `&dyn Engine`; [`engine_suite!`] turns the list
//! into one `#[test]` per case for a given fixture, so a failure names both the case and the
//! engine. The suite is instantiated below for [`MemEngine`] and [`RocksEngine`]; the inbox
//! tests reuse the fixtures.

use std::sync::Arc;

use super::mem::MemEngine;
use super::rocks::{RocksConfig, RocksEngine};
use super::{key, prefix_end, Cf, Engine, WriteBatch, GROUP_BODY_TAG};

/// An engine and, for on-disk engines, the directory it lives in (dropped after the engine).
pub(crate) type Fixture = (Arc<dyn Engine>, Option<tempfile::TempDir>);

pub(crate) fn mem_fixture() -> Fixture {
    (Arc::new(MemEngine::new()), None)
}

pub(crate) fn rocks_fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = RocksEngine::open(dir.path(), &RocksConfig::for_tests()).expect("open rocksdb");
    (Arc::new(engine), Some(dir))
}

/// Expands to one `#[test]` per conformance case, each on a fresh engine from `$fixture()`.
macro_rules! engine_suite {
    ($fixture:path) => {
        engine_suite!(@cases $fixture;
            get_put_delete,
            empty_values_and_empty_key,
            batch_is_applied_in_order,
            batch_spans_families_atomically,
            families_are_isolated,
            scan_orders_bytewise_with_bounds_and_limit,
            scan_pages_through_everything_once,
            inverted_and_empty_ranges_are_empty,
            last_in_respects_bounds,
            delete_range_is_half_open,
            delete_range_orders_with_puts_in_a_batch,
            keys_with_ff_bytes_and_prefix_end,
            large_values_roundtrip,
            group_body_rows_read_back_as_written
        );
    };
    (@cases $fixture:path; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let (engine, _dir) = $fixture();
                $crate::storage::suite::$case(&*engine);
            }
        )*
    };
}

fn put(e: &dyn Engine, cf: Cf, k: &[u8], v: &[u8]) {
    let mut b = WriteBatch::new();
    b.put(cf, k, v);
    e.write(b, true).expect("write");
}

fn keys(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
    pairs.iter().map(|(k, _)| k.clone()).collect()
}

pub(crate) fn get_put_delete(e: &dyn Engine) {
    assert_eq!(e.get(Cf::Accounts, b"k").unwrap(), None);
    put(e, Cf::Accounts, b"k", b"v1");
    assert_eq!(
        e.get(Cf::Accounts, b"k").unwrap().as_deref(),
        Some(&b"v1"[..])
    );
    put(e, Cf::Accounts, b"k", b"v2");
    assert_eq!(
        e.get(Cf::Accounts, b"k").unwrap().as_deref(),
        Some(&b"v2"[..])
    );
    let mut b = WriteBatch::new();
    b.delete(Cf::Accounts, &b"k"[..]);
    b.delete(Cf::Accounts, &b"never-written"[..]);
    e.write(b, false).unwrap();
    assert_eq!(e.get(Cf::Accounts, b"k").unwrap(), None);
    // An empty batch is fine.
    e.write(WriteBatch::new(), true).unwrap();
}

pub(crate) fn empty_values_and_empty_key(e: &dyn Engine) {
    put(e, Cf::Inbox, b"k", b"");
    assert_eq!(
        e.get(Cf::Inbox, b"k").unwrap(),
        Some(Vec::new()),
        "empty value is not absence"
    );
    put(e, Cf::Inbox, b"", b"empty key");
    assert_eq!(
        e.get(Cf::Inbox, b"").unwrap().as_deref(),
        Some(&b"empty key"[..])
    );
    let all = e.scan(Cf::Inbox, b"", &[0xff], 10).unwrap();
    assert_eq!(
        all,
        vec![
            (b"".to_vec(), b"empty key".to_vec()),
            (b"k".to_vec(), Vec::new())
        ]
    );
}

pub(crate) fn batch_is_applied_in_order(e: &dyn Engine) {
    let mut b = WriteBatch::new();
    b.put(Cf::Meta, &b"a"[..], &b"1"[..]);
    b.delete(Cf::Meta, &b"a"[..]);
    b.delete(Cf::Meta, &b"b"[..]);
    b.put(Cf::Meta, &b"b"[..], &b"2"[..]);
    b.put(Cf::Meta, &b"c"[..], &b"3"[..]);
    b.put(Cf::Meta, &b"c"[..], &b"4"[..]);
    e.write(b, true).unwrap();
    assert_eq!(e.get(Cf::Meta, b"a").unwrap(), None);
    assert_eq!(e.get(Cf::Meta, b"b").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(e.get(Cf::Meta, b"c").unwrap().as_deref(), Some(&b"4"[..]));
}

pub(crate) fn batch_spans_families_atomically(e: &dyn Engine) {
    put(e, Cf::Dedup, b"old", b"x");
    let mut b = WriteBatch::new();
    b.put(Cf::Inbox, &b"entry"[..], &b"e"[..]);
    b.put(Cf::InboxMeta, &b"meta"[..], &b"m"[..]);
    b.delete(Cf::Dedup, &b"old"[..]);
    b.put(Cf::Dedup, &b"new"[..], &b"d"[..]);
    e.write(b, true).unwrap();
    assert_eq!(
        e.get(Cf::Inbox, b"entry").unwrap().as_deref(),
        Some(&b"e"[..])
    );
    assert_eq!(
        e.get(Cf::InboxMeta, b"meta").unwrap().as_deref(),
        Some(&b"m"[..])
    );
    assert_eq!(e.get(Cf::Dedup, b"old").unwrap(), None);
    assert_eq!(
        e.get(Cf::Dedup, b"new").unwrap().as_deref(),
        Some(&b"d"[..])
    );
}

pub(crate) fn families_are_isolated(e: &dyn Engine) {
    for (i, cf) in Cf::ALL.iter().enumerate() {
        put(e, *cf, b"same", &[i as u8]);
    }
    for (i, cf) in Cf::ALL.iter().enumerate() {
        assert_eq!(e.get(*cf, b"same").unwrap(), Some(vec![i as u8]), "{cf:?}");
        assert_eq!(e.scan(*cf, b"", &[0xff], 10).unwrap().len(), 1, "{cf:?}");
    }
    let mut b = WriteBatch::new();
    b.delete(Cf::Inbox, &b"same"[..]);
    b.delete_range(Cf::Dedup, &b""[..], &[0xff][..]);
    e.write(b, true).unwrap();
    assert_eq!(e.get(Cf::Inbox, b"same").unwrap(), None);
    assert_eq!(e.get(Cf::Dedup, b"same").unwrap(), None);
    for cf in Cf::ALL
        .iter()
        .filter(|cf| !matches!(cf, Cf::Inbox | Cf::Dedup))
    {
        assert!(
            e.get(*cf, b"same").unwrap().is_some(),
            "{cf:?} lost its key"
        );
    }
}

pub(crate) fn scan_orders_bytewise_with_bounds_and_limit(e: &dyn Engine) {
    // Inserted out of order; bytes compare unsigned, shorter prefix first.
    let ks: [&[u8]; 7] = [
        b"\x80",
        b"\x01\x00",
        b"\x02",
        b"\x01",
        b"\x7f",
        b"\x00",
        b"\xff",
    ];
    let mut b = WriteBatch::new();
    for k in ks {
        b.put(Cf::Prekeys, k, k);
    }
    e.write(b, true).unwrap();
    let sorted: Vec<Vec<u8>> = [
        &b"\x00"[..],
        b"\x01",
        b"\x01\x00",
        b"\x02",
        b"\x7f",
        b"\x80",
        b"\xff",
    ]
    .iter()
    .map(|k| k.to_vec())
    .collect();
    let all = e.scan(Cf::Prekeys, b"", &[0xff, 0xff], 100).unwrap();
    assert_eq!(keys(&all), sorted);
    assert!(all.iter().all(|(k, v)| k == v));
    // `from` inclusive, `to` exclusive.
    assert_eq!(
        keys(&e.scan(Cf::Prekeys, b"\x01", b"\x02", 100).unwrap()),
        sorted[1..3]
    );
    assert_eq!(
        keys(&e.scan(Cf::Prekeys, b"\x01\x00", b"\x80", 100).unwrap()),
        sorted[2..5]
    );
    // A bound between keys.
    assert_eq!(
        keys(
            &e.scan(Cf::Prekeys, b"\x01\x00\x00", b"\x7f\x00", 100)
                .unwrap()
        ),
        sorted[3..5]
    );
    // Limit.
    assert_eq!(
        keys(&e.scan(Cf::Prekeys, b"", &[0xff, 0xff], 3).unwrap()),
        sorted[..3]
    );
    assert!(e
        .scan(Cf::Prekeys, b"", &[0xff, 0xff], 0)
        .unwrap()
        .is_empty());
    // Nothing in an untouched family.
    assert!(e
        .scan(Cf::Verify, b"", &[0xff, 0xff], 100)
        .unwrap()
        .is_empty());
}

pub(crate) fn scan_pages_through_everything_once(e: &dyn Engine) {
    let mut b = WriteBatch::new();
    for i in 0u32..1000 {
        b.put(Cf::Inbox, key(7, &[&i.to_be_bytes()]), i.to_le_bytes());
    }
    // Neighbouring shards must not leak into shard 7's range.
    b.put(Cf::Inbox, key(6, &[&u32::MAX.to_be_bytes()]), &b"x"[..]);
    b.put(Cf::Inbox, key(8, &[&0u32.to_be_bytes()]), &b"x"[..]);
    e.write(b, true).unwrap();
    let (from, to) = (key(7, &[]), prefix_end(&key(7, &[])));
    let mut cursor = from;
    let mut seen = Vec::new();
    loop {
        let page = e.scan(Cf::Inbox, &cursor, &to, 64).unwrap();
        let Some((last, _)) = page.last() else { break };
        cursor = last.clone();
        cursor.push(0); // The smallest key after `last`.
        seen.extend(
            page.into_iter()
                .map(|(_, v)| u32::from_le_bytes(v.try_into().unwrap())),
        );
    }
    assert_eq!(seen, (0..1000).collect::<Vec<_>>());
}

pub(crate) fn inverted_and_empty_ranges_are_empty(e: &dyn Engine) {
    put(e, Cf::Accounts, b"b", b"1");
    assert!(e.scan(Cf::Accounts, b"b", b"b", 10).unwrap().is_empty());
    assert!(e.scan(Cf::Accounts, b"c", b"a", 10).unwrap().is_empty());
    assert_eq!(e.last_in(Cf::Accounts, b"b", b"b").unwrap(), None);
    assert_eq!(e.last_in(Cf::Accounts, b"c", b"a").unwrap(), None);
    let mut b = WriteBatch::new();
    b.delete_range(Cf::Accounts, &b"c"[..], &b"a"[..]);
    b.delete_range(Cf::Accounts, &b"b"[..], &b"b"[..]);
    e.write(b, true).unwrap();
    assert_eq!(
        e.get(Cf::Accounts, b"b").unwrap().as_deref(),
        Some(&b"1"[..])
    );
}

pub(crate) fn last_in_respects_bounds(e: &dyn Engine) {
    assert_eq!(e.last_in(Cf::InboxMeta, b"", &[0xff]).unwrap(), None);
    for k in [&b"a"[..], b"b", b"b\xff", b"c"] {
        put(e, Cf::InboxMeta, k, k);
    }
    let last = |from: &[u8], to: &[u8]| e.last_in(Cf::InboxMeta, from, to).unwrap().map(|kv| kv.0);
    assert_eq!(last(b"", &[0xff]), Some(b"c".to_vec()));
    assert_eq!(
        last(b"a", b"c"),
        Some(b"b\xff".to_vec()),
        "`to` is exclusive"
    );
    assert_eq!(last(b"a", b"b"), Some(b"a".to_vec()));
    assert_eq!(last(b"c", b"d"), Some(b"c".to_vec()), "`from` is inclusive");
    assert_eq!(last(b"c\x00", b"d"), None);
    assert_eq!(last(b"", b"a"), None);
    // The value comes with the key.
    assert_eq!(
        e.last_in(Cf::InboxMeta, b"b", b"c").unwrap(),
        Some((b"b\xff".to_vec(), b"b\xff".to_vec()))
    );
}

pub(crate) fn delete_range_is_half_open(e: &dyn Engine) {
    for k in [&b"a"[..], b"b", b"b\x00", b"b\xff\xff", b"c", b"d"] {
        put(e, Cf::Verify, k, b"");
    }
    let mut b = WriteBatch::new();
    b.delete_range(Cf::Verify, &b"b"[..], &b"c"[..]);
    e.write(b, true).unwrap();
    let left = keys(&e.scan(Cf::Verify, b"", &[0xff], 100).unwrap());
    assert_eq!(left, vec![b"a".to_vec(), b"c".to_vec(), b"d".to_vec()]);
    assert_eq!(e.last_in(Cf::Verify, b"b", b"c").unwrap(), None);
}

pub(crate) fn delete_range_orders_with_puts_in_a_batch(e: &dyn Engine) {
    let mut b = WriteBatch::new();
    b.put(Cf::Inbox, &b"k1"[..], &b"before"[..]);
    b.delete_range(Cf::Inbox, &b"k"[..], &b"l"[..]);
    b.put(Cf::Inbox, &b"k2"[..], &b"after"[..]);
    e.write(b, true).unwrap();
    assert_eq!(
        e.get(Cf::Inbox, b"k1").unwrap(),
        None,
        "a put before the range delete is deleted"
    );
    assert_eq!(
        e.get(Cf::Inbox, b"k2").unwrap().as_deref(),
        Some(&b"after"[..])
    );
    assert_eq!(
        keys(&e.scan(Cf::Inbox, b"k", b"l", 10).unwrap()),
        vec![b"k2".to_vec()]
    );
}

pub(crate) fn keys_with_ff_bytes_and_prefix_end(e: &dyn Engine) {
    // The pure function first.
    assert_eq!(prefix_end(&[0x00]), vec![0x01]);
    assert_eq!(prefix_end(&[0x12, 0xff, 0xff]), vec![0x13]);
    assert_eq!(prefix_end(&[0x12, 0xfe]), vec![0x12, 0xff]);
    assert_eq!(
        prefix_end(&[0xff]),
        vec![0xff, 0xff],
        "documented edge: no finite bound"
    );
    assert_eq!(
        prefix_end(&[]),
        vec![0xff],
        "documented edge: no finite bound"
    );
    assert_eq!(
        key(0x0102, &[&[0xff], &[0x03]]),
        vec![0x01, 0x02, 0xff, 0x03]
    );
    assert_eq!(
        prefix_end(&key(u16::MAX - 1, &[&[0xff; 8]])),
        vec![0xff, 0xff]
    );

    // A prefix ending in 0xff: every key under it, none beyond it.
    let prefix = key(1, &[&[0xff]]);
    let inside = [
        key(1, &[&[0xff]]),
        key(1, &[&[0xff, 0x00]]),
        key(1, &[&[0xff; 5]]),
    ];
    let outside = [
        key(1, &[&[0xfe, 0xff]]),
        key(2, &[]),
        key(2, &[&[0x00]]),
        key(0, &[&[0xff; 9]]),
    ];
    let mut b = WriteBatch::new();
    for k in inside.iter().chain(outside.iter()) {
        b.put(Cf::Dedup, k.clone(), k.clone());
    }
    e.write(b, true).unwrap();
    let end = prefix_end(&prefix);
    assert_eq!(end, key(2, &[]));
    let got = keys(&e.scan(Cf::Dedup, &prefix, &end, 100).unwrap());
    assert_eq!(got, inside.to_vec());
    assert_eq!(
        e.last_in(Cf::Dedup, &prefix, &end).unwrap().map(|kv| kv.0),
        Some(key(1, &[&[0xff; 5]]))
    );
    let mut b = WriteBatch::new();
    b.delete_range(Cf::Dedup, prefix.clone(), end.clone());
    e.write(b, true).unwrap();
    assert!(e.scan(Cf::Dedup, &prefix, &end, 100).unwrap().is_empty());
    assert_eq!(
        e.scan(Cf::Dedup, b"", &[0xff, 0xff], 100).unwrap().len(),
        outside.len()
    );
}

pub(crate) fn large_values_roundtrip(e: &dyn Engine) {
    let big: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 7 % 251) as u8).collect();
    put(e, Cf::Inbox, b"big", &big);
    assert_eq!(e.get(Cf::Inbox, b"big").unwrap().as_deref(), Some(&big[..]));
}

/// Group body rows (which the RocksDB engine stores once per node behind markers) read back
/// exactly as written, whatever the mix of shards, re-puts, deletes and range deletes.
pub(crate) fn group_body_rows_read_back_as_written(e: &dyn Engine) {
    let body_ref = [9u8; 24];
    let body = |text: &str| [&body_ref[..], text.as_bytes()].concat();
    let row = |shard| key(shard, &[&[GROUP_BODY_TAG], &body_ref]);
    let count = |shard| key(shard, &[&[0], &body_ref]);
    let shard_range = |shard| (key(shard, &[]), prefix_end(&key(shard, &[])));
    let mut b = WriteBatch::new();
    for shard in 1..=4 {
        b.put(Cf::GroupBodies, count(shard), vec![shard as u8; 17]);
        b.put(Cf::GroupBodies, row(shard), body("same"));
    }
    b.put(Cf::GroupBodies, row(1), body("same"));
    e.write(b, true).unwrap();
    let mut b = WriteBatch::new();
    b.put(Cf::GroupBodies, row(2), body("same"));
    b.delete(Cf::GroupBodies, row(3));
    let (from, to) = shard_range(4);
    b.delete_range(Cf::GroupBodies, from, to);
    b.put(Cf::GroupBodies, row(4), body("same"));
    b.put(Cf::GroupBodies, row(5), body("other"));
    e.write(b, true).unwrap();
    let expected = vec![
        (count(1), vec![1; 17]),
        (row(1), body("same")),
        (count(2), vec![2; 17]),
        (row(2), body("same")),
        (count(3), vec![3; 17]),
        (row(4), body("same")),
        (row(5), body("other")),
    ];
    assert_eq!(
        e.scan(Cf::GroupBodies, &[], &[0xff], 100).unwrap(),
        expected
    );
    for (k, v) in &expected {
        assert_eq!(e.get(Cf::GroupBodies, k).unwrap().as_ref(), Some(v));
    }
    assert_eq!(e.get(Cf::GroupBodies, &row(3)).unwrap(), None);
    let (from, to) = shard_range(2);
    assert_eq!(
        e.last_in(Cf::GroupBodies, &from, &to).unwrap(),
        Some((row(2), body("same")))
    );
    let mut b = WriteBatch::new();
    for shard in 1..=5 {
        let (from, to) = shard_range(shard);
        b.delete_range(Cf::GroupBodies, from, to);
    }
    e.write(b, true).unwrap();
    assert!(e
        .scan(Cf::GroupBodies, &[], &[0xff], 100)
        .unwrap()
        .is_empty());
    put(e, Cf::GroupBodies, &row(6), &body("again"));
    assert_eq!(
        e.get(Cf::GroupBodies, &row(6)).unwrap(),
        Some(body("again"))
    );
}

mod mem_engine {
    engine_suite!(crate::storage::suite::mem_fixture);
}

mod rocks_engine {
    engine_suite!(crate::storage::suite::rocks_fixture);
}
