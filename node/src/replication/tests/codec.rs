//! The record codec: round trips, and untrusted bytes never panic and are bounded.

use proptest::prelude::*;

use super::super::record::*;
use crate::shard_rows::SHARD_CFS;
use crate::storage::{key, prefix_end, Cf, Op};

fn record(ops: Vec<Op>) -> ShardLogRecord {
    ShardLogRecord {
        shard: 7,
        lsn: 42,
        epoch: 3,
        base_epoch: 2,
        ops,
        kind: RecordKind::Log,
    }
}

fn sample() -> ShardLogRecord {
    record(vec![
        Op::Put {
            cf: Cf::Inbox,
            key: key(7, &[b"user", &[0, 1]]),
            value: vec![0xab; 300],
        },
        Op::Delete {
            cf: Cf::Dedup,
            key: key(7, &[b"d"]),
        },
        Op::Put {
            cf: Cf::Accounts,
            key: key(7, &[b"u"]),
            value: Vec::new(),
        },
        Op::DeleteRange {
            cf: Cf::ShardLog,
            from: key(7, &[]),
            to: prefix_end(&key(7, &[])),
        },
    ])
}

fn any_op(shard: u16) -> impl Strategy<Value = Op> {
    let logged: Vec<Cf> = SHARD_CFS
        .into_iter()
        .filter(|&c| c != Cf::ShardLog)
        .collect();
    let cf = proptest::sample::select(logged); // all but ShardLog
    let tail = proptest::collection::vec(any::<u8>(), 1..40);
    let value = proptest::collection::vec(any::<u8>(), 0..600);
    prop_oneof![
        (cf.clone(), tail.clone(), value).prop_map(move |(cf, t, value)| Op::Put {
            cf,
            key: key(shard, &[&t]),
            value
        }),
        (cf.clone(), tail.clone()).prop_map(move |(cf, t)| Op::Delete {
            cf,
            key: key(shard, &[&t])
        }),
        (cf, tail).prop_map(move |(cf, t)| Op::DeleteRange {
            cf,
            from: key(shard, &[&t]),
            to: prefix_end(&key(shard, &[])),
        }),
    ]
}

fn any_record() -> impl Strategy<Value = ShardLogRecord> {
    (0..u16::MAX, 1..u64::MAX, any::<u64>(), any::<u64>()).prop_flat_map(|(shard, lsn, a, b)| {
        proptest::collection::vec(any_op(shard), 1..20).prop_map(move |ops| ShardLogRecord {
            shard,
            lsn,
            epoch: a.max(b),
            base_epoch: a.min(b),
            ops,
            kind: RecordKind::Log,
        })
    })
}

