//! The report of a run: JSON for machines, one table row for people.

use serde::{Deserialize, Serialize};

use crate::attack::AttackSummary;
use crate::check::{CheckReport, Counts, FaultWindow, RemovedNode, Violation};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// No invariant broken (and the run did prove something: messages were acked).
    Pass,
    /// An invariant was broken, or the run proved nothing.
    Fail,
    /// The scenario needs something this build or machine does not have (a multi-node
    /// cluster, root); nothing was run.
    Unsupported,
    /// The run could not be carried out (a node would not start, a fault could not be applied).
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::Unsupported => "unsupported",
            Verdict::Error => "ERROR",
        }
    }

    /// Whether `make chaos` should fail for it.
    pub fn is_failure(self) -> bool {
        matches!(self, Verdict::Fail | Verdict::Error)
    }
}

/// A fault as applied, times in milliseconds from the start of sending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedFault {
    pub id: u32,
    pub kind: String,
    pub target: String,
    pub detail: String,
    pub start_ms: i64,
    pub end_ms: Option<i64>,
}

/// A node killed and removed, times in milliseconds from the start of sending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemovedNodeReport {
    pub node_id: u64,
    pub killed_ms: i64,
    pub removed_ms: i64,
    /// Users that lived only on it.
    pub users: Vec<u64>,
}

/// The report of one scenario run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub scenario: String,
    pub seed: u64,
    pub mode: String,
    pub verdict: Verdict,
    /// Why it is not a plain pass: what broke, what is missing.
    pub reason: String,
    /// The sending window, and the whole run, in milliseconds.
    pub duration_ms: u64,
    pub wall_ms: u64,
    pub counts: Counts,
    pub faults: Vec<AppliedFault>,
    pub violations: Vec<Violation>,
    pub violations_unlisted: u64,
    /// Losses explained by a node killed and removed (a single copy): expected, not
    /// violations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreplicated: Vec<Violation>,
    /// Nodes killed and removed, times in milliseconds from the start of sending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_nodes: Vec<RemovedNodeReport>,
    /// The nodes ran with `--replicate`: a removed node's shards had in-sync replicas, and any
    /// loss with it is a violation.
    #[serde(default)]
    pub replicated: bool,
    /// What the run observed besides violations (refusals, reconnects, clock skew seen).
    pub notes: Vec<String>,
    /// An `abuse-*` scenario: the attack's effect on honest clients and on the node, against a
    /// baseline run of the same seed without the attack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abuse: Option<AbuseReport>,
    pub run_dir: String,
    pub history: String,
}

/// What an attack did to the honest clients and the node (an `abuse-*` scenario).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AbuseReport {
    pub attack: String,
    /// The attack's window, in milliseconds from the start of sending (the same in the
    /// baseline run).
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    /// Honest send -> `SendAck{Ok}` latency, p99, of the sends started in the window: with the
    /// attack, and in the baseline run without it.
    pub honest_p99_ms: f64,
    pub honest_sends: u64,
    pub baseline_p99_ms: Option<f64>,
    pub baseline_sends: Option<u64>,
    /// The most `honest_p99_ms` may be: twice the baseline (a baseline under
    /// [`crate::scenario::ABUSE_P99_FLOOR_MS`] counts as that).
    pub p99_limit_ms: Option<f64>,
    /// The node's resident memory (VmRSS): at the first sample, the peak, the bound; and the
    /// baseline run's peak.
    pub rss_first_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_bound_kib: u64,
    pub baseline_rss_peak_kib: Option<u64>,
    /// `/readyz` asked once a second during the run.
    pub readyz_ok: u64,
    pub readyz_failed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readyz_first_failure: Option<String>,
    /// What the attacker saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attacker: Option<AttackSummary>,
}

impl AbuseReport {
    /// One line for the table and the notes.
    pub fn describe(&self) -> String {
        let baseline = match (self.baseline_p99_ms, self.p99_limit_ms) {
            (Some(b), Some(limit)) => format!("baseline {b:.0} ms, limit {limit:.0} ms"),
            _ => "no baseline".to_string(),
        };
        let rss_baseline = self
            .baseline_rss_peak_kib
            .map_or_else(String::new, |k| format!(", baseline {} MiB", k / 1024));
        format!(
            "honest SendAck p99 {:.0} ms ({baseline}); node RSS peak {} MiB (bound {} MiB{rss_baseline}); /readyz {} ok, {} failed",
            self.honest_p99_ms,
            self.rss_peak_kib / 1024,
            self.rss_bound_kib / 1024,
            self.readyz_ok,
            self.readyz_failed
        )
    }
}

impl RunReport {
    /// A report for a run that did not happen.
    pub fn not_run(
        scenario: &str,
        seed: u64,
        mode: &str,
        verdict: Verdict,
        reason: String,
    ) -> Self {
        RunReport {
            scenario: scenario.to_string(),
            seed,
            mode: mode.to_string(),
            verdict,
            reason,
            duration_ms: 0,
            wall_ms: 0,
            counts: Counts::default(),
            faults: Vec::new(),
            violations: Vec::new(),
            violations_unlisted: 0,
            unreplicated: Vec::new(),
            removed_nodes: Vec::new(),
            replicated: false,
            notes: Vec::new(),
            abuse: None,
            run_dir: String::new(),
            history: String::new(),
        }
    }

