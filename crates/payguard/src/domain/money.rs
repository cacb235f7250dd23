//! `Money` is a count of minor units (fen, cents) in an `i64`: never a float.
//!
//! Amounts enter the system only through [`Money::amount`] and [`Money::balance`],
//! which enforce the API's range (`1..=2^53-1` for amounts, `0..=2^53-1` for
//! balances, so every value survives a round trip through a JavaScript client).
//! Arithmetic is checked: an overflow is an error, never a wrap.

use serde::Serialize;
use std::fmt;

/// Largest amount or balance the API accepts: 2^53 - 1 minor units.
pub const MONEY_MINOR_MAX: i64 = (1_i64 << 53) - 1;

/// A sum of money in minor units of the account's currency.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, utoipa::ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = i64, example = 1185000)]
pub struct Money(i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount must be greater than 0, got {0}")]
    NotPositive(i64),
    #[error("balance must not be negative, got {0}")]
    Negative(i64),
    #[error("amount {0} is above the maximum of {MONEY_MINOR_MAX} minor units")]
    TooLarge(i64),
}

impl Money {
    pub const ZERO: Money = Money(0);

    /// A movement amount from a request: `1..=MONEY_MINOR_MAX`.
    pub fn amount(minor: i64) -> Result<Self, MoneyError> {
        if minor <= 0 {
            Err(MoneyError::NotPositive(minor))
        } else if minor > MONEY_MINOR_MAX {
            Err(MoneyError::TooLarge(minor))
        } else {
            Ok(Money(minor))
        }
    }

    /// A balance from a request: `0..=MONEY_MINOR_MAX`.
    pub fn balance(minor: i64) -> Result<Self, MoneyError> {
        if minor < 0 {
            Err(MoneyError::Negative(minor))
        } else if minor > MONEY_MINOR_MAX {
            Err(MoneyError::TooLarge(minor))
        } else {
            Ok(Money(minor))
        }
    }

    /// A value read back from our own store, which has already enforced the range
    /// with CHECK constraints; no validation beyond that is repeated here.
    pub const fn from_stored(minor: i64) -> Self {
        Money(minor)
    }

    pub const fn minor(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    pub fn checked_sub(self, other: Money) -> Option<Money> {
        self.0.checked_sub(other.0).map(Money)
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }
}

impl fmt::Display for Money {
    /// Shows major units with two decimals, computed in integers (`1185000` → `11850.00`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amount_range_is_enforced() {
        assert_eq!(Money::amount(0), Err(MoneyError::NotPositive(0)));
        assert_eq!(Money::amount(-5), Err(MoneyError::NotPositive(-5)));
        assert_eq!(
            Money::amount(MONEY_MINOR_MAX + 1),
            Err(MoneyError::TooLarge(MONEY_MINOR_MAX + 1))
        );
        assert_eq!(Money::amount(1).unwrap().minor(), 1);
        assert_eq!(
            Money::amount(MONEY_MINOR_MAX).unwrap().minor(),
            MONEY_MINOR_MAX
        );
        assert_eq!(Money::balance(0).unwrap(), Money::ZERO);
        assert_eq!(Money::balance(-1), Err(MoneyError::Negative(-1)));
    }

    #[test]
    fn arithmetic_is_checked() {
        let max = Money::from_stored(i64::MAX);
        assert_eq!(max.checked_add(Money::from_stored(1)), None);
        let min = Money::from_stored(i64::MIN);
        assert_eq!(min.checked_sub(Money::from_stored(1)), None);
        assert_eq!(
            Money::from_stored(5).checked_sub(Money::from_stored(7)),
            Some(Money::from_stored(-2))
        );
    }

    #[test]
    fn display_uses_integer_major_units() {
        assert_eq!(Money::from_stored(1_185_000).to_string(), "11850.00");
        assert_eq!(Money::from_stored(5).to_string(), "0.05");
        assert_eq!(Money::from_stored(-105).to_string(), "-1.05");
    }
}
