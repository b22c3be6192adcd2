//! The node-to-node link, ALPN `ringpost-peer/2`: nodes of a cluster forward requests to each
//! other over QUIC, one link (connection) per peer in each direction.
//!
//! # Authentication by channel binding
//! Nodes have no PKI between them. Each [`PeerNet`] serves a fresh self-signed certificate, and
//! the dialer accepts any certificate (`AnyServerCert` still checks the handshake signature,
//! so the server holds the key of the certificate it showed). Authentication rides on the TLS
//! session instead: after the QUIC handshake the dialer opens one bidirectional stream (used for
//! the whole link) and both sides export 32 bytes of keying material (`ekm`, label
//! `ringpost-peer/2 auth`) unique to this TLS session. Each side signs the transcript
//! `t = "ringpost-peer/2" | role | node_id | cluster_id len u8 | cluster_id | ekm` (role `c` for
//! the dialer, `s` for the server) twice: `HMAC-SHA256(cluster secret, t)`, which shows it is
//! of this cluster, and an Ed25519 signature of `t` with its own node key
//! ([`crate::node_key`]), which shows it is the node `node_id` names:
//!
//! ```text
//! dialer → server   node_id u64 | cluster_id len u8 | cluster_id | mac [32] | signature [64]
//! server → dialer   node_id u64 | mac [32] | signature [64]   (only after the dialer verified)
//! ```
//!
//! Each side checks the other's signature against the key the coordinator's membership binds
//! that node id to ([`PeerDirectory`]; the coordinator binds an id to the first key it joined
//! with and refuses another until the member is removed). So holding the cluster secret is not
//! enough to act as another node: a peer request is from the node it says it is, and is
//! authorised by what the receiver's ring says about that node (e.g. only a shard's owner may
//! pull it, see [`super::handoff_role`]). A node the receiver's view does not know yet (it
//! joined a moment ago) is waited for up to [`PEER_KEY_WAIT_MS`].
//!
//! An attacker in the middle runs two TLS sessions with two different `ekm`s, so a proof it
//! relays fails; the role byte stops a proof being reflected back. The server answers only a
//! verified dialer, the dialer sends no request before it has verified the server's proof and
//! node id, and the service never sees an unauthenticated peer. The MAC is checked first and is
//! cheap, so a dial without the secret costs no signature check and no wait for a key. Whoever
//! answers a dial does see the dialer's MAC (bound to its own session) and could try to guess
//! the secret offline: hence a random secret of at least [`PEER_SECRET_BYTES_MIN`] bytes.
//!
//! # Unauthenticated dials
//! A node serves at most [`PEER_LINKS_SERVED_MAX`] links. A dial that has not proved itself
//! holds one of those slots for at most [`PEER_ACCEPT_HANDSHAKE_MS`] from its first packet
//! (QUIC handshake and proof exchange together), one source address may have at most
//! [`PEER_HANDSHAKES_PER_SOURCE_MAX`] such dials at once (more are refused at once), and a
//! failed proof frees its slot at once.
//!
//! # Framing and ordering
//! Then the stream carries `u32 BE length | u64 BE id | body` both ways (the length covers id
//! and body). Requests are written in the order their [`PeerNet::call`] futures were first
//! polled; the server starts them in that order ([`PeerService::call`]) and answers as they
//! complete, matched by id. A link that breaks fails its pending calls with
//! [`PeerError::Closed`]; the next call dials again.

mod handshakes;

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt};
use futures::stream::{FuturesUnordered, StreamExt};
use hmac::{Hmac, Mac};
use quinn::VarInt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::node_key::{self, NodeKey, PUBLIC_KEY_BYTES, SIGNATURE_BYTES};
use handshakes::{Handshake, HandshakesBySource};

/// ALPN of the node-to-node protocol; the only one a peer endpoint speaks.
pub const PEER_ALPN: &[u8] = b"ringpost-peer/2";

/// Largest request or response body (bytes): a receiver buffers a whole frame before handing
/// it on, so this bounds the memory one frame can make a node hold; larger payloads (shard
/// hand-off) must be split by the caller.
pub const PEER_FRAME_BYTES_MAX: usize = 4 << 20;

/// Requests one link keeps in flight (caller side waits for a slot = backpressure); the serving
/// side stops reading when this many are executing or waiting to be written. Worst case per
/// link and side: this many bodies of up to [`PEER_FRAME_BYTES_MAX`].
pub const PEER_IN_FLIGHT_MAX: usize = 4096;

/// Shortest cluster secret (bytes): any node answering a dial sees a proof it could use to
/// guess the secret offline, so the secret must be random and this long at least.
pub const PEER_SECRET_BYTES_MIN: usize = 16;

/// Longest cluster id (bytes); its length travels as one byte in the hello.
pub const PEER_CLUSTER_ID_BYTES_MAX: usize = 255;

/// Time a dialer gives the QUIC handshake and the proof exchange before it fails its calls.
pub const PEER_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// Time the serving side gives a dial, from its first packet, to finish the QUIC handshake and
/// prove itself; an unauthenticated connection holds a served-link slot at most this long. A
/// handshake takes two round trips on a quiet network; this leaves room for one lost packet
/// early on (retransmitted after about 1 s, before the first round trip has been measured).
pub const PEER_ACCEPT_HANDSHAKE_MS: u64 = 2_000;

/// Unauthenticated handshakes one source address may have running at once; more are refused
/// at once. So one source holds at most this many served-link slots while it proves nothing.
/// A node dials each peer once (again after a link breaks), so even every node of a cluster
/// behind one relay or NAT address stays well under it when dials come in together.
pub const PEER_HANDSHAKES_PER_SOURCE_MAX: usize = 8;

/// Longest a handshake waits for this node's view of the membership to show the other node's
/// key (a node that joined a moment ago is not in every view yet).
pub const PEER_KEY_WAIT_MS: u64 = 1_000;

/// Default keep-alive interval: a link is never idle long enough for its idle timeout to fire
/// while the peer is alive. Costs one small packet per second per link each way (and its ACK);
/// see [`PeerLiveness`].
pub const PEER_KEEP_ALIVE_MS: u64 = 1_000;

/// Default idle timeout: a peer silent this long (five missed keep-alives) is dead, and its
/// link fails its pending calls.
pub const PEER_IDLE_TIMEOUT_MS: u32 = 5_000;

/// Longest idle timeout a node may be configured with (QUIC's limit is far above it; past a
/// minute, calls to a dead peer wait too long for anyone).
pub const PEER_IDLE_TIMEOUT_MS_MAX: u32 = 60_000;

/// How a link notices a dead peer: a keep-alive every `keep_alive` when nothing else was sent,
/// and the link fails (with its pending calls) after `idle_timeout` without a packet. QUIC takes
/// the smaller of the two ends' idle timeouts.
///
/// Every node links to every node it shares a shard with, which on a ring with many virtual
/// nodes is every other node: the keep-alives cost each node about four packets per second per
/// peer at the defaults. That is nothing on a host per node, but 72 nodes sharing two cores
/// spent 1.3 cores on it at rest (`ringpost-bench million`), which runs them slower.
/// Built by [`PeerLiveness::new`] (which checks the bounds) or `Default`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerLiveness {
    keep_alive: Duration,
    idle_timeout: Duration,
}

impl Default for PeerLiveness {
    fn default() -> Self {
        PeerLiveness {
            keep_alive: Duration::from_millis(PEER_KEEP_ALIVE_MS),
            idle_timeout: Duration::from_millis(PEER_IDLE_TIMEOUT_MS.into()),
        }
    }
}

