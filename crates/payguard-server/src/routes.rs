//! The routes of API.md. Handlers validate at the edge (ids, money, shapes), hand
//! one [`Op`] to the engine (under an Idempotency-Key when one is sent), and
//! render its answer; they hold no state of their own.

use crate::auth::{require_key, Principal};
use crate::error::ApiError;
use crate::request::{body_bytes, json_body, optional_json_body, request_id};
use crate::{idempotency, render, AppState};
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use payguard::domain::{
    AccountId, Currency, IdError, Money, MoneyError, OrderId, RefundId, RequestId,
};
use payguard::store::Op;
use serde::Deserialize;
use serde_json::json;
use std::time::{Duration, Instant};

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/accounts", post(create_account))
        .route("/v1/accounts/{id}", get(get_account))
        .route("/v1/orders", post(create_order))
        .route("/v1/orders/{id}", get(get_order))
        .route("/v1/orders/{id}/deduct", post(deduct))
        .route("/v1/orders/{id}/refunds", post(refund))
        .route("/v1/orders/{id}/authorize", post(authorize))
        .route("/v1/orders/{id}/capture", post(capture))
        .route("/v1/orders/{id}/void", post(void))
        .route("/v1/orders/{id}/entries", get(entries))
        .route("/v1/events", get(crate::outbox::feed::events))
        .route(
            "/v1/webhook_endpoints",
            post(crate::outbox::endpoints::create).get(crate::outbox::endpoints::list),
        )
        .route(
            "/v1/webhook_endpoints/{id}",
            axum::routing::delete(crate::outbox::endpoints::delete),
        )
        .route(
            "/v1/webhook_endpoints/{id}/deliveries",
            get(crate::outbox::endpoints::deliveries),
        )
        .route(
            "/v1/webhook_endpoints/{id}/deliveries/{event_id}/retry",
            post(crate::outbox::endpoints::retry),
        )
        .route("/v1/audit", get(audit))
        .route("/healthz", get(healthz))
        .route("/metrics", get(crate::metrics::render))
        .route("/openapi.json", get(crate::openapi::serve))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.keys.clone(),
            require_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.limits.clone(),
            crate::limits::enforce,
        ))
        .layer(DefaultBodyLimit::max(state.limits.body_bytes_max))
        .route_layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ))
        .layer(axum::middleware::from_fn(request_id))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

fn id_err(e: IdError) -> ApiError {
    ApiError::invalid(e.to_string())
}

fn money_err(field: &str, e: MoneyError) -> ApiError {
    ApiError::invalid(format!("{field}: {e}"))
}

fn path_id<T>(
    path: Result<Path<String>, PathRejection>,
    parse: fn(&str) -> Result<T, IdError>,
) -> Result<T, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::invalid(e.body_text()))?;
    parse(&raw).map_err(id_err)
}

/// What every money-moving POST carries besides its op: who and what asked
/// (for the Idempotency-Key fingerprint) and the body, read within its limit.
pub(crate) struct Post {
    req: RequestId,
    principal: Principal,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for Post {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let (method, uri, headers) = (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        );
        let req_id = parts.extensions.get::<RequestId>().cloned();
        let principal = parts.extensions.get::<Principal>().cloned();
        let (Some(req_id), Some(principal)) = (req_id, principal) else {
            return Err(ApiError::internal(
                &"request id or principal middleware missing",
            ));
        };
        let body = body_bytes(
            Bytes::from_request(axum::extract::Request::from_parts(parts, body), state).await,
        )?;
        Ok(Post {
            req: req_id,
            principal,
            method,
            uri,
            headers,
            body,
        })
    }
}

impl Post {
    /// Runs `op`: under its Idempotency-Key if it has one, with the request
    /// timeout as the deadline for reaching the store.
    async fn run(self, state: &AppState, op: Op) -> Response {
        let deadline =
            Some(Instant::now() + Duration::from_millis(state.limits.request_timeout_ms));
        let key = match idempotency::key_from(&self.headers) {
            Ok(k) => k,
            Err(e) => return e.into_response(),
        };
        match key {
            None => render::respond(state.engine.submit_by(op, self.req, deadline).await),
            Some(key) => {
                let keyed = idempotency::Keyed {
                    scope: &self.principal.0,
                    fingerprint: idempotency::fingerprint(
                        self.method.as_str(),
                        self.uri.path(),
                        &self.body,
                    ),
                    key,
                };
                idempotency::run(state, self.req, keyed, op, deadline).await
            }
        }
    }
}

