//! Runs [`super::Presence`] against the registry, the contacts service and the peer links:
//! client requests (`PresenceSubscribe`, `SetPrivacy`, `ContactsUpdate`), the owner's change
//! notifications, the subscriber's registrations, and the hooks the connection driver and the
//! ring installer call.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use ringpost_coordinator::NodeId;
use ringpost_wire::{ContactsUpdate, DeviceId, Done, ErrorCode, Frame, UserId, Visibility};
use tracing::{debug, warn};

use super::{
    register_retry_delay, PresenceView, Push, RawPresence, PRESENCE_RETRIES_PER_ROUND_MAX,
    PRESENCE_VIEWERS_PER_CALL_MAX,
};

/// Attempts to register a node's interest with a user's new owner after a ring change (each
/// waits for the owner's hand-off, up to `SHARD_READY_WAIT`, then pauses a little longer);
/// after them, the node's retry task takes over with backoff.
pub const PRESENCE_REGISTER_ATTEMPTS_MAX: u32 = 4;
/// Attempts to send one presence change to an interested node: the first, then retries after
/// [`register_retry_delay`]'s pauses (about 15 s in all before the last).
pub const PRESENCE_CHANGE_ATTEMPTS_MAX: u32 = 5;
use crate::peer::{PeerRequest, PeerResponse};
use crate::routing::Route;
use crate::server::{error, frames, Server};
use crate::session::Answer;

/// The node that owns `user` now: this one, another, or none.
fn owner(server: &Server, user: UserId) -> Option<NodeId> {
    match server.routing.route(user) {
        Route::Local { .. } => Some(server.node_id),
        Route::Remote { node, .. } => Some(node),
        Route::Unowned => None,
    }
}

/// What one try at asking a target's owner came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refreshed {
    /// Asked (and registered, if asked to), or nothing left to do: no owner, no viewer.
    Done,
    /// The owner answered but did not take the registration (not serving the target yet).
    NotTaken,
    /// The owner could not be reached.
    Unreachable,
}

/// Queues a retry of `target`'s registration, which failed `failures + 1` times.
fn retry_later(server: &Server, target: UserId, failures: u32) {
    let due = Instant::now() + register_retry_delay(failures, rand::random::<f64>());
    server.presence.queue_register_retry(target, failures, due);
}

fn push_all(server: &Server, pushes: Vec<Push>) {
    for p in pushes {
        let Ok(bytes) = Frame::new(0, p.update).encode() else {
            continue;
        };
        if p.conn.push(bytes) {
            server.presence.metrics.updates_pushed.fetch_add(1, Relaxed);
        }
    }
}

impl Server {
    /// `PresenceSubscribe`: replaces the connection's subscription set, registers this node's
    /// interest with the owners of targets no local viewer watched yet, pushes each new
    /// target's visible state (`PresenceUpdate`, req 0), then answers `Done`.
    pub(crate) async fn presence_subscribe(
        self: &Arc<Self>,
        user: UserId,
        device: DeviceId,
        users: Vec<UserId>,
    ) -> Answer {
        let Some(conn) = self.registry.device(user, device) else {
            return error(ErrorCode::Internal, "the subscribing connection is gone");
        };
        let replaced = self.presence.replace(&conn, user, &users);
        for (target, owner) in replaced.dropped {
            self.presence_unwatch(target, owner).await;
        }
        // One request per owner and registration flag.
        let mut groups: BTreeMap<(NodeId, bool), Vec<UserId>> = BTreeMap::new();
        for (target, register) in replaced.added {
            if let Some(node) = owner(self, target) {
                groups.entry((node, register)).or_default().push(target);
            }
        }
        for ((node, register), targets) in groups {
            debug!(
                viewer = user,
                owner = node,
                register,
                targets = targets.len(),
                "presence subscribe asks"
            );
            match self
                .presence_ask(node, register, targets.clone(), vec![user])
                .await
            {
                Ok(views) => {
                    for view in &views {
                        if !view.owned {
                            if register {
                                retry_later(self, view.target, 0);
                            }
                            continue;
                        }
                        if register {
                            self.presence.set_registered(view.target, Some(node));
                        }
                        push_all(self, self.presence.apply_view(view, &[user]));
                    }
                }
                Err(e) => {
                    debug!(node, error = %e, "presence registration failed; retrying later");
                    if register {
                        for target in targets {
                            retry_later(self, target, 0);
                        }
                    }
                }
            }
        }
        frames(Done {})
    }