impl PeerLiveness {
    /// Checks the bounds: an idle timeout of 1 s to [`PEER_IDLE_TIMEOUT_MS_MAX`], and at least
    /// two keep-alives within it, so one lost keep-alive never fails a live link.
    pub fn new(keep_alive: Duration, idle_timeout: Duration) -> Result<Self, String> {
        let max = Duration::from_millis(PEER_IDLE_TIMEOUT_MS_MAX.into());
        if idle_timeout < Duration::from_secs(1) || idle_timeout > max {
            return Err(format!(
                "the peer idle timeout must be 1000 to {PEER_IDLE_TIMEOUT_MS_MAX} ms, not {}",
                idle_timeout.as_millis()
            ));
        }
        if keep_alive.is_zero() || keep_alive.saturating_mul(2) > idle_timeout {
            return Err(format!(
                "the peer keep-alive ({} ms) must be above 0 and at most half the idle timeout ({} ms)",
                keep_alive.as_millis(),
                idle_timeout.as_millis()
            ));
        }
        Ok(PeerLiveness {
            keep_alive,
            idle_timeout,
        })
    }
}

/// Receive window of the link stream: two maximal frames, so one big frame does not stall on
/// flow-control round trips. Worst-case unread bytes buffered per link.
pub const PEER_STREAM_RECEIVE_WINDOW_BYTES: u32 = 8 << 20;

/// Connection receive window: a link has a single stream, so the stream's window.
pub const PEER_CONNECTION_RECEIVE_WINDOW_BYTES: u32 = PEER_STREAM_RECEIVE_WINDOW_BYTES;

/// Bytes a link may have sent and not yet acknowledged: bounds the send buffer a slow peer can
/// make us hold, per link.
pub const PEER_SEND_WINDOW_BYTES: u64 = 8 << 20;

/// Links (handshaking or authenticated) a node serves at once: a cluster is far smaller, so
/// this only stops a flood of unauthenticated connections, each costing up to the windows above.
/// One source address holds at most [`PEER_HANDSHAKES_PER_SOURCE_MAX`] of them unauthenticated,
/// each for at most [`PEER_ACCEPT_HANDSHAKE_MS`].
pub const PEER_LINKS_SERVED_MAX: usize = 256;

/// Longest [`PeerNet::shutdown`] waits for its close packets to be acknowledged.
pub const PEER_SHUTDOWN_DRAIN_MS: u64 = 500;

/// QUIC application close code: the link is no longer needed (forgotten, replaced, lost).
pub const PEER_CLOSE_DONE: u32 = 0;
/// QUIC application close code: authentication failed; the reason says why.
pub const PEER_CLOSE_AUTH: u32 = 1;
/// QUIC application close code: the peer broke the framing (e.g. an oversize frame).
pub const PEER_CLOSE_PROTOCOL: u32 = 2;
/// QUIC application close code: the node is shutting down.
pub const PEER_CLOSE_SHUTDOWN: u32 = 3;

/// Server name in the certificate and in dials; never verified (see the module doc).
const SERVER_NAME: &str = "ringpost-peer";
/// Exporter label of the channel binding.
const AUTH_LABEL: &[u8] = b"ringpost-peer/2 auth";
const ROLE_DIALER: u8 = b'c';
const ROLE_SERVER: u8 = b's';
const EKM_BYTES: usize = 32;
const MAC_BYTES: usize = 32;
/// A proof: the MAC, then the node key's signature.
const PROOF_BYTES: usize = MAC_BYTES + SIGNATURE_BYTES;
/// Bytes of the request id, counted in a frame's length.
const ID_BYTES: usize = 8;

/// A node's id in the cluster.
pub type NodeId = u64;

/// What a node does with the requests its peers send.
pub trait PeerService: Send + Sync + 'static {
    /// One request from authenticated peer `from`. Called in arrival order on the link's reader
    /// task; the returned future is polled once at once, before the next request is read, so
    /// work it starts on its first poll (e.g. queueing a write) happens in arrival order. Its
    /// output is the response body.
    fn call(&self, from: NodeId, request: Bytes) -> BoxFuture<'static, Bytes>;
}

/// Where a node looks up the key another node's id is bound to: its view of the coordinator's
/// membership.
pub trait PeerDirectory: Send + Sync + 'static {
    /// The key `node` is bound to, waiting up to `wait` for a view that has it; `None` if the
    /// node is not a member (or has no key) by then.
    fn node_key(
        &self,
        node: NodeId,
        wait: Duration,
    ) -> BoxFuture<'_, Option<[u8; PUBLIC_KEY_BYTES]>>;
}

/// A fixed table of node keys, for tests and tools that know their peers' keys up front.
#[derive(Default)]
pub struct StaticDirectory {
    keys: Mutex<HashMap<NodeId, [u8; PUBLIC_KEY_BYTES]>>,
}

impl StaticDirectory {
    /// Binds `node` to `key` (replacing any earlier key).
    pub fn insert(&self, node: NodeId, key: [u8; PUBLIC_KEY_BYTES]) {
        lock(&self.keys).insert(node, key);
    }
}

impl PeerDirectory for StaticDirectory {
    fn node_key(&self, node: NodeId, _: Duration) -> BoxFuture<'_, Option<[u8; PUBLIC_KEY_BYTES]>> {
        let key = lock(&self.keys).get(&node).copied();
        futures::future::ready(key).boxed()
    }
}

/// How a node joins the peer network.
pub struct PeerConfig {
    pub node_id: NodeId,
    /// Nodes of another cluster are refused even if they share the secret.
    pub cluster_id: String,
    /// Shared cluster secret, random, at least [`PEER_SECRET_BYTES_MIN`] bytes.
    pub secret: Arc<Vec<u8>>,
    /// This node's own key; its public half is what the membership binds `node_id` to.
    pub key: Arc<NodeKey>,
    /// Other nodes' keys.
    pub directory: Arc<dyn PeerDirectory>,
    /// UDP address to serve on and dial from.
    pub bind: SocketAddr,
    /// Keep-alive and idle timeout of every link.
    pub liveness: PeerLiveness,
}

/// Why a peer call (or starting the peer network) failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    #[error("peer authentication failed: {0}")]
    AuthFailed(String),
    #[error("peer link closed: {0}")]
    Closed(String),
    #[error("peer call timed out")]
    Timeout,
    #[error("peer frame body of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("peer network not started: {0}")]
    Config(String),
}

/// This node's side of the network: serves peers' links and dials its own, one per peer.
#[derive(Clone)]
pub struct PeerNet {
    shared: Arc<Shared>,
}

struct Shared {
    identity: Arc<Identity>,
    /// The runtime `start` ran on: every task of the network (the endpoint's and connections'
    /// drivers, the accept loop, each link's task) runs there, whoever calls.
    runtime: tokio::runtime::Handle,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    /// Outgoing links by peer, `None` once shut down. Keyed by cluster members only (the
    /// caller's view of the cluster), so bounded by the cluster size.
    links: Mutex<Option<HashMap<NodeId, Arc<Link>>>>,
}

