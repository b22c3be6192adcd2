//! The prekeys shard service: each device's identity key, signed prekey and one-time prekeys,
//! handed out to senders that start a session (X3DH-style).
//!
//! Uploads are verified before anything is stored ([`verify`]): the identity key is the
//! device's Ed25519 signing key and Curve25519 identity key, and the signed prekey and every
//! one-time prekey carry the identity key's signature in the format of
//! [`ringpost_wire::prekeys`]. [`serve`] executes the client requests (uploads, claims and
//! counts) against this service, sends the low-key event and announces identity changes.
//!
//! Storage, prekeys family, key `shard | user:u64 | device:u32 | kind:u8 | id:u32` (big-endian):
//! - kind [`KIND_DEVICE`], id 0 → the device record: identity key and signed prekey
//!   (`ver ik_len:u8 ik has_spk:u8 [spk_id:u32 key_len:u8 key sig_len:u8 sig]`);
//! - kind [`KIND_ONE_TIME`], id → one one-time prekey (`2 key_len:u8 key sig_len:u8 sig`; the
//!   version-1 form, without a signature, is still read), so a claim pops the lowest id with
//!   one bounded scan;
//! - kind [`KIND_ANNOUNCE`], id 0 → the identity key whose change is still to be announced to
//!   the user's contacts: written in the upload's batch, deleted once every contact has it, so
//!   a crash in between announces it again with the device's next upload.
//!
//! Concurrency: a claim is a read (first one-time key) followed by a delete, and the engine has
//! no compare-and-delete, so two concurrent claims could otherwise hand out the same key. Every
//! read-modify-write of a user's keys therefore runs under one of [`KEY_LOCK_STRIPES`] mutexes
//! chosen by the user id. A process-local lock is enough because only the shard's owner node
//! writes the shard (fencing by epoch) and only this service writes the family; striping (rather
//! than one mutex for the service) lets claims for different users, each holding its lock across
//! one synced write, proceed in parallel so their WAL syncs can be grouped.
//!
//! Once ever, across failover: a claim's pops are one synced write through the node's engine,
//! which on a replicating node is the [`ReplicatingEngine`](crate::replication::ReplicatingEngine):
//! its `write` returns only once the shard's in-sync replicas applied the record durably, and
//! fails ([`StorageError::Replication`]) otherwise. The claim answers its keys only after that
//! write succeeded, and a failed claim answers no key, so every key a client ever saw is gone
//! from every copy that can be promoted. The stripe lock is held across the write, so no other
//! claim reads the popped key in between (a failed write leaves it deleted locally: never
//! handed out, which is safe).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use ringpost_wire::limits::{
    DEVICES_PER_USER_MAX, KEY_BYTES_MAX, PREKEYS_PER_UPLOAD_MAX, PREKEY_LOW_WATERMARK,
    SIGNATURE_BYTES_MAX,
};
use ringpost_wire::{
    DeviceBundle, DeviceId, ErrorCode, OneTimePrekey, PrekeyUpload, SignedPrekey, UserId,
};

use crate::shard::{shard_of, ShardId};
use crate::storage::{key, prefix_end, Cf, Engine, StorageError, WriteBatch};

pub mod serve;
pub mod verify;

/// One-time prekeys stored per device. Worst case per device: 1000 × (19-byte key + 100-byte
/// value + engine overhead) ≈ 150 KiB, so about 0.75 MiB for a user with five devices.
pub const ONE_TIME_PREKEYS_PER_DEVICE_MAX: usize = 1000;
/// Mutexes serialising read-modify-writes of one user's keys.
pub const KEY_LOCK_STRIPES: usize = 64;

/// Key kind of the device record (identity key and signed prekey).
pub const KIND_DEVICE: u8 = 0;
/// Key kind of a one-time prekey.
pub const KIND_ONE_TIME: u8 = 1;
/// Key kind of a pending identity-change announcement.
pub const KIND_ANNOUNCE: u8 = 2;

const RECORD_VERSION: u8 = 1;
/// One-time prekey records with a signature.
const ONE_TIME_VERSION: u8 = 2;

