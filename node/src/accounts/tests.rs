//! Tests of the accounts service, each run against the in-memory and the RocksDB engine.

use std::sync::atomic::AtomicBool;
use std::sync::Mutex as StdMutex;

use super::pin::tests::TEST_PARAMS;
use super::*;
use crate::storage::suite::{mem_fixture, rocks_fixture, Fixture};
use crate::storage::StorageError;
use ringpost_wire::ErrorCode;

const T0: u64 = 1_700_000_000_000;
const PHONE: UserId = 15_551_234_567;
const MINUTE: u64 = 60_000;

/// Records every code instead of sending it; fails while `fail` is set.
#[derive(Default)]
struct TestSender {
    sent: StdMutex<Vec<(UserId, String, CodeChannel)>>,
    fail: AtomicBool,
}

impl TestSender {
    fn last_code(&self, phone: UserId) -> String {
        let sent = self.sent.lock().unwrap();
        sent.iter()
            .rev()
            .find(|(p, _, _)| *p == phone)
            .map(|(_, c, _)| c.clone())
            .unwrap()
    }
    fn sent_count(&self) -> usize {
        self.sent.lock().unwrap().len()
    }
}

impl CodeSender for TestSender {
    fn send<'a>(&'a self, phone: UserId, code: &'a str, channel: CodeChannel) -> SendFuture<'a> {
        Box::pin(async move {
            self.sent
                .lock()
                .unwrap()
                .push((phone, code.to_owned(), channel));
            if self.fail.load(Ordering::SeqCst) {
                Err(CodeSendError::Status(500))
            } else {
                Ok(())
            }
        })
    }
}

struct Harness {
    accounts: Accounts,
    sender: Arc<TestSender>,
    engine: Arc<dyn Engine>,
    _dir: Option<tempfile::TempDir>,
}

impl Harness {
    fn new(f: Fixture) -> Harness {
        Self::with_config(
            f,
            AccountsConfig {
                pin_params: TEST_PARAMS,
                ..AccountsConfig::default()
            },
        )
    }

    fn with_config(f: Fixture, config: AccountsConfig) -> Harness {
        let (engine, dir) = f;
        let sender = Arc::new(TestSender::default());
        let accounts = Accounts::new(engine.clone(), sender.clone(), config);
        Harness {
            accounts,
            sender,
            engine,
            _dir: dir,
        }
    }

    fn request(&self, phone: UserId, now_ms: u64) -> Result<Challenge, AccountError> {
        futures::executor::block_on(self.accounts.request_code(phone, CodeChannel::Sms, now_ms))
    }

    /// Requests a code and verifies it: a fresh registration of `phone` at `now_ms`.
    fn register(&self, phone: UserId, now_ms: u64) -> Verified {
        self.register_with_pin(phone, "", now_ms).unwrap()
    }

    fn register_with_pin(
        &self,
        phone: UserId,
        pin: &str,
        now_ms: u64,
    ) -> Result<Verified, AccountError> {
        self.request(phone, now_ms).unwrap();
        let code = self.sender.last_code(phone);
        self.accounts.verify(phone, &code, pin, "phone", now_ms)
    }

    /// Links a device through a fresh link code; returns its id and token.
    fn link(&self, user: UserId, now_ms: u64) -> Result<(DeviceId, Token), AccountError> {
        let issued = self
            .accounts
            .issue_link_code(user, PRIMARY_DEVICE, now_ms)?;
        self.accounts.link(user, &issued.code, "laptop", now_ms)
    }

    fn auth(&self, user: UserId, device: DeviceId, token: &Token) -> Result<(), AccountError> {
        self.accounts.authenticate(user, device, token.as_bytes())
    }
}

fn wrong_code(code: &str) -> String {
    let n: u32 = code.parse().unwrap();
    format!("{:06}", (n + 1) % 1_000_000)
}

fn registers_a_new_account(f: Fixture) {
    let h = Harness::new(f);
    let challenge = h.request(PHONE, T0).unwrap();
    assert_eq!(
        challenge,
        Challenge {
            expires_in_ms: CODE_TTL_MS_DEFAULT as u32,
            retry_after_ms: 60_000
        }
    );
    let code = h.sender.last_code(PHONE);
    assert_eq!(code.len(), CODE_DIGITS);
    assert!(code.bytes().all(|b| b.is_ascii_digit()));
    let v = h
        .accounts
        .verify(PHONE, &code, "", "my phone", T0 + 1000)
        .unwrap();
    assert_eq!(v.registered.user, PHONE);
    assert_eq!(v.registered.device, PRIMARY_DEVICE);
    assert!(v.removed_devices.is_empty());
    h.auth(PHONE, 1, &v.registered.token).unwrap();
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1]);
    // The code is one-time.
    let again = h
        .accounts
        .verify(PHONE, &code, "", "my phone", T0 + 2000)
        .unwrap_err();
    assert!(
        matches!(again, AccountError::VerificationExpired),
        "{again}"
    );
    assert_eq!(again.code(), ErrorCode::VerificationExpired);
}

