//! The push queue's decisions, sans IO: which devices wait for a wake-up push, when each is
//! due, what a provider's answer does to it, and which rows of [`Cf::PushQueue`] must change.
//! Time comes in as `now_us` (wall clock in microseconds since the Unix epoch, so a restart
//! keeps the backoff) and randomness as an argument, so tests drive it deterministically.
//!
//! [`Cf::PushQueue`]: crate::storage::Cf::PushQueue

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use ringpost_wire::{DeviceId, UserId};

use crate::storage::{Cf, StorageError};

/// A device, as the queue keys it.
pub type DeviceKey = (UserId, DeviceId);

/// Retry policy and bounds of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Provider calls per push, the first included; after the last failure the push is dropped
    /// (the message still waits in the inbox).
    pub attempts_max: u32,
    /// Delay before the second attempt; doubles per attempt ("full jitter": the delay is drawn
    /// uniformly from `[delay / 2, delay]`).
    pub backoff_base_ms: u64,
    /// Cap of the delay between two attempts.
    pub backoff_max_ms: u64,
    /// Devices waiting at most (pending pushes). Memory: about 100 bytes each in the schedule,
    /// plus one small row on disk; beyond it new wake-ups are dropped and counted.
    pub queue_max: usize,
}

/// One pending push as stored: `ver attempts:u32 due_us:u64 queued_us:u64` (v1), keyed
/// `user | device`. Times are wall clock, microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// Provider calls made so far.
    pub attempts: u32,
    /// When the next call is due (wall clock, ms since the Unix epoch).
    pub due_us: u64,
    /// When the inbox entry that queued it was stored: the start of the push latency.
    pub queued_us: u64,
}

const RECORD_VERSION: u8 = 1;
const RECORD_BYTES: usize = 1 + 4 + 8 + 8;

impl Pending {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_BYTES);
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.attempts.to_be_bytes());
        out.extend_from_slice(&self.due_us.to_be_bytes());
        out.extend_from_slice(&self.queued_us.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Pending, StorageError> {
        if bytes.len() != RECORD_BYTES || bytes[0] != RECORD_VERSION {
            return Err(StorageError::Corrupt {
                cf: Cf::PushQueue.name(),
                detail: format!("push queue record of {} bytes", bytes.len()),
            });
        }
        let u64_at = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
        Ok(Pending {
            attempts: u32::from_be_bytes(bytes[1..5].try_into().unwrap_or([0; 4])),
            due_us: u64_at(5),
            queued_us: u64_at(13),
        })
    }
}

/// The queue row key of a device.
pub fn row_key((user, device): DeviceKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(12);
    k.extend_from_slice(&user.to_be_bytes());
    k.extend_from_slice(&device.to_be_bytes());
    k
}

/// The device a queue row key names.
pub fn parse_row_key(k: &[u8]) -> Option<DeviceKey> {
    let user = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    let device = u32::from_be_bytes(k.get(8..12)?.try_into().ok()?);
    (k.len() == 12).then_some((user, device))
}

/// What [`Schedule::offer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// A new pending push.
    Queued,
    /// One was already pending for the device: nothing added.
    Coalesced,
    /// The queue holds [`RetryPolicy::queue_max`] devices: dropped.
    Full,
}

/// A provider call to make: the device and the state it was taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    pub device: DeviceKey,
    /// Identifies this pending push: a cancelled and re-queued one is another generation, and
    /// the answer to a call of the old one changes nothing.
    pub generation: u64,
    pub pending: Pending,
}

/// How a provider call ended, as the queue sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The provider accepted the push.
    Sent,
    /// Worth another try (timeouts, connection errors, 429, 5xx), optionally not before the
    /// provider's `Retry-After`.
    Retry { not_before_us: Option<u64> },
    /// The provider says the token is dead: the caller removes it; the push is dropped.
    TokenInvalid,
    /// The device has no token (or is no longer this node's), or the provider refused the
    /// request for good: dropped.
    Dropped,
}