/// Opens an account with an opening balance.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateAccountBody {
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$", example = "alice")]
    id: String,
    /// Opening balance in minor units.
    #[schema(minimum = 0, maximum = 9007199254740991_i64, example = 5000000)]
    balance: i64,
    /// ISO 4217-style code; default CNY.
    #[serde(default)]
    #[schema(pattern = "^[A-Z]{3}$", example = "CNY")]
    currency: Option<String>,
}

#[utoipa::path(post, path = "/v1/accounts", tag = "accounts", request_body = CreateAccountBody,
    params(crate::openapi::IdempotencyKey),
    responses(
        (status = 201, description = "Created", body = payguard::domain::Account,
            links(("GetAccount" = (operation_id = "get_account", parameters(("id" = "$response.body#/id")))))),
        (status = 200, description = "The same body again: the account as it is now", body = payguard::domain::Account),
        (status = 409, description = "`account_exists`", body = crate::openapi::ErrorBody),
        crate::openapi::PostErrors))]
pub(crate) async fn create_account(
    State(state): State<AppState>,
    post: Post,
) -> Result<Response, ApiError> {
    let op = create_account_op(&post.headers, &post.body)?;
    Ok(post.run(&state, op).await)
}

/// The op of a `POST /v1/accounts` body: 415, 400 or 422 when it is not a JSON
/// object of the right shape with a valid id, balance and currency. Handlers and
/// the fuzz targets ([`crate::fuzzing`]) call exactly this.
pub fn create_account_op(headers: &HeaderMap, body: &Bytes) -> Result<Op, ApiError> {
    let parsed: CreateAccountBody = json_body(headers, body)?;
    Ok(Op::CreateAccount {
        id: AccountId::parse(&parsed.id).map_err(id_err)?,
        balance: Money::balance(parsed.balance).map_err(|e| money_err("balance", e))?,
        currency: match parsed.currency {
            Some(c) => Currency::parse(&c).map_err(id_err)?,
            None => Currency::CNY,
        },
    })
}

#[utoipa::path(get, path = "/v1/accounts/{id}", tag = "accounts", params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,64}$")),
    responses((status = 200, description = "The account", body = payguard::domain::Account), crate::openapi::GetErrors))]
pub(crate) async fn get_account(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(path, AccountId::parse)?;
    match state.engine.account(id).await? {
        Some(a) => Ok(Json(a).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "account_not_found",
            "no such account",
        )),
    }
}

/// Creates an order in status PREPARE.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateOrderBody {
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$", example = "OD20240517A1122")]
    id: String,
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$", example = "alice")]
    account_id: String,
    /// Amount in minor units.
    #[schema(minimum = 1, maximum = 9007199254740991_i64, example = 1185000)]
    amount: i64,
}

#[utoipa::path(post, path = "/v1/orders", tag = "orders", request_body = CreateOrderBody,
    params(crate::openapi::IdempotencyKey),
    responses(
        (status = 201, description = "Created in PREPARE", body = payguard::domain::Order,
            links(
                ("GetOrder" = (operation_id = "get_order", parameters(("id" = "$response.body#/id")))),
                ("Deduct" = (operation_id = "deduct", parameters(("id" = "$response.body#/id")))),
                ("Entries" = (operation_id = "entries", parameters(("id" = "$response.body#/id")))),
                ("GetAccount" = (operation_id = "get_account", parameters(("id" = "$response.body#/account_id")))))),
        (status = 200, description = "The same body again", body = payguard::domain::Order),
        (status = 409, description = "`order_exists`", body = crate::openapi::ErrorBody),
        crate::openapi::PostErrors))]
pub(crate) async fn create_order(
    State(state): State<AppState>,
    post: Post,
) -> Result<Response, ApiError> {
    let op = create_order_op(&post.headers, &post.body)?;
    Ok(post.run(&state, op).await)
}

/// The op of a `POST /v1/orders` body (415, 400 or 422 otherwise).
pub fn create_order_op(headers: &HeaderMap, body: &Bytes) -> Result<Op, ApiError> {
    let parsed: CreateOrderBody = json_body(headers, body)?;
    Ok(Op::CreateOrder {
        id: OrderId::parse(&parsed.id).map_err(id_err)?,
        account_id: AccountId::parse(&parsed.account_id).map_err(id_err)?,
        amount: Money::amount(parsed.amount).map_err(|e| money_err("amount", e))?,
    })
}