fn invalid_phone_numbers_are_refused(f: Fixture) {
    let h = Harness::new(f);
    for phone in [0, PHONE_MAX + 1, u64::MAX] {
        let err = h.request(phone, T0).unwrap_err();
        assert!(matches!(err, AccountError::InvalidPhone), "{phone}: {err}");
        assert!(matches!(
            h.accounts.verify(phone, "123456", "", "", T0),
            Err(AccountError::InvalidPhone)
        ));
    }
    assert_eq!(h.sender.sent_count(), 0);
    h.request(PHONE_MAX, T0).unwrap();
    h.request(1, T0).unwrap();
}

fn codes_expire(f: Fixture) {
    let h = Harness::new(f);
    h.request(PHONE, T0).unwrap();
    let code = h.sender.last_code(PHONE);
    let err = h
        .accounts
        .verify(PHONE, &code, "", "", T0 + CODE_TTL_MS_DEFAULT)
        .unwrap_err();
    assert!(matches!(err, AccountError::VerificationExpired), "{err}");
    // Just before expiry it works (a new code, after the resend interval).
    let t1 = T0 + CODE_TTL_MS_DEFAULT;
    h.request(PHONE, t1).unwrap();
    let code = h.sender.last_code(PHONE);
    h.accounts
        .verify(PHONE, &code, "", "", t1 + CODE_TTL_MS_DEFAULT - 1)
        .unwrap();
    // Never requested at all.
    let err = h
        .accounts
        .verify(PHONE + 1, "123456", "", "", T0)
        .unwrap_err();
    assert!(matches!(err, AccountError::VerificationExpired));
}

fn wrong_codes_are_limited_per_code(f: Fixture) {
    let h = Harness::new(f);
    h.request(PHONE, T0).unwrap();
    let code = h.sender.last_code(PHONE);
    for i in 0..CODE_ATTEMPTS_MAX {
        let err = h
            .accounts
            .verify(PHONE, &wrong_code(&code), "", "", T0 + u64::from(i))
            .unwrap_err();
        assert!(
            matches!(err, AccountError::VerificationFailed),
            "attempt {i}: {err}"
        );
        assert_eq!(err.code(), ErrorCode::VerificationFailed);
    }
    // Even the right code is refused now.
    let err = h
        .accounts
        .verify(PHONE, &code, "", "", T0 + 10)
        .unwrap_err();
    assert!(matches!(err, AccountError::TooManyAttempts), "{err}");
    assert_eq!(err.code(), ErrorCode::TooManyAttempts);
    // Garbage codes count as wrong codes, over-long ones are refused before counting.
    let err = h
        .accounts
        .verify(PHONE, &"9".repeat(300), "", "", T0 + 11)
        .unwrap_err();
    assert!(matches!(err, AccountError::TooLong { what: "code", .. }));
    // A new code gets fresh attempts.
    h.request(PHONE, T0 + MINUTE).unwrap();
    let fresh = h.sender.last_code(PHONE);
    assert!(matches!(
        h.accounts.verify(PHONE, "abc", "", "", T0 + MINUTE),
        Err(AccountError::VerificationFailed)
    ));
    h.accounts
        .verify(PHONE, &fresh, "", "", T0 + MINUTE)
        .unwrap();
}

fn resends_are_throttled(f: Fixture) {
    let h = Harness::new(f);
    h.request(PHONE, T0).unwrap();
    let first = h.sender.last_code(PHONE);
    let err = h.request(PHONE, T0 + MINUTE - 1000).unwrap_err();
    assert!(
        matches!(
            err,
            AccountError::RateLimited {
                retry_after_ms: 1000
            }
        ),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::RateLimited);
    assert_eq!(err.retry_after_ms(), 1000);
    assert_eq!(h.sender.sent_count(), 1);
    // Other numbers are not affected.
    h.request(PHONE + 1, T0 + 1).unwrap();
    h.request(PHONE, T0 + MINUTE).unwrap();
    let second = h.sender.last_code(PHONE);
    // The new code replaces the old one (unless they happen to be equal).
    if first != second {
        assert!(matches!(
            h.accounts.verify(PHONE, &first, "", "", T0 + MINUTE),
            Err(AccountError::VerificationFailed)
        ));
    }
    h.accounts
        .verify(PHONE, &second, "", "", T0 + MINUTE)
        .unwrap();
}

