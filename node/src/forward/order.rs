//! Keeps the stores of one conversation (a sender device and a recipient user) in the order
//! their frames arrived while one of them is forwarded or retried.
//!
//! A client pipelines sends, and the connection answers them in frame order. A store that goes
//! over the peer link can be refused (`WrongOwner`, a broken link) and retried after the ring
//! moved; if a later send of the same conversation were meanwhile stored by the new owner, the
//! earlier one would be acked first yet delivered second. So while a conversation has a routed
//! store unresolved, its stores run one at a time, in arrival order: each waits for the one
//! before to finish (with all its retries) before its first attempt. A conversation with
//! nothing routed in flight takes the local fast path without waiting, so the common case
//! (sender and recipient on this node, nothing moving) pays one map lookup.
//!
//! The queue is a fair (FIFO) [`tokio::sync::Mutex`] per busy conversation; waiters join it on
//! their first poll, which the connection driver does in frame order. Entries live only while
//! some store of the conversation is in flight, so the map is bounded by the stores in flight.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use ringpost_wire::{DeviceId, UserId};

/// Sender user, sender device, recipient user.
pub(crate) type ConversationKey = (UserId, DeviceId, UserId);

/// Shards of the map (independent locks, so connections on different cores rarely meet).
const SHARDS: usize = 64;

type Queue = Arc<tokio::sync::Mutex<()>>;

/// The per-conversation queues of stores that must keep their order.
pub(crate) struct ConversationOrder {
    shards: Vec<Mutex<HashMap<ConversationKey, Queue>>>,
    hasher: std::collections::hash_map::RandomState,
}

/// A place in a conversation's queue: [`Ticket::wait`] resolves once every store queued
/// before it finished; dropping it (after the store, or on cancellation) lets the next go.
pub(crate) struct Ticket {
    order: Arc<ConversationOrder>,
    key: ConversationKey,
    queue: Queue,
}

impl Default for ConversationOrder {
    fn default() -> Self {
        ConversationOrder {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }
}

impl ConversationOrder {
    fn shard(
        &self,
        key: &ConversationKey,
    ) -> std::sync::MutexGuard<'_, HashMap<ConversationKey, Queue>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether some store of the conversation is queued or running (a new one must queue).
    pub(crate) fn is_busy(&self, key: &ConversationKey) -> bool {
        self.shard(key).contains_key(key)
    }

    /// Joins the conversation's queue (created if it has none). The place in it is taken when
    /// [`Ticket::wait`] is first polled.
    pub(crate) fn ticket(self: &Arc<Self>, key: ConversationKey) -> Ticket {
        let queue = self.shard(&key).entry(key).or_default().clone();
        Ticket {
            order: self.clone(),
            key,
            queue,
        }
    }

    /// Conversations with a queue now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

impl Ticket {
    /// Waits for every store queued before this one; the returned guard holds the
    /// conversation until it is dropped.
    pub(crate) async fn wait(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.queue.lock().await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut shard = self.order.shard(&self.key);
        // The map's reference and ours: nobody else queued, the conversation is idle again.
        // (Clones are only made under this shard's lock, so the count cannot grow meanwhile.)
        if Arc::strong_count(&self.queue) == 2 {
            shard.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::atomic::{AtomicU32, Ordering};

    const KEY: ConversationKey = (1, 1, 2);

    #[tokio::test]
    async fn stores_of_a_conversation_run_one_at_a_time_in_queue_order() {
        let order = Arc::new(ConversationOrder::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let running = Arc::new(AtomicU32::new(0));
        let mut tasks = futures::stream::FuturesOrdered::new();
        for i in 0..20u32 {
            let (log, running) = (log.clone(), running.clone());
            // Taken when the store is made, as `Server::store` does.
            let ticket = order.ticket(KEY);
            tasks.push_back(async move {
                let _turn = ticket.wait().await;
                assert_eq!(running.fetch_add(1, Ordering::SeqCst), 0, "one at a time");
                // Later ones finish sooner if they ran concurrently.
                tokio::time::sleep(std::time::Duration::from_millis(u64::from(20 - i))).await;
                log.lock().unwrap().push(i);
                running.fetch_sub(1, Ordering::SeqCst);
            });
        }
        assert!(order.is_busy(&KEY));
        use futures::StreamExt;
        while tasks.next().await.is_some() {}
        assert_eq!(*log.lock().unwrap(), (0..20).collect::<Vec<_>>());
        assert_eq!(order.len(), 0, "an idle conversation leaves no entry");
        assert!(!order.is_busy(&KEY));
    }

    #[tokio::test]
    async fn other_conversations_do_not_wait_and_a_dropped_ticket_lets_the_next_go() {
        let order = Arc::new(ConversationOrder::default());
        let first = order.ticket(KEY);
        let held = first.wait().await;
        // Another conversation (same sender, other recipient) goes at once.
        let other = order.ticket((1, 1, 3));
        assert!(other.wait().now_or_never().is_some());
        drop(other);
        // The same conversation waits while the first holds it.
        let second = order.ticket(KEY);
        let mut waiting = Box::pin(second.wait());
        assert!(futures::poll!(&mut waiting).is_pending());
        // A cancelled store (its future dropped) frees its place.
        drop(held);
        drop(first);
        drop(waiting.await);
        drop(second);
        assert_eq!(order.len(), 0);
    }
}
