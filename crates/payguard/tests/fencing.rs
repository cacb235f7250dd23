//! Fencing tokens across instances, against a real Redis.
//!
//! Needs `PAYGUARD_TEST_REDIS_URL` (the shared Redis, used with a unique key
//! prefix) and `redis-server` on PATH (tests that flush or stop Redis start their
//! own on a free port). Without them each test prints why and skips.

use payguard::domain::{AccountId, Currency, Money, OrderId, RefundId, RequestId};
use payguard::engine::{Engine, EngineConfig};
use payguard::lock::redis::RedisLocks;
use payguard::store::sqlite::{SqliteConfig, SqliteStore};
use payguard::store::{Op, Output, Rejection};
use payguard::{EngineError, Store};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn redis_url() -> Option<String> {
    match std::env::var("PAYGUARD_TEST_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("skipped: PAYGUARD_TEST_REDIS_URL is not set");
            None
        }
    }
}

fn prefix() -> String {
    format!(
        "test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

async fn instance(
    db: &Path,
    url: &str,
    prefix: &str,
    name: &str,
    ttl_ms: u64,
    pause_ms: u64,
) -> Engine {
    let cfg = EngineConfig {
        failpoint_pause_after_lock_ms: pause_ms,
        batch_wait_us: 0,
        ..EngineConfig::default()
    };
    instance_with(db, url, prefix, name, ttl_ms, cfg).await
}

/// [`instance`] with its own engine settings (the instance id is `name`).
async fn instance_with(
    db: &Path,
    url: &str,
    prefix: &str,
    name: &str,
    ttl_ms: u64,
    cfg: EngineConfig,
) -> Engine {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteConfig::new(db)).unwrap());
    let locks = RedisLocks::connect(
        url,
        prefix,
        name,
        Duration::from_millis(ttl_ms),
        payguard::engine::fence_epochs(store.clone()),
    )
    .await
    .unwrap();
    Engine::start_with_locks(
        store,
        EngineConfig {
            instance_id: name.into(),
            ..cfg
        },
        Some(Arc::new(locks)),
    )
}

fn req(r: &str) -> RequestId {
    RequestId::parse(r).unwrap()
}

async fn setup(e: &Engine) {
    e.submit(
        Op::CreateAccount {
            id: AccountId::parse("acct").unwrap(),
            balance: Money::balance(10_000).unwrap(),
            currency: Currency::CNY,
        },
        req("setup-a"),
    )
    .await
    .unwrap();
    e.submit(
        Op::CreateOrder {
            id: OrderId::parse("o1").unwrap(),
            account_id: AccountId::parse("acct").unwrap(),
            amount: Money::amount(1_185).unwrap(),
        },
        req("setup-o"),
    )
    .await
    .unwrap();
}

fn deduct() -> Op {
    Op::Deduct {
        order_id: OrderId::parse("o1").unwrap(),
    }
}

