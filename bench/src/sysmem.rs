//! What this host's `/proc` says about memory: a process's resident set, the kernel's socket
//! buffers and slab, the open-file limit, and the machine itself. Linux only; each reader
//! returns an error (or `None`) elsewhere rather than guessing.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

/// Bytes in one page of `/proc/net/sockstat` `mem` counts. The counters are in pages of
/// `PAGE_SIZE`, 4 KiB on x86-64 and on arm64's default kernels.
pub const PAGE_BYTES: u64 = 4096;

/// `VmRSS` of a process, in KiB.
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status (is process {pid} running?)"))?;
    status_field_kib(&status, "VmRSS:").ok_or_else(|| anyhow!("/proc/{pid}/status has no VmRSS"))
}

fn status_field_kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The kernel's socket accounting (`/proc/net/sockstat`) and slab size (`/proc/meminfo`).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct KernelMem {
    /// TCP sockets in use.
    pub tcp_inuse: u64,
    /// Pages charged to TCP socket buffers.
    pub tcp_mem_pages: u64,
    /// UDP sockets in use.
    pub udp_inuse: u64,
    /// Pages charged to UDP socket buffers.
    pub udp_mem_pages: u64,
    /// Kernel slab (reclaimable and not), KiB: socket structures, inodes, file objects live
    /// here.
    pub slab_kib: u64,
}

impl KernelMem {
    /// Reads the current figures.
    pub fn read() -> Result<KernelMem> {
        let sockstat =
            std::fs::read_to_string("/proc/net/sockstat").context("read /proc/net/sockstat")?;
        let meminfo = std::fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
        let mut m = parse_sockstat(&sockstat);
        m.slab_kib = status_field_kib(&meminfo, "Slab:").unwrap_or(0);
        Ok(m)
    }

    /// Socket buffer memory and slab together, in KiB.
    pub fn total_kib(&self) -> u64 {
        (self.tcp_mem_pages + self.udp_mem_pages) * PAGE_BYTES / 1024 + self.slab_kib
    }
}

/// Parses the `TCP:` and `UDP:` lines of `/proc/net/sockstat`.
pub fn parse_sockstat(text: &str) -> KernelMem {
    let mut m = KernelMem::default();
    for line in text.lines() {
        let Some((proto, rest)) = line.split_once(':') else {
            continue;
        };
        let fields: BTreeMap<&str, u64> = rest
            .split_whitespace()
            .collect::<Vec<_>>()
            .chunks(2)
            .filter_map(|kv| Some((kv[0], kv.get(1)?.parse().ok()?)))
            .collect();
        let get = |k: &str| fields.get(k).copied().unwrap_or(0);
        match proto {
            "TCP" => {
                m.tcp_inuse = get("inuse");
                m.tcp_mem_pages = get("mem");
            }
            "UDP" => {
                m.udp_inuse = get("inuse");
                m.udp_mem_pages = get("mem");
            }
            _ => {}
        }
    }
    m
}

/// Machine-wide drop counters that explain connect-time outliers: SYNs dropped because a
/// listener's accept queue was full (`TcpExt ListenOverflows`, `/proc/net/netstat`), and
/// datagrams dropped because a UDP socket's receive buffer was full (`Udp RcvbufErrors`,
/// `/proc/net/snmp`). Every process on the host counts here.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct DropCounters {
    pub listen_overflows: u64,
    pub udp_rcvbuf_errors: u64,
}

impl DropCounters {
    pub fn read() -> DropCounters {
        let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
        let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
        DropCounters {
            listen_overflows: proc_net_field(&netstat, "TcpExt:", "ListenOverflows").unwrap_or(0),
            udp_rcvbuf_errors: proc_net_field(&snmp, "Udp:", "RcvbufErrors").unwrap_or(0),
        }
    }

    /// Growth since `before`.
    pub fn since(&self, before: &DropCounters) -> DropCounters {
        DropCounters {
            listen_overflows: self
                .listen_overflows
                .saturating_sub(before.listen_overflows),
            udp_rcvbuf_errors: self
                .udp_rcvbuf_errors
                .saturating_sub(before.udp_rcvbuf_errors),
        }
    }
}

/// A field of a `/proc/net/{snmp,netstat}` table: a header line and a value line, both
/// starting with `prefix`.
pub fn proc_net_field(text: &str, prefix: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let header = lines.next()?;
    let values = lines.next()?;
    let i = header.split_whitespace().position(|h| h == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Datagrams dropped on full receive buffers by the UDP socket(s) bound to local `port`
/// (`/proc/net/udp{,6}`, last column): tells the node's QUIC socket apart from the load
/// generator's. `None` if no socket is bound there.
pub fn udp_drops_on_port(port: u16) -> Option<u64> {
    let mut found = None;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let Some((_, p)) = f.get(1).and_then(|l| l.rsplit_once(':')) else {
                continue;
            };
            if u16::from_str_radix(p, 16).ok() == Some(port) {
                let drops: u64 = f.last().and_then(|d| d.parse().ok()).unwrap_or(0);
                *found.get_or_insert(0) += drops;
            }
        }
    }
    found
}

