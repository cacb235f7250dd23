//! The order cache: a read-side copy of recently committed orders.
//!
//! The incident's cache was the truth its deduction was decided on. This one never
//! is: it is written only by a lane owner after its batch committed, and no money
//! ever moves on what it says; the store decides every movement. It answers GETs,
//! and replays of deducts of orders already paid (see [`OrderCache::paid`]).
//!
//! It is an `scc::HashCache` (bucket-local LRU, bounded by `order_cache_entries_max`),
//! so reads never block on writers and memory stays bounded however many orders
//! pass through. Only the lane that owns an order writes that order's entry, so
//! updates to one order are applied in commit order.
//!
//! What it assumes: this process is the only one changing its orders (one
//! `payguard serve` per SQLite file, which is why the engine turns it off on the
//! shared PostgreSQL store). A second writer's refund would show late here, in a
//! GET and in a replay's `order`, never in money.

use crate::domain::{Entry, EntryKind, Order, OrderId};
use scc::HashCache;

/// Default bound on cached orders.
pub const ORDER_CACHE_ENTRIES_MAX: usize = 100_000;

/// An order as committed, with the debit entry it links once paid.
#[derive(Clone)]
struct Cached {
    order: Order,
    /// `order.debit_entry_id`'s entry when it is a deduct's debit, if this
    /// process saw it committed. A ledger entry never changes once written, and a
    /// paid order's debit link never changes either (both enforced by the
    /// schema's triggers), so this stays right for as long as the order is cached.
    debit: Option<Entry>,
}

pub struct OrderCache {
    /// Invariant: every order is exactly as some committed transaction left it,
    /// every debit is the entry its order links, and for each key only the
    /// order's lane owner writes.
    orders: HashCache<OrderId, Cached>,
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

    /// Records an order as just committed, with the entry its op answered with
    /// (kept when it is the order's debit). Called only by the order's lane owner.
    pub fn committed(&self, order: &Order, entry: Option<&Entry>) {
        if !self.enabled {
            return;
        }
        let debit = |known: Option<&Entry>| {
            known
                .filter(|e| e.kind == EntryKind::Debit && Some(e.id) == order.debit_entry_id)
                .cloned()
        };
        // In place when cached (one bucket lock, and no moment where a reader
        // misses); otherwise inserted, a full bucket evicting its least recently
        // used entry. An Err from put_sync means a concurrent insert of the same
        // key, which the single-owner rule excludes.
        if let Some(mut slot) = self.orders.get_sync(&order.id) {
            let kept = debit(entry).or_else(|| debit(slot.get().debit.as_ref()));
            slot.put(Cached {
                order: order.clone(),
                debit: kept,
            });
            return;
        }
        let _ = self.orders.put_sync(
            order.id.clone(),
            Cached {
                order: order.clone(),
                debit: debit(entry),
            },
        );
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
        self.orders.read_sync(id, |_, c| c.order.clone())
    }

    /// The order and its debit entry, when the order was paid by a deduct this
    /// process committed: what the rules need to answer a duplicate deduct
    /// (`rules::settled`) without a lane, a transaction or a lock.
    pub fn paid(&self, id: &OrderId) -> Option<(Order, Entry)> {
        if !self.enabled {
            return None;
        }
        self.orders
            .read_sync(id, |_, c| {
                c.debit.as_ref().map(|d| (c.order.clone(), d.clone()))
            })
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AccountId, Money, OrderStatus};

    fn order(status: OrderStatus, debit: Option<i64>, refunded: i64) -> Order {
        Order {
            id: OrderId::parse("o1").unwrap(),
            account_id: AccountId::parse("a1").unwrap(),
            amount: Money::from_stored(500),
            status,
            refunded: Money::from_stored(refunded),
            debit_entry_id: debit,
            failure_reason: None,
            created_at: 1,
            updated_at: 2,
            captured: None,
            held: Money::from_stored(0),
            hold_expires_at: None,
        }
    }

    fn entry(id: i64, kind: EntryKind) -> Entry {
        Entry {
            id,
            order_id: OrderId::parse("o1").unwrap(),
            account_id: AccountId::parse("a1").unwrap(),
            kind,
            amount: Money::from_stored(500),
            balance_after: Money::from_stored(1_000),
            refund_id: None,
            reverses: None,
            created_at: 2,
        }
    }

    #[test]
    fn a_paid_order_keeps_its_debit_through_later_refunds() {
        let cache = OrderCache::new(64);
        let id = OrderId::parse("o1").unwrap();
        cache.committed(&order(OrderStatus::Prepare, None, 0), None);
        assert!(cache.paid(&id).is_none(), "not paid yet");
        cache.committed(
            &order(OrderStatus::Paid, Some(7), 0),
            Some(&entry(7, EntryKind::Debit)),
        );
        assert_eq!(cache.paid(&id).unwrap().1.id, 7);
        // A refund's answer carries the refund entry: the debit stays.
        cache.committed(
            &order(OrderStatus::PartiallyRefunded, Some(7), 100),
            Some(&entry(9, EntryKind::Refund)),
        );
        let (o, d) = cache.paid(&id).unwrap();
        assert_eq!((o.refunded.minor(), d.id), (100, 7));
    }

    #[test]
    fn only_a_deducts_own_debit_is_kept() {
        let cache = OrderCache::new(64);
        let id = OrderId::parse("o1").unwrap();
        // An entry that is not the order's debit link is not kept as one.
        cache.committed(
            &order(OrderStatus::Paid, Some(7), 0),
            Some(&entry(8, EntryKind::Debit)),
        );
        assert!(cache.paid(&id).is_none());
        // A capture is the debit of a two-phase order, never a deduct's.
        cache.committed(
            &order(OrderStatus::Paid, Some(7), 0),
            Some(&entry(7, EntryKind::Capture)),
        );
        assert!(cache.paid(&id).is_none());
        cache.forget(&id);
        assert!(cache.get(&id).is_none());
        let off = OrderCache::new(0);
        off.committed(
            &order(OrderStatus::Paid, Some(7), 0),
            Some(&entry(7, EntryKind::Debit)),
        );
        assert!(off.paid(&id).is_none());
    }
}
