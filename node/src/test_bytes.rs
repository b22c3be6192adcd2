//! Deterministic arbitrary inputs for decoders' never-panic tests.

/// Calls `f` with `per_len` pseudo-random buffers of every length below `max_len`, from a
/// xorshift stream seeded with `seed` (the same inputs every run).
pub(crate) fn for_each_input(seed: u64, max_len: usize, per_len: usize, mut f: impl FnMut(&[u8])) {
    let mut x = seed;
    for len in 0..max_len {
        for _ in 0..per_len {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            f(&buf);
        }
    }
}
