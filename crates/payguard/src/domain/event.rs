//! Events: what downstream systems learn of each committed change of an order's
//! money or status (API.md, "Events and webhooks").
//!
//! Why: the incident began with "deducted but status not updated" alarms, the
//! money moved and the rest of the company did not learn it. An event is written
//! by the store in the same transaction as the movement it describes (a
//! transactional outbox), so a crash can never leave one without the other; the
//! feed and the webhooks only read what was committed.
//!
//! What it guarantees: an event's JSON is built once, from the order and the
//! entry as that transaction left them ([`EventDraft::seal`]), and stored as
//! text; every later reading ([`Event::to_json`]) gives the same bytes, so a
//! webhook signature and a consumer's deduplication see one body per event.

use super::{format_ts_ms, Entry, Order, OrderId};
use serde::Serialize;

/// Longest event id (`evt_` + 32 hex digits).
pub const EVENT_ID_BYTES_MAX: usize = 36;

/// What happened to the order (API.md's event types).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub enum EventType {
    /// A deduct, or a capture: the order's money was taken.
    #[serde(rename = "order.paid")]
    OrderPaid,
    /// A deduct the balance could not pay (402): the order is FAILED.
    #[serde(rename = "order.payment_failed")]
    OrderPaymentFailed,
    #[serde(rename = "order.authorized")]
    OrderAuthorized,
    #[serde(rename = "order.voided")]
    OrderVoided,
    #[serde(rename = "order.hold_expired")]
    OrderHoldExpired,
    /// One per refund.
    #[serde(rename = "order.refunded")]
    OrderRefunded,
    /// A duplicate debit paid back by `payguard audit --apply`.
    #[serde(rename = "order.reversed")]
    OrderReversed,
}

impl EventType {
    pub const ALL: [EventType; 7] = [
        EventType::OrderPaid,
        EventType::OrderPaymentFailed,
        EventType::OrderAuthorized,
        EventType::OrderVoided,
        EventType::OrderHoldExpired,
        EventType::OrderRefunded,
        EventType::OrderReversed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            EventType::OrderPaid => "order.paid",
            EventType::OrderPaymentFailed => "order.payment_failed",
            EventType::OrderAuthorized => "order.authorized",
            EventType::OrderVoided => "order.voided",
            EventType::OrderHoldExpired => "order.hold_expired",
            EventType::OrderRefunded => "order.refunded",
            EventType::OrderReversed => "order.reversed",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// An event decided but not yet written: the order and entry as the movement
/// leaves them. Entry ids may still be placeholders (PostgreSQL's batch plan
/// patches them before sealing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventDraft {
    pub kind: EventType,
    pub order: Order,
    pub entry: Option<Entry>,
}

#[derive(Serialize)]
struct Data<'a> {
    order: &'a Order,
    entry: Option<&'a Entry>,
}

impl EventDraft {
    /// The event to insert: a fresh id and its `data` as JSON text, fixed now.
    pub fn seal(&self, created_at: i64) -> NewEvent {
        let data = serde_json::to_string(&Data {
            order: &self.order,
            entry: self.entry.as_ref(),
        })
        .expect("an order and an entry always serialize");
        NewEvent {
            id: new_event_id(),
            kind: self.kind,
            order_id: self.order.id.clone(),
            created_at,
            data,
        }
    }
}

/// A fresh event id: `evt_` and 128 random bits in hex. Random rather than
/// derived from the sequence, because PostgreSQL numbers events only after
/// they commit, and the id must exist in the transaction.
pub fn new_event_id() -> String {
    format!("evt_{:032x}", rand::random::<u128>())
}

/// An event as the store inserts it, in the movement's transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub id: String,
    pub kind: EventType,
    pub order_id: OrderId,
    pub created_at: i64,
    /// `{"order": {...}, "entry": {...} | null}`.
    pub data: String,
}

/// A committed event with its place in the feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Its position in the feed: strictly increasing in commit order.
    pub seq: i64,
    pub id: String,
    pub kind: EventType,
    pub order_id: OrderId,
    pub created_at: i64,
    pub data: String,
}

impl Event {
    /// The event as the feed and every webhook attempt send it, byte for byte
    /// the same at every reading: `{"id","seq","type","created_at","data"}`.
    pub fn to_json(&self) -> String {
        let id = serde_json::to_string(&self.id).expect("a string serializes");
        format!(
            r#"{{"id":{id},"seq":{},"type":"{}","created_at":"{}","data":{}}}"#,
            self.seq,
            self.kind.as_str(),
            format_ts_ms(self.created_at),
            self.data
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AccountId, Money, OrderStatus};

    fn order() -> Order {
        Order {
            id: OrderId::parse("o1").unwrap(),
            account_id: AccountId::parse("a1").unwrap(),
            amount: Money::amount(500).unwrap(),
            status: OrderStatus::Failed,
            refunded: Money::ZERO,
            debit_entry_id: None,
            failure_reason: Some("insufficient_funds".into()),
            captured: None,
            held: Money::ZERO,
            hold_expires_at: None,
            created_at: 0,
            updated_at: 1,
        }
    }

    #[test]
    fn an_event_reads_back_as_one_json_object_with_its_order() {
        let draft = EventDraft {
            kind: EventType::OrderPaymentFailed,
            order: order(),
            entry: None,
        };
        let new = draft.seal(1_764_000_000_000);
        assert!(new.id.starts_with("evt_") && new.id.len() == EVENT_ID_BYTES_MAX);
        let event = Event {
            seq: 7,
            id: new.id.clone(),
            kind: new.kind,
            order_id: new.order_id,
            created_at: new.created_at,
            data: new.data,
        };
        let v: serde_json::Value = serde_json::from_str(&event.to_json()).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["type"], "order.payment_failed");
        assert_eq!(v["id"], new.id.as_str());
        assert_eq!(v["data"]["order"]["status"], "FAILED");
        assert!(v["data"]["entry"].is_null());
        assert_eq!(event.to_json(), event.to_json());
    }

    #[test]
    fn every_type_parses_back() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
            assert_eq!(
                serde_json::to_string(&t).unwrap(),
                format!("\"{}\"", t.as_str())
            );
        }
        assert_eq!(EventType::parse("order.created"), None);
    }
}
