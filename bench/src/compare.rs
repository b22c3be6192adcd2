//! `compare`: the same `idle` and `chat` workloads, in one run, against Ringpost and against
//! the peers the issue names, installed from Debian's packages when missing:
//!
//! - **mosquitto** (MQTT 3.1.1): each device subscribes to its own topic `u/<user>` at QoS 1
//!   and publishes to its peer's at QoS 1. The config the bench writes: one listener on
//!   127.0.0.1, anonymous clients, `persistence false` (nothing written to disk: QoS 1 is
//!   acknowledged from memory), no connection limit, `max_queued_messages 100000` (so a busy
//!   subscriber's queue is not what limits it), `set_tcp_nodelay true`, logs to a file.
//! - **nats-server** (core NATS): each device subscribes to `u.<user>` and publishes to its
//!   peer's subject. The config: one listener on 127.0.0.1, no JetStream (nothing stored,
//!   nothing acknowledged), a 64 MiB per-client pending limit (the default), logs to a file.
//!
//! Ringpost acknowledges a send only once it is durable (WAL synced) and deletes it only when
//! the recipient acknowledges it; mosquitto acknowledges from memory; core NATS acknowledges
//! nothing. The table shows each figure side by side with its ratio to Ringpost's. Every
//! broker the bench starts is stopped when the run ends (or fails, or is interrupted).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::loadclient::peer::PeerProtocol;
use crate::report::{self, Report};
use crate::run::{Common, Setup};
use crate::scenario::{chat, idle};

/// Time a broker has to accept connections after it starts.
pub const BROKER_START_TIMEOUT: Duration = Duration::from_secs(15);

/// The systems `compare` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Ringpost,
    Mosquitto,
    Nats,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Ringpost => "ringpost",
            System::Mosquitto => "mosquitto",
            System::Nats => "nats",
        }
    }
}

/// `compare` options.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Connections in the idle workload.
    #[arg(long, default_value_t = 5000)]
    pub connections: usize,
    /// Pairs in the chat workloads.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Offered msgs/s of the fixed-rate chat workload (a saturating one runs too).
    #[arg(long, default_value_t = 20_000.0)]
    pub rate: f64,
    /// Sends awaiting acknowledgement per device, at most (NATS: sends per write burst).
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Message bytes.
    #[arg(long, default_value_t = 128)]
    pub msg_bytes: usize,
    /// Warm-up seconds of each chat workload.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Measured seconds of each chat workload.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Systems to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ringpost,mosquitto,nats"
    )]
    pub systems: Vec<System>,
    /// Do not install missing brokers with apt-get (fail instead).
    #[arg(long)]
    pub no_install: bool,
}

/// The three workloads' reports for one system.
struct Runs {
    idle: Report,
    chat_rate: Report,
    chat_saturate: Report,
}

