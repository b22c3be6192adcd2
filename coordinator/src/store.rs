//! Durable Raft storage on RocksDB: the log and vote ([`LogStore`]) and the state machine with
//! its snapshots ([`StateMachineStore`]), one database per replica with two column families:
//!
//! - `logs`: big-endian log index → JSON entry.
//! - `meta`: `vote`, `committed`, `last_purged`, `snapshot_meta`, `snapshot_data`.
//!
//! Votes, appends, truncations, purges and snapshots are written with a synced WAL before they
//! are acknowledged. The state machine lives in memory; it is rebuilt at start from the last
//! snapshot, and openraft re-applies the log up to the persisted `committed` id. Both stores pass
//! openraft's conformance suite (`openraft::testing::Suite`, see the tests below).

// openraft's storage traits impose `StorageError` (about 224 bytes) as the error type; the
// helpers here return it too rather than convert at every call.
#![allow(clippy::result_large_err)]

mod log_store;
mod state_machine;

use std::path::Path;
use std::sync::Arc;

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageIOError};
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

pub(crate) use log_store::{CommittedIndex, LogStore};
pub(crate) use state_machine::{StateMachineStore, ViewSender};

use crate::raft_types::StorageError;

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB refused to open the database.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// The data directory could not be created.
    #[error("data dir: {0}")]
    Io(#[from] std::io::Error),
    /// The stored snapshot could not be decoded.
    #[error("stored snapshot is corrupt: {0}")]
    CorruptSnapshot(String),
}

/// The database shared by both stores.
#[derive(Clone)]
pub(crate) struct Db(Arc<DbInner>);

pub(crate) struct DbInner {
    db: DB,
    /// Dropped after `db` (fields drop in order): tells [`ClosedWhenGone`] RocksDB has closed.
    _closed: tokio::sync::watch::Sender<()>,
}

impl std::ops::Deref for DbInner {
    type Target = DB;
    fn deref(&self) -> &DB {
        &self.db
    }
}

impl Db {
    fn open(dir: &Path) -> Result<(Db, ClosedWhenGone), rocksdb::Error> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // The coordinator's data is tiny: keep RocksDB's own footprint small.
        opts.set_max_background_jobs(2);
        opts.set_write_buffer_size(4 << 20);
        let cfs = [CF_LOGS, CF_META]
            .into_iter()
            .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        let (closed, closed_rx) = tokio::sync::watch::channel(());
        Ok((
            Db(Arc::new(DbInner {
                db,
                _closed: closed,
            })),
            ClosedWhenGone(closed_rx),
        ))
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StorageError> {
        self.0.cf_handle(name).ok_or_else(|| {
            StorageIOError::new(
                ErrorSubject::Store,
                ErrorVerb::Read,
                AnyError::error(format!("column family {name} missing")),
            )
            .into()
        })
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, rocksdb::Error> {
        match self.0.cf_handle(CF_META) {
            Some(cf) => self.0.get_cf(cf, key),
            None => Ok(None),
        }
    }

    /// Writes a batch with a synced WAL, off the async workers.
    async fn write_synced(&self, batch: WriteBatch) -> Result<(), std::io::Error> {
        let db = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.write_opt(batch, &wo)
        })
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)
    }
}

/// Opens (or creates) the replica's database in `dir`.
#[cfg(test)]
pub(crate) fn open(
    dir: &Path,
    views: ViewSender,
) -> Result<(LogStore, StateMachineStore), StoreError> {
    let (log, sm, _) = open_tracked(dir, views)?;
    Ok((log, sm))
}

/// Like [`open`], plus a handle that tells when every user of the database has let go of it
/// (RocksDB closes the database, and releases its lock, when the last one does).
pub(crate) fn open_tracked(
    dir: &Path,
    views: ViewSender,
) -> Result<(LogStore, StateMachineStore, ClosedWhenGone), StoreError> {
    std::fs::create_dir_all(dir)?;
    let (db, tracker) = Db::open(dir)?;
    let sm = StateMachineStore::open(db.clone(), views)?;
    Ok((LogStore::new(db), sm, tracker))
}

/// Tells when the database has been closed (its lock released).
pub(crate) struct ClosedWhenGone(tokio::sync::watch::Receiver<()>);

impl ClosedWhenGone {
    /// Waits (at most `timeout`) until the database is closed; `false` on timeout.
    pub(crate) async fn wait(&mut self, timeout: std::time::Duration) -> bool {
        let rx = &mut self.0;
        tokio::time::timeout(timeout, async move { while rx.changed().await.is_ok() {} })
            .await
            .is_ok()
    }
}

fn io_err(e: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&e)
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;
    use crate::raft_types::TypeConfig;

    struct RocksBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RocksBuilder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(io_err(e)))?;
            let (views, _) = tokio::sync::watch::channel(None);
            let (log, sm) = open(dir.path(), views)
                .map_err(|e| StorageIOError::write(AnyError::error(e.to_string())))?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn openraft_storage_conformance_suite() -> Result<(), StorageError> {
        Suite::test_all(RocksBuilder)
    }

    #[tokio::test]
    async fn log_and_vote_survive_reopen() {
        use openraft::storage::{RaftLogReaderExt, RaftLogStorage, RaftLogStorageExt};
        use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

        let dir = tempfile::tempdir().unwrap();
        {
            let (views, _) = tokio::sync::watch::channel(None);
            let (mut log, _sm) = open(dir.path(), views).unwrap();
            log.save_vote(&Vote::new(3, 1)).await.unwrap();
            let entries = (1..=5).map(|i| Entry::<TypeConfig> {
                log_id: LogId::new(CommittedLeaderId::new(3, 1), i),
                payload: EntryPayload::Blank,
            });
            log.blocking_append(entries).await.unwrap();
        }
        let (views, _) = tokio::sync::watch::channel(None);
        let (mut log, _sm) = open(dir.path(), views).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(5));
        let e = log.get_log_id(3).await.unwrap();
        assert_eq!(e.index, 3);
    }
}
