//! Counts the unauthenticated handshakes each source address has running, so that one source
//! cannot take every served-link slot ([`super::PEER_LINKS_SERVED_MAX`]) with dials that never
//! prove anything.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::lock;

/// The handshakes running per source address. An entry lives only while one of its handshakes
/// runs, and each running handshake holds a served-link slot, so the map has at most
/// [`super::PEER_LINKS_SERVED_MAX`] entries.
#[derive(Default)]
pub(super) struct HandshakesBySource {
    running: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl HandshakesBySource {
    /// A handshake from `source`, if fewer than `max` from it are running; it counts until the
    /// returned guard is dropped.
    pub(super) fn admit(&self, source: IpAddr, max: usize) -> Option<Handshake> {
        let mut running = lock(&self.running);
        let count = running.entry(source).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Handshake {
            running: self.running.clone(),
            source,
        })
    }
}

/// One running handshake; dropping it (authenticated, failed or timed out) frees its place.
pub(super) struct Handshake {
    running: Arc<Mutex<HashMap<IpAddr, usize>>>,
    source: IpAddr,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut running = lock(&self.running);
        if let Some(count) = running.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                running.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_each_source_and_frees_on_drop() {
        let counts = HandshakesBySource::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "::1".parse().unwrap());
        let held: Vec<Handshake> = (0..3).map(|_| counts.admit(a, 3).unwrap()).collect();
        assert!(counts.admit(a, 3).is_none());
        let other = counts.admit(b, 3).unwrap();
        drop(held);
        assert!(counts.admit(a, 3).is_some());
        drop(other);
        assert!(lock(&counts.running).is_empty());
    }
}
