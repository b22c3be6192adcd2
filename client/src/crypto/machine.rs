//! [`Machine`]: one device's end-to-end encryption state, without IO. It holds the vodozemac
//! account, an Olm session list per peer device, the outbound Megolm session of each group we
//! send to and the inbound ones we were given, the device lists we encrypt for, and the ids of
//! messages already decrypted. [`crate::crypto::SecureClient`] drives it over a
//! [`crate::Client`] and persists [`Machine::to_bytes`] after every change.
//!
//! Every map keyed by something a peer chooses has a bound (the constants below); beyond it the
//! least recently used entry goes.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use bytes::Bytes;
use ringpost_wire::limits::{GROUP_CIPHERTEXT_BYTES_MAX, PREKEYS_PER_UPLOAD_MAX};
use ringpost_wire::{DeviceId, GroupId, MsgId, OneTimePrekey, PrekeyUpload, SignedPrekey, UserId};
use serde::{Deserialize, Serialize};
use vodozemac::megolm::{
    GroupSession, GroupSessionPickle, InboundGroupSession, InboundGroupSessionPickle,
    SessionConfig as MegolmConfig, SessionKey,
};
use vodozemac::olm::{Account, AccountPickle, OlmMessage, Session, SessionConfig, SessionPickle};
use vodozemac::Curve25519PublicKey;

use super::envelope::{self, Envelope, SESSION_ID_BYTES};
use super::error::{CryptoError, CryptoResult};
use super::prekeys::{self, VerifiedBundle, KIND_ONE_TIME, KIND_SIGNED};

/// Olm sessions kept per peer device, newest first (two devices that start sessions with each
/// other at once end up with two; older ones still decrypt late messages). About 1 KiB each.
pub const SESSIONS_PER_DEVICE_MAX: usize = 4;
/// Peer devices with Olm sessions. Worst case about 4 KiB each (four sessions).
pub const PEER_DEVICES_MAX: usize = 4096;
/// Inbound Megolm sessions (group, sender device, session). About 300 bytes each.
pub const INBOUND_GROUP_SESSIONS_MAX: usize = 4096;
/// Groups with an outbound Megolm session; beyond it the least recently used one is dropped
/// (and rotated on its next send). About 300 bytes plus the shared-with set each.
pub const OUTBOUND_GROUPS_MAX: usize = 1024;
/// Users whose device lists are cached. About 64 bytes each.
pub const DEVICE_LISTS_MAX: usize = 4096;
/// Messages remembered as decrypted, so a redelivery after a restart (the node redelivers what
/// was not acknowledged) is recognised and not decrypted twice. 40 bytes each.
pub const SEEN_MAX: usize = 4096;
/// Version of the persisted state.
pub const SNAPSHOT_FORMAT: u32 = 1;
/// How long a fallback (signed) prekey stays published before the SDK replaces it
/// ([`Machine::rotate_fallback_if_due`]). vodozemac keeps the previous fallback key's secret
/// beside the new one, so a session a peer starts from the old bundle still opens.
pub const FALLBACK_KEY_MAX_AGE_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// Which delivered message a [`SeenKey`] is about.
pub const SEEN_DIRECT: u8 = 1;
/// A group message (scoped by sending device and `msg_id`, as the node scopes group msg_ids).
pub const SEEN_GROUP: u8 = 2;

/// A message already decrypted: (kind, sender user, sender device, msg_id).
pub type SeenKey = (u8, UserId, DeviceId, MsgId);

/// When an outbound group session is replaced by a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    /// After this many messages.
    pub messages_max: u32,
    /// After this long, in milliseconds.
    pub age_ms_max: u64,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        RotationPolicy {
            messages_max: 100,
            age_ms_max: 7 * 24 * 3600 * 1000,
        }
    }
}

/// A decrypted 1:1 message.
#[derive(Debug)]
pub struct Decrypted {
    pub envelope: Envelope,
    /// The message started a new inbound session (a pre-key message): one of our one-time keys
    /// may have been used up.
    pub new_session: bool,
}

struct Peer {
    /// The peer device's Curve25519 identity key, from its verified bundle or (trust on first
    /// use) from its first pre-key message.
    identity: Option<[u8; 32]>,
    /// Newest (most recently used to receive or created) first.
    sessions: Vec<Session>,
    used: u64,
}

struct Outbound {
    session: GroupSession,
    session_id: [u8; SESSION_ID_BYTES],
    created_at_ms: u64,
    messages: u32,
    /// The group's members when the session was made: any change rotates it.
    members: BTreeSet<UserId>,
    /// Devices that were sent this session's key.
    shared_with: BTreeSet<(UserId, DeviceId)>,
    used: u64,
}

struct Inbound {
    session: InboundGroupSession,
    used: u64,
}

/// (group, sender user, sender device, session id).
type InboundKey = (GroupId, UserId, DeviceId, [u8; SESSION_ID_BYTES]);

/// A cached device list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceList {
    pub devices: Vec<DeviceId>,
    pub fetched_at_ms: u64,
}

