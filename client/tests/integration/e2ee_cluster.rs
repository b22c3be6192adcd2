//! The SDK's end-to-end encryption (`ringpost_client::crypto::SecureClient`) against a real
//! cluster: a `ringpost-coordinator` and two `ringpost-node run` processes on loopback (the
//! binaries of this workspace, built on demand), the two parties on different nodes. 1:1 both
//! ways and a group, a device linked later, a client restarted from its store file, a wrong
//! store key, and the check that the server never holds plaintext: every byte of the nodes'
//! data directories and every frame the clients sent and received (captured by a TCP relay in
//! front of each node) searched for marker strings.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ringpost_client::crypto::machine::Machine;
use ringpost_client::crypto::{CryptoError, Plaintext, SecureClient, SecureConfig, SecureEvent};
use ringpost_client::wire::ws::{Decoder, Message, Role};
use ringpost_client::wire::{Body, GroupId};
use ringpost_client::{
    new_msg_id, Client, ClientConfig, ClientError, DeviceCiphertext, Frame, MsgId, SendStatus,
    UserId,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------------------------
// A recording TCP relay in front of a node's WebSocket listener
// ---------------------------------------------------------------------------------------------

/// The bytes of one relayed connection, each direction as it crossed the relay.
#[derive(Default)]
struct Recorded {
    up: Vec<u8>,
    down: Vec<u8>,
}

struct Relay {
    url: String,
    connections: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>>,
}

impl Relay {
    async fn start(node_ws_url: &str) -> Relay {
        let target: SocketAddr = node_ws_url
            .trim_start_matches("ws://")
            .parse()
            .expect("node ws address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let url = format!("ws://{}", listener.local_addr().expect("relay address"));
        let connections: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>> = Arc::default();
        let all = connections.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(node) = TcpStream::connect(target).await else {
                    continue;
                };
                let recorded = Arc::new(Mutex::new(Recorded::default()));
                all.lock().unwrap().push(recorded.clone());
                let (client_read, client_write) = client.into_split();
                let (node_read, node_write) = node.into_split();
                tokio::spawn(pump(client_read, node_write, recorded.clone(), true));
                tokio::spawn(pump(node_read, client_write, recorded, false));
            }
        });
        Relay { url, connections }
    }

    /// Every WebSocket payload that crossed the relay, both directions, unmasked.
    fn payloads(&self) -> Vec<Bytes> {
        let mut out = Vec::new();
        for conn in self.connections.lock().unwrap().iter() {
            let conn = conn.lock().unwrap();
            out.extend(ws_payloads(&conn.up, Role::Server));
            out.extend(ws_payloads(&conn.down, Role::Client));
        }
        out
    }

    /// Every frame that crossed the relay.
    fn frames(&self) -> Vec<Frame> {
        (self.payloads().iter())
            .filter_map(|p| Frame::decode(p).ok())
            .collect()
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    recorded: Arc<Mutex<Recorded>>,
    up: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut r = recorded.lock().unwrap();
            let side = if up { &mut r.up } else { &mut r.down };
            side.extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The binary message payloads of one direction of a WebSocket connection (after the HTTP
/// upgrade), decoded as the receiving side would (`Role::Server` unmasks what a client sent).
fn ws_payloads(bytes: &[u8], role: Role) -> Vec<Bytes> {
    let Some(head) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Vec::new();
    };
    let mut buf = BytesMut::from(&bytes[head + 4..]);
    let mut decoder = Decoder::new(role, 1 << 20);
    let mut out = Vec::new();
    while let Ok(Some(message)) = decoder.decode(&mut buf) {
        match message {
            Message::Binary(b) => out.push(b),
            Message::Close { .. } => break,
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Searching for plaintext
// ---------------------------------------------------------------------------------------------

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Files under `dir` (recursively) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                if let Ok(bytes) = std::fs::read(&path) {
                    if contains(&bytes, needle) {
                        found.push(path.display().to_string());
                    }
                }
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// A real cluster: one coordinator replica and two nodes, child processes killed on drop
// ---------------------------------------------------------------------------------------------

const SECRET: &str = "e2ee-test-secret-0123456789abcdef";

/// A binary of this workspace next to the test's target directory, built if it is missing.
fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join(name);
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "ringpost-node", "-p", "ringpost-coordinator"])
            .args(["--bin", "ringpost-node", "--bin", "ringpost-coordinator"])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the node and coordinator failed");
    }
    bin
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bin args`, returning it and its stdout lines (read on a thread, so the child never
/// blocks on a full pipe).
fn spawn(bin: &Path, args: &[String]) -> (Proc, mpsc::Receiver<String>) {
    let mut child = Command::new(bin)
        .args(args)
        .env("RINGPOST_COORD_SECRET", SECRET)
        .env("RINGPOST_COORD_LOG", "error")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    (Proc(child), rx)
}

struct Node {
    _proc: Proc,
    dir: tempfile::TempDir,
    ws: String,
}

struct Cluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    _coordinator: Proc,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, SECRET).expect("secret file");
        let s = |v: &str| v.to_string();
        let coord_dir = dir.path().join("coord");
        let (coordinator, lines) = spawn(
            &bin("ringpost-coordinator"),
            &[
                s("run"),
                s("--replica-id"),
                s("1"),
                s("--data-dir"),
                coord_dir.display().to_string(),
                s("--raft-listen"),
                s("127.0.0.1:0"),
                s("--client-listen"),
                s("127.0.0.1:0"),
                s("--admin-listen"),
                s("127.0.0.1:0"),
            ],
        );
        let coordinator_addr = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .expect("the coordinator printed its address");
            if let Some(a) = line.strip_prefix("listening client ") {
                break a.to_string();
            }
        };
        let out = Command::new(bin("ringpost-coordinator"))
            .args(["init", "--shard-count", "256"])
            .args([
                "--heartbeat-interval-ms",
                "250",
                "--heartbeat-miss-limit",
                "8",
            ])
            .args(["--coordinator", &coordinator_addr])
            .env("RINGPOST_COORD_SECRET", SECRET)
            .output()
            .expect("run coordinator init");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let codes = dir.path().join("verification-codes.txt");
        let nodes = (1..=2)
            .map(|id: u32| {
                let node_dir = tempfile::tempdir().expect("tempdir");
                let (proc, lines) = spawn(
                    &bin("ringpost-node"),
                    &[
                        s("run"),
                        s("--data-dir"),
                        node_dir.path().display().to_string(),
                        s("--node-id"),
                        id.to_string(),
                        s("--listen-ws"),
                        s("127.0.0.1:0"),
                        s("--listen-admin"),
                        s("127.0.0.1:0"),
                        s("--listen-peer"),
                        s("127.0.0.1:0"),
                        s("--shard-count"),
                        s("256"),
                        s("--coordinator"),
                        coordinator_addr.clone(),
                        s("--cluster-secret-file"),
                        secret.display().to_string(),
                        s("--codes-file"),
                        codes.display().to_string(),
                        s("--codes-per-source-per-hour"),
                        s("100000"),
                    ],
                );
                let mut ws = String::new();
                loop {
                    let line = lines
                        .recv_timeout(Duration::from_secs(60))
                        .expect("the node became ready");
                    if let Some(a) = line.strip_prefix("listening ws ") {
                        ws = a.to_string();
                    }
                    if line.starts_with("ringpost node ready") {
                        break;
                    }
                }
                Node {
                    _proc: proc,
                    dir: node_dir,
                    ws,
                }
            })
            .collect();
        Cluster {
            dir,
            nodes,
            _coordinator: coordinator,
        }
    }

    fn codes_file(&self) -> PathBuf {
        self.dir.path().join("verification-codes.txt")
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Registers the first phone from `base` on that the node behind `url` owns (a node answers a
/// `RegisterRequest` for a user it does not own with `Redirect`, and the next phone is tried),
/// so the client is never redirected past a relay.
async fn register_on(cluster: &Cluster, url: &str, base: UserId) -> (Client, UserId) {
    for phone in base..base + 64 {
        let client = Client::connect(config(url)).await.expect("connect");
        let mark = ringpost_client::dev::codes_mark(cluster.codes_file());
        match client.register_request(phone).await {
            Ok(_) => {}
            Err(ClientError::Redirected(_)) => {
                client.close().await;
                continue;
            }
            Err(e) => panic!("register {phone}: {e}"),
        }
        let code = ringpost_client::dev::read_code_after(
            cluster.codes_file(),
            phone,
            mark,
            Duration::from_secs(10),
        )
        .await
        .expect("verification code");
        client
            .register_verify(phone, &code, "", "e2ee test")
            .await
            .expect("verify");
        return (client, phone);
    }
    panic!("none of 64 phones from {base} is owned by {url}");
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

fn config(url: &str) -> ClientConfig {
    ClientConfig {
        auto_ack: false,
        request_timeout: Duration::from_secs(20),
        ..ClientConfig::new(url)
    }
}

fn secure_config(dir: &Path, name: &str, key: u8) -> SecureConfig {
    SecureConfig {
        // Group sends refresh members' device lists every time (a linked device is seen).
        device_list_max_age: Duration::ZERO,
        ..SecureConfig::new(dir.join(format!("{name}.e2ee")), [key; 32])
    }
}

/// The next decrypted 1:1 (`group: false`) or group message, skipping other events; panics
/// on an undecryptable one or after `WAIT`.
async fn next_message(s: &SecureClient, group: bool) -> Plaintext {
    tokio::time::timeout(WAIT, async {
        loop {
            match s.next_event().await.expect("client closed") {
                SecureEvent::Message(p) if !group => return p,
                SecureEvent::GroupMessage(p) if group => return p,
                SecureEvent::Undecryptable { reason, .. } => panic!("undecryptable: {reason}"),
                SecureEvent::Message(p) | SecureEvent::GroupMessage(p) => {
                    panic!("unexpected message {:?}", p.body)
                }
                SecureEvent::Other(_) => {}
            }
        }
    })
    .await
    .expect("a message in time")
}

async fn send_ok(s: &SecureClient, to: UserId, text: &str) -> MsgId {
    let id = new_msg_id();
    let ack = s
        .send(to, id, Bytes::copy_from_slice(text.as_bytes()))
        .await
        .expect("send");
    assert_eq!(ack.status, SendStatus::Ok, "{ack:?}");
    id
}

async fn group_send_ok(s: &SecureClient, group: GroupId, text: &str) -> MsgId {
    let id = new_msg_id();
    let ack = s
        .group_send(group, id, Bytes::copy_from_slice(text.as_bytes()))
        .await
        .expect("group send");
    assert_eq!(ack.status, SendStatus::Ok, "{ack:?}");
    id
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn encrypted_one_to_one_and_group_across_two_nodes_and_no_plaintext_on_the_server() {
    let cluster = Cluster::start();
    let stores = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let relay1 = Relay::start(&cluster.nodes[0].ws).await;
        let relay2 = Relay::start(&cluster.nodes[1].ws).await;
        let (alice, alice_id) = register_on(&cluster, &relay1.url, 15_551_000_000).await;
        let (bob, bob_id) = register_on(&cluster, &relay2.url, 15_551_100_000).await;
        let alice = SecureClient::open(alice, secure_config(stores.path(), "alice", 1))
            .await
            .expect("open alice");
        let bob = SecureClient::open(bob, secure_config(stores.path(), "bob", 2))
            .await
            .expect("open bob");

        // 1:1 both ways (the first message of each side starts a session from a claimed bundle).
        let markers = [
            "MARKER-e2ee-hello-7f3a91",
            "MARKER-e2ee-reply-c04d2e",
            "MARKER-e2ee-again-5b8e17",
            "MARKER-e2ee-group-a-91c2f0",
            "MARKER-e2ee-group-b-3e6d48",
        ];
        let id = send_ok(&alice, bob_id, markers[0]).await;
        let got = next_message(&bob, false).await;
        assert_eq!(got.body, markers[0].as_bytes());
        assert_eq!(
            (got.from_user, got.from_device, got.msg_id),
            (alice_id, 1, id)
        );
        send_ok(&bob, alice_id, markers[1]).await;
        assert_eq!(
            next_message(&alice, false).await.body,
            markers[1].as_bytes()
        );
        send_ok(&alice, bob_id, markers[2]).await;
        assert_eq!(next_message(&bob, false).await.body, markers[2].as_bytes());

        // A group: one Megolm ciphertext each way, keys shared pairwise first.
        let info = alice
            .client()
            .group_create(vec![bob_id], Bytes::new())
            .await
            .expect("group create");
        group_send_ok(&alice, info.group, markers[3]).await;
        let got = next_message(&bob, true).await;
        assert_eq!(got.body, markers[3].as_bytes());
        assert_eq!(got.group, Some(info.group));
        assert_eq!((got.from_user, got.from_device), (alice_id, 1));
        group_send_ok(&bob, info.group, markers[4]).await;
        assert_eq!(next_message(&alice, true).await.body, markers[4].as_bytes());

        // The positive control: a message sent without encryption is found by the same search,
        // in the frames and on disk (so the search sees stored bodies). Bob's SDK reports it as
        // undecryptable.
        let control = "CONTROL-plain-body-e61b07";
        let (carol, carol_id) = register_on(&cluster, &relay1.url, 15_551_200_000).await;
        let ack = carol
            .send(
                bob_id,
                new_msg_id(),
                vec![DeviceCiphertext {
                    user: bob_id,
                    device: 1,
                    body: Bytes::from_static(control.as_bytes()),
                }],
            )
            .await
            .expect("plain send");
        assert_eq!(ack.status, SendStatus::Ok);
        let undecryptable = tokio::time::timeout(WAIT, async {
            loop {
                if let SecureEvent::Undecryptable { from_user, .. } =
                    bob.next_event().await.unwrap()
                {
                    return from_user;
                }
            }
        })
        .await
        .expect("the plain message arrives");
        assert_eq!(undecryptable, carol_id);

        // The captured frames: real traffic, the Sends and Delivers are in it, no marker is.
        let frames: Vec<Frame> = relay1.frames().into_iter().chain(relay2.frames()).collect();
        let sends = frames
            .iter()
            .filter(|f| matches!(f.body, Body::Send(_)))
            .count();
        let group_sends = (frames.iter())
            .filter(|f| matches!(f.body, Body::GroupSend(_)))
            .count();
        let delivers = (frames.iter())
            .filter(|f| matches!(f.body, Body::Deliver(_)))
            .count();
        assert!(
            sends >= 5 && group_sends >= 2 && delivers >= 6,
            "{sends} {group_sends} {delivers}"
        );
        let payloads: Vec<Bytes> = relay1
            .payloads()
            .into_iter()
            .chain(relay2.payloads())
            .collect();
        for marker in markers {
            assert!(
                !payloads.iter().any(|p| contains(p, marker.as_bytes())),
                "{marker} crossed the wire in plaintext"
            );
        }
        assert!(
            payloads.iter().any(|p| contains(p, control.as_bytes())),
            "the frame search finds a plaintext body"
        );

        // Every byte the cluster wrote: node data directories (RocksDB files, WAL included) and
        // the coordinator's.
        let mut dirs: Vec<&Path> = cluster.nodes.iter().map(|n| n.dir.path()).collect();
        dirs.push(cluster.dir.path());
        for marker in markers {
            for dir in &dirs {
                let found = files_containing(dir, marker.as_bytes());
                assert!(
                    found.is_empty(),
                    "{marker} stored in plaintext in {found:?}"
                );
            }
        }
        let control_files: Vec<String> = (dirs.iter())
            .flat_map(|d| files_containing(d, control.as_bytes()))
            .collect();
        assert!(
            !control_files.is_empty(),
            "the disk search finds a plaintext body the node stored"
        );
        let canary = cluster.nodes[0].dir.path().join("canary-file");
        std::fs::write(&canary, format!("xx{}yy", markers[0])).unwrap();
        assert_eq!(
            files_containing(cluster.nodes[0].dir.path(), markers[0].as_bytes()),
            vec![canary.display().to_string()]
        );
        std::fs::remove_file(&canary).unwrap();
        // The SDK's own store is encrypted at rest too.
        assert!(files_containing(stores.path(), markers[0].as_bytes()).is_empty());
        assert!(files_containing(stores.path(), b"\"account\"").is_empty());

        alice.close().await;
        bob.close().await;
        carol.close().await;
    });
}

#[test]
fn a_device_linked_later_reads_new_messages_and_not_old_ones() {
    let cluster = Cluster::start();
    let stores = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let relay2 = Relay::start(&cluster.nodes[1].ws).await;
        let (alice, alice_id) = register_on(&cluster, &cluster.nodes[0].ws, 15_552_000_000).await;
        let (bob1, bob_id) = register_on(&cluster, &relay2.url, 15_552_100_000).await;
        let alice = SecureClient::open(alice, secure_config(stores.path(), "alice", 1))
            .await
            .unwrap();
        let bob1 = SecureClient::open(bob1, secure_config(stores.path(), "bob1", 2))
            .await
            .unwrap();

        let old_id = send_ok(&alice, bob_id, "old 1:1").await;
        assert_eq!(next_message(&bob1, false).await.body, "old 1:1".as_bytes());
        let group = alice
            .client()
            .group_create(vec![bob_id], Bytes::new())
            .await
            .unwrap()
            .group;
        let old_group_id = group_send_ok(&alice, group, "old group").await;
        assert_eq!(next_message(&bob1, true).await.body, "old group".as_bytes());

        // Bob links a second device; it publishes its keys as it opens.
        let (bob2, registered) =
            ringpost_client::dev::link_device(config(&cluster.nodes[1].ws), bob1.client())
                .await
                .expect("link");
        assert_eq!(registered.device, 2);
        let bob2_config = secure_config(stores.path(), "bob2", 3);
        let bob2 = SecureClient::open(bob2, bob2_config.clone()).await.unwrap();

        // Alice's next 1:1 message learns of the device from MismatchedDevices; her next group
        // message shares the group key with it first.
        let new_id = send_ok(&alice, bob_id, "new 1:1").await;
        group_send_ok(&alice, group, "new group").await;
        let first = next_message(&bob2, false).await;
        assert_eq!(
            (first.msg_id, first.body.as_ref()),
            (new_id, "new 1:1".as_bytes()),
            "the first message the new device sees is the new one"
        );
        assert_eq!(next_message(&bob2, true).await.body, "new group".as_bytes());
        assert_eq!(next_message(&bob1, false).await.body, "new 1:1".as_bytes());
        assert_eq!(next_message(&bob1, true).await.body, "new group".as_bytes());

        // The old messages' ciphertexts (as bob1 received them) do not open with bob2's keys:
        // the 1:1 one was for bob1's keys only, and the group key bob2 got starts after it.
        let frames = relay2.frames();
        let body_of = |id: MsgId| {
            (frames.iter())
                .find_map(|f| match &f.body {
                    Body::Deliver(d) if d.msg_id == id => Some(d.body.clone()),
                    _ => None,
                })
                .expect("bob1 received it through the relay")
        };
        bob2.close().await;
        let store =
            ringpost_client::crypto::Store::new(&bob2_config.store_path, &bob2_config.store_key);
        let mut machine = Machine::from_bytes(&store.load().unwrap().unwrap()).unwrap();
        assert!(machine.decrypt(alice_id, 1, &body_of(old_id)).is_err());
        let reason = machine
            .group_decrypt(group, alice_id, 1, &body_of(old_group_id))
            .expect_err("bob2 reads the old group message");
        assert!(reason.to_lowercase().contains("index"), "{reason}");

        alice.close().await;
        bob1.close().await;
    });
}

#[test]
fn a_restarted_client_decrypts_what_was_queued_while_it_was_down() {
    let cluster = Cluster::start();
    let stores = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let bob_url = cluster.nodes[1].ws.clone();
        let (alice, alice_id) = register_on(&cluster, &cluster.nodes[0].ws, 15_553_000_000).await;
        let (carol, carol_id) = register_on(&cluster, &cluster.nodes[0].ws, 15_553_100_000).await;
        let (bob, bob_id) = register_on(&cluster, &bob_url, 15_553_200_000).await;
        let bob_auth = bob.auth().expect("bob is a device");
        let alice = SecureClient::open(alice, secure_config(stores.path(), "alice", 1))
            .await
            .unwrap();
        let carol = SecureClient::open(carol, secure_config(stores.path(), "carol", 4))
            .await
            .unwrap();
        let bob_config = secure_config(stores.path(), "bob", 2);
        let bob = SecureClient::open(bob, bob_config.clone()).await.unwrap();

        send_ok(&alice, bob_id, "while up").await;
        assert_eq!(next_message(&bob, false).await.body, "while up".as_bytes());
        send_ok(&bob, alice_id, "ack").await;
        assert_eq!(next_message(&alice, false).await.body, "ack".as_bytes());
        bob.close().await;
        drop(bob);

        // While bob is down: alice on the established session, carol starting a new one from
        // a claimed one-time key.
        send_ok(&alice, bob_id, "queued 1").await;
        send_ok(&carol, bob_id, "queued from carol").await;
        send_ok(&alice, bob_id, "queued 2").await;

        // auto_ack would acknowledge before the state is saved: refused.
        let acking = Client::connect(ClientConfig {
            auto_ack: true,
            ..config(&bob_url).with_auth(bob_auth.clone())
        })
        .await
        .unwrap();
        assert!(matches!(
            SecureClient::open(acking.clone(), bob_config.clone()).await,
            Err(CryptoError::AutoAck)
        ));
        acking.close().await;
        drop(acking);

        // A wrong store key is a clear error, and changes nothing.
        let before = std::fs::read(&bob_config.store_path).unwrap();
        let client = Client::connect(config(&bob_url).with_auth(bob_auth.clone()))
            .await
            .unwrap();
        let wrong = SecureConfig {
            store_key: [9; 32],
            ..bob_config.clone()
        };
        match SecureClient::open(client.clone(), wrong).await {
            Err(e @ CryptoError::StoreKey { .. }) => {
                assert!(e.to_string().contains("store key does not decrypt"), "{e}")
            }
            other => panic!("opened with a wrong key: {other:?}"),
        }
        assert_eq!(std::fs::read(&bob_config.store_path).unwrap(), before);

        let bob = SecureClient::open(client, bob_config)
            .await
            .expect("reopen");
        let mut got = Vec::new();
        for _ in 0..3 {
            let m = next_message(&bob, false).await;
            got.push((m.from_user, String::from_utf8(m.body.to_vec()).unwrap()));
        }
        got.sort();
        let mut want = vec![
            (alice_id, "queued 1".to_string()),
            (alice_id, "queued 2".to_string()),
            (carol_id, "queued from carol".to_string()),
        ];
        want.sort();
        assert_eq!(got, want);
        // And the restored sessions still work both ways.
        send_ok(&bob, carol_id, "back").await;
        assert_eq!(next_message(&carol, false).await.body, "back".as_bytes());
        send_ok(&bob, alice_id, "back").await;
        assert_eq!(next_message(&alice, false).await.body, "back".as_bytes());

        alice.close().await;
        bob.close().await;
        carol.close().await;
    });
}
