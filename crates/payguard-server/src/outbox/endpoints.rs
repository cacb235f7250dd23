//! `/v1/webhook_endpoints`: create (the secret is shown once), list, delete,
//! and each endpoint's deliveries with their attempts, and a manual retry of a
//! `failed` delivery.
//!
//! Creation checks the URL against the SSRF rules ([`crate::webhooks::check_url`]:
//! loopback, private and link-local addresses, also behind a name, are refused
//! unless `--webhook-allow-private`), and seals the secret before it is stored.
//! With an Idempotency-Key, the endpoint's id is derived from the caller's scope
//! and the key, so a retried creation finds the row the first one wrote (in the
//! same insert) and answers it again, secret included, instead of creating a
//! second endpoint.

use crate::auth::Principal;
use crate::error::ApiError;
use crate::idempotency::{key_from, IDEMPOTENT_REPLAYED_HEADER};
use crate::request::json_body;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use payguard::domain::{format_ts_ms, EventType};
use payguard::store::outbox::{
    Delivery, DeliveryStatus, Endpoint, EndpointStatus, RetryOutcome, DELIVERIES_LIST_MAX,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Longest endpoint id (`we_` + 32 hex digits).
const ENDPOINT_ID_BYTES_MAX: usize = 35;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateEndpointBody {
    /// `http` or `https`; not loopback, private or link-local unless the server
    /// runs with `--webhook-allow-private`.
    #[schema(max_length = 2048, example = "http://93.184.216.34/payguard-events")]
    url: String,
    /// Event types to receive; null or absent: every type.
    #[serde(default)]
    types: Option<Vec<EventType>>,
}

/// An endpoint as listed (never with its secret).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct EndpointDoc {
    id: String,
    url: String,
    types: Option<Vec<EventType>>,
    /// `enabled`, or `disabled` after a 410.
    status: String,
    disabled_reason: Option<String>,
    #[schema(format = DateTime)]
    created_at: String,
}

/// A new endpoint, with its signing secret (shown only here).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct CreatedEndpointDoc {
    id: String,
    url: String,
    types: Option<Vec<EventType>>,
    status: String,
    #[schema(format = DateTime)]
    created_at: String,
    /// `whsec_` + base64 of 32 random bytes: the Standard Webhooks signing key.
    secret: String,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct EndpointsDoc {
    endpoints: Vec<EndpointDoc>,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct AttemptDoc {
    attempt: u32,
    #[schema(format = DateTime)]
    at: String,
    /// The answer's status; null when none came (timeout, refused, reset).
    status_code: Option<u16>,
    error: Option<String>,
    duration_ms: i64,
    instance: String,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct DeliveryDoc {
    event_id: String,
    event_seq: i64,
    #[schema(value_type = EventType)]
    r#type: String,
    /// `pending`, `delivered` or `failed`.
    status: String,
    attempts: u32,
    #[schema(format = DateTime)]
    next_attempt_at: Option<String>,
    attempt_log: Vec<AttemptDoc>,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct DeliveriesDoc {
    deliveries: Vec<DeliveryDoc>,
}

fn endpoint_json(ep: &Endpoint) -> Value {
    json!({
        "id": ep.id,
        "url": ep.url,
        "types": ep.types,
        "status": ep.status.as_str(),
        "disabled_reason": ep.disabled_reason,
        "created_at": format_ts_ms(ep.created_at),
    })
}

fn delivery_json(d: &Delivery) -> Value {
    json!({
        "event_id": d.event_id,
        "event_seq": d.event_seq,
        "type": d.event_type,
        "status": d.status.as_str(),
        "attempts": d.attempts,
        "next_attempt_at": d.next_attempt_at.map(format_ts_ms),
        "attempt_log": d.attempt_log.iter().map(|a| json!({
            "attempt": a.attempt,
            "at": format_ts_ms(a.at),
            "status_code": a.status_code,
            "error": a.error,
            "duration_ms": a.duration_ms,
            "instance": a.instance,
        })).collect::<Vec<_>>(),
    })
}

fn endpoint_not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "endpoint_not_found",
        "no such webhook endpoint",
    )
}

/// A path id: at most [`ENDPOINT_ID_BYTES_MAX`] (events: 64) printable characters.
fn path_ids(path: Result<Path<Vec<String>>, PathRejection>) -> Result<Vec<String>, ApiError> {
    let Path(ids) = path.map_err(|e| ApiError::invalid(e.body_text()))?;
    for id in &ids {
        if id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(ApiError::invalid(format!("{id:?} is not an id")));
        }
    }
    Ok(ids)
}

