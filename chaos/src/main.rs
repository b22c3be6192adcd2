//! `ringpost-chaos`: fault injection checked against the design invariants. See the library
//! (`ringpost_chaos`) for how the parts fit.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ringpost_chaos::report::{self, RunReport, Verdict};
use ringpost_chaos::{attack, check, history, hosts, node, probe, relay, scenario, workload};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ringpost chaos suite: runs a real node on network-namespace hosts, injects faults on a
/// seeded schedule, and checks the recorded history against the invariants.
#[derive(Parser, Debug)]
#[command(name = "ringpost-chaos", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the scenarios.
    List,
    /// Run one scenario (or `all`), print a table row each and write the JSON report.
    Run {
        /// A scenario name from `list`, or `all`.
        name: String,
        /// Fixes the whole fault schedule and workload.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Sending window, e.g. `30s`, `2m`, `1500ms` (default: the scenario's own).
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Write the JSON report here (an array for `all`).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Keep logs, histories and data here (default: /tmp/ringpost-chaos[-UID]/runs/...).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// The node binary [default: $RINGPOST_NODE_BIN, next to this binary, or
        /// $CARGO_TARGET_DIR/debug]
        #[arg(long)]
        node_bin: Option<PathBuf>,
        /// The coordinator binary, for the cluster scenarios [default:
        /// $RINGPOST_COORDINATOR_BIN, next to this binary, or $CARGO_TARGET_DIR/debug]
        #[arg(long)]
        coordinator_bin: Option<PathBuf>,
        /// Loopback-only mode even when namespaces are available (process faults only).
        #[arg(long)]
        loopback: bool,
        /// Longest wait after the sending window for acked messages to arrive, e.g. `120s`.
        #[arg(long, value_parser = parse_duration, default_value = "120s")]
        settle_max: Duration,
        /// Groups in the workload (4-6 members each, created before sending starts; their
        /// messages are counted apart from the 1:1 ones). 0: the 1:1 workload alone.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=workload::GROUPS_MAX as i64))]
        groups: u32,
        /// Membership changes per group during the sending window (its creator removes a
        /// member or adds one back, at seeded times); the checker then holds every group
        /// message to the members at its group seq. 0: fixed membership.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=workload::GROUP_CHANGES_MAX as i64))]
        group_changes: u32,
    },
    /// Check a recorded history file.
    Check {
        history: PathBuf,
        /// Write the check report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Remove namespaces, links, mounts and processes left by crashed runs.
    Cleanup {
        /// Also remove runs whose owner process is still alive.
        #[arg(long)]
        force: bool,
    },
    /// (internal) The workload of one client host.
    #[command(hide = true)]
    Workload {
        #[arg(long)]
        spec: PathBuf,
        #[arg(long)]
        register: bool,
    },
    /// (internal) The attacker of an abuse scenario.
    #[command(hide = true)]
    Attack {
        #[arg(long)]
        spec: PathBuf,
    },
    /// (internal) Samples a node's RSS and /readyz until the stop file appears.
    #[command(hide = true)]
    Probe {
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        admin: std::net::SocketAddr,
        #[arg(long)]
        stop_file: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// (internal) The relay between hosts.
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        tcp: Vec<relay::Route>,
        #[arg(long)]
        udp: Vec<relay::Route>,
        #[arg(long)]
        control: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?}: not a duration"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{s:?}: out of range (at most 24h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn main() -> Result<std::process::ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGPOST_CHAOS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let code = runtime.block_on(async {
        // A signal drops the running future: its guards stop processes and remove hosts.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(cli) => r,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("ringpost-chaos: interrupted; cleaning up");
                Ok(130)
            }
            _ = term.recv() => {
                eprintln!("ringpost-chaos: terminated; cleaning up");
                Ok(143)
            }
        }
    })?;
    // Let the runtime finish dropping what the cancelled future owned.
    runtime.shutdown_timeout(Duration::from_secs(5));
    Ok(std::process::ExitCode::from(
        u8::try_from(code).unwrap_or(1),
    ))
}

async fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::List => {
            for s in scenario::catalogue() {
                let mut needs = Vec::new();
                if s.needs.cluster {
                    needs.push("multi-node cluster: ringpost-coordinator");
                }
                if s.needs.netns {
                    needs.push("root");
                }
                let needs = if needs.is_empty() {
                    String::new()
                } else {
                    format!(" [needs {}]", needs.join(", "))
                };
                println!("{:<20} {}{needs}", s.name, s.about);
            }
            Ok(0)
        }
        Command::Run {
            name,
            seed,
            duration,
            json,
            run_dir,
            node_bin,
            coordinator_bin,
            loopback,
            settle_max,
            groups,
            group_changes,
        } => {
            let scenarios: Vec<scenario::Scenario> = if name == "all" {
                scenario::catalogue()
            } else {
                vec![scenario::find(&name).with_context(|| {
                    format!("no scenario {name:?}; `ringpost-chaos list` shows them")
                })?]
            };
            let node_bin = node::locate_node_bin(node_bin.as_deref())?;
            // Only the cluster scenarios need it: without it they report `unsupported`.
            let coordinator_bin = match coordinator_bin {
                Some(path) => Ok(node::locate_coordinator_bin(Some(&path))?),
                None => node::locate_coordinator_bin(None).map_err(|e| format!("{e:#}")),
            };
            let self_bin = std::env::current_exe().context("locating ringpost-chaos itself")?;
            println!("{}", report::table_header());
            let mut reports: Vec<RunReport> = Vec::new();
            for s in &scenarios {
                let opts = scenario::RunOptions {
                    seed,
                    duration,
                    run_dir: run_dir.as_ref().map(|d| {
                        if scenarios.len() > 1 {
                            d.join(s.name)
                        } else {
                            d.clone()
                        }
                    }),
                    node_bin: node_bin.clone(),
                    coordinator_bin: coordinator_bin.clone(),
                    self_bin: self_bin.clone(),
                    force_loopback: loopback,
                    settle_max,
                    groups,
                    group_changes,
                };
                let r = scenario::run(s, &opts).await;
                println!("{}", report::table_row(&r));
                if let Some(line) = report::group_line(&r) {
                    println!("{line}");
                }
                for line in report::violation_lines(&r, 20) {
                    println!("{line}");
                }
                reports.push(r);
            }
            if let Some(path) = &json {
                let text = if reports.len() == 1 {
                    serde_json::to_vec_pretty(&reports[0])?
                } else {
                    serde_json::to_vec_pretty(&reports)?
                };
                std::fs::write(path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            for r in &reports {
                if !r.run_dir.is_empty() {
                    eprintln!("{}: run dir {}", r.scenario, r.run_dir);
                }
                for note in &r.notes {
                    eprintln!("{}: {note}", r.scenario);
                }
            }
            let failed = reports.iter().any(|r| r.verdict.is_failure());
            let only_unsupported = reports.len() == 1 && reports[0].verdict == Verdict::Unsupported;
            Ok(if failed {
                1
            } else if only_unsupported {
                3
            } else {
                0
            })
        }
        Command::Check {
            history: path,
            json,
        } => {
            let records = history::merge(history::read(&path)?);
            let report = check::check(&records);
            let c = &report.counts;
            println!(
                "acked {} delivered {} lost {} duplicated {} reordered {} leaked {} phantom {} \
                 (faults {})",
                c.acked,
                c.delivered,
                c.lost,
                c.duplicated,
                c.reordered,
                c.leaked,
                c.phantom,
                c.faults
            );
            if c.groups > 0 || c.group_sent > 0 {
                println!(
                    "groups {} group messages sent {} acked {} member-device deliveries {} of \
                     {} due",
                    c.groups,
                    c.group_sent,
                    c.group_acked,
                    c.group_delivered,
                    c.group_expected_deliveries
                );
            }
            if !report.removed_nodes.is_empty() {
                let nodes: Vec<String> = report
                    .removed_nodes
                    .iter()
                    .map(|r| r.node_id.to_string())
                    .collect();
                println!(
                    "lost with removed nodes ({}): {} messages ({} deliveries), {} read receipts, \
                     {} delivered receipts, {} group message deliveries (expected while shards \
                     have one copy; not violations)",
                    nodes.join(", "),
                    c.lost_unreplicated_messages,
                    c.lost_unreplicated,
                    c.lost_unreplicated_receipts,
                    c.lost_unreplicated_delivered_receipts,
                    c.group_lost_unreplicated
                );
            }
            for v in report.violations.iter().take(50) {
                let faults: Vec<String> = v
                    .faults
                    .iter()
                    .map(|f| format!("#{} {}", f.id, f.kind))
                    .collect();
                println!(
                    "  {:?} {:?} msg {} from {} at {}: {} [faults around: {}]",
                    v.kind,
                    v.subject,
                    v.msg_id,
                    v.from,
                    v.device,
                    v.detail,
                    faults.join(", ")
                );
            }
            if report.violations.len() > 50 || report.violations_unlisted > 0 {
                println!("  ... more in the JSON report");
            }
            if let Some(out) = json {
                std::fs::write(&out, serde_json::to_vec_pretty(&report)?)?;
            }
            Ok(if report.passed() { 0 } else { 1 })
        }
        Command::Cleanup { force } => {
            let summary = hosts::cleanup(force).await?;
            for run in &summary.runs {
                println!("removed run {run}");
            }
            for orphan in &summary.orphans {
                println!("removed orphan {orphan}");
            }
            for live in &summary.skipped_live {
                println!("left {live} alone: its run is still going (use --force)");
            }
            if summary.runs.is_empty() && summary.orphans.is_empty() {
                println!("nothing to clean up");
            }
            Ok(0)
        }
        Command::Workload { spec, register } => {
            let bytes =
                std::fs::read(&spec).with_context(|| format!("reading {}", spec.display()))?;
            let spec: workload::WorkloadSpec = serde_json::from_slice(&bytes)?;
            if register {
                workload::register(&spec).await?;
            } else {
                workload::run(spec).await?;
            }
            Ok(0)
        }
        Command::Attack { spec } => {
            let bytes =
                std::fs::read(&spec).with_context(|| format!("reading {}", spec.display()))?;
            attack::run(serde_json::from_slice(&bytes)?).await?;
            Ok(0)
        }
        Command::Probe {
            pid,
            admin,
            stop_file,
            out,
        } => {
            probe::run(pid, admin, stop_file, out).await?;
            Ok(0)
        }
        Command::Relay {
            tcp,
            udp,
            control,
            seed,
        } => {
            relay::run(tcp, udp, control, seed, std::future::pending()).await?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("12").unwrap(), Duration::from_secs(12));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("100h").is_err());
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
