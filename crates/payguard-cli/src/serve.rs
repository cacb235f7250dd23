//! `payguard serve`: opens the store, starts the engine, serves until SIGINT or
//! SIGTERM, then drains for at most `--drain-timeout-ms` (see `payguard_server::serve`).

use crate::logging::{self, LogFormat};
use anyhow::{bail, Context};
use payguard::engine::Guard;
use payguard::store::postgres::PgConfig;
use payguard::store::sqlite::SqliteConfig;
use payguard::EngineConfig;
use payguard_server::app::{self, AppSpec, Database, RedisSpec};
use payguard_server::ApiKeys;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on. Without API keys (`--api-keys-file` or `PAYGUARD_API_KEYS`) only loopback is allowed.
    #[arg(long, env = "PAYGUARD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Database URL: `sqlite://PATH` (a plain path works too) or
    /// `postgres://USER@HOST[:PORT]/DB` (PostgreSQL, shared by several instances).
    #[arg(long, env = "PAYGUARD_DB", default_value = "sqlite://./payguard.db")]
    pub db: String,
    /// This instance's id in logs and /healthz [default: HOSTNAME-PID].
    #[arg(long, env = "PAYGUARD_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Log format [default: json when stdout is not a terminal, else text].
    #[arg(long, env = "PAYGUARD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// How money movements are protected: `full` (payguard), `seed` (the write-up's
    /// fix: per-order lock + one locked transaction per request), or `naive` (the
    /// incident itself; double charges; needs --i-know-this-double-charges).
    #[arg(long, env = "PAYGUARD_GUARD", value_enum, default_value_t = GuardArg::Full)]
    pub guard: GuardArg,
    /// Required by `--guard naive`, which reproduces the incident and double charges.
    #[arg(long, env = "PAYGUARD_I_KNOW_THIS_DOUBLE_CHARGES")]
    pub i_know_this_double_charges: bool,
    /// `naive` only: the pause between the in-memory check and the debit (ms),
    /// standing for the incident's slow calls.
    #[arg(long, env = "PAYGUARD_NAIVE_GAP_MS", default_value_t = DEFAULT_NAIVE_GAP_MS)]
    pub naive_gap_ms: u64,
    /// File of API keys, one a line (`#` comments). Also `PAYGUARD_API_KEYS`
    /// (comma separated). Without keys the server binds loopback only, unauthenticated.
    #[arg(long, env = "PAYGUARD_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// How long Idempotency-Key responses are kept: `24h`, `30m`, `90s` or seconds.
    #[arg(long, env = "PAYGUARD_IDEMPOTENCY_TTL", default_value = "24h", value_parser = parse_duration_ms)]
    pub idempotency_ttl: i64,
    /// How long a hold lasts when `POST /v1/orders/{id}/authorize` names no
    /// `hold_ttl_s`: `7d`, `2h`, `90s`; at most 30 days.
    #[arg(long, env = "PAYGUARD_HOLD_TTL", default_value = "7d", value_parser = parse_duration_ms)]
    pub hold_ttl: i64,
    /// How often this instance releases expired holds (every instance sweeps; each
    /// hold is released once): a hold is released within this long of its expiry.
    #[arg(long, env = "PAYGUARD_SWEEP_INTERVAL", default_value = "1s", value_parser = parse_duration_ms)]
    pub sweep_interval: i64,
    /// Let webhook endpoints be loopback, private or link-local addresses (also
    /// behind a name). Off by default: an API caller could otherwise make this
    /// server post to its own network (SSRF).
    #[arg(long, env = "PAYGUARD_WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,
    /// Attempts per webhook delivery (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h
    /// apart) before it is `failed`.
    #[arg(long, env = "PAYGUARD_WEBHOOK_RETRY_MAX", default_value_t = payguard_server::webhooks::RETRY_MAX_DEFAULT)]
    pub webhook_retry_max: u32,
    /// A file holding a 32-byte key (64 hex characters or base64): webhook
    /// secrets are then stored encrypted (XChaCha20-Poly1305), so a database dump
    /// alone cannot sign deliveries. Without it they are stored in the clear.
    #[arg(long, env = "PAYGUARD_WEBHOOK_KEY_FILE")]
    pub webhook_key_file: Option<PathBuf>,
    /// One webhook attempt's deadline (ms, at most 15000, API.md's limit).
    #[arg(long, env = "PAYGUARD_WEBHOOK_TIMEOUT_MS", default_value_t = payguard_server::webhooks::DELIVERY_TIMEOUT_MS)]
    pub webhook_timeout_ms: u64,
    /// How long an attempt's lease lasts: a delivery whose instance died is
    /// attempted again by another after this (ms; longer than the timeout).
    #[arg(long, env = "PAYGUARD_WEBHOOK_LEASE_MS", default_value_t = payguard_server::outbox::DELIVERY_LEASE_MS)]
    pub webhook_lease_ms: i64,
    /// Largest request body (bytes); larger gets 413 `body_too_large`.
    #[arg(long, env = "PAYGUARD_BODY_BYTES_MAX", default_value_t = payguard_server::limits::BODY_BYTES_MAX)]
    pub body_bytes_max: usize,
    /// Largest total of request header names and values (bytes); larger gets 431.
    #[arg(long, env = "PAYGUARD_HEADER_BYTES_MAX", default_value_t = payguard_server::limits::HEADER_BYTES_MAX)]
    pub header_bytes_max: usize,
    /// Request timeout (ms), from a complete request (reading it is under the header
    /// and body deadlines): reads are cut off, writes only before reaching the store (503).
    #[arg(long, env = "PAYGUARD_REQUEST_TIMEOUT_MS", default_value_t = payguard_server::limits::REQUEST_TIMEOUT_MS)]
    pub request_timeout_ms: u64,
    /// Open connections at most. At the limit a new connection makes room: the
    /// connection that has waited longest without a complete request (idle, or its
    /// request unfinished) is closed, else one stuck writing its answer; never one
    /// whose request is being handled. Only when all are being handled do new ones
    /// wait in the listen backlog.
    #[arg(long, env = "PAYGUARD_CONNECTIONS_MAX", default_value_t = payguard_server::limits::CONNECTIONS_MAX)]
    pub connections_max: usize,
    /// Deadline for a request's headers (ms), from accept or from a kept-alive
    /// connection's next first byte; past it the connection is closed.
    #[arg(long, env = "PAYGUARD_HEADER_READ_TIMEOUT_MS", default_value_t = payguard_server::limits::HEADER_READ_TIMEOUT_MS)]
    pub header_read_timeout_ms: u64,
    /// Deadline for a request's body (ms), from the end of its headers; past it the
    /// request gets 408 `request_timeout`, moves nothing, and the connection is closed.
    #[arg(long, env = "PAYGUARD_BODY_READ_TIMEOUT_MS", default_value_t = payguard_server::limits::BODY_READ_TIMEOUT_MS)]
    pub body_read_timeout_ms: u64,
    /// How long a keep-alive connection may wait idle for its next request (ms);
    /// longer than client pools' and load balancers' own idle timeouts.
    #[arg(long, env = "PAYGUARD_IDLE_TIMEOUT_MS", default_value_t = payguard_server::limits::IDLE_TIMEOUT_MS)]
    pub idle_timeout_ms: u64,
    /// Deadline for writing an answer (ms), from ready to handed to the socket; also
    /// the longest a client may leave its answer unread. Past it the connection is closed.
    #[arg(long, env = "PAYGUARD_WRITE_TIMEOUT_MS", default_value_t = payguard_server::limits::WRITE_TIMEOUT_MS)]
    pub write_timeout_ms: u64,
    /// On SIGTERM/SIGINT: connections without a complete request are closed at once;
    /// requests already with the engine get this long (ms) to be answered, then
    /// whatever is left is closed.
    #[arg(long, env = "PAYGUARD_DRAIN_TIMEOUT_MS", default_value_t = payguard_server::limits::DRAIN_TIMEOUT_MS)]
    pub drain_timeout_ms: u64,
    /// Redis for cross-instance per-order locks with fencing tokens
    /// (`redis://host:port`); without it the lock is local to this process.
    #[arg(long, env = "PAYGUARD_REDIS")]
    pub redis: Option<String>,
    /// TTL of a Redis order lock (ms); a holder paused past it is fenced out.
    #[arg(long, env = "PAYGUARD_LOCK_TTL_MS", default_value_t = payguard::lock::LOCK_TTL_MS)]
    pub lock_ttl_ms: u64,
    /// Prefix of payguard's Redis keys (several deployments can share one Redis).
    #[arg(long, env = "PAYGUARD_REDIS_PREFIX", default_value = "payguard")]
    pub redis_prefix: String,
    /// PostgreSQL: client-side deadline of one batch (ms). A connection the
    /// network swallowed never answers; past this the connection is dropped and
    /// an unanswered COMMIT's fate is looked up before anyone is answered.
    #[arg(long, env = "PAYGUARD_PG_BATCH_DEADLINE_MS", default_value_t = payguard::store::postgres::BATCH_DEADLINE_MS)]
    pub pg_batch_deadline_ms: u64,
    /// PostgreSQL: most connections this instance opens. Instances × this must fit
    /// the server's max_connections (the lanes' batches, reads and lock epochs share them).
    #[arg(long, env = "PAYGUARD_PG_POOL_MAX", default_value_t = payguard::store::postgres::POOL_CONNECTIONS_MAX)]
    pub pg_pool_max: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// `7d`, `24h`, `30m`, `90s`, `1500ms` or a plain number of seconds, in milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (num, unit_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('d') {
        (n, 86_400_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000)
    } else {
        (s, 1_000)
    };
    let n: i64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 7d, 24h, 30m, 90s or 1500ms"))?;
    n.checked_mul(unit_ms)
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("{s:?} must be a positive duration"))
}

