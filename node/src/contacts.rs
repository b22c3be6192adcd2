//! The contacts shard service: each user's contact list, block list, privacy settings (who may
//! see its last-seen time and that it is online) and persisted last-seen time, kept on the
//! user's owner shard.
//!
//! Storage, contacts family ([`Cf::Contacts`]), every key led by the user's shard:
//! - `shard | user | 0x00` → the [`Settings`] record: visibilities, list sizes, last seen;
//! - `shard | user | 0x01 | contact` → empty: `contact` is in the user's contact list;
//! - `shard | user | 0x02 | blocked` → empty: the user blocks `blocked`.
//!
//! One row per listed user makes [`Contacts::is_contact`] and [`Contacts::is_blocked`] one point
//! read. The lists are bounded by [`CONTACTS_MAX`] and [`BLOCKED_MAX`] (the sizes are kept in
//! the settings record). Every read-modify-write of one user runs under one of
//! [`LOCK_STRIPES`] mutexes chosen by the user id; like the accounts service, only the shard's
//! owner writes these rows, and within the node only this service writes this family.

use std::sync::{Arc, Mutex, MutexGuard};

use ringpost_wire::limits::{BLOCKED_MAX, CONTACTS_MAX};
use ringpost_wire::{ContactsUpdate, ErrorCode, UserId, Visibility};

use crate::shard::{shard_of, ShardId};
use crate::storage::{key, prefix_end, Cf, Engine, StorageError, WriteBatch};

/// Mutexes serialising writes per user (chosen by user id).
pub const LOCK_STRIPES: usize = 64;

const SETTINGS: u8 = 0x00;
const CONTACT: u8 = 0x01;
const BLOCKED: u8 = 0x02;
/// Bytes of an encoded [`Settings`]: version, two visibilities, two counts, last seen.
const SETTINGS_BYTES: usize = 1 + 1 + 1 + 4 + 4 + 8;
const SETTINGS_VERSION: u8 = 1;

/// Why a contacts operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ContactsError {
    /// The change would take a list past its bound.
    #[error("{0}")]
    LimitExceeded(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ContactsError {
    /// The client protocol's code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ContactsError::LimitExceeded(_) => ErrorCode::LimitExceeded,
            ContactsError::Storage(_) => ErrorCode::Internal,
        }
    }
}

/// A user's privacy settings and last-seen time. A user without a record has the defaults:
/// both visible to everyone, never seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub last_seen: Visibility,
    pub online: Visibility,
    pub contacts: u32,
    pub blocked: u32,
    /// When the user's last device went offline (ms since the Unix epoch); 0: never.
    pub last_seen_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            last_seen: Visibility::Everyone,
            online: Visibility::Everyone,
            contacts: 0,
            blocked: 0,
            last_seen_ms: 0,
        }
    }
}

fn visibility(b: u8) -> Option<Visibility> {
    match b {
        0 => Some(Visibility::Everyone),
        1 => Some(Visibility::Contacts),
        2 => Some(Visibility::Nobody),
        _ => None,
    }
}

impl Settings {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(SETTINGS_BYTES);
        v.push(SETTINGS_VERSION);
        v.push(self.last_seen as u8);
        v.push(self.online as u8);
        v.extend_from_slice(&self.contacts.to_be_bytes());
        v.extend_from_slice(&self.blocked.to_be_bytes());
        v.extend_from_slice(&self.last_seen_ms.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Result<Settings, StorageError> {
        let corrupt = |detail: &str| StorageError::Corrupt {
            cf: Cf::Contacts.name(),
            detail: detail.to_string(),
        };
        if v.len() != SETTINGS_BYTES || v[0] != SETTINGS_VERSION {
            return Err(corrupt("settings record of the wrong length or version"));
        }
        let u32_at = |i: usize| u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
        let mut ms = [0u8; 8];
        ms.copy_from_slice(&v[11..19]);
        Ok(Settings {
            last_seen: visibility(v[1]).ok_or_else(|| corrupt("unknown visibility"))?,
            online: visibility(v[2]).ok_or_else(|| corrupt("unknown visibility"))?,
            contacts: u32_at(3),
            blocked: u32_at(7),
            last_seen_ms: u64::from_be_bytes(ms),
        })
    }
}

/// What `viewer` may see of a user's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    pub online: bool,
    pub last_seen: bool,
}

