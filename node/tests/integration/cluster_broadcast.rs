//! Broadcast lists and statuses across real nodes: a real coordinator and two real
//! `ringpost-node run` processes on loopback, driven through the client SDK.

use crate::cluster_harness as harness;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::{ring_of, runtime, users_where, TestCluster};
use ringpost_client::{Client, ClientConfig, Event};
use ringpost_wire::{DeviceCiphertext, MsgId, SendStatus, StatusAudience, UserId};

const WAIT: Duration = Duration::from_secs(30);

/// The 1:1 messages a client receives (msg_id, from, body), kept by a task reading its events,
/// and its other events.
#[derive(Clone, Default)]
struct Inbox(
    Arc<Mutex<Vec<(MsgId, UserId, Bytes)>>>,
    Arc<Mutex<Vec<Event>>>,
);

impl Inbox {
    fn collect(c: Client) -> Inbox {
        let inbox = Inbox::default();
        let seen = inbox.clone();
        tokio::spawn(async move {
            while let Some(e) = c.next_event().await {
                match e {
                    Event::Message(d) => {
                        seen.0.lock().unwrap().push((d.msg_id, d.from_user, d.body))
                    }
                    other => seen.1.lock().unwrap().push(other),
                }
            }
        });
        inbox
    }

    /// Statuses received: (msg_id, poster, body).
    fn statuses(&self) -> Vec<(MsgId, UserId, Bytes)> {
        (self.1.lock().unwrap().iter())
            .filter_map(|e| match e {
                Event::Status(d) => Some((d.msg_id, d.from_user, d.body.clone())),
                _ => None,
            })
            .collect()
    }

    /// View receipts received: (viewer, statuses).
    fn views(&self) -> Vec<(UserId, Vec<MsgId>)> {
        (self.1.lock().unwrap().iter())
            .filter_map(|e| match e {
                Event::StatusViewed {
                    by_user, msg_ids, ..
                } => Some((*by_user, msg_ids.clone())),
                _ => None,
            })
            .collect()
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&Inbox) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn ids(&self) -> Vec<MsgId> {
        self.0.lock().unwrap().iter().map(|m| m.0).collect()
    }

