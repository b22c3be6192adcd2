//! `ringpost-coordinator`: the Raft membership service.
//!
//! Every option is a flag, an environment variable (`RINGPOST_COORD_*`) and a key of the TOML
//! file given with `--config` (key = the flag's name with `_` for `-`); precedence is
//! flag > env > file > built-in default.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use ringpost_coordinator::client::{ClientOptions, CoordinatorClient, InitParams};
use ringpost_coordinator::types::DEFAULT_REPLICATION_FACTOR;
use ringpost_coordinator::{
    ClusterSecret, ClusterView, Coordinator, CoordinatorConfig, RaftTimings, StatusReport,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ringpost coordinator: keeps cluster membership, the ring epoch and replica sets in a
/// Raft-replicated state machine (openraft). Start every replica with `run`, create the cluster
/// once with `init`, operate it with `ctl`.
#[derive(Parser, Debug)]
#[command(name = "ringpost-coordinator", version, about)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "RINGPOST_COORD_LOG_FORMAT",
        default_value = "human"
    )]
    log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax). By default ours at info, libraries (openraft
    /// and the like) at warn.
    #[arg(
        long,
        global = true,
        env = "RINGPOST_COORD_LOG",
        default_value = "warn,ringpost_coordinator=info"
    )]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the cluster: its replica set is the replicas at the given --coordinator addresses.
    Init(InitArgs),
    /// Run a coordinator replica.
    Run(RunArgs),
    /// Operator commands against any replica.
    Ctl(CtlArgs),
}

#[derive(Args, Debug)]
struct Common {
    /// TOML file with defaults for any option of this command.
    #[arg(long, env = "RINGPOST_COORD_CONFIG")]
    config: Option<PathBuf>,
    /// Cluster secret (at least 16 bytes). Prefer --secret-file or the env var.
    #[arg(long, env = "RINGPOST_COORD_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// File holding the cluster secret (trailing newline ignored).
    #[arg(long, env = "RINGPOST_COORD_SECRET_FILE")]
    secret_file: Option<PathBuf>,
}

impl Common {
    fn secret(&self) -> anyhow::Result<ClusterSecret> {
        let raw = match (&self.secret, &self.secret_file) {
            (Some(s), None) => s.clone().into_bytes(),
            (None, Some(p)) => {
                let mut b = std::fs::read(p).with_context(|| format!("read {}", p.display()))?;
                while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                    b.pop();
                }
                b
            }
            (Some(_), Some(_)) => bail!("give either --secret or --secret-file, not both"),
            (None, None) => bail!("a cluster secret is required: --secret or --secret-file"),
        };
        Ok(ClusterSecret::new(raw)?)
    }
}

