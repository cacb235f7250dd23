//! How SQLite failures are told apart: a refused change (only the command at
//! fault is affected) from a failed database (the whole batch fails).

use crate::store::StoreError;
use rusqlite::ErrorCode;

pub(crate) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Why one command could not run.
pub(super) enum Fault {
    /// A constraint or trigger refused the change: only this command is affected.
    Constraint(String),
    /// The database itself failed (I/O, lock timeout, corrupt row): the batch fails.
    Store(rusqlite::Error),
}

impl Fault {
    /// The fault as the caller of a whole transaction sees it: nothing committed.
    pub(super) fn into_store_error(self) -> StoreError {
        match self {
            Fault::Constraint(msg) => StoreError::Unavailable(msg),
            Fault::Store(e) => unavailable(e),
        }
    }
}

impl From<rusqlite::Error> for Fault {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::ConstraintViolation) => Fault::Constraint(e.to_string()),
            _ => Fault::Store(e),
        }
    }
}

pub(super) fn bad_column(idx: usize, what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        idx,
        rusqlite::types::Type::Text,
        Box::<dyn std::error::Error + Send + Sync>::from(what),
    )
}

/// A row that must exist because this transaction just saw or wrote it.
pub(super) fn must<T>(v: Option<T>, what: &str) -> Result<T, Fault> {
    v.ok_or_else(|| {
        Fault::Store(bad_column(
            0,
            format!("{what} vanished inside its own transaction"),
        ))
    })
}

/// The conditional update that makes a state change happen once: it names the
/// state it expects, and any other row count means the world was not as read.
pub(super) fn expect_one(changed: usize, what: &str) -> Result<(), Fault> {
    if changed == 1 {
        Ok(())
    } else {
        Err(Fault::Constraint(format!(
            "{what}: expected to change 1 row, changed {changed}"
        )))
    }
}
