//! `ringpost-chaos run smoke` with the real node binary: a namespace host for the node and two
//! for the clients (loopback addresses without root), SDK devices sending for a few seconds, no
//! faults; the checker must find nothing and the hosts must be gone afterwards.
//!
//! The node binary is `RINGPOST_NODE_BIN` if set, else `ringpost-node` in this test's target
//! dir (`make test` builds it first with `cargo build --workspace --bins`; alone, run
//! `cargo build -p ringpost-node` before `cargo test -p ringpost-chaos`).

use crate::harness;

use std::process::Command;
use std::time::{Duration, Instant};

use harness::{chaos_bin, node_bin, run_with_report};

/// The whole run, bounded well under the 3 minutes `make test` allows it.
const RUN_TIMEOUT: Duration = Duration::from_secs(170);

#[test]
fn smoke_finds_nothing_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let run_dir = dir.path().join("run");
    let started = Instant::now();
    let mut cmd = Command::new(chaos_bin());
    cmd.args(["run", "smoke", "--seed", "20251123", "--json"])
        .arg(&report_path)
        .arg("--run-dir")
        .arg(&run_dir)
        .arg("--node-bin")
        .arg(node_bin());
    let (guard, report, shown) = run_with_report(cmd, "smoke", &report_path, RUN_TIMEOUT);
    let elapsed = started.elapsed();
    assert_eq!(report["verdict"], "pass", "{shown}");
    let counts = &report["counts"];
    let n = |k: &str| {
        counts[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no count {k}: {shown}"))
    };
    assert!(
        n("acked") > 50,
        "a smoke run acks hundreds of messages: {shown}"
    );
    for k in ["lost", "duplicated", "reordered", "leaked", "phantom"] {
        assert_eq!(n(k), 0, "{k}: {shown}");
    }
    assert_eq!(n("delivered"), n("expected_deliveries"), "{shown}");
    assert!(n("receipts_delivered") > 0, "{shown}");
    // Groups are in the workload by default, counted apart.
    assert_eq!(n("groups"), 3, "{shown}");
    assert!(n("group_acked") > 10, "{shown}");
    assert_eq!(
        n("group_delivered"),
        n("group_expected_deliveries"),
        "{shown}"
    );
    assert_eq!(report["faults"].as_array().unwrap().len(), 0);
    eprintln!("smoke: {} acked in {elapsed:?}", n("acked"));

    // Nothing of the run is left: namespaces, links, state file.
    let run_id = format!("rpc-{}", guard.pid());
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains(&format!("{run_id}-")),
            "namespaces left: {text}"
        );
    }
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        let link = format!("rpc{}", guard.pid());
        assert!(
            !text
                .lines()
                .any(|l| l.contains(&format!(" {link}b")) || l.contains(&format!(" {link}h"))),
            "links left: {text}"
        );
    }
    let state = ringpost_chaos::hosts::state_dir().join(format!("{run_id}.json"));
    assert!(!state.exists(), "state file left: {}", state.display());
}
