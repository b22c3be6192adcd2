//! The state machine ([`ClusterState`] in memory) and its snapshots (in RocksDB).
//!
//! After every applied batch that changed the view, the new view is published on a
//! `tokio::sync::watch` channel: that is what the client listener serves and pushes to watchers.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageIOError, StoredMembership,
};
use rocksdb::WriteBatch;
use tokio::sync::watch;

use super::{io_err, Db, StoreError, CF_META};
use crate::protocol::MAX_SNAPSHOT_BYTES;
use crate::raft_types::{RaftNode, StorageError, TypeConfig};
use crate::state::{ApplyOutcome, ClusterState};
use crate::types::ClusterView;

const KEY_SNAPSHOT_META: &[u8] = b"snapshot_meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"snapshot_data";

/// Where applied views are published (`None` until `init` is applied).
pub(crate) type ViewSender = watch::Sender<Option<Arc<ClusterView>>>;

type Meta = SnapshotMeta<u64, RaftNode>;

/// What a snapshot holds besides the cluster state.
#[derive(Clone)]
struct Applied {
    last_applied: Option<LogId<u64>>,
    last_membership: StoredMembership<u64, RaftNode>,
    cluster: ClusterState,
}

/// Snapshot persistence shared by the state machine and its builders.
#[derive(Clone)]
struct Snapshots {
    db: Db,
    /// Serializes snapshot writes so an older snapshot never replaces a newer one.
    write_lock: Arc<tokio::sync::Mutex<()>>,
    /// Makes snapshot ids unique within this process.
    counter: Arc<AtomicU64>,
}

impl Snapshots {
    fn load(&self) -> Result<Option<(Meta, Vec<u8>)>, StorageError> {
        let read = |k| {
            self.db
                .get_meta(k)
                .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, io_err(e))))
        };
        let (Some(meta), Some(data)) = (read(KEY_SNAPSHOT_META)?, read(KEY_SNAPSHOT_DATA)?) else {
            return Ok(None);
        };
        let meta: Meta = serde_json::from_slice(&meta)
            .map_err(|e| StorageIOError::read_snapshot(None, io_err(e)))?;
        Ok(Some((meta, data)))
    }

    /// Stores `meta`/`data` unless a snapshot at least as new is already stored.
    async fn store(&self, meta: &Meta, data: &[u8]) -> Result<(), StorageError> {
        let _guard = self.write_lock.lock().await;
        if let Some((current, _)) = self.load()? {
            if current.last_log_id > meta.last_log_id {
                return Ok(());
            }
        }
        let err = |e: &dyn std::fmt::Display| {
            StorageError::from(StorageIOError::write_snapshot(
                Some(meta.signature()),
                AnyError::error(e.to_string()),
            ))
        };
        let m = serde_json::to_vec(meta).map_err(|e| err(&e))?;
        let mut b = WriteBatch::default();
        let cf = self.db.cf(CF_META)?;
        b.put_cf(cf, KEY_SNAPSHOT_META, m);
        b.put_cf(cf, KEY_SNAPSHOT_DATA, data);
        self.db.write_synced(b).await.map_err(|e| err(&e))
    }
}

/// The Raft state machine.
pub(crate) struct StateMachineStore {
    applied: Applied,
    snapshots: Snapshots,
    views: ViewSender,
}

impl StateMachineStore {
    pub(super) fn open(db: Db, views: ViewSender) -> Result<Self, StoreError> {
        let snapshots = Snapshots {
            db,
            write_lock: Arc::default(),
            counter: Arc::default(),
        };
        let mut applied = Applied {
            last_applied: None,
            last_membership: StoredMembership::default(),
            cluster: ClusterState::default(),
        };
        if let Some((meta, data)) = snapshots
            .load()
            .map_err(|e| StoreError::CorruptSnapshot(e.to_string()))?
        {
            applied.cluster = decode_state(&data).map_err(StoreError::CorruptSnapshot)?;
            applied.last_applied = meta.last_log_id;
            applied.last_membership = meta.last_membership;
        }
        let sm = StateMachineStore {
            applied,
            snapshots,
            views,
        };
        sm.publish();
        Ok(sm)
    }

    fn publish(&self) {
        let view = self.applied.cluster.view().map(Arc::new);
        self.views.send_if_modified(|current| {
            let changed = current.as_ref().map(|v| (v.revision, &v.cluster_id))
                != view.as_ref().map(|v| (v.revision, &v.cluster_id));
            if changed {
                *current = view;
            }
            changed
        });
    }
}

fn decode_state(data: &[u8]) -> Result<ClusterState, String> {
    let state: ClusterState = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    state.validate().map_err(|e| e.to_string())?;
    Ok(state)
}

/// Builds a snapshot from a copy of the state taken when the builder was created.
pub(crate) struct SnapshotBuilder {
    applied: Applied,
    snapshots: Snapshots,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let data = serde_json::to_vec(&self.applied.cluster)
            .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
        let n = self.snapshots.counter.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match &self.applied.last_applied {
            Some(l) => format!("{}-{}-{n}", l.leader_id, l.index),
            None => format!("none-{n}"),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied.last_applied,
            last_membership: self.applied.last_membership.clone(),
            snapshot_id,
        };
        self.snapshots.store(&meta, &data).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, RaftNode>), StorageError> {
        Ok((
            self.applied.last_applied,
            self.applied.last_membership.clone(),
        ))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyOutcome>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        for entry in entries {
            self.applied.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => ApplyOutcome::Nothing,
                EntryPayload::Normal(cmd) => {
                    match self.applied.cluster.apply(entry.log_id.index, &cmd) {
                        Ok(revision) => ApplyOutcome::Applied { revision },
                        Err(e) => {
                            tracing::debug!(index = entry.log_id.index, error = %e, "command refused");
                            ApplyOutcome::Refused(e)
                        }
                    }
                }
                EntryPayload::Membership(m) => {
                    self.applied.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    ApplyOutcome::Nothing
                }
            };
            out.push(outcome);
        }
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            applied: self.applied.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let bad = |m: String| {
            StorageError::from(StorageIOError::read_snapshot(
                Some(meta.signature()),
                AnyError::error(m),
            ))
        };
        if data.len() as u64 > MAX_SNAPSHOT_BYTES {
            return Err(bad(format!("snapshot of {} bytes", data.len())));
        }
        let cluster = decode_state(&data).map_err(bad)?;
        self.snapshots.store(meta, &data).await?;
        self.applied = Applied {
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
            cluster,
        };
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.snapshots.load()?.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
