//! The simulated database's outbox tables: webhook endpoints (with their
//! fan-out cursor), deliveries (one per endpoint and event), and the attempt
//! log, written by the calls payguard's delivery loop makes
//! (`payguard::outbox::delivery`, run for real by every instance with
//! `Protocol::webhooks`).
//!
//! Why a model here: the stores' outbox is SQL (`store/sqlite/events.rs`,
//! `store/postgres/events.rs`); the loop's guarantees (one delivery per event
//! and endpoint, one claimer at a time, a result kept only under its lease)
//! rest on what those statements do, so each rule below is the statement it
//! mirrors, in one place, named in its comment. What an attempt's result does
//! to its row is `payguard::store::outbox::AttemptNext::settles`, the mapping
//! both stores write, not decided again here. Each call is one transaction
//! (the database runs one request at a time).
//!
//! A [`StoreVariant`] can switch the lease rules off, to show the checks
//! failing: a claim that ignores an unexpired lease
//! ([`StoreVariant::claim_respects_lease`]), a result kept without its claimer
//! holding the lease ([`StoreVariant::record_checks_lease`]), a claim of a
//! delivery already delivered ([`StoreVariant::claim_only_pending`]).
//!
//! Beside the tables, a history of every claim and every result kept, with
//! the database's time ([`HookLog`]): what the end-of-seed checks hold the
//! receiver's receipts against ([`crate::hooks::check`]). No rule reads it.

use crate::db::StoreVariant;
use payguard::domain::{Event, EventType};
use payguard::store::outbox::{
    AttemptNext, AttemptResult, AttemptRow, ClaimRequest, Claimed, DeliveryStatus, Endpoint,
    EndpointStatus, FAN_OUT_EVENTS_MAX, GONE_REASON,
};
use std::collections::BTreeMap;

/// The endpoints a seed with webhooks creates before it starts: one for every
/// type, one for money taken and given back only (`types` filtered).
pub const SIM_ENDPOINTS: [(&str, Option<&[EventType]>); 2] = [
    ("we_all", None),
    (
        "we_money",
        Some(&[EventType::OrderPaid, EventType::OrderRefunded]),
    ),
];

/// `webhook_endpoints`: an endpoint and its fan-out cursor (`after_seq`).
#[derive(Debug, Clone)]
pub struct EndpointRow {
    pub endpoint: Endpoint,
    pub after_seq: i64,
    /// `after_seq` when it was created: it receives the events after it.
    pub created_after_seq: i64,
}

/// `webhook_deliveries`: one per (endpoint, event).
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    pub event_seq: i64,
    pub event_type: EventType,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub lease_until: i64,
    pub lease_owner: Option<String>,
    pub updated_at: i64,
}

/// What happened to a delivery, in the order the database did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookLog {
    /// Attempt `attempt` leased to `owner` at `at` (the database's time), by
    /// a claim decided at its claimer's `now_ms`, until `lease_until` (the
    /// claimer's clock).
    Claimed {
        attempt: u32,
        owner: String,
        at: u64,
        now_ms: i64,
        lease_until: i64,
    },
    /// The result of attempt `attempt` was kept at `at` (database time).
    Kept {
        attempt: u32,
        owner: String,
        at: u64,
        next: AttemptNext,
    },
}

/// (endpoint id, event id).
pub type DeliveryKey = (String, String);

#[derive(Debug, Default)]
pub struct Outbox {
    /// By id.
    pub endpoints: BTreeMap<String, EndpointRow>,
    pub deliveries: BTreeMap<DeliveryKey, DeliveryRow>,
    /// `webhook_attempts`: by (endpoint, event, attempt), the first row kept.
    pub attempts: BTreeMap<(String, String, u32), AttemptRow>,
    /// Per delivery, its claims and kept results in order (not a table).
    pub log: BTreeMap<DeliveryKey, Vec<HookLog>>,
}

/// `(w.types IS NULL OR instr(w.types, '"' || e.type || '"') > 0)`: the
/// fan-out's match, on the same `types` column text.
fn matches(endpoint: &Endpoint, kind: EventType) -> bool {
    endpoint
        .types_column()
        .is_none_or(|t| t.contains(&format!("\"{}\"", kind.as_str())))
}

