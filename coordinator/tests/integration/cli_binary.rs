//! The real binary: three `run` processes on 127.0.0.1:0, `init`, `ctl` and the admin port's
//! `/metrics`, all killed on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ringpost_coordinator::{ClusterSecret, CoordinatorClient, NodeInfo};

const BIN: &str = env!("CARGO_BIN_EXE_ringpost-coordinator");
const SECRET: &str = "cli-binary-test-secret-0123";

/// A replica process, killed when dropped.
struct Replica {
    child: Child,
    client_addr: SocketAddr,
    /// `host:port` of the admin listener.
    admin_addr: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bin() -> Command {
    let mut c = Command::new(BIN);
    // Nothing from the environment of the test runner leaks in.
    for (k, _) in std::env::vars() {
        if k.starts_with("RINGPOST_COORD_") {
            c.env_remove(k);
        }
    }
    c.env("RINGPOST_COORD_LOG", "warn");
    c
}

fn start_replica(id: u64, dir: &Path) -> Replica {
    let mut child = bin()
        .args(["run", "--replica-id", &id.to_string()])
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--raft-listen",
            "127.0.0.1:0",
            "--client-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--election-timeout-min-ms",
            "300",
            "--election-timeout-max-ms",
            "600",
        ])
        .env("RINGPOST_COORD_SECRET", SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn replica");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut replica = Replica {
        child,
        client_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        admin_addr: String::new(),
    };
    let mut raft = None;
    while raft.is_none() || replica.client_addr.port() == 0 || replica.admin_addr.is_empty() {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("replica printed its listening addresses");
        if let Some(a) = line.strip_prefix("listening raft ") {
            raft = Some(a.parse::<SocketAddr>().unwrap());
        } else if let Some(a) = line.strip_prefix("listening client ") {
            replica.client_addr = a.parse().unwrap();
        } else if let Some(a) = line.strip_prefix("listening admin http://") {
            replica.admin_addr = a.to_owned();
        }
    }
    replica
}

fn run_ok(cmd: &mut Command) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run binary");
    let (out, err) = (
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    );
    assert!(
        status.success(),
        "{cmd:?} failed: {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    out
}