/// What the caller does after [`Schedule::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    /// The answer was about a push that was cancelled or replaced meanwhile: nothing.
    Stale,
    /// Sent: `latency_us` since the message was stored.
    Sent { latency_us: u64 },
    /// Another attempt is due at `due_us`.
    Retrying { due_us: u64 },
    /// Dropped after `attempts` calls (the last retryable failure, or a final answer).
    Dropped { attempts: u32, gave_up: bool },
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    generation: u64,
    pending: Pending,
    in_flight: bool,
}

/// The pending pushes of a node: at most one per device (see the module documentation).
#[derive(Debug)]
pub struct Schedule {
    policy: RetryPolicy,
    slots: HashMap<DeviceKey, Slot>,
    /// `(due_us, device)` of every slot not in flight.
    due: BTreeSet<(u64, DeviceKey)>,
    /// Row changes not written yet, in order: `Some` puts, `None` deletes.
    writes: Vec<(DeviceKey, Option<Pending>)>,
    next_generation: u64,
}

impl Schedule {
    pub fn new(policy: RetryPolicy) -> Schedule {
        Schedule {
            policy,
            slots: HashMap::new(),
            due: BTreeSet::new(),
            writes: Vec::new(),
            next_generation: 1,
        }
    }

    /// Pending pushes (the queue depth).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Takes back a row read from disk at start (no write). Rows beyond the bound are left on
    /// disk and the caller stops loading.
    pub fn restore(&mut self, device: DeviceKey, pending: Pending) -> bool {
        if self.slots.len() >= self.policy.queue_max {
            return false;
        }
        self.insert(device, pending);
        true
    }

    /// Something was stored at `now_us` for `device`, which has no connection: wake it, unless a
    /// push for it is already pending (coalesced).
    pub fn offer(&mut self, device: DeviceKey, now_us: u64) -> Offer {
        if self.slots.contains_key(&device) {
            return Offer::Coalesced;
        }
        if self.slots.len() >= self.policy.queue_max {
            return Offer::Full;
        }
        let pending = Pending {
            attempts: 0,
            due_us: now_us,
            queued_us: now_us,
        };
        self.insert(device, pending);
        self.writes.push((device, Some(pending)));
        Offer::Queued
    }

    /// The device connected (or was removed): its pending push, if any, is not sent. A call in
    /// flight finishes, but its answer is then [`Completed::Stale`].
    pub fn cancel(&mut self, device: DeviceKey) -> bool {
        let Some(slot) = self.slots.remove(&device) else {
            return false;
        };
        if !slot.in_flight {
            self.due.remove(&(slot.pending.due_us, device));
        }
        self.writes.push((device, None));
        true
    }

    /// Up to `limit` pushes due at `now_us`, earliest first, marked in flight.
    pub fn take_due(&mut self, now_us: u64, limit: usize) -> Vec<Job> {
        let mut jobs = Vec::new();
        while jobs.len() < limit {
            let Some(&(due_us, device)) = self.due.first() else {
                break;
            };
            if due_us > now_us {
                break;
            }
            self.due.pop_first();
            if let Some(slot) = self.slots.get_mut(&device) {
                slot.in_flight = true;
                jobs.push(Job {
                    device,
                    generation: slot.generation,
                    pending: slot.pending,
                });
            }
        }
        jobs
    }

    /// When the earliest push not in flight is due.
    pub fn next_due_us(&self) -> Option<u64> {
        self.due.first().map(|&(due_us, _)| due_us)
    }

