//! Presence: who is online, when they were last seen, and who may know it.
//!
//! Two roles, both in every node:
//! - **Owner** of a user (its shard is here, so all its devices connect here): knows whether
//!   any device is online (the connection registry) and the last-seen time (persisted by
//!   [`crate::contacts`] when the last device goes). It keeps, per user, the set of *nodes*
//!   interested in it ([`Presence::interest`]), never individual connections, and sends each
//!   change once per interested node.
//! - **Subscriber** on behalf of its connections: a map target → local viewer connections
//!   ([`Presence::watches`]). The first local viewer of a target registers the node's interest
//!   with the target's owner (one registration per target per node); the last one to go
//!   withdraws it.
//!
//! Privacy: the owner sends the raw change (online, last seen) to the node, and the node, a
//! trusted server, filters it per viewer with a [`Grant`] the owner computed for that viewer
//! (blocks, visibilities, the target's contact list). Grants are asked when a viewer
//! subscribes, and again for every local viewer when the owner says the target's policy changed
//! (privacy settings, contacts or blocks); until the new grant arrives, the viewer's old grant is
//! dropped and it sees nothing. A viewer is pushed a `PresenceUpdate` only when what it may see
//! changes, so a hidden change does not show up as a frame either. The choice costs one grant
//! query per viewer at subscribe and per policy change, and one message per node per presence
//! change, which is the frequent event.
//!
//! Delivery: a change the owner could not send to an interested node (its link broke, or the
//! node paused) is sent again with backoff, a few times, each time with the state as it is by
//! then ([`serve::PRESENCE_CHANGE_ATTEMPTS_MAX`]); a change reaching a node twice, or late, is
//! harmless (the subscriber keeps the highest `seq`).
//!
//! Owner change: when the ring moves, subscriber nodes re-register every watched target whose
//! owner changed with the new owner (the old one's interest in targets it lost is dropped), and
//! push what changed. A registration that fails (the owner unreachable, or not serving the
//! target yet) is retried with backoff ([`register_retry_delay`]: from
//! [`PRESENCE_RETRY_BACKOFF_MIN`], doubling up to [`PRESENCE_RETRY_BACKOFF_MAX`], with jitter)
//! until it is taken, the ring changes (the ring change registers every target whose owner is
//! not the one registered with, and starts over), or no local viewer watches the target any
//! more. One task per node runs the retries ([`Presence::take_due_register_retries`]), a
//! bounded round at a time, and stops trying an owner for the round at its first failed call.
//!
//! This module holds the state and its rules, with no IO; `presence/serve.rs` runs it against
//! the registry, the contacts service and the peer links.

pub(crate) mod serve;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ringpost_coordinator::NodeId;
use ringpost_wire::limits::TYPING_PER_S_MAX;
use ringpost_wire::{DeviceId, PresenceUpdate, UserId};
use serde::{Deserialize, Serialize};
use std::num::NonZeroU32;

use crate::contacts::Grant;
use crate::registry::ConnShared;

/// (target, node) interest entries one owner keeps at most; a registration past it is refused
/// (`LimitExceeded`). About 100 bytes each: 100 MB at worst.
pub const PRESENCE_INTEREST_MAX: usize = 1_000_000;
/// Viewers whose grants one peer request asks for; more go in several requests.
pub const PRESENCE_VIEWERS_PER_CALL_MAX: usize = 1024;
/// Pause before the first retry of a failed registration (see [`register_retry_delay`]).
pub const PRESENCE_RETRY_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest pause between two retries of a failed registration.
pub const PRESENCE_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Targets one retry round takes; the others wait for the next round. Bounds a round's peer
/// calls (at most one per target per viewer chunk). The queue itself holds at most one entry
/// per watched target, about 60 bytes each.
pub const PRESENCE_RETRIES_PER_ROUND_MAX: usize = 1024;

/// How long to wait before retrying a registration that failed `failures + 1` times:
/// [`PRESENCE_RETRY_BACKOFF_MIN`] doubled per earlier failure, capped at
/// [`PRESENCE_RETRY_BACKOFF_MAX`], then scaled into its upper half by `jitter` (in `[0, 1]`)
/// so that the targets of one lost owner do not all come back at once.
pub fn register_retry_delay(failures: u32, jitter: f64) -> Duration {
    crate::backoff::delay(
        PRESENCE_RETRY_BACKOFF_MIN,
        PRESENCE_RETRY_BACKOFF_MAX,
        failures.saturating_add(1),
        jitter,
    )
}

