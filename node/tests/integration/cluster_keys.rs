//! Identity-key changes across real nodes: a real coordinator and two real `ringpost-node run`
//! processes on loopback, driven through the client SDK. An upload with a new identity key on
//! one node reaches the devices of the uploader's contacts on the other.

use crate::cluster_harness as harness;

use std::time::Duration;

use bytes::Bytes;
use harness::{ring_of, runtime, users_where, TestCluster};
use ringpost_client::prekeys::DeviceKeys;
use ringpost_client::{Client, Event};
use ringpost_wire::{DeviceCiphertext, DeviceId, PrekeyUpload, SendStatus, UserId};

const WAIT: Duration = Duration::from_secs(30);

async fn send_upload(c: &Client, u: PrekeyUpload) {
    c.prekey_upload(u.identity_key, u.signed_prekey, u.one_time)
        .await
        .expect("upload");
}

/// The next `n` identity changes `c` is told about: (user, device, identity key).
async fn identity_changes(c: &Client, n: usize) -> Vec<(UserId, DeviceId, Bytes)> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(WAIT, c.next_event()).await {
            Ok(Some(Event::IdentityChanged {
                user,
                device,
                identity_key,
                ..
            })) => got.push((user, device, identity_key)),
            Ok(Some(_)) => {}
            Ok(None) => panic!("client closed after {got:?}"),
            Err(_) => panic!("waited for {n} identity changes, got {got:?}"),
        }
    }
    got
}

#[test]
fn an_identity_change_reaches_every_device_of_the_contacts_on_another_node() {
    let cluster = TestCluster::start(1, 2);
    runtime().block_on(async {
        let ring = ring_of(&[1, 2]);
        let alice = users_where(&ring, 15_557_000_000, 1, |o| o == 1)[0];
        let on_2 = users_where(&ring, 15_557_100_000, 2, |o| o == 2);
        let (bob, carol) = (on_2[0], on_2[1]);
        let a = cluster.register(0, alice).await;
        assert_eq!(a.welcome().node_id, 1);
        let b = cluster.register(1, bob).await;
        assert_eq!(b.welcome().node_id, 2);
        let (b_laptop, b_laptop_reg) = ringpost_client::dev::link_device(cluster.config(1), &b)
            .await
            .expect("link");
        let c = cluster.register(1, carol).await;
        // Alice and Bob list each other; Carol lists Alice, but Alice does not list Carol.
        a.set_contacts(vec![bob]).await.unwrap();
        b.set_contacts(vec![alice]).await.unwrap();
        c.set_contacts(vec![alice]).await.unwrap();

        // Alice's first upload, a replenishing upload with the same key (not announced), a
        // newly linked device's first upload, and a changed key on the first device.
        let k1 = DeviceKeys::from_seed([1; 32]);
        send_upload(&a, k1.upload(Some(1), 0..5)).await;
        send_upload(&a, k1.upload(None, 5..10)).await;
        let (a_laptop, laptop_reg) = ringpost_client::dev::link_device(cluster.config(0), &a)
            .await
            .expect("link");
        let k3 = DeviceKeys::from_seed([3; 32]);
        send_upload(&a_laptop, k3.upload(Some(1), 0..5)).await;
        let k2 = DeviceKeys::from_seed([2; 32]);
        send_upload(&a, k2.upload(Some(2), 0..5)).await;

        let expected = vec![
            (alice, 1, k1.identity_key()),
            (alice, laptop_reg.device, k3.identity_key()),
            (alice, 1, k2.identity_key()),
        ];
        assert_eq!(identity_changes(&b, 3).await, expected);
        assert_eq!(identity_changes(&b_laptop, 3).await, expected);

        // Carol is not in Alice's list: nothing was stored for her. A message stored after the
        // uploads answered is behind anything they stored in her inbox, so it comes first only
        // if they stored nothing.
        let ack = b
            .send(
                carol,
                [9; 16],
                vec![
                    DeviceCiphertext {
                        user: carol,
                        device: 1,
                        body: Bytes::from_static(b"hello"),
                    },
                    DeviceCiphertext {
                        user: bob,
                        device: b_laptop_reg.device,
                        body: Bytes::from_static(b"hello, laptop"),
                    },
                ],
            )
            .await
            .unwrap();
        assert_eq!(ack.status, SendStatus::Ok);
        let first = tokio::time::timeout(WAIT, c.next_event())
            .await
            .expect("carol's first event");
        assert!(
            matches!(&first, Some(Event::Message(d)) if d.msg_id == [9; 16]),
            "{first:?}"
        );
        assert!(cluster.metric(1, "ringpost_keys_identity_announcements_total") >= 3);
    });
}
