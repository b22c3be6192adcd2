//! Smoke test: the real `ringpost-bench` binary against a real dev node it starts itself
//! (`--spawn-node`): `idle` with 50 connections, `chat` for 2 seconds, a small
//! `offline-drain`, and a `group` of 8 members, over ws. Asserts the JSON reports have the
//! fixed keys, the cost and honesty figures (CPU per message, messages due vs sent, the inbox
//! back on the node, every member delivery), and no errors; never timing.
//!
//! The node binary belongs to another package, so `env!("CARGO_BIN_EXE_...")` cannot name it.
//! It is found, in order, at `$RINGPOST_NODE_BIN`; beside the directory of this test's
//! executable (`target/<profile>/deps/..`, where `cargo build --workspace --bins`, which `make
//! test` runs first, puts it); or under `$CARGO_TARGET_DIR/{debug,release}`. If none exists the
//! test fails and says how to build it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn node_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RINGPOST_NODE_BIN") {
        return PathBuf::from(p);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/bench_smoke-HASH → target/<profile>/ringpost-node
        if let Some(profile_dir) = exe.parent().and_then(Path::parent) {
            candidates.push(profile_dir.join("ringpost-node"));
        }
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        candidates.push(dir.join("debug/ringpost-node"));
        candidates.push(dir.join("release/ringpost-node"));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "ringpost-node not found (looked at {candidates:?}): run `cargo build -p ringpost-node` \
                 or set RINGPOST_NODE_BIN"
            )
        })
}

