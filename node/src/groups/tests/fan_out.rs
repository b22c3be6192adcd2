//! The fan-out across real nodes: three servers on real RocksDB, linked by real peer links
//! (QUIC on loopback). Node 1 owns the group; members live on all three.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ringpost_coordinator::{ClusterView, MemberState, NodeId};
use ringpost_wire::CodeChannel;

use super::*;
use crate::accounts::{Accounts, AccountsConfig, CodeSender, SendFuture};
use crate::clock::ExpiryClock;
use crate::inbox::{Inbox, InboxConfig};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::peer::link::{tests::test_config, PeerNet};
use crate::registry::Registry;
use crate::ring::Ring;
use crate::server::{Server, ServerConfig};
use crate::storage::suite::rocks_fixture;

const SHARDS: u16 = 16;
/// How long a condition the fan-out should reach may take (generous: a dial to the missing
/// node waits for its handshake timeout before it fails).
const WAIT: Duration = Duration::from_secs(60);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[derive(Default)]
struct Codes(Mutex<Vec<String>>);

impl CodeSender for Codes {
    fn send<'a>(&'a self, _: UserId, code: &'a str, _: CodeChannel) -> SendFuture<'a> {
        self.0.lock().unwrap().push(code.to_owned());
        Box::pin(async { Ok(()) })
    }
}

/// Nodes 1 to 3, active, each advertising its peer address.
fn view(addrs: &[SocketAddr; 3]) -> ClusterView {
    let members: Vec<(NodeId, MemberState)> = (1..=3).map(|n| (n, MemberState::Active)).collect();
    let mut view = ringpost_coordinator::testing::view(1, u32::from(SHARDS), 1, &members);
    for m in &mut view.members {
        m.info.peer_addr = Some(addrs[m.info.node_id as usize - 1].to_string());
    }
    view
}

struct Node {
    server: Arc<Server>,
    codes: Arc<Codes>,
    _dir: Option<tempfile::TempDir>,
}

fn node(node_id: NodeId, view: &ClusterView) -> Node {
    let (engine, dir) = rocks_fixture();
    let codes = Arc::new(Codes::default());
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
        codes.clone(),
        AccountsConfig {
            shard_count: SHARDS,
            ..AccountsConfig::default()
        },
    );
    let keys = Keys::new(engine.clone(), SHARDS);
    let clock = ExpiryClock::load(engine.clone(), now()).unwrap();
    let server = Server::new(
        ServerConfig {
            node_id,
            shard_count: SHARDS,
            ..ServerConfig::default()
        },
        engine,
        accounts,
        keys,
        inbox,
        Arc::new(Registry::default()),
        Arc::new(Metrics::default()),
        clock,
    );
    let gained = server.install_ring(Ring::from_view(view));
    server.set_shards_ready(&gained);
    Node {
        server,
        codes,
        _dir: dir,
    }
}

impl Node {
    /// Starts this node's peer link on `bind`.
    async fn link(&self, bind: SocketAddr) {
        let mut config = test_config(self.server.config.node_id, "c", SECRET);
        config.bind = bind;
        let net = PeerNet::start(config, crate::peer::service(&self.server))
            .await
            .unwrap();
        assert!(self.server.peers.set(net).is_ok());
    }

    /// Registers `user` (owned here) with one device.
    async fn register(&self, user: UserId) {
        let t = now();
        let accounts = &self.server.accounts;
        accounts
            .request_code(user, CodeChannel::Sms, t)
            .await
            .unwrap();
        let code = self.codes.0.lock().unwrap().last().unwrap().clone();
        accounts.verify(user, &code, "", "phone", t).unwrap();
    }

    /// The group seqs in `user`'s device 1 inbox, in inbox order.
    fn group_seqs(&self, user: UserId) -> Vec<u64> {
        (self.server.inbox.read(user, 1, 0, 1000, now()).unwrap())
            .into_iter()
            .filter_map(|(_, e)| fanout::split_entry_body(&e.body).map(|(_, seq, _)| seq))
            .collect()
    }
}

