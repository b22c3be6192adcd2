//! Registration-lock PINs, stored as Argon2id hashes with their parameters (so the cost can be
//! raised later without invalidating existing locks).

use argon2::{Algorithm, Argon2, Params, Version};
use rand::rngs::OsRng;
use rand::RngCore;
use subtle::ConstantTimeEq;

use super::AccountError;

/// Salt bytes per PIN hash.
pub(crate) const PIN_SALT_BYTES: usize = 16;
/// Hash output bytes.
pub(crate) const PIN_HASH_BYTES: usize = 32;

/// Argon2id cost parameters of a PIN hash.
///
/// A PIN has little entropy, so the hash must be slow for an attacker who steals the database,
/// yet the server hashes on every `SetRegistrationLock` and every registration attempt on a
/// locked account. [`PinParams::SERVER_DEFAULT`] is OWASP's minimum for Argon2id (19 MiB, 2
/// passes, 1 lane): about 20–40 ms of one core and 19 MiB of memory per hash. The service runs
/// at most [`super::PIN_HASHES_IN_FLIGHT_MAX`] at once, so PIN hashing never holds more than
/// that many times 19 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes over the memory.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl PinParams {
    pub const SERVER_DEFAULT: PinParams = PinParams {
        m_cost_kib: 19 * 1024,
        t_cost: 2,
        p_cost: 1,
    };

    /// Largest memory cost accepted from a stored record (256 MiB): a corrupt record must not
    /// make the server allocate without bound.
    pub const M_COST_KIB_MAX: u32 = 256 * 1024;
    /// Largest pass count accepted from a stored record.
    pub const T_COST_MAX: u32 = 16;
    /// Largest lane count accepted from a stored record.
    pub const P_COST_MAX: u32 = 8;

    /// Whether these parameters are within the bounds above and accepted by Argon2.
    pub(crate) fn is_valid(&self) -> bool {
        self.m_cost_kib <= Self::M_COST_KIB_MAX
            && (1..=Self::T_COST_MAX).contains(&self.t_cost)
            && (1..=Self::P_COST_MAX).contains(&self.p_cost)
            && self.argon2().is_ok()
    }

    fn argon2(&self) -> Result<Argon2<'static>, argon2::Error> {
        let params = Params::new(
            self.m_cost_kib,
            self.t_cost,
            self.p_cost,
            Some(PIN_HASH_BYTES),
        )?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

/// A stored PIN hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PinHash {
    pub params: PinParams,
    pub salt: [u8; PIN_SALT_BYTES],
    pub hash: [u8; PIN_HASH_BYTES],
}

impl PinHash {
    /// Hashes `pin` with a fresh random salt. Costs what `params` says (see [`PinParams`]).
    pub fn create(pin: &str, params: PinParams) -> Result<PinHash, AccountError> {
        let mut salt = [0u8; PIN_SALT_BYTES];
        OsRng.fill_bytes(&mut salt);
        let hash = compute(pin, &salt, params)?;
        Ok(PinHash { params, salt, hash })
    }

    /// Whether `pin` matches, compared in constant time. Costs one hash.
    pub fn verify(&self, pin: &str) -> Result<bool, AccountError> {
        let candidate = compute(pin, &self.salt, self.params)?;
        Ok(bool::from(candidate.ct_eq(&self.hash)))
    }
}

fn compute(
    pin: &str,
    salt: &[u8; PIN_SALT_BYTES],
    params: PinParams,
) -> Result<[u8; PIN_HASH_BYTES], AccountError> {
    let argon2 = params
        .argon2()
        .map_err(|e| AccountError::PinHash(e.to_string()))?;
    let mut out = [0u8; PIN_HASH_BYTES];
    argon2
        .hash_password_into(pin.as_bytes(), salt, &mut out)
        .map_err(|e| AccountError::PinHash(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Cheap parameters for tests that are not about the cost.
    pub(crate) const TEST_PARAMS: PinParams = PinParams {
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
    };

    #[test]
    fn verify_accepts_only_the_pin() {
        let h = PinHash::create("1234", TEST_PARAMS).unwrap();
        assert!(h.verify("1234").unwrap());
        assert!(!h.verify("1235").unwrap());
        assert!(!h.verify("").unwrap());
        let h2 = PinHash::create("1234", TEST_PARAMS).unwrap();
        assert_ne!(h.salt, h2.salt, "salts are random");
        assert_ne!(h.hash, h2.hash);
    }

    #[test]
    fn server_default_params_work() {
        assert!(PinParams::SERVER_DEFAULT.is_valid());
        let h = PinHash::create("246810", PinParams::SERVER_DEFAULT).unwrap();
        assert!(h.verify("246810").unwrap());
    }

    #[test]
    fn bad_params_are_errors_not_panics() {
        assert!(!PinParams {
            m_cost_kib: 1,
            t_cost: 1,
            p_cost: 1
        }
        .is_valid());
        assert!(!PinParams {
            m_cost_kib: 64,
            t_cost: 0,
            p_cost: 1
        }
        .is_valid());
        assert!(!PinParams {
            m_cost_kib: u32::MAX,
            t_cost: 1,
            p_cost: 1
        }
        .is_valid());
        let bad = PinHash {
            params: PinParams {
                m_cost_kib: 1,
                t_cost: 1,
                p_cost: 1,
            },
            salt: [0; PIN_SALT_BYTES],
            hash: [0; PIN_HASH_BYTES],
        };
        assert!(matches!(bad.verify("1234"), Err(AccountError::PinHash(_))));
    }
}
