//! The presence state's rules, without IO.

use std::time::{Duration, Instant};

use super::*;
use crate::registry::Registry;

const T: UserId = 100;
const OWNER: NodeId = 7;

fn conns(n: usize) -> (Registry, Vec<Arc<ConnShared>>) {
    let r = Registry::default();
    let c = (0..n).map(|_| r.open(u64::MAX, 60_000)).collect();
    (r, c)
}

fn view(target: UserId, online: bool, last_seen_ms: u64, grants: Vec<Grant>) -> PresenceView {
    PresenceView {
        target,
        owned: true,
        raw: RawPresence {
            online,
            last_seen_ms,
            seq: last_seen_ms,
        },
        grants,
    }
}

const ALL: Grant = Grant {
    online: true,
    last_seen: true,
};

#[test]
fn the_first_local_viewer_registers_and_the_last_withdraws() {
    let p = Presence::default();
    let (_r, c) = conns(2);
    let first = p.replace(&c[0], 1, &[T, 101]);
    assert_eq!(first.added, vec![(T, true), (101, true)]);
    p.set_registered(T, Some(OWNER));
    // A second viewer of T on this node registers nothing more.
    let second = p.replace(&c[1], 2, &[T]);
    assert_eq!(second.added, vec![(T, false)]);
    assert_eq!(p.viewers(T), vec![1, 2]);
    // Dropping T from the first connection's set leaves the second watching it.
    let replaced = p.replace(&c[0], 1, &[101]);
    assert!(replaced.added.is_empty());
    assert!(replaced.dropped.is_empty());
    // The last viewer's connection closes: withdraw from the owner it was registered with.
    assert_eq!(p.connection_closed(c[1].id), vec![(T, OWNER)]);
    assert!(!p.is_watched(T));
    // 101 was never registered (no owner answered): nothing to withdraw.
    assert_eq!(p.replace(&c[0], 1, &[]), Replaced::default());
    assert!(p.watched().is_empty());
}

#[test]
fn viewers_see_only_what_their_grant_allows() {
    let p = Presence::default();
    let (_r, c) = conns(2);
    p.replace(&c[0], 1, &[T]);
    p.replace(&c[1], 2, &[T]);
    let hidden_online = Grant {
        online: false,
        last_seen: true,
    };
    let pushes = p.apply_view(&view(T, true, 50, vec![ALL, hidden_online]), &[1, 2]);
    let mut shown: Vec<(u64, PresenceUpdate)> =
        pushes.into_iter().map(|p| (p.conn.id, p.update)).collect();
    shown.sort_by_key(|(id, _)| *id);
    assert_eq!(
        shown,
        vec![
            (
                c[0].id,
                PresenceUpdate {
                    user: T,
                    online: true,
                    last_seen_ms: 50
                }
            ),
            (
                c[1].id,
                PresenceUpdate {
                    user: T,
                    online: false,
                    last_seen_ms: 50
                }
            ),
        ]
    );
    // Going offline at 80: both see the new last seen; only viewer 1 saw it online.
    let pushes = p.apply_change(
        T,
        RawPresence {
            online: false,
            last_seen_ms: 80,
            seq: 80,
        },
    );
    assert_eq!(pushes.len(), 2);
    // Online again: viewer 2 sees no difference, so it gets no frame.
    let pushes = p.apply_change(
        T,
        RawPresence {
            online: true,
            last_seen_ms: 80,
            seq: 81,
        },
    );
    assert_eq!(pushes.len(), 1);
    assert_eq!(pushes[0].conn.id, c[0].id);
    // A change that was overtaken (a lower seq) is ignored.
    let stale = RawPresence {
        online: false,
        last_seen_ms: 80,
        seq: 80,
    };
    assert!(p.apply_change(T, stale).is_empty());
    // From a new owner, seqs start over.
    p.set_registered(T, Some(OWNER + 1));
    assert_eq!(p.apply_change(T, stale).len(), 1);
}

#[test]
fn a_policy_change_hides_everything_until_grants_are_asked_again() {
    let p = Presence::default();
    let (_r, c) = conns(1);
    p.replace(&c[0], 1, &[T]);
    assert_eq!(p.apply_view(&view(T, false, 10, vec![ALL]), &[1]).len(), 1);
    p.void_grants(T);
    let raw = RawPresence {
        online: true,
        last_seen_ms: 10,
        seq: 11,
    };
    assert!(p.apply_change(T, raw).is_empty(), "no grant: nothing shown");
    // The owner now says viewer 1 may see nothing (blocked): it is told it sees nothing.
    let pushes = p.apply_view(&view(T, true, 10, vec![Grant::default()]), &[1]);
    assert_eq!(
        pushes.into_iter().map(|p| p.update).collect::<Vec<_>>(),
        vec![PresenceUpdate {
            user: T,
            online: false,
            last_seen_ms: 0
        }]
    );
    // And later changes show nothing either.
    let raw = RawPresence {
        online: false,
        last_seen_ms: 99,
        seq: 99,
    };
    assert!(p.apply_change(T, raw).is_empty());
}

