//! PostgreSQL's outbox: events inserted with the batch that moved the money,
//! the sequencer that numbers them once committed, the feed, and the webhook
//! rows (see [`crate::store::outbox`]).
//!
//! Why a sequencer (`v5_events.sql` says it at length): with many instances,
//! sequence values taken inside transactions commit out of order, and a reader
//! of `seq > after` would skip a value that commits late. Here a movement's
//! transaction inserts its event with `seq` NULL; [`sequence`], one instance at a
//! time under a transaction-level advisory lock, numbers what has committed,
//! after the highest number already given. Each pass commits before the next can
//! start, so numbers appear to readers only in increasing order.

use super::error::{corrupt, expect_rows, Fault};
use super::rows::{entry_from_row_at, order_from_row_at};
use crate::domain::{new_event_id, Event, EventDraft, EventType, Money};
use crate::store::outbox::{
    AttemptResult, AttemptRow, Backlog, ClaimRequest, Claimed, Delivery, DeliveryStatus, Endpoint,
    EndpointStatus, RetryOutcome, EVENT_ENTRY_AT, EVENT_OWN_AT, EVENT_SELECT, FAIL_PENDING_SQL,
    FAN_OUT_EVENTS_MAX, GONE_REASON,
};
use std::collections::HashMap;
use tokio_postgres::{GenericClient, Row};

/// `pg_try_advisory_xact_lock` key of the sequencer ("pgevents").
pub(super) const SEQUENCER_LOCK_KEY: i64 = 0x7067_6576_656e_7473;
/// Most events one sequencer pass numbers.
pub const SEQUENCE_PASS_EVENTS_MAX: i64 = 5_000;

/// Inserts the batch's events (ids already real) in batch order, in the
/// batch's transaction.
pub(super) async fn insert_events(
    tx: &deadpool_postgres::Transaction<'_>,
    drafts: &[EventDraft],
    now: i64,
) -> Result<(), Fault> {
    let len = drafts.len();
    let mut ids = Vec::with_capacity(len);
    let mut kinds = Vec::with_capacity(len);
    let mut orders = Vec::with_capacity(len);
    let mut entries = Vec::with_capacity(len);
    let mut statuses = Vec::with_capacity(len);
    let mut refunded = Vec::with_capacity(len);
    let mut debits: Vec<Option<i64>> = Vec::with_capacity(len);
    let mut reasons: Vec<Option<&str>> = Vec::with_capacity(len);
    let mut captured: Vec<Option<i64>> = Vec::with_capacity(len);
    let mut held = Vec::with_capacity(len);
    let mut expires: Vec<Option<i64>> = Vec::with_capacity(len);
    let mut updated = Vec::with_capacity(len);
    for d in drafts {
        let o = &d.order;
        ids.push(new_event_id());
        kinds.push(d.kind.as_str());
        orders.push(o.id.as_str());
        entries.push(d.entry.as_ref().map(|e| e.id));
        statuses.push(o.status.as_str());
        refunded.push(o.refunded.minor());
        debits.push(o.debit_entry_id);
        reasons.push(o.failure_reason.as_deref());
        captured.push(o.captured.map(Money::minor));
        held.push(o.held.minor());
        expires.push(o.hold_expires_at);
        updated.push(o.updated_at);
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO events (id, type, order_id, entry_id, created_at, status, refunded,
                 debit_entry_id, failure_reason, captured, held, hold_expires_at, updated_at)
             SELECT i, t, o, e, $13, s, r, d, f, c, h, x, u
             FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int8[],
                         $7::int8[], $8::text[], $9::int8[], $10::int8[], $11::int8[], $12::int8[])
                  WITH ORDINALITY AS v (i, t, o, e, s, r, d, f, c, h, x, u, n)
             ORDER BY n",
        )
        .await?;
    let n = tx
        .execute(
            &stmt,
            &[
                &ids, &kinds, &orders, &entries, &statuses, &refunded, &debits, &reasons,
                &captured, &held, &expires, &updated, &now,
            ],
        )
        .await? as usize;
    expect_rows(n, len, "events")
}

