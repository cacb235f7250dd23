//! Errors a suite reports before it measures anything.
//!
//! A bad size flag is the caller's mistake, not a failed measurement, so it gets its
//! own type: the CLI maps it to exit status 2 ("bad usage") while every other failure
//! is an `anyhow` error with context.

/// A flag value that the suite refuses to run with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgError {
    /// A numeric flag outside its named limit.
    #[error("--{flag} must be between {min} and {max}, got {got}")]
    OutOfRange {
        flag: &'static str,
        min: u64,
        max: u64,
        got: u64,
    },
    /// A list flag given with no values.
    #[error("--{flag} needs at least one value")]
    Empty { flag: &'static str },
}

/// Checks `min <= got <= max` for the flag named `flag`.
pub fn check_range(flag: &'static str, got: u64, min: u64, max: u64) -> Result<(), ArgError> {
    if got < min || got > max {
        return Err(ArgError::OutOfRange {
            flag,
            min,
            max,
            got,
        });
    }
    Ok(())
}

/// Checks every value of a list flag, and that the list is not empty.
pub fn check_list(flag: &'static str, got: &[u64], min: u64, max: u64) -> Result<(), ArgError> {
    if got.is_empty() {
        return Err(ArgError::Empty { flag });
    }
    got.iter().try_for_each(|&g| check_range(flag, g, min, max))
}
