//! Hosts: one network namespace per host, each with a veth pair whose other end sits on a bridge
//! of the run; addresses from the benchmarking range 198.18.0.0/15, and no host-side address on
//! the bridge (nothing on the machine's own network can reach the hosts, nor they it).
//!
//! Everything a run creates is named with the run id `rpc-<pid>` (namespaces `rpc-<pid>-<host>`;
//! links, limited to 15 bytes, `rpc<pid>b` for the bridge and `rpc<pid>h<i>`/`rpc<pid>n<i>` for
//! the veth ends) and recorded in a state file under [`state_dir`] *before* it is created, so
//! `ringpost-chaos cleanup` removes what a crashed run left behind.
//!
//! Without CAP_NET_ADMIN and CAP_SYS_ADMIN there are no namespaces: [`Mode::Loopback`] gives
//! every host its own 127.x.y.z address on the machine's loopback, and only process faults work.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::sys::{self, ProcId};

/// Where a user's runs keep their files: `/tmp/ringpost-chaos` for root, else
/// `/tmp/ringpost-chaos-<uid>` (so users never share a directory).
pub fn base_dir() -> PathBuf {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        PathBuf::from("/tmp/ringpost-chaos")
    } else {
        PathBuf::from(format!("/tmp/ringpost-chaos-{uid}"))
    }
}

/// Where state files live: one per run, `<run-id>.json`.
pub fn state_dir() -> PathBuf {
    base_dir().join("state")
}

/// Prefix of everything a run creates.
pub const RUN_PREFIX: &str = "rpc";

/// Hosts in one run (the veth names have two digits for the index).
pub const HOSTS_MAX: usize = 32;

/// How hosts are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Network namespaces on a bridge: every fault is available.
    Netns,
    /// 127.x.y.z addresses on the loopback, no privileges: process faults only.
    Loopback,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Netns => "netns",
            Mode::Loopback => "loopback",
        }
    }

    /// The mode this process can run: namespaces when privileged (unless `force_loopback`).
    pub fn detect(force_loopback: bool) -> (Mode, Option<String>) {
        if force_loopback {
            return (Mode::Loopback, Some("loopback mode requested".into()));
        }
        if sys::can_admin_network() && sys::have("ip") {
            return (Mode::Netns, None);
        }
        let why = if sys::have("ip") {
            "no CAP_NET_ADMIN/CAP_SYS_ADMIN (run as root for network namespaces)"
        } else {
            "`ip` (iproute2) is not installed"
        };
        (
            Mode::Loopback,
            Some(format!(
                "{why}: falling back to loopback-only mode (127.x.y.z addresses, process faults \
                 only; network and storage faults are skipped)"
            )),
        )
    }
}

/// What a run created, as recorded for cleanup.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub run_id: String,
    /// The `ringpost-chaos` process that owns the run.
    pub owner: Option<ProcId>,
    pub run_dir: PathBuf,
    pub netns: Vec<String>,
    /// Links in the root namespace (the bridge and the host ends of the veths).
    pub links: Vec<String>,
    /// tmpfs mount points.
    pub mounts: Vec<PathBuf>,
    /// Processes started (each a process-group leader).
    pub processes: Vec<(String, ProcId)>,
}

/// The state file of a run, rewritten (atomically) at each change.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    state: std::sync::Mutex<State>,
}

impl StateFile {
    pub fn create(run_id: &str, run_dir: &Path) -> Result<StateFile> {
        let dir = state_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = StateFile {
            path: dir.join(format!("{run_id}.json")),
            state: std::sync::Mutex::new(State {
                run_id: run_id.to_string(),
                owner: ProcId::of(std::process::id()),
                run_dir: run_dir.to_path_buf(),
                ..State::default()
            }),
        };
        file.save()?;
        Ok(file)
    }

