//! Routing of requests between nodes: which node serves a user, forwarding stores and queries
//! to the owner over the peer link (with the epoch fence), serving other nodes' requests, and
//! the serving side of shard hand-offs. The pulling side of a hand-off is in
//! [`crate::cluster`].

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use ringpost_coordinator::NodeId;
use ringpost_wire::{Body, DeviceId, ErrorCode, Frame, Redirect, UserId};
use tracing::{debug, info, warn};

use crate::accounts::AccountError;
use crate::handoff;
use crate::inbox::{Append, AppendOutcome, Entry, EntryKind};
use crate::peer::handoff_role::handoff_refusal;
use crate::peer::{
    decode_response, encode_request, PeerRequest, PeerResponse, Store, StoreKind, Stored, Targets,
    PEER_CALL_TIMEOUT,
};
use crate::ring::Ring;
use crate::routing::{Route, EPOCH_CATCH_UP_WAIT, SHARD_READY_WAIT};
use crate::server::{account_error, error, refused, Server};
use crate::session::Answer;
use crate::shard::ShardId;

pub(crate) mod order;

/// Attempts to route one store before the client is told to retry: each attempt waits for the
/// ring to move (or a hand-off to finish) first, so a few cover any membership change.
pub const ROUTE_ATTEMPTS_MAX: u32 = 4;
/// Pause before re-trying an owner that did not answer (it may be dying; the coordinator
/// will mark it down and the ring will move).
pub const ROUTE_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// What a client is told to wait before retrying a request no owner could take.
pub const ROUTE_RETRY_AFTER_MS: u32 = 500;
/// Largest hand-off chunk a node serves.
pub const EXPORT_CHUNK_BYTES_MAX: u32 = 1 << 20;

impl Server {
    /// Whether this node owns `user`'s shard now (ready or not).
    pub(crate) fn is_local(&self, user: UserId) -> bool {
        matches!(self.routing.route(user), Route::Local { .. })
    }

    /// `None` if this node serves `user` now; else the answer for a request about it.
    pub(crate) fn serves_here(&self, user: UserId) -> Option<Answer> {
        match self.routing.route(user) {
            // Without a lease this node may have lost the shard without knowing yet: it
            // neither reads nor writes (accounts and keys included) until it hears back.
            Route::Local { .. } if !self.routing.lease_valid() => Some(Answer::Error {
                code: ErrorCode::WrongOwner,
                message: lease_lost_message().into(),
                retry_after_ms: ROUTE_RETRY_AFTER_MS,
            }),
            Route::Local { shard } if self.routing.is_ready(shard) => None,
            Route::Local { .. } => Some(moving()),
            Route::Remote { node, epoch, .. } => Some(self.redirect(user, node, epoch)),
            Route::Unowned => Some(unowned()),
        }
    }

    /// Like [`Server::serves_here`], but waits (up to [`SHARD_READY_WAIT`]) for a hand-off of
    /// the user's shard to this node to finish.
    pub(crate) async fn gate(&self, user: UserId) -> Result<(), Answer> {
        if let Route::Local { shard } = self.routing.route(user) {
            if !self.routing.is_ready(shard) {
                self.routing.wait_ready(user, SHARD_READY_WAIT).await;
            }
        }
        match self.serves_here(user) {
            None => Ok(()),
            Some(answer) => Err(answer),
        }
    }

    /// `Redirect` to the owner's advertised client addresses.
    pub(crate) fn redirect(&self, user: UserId, node: NodeId, epoch: u64) -> Answer {
        let ring = self.routing.ring();
        let info = ring.member(node).map(|m| &m.info);
        Answer::Redirect(Redirect {
            user,
            epoch,
            ws_url: info
                .and_then(|i| i.wss_url.clone().or_else(|| i.ws_url.clone()))
                .unwrap_or_default(),
            quic_addr: info.and_then(|i| i.quic_addr.clone()).unwrap_or_default(),
        })
    }