fn sends_are_bounded_per_hour(f: Fixture) {
    let h = Harness::new(f);
    let max = u64::from(CODE_SENDS_PER_WINDOW_MAX_DEFAULT);
    for i in 0..max {
        h.request(PHONE, T0 + i * MINUTE).unwrap();
    }
    let now = T0 + max * MINUTE;
    let err = h.request(PHONE, now).unwrap_err();
    let expected = T0 + CODE_SEND_WINDOW_MS - now;
    assert!(
        matches!(err, AccountError::RateLimited { retry_after_ms } if retry_after_ms == expected),
        "{err}"
    );
    // Verifying a code does not reset the window.
    let code = h.sender.last_code(PHONE);
    h.accounts.verify(PHONE, &code, "", "", now).unwrap();
    assert!(matches!(
        h.request(PHONE, now + MINUTE),
        Err(AccountError::RateLimited { .. })
    ));
    h.request(PHONE, T0 + CODE_SEND_WINDOW_MS).unwrap();
    assert_eq!(h.sender.sent_count() as u64, max + 1);
}

fn failed_delivery_withdraws_the_code(f: Fixture) {
    let h = Harness::new(f);
    h.sender.fail.store(true, Ordering::SeqCst);
    let err = h.request(PHONE, T0).unwrap_err();
    assert!(
        matches!(err, AccountError::Delivery(CodeSendError::Status(500))),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::Internal);
    let lost = h.sender.last_code(PHONE);
    assert!(matches!(
        h.accounts.verify(PHONE, &lost, "", "", T0),
        Err(AccountError::VerificationExpired)
    ));
    // The user may retry at once.
    h.sender.fail.store(false, Ordering::SeqCst);
    h.request(PHONE, T0 + 1).unwrap();
    let code = h.sender.last_code(PHONE);
    h.accounts.verify(PHONE, &code, "", "", T0 + 2).unwrap();
}

fn reregistration_replaces_every_device(f: Fixture) {
    let h = Harness::new(f);
    let old = h.register(PHONE, T0);
    let (d2, t2) = h.link(PHONE, T0).unwrap();
    let (d3, t3) = h.link(PHONE, T0).unwrap();
    assert_eq!((d2, d3), (2, 3));
    let pending_link = h.accounts.issue_link_code(PHONE, 1, T0).unwrap();

    let new = h.register(PHONE, T0 + MINUTE);
    assert_eq!(new.registered.device, PRIMARY_DEVICE);
    assert_eq!(new.removed_devices, vec![1, 2, 3]);
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1]);
    for (d, t) in [(1, &old.registered.token), (d2, &t2), (d3, &t3)] {
        assert!(
            matches!(h.auth(PHONE, d, t), Err(AccountError::BadCredentials)),
            "device {d}"
        );
    }
    h.auth(PHONE, 1, &new.registered.token).unwrap();
    // A link code of the replaced primary is void.
    let err = h
        .accounts
        .link(PHONE, &pending_link.code, "x", T0 + MINUTE)
        .unwrap_err();
    assert!(matches!(err, AccountError::VerificationFailed), "{err}");
    // Device ids are never reused within the account.
    assert_eq!(h.link(PHONE, T0 + MINUTE).unwrap().0, 4);
}

fn registration_lock_requires_the_pin(f: Fixture) {
    let h = Harness::new(f);
    let first = h.register(PHONE, T0);
    let (linked, _) = h.link(PHONE, T0).unwrap();
    assert!(matches!(
        h.accounts.set_registration_lock(PHONE, linked, "1234"),
        Err(AccountError::Forbidden)
    ));
    let err = h
        .accounts
        .set_registration_lock(PHONE, 1, "123")
        .unwrap_err();
    assert!(matches!(err, AccountError::LimitExceeded(_)), "{err}");
    let err = h
        .accounts
        .set_registration_lock(PHONE, 1, &"1".repeat(PIN_BYTES_MAX + 1))
        .unwrap_err();
    assert!(matches!(err, AccountError::TooLong { .. }), "{err}");
    assert!(matches!(
        h.accounts.set_registration_lock(PHONE + 1, 1, "1234"),
        Err(AccountError::NotFound)
    ));
    h.accounts.set_registration_lock(PHONE, 1, "2468").unwrap();

    let t1 = T0 + MINUTE;
    h.request(PHONE, t1).unwrap();
    let code = h.sender.last_code(PHONE);
    for pin in ["", "1357"] {
        let err = h
            .accounts
            .verify(PHONE, &code, pin, "thief", t1)
            .unwrap_err();
        assert!(
            matches!(err, AccountError::RegistrationLocked),
            "{pin:?}: {err}"
        );
        assert_eq!(err.code(), ErrorCode::RegistrationLocked);
    }
    // Nothing changed, and the code is still good for the right PIN.
    h.auth(PHONE, 1, &first.registered.token).unwrap();
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1, linked]);
    let v = h
        .accounts
        .verify(PHONE, &code, "2468", "new phone", t1)
        .unwrap();
    assert_eq!(v.removed_devices, vec![1, linked]);
    // The lock survives re-registration.
    let err = h.register_with_pin(PHONE, "", t1 + MINUTE).unwrap_err();
    assert!(matches!(err, AccountError::RegistrationLocked));
    // Cleared by the (new) primary: no PIN needed any more.
    h.accounts.set_registration_lock(PHONE, 1, "").unwrap();
    h.register_with_pin(PHONE, "", t1 + 2 * MINUTE).unwrap();
}