    /// Applies the answer to `job`'s provider call at `now_us`. `jitter` in `[0, 1)` picks the
    /// retry delay within its range.
    pub fn complete(&mut self, job: &Job, outcome: Outcome, now_us: u64, jitter: f64) -> Completed {
        match self.slots.get(&job.device) {
            Some(slot) if slot.generation == job.generation => {}
            _ => return Completed::Stale,
        }
        let attempts = job.pending.attempts.saturating_add(1);
        let gave_up = match outcome {
            Outcome::Sent => {
                self.remove(job.device);
                return Completed::Sent {
                    latency_us: now_us.saturating_sub(job.pending.queued_us),
                };
            }
            Outcome::TokenInvalid | Outcome::Dropped => false,
            Outcome::Retry { not_before_us } => {
                if attempts < self.policy.attempts_max {
                    let delay_us = self.backoff_ms(attempts, jitter).saturating_mul(1000);
                    let due_us = now_us
                        .saturating_add(delay_us)
                        .max(not_before_us.unwrap_or(0));
                    let pending = Pending {
                        attempts,
                        due_us,
                        queued_us: job.pending.queued_us,
                    };
                    if let Some(slot) = self.slots.get_mut(&job.device) {
                        slot.pending = pending;
                        slot.in_flight = false;
                    }
                    self.due.insert((due_us, job.device));
                    self.writes.push((job.device, Some(pending)));
                    return Completed::Retrying { due_us };
                }
                true
            }
        };
        self.remove(job.device);
        Completed::Dropped { attempts, gave_up }
    }