impl PeerNet {
    /// Binds `config.bind` with a fresh self-signed certificate and starts serving peers.
    /// Every task of the network runs on the runtime this is called on, whichever runtime
    /// later calls or dials: a node runs it on a runtime of its own
    /// ([`crate::runtime::PeerRuntime`]), so that replication and forwarding do not queue
    /// behind client connections' tasks.
    pub async fn start(
        config: PeerConfig,
        service: Arc<dyn PeerService>,
    ) -> Result<PeerNet, PeerError> {
        if config.secret.len() < PEER_SECRET_BYTES_MIN {
            return Err(PeerError::Config(format!(
                "cluster secret has {} bytes, at least {PEER_SECRET_BYTES_MIN} needed",
                config.secret.len()
            )));
        }
        if config.cluster_id.len() > PEER_CLUSTER_ID_BYTES_MAX {
            return Err(PeerError::Config(format!(
                "cluster id longer than {PEER_CLUSTER_ID_BYTES_MAX} bytes"
            )));
        }
        let keyed = Hmac::<Sha256>::new_from_slice(&config.secret)
            .map_err(|e| PeerError::Config(e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let liveness = config.liveness;
        let bind_failed =
            |e: std::io::Error| PeerError::Config(format!("binding {}: {e}", config.bind));
        let runtime = tokio::runtime::Handle::current();
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config(&provider, liveness)?),
            crate::runtime::quic_socket(config.bind).map_err(bind_failed)?,
            Arc::new(OnRuntime(runtime.clone())),
        )
        .map_err(bind_failed)?;
        endpoint.set_default_client_config(client_config(provider, liveness)?);
        let local_addr = endpoint
            .local_addr()
            .map_err(|e| PeerError::Config(e.to_string()))?;
        let identity = Arc::new(Identity {
            node_id: config.node_id,
            cluster_id: config.cluster_id,
            keyed,
            key: config.key,
            directory: config.directory,
            refused: AtomicU64::new(0),
        });
        runtime.spawn(accept_links(endpoint.clone(), identity.clone(), service));
        Ok(PeerNet {
            shared: Arc::new(Shared {
                identity,
                runtime,
                endpoint,
                local_addr,
                links: Mutex::new(Some(HashMap::new())),
            }),
        })
    }

    /// The bound address (the port chosen when `bind` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Dials served so far that were refused: failed or late proofs, and dials refused at once
    /// for [`PEER_HANDSHAKES_PER_SOURCE_MAX`] or [`PEER_LINKS_SERVED_MAX`].
    pub fn refused_dials(&self) -> u64 {
        self.shared.identity.refused.load(Ordering::Relaxed)
    }

    /// Sends `request` to `peer` (at `addr`, "host:port") over the single link to it — dialed
    /// on first use, re-dialed when broken or when the address changes — and waits up to
    /// `timeout` for the response.
    pub async fn call(
        &self,
        peer: NodeId,
        addr: &str,
        request: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, PeerError> {
        if request.len() > PEER_FRAME_BYTES_MAX {
            return Err(PeerError::TooLarge {
                len: request.len(),
                max: PEER_FRAME_BYTES_MAX,
            });
        }
        let link = self.link(peer, addr)?;
        let call = async {
            // Everything up to the send happens on the first poll when a slot is free; the
            // slot queue is FIFO otherwise. Unconstrained: tokio's coop budget could make a
            // first poll return without queueing, and break first-poll order.
            let slot = tokio::task::unconstrained(link.state.slots.clone().acquire_owned())
                .await
                .map_err(|_| link.state.failure())?;
            let (reply, answer) = oneshot::channel();
            let id = link.state.next_id.fetch_add(1, Ordering::Relaxed);
            lock(&link.state.pending).insert(id, (reply, slot));
            // Never full: every queued request holds a slot. Closed once the link has ended.
            if link.requests.try_send((id, request)).is_err() {
                lock(&link.state.pending).remove(&id);
                return Err(link.state.failure());
            }
            answer.await.unwrap_or_else(|_| Err(link.state.failure()))
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(PeerError::Timeout))
    }

    /// Dials `peer` now unless a link to it at `addr` is up or being dialed, so its first call
    /// does not wait for the QUIC handshake and the proofs. Those take milliseconds on a quiet
    /// host, and can miss [`PEER_ACCEPT_HANDSHAKE_MS`] on a saturated one: in a 72-node
    /// million-connection run, links first dialed under load failed by the hundred and each
    /// failure dropped a replica that then had to be caught up.
    pub fn warm(&self, peer: NodeId, addr: &str) {
        let _ = self.link(peer, addr);
    }

    /// Closes and forgets the link to a peer that left the cluster.
    pub fn forget(&self, peer: NodeId) {
        let link = lock(&self.shared.links)
            .as_mut()
            .and_then(|links| links.remove(&peer));
        if let Some(link) = link {
            link.state.close("peer forgotten");
        }
    }

    /// Stops accepting, closes every link. (Dropping every handle closes the outgoing links
    /// but keeps serving: call this to stop.)
    pub async fn shutdown(&self) {
        let links = lock(&self.shared.links).take();
        for link in links.into_iter().flat_map(HashMap::into_values) {
            link.state.close("node shutting down");
        }
        let endpoint = &self.shared.endpoint;
        endpoint.close(VarInt::from_u32(PEER_CLOSE_SHUTDOWN), b"node shutting down");
        let drain = Duration::from_millis(PEER_SHUTDOWN_DRAIN_MS);
        let _ = tokio::time::timeout(drain, endpoint.wait_idle()).await;
    }

    /// The live link to `peer` at `addr`, or a new one (its task dials it).
    fn link(&self, peer: NodeId, addr: &str) -> Result<Arc<Link>, PeerError> {
        let mut links = lock(&self.shared.links);
        let Some(links) = links.as_mut() else {
            return Err(PeerError::Closed("peer network shut down".into()));
        };
        if let Some(link) = links.get(&peer) {
            if link.addr == addr && !link.requests.is_closed() {
                return Ok(link.clone());
            }
            link.state.close("peer moved to another address");
        }
        let (requests, queued) = mpsc::channel(PEER_IN_FLIGHT_MAX);
        let state = Arc::new(LinkState {
            slots: Arc::new(Semaphore::new(PEER_IN_FLIGHT_MAX)),
            pending: Mutex::default(),
            next_id: AtomicU64::new(0),
            failure: OnceLock::new(),
            close: Notify::new(),
        });
        self.shared.runtime.spawn(run_link(
            self.shared.identity.clone(),
            self.shared.endpoint.clone(),
            peer,
            addr.to_owned(),
            state.clone(),
            queued,
        ));
        let link = Arc::new(Link {
            addr: addr.to_owned(),
            requests,
            state,
        });
        links.insert(peer, link.clone());
        Ok(link)
    }
}

/// What a node proves about itself on every link, and how it checks others.
struct Identity {
    node_id: NodeId,
    cluster_id: String,
    /// HMAC keyed with the cluster secret, cloned for each proof.
    keyed: Hmac<Sha256>,
    key: Arc<NodeKey>,
    directory: Arc<dyn PeerDirectory>,
    /// Served dials refused (see [`PeerNet::refused_dials`]).
    refused: AtomicU64,
}

impl Identity {
    /// What `node_id` acting as `role` signs on the TLS session that exported `ekm`.
    fn transcript(&self, role: u8, node_id: NodeId, ekm: &[u8; EKM_BYTES]) -> Vec<u8> {
        let cluster_id = self.cluster_id.as_bytes();
        let mut t = Vec::with_capacity(PEER_ALPN.len() + 1 + 8 + 1 + cluster_id.len() + EKM_BYTES);
        t.put_slice(PEER_ALPN);
        t.put_u8(role);
        t.put_u64(node_id);
        t.put_u8(cluster_id.len() as u8);
        t.put_slice(cluster_id);
        t.put_slice(ekm);
        t
    }

    fn proof(&self, role: u8, ekm: &[u8; EKM_BYTES]) -> [u8; PROOF_BYTES] {
        let t = self.transcript(role, self.node_id, ekm);
        let mut mac = self.keyed.clone();
        mac.update(&t);
        let mut proof = [0u8; PROOF_BYTES];
        proof[..MAC_BYTES].copy_from_slice(&mac.finalize().into_bytes());
        proof[MAC_BYTES..].copy_from_slice(&self.key.sign(&t));
        proof
    }

