//! `payguard bench http`: what the HTTP layer costs.
//!
//! The same closed-loop load (C concurrent keep-alive clients, N POSTs) is sent,
//! in one run, to (1) a plain axum handler that returns a constant JSON body,
//! the floor of any HTTP service here, and (2) payguard's deduct, each request a
//! durable charge of a fresh order on SQLite, and (3) the same deducts with one
//! webhook endpoint (a receiver that answers 200 at once) subscribed, so every
//! charge is also delivered; (3) reports how long after the last answer the
//! last delivery arrived (the backlog's drain), and (4) the deducts of (2) sent
//! again, each a replay of a paid order. The ratios say how much of
//! payguard's cost is HTTP, how much is the money path, and what delivering
//! every event costs the money path.

use crate::demo::LocalServer;
use hdrhistogram::Histogram;
use payguard::engine::Guard;
use serde::Serialize;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct HttpBenchArgs {
    /// Small sizes for a smoke run.
    #[arg(long)]
    pub quick: bool,
    #[arg(long)]
    pub json: bool,
    /// Write a self-contained HTML page with the comparison.
    #[arg(long)]
    pub html: Option<std::path::PathBuf>,
    /// Requests per target [default: 20000, --quick: 500].
    #[arg(long)]
    pub requests: Option<usize>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
}

#[derive(Serialize, Clone)]
struct Side {
    target: &'static str,
    requests: usize,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: usize,
    /// With a webhook endpoint: ms from the last answer to the last delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_ms: Option<f64>,
}

/// How long the webhook side waits for the last delivery before it gives up
/// (and reports the run as failed).
const DRAIN_WAIT_MS: u64 = 30_000;

async fn drive(
    client: &reqwest::Client,
    urls: Arc<Vec<String>>,
    concurrency: usize,
) -> anyhow::Result<(f64, Histogram<u64>, usize)> {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, urls, next, errors) =
            (client.clone(), urls.clone(), next.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("histogram bounds");
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= urls.len() {
                    break;
                }
                let t0 = Instant::now();
                match client.post(&urls[i]).send().await {
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

fn side(target: &'static str, n: usize, secs: f64, h: &Histogram<u64>, errors: usize) -> Side {
    Side {
        target,
        requests: n,
        rps: n as f64 / secs,
        p50_ms: h.value_at_quantile(0.5) as f64 / 1e3,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1e3,
        max_ms: h.max() as f64 / 1e3,
        errors,
        drain_ms: None,
    }
}

pub fn run(args: HttpBenchArgs) -> anyhow::Result<ExitCode> {
    let n = args
        .requests
        .unwrap_or(if args.quick { 500 } else { 20_000 });
    anyhow::ensure!(
        n > 0 && args.concurrency > 0,
        "--requests and --concurrency must be > 0"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let sides = rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency)
            .build()?;
        let floor = plain_side(&client, n, args.concurrency).await?;
        let (pay, replays) = payguard_side(&client, dir.path(), n, args.concurrency, false).await?;
        let (hooked, _) = payguard_side(&client, dir.path(), n, args.concurrency, true).await?;
        let replays = replays.expect("the plain side replays");
        Ok::<_, anyhow::Error>(vec![floor, pay, hooked, replays])
    })?;
    let ratio = sides[1].rps / sides[0].rps.max(1e-9);
    let webhook_ratio = sides[2].rps / sides[1].rps.max(1e-9);
    let replay_ratio = sides[3].rps / sides[0].rps.max(1e-9);
    if args.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"concurrency": args.concurrency, "sides": sides, "payguard_over_plain": ratio, "with_webhook_over_without": webhook_ratio, "replays_over_plain": replay_ratio})
            )?
        );
    } else {
        print_table(n, args.concurrency, &sides, ratio, webhook_ratio);
        crate::outln!("replays / plain handler: {replay_ratio:.2}×");
    }
    if let Some(path) = &args.html {
        std::fs::write(path, html(&sides, ratio))?;
    }
    Ok(
        if sides.iter().all(|s| s.errors == 0) && sides[2].drain_ms.is_some() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
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
    let (secs, h, errors) = drive(client, urls, concurrency).await?;
    let floor = side("plain axum handler (constant)", n, secs, &h, errors);
    plain_server.abort();
    Ok(floor)
}

