//! Request bodies: arbitrary bytes and a content type through the body parsers the handlers
//! use (`payguard_server::fuzzing`), for each POST that takes a body.
//!
//! Why: a body is the one part of a request a client controls byte for byte, and the parsers
//! decide what reaches the engine. The checks here hold whatever arrives:
//! - no panic;
//! - a refusal is a client error of API.md: 415 `unsupported_media_type` exactly when the
//!   content type is not JSON (and the body is needed), 400 `invalid_json` only for bytes that
//!   are not well-formed JSON, 422 `invalid_request` otherwise; its body is
//!   `{"error":{"code","message"}}`;
//! - an acceptance came from a JSON object (or, for deduct, nothing, `{}` or `null`) with a
//!   JSON content type, its ids are 1–64 characters of `[A-Za-z0-9_.:-]`, its amounts lie in
//!   `1..=2^53-1` (balances in `0..=2^53-1`), and every field equals what the JSON said.
//!
//! The input format keeps corpus files readable: the first byte picks the request (`H`:
//! authorize a hold, `C`: capture; any other `byte % 4`: `D`educt, `A`ccount, `R`efund,
//! `O`rder), the rest of the first line is the content type
//! (empty: `application/json`; `-`: none; otherwise sent as written), and the bytes after the
//! first newline are the body. `Aapplication/json\n{"id":"alice","balance":5}` is one.

use crate::show;
use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use payguard::domain::{
    AccountId, Currency, Money, OrderId, RefundId, ID_BYTES_MAX, MONEY_MINOR_MAX,
};
use payguard::store::Op;
use payguard_server::fuzzing::{
    authorize_op, capture_op, create_account_op, create_order_op, deduct_op, refund_op,
};
use payguard_server::ApiError;
use serde_json::Value;

/// The order id in the path of deduct and refund requests (the path is the router's business).
pub const PATH_ORDER_ID: &str = "fz-order";

/// The server's hold TTL when an authorize names none (`--hold-ttl`), as the parser is given it.
pub const DEFAULT_HOLD_TTL_MS: i64 = payguard_server::HOLD_TTL_MS;

/// Which POST the body is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Deduct,
    CreateAccount,
    Refund,
    CreateOrder,
    Authorize,
    Capture,
}

impl Kind {
    /// Kinds whose body may be absent (no body, `{}` or `null`).
    fn body_optional(self) -> bool {
        matches!(self, Kind::Deduct | Kind::Authorize | Kind::Capture)
    }
}

/// One decoded fuzz input.
#[derive(Debug)]
pub struct Input<'a> {
    pub kind: Kind,
    /// `None`: no Content-Type header.
    pub content_type: Option<&'a [u8]>,
    pub body: &'a [u8],
}

/// Decodes a fuzz input; `None` for the empty input.
pub fn decode(data: &[u8]) -> Option<Input<'_>> {
    let (&first, rest) = data.split_first()?;
    let kind = match (first, first % 4) {
        (b'H', _) => Kind::Authorize,
        (b'C', _) => Kind::Capture,
        (_, 0) => Kind::Deduct,
        (_, 1) => Kind::CreateAccount,
        (_, 2) => Kind::Refund,
        _ => Kind::CreateOrder,
    };
    let (line, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(nl) => (&rest[..nl], &rest[nl + 1..]),
        None => (rest, &[][..]),
    };
    let content_type = match line {
        b"" => Some(&b"application/json"[..]),
        b"-" => None,
        ct => Some(ct),
    };
    Some(Input {
        kind,
        content_type,
        body,
    })
}

