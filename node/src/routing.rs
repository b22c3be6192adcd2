//! Where a user's requests go: the current [`Ring`] snapshot, which of this node's shards are
//! ready to serve, and the coordinator lease that lets this node write at all.
//!
//! - The ring is an `Arc` swapped whole when the coordinator commits a new epoch.
//! - A shard this node owns is *ready* once its hand-off is done (the rows of the previous
//!   owner, if any, have been pulled; see [`crate::cluster`]). Until then requests for its users
//!   wait a little ([`SHARD_READY_WAIT`]) and then get a retryable error.
//! - With a standalone coordinator the node holds a lease: it may write only while its last
//!   acknowledged heartbeat is recent enough that the coordinator cannot yet have marked it
//!   down and given its shards away ([`Routing::renew_lease`]). This is what keeps a node that
//!   is cut off from the coordinator (or paused) from accepting writes for a shard that now
//!   belongs to someone else. An embedded coordinator shares the node's fate: no lease.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ringpost_coordinator::NodeId;
use ringpost_wire::UserId;
use tokio::sync::watch;

use crate::ring::Ring;
use crate::shard::ShardId;

/// How long a request for a shard that is being handed to this node waits for the hand-off
/// before it is answered with a retryable error.
pub const SHARD_READY_WAIT: Duration = Duration::from_secs(5);
/// How long a peer request carrying a newer epoch than ours waits for our watch to catch up.
pub const EPOCH_CATCH_UP_WAIT: Duration = Duration::from_secs(2);

/// Where a user lives at the current epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node owns the user's shard.
    Local { shard: ShardId },
    /// Another node does.
    Remote {
        shard: ShardId,
        node: NodeId,
        epoch: u64,
    },
    /// No member is active (the cluster is empty or this node has not joined yet).
    Unowned,
}

/// See the module documentation.
pub struct Routing {
    node_id: NodeId,
    ring: RwLock<Arc<Ring>>,
    ready: Box<[AtomicBool]>,
    /// Bumped whenever the ring or a shard's readiness changes; waiters watch it.
    changed: watch::Sender<u64>,
    /// Milliseconds since `started` until which this node may write; `u64::MAX` when the node
    /// needs no lease (embedded coordinator).
    lease_until_ms: AtomicU64,
    started: Instant,
}