#[utoipa::path(get, path = "/v1/orders/{id}", tag = "orders", params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,64}$")),
    responses((status = 200, description = "The order", body = payguard::domain::Order), crate::openapi::GetErrors))]
pub(crate) async fn get_order(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(path, OrderId::parse)?;
    match state.engine.order(id).await? {
        Some(o) => Ok(Json(o).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "order_not_found",
            "no such order",
        )),
    }
}

/// `deduct` takes no parameters; `{}` is accepted so clients that always send a
/// JSON object work, and anything in it is an unknown field (422).
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeductBody {}

#[utoipa::path(post, path = "/v1/orders/{id}/deduct", tag = "orders", request_body(content = Option<DeductBody>, description = "No body, or `{}`"),
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,64}$"), crate::openapi::IdempotencyKey),
    responses(
        (status = 200, description = "Charged exactly once; duplicates get `replayed: true` and the same entry", body = crate::openapi::MovementDoc,
            links(
                ("DeductAgain" = (operation_id = "deduct", parameters(("id" = "$response.body#/order/id")))),
                ("Refund" = (operation_id = "refund", parameters(("id" = "$response.body#/order/id")))),
                ("Entries" = (operation_id = "entries", parameters(("id" = "$response.body#/order/id")))),
                ("GetOrder" = (operation_id = "get_order", parameters(("id" = "$response.body#/order/id")))))),
        (status = 402, description = "`insufficient_funds`: the order is FAILED, and stays so", body = crate::openapi::ErrorBody),
        (status = 409, description = "`idempotency_key_in_use`", body = crate::openapi::ErrorBody),
        crate::openapi::PostErrors))]
pub(crate) async fn deduct(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    post: Post,
) -> Result<Response, ApiError> {
    let order_id = path_id(path, OrderId::parse)?;
    let op = deduct_op(order_id, &post.headers, &post.body)?;
    Ok(post.run(&state, op).await)
}

/// The op of a `POST /v1/orders/{id}/deduct` body: none, `{}` or `null` (415,
/// 400 or 422 otherwise).
pub fn deduct_op(order_id: OrderId, headers: &HeaderMap, body: &Bytes) -> Result<Op, ApiError> {
    // `null` is the JSON for "no body" too (the OpenAPI body is optional).
    let _: Option<DeductBody> = optional_json_body::<Option<DeductBody>>(headers, body)?;
    Ok(Op::Deduct { order_id })
}

/// Holds an order's amount: no body, `{}` or `{"hold_ttl_s": n}`.
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthorizeBody {
    /// Seconds until the hold expires (default: the server's `--hold-ttl`, 7 days).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2592000, example = 3600)]
    hold_ttl_s: Option<i64>,
}

#[utoipa::path(post, path = "/v1/orders/{id}/authorize", tag = "two-phase", request_body(content = Option<AuthorizeBody>, description = "No body, `{}` or `{\"hold_ttl_s\": n}`"),
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,64}$"), crate::openapi::IdempotencyKey),
    responses(
        (status = 200, description = "Held exactly once; duplicates get `replayed: true` and the same hold entry", body = crate::openapi::MovementDoc,
            links(
                ("Capture" = (operation_id = "capture", parameters(("id" = "$response.body#/order/id")))),
                ("Void" = (operation_id = "void", parameters(("id" = "$response.body#/order/id")))),
                ("AuthorizeAgain" = (operation_id = "authorize", parameters(("id" = "$response.body#/order/id")))),
                ("GetOrder" = (operation_id = "get_order", parameters(("id" = "$response.body#/order/id")))))),
        (status = 402, description = "`insufficient_funds`: not enough available; the order is FAILED", body = crate::openapi::ErrorBody),
        (status = 409, description = "`order_not_authorized` (paid in one step), `idempotency_key_in_use`", body = crate::openapi::ErrorBody),
        crate::openapi::PostErrors))]
pub(crate) async fn authorize(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    post: Post,
) -> Result<Response, ApiError> {
    let order_id = path_id(path, OrderId::parse)?;
    let op = authorize_op(
        order_id,
        &post.headers,
        &post.body,
        state.two_phase.hold_ttl_ms,
    )?;
    Ok(post.run(&state, op).await)
}