impl Outbox {
    /// `create_endpoint`: inserted `enabled` unless the id exists, its cursor
    /// at the feed's end (`(SELECT COALESCE(MAX(seq), 0) FROM events)`).
    pub fn create(&mut self, endpoint: Endpoint, events: &[Event]) -> bool {
        if self.endpoints.contains_key(&endpoint.id) {
            return false;
        }
        let end = events.last().map_or(0, |e| e.seq);
        self.endpoints.insert(
            endpoint.id.clone(),
            EndpointRow {
                endpoint: Endpoint {
                    status: EndpointStatus::Enabled,
                    updated_at: endpoint.created_at,
                    ..endpoint
                },
                after_seq: end,
                created_after_seq: end,
            },
        );
        true
    }

    /// `endpoints`: every endpoint not deleted (here none is), oldest first
    /// (`ORDER BY created_at, id`), or the one named `id`.
    pub fn endpoints(&self, id: Option<&str>) -> Vec<Endpoint> {
        let mut out: Vec<Endpoint> = self
            .endpoints
            .values()
            .filter(|r| id.is_none_or(|id| r.endpoint.id == id))
            .map(|r| r.endpoint.clone())
            .collect();
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        out
    }

    /// `fan_out`: per enabled endpoint (`ORDER BY id`), the events after its
    /// cursor, at most `FAN_OUT_EVENTS_MAX`, become `pending` deliveries due
    /// `now` if they match it (`INSERT ... ON CONFLICT DO NOTHING`: one per
    /// (endpoint, event), the primary key), and the cursor moves to the last
    /// one read, matched or not; one transaction. Returns the rows created.
    pub fn fan_out(&mut self, events: &[Event], now: i64) -> u64 {
        let mut created = 0;
        for row in self
            .endpoints
            .values_mut()
            .filter(|r| r.endpoint.status == EndpointStatus::Enabled)
        {
            let after = row.after_seq;
            let batch: Vec<&Event> = events
                .iter()
                .filter(|e| e.seq > after)
                .take(FAN_OUT_EVENTS_MAX)
                .collect();
            let Some(upto) = batch.last().map(|e| e.seq) else {
                continue;
            };
            for e in batch.into_iter().filter(|e| matches(&row.endpoint, e.kind)) {
                let key = (row.endpoint.id.clone(), e.id.clone());
                if self.deliveries.contains_key(&key) {
                    continue;
                }
                self.deliveries.insert(
                    key,
                    DeliveryRow {
                        event_seq: e.seq,
                        event_type: e.kind,
                        status: DeliveryStatus::Pending,
                        attempts: 0,
                        next_attempt_at: now,
                        lease_until: 0,
                        lease_owner: None,
                        updated_at: now,
                    },
                );
                created += 1;
            }
            row.after_seq = upto;
        }
        created
    }

    /// `claim` (SQLite's, one transaction): endpoint by endpoint in the order
    /// asked, at most its want and what is left of `total_max`; its due rows
    /// (`status = 'pending' AND next_attempt_at <= now AND lease_until <= now`,
    /// `ORDER BY next_attempt_at, event_seq`), if the endpoint is still
    /// `enabled`, each leased: `attempts = attempts + 1`, `lease_until = now +
    /// lease_ms`, `lease_owner`. `at` is the database's time, for the log.
    pub fn claim(
        &mut self,
        req: &ClaimRequest,
        events: &[Event],
        variant: StoreVariant,
        at: u64,
    ) -> Vec<Claimed> {
        let mut claimed = Vec::new();
        if req.total_max == 0 {
            return claimed;
        }
        for (endpoint_id, want) in &req.wants {
            let want = (*want).min(req.total_max - claimed.len());
            if want == 0 {
                break;
            }
            let mut due: Vec<(i64, i64, String)> = self
                .deliveries
                .iter()
                .filter(|((ep, _), d)| {
                    ep == endpoint_id
                        // The broken store: a delivery already settled is taken too.
                        && (d.status == DeliveryStatus::Pending || !variant.claim_only_pending)
                        && d.next_attempt_at <= req.now_ms
                        // The broken store: a lease still running is taken too.
                        && (d.lease_until <= req.now_ms || !variant.claim_respects_lease)
                })
                .map(|((_, ev), d)| (d.next_attempt_at, d.event_seq, ev.clone()))
                .collect();
            due.sort();
            due.truncate(want);
            if due.is_empty() {
                continue;
            }
            let Some(target) = self
                .endpoints
                .get(endpoint_id)
                .filter(|r| r.endpoint.status == EndpointStatus::Enabled)
                .map(|r| r.endpoint.clone())
            else {
                continue;
            };
            for (_, seq, event_id) in due {
                let key = (endpoint_id.clone(), event_id.clone());
                let d = self.deliveries.get_mut(&key).expect("picked");
                d.attempts += 1;
                d.lease_until = req.now_ms + req.lease_ms;
                d.lease_owner = Some(req.owner.clone());
                d.updated_at = req.now_ms;
                self.log.entry(key).or_default().push(HookLog::Claimed {
                    attempt: d.attempts,
                    owner: req.owner.clone(),
                    at,
                    now_ms: req.now_ms,
                    lease_until: d.lease_until,
                });
                let event = events
                    .get(usize::try_from(seq - 1).expect("seq from 1"))
                    .cloned()
                    .expect("a delivery's event is in the feed");
                claimed.push(Claimed {
                    endpoint_id: endpoint_id.clone(),
                    url: target.url.clone(),
                    sealed_secret: target.sealed_secret.clone(),
                    event,
                    attempt: d.attempts,
                });
            }
        }
        claimed
    }