    /// Stores entries for the devices of `store.to_user` on its owner: here if this node owns
    /// it and may write, else over the peer link. Work starts on the first poll of the returned
    /// future, so stores keep the order they are polled in; a conversation with a routed
    /// store in flight runs its stores one at a time in that order (see [`order`]), so a
    /// retried store is never overtaken by a later one.
    pub(crate) fn store(self: &Arc<Self>, store: Store) -> BoxFuture<'static, Stored> {
        let key = (store.from_user, store.from_device, store.to_user);
        match self.routing.route(store.to_user) {
            Route::Local { shard }
                if self.routing.is_ready(shard)
                    && self.routing.lease_valid()
                    && !self.order.is_busy(&key) =>
            {
                self.store_local(store)
            }
            _ => {
                let server = self.clone();
                let ticket = self.order.ticket(key);
                Box::pin(async move {
                    let _turn = ticket.wait().await;
                    server.store_routed(store).await
                })
            }
        }
    }

    /// The slow path of [`Server::store`]: forward, follow `WrongOwner`, wait out hand-offs.
    async fn store_routed(self: &Arc<Self>, store: Store) -> Stored {
        let mut last = String::from("no owner");
        let mut waited_for_hand_off = false;
        for attempt in 0..ROUTE_ATTEMPTS_MAX {
            match self.routing.route(store.to_user) {
                Route::Local { shard } => {
                    if !self.routing.is_ready(shard) {
                        // Wait for a hand-off once (a down previous owner can take long).
                        if waited_for_hand_off {
                            last = format!("user {}'s data is not on this node yet", store.to_user);
                            break;
                        }
                        waited_for_hand_off = true;
                        self.routing
                            .wait_ready(store.to_user, SHARD_READY_WAIT)
                            .await;
                        continue;
                    }
                    if !self.routing.lease_valid() {
                        return lease_lost();
                    }
                    return self.store_local(store).await;
                }
                Route::Remote { node, epoch, .. } => {
                    match self
                        .call_peer(node, epoch, PeerRequest::Store(store.clone()))
                        .await
                    {
                        Ok(PeerResponse::Stored(stored)) => return stored,
                        Ok(PeerResponse::WrongOwner { epoch: theirs }) => {
                            last = format!(
                                "node {node} does not own user {} at epoch {theirs}",
                                store.to_user
                            );
                            debug!(node, ours = epoch, theirs, "forward refused: wrong owner");
                            // Wait for our view to reach theirs (or move past ours).
                            let target = theirs.max(epoch + 1);
                            self.routing.wait_epoch(target, EPOCH_CATCH_UP_WAIT).await;
                        }
                        Ok(PeerResponse::Error { code, message }) => {
                            return Stored::Refused {
                                code,
                                message,
                                retry_after_ms: ROUTE_RETRY_AFTER_MS,
                            }
                        }
                        Ok(other) => {
                            last = format!("node {node} answered a store with {other:?}");
                            warn!("{last}");
                        }
                        Err(e) => {
                            last = format!("node {node}: {e}");
                            debug!(node, attempt, error = %e, "forward failed");
                            tokio::time::sleep(ROUTE_RETRY_PAUSE * (attempt + 1)).await;
                        }
                    }
                }
                Route::Unowned => {
                    let epoch = self.routing.epoch();
                    self.routing
                        .wait_epoch(epoch + 1, EPOCH_CATCH_UP_WAIT)
                        .await;
                }
            }
        }
        Stored::Refused {
            code: ErrorCode::WrongOwner.as_u16(),
            message: format!(
                "could not reach the owner of user {}: {last}; retry",
                store.to_user
            ),
            retry_after_ms: ROUTE_RETRY_AFTER_MS,
        }
    }

    /// Executes a store for a user this node owns.
    pub(crate) fn store_local(self: &Arc<Self>, store: Store) -> BoxFuture<'static, Stored> {
        let devices = match self.accounts.devices(store.to_user) {
            Ok(d) if !d.is_empty() => d,
            Ok(_) | Err(AccountError::NotFound) => return Box::pin(async { Stored::UnknownUser }),
            Err(e) => {
                let answer = account_error(e);
                return Box::pin(async move { stored_refusal(answer) });
            }
        };
        let expected: Vec<DeviceId> = devices
            .into_iter()
            .filter(|&d| Some(d) != store.except)
            .collect();
        let now_ms = self.now_ms();
        // A message from a user the recipient blocks: answered like a stored one (after the
        // device check, so the answer is the same as for anyone else) and dropped.
        let blocked = matches!(
            store.kind,
            StoreKind::Message | StoreKind::Status | StoreKind::IdentityChanged
        ) && store.from_user != store.to_user
            && match self.contacts.is_blocked(store.to_user, store.from_user) {
                Ok(b) => b,
                Err(e) => {
                    let answer = error(ErrorCode::Internal, &e.to_string());
                    return Box::pin(async move { stored_refusal(answer) });
                }
            };
        // A broadcast to a user that does not have the sender as a contact: the same (see
        // `crate::broadcast`).
        let not_contact = store.require_contact
            && !blocked
            && match self.contacts.is_contact(store.to_user, store.from_user) {
                Ok(c) => !c,
                Err(e) => {
                    let answer = error(ErrorCode::Internal, &e.to_string());
                    return Box::pin(async move { stored_refusal(answer) });
                }
            };
        let kind = match store.kind {
            StoreKind::Message => EntryKind::Message,
            StoreKind::Delivered => EntryKind::Delivered,
            StoreKind::Read => EntryKind::Read,
            StoreKind::GroupMessage => EntryKind::GroupMessage,
            StoreKind::GroupEvent => EntryKind::GroupEvent,
            StoreKind::Status => EntryKind::Status,
            StoreKind::StatusViewed => EntryKind::StatusViewed,
            StoreKind::IdentityChanged => EntryKind::IdentityChanged,
        };
        let entry = |body: Vec<u8>| Entry {
            kind,
            from_user: store.from_user,
            from_device: store.from_device,
            msg_id: store.msg_id,
            // The owner's clock stamps and expires entries (see `crate::clock`), not the
            // sender's.
            server_time_ms: now_ms,
            // The inbox sets it to its retention, or keeps this if sooner.
            expires_at_ms: store.expires_at_ms,
            body: body.into(),
            receipt_msg_ids: store.receipt_msg_ids.clone(),
            sole_copy: false, // set by the inbox
        };
        let entries: Vec<(DeviceId, Entry)> = match store.targets {
            Targets::Exact(ref list) => {
                let mut given = std::collections::BTreeSet::new();
                for (d, _) in list {
                    if !given.insert(*d) {
                        return Box::pin(async {
                            stored_refusal(error(
                                ErrorCode::Malformed,
                                "two ciphertexts for the same device",
                            ))
                        });
                    }
                }
                let missing: Vec<DeviceId> = expected
                    .iter()
                    .copied()
                    .filter(|d| !given.contains(d))
                    .collect();
                let extra: Vec<DeviceId> = given
                    .iter()
                    .copied()
                    .filter(|d| !expected.contains(d))
                    .collect();
                if !missing.is_empty() || !extra.is_empty() {
                    return Box::pin(async { Stored::Mismatched { missing, extra } });
                }
                if blocked || not_contact {
                    if blocked {
                        self.presence.metrics.blocked_sends.fetch_add(1, Relaxed);
                    } else {
                        self.broadcast.recipients_not_contact.fetch_add(1, Relaxed);
                    }
                    return Box::pin(async move {
                        Stored::Stored {
                            server_time_ms: now_ms,
                        }
                    });
                }
                list.iter().map(|(d, b)| (*d, entry(b.clone()))).collect()
            }
            Targets::AllDevices(ref body) => {
                if blocked || not_contact {
                    if not_contact {
                        self.status.metrics.not_contact.fetch_add(1, Relaxed);
                    }
                    return Box::pin(async move {
                        Stored::Stored {
                            server_time_ms: now_ms,
                        }
                    });
                }
                expected.iter().map(|&d| (d, entry(body.clone()))).collect()
            }
        };
        let to_user = store.to_user;
        let append = Append {
            to_user,
            dedup: store
                .dedup
                .then_some((store.from_user, store.from_device, store.msg_id)),
            entries,
            now_ms,
        };
        let server = self.clone();
        Box::pin(async move {
            match server.inbox.append(append).await {
                // The inbox hands stored entries to their devices' connections.
                Ok(AppendOutcome::Stored { server_time_ms, .. }) => {
                    Stored::Stored { server_time_ms }
                }
                Ok(AppendOutcome::Duplicate { server_time_ms }) => {
                    Stored::Duplicate { server_time_ms }
                }
                Ok(AppendOutcome::Full { devices }) => Stored::Full { devices },
                Err(e) => stored_refusal(crate::server::inbox_error(e)),
            }
        })
    }

    /// One request to a peer at our epoch `epoch`.
    pub(crate) async fn call_peer(
        &self,
        node: NodeId,
        epoch: u64,
        request: PeerRequest,
    ) -> Result<PeerResponse, String> {
        let Some(peers) = self.peers.get() else {
            return Err("this node has no peer links".into());
        };
        let addr = self
            .routing
            .ring()
            .member(node)
            .and_then(|m| m.info.peer_addr.clone())
            .ok_or_else(|| format!("node {node} advertises no peer address"))?;
        self.metrics.peer_requests_sent.fetch_add(1, Relaxed);
        let bytes = peers
            .call(
                node,
                &addr,
                encode_request(epoch, request)?,
                PEER_CALL_TIMEOUT,
            )
            .await
            .map_err(|e| e.to_string())?;
        let response = decode_response(&bytes)?;
        if matches!(response, PeerResponse::WrongOwner { .. }) {
            self.metrics.peer_wrong_owner.fetch_add(1, Relaxed);
        }
        Ok(response)
    }

    /// A `DeviceListRequest` or `PrekeyClaim` about a user another node owns.
    pub(crate) async fn query(
        &self,
        user: UserId,
        device: DeviceId,
        target: UserId,
        body: Body,
    ) -> Answer {
        let Ok(frame) = Frame::new(0, body).encode() else {
            return error(ErrorCode::Internal, "cannot encode the query");
        };
        for _ in 0..ROUTE_ATTEMPTS_MAX {
            let Route::Remote { node, epoch, .. } = self.routing.route(target) else {
                return error(
                    ErrorCode::WrongOwner,
                    "the user moved while the request was routed; retry",
                );
            };
            let request = PeerRequest::Query {
                from_user: user,
                from_device: device,
                frame: frame.to_vec(),
            };
            match self.call_peer(node, epoch, request).await {
                Ok(PeerResponse::Frames(frames)) => return relayed_frames(node, &frames),
                Ok(PeerResponse::Error { code, message }) => return refused(code, message, 0),
                Ok(PeerResponse::WrongOwner { epoch: theirs }) => {
                    self.routing
                        .wait_epoch(theirs.max(epoch + 1), EPOCH_CATCH_UP_WAIT)
                        .await;
                }
                Ok(other) => {
                    return error(
                        ErrorCode::Internal,
                        &format!("node {node} answered a query with {other:?}"),
                    )
                }
                Err(e) => {
                    debug!(node, error = %e, "query failed");
                    tokio::time::sleep(ROUTE_RETRY_PAUSE).await;
                }
            }
        }
        Answer::Error {
            code: ErrorCode::WrongOwner,
            message: format!("could not reach the owner of user {target}; retry"),
            retry_after_ms: ROUTE_RETRY_AFTER_MS,
        }
    }

    /// Serves a request from node `from`, routed at its `epoch`.
    pub fn serve_peer(
        self: &Arc<Self>,
        from: NodeId,
        epoch: u64,
        request: PeerRequest,
    ) -> BoxFuture<'static, PeerResponse> {
        self.metrics.peer_requests_served.fetch_add(1, Relaxed);
        // The common case first, without yielding, so that stores from one link are queued in
        // the order they arrived.
        if let PeerRequest::Store(store) = &request {
            if self.routing.epoch() >= epoch {
                if let Route::Local { shard } = self.routing.route(store.to_user) {
                    if self.routing.is_ready(shard) && self.routing.lease_valid() {
                        let PeerRequest::Store(store) = request else {
                            unreachable!()
                        };
                        let stored = self.store_local(store);
                        return Box::pin(async move { PeerResponse::Stored(stored.await) });
                    }
                }
            }
        }
        let server = self.clone();
        Box::pin(async move {
            if server.routing.epoch() < epoch {
                server.routing.wait_epoch(epoch, EPOCH_CATCH_UP_WAIT).await;
            }
            match request {
                PeerRequest::Store(store) => {
                    if server.gate(store.to_user).await.is_err() {
                        return wrong_owner(&server);
                    }
                    if !server.routing.lease_valid() {
                        return PeerResponse::Stored(lease_lost());
                    }
                    PeerResponse::Stored(server.store_local(store).await)
                }
                PeerRequest::Typing {
                    to,
                    from_user,
                    from_device,
                    typing,
                    recording,
                } => {
                    if server.serves_here(to).is_none() {
                        server.push_typing(to, from_user, from_device, typing, recording, None);
                    }
                    PeerResponse::Done
                }
                PeerRequest::GroupTyping {
                    group,
                    to,
                    from_user,
                    from_device,
                    typing,
                    recording,
                } => {
                    for &u in to.iter().take(ringpost_wire::limits::GROUP_MEMBERS_MAX) {
                        if server.serves_here(u).is_none() {
                            let g = Some(group);
                            server.push_typing(u, from_user, from_device, typing, recording, g);
                        }
                    }
                    PeerResponse::Done
                }
                PeerRequest::PresenceWatch {
                    register,
                    targets,
                    viewers,
                } => {
                    if targets.len() > ringpost_wire::limits::PRESENCE_USERS_MAX
                        || viewers.len() > crate::presence::PRESENCE_VIEWERS_PER_CALL_MAX
                    {
                        return PeerResponse::Error {
                            code: ErrorCode::LimitExceeded.as_u16(),
                            message: "too many targets or viewers in one presence watch".into(),
                        };
                    }
                    PeerResponse::PresenceViews(
                        server
                            .serve_presence_watch(from, register, targets, viewers)
                            .await,
                    )
                }
                PeerRequest::PresenceUnwatch { targets } => {
                    for t in targets {
                        server.presence.set_interest(t, from, false);
                    }
                    PeerResponse::Done
                }
                PeerRequest::PresenceChanged {
                    target,
                    raw,
                    policy_changed,
                } => {
                    if server.presence_changed(target, raw, policy_changed) {
                        PeerResponse::Done
                    } else {
                        PeerResponse::Error {
                            code: ErrorCode::NotFound.as_u16(),
                            message: "no viewer here watches this user".into(),
                        }
                    }
                }
                PeerRequest::Query {
                    from_user,
                    from_device,
                    frame,
                } => server.serve_query(from_user, from_device, &frame).await,
                PeerRequest::Holdings { shards } => server.serve_holdings(from, shards).await,
                PeerRequest::Group {
                    from_user,
                    from_device,
                    group,
                    frame,
                } => {
                    crate::groups::serve::peer(&server, from_user, from_device, group, &frame).await
                }
                PeerRequest::Blockers { actor, users } => {
                    match crate::groups::blocks::blockers(&server, actor, &users) {
                        Ok(b) => PeerResponse::Users(b),
                        Err(crate::session::Answer::Error { code, message, .. })
                            if code != ErrorCode::WrongOwner =>
                        {
                            PeerResponse::Error {
                                code: code.as_u16(),
                                message,
                            }
                        }
                        Err(_) => wrong_owner(&server),
                    }
                }
                PeerRequest::GroupFanout(batch) => PeerResponse::GroupStored(
                    crate::groups::fanout::store_batch(&server, &batch)
                        .await
                        .into_iter()
                        .map(|(_, stored)| stored)
                        .collect(),
                ),
                PeerRequest::Replicate { parts } => {
                    crate::peer::replicate::serve(&server, from, epoch, parts).await
                }
                PeerRequest::Export {
                    shard,
                    from: cursor,
                    max_bytes,
                } => {
                    let ring = server.routing.ring();
                    if let Some(refusal) =
                        handoff_refusal(&ring, server.node_id, from, "export", &[shard])
                    {
                        return refusal;
                    }
                    let engine = server.engine.clone();
                    let max = max_bytes.clamp(1, EXPORT_CHUNK_BYTES_MAX) as usize;
                    let chunk = tokio::task::spawn_blocking(move || {
                        handoff::export_chunk(&*engine, shard, cursor.as_ref(), max)
                    })
                    .await;
                    match chunk {
                        Ok(Ok(chunk)) => PeerResponse::Chunk(chunk),
                        Ok(Err(e)) => internal(format!("exporting shard {shard}: {e}")),
                        Err(e) => internal(format!("exporting shard {shard}: {e}")),
                    }
                }
                PeerRequest::Release {
                    shard,
                    digest,
                    dedup_cutoff_ms,
                } => {
                    let ring = server.routing.ring();
                    if let Some(refusal) =
                        handoff_refusal(&ring, server.node_id, from, "release", &[shard])
                    {
                        return refusal;
                    }
                    let engine = server.engine.clone();
                    let ours = tokio::task::spawn_blocking(move || {
                        handoff::shard_digest(&*engine, shard, dedup_cutoff_ms)
                    })
                    .await;
                    match ours {
                        Ok(Ok(ours)) if ours == digest => {}
                        Ok(Ok(_)) => return PeerResponse::DigestMismatch,
                        Ok(Err(e)) => return internal(format!("digest of shard {shard}: {e}")),
                        Err(e) => return internal(format!("digest of shard {shard}: {e}")),
                    }
                    match handoff::drop_shard(&server.inbox, &server.accounts, shard).await {
                        Ok(entries) => {
                            info!(shard, to = from, entries, "shard handed off");
                            PeerResponse::Done
                        }
                        Err(e) => internal(format!("dropping shard {shard}: {e}")),
                    }
                }
            }
        })
    }

    /// Whether this node owns `shard` at its current epoch.
    fn owns(&self, shard: ShardId) -> bool {
        self.routing.ring().owner(shard) == Some(self.node_id)
    }

    async fn serve_query(
        &self,
        from_user: UserId,
        from_device: DeviceId,
        frame: &[u8],
    ) -> PeerResponse {
        let body = match Frame::decode(frame) {
            Ok(f) => f.body,
            Err(e) => {
                return PeerResponse::Error {
                    code: ErrorCode::Malformed.as_u16(),
                    message: format!("bad query frame: {e}"),
                }
            }
        };
        let target = match &body {
            Body::DeviceListRequest(r) => r.user,
            Body::PrekeyClaim(c) => c.user,
            other => {
                return PeerResponse::Error {
                    code: ErrorCode::UnexpectedFrame.as_u16(),
                    message: format!("{} cannot be forwarded", other.name()),
                }
            }
        };
        if self.gate(target).await.is_err() {
            return PeerResponse::WrongOwner {
                epoch: self.routing.epoch(),
            };
        }
        match self.device_control(from_user, from_device, body).await {
            Answer::Frames(frames) => PeerResponse::Frames(
                frames
                    .iter()
                    .filter_map(|f| f.encode().ok().map(|b| b.to_vec()))
                    .collect(),
            ),
            Answer::Error { code, message, .. } => PeerResponse::Error {
                code: code.as_u16(),
                message,
            },
            Answer::Authenticated { .. } | Answer::Redirect(_) => PeerResponse::WrongOwner {
                epoch: self.routing.epoch(),
            },
        }
    }

    /// Hand-off, serving side: close the asked shards for writes, wait until everything
    /// queued before is committed, and say which of them hold rows here.
    async fn serve_holdings(&self, from: NodeId, shards: Vec<ShardId>) -> PeerResponse {
        let ring = self.routing.ring();
        if let Some(refusal) = handoff_refusal(&ring, self.node_id, from, "ask for", &shards) {
            return refusal;
        }
        for &s in &shards {
            self.inbox.set_writable(s, false);
        }
        if let Err(e) = self.inbox.sync_barrier().await {
            return internal(format!("waiting for the writer: {e}"));
        }
        let engine = self.engine.clone();
        let held = tokio::task::spawn_blocking(move || {
            shards
                .into_iter()
                .filter(|&s| {
                    handoff::export_chunk(&*engine, s, None, 1)
                        .map(|c| !c.rows.is_empty())
                        .unwrap_or(true)
                })
                .collect::<Vec<_>>()
        })
        .await;
        match held {
            Ok(held) => {
                if !held.is_empty() {
                    info!(to = from, shards = held.len(), "handing shards off");
                }
                PeerResponse::Holdings(held)
            }
            Err(e) => internal(format!("scanning holdings: {e}")),
        }
    }

    /// Installs a new ring: shards this node lost stop taking writes and the devices of their
    /// users are asked to move (each connection is told `Migrate` to the new owner, or
    /// `GoingAway` if it has no client address: see [`crate::conn`]). Returns the shards it
    /// gained, which need a hand-off before they are served.
    pub fn install_ring(&self, ring: Ring) -> Vec<ShardId> {
        let epoch = ring.epoch;
        let pending = self.routing.install(ring);
        if let Some(replicating) = self.replicating.get() {
            replicating.set_ring(self.node_id, self.routing.ring());
        }
        let ring = self.routing.ring();
        for s in 0..ring.shard_count {
            if ring.owner(s) != Some(self.node_id) {
                self.inbox.set_writable(s, false);
            }
        }
        self.update_shard_gauges();
        let moved = self
            .registry
            .close_moved(|user| ring.owner_of(user) != Some(self.node_id));
        if moved > 0 {
            info!(
                epoch,
                devices = moved,
                "devices of users now owned elsewhere asked to move"
            );
        }
        pending
    }

    /// The hand-off of these gained shards is done: serve them (those still owned).
    pub fn set_shards_ready(&self, shards: &[ShardId]) {
        for &shard in shards {
            if self.owns(shard) {
                self.inbox.set_writable(shard, true);
                self.routing.set_ready(shard, true);
            }
        }
        self.update_shard_gauges();
    }

    fn update_shard_gauges(&self) {
        let ring = self.routing.ring();
        let (mut owned, mut ready) = (0, 0);
        for s in ring.shards_of(self.node_id) {
            owned += 1;
            ready += i64::from(self.routing.is_ready(s));
        }
        self.metrics.ring_epoch.store(ring.epoch as i64, Relaxed);
        self.metrics.shards_owned.store(owned, Relaxed);
        self.metrics.shards_ready.store(ready, Relaxed);
    }

    /// Why this node should not get new clients now, if it should not: it is not (or no
    /// longer) an active member, or it has not taken over every shard it owns yet.
    /// Resolves once [`Server::not_ready_reason`] is `None` (polled: it is for start-up, when
    /// the node waits for its membership, lease and shards).
    pub async fn wait_ready(&self) {
        while self.not_ready_reason().is_some() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    pub fn not_ready_reason(&self) -> Option<String> {
        if let Some((for_, error)) = self.inbox.storage_failing() {
            return Some(format!(
                "storage failing for {} s: {error} (writes are refused; the node reopens its \
                 database every second until that works)",
                for_.as_secs()
            ));
        }
        let ring = self.routing.ring();
        match ring.state_of(self.node_id) {
            None => return Some("not a member of the cluster yet".into()),
            Some(ringpost_coordinator::MemberState::Active) => {}
            Some(state) => return Some(format!("member state is {state}")),
        }
        if !self.routing.lease_valid() {
            return Some("no lease from the coordinator".into());
        }
        let pending = ring
            .shards_of(self.node_id)
            .filter(|&s| !self.routing.is_ready(s))
            .count();
        (pending > 0).then(|| format!("taking over {pending} shards"))
    }
}