/// One device's end-to-end encryption state. See the module documentation.
pub struct Machine {
    user: UserId,
    device: DeviceId,
    account: Account,
    next_key_id: u32,
    /// Ids given to one-time keys generated but not yet known to be published.
    unpublished_ids: BTreeMap<[u8; 32], u32>,
    /// The signed (fallback) prekey: its id and key.
    fallback: Option<(u32, [u8; 32])>,
    fallback_published: bool,
    /// When the fallback key was first seen published (ms since the epoch; 0: not yet).
    fallback_since_ms: u64,
    peers: BTreeMap<(UserId, DeviceId), Peer>,
    devices: BTreeMap<UserId, DeviceList>,
    outbound: BTreeMap<GroupId, Outbound>,
    inbound: BTreeMap<InboundKey, Inbound>,
    seen: VecDeque<SeenKey>,
    seen_set: HashSet<SeenKey>,
    clock: u64,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("user", &self.user)
            .field("device", &self.device)
            .field("peers", &self.peers.len())
            .field("outbound", &self.outbound.len())
            .field("inbound", &self.inbound.len())
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// A new device identity for `user`'s `device`.
    pub fn new(user: UserId, device: DeviceId) -> Machine {
        Machine {
            user,
            device,
            account: Account::new(),
            next_key_id: 1,
            unpublished_ids: BTreeMap::new(),
            fallback: None,
            fallback_published: false,
            fallback_since_ms: 0,
            peers: BTreeMap::new(),
            devices: BTreeMap::new(),
            outbound: BTreeMap::new(),
            inbound: BTreeMap::new(),
            seen: VecDeque::new(),
            seen_set: HashSet::new(),
            clock: 0,
        }
    }

