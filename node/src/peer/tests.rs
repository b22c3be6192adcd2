use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use ringpost_coordinator::{ClusterView, MemberState, NodeId};
use ringpost_wire::ErrorCode;

use super::link::{PeerNet, PeerService, PEER_FRAME_BYTES_MAX};
use super::*;
use crate::accounts::{Accounts, AccountsConfig, LogCodeSender};
use crate::handoff;
use crate::inbox::{Inbox, InboxConfig};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::ring::Ring;
use crate::server::{Server, ServerConfig};
use crate::storage::mem::MemEngine;
use crate::storage::{Cf, Engine, WriteBatch};

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
        require_contact: false,
        expires_at_ms: 0,
    });
    let bytes = encode_request(4, req.clone()).unwrap();
    let env: Envelope = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(
        (env.version, env.epoch, env.request),
        (PEER_PROTOCOL_VERSION, 4, req)
    );
    let presence = PeerRequest::PresenceChanged {
        target: 9,
        raw: crate::presence::RawPresence {
            online: true,
            last_seen_ms: 5,
            seq: 6,
        },
        policy_changed: true,
    };
    let bytes = encode_request(4, presence.clone()).unwrap();
    let env: Envelope = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(env.request, presence);
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
        &encode_or_refuse(&Unencodable, None),
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
                b"broken" => encode_or_refuse(&Unencodable, None),
                _ => encode_response(&PeerResponse::Done),
            }
        }
        .boxed()
    }
}

async fn peer(node_id: NodeId, service: Arc<dyn PeerService>) -> PeerNet {
    let config = super::link::tests::test_config(node_id, "c", SECRET);
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

const SHARDS: u16 = 64;

/// A view where `members` are in the given states.
fn view(members: &[(NodeId, MemberState)]) -> ClusterView {
    ringpost_coordinator::testing::view(3, u32::from(SHARDS), 1, members)
}

/// A node's server on an in-memory engine, at the ring of `view`.
fn server(node_id: NodeId, view: &ClusterView) -> Arc<Server> {
    let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
    let inbox = Inbox::start(
        engine.clone(),
        InboxConfig {
            shard_count: SHARDS,
            ..InboxConfig::default()
        },
    )
    .unwrap();
    let accounts = Accounts::new(
        engine.clone(),
        Arc::new(LogCodeSender::new(None)),
        AccountsConfig {
            shard_count: SHARDS,
            ..AccountsConfig::default()
        },
    );
    let keys = Keys::new(engine.clone(), SHARDS);
    let clock = crate::clock::ExpiryClock::load(engine.clone(), 1_700_000_000_000).unwrap();
    let config = ServerConfig {
        node_id,
        shard_count: SHARDS,
        ..ServerConfig::default()
    };
    let server = Server::new(
        config,
        engine,
        accounts,
        keys,
        inbox,
        Arc::new(Registry::default()),
        Arc::new(Metrics::default()),
        clock,
    );
    server.install_ring(Ring::from_view(view));
    server
}

async fn ask(net: &PeerNet, to: &str, epoch: u64, request: PeerRequest) -> PeerResponse {
    let request = encode_request(epoch, request).unwrap();
    let answer = net.call(2, to, request, TIMEOUT).await.unwrap();
    decode_response(&answer).unwrap()
}

fn forbidden(answer: &PeerResponse, from: NodeId) -> bool {
    matches!(answer, PeerResponse::Error { code, message }
        if *code == ErrorCode::Forbidden.as_u16() && message.contains(&format!("node {from} may not")))
}

/// Node 2 drains and still holds a row of a shard node 1 now owns. Node 3, an active member
/// too, may neither learn of it, nor read it, nor have it deleted; node 1 may do all three.
/// Used to be: any authenticated peer could export and release any shard the holder did not
/// own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_off_requests_are_served_only_to_the_shards_owner() {
    let view = view(&[
        (1, MemberState::Active),
        (2, MemberState::Draining),
        (3, MemberState::Active),
    ]);
    let holder = server(2, &view);
    let ring = holder.routing.ring();
    let shard = ring.shards_of(1).next().expect("node 1 owns a shard");
    let mut batch = WriteBatch::new();
    let mut key = shard.to_be_bytes().to_vec();
    key.extend_from_slice(b"user");
    batch.put(Cf::Prekeys, key, b"prekey".to_vec());
    holder.engine.write(batch, true).unwrap();
    let cutoff_ms = 1;
    let digest = handoff::shard_digest(&*holder.engine, shard, cutoff_ms).unwrap();
    let holds_row = || {
        handoff::export_chunk(&*holder.engine, shard, None, 1024)
            .unwrap()
            .rows
            .len()
            == 1
    };

    let serving = peer(2, service(&holder)).await;
    let to = serving.local_addr().to_string();
    let (owner, other) = (
        peer(1, Arc::new(Answers)).await,
        peer(3, Arc::new(Answers)).await,
    );
    let release = PeerRequest::Release {
        shard,
        digest,
        dedup_cutoff_ms: cutoff_ms,
    };
    let export = PeerRequest::Export {
        shard,
        from: None,
        max_bytes: 1024,
    };
    let holdings = PeerRequest::Holdings {
        shards: vec![shard],
    };
    for request in [holdings.clone(), export.clone(), release.clone()] {
        let answer = ask(&other, &to, view.epoch, request.clone()).await;
        assert!(forbidden(&answer, 3), "{request:?}: {answer:?}");
    }
    assert!(holds_row(), "the refused release deleted nothing");

    let answer = ask(&owner, &to, view.epoch, holdings).await;
    assert_eq!(answer, PeerResponse::Holdings(vec![shard]));
    let answer = ask(&owner, &to, view.epoch, export).await;
    assert!(
        matches!(&answer, PeerResponse::Chunk(c) if c.rows.len() == 1 && c.next.is_none()),
        "{answer:?}"
    );
    assert_eq!(
        ask(&owner, &to, view.epoch, release).await,
        PeerResponse::Done
    );
    assert!(!holds_row(), "the owner's release deleted the copy");
}

