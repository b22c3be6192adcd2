//! What the end-to-end chaos tests share: the binaries, and a guard that stops a chaos run
//! (and cleans up after it) however the test ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub fn chaos_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ringpost-chaos"))
}

/// A binary of the workspace: `$env` if set, else next to `ringpost-chaos` in this test's
/// target dir (`make test` builds every binary first with `cargo build --workspace --bins`).
pub fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    // target/debug/ringpost-chaos -> target/debug/<name>
    let path = chaos_bin().with_file_name(name);
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p {name}` (make test does) or set {env}",
        path.display()
    );
    path
}

pub fn node_bin() -> PathBuf {
    workspace_bin("ringpost-node", "RINGPOST_NODE_BIN")
}

#[allow(dead_code)] // the cluster test uses it, the smoke test does not
pub fn coordinator_bin() -> PathBuf {
    workspace_bin("ringpost-coordinator", "RINGPOST_COORDINATOR_BIN")
}

/// `ringpost-chaos run SCENARIO --seed S --duration D --loopback` with a cluster's binaries,
/// its JSON report at `report` and its run dir at `run_dir`.
#[allow(dead_code)] // the cluster tests use it, the smoke test does not
pub fn loopback_cluster_run(
    scenario: &str,
    seed: &str,
    duration: &str,
    report: &Path,
    run_dir: &Path,
) -> Command {
    let mut cmd = Command::new(chaos_bin());
    cmd.args(["run", scenario, "--seed", seed, "--duration", duration])
        .arg("--loopback")
        .arg("--json")
        .arg(report)
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--node-bin")
        .arg(node_bin())
        .arg("--coordinator-bin")
        .arg(coordinator_bin());
    cmd
}

/// Starts a `ringpost-chaos run ...` command (stdin closed), waits up to `limit` for it, and
/// reads the JSON report it wrote to `report_path`. Returns the guard (the run's pid names its
/// state), the report and its pretty text, once the run exited successfully.
pub fn run_with_report(
    mut cmd: Command,
    what: &str,
    report_path: &Path,
    limit: Duration,
) -> (RunGuard, serde_json::Value, String) {
    let child = cmd.stdin(Stdio::null()).spawn().unwrap();
    let mut guard = RunGuard { child };
    let status = guard
        .wait(limit)
        .unwrap_or_else(|| panic!("{what} took longer than {limit:?}"));
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(report_path).unwrap_or_else(|e| panic!("no report ({e}); exit {status}")),
    )
    .unwrap();
    let shown = serde_json::to_string_pretty(&report).unwrap();
    assert!(status.success(), "exit {status}: {shown}");
    (guard, report, shown)
}

/// Owns the chaos process: whatever happens to the test, the process is stopped (SIGTERM, which
/// makes it tear its hosts down; SIGKILL if it does not exit) and `cleanup` runs after it.
pub struct RunGuard {
    pub child: Child,
}

impl RunGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the exit, polling (bounded by `limit`).
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            #[allow(clippy::disallowed_methods)] // a test thread, no runtime to block
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let pid = Pid::from_raw(self.child.id() as i32);
            let _ = kill(pid, Signal::SIGTERM);
            if self.wait(Duration::from_secs(20)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // Removes anything a killed run left (only runs whose owner is gone).
        let _ = Command::new(chaos_bin())
            .arg("cleanup")
            .stdout(Stdio::null())
            .status();
    }
}
