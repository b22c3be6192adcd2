//! Stored records of the accounts service and their explicit binary codecs.
//!
//! Every record starts with a version byte; integers are big-endian; variable-length fields
//! carry a length prefix and a bound. Decoders check every length and bound and return
//! [`StorageError::Corrupt`] instead of panicking; trailing bytes are corrupt too.
//!
//! | record | family | layout (v1) |
//! |---|---|---|
//! | [`AccountRecord`] | accounts | `ver created_ms:u64 next_device:u32 n:u8 n×device lock? pin_failures:u8 pin_window_start_ms:u64` |
//! | device | (inside) | `id:u32 token_sha256:[32] created_ms:u64 name_len:u16 name` |
//! | lock | (inside) | `0`, or `1 m_kib:u32 t:u32 p:u32 salt:[16] hash:[32]` |
//! | [`PendingCode`] | verify | `ver flags:u8 code_sha256:[32] sent_ms:u64 expires_ms:u64 attempts:u8 window_start_ms:u64 sends:u8` |
//! | [`LinkCodeRecord`] | verify | `ver expires_ms:u64` |

use ringpost_wire::limits::{DEVICES_PER_USER_MAX, STRING_BYTES_MAX};
use ringpost_wire::DeviceId;

use super::pin::{PinHash, PinParams, PIN_HASH_BYTES, PIN_SALT_BYTES};
use super::token::Hash32;
use crate::storage::{Cf, StorageError};

const ACCOUNT_VERSION: u8 = 1;
const PENDING_VERSION: u8 = 1;
const LINK_VERSION: u8 = 1;

/// A registered account: its devices (the primary is always [`super::PRIMARY_DEVICE`]), the
/// next linked-device id, and the registration lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AccountRecord {
    pub created_ms: u64,
    /// The id the next linked device gets; ids are never reused within an account.
    pub next_device: DeviceId,
    /// Ascending by id, at most [`DEVICES_PER_USER_MAX`].
    pub devices: Vec<DeviceRecord>,
    pub lock: Option<PinHash>,
    /// Wrong PINs since `pin_window_start_ms`.
    pub pin_failures: u8,
    pub pin_window_start_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceRecord {
    pub id: DeviceId,
    pub token_hash: Hash32,
    pub created_ms: u64,
    /// At most [`STRING_BYTES_MAX`] bytes.
    pub name: String,
}

impl AccountRecord {
    pub fn device(&self, id: DeviceId) -> Option<&DeviceRecord> {
        self.devices.iter().find(|d| d.id == id)
    }

    pub fn device_ids(&self) -> Vec<DeviceId> {
        self.devices.iter().map(|d| d.id).collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.devices.len() * 64);
        out.push(ACCOUNT_VERSION);
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        out.extend_from_slice(&self.next_device.to_be_bytes());
        // The service never stores more than DEVICES_PER_USER_MAX devices or longer names;
        // the saturating casts only matter if that were broken, and the decoder would then
        // report the record as corrupt rather than misread it.
        out.push(u8::try_from(self.devices.len()).unwrap_or(u8::MAX));
        for d in &self.devices {
            out.extend_from_slice(&d.id.to_be_bytes());
            out.extend_from_slice(&d.token_hash);
            out.extend_from_slice(&d.created_ms.to_be_bytes());
            let name = d.name.as_bytes();
            out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
            out.extend_from_slice(name);
        }
        match &self.lock {
            None => out.push(0),
            Some(lock) => {
                out.push(1);
                out.extend_from_slice(&lock.params.m_cost_kib.to_be_bytes());
                out.extend_from_slice(&lock.params.t_cost.to_be_bytes());
                out.extend_from_slice(&lock.params.p_cost.to_be_bytes());
                out.extend_from_slice(&lock.salt);
                out.extend_from_slice(&lock.hash);
            }
        }
        out.push(self.pin_failures);
        out.extend_from_slice(&self.pin_window_start_ms.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<AccountRecord, StorageError> {
        let mut r = Reader::new(bytes, Cf::Accounts);
        r.version(ACCOUNT_VERSION)?;
        let created_ms = r.u64()?;
        let next_device = r.u32()?;
        let count = usize::from(r.u8()?);
        if count > DEVICES_PER_USER_MAX {
            return Err(r.corrupt(format!("{count} devices")));
        }
        let mut devices: Vec<DeviceRecord> = Vec::with_capacity(count);
        for _ in 0..count {
            let id = r.u32()?;
            let token_hash = r.array::<32>()?;
            let created_ms = r.u64()?;
            let name_len = usize::from(r.u16()?);
            if name_len > STRING_BYTES_MAX {
                return Err(r.corrupt(format!("device name of {name_len} bytes")));
            }
            let name = std::str::from_utf8(r.bytes(name_len)?)
                .map_err(|_| r.corrupt("device name is not UTF-8".into()))?
                .to_owned();
            if devices.last().is_some_and(|last| last.id >= id) {
                return Err(r.corrupt("device ids not ascending".into()));
            }
            devices.push(DeviceRecord {
                id,
                token_hash,
                created_ms,
                name,
            });
        }
        let lock = match r.u8()? {
            0 => None,
            1 => {
                let params = PinParams {
                    m_cost_kib: r.u32()?,
                    t_cost: r.u32()?,
                    p_cost: r.u32()?,
                };
                if !params.is_valid() {
                    return Err(r.corrupt(format!("PIN parameters out of bounds: {params:?}")));
                }
                let salt = r.array::<PIN_SALT_BYTES>()?;
                let hash = r.array::<PIN_HASH_BYTES>()?;
                Some(PinHash { params, salt, hash })
            }
            other => return Err(r.corrupt(format!("lock flag {other}"))),
        };
        let pin_failures = r.u8()?;
        let pin_window_start_ms = r.u64()?;
        r.finish()?;
        Ok(AccountRecord {
            created_ms,
            next_device,
            devices,
            lock,
            pin_failures,
            pin_window_start_ms,
        })
    }
}

/// The verification state of one phone number: the current code (if any) and the resend
/// throttle, which outlives the code so that using or losing a code does not reset it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PendingCode {
    /// A code is outstanding (not yet used, not withdrawn).
    pub live: bool,
    /// SHA-256 of `phone (u64 BE) | code`.
    pub code_hash: Hash32,
    /// When the last code was sent (0: a new one may be sent at once).
    pub sent_ms: u64,
    pub expires_ms: u64,
    /// Wrong codes entered against the current code.
    pub attempts: u8,
    /// Start of the current one-hour send window.
    pub window_start_ms: u64,
    /// Codes sent in the current window.
    pub sends_in_window: u8,
}