/// (2) payguard: one fresh order per request, each a durable charge, then (4)
/// the same requests again, each a replay of a paid order; (3) the first
/// charges with a webhook endpoint subscribed (`hooked`).
async fn payguard_side(
    client: &reqwest::Client,
    dir: &Path,
    n: usize,
    concurrency: usize,
    hooked: bool,
) -> anyhow::Result<(Side, Option<Side>)> {
    let name = if hooked { "hooked" } else { "plain" };
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
    // The receiver is on loopback.
    spec.webhooks.allow_private = true;
    let server = LocalServer::start_spec(spec).await?;
    let delivered = Arc::new(AtomicUsize::new(0));
    let receiver = if hooked {
        Some(subscribe(client, &server.url, delivered.clone()).await?)
    } else {
        None
    };
    let setup = client
        .post(format!("{}/v1/accounts", server.url))
        .json(&serde_json::json!({"id": "bench", "balance": 9_000_000_000_000_i64}))
        .send()
        .await?;
    anyhow::ensure!(setup.status().is_success(), "account setup failed");
    let create: Vec<String> = (0..n).map(|i| format!("h{i}")).collect();
    let create_url = format!("{}/v1/orders", server.url);
    // Orders are created through the API too (not timed).
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
    let urls = Arc::new(
        create
            .iter()
            .map(|id| format!("{}/v1/orders/{id}/deduct", server.url))
            .collect::<Vec<_>>(),
    );
    let (secs, h, errors) = drive(client, urls.clone(), concurrency).await?;
    let ended = Instant::now();
    let target = if hooked {
        "payguard deduct + 1 webhook endpoint"
    } else {
        "payguard deduct (durable, SQLite)"
    };
    let mut pay = side(target, n, secs, &h, errors);
    if hooked {
        while delivered.load(Ordering::Relaxed) < n
            && ended.elapsed().as_millis() < u128::from(DRAIN_WAIT_MS)
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        if delivered.load(Ordering::Relaxed) >= n {
            pay.drain_ms = Some(ended.elapsed().as_secs_f64() * 1e3);
        }
    }
    // Every order is paid now: the same requests again are replays.
    let replays = if hooked {
        None
    } else {
        let (secs, h, errors) = drive(client, urls, concurrency).await?;
        Some(side(
            "payguard deduct replays (paid orders)",
            n,
            secs,
            &h,
            errors,
        ))
    };
    server.stop().await?;
    if let Some(r) = receiver {
        r.abort();
    }
    Ok((pay, replays))
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

fn print_table(n: usize, concurrency: usize, sides: &[Side], ratio: f64, webhook_ratio: f64) {
    crate::outln!("http bench: {n} POSTs per target, {concurrency} keep-alive clients, one run");
    crate::outln!();
    crate::outln!("| target | requests/s | p50 ms | p99 ms | max ms | errors | last delivery after the last answer |");
    crate::outln!("|---|---:|---:|---:|---:|---:|---:|");
    for s in sides {
        crate::outln!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
            s.target,
            s.rps,
            s.p50_ms,
            s.p99_ms,
            s.max_ms,
            s.errors,
            s.drain_ms
                .map_or("-".to_owned(), |ms| format!("{ms:.0} ms"))
        );
    }
    crate::outln!();
    crate::outln!("payguard / plain handler: {ratio:.2}×");
    crate::outln!("with a webhook endpoint / without: {webhook_ratio:.2}×");
}

/// A self-contained page: one bar chart (inline SVG) of requests/s.
fn html(sides: &[Side], ratio: f64) -> String {
    let max = sides.iter().map(|s| s.rps).fold(1.0, f64::max);
    let mut bars = String::new();
    for (i, s) in sides.iter().enumerate() {
        let w = s.rps / max * 500.0;
        let y = 20 + i * 40;
        bars.push_str(&format!(
            "<rect x=\"240\" y=\"{y}\" width=\"{w:.1}\" height=\"26\" fill=\"#4a7bd0\"/>\
             <text x=\"4\" y=\"{}\">{}</text><text x=\"{:.1}\" y=\"{}\">{:.0}/s, p99 {:.2} ms</text>",
            y + 18,
            s.target,
            250.0 + w,
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
