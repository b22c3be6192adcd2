//! The clock that decides expiry. Deleting a message because of the time is irreversible, so
//! that time must not jump: a node restarted with its wall clock weeks ahead (a bad RTC, NTP
//! not yet synced, an operator typo) would otherwise expire every queued message at once.
//!
//! The expiry clock is `min(wall clock, watermark + time since start)`, where the watermark is
//! the expiry clock's last persisted value (in the `meta` column family, written every few
//! seconds). It therefore advances at most as fast as real (monotonic) time from the last
//! point this node knew, however the wall clock moves. The price: after real downtime, expiry
//! lags by that downtime (a message may be kept up to 30 days plus the downtime), which errs
//! on the side of delivering.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use crate::storage::{Cf, Engine, StorageError, WriteBatch};

/// Key of the watermark in [`Cf::Meta`].
const WATERMARK_KEY: &[u8] = b"expiry_clock_watermark_ms";

/// A clock for expiry decisions that never runs ahead of monotonic time.
pub struct ExpiryClock {
    engine: Arc<dyn Engine>,
    started: Instant,
    /// The expiry clock at `started`.
    base_ms: u64,
    persisted_ms: AtomicU64,
}

impl ExpiryClock {
    /// Loads the watermark; `wall_ms` is the wall clock now.
    pub fn load(engine: Arc<dyn Engine>, wall_ms: u64) -> Result<ExpiryClock, StorageError> {
        let watermark = match engine.get(Cf::Meta, WATERMARK_KEY)? {
            Some(v) => {
                let bytes: [u8; 8] =
                    v.as_slice().try_into().map_err(|_| StorageError::Corrupt {
                        cf: "meta",
                        detail: "expiry clock watermark is not 8 bytes".into(),
                    })?;
                Some(u64::from_be_bytes(bytes))
            }
            None => None,
        };
        // A fresh node trusts the wall clock; a known one starts from where it left off (or
        // from the wall clock, if that is behind the watermark).
        let base_ms = watermark.map_or(wall_ms, |w| w.min(wall_ms));
        if let Some(w) = watermark {
            if wall_ms > w.saturating_add(24 * 3600 * 1000) {
                tracing::warn!(
                    watermark_ms = w,
                    wall_ms,
                    "the wall clock is more than a day past the last time this node ran; expiry \
                     follows real elapsed time from the watermark instead"
                );
            }
        }
        Ok(ExpiryClock {
            engine,
            started: Instant::now(),
            base_ms,
            persisted_ms: AtomicU64::new(0),
        })
    }

    /// The expiry clock: `min(wall_ms, base + elapsed)`.
    pub fn now_ms(&self, wall_ms: u64) -> u64 {
        let monotonic = self
            .base_ms
            .saturating_add(self.started.elapsed().as_millis() as u64);
        wall_ms.min(monotonic)
    }

    /// Persists the clock (not synced: losing the last few seconds only delays expiry).
    pub fn persist(&self, wall_ms: u64) -> Result<(), StorageError> {
        let now = self.now_ms(wall_ms);
        if now <= self.persisted_ms.load(Relaxed) {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, WATERMARK_KEY.to_vec(), now.to_be_bytes().to_vec());
        self.engine.write(batch, false)?;
        self.persisted_ms.store(now, Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::mem::MemEngine;

    const DAY: u64 = 24 * 3600 * 1000;

    #[test]
    fn a_forward_jump_across_a_restart_does_not_advance_expiry() {
        let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let t0 = 1_000 * DAY;
        let clock = ExpiryClock::load(engine.clone(), t0).unwrap();
        assert_eq!(clock.now_ms(t0), t0, "a fresh node trusts the wall clock");
        clock.persist(t0).unwrap();
        // Restarted with the wall clock 47 days ahead.
        let clock = ExpiryClock::load(engine.clone(), t0 + 47 * DAY).unwrap();
        assert!(
            clock.now_ms(t0 + 47 * DAY) < t0 + DAY,
            "expiry stays near the watermark"
        );
        // A wall clock behind the watermark is believed (expiry only ever slows down).
        let clock = ExpiryClock::load(engine, t0 - DAY).unwrap();
        assert_eq!(clock.now_ms(t0 - DAY), t0 - DAY);
    }

    #[test]
    fn persisting_only_moves_forward_and_corruption_is_an_error() {
        let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let clock = ExpiryClock::load(engine.clone(), 5_000).unwrap();
        clock.persist(5_000).unwrap();
        clock.persist(1).unwrap(); // a wall clock behind: nothing written
        let stored = engine.get(Cf::Meta, WATERMARK_KEY).unwrap().unwrap();
        assert!(u64::from_be_bytes(stored.try_into().unwrap()) >= 5_000 - 1);
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, WATERMARK_KEY.to_vec(), vec![1, 2, 3]);
        engine.write(batch, false).unwrap();
        assert!(ExpiryClock::load(engine, 5_000).is_err());
    }
}
