//! The command line without a node: `check` on hand-written histories, `list`, and `cleanup`
//! after a run that was killed with its hosts still up.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn chaos() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringpost-chaos"))
}

const A1: &str = r#"{"user":15550001,"device":1}"#;
const B1: &str = r#"{"user":15550002,"device":1}"#;
const MSG: &str = "0101010101010101010101010101010101";

fn history(lines: &[String]) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), lines.join("\n") + "\n").unwrap();
    file
}

fn send_and_ack() -> Vec<String> {
    let msg = &MSG[..32];
    vec![
        format!(
            r#"{{"t_us":1,"src":"t","n":0,"type":"send","from":{A1},"to_user":15550002,"msg_id":"{msg}","attempt":1,"recipients":[{B1}]}}"#
        ),
        format!(
            r#"{{"t_us":2,"src":"t","n":1,"type":"send_ack","from":{A1},"msg_id":"{msg}","attempt":1,"status":"Ok"}}"#
        ),
        format!(
            r#"{{"t_us":3,"src":"t","n":2,"type":"fault","id":1,"kind":"kill-restart","phase":"start","target":"node1","detail":""}}"#
        ),
    ]
}

#[test]
fn check_finds_a_loss_and_passes_a_delivery() {
    let msg = &MSG[..32];
    let lossy = history(&send_and_ack());
    let out = chaos().arg("check").arg(lossy.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("lost 1"), "{text}");
    assert!(
        text.contains(msg) && text.contains("kill-restart"),
        "{text}"
    );

    let mut lines = send_and_ack();
    lines.push(format!(
        r#"{{"t_us":4,"src":"t","n":3,"type":"deliver","at":{B1},"seq":1,"msg_id":"{msg}","from":{A1},"body":{{"to":{B1},"msg_id":"{msg}"}}}}"#
    ));
    let clean = history(&lines);
    let json = tempfile::NamedTempFile::new().unwrap();
    let out = chaos()
        .arg("check")
        .arg(clean.path())
        .arg("--json")
        .arg(json.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(json.path()).unwrap()).unwrap();
    assert_eq!(report["counts"]["acked"], 1);
    assert_eq!(report["counts"]["delivered"], 1);
    assert_eq!(report["violations"].as_array().unwrap().len(), 0);
}

#[test]
fn list_names_every_scenario_and_says_which_need_a_cluster() {
    let out = chaos().arg("list").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "smoke",
        "kill-restart",
        "pause",
        "partition",
        "disk-full",
        "fsync-fail",
        "clock-skew",
        "mixed",
        "leader-kill",
        "join-drain",
        "node-loss",
        "coord-partition",
        "abuse-preauth",
        "abuse-slow-reader",
        "abuse-ack-flood",
        "abuse-prekey-drain",
        "abuse-register-flood",
        "abuse-malformed",
        "abuse-peer",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing: {text}"
        );
    }
    let leader = text.lines().find(|l| l.starts_with("leader-kill")).unwrap();
    assert!(leader.contains("multi-node cluster"), "{leader}");
    let peer = text.lines().find(|l| l.starts_with("abuse-peer")).unwrap();
    assert!(peer.contains("multi-node cluster"), "{peer}");
}

/// Without a `ringpost-coordinator` binary anywhere it looks, a cluster scenario says so and
/// runs nothing (exit 3, `unsupported`), as `make chaos` expects of what is not built.
#[test]
fn a_cluster_scenario_without_the_coordinator_binary_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    // A copy of ringpost-chaos alone in a directory: nothing next to it, no target dir.
    let alone = dir.path().join("ringpost-chaos");
    std::fs::copy(env!("CARGO_BIN_EXE_ringpost-chaos"), &alone).unwrap();
    let node = std::env::var_os("RINGPOST_NODE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_BIN_EXE_ringpost-chaos")).with_file_name("ringpost-node")
        });
    // `--node-bin` must name a file; its content does not matter here.
    let node = if node.is_file() { node } else { alone.clone() };
    let json = dir.path().join("r.json");
    let run = || {
        Command::new(&alone)
            .args(["run", "leader-kill", "--json"])
            .arg(&json)
            .arg("--node-bin")
            .arg(&node)
            .current_dir(dir.path())
            .env_remove("RINGPOST_COORDINATOR_BIN")
            .env_remove("CARGO_TARGET_DIR")
            .output()
    };
    // A process forked by another test thread while the copy was open for writing holds it
    // open for a moment: exec fails with ETXTBSY until that child execs too.
    let mut out = run();
    for _ in 0..50 {
        match &out {
            Err(e) if e.raw_os_error() == Some(26) => {
                #[allow(clippy::disallowed_methods)] // a test thread, no runtime to block
                std::thread::sleep(Duration::from_millis(100));
                out = run();
            }
            _ => break,
        }
    }
    let out = out.unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "unsupported has its own exit code: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["verdict"], "unsupported");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("multi-node cluster") && reason.contains("ringpost-coordinator"),
        "{reason}"
    );
}

/// A run killed with SIGKILL (no chance to clean up) leaves namespaces and links; `cleanup`
/// removes them. Needs root (namespaces); without it there is nothing to leave behind.
#[test]
fn cleanup_removes_what_a_killed_run_left() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root for network namespaces");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = std::env::var_os("RINGPOST_NODE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_BIN_EXE_ringpost-chaos")).with_file_name("ringpost-node")
        });
    if !node.is_file() {
        panic!(
            "{} is missing: cargo build -p ringpost-node",
            node.display()
        );
    }
    let mut child = chaos()
        .args(["run", "smoke", "--duration", "60s", "--run-dir"])
        .arg(dir.path().join("run"))
        .arg("--node-bin")
        .arg(&node)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let ns = format!("rpc-{pid}-node1");
    // Wait until the node's namespace exists, then kill the run outright.
    let deadline = Instant::now() + Duration::from_secs(60);
    let listed = |name: &str| {
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains(name)
    };
    while !listed(&ns) {
        assert!(Instant::now() < deadline, "the run never created {ns}");
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let it start the node too.
    #[allow(clippy::disallowed_methods)]
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(listed(&ns), "a SIGKILLed run cannot clean up after itself");

    let out = chaos().arg("cleanup").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        !listed(&format!("rpc-{pid}-")),
        "namespaces left after cleanup: {text}"
    );
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains(&format!("rpc{pid}")), "links left: {links}");
    // The node it started is gone too.
    let pids = Command::new("pgrep").args(["-f", "node1-data"]).output();
    if let Ok(pids) = pids {
        let text = String::from_utf8_lossy(&pids.stdout);
        let dir_text = dir.path().display().to_string();
        for p in text.split_whitespace() {
            let cmdline = std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default();
            assert!(!cmdline.contains(&dir_text), "node {p} left running");
        }
    }
}
