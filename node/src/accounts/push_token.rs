//! Push tokens: how to wake a device that has no connection ([`crate::push`]).
//!
//! One row per device in the accounts family, beside its account and under the same shard
//! prefix, so it moves, replicates and is dropped with the shard like the account itself:
//! `shard | user | 0x01 | device` → `ver provider:u8 len:u16 token`. Written under the user's
//! stripe lock; removed with the device (remove, re-registration).

use ringpost_wire::limits::PUSH_TOKEN_BYTES_MAX;
use ringpost_wire::{DeviceId, PushProvider, UserId};

use super::{AccountError, Accounts};
use crate::storage::{key, Cf, StorageError, WriteBatch};

const PUSH_TOKEN_VERSION: u8 = 1;
/// The byte after `shard | user` that marks a push-token row (the account row has none).
const PUSH_TOKEN_TAG: u8 = 0x01;

/// A device's registered push token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushToken {
    pub provider: PushProvider,
    /// 1..=[`PUSH_TOKEN_BYTES_MAX`] bytes.
    pub token: String,
}

impl PushToken {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.token.len());
        out.push(PUSH_TOKEN_VERSION);
        out.push(self.provider as u8);
        // Checked against PUSH_TOKEN_BYTES_MAX (< u16::MAX) before it is stored.
        out.extend_from_slice(&(self.token.len() as u16).to_be_bytes());
        out.extend_from_slice(self.token.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<PushToken, StorageError> {
        let corrupt = |detail: &str| StorageError::Corrupt {
            cf: Cf::Accounts.name(),
            detail: format!("push token: {detail}"),
        };
        let [version, provider, len_hi, len_lo, token @ ..] = bytes else {
            return Err(corrupt("short record"));
        };
        if *version != PUSH_TOKEN_VERSION {
            return Err(corrupt("unknown version"));
        }
        let provider = match provider {
            0 => PushProvider::Webhook,
            1 => PushProvider::Apns,
            2 => PushProvider::Fcm,
            _ => return Err(corrupt("unknown provider")),
        };
        let len = usize::from(u16::from_be_bytes([*len_hi, *len_lo]));
        if len == 0 || len > PUSH_TOKEN_BYTES_MAX || token.len() != len {
            return Err(corrupt("bad token length"));
        }
        let token = std::str::from_utf8(token)
            .map_err(|_| corrupt("token is not UTF-8"))?
            .to_owned();
        Ok(PushToken { provider, token })
    }
}

impl Accounts {
    /// Registers `device`'s push token, replacing any earlier one; an empty `token` removes
    /// it. `NotFound` if the device is not (or no longer) registered. A synced write.
    pub fn set_push_token(
        &self,
        user: UserId,
        device: DeviceId,
        provider: PushProvider,
        token: &str,
    ) -> Result<(), AccountError> {
        if token.len() > PUSH_TOKEN_BYTES_MAX {
            return Err(AccountError::TooLong {
                what: "push token",
                max_bytes: PUSH_TOKEN_BYTES_MAX,
            });
        }
        check_token(provider, token)?;
        let _guard = self.lock(user);
        let account = self.load(user)?.ok_or(AccountError::NotFound)?;
        if account.device(device).is_none() {
            return Err(AccountError::NotFound);
        }
        let mut batch = WriteBatch::new();
        let row = self.push_token_key(user, device);
        if token.is_empty() {
            batch.delete(Cf::Accounts, row);
        } else {
            let record = PushToken {
                provider,
                token: token.to_owned(),
            };
            batch.put(Cf::Accounts, row, record.encode());
        }
        self.engine.write(batch, true)?;
        Ok(())
    }

    /// The push token of `device`, if it registered one. One storage read.
    pub fn push_token(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Option<PushToken>, AccountError> {
        match self
            .engine
            .get(Cf::Accounts, &self.push_token_key(user, device))?
        {
            Some(v) => Ok(Some(PushToken::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Removes `device`'s push token if it is still `stale` (a provider said it is invalid);
    /// a token the device registered meanwhile stays. Whether it removed it. A synced write.
    pub fn remove_push_token_if(
        &self,
        user: UserId,
        device: DeviceId,
        stale: &PushToken,
    ) -> Result<bool, AccountError> {
        let _guard = self.lock(user);
        if self.push_token(user, device)?.as_ref() != Some(stale) {
            return Ok(false);
        }
        let mut batch = WriteBatch::new();
        batch.delete(Cf::Accounts, self.push_token_key(user, device));
        self.engine.write(batch, true)?;
        Ok(true)
    }

    /// Adds the deletion of `device`'s push-token row to `batch` (a point delete: range
    /// tombstones in this family slow every later write).
    pub(super) fn delete_push_token(&self, batch: &mut WriteBatch, user: UserId, device: DeviceId) {
        batch.delete(Cf::Accounts, self.push_token_key(user, device));
    }

    fn push_token_key(&self, user: UserId, device: DeviceId) -> Vec<u8> {
        key(
            self.shard(user),
            &[
                &user.to_be_bytes(),
                &[PUSH_TOKEN_TAG],
                &device.to_be_bytes(),
            ],
        )
    }
}

/// A token goes into a URL path (APNs) or a JSON string: only the characters its provider uses.
fn check_token(provider: PushProvider, token: &str) -> Result<(), AccountError> {
    let ok = match provider {
        PushProvider::Apns => token.bytes().all(|b| b.is_ascii_hexdigit()),
        PushProvider::Fcm | PushProvider::Webhook => token.bytes().all(|b| b.is_ascii_graphic()),
    };
    if ok {
        Ok(())
    } else if provider == PushProvider::Apns {
        Err(AccountError::InvalidPushToken(
            "an APNs token is hex digits",
        ))
    } else {
        Err(AccountError::InvalidPushToken(
            "a push token is printable ASCII without spaces",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_corrupt_ones_are_refused() {
        let t = PushToken {
            provider: PushProvider::Fcm,
            token: "abc".into(),
        };
        assert_eq!(PushToken::decode(&t.encode()).unwrap(), t);
        let mut bad = t.encode();
        bad[1] = 9;
        assert!(PushToken::decode(&bad).is_err());
        let mut short = t.encode();
        short.pop();
        assert!(PushToken::decode(&short).is_err());
        assert!(PushToken::decode(&[]).is_err());
    }
}