/// The op of a `POST /v1/orders/{id}/authorize` body; `default_ttl_ms` when it
/// names no TTL.
pub fn authorize_op(
    order_id: OrderId,
    headers: &HeaderMap,
    body: &Bytes,
    default_ttl_ms: i64,
) -> Result<Op, ApiError> {
    let parsed: Option<AuthorizeBody> = optional_json_body(headers, body)?;
    let hold_ttl_ms = match parsed.and_then(|b| b.hold_ttl_s) {
        None => default_ttl_ms,
        Some(s) if (1..=crate::HOLD_TTL_S_MAX).contains(&s) => s * 1000,
        Some(s) => {
            return Err(ApiError::invalid(format!(
                "hold_ttl_s: {s} is not within 1..={}",
                crate::HOLD_TTL_S_MAX
            )))
        }
    };
    Ok(Op::Authorize {
        order_id,
        hold_ttl_ms,
    })
}

/// Captures all or part of a hold: no body, `{}` or `{"amount": n}`.
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CaptureBody {
    /// Minor units, 1..=the held amount (default: all of it).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 9007199254740991_i64, example = 500)]
    amount: Option<i64>,
}

#[utoipa::path(post, path = "/v1/orders/{id}/capture", tag = "two-phase", request_body(content = Option<CaptureBody>, description = "No body, `{}` or `{\"amount\": n}`"),
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,64}$"), crate::openapi::IdempotencyKey),
    responses(
        (status = 200, description = "Captured exactly once (the rest of the hold released); the same capture again replays", body = crate::openapi::MovementDoc,
            links(
                ("Refund" = (operation_id = "refund", parameters(("id" = "$response.body#/order/id")))),
                ("Entries" = (operation_id = "entries", parameters(("id" = "$response.body#/order/id")))),
                ("GetOrder" = (operation_id = "get_order", parameters(("id" = "$response.body#/order/id")))))),
        (status = 409, description = "`capture_exceeds_hold`, `hold_already_captured`, `hold_voided`, `hold_expired`, `order_not_authorized`, `idempotency_key_in_use`", body = crate::openapi::ErrorBody),
        crate::openapi::PostErrors))]
pub(crate) async fn capture(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    post: Post,
) -> Result<Response, ApiError> {
    let order_id = path_id(path, OrderId::parse)?;
    let op = capture_op(order_id, &post.headers, &post.body)?;
    Ok(post.run(&state, op).await)
}

/// The op of a `POST /v1/orders/{id}/capture` body (an amount of 0 or less, or
/// not an integer: 422).
pub fn capture_op(order_id: OrderId, headers: &HeaderMap, body: &Bytes) -> Result<Op, ApiError> {
    let parsed: Option<CaptureBody> = optional_json_body(headers, body)?;
    let amount = parsed
        .and_then(|b| b.amount)
        .map(|n| Money::amount(n).map_err(|e| money_err("amount", e)))
        .transpose()?;
    Ok(Op::Capture { order_id, amount })
}

#[utoipa::path(post, path = "/v1/orders/{id}/void", tag = "two-phase", request_body(content = Option<DeductBody>, description = "No body, or `{}`"),
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,64}$"), crate::openapi::IdempotencyKey),
    responses(
        (status = 200, description = "The hold released exactly once; again: a replay", body = crate::openapi::MovementDoc,
            links(
                ("Entries" = (operation_id = "entries", parameters(("id" = "$response.body#/order/id")))),
                ("GetOrder" = (operation_id = "get_order", parameters(("id" = "$response.body#/order/id")))))),
        (status = 409, description = "`hold_already_captured`, `hold_expired`, `order_not_authorized`, `idempotency_key_in_use`", body = crate::openapi::ErrorBody),
        crate::openapi::PostErrors))]
pub(crate) async fn void(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    post: Post,
) -> Result<Response, ApiError> {
    let order_id = path_id(path, OrderId::parse)?;
    let _: Option<DeductBody> = optional_json_body(&post.headers, &post.body)?;
    Ok(post.run(&state, Op::Void { order_id }).await)
}

/// Gives back part or all of a paid order's amount.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefundBody {
    /// The refund's id: it moves money at most once, forever.
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$", example = "rf-1")]
    id: String,
    #[schema(minimum = 1, maximum = 9007199254740991_i64, example = 500)]
    amount: i64,
}