proptest! {
    #[test]
    fn valid_records_roundtrip(r in any_record()) {
        r.check().unwrap();
        let bytes = r.encode();
        prop_assert_eq!(bytes.len(), r.encoded_len());
        prop_assert_eq!(ShardLogRecord::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = ShardLogRecord::decode(&bytes);
    }

    /// Valid headers with random bodies get past the first checks, into the op decoder.
    #[test]
    fn random_bodies_never_panic(
        count in any::<u32>(),
        body in proptest::collection::vec(any::<u8>(), 0..2000),
    ) {
        let mut bytes = sample().encode()[..RECORD_HEADER_BYTES - 4].to_vec();
        bytes.extend_from_slice(&count.to_be_bytes());
        bytes.extend_from_slice(&body);
        let _ = ShardLogRecord::decode(&bytes);
    }

    #[test]
    fn corrupted_records_never_panic(r in any_record(), at in any::<usize>(), byte in any::<u8>()) {
        let mut bytes = r.encode();
        let at = at % bytes.len();
        bytes[at] = byte;
        if let Ok(decoded) = ShardLogRecord::decode(&bytes) {
            // Whatever decodes passed every check.
            decoded.check().unwrap();
        }
    }
}

#[test]
fn every_truncation_is_refused() {
    let bytes = sample().encode();
    for len in 0..bytes.len() {
        assert!(
            ShardLogRecord::decode(&bytes[..len]).is_err(),
            "{len} of {} bytes decoded",
            bytes.len()
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(
        ShardLogRecord::decode(&longer),
        Err(RecordError::TrailingBytes(1))
    );
    // Versions 1 and 2 (without the base epoch) and unknown ones are refused.
    for v in [1, 2, 5] {
        let mut version = bytes.clone();
        version[0] = v;
        assert_eq!(
            ShardLogRecord::decode(&version),
            Err(RecordError::Version(v))
        );
    }
}

#[test]
fn snapshot_chunks_roundtrip_and_hold_only_puts() {
    let chunk = |ops: Vec<Op>, first: bool, last: bool| ShardLogRecord {
        kind: RecordKind::Snapshot {
            session: 0x0102_0304_0506_0708,
            index: if first { 0 } else { 0x0a0b_0c0d },
            last,
        },
        ..record(ops)
    };
    let put = Op::Put {
        cf: Cf::Inbox,
        key: key(7, &[b"a"]),
        value: vec![1; 10],
    };
    for (first, last) in [(true, false), (false, false), (false, true), (true, true)] {
        let c = chunk(vec![put.clone()], first, last);
        c.check().unwrap();
        let bytes = c.encode();
        assert_eq!(bytes.len(), c.encoded_len());
        assert_eq!(ShardLogRecord::decode(&bytes).unwrap(), c);
        for len in 0..bytes.len() {
            assert!(ShardLogRecord::decode(&bytes[..len]).is_err());
        }
    }
    // An empty shard's snapshot: no rows, at LSN 0.
    let empty = ShardLogRecord {
        lsn: 0,
        ..chunk(Vec::new(), true, true)
    };
    assert_eq!(ShardLogRecord::decode(&empty.encode()).unwrap(), empty);
    // A log record may have neither.
    assert!(ShardLogRecord { lsn: 0, ..sample() }.check().is_err());
    assert!(record(Vec::new()).check().is_err());
    // Deletes and range deletes are not rows.
    let delete = Op::Delete {
        cf: Cf::Inbox,
        key: key(7, &[b"a"]),
    };
    let err = chunk(vec![put.clone(), delete], true, false)
        .check()
        .unwrap_err();
    assert!(err.to_string().contains("only puts"), "{err}");
    // Flags other than first and last are refused.
    let mut bytes = chunk(vec![put], false, false).encode();
    bytes[RECORD_HEADER_BYTES - 4] = 2;
    assert!(ShardLogRecord::decode(&bytes)
        .unwrap_err()
        .to_string()
        .contains("flags"));
}

#[test]
fn bounds_are_enforced_on_both_sides() {
    let put = |key_len: usize, value_len: usize| Op::Put {
        cf: Cf::Inbox,
        key: key(7, &[&vec![1; key_len - 2]]),
        value: vec![2; value_len],
    };
    let too_large = |r: &ShardLogRecord, what: &str| {
        assert!(
            matches!(r.check(), Err(RecordError::TooLarge { what: w, .. }) if w == what),
            "{what}: {:?}",
            r.check()
        );
        // The encoder cuts what does not fit its field; the decoder refuses the result.
        assert!(ShardLogRecord::decode(&r.encode()).is_err(), "{what}");
    };
    record(vec![put(RECORD_KEY_BYTES_MAX, RECORD_VALUE_BYTES_MAX)])
        .check()
        .unwrap();
    too_large(
        &record(vec![put(RECORD_KEY_BYTES_MAX + 1, 1)]),
        "key length",
    );
    too_large(
        &record(vec![put(3, RECORD_VALUE_BYTES_MAX + 1)]),
        "value length",
    );
    too_large(&record(vec![put(3, 0); RECORD_OPS_MAX + 1]), "op count");
    let big = RECORD_BYTES_MAX / RECORD_VALUE_BYTES_MAX + 1;
    too_large(
        &record(vec![put(3, RECORD_VALUE_BYTES_MAX); big]),
        "encoded length",
    );
    // A count claiming more ops than the bytes hold is refused without allocating for it.
    let mut bytes = record(vec![put(3, 1)]).encode();
    bytes[RECORD_HEADER_BYTES - 4..RECORD_HEADER_BYTES]
        .copy_from_slice(&(RECORD_OPS_MAX as u32).to_be_bytes());
    assert_eq!(ShardLogRecord::decode(&bytes), Err(RecordError::Truncated));
    bytes[RECORD_HEADER_BYTES - 4..RECORD_HEADER_BYTES].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        ShardLogRecord::decode(&bytes),
        Err(RecordError::TooLarge {
            what: "op count",
            ..
        })
    ));
}

#[test]
fn ops_outside_the_shard_or_rules_are_refused() {
    let other_shard = key(8, &[b"x"]);
    let cases: Vec<(ShardLogRecord, &str)> = vec![
        (record(Vec::new()), "no ops"),
        (ShardLogRecord { lsn: 0, ..sample() }, "LSN 0"),
        (
            ShardLogRecord {
                base_epoch: 4,
                ..sample()
            },
            "a base epoch after the record's epoch",
        ),
        (
            ShardLogRecord {
                shard: u16::MAX,
                ..sample()
            },
            "not a shard id",
        ),
        (
            record(vec![Op::Put {
                cf: Cf::Inbox,
                key: other_shard.clone(),
                value: Vec::new(),
            }]),
            "key outside the shard",
        ),
        (
            record(vec![Op::Delete {
                cf: Cf::Inbox,
                key: key(7, &[]),
            }]),
            "key outside the shard",
        ),
        (
            record(vec![Op::DeleteRange {
                cf: Cf::Inbox,
                from: key(7, &[b"a"]),
                to: other_shard,
            }]),
            "range outside the shard",
        ),
        (
            record(vec![Op::DeleteRange {
                cf: Cf::Inbox,
                from: key(7, &[b"b"]),
                to: key(7, &[b"a"]),
            }]),
            "empty range",
        ),
        (
            record(vec![Op::Put {
                cf: Cf::ShardLog,
                key: key(7, &[&[0]]),
                value: vec![1; 17],
            }]),
            "a position written as data",
        ),
        (
            record(vec![Op::Put {
                cf: Cf::Meta,
                key: key(7, &[b"m"]),
                value: Vec::new(),
            }]),
            "a node-local family",
        ),
    ];
    for (r, reason) in cases {
        let err = r.check().unwrap_err();
        assert!(err.to_string().contains(reason), "{reason}: {err}");
        if r.ops
            .iter()
            .all(|op| !matches!(op, Op::Put { cf: Cf::Meta, .. }))
        {
            assert_eq!(ShardLogRecord::decode(&r.encode()), Err(err), "{reason}");
        }
    }
}
