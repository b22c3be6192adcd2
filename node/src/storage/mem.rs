//! [`MemEngine`]: an in-memory [`Engine`] for unit tests of the services.
//!
//! One ordered map per column family, all behind one lock, so a [`WriteBatch`] is applied
//! atomically across families. Nothing is durable: `sync` is accepted and ignored.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

use super::{Cf, Engine, Op, Result, WriteBatch};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// An in-memory engine. Passes the same conformance suite as the RocksDB engine.
#[derive(Debug, Default)]
pub struct MemEngine {
    // One lock over every family: a batch touching several families is applied in one critical
    // section, so readers never see half of it.
    cfs: RwLock<BTreeMap<Cf, Map>>,
}

impl MemEngine {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Engine for MemEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let cfs = self.cfs.read().unwrap_or_else(PoisonError::into_inner);
        Ok(cfs.get(&cf).and_then(|m| m.get(key)).cloned())
    }

    fn write(&self, batch: WriteBatch, _sync: bool) -> Result<()> {
        let mut cfs = self.cfs.write().unwrap_or_else(PoisonError::into_inner);
        // Applying an op cannot fail, so the batch is all-or-nothing by construction.
        for op in batch.ops {
            match op {
                Op::Put { cf, key, value } => {
                    cfs.entry(cf).or_default().insert(key, value);
                }
                Op::Delete { cf, key } => {
                    if let Some(m) = cfs.get_mut(&cf) {
                        m.remove(&key);
                    }
                }
                Op::DeleteRange { cf, from, to } => {
                    if from >= to {
                        continue;
                    }
                    if let Some(m) = cfs.get_mut(&cf) {
                        // m = [.., from) ++ [from, to) ++ [to, ..); keep the outer parts.
                        let mut middle = m.split_off(&from);
                        let mut tail = middle.split_off(&to);
                        m.append(&mut tail);
                    }
                }
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        // `BTreeMap::range` panics on an inverted range; an empty one is simply empty.
        if from >= to || limit == 0 {
            return Ok(Vec::new());
        }
        let cfs = self.cfs.read().unwrap_or_else(PoisonError::into_inner);
        let Some(m) = cfs.get(&cf) else {
            return Ok(Vec::new());
        };
        Ok(m.range(from.to_vec()..to.to_vec())
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        if from >= to {
            return Ok(None);
        }
        let cfs = self.cfs.read().unwrap_or_else(PoisonError::into_inner);
        let Some(m) = cfs.get(&cf) else {
            return Ok(None);
        };
        Ok(m.range(from.to_vec()..to.to_vec())
            .next_back()
            .map(|(k, v)| (k.clone(), v.clone())))
    }
}
