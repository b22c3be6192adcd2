//! One live connection of a [`crate::Client`] ([`Link`]: its writer and the requests waiting on
//! it) and how one is set up ([`establish`]: transport, `Hello`, redirects, `Welcome`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use ringpost_wire::{Auth, Body, Frame, Hello, Redirect, Welcome, PROTOCOL_VERSION};
use tokio::sync::{oneshot, Notify};

use super::config::ClientConfig;
use crate::connection::{Connection, Reader, Writer};
use crate::endpoint::Endpoint;
use crate::error::{ClientError, Result};

/// The request id of `Hello`. Request ids on a link are the client's counter; reusing 1 after the
/// handshake is harmless because `Hello` is answered before anything else is sent.
const HELLO_REQ: u32 = 1;

/// Unprompted frames kept if the node sends them before `Welcome` (it does not today: `Welcome`
/// comes first). Each is at most one frame; beyond this they are dropped (and redelivered).
pub(crate) const EARLY_FRAMES_MAX: usize = 64;

/// A write that cannot finish for this long means the node stopped reading (a partition, a
/// frozen process): the connection is dropped and reconnected. Writes normally complete at once
/// into the kernel's or quinn's send buffer.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where an answer to a request goes.
pub(crate) type Reply = oneshot::Sender<Result<Frame>>;

/// A connection that completed its handshake, as the [`super::Client`] uses it: the driver task
/// owns the reader; request callers share the writer.
pub(crate) struct Link {
    writer: tokio::sync::Mutex<Writer>,
    /// Requests waiting for an answer, by request id. At most `REQUESTS_IN_FLIGHT_MAX` (the
    /// client's request semaphore).
    pending: Mutex<Pending>,
    /// Woken when a write failed: the driver drops the link.
    kill: Notify,
    pub(crate) endpoint: Endpoint,
    pub(crate) welcome: Welcome,
    pub(crate) opened: Instant,
    dead: AtomicBool,
}

#[derive(Default)]
struct Pending {
    replies: HashMap<u32, Reply>,
    /// Set when the link is torn down; nothing is registered after that.
    closed: bool,
}

impl Link {
    pub(crate) fn new(writer: Writer, endpoint: Endpoint, welcome: Welcome) -> Link {
        Link {
            writer: tokio::sync::Mutex::new(writer),
            pending: Mutex::new(Pending::default()),
            kill: Notify::new(),
            endpoint,
            welcome,
            opened: Instant::now(),
            dead: AtomicBool::new(false),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Encodes and writes one frame. A write failure kills the link (the stream may hold part
    /// of a frame) and is reported as [`ClientError::Disconnected`].
    pub(crate) async fn write(&self, frame: &Frame) -> Result<()> {
        let bytes = frame.encode()?;
        if self.is_dead() {
            return Err(ClientError::Disconnected);
        }
        let mut writer = self.writer.lock().await;
        // Cancelling a write half way tears the writer (see `Writer`), which kills the link
        // below: a node that stopped reading does not keep callers waiting on the lock.
        let written = tokio::time::timeout(WRITE_TIMEOUT, writer.send_message(&bytes)).await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, endpoint = %self.endpoint, "write failed");
                self.kill();
                Err(ClientError::Disconnected)
            }
            Err(_) => {
                tracing::debug!(endpoint = %self.endpoint, "write timed out");
                self.kill();
                Err(ClientError::Disconnected)
            }
        }
    }

    /// Registers a request id; `Err(true)` if the id is taken (pick another), `Err(false)` if the
    /// link is going away.
    pub(crate) fn register(
        &self,
        req: u32,
    ) -> std::result::Result<oneshot::Receiver<Result<Frame>>, bool> {
        let mut pending = self.pending();
        if pending.closed {
            return Err(false);
        }
        if pending.replies.contains_key(&req) {
            return Err(true);
        }
        let (tx, rx) = oneshot::channel();
        pending.replies.insert(req, tx);
        Ok(rx)
    }

    /// Forgets a request (answered, timed out or cancelled).
    pub(crate) fn forget(&self, req: u32) {
        self.pending().replies.remove(&req);
    }

    /// Hands an answer to its request. `false` if nobody waits for it any more.
    pub(crate) fn complete(&self, frame: Frame) -> bool {
        let Some(reply) = self.pending().replies.remove(&frame.req) else {
            return false;
        };
        let result = match frame.body {
            Body::Error(error) => Err(ClientError::from_server(error)),
            _ => Ok(frame),
        };
        // The requester may have given up in the meantime; that is fine.
        let _ = reply.send(result);
        true
    }

