//! The standard Prometheus process metrics (`process_open_fds`, `process_max_fds`,
//! `process_resident_memory_bytes`, `process_cpu_seconds_total`,
//! `process_start_time_seconds`), read from `/proc/self` at each scrape, as the official client
//! libraries export them. Both binaries render them: the coordinator on its admin port, and the
//! node (which links this crate) on its own. On a system without `/proc` each metric it cannot
//! read is left out.

use std::fmt::Write as _;

/// Clock ticks per second of the times in `/proc/<pid>/stat`: `USER_HZ`, which Linux fixes at
/// 100 for that interface on every architecture (Prometheus' own procfs reader assumes the
/// same), so no `sysconf` call is needed.
const USER_HZ: f64 = 100.0;

/// One reading of the process's resource use; `None` where it could not be read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    /// File descriptors open now.
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors (`RLIMIT_NOFILE`).
    pub max_fds: Option<u64>,
    /// Resident set size, bytes.
    pub resident_memory_bytes: Option<u64>,
    /// User plus system CPU time, seconds.
    pub cpu_seconds: Option<f64>,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads `/proc/self/{fd,limits,status,stat}` and `/proc/stat`.
    pub fn read() -> ProcessStats {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let stat = read("/proc/self/stat").and_then(|s| parse_stat(&s));
        let boot_time = read("/proc/stat").and_then(|s| parse_boot_time(&s));
        ProcessStats {
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                // The directory handle used to list it is one of the entries; not counted.
                .map(|d| (d.count() as u64).saturating_sub(1)),
            max_fds: read("/proc/self/limits").and_then(|s| parse_max_open_files(&s)),
            resident_memory_bytes: read("/proc/self/status").and_then(|s| parse_vm_rss(&s)),
            cpu_seconds: stat.map(|s| (s.utime_ticks + s.stime_ticks) as f64 / USER_HZ),
            start_time_seconds: stat
                .zip(boot_time)
                .map(|(s, boot)| boot as f64 + s.start_ticks as f64 / USER_HZ),
        }
    }

    /// Appends the metrics that were read, each with its HELP and TYPE lines.
    pub fn render(&self, out: &mut String) {
        let mut one = |name: &str, kind: &str, help: &str, value: Option<String>| {
            if let Some(v) = value {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
                );
            }
        };
        one(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            self.open_fds.map(|v| v.to_string()),
        );
        one(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors (the soft limit).",
            self.max_fds.map(|v| v.to_string()),
        );
        one(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            self.resident_memory_bytes.map(|v| v.to_string()),
        );
        one(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds.map(|v| v.to_string()),
        );
        one(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            self.start_time_seconds.map(|v| v.to_string()),
        );
    }
}

/// The fields of `/proc/<pid>/stat` used here, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    utime_ticks: u64,
    stime_ticks: u64,
    start_ticks: u64,
}

/// `/proc/<pid>/stat`: fields 14 (utime), 15 (stime) and 22 (starttime). The command name
/// (field 2) is in parentheses and may itself hold spaces and parentheses, so the fields are
/// counted from after its last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        start_ticks: field(22)?,
    })
}

/// `btime` of `/proc/stat`: boot time, seconds since the epoch.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The soft limit of the `Max open files` line of `/proc/<pid>/limits` (`None` if unlimited).
fn parse_max_open_files(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `VmRSS:` of `/proc/<pid>/status`, in bytes (the file gives kB).
fn parse_vm_rss(text: &str) -> Option<u64> {
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a ')' in it, as a process may name itself.
        let line = "4242 (ring post) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 75 0 0 20 0 9 0 123456 200000000 5000 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                utime_ticks: 250,
                stime_ticks: 75,
                start_ticks: 123456,
            })
        );
        assert_eq!(parse_stat("4242 (truncated) S 1 2"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn limits_status_and_boot_time() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95000                95000                processes \n\
                      Max open files            20000                1048576              files     \n";
        assert_eq!(parse_max_open_files(limits), Some(20000));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_max_open_files(unlimited), None);
        let status = "Name:\tringpost-node\nVmPeak:\t  300000 kB\nVmRSS:\t   12345 kB\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name:\tkthread\n"), None);
        let stat = "cpu  1 2 3 4\nintr 5\nbtime 1700000000\nprocesses 77\n";
        assert_eq!(parse_boot_time(stat), Some(1_700_000_000));
    }

    #[test]
    fn render_leaves_out_what_was_not_read() {
        let stats = ProcessStats {
            open_fds: Some(12),
            max_fds: None,
            resident_memory_bytes: Some(4096),
            cpu_seconds: Some(1.5),
            start_time_seconds: None,
        };
        let mut out = String::new();
        stats.render(&mut out);
        assert!(out.contains("\nprocess_open_fds 12\n"), "{out}");
        assert!(
            out.contains("# TYPE process_cpu_seconds_total counter\n"),
            "{out}"
        );
        assert!(out.contains("\nprocess_cpu_seconds_total 1.5\n"), "{out}");
        assert!(
            out.contains("\nprocess_resident_memory_bytes 4096\n"),
            "{out}"
        );
        assert!(!out.contains("process_max_fds"), "{out}");
        assert!(!out.contains("process_start_time_seconds"), "{out}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reads_whole() {
        let s = ProcessStats::read();
        let (open, max) = (s.open_fds.unwrap(), s.max_fds.unwrap());
        assert!(open > 0 && open <= max, "{s:?}");
        assert!(s.resident_memory_bytes.unwrap() > 1 << 20, "{s:?}");
        assert!(s.cpu_seconds.unwrap() >= 0.0, "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = s.start_time_seconds.unwrap();
        assert!(start <= now + 1.0 && start > now - 86400.0 * 365.0, "{s:?}");
    }
}