    /// Fills counts, faults and violations from a check, times relative to `origin_us`.
    pub fn absorb(&mut self, check: CheckReport, origin_us: u64) {
        let rel = |t: u64| (t as i64 - origin_us as i64) / 1_000;
        self.faults = check
            .faults
            .iter()
            .map(|f: &FaultWindow| AppliedFault {
                id: f.id,
                kind: f.kind.clone(),
                target: f.target.clone(),
                detail: f.detail.clone(),
                start_ms: rel(f.start_us),
                end_ms: f.end_us.map(rel),
            })
            .collect();
        self.removed_nodes = check
            .removed_nodes
            .iter()
            .map(|r: &RemovedNode| RemovedNodeReport {
                node_id: r.node_id,
                killed_ms: rel(r.killed_us),
                removed_ms: rel(r.removed_us),
                users: r.users.clone(),
            })
            .collect();
        self.counts = check.counts;
        self.violations = check.violations;
        self.violations_unlisted = check.violations_unlisted;
        self.unreplicated = check.unreplicated;
    }

    /// What was lost with removed nodes, said plainly; `None` when no node was removed.
    pub fn unreplicated_summary(&self) -> Option<String> {
        if self.removed_nodes.is_empty() {
            return None;
        }
        let c = &self.counts;
        let nodes: Vec<String> = self
            .removed_nodes
            .iter()
            .map(|r| format!("node {}", r.node_id))
            .collect();
        let why = if self.replicated {
            "their shards had in-sync replicas on other nodes"
        } else {
            "they lived only there (a single copy)"
        };
        Some(format!(
            "{} acked messages ({} deliveries), {} read receipts, {} delivered receipts and {} \
             group message deliveries lost with removed {}: {why}",
            c.lost_unreplicated_messages,
            c.lost_unreplicated,
            c.lost_unreplicated_receipts,
            c.lost_unreplicated_delivered_receipts,
            c.group_lost_unreplicated,
            nodes.join(", ")
        ))
    }
}

/// The table header.
pub fn table_header() -> String {
    format!(
        "{:<20} {:>20} {:<11} {:>6} {:>9} {:>5} {:>4} {:>6} {:>6} {:>6} {:>7}  {}",
        "scenario",
        "seed",
        "verdict",
        "acked",
        "delivered",
        "lost",
        "dup",
        "reord",
        "leaked",
        "faults",
        "time",
        "note"
    )
}

/// One row.
pub fn table_row(r: &RunReport) -> String {
    let c = &r.counts;
    let time = if r.wall_ms == 0 {
        "-".to_string()
    } else {
        format!("{:.0}s", r.wall_ms as f64 / 1000.0)
    };
    let note = if r.reason.is_empty() {
        String::new()
    } else {
        r.reason.clone()
    };
    format!(
        "{:<20} {:>20} {:<11} {:>6} {:>9} {:>5} {:>4} {:>6} {:>6} {:>6} {:>7}  {}",
        r.scenario,
        r.seed,
        r.verdict.as_str(),
        c.acked,
        c.delivered,
        c.lost,
        c.duplicated,
        c.reordered,
        c.leaked,
        r.faults.len(),
        time,
        note
    )
}

/// The group line of a report, for people: `None` when the run had no group traffic. The
/// table's `acked` and `delivered` columns count 1:1 messages only; `lost`, `dup`, `reord` and
/// `leaked` count group violations too.
pub fn group_line(r: &RunReport) -> Option<String> {
    let c = &r.counts;
    if c.groups == 0 && c.group_sent == 0 {
        return None;
    }
    Some(format!(
        "  groups: {} groups, {} group messages sent, {} acked, {} of {} member-device \
         deliveries due, {} membership changes, {} of {} change deliveries due, {} lost with a \
         removed node",
        c.groups,
        c.group_sent,
        c.group_acked,
        c.group_delivered,
        c.group_expected_deliveries,
        c.group_changes,
        c.group_event_deliveries,
        c.group_event_expected,
        c.group_lost_unreplicated
    ))
}

/// The violations of a report, one per line, for people.
pub fn violation_lines(r: &RunReport, max: usize) -> Vec<String> {
    let mut lines: Vec<String> = r
        .violations
        .iter()
        .take(max)
        .map(|v| {
            let faults: Vec<String> = v
                .faults
                .iter()
                .map(|f| format!("#{} {}", f.id, f.kind))
                .collect();
            format!(
                "  {:?} {:?} msg {} from {} at {}: {} [faults around: {}]",
                v.kind,
                v.subject,
                v.msg_id,
                v.from,
                v.device,
                v.detail,
                if faults.is_empty() {
                    "none".to_string()
                } else {
                    faults.join(", ")
                }
            )
        })
        .collect();
    let more = r.violations.len().saturating_sub(max) as u64 + r.violations_unlisted;
    if more > 0 {
        lines.push(format!("  ... and {more} more (see the JSON report)"));
    }
    lines
}
