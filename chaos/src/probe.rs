//! The probe (`ringpost-chaos probe`): runs on a client host during an abuse run, samples the
//! node's resident memory (`VmRSS` of its pid, read from `/proc`, which every network namespace
//! shares) and asks its admin `/readyz`, until the stop file appears; then writes a
//! [`ProbeSummary`]. On a client host because in namespace mode only the run's hosts reach the
//! node's admin port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How often VmRSS is read.
pub const RSS_EVERY: Duration = Duration::from_millis(200);

/// How often `/readyz` is asked.
pub const READYZ_EVERY: Duration = Duration::from_millis(1_000);

/// Time one `/readyz` answer may take.
const READYZ_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest `/readyz` answer read, in bytes.
const READYZ_BYTES_MAX: usize = 4096;

/// What the probe saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeSummary {
    pub rss_samples: u64,
    pub rss_first_kib: u64,
    pub rss_peak_kib: u64,
    pub readyz_ok: u64,
    pub readyz_failed: u64,
    /// The first failure (status line or error), if any.
    pub readyz_first_failure: Option<String>,
}

impl ProbeSummary {
    pub fn read(path: &Path) -> Result<ProbeSummary> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// `VmRSS` of a process in KiB; `None` if it is gone.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Samples until `stop_file` exists, then writes the summary to `out`.
pub async fn run(pid: u32, admin: SocketAddr, stop_file: PathBuf, out: PathBuf) -> Result<()> {
    let mut summary = ProbeSummary::default();
    let mut rss = tokio::time::interval(RSS_EVERY);
    let mut ready = tokio::time::interval(READYZ_EVERY);
    while !stop_file.exists() {
        tokio::select! {
            _ = rss.tick() => {
                if let Some(kib) = vm_rss_kib(pid) {
                    if summary.rss_samples == 0 {
                        summary.rss_first_kib = kib;
                    }
                    summary.rss_samples += 1;
                    summary.rss_peak_kib = summary.rss_peak_kib.max(kib);
                }
            }
            _ = ready.tick() => {
                match tokio::time::timeout(READYZ_TIMEOUT, readyz(admin)).await {
                    Ok(Ok(())) => summary.readyz_ok += 1,
                    Ok(Err(e)) => fail(&mut summary, format!("{e:#}")),
                    Err(_) => fail(&mut summary, format!("no answer in {READYZ_TIMEOUT:?}")),
                }
            }
        }
    }
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&summary)?)?;
    std::fs::rename(&tmp, &out)?;
    Ok(())
}

fn fail(summary: &mut ProbeSummary, why: String) {
    summary.readyz_failed += 1;
    summary.readyz_first_failure.get_or_insert(why);
}

async fn readyz(admin: SocketAddr) -> Result<()> {
    let mut stream = tokio::net::TcpStream::connect(admin).await?;
    stream
        .write_all(format!("GET /readyz HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    while answer.len() < READYZ_BYTES_MAX {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        anyhow::bail!("/readyz answered {status:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_from_a_status_file() {
        let status = "Name:\tringpost-node\nVmPeak:\t  900 kB\nVmRSS:\t  123456 kB\nThreads: 4\n";
        assert_eq!(parse_vm_rss(status), Some(123_456));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert!(vm_rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }
}
