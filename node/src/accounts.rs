//! The accounts shard service: users, their devices and tokens, phone verification, device
//! linking and the registration lock.
//!
//! [`Accounts`] is written against [`Engine`] and takes time as `now_ms` (sans-IO style: tests
//! control the clock). Its only IO besides storage is delivering verification codes through a
//! pluggable [`CodeSender`] ([`LogCodeSender`] for development, [`HttpCodeSender`] for an
//! SMS/voice gateway).
//!
//! Storage (value codecs in `accounts/record.rs`):
//! - accounts family, `shard | user` → the account: devices with their token hashes, the
//!   next linked-device id, the registration lock.
//! - accounts family, `shard | user | 0x01 | device` → the device's push token
//!   (`accounts/push_token.rs`), removed with the device.
//! - verify family, `shard | phone` → the pending verification code and resend throttle;
//!   `shard | user | 0xff | sha256(user | code)[..16]` → an outstanding link code.
//!
//! Every read-modify-write of one user's records runs under one of [`LOCK_STRIPES`] mutexes
//! chosen by the user id. The engine has no transactions; the lock is enough because only the
//! shard's owner node writes its accounts (fencing by epoch), and within the node only this
//! service writes these families. The hot paths, [`Accounts::authenticate`] and
//! [`Accounts::devices`], take no stripe lock.

mod cache;
mod error;
mod http_sender;
mod pin;
mod push_token;
mod record;
mod sender;
mod token;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::OsRng;
use rand::{Rng, RngCore};
use ringpost_wire::limits::{DEVICES_PER_USER_MAX, STRING_BYTES_MAX, TOKEN_BYTES};
use ringpost_wire::{CodeChannel, DeviceId, UserId};

pub use error::AccountError;
pub use http_sender::{
    HttpCodeSender, HttpCodeSenderConfig, HTTP_CONFIG_STRING_BYTES_MAX,
    HTTP_RESPONSE_HEAD_BYTES_MAX, HTTP_TIMEOUT_MS_DEFAULT,
};
pub use pin::PinParams;
pub use push_token::PushToken;
pub use sender::{CodeSendError, CodeSender, LogCodeSender, SendFuture};
pub use token::Token;

use cache::{DeviceCache, DeviceSet};
use pin::PinHash;
use record::{AccountRecord, DeviceRecord, LinkCodeRecord, PendingCode};
use token::{hash_eq, sha256, sha256_parts};

use crate::shard::{shard_of, ShardId};
use crate::storage::{key, prefix_end, Cf, Engine, WriteBatch};

/// The primary device of every account. Re-registration gives the new primary this id again.
pub const PRIMARY_DEVICE: DeviceId = 1;
/// The largest E.164 number as an integer (15 digits).
pub const PHONE_MAX: u64 = 999_999_999_999_999;

/// Digits of a verification code (10^6 codes).
pub const CODE_DIGITS: usize = 6;
/// How long a verification code is valid, by default.
pub const CODE_TTL_MS_DEFAULT: u64 = 10 * 60 * 1000;
/// The least time between two codes sent to one number, by default.
pub const CODE_RESEND_INTERVAL_MS_DEFAULT: u64 = 60 * 1000;
/// The window over which codes per number are counted.
pub const CODE_SEND_WINDOW_MS: u64 = 60 * 60 * 1000;
/// Codes sent to one number per [`CODE_SEND_WINDOW_MS`], by default. Each costs an SMS.
pub const CODE_SENDS_PER_WINDOW_MAX_DEFAULT: u8 = 5;
/// Wrong codes accepted per code; the next attempt gets `TooManyAttempts`. With the send
/// bounds above an attacker gets at most 25 guesses per hour at a 10^6 space.
pub const CODE_ATTEMPTS_MAX: u8 = 5;

/// Characters of a link code, from the RFC 4648 base32 alphabet: 50 random bits.
pub const LINK_CODE_CHARS: usize = 10;
/// How long a link code is valid, by default.
pub const LINK_CODE_TTL_MS_DEFAULT: u64 = 10 * 60 * 1000;
/// Unexpired link codes one account may have at once (each is one ~40-byte record).
pub const LINK_CODES_OUTSTANDING_MAX: usize = 3;

