//! The SQLite schema: its migrations, and the check that a file is payguard's.
//!
//! Why a list: a database written by an older payguard upgrades in place, step by
//! step, in one transaction, and a database newer than this build, foreign tables
//! or a database of the other kind (guarded or naive) is refused rather than
//! "fixed". `PRAGMA user_version` counts the steps applied; `payguard_meta`
//! records the kind.

use super::error::unavailable;
use crate::store::StoreError;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

/// One schema step: SQL, or code for what SQL alone cannot say.
#[derive(Clone, Copy)]
enum Migration {
    Sql(&'static str),
    Code(fn(&rusqlite::Transaction<'_>) -> Result<(), StoreError>),
}

const MIGRATIONS: &[Migration] = &[
    Migration::Sql(include_str!("schema.sql")),
    Migration::Sql(include_str!("v2_idempotency.sql")),
    Migration::Sql(include_str!("v3_fencing.sql")),
    Migration::Code(v4_checks_without_in_lists),
    Migration::Code(v5_two_phase),
    Migration::Sql(include_str!("v6_events.sql")),
    Migration::Sql(include_str!("v7_orphaned_deliveries.sql")),
    Migration::Sql(include_str!("v8_idempotency_claims.sql")),
];
const NAIVE_MIGRATIONS: &[Migration] = &[
    Migration::Sql(include_str!("naive_schema.sql")),
    Migration::Sql(include_str!("v2_idempotency.sql")),
    Migration::Sql(include_str!("v3_fencing.sql")),
    Migration::Sql(include_str!("naive_v4_two_phase.sql")),
    Migration::Sql(include_str!("v6_events.sql")),
    Migration::Sql(include_str!("v7_orphaned_deliveries.sql")),
    Migration::Sql(include_str!("v8_idempotency_claims.sql")),
];

/// The CHECK constraints' `IN (…)` lists of three or more values, and what says
/// the same without one: SQLite evaluates such a list through an ephemeral table
/// built on every execution of every INSERT or UPDATE of the table (3 per
/// `UPDATE orders`, 1 per ledger insert; about a third of a deduct's instructions,
/// measured with callgrind). The `OR` chains accept and refuse exactly the same rows.
const V4_CHECK_REWRITES: &[(&str, &str, &str)] = &[
    (
        "orders",
        "CHECK (status IN ('PREPARE', 'PAID', 'FAILED', 'PARTIALLY_REFUNDED', 'REFUNDED'))",
        "CHECK (status = 'PREPARE' OR status = 'PAID' OR status = 'FAILED' OR status = 'PARTIALLY_REFUNDED' OR status = 'REFUNDED')",
    ),
    (
        "orders",
        "CHECK ((status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')) = (debit_entry_id IS NOT NULL))",
        "CHECK ((status = 'PAID' OR status = 'PARTIALLY_REFUNDED' OR status = 'REFUNDED') = (debit_entry_id IS NOT NULL))",
    ),
    (
        "orders",
        "CHECK (status NOT IN ('PREPARE', 'FAILED', 'PAID') OR refunded = 0)",
        "CHECK (NOT (status = 'PREPARE' OR status = 'FAILED' OR status = 'PAID') OR refunded = 0)",
    ),
    (
        "entries",
        "CHECK (kind IN ('debit', 'refund', 'reversal'))",
        "CHECK (kind = 'debit' OR kind = 'refund' OR kind = 'reversal')",
    ),
];

/// v4: the CHECKs of [`V4_CHECK_REWRITES`], rewritten in place. SQLite cannot
/// alter a CHECK; its documented way to change one without rebuilding the table
/// (ALTER TABLE, "Making Other Kinds Of Table Schema Changes") edits the table's
/// SQL in `sqlite_schema` under `writable_schema` and bumps `schema_version`. That
/// is safe here because every row already satisfies the new, equivalent CHECKs.
/// Each text must be found exactly once, and the tables must parse afterwards,
/// or the whole migration rolls back.
fn v4_checks_without_in_lists(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    rewrite_checks(tx, "v4", V4_CHECK_REWRITES)
}

/// v5 widens these CHECKs for two-phase payments: the new statuses and entry
/// kinds, and refunds bounded by the captured sum of a two-phase order
/// (`COALESCE(captured, amount)`, the amount for every row older than v5). Every
/// existing row passes the new texts (none has a new status or kind, and
/// `captured` is null on all of them).
const V5_CHECK_REWRITES: &[(&str, &str, &str)] = &[
    (
        "orders",
        "CHECK (status = 'PREPARE' OR status = 'PAID' OR status = 'FAILED' OR status = 'PARTIALLY_REFUNDED' OR status = 'REFUNDED')",
        "CHECK (status = 'PREPARE' OR status = 'PAID' OR status = 'FAILED' OR status = 'PARTIALLY_REFUNDED' OR status = 'REFUNDED' OR status = 'AUTHORIZED' OR status = 'VOIDED' OR status = 'EXPIRED')",
    ),
    (
        "orders",
        "CHECK (status <> 'REFUNDED' OR refunded = amount)",
        "CHECK (status <> 'REFUNDED' OR refunded = COALESCE(captured, amount))",
    ),
    (
        "orders",
        "CHECK (status <> 'PARTIALLY_REFUNDED' OR (refunded > 0 AND refunded < amount))",
        "CHECK (status <> 'PARTIALLY_REFUNDED' OR (refunded > 0 AND refunded < COALESCE(captured, amount)))",
    ),
    (
        "orders",
        "CHECK (NOT (status = 'PREPARE' OR status = 'FAILED' OR status = 'PAID') OR refunded = 0)",
        "CHECK (NOT (status = 'PREPARE' OR status = 'FAILED' OR status = 'PAID' OR status = 'AUTHORIZED' OR status = 'VOIDED' OR status = 'EXPIRED') OR refunded = 0)",
    ),
    (
        "entries",
        "CHECK (kind = 'debit' OR kind = 'refund' OR kind = 'reversal')",
        "CHECK (kind = 'debit' OR kind = 'refund' OR kind = 'reversal' OR kind = 'hold' OR kind = 'capture' OR kind = 'release')",
    ),
];

/// v5: two-phase payments: the new columns, indexes and triggers
/// (`v5_two_phase.sql`), then the CHECKs of [`V5_CHECK_REWRITES`] widened in place.
fn v5_two_phase(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute_batch(include_str!("v5_two_phase.sql"))
        .map_err(|e| StoreError::Schema(format!("migration v5: {e}")))?;
    rewrite_checks(tx, "v5", V5_CHECK_REWRITES)
}

/// Rewrites CHECK texts of `orders` and `entries` in place (see
/// [`v4_checks_without_in_lists`] for why this is SQLite's documented way).
fn rewrite_checks(
    tx: &rusqlite::Transaction<'_>,
    step: &str,
    rewrites: &[(&str, &str, &str)],
) -> Result<(), StoreError> {
    let schema = |e: rusqlite::Error| StoreError::Schema(format!("migration {step}: {e}"));
    let version: i64 = tx
        .query_row("PRAGMA schema_version", [], |r| r.get(0))
        .map_err(schema)?;
    for table in ["orders", "entries"] {
        let mut sql: String = tx
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )
            .map_err(schema)?;
        for (_, from, to) in rewrites.iter().filter(|(t, _, _)| *t == table) {
            if sql.matches(from).count() != 1 {
                return Err(StoreError::Schema(format!(
                    "migration {step}: {table} does not hold `{from}` exactly once; not the payguard schema it upgrades"
                )));
            }
            sql = sql.replacen(from, to, 1);
        }
        tx.execute_batch("PRAGMA writable_schema = ON")
            .map_err(schema)?;
        let changed = tx
            .execute(
                "UPDATE sqlite_schema SET sql = ?1 WHERE type = 'table' AND name = ?2",
                rusqlite::params![sql, table],
            )
            .map_err(schema)?;
        tx.execute_batch("PRAGMA writable_schema = OFF")
            .map_err(schema)?;
        if changed != 1 {
            return Err(StoreError::Schema(format!(
                "migration {step}: {table}'s schema row changed {changed} times"
            )));
        }
    }
    tx.pragma_update(None, "schema_version", version + 1)
        .map_err(schema)?;
    // Both tables must parse and their rows pass the new CHECKs.
    let bad: i64 = tx
        .query_row(
            "SELECT (SELECT COUNT(*) FROM pragma_integrity_check('orders') WHERE integrity_check <> 'ok')
                  + (SELECT COUNT(*) FROM pragma_integrity_check('entries') WHERE integrity_check <> 'ok')",
            [],
            |r| r.get(0),
        )
        .map_err(schema)?;
    if bad != 0 {
        return Err(StoreError::Schema(format!(
            "migration {step}: integrity_check found {bad} problems"
        )));
    }
    Ok(())
}

/// Which schema a database file holds, recorded in `payguard_meta.schema_kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaKind {
    /// Every money rule enforced by the database: the only kind for real money.
    Guarded,
    /// The incident's database without those rules, for `--guard naive` only.
    Naive,
}

impl SchemaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaKind::Guarded => "guarded",
            SchemaKind::Naive => "naive",
        }
    }

    fn migrations(self) -> &'static [Migration] {
        match self {
            SchemaKind::Guarded => MIGRATIONS,
            SchemaKind::Naive => NAIVE_MIGRATIONS,
        }
    }
}