    /// The delay after the `attempts`-th failed call: `base * 2^(attempts-1)`, capped, with the
    /// upper half jittered (`[d/2, d]`), so a provider outage's retries spread out.
    pub fn backoff_ms(&self, attempts: u32, jitter: f64) -> u64 {
        let delay = crate::backoff::delay(
            Duration::from_millis(self.policy.backoff_base_ms),
            Duration::from_millis(self.policy.backoff_max_ms),
            attempts,
            jitter,
        );
        u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)
    }

    /// Forgets a new push that was never written (its device has no token): no row change.
    /// A push already retried or in flight stays (its call finds no token and drops it).
    pub fn discard_unwritten(&mut self, device: DeviceKey) -> bool {
        match self.slots.get(&device) {
            Some(slot) if slot.pending.attempts == 0 && !slot.in_flight => {
                let due = slot.pending.due_us;
                self.slots.remove(&device);
                self.due.remove(&(due, device));
                true
            }
            _ => false,
        }
    }

    /// The row changes to write, in order (the last change of a device wins).
    pub fn take_writes(&mut self) -> Vec<(DeviceKey, Option<Pending>)> {
        std::mem::take(&mut self.writes)
    }

    /// Writes that could not be made are put back first, so later ones still win.
    pub fn restore_writes(&mut self, mut failed: Vec<(DeviceKey, Option<Pending>)>) {
        failed.append(&mut self.writes);
        self.writes = failed;
    }

    fn insert(&mut self, device: DeviceKey, pending: Pending) {
        let generation = self.next_generation;
        self.next_generation += 1;
        self.slots.insert(
            device,
            Slot {
                generation,
                pending,
                in_flight: false,
            },
        );
        self.due.insert((pending.due_us, device));
    }

    fn remove(&mut self, device: DeviceKey) {
        if let Some(slot) = self.slots.remove(&device) {
            if !slot.in_flight {
                self.due.remove(&(slot.pending.due_us, device));
            }
            self.writes.push((device, None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        attempts_max: 4,
        backoff_base_ms: 1000,
        backoff_max_ms: 5000,
        queue_max: 3,
    };
    const D: DeviceKey = (15551234567, 2);

    #[test]
    fn one_pending_push_per_device() {
        let mut s = Schedule::new(POLICY);
        assert_eq!(s.offer(D, 10), Offer::Queued);
        assert_eq!(s.offer(D, 11), Offer::Coalesced);
        assert_eq!(s.offer(D, 12), Offer::Coalesced);
        assert_eq!(s.len(), 1);
        assert_eq!(s.take_writes().len(), 1, "one row for three messages");
        // Still coalesced while the call is in flight.
        let jobs = s.take_due(20, 10);
        assert_eq!(jobs.len(), 1);
        assert_eq!(s.offer(D, 21), Offer::Coalesced);
        assert_eq!(
            s.complete(&jobs[0], Outcome::Sent, 30, 0.5),
            Completed::Sent { latency_us: 20 }
        );
        assert!(s.is_empty());
        assert_eq!(s.take_writes(), vec![(D, None)]);
        // Once sent, the next message queues a new push.
        assert_eq!(s.offer(D, 40), Offer::Queued);
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut s = Schedule::new(POLICY);
        for d in 1..=3 {
            assert_eq!(s.offer((1, d), 0), Offer::Queued);
        }
        assert_eq!(s.offer((1, 4), 0), Offer::Full);
        assert!(!s.restore(
            (1, 5),
            Pending {
                attempts: 0,
                due_us: 0,
                queued_us: 0
            }
        ));
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter_then_give_up() {
        let mut s = Schedule::new(POLICY);
        s.offer(D, 0);
        let mut now = 0;
        let mut delays = Vec::new();
        for attempt in 1..POLICY.attempts_max {
            let job = s.take_due(now, 10)[0];
            assert_eq!(job.pending.attempts, attempt - 1);
            let Completed::Retrying { due_us } = s.complete(
                &job,
                Outcome::Retry {
                    not_before_us: None,
                },
                now,
                1.0,
            ) else {
                panic!("attempt {attempt} should be retried");
            };
            delays.push(due_us - now);
            assert!(
                s.take_due(due_us - 1, 10).is_empty(),
                "not before it is due"
            );
            now = due_us;
        }
        assert_eq!(delays, vec![1_000_000, 2_000_000, 4_000_000]);
        let job = s.take_due(now, 10)[0];
        assert_eq!(
            s.complete(
                &job,
                Outcome::Retry {
                    not_before_us: None
                },
                now,
                0.0
            ),
            Completed::Dropped {
                attempts: 4,
                gave_up: true
            }
        );
        assert!(s.is_empty());
        // Jitter keeps the delay within [d/2, d]; the cap holds.
        assert_eq!(s.backoff_ms(1, 0.0), 500);
        assert_eq!(s.backoff_ms(10, 1.0), 5000);
        assert_eq!(s.backoff_ms(10, 0.0), 2500);
    }

    #[test]
    fn retry_after_is_honoured() {
        let mut s = Schedule::new(POLICY);
        s.offer(D, 0);
        let job = s.take_due(0, 1)[0];
        let done = s.complete(
            &job,
            Outcome::Retry {
                not_before_us: Some(60_000_000),
            },
            0,
            0.0,
        );
        assert_eq!(done, Completed::Retrying { due_us: 60_000_000 });
    }

    #[test]
    fn a_cancelled_push_is_not_sent_and_a_late_answer_changes_nothing() {
        let mut s = Schedule::new(POLICY);
        s.offer(D, 0);
        assert!(s.cancel(D));
        assert!(s.take_due(100, 10).is_empty());
        assert_eq!(
            s.take_writes(),
            vec![
                (
                    D,
                    Some(Pending {
                        attempts: 0,
                        due_us: 0,
                        queued_us: 0
                    })
                ),
                (D, None)
            ]
        );
        // In flight, then cancelled and queued again: the old call's answer is stale.
        s.offer(D, 1);
        let job = s.take_due(1, 1)[0];
        s.cancel(D);
        s.offer(D, 2);
        assert_eq!(
            s.complete(&job, Outcome::TokenInvalid, 3, 0.0),
            Completed::Stale
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s.take_due(5, 10).len(), 1);
    }

    #[test]
    fn records_and_keys_round_trip() {
        let p = Pending {
            attempts: 3,
            due_us: 7,
            queued_us: 5,
        };
        assert_eq!(Pending::decode(&p.encode()).unwrap(), p);
        assert!(Pending::decode(&p.encode()[1..]).is_err());
        assert_eq!(parse_row_key(&row_key(D)), Some(D));
        assert_eq!(parse_row_key(&[1, 2, 3]), None);
    }
}