pub async fn run(a: &Args) -> Result<()> {
    let load_before_first = crate::sysmem::loadavg_1m();
    let mut results: Vec<(System, Runs)> = Vec::new();
    let scratch =
        std::env::temp_dir().join(format!("ringpost-bench-compare-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let result = async {
        for &system in &a.systems {
            println!("== {} ==", system.name());
            let runs = match system {
                System::Ringpost => {
                    let mut c = sub_common(&a.common);
                    if c.accounts.is_none() {
                        // Register once for all three workloads.
                        c.accounts = Some(scratch.join("ringpost-accounts.txt"));
                    }
                    let setup = Setup::new(&c).await?;
                    workloads(a, &c, &setup).await?
                }
                System::Mosquitto | System::Nats => {
                    let broker = Broker::start(system, &scratch, !a.no_install).await?;
                    let protocol = if system == System::Mosquitto {
                        PeerProtocol::Mqtt
                    } else {
                        PeerProtocol::Nats
                    };
                    let setup = Setup::peer(protocol, broker.addr, broker.pid);
                    let c = sub_common(&a.common);
                    let runs = workloads(a, &c, &setup).await;
                    drop(broker);
                    runs?
                }
            };
            results.push((system, runs));
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    let (table, json) = side_by_side(a, &results, load_before_first);
    print!("{table}");
    if let Some(path) = &a.common.json {
        report::write_json(path, &json)?;
        println!("  json: {}", path.display());
    }
    Ok(())
}

/// The common options for one workload: no files of its own (compare writes one JSON).
fn sub_common(c: &Common) -> Common {
    let mut c = c.clone();
    c.json = None;
    c.chart = None;
    c
}

async fn workloads(a: &Args, c: &Common, setup: &Setup) -> Result<Runs> {
    let idle = idle::run_with(
        c,
        setup,
        &idle::Args {
            connections: a.connections,
            settle: 2.0,
            hold: 0.0,
        },
    )
    .await?;
    let chat_args = |rate: f64| chat::Args {
        pairs: a.pairs,
        rate,
        window: a.window,
        msg_bytes: a.msg_bytes,
        warmup: a.warmup,
        duration: a.duration,
        drain_timeout: 10.0,
        pairing: chat::pairing::Pairing::Any,
    };
    let chat_rate = chat::run_with(c, setup, &chat_args(a.rate)).await?;
    let chat_saturate = chat::run_with(c, setup, &chat_args(0.0)).await?;
    Ok(Runs {
        idle,
        chat_rate,
        chat_saturate,
    })
}

/// One row of the side-by-side table: a label and how to read the figure from a system's runs.
type Figure = (&'static str, fn(&Runs) -> Option<f64>);

fn pct(r: &Report, key: &str, q: &str) -> Option<f64> {
    r.get(key)?.get(q)?.as_f64()
}

/// The 1-minute load average a sub-run read right before it started.
fn load_before(r: &Report) -> Option<f64> {
    r.get("machine")?.get("loadavg_1m_before_run")?.as_f64()
}

/// `load_before_first`: the 1-minute load average before the first sub-run.
fn side_by_side(
    a: &Args,
    results: &[(System, Runs)],
    load_before_first: Option<f64>,
) -> (String, Value) {
    let mut machine = crate::sysmem::Machine::read();
    machine.loadavg_1m_before_run = load_before_first;
    let figures: [Figure; 17] = [
        ("idle: server KiB/conn", |r| {
            r.idle.f64("server_rss_kib_per_conn")
        }),
        ("idle: KiB/conn slope N→2N", |r| {
            r.idle.f64("server_rss_kib_per_conn_slope")
        }),
        ("idle: kernel KiB/socket", |r| {
            r.idle.f64("kernel_kib_per_conn")
        }),
        ("idle: errors", |r| r.idle.f64("errors")),
        ("chat@rate: delivered/s", |r| {
            r.chat_rate.f64("delivered_per_s")
        }),
        ("chat@rate: p50 ms", |r| {
            pct(&r.chat_rate, "latency_ms", "p50")
        }),
        ("chat@rate: p99 ms", |r| {
            pct(&r.chat_rate, "latency_ms", "p99")
        }),
        ("chat@rate: p999 ms", |r| {
            pct(&r.chat_rate, "latency_ms", "p999")
        }),
        ("chat@rate: ack p99 ms", |r| {
            pct(&r.chat_rate, "ack_latency_ms", "p99")
        }),
        ("chat@rate: node CPU µs/msg", |r| {
            r.chat_rate.f64("node_cpu_us_per_msg")
        }),
        ("chat@rate: gen CPU µs/msg", |r| {
            r.chat_rate.f64("generator_cpu_us_per_msg")
        }),
        ("chat@rate: errors", |r| r.chat_rate.f64("errors")),
        ("saturate: delivered/s", |r| {
            r.chat_saturate.f64("delivered_per_s")
        }),
        ("saturate: p99 ms", |r| {
            pct(&r.chat_saturate, "latency_ms", "p99")
        }),
        ("saturate: node CPU µs/msg", |r| {
            r.chat_saturate.f64("node_cpu_us_per_msg")
        }),
        ("saturate: gen CPU µs/msg", |r| {
            r.chat_saturate.f64("generator_cpu_us_per_msg")
        }),
        ("saturate: errors", |r| r.chat_saturate.f64("errors")),
    ];
    let base = results
        .iter()
        .find(|(s, _)| *s == System::Ringpost)
        .map(|(_, r)| r);
    let mut out = format!(
        "\nringpost-bench compare: idle {} connections; chat {} pairs, {:.0} msgs/s offered and saturating \
         (window {}), {} B messages\n",
        a.connections, a.pairs, a.rate, a.window, a.msg_bytes
    );
    let mut header = format!("  {:<26}", "");
    for (s, _) in results {
        header.push_str(&format!("{:>14}", s.name()));
        if *s != System::Ringpost && base.is_some() {
            header.push_str(&format!("{:>10}", "×ringpost"));
        }
    }
    out.push_str(&header);
    out.push('\n');
    let mut rows = Vec::new();
    for (label, f) in figures {
        let mut line = format!("  {label:<26}");
        let mut row = Map::new();
        let base_v = base.and_then(f);
        for (s, runs) in results {
            let v = f(runs);
            line.push_str(&format!("{:>14}", v.map_or("-".into(), fmt_num)));
            row.insert(s.name().into(), json!(v));
            if *s != System::Ringpost && base.is_some() {
                let ratio = match (v, base_v) {
                    (Some(v), Some(b)) if b != 0.0 => Some(v / b),
                    _ => None,
                };
                line.push_str(&format!(
                    "{:>10}",
                    ratio.map_or("-".into(), |r| format!("{r:.2}×"))
                ));
                row.insert(format!("{}_ratio", s.name()), json!(ratio));
            }
        }
        row.insert("figure".into(), label.into());
        rows.push(Value::Object(row));
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(
        "  (CPU µs/msg: the server's (node's, broker's) or all generator processes' CPU over \
         the measured window ÷ messages delivered in it)\n",
    );
    let mut loads = Map::new();
    let mut load_line = String::from("  1-minute load average before each run:");
    for (s, r) in results {
        let mut l = Map::new();
        for (name, rep) in [
            ("idle", &r.idle),
            ("chat_rate", &r.chat_rate),
            ("chat_saturate", &r.chat_saturate),
        ] {
            let v = load_before(rep);
            load_line.push_str(&format!(
                " {} {name} {},",
                s.name(),
                v.map_or("-".into(), |v| format!("{v:.2}"))
            ));
            l.insert(name.into(), json!(v));
        }
        loads.insert(s.name().into(), Value::Object(l));
    }
    load_line.pop();
    out.push_str(&load_line);
    out.push('\n');
    out.push_str(&format!("  ({})\n", report::SHARED_CORES_NOTE));
    let mut runs = Map::new();
    for (s, r) in results {
        runs.insert(
            s.name().into(),
            json!({ "idle": r.idle.to_json(), "chat_rate": r.chat_rate.to_json(), "chat_saturate": r.chat_saturate.to_json() }),
        );
    }
    let errors: f64 = results
        .iter()
        .map(|(_, r)| {
            [&r.idle, &r.chat_rate, &r.chat_saturate]
                .iter()
                .filter_map(|x| x.f64("errors"))
                .sum::<f64>()
        })
        .sum();
    let json = json!({
        "scenario": "compare",
        "transport": a.common.transport.map_or("ws", |t| t.name()),
        "connections": a.connections,
        "errors": errors,
        "config": a,
        "figures": rows,
        "runs": runs,
        "loadavg_1m_before_run": loads,
        "machine": machine,
        "note": report::SHARED_CORES_NOTE,
    });
    (out, json)
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1000.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A broker the bench started; killed and reaped when dropped.
pub struct Broker {
    child: Child,
    pub pid: u32,
    pub addr: std::net::SocketAddr,
}

impl Broker {
    /// Installs (if allowed and needed), configures and starts `system` on a free loopback
    /// port, and waits until it accepts connections.
    pub async fn start(system: System, dir: &Path, install: bool) -> Result<Broker> {
        let (package, bin) = match system {
            System::Mosquitto => ("mosquitto", "mosquitto"),
            System::Nats => ("nats-server", "nats-server"),
            System::Ringpost => bail!("ringpost is not a broker"),
        };
        let exe = match find_binary(bin) {
            Some(p) => p,
            None if install => {
                apt_install(package).await?;
                find_binary(bin)
                    .ok_or_else(|| anyhow!("{package} installed but {bin} not found"))?
            }
            None => {
                bail!("{bin} is not installed (apt-get install {package}, or drop --no-install)")
            }
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.join(format!("{bin}.log"));
        let conf = dir.join(format!("{bin}.conf"));
        let text = match system {
            System::Mosquitto => format!(
                "# written by ringpost-bench compare\nlistener {port} 127.0.0.1\nallow_anonymous true\n\
                 persistence false\nmax_connections -1\nmax_queued_messages 100000\n\
                 set_tcp_nodelay true\nlog_dest file {}\nlog_type error\nlog_type warning\n",
                log.display()
            ),
            _ => format!(
                "# written by ringpost-bench compare: core NATS only, no JetStream\n\
                 listen: 127.0.0.1:{port}\nmax_pending: 67108864\nlog_file: \"{}\"\n",
                log.display()
            ),
        };
        std::fs::write(&conf, text)?;
        let child = Command::new(&exe)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                dir.join(format!("{bin}.stderr")),
            )?))
            .spawn()
            .with_context(|| format!("start {}", exe.display()))?;
        let mut broker = Broker {
            pid: child.id(),
            child,
            addr,
        };
        let t = std::time::Instant::now();
        loop {
            if let Ok(Ok(_)) = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                break;
            }
            if let Ok(Some(status)) = broker.child.try_wait() {
                bail!(
                    "{bin} exited ({status}); see {}",
                    dir.join(format!("{bin}.stderr")).display()
                );
            }
            if t.elapsed() > BROKER_START_TIMEOUT {
                bail!("{bin} did not listen on {addr} within {BROKER_START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "started {} (pid {}) on {addr}, config {}",
            exe.display(),
            broker.pid,
            conf.display()
        );
        Ok(broker)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bin` on PATH or in the sbin directories Debian puts daemons in.
fn find_binary(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// `apt-get install -y PACKAGE`, after an `apt-get update` if the first try fails.
async fn apt_install(package: &str) -> Result<()> {
    let install = || async {
        tokio::process::Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false)
    };
    println!("installing {package} with apt-get");
    if install().await {
        return Ok(());
    }
    let updated = tokio::process::Command::new("apt-get")
        .arg("update")
        .status()
        .await
        .context("apt-get update")?;
    if !updated.success() || !install().await {
        bail!("apt-get install {package} failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn runs(node_us: f64, generator_us: f64, load: f64) -> Runs {
        let chat = |scale: f64| {
            let mut r = Report::new("chat", "ws", 200, 0);
            r.set("node_cpu_us_per_msg", node_us * scale);
            r.set("generator_cpu_us_per_msg", generator_us * scale);
            r.set("machine", json!({ "loadavg_1m_before_run": load }));
            r
        };
        let mut idle = Report::new("idle", "ws", 100, 0);
        idle.set("machine", json!({ "loadavg_1m_before_run": load }));
        Runs {
            idle,
            chat_rate: chat(1.0),
            chat_saturate: chat(2.0),
        }
    }

    #[test]
    fn cpu_per_message_is_side_by_side_with_peer_over_ringpost_ratios() {
        let a = Cli::parse_from(["compare"]).args;
        let results = vec![
            (System::Ringpost, runs(40.0, 10.0, 1.5)),
            (System::Mosquitto, runs(10.0, 8.0, 2.5)),
        ];
        let (table, v) = side_by_side(&a, &results, Some(1.0));
        let row = |label: &str| {
            v["figures"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["figure"] == label)
                .unwrap_or_else(|| panic!("no row {label}"))
                .clone()
        };
        let r = row("chat@rate: node CPU µs/msg");
        assert_eq!(r["ringpost"], 40.0);
        assert_eq!(r["mosquitto"], 10.0);
        assert_eq!(r["mosquitto_ratio"], 0.25);
        let r = row("saturate: gen CPU µs/msg");
        assert_eq!(r["ringpost"], 20.0);
        assert_eq!(r["mosquitto_ratio"], 0.8);
        assert!(table.contains("saturate: node CPU µs/msg"));
        assert_eq!(v["loadavg_1m_before_run"]["mosquitto"]["chat_rate"], 2.5);
        assert_eq!(v["machine"]["loadavg_1m_before_run"], 1.0);
        assert!(table.contains("ringpost chat_saturate 1.50"));
    }
}