fn debits(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM entries WHERE order_id = 'o1' AND kind = 'debit'",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

/// Instance A takes the lock, then stalls past its TTL (an injected pause, like a
/// GC pause or SIGSTOP); instance B takes the lock with a higher token and
/// charges. When A wakes, the store refuses its write as stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_paused_past_its_ttl_is_fenced_out() {
    let Some(url) = redis_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let p = prefix();
    let a = Arc::new(instance(&db, &url, &p, "inst-a", 300, 900).await);
    let b = instance(&db, &url, &p, "inst-b", 300, 0).await;
    setup(&b).await;
    // A first grant through B (no pause) makes the fence hash, its epoch (from
    // the store) and loads the scripts into Redis, so A's grant below is one
    // quick round trip: a slow first grant under load could time out, and a
    // holder without a token is not what this test is about.
    b.submit(
        Op::CreateOrder {
            id: OrderId::parse("o-warm").unwrap(),
            account_id: AccountId::parse("acct").unwrap(),
            amount: Money::amount(1).unwrap(),
        },
        req("setup-warm"),
    )
    .await
    .unwrap();
    let warm = Op::Deduct {
        order_id: OrderId::parse("o-warm").unwrap(),
    };
    b.submit(warm, req("req-warm")).await.unwrap();

    let a2 = a.clone();
    let stalled = tokio::spawn(async move { a2.submit(deduct(), req("req-a")).await });
    // A holds the lock, stalls, and its lease lapses: seen in Redis rather than
    // guessed from a sleep (on a loaded machine A's grant can take a while).
    let lock = format!("{p}:lock:order:o1");
    wait_for_key(&url, &lock, true).await;
    wait_for_key(&url, &lock, false).await;
    let charged = b.submit(deduct(), req("req-b")).await.unwrap();
    assert!(
        matches!(
            charged,
            Output::Movement {
                replayed: false,
                ..
            }
        ),
        "B charges while A is stalled: {charged:?}"
    );
    let a_result = stalled.await.unwrap();
    assert_eq!(
        a_result,
        Err(EngineError::Rejected(Rejection::StaleFencingToken)),
        "A's stale write must be refused by its fencing token"
    );
    assert_eq!(Rejection::StaleFencingToken.reason(), "stale_fencing_token");
    assert_eq!(debits(&db), 1);
    // A retry on A now sees the charge as a replay.
    let again = a.submit(deduct(), req("req-a2")).await.unwrap();
    assert!(matches!(again, Output::Movement { replayed: true, .. }));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Waits (up to 10 s) until `key` exists in Redis, or is gone.
async fn wait_for_key(url: &str, key: &str, present: bool) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if exists == present {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{key} never became {}",
            if present { "held" } else { "free" }
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct PrivateRedis {
    child: std::process::Child,
    url: String,
}

impl PrivateRedis {
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!("skipped: redis-server is not on PATH");
            return None;
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(PrivateRedis {
                    child,
                    url: format!("redis://127.0.0.1:{port}"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn flushall(&self) {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let _: () = redis::cmd("FLUSHALL").query(&mut conn).unwrap();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A flush resets Redis's INCR; the new epoch from the database keeps every
/// later token above the ones the store has seen, so orders are not wedged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_flush_starts_a_new_epoch_and_wedges_nothing() {
    if redis_url().is_none() {
        return;
    }
    let Some(redis) = PrivateRedis::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("flush.db");
    let e = instance(&db, &redis.url, "pg", "inst-f", 30_000, 0).await;
    setup(&e).await;
    e.submit(deduct(), req("d1")).await.unwrap();
    let fence_before: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT fence FROM orders WHERE id = 'o1'", [], |r| r.get(0))
        .unwrap();
    assert!(fence_before > 0, "the deduct was written with a token");
    redis.flushall();
    let refund = e
        .submit(
            Op::Refund {
                order_id: OrderId::parse("o1").unwrap(),
                refund_id: RefundId::parse("rf1").unwrap(),
                amount: Money::amount(100).unwrap(),
            },
            req("r1"),
        )
        .await;
    assert!(
        matches!(
            refund,
            Ok(Output::Movement {
                replayed: false,
                ..
            })
        ),
        "after a flush the order must still be writable: {refund:?}"
    );
    let fence_after: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT fence FROM orders WHERE id = 'o1'", [], |r| r.get(0))
        .unwrap();
    assert!(
        fence_after > fence_before,
        "{fence_after} <= {fence_before}"
    );
    e.shutdown().await.unwrap();
}

/// With Redis gone, the lock is skipped and the database still charges once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_down_requests_still_charge_exactly_once() {
    if redis_url().is_none() {
        return;
    }
    let Some(redis) = PrivateRedis::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("down.db");
    let e = Arc::new(instance(&db, &redis.url, "pg", "inst-d", 30_000, 0).await);
    setup(&e).await;
    drop(redis); // kills the server
    let calls = (0..20).map(|i| {
        let e = e.clone();
        tokio::spawn(async move { e.submit(deduct(), req(&format!("r{i}"))).await })
    });
    let mut fresh = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(Output::Movement { replayed, .. }) => fresh += usize::from(!replayed),
            Err(EngineError::Store(_) | EngineError::Overloaded) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(fresh, 1);
    assert_eq!(debits(&db), 1);
    e.shutdown().await.unwrap();
}

/// A charge's release leaves the order's settled hint: a duplicate on another
/// instance is then answered by a read of the committed state, without taking
/// the lock (no new grant in Redis), and an op that read does not settle (a new
/// refund) still takes the lock and moves money. The hint is never the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settled_hint_answers_a_duplicate_by_a_read_and_never_blocks_a_new_op() {
    let Some(url) = redis_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let p = prefix();
    let a = instance(&db, &url, &p, "inst-a", 30_000, 0).await;
    let b = instance(&db, &url, &p, "inst-b", 30_000, 0).await;
    setup(&a).await;
    let charged = a.submit(deduct(), req("req-a")).await.unwrap();
    assert!(matches!(
        charged,
        Output::Movement {
            replayed: false,
            ..
        }
    ));
    // The release (in the background, after the answer) leaves the hint.
    let hint = format!("{p}:lock:order:o1:s");
    wait_for_key(&url, &hint, true).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let grants = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let fence = format!("{p}:fence");
        async move {
            redis::cmd("HGET")
                .arg(fence)
                .arg("n")
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    let before = grants(&mut conn).await;
    let dup = b.submit(deduct(), req("req-b")).await.unwrap();
    assert_eq!(dup, charged.as_replay(), "the duplicate replays the charge");
    assert_eq!(
        grants(&mut conn).await,
        before,
        "the duplicate took no lock"
    );
    assert_eq!(
        payguard::engine::EngineStats::get(&b.stats().settled_without_lock),
        1
    );
    // A new refund is not settled by the committed state: it takes the lock.
    let refund = b
        .submit(
            Op::Refund {
                order_id: OrderId::parse("o1").unwrap(),
                refund_id: RefundId::parse("rf1").unwrap(),
                amount: Money::amount(100).unwrap(),
            },
            req("req-refund"),
        )
        .await
        .unwrap();
    assert!(matches!(
        refund,
        Output::Movement {
            replayed: false,
            ..
        }
    ));
    assert!(grants(&mut conn).await > before, "the refund took the lock");
    assert_eq!(debits(&db), 1);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Found by the simulation (issue #17) and seen here against a real Redis: one
/// lane batch holding a duplicate deduct of an order another instance just
/// charged (its settled hint answers it by a read), a refund of that order (the
/// read leaves it to write, so it takes the lock in a second acquire) and a
/// fresh order's deduct (locked by the first acquire). The release must give
/// back both acquires' leases; given back in one call, which takes one
/// acquire's, none was released and both orders stayed locked for the 30 s TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_that_read_first_then_locked_again_releases_every_lock() {
    let Some(url) = redis_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let p = prefix();
    let a = instance(&db, &url, &p, "inst-a", 30_000, 0).await;
    // One lane that waits for its batch to fill: the three ops go out together.
    let b_cfg = EngineConfig {
        lanes: 1,
        batch_wait_us: 50_000,
        ..EngineConfig::default()
    };
    let b = instance_with(&db, &url, &p, "inst-b", 30_000, b_cfg).await;
    setup(&a).await;
    let o2 = OrderId::parse("o2").unwrap();
    a.submit(
        Op::CreateOrder {
            id: o2.clone(),
            account_id: AccountId::parse("acct").unwrap(),
            amount: Money::amount(100).unwrap(),
        },
        req("setup-o2"),
    )
    .await
    .unwrap();
    a.submit(deduct(), req("req-a")).await.unwrap();
    wait_for_key(&url, &format!("{p}:lock:order:o1:s"), true).await;
    wait_for_key(&url, &format!("{p}:lock:order:o1"), false).await;
    let batches = b.stats().batches.get();
    let refund = Op::Refund {
        order_id: OrderId::parse("o1").unwrap(),
        refund_id: RefundId::parse("rf1").unwrap(),
        amount: Money::amount(100).unwrap(),
    };
    let (dup, refunded, fresh) = tokio::join!(
        b.submit(deduct(), req("req-dup")),
        b.submit(refund, req("req-refund")),
        b.submit(Op::Deduct { order_id: o2 }, req("req-o2")),
    );
    assert!(
        matches!(dup, Ok(Output::Movement { replayed: true, .. })),
        "{dup:?}"
    );
    assert!(
        matches!(
            refunded,
            Ok(Output::Movement {
                replayed: false,
                ..
            })
        ),
        "{refunded:?}"
    );
    assert!(
        matches!(
            fresh,
            Ok(Output::Movement {
                replayed: false,
                ..
            })
        ),
        "{fresh:?}"
    );
    assert_eq!(
        b.stats().batches.get(),
        batches + 1,
        "the three went out as one batch"
    );
    assert_eq!(
        b.stats().settled_without_lock.get(),
        1,
        "the duplicate was read first"
    );
    // Both acquires' locks are given back at once (not at the TTL).
    wait_for_key(&url, &format!("{p}:lock:order:o1"), false).await;
    wait_for_key(&url, &format!("{p}:lock:order:o2"), false).await;
    // And another instance gets them at once: its duplicate is answered.
    let again = tokio::time::timeout(
        Duration::from_secs(2),
        a.submit(
            Op::Deduct {
                order_id: OrderId::parse("o2").unwrap(),
            },
            req("req-a-o2"),
        ),
    )
    .await
    .expect("o2's lock was released");
    assert!(
        matches!(again, Ok(Output::Movement { replayed: true, .. })),
        "{again:?}"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// `PUBSUB NUMSUB channel` on `url`.
async fn subscribers(url: &str, channel: &str) -> i64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .unwrap();
    n
}

/// Waits (up to 10 s) until `channel` has `n` subscribers.
async fn wait_for_subscribers(url: &str, channel: &str, n: i64) {
    let started = std::time::Instant::now();
    while subscribers(url, channel).await != n {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{channel} never had {n} subscribers"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Production's release subscriber (`spawn_subscriber`, the loop over
/// `RedisFeed`) against a real Redis: a published release wakes its waiter;
/// a killed pub/sub connection ends the feed's stream, and the loop subscribes
/// again and wakes every waiter; stopping it unsubscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_subscriber_wakes_waiters_and_survives_a_killed_connection() {
    use payguard::lock::release::{spawn_subscriber, ReleaseBoard};
    if redis_url().is_none() {
        return;
    }
    let Some(redis) = PrivateRedis::start() else {
        return;
    };
    let channel = payguard::lock::redis::released_channel(&prefix());
    let board = ReleaseBoard::default();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = spawn_subscriber(
        redis::Client::open(redis.url.as_str()).unwrap(),
        channel.clone(),
        &board,
        stopped,
    );
    wait_for_subscribers(&redis.url, &channel, 1).await;

    let since = tokio::time::Instant::now();
    let b = board.clone();
    let x = tokio::spawn(async move { b.released("x", since, Duration::from_secs(10)).await });
    while board.waiting() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(x.await.unwrap(), "woken by the published release");

    // A waiter that registered after the subscription; then the connection dies.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let since = tokio::time::Instant::now();
    let b = board.clone();
    let y = tokio::spawn(async move { b.released("y", since, Duration::from_secs(10)).await });
    while board.waiting() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(5), y)
            .await
            .expect("the resubscription never came")
            .unwrap(),
        "woken by the resubscription"
    );
    wait_for_subscribers(&redis.url, &channel, 1).await;

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stopped")
        .unwrap();
    wait_for_subscribers(&redis.url, &channel, 0).await;
}
