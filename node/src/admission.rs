//! Admission of connections that have not authenticated yet.
//!
//! A connection is *unauthenticated* from its accept until its `Hello` proves a device: during
//! the TLS and WebSocket (or QUIC) handshake, before `Hello`, and for the whole of an anonymous
//! session (`Hello` without credentials, used to register or link a device). Such a connection
//! costs the node memory and a task but proves nothing, so the node bounds them:
//! - in number: at most [`PreAuthLimits::per_source_max`] per source (an IPv4 address, or an
//!   IPv6 /64, which one host or customer usually holds whole) and
//!   [`PreAuthLimits::total_max`] in all. A connection over either bound is refused at accept
//!   (a WebSocket client gets `503` with `Retry-After`, a QUIC client a refused connection) and
//!   counted in `ringpost_preauth_refused_total`;
//! - in time: the handshakes and `Hello` must be done within
//!   [`PreAuthLimits::handshake_timeout_ms`] of the accept, and an anonymous session ends
//!   [`PreAuthLimits::anonymous_session_ms`] after its `Hello`, however busy it is (a `Ping`
//!   does not extend either).
//!
//! A [`Permit`] is the connection's place in those counts; dropping it gives the place back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Default of [`PreAuthLimits::handshake_timeout_ms`].
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u32 = 10_000;
/// Default of [`PreAuthLimits::anonymous_session_ms`]: time to request a code, receive it and
/// type it in on one connection (a client may reconnect and go on where it stopped).
pub const ANONYMOUS_SESSION_MS_DEFAULT: u32 = 300_000;
/// Default of [`PreAuthLimits::per_source_max`]: generous for a carrier-grade NAT, where many
/// phones share an address, since a healthy client is unauthenticated for one round trip.
pub const PREAUTH_PER_SOURCE_MAX_DEFAULT: u32 = 256;
/// Default of [`PreAuthLimits::total_max`]. Memory: each costs about an idle connection of its
/// transport (BENCHMARKS.md: 2.7 KiB ws, 10.5 KiB wss, 32 KiB QUIC) plus handshake buffers while
/// its handshake runs.
pub const PREAUTH_TOTAL_MAX_DEFAULT: u32 = 16_384;

/// Bounds on unauthenticated connections (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreAuthLimits {
    pub handshake_timeout_ms: u32,
    pub anonymous_session_ms: u32,
    pub per_source_max: u32,
    pub total_max: u32,
}

impl Default for PreAuthLimits {
    fn default() -> Self {
        PreAuthLimits {
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
            anonymous_session_ms: ANONYMOUS_SESSION_MS_DEFAULT,
            per_source_max: PREAUTH_PER_SOURCE_MAX_DEFAULT,
            total_max: PREAUTH_TOTAL_MAX_DEFAULT,
        }
    }
}

/// Which bound refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    PerSource,
    Total,
}

/// Sources are grouped by what one party usually holds: an IPv4 address, an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    V4(u32),
    V6(u64),
}

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => Source::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Shards of the per-source map: accepts on different workers rarely contend.
const SHARDS: usize = 16;

/// The counts of unauthenticated connections.
#[derive(Debug)]
pub struct Admission {
    limits: PreAuthLimits,
    total: AtomicUsize,
    sources: Vec<Mutex<HashMap<Source, u32>>>,
}

impl Admission {
    pub fn new(limits: PreAuthLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            total: AtomicUsize::new(0),
            sources: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    pub fn limits(&self) -> PreAuthLimits {
        self.limits
    }

    /// Unauthenticated connections now.
    pub fn unauthenticated(&self) -> usize {
        self.total.load(Relaxed)
    }

    /// A place for a new connection from `ip`, or which bound refused it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refused> {
        let total_max = self.limits.total_max as usize;
        if self
            .total
            .fetch_update(Relaxed, Relaxed, |n| (n < total_max).then_some(n + 1))
            .is_err()
        {
            return Err(Refused::Total);
        }
        let source = Source::of(ip);
        let mut map = self.shard(source);
        let count = map.entry(source).or_insert(0);
        if *count >= self.limits.per_source_max {
            if *count == 0 {
                map.remove(&source);
            }
            drop(map);
            self.total.fetch_sub(1, Relaxed);
            return Err(Refused::PerSource);
        }
        *count += 1;
        Ok(Permit {
            admission: self.clone(),
            source,
        })
    }

    fn shard(&self, source: Source) -> std::sync::MutexGuard<'_, HashMap<Source, u32>> {
        let h = match source {
            Source::V4(a) => u64::from(a),
            Source::V6(p) => p,
        };
        let i = (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) as usize % SHARDS;
        self.sources[i].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One unauthenticated connection's place in the counts, given back on drop.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    source: Source,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut map = self.admission.shard(self.source);
        if let Some(count) = map.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.source);
            }
        }
        drop(map);
        self.admission.total.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_source_max: u32, total_max: u32) -> PreAuthLimits {
        PreAuthLimits {
            per_source_max,
            total_max,
            ..Default::default()
        }
    }

    #[test]
    fn bounds_each_source_and_the_total_and_gives_places_back_on_drop() {
        let a = Admission::new(limits(2, 3));
        let ip1: IpAddr = "198.18.0.1".parse().unwrap();
        let ip2: IpAddr = "198.18.0.2".parse().unwrap();
        let p1 = a.admit(ip1).unwrap();
        let _p2 = a.admit(ip1).unwrap();
        assert_eq!(a.admit(ip1).unwrap_err(), Refused::PerSource);
        let _p3 = a.admit(ip2).unwrap();
        assert_eq!(a.admit(ip2).unwrap_err(), Refused::Total);
        assert_eq!(a.unauthenticated(), 3);
        drop(p1);
        assert_eq!(a.unauthenticated(), 2);
        let _p4 = a.admit(ip1).unwrap();
        assert_eq!(a.admit(ip1).unwrap_err(), Refused::Total);
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let a = Admission::new(limits(1, 100));
        let _p = a.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert_eq!(
            a.admit("2001:db8:1:2:ffff::9".parse().unwrap())
                .unwrap_err(),
            Refused::PerSource
        );
        let _q = a.admit("2001:db8:1:3::1".parse().unwrap()).unwrap();
        let _r = a.admit("198.18.0.7".parse().unwrap()).unwrap();
        assert_eq!(
            a.admit("::ffff:198.18.0.7".parse().unwrap()).unwrap_err(),
            Refused::PerSource
        );
    }

    #[test]
    fn refusals_leave_no_residue() {
        let a = Admission::new(limits(0, 10));
        for _ in 0..100 {
            assert!(a.admit("198.18.0.1".parse().unwrap()).is_err());
        }
        assert_eq!(a.unauthenticated(), 0);
        assert!(a.sources.iter().all(|s| s.lock().unwrap().is_empty()));
    }
}
