//! `ringpost-coordinator`: the Raft membership service.

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ringpost coordinator: keeps cluster membership, the ring epoch and replica sets in a
/// Raft-replicated state machine (openraft). A dev node embeds a single-member coordinator;
/// the standalone service for multi-node clusters is not in this build yet.
#[derive(Parser, Debug)]
#[command(name = "ringpost-coordinator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new cluster (shard count, replication factor).
    Init,
    /// Run a coordinator replica.
    Run,
    /// Operator commands against any replica: status, members, drain, remove.
    Ctl,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::bail!(
        "`ringpost-coordinator {:?}` is not available in this build: multi-node clusters arrive with the coordinator work; use `ringpost-node dev` for a single node",
        cli.command
    )
}
