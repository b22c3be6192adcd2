//! A server that replicates writes a `delivered` receipt in the acking user's shard only: a
//! replicated batch is atomic per shard, not across shards.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ringpost_coordinator::MemberState;
use ringpost_wire::{CodeChannel, UserId};

use super::*;
use crate::accounts::{Accounts, AccountsConfig, CodeSender, SendFuture};
use crate::clock::ExpiryClock;
use crate::inbox::{
    Append, AppendOutcome, Entry, EntryKind, Inbox, InboxConfig, OutboxReceipt, OUTBOX_DEVICE,
};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::replication::ReplicatingEngine;
use crate::ring::Ring;
use crate::server::{Server, ServerConfig};
use crate::session::Answer;
use crate::shard::shard_of;

const SHARD_COUNT: u16 = 8;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[derive(Default)]
struct Codes(Mutex<Vec<String>>);

impl CodeSender for Codes {
    fn send<'a>(&'a self, _phone: UserId, code: &'a str, _channel: CodeChannel) -> SendFuture<'a> {
        self.0.lock().unwrap().push(code.to_owned());
        Box::pin(async { Ok(()) })
    }
}

/// Applies to its replica the records of every shard but `failing`; a call that carries a
/// record of `failing` fails after applying the others, as a primary's sink does when one of
/// the batch's replicas is lost and the others answer.
struct OneShardFails {
    replica: Arc<dyn Engine>,
    failing: Mutex<Option<ShardId>>,
}

impl ShardLogSink for OneShardFails {
    fn ship(&self, records: Vec<ShardLogRecord>, _sync: bool) -> Result<(), ShipError> {
        let failing = *self.failing.lock().unwrap();
        let (lost, applied): (Vec<_>, Vec<_>) =
            records.into_iter().partition(|r| Some(r.shard) == failing);
        apply(&*self.replica, &applied).map_err(|e| ShipError(e.to_string()))?;
        match lost.is_empty() {
            true => Ok(()),
            false => Err(ShipError("the shard's replica is unreachable".into())),
        }
    }
}

async fn register(accounts: &Accounts, codes: &Codes, phone: UserId, devices: u32, t: u64) {
    accounts
        .request_code(phone, CodeChannel::Sms, t)
        .await
        .unwrap();
    let code = codes.0.lock().unwrap().last().unwrap().clone();
    accounts.verify(phone, &code, "", "phone", t).unwrap();
    for _ in 1..devices {
        let link = accounts.issue_link_code(phone, 1, t).unwrap();
        accounts.link(phone, &link.code, "laptop", t).unwrap();
    }
}

/// Used to be: a sender served by the same node got its receipt written straight into its
/// own shard, in the ack's batch. When that shard's replica was lost and the acking user's
/// answered, the ack failed but the replica of the acking user's shard kept the ack and its
/// "receipt sent" mark, and the receipt existed nowhere a failover could find it (chaos
/// `cluster-storage-replicated --seed 4` lost delivered receipts this way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_writes_its_receipt_in_the_acking_users_shard_only() {
    let (primary, _p) = rocks();
    let (replica, _r) = rocks();
    let sink = Arc::new(OneShardFails {
        replica: replica.clone(),
        failing: Mutex::new(None),
    });
    let engine = Arc::new(ReplicatingEngine::new(primary, sink.clone(), 1));
    let as_engine: Arc<dyn Engine> = engine.clone();
    let codes = Arc::new(Codes::default());
    let config = InboxConfig {
        shard_count: SHARD_COUNT,
        ..InboxConfig::default()
    };
    let inbox = Inbox::start(as_engine.clone(), config.clone()).unwrap();
    let accounts = Accounts::new(
        as_engine.clone(),
        codes.clone(),
        AccountsConfig {
            shard_count: SHARD_COUNT,
            ..AccountsConfig::default()
        },
    );
    let keys = Keys::new(as_engine.clone(), SHARD_COUNT);
    let t = now();
    let clock = ExpiryClock::load(as_engine.clone(), t).unwrap();
    let server = Server::new(
        ServerConfig {
            node_id: 1,
            shard_count: SHARD_COUNT,
            ..ServerConfig::default()
        },
        as_engine,
        accounts,
        keys,
        inbox,
        Arc::new(Registry::default()),
        Arc::new(Metrics::default()),
        clock,
    );
    let view = ringpost_coordinator::testing::view(
        1,
        u32::from(SHARD_COUNT),
        1,
        &[(1, MemberState::Active)],
    );
    let gained = server.install_ring(Ring::from_view(&view));
    server.set_shards_ready(&gained);
    server.set_replicating(engine);

    // The acking user has two devices (so the receipt needs the "sent" mark); its sender
    // lives in another shard of the same node.
    let acker: UserId = 15_550_000_001;
    let sender: UserId = (15_550_000_002u64..)
        .find(|&p| shard_of(p, SHARD_COUNT) != shard_of(acker, SHARD_COUNT))
        .unwrap();
    register(&server.accounts, &codes, acker, 2, t).await;
    register(&server.accounts, &codes, sender, 1, t).await;
    let id = [7; 16];
    let message = Entry::message(sender, 1, id, Bytes::from_static(b"ciphertext"));
    let stored = server
        .inbox
        .append(Append {
            to_user: acker,
            dedup: Some((sender, 1, id)),
            entries: vec![(1, message.clone()), (2, message)],
            now_ms: t,
        })
        .await
        .unwrap();
    assert!(matches!(stored, AppendOutcome::Stored { .. }), "{stored:?}");
    let pending = server.inbox.read(acker, 1, 0, 10, t).unwrap();
    assert_eq!(pending.len(), 1);
    let (seq, entry) = &pending[0];

    *sink.failing.lock().unwrap() = Some(shard_of(sender, SHARD_COUNT));
    let answer = server
        .ack(acker, 1, vec![(*seq, Some(entry.header()))])
        .await;
    // What a failover to the replica finds: the ack, and so its receipt.
    let copy = Inbox::start(replica, config).unwrap();
    let acked = copy.read(acker, 1, 0, 10, t).unwrap().is_empty();
    let in_outbox = copy
        .read(acker, OUTBOX_DEVICE, 0, 10, t)
        .unwrap()
        .iter()
        .filter_map(|(_, e)| OutboxReceipt::from_entry(e))
        .any(|r| r.to_user == sender && r.msg_ids.contains(&id));
    let at_sender = copy
        .read(sender, 1, 0, 10, t)
        .unwrap()
        .iter()
        .any(|(_, e)| e.kind == EntryKind::Delivered && e.receipt_msg_ids.contains(&id));
    assert!(
        !acked || in_outbox || at_sender,
        "the replica that has the ack has its receipt"
    );
    assert!(
        matches!(&answer, Answer::Frames(f) if f.is_empty()),
        "the ack touches no shard but the acking user's: {answer:?}"
    );
    assert!(acked, "the replica has the ack");
}
