//! One rendering of every op result, used both for the response sent and for the
//! response stored under an Idempotency-Key, so a replay is byte for byte the
//! first answer.

use crate::error::ApiError;
use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use payguard::domain::{Entry, Order};
use payguard::store::{OpResult, Output};
use payguard::EngineError;
use serde::Serialize;

/// The answer of deduct and refund, fields in API.md's order.
#[derive(Serialize)]
struct MovementBody<'a> {
    order: &'a Order,
    entry: &'a Entry,
    replayed: bool,
}

pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn output_bytes(out: &Output) -> (StatusCode, Vec<u8>) {
    let (status, body) = match out {
        Output::Account { account, created } => (
            if *created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            serde_json::to_vec(account),
        ),
        Output::Order { order, created } => (
            if *created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            serde_json::to_vec(order),
        ),
        Output::Movement {
            order,
            entry,
            replayed,
        } => (
            StatusCode::OK,
            serde_json::to_vec(&MovementBody {
                order,
                entry,
                replayed: *replayed,
            }),
        ),
    };
    match body {
        Ok(b) => (status, b),
        Err(e) => {
            let err = ApiError::internal(&e);
            (err.status, err.body_bytes())
        }
    }
}

/// What to store for a result, or `None` when it must not be stored (a refusal
/// by the database is a 500: it did nothing and may be retried); which ones,
/// payguard decides ([`payguard::engine::keyed::stored_answer`]).
pub fn storable(result: &OpResult) -> Option<(u16, Vec<u8>)> {
    payguard::engine::keyed::stored_answer(
        result,
        |out| {
            let (s, b) = output_bytes(out);
            (s.as_u16(), b)
        },
        |r| {
            let e = ApiError::from(r);
            (e.status.as_u16(), e.body_bytes())
        },
    )
}

/// The response to an engine result.
pub fn respond(result: Result<Output, EngineError>) -> Response {
    match result {
        Ok(out) => {
            let (s, b) = output_bytes(&out);
            json_response(s, b)
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}
