//! Forensics on payguard's own logs: a naive-mode storm's log must show exactly
//! the double charges the database audit finds, and a full-mode storm's log none
//! (but many race windows: duplicates that collided and were answered once).

use payguard_cli::storm::{storm, StormArgs};
use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a child server may take to start.
const START_WAIT: Duration = Duration::from_secs(20);

struct Server {
    child: Child,
    url: String,
}

// The child is handed back inside `Server` and reaped by `stop`.
#[allow(clippy::zombie_processes)]
fn start(dir: &Path, name: &str, extra: &[&str]) -> Server {
    let log = dir.join(format!("{name}.log"));
    let db = dir.join(format!("{name}.db"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_payguard"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--instance-id",
            name,
        ])
        .arg("--db")
        .arg(&db)
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
                return Server { child, url };
            }
        }
        if started.elapsed() >= START_WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(mut s: Server) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(s.child.id().to_string())
        .status();
    let status = s.child.wait().unwrap();
    assert!(status.success(), "server exited with {status}");
}

fn storm_args(url: &str, db: &Path) -> StormArgs {
    StormArgs {
        target: vec![url.to_owned()],
        api_key: None,
        orders: 40,
        dup: 8,
        concurrency: 64,
        duration: 120,
        refund_ratio: 0.2,
        poor_ratio: 0.1,
        seed: 99,
        run_tag: Some("fx".into()),
        db: Some(format!("sqlite://{}", db.display())),
        json: true,
        html: None,
        no_progress: true,
    }
}

fn forensics(log: &Path) -> (i32, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_payguard"))
        .args(["forensics", "--json"])
        .arg(log)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn naive_storm_logs_show_exactly_the_audited_double_charges() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        "naive-1",
        &[
            "--guard",
            "naive",
            "--i-know-this-double-charges",
            "--naive-gap-ms",
            "5",
        ],
    );
    let db = dir.path().join("naive-1.db");
    let report = storm(&storm_args(&server.url, &db)).await.unwrap();
    stop(server);
    assert!(report.double_charged_orders > 0, "{}", report.to_text());

    let mut conn = rusqlite::Connection::open(&db).unwrap();
    let audit = payguard::store::sqlite::audit_connection(&mut conn).unwrap();
    let audited: BTreeSet<String> = audit
        .duplicate_debits
        .iter()
        .map(|d| d.order_id.clone())
        .collect();
    let lost: i64 = conn
        .query_row(
            "SELECT COALESCE(SUM(e.amount), 0) FROM entries e WHERE e.kind = 'debit'
               AND e.id > (SELECT MIN(f.id) FROM entries f WHERE f.order_id = e.order_id AND f.kind = 'debit')",
            [],
            |r| r.get(0),
        )
        .unwrap();

    let (code, f) = forensics(&dir.path().join("naive-1.log"));
    assert_eq!(code, 1, "incidents found means exit 1");
    let found: BTreeSet<String> = f["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["order_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        found, audited,
        "forensics and the audit disagree on which orders"
    );
    assert_eq!(f["totals"]["amount_lost"].as_i64().unwrap(), lost);
    assert_eq!(report.money_lost, lost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_storm_logs_show_race_windows_and_no_incident() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "full-1", &[]);
    let db = dir.path().join("full-1.db");
    let report = storm(&storm_args(&server.url, &db)).await.unwrap();
    stop(server);
    assert!(report.ok, "{}", report.to_text());
    let (code, f) = forensics(&dir.path().join("full-1.log"));
    assert_eq!(code, 0);
    assert_eq!(f["incidents"].as_array().unwrap().len(), 0);
    assert!(
        f["totals"]["race_windows"].as_u64().unwrap() > 0,
        "8 colliding duplicates per order must show as race windows: {}",
        f["totals"]
    );
}