/// An event read with [`EVENT_SELECT`]'s columns.
fn event_from_row(row: &Row) -> Result<Event, Fault> {
    let kind: &str = row.try_get(EVENT_OWN_AT + 2)?;
    let entry = match row.try_get::<_, Option<i64>>(EVENT_ENTRY_AT)? {
        Some(_) => Some(entry_from_row_at(row, EVENT_ENTRY_AT)?),
        None => None,
    };
    Ok(Event {
        seq: row.try_get(EVENT_OWN_AT)?,
        id: row.try_get(EVENT_OWN_AT + 1)?,
        kind: EventType::parse(kind).ok_or_else(|| corrupt(format!("event type {kind:?}")))?,
        created_at: row.try_get(EVENT_OWN_AT + 3)?,
        order: order_from_row_at(row, 0)?,
        entry,
    })
}

/// Numbers committed, unnumbered events. When another instance is doing it
/// right now, `wait` waits for it (then numbers what is left); otherwise this
/// pass does nothing (that one will).
pub(super) async fn sequence(
    client: &mut tokio_postgres::Client,
    wait: bool,
) -> Result<u64, Fault> {
    // Most calls find nothing to number: say so from the partial index,
    // without a write transaction or the lock.
    let pending: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM events WHERE seq IS NULL)",
            &[],
        )
        .await?
        .try_get(0)?;
    if !pending {
        return Ok(0);
    }
    let tx = client.transaction().await?;
    if wait {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SEQUENCER_LOCK_KEY])
            .await?;
    } else {
        let locked: bool = tx
            .query_one(
                "SELECT pg_try_advisory_xact_lock($1)",
                &[&SEQUENCER_LOCK_KEY],
            )
            .await?
            .try_get(0)?;
        if !locked {
            return Ok(0);
        }
    }
    // A new statement: its snapshot sees every pass that committed before the
    // lock was ours.
    let n = tx
        .execute(
            "UPDATE events e SET seq = t.base + t.rn
             FROM (SELECT u.pos, row_number() OVER (ORDER BY u.pos) AS rn,
                          (SELECT COALESCE(MAX(seq), 0) FROM events) AS base
                   FROM (SELECT pos FROM events WHERE seq IS NULL ORDER BY pos LIMIT $1) u) t
             WHERE e.pos = t.pos",
            &[&SEQUENCE_PASS_EVENTS_MAX],
        )
        .await?;
    tx.commit().await?;
    Ok(n)
}

/// Numbered events after `after`, in `seq` order.
pub(super) async fn events(
    client: &impl GenericClient,
    after: i64,
    limit: usize,
) -> Result<Vec<Event>, Fault> {
    let sql = format!("{EVENT_SELECT} WHERE e.seq > $1 ORDER BY e.seq LIMIT $2");
    let rows = client.query(&sql, &[&after, &(limit as i64)]).await?;
    rows.iter().map(event_from_row).collect()
}

const ENDPOINT_COLS: &str =
    "id, url, types, secret, status, disabled_reason, created_at, updated_at";

fn endpoint_from_row(row: &Row) -> Result<Endpoint, Fault> {
    let types: Option<&str> = row.try_get(2)?;
    let status: &str = row.try_get(4)?;
    Ok(Endpoint {
        id: row.try_get(0)?,
        url: row.try_get(1)?,
        types: Endpoint::parse_types(types).map_err(corrupt)?,
        sealed_secret: row.try_get(3)?,
        status: EndpointStatus::parse(status)
            .ok_or_else(|| corrupt(format!("endpoint status {status:?}")))?,
        disabled_reason: row.try_get(5)?,
        created_at: row.try_get(6)?,
        updated_at: row.try_get(7)?,
    })
}

/// Inserts `ep` with its cursor at the feed's end.
pub(super) async fn create_endpoint(
    client: &impl GenericClient,
    ep: &Endpoint,
) -> Result<bool, Fault> {
    let n = client
        .execute(
            "INSERT INTO webhook_endpoints (id, url, types, secret, status, after_seq, created_at, updated_at)
             VALUES ($1, $2, $3, $4, 'enabled', (SELECT COALESCE(MAX(seq), 0) FROM events), $5, $5)
             ON CONFLICT (id) DO NOTHING",
            &[&ep.id, &ep.url, &ep.types_column(), &ep.sealed_secret, &ep.created_at],
        )
        .await?;
    Ok(n == 1)
}

