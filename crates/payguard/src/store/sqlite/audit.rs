//! The audit of API.md's `GET /v1/audit` on a SQLite file.

use crate::domain::{
    AuditReport, BalanceMismatch, DuplicateDebit, HeldMismatch, OverRefund, PaidMismatch, Resolved,
};
use rusqlite::Connection;

/// The invariant checks of API.md's `GET /v1/audit`, in one read transaction so
/// every figure comes from the same snapshot. Written against the columns every
/// payguard schema has (guarded or naive), so it can judge either.
pub fn audit_connection(conn: &mut Connection) -> rusqlite::Result<AuditReport> {
    let tx = conn.transaction()?;
    let mut report = AuditReport {
        accounts_checked: tx.query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0))?,
        orders_checked: tx.query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0))?,
        entries_checked: tx.query_row("SELECT COUNT(*) FROM entries", [], |r| r.get(0))?,
        ..AuditReport::default()
    };
    duplicate_debits(&tx, &mut report)?;
    over_refunded(&tx, &mut report)?;
    balance_mismatches(&tx, &mut report)?;
    paid_mismatches(&tx, &mut report)?;
    held_mismatches(&tx, &mut report)?;
    tx.commit()?;
    Ok(report.finish())
}

/// Accounts whose `held` is not the sum of their orders' open holds (the
/// amounts of their AUTHORIZED orders).
fn held_mismatches(
    tx: &rusqlite::Transaction<'_>,
    report: &mut AuditReport,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare(
        "SELECT a.id, COALESCE(SUM(o.amount), 0) AS expected, a.held
         FROM accounts a LEFT JOIN orders o ON o.account_id = a.id AND o.status = 'AUTHORIZED'
         GROUP BY a.id HAVING expected <> a.held
         ORDER BY a.id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(HeldMismatch {
            account_id: r.get(0)?,
            expected: r.get(1)?,
            actual: r.get(2)?,
        })
    })?;
    for row in rows {
        report.held_mismatches.push(row?);
    }
    Ok(())
}

/// Orders with more than one debit (a capture counts as one) not reversed: duplicates, or resolved by `payguard audit --apply`.
fn duplicate_debits(
    tx: &rusqlite::Transaction<'_>,
    report: &mut AuditReport,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare(
        "SELECT d.order_id, d.debits,
                (SELECT COUNT(*) FROM entries r WHERE r.kind = 'reversal' AND r.order_id = d.order_id)
         FROM (SELECT order_id, COUNT(*) AS debits FROM entries
               WHERE kind = 'debit' OR kind = 'capture'
               GROUP BY order_id HAVING COUNT(*) > 1) d
         ORDER BY d.order_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (order_id, debits, reversed) = row?;
        if debits - reversed > 1 {
            report.duplicate_debits.push(DuplicateDebit {
                order_id,
                count: debits - reversed,
            });
        } else {
            report.resolved.push(Resolved { order_id, reversed });
        }
    }
    Ok(())
}

/// Orders whose refunds (recorded or summed) exceed what was taken (the amount,
/// or the captured sum of a two-phase order; `amount` reports that bound).
fn over_refunded(tx: &rusqlite::Transaction<'_>, report: &mut AuditReport) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare(
        "SELECT o.id, COALESCE(o.captured, o.amount), MAX(o.refunded, COALESCE(SUM(e.amount), 0)) AS refunded
         FROM orders o LEFT JOIN entries e ON e.order_id = o.id AND e.kind = 'refund'
         GROUP BY o.id HAVING MAX(o.refunded, COALESCE(SUM(e.amount), 0)) > COALESCE(o.captured, o.amount)
         ORDER BY o.id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(OverRefund {
            order_id: r.get(0)?,
            amount: r.get(1)?,
            refunded: r.get(2)?,
        })
    })?;
    for row in rows {
        report.over_refunded.push(row?);
    }
    Ok(())
}

/// Accounts whose balance is not opening − debits − captures + refunds +
/// reversals, or negative.
fn balance_mismatches(
    tx: &rusqlite::Transaction<'_>,
    report: &mut AuditReport,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare(
        "SELECT a.id,
                a.opening_balance
                  - COALESCE(SUM(CASE WHEN e.kind IN ('debit', 'capture') THEN e.amount END), 0)
                  + COALESCE(SUM(CASE WHEN e.kind IN ('refund', 'reversal') THEN e.amount END), 0)
                  AS expected,
                a.balance
         FROM accounts a LEFT JOIN entries e ON e.account_id = a.id
         GROUP BY a.id HAVING expected <> a.balance OR a.balance < 0
         ORDER BY a.id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(BalanceMismatch {
            account_id: r.get(0)?,
            expected: r.get(1)?,
            actual: r.get(2)?,
        })
    })?;
    for row in rows {
        report.balance_mismatches.push(row?);
    }
    Ok(())
}

/// Orders paid without a debit (or capture), or with one and not paid.
fn paid_mismatches(
    tx: &rusqlite::Transaction<'_>,
    report: &mut AuditReport,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare(
        "SELECT o.id, o.status,
                (SELECT COUNT(*) FROM entries e
                 WHERE e.order_id = o.id AND (e.kind = 'debit' OR e.kind = 'capture')) AS debits
         FROM orders o
         WHERE (o.status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')) <> (debits > 0)
         ORDER BY o.id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(PaidMismatch {
            order_id: r.get(0)?,
            status: r.get(1)?,
            debits: r.get(2)?,
        })
    })?;
    for row in rows {
        let m = row?;
        if m.debits == 0 {
            report.paid_without_entry.push(m);
        } else {
            report.entry_without_paid.push(m);
        }
    }
    Ok(())
}
