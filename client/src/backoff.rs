//! Exponential backoff with full jitter: attempt `n` waits a uniformly random time in
//! `[0, min(cap, base * 2^n)]` (the "full jitter" of the AWS architecture blog), so clients that
//! lost the same node do not come back in lockstep.

use std::time::Duration;

use rand::Rng;

/// First reconnect ceiling: the first retry waits up to this long.
pub const RECONNECT_BACKOFF_BASE: Duration = Duration::from_millis(100);

/// Largest reconnect ceiling: no retry waits longer than this (plus a server's `GoingAway`
/// delay or `retry_after_ms`, which are honoured on top).
pub const RECONNECT_BACKOFF_CAP: Duration = Duration::from_secs(10);

/// A backoff policy. Stateless: the caller counts attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: RECONNECT_BACKOFF_BASE,
            cap: RECONNECT_BACKOFF_CAP,
        }
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap }
    }

    /// The longest wait for attempt `attempt` (0-based): `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random wait for attempt `attempt`, uniform in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling_ns = u64::try_from(self.ceiling(attempt).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.gen_range(0..=ceiling_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(6), Duration::from_millis(6400));
        assert_eq!(b.ceiling(7), Duration::from_secs(10));
        assert_eq!(b.ceiling(1000), Duration::from_secs(10));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn jitter_stays_within_zero_and_the_cap() {
        let b = Backoff::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut below_half = 0;
        for attempt in 0..64 {
            for _ in 0..200 {
                let d = b.delay(attempt, &mut rng);
                assert!(d <= b.ceiling(attempt), "attempt {attempt}: {d:?}");
                assert!(d <= RECONNECT_BACKOFF_CAP);
                if d < b.ceiling(attempt) / 2 {
                    below_half += 1;
                }
            }
        }
        // Full jitter: about half the waits are in the lower half of the range.
        assert!((5_000..7_800).contains(&below_half), "{below_half}");
    }

    #[test]
    fn zero_base_never_waits() {
        let b = Backoff::new(Duration::ZERO, Duration::from_secs(1));
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(b.delay(5, &mut rng), Duration::ZERO);
    }
}
