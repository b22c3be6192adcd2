//! [`RocksEngine`]: the node's [`Engine`] over RocksDB.
//!
//! One database per node, one column family per [`Cf`], every option chosen on purpose in
//! [`RocksConfig`] (each with its memory or disk cost). Writes always go through the WAL; a
//! `sync` write returns only once the WAL is fsynced. RocksDB stops accepting writes after a
//! fatal background error (e.g. a failed fsync); that is surfaced, not hidden: every later write
//! fails with the same error until the process reopens the database.

mod bodies;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use std::ffi::CStr;

use rocksdb::compaction_filter::{CompactionFilter, Decision};
use rocksdb::compaction_filter_factory::{CompactionFilterContext, CompactionFilterFactory};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Options,
    ReadOptions, SliceTransform, WriteOptions, DB, DEFAULT_COLUMN_FAMILY_NAME,
};

use super::{group_body_ref, Cf, Engine, Op, Result, StorageError, WriteBatch};

const MIB: usize = 1024 * 1024;

/// RocksDB options that matter for memory, file descriptors and durability. Worst-case memory
/// of the database is about `block_cache_bytes + write_buffer_bytes_total_max` (index and filter
/// blocks are charged to the block cache), plus iterators' pinned blocks.
#[derive(Debug, Clone)]
pub struct RocksConfig {
    /// One LRU block cache shared by every column family; also holds index and filter blocks,
    /// so table readers cost no memory outside it. Memory: exactly this, at most.
    pub block_cache_bytes: usize,
    /// Size of one memtable of one column family before it is frozen and flushed. Memory:
    /// up to `write_buffer_bytes_per_cf * write_buffers_per_cf_max` per family, capped in total
    /// by `write_buffer_bytes_total_max`. Small on purpose: every message inserts a few keys at
    /// random places in the inbox and dedup memtables, and a skiplist that fits in the CPU's
    /// cache costs far less per insert (measured: 8 MiB instead of 32 MiB took ~20% off the
    /// node's CPU per message at 20k msgs/s, BENCHMARKS.md); flushes come more often but
    /// mostly drop what acks already trimmed.
    pub write_buffer_bytes_per_cf: usize,
    /// Memtables (active + immutable, waiting for flush) per column family.
    pub write_buffers_per_cf_max: i32,
    /// Cap on the memtables of all column families together (RocksDB's `db_write_buffer_size`):
    /// when reached, the largest memtable is flushed.
    pub write_buffer_bytes_total_max: usize,
    /// Table files kept open (each holds a file descriptor; the process limit is shared with
    /// millions of sockets). Beyond it, RocksDB closes and reopens files through its table cache.
    pub open_files_max: i32,
    /// Background flush + compaction threads.
    pub background_jobs_max: i32,
    /// Once the WALs together exceed this, the column families pinning the oldest WAL are
    /// flushed so it can be deleted. Disk: at most about this much WAL.
    pub wal_bytes_total_max: u64,
    /// RocksDB's own info `LOG` files kept, and the size at which one is rotated. Disk: the
    /// product, at most.
    pub info_log_files_keep: usize,
    pub info_log_file_bytes_max: usize,
    /// How often every table file of the dedup family is compacted at least once, so that its
    /// compaction filter drops expired records even when no write triggers a compaction.
    pub dedup_periodic_compaction_secs: u64,
}

impl Default for RocksConfig {
    fn default() -> Self {
        Self {
            block_cache_bytes: 256 * MIB,
            write_buffer_bytes_per_cf: 8 * MIB,
            write_buffers_per_cf_max: 3,
            write_buffer_bytes_total_max: 256 * MIB,
            open_files_max: 512,
            background_jobs_max: 2,
            wal_bytes_total_max: 1024 * MIB as u64,
            info_log_files_keep: 4,
            info_log_file_bytes_max: 16 * MIB,
            dedup_periodic_compaction_secs: 24 * 60 * 60,
        }
    }
}

impl RocksConfig {
    /// Small buffers for tests: many databases open at once in one test binary.
    pub fn for_tests() -> Self {
        Self {
            block_cache_bytes: 8 * MIB,
            write_buffer_bytes_per_cf: MIB,
            write_buffers_per_cf_max: 2,
            write_buffer_bytes_total_max: 8 * MIB,
            open_files_max: 64,
            background_jobs_max: 2,
            wal_bytes_total_max: 64 * MIB as u64,
            info_log_files_keep: 1,
            info_log_file_bytes_max: MIB,
            dedup_periodic_compaction_secs: 24 * 60 * 60,
        }
    }
}

