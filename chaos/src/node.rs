//! A node process on a host: `ringpost-node dev` (one process with an embedded coordinator) or
//! `ringpost-node run`, one member of a cluster ([`NodeRole`]). Started (optionally under
//! libfaketime for clock skew and libfiu for fsync failures), waited for until it prints that it
//! is ready, killed, paused, continued, restarted on the same data directory, and waited for when
//! it leaves on its own (a drained member exits 0).
//!
//! The node is started as a process-group leader through `ip netns exec` (which execs, so the
//! group is the node); its stdout and stderr are appended to `<run-dir>/<name>.log` across
//! restarts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::hosts::{Host, Network};
use crate::process::Supervised;
use crate::sys;

/// Time a node may take from start to its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Time a node may take to exit after SIGTERM before it is killed.
pub const TERM_TIMEOUT: Duration = Duration::from_secs(15);

/// Largest log read while waiting for the ready line, in bytes.
const LOG_SCAN_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// Fixed ports (each host has its own address, so they never clash).
pub const PORT_WS: u16 = 7700;
pub const PORT_WSS: u16 = 7743;
pub const PORT_QUIC: u16 = 7744;
pub const PORT_ADMIN: u16 = 7780;
/// Node-to-node QUIC (UDP), cluster members only.
pub const PORT_PEER: u16 = 7790;

/// What kind of node process.
#[derive(Debug, Clone)]
pub enum NodeRole {
    /// `ringpost-node dev`: one process with an embedded single-member coordinator, ws, wss and
    /// QUIC (with the run's certificate), its codes file in its data dir.
    Dev,
    /// `ringpost-node run`: a member of a cluster of coordinator replicas and nodes, ws only.
    Member(MemberConfig),
}

/// How a cluster member finds and joins its cluster.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub node_id: u64,
    /// Client addresses of the coordinator replicas, comma-separated.
    pub coordinators: String,
    pub secret_file: PathBuf,
    pub shard_count: u16,
    /// One file for every node of the run: registration reads its codes from it.
    pub codes_file: PathBuf,
    /// What it tells clients to connect to (redirects), when not its own ws address: a relay
    /// in front of it.
    pub advertise_ws: Option<String>,
    /// What it tells other nodes to reach its peer link on, when not its own: a relay.
    pub advertise_peer: Option<String>,
    /// Run with `--replicate`.
    pub replicate: bool,
    /// Its failure zone (`--zone`), when the run gives its nodes zones.
    pub zone: Option<String>,
}

impl NodeRole {
    /// What the node prints on stdout once it serves.
    pub fn ready_line(&self) -> &'static str {
        match self {
            NodeRole::Dev => "ringpost dev node ready",
            NodeRole::Member(_) => "ringpost node ready",
        }
    }
}

/// libfiu's preload libraries (Debian `fiu-utils` / `libfiu0`).
pub const FIU_PRELOAD: &str = "/usr/lib/fiu/fiu_run_preload.so /usr/lib/fiu/fiu_posix_preload.so";

/// libfaketime (Debian `faketime` / `libfaketime`).
pub const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// How a node is run.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub role: NodeRole,
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Sends per device per second, and burst (the workload stays far below).
    pub device_rate: u32,
    pub device_burst: u32,
    /// Under libfiu with its control FIFO at this prefix (`<prefix>-<pid>.in`).
    pub fiu_ctrl: Option<PathBuf>,
    /// Extra names for a dev node's certificate (`dev --tls-name`): a relay's address, which
    /// clients connect to over TLS. The node adds its own listen addresses itself.
    pub tls_names: Vec<String>,
}

/// A running (or stopped) node.
#[derive(Debug)]
pub struct NodeProcess {
    pub spec: NodeSpec,
    pub host: Host,
    process: Supervised,
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
            process: Supervised::default(),
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

    /// A cluster member advertises `url` to clients instead of its own ws address.
    pub fn advertise_ws(&mut self, url: &str) {
        if let NodeRole::Member(member) = &mut self.spec.role {
            member.advertise_ws = Some(url.to_string());
        }
    }

