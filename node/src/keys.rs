//! The prekeys shard service: each device's identity key, signed prekey and one-time prekeys,
//! handed out to senders that start a session (X3DH-style).
//!
//! Storage, prekeys family, key `shard | user:u64 | device:u32 | kind:u8 | id:u32` (big-endian):
//! - kind [`KIND_DEVICE`], id 0 → the device record: identity key and signed prekey
//!   (`ver ik_len:u8 ik has_spk:u8 [spk_id:u32 key_len:u8 key sig_len:u8 sig]`);
//! - kind [`KIND_ONE_TIME`], id → one one-time prekey (`ver key_len:u8 key`), so a claim pops
//!   the lowest id with one bounded scan.
//!
//! Concurrency: a claim is a read (first one-time key) followed by a delete, and the engine has
//! no compare-and-delete, so two concurrent claims could otherwise hand out the same key. Every
//! read-modify-write of a user's keys therefore runs under one of [`KEY_LOCK_STRIPES`] mutexes
//! chosen by the user id. A process-local lock is enough because only the shard's owner node
//! writes the shard (fencing by epoch) and only this service writes the family; striping (rather
//! than one mutex for the service) lets claims for different users, each holding its lock across
//! one synced write, proceed in parallel so their WAL syncs can be grouped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use ringpost_wire::limits::{
    DEVICES_PER_USER_MAX, KEY_BYTES_MAX, PREKEYS_PER_UPLOAD_MAX, SIGNATURE_BYTES_MAX,
};
use ringpost_wire::{DeviceBundle, DeviceId, ErrorCode, OneTimePrekey, SignedPrekey, UserId};

use crate::shard::{shard_of, ShardId};
use crate::storage::{key, prefix_end, Cf, Engine, StorageError, WriteBatch};

/// One-time prekeys stored per device. Worst case per device: 1000 × (19-byte key + 66-byte
/// value + engine overhead) ≈ 100 KiB, so about 0.5 MiB for a user with five devices.
pub const ONE_TIME_PREKEYS_PER_DEVICE_MAX: usize = 1000;
/// Mutexes serialising read-modify-writes of one user's keys.
pub const KEY_LOCK_STRIPES: usize = 64;

/// Key kind of the device record (identity key and signed prekey).
pub const KIND_DEVICE: u8 = 0;
/// Key kind of a one-time prekey.
pub const KIND_ONE_TIME: u8 = 1;

const RECORD_VERSION: u8 = 1;

/// Why a prekeys operation failed; [`KeysError::code`] is its stable wire code. Nothing was
/// stored by a failed call.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// A key or signature is empty or longer than its bound.
    #[error("{what} must be 1..={max_bytes} bytes, got {len}")]
    KeySize {
        what: &'static str,
        len: usize,
        max_bytes: usize,
    },
    /// More one-time prekeys in one upload than [`PREKEYS_PER_UPLOAD_MAX`].
    #[error("{0} one-time prekeys in one upload (max {PREKEYS_PER_UPLOAD_MAX})")]
    TooManyInUpload(usize),
    /// The upload would leave the device above [`ONE_TIME_PREKEYS_PER_DEVICE_MAX`].
    #[error(
        "device would hold {would_hold} one-time prekeys (max {ONE_TIME_PREKEYS_PER_DEVICE_MAX})"
    )]
    PrekeyCap { would_hold: usize },
    /// More devices listed than a user can have.
    #[error("{0} devices listed (max {DEVICES_PER_USER_MAX})")]
    TooManyDevices(usize),
    /// The device is not one of the user's, or no listed device has published keys.
    #[error("no prekeys for this device")]
    NotFound,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl KeysError {
    pub fn code(&self) -> ErrorCode {
        match self {
            KeysError::KeySize { .. }
            | KeysError::TooManyInUpload(_)
            | KeysError::PrekeyCap { .. }
            | KeysError::TooManyDevices(_) => ErrorCode::LimitExceeded,
            KeysError::NotFound => ErrorCode::NotFound,
            KeysError::Storage(StorageError::Corrupt { .. }) => ErrorCode::Internal,
            KeysError::Storage(_) => ErrorCode::StorageUnavailable,
        }
    }
}

