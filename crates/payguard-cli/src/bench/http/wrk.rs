//! The outside load generator of `payguard bench http`: wrk, driven by the Lua
//! scripts of `scripts/wrk/`.
//!
//! Our own client (reqwest, in the server's process) could flatter or
//! penalise the server in ways a client we did not write would not, so each
//! paired row is also measured by wrk in the same run. The scripts are the
//! ones `scripts/http-wrk.sh` runs: they are compiled into the binary with
//! `include_str!` (one copy, in `scripts/wrk/`) and written to a temp
//! directory per run, since wrk reads a script from a file.
//!
//! A Rust binary does not install packages: when wrk is not on `PATH` the
//! caller is told why its rows are skipped ([`Outside::resolve`]), never
//! silently. What wrk prints is parsed by [`parse_result`], a pure function
//! tested on wrk's real output.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The scripts of `scripts/wrk/`, by file name. `common.lua` is loaded by the
/// others from their own directory, so all of them are written side by side.
const SCRIPTS: [(&str, &str); 5] = [
    (
        "common.lua",
        include_str!("../../../../../scripts/wrk/common.lua"),
    ),
    (
        "create.lua",
        include_str!("../../../../../scripts/wrk/create.lua"),
    ),
    (
        "deduct.lua",
        include_str!("../../../../../scripts/wrk/deduct.lua"),
    ),
    (
        "healthz.lua",
        include_str!("../../../../../scripts/wrk/healthz.lua"),
    ),
    (
        "replay.lua",
        include_str!("../../../../../scripts/wrk/replay.lua"),
    ),
];

/// Accounts the scripts charge (`create.lua`: `a0` … `a63`).
pub const ACCOUNTS: usize = 64;

/// Replays cycle over at most this many paid orders per wrk thread (as
/// `scripts/http-wrk.sh` does).
const REPLAY_OF_MAX: u64 = 5_000;

/// How much longer than a timed row the untimed order creation runs, so the
/// first-charge row never runs out of orders (creating is cheaper than charging).
pub const CREATE_SECS_PER_ROW_SEC: u64 = 2;

/// wrk's own request timeout is 2 s; a row that has not ended this long after
/// its duration is stuck and is killed.
const WRK_GRACE_SECS: u64 = 30;

/// Which outside client `bench http` runs beside its own.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutsideChoice {
    /// wrk when it is on PATH; otherwise its rows are skipped, with a line saying so.
    Auto,
    /// wrk, and fail (exit 2) when it is not on PATH.
    Wrk,
    /// No outside client: our own client's rows only.
    None,
}

/// The outcome of [`OutsideChoice`]: wrk at a path, or why its rows are skipped.
#[derive(Debug)]
pub enum Outside {
    Wrk(PathBuf),
    Skipped(String),
}

impl Outside {
    pub fn resolve(choice: OutsideChoice) -> anyhow::Result<Self> {
        let found = find_on_path("wrk");
        match (choice, found) {
            (OutsideChoice::None, _) => Ok(Outside::Skipped("--outside none".to_owned())),
            (_, Some(path)) => Ok(Outside::Wrk(path)),
            (OutsideChoice::Auto, None) => Ok(Outside::Skipped(
                "`wrk` is not on PATH (install it: apt-get install -y wrk; \
                 --outside none skips it on purpose)"
                    .to_owned(),
            )),
            (OutsideChoice::Wrk, None) => anyhow::bail!(
                "--outside wrk: `wrk` is not on PATH (install it: apt-get install -y wrk)"
            ),
        }
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// One wrk run: the `RESULT` line `scripts/wrk/common.lua` prints at the end.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkResult {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub requests: u64,
    /// Answers that were not 2xx.
    pub non2xx: u64,
    /// Socket errors: connect, read, write, timeout.
    pub errors: u64,
    /// The most requests one wrk thread built (order ids `o<thread>_0` … `_<n-1>`).
    pub per_thread_max: u64,
}

/// Finds and parses the `RESULT key=value …` line in wrk's standard output.
/// Every field must be present and numeric; anything else is an error naming
/// what is missing, so a changed script cannot yield a row of zeros.
pub fn parse_result(stdout: &str) -> anyhow::Result<WrkResult> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .context("no RESULT line in wrk's output")?;
    let field = |key: &str| -> anyhow::Result<&str> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .with_context(|| format!("no {key}= in wrk's RESULT line: {line}"))
    };
    let float = |key: &str| -> anyhow::Result<f64> {
        let v = field(key)?;
        v.parse()
            .with_context(|| format!("{key}={v} is not a number"))
    };
    let count = |key: &str| -> anyhow::Result<u64> {
        let v = field(key)?;
        v.parse()
            .with_context(|| format!("{key}={v} is not a count"))
    };
    Ok(WrkResult {
        rps: float("rps")?,
        p50_ms: float("p50_ms")?,
        p99_ms: float("p99_ms")?,
        max_ms: float("max_ms")?,
        requests: count("requests")?,
        non2xx: count("non2xx")?,
        errors: count("errors")?,
        per_thread_max: count("per_thread_max")?,
    })
}

