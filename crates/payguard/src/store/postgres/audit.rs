//! The audit of API.md's `GET /v1/audit` on PostgreSQL.

use super::error::Fault;
use crate::domain::{
    AuditReport, BalanceMismatch, DuplicateDebit, OverRefund, PaidMismatch, Resolved,
};
use crate::store::StoreError;
use tokio_postgres::IsolationLevel;

/// The invariant checks of API.md's `GET /v1/audit`, in one REPEATABLE READ
/// snapshot; the same queries as the SQLite store's, in PostgreSQL's dialect.
/// Ids sort bytewise (`COLLATE "C"`) like SQLite's.
pub async fn audit_client(client: &mut tokio_postgres::Client) -> Result<AuditReport, StoreError> {
    audit_inner(client).await.map_err(Fault::into_store_error)
}

pub(super) async fn audit_inner(client: &mut tokio_postgres::Client) -> Result<AuditReport, Fault> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let counts = tx
        .query_one(
            "SELECT (SELECT COUNT(*) FROM accounts), (SELECT COUNT(*) FROM orders),
                    (SELECT COUNT(*) FROM entries)",
            &[],
        )
        .await?;
    let mut report = AuditReport {
        accounts_checked: counts.try_get(0)?,
        orders_checked: counts.try_get(1)?,
        entries_checked: counts.try_get(2)?,
        ..AuditReport::default()
    };
    for row in tx
        .query(
            "SELECT d.order_id, d.debits,
                    (SELECT COUNT(*) FROM entries r WHERE r.kind = 'reversal' AND r.order_id = d.order_id)
             FROM (SELECT order_id, COUNT(*) AS debits FROM entries WHERE kind = 'debit'
                   GROUP BY order_id HAVING COUNT(*) > 1) d
             ORDER BY d.order_id COLLATE \"C\"",
            &[],
        )
        .await?
    {
        let order_id: String = row.try_get(0)?;
        let debits: i64 = row.try_get(1)?;
        let reversed: i64 = row.try_get(2)?;
        if debits - reversed > 1 {
            report.duplicate_debits.push(DuplicateDebit {
                order_id,
                count: debits - reversed,
            });
        } else {
            report.resolved.push(Resolved { order_id, reversed });
        }
    }
    for row in tx
        .query(
            "SELECT id, amount, refunded FROM (
                 SELECT o.id, o.amount,
                        GREATEST(o.refunded, COALESCE(SUM(e.amount), 0))::bigint AS refunded
                 FROM orders o LEFT JOIN entries e ON e.order_id = o.id AND e.kind = 'refund'
                 GROUP BY o.id) t
             WHERE refunded > amount
             ORDER BY id COLLATE \"C\"",
            &[],
        )
        .await?
    {
        report.over_refunded.push(OverRefund {
            order_id: row.try_get(0)?,
            amount: row.try_get(1)?,
            refunded: row.try_get(2)?,
        });
    }
    for row in tx
        .query(
            "SELECT id, expected, balance FROM (
                 SELECT a.id,
                        (a.opening_balance
                          - COALESCE(SUM(CASE WHEN e.kind = 'debit' THEN e.amount END), 0)
                          + COALESCE(SUM(CASE WHEN e.kind IN ('refund', 'reversal') THEN e.amount END), 0)
                        )::bigint AS expected,
                        a.balance
                 FROM accounts a LEFT JOIN entries e ON e.account_id = a.id
                 GROUP BY a.id) t
             WHERE expected <> balance OR balance < 0
             ORDER BY id COLLATE \"C\"",
            &[],
        )
        .await?
    {
        report.balance_mismatches.push(BalanceMismatch {
            account_id: row.try_get(0)?,
            expected: row.try_get(1)?,
            actual: row.try_get(2)?,
        });
    }
    for row in tx
        .query(
            "SELECT id, status, debits FROM (
                 SELECT o.id, o.status,
                        (SELECT COUNT(*) FROM entries e WHERE e.order_id = o.id AND e.kind = 'debit') AS debits
                 FROM orders o) t
             WHERE (status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')) <> (debits > 0)
             ORDER BY id COLLATE \"C\"",
            &[],
        )
        .await?
    {
        let m = PaidMismatch {
            order_id: row.try_get(0)?,
            status: row.try_get(1)?,
            debits: row.try_get(2)?,
        };
        if m.debits == 0 {
            report.paid_without_entry.push(m);
        } else {
            report.entry_without_paid.push(m);
        }
    }
    tx.commit().await?;
    Ok(report.finish())
}
