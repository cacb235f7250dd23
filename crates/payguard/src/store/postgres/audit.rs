//! The audit of API.md's `GET /v1/audit` on PostgreSQL.

use super::error::Fault;
use crate::domain::{
    AuditReport, BalanceMismatch, DuplicateDebit, HeldMismatch, OverRefund, PaidMismatch, Resolved,
};
use crate::store::StoreError;
use tokio_postgres::IsolationLevel;

/// The invariant checks of API.md's `GET /v1/audit`, in one REPEATABLE READ
/// snapshot; the same queries as the SQLite store's, in PostgreSQL's dialect.
/// Ids sort bytewise (`COLLATE "C"`) like SQLite's.
pub async fn audit_client(client: &mut tokio_postgres::Client) -> Result<AuditReport, StoreError> {
    audit_inner(client).await.map_err(Fault::into_store_error)
}

async fn audit_inner(client: &mut tokio_postgres::Client) -> Result<AuditReport, Fault> {
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
    duplicate_debits(&tx, &mut report).await?;
    over_refunded(&tx, &mut report).await?;
    balance_mismatches(&tx, &mut report).await?;
    paid_mismatches(&tx, &mut report).await?;
    held_mismatches(&tx, &mut report).await?;
    tx.commit().await?;
    Ok(report.finish())
}

/// Accounts whose `held` is not the sum of their orders' open holds (the
/// amounts of their AUTHORIZED orders).
async fn held_mismatches(
    tx: &tokio_postgres::Transaction<'_>,
    report: &mut AuditReport,
) -> Result<(), Fault> {
    for row in tx
        .query(
            "SELECT id, expected, held FROM (
                 SELECT a.id, COALESCE(SUM(o.amount), 0)::bigint AS expected, a.held
                 FROM accounts a LEFT JOIN orders o ON o.account_id = a.id AND o.status = 'AUTHORIZED'
                 GROUP BY a.id) t
             WHERE expected <> held
             ORDER BY id COLLATE \"C\"",
            &[],
        )
        .await?
    {
        report.held_mismatches.push(HeldMismatch {
            account_id: row.try_get(0)?,
            expected: row.try_get(1)?,
            actual: row.try_get(2)?,
        });
    }
    Ok(())
}

/// Orders with more than one debit (a capture counts as one) not reversed: duplicates, or resolved by `payguard audit --apply`.
async fn duplicate_debits(
    tx: &tokio_postgres::Transaction<'_>,
    report: &mut AuditReport,
) -> Result<(), Fault> {
    for row in tx
        .query(
            "SELECT d.order_id, d.debits,
                    (SELECT COUNT(*) FROM entries r WHERE r.kind = 'reversal' AND r.order_id = d.order_id)
             FROM (SELECT order_id, COUNT(*) AS debits FROM entries WHERE kind IN ('debit', 'capture')
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
    Ok(())
}

/// Orders whose refunds (recorded or summed) exceed what was taken (the amount,
/// or the captured sum of a two-phase order; `amount` reports that bound).
async fn over_refunded(
    tx: &tokio_postgres::Transaction<'_>,
    report: &mut AuditReport,
) -> Result<(), Fault> {
    for row in tx
        .query(
            "SELECT id, amount, refunded FROM (
                 SELECT o.id, COALESCE(o.captured, o.amount) AS amount,
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
    Ok(())
}

/// Accounts whose balance is not opening − debits + refunds + reversals, or negative.
async fn balance_mismatches(
    tx: &tokio_postgres::Transaction<'_>,
    report: &mut AuditReport,
) -> Result<(), Fault> {
    for row in tx
        .query(
            "SELECT id, expected, balance FROM (
                 SELECT a.id,
                        (a.opening_balance
                          - COALESCE(SUM(CASE WHEN e.kind IN ('debit', 'capture') THEN e.amount END), 0)
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
    Ok(())
}

/// Orders paid without a debit, or with a debit and not paid.
async fn paid_mismatches(
    tx: &tokio_postgres::Transaction<'_>,
    report: &mut AuditReport,
) -> Result<(), Fault> {
    for row in tx
        .query(
            "SELECT id, status, debits FROM (
                 SELECT o.id, o.status,
                        (SELECT COUNT(*) FROM entries e WHERE e.order_id = o.id AND e.kind IN ('debit', 'capture')) AS debits
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
    Ok(())
}
