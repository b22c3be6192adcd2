//! `ringpost-node`: the edge node binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use ringpost_node::runtime::{Node, NodeOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ringpost edge node: terminates WebSocket and QUIC connections, routes end-to-end-encrypted
/// messages, and keeps offline inboxes in RocksDB.
#[derive(Parser, Debug)]
#[command(name = "ringpost-node", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, env = "RINGPOST_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One self-contained node for development: local data dir, self-signed TLS certificate,
    /// verification codes written to the log and to DATA_DIR/verification-codes.txt.
    Dev(DevArgs),
}

#[derive(clap::Args, Debug)]
struct DevArgs {
    /// Where RocksDB, the dev certificate and the verification-code file live.
    #[arg(long, default_value = "./data", env = "RINGPOST_DATA_DIR")]
    data_dir: PathBuf,
    /// WebSocket listener (plain). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7700", env = "RINGPOST_LISTEN_WS")]
    listen_ws: SocketAddr,
    /// WebSocket over TLS listener.
    #[arg(long, default_value = "127.0.0.1:7743", env = "RINGPOST_LISTEN_WSS")]
    listen_wss: SocketAddr,
    /// QUIC listener (UDP).
    #[arg(long, default_value = "127.0.0.1:7744", env = "RINGPOST_LISTEN_QUIC")]
    listen_quic: SocketAddr,
    /// Admin HTTP listener: /metrics, /healthz, /readyz.
    #[arg(long, default_value = "127.0.0.1:7780", env = "RINGPOST_LISTEN_ADMIN")]
    listen_admin: SocketAddr,
    /// Sends, receipts and typing indicators one device may make per second.
    #[arg(long, default_value_t = ringpost_node::server::DEVICE_RATE_PER_S, env = "RINGPOST_DEVICE_RATE")]
    device_rate: u32,
    /// Burst allowance on top of --device-rate.
    #[arg(long, default_value_t = ringpost_node::server::DEVICE_BURST, env = "RINGPOST_DEVICE_BURST")]
    device_burst: u32,
    /// Most entries kept in one device's inbox; senders get InboxFull beyond it.
    #[arg(long, default_value_t = ringpost_node::inbox::InboxConfig::default().device_quota, env = "RINGPOST_INBOX_QUOTA")]
    inbox_quota: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Dev(args) => dev(args).await,
        }
    })
}

async fn dev(args: DevArgs) -> Result<()> {
    let server = ringpost_node::server::ServerConfig {
        device_rate_per_s: args.device_rate,
        device_burst: args.device_burst,
        ..Default::default()
    };
    let inbox = ringpost_node::inbox::InboxConfig {
        device_quota: args.inbox_quota,
        ..Default::default()
    };
    let opts = NodeOptions {
        codes_file: Some(args.data_dir.join("verification-codes.txt")),
        data_dir: args.data_dir,
        listen_ws: Some(args.listen_ws),
        listen_wss: Some(args.listen_wss),
        listen_quic: Some(args.listen_quic),
        listen_admin: Some(args.listen_admin),
        tls: None,
        server,
        inbox,
        rocks: Default::default(),
    };
    let data_dir = opts.data_dir.clone();
    let node = Node::start(opts).await?;
    // Machine-readable lines (tests and scripts parse them), then a human summary.
    let b = &node.bound;
    if let Some(a) = b.ws {
        println!("listening ws ws://{a}");
    }
    if let Some(a) = b.wss {
        println!("listening wss wss://{a}");
    }
    if let Some(a) = b.quic {
        println!("listening quic quic://{a}");
    }
    if let Some(a) = b.admin {
        println!("listening admin http://{a}");
    }
    if let Some(ca) = &node.ca {
        println!("dev CA certificate (trust it in clients): {}", ca.display());
    }
    println!(
        "ringpost dev node ready; data in {}; verification codes in {}; Ctrl-C stops it",
        data_dir.display(),
        data_dir.join("verification-codes.txt").display()
    );
    wait_for_signal().await;
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
