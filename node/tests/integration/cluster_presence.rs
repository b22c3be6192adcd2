//! Contacts, privacy, blocking, presence and typing across real nodes: a real coordinator and
//! two real `ringpost-node run` processes on loopback, driven through the client SDK.

use crate::cluster_harness as harness;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::{ring_of, runtime, users_where, TestCluster};
use ringpost_client::{Client, ClientConfig, Event};
use ringpost_wire::{DeviceCiphertext, MsgId, PresenceUpdate, SendStatus, UserId, Visibility};

const WAIT: Duration = Duration::from_secs(30);

/// Everything a client receives, kept by a task that reads its events.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<Event>>>);

impl Events {
    fn collect(c: Client) -> Events {
        let events = Events::default();
        let seen = events.clone();
        tokio::spawn(async move {
            while let Some(e) = c.next_event().await {
                seen.0.lock().unwrap().push(e);
            }
        });
        events
    }

    /// The presence updates about `user` so far.
    fn presence(&self, user: UserId) -> Vec<PresenceUpdate> {
        (self.0.lock().unwrap().iter())
            .filter_map(|e| match e {
                Event::Presence(p) if p.user == user => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// Waits until the latest presence update about `user` satisfies `want`; returns it.
    async fn wait_presence(
        &self,
        user: UserId,
        what: &str,
        want: impl Fn(&PresenceUpdate) -> bool,
    ) -> PresenceUpdate {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(last) = self.presence(user).pop().filter(|p| want(p)) {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: presence of {user} is {:?}",
                self.presence(user)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn typing_from(&self, user: UserId) -> usize {
        (self.0.lock().unwrap().iter())
            .filter(|e| matches!(e, Event::Typing(t) if t.user == user))
            .count()
    }

    fn messages(&self) -> Vec<MsgId> {
        (self.0.lock().unwrap().iter())
            .filter_map(|e| match e {
                Event::Message(d) => Some(d.msg_id),
                _ => None,
            })
            .collect()
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&Events) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn hidden(user: UserId) -> PresenceUpdate {
    PresenceUpdate {
        user,
        online: false,
        last_seen_ms: 0,
    }
}

async fn wait_metric(cluster: &TestCluster, node: u64, name: &str, want: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = metric(cluster, node, name);
        if v == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} on node {node} is {v}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn msg_id(n: u8) -> MsgId {
    [n; 16]
}

fn to_primary(to: UserId, body: &str) -> Vec<DeviceCiphertext> {
    vec![DeviceCiphertext {
        user: to,
        device: 1,
        body: Bytes::copy_from_slice(body.as_bytes()),
    }]
}

async fn reconnect(cluster: &TestCluster, c: &Client) -> Client {
    let auth = c.auth().expect("registered");
    c.close().await;
    Client::connect(ClientConfig {
        auth: Some(auth),
        ..cluster.config(0)
    })
    .await
    .expect("connect")
}

fn metric(cluster: &TestCluster, node: u64, name: &str) -> i64 {
    cluster.metric(node, name)
}

#[test]
fn presence_privacy_blocking_and_typing_across_nodes() {
    let cluster = TestCluster::start(1, 2);
    runtime().block_on(async {
        let ring = ring_of(&[1, 2]);
        // The target lives on node 1; its two viewers on node 2, one of them its contact.
        let target = users_where(&ring, 15_552_000_000, 1, |o| o == 1)[0];
        let viewers = users_where(&ring, 15_552_000_000, 2, |o| o == 2);
        let (contact, stranger) = (viewers[0], viewers[1]);
        let mut t = cluster.register(0, target).await;
        let c = cluster.register(0, contact).await;
        let s = cluster.register(0, stranger).await;
        assert_eq!(t.welcome().node_id, 1);
        assert_eq!(c.welcome().node_id, 2);
        assert_eq!(s.welcome().node_id, 2);
        let c_events = Events::collect(c.clone());
        let s_events = Events::collect(s.clone());
        t.set_contacts(vec![contact]).await.expect("contacts");

        // Everyone (the default): both see the target online at once.
        c.presence_subscribe(vec![target]).await.expect("subscribe");
        s.presence_subscribe(vec![target]).await.expect("subscribe");
        for e in [&c_events, &s_events] {
            e.wait_presence(target, "initial", |p| p.online).await;
        }
        // Two viewers on node 2, one registration of node 2's interest with node 1.
        assert_eq!(metric(&cluster, 1, "ringpost_presence_interest_entries"), 1);
        assert_eq!(
            metric(&cluster, 1, "ringpost_presence_subscribes_received_total"),
            1
        );
        assert_eq!(
            metric(&cluster, 2, "ringpost_presence_subscribes_sent_total"),
            1
        );

        // The target goes offline: both see it, with a last-seen time; one change was sent to
        // node 2 for both viewers.
        let sent = metric(&cluster, 1, "ringpost_presence_changes_sent_total");
        t.close().await;
        for e in [&c_events, &s_events] {
            let p = e
                .wait_presence(target, "offline", |p| !p.online && p.last_seen_ms > 0)
                .await;
            assert!(p.last_seen_ms > 0);
        }
        assert_eq!(
            metric(&cluster, 1, "ringpost_presence_changes_sent_total"),
            sent + 1
        );

        // Contacts only: the contact sees it come online, the stranger sees nothing at all.
        t = reconnect(&cluster, &t).await;
        t.set_privacy(Visibility::Contacts, Visibility::Contacts)
            .await
            .expect("privacy");
        s_events
            .wait_presence(target, "hidden from a stranger", |p| *p == hidden(target))
            .await;
        c_events
            .wait_presence(target, "contact", |p| p.online)
            .await;
        let stranger_seen = s_events.presence(target).len();
        t.close().await;
        c_events
            .wait_presence(target, "contact sees offline", |p| !p.online)
            .await;
        t = reconnect(&cluster, &t).await;
        c_events
            .wait_presence(target, "contact sees online", |p| p.online)
            .await;
        // The change reached node 2 once for both viewers: the stranger got nothing new.
        assert_eq!(s_events.presence(target).len(), stranger_seen);

        // Nobody: the contact loses sight too.
        t.set_privacy(Visibility::Nobody, Visibility::Nobody)
            .await
            .expect("privacy");
        c_events
            .wait_presence(target, "nobody", |p| *p == hidden(target))
            .await;

        // Everyone again, but the stranger is blocked: it still sees nothing; the contact does.
        t.block(stranger).await.expect("block");
        t.set_privacy(Visibility::Everyone, Visibility::Everyone)
            .await
            .expect("privacy");
        c_events
            .wait_presence(target, "everyone again", |p| p.online)
            .await;
        assert_eq!(s_events.presence(target).pop(), Some(hidden(target)));

        // A blocked sender's message is answered Ok and never delivered; the contact's, sent
        // after it was acknowledged, arrives (an entry stored for the blocked one would have
        // come first).
        let t_events = Events::collect(t.clone());
        let blocked = s
            .send(target, msg_id(1), to_primary(target, "from a blocked user"))
            .await
            .expect("send");
        assert_eq!(blocked.status, SendStatus::Ok);
        let ok = c
            .send(target, msg_id(2), to_primary(target, "from a contact"))
            .await
            .expect("send");
        assert_eq!(ok.status, SendStatus::Ok);
        t_events
            .wait_until("the contact's message", |e| {
                e.messages().contains(&msg_id(2))
            })
            .await;
        assert_eq!(t_events.messages(), vec![msg_id(2)]);
        assert_eq!(
            metric(&cluster, 1, "ringpost_presence_blocked_sends_total"),
            1
        );

        // Typing: the blocked user's is dropped on the target's owner; the contact's arrives.
        s.typing(target, true).await.expect("typing");
        wait_metric(&cluster, 1, "ringpost_presence_typing_dropped_total", 1).await;
        c.typing(target, true).await.expect("typing");
        t_events
            .wait_until("the contact's typing", |e| e.typing_from(contact) == 1)
            .await;
        assert_eq!(t_events.typing_from(stranger), 0);

        // Typing to an offline device is not kept for it: after a reconnect only the message
        // sent after the typing arrives.
        t.close().await;
        c_events
            .wait_presence(target, "offline for typing", |p| !p.online)
            .await;
        c.typing(target, false).await.expect("typing");
        let after = c
            .send(target, msg_id(3), to_primary(target, "after typing"))
            .await
            .expect("send");
        assert_eq!(after.status, SendStatus::Ok);
        let t = reconnect(&cluster, &t).await;
        let t_events = Events::collect(t.clone());
        t_events
            .wait_until("the message after typing", |e| {
                e.messages().contains(&msg_id(3))
            })
            .await;
        assert_eq!(t_events.typing_from(contact), 0, "typing is never stored");

        // The last viewer leaving withdraws node 2's interest from node 1.
        c.presence_subscribe(vec![]).await.expect("unsubscribe");
        s.close().await;
        wait_metric(&cluster, 1, "ringpost_presence_interest_entries", 0).await;
    });
}

#[test]
fn subscribers_follow_a_user_moved_to_a_joining_node() {
    let mut cluster = TestCluster::start_with(1, 2, &["--migrate-spread-ms", "200"]);
    let rt = runtime();
    let before = ring_of(&[1, 2]);
    let after = ring_of(&[1, 2, 3]);
    let target = users_where(&after, 15_553_000_000, 1, |o| o == 3)[0];
    let old_owner = before.owner_of(target).unwrap();
    // A viewer that stays where it is, on the other node.
    let viewer = users_where(&after, 15_553_000_000, 1, |o| o != 3 && o != old_owner)[0];
    let (t, t_events, v_events) = rt.block_on(async {
        let t = cluster.register(0, target).await;
        let v = cluster.register(0, viewer).await;
        let t_events = Events::collect(t.clone());
        let v_events = Events::collect(v.clone());
        v.presence_subscribe(vec![target]).await.expect("subscribe");
        v_events.wait_presence(target, "online", |p| p.online).await;
        assert_eq!(
            metric(&cluster, old_owner, "ringpost_presence_interest_entries"),
            1
        );
        (t, t_events, v_events)
    });

    cluster.add_node();
    rt.block_on(async {
        // The target's device follows its user to node 3; the viewer's node registers its
        // interest there, and the old owner forgets it.
        t_events
            .wait_until("the target on node 3", |e| {
                (e.0.lock().unwrap().iter()).any(
                    |e| matches!(e, Event::Reconnected { welcome, .. } if welcome.node_id == 3),
                )
            })
            .await;
        wait_metric(&cluster, 3, "ringpost_presence_interest_entries", 1).await;
        wait_metric(&cluster, old_owner, "ringpost_presence_interest_entries", 0).await;
        v_events
            .wait_presence(target, "online on node 3", |p| p.online)
            .await;
        // A change on the new owner reaches the viewer.
        t.close().await;
        v_events
            .wait_presence(target, "offline on node 3", |p| {
                !p.online && p.last_seen_ms > 0
            })
            .await;
    });
}

#[test]
fn a_failed_registration_is_retried_until_the_owner_answers() {
    // A node is marked down only after 100 missed heartbeats of 600 ms, a minute: the owner's
    // pause below (longer than the 10 s peer call timeout) changes no ring.
    let cluster = TestCluster::start_configured(1, 2, &[], 600, 100);
    runtime().block_on(async {
        let ring = ring_of(&[1, 2]);
        let target = users_where(&ring, 15_554_000_000, 1, |o| o == 1)[0];
        let viewer = users_where(&ring, 15_554_000_000, 1, |o| o == 2)[0];
        let t = cluster.register(0, target).await;
        let v = cluster.register(0, viewer).await;
        assert_eq!(t.welcome().node_id, 1);
        assert_eq!(v.welcome().node_id, 2);
        let v_events = Events::collect(v.clone());
        let epoch = cluster.view().await.epoch;

        // The owner stops answering: node 2's registration of its interest times out.
        let owner = cluster.index_of(1);
        cluster.nodes[owner].signal("STOP");
        v.presence_subscribe(vec![target]).await.expect("subscribe");
        let early = v_events.presence(target);
        assert!(early.is_empty(), "presence from a stopped owner: {early:?}");
        // Held stopped until node 2's registration timed out and was tried again: resuming
        // the owner earlier would let the first attempt's packets through (QUIC retransmits).
        let deadline = Instant::now() + WAIT;
        while metric(&cluster, 2, "ringpost_presence_register_retries_total") < 1 {
            assert!(
                Instant::now() < deadline,
                "node 2 never retried its registration"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cluster.nodes[owner].signal("CONT");

        // Retried with no ring change: the viewer sees the target, and then its change.
        v_events
            .wait_presence(target, "online after the retry", |p| p.online)
            .await;
        wait_metric(&cluster, 1, "ringpost_presence_interest_entries", 1).await;
        t.close().await;
        v_events
            .wait_presence(target, "offline", |p| !p.online && p.last_seen_ms > 0)
            .await;
        assert_eq!(cluster.view().await.epoch, epoch, "the ring did not change");
    });
}
