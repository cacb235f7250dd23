//! `payguard bench http`: what the HTTP layer costs, asked by two clients.
//!
//! In one run, one process: (1) a plain axum handler that returns a constant
//! JSON body, the floor of any HTTP service here; then on one payguard server
//! (SQLite, durable) (2) the paired rows, each measured by our own client
//! (reqwest, closed loop: C keep-alive clients, N requests) and by wrk (an
//! outside client, C connections, a few seconds, the Lua scripts of
//! `scripts/wrk/`, see [`wrk`]): `GET /healthz` (a constant answer from the
//! same server), the first charges of fresh orders, and replays of PAID
//! orders; last (3) the first charges with one webhook endpoint (a receiver
//! that answers 200 at once) subscribed, reporting how long after the last
//! answer the last delivery arrived. Beside payguard's first charges, by both
//! clients, the [`ceiling`]: the same durable writes behind the plainest
//! server that can make them, so the run says how far payguard's own layers
//! are from what this machine and SQLite allow.
//!
//! Each row's ratio is against `GET /healthz` measured by the same client in
//! the same run, because absolute rates drift on a shared machine and each
//! client has its own cost. Each row also carries this process's CPU per
//! request ([`cpu`]): the server's alone under wrk, server plus our client
//! under our own. When wrk is missing its rows are skipped with a line saying
//! why, never silently (`--outside`).

use super::cpu;
mod ceiling;
mod wrk;

use crate::demo::LocalServer;
use hdrhistogram::Histogram;
use payguard::engine::Guard;
use serde::Serialize;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use wrk::{Outside, OutsideChoice, Scripts, Wrk, WrkResult};

#[derive(clap::Args, Debug)]
pub struct HttpBenchArgs {
    /// Small sizes for a smoke run.
    #[arg(long)]
    pub quick: bool,
    /// One JSON object instead of the table: every row (`sides`, each with its
    /// `client`), how wrk ran or why it did not (`outside`), and the ratios.
    #[arg(long)]
    pub json: bool,
    /// Write a self-contained HTML page with the comparison.
    #[arg(long)]
    pub html: Option<std::path::PathBuf>,
    /// Requests per row from our own client [default: 20000, --quick: 500].
    #[arg(long)]
    pub requests: Option<usize>,
    /// Concurrent clients (our client's tasks, and wrk's connections).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// The outside load generator run beside our own client: `auto` runs wrk
    /// when it is on PATH and otherwise says its rows are skipped; `wrk`
    /// requires it (exit 2 without); `none` runs our client only.
    #[arg(long, value_enum, default_value_t = OutsideChoice::Auto)]
    pub outside: OutsideChoice,
    /// Seconds per wrk row [default: 5, --quick: 1].
    #[arg(long)]
    pub outside_secs: Option<u64>,
    /// wrk's threads (`-t`; its connections are --concurrency).
    #[arg(long, default_value_t = 2)]
    pub outside_threads: usize,
}

/// The rows' names; the same name under two clients is a pair.
const PLAIN: &str = "plain axum handler (constant)";
const HEALTHZ: &str = "GET /healthz (constant, same server)";
const FRESH: &str = "payguard deduct (durable, SQLite)";
const REPLAYS: &str = "payguard deduct replays (paid orders)";
const HOOKED: &str = "payguard deduct + 1 webhook endpoint";
const CEILING: &str = "ceiling: axum + one writer thread, payguard's SQL (durable, SQLite)";

/// The clients: ours (reqwest, in this process) and the outside one.
const OURS: &str = "reqwest";
const WRK: &str = "wrk";

/// Longest wrk row, so a typo cannot hold a CI runner for hours.
const OUTSIDE_SECS_MAX: u64 = 600;

#[derive(Serialize, Clone)]
struct Side {
    target: &'static str,
    client: &'static str,
    requests: usize,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Failed or non-2xx answers (wrk: non-2xx plus socket errors).
    errors: usize,
    /// requests/s over `GET /healthz`'s measured by the same client.
    #[serde(skip_serializing_if = "Option::is_none")]
    over_healthz: Option<f64>,
    /// This process's CPU (user + system) per request over the row: the
    /// server's alone when the client is wrk; server and client for ours.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_us_per_req: Option<f64>,
    /// With a webhook endpoint: ms from the last answer to the last delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_ms: Option<f64>,
}

