//! The PostgreSQL schema: its migrations, applied once under an advisory lock
//! however many instances start at the same moment.

use super::error::pg_unavailable;
use crate::store::StoreError;

/// `pg_advisory_xact_lock` key that serialises migrations of concurrent starters.
pub(super) const MIGRATION_LOCK_KEY: i64 = 0x7061_7967_7561_7264; // "payguard"

/// Schema versions in order; `payguard_meta.schema_version` counts those applied.
/// A v2 (e.g. a `fence` column for fencing tokens) is appended here, never edited in.
pub(super) const MIGRATIONS: &[&str] = &[
    include_str!("schema.sql"),
    include_str!("v2_idempotency.sql"),
    include_str!("v3_fencing.sql"),
    include_str!("v4_two_phase.sql"),
    include_str!("v5_events.sql"),
    include_str!("v6_idempotency_claims.sql"),
];

/// Creates or upgrades the guarded schema; refuses a database marked naive (or
/// anything else) and a database that holds tables that are not payguard's.
///
/// Runs in one transaction under an advisory lock, so instances starting at the
/// same moment migrate once.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_unavailable)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(pg_unavailable)?;
    let has_meta: bool = tx
        .query_one("SELECT to_regclass('payguard_meta') IS NOT NULL", &[])
        .await
        .map_err(pg_unavailable)?
        .get(0);
    let version: usize = if has_meta {
        let rows = tx
            .query(
                "SELECT key, value FROM payguard_meta WHERE key IN ('schema_kind', 'schema_version')",
                &[],
            )
            .await
            .map_err(pg_unavailable)?;
        let get = |k: &str| {
            rows.iter()
                .find(|r| r.get::<_, &str>(0) == k)
                .map(|r| r.get::<_, String>(1))
        };
        let kind = get("schema_kind");
        if kind.as_deref() != Some("guarded") {
            return Err(StoreError::Schema(format!(
                "schema_kind is {kind:?}; only a 'guarded' database can hold real money \
                 (a naive one lacks the constraints that prevent double charges)"
            )));
        }
        let version = get("schema_version");
        version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                StoreError::Schema(format!(
                    "payguard_meta.schema_version is {version:?}, not a version number"
                ))
            })?
    } else {
        let tables: i64 = tx
            .query_one(
                "SELECT COUNT(*) FROM pg_catalog.pg_tables WHERE schemaname = current_schema()",
                &[],
            )
            .await
            .map_err(pg_unavailable)?
            .get(0);
        if tables != 0 {
            return Err(StoreError::Schema(
                "the database already holds tables that are not payguard's".into(),
            ));
        }
        0
    };
    if version > MIGRATIONS.len() {
        return Err(StoreError::Schema(format!(
            "database schema v{version} is newer than this payguard (v{})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.batch_execute(sql).await.map_err(pg_unavailable)?;
        tx.execute(
            "INSERT INTO payguard_meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&(i + 1).to_string()],
        )
        .await
        .map_err(pg_unavailable)?;
    }
    tx.commit().await.map_err(pg_unavailable)
}
