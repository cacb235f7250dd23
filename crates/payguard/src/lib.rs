//! payguard: move money exactly once per order, whatever the callers do.
//!
//! The incident this crate answers (see `shared/seed/`) charged customers twice
//! because two duplicate requests for one order both passed a check-then-act in
//! memory. Here the guarantee is layered, and each layer would hold alone:
//!
//! * [`store`]: the database enforces one debit per order, one entry per refund id,
//!   refunds never above the amount, balances never negative and status changes only
//!   from the expected state. Even with every layer above it wrong, it refuses a
//!   second charge.
//! * [`engine`]: order ids are hashed onto lanes; each lane has one owner task that
//!   serialises an order's work, lets duplicates share the one in-flight result
//!   (single flight) and commits what has queued up as one transaction (group commit).
//! * [`cache`]: a read-side cache, updated only after commit; it never decides a
//!   money movement.
#![forbid(unsafe_code)]

pub mod cache;
pub mod domain;
pub mod engine;
pub mod failpoint;
pub mod lock;
pub mod mutants;
pub mod outbox;
pub mod store;

pub use domain::{
    Account, AccountId, Currency, Entry, EntryKind, Money, Order, OrderId, OrderStatus, RefundId,
};
pub use engine::{Engine, EngineConfig, EngineError};
pub use store::{Store, StoreError};
