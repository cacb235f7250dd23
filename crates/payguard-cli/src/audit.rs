//! `payguard audit`: the invariant checks of `GET /v1/audit`, straight on a
//! database, offline, and the incident's real aftermath: find every duplicate
//! debit and pay it back, once (`--fix-plan` shows, `--apply` writes).
//!
//! A pay-back is a `reversal` entry that names the debit it reverses; the unique
//! index on `reverses` and the plan's `NOT EXISTS` make `--apply` exactly once,
//! however often it runs. The first debit of an order stands; each later one is
//! reversed. Reversals count in API.md's balance formula, and reversed duplicates
//! move from `duplicate_debits` to `resolved`.
//!
//! On PostgreSQL (`--db postgres://…`) it runs the same checks through the
//! store's audit queries. There is nothing to pay back there: only `--guard
//! naive` can make a duplicate, and it runs on SQLite only.

use crate::serve::{sqlite_path, DbUrl};
use payguard::domain::AuditReport;
use payguard::store::sqlite::{audit_connection, insert_reversal_event};
use rusqlite::{params, Connection, TransactionBehavior};
use serde::Serialize;
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// The database to audit (`sqlite://PATH` or `postgres://…`).
    #[arg(long, env = "PAYGUARD_DB", default_value = "sqlite://./payguard.db")]
    pub db: String,
    /// Print JSON.
    #[arg(long, env = "PAYGUARD_JSON")]
    pub json: bool,
    /// List the reversal entries that would pay back every duplicate debit.
    #[arg(long)]
    pub fix_plan: bool,
    /// Write those reversals, exactly once, then audit again.
    #[arg(long)]
    pub apply: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Reversal {
    pub order_id: String,
    pub account_id: String,
    /// The duplicate debit entry this pays back.
    pub reverses: i64,
    pub amount: i64,
}

fn open(url: &str) -> anyhow::Result<Connection> {
    let path = sqlite_path(url)?;
    anyhow::ensure!(path.exists(), "no database at {}", path.display());
    let conn = Connection::open(&path)?;
    conn.busy_timeout(Duration::from_millis(
        payguard::store::sqlite::BUSY_TIMEOUT_MS,
    ))?;
    Ok(conn)
}

/// Audits the database at `url` (used by `storm --db` too).
pub async fn audit_url(url: &str) -> anyhow::Result<AuditReport> {
    match DbUrl::parse(url)? {
        DbUrl::Sqlite(_) => {
            let mut conn = open(url)?;
            Ok(audit_connection(&mut conn)?)
        }
        DbUrl::Postgres(_) => audit_postgres(url).await,
    }
}

/// The audit straight on a PostgreSQL database: no migration, no pool, read only.
async fn audit_postgres(url: &str) -> anyhow::Result<AuditReport> {
    use payguard::store::postgres::{audit_client, connect_raw, PgConfig};
    let cfg = PgConfig::from_url(url)?;
    let mut client = connect_raw(&cfg.pg).await?;
    // Say so plainly rather than fail on a missing table (SQLSTATE 42P01).
    let is_payguard: bool = client
        .query_one("SELECT to_regclass('payguard_meta') IS NOT NULL", &[])
        .await?
        .get(0);
    anyhow::ensure!(
        is_payguard,
        "{} is not a payguard database (no payguard_meta table): nothing to audit; \
         `payguard serve --db` creates the schema",
        cfg.pg.get_dbname().unwrap_or("this database")
    );
    Ok(audit_client(&mut client).await?)
}