    async fn wait_for(&self, id: MsgId) {
        let deadline = Instant::now() + WAIT;
        while !self.ids().contains(&id) {
            assert!(
                Instant::now() < deadline,
                "waiting for {id:?}: {:?}",
                self.ids()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn ciphertext(user: UserId, device: u32, body: String) -> DeviceCiphertext {
    DeviceCiphertext {
        user,
        device,
        body: Bytes::from(body),
    }
}

fn metric(cluster: &TestCluster, node: u64, name: &str) -> i64 {
    cluster.metric(node, name)
}

#[test]
fn a_broadcast_reaches_only_recipients_who_have_the_sender_as_a_contact() {
    let cluster = TestCluster::start(1, 2);
    runtime().block_on(async {
        let ring = ring_of(&[1, 2]);
        let sender = users_where(&ring, 15_554_000_000, 1, |o| o == 1)[0];
        let on_1 = users_where(&ring, 15_554_100_000, 2, |o| o == 1);
        let on_2 = users_where(&ring, 15_554_100_000, 3, |o| o == 2);
        // Contacts of the sender on both nodes, strangers on both nodes, and a contact whose
        // device list the sender has wrong.
        let (friend_1, stranger_1) = (on_1[0], on_1[1]);
        let (friend_2, stranger_2, stale) = (on_2[0], on_2[1], on_2[2]);
        let s = cluster.register(0, sender).await;
        assert_eq!(s.welcome().node_id, 1);
        let mut inboxes = Vec::new();
        for (u, has_sender) in [
            (friend_1, true),
            (stranger_1, false),
            (friend_2, true),
            (stranger_2, false),
            (stale, true),
        ] {
            let c = cluster.register(0, u).await;
            if has_sender {
                c.set_contacts(vec![sender]).await.expect("contacts");
            }
            inboxes.push(Inbox::collect(c));
        }
        let recipients = [friend_1, stranger_1, friend_2, stranger_2, stale];

        let id: MsgId = [1; 16];
        let mut cts: Vec<_> = recipients
            .iter()
            .map(|&u| ciphertext(u, 1, format!("hello {u}")))
            .collect();
        cts.push(ciphertext(stale, 2, "a device it does not have".into()));
        let ack = s.broadcast_send(id, cts).await.expect("broadcast");
        assert_eq!(ack.msg_id, id);
        let got: Vec<_> = ack.results.iter().map(|r| (r.user, r.status)).collect();
        // Strangers are answered exactly like contacts: the sender learns nothing.
        assert_eq!(
            got,
            vec![
                (friend_1, SendStatus::Ok),
                (stranger_1, SendStatus::Ok),
                (friend_2, SendStatus::Ok),
                (stranger_2, SendStatus::Ok),
                (stale, SendStatus::MismatchedDevices),
            ]
        );
        assert!(ack.results.iter().all(|r| r.error == 0));
        assert_eq!(ack.results[4].extra, vec![2]);
        assert!(ack.results[4].missing.is_empty());

        // Contacts get it as a 1:1 message with their own ciphertext.
        for (i, friend) in [(0, friend_1), (2, friend_2)] {
            inboxes[i].wait_for(id).await;
            let m = inboxes[i].0.lock().unwrap()[0].clone();
            assert_eq!((m.1, m.2), (sender, Bytes::from(format!("hello {friend}"))));
        }
        // Strangers never do: a 1:1 message sent after the broadcast arrives alone (the
        // conversation's order would have put a stored broadcast first).
        let after: MsgId = [2; 16];
        for (i, stranger) in [(1, stranger_1), (3, stranger_2)] {
            let ack = s
                .send(stranger, after, vec![ciphertext(stranger, 1, "1:1".into())])
                .await
                .expect("send");
            assert_eq!(ack.status, SendStatus::Ok);
            inboxes[i].wait_for(after).await;
            assert_eq!(inboxes[i].ids(), vec![after]);
        }
        // Each owner dropped its stranger, and counted it.
        for node in [1, 2] {
            assert_eq!(
                metric(
                    &cluster,
                    node,
                    "ringpost_broadcast_recipients_not_contact_total"
                ),
                1,
                "node {node}"
            );
        }
        assert_eq!(metric(&cluster, 1, "ringpost_broadcast_sends_total"), 1);

        // The sender re-encrypts for the stale recipient alone, same msg_id; resending to a
        // recipient already served is answered from the dedup record and stores nothing.
        let retry = s
            .broadcast_send(
                id,
                vec![
                    ciphertext(stale, 1, "hello again".into()),
                    ciphertext(friend_1, 1, format!("hello {friend_1}")),
                ],
            )
            .await
            .expect("broadcast");
        let got: Vec<_> = retry.results.iter().map(|r| (r.user, r.status)).collect();
        assert_eq!(
            got,
            vec![(stale, SendStatus::Ok), (friend_1, SendStatus::Ok)]
        );
        inboxes[4].wait_for(id).await;
        assert_eq!(
            metric(&cluster, 1, "ringpost_broadcast_recipients_duplicate_total"),
            1
        );
        assert_eq!(
            inboxes[0].ids(),
            vec![id],
            "a duplicate is not stored twice"
        );

        // Bad lists are refused whole.
        let me = s
            .broadcast_send([3; 16], vec![ciphertext(sender, 2, "me".into())])
            .await;
        assert!(me.is_err(), "the sender is no recipient: {me:?}");
    });
}

/// How long statuses live in the status test's nodes (`--status-ttl-ms`).
const STATUS_TTL: Duration = Duration::from_secs(4);

#[test]
fn a_status_reaches_exactly_its_audience_expires_undrained_and_views_reach_the_poster() {
    let ttl_ms = STATUS_TTL.as_millis().to_string();
    let cluster = TestCluster::start_with(1, 2, &["--status-ttl-ms", &ttl_ms]);
    runtime().block_on(async {
        let ring = ring_of(&[1, 2]);
        let poster = users_where(&ring, 15_555_000_000, 1, |o| o == 1)[0];
        let excluded = users_where(&ring, 15_555_100_000, 1, |o| o == 1)[0];
        let on_2 = users_where(&ring, 15_555_100_000, 4, |o| o == 2);
        // `viewer` and `offline` have the poster as a contact and are its contacts;
        // `one_way` is the poster's contact but has not saved the poster; `not_saved` saved
        // the poster, who has not saved it; `excluded` is a mutual contact left out.
        let (viewer, one_way, not_saved, offline) = (on_2[0], on_2[1], on_2[2], on_2[3]);
        let p = cluster.register(0, poster).await;
        assert_eq!(p.welcome().node_id, 1);
        p.set_contacts(vec![viewer, one_way, offline, excluded])
            .await
            .expect("contacts");
        let (mut inboxes, mut clients) = (Vec::new(), Vec::new());
        for u in [viewer, one_way, not_saved, excluded] {
            let c = cluster.register(0, u).await;
            if u != one_way {
                c.set_contacts(vec![poster]).await.expect("contacts");
            }
            inboxes.push(Inbox::collect(c.clone()));
            clients.push(c);
        }
        let o = cluster.register(0, offline).await;
        o.set_contacts(vec![poster]).await.expect("contacts");
        let o_auth = o.auth().expect("registered");
        o.close().await;
        let p_inbox = Inbox::collect(p.clone());

        let id: MsgId = [5; 16];
        let ack = p
            .status_post(
                id,
                StatusAudience::ContactsExcept,
                vec![excluded],
                Bytes::from_static(b"story"),
            )
            .await
            .expect("post");
        assert_eq!(ack.status, SendStatus::Ok);
        let posted = Instant::now();

        // The mutual contact in the audience gets it.
        inboxes[0]
            .wait_until("the status", |i| !i.statuses().is_empty())
            .await;
        assert_eq!(
            inboxes[0].statuses(),
            vec![(id, poster, Bytes::from_static(b"story"))]
        );
        // Nobody else does: a 1:1 message sent after the post arrives alone.
        let after: MsgId = [6; 16];
        for (i, u) in [(1, one_way), (2, not_saved), (3, excluded)] {
            let ack = p
                .send(u, after, vec![ciphertext(u, 1, "1:1".into())])
                .await
                .expect("send");
            assert_eq!(ack.status, SendStatus::Ok);
            inboxes[i].wait_for(after).await;
            assert!(inboxes[i].statuses().is_empty(), "user {u} got the status");
        }
        // Stored for the poster's own user (no other device) and the three audience members;
        // the one-way contact's owner dropped it.
        assert_eq!(metric(&cluster, 1, "ringpost_status_recipients_total"), 4);
        assert_eq!(metric(&cluster, 2, "ringpost_status_not_contact_total"), 1);

        // The viewer's view receipt reaches the poster.
        clients[0]
            .status_viewed(poster, [7; 16], vec![id])
            .await
            .expect("viewed");
        p_inbox
            .wait_until("the view receipt", |i| !i.views().is_empty())
            .await;
        assert_eq!(p_inbox.views(), vec![(viewer, vec![id])]);

        // The offline member's inbox had it, undrained; once the status has expired, its
        // device never sees it, and a message sent after it arrives alone.
        let wait = (posted + STATUS_TTL + Duration::from_secs(1))
            .saturating_duration_since(Instant::now());
        tokio::time::sleep(wait).await;
        let o = Client::connect(ClientConfig {
            auth: Some(o_auth),
            ..cluster.config(0)
        })
        .await
        .expect("connect");
        let o_inbox = Inbox::collect(o);
        let ack = p
            .send(offline, after, vec![ciphertext(offline, 1, "1:1".into())])
            .await
            .expect("send");
        assert_eq!(ack.status, SendStatus::Ok);
        o_inbox.wait_for(after).await;
        assert!(
            o_inbox.statuses().is_empty(),
            "an expired status was delivered"
        );
    });
}
