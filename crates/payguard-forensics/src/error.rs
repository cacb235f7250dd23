//! The errors of the forensics boundary: bad usage and unreadable input.
//!
//! Why: `run` maps each variant to exit status 2 with a message that says which input and why;
//! damaged input that can still be partly read is not an error here but a finding in the report.

use std::path::PathBuf;

/// What stops a forensics run before it can analyse anything.
#[derive(Debug, thiserror::Error)]
pub enum ForensicsError {
    /// A path given on the command line cannot be opened or listed.
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    /// A flag's value is malformed.
    #[error("bad value for {flag}: {value:?}: {reason}")]
    BadFlag {
        flag: &'static str,
        value: String,
        reason: String,
    },
    /// More distinct files or hosts than the interning tables hold.
    #[error("too many {what} (limit {limit})")]
    TooMany { what: &'static str, limit: usize },
    /// Writing an output file failed.
    #[error("cannot write {path}: {reason}")]
    Output { path: PathBuf, reason: String },
}
