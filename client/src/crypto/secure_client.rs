//! [`SecureClient`]: a [`Client`] that encrypts end to end. The application gives it plaintext
//! and gets plaintext; the node sees only Olm and Megolm ciphertext (docs/protocol.md,
//! "End-to-end encryption in the SDK").
//!
//! It owns the device's [`Machine`] behind an async lock and saves it to the [`Store`] after
//! every change and before anything that depends on the change leaves the device: a ciphertext
//! is sent only once the session state that made it is on disk, and a delivery is acknowledged
//! only once the state that decrypted it is on disk. So a restarted client (same file, same key)
//! keeps its sessions and decrypts whatever was queued while it was down.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ringpost_wire::{
    Deliver, DeliverKind, DeviceCiphertext, DeviceId, ErrorCode, GroupId, MsgId, SendAck,
    SendStatus, UserId,
};
use tokio::sync::{Mutex, MutexGuard};

use super::envelope::Envelope;
use super::error::{CryptoError, CryptoResult};
use super::machine::{Machine, RotationPolicy, FALLBACK_KEY_MAX_AGE_MS, SEEN_DIRECT, SEEN_GROUP};
use super::prekeys;
use super::store::Store;
use crate::client::{new_msg_id, Client, Event};

/// One-time prekeys a device keeps published by default.
pub const ONE_TIME_KEYS_TARGET_DEFAULT: u32 = 50;
/// Below this many one-time prekeys on the node, a device uploads more (up to the target).
pub const ONE_TIME_KEYS_LOW_DEFAULT: u32 = 20;
/// A group send refreshes a member's device list older than this, so a device the member
/// linked since gets the group's key (1:1 sends learn new devices from `MismatchedDevices`).
pub const DEVICE_LIST_MAX_AGE_DEFAULT: Duration = Duration::from_secs(60);
/// `Send` attempts for one message while the node keeps answering `MismatchedDevices`.
pub const SEND_ATTEMPTS_MAX: u32 = 4;
/// New inbound sessions (each may use up one of our one-time keys) between two checks of how
/// many one-time keys the node still has.
pub const PREKEY_CHECK_EVERY: u32 = 5;

/// How a [`SecureClient`] keeps its state and keys.
#[derive(Clone)]
pub struct SecureConfig {
    /// The device's state file (created on first use).
    pub store_path: PathBuf,
    /// The key the state file is encrypted with; keep it in the platform's key store.
    pub store_key: [u8; 32],
    /// One-time prekeys to keep published.
    pub one_time_keys_target: u32,
    /// Upload more one-time prekeys when the node has fewer than this.
    pub one_time_keys_low: u32,
    /// When a group's outbound Megolm session is replaced (membership changes always do).
    pub rotation: RotationPolicy,
    /// How long the fallback (signed) prekey stays published before it is replaced (checked
    /// on open and whenever the one-time keys are checked); default
    /// [`FALLBACK_KEY_MAX_AGE_MS`](super::machine::FALLBACK_KEY_MAX_AGE_MS), 7 days.
    pub fallback_key_max_age: Duration,
    /// See [`DEVICE_LIST_MAX_AGE_DEFAULT`].
    pub device_list_max_age: Duration,
}

impl std::fmt::Debug for SecureConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureConfig")
            .field("store_path", &self.store_path)
            .field("one_time_keys_target", &self.one_time_keys_target)
            .field("one_time_keys_low", &self.one_time_keys_low)
            .field("rotation", &self.rotation)
            .field("fallback_key_max_age", &self.fallback_key_max_age)
            .field("device_list_max_age", &self.device_list_max_age)
            .finish_non_exhaustive()
    }
}

