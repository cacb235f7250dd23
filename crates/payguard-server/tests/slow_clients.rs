//! Issue #19, "One client with slow connections locks everyone out".
//!
//! Twice `--connections-max` slow connections of each kind the issue measured (a
//! request line and one header, never the end of the headers; full headers of a
//! deduct with `Content-Length: 100000` and one byte of body; idle keep-alive
//! connections, the badly pooled client), with and without API keys, on SQLite and
//! on PostgreSQL. The attacker keeps its connections open for the whole attack:
//! each one the server closes is opened again. During the attack a normal client's
//! `/healthz` and a deduct, each on a new connection, are answered within 1 s at every
//! probe; every slow connection is closed within its deadline; no request whose body
//! never arrived moved anything; and `/metrics` counts the closes by reason.
//!
//! Then shutdown: SIGTERM with unfinished requests open closes them at once, answers
//! the request already handed to the engine, and stops within the drain deadline,
//! even when a client never reads its responses.
//!
//! The deadlines are small here (1.5 s) so each test takes a few seconds. A close
//! may come up to [`CLOSE_SLACK`] after its deadline (the sweeper's tick and a busy
//! 2-core machine); the 1 s answer bound is the issue's own.
//!
//! PostgreSQL tests need `PAYGUARD_TEST_POSTGRES_URL` and are skipped with a printed
//! reason without it.

mod common;
mod pg_common;

use payguard::engine::Guard;
use payguard::store::postgres::ScratchDb;
use payguard::EngineConfig;
use payguard_server::{ApiKeys, Limits};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The server's connection limit in these tests; the attacker holds twice as many.
const CONNECTIONS_MAX: usize = 32;
const SLOW_CONNECTIONS: usize = 2 * CONNECTIONS_MAX;
/// Every connection deadline (headers, body, idle, write) in the attack tests.
const DEADLINE: Duration = Duration::from_millis(1_500);
/// How long the attacker keeps reopening what the server closes.
const ATTACK: Duration = Duration::from_millis(2_500);
const PROBE_EVERY: Duration = Duration::from_millis(400);
/// The issue's bound on answering a normal client during the attack.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// A probe gives up here, so a server that never answers fails the test, not hangs it.
const PROBE_GIVE_UP: Duration = Duration::from_secs(5);
/// How late after its deadline a slow connection may still be seen closing.
const CLOSE_SLACK: Duration = Duration::from_secs(1);
/// The attacker's pause before reopening a connection the server closed.
const REOPEN_PAUSE: Duration = Duration::from_millis(100);
/// Each order's amount; the slow deducts' orders stay unpaid.
const AMOUNT: i64 = 100;
const BALANCE: i64 = 1_000_000;
const KEY: &str = "key-slow-clients-0123456789abcdef";

