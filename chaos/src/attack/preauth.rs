//! `preauth`: connections that never say `Hello`. Half stay silent TCP connections, half finish
//! the WebSocket upgrade and then stay silent; each is reopened as soon as the node closes it
//! (its handshake deadline) or refuses it (its per-source or total cap). Spread over several
//! source addresses, so that some sources are over the per-source cap and the total is well
//! past it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;

use super::{until_stopped, AttackSpec, Pace, Tally};

/// Connections held open at once, at most (each a socket on both sides).
pub const PREAUTH_CONNECTIONS_MAX: usize = 2_000;

/// New connections per second, at most.
pub const PREAUTH_OPENS_PER_S_MAX: u32 = 1_000;

/// Longest wait for the node's answer to an upgrade request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection closed this soon after it was opened counts as refused.
const REFUSED_WITHIN: Duration = Duration::from_millis(500);

/// Pause after a refusal before the task tries again (an attacker ignoring `Retry-After`,
/// without spinning).
const AFTER_REFUSAL: Duration = Duration::from_millis(500);

pub(super) async fn run(spec: Arc<AttackSpec>, tally: Tally) -> Result<()> {
    let target = ws_addr(&spec.ws_url)?;
    let pace = Arc::new(Mutex::new(Pace::new(PREAUTH_OPENS_PER_S_MAX)));
    let held = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..PREAUTH_CONNECTIONS_MAX {
        let source = spec.sources[i % spec.sources.len()];
        let upgrade = i % 2 == 0;
        let (spec, tally, pace, held) = (spec.clone(), tally.clone(), pace.clone(), held.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = hold_loop(source, target, upgrade, &tally, &pace, &held) => {}
                _ = until_stopped(&spec) => {}
            }
        });
    }
    tally.note(format!(
        "{} source addresses, {} connections each",
        spec.sources.len(),
        PREAUTH_CONNECTIONS_MAX / spec.sources.len()
    ));
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// The node's ws address from its URL.
pub(super) fn ws_addr(url: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .with_context(|| format!("{url}: not a ws:// URL"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .parse()
        .with_context(|| format!("{url}: not ws://ip:port"))
}

async fn connect_from(
    source: std::net::Ipv4Addr,
    target: SocketAddr,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(target).await
}

async fn hold_loop(
    source: std::net::Ipv4Addr,
    target: SocketAddr,
    upgrade: bool,
    tally: &Tally,
    pace: &Mutex<Pace>,
    held: &AtomicU64,
) {
    loop {
        pace.lock().await.tick().await;
        let opened = tokio::time::Instant::now();
        let mut stream = match connect_from(source, target).await {
            Ok(s) => s,
            Err(_) => {
                tally.add("connect errors", 1);
                tokio::time::sleep(AFTER_REFUSAL).await;
                continue;
            }
        };
        tally.add("connections opened", 1);
        let mut buf = [0u8; 1024];
        if upgrade {
            let request = format!(
                "GET / HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: \
                 Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ringpost.v1\r\n\r\n"
            );
            if stream.write_all(request.as_bytes()).await.is_err() {
                tally.add("refused (closed at once)", 1);
                tokio::time::sleep(AFTER_REFUSAL).await;
                continue;
            }
            let head = tokio::time::timeout(ANSWER_TIMEOUT, read_head(&mut stream, &mut buf)).await;
            match head {
                Ok(Some(head)) if head.starts_with("HTTP/1.1 101") => {
                    tally.add("upgraded, then silent", 1);
                }
                Ok(Some(head)) if head.starts_with("HTTP/1.1 503") => {
                    tally.add("refused (HTTP 503)", 1);
                    tokio::time::sleep(AFTER_REFUSAL).await;
                    continue;
                }
                Ok(Some(_)) => {
                    tally.add("other HTTP answers", 1);
                    continue;
                }
                Ok(None) => {
                    tally.add("refused (closed at once)", 1);
                    tokio::time::sleep(AFTER_REFUSAL).await;
                    continue;
                }
                Err(_) => {
                    tally.add("upgrade unanswered in 5 s", 1);
                    continue;
                }
            }
        }
        if !upgrade {
            // Over a cap the node answers (HTTP 503) or closes at once.
            if let Ok(read) = tokio::time::timeout(REFUSED_WITHIN, stream.read(&mut buf)).await {
                let name = match read {
                    Ok(n) if buf[..n].starts_with(b"HTTP/1.1 503") => "refused (HTTP 503)",
                    _ => "refused (closed at once)",
                };
                tally.add(name, 1);
                tokio::time::sleep(AFTER_REFUSAL).await;
                continue;
            }
        }
        // Silent until the node closes it.
        let now = held.fetch_add(1, Ordering::Relaxed) + 1;
        tally.max("most held open at once", now);
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        held.fetch_sub(1, Ordering::Relaxed);
        tally.add(
            if upgrade {
                "upgraded ones closed by the node"
            } else {
                "silent TCP ones closed by the node"
            },
            1,
        );
        tally.max("longest held (ms)", opened.elapsed().as_millis() as u64);
    }
}

/// Reads an HTTP response head (up to the blank line, or what fits in `buf`); `None` if the
/// node closed first.
async fn read_head(stream: &mut TcpStream, buf: &mut [u8]) -> Option<String> {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
        if buf[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    (filled > 0).then(|| String::from_utf8_lossy(&buf[..filled]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_addresses_parse() {
        assert_eq!(
            ws_addr("ws://127.0.0.1:7700").unwrap(),
            "127.0.0.1:7700".parse().unwrap()
        );
        assert!(ws_addr("quic://127.0.0.1:7744").is_err());
        assert!(ws_addr("ws://localhost:7700").is_err());
    }
}