/// A user's raw presence, as its owner knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RawPresence {
    pub online: bool,
    pub last_seen_ms: u64,
    /// Increases with every state the owner reads ([`Presence::next_seq`]): changes are sent
    /// by independent peer calls that may arrive out of order, and a subscriber keeps the
    /// state with the highest `seq` from its registered owner.
    pub seq: u64,
}

/// One target's state and the grants of the viewers asked, answered by its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceView {
    pub target: UserId,
    /// False: the answering node does not own the target (any more); nothing else is set.
    pub owned: bool,
    pub raw: RawPresence,
    /// One per viewer asked, in the order asked.
    pub grants: Vec<Grant>,
}

/// What a viewer may see of `raw` under `grant`.
pub fn visible(target: UserId, raw: RawPresence, grant: Grant) -> PresenceUpdate {
    PresenceUpdate {
        user: target,
        online: raw.online && grant.online,
        last_seen_ms: if grant.last_seen { raw.last_seen_ms } else { 0 },
    }
}

/// A connection watching a target.
struct Viewer {
    user: UserId,
    conn: Arc<ConnShared>,
    /// `None` until the owner answered (or after a policy change, until it answers again):
    /// the viewer sees nothing meanwhile.
    grant: Option<Grant>,
    /// What the viewer was last shown.
    shown: Option<PresenceUpdate>,
}

/// The local viewers of one target.
#[derive(Default)]
struct Watch {
    /// The node this node's interest is registered with, if it is.
    registered: Option<NodeId>,
    /// Last raw state heard from the owner.
    raw: RawPresence,
    /// By connection id.
    viewers: HashMap<u64, Viewer>,
}

/// Counters, rendered as `ringpost_presence_*`.
#[derive(Debug, Default)]
pub struct PresenceMetrics {
    /// Owner side: (target, node) interest entries held now.
    pub interest_entries: AtomicI64,
    /// Owner side: registrations of a node's interest received.
    pub subscribes_received: AtomicU64,
    /// Subscriber side: registrations this node sent to owners (one per target per owner).
    pub subscribes_sent: AtomicU64,
    /// Owner side: change messages sent to interested nodes (this node included).
    pub changes_sent: AtomicU64,
    /// Subscriber side: `PresenceUpdate` frames pushed to viewers.
    pub updates_pushed: AtomicU64,
    /// Typing indicators dropped: over the rate, or from a blocked sender.
    pub typing_dropped: AtomicU64,
    /// 1:1 messages from a blocked sender, answered `Ok` and dropped.
    pub blocked_sends: AtomicU64,
    /// Subscriber side: retries of registrations that had failed.
    pub register_retries: AtomicU64,
    /// Owner side: changes sent again to a node the first attempt did not reach.
    pub change_retries: AtomicU64,
}

impl PresenceMetrics {
    /// Appends the metrics in the text exposition format.
    pub fn render(&self, out: &mut String) {
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        gauge(
            out,
            "ringpost_presence_interest_entries",
            "Owner side: (user, node) presence interest entries held.",
            self.interest_entries.load(Relaxed),
        );
        counter(
            out,
            "ringpost_presence_subscribes_received_total",
            "Owner side: registrations of a node's interest in a user received.",
            self.subscribes_received.load(Relaxed),
        );
        counter(
            out,
            "ringpost_presence_subscribes_sent_total",
            "Subscriber side: registrations of this node's interest sent to owners.",
            self.subscribes_sent.load(Relaxed),
        );
        counter(
            out,
            "ringpost_presence_changes_sent_total",
            "Owner side: presence changes sent, one per interested node.",
            self.changes_sent.load(Relaxed),
        );
        counter(
            out,
            "ringpost_presence_updates_pushed_total",
            "PresenceUpdate frames pushed to viewers.",
            self.updates_pushed.load(Relaxed),
        );
        counter(
            out,
            "ringpost_presence_typing_dropped_total",
            "Typing indicators dropped (over the rate, or from a blocked sender).",
            self.typing_dropped.load(Relaxed),
        );
        counter(
            out,
            "ringpost_presence_blocked_sends_total",
            "1:1 messages from a sender the recipient blocks, answered Ok and dropped.",
            self.blocked_sends.load(Relaxed),
        );
        counter(
            out,
            "ringpost_presence_register_retries_total",
            "Subscriber side: retries of registrations of this node's interest that had failed.",
            self.register_retries.load(Relaxed),
        );
        counter(
            out,
            "ringpost_presence_change_retries_total",
            "Owner side: presence changes sent again to a node the first attempt did not reach.",
            self.change_retries.load(Relaxed),
        );
    }
}