/// The RocksDB engine. Cheap to share behind an `Arc`; every method may be called from any
/// thread.
pub struct RocksEngine {
    /// `None` only between closing a failed database and opening it again ([`Engine::recover`]
    /// when the open failed): every call then fails with an I/O error.
    db: RwLock<Option<DB>>,
    path: PathBuf,
    config: RocksConfig,
    // Kept so the cache outlives every table reader (RocksDB holds its own reference too).
    block_cache: Cache,
    /// Held from reading the state of the group body rows a batch touches to writing the batch
    /// (`bodies.rs`): the store's counts are read-modify-written. Only such batches take it.
    bodies_lock: Mutex<()>,
}

impl std::fmt::Debug for RocksEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksEngine")
            .field("path", &self.path)
            .finish()
    }
}

type DbGuard<'a> = RwLockReadGuard<'a, Option<DB>>;

impl RocksEngine {
    /// Opens (creating if missing) the database at `path` with every family of [`Cf::ALL`].
    /// A family on disk that this version does not know is an error (a newer schema wrote it).
    pub fn open(path: impl AsRef<Path>, config: &RocksConfig) -> Result<Self> {
        let path = path.as_ref();
        let block_cache = Cache::new_lru_cache(config.block_cache_bytes);
        let db = Self::open_db(path, config, &block_cache)?;
        Ok(Self {
            db: RwLock::new(Some(db)),
            path: path.to_path_buf(),
            config: config.clone(),
            block_cache,
            bodies_lock: Mutex::new(()),
        })
    }

    /// Every stored pair of `cf` as it is on disk (group body rows as markers), for tests of
    /// the physical layout.
    #[cfg(test)]
    pub(crate) fn raw_pairs(&self, cf: Cf) -> Vec<(Vec<u8>, Vec<u8>)> {
        let guard = self.db().unwrap();
        let db = guard.as_ref().unwrap();
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        let mut it = db.raw_iterator_cf_opt(handle(db, cf).unwrap(), ro);
        it.seek_to_first();
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            out.push((k.to_vec(), v.to_vec()));
            it.next();
        }
        it.status().unwrap();
        out
    }

    /// Writes a pair as it is, past the group body translation (rows of an older version).
    #[cfg(test)]
    pub(crate) fn raw_put(&self, cf: Cf, key: &[u8], value: &[u8]) {
        let guard = self.db().unwrap();
        let db = guard.as_ref().unwrap();
        db.put_cf(handle(db, cf).unwrap(), key, value).unwrap();
    }

    /// The database, for one call (a read lock: [`Engine::recover`] waits for it).
    fn db(&self) -> Result<DbGuard<'_>> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(StorageError::Io(format!(
                "the database at {} is closed after a storage failure and could not be opened \
                 again yet",
                self.path.display()
            )));
        }
        Ok(guard)
    }

    fn open_db(path: &Path, config: &RocksConfig, block_cache: &Cache) -> Result<DB> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_paranoid_checks(true);
        db_opts.set_max_open_files(config.open_files_max);
        db_opts.set_max_background_jobs(config.background_jobs_max);
        db_opts.set_db_write_buffer_size(config.write_buffer_bytes_total_max);
        db_opts.set_max_total_wal_size(config.wal_bytes_total_max);
        db_opts.set_keep_log_file_num(config.info_log_files_keep);
        db_opts.set_max_log_file_size(config.info_log_file_bytes_max);
        // Spread table-file writeback instead of one large fsync at the end of a flush.
        db_opts.set_bytes_per_sync(MIB as u64);
        // Needed for in-place memtable updates (see `cf_options`). Concurrent memtable writes
        // only pay off with many writer threads; the inbox has one.
        db_opts.set_allow_concurrent_memtable_write(false);

        let on_disk = match DB::list_cf(&db_opts, path) {
            Ok(names) => names,
            // No database yet (or no CURRENT file): it will be created.
            Err(_) if !path.join("CURRENT").exists() => Vec::new(),
            Err(e) => return Err(classify(e.into_string())),
        };
        if let Some(unknown) = on_disk.iter().find(|name| {
            name.as_str() != DEFAULT_COLUMN_FAMILY_NAME
                && !Cf::ALL.iter().any(|cf| cf.name() == *name)
        }) {
            return Err(StorageError::Other(format!(
                "unknown column family {unknown:?} in {}: written by a newer version?",
                path.display()
            )));
        }

        let descriptors = Cf::ALL
            .iter()
            .map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf_options(*cf, config, block_cache)));
        DB::open_cf_descriptors(&db_opts, path, descriptors).map_err(|e| classify(e.into_string()))
    }

    /// Options of an iterator over `[from, to)` of `cf`. In [`Cf::Inbox`] (the one family with
    /// a prefix extractor), a forward scan within one device's prefix uses the prefix bloom
    /// filters, which skip every table file without that device; any other iterator there
    /// reads in total order, as the extractor would otherwise make keys of other prefixes
    /// undefined.
    fn bounded_read(cf: Cf, from: &[u8], to: &[u8], seek: Seek) -> ReadOptions {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(from);
        ro.set_iterate_upper_bound(to);
        if cf == Cf::Inbox {
            if seek == Seek::Forward && within_one_prefix(from, to, INBOX_PREFIX_LEN) {
                ro.set_prefix_same_as_start(true);
            } else {
                ro.set_total_order_seek(true);
            }
        }
        ro
    }
}

