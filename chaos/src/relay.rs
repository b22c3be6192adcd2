//! A relay placed between hosts, because this kernel has no netem: TCP (for WebSocket) and UDP
//! (for QUIC), with delay, jitter, and for UDP loss, duplication and reordering, all drawn from a
//! seeded RNG.
//!
//! It runs as `ringpost-chaos relay` on its own host. The orchestrator steers it by rewriting a
//! small JSON control file ([`Impairment`]); the relay reads it every [`CONTROL_POLL`]. TCP keeps
//! byte order (a stream cannot be reordered without breaking it), so on TCP the jitter only
//! varies the delay of each chunk, and `reset` (a new value) aborts every open connection with
//! an RST, as a middlebox dropping its state would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

/// How often the control file is read.
pub const CONTROL_POLL: Duration = Duration::from_millis(100);

/// TCP connections relayed at once; more are refused.
pub const TCP_CONNECTIONS_MAX: usize = 4096;

/// Bytes read at once per TCP direction.
const TCP_CHUNK_BYTES: usize = 16 * 1024;

/// Chunks waiting for their delivery time per TCP direction: at most this many times
/// [`TCP_CHUNK_BYTES`] (4 MiB) buffered per direction; a full queue stops reading (backpressure).
const TCP_QUEUE_CHUNKS: usize = 256;

/// UDP flows (client addresses) tracked at once; datagrams from more are dropped.
pub const UDP_FLOWS_MAX: usize = 1024;

/// A UDP flow idle this long is forgotten.
pub const UDP_FLOW_IDLE: Duration = Duration::from_secs(120);

/// Datagrams held for delay at once across the relay; more are dropped (a full queue).
pub const UDP_IN_FLIGHT_MAX: usize = 16 * 1024;

/// Largest datagram relayed.
const UDP_DATAGRAM_BYTES_MAX: usize = 65_535;

/// Time allowed to connect upstream.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest delay or jitter accepted, in milliseconds.
pub const DELAY_MS_MAX: u32 = 60_000;

/// What the relay does to traffic now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Impairment {
    /// Added to every chunk or datagram.
    pub delay_ms: u32,
    /// Plus a uniform random 0..=jitter_ms.
    pub jitter_ms: u32,
    /// UDP: fraction of datagrams dropped.
    pub loss: f64,
    /// UDP: fraction of datagrams sent twice.
    pub duplicate: f64,
    /// UDP: fraction of datagrams held back an extra `reorder_ms`, so later ones overtake them.
    pub reorder: f64,
    pub reorder_ms: u32,
    /// Forward nothing (TCP data waits, UDP datagrams are dropped).
    pub blackhole: bool,
    /// Changing this number aborts every open TCP connection.
    pub reset: u64,
}

impl Impairment {
    fn clamp(mut self) -> Self {
        self.delay_ms = self.delay_ms.min(DELAY_MS_MAX);
        self.jitter_ms = self.jitter_ms.min(DELAY_MS_MAX);
        self.reorder_ms = self.reorder_ms.min(DELAY_MS_MAX);
        self.loss = self.loss.clamp(0.0, 1.0);
        self.duplicate = self.duplicate.clamp(0.0, 1.0);
        self.reorder = self.reorder.clamp(0.0, 1.0);
        self
    }

    fn delay(&self, rng: &Mutex<ChaCha8Rng>) -> Duration {
        let jitter = if self.jitter_ms > 0 {
            lock(rng).gen_range(0..=self.jitter_ms)
        } else {
            0
        };
        Duration::from_millis(u64::from(self.delay_ms + jitter))
    }
}

/// Writes a control file atomically.
pub fn write_control(path: &Path, impairment: &Impairment) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(impairment)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// One forwarding rule: listen here, send there.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

impl std::str::FromStr for Route {
    type Err = String;
    /// `LISTEN=TARGET`, e.g. `198.18.0.12:7700=198.18.0.10:7700`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (listen, target) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected LISTEN=TARGET"))?;
        Ok(Route {
            listen: listen.parse().map_err(|e| format!("{listen:?}: {e}"))?,
            target: target.parse().map_err(|e| format!("{target:?}: {e}"))?,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the relay until `stop` resolves.
pub async fn run(
    tcp: Vec<Route>,
    udp: Vec<Route>,
    control: PathBuf,
    seed: u64,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (tx, rx) = watch::channel(read_control(&control).unwrap_or_default());
    let rng = Arc::new(Mutex::new(crate::seeded(seed, "relay")));
    let mut tasks = tokio::task::JoinSet::new();
    for route in tcp {
        let listener = TcpListener::bind(route.listen)
            .await
            .with_context(|| format!("binding tcp {}", route.listen))?;
        tasks.spawn(tcp_accept(listener, route.target, rx.clone(), rng.clone()));
    }
    for route in udp {
        let socket = UdpSocket::bind(route.listen)
            .await
            .with_context(|| format!("binding udp {}", route.listen))?;
        tasks.spawn(udp_relay(
            Arc::new(socket),
            route.target,
            rx.clone(),
            rng.clone(),
        ));
    }
    println!("relay ready");
    let poll = async {
        loop {
            tokio::time::sleep(CONTROL_POLL).await;
            if let Some(imp) = read_control(&control) {
                tx.send_if_modified(|cur| {
                    let changed = *cur != imp;
                    *cur = imp.clone();
                    changed
                });
            }
        }
    };
    tokio::select! {
        _ = poll => {}
        _ = stop => {}
    }
    tasks.abort_all();
    Ok(())
}

fn read_control(path: &Path) -> Option<Impairment> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice::<Impairment>(&bytes)
        .ok()
        .map(Impairment::clamp)
}

async fn tcp_accept(
    listener: TcpListener,
    target: SocketAddr,
    control: watch::Receiver<Impairment>,
    rng: Arc<Mutex<ChaCha8Rng>>,
) {
    let slots = Arc::new(Semaphore::new(TCP_CONNECTIONS_MAX));
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(client);
            continue;
        };
        let control = control.clone();
        let rng = rng.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tcp_connection(client, target, control, rng).await;
        });
    }
}

