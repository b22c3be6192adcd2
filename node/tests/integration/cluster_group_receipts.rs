//! Group receipts, blocking and typing in groups across a real cluster: a coordinator and
//! three `ringpost-node run` processes on loopback, members on every node, driven through the
//! client SDK.

use crate::cluster_harness as harness;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::{retrying, ring_of, runtime, users_on, TestCluster};
use ringpost_client::{Client, Event};
use ringpost_node::groups::route_id;
use ringpost_wire::{ErrorCode, GroupId, MsgId, ReceiptKind, SendStatus, UserId};

const WAIT: Duration = Duration::from_secs(40);
/// Room for something that should not arrive (never a pass/fail timing of speed).
const QUIET: Duration = Duration::from_millis(500);

fn msg_id(n: u32) -> MsgId {
    let mut id = [9u8; 16];
    id[12..].copy_from_slice(&n.to_be_bytes());
    id
}

/// Every event one client saw, in order.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<Event>>>);

impl Events {
    fn collect(c: Client) -> Events {
        let events = Events::default();
        let out = events.clone();
        tokio::spawn(async move {
            while let Some(e) = c.next_event().await {
                out.0.lock().unwrap().push(e);
            }
        });
        events
    }

    fn all(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }

    fn group_receipts(&self) -> Vec<(ReceiptKind, Vec<MsgId>)> {
        self.all()
            .into_iter()
            .filter_map(|e| match e {
                Event::GroupReceipt { kind, msg_ids, .. } => Some((kind, msg_ids)),
                _ => None,
            })
            .collect()
    }