/// A few milliseconds, like the incident's slow calls between check and act.
pub const DEFAULT_NAIVE_GAP_MS: u64 = 5;
/// Longest accepted naive gap; longer only makes the demo slow.
pub const NAIVE_GAP_MS_MAX: u64 = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GuardArg {
    Full,
    Seed,
    Naive,
}

impl GuardArg {
    pub fn guard(self, naive_gap_ms: u64) -> Guard {
        match self {
            GuardArg::Full => Guard::Full,
            GuardArg::Seed => Guard::Seed,
            GuardArg::Naive => Guard::Naive {
                gap_ms: naive_gap_ms,
            },
        }
    }
}

pub const NAIVE_WARNING: &str = "\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  payguard --guard naive REPRODUCES THE INCIDENT: IT DOUBLE CHARGES.          !!
!!  It checks an in-memory cache, pauses, then debits with no condition, no    !!
!!  lane, no lock, on a database without the money constraints. Use it only to !!
!!  watch the checks fail. Never point it at real money.                      !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!";

/// The engine's limits, shared by `serve` and `bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// Number of lanes (order ids are hashed onto them; one owner task each).
    #[arg(long, env = "PAYGUARD_LANES", default_value_t = 16)]
    pub lanes: usize,
    /// Most distinct operations a lane commits in one batch.
    #[arg(long, env = "PAYGUARD_BATCH_MAX", default_value_t = 256)]
    pub batch_max: usize,
    /// How long a lane waits to fill a batch when none is in flight (microseconds).
    #[arg(long, env = "PAYGUARD_BATCH_WAIT_US", default_value_t = 100)]
    pub batch_wait_us: u64,
    /// Requests that may wait in one lane; past it requests get 503 at once.
    #[arg(long, env = "PAYGUARD_LANE_QUEUE_DEPTH_MAX", default_value_t = 4096)]
    pub lane_queue_depth_max: usize,
    /// Most operations the SQLite writer commits in one transaction.
    #[arg(long, env = "PAYGUARD_WRITER_BATCH_MAX", default_value_t = 1024)]
    pub writer_batch_max: usize,
    /// Orders kept in the read cache (0 disables it).
    #[arg(long, env = "PAYGUARD_ORDER_CACHE_ENTRIES_MAX", default_value_t = payguard::cache::ORDER_CACHE_ENTRIES_MAX)]
    pub order_cache_entries_max: usize,
}

