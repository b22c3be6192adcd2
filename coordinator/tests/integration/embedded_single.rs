//! The embedded single-replica coordinator the dev node uses.

use std::future::Future;
use std::time::Duration;

use ringpost_coordinator::{Coordinator, EmbeddedConfig, MemberState, NodeInfo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_coordinator_serves_the_client_api_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EmbeddedConfig::new(dir.path());
    config.shard_count = 128;
    let (coordinator, client) = Coordinator::start_embedded(config.clone()).await.unwrap();

    let mut watch = client.watch().await.unwrap();
    let first = watch.current();
    assert_eq!(first.shard_count, 128);
    assert_eq!(first.replication_factor, 2);

    let mut info = NodeInfo::new(1);
    info.ws_url = Some("ws://127.0.0.1:8080/ws".into());
    let joined = client.join(info).await.unwrap();
    assert_eq!(joined.member(1).unwrap().state, MemberState::Joining);
    let active = client.activate(1).await.unwrap();
    assert_eq!(active.epoch, first.epoch + 1);
    let ack = client.heartbeat(1).await.unwrap();
    assert_eq!(ack.state, MemberState::Active);

    let pushed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let v = watch.current();
            if v.revision >= active.revision {
                return v;
            }
            watch.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(pushed.epoch, active.epoch);

    let status = client.status().await.unwrap();
    assert_eq!(status.raft_role, "leader");
    drop(watch);
    drop(client);
    coordinator.shutdown().await;

    // Restart on the same directory: same cluster, same members, shard count unchanged.
    config.shard_count = 4096;
    let (coordinator, client) = Coordinator::start_embedded(config).await.unwrap();
    let view = client.view().await.unwrap();
    assert_eq!(view.cluster_id, first.cluster_id);
    assert_eq!(view.shard_count, 128);
    assert_eq!(view.member(1).unwrap().state, MemberState::Active);
    assert_eq!(view.epoch, active.epoch);
    coordinator.shutdown().await;
}

/// A request whose caller gives up after it was sent must not leave its answer behind for the
/// next request on the same connection (the node's heartbeat loop times requests out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_never_answers_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, client) = Coordinator::start_embedded(EmbeddedConfig::new(dir.path()))
        .await
        .unwrap();
    client.join(NodeInfo::new(1)).await.unwrap();
    client.activate(1).await.unwrap();
    let mut cancelled = 0;
    for _ in 0..200 {
        // Poll the request once (it is sent, its answer not yet read), then give up on it.
        let mut request = Box::pin(client.view());
        let answered =
            std::future::poll_fn(|cx| std::task::Poll::Ready(request.as_mut().poll(cx).is_ready()))
                .await;
        if !answered {
            cancelled += 1;
        }
        drop(request);
        let ack = client
            .heartbeat(1)
            .await
            .expect("the next request gets its own answer");
        assert_eq!(ack.state, MemberState::Active);
    }
    assert!(cancelled > 0, "some requests were cut short");
    coordinator.shutdown().await;
}
