//! The dashboard and the alert rules against real processes: three `ringpost-coordinator`
//! replicas and a `ringpost-node run` node are started, both kinds of `/metrics` scraped, and
//! every metric name that `deploy/grafana/ringpost.json`'s queries and
//! `deploy/prometheus/alerts.yml`'s expressions use must be among the series they export. Also:
//! every alert's `runbook` names a section of docs/operations.md that exists, and every
//! coordinator and process metric is in that page's tables. (`scripts/check-rules.sh` checks
//! the rules' syntax and behaviour with promtool.)

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::harness::TestCluster;

/// A file of the repository, by its path from the workspace root.
fn repo_file(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

/// Metric names in PromQL, loosely: identifiers `ringpost_[a-z0-9_]+` and `process_[a-z_]+`
/// not preceded by an identifier character.
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &text[i..];
        let prefix = ["ringpost_", "process_"]
            .into_iter()
            .find(|p| rest.starts_with(p));
        match prefix {
            Some(p) if boundary => {
                let len = rest
                    .bytes()
                    .take_while(|&b| {
                        b.is_ascii_lowercase()
                            || b == b'_'
                            || (p == "ringpost_" && b.is_ascii_digit())
                    })
                    .count();
                names.insert(rest[..len].to_owned());
                i += len;
            }
            _ => i += 1,
        }
    }
    names
}

/// Every `expr` string in the dashboard's panels.
fn dashboard_exprs(json: &str) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(json).expect("dashboard is JSON");
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The value of every `key:` in a YAML file, loosely: the rest of its line, or the block
/// (`|` or `>`) of more-indented lines that follows it.
fn yaml_values(yaml: &str, key: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        let Some(rest) = trimmed.strip_prefix(&format!("{key}:")) else {
            continue;
        };
        let rest = rest.trim();
        if rest == "|" || rest == ">" {
            let block: Vec<&str> = (lines[i + 1..].iter())
                .take_while(|l| l.trim().is_empty() || indent(l) > indent(line))
                .map(|l| l.trim())
                .collect();
            out.push(block.join(" "));
        } else {
            out.push(rest.trim_matches('"').to_owned());
        }
    }
    out
}

/// The sample names of a Prometheus text exposition, and each family's declared type.
fn exposition(body: &str) -> (BTreeSet<String>, BTreeMap<String, String>) {
    let mut samples = BTreeSet::new();
    let mut types = BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            types.insert(name.to_owned(), kind.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            samples.insert(name.to_owned());
        }
    }
    (samples, types)
}