/// How the wrk rows ran, or why they did not.
#[derive(Serialize)]
#[serde(untagged)]
enum OutsideReport {
    Ran {
        tool: &'static str,
        threads: usize,
        connections: usize,
        secs: u64,
    },
    Skipped {
        skipped: String,
    },
}

/// How the webhook side waits for the last delivery before it gives up
/// (and reports the run as failed).
const DRAIN_WAIT_MS: u64 = 30_000;

async fn drive(
    client: &reqwest::Client,
    method: reqwest::Method,
    urls: Arc<Vec<String>>,
    concurrency: usize,
) -> anyhow::Result<(f64, Histogram<u64>, usize)> {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, method, urls, next, errors) = (
            client.clone(),
            method.clone(),
            urls.clone(),
            next.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("histogram bounds");
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= urls.len() {
                    break;
                }
                let t0 = Instant::now();
                match client.request(method.clone(), &urls[i]).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = h.record(t0.elapsed().as_micros() as u64);
            }
            h
        }));
    }
    let mut all = Histogram::<u64>::new(3)?;
    for t in tasks {
        all.add(t.await?)?;
    }
    Ok((
        started.elapsed().as_secs_f64(),
        all,
        errors.load(Ordering::Relaxed),
    ))
}

/// One row of our own client: `urls` (one request each) with `method`.
async fn ours(
    target: &'static str,
    client: &reqwest::Client,
    method: reqwest::Method,
    urls: Arc<Vec<String>>,
    concurrency: usize,
) -> anyhow::Result<Side> {
    let n = urls.len();
    let cpu0 = cpu::process_cpu_secs();
    let (secs, h, errors) = drive(client, method, urls, concurrency).await?;
    let cpu_us_per_req = cpu::us_per_request(cpu0, cpu::process_cpu_secs(), n as u64);
    Ok(Side {
        target,
        client: OURS,
        requests: n,
        rps: n as f64 / secs,
        p50_ms: h.value_at_quantile(0.5) as f64 / 1e3,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1e3,
        max_ms: h.max() as f64 / 1e3,
        errors,
        over_healthz: None,
        cpu_us_per_req,
        drain_ms: None,
    })
}

/// wrk, with its CPU reading and the script's own result, and the row it makes.
struct Outsider<'a> {
    wrk: &'a Wrk,
    scripts: &'a Scripts,
    secs: u64,
}

impl Outsider<'_> {
    async fn row(
        &self,
        target: &'static str,
        script: &str,
        url: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<(Side, WrkResult)> {
        let cpu0 = cpu::process_cpu_secs();
        let r = self
            .wrk
            .run(self.scripts, script, url, self.secs, env)
            .await?;
        let cpu_us_per_req = cpu::us_per_request(cpu0, cpu::process_cpu_secs(), r.requests);
        let side = Side {
            target,
            client: WRK,
            requests: r.requests as usize,
            rps: r.rps,
            p50_ms: r.p50_ms,
            p99_ms: r.p99_ms,
            max_ms: r.max_ms,
            errors: (r.non2xx + r.errors) as usize,
            over_healthz: None,
            cpu_us_per_req,
            drain_ms: None,
        };
        Ok((side, r))
    }
}

