//! SQLite's outbox: events inserted in the movement's transaction, the feed,
//! and the webhook rows (see [`crate::store::outbox`]).
//!
//! SQLite has one writer at a time, so an event's `seq`, taken in its
//! transaction, is already commit order: the feed reads `seq > after` directly.

use super::error::{bad_column, expect_one, Fault};
use super::rows::{entry_from_row_at, order_from_row_at};
use crate::domain::{new_event_id, Event, EventDraft, EventType, Money};
use crate::store::outbox::{
    AttemptResult, AttemptRow, Backlog, ClaimRequest, Claimed, Delivery, DeliveryStatus, Endpoint,
    EndpointStatus, RetryOutcome, EVENT_ENTRY_AT, EVENT_OWN_AT, EVENT_SELECT, FAIL_PENDING_SQL,
    FAN_OUT_EVENTS_MAX, GONE_REASON,
};
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

/// Inserts the event `draft` describes, in the caller's transaction.
pub(super) fn insert_event(conn: &Connection, draft: &EventDraft, now: i64) -> Result<(), Fault> {
    let o = &draft.order;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO events (id, type, order_id, entry_id, created_at, status, refunded,
                 debit_entry_id, failure_reason, captured, held, hold_expires_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?
        .execute(params![
            new_event_id(),
            draft.kind.as_str(),
            o.id.as_str(),
            draft.entry.as_ref().map(|e| e.id),
            now,
            o.status.as_str(),
            o.refunded.minor(),
            o.debit_entry_id,
            o.failure_reason,
            o.captured.map(Money::minor),
            o.held.minor(),
            o.hold_expires_at,
            o.updated_at
        ])?;
    expect_one(inserted, "event")
}

/// An event read with [`EVENT_SELECT`]'s columns.
fn event_from_row(row: &Row<'_>) -> rusqlite::Result<Event> {
    let kind: String = row.get(EVENT_OWN_AT + 2)?;
    let entry = match row.get::<_, Option<i64>>(EVENT_ENTRY_AT)? {
        Some(_) => Some(entry_from_row_at(row, EVENT_ENTRY_AT)?),
        None => None,
    };
    Ok(Event {
        seq: row.get(EVENT_OWN_AT)?,
        id: row.get(EVENT_OWN_AT + 1)?,
        kind: EventType::parse(&kind)
            .ok_or_else(|| bad_column(EVENT_OWN_AT + 2, format!("unknown event type {kind:?}")))?,
        created_at: row.get(EVENT_OWN_AT + 3)?,
        order: order_from_row_at(row, 0)?,
        entry,
    })
}

/// Committed events after `after`, in `seq` order.
pub(super) fn events(conn: &Connection, after: i64, limit: usize) -> rusqlite::Result<Vec<Event>> {
    let sql = format!("{EVENT_SELECT} WHERE e.seq > ?1 ORDER BY e.seq LIMIT ?2");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![after, limit as i64], event_from_row)?;
    rows.collect()
}

const ENDPOINT_COLS: &str =
    "id, url, types, secret, status, disabled_reason, created_at, updated_at";

fn endpoint_from_row(row: &Row<'_>) -> rusqlite::Result<Endpoint> {
    let types: Option<String> = row.get(2)?;
    let status: String = row.get(4)?;
    Ok(Endpoint {
        id: row.get(0)?,
        url: row.get(1)?,
        types: Endpoint::parse_types(types.as_deref()).map_err(|e| bad_column(2, e))?,
        sealed_secret: row.get(3)?,
        status: EndpointStatus::parse(&status)
            .ok_or_else(|| bad_column(4, format!("unknown endpoint status {status:?}")))?,
        disabled_reason: row.get(5)?,
        created_at: row.get(6)?,
        updated_at: row.get(7)?,
    })
}

/// Inserts `ep`; it receives the events committed after this (its cursor
/// starts at the feed's end, read in the same transaction).
pub(super) fn create_endpoint(conn: &mut Connection, ep: &Endpoint) -> rusqlite::Result<bool> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let n = tx.execute(
        "INSERT INTO webhook_endpoints (id, url, types, secret, status, after_seq, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, 'enabled', (SELECT COALESCE(MAX(seq), 0) FROM events), ?5, ?5)
         ON CONFLICT (id) DO NOTHING",
        params![ep.id, ep.url, ep.types_column(), ep.sealed_secret, ep.created_at],
    )?;
    tx.commit()?;
    Ok(n == 1)
}

