//! The one status table: which HTTP statuses each storm operation may answer,
//! and what an answer promises about the money (a history's `ok`, `fail` or
//! `unknown`). The storm's own verdict and `check-history` both judge by it,
//! so a recorded run is held to exactly the rules the live run was.

use super::load::OpKind;

/// What an answer promises about the money.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx: the operation took effect (or had already, and this is its replay).
    Ok,
    /// An answer that promises nothing moved: 402, 404, 409, 503.
    Fail,
    /// No answer, or a 500: the client cannot know what the service did.
    Unknown,
}

/// What `status` promises (0: no answer).
pub fn outcome(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Ok,
        402 | 404 | 409 | 503 => Outcome::Fail,
        _ => Outcome::Unknown,
    }
}

/// Whether `op` may answer `status`; anything else is `unexpected_status`.
/// A 500, a 503 and no answer (0) are liveness's to judge (`liveness.rs`).
pub fn expected(op: OpKind, status: u16) -> bool {
    if matches!(status, 0 | 500 | 503) {
        return true;
    }
    match op {
        OpKind::CreateAccount | OpKind::CreateOrder => matches!(status, 200 | 201),
        OpKind::Deduct => matches!(status, 200 | 402),
        OpKind::Refund => matches!(status, 200 | 409),
        OpKind::Authorize => matches!(status, 200 | 402),
        OpKind::Capture | OpKind::Void => matches!(status, 200 | 409),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_op_has_its_own_refusal_and_liveness_judges_the_rest() {
        assert!(expected(OpKind::Deduct, 402));
        assert!(!expected(OpKind::Deduct, 409));
        assert!(expected(OpKind::Refund, 409));
        assert!(!expected(OpKind::Refund, 402));
        assert!(!expected(OpKind::Deduct, 404));
        assert!(expected(OpKind::CreateOrder, 201));
        assert!(expected(OpKind::Authorize, 402));
        assert!(!expected(OpKind::Authorize, 409));
        assert!(expected(OpKind::Capture, 409));
        assert!(!expected(OpKind::Void, 402));
        for s in [0, 500, 503] {
            assert!(expected(OpKind::Deduct, s));
        }
        assert_eq!(outcome(201), Outcome::Ok);
        assert_eq!(outcome(503), Outcome::Fail);
        assert_eq!(outcome(500), Outcome::Unknown);
        assert_eq!(outcome(0), Outcome::Unknown);
    }
}