pub fn run(args: HttpBenchArgs) -> anyhow::Result<ExitCode> {
    let n = args
        .requests
        .unwrap_or(if args.quick { 500 } else { 20_000 });
    let secs = args.outside_secs.unwrap_or(if args.quick { 1 } else { 5 });
    anyhow::ensure!(
        n > 0 && args.concurrency > 0 && args.outside_threads > 0,
        "--requests, --concurrency and --outside-threads must be > 0"
    );
    anyhow::ensure!(
        (1..=OUTSIDE_SECS_MAX).contains(&secs),
        "--outside-secs must be 1..={OUTSIDE_SECS_MAX}"
    );
    let dir = tempfile::tempdir()?;
    let (wrk, report) = outside(&args, secs, dir.path())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut sides = rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency)
            .build()?;
        let outsider = wrk
            .as_ref()
            .map(|(wrk, scripts)| Outsider { wrk, scripts, secs });
        let mut sides = vec![plain_side(&client, n, args.concurrency).await?];
        sides.extend(
            paired_rows(&client, dir.path(), n, args.concurrency, outsider.as_ref()).await?,
        );
        sides.extend(
            ceiling_rows(&client, dir.path(), n, args.concurrency, outsider.as_ref()).await?,
        );
        sides.push(hooked_side(&client, dir.path(), n, args.concurrency).await?);
        Ok::<_, anyhow::Error>(sides)
    })?;
    set_ratios(&mut sides);
    let summary = Summary::of(&sides);
    if args.json {
        print_json(args.concurrency, &report, &sides, &summary)?;
    } else {
        print_table(n, args.concurrency, &report, &sides, &summary);
    }
    if let Some(path) = &args.html {
        std::fs::write(path, html(&sides, summary.fresh_over_plain))?;
    }
    let drained = sides
        .iter()
        .any(|s| s.target == HOOKED && s.drain_ms.is_some());
    Ok(if sides.iter().all(|s| s.errors == 0) && drained {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// wrk and its scripts when `--outside` runs it, and what the output says about it.
fn outside(
    args: &HttpBenchArgs,
    secs: u64,
    dir: &Path,
) -> anyhow::Result<(Option<(Wrk, Scripts)>, OutsideReport)> {
    match Outside::resolve(args.outside)? {
        Outside::Wrk(bin) => {
            let wrk = Wrk {
                bin,
                threads: args.outside_threads.min(args.concurrency),
                connections: args.concurrency,
            };
            let report = OutsideReport::Ran {
                tool: WRK,
                threads: wrk.threads,
                connections: wrk.connections,
                secs,
            };
            Ok((Some((wrk, Scripts::write(dir)?)), report))
        }
        Outside::Skipped(why) => {
            eprintln!("payguard bench http: wrk rows skipped: {why}");
            Ok((None, OutsideReport::Skipped { skipped: why }))
        }
    }
}

fn find<'a>(sides: &'a [Side], target: &str, client: &str) -> Option<&'a Side> {
    sides
        .iter()
        .find(|s| s.target == target && s.client == client)
}