/// A device's published long-term keys.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DeviceKeys {
    identity_key: Bytes,
    signed_prekey: Option<SignedPrekey>,
}

/// The prekeys service of one node. See the module documentation.
pub struct Keys {
    engine: Arc<dyn Engine>,
    shard_count: u16,
    stripes: Box<[Mutex<()>]>,
}

impl Keys {
    pub fn new(engine: Arc<dyn Engine>, shard_count: u16) -> Keys {
        let stripes = (0..KEY_LOCK_STRIPES).map(|_| Mutex::new(())).collect();
        Keys {
            engine,
            shard_count,
            stripes,
        }
    }

    /// Publishes `device`'s identity key, replaces its signed prekey (if given) and adds
    /// `one_time` prekeys (an id already stored is replaced; within one upload the last of a
    /// repeated id wins). All or nothing: an upload that would exceed
    /// [`ONE_TIME_PREKEYS_PER_DEVICE_MAX`] stores nothing. A changed identity key means a new
    /// key set: the old signed prekey and one-time prekeys are dropped. Returns the number of
    /// one-time prekeys the device now has.
    pub fn upload(
        &self,
        user: UserId,
        device: DeviceId,
        identity_key: &[u8],
        signed_prekey: Option<&SignedPrekey>,
        one_time: &[OneTimePrekey],
    ) -> Result<u32, KeysError> {
        check_size("identity key", identity_key, KEY_BYTES_MAX)?;
        if let Some(spk) = signed_prekey {
            check_size("signed prekey", &spk.key, KEY_BYTES_MAX)?;
            check_size(
                "signed prekey signature",
                &spk.signature,
                SIGNATURE_BYTES_MAX,
            )?;
        }
        if one_time.len() > PREKEYS_PER_UPLOAD_MAX {
            return Err(KeysError::TooManyInUpload(one_time.len()));
        }
        let mut uploaded: BTreeMap<u32, &Bytes> = BTreeMap::new();
        for k in one_time {
            check_size("one-time prekey", &k.key, KEY_BYTES_MAX)?;
            uploaded.insert(k.id, &k.key);
        }

        let _guard = self.lock(user);
        let shard = self.shard(user);
        let existing = self.load_device(shard, user, device)?;
        let identity_changed = existing
            .as_ref()
            .is_some_and(|e| e.identity_key.as_ref() != identity_key);
        let mut batch = WriteBatch::new();
        let one_time_prefix = one_time_prefix(shard, user, device);
        let stored_ids = if identity_changed {
            batch.delete_range(
                Cf::Prekeys,
                one_time_prefix.clone(),
                prefix_end(&one_time_prefix),
            );
            BTreeSet::new()
        } else {
            self.one_time_ids(&one_time_prefix)?
        };
        let added = uploaded
            .keys()
            .filter(|id| !stored_ids.contains(id))
            .count();
        let would_hold = stored_ids.len() + added;
        if would_hold > ONE_TIME_PREKEYS_PER_DEVICE_MAX {
            return Err(KeysError::PrekeyCap { would_hold });
        }
        let signed_prekey = match (signed_prekey, existing) {
            (Some(new), _) => Some(new.clone()),
            (None, Some(old)) if !identity_changed => old.signed_prekey,
            // The old signed prekey was signed by the replaced identity key.
            (None, _) => None,
        };
        let record = DeviceKeys {
            identity_key: Bytes::copy_from_slice(identity_key),
            signed_prekey,
        };
        batch.put(
            Cf::Prekeys,
            device_key(shard, user, device),
            encode_device(&record),
        );
        for (id, k) in uploaded {
            batch.put(
                Cf::Prekeys,
                one_time_key(shard, user, device, id),
                encode_one_time(k),
            );
        }
        self.engine.write(batch, true)?;
        // At most ONE_TIME_PREKEYS_PER_DEVICE_MAX, checked above.
        Ok(u32::try_from(would_hold).unwrap_or(u32::MAX))
    }