/// Refunds part or all of a paid order.
///
/// Where API.md is silent (decided once, in the store's money rules, for both
/// stores): a refund whose credit would overflow the account's signed 64-bit
/// balance (impossible unless the balance was edited by hand, since refunds never
/// exceed what was charged) is refused with 500 `internal`; nothing moves, no
/// Idempotency-Key response is stored, and a later retry is answered afresh.
#[utoipa::path(post, path = "/v1/orders/{id}/refunds", tag = "orders", request_body = RefundBody,
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,64}$"), crate::openapi::IdempotencyKey),
    responses(
        (status = 200, description = "Refunded once per refund id", body = crate::openapi::MovementDoc),
        (status = 409, description = "`refund_exists`, `refund_exceeds_paid`, `order_not_paid`, `idempotency_key_in_use`", body = crate::openapi::ErrorBody),
        crate::openapi::PostErrors))]
pub(crate) async fn refund(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    post: Post,
) -> Result<Response, ApiError> {
    let order_id = path_id(path, OrderId::parse)?;
    let op = refund_op(order_id, &post.headers, &post.body)?;
    Ok(post.run(&state, op).await)
}

/// The op of a `POST /v1/orders/{id}/refunds` body (415, 400 or 422 otherwise).
pub fn refund_op(order_id: OrderId, headers: &HeaderMap, body: &Bytes) -> Result<Op, ApiError> {
    let parsed: RefundBody = json_body(headers, body)?;
    Ok(Op::Refund {
        order_id,
        refund_id: RefundId::parse(&parsed.id).map_err(id_err)?,
        amount: Money::amount(parsed.amount).map_err(|e| money_err("amount", e))?,
    })
}

#[utoipa::path(get, path = "/v1/orders/{id}/entries", tag = "orders", params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,64}$")),
    responses((status = 200, description = "The order's ledger entries in commit order", body = crate::openapi::EntriesDoc), crate::openapi::GetErrors))]
pub(crate) async fn entries(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(path, OrderId::parse)?;
    match state.engine.entries(id).await? {
        Some(entries) => Ok(Json(json!({ "entries": entries })).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "order_not_found",
            "no such order",
        )),
    }
}

#[utoipa::path(get, path = "/v1/audit", tag = "operations",
    responses((status = 200, description = "Invariant checks over the whole database", body = payguard::domain::AuditReport), crate::openapi::GetErrors))]
pub(crate) async fn audit(State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(state.engine.audit().await?).into_response())
}

#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "Alive", body = crate::openapi::HealthDoc)))]
pub(crate) async fn healthz(State(state): State<AppState>) -> Response {
    Json(json!({
        "status": "ok",
        "store": state.engine.store().kind(),
        "lock": state.info.lock,
        "guard": state.info.guard,
        "instance": state.info.instance,
    }))
    .into_response()
}

#[cfg(test)]
mod fuzz {
    //! Request parsing must never panic and never accept what is not a JSON
    //! object of the right shape, whatever bytes arrive.
    use super::*;
    use crate::request::{json_body, optional_json_body};
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(ct) {
            h.insert(axum::http::header::CONTENT_TYPE, v);
        }
        h
    }

    fn status(e: &ApiError) -> u16 {
        e.status.as_u16()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512), ct in "[ -~]{0,40}") {
            let h = headers(&ct);
            let b = Bytes::from(body);
            for r in [
                json_body::<CreateAccountBody>(&h, &b).err(),
                json_body::<CreateOrderBody>(&h, &b).err(),
                json_body::<RefundBody>(&h, &b).err(),
                optional_json_body::<Option<DeductBody>>(&h, &b).err(),
                optional_json_body::<Option<AuthorizeBody>>(&h, &b).err(),
                optional_json_body::<Option<CaptureBody>>(&h, &b).err(),
            ].into_iter().flatten() {
                prop_assert!(matches!(status(&r), 400 | 415 | 422), "{}", status(&r));
            }
        }

        #[test]
        fn json_of_the_wrong_shape_is_422(v in proptest::arbitrary::any::<i64>(), s in "[a-z]{0,8}", arr in proptest::collection::vec(any::<i32>(), 0..4)) {
            let h = headers("application/json");
            for body in [
                serde_json::json!(v).to_string(),
                serde_json::json!(s).to_string(),
                serde_json::json!(arr).to_string(),
                serde_json::json!({"id": s, "balance": v, "extra": 1}).to_string(),
                serde_json::json!({"id": v, "balance": s}).to_string(),
            ] {
                let b = Bytes::from(body.clone());
                let r = json_body::<CreateAccountBody>(&h, &b);
                prop_assert!(r.is_err(), "{body} was accepted");
                prop_assert_eq!(status(&r.err().unwrap()), 422, "{}", body);
            }
        }
    }
}
