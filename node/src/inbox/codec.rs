//! A bounds-checked reader for the inbox's small binary records: every read returns `None`
//! instead of panicking when the input is short, and the caller turns that into
//! [`StorageError::Corrupt`].

use crate::storage::StorageError;

/// Reads big-endian integers and byte runs from a slice, front to back.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N).and_then(|b| b.try_into().ok())
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// Where the next read starts.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// Whether every byte was consumed: trailing bytes mean a corrupt (or newer) record.
    pub(crate) fn is_done(&self) -> bool {
        self.pos == self.buf.len()
    }
}

/// The error for a record of family `cf` that does not decode.
pub(crate) fn corrupt(cf: &'static str, detail: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        cf,
        detail: detail.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_yields_none_not_panic() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16(), Some(0x0102));
        assert_eq!(r.u16(), None);
        assert_eq!(r.u8(), Some(3));
        assert!(r.is_done());
        assert_eq!(r.u8(), None);
        assert_eq!(Reader::new(&[0; 4]).bytes(usize::MAX), None);
        assert_eq!(Reader::new(&[0; 7]).u64(), None);
        assert_eq!(Reader::new(&[0, 0, 0, 9]).u32(), Some(9));
    }
}