    /// Hands out a bundle for `device` (or, with `None`, for every device in
    /// `devices_of_user`, the user's current device list from the accounts service): identity
    /// key, signed prekey, and one one-time prekey popped from the device's store, or none
    /// when it ran out. Devices that never published keys are left out; `NotFound` when that
    /// leaves nothing, or when `device` is not in `devices_of_user`. No two claims ever get the
    /// same one-time prekey (see the module documentation); the pops are one synced write.
    pub fn claim(
        &self,
        user: UserId,
        device: Option<DeviceId>,
        devices_of_user: &[DeviceId],
    ) -> Result<Vec<DeviceBundle>, KeysError> {
        if devices_of_user.len() > DEVICES_PER_USER_MAX {
            return Err(KeysError::TooManyDevices(devices_of_user.len()));
        }
        let targets: BTreeSet<DeviceId> = match device {
            Some(d) if devices_of_user.contains(&d) => BTreeSet::from([d]),
            Some(_) => return Err(KeysError::NotFound),
            None => devices_of_user.iter().copied().collect(),
        };
        let _guard = self.lock(user);
        let shard = self.shard(user);
        let mut bundles = Vec::with_capacity(targets.len());
        let mut batch = WriteBatch::new();
        for d in targets {
            let Some(keys) = self.load_device(shard, user, d)? else {
                continue;
            };
            let prefix = one_time_prefix(shard, user, d);
            let first = self
                .engine
                .scan(Cf::Prekeys, &prefix, &prefix_end(&prefix), 1)?;
            let one_time = match first.into_iter().next() {
                Some((k, v)) => {
                    let id = one_time_id(&k).ok_or_else(|| corrupt("one-time prekey key"))?;
                    let key = decode_one_time(&v)?;
                    batch.delete(Cf::Prekeys, k);
                    Some(OneTimePrekey {
                        id,
                        key,
                        signature: Bytes::new(),
                    })
                }
                None => None,
            };
            bundles.push(DeviceBundle {
                device: d,
                identity_key: keys.identity_key,
                signed_prekey: keys.signed_prekey,
                one_time,
            });
        }
        if bundles.is_empty() {
            return Err(KeysError::NotFound);
        }
        if !batch.is_empty() {
            self.engine.write(batch, true)?;
        }
        Ok(bundles)
    }

