//! Key layouts of the inbox's three column families. Every key starts with the recipient's
//! shard (big-endian `u16`), then big-endian ids, so the byte order is the numeric order:
//!
//! - [`Cf::Inbox`](crate::storage::Cf::Inbox): `shard | user u64 | device u32 | seq u64`, so a
//!   device's drain is one prefix scan in seq order.
//! - [`Cf::InboxMeta`](crate::storage::Cf::InboxMeta): `shard | user | device` (the same bytes
//!   as the inbox prefix of that device).
//! - [`Cf::Dedup`](crate::storage::Cf::Dedup):
//!   `shard | to user u64 | sender user u64 | sender device u32 | msg_id [16]`.
//! - [`Cf::InboxExpiry`](crate::storage::Cf::InboxExpiry):
//!   `shard | expires_at_ms u64 | user u64 | device u32 | seq u64`, so the rows of a shard's
//!   entries expired by a time are one range from the shard's start.

use ringpost_wire::{DeviceId, MsgId, UserId};

use crate::shard::ShardId;
use crate::storage::key;

/// Length of a device prefix (and of an InboxMeta key): shard + user + device.
pub(crate) const DEVICE_PREFIX_LEN: usize = 2 + 8 + 4;
/// Length of an Inbox key: device prefix + seq.
pub(crate) const INBOX_KEY_LEN: usize = DEVICE_PREFIX_LEN + 8;
/// Length of an InboxExpiry key.
pub(crate) const EXPIRY_KEY_LEN: usize = 2 + 8 + 8 + 4 + 8;
/// Length of a Dedup key.
pub(crate) const DEDUP_KEY_LEN: usize = 2 + 8 + 8 + 4 + 16;

/// `shard | user | device`: the prefix of a device's entries, and its InboxMeta key.
pub(crate) fn device_prefix(shard: ShardId, user: UserId, device: DeviceId) -> Vec<u8> {
    key(shard, &[&user.to_be_bytes(), &device.to_be_bytes()])
}

pub(crate) fn inbox_key(shard: ShardId, user: UserId, device: DeviceId, seq: u64) -> Vec<u8> {
    key(
        shard,
        &[
            &user.to_be_bytes(),
            &device.to_be_bytes(),
            &seq.to_be_bytes(),
        ],
    )
}

/// The parts of an Inbox key, or `None` if it is not one.
pub(crate) fn parse_inbox_key(k: &[u8]) -> Option<(ShardId, UserId, DeviceId, u64)> {
    let k: &[u8; INBOX_KEY_LEN] = k.try_into().ok()?;
    let shard = u16::from_be_bytes([k[0], k[1]]);
    let user = u64::from_be_bytes(k[2..10].try_into().ok()?);
    let device = u32::from_be_bytes(k[10..14].try_into().ok()?);
    let seq = u64::from_be_bytes(k[14..22].try_into().ok()?);
    Some((shard, user, device, seq))
}

/// The parts of an InboxMeta key, or `None` if it is not one.
pub(crate) fn parse_meta_key(k: &[u8]) -> Option<(ShardId, UserId, DeviceId)> {
    let k: &[u8; DEVICE_PREFIX_LEN] = k.try_into().ok()?;
    let shard = u16::from_be_bytes([k[0], k[1]]);
    let user = u64::from_be_bytes(k[2..10].try_into().ok()?);
    let device = u32::from_be_bytes(k[10..14].try_into().ok()?);
    Some((shard, user, device))
}

/// The expiry index row of the entry `seq` of a device, which expires at `expires_at_ms`.
pub(crate) fn expiry_key(
    shard: ShardId,
    expires_at_ms: u64,
    user: UserId,
    device: DeviceId,
    seq: u64,
) -> Vec<u8> {
    key(
        shard,
        &[
            &expires_at_ms.to_be_bytes(),
            &user.to_be_bytes(),
            &device.to_be_bytes(),
            &seq.to_be_bytes(),
        ],
    )
}

/// The parts of an InboxExpiry key (shard, expiry, user, device, seq), or `None` if it is not one.
pub(crate) fn parse_expiry_key(k: &[u8]) -> Option<(ShardId, u64, UserId, DeviceId, u64)> {
    let k: &[u8; EXPIRY_KEY_LEN] = k.try_into().ok()?;
    let shard = u16::from_be_bytes([k[0], k[1]]);
    let expires_at_ms = u64::from_be_bytes(k[2..10].try_into().ok()?);
    let user = u64::from_be_bytes(k[10..18].try_into().ok()?);
    let device = u32::from_be_bytes(k[18..22].try_into().ok()?);
    let seq = u64::from_be_bytes(k[22..30].try_into().ok()?);
    Some((shard, expires_at_ms, user, device, seq))
}

/// The end (exclusive) of `shard`'s expiry index rows of entries expired at `now_ms`.
pub(crate) fn expiry_range_end(shard: ShardId, now_ms: u64) -> Vec<u8> {
    match now_ms.checked_add(1) {
        Some(after) => key(shard, &[&after.to_be_bytes()]),
        None => crate::storage::prefix_end(&key(shard, &[])),
    }
}

pub(crate) fn dedup_key(
    shard: ShardId,
    to_user: UserId,
    sender_user: UserId,
    sender_device: DeviceId,
    msg_id: &MsgId,
) -> Vec<u8> {
    let k = key(
        shard,
        &[
            &to_user.to_be_bytes(),
            &sender_user.to_be_bytes(),
            &sender_device.to_be_bytes(),
            msg_id,
        ],
    );
    debug_assert_eq!(k.len(), DEDUP_KEY_LEN);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_roundtrip_and_sort_numerically() {
        let k = inbox_key(0x0102, u64::MAX - 1, 7, 42);
        assert_eq!(k.len(), INBOX_KEY_LEN);
        assert_eq!(parse_inbox_key(&k), Some((0x0102, u64::MAX - 1, 7, 42)));
        assert!(k.starts_with(&device_prefix(0x0102, u64::MAX - 1, 7)));
        assert_eq!(parse_meta_key(&device_prefix(3, 4, 5)), Some((3, 4, 5)));
        assert_eq!(parse_inbox_key(&k[..21]), None);
        assert_eq!(parse_meta_key(&k), None);
        assert!(inbox_key(1, 2, 3, 255) < inbox_key(1, 2, 3, 256));
        assert!(inbox_key(1, 2, 3, u64::MAX) < inbox_key(1, 2, 4, 0));
        assert!(inbox_key(1, 2, u32::MAX, u64::MAX) < inbox_key(1, 3, 0, 0));
        assert_eq!(dedup_key(1, 2, 3, 4, &[9; 16]).len(), DEDUP_KEY_LEN);
        let e = expiry_key(0x0102, 1_000, u64::MAX - 1, 7, 42);
        assert_eq!(e.len(), EXPIRY_KEY_LEN);
        assert_eq!(
            parse_expiry_key(&e),
            Some((0x0102, 1_000, u64::MAX - 1, 7, 42))
        );
        assert_eq!(parse_expiry_key(&e[..29]), None);
        assert!(expiry_key(1, 255, 9, 9, 9) < expiry_key(1, 256, 0, 0, 0));
        assert!(expiry_key(1, 1_000, u64::MAX, 9, 9) < expiry_range_end(1, 1_000));
        assert!(expiry_key(1, 1_001, 0, 0, 0) >= expiry_range_end(1, 1_000));
        assert!(expiry_key(1, u64::MAX, 9, 9, 9) < expiry_range_end(1, u64::MAX));
        assert!(expiry_range_end(1, u64::MAX) <= expiry_key(2, 0, 0, 0, 0));
    }
}