/// Shortest registration-lock PIN.
pub const PIN_BYTES_MIN: usize = 4;
/// Longest registration-lock PIN.
pub const PIN_BYTES_MAX: usize = 64;
/// Wrong PINs accepted per [`PIN_ATTEMPT_WINDOW_MS`]; then registration of the number is
/// refused until the window ends.
pub const PIN_ATTEMPTS_MAX: u8 = 5;
/// See [`PIN_ATTEMPTS_MAX`].
pub const PIN_ATTEMPT_WINDOW_MS: u64 = 24 * 60 * 60 * 1000;
/// Argon2 hashes computed at once; beyond it callers get `RateLimited`. Bounds PIN-hashing
/// memory to this many times [`PinParams::m_cost_kib`] (76 MiB with the server default).
pub const PIN_HASHES_IN_FLIGHT_MAX: usize = 4;
/// What a caller refused by [`PIN_HASHES_IN_FLIGHT_MAX`] is told to wait.
pub const PIN_BUSY_RETRY_AFTER_MS: u64 = 1000;

/// Users whose device lists are cached, by default: about 64 bytes each, so 16 MiB.
pub const DEVICE_CACHE_CAPACITY_DEFAULT: usize = 1 << 18;
/// Mutexes serialising read-modify-writes per user (a user always maps to the same one).
pub const LOCK_STRIPES: usize = 64;

/// Tunables of [`Accounts`]; `Default` gives the production values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountsConfig {
    /// Shards of the cluster (fixed at creation).
    pub shard_count: u16,
    /// See [`CODE_TTL_MS_DEFAULT`].
    pub code_ttl_ms: u64,
    /// See [`CODE_RESEND_INTERVAL_MS_DEFAULT`].
    pub code_resend_interval_ms: u64,
    /// See [`CODE_SENDS_PER_WINDOW_MAX_DEFAULT`].
    pub code_sends_per_window_max: u8,
    /// See [`LINK_CODE_TTL_MS_DEFAULT`].
    pub link_code_ttl_ms: u64,
    /// Cost of new PIN hashes (existing ones keep theirs). See [`PinParams`].
    pub pin_params: PinParams,
    /// See [`DEVICE_CACHE_CAPACITY_DEFAULT`]; 0 disables the cache.
    pub device_cache_capacity: usize,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        AccountsConfig {
            shard_count: crate::shard::SHARD_COUNT_DEFAULT,
            code_ttl_ms: CODE_TTL_MS_DEFAULT,
            code_resend_interval_ms: CODE_RESEND_INTERVAL_MS_DEFAULT,
            code_sends_per_window_max: CODE_SENDS_PER_WINDOW_MAX_DEFAULT,
            link_code_ttl_ms: LINK_CODE_TTL_MS_DEFAULT,
            pin_params: PinParams::SERVER_DEFAULT,
            device_cache_capacity: DEVICE_CACHE_CAPACITY_DEFAULT,
        }
    }
}

/// A verification code was sent (`RegisterChallenge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    pub expires_in_ms: u32,
    /// The earliest a new code may be requested.
    pub retry_after_ms: u32,
}

/// A code stored for a number and not sent yet ([`Accounts::issue_code`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCode {
    pub phone: UserId,
    code: String,
    code_hash: token::Hash32,
}

/// A registered device and its token (`Registered`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub user: UserId,
    pub device: DeviceId,
    pub token: Token,
}

/// The outcome of [`Accounts::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The new primary device.
    pub registered: Registration,
    /// Devices of the previous registration of this number, all gone now (including the old
    /// primary, whose id the new primary reuses): the caller drops their inboxes and prekeys
    /// and disconnects them. Empty for a new account.
    pub removed_devices: Vec<DeviceId>,
}

/// A link code was issued (`LinkCode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkCodeIssued {
    pub code: String,
    pub expires_in_ms: u32,
}

/// The outcome of one [`Accounts::sweep_expired`] step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sweep {
    /// Records deleted.
    pub removed: usize,
    /// Where the next step starts; `None` when the shard is done.
    pub resume_from: Option<Vec<u8>>,
}

