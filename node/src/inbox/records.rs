//! The inbox's dedup record and its binary encoding (device counters are in `device.rs`).
//!
//! - [`DedupRecord`] (Dedup family), format 1:
//!   `expires_at_ms u64 | version u8 | server_time_ms u64 | flags u8`. The expiry comes first,
//!   before the version byte, because the storage contract of the Dedup family (see
//!   [`Cf::Dedup`](crate::storage::Cf::Dedup)) lets an engine drop expired records by reading
//!   only those 8 bytes.

use bytes::BufMut;

use super::codec::{corrupt, Reader};
use crate::storage::StorageError;

const DEDUP_FORMAT_V1: u8 = 1;
/// Flag bit of [`DedupRecord::receipt_sent`].
const FLAG_RECEIPT_SENT: u8 = 0b1;

/// What the inbox remembers about one (recipient, sender device, msg_id) for the dedup window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DedupRecord {
    pub expires_at_ms: u64,
    /// The time of the original append, returned to a duplicate.
    pub server_time_ms: u64,
    /// Whether a device of the recipient acked the message and a `delivered` receipt was
    /// handed to the caller.
    pub receipt_sent: bool,
}

impl DedupRecord {
    pub(crate) fn is_live(&self, now_ms: u64) -> bool {
        self.expires_at_ms > now_ms
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(18);
        out.put_u64(self.expires_at_ms);
        out.put_u8(DEDUP_FORMAT_V1);
        out.put_u64(self.server_time_ms);
        out.put_u8(if self.receipt_sent {
            FLAG_RECEIPT_SENT
        } else {
            0
        });
        out
    }

    pub(crate) fn decode(value: &[u8]) -> Result<Self, StorageError> {
        const CF: &str = "dedup";
        let mut r = Reader::new(value);
        let expires_at_ms = r.u64().ok_or_else(|| corrupt(CF, "truncated"))?;
        let version = r.u8().ok_or_else(|| corrupt(CF, "truncated"))?;
        if version != DEDUP_FORMAT_V1 {
            return Err(corrupt(CF, format!("unknown dedup format {version}")));
        }
        let server_time_ms = r.u64().ok_or_else(|| corrupt(CF, "truncated"))?;
        let flags = r.u8().ok_or_else(|| corrupt(CF, "truncated"))?;
        if flags & !FLAG_RECEIPT_SENT != 0 {
            return Err(corrupt(CF, format!("unknown flags {flags:#04x}")));
        }
        if !r.is_done() {
            return Err(corrupt(CF, "trailing bytes"));
        }
        Ok(Self {
            expires_at_ms,
            server_time_ms,
            receipt_sent: flags & FLAG_RECEIPT_SENT != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_roundtrips_and_keeps_expiry_first() {
        for receipt_sent in [false, true] {
            let d = DedupRecord {
                expires_at_ms: 0x0102_0304_0506_0708,
                server_time_ms: 9,
                receipt_sent,
            };
            let bytes = d.encode();
            // The storage contract: the first 8 bytes are the expiry, big-endian.
            assert_eq!(bytes[..8], 0x0102_0304_0506_0708u64.to_be_bytes());
            assert_eq!(DedupRecord::decode(&bytes).unwrap(), d);
            for len in 0..bytes.len() {
                assert!(DedupRecord::decode(&bytes[..len]).is_err(), "{len}");
            }
        }
        let mut bad_flags = DedupRecord {
            expires_at_ms: 1,
            server_time_ms: 1,
            receipt_sent: true,
        }
        .encode();
        bad_flags[17] = 0x80;
        assert!(DedupRecord::decode(&bad_flags).is_err());
        let mut v2 = DedupRecord {
            expires_at_ms: 1,
            server_time_ms: 1,
            receipt_sent: true,
        }
        .encode();
        v2[8] = 2;
        assert!(DedupRecord::decode(&v2).is_err());
    }
}
