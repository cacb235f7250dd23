//! The money invariants, held against the database and what the clients were
//! told at the end of a seed.
//!
//! Why apart from [`crate::run`]: running a seed and judging it are two jobs.
//! These checks read only the final tables, the database's own records of what
//! it did (stale writes applied) and the oracle's record of the clients'
//! definite answers; nothing here drives the simulation. The two-phase checks
//! and the events feed's are in [`crate::two_phase`].

use crate::db::DbState;
use crate::oracle::{Oracle, ViolationKind};
use payguard::domain::{EntryKind, Money};

/// Refunds against the ledger: each refund id once, an order's refunds within
/// its charge (or what its capture took), every acknowledged refund in the ledger, no entry for a refund a
/// client was told exceeds what was paid.
fn refunds(db: &DbState, oracle: &mut Oracle) {
    let entries = &db.tables.entries;
    let refunds_of = |refund_id: &str| -> Vec<i64> {
        entries
            .iter()
            .filter(|e| e.kind == EntryKind::Refund)
            .filter(|e| {
                e.refund_id
                    .as_ref()
                    .is_some_and(|r| r.as_str() == refund_id)
            })
            .map(|e| e.id)
            .collect()
    };
    let mut ids: Vec<&str> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Refund)
        .filter_map(|e| e.refund_id.as_ref().map(|r| r.as_str()))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let found = refunds_of(id);
        oracle.check(ViolationKind::DoubleRefund, found.len() <= 1, || {
            format!("refund {id} has {} entries: {found:?}", found.len())
        });
    }
    for (order_id, (order, _)) in &db.tables.orders {
        // What was taken: a debit, or what a capture took of a hold.
        let charged: i64 = entries
            .iter()
            .filter(|e| &e.order_id == order_id)
            .filter(|e| matches!(e.kind, EntryKind::Debit | EntryKind::Capture))
            .map(|e| e.amount.minor())
            .sum::<i64>()
            .min(order.amount.minor());
        let refunded: i64 = entries
            .iter()
            .filter(|e| &e.order_id == order_id && e.kind == EntryKind::Refund)
            .map(|e| e.amount.minor())
            .sum();
        oracle.check(
            ViolationKind::RefundsExceedCharge,
            refunded <= charged,
            || {
                format!(
                    "order {}: refunds of {refunded} against a charge of {charged}",
                    order_id.as_str()
                )
            },
        );
    }
    for (order, refund_id, entry) in oracle.refund_acks.clone() {
        let found = refunds_of(&refund_id);
        oracle.check(
            ViolationKind::AcknowledgedRefundMissing,
            found == [entry],
            || format!("order {order}: a client was told refund {refund_id} is entry {entry}, the ledger has {found:?}"),
        );
    }
    for (order, refund_id) in oracle.refunds_refused.clone() {
        let found = refunds_of(&refund_id);
        oracle.check(ViolationKind::RefusedRefundApplied, found.is_empty(), || {
            format!("order {order}: a client was told refund {refund_id} exceeds what was paid, the ledger has {found:?}")
        });
    }
}

/// The money invariants and fencing, held against the database at the end.
pub fn money(db: &DbState, oracle: &mut Oracle) {
    let debits = db.debits();
    for (order, entries) in &debits {
        oracle.check(ViolationKind::DoubleCharge, entries.len() <= 1, || {
            let ids: Vec<i64> = entries.iter().map(|e| e.id).collect();
            format!(
                "order {} has {} debits: entries {ids:?}",
                order.as_str(),
                ids.len()
            )
        });
    }
    let ids_of = |order: &str| -> Vec<i64> {
        debits
            .iter()
            .find(|(o, _)| o.as_str() == order)
            .map(|(_, es)| es.iter().map(|e| e.id).collect())
            .unwrap_or_default()
    };
    for (order, entry) in oracle.acks.clone() {
        let entries = ids_of(&order);
        oracle.check(
            ViolationKind::AcknowledgedChargeMissing,
            entries == [entry],
            || {
                format!(
                    "order {order}: a client was told entry {entry}, the ledger has {entries:?}"
                )
            },
        );
    }
    for order in oracle.declined.clone() {
        let entries = ids_of(&order);
        oracle.check(
            ViolationKind::DeclinedButCharged,
            entries.is_empty(),
            || format!("order {order}: a client was told 402, the ledger has {entries:?}"),
        );
    }
    for (id, account) in &db.tables.accounts {
        let mut expected = Some(account.opening_balance);
        let mut last_after = None;
        for e in db.tables.entries.iter().filter(|e| &e.account_id == id) {
            expected = match e.kind {
                EntryKind::Debit | EntryKind::Capture => {
                    expected.and_then(|b| b.checked_sub(e.amount))
                }
                EntryKind::Refund | EntryKind::Reversal => {
                    expected.and_then(|b| b.checked_add(e.amount))
                }
                EntryKind::Hold | EntryKind::Release => expected,
            };
            last_after = Some(e.balance_after);
        }
        oracle.check(
            ViolationKind::BalanceDrift,
            expected == Some(account.balance) && last_after.is_none_or(|b| b == account.balance),
            || {
                format!(
                    "account {}: opening {:?} and its ledger say {expected:?} (last entry {last_after:?}), the balance is {:?}",
                    id.as_str(),
                    account.opening_balance,
                    account.balance
                )
            },
        );
        oracle.check(
            ViolationKind::NegativeBalance,
            account.balance >= Money::ZERO,
            || format!("account {}: balance {:?}", id.as_str(), account.balance),
        );
    }
    nothing_moved(db, oracle);
    for detail in &db.stale_applied {
        oracle.violate(ViolationKind::StaleTokenApplied, detail.clone());
    }
    refunds(db, oracle);
}

/// The store's promise behind every 503: a batch answered with an error other
/// than `Unknown` has no transaction that committed, then or since (a late
/// COMMIT landing after the answer breaks it too; payguard's look-up ends a
/// transaction that has not arrived).
fn nothing_moved(db: &DbState, oracle: &mut Oracle) {
    for (inst, xids, error) in oracle.nothing_moved.clone() {
        let committed: Vec<u64> = xids.iter().copied().filter(|x| db.committed(*x)).collect();
        oracle.check(
            ViolationKind::NothingMovedButCommitted,
            committed.is_empty(),
            || format!("inst{inst}: a batch answered {error:?} (nothing moved), its transactions {committed:?} committed"),
        );
    }
}
