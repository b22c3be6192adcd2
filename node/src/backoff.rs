//! Retry pauses that grow with each failure in a row: the one formula presence registration,
//! presence change resends, replication catch-ups and push delivery all use.

use std::time::Duration;

/// The pause after the `failures`-th failure in a row (1 for the first; 0 counts as 1):
/// `first` doubled per earlier failure, capped at `max`, then scaled into its upper half by
/// `jitter` (in `[0, 1]`, clamped), so that work which failed together does not all start
/// over together.
pub fn delay(first: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    let full = first.saturating_mul(1u32 << doublings).min(max);
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    // Take jitter off the lower half rather than scaling the whole: `half * x` with x <= 1
    // always fits a Duration, where `full * 1.0` through f64 need not.
    let half = full / 2;
    full - half.mul_f64(1.0 - jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const CAP: Duration = Duration::from_secs(60);

    #[test]
    fn doubles_per_failure_up_to_the_cap() {
        assert_eq!(delay(S, CAP, 1, 1.0), S);
        assert_eq!(delay(S, CAP, 2, 1.0), 2 * S);
        assert_eq!(delay(S, CAP, 4, 1.0), 8 * S);
        assert_eq!(delay(S, CAP, 7, 1.0), CAP, "64 s is capped");
        assert_eq!(delay(S, CAP, u32::MAX, 1.0), CAP);
        assert_eq!(delay(S, CAP, 0, 1.0), S, "0 counts as the first");
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        assert_eq!(delay(S, CAP, 1, 0.0), S / 2);
        assert_eq!(delay(S, CAP, 3, 0.5), 3 * S);
        assert_eq!(delay(S, CAP, u32::MAX, 0.5), CAP * 3 / 4);
        assert_eq!(delay(S, CAP, 1, -3.0), S / 2, "clamped below");
        assert_eq!(delay(S, CAP, 1, 7.0), S, "clamped above");
        assert_eq!(delay(S, CAP, 1, f64::NAN), S / 2, "NaN clamps to 0");
    }

    #[test]
    fn a_huge_first_pause_saturates_instead_of_overflowing() {
        let first = Duration::from_secs(u64::MAX / 2);
        assert_eq!(delay(first, Duration::MAX, 40, 1.0), Duration::MAX);
        assert!(delay(first, Duration::MAX, 40, 0.0) >= Duration::MAX / 2);
    }
}