    /// A cluster member advertises `addr` to its peers instead of its own peer address.
    pub fn advertise_peer(&mut self, addr: &str) {
        if let NodeRole::Member(member) = &mut self.spec.role {
            member.advertise_peer = Some(addr.to_string());
        }
    }

    pub fn codes_file(&self) -> PathBuf {
        match &self.spec.role {
            NodeRole::Dev => self.spec.data_dir.join("verification-codes.txt"),
            NodeRole::Member(member) => member.codes_file.clone(),
        }
    }

    /// The cluster node id (1 for a dev node, whose embedded cluster has only it).
    pub fn node_id(&self) -> u64 {
        match &self.spec.role {
            NodeRole::Dev => 1,
            NodeRole::Member(member) => member.node_id,
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.spec.data_dir.join("tls").join("ca.pem")
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The exit status if the process exited without being stopped by us (a crash, or a
    /// drained node before [`Self::wait_exit`] reaped it); `None` while it runs or once
    /// it was stopped on purpose.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.exited()
    }

    /// Starts the node and waits until it is ready. Returns its pid.
    pub async fn start(&mut self, net: &Network) -> Result<u32> {
        if self.is_running() {
            bail!("{} is already running", self.spec.name);
        }
        std::fs::create_dir_all(&self.spec.data_dir)
            .with_context(|| format!("creating {}", self.spec.data_dir.display()))?;
        let (log, log_start) = Supervised::open_log(&self.spec.log)?;
        let argv = self.argv();
        let full = self.host.command(&argv);
        let mut cmd = tokio::process::Command::new(&full[0]);
        cmd.args(&full[1..])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .env("RUST_LOG", node_log_filter())
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
        let pid = self.process.adopt(net, &self.spec.name, child)?;
        self.starts += 1;
        self.process
            .wait_for_line(
                &self.spec.name,
                &self.spec.log,
                log_start,
                self.spec.role.ready_line(),
                READY_TIMEOUT,
            )
            .await?;
        Ok(pid)
    }

    /// The command line: the binary and its arguments.
    fn argv(&self) -> Vec<String> {
        let ip = self.host.ip;
        let data_dir = self.spec.data_dir.display().to_string();
        let mut argv: Vec<String> = vec![self.spec.bin.display().to_string()];
        match &self.spec.role {
            NodeRole::Dev => argv.extend([
                "dev".into(),
                "--data-dir".into(),
                data_dir,
                "--listen-ws".into(),
                format!("{ip}:{PORT_WS}"),
                "--listen-wss".into(),
                format!("{ip}:{PORT_WSS}"),
                "--listen-quic".into(),
                format!("{ip}:{PORT_QUIC}"),
                "--listen-admin".into(),
                format!("{ip}:{PORT_ADMIN}"),
                // Not exercised by the workload; any free port, so dev nodes never collide.
                "--listen-media".into(),
                format!("{ip}:0"),
            ]),
            // The host's own address is what other hosts reach it on: advertise it for
            // redirects and peer links.
            NodeRole::Member(member) => argv.extend([
                "run".into(),
                "--data-dir".into(),
                data_dir,
                "--node-id".into(),
                member.node_id.to_string(),
                "--listen-ws".into(),
                format!("{ip}:{PORT_WS}"),
                "--advertise-ws".into(),
                member.advertise_ws.clone().unwrap_or_else(|| self.ws_url()),
                "--listen-admin".into(),
                format!("{ip}:{PORT_ADMIN}"),
                "--listen-peer".into(),
                format!("{ip}:{PORT_PEER}"),
                "--advertise-peer".into(),
                member
                    .advertise_peer
                    .clone()
                    .unwrap_or_else(|| format!("{ip}:{PORT_PEER}")),
                "--coordinator".into(),
                member.coordinators.clone(),
                "--cluster-secret-file".into(),
                member.secret_file.display().to_string(),
                "--shard-count".into(),
                member.shard_count.to_string(),
                "--codes-file".into(),
                member.codes_file.display().to_string(),
            ]),
        }
        if let NodeRole::Member(MemberConfig {
            replicate: true, ..
        }) = &self.spec.role
        {
            argv.push("--replicate".into());
        }
        if let NodeRole::Member(MemberConfig {
            zone: Some(zone), ..
        }) = &self.spec.role
        {
            argv.extend(["--zone".into(), zone.clone()]);
        }
        if matches!(self.spec.role, NodeRole::Dev) {
            for name in &self.spec.tls_names {
                argv.extend(["--tls-name".into(), name.clone()]);
            }
        }
        argv.extend([
            "--device-rate".into(),
            self.spec.device_rate.to_string(),
            "--device-burst".into(),
            self.spec.device_burst.to_string(),
        ]);
        argv
    }

    /// SIGKILL, and reap it.
    pub async fn kill9(&mut self, net: &Network) {
        self.process.kill9(net, TERM_TIMEOUT).await;
    }

    /// SIGTERM (graceful), SIGKILL after [`TERM_TIMEOUT`].
    pub async fn terminate(&mut self, net: &Network) {
        self.process.terminate(net, TERM_TIMEOUT).await;
    }

    /// Waits up to `limit` for the node to exit on its own (a drained member leaves); its exit
    /// status, or `None` if it is still running (or was not).
    pub async fn wait_exit(
        &mut self,
        net: &Network,
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        self.process.wait_exit(net, limit).await
    }

    pub fn pause(&self) -> bool {
        self.process
            .id()
            .is_some_and(|id| id.signal_group(Signal::SIGSTOP))
    }

    pub fn resume(&self) -> bool {
        self.process
            .id()
            .is_some_and(|id| id.signal_group(Signal::SIGCONT))
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

/// Whether the log has `needle` after byte `start`.
pub fn log_has(path: &Path, start: u64, needle: &str) -> bool {
    read_from(path, start).contains(needle)
}

/// The last lines of a log since `start`, for error messages.
pub fn log_tail(path: &Path, start: u64) -> String {
    let text = read_from(path, start);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The nodes' log filter: `RINGPOST_CHAOS_NODE_LOG` (a `RUST_LOG` filter, e.g.
/// `info,ringpost_node::outbox=debug` to follow one service through a failing seed), else `info`.
fn node_log_filter() -> String {
    std::env::var("RINGPOST_CHAOS_NODE_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty())
        .unwrap_or_else(|| "info".to_string())
}

/// Where the node binary is: `--node-bin`, `RINGPOST_NODE_BIN`, else next to this executable
/// (the same cargo target dir), else `$CARGO_TARGET_DIR/debug/ringpost-node`, else
/// `target/debug`.
pub fn locate_node_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    locate_binary("ringpost-node", "RINGPOST_NODE_BIN", "--node-bin", explicit)
}

/// Where the coordinator binary is, found the same way as the node's
/// (`--coordinator-bin`, `RINGPOST_COORDINATOR_BIN`, ...).
pub fn locate_coordinator_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    locate_binary(
        "ringpost-coordinator",
        "RINGPOST_COORDINATOR_BIN",
        "--coordinator-bin",
        explicit,
    )
}

fn locate_binary(name: &str, env: &str, flag: &str, explicit: Option<&Path>) -> Result<PathBuf> {
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("{flag} {}: no such file", p.display());
        }
        candidates.push(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(env) {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/debug/ringpost-chaos, or target/debug/deps/<test> for integration tests.
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join(name));
        }
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug").join(name));
    }
    candidates.push(PathBuf::from("target/debug").join(name));
    for candidate in candidates {
        if candidate.is_file() {
            return Ok(candidate.canonicalize().unwrap_or(candidate));
        }
        tried.push(candidate.display().to_string());
    }
    bail!(
        "{name} not found (tried {}); build it with `cargo build -p {name}` or set {env}",
        tried.join(", ")
    )
}
