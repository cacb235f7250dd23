//! The outbox's consumers over HTTP: the event feed ([`feed`]).
//!
//! Events are written by the store in each movement's own transaction; this
//! module only reads what was committed.

pub(crate) mod feed;