    pub fn user(&self) -> UserId {
        self.user
    }

    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The 64-byte identity key this device publishes (Ed25519 then Curve25519).
    pub fn identity_key(&self) -> [u8; prekeys::IDENTITY_KEY_BYTES] {
        prekeys::identity_key_bytes(&self.account)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn take_key_id(&mut self) -> u32 {
        let id = self.next_key_id;
        // Ids wrap after 4 billion keys; the node replaces a stored key with the same id.
        self.next_key_id = self.next_key_id.checked_add(1).unwrap_or(1);
        id
    }

    // -----------------------------------------------------------------------------------------
    // Prekeys
    // -----------------------------------------------------------------------------------------

    /// Whether some keys are not yet known to be published.
    pub fn has_unpublished_keys(&self) -> bool {
        !self.fallback_published || !self.unpublished_ids.is_empty()
    }

    /// Generates `count` more one-time keys (and the signed prekey, the first time) and returns
    /// the upload that publishes every key not yet known to be published, signed. Call
    /// [`Machine::mark_published`] once the node said `Done`; until then a repeat returns the
    /// same keys under the same ids (so a lost answer never publishes a key twice).
    pub fn prekey_upload(&mut self, count: usize) -> PrekeyUpload {
        let room = PREKEYS_PER_UPLOAD_MAX.saturating_sub(self.unpublished_ids.len());
        let count = count.min(room);
        if count > 0 {
            self.account.generate_one_time_keys(count);
        }
        if self.fallback.is_none() {
            self.account.generate_fallback_key();
            if let Some((_, key)) = self.account.fallback_key().into_iter().next() {
                let id = self.take_key_id();
                self.fallback = Some((id, key.to_bytes()));
                self.fallback_published = false;
            }
        }
        let mut fresh: Vec<_> = self.account.one_time_keys().into_iter().collect();
        fresh.sort_by_key(|(key_id, _)| *key_id);
        for (_, key) in fresh {
            if !self.unpublished_ids.contains_key(key.as_bytes()) {
                let id = self.take_key_id();
                self.unpublished_ids.insert(key.to_bytes(), id);
            }
        }
        let one_time = self
            .unpublished_ids
            .iter()
            .map(|(key, &id)| {
                let public = Curve25519PublicKey::from_bytes(*key);
                OneTimePrekey {
                    id,
                    key: Bytes::copy_from_slice(key),
                    signature: Bytes::copy_from_slice(&prekeys::sign_prekey(
                        &self.account,
                        KIND_ONE_TIME,
                        id,
                        &public,
                    )),
                }
            })
            .collect();
        let signed_prekey = self.fallback.map(|(id, key)| {
            let public = Curve25519PublicKey::from_bytes(key);
            SignedPrekey {
                id,
                key: Bytes::copy_from_slice(&key),
                signature: Bytes::copy_from_slice(&prekeys::sign_prekey(
                    &self.account,
                    KIND_SIGNED,
                    id,
                    &public,
                )),
            }
        });
        PrekeyUpload {
            identity_key: Bytes::copy_from_slice(&self.identity_key()),
            signed_prekey,
            one_time,
        }
    }

    /// Replaces the fallback (signed) prekey once it has been published for `max_age_ms`
    /// (the age counts from the first call that finds it published); true if it did: publish
    /// the next [`Machine::prekey_upload`]. The old key's secret is kept (by vodozemac) for
    /// sessions started from it.
    pub fn rotate_fallback_if_due(&mut self, now_ms: u64, max_age_ms: u64) -> bool {
        if self.fallback.is_none() || !self.fallback_published {
            return false;
        }
        if self.fallback_since_ms == 0 {
            self.fallback_since_ms = now_ms.max(1);
            return false;
        }
        if now_ms.saturating_sub(self.fallback_since_ms) < max_age_ms {
            return false;
        }
        self.account.generate_fallback_key();
        let Some((_, key)) = self.account.fallback_key().into_iter().next() else {
            return false;
        };
        let id = self.take_key_id();
        self.fallback = Some((id, key.to_bytes()));
        self.fallback_published = false;
        self.fallback_since_ms = 0;
        true
    }

    /// The node stored the last [`Machine::prekey_upload`].
    pub fn mark_published(&mut self) {
        self.account.mark_keys_as_published();
        self.unpublished_ids.clear();
        self.fallback_published = true;
    }

    // -----------------------------------------------------------------------------------------
    // Olm (1:1)
    // -----------------------------------------------------------------------------------------

    /// Whether we can encrypt for this device now.
    pub fn has_session(&self, user: UserId, device: DeviceId) -> bool {
        self.peers
            .get(&(user, device))
            .is_some_and(|p| !p.sessions.is_empty())
    }

    /// Starts an outbound session from a verified bundle; it becomes the one we encrypt with. A
    /// different identity key than we knew for the device replaces its sessions (the device was
    /// set up again).
    pub fn start_session(&mut self, user: UserId, bundle: &VerifiedBundle) -> CryptoResult<()> {
        let session = self
            .account
            .create_outbound_session(
                SessionConfig::version_1(),
                bundle.identity_key,
                bundle.prekey,
            )
            .map_err(|e| CryptoError::Olm(e.to_string()))?;
        let used = self.tick();
        let peer = self.peer_mut(user, bundle.device, used);
        let identity = bundle.identity_key.to_bytes();
        if peer.identity.is_some_and(|known| known != identity) {
            peer.sessions.clear();
        }
        peer.identity = Some(identity);
        peer.sessions.insert(0, session);
        peer.sessions.truncate(SESSIONS_PER_DEVICE_MAX);
        Ok(())
    }

    /// The server announced a new identity key for `user`'s `device` (an `IdentityChanged`
    /// event; `identity_key` is the 64-byte published form). If it is not the Curve25519 key
    /// we know for the device, its Olm sessions are dropped (the next message to it starts one
    /// from a freshly claimed, verified bundle) and every current group session is shared with
    /// it again; true then. A key of the wrong length changes nothing.
    pub fn identity_changed(
        &mut self,
        user: UserId,
        device: DeviceId,
        identity_key: &[u8],
    ) -> bool {
        if identity_key.len() != prekeys::IDENTITY_KEY_BYTES {
            return false;
        }
        let mut curve = [0u8; 32];
        curve.copy_from_slice(&identity_key[32..]);
        let Some(peer) = self.peers.get_mut(&(user, device)) else {
            return false;
        };
        if peer.identity == Some(curve) {
            return false;
        }
        peer.sessions.clear();
        peer.identity = None;
        for out in self.outbound.values_mut() {
            out.shared_with.remove(&(user, device));
        }
        true
    }

    fn peer_mut(&mut self, user: UserId, device: DeviceId, used: u64) -> &mut Peer {
        if !self.peers.contains_key(&(user, device)) && self.peers.len() >= PEER_DEVICES_MAX {
            if let Some(oldest) = self
                .peers
                .iter()
                .min_by_key(|(_, p)| p.used)
                .map(|(k, _)| *k)
            {
                self.peers.remove(&oldest);
            }
        }
        let peer = self.peers.entry((user, device)).or_insert_with(|| Peer {
            identity: None,
            sessions: Vec::new(),
            used,
        });
        peer.used = used;
        peer
    }

    /// Encrypts an envelope for one device (a session must exist: [`Machine::has_session`]).
    pub fn encrypt(
        &mut self,
        user: UserId,
        device: DeviceId,
        envelope: &Envelope,
    ) -> CryptoResult<Bytes> {
        let used = self.tick();
        let peer = self
            .peers
            .get_mut(&(user, device))
            .ok_or(CryptoError::NoPrekeys { user, device })?;
        peer.used = used;
        let session = peer
            .sessions
            .first_mut()
            .ok_or(CryptoError::NoPrekeys { user, device })?;
        let message = session
            .encrypt(envelope.encode())
            .map_err(|e| CryptoError::Olm(e.to_string()))?;
        Ok(envelope::encode_olm(&message))
    }

    /// Decrypts a 1:1 ciphertext from `user`'s `device`. A pre-key message for no session we
    /// know starts one (using up the one-time key it names).
    pub fn decrypt(
        &mut self,
        user: UserId,
        device: DeviceId,
        body: &[u8],
    ) -> Result<Decrypted, String> {
        let message = envelope::decode_olm(body)?;
        let used = self.tick();
        if let Some(peer) = self.peers.get_mut(&(user, device)) {
            peer.used = used;
            let prekey_session = match &message {
                OlmMessage::PreKey(m) => Some(m.session_id()),
                OlmMessage::Normal(_) => None,
            };
            for i in 0..peer.sessions.len() {
                if prekey_session
                    .as_ref()
                    .is_some_and(|id| *id != peer.sessions[i].session_id())
                {
                    continue;
                }
                match peer.sessions[i].decrypt(&message) {
                    Ok(plaintext) => {
                        // The session the peer last used is the one we answer on.
                        let session = peer.sessions.remove(i);
                        peer.sessions.insert(0, session);
                        return Ok(Decrypted {
                            envelope: Envelope::decode(&plaintext)?,
                            new_session: false,
                        });
                    }
                    // A pre-key message of a session we have must decrypt with it: starting
                    // the session again (from the fallback key, which stays) would accept a
                    // replay.
                    Err(e) if prekey_session.is_some() => return Err(e.to_string()),
                    Err(_) => {}
                }
            }
        }
        let OlmMessage::PreKey(prekey) = &message else {
            return Err("no Olm session with this device decrypts the message".to_string());
        };
        let identity = prekey.identity_key();
        let created = self
            .account
            .create_inbound_session(SessionConfig::version_1(), identity, prekey)
            .map_err(|e| e.to_string())?;
        let envelope = Envelope::decode(&created.plaintext)?;
        let peer = self.peer_mut(user, device, used);
        if peer
            .identity
            .is_some_and(|known| known != identity.to_bytes())
        {
            peer.sessions.clear();
        }
        peer.identity = Some(identity.to_bytes());
        peer.sessions.insert(0, created.session);
        peer.sessions.truncate(SESSIONS_PER_DEVICE_MAX);
        Ok(Decrypted {
            envelope,
            new_session: true,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Device lists
    // -----------------------------------------------------------------------------------------

    pub fn device_list(&self, user: UserId) -> Option<&DeviceList> {
        self.devices.get(&user)
    }

    pub fn set_device_list(&mut self, user: UserId, devices: Vec<DeviceId>, now_ms: u64) {
        if !self.devices.contains_key(&user) && self.devices.len() >= DEVICE_LISTS_MAX {
            if let Some(oldest) = (self.devices.iter())
                .filter(|(u, _)| **u != self.user)
                .min_by_key(|(_, l)| l.fetched_at_ms)
                .map(|(u, _)| *u)
            {
                self.devices.remove(&oldest);
            }
        }
        self.devices.insert(
            user,
            DeviceList {
                devices,
                fetched_at_ms: now_ms,
            },
        );
    }

    /// Applies a `MismatchedDevices` answer to the cached list of `user`.
    pub fn apply_mismatch(
        &mut self,
        user: UserId,
        missing: &[DeviceId],
        extra: &[DeviceId],
        now_ms: u64,
    ) {
        let mut devices: BTreeSet<DeviceId> = self
            .devices
            .get(&user)
            .map(|l| l.devices.iter().copied().collect())
            .unwrap_or_default();
        devices.extend(missing.iter().copied());
        for d in extra {
            devices.remove(d);
        }
        self.set_device_list(user, devices.into_iter().collect(), now_ms);
    }

    // -----------------------------------------------------------------------------------------
    // Megolm (groups)
    // -----------------------------------------------------------------------------------------

    /// Makes sure `group` has an outbound session fit to send with to `members` now: a new one
    /// if there is none, the members changed, or the policy says it is used up. `true` if a new
    /// one was made.
    pub fn prepare_outbound(
        &mut self,
        group: GroupId,
        members: &BTreeSet<UserId>,
        now_ms: u64,
        policy: RotationPolicy,
    ) -> bool {
        let used = self.tick();
        if let Some(out) = self.outbound.get_mut(&group) {
            let expired = out.messages >= policy.messages_max
                || now_ms.saturating_sub(out.created_at_ms) >= policy.age_ms_max;
            if !expired && out.members == *members {
                out.used = used;
                return false;
            }
        }
        if !self.outbound.contains_key(&group) && self.outbound.len() >= OUTBOUND_GROUPS_MAX {
            if let Some(oldest) = (self.outbound.iter())
                .min_by_key(|(_, o)| o.used)
                .map(|(g, _)| *g)
            {
                self.outbound.remove(&oldest);
            }
        }
        let session = GroupSession::new(MegolmConfig::version_1());
        let session_id = envelope::session_id_bytes(&session.session_id()).unwrap_or_default();
        self.outbound.insert(
            group,
            Outbound {
                session,
                session_id,
                created_at_ms: now_ms,
                messages: 0,
                members: members.clone(),
                shared_with: BTreeSet::new(),
                used,
            },
        );
        true
    }

    /// Forgets the outbound session of `group` (membership changed): the next send makes a new
    /// one.
    pub fn drop_outbound(&mut self, group: &GroupId) -> bool {
        self.outbound.remove(group).is_some()
    }

    /// The envelope that hands the current outbound session of `group` to a member device.
    pub fn group_key_envelope(&self, group: GroupId) -> Option<Envelope> {
        let out = self.outbound.get(&group)?;
        Some(Envelope::GroupKey {
            group,
            session_key: out.session.session_key().to_bytes(),
        })
    }

    /// Whether the current outbound session of `group` was sent to this device.
    pub fn shared_with(&self, group: &GroupId, user: UserId, device: DeviceId) -> bool {
        self.outbound
            .get(group)
            .is_some_and(|o| o.shared_with.contains(&(user, device)))
    }

    /// Records that these devices were sent the current outbound session of `group`.
    pub fn mark_shared(
        &mut self,
        group: &GroupId,
        devices: impl IntoIterator<Item = (UserId, DeviceId)>,
    ) {
        if let Some(out) = self.outbound.get_mut(group) {
            out.shared_with.extend(devices);
        }
    }

    /// Encrypts a group message with the outbound session of `group`
    /// ([`Machine::prepare_outbound`] first).
    pub fn group_encrypt(&mut self, group: &GroupId, plaintext: &[u8]) -> CryptoResult<Bytes> {
        // Megolm adds a 1-byte version, varint-framed index and ciphertext (AES-CBC padding up
        // to 16), an 8-byte MAC and a 64-byte signature; our header adds 33.
        let max = GROUP_CIPHERTEXT_BYTES_MAX - 256;
        if plaintext.len() > max {
            return Err(CryptoError::TooLong {
                len: plaintext.len(),
                max,
            });
        }
        let out = self
            .outbound
            .get_mut(group)
            .ok_or_else(|| CryptoError::Olm("no outbound group session".to_string()))?;
        let message = out.session.encrypt(plaintext);
        out.messages = out.messages.saturating_add(1);
        Ok(envelope::encode_group(&out.session_id, &message))
    }

    /// Stores a group session key a member device sent us over Olm.
    pub fn add_inbound(
        &mut self,
        group: GroupId,
        user: UserId,
        device: DeviceId,
        session_key: &[u8],
    ) -> Result<(), String> {
        let key = SessionKey::from_bytes(session_key).map_err(|e| e.to_string())?;
        let session = InboundGroupSession::new(&key, MegolmConfig::version_1());
        let session_id = envelope::session_id_bytes(&session.session_id())
            .ok_or_else(|| "session id is not 32 bytes".to_string())?;
        let used = self.tick();
        let slot = (group, user, device, session_id);
        if !self.inbound.contains_key(&slot) && self.inbound.len() >= INBOUND_GROUP_SESSIONS_MAX {
            if let Some(oldest) = self
                .inbound
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| *k)
            {
                self.inbound.remove(&oldest);
            }
        }
        // A key for a session we already hold (a resend) keeps the one we have: it may know
        // earlier message indexes.
        self.inbound
            .entry(slot)
            .or_insert(Inbound { session, used })
            .used = used;
        Ok(())
    }

    /// Decrypts a group message of `group` from `user`'s `device`, with a session that device
    /// itself sent us.
    pub fn group_decrypt(
        &mut self,
        group: GroupId,
        user: UserId,
        device: DeviceId,
        body: &[u8],
    ) -> Result<Vec<u8>, String> {
        let (session_id, message) = envelope::decode_group(body)?;
        let used = self.tick();
        let inbound = self
            .inbound
            .get_mut(&(group, user, device, session_id))
            .ok_or_else(|| "no group session from this device for this message".to_string())?;
        inbound.used = used;
        inbound
            .session
            .decrypt(&message)
            .map(|d| d.plaintext)
            .map_err(|e| e.to_string())
    }

    // -----------------------------------------------------------------------------------------
    // Redelivery
    // -----------------------------------------------------------------------------------------

    pub fn seen(&self, key: &SeenKey) -> bool {
        self.seen_set.contains(key)
    }

    pub fn mark_seen(&mut self, key: SeenKey) {
        if self.seen_set.insert(key) {
            self.seen.push_back(key);
            while self.seen.len() > SEEN_MAX {
                if let Some(old) = self.seen.pop_front() {
                    self.seen_set.remove(&old);
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Persistence
    // -----------------------------------------------------------------------------------------

    /// The whole state, serialised (to be encrypted at rest by the store).
    pub fn to_bytes(&self) -> Vec<u8> {
        let snapshot = Snapshot {
            format: SNAPSHOT_FORMAT,
            user: self.user,
            device: self.device,
            account: self.account.pickle(),
            next_key_id: self.next_key_id,
            unpublished_ids: self.unpublished_ids.iter().map(|(k, v)| (*k, *v)).collect(),
            fallback: self.fallback,
            fallback_published: self.fallback_published,
            fallback_since_ms: self.fallback_since_ms,
            peers: (self.peers.iter())
                .map(|((user, device), p)| PeerSnapshot {
                    user: *user,
                    device: *device,
                    identity: p.identity,
                    used: p.used,
                    sessions: p.sessions.iter().map(Session::pickle).collect(),
                })
                .collect(),
            devices: self.devices.iter().map(|(u, l)| (*u, l.clone())).collect(),
            outbound: (self.outbound.iter())
                .map(|(group, o)| OutboundSnapshot {
                    group: *group,
                    session: o.session.pickle(),
                    created_at_ms: o.created_at_ms,
                    messages: o.messages,
                    members: o.members.iter().copied().collect(),
                    shared_with: o.shared_with.iter().copied().collect(),
                    used: o.used,
                })
                .collect(),
            inbound: (self.inbound.iter())
                .map(|((group, user, device, _), s)| InboundSnapshot {
                    group: *group,
                    user: *user,
                    device: *device,
                    used: s.used,
                    session: s.session.pickle(),
                })
                .collect(),
            seen: self.seen.iter().copied().collect(),
            clock: self.clock,
        };
        // Serialising plain data into a Vec cannot fail.
        serde_json::to_vec(&snapshot).unwrap_or_default()
    }

    /// Restores a state written by [`Machine::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Machine, String> {
        let s: Snapshot = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if s.format != SNAPSHOT_FORMAT {
            return Err(format!(
                "state format {} is not {SNAPSHOT_FORMAT}",
                s.format
            ));
        }
        let mut inbound = BTreeMap::new();
        for i in s.inbound {
            let session = InboundGroupSession::from_pickle(i.session);
            let id = envelope::session_id_bytes(&session.session_id())
                .ok_or_else(|| "a stored group session id is not 32 bytes".to_string())?;
            inbound.insert(
                (i.group, i.user, i.device, id),
                Inbound {
                    session,
                    used: i.used,
                },
            );
        }
        let seen: VecDeque<SeenKey> = s.seen.into_iter().collect();
        Ok(Machine {
            user: s.user,
            device: s.device,
            account: Account::from_pickle(s.account),
            next_key_id: s.next_key_id,
            unpublished_ids: s.unpublished_ids.into_iter().collect(),
            fallback: s.fallback,
            fallback_published: s.fallback_published,
            fallback_since_ms: s.fallback_since_ms,
            peers: (s.peers.into_iter())
                .map(|p| {
                    let peer = Peer {
                        identity: p.identity,
                        sessions: p.sessions.into_iter().map(Session::from_pickle).collect(),
                        used: p.used,
                    };
                    ((p.user, p.device), peer)
                })
                .collect(),
            devices: s.devices.into_iter().collect(),
            outbound: (s.outbound.into_iter())
                .map(|o| {
                    let session = GroupSession::from_pickle(o.session);
                    let session_id =
                        envelope::session_id_bytes(&session.session_id()).unwrap_or_default();
                    let out = Outbound {
                        session,
                        session_id,
                        created_at_ms: o.created_at_ms,
                        messages: o.messages,
                        members: o.members.into_iter().collect(),
                        shared_with: o.shared_with.into_iter().collect(),
                        used: o.used,
                    };
                    (o.group, out)
                })
                .collect(),
            inbound,
            seen_set: seen.iter().copied().collect(),
            seen,
            clock: s.clock,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    format: u32,
    user: UserId,
    device: DeviceId,
    account: AccountPickle,
    next_key_id: u32,
    unpublished_ids: Vec<([u8; 32], u32)>,
    fallback: Option<(u32, [u8; 32])>,
    fallback_published: bool,
    /// Absent in states written before fallback rotation: the age starts over.
    #[serde(default)]
    fallback_since_ms: u64,
    peers: Vec<PeerSnapshot>,
    devices: Vec<(UserId, DeviceList)>,
    outbound: Vec<OutboundSnapshot>,
    inbound: Vec<InboundSnapshot>,
    seen: Vec<SeenKey>,
    clock: u64,
}

#[derive(Serialize, Deserialize)]
struct PeerSnapshot {
    user: UserId,
    device: DeviceId,
    identity: Option<[u8; 32]>,
    used: u64,
    sessions: Vec<SessionPickle>,
}

#[derive(Serialize, Deserialize)]
struct OutboundSnapshot {
    group: GroupId,
    session: GroupSessionPickle,
    created_at_ms: u64,
    messages: u32,
    members: Vec<UserId>,
    shared_with: Vec<(UserId, DeviceId)>,
    used: u64,
}

#[derive(Serialize, Deserialize)]
struct InboundSnapshot {
    group: GroupId,
    user: UserId,
    device: DeviceId,
    used: u64,
    session: InboundGroupSessionPickle,
}

#[cfg(test)]
mod tests {
    use ringpost_wire::{DeviceBundle, PrekeyUpload};

    use super::*;

    /// The bundle a node would hand out for `upload`, with its first one-time key (if `one_time`).
    fn bundle_of(upload: &PrekeyUpload, device: DeviceId, one_time: bool) -> DeviceBundle {
        DeviceBundle {
            device,
            identity_key: upload.identity_key.clone(),
            signed_prekey: upload.signed_prekey.clone(),
            one_time: if one_time {
                upload.one_time.first().cloned()
            } else {
                None
            },
        }
    }

    fn pair(one_time: bool) -> (Machine, Machine) {
        let mut alice = Machine::new(1, 1);
        let mut bob = Machine::new(2, 1);
        alice.prekey_upload(5);
        alice.mark_published();
        let upload = bob.prekey_upload(5);
        bob.mark_published();
        let verified = prekeys::verify_bundle(2, &bundle_of(&upload, 1, one_time)).unwrap();
        assert_eq!(verified.one_time, one_time);
        alice.start_session(2, &verified).unwrap();
        (alice, bob)
    }

    fn app(text: &str) -> Envelope {
        Envelope::App(Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn olm_both_ways_from_a_one_time_key_and_from_the_fallback_key() {
        for one_time in [true, false] {
            let (mut alice, mut bob) = pair(one_time);
            let c1 = alice.encrypt(2, 1, &app("hello")).unwrap();
            let c2 = alice.encrypt(2, 1, &app("again")).unwrap();
            let d = bob.decrypt(1, 1, &c1).unwrap();
            assert!(d.new_session);
            assert_eq!(d.envelope, app("hello"));
            assert_eq!(bob.decrypt(1, 1, &c2).unwrap().envelope, app("again"));
            // The replay of a pre-key message that started the session fails (its key is used).
            assert!(bob.decrypt(1, 1, &c1).is_err());
            let r = bob.encrypt(1, 1, &app("reply")).unwrap();
            assert_eq!(alice.decrypt(2, 1, &r).unwrap().envelope, app("reply"));
            let c3 = alice.encrypt(2, 1, &app("normal now")).unwrap();
            assert_eq!(c3[1], 1, "a normal message once the peer replied");
            assert_eq!(bob.decrypt(1, 1, &c3).unwrap().envelope, app("normal now"));
            // Another device cannot claim it.
            assert!(bob
                .decrypt(1, 2, &alice.encrypt(2, 1, &app("x")).unwrap())
                .is_err());
        }
    }

    /// Bob set his device up again (a new identity): the announced key drops Alice's sessions
    /// with it and un-shares her group session; the same key announced again changes nothing;
    /// a session from his new bundle works.
    #[test]
    fn an_announced_identity_change_drops_the_devices_sessions() {
        let (mut alice, bob) = pair(true);
        let group: GroupId = [7; 16];
        alice.prepare_outbound(group, &BTreeSet::from([1, 2]), 0, RotationPolicy::default());
        alice.mark_shared(&group, [(2, 1)]);
        // The key she knows, announced: nothing changes.
        assert!(!alice.identity_changed(2, 1, &bob.identity_key()));
        assert!(alice.has_session(2, 1));
        // A wrong length or an unknown device: nothing either.
        assert!(!alice.identity_changed(2, 1, &[1; 10]));
        let mut new_bob = Machine::new(2, 1);
        assert!(!alice.identity_changed(2, 9, &new_bob.identity_key()));
        assert!(alice.identity_changed(2, 1, &new_bob.identity_key()));
        assert!(!alice.has_session(2, 1));
        assert!(!alice.shared_with(&group, 2, 1));
        let upload = new_bob.prekey_upload(5);
        new_bob.mark_published();
        let verified = prekeys::verify_bundle(2, &bundle_of(&upload, 1, true)).unwrap();
        alice.start_session(2, &verified).unwrap();
        let c = alice.encrypt(2, 1, &app("to the new device")).unwrap();
        assert_eq!(
            new_bob.decrypt(1, 1, &c).unwrap().envelope,
            app("to the new device")
        );
    }

    /// After a week published, the fallback key is replaced; a peer that took the old bundle
    /// still starts a session with it, and the new bundle works too.
    #[test]
    fn the_fallback_key_is_rotated_and_the_old_one_still_opens_sessions() {
        let mut bob = Machine::new(2, 1);
        let old = bob.prekey_upload(0);
        bob.mark_published();
        assert!(
            !bob.rotate_fallback_if_due(1_000, FALLBACK_KEY_MAX_AGE_MS),
            "the clock starts"
        );
        assert!(!bob
            .rotate_fallback_if_due(1_000 + FALLBACK_KEY_MAX_AGE_MS - 1, FALLBACK_KEY_MAX_AGE_MS));
        let bob = Machine::from_bytes(&bob.to_bytes()).unwrap();
        let mut bob = bob;
        assert!(
            bob.rotate_fallback_if_due(1_000 + FALLBACK_KEY_MAX_AGE_MS, FALLBACK_KEY_MAX_AGE_MS)
        );
        assert!(bob.has_unpublished_keys());
        let new = bob.prekey_upload(0);
        bob.mark_published();
        let (old_key, new_key) = (
            old.signed_prekey.clone().unwrap(),
            new.signed_prekey.clone().unwrap(),
        );
        assert_ne!(old_key.key, new_key.key);
        assert!(new_key.id > old_key.id);
        assert!(
            !bob.rotate_fallback_if_due(2_000 + FALLBACK_KEY_MAX_AGE_MS, FALLBACK_KEY_MAX_AGE_MS)
        );
        for (upload, text) in [(&old, "from the old bundle"), (&new, "from the new one")] {
            let mut alice = Machine::new(1, 1);
            let verified = prekeys::verify_bundle(2, &bundle_of(upload, 1, false)).unwrap();
            alice.start_session(2, &verified).unwrap();
            let c = alice.encrypt(2, 1, &app(text)).unwrap();
            assert_eq!(bob.decrypt(1, 1, &c).unwrap().envelope, app(text));
        }
    }

    #[test]
    fn a_one_time_key_is_used_once() {
        let mut bob = Machine::new(2, 1);
        let upload = bob.prekey_upload(5);
        bob.mark_published();
        // As if the node handed the same one-time key to two senders.
        let verified = prekeys::verify_bundle(2, &bundle_of(&upload, 1, true)).unwrap();
        let mut alice = Machine::new(1, 1);
        let mut dave = Machine::new(4, 1);
        alice.start_session(2, &verified).unwrap();
        dave.start_session(2, &verified).unwrap();
        let from_alice = alice.encrypt(2, 1, &app("first")).unwrap();
        let from_dave = dave.encrypt(2, 1, &app("second")).unwrap();
        assert!(bob.decrypt(1, 1, &from_alice).unwrap().new_session);
        assert!(bob.decrypt(4, 1, &from_dave).is_err());
    }

    #[test]
    fn state_survives_a_round_trip_through_bytes() {
        let (mut alice, bob) = pair(true);
        let c = alice.encrypt(2, 1, &app("before")).unwrap();
        let mut bob = Machine::from_bytes(&bob.to_bytes()).unwrap();
        assert_eq!(bob.decrypt(1, 1, &c).unwrap().envelope, app("before"));
        let mut alice = Machine::from_bytes(&alice.to_bytes()).unwrap();
        let r = bob.encrypt(1, 1, &app("after")).unwrap();
        assert_eq!(alice.decrypt(2, 1, &r).unwrap().envelope, app("after"));
        assert!(Machine::from_bytes(b"{}").is_err());
        assert!(Machine::from_bytes(b"").is_err());
    }

    #[test]
    fn uploads_repeat_until_published_and_ids_are_fresh() {
        let mut m = Machine::new(1, 1);
        let first = m.prekey_upload(3);
        assert_eq!(first.one_time.len(), 3);
        assert_eq!(first.identity_key.len(), 64);
        let again = m.prekey_upload(0);
        assert_eq!(
            first, again,
            "a lost answer republishes the same keys under the same ids"
        );
        m.mark_published();
        assert!(!m.has_unpublished_keys());
        let next = m.prekey_upload(2);
        assert_eq!(next.one_time.len(), 2);
        let old: BTreeSet<u32> = first.one_time.iter().map(|k| k.id).collect();
        assert!(next.one_time.iter().all(|k| !old.contains(&k.id)));
        assert_eq!(next.signed_prekey, first.signed_prekey);
        // Bounded by the node's per-upload limit.
        assert!(m.prekey_upload(10_000).one_time.len() <= PREKEYS_PER_UPLOAD_MAX);
    }

    #[test]
    fn megolm_from_a_shared_key_and_rotation() {
        let mut alice = Machine::new(1, 1);
        let mut bob = Machine::new(2, 1);
        let group = [7; 16];
        let members: BTreeSet<UserId> = [1, 2].into();
        let policy = RotationPolicy {
            messages_max: 2,
            age_ms_max: 1000,
        };
        assert!(alice.prepare_outbound(group, &members, 0, policy));
        assert!(!alice.prepare_outbound(group, &members, 1, policy));
        let Some(Envelope::GroupKey { session_key, .. }) = alice.group_key_envelope(group) else {
            panic!("no key")
        };
        let m1 = alice.group_encrypt(&group, b"one").unwrap();
        assert!(bob.group_decrypt(group, 1, 1, &m1).is_err(), "no key yet");
        bob.add_inbound(group, 1, 1, &session_key).unwrap();
        assert_eq!(bob.group_decrypt(group, 1, 1, &m1).unwrap(), b"one");
        // Only the device that sent the key can use the session.
        assert!(bob.group_decrypt(group, 1, 2, &m1).is_err());
        assert!(bob.group_decrypt([8; 16], 1, 1, &m1).is_err());
        alice.group_encrypt(&group, b"two").unwrap();
        assert!(
            alice.prepare_outbound(group, &members, 2, policy),
            "after two messages"
        );
        assert!(
            alice.prepare_outbound(group, &members, 2000, policy),
            "too old"
        );
        let fewer: BTreeSet<UserId> = [1].into();
        assert!(
            alice.prepare_outbound(group, &fewer, 2000, policy),
            "members changed"
        );
        let m3 = alice.group_encrypt(&group, b"three").unwrap();
        assert!(
            bob.group_decrypt(group, 1, 1, &m3).is_err(),
            "a new session"
        );
        // The persisted state keeps both sides.
        let mut bob = Machine::from_bytes(&bob.to_bytes()).unwrap();
        assert_eq!(bob.group_decrypt(group, 1, 1, &m1).unwrap(), b"one");
        let mut alice = Machine::from_bytes(&alice.to_bytes()).unwrap();
        assert!(alice.group_encrypt(&group, b"four").is_ok());
    }

    #[test]
    fn seen_is_bounded() {
        let mut m = Machine::new(1, 1);
        for i in 0..(SEEN_MAX as u64 + 10) {
            m.mark_seen((SEEN_DIRECT, i, 1, [0; 16]));
        }
        assert!(!m.seen(&(SEEN_DIRECT, 0, 1, [0; 16])));
        assert!(m.seen(&(SEEN_DIRECT, SEEN_MAX as u64 + 9, 1, [0; 16])));
        let m = Machine::from_bytes(&m.to_bytes()).unwrap();
        assert!(m.seen(&(SEEN_DIRECT, SEEN_MAX as u64 + 9, 1, [0; 16])));
        assert_eq!(m.seen.len(), SEEN_MAX);
    }
}
