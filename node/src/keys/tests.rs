use ringpost_client::prekeys::DeviceKeys as Signer;

use super::*;
use crate::storage::suite::{mem_fixture, rocks_fixture, Fixture};

const U: UserId = 15_551_234_567;

/// The keys of identity `n` (one per device in these tests).
fn signer(n: u8) -> Signer {
    Signer::from_seed([n; 32])
}

fn ik(n: u8) -> Bytes {
    signer(n).identity_key()
}

fn spk(n: u8, id: u32) -> SignedPrekey {
    signer(n).signed_prekey(id)
}

fn otks(n: u8, ids: std::ops::Range<u32>) -> Vec<OneTimePrekey> {
    ids.map(|id| signer(n).one_time_prekey(id)).collect()
}

fn service(f: &Fixture) -> Keys {
    Keys::new(f.0.clone(), 64)
}

/// Uploads identity `n`'s signed prekey `spk` (if any) and one-time prekeys `ids`.
fn upload(
    keys: &Keys,
    user: UserId,
    device: DeviceId,
    n: u8,
    spk: Option<u32>,
    ids: std::ops::Range<u32>,
) -> Result<u32, KeysError> {
    keys.upload(user, device, &signer(n).upload(spk, ids))
        .map(|u| u.count)
}

fn claim(
    keys: &Keys,
    user: UserId,
    device: Option<DeviceId>,
    devices: &[DeviceId],
) -> Result<Vec<DeviceBundle>, KeysError> {
    keys.claim(user, device, devices, true).map(|c| c.bundles)
}

fn upload_and_claim(f: Fixture) {
    let keys = service(&f);
    assert_eq!(upload(&keys, U, 1, 1, Some(9), 10..13).unwrap(), 3);
    assert_eq!(keys.count(U, 1).unwrap(), 3);
    let b = claim(&keys, U, None, &[1]).unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].device, 1);
    assert_eq!(b[0].identity_key, ik(1));
    assert_eq!(b[0].signed_prekey, Some(spk(1, 9)));
    // The lowest id goes first, with its key and signature, which the claimer can check.
    assert_eq!(b[0].one_time, Some(otks(1, 10..11).remove(0)));
    assert!(ringpost_client::prekeys::verify_bundle(&b[0]));
    assert_eq!(keys.count(U, 1).unwrap(), 2);
}

fn claims_exhaust_one_time_keys_then_hand_out_the_fallback(f: Fixture) {
    let keys = service(&f);
    upload(&keys, U, 1, 1, Some(1), 0..2).unwrap();
    let ids: Vec<_> = (0..4)
        .map(|_| claim(&keys, U, Some(1), &[1]).unwrap().remove(0))
        .map(|b| {
            // The fallback (signed) key comes with every bundle, also once the one-time keys
            // ran out.
            assert_eq!(b.identity_key, ik(1));
            assert_eq!(b.signed_prekey, Some(spk(1, 1)));
            b.one_time.map(|k| k.id)
        })
        .collect();
    assert_eq!(ids, vec![Some(0), Some(1), None, None]);
    assert_eq!(keys.count(U, 1).unwrap(), 0);
}

fn over_budget_claims_hand_out_the_fallback_and_pop_nothing(f: Fixture) {
    let keys = service(&f);
    upload(&keys, U, 1, 1, Some(1), 0..5).unwrap();
    let c = keys.claim(U, None, &[1], false).unwrap();
    assert_eq!(c.bundles.len(), 1);
    assert_eq!(c.bundles[0].signed_prekey, Some(spk(1, 1)));
    assert_eq!(c.bundles[0].one_time, None);
    assert!(c.low.is_empty());
    assert_eq!(keys.count(U, 1).unwrap(), 5);
}

