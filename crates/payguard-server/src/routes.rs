//! The routes of API.md. Handlers validate at the edge (ids, money, shapes), hand
//! one [`Op`] to the engine, and map its answer; they hold no state of their own.

use crate::error::ApiError;
use crate::request::{body_bytes, json_body, optional_json_body, request_id, BODY_BYTES_MAX};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use payguard::domain::{
    AccountId, Currency, Entry, IdError, Money, MoneyError, Order, OrderId, RefundId, RequestId,
};
use payguard::store::{Op, Output};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/accounts", post(create_account))
        .route("/v1/accounts/{id}", get(get_account))
        .route("/v1/orders", post(create_order))
        .route("/v1/orders/{id}", get(get_order))
        .route("/v1/orders/{id}/deduct", post(deduct))
        .route("/v1/orders/{id}/refunds", post(refund))
        .route("/v1/orders/{id}/entries", get(entries))
        .route("/v1/audit", get(audit))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
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

async fn run(state: &AppState, op: Op, req: RequestId) -> Result<Output, ApiError> {
    Ok(state.engine.submit(op, req).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccountBody {
    id: String,
    balance: i64,
    #[serde(default)]
    currency: Option<String>,
}

async fn create_account(
    State(state): State<AppState>,
    Extension(req): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: CreateAccountBody = json_body(&headers, &body_bytes(body)?)?;
    let op = Op::CreateAccount {
        id: AccountId::parse(&body.id).map_err(id_err)?,
        balance: Money::balance(body.balance).map_err(|e| money_err("balance", e))?,
        currency: match body.currency {
            Some(c) => Currency::parse(&c).map_err(id_err)?,
            None => Currency::CNY,
        },
    };
    match run(&state, op, req).await? {
        Output::Account { account, created } => Ok((
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            Json(account),
        )
            .into_response()),
        other => Err(ApiError::internal(&format!(
            "create account answered {other:?}"
        ))),
    }
}

async fn get_account(
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateOrderBody {
    id: String,
    account_id: String,
    amount: i64,
}

async fn create_order(
    State(state): State<AppState>,
    Extension(req): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: CreateOrderBody = json_body(&headers, &body_bytes(body)?)?;
    let op = Op::CreateOrder {
        id: OrderId::parse(&body.id).map_err(id_err)?,
        account_id: AccountId::parse(&body.account_id).map_err(id_err)?,
        amount: Money::amount(body.amount).map_err(|e| money_err("amount", e))?,
    };
    match run(&state, op, req).await? {
        Output::Order { order, created } => Ok((
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            Json(order),
        )
            .into_response()),
        other => Err(ApiError::internal(&format!(
            "create order answered {other:?}"
        ))),
    }
}

async fn get_order(
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

/// The answer of deduct and refund, fields in API.md's order.
#[derive(Serialize)]
struct MovementBody {
    order: Order,
    entry: Entry,
    replayed: bool,
}

fn movement(out: Output) -> Result<Response, ApiError> {
    match out {
        Output::Movement {
            order,
            entry,
            replayed,
        } => Ok(Json(MovementBody {
            order,
            entry,
            replayed,
        })
        .into_response()),
        other => Err(ApiError::internal(&format!("movement answered {other:?}"))),
    }
}

/// `deduct` takes no parameters; `{}` is accepted so clients that always send a
/// JSON object work, and anything in it is an unknown field (422).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeductBody {}

async fn deduct(
    State(state): State<AppState>,
    Extension(req): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let order_id = path_id(path, OrderId::parse)?;
    let DeductBody {} = optional_json_body(&headers, &body_bytes(body)?)?;
    movement(run(&state, Op::Deduct { order_id }, req).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundBody {
    id: String,
    amount: i64,
}

async fn refund(
    State(state): State<AppState>,
    Extension(req): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let order_id = path_id(path, OrderId::parse)?;
    let body: RefundBody = json_body(&headers, &body_bytes(body)?)?;
    let op = Op::Refund {
        order_id,
        refund_id: RefundId::parse(&body.id).map_err(id_err)?,
        amount: Money::amount(body.amount).map_err(|e| money_err("amount", e))?,
    };
    movement(run(&state, op, req).await?)
}

async fn entries(
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

async fn audit(State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(state.engine.audit().await?).into_response())
}

async fn healthz(State(state): State<AppState>) -> Response {
    Json(json!({
        "status": "ok",
        "store": state.engine.store().kind(),
        "lock": state.info.lock,
        "guard": state.info.guard,
        "instance": state.info.instance,
    }))
    .into_response()
}
