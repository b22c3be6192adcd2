use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use ringpost_coordinator::NodeId;
use ringpost_wire::ErrorCode;

use super::link::{PeerConfig, PeerNet, PeerService, PEER_FRAME_BYTES_MAX};
use super::*;

const SECRET: &[u8] = b"test cluster secret, 32 bytes!!!";
const TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn messages_round_trip_and_garbage_is_an_error() {
    let req = PeerRequest::Store(Store {
        to_user: 1,
        from_user: 2,
        from_device: 3,
        msg_id: [7; 16],
        kind: StoreKind::Message,
        targets: Targets::Exact(vec![(1, b"ct".to_vec())]),
        except: None,
        receipt_msg_ids: vec![],
        dedup: true,
    });
    let bytes = encode_request(4, req.clone()).unwrap();
    let env: Envelope = postcard::from_bytes(&bytes).unwrap();
    assert_eq!((env.version, env.epoch, env.request), (1, 4, req));
    let resp = PeerResponse::WrongOwner { epoch: 5 };
    assert_eq!(decode_response(&encode_response(&resp)).unwrap(), resp);
    assert!(decode_response(&[0xff, 0xff, 0xff]).is_err());
    assert!(decode_response(&[]).is_err());
}

/// A value whose serialisation fails.
struct Unencodable;

impl Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("planted failure"))
    }
}

/// An answer one byte too large for a link frame once encoded.
fn oversize_answer() -> PeerResponse {
    PeerResponse::Frames(vec![vec![0; PEER_FRAME_BYTES_MAX]])
}

fn is_internal_error(bytes: &[u8], why: &str) -> bool {
    matches!(decode_response(bytes), Ok(PeerResponse::Error { code, message })
        if code == ErrorCode::Internal.as_u16() && message.contains(why))
}

#[test]
fn answers_that_cannot_be_encoded_become_explicit_errors() {
    assert!(is_internal_error(
        &encode_or_refuse(&Unencodable),
        "could not be encoded"
    ));
    assert!(is_internal_error(
        &encode_response(&oversize_answer()),
        "over PEER_FRAME_BYTES_MAX"
    ));
    let fallback = PeerResponse::Error {
        code: ErrorCode::Internal.as_u16(),
        message: String::new(),
    };
    assert_eq!(decode_response(REFUSAL_FALLBACK).unwrap(), fallback);
    let too_big = PeerRequest::Query {
        from_user: 1,
        from_device: 1,
        frame: vec![0; PEER_FRAME_BYTES_MAX],
    };
    let refused = encode_request(1, too_big);
    assert!(matches!(&refused, Err(e) if e.contains("PEER_FRAME_BYTES_MAX")));
}

/// Answers `big` with an answer too large for a frame, `broken` with one that does not
/// serialise, anything else with `Done`: all through the encoder the node uses.
struct Answers;

impl PeerService for Answers {
    fn call(&self, _: NodeId, request: Bytes) -> BoxFuture<'static, Bytes> {
        async move {
            match &request[..] {
                b"big" => encode_response(&oversize_answer()),
                b"broken" => encode_or_refuse(&Unencodable),
                _ => encode_response(&PeerResponse::Done),
            }
        }
        .boxed()
    }
}

async fn peer(node_id: NodeId, service: Arc<dyn PeerService>) -> PeerNet {
    let config = PeerConfig {
        node_id,
        cluster_id: "c".into(),
        secret: Arc::new(SECRET.to_vec()),
        bind: "127.0.0.1:0".parse().unwrap(),
    };
    PeerNet::start(config, service).await.unwrap()
}

/// Used to be: an oversize answer closed the link (failing every call on it) and an answer
/// that failed to serialise went out as an empty body.
#[tokio::test]
async fn an_answer_that_cannot_be_sent_is_an_explicit_error_and_the_link_lives() {
    let server = peer(2, Arc::new(Answers)).await;
    let client = peer(1, Arc::new(Answers)).await;
    let to = server.local_addr().to_string();
    for (ask, why) in [
        ("big", "over PEER_FRAME_BYTES_MAX"),
        ("broken", "could not be encoded"),
    ] {
        let answer = client.call(2, &to, Bytes::from(ask), TIMEOUT).await;
        let answer = answer.unwrap_or_else(|e| panic!("{ask}: {e}"));
        assert!(is_internal_error(&answer, why), "{ask}: {answer:?}");
    }
    let answer = client.call(2, &to, Bytes::from("ok"), TIMEOUT).await;
    assert_eq!(decode_response(&answer.unwrap()), Ok(PeerResponse::Done));
}