fn the_low_watermark_is_reported_once_per_crossing(f: Fixture) {
    let keys = service(&f);
    let w = PREKEY_LOW_WATERMARK;
    upload(&keys, U, 1, 1, Some(1), 0..w + 2).unwrap();
    upload(&keys, U, 2, 2, Some(1), 0..3).unwrap();
    let mut crossings = Vec::new();
    for i in 0..w + 5 {
        let c = keys.claim(U, None, &[1, 2], true).unwrap();
        for (d, left) in c.low {
            crossings.push((i, d, left));
        }
    }
    // Device 1 went from w+2 to 0: one report, by the claim that took it from w to w-1.
    // Device 2 was below the watermark from the start: never reported.
    assert_eq!(crossings, vec![(2, 1, w - 1)]);
    assert_eq!(keys.count(U, 1).unwrap(), 0);
    // An upload above the watermark re-arms it.
    upload(&keys, U, 1, 1, None, 100..100 + w).unwrap();
    let c = keys.claim(U, Some(1), &[1], true).unwrap();
    assert_eq!(c.low, vec![(1, w - 1)]);
    let c = keys.claim(U, Some(1), &[1], true).unwrap();
    assert!(c.low.is_empty());
}

fn claim_covers_listed_devices_only(f: Fixture) {
    let keys = service(&f);
    upload(&keys, U, 1, 1, Some(1), 0..5).unwrap();
    upload(&keys, U, 3, 3, None, 100..105).unwrap();
    // Device 2 is listed but never published keys: left out.
    let b = claim(&keys, U, None, &[1, 2, 3]).unwrap();
    let got: Vec<_> = b
        .iter()
        .map(|b| (b.device, b.one_time.as_ref().map(|k| k.id)))
        .collect();
    assert_eq!(got, vec![(1, Some(0)), (3, Some(100))]);
    assert_eq!(b[1].signed_prekey, None);
    // Device 3 is not in the current list (removed): no bundle, and no key popped.
    let b = claim(&keys, U, None, &[1]).unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(keys.count(U, 3).unwrap(), 4);
    assert!(matches!(
        claim(&keys, U, Some(3), &[1]),
        Err(KeysError::NotFound)
    ));
    assert!(matches!(
        claim(&keys, U, Some(2), &[1, 2]),
        Err(KeysError::NotFound)
    ));
    assert!(matches!(
        claim(&keys, U, None, &[2]),
        Err(KeysError::NotFound)
    ));
    assert!(matches!(
        claim(&keys, U + 1, None, &[1]),
        Err(KeysError::NotFound)
    ));
    assert!(matches!(
        claim(&keys, U, None, &[]),
        Err(KeysError::NotFound)
    ));
    let err = claim(&keys, U, None, &[1, 2, 3, 4, 5, 6]).unwrap_err();
    assert!(matches!(err, KeysError::TooManyDevices(6)));
    assert_eq!(err.code(), ErrorCode::LimitExceeded);
    // Duplicates in the list do not pop twice.
    let before = keys.count(U, 1).unwrap();
    assert_eq!(claim(&keys, U, None, &[1, 1]).unwrap().len(), 1);
    assert_eq!(keys.count(U, 1).unwrap(), before - 1);
}

fn per_device_cap_is_all_or_nothing(f: Fixture) {
    let keys = service(&f);
    let per = PREKEYS_PER_UPLOAD_MAX as u32;
    let uploads = ONE_TIME_PREKEYS_PER_DEVICE_MAX as u32 / per;
    for i in 0..uploads {
        upload(&keys, U, 1, 1, Some(1), i * per..(i + 1) * per).unwrap();
    }
    assert_eq!(
        keys.count(U, 1).unwrap() as usize,
        ONE_TIME_PREKEYS_PER_DEVICE_MAX
    );
    // Re-uploading stored ids replaces them without growing the store.
    let n = upload(&keys, U, 1, 1, None, 0..per).unwrap();
    assert_eq!(n as usize, ONE_TIME_PREKEYS_PER_DEVICE_MAX);
    // One more is refused and nothing of the upload is stored (not even the new spk).
    let err = upload(&keys, U, 1, 1, Some(2), 5000..5001).unwrap_err();
    assert!(
        matches!(err, KeysError::PrekeyCap { would_hold } if would_hold == ONE_TIME_PREKEYS_PER_DEVICE_MAX + 1)
    );
    assert_eq!(err.code(), ErrorCode::LimitExceeded);
    assert_eq!(
        keys.count(U, 1).unwrap() as usize,
        ONE_TIME_PREKEYS_PER_DEVICE_MAX
    );
    assert_eq!(
        claim(&keys, U, Some(1), &[1]).unwrap()[0].signed_prekey,
        Some(spk(1, 1))
    );
    // After a claim there is room for exactly one.
    upload(&keys, U, 1, 1, None, 5000..5001).unwrap();
    assert!(upload(&keys, U, 1, 1, None, 5001..5002).is_err());
}