fn attack_limits() -> Limits {
    Limits {
        connections_max: CONNECTIONS_MAX,
        header_read_timeout_ms: DEADLINE.as_millis() as u64,
        body_read_timeout_ms: DEADLINE.as_millis() as u64,
        idle_timeout_ms: DEADLINE.as_millis() as u64,
        write_timeout_ms: DEADLINE.as_millis() as u64,
        ..Limits::default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slow {
    /// A request line and one header, never the end of the headers.
    Headers,
    /// Full headers of a deduct with `Content-Length: 100000`, then one byte.
    Body,
    /// One request answered, then nothing: a keep-alive connection left idle.
    Idle,
}

impl Slow {
    /// The `reason` label of the deadline that closes this kind.
    fn deadline_reason(self) -> &'static str {
        match self {
            Slow::Headers => "header_timeout",
            Slow::Body => "body_timeout",
            Slow::Idle => "idle_timeout",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

enum Running {
    Sqlite(common::TestApp),
    Postgres(pg_common::Instance, Box<ScratchDb>),
}

/// A real server on port 0 over either store, with or without API keys.
struct Server {
    addr: SocketAddr,
    base: String,
    key: Option<&'static str>,
    /// Keeps pooled connections: setup and checks, not the probes.
    client: reqwest::Client,
    running: Running,
}

async fn start(test: &str, backend: Backend, keyed: bool, limits: Limits) -> Option<Server> {
    let keys = if keyed {
        ApiKeys::new([KEY]).unwrap()
    } else {
        ApiKeys::default()
    };
    let (addr, base, running) = match backend {
        Backend::Sqlite => {
            let app = common::spawn_app_full(EngineConfig::default(), keys, limits).await;
            (app.addr, app.base.clone(), Running::Sqlite(app))
        }
        Backend::Postgres => {
            let db = pg_common::scratch(test).await?;
            let inst = pg_common::spawn_full(&db, "pg-slow", Guard::Full, None, keys, limits).await;
            (
                inst.addr,
                inst.base.clone(),
                Running::Postgres(inst, Box::new(db)),
            )
        }
    };
    Some(Server {
        addr,
        base,
        key: keyed.then_some(KEY),
        client: reqwest::Client::new(),
        running,
    })
}

impl Server {
    fn request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let req = client.request(method, format!("{}{path}", self.base));
        match self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.request(&self.client, method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request sent");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    async fn stop(self) {
        match self.running {
            Running::Sqlite(app) => app.stop().await,
            Running::Postgres(inst, db) => {
                inst.stop().await;
                db.drop_db().await.expect("drop the scratch database");
            }
        }
    }
}

/// Accounts `slow` (its orders are the slow deducts' targets) and `probe`.
async fn setup(server: &Server, probes: usize) {
    for account in ["slow", "probe"] {
        let (s, b) = server
            .post("/v1/accounts", json!({"id": account, "balance": BALANCE}))
            .await;
        assert_eq!(s, 201, "{b:?}");
    }
    let orders = (0..SLOW_CONNECTIONS)
        .map(|i| (format!("s{i}"), "slow"))
        .chain((0..probes).map(|i| (format!("p{i}"), "probe")));
    for (id, account) in orders {
        let (s, b) = server
            .post(
                "/v1/orders",
                json!({"id": id, "account_id": account, "amount": AMOUNT}),
            )
            .await;
        assert_eq!(s, 201, "{b:?}");
    }
}

/// What one slow connection saw.
#[derive(Debug)]
struct SlowOutcome {
    lane: usize,
    /// From going slow to the server closing it; `None`: still open at the bound.
    closed_after: Option<Duration>,
    /// The status line of whatever the server sent after it went slow.
    answer: String,
}

/// The bytes that make connection `lane` slow. `with_key`: it carries the API key.
fn slow_bytes(kind: Slow, lane: usize, with_key: bool) -> String {
    let auth = if with_key {
        format!("Authorization: Bearer {KEY}\r\n")
    } else {
        String::new()
    };
    match kind {
        Slow::Headers => format!("POST /v1/orders/s{lane}/deduct HTTP/1.1\r\nHost: payguard\r\n"),
        Slow::Body => format!(
            "POST /v1/orders/s{lane}/deduct HTTP/1.1\r\nHost: payguard\r\n{auth}\
             Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{"
        ),
        Slow::Idle => "GET /healthz HTTP/1.1\r\nHost: payguard\r\n\r\n".to_owned(),
    }
}

/// Reads one whole response (headers and `Content-Length` body); false if the
/// connection ended first.
async fn read_response(stream: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return true;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads until the server closes the connection (FIN or RST); the first line read.
async fn wait_closed(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// One slow connection: goes slow, then waits (bounded) for the server to close it.
async fn one_slow_connection(
    addr: SocketAddr,
    kind: Slow,
    lane: usize,
    with_key: bool,
) -> SlowOutcome {
    let bound = DEADLINE + CLOSE_SLACK;
    let mut stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => panic!("slow connection {lane} could not connect: {e}"),
    };
    let went_slow = async {
        stream
            .write_all(slow_bytes(kind, lane, with_key).as_bytes())
            .await
            .ok()?;
        if kind == Slow::Idle && !read_response(&mut stream).await {
            // Closed before its one answer (evicted while waiting): it went slow at once.
            return Some(());
        }
        Some(())
    };
    let Ok(Some(())) = tokio::time::timeout(bound, went_slow).await else {
        return SlowOutcome {
            lane,
            closed_after: None,
            answer: "never served its first request".into(),
        };
    };
    let since = Instant::now();
    match tokio::time::timeout(bound, wait_closed(&mut stream)).await {
        Ok(answer) => SlowOutcome {
            lane,
            closed_after: Some(since.elapsed()),
            answer,
        },
        Err(_) => SlowOutcome {
            lane,
            closed_after: None,
            answer: String::new(),
        },
    }
}

/// One attacker lane: holds a slow connection open until the attack ends,
/// reopening each one the server closes.
async fn attacker_lane(
    addr: SocketAddr,
    kind: Slow,
    lane: usize,
    keyed: bool,
    until: Instant,
) -> Vec<SlowOutcome> {
    // With keys on, half the slow deducts carry a valid key (a broken client of
    // ours) and half none (an outsider, refused 401 before its body is read).
    let with_key = keyed && lane.is_multiple_of(2);
    let mut seen = Vec::new();
    loop {
        seen.push(one_slow_connection(addr, kind, lane, with_key).await);
        if Instant::now() >= until {
            return seen;
        }
        tokio::time::sleep(REOPEN_PAUSE).await;
    }
}

/// One probe: `/healthz` and a deduct, each on a connection of its own.
#[derive(Debug)]
struct Probe {
    at: Duration,
    healthz: Result<(u16, Duration), String>,
    deduct: Result<(u16, Duration), String>,
}

async fn timed(req: reqwest::RequestBuilder) -> Result<(u16, Duration), String> {
    let started = Instant::now();
    match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            r.bytes().await.map_err(|e| format!("body: {e}"))?;
            Ok((status, started.elapsed()))
        }
        Err(e) => Err(format!("after {:?}: {e:?}", started.elapsed())),
    }
}

async fn probes(server: &Server, start: Instant, count: usize) -> Vec<Probe> {
    // A new connection per request, like a client the attack found without one.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(PROBE_GIVE_UP)
        .build()
        .unwrap();
    let mut out = Vec::new();
    for i in 0..count {
        tokio::time::sleep_until(start + PROBE_EVERY * (i as u32 + 1)).await;
        let at = start.elapsed();
        let healthz = timed(client.get(format!("{}/healthz", server.base))).await;
        let deduct = timed(server.request(
            &client,
            reqwest::Method::POST,
            &format!("/v1/orders/p{i}/deduct"),
        ))
        .await;
        out.push(Probe {
            at,
            healthz,
            deduct,
        });
    }
    out
}

fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn run_attack(test: &str, backend: Backend, kind: Slow, keyed: bool) {
    let Some(server) = start(test, backend, keyed, attack_limits()).await else {
        return;
    };
    let probe_count = (ATTACK.as_millis() / PROBE_EVERY.as_millis()) as usize;
    setup(&server, probe_count).await;
    let start = Instant::now();
    let until = start + ATTACK;
    let lanes: Vec<_> = (0..SLOW_CONNECTIONS)
        .map(|lane| tokio::spawn(attacker_lane(server.addr, kind, lane, keyed, until)))
        .collect();
    let probed = probes(&server, start, probe_count).await;
    let mut outcomes = Vec::new();
    for lane in lanes {
        outcomes.extend(lane.await.expect("attacker lane"));
    }

    // A normal client was answered within 1 s at every probe.
    for p in &probed {
        for (what, r) in [("/healthz", &p.healthz), ("deduct", &p.deduct)] {
            match r {
                Ok((200, took)) if *took <= ANSWER_WITHIN => {}
                other => panic!(
                    "{test}: probe at {:?}: {what} was {other:?}, not 200 within {ANSWER_WITHIN:?}\nall probes: {probed:#?}",
                    p.at
                ),
            }
        }
    }
    // Every slow connection was closed within its deadline.
    let late: Vec<_> = outcomes
        .iter()
        .filter(|o| o.closed_after.is_none_or(|d| d > DEADLINE + CLOSE_SLACK))
        .collect();
    assert!(
        late.is_empty(),
        "{test}: {} of {} slow connections were not closed within {DEADLINE:?} (+{CLOSE_SLACK:?}): {:?}",
        late.len(),
        outcomes.len(),
        &late[..late.len().min(5)]
    );
    // No slow deduct was answered with success, and none moved money.
    for o in &outcomes {
        assert!(
            !o.answer.starts_with("HTTP/1.1 2") || kind == Slow::Idle,
            "{test}: slow connection {} got {:?}",
            o.lane,
            o.answer
        );
    }
    if kind == Slow::Body {
        // The ones the body deadline closed were told why (the rest were evicted,
        // or refused 401 before their body was read).
        let timed_out = outcomes
            .iter()
            .filter(|o| o.answer.starts_with("HTTP/1.1 408"))
            .count();
        assert!(timed_out > 0, "{test}: no slow body was answered 408");
        if keyed {
            assert!(
                outcomes
                    .iter()
                    .any(|o| o.lane % 2 == 1 && o.answer.starts_with("HTTP/1.1 401")),
                "{test}: the slow deducts without a key were not refused 401"
            );
        }
    }
    let (s, slow) = server.get("/v1/accounts/slow").await;
    assert_eq!(
        (s, slow["balance"].as_i64()),
        (200, Some(BALANCE)),
        "{test}: {slow:?}"
    );
    for lane in 0..SLOW_CONNECTIONS {
        let (s, order) = server.get(&format!("/v1/orders/s{lane}")).await;
        assert_eq!(
            (s, order["status"].as_str()),
            (200, Some("PREPARE")),
            "{test}: {order:?}"
        );
    }
    let (s, probe) = server.get("/v1/accounts/probe").await;
    assert_eq!(
        (s, probe["balance"].as_i64()),
        (200, Some(BALANCE - AMOUNT * probe_count as i64)),
        "{test}: every probe's deduct charged once"
    );
    let (s, audit) = server.get("/v1/audit").await;
    assert_eq!((s, &audit["ok"]), (200, &json!(true)), "{test}: {audit:?}");
    // The operator sees the attack: closes counted by reason.
    let text = server.metrics().await;
    let evicted = metric(
        &text,
        r#"payguard_connections_closed_total{reason="evicted"}"#,
    );
    let by_deadline = metric(
        &text,
        &format!(
            r#"payguard_connections_closed_total{{reason="{}"}}"#,
            kind.deadline_reason()
        ),
    );
    assert!(evicted > 0, "{test}: no eviction counted\n{text}");
    assert!(
        by_deadline > 0,
        "{test}: no {} counted\n{text}",
        kind.deadline_reason()
    );
    eprintln!(
        "{test}: {} slow connections over {ATTACK:?}, {evicted} evicted, {by_deadline} by {}; probes (healthz, deduct): {:?}",
        outcomes.len(),
        kind.deadline_reason(),
        probed
            .iter()
            .map(|p| (
                p.healthz.as_ref().map(|r| r.1).unwrap_or_default(),
                p.deduct.as_ref().map(|r| r.1).unwrap_or_default()
            ))
            .collect::<Vec<_>>()
    );
    server.stop().await;
}

macro_rules! attack_tests {
    ($($name:ident: $backend:expr, $kind:expr, $keyed:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            run_attack(stringify!($name), $backend, $kind, $keyed).await;
        }
    )*};
}

attack_tests! {
    slow_headers_without_keys_on_sqlite: Backend::Sqlite, Slow::Headers, false;
    slow_headers_with_keys_on_sqlite: Backend::Sqlite, Slow::Headers, true;
    slow_bodies_without_keys_on_sqlite: Backend::Sqlite, Slow::Body, false;
    slow_bodies_with_keys_on_sqlite: Backend::Sqlite, Slow::Body, true;
    idle_keep_alives_without_keys_on_sqlite: Backend::Sqlite, Slow::Idle, false;
    idle_keep_alives_with_keys_on_sqlite: Backend::Sqlite, Slow::Idle, true;
    slow_headers_without_keys_on_postgres: Backend::Postgres, Slow::Headers, false;
    slow_headers_with_keys_on_postgres: Backend::Postgres, Slow::Headers, true;
    slow_bodies_without_keys_on_postgres: Backend::Postgres, Slow::Body, false;
    slow_bodies_with_keys_on_postgres: Backend::Postgres, Slow::Body, true;
    idle_keep_alives_without_keys_on_postgres: Backend::Postgres, Slow::Idle, false;
    idle_keep_alives_with_keys_on_postgres: Backend::Postgres, Slow::Idle, true;
}

/// Limits where only the drain can close a slow connection within the test.
fn drain_limits(drain: Duration) -> Limits {
    Limits {
        connections_max: 4 * SLOW_CONNECTIONS,
        header_read_timeout_ms: 60_000,
        body_read_timeout_ms: 60_000,
        idle_timeout_ms: 60_000,
        write_timeout_ms: 60_000,
        drain_timeout_ms: drain.as_millis() as u64,
        ..Limits::default()
    }
}

fn balance_in_file(app: &common::TestApp, account: &str) -> i64 {
    let conn = rusqlite::Connection::open(&app.db_path).unwrap();
    conn.query_row(
        "SELECT balance FROM accounts WHERE id = ?1",
        [account],
        |r| r.get(0),
    )
    .unwrap()
}

/// SIGTERM with unfinished requests open (the issue: 1,098 of them kept a rolling
/// deploy hanging until it was killed). They are closed at once, the deduct already
/// handed to the engine gets its answer, and the server stops within the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_unfinished_requests_at_once_and_answers_the_engine() {
    const DRAIN: Duration = Duration::from_secs(5);
    /// The engine holds every write this long after taking its lock.
    const ENGINE_PAUSE_MS: u64 = 1_000;
    let app = common::spawn_app_full(
        EngineConfig::default(),
        ApiKeys::default(),
        drain_limits(DRAIN),
    )
    .await;
    app.account("acct", BALANCE).await;
    app.order("o1", "acct", AMOUNT).await;
    let (dir, db) = app.stop_keep_dir().await;
    let mut app = common::spawn_app_on(
        dir,
        db,
        EngineConfig {
            failpoint_pause_after_lock_ms: ENGINE_PAUSE_MS,
            ..EngineConfig::default()
        },
        ApiKeys::default(),
        drain_limits(DRAIN),
    )
    .await;
    let mut slow = Vec::new();
    for lane in 0..SLOW_CONNECTIONS {
        let kind = [Slow::Headers, Slow::Body, Slow::Idle][lane % 3];
        let mut s = TcpStream::connect(app.addr).await.unwrap();
        s.write_all(slow_bytes(kind, lane, false).as_bytes())
            .await
            .unwrap();
        if kind == Slow::Idle {
            assert!(read_response(&mut s).await, "idle connection {lane} served");
        }
        slow.push(s);
    }
    let in_engine = {
        let req = app.client.post(app.url("/v1/orders/o1/deduct"));
        tokio::spawn(async move {
            let r = req.send().await?;
            let status = r.status().as_u16();
            r.json::<Value>().await.map(|b| (status, b))
        })
    };
    // Long enough to be inside the engine's pause, which is much longer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sigterm = Instant::now();
    app.trigger_shutdown();
    let closes = futures::future::join_all(
        slow.iter_mut()
            .map(|s| tokio::time::timeout(CLOSE_SLACK, wait_closed(s))),
    )
    .await;
    let open = closes.iter().filter(|c| c.is_err()).count();
    assert_eq!(
        open, 0,
        "{open} of {SLOW_CONNECTIONS} unfinished requests still open {CLOSE_SLACK:?} after SIGTERM"
    );
    let (status, body) = in_engine
        .await
        .unwrap()
        .expect("the deduct in the engine was answered");
    assert_eq!(
        (status, &body["replayed"]),
        (200, &json!(false)),
        "{body:?}"
    );
    let stopped = tokio::time::timeout(DRAIN + CLOSE_SLACK, app.wait_stopped()).await;
    assert!(
        stopped.is_ok(),
        "the server was still running {:?} after SIGTERM (drain deadline {DRAIN:?})",
        sigterm.elapsed()
    );
    assert_eq!(balance_in_file(&app, "acct"), BALANCE - AMOUNT);
}

/// A client that pipelines requests and never reads the answers, with a small
/// receive buffer, so the server's writes block: `n` requests for `/openapi.json`.
async fn never_reading_client(addr: SocketAddr, n: usize) -> tokio::task::JoinHandle<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    tokio::spawn(async move {
        let one = "GET /openapi.json HTTP/1.1\r\nHost: payguard\r\n\r\n";
        // The server stops reading once its writes block; later requests wait in buffers.
        let _ = stream.write_all(one.repeat(n).as_bytes()).await;
        stream
    })
}

