//! The key of the open-order table: an order id, inline when short.
//!
//! Why apart: a small type with its own invariant (it hashes and compares as its bytes) and test.

/// Order ids at most this long are stored inline in the map's key (no allocation).
const ORDER_KEY_INLINE_BYTES: usize = 30;

/// An order id as a map key: inline when short (typical ids are 15-24 bytes), boxed otherwise.
/// Hashes and compares as its bytes, so the map can be searched with a `&[u8]`.
#[derive(Clone)]
pub(super) enum OrderKey {
    Inline {
        len: u8,
        bytes: [u8; ORDER_KEY_INLINE_BYTES],
    },
    Heap(Box<[u8]>),
}

impl OrderKey {
    pub(super) fn new(b: &[u8]) -> Self {
        if b.len() <= ORDER_KEY_INLINE_BYTES {
            let mut bytes = [0u8; ORDER_KEY_INLINE_BYTES];
            bytes[..b.len()].copy_from_slice(b);
            OrderKey::Inline {
                len: b.len() as u8,
                bytes,
            }
        } else {
            OrderKey::Heap(b.into())
        }
    }

    /// The key of `b` when it is stored inline: building it costs a copy, no allocation, so a
    /// lookup may build one to find or insert in one probe.
    pub(super) fn inline(b: &[u8]) -> Option<Self> {
        (b.len() <= ORDER_KEY_INLINE_BYTES).then(|| Self::new(b))
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        match self {
            OrderKey::Inline { len, bytes } => &bytes[..*len as usize],
            OrderKey::Heap(b) => b,
        }
    }
}

impl std::borrow::Borrow<[u8]> for OrderKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::hash::Hash for OrderKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}

impl PartialEq for OrderKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for OrderKey {}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn order_keys_find_by_bytes_inline_or_boxed() {
        let mut m: HashMap<OrderKey, u32, ahash::RandomState> = HashMap::default();
        let short = b"OD20240517A1122".as_slice();
        let long = b"ORDER-with-a-very-long-id-0123456789-abcdefghijklmnop".as_slice();
        m.insert(OrderKey::new(short), 1);
        m.insert(OrderKey::new(long), 2);
        assert!(matches!(OrderKey::new(short), OrderKey::Inline { .. }));
        assert!(matches!(OrderKey::new(long), OrderKey::Heap(_)));
        assert_eq!(m.get(short), Some(&1));
        assert_eq!(m.get(long), Some(&2));
        assert_eq!(m.get(&long[..30]), None);
        assert_eq!(OrderKey::new(long).as_bytes(), long);
    }
}