async fn tcp_connection(
    client: TcpStream,
    target: SocketAddr,
    mut control: watch::Receiver<Impairment>,
    rng: Arc<Mutex<ChaCha8Rng>>,
) {
    let upstream =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            _ => {
                let _ = client.set_zero_linger();
                return;
            }
        };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let _ = client.set_zero_linger();
    let _ = upstream.set_zero_linger();
    let reset_at_start = control.borrow().reset;
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = tcp_pump(cr, uw, control.clone(), rng.clone());
    let down = tcp_pump(ur, cw, control.clone(), rng);
    let reset = async {
        loop {
            if control.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if control.borrow().reset != reset_at_start {
                return;
            }
        }
    };
    // Either direction ending (or a reset) ends the connection; dropping the halves with zero
    // linger sends RSTs both ways.
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = reset => {}
    }
}

async fn tcp_pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    control: watch::Receiver<Impairment>,
    rng: Arc<Mutex<ChaCha8Rng>>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(TCP_QUEUE_CHUNKS);
    let hold = control.clone();
    let reader = async move {
        let mut last_due = Instant::now();
        loop {
            let mut buf = vec![0u8; TCP_CHUNK_BYTES];
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.truncate(n);
            let imp = control.borrow().clone();
            // Never before an earlier chunk: a stream keeps its order.
            let due = (Instant::now() + imp.delay(&rng)).max(last_due);
            last_due = due;
            if tx.send((due, buf)).await.is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, buf)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            // A blackhole holds the data (TCP would retransmit it until the path heals).
            while hold.borrow().blackhole {
                tokio::time::sleep(CONTROL_POLL).await;
            }
            if to.write_all(&buf).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// A UDP flow: one upstream socket per client address.
struct Flow {
    upstream: Arc<UdpSocket>,
    last_seen: Instant,
    task: tokio::task::JoinHandle<()>,
}

async fn udp_relay(
    listen: Arc<UdpSocket>,
    target: SocketAddr,
    control: watch::Receiver<Impairment>,
    rng: Arc<Mutex<ChaCha8Rng>>,
) {
    let in_flight = Arc::new(Semaphore::new(UDP_IN_FLIGHT_MAX));
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; UDP_DATAGRAM_BYTES_MAX];
    let mut last_sweep = Instant::now();
    loop {
        let Ok((n, client)) = listen.recv_from(&mut buf).await else {
            continue;
        };
        if last_sweep.elapsed() > Duration::from_secs(5) {
            last_sweep = Instant::now();
            flows.retain(|_, f| {
                let keep = f.last_seen.elapsed() < UDP_FLOW_IDLE;
                if !keep {
                    f.task.abort();
                }
                keep
            });
        }
        if !flows.contains_key(&client) {
            if flows.len() >= UDP_FLOWS_MAX {
                continue;
            }
            let bind: SocketAddr = match target {
                SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
                SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
            };
            let Ok(upstream) = UdpSocket::bind(bind).await else {
                continue;
            };
            if upstream.connect(target).await.is_err() {
                continue;
            }
            let upstream = Arc::new(upstream);
            // Evidence of what passes the relay (a flow lives as long as its client's socket).
            println!("udp flow {client} -> {target}");
            // Answers from upstream go back to this client.
            let task = tokio::spawn(udp_return(
                upstream.clone(),
                listen.clone(),
                client,
                control.clone(),
                rng.clone(),
                in_flight.clone(),
            ));
            flows.insert(
                client,
                Flow {
                    upstream,
                    last_seen: Instant::now(),
                    task,
                },
            );
        }
        let Some(flow) = flows.get_mut(&client) else {
            continue;
        };
        flow.last_seen = Instant::now();
        let upstream = flow.upstream.clone();
        let datagram = buf[..n].to_vec();
        forward_datagram(datagram, &control, &rng, &in_flight, move |d| {
            let upstream = upstream.clone();
            async move {
                let _ = upstream.send(&d).await;
            }
        });
    }
}

