//! The node under test: a dev node the bench starts itself (`--spawn-node BIN`), and the admin
//! port of any node (`/metrics`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Time a spawned dev node has to print its `ready` line (it opens RocksDB and may generate a
/// certificate first).
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest `/metrics` answer read, in bytes.
pub const METRICS_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Time allowed for one `/metrics` scrape.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// The per-device rate limit a spawned node gets: high enough never to bind, so the bench
/// measures the node, not its limiter (the default is 200 sends/s per device, burst 400).
pub const SPAWN_DEVICE_RATE: u32 = 1_000_000;

/// A dev node started by the bench; killed (SIGKILL) and reaped when dropped.
pub struct SpawnedNode {
    child: Child,
    /// The binary started.
    pub bin: PathBuf,
    pub pid: u32,
    pub ws: Option<String>,
    pub wss: Option<String>,
    pub quic: Option<String>,
    pub admin: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// Removed on drop: the bench made it.
    temp_dir: Option<PathBuf>,
}

impl SpawnedNode {
    /// Starts `bin dev` on 127.0.0.1 port 0 for every listener, with a per-device rate limit
    /// of [`SPAWN_DEVICE_RATE`]. `data_dir` `None` makes a temporary one, removed afterwards.
    /// The node's log goes to `DATA_DIR/node.log`.
    pub fn start(bin: &Path, data_dir: Option<&Path>) -> Result<SpawnedNode> {
        let (data_dir, temp_dir) = match data_dir {
            Some(d) => (d.to_path_buf(), None),
            None => {
                let d = std::env::temp_dir().join(format!(
                    "ringpost-bench-node-{}-{:08x}",
                    std::process::id(),
                    rand::random::<u32>()
                ));
                (d.clone(), Some(d))
            }
        };
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("create {}", data_dir.display()))?;
        let log = std::fs::File::create(data_dir.join("node.log"))?;
        let rate = SPAWN_DEVICE_RATE.to_string();
        let mut child = Command::new(bin)
            .arg("dev")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-ws", "127.0.0.1:0", "--listen-wss", "127.0.0.1:0"])
            .args([
                "--listen-quic",
                "127.0.0.1:0",
                "--listen-admin",
                "127.0.0.1:0",
                "--listen-media",
                "127.0.0.1:0",
            ])
            .args(["--device-rate", &rate, "--device-burst", &rate])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut node = SpawnedNode {
            child,
            bin: bin.to_path_buf(),
            pid,
            ws: None,
            wss: None,
            quic: None,
            admin: None,
            ca_file: None,
            data_dir: data_dir.clone(),
            temp_dir,
        };
        // Read the announcement lines on a thread so a silent node cannot hang us.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + NODE_START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => bail!(
                    "{} did not become ready within {NODE_START_TIMEOUT:?}; see {}",
                    bin.display(),
                    data_dir.join("node.log").display()
                ),
            };
            let word = |prefix: &str| line.strip_prefix(prefix).map(|s| s.trim().to_string());
            if let Some(u) = word("listening ws ") {
                node.ws = Some(u);
            } else if let Some(u) = word("listening wss ") {
                node.wss = Some(u);
            } else if let Some(u) = word("listening quic ") {
                node.quic = Some(u);
            } else if let Some(u) = word("listening admin ") {
                node.admin = Some(u);
            } else if let Some((_, path)) = line.split_once("(trust it in clients): ") {
                node.ca_file = Some(PathBuf::from(path.trim()));
            } else if line.starts_with("ringpost dev node ready") {
                break;
            }
        }
        Ok(node)
    }

    /// Where the dev node writes verification codes.
    pub fn codes_file(&self) -> PathBuf {
        self.data_dir.join("verification-codes.txt")
    }

    /// The URL of the listener for `transport`.
    pub fn url(&self, transport: crate::loadclient::Transport) -> Option<String> {
        use crate::loadclient::Transport;
        match transport {
            Transport::Ws => self.ws.clone(),
            Transport::Wss => self.wss.clone(),
            Transport::Quic => self.quic.clone(),
        }
    }
}

impl Drop for SpawnedNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = &self.temp_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// One scrape of `/metrics`: every sample, keyed by its name with labels as printed
/// (`ringpost_connections{transport="ws"}`).
pub type Samples = BTreeMap<String, f64>;

/// `GET /metrics` from an admin URL (`http://host:port`).
pub async fn scrape(admin: &str) -> Result<Samples> {
    let text = tokio::time::timeout(SCRAPE_TIMEOUT, http_get(admin, "/metrics"))
        .await
        .map_err(|_| anyhow!("{admin}/metrics timed out"))??;
    Ok(parse_metrics(&text))
}

/// The `host:port` of an `http://host:port[/]` URL.
pub fn admin_authority(admin: &str) -> Result<&str> {
    let rest = admin
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("admin URL {admin} must start with http://"))?;
    Ok(rest.trim_end_matches('/'))
}

async fn http_get(admin: &str, path: &str) -> Result<String> {
    let authority = admin_authority(admin)?;
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("connect {admin}"))?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut body = Vec::new();
    (&mut stream)
        .take(METRICS_BYTES_MAX as u64)
        .read_to_end(&mut body)
        .await?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("{admin}{path}: not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{admin}{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// Parses the Prometheus text format (samples only; comments skipped).
pub fn parse_metrics(text: &str) -> Samples {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.trim().to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Sum of every sample of metric `name` (all label sets).
pub fn sum_of(samples: &Samples, name: &str) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| *k == name || k.strip_prefix(name).is_some_and(|r| r.starts_with('{')))
        .map(|(_, v)| v)
        .sum()
}

/// A quantile of a Prometheus histogram (`name_bucket{le=..}` samples), as the upper bound of
/// the first bucket reaching it, in seconds; `None` without samples.
pub fn histogram_quantile(samples: &Samples, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(b, _)| *b)
}

/// The difference of two scrapes of the same histogram, as a fresh sample set (for quantiles
/// over a run rather than the node's lifetime).
pub fn delta(after: &Samples, before: &Samples) -> Samples {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_is_parsed() {
        let text = "# HELP x y\n# TYPE x gauge\nringpost_connections{transport=\"ws\"} 3\n\
                    ringpost_connections{transport=\"quic\"} 2\nringpost_messages_accepted_total 10\n\
                    h_bucket{le=\"0.001\"} 5\nh_bucket{le=\"0.01\"} 9\nh_bucket{le=\"+Inf\"} 10\n";
        let s = parse_metrics(text);
        assert_eq!(sum_of(&s, "ringpost_connections"), 5.0);
        assert_eq!(sum_of(&s, "ringpost_messages_accepted_total"), 10.0);
        assert_eq!(histogram_quantile(&s, "h", 0.5), Some(0.001));
        assert_eq!(histogram_quantile(&s, "h", 0.9), Some(0.01));
        assert_eq!(histogram_quantile(&s, "h", 0.99), Some(f64::INFINITY));
    }
}