#[utoipa::path(post, path = "/v1/webhook_endpoints", tag = "webhooks", request_body = CreateEndpointBody,
    params(crate::openapi::IdempotencyKey),
    responses(
        (status = 201, description = "Created; the secret is shown only in this answer", body = CreatedEndpointDoc,
            links(
                ("ListDeliveries" = (operation_id = "deliveries", parameters(("id" = "$response.body#/id")))),
                ("DeleteEndpoint" = (operation_id = "delete_endpoint", parameters(("id" = "$response.body#/id"))))
            )),
        (status = 409, description = "`endpoint_deleted`: this Idempotency-Key created an endpoint that has been deleted since", body = crate::openapi::ErrorBody),
        crate::openapi::PostErrors))]
pub(crate) async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let parsed: CreateEndpointBody = json_body(&headers, &body)?;
    if parsed.types.as_ref().is_some_and(Vec::is_empty) {
        return Err(ApiError::invalid(
            "types: name at least one type, or leave it out for every type",
        ));
    }
    let settings = &state.webhooks;
    let url = crate::webhooks::check_url(&parsed.url, settings.allow_private)
        .await
        .map_err(|e| ApiError::invalid(format!("url: {e}")))?;
    let key = key_from(&headers)?;
    let id = match &key {
        Some(k) => {
            let digest = Sha256::digest(format!("{}\n{k}", principal.0).as_bytes());
            format!("we_{}", &hex::encode(digest)[..32])
        }
        None => format!("we_{:032x}", rand::random::<u128>()),
    };
    debug_assert!(id.len() <= ENDPOINT_ID_BYTES_MAX);
    let secret = crate::webhooks::WebhookSecret::generate();
    let now = settings.clock.now_ms();
    let mut types = parsed.types;
    if let Some(ts) = types.as_mut() {
        ts.sort_by_key(|t| t.as_str());
        ts.dedup();
    }
    let endpoint = Endpoint {
        id: id.clone(),
        url: url.to_string(),
        types,
        sealed_secret: settings.sealer.seal(&id, &secret),
        status: EndpointStatus::Enabled,
        disabled_reason: None,
        created_at: now,
        updated_at: now,
    };
    let store = state.engine.store();
    if store.webhook_create(endpoint.clone()).await? {
        let mut body = endpoint_json(&endpoint);
        body["secret"] = json!(secret.to_whsec());
        return Ok((StatusCode::CREATED, Json(body)).into_response());
    }
    // Only a derived id can already exist: the same key was used before.
    let existing = store
        .webhook_endpoints(Some(id.clone()))
        .await?
        .pop()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "endpoint_deleted",
                "this Idempotency-Key created an endpoint that has been deleted since",
            )
        })?;
    if existing.url != endpoint.url || existing.types != endpoint.types {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reuse",
            "this Idempotency-Key was used with another method, path or body",
        ));
    }
    let secret = settings
        .sealer
        .open(&existing.id, &existing.sealed_secret)
        .map_err(|e| ApiError::internal(&e))?;
    let mut body = endpoint_json(&existing);
    body["secret"] = json!(secret.to_whsec());
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    resp.headers_mut()
        .insert(IDEMPOTENT_REPLAYED_HEADER, HeaderValue::from_static("true"));
    Ok(resp)
}