    /// Checks that `proof` shows `node_id` (in `role`) knows the cluster secret (constant
    /// time, checked first) and holds the key the membership binds `node_id` to.
    async fn verify(
        &self,
        role: u8,
        node_id: NodeId,
        ekm: &[u8; EKM_BYTES],
        proof: &[u8],
    ) -> Result<(), String> {
        let t = self.transcript(role, node_id, ekm);
        let (mac, signature) = proof.split_at(MAC_BYTES.min(proof.len()));
        let mut keyed = self.keyed.clone();
        keyed.update(&t);
        if keyed.verify_slice(mac).is_err() {
            return Err(format!(
                "node {node_id}'s proof does not verify (wrong cluster secret?)"
            ));
        }
        let wait = Duration::from_millis(PEER_KEY_WAIT_MS);
        let Some(key) = self.directory.node_key(node_id, wait).await else {
            return Err(format!(
                "node {node_id} has no node key in node {}'s view of the membership \
                 (not a member, or joined without a key)",
                self.node_id
            ));
        };
        if !node_key::verify(&key, &t, signature) {
            return Err(format!(
                "node {node_id}'s signature does not verify with the key its id is bound to \
                 (another node claiming its id?)"
            ));
        }
        Ok(())
    }
}

fn export_ekm(conn: &quinn::Connection) -> Result<[u8; EKM_BYTES], String> {
    let mut ekm = [0u8; EKM_BYTES];
    conn.export_keying_material(&mut ekm, AUTH_LABEL, b"")
        .map_err(|_| "cannot export keying material")?;
    Ok(ekm)
}

// ---- The dialing side ------------------------------------------------------------------------

/// The caller's handle on one outgoing link.
struct Link {
    /// The address dialed; a call naming another address replaces the link.
    addr: String,
    /// `(id, body)` of requests for the link task to write, in first-poll order. Closed once
    /// the link has ended.
    requests: mpsc::Sender<(u64, Bytes)>,
    state: Arc<LinkState>,
}

/// What callers and the link task share.
struct LinkState {
    /// In-flight slots: a request holds one until its response arrives or the link ends (a
    /// caller that timed out too: the peer may still be working on it).
    slots: Arc<Semaphore>,
    /// Requests queued or written, by id, waiting for their responses.
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    /// Why the link ended (or was asked to close); the first reason wins.
    failure: OnceLock<PeerError>,
    /// Wakes the link task to close the link (forget, replace, shutdown).
    close: Notify,
}

impl LinkState {
    fn failure(&self) -> PeerError {
        self.failure
            .get()
            .cloned()
            .unwrap_or_else(|| PeerError::Closed("link ended".into()))
    }

    fn close(&self, why: &str) {
        let _ = self.failure.set(PeerError::Closed(why.into()));
        self.close.notify_one();
    }
}

/// A request's caller and slot.
type Pending = (
    oneshot::Sender<Result<Bytes, PeerError>>,
    OwnedSemaphorePermit,
);

/// Dials `peer` at `addr`, then writes requests and hands out responses until the link ends;
/// then fails everything pending or queued with the link's failure.
async fn run_link(
    identity: Arc<Identity>,
    endpoint: quinn::Endpoint,
    peer: NodeId,
    addr: String,
    state: Arc<LinkState>,
    mut requests: mpsc::Receiver<(u64, Bytes)>,
) {
    let handshake = Duration::from_millis(PEER_HANDSHAKE_TIMEOUT_MS);
    let dialed = tokio::select! {
        dialed = tokio::time::timeout(handshake, dial(&identity, &endpoint, peer, &addr)) => {
            dialed.unwrap_or_else(|_| Err(PeerError::Unreachable(format!(
                "no authenticated link to {addr} within {PEER_HANDSHAKE_TIMEOUT_MS} ms"
            ))))
        }
        () = state.close.notified() => Err(state.failure()),
    };
    let error = match dialed {
        Err(e) => {
            debug!(node = identity.node_id, peer, %addr, error = %e, "peer dial failed");
            e
        }
        Ok((conn, mut send, recv)) => {
            debug!(node = identity.node_id, peer, %addr, "peer link up");
            let end = tokio::select! {
                end = write_frames(&mut send, &mut requests) => end,
                end = read_responses(FrameReader::new(recv), &state.pending) => end,
                () = state.close.notified() => LinkEnd::done(state.failure().to_string()),
            };
            let reason = end.close(&conn);
            debug!(node = identity.node_id, peer, %addr, %reason, "peer link down");
            PeerError::Closed(reason)
        }
    };
    // Mark the link ended before failing calls, so a retrying caller dials a new one; a
    // request queued after this fails to send and its caller removes it from `pending`.
    let error = state.failure.get_or_init(|| error).clone();
    requests.close();
    state.slots.close();
    for (reply, _slot) in std::mem::take(&mut *lock(&state.pending)).into_values() {
        let _ = reply.send(Err(error.clone()));
    }
}

/// Connects to `addr` and runs the dialer's half of the proof exchange; closes the connection
/// with the reason if it fails.
async fn dial(
    identity: &Identity,
    endpoint: &quinn::Endpoint,
    peer: NodeId,
    addr: &str,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), PeerError> {
    let unreachable_at = |e: &dyn Display| PeerError::Unreachable(format!("{addr}: {e}"));
    let local = endpoint.local_addr().map_err(|e| unreachable_at(&e))?;
    // An IPv6 endpoint reaches IPv4 addresses too (quinn maps them); an IPv4 one does not.
    let target = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| unreachable_at(&e))?
        .find(|a| local.is_ipv6() || a.is_ipv4())
        .ok_or_else(|| unreachable_at(&"no usable address"))?;
    let conn = endpoint
        .connect(target, SERVER_NAME)
        .map_err(|e| unreachable_at(&e))?
        .await
        .map_err(|e| unreachable_at(&e))?;
    match prove_to_server(identity, &conn, peer).await {
        Ok((send, recv)) => Ok((conn, send, recv)),
        Err(reason) => {
            let error = match conn.close_reason() {
                Some(quinn::ConnectionError::ApplicationClosed(close))
                    if close.error_code == VarInt::from_u32(PEER_CLOSE_AUTH) =>
                {
                    let why = String::from_utf8_lossy(&close.reason);
                    PeerError::AuthFailed(format!("{addr} refused this node: {why}"))
                }
                Some(e) => unreachable_at(&e),
                None => PeerError::AuthFailed(format!("{addr}: {reason}")),
            };
            conn.close(VarInt::from_u32(PEER_CLOSE_AUTH), reason.as_bytes());
            Err(error)
        }
    }
}

async fn prove_to_server(
    identity: &Identity,
    conn: &quinn::Connection,
    peer: NodeId,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(text)?;
    let ekm = export_ekm(conn)?;
    let cluster_id = identity.cluster_id.as_bytes();
    let mut hello = Vec::with_capacity(8 + 1 + cluster_id.len() + PROOF_BYTES);
    hello.put_u64(identity.node_id);
    hello.put_u8(cluster_id.len() as u8);
    hello.put_slice(cluster_id);
    hello.put_slice(&identity.proof(ROLE_DIALER, &ekm));
    send.write_all(&hello).await.map_err(text)?;
    let mut answer = [0u8; 8 + PROOF_BYTES];
    recv.read_exact(&mut answer).await.map_err(text)?;
    let (server, proof) = ((&answer[..8]).get_u64(), &answer[8..]);
    if server != peer {
        return Err(format!("expected node {peer}, node {server} answered"));
    }
    identity.verify(ROLE_SERVER, server, &ekm, proof).await?;
    Ok((send, recv))
}

/// Hands each response to its caller; a response nobody asked for breaks the link.
async fn read_responses(
    mut frames: FrameReader,
    pending: &Mutex<HashMap<u64, Pending>>,
) -> LinkEnd {
    loop {
        let (id, body) = match frames.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return LinkEnd::done("peer ended the link stream"),
            Err(end) => return end,
        };
        let waiting = lock(pending).remove(&id);
        let Some((reply, _slot)) = waiting else {
            return LinkEnd::protocol(format!("response to unknown request {id}"));
        };
        let _ = reply.send(Ok(body));
    }
}

// ---- The serving side ------------------------------------------------------------------------

/// quinn's tokio runtime pinned to one runtime: quinn spawns a connection's driver where it
/// is dialed, and a dial from a client connection's task would put it on the client runtime.
#[derive(Debug)]
struct OnRuntime(tokio::runtime::Handle);

