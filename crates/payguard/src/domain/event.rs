//! Events: what downstream systems learn of each committed change of an order's
//! money or status (API.md, "Events and webhooks").
//!
//! Why: the incident began with "deducted but status not updated" alarms, the
//! money moved and the rest of the company did not learn it. An event is written
//! by the store in the same transaction as the movement it describes (a
//! transactional outbox), so a crash can never leave one without the other; the
//! feed and the webhooks only read what was committed.
//!
//! What it guarantees: an event keeps the order as its transaction left it
//! (the order's changing columns are stored with the event; the rest of the
//! order and the entry never change) and is rendered at each reading by
//! [`Event::to_json`], a pure function of those immutable values: every
//! reading gives the same bytes, so a webhook signature and a consumer's
//! deduplication see one body per event.

use super::{format_ts_ms, Entry, Order};
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
/// patches them before the insert).
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

/// A fresh event id: `evt_`, the time in ms (48 bits) and 80 random bits, in
/// hex. Not derived from the sequence, because PostgreSQL numbers events only
/// after they commit and the id must exist in the transaction; time first, so
/// ids arrive in about increasing order and their unique index grows at its end
/// instead of splitting pages at random places.
pub fn new_event_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        & 0xffff_ffff_ffff;
    let random = rand::random::<u128>() & ((1u128 << 80) - 1);
    format!("evt_{ms:012x}{random:020x}")
}

/// A committed event with its place in the feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Its position in the feed: strictly increasing in commit order.
    pub seq: i64,
    pub id: String,
    pub kind: EventType,
    pub created_at: i64,
    /// The order as the event's transaction left it.
    pub order: Order,
    /// The entry it wrote (none for `order.payment_failed`).
    pub entry: Option<Entry>,
}

impl Event {
    /// The event as the feed and every webhook attempt send it, byte for byte
    /// the same at every reading: `{"id","seq","type","created_at","data"}`.
    pub fn to_json(&self) -> String {
        let id = serde_json::to_string(&self.id).expect("a string serializes");
        let data = serde_json::to_string(&Data {
            order: &self.order,
            entry: self.entry.as_ref(),
        })
        .expect("an order and an entry always serialize");
        format!(
            r#"{{"id":{id},"seq":{},"type":"{}","created_at":"{}","data":{data}}}"#,
            self.seq,
            self.kind.as_str(),
            format_ts_ms(self.created_at),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AccountId, Money, OrderId, OrderStatus};

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
        let id = new_event_id();
        assert!(id.starts_with("evt_") && id.len() == EVENT_ID_BYTES_MAX);
        let event = Event {
            seq: 7,
            id: id.clone(),
            kind: EventType::OrderPaymentFailed,
            created_at: 1_764_000_000_000,
            order: order(),
            entry: None,
        };
        let v: serde_json::Value = serde_json::from_str(&event.to_json()).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["type"], "order.payment_failed");
        assert_eq!(v["id"], id.as_str());
        assert_eq!(v["data"]["order"]["status"], "FAILED");
        assert!(v["data"]["entry"].is_null());
        assert_eq!(event.to_json(), event.clone().to_json());
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