/// Writes probed by [`fdatasync_probe`]: a fraction of a second on a quiet disk.
pub const FDATASYNC_PROBES: usize = 200;

/// The latency of a 4 KiB write followed by `fdatasync` in `dir`, [`FDATASYNC_PROBES`] times:
/// what one durable commit costs on this disk right now (other work on the machine moves it a
/// lot). Blocking: call it from `spawn_blocking`.
pub fn fdatasync_probe(dir: &std::path::Path) -> Result<crate::stats::Percentiles> {
    use std::io::{Seek, Write};
    let path = dir.join(format!(
        ".ringpost-bench-fsync-probe-{}",
        std::process::id()
    ));
    let mut f =
        std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let block = [0x5au8; 4096];
    let mut h = crate::stats::new_histogram();
    let result = (|| {
        for i in 0..FDATASYNC_PROBES {
            f.seek(std::io::SeekFrom::Start((i % 16 * 4096) as u64))?;
            let t = std::time::Instant::now();
            f.write_all(&block)?;
            f.sync_data()?;
            crate::stats::record_us(&mut h, t.elapsed().as_micros() as u64);
        }
        Ok::<_, std::io::Error>(())
    })();
    let _ = std::fs::remove_file(&path);
    result?;
    crate::stats::Percentiles::of(&h).ok_or_else(|| anyhow!("no fdatasync samples"))
}

/// The soft open-file limit of this process, from `/proc/self/limits`.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What the numbers were measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub mem_total_gib: f64,
    pub kernel: String,
    /// `/proc/loadavg` (1, 5 and 15 minutes) when the report was written, after the run:
    /// other work on the machine (builds, tests) competes with the node and the generator,
    /// and shows up here, mixed with the run's own load.
    pub loadavg: String,
    /// The 1-minute load average read right before the run started its load (after the
    /// node was up and the devices registered): what else the machine was doing.
    pub loadavg_1m_before_run: Option<f64>,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib = status_field_kib(&meminfo, "MemTotal:").unwrap_or(0);
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_total_gib: (mem_kib as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            loadavg: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
            loadavg_1m_before_run: None,
        }
    }
}

/// The 1-minute load average now, from `/proc/loadavg`.
pub fn loadavg_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The process listening on TCP `port` (on any local address), found through the socket's
/// inode in `/proc/net/tcp{,6}` and the `/proc/PID/fd` links. Needs permission to read other
/// processes' fd tables (same user, or root).
pub fn pid_listening_on(port: u16) -> Result<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        inodes.extend(listening_inodes(&text, port));
    }
    if inodes.is_empty() {
        return Err(anyhow!("no local process listens on TCP port {port}"));
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if wanted.iter().any(|w| link.as_os_str() == w.as_str()) {
                    return Ok(pid);
                }
            }
        }
    }
    Err(anyhow!(
        "port {port} is listened on, but its process is not visible here; pass --server-pid"
    ))
}

/// Inodes of sockets in state LISTEN (0A) on `port` in a `/proc/net/tcp` table.
pub fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            let (_, port_hex) = local.rsplit_once(':')?;
            let p = u16::from_str_radix(port_hex, 16).ok()?;
            (p == port && *f.get(3)? == "0A").then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_is_parsed() {
        let text = "sockets: used 183\nTCP: inuse 12 orphan 0 tw 3 alloc 14 mem 7\n\
                    UDP: inuse 4 mem 2\nUDPLITE: inuse 0\nRAW: inuse 0\n";
        let m = parse_sockstat(text);
        assert_eq!(
            (m.tcp_inuse, m.tcp_mem_pages, m.udp_inuse, m.udp_mem_pages),
            (12, 7, 4, 2)
        );
    }

    #[test]
    fn listening_inode_is_found() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0100007F:1E61 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n   \
            1: 0100007F:1E61 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0\n";
        assert_eq!(listening_inodes(table, 0x1E61), vec![4242]);
        assert!(listening_inodes(table, 80).is_empty());
    }

    #[test]
    fn proc_net_fields_are_found_by_name() {
        let text = "Udp: InDatagrams NoPorts InErrors RcvbufErrors\nUdp: 10 2 3 4\n\
                    UdpLite: InDatagrams RcvbufErrors\nUdpLite: 0 9\n";
        assert_eq!(proc_net_field(text, "Udp:", "RcvbufErrors"), Some(4));
        assert_eq!(proc_net_field(text, "Udp:", "Nope"), None);
        assert_eq!(proc_net_field(text, "Tcp:", "RcvbufErrors"), None);
    }

    #[test]
    fn own_rss_and_limit_are_readable() {
        assert!(vm_rss_kib(std::process::id()).unwrap() > 0);
        assert!(open_files_limit().unwrap() > 0);
        assert!(loadavg_1m().unwrap() >= 0.0);
    }
}
