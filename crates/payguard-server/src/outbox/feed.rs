//! `GET /v1/events?after=SEQ&limit=N`: the feed of committed events.
//!
//! A reader that always passes the last `next_after` sees every event exactly
//! once, in commit order: the store numbers events only once they are
//! committed (PostgreSQL's sequencer; SQLite's single writer), so nothing can
//! appear later below a number already read.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

/// Events per page unless the reader asks (API.md).
pub const EVENTS_PAGE_DEFAULT: usize = 100;
/// Most events per page (API.md).
pub const EVENTS_PAGE_MAX: usize = 1000;

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct FeedQuery {
    /// The last `seq` read (`next_after` of the previous page); 0 or absent: from the start.
    #[param(minimum = 0)]
    after: Option<i64>,
    /// 1..=1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// One page of the feed, as OpenAPI shows it.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct EventsDoc {
    pub events: Vec<EventDoc>,
    /// Pass this as `after` to read on; equal to `after` when nothing new.
    pub next_after: i64,
}

/// An event (API.md, "Events and webhooks").
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct EventDoc {
    #[schema(example = "evt_3f2a9c0d5e6b7a8f9e0d1c2b3a4f5e6d")]
    pub id: String,
    pub seq: i64,
    #[schema(value_type = payguard::domain::EventType)]
    pub r#type: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    pub data: EventDataDoc,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct EventDataDoc {
    /// The order as the event's transaction left it.
    pub order: payguard::domain::Order,
    /// The entry it wrote (null for `order.payment_failed`).
    pub entry: Option<payguard::domain::Entry>,
}

#[utoipa::path(get, path = "/v1/events", tag = "events", params(FeedQuery),
    responses((status = 200, description = "Committed events after `after`, in `seq` order", body = EventsDoc),
        crate::openapi::GetErrors))]
pub(crate) async fn events(
    State(state): State<AppState>,
    query: Result<Query<FeedQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::invalid("after must be 0 or more"));
    }
    let limit = q.limit.unwrap_or(EVENTS_PAGE_DEFAULT);
    if !(1..=EVENTS_PAGE_MAX).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit must be 1..={EVENTS_PAGE_MAX}"
        )));
    }
    let store = state.engine.store();
    // Number everything committed before this request (waiting for a pass
    // another instance is running), so a reader sees its own writes (a no-op
    // on SQLite).
    store.sequence_events(true).await?;
    let page = store.events(after, limit).await?;
    let next_after = page.last().map_or(after, |e| e.seq);
    // Each event as `Event::to_json` renders it: the same bytes a webhook signs.
    /// A rendered event's usual size, to size the body once.
    const EVENT_JSON_BYTES_TYPICAL: usize = 800;
    let mut body = String::with_capacity(64 + page.len() * EVENT_JSON_BYTES_TYPICAL);
    body.push_str("{\"events\":[");
    for (i, e) in page.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&e.to_json());
    }
    body.push_str(&format!("],\"next_after\":{next_after}}}"));
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}
