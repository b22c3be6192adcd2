//! Payload masking (RFC 6455 §5.3): XOR with a 4-byte key, repeated.

/// XORs `buf` in place with `mask` repeated, starting at mask byte 0. Masking and unmasking are
/// the same operation.
///
/// Works eight bytes at a time on whole words (which the optimiser turns into vector
/// instructions), then byte by byte on the tail; safe code only.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let [m0, m1, m2, m3] = mask;
    // The key repeated in memory order, so it lines up with every 8-byte chunk whatever the
    // platform's endianness (8 is a multiple of the 4-byte key).
    let word = u64::from_ne_bytes([m0, m1, m2, m3, m0, m1, m2, m3]);
    let (chunks, tail) = buf.as_chunks_mut::<8>();
    for chunk in chunks {
        *chunk = (u64::from_ne_bytes(*chunk) ^ word).to_ne_bytes();
    }
    // The tail starts at a multiple of 8, hence at mask byte 0.
    for (byte, m) in tail.iter_mut().zip(mask.iter().cycle()) {
        *byte ^= m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_bytewise(buf: &mut [u8], mask: [u8; 4]) {
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
    }

    #[test]
    fn matches_the_bytewise_definition_at_every_length() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0..70 {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut fast = data.clone();
            let mut slow = data.clone();
            apply_mask(&mut fast, mask);
            mask_bytewise(&mut slow, mask);
            assert_eq!(fast, slow, "len {len}");
            apply_mask(&mut fast, mask);
            assert_eq!(fast, data, "masking twice is the identity, len {len}");
        }
    }

    #[test]
    fn rfc_6455_masked_hello() {
        let mut payload = *b"Hello";
        apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(payload, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    }
}