/// Every debit after an order's first that has no reversal yet.
pub fn fix_plan(conn: &Connection) -> rusqlite::Result<Vec<Reversal>> {
    let mut stmt = conn.prepare(
        "SELECT e.order_id, e.account_id, e.id, e.amount FROM entries e
         WHERE e.kind = 'debit'
           AND e.id > (SELECT MIN(f.id) FROM entries f WHERE f.order_id = e.order_id AND f.kind = 'debit')
           AND NOT EXISTS (SELECT 1 FROM entries r WHERE r.kind = 'reversal' AND r.reverses = e.id)
         ORDER BY e.id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Reversal {
            order_id: r.get(0)?,
            account_id: r.get(1)?,
            reverses: r.get(2)?,
            amount: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// Writes the plan in one transaction, re-computed under the write lock so two
/// concurrent `--apply` runs cannot both pay one duplicate back.
pub fn apply(conn: &mut Connection) -> anyhow::Result<Vec<Reversal>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let plan = fix_plan(&tx)?;
    let now = chrono::Utc::now().timestamp_millis();
    for r in &plan {
        let balance: i64 = tx.query_row(
            "UPDATE accounts SET balance = balance + ?1, updated_at = ?2 WHERE id = ?3 RETURNING balance",
            params![r.amount, now, r.account_id],
            |row| row.get(0),
        )?;
        tx.execute(
            "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, reverses, created_at)
             VALUES (?1, ?2, 'reversal', ?3, ?4, ?5, ?6)",
            params![r.order_id, r.account_id, r.amount, balance, r.reverses, now],
        )?;
        // The outbox: downstream learns of the pay-back in the same transaction.
        insert_reversal_event(&tx, tx.last_insert_rowid(), now)?;
    }
    tx.commit()?;
    Ok(plan)
}

#[derive(Serialize)]
struct Output<'a> {
    audit: &'a AuditReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix_plan: Option<&'a [Reversal]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    applied: Option<&'a [Reversal]>,
}

pub fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    if let DbUrl::Postgres(_) = DbUrl::parse(&args.db)? {
        anyhow::ensure!(
            !args.fix_plan && !args.apply,
            "--fix-plan and --apply pay back duplicates, which only a naive SQLite database can hold"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let report = rt.block_on(audit_postgres(&args.db))?;
        return report_and_exit(&args, &report, None, None);
    }
    let mut conn = open(&args.db)?;
    let applied = if args.apply {
        Some(apply(&mut conn)?)
    } else {
        None
    };
    let plan = if args.fix_plan && !args.apply {
        Some(fix_plan(&conn)?)
    } else {
        None
    };
    let report = audit_connection(&mut conn)?;
    report_and_exit(&args, &report, plan.as_deref(), applied.as_deref())
}

fn report_and_exit(
    args: &AuditArgs,
    report: &AuditReport,
    plan: Option<&[Reversal]>,
    applied: Option<&[Reversal]>,
) -> anyhow::Result<ExitCode> {
    if args.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&Output {
                audit: report,
                fix_plan: plan,
                applied,
            })?
        );
    } else {
        print_text(report, plan, applied);
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_text(r: &AuditReport, plan: Option<&[Reversal]>, applied: Option<&[Reversal]>) {
    let yuan = crate::storm::yuan;
    if let Some(applied) = applied {
        let total: i64 = applied.iter().map(|r| r.amount).sum();
        crate::outln!(
            "applied {} reversal(s), {} paid back ({} fen)",
            applied.len(),
            yuan(total),
            total
        );
    }
    crate::outln!(
        "audit: {} ({} accounts, {} orders, {} entries)",
        if r.ok { "ok" } else { "VIOLATIONS" },
        r.accounts_checked,
        r.orders_checked,
        r.entries_checked
    );
    for d in &r.duplicate_debits {
        crate::outln!(
            "  duplicate debit: order {} charged {} times",
            d.order_id,
            d.count
        );
    }
    for o in &r.over_refunded {
        crate::outln!(
            "  over-refunded: order {} refunded {} of {}",
            o.order_id,
            o.refunded,
            o.amount
        );
    }
    for b in &r.balance_mismatches {
        crate::outln!(
            "  balance mismatch: account {} is {}, the ledger says {}",
            b.account_id,
            b.actual,
            b.expected
        );
    }
    for n in &r.negative_balances {
        crate::outln!(
            "  negative balance: account {} is {} (below zero)",
            n.account_id,
            n.balance
        );
    }
    for p in &r.paid_without_entry {
        crate::outln!(
            "  paid without a debit: order {} ({})",
            p.order_id,
            p.status
        );
    }
    for p in &r.entry_without_paid {
        crate::outln!(
            "  debit without paid status: order {} ({}, {} debits)",
            p.order_id,
            p.status,
            p.debits
        );
    }
    if !r.resolved.is_empty() {
        crate::outln!(
            "  resolved: {} order(s) whose duplicates were paid back",
            r.resolved.len()
        );
    }
    if let Some(plan) = plan {
        let total: i64 = plan.iter().map(|r| r.amount).sum();
        crate::outln!(
            "fix plan: {} reversal(s), {} to pay back ({} fen); run with --apply to write them",
            plan.len(),
            yuan(total),
            total
        );
        for r in plan {
            crate::outln!(
                "  reversal: order {} account {} reverses entry {} amount {}",
                r.order_id,
                r.account_id,
                r.reverses,
                r.amount
            );
        }
    }
}
