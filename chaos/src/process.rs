//! A supervised child process on a host (a node or a coordinator replica): started as the
//! leader of its own process group with its output appended to a log, waited for until the log
//! shows a line, stopped (SIGKILL, or SIGTERM then SIGKILL) and reaped.

use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use tokio::process::Child;

use crate::hosts::Network;
use crate::node::{log_has, log_tail};
use crate::sys::ProcId;

/// How often the log is read while waiting for a line.
const READY_POLL: Duration = Duration::from_millis(50);

/// The child (while we own it) and its process identity.
#[derive(Debug, Default)]
pub struct Supervised {
    child: Option<Child>,
    id: Option<ProcId>,
}

impl Supervised {
    /// Opens `path` for appending; returns it and its length, where this start's output begins.
    pub fn open_log(path: &Path) -> Result<(std::fs::File, u64)> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let start = log.metadata().map_or(0, |m| m.len());
        Ok((log, start))
    }

    /// Takes a freshly spawned child under supervision (tracked by `net` for cleanup under
    /// `name`). Returns its pid.
    pub fn adopt(&mut self, net: &Network, name: &str, child: Child) -> Result<u32> {
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        let id = ProcId::of(pid).with_context(|| format!("{name} exited at once"))?;
        net.track_process(name, id);
        self.child = Some(child);
        self.id = Some(id);
        Ok(pid)
    }

    pub fn id(&self) -> Option<ProcId> {
        self.id
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

    /// The exit status if the process exited without being stopped by us; `None` while it
    /// runs or once it was stopped on purpose.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits until the log (from `log_start`) contains `line`; fails if the process exits
    /// first or `timeout` passes.
    pub async fn wait_for_line(
        &mut self,
        name: &str,
        log: &Path,
        log_start: u64,
        line: &str,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if log_has(log, log_start, line) {
                return Ok(());
            }
            if !self.is_running() {
                bail!(
                    "{name} exited before printing `{line}`; see {}:\n{}",
                    log.display(),
                    log_tail(log, log_start)
                );
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{name} did not print `{line}` within {timeout:?}; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// SIGKILL the process group (resumed first, in case it was paused), and reap it.
    pub async fn kill9(&mut self, net: &Network, reap_timeout: Duration) {
        if let Some(id) = self.id {
            id.signal_group(Signal::SIGCONT);
            id.signal_group(Signal::SIGKILL);
        }
        self.reap(net, reap_timeout).await;
    }

    /// SIGTERM (graceful), SIGKILL to the group after `term_timeout`.
    pub async fn terminate(&mut self, net: &Network, term_timeout: Duration) {
        if let Some(id) = self.id {
            id.signal_group(Signal::SIGCONT);
            id.signal(Signal::SIGTERM);
            if let Some(child) = &mut self.child {
                if tokio::time::timeout(term_timeout, child.wait())
                    .await
                    .is_err()
                {
                    id.signal_group(Signal::SIGKILL);
                }
            }
        }
        self.reap(net, term_timeout).await;
    }

    /// Waits up to `limit` for the process to exit on its own; its exit status, or `None` if
    /// it is still running (or was not).
    pub async fn wait_exit(&mut self, net: &Network, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = tokio::time::timeout(limit, child.wait()).await.ok()?.ok()?;
        self.child = None;
        if let Some(id) = self.id.take() {
            net.untrack_process(id);
        }
        Some(status)
    }

    async fn reap(&mut self, net: &Network, timeout: Duration) {
        if let Some(mut child) = self.child.take() {
            let _ = tokio::time::timeout(timeout, child.wait()).await;
        }
        if let Some(id) = self.id.take() {
            net.untrack_process(id);
        }
    }
}
