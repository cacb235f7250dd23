//! Validated identifiers.
//!
//! Ids are 1..=64 characters of `[A-Za-z0-9_.:-]` (API.md). They are checked once
//! at the edge; a value of one of these types is proof that the check passed, so
//! a typo'd or hostile id can never reach a SQL statement or a log line unchecked.

use serde::Serialize;
use std::fmt;
use std::sync::Arc;

/// Longest id the API accepts, in bytes (all allowed characters are ASCII).
pub const ID_BYTES_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} characters long, the maximum is {ID_BYTES_MAX}")]
    TooLong { what: &'static str, len: usize },
    #[error("{what} may only contain A-Z a-z 0-9 _ . : - (found {found:?})")]
    BadChar { what: &'static str, found: char },
    #[error("currency must be 3 upper-case letters (found {0:?})")]
    BadCurrency(String),
}

fn check(what: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if s.len() > ID_BYTES_MAX {
        return Err(IdError::TooLong {
            what,
            len: s.chars().count(),
        });
    }
    if let Some(found) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(IdError::BadChar { what, found });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
        #[serde(transparent)]
        #[schema(value_type = String, pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check($what, s)?;
                Ok(Self(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }
    };
}

id_type!(
    /// An account's id, chosen by the caller.
    AccountId,
    "account id"
);
id_type!(
    /// An order's id, chosen by the caller; the unit of exactly-once charging.
    OrderId,
    "order id"
);
id_type!(
    /// A refund's id, chosen by the caller; each moves money at most once, forever.
    RefundId,
    "refund id"
);
id_type!(
    /// The id of one HTTP request, carried as `req` in every log event.
    RequestId,
    "request id"
);

/// ISO 4217-style currency code: 3 upper-case ASCII letters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, utoipa::ToSchema)]
#[schema(value_type = String, pattern = "^[A-Z]{3}$", example = "CNY")]
pub struct Currency([u8; 3]);

impl Currency {
    pub const CNY: Currency = Currency(*b"CNY");

    pub fn parse(s: &str) -> Result<Self, IdError> {
        let b = s.as_bytes();
        if b.len() == 3 && b.iter().all(u8::is_ascii_uppercase) {
            Ok(Currency([b[0], b[1], b[2]]))
        } else {
            Err(IdError::BadCurrency(s.chars().take(16).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII upper-case letters are ever stored, so this cannot fail.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(OrderId::parse("OD20240517A1122").is_ok());
        assert!(OrderId::parse("a_b.c:d-e").is_ok());
        assert!(matches!(OrderId::parse(""), Err(IdError::Empty { .. })));
        assert!(matches!(
            OrderId::parse(&"x".repeat(65)),
            Err(IdError::TooLong { len: 65, .. })
        ));
        assert!(OrderId::parse(&"x".repeat(64)).is_ok());
        assert!(matches!(
            OrderId::parse("a b"),
            Err(IdError::BadChar { found: ' ', .. })
        ));
        assert!(matches!(
            OrderId::parse("订单"),
            Err(IdError::BadChar { .. })
        ));
        assert!(OrderId::parse("x'; DROP TABLE orders;--").is_err());
    }

    #[test]
    fn currency_is_three_upper_case_letters() {
        assert_eq!(Currency::parse("USD").unwrap().as_str(), "USD");
        assert!(Currency::parse("usd").is_err());
        assert!(Currency::parse("US").is_err());
        assert!(Currency::parse("USDT").is_err());
    }
}