/// Why a prekeys operation failed; [`KeysError::code`] is its stable wire code. Nothing was
/// stored by a failed call.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// A key of an upload is not of its format's length ([`ringpost_wire::prekeys`]).
    #[error("{what} must be {expected} bytes, got {len}")]
    KeyLength {
        what: &'static str,
        len: usize,
        expected: usize,
    },
    /// A signature of an upload is missing or does not verify with the identity signing key.
    #[error("the signature of {what} {id} {why}")]
    BadSignature {
        what: &'static str,
        id: u32,
        why: &'static str,
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
            KeysError::TooManyInUpload(_)
            | KeysError::PrekeyCap { .. }
            | KeysError::TooManyDevices(_) => ErrorCode::LimitExceeded,
            // A fixed length, like a token's.
            KeysError::KeyLength { .. } => ErrorCode::Malformed,
            KeysError::BadSignature { .. } => ErrorCode::BadSignature,
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

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uploaded {
    /// One-time prekeys the device now has.
    pub count: u32,
    /// The identity key is new for the device (its first upload, or a changed key), or an
    /// earlier announcement of it is still pending: announce it to the user's contacts, then
    /// call [`Keys::announced`].
    pub announce: bool,
}

/// What a claim handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub bundles: Vec<DeviceBundle>,
    /// Devices this claim took from [`PREKEY_LOW_WATERMARK`] one-time prekeys to fewer, with
    /// how many they have left: each crossing is reported by exactly one claim.
    pub low: Vec<(DeviceId, u32)>,
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

    /// Publishes `device`'s identity key, replaces its signed prekey (if given) and adds the
    /// one-time prekeys (an id already stored is replaced; within one upload the last of a
    /// repeated id wins). Every key's length and signature are verified first ([`verify`]).
    /// All or nothing: a bad key or signature, or an upload that would exceed
    /// [`ONE_TIME_PREKEYS_PER_DEVICE_MAX`], stores nothing. A changed identity key means a new
    /// key set: the old signed prekey and one-time prekeys are dropped. A new identity key
    /// (or one whose announcement is still pending) is marked for announcement in the same
    /// batch; see [`Uploaded::announce`].
    pub fn upload(
        &self,
        user: UserId,
        device: DeviceId,
        upload: &PrekeyUpload,
    ) -> Result<Uploaded, KeysError> {
        let identity_key = upload.identity_key.as_ref();
        let one_time = &upload.one_time;
        if one_time.len() > PREKEYS_PER_UPLOAD_MAX {
            return Err(KeysError::TooManyInUpload(one_time.len()));
        }
        verify::upload(upload)?;
        let mut uploaded: BTreeMap<u32, &OneTimePrekey> = BTreeMap::new();
        for k in one_time {
            uploaded.insert(k.id, k);
        }

        let _guard = self.lock(user);
        let shard = self.shard(user);
        let existing = self.load_device(shard, user, device)?;
        let identity_changed = existing
            .as_ref()
            .is_some_and(|e| e.identity_key.as_ref() != identity_key);
        let pending = self
            .engine
            .get(Cf::Prekeys, &announce_key(shard, user, device))?
            .is_some_and(|v| v == identity_key);
        let announce = existing.is_none() || identity_changed || pending;
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
        let signed_prekey = match (upload.signed_prekey.as_ref(), existing) {
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
        if announce {
            batch.put(
                Cf::Prekeys,
                announce_key(shard, user, device),
                identity_key.to_vec(),
            );
        }
        for (id, k) in uploaded {
            batch.put(
                Cf::Prekeys,
                one_time_key(shard, user, device, id),
                encode_one_time(k),
            );
        }
        self.engine.write(batch, true)?;
        Ok(Uploaded {
            // At most ONE_TIME_PREKEYS_PER_DEVICE_MAX, checked above.
            count: u32::try_from(would_hold).unwrap_or(u32::MAX),
            announce,
        })
    }

    /// Clears the pending announcement of `identity_key` for `device` once every contact has
    /// it (a newer pending key, or none, is left alone). Unsynced: a lost clear only
    /// announces the key again, and contacts store a repeat once.
    pub fn announced(
        &self,
        user: UserId,
        device: DeviceId,
        identity_key: &[u8],
    ) -> Result<(), KeysError> {
        let _guard = self.lock(user);
        let k = announce_key(self.shard(user), user, device);
        if self
            .engine
            .get(Cf::Prekeys, &k)?
            .is_some_and(|v| v == identity_key)
        {
            let mut batch = WriteBatch::new();
            batch.delete(Cf::Prekeys, k);
            self.engine.write(batch, false)?;
        }
        Ok(())
    }

    /// Hands out a bundle for `device` (or, with `None`, for every device in
    /// `devices_of_user`, the user's current device list from the accounts service): identity
    /// key, signed prekey, and, if `hand_one_time`, one one-time prekey popped from the
    /// device's store, or none when it ran out (without `hand_one_time` none is popped: the
    /// fallback alone). Devices that never published keys are left out; `NotFound` when that
    /// leaves nothing, or when `device` is not in `devices_of_user`. No two claims ever get the
    /// same one-time prekey (see the module documentation); the pops are one synced write, and
    /// the bundles are returned only once it succeeded.
    pub fn claim(
        &self,
        user: UserId,
        device: Option<DeviceId>,
        devices_of_user: &[DeviceId],
        hand_one_time: bool,
    ) -> Result<Claimed, KeysError> {
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
        let mut low = Vec::new();
        let mut batch = WriteBatch::new();
        // Enough rows to see whether this pop crosses the watermark.
        let watermark = PREKEY_LOW_WATERMARK as usize;
        for d in targets {
            let Some(keys) = self.load_device(shard, user, d)? else {
                continue;
            };
            let one_time = if hand_one_time {
                let prefix = one_time_prefix(shard, user, d);
                let rows =
                    self.engine
                        .scan(Cf::Prekeys, &prefix, &prefix_end(&prefix), watermark + 1)?;
                match rows.first() {
                    Some((k, v)) => {
                        let id = one_time_id(k).ok_or_else(|| corrupt("one-time prekey key"))?;
                        let (key, signature) = decode_one_time(v)?;
                        if rows.len() == watermark && watermark > 0 {
                            low.push((d, PREKEY_LOW_WATERMARK - 1));
                        }
                        batch.delete(Cf::Prekeys, k.clone());
                        Some(OneTimePrekey { id, key, signature })
                    }
                    None => None,
                }
            } else {
                None
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
        Ok(Claimed { bundles, low })
    }

    /// One-time prekeys `device` has left. One bounded scan (at most
    /// [`ONE_TIME_PREKEYS_PER_DEVICE_MAX`] records).
    pub fn count(&self, user: UserId, device: DeviceId) -> Result<u32, KeysError> {
        let prefix = one_time_prefix(self.shard(user), user, device);
        let n = self.one_time_ids(&prefix)?.len();
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Deletes every key of `device` (when it is removed or replaced by re-registration),
    /// and a pending announcement of its identity key.
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

fn announce_key(shard: ShardId, user: UserId, device: DeviceId) -> Vec<u8> {
    key(
        shard,
        &[
            &user.to_be_bytes(),
            &device.to_be_bytes(),
            &[KIND_ANNOUNCE],
            &0u32.to_be_bytes(),
        ],
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

fn encode_one_time(k: &OneTimePrekey) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + k.key.len() + k.signature.len());
    out.push(ONE_TIME_VERSION);
    push_bytes(&mut out, &k.key);
    push_bytes(&mut out, &k.signature);
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

/// A one-time prekey record: the key and its signature (empty in a version-1 record, written
/// before uploads were signed).
fn decode_one_time(v: &[u8]) -> Result<(Bytes, Bytes), StorageError> {
    let mut r = Reader(v);
    let signed = match r.u8()? {
        RECORD_VERSION => false,
        ONE_TIME_VERSION => true,
        _ => return Err(corrupt("unknown record version")),
    };
    let k = r.field(KEY_BYTES_MAX)?;
    let signature = if signed {
        r.field(SIGNATURE_BYTES_MAX)?
    } else {
        Bytes::new()
    };
    r.finish()?;
    Ok((k, signature))
}

#[cfg(test)]
mod tests;