fn run_bench(args: &[&str], json: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ringpost-bench"))
        .args(args)
        .arg("--spawn-node")
        .arg(node_bin())
        .arg("--quiet")
        .arg("--json")
        .arg(json)
        .output()
        .expect("run ringpost-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ringpost-bench {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let text = std::fs::read_to_string(json).expect("json written");
    serde_json::from_str(&text).expect("valid json")
}

fn assert_keys(v: &Value, keys: &[&str]) {
    for k in ["scenario", "transport", "connections", "errors", "config"] {
        assert!(v.get(k).is_some(), "missing {k} in {v:#}");
    }
    for k in keys {
        assert!(v.get(*k).is_some(), "missing {k} in {v:#}");
    }
    assert_eq!(v["errors"], 0, "errors in {v:#}");
}

#[test]
fn idle_and_chat_against_a_dev_node() {
    let dir = tempfile::tempdir().unwrap();

    let idle = run_bench(
        &["idle", "--connections", "50", "--settle", "0.5"],
        &dir.path().join("idle.json"),
    );
    assert_keys(
        &idle,
        &[
            "server_rss_kib_per_conn",
            "server_rss_kib_per_conn_slope",
            "kernel_kib_per_conn",
        ],
    );
    assert_eq!(idle["connections_at_half"], 25);
    assert!(idle["machine"]["loadavg_1m_before_run"].is_number());
    assert_eq!(idle["scenario"], "idle");
    assert_eq!(idle["transport"], "ws");
    assert_eq!(idle["connections"], 50);

    let chat = run_bench(
        &[
            "chat",
            "--pairs",
            "5",
            "--rate",
            "200",
            "--warmup",
            "0.5",
            "--duration",
            "2",
        ],
        &dir.path().join("chat.json"),
    );
    assert_keys(&chat, &["delivered_per_s", "latency_ms", "ack_latency_ms"]);
    for k in ["p50", "p99", "p999", "max"] {
        assert!(chat["latency_ms"][k].is_number(), "latency_ms.{k}");
        assert!(chat["ack_latency_ms"][k].is_number(), "ack_latency_ms.{k}");
    }
    assert_eq!(chat["messages"]["lost"], 0);
    assert!(chat["messages"]["delivered"].as_u64().unwrap() > 0);
    assert_cpu_per_message(&chat, "");
    let open_loop = &chat["open_loop"];
    let due = open_loop["due"].as_u64().unwrap();
    assert!(due > 0, "{open_loop}");
    assert_eq!(
        due,
        open_loop["sent"].as_u64().unwrap() + open_loop["unsent"].as_u64().unwrap()
    );
    assert_eq!(
        chat["latency_ms"]["count"].as_u64().unwrap(),
        due,
        "every message due in the window, delivered or not, is in the latency histogram"
    );
    assert!(chat["machine"]["loadavg_1m_before_run"].is_number());

    let drain = run_bench(
        &[
            "offline-drain",
            "--devices",
            "4",
            "--messages",
            "400",
            "--timeout",
            "30",
        ],
        &dir.path().join("drain.json"),
    );
    assert_keys(
        &drain,
        &["delivered_per_s", "drain_s", "drain_inbox_empty_s"],
    );
    assert_eq!(drain["drained"], 400);
    // The node's inbox is back to what it held before (a fresh node: empty) only once every
    // ack and every delivered receipt is processed, which is after the last Deliver.
    assert_eq!(drain["inbox_entries_target"], 0);
    assert_eq!(drain["inbox_entries_at_end"], 0);
    assert_eq!(drain["inbox_entries_after_queue"], 400);
    assert!(
        drain["drain_inbox_empty_s"].as_f64().unwrap() >= drain["drain_s"].as_f64().unwrap(),
        "{drain:#}"
    );
    assert_cpu_per_message(&drain, "");
    assert_cpu_per_message(&drain, "enqueue_");
}

/// The per-message CPU figures are there, and divide a count over a window that was measured.
fn assert_cpu_per_message(v: &Value, prefix: &str) {
    for k in ["node_cpu_us_per_msg", "generator_cpu_us_per_msg"] {
        let k = format!("{prefix}{k}");
        assert!(v[&k].as_f64().is_some_and(|x| x >= 0.0), "{k} in {v:#}");
    }
    assert!(v[format!("{prefix}cpu_window_messages")].as_u64().unwrap() > 0);
    assert!(v[format!("{prefix}cpu_window_s")].as_f64().unwrap() > 0.0);
}

/// `group`: one group of 8 members on a dev node, one sender, a few messages; every member but
/// the sender gets every acknowledged message exactly once.
#[test]
fn group_reaches_every_member() {
    let dir = tempfile::tempdir().unwrap();
    let v = run_bench(
        &[
            "group",
            "--members",
            "8",
            "--rate",
            "20",
            "--warmup",
            "0.2",
            "--duration",
            "1",
        ],
        &dir.path().join("group.json"),
    );
    assert_keys(
        &v,
        &[
            "group_messages_per_s",
            "delivered_per_s",
            "latency_ms",
            "first_latency_ms",
            "ack_latency_ms",
            "node_cpu_us_per_member_delivery",
            "machine",
        ],
    );
    assert_eq!(v["scenario"], "group");
    assert_eq!(v["connections"], 8);
    let m = &v["messages"];
    let acked = m["acked_ok"].as_u64().unwrap();
    assert!(acked > 0, "nothing acknowledged: {v:#}");
    assert_eq!(m["sent"], acked);
    assert_eq!(m["member_deliveries"].as_u64().unwrap(), acked * 7, "{v:#}");
    assert_eq!(m["lost"], 0);
    assert_eq!(m["duplicates"], 0);
    assert_eq!(v["lost"], 0);
    assert!(v["machine"].get("loadavg_1m_before_run").is_some());
}

/// `million` at a small scale: a real coordinator and two real nodes (`ringpost-node run`,
/// io_uring driver; a kernel that refuses io_uring gets tokio, and the node logs why) on
/// loopback ports the kernel picks, one worker process. Every connection is held, answers
/// the final ping, every message between random pairs is delivered once, and every device of
/// the reconnect storm comes back and gets the message queued to it while it was away.
#[test]
fn million_holds_and_checks_every_connection_on_a_local_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_bin();
    let coordinator = node.with_file_name("ringpost-coordinator");
    assert!(
        coordinator.is_file(),
        "{} not found: `cargo build --workspace --bins` builds it",
        coordinator.display()
    );
    let json = dir.path().join("million.json");
    let cluster = dir.path().join("cluster");
    let out = Command::new(env!("CARGO_BIN_EXE_ringpost-bench"))
        .arg("million")
        .arg("--dir")
        .arg(&cluster)
        .arg("--node-bin")
        .arg(&node)
        .arg("--coordinator-bin")
        .arg(&coordinator)
        .args(["--connections", "300", "--nodes", "2", "--settle", "0.5"])
        .args(["--hold", "1", "--messages", "100", "--answer-timeout", "30"])
        .args(["--background", "0.5"])
        .args(["--storm", "100"])
        .arg("--quiet")
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run ringpost-bench million");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "million failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_keys(
        &v,
        &[
            "server_rss_kib_per_conn_slope",
            "generator_rss_kib_per_conn_slope",
            "kernel_kib_per_conn_slope",
            "connect_latency_ms",
            "snapshots",
        ],
    );
    assert_eq!(v["connections"], 300, "{stdout}");
    assert_eq!(v["errors"], 0, "{stdout}");
    assert_eq!(
        v["server_connections"], 300.0,
        "the nodes count them: {stdout}"
    );
    assert_eq!(v["ping_check_asked"], 300, "{stdout}");
    assert_eq!(v["ping_check_answered"], 300, "{stdout}");
    assert_eq!(v["messages_sent"], 100, "{stdout}");
    assert_eq!(v["messages_acked"], 100, "{stdout}");
    assert_eq!(v["messages_delivered"], 100, "{stdout}");
    assert_eq!(v["messages_duplicates"], 0, "{stdout}");
    // The storm: 100 devices dropped, a message queued to each, all back with it.
    assert_eq!(v["storm_away"], 100, "{stdout}");
    assert_eq!(v["storm_reconnected"], 100, "{stdout}");
    assert_eq!(v["storm_delivered"], 100, "{stdout}");
    // It began once the nodes were quiet, which the report says.
    assert!(v["storm_settle_s"].as_f64().is_some(), "{stdout}");
    assert!(
        v["storm_start_nodes_cpu_percent"].as_f64().is_some(),
        "{stdout}"
    );
    // The background was measured on quiet nodes, which the report says.
    assert!(v["background_settle_s"].as_f64().is_some(), "{stdout}");
    // Its costs: the nodes' CPU with their background and the generator's, and the host's
    // drops while it ran.
    assert!(
        v["storm_node_cpu_us_per_device_gross"].as_f64().unwrap() > 0.0,
        "{stdout}"
    );
    assert!(
        v["storm_generator_cpu_us_per_device"].as_f64().is_some(),
        "{stdout}"
    );
    assert!(v["storm_udp_rcvbuf_drops"].as_u64().is_some(), "{stdout}");
    assert!(v["storm_listen_overflows"].as_u64().is_some(), "{stdout}");
}