pub(super) async fn endpoints(
    client: &impl GenericClient,
    id: Option<&str>,
) -> Result<Vec<Endpoint>, Fault> {
    let sql = format!(
        "SELECT {ENDPOINT_COLS} FROM webhook_endpoints
         WHERE status <> 'deleted' AND ($1::text IS NULL OR id = $1) ORDER BY created_at, id"
    );
    let rows = client.query(&sql, &[&id]).await?;
    rows.iter().map(endpoint_from_row).collect()
}

pub(super) async fn delete_endpoint(
    client: &impl GenericClient,
    id: &str,
    now: i64,
) -> Result<bool, Fault> {
    let n = client
        .execute(
            "UPDATE webhook_endpoints SET status = 'deleted', updated_at = $2
             WHERE id = $1 AND status <> 'deleted'",
            &[&id, &now],
        )
        .await?;
    // After the endpoint's row: a claim racing this sees it deleted, or its
    // lease is on a delivery this then fails (the attempt's result is dropped).
    client.execute(FAIL_PENDING_SQL, &[&id, &now]).await?;
    Ok(n == 1)
}

/// As SQLite's: each enabled endpoint's new events become its deliveries, and
/// its cursor moves, in one transaction; an endpoint another instance is
/// fanning out right now is skipped (its row is locked).
pub(super) async fn fan_out(client: &mut tokio_postgres::Client, now: i64) -> Result<u64, Fault> {
    // Most passes have nothing to fan out: find that out without locking the
    // endpoints' rows.
    let behind: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM webhook_endpoints WHERE status = 'enabled'
                 AND after_seq < (SELECT COALESCE(MAX(seq), 0) FROM events))",
            &[],
        )
        .await?
        .try_get(0)?;
    if !behind {
        return Ok(0);
    }
    let tx = client.transaction().await?;
    let ends = tx
        .query(
            "SELECT id, after_seq FROM webhook_endpoints WHERE status = 'enabled'
             ORDER BY id FOR UPDATE SKIP LOCKED",
            &[],
        )
        .await?;
    let mut created = 0u64;
    for row in &ends {
        let id: &str = row.try_get(0)?;
        let after: i64 = row.try_get(1)?;
        let upto: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(seq), $1) FROM
                     (SELECT seq FROM events WHERE seq > $1 ORDER BY seq LIMIT $2) u",
                &[&after, &(FAN_OUT_EVENTS_MAX as i64)],
            )
            .await?
            .try_get(0)?;
        if upto == after {
            continue;
        }
        created += tx
            .execute(
                "INSERT INTO webhook_deliveries
                     (endpoint_id, event_id, event_seq, status, next_attempt_at, updated_at)
                 SELECT w.id, e.id, e.seq, 'pending', $4, $4
                 FROM events e, webhook_endpoints w
                 WHERE w.id = $1 AND e.seq > $2 AND e.seq <= $3
                   AND (w.types IS NULL OR strpos(w.types, '\"' || e.type || '\"') > 0)
                 ON CONFLICT DO NOTHING",
                &[&id, &after, &upto, &now],
            )
            .await?;
        tx.execute(
            "UPDATE webhook_endpoints SET after_seq = $2 WHERE id = $1",
            &[&id, &upto],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(created)
}

