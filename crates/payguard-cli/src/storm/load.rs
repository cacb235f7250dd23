//! The storm's load: the plan (accounts, orders, amounts; all from `--seed`),
//! then the waves of colliding duplicates, each request recorded. Orders paid in
//! two phases (`--two-phase`) are authorized in the same waves as the deducts;
//! their captures, voids and expiries are `two_phase.rs`'s.

use super::two_phase::{self, TwoPhasePlan};
use super::{StormArgs, REQUEST_TIMEOUT_MS};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Barrier;

/// Times a setup request (a create) is sent before the storm gives up on it.
const SETUP_ATTEMPTS_MAX: usize = 5;
/// Back-off step between setup attempts (ms), times the attempt number.
const SETUP_RETRY_MS: u64 = 100;
/// Orders per account, on average.
const ORDERS_PER_ACCOUNT: usize = 4;
/// Order amounts are drawn from this range (minor units).
const AMOUNT_MIN: i64 = 100;
const AMOUNT_MAX: i64 = 100_000;

#[derive(Debug, Clone)]
pub struct PlannedAccount {
    pub id: String,
    pub opening: i64,
    pub poor: bool,
}

#[derive(Debug, Clone)]
pub struct PlannedOrder {
    pub id: String,
    pub account: usize,
    pub amount: i64,
    /// Paid by authorize + capture/void (`--two-phase`) instead of deduct.
    pub two_phase: Option<TwoPhasePlan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    CreateAccount,
    CreateOrder,
    Deduct,
    Refund,
    Authorize,
    Capture,
    Void,
}

impl OpKind {
    /// Every kind, in the order reports list them.
    pub const ALL: [OpKind; 7] = [
        OpKind::CreateAccount,
        OpKind::CreateOrder,
        OpKind::Deduct,
        OpKind::Refund,
        OpKind::Authorize,
        OpKind::Capture,
        OpKind::Void,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::CreateAccount => "create_account",
            OpKind::CreateOrder => "create_order",
            OpKind::Deduct => "deduct",
            OpKind::Refund => "refund",
            OpKind::Authorize => "authorize",
            OpKind::Capture => "capture",
            OpKind::Void => "void",
        }
    }

    /// The kind a history names (`None`: not one the storm sends).
    pub fn parse(name: &str) -> Option<Self> {
        OpKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// One request and what came back. `status` 0: no answer (`error` says why).
#[derive(Debug, Clone)]
pub struct Record {
    pub kind: OpKind,
    pub order: Option<usize>,
    pub refund_id: Option<String>,
    pub amount: i64,
    pub target: usize,
    pub started_ms: f64,
    pub latency_us: u64,
    pub status: u16,
    pub entry_id: Option<String>,
    pub replayed: Option<bool>,
    pub code: Option<String>,
    /// Why no answer came back: `timeout`, `connect`, `reset` or `body`.
    pub error: Option<&'static str>,
    /// The answer's `order.hold_expires_at` (Unix ms), when it named one.
    pub expires_at_ms: Option<i64>,
}

pub struct Run {
    pub tag: String,
    pub accounts: Vec<PlannedAccount>,
    pub orders: Vec<PlannedOrder>,
    pub records: Vec<Record>,
    /// Seconds spent in the deduct, capture/void and refund waves (setup and
    /// the wait for expiries excluded).
    pub storm_secs: f64,
    /// Seconds spent in the deduct (and authorize) waves alone.
    pub deduct_secs: f64,
    /// True when `--duration` stopped the run before every wave went out.
    pub cut_short: bool,
    pub waves: usize,
}

pub struct Http {
    pub client: reqwest::Client,
    pub targets: Vec<String>,
    pub api_key: Option<String>,
}

impl Http {
    pub fn new(args: &StormArgs) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency.max(16))
            .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
            .build()?;
        Ok(Http {
            client,
            targets: args
                .target
                .iter()
                .map(|t| t.trim_end_matches('/').to_owned())
                .collect(),
            api_key: args.api_key.clone(),
        })
    }

    /// One request; `(0, Null)` when no answer came back.
    pub async fn call(
        &self,
        target: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        self.send(target, method, path, body)
            .await
            .unwrap_or((0, Value::Null))
    }

    /// One request: its status and JSON body (`Null` when not JSON), or why no
    /// answer came back. A body cut off mid-way is no answer: the client never
    /// learnt what the service did.
    pub async fn send(
        &self,
        target: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), &'static str> {
        let url = format!("{}{}", self.targets[target % self.targets.len()], path);
        let mut req = self.client.request(method, url);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| unanswered_reason(&e))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| match unanswered_reason(&e) {
                "timeout" => "timeout",
                _ => "body",
            })?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
}