fn wrong_pins_are_limited(f: Fixture) {
    let h = Harness::new(f);
    h.register(PHONE, T0);
    h.accounts.set_registration_lock(PHONE, 1, "2468").unwrap();
    let t1 = T0 + MINUTE;
    h.request(PHONE, t1).unwrap();
    let code = h.sender.last_code(PHONE);
    for i in 0..PIN_ATTEMPTS_MAX {
        let err = h
            .accounts
            .verify(PHONE, &code, "0000", "", t1 + u64::from(i))
            .unwrap_err();
        assert!(
            matches!(err, AccountError::RegistrationLocked),
            "{i}: {err}"
        );
    }
    let now = t1 + 100;
    let err = h
        .accounts
        .verify(PHONE, &code, "2468", "", now)
        .unwrap_err();
    let expected = t1 + PIN_ATTEMPT_WINDOW_MS - now;
    assert!(
        matches!(err, AccountError::RateLimited { retry_after_ms } if retry_after_ms == expected),
        "{err}"
    );
    // After the window the right PIN works (with a fresh code: the old one expired).
    let t2 = t1 + PIN_ATTEMPT_WINDOW_MS;
    let v = h.register_with_pin(PHONE, "2468", t2).unwrap();
    assert_eq!(v.removed_devices, vec![1]);
}

fn pin_hashing_is_bounded(f: Fixture) {
    let h = Harness::new(f);
    let permits: Vec<_> = (0..PIN_HASHES_IN_FLIGHT_MAX)
        .map(|_| h.accounts.pin_permit().unwrap())
        .collect();
    h.register(PHONE, T0);
    let err = h
        .accounts
        .set_registration_lock(PHONE, 1, "2468")
        .unwrap_err();
    assert!(
        matches!(
            err,
            AccountError::RateLimited {
                retry_after_ms: PIN_BUSY_RETRY_AFTER_MS
            }
        ),
        "{err}"
    );
    drop(permits);
    h.accounts.set_registration_lock(PHONE, 1, "2468").unwrap();
    assert_eq!(h.accounts.pin_hashes_in_flight.load(Ordering::SeqCst), 0);
}

fn tokens_authenticate_only_their_device(f: Fixture) {
    let h = Harness::new(f);
    let v = h.register(PHONE, T0);
    let (d2, t2) = h.link(PHONE, T0).unwrap();
    let t1 = v.registered.token;
    h.auth(PHONE, 1, &t1).unwrap();
    h.auth(PHONE, d2, &t2).unwrap();
    let bad = |r: Result<(), AccountError>| match r {
        Err(e @ AccountError::BadCredentials) => assert_eq!(e.code(), ErrorCode::BadCredentials),
        other => panic!("expected BadCredentials, got {other:?}"),
    };
    bad(h.auth(PHONE, 1, &t2)); // another device's token
    bad(h.auth(PHONE, d2, &t1));
    bad(h.auth(PHONE, 9, &t1)); // no such device
    bad(h.auth(PHONE + 1, 1, &t1)); // no such user
    bad(h.auth(PHONE, 1, &Token::generate()));
    bad(h.accounts.authenticate(PHONE, 1, &t1.as_bytes()[..31]));
    bad(h.accounts.authenticate(PHONE, 1, &[]));
    let mut long = t1.as_bytes().to_vec();
    long.push(0);
    bad(h.accounts.authenticate(PHONE, 1, &long));
    h.accounts.remove_device(PHONE, 1, d2).unwrap();
    bad(h.auth(PHONE, d2, &t2)); // removed device
}