impl EngineArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, v) in [
            ("--lanes", self.lanes),
            ("--batch-max", self.batch_max),
            ("--lane-queue-depth-max", self.lane_queue_depth_max),
            ("--writer-batch-max", self.writer_batch_max),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.batch_wait_us > 1_000_000 {
            bail!("--batch-wait-us is capped at 1000000 (1 s); a longer wait only adds latency");
        }
        Ok(())
    }

    pub fn engine_config(&self, guard: Guard, instance_id: String) -> EngineConfig {
        EngineConfig {
            guard,
            lanes: self.lanes,
            batch_max: self.batch_max,
            batch_wait_us: self.batch_wait_us,
            lane_queue_depth_max: self.lane_queue_depth_max,
            order_cache_entries_max: self.order_cache_entries_max,
            instance_id,
            failpoint_pause_after_lock_ms: 0,
        }
    }
}

/// The database `--db` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DbUrl {
    Sqlite(PathBuf),
    /// A `postgres://` or `postgresql://` URL, passed to the driver as is.
    Postgres(String),
}

impl DbUrl {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        if is_postgres(url) {
            Ok(DbUrl::Postgres(url.to_owned()))
        } else {
            sqlite_path(url).map(DbUrl::Sqlite)
        }
    }

    /// For logs: the path, or the URL without its password.
    pub fn display(&self) -> String {
        match self {
            DbUrl::Sqlite(p) => p.display().to_string(),
            DbUrl::Postgres(url) => redact_password(url),
        }
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// `sqlite://PATH`, `sqlite:PATH` or a plain path.
pub fn sqlite_path(url: &str) -> anyhow::Result<PathBuf> {
    if is_postgres(url) {
        bail!(
            "{} is a PostgreSQL URL; this needs sqlite://PATH",
            redact_password(url)
        );
    }
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    if path.is_empty() {
        bail!("--db {url:?} names no file");
    }
    Ok(PathBuf::from(path))
}

fn load_keys(args: &ServeArgs) -> anyhow::Result<ApiKeys> {
    let mut keys: Vec<String> = std::env::var("PAYGUARD_API_KEYS")
        .unwrap_or_default()
        .split(',')
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .collect();
    if let Some(path) = &args.api_keys_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --api-keys-file {}", path.display()))?;
        keys.extend(payguard_server::auth::key_file_lines(&text).map(str::to_owned));
    }
    Ok(ApiKeys::new(keys)?)
}

pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    args.engine.validate()?;
    let keys = load_keys(&args)?;
    validate(&args, &keys)?;
    let db = DbUrl::parse(&args.db)?;
    check_naive(&args, &db)?;
    let guard = args.guard.guard(args.naive_gap_ms);
    let instance = args.instance_id.clone().unwrap_or_else(default_instance_id);
    let _log_guard = logging::init(
        args.log_format
            .unwrap_or_else(LogFormat::default_for_stdout),
    );
    // Reliability tests arm failpoints with FAILPOINTS (test builds only).
    let _failpoints = payguard::failpoint::arm_from_env().map_err(anyhow::Error::msg)?;
    let spec = app_spec(&args, &db, guard, &instance, keys)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve_app(&args, &db, spec, guard, &instance))?;
    Ok(ExitCode::SUCCESS)
}

/// The flags' own limits, and the refusal to serve without keys beyond loopback.
fn validate(args: &ServeArgs, keys: &ApiKeys) -> anyhow::Result<()> {
    if keys.is_empty() && !args.listen.ip().is_loopback() {
        bail!(
            "refusing to listen on {} without API keys: with none configured payguard serves \
             without authentication, so it only binds loopback (127.0.0.1 or ::1); set \
             PAYGUARD_API_KEYS or --api-keys-file",
            args.listen
        );
    }
    anyhow::ensure!(
        args.body_bytes_max >= 1024,
        "--body-bytes-max must be at least 1024"
    );
    anyhow::ensure!(
        args.header_bytes_max >= 1024,
        "--header-bytes-max must be at least 1024"
    );
    anyhow::ensure!(
        args.request_timeout_ms >= 1,
        "--request-timeout-ms must be at least 1"
    );
    anyhow::ensure!(
        args.connections_max >= 1,
        "--connections-max must be at least 1"
    );
    for (name, ms) in [
        ("--header-read-timeout-ms", args.header_read_timeout_ms),
        ("--body-read-timeout-ms", args.body_read_timeout_ms),
        ("--idle-timeout-ms", args.idle_timeout_ms),
        ("--write-timeout-ms", args.write_timeout_ms),
        ("--drain-timeout-ms", args.drain_timeout_ms),
    ] {
        anyhow::ensure!(ms >= 1, "{name} must be at least 1");
    }
    anyhow::ensure!(args.pg_pool_max >= 1, "--pg-pool-max must be at least 1");
    anyhow::ensure!(
        (1..=payguard_server::webhooks::RETRY_MAX_LIMIT).contains(&args.webhook_retry_max),
        "--webhook-retry-max must be 1..={}",
        payguard_server::webhooks::RETRY_MAX_LIMIT
    );
    anyhow::ensure!(
        (1..=payguard_server::webhooks::DELIVERY_TIMEOUT_MS).contains(&args.webhook_timeout_ms),
        "--webhook-timeout-ms must be 1..={}",
        payguard_server::webhooks::DELIVERY_TIMEOUT_MS
    );
    anyhow::ensure!(
        args.webhook_lease_ms > args.webhook_timeout_ms as i64,
        "--webhook-lease-ms must be longer than --webhook-timeout-ms, or a slow attempt would be made twice"
    );
    anyhow::ensure!(
        args.hold_ttl <= payguard_server::HOLD_TTL_S_MAX * 1000,
        "--hold-ttl must be at most 30 days (2592000 s), the longest hold API.md allows"
    );
    Ok(())
}

