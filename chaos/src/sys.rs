//! Small system helpers: running commands with a time limit, privileges, installing missing
//! Debian packages, signalling process groups, and telling a process from a recycled pid.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Time one helper command (`ip`, `iptables`, `tc`, `fiu-ctrl`, `umount`) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Time `apt-get` may take to install one package (the package lists may need an update first).
pub const APT_TIMEOUT: Duration = Duration::from_secs(600);

/// Largest output kept from a helper command, in bytes.
pub const COMMAND_OUTPUT_BYTES_MAX: usize = 1024 * 1024;

/// Runs `program args`, waits at most [`COMMAND_TIMEOUT`], and returns its stdout. A non-zero
/// exit is an error carrying stderr.
pub async fn run(program: &str, args: &[&str]) -> Result<String> {
    run_timeout(program, args, COMMAND_TIMEOUT).await
}

pub async fn run_timeout(program: &str, args: &[&str], limit: Duration) -> Result<String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("`{program} {}` took longer than {limit:?}", args.join(" ")))?
        .with_context(|| format!("running `{program}`"))?;
    let mut stdout = output.stdout;
    stdout.truncate(COMMAND_OUTPUT_BYTES_MAX);
    if !output.status.success() {
        let mut stderr = output.stderr;
        stderr.truncate(COMMAND_OUTPUT_BYTES_MAX);
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// Runs a command whose failure does not matter (cleanup of something that may be gone).
pub async fn run_quiet(program: &str, args: &[&str]) -> bool {
    match run(program, args).await {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, "ignored");
            false
        }
    }
}

/// Whether `program` is on the PATH (or is a path that exists).
pub fn have(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The effective capability set of this process.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// Whether this process may create network namespaces, links and mounts: it needs
/// CAP_NET_ADMIN and CAP_SYS_ADMIN (`ip netns add` mounts the namespace file).
pub fn can_admin_network() -> bool {
    let caps = effective_caps();
    caps & (1 << CAP_NET_ADMIN) != 0 && caps & (1 << CAP_SYS_ADMIN) != 0
}

/// Whether we run as root (needed for apt-get).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Makes sure `program` exists, installing Debian package `package` with apt-get when it is
/// missing and we are root; otherwise an error that says what to install.
pub async fn ensure_tool(program: &str, package: &str) -> Result<()> {
    if have(program) {
        return Ok(());
    }
    if !is_root() || !have("apt-get") {
        bail!("`{program}` is missing: install it with `sudo apt-get install {package}`");
    }
    eprintln!("ringpost-chaos: `{program}` is missing; installing Debian package {package}");
    let install = ["install", "-y", "-qq", "--no-install-recommends", package];
    if run_apt(&install).await.is_err() {
        run_apt(&["update", "-qq"]).await?;
        run_apt(&install).await?;
    }
    if !have(program) {
        bail!("installed {package} but `{program}` is still missing");
    }
    Ok(())
}

async fn run_apt(args: &[&str]) -> Result<String> {
    let mut cmd = tokio::process::Command::new("apt-get");
    cmd.args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(APT_TIMEOUT, cmd.output())
        .await
        .context("apt-get took too long")??;
    if !output.status.success() {
        bail!(
            "apt-get {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A process we started, identified by pid and kernel start time (so a recycled pid is never
/// signalled by mistake).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcId {
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat` (clock ticks since boot).
    pub start: u64,
}

impl ProcId {
    /// The identity of a live pid now.
    pub fn of(pid: u32) -> Option<ProcId> {
        start_time(pid).map(|start| ProcId { pid, start })
    }

    /// Whether this very process is still there (not a later one with the same pid).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }

    /// Sends `signal` to the process group this process leads (we start every child as a
    /// group leader), if the process is still the one we started.
    pub fn signal_group(&self, signal: Signal) -> bool {
        if !self.alive() {
            return false;
        }
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        nix::sys::signal::killpg(Pid::from_raw(pid), signal).is_ok()
    }

    /// Sends `signal` to this process only.
    pub fn signal(&self, signal: Signal) -> bool {
        if !self.alive() {
            return false;
        }
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        nix::sys::signal::kill(Pid::from_raw(pid), signal).is_ok()
    }
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3; start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Sends `signal` to a bare pid (one found inside a namespace of ours by `ip netns pids`).
pub fn signal_pid(pid: u32, signal: Signal) -> bool {
    i32::try_from(pid).is_ok_and(|pid| nix::sys::signal::kill(Pid::from_raw(pid), signal).is_ok())
}

/// Whether a pid exists at all.
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_identity_is_alive_and_a_fake_one_is_not() {
        let me = ProcId::of(std::process::id()).unwrap();
        assert!(me.alive());
        let impostor = ProcId {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!impostor.alive());
        assert!(
            !impostor.signal(Signal::SIGCONT),
            "a recycled pid is never signalled"
        );
    }

    #[tokio::test]
    async fn commands_report_their_stderr() {
        let out = run("sh", &["-c", "echo hi"]).await.unwrap();
        assert_eq!(out.trim(), "hi");
        let err = run("sh", &["-c", "echo boom >&2; exit 3"])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        assert!(have("sh") && !have("no-such-program-ringpost"));
    }
}
