//! `ringpost-bench`: Ringpost's load generator and comparison runs.
//!
//! - Scenarios ([`scenario`]): `idle`, `chat`, `offline-drain`, `reconnect-storm`, and `group`
//!   (in this process on the client SDK, without workers). Each of the others has a parent side that
//!   finds or starts the node ([`run`]), gets registered devices ([`accounts`]), starts
//!   [`worker`]s, steps them through the scenario's phases and merges their figures exactly
//!   ([`stats`]), and a worker side built from one per-device task
//!   ([`scenario::device`]) on the lean load client ([`loadclient`]).
//! - Outputs ([`report`], [`chart`]): a human table, `--json FILE`, `--chart FILE.svg`.
//! - `compare` ([`compare`]): the same idle and chat workloads against Ringpost, mosquitto
//!   (MQTT 3.1.1, QoS 1) and nats-server (core NATS), side by side.
//! - Local measurements come from `/proc` ([`sysmem`]), the node's own from its admin port
//!   ([`node`]).
//!
//! The load generator and the node share this machine's two cores: every figure is a lower
//! bound of what the node does alone, and every report says so.

#![forbid(unsafe_code)]

mod accounts;
mod chart;
mod compare;
mod loadclient;
mod million;
mod node;
mod report;
mod run;
mod scenario;
mod stats;
mod sysmem;
mod worker;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ringpost load generator: idle connections, 1:1 chat, offline drain, reconnect storms, and
/// side-by-side comparisons with other brokers.
///
/// Point it at a node with --target URL (and --admin, --ca-file, --codes-file), or let it
/// start a dev node with --spawn-node PATH/TO/ringpost-node.
#[derive(Parser, Debug)]
#[command(name = "ringpost-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// N connections that authenticate and stay; reports server memory per connection.
    Idle {
        #[command(flatten)]
        common: run::Common,
        #[command(flatten)]
        args: scenario::idle::Args,
    },
    /// 1:1 pairs at a fixed rate or saturating; latency percentiles and throughput.
    Chat {
        #[command(flatten)]
        common: run::Common,
        #[command(flatten)]
        args: scenario::chat::Args,
    },
    /// Groups of --members devices spread over the nodes, --senders per group sending at a
    /// fixed rate; member deliveries/s, latency to the first and last member, CPU per delivery.
    Group {
        #[command(flatten)]
        common: run::Common,
        #[command(flatten)]
        args: scenario::group::Args,
    },
    /// Queue messages to offline devices, reconnect them, measure the drain rate.
    OfflineDrain {
        #[command(flatten)]
        common: run::Common,
        #[command(flatten)]
        args: scenario::drain::Args,
    },
    /// Drop N devices at once and reconnect them; time until all are back and draining.
    ReconnectStorm {
        #[command(flatten)]
        common: run::Common,
        #[command(flatten)]
        args: scenario::storm::Args,
    },
    /// A cluster on this host (one coordinator, many nodes) holding a million idle
    /// authenticated ws connections from worker processes on many source addresses; memory,
    /// keepalive CPU, a ping check and messages between random pairs at the end.
    Million(million::Args),
    /// Run idle and chat against Ringpost, mosquitto and nats-server side by side.
    Compare(compare::Args),
    /// Register devices into the --accounts file until it holds --count of them, and exit
    /// (prepares large runs; registration uses --transport like any run).
    Register {
        #[command(flatten)]
        common: run::Common,
        /// Devices the accounts file should hold.
        #[arg(long)]
        count: usize,
    },
    /// Internal: one worker process of a larger run (spec on stdin, reports on stdout).
    #[command(hide = true)]
    Worker,
}

fn main() -> std::process::ExitCode {
    // Transparent huge pages off, as in the node (its `main` says why): mimalloc's arenas
    // otherwise fill up in 2 MiB pages, and the million's workers are measured as the
    // generator's memory.
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!("ringpost-bench: could not turn transparent huge pages off: {e}");
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ringpost-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        if let Command::Worker = cli.command {
            return worker::child_main().await;
        }
        // Everything started (a node, brokers, workers) is owned by the run's future and
        // killed when it is dropped: on completion, on error, and on Ctrl-C or SIGTERM.
        tokio::select! {
            r = dispatch(cli.command) => r,
            s = interrupted() => Err(anyhow::anyhow!("interrupted by {s}; stopped everything this run started")),
        }
    });
    // Kill leftovers before the runtime goes (dropping it aborts remaining tasks).
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringpost-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Idle { common, args } => scenario::idle::run(&common, &args).await.map(drop),
        Command::Chat { common, args } => scenario::chat::run(&common, &args).await.map(drop),
        Command::OfflineDrain { common, args } => {
            scenario::drain::run(&common, &args).await.map(drop)
        }
        Command::ReconnectStorm { common, args } => {
            scenario::storm::run(&common, &args).await.map(drop)
        }
        Command::Group { common, args } => scenario::group::run(&common, &args).await.map(drop),
        Command::Compare(args) => compare::run(&args).await,
        Command::Million(args) => million::run(&args).await,
        Command::Register { common, count } => {
            if common.accounts.is_none() {
                anyhow::bail!("register needs --accounts FILE to write to");
            }
            let setup = run::Setup::new(&common).await?;
            let t = std::time::Instant::now();
            let accounts = setup.accounts(&common, count).await?;
            println!(
                "{} devices in the accounts file ({:.1} s)",
                accounts.len(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Worker => Ok(()),
    }
}

/// Resolves on Ctrl-C or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "Ctrl-C";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term.recv() => "SIGTERM",
    }
}