impl quinn::Runtime for OnRuntime {
    fn new_timer(&self, at: std::time::Instant) -> std::pin::Pin<Box<dyn quinn::AsyncTimer>> {
        let _entered = self.0.enter();
        quinn::TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _entered = self.0.enter();
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }
}

async fn accept_links(
    endpoint: quinn::Endpoint,
    identity: Arc<Identity>,
    service: Arc<dyn PeerService>,
) {
    let served = Arc::new(Semaphore::new(PEER_LINKS_SERVED_MAX));
    let handshakes = HandshakesBySource::default();
    while let Some(incoming) = endpoint.accept().await {
        let source = incoming.remote_address().ip().to_canonical();
        let Some(handshake) = handshakes.admit(source, PEER_HANDSHAKES_PER_SOURCE_MAX) else {
            // Not a warning: whoever floods us would flood the log too.
            debug!(node = identity.node_id, %source,
                "refusing peer link: PEER_HANDSHAKES_PER_SOURCE_MAX handshakes from this source");
            identity.refused.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        };
        match served.clone().try_acquire_owned() {
            Ok(slot) => {
                tokio::spawn(serve_link(
                    identity.clone(),
                    service.clone(),
                    incoming,
                    slot,
                    handshake,
                ));
            }
            Err(_) => {
                warn!(node = identity.node_id, remote = %incoming.remote_address(),
                    "refusing peer link: PEER_LINKS_SERVED_MAX links served");
                identity.refused.fetch_add(1, Ordering::Relaxed);
                incoming.refuse();
            }
        }
    }
}

/// Serves one incoming link: authenticates the dialer within [`PEER_ACCEPT_HANDSHAKE_MS`] (the
/// QUIC handshake included), then answers its requests. `handshake` counts against the
/// source's [`PEER_HANDSHAKES_PER_SOURCE_MAX`] until the dialer has proved itself; `_served`
/// is the slot, held until the link ends (failure included).
async fn serve_link(
    identity: Arc<Identity>,
    service: Arc<dyn PeerService>,
    incoming: quinn::Incoming,
    _served: OwnedSemaphorePermit,
    handshake: Handshake,
) {
    let remote = incoming.remote_address();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(PEER_ACCEPT_HANDSHAKE_MS);
    let conn = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!(node = identity.node_id, %remote, error = %e, "peer handshake failed");
            identity.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Dropping the handshake abandons the connection.
        Err(_) => {
            debug!(node = identity.node_id, %remote, "peer handshake timed out");
            identity.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let proved = tokio::time::timeout_at(deadline, check_dialer(&identity, &conn))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "authentication timed out (PEER_ACCEPT_HANDSHAKE_MS = {PEER_ACCEPT_HANDSHAKE_MS})"
            ))
        });
    let (from, mut send, recv) = match proved {
        Ok(proved) => proved,
        Err(reason) => {
            warn!(node = identity.node_id, %remote, %reason, "refused peer link");
            identity.refused.fetch_add(1, Ordering::Relaxed);
            conn.close(VarInt::from_u32(PEER_CLOSE_AUTH), reason.as_bytes());
            return;
        }
    };
    drop(handshake);
    debug!(node = identity.node_id, peer = from, %remote, "serving peer link");
    let (answers, mut to_write) = mpsc::channel(PEER_IN_FLIGHT_MAX);
    let end = tokio::select! {
        end = read_requests(&*service, from, FrameReader::new(recv), answers) => end,
        end = write_frames(&mut send, &mut to_write) => end,
    };
    let reason = end.close(&conn);
    debug!(node = identity.node_id, peer = from, %reason, "served peer link ended");
}

/// The server's half of the proof exchange: checks the dialer's hello, then proves itself.
async fn check_dialer(
    identity: &Identity,
    conn: &quinn::Connection,
) -> Result<(NodeId, quinn::SendStream, quinn::RecvStream), String> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(text)?;
    let ekm = export_ekm(conn)?;
    let mut head = [0u8; 8 + 1];
    recv.read_exact(&mut head).await.map_err(text)?;
    let [from @ .., cluster_id_len] = head;
    let (from, cluster_id_len) = (u64::from_be_bytes(from), usize::from(cluster_id_len));
    let mut rest = vec![0u8; cluster_id_len + PROOF_BYTES];
    // At most 255 + 96 bytes, whatever the dialer claims.
    recv.read_exact(&mut rest).await.map_err(text)?;
    let (cluster_id, proof) = rest.split_at(cluster_id_len);
    if cluster_id != identity.cluster_id.as_bytes() {
        return Err("wrong cluster id".into());
    }
    identity.verify(ROLE_DIALER, from, &ekm, proof).await?;
    let mut answer = Vec::with_capacity(8 + PROOF_BYTES);
    answer.put_u64(identity.node_id);
    answer.put_slice(&identity.proof(ROLE_SERVER, &ekm));
    send.write_all(&answer).await.map_err(text)?;
    Ok((from, send, recv))
}

/// Reads requests in order and starts each on the service at once (one poll, before the next
/// is read), then keeps the started ones running. Each answer goes to the writer through a
/// queue slot reserved before its request was read, so at most [`PEER_IN_FLIGHT_MAX`] are
/// executing or queued; at that bound the reading stops.
async fn read_requests(
    service: &dyn PeerService,
    from: NodeId,
    mut frames: FrameReader,
    answers: mpsc::Sender<(u64, Bytes)>,
) -> LinkEnd {
    let mut executing = FuturesUnordered::new();
    loop {
        let reserve = answers.clone().reserve_owned();
        let Ok(slot) = drive_until(&mut executing, reserve).await else {
            return LinkEnd::done("response writer ended");
        };
        let (id, body) = match drive_until(&mut executing, frames.next()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return LinkEnd::done("dialer ended the link stream"),
            Err(end) => return end,
        };
        let mut answer = service.call(from, body);
        match (&mut answer).now_or_never() {
            Some(body) => drop(slot.send((id, body))),
            None => executing.push(async move { drop(slot.send((id, answer.await))) }.boxed()),
        }
    }
}

/// Runs `fut` to completion while driving the started requests.
async fn drive_until<T>(
    executing: &mut FuturesUnordered<BoxFuture<'static, ()>>,
    fut: impl Future<Output = T>,
) -> T {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            Some(()) = executing.next(), if !executing.is_empty() => {}
            out = &mut fut => return out,
        }
    }
}

/// Writes `(id, body)` frames in queue order: requests on the dialing side, responses on the
/// serving side.
async fn write_frames(
    send: &mut quinn::SendStream,
    queue: &mut mpsc::Receiver<(u64, Bytes)>,
) -> LinkEnd {
    while let Some((id, body)) = queue.recv().await {
        if let Err(end) = write_frame(send, id, body).await {
            return end;
        }
    }
    LinkEnd::done("link dropped by this node")
}

// ---- Framing -----------------------------------------------------------------------------------

/// Why a link ends: the application close code for the peer, and a reason for both sides.
struct LinkEnd {
    code: u32,
    reason: String,
}

impl LinkEnd {
    fn done(reason: impl Into<String>) -> LinkEnd {
        let reason = reason.into();
        LinkEnd {
            code: PEER_CLOSE_DONE,
            reason,
        }
    }

    fn protocol(reason: impl Into<String>) -> LinkEnd {
        let reason = reason.into();
        LinkEnd {
            code: PEER_CLOSE_PROTOCOL,
            reason,
        }
    }

    /// Closes `conn` (a no-op if it is already closed) and says why the link ended: the peer's
    /// close reason if it closed first (more telling than "connection lost"), else ours.
    fn close(self, conn: &quinn::Connection) -> String {
        let why = conn.close_reason().map(|e| e.to_string());
        conn.close(VarInt::from_u32(self.code), self.reason.as_bytes());
        why.unwrap_or(self.reason)
    }
}