/// Asserts that `u` is refused with `code` and stores nothing.
fn refused(keys: &Keys, u: PrekeyUpload, code: ErrorCode) -> KeysError {
    let err = keys.upload(U, 1, &u).unwrap_err();
    assert_eq!(err.code(), code, "{err}");
    assert!(
        matches!(claim(keys, U, None, &[1]), Err(KeysError::NotFound)),
        "nothing stored after: {err}"
    );
    assert_eq!(keys.count(U, 1).unwrap(), 0);
    err
}

fn forged_and_missing_signatures_are_refused_and_store_nothing(f: Fixture) {
    let keys = service(&f);
    let good = signer(1).upload(Some(1), 0..5);
    // A one-time key signed by another identity: the whole upload is refused.
    let mut forged = good.clone();
    forged.one_time[3] = signer(2).one_time_prekey(3);
    let err = refused(&keys, forged, ErrorCode::BadSignature);
    assert!(
        matches!(
            err,
            KeysError::BadSignature {
                what: "one-time prekey",
                id: 3,
                ..
            }
        ),
        "{err}"
    );
    // A signed prekey whose key was swapped after signing.
    let mut swapped = good.clone();
    if let Some(s) = swapped.signed_prekey.as_mut() {
        s.key = signer(1).one_time_prekey(0).key;
    }
    refused(&keys, swapped, ErrorCode::BadSignature);
    // A signature over another id (the id is signed).
    let mut renumbered = good.clone();
    renumbered.one_time[0].id = 77;
    refused(&keys, renumbered, ErrorCode::BadSignature);
    // A flipped bit.
    let mut flipped = good.clone();
    let mut sig = flipped.one_time[4].signature.to_vec();
    sig[10] ^= 1;
    flipped.one_time[4].signature = sig.into();
    refused(&keys, flipped, ErrorCode::BadSignature);
    // Missing (an old client) and short signatures.
    let mut missing = good.clone();
    missing.one_time[1].signature = Bytes::new();
    let err = refused(&keys, missing, ErrorCode::BadSignature);
    assert!(err.to_string().contains("missing"), "{err}");
    let mut short = good.clone();
    short.one_time[1].signature = short.one_time[1].signature.slice(..63);
    refused(&keys, short, ErrorCode::BadSignature);
    // Another identity key than the one that signed.
    let mut other_identity = good.clone();
    other_identity.identity_key = ik(2);
    refused(&keys, other_identity, ErrorCode::BadSignature);
    // The good upload is stored.
    assert_eq!(keys.upload(U, 1, &good).unwrap().count, 5);
}

fn wrong_key_lengths_are_refused_and_store_nothing(f: Fixture) {
    let keys = service(&f);
    let good = signer(1).upload(Some(1), 0..2);
    for len in [0, 32, 63, 65] {
        let mut u = good.clone();
        u.identity_key = Bytes::from(vec![1u8; len]);
        let err = refused(&keys, u, ErrorCode::Malformed);
        assert!(
            matches!(
                err,
                KeysError::KeyLength {
                    what: "identity key",
                    expected: 64,
                    ..
                }
            ),
            "{err}"
        );
    }
    // A 33-byte prekey (a type byte in front, as some libraries send), signed over its 33
    // bytes or not: refused for its length.
    let mut long = good.clone();
    let mut k = long.one_time[1].key.to_vec();
    k.insert(0, 5);
    long.one_time[1].key = k.into();
    let err = refused(&keys, long, ErrorCode::Malformed);
    assert!(
        matches!(
            err,
            KeysError::KeyLength {
                what: "one-time prekey",
                len: 33,
                expected: 32
            }
        ),
        "{err}"
    );
    let mut short_spk = good.clone();
    if let Some(s) = short_spk.signed_prekey.as_mut() {
        s.key = s.key.slice(..31);
    }
    refused(&keys, short_spk, ErrorCode::Malformed);
    let too_many = signer(1).upload(None, 0..PREKEYS_PER_UPLOAD_MAX as u32 + 1);
    let err = refused(&keys, too_many, ErrorCode::LimitExceeded);
    assert!(matches!(err, KeysError::TooManyInUpload(n) if n == PREKEYS_PER_UPLOAD_MAX + 1));
}

