//! Request budgets: every request a device can make is charged to a budget, so no device can
//! spend more of the node (or of another user's prekeys) than its budget allows. A request over
//! budget is answered with `Error{RateLimited, retry_after_ms}` and has no effect.
//!
//! | budget | requests | charged to | default |
//! |---|---|---|---|
//! | messaging | `Send`, `Receipt`, `Typing` | the device | 200/s, burst 400 ([`crate::server::ServerConfig`]) |
//! | acks | `DeliverAck`, per seq it names | the device | 50 000 seqs/s, burst 100 000 (a device draining a full inbox, 50 000 entries, acks it all within the burst) |
//! | lookups | `DeviceListRequest`, `PrekeyClaim` | the device | 50/s, burst 1 000 |
//! | claims of one user | `PrekeyClaim` | (claiming user, claimed user) | 10/min, burst 10 |
//! | claims by one user | `PrekeyClaim` | the claiming user | 60/min, burst 200 |
//! | one-time prekeys of one user | `PrekeyClaim` on the claimed user's node | the claimed user | 30/min, burst 100; past it the claim hands out the fallback only ([`Budgets::hand_one_time`]) |
//! | key uploads | `PrekeyUpload` | the device | 10/min, burst 10 |
//! | account changes | `LinkCodeRequest`, `RemoveDevice`, `SetRegistrationLock`, `PushRegister` | the device | 10/min, burst 10 |
//! | media uploads | `MediaUploadRequest` (each grants one upload of up to 100 MiB) | the device | 100/hour, burst 100 (`--media-uploads-per-hour`) |
//! | codes from one source | `RegisterRequest` (each sends an SMS or a call) | the source address (IPv4, IPv6 /64) | 10/hour, burst 10 |
//! | codes in all | `RegisterRequest` | the node | 10/s, burst 100 |
//!
//! The two code budgets apply when codes go to an SMS gateway; codes written to a log
//! (development and tests) cost nothing and are not budgeted.
//!
//! Codes to one number have their own limits in [`crate::accounts`] (a resend interval and a
//! most per window); together the three bound what SMS pumping can cost an operator.
//!
//! Memory: each budget keeps a few dozen bytes per key charged recently; idle keys are pruned
//! every [`crate::server::RATE_LIMITER_PRUNE_INTERVAL`], so the state is bounded by the keys
//! charged within one interval (at most 50 new (claimer, claimed) pairs per device per second,
//! and one key per claimed user on its owner).
//!
//! The claimed user's budget is not a refusal: refusing claims of a user once anyone spent its
//! budget would let one attacker deny everyone a session with it. It only stops one-time keys
//! being handed out (the bundle carries the signed fallback key alone), so that no number of
//! claiming accounts drains a user's one-time keys faster than it.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ringpost_wire::{DeviceId, ErrorCode, UserId};

use crate::session::Answer;

/// One budget: a sustained rate (`per` one unit every `period`) and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub period: Duration,
    pub burst: u32,
}

impl Budget {
    pub const fn per_second(n: u32, burst: u32) -> Budget {
        Budget {
            period: Duration::from_nanos(1_000_000_000 / n as u64),
            burst,
        }
    }

    pub const fn per_hour(n: u32, burst: u32) -> Budget {
        Budget {
            period: Duration::from_nanos(3_600_000_000_000 / n as u64),
            burst,
        }
    }

    pub const fn per_minute(n: u32, burst: u32) -> Budget {
        Budget {
            period: Duration::from_nanos(60_000_000_000 / n as u64),
            burst,
        }
    }

