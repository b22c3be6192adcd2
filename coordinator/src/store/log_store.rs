//! The Raft log and vote on RocksDB.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, StorageIOError, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::{io_err, Db, CF_LOGS, CF_META};
use crate::raft_types::{StorageError, TypeConfig};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// The log store; clones share the database (a clone is also the log reader).
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Db,
    committed: CommittedIndex,
}

/// The last commit index the store saved or read back, for metrics: openraft's own metrics do
/// not carry it. Clones share it.
#[derive(Clone, Debug, Default)]
pub(crate) struct CommittedIndex(Arc<AtomicU64>);

impl CommittedIndex {
    /// The index; `None` before anything was committed.
    pub(crate) fn get(&self) -> Option<u64> {
        // Stored as index + 1, so 0 is "none".
        self.0.load(Ordering::Relaxed).checked_sub(1)
    }

    fn set(&self, committed: Option<LogId<u64>>) {
        let v = committed.map_or(0, |l| l.index.saturating_add(1));
        self.0.store(v, Ordering::Relaxed);
    }
}

impl LogStore {
    pub(super) fn new(db: Db) -> Self {
        LogStore {
            db,
            committed: CommittedIndex::default(),
        }
    }

    /// A handle on the commit index this store last saved (or read back at start).
    pub(crate) fn committed_index(&self) -> CommittedIndex {
        self.committed.clone()
    }

    fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let Some(bytes) = self
            .db
            .get_meta(key)
            .map_err(|e| StorageIOError::read(io_err(e)))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StorageIOError::read(io_err(e)).into())
    }

    fn last_purged(&self) -> Result<Option<LogId<u64>>, StorageError> {
        self.read_json(KEY_LAST_PURGED)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let cf = self.db.cf(CF_LOGS)?;
        let key = index_key(start);
        let mut out = Vec::new();
        for item in self
            .db
            .0
            .iterator_cf(cf, IteratorMode::From(&key, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(io_err(e)))?;
            let Some(index) = key_index(&k) else {
                return Err(StorageIOError::read_logs(openraft::AnyError::error(
                    "malformed log key",
                ))
                .into());
            };
            if !range.contains(&index) {
                break;
            }
            let entry: Entry<TypeConfig> = serde_json::from_slice(&v)
                .map_err(|e| StorageIOError::read_log_at_index(index, io_err(e)))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let cf = self.db.cf(CF_LOGS)?;
        let last = match self.db.0.iterator_cf(cf, IteratorMode::End).next() {
            None => None,
            Some(item) => {
                let (_, v) = item.map_err(|e| StorageIOError::read_logs(io_err(e)))?;
                let e: Entry<TypeConfig> =
                    serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(io_err(e)))?;
                Some(e.log_id)
            }
        };
        let last_purged_log_id = self.last_purged()?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        let v = serde_json::to_vec(vote).map_err(|e| StorageIOError::write_vote(io_err(e)))?;
        b.put_cf(self.db.cf(CF_META)?, KEY_VOTE, v);
        self.db
            .write_synced(b)
            .await
            .map_err(|e| StorageIOError::write_vote(io_err(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.read_json(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        let v = serde_json::to_vec(&committed).map_err(|e| StorageIOError::write(io_err(e)))?;
        b.put_cf(self.db.cf(CF_META)?, KEY_COMMITTED, v);
        // Not synced: losing it only means re-applying less at restart until the leader
        // re-announces the commit index.
        self.db
            .0
            .write(b)
            .map_err(|e| StorageIOError::write(io_err(e)))?;
        self.committed.set(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError> {
        let committed = self
            .read_json::<Option<LogId<u64>>>(KEY_COMMITTED)?
            .flatten();
        self.committed.set(committed);
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.db.cf(CF_LOGS)?;
        let mut b = WriteBatch::default();
        for e in entries {
            let v = serde_json::to_vec(&e)
                .map_err(|err| StorageIOError::write_log_entry(e.log_id, io_err(err)))?;
            b.put_cf(cf, index_key(e.log_id.index), v);
        }
        // Written (and synced) before returning, so the entries are readable on return and
        // durable when the callback fires.
        let res = self.db.write_synced(b).await;
        let ret = res
            .as_ref()
            .map(|_| ())
            .map_err(|e| StorageIOError::write_logs(openraft::AnyError::error(e.to_string())));
        callback.log_io_completed(res);
        ret.map_err(Into::into)
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        b.delete_range_cf(
            self.db.cf(CF_LOGS)?,
            index_key(log_id.index),
            index_key(u64::MAX),
        );
        b.delete_cf(self.db.cf(CF_LOGS)?, index_key(u64::MAX));
        self.db
            .write_synced(b)
            .await
            .map_err(|e| StorageIOError::write_logs(io_err(e)).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let mut b = WriteBatch::default();
        let v = serde_json::to_vec(&log_id).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        b.put_cf(self.db.cf(CF_META)?, KEY_LAST_PURGED, v);
        b.delete_range_cf(
            self.db.cf(CF_LOGS)?,
            index_key(0),
            index_key(log_id.index.saturating_add(1)),
        );
        self.db
            .write_synced(b)
            .await
            .map_err(|e| StorageIOError::write_logs(io_err(e)).into())
    }
}
