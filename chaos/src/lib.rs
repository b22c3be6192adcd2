//! `ringpost-chaos`: fault injection on real processes, checked against the design invariants.
//!
//! How the parts fit:
//! - [`history`]: the record of a run, JSON lines, written by every process of the run.
//! - [`check`]: the pure checker: history in, violations (lost, duplicated, reordered, leaked,
//!   phantom) out, each with its msg_id and the faults around it.
//! - [`hosts`]: network-namespace hosts on a bridge (or loopback addresses without root), with a
//!   state file so `cleanup` can remove what a crashed run left.
//! - [`node`]: a node process on a host (`ringpost-node dev`, or `ringpost-node run` as a cluster
//!   member), started, killed, paused, restarted and waited for when it leaves, optionally
//!   under `faketime` or libfiu.
//! - [`coordinator`]: a `ringpost-coordinator run` replica on a host.
//! - [`cluster`]: the coordinator side of a cluster run: its replicas, `init`, and `ctl` (who
//!   leads, member states, drain, remove).
//! - [`faults`]: the fault kinds and what applying and healing each one does (membership
//!   changes of a cluster in [`faults::membership`]).
//! - [`attack`]: the attackers of the `abuse-*` scenarios (a process on the `attacker` host),
//!   and [`probe`]: the node's RSS and `/readyz` sampled during those runs.
//! - [`relay`]: a TCP and UDP relay placed between hosts for delay, jitter, reordering,
//!   duplication and loss (this kernel has no netem).
//! - [`workload`]: SDK devices sending 1:1 messages and read receipts on a seeded schedule,
//!   recording everything into the history.
//! - [`scenario`]: the catalogue of scenarios and the run: hosts, the dev node or a cluster,
//!   workload, the seeded fault schedule, settle, check, report.
//!
//! One seed fixes the workload and the fault schedule: every random choice comes from a
//! ChaCha RNG derived from it ([`seeded`]).

#![forbid(unsafe_code)]

pub mod attack;
pub mod check;
pub mod cluster;
pub mod coordinator;
pub mod faults;
pub mod history;
pub mod hosts;
pub mod node;
pub mod probe;
pub mod process;
pub mod relay;
pub mod report;
pub mod scenario;
pub mod sys;
pub mod workload;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The RNG for one purpose of a run: the run's seed mixed with a stream name, so adding a random
/// choice in one part does not shift the choices of another.
pub fn seeded(seed: u64, stream: &str) -> ChaCha8Rng {
    // FNV-1a of the stream name, mixed into the seed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in stream.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ h.rotate_left(17));
    rng.set_stream(h);
    rng
}