/// The contacts service of one node (see the module doc).
pub struct Contacts {
    engine: Arc<dyn Engine>,
    shard_count: u16,
    stripes: Vec<Mutex<()>>,
}

impl Contacts {
    pub fn new(engine: Arc<dyn Engine>, shard_count: u16) -> Contacts {
        Contacts {
            engine,
            shard_count,
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    fn shard(&self, user: UserId) -> ShardId {
        shard_of(user, self.shard_count)
    }

    fn lock(&self, user: UserId) -> MutexGuard<'_, ()> {
        let i = (user % LOCK_STRIPES as u64) as usize;
        self.stripes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn settings_key(&self, user: UserId) -> Vec<u8> {
        key(self.shard(user), &[&user.to_be_bytes(), &[SETTINGS]])
    }

    fn row_key(&self, user: UserId, kind: u8, other: UserId) -> Vec<u8> {
        key(
            self.shard(user),
            &[&user.to_be_bytes(), &[kind], &other.to_be_bytes()],
        )
    }

    /// `user`'s settings (the defaults if it never set any).
    pub fn settings(&self, user: UserId) -> Result<Settings, StorageError> {
        match self.engine.get(Cf::Contacts, &self.settings_key(user))? {
            Some(v) => Settings::decode(&v),
            None => Ok(Settings::default()),
        }
    }

    /// Whether `other` is in `user`'s contact list.
    pub fn is_contact(&self, user: UserId, other: UserId) -> Result<bool, StorageError> {
        Ok(self
            .engine
            .get(Cf::Contacts, &self.row_key(user, CONTACT, other))?
            .is_some())
    }

    /// Whether `blocker` blocks `blocked`. Read on `blocker`'s owner (group adds ask it too).
    pub fn is_blocked(&self, blocker: UserId, blocked: UserId) -> Result<bool, StorageError> {
        Ok(self
            .engine
            .get(Cf::Contacts, &self.row_key(blocker, BLOCKED, blocked))?
            .is_some())
    }

    /// `user`'s contact list, ascending.
    pub fn contacts(&self, user: UserId) -> Result<Vec<UserId>, StorageError> {
        self.list(user, CONTACT, CONTACTS_MAX)
    }

    /// The users `user` blocks, ascending.
    pub fn blocked(&self, user: UserId) -> Result<Vec<UserId>, StorageError> {
        self.list(user, BLOCKED, BLOCKED_MAX)
    }

    fn list(&self, user: UserId, kind: u8, max: usize) -> Result<Vec<UserId>, StorageError> {
        let from = key(self.shard(user), &[&user.to_be_bytes(), &[kind]]);
        let to = prefix_end(&from);
        let rows = self.engine.scan(Cf::Contacts, &from, &to, max)?;
        Ok(rows
            .iter()
            .filter_map(|(k, _)| {
                let tail: [u8; 8] = k.get(k.len().checked_sub(8)?..)?.try_into().ok()?;
                Some(u64::from_be_bytes(tail))
            })
            .collect())
    }

    /// What `viewer` may see of `user`'s presence: nothing if `user` blocks it; otherwise each
    /// of online and last seen by its visibility (Contacts: `viewer` is in `user`'s list). A
    /// user always sees itself.
    pub fn grant(&self, user: UserId, viewer: UserId) -> Result<Grant, StorageError> {
        if user == viewer {
            return Ok(Grant {
                online: true,
                last_seen: true,
            });
        }
        if self.is_blocked(user, viewer)? {
            return Ok(Grant::default());
        }
        let s = self.settings(user)?;
        let mut contact = None;
        let mut allowed = |v: Visibility| -> Result<bool, StorageError> {
            Ok(match v {
                Visibility::Everyone => true,
                Visibility::Nobody => false,
                Visibility::Contacts => match contact {
                    Some(c) => c,
                    None => {
                        let c = self.is_contact(user, viewer)?;
                        contact = Some(c);
                        c
                    }
                },
            })
        };
        Ok(Grant {
            online: allowed(s.online)?,
            last_seen: allowed(s.last_seen)?,
        })
    }

    /// Sets `user`'s visibilities (a synced write).
    pub fn set_privacy(
        &self,
        user: UserId,
        last_seen: Visibility,
        online: Visibility,
    ) -> Result<(), ContactsError> {
        let _g = self.lock(user);
        let mut s = self.settings(user)?;
        s.last_seen = last_seen;
        s.online = online;
        let mut batch = WriteBatch::new();
        batch.put(Cf::Contacts, self.settings_key(user), s.encode());
        self.engine.write(batch, true)?;
        Ok(())
    }

    /// Records when `user` was last seen (its last device went offline). Not synced: a lost
    /// last-seen time after a crash shows an older one, which is harmless.
    pub fn set_last_seen(&self, user: UserId, now_ms: u64) -> Result<(), StorageError> {
        let _g = self.lock(user);
        let mut s = self.settings(user)?;
        s.last_seen_ms = now_ms;
        let mut batch = WriteBatch::new();
        batch.put(Cf::Contacts, self.settings_key(user), s.encode());
        self.engine.write(batch, false)
    }

    /// Applies a `ContactsUpdate` of `user` atomically, in the order replace-or-add, remove,
    /// block, unblock (a synced write). Refused whole, changing nothing, if a list would grow
    /// past its bound. A user cannot list or block itself (such ids are ignored).
    pub fn update(&self, user: UserId, u: &ContactsUpdate) -> Result<(), ContactsError> {
        let _g = self.lock(user);
        let mut s = self.settings(user)?;
        let mut batch = WriteBatch::new();
        let mut contacts: std::collections::BTreeSet<UserId> = if u.replace {
            for c in self.contacts(user)? {
                batch.delete(Cf::Contacts, self.row_key(user, CONTACT, c));
            }
            Default::default()
        } else {
            self.contacts(user)?.into_iter().collect()
        };
        let before_contacts = contacts.clone();
        contacts.extend(u.add.iter().copied().filter(|&c| c != user));
        for r in &u.remove {
            contacts.remove(r);
        }
        if contacts.len() > CONTACTS_MAX {
            return Err(ContactsError::LimitExceeded(format!(
                "a contact list holds at most {CONTACTS_MAX} users"
            )));
        }
        let mut blocked: std::collections::BTreeSet<UserId> =
            self.blocked(user)?.into_iter().collect();
        let before_blocked = blocked.clone();
        blocked.extend(u.block.iter().copied().filter(|&b| b != user));
        for b in &u.unblock {
            blocked.remove(b);
        }
        if blocked.len() > BLOCKED_MAX {
            return Err(ContactsError::LimitExceeded(format!(
                "a block list holds at most {BLOCKED_MAX} users"
            )));
        }
        if !u.replace {
            for c in before_contacts.difference(&contacts) {
                batch.delete(Cf::Contacts, self.row_key(user, CONTACT, *c));
            }
        }
        let new_contacts: Vec<UserId> = if u.replace {
            contacts.iter().copied().collect()
        } else {
            contacts.difference(&before_contacts).copied().collect()
        };
        for c in new_contacts {
            batch.put(Cf::Contacts, self.row_key(user, CONTACT, c), Vec::new());
        }
        for b in before_blocked.difference(&blocked) {
            batch.delete(Cf::Contacts, self.row_key(user, BLOCKED, *b));
        }
        for b in blocked.difference(&before_blocked) {
            batch.put(Cf::Contacts, self.row_key(user, BLOCKED, *b), Vec::new());
        }
        // Bounded above by the list maxima, which fit in u32.
        s.contacts = contacts.len() as u32;
        s.blocked = blocked.len() as u32;
        batch.put(Cf::Contacts, self.settings_key(user), s.encode());
        self.engine.write(batch, true)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