    /// The highest group seq of a group message seen (0: none).
    fn group_seq(&self) -> u64 {
        self.all()
            .iter()
            .filter_map(|e| match e {
                Event::GroupMessage(d) => Some(d.group_seq),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    async fn wait_for(&self, what: &str, f: impl Fn(&Events) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn metric(cluster: &TestCluster, node: usize, name: &str) -> u64 {
    cluster.metric_at(node, name).max(0) as u64
}

#[test]
fn a_sender_gets_one_delivered_to_all_and_one_read_by_all_across_three_nodes() {
    let cluster = TestCluster::start(1, 3);
    runtime().block_on(async {
        let ring = ring_of(&[1, 2, 3]);
        // The sender on node 1, two members on each of nodes 2 and 3.
        let sender_user = users_on(&ring, 16_000_000_000, 1, 1)[0];
        let members: Vec<UserId> = [2u64, 3]
            .into_iter()
            .flat_map(|n| users_on(&ring, 16_000_000_000, 2, n))
            .collect();
        let sender = cluster.register(0, sender_user).await;
        let mut clients = Vec::new();
        for &u in &members {
            clients.push(cluster.register(0, u).await);
        }
        let sender_events = Events::collect(sender.clone());
        let events: Vec<Events> = clients.iter().map(|c| Events::collect(c.clone())).collect();

        let info = retrying(|| sender.group_create(members.clone(), Bytes::new())).await;
        let group: GroupId = info.group;
        let owner = ring.owner_of(route_id(&group)).expect("an owner");
        let sent = [msg_id(1), msg_id(2)];
        for id in sent {
            let ack = retrying(|| sender.group_send(group, id, Bytes::from_static(b"m"))).await;
            assert_eq!(ack.status, SendStatus::Ok);
        }
        // Seqs: 1 the creation, 2 and 3 the messages.
        for e in &events {
            e.wait_for("both messages", |e| e.group_seq() == 3).await;
        }

        // All members but the last report delivered: the sender hears nothing yet.
        for (c, e) in clients.iter().zip(&events).take(members.len() - 1) {
            let seq = e.group_seq();
            retrying(|| c.group_receipt(group, ReceiptKind::Delivered, seq)).await;
        }
        tokio::time::sleep(QUIET).await;
        assert_eq!(sender_events.group_receipts(), vec![]);
        // The last one: one receipt naming both messages.
        let last = clients.last().unwrap();
        retrying(|| last.group_receipt(group, ReceiptKind::Delivered, 3)).await;
        sender_events
            .wait_for("delivered to all", |e| !e.group_receipts().is_empty())
            .await;
        // Reads, in one go: the delivered watermark is already there.
        for c in &clients {
            retrying(|| c.group_receipt(group, ReceiptKind::Read, 3)).await;
        }
        sender_events
            .wait_for("read by all", |e| e.group_receipts().len() >= 2)
            .await;
        // Repeats change nothing.
        retrying(|| clients[0].group_receipt(group, ReceiptKind::Read, 3)).await;
        tokio::time::sleep(QUIET).await;
        assert_eq!(
            sender_events.group_receipts(),
            vec![
                (ReceiptKind::Delivered, sent.to_vec()),
                (ReceiptKind::Read, sent.to_vec())
            ],
            "exactly one delivered-to-all and one read-by-all"
        );
        // No per-member receipt reached the sender's inbox.
        assert!(
            !sender_events
                .all()
                .iter()
                .any(|e| matches!(e, Event::Delivered { .. } | Event::Read { .. })),
            "{:?}",
            sender_events.all()
        );
        let owner_index = cluster.index_of(owner);
        assert_eq!(
            metric(
                &cluster,
                owner_index,
                "ringpost_group_receipts_aggregated_total"
            ),
            2
        );
        assert_eq!(
            metric(&cluster, owner_index, "ringpost_group_receipts_total"),
            members.len() as u64 * 2 + 1
        );
    });
}

#[test]
fn a_user_who_blocks_the_actor_cannot_be_added_by_it_from_another_node() {
    let cluster = TestCluster::start(1, 3);
    runtime().block_on(async {
        let ring = ring_of(&[1, 2, 3]);
        // The actor on node 1; the blocker on node 2; a bystander on node 3.
        let actor_user = users_on(&ring, 17_000_000_000, 1, 1)[0];
        let blocker_user = users_on(&ring, 17_000_000_000, 1, 2)[0];
        let other_user = users_on(&ring, 17_000_000_000, 1, 3)[0];
        let actor = cluster.register(0, actor_user).await;
        let blocker = cluster.register(0, blocker_user).await;
        let _other = cluster.register(0, other_user).await;
        retrying(|| blocker.block(actor_user)).await;

        // A create naming the blocker is refused whole, with the documented answer.
        match actor
            .group_create(vec![blocker_user, other_user], Bytes::new())
            .await
        {
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}");
                assert!(
                    e.to_string()
                        .contains(ringpost_node::groups::blocks::BLOCKED_ADD_MESSAGE),
                    "{e}"
                );
            }
            Ok(info) => panic!("a blocked add was accepted: {info:?}"),
        }
        // Without the blocker it works; adding the blocker later is refused the same way and
        // changes nothing.
        let info = retrying(|| actor.group_create(vec![other_user], Bytes::new())).await;
        let mut add = ringpost_wire::GroupUpdate::new(info.group);
        add.add = vec![blocker_user];
        match actor.group_update(add.clone()).await {
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}"),
            Ok(info) => panic!("a blocked add was accepted: {info:?}"),
        }
        let now = retrying(|| actor.group_info(info.group)).await;
        assert_eq!(now.version, 1);
        assert!(!now.members.contains(&blocker_user));
        // After an unblock the add goes through.
        retrying(|| blocker.unblock(actor_user)).await;
        let after = retrying(|| actor.group_update(add.clone())).await;
        assert!(after.members.contains(&blocker_user));
    });
}

#[test]
fn group_typing_reaches_online_members_only_and_not_those_who_block_the_typer() {
    let cluster = TestCluster::start(1, 3);
    runtime().block_on(async {
        let ring = ring_of(&[1, 2, 3]);
        let typer_user = users_on(&ring, 18_000_000_000, 1, 1)[0];
        // On nodes 2 and 3: an online member, a member who blocks the typer, an offline
        // member; and an online non-member.
        let on2 = users_on(&ring, 18_000_000_000, 2, 2);
        let on3 = users_on(&ring, 18_000_000_000, 2, 3);
        let (online, blocker, offline, outsider) = (on2[0], on3[0], on2[1], on3[1]);
        let typer = cluster.register(0, typer_user).await;
        let c_online = cluster.register(0, online).await;
        let c_blocker = cluster.register(0, blocker).await;
        let c_offline = cluster.register(0, offline).await;
        let c_outsider = cluster.register(0, outsider).await;
        let info =
            retrying(|| typer.group_create(vec![online, blocker, offline], Bytes::new())).await;
        let group = info.group;
        // Blocking after the group exists: the member stays, its indicators are dropped.
        retrying(|| c_blocker.block(typer_user)).await;
        let offline_auth = c_offline.auth().expect("auth");
        c_offline.close().await;
        let e_online = Events::collect(c_online.clone());
        let e_blocker = Events::collect(c_blocker.clone());
        let e_outsider = Events::collect(c_outsider.clone());

        let typing_in = |e: &Events| -> Vec<(UserId, bool)> {
            e.all()
                .into_iter()
                .filter_map(|e| match e {
                    Event::Typing(t) if t.group == Some(group) => Some((t.user, t.typing)),
                    _ => None,
                })
                .collect()
        };
        // Retried until the first arrives (the group's owner may still be settling).
        let deadline = Instant::now() + WAIT;
        while typing_in(&e_online).is_empty() {
            assert!(Instant::now() < deadline, "no group typing arrived");
            typer
                .group_typing(group, true, false)
                .await
                .expect("typing");
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        tokio::time::sleep(QUIET).await;
        assert!(typing_in(&e_online)
            .iter()
            .all(|&t| t == (typer_user, true)));
        assert_eq!(typing_in(&e_blocker), vec![], "the blocker gets nothing");
        assert!(
            !e_outsider
                .all()
                .iter()
                .any(|e| matches!(e, Event::Typing(_))),
            "a non-member gets nothing"
        );
        // Never stored: the offline member, back online, sees no indicator.
        let back = retrying(|| {
            Client::connect(ringpost_client::ClientConfig {
                auth: Some(offline_auth.clone()),
                ..cluster.config(0)
            })
        })
        .await;
        let e_back = Events::collect(back.clone());
        e_back
            .wait_for("the group's creation", |e| {
                e.all()
                    .iter()
                    .any(|e| matches!(e, Event::GroupChanged { .. }))
            })
            .await;
        tokio::time::sleep(QUIET).await;
        assert!(!e_back.all().iter().any(|e| matches!(e, Event::Typing(_))));
        // A non-member's indicator to the group is dropped.
        c_outsider
            .group_typing(group, true, false)
            .await
            .expect("typing");
        tokio::time::sleep(QUIET).await;
        assert!(typing_in(&e_online).iter().all(|&(u, _)| u == typer_user));
    });
}