/// Leases due deliveries (see [`ClaimRequest`]): per endpoint, one statement
/// that picks its oldest due rows with `FOR UPDATE SKIP LOCKED` (so instances
/// claiming at once take different rows) and leases them.
pub(super) async fn claim(
    client: &deadpool_postgres::ClientWrapper,
    req: &ClaimRequest,
) -> Result<Vec<Claimed>, Fault> {
    let lease = client
        .prepare_cached(
            "WITH picked AS (
                 SELECT endpoint_id, event_id FROM webhook_deliveries
                 WHERE endpoint_id = $1 AND status = 'pending'
                   AND next_attempt_at <= $2 AND lease_until <= $2
                 ORDER BY next_attempt_at, event_seq LIMIT $3
                 FOR UPDATE SKIP LOCKED)
             UPDATE webhook_deliveries d SET attempts = d.attempts + 1, lease_until = $4,
                    lease_owner = $5, updated_at = $2
             FROM picked p WHERE d.endpoint_id = p.endpoint_id AND d.event_id = p.event_id
             RETURNING d.event_id, d.attempts",
        )
        .await?;
    let read = client
        .prepare_cached(&format!("{EVENT_SELECT} WHERE e.id = ANY($1)"))
        .await?;
    let target = client
        .prepare_cached(
            "SELECT url, secret FROM webhook_endpoints WHERE id = $1 AND status = 'enabled'",
        )
        .await?;
    let lease_until = req.now_ms + req.lease_ms;
    let mut out = Vec::new();
    for (endpoint_id, want) in &req.wants {
        let want = (*want).min(req.total_max - out.len());
        if want == 0 {
            break;
        }
        let leased = client
            .query(
                &lease,
                &[
                    endpoint_id,
                    &req.now_ms,
                    &(want as i64),
                    &lease_until,
                    &req.owner,
                ],
            )
            .await?;
        if leased.is_empty() {
            continue;
        }
        let Some(ep) = client.query_opt(&target, &[endpoint_id]).await? else {
            // Disabled or deleted meanwhile: the leases run out unused.
            continue;
        };
        let ids: Vec<&str> = leased.iter().map(|r| r.get(0)).collect();
        let mut events: HashMap<String, Event> = HashMap::with_capacity(ids.len());
        for row in client.query(&read, &[&ids]).await? {
            let e = event_from_row(&row)?;
            events.insert(e.id.clone(), e);
        }
        for r in &leased {
            let id: &str = r.try_get(0)?;
            let event = events
                .remove(id)
                .ok_or_else(|| corrupt(format!("delivery of a missing event {id}")))?;
            out.push(Claimed {
                endpoint_id: endpoint_id.clone(),
                url: ep.try_get(0)?,
                sealed_secret: ep.try_get(1)?,
                attempt: r.try_get::<_, i32>(1)? as u32,
                event,
            });
        }
    }
    Ok(out)
}