    /// Tears the link down for requests: every waiting one fails with `Disconnected` (its reply
    /// sender is dropped) and no new one can register.
    pub(crate) fn fail_pending(&self) {
        self.dead.store(true, Ordering::Release);
        let replies = {
            let mut pending = self.pending();
            pending.closed = true;
            std::mem::take(&mut pending.replies)
        };
        drop(replies);
    }

    /// Asks the driver to drop this link.
    pub(crate) fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.kill.notify_one();
    }

    /// Resolves once [`Link::kill`] was called.
    pub(crate) async fn killed(&self) {
        self.kill.notified().await
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Answers a WebSocket ping; a failure kills the link.
    pub(crate) async fn pong(&self, payload: bytes::Bytes) {
        let result = self.writer.lock().await.pong(&payload).await;
        if result.is_err() {
            self.kill();
        }
    }

    /// Closes our side cleanly.
    pub(crate) async fn close(&self) {
        let _ = self.writer.lock().await.close().await;
    }
}

/// A handshake that completed: the connection's halves, its `Welcome` and where it is.
pub(crate) struct Established {
    pub(crate) reader: Reader,
    pub(crate) writer: Writer,
    pub(crate) welcome: Welcome,
    pub(crate) endpoint: Endpoint,
    /// Unprompted frames that arrived before `Welcome` (see [`EARLY_FRAMES_MAX`]).
    pub(crate) early: Vec<Frame>,
    /// `Redirect`s followed to get here.
    pub(crate) redirects: u32,
}

enum Greeting {
    Welcome(Box<Established>),
    Redirect(Redirect),
}

/// Connects to `url` and says `Hello` with `auth`, following up to `config.max_redirects`
/// redirects. Each hop is bounded by `config.connect_timeout`.
pub(crate) async fn establish(
    config: &ClientConfig,
    url: &str,
    auth: Option<&Auth>,
) -> Result<Established> {
    establish_at(config, Endpoint::parse(url)?, auth, config.max_redirects).await
}

/// Connects to `endpoint` and says `Hello` with `auth`, following up to `max_redirects`
/// redirects (0: a `Redirect` is [`ClientError::TooManyRedirects`]). Each hop is bounded by
/// `config.connect_timeout`.
pub(crate) async fn establish_at(
    config: &ClientConfig,
    mut endpoint: Endpoint,
    auth: Option<&Auth>,
    max_redirects: u32,
) -> Result<Established> {
    let mut redirects = 0;
    loop {
        let greeting = tokio::time::timeout(config.connect_timeout, hello(&endpoint, config, auth))
            .await
            .map_err(|_| ClientError::Timeout("connect"))??;
        match greeting {
            Greeting::Welcome(mut established) => {
                established.redirects = redirects;
                return Ok(*established);
            }
            Greeting::Redirect(redirect) => {
                let target = endpoint.redirect_target(&redirect)?;
                tracing::debug!(from = %endpoint, to = %target, epoch = redirect.epoch, "redirected");
                if redirects >= max_redirects {
                    return Err(ClientError::TooManyRedirects {
                        max: max_redirects,
                        last: target.to_string(),
                    });
                }
                redirects += 1;
                endpoint = target;
            }
        }
    }
}

async fn hello(
    endpoint: &Endpoint,
    config: &ClientConfig,
    auth: Option<&Auth>,
) -> Result<Greeting> {
    let mut conn = Connection::open(endpoint, &config.tls).await?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        auth: auth.cloned(),
        user_agent: config.user_agent.clone(),
    };
    conn.send(&Frame::new(HELLO_REQ, hello)).await?;
    let mut early = Vec::new();
    loop {
        let Some(frame) = conn.recv().await? else {
            let why = conn
                .peer_close()
                .map(|c| format!(" ({:?} {})", c.code, c.reason))
                .unwrap_or_default();
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("node closed the connection before answering Hello{why}"),
            )));
        };
        if frame.req != HELLO_REQ {
            match frame.body {
                Body::Error(e) if e.fatal => return Err(ClientError::from_server(e)),
                _ if early.len() < EARLY_FRAMES_MAX => early.push(frame),
                _ => tracing::debug!(
                    kind = frame.body.name(),
                    "dropping a frame sent before Welcome"
                ),
            }
            continue;
        }
        return match frame.body {
            Body::Welcome(welcome) => {
                let (reader, writer) = conn.into_parts();
                Ok(Greeting::Welcome(Box::new(Established {
                    reader,
                    writer,
                    welcome,
                    endpoint: endpoint.clone(),
                    early,
                    redirects: 0,
                })))
            }
            Body::Redirect(redirect) => {
                let _ = conn.close().await;
                Ok(Greeting::Redirect(redirect))
            }
            Body::Error(error) => Err(ClientError::from_server(error)),
            other => Err(ClientError::Protocol(format!(
                "expected Welcome or Redirect in answer to Hello, got {}",
                other.name()
            ))),
        };
    }
}