/// Why a request got no answer, in one word.
fn unanswered_reason(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "reset"
    }
}

fn plan(args: &StormArgs, tag: &str) -> (Vec<PlannedAccount>, Vec<PlannedOrder>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let n_accounts = args.orders.div_ceil(ORDERS_PER_ACCOUNT).max(1);
    let mut orders: Vec<PlannedOrder> = (0..args.orders)
        .map(|i| PlannedOrder {
            id: format!("{tag}-o{i}"),
            account: i % n_accounts,
            amount: rng.random_range(AMOUNT_MIN..=AMOUNT_MAX),
            two_phase: None,
        })
        .collect();
    // Its own generator: `--two-phase 0` draws nothing and leaves the rest of
    // the plan as it was for every seed.
    two_phase::assign(args, &mut orders);
    let mut need = vec![0_i64; n_accounts];
    for o in &orders {
        need[o.account] += o.amount;
    }
    let accounts = need
        .iter()
        .enumerate()
        .map(|(i, need)| {
            let poor = rng.random::<f64>() < args.poor_ratio;
            PlannedAccount {
                id: format!("{tag}-a{i}"),
                opening: if poor { need / 2 } else { need + 1_000 },
                poor,
            }
        })
        .collect();
    (accounts, orders)
}

pub(super) struct Recorder {
    records: Mutex<Vec<Record>>,
    started: Instant,
    progress: indicatif::ProgressBar,
}

/// One request to send: what to record, the path, the body.
pub(super) type Request = (Record, String, Option<Value>);

impl Recorder {
    /// Every request recorded so far.
    pub(super) fn snapshot(&self) -> Vec<Record> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn push(&self, r: Record) {
        self.progress.inc(1);
        if let Ok(mut v) = self.records.lock() {
            v.push(r);
        }
    }
}

/// Fires `reqs` all at once behind one barrier, each from its own task.
pub(super) async fn wave(
    http: &Arc<Http>,
    rec: &Arc<Recorder>,
    reqs: Vec<Request>,
) -> Vec<(usize, u16)> {
    let barrier = Arc::new(Barrier::new(reqs.len()));
    let mut set = tokio::task::JoinSet::new();
    for (i, (mut record, path, body)) in reqs.into_iter().enumerate() {
        let http = http.clone();
        let rec = rec.clone();
        let barrier = barrier.clone();
        set.spawn(async move {
            barrier.wait().await;
            let t0 = Instant::now();
            record.started_ms = t0.duration_since(rec.started).as_secs_f64() * 1e3;
            let answer = http
                .send(record.target, reqwest::Method::POST, &path, body.as_ref())
                .await;
            record.latency_us = t0.elapsed().as_micros() as u64;
            let (status, body) = answer.unwrap_or_else(|reason| {
                record.error = Some(reason);
                (0, Value::Null)
            });
            record.status = status;
            record.entry_id = body["entry"]["id"].as_str().map(str::to_owned);
            record.replayed = body["replayed"].as_bool();
            record.code = body["error"]["code"].as_str().map(str::to_owned);
            record.expires_at_ms = body["order"]["hold_expires_at"].as_str().and_then(unix_ms);
            rec.push(record);
            (i, status)
        });
    }
    let mut statuses = Vec::new();
    while let Some(done) = set.join_next().await {
        if let Ok(s) = done {
            statuses.push(s);
        }
    }
    statuses
}

/// Setup requests (creates) are idempotent: one that got no answer or a 503 is
/// sent again, as a real client would, so a fault during setup does not turn
/// every later deduct of that order into a 404.
async fn setup_wave(
    http: &Arc<Http>,
    rec: &Arc<Recorder>,
    reqs: Vec<(Record, String, Option<Value>)>,
) {
    let mut pending = reqs;
    for attempt in 0..SETUP_ATTEMPTS_MAX {
        if pending.is_empty() {
            return;
        }
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(SETUP_RETRY_MS * attempt as u64)).await;
        }
        let statuses = wave(http, rec, pending.clone()).await;
        let retry: std::collections::HashSet<usize> = statuses
            .into_iter()
            .filter(|(_, s)| matches!(s, 0 | 503))
            .map(|(i, _)| i)
            .collect();
        pending = pending
            .into_iter()
            .enumerate()
            .filter(|(i, _)| retry.contains(i))
            .map(|(_, r)| r)
            .collect();
    }
}

