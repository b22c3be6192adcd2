//! Tests of the replication layer on real RocksDB: the record codec, the primary's wrapper,
//! a replica's apply, and the services writing through a primary into an in-process replica.

mod adopting;
mod applying;
mod catching_up;
mod codec;
mod engine;
mod receipts;
mod services;
mod shipping;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{apply, RecordKind, ShardLogRecord, ShardLogSink, ShipError};
use crate::handoff::{export_chunk, Row, CHUNK_BYTES_DEFAULT};
use crate::shard::ShardId;
use crate::storage::rocks::{RocksConfig, RocksEngine};
use crate::storage::Engine;

/// A RocksDB engine in a temporary directory.
fn rocks() -> (Arc<RocksEngine>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let engine = RocksEngine::open(dir.path(), &RocksConfig::for_tests()).unwrap();
    (Arc::new(engine), dir)
}

/// A sink that sends every record through its encoding and applies it to a replica engine,
/// keeping what it shipped.
struct ApplySink {
    replica: Arc<dyn Engine>,
    shipped: Mutex<Vec<(Vec<ShardLogRecord>, bool)>>,
    /// Set: the next call loses its records on the way and fails.
    lose_next: AtomicBool,
}

impl ApplySink {
    fn new(replica: Arc<dyn Engine>) -> Arc<ApplySink> {
        Arc::new(ApplySink {
            replica,
            shipped: Mutex::new(Vec::new()),
            lose_next: AtomicBool::new(false),
        })
    }

    fn records(&self) -> Vec<ShardLogRecord> {
        let shipped = self.shipped.lock().unwrap();
        shipped
            .iter()
            .flat_map(|(r, _)| r.iter().cloned())
            .collect()
    }
}

impl ShardLogSink for ApplySink {
    fn ship(&self, records: Vec<ShardLogRecord>, sync: bool) -> Result<(), ShipError> {
        if self.lose_next.swap(false, Ordering::Relaxed) {
            return Err(ShipError("replica unreachable".into()));
        }
        let decoded: Vec<ShardLogRecord> = records
            .iter()
            .map(|r| ShardLogRecord::decode(&r.encode()))
            .collect::<Result<_, _>>()
            .map_err(|e| ShipError(e.to_string()))?;
        assert_eq!(decoded, records, "the encoding round-trips");
        apply(&*self.replica, &decoded).map_err(|e| ShipError(e.to_string()))?;
        self.shipped.lock().unwrap().push((records, sync));
        Ok(())
    }
}

/// Every row of `shard` in `engine`, in export order.
fn rows_of(engine: &dyn Engine, shard: ShardId) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut cursor = None;
    loop {
        let chunk = export_chunk(engine, shard, cursor.as_ref(), CHUNK_BYTES_DEFAULT).unwrap();
        rows.extend(chunk.rows);
        match chunk.next {
            Some(next) => cursor = Some(next),
            None => return rows,
        }
    }
}