/// Writes one frame. A body over the limit closes the link rather than going out: the
/// receiver would refuse it anyway, and this way the reason names the culprit.
async fn write_frame(send: &mut quinn::SendStream, id: u64, body: Bytes) -> Result<(), LinkEnd> {
    if body.len() > PEER_FRAME_BYTES_MAX {
        return Err(LinkEnd::protocol(format!(
            "frame {id} has a body of {} bytes, over PEER_FRAME_BYTES_MAX",
            body.len()
        )));
    }
    let mut header = BytesMut::with_capacity(4 + ID_BYTES);
    header.put_u32((ID_BYTES + body.len()) as u32);
    header.put_u64(id);
    send.write_all_chunks(&mut [header.freeze(), body])
        .await
        .map_err(|e| LinkEnd::done(e.to_string()))
}

/// Splits a link stream into frames; holds only the bytes of a partial frame. Cancel-safe: the
/// state lives here and quinn's `read_chunk` is cancel-safe.
struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl FrameReader {
    fn new(recv: quinn::RecvStream) -> FrameReader {
        FrameReader {
            recv,
            buf: BytesMut::new(),
        }
    }

    /// The next `(id, body)`, `None` where the stream ends between frames.
    async fn next(&mut self) -> Result<Option<(u64, Bytes)>, LinkEnd> {
        loop {
            if let Some(frame) = split_frame(&mut self.buf).map_err(LinkEnd::protocol)? {
                return Ok(Some(frame));
            }
            match self.recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) if self.buf.is_empty() => return Ok(None),
                Ok(None) => return Err(LinkEnd::protocol("link stream ended inside a frame")),
                Err(e) => return Err(LinkEnd::done(e.to_string())),
            }
        }
    }
}

/// Takes the first complete frame off `buf`. A length outside the limits is refused as soon
/// as its 4 bytes are in, so a peer never makes us buffer (or allocate) more than one maximal
/// frame.
fn split_frame(buf: &mut BytesMut) -> Result<Option<(u64, Bytes)>, String> {
    let Some(length) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let length = u32::from_be_bytes(*length) as usize;
    if length < ID_BYTES || length - ID_BYTES > PEER_FRAME_BYTES_MAX {
        return Err(format!(
            "frame length {length} outside {ID_BYTES}..={}",
            ID_BYTES + PEER_FRAME_BYTES_MAX
        ));
    }
    if buf.len() < 4 + length {
        return Ok(None);
    }
    let mut frame = buf.split_to(4 + length);
    frame.advance(4);
    let id = frame.get_u64();
    Ok(Some((id, frame.freeze())))
}

// ---- TLS -----------------------------------------------------------------------------------------

/// The serving half of the endpoint: a fresh self-signed certificate, TLS 1.3, our ALPN only.
fn server_config(
    provider: &Arc<CryptoProvider>,
    liveness: PeerLiveness,
) -> Result<quinn::ServerConfig, PeerError> {
    let certified =
        rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()]).map_err(tls_error)?;
    let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key.into())
        .map_err(tls_error)?;
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let tls = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(tls));
    config.transport_config(transport_config(1, liveness));
    Ok(config)
}

/// The dialing half: any server certificate, authenticated afterwards by the proof exchange.
fn client_config(
    provider: Arc<CryptoProvider>,
    liveness: PeerLiveness,
) -> Result<quinn::ClientConfig, PeerError> {
    let verifier = Arc::new(AnyServerCert(provider.signature_verification_algorithms));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(tls));
    config.transport_config(transport_config(0, liveness));
    Ok(config)
}