/// An RFC 3339 timestamp as Unix milliseconds.
pub(super) fn unix_ms(at: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(at)
        .ok()
        .map(|t| t.timestamp_millis())
}

pub(super) fn record(kind: OpKind, order: Option<usize>, amount: i64, target: usize) -> Record {
    Record {
        kind,
        order,
        refund_id: None,
        amount,
        target,
        started_ms: 0.0,
        latency_us: 0,
        status: 0,
        entry_id: None,
        replayed: None,
        code: None,
        error: None,
        expires_at_ms: None,
    }
}

fn progress_bar(args: &StormArgs, total: u64) -> indicatif::ProgressBar {
    if args.json || args.no_progress || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} storm {msg:10} [{bar:40}] {pos}/{len} requests {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb
}

/// Setup: accounts, then orders, `per_wave` at a time (these do not collide).
async fn setup(
    http: &Arc<Http>,
    rec: &Arc<Recorder>,
    accounts: &[PlannedAccount],
    orders: &[PlannedOrder],
    per_wave: usize,
) {
    for chunk in accounts.chunks(per_wave) {
        let reqs = chunk
            .iter()
            .enumerate()
            .map(|(i, a)| {
                (
                    record(OpKind::CreateAccount, None, a.opening, i),
                    "/v1/accounts".to_owned(),
                    Some(json!({"id": a.id, "balance": a.opening})),
                )
            })
            .collect();
        setup_wave(http, rec, reqs).await;
    }
    for (c, chunk) in orders.chunks(per_wave).enumerate() {
        let reqs = chunk
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let idx = c * per_wave + i;
                (
                    record(OpKind::CreateOrder, Some(idx), o.amount, i),
                    "/v1/orders".to_owned(),
                    Some(json!({"id": o.id, "account_id": accounts[o.account].id, "amount": o.amount})),
                )
            })
            .collect();
        setup_wave(http, rec, reqs).await;
    }
}

/// The storm: every deduct `dup` times at once, each copy to another target.
/// Returns the waves sent and whether the deadline cut them short.
async fn deduct_waves(
    args: &StormArgs,
    http: &Arc<Http>,
    rec: &Arc<Recorder>,
    orders: &[PlannedOrder],
    deadline: Instant,
) -> (usize, bool) {
    let wave_orders = (args.concurrency / args.dup).max(1);
    let mut waves = 0;
    for (w, chunk) in orders.chunks(wave_orders).enumerate() {
        if Instant::now() >= deadline {
            return (waves, true);
        }
        let mut reqs = Vec::with_capacity(chunk.len() * args.dup);
        for (i, o) in chunk.iter().enumerate() {
            let idx = w * wave_orders + i;
            if let Some(tp) = &o.two_phase {
                reqs.extend(two_phase::authorize_requests(o, tp, idx, args.dup));
                continue;
            }
            for d in 0..args.dup {
                reqs.push((
                    record(OpKind::Deduct, Some(idx), o.amount, idx + d),
                    format!("/v1/orders/{}/deduct", o.id),
                    None,
                ));
            }
        }
        wave(http, rec, reqs).await;
        waves += 1;
    }
    (waves, false)
}

