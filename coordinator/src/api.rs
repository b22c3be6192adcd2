//! The client listener: authenticated connections from nodes and `ctl`, one request at a time,
//! or a push stream of views after `watch`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::auth::{ChannelKind, ClusterSecret};
use crate::channel::{Channel, ChannelError};
use crate::protocol::{
    ClientRequest, ClientResponse, WireError, MAX_CLIENT_FRAME_BYTES, WATCH_KEEPALIVE,
};
use crate::service::{EncodedView, Service};
use crate::types::ClusterView;

/// A request connection idle this long is closed (watch connections carry keepalives instead).
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Accepts client connections until `shutdown` turns true. At most `max_connections` at once,
/// each holding at most one [`MAX_CLIENT_FRAME_BYTES`] buffer; more are closed on accept.
pub(crate) async fn serve_clients(
    listener: TcpListener,
    svc: Service,
    secret: ClusterSecret,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let metrics = svc.metrics.clone();
    metrics
        .client_connections_max
        .store(i64::try_from(max_connections).unwrap_or(i64::MAX), Relaxed);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, from) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "client accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::service::stopped(&mut shutdown) => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.client_refused.fetch_add(1, Relaxed);
            tracing::warn!(%from, limit = max_connections, "too many client connections");
            continue;
        };
        let (svc, secret, shutdown) = (svc.clone(), secret.clone(), shutdown.clone());
        let metrics = metrics.clone();
        metrics.client_connections.fetch_add(1, Relaxed);
        conns.spawn(async move {
            if let Err(e) = handle_client(stream, svc, secret, shutdown).await {
                tracing::debug!(%from, error = %e, "client connection closed");
            }
            metrics.client_connections.fetch_sub(1, Relaxed);
            drop(permit);
        });
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
}

fn reply<T>(r: Result<T, WireError>, ok: impl FnOnce(T) -> ClientResponse) -> ClientResponse {
    match r {
        Ok(v) => ok(v),
        Err(e) => ClientResponse::Error(e),
    }
}

async fn handle_client(
    stream: TcpStream,
    svc: Service,
    secret: ClusterSecret,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ChannelError> {
    let peer = stream.peer_addr().ok();
    let mut ch =
        match Channel::accept(stream, &secret, ChannelKind::Client, MAX_CLIENT_FRAME_BYTES).await {
            Ok(ch) => ch,
            Err(e) => {
                svc.metrics.client_handshakes_failed.fetch_add(1, Relaxed);
                tracing::warn!(?peer, error = %e, "refused client");
                return Err(e);
            }
        };
    loop {
        let req: ClientRequest = tokio::time::timeout(CLIENT_IDLE_TIMEOUT, ch.recv())
            .await
            .map_err(|_| ChannelError::Timeout)??;
        let view = |v: Arc<crate::types::ClusterView>| ClientResponse::View(Box::new((*v).clone()));
        let resp = match req {
            ClientRequest::Watch => return watch_loop(ch, svc, shutdown).await,
            ClientRequest::Describe => ClientResponse::Described(svc.me.clone()),
            ClientRequest::Status => ClientResponse::Status(Box::new(svc.status())),
            ClientRequest::View => reply(svc.read_view().await, view),
            ClientRequest::Join(info) => reply(svc.join(info).await, view),
            ClientRequest::Heartbeat { node_id } => {
                reply(svc.heartbeat(node_id).await, ClientResponse::Heartbeat)
            }
            ClientRequest::Activate { node_id } => reply(
                svc.write(crate::state::Command::Activate {
                    node_id,
                    at_ms: crate::service::now_ms(),
                })
                .await,
                view,
            ),
            ClientRequest::Drain { node_id } => reply(
                svc.write(crate::state::Command::Drain {
                    node_id,
                    at_ms: crate::service::now_ms(),
                })
                .await,
                view,
            ),
            ClientRequest::Remove { node_id } => reply(
                svc.write(crate::state::Command::Remove { node_id }).await,
                view,
            ),
            ClientRequest::SetReplication { factor } => {
                reply(svc.set_replication(factor).await, view)
            }
            ClientRequest::SetHeartbeat {
                interval_ms,
                miss_limit,
            } => {
                let cmd = crate::state::Command::SetHeartbeat {
                    interval_ms,
                    miss_limit,
                };
                reply(svc.write(cmd).await, view)
            }
            ClientRequest::ChangeIsr(change) => {
                reply(svc.write(crate::state::Command::Isr(change)).await, view)
            }
            ClientRequest::Init(spec) => reply(svc.init(spec).await, view),
        };
        ch.send(&resp).await?;
    }
}

/// `view`'s frame payload, serialized by the first watcher that pushes this revision and
/// shared by the rest: every node watches, and a view of 4096 shards and 72 nodes is 78 KB of
/// JSON, so serializing it per watcher cost the leader 72 clones and serializations a revision.
fn encoded_view(svc: &Service, view: &Arc<ClusterView>) -> Result<Arc<Vec<u8>>, ChannelError> {
    let mut pushed = svc
        .pushed_view
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(e) = pushed.as_ref().filter(|e| e.revision == view.revision) {
        return Ok(e.payload.clone());
    }
    let payload = Arc::new(crate::channel::encode(&ClientResponse::View(Box::new(
        (**view).clone(),
    )))?);
    *pushed = Some(EncodedView {
        revision: view.revision,
        payload: payload.clone(),
    });
    Ok(payload)
}

/// Pushes the current view, then every newer one, plus keepalives, until the client goes away
/// or the replica shuts down. A slow client skips intermediate views (each view is complete).
async fn watch_loop(
    ch: Channel,
    svc: Service,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ChannelError> {
    let Channel {
        mut reader,
        mut writer,
    } = ch;
    let mut views = svc.views.clone();
    // The client sends nothing after `watch`: any frame, EOF or error ends the stream. Pinned
    // once, so the select below never drops a half-read frame.
    let client_gone = reader.recv::<ClientRequest>();
    tokio::pin!(client_gone);
    let mut keepalive = tokio::time::interval(WATCH_KEEPALIVE);
    let mut current = views.borrow_and_update().clone();
    if let Some(v) = &current {
        writer.send_encoded(&encoded_view(&svc, v)?).await?;
    }
    loop {
        tokio::select! {
            changed = views.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let next = views.borrow_and_update().clone();
                if let Some(v) = &next {
                    if current.as_ref().map(|c| c.revision) != Some(v.revision) {
                        writer.send_encoded(&encoded_view(&svc, v)?).await?;
                    }
                }
                current = next;
            }
            _ = keepalive.tick() => writer.send(&ClientResponse::Keepalive).await?,
            _ = &mut client_gone => return Ok(()),
            _ = crate::service::stopped(&mut shutdown) => return Ok(()),
        }
    }
}