/// Replays cycle over ids `1 ..= replay_of` of each thread: id 0 is built and
/// dropped by wrk before it connects, so a first-charge row whose busiest
/// thread built `charged` requests charged ids `1 .. charged`; a tenth is
/// left as margin for a thread that built fewer.
pub fn replay_of(charged_per_thread_max: u64) -> u64 {
    (charged_per_thread_max.saturating_sub(1) * 9 / 10).clamp(1, REPLAY_OF_MAX)
}

/// The scripts written to `dir/wrk/`, ready for `-s`.
pub struct Scripts {
    dir: PathBuf,
}

impl Scripts {
    pub fn write(dir: &Path) -> anyhow::Result<Self> {
        let dir = dir.join("wrk");
        std::fs::create_dir_all(&dir)?;
        for (name, text) in SCRIPTS {
            std::fs::write(dir.join(name), text)?;
        }
        Ok(Scripts { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// How wrk is run: its path, threads (at most `connections`, or wrk refuses)
/// and connections.
pub struct Wrk {
    pub bin: PathBuf,
    pub threads: usize,
    pub connections: usize,
}

impl Wrk {
    /// Runs `script` (a file name in `scripts/wrk/`) against `url` for `secs`,
    /// with `env` for the script (`PG_START`, `PG_REPLAY_OF`, …).
    pub async fn run(
        &self,
        scripts: &Scripts,
        script: &str,
        url: &str,
        secs: u64,
        env: &[(&str, String)],
    ) -> anyhow::Result<WrkResult> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{secs}s"))
            .arg("-s")
            .arg(scripts.path(script))
            .arg(url)
            .env("PG_CONNS", self.connections.to_string())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(secs + WRK_GRACE_SECS), cmd.output())
            .await
            .with_context(|| format!("wrk {script} did not end"))?
            .with_context(|| format!("running {}", self.bin.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "wrk {script} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        parse_result(&stdout).with_context(|| {
            format!(
                "wrk {script}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk 4.1.0's standard output for `-s deduct.lua` against `payguard serve`
    /// (captured on this machine; the RESULT line is `common.lua`'s).
    const CAPTURED: &str = concat!(
        "Running 1s test @ http://127.0.0.1:18181\n",
        "  2 threads and 64 connections\n",
        "  Thread Stats   Avg      Stdev     Max   +/- Stdev\n",
        "    Latency     4.03ms    2.25ms  19.04ms   78.29%\n",
        "    Req/Sec     8.21k     0.85k    9.43k    75.00%\n",
        "  16354 requests in 1.00s, 9.27MB read\n",
        "Requests/sec:  16307.18\n",
        "Transfer/sec:      9.24MB\n",
        "RESULT rps=16307 p50_ms=3.57 p99_ms=11.97 max_ms=19.04 requests=16354 non2xx=0 errors=0 per_thread_max=8218\n",
    );

    #[test]
    fn parses_captured_output() {
        let r = parse_result(CAPTURED).unwrap();
        assert_eq!(
            r,
            WrkResult {
                rps: 16307.0,
                p50_ms: 3.57,
                p99_ms: 11.97,
                max_ms: 19.04,
                requests: 16354,
                non2xx: 0,
                errors: 0,
                per_thread_max: 8218,
            }
        );
    }

    #[test]
    fn a_missing_or_bad_field_is_an_error_not_a_zero() {
        let full =
            "RESULT rps=1 p50_ms=1 p99_ms=1 max_ms=1 requests=1 non2xx=0 errors=0 per_thread_max=1";
        assert!(parse_result(full).is_ok());
        let without = full.replace(" p99_ms=1", "");
        assert!(parse_result(&without)
            .unwrap_err()
            .to_string()
            .contains("p99_ms"));
        let bad = full.replace("requests=1", "requests=x");
        assert!(parse_result(&bad).is_err());
        assert!(parse_result("Running 5s test @ http://127.0.0.1:1\n").is_err());
    }

    #[test]
    fn a_key_is_matched_whole() {
        // `p99_ms` must not be read from a field that merely starts with it.
        let line = "RESULT rps=1 p50_ms=1 p99_ms_x=7 p99_ms=2 max_ms=1 requests=1 non2xx=0 errors=0 per_thread_max=1";
        assert_eq!(parse_result(line).unwrap().p99_ms, 2.0);
    }

    #[test]
    fn replays_stay_within_the_charged_ids() {
        assert_eq!(replay_of(0), 1);
        assert_eq!(replay_of(2), 1);
        assert_eq!(replay_of(1001), 900);
        assert_eq!(replay_of(1_000_000), REPLAY_OF_MAX);
    }

    #[test]
    fn every_script_is_embedded_and_loads_common() {
        let dir = tempfile::tempdir().unwrap();
        let scripts = Scripts::write(dir.path()).unwrap();
        for (name, text) in SCRIPTS {
            assert!(scripts.path(name).is_file());
            assert!(
                name == "common.lua" || text.contains("common.lua"),
                "{name}"
            );
        }
    }
}
