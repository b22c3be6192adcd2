//! Which devices are connected to this node, and the small shared handle through which other
//! tasks reach a connection: hand it freshly stored inbox entries (so it delivers them without
//! reading them back), push it an ephemeral frame (typing), or ask it to close (replaced,
//! reaped, shutting down).
//!
//! Keepalive is a sweep, not a timer per connection: each connection stores the time it last
//! heard from its peer in its handle, and one task ([`Registry::sweep`]) walks every handle once
//! a second and closes the ones past their deadline.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::task::AtomicWaker;
use ringpost_wire::{DeviceId, UserId};

use crate::inbox::Entry;

/// Ephemeral frames (typing, presence) queued to one connection. When full, new ones are
/// dropped: they are never stored and a stale typing indicator is worthless. Worst case per
/// connection: this many encoded frames (each well under 100 bytes).
pub const PUSH_QUEUE_MAX: usize = 32;

/// Freshly stored entries handed to one connection and not yet taken. Beyond it (or beyond
/// [`HANDED_BYTES_MAX`]) the queue is dropped and the connection reads its inbox instead (a
/// device that is not reading). Typically a few hundred bytes, and nothing while idle.
pub const HANDED_ENTRIES_MAX: usize = crate::session::DELIVER_WINDOW as usize;
/// Ciphertext bytes handed to one connection and not yet taken: the worst case per connection
/// is this plus one entry (64 KiB).
pub const HANDED_BYTES_MAX: usize = 256 * 1024;

/// Entries handed to a connection, and their ciphertext bytes.
#[derive(Debug, Default)]
struct HandedQueue {
    entries: VecDeque<(u64, Entry)>,
    bytes: usize,
}

impl HandedQueue {
    fn pop(&mut self) {
        if let Some((_, e)) = self.entries.pop_front() {
            self.bytes -= e.body.len();
        }
    }
}

/// What a connection found handed to it for a fetch: see [`ConnShared::take_handed`].
#[derive(Debug)]
pub enum Handed {
    /// The entries right after the cursor, in order (possibly none: nothing was handed).
    Next(Vec<(u64, Entry)>),
    /// What was handed does not continue the cursor (entries were stored before the
    /// connection was bound, or the queue overflowed): read the inbox.
    Gap,
}

/// Registry shards: fewer lock collisions between workers; each shard is a small map.
const SHARDS: usize = 64;

/// Why a connection is asked to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    None = 0,
    /// The same device connected again; the newer connection wins.
    Replaced = 1,
    /// No frame within the idle timeout (or no handshake in time).
    Expired = 2,
    /// The node is shutting down.
    ShuttingDown = 3,
    /// The device's user now belongs to another node (new ring epoch): the connection tells it
    /// `Migrate` to the new owner (or `GoingAway`, if that has no client address) and closes.
    Moved = 4,
    /// The device was removed from its account (`RemoveDevice`, or a re-registration of the
    /// number): its token no longer works.
    Removed = 5,
}

/// The part of a connection other tasks can reach.
#[derive(Debug)]
pub struct ConnShared {
    pub id: u64,
    /// Set by [`ConnShared::notify`], taken by [`ConnShared::poll_notified`].
    signal: AtomicBool,
    /// The connection task's waker.
    waker: AtomicWaker,
    /// Milliseconds since the registry's start when the peer was last heard from.
    last_rx_ms: AtomicU64,
    /// The silence after which the sweep closes the connection (the idle timeout).
    timeout_ms: AtomicU32,
    /// A deadline no activity extends (registry clock; `u64::MAX`: none): the handshake's,
    /// then an anonymous session's (see [`crate::admission`]).
    deadline_ms: AtomicU64,
    close: AtomicU8,
    woken: AtomicU8,
    pushed: Mutex<VecDeque<Bytes>>,
    handed: Mutex<HandedQueue>,
}

impl ConnShared {
    /// Hands a freshly stored entry of this connection's device to it, and wakes it. Entries
    /// of one device come in seq order (the inbox writer calls this after each commit).
    pub fn hand(&self, seq: u64, entry: &Entry) {
        let mut q = self.handed.lock().unwrap_or_else(|p| p.into_inner());
        if q.entries.len() >= HANDED_ENTRIES_MAX || q.bytes >= HANDED_BYTES_MAX {
            // Not reading: forget them, it will read the inbox when it catches up.
            *q = HandedQueue::default();
        } else {
            q.bytes += entry.body.len();
            q.entries.push_back((seq, entry.clone()));
        }
        drop(q);
        self.wake();
    }