    /// `record`, one transaction: each attempt is logged (`INSERT ... ON
    /// CONFLICT DO NOTHING` into `webhook_attempts`), and its result is kept
    /// only `WHERE lease_owner = owner AND attempts = attempt AND status =
    /// 'pending'` (its claimer still holds the lease: no later claim since),
    /// as `AttemptNext::settles` says, the lease cleared; a 410 kept disables
    /// the endpoint and fails its pending deliveries (`FAIL_PENDING_SQL`).
    /// Returns, per result, whether it was kept.
    pub fn record(
        &mut self,
        results: &[AttemptResult],
        variant: StoreVariant,
        at: u64,
    ) -> Vec<bool> {
        let mut kept = Vec::with_capacity(results.len());
        for res in results {
            self.attempts
                .entry((res.endpoint_id.clone(), res.event_id.clone(), res.attempt))
                .or_insert_with(|| res.row.clone());
            let key = (res.endpoint_id.clone(), res.event_id.clone());
            let (status, next_at) = res.next.settles();
            let ok = match self.deliveries.get_mut(&key) {
                Some(d)
                    if d.status == DeliveryStatus::Pending
                        // The broken store: kept whoever holds the lease now.
                        && (!variant.record_checks_lease
                            || (d.lease_owner.as_deref() == Some(res.owner.as_str())
                                && d.attempts == res.attempt)) =>
                {
                    d.status = status;
                    d.next_attempt_at = next_at;
                    d.lease_until = 0;
                    d.lease_owner = None;
                    d.updated_at = res.row.at;
                    true
                }
                _ => false,
            };
            if ok {
                self.log.entry(key).or_default().push(HookLog::Kept {
                    attempt: res.attempt,
                    owner: res.owner.clone(),
                    at,
                    next: res.next,
                });
            }
            if ok && res.next.disables_endpoint() {
                if let Some(r) = self
                    .endpoints
                    .get_mut(&res.endpoint_id)
                    .filter(|r| r.endpoint.status == EndpointStatus::Enabled)
                {
                    r.endpoint.status = EndpointStatus::Disabled;
                    r.endpoint.disabled_reason = Some(GONE_REASON.to_owned());
                    r.endpoint.updated_at = res.row.at;
                }
                for ((ep, _), d) in self.deliveries.iter_mut() {
                    if ep == &res.endpoint_id && d.status == DeliveryStatus::Pending {
                        d.status = DeliveryStatus::Failed;
                        d.lease_until = 0;
                        d.lease_owner = None;
                        d.updated_at = res.row.at;
                    }
                }
            }
            kept.push(ok);
        }
        kept
    }

    /// Deliveries still `pending`, and endpoints whose cursor is behind the
    /// feed: delivery work left.
    pub fn work_left(&self, events: &[Event]) -> bool {
        let last = events.last().map_or(0, |e| e.seq);
        self.deliveries
            .values()
            .any(|d| d.status == DeliveryStatus::Pending)
            || self
                .endpoints
                .values()
                .any(|r| r.endpoint.status == EndpointStatus::Enabled && r.after_seq < last)
    }
}
