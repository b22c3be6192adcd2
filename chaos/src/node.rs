//! A `ringpost-node dev` process on a host: started (optionally under libfaketime for clock skew
//! and libfiu for fsync failures), waited for until it prints that it is ready, killed, paused,
//! continued and restarted on the same data directory.
//!
//! The node is started as a process-group leader through `ip netns exec` (which execs, so the
//! group is the node); its stdout and stderr are appended to `<run-dir>/<name>.log` across
//! restarts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use tokio::process::Child;

use crate::hosts::{Host, Network};
use crate::sys::{self, ProcId};

/// Time a node may take from start to `ringpost dev node ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Time a node may take to exit after SIGTERM before it is killed.
pub const TERM_TIMEOUT: Duration = Duration::from_secs(15);

/// How often the log is read while waiting for the ready line.
const READY_POLL: Duration = Duration::from_millis(50);

/// Largest log read while waiting for the ready line, in bytes.
const LOG_SCAN_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// Fixed ports (each host has its own address, so they never clash).
pub const PORT_WS: u16 = 7700;
pub const PORT_WSS: u16 = 7743;
pub const PORT_QUIC: u16 = 7744;
pub const PORT_ADMIN: u16 = 7780;

/// libfiu's preload libraries (Debian `fiu-utils` / `libfiu0`).
pub const FIU_PRELOAD: &str = "/usr/lib/fiu/fiu_run_preload.so /usr/lib/fiu/fiu_posix_preload.so";

/// libfaketime (Debian `faketime` / `libfaketime`).
pub const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// How a node is run.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Sends per device per second, and burst (the workload stays far below).
    pub device_rate: u32,
    pub device_burst: u32,
    /// Under libfiu with its control FIFO at this prefix (`<prefix>-<pid>.in`).
    pub fiu_ctrl: Option<PathBuf>,
}

/// A running (or stopped) node.
#[derive(Debug)]
pub struct NodeProcess {
    pub spec: NodeSpec,
    pub host: Host,
    child: Option<Child>,
    id: Option<ProcId>,
    /// Run under libfaketime, reading the clock offset (`+7200`, `-86400`) from this file, which
    /// libfaketime re-reads every second: the clock moves while the node runs.
    pub faketime_file: Option<PathBuf>,
    pub starts: u32,
}

impl NodeProcess {
    pub fn new(spec: NodeSpec, host: Host) -> Self {
        NodeProcess {
            spec,
            host,
            child: None,
            id: None,
            faketime_file: None,
            starts: 0,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}:{PORT_WS}", self.host.ip)
    }

    pub fn quic_url(&self) -> String {
        format!("quic://{}:{PORT_QUIC}", self.host.ip)
    }

    pub fn codes_file(&self) -> PathBuf {
        self.spec.data_dir.join("verification-codes.txt")
    }

    pub fn ca_file(&self) -> PathBuf {
        self.spec.data_dir.join("tls").join("ca.pem")
    }

