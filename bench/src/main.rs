//! `ringpost-bench`: load generator and comparison runs.

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ringpost load generator: idle connections, 1:1 chat, offline drain, reconnect storms, and
/// side-by-side comparisons with other brokers.
#[derive(Parser, Debug)]
#[command(name = "ringpost-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// N connections that authenticate and stay; reports server memory per connection.
    Idle,
    /// 1:1 pairs at a fixed rate or saturating; latency percentiles and throughput.
    Chat,
    /// Queue messages to offline devices, reconnect, measure the drain rate.
    OfflineDrain,
    /// Drop and reconnect N devices at once.
    ReconnectStorm,
    /// Run idle and chat against Ringpost and peers side by side.
    Compare,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::bail!(
        "`ringpost-bench {:?}` is not available in this build yet",
        cli.command
    )
}