/// The accounts service of one node. See the module documentation.
pub struct Accounts {
    engine: Arc<dyn Engine>,
    sender: Arc<dyn CodeSender>,
    config: AccountsConfig,
    stripes: Box<[Mutex<()>]>,
    cache: DeviceCache,
    pin_hashes_in_flight: AtomicUsize,
}

impl Accounts {
    pub fn new(
        engine: Arc<dyn Engine>,
        sender: Arc<dyn CodeSender>,
        config: AccountsConfig,
    ) -> Accounts {
        let stripes = (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect();
        let cache = DeviceCache::new(config.device_cache_capacity);
        Accounts {
            engine,
            sender,
            config,
            stripes,
            cache,
            pin_hashes_in_flight: AtomicUsize::new(0),
        }
    }

    /// Sends a new verification code to `phone` over `channel`, replacing any earlier code.
    ///
    /// Refused with `RateLimited` within [`AccountsConfig::code_resend_interval_ms`] of the
    /// last code and beyond [`AccountsConfig::code_sends_per_window_max`] codes per hour. If
    /// delivery fails the code is withdrawn and a new one may be requested at once (the send
    /// still counts towards the hourly bound).
    pub async fn request_code(
        &self,
        phone: UserId,
        channel: CodeChannel,
        now_ms: u64,
    ) -> Result<Challenge, AccountError> {
        let issued = self.issue_code(phone, now_ms)?;
        match self.deliver_code(&issued, channel).await {
            Err(AccountError::Delivery(e)) => {
                self.withdraw_code(&issued)?;
                Err(AccountError::Delivery(e))
            }
            other => other,
        }
    }

    /// The first half of [`Accounts::request_code`], without any waiting on the network: checks
    /// the number's limits and stores the new code's hash (a synced write: call it off the async
    /// workers).
    pub fn issue_code(&self, phone: UserId, now_ms: u64) -> Result<IssuedCode, AccountError> {
        check_phone(phone)?;
        let code = format!(
            "{:0width$}",
            OsRng.gen_range(0..1_000_000u32),
            width = CODE_DIGITS
        );
        let code_hash = code_hash(phone, &code);
        let _guard = self.lock(phone);
        let mut pending = self.load_pending(phone)?.unwrap_or_default();
        let resend_at = pending
            .sent_ms
            .saturating_add(self.config.code_resend_interval_ms);
        if pending.sent_ms != 0 && now_ms < resend_at {
            return Err(AccountError::RateLimited {
                retry_after_ms: resend_at - now_ms,
            });
        }
        let window_end = pending.window_start_ms.saturating_add(CODE_SEND_WINDOW_MS);
        if now_ms >= window_end {
            pending.window_start_ms = now_ms;
            pending.sends_in_window = 0;
        } else if pending.sends_in_window >= self.config.code_sends_per_window_max {
            return Err(AccountError::RateLimited {
                retry_after_ms: window_end - now_ms,
            });
        }
        pending.live = true;
        pending.code_hash = code_hash;
        pending.sent_ms = now_ms;
        pending.expires_ms = now_ms.saturating_add(self.config.code_ttl_ms);
        pending.attempts = 0;
        pending.sends_in_window = pending.sends_in_window.saturating_add(1);
        let mut batch = WriteBatch::new();
        batch.put(Cf::Verify, self.pending_key(phone), pending.encode());
        self.engine.write(batch, true)?;
        Ok(IssuedCode {
            phone,
            code,
            code_hash,
        })
    }

    /// The second half of [`Accounts::request_code`]: sends the issued code. On
    /// `Err(Delivery)` the caller withdraws it ([`Accounts::withdraw_code`]).
    pub async fn deliver_code(
        &self,
        issued: &IssuedCode,
        channel: CodeChannel,
    ) -> Result<Challenge, AccountError> {
        self.sender
            .send(issued.phone, &issued.code, channel)
            .await
            .map_err(AccountError::Delivery)?;
        Ok(Challenge {
            expires_in_ms: clamp_u32(self.config.code_ttl_ms),
            retry_after_ms: clamp_u32(self.config.code_resend_interval_ms),
        })
    }

    /// Withdraws a code whose delivery failed (unless a newer one replaced it meanwhile) and
    /// lifts the resend throttle so the user can try again at once. A synced write.
    pub fn withdraw_code(&self, issued: &IssuedCode) -> Result<(), AccountError> {
        let _guard = self.lock(issued.phone);
        if let Some(mut pending) = self.load_pending(issued.phone)? {
            if pending.code_hash == issued.code_hash {
                pending.live = false;
                pending.sent_ms = 0;
                let mut batch = WriteBatch::new();
                batch.put(Cf::Verify, self.pending_key(issued.phone), pending.encode());
                self.engine.write(batch, true)?;
            }
        }
        Ok(())
    }

    /// Proves `phone` with `code` and registers a new primary device named `device_name`.
    ///
    /// For a number that is already registered, every old device is removed (listed in
    /// [`Verified::removed_devices`]), unless the account has a registration lock: then `pin`
    /// must match, else `RegistrationLocked` (the code stays valid, the wrong PIN is counted,
    /// see [`PIN_ATTEMPTS_MAX`]). A wrong code is counted against [`CODE_ATTEMPTS_MAX`]. The
    /// code is consumed on success. Costs one Argon2 hash when the account is locked.
    pub fn verify(
        &self,
        phone: UserId,
        code: &str,
        pin: &str,
        device_name: &str,
        now_ms: u64,
    ) -> Result<Verified, AccountError> {
        check_phone(phone)?;
        check_len("code", code, STRING_BYTES_MAX)?;
        check_len("PIN", pin, PIN_BYTES_MAX)?;
        check_len("device name", device_name, STRING_BYTES_MAX)?;
        let _guard = self.lock(phone);
        let mut pending = match self.load_pending(phone)? {
            Some(p) if p.live && now_ms < p.expires_ms => p,
            _ => return Err(AccountError::VerificationExpired),
        };
        if pending.attempts >= CODE_ATTEMPTS_MAX {
            return Err(AccountError::TooManyAttempts);
        }
        if !hash_eq(&code_hash(phone, code), &pending.code_hash) {
            pending.attempts += 1;
            let mut batch = WriteBatch::new();
            batch.put(Cf::Verify, self.pending_key(phone), pending.encode());
            self.engine.write(batch, true)?;
            return Err(AccountError::VerificationFailed);
        }

        let user = phone;
        let existing = self.load(user)?;
        let mut removed_devices = Vec::new();
        let mut account = match existing {
            None => AccountRecord {
                created_ms: now_ms,
                next_device: PRIMARY_DEVICE + 1,
                devices: Vec::new(),
                lock: None,
                pin_failures: 0,
                pin_window_start_ms: 0,
            },
            Some(mut account) => {
                if account.lock.is_some() {
                    self.check_pin(user, &mut account, pin, now_ms)?;
                }
                removed_devices = account.device_ids();
                account
            }
        };
        let token = Token::generate();
        account.devices = vec![DeviceRecord {
            id: PRIMARY_DEVICE,
            token_hash: token.hash(),
            created_ms: now_ms,
            name: device_name.to_owned(),
        }];
        pending.live = false;
        pending.attempts = 0;
        let mut batch = WriteBatch::new();
        batch.put(Cf::Accounts, self.account_key(user), account.encode());
        batch.put(Cf::Verify, self.pending_key(phone), pending.encode());
        // Link codes issued by the replaced primary must not admit devices to the new one. A
        // new account has none: no range tombstone then (they pile up and slow every later
        // write to the family: registration fell from ~1000/s to ~125/s over 90k accounts).
        if !removed_devices.is_empty() {
            let links = self.link_prefix(user);
            batch.delete_range(Cf::Verify, links.clone(), prefix_end(&links));
        }
        // The old devices' push tokens go with them (the new primary registers its own).
        for &old in &removed_devices {
            self.delete_push_token(&mut batch, user, old);
        }
        self.engine.write(batch, true)?;
        self.cache.invalidate(user);
        tracing::info!(
            shard = self.shard(user),
            removed = removed_devices.len(),
            "account registered"
        );
        Ok(Verified {
            registered: Registration {
                user,
                device: PRIMARY_DEVICE,
                token,
            },
            removed_devices,
        })
    }

    /// Checks the registration-lock PIN of a locked `account`; counts a failure (and stores
    /// it) before returning `RegistrationLocked`. Called with the user's stripe lock held.
    fn check_pin(
        &self,
        user: UserId,
        account: &mut AccountRecord,
        pin: &str,
        now_ms: u64,
    ) -> Result<(), AccountError> {
        let Some(lock) = account.lock.clone() else {
            return Ok(());
        };
        let window_end = account
            .pin_window_start_ms
            .saturating_add(PIN_ATTEMPT_WINDOW_MS);
        if now_ms >= window_end {
            account.pin_failures = 0;
        }
        if account.pin_failures >= PIN_ATTEMPTS_MAX {
            return Err(AccountError::RateLimited {
                retry_after_ms: window_end - now_ms,
            });
        }
        let matches = !pin.is_empty() && {
            let _permit = self.pin_permit()?;
            lock.verify(pin)?
        };
        if matches {
            account.pin_failures = 0;
            return Ok(());
        }
        if account.pin_failures == 0 {
            account.pin_window_start_ms = now_ms;
        }
        account.pin_failures += 1;
        let mut batch = WriteBatch::new();
        batch.put(Cf::Accounts, self.account_key(user), account.encode());
        self.engine.write(batch, true)?;
        Err(AccountError::RegistrationLocked)
    }

    /// Checks a device's token: one storage read and one SHA-256, compared in constant time.
    /// Every failure (unknown user or device, removed device, wrong token) is `BadCredentials`.
    pub fn authenticate(
        &self,
        user: UserId,
        device: DeviceId,
        token: &[u8],
    ) -> Result<(), AccountError> {
        let presented = sha256(token);
        if token.len() != TOKEN_BYTES {
            return Err(AccountError::BadCredentials);
        }
        let account = self.load(user)?.ok_or(AccountError::BadCredentials)?;
        let stored = account.device(device).ok_or(AccountError::BadCredentials)?;
        if hash_eq(&presented, &stored.token_hash) {
            Ok(())
        } else {
            Err(AccountError::BadCredentials)
        }
    }

    /// Issues a one-time link code for a new device of `user`; only the primary may. At most
    /// [`LINK_CODES_OUTSTANDING_MAX`] unexpired codes at once (else `RateLimited` until the
    /// oldest expires); `DeviceLimit` when the account is already full.
    pub fn issue_link_code(
        &self,
        user: UserId,
        device: DeviceId,
        now_ms: u64,
    ) -> Result<LinkCodeIssued, AccountError> {
        if device != PRIMARY_DEVICE {
            return Err(AccountError::Forbidden);
        }
        let _guard = self.lock(user);
        let account = self.load(user)?.ok_or(AccountError::NotFound)?;
        if account.device(PRIMARY_DEVICE).is_none() {
            return Err(AccountError::NotFound);
        }
        if account.devices.len() >= DEVICES_PER_USER_MAX {
            return Err(AccountError::DeviceLimit);
        }
        let prefix = self.link_prefix(user);
        // The service keeps at most LINK_CODES_OUTSTANDING_MAX records per user (expired ones
        // are deleted here before a new one is added), so this scan sees all of them.
        let existing = self.engine.scan(
            Cf::Verify,
            &prefix,
            &prefix_end(&prefix),
            LINK_CODES_OUTSTANDING_MAX + 1,
        )?;
        let mut batch = WriteBatch::new();
        let mut live_expiries = Vec::new();
        for (k, v) in existing {
            let rec = LinkCodeRecord::decode(&v)?;
            if now_ms >= rec.expires_ms {
                batch.delete(Cf::Verify, k);
            } else {
                live_expiries.push(rec.expires_ms);
            }
        }
        if live_expiries.len() >= LINK_CODES_OUTSTANDING_MAX {
            let first_expiry = live_expiries.iter().copied().min().unwrap_or(now_ms);
            if !batch.is_empty() {
                self.engine.write(batch, true)?;
            }
            return Err(AccountError::RateLimited {
                retry_after_ms: first_expiry - now_ms,
            });
        }
        let code = new_link_code();
        let expires_ms = now_ms.saturating_add(self.config.link_code_ttl_ms);
        batch.put(
            Cf::Verify,
            self.link_key(user, &code),
            LinkCodeRecord { expires_ms }.encode(),
        );
        self.engine.write(batch, true)?;
        Ok(LinkCodeIssued {
            code,
            expires_in_ms: clamp_u32(self.config.link_code_ttl_ms),
        })
    }

    /// Links a new device to `user` with a code from [`Accounts::issue_link_code`] (case and
    /// surrounding spaces ignored). The code is consumed on success; a code that fails with
    /// `DeviceLimit` stays valid. Device ids count up and are never reused within an account.
    pub fn link(
        &self,
        user: UserId,
        code: &str,
        device_name: &str,
        now_ms: u64,
    ) -> Result<(DeviceId, Token), AccountError> {
        check_len("code", code, STRING_BYTES_MAX)?;
        check_len("device name", device_name, STRING_BYTES_MAX)?;
        let code = code.trim().to_ascii_uppercase();
        if code.len() != LINK_CODE_CHARS {
            return Err(AccountError::VerificationFailed);
        }
        let _guard = self.lock(user);
        let link_key = self.link_key(user, &code);
        let rec = match self.engine.get(Cf::Verify, &link_key)? {
            Some(v) => LinkCodeRecord::decode(&v)?,
            None => return Err(AccountError::VerificationFailed),
        };
        if now_ms >= rec.expires_ms {
            let mut batch = WriteBatch::new();
            batch.delete(Cf::Verify, link_key);
            self.engine.write(batch, true)?;
            return Err(AccountError::VerificationExpired);
        }
        let mut account = self.load(user)?.ok_or(AccountError::NotFound)?;
        if account.devices.len() >= DEVICES_PER_USER_MAX {
            return Err(AccountError::DeviceLimit);
        }
        let id = account.next_device;
        account.next_device = id.checked_add(1).ok_or(AccountError::LimitExceeded(
            "device ids of this account are exhausted",
        ))?;
        let token = Token::generate();
        account.devices.push(DeviceRecord {
            id,
            token_hash: token.hash(),
            created_ms: now_ms,
            name: device_name.to_owned(),
        });
        let mut batch = WriteBatch::new();
        batch.put(Cf::Accounts, self.account_key(user), account.encode());
        batch.delete(Cf::Verify, link_key);
        self.engine.write(batch, true)?;
        self.cache.invalidate(user);
        Ok((id, token))
    }

    /// Removes `target` from `user`'s account, revoking its token: the primary may remove any
    /// linked device, a linked device only itself; the primary cannot be removed (registering
    /// again replaces it). The caller then drops the device's inbox and prekeys.
    pub fn remove_device(
        &self,
        user: UserId,
        by_device: DeviceId,
        target: DeviceId,
    ) -> Result<(), AccountError> {
        if target == PRIMARY_DEVICE || (by_device != PRIMARY_DEVICE && by_device != target) {
            return Err(AccountError::Forbidden);
        }
        let _guard = self.lock(user);
        let mut account = self.load(user)?.ok_or(AccountError::NotFound)?;
        if account.device(by_device).is_none() {
            return Err(AccountError::Forbidden);
        }
        let before = account.devices.len();
        account.devices.retain(|d| d.id != target);
        if account.devices.len() == before {
            return Err(AccountError::NotFound);
        }
        let mut batch = WriteBatch::new();
        batch.put(Cf::Accounts, self.account_key(user), account.encode());
        self.delete_push_token(&mut batch, user, target);
        self.engine.write(batch, true)?;
        self.cache.invalidate(user);
        Ok(())
    }

    /// Sets the registration-lock PIN (only the primary may); an empty `pin` clears the lock.
    /// PINs are [`PIN_BYTES_MIN`]..=[`PIN_BYTES_MAX`] bytes, stored as Argon2id hashes (one
    /// hash per call, see [`PinParams`]).
    pub fn set_registration_lock(
        &self,
        user: UserId,
        device: DeviceId,
        pin: &str,
    ) -> Result<(), AccountError> {
        if device != PRIMARY_DEVICE {
            return Err(AccountError::Forbidden);
        }
        check_len("PIN", pin, PIN_BYTES_MAX)?;
        let lock = if pin.is_empty() {
            None
        } else if pin.len() < PIN_BYTES_MIN {
            return Err(AccountError::LimitExceeded("PIN shorter than 4 bytes"));
        } else {
            // Hashed before taking the stripe lock: it is the slow part.
            let _permit = self.pin_permit()?;
            Some(PinHash::create(pin, self.config.pin_params)?)
        };
        let _guard = self.lock(user);
        let mut account = self.load(user)?.ok_or(AccountError::NotFound)?;
        if account.device(PRIMARY_DEVICE).is_none() {
            return Err(AccountError::NotFound);
        }
        account.lock = lock;
        account.pin_failures = 0;
        account.pin_window_start_ms = 0;
        let mut batch = WriteBatch::new();
        batch.put(Cf::Accounts, self.account_key(user), account.encode());
        self.engine.write(batch, true)?;
        Ok(())
    }

    /// The devices of `user`, ascending (`NotFound` if the number is not registered). Served
    /// from a bounded cache ([`AccountsConfig::device_cache_capacity`]) that every change made
    /// through this service invalidates.
    pub fn devices(&self, user: UserId) -> Result<Vec<DeviceId>, AccountError> {
        if let Some(set) = self.cache.get(user) {
            return Ok(set.as_slice().to_vec());
        }
        let generation = self.cache.generation(user);
        let account = self.load(user)?.ok_or(AccountError::NotFound)?;
        let ids = account.device_ids();
        self.cache.fill(user, DeviceSet::new(&ids), generation);
        Ok(ids)
    }

    /// Empties the device-list cache. Call it when this node gains ownership of shards: while
    /// another node owned them, accounts may have changed without this node's knowledge.
    pub fn clear_device_cache(&self) {
        self.cache.clear();
    }

    /// Forgets the cached device lists of `shard`'s users, after a hand-off imported or dropped
    /// the shard's accounts behind this service's back (see [`crate::handoff`]). A lookup
    /// racing with the call cannot re-insert a list it read before. Visits every cache slot.
    pub fn forget_cached_shard(&self, shard: ShardId) {
        let shard_count = self.config.shard_count;
        self.cache
            .forget_where(|user| shard_of(user, shard_count) == shard);
    }

    /// Deletes verification state of `shard` that no longer matters: pending codes that are
    /// used or expired and whose throttles have lapsed, and expired link codes. Looks at up to
    /// `scan_limit` records starting at `resume_from` (from a previous [`Sweep`], or `None`
    /// to start the shard); run it from a maintenance task until `resume_from` is `None`.
    /// Corrupt records are logged and left alone.
    pub fn sweep_expired(
        &self,
        shard: ShardId,
        resume_from: Option<&[u8]>,
        now_ms: u64,
        scan_limit: usize,
    ) -> Result<Sweep, AccountError> {
        let start = key(shard, &[]);
        let end = prefix_end(&start);
        let from = resume_from
            .map(<[u8]>::to_vec)
            .unwrap_or_else(|| start.clone());
        let rows = self
            .engine
            .scan(Cf::Verify, &from, &end, scan_limit.max(1))?;
        let resume_from = match rows.last() {
            Some((last, _)) if rows.len() >= scan_limit.max(1) => {
                let mut next = last.clone();
                next.push(0);
                Some(next)
            }
            _ => None,
        };
        let mut removed = 0;
        for (k, _) in rows {
            let Some(user) = k
                .get(2..10)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            // Re-read under the user's lock: the record may have changed since the scan.
            let _guard = self.lock(user);
            let Some(v) = self.engine.get(Cf::Verify, &k)? else {
                continue;
            };
            let expired = if k.len() == 10 {
                PendingCode::decode(&v).map(|p| {
                    let code_done = !p.live || now_ms >= p.expires_ms;
                    let throttle_done = now_ms
                        >= p.sent_ms
                            .saturating_add(self.config.code_resend_interval_ms)
                        && now_ms >= p.window_start_ms.saturating_add(CODE_SEND_WINDOW_MS);
                    code_done && throttle_done
                })
            } else {
                LinkCodeRecord::decode(&v).map(|l| now_ms >= l.expires_ms)
            };
            match expired {
                Ok(true) => {
                    let mut batch = WriteBatch::new();
                    batch.delete(Cf::Verify, k);
                    self.engine.write(batch, false)?;
                    removed += 1;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(shard, error = %e, "corrupt verification record"),
            }
        }
        Ok(Sweep {
            removed,
            resume_from,
        })
    }

    fn shard(&self, user: UserId) -> ShardId {
        shard_of(user, self.config.shard_count)
    }

    fn account_key(&self, user: UserId) -> Vec<u8> {
        key(self.shard(user), &[&user.to_be_bytes()])
    }

    fn pending_key(&self, phone: UserId) -> Vec<u8> {
        key(self.shard(phone), &[&phone.to_be_bytes()])
    }

    fn link_prefix(&self, user: UserId) -> Vec<u8> {
        key(self.shard(user), &[&user.to_be_bytes(), &[0xff]])
    }

    fn link_key(&self, user: UserId, code: &str) -> Vec<u8> {
        let user_be = user.to_be_bytes();
        let digest = sha256_parts(&[&user_be, code.as_bytes()]);
        key(self.shard(user), &[&user_be, &[0xff], &digest[..16]])
    }

    fn load(&self, user: UserId) -> Result<Option<AccountRecord>, AccountError> {
        match self.engine.get(Cf::Accounts, &self.account_key(user))? {
            Some(v) => Ok(Some(AccountRecord::decode(&v)?)),
            None => Ok(None),
        }
    }

    fn load_pending(&self, phone: UserId) -> Result<Option<PendingCode>, AccountError> {
        match self.engine.get(Cf::Verify, &self.pending_key(phone))? {
            Some(v) => Ok(Some(PendingCode::decode(&v)?)),
            None => Ok(None),
        }
    }

    fn lock(&self, user: UserId) -> MutexGuard<'_, ()> {
        let i = (user.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize % self.stripes.len();
        // The mutex guards no data, only ordering: a poisoned one is still usable.
        self.stripes[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pin_permit(&self) -> Result<PinPermit<'_>, AccountError> {
        let before = self.pin_hashes_in_flight.fetch_add(1, Ordering::AcqRel);
        let permit = PinPermit(&self.pin_hashes_in_flight);
        if before >= PIN_HASHES_IN_FLIGHT_MAX {
            drop(permit);
            return Err(AccountError::RateLimited {
                retry_after_ms: PIN_BUSY_RETRY_AFTER_MS,
            });
        }
        Ok(permit)
    }
}

/// One of [`PIN_HASHES_IN_FLIGHT_MAX`] Argon2 slots, released on drop.
struct PinPermit<'a>(&'a AtomicUsize);

impl Drop for PinPermit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn check_phone(phone: UserId) -> Result<(), AccountError> {
    if phone == 0 || phone > PHONE_MAX {
        Err(AccountError::InvalidPhone)
    } else {
        Ok(())
    }
}

fn check_len(what: &'static str, s: &str, max_bytes: usize) -> Result<(), AccountError> {
    if s.len() > max_bytes {
        Err(AccountError::TooLong { what, max_bytes })
    } else {
        Ok(())
    }
}

fn code_hash(phone: UserId, code: &str) -> token::Hash32 {
    sha256_parts(&[&phone.to_be_bytes(), code.as_bytes()])
}

/// RFC 4648 base32 alphabet (no 0/1/8/9, so no O/0 or I/1 confusion).
const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

fn new_link_code() -> String {
    let mut bytes = [0u8; LINK_CODE_CHARS];
    OsRng.fill_bytes(&mut bytes);
    // 256 is a multiple of 32, so `b % 32` is uniform.
    bytes
        .iter()
        .map(|b| char::from(BASE32[usize::from(b % 32)]))
        .collect()
}

fn clamp_u32(ms: u64) -> u32 {
    u32::try_from(ms).unwrap_or(u32::MAX)
}
