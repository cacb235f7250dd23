//! Helpers for tests that run real `payguard serve` processes.
#![allow(dead_code)]

pub mod proxy;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// PostgreSQL connections per test instance (`--pg-pool-max`).
const TEST_PG_POOL_MAX: &str = "4";
/// How long a child server may take to start.
const START_WAIT: Duration = Duration::from_secs(30);

pub struct Server {
    child: Child,
    pub url: String,
    pub log: PathBuf,
}

/// Starts `payguard serve --listen 127.0.0.1:0 …` with JSON logs in `dir/name.log`
/// and returns once it logged `server_started` (with the port it bound).
// The child is handed back inside `Server` and reaped by `stop`.
#[allow(clippy::zombie_processes)]
pub fn start(dir: &Path, name: &str, db: &str, extra: &[&str]) -> Server {
    start_with_env(dir, name, db, extra, &[])
}

/// Like [`start`], with extra environment variables (failpoints).
#[allow(clippy::zombie_processes)]
pub fn start_with_env(
    dir: &Path,
    name: &str,
    db: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Server {
    let log = dir.join(format!("{name}.log"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_payguard"))
        // Tests run many instances at once against one PostgreSQL: keep each
        // instance's pool small so they fit its max_connections together.
        .env("PAYGUARD_PG_POOL_MAX", TEST_PG_POOL_MAX)
        .envs(env.iter().copied())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--instance-id",
            name,
            "--db",
            db,
        ])
        .args(extra)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let file = std::fs::File::open(&log).unwrap();
        for line in std::io::BufReader::new(file).lines() {
            let line = line.unwrap();
            if line.contains("\"server_started\"") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let url = format!("http://{}", v["listen"].as_str().unwrap());
                return Server { child, url, log };
            }
        }
        if started.elapsed() >= START_WAIT || matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{name} did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Server {
    /// `kill -9`: no drain, no goodbye. Returns once the process is gone.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to end by itself; returns its exit code.
    pub fn wait_exit(mut self) -> Option<i32> {
        self.child.wait().ok().and_then(|s| s.code())
    }

    /// Sends a signal (`STOP`, `CONT`, …) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits until the log has a line containing every one of `needles`.
    pub fn wait_for_log(&self, needles: &[&str], within: Duration) -> String {
        let started = Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_owned();
            }
            assert!(
                started.elapsed() < within,
                "no log line with {needles:?} within {within:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits up to 2 s for the process to end by itself: `Ok(exit code)`, or the
    /// server back when it is still running.
    pub fn try_exit(mut self) -> Result<Option<i32>, Server> {
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Ok(status.code());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(self)
    }

    /// SIGTERM, then waits for the drain; the exit must be clean.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exited with {status}");
    }
}

/// A test that fails part-way must not leave its servers running (holding ports,
/// database connections and Redis locks for the tests after it).
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn pg_base() -> Option<String> {
    match std::env::var("PAYGUARD_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("SKIP: PAYGUARD_TEST_POSTGRES_URL is not set");
            None
        }
    }
}

pub fn redis_url() -> Option<String> {
    match std::env::var("PAYGUARD_TEST_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("SKIP: PAYGUARD_TEST_REDIS_URL is not set");
            None
        }
    }
}

/// The URL of database `name` on the server of `base`.
pub fn pg_url(base: &str, name: &str) -> String {
    let (server, _) = base.rsplit_once('/').expect("a postgres://host/db URL");
    format!("{server}/{name}")
}

/// A Redis key prefix no other test run uses.
pub fn unique_prefix(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// A private redis-server on a free port, for tests that flush, stop or restart it.
pub struct PrivateRedis {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
}

impl PrivateRedis {
    pub fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut r = PrivateRedis {
            child: None,
            port,
            url: format!("redis://127.0.0.1:{port}"),
        };
        r.restart().then_some(r)
    }

    /// (Re)starts the server on the same port; false if it cannot.
    pub fn restart(&mut self) -> bool {
        self.kill();
        let Ok(child) = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
        else {
            eprintln!("SKIP: redis-server is not on PATH");
            return false;
        };
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn flushall(&self) {
        if let Ok(client) = redis::Client::open(self.url.as_str()) {
            if let Ok(mut conn) = client.get_connection() {
                let _: Result<(), _> = redis::cmd("FLUSHALL").query(&mut conn);
            }
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GET `url`, and its JSON body.
pub async fn get_json(http: &reqwest::Client, url: String) -> serde_json::Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// The debit entries of order `oid`, read through the server at `base`.
pub async fn debits(http: &reqwest::Client, base: &str, oid: &str) -> Vec<serde_json::Value> {
    let body = get_json(http, format!("{base}/v1/orders/{oid}/entries")).await;
    body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "debit")
        .cloned()
        .collect()
}

/// The log must say `deduct_rejected reason=stale_fencing_token` for request `req`.
pub fn assert_refused_as_stale(log: &str, req: &str) {
    let needle = format!("\"req\":\"{req}\"");
    assert!(
        log.lines()
            .any(|l| l.contains("\"event\":\"deduct_rejected\"")
                && l.contains("\"reason\":\"stale_fencing_token\"")
                && l.contains(&needle)),
        "the log must say deduct_rejected reason=stale_fencing_token for {req}:\n{log}"
    );
}
