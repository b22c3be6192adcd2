//! What a run reports: a JSON object with fixed keys (so scripts can read any run), the same
//! figures as a human table, and the time series for the chart.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::stats::{Percentiles, SeriesPoint};

/// Keys every report has.
pub const REQUIRED_KEYS: [&str; 4] = ["scenario", "transport", "connections", "errors"];

/// Keys a report has when its scenario measures them.
#[cfg(test)]
pub const MEASURED_KEYS: [&str; 5] = [
    "server_rss_kib_per_conn",
    "kernel_kib_per_conn",
    "delivered_per_s",
    "latency_ms",
    "ack_latency_ms",
];

/// The note printed beside every figure: the generator competes with the node.
pub const SHARED_CORES_NOTE: &str =
    "load generator and server share this machine's cores: figures are lower bounds of the node alone";

/// One run's figures.
#[derive(Debug, Clone)]
pub struct Report {
    json: Map<String, Value>,
    rows: Vec<(String, String)>,
    pub series: Vec<SeriesPoint>,
    /// What the series counts per second (axis label).
    pub series_label: String,
}

impl Report {
    pub fn new(scenario: &str, transport: &str, connections: u64, errors: u64) -> Report {
        let mut r = Report {
            json: Map::new(),
            rows: Vec::new(),
            series: Vec::new(),
            series_label: "delivered msgs/s".into(),
        };
        r.json.insert("scenario".into(), scenario.into());
        r.json.insert("transport".into(), transport.into());
        r.set_row(
            "connections",
            connections,
            "connections",
            connections.to_string(),
        );
        r.set_row("errors", errors, "errors", errors.to_string());
        r
    }

    /// Sets a JSON key without a table row.
    pub fn set(&mut self, key: &str, value: impl Serialize) {
        self.json.insert(
            key.to_string(),
            serde_json::to_value(value).unwrap_or(Value::Null),
        );
    }

    /// Sets a JSON key and a table row.
    pub fn set_row(&mut self, key: &str, value: impl Serialize, label: &str, text: String) {
        self.set(key, value);
        self.rows.retain(|(l, _)| l != label);
        self.rows.push((label.to_string(), text));
    }

    /// Adds a table row only.
    pub fn row(&mut self, label: &str, text: String) {
        self.rows.push((label.to_string(), text));
    }

    /// Sets a percentile object (`latency_ms`, `ack_latency_ms`, ...) and its row, if measured.
    pub fn set_percentiles(&mut self, key: &str, label: &str, p: Option<Percentiles>) {
        if let Some(p) = p {
            self.set_row(key, p, label, format_percentiles(&p));
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key)
    }

    pub fn f64(&self, key: &str) -> Option<f64> {
        self.json.get(key).and_then(Value::as_f64)
    }

    /// The JSON object.
    pub fn to_json(&self) -> Value {
        Value::Object(self.json.clone())
    }

    /// The human table.
    pub fn table(&self) -> String {
        let title = format!(
            "ringpost-bench {} over {}",
            self.json
                .get("scenario")
                .and_then(Value::as_str)
                .unwrap_or("?"),
            self.json
                .get("transport")
                .and_then(Value::as_str)
                .unwrap_or("?")
        );
        let width = self.rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        let mut out = format!("{title}\n");
        for (label, text) in &self.rows {
            out.push_str(&format!("  {label:<width$}  {text}\n"));
        }
        out.push_str(&format!("  ({SHARED_CORES_NOTE})\n"));
        out
    }
}

/// `p50 1.23  p99 4.56  p999 7.89  max 12.3 ms (n=1000)`.
pub fn format_percentiles(p: &Percentiles) -> String {
    format!(
        "p50 {:.3}  p99 {:.3}  p999 {:.3}  max {:.3} ms  (n={})",
        p.p50, p.p99, p.p999, p.max, p.count
    )
}

/// Writes `value` (pretty) to `path`.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_keys_are_always_there() {
        let r = Report::new("idle", "ws", 10, 0);
        let v = r.to_json();
        for k in REQUIRED_KEYS {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["connections"], 10);
        assert!(r.table().contains("connections"));
    }

    #[test]
    fn percentiles_have_their_fixed_shape() {
        let mut r = Report::new("chat", "quic", 2, 0);
        r.set_percentiles("latency_ms", "latency", None);
        assert!(r.get("latency_ms").is_none(), "unmeasured keys stay absent");
        let p = Percentiles {
            p50: 1.0,
            p99: 2.0,
            p999: 3.0,
            max: 4.0,
            count: 9,
        };
        r.set_percentiles("latency_ms", "latency", Some(p));
        let v = r.to_json();
        for k in ["p50", "p99", "p999", "max"] {
            assert!(v["latency_ms"][k].is_number(), "{k}");
        }
    }
}
