//! The io_uring WebSocket driver (`--ws-driver uring`, ws and wss) under the same flows as
//! tokio's: the whole e2e suite also passes with `RINGPOST_WS_DRIVER=uring` in the
//! environment; these run the flows that exercise the driver most on every `make test`.

use std::time::Duration;

use ringpost_client::{Connection, Endpoint, TlsOptions};

use super::harness::TestNode;
use super::messaging::{exchange_on, idle_connections_park_and_wake_on};
use super::robustness::bad_frames_get_errors_on;

fn uring_node(extra: &[&str]) -> TestNode {
    let mut args = vec!["--ws-driver", "uring"];
    args.extend_from_slice(extra);
    let node = TestNode::start_with(&args);
    let (_, metrics) = node.admin_get("/metrics");
    for listener in ["ws", "wss"] {
        assert!(
            metrics.contains(&format!(
                "ringpost_{listener}_driver_info{{driver=\"uring\"}} 1"
            )),
            "the node did not start the {listener} listener's io_uring driver: {metrics}"
        );
    }
    node
}

#[tokio::test]
async fn messages_receipts_and_typing_flow_over_wss_on_uring() {
    exchange_on(&uring_node(&[]), "wss").await;
}

#[tokio::test]
async fn idle_wss_connections_on_uring_park_and_wake() {
    idle_connections_park_and_wake_on(&uring_node(&[]), "wss").await;
}

#[tokio::test]
async fn messages_receipts_and_typing_flow_over_uring() {
    exchange_on(&uring_node(&[]), "ws").await;
}

#[tokio::test]
async fn idle_uring_connections_park_and_wake() {
    idle_connections_park_and_wake_on(&uring_node(&[]), "ws").await;
}

#[tokio::test]
async fn bad_and_oversize_frames_over_uring_get_errors_while_others_carry_on() {
    bad_frames_get_errors_on(&uring_node(&[])).await;
}

#[tokio::test]
async fn a_refused_uring_connection_is_told_why() {
    let node = uring_node(&["--preauth-per-source-max", "1"]);
    let endpoint = Endpoint::parse(&node.url("ws")).unwrap();
    let _first = Connection::open(&endpoint, &TlsOptions::default())
        .await
        .unwrap();
    // The second from this address gets the 503 the tokio path sends, then a close.
    let mut tcp = tokio::net::TcpStream::connect(node.url("ws").trim_start_matches("ws://"))
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut answer),
    )
    .await
    .expect("closed in time")
    .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}