#[test]
fn interest_is_one_entry_per_node_and_moves_with_ownership() {
    let p = Presence::default();
    assert!(p.set_interest(T, 2, true));
    assert!(p.set_interest(T, 2, true));
    assert!(p.set_interest(T, 3, true));
    assert!(p.set_interest(101, 2, true));
    assert_eq!(p.interested(T), vec![2, 3]);
    assert_eq!(p.metrics.interest_entries.load(Relaxed), 3);
    assert_eq!(p.metrics.subscribes_received.load(Relaxed), 4);
    p.set_interest(T, 3, false);
    assert_eq!(p.interested(T), vec![2]);
    assert!(p.came_online(T));
    assert!(!p.came_online(T));
    // T moved to another node: its interest and online state go.
    p.retain_owned(|u| u != T, |_| true);
    assert!(p.interested(T).is_empty());
    assert!(!p.is_online(T));
    assert_eq!(p.metrics.interest_entries.load(Relaxed), 1);
    assert!(!p.went_offline(T));
    // Node 2 left the cluster: its interest goes too.
    p.retain_owned(|_| true, |n| n != 2);
    assert!(p.interested(101).is_empty());
    assert_eq!(p.metrics.interest_entries.load(Relaxed), 0);
}

#[test]
fn typing_is_limited_per_device() {
    let p = Presence::default();
    let allowed = (0..10).filter(|_| p.typing_allowed(1, 1)).count();
    assert!(allowed <= TYPING_PER_S_MAX as usize, "{allowed} allowed");
    assert!(allowed >= 1);
    // Another device has its own allowance.
    assert!(p.typing_allowed(1, 2));
    assert_eq!(p.metrics.typing_dropped.load(Relaxed), 10 - allowed as u64);
}

#[test]
fn metrics_render_with_the_presence_prefix() {
    let p = Presence::default();
    let mut out = String::new();
    p.metrics.render(&mut out);
    for line in out.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.starts_with("ringpost_presence_"), "{line}");
    }
}

#[test]
fn retry_delays_double_from_one_second_to_thirty_within_their_jitter() {
    let secs = |failures, jitter| register_retry_delay(failures, jitter).as_secs_f64();
    assert_eq!(secs(0, 1.0), 1.0);
    assert_eq!(secs(0, 0.0), 0.5);
    assert_eq!(secs(1, 1.0), 2.0);
    assert_eq!(secs(4, 1.0), 16.0);
    assert_eq!(secs(5, 1.0), 30.0);
    assert_eq!(secs(5, 0.0), 15.0);
    assert_eq!(secs(u32::MAX, 1.0), 30.0);
    // Out-of-range jitter is clamped.
    assert_eq!(secs(2, 7.0), 4.0);
    assert_eq!(secs(2, -1.0), 2.0);
}

#[test]
fn failed_registrations_are_retried_while_watched_and_unregistered() {
    let p = Presence::default();
    let (_r, c) = conns(1);
    p.replace(&c[0], 1, &[T, 101, 102]);
    let now = Instant::now();
    let s = Duration::from_secs(1);
    p.queue_register_retry(T, 0, now + s);
    p.queue_register_retry(101, 3, now + 2 * s);
    p.queue_register_retry(102, 0, now + 3 * s);
    // Queued already: the first schedule stands.
    p.queue_register_retry(T, 5, now + 10 * s);
    // Not watched here: nothing to retry.
    p.queue_register_retry(999, 0, now);
    assert_eq!(p.next_register_retry(), Some(now + s));

    assert!(p.take_due_register_retries(now, 10).is_empty());
    assert_eq!(p.take_due_register_retries(now + 2 * s, 1), vec![(T, 0)]);
    // 101 was registered meanwhile, 102's last viewer left: both dropped when due.
    p.set_registered(101, Some(OWNER));
    p.replace(&c[0], 1, &[T]);
    assert!(p.take_due_register_retries(now + 5 * s, 10).is_empty());
    assert_eq!(p.next_register_retry(), None);

    // A ring change forgets every queued retry (it registers them itself).
    p.queue_register_retry(T, 1, now + s);
    assert_eq!(p.next_register_retry(), Some(now + s));
    p.clear_register_retries();
    assert_eq!(p.next_register_retry(), None);
    assert!(p.take_due_register_retries(now + 100 * s, 10).is_empty());
    // Queued again after the clear.
    p.queue_register_retry(T, 2, now + s);
    assert_eq!(p.take_due_register_retries(now + s, 10), vec![(T, 2)]);
}