    pub fn update(&self, change: impl FnOnce(&mut State)) -> Result<()> {
        change(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        self.save()
    }

    pub fn snapshot(&self) -> State {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn save(&self) -> Result<()> {
        let text = serde_json::to_vec_pretty(&self.snapshot())?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One host of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    /// Its name in the run: `node1`, `client1`, `relay`.
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its namespace (netns mode).
    pub netns: Option<String>,
    /// Its interface inside the namespace.
    pub ifname: Option<String>,
}

impl Host {
    /// The command line that runs `argv` on this host.
    pub fn command(&self, argv: &[String]) -> Vec<String> {
        match &self.netns {
            Some(ns) => ["ip", "netns", "exec", ns.as_str()]
                .iter()
                .map(|s| s.to_string())
                .chain(argv.iter().cloned())
                .collect(),
            None => argv.to_vec(),
        }
    }

    /// Runs a helper command on this host (netns mode only: there is nothing to run it in
    /// otherwise).
    pub async fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let Some(ns) = &self.netns else {
            bail!("`{program}` on host {} needs network namespaces", self.name);
        };
        let mut full = vec!["netns", "exec", ns.as_str(), program];
        full.extend_from_slice(args);
        sys::run("ip", &full).await
    }
}

/// The hosts of one run and what ties them together.
#[derive(Debug)]
pub struct Network {
    pub run_id: String,
    pub mode: Mode,
    pub bridge: Option<String>,
    pub hosts: Vec<Host>,
    pub state: StateFile,
    torn_down: bool,
}

/// The run id of this process.
pub fn run_id() -> String {
    format!("{RUN_PREFIX}-{}", std::process::id())
}

/// The /24 a run's hosts live in: 198.18.0.0/15 holds 512 of them, picked by pid so concurrent
/// runs (on separate bridges anyway) do not even look alike.
fn subnet(pid: u32) -> [u8; 3] {
    let index = pid % 512;
    [198, 18 + (index / 256) as u8, (index % 256) as u8]
}

/// A loopback /24 for loopback mode: 127.a.b.0 by pid (127.0.0.1 itself is never used).
fn loopback_subnet(pid: u32) -> [u8; 3] {
    let index = pid % 65_536;
    [127, (index / 256) as u8, (index % 256) as u8]
}

impl Network {
    /// Creates the hosts `names` (in netns mode: namespaces, veths and the bridge).
    pub async fn create(mode: Mode, run_dir: &Path, names: &[&str]) -> Result<Network> {
        if names.len() > HOSTS_MAX {
            bail!("{} hosts asked, at most {HOSTS_MAX}", names.len());
        }
        let pid = std::process::id();
        let run_id = run_id();
        let state = StateFile::create(&run_id, run_dir)?;
        let mut net = Network {
            run_id: run_id.clone(),
            mode,
            bridge: None,
            hosts: Vec::new(),
            state,
            torn_down: false,
        };
        let result = match mode {
            Mode::Loopback => {
                let [a, b, c] = loopback_subnet(pid);
                for (i, name) in names.iter().enumerate() {
                    net.hosts.push(Host {
                        name: name.to_string(),
                        ip: Ipv4Addr::new(a, b, c, 10 + i as u8),
                        netns: None,
                        ifname: None,
                    });
                }
                Ok(())
            }
            Mode::Netns => net.create_netns(pid, names).await,
        };
        if let Err(e) = result {
            net.teardown().await;
            return Err(e);
        }
        Ok(net)
    }

    async fn create_netns(&mut self, pid: u32, names: &[&str]) -> Result<()> {
        let bridge = format!("{RUN_PREFIX}{pid}b");
        self.state.update(|s| s.links.push(bridge.clone()))?;
        sys::run("ip", &["link", "add", &bridge, "type", "bridge"]).await?;
        sys::run("ip", &["link", "set", &bridge, "up"]).await?;
        self.bridge = Some(bridge.clone());
        let [a, b, c] = subnet(pid);
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{}-{name}", self.run_id);
            let outer = format!("{RUN_PREFIX}{pid}h{i}");
            let inner = format!("{RUN_PREFIX}{pid}n{i}");
            let ip = Ipv4Addr::new(a, b, c, 10 + i as u8);
            self.state.update(|s| {
                s.netns.push(ns.clone());
                s.links.push(outer.clone());
            })?;
            sys::run("ip", &["netns", "add", &ns]).await?;
            sys::run(
                "ip",
                &[
                    "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ],
            )
            .await?;
            sys::run("ip", &["link", "set", &inner, "netns", &ns]).await?;
            sys::run("ip", &["link", "set", &outer, "master", &bridge]).await?;
            sys::run("ip", &["link", "set", &outer, "up"]).await?;
            let cidr = format!("{ip}/24");
            sys::run("ip", &["-n", &ns, "addr", "add", &cidr, "dev", &inner]).await?;
            sys::run("ip", &["-n", &ns, "link", "set", &inner, "up"]).await?;
            sys::run("ip", &["-n", &ns, "link", "set", "lo", "up"]).await?;
            self.hosts.push(Host {
                name: name.to_string(),
                ip,
                netns: Some(ns),
                ifname: Some(inner),
            });
        }
        Ok(())
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in this run"))
    }

    /// Records a process we started (for cleanup after a crash).
    pub fn track_process(&self, what: &str, id: ProcId) {
        let _ = self
            .state
            .update(|s| s.processes.push((what.to_string(), id)));
    }

    pub fn untrack_process(&self, id: ProcId) {
        let _ = self.state.update(|s| s.processes.retain(|(_, p)| *p != id));
    }

    pub fn track_mount(&self, path: &Path) -> Result<()> {
        self.state.update(|s| s.mounts.push(path.to_path_buf()))
    }

    pub fn untrack_mount(&self, path: &Path) {
        let _ = self.state.update(|s| s.mounts.retain(|m| m != path));
    }

    /// Removes everything the run created. Idempotent.
    pub async fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        let state = self.state.snapshot();
        let _ = tokio::task::spawn_blocking(move || remove(&state)).await;
        self.state.remove();
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if !self.torn_down {
            self.torn_down = true;
            remove(&self.state.snapshot());
            self.state.remove();
        }
    }
}

/// Removes what a state says a run created: processes (and anything else still running in its
/// namespaces), mounts, namespaces, links. Synchronous, so `Drop` can call it (a run that panics
/// or is cancelled still cleans up); each command is an `ip`/`umount` call of milliseconds.
pub fn remove(state: &State) {
    for (_, id) in &state.processes {
        id.signal_group(nix::sys::signal::Signal::SIGCONT);
        id.signal_group(nix::sys::signal::Signal::SIGKILL);
    }
    for ns in &state.netns {
        kill_netns_processes(ns);
    }
    for mount in &state.mounts {
        unmount_sync(mount);
    }
    for ns in &state.netns {
        quiet(&["netns", "del", ns]);
    }
    for link in &state.links {
        quiet(&["link", "del", link]);
    }
}

/// Runs `ip args`, ignoring failure (the object may be gone already).
fn quiet(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// SIGKILLs every process inside a namespace of ours (only processes we started live there).
fn kill_netns_processes(ns: &str) {
    // A process being killed can take a moment to leave: look a few times.
    for _ in 0..20 {
        let Some(out) = quiet(&["netns", "pids", ns]) else {
            return;
        };
        let pids: Vec<u32> = out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            sys::signal_pid(pid, nix::sys::signal::Signal::SIGCONT);
            sys::signal_pid(pid, nix::sys::signal::Signal::SIGKILL);
        }
        // Cleanup may run in Drop, outside any runtime: a short blocking pause is the point.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn unmount_sync(path: &Path) {
    let run = |args: &[&str]| {
        std::process::Command::new("umount")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let shown = path.display().to_string();
    if !run(&[&shown]) {
        run(&["-l", &shown]);
    }
}

/// Unmounts a tmpfs of ours, lazily if it is busy.
pub async fn unmount(path: &Path) {
    let path = path.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || unmount_sync(&path)).await;
}

/// What `cleanup` did.
#[derive(Debug, Default)]
pub struct CleanupSummary {
    pub runs: Vec<String>,
    pub skipped_live: Vec<String>,
    pub orphans: Vec<String>,
}

/// Removes what crashed runs left: every state file whose owner is gone (all of them with
/// `force`), then any `rpc-<pid>-*` namespace or `rpc<pid>*` link whose pid is not a live
/// ringpost-chaos run.
pub async fn cleanup(force: bool) -> Result<CleanupSummary> {
    let mut summary = CleanupSummary::default();
    let mut live_pids = Vec::new();
    if let Ok(dir) = std::fs::read_dir(state_dir()) {
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Ok(text) = std::fs::read(&path) else {
                continue;
            };
            let Ok(state) = serde_json::from_slice::<State>(&text) else {
                eprintln!(
                    "cleanup: {} is not a state file; left alone",
                    path.display()
                );
                continue;
            };
            let owner_alive = state.owner.is_some_and(|o| o.alive());
            if owner_alive && !force {
                if let Some(o) = state.owner {
                    live_pids.push(o.pid);
                }
                summary.skipped_live.push(state.run_id.clone());
                continue;
            }
            let run_id = state.run_id.clone();
            let _ = tokio::task::spawn_blocking(move || remove(&state)).await;
            let _ = std::fs::remove_file(&path);
            summary.runs.push(run_id);
        }
    }
    // Orphans without a state file (or whose state file was lost).
    // A name whose pid is alive may belong to a run that started after the state files were
    // read: left alone (unless forced).
    let owned_by_live = |name: &str| -> bool {
        run_pid(name)
            .is_some_and(|pid| (live_pids.contains(&pid) || sys::pid_exists(pid)) && !force)
    };
    if sys::have("ip") {
        if let Ok(out) = sys::run("ip", &["netns", "list"]).await {
            for ns in out.lines().filter_map(|l| l.split_whitespace().next()) {
                if run_pid(ns).is_some() && !owned_by_live(ns) {
                    let owned = ns.to_string();
                    let _ = tokio::task::spawn_blocking(move || {
                        kill_netns_processes(&owned);
                        quiet(&["netns", "del", &owned]);
                    })
                    .await;
                    summary.orphans.push(format!("netns {ns}"));
                }
            }
        }
        if let Ok(out) = sys::run("ip", &["-o", "link", "show"]).await {
            for line in out.lines() {
                // "7: rpc123h0@if6: <...>"
                let Some(name) = line.split(':').nth(1).map(|n| n.trim()) else {
                    continue;
                };
                let name = name.split('@').next().unwrap_or(name);
                if link_pid(name).is_some() && !owned_by_live(&link_run_name(name)) {
                    sys::run_quiet("ip", &["link", "del", name]).await;
                    summary.orphans.push(format!("link {name}"));
                }
            }
        }
    }
    Ok(summary)
}

/// The pid in a namespace name `rpc-<pid>-<host>`.
fn run_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(RUN_PREFIX)?.strip_prefix('-')?;
    let (pid, _) = rest.split_once('-').unwrap_or((rest, ""));
    pid.parse().ok()
}