/// Creates or upgrades the guarded schema; refuses a database marked naive.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    migrate_kind(conn, SchemaKind::Guarded)
}

/// Creates or upgrades a schema of `kind`; refuses a database of another kind.
pub fn migrate_kind(conn: &mut Connection, want: SchemaKind) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(unavailable)?;
    let has_meta: bool = tx
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'payguard_meta')",
            [],
            |r| r.get(0),
        )
        .map_err(unavailable)?;
    if has_meta {
        let kind: Option<String> = tx
            .query_row(
                "SELECT value FROM payguard_meta WHERE key = 'schema_kind'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable)?;
        if kind.as_deref() != Some(want.as_str()) {
            return Err(StoreError::Schema(match want {
                SchemaKind::Guarded => format!(
                    "schema_kind is {kind:?}; only a 'guarded' database can hold real money \
                     (a naive one lacks the constraints that prevent double charges)"
                ),
                SchemaKind::Naive => format!(
                    "schema_kind is {kind:?}; --guard naive only runs on a database it created \
                     itself, never on one that holds real money"
                ),
            }));
        }
    } else if version != 0 {
        return Err(StoreError::Schema(format!(
            "user_version {version} but no payguard_meta table: not a payguard database"
        )));
    } else {
        let tables: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .map_err(unavailable)?;
        if tables != 0 {
            return Err(StoreError::Schema(
                "the file already holds tables that are not payguard's".into(),
            ));
        }
    }
    let migrations = want.migrations();
    let known = migrations.len() as i64;
    if version > known {
        return Err(StoreError::Schema(format!(
            "database schema v{version} is newer than this payguard (v{known})"
        )));
    }
    for (i, step) in migrations.iter().enumerate().skip(version as usize) {
        match step {
            Migration::Sql(sql) => tx.execute_batch(sql).map_err(unavailable)?,
            Migration::Code(run) => run(&tx)?,
        }
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(unavailable)?;
    }
    tx.commit().map_err(unavailable)
}
