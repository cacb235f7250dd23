//! Whole requests: an arbitrary method, path, headers and body through the real axum router
//! (every middleware, handler and the engine) on a temporary SQLite database.
//!
//! Why: the body parsers are only one step; ids in paths, Idempotency-Key, limits, the
//! fallbacks and the engine's answers all decide a status. The checks here hold for every
//! request:
//! - the router answers, with no panic and never a 5xx (nothing here is overloaded, slow or
//!   down, so a 5xx would be a bug: API.md keeps 500 for "should never happen");
//! - no response body is over 4 MiB (nothing a client sends may grow without bound);
//! - every 4xx has API.md's error body `{"error":{"code","message"}}`;
//! - a 4xx moves no money and creates nothing: accounts, balances, orders, refunded sums and
//!   ledger entries are what they were before it, and order statuses too, except that a 402
//!   turns its order FAILED (API.md: "the order is FAILED, and stays so").
//!
//! The database lives on a tmpfs (`/dev/shm`) when there is one, so a commit costs no disk
//! flush; it starts with account `fz-a` (balance 1 000 000), order `fz-o1` (100, PREPARE) and
//! order `fz-o2` (200, PAID) so deducts and refunds have something to act on.
//!
//! The input format is an HTTP/1 request, readable in the corpus: a request line
//! `METHOD PATH`, header lines `Name: value`, an empty line, and the body. An input whose
//! method or path is not valid HTTP is skipped (no server would route it); a header line
//! that is not a valid header is dropped.

use crate::show;
use axum::body::{to_bytes, Body};
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use payguard::store::sqlite::{open_connection, SqliteConfig};
use payguard::{Engine, EngineConfig};
use payguard_server::app::{self, AppSpec, Database};
use serde_json::Value;
use std::sync::Arc;
use tower::ServiceExt;

/// Most bytes of a response body (they are a few KiB here; more is a failure).
const RESPONSE_BYTES_MAX: usize = 4 << 20;

/// Rows (accounts, orders and entries) after which the harness starts over on a fresh
/// database: the snapshot reads whole tables, so a database that only grows would slow
/// every later input (13k execs/s at first fell to about 1k in two minutes without it).
pub const HARNESS_ROWS_MAX: i64 = 5_000;

/// The money and rows a 4xx must leave as they were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub accounts: i64,
    pub balances: i64,
    pub orders: i64,
    pub refunded: i64,
    pub entries: i64,
    pub entry_amounts: i64,
    /// Orders per status, `PREPARE, PAID, FAILED, PARTIALLY_REFUNDED, REFUNDED`.
    pub statuses: [i64; 5],
}

/// A router on its own database, driven by many inputs; it starts over on a fresh one after
/// [`HARNESS_ROWS_MAX`] rows.
pub struct Harness {
    db: Db,
    /// The rows as the last request left them: nothing else writes to the database.
    last: Snapshot,
}

/// One database with its engine and router.
struct Db {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    engine: Arc<Engine>,
    reader: rusqlite::Connection,
    _dir: tempfile::TempDir,
}

/// One decoded request.
pub struct Decoded {
    pub request: Request<Body>,
    pub method: Method,
    pub path: String,
}

/// Decodes a fuzz input; `None` when its request line is not valid HTTP.
pub fn decode(data: &[u8]) -> Option<Decoded> {
    let mut lines = data.splitn(2, |&b| b == b'\n');
    let request_line = lines.next().unwrap_or_default();
    let mut rest = lines.next().unwrap_or_default();
    let request_line = request_line.strip_suffix(b"\r").unwrap_or(request_line);
    let mut words = request_line.splitn(3, |&b| b == b' ');
    let method = Method::from_bytes(words.next()?).ok()?;
    let uri = Uri::try_from(words.next()?).ok()?;
    let mut builder = Request::builder().method(method.clone()).uri(uri.clone());
    loop {
        let (line, after) = match rest.iter().position(|&b| b == b'\n') {
            Some(nl) => (&rest[..nl], &rest[nl + 1..]),
            None => (rest, &[][..]),
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        rest = after;
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            builder = builder.header(n, v);
        }
    }
    let request = builder.body(Body::from(rest.to_vec())).ok()?;
    Some(Decoded {
        request,
        method,
        path: uri.path().to_owned(),
    })
}

impl Harness {
    /// Starts the engine on a fresh database and creates the fixtures.
    pub fn new() -> Harness {
        let db = Db::new();
        let last = db.snapshot();
        Harness { db, last }
    }

    /// The rows now.
    pub fn snapshot(&self) -> Snapshot {
        self.db.snapshot()
    }