fn linking_devices(f: Fixture) {
    let h = Harness::new(f);
    h.register(PHONE, T0);
    assert!(matches!(
        h.accounts.issue_link_code(PHONE + 1, 1, T0),
        Err(AccountError::NotFound)
    ));
    let issued = h.accounts.issue_link_code(PHONE, 1, T0).unwrap();
    assert_eq!(issued.code.len(), LINK_CODE_CHARS);
    assert!(issued.code.bytes().all(|b| BASE32.contains(&b)));
    assert_eq!(issued.expires_in_ms, LINK_CODE_TTL_MS_DEFAULT as u32);
    // Case and surrounding spaces do not matter.
    let typed = format!("  {}\n", issued.code.to_ascii_lowercase());
    let (d2, t2) = h.accounts.link(PHONE, &typed, "tablet", T0 + 1).unwrap();
    assert_eq!(d2, 2);
    h.auth(PHONE, d2, &t2).unwrap();
    // One-time.
    assert!(matches!(
        h.accounts.link(PHONE, &issued.code, "again", T0 + 2),
        Err(AccountError::VerificationFailed)
    ));
    // Only the primary issues codes.
    assert!(matches!(
        h.accounts.issue_link_code(PHONE, d2, T0),
        Err(AccountError::Forbidden)
    ));
    // Wrong, malformed, other user's and expired codes.
    let issued = h.accounts.issue_link_code(PHONE, 1, T0).unwrap();
    assert!(matches!(
        h.accounts.link(PHONE, "AAAAAAAAAA", "x", T0),
        Err(AccountError::VerificationFailed)
    ));
    assert!(matches!(
        h.accounts.link(PHONE, "short", "x", T0),
        Err(AccountError::VerificationFailed)
    ));
    assert!(matches!(
        h.accounts.link(PHONE + 1, &issued.code, "x", T0),
        Err(AccountError::VerificationFailed)
    ));
    let err = h
        .accounts
        .link(PHONE, &issued.code, "x", T0 + LINK_CODE_TTL_MS_DEFAULT)
        .unwrap_err();
    assert!(matches!(err, AccountError::VerificationExpired), "{err}");
    assert!(matches!(
        h.accounts
            .link(PHONE, &issued.code, &"n".repeat(STRING_BYTES_MAX + 1), T0),
        Err(AccountError::TooLong {
            what: "device name",
            ..
        })
    ));
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1, 2]);
}

fn link_codes_outstanding_are_bounded(f: Fixture) {
    let h = Harness::new(f);
    h.register(PHONE, T0);
    let codes: Vec<_> = (0..LINK_CODES_OUTSTANDING_MAX as u64)
        .map(|i| h.accounts.issue_link_code(PHONE, 1, T0 + i).unwrap())
        .collect();
    let now = T0 + 100;
    let err = h.accounts.issue_link_code(PHONE, 1, now).unwrap_err();
    let expected = T0 + LINK_CODE_TTL_MS_DEFAULT - now;
    assert!(
        matches!(err, AccountError::RateLimited { retry_after_ms } if retry_after_ms == expected),
        "{err}"
    );
    // Using one frees a slot; so does expiry.
    h.accounts.link(PHONE, &codes[0].code, "a", now).unwrap();
    h.accounts.issue_link_code(PHONE, 1, now).unwrap();
    assert!(h.accounts.issue_link_code(PHONE, 1, now).is_err());
    let later = now + LINK_CODE_TTL_MS_DEFAULT;
    for _ in 0..LINK_CODES_OUTSTANDING_MAX {
        h.accounts.issue_link_code(PHONE, 1, later).unwrap();
    }
    assert!(h.accounts.issue_link_code(PHONE, 1, later).is_err());
}

fn device_limit(f: Fixture) {
    let h = Harness::new(f);
    h.register(PHONE, T0);
    let ids: Vec<_> = (1..DEVICES_PER_USER_MAX)
        .map(|_| h.link(PHONE, T0).unwrap().0)
        .collect();
    assert_eq!(ids, vec![2, 3, 4, 5]);
    let err = h.accounts.issue_link_code(PHONE, 1, T0).unwrap_err();
    assert!(matches!(err, AccountError::DeviceLimit), "{err}");
    assert_eq!(err.code(), ErrorCode::DeviceLimit);
    // A code issued before the account filled up is refused but stays valid.
    h.accounts.remove_device(PHONE, 1, 5).unwrap();
    let issued = h.accounts.issue_link_code(PHONE, 1, T0).unwrap();
    let (d6, _) = h.link(PHONE, T0).unwrap();
    assert_eq!(d6, 6, "ids are never reused");
    assert!(matches!(
        h.accounts.link(PHONE, &issued.code, "x", T0),
        Err(AccountError::DeviceLimit)
    ));
    h.accounts.remove_device(PHONE, 1, 2).unwrap();
    assert_eq!(h.accounts.link(PHONE, &issued.code, "x", T0).unwrap().0, 7);
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1, 3, 4, 6, 7]);
}