const SECRET: &[u8] = b"test cluster secret, 32 bytes!!!";

/// A UDP address nothing answers on until it is released (then a node binds it).
fn reserve() -> (UdpSocket, SocketAddr) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Node 2 is down (its peer address answers nothing) while the group gets eight records. The
/// members on nodes 1 and 3 get all eight meanwhile; node 2's member stays pending in the log.
/// When node 2 comes up it gets all eight, in seq order, once each. Used to be: the fan-out
/// went on to a record only once every member's owner had answered for the one before, so
/// nobody got more than the first record while node 2 was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_on_an_unreachable_node_does_not_delay_the_others() {
    let (socket1, a1) = reserve();
    let (socket2, a2) = reserve();
    let (socket3, a3) = reserve();
    let view = view(&[a1, a2, a3]);
    let nodes: Vec<Node> = (1..=3).map(|n| node(n, &view)).collect();
    let ring = nodes[0].server.routing.ring();
    let on = |n: NodeId, from: UserId| -> UserId {
        (from..).find(|&u| ring.owner_of(u) == Some(n)).unwrap()
    };
    // The sender and another member on node 1 (the group's owner), one on each other node.
    let sender = on(1, 15_551_000_000);
    let local = on(1, sender + 1);
    let (dead, remote) = (on(2, 15_551_000_000), on(3, 15_551_000_000));
    let group: GroupId = (0u8..)
        .map(|b| [b; 16])
        .find(|g| ring.owner_of(route_id(g)) == Some(1))
        .unwrap();
    for (i, u) in [(0, sender), (0, local), (1, dead), (2, remote)] {
        nodes[i].register(u).await;
    }
    drop((socket1, socket3));
    nodes[0].link(a1).await;
    nodes[2].link(a3).await;

    let owner = &nodes[0].server;
    let t = now();
    owner
        .groups
        .create(group, sender, &[local, dead, remote], b"", t)
        .unwrap();
    fanout::kick(owner, group);
    for n in 0..4u8 {
        owner
            .groups
            .send(sender, 1, &group, [n; 16], b"ciphertext", t)
            .unwrap();
        fanout::kick(owner, group);
    }
    let all: Vec<u64> = (1..=5).collect();
    wait_until("the members on nodes 1 and 3 got all five records", || {
        nodes[0].group_seqs(local) == all && nodes[2].group_seqs(remote) == all
    })
    .await;
    // More records while node 2's member is held (the task waits for its retry or a kick).
    for n in 4..7u8 {
        owner
            .groups
            .send(sender, 1, &group, [n; 16], b"ciphertext", t)
            .unwrap();
        fanout::kick(owner, group);
    }
    let all: Vec<u64> = (1..=8).collect();
    wait_until("the members on nodes 1 and 3 got all eight records", || {
        nodes[0].group_seqs(local) == all && nodes[2].group_seqs(remote) == all
    })
    .await;
    // Node 2's member is still pending in every record, and has nothing. A record's pending
    // list is rewritten once its round's stores answered, after the members' inboxes have it:
    // wait for that write too.
    wait_until("every record pending for node 2's member only", || {
        let log = owner.groups.pending_records(&group, None, 100).unwrap();
        log.len() == 8 && log.iter().all(|(_, r)| r.pending == vec![dead])
    })
    .await;
    assert!(nodes[1].group_seqs(dead).is_empty());

    // Node 2 comes up at its address: the retry stores everything for its member, in order.
    drop(socket2);
    nodes[1].link(a2).await;
    wait_until("the log is done", || {
        owner
            .groups
            .pending_records(&group, None, 1)
            .unwrap()
            .is_empty()
    })
    .await;
    assert_eq!(nodes[1].group_seqs(dead), all, "in seq order, once each");
    assert_eq!(nodes[0].group_seqs(local), all);
    assert_eq!(nodes[2].group_seqs(remote), all);
}