impl SecureConfig {
    /// The defaults, keeping the state in `store_path` encrypted with `store_key`.
    pub fn new(store_path: impl Into<PathBuf>, store_key: [u8; 32]) -> SecureConfig {
        SecureConfig {
            store_path: store_path.into(),
            store_key,
            one_time_keys_target: ONE_TIME_KEYS_TARGET_DEFAULT,
            one_time_keys_low: ONE_TIME_KEYS_LOW_DEFAULT,
            rotation: RotationPolicy::default(),
            fallback_key_max_age: Duration::from_millis(FALLBACK_KEY_MAX_AGE_MS),
            device_list_max_age: DEVICE_LIST_MAX_AGE_DEFAULT,
        }
    }
}

/// A decrypted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plaintext {
    /// The inbox seq (already acknowledged by the SDK).
    pub seq: u64,
    pub from_user: UserId,
    pub from_device: DeviceId,
    pub msg_id: MsgId,
    pub server_time_ms: u64,
    /// For a group message: the group and its sequence number.
    pub group: Option<GroupId>,
    pub group_seq: u64,
    pub body: Bytes,
}

/// What a [`SecureClient`] hands the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecureEvent {
    /// A 1:1 message, decrypted.
    Message(Plaintext),
    /// A group message, decrypted.
    GroupMessage(Plaintext),
    /// A message that could not be decrypted (no session, a forged or damaged ciphertext, a
    /// group message whose key never arrived). It is acknowledged: it will not come again.
    Undecryptable {
        seq: u64,
        kind: DeliverKind,
        from_user: UserId,
        from_device: DeviceId,
        msg_id: MsgId,
        group: Option<GroupId>,
        reason: String,
    },
    /// Anything else the client reports (receipts, group changes, presence, connection
    /// changes). Deliveries among them are acknowledged by the SDK.
    Other(Event),
}

struct Inner {
    client: Client,
    config: SecureConfig,
    store: Arc<Store>,
    machine: Mutex<Machine>,
    /// New inbound sessions since the last prekey count check.
    new_sessions: std::sync::atomic::AtomicU32,
}

