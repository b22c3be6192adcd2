//! The admin listener: plain HTTP on its own port, `GET /metrics` (Prometheus text format: the
//! `ringpost_coord_*` metrics and the process metrics) and `GET /healthz` (the process is up).
//! Unauthenticated and read-only: it tells what the replica's Raft state and the member counts
//! are, nothing else (no addresses, no secrets); still, bind it to a private interface. A
//! deliberately tiny HTTP/1.1 responder like the node's: one request per connection, a bounded
//! head, bounded time, at most [`ADMIN_CONNECTIONS_MAX`] at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::metrics::MetricsProbe;
use crate::process_metrics::ProcessStats;

/// Largest request head read.
pub const ADMIN_HEAD_BYTES_MAX: usize = 4096;
/// Time a client has to send its request and read the answer.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; more wait in the kernel's accept queue. Each holds at
/// most one head buffer and one metrics body (a few KiB).
pub const ADMIN_CONNECTIONS_MAX: usize = 16;

/// Serves the admin port until `shutdown` turns true.
pub(crate) async fn serve_admin(
    listener: TcpListener,
    probe: MetricsProbe,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(ADMIN_CONNECTIONS_MAX));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = crate::service::stopped(&mut shutdown) => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::service::stopped(&mut shutdown) => break,
        };
        let probe = probe.clone();
        conns.spawn(async move {
            let _ = tokio::time::timeout(ADMIN_TIMEOUT, handle(stream, probe)).await;
            drop(permit);
        });
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
}

async fn handle(mut stream: TcpStream, probe: MetricsProbe) -> std::io::Result<()> {
    let Some((method, target)) = read_request_line(&mut stream).await? else {
        return Ok(());
    };
    let (method, target) = (method.as_str(), target.as_str());
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    match (method, path) {
        ("GET", "/metrics") => {
            let mut body = String::with_capacity(4096);
            probe.render(&mut body);
            ProcessStats::read().render(&mut body);
            respond(&mut stream, 200, "text/plain; version=0.0.4", &body).await
        }
        ("GET", "/healthz") => respond(&mut stream, 200, "text/plain", "ok\n").await,
        (_, "/metrics" | "/healthz") => {
            respond(&mut stream, 405, "text/plain", "method not allowed\n").await
        }
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "not found: try /metrics or /healthz\n",
            )
            .await
        }
    }
}

/// Reads a request head of at most [`ADMIN_HEAD_BYTES_MAX`] bytes and returns its method and
/// target; `None` when the peer closed first or the head was too large (answered 431). Shared
/// with the node's admin port.
pub async fn read_request_line(
    stream: &mut TcpStream,
) -> std::io::Result<Option<(String, String)>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > ADMIN_HEAD_BYTES_MAX {
            respond(stream, 431, "text/plain", "request head too large\n").await?;
            return Ok(None);
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("").to_owned();
    Ok(Some((method, target)))
}

/// Writes one whole answer and closes the sending side. Shared with the node's admin port.
pub async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