    pub fn pid(&self) -> Option<u32> {
        self.id.map(|id| id.pid)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts the node and waits until it is ready. Returns its pid.
    pub async fn start(&mut self, net: &Network) -> Result<u32> {
        if self.is_running() {
            bail!("{} is already running", self.spec.name);
        }
        std::fs::create_dir_all(&self.spec.data_dir)
            .with_context(|| format!("creating {}", self.spec.data_dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .with_context(|| format!("opening {}", self.spec.log.display()))?;
        let log_start = log.metadata().map_or(0, |m| m.len());
        let ip = self.host.ip;
        let argv: Vec<String> = [
            self.spec.bin.display().to_string(),
            "dev".into(),
            "--data-dir".into(),
            self.spec.data_dir.display().to_string(),
            "--listen-ws".into(),
            format!("{ip}:{PORT_WS}"),
            "--listen-wss".into(),
            format!("{ip}:{PORT_WSS}"),
            "--listen-quic".into(),
            format!("{ip}:{PORT_QUIC}"),
            "--listen-admin".into(),
            format!("{ip}:{PORT_ADMIN}"),
            "--device-rate".into(),
            self.spec.device_rate.to_string(),
            "--device-burst".into(),
            self.spec.device_burst.to_string(),
        ]
        .into_iter()
        .collect();
        let full = self.host.command(&argv);
        let mut cmd = tokio::process::Command::new(&full[0]);
        cmd.args(&full[1..])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let mut preload = Vec::new();
        if let Some(prefix) = &self.spec.fiu_ctrl {
            preload.push(FIU_PRELOAD.to_string());
            cmd.env("FIU_CTRL_FIFO", prefix).env("FIU_ENABLE", "");
        }
        if let Some(file) = &self.faketime_file {
            preload.push(FAKETIME_LIB.to_string());
            // Only the wall clock: the node's timers run on the monotonic clock.
            cmd.env("FAKETIME_TIMESTAMP_FILE", file)
                .env("FAKETIME_CACHE_DURATION", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        if !preload.is_empty() {
            cmd.env("LD_PRELOAD", preload.join(" "));
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.spec.bin.display()))?;
        let pid = child.id().context("the node exited at once")?;
        let id = ProcId::of(pid).context("the node exited at once")?;
        net.track_process(&self.spec.name, id);
        self.child = Some(child);
        self.id = Some(id);
        self.starts += 1;
        self.wait_ready(log_start).await?;
        Ok(pid)
    }

    async fn wait_ready(&mut self, log_start: u64) -> Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if log_has(&self.spec.log, log_start, "ringpost dev node ready") {
                return Ok(());
            }
            if !self.is_running() {
                bail!(
                    "{} exited before it was ready; see {}:\n{}",
                    self.spec.name,
                    self.spec.log.display(),
                    log_tail(&self.spec.log, log_start)
                );
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} not ready after {READY_TIMEOUT:?}; see {}",
                    self.spec.name,
                    self.spec.log.display()
                );
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// SIGKILL, and reap it.
    pub async fn kill9(&mut self, net: &Network) {
        if let Some(id) = self.id {
            id.signal_group(Signal::SIGCONT);
            id.signal_group(Signal::SIGKILL);
        }
        self.reap(net).await;
    }

    /// SIGTERM (graceful), SIGKILL after [`TERM_TIMEOUT`].
    pub async fn terminate(&mut self, net: &Network) {
        if let Some(id) = self.id {
            id.signal_group(Signal::SIGCONT);
            id.signal(Signal::SIGTERM);
            if let Some(child) = &mut self.child {
                if tokio::time::timeout(TERM_TIMEOUT, child.wait())
                    .await
                    .is_err()
                {
                    id.signal_group(Signal::SIGKILL);
                }
            }
        }
        self.reap(net).await;
    }

    async fn reap(&mut self, net: &Network) {
        if let Some(mut child) = self.child.take() {
            let _ = tokio::time::timeout(TERM_TIMEOUT, child.wait()).await;
        }
        if let Some(id) = self.id.take() {
            net.untrack_process(id);
        }
    }

    pub fn pause(&self) -> bool {
        self.id.is_some_and(|id| id.signal_group(Signal::SIGSTOP))
    }

    pub fn resume(&self) -> bool {
        self.id.is_some_and(|id| id.signal_group(Signal::SIGCONT))
    }

    /// Sends a libfiu control command (`enable_random name=...,probability=...`,
    /// `disable name=...`) to the running node.
    pub async fn fiu(&self, command: &str) -> Result<()> {
        let (Some(prefix), Some(pid)) = (&self.spec.fiu_ctrl, self.pid()) else {
            bail!("{} does not run under libfiu", self.spec.name);
        };
        let prefix = prefix.display().to_string();
        let pid = pid.to_string();
        sys::run("fiu-ctrl", &["-f", &prefix, "-c", command, &pid]).await?;
        Ok(())
    }
}

fn read_from(path: &Path, start: u64) -> String {
    use std::io::{Read, Seek};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    if file.seek(std::io::SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = file.take(LOG_SCAN_BYTES_MAX).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn log_has(path: &Path, start: u64, needle: &str) -> bool {
    read_from(path, start).contains(needle)
}

/// The last lines of a log since `start`, for error messages.
pub fn log_tail(path: &Path, start: u64) -> String {
    let text = read_from(path, start);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Writes a dev CA and a node certificate valid for `ip` into `data_dir/tls/` (where
/// `ringpost-node dev` looks first), because the node's own dev certificate names only
/// localhost, 127.0.0.1 and ::1, and QUIC needs TLS to the host's address (and the relay's).
pub fn write_dev_certificate(data_dir: &Path, ips: &[std::net::Ipv4Addr]) -> Result<()> {
    let dir = data_dir.join("tls");
    std::fs::create_dir_all(&dir)?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Ringpost chaos CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    names.extend(ips.iter().map(|ip| ip.to_string()));
    let mut params = rcgen::CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Ringpost chaos node");
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    Ok(())
}

/// Where the node binary is: `RINGPOST_NODE_BIN`, else next to this executable (the same
/// cargo target dir), else `$CARGO_TARGET_DIR/debug/ringpost-node`, else `target/debug`.
pub fn locate_node_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("--node-bin {}: no such file", p.display());
        }
        candidates.push(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("RINGPOST_NODE_BIN") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/debug/ringpost-chaos, or target/debug/deps/<test> for integration tests.
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join("ringpost-node"));
        }
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug").join("ringpost-node"));
    }
    candidates.push(PathBuf::from("target/debug/ringpost-node"));
    for candidate in candidates {
        if candidate.is_file() {
            return Ok(candidate.canonicalize().unwrap_or(candidate));
        }
        tried.push(candidate.display().to_string());
    }
    bail!(
        "ringpost-node not found (tried {}); build it with `cargo build -p ringpost-node` or set \
         RINGPOST_NODE_BIN",
        tried.join(", ")
    )
}
