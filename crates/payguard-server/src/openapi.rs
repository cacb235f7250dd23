//! `/openapi.json`: the OpenAPI 3 document of API.md, generated from the handlers
//! (utoipa), complete enough for schemathesis to drive every route.

use crate::routes::{
    AuthorizeBody, CaptureBody, CreateAccountBody, CreateOrderBody, DeductBody, RefundBody,
};
use axum::response::{IntoResponse, Response};
use payguard::domain::{
    Account, AuditReport, BalanceMismatch, DuplicateDebit, Entry, EntryKind, HeldMismatch,
    NegativeBalance, Order, OrderStatus, OverRefund, PaidMismatch, Resolved,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, ToSchema};

/// Every error: `{"error": {"code", "message"}}`.
#[derive(ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(ToSchema)]
pub struct ErrorDetail {
    /// A stable snake_case code, e.g. `insufficient_funds`.
    pub code: String,
    /// Text for a person.
    pub message: String,
}

/// The answer of deduct and refund.
#[derive(ToSchema)]
pub struct MovementDoc {
    pub order: Order,
    pub entry: Entry,
    /// True for every answer but the one that moved the money.
    pub replayed: bool,
}

#[derive(ToSchema)]
pub struct EntriesDoc {
    pub entries: Vec<Entry>,
}

#[derive(ToSchema)]
pub struct HealthDoc {
    pub status: String,
    /// `sqlite` or `postgres`.
    pub store: String,
    /// `local` or `redis`.
    pub lock: String,
    /// `full`, `seed` or `naive`.
    pub guard: String,
    pub instance: String,
}

/// Any POST may carry an Idempotency-Key (scoped to the API key).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKey {
    /// 1..=255 printable ASCII characters; replays the first response for 24 h.
    #[param(rename = "Idempotency-Key", pattern = "^[ -~]{1,255}$")]
    #[allow(dead_code)]
    idempotency_key: Option<String>,
}

/// The errors every money-moving POST may answer.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum PostErrors {
    /// `invalid_json`: malformed JSON
    #[response(status = 400)]
    InvalidJson(ErrorBody),
    /// `unauthorized`: missing or wrong API key
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// `*_not_found`
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// `request_timeout`: the body did not arrive within the body deadline; nothing
    /// moved, and the connection is closed
    #[response(status = 408)]
    BodyTimeout(ErrorBody),
    /// `body_too_large`: over 64 KiB
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// `unsupported_media_type`: not application/json
    #[response(status = 415)]
    MediaType(ErrorBody),
    /// `invalid_request` (wrong shape, bad id or amount) or `idempotency_key_reuse`
    #[response(status = 422)]
    Invalid(ErrorBody),
    /// `headers_too_large`
    #[response(status = 431)]
    HeadersTooLarge(ErrorBody),
    /// `internal`: never expected; quote the X-Request-Id
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `unavailable`: store down, queue full, timed out before any change, or a lock lost
    /// to another instance (message `stale_fencing_token: …`); nothing moved
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The errors every GET may answer.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum GetErrors {
    /// `unauthorized`
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// `*_not_found`
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// `invalid_request`: a bad id
    #[response(status = 422)]
    Invalid(ErrorBody),
    /// `headers_too_large`
    #[response(status = 431)]
    HeadersTooLarge(ErrorBody),
    /// `internal`
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `unavailable`
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "payguard",
        version = "1",
        description = "Deduct and refund money exactly once per order, in one step (deduct) or two (authorize a hold, then capture, void or let it expire). Money is integer minor units; \
                       every error is {\"error\": {\"code\", \"message\"}}; every response carries X-Request-Id."
    ),
    paths(
        crate::routes::create_account,
        crate::routes::get_account,
        crate::routes::create_order,
        crate::routes::get_order,
        crate::routes::deduct,
        crate::routes::refund,
        crate::routes::authorize,
        crate::routes::capture,
        crate::routes::void,
        crate::routes::entries,
        crate::outbox::feed::events,
        crate::outbox::endpoints::create,
        crate::outbox::endpoints::list,
        crate::outbox::endpoints::delete,
        crate::outbox::endpoints::deliveries,
        crate::outbox::endpoints::retry,
        crate::routes::audit,
        crate::routes::healthz,
    ),
    components(schemas(
        CreateAccountBody, CreateOrderBody, DeductBody, RefundBody, AuthorizeBody, CaptureBody,
        ErrorBody, ErrorDetail, MovementDoc, EntriesDoc, HealthDoc, Account, Order, Entry,
        OrderStatus, EntryKind, AuditReport, DuplicateDebit, OverRefund, BalanceMismatch,
        NegativeBalance, PaidMismatch, HeldMismatch, Resolved,
        crate::outbox::feed::EventsDoc, crate::outbox::feed::EventDoc,
        crate::outbox::feed::EventDataDoc, payguard::domain::EventType,
        crate::outbox::endpoints::CreateEndpointBody, crate::outbox::endpoints::EndpointDoc,
        crate::outbox::endpoints::CreatedEndpointDoc, crate::outbox::endpoints::EndpointsDoc,
        crate::outbox::endpoints::AttemptDoc, crate::outbox::endpoints::DeliveryDoc,
        crate::outbox::endpoints::DeliveriesDoc,
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

pub async fn serve() -> Response {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    axum::Json(DOC.get_or_init(document)).into_response()
}

/// The OpenAPI document as served. utoipa 5.5 writes a Link Object's fields in
/// snake case (`operation_id`), which OpenAPI tools reject (schemathesis: "missing
/// both 'operationRef' and 'operationId'"), so they are renamed to the spec's
/// camel case here.
pub fn document() -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serialises");
    let responses = doc["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
        .filter_map(|op| op.get_mut("responses").and_then(|r| r.as_object_mut()))
        .flat_map(|responses| responses.values_mut());
    for response in responses {
        let Some(links) = response.get_mut("links").and_then(|l| l.as_object_mut()) else {
            continue;
        };
        for link in links.values_mut().filter_map(|l| l.as_object_mut()) {
            for (from, to) in [
                ("operation_id", "operationId"),
                ("operation_ref", "operationRef"),
                ("request_body", "requestBody"),
            ] {
                if let Some(v) = link.remove(from) {
                    link.insert(to.to_owned(), v);
                }
            }
        }
    }
    doc
}