/// The server's limits, as the flags set them.
fn limits(args: &ServeArgs) -> payguard_server::Limits {
    payguard_server::Limits {
        body_bytes_max: args.body_bytes_max,
        header_bytes_max: args.header_bytes_max,
        request_timeout_ms: args.request_timeout_ms,
        connections_max: args.connections_max,
        idempotency_ttl_ms: args.idempotency_ttl,
        header_read_timeout_ms: args.header_read_timeout_ms,
        body_read_timeout_ms: args.body_read_timeout_ms,
        idle_timeout_ms: args.idle_timeout_ms,
        write_timeout_ms: args.write_timeout_ms,
        drain_timeout_ms: args.drain_timeout_ms,
    }
}

/// `--guard naive` only on SQLite, only with its warning and its flag.
fn check_naive(args: &ServeArgs, db: &DbUrl) -> anyhow::Result<()> {
    if args.guard == GuardArg::Naive {
        if let DbUrl::Postgres(_) = db {
            // The naive schema exists only for SQLite: the naive mode is the
            // one-command local demo, never something to point at a shared database.
            bail!("--guard naive runs on SQLite only");
        }
        eprintln!("{NAIVE_WARNING}");
        if !args.i_know_this_double_charges {
            bail!("--guard naive refuses to start without --i-know-this-double-charges");
        }
        if args.naive_gap_ms > NAIVE_GAP_MS_MAX {
            bail!("--naive-gap-ms is capped at {NAIVE_GAP_MS_MAX}");
        }
    }
    Ok(())
}