/// Waits (bounded) until `/metrics` shows a connection whose writes are blocked;
/// when it first did.
async fn wait_write_blocked(app: &common::TestApp) -> Instant {
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        let text = app.get_text("/metrics").await;
        if metric(&text, "payguard_connections_write_blocked ") > 0 {
            return Instant::now();
        }
        assert!(
            Instant::now() < give_up,
            "the server's writes never blocked\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Enough pipelined `/openapi.json` answers to fill every socket buffer on the way.
const PIPELINED_REQUESTS: usize = 2_000;

/// The drain deadline holds even for a connection that never finishes: a client
/// that never reads its responses is cut off when it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_stops_at_its_deadline_even_for_a_client_that_never_reads() {
    const DRAIN: Duration = Duration::from_secs(1);
    let mut app = common::spawn_app_full(
        EngineConfig::default(),
        ApiKeys::default(),
        drain_limits(DRAIN),
    )
    .await;
    let _writer = never_reading_client(app.addr, PIPELINED_REQUESTS).await;
    wait_write_blocked(&app).await;
    let sigterm = Instant::now();
    app.trigger_shutdown();
    let stopped = tokio::time::timeout(DRAIN + CLOSE_SLACK, app.wait_stopped()).await;
    assert!(
        stopped.is_ok(),
        "the server was still running {:?} after SIGTERM (drain deadline {DRAIN:?})",
        sigterm.elapsed()
    );
}

/// A client that never reads its responses is closed at the write deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_at_the_write_deadline() {
    let app =
        common::spawn_app_full(EngineConfig::default(), ApiKeys::default(), attack_limits()).await;
    let _writer = never_reading_client(app.addr, PIPELINED_REQUESTS).await;
    let blocked = wait_write_blocked(&app).await;
    loop {
        let text = app.get_text("/metrics").await;
        if metric(
            &text,
            r#"payguard_connections_closed_total{reason="write_timeout"}"#,
        ) == 1
        {
            break;
        }
        assert!(
            blocked.elapsed() <= DEADLINE + CLOSE_SLACK,
            "not closed {:?} after its writes blocked\n{text}",
            blocked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

/// The measurement behind the eviction order (BENCHMARKS.md): for 4 s, twice
/// `--connections-max` attacker connections (slow headers, then idle keep-alives)
/// reopened as the server closes them, against a busy pooled client of ours (8
/// workers on one keep-alive pool, a deduct every 20 ms each) and a new-connection
/// `/healthz` every 100 ms. Prints failures in the attack's opening burst (its first
/// [`BURST`], when 64 connections arrive at once) apart from the rest. Run with
/// `cargo test -p payguard-server --test slow_clients eviction_order -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; prints numbers, asserts nothing about them"]
async fn eviction_order_under_an_attack_and_a_pooled_client() {
    for kind in [Slow::Headers, Slow::Idle] {
        measure_eviction(kind).await;
    }
}

/// The attack's opening burst, reported apart.
const BURST: Duration = Duration::from_millis(100);

/// Requests made, failed in the opening burst, failed after it, slowest success.
#[derive(Debug, Default)]
struct Tally {
    sent: usize,
    failed_in_burst: usize,
    failed_after: usize,
    slowest: Duration,
}

impl Tally {
    fn add(&mut self, at: Duration, r: &Result<(u16, Duration), String>) {
        self.sent += 1;
        match r {
            Ok((200, took)) => self.slowest = self.slowest.max(*took),
            _ if at < BURST => self.failed_in_burst += 1,
            _ => self.failed_after += 1,
        }
    }

    fn merge(mut self, other: Tally) -> Tally {
        self.sent += other.sent;
        self.failed_in_burst += other.failed_in_burst;
        self.failed_after += other.failed_after;
        self.slowest = self.slowest.max(other.slowest);
        self
    }
}

async fn measure_eviction(kind: Slow) {
    const RUN: Duration = Duration::from_secs(4);
    const WORKERS: usize = 8;
    let Some(server) = start("eviction_order", Backend::Sqlite, false, attack_limits()).await
    else {
        return;
    };
    setup(&server, 1).await;
    let start = Instant::now();
    let until = start + RUN;
    let lanes: Vec<_> = (0..SLOW_CONNECTIONS)
        .map(|lane| tokio::spawn(attacker_lane(server.addr, kind, lane, false, until)))
        .collect();
    let pooled = reqwest::Client::builder()
        .timeout(PROBE_GIVE_UP)
        .build()
        .unwrap();
    let workers = (0..WORKERS).map(|_| {
        let req = server.request(&pooled, reqwest::Method::POST, "/v1/orders/p0/deduct");
        async move {
            let mut tally = Tally::default();
            while Instant::now() < until {
                let at = start.elapsed();
                tally.add(at, &timed(req.try_clone().unwrap()).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tally
        }
    });
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(PROBE_GIVE_UP)
        .build()
        .unwrap();
    let probes = async {
        let mut tally = Tally::default();
        while Instant::now() < until {
            let at = start.elapsed();
            tally.add(
                at,
                &timed(fresh.get(format!("{}/healthz", server.base))).await,
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tally
    };
    let (pooled, probes) = tokio::join!(futures::future::join_all(workers), probes);
    let pooled = pooled.into_iter().fold(Tally::default(), Tally::merge);
    let mut slow_seen = 0;
    for lane in lanes {
        slow_seen += lane.await.unwrap().len();
    }
    let text = server.metrics().await;
    eprintln!(
        "{kind:?}: pooled {pooled:?}; new-connection {probes:?}; {slow_seen} slow connections, evicted {}",
        metric(&text, r#"payguard_connections_closed_total{reason="evicted"}"#),
    );
    server.stop().await;
}
