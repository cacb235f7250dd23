//! What the stores keep for events and webhooks, beside the money: the rows of
//! the outbox's consumers (endpoints, deliveries, attempts) as both stores read
//! and write them.
//!
//! Why here: the events themselves are written by the money path, in the
//! movement's transaction ([`crate::store::rules::Effect::event`]); what follows
//! (which endpoint gets which event, who attempts it, what an attempt's result
//! does) is decided by the delivery loop ([`crate::outbox::delivery`], run by
//! `payguard-server` and by the simulation) and only written here, so the two
//! stores write the same decisions and decide none.
//!
//! What it guarantees: a delivery is attempted by one claimer at a time (a lease,
//! written conditionally), and a result is kept only while its claimer still
//! holds the lease; an event committed is turned into one delivery per endpoint
//! it matches, once (the endpoint's `after_seq` cursor moves in the same
//! transaction as the deliveries it created).

use crate::domain::{Event, EventType};

/// How every store reads an event: the order as the event left it (in
/// `ORDER_COLS`' order: the unchanging columns from `orders o`, the changing
/// ones from the event `e`), its entry from `entries x` (in `ENTRY_COLS`' order,
/// all NULL for none) at [`EVENT_ENTRY_AT`], then the event's own seq, id, type
/// and created_at at [`EVENT_OWN_AT`]. The same text in both dialects.
pub(crate) const EVENT_SELECT: &str = "SELECT o.id, o.account_id, o.amount, e.status, e.refunded,
        e.debit_entry_id, e.failure_reason, o.created_at, e.updated_at, e.captured, e.held,
        e.hold_expires_at,
        x.id, x.order_id, x.account_id, x.kind, x.amount, x.balance_after, x.refund_id,
        x.reverses, x.created_at,
        e.seq, e.id, e.type, e.created_at
     FROM events e JOIN orders o ON o.id = e.order_id LEFT JOIN entries x ON x.id = e.entry_id";
pub(crate) const EVENT_ENTRY_AT: usize = 12;
pub(crate) const EVENT_OWN_AT: usize = 21;

/// Most events one fan-out pass turns into deliveries per endpoint.
pub const FAN_OUT_EVENTS_MAX: usize = 1000;
/// Most deliveries one listing returns.
pub const DELIVERIES_LIST_MAX: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointStatus {
    Enabled,
    /// A 410 answered: no more attempts until re-created.
    Disabled,
}

impl EndpointStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            EndpointStatus::Enabled => "enabled",
            EndpointStatus::Disabled => "disabled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "enabled" => Some(EndpointStatus::Enabled),
            "disabled" => Some(EndpointStatus::Disabled),
            _ => None,
        }
    }
}

/// A webhook endpoint as stored. The secret is sealed by the server (it may be
/// encrypted at rest); the store never looks inside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub id: String,
    pub url: String,
    /// `None`: every type.
    pub types: Option<Vec<EventType>>,
    pub sealed_secret: String,
    pub status: EndpointStatus,
    pub disabled_reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Endpoint {
    /// The `types` column: a JSON array of type names, or NULL for every type.
    /// The fan-out matches `"<type>"` inside it (type names hold no quote).
    pub fn types_column(&self) -> Option<String> {
        self.types.as_ref().map(|ts| {
            serde_json::to_string(&ts.iter().map(|t| t.as_str()).collect::<Vec<_>>())
                .expect("strings serialize")
        })
    }

    /// The inverse of [`Endpoint::types_column`].
    pub fn parse_types(column: Option<&str>) -> Result<Option<Vec<EventType>>, String> {
        let Some(text) = column else { return Ok(None) };
        let names: Vec<String> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        names
            .iter()
            .map(|n| EventType::parse(n).ok_or_else(|| format!("unknown event type {n:?}")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "delivered" => Some(DeliveryStatus::Delivered),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// One attempt at a delivery, as the deliveries list shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptRow {
    pub attempt: u32,
    pub at: i64,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: i64,
    pub instance: String,
}

/// A delivery with its attempts, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub endpoint_id: String,
    pub event_id: String,
    pub event_seq: i64,
    pub event_type: EventType,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub next_attempt_at: Option<i64>,
    pub attempt_log: Vec<AttemptRow>,
}

/// Due deliveries to claim: endpoint by endpoint in the order given, at most
/// each one's count (the claimer's free room for it), oldest due first, and
/// at most `total_max` in all. An endpoint with nothing due takes nothing from
/// the total, so however many endpoints there are, each one is served.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    pub now_ms: i64,
    pub lease_ms: i64,
    /// Who holds the lease (the instance id).
    pub owner: String,
    /// (endpoint id, most deliveries to lease for it).
    pub wants: Vec<(String, usize)>,
    pub total_max: usize,
}

/// A delivery this claimer now holds: make attempt number `attempt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub endpoint_id: String,
    pub url: String,
    pub sealed_secret: String,
    pub event: Event,
    pub attempt: u32,
}

/// What an attempt's result does to its delivery (decided by the delivery
/// loop's retry schedule, [`crate::outbox::schedule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptNext {
    Delivered,
    RetryAt(i64),
    Failed,
    /// 410: the delivery is failed and its endpoint disabled.
    Gone,
}

impl AttemptNext {
    /// The delivery's status and next attempt time (0: none) once this is
    /// written: the one mapping both stores write.
    pub fn settles(self) -> (DeliveryStatus, i64) {
        match self {
            AttemptNext::Delivered => (DeliveryStatus::Delivered, 0),
            AttemptNext::RetryAt(at) => (DeliveryStatus::Pending, at),
            AttemptNext::Failed | AttemptNext::Gone => (DeliveryStatus::Failed, 0),
        }
    }

    /// Whether the attempt's endpoint is disabled with it (a 410).
    pub fn disables_endpoint(self) -> bool {
        self == AttemptNext::Gone
    }
}

/// What the stores write to every delivery still pending when its endpoint
/// stops taking them (a 410, a delete): `failed`, so nothing stays pending
/// for an endpoint that will never be sent to again.
/// (`$1` endpoint id, `$2` now.) SQLite does **not** number `$n` as PostgreSQL
/// does: to SQLite `$2` and `$1` are names, indexed in the order they first
/// appear (`$2` first here), so the SQLite store binds them by name
/// (`sqlite::events::fail_pending`); bound by position they swapped, and no
/// pending delivery was ever failed on SQLite.
pub(crate) const FAIL_PENDING_SQL: &str =
    "UPDATE webhook_deliveries SET status = 'failed', lease_until = 0, lease_owner = NULL,
            updated_at = $2
     WHERE endpoint_id = $1 AND status = 'pending'";

/// Why an endpoint is disabled after a 410 (`disabled_reason`).
pub const GONE_REASON: &str = "the endpoint answered 410 Gone";

/// One attempt's result, written if the claimer still holds the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptResult {
    pub endpoint_id: String,
    pub event_id: String,
    pub owner: String,
    pub attempt: u32,
    pub row: AttemptRow,
    pub next: AttemptNext,
}

/// What a manual retry found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    NotFound,
    /// Only a `failed` delivery is sent again.
    NotFailed(DeliveryStatus),
    /// Its endpoint answered 410 and is disabled: nothing is sent to it.
    EndpointDisabled,
    Scheduled(Delivery),
}

/// Per endpoint: deliveries not yet delivered nor failed, and the creation time
/// of the oldest one's event (for the backlog-age metric).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backlog {
    pub endpoint_id: String,
    pub pending: u64,
    pub oldest_created_at: Option<i64>,
}