fn identity_change_drops_old_key_set(f: Fixture) {
    let keys = service(&f);
    upload(&keys, U, 1, 1, Some(1), 0..10).unwrap();
    // Same identity, no spk: the spk is kept and keys are added.
    assert_eq!(upload(&keys, U, 1, 1, None, 10..12).unwrap(), 12);
    assert_eq!(
        claim(&keys, U, Some(1), &[1]).unwrap()[0].signed_prekey,
        Some(spk(1, 1))
    );
    // New identity: old one-time keys and the old spk are gone.
    assert_eq!(upload(&keys, U, 1, 2, None, 50..52).unwrap(), 2);
    let b = claim(&keys, U, Some(1), &[1]).unwrap().remove(0);
    assert_eq!(b.identity_key, ik(2));
    assert_eq!(b.signed_prekey, None);
    assert_eq!(b.one_time.map(|k| k.id), Some(50));
    // Repeated ids within one upload: the last one wins, counted once.
    let mut dup = signer(2).upload(None, [60, 60]);
    let second = Signer::from_seed([2; 32]);
    // Same id, same signer: the keys are equal; make the second one distinguishable by
    // signing another identity's key material under identity 2.
    let other_key = signer(9).one_time_prekey(60).key;
    dup.one_time[1] = OneTimePrekey {
        id: 60,
        signature: second.sign(
            ringpost_wire::prekeys::KIND_ONE_TIME,
            60,
            other_key.as_ref().try_into().unwrap(),
        ),
        key: other_key.clone(),
    };
    assert_eq!(keys.upload(U, 1, &dup).unwrap().count, 2);
    let b = claim(&keys, U, Some(1), &[1]).unwrap().remove(0);
    assert_eq!(b.one_time.map(|k| k.id), Some(51));
    let b = claim(&keys, U, Some(1), &[1]).unwrap().remove(0);
    assert_eq!(b.one_time.unwrap().key, other_key);
}

fn new_identities_are_announced_until_cleared(f: Fixture) {
    let keys = service(&f);
    // A device's first upload announces, and so does every upload until it is cleared.
    let first = signer(1).upload(Some(1), 0..3);
    assert!(keys.upload(U, 1, &first).unwrap().announce);
    assert!(keys.upload(U, 1, &first).unwrap().announce, "still pending");
    keys.announced(U, 1, &ik(1)).unwrap();
    assert!(!keys.upload(U, 1, &first).unwrap().announce);
    // A changed key announces; clearing an older key leaves the newer one pending.
    assert!(
        keys.upload(U, 1, &signer(2).upload(None, 0..1))
            .unwrap()
            .announce
    );
    keys.announced(U, 1, &ik(1)).unwrap();
    assert!(
        keys.upload(U, 1, &signer(2).upload(None, 1..2))
            .unwrap()
            .announce
    );
    keys.announced(U, 1, &ik(2)).unwrap();
    assert!(
        !keys
            .upload(U, 1, &signer(2).upload(None, 2..3))
            .unwrap()
            .announce
    );
    // A refused upload announces nothing and clears nothing.
    let mut forged = signer(3).upload(None, 0..1);
    forged.one_time[0].signature = signer(4).one_time_prekey(0).signature;
    assert!(keys.upload(U, 1, &forged).is_err());
    assert!(
        !keys
            .upload(U, 1, &signer(2).upload(None, 3..4))
            .unwrap()
            .announce
    );
    // A dropped device (re-registration) announces its next first upload.
    keys.drop_device(U, 1).unwrap();
    assert!(
        keys.upload(U, 1, &signer(2).upload(None, 0..1))
            .unwrap()
            .announce
    );
}