#[derive(Args, Debug)]
struct InitArgs {
    #[command(flatten)]
    common: Common,
    /// Client address of every replica of the initial replica set (all must be running).
    #[arg(
        long = "coordinator",
        env = "RINGPOST_COORD_COORDINATORS",
        value_delimiter = ','
    )]
    coordinator: Vec<SocketAddr>,
    /// Cluster id (default: random).
    #[arg(long, env = "RINGPOST_COORD_CLUSTER_ID")]
    cluster_id: Option<String>,
    /// Number of shards, fixed for the life of the cluster.
    #[arg(long, env = "RINGPOST_COORD_SHARD_COUNT", default_value_t = 4096)]
    shard_count: u32,
    /// Copies of each shard, the primary included (1 to 3); fewer while fewer nodes are active.
    /// Change it later with `ctl set-replication`. Placement only: data is not replicated yet.
    #[arg(
        long,
        env = "RINGPOST_COORD_REPLICATION_FACTOR",
        default_value_t = DEFAULT_REPLICATION_FACTOR
    )]
    replication_factor: u32,
    /// How often nodes heartbeat the leader.
    #[arg(
        long,
        env = "RINGPOST_COORD_HEARTBEAT_INTERVAL_MS",
        default_value_t = 1000
    )]
    heartbeat_interval_ms: u64,
    /// Missed heartbeats after which the leader marks a node down.
    #[arg(long, env = "RINGPOST_COORD_HEARTBEAT_MISS_LIMIT", default_value_t = 5)]
    heartbeat_miss_limit: u32,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// This replica's id (unique, not 0). Required.
    #[arg(long, env = "RINGPOST_COORD_REPLICA_ID")]
    replica_id: Option<u64>,
    /// Directory for the Raft log, vote and snapshots (RocksDB).
    #[arg(
        long,
        env = "RINGPOST_COORD_DATA_DIR",
        default_value = "./coordinator-data"
    )]
    data_dir: PathBuf,
    /// Listen address for other replicas (port 0: any free port).
    #[arg(
        long,
        env = "RINGPOST_COORD_RAFT_LISTEN",
        default_value = "0.0.0.0:7400"
    )]
    raft_listen: SocketAddr,
    /// Listen address for nodes and ctl (port 0: any free port).
    #[arg(
        long,
        env = "RINGPOST_COORD_CLIENT_LISTEN",
        default_value = "0.0.0.0:7401"
    )]
    client_listen: SocketAddr,
    /// Listen address for plain HTTP `/metrics` (Prometheus) and `/healthz` (port 0: any free
    /// port). Unauthenticated: keep it on loopback or a private interface.
    #[arg(
        long,
        visible_alias = "listen-admin",
        env = "RINGPOST_COORD_ADMIN_LISTEN",
        default_value = "127.0.0.1:7402"
    )]
    admin_listen: SocketAddr,
    /// Address other replicas reach this one on (default: the bound raft address).
    #[arg(long, env = "RINGPOST_COORD_RAFT_ADVERTISE")]
    raft_advertise: Option<String>,
    /// Address clients are redirected to (default: the bound client address).
    #[arg(long, env = "RINGPOST_COORD_CLIENT_ADVERTISE")]
    client_advertise: Option<String>,
    /// Raft leader heartbeat interval.
    #[arg(long, env = "RINGPOST_COORD_RAFT_HEARTBEAT_MS", default_value_t = 100)]
    raft_heartbeat_ms: u64,
    /// Lower bound of the Raft election timeout.
    #[arg(
        long,
        env = "RINGPOST_COORD_ELECTION_TIMEOUT_MIN_MS",
        default_value_t = 500
    )]
    election_timeout_min_ms: u64,
    /// Upper bound of the Raft election timeout.
    #[arg(
        long,
        env = "RINGPOST_COORD_ELECTION_TIMEOUT_MAX_MS",
        default_value_t = 1000
    )]
    election_timeout_max_ms: u64,
    /// Snapshot every this many applied log entries.
    #[arg(
        long,
        env = "RINGPOST_COORD_SNAPSHOT_EVERY_ENTRIES",
        default_value_t = 1000
    )]
    snapshot_every_entries: u64,
    /// Most concurrent client connections.
    #[arg(
        long,
        env = "RINGPOST_COORD_MAX_CLIENT_CONNECTIONS",
        default_value_t = 4096
    )]
    max_client_connections: usize,
    /// Load and check the configuration as a start would (the secret file is read, the Raft
    /// timings checked), then exit: 0 and `configuration ok`, or the error. Binds nothing and
    /// opens no data.
    #[arg(long, action = ArgAction::SetTrue)]
    check_config: bool,
}

#[derive(Args, Debug)]
struct CtlArgs {
    #[command(flatten)]
    common: Common,
    /// Client address of a replica (repeat for failover; any replica will do).
    #[arg(
        long = "coordinator",
        env = "RINGPOST_COORD_COORDINATORS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7401"
    )]
    coordinator: Vec<SocketAddr>,
    /// Print JSON instead of text.
    #[arg(long, env = "RINGPOST_COORD_JSON", action = ArgAction::SetTrue)]
    json: bool,
    #[command(subcommand)]
    op: CtlOp,
}

#[derive(Subcommand, Debug)]
enum CtlOp {
    /// Raft and cluster status of every given replica.
    Status,
    /// Members and their states (linearizable, from the leader).
    Members,
    /// The whole cluster view as JSON.
    View,
    /// Start draining a node (its shards move away; the epoch changes).
    Drain {
        /// Node id.
        node: u64,
    },
    /// Forget a node.
    Remove {
        /// Node id.
        node: u64,
    },
    /// Make a joining or draining node own shards again.
    Activate {
        /// Node id.
        node: u64,
    },
    /// Set the replication factor: copies of each shard, the primary included (1 to 3). A new
    /// epoch iff the copies per shard (at most the active nodes) change; primaries never move.
    /// Placement only: data is not replicated yet.
    SetReplication {
        /// The new factor.
        factor: u32,
    },
    /// Set the failure detector's timing: nodes heartbeat every --interval-ms and are marked
    /// down after --miss-limit missed. Only to a timeout (interval × limit) no shorter than the
    /// current one: nodes hold write leases computed from it.
    SetHeartbeat {
        /// How often nodes heartbeat (10 to 60000 ms).
        #[arg(long)]
        interval_ms: u64,
        /// Missed heartbeats before a node is marked down (1 to 100).
        #[arg(long)]
        miss_limit: u32,
    },
}