    /// One-time prekeys `device` has left. One bounded scan (at most
    /// [`ONE_TIME_PREKEYS_PER_DEVICE_MAX`] records).
    pub fn count(&self, user: UserId, device: DeviceId) -> Result<u32, KeysError> {
        let prefix = one_time_prefix(self.shard(user), user, device);
        let n = self.one_time_ids(&prefix)?.len();
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Deletes every key of `device` (when it is removed or replaced by re-registration).
    pub fn drop_device(&self, user: UserId, device: DeviceId) -> Result<(), KeysError> {
        let _guard = self.lock(user);
        let prefix = device_prefix(self.shard(user), user, device);
        let mut batch = WriteBatch::new();
        batch.delete_range(Cf::Prekeys, prefix.clone(), prefix_end(&prefix));
        self.engine.write(batch, true)?;
        Ok(())
    }

    fn shard(&self, user: UserId) -> ShardId {
        shard_of(user, self.shard_count)
    }

    fn lock(&self, user: UserId) -> MutexGuard<'_, ()> {
        let i = (user.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize % self.stripes.len();
        // The mutex guards no data, only ordering: a poisoned one is still usable.
        self.stripes[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn load_device(
        &self,
        shard: ShardId,
        user: UserId,
        device: DeviceId,
    ) -> Result<Option<DeviceKeys>, KeysError> {
        match self
            .engine
            .get(Cf::Prekeys, &device_key(shard, user, device))?
        {
            Some(v) => Ok(Some(decode_device(&v)?)),
            None => Ok(None),
        }
    }

    /// The ids of every one-time prekey under `prefix` (bounded by the per-device cap; one
    /// extra row is read so that a store somehow above the cap is still seen as above it).
    fn one_time_ids(&self, prefix: &[u8]) -> Result<BTreeSet<u32>, KeysError> {
        let rows = self.engine.scan(
            Cf::Prekeys,
            prefix,
            &prefix_end(prefix),
            ONE_TIME_PREKEYS_PER_DEVICE_MAX + 1,
        )?;
        Ok(rows.iter().filter_map(|(k, _)| one_time_id(k)).collect())
    }
}

fn check_size(what: &'static str, bytes: &[u8], max_bytes: usize) -> Result<(), KeysError> {
    if bytes.is_empty() || bytes.len() > max_bytes {
        Err(KeysError::KeySize {
            what,
            len: bytes.len(),
            max_bytes,
        })
    } else {
        Ok(())
    }
}

fn device_prefix(shard: ShardId, user: UserId, device: DeviceId) -> Vec<u8> {
    key(shard, &[&user.to_be_bytes(), &device.to_be_bytes()])
}

fn device_key(shard: ShardId, user: UserId, device: DeviceId) -> Vec<u8> {
    key(
        shard,
        &[
            &user.to_be_bytes(),
            &device.to_be_bytes(),
            &[KIND_DEVICE],
            &0u32.to_be_bytes(),
        ],
    )
}

fn one_time_prefix(shard: ShardId, user: UserId, device: DeviceId) -> Vec<u8> {
    key(
        shard,
        &[&user.to_be_bytes(), &device.to_be_bytes(), &[KIND_ONE_TIME]],
    )
}

fn one_time_key(shard: ShardId, user: UserId, device: DeviceId, id: u32) -> Vec<u8> {
    key(
        shard,
        &[
            &user.to_be_bytes(),
            &device.to_be_bytes(),
            &[KIND_ONE_TIME],
            &id.to_be_bytes(),
        ],
    )
}

/// The id of a one-time prekey key (its last four bytes), if the key has the right length.
fn one_time_id(k: &[u8]) -> Option<u32> {
    const LEN: usize = 2 + 8 + 4 + 1 + 4;
    if k.len() != LEN {
        return None;
    }
    k[LEN - 4..].try_into().ok().map(u32::from_be_bytes)
}

fn corrupt(detail: &str) -> StorageError {
    StorageError::Corrupt {
        cf: Cf::Prekeys.name(),
        detail: detail.to_owned(),
    }
}

fn push_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Callers checked the bounds (all below 256).
    out.push(u8::try_from(b.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(b);
}

fn encode_device(rec: &DeviceKeys) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + KEY_BYTES_MAX * 2 + SIGNATURE_BYTES_MAX + 8);
    out.push(RECORD_VERSION);
    push_bytes(&mut out, &rec.identity_key);
    match &rec.signed_prekey {
        None => out.push(0),
        Some(spk) => {
            out.push(1);
            out.extend_from_slice(&spk.id.to_be_bytes());
            push_bytes(&mut out, &spk.key);
            push_bytes(&mut out, &spk.signature);
        }
    }
    out
}

fn encode_one_time(k: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + k.len());
    out.push(RECORD_VERSION);
    push_bytes(&mut out, k);
    out
}

/// A bounds-checked cursor over a stored value; every failure is `Corrupt`.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StorageError> {
        if self.0.len() < n {
            return Err(corrupt("truncated record"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, StorageError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, StorageError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length-prefixed field of 1..=`max` bytes.
    fn field(&mut self, max: usize) -> Result<Bytes, StorageError> {
        let len = usize::from(self.u8()?);
        if len == 0 || len > max {
            return Err(corrupt("field length out of bounds"));
        }
        Ok(Bytes::copy_from_slice(self.take(len)?))
    }

    fn version(&mut self) -> Result<(), StorageError> {
        match self.u8()? {
            RECORD_VERSION => Ok(()),
            _ => Err(corrupt("unknown record version")),
        }
    }

    fn finish(&self) -> Result<(), StorageError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(corrupt("trailing bytes"))
        }
    }
}

fn decode_device(v: &[u8]) -> Result<DeviceKeys, StorageError> {
    let mut r = Reader(v);
    r.version()?;
    let identity_key = r.field(KEY_BYTES_MAX)?;
    let signed_prekey = match r.u8()? {
        0 => None,
        1 => Some(SignedPrekey {
            id: r.u32()?,
            key: r.field(KEY_BYTES_MAX)?,
            signature: r.field(SIGNATURE_BYTES_MAX)?,
        }),
        _ => return Err(corrupt("signed prekey flag")),
    };
    r.finish()?;
    Ok(DeviceKeys {
        identity_key,
        signed_prekey,
    })
}

fn decode_one_time(v: &[u8]) -> Result<Bytes, StorageError> {
    let mut r = Reader(v);
    r.version()?;
    let k = r.field(KEY_BYTES_MAX)?;
    r.finish()?;
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::suite::{mem_fixture, rocks_fixture, Fixture};

    const U: UserId = 15_551_234_567;

    fn ik(n: u8) -> Vec<u8> {
        vec![n; 33]
    }

    fn spk(id: u32) -> SignedPrekey {
        SignedPrekey {
            id,
            key: Bytes::from(vec![id as u8; 33]),
            signature: Bytes::from(vec![7; 64]),
        }
    }

    fn otks(ids: std::ops::Range<u32>) -> Vec<OneTimePrekey> {
        ids.map(|id| OneTimePrekey {
            id,
            key: Bytes::from(id.to_be_bytes().repeat(8)),
            signature: Bytes::new(),
        })
        .collect()
    }

    fn service(f: &Fixture) -> Keys {
        Keys::new(f.0.clone(), 64)
    }

    fn upload_and_claim(f: Fixture) {
        let keys = service(&f);
        assert_eq!(
            keys.upload(U, 1, &ik(1), Some(&spk(9)), &otks(10..13))
                .unwrap(),
            3
        );
        assert_eq!(keys.count(U, 1).unwrap(), 3);
        let b = keys.claim(U, None, &[1]).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].device, 1);
        assert_eq!(b[0].identity_key.as_ref(), &ik(1)[..]);
        assert_eq!(b[0].signed_prekey, Some(spk(9)));
        // The lowest id goes first, with its key.
        assert_eq!(b[0].one_time, Some(otks(10..11).remove(0)));
        assert_eq!(keys.count(U, 1).unwrap(), 2);
    }

    fn claims_exhaust_one_time_keys_but_keep_identity(f: Fixture) {
        let keys = service(&f);
        keys.upload(U, 1, &ik(1), Some(&spk(1)), &otks(0..2))
            .unwrap();
        let ids: Vec<_> = (0..4)
            .map(|_| keys.claim(U, Some(1), &[1]).unwrap().remove(0))
            .map(|b| {
                assert_eq!(b.identity_key.as_ref(), &ik(1)[..]);
                assert_eq!(b.signed_prekey, Some(spk(1)));
                b.one_time.map(|k| k.id)
            })
            .collect();
        assert_eq!(ids, vec![Some(0), Some(1), None, None]);
        assert_eq!(keys.count(U, 1).unwrap(), 0);
    }

    fn claim_covers_listed_devices_only(f: Fixture) {
        let keys = service(&f);
        keys.upload(U, 1, &ik(1), Some(&spk(1)), &otks(0..5))
            .unwrap();
        keys.upload(U, 3, &ik(3), None, &otks(100..105)).unwrap();
        // Device 2 is listed but never published keys: left out.
        let b = keys.claim(U, None, &[1, 2, 3]).unwrap();
        let got: Vec<_> = b
            .iter()
            .map(|b| (b.device, b.one_time.as_ref().map(|k| k.id)))
            .collect();
        assert_eq!(got, vec![(1, Some(0)), (3, Some(100))]);
        assert_eq!(b[1].signed_prekey, None);
        // Device 3 is not in the current list (removed): no bundle, and no key popped.
        let b = keys.claim(U, None, &[1]).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(keys.count(U, 3).unwrap(), 4);
        assert!(matches!(
            keys.claim(U, Some(3), &[1]),
            Err(KeysError::NotFound)
        ));
        assert!(matches!(
            keys.claim(U, Some(2), &[1, 2]),
            Err(KeysError::NotFound)
        ));
        assert!(matches!(
            keys.claim(U, None, &[2]),
            Err(KeysError::NotFound)
        ));
        assert!(matches!(
            keys.claim(U + 1, None, &[1]),
            Err(KeysError::NotFound)
        ));
        assert!(matches!(keys.claim(U, None, &[]), Err(KeysError::NotFound)));
        let err = keys.claim(U, None, &[1, 2, 3, 4, 5, 6]).unwrap_err();
        assert!(matches!(err, KeysError::TooManyDevices(6)));
        assert_eq!(err.code(), ErrorCode::LimitExceeded);
        // Duplicates in the list do not pop twice.
        let before = keys.count(U, 1).unwrap();
        assert_eq!(keys.claim(U, None, &[1, 1]).unwrap().len(), 1);
        assert_eq!(keys.count(U, 1).unwrap(), before - 1);
    }

    fn per_device_cap_is_all_or_nothing(f: Fixture) {
        let keys = service(&f);
        let per = PREKEYS_PER_UPLOAD_MAX as u32;
        let uploads = ONE_TIME_PREKEYS_PER_DEVICE_MAX as u32 / per;
        for i in 0..uploads {
            keys.upload(U, 1, &ik(1), Some(&spk(1)), &otks(i * per..(i + 1) * per))
                .unwrap();
        }
        assert_eq!(
            keys.count(U, 1).unwrap() as usize,
            ONE_TIME_PREKEYS_PER_DEVICE_MAX
        );
        // Re-uploading stored ids replaces them without growing the store.
        let n = keys.upload(U, 1, &ik(1), None, &otks(0..per)).unwrap();
        assert_eq!(n as usize, ONE_TIME_PREKEYS_PER_DEVICE_MAX);
        // One more is refused and nothing of the upload is stored (not even the new spk).
        let err = keys
            .upload(U, 1, &ik(1), Some(&spk(2)), &otks(5000..5001))
            .unwrap_err();
        assert!(
            matches!(err, KeysError::PrekeyCap { would_hold } if would_hold == ONE_TIME_PREKEYS_PER_DEVICE_MAX + 1)
        );
        assert_eq!(err.code(), ErrorCode::LimitExceeded);
        assert_eq!(
            keys.count(U, 1).unwrap() as usize,
            ONE_TIME_PREKEYS_PER_DEVICE_MAX
        );
        assert_eq!(
            keys.claim(U, Some(1), &[1]).unwrap()[0].signed_prekey,
            Some(spk(1))
        );
        // After a claim there is room for exactly one.
        keys.upload(U, 1, &ik(1), None, &otks(5000..5001)).unwrap();
        assert!(keys.upload(U, 1, &ik(1), None, &otks(5001..5002)).is_err());
    }

    fn sizes_are_bounded(f: Fixture) {
        let keys = service(&f);
        let long_key = [1u8; KEY_BYTES_MAX + 1];
        let max_key = vec![1u8; KEY_BYTES_MAX];
        for bad in [&[][..], &long_key[..]] {
            let err = keys.upload(U, 1, bad, None, &[]).unwrap_err();
            assert!(
                matches!(
                    err,
                    KeysError::KeySize {
                        what: "identity key",
                        ..
                    }
                ),
                "{err}"
            );
            assert_eq!(err.code(), ErrorCode::LimitExceeded);
            let s = SignedPrekey {
                id: 1,
                key: Bytes::copy_from_slice(bad),
                signature: Bytes::from_static(b"s"),
            };
            assert!(keys.upload(U, 1, &ik(1), Some(&s), &[]).is_err());
            let o = OneTimePrekey {
                id: 1,
                key: Bytes::copy_from_slice(bad),
                signature: Bytes::new(),
            };
            assert!(keys.upload(U, 1, &ik(1), None, &[o]).is_err());
        }
        let long_sig = SignedPrekey {
            id: 1,
            key: Bytes::from(max_key.clone()),
            signature: Bytes::from(vec![0; SIGNATURE_BYTES_MAX + 1]),
        };
        assert!(keys.upload(U, 1, &ik(1), Some(&long_sig), &[]).is_err());
        let err = keys
            .upload(
                U,
                1,
                &ik(1),
                None,
                &otks(0..PREKEYS_PER_UPLOAD_MAX as u32 + 1),
            )
            .unwrap_err();
        assert!(matches!(err, KeysError::TooManyInUpload(n) if n == PREKEYS_PER_UPLOAD_MAX + 1));
        // Nothing was stored by the refused uploads.
        assert!(matches!(
            keys.claim(U, None, &[1]),
            Err(KeysError::NotFound)
        ));
        // The largest sizes round-trip.
        let max_spk = SignedPrekey {
            id: u32::MAX,
            key: Bytes::from(max_key.clone()),
            signature: Bytes::from(vec![2; SIGNATURE_BYTES_MAX]),
        };
        let o = OneTimePrekey {
            id: u32::MAX,
            key: Bytes::from(max_key.clone()),
            signature: Bytes::new(),
        };
        keys.upload(U, 1, &max_key, Some(&max_spk), std::slice::from_ref(&o))
            .unwrap();
        let b = keys.claim(U, None, &[1]).unwrap().remove(0);
        assert_eq!(b.signed_prekey, Some(max_spk));
        assert_eq!(b.one_time, Some(o));
    }

    fn identity_change_drops_old_key_set(f: Fixture) {
        let keys = service(&f);
        keys.upload(U, 1, &ik(1), Some(&spk(1)), &otks(0..10))
            .unwrap();
        // Same identity, no spk: the spk is kept and keys are added.
        assert_eq!(keys.upload(U, 1, &ik(1), None, &otks(10..12)).unwrap(), 12);
        assert_eq!(
            keys.claim(U, Some(1), &[1]).unwrap()[0].signed_prekey,
            Some(spk(1))
        );
        // New identity: old one-time keys and the old spk are gone.
        assert_eq!(keys.upload(U, 1, &ik(2), None, &otks(50..52)).unwrap(), 2);
        let b = keys.claim(U, Some(1), &[1]).unwrap().remove(0);
        assert_eq!(b.identity_key.as_ref(), &ik(2)[..]);
        assert_eq!(b.signed_prekey, None);
        assert_eq!(b.one_time.map(|k| k.id), Some(50));
        // Repeated ids within one upload: the last one wins, counted once.
        let dup = vec![
            OneTimePrekey {
                id: 60,
                key: Bytes::from_static(b"first"),
                signature: Bytes::new(),
            },
            OneTimePrekey {
                id: 60,
                key: Bytes::from_static(b"second"),
                signature: Bytes::new(),
            },
        ];
        assert_eq!(keys.upload(U, 1, &ik(2), None, &dup).unwrap(), 2);
        let b = keys.claim(U, Some(1), &[1]).unwrap().remove(0);
        assert_eq!(b.one_time.map(|k| k.id), Some(51));
        let b = keys.claim(U, Some(1), &[1]).unwrap().remove(0);
        assert_eq!(b.one_time.unwrap().key.as_ref(), b"second");
    }

    fn drop_device_is_scoped(f: Fixture) {
        let keys = service(&f);
        keys.upload(U, 1, &ik(1), Some(&spk(1)), &otks(0..3))
            .unwrap();
        keys.upload(U, 2, &ik(2), Some(&spk(2)), &otks(0..3))
            .unwrap();
        keys.upload(U + 1, 2, &ik(3), None, &otks(0..3)).unwrap();
        keys.drop_device(U, 2).unwrap();
        assert_eq!(keys.count(U, 2).unwrap(), 0);
        assert!(matches!(
            keys.claim(U, Some(2), &[1, 2]),
            Err(KeysError::NotFound)
        ));
        assert_eq!(keys.count(U, 1).unwrap(), 3);
        assert_eq!(keys.count(U + 1, 2).unwrap(), 3);
        keys.drop_device(U, 9).unwrap();
    }

    fn concurrent_claims_never_share_a_key(f: Fixture) {
        let keys = service(&f);
        let per = PREKEYS_PER_UPLOAD_MAX as u32;
        keys.upload(U, 1, &ik(1), None, &otks(0..per)).unwrap();
        keys.upload(U, 2, &ik(2), None, &otks(0..per)).unwrap();
        let threads = 8;
        let claims_per_thread = 30; // 240 claims for 200 keys: the store runs out.
        let claimed: Vec<(DeviceId, Option<u32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut got = Vec::new();
                        for _ in 0..claims_per_thread {
                            for b in keys.claim(U, None, &[1, 2]).unwrap() {
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
        keys.upload(U, 1, &ik(1), None, &otks(0..1)).unwrap();
        let shard = keys.shard(U);
        let mut b = WriteBatch::new();
        b.put(
            Cf::Prekeys,
            device_key(shard, U, 1),
            vec![RECORD_VERSION, 40],
        );
        f.0.write(b, true).unwrap();
        let err = keys.claim(U, None, &[1]).unwrap_err();
        assert!(
            matches!(err, KeysError::Storage(StorageError::Corrupt { .. })),
            "{err}"
        );
        assert_eq!(err.code(), ErrorCode::Internal);
        // A corrupt one-time key fails the claim without popping anything.
        keys.upload(U, 2, &ik(2), None, &otks(0..1)).unwrap();
        let mut b = WriteBatch::new();
        b.put(Cf::Prekeys, one_time_key(shard, U, 2, 0), vec![9]);
        f.0.write(b, true).unwrap();
        assert!(keys.claim(U, Some(2), &[2]).is_err());
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
                claims_exhaust_one_time_keys_but_keep_identity,
                claim_covers_listed_devices_only,
                per_device_cap_is_all_or_nothing,
                sizes_are_bounded,
                identity_change_drops_old_key_set,
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
            identity_key: Bytes::from(ik(1)),
            signed_prekey: Some(spk(3)),
        };
        assert_eq!(decode_device(&encode_device(&rec)).unwrap(), rec);
        let bare = DeviceKeys {
            identity_key: Bytes::from_static(b"k"),
            signed_prekey: None,
        };
        assert_eq!(decode_device(&encode_device(&bare)).unwrap(), bare);
        assert_eq!(
            decode_one_time(&encode_one_time(b"xyz")).unwrap().as_ref(),
            b"xyz"
        );
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
            identity_key: Bytes::from(ik(1)),
            signed_prekey: Some(spk(3)),
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
            identity_key: Bytes::from(ik(1)),
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
        let otk = encode_one_time(b"abc");
        for n in 0..otk.len() {
            assert!(decode_one_time(&otk[..n]).is_err());
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..200 {
            for _ in 0..20 {
                let buf: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let _ = decode_device(&buf);
                let _ = decode_one_time(&buf);
            }
        }
    }

    #[test]
    fn error_codes_are_stable() {
        assert_eq!(KeysError::NotFound.code(), ErrorCode::NotFound);
        assert_eq!(
            KeysError::TooManyInUpload(101).code(),
            ErrorCode::LimitExceeded
        );
        assert_eq!(
            KeysError::Storage(StorageError::Io("x".into())).code(),
            ErrorCode::StorageUnavailable
        );
    }
}