/// Every endpoint not deleted, oldest first; or the one named `id`.
pub(super) fn endpoints(conn: &Connection, id: Option<&str>) -> rusqlite::Result<Vec<Endpoint>> {
    let sql = format!(
        "SELECT {ENDPOINT_COLS} FROM webhook_endpoints
         WHERE status <> 'deleted' AND (?1 IS NULL OR id = ?1) ORDER BY created_at, id"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map([id], endpoint_from_row)?;
    rows.collect()
}

pub(super) fn delete_endpoint(conn: &mut Connection, id: &str, now: i64) -> rusqlite::Result<bool> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let changed = tx.execute(
        "UPDATE webhook_endpoints SET status = 'deleted', updated_at = ?2
         WHERE id = ?1 AND status <> 'deleted'",
        params![id, now],
    )?;
    fail_pending(&tx, id, now)?;
    tx.commit()?;
    Ok(changed == 1)
}

/// [`FAIL_PENDING_SQL`] for `endpoint_id`, its parameters bound by name (see
/// there why not by position).
fn fail_pending(tx: &Connection, endpoint_id: &str, now: i64) -> rusqlite::Result<usize> {
    tx.execute(
        FAIL_PENDING_SQL,
        rusqlite::named_params! { "$1": endpoint_id, "$2": now },
    )
}

/// Turns the events after each enabled endpoint's cursor into its deliveries
/// and moves the cursor, in one transaction; returns how many were created.
pub(super) fn fan_out(conn: &mut Connection, now: i64) -> rusqlite::Result<u64> {
    // Most ticks have nothing to do: find that out without the write lock the
    // money path's writer needs.
    let behind: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM webhook_endpoints WHERE status = 'enabled'
                 AND after_seq < (SELECT COALESCE(MAX(seq), 0) FROM events))",
        )?
        .query_row([], |r| r.get(0))?;
    if !behind {
        return Ok(0);
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let ends: Vec<(String, i64)> = tx
        .prepare_cached("SELECT id, after_seq FROM webhook_endpoints WHERE status = 'enabled'")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut created = 0u64;
    for (id, after) in ends {
        let upto: i64 = tx.query_row(
            "SELECT COALESCE(MAX(seq), ?1) FROM (SELECT seq FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2)",
            params![after, FAN_OUT_EVENTS_MAX as i64],
            |r| r.get(0),
        )?;
        if upto == after {
            continue;
        }
        created += tx
            .prepare_cached(
                "INSERT OR IGNORE INTO webhook_deliveries
                     (endpoint_id, event_id, event_seq, status, next_attempt_at, updated_at)
                 SELECT w.id, e.id, e.seq, 'pending', ?4, ?4
                 FROM events e, webhook_endpoints w
                 WHERE w.id = ?1 AND e.seq > ?2 AND e.seq <= ?3
                   AND (w.types IS NULL OR instr(w.types, '\"' || e.type || '\"') > 0)",
            )?
            .execute(params![id, after, upto, now])? as u64;
        tx.prepare_cached("UPDATE webhook_endpoints SET after_seq = ?2 WHERE id = ?1")?
            .execute(params![id, upto])?;
    }
    tx.commit()?;
    Ok(created)
}