/// Runs one fuzz input through the parser of its request and checks the result.
pub fn check(data: &[u8]) {
    let Some(input) = decode(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    // A value no HTTP parser would deliver is sent as no header at all.
    let sent_ct = input
        .content_type
        .and_then(|ct| HeaderValue::from_bytes(ct).ok());
    if let Some(v) = &sent_ct {
        headers.insert(header::CONTENT_TYPE, v.clone());
    }
    let body = Bytes::copy_from_slice(input.body);
    let path_order = OrderId::parse(PATH_ORDER_ID).expect("a valid id");
    let result = match input.kind {
        Kind::CreateAccount => create_account_op(&headers, &body),
        Kind::CreateOrder => create_order_op(&headers, &body),
        Kind::Deduct => deduct_op(path_order, &headers, &body),
        Kind::Refund => refund_op(path_order, &headers, &body),
        Kind::Authorize => authorize_op(path_order, &headers, &body, DEFAULT_HOLD_TTL_MS),
        Kind::Capture => capture_op(path_order, &headers, &body),
    };
    let ct_is_json = sent_ct
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json_content_type);
    let ctx = || {
        format!(
            "{:?} content-type {:?} body {}",
            input.kind,
            sent_ct,
            show(input.body)
        )
    };
    match result {
        Ok(op) => accepted(&input, ct_is_json, &op, &ctx),
        Err(e) => refused(&input, ct_is_json, &e, &ctx),
    }
}

/// API.md's JSON media types, written independently of the server's check: `application/json`
/// or any `type/subtype+json`, parameters after `;` ignored, case-insensitive.
fn is_json_content_type(ct: &str) -> bool {
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_suffix("+json")
            .is_some_and(|t| t.contains('/'))
}

fn blank(b: &[u8]) -> bool {
    b.iter().all(u8::is_ascii_whitespace)
}

/// The id rule of API.md, written independently of `payguard::domain::ids`.
fn valid_id(s: &str) -> bool {
    (1..=ID_BYTES_MAX).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'-'))
}

fn money_in(m: Money, min: i64) -> bool {
    (min..=MONEY_MINOR_MAX).contains(&m.minor())
}

fn accepted(input: &Input<'_>, ct_is_json: bool, op: &Op, ctx: &dyn Fn() -> String) {
    if input.kind.body_optional() && blank(input.body) {
        let order_id = OrderId::parse(PATH_ORDER_ID).unwrap();
        let default = match input.kind {
            Kind::Authorize => Op::Authorize {
                order_id,
                hold_ttl_ms: DEFAULT_HOLD_TTL_MS,
            },
            Kind::Capture => Op::Capture {
                order_id,
                amount: None,
            },
            _ => Op::Deduct { order_id },
        };
        assert_eq!(op, &default, "{}", ctx());
        return;
    }
    assert!(
        ct_is_json,
        "accepted without a JSON content type: {}",
        ctx()
    );
    let v: Value = serde_json::from_slice(input.body)
        .unwrap_or_else(|e| panic!("accepted a body serde_json cannot read ({e}): {}", ctx()));
    let json = AcceptedJson { input, v, ctx };
    match op {
        Op::Deduct { order_id } => json.deduct(order_id),
        Op::CreateAccount {
            id,
            balance,
            currency,
        } => json.create_account(id, *balance, currency),
        Op::CreateOrder {
            id,
            account_id,
            amount,
        } => json.create_order(id, account_id, *amount),
        Op::Refund {
            order_id,
            refund_id,
            amount,
        } => json.refund(order_id, refund_id, *amount),
        Op::Authorize {
            order_id,
            hold_ttl_ms,
        } => json.authorize(order_id, *hold_ttl_ms),
        Op::Capture { order_id, amount } => json.capture(order_id, *amount),
        Op::Void { .. } | Op::Expire { .. } => {
            panic!("a parser under test made a void or expiry: {}", ctx())
        }
    }
}

/// An accepted body's JSON beside the op the parser made of it: one method an op, each
/// checking that op's fields against the JSON and the domain's rules.
struct AcceptedJson<'a> {
    input: &'a Input<'a>,
    v: Value,
    ctx: &'a dyn Fn() -> String,
}

