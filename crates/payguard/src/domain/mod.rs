//! The vocabulary of payguard: money, identifiers, and the records the API shows.
//!
//! Everything here is validated once, at construction, so the rest of the code can
//! take a [`Money`] or an [`OrderId`] as proof that the value is in range.

mod event;
mod ids;
mod model;
mod money;

pub use event::{new_event_id, Event, EventDraft, EventType, EVENT_ID_BYTES_MAX};
pub use ids::{AccountId, Currency, IdError, OrderId, RefundId, RequestId, ID_BYTES_MAX};
pub use model::{
    format_ts_ms, Account, AuditReport, BalanceMismatch, DuplicateDebit, Entry, EntryKind,
    HeldMismatch, NegativeBalance, Order, OrderStatus, OverRefund, PaidMismatch, Resolved,
};
pub use money::{Money, MoneyError, MONEY_MINOR_MAX};