/// How an iterator is positioned.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seek {
    /// `seek(from)`, then forward.
    Forward,
    /// `seek_to_last`.
    Last,
}

/// [`Cf::Inbox`]'s prefix: a device (shard, user, device).
const INBOX_PREFIX_LEN: usize = crate::inbox::DEVICE_PREFIX_LEN;

/// Whether every key in `[from, to)` starts with the first `len` bytes of `from`.
fn within_one_prefix(from: &[u8], to: &[u8], len: usize) -> bool {
    let Some(prefix) = from.get(..len) else {
        return false;
    };
    to.starts_with(prefix) || to == super::prefix_end(prefix).as_slice()
}

fn handle(db: &DB, cf: Cf) -> Result<&ColumnFamily> {
    // Every family is created at open, so this only fails if the database is broken.
    db.cf_handle(cf.name())
        .ok_or_else(|| StorageError::Other(format!("column family {} is missing", cf.name())))
}

/// Options of one column family, chosen for its access pattern.
fn cf_options(cf: Cf, config: &RocksConfig, cache: &Cache) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    // Index and filter blocks live in (and are bounded by) the block cache; L0's stay pinned
    // since every read consults them.
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);

    let mut opts = Options::default();
    opts.set_write_buffer_size(config.write_buffer_bytes_per_cf);
    opts.set_max_write_buffer_number(config.write_buffers_per_cf_max);
    opts.set_level_compaction_dynamic_level_bytes(true);
    match cf {
        Cf::Inbox => {
            // Read by device: a drain is a scan of the device's prefix. Bloom filters of
            // prefixes (not whole keys, which nothing looks up) let that scan skip every table
            // file without the device; without them, a reconnect storm's drains spent 12% of
            // the nodes' CPU seeking into files (mostly L0) that did not hold the device.
            opts.set_prefix_extractor(SliceTransform::create_fixed_prefix(INBOX_PREFIX_LEN));
            table.set_bloom_filter(10.0, false);
            table.set_whole_key_filtering(false);
            // Values are ciphertext, which does not compress; keys are short.
            opts.set_compression_type(DBCompressionType::None);
            // Entries are deleted soon after they are written (acked), leaving runs of
            // tombstones that slow every drain scan: compact a table file once 64 of any 128
            // consecutive entries are deletions.
            opts.add_compact_on_deletion_collector_factory(128, 64, 0.5);
        }
        Cf::Dedup => {
            // Nearly every lookup is of a new msg_id: a bloom filter over the memtable answers
            // "absent" without walking its skiplist. Memory: 5% of each memtable.
            opts.set_memtable_prefix_bloom_ratio(0.05);
            opts.set_memtable_whole_key_filtering(true);
            table.set_bloom_filter(10.0, false);
            // Keys end in random msg_ids and values are 18 bytes: compressing the upper levels,
            // which every record passes through within minutes, cost 15% of compaction CPU at
            // saturation for little space. Only the last level, where records spend their
            // window, is compressed.
            opts.set_compression_type(DBCompressionType::None);
            opts.set_bottommost_compression_type(DBCompressionType::Lz4);
            opts.set_compaction_filter_factory(DedupExpiry);
            opts.set_periodic_compaction_seconds(config.dedup_periodic_compaction_secs);
        }
        Cf::InboxMeta => {
            // One small record per device, rewritten by every group that moves the device's
            // seq or floor: updated in place in the memtable instead of a new skiplist node per
            // version. RocksDB keeps the old sequence number on an in-place update, so a range
            // delete in this family could hide a later update: `write` never issues one here.
            opts.set_inplace_update_support(true);
            table.set_bloom_filter(10.0, false);
            opts.set_compression_type(DBCompressionType::Lz4);
        }
        Cf::Accounts
        | Cf::Verify
        | Cf::Prekeys
        | Cf::ShardLog
        | Cf::Meta
        | Cf::Contacts
        | Cf::PushQueue => {
            // Point lookups, many of them for keys that exist: 10 bits/key ≈ 1% false positives.
            table.set_bloom_filter(10.0, false);
            opts.set_compression_type(DBCompressionType::Lz4);
        }
        Cf::InboxExpiry => {
            // Keys only, read by range scans up to a time and deleted soon (an ack, or the
            // expiry itself): no bloom filter, no compression, and compact runs of deletions
            // as for the inbox.
            opts.set_compression_type(DBCompressionType::None);
            opts.add_compact_on_deletion_collector_factory(128, 64, 0.5);
        }
        Cf::Groups | Cf::GroupLog | Cf::GroupBodies | Cf::BodyStore => {
            // A group's state row, its send dedup rows, its log and its messages' stored bodies
            // (ciphertext, written once and deleted once fanned out or acknowledged; the shard
            // rows are markers and counts, the bodies are in the store): point lookups and
            // short prefix scans.
            table.set_bloom_filter(10.0, false);
            opts.set_compression_type(DBCompressionType::None);
        }
    }
    opts.set_block_based_table_factory(&table);
    opts
}

