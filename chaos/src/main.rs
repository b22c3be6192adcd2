//! `ringpost-chaos`: fault injection checked against the design invariants.

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ringpost chaos suite: runs a real cluster on network-namespace hosts, injects faults on a
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
    /// Run one scenario.
    Run,
    /// Check a recorded history file.
    Check,
    /// Remove namespaces and processes left by a crashed run.
    Cleanup,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::bail!(
        "`ringpost-chaos {:?}` is not available in this build yet",
        cli.command
    )
}