    /// Sends one fuzz input through the router and checks the answer.
    pub fn check(&mut self, data: &[u8]) {
        let Some(d) = decode(data) else {
            return;
        };
        let before = self.last.clone();
        let (status, body) = self.db.send(d.request);
        let after = self.db.snapshot();
        self.last = after.clone();
        let ctx = || format!("{} {} -> {status}: input {}", d.method, d.path, show(data));
        assert!(!status.is_server_error(), "{}; body {}", ctx(), show(&body));
        if status.is_client_error() {
            if d.method != Method::HEAD {
                let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
                    panic!(
                        "{} with a body that is not JSON ({e}): {}",
                        ctx(),
                        show(&body)
                    )
                });
                assert!(
                    v["error"]["code"].as_str().is_some_and(|c| !c.is_empty())
                        && v["error"]["message"].is_string(),
                    "{} without API.md's error shape: {v}",
                    ctx()
                );
            }
            if status == StatusCode::PAYMENT_REQUIRED {
                let money = |s: &Snapshot| Snapshot {
                    statuses: [0; 5],
                    ..s.clone()
                };
                assert_eq!(money(&before), money(&after), "{} moved money", ctx());
            } else {
                assert_eq!(before, after, "{} changed rows", ctx());
            }
        }
        if after.accounts + after.orders + after.entries > HARNESS_ROWS_MAX {
            *self = Harness::new();
        }
    }
}

impl Db {
    fn new() -> Db {
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("a temporary directory");
        let db_path = dir.path().join("fuzz.db");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        // Assembled by the composition root, as `payguard serve` is.
        let spec = AppSpec::new(
            Database::Sqlite(SqliteConfig::new(&db_path)),
            EngineConfig {
                instance_id: "fuzz".into(),
                ..EngineConfig::default()
            },
        );
        let state = rt
            .block_on(app::build(spec))
            .expect("assemble the app")
            .state;
        let engine = state.engine.clone();
        let app = payguard_server::router(state);
        let reader = open_connection(&db_path).expect("a read connection");
        let h = Db {
            rt,
            app,
            engine,
            reader,
            _dir: dir,
        };
        for (path, body, want) in [
            ("/v1/accounts", r#"{"id":"fz-a","balance":1000000}"#, 201),
            (
                "/v1/orders",
                r#"{"id":"fz-o1","account_id":"fz-a","amount":100}"#,
                201,
            ),
            (
                "/v1/orders",
                r#"{"id":"fz-o2","account_id":"fz-a","amount":200}"#,
                201,
            ),
            ("/v1/orders/fz-o2/deduct", "", 200),
        ] {
            let req = Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .expect("a request");
            let (status, _) = h.send(req);
            assert_eq!(status.as_u16(), want, "fixture {path}");
        }
        h
    }

    fn send(&self, req: Request<Body>) -> (StatusCode, axum::body::Bytes) {
        self.rt.block_on(async {
            let resp = self
                .app
                .clone()
                .oneshot(req)
                .await
                .unwrap_or_else(|e| match e {});
            let status = resp.status();
            // A response this large means something a client sent grows without bound
            // (it found invented HTTP methods each becoming a metrics label).
            let body = to_bytes(resp.into_body(), RESPONSE_BYTES_MAX)
                .await
                .unwrap_or_else(|e| {
                    panic!("a {status} response body over {RESPONSE_BYTES_MAX} bytes: {e}")
                });
            (status, body)
        })
    }

    /// Reads the rows a 4xx must not change, straight from the database (one pass a table).
    fn snapshot(&self) -> Snapshot {
        let q = "SELECT a.n, a.balances, o.n, o.refunded, e.n, e.amounts,
                        o.prepare, o.paid, o.failed, o.partially_refunded, o.refunded_n
                 FROM (SELECT count(*) AS n, coalesce(sum(balance), 0) AS balances FROM accounts) a,
                      (SELECT count(*) AS n, coalesce(sum(refunded), 0) AS refunded,
                              coalesce(sum(status = 'PREPARE'), 0) AS prepare,
                              coalesce(sum(status = 'PAID'), 0) AS paid,
                              coalesce(sum(status = 'FAILED'), 0) AS failed,
                              coalesce(sum(status = 'PARTIALLY_REFUNDED'), 0) AS partially_refunded,
                              coalesce(sum(status = 'REFUNDED'), 0) AS refunded_n FROM orders) o,
                      (SELECT count(*) AS n, coalesce(sum(amount), 0) AS amounts FROM entries) e";
        self.reader
            .query_row(q, [], |r| {
                Ok(Snapshot {
                    accounts: r.get(0)?,
                    balances: r.get(1)?,
                    orders: r.get(2)?,
                    refunded: r.get(3)?,
                    entries: r.get(4)?,
                    entry_amounts: r.get(5)?,
                    statuses: [r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?],
                })
            })
            .expect("the snapshot query")
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        // Lets the lanes and the writer finish before the directory goes.
        let _ = self.rt.block_on(self.engine.shutdown());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_requests_pass_the_checks() {
        let mut h = Harness::new();
        let s = h.snapshot();
        assert_eq!((s.accounts, s.orders, s.entries), (1, 2, 1));
        h.check(b"GET /v1/orders/fz-o1\n\n");
        h.check(b"POST /v1/orders/fz-o1/refunds\ncontent-type: application/json\n\n{\"id\":\"r1\",\"amount\":5}");
        h.check(b"POST /v1/orders/fz-o2/refunds\ncontent-type: application/json\n\n{\"id\":\"r1\",\"amount\":500}");
        h.check(b"POST /v1/orders/no%20such/deduct\n\n");
        h.check(b"DELETE /v1/accounts\n\n");
        h.check(b"GET /nowhere\n\n");
        h.check(b"not a request");
    }
}