/// Compaction filter factory of [`Cf::Dedup`]: each compaction gets a [`DedupExpiryFilter`]
/// holding the time the compaction started, so the clock is read once per compaction, not once
/// per record (which cost 5% of compaction CPU).
struct DedupExpiry;

impl CompactionFilterFactory for DedupExpiry {
    type Filter = DedupExpiryFilter;

    fn create(&mut self, _context: CompactionFilterContext) -> DedupExpiryFilter {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        DedupExpiryFilter { now_ms }
    }

    fn name(&self) -> &CStr {
        c"ringpost_dedup_expiry"
    }
}

/// Drops [`Cf::Dedup`] records expired when its compaction started (a record that expires
/// during a long compaction is dropped by a later one).
struct DedupExpiryFilter {
    now_ms: u64,
}

impl CompactionFilter for DedupExpiryFilter {
    fn filter(&mut self, _level: u32, _key: &[u8], value: &[u8]) -> Decision {
        drop_expired_dedup(value, self.now_ms)
    }

    fn name(&self) -> &CStr {
        c"ringpost_dedup_expiry"
    }
}

/// A record whose expiry (the first 8 bytes of its value, big-endian ms since the Unix epoch)
/// is at or before `now_ms` is dropped. A value too short to hold an expiry is kept for the
/// service to report as corrupt.
fn drop_expired_dedup(value: &[u8], now_ms: u64) -> Decision {
    let Some(expiry) = value.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
        return Decision::Keep;
    };
    if u64::from_be_bytes(expiry) <= now_ms {
        Decision::Remove
    } else {
        Decision::Keep
    }
}

/// Maps a RocksDB error message to a [`StorageError`]. RocksDB reports ENOSPC as an IO error
/// whose message carries the OS text; background errors are re-reported by every later write.
fn classify(msg: String) -> StorageError {
    if msg.contains("No space left on device") || msg.contains("ENOSPC") {
        StorageError::NoSpace(msg)
    } else if msg.starts_with("IO error") {
        StorageError::Io(msg)
    } else if msg.starts_with("Corruption") {
        StorageError::Corrupt {
            cf: "rocksdb",
            detail: msg,
        }
    } else {
        StorageError::Other(msg)
    }
}

impl Engine for RocksEngine {
    fn drops_expired_dedup(&self) -> bool {
        // The `ringpost_dedup_expiry` compaction filter, with periodic compaction.
        true
    }