/// What the composition root assembles for these flags.
fn app_spec(
    args: &ServeArgs,
    db: &DbUrl,
    guard: Guard,
    instance: &str,
    keys: ApiKeys,
) -> anyhow::Result<AppSpec> {
    let database = match db {
        DbUrl::Sqlite(path) => {
            let mut cfg = SqliteConfig::new(path);
            cfg.writer_batch_ops_max = args.engine.writer_batch_max;
            Database::Sqlite(cfg)
        }
        DbUrl::Postgres(url) => Database::Postgres(Box::new(PgConfig {
            batch_deadline_ms: args.pg_batch_deadline_ms,
            pool_connections_max: args.pg_pool_max,
            ..PgConfig::from_url(url)?
        })),
    };
    let spec = AppSpec {
        redis: args.redis.as_ref().map(|url| RedisSpec {
            url: url.clone(),
            prefix: args.redis_prefix.clone(),
            ttl: std::time::Duration::from_millis(args.lock_ttl_ms),
        }),
        keys,
        limits: limits(args),
        two_phase: payguard_server::TwoPhase {
            hold_ttl_ms: args.hold_ttl,
            sweep_interval_ms: args.sweep_interval as u64,
        },
        webhooks: webhook_settings(args)?,
        ..AppSpec::new(
            database,
            args.engine.engine_config(guard, instance.to_owned()),
        )
    };
    Ok(spec)
}

/// The `--webhook-*` flags; secrets in the clear only with a warning.
fn webhook_settings(args: &ServeArgs) -> anyhow::Result<payguard_server::outbox::WebhookSettings> {
    let sealer =
        payguard_server::webhooks::SecretSealer::from_key_file(args.webhook_key_file.as_deref())?;
    if sealer.is_plaintext() {
        tracing::warn!(
            event = "webhook_secrets_in_clear",
            "no --webhook-key-file: webhook signing secrets are stored unencrypted; a database dump could forge deliveries"
        );
    }
    Ok(payguard_server::outbox::WebhookSettings {
        allow_private: args.webhook_allow_private,
        retry_max: args.webhook_retry_max,
        sealer: std::sync::Arc::new(sealer),
        timeout_ms: args.webhook_timeout_ms,
        lease_ms: args.webhook_lease_ms,
        ..Default::default()
    })
}

/// Assembles the app, binds, serves until SIGTERM or Ctrl-C, drains.
async fn serve_app(
    args: &ServeArgs,
    db: &DbUrl,
    spec: AppSpec,
    guard: Guard,
    instance: &str,
) -> anyhow::Result<()> {
    let no_keys = spec.keys.is_empty();
    let app = app::build(spec)
        .await
        .with_context(|| format!("starting on {}", db.display()))?;
    let engine = app.engine().clone();
    let store_kind = engine.store().kind();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    if no_keys {
        tracing::warn!(
            event = "auth_disabled",
            "no API keys configured: serving without authentication on loopback only"
        );
    }
    tracing::info!(
        event = "server_started",
        listen = %local,
        db = %db.display(),
        store = store_kind,
        guard = guard.name(),
        lock = engine.lock_kind(),
        inst = instance
    );
    // The SQLite file stays this process's until the server has drained.
    let app::App {
        state,
        sqlite_owner,
    } = app;
    payguard_server::serve(listener, state, shutdown_signal()).await?;
    drop(sqlite_owner);
    tracing::info!(event = "server_stopped", inst = instance);
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!(
        event = "shutdown_requested",
        "closing unfinished connections, draining in-flight requests"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_urls_pick_the_store_and_hide_passwords() {
        assert_eq!(
            DbUrl::parse("sqlite://./x.db").unwrap(),
            DbUrl::Sqlite(PathBuf::from("./x.db"))
        );
        assert_eq!(
            DbUrl::parse("x.db").unwrap(),
            DbUrl::Sqlite(PathBuf::from("x.db"))
        );
        assert_eq!(
            DbUrl::parse("postgres://postgres@127.0.0.1/mydb").unwrap(),
            DbUrl::Postgres("postgres://postgres@127.0.0.1/mydb".into())
        );
        assert_eq!(
            redact_password("postgresql://u:s3cret@h:5432/db"),
            "postgresql://u:***@h:5432/db"
        );
        assert_eq!(redact_password("postgres://u@h/db"), "postgres://u@h/db");
        assert!(sqlite_path("postgres://u@h/db").is_err());
    }
}
