//! The audit of API.md's `GET /v1/audit` on a SQLite file.

use crate::domain::{
    AuditReport, BalanceMismatch, DuplicateDebit, OverRefund, PaidMismatch, Resolved,
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
    {
        let mut stmt = tx.prepare(
            "SELECT d.order_id, d.debits,
                    (SELECT COUNT(*) FROM entries r WHERE r.kind = 'reversal' AND r.order_id = d.order_id)
             FROM (SELECT order_id, COUNT(*) AS debits FROM entries WHERE kind = 'debit'
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
    }
    {
        let mut stmt = tx.prepare(
            "SELECT o.id, o.amount, MAX(o.refunded, COALESCE(SUM(e.amount), 0)) AS refunded
             FROM orders o LEFT JOIN entries e ON e.order_id = o.id AND e.kind = 'refund'
             GROUP BY o.id HAVING MAX(o.refunded, COALESCE(SUM(e.amount), 0)) > o.amount
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
    }
    {
        let mut stmt = tx.prepare(
            "SELECT a.id,
                    a.opening_balance
                      - COALESCE(SUM(CASE WHEN e.kind = 'debit' THEN e.amount END), 0)
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
    }
    {
        let mut stmt = tx.prepare(
            "SELECT o.id, o.status,
                    (SELECT COUNT(*) FROM entries e WHERE e.order_id = o.id AND e.kind = 'debit') AS debits
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
    }
    tx.commit()?;
    Ok(report.finish())
}
