//! The request-body parsers, reachable from outside the crate for the fuzz
//! targets (`fuzz/`), their corpus replay test (`payguard-fuzz-checks`) and
//! the ceiling row of `payguard bench http` (which parses bodies exactly as the
//! server does, so it measures the same work).
//!
//! Why: the handlers turn a body into an [`Op`](payguard::store::Op) through
//! these functions and nothing else, so fuzzing them fuzzes exactly what a
//! request meets. Nothing here is API: it is hidden from the docs and may change
//! with the targets. No behaviour lives here, only re-exports.

pub use crate::routes::{
    authorize_op, capture_op, create_account_op, create_order_op, deduct_op, refund_op,
};
