//! Replication of shards at the storage layer (issue 19, in progress): physical, below every
//! service, so the inbox, accounts, keys and hand-off are replicated without knowing it.
//!
//! How the parts fit:
//! - [`split`] cuts a [`WriteBatch`](crate::storage::WriteBatch) into one op list per shard
//!   it touches, in the batch's order; node-local ops ([`Cf::Meta`](crate::storage::Cf::Meta))
//!   are not replicated.
//! - [`ShardLogRecord`] is one entry of a shard's log: `(shard, lsn, epoch, ops)`, with a
//!   versioned binary encoding whose decoder checks every bound ([`record`]'s constants) and
//!   that every op stays inside its shard.
//! - [`Position`] is a shard's log position in this node's copy: the last LSN it includes and
//!   its epoch, stored in [`Cf::ShardLog`](crate::storage::Cf::ShardLog) under the shard's
//!   prefix, in the same atomic batch as the data it covers. It moves with the shard in a
//!   hand-off (the family is in [`SHARD_CFS`](crate::shard_rows::SHARD_CFS)).
//! - [`ReplicatingEngine`] (the primary) wraps an [`Engine`](crate::storage::Engine): every
//!   committed batch becomes one record per shard it touches (a group commit of many messages
//!   costs one record per shard), written locally together with each shard's new position,
//!   then handed to a [`ShardLogSink`] before `write` returns.
//! - [`apply`] (a replica) writes records in LSN order, each atomically and durably with the
//!   shard's new position; a re-sent record is skipped, a gap refused with the LSN it needs.
//!
//! - [`NetworkSink`] (the primary) ships records to the replica nodes over peer links, one
//!   stream per node batching whatever is queued into one `Replicate` request, and makes a
//!   synced write wait until every replica has applied its records; [`RecordPart`] carries a
//!   record larger than a frame in several. [`serve_parts`] is the replica's side: it puts
//!   parts back together ([`Reassembly`]) and applies the records, answering per shard.
//!
//! Not here yet: in-sync sets, catch-up by snapshot, failover. The node uses the wrapper only
//! with `--replicate` (`NodeOptions::replicate`), experimental until those land.

mod apply;
mod engine;
pub mod part;
mod position;
pub mod record;
mod serve;
pub mod sink;
mod split;

pub use apply::{apply, apply_each, snapshot_clears, Applied, ApplyError};
pub use engine::{ReplicatingEngine, ShardLogSink, ShipError, Shipping};
pub use part::{Reassembly, RecordPart};
pub use position::{
    catch_up_key, position_key, read_catch_up, read_position, CatchUpMark, Position,
};
pub use record::{RecordError, RecordKind, ShardLogRecord};
pub use serve::{serve_parts, serve_parts_with, ReplicaOutcome, Served, ShardAnswer};
pub use sink::{NetworkSink, ReplicaLinks};
pub use split::{split, SplitError};

#[cfg(test)]
mod tests;