fn drop_device_is_scoped(f: Fixture) {
    let keys = service(&f);
    upload(&keys, U, 1, 1, Some(1), 0..3).unwrap();
    upload(&keys, U, 2, 2, Some(2), 0..3).unwrap();
    upload(&keys, U + 1, 2, 3, None, 0..3).unwrap();
    keys.drop_device(U, 2).unwrap();
    assert_eq!(keys.count(U, 2).unwrap(), 0);
    assert!(matches!(
        claim(&keys, U, Some(2), &[1, 2]),
        Err(KeysError::NotFound)
    ));
    assert_eq!(keys.count(U, 1).unwrap(), 3);
    assert_eq!(keys.count(U + 1, 2).unwrap(), 3);
    keys.drop_device(U, 9).unwrap();
}

fn concurrent_claims_never_share_a_key(f: Fixture) {
    let keys = service(&f);
    let per = PREKEYS_PER_UPLOAD_MAX as u32;
    upload(&keys, U, 1, 1, None, 0..per).unwrap();
    upload(&keys, U, 2, 2, None, 0..per).unwrap();
    let threads = 8;
    let claims_per_thread = 30; // 240 claims for 200 keys: the store runs out.
    let claimed: Vec<(DeviceId, Option<u32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut got = Vec::new();
                    for _ in 0..claims_per_thread {
                        for b in claim(&keys, U, None, &[1, 2]).unwrap() {
                            got.push((b.device, b.one_time.map(|k| k.id)));
                        }
                    }
                    got
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let handed_out: Vec<_> = claimed.iter().filter(|(_, id)| id.is_some()).collect();
    let unique: BTreeSet<_> = handed_out.iter().collect();
    assert_eq!(handed_out.len(), 2 * per as usize, "every key handed out");
    assert_eq!(unique.len(), handed_out.len(), "no key handed out twice");
    assert_eq!(claimed.len(), 2 * threads * claims_per_thread);
    assert_eq!(keys.count(U, 1).unwrap() + keys.count(U, 2).unwrap(), 0);
}

fn corrupt_records_are_errors(f: Fixture) {
    let keys = service(&f);
    upload(&keys, U, 1, 1, None, 0..1).unwrap();
    let shard = keys.shard(U);
    let mut b = WriteBatch::new();
    b.put(
        Cf::Prekeys,
        device_key(shard, U, 1),
        vec![RECORD_VERSION, 40],
    );
    f.0.write(b, true).unwrap();
    let err = claim(&keys, U, None, &[1]).unwrap_err();
    assert!(
        matches!(err, KeysError::Storage(StorageError::Corrupt { .. })),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::Internal);
    // A corrupt one-time key fails the claim without popping anything.
    upload(&keys, U, 2, 2, None, 0..1).unwrap();
    let mut b = WriteBatch::new();
    b.put(Cf::Prekeys, one_time_key(shard, U, 2, 0), vec![9]);
    f.0.write(b, true).unwrap();
    assert!(claim(&keys, U, Some(2), &[2]).is_err());
    assert_eq!(keys.count(U, 2).unwrap(), 1);
}

macro_rules! cases {
    ($fixture:path; $($case:ident),* $(,)?) => {
        $( #[test] fn $case() { super::$case($fixture()); } )*
    };
}
macro_rules! suite {
    ($fixture:path) => {
        cases!($fixture;
            upload_and_claim,
            claims_exhaust_one_time_keys_then_hand_out_the_fallback,
            over_budget_claims_hand_out_the_fallback_and_pop_nothing,
            the_low_watermark_is_reported_once_per_crossing,
            claim_covers_listed_devices_only,
            per_device_cap_is_all_or_nothing,
            forged_and_missing_signatures_are_refused_and_store_nothing,
            wrong_key_lengths_are_refused_and_store_nothing,
            identity_change_drops_old_key_set,
            new_identities_are_announced_until_cleared,
            drop_device_is_scoped,
            concurrent_claims_never_share_a_key,
            corrupt_records_are_errors,
        );
    };
}

mod mem {
    use super::*;
    suite!(mem_fixture);
}

mod rocks {
    use super::*;
    suite!(rocks_fixture);
}

#[test]
fn codecs_round_trip() {
    let rec = DeviceKeys {
        identity_key: ik(1),
        signed_prekey: Some(spk(1, 3)),
    };
    assert_eq!(decode_device(&encode_device(&rec)).unwrap(), rec);
    let bare = DeviceKeys {
        identity_key: Bytes::from_static(b"k"),
        signed_prekey: None,
    };
    assert_eq!(decode_device(&encode_device(&bare)).unwrap(), bare);
    assert_eq!(
        decode_one_time(&encode_one_time(&otks(1, 5..6)[0])).unwrap(),
        (
            otks(1, 5..6)[0].key.clone(),
            otks(1, 5..6)[0].signature.clone()
        )
    );
    // A record from before signatures decodes with an empty one.
    assert_eq!(
        decode_one_time(&[RECORD_VERSION, 3, b'x', b'y', b'z']).unwrap(),
        (Bytes::from_static(b"xyz"), Bytes::new())
    );
    // The announcement mark sorts after the one-time keys of its device.
    assert!(one_time_key(1, U, 3, u32::MAX) < announce_key(1, U, 3));
    assert!(announce_key(1, U, 3) < device_key(1, U, 4));
    assert_eq!(
        one_time_id(&one_time_key(7, U, 3, 0xdead_beef)),
        Some(0xdead_beef)
    );
    assert_eq!(one_time_id(&device_key(7, U, 3)), Some(0));
    assert_eq!(one_time_id(b"short"), None);
    // Device record keys sort before the device's one-time keys, and devices do not mix.
    assert!(device_key(1, U, 3) < one_time_key(1, U, 3, 0));
    assert!(one_time_key(1, U, 3, u32::MAX) < device_key(1, U, 4));
}

#[test]
fn corrupt_values_are_errors_never_panics() {
    let dev = encode_device(&DeviceKeys {
        identity_key: ik(1),
        signed_prekey: Some(spk(1, 3)),
    });
    for n in 0..dev.len() {
        assert!(decode_device(&dev[..n]).is_err(), "truncated at {n}");
    }
    let mut longer = dev.clone();
    longer.push(0);
    assert!(decode_device(&longer).is_err());
    let mut bad_version = dev.clone();
    bad_version[0] = 2;
    assert!(decode_device(&bad_version).is_err());
    let mut bad_flag = encode_device(&DeviceKeys {
        identity_key: ik(1),
        signed_prekey: None,
    });
    let last = bad_flag.len() - 1;
    bad_flag[last] = 2;
    assert!(decode_device(&bad_flag).is_err());
    assert!(
        decode_device(&[RECORD_VERSION, 0, 0]).is_err(),
        "empty identity key"
    );
    assert!(
        decode_device(&[RECORD_VERSION, 65]).is_err(),
        "over-long identity key"
    );
    let otk = encode_one_time(&otks(1, 0..1)[0]);
    for n in 0..otk.len() {
        assert!(decode_one_time(&otk[..n]).is_err());
    }
    crate::test_bytes::for_each_input(0x9e37_79b9_7f4a_7c15, 200, 20, |buf| {
        let _ = decode_device(buf);
        let _ = decode_one_time(buf);
    });
}

#[test]
fn error_codes_are_stable() {
    assert_eq!(KeysError::NotFound.code(), ErrorCode::NotFound);
    assert_eq!(
        KeysError::BadSignature {
            what: "one-time prekey",
            id: 1,
            why: "is missing"
        }
        .code(),
        ErrorCode::BadSignature
    );
    assert_eq!(
        KeysError::KeyLength {
            what: "identity key",
            len: 33,
            expected: 64
        }
        .code(),
        ErrorCode::Malformed
    );
    assert_eq!(
        KeysError::TooManyInUpload(101).code(),
        ErrorCode::LimitExceeded
    );
    assert_eq!(
        KeysError::Storage(StorageError::Io("x".into())).code(),
        ErrorCode::StorageUnavailable
    );
}