#[test]
fn init_run_and_ctl_with_three_processes() {
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Replica> = (1..=3)
        .map(|id| start_replica(id, &dir.path().join(format!("r{id}"))))
        .collect();
    let addrs: Vec<String> = replicas.iter().map(|r| r.client_addr.to_string()).collect();

    // init with flags.
    let out = run_ok(
        bin()
            .args(["init", "--secret", SECRET, "--shard-count", "64"])
            .args(["--coordinator", &addrs.join(",")])
            .args(["--cluster-id", "cli-test"]),
    );
    assert!(
        out.contains("initialized cluster cli-test with 3 replicas"),
        "{out}"
    );

    // ctl status with options from a config file.
    let config = dir.path().join("coord.toml");
    std::fs::write(
        &config,
        format!("secret = \"{SECRET}\"\ncoordinator = {addrs:?}\n"),
    )
    .unwrap();
    let out = run_ok(bin().args(["ctl", "--config"]).arg(&config).arg("status"));
    assert_eq!(out.matches("replica ").count(), 3, "{out}");
    assert_eq!(
        out.matches(": leader,").count(),
        1,
        "exactly one leader:\n{out}"
    );
    assert!(out.contains("cluster cli-test: epoch 0"), "{out}");
    assert!(out.contains("shards 64"), "{out}");
    assert!(
        out.contains("replication factor 2 (copies per shard: 0)"),
        "the default factor; no node yet:\n{out}"
    );

    // A node joins through the library client; ctl sees it and drains it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = CoordinatorClient::connect(
            replicas.iter().map(|r| r.client_addr).collect(),
            ClusterSecret::new(SECRET).unwrap(),
        )
        .await
        .unwrap();
        client.join(NodeInfo::new(7)).await.unwrap();
        client.activate(7).await.unwrap();
    });
    let out = run_ok(bin().args(["ctl", "--config"]).arg(&config).arg("members"));
    assert!(out.contains("epoch 1"), "{out}");
    assert!(
        out.contains("replication factor 2 (copies per shard: 1)"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains(" 7 ") && l.contains("active")),
        "{out}"
    );

    // The replication factor is cluster state: one active node holds one copy whatever the
    // factor, so no new epoch; out of bounds is a clear refusal.
    let ctl = |args: &[&str]| {
        let mut c = bin();
        c.args(["ctl", "--config"]).arg(&config).args(args);
        c
    };
    let out = run_ok(&mut ctl(&["set-replication", "3"]));
    assert!(
        out.contains("epoch 1 ") && out.contains("replication factor 3 (copies per shard: 1)"),
        "{out}"
    );
    let out = ctl(&["set-replication", "4"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("replication factor must be 1..=3"), "{err}");

    // Secret from the environment, one replica only (a follower, most likely: hints are followed).
    let out = run_ok(bin().env("RINGPOST_COORD_SECRET", SECRET).args([
        "ctl",
        "--coordinator",
        &addrs[2],
        "drain",
        "7",
    ]));
    assert!(
        out.lines()
            .any(|l| l.contains(" 7 ") && l.contains("draining")),
        "{out}"
    );
    assert!(out.contains("epoch 2"), "{out}");
    let out = run_ok(bin().env("RINGPOST_COORD_SECRET", SECRET).args([
        "ctl",
        "--json",
        "--coordinator",
        &addrs[1],
        "remove",
        "7",
    ]));
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(view["members"].as_array().map(Vec::len), Some(0), "{out}");

    // Wrong secret: a clean error, no panic.
    let out = bin()
        .args([
            "ctl",
            "--secret",
            "wrong-secret-0123456789",
            "--coordinator",
            &addrs[0],
            "members",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authentication failed"), "{err}");

    // Unknown config keys are refused.
    std::fs::write(&config, "secrett = \"x\"\n").unwrap();
    let out = bin()
        .args(["ctl", "--config"])
        .arg(&config)
        .arg("status")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option `secrett`"));
}

#[test]
fn help_prints_defaults() {
    let out = run_ok(bin().args(["run", "--help"]));
    for needle in [
        "[default: 0.0.0.0:7400]",
        "[default: 0.0.0.0:7401]",
        "[default: 127.0.0.1:7402]",
        "[env: RINGPOST_COORD_REPLICA_ID=]",
        "[default: 1000]",
    ] {
        assert!(out.contains(needle), "missing {needle} in:\n{out}");
    }
    let out = run_ok(bin().args(["init", "--help"]));
    assert!(out.contains("[default: 4096]"), "{out}");
}

/// `METHOD path` on a replica's admin port: the status code and the body.
fn admin(replica: &Replica, method: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(&replica.admin_addr).expect("admin connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// The value of the sample line `series` (name and labels, exactly) in an exposition.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[test]
#[allow(clippy::disallowed_methods)] // a plain test thread polling child processes
fn admin_port_serves_raft_and_membership_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Replica> = (1..=3)
        .map(|id| start_replica(id, &dir.path().join(format!("r{id}"))))
        .collect();

    // Before init: the Raft state of a replica that has no cluster yet.
    let (status, body) = admin(&replicas[0], "GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        sample(&body, "ringpost_coord_initialized"),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "ringpost_coord_replica_id"),
        Some(1.0),
        "{body}"
    );
    assert!(
        sample(&body, "process_open_fds").is_some_and(|n| n > 0.0),
        "{body}"
    );
    assert_eq!(admin(&replicas[0], "GET", "/healthz"), (200, "ok\n".into()));
    assert_eq!(admin(&replicas[0], "POST", "/metrics").0, 405);
    assert_eq!(admin(&replicas[0], "GET", "/nope").0, 404);

    let addrs: Vec<String> = replicas.iter().map(|r| r.client_addr.to_string()).collect();
    run_ok(
        bin()
            .args(["init", "--secret", SECRET, "--shard-count", "64"])
            .args(["--coordinator", &addrs.join(",")]),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = CoordinatorClient::connect(
            replicas.iter().map(|r| r.client_addr).collect(),
            ClusterSecret::new(SECRET).unwrap(),
        )
        .await
        .unwrap();
        client.join(NodeInfo::new(7)).await.unwrap();
        client.activate(7).await.unwrap();
        client.heartbeat(7).await.unwrap();
    });

    // Every replica applies the join (followers a moment later); the leader also reports its
    // followers' lag once it has heard from them.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let bodies = loop {
        let bodies: Vec<String> = replicas
            .iter()
            .map(|r| admin(r, "GET", "/metrics").1)
            .collect();
        let applied = bodies
            .iter()
            .all(|b| sample(b, "ringpost_coord_members{state=\"active\"}") == Some(1.0));
        let lag = bodies
            .iter()
            .any(|b| b.contains("ringpost_coord_replication_lag_entries{replica="));
        if (applied && lag) || std::time::Instant::now() > deadline {
            break bodies;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let leaders: Vec<&String> = (bodies.iter())
        .filter(|b| sample(b, "ringpost_coord_is_leader") == Some(1.0))
        .collect();
    assert_eq!(leaders.len(), 1, "exactly one leader: {bodies:#?}");
    let leader = leaders[0];
    let leader_id = sample(leader, "ringpost_coord_replica_id").unwrap();
    let term = sample(leader, "ringpost_coord_term").unwrap();
    assert!(term >= 1.0, "{leader}");
    assert_eq!(
        sample(leader, "ringpost_coord_raft_role{role=\"leader\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(leader, "ringpost_coord_voters"),
        Some(3.0),
        "{leader}"
    );
    assert!(
        sample(leader, "ringpost_coord_quorum_ack_age_seconds").is_some(),
        "{leader}"
    );
    assert_eq!(
        leader
            .matches("ringpost_coord_replication_lag_entries{replica=")
            .count(),
        2,
        "{leader}"
    );
    assert!(
        sample(leader, "ringpost_coord_heartbeats_total").unwrap() >= 1.0,
        "{leader}"
    );
    for body in &bodies {
        assert_eq!(
            sample(body, "ringpost_coord_leader_id"),
            Some(leader_id),
            "{body}"
        );
        assert_eq!(sample(body, "ringpost_coord_term"), Some(term), "{body}");
        assert_eq!(
            sample(body, "ringpost_coord_initialized"),
            Some(1.0),
            "{body}"
        );
        assert_eq!(
            sample(body, "ringpost_coord_ring_epoch"),
            Some(1.0),
            "{body}"
        );
        assert_eq!(sample(body, "ringpost_coord_shards"), Some(64.0), "{body}");
        assert_eq!(
            sample(body, "ringpost_coord_members{state=\"joining\"}"),
            Some(0.0)
        );
        let last = sample(body, "ringpost_coord_last_log_index").unwrap();
        let committed = sample(body, "ringpost_coord_committed_index").unwrap();
        let applied = sample(body, "ringpost_coord_last_applied_index").unwrap();
        assert!(
            applied <= committed && committed <= last && applied >= 3.0,
            "applied {applied} <= committed {committed} <= last {last}: {body}"
        );
    }
}

/// `run --check-config` loads the file and checks it as a start would, then exits without
/// binding or creating the data directory; a bad value or a missing secret is an error.
#[test]
fn run_check_config_checks_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("coord.toml");
    // Port 1 (privileged, surely not ours): a start would fail to bind it; the check binds nothing.
    let write = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "replica_id = 1\ndata_dir = {:?}\nsecret_file = {:?}\nraft_listen = \"127.0.0.1:1\"\n\
                 client_listen = \"127.0.0.1:1\"\n{extra}",
                data.to_str().unwrap(),
                secret.to_str().unwrap()
            ),
        )
        .unwrap();
    };
    let check = || {
        bin()
            .args(["run", "--check-config", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };

    write("");
    let out = check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("configuration ok"), "{stdout}");
    assert!(!data.exists(), "the check opened no data");

    write("election_timeout_min_ms = 2000\nelection_timeout_max_ms = 1000\n");
    let out = check();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("election timeout"), "{err}");

    std::fs::remove_file(&secret).unwrap();
    write("");
    let out = check();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("secret"), "{err}");
    assert!(!data.exists());
}