/// `GET path` on `http://host:port`; the status and body.
fn http_get(url: &str, path: &str) -> (u16, String) {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("admin connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").expect("admin write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("admin read");
    let status = (out.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// What the dashboard's queries and the alert rules' expressions name.
fn referenced() -> BTreeMap<String, &'static str> {
    let mut names = BTreeMap::new();
    for e in dashboard_exprs(&repo_file("deploy/grafana/ringpost.json")) {
        for n in metric_names(&e) {
            names.insert(n, "deploy/grafana/ringpost.json");
        }
    }
    for e in yaml_values(&repo_file("deploy/prometheus/alerts.yml"), "expr") {
        for n in metric_names(&e) {
            names.insert(n, "deploy/prometheus/alerts.yml");
        }
    }
    names
}

#[test]
fn metric_name_extraction() {
    let e = r#"histogram_quantile(0.99, sum by (le) (rate(ringpost_send_ack_seconds_bucket{job="ringpost-node"}[5m]))) > 0 and on() process_open_fds / process_max_fds"#;
    let names: Vec<String> = metric_names(e).into_iter().collect();
    assert_eq!(
        names,
        [
            "process_max_fds",
            "process_open_fds",
            "ringpost_send_ack_seconds_bucket"
        ]
    );
    assert!(metric_names("x_ringpost_y dashboard:ringpost-node").is_empty());
    let yaml =
        "- alert: A\n  expr: |\n    a_total\n      > 1\n  for: 1m\n- alert: B\n  expr: b > 2\n";
    assert_eq!(yaml_values(yaml, "expr"), ["a_total > 1", "b > 2"]);
    assert_eq!(yaml_values(yaml, "alert"), ["A", "B"]);
    let refs = referenced();
    assert!(refs.len() > 40, "{refs:?}");
    assert!(refs.contains_key("ringpost_coord_is_leader"), "{refs:?}");
}

#[test]
fn every_alert_has_a_runbook_section_in_operations_md() {
    let alerts = repo_file("deploy/prometheus/alerts.yml");
    let ops = repo_file("docs/operations.md");
    let section = ops
        .split_once("\n## Alerts\n")
        .map(|(_, rest)| rest)
        .expect("docs/operations.md has an Alerts section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let headings: BTreeSet<&str> = (section.lines())
        .filter_map(|l| l.strip_prefix("### "))
        .collect();
    let names = yaml_values(&alerts, "alert");
    let runbooks = yaml_values(&alerts, "runbook");
    assert!(names.len() > 20, "{names:?}");
    assert_eq!(names.len(), runbooks.len(), "one runbook per alert");
    for (name, runbook) in names.iter().zip(&runbooks) {
        assert_eq!(
            runbook,
            &format!("docs/operations.md#{}", name.to_lowercase()),
            "{name}'s runbook"
        );
        assert!(
            headings.contains(name.as_str()),
            "docs/operations.md, Alerts, has no `### {name}`"
        );
    }
    let unique: BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "alert names repeat");
}

#[test]
#[allow(clippy::disallowed_methods)] // a plain test thread polling child processes
fn dashboard_and_alerts_name_only_exported_metrics() {
    let cluster = TestCluster::start(3, 1);
    let want = referenced();

    // The leader-only series (replication lag, quorum ack age) appear once the leader has
    // heard from its followers: scrape until everything wanted is there, or time runs out.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (samples, types, coord_samples) = loop {
        let mut samples = BTreeSet::new();
        let mut types = BTreeMap::new();
        let (status, body) = cluster.nodes[0].admin_get("/metrics");
        assert_eq!(status, 200, "node /metrics: {body}");
        let (s, t) = exposition(&body);
        samples.extend(s);
        types.extend(t);
        let mut coord_samples = BTreeSet::new();
        for replica in &cluster.replicas {
            let (status, body) = http_get(&replica.admin_url, "/metrics");
            assert_eq!(status, 200, "coordinator /metrics: {body}");
            let (s, t) = exposition(&body);
            coord_samples.extend(s);
            types.extend(t);
            assert_eq!(http_get(&replica.admin_url, "/healthz").0, 200);
        }
        samples.extend(coord_samples.iter().cloned());
        let complete = want.keys().all(|n| samples.contains(n));
        if complete || Instant::now() > deadline {
            break (samples, types, coord_samples);
        }
        std::thread::sleep(Duration::from_millis(250));
    };

    let missing: Vec<String> = (want.iter())
        .filter(|(n, _)| !samples.contains(*n))
        .map(|(n, file)| format!("{n} (in {file})"))
        .collect();
    assert!(
        missing.is_empty(),
        "referenced but not exported by a node or a coordinator: {missing:#?}"
    );
    for name in want.keys() {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if let Some(kind) = types.get(base) {
                    assert_eq!(kind, "histogram", "{name} used as a histogram's series");
                }
            }
        }
    }

    // The coordinator's and the process metrics are documented (operations.md's tables).
    let ops = repo_file("docs/operations.md");
    let undocumented: Vec<&String> = (coord_samples.iter())
        .filter(|n| !ops.contains(&format!("`{n}")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/operations.md: {undocumented:?}"
    );
    for n in ["ringpost_ready", "process_open_fds", "process_max_fds"] {
        assert!(samples.contains(n), "the node exports {n}");
    }
}