impl PendingCode {
    const LEN: usize = 1 + 1 + 32 + 8 + 8 + 1 + 8 + 1;

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.push(PENDING_VERSION);
        out.push(u8::from(self.live));
        out.extend_from_slice(&self.code_hash);
        out.extend_from_slice(&self.sent_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        out.push(self.attempts);
        out.extend_from_slice(&self.window_start_ms.to_be_bytes());
        out.push(self.sends_in_window);
        debug_assert_eq!(out.len(), Self::LEN);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<PendingCode, StorageError> {
        let mut r = Reader::new(bytes, Cf::Verify);
        r.version(PENDING_VERSION)?;
        let live = match r.u8()? {
            0 => false,
            1 => true,
            other => return Err(r.corrupt(format!("pending flags {other}"))),
        };
        let rec = PendingCode {
            live,
            code_hash: r.array::<32>()?,
            sent_ms: r.u64()?,
            expires_ms: r.u64()?,
            attempts: r.u8()?,
            window_start_ms: r.u64()?,
            sends_in_window: r.u8()?,
        };
        r.finish()?;
        Ok(rec)
    }
}

/// An outstanding link (provisioning) code; the code itself is only in the key, hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinkCodeRecord {
    pub expires_ms: u64,
}

impl LinkCodeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9);
        out.push(LINK_VERSION);
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<LinkCodeRecord, StorageError> {
        let mut r = Reader::new(bytes, Cf::Verify);
        r.version(LINK_VERSION)?;
        let expires_ms = r.u64()?;
        r.finish()?;
        Ok(LinkCodeRecord { expires_ms })
    }
}