/// A `Replicate` that mixes a shard the sender is the primary of with one it no longer is
/// (records queued before it learned that its primary moved) is served for the first and
/// refused for the second only. Used to be: the whole request was refused, failing every
/// record and catch-up in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicate_is_refused_only_for_the_shards_whose_roles_do_not_hold() {
    use crate::replication::{RecordPart, ReplicaOutcome, ShardLogRecord};
    use crate::storage::{key, Op};
    let active = [(1, MemberState::Active), (2, MemberState::Active)];
    let view = ringpost_coordinator::testing::view(3, u32::from(SHARDS), 2, &active);
    let replica = server(2, &view);
    let ring = replica.routing.ring();
    let ours = ring.shards_of(1).next().expect("node 1 is a primary");
    let theirs = ring.shards_of(2).next().expect("node 2 is a primary");
    let part = |shard| {
        let record = ShardLogRecord::log(
            shard,
            1,
            view.epoch,
            0,
            vec![Op::Put {
                cf: Cf::Inbox,
                key: key(shard, &[b"k"]),
                value: vec![1],
            }],
        );
        let bytes = record.encode();
        RecordPart {
            shard,
            lsn: 1,
            total_bytes: bytes.len() as u32,
            offset: 0,
            bytes,
        }
    };
    let serving = peer(2, service(&replica)).await;
    let to = serving.local_addr().to_string();
    let primary = peer(1, Arc::new(Answers)).await;
    let mixed = PeerRequest::Replicate {
        parts: vec![part(ours), part(theirs)],
    };
    let PeerResponse::Replicated(answers) = ask(&primary, &to, view.epoch, mixed).await else {
        panic!("not served");
    };
    let outcome = |shard| {
        (answers.iter())
            .find(|a| a.shard == shard)
            .map(|a| a.outcome.clone())
    };
    assert_eq!(outcome(ours), Some(ReplicaOutcome::Applied { lsn: 1 }));
    assert!(
        matches!(outcome(theirs), Some(ReplicaOutcome::Failed { reason })
            if reason.contains("node 1 may not replicate")),
        "{answers:?}"
    );
    // Only shards it may not send: the whole request is refused, as before.
    let alone = PeerRequest::Replicate {
        parts: vec![part(theirs)],
    };
    assert!(forbidden(&ask(&primary, &to, view.epoch, alone).await, 1));
}
