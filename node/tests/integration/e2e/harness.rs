//! A real `ringpost-node dev` process on loopback ports picked by the kernel, killed on drop.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct TestNode {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub ws: String,
    pub wss: String,
    pub quic: String,
    pub admin: String,
    /// Arguments after the binary name; `{dir}` stands for the data directory.
    args: Vec<String>,
}

impl TestNode {
    pub fn start() -> TestNode {
        Self::start_with(&[])
    }

    /// Starts a dev node with extra `dev` flags.
    pub fn start_with(extra: &[&str]) -> TestNode {
        let mut args: Vec<String> = [
            "dev",
            "--data-dir",
            "{dir}",
            "--listen-ws",
            "127.0.0.1:0",
            "--listen-wss",
            "127.0.0.1:0",
            "--listen-quic",
            "127.0.0.1:0",
            "--listen-admin",
            "127.0.0.1:0",
            "--listen-media",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_args(args)
    }

    /// Starts `ringpost-node ARGS...` (`{dir}` in an argument is the test's data directory).
    pub fn start_args(args: Vec<String>) -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut node = TestNode {
            child: None,
            dir,
            ws: String::new(),
            wss: String::new(),
            quic: String::new(),
            admin: String::new(),
            args,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let dir = self.dir.path().to_string_lossy().to_string();
        let args: Vec<String> = self.args.iter().map(|a| a.replace("{dir}", &dir)).collect();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringpost-node"))
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RINGPOST_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ringpost-node");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Keep draining so the node never blocks on a full pipe.
                    continue;
                }
            }
        });
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("node did not print its addresses in time");
            let mut parts = line.split_whitespace();
            if parts.next() == Some("listening") {
                let (kind, addr) = (
                    parts.next().unwrap_or(""),
                    parts.next().unwrap_or("").to_string(),
                );
                match kind {
                    "ws" => self.ws = addr,
                    "wss" => self.wss = addr,
                    "quic" => self.quic = addr,
                    "admin" => self.admin = addr,
                    _ => {}
                }
            }
            if line.starts_with("ringpost dev node ready")
                || line.starts_with("ringpost node ready")
            {
                break;
            }
        }
    }

    pub fn url(&self, transport: &str) -> String {
        match transport {
            "ws" => self.ws.clone(),
            "wss" => self.wss.clone(),
            "quic" => self.quic.clone(),
            other => panic!("unknown transport {other}"),
        }
    }

    pub fn codes_file(&self) -> PathBuf {
        self.dir.path().join("verification-codes.txt")
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("tls").join("ca.pem")
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a graceful exit; returns whether it exited successfully.
    /// Blocking: call it from a blocking thread.
    #[allow(clippy::disallowed_methods)] // a plain thread polling a child process
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        signal(c.id(), "TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal ("STOP", "CONT", "TERM", ...) to the node process. "STOP" returns only
    /// once every thread of it has stopped: kill(2) wakes one thread to begin the group stop,
    /// and on busy cores the others may run on for a while (long enough to answer a request
    /// sent after the kill returned).
    #[allow(dead_code)] // used by the cluster tests
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            signal(c.id(), sig);
            match sig {
                "STOP" => wait_threads(c.id(), true),
                "CONT" => wait_threads(c.id(), false),
                _ => {}
            }
        }
    }

    /// Waits up to `timeout` for the process to exit on its own; `Some(success)` if it did.
    /// Blocking: call it from a blocking thread.
    #[allow(dead_code, clippy::disallowed_methods)] // cluster tests; polls a child process
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<bool> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let c = self.child.as_mut()?;
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status.success());
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the node again on the same data directory (new ports).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// GET on the admin port; returns (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let addr = self.admin.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).expect("admin connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").expect("admin write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("admin read");
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }
}

/// Sends `SIG{sig}` to `pid` with kill(2), checked: a `kill` process that failed to start would
/// go unnoticed, and the test would run against a node it thinks stopped.
fn signal(pid: u32, sig: &str) {
    use std::str::FromStr;
    let signal = nix::sys::signal::Signal::from_str(&format!("SIG{sig}"))
        .unwrap_or_else(|e| panic!("no signal SIG{sig}: {e}"));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid fits in i32"));
    match nix::sys::signal::kill(pid, signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {} // sent, or the process is gone already
        Err(e) => panic!("kill -{sig} {pid}: {e}"),
    }
}

/// Waits until every thread of process `pid` is stopped (`stopped`: state `T` in
/// `/proc/PID/task/*/stat`), or none is. A process still stopped a second after SIGCONT is sent
/// it again (and says so): one run in a few hundred of the presence test saw a node that never
/// answered after its SIGCONT.
#[allow(clippy::disallowed_methods)] // polls /proc from a test thread
fn wait_threads(pid: u32, stopped: bool) {
    let start = std::time::Instant::now();
    let mut resent = false;
    loop {
        let states: Vec<char> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks
                    .flatten()
                    .filter_map(|t| {
                        let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                        // "tid (comm) S ...": the state follows the last ')'.
                        stat.rsplit(')').next()?.trim_start().chars().next()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let halted = states.iter().filter(|&&s| s == 'T' || s == 't').count();
        let waiting_for = if stopped {
            states.len() - halted
        } else {
            halted
        };
        if waiting_for == 0 {
            return;
        }
        let waited = start.elapsed();
        if !stopped && !resent && waited > Duration::from_secs(1) {
            eprintln!("harness: {halted} threads of process {pid} still stopped 1 s after SIGCONT; sending it again");
            signal(pid, "CONT");
            resent = true;
        }
        assert!(
            waited < Duration::from_secs(10),
            "process {pid}: {waiting_for} of {} threads not {} 10 s after the signal",
            states.len(),
            if stopped { "stopped" } else { "running" }
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
    }
}