/// A device's end-to-end encrypting session. Cheap to clone; see the module documentation.
#[derive(Clone)]
pub struct SecureClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SecureClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureClient")
            .field("client", &self.inner.client)
            .field("store", &self.inner.store)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl SecureClient {
    /// Wraps a registered device's client (connected with `auto_ack: false`): loads the state
    /// from `config.store_path` (or makes a new identity if there is no file), publishes any
    /// keys not yet published, and tops the one-time prekeys up.
    pub async fn open(client: Client, config: SecureConfig) -> CryptoResult<SecureClient> {
        if client.auto_ack() {
            return Err(CryptoError::AutoAck);
        }
        let auth = client.auth().ok_or(CryptoError::NotADevice)?;
        let store = Arc::new(Store::new(&config.store_path, &config.store_key));
        let loaded = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.load())
                .await
                .map_err(|e| CryptoError::Olm(format!("loading the store: {e}")))??
        };
        let machine = match loaded {
            Some(bytes) => {
                let machine =
                    Machine::from_bytes(&bytes).map_err(|reason| CryptoError::StoreFormat {
                        path: config.store_path.clone(),
                        reason,
                    })?;
                if (machine.user(), machine.device()) != (auth.user, auth.device) {
                    return Err(CryptoError::StoreDevice {
                        path: config.store_path.clone(),
                        store_user: machine.user(),
                        store_device: machine.device(),
                        user: auth.user,
                        device: auth.device,
                    });
                }
                machine
            }
            None => Machine::new(auth.user, auth.device),
        };
        let secure = SecureClient {
            inner: Arc::new(Inner {
                client,
                config,
                store,
                machine: Mutex::new(machine),
                new_sessions: Default::default(),
            }),
        };
        {
            let mut m = secure.inner.machine.lock().await;
            if m.has_unpublished_keys() {
                let target = secure.inner.config.one_time_keys_target;
                secure.publish(&mut m, target).await?;
            }
            secure.top_up(&mut m).await?;
        }
        Ok(secure)
    }

    /// The transport client, for everything that needs no encryption (groups, contacts,
    /// presence, receipts). Do not read its events while this wraps it: use
    /// [`SecureClient::next_event`].
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// This device's published identity key: Ed25519 (32 bytes) then Curve25519 (32 bytes).
    pub async fn identity_key(&self) -> [u8; prekeys::IDENTITY_KEY_BYTES] {
        self.inner.machine.lock().await.identity_key()
    }

    async fn save(&self, m: &Machine) -> CryptoResult<()> {
        let bytes = m.to_bytes();
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || store.save(&bytes))
            .await
            .map_err(|e| CryptoError::Olm(format!("saving the store: {e}")))?
    }

    /// Generates `count` one-time keys and publishes them with every key not yet published.
    async fn publish(&self, m: &mut MutexGuard<'_, Machine>, count: u32) -> CryptoResult<()> {
        let upload = m.prekey_upload(usize::try_from(count).unwrap_or(usize::MAX));
        // The keys exist on disk before the node hands them out.
        self.save(m).await?;
        self.inner
            .client
            .prekey_upload(upload.identity_key, upload.signed_prekey, upload.one_time)
            .await?;
        m.mark_published();
        self.save(m).await
    }

    /// Asks the node how many one-time keys are left and uploads more if they run low.
    async fn top_up(&self, m: &mut MutexGuard<'_, Machine>) -> CryptoResult<()> {
        let count = self.inner.client.prekey_count().await?;
        self.top_up_from(m, count).await
    }

    async fn top_up_from(&self, m: &mut MutexGuard<'_, Machine>, count: u32) -> CryptoResult<()> {
        let config = &self.inner.config;
        let max_age = u64::try_from(config.fallback_key_max_age.as_millis()).unwrap_or(u64::MAX);
        let rotated = m.rotate_fallback_if_due(now_ms(), max_age);
        if count < config.one_time_keys_low {
            self.publish(m, config.one_time_keys_target.saturating_sub(count))
                .await?;
        } else if rotated {
            self.publish(m, 0).await?;
        }
        Ok(())
    }

    /// Asks the node how many one-time prekeys this device has left and uploads more if fewer
    /// than `one_time_keys_low` (the SDK also does this on open, after new inbound sessions,
    /// and when the node reports a low count).
    pub async fn refresh_prekeys(&self) -> CryptoResult<()> {
        let mut m = self.inner.machine.lock().await;
        self.top_up(&mut m).await
    }

    // -----------------------------------------------------------------------------------------
    // Sending
    // -----------------------------------------------------------------------------------------

    /// Sends `plaintext` to `to`: encrypted once for each of its devices and each of our other
    /// devices, starting Olm sessions from claimed (and verified) prekeys where needed, and
    /// following `MismatchedDevices` with the same `msg_id`. Returns the final `SendAck`
    /// (`Ok`, or `InboxFull`/`UnknownUser`); on `Err` retry with the same `msg_id`.
    pub async fn send(&self, to: UserId, msg_id: MsgId, plaintext: Bytes) -> CryptoResult<SendAck> {
        let mut m = self.inner.machine.lock().await;
        self.send_envelope(&mut m, to, msg_id, &Envelope::App(plaintext))
            .await
    }

    /// The devices a 1:1 message to `to` goes to: `to`'s and our other ones.
    fn targets(m: &Machine, to: UserId) -> Vec<(UserId, DeviceId)> {
        let me = (m.user(), m.device());
        let mut out = BTreeSet::new();
        for user in [to, me.0] {
            if let Some(list) = m.device_list(user) {
                out.extend(list.devices.iter().map(|&d| (user, d)));
            }
        }
        out.remove(&me);
        out.into_iter().collect()
    }

    /// Fetches `user`'s device list if we have none, or (with `max_age`) one older than that.
    async fn ensure_devices(
        &self,
        m: &mut Machine,
        user: UserId,
        max_age: Option<Duration>,
    ) -> CryptoResult<()> {
        let now = now_ms();
        let fresh = m.device_list(user).is_some_and(|l| {
            max_age.is_none_or(|age| {
                now.saturating_sub(l.fetched_at_ms)
                    < u64::try_from(age.as_millis()).unwrap_or(u64::MAX)
            })
        });
        if !fresh {
            let devices = self.inner.client.device_list(user).await?;
            m.set_device_list(user, devices, now);
        }
        Ok(())
    }

    /// Claims and verifies bundles for the targets we have no session with, and starts them.
    async fn ensure_sessions(
        &self,
        m: &mut Machine,
        targets: &[(UserId, DeviceId)],
    ) -> CryptoResult<()> {
        let mut missing: BTreeMap<UserId, Vec<DeviceId>> = BTreeMap::new();
        for &(user, device) in targets {
            if !m.has_session(user, device) {
                missing.entry(user).or_default().push(device);
            }
        }
        for (user, devices) in missing {
            let known = m.device_list(user).map_or(0, |l| l.devices.len());
            // One claim for all of a user's devices when we need them all (never for our own
            // user: it would use up one of this device's one-time keys too).
            let claims: Vec<DeviceId> = if user != m.user() && devices.len() >= known {
                vec![0]
            } else {
                devices.clone()
            };
            for claim in claims {
                let bundle = match self.inner.client.prekey_claim(user, claim).await {
                    Ok(b) => b,
                    Err(e) if e.code() == Some(ErrorCode::NotFound) => continue,
                    Err(e) => return Err(e.into()),
                };
                for b in &bundle.devices {
                    if !devices.contains(&b.device) {
                        continue;
                    }
                    let verified = prekeys::verify_bundle(user, b)?;
                    m.start_session(user, &verified)?;
                }
            }
            if let Some(&device) = devices.iter().find(|&&d| !m.has_session(user, d)) {
                return Err(CryptoError::NoPrekeys { user, device });
            }
        }
        Ok(())
    }

    async fn send_envelope(
        &self,
        m: &mut Machine,
        to: UserId,
        msg_id: MsgId,
        envelope: &Envelope,
    ) -> CryptoResult<SendAck> {
        let me = m.user();
        self.ensure_devices(m, to, None).await?;
        if to != me {
            self.ensure_devices(m, me, None).await?;
        }
        for _ in 0..SEND_ATTEMPTS_MAX {
            let targets = Self::targets(m, to);
            self.ensure_sessions(m, &targets).await?;
            let mut ciphertexts = Vec::with_capacity(targets.len());
            for &(user, device) in &targets {
                ciphertexts.push(DeviceCiphertext {
                    user,
                    device,
                    body: m.encrypt(user, device, envelope)?,
                });
            }
            // The ratchet steps are on disk before their ciphertexts leave.
            self.save(m).await?;
            let ack = self.inner.client.send(to, msg_id, ciphertexts).await?;
            if ack.status != SendStatus::MismatchedDevices {
                return Ok(ack);
            }
            let now = now_ms();
            for mismatch in &ack.mismatched {
                m.apply_mismatch(mismatch.user, &mismatch.missing, &mismatch.extra, now);
            }
        }
        Err(CryptoError::DeviceListsUnstable {
            user: to,
            attempts: SEND_ATTEMPTS_MAX,
        })
    }

    /// Sends `plaintext` to every member of `group` as one Megolm ciphertext. First makes sure
    /// every member device (and each of our other devices) holds our current session key for the
    /// group, handing it out pairwise over Olm; a new session is made when the membership changed
    /// since the last one, or the rotation policy says so. On `Err` retry with the same
    /// `msg_id`.
    pub async fn group_send(
        &self,
        group: GroupId,
        msg_id: MsgId,
        plaintext: Bytes,
    ) -> CryptoResult<SendAck> {
        let mut m = self.inner.machine.lock().await;
        let info = self.inner.client.group_info(group).await?;
        let me = (m.user(), m.device());
        let members: BTreeSet<UserId> = info.members.iter().copied().collect();
        let config = &self.inner.config;
        m.prepare_outbound(group, &members, now_ms(), config.rotation);
        let max_age = Some(config.device_list_max_age);
        self.ensure_devices(&mut m, me.0, max_age).await?;
        let others: Vec<UserId> = members.iter().copied().filter(|&u| u != me.0).collect();
        // Our own other devices come along with every member's share; alone, we send to us.
        let share_to: Vec<UserId> = if others.is_empty() {
            vec![me.0]
        } else {
            others
        };
        for user in share_to {
            self.ensure_devices(&mut m, user, max_age).await?;
            let needed = Self::targets(&m, user)
                .into_iter()
                .any(|(u, d)| !m.shared_with(&group, u, d));
            if !needed {
                continue;
            }
            let Some(envelope) = m.group_key_envelope(group) else {
                continue;
            };
            let ack = self
                .send_envelope(&mut m, user, new_msg_id(), &envelope)
                .await?;
            if ack.status == SendStatus::Ok {
                let sent_to = Self::targets(&m, user);
                m.mark_shared(&group, sent_to);
            } else {
                tracing::warn!(user, status = ?ack.status, "a group key share was not stored");
            }
        }
        let body = m.group_encrypt(&group, &plaintext)?;
        self.save(&m).await?;
        drop(m);
        Ok(self.inner.client.group_send(group, msg_id, body).await?)
    }

    // -----------------------------------------------------------------------------------------
    // Receiving
    // -----------------------------------------------------------------------------------------

    /// The next event, with messages decrypted; `None` once the client is closed. Key shares
    /// and prekey count reports are consumed here. Every delivery is acknowledged once the state
    /// it changed is saved. Call it from one task at a time.
    pub async fn next_event(&self) -> Option<SecureEvent> {
        loop {
            let event = self.inner.client.next_event().await?;
            let handled = match event {
                Event::Message(d) => self.on_direct(d).await,
                Event::GroupMessage(d) => self.on_group(d).await,
                Event::GroupChanged {
                    seq,
                    group,
                    group_seq,
                    event,
                } => {
                    if event.as_ref().is_some_and(|e| e.rotate_sender_keys) {
                        let mut m = self.inner.machine.lock().await;
                        if m.drop_outbound(&group) {
                            if let Err(e) = self.save(&m).await {
                                tracing::warn!(error = %e, "saving the store failed");
                                continue;
                            }
                        }
                    }
                    self.ack(seq).await;
                    Some(SecureEvent::Other(Event::GroupChanged {
                        seq,
                        group,
                        group_seq,
                        event,
                    }))
                }
                Event::IdentityChanged {
                    seq,
                    user,
                    device,
                    identity_key,
                    server_time_ms,
                } => {
                    let mut m = self.inner.machine.lock().await;
                    if m.identity_changed(user, device, &identity_key) {
                        if let Err(e) = self.save(&m).await {
                            tracing::warn!(error = %e, "saving the store failed");
                            continue;
                        }
                    }
                    drop(m);
                    self.ack(seq).await;
                    Some(SecureEvent::Other(Event::IdentityChanged {
                        seq,
                        user,
                        device,
                        identity_key,
                        server_time_ms,
                    }))
                }
                Event::PrekeysLow { count } => {
                    let mut m = self.inner.machine.lock().await;
                    if let Err(e) = self.top_up_from(&mut m, count).await {
                        tracing::warn!(error = %e, "topping up one-time prekeys failed");
                    }
                    None
                }
                other => {
                    if let Some(seq) = other.seq() {
                        self.ack(seq).await;
                    }
                    Some(SecureEvent::Other(other))
                }
            };
            if let Some(event) = handled {
                return Some(event);
            }
        }
    }

    async fn ack(&self, seq: u64) {
        if let Err(e) = self.inner.client.ack(&[seq]).await {
            // Delivered again after a reconnect, and recognised then.
            tracing::debug!(seq, error = %e, "ack not written");
        }
    }

    fn undecryptable(d: &Deliver, reason: String) -> SecureEvent {
        tracing::warn!(from_user = d.from_user, from_device = d.from_device, %reason,
            "undecryptable message");
        SecureEvent::Undecryptable {
            seq: d.seq,
            kind: d.kind,
            from_user: d.from_user,
            from_device: d.from_device,
            msg_id: d.msg_id,
            group: d.group,
            reason,
        }
    }

    fn plaintext(d: &Deliver, body: Bytes) -> Plaintext {
        Plaintext {
            seq: d.seq,
            from_user: d.from_user,
            from_device: d.from_device,
            msg_id: d.msg_id,
            server_time_ms: d.server_time_ms,
            group: d.group,
            group_seq: d.group_seq,
            body,
        }
    }

    async fn on_direct(&self, d: Deliver) -> Option<SecureEvent> {
        let key = (SEEN_DIRECT, d.from_user, d.from_device, d.msg_id);
        let mut m = self.inner.machine.lock().await;
        if m.seen(&key) {
            drop(m);
            self.ack(d.seq).await;
            return None;
        }
        let decrypted = match m.decrypt(d.from_user, d.from_device, &d.body) {
            Ok(decrypted) => decrypted,
            Err(reason) => {
                drop(m);
                self.ack(d.seq).await;
                return Some(Self::undecryptable(&d, reason));
            }
        };
        m.mark_seen(key);
        let event = match decrypted.envelope {
            Envelope::App(body) => Some(SecureEvent::Message(Self::plaintext(&d, body))),
            Envelope::GroupKey { group, session_key } => {
                match m.add_inbound(group, d.from_user, d.from_device, &session_key) {
                    Ok(()) => None,
                    Err(reason) => Some(Self::undecryptable(&d, reason)),
                }
            }
        };
        if let Err(e) = self.save(&m).await {
            // Not acknowledged: it comes again after a reconnect and is decrypted then
            // (or recognised, if a later save records it).
            tracing::warn!(error = %e, "saving the store failed");
            return None;
        }
        if decrypted.new_session {
            let n = self
                .inner
                .new_sessions
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
                + 1;
            if n >= PREKEY_CHECK_EVERY {
                self.inner
                    .new_sessions
                    .store(0, std::sync::atomic::Ordering::Release);
                if let Err(e) = self.top_up(&mut m).await {
                    tracing::warn!(error = %e, "topping up one-time prekeys failed");
                }
            }
        }
        drop(m);
        self.ack(d.seq).await;
        event
    }

    async fn on_group(&self, d: Deliver) -> Option<SecureEvent> {
        let Some(group) = d.group else {
            self.ack(d.seq).await;
            return Some(Self::undecryptable(
                &d,
                "a group message without a group".to_string(),
            ));
        };
        let key = (SEEN_GROUP, d.from_user, d.from_device, d.msg_id);
        let mut m = self.inner.machine.lock().await;
        if m.seen(&key) {
            drop(m);
            self.ack(d.seq).await;
            return None;
        }
        let result = m.group_decrypt(group, d.from_user, d.from_device, &d.body);
        let event = match result {
            Ok(plaintext) => {
                m.mark_seen(key);
                if let Err(e) = self.save(&m).await {
                    tracing::warn!(error = %e, "saving the store failed");
                }
                SecureEvent::GroupMessage(Self::plaintext(&d, Bytes::from(plaintext)))
            }
            Err(reason) => Self::undecryptable(&d, reason),
        };
        drop(m);
        self.ack(d.seq).await;
        Some(event)
    }

    /// Closes the connection (see [`Client::close`]). The state is already on disk.
    pub async fn close(&self) {
        self.inner.client.close().await;
    }
}