fn concurrent_links_get_distinct_ids(f: Fixture) {
    let h = Harness::new(f);
    h.register(PHONE, T0);
    let codes: Vec<_> = (0..LINK_CODES_OUTSTANDING_MAX)
        .map(|_| h.accounts.issue_link_code(PHONE, 1, T0).unwrap().code)
        .collect();
    let mut ids: Vec<DeviceId> = std::thread::scope(|s| {
        let handles: Vec<_> = codes
            .iter()
            .map(|code| s.spawn(|| h.accounts.link(PHONE, code, "x", T0).unwrap().0))
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    ids.sort_unstable();
    assert_eq!(ids, vec![2, 3, 4]);
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1, 2, 3, 4]);
}

fn device_removal_permissions(f: Fixture) {
    let h = Harness::new(f);
    h.register(PHONE, T0);
    let (d2, _) = h.link(PHONE, T0).unwrap();
    let (d3, _) = h.link(PHONE, T0).unwrap();
    let (d4, _) = h.link(PHONE, T0).unwrap();
    let forbidden = |r: Result<(), AccountError>| match r {
        Err(e @ AccountError::Forbidden) => assert_eq!(e.code(), ErrorCode::Forbidden),
        other => panic!("expected Forbidden, got {other:?}"),
    };
    forbidden(h.accounts.remove_device(PHONE, 1, 1)); // the primary, by itself
    forbidden(h.accounts.remove_device(PHONE, d2, 1)); // the primary, by a linked device
    forbidden(h.accounts.remove_device(PHONE, d2, d3)); // another linked device
    assert!(matches!(
        h.accounts.remove_device(PHONE, 1, 9),
        Err(AccountError::NotFound)
    ));
    assert!(matches!(
        h.accounts.remove_device(PHONE + 1, 1, 2),
        Err(AccountError::NotFound)
    ));
    h.accounts.remove_device(PHONE, d2, d2).unwrap(); // itself
    h.accounts.remove_device(PHONE, 1, d3).unwrap(); // by the primary
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1, d4]);
    // A removed device can no longer act.
    forbidden(h.accounts.remove_device(PHONE, d2, d2));
    assert!(matches!(
        h.accounts.remove_device(PHONE, 1, d2),
        Err(AccountError::NotFound)
    ));
}

fn device_list_cache_follows_changes(f: Fixture) {
    let h = Harness::new(f);
    assert!(matches!(
        h.accounts.devices(PHONE),
        Err(AccountError::NotFound)
    ));
    h.register(PHONE, T0);
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1]);
    let (d2, _) = h.link(PHONE, T0).unwrap();
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1, d2]);
    h.accounts.remove_device(PHONE, 1, d2).unwrap();
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1]);
    h.link(PHONE, T0).unwrap();
    h.register(PHONE, T0 + MINUTE);
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1]);
    // The cache really serves reads: delete the record behind the service's back.
    let mut b = WriteBatch::new();
    b.delete(Cf::Accounts, h.accounts.account_key(PHONE));
    h.engine.write(b, true).unwrap();
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1]);
    h.accounts.clear_device_cache();
    assert!(matches!(
        h.accounts.devices(PHONE),
        Err(AccountError::NotFound)
    ));
}

fn devices_without_cache(f: Fixture) {
    let config = AccountsConfig {
        pin_params: TEST_PARAMS,
        device_cache_capacity: 0,
        ..AccountsConfig::default()
    };
    let h = Harness::with_config(f, config);
    h.register(PHONE, T0);
    h.link(PHONE, T0).unwrap();
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1, 2]);
    assert_eq!(h.accounts.cache.len(), 0);
}