fn wrong_owner(server: &Server) -> PeerResponse {
    PeerResponse::WrongOwner {
        epoch: server.routing.epoch(),
    }
}

fn internal(message: String) -> PeerResponse {
    warn!(error = %message, "serving a peer request failed");
    PeerResponse::Error {
        code: ErrorCode::Internal.as_u16(),
        message,
    }
}

fn stored_refusal(answer: Answer) -> Stored {
    match answer {
        Answer::Error {
            code,
            message,
            retry_after_ms,
        } => Stored::Refused {
            code: code.as_u16(),
            message,
            retry_after_ms,
        },
        _ => Stored::Refused {
            code: ErrorCode::Internal.as_u16(),
            message: "unexpected answer".into(),
            retry_after_ms: 0,
        },
    }
}

fn lease_lost_message() -> &'static str {
    "this node has lost touch with the coordinator and may no longer own the shard; retry"
}

fn lease_lost() -> Stored {
    Stored::Refused {
        code: ErrorCode::WrongOwner.as_u16(),
        message: lease_lost_message().into(),
        retry_after_ms: ROUTE_RETRY_AFTER_MS,
    }
}

fn moving() -> Answer {
    Answer::Error {
        code: ErrorCode::WrongOwner,
        message: "this user's data is being moved to this node; retry".into(),
        retry_after_ms: ROUTE_RETRY_AFTER_MS,
    }
}

fn unowned() -> Answer {
    Answer::Error {
        code: ErrorCode::WrongOwner,
        message: "no node serves this user yet (the cluster has no active member); retry".into(),
        retry_after_ms: ROUTE_RETRY_AFTER_MS,
    }
}

/// The frames a peer answered a relayed request with, as this node's answer to the device.
pub(crate) fn relayed_frames(node: NodeId, frames: &[Vec<u8>]) -> Answer {
    let mut out = Vec::with_capacity(frames.len());
    for f in frames {
        match Frame::decode(f) {
            Ok(f) => out.push(f),
            Err(e) => {
                return error(
                    ErrorCode::Internal,
                    &format!("node {node} answered with a bad frame: {e}"),
                )
            }
        }
    }
    Answer::Frames(out)
}