/// As SQLite's: each attempt is logged; its result is kept only under its
/// lease; all in one transaction.
pub(super) async fn record(
    client: &mut deadpool_postgres::ClientWrapper,
    results: &[AttemptResult],
) -> Result<Vec<bool>, Fault> {
    let tx = client.transaction().await?;
    let log = tx
        .prepare_cached(
            "INSERT INTO webhook_attempts
                 (endpoint_id, event_id, attempt, at, status_code, error, duration_ms, instance)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .await?;
    let settle = tx
        .prepare_cached(
            "UPDATE webhook_deliveries SET status = $5, next_attempt_at = $6, lease_until = 0,
                    lease_owner = NULL, updated_at = $7
             WHERE endpoint_id = $1 AND event_id = $2 AND lease_owner = $3 AND attempts = $4
               AND status = 'pending'",
        )
        .await?;
    let mut kept = Vec::with_capacity(results.len());
    for res in results {
        tx.execute(
            &log,
            &[
                &res.endpoint_id,
                &res.event_id,
                &(res.attempt as i32),
                &res.row.at,
                &res.row.status_code.map(i32::from),
                &res.row.error,
                &res.row.duration_ms,
                &res.row.instance,
            ],
        )
        .await?;
        let (status, next_at) = res.next.settles();
        let ok = tx
            .execute(
                &settle,
                &[
                    &res.endpoint_id,
                    &res.event_id,
                    &res.owner,
                    &(res.attempt as i32),
                    &status.as_str(),
                    &next_at,
                    &res.row.at,
                ],
            )
            .await?
            == 1;
        if ok && res.next.disables_endpoint() {
            tx.execute(
                "UPDATE webhook_endpoints SET status = 'disabled', disabled_reason = $2, updated_at = $3
                 WHERE id = $1 AND status = 'enabled'",
                &[
                    &res.endpoint_id,
                    &GONE_REASON,
                    &res.row.at,
                ],
            )
            .await?;
            tx.execute(FAIL_PENDING_SQL, &[&res.endpoint_id, &res.row.at])
                .await?;
        }
        kept.push(ok);
    }
    tx.commit().await?;
    Ok(kept)
}

pub(super) async fn deliveries(
    client: &impl GenericClient,
    endpoint_id: &str,
    status: Option<DeliveryStatus>,
    event_id: Option<&str>,
    limit: usize,
) -> Result<Vec<Delivery>, Fault> {
    let rows = client
        .query(
            "SELECT d.endpoint_id, d.event_id, d.event_seq, e.type, d.status, d.attempts,
                    d.next_attempt_at
             FROM webhook_deliveries d JOIN events e ON e.id = d.event_id
             WHERE d.endpoint_id = $1 AND ($2::text IS NULL OR d.status = $2)
               AND ($3::text IS NULL OR d.event_id = $3)
             ORDER BY d.event_seq DESC LIMIT $4",
            &[
                &endpoint_id,
                &status.map(|s| s.as_str()),
                &event_id,
                &(limit as i64),
            ],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let kind: &str = r.try_get(3)?;
        let st: &str = r.try_get(4)?;
        let status =
            DeliveryStatus::parse(st).ok_or_else(|| corrupt(format!("delivery status {st:?}")))?;
        out.push(Delivery {
            endpoint_id: r.try_get(0)?,
            event_id: r.try_get(1)?,
            event_seq: r.try_get(2)?,
            event_type: EventType::parse(kind)
                .ok_or_else(|| corrupt(format!("event type {kind:?}")))?,
            status,
            attempts: r.try_get::<_, i32>(5)? as u32,
            next_attempt_at: (status == DeliveryStatus::Pending).then_some(r.try_get(6)?),
            attempt_log: Vec::new(),
        });
    }
    if out.is_empty() {
        return Ok(out);
    }
    let evs: Vec<&str> = out.iter().map(|d| d.event_id.as_str()).collect();
    let attempts = client
        .query(
            "SELECT event_id, attempt, at, status_code, error, duration_ms, instance
             FROM webhook_attempts WHERE endpoint_id = $1 AND event_id = ANY($2)
             ORDER BY event_id, attempt",
            &[&endpoint_id, &evs],
        )
        .await?;
    let mut by_event: HashMap<String, Vec<AttemptRow>> = HashMap::new();
    for a in &attempts {
        by_event.entry(a.try_get(0)?).or_default().push(AttemptRow {
            attempt: a.try_get::<_, i32>(1)? as u32,
            at: a.try_get(2)?,
            status_code: a.try_get::<_, Option<i32>>(3)?.map(|c| c as u16),
            error: a.try_get(4)?,
            duration_ms: a.try_get(5)?,
            instance: a.try_get(6)?,
        });
    }
    for d in &mut out {
        d.attempt_log = by_event.remove(&d.event_id).unwrap_or_default();
    }
    Ok(out)
}

pub(super) async fn retry(
    client: &mut tokio_postgres::Client,
    endpoint_id: &str,
    event_id: &str,
    now: i64,
) -> Result<RetryOutcome, Fault> {
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT d.status, w.status FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id
             WHERE d.endpoint_id = $1 AND d.event_id = $2 AND w.status <> 'deleted' FOR UPDATE OF d",
            &[&endpoint_id, &event_id],
        )
        .await?;
    let outcome = match row {
        None => RetryOutcome::NotFound,
        Some(r) if r.try_get::<_, &str>(1)? != "enabled" => RetryOutcome::EndpointDisabled,
        Some(r) => {
            let st: &str = r.try_get(0)?;
            match DeliveryStatus::parse(st) {
                None => return Err(corrupt(format!("delivery status {st:?}"))),
                Some(DeliveryStatus::Failed) => {
                    tx.execute(
                        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $3,
                                lease_until = 0, lease_owner = NULL, updated_at = $3
                         WHERE endpoint_id = $1 AND event_id = $2 AND status = 'failed'",
                        &[&endpoint_id, &event_id, &now],
                    )
                    .await?;
                    let mut found = deliveries(&tx, endpoint_id, None, Some(event_id), 1).await?;
                    match found.pop() {
                        Some(d) => RetryOutcome::Scheduled(d),
                        None => RetryOutcome::NotFound,
                    }
                }
                Some(other) => RetryOutcome::NotFailed(other),
            }
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

pub(super) async fn backlog(client: &impl GenericClient) -> Result<Vec<Backlog>, Fault> {
    let rows = client
        .query(
            "SELECT w.id, COUNT(d.event_id), MIN(e.created_at)
             FROM webhook_endpoints w
             LEFT JOIN webhook_deliveries d ON d.endpoint_id = w.id AND d.status = 'pending'
             LEFT JOIN events e ON e.id = d.event_id
             WHERE w.status <> 'deleted' GROUP BY w.id ORDER BY w.id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Backlog {
                endpoint_id: r.try_get(0)?,
                pending: r.try_get::<_, i64>(1)? as u64,
                oldest_created_at: r.try_get(2)?,
            })
        })
        .collect()
}