fn string_inputs_are_bounded(f: Fixture) {
    let h = Harness::new(f);
    h.request(PHONE, T0).unwrap();
    let code = h.sender.last_code(PHONE);
    let long_name = "n".repeat(STRING_BYTES_MAX + 1);
    let err = h
        .accounts
        .verify(PHONE, &code, "", &long_name, T0)
        .unwrap_err();
    assert!(
        matches!(
            err,
            AccountError::TooLong {
                what: "device name",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::LimitExceeded);
    let err = h
        .accounts
        .verify(PHONE, &code, &"p".repeat(PIN_BYTES_MAX + 1), "", T0)
        .unwrap_err();
    assert!(
        matches!(err, AccountError::TooLong { what: "PIN", .. }),
        "{err}"
    );
    // The longest allowed name is stored and read back.
    let name = "n".repeat(STRING_BYTES_MAX);
    h.accounts.verify(PHONE, &code, "", &name, T0).unwrap();
    assert_eq!(
        h.accounts.load(PHONE).unwrap().unwrap().devices[0].name,
        name
    );
}

fn corrupt_records_are_errors_not_panics(f: Fixture) {
    let h = Harness::new(f);
    let mut b = WriteBatch::new();
    b.put(Cf::Accounts, h.accounts.account_key(PHONE), vec![1, 2, 3]);
    b.put(Cf::Verify, h.accounts.pending_key(PHONE), vec![9]);
    h.engine.write(b, true).unwrap();
    let err = h
        .accounts
        .authenticate(PHONE, 1, &[0; TOKEN_BYTES])
        .unwrap_err();
    assert!(
        matches!(err, AccountError::Storage(StorageError::Corrupt { .. })),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::Internal);
    assert!(matches!(
        h.accounts.devices(PHONE),
        Err(AccountError::Storage(_))
    ));
    assert!(matches!(
        h.request(PHONE, T0),
        Err(AccountError::Storage(_))
    ));
    assert!(matches!(
        h.accounts.verify(PHONE, "123456", "", "", T0),
        Err(AccountError::Storage(_))
    ));
    assert!(matches!(
        h.accounts.remove_device(PHONE, 1, 2),
        Err(AccountError::Storage(_))
    ));
}

fn sweep_removes_only_dead_verification_state(f: Fixture) {
    let config = AccountsConfig {
        pin_params: TEST_PARAMS,
        shard_count: 1,
        ..AccountsConfig::default()
    };
    let h = Harness::with_config(f, config);
    h.register(PHONE, T0); // used code: dead once its throttles lapse
    h.request(PHONE + 1, T0).unwrap(); // live code
    h.accounts.issue_link_code(PHONE, 1, T0).unwrap();
    let count = |h: &Harness| {
        h.engine
            .scan(Cf::Verify, &[], &[0xff; 4], 100)
            .unwrap()
            .len()
    };
    assert_eq!(count(&h), 3);
    // Nothing is dead yet.
    let s = h.accounts.sweep_expired(0, None, T0 + 1, 100).unwrap();
    assert_eq!(
        s,
        Sweep {
            removed: 0,
            resume_from: None
        }
    );
    // After the link code and both codes expired, but within the hour: only the link code.
    let s = h
        .accounts
        .sweep_expired(0, None, T0 + CODE_TTL_MS_DEFAULT, 100)
        .unwrap();
    assert_eq!(s.removed, 1);
    assert_eq!(count(&h), 2);
    // After the hour, page through one record at a time.
    let now = T0 + CODE_SEND_WINDOW_MS;
    let (mut removed, mut cursor, mut steps) = (0, None, 0);
    loop {
        let s = h
            .accounts
            .sweep_expired(0, cursor.as_deref(), now, 1)
            .unwrap();
        removed += s.removed;
        steps += 1;
        assert!(steps < 10);
        match s.resume_from {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(removed, 2);
    assert_eq!(count(&h), 0);
    // The throttle is gone with the record, the account is untouched.
    h.request(PHONE, now).unwrap();
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1]);
}

fn push_tokens_follow_their_device(f: Fixture) {
    use ringpost_wire::limits::PUSH_TOKEN_BYTES_MAX;
    use ringpost_wire::PushProvider;
    let h = Harness::new(f);
    h.register(PHONE, T0);
    let (linked, _) = h.link(PHONE, T0).unwrap();
    assert_eq!(h.accounts.push_token(PHONE, 1).unwrap(), None);
    h.accounts
        .set_push_token(PHONE, 1, PushProvider::Apns, "aa11")
        .unwrap();
    h.accounts
        .set_push_token(PHONE, linked, PushProvider::Fcm, "fcm-1")
        .unwrap();
    let apns = PushToken {
        provider: PushProvider::Apns,
        token: "aa11".into(),
    };
    assert_eq!(h.accounts.push_token(PHONE, 1).unwrap(), Some(apns.clone()));
    // A later registration replaces the token; a stale one is then not removed by a provider's
    // "invalid" answer about the old token.
    h.accounts
        .set_push_token(PHONE, 1, PushProvider::Apns, "bb22")
        .unwrap();
    assert!(!h.accounts.remove_push_token_if(PHONE, 1, &apns).unwrap());
    let current = h.accounts.push_token(PHONE, 1).unwrap().unwrap();
    assert_eq!(current.token, "bb22");
    assert!(h.accounts.remove_push_token_if(PHONE, 1, &current).unwrap());
    assert_eq!(h.accounts.push_token(PHONE, 1).unwrap(), None);
    // Empty unregisters; too long or unknown devices are refused and store nothing.
    h.accounts
        .set_push_token(PHONE, 1, PushProvider::Webhook, "w")
        .unwrap();
    h.accounts
        .set_push_token(PHONE, 1, PushProvider::Webhook, "")
        .unwrap();
    assert_eq!(h.accounts.push_token(PHONE, 1).unwrap(), None);
    let long = "x".repeat(PUSH_TOKEN_BYTES_MAX + 1);
    assert!(matches!(
        h.accounts
            .set_push_token(PHONE, 1, PushProvider::Fcm, &long),
        Err(AccountError::TooLong { .. })
    ));
    assert!(matches!(
        h.accounts
            .set_push_token(PHONE, 1, PushProvider::Apns, "zz/../x"),
        Err(AccountError::InvalidPushToken(_))
    ));
    assert!(matches!(
        h.accounts
            .set_push_token(PHONE, 1, PushProvider::Fcm, "a b"),
        Err(AccountError::InvalidPushToken(_))
    ));
    assert_eq!(h.accounts.push_token(PHONE, 1).unwrap(), None);
    assert!(matches!(
        h.accounts.set_push_token(PHONE, 9, PushProvider::Fcm, "t"),
        Err(AccountError::NotFound)
    ));
    // Removing the device removes its token; the account and other tokens stay readable.
    h.accounts.remove_device(PHONE, 1, linked).unwrap();
    assert_eq!(h.accounts.push_token(PHONE, linked).unwrap(), None);
    assert_eq!(h.accounts.devices(PHONE).unwrap(), vec![1]);
    // Re-registration removes every old device's token.
    h.accounts
        .set_push_token(PHONE, 1, PushProvider::Fcm, "old-primary")
        .unwrap();
    h.register(PHONE, T0 + 2 * MINUTE);
    assert_eq!(h.accounts.push_token(PHONE, 1).unwrap(), None);
}

macro_rules! cases {
    ($fixture:path; $($case:ident),* $(,)?) => {
        $( #[test] fn $case() { super::$case($fixture()); } )*
    };
}

macro_rules! suite {
    ($fixture:path) => {
        cases!($fixture;
            registers_a_new_account,
            invalid_phone_numbers_are_refused,
            codes_expire,
            wrong_codes_are_limited_per_code,
            resends_are_throttled,
            sends_are_bounded_per_hour,
            failed_delivery_withdraws_the_code,
            reregistration_replaces_every_device,
            registration_lock_requires_the_pin,
            wrong_pins_are_limited,
            pin_hashing_is_bounded,
            tokens_authenticate_only_their_device,
            linking_devices,
            link_codes_outstanding_are_bounded,
            device_limit,
            concurrent_links_get_distinct_ids,
            device_removal_permissions,
            device_list_cache_follows_changes,
            devices_without_cache,
            string_inputs_are_bounded,
            corrupt_records_are_errors_not_panics,
            sweep_removes_only_dead_verification_state,
            push_tokens_follow_their_device,
        );
    };
}

mod mem {
    use super::*;
    suite!(mem_fixture);
}

mod rocks {
    use super::*;
    suite!(rocks_fixture);
}

#[test]
fn link_codes_are_uniform_base32() {
    let mut seen = [0u32; 32];
    for _ in 0..2000 {
        let code = new_link_code();
        assert_eq!(code.len(), LINK_CODE_CHARS);
        for b in code.bytes() {
            let i = BASE32.iter().position(|&c| c == b).unwrap();
            seen[i] += 1;
        }
    }
    // 20,000 draws over 32 symbols: ~625 each; every symbol appears.
    assert!(seen.iter().all(|&n| n > 400), "{seen:?}");
}

#[test]
fn server_default_pin_cost_end_to_end() {
    // The production Argon2 parameters, once, through the service.
    let h = Harness::with_config(mem_fixture(), AccountsConfig::default());
    h.register(PHONE, T0);
    h.accounts
        .set_registration_lock(PHONE, 1, "24681357")
        .unwrap();
    let v = h.register_with_pin(PHONE, "24681357", T0 + MINUTE).unwrap();
    assert_eq!(v.removed_devices, vec![1]);
}

#[test]
fn request_code_future_is_send() {
    // Callers spawn it on a multi-threaded runtime: no lock guard may live across the await.
    fn assert_send<T: Send>(_: &T) {}
    let h = Harness::new(mem_fixture());
    let fut = h.accounts.request_code(PHONE, CodeChannel::Sms, T0);
    assert_send(&fut);
    fn assert_sync<T: Send + Sync>() {}
    assert_sync::<Accounts>();
    assert_sync::<AccountError>();
}