/// Leases due deliveries to `req.owner` (see [`ClaimRequest`]), in one
/// transaction; each endpoint's oldest due first, through its index.
pub(super) fn claim(conn: &mut Connection, req: &ClaimRequest) -> rusqlite::Result<Vec<Claimed>> {
    // Without the write lock first: is anything due at the endpoints asked
    // for (through the due index, one probe each)?
    let mut due = false;
    for (endpoint_id, _) in &req.wants {
        due = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM webhook_deliveries
                     WHERE endpoint_id = ?1 AND status = 'pending'
                       AND next_attempt_at <= ?2 AND lease_until <= ?2)",
            )?
            .query_row(params![endpoint_id, req.now_ms], |r| r.get(0))?;
        if due {
            break;
        }
    }
    if !due || req.total_max == 0 {
        return Ok(Vec::new());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut claimed = Vec::new();
    for (endpoint_id, want) in &req.wants {
        let want = (*want).min(req.total_max - claimed.len());
        if want == 0 {
            break;
        }
        let picked: Vec<String> = tx
            .prepare_cached(
                "SELECT event_id FROM webhook_deliveries
                 WHERE endpoint_id = ?1 AND status = 'pending'
                   AND next_attempt_at <= ?2 AND lease_until <= ?2
                 ORDER BY next_attempt_at, event_seq LIMIT ?3",
            )?
            .query_map(params![endpoint_id, req.now_ms, want as i64], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if picked.is_empty() {
            continue;
        }
        let found: Option<(String, String)> = tx
            .prepare_cached(
                "SELECT url, secret FROM webhook_endpoints WHERE id = ?1 AND status = 'enabled'",
            )?
            .query_row([endpoint_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((url, sealed_secret)) = found else {
            continue;
        };
        for event_id in picked {
            let attempt: i64 = tx
                .prepare_cached(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, lease_until = ?3,
                            lease_owner = ?4, updated_at = ?5
                     WHERE endpoint_id = ?1 AND event_id = ?2 RETURNING attempts",
                )?
                .query_row(
                    params![
                        endpoint_id,
                        event_id,
                        req.now_ms + req.lease_ms,
                        req.owner,
                        req.now_ms
                    ],
                    |r| r.get(0),
                )?;
            let event = tx
                .prepare_cached(&format!("{EVENT_SELECT} WHERE e.id = ?1"))?
                .query_row([&event_id], event_from_row)?;
            claimed.push(Claimed {
                endpoint_id: endpoint_id.clone(),
                url: url.clone(),
                sealed_secret: sealed_secret.clone(),
                event,
                attempt: attempt as u32,
            });
        }
    }
    tx.commit()?;
    Ok(claimed)
}

/// Logs each attempt and writes its result if its claimer still holds the
/// lease, all in one transaction. Returns, per result, whether it was kept.
pub(super) fn record(
    conn: &mut Connection,
    results: &[AttemptResult],
) -> rusqlite::Result<Vec<bool>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut kept = Vec::with_capacity(results.len());
    for res in results {
        insert_attempt(&tx, res)?;
        let (status, next_at) = res.next.settles();
        let ok =
            tx.prepare_cached(
                "UPDATE webhook_deliveries SET status = ?5, next_attempt_at = ?6, lease_until = 0,
                        lease_owner = NULL, updated_at = ?7
                 WHERE endpoint_id = ?1 AND event_id = ?2 AND lease_owner = ?3 AND attempts = ?4
                   AND status = 'pending'",
            )?
            .execute(params![
                res.endpoint_id,
                res.event_id,
                res.owner,
                res.attempt,
                status.as_str(),
                next_at,
                res.row.at
            ])? == 1;
        if ok && res.next.disables_endpoint() {
            tx.prepare_cached(
                "UPDATE webhook_endpoints SET status = 'disabled', disabled_reason = ?2, updated_at = ?3
                 WHERE id = ?1 AND status = 'enabled'",
            )?
            .execute(params![
                res.endpoint_id,
                GONE_REASON,
                res.row.at
            ])?;
            fail_pending(&tx, &res.endpoint_id, res.row.at)?;
        }
        kept.push(ok);
    }
    tx.commit()?;
    Ok(kept)
}

fn insert_attempt(tx: &Connection, res: &AttemptResult) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO webhook_attempts
             (endpoint_id, event_id, attempt, at, status_code, error, duration_ms, instance)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        res.endpoint_id,
        res.event_id,
        res.attempt,
        res.row.at,
        res.row.status_code,
        res.row.error,
        res.row.duration_ms,
        res.row.instance
    ])?;
    Ok(())
}