/// Refunds of some paid orders: the first duplicated, a second that fills the
/// amount, and a third that would cross it, all in one wave. Returns the waves
/// sent and whether the deadline cut them short.
async fn refund_waves(
    args: &StormArgs,
    http: &Arc<Http>,
    rec: &Arc<Recorder>,
    orders: &[PlannedOrder],
    deadline: Instant,
) -> (usize, bool) {
    // (order, what it paid): a deduct's whole amount, a capture's own amount.
    let paid: Vec<(usize, i64)> = {
        let mut paid: Vec<(usize, i64)> = rec
            .snapshot()
            .iter()
            .filter(|r| matches!(r.kind, OpKind::Deduct | OpKind::Capture) && r.status == 200)
            .filter_map(|r| Some((r.order?, r.amount)))
            .collect();
        paid.sort_unstable();
        paid.dedup();
        paid
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed ^ 0x5eed_f00d);
    let chosen: Vec<(usize, i64)> = paid
        .into_iter()
        .filter(|_| rng.random::<f64>() < args.refund_ratio)
        .collect();
    let per_refund_wave = (args.concurrency / (args.dup + 2)).max(1);
    let mut waves = 0;
    for chunk in chosen.chunks(per_refund_wave) {
        if Instant::now() >= deadline {
            return (waves, true);
        }
        let mut reqs = Vec::new();
        for &(idx, paid) in chunk {
            reqs.extend(refund_requests(&orders[idx], paid, idx, args.dup));
        }
        wave(http, rec, reqs).await;
        waves += 1;
    }
    (waves, false)
}

/// One paid order's refunds: half of what it paid (its amount, or what a
/// capture took) `dup` times, the rest once, then 1 more (which must be refused).
fn refund_requests(o: &PlannedOrder, paid: i64, idx: usize, dup: usize) -> Vec<Request> {
    let first = (paid / 2).max(1);
    let second = paid - first;
    let mut parts = vec![("a", first, dup)];
    if second > 0 {
        parts.push(("b", second, 1));
    }
    parts.push(("c", 1, 1));
    let mut reqs = Vec::new();
    for (suffix, amount, copies) in parts {
        let refund_id = format!("{}-rf{suffix}", o.id);
        for d in 0..copies {
            let mut r = record(OpKind::Refund, Some(idx), amount, idx + d);
            r.refund_id = Some(refund_id.clone());
            reqs.push((
                r,
                format!("/v1/orders/{}/refunds", o.id),
                Some(json!({"id": refund_id, "amount": amount})),
            ));
        }
    }
    reqs
}

pub async fn run(args: &StormArgs) -> anyhow::Result<Run> {
    let tag = args
        .run_tag
        .clone()
        .unwrap_or_else(|| format!("st{:x}", chrono::Utc::now().timestamp_millis()));
    let (accounts, orders) = plan(args, &tag);
    let http = Arc::new(Http::new(args)?);
    let refunds_expected = (orders.len() as f64 * args.refund_ratio * (args.dup + 2) as f64) as u64
        + (orders.len() as f64 * args.two_phase * args.dup.max(2) as f64) as u64;
    let total = (accounts.len() + orders.len() + orders.len() * args.dup) as u64 + refunds_expected;
    let rec = Arc::new(Recorder {
        records: Mutex::new(Vec::with_capacity(total as usize)),
        started: Instant::now(),
        progress: progress_bar(args, total),
    });
    let deadline = Instant::now() + Duration::from_secs(args.duration);

    rec.progress.set_message("setup");
    setup(&http, &rec, &accounts, &orders, args.concurrency.max(1)).await;

    rec.progress.set_message("deduct");
    let storm_started = Instant::now();
    let (deduct_waves, deducts_cut) = deduct_waves(args, &http, &rec, &orders, deadline).await;
    let deduct_secs = storm_started.elapsed().as_secs_f64();

    rec.progress.set_message("settle");
    let (settle, settles_cut) = if deducts_cut {
        (two_phase::Settle::default(), true)
    } else {
        two_phase::settle(args, &http, &rec, &orders, deadline).await
    };

    rec.progress.set_message("refund");
    let (refund_waves, refunds_cut) = if deducts_cut || settles_cut {
        (0, true)
    } else {
        refund_waves(args, &http, &rec, &orders, deadline).await
    };
    // The captures and voids racing each short hold's expiry.
    settle.races.join_all().await;
    let storm_secs = storm_started.elapsed().as_secs_f64();
    rec.progress.set_message("expiries");
    two_phase::await_expiries(args, &http, &rec.snapshot(), &orders).await;
    rec.progress.finish_and_clear();
    let records = std::mem::take(
        &mut *rec
            .records
            .lock()
            .map_err(|_| anyhow::anyhow!("recorder poisoned"))?,
    );
    Ok(Run {
        tag,
        accounts,
        orders,
        records,
        storm_secs,
        deduct_secs,
        cut_short: deducts_cut || settles_cut || refunds_cut,
        waves: deduct_waves + settle.waves + refund_waves,
    })
}
