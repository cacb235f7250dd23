//! Request plumbing: request ids, JSON bodies with API.md's error statuses.

use crate::connections::BodyError;
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use payguard::domain::RequestId;
use serde::de::DeserializeOwned;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The span every request is served in; its `req` field is the request id, and
/// the log format puts it on every line logged inside it.
pub const REQUEST_SPAN: &str = "request";

/// Takes the caller's `X-Request-Id` when it is a valid id, else makes one, and
/// puts it on the request (for handlers and logs) and on the response.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| RequestId::parse(s).ok())
        .unwrap_or_else(|| {
            RequestId::parse(&uuid::Uuid::new_v4().simple().to_string())
                .expect("a simple uuid is a valid id")
        });
    req.extensions_mut().insert(id.clone());
    let span = tracing::info_span!(REQUEST_SPAN, req = %id);
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    if let Ok(v) = HeaderValue::from_str(id.as_str()) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.len() > 5
            && essence[..essence.len() - 5].contains('/')
            && essence.to_ascii_lowercase().ends_with("+json"))
}

/// The connection layer's reason a body could not be read, if that is why.
fn body_error(e: &BytesRejection) -> Option<&BodyError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(found) = err.downcast_ref::<BodyError>() {
            return Some(found);
        }
        source = err.source();
    }
    None
}

/// The body as bytes; 413 when it is over `Limits::body_bytes_max`, 408 when it
/// did not arrive within `Limits::body_read_timeout_ms`.
pub fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        match body_error(&e) {
            Some(BodyError::Timeout { timeout_ms }) => {
                return ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                    "the request body did not arrive within {timeout_ms} ms; nothing was changed"
                ),
                )
            }
            Some(BodyError::Closing) => {
                return ApiError::unavailable(
                    "the server is closing this connection; nothing was changed",
                )
            }
            Some(BodyError::Read(_)) | None => {}
        }
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body is over the server's limit (64 KiB by default)",
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("could not read the request body: {e}"),
            )
        }
    })
}

/// Parses a JSON body: 415 without a JSON content type, 400 for malformed JSON,
/// 422 for well-formed JSON of the wrong shape (types, unknown or missing fields).
pub fn json_body<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ));
    }
    // serde would read a struct from a JSON array too (`["alice", 5]`); the API
    // takes objects only, so an array is the wrong shape (422), like any other.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::invalid(
            "the body must be a JSON object, not an array",
        ));
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::invalid(e.to_string()),
        serde_json::error::Category::Syntax
        | serde_json::error::Category::Eof
        | serde_json::error::Category::Io => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("malformed JSON: {e}"),
        ),
    })
}

/// Like [`json_body`], but an empty body (or only whitespace) stands for `{}`.
pub fn optional_json_body<T: DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        json_body(headers, body)
    }
}