    fn quota(self) -> Quota {
        let burst = NonZeroU32::new(self.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        Quota::with_period(self.period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst)
    }

    /// A human-readable rate for error messages.
    fn describe(self) -> String {
        let per_s = 1.0 / self.period.as_secs_f64().max(1e-9);
        if per_s >= 1.0 {
            format!("{per_s:.0}/s")
        } else if per_s * 60.0 >= 1.0 {
            format!("{:.0}/min", per_s * 60.0)
        } else {
            format!("{:.0}/hour", per_s * 3600.0)
        }
    }
}

/// The budgets' sizes (see the module docs for what each covers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetConfig {
    pub ack_seqs: Budget,
    pub lookups: Budget,
    /// Claims of one user by one user (the pair).
    pub claims_per_target: Budget,
    /// Claims by one user, whatever user they claim.
    pub claims_per_claimer: Budget,
    /// Claims of one user that hand out one-time keys, whoever claims (charged on the claimed
    /// user's owner; past it the fallback key is handed out alone).
    pub one_time_claims_per_user: Budget,
    pub key_uploads: Budget,
    pub account_changes: Budget,
    /// Media upload grants ([`crate::media`]).
    pub media_uploads: Budget,
    /// `None`: unbounded (codes that cost nothing: written to a log in development).
    pub codes_per_source: Option<Budget>,
    /// `None`: unbounded.
    pub codes_total: Option<Budget>,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ack_seqs: Budget::per_second(50_000, 2 * crate::inbox::DEVICE_QUOTA_DEFAULT as u32),
            lookups: Budget::per_second(50, 1_000),
            claims_per_target: Budget::per_minute(10, 10),
            claims_per_claimer: Budget::per_minute(60, 200),
            one_time_claims_per_user: Budget::per_minute(30, 100),
            key_uploads: Budget::per_minute(10, 10),
            account_changes: Budget::per_minute(10, 10),
            media_uploads: Budget::per_hour(
                crate::media::MEDIA_UPLOADS_PER_HOUR_DEFAULT,
                crate::media::MEDIA_UPLOADS_PER_HOUR_DEFAULT,
            ),
            codes_per_source: Some(Budget::per_hour(10, 10)),
            codes_total: Some(Budget::per_second(10, 100)),
        }
    }
}

/// Which budget a request is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// `DeliverAck` naming this many seqs.
    AckSeqs(u32),
    Lookup,
    /// A `PrekeyClaim` of this user's keys.
    ClaimOf(UserId),
    KeyUpload,
    AccountChange,
    /// A `MediaUploadRequest`.
    MediaUpload,
}

type Keyed<K> = DefaultKeyedRateLimiter<K>;

/// The budgets of every device on this node.
#[derive(Debug)]
pub struct Budgets {
    config: BudgetConfig,
    ack_seqs: Keyed<(UserId, DeviceId)>,
    lookups: Keyed<(UserId, DeviceId)>,
    claims_per_target: Keyed<(UserId, UserId)>,
    claims_per_claimer: Keyed<UserId>,
    one_time_claims_per_user: Keyed<UserId>,
    key_uploads: Keyed<(UserId, DeviceId)>,
    account_changes: Keyed<(UserId, DeviceId)>,
    media_uploads: Keyed<(UserId, DeviceId)>,
    codes_per_source: Option<Keyed<crate::admission::Source>>,
    codes_total: Option<governor::DefaultDirectRateLimiter>,
}

impl Budgets {
    pub fn new(config: BudgetConfig) -> Budgets {
        Budgets {
            config,
            ack_seqs: RateLimiter::keyed(config.ack_seqs.quota()),
            lookups: RateLimiter::keyed(config.lookups.quota()),
            claims_per_target: RateLimiter::keyed(config.claims_per_target.quota()),
            claims_per_claimer: RateLimiter::keyed(config.claims_per_claimer.quota()),
            one_time_claims_per_user: RateLimiter::keyed(config.one_time_claims_per_user.quota()),
            key_uploads: RateLimiter::keyed(config.key_uploads.quota()),
            account_changes: RateLimiter::keyed(config.account_changes.quota()),
            media_uploads: RateLimiter::keyed(config.media_uploads.quota()),
            codes_per_source: config
                .codes_per_source
                .map(|b| RateLimiter::keyed(b.quota())),
            codes_total: config.codes_total.map(|b| RateLimiter::direct(b.quota())),
        }
    }

    /// Charges a verification code requested from `source` (`None`: unknown, charged to the
    /// node-wide budget only): `None` when within budget, else the answer to give.
    pub fn charge_code(&self, source: Option<std::net::IpAddr>) -> Option<Answer> {
        if let (Some(ip), Some(limiter), Some(budget)) =
            (source, &self.codes_per_source, self.config.codes_per_source)
        {
            if let Err(n) = limiter.check_key(&crate::admission::Source::of(ip)) {
                return Some(refusal(
                    budget,
                    "verification codes from one address",
                    Some(n),
                ));
            }
        }
        if let (Some(limiter), Some(budget)) = (&self.codes_total, self.config.codes_total) {
            if let Err(n) = limiter.check() {
                return Some(refusal(budget, "verification codes on this node", Some(n)));
            }
        }
        None
    }

