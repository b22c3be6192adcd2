//! Admin HTTP on its own port: `/metrics` (Prometheus text format), `/healthz` (the process is
//! up), `/readyz` (accepting clients: an active member holding a lease that has taken over every
//! shard it owns, whose storage takes writes, not shutting down). A deliberately tiny
//! HTTP/1.1 responder: one request per connection, bounded head, bounded time.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::server::Server;

/// Largest request head the admin port reads.
pub const ADMIN_HEAD_BYTES_MAX: usize = 4096;
/// Time a client has to send its request.
pub const ADMIN_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; more wait in the kernel's accept queue.
pub const ADMIN_CONNECTIONS_MAX: usize = 64;

/// Serves the admin port until the listener fails.
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS_MAX));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(ADMIN_READ_TIMEOUT, handle(stream, server)).await;
            drop(permit);
        });
    }
}

async fn handle(mut stream: TcpStream, server: Arc<Server>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > ADMIN_HEAD_BYTES_MAX {
            return respond(&mut stream, 431, "text/plain", "request head too large\n").await;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (method, path) {
        ("GET", "/metrics") => {
            server.metrics.inbox_entries.store(
                server.inbox.entries_total() as i64,
                std::sync::atomic::Ordering::Relaxed,
            );
            server.metrics.storage_failing_seconds.store(
                server
                    .inbox
                    .storage_failing()
                    .map_or(0, |(for_, _)| for_.as_secs().max(1) as i64),
                std::sync::atomic::Ordering::Relaxed,
            );
            server.metrics.unauthenticated.store(
                server.admission.unauthenticated() as i64,
                std::sync::atomic::Ordering::Relaxed,
            );
            if let Some(peers) = server.peers.get() {
                server
                    .metrics
                    .peer_dials_refused
                    .store(peers.refused_dials(), std::sync::atomic::Ordering::Relaxed);
            }
            let body = server.metrics.render();
            respond(&mut stream, 200, "text/plain; version=0.0.4", &body).await
        }
        ("GET", "/healthz") => respond(&mut stream, 200, "text/plain", "ok\n").await,
        ("GET", "/readyz") => {
            if server.is_shutting_down() {
                respond(&mut stream, 503, "text/plain", "shutting down\n").await
            } else if let Some(why) = server.not_ready_reason() {
                respond(&mut stream, 503, "text/plain", &format!("{why}\n")).await
            } else {
                respond(&mut stream, 200, "text/plain", "ready\n").await
            }
        }
        (_, "/metrics" | "/healthz" | "/readyz") => {
            respond(&mut stream, 405, "text/plain", "method not allowed\n").await
        }
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "not found: try /metrics, /healthz or /readyz\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
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