    /// Asks `node` (this one or another) for targets' states and the viewers' grants,
    /// registering this node's interest with it if `register`.
    async fn presence_ask(
        self: &Arc<Self>,
        node: NodeId,
        register: bool,
        targets: Vec<UserId>,
        viewers: Vec<UserId>,
    ) -> Result<Vec<PresenceView>, String> {
        if register {
            self.presence
                .metrics
                .subscribes_sent
                .fetch_add(targets.len() as u64, Relaxed);
        }
        if node == self.node_id {
            return Ok(self
                .serve_presence_watch(self.node_id, register, targets, viewers)
                .await);
        }
        let request = PeerRequest::PresenceWatch {
            register,
            targets,
            viewers,
        };
        match self.call_peer(node, self.routing.epoch(), request).await? {
            PeerResponse::PresenceViews(views) => Ok(views),
            other => Err(format!(
                "node {node} answered a presence watch with {other:?}"
            )),
        }
    }

    /// Withdraws this node's interest in `target` from `owner`. Best effort: an owner that
    /// misses it drops the interest when its next change finds no viewer here.
    async fn presence_unwatch(self: &Arc<Self>, target: UserId, owner: NodeId) {
        if owner == self.node_id {
            self.presence.set_interest(target, owner, false);
            return;
        }
        let request = PeerRequest::PresenceUnwatch {
            targets: vec![target],
        };
        if let Err(e) = self.call_peer(owner, self.routing.epoch(), request).await {
            debug!(owner, error = %e, "presence unwatch failed");
        }
    }

    /// Owner side of a watch from node `from`: per target, its raw state and the viewers'
    /// grants (a target this node does not serve, even after waiting for a hand-off, is
    /// answered `owned: false`).
    pub(crate) async fn serve_presence_watch(
        &self,
        from: NodeId,
        register: bool,
        targets: Vec<UserId>,
        viewers: Vec<UserId>,
    ) -> Vec<PresenceView> {
        let mut out = Vec::with_capacity(targets.len());
        for target in targets {
            let not_owned = PresenceView {
                target,
                owned: false,
                raw: RawPresence::default(),
                grants: Vec::new(),
            };
            if self.gate(target).await.is_err() {
                out.push(not_owned);
                continue;
            }
            if register && !self.presence.set_interest(target, from, true) {
                warn!(
                    target,
                    from, "presence interest bound reached; registration refused"
                );
                out.push(not_owned);
                continue;
            }
            let raw = self.presence_raw(target);
            let grants = viewers
                .iter()
                .map(|&v| self.contacts.grant(target, v).unwrap_or_default())
                .collect();
            out.push(PresenceView {
                target,
                owned: true,
                raw,
                grants,
            });
        }
        out
    }

    fn presence_raw(&self, user: UserId) -> RawPresence {
        RawPresence {
            seq: self.presence.next_seq(),
            online: self.presence.is_online(user),
            last_seen_ms: self
                .contacts
                .settings(user)
                .map(|s| s.last_seen_ms)
                .unwrap_or(0),
        }
    }

    /// Owner side: tells every interested node (once each) that `user`'s presence or, with
    /// `policy_changed`, its privacy, contacts or blocks changed. A change that does not reach
    /// a node (the link broke, the node paused) is sent again, with backoff
    /// ([`PRESENCE_CHANGE_ATTEMPTS_MAX`] attempts in all), each time with the state as it is
    /// then: a subscriber that missed one change would otherwise show the old state until the
    /// next.
    pub(crate) fn presence_notify(self: &Arc<Self>, user: UserId, policy_changed: bool) {
        let interested = self.presence.interested(user);
        if interested.is_empty() {
            // Nobody to tell: skip reading the last-seen time (a database read on every
            // device's first connection, 2.6% of the nodes' CPU in a reconnect storm).
            return;
        }
        let raw = self.presence_raw(user);
        for node in interested {
            self.presence.metrics.changes_sent.fetch_add(1, Relaxed);
            if node == self.node_id {
                self.presence_changed(user, raw, policy_changed);
                continue;
            }
            let server = self.clone();
            tokio::spawn(async move {
                server
                    .presence_send_change(node, user, raw, policy_changed)
                    .await
            });
        }
    }

    /// Sends one change of `user` to the interested node `node`; see
    /// [`Server::presence_notify`].
    async fn presence_send_change(
        self: &Arc<Self>,
        node: NodeId,
        user: UserId,
        mut raw: RawPresence,
        policy_changed: bool,
    ) {
        for attempt in 1..=PRESENCE_CHANGE_ATTEMPTS_MAX {
            if attempt > 1 {
                let pause = register_retry_delay(attempt - 2, rand::random::<f64>());
                tokio::time::sleep(pause).await;
                // Only while this node still owns the user and the node is still interested
                // (a node that left the ring is dropped from every interest).
                if !self.is_local(user) || !self.presence.interested(user).contains(&node) {
                    return;
                }
                self.presence.metrics.change_retries.fetch_add(1, Relaxed);
                raw = self.presence_raw(user);
            }
            let request = PeerRequest::PresenceChanged {
                target: user,
                raw,
                policy_changed,
            };
            match self.call_peer(node, self.routing.epoch(), request).await {
                Ok(PeerResponse::Done) => return,
                // No viewer there any more: the node's interest is stale.
                Ok(PeerResponse::Error { code, .. }) if code == ErrorCode::NotFound.as_u16() => {
                    self.presence.set_interest(user, node, false);
                    return;
                }
                Ok(other) => {
                    debug!(node, ?other, "presence change refused");
                    return;
                }
                Err(e) => debug!(node, attempt, error = %e, "presence change not sent"),
            }
        }
        warn!(
            node,
            user, "presence change not sent after {PRESENCE_CHANGE_ATTEMPTS_MAX} attempts"
        );
    }