    /// Charges `charge` to the device's budgets: `None` when within them, else the answer to
    /// give (`RateLimited` with the wait).
    pub fn charge(&self, user: UserId, device: DeviceId, charge: Charge) -> Option<Answer> {
        let key = (user, device);
        let (result, budget, what) = match charge {
            Charge::AckSeqs(n) => {
                // An ack of nothing costs nothing.
                let n = NonZeroU32::new(n)?;
                match self.ack_seqs.check_key_n(&key, n) {
                    Ok(r) => (r.map_err(Some), self.config.ack_seqs, "acknowledged seqs"),
                    // More seqs than the burst in one frame cannot happen within the protocol's
                    // bounds; refuse it rather than panic or wait forever.
                    Err(_) => (Err(None), self.config.ack_seqs, "acknowledged seqs"),
                }
            }
            Charge::Lookup => (
                self.lookups.check_key(&key).map_err(Some),
                self.config.lookups,
                "device-list and prekey lookups",
            ),
            Charge::ClaimOf(target) => {
                if let Err(limited) = self.lookups.check_key(&key) {
                    (
                        Err(Some(limited)),
                        self.config.lookups,
                        "device-list and prekey lookups",
                    )
                } else if let Err(limited) = self.claims_per_claimer.check_key(&user) {
                    (
                        Err(Some(limited)),
                        self.config.claims_per_claimer,
                        "prekey claims by one user",
                    )
                } else {
                    (
                        self.claims_per_target
                            .check_key(&(user, target))
                            .map_err(Some),
                        self.config.claims_per_target,
                        "prekey claims of one user",
                    )
                }
            }
            Charge::KeyUpload => (
                self.key_uploads.check_key(&key).map_err(Some),
                self.config.key_uploads,
                "prekey uploads",
            ),
            Charge::AccountChange => (
                self.account_changes.check_key(&key).map_err(Some),
                self.config.account_changes,
                "account changes",
            ),
            Charge::MediaUpload => (
                self.media_uploads.check_key(&key).map_err(Some),
                self.config.media_uploads,
                "media uploads",
            ),
        };
        match result {
            Ok(()) => None,
            Err(not_until) => Some(refusal(budget, what, not_until)),
        }
    }

    /// Charges a claim of `claimed`'s keys (on its owner) to its one-time key budget: whether
    /// the claim may hand out one-time keys. `false` means the fallback key alone (see the
    /// module documentation); nothing is refused.
    pub fn hand_one_time(&self, claimed: UserId) -> bool {
        self.one_time_claims_per_user.check_key(&claimed).is_ok()
    }

    /// Forgets idle keys (called every [`crate::server::RATE_LIMITER_PRUNE_INTERVAL`]).
    pub fn prune(&self) {
        self.ack_seqs.retain_recent();
        self.lookups.retain_recent();
        self.claims_per_target.retain_recent();
        self.claims_per_claimer.retain_recent();
        self.one_time_claims_per_user.retain_recent();
        self.key_uploads.retain_recent();
        self.account_changes.retain_recent();
        self.media_uploads.retain_recent();
        self.ack_seqs.shrink_to_fit();
        self.lookups.shrink_to_fit();
        self.claims_per_target.shrink_to_fit();
        self.claims_per_claimer.shrink_to_fit();
        self.one_time_claims_per_user.shrink_to_fit();
        self.key_uploads.shrink_to_fit();
        self.account_changes.shrink_to_fit();
        self.media_uploads.shrink_to_fit();
        if let Some(codes) = &self.codes_per_source {
            codes.retain_recent();
            codes.shrink_to_fit();
        }
    }
}

type NotUntil = governor::NotUntil<<DefaultClock as Clock>::Instant>;