    /// Takes up to `limit` handed entries that continue a cursor at `after`, dropping those at
    /// or below it (delivered already, by a read).
    pub fn take_handed(&self, after: u64, limit: usize) -> Handed {
        let mut q = self.handed.lock().unwrap_or_else(|p| p.into_inner());
        while q.entries.front().is_some_and(|(seq, _)| *seq <= after) {
            q.pop();
        }
        match q.entries.front() {
            None => {
                // Free the buffer of a queue that grew: an idle connection holds nothing.
                *q = HandedQueue::default();
                Handed::Next(Vec::new())
            }
            Some((seq, _)) if *seq != after + 1 => {
                *q = HandedQueue::default();
                Handed::Gap
            }
            Some(_) => {
                let n = limit.min(q.entries.len());
                let taken: Vec<_> = q.entries.drain(..n).collect();
                q.bytes -= taken.iter().map(|(_, e)| e.body.len()).sum::<usize>();
                Handed::Next(taken)
            }
        }
    }

    /// Wakes the connection task (new inbox entries may exist).
    pub fn wake(&self) {
        self.woken.store(1, Relaxed);
        self.notify();
    }

    /// Wakes the connection task: the next [`ConnShared::poll_notified`] is ready (one stored
    /// signal, like `tokio::sync::Notify::notify_one`).
    fn notify(&self) {
        self.signal.store(true, Release);
        self.waker.wake();
    }

    /// Takes the wake flag: true if a wake-up arrived since the last call.
    pub fn take_woken(&self) -> bool {
        self.woken.swap(0, Relaxed) == 1
    }