/// `--config PATH`, `--config=PATH` or `RINGPOST_COORD_CONFIG`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("RINGPOST_COORD_CONFIG").map(PathBuf::from)
}

fn toml_scalar(key: &str, v: toml::Value) -> anyhow::Result<String> {
    Ok(match v {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Float(f) => f.to_string(),
        other => bail!("`{key}`: unsupported value {other}"),
    })
}

/// Makes every key of the TOML file the default of the arg with that id, in every subcommand
/// that has one. Unknown keys are an error (typos must not pass silently).
fn apply_config_file(mut cmd: clap::Command, path: &Path) -> anyhow::Result<clap::Command> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("parse {}", path.display()))?;
    for (key, value) in table {
        let values = match value {
            toml::Value::Array(a) => a
                .into_iter()
                .map(|v| toml_scalar(&key, v))
                .collect::<anyhow::Result<Vec<_>>>()?,
            v => vec![toml_scalar(&key, v)?],
        };
        let id = key.replace('-', "_");
        let mut found = false;
        if cmd.get_arguments().any(|a| a.get_id() == id.as_str()) {
            found = true;
            let vals = values.clone();
            cmd = cmd.mut_arg(id.clone(), |a| a.default_values(vals));
        }
        let names: Vec<String> = cmd
            .get_subcommands()
            .map(|s| s.get_name().to_owned())
            .collect();
        for name in names {
            let has = cmd
                .find_subcommand(&name)
                .is_some_and(|sc| sc.get_arguments().any(|a| a.get_id() == id.as_str()));
            if has {
                found = true;
                let vals = values.clone();
                let id = id.clone();
                cmd =
                    cmd.mut_subcommand(name, move |sc| sc.mut_arg(id, |a| a.default_values(vals)));
            }
        }
        if !found {
            bail!("{}: unknown option `{key}`", path.display());
        }
    }
    Ok(cmd)
}

fn parse_cli() -> anyhow::Result<Cli> {
    let args: Vec<OsString> = std::env::args_os().collect();
    let mut cmd = Cli::command();
    if let Some(path) = config_path(&args) {
        cmd = apply_config_file(cmd, &path)?;
    }
    let matches = cmd.get_matches_from(args);
    Ok(Cli::from_arg_matches(&matches)?)
}

fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).context("--log")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|e| anyhow::anyhow!("logging: {e}"))
}

fn main() -> anyhow::Result<()> {
    let cli = parse_cli()?;
    init_logging(cli.log_format, &cli.log)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Init(a) => init(a).await,
            Command::Run(a) => run(a).await,
            Command::Ctl(a) => ctl(a).await,
        }
    })
}

async fn init(a: InitArgs) -> anyhow::Result<()> {
    if a.coordinator.is_empty() {
        bail!("init needs --coordinator for every replica of the initial replica set");
    }
    let params = InitParams {
        cluster_id: a.cluster_id,
        shard_count: a.shard_count,
        replication_factor: a.replication_factor,
        heartbeat_interval_ms: a.heartbeat_interval_ms,
        heartbeat_miss_limit: a.heartbeat_miss_limit,
    };
    let view = ringpost_coordinator::client::init_cluster(
        a.coordinator.clone(),
        a.common.secret()?,
        params,
    )
    .await
    .context("init")?;
    println!(
        "initialized cluster {} with {} replicas: shards {}, replication factor {}, epoch {}",
        view.cluster_id,
        a.coordinator.len(),
        view.shard_count,
        view.replication_factor,
        view.epoch
    );
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let Some(replica_id) = a.replica_id else {
        bail!("run needs --replica-id (or RINGPOST_COORD_REPLICA_ID, or replica_id in --config)");
    };
    let mut config = CoordinatorConfig::new(replica_id, a.data_dir.clone(), a.common.secret()?);
    config.raft_listen = a.raft_listen;
    config.client_listen = a.client_listen;
    config.admin_listen = Some(a.admin_listen);
    config.raft_advertise = a.raft_advertise;
    config.client_advertise = a.client_advertise;
    config.timings = RaftTimings {
        heartbeat_interval_ms: a.raft_heartbeat_ms,
        election_timeout_min_ms: a.election_timeout_min_ms,
        election_timeout_max_ms: a.election_timeout_max_ms,
    };
    config.snapshot_every_entries = a.snapshot_every_entries;
    config.max_client_connections = a.max_client_connections;
    if a.check_config {
        config.check()?;
        match &a.common.config {
            Some(path) => println!("configuration ok: {}", path.display()),
            None => println!("configuration ok"),
        }
        return Ok(());
    }
    let c = Coordinator::start(config).await.context("start replica")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening raft {}", c.raft_addr())?;
        writeln!(out, "listening client {}", c.client_addr())?;
        if let Some(admin) = c.admin_addr() {
            writeln!(out, "listening admin http://{admin}")?;
        }
        out.flush()?;
    }
    shutdown_signal().await?;
    tracing::info!("shutting down");
    c.shutdown().await;
    Ok(())
}

