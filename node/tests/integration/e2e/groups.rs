//! Groups on one `ringpost-node dev` process: create, send, a linked device's copy, a
//! non-member refused, and messages acked just before a kill -9 delivered in group order after
//! the restart (from the inboxes, or from the fan-out log when the kill interrupted it; the
//! cluster test `cluster_groups` checks the resume itself).

use std::time::Duration;

use bytes::Bytes;
use ringpost_client::{dev, Client, Event};
use ringpost_wire::{Deliver, ErrorCode, GroupId, SendStatus};

use super::harness::TestNode;
use super::messaging::{auth, config, msg_id, register, ALICE, BOB};

const CAROL: u64 = 15_550_000_003;
const WAIT: Duration = Duration::from_secs(20);

/// The next group message of `group` (skipping its change events).
async fn next_group_message(c: &Client, group: GroupId) -> Deliver {
    loop {
        match tokio::time::timeout(WAIT, c.next_event()).await {
            Ok(Some(Event::GroupMessage(d))) if d.group == Some(group) => return d,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("event stream ended"),
            Err(_) => panic!("no group message within {WAIT:?}"),
        }
    }
}

#[tokio::test]
async fn a_group_message_reaches_every_member_device_and_survives_a_crash() {
    let mut node = TestNode::start();
    let (alice, _) = register(&node, "ws", ALICE).await;
    let (bob, bob_reg) = register(&node, "ws", BOB).await;
    let (carol, _) = register(&node, "ws", CAROL).await;
    let (alice2, _) = dev::link_device(config(&node, "ws"), &alice)
        .await
        .expect("link a second device");

    let info = alice
        .group_create(vec![BOB], Bytes::from_static(b"title"))
        .await
        .expect("create");
    let group = info.group;
    assert_eq!(info.members, vec![ALICE, BOB]);

    let ack = alice
        .group_send(
            group,
            msg_id(1),
            Bytes::from_static(b"sender-key ciphertext"),
        )
        .await
        .expect("send");
    assert_eq!(ack.status, SendStatus::Ok);
    let got = next_group_message(&bob, group).await;
    assert_eq!(
        (got.from_user, got.group_seq, &got.body[..]),
        (ALICE, 2, &b"sender-key ciphertext"[..])
    );
    // The sender's other device gets its copy; the sending device none.
    assert_eq!(next_group_message(&alice2, group).await.group_seq, 2);

    // Not a member: refused, and nothing sequenced.
    let refused = carol
        .group_send(group, msg_id(2), Bytes::from_static(b"x"))
        .await
        .expect_err("a non-member's send");
    assert_eq!(refused.code(), Some(ErrorCode::Forbidden));

    // Killed right after the acks: everything acked arrives after the restart.
    bob.close().await;
    for n in 10..20 {
        let ack = alice
            .group_send(group, msg_id(n), Bytes::from(format!("m{n}")))
            .await
            .expect("send");
        assert_eq!(ack.status, SendStatus::Ok);
    }
    node.restart();
    let bob = Client::connect(ringpost_client::ClientConfig {
        auth: Some(auth(&bob_reg)),
        ..config(&node, "ws")
    })
    .await
    .expect("reconnect");
    for seq in 3..13 {
        let d = next_group_message(&bob, group).await;
        assert_eq!(d.group_seq, seq, "in group order, each once");
        assert_eq!(d.body, Bytes::from(format!("m{}", seq + 7)));
    }
    drop(carol);
    drop(alice);
    drop(alice2);
}