async fn udp_return(
    upstream: Arc<UdpSocket>,
    listen: Arc<UdpSocket>,
    client: SocketAddr,
    control: watch::Receiver<Impairment>,
    rng: Arc<Mutex<ChaCha8Rng>>,
    in_flight: Arc<Semaphore>,
) {
    let mut buf = vec![0u8; UDP_DATAGRAM_BYTES_MAX];
    loop {
        let Ok(n) = upstream.recv(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let listen = listen.clone();
        forward_datagram(buf[..n].to_vec(), &control, &rng, &in_flight, move |d| {
            let listen = listen.clone();
            async move {
                let _ = listen.send_to(&d, client).await;
            }
        });
    }
}

/// Applies the impairment to one datagram: drop, delay (with jitter and reordering), duplicate.
fn forward_datagram<F, Fut>(
    datagram: Vec<u8>,
    control: &watch::Receiver<Impairment>,
    rng: &Mutex<ChaCha8Rng>,
    in_flight: &Arc<Semaphore>,
    send: F,
) where
    F: Fn(Vec<u8>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let imp = control.borrow().clone();
    if imp.blackhole {
        return;
    }
    let (drop_it, copies, extra) = {
        let mut rng = lock(rng);
        let drop_it = imp.loss > 0.0 && rng.gen_bool(imp.loss);
        let copies = if imp.duplicate > 0.0 && rng.gen_bool(imp.duplicate) {
            2
        } else {
            1
        };
        let extra = if imp.reorder > 0.0 && rng.gen_bool(imp.reorder) {
            imp.reorder_ms
        } else {
            0
        };
        (drop_it, copies, extra)
    };
    if drop_it {
        return;
    }
    let delay = imp.delay(rng) + Duration::from_millis(u64::from(extra));
    if delay.is_zero() && copies == 1 {
        // The common case without impairment: no task, no permit.
        let fut = send(datagram);
        tokio::spawn(fut);
        return;
    }
    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        tokio::time::sleep(delay).await;
        for _ in 1..copies {
            send(datagram.clone()).await;
        }
        send(datagram).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_is_relayed_in_order_with_delay_and_reset_aborts() {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("relay.json");
        write_control(
            &control,
            &Impairment {
                delay_ms: 30,
                jitter_ms: 20,
                ..Impairment::default()
            },
        )
        .unwrap();
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        // Find a free port for the relay.
        let listen = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let route = Route { listen, target };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(run(vec![route], vec![], control.clone(), 7, async {
            let _ = stop_rx.await;
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut s = TcpStream::connect(listen).await.unwrap();
        let started = Instant::now();
        let mut expected = Vec::new();
        for i in 0..50u8 {
            s.write_all(&[i; 100]).await.unwrap();
            expected.extend_from_slice(&[i; 100]);
        }
        let mut got = vec![0u8; expected.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected, "order kept");
        assert!(
            started.elapsed() >= Duration::from_millis(60),
            "delayed both ways"
        );

        write_control(
            &control,
            &Impairment {
                reset: 1,
                ..Impairment::default()
            },
        )
        .unwrap();
        tokio::time::sleep(CONTROL_POLL * 4).await;
        let mut one = [0u8; 1];
        let ended =
            s.write_all(&[1]).await.is_err() || matches!(s.read(&mut one).await, Ok(0) | Err(_));
        assert!(ended, "reset aborts open connections");
        let _ = stop_tx.send(());
        relay.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn udp_loss_and_duplication_follow_the_control() {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("relay.json");
        write_control(
            &control,
            &Impairment {
                duplicate: 1.0,
                ..Impairment::default()
            },
        )
        .unwrap();
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap();
        let listen = UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(run(
            vec![],
            vec![Route { listen, target }],
            control.clone(),
            7,
            async {
                let _ = stop_rx.await;
            },
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"hello", listen).await.unwrap();
        let mut buf = [0u8; 16];
        for _ in 0..2 {
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(2), server.recv_from(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
            assert_eq!(&buf[..n], b"hello");
            // The answer goes back through the relay.
            server.send_to(b"back", from).await.unwrap();
        }
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"back");

        write_control(
            &control,
            &Impairment {
                loss: 1.0,
                ..Impairment::default()
            },
        )
        .unwrap();
        tokio::time::sleep(CONTROL_POLL * 4).await;
        // Drain the duplicated answers, then nothing gets through.
        while tokio::time::timeout(Duration::from_millis(200), client.recv_from(&mut buf))
            .await
            .is_ok()
        {}
        client.send_to(b"lost", listen).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), server.recv_from(&mut buf))
                .await
                .is_err(),
            "loss 1.0 drops everything"
        );
        let _ = stop_tx.send(());
        relay.await.unwrap().unwrap();
    }
}
