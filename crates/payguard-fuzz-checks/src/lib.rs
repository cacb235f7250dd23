//! The invariants behind payguard's fuzz targets, as plain functions.
//!
//! Why a crate of its own: the cargo-fuzz harnesses in `fuzz/` (their own workspace, built
//! with libFuzzer's instrumentation) and the corpus replay test here (`tests/corpus.rs`, run
//! by `cargo test --workspace` on stable, so by CI) must check exactly the same things. Each
//! `check` takes the raw fuzz input and panics, with the input described, when an invariant
//! does not hold; a return is a pass. Nothing here is used by the service.
//!
//! - [`request_body`]: a body and a content type through the handlers' body parsers (never a
//!   panic; every refusal a 400, 415 or 422 in API.md's JSON shape; every acceptance valid by
//!   the domain's rules and equal to what the JSON said).
//! - [`router`]: a whole HTTP request through the axum router on a temporary SQLite database
//!   (never a 5xx; a 4xx moves no money and creates no rows).
//! - [`log_line`]: log lines through forensics' parser (never a panic; every event has an
//!   order, filtering by that order keeps it, and it survives being written out and read back).
#![forbid(unsafe_code)]

pub mod log_line;
pub mod request_body;
pub mod router;

/// Shows up to 512 bytes of an input in a panic message.
pub(crate) fn show(b: &[u8]) -> String {
    let cut = &b[..b.len().min(512)];
    format!("{:?}", String::from_utf8_lossy(cut))
}