    /// Closes the database and opens it again: RocksDB refuses every write after a failed
    /// sync or a full disk until it is reopened, and its C API has no `Resume`. Opening replays
    /// the WAL, so the database holds every write that was synced before the failure (and
    /// possibly some that were refused: they were never acknowledged as durable, and a client's
    /// retry is a duplicate). Callers drop what they cached of the database's state first.
    fn recover(&self) -> Result<()> {
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        // The old instance must be gone first: it holds the directory's lock.
        drop(guard.take());
        let db = Self::open_db(&self.path, &self.config, &self.block_cache)?;
        *guard = Some(db);
        Ok(())
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let guard = self.db()?;
        let db = guard.as_ref().expect("checked by db()");
        if cf == Cf::GroupBodies && group_body_ref(key).is_some() {
            // The row and the store's body as of one moment.
            let snapshot = db.snapshot();
            let store = handle(db, Cf::BodyStore)?;
            let value =
                (snapshot.get_cf(handle(db, cf)?, key)).map_err(|e| classify(e.into_string()))?;
            return value
                .map(|v| {
                    bodies::resolve(key, v, |k| {
                        snapshot
                            .get_cf(store, k)
                            .map_err(|e| classify(e.into_string()))
                    })
                })
                .transpose();
        }
        db.get_cf(handle(db, cf)?, key)
            .map_err(|e| classify(e.into_string()))
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let guard = self.db()?;
        let db = guard.as_ref().expect("checked by db()");
        let mut rb = rocksdb::WriteBatch::default();
        // Batches that write group body rows are translated under the store's lock, held until
        // the batch is written (`bodies.rs`).
        let (_bodies_guard, mut body_batch) = if bodies::touches_bodies(&batch) {
            let lock = self
                .bodies_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            (Some(lock), Some(bodies::BodyBatch::new(db)?))
        } else {
            (None, None)
        };
        for op in batch.ops {
            match op {
                Op::Put {
                    cf: Cf::GroupBodies,
                    key,
                    value,
                } if body_batch.is_some() && group_body_ref(&key).is_some() => {
                    let body_ref = group_body_ref(&key).expect("checked by the guard");
                    let bodies = body_batch.as_mut().expect("checked by the guard");
                    let physical = bodies.put(&key, body_ref, value)?;
                    rb.put_cf(handle(db, Cf::GroupBodies)?, key, physical);
                }
                Op::Delete {
                    cf: Cf::GroupBodies,
                    key,
                } if body_batch.is_some() && group_body_ref(&key).is_some() => {
                    let body_ref = group_body_ref(&key).expect("checked by the guard");
                    let bodies = body_batch.as_mut().expect("checked by the guard");
                    bodies.delete(&key, body_ref)?;
                    rb.delete_cf(handle(db, Cf::GroupBodies)?, key);
                }
                Op::Put { cf, key, value } => rb.put_cf(handle(db, cf)?, key, value),
                Op::Delete { cf, key } => rb.delete_cf(handle(db, cf)?, key),
                // RocksDB rejects an inverted range; an empty or inverted range deletes nothing.
                Op::DeleteRange { from, to, .. } if from >= to => {}
                // In-place updates and range tombstones do not mix (see `cf_options`): delete
                // the family's keys one by one (one small record per device, and only when a
                // whole shard is dropped).
                Op::DeleteRange {
                    cf: Cf::InboxMeta,
                    from,
                    to,
                } => {
                    let handle = handle(db, Cf::InboxMeta)?;
                    let mut it = db.raw_iterator_cf_opt(
                        handle,
                        Self::bounded_read(Cf::InboxMeta, &from, &to, Seek::Forward),
                    );
                    it.seek(&from);
                    while let Some(key) = it.key() {
                        rb.delete_cf(handle, key);
                        it.next();
                    }
                    it.status().map_err(|e| classify(e.into_string()))?;
                }
                Op::DeleteRange { cf, from, to } => {
                    if let (Cf::GroupBodies, Some(bodies)) = (cf, body_batch.as_mut()) {
                        bodies.delete_range(&from, &to)?;
                    }
                    rb.delete_range_cf(handle(db, cf)?, from, to)
                }
            }
        }
        if let Some(bodies) = body_batch {
            bodies.finish(&mut rb);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        // The WAL is what makes a batch atomic across families and durable: never off.
        wo.disable_wal(false);
        db.write_opt(rb, &wo).map_err(|e| classify(e.into_string()))
    }

    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if from >= to || limit == 0 {
            return Ok(Vec::new());
        }
        let guard = self.db()?;
        let db = guard.as_ref().expect("checked by db()");
        if cf == Cf::GroupBodies {
            // Rows and the store's bodies as of one moment.
            let snapshot = db.snapshot();
            let store = handle(db, Cf::BodyStore)?;
            let mut it = snapshot.raw_iterator_cf_opt(
                handle(db, cf)?,
                Self::bounded_read(cf, from, to, Seek::Forward),
            );
            it.seek(from);
            let mut out = Vec::new();
            while out.len() < limit {
                let (Some(k), Some(v)) = (it.key(), it.value()) else {
                    break;
                };
                let value = bodies::resolve(k, v.to_vec(), |sk| {
                    (snapshot.get_cf(store, sk)).map_err(|e| classify(e.into_string()))
                })?;
                out.push((k.to_vec(), value));
                it.next();
            }
            it.status().map_err(|e| classify(e.into_string()))?;
            return Ok(out);
        }
        let mut it = db.raw_iterator_cf_opt(
            handle(db, cf)?,
            Self::bounded_read(cf, from, to, Seek::Forward),
        );
        it.seek(from);
        let mut out = Vec::new();
        while out.len() < limit {
            match (it.key(), it.value()) {
                (Some(k), Some(v)) => out.push((k.to_vec(), v.to_vec())),
                _ => break,
            }
            it.next();
        }
        // An invalid iterator means either the end of the range or an error: tell them apart.
        it.status().map_err(|e| classify(e.into_string()))?;
        Ok(out)
    }

    fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        if from >= to {
            return Ok(None);
        }
        let guard = self.db()?;
        let db = guard.as_ref().expect("checked by db()");
        if cf == Cf::GroupBodies {
            // The row and the store's body as of one moment.
            let snapshot = db.snapshot();
            let store = handle(db, Cf::BodyStore)?;
            let mut it = snapshot.raw_iterator_cf_opt(
                handle(db, cf)?,
                Self::bounded_read(cf, from, to, Seek::Last),
            );
            it.seek_to_last();
            let last = match (it.key(), it.value()) {
                (Some(k), Some(v)) => {
                    let value = bodies::resolve(k, v.to_vec(), |sk| {
                        (snapshot.get_cf(store, sk)).map_err(|e| classify(e.into_string()))
                    })?;
                    Some((k.to_vec(), value))
                }
                _ => None,
            };
            it.status().map_err(|e| classify(e.into_string()))?;
            return Ok(last);
        }
        let mut it = db.raw_iterator_cf_opt(
            handle(db, cf)?,
            Self::bounded_read(cf, from, to, Seek::Last),
        );
        let last = if cf == Cf::InboxMeta {
            // Memtables updated in place cannot be iterated backwards: walk the range forward
            // (nothing on a hot path asks this of that family).
            it.seek(from);
            let mut last = None;
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                last = Some((k.to_vec(), v.to_vec()));
                it.next();
            }
            last
        } else {
            it.seek_to_last();
            match (it.key(), it.value()) {
                (Some(k), Some(v)) => Some((k.to_vec(), v.to_vec())),
                _ => None,
            }
        };
        it.status().map_err(|e| classify(e.into_string()))?;
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(e: &RocksEngine, cf: Cf, k: &[u8], v: &[u8], sync: bool) {
        let mut b = WriteBatch::new();
        b.put(cf, k, v);
        e.write(b, sync).unwrap();
    }

    #[test]
    fn sync_write_survives_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = RocksEngine::open(dir.path(), &RocksConfig::for_tests()).unwrap();
            put(&e, Cf::Inbox, b"k", b"durable", true);
            let mut b = WriteBatch::new();
            b.put(Cf::InboxMeta, &b"m"[..], &b"1"[..]);
            b.put(Cf::Dedup, &b"d"[..], &u64::MAX.to_be_bytes()[..]);
            e.write(b, true).unwrap();
        }
        let e = RocksEngine::open(dir.path(), &RocksConfig::for_tests()).unwrap();
        assert_eq!(
            e.get(Cf::Inbox, b"k").unwrap().as_deref(),
            Some(&b"durable"[..])
        );
        assert_eq!(
            e.get(Cf::InboxMeta, b"m").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert!(e.get(Cf::Dedup, b"d").unwrap().is_some());
    }

    /// The inbox counters are updated in place in the memtable, which keeps the old sequence
    /// number: a range tombstone between the two would hide the update. `write` turns range
    /// deletes of that family into point deletes, so a counter written after a shard drop
    /// stays visible, before and after a restart.
    #[test]
    fn counters_rewritten_after_a_range_delete_stay_visible() {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = RocksEngine::open(dir.path(), &RocksConfig::for_tests()).unwrap();
            put(&e, Cf::InboxMeta, b"\x00\x01m", b"old-value", false);
            let mut b = WriteBatch::new();
            b.delete_range(Cf::InboxMeta, &b"\x00\x01"[..], &b"\x00\x02"[..]);
            e.write(b, true).unwrap();
            assert_eq!(e.get(Cf::InboxMeta, b"\x00\x01m").unwrap(), None);
            // Shorter than the old value: RocksDB would update it in place if it found it.
            put(&e, Cf::InboxMeta, b"\x00\x01m", b"new", true);
            assert_eq!(
                e.get(Cf::InboxMeta, b"\x00\x01m").unwrap().as_deref(),
                Some(&b"new"[..])
            );
            put(&e, Cf::InboxMeta, b"\x00\x01m", b"nu", true);
            assert_eq!(
                e.get(Cf::InboxMeta, b"\x00\x01m").unwrap().as_deref(),
                Some(&b"nu"[..])
            );
        }
        let e = RocksEngine::open(dir.path(), &RocksConfig::for_tests()).unwrap();
        assert_eq!(
            e.get(Cf::InboxMeta, b"\x00\x01m").unwrap().as_deref(),
            Some(&b"nu"[..])
        );
    }

    #[test]
    fn opens_an_existing_database_repeatedly() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0u8..3 {
            let e = RocksEngine::open(dir.path(), &RocksConfig::default()).unwrap();
            for r in 0..round {
                assert_eq!(
                    e.get(Cf::Accounts, &[r]).unwrap(),
                    Some(vec![r]),
                    "round {round}"
                );
            }
            put(&e, Cf::Accounts, &[round], &[round], true);
        }
    }

    #[test]
    fn refuses_unknown_column_families() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let _db = DB::open_cf(&opts, dir.path(), ["from_the_future"]).unwrap();
        }
        let err = RocksEngine::open(dir.path(), &RocksConfig::for_tests()).unwrap_err();
        assert!(err.to_string().contains("from_the_future"), "{err}");
    }

    #[test]
    fn open_fails_cleanly_on_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        assert!(RocksEngine::open(&file, &RocksConfig::for_tests()).is_err());
    }

    #[test]
    fn errors_are_classified() {
        let no_space = "IO error: No space left on device: While appending to file: 000012.log";
        assert!(matches!(
            classify(no_space.into()),
            StorageError::NoSpace(_)
        ));
        let fsync = "IO error: While fsync: a file descriptor: Input/output error";
        assert!(matches!(classify(fsync.into()), StorageError::Io(_)));
        let corrupt = "Corruption: block checksum mismatch";
        assert!(matches!(
            classify(corrupt.into()),
            StorageError::Corrupt { .. }
        ));
        let other = "Invalid argument: Column family not found";
        assert!(matches!(classify(other.into()), StorageError::Other(_)));
    }

    #[test]
    fn dedup_filter_drops_only_expired_records() {
        let now = 2_000;
        let past = 1_000u64.to_be_bytes();
        let at_now = 2_000u64.to_be_bytes();
        let future = u64::MAX.to_be_bytes();
        assert!(matches!(drop_expired_dedup(&past, now), Decision::Remove));
        assert!(matches!(drop_expired_dedup(&at_now, now), Decision::Remove));
        assert!(matches!(drop_expired_dedup(&future, now), Decision::Keep));
        assert!(matches!(drop_expired_dedup(b"short", now), Decision::Keep));
    }

    #[test]
    fn compaction_drops_expired_dedup_records() {
        let dir = tempfile::tempdir().unwrap();
        let e = RocksEngine::open(dir.path(), &RocksConfig::for_tests()).unwrap();
        let mut b = WriteBatch::new();
        b.put(Cf::Dedup, &b"expired"[..], &1_000u64.to_be_bytes()[..]);
        b.put(Cf::Dedup, &b"live"[..], &u64::MAX.to_be_bytes()[..]);
        e.write(b, true).unwrap();
        let guard = e.db().unwrap();
        let db = guard.as_ref().unwrap();
        db.flush_cf(handle(db, Cf::Dedup).unwrap()).unwrap();
        db.compact_range_cf(handle(db, Cf::Dedup).unwrap(), None::<&[u8]>, None::<&[u8]>);
        drop(guard);
        assert_eq!(e.get(Cf::Dedup, b"expired").unwrap(), None);
        assert!(e.get(Cf::Dedup, b"live").unwrap().is_some());
    }

    /// An Inbox key of device `d` (a prefix of [`INBOX_PREFIX_LEN`] bytes, the last device's
    /// ending in 0xff bytes so that its prefix end is shorter) and `seq`.
    fn inbox_key_of(d: u8, seq: u8) -> Vec<u8> {
        let mut k = vec![0, 1, 0, 0, 0, 0, 0, 0, 0, d, 0, 0, 0, d];
        if d == 0xff {
            k[10..14].copy_from_slice(&[0xff; 4]);
        }
        k.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, seq]);
        k
    }

    /// Data blocks a scan of `cf` touched (read from disk or found in the block cache).
    fn data_blocks_touched(e: &RocksEngine, cf: Cf, from: &[u8], to: &[u8]) -> (usize, u64) {
        use rocksdb::perf::{set_perf_stats, PerfContext, PerfMetric, PerfStatsLevel};
        set_perf_stats(PerfStatsLevel::EnableCount);
        let mut ctx = PerfContext::default();
        ctx.reset();
        let n = e.scan(cf, from, to, usize::MAX).unwrap().len();
        let touched =
            ctx.metric(PerfMetric::BlockReadCount) + ctx.metric(PerfMetric::BlockCacheHitCount);
        set_perf_stats(PerfStatsLevel::Disable);
        (n, touched)
    }

    /// The Inbox family's prefix extractor: a device's scan is exact and skips table files
    /// without the device by their prefix filters; scans across devices, and from the end, see
    /// every key in order, in the memtable and in table files alike.
    #[test]
    fn inbox_scans_are_exact_within_and_across_devices() {
        let dir = tempfile::tempdir().unwrap();
        let e = RocksEngine::open(dir.path(), &RocksConfig::for_tests()).unwrap();
        let devices = [1u8, 3, 5, 0xff];
        for (i, &d) in devices.iter().enumerate() {
            let mut b = WriteBatch::new();
            for seq in 1..=3 {
                b.put(Cf::Inbox, inbox_key_of(d, seq), vec![d, seq]);
            }
            e.write(b, false).unwrap();
            if i < 3 {
                // Three table files (the last device stays in the memtable), each spanning
                // device 2's and 4's keys: only a filter tells them apart.
                let mut b = WriteBatch::new();
                b.put(Cf::Inbox, inbox_key_of(0, 1), vec![]);
                b.put(Cf::Inbox, inbox_key_of(9, 1), vec![]);
                e.write(b, false).unwrap();
                let guard = e.db().unwrap();
                let db = guard.as_ref().unwrap();
                db.flush_cf(handle(db, Cf::Inbox).unwrap()).unwrap();
            }
        }
        let keys = |from: &[u8], to: &[u8]| -> Vec<Vec<u8>> {
            let rows = e.scan(Cf::Inbox, from, to, usize::MAX).unwrap();
            rows.into_iter().map(|(k, _)| k).collect()
        };
        for d in devices {
            let prefix = &inbox_key_of(d, 0)[..INBOX_PREFIX_LEN];
            let expected: Vec<Vec<u8>> = (1..=3).map(|seq| inbox_key_of(d, seq)).collect();
            assert_eq!(keys(prefix, &super::super::prefix_end(prefix)), expected);
            assert_eq!(
                keys(&inbox_key_of(d, 2), &super::super::prefix_end(prefix)),
                expected[1..].to_vec()
            );
            assert_eq!(
                keys(&inbox_key_of(d, 1), &inbox_key_of(d, 3)),
                expected[..2]
            );
        }
        // Across devices: every key, in order, from table files and the memtable.
        let all = keys(&inbox_key_of(1, 0), &[0xff; 22]);
        let expected: Vec<Vec<u8>> = [1u8, 3, 5, 9, 0xff]
            .iter()
            .flat_map(|&d| {
                let seqs = if d == 9 { 1..=1 } else { 1..=3 };
                seqs.map(move |seq| inbox_key_of(d, seq))
            })
            .collect();
        assert_eq!(all, expected);
        assert_eq!(
            e.last_in(Cf::Inbox, &inbox_key_of(1, 0), &inbox_key_of(6, 0))
                .unwrap()
                .map(|(k, _)| k),
            Some(inbox_key_of(5, 3))
        );
        // A device in no file: its scan reads no data block, where one held in two files
        // reads theirs.
        let absent = &inbox_key_of(2, 0)[..INBOX_PREFIX_LEN];
        assert_eq!(
            data_blocks_touched(&e, Cf::Inbox, absent, &super::super::prefix_end(absent)),
            (0, 0)
        );
        let present = &inbox_key_of(3, 0)[..INBOX_PREFIX_LEN];
        let (n, touched) =
            data_blocks_touched(&e, Cf::Inbox, present, &super::super::prefix_end(present));
        assert_eq!(n, 3);
        assert!(touched >= 1, "{touched}");
    }

    #[test]
    fn recover_reopens_with_every_synced_write_and_takes_writes_again() {
        let dir = tempfile::tempdir().unwrap();
        let e = RocksEngine::open(dir.path(), &RocksConfig::for_tests()).unwrap();
        let mut b = WriteBatch::new();
        b.put(Cf::Inbox, &b"synced"[..], &b"1"[..]);
        e.write(b, true).unwrap();
        e.recover().unwrap();
        assert_eq!(e.get(Cf::Inbox, b"synced").unwrap(), Some(b"1".to_vec()));
        let mut b = WriteBatch::new();
        b.put(Cf::Inbox, &b"after"[..], &b"2"[..]);
        e.write(b, true).unwrap();
        assert_eq!(e.scan(Cf::Inbox, b"a", b"z", 10).unwrap().len(), 2);
    }
}