impl AcceptedJson<'_> {
    fn ctx(&self) -> String {
        (self.ctx)()
    }

    fn field(&self, k: &str) -> &Value {
        self.v.get(k).unwrap_or(&Value::Null)
    }

    fn only_keys(&self, keys: &[&str]) {
        let obj = self
            .v
            .as_object()
            .unwrap_or_else(|| panic!("accepted a body that is not an object: {}", self.ctx()));
        for k in obj.keys() {
            assert!(
                keys.contains(&k.as_str()),
                "accepted unknown field {k:?}: {}",
                self.ctx()
            );
        }
    }

    fn deduct(&self, order_id: &OrderId) {
        let v = &self.v;
        assert_eq!(order_id.as_str(), PATH_ORDER_ID, "{}", self.ctx());
        assert!(
            v.is_null() || v.as_object().is_some_and(|o| o.is_empty()),
            "deduct accepted a body that is neither {{}} nor null: {}",
            self.ctx()
        );
    }

    /// No body fields but an optional `hold_ttl_s` of 1..=30 days (default: the server's).
    fn authorize(&self, order_id: &OrderId, hold_ttl_ms: i64) {
        let ctx = || self.ctx();
        assert_eq!(self.input.kind, Kind::Authorize, "{}", ctx());
        assert_eq!(order_id.as_str(), PATH_ORDER_ID, "{}", ctx());
        if !self.v.is_null() {
            self.only_keys(&["hold_ttl_s"]);
        }
        match self.field("hold_ttl_s") {
            Value::Null => assert_eq!(hold_ttl_ms, DEFAULT_HOLD_TTL_MS, "{}", ctx()),
            v => {
                let s = v
                    .as_i64()
                    .unwrap_or_else(|| panic!("accepted hold_ttl_s {v}: {}", ctx()));
                assert!(
                    (1..=payguard_server::HOLD_TTL_S_MAX).contains(&s),
                    "hold_ttl_s {s}: {}",
                    ctx()
                );
                assert_eq!(hold_ttl_ms, s * 1000, "{}", ctx());
            }
        }
    }

    /// No body fields but an optional `amount` of 1..=2^53-1 (default: the whole hold).
    fn capture(&self, order_id: &OrderId, amount: Option<Money>) {
        let ctx = || self.ctx();
        assert_eq!(self.input.kind, Kind::Capture, "{}", ctx());
        assert_eq!(order_id.as_str(), PATH_ORDER_ID, "{}", ctx());
        if !self.v.is_null() {
            self.only_keys(&["amount"]);
        }
        match (self.field("amount"), amount) {
            (Value::Null, None) => {}
            (v, Some(m)) => {
                assert!(money_in(m, 1), "amount {m:?}: {}", ctx());
                assert_eq!(v.as_i64(), Some(m.minor()), "{}", ctx());
            }
            (v, None) => panic!("amount {v} accepted as the whole hold: {}", ctx()),
        }
    }

    fn create_account(&self, id: &AccountId, balance: Money, currency: &Currency) {
        let ctx = || self.ctx();
        assert_eq!(self.input.kind, Kind::CreateAccount, "{}", ctx());
        self.only_keys(&["id", "balance", "currency"]);
        assert!(
            valid_id(id.as_str()),
            "invalid account id {id:?}: {}",
            ctx()
        );
        assert_eq!(self.field("id").as_str(), Some(id.as_str()), "{}", ctx());
        assert!(money_in(balance, 0), "balance {balance:?}: {}", ctx());
        assert_eq!(
            self.field("balance").as_i64(),
            Some(balance.minor()),
            "{}",
            ctx()
        );
        let c = currency.as_str();
        assert!(
            c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()),
            "currency {c:?}: {}",
            ctx()
        );
        match self.field("currency") {
            Value::Null => assert_eq!(c, "CNY", "{}", ctx()),
            other => assert_eq!(other.as_str(), Some(c), "{}", ctx()),
        }
    }

    fn create_order(&self, id: &OrderId, account_id: &AccountId, amount: Money) {
        let ctx = || self.ctx();
        assert_eq!(self.input.kind, Kind::CreateOrder, "{}", ctx());
        self.only_keys(&["id", "account_id", "amount"]);
        assert!(valid_id(id.as_str()), "invalid order id {id:?}: {}", ctx());
        assert!(
            valid_id(account_id.as_str()),
            "invalid account id: {}",
            ctx()
        );
        assert_eq!(self.field("id").as_str(), Some(id.as_str()), "{}", ctx());
        assert_eq!(
            self.field("account_id").as_str(),
            Some(account_id.as_str()),
            "{}",
            ctx()
        );
        assert!(money_in(amount, 1), "amount {amount:?}: {}", ctx());
        assert_eq!(
            self.field("amount").as_i64(),
            Some(amount.minor()),
            "{}",
            ctx()
        );
    }

    fn refund(&self, order_id: &OrderId, refund_id: &RefundId, amount: Money) {
        let ctx = || self.ctx();
        assert_eq!(self.input.kind, Kind::Refund, "{}", ctx());
        self.only_keys(&["id", "amount"]);
        assert_eq!(order_id.as_str(), PATH_ORDER_ID, "{}", ctx());
        assert!(valid_id(refund_id.as_str()), "invalid refund id: {}", ctx());
        assert_eq!(
            self.field("id").as_str(),
            Some(refund_id.as_str()),
            "{}",
            ctx()
        );
        assert!(money_in(amount, 1), "amount {amount:?}: {}", ctx());
        assert_eq!(
            self.field("amount").as_i64(),
            Some(amount.minor()),
            "{}",
            ctx()
        );
    }
}

