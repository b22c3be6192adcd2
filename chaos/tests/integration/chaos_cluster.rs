//! `ringpost-chaos run join-drain` end to end, in loopback mode (no root needed): three real
//! coordinator replicas and three real nodes on 127.x addresses, SDK devices sending for 10 s
//! while node 4 joins, node 3 drains away (exiting 0) and node 3 comes back with a fresh data
//! dir. The checker must find nothing; users must have moved; nothing may be left running.
//!
//! Needs `ringpost-node` and `ringpost-coordinator` next to `ringpost-chaos` (`make test`
//! builds every binary first) or `RINGPOST_NODE_BIN` / `RINGPOST_COORDINATOR_BIN`. About 15 s.
//!
//! Also `cluster-slow-net` (below): the same cluster with every link through the relays.

use crate::harness;

use std::time::{Duration, Instant};

use harness::{loopback_cluster_run, run_with_report};

/// The whole run (about 15 s), bounded generously for a busy machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(150);

#[test]
fn join_drain_in_loopback_mode_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let run_dir = dir.path().join("run");
    let started = Instant::now();
    let cmd = loopback_cluster_run("join-drain", "20251124", "10s", &report_path, &run_dir);
    let (guard, report, shown) = run_with_report(cmd, "join-drain", &report_path, RUN_TIMEOUT);
    let elapsed = started.elapsed();
    assert_eq!(report["verdict"], "pass", "{shown}");
    assert_eq!(report["mode"], "loopback", "{shown}");
    let counts = &report["counts"];
    let n = |k: &str| {
        counts[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no count {k}: {shown}"))
    };
    assert!(n("acked") > 100, "{shown}");
    for k in ["lost", "duplicated", "reordered", "leaked", "phantom"] {
        assert_eq!(n(k), 0, "{k}: {shown}");
    }
    assert_eq!(n("delivered"), n("expected_deliveries"), "{shown}");
    assert_eq!(n("lost_unreplicated"), 0, "nothing was removed: {shown}");

    // The three membership changes happened, in order, as planned.
    let faults = report["faults"].as_array().unwrap();
    let kinds: Vec<&str> = faults.iter().map(|f| f["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["node-join", "node-drain", "node-join"], "{shown}");
    let drain = faults[1]["detail"].as_str().unwrap();
    assert!(drain.contains("exited 0"), "{drain}");
    let rejoin = faults[2]["detail"].as_str().unwrap();
    assert!(rejoin.contains("fresh data dir"), "{rejoin}");

    // Users moved: to node 4 when it joined, off node 3 when it drained.
    let notes: Vec<&str> = report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    let moved = notes
        .iter()
        .find(|n| n.starts_with("users that moved"))
        .unwrap_or_else(|| panic!("no note on moves: {shown}"));
    assert!(moved.contains("->4"), "{moved}");
    assert!(moved.contains("3->"), "{moved}");
    eprintln!("join-drain: {} acked in {elapsed:?}", n("acked"));

    // Nothing of the run is left running (loopback mode: its processes carry the run dir).
    let run_dir_text = run_dir.display().to_string();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let cmdline = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default();
            assert!(
                !cmdline.contains(&run_dir_text),
                "process {:?} of the run left running",
                entry.file_name()
            );
        }
    }
    let state = ringpost_chaos::hosts::state_dir().join(format!("rpc-{}.json", guard.pid()));
    assert!(!state.exists(), "state file left: {}", state.display());
}

/// `cluster-slow-net` in loopback mode: every client connection and every node-to-node datagram
/// passes a relay (the nodes advertise the relays' addresses), the peer relay delays, drops,
/// duplicates and reorders the peer link's datagrams, the client relay resets every
/// connection. Nothing acked may be lost, duplicated, reordered or leaked. About 20 s.
#[test]
fn cluster_slow_net_in_loopback_mode_runs_every_link_through_the_relays() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let run_dir = dir.path().join("run");
    // Seed 1 in 12 s plans peer chaos, then a reset of every client connection.
    let cmd = loopback_cluster_run("cluster-slow-net", "1", "12s", &report_path, &run_dir);
    let (_guard, report, shown) =
        run_with_report(cmd, "cluster-slow-net", &report_path, RUN_TIMEOUT);
    assert_eq!(report["verdict"], "pass", "{shown}");
    let counts = &report["counts"];
    let n = |k: &str| counts[k].as_u64().unwrap_or_else(|| panic!("{k}: {shown}"));
    assert!(n("acked") > 100, "{shown}");
    for k in ["lost", "duplicated", "reordered", "leaked", "phantom"] {
        assert_eq!(n(k), 0, "{k}: {shown}");
    }
    assert_eq!(n("delivered"), n("expected_deliveries"), "{shown}");
    let kinds: Vec<&str> = report["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["peer-chaos", "relay-reset"], "{shown}");

    // Every node's peer link was reached through the peer relay (a flow per dialing node).
    let peer_log = std::fs::read_to_string(run_dir.join("peer-relay.log")).unwrap();
    let targets: std::collections::BTreeSet<&str> = peer_log
        .lines()
        .filter_map(|l| l.strip_prefix("udp flow "))
        .filter_map(|l| l.split(" -> ").nth(1))
        .collect();
    assert_eq!(targets.len(), 3, "one target per node: {peer_log}");
}