/// The pid in a link name `rpc<pid>b`, `rpc<pid>h<i>`, `rpc<pid>n<i>`.
fn link_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(RUN_PREFIX)?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let tail = &rest[digits.len()..];
    let kind_ok = tail == "b"
        || (tail.len() >= 2
            && (tail.starts_with('h') || tail.starts_with('n'))
            && tail[1..].chars().all(|c| c.is_ascii_digit()));
    if digits.is_empty() || !kind_ok {
        return None;
    }
    digits.parse().ok()
}

fn link_run_name(name: &str) -> String {
    link_pid(name).map_or_else(String::new, |pid| format!("{RUN_PREFIX}-{pid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_run_pid_and_fit_interface_names() {
        assert_eq!(run_pid("rpc-4194304-node1"), Some(4194304));
        assert_eq!(run_pid("rpc-12"), Some(12));
        assert_eq!(run_pid("rpcx-12-node1"), None);
        assert_eq!(run_pid("other"), None);
        assert_eq!(link_pid("rpc4194304b"), Some(4194304));
        assert_eq!(link_pid("rpc4194304h31"), Some(4194304));
        assert_eq!(link_pid("rpc77n3"), Some(77));
        assert_eq!(link_pid("rpc77x3"), None);
        assert_eq!(link_pid("rpcb"), None);
        assert_eq!(link_pid("eth0"), None);
        // IFNAMSIZ is 16 with the terminating NUL.
        assert!(format!("{RUN_PREFIX}{}h{}", 4_194_304, HOSTS_MAX - 1).len() <= 15);
    }

    #[test]
    fn addresses_stay_in_their_ranges() {
        for pid in [1, 255, 256, 511, 512, 4_194_303] {
            let [a, b, _] = subnet(pid);
            assert_eq!(a, 198);
            assert!(b == 18 || b == 19, "198.18.0.0/15");
            let [a, _, _] = loopback_subnet(pid);
            assert_eq!(a, 127);
        }
    }
}