    /// Subscriber side: the owner says `target` changed; false if no viewer here watches it.
    pub(crate) fn presence_changed(
        self: &Arc<Self>,
        target: UserId,
        raw: RawPresence,
        policy_changed: bool,
    ) -> bool {
        if !self.presence.is_watched(target) {
            return false;
        }
        if !policy_changed {
            push_all(self, self.presence.apply_change(target, raw));
            return true;
        }
        self.presence.void_grants(target);
        let server = self.clone();
        tokio::spawn(async move { server.presence_refresh(target, false).await });
        true
    }

    /// Asks `target`'s owner for every local viewer's grant again (registering with it if
    /// `register`), and pushes what changed. A registration the owner could not take (not
    /// reachable, or not serving the user yet) is tried again, [`PRESENCE_REGISTER_ATTEMPTS_MAX`]
    /// times in all, then queued for the retry task ([`Server::presence_retry_registrations`]).
    async fn presence_refresh(self: &Arc<Self>, target: UserId, register: bool) {
        for attempt in 1..=PRESENCE_REGISTER_ATTEMPTS_MAX {
            if self.presence_refresh_once(target, register).await == Refreshed::Done {
                return;
            }
            if attempt == PRESENCE_REGISTER_ATTEMPTS_MAX {
                break;
            }
            debug!(target, attempt, "presence registration not taken; retrying");
            tokio::time::sleep(crate::forward::ROUTE_RETRY_PAUSE * attempt).await;
        }
        if register {
            retry_later(self, target, 0);
        }
    }

    /// One try of [`Server::presence_refresh`].
    async fn presence_refresh_once(self: &Arc<Self>, target: UserId, register: bool) -> Refreshed {
        let Some(node) = owner(self, target) else {
            return Refreshed::Done;
        };
        let viewers = self.presence.viewers(target);
        let mut taken = !register;
        let mut reached = true;
        for (i, chunk) in viewers.chunks(PRESENCE_VIEWERS_PER_CALL_MAX).enumerate() {
            let register = register && i == 0;
            match self
                .presence_ask(node, register, vec![target], chunk.to_vec())
                .await
            {
                Ok(views) => {
                    for view in views.iter().filter(|v| v.owned) {
                        if register {
                            self.presence.set_registered(target, Some(node));
                            taken = true;
                        }
                        push_all(self, self.presence.apply_view(view, chunk));
                    }
                }
                Err(e) => {
                    debug!(node, target, error = %e, "presence refresh failed");
                    reached = false;
                }
            }
        }
        if taken || !self.presence.is_watched(target) {
            Refreshed::Done
        } else if reached {
            Refreshed::NotTaken
        } else {
            Refreshed::Unreachable
        }
    }