/// A frame to push to a viewer's connection.
pub struct Push {
    pub conn: Arc<ConnShared>,
    pub update: PresenceUpdate,
}

/// The presence state of one node (see the module doc).
pub struct Presence {
    /// Owner side: target → interested nodes.
    interest: Mutex<HashMap<UserId, BTreeSet<NodeId>>>,
    /// Owner side: local users with a device online.
    online: Mutex<BTreeSet<UserId>>,
    /// Subscriber side: target → local viewers.
    watches: Mutex<HashMap<UserId, Watch>>,
    /// Subscriber side: connection id → the targets it watches (at most PRESENCE_USERS_MAX).
    by_conn: Mutex<HashMap<u64, Vec<UserId>>>,
    /// Subscriber side: watched targets whose registration failed, with when to retry.
    retries: Mutex<RegisterRetries>,
    /// Wakes the retry task when a retry is queued.
    retry_queued: tokio::sync::Notify,
    /// Typing indicators per sending device: [`TYPING_PER_S_MAX`] a second, no burst beyond
    /// it. Pruned with the node's other limiters.
    typing: DefaultKeyedRateLimiter<(UserId, DeviceId)>,
    /// See [`RawPresence::seq`]; starts at the wall clock in microseconds, so it still grows
    /// across a restart of the owner.
    seq: AtomicU64,
    pub metrics: PresenceMetrics,
}

impl Default for Presence {
    fn default() -> Self {
        let rate = NonZeroU32::new(TYPING_PER_S_MAX).unwrap_or(NonZeroU32::MIN);
        Presence {
            interest: Default::default(),
            online: Default::default(),
            watches: Default::default(),
            by_conn: Default::default(),
            retries: Default::default(),
            retry_queued: Default::default(),
            typing: RateLimiter::keyed(Quota::per_second(rate)),
            seq: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(0),
            ),
            metrics: Default::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Failed registrations waiting for their retry: each target once, with how many times it
/// failed, ordered by when it is due.
#[derive(Default)]
struct RegisterRetries {
    by_target: HashMap<UserId, (u32, Instant)>,
    by_due: BTreeSet<(Instant, UserId)>,
}

/// What replacing a connection's subscription set asks of the owners.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replaced {
    /// Targets newly watched by the connection, each with whether this node must register its
    /// interest (no other local viewer had).
    pub added: Vec<(UserId, bool)>,
    /// Targets no local viewer watches any more: withdraw the interest from this owner.
    pub dropped: Vec<(UserId, NodeId)>,
}

impl Presence {
    /// The `seq` of a state read now.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Relaxed)
    }

    /// Whether a typing indicator from this device may go out now (else it is dropped).
    pub fn typing_allowed(&self, user: UserId, device: DeviceId) -> bool {
        let allowed = self.typing.check_key(&(user, device)).is_ok();
        if !allowed {
            self.metrics.typing_dropped.fetch_add(1, Relaxed);
        }
        allowed
    }

    /// Drops idle typing-limiter state.
    pub fn prune(&self) {
        self.typing.retain_recent();
        self.typing.shrink_to_fit();
    }

    // ---- owner side -------------------------------------------------------------------------

    /// Registers (or withdraws) `node`'s interest in `target`; false if the bound is reached.
    pub fn set_interest(&self, target: UserId, node: NodeId, interested: bool) -> bool {
        let mut map = lock(&self.interest);
        if interested {
            let total = self.metrics.interest_entries.load(Relaxed);
            if total >= PRESENCE_INTEREST_MAX as i64 {
                return false;
            }
            self.metrics.subscribes_received.fetch_add(1, Relaxed);
            if map.entry(target).or_default().insert(node) {
                self.metrics.interest_entries.fetch_add(1, Relaxed);
            }
        } else if let Some(nodes) = map.get_mut(&target) {
            if nodes.remove(&node) {
                self.metrics.interest_entries.fetch_sub(1, Relaxed);
            }
            if nodes.is_empty() {
                map.remove(&target);
            }
        }
        true
    }

