//! Raft RPCs between replicas: the sending side ([`PeerNetworkFactory`], used by openraft) and
//! the receiving side ([`serve_peers`]).
//!
//! openraft creates one [`PeerConnection`] per replication stream (and per vote round); each
//! keeps one authenticated TCP connection open across its calls and reconnects after an error.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::auth::{ChannelKind, ClusterSecret};
use crate::channel::{Channel, ChannelError};
use crate::protocol::{PeerRequest, PeerResponse, MAX_PEER_FRAME_BYTES, MAX_SNAPSHOT_BYTES};
use crate::raft_types::{Raft, RaftNode, TypeConfig};

/// Most concurrent inbound peer connections per replica. Each holds at most one
/// [`MAX_PEER_FRAME_BYTES`] buffer. Replication and votes use a handful per peer.
pub const MAX_PEER_CONNECTIONS: usize = 64;
/// An inbound peer connection idle this long is closed.
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Connect timeout for a peer.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Creates [`PeerConnection`]s for openraft.
pub(crate) struct PeerNetworkFactory {
    pub(crate) secret: ClusterSecret,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: u64, node: &RaftNode) -> PeerConnection {
        PeerConnection {
            target,
            addr: node.raft_addr.clone(),
            secret: self.secret.clone(),
            channel: None,
        }
    }
}

/// One replication or vote stream to one replica.
pub(crate) struct PeerConnection {
    target: u64,
    addr: String,
    secret: ClusterSecret,
    channel: Option<Channel>,
}

enum CallError {
    /// Could not connect: openraft backs off.
    Unreachable(ChannelError),
    /// Failed mid-call.
    Network(ChannelError),
}

impl CallError {
    fn into_rpc<E: std::error::Error>(self) -> RPCError<u64, RaftNode, E> {
        match self {
            CallError::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
            CallError::Network(e) => RPCError::Network(NetworkError::new(&e)),
        }
    }
}

fn unexpected<E: std::error::Error>(what: &str, got: &PeerResponse) -> RPCError<u64, RaftNode, E> {
    let msg = match got {
        PeerResponse::Refused(m) => format!("{what} refused: {m}"),
        other => format!("{what}: unexpected response {other:?}"),
    };
    RPCError::Network(NetworkError::new(&std::io::Error::other(msg)))
}

impl PeerConnection {
    async fn call(&mut self, req: PeerRequest, ttl: Duration) -> Result<PeerResponse, CallError> {
        // A cached connection may have died with its peer: retry once on a fresh one.
        for attempt in 0..2 {
            let reused = self.channel.is_some();
            let ch = match &mut self.channel {
                Some(ch) => ch,
                None => {
                    let ch = Channel::connect(
                        self.addr.as_str(),
                        &self.secret,
                        ChannelKind::Raft,
                        MAX_PEER_FRAME_BYTES,
                        PEER_CONNECT_TIMEOUT.min(ttl),
                    )
                    .await
                    .map_err(CallError::Unreachable)?;
                    self.channel.insert(ch)
                }
            };
            match ch.call(&req, ttl).await {
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    self.channel = None;
                    let stale = reused && matches!(e, ChannelError::Io(_)) && attempt == 0;
                    if !stale {
                        return Err(CallError::Network(e));
                    }
                }
            }
        }
        Err(CallError::Network(ChannelError::Timeout))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, RaftNode, RaftError<u64>>> {
        match self
            .call(PeerRequest::AppendEntries(rpc), option.hard_ttl())
            .await
        {
            Ok(PeerResponse::AppendEntries(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(unexpected("append_entries", &other)),
            Err(e) => Err(e.into_rpc()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, RaftNode, RaftError<u64, InstallSnapshotError>>,
    > {
        match self
            .call(PeerRequest::InstallSnapshot(rpc), option.hard_ttl())
            .await
        {
            Ok(PeerResponse::InstallSnapshot(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(unexpected("install_snapshot", &other)),
            Err(e) => Err(e.into_rpc()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, RaftNode, RaftError<u64>>> {
        match self.call(PeerRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(PeerResponse::Vote(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(unexpected("vote", &other)),
            Err(e) => Err(e.into_rpc()),
        }
    }
}

/// Accepts peer connections until `shutdown` turns true.
pub(crate) async fn serve_peers(
    listener: TcpListener,
    raft: Raft,
    secret: ClusterSecret,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, from) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "raft accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::service::stopped(&mut shutdown) => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%from, limit = MAX_PEER_CONNECTIONS, "too many peer connections");
            continue;
        };
        let (raft, secret) = (raft.clone(), secret.clone());
        conns.spawn(async move {
            if let Err(e) = handle_peer(stream, raft, secret).await {
                tracing::debug!(%from, error = %e, "peer connection closed");
            }
            drop(permit);
        });
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
}

async fn handle_peer(
    stream: TcpStream,
    raft: Raft,
    secret: ClusterSecret,
) -> Result<(), ChannelError> {
    let peer = stream.peer_addr().ok();
    let mut ch =
        match Channel::accept(stream, &secret, ChannelKind::Raft, MAX_PEER_FRAME_BYTES).await {
            Ok(ch) => ch,
            Err(e) => {
                tracing::warn!(?peer, error = %e, "refused raft peer");
                return Err(e);
            }
        };
    loop {
        let req: PeerRequest = tokio::time::timeout(PEER_IDLE_TIMEOUT, ch.recv())
            .await
            .map_err(|_| ChannelError::Timeout)??;
        let resp = match req {
            PeerRequest::AppendEntries(r) => {
                PeerResponse::AppendEntries(raft.append_entries(r).await)
            }
            PeerRequest::Vote(r) => PeerResponse::Vote(raft.vote(r).await),
            PeerRequest::InstallSnapshot(r) => {
                let end = r.offset.saturating_add(r.data.len() as u64);
                if end > MAX_SNAPSHOT_BYTES {
                    PeerResponse::Refused(format!(
                        "snapshot larger than {MAX_SNAPSHOT_BYTES} bytes"
                    ))
                } else {
                    PeerResponse::InstallSnapshot(raft.install_snapshot(r).await)
                }
            }
        };
        ch.send(&resp).await?;
    }
}