/// Every row over `GET /healthz` of its own client.
fn set_ratios(sides: &mut [Side]) {
    let floors: Vec<(&'static str, f64)> = sides
        .iter()
        .filter(|s| s.target == HEALTHZ)
        .map(|s| (s.client, s.rps))
        .collect();
    for s in sides.iter_mut() {
        if let Some((_, floor)) = floors.iter().find(|(c, _)| *c == s.client) {
            s.over_healthz = Some(s.rps / floor.max(1e-9));
        }
    }
}

/// The ratios the table closes with and the JSON carries; one per client
/// where both ran.
struct Summary {
    fresh_over_plain: f64,
    hooked_over_fresh: f64,
    replays_over_plain: f64,
    fresh_over_healthz: serde_json::Map<String, serde_json::Value>,
    replays_over_healthz: serde_json::Map<String, serde_json::Value>,
    /// The [`ceiling`]'s charges over `/healthz`, per client.
    ceiling_over_healthz: serde_json::Map<String, serde_json::Value>,
    /// payguard's first charges over the ceiling's, per client.
    fresh_over_ceiling: serde_json::Map<String, serde_json::Value>,
}

impl Summary {
    fn of(sides: &[Side]) -> Self {
        let rps = |target, client| find(sides, target, client).map_or(0.0, |s| s.rps);
        let per_client = |target| {
            [OURS, WRK]
                .into_iter()
                .filter_map(|c| {
                    let r = find(sides, target, c)?.over_healthz?;
                    Some((c.to_owned(), serde_json::json!(r)))
                })
                .collect()
        };
        Summary {
            fresh_over_plain: rps(FRESH, OURS) / rps(PLAIN, OURS).max(1e-9),
            hooked_over_fresh: rps(HOOKED, OURS) / rps(FRESH, OURS).max(1e-9),
            replays_over_plain: rps(REPLAYS, OURS) / rps(PLAIN, OURS).max(1e-9),
            fresh_over_healthz: per_client(FRESH),
            replays_over_healthz: per_client(REPLAYS),
            ceiling_over_healthz: per_client(CEILING),
            fresh_over_ceiling: [OURS, WRK]
                .into_iter()
                .filter_map(|c| {
                    let (fresh, ceiling) = (find(sides, FRESH, c)?, find(sides, CEILING, c)?);
                    let r = fresh.rps / ceiling.rps.max(1e-9);
                    Some((c.to_owned(), serde_json::json!(r)))
                })
                .collect(),
        }
    }
}

/// (1) The floor: a plain axum handler returning a constant.
async fn plain_side(
    client: &reqwest::Client,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Side> {
    let app = axum::Router::new().route(
        "/constant",
        axum::routing::post(|| async { axum::Json(serde_json::json!({"ok": true})) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let plain = format!("http://{}/constant", listener.local_addr()?);
    let plain_server = tokio::spawn(async move { axum::serve(listener, app).await });
    let urls = Arc::new(vec![plain; n]);
    let floor = ours(PLAIN, client, reqwest::Method::POST, urls, concurrency).await;
    plain_server.abort();
    floor
}

/// A payguard server on SQLite in `dir`, built by the composition root.
async fn start_payguard(dir: &Path, name: &str) -> anyhow::Result<LocalServer> {
    let mut spec = payguard_server::app::AppSpec::new(
        payguard_server::app::Database::Sqlite(payguard::store::sqlite::SqliteConfig::new(
            dir.join(format!("http-{name}.db")),
        )),
        payguard::EngineConfig {
            guard: Guard::Full,
            instance_id: format!("bench-http-{name}"),
            ..payguard::EngineConfig::default()
        },
    );
    // The webhook receiver is on loopback.
    spec.webhooks.allow_private = true;
    LocalServer::start_spec(spec).await
}

/// Account `bench` and `n` fresh orders on it, created through the API (not
/// timed); returns their deduct URLs.
async fn our_orders(
    client: &reqwest::Client,
    base: &str,
    n: usize,
) -> anyhow::Result<Arc<Vec<String>>> {
    create_accounts(client, base, &["bench".to_owned()], 9_000_000_000_000).await?;
    let create: Vec<String> = (0..n).map(|i| format!("h{i}")).collect();
    let create_url = format!("{base}/v1/orders");
    for chunk in create.chunks(256) {
        let futs = chunk.iter().map(|id| {
            client
                .post(&create_url)
                .json(&serde_json::json!({"id": id, "account_id": "bench", "amount": 100}))
                .send()
        });
        for r in futures::future::join_all(futs).await {
            anyhow::ensure!(r?.status().is_success(), "order setup failed");
        }
    }
    Ok(Arc::new(
        create
            .iter()
            .map(|id| format!("{base}/v1/orders/{id}/deduct"))
            .collect(),
    ))
}

async fn create_accounts(
    client: &reqwest::Client,
    base: &str,
    ids: &[String],
    balance: i64,
) -> anyhow::Result<()> {
    for id in ids {
        let r = client
            .post(format!("{base}/v1/accounts"))
            .json(&serde_json::json!({"id": id, "balance": balance}))
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "account setup failed: {}",
            r.status()
        );
    }
    Ok(())
}

/// (2) On one payguard server, each row by our client and then by wrk:
/// `GET /healthz`, first charges of fresh orders, replays of the paid ones.
async fn paired_rows(
    client: &reqwest::Client,
    dir: &Path,
    n: usize,
    concurrency: usize,
    outsider: Option<&Outsider<'_>>,
) -> anyhow::Result<Vec<Side>> {
    let server = start_payguard(dir, "plain").await?;
    let base = server.url.clone();
    let deducts = both_clients_orders(client, outsider, &base, n).await?;
    let mut rows = Vec::new();
    let healthz = Arc::new(vec![format!("{base}/healthz"); n]);
    rows.push(ours(HEALTHZ, client, reqwest::Method::GET, healthz, concurrency).await?);
    if let Some(o) = outsider {
        rows.push(o.row(HEALTHZ, "healthz.lua", &base, &[]).await?.0);
    }
    let post = reqwest::Method::POST;
    rows.push(ours(FRESH, client, post.clone(), deducts.clone(), concurrency).await?);
    let charged = match outsider {
        Some(o) => {
            let (side, r) = o.row(FRESH, "deduct.lua", &base, &[]).await?;
            rows.push(side);
            r.per_thread_max
        }
        None => 0,
    };
    // Every order is paid now: the same requests again are replays.
    rows.push(ours(REPLAYS, client, post, deducts, concurrency).await?);
    if let Some(o) = outsider {
        let env = [("PG_REPLAY_OF", wrk::replay_of(charged).to_string())];
        rows.push(o.row(REPLAYS, "replay.lua", &base, &env).await?.0);
    }
    server.stop().await?;
    Ok(rows)
}

/// The [`ceiling`]'s first charges, by our client and by wrk, on orders made
/// as for payguard's rows (untimed).
async fn ceiling_rows(
    client: &reqwest::Client,
    dir: &Path,
    n: usize,
    concurrency: usize,
    outsider: Option<&Outsider<'_>>,
) -> anyhow::Result<Vec<Side>> {
    let server = ceiling::start(&dir.join("http-ceiling.db")).await?;
    let base = server.url.clone();
    let deducts = both_clients_orders(client, outsider, &base, n).await?;
    let mut rows = vec![ours(CEILING, client, reqwest::Method::POST, deducts, concurrency).await?];
    if let Some(o) = outsider {
        rows.push(o.row(CEILING, "deduct.lua", &base, &[]).await?.0);
    }
    server.stop();
    // The ceiling made real charges: every one in its ledger, balances right.
    let audit = payguard::store::sqlite::audit_connection(
        &mut payguard::store::sqlite::open_connection(&dir.join("http-ceiling.db"))?,
    )?;
    anyhow::ensure!(audit.ok, "the ceiling's database fails its audit");
    Ok(rows)
}

/// The orders both clients charge on the server at `base` (untimed): ours
/// ([`our_orders`], whose deduct URLs it returns) and wrk's ([`wrk_orders`]).
async fn both_clients_orders(
    client: &reqwest::Client,
    outsider: Option<&Outsider<'_>>,
    base: &str,
    n: usize,
) -> anyhow::Result<Arc<Vec<String>>> {
    let deducts = our_orders(client, base, n).await?;
    if let Some(o) = outsider {
        wrk_orders(client, o, base).await?;
    }
    Ok(deducts)
}

/// The accounts and orders wrk's scripts charge (`create.lua`, untimed),
/// enough for a first-charge row of the same length.
async fn wrk_orders(client: &reqwest::Client, o: &Outsider<'_>, base: &str) -> anyhow::Result<()> {
    let accounts: Vec<String> = (0..wrk::ACCOUNTS).map(|a| format!("a{a}")).collect();
    create_accounts(client, base, &accounts, 1_000_000_000_000).await?;
    let secs = o.secs * wrk::CREATE_SECS_PER_ROW_SEC;
    let created = o.wrk.run(o.scripts, "create.lua", base, secs, &[]).await?;
    anyhow::ensure!(
        created.non2xx == 0 && created.errors == 0,
        "wrk create.lua: {} non-2xx answers, {} socket errors",
        created.non2xx,
        created.errors
    );
    Ok(())
}

/// (3) The first charges of (2) by our client, with one webhook endpoint
/// subscribed; reports when the last delivery arrived.
async fn hooked_side(
    client: &reqwest::Client,
    dir: &Path,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Side> {
    let server = start_payguard(dir, "hooked").await?;
    let delivered = Arc::new(AtomicUsize::new(0));
    let receiver = subscribe(client, &server.url, delivered.clone()).await?;
    let deducts = our_orders(client, &server.url, n).await?;
    let mut side = ours(HOOKED, client, reqwest::Method::POST, deducts, concurrency).await?;
    let ended = Instant::now();
    while delivered.load(Ordering::Relaxed) < n
        && ended.elapsed().as_millis() < u128::from(DRAIN_WAIT_MS)
    {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    if delivered.load(Ordering::Relaxed) >= n {
        side.drain_ms = Some(ended.elapsed().as_secs_f64() * 1e3);
    }
    server.stop().await?;
    receiver.abort();
    Ok(side)
}

/// A receiver that answers 200 at once and counts deliveries, subscribed to
/// every event of the server at `base`.
async fn subscribe(
    client: &reqwest::Client,
    base: &str,
    delivered: Arc<AtomicUsize>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let delivered = delivered.clone();
            async move {
                delivered.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let r = client
        .post(format!("{base}/v1/webhook_endpoints"))
        .json(&serde_json::json!({ "url": url }))
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "endpoint setup failed: {}",
        r.status()
    );
    Ok(task)
}

fn print_json(
    concurrency: usize,
    outside: &OutsideReport,
    sides: &[Side],
    summary: &Summary,
) -> anyhow::Result<()> {
    crate::outln!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "concurrency": concurrency,
            "outside": outside,
            "sides": sides,
            "payguard_over_plain": summary.fresh_over_plain,
            "with_webhook_over_without": summary.hooked_over_fresh,
            "replays_over_plain": summary.replays_over_plain,
            "first_charges_over_healthz": summary.fresh_over_healthz,
            "replays_over_healthz": summary.replays_over_healthz,
            "ceiling_over_healthz": summary.ceiling_over_healthz,
            "first_charges_over_ceiling": summary.fresh_over_ceiling,
        }))?
    );
    Ok(())
}

fn print_table(
    n: usize,
    concurrency: usize,
    outside: &OutsideReport,
    sides: &[Side],
    summary: &Summary,
) {
    crate::outln!(
        "http bench: one run, one process; our client (reqwest): {n} requests per row, \
         {concurrency} keep-alive clients"
    );
    match outside {
        OutsideReport::Ran {
            threads,
            connections,
            secs,
            ..
        } => crate::outln!(
            "outside client: wrk -t{threads} -c{connections} -d{secs}s per row (scripts/wrk/*.lua)"
        ),
        OutsideReport::Skipped { skipped } => {
            crate::outln!("outside client: wrk rows skipped: {skipped}")
        }
    }
    crate::outln!();
    crate::outln!(
        "| target | client | requests | requests/s | p50 ms | p99 ms | max ms | errors \
         | × /healthz (same client) | CPU µs/req | last delivery after the last answer |"
    );
    crate::outln!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_owned(), |v| format!("{v:.prec$}"));
    for s in sides {
        crate::outln!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |",
            s.target,
            s.client,
            s.requests,
            s.rps,
            s.p50_ms,
            s.p99_ms,
            s.max_ms,
            s.errors,
            opt(s.over_healthz, 2),
            opt(s.cpu_us_per_req, 0),
            s.drain_ms
                .map_or("-".to_owned(), |ms| format!("{ms:.0} ms"))
        );
    }
    crate::outln!();
    print_summary(summary);
}