    /// The node's one task retrying failed registrations (see the module doc of
    /// [`crate::presence`]): sleeps until the earliest retry is due or one is queued, then runs
    /// a round of at most [`PRESENCE_RETRIES_PER_ROUND_MAX`] targets. Within a round an owner
    /// that could not be reached is not called again: its remaining targets wait for their
    /// next backoff. A retry that fails is queued again with a longer pause, unless the ring
    /// changed meanwhile (the ring change registers it).
    pub(crate) async fn presence_retry_registrations(self: Arc<Self>) {
        loop {
            match self.presence.next_register_retry() {
                None => self.presence.register_retry_queued().await,
                Some(due) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.into()) => {}
                        _ = self.presence.register_retry_queued() => {}
                    }
                }
            }
            self.presence_retry_round().await;
        }
    }

    async fn presence_retry_round(self: &Arc<Self>) {
        let epoch = self.routing.epoch();
        let due = self
            .presence
            .take_due_register_retries(Instant::now(), PRESENCE_RETRIES_PER_ROUND_MAX);
        let mut by_owner: BTreeMap<NodeId, Vec<(UserId, u32)>> = BTreeMap::new();
        for (target, failures) in due {
            // Unowned: the ring change that gives it an owner registers it.
            if let Some(node) = owner(self, target) {
                by_owner.entry(node).or_default().push((target, failures));
            }
        }
        for (node, targets) in by_owner {
            let mut reachable = true;
            for (target, failures) in targets {
                let refreshed = if reachable {
                    self.presence.metrics.register_retries.fetch_add(1, Relaxed);
                    self.presence_refresh_once(target, true).await
                } else {
                    Refreshed::Unreachable
                };
                if refreshed == Refreshed::Unreachable {
                    reachable = false;
                }
                if refreshed != Refreshed::Done && self.routing.epoch() == epoch {
                    debug!(node, target, failures, "presence registration retry failed");
                    retry_later(self, target, failures.saturating_add(1));
                }
            }
        }
    }

    /// Hook: a device of `user` is now bound to a connection here.
    pub(crate) fn presence_device_bound(self: &Arc<Self>, user: UserId) {
        if self.is_local(user) && self.presence.came_online(user) {
            self.presence_notify(user, false);
        }
    }

    /// Hook: a connection closed (`bound`: the device it was, if any). Its subscriptions go;
    /// if it was its user's last device online here, the last-seen time is persisted and the
    /// change sent.
    pub(crate) fn presence_connection_closed(
        self: &Arc<Self>,
        conn_id: u64,
        bound: Option<(UserId, DeviceId)>,
    ) {
        let dropped = self.presence.connection_closed(conn_id);
        if !dropped.is_empty() {
            let server = self.clone();
            tokio::spawn(async move {
                for (target, owner) in dropped {
                    server.presence_unwatch(target, owner).await;
                }
            });
        }
        let Some((user, _)) = bound else { return };
        let devices = self.accounts.devices(user).unwrap_or_default();
        if devices
            .iter()
            .any(|&d| self.registry.device(user, d).is_some())
        {
            return;
        }
        // A user moved to another node is not offline: its devices are on their way there,
        // and its new owner speaks for it now.
        if !self.presence.went_offline(user) || self.serves_here(user).is_some() {
            return;
        }
        let server = self.clone();
        let now = self.now_ms();
        tokio::spawn(async move {
            let contacts = server.contacts.clone();
            let written =
                tokio::task::spawn_blocking(move || contacts.set_last_seen(user, now)).await;
            if let Ok(Err(e)) = written {
                warn!(user, error = %e, "persisting last seen failed");
            }
            server.presence_notify(user, false);
        });
    }

    /// Hook: a new ring is installed. Interest in users this node lost is dropped (their
    /// subscribers re-register with the new owner); targets watched here whose owner changed
    /// are registered with the new owner.
    pub(crate) fn presence_ring_changed(self: &Arc<Self>) {
        let ring = self.routing.ring();
        self.presence.clear_register_retries();
        self.presence.retain_owned(
            |u| ring.owner_of(u) == Some(self.node_id),
            |n| ring.member(n).is_some(),
        );
        let moved: Vec<UserId> = self
            .presence
            .watched()
            .into_iter()
            .filter(|(t, registered)| owner(self, *t) != *registered)
            .map(|(t, _)| t)
            .collect();
        if moved.is_empty() {
            return;
        }
        let server = self.clone();
        tokio::spawn(async move {
            for target in moved {
                server.presence.set_registered(target, None);
                server.presence_refresh(target, true).await;
            }
        });
    }

    /// `SetPrivacy`: stored on the user's shard (a synced write); interested nodes re-ask
    /// their viewers' grants.
    pub(crate) async fn set_privacy(
        self: &Arc<Self>,
        user: UserId,
        last_seen: Visibility,
        online: Visibility,
    ) -> Answer {
        let contacts = self.contacts.clone();
        let set =
            tokio::task::spawn_blocking(move || contacts.set_privacy(user, last_seen, online))
                .await;
        self.contacts_done(user, set)
    }

    /// `ContactsUpdate`: applied on the user's shard (a synced write); interested nodes re-ask
    /// their viewers' grants.
    pub(crate) async fn contacts_update(
        self: &Arc<Self>,
        user: UserId,
        update: ContactsUpdate,
    ) -> Answer {
        let contacts = self.contacts.clone();
        let done = tokio::task::spawn_blocking(move || contacts.update(user, &update)).await;
        self.contacts_done(user, done)
    }

    fn contacts_done(
        self: &Arc<Self>,
        user: UserId,
        done: Result<Result<(), crate::contacts::ContactsError>, tokio::task::JoinError>,
    ) -> Answer {
        match done {
            Ok(Ok(())) => {
                self.presence_notify(user, true);
                frames(Done {})
            }
            Ok(Err(e)) => Answer::Error {
                code: e.code(),
                message: e.to_string(),
                retry_after_ms: 0,
            },
            Err(e) => error(ErrorCode::Internal, &format!("contacts task failed: {e}")),
        }
    }
}