#[utoipa::path(get, path = "/v1/webhook_endpoints", tag = "webhooks",
    responses((status = 200, description = "Every endpoint (without secrets)", body = EndpointsDoc), crate::openapi::GetErrors))]
pub(crate) async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let eps = state.engine.store().webhook_endpoints(None).await?;
    Ok(
        Json(json!({ "endpoints": eps.iter().map(endpoint_json).collect::<Vec<_>>() }))
            .into_response(),
    )
}

#[utoipa::path(delete, path = "/v1/webhook_endpoints/{id}", tag = "webhooks", operation_id = "delete_endpoint",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_]{1,64}$")),
    responses((status = 204, description = "Deleted: no more deliveries"), crate::openapi::GetErrors))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    path: Result<Path<Vec<String>>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_ids(path)?.remove(0);
    let now = state.webhooks.clock.now_ms();
    if state.engine.store().webhook_delete(id, now).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(endpoint_not_found())
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeliveriesQuery {
    /// `pending`, `delivered` or `failed`; absent: all.
    #[param(pattern = "^(pending|delivered|failed)$")]
    status: Option<String>,
}

#[utoipa::path(get, path = "/v1/webhook_endpoints/{id}/deliveries", tag = "webhooks", operation_id = "deliveries",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_]{1,64}$"), DeliveriesQuery),
    responses((status = 200, description = "The endpoint's deliveries, newest event first, with their attempts", body = DeliveriesDoc),
        crate::openapi::GetErrors))]
pub(crate) async fn deliveries(
    State(state): State<AppState>,
    path: Result<Path<Vec<String>>, PathRejection>,
    query: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = path_ids(path)?.remove(0);
    let Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(
            DeliveryStatus::parse(s)
                .ok_or_else(|| ApiError::invalid("status must be pending, delivered or failed"))?,
        ),
    };
    let store = state.engine.store();
    if store.webhook_endpoints(Some(id.clone())).await?.is_empty() {
        return Err(endpoint_not_found());
    }
    let list = store
        .webhook_deliveries(id, status, DELIVERIES_LIST_MAX)
        .await?;
    Ok(
        Json(json!({ "deliveries": list.iter().map(delivery_json).collect::<Vec<_>>() }))
            .into_response(),
    )
}

#[utoipa::path(post, path = "/v1/webhook_endpoints/{id}/deliveries/{event_id}/retry", tag = "webhooks",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_]{1,64}$"), ("event_id" = String, Path, pattern = "^[A-Za-z0-9_]{1,64}$")),
    responses((status = 200, description = "Scheduled again, now", body = DeliveryDoc),
        (status = 409, description = "`delivery_not_failed`: only a failed delivery is sent again; `endpoint_disabled`: the endpoint answered 410", body = crate::openapi::ErrorBody),
        crate::openapi::GetErrors))]
pub(crate) async fn retry(
    State(state): State<AppState>,
    path: Result<Path<Vec<String>>, PathRejection>,
) -> Result<Response, ApiError> {
    let mut ids = path_ids(path)?;
    let (event_id, id) = (ids.remove(1), ids.remove(0));
    let now = state.webhooks.clock.now_ms();
    match state
        .engine
        .store()
        .webhook_retry(id, event_id, now)
        .await?
    {
        RetryOutcome::Scheduled(d) => Ok(Json(delivery_json(&d)).into_response()),
        RetryOutcome::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "delivery_not_found",
            "no such delivery for this endpoint",
        )),
        RetryOutcome::EndpointDisabled => Err(ApiError::new(
            StatusCode::CONFLICT,
            "endpoint_disabled",
            "the endpoint answered 410 Gone and is disabled; create a new endpoint",
        )),
        RetryOutcome::NotFailed(s) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "delivery_not_failed",
            format!(
                "the delivery is {}; only a failed one is sent again",
                s.as_str()
            ),
        )),
    }
}