    /// The nodes interested in `target`.
    pub fn interested(&self, target: UserId) -> Vec<NodeId> {
        lock(&self.interest)
            .get(&target)
            .map(|n| n.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Drops the interest in targets this node no longer owns (their subscribers register with
    /// the new owner) and of nodes no longer members (their changes could never be sent), and
    /// forgets the online state of users it no longer owns.
    pub fn retain_owned(&self, owned: impl Fn(UserId) -> bool, member: impl Fn(NodeId) -> bool) {
        let mut map = lock(&self.interest);
        let mut removed = 0;
        map.retain(|t, nodes| {
            if !owned(*t) {
                removed += nodes.len() as i64;
                return false;
            }
            let before = nodes.len();
            nodes.retain(|&n| member(n));
            removed += (before - nodes.len()) as i64;
            !nodes.is_empty()
        });
        self.metrics.interest_entries.fetch_sub(removed, Relaxed);
        lock(&self.online).retain(|u| owned(*u));
    }

    /// Records that `user` has a device online; true if it was offline.
    pub fn came_online(&self, user: UserId) -> bool {
        lock(&self.online).insert(user)
    }

    /// Records that `user` has no device online; true if it was online.
    pub fn went_offline(&self, user: UserId) -> bool {
        lock(&self.online).remove(&user)
    }

    pub fn is_online(&self, user: UserId) -> bool {
        lock(&self.online).contains(&user)
    }

    // ---- subscriber side --------------------------------------------------------------------

    /// Makes `targets` the whole subscription set of connection `conn` (of `viewer`).
    pub fn replace(&self, conn: &Arc<ConnShared>, viewer: UserId, targets: &[UserId]) -> Replaced {
        let wanted: BTreeSet<UserId> = targets.iter().copied().collect();
        let old: BTreeSet<UserId> = lock(&self.by_conn)
            .get(&conn.id)
            .map(|v| v.iter().copied().collect())
            .unwrap_or_default();
        let mut out = Replaced::default();
        let mut watches = lock(&self.watches);
        for &t in old.difference(&wanted) {
            if let Some(dropped) = remove_viewer(&mut watches, t, conn.id) {
                out.dropped.push((t, dropped));
            }
        }
        for &t in wanted.difference(&old) {
            let w = watches.entry(t).or_default();
            let register = w.viewers.is_empty() && w.registered.is_none();
            w.viewers.insert(
                conn.id,
                Viewer {
                    user: viewer,
                    conn: conn.clone(),
                    grant: None,
                    shown: None,
                },
            );
            out.added.push((t, register));
        }
        drop(watches);
        let mut by_conn = lock(&self.by_conn);
        if wanted.is_empty() {
            by_conn.remove(&conn.id);
        } else {
            by_conn.insert(conn.id, wanted.into_iter().collect());
        }
        out
    }

    /// Forgets a closed connection's subscriptions; answers the targets to withdraw.
    pub fn connection_closed(&self, conn_id: u64) -> Vec<(UserId, NodeId)> {
        let Some(targets) = lock(&self.by_conn).remove(&conn_id) else {
            return Vec::new();
        };
        let mut watches = lock(&self.watches);
        targets
            .into_iter()
            .filter_map(|t| remove_viewer(&mut watches, t, conn_id).map(|n| (t, n)))
            .collect()
    }

    /// Notes that this node's interest in `target` is registered with `owner` (another
    /// owner's `seq` is not comparable: it starts over).
    pub fn set_registered(&self, target: UserId, owner: Option<NodeId>) {
        if let Some(w) = lock(&self.watches).get_mut(&target) {
            if w.registered != owner {
                w.raw.seq = 0;
            }
            w.registered = owner;
        }
    }

    /// The owner this node's interest in `target` is registered with, if watched.
    pub fn registered(&self, target: UserId) -> Option<Option<NodeId>> {
        lock(&self.watches).get(&target).map(|w| w.registered)
    }

    /// Every watched target and the owner it is registered with.
    pub fn watched(&self) -> Vec<(UserId, Option<NodeId>)> {
        lock(&self.watches)
            .iter()
            .map(|(t, w)| (*t, w.registered))
            .collect()
    }

    /// Queues a retry of `target`'s registration, which failed `failures + 1` times, at `due`
    /// (see [`register_retry_delay`]). Nothing if it is queued already, or not watched here.
    pub fn queue_register_retry(&self, target: UserId, failures: u32, due: Instant) {
        if !self.is_watched(target) {
            return;
        }
        let mut retries = lock(&self.retries);
        if retries.by_target.contains_key(&target) {
            return;
        }
        retries.by_target.insert(target, (failures, due));
        retries.by_due.insert((due, target));
        drop(retries);
        self.retry_queued.notify_one();
    }

    /// Takes up to `max` retries due at `now`, earliest first, each with how many times it
    /// failed. Targets no longer watched, or registered meanwhile, are dropped instead.
    pub fn take_due_register_retries(&self, now: Instant, max: usize) -> Vec<(UserId, u32)> {
        let mut taken = Vec::new();
        let mut retries = lock(&self.retries);
        while taken.len() < max {
            let Some(&(due, target)) = retries.by_due.first() else {
                break;
            };
            if due > now {
                break;
            }
            retries.by_due.remove(&(due, target));
            if let Some((failures, _)) = retries.by_target.remove(&target) {
                taken.push((target, failures));
            }
        }
        drop(retries);
        taken.retain(|(target, _)| self.registered(*target) == Some(None));
        taken
    }

    /// When the earliest queued retry is due, if any.
    pub fn next_register_retry(&self) -> Option<Instant> {
        lock(&self.retries).by_due.first().map(|(due, _)| *due)
    }

    /// Forgets every queued retry: the ring changed, and its change registers every watched
    /// target whose owner is not the one registered with.
    pub fn clear_register_retries(&self) {
        let mut retries = lock(&self.retries);
        retries.by_target.clear();
        retries.by_due.clear();
    }

    /// Resolves once a retry was queued since the last call (a permit is kept if nobody waits).
    pub async fn register_retry_queued(&self) {
        self.retry_queued.notified().await
    }

    /// The distinct viewer users watching `target` here.
    pub fn viewers(&self, target: UserId) -> Vec<UserId> {
        let set: BTreeSet<UserId> = lock(&self.watches)
            .get(&target)
            .map(|w| w.viewers.values().map(|v| v.user).collect())
            .unwrap_or_default();
        set.into_iter().collect()
    }

    /// Whether any local viewer watches `target`.
    pub fn is_watched(&self, target: UserId) -> bool {
        lock(&self.watches).contains_key(&target)
    }

    /// A policy change of `target`: every local viewer's grant is void until asked again.
    pub fn void_grants(&self, target: UserId) {
        if let Some(w) = lock(&self.watches).get_mut(&target) {
            for v in w.viewers.values_mut() {
                v.grant = None;
            }
        }
    }

    /// Applies an owner's answer: the target's raw state and, for `viewers` (the users asked,
    /// in order), their grants. Returns what to push: every viewer whose visible view changed
    /// (or, with `initial`, a viewer shown nothing yet).
    pub fn apply_view(&self, view: &PresenceView, viewers: &[UserId]) -> Vec<Push> {
        let mut watches = lock(&self.watches);
        let Some(w) = watches.get_mut(&view.target) else {
            return Vec::new();
        };
        if view.raw.seq >= w.raw.seq {
            w.raw = view.raw;
        }
        for v in w.viewers.values_mut() {
            if let Some(i) = viewers.iter().position(|u| *u == v.user) {
                if let Some(g) = view.grants.get(i) {
                    v.grant = Some(*g);
                }
            }
        }
        self.collect_pushes(view.target, w)
    }

    /// A change of `target`'s raw state from its owner; what to push.
    pub fn apply_change(&self, target: UserId, raw: RawPresence) -> Vec<Push> {
        let mut watches = lock(&self.watches);
        let Some(w) = watches.get_mut(&target) else {
            return Vec::new();
        };
        if raw.seq < w.raw.seq {
            return Vec::new();
        }
        w.raw = raw;
        self.collect_pushes(target, w)
    }

    fn collect_pushes(&self, target: UserId, w: &mut Watch) -> Vec<Push> {
        let raw = w.raw;
        let mut out = Vec::new();
        for v in w.viewers.values_mut() {
            let Some(grant) = v.grant else { continue };
            let update = visible(target, raw, grant);
            if v.shown.as_ref() != Some(&update) {
                v.shown = Some(update.clone());
                out.push(Push {
                    conn: v.conn.clone(),
                    update,
                });
            }
        }
        out
    }
}

/// Removes a viewer; `Some(owner)` if it was the target's last local viewer and the interest
/// was registered with `owner`.
fn remove_viewer(
    watches: &mut HashMap<UserId, Watch>,
    target: UserId,
    conn_id: u64,
) -> Option<NodeId> {
    let w = watches.get_mut(&target)?;
    w.viewers.remove(&conn_id);
    if !w.viewers.is_empty() {
        return None;
    }
    let registered = w.registered;
    watches.remove(&target);
    registered
}

#[cfg(test)]
mod tests;