/// An endpoint's deliveries (newest event first), with their attempts.
pub(super) fn deliveries(
    conn: &Connection,
    endpoint_id: &str,
    status: Option<DeliveryStatus>,
    event_id: Option<&str>,
    limit: usize,
) -> rusqlite::Result<Vec<Delivery>> {
    let mut stmt = conn.prepare_cached(
        "SELECT d.endpoint_id, d.event_id, d.event_seq, e.type, d.status, d.attempts, d.next_attempt_at
         FROM webhook_deliveries d JOIN events e ON e.id = d.event_id
         WHERE d.endpoint_id = ?1 AND (?2 IS NULL OR d.status = ?2) AND (?3 IS NULL OR d.event_id = ?3)
         ORDER BY d.event_seq DESC LIMIT ?4",
    )?;
    let rows = stmt.query_map(
        params![
            endpoint_id,
            status.map(|s| s.as_str()),
            event_id,
            limit as i64
        ],
        |r| {
            let kind: String = r.get(3)?;
            let status: String = r.get(4)?;
            let status = DeliveryStatus::parse(&status)
                .ok_or_else(|| bad_column(4, format!("unknown delivery status {status:?}")))?;
            Ok(Delivery {
                endpoint_id: r.get(0)?,
                event_id: r.get(1)?,
                event_seq: r.get(2)?,
                event_type: EventType::parse(&kind)
                    .ok_or_else(|| bad_column(3, format!("unknown event type {kind:?}")))?,
                status,
                attempts: r.get::<_, i64>(5)? as u32,
                next_attempt_at: (status == DeliveryStatus::Pending).then_some(r.get::<_, i64>(6)?),
                attempt_log: Vec::new(),
            })
        },
    )?;
    let mut out: Vec<Delivery> = rows.collect::<rusqlite::Result<_>>()?;
    let mut attempts = conn.prepare_cached(
        "SELECT attempt, at, status_code, error, duration_ms, instance FROM webhook_attempts
         WHERE endpoint_id = ?1 AND event_id = ?2 ORDER BY attempt",
    )?;
    for d in &mut out {
        d.attempt_log = attempts
            .query_map(params![d.endpoint_id, d.event_id], |r| {
                Ok(AttemptRow {
                    attempt: r.get::<_, i64>(0)? as u32,
                    at: r.get(1)?,
                    status_code: r.get::<_, Option<i64>>(2)?.map(|c| c as u16),
                    error: r.get(3)?,
                    duration_ms: r.get(4)?,
                    instance: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
    }
    Ok(out)
}

/// Sends a `failed` delivery again at `now`.
pub(super) fn retry(
    conn: &mut Connection,
    endpoint_id: &str,
    event_id: &str,
    now: i64,
) -> rusqlite::Result<RetryOutcome> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let status: Option<(String, String)> = tx
        .query_row(
            "SELECT d.status, w.status FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id
             WHERE d.endpoint_id = ?1 AND d.event_id = ?2 AND w.status <> 'deleted'",
            params![endpoint_id, event_id],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()?;
    let outcome = match status
        .as_ref()
        .map(|(d, w)| (DeliveryStatus::parse(d), w.as_str()))
    {
        None => RetryOutcome::NotFound,
        Some((_, w)) if w != "enabled" => RetryOutcome::EndpointDisabled,
        Some((None, _)) => {
            return Err(bad_column(0, format!("unknown delivery status {status:?}")))
        }
        Some((Some(DeliveryStatus::Failed), _)) => {
            tx.execute(
                "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = ?3,
                        lease_until = 0, lease_owner = NULL, updated_at = ?3
                 WHERE endpoint_id = ?1 AND event_id = ?2 AND status = 'failed'",
                params![endpoint_id, event_id, now],
            )?;
            let mut found = deliveries(&tx, endpoint_id, None, Some(event_id), 1)?;
            match found.pop() {
                Some(d) => RetryOutcome::Scheduled(d),
                None => RetryOutcome::NotFound,
            }
        }
        Some((Some(other), _)) => RetryOutcome::NotFailed(other),
    };
    tx.commit()?;
    Ok(outcome)
}

/// Per endpoint with undelivered events: how many, and the oldest one's time.
pub(super) fn backlog(conn: &Connection) -> rusqlite::Result<Vec<Backlog>> {
    let mut stmt = conn.prepare_cached(
        "SELECT w.id, COUNT(d.event_id), MIN(e.created_at)
         FROM webhook_endpoints w
         LEFT JOIN webhook_deliveries d ON d.endpoint_id = w.id AND d.status = 'pending'
         LEFT JOIN events e ON e.id = d.event_id
         WHERE w.status <> 'deleted' GROUP BY w.id ORDER BY w.id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Backlog {
            endpoint_id: r.get(0)?,
            pending: r.get::<_, i64>(1)? as u64,
            oldest_created_at: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// Announces a reversal `payguard audit --apply` wrote (entry `entry_id`), in
/// the caller's transaction, with the order as that transaction leaves it.
pub fn insert_reversal_event(conn: &Connection, entry_id: i64, now: i64) -> rusqlite::Result<()> {
    let entry = super::rows::load_entry(conn, entry_id)?
        .ok_or_else(|| bad_column(0, format!("reversal entry {entry_id} not found")))?;
    let order = super::rows::load_order(conn, entry.order_id.as_str())?
        .ok_or_else(|| bad_column(0, format!("order {} not found", entry.order_id)))?;
    let draft = EventDraft {
        kind: EventType::OrderReversed,
        order,
        entry: Some(entry),
    };
    insert_event(conn, &draft, now).map_err(|f| match f {
        Fault::Store(e) => e,
        Fault::Constraint(msg) => bad_column(0, msg),
    })
}