/// The notes and ratios under the table.
fn print_summary(summary: &Summary) {
    crate::outln!(
        "CPU µs/req: this process's; under wrk the server's alone, under reqwest server + client"
    );
    crate::outln!("payguard / plain handler: {:.2}×", summary.fresh_over_plain);
    crate::outln!(
        "with a webhook endpoint / without: {:.2}×",
        summary.hooked_over_fresh
    );
    crate::outln!(
        "replays / plain handler: {:.2}×",
        summary.replays_over_plain
    );
    for (what, ratios) in [
        ("first charges", &summary.fresh_over_healthz),
        ("replays", &summary.replays_over_healthz),
        ("the ceiling's charges", &summary.ceiling_over_healthz),
    ] {
        let each: Vec<String> = ratios
            .iter()
            .map(|(client, r)| format!("{client} {:.2}×", r.as_f64().unwrap_or(0.0)))
            .collect();
        crate::outln!("{what} / GET /healthz: {}", each.join(", "));
    }
    let each: Vec<String> = summary
        .fresh_over_ceiling
        .iter()
        .map(|(client, r)| format!("{client} {:.2}×", r.as_f64().unwrap_or(0.0)))
        .collect();
    crate::outln!(
        "payguard's first charges / the ceiling's: {}",
        each.join(", ")
    );
}

/// A self-contained page: one bar chart (inline SVG) of requests/s.
fn html(sides: &[Side], ratio: f64) -> String {
    let max = sides.iter().map(|s| s.rps).fold(1.0, f64::max);
    let mut bars = String::new();
    for (i, s) in sides.iter().enumerate() {
        let w = s.rps / max * 400.0;
        let y = 20 + i * 40;
        bars.push_str(&format!(
            "<rect x=\"340\" y=\"{y}\" width=\"{w:.1}\" height=\"26\" fill=\"#4a7bd0\"/>\
             <text x=\"4\" y=\"{}\">{} ({})</text><text x=\"{:.1}\" y=\"{}\">{:.0}/s, p99 {:.2} ms</text>",
            y + 18,
            s.target,
            s.client,
            350.0 + w,
            y + 18,
            s.rps,
            s.p99_ms
        ));
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>payguard bench http</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:2em}}text{{font-size:12px}}</style></head><body>\
         <h1>payguard bench http</h1><p>payguard / plain handler: {ratio:.2}×</p>\
         <svg width=\"900\" height=\"{}\">{bars}</svg></body></html>",
        30 + sides.len() * 40
    )
}