impl Routing {
    /// Nothing owned, nothing ready: the node serves no user until it has joined.
    pub fn new(node_id: NodeId, shard_count: u16) -> Routing {
        Routing {
            node_id,
            ring: RwLock::new(Arc::new(Ring::empty(shard_count))),
            ready: (0..shard_count).map(|_| AtomicBool::new(false)).collect(),
            changed: watch::channel(0).0,
            lease_until_ms: AtomicU64::new(u64::MAX),
            started: Instant::now(),
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The current snapshot.
    pub fn ring(&self) -> Arc<Ring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn epoch(&self) -> u64 {
        self.ring().epoch
    }

    /// Swaps in a new snapshot. Shards this node no longer owns stop being ready; shards it
    /// owned before and still owns stay ready. Returns the shards it owns now that are not
    /// ready (they need a hand-off before they are served).
    pub fn install(&self, ring: Ring) -> Vec<ShardId> {
        let mut pending = Vec::new();
        {
            let mut current = self.ring.write().unwrap_or_else(|e| e.into_inner());
            for (s, ready) in self.ready.iter().enumerate() {
                let s = s as ShardId;
                if ring.owner(s) != Some(self.node_id) {
                    ready.store(false, Relaxed);
                } else if !ready.load(Relaxed) {
                    pending.push(s);
                }
            }
            *current = Arc::new(ring);
        }
        self.changed.send_modify(|v| *v += 1);
        pending
    }

    /// Marks an owned shard ready (hand-off done) or not.
    pub fn set_ready(&self, shard: ShardId, ready: bool) {
        if let Some(flag) = self.ready.get(usize::from(shard)) {
            flag.store(ready, Relaxed);
            self.changed.send_modify(|v| *v += 1);
        }
    }

    pub fn is_ready(&self, shard: ShardId) -> bool {
        self.ready
            .get(usize::from(shard))
            .is_some_and(|f| f.load(Relaxed))
    }

    /// Where `user` lives now.
    pub fn route(&self, user: UserId) -> Route {
        let ring = self.ring();
        let shard = ring.shard_of(user);
        match ring.owner(shard) {
            Some(node) if node == self.node_id => Route::Local { shard },
            Some(node) => Route::Remote {
                shard,
                node,
                epoch: ring.epoch,
            },
            None => Route::Unowned,
        }
    }

    /// The node key the current view binds `node` to, waiting up to `wait` for a view that
    /// has one (a node that joined a moment ago may not be in this node's view yet).
    pub async fn node_key(&self, node: NodeId, wait: Duration) -> Option<[u8; 32]> {
        let mut rx = self.changed.subscribe();
        let key = || {
            self.ring()
                .member(node)
                .and_then(|m| m.info.node_key_bytes())
        };
        let find = async {
            loop {
                if let Some(key) = key() {
                    return Some(key);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(wait, find).await.ok().flatten()
    }

    /// Waits until the epoch is at least `epoch`; false on timeout.
    pub async fn wait_epoch(&self, epoch: u64, timeout: Duration) -> bool {
        let mut rx = self.changed.subscribe();
        let wait = async {
            while self.epoch() < epoch {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok() && self.epoch() >= epoch
    }

    /// Waits until this node owns and has taken over `user`'s shard, or the route changes, or
    /// the timeout passes; returns the route then.
    pub async fn wait_ready(&self, user: UserId, timeout: Duration) -> Route {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                match self.route(user) {
                    Route::Local { shard } if !self.is_ready(shard) => {
                        if rx.changed().await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.route(user)
    }

    /// The coordinator acknowledged a heartbeat sent at `sent`; the node may write until
    /// `sent + valid_for`.
    pub fn renew_lease(&self, sent: Instant, valid_for: Duration) {
        let until = sent.saturating_duration_since(self.started) + valid_for;
        let until = u64::try_from(until.as_millis()).unwrap_or(u64::MAX - 1);
        // Without a lease requirement the value is u64::MAX and stays so.
        self.lease_until_ms.fetch_max(until, Relaxed);
    }

    /// Starts requiring a lease (standalone coordinator): nothing may be written until the
    /// first heartbeat is acknowledged.
    pub fn require_lease(&self) {
        self.lease_until_ms.store(0, Relaxed);
    }

    /// Whether this node may write now.
    pub fn lease_valid(&self) -> bool {
        let until = self.lease_until_ms.load(Relaxed);
        until == u64::MAX || (self.started.elapsed().as_millis() as u64) < until
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringpost_coordinator::{testing, ClusterView, MemberState};

    fn view(epoch: u64, active: &[NodeId]) -> ClusterView {
        let active: Vec<_> = active.iter().map(|&id| (id, MemberState::Active)).collect();
        testing::view(epoch, 64, 1, &active)
    }

    #[tokio::test]
    async fn a_node_key_is_waited_for_until_a_view_has_it() {
        let r = Arc::new(Routing::new(1, 64));
        let wait = Duration::from_secs(5);
        assert_eq!(r.node_key(2, Duration::from_millis(20)).await, None);
        let asked = tokio::spawn({
            let r = r.clone();
            async move { r.node_key(2, wait).await }
        });
        // A view without node 2's key first, then one with it.
        r.install(Ring::from_view(&view(1, &[1, 2])));
        tokio::task::yield_now().await;
        let mut with_key = view(1, &[1, 2]);
        with_key.members[1].info.node_key = Some("ab".repeat(32));
        r.install(Ring::from_view(&with_key));
        assert_eq!(asked.await.unwrap(), Some([0xab; 32]));
        assert_eq!(r.node_key(3, Duration::from_millis(20)).await, None);
    }

    #[tokio::test]
    async fn shards_become_ready_only_after_hand_off_and_stop_when_lost() {
        let r = Routing::new(1, 64);
        assert_eq!(r.route(5), Route::Unowned);
        let pending = r.install(Ring::from_view(&view(1, &[1])));
        assert_eq!(pending.len(), 64, "a fresh node takes every shard over");
        assert!(!r.is_ready(0));
        for s in pending {
            r.set_ready(s, true);
        }
        let pending = r.install(Ring::from_view(&view(2, &[1, 2])));
        assert!(pending.is_empty(), "kept shards stay ready");
        let ring = r.ring();
        for s in 0..64 {
            assert_eq!(r.is_ready(s), ring.owner(s) == Some(1));
        }
        let user = (0..1000u64).find(|&u| ring.owner_of(u) == Some(2)).unwrap();
        assert!(matches!(
            r.route(user),
            Route::Remote {
                node: 2,
                epoch: 2,
                ..
            }
        ));
        assert!(r.wait_epoch(2, Duration::from_millis(10)).await);
        assert!(!r.wait_epoch(3, Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn wait_ready_returns_when_the_hand_off_finishes() {
        let r = Arc::new(Routing::new(1, 64));
        let pending = r.install(Ring::from_view(&view(1, &[1])));
        let shard = r.ring().shard_of(7);
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.wait_ready(7, Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        assert!(pending.contains(&shard));
        r.set_ready(shard, true);
        assert_eq!(waiter.await.unwrap(), Route::Local { shard });
    }

    #[test]
    fn the_lease_gates_writes_once_required() {
        let r = Routing::new(1, 4);
        assert!(r.lease_valid(), "no lease needed by default");
        r.require_lease();
        assert!(!r.lease_valid());
        r.renew_lease(Instant::now(), Duration::from_secs(5));
        assert!(r.lease_valid());
        r.require_lease();
        r.renew_lease(Instant::now(), Duration::ZERO);
        assert!(!r.lease_valid(), "a lease ends");
    }
}