/// `RateLimited`, with the wait until `budget` allows one more.
fn refusal(budget: Budget, what: &str, not_until: Option<NotUntil>) -> Answer {
    let wait = not_until
        .map(|n| n.wait_time_from(DefaultClock::default().now()))
        .unwrap_or(budget.period * budget.burst.max(1));
    let wait_ms = wait.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
    Answer::Error {
        code: ErrorCode::RateLimited,
        message: format!(
            "budget of {} {what} exceeded (burst {}); retry in {wait_ms} ms",
            budget.describe(),
            budget.burst
        ),
        retry_after_ms: wait_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(config: BudgetConfig) -> Budgets {
        Budgets::new(config)
    }

    fn limited(a: Option<Answer>) -> bool {
        matches!(a, Some(Answer::Error { code: ErrorCode::RateLimited, retry_after_ms, .. }) if retry_after_ms > 0)
    }

    #[test]
    fn claims_of_one_user_are_bounded_per_claimer_and_other_targets_are_not_affected() {
        let b = budgets(BudgetConfig::default());
        for _ in 0..10 {
            assert!(b.charge(1, 1, Charge::ClaimOf(2)).is_none());
        }
        assert!(limited(b.charge(1, 1, Charge::ClaimOf(2))));
        // Another device of the same claimer shares the per-user budget.
        assert!(limited(b.charge(1, 2, Charge::ClaimOf(2))));
        // Other targets, and other claimers of the same target, are unaffected.
        assert!(b.charge(1, 1, Charge::ClaimOf(3)).is_none());
        assert!(b.charge(4, 1, Charge::ClaimOf(2)).is_none());
    }

    #[test]
    fn claims_by_one_user_are_bounded_over_all_targets() {
        let b = budgets(BudgetConfig {
            claims_per_claimer: Budget::per_minute(1, 25),
            ..Default::default()
        });
        // 25 different targets: within every pair's budget, then the claimer's is spent.
        for target in 100..125 {
            assert!(b.charge(1, 1, Charge::ClaimOf(target)).is_none());
        }
        assert!(limited(b.charge(1, 1, Charge::ClaimOf(200))));
        assert!(limited(b.charge(1, 2, Charge::ClaimOf(201))), "per user");
        assert!(b.charge(2, 1, Charge::ClaimOf(200)).is_none());
    }

    #[test]
    fn one_time_keys_of_one_user_are_bounded_over_all_claimers() {
        let b = budgets(BudgetConfig::default());
        let burst = BudgetConfig::default().one_time_claims_per_user.burst;
        for _ in 0..burst {
            assert!(b.hand_one_time(7));
        }
        assert!(!b.hand_one_time(7), "past the burst: the fallback only");
        assert!(b.hand_one_time(8), "per claimed user");
    }

    #[test]
    fn acks_are_charged_per_seq() {
        let config = BudgetConfig {
            ack_seqs: Budget::per_second(1, 300),
            ..Default::default()
        };
        let b = budgets(config);
        assert!(b.charge(1, 1, Charge::AckSeqs(256)).is_none());
        assert!(limited(b.charge(1, 1, Charge::AckSeqs(256))));
        assert!(b.charge(1, 1, Charge::AckSeqs(0)).is_none());
        assert!(b.charge(1, 2, Charge::AckSeqs(256)).is_none());
        // More than the burst at once is refused, not waited for.
        assert!(limited(b.charge(1, 3, Charge::AckSeqs(301))));
    }

    #[test]
    fn each_budget_is_its_own() {
        let b = budgets(BudgetConfig::default());
        for _ in 0..10 {
            assert!(b.charge(1, 1, Charge::KeyUpload).is_none());
            assert!(b.charge(1, 1, Charge::AccountChange).is_none());
        }
        assert!(limited(b.charge(1, 1, Charge::KeyUpload)));
        assert!(limited(b.charge(1, 1, Charge::AccountChange)));
        assert!(b.charge(1, 1, Charge::Lookup).is_none());
        assert!(b.charge(1, 1, Charge::MediaUpload).is_none());
        b.prune();
    }

    #[test]
    fn codes_are_bounded_per_source_and_in_all() {
        let config = BudgetConfig {
            codes_per_source: Some(Budget::per_hour(2, 2)),
            codes_total: Some(Budget::per_hour(1, 3)),
            ..Default::default()
        };
        let b = budgets(config);
        let a: std::net::IpAddr = "198.18.0.1".parse().unwrap();
        let c: std::net::IpAddr = "198.18.0.2".parse().unwrap();
        assert!(b.charge_code(Some(a)).is_none());
        assert!(b.charge_code(Some(a)).is_none());
        assert!(limited(b.charge_code(Some(a))));
        assert!(b.charge_code(Some(c)).is_none());
        assert!(
            limited(b.charge_code(Some(c))),
            "the node-wide budget is spent"
        );
        assert!(limited(b.charge_code(None)));
        let free = budgets(BudgetConfig {
            codes_per_source: None,
            codes_total: None,
            ..Default::default()
        });
        for _ in 0..1000 {
            assert!(free.charge_code(Some(a)).is_none());
        }
    }

    #[test]
    fn budgets_describe_their_rates() {
        assert_eq!(Budget::per_hour(10, 1).describe(), "10/hour");
        assert_eq!(Budget::per_second(50, 1).describe(), "50/s");
        assert_eq!(Budget::per_minute(10, 1).describe(), "10/min");
    }
}
