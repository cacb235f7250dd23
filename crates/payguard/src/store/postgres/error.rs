//! How PostgreSQL failures are told apart: a refused change (only the command at
//! fault is affected), a deadlock or serialisation failure (the batch runs
//! again), a failed database (the batch fails), and an unanswered COMMIT (its
//! fate must be looked up).

use crate::store::StoreError;
use tokio_postgres::error::SqlState;

pub(super) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A PostgreSQL error as one line: SQLSTATE and message for server errors, the
/// cause chain for the others (tokio-postgres' own `Display` says only "db error").
pub(super) fn pg_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

pub(super) fn pg_unavailable(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(pg_message(&e))
}

/// A pool failure with the driver's cause spelled out (deadpool's own message
/// for a backend error is only "error occurred while creating a new object").
pub(super) fn pool_unavailable(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => StoreError::Unavailable(format!(
            "cannot open a PostgreSQL connection: {}",
            pg_message(&e)
        )),
        deadpool_postgres::PoolError::Timeout(t) => StoreError::Unavailable(format!(
            "no PostgreSQL connection free within the pool's {t:?} timeout"
        )),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// Why one pass over a batch could not finish.
#[derive(Debug)]
pub(super) enum Fault {
    /// A constraint, trigger or conditional write refused the change: only the op
    /// at fault is affected (found by the savepoint-per-op pass).
    Constraint(String),
    /// Deadlock or serialisation failure: the whole batch may simply run again.
    Retry(String),
    /// The database failed (connection, timeout, corrupt row): the batch fails.
    Store(String),
    /// COMMIT of transaction `xid` was sent and no answer came back: it may have
    /// committed. Only [`apply_pooled`] may answer it, by looking the fate up.
    Ambiguous { xid: i64, detail: String },
}

impl From<tokio_postgres::Error> for Fault {
    fn from(e: tokio_postgres::Error) -> Self {
        let msg = pg_message(&e);
        match e.code() {
            Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE => Fault::Retry(msg),
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => Fault::Retry(msg),
            // Class 23: integrity constraint violations, and our triggers' refusals.
            Some(c) if c.code().starts_with("23") => Fault::Constraint(msg),
            _ => Fault::Store(msg),
        }
    }
}

impl Fault {
    pub(super) fn into_store_error(self) -> StoreError {
        match self {
            Fault::Constraint(m) | Fault::Retry(m) | Fault::Store(m) => StoreError::Unavailable(m),
            Fault::Ambiguous { xid, detail } => StoreError::Unknown(format!(
                "COMMIT of transaction {xid} was not answered ({detail}); its fate was not looked up"
            )),
        }
    }
}

pub(super) fn corrupt(what: impl std::fmt::Display) -> Fault {
    Fault::Store(format!("unreadable row: {what}"))
}

/// The conditional write that makes a change happen once: any other row count
/// means the world was not as read.
pub(super) fn expect_rows(changed: usize, want: usize, what: &str) -> Result<(), Fault> {
    if changed == want {
        Ok(())
    } else {
        Err(Fault::Constraint(format!(
            "{what}: expected to change {want} rows, changed {changed}"
        )))
    }
}