    /// Ready once the connection was woken, pushed to, or asked to close since the last ready
    /// poll; `Pending` registers `cx`'s waker. A poll function with its waker kept here, so a
    /// connection waiting for it keeps no future (a `Notified` is 80 bytes).
    pub fn poll_notified(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.signal.swap(false, Acquire) {
            return std::task::Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.signal.swap(false, Acquire) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Queues an ephemeral frame; false if the queue is full and it was dropped.
    pub fn push(&self, frame: Bytes) -> bool {
        let mut q = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= PUSH_QUEUE_MAX {
            return false;
        }
        q.push_back(frame);
        drop(q);
        self.notify();
        true
    }

    /// Takes every queued ephemeral frame.
    pub fn take_pushed(&self) -> VecDeque<Bytes> {
        let mut q = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *q)
    }

    pub fn ask_close(&self, reason: CloseReason) {
        self.close.store(reason as u8, Relaxed);
        self.notify();
    }

    pub fn close_reason(&self) -> CloseReason {
        match self.close.load(Relaxed) {
            1 => CloseReason::Replaced,
            2 => CloseReason::Expired,
            3 => CloseReason::ShuttingDown,
            4 => CloseReason::Moved,
            5 => CloseReason::Removed,
            _ => CloseReason::None,
        }
    }

    /// Records that the peer was heard from at `now_ms` (registry clock).
    pub fn touch(&self, now_ms: u64) {
        self.last_rx_ms.store(now_ms, Relaxed);
    }

    /// Sets the silence after which the sweep closes this connection.
    pub fn set_timeout_ms(&self, timeout_ms: u32) {
        self.timeout_ms.store(timeout_ms, Relaxed);
    }

    /// Sets (or with `None` lifts) the time, on the registry clock, at which the sweep closes
    /// this connection however active it is.
    pub fn set_deadline_ms(&self, deadline_ms: Option<u64>) {
        self.deadline_ms
            .store(deadline_ms.unwrap_or(u64::MAX), Relaxed);
    }
}

type DeviceKey = (UserId, DeviceId);

/// Every open connection, and the authenticated ones by device.
#[derive(Debug)]
pub struct Registry {
    start: std::time::Instant,
    next_id: AtomicU64,
    all: Vec<Mutex<HashMap<u64, Arc<ConnShared>>>>,
    devices: Vec<Mutex<HashMap<DeviceKey, Arc<ConnShared>>>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            start: std::time::Instant::now(),
            next_id: AtomicU64::new(1),
            all: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            devices: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn device_shard(key: DeviceKey) -> usize {
    ((key.0 ^ (u64::from(key.1) << 48)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize
}

impl Registry {
    /// Milliseconds since the registry started: the clock of [`ConnShared::touch`].
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Registers a new connection that must authenticate (or start an anonymous session) by
    /// `deadline_ms` on the registry clock ([`Registry::now_ms`]), and that is closed after
    /// `idle_timeout_ms` of silence.
    pub fn open(&self, deadline_ms: u64, idle_timeout_ms: u32) -> Arc<ConnShared> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let conn = Arc::new(ConnShared {
            id,
            signal: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            last_rx_ms: AtomicU64::new(self.now_ms()),
            timeout_ms: AtomicU32::new(idle_timeout_ms),
            deadline_ms: AtomicU64::new(deadline_ms),
            close: AtomicU8::new(0),
            woken: AtomicU8::new(0),
            pushed: Mutex::new(VecDeque::new()),
            handed: Mutex::new(HandedQueue::default()),
        });
        lock(&self.all[id as usize % SHARDS]).insert(id, conn.clone());
        conn
    }

    /// The connection is now this device. An older connection of the same device is asked to
    /// close (the newer one wins; at most one delivery stream per device).
    pub fn bind(&self, conn: &Arc<ConnShared>, user: UserId, device: DeviceId) {
        let key = (user, device);
        let old = lock(&self.devices[device_shard(key)]).insert(key, conn.clone());
        if let Some(old) = old {
            if old.id != conn.id {
                old.ask_close(CloseReason::Replaced);
            }
        }
    }

    /// Forgets a closing connection (and its device binding, if it still holds it).
    pub fn close(&self, conn: &Arc<ConnShared>, device: Option<DeviceKey>) {
        lock(&self.all[conn.id as usize % SHARDS]).remove(&conn.id);
        if let Some(key) = device {
            let mut map = lock(&self.devices[device_shard(key)]);
            if map.get(&key).is_some_and(|c| c.id == conn.id) {
                map.remove(&key);
            }
        }
    }

    /// The connection of a device, if it is connected here.
    pub fn device(&self, user: UserId, device: DeviceId) -> Option<Arc<ConnShared>> {
        let key = (user, device);
        lock(&self.devices[device_shard(key)]).get(&key).cloned()
    }

    /// Wakes the device's connection, if any.
    pub fn wake(&self, user: UserId, device: DeviceId) {
        if let Some(c) = self.device(user, device) {
            c.wake();
        }
    }

    /// Hands a freshly stored entry to the device's connection, if any (see
    /// [`ConnShared::hand`]).
    pub fn hand(&self, user: UserId, device: DeviceId, seq: u64, entry: &Entry) {
        if let Some(c) = self.device(user, device) {
            c.hand(seq, entry);
        }
    }

    /// Closes every connection silent past its idle timeout or past its deadline. Returns how
    /// many it closed.
    pub fn sweep(&self) -> usize {
        let now = self.now_ms();
        let mut closed = 0;
        for shard in &self.all {
            for conn in lock(shard).values() {
                let last = conn.last_rx_ms.load(Relaxed);
                let timeout = u64::from(conn.timeout_ms.load(Relaxed));
                let past_deadline = now > conn.deadline_ms.load(Relaxed);
                if (now.saturating_sub(last) > timeout || past_deadline)
                    && conn.close_reason() == CloseReason::None
                {
                    conn.ask_close(CloseReason::Expired);
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Asks the connection of every device whose user matches `moved` to close with
    /// [`CloseReason::Moved`]. Returns how many were asked.
    pub fn close_moved(&self, moved: impl Fn(UserId) -> bool) -> usize {
        let mut asked = 0;
        for shard in &self.devices {
            for (&(user, _), conn) in lock(shard).iter() {
                if moved(user) {
                    conn.ask_close(CloseReason::Moved);
                    asked += 1;
                }
            }
        }
        asked
    }

    /// Asks every connection to close (graceful shutdown).
    pub fn close_all(&self, reason: CloseReason) {
        for shard in &self.all {
            for conn in lock(shard).values() {
                conn.ask_close(reason);
            }
        }
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.all.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_up_is_kept_until_polled_and_wakes_a_waiting_task() {
        let r = Registry::default();
        let c = r.open(u64::MAX, 1000);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(c.poll_notified(&mut cx).is_pending());
        // One stored signal, however many wake-ups came before the poll.
        c.wake();
        c.ask_close(CloseReason::Expired);
        assert!(c.poll_notified(&mut cx).is_ready());
        assert!(c.poll_notified(&mut cx).is_pending());
        // A task waiting on it is woken from another thread.
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { std::future::poll_fn(|cx| c.poll_notified(cx)).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let pusher = {
            let c = c.clone();
            std::thread::spawn(move || assert!(c.push(Bytes::from_static(b"x"))))
        };
        pusher.join().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiting task was not woken")
            .unwrap();
        assert_eq!(c.take_pushed().len(), 1);
    }

    #[test]
    fn newer_connection_of_a_device_replaces_the_older() {
        let r = Registry::default();
        let a = r.open(u64::MAX, 1000);
        let b = r.open(u64::MAX, 1000);
        r.bind(&a, 1, 1);
        r.bind(&b, 1, 1);
        assert_eq!(a.close_reason(), CloseReason::Replaced);
        assert_eq!(b.close_reason(), CloseReason::None);
        // The old connection closing must not unbind the new one.
        r.close(&a, Some((1, 1)));
        assert_eq!(r.device(1, 1).map(|c| c.id), Some(b.id));
        r.close(&b, Some((1, 1)));
        assert!(r.device(1, 1).is_none());
        assert!(r.is_empty());
    }

    #[test]
    fn push_queue_is_bounded() {
        let r = Registry::default();
        let c = r.open(u64::MAX, 1000);
        for _ in 0..PUSH_QUEUE_MAX {
            assert!(c.push(Bytes::from_static(b"x")));
        }
        assert!(!c.push(Bytes::from_static(b"x")));
        assert_eq!(c.take_pushed().len(), PUSH_QUEUE_MAX);
        assert!(c.take_pushed().is_empty());
    }

    #[test]
    fn handed_entries_continue_the_cursor_or_report_a_gap() {
        let r = Registry::default();
        let c = r.open(u64::MAX, 1000);
        let e = |n: u8| Entry::message(1, 1, [n; 16], Bytes::new());
        assert!(matches!(c.take_handed(0, 10), Handed::Next(v) if v.is_empty()));
        for seq in 3..=6 {
            c.hand(seq, &e(seq as u8));
        }
        assert!(c.take_woken());
        // Entries up to the cursor were read already; 5 continues it.
        let Handed::Next(v) = c.take_handed(4, 1) else {
            panic!("expected entries")
        };
        assert_eq!(v.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![5]);
        let Handed::Next(v) = c.take_handed(5, 10) else {
            panic!("expected entries")
        };
        assert_eq!(v.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![6]);
        // Something before 9 was never handed: read the inbox.
        c.hand(9, &e(9));
        assert!(matches!(c.take_handed(7, 10), Handed::Gap));
        assert!(matches!(c.take_handed(7, 10), Handed::Next(v) if v.is_empty()));
        // A connection that does not take them cannot make the queue grow.
        for seq in 10..(10 + 3 * HANDED_ENTRIES_MAX as u64) {
            c.hand(seq, &e(0));
        }
        assert!(c.handed.lock().unwrap().entries.len() <= HANDED_ENTRIES_MAX);
        assert!(matches!(c.take_handed(9, 10), Handed::Gap));
    }

    #[test]
    fn handed_ciphertext_is_bounded_in_bytes() {
        let r = Registry::default();
        let c = r.open(u64::MAX, 1000);
        let big = Entry::message(1, 1, [0; 16], Bytes::from(vec![7u8; 64 * 1024]));
        for seq in 1..=HANDED_ENTRIES_MAX as u64 {
            c.hand(seq, &big);
            let bytes = c.handed.lock().unwrap().bytes;
            assert!(bytes <= HANDED_BYTES_MAX + 64 * 1024, "{bytes}");
        }
        // Taking entries gives their bytes back.
        let c = r.open(u64::MAX, 1000);
        c.hand(1, &big);
        c.hand(2, &big);
        let Handed::Next(v) = c.take_handed(0, 1) else {
            panic!("expected entries")
        };
        assert_eq!(v.len(), 1);
        assert_eq!(c.handed.lock().unwrap().bytes, 64 * 1024);
    }

    #[test]
    fn sweep_closes_only_silent_connections() {
        let r = Registry::default();
        let silent = r.open(u64::MAX, 0);
        let fresh = r.open(u64::MAX, 60_000);
        // `silent` has a zero timeout: any elapsed millisecond expires it.
        silent.touch(0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while r.now_ms() == 0 && std::time::Instant::now() < deadline {
            std::hint::spin_loop();
        }
        assert_eq!(r.sweep(), 1);
        assert_eq!(silent.close_reason(), CloseReason::Expired);
        assert_eq!(fresh.close_reason(), CloseReason::None);
    }

    #[test]
    fn sweep_closes_a_connection_past_its_deadline_however_active() {
        let r = Registry::default();
        let busy = r.open(0, 60_000);
        let later = r.open(60_000, 60_000);
        let lifted = r.open(0, 60_000);
        lifted.set_deadline_ms(None);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while r.now_ms() == 0 && std::time::Instant::now() < deadline {
            std::hint::spin_loop();
        }
        busy.touch(r.now_ms());
        assert_eq!(r.sweep(), 1);
        assert_eq!(busy.close_reason(), CloseReason::Expired);
        assert_eq!(later.close_reason(), CloseReason::None);
        assert_eq!(lifted.close_reason(), CloseReason::None);
    }
}