/// A bounds-checked cursor over a stored value.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    cf: Cf,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], cf: Cf) -> Self {
        Reader { buf, pos: 0, cf }
    }

    fn corrupt(&self, detail: String) -> StorageError {
        StorageError::Corrupt {
            cf: self.cf.name(),
            detail: format!("{detail} (at byte {})", self.pos),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], StorageError> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.buf.len());
        match end {
            Some(end) => {
                let out = &self.buf[self.pos..end];
                self.pos = end;
                Ok(out)
            }
            None => Err(self.corrupt(format!("truncated: wanted {n} more bytes"))),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StorageError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, StorageError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, StorageError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, StorageError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, StorageError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn version(&mut self, expected: u8) -> Result<(), StorageError> {
        let v = self.u8()?;
        if v == expected {
            Ok(())
        } else {
            Err(self.corrupt(format!("unknown record version {v}")))
        }
    }

    fn finish(&self) -> Result<(), StorageError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.corrupt(format!("{} trailing bytes", self.buf.len() - self.pos)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::pin::tests::TEST_PARAMS;

    fn sample_account() -> AccountRecord {
        AccountRecord {
            created_ms: 1_700_000_000_000,
            next_device: 7,
            devices: vec![
                DeviceRecord {
                    id: 1,
                    token_hash: [1; 32],
                    created_ms: 5,
                    name: "phone".into(),
                },
                DeviceRecord {
                    id: 6,
                    token_hash: [6; 32],
                    created_ms: 9,
                    name: "ラップトップ".into(),
                },
            ],
            lock: Some(PinHash::create("1234", TEST_PARAMS).unwrap()),
            pin_failures: 3,
            pin_window_start_ms: 42,
        }
    }

    #[test]
    fn account_round_trips() {
        let rec = sample_account();
        assert_eq!(AccountRecord::decode(&rec.encode()).unwrap(), rec);
        let bare = AccountRecord {
            created_ms: 0,
            next_device: 2,
            devices: vec![],
            lock: None,
            pin_failures: 0,
            pin_window_start_ms: 0,
        };
        assert_eq!(AccountRecord::decode(&bare.encode()).unwrap(), bare);
        let full = AccountRecord {
            devices: (1..=DEVICES_PER_USER_MAX as u32)
                .map(|id| DeviceRecord {
                    id,
                    token_hash: [0; 32],
                    created_ms: 0,
                    name: "n".repeat(STRING_BYTES_MAX),
                })
                .collect(),
            ..bare
        };
        assert_eq!(AccountRecord::decode(&full.encode()).unwrap(), full);
    }

    #[test]
    fn pending_and_link_round_trip() {
        let p = PendingCode {
            live: true,
            code_hash: [9; 32],
            sent_ms: 1,
            expires_ms: 2,
            attempts: 3,
            window_start_ms: 4,
            sends_in_window: 5,
        };
        assert_eq!(PendingCode::decode(&p.encode()).unwrap(), p);
        assert_eq!(
            PendingCode::decode(&PendingCode::default().encode()).unwrap(),
            PendingCode::default()
        );
        let l = LinkCodeRecord {
            expires_ms: u64::MAX,
        };
        assert_eq!(LinkCodeRecord::decode(&l.encode()).unwrap(), l);
    }

    fn assert_corrupt<T: std::fmt::Debug>(r: Result<T, StorageError>) {
        match r {
            Err(StorageError::Corrupt { .. }) => {}
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn every_truncation_and_extension_is_corrupt() {
        let acc = sample_account().encode();
        for n in 0..acc.len() {
            assert_corrupt(AccountRecord::decode(&acc[..n]));
        }
        let mut longer = acc.clone();
        longer.push(0);
        assert_corrupt(AccountRecord::decode(&longer));

        let pend = PendingCode::default().encode();
        for n in 0..pend.len() {
            assert_corrupt(PendingCode::decode(&pend[..n]));
        }
        let link = LinkCodeRecord { expires_ms: 1 }.encode();
        for n in 0..link.len() {
            assert_corrupt(LinkCodeRecord::decode(&link[..n]));
        }
        let mut longer = link.clone();
        longer.push(0);
        assert_corrupt(LinkCodeRecord::decode(&longer));
    }

    #[test]
    fn bad_fields_are_corrupt() {
        let good = sample_account().encode();
        // Unknown version.
        let mut b = good.clone();
        b[0] = 2;
        assert_corrupt(AccountRecord::decode(&b));
        // Too many devices (count byte sits after version, created_ms and next_device).
        let mut b = good.clone();
        b[1 + 8 + 4] = DEVICES_PER_USER_MAX as u8 + 1;
        assert_corrupt(AccountRecord::decode(&b));
        // Descending device ids.
        let mut rec = sample_account();
        rec.devices.reverse();
        assert_corrupt(AccountRecord::decode(&rec.encode()));
        // Non-UTF-8 name.
        let mut rec = sample_account();
        rec.lock = None;
        let mut b = rec.encode();
        let name_at = 1 + 8 + 4 + 1 + 4 + 32 + 8 + 2;
        b[name_at] = 0xff;
        assert_corrupt(AccountRecord::decode(&b));
        // A name longer than the bound.
        let mut b = rec.encode();
        b[name_at - 2..name_at].copy_from_slice(&(STRING_BYTES_MAX as u16 + 1).to_be_bytes());
        assert_corrupt(AccountRecord::decode(&b));
        // Bad lock flag, and PIN parameters that would allocate without bound.
        let mut rec = sample_account();
        rec.lock = None;
        let mut b = rec.encode();
        let flag_at = b.len() - 1 - 8 - 1;
        b[flag_at] = 7;
        assert_corrupt(AccountRecord::decode(&b));
        let mut rec = sample_account();
        if let Some(lock) = rec.lock.as_mut() {
            lock.params.m_cost_kib = u32::MAX;
        }
        assert_corrupt(AccountRecord::decode(&rec.encode()));
        // Pending: bad flag byte.
        let mut b = PendingCode::default().encode();
        b[1] = 2;
        assert_corrupt(PendingCode::decode(&b));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic xorshift stream of inputs of every short length.
        crate::test_bytes::for_each_input(0x2545_f491_4f6c_dd1d, 300, 20, |buf| {
            let _ = AccountRecord::decode(buf);
            let _ = PendingCode::decode(buf);
            let _ = LinkCodeRecord::decode(buf);
        });
    }
}
