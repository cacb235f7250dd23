//! The order cache: a read-side copy of recently committed orders.
//!
//! The incident's cache was the truth its deduction was decided on. This one never
//! is: it is written only by a lane owner after its batch committed, and only GETs
//! read it. No money movement ever consults it; the store decides every one.
//!
//! It is an `scc::HashCache` (bucket-local LRU, bounded by `order_cache_entries_max`),
//! so reads never block on writers and memory stays bounded however many orders
//! pass through. Only the lane that owns an order writes that order's entry, so
//! updates to one order are applied in commit order.

use crate::domain::{Order, OrderId};
use scc::HashCache;

/// Default bound on cached orders.
pub const ORDER_CACHE_ENTRIES_MAX: usize = 100_000;

pub struct OrderCache {
    /// Invariant: every value is an order exactly as some committed transaction
    /// left it, and for each key only the order's lane owner writes.
    orders: HashCache<OrderId, Order>,
    enabled: bool,
}

impl OrderCache {
    /// A cache of at most `entries_max` orders; `0` disables it (every read goes to
    /// the store, as it must when other instances write the same database).
    pub fn new(entries_max: usize) -> Self {
        // Buckets are sized for the bound up front: a bucket-local LRU with too few
        // buckets evicts long before the cache is full (see BENCHMARKS.md, cache).
        let max = entries_max.max(64);
        OrderCache {
            orders: HashCache::with_capacity(max, max),
            enabled: entries_max > 0,
        }
    }

    /// Records an order as just committed. Called only by the order's lane owner.
    pub fn committed(&self, order: &Order) {
        if !self.enabled {
            return;
        }
        // In place when cached (one bucket lock, and no moment where a reader
        // misses); otherwise inserted, a full bucket evicting its least recently
        // used entry. An Err from put_sync means a concurrent insert of the same
        // key, which the single-owner rule excludes.
        if let Some(mut entry) = self.orders.get_sync(&order.id) {
            entry.put(order.clone());
            return;
        }
        let _ = self.orders.put_sync(order.id.clone(), order.clone());
    }

    /// Drops an order whose new state the lane does not know (a rejection may have
    /// changed it, e.g. `PREPARE → FAILED`), so the next read goes to the store.
    pub fn forget(&self, id: &OrderId) {
        if self.enabled {
            self.orders.remove_sync(id);
        }
    }

    pub fn get(&self, id: &OrderId) -> Option<Order> {
        if !self.enabled {
            return None;
        }
        self.orders.read_sync(id, |_, o| o.clone())
    }
}