async fn ctl(a: CtlArgs) -> anyhow::Result<()> {
    let secret = a.common.secret()?;
    if a.coordinator.is_empty() {
        bail!("ctl needs at least one --coordinator");
    }
    if matches!(a.op, CtlOp::Status) {
        return ctl_status(&a.coordinator, secret, a.json).await;
    }
    let client = CoordinatorClient::connect(a.coordinator.clone(), secret)
        .await
        .context("connect")?;
    let view = match a.op {
        CtlOp::Drain { node } => client.drain(node).await?,
        CtlOp::Remove { node } => client.remove(node).await?,
        CtlOp::Activate { node } => client.activate(node).await?,
        CtlOp::SetReplication { factor } => client.set_replication(factor).await?,
        CtlOp::SetHeartbeat {
            interval_ms,
            miss_limit,
        } => client.set_heartbeat(interval_ms, miss_limit).await?,
        CtlOp::Status | CtlOp::Members | CtlOp::View => client.view().await?,
    };
    if a.json || matches!(a.op, CtlOp::View) {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print_members(&view);
    }
    Ok(())
}

async fn ctl_status(addrs: &[SocketAddr], secret: ClusterSecret, json: bool) -> anyhow::Result<()> {
    let options = ClientOptions {
        retry_budget: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    let mut reports: Vec<(SocketAddr, Result<StatusReport, String>)> = Vec::new();
    for addr in addrs {
        let r = async {
            let c = CoordinatorClient::connect_with(vec![*addr], secret.clone(), options).await?;
            c.status().await
        }
        .await
        .map_err(|e| e.to_string());
        reports.push((*addr, r));
    }
    if json {
        let out: Vec<serde_json::Value> = reports
            .iter()
            .map(|(addr, r)| match r {
                Ok(s) => serde_json::json!({ "addr": addr.to_string(), "status": s }),
                Err(e) => serde_json::json!({ "addr": addr.to_string(), "error": e }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (addr, r) in &reports {
            match r {
                Ok(s) => println!(
                    "replica {} at {}: {}, term {}, leader {}, last log {}, applied {}",
                    s.replica.replica_id,
                    addr,
                    s.raft_role,
                    s.term,
                    s.leader_id.map_or("none".into(), |l| l.to_string()),
                    s.last_log_index.map_or("-".into(), |i| i.to_string()),
                    s.last_applied_index.map_or("-".into(), |i| i.to_string()),
                ),
                Err(e) => println!("replica at {addr}: unreachable: {e}"),
            }
        }
        match reports.iter().find_map(|(_, r)| r.as_ref().ok()?.view.as_ref()) {
            Some(v) => println!(
                "cluster {}: epoch {}, revision {}, shards {}, replication factor {} (copies per shard: {}), {} members ({} active)",
                v.cluster_id,
                v.epoch,
                v.revision,
                v.shard_count,
                v.replication_factor,
                v.copies(),
                v.members.len(),
                v.owners().count()
            ),
            None => println!("cluster: not initialized"),
        }
    }
    if reports.iter().all(|(_, r)| r.is_err()) {
        bail!("no replica reachable");
    }
    Ok(())
}

fn print_members(view: &ClusterView) {
    println!(
        "cluster {} epoch {} revision {} replication factor {} (copies per shard: {})",
        view.cluster_id,
        view.epoch,
        view.revision,
        view.replication_factor,
        view.copies()
    );
    println!(
        "{:>8}  {:<9} {:<10} {:<28} {:<28} {:<22} {:<22}",
        "NODE", "STATE", "ZONE", "WS", "WSS", "QUIC", "PEER"
    );
    let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    for m in &view.members {
        println!(
            "{:>8}  {:<9} {:<10} {:<28} {:<28} {:<22} {:<22}",
            m.info.node_id,
            m.state.as_str(),
            if m.info.zone.is_empty() {
                "-"
            } else {
                &m.info.zone
            },
            dash(&m.info.ws_url),
            dash(&m.info.wss_url),
            dash(&m.info.quic_addr),
            dash(&m.info.peer_addr),
        );
    }
}