fn refused(input: &Input<'_>, ct_is_json: bool, e: &ApiError, ctx: &dyn Fn() -> String) {
    let expected_code = match e.status {
        StatusCode::BAD_REQUEST => "invalid_json",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        s => panic!("refused with {s} ({}): {}", e.code, ctx()),
    };
    assert_eq!(e.code, expected_code, "{}", ctx());
    assert!(!e.message.is_empty(), "{}", ctx());
    let rendered: Value = serde_json::from_slice(&e.body_bytes())
        .unwrap_or_else(|err| panic!("error body is not JSON ({err}): {}", ctx()));
    assert_eq!(
        rendered["error"]["code"].as_str(),
        Some(e.code),
        "{}",
        ctx()
    );
    assert_eq!(
        rendered["error"]["message"].as_str(),
        Some(e.message.as_str()),
        "{}",
        ctx()
    );
    let body_needed = !(input.kind.body_optional() && blank(input.body));
    assert_eq!(
        e.status == StatusCode::UNSUPPORTED_MEDIA_TYPE,
        body_needed && !ct_is_json,
        "415 exactly when a needed body has no JSON content type: {}",
        ctx()
    );
    if e.status == StatusCode::BAD_REQUEST {
        assert!(
            serde_json::from_slice::<Value>(input.body).is_err(),
            "400 invalid_json for well-formed JSON: {}",
            ctx()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_readable_format() {
        let i = decode(b"Aapplication/json\n{}").unwrap();
        assert_eq!(i.kind, Kind::CreateAccount);
        assert_eq!(i.content_type, Some(&b"application/json"[..]));
        assert_eq!(i.body, b"{}");
        let i = decode(b"R\n{}").unwrap();
        assert_eq!(
            (i.kind, i.content_type),
            (Kind::Refund, Some(&b"application/json"[..]))
        );
        let i = decode(b"D-\n").unwrap();
        assert_eq!(
            (i.kind, i.content_type, i.body),
            (Kind::Deduct, None, &b""[..])
        );
        assert_eq!(decode(b"O").unwrap().kind, Kind::CreateOrder);
        assert_eq!(decode(b"H\n{}").unwrap().kind, Kind::Authorize);
        assert_eq!(decode(b"C\n{}").unwrap().kind, Kind::Capture);
        assert!(decode(b"").is_none());
    }

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("Application/JSON; charset=utf-8"));
        assert!(is_json_content_type("application/problem+json"));
        assert!(!is_json_content_type("+json"));
        assert!(!is_json_content_type("text/plain"));
    }

    #[test]
    fn valid_and_invalid_bodies_pass_the_checks() {
        check(
            br#"A
{"id":"alice","balance":5000000}"#,
        );
        check(
            br#"O
{"id":"OD1","account_id":"alice","amount":1185000}"#,
        );
        check(
            br#"R
{"id":"rf-1","amount":50}"#,
        );
        check(b"D-\n");
        check(b"D\nnull");
        check(b"H-\n");
        check(b"H\n{\"hold_ttl_s\":3600}");
        check(b"H\n{\"hold_ttl_s\":0}");
        check(b"H\n{\"hold_ttl_s\":2592001}");
        check(b"H\n{\"hold_ttl_s\":1.5}");
        check(b"C\n{\"amount\":600}");
        check(b"C\n{\"amount\":0}");
        check(b"C\nnull");
        check(b"C\n{\"amount\":600,\"x\":1}");
        check(b"Ctext/plain\n{\"amount\":1}");
        check(b"Atext/plain\n{}");
        check(b"A\n{\"id\":");
        check(
            br#"A
{"id":"a b","balance":-1}"#,
        );
    }
}
