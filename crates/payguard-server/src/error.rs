//! The one error type of the HTTP boundary, and the exhaustive mapping of engine
//! and store errors onto API.md's statuses and codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use payguard::store::Rejection;
use payguard::{EngineError, StoreError};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// A failure that should never happen. The detail is logged; the client is told
    /// only to quote the request id.
    pub fn internal(detail: &dyn std::fmt::Display) -> Self {
        tracing::error!(event = "internal_error", detail = %detail);
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; quote the X-Request-Id when reporting it",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::render::json_response(self.status, self.body_bytes())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) | StoreError::Closed => {
                tracing::warn!(event = "store_unavailable", detail = %e);
                ApiError::unavailable("the store is unavailable; nothing was changed, retry later")
            }
            StoreError::Schema(_) => ApiError::internal(&e),
            StoreError::Unknown(_) => {
                tracing::error!(event = "store_outcome_unknown", detail = %e);
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the database did not confirm whether this committed; retry the same request to read back its outcome",
                )
            }
        }
    }
}

impl From<&Rejection> for ApiError {
    fn from(r: &Rejection) -> Self {
        use StatusCode as S;
        match r {
            Rejection::AccountExists => ApiError::new(
                S::CONFLICT,
                "account_exists",
                "an account with this id exists with another opening balance or currency",
            ),
            Rejection::AccountNotFound => {
                ApiError::new(S::NOT_FOUND, "account_not_found", "no such account")
            }
            Rejection::OrderExists => ApiError::new(
                S::CONFLICT,
                "order_exists",
                "an order with this id exists with another account or amount",
            ),
            Rejection::OrderNotFound => {
                ApiError::new(S::NOT_FOUND, "order_not_found", "no such order")
            }
            Rejection::InsufficientFunds => ApiError::new(
                S::PAYMENT_REQUIRED,
                "insufficient_funds",
                "the account's balance does not cover the order; the order is FAILED",
            ),
            Rejection::OrderNotPaid => ApiError::new(
                S::CONFLICT,
                "order_not_paid",
                "only a PAID or PARTIALLY_REFUNDED order can be refunded",
            ),
            Rejection::RefundExists => ApiError::new(
                S::CONFLICT,
                "refund_exists",
                "this refund id was already used with another order or amount",
            ),
            Rejection::RefundExceedsPaid => ApiError::new(
                S::CONFLICT,
                "refund_exceeds_paid",
                "the refunds of this order would exceed what was paid (its amount, or what its capture took)",
            ),
            Rejection::OrderNotAuthorized => ApiError::new(
                S::CONFLICT,
                "order_not_authorized",
                "the order was not authorized (it is PREPARE, FAILED, or paid in one step by deduct)",
            ),
            Rejection::OrderAuthorized => ApiError::new(
                S::CONFLICT,
                "order_authorized",
                "the order took the two-phase path (authorize); capture or void it instead",
            ),
            Rejection::CaptureExceedsHold => ApiError::new(
                S::CONFLICT,
                "capture_exceeds_hold",
                "the capture would exceed the amount held; nothing moved",
            ),
            Rejection::HoldAlreadyCaptured => ApiError::new(
                S::CONFLICT,
                "hold_already_captured",
                "the hold was already captured (with another amount, if this was a capture)",
            ),
            Rejection::HoldVoided => ApiError::new(S::CONFLICT, "hold_voided", "the hold was voided"),
            Rejection::HoldExpired => ApiError::new(
                S::CONFLICT,
                "hold_expired",
                "the hold expired at hold_expires_at; nothing moved",
            ),
            // This request wrote the expiry (the hold's release) as it refused:
            // the same answer as above, and no money left the balance.
            Rejection::HoldLapsed => ApiError::new(
                S::CONFLICT,
                "hold_expired",
                "the hold expired at hold_expires_at and is released; nothing was captured",
            ),
            // Only the expiry sweeper asks for an expiry; a clock behind the one
            // that found the hold due gets this, and nothing moved.
            Rejection::HoldNotExpired => {
                ApiError::unavailable("the hold has not expired yet; nothing moved, retry later")
            }
            Rejection::Refused(detail) => ApiError::internal(detail),
            // Nothing moved and a retry gets the order's real outcome, so this is
            // a 503 (API.md: "the request did nothing and may be retried"); the
            // message names the reason, as the log does.
            Rejection::StaleFencingToken => ApiError::unavailable(
                "stale_fencing_token: this instance's lock on the order expired before it \
                 wrote and another holder took over; nothing moved, retry",
            ),
            Rejection::LockBusy => ApiError::unavailable(
                "the order's lock is held by another instance; nothing moved, retry",
            ),
            // Never a client's answer: the keyed sequence answers the key's
            // stored response instead (`payguard::engine::keyed`). Should it
            // ever get here, nothing was written and the same request, retried
            // with its key, reads the stored answer.
            Rejection::KeyAnswered => ApiError::unavailable(
                "this request was already answered; retry it with the same Idempotency-Key to read its answer",
            ),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Rejected(r) => ApiError::from(&r),
            EngineError::Overloaded => ApiError::unavailable(
                "too many requests queued for this order's lane; nothing was changed, retry later",
            ),
            EngineError::TimedOut => ApiError::unavailable(
                "the request timed out before it reached the store; nothing was changed, retry",
            ),
            EngineError::ShuttingDown => {
                ApiError::unavailable("the server is shutting down; nothing was changed")
            }
            EngineError::Store(s) => s.into(),
        }
    }
}

impl ApiError {
    /// The JSON body bytes of this error, as sent and as stored for replays.
    pub fn body_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({"error": {"code": self.code, "message": self.message}}))
            .unwrap_or_default()
    }
}