/// Limits of every link; `peer_streams` is how many streams the other side may open (the
/// dialer opens the one link stream, the server none).
fn transport_config(peer_streams: u32, liveness: PeerLiveness) -> Arc<quinn::TransportConfig> {
    let idle = u32::try_from(liveness.idle_timeout.as_millis()).unwrap_or(PEER_IDLE_TIMEOUT_MS_MAX);
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(peer_streams.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(PEER_STREAM_RECEIVE_WINDOW_BYTES.into())
        .receive_window(PEER_CONNECTION_RECEIVE_WINDOW_BYTES.into())
        .send_window(PEER_SEND_WINDOW_BYTES)
        .datagram_receive_buffer_size(None)
        .keep_alive_interval(Some(liveness.keep_alive))
        .max_idle_timeout(Some(VarInt::from_u32(idle).into()));
    Arc::new(t)
}

fn tls_error(e: impl Display) -> PeerError {
    PeerError::Config(format!("TLS setup: {e}"))
}

/// Accepts any server certificate but checks the handshake signature made with its key:
/// peers authenticate by channel binding (see the module doc), not by certificates.
#[derive(Debug)]
struct AnyServerCert(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("peer links use TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

fn text(e: impl Display) -> String {
    e.to_string()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const SECRET: &[u8] = b"test cluster secret, 32 bytes!!!";
    const TIMEOUT: Duration = Duration::from_secs(1);

    /// Records every request as it arrives and answers `from:body` (bodies over 64 bytes:
    /// `from:len`); a request `hold` is answered only once `gate` is notified.
    #[derive(Default)]
    struct Recorder {
        arrivals: Arc<Mutex<Vec<Bytes>>>,
        /// For each answer's first poll, in order: how many requests had arrived by then.
        first_polls: Arc<Mutex<Vec<usize>>>,
        arrived: Notify,
        gate: Arc<Notify>,
    }

    impl Recorder {
        fn calls(&self) -> usize {
            lock(&self.arrivals).len()
        }
    }

    impl PeerService for Recorder {
        fn call(&self, from: NodeId, request: Bytes) -> BoxFuture<'static, Bytes> {
            lock(&self.arrivals).push(request.clone());
            self.arrived.notify_one();
            let gate = (&request[..] == b"hold").then(|| self.gate.clone());
            let (arrivals, first_polls) = (self.arrivals.clone(), self.first_polls.clone());
            async move {
                lock(&first_polls).push(lock(&arrivals).len());
                if let Some(gate) = gate {
                    gate.notified().await;
                }
                Bytes::from(match request.len() {
                    0..=64 => format!("{from}:{}", String::from_utf8_lossy(&request)),
                    len => format!("{from}:{len}"),
                })
            }
            .boxed()
        }
    }

    /// The key node `id` holds in these tests.
    pub(crate) fn test_key(id: NodeId) -> Arc<NodeKey> {
        Arc::new(NodeKey::from_seed(&[id as u8; 32]).unwrap())
    }

    /// The membership of these tests: nodes 1 to 9, each bound to its [`test_key`].
    pub(crate) fn test_directory() -> Arc<StaticDirectory> {
        let directory = StaticDirectory::default();
        for id in 1..=9 {
            directory.insert(id, test_key(id).public());
        }
        Arc::new(directory)
    }

    /// A peer endpoint on 127.0.0.1 whose node holds `key`.
    pub(crate) fn test_config(node_id: NodeId, cluster_id: &str, secret: &[u8]) -> PeerConfig {
        PeerConfig {
            node_id,
            cluster_id: cluster_id.into(),
            secret: Arc::new(secret.to_vec()),
            key: test_key(node_id),
            directory: test_directory(),
            bind: "127.0.0.1:0".parse().unwrap(),
            liveness: PeerLiveness::default(),
        }
    }

    async fn start(node_id: NodeId, cluster_id: &str, secret: &[u8]) -> (PeerNet, Arc<Recorder>) {
        start_with(test_config(node_id, cluster_id, secret)).await
    }

    async fn start_with(config: PeerConfig) -> (PeerNet, Arc<Recorder>) {
        let service = Arc::new(Recorder::default());
        let net = PeerNet::start(config, service.clone()).await.unwrap();
        (net, service)
    }

    /// Node 1 (`a`) and node 2 (`b`, at `to_b`, serving with `served`) of one cluster.
    async fn pair() -> (PeerNet, PeerNet, String, Arc<Recorder>) {
        let (a, _) = start(1, "c", SECRET).await;
        let (b, served) = start(2, "c", SECRET).await;
        let to_b = b.local_addr().to_string();
        (a, b, to_b, served)
    }

    #[test]
    fn liveness_needs_two_keep_alives_within_a_bounded_idle_timeout() {
        let ms = Duration::from_millis;
        let default = PeerLiveness::default();
        assert_eq!(
            PeerLiveness::new(default.keep_alive, default.idle_timeout),
            Ok(default)
        );
        assert!(PeerLiveness::new(ms(10_000), ms(30_000)).is_ok());
        assert!(PeerLiveness::new(ms(500), ms(1_000)).is_ok());
        assert!(PeerLiveness::new(ms(30_000), ms(60_000)).is_ok());
        for (keep_alive, idle) in [(501, 1_000), (0, 5_000), (400, 999), (1_000, 60_001)] {
            let e = PeerLiveness::new(ms(keep_alive), ms(idle)).unwrap_err();
            assert!(e.contains("peer"), "{keep_alive}/{idle}: {e}");
        }
    }

    #[tokio::test]
    async fn nodes_with_different_timers_link_and_call() {
        let liveness = PeerLiveness::new(Duration::from_secs(10), Duration::from_secs(30)).unwrap();
        let (a, _) = start_with(PeerConfig {
            liveness,
            ..test_config(1, "c", SECRET)
        })
        .await;
        let (b, served) = start(2, "c", SECRET).await;
        let answer = a
            .call(2, &b.local_addr().to_string(), Bytes::from("ping"), TIMEOUT)
            .await;
        assert_eq!(answer.unwrap(), "1:ping");
        assert_eq!(served.calls(), 1);
    }

    #[tokio::test]
    async fn a_warmed_link_is_up_before_the_first_call_and_carries_it() {
        let (a, b, to_b, served) = pair().await;
        let open = || b.shared.endpoint.open_connections();
        assert_eq!(open(), 0);
        a.warm(2, &to_b);
        let t0 = std::time::Instant::now();
        while open() == 0 && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(open(), 1, "dialed with no call made");
        assert_eq!(served.calls(), 0);
        a.warm(2, &to_b);
        let answer = a.call(2, &to_b, Bytes::from("ping"), TIMEOUT).await;
        assert_eq!(answer.unwrap(), "1:ping");
        assert_eq!(
            open(),
            1,
            "the call and the second warm used the warmed link"
        );
    }

    #[tokio::test]
    async fn round_trip_and_redial_after_forget() {
        let (a, _b, to_b, served) = pair().await;
        let answer = a.call(2, &to_b, Bytes::from("ping"), TIMEOUT).await;
        assert_eq!(answer.unwrap(), "1:ping");
        a.forget(2);
        let answer = a.call(2, &to_b, Bytes::from("again"), TIMEOUT).await;
        assert_eq!(answer.unwrap(), "1:again");
        assert_eq!(served.calls(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_calls() {
        let (a, _b, to_b, served) = pair().await;
        let tasks = (0..2_000).map(|i| {
            let (a, to_b) = (a.clone(), to_b.clone());
            tokio::spawn(async move { (i, a.call(2, &to_b, i.to_string().into(), TIMEOUT).await) })
        });
        for task in futures::future::join_all(tasks).await {
            let (i, answer) = task.unwrap();
            assert_eq!(answer.unwrap(), format!("1:{i}"));
        }
        assert_eq!(served.calls(), 2_000);
    }

    #[tokio::test]
    async fn arrival_order_is_first_poll_order_and_each_starts_at_once() {
        let (a, _b, to_b, served) = pair().await;
        let bodies: Vec<Bytes> = (0..500).map(|i: u32| i.to_string().into()).collect();
        let calls: Vec<_> = (bodies.iter())
            .map(|body| a.call(2, &to_b, body.clone(), TIMEOUT))
            .collect();
        for (answer, body) in futures::future::join_all(calls).await.iter().zip(&bodies) {
            let body = String::from_utf8_lossy(body);
            assert_eq!(answer.as_ref().unwrap(), &format!("1:{body}"));
        }
        assert_eq!(*lock(&served.arrivals), bodies);
        // Each answer was first polled before the next request arrived.
        assert_eq!(*lock(&served.first_polls), (1..=500).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn refused_links_fail_auth_and_are_never_served() {
        let other_secret = b"another secret, also 32 bytes!!!";
        // The dialer's cluster id and secret, the node it calls, and why it fails.
        let cases: [(&str, &[u8], NodeId, &str); 3] = [
            (
                "c",
                other_secret,
                2,
                "refused this node: node 1's proof does not verify (wrong cluster secret?)",
            ),
            ("other", SECRET, 2, "refused this node: wrong cluster id"),
            ("c", SECRET, 3, "expected node 3, node 2 answered"),
        ];
        for (cluster_id, secret, peer, why) in cases {
            let (a, _) = start(1, cluster_id, secret).await;
            let (b, served) = start(2, "c", SECRET).await;
            let to_b = b.local_addr().to_string();
            let answer = a.call(peer, &to_b, Bytes::from("x"), TIMEOUT).await;
            assert!(
                matches!(&answer, Err(PeerError::AuthFailed(e)) if e.contains(why)),
                "{answer:?}"
            );
            assert_eq!(served.calls(), 0);
            assert_eq!(b.refused_dials(), u64::from(why.starts_with("refused")));
        }
    }

    /// Used to be: anyone holding the cluster secret could act as any node id on a link.
    #[tokio::test]
    async fn a_node_id_is_only_accepted_with_the_key_it_is_bound_to() {
        let (b, served) = start(2, "c", SECRET).await;
        let to_b = b.local_addr().to_string();
        // The secret, but node 3's key while claiming to be node 1.
        let impostor = PeerConfig {
            key: test_key(3),
            ..test_config(1, "c", SECRET)
        };
        // A node id the membership does not know (no key bound to it).
        let stranger = test_config(42, "c", SECRET);
        let cases = [
            (
                impostor,
                "node 1's signature does not verify with the key its id is bound to",
            ),
            (
                stranger,
                "node 42 has no node key in node 2's view of the membership",
            ),
        ];
        for (config, why) in cases {
            let (a, _) = start_with(config).await;
            let answer = a.call(2, &to_b, Bytes::from("x"), TIMEOUT).await;
            assert!(
                matches!(&answer, Err(PeerError::AuthFailed(e)) if e.contains(why)),
                "{answer:?}"
            );
        }
        assert_eq!(served.calls(), 0);
        assert_eq!(b.refused_dials(), 2);

        // And the other way: a server answering as node 2 with another key is not trusted.
        let (fake, fake_served) = start_with(PeerConfig {
            key: test_key(4),
            ..test_config(2, "c", SECRET)
        })
        .await;
        let (a, _) = start(1, "c", SECRET).await;
        let to_fake = fake.local_addr().to_string();
        let answer = a.call(2, &to_fake, Bytes::from("x"), TIMEOUT).await;
        assert!(
            matches!(&answer, Err(PeerError::AuthFailed(e))
                if e.contains("node 2's signature does not verify")),
            "{answer:?}"
        );
        // The fake saw a genuine node 1 and served the link, but was never sent a request.
        assert_eq!(fake_served.calls(), 0);
    }

    #[tokio::test]
    async fn restarted_peer_fails_pending_calls_and_is_redialed() {
        let (a, b, to_b, served) = pair().await;
        let held = tokio::spawn({
            let (a, to_b) = (a.clone(), to_b.clone());
            async move { a.call(2, &to_b, Bytes::from("hold"), TIMEOUT).await }
        });
        served.arrived.notified().await;
        b.shutdown().await;
        let answer = held.await.unwrap();
        assert!(matches!(answer, Err(PeerError::Closed(_))), "{answer:?}");

        let short = Duration::from_millis(200);
        let answer = a.call(2, &to_b, Bytes::from("x"), short).await;
        assert!(
            matches!(
                answer,
                Err(PeerError::Timeout | PeerError::Unreachable(_) | PeerError::Closed(_))
            ),
            "{answer:?}"
        );

        let (b, _) = start(2, "c", SECRET).await;
        let to_b = b.local_addr().to_string();
        let answer = a.call(2, &to_b, Bytes::from("back"), TIMEOUT).await;
        assert_eq!(answer.unwrap(), "1:back");
    }

    #[tokio::test]
    async fn oversize_request_is_refused_before_sending() {
        let (a, _b, to_b, served) = pair().await;
        let too_big = Bytes::from(vec![0u8; PEER_FRAME_BYTES_MAX + 1]);
        let answer = a.call(2, &to_b, too_big, TIMEOUT).await;
        assert!(
            matches!(answer, Err(PeerError::TooLarge { len, max: PEER_FRAME_BYTES_MAX })
                if len == PEER_FRAME_BYTES_MAX + 1),
            "{answer:?}"
        );
        assert_eq!(served.calls(), 0);
        let largest = Bytes::from(vec![0u8; PEER_FRAME_BYTES_MAX]);
        let answer = a.call(2, &to_b, largest, TIMEOUT).await;
        assert_eq!(answer.unwrap(), format!("1:{PEER_FRAME_BYTES_MAX}"));
    }

    #[tokio::test]
    async fn oversize_frame_from_peer_closes_the_link() {
        let (a, _b, to_b, served) = pair().await;
        let (identity, endpoint) = (&a.shared.identity, &a.shared.endpoint);
        let (conn, mut send, _recv) = dial(identity, endpoint, 2, &to_b).await.unwrap();
        let mut header = BytesMut::new();
        header.put_u32(u32::MAX);
        header.put_u64(0);
        send.write_all(&header).await.unwrap();
        let closed = tokio::time::timeout(TIMEOUT, conn.closed()).await.unwrap();
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code == VarInt::from_u32(PEER_CLOSE_PROTOCOL)),
            "{closed:?}"
        );
        assert_eq!(served.calls(), 0);
    }

    #[tokio::test]
    async fn slow_answer_does_not_block_others() {
        let (a, _b, to_b, served) = pair().await;
        let held = tokio::spawn({
            let (a, to_b) = (a.clone(), to_b.clone());
            async move { a.call(2, &to_b, Bytes::from("hold"), TIMEOUT).await }
        });
        served.arrived.notified().await;
        let answer = a.call(2, &to_b, Bytes::from("quick"), TIMEOUT).await;
        assert_eq!(answer.unwrap(), "1:quick");
        assert!(!held.is_finished());
        served.gate.notify_one();
        assert_eq!(held.await.unwrap().unwrap(), "1:hold");
    }

    /// Opens `count` connections from `endpoint` to `to` that finish the QUIC handshake and
    /// then prove nothing; returns those the server did not refuse.
    async fn stalled_dials(
        endpoint: &quinn::Endpoint,
        to: SocketAddr,
        count: usize,
    ) -> Vec<quinn::Connection> {
        let dials = (0..count).map(|_| async move {
            let connecting = endpoint.connect(to, SERVER_NAME).ok()?;
            let handshake = Duration::from_millis(PEER_HANDSHAKE_TIMEOUT_MS);
            tokio::time::timeout(handshake, connecting).await.ok()?.ok()
        });
        futures::future::join_all(dials)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Used to be: one source could hold every served-link slot (for 5 s each time), and a
    /// real peer's dial was refused meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_source_cannot_hold_every_slot_and_stalled_dials_are_cut_at_the_deadline() {
        let (b, served) = start(2, "c", SECRET).await;
        let to_b = b.local_addr();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut flood = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        flood.set_default_client_config(client_config(provider, PeerLiveness::default()).unwrap());

        // At most PEER_HANDSHAKES_PER_SOURCE_MAX at once; more complete only if the first ones
        // were cut at their deadline while the flood was still dialing (a loaded machine).
        let stalled = stalled_dials(&flood, to_b, PEER_LINKS_SERVED_MAX + 1).await;
        assert!(
            (PEER_HANDSHAKES_PER_SOURCE_MAX..PEER_LINKS_SERVED_MAX).contains(&stalled.len()),
            "{} dials from one source completed",
            stalled.len()
        );

        // A real peer from another address is served meanwhile.
        let config = PeerConfig {
            bind: "127.0.0.2:0".parse().unwrap(),
            ..test_config(1, "c", SECRET)
        };
        let a = PeerNet::start(config, Arc::new(Recorder::default()))
            .await
            .unwrap();
        let answer = a
            .call(2, &to_b.to_string(), Bytes::from("hi"), TIMEOUT)
            .await;
        assert_eq!(answer.unwrap(), "1:hi");

        // The stalled dials are closed at the server's deadline, well before the dialer's.
        let cut_by =
            Duration::from_millis((PEER_ACCEPT_HANDSHAKE_MS + PEER_HANDSHAKE_TIMEOUT_MS) / 2);
        assert!(PEER_ACCEPT_HANDSHAKE_MS < cut_by.as_millis() as u64);
        for conn in &stalled {
            let closed = tokio::time::timeout(cut_by, conn.closed()).await;
            assert!(
                matches!(&closed, Ok(quinn::ConnectionError::ApplicationClosed(c))
                    if c.error_code == VarInt::from_u32(PEER_CLOSE_AUTH)
                        && String::from_utf8_lossy(&c.reason).contains("timed out")),
                "{closed:?}"
            );
        }
        // Their places are free again.
        let again = stalled_dials(&flood, to_b, PEER_HANDSHAKES_PER_SOURCE_MAX).await;
        assert!(again.len() >= PEER_HANDSHAKES_PER_SOURCE_MAX);
        assert_eq!(served.calls(), 1);
    }

    /// A failed proof frees its place at once: one source may fail any number of times in a
    /// row and is still heard (and refused for its proof, not for the limit).
    #[tokio::test]
    async fn failed_proofs_free_their_places_at_once() {
        let (a, _) = start(1, "c", b"another secret, also 32 bytes!!!").await;
        let (b, served) = start(2, "c", SECRET).await;
        let to_b = b.local_addr().to_string();
        for _ in 0..2 * PEER_HANDSHAKES_PER_SOURCE_MAX + 1 {
            let answer = a.call(2, &to_b, Bytes::from("x"), TIMEOUT).await;
            assert!(
                matches!(&answer, Err(PeerError::AuthFailed(e)) if e.contains("does not verify")),
                "{answer:?}"
            );
        }
        assert_eq!(served.calls(), 0);
    }

    #[test]
    fn split_frame_waits_for_whole_frames_and_refuses_bad_lengths() {
        let mut buf = BytesMut::new();
        for (id, body) in [(7u64, &b"abc"[..]), (8, b"")] {
            buf.put_u32((ID_BYTES + body.len()) as u32);
            buf.put_u64(id);
            buf.put_slice(body);
        }
        let mut partial = BytesMut::from(&buf[..14]);
        assert_eq!(split_frame(&mut partial), Ok(None));
        assert_eq!(split_frame(&mut buf), Ok(Some((7, Bytes::from("abc")))));
        assert_eq!(split_frame(&mut buf), Ok(Some((8, Bytes::new()))));
        assert_eq!(split_frame(&mut buf), Ok(None));
        for length in [0, ID_BYTES - 1, ID_BYTES + PEER_FRAME_BYTES_MAX + 1] {
            let mut bad = BytesMut::from(&(length as u32).to_be_bytes()[..]);
            assert!(split_frame(&mut bad).is_err(), "length {length}");
        }
    }
}
