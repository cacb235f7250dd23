//! The interned request ids of one order, packed so that most orders allocate nothing for them.
//!
//! Why apart: a small data structure with its own invariant and test, used by the engine for
//! every event; the analysis only reads names back for timelines.

use crate::limits::REQUESTS_PER_ORDER_MAX;

use super::REQ_NONE;

/// Bytes of the first request id kept inline (most orders have one request, with a short id).
const REQ_FIRST_INLINE_BYTES: usize = 22;

/// The request ids of one order. The first id, when short, lives inline (no allocation, and in
/// the same cache line as the order); the others are packed in one buffer, each as its length
/// (two little-endian bytes) then its bytes. Invariant: `count == 0` or id 0 is inline
/// (`first_len > 0`) or it is the first one in `buf`.
#[derive(Debug, Default, Clone)]
pub struct ReqNames {
    count: u16,
    /// Length of the inline first id; 0 when the first id is in `buf` (or there is none).
    first_len: u8,
    first: [u8; REQ_FIRST_INLINE_BYTES],
    buf: Vec<u8>,
}

impl ReqNames {
    /// The index of `id`, added if new; [`REQ_NONE`] past `requests_per_order_max`.
    pub fn find_or_push(&mut self, id: &[u8]) -> u16 {
        let id = &id[..id.len().min(u16::MAX as usize)];
        let inline = self.first_len as usize;
        if inline > 0 && &self.first[..inline] == id {
            return 0;
        }
        let mut i = 0;
        let mut n = u16::from(inline > 0);
        while i + 2 <= self.buf.len() {
            let len = u16::from_le_bytes([self.buf[i], self.buf[i + 1]]) as usize;
            if &self.buf[i + 2..i + 2 + len] == id {
                return n;
            }
            i += 2 + len;
            n += 1;
        }
        if self.count as usize >= REQUESTS_PER_ORDER_MAX {
            return REQ_NONE;
        }
        if self.count == 0 && !id.is_empty() && id.len() <= REQ_FIRST_INLINE_BYTES {
            self.first[..id.len()].copy_from_slice(id);
            self.first_len = id.len() as u8;
        } else {
            self.buf.extend_from_slice(&(id.len() as u16).to_le_bytes());
            self.buf.extend_from_slice(id);
        }
        self.count += 1;
        n
    }

    /// The id at `index`.
    pub fn get(&self, index: u16) -> &[u8] {
        let inline = self.first_len as usize;
        if inline > 0 && index == 0 {
            return &self.first[..inline];
        }
        let mut i = 0;
        let mut n = u16::from(inline > 0);
        while i + 2 <= self.buf.len() {
            let len = u16::from_le_bytes([self.buf[i], self.buf[i + 1]]) as usize;
            if n == index {
                return &self.buf[i + 2..i + 2 + len];
            }
            i += 2 + len;
            n += 1;
        }
        &[]
    }

    /// Forgets every id, keeping the buffer.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
        self.first_len = 0;
    }

    /// How many ids.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// No ids.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn req_names_intern() {
        let mut r = ReqNames::default();
        assert_eq!(r.find_or_push(b"a"), 0);
        assert_eq!(r.find_or_push(b"bb"), 1);
        assert_eq!(r.find_or_push(b"a"), 0);
        assert_eq!((r.get(1), r.len()), (&b"bb"[..], 2));
        let long = [b'x'; 40];
        assert_eq!(r.find_or_push(&long), 2);
        assert_eq!(
            (r.get(0), r.get(2), r.get(3)),
            (&b"a"[..], &long[..], &b""[..])
        );
        // A long first id goes to the buffer.
        let mut r = ReqNames::default();
        assert_eq!(r.find_or_push(&long), 0);
        assert_eq!(r.find_or_push(b"a"), 1);
        assert_eq!((r.get(0), r.get(1)), (&long[..], &b"a"[..]));
        r.clear();
        assert_eq!((r.find_or_push(b"z"), r.len()), (0, 1));
    }
}
