//! PostgreSQL connections reset mid-storm, through a TCP fault proxy between
//! payguard and the database: requests in the gap get 503 or succeed, nothing is
//! charged twice, nothing acknowledged is lost. Needs PAYGUARD_TEST_POSTGRES_URL.

mod common;

use common::{pg_base, start};
use payguard::store::postgres::ScratchDb;
use payguard_cli::storm::{storm, StormArgs};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// A loopback TCP proxy whose live connections can all be cut at once.
struct FaultProxy {
    port: u16,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let live = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                live.lock().unwrap().push(task.abort_handle());
            }
        });
        FaultProxy {
            port,
            conns,
            accept,
        }
    }

    /// Cuts every connection open now (both sockets are dropped).
    fn reset_all(&self) -> usize {
        let mut conns = self.conns.lock().unwrap();
        let n = conns.len();
        for c in conns.drain(..) {
            c.abort();
        }
        n
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_connections_reset_mid_storm_change_nothing() {
    let Some(base) = pg_base() else { return };
    let scratch = ScratchDb::create(&base, "pg_test_reset").await.unwrap();
    let (server_part, _) = base.rsplit_once('/').unwrap();
    let host_port = server_part.rsplit_once('@').map_or(server_part, |(_, h)| h);
    let host_port = host_port
        .trim_start_matches("postgres://")
        .trim_start_matches("postgresql://");
    let proxy = FaultProxy::start(host_port.to_owned()).await;
    let user = server_part
        .trim_start_matches("postgres://")
        .trim_start_matches("postgresql://")
        .split_once('@')
        .map_or("postgres", |(u, _)| u);
    let via_proxy = format!(
        "postgres://{user}@127.0.0.1:{}/{}",
        proxy.port, scratch.name
    );
    let direct = common::pg_url(&base, &scratch.name);
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "pay-r", &via_proxy, &[]);
    let args = StormArgs {
        target: vec![server.url.clone()],
        api_key: None,
        orders: 150,
        dup: 4,
        concurrency: 32,
        duration: 120,
        refund_ratio: 0.2,
        poor_ratio: 0.1,
        seed: 21,
        run_tag: Some("rst".into()),
        db: Some(direct),
        json: true,
        html: None,
        no_progress: true,
        history: None,
    };
    let storming = tokio::spawn(async move { storm(&args).await });
    let mut cut = 0;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        cut += proxy.reset_all();
    }
    let report = storming.await.unwrap().unwrap();
    server.stop();
    assert!(cut > 0, "no connection was cut");
    assert!(report.ok, "{}", report.to_text());
    assert_eq!(report.double_charged_orders, 0);
    assert_eq!(report.server_errors_500, 0);
    assert_eq!(report.db_audit_ok, Some(true));
    eprintln!(
        "cut {cut} connections: {} requests, {} answered 503, 0 violations",
        report.requests, report.unavailable_503
    );
    drop(proxy);
    scratch.drop_db().await.unwrap();
}
