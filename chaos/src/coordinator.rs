//! A `ringpost-coordinator run` replica on a host: started (and restarted on the same data
//! directory), waited for until it prints its client address, killed.
//!
//! Like a node, a replica is started as a process-group leader through `ip netns exec` (which
//! execs, so the group is the replica); its stdout and stderr are appended to
//! `<run-dir>/<name>.log` across restarts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::hosts::{Host, Network};
use crate::process::Supervised;

/// Fixed ports (each host has its own address, so they never clash).
pub const PORT_RAFT: u16 = 7400;
pub const PORT_CLIENT: u16 = 7401;
pub const PORT_ADMIN: u16 = 7402;

/// Time a replica may take from start to `listening client`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Time a replica may take to exit after SIGTERM before it is killed.
pub const TERM_TIMEOUT: Duration = Duration::from_secs(10);

/// Raft election timeout bounds: short, so a killed leader is replaced within about a second
/// (the nodes' heartbeats tolerate 2 s of silence, see [`crate::cluster::HEARTBEAT_MS`]).
pub const ELECTION_TIMEOUT_MIN_MS: u32 = 300;
pub const ELECTION_TIMEOUT_MAX_MS: u32 = 600;

/// How a replica is run.
#[derive(Debug, Clone)]
pub struct CoordinatorSpec {
    /// Its host's name: `coord1`.
    pub name: String,
    pub replica_id: u64,
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub secret_file: PathBuf,
}

/// A running (or stopped) replica.
#[derive(Debug)]
pub struct CoordinatorProcess {
    pub spec: CoordinatorSpec,
    pub host: Host,
    process: Supervised,
    pub starts: u32,
}

impl CoordinatorProcess {
    pub fn new(spec: CoordinatorSpec, host: Host) -> Self {
        CoordinatorProcess {
            spec,
            host,
            process: Supervised::default(),
            starts: 0,
        }
    }

    /// The address nodes and `ctl` reach it on.
    pub fn client_addr(&self) -> String {
        format!("{}:{PORT_CLIENT}", self.host.ip)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The exit status if the process exited without being stopped by us (a crash); `None`
    /// while it runs or once it was stopped on purpose.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.exited()
    }

    /// Starts the replica and waits until it listens for clients. Returns its pid.
    pub async fn start(&mut self, net: &Network) -> Result<u32> {
        if self.is_running() {
            bail!("{} is already running", self.spec.name);
        }
        std::fs::create_dir_all(&self.spec.data_dir)
            .with_context(|| format!("creating {}", self.spec.data_dir.display()))?;
        let (log, log_start) = Supervised::open_log(&self.spec.log)?;
        let ip = self.host.ip;
        let argv: Vec<String> = vec![
            self.spec.bin.display().to_string(),
            "run".into(),
            "--replica-id".into(),
            self.spec.replica_id.to_string(),
            "--data-dir".into(),
            self.spec.data_dir.display().to_string(),
            "--raft-listen".into(),
            format!("{ip}:{PORT_RAFT}"),
            "--client-listen".into(),
            format!("{ip}:{PORT_CLIENT}"),
            "--admin-listen".into(),
            format!("{ip}:{PORT_ADMIN}"),
            "--secret-file".into(),
            self.spec.secret_file.display().to_string(),
            "--election-timeout-min-ms".into(),
            ELECTION_TIMEOUT_MIN_MS.to_string(),
            "--election-timeout-max-ms".into(),
            ELECTION_TIMEOUT_MAX_MS.to_string(),
        ];
        let full = self.host.command(&argv);
        let child = tokio::process::Command::new(&full[0])
            .args(&full[1..])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            // Raft's own chatter only when it matters.
            .env("RINGPOST_COORD_LOG", "info,openraft=warn")
            .env("NO_COLOR", "1")
            .spawn()
            .with_context(|| format!("starting {}", self.spec.bin.display()))?;
        let pid = self.process.adopt(net, &self.spec.name, child)?;
        self.starts += 1;
        self.process
            .wait_for_line(
                &self.spec.name,
                &self.spec.log,
                log_start,
                "listening client",
                READY_TIMEOUT,
            )
            .await?;
        Ok(pid)
    }

    /// SIGKILL, and reap it.
    pub async fn kill9(&mut self, net: &Network) {
        self.process.kill9(net, TERM_TIMEOUT).await;
    }

    /// SIGTERM, SIGKILL after [`TERM_TIMEOUT`].
    pub async fn terminate(&mut self, net: &Network) {
        self.process.terminate(net, TERM_TIMEOUT).await;
    }
}
