//! Events (API.md, "Events and webhooks") over real HTTP: every committed change
//! of an order's money or status writes exactly one event in its own
//! transaction, a replay writes none, and `GET /v1/events` read in a loop sees
//! every event once, in commit order, even with three instances writing to one
//! PostgreSQL and transactions committing out of the order they started in.

mod common;

use futures::future::join_all;
use payguard::store::postgres::connect_raw;
use payguard_testkit::{AppOptions, Backend, TestApp, TestDb};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Every event after `after`, read page by page as a consumer would.
async fn read_all(app: &TestApp, mut after: i64) -> (Vec<Value>, i64) {
    let mut out = Vec::new();
    loop {
        let r = app
            .get(&format!("/v1/events?after={after}&limit=1000"))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let page = r.body["events"].as_array().unwrap().clone();
        let next = r.body["next_after"].as_i64().unwrap();
        if page.is_empty() {
            assert_eq!(next, after, "an empty page keeps the cursor");
            return (out, after);
        }
        after = next;
        out.extend(page);
    }
}

fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["type"].as_str().unwrap(),
                e["data"]["order"]["id"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test]
async fn every_money_change_writes_one_event_and_a_replay_none() {
    for backend in Backend::available("every_money_change_writes_one_event_and_a_replay_none") {
        let db = TestDb::create(backend).await;
        let opts = AppOptions {
            two_phase: payguard_server::TwoPhase {
                sweep_interval_ms: 50,
                ..payguard_server::TwoPhase::default()
            },
            ..AppOptions::instance("ev-1")
        };
        let app = TestApp::spawn(&db, opts).await;
        app.account("a", 10_000).await;
        for (o, amount) in [
            ("paid", 3000),
            ("broke", 99_000),
            ("held", 2000),
            ("gone", 1000),
        ] {
            app.order(o, "a", amount).await;
        }
        for _ in 0..3 {
            assert_eq!(app.post_empty("/v1/orders/paid/deduct").await.status, 200);
        }
        for _ in 0..2 {
            assert_eq!(app.post_empty("/v1/orders/broke/deduct").await.status, 402);
        }
        for _ in 0..2 {
            let r = app
                .post(
                    "/v1/orders/paid/refunds",
                    json!({"id": "r1", "amount": 500}),
                )
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
        assert_eq!(
            app.post_empty("/v1/orders/held/authorize").await.status,
            200
        );
        assert_eq!(
            app.post_empty("/v1/orders/held/authorize").await.status,
            200
        );
        let r = app
            .post("/v1/orders/held/capture", json!({"amount": 1500}))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(app.post_empty("/v1/orders/held/capture").await.status, 409);
        assert_eq!(
            app.post_empty("/v1/orders/gone/authorize").await.status,
            200
        );
        assert_eq!(app.post_empty("/v1/orders/gone/void").await.status, 200);
        assert_eq!(app.post_empty("/v1/orders/gone/void").await.status, 200);
        // A one-second hold that nobody captures: the sweeper's expiry is an event too.
        app.order("lapsed", "a", 500).await;
        let r = app
            .post("/v1/orders/lapsed/authorize", json!({"hold_ttl_s": 1}))
            .await;
        assert_eq!(r.status, 200);
        let start = std::time::Instant::now();
        while app.get("/v1/orders/lapsed").await.body["status"] != "EXPIRED" {
            assert!(start.elapsed().as_secs() < 10, "the hold never expired");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }

        let (events, last) = read_all(&app, 0).await;
        assert_eq!(
            types(&events),
            [
                "order.paid paid",
                "order.payment_failed broke",
                "order.refunded paid",
                "order.authorized held",
                "order.paid held",
                "order.authorized gone",
                "order.voided gone",
                "order.authorized lapsed",
                "order.hold_expired lapsed",
            ],
            "on {}",
            backend.name()
        );
        // Numbered in commit order, and each with the order as its transaction left it.
        let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert_eq!(last, *seqs.last().unwrap());
        assert_eq!(events[0]["data"]["order"]["status"], "PAID");
        assert_eq!(events[2]["data"]["order"]["status"], "PARTIALLY_REFUNDED");
        assert_eq!(events[2]["data"]["entry"]["kind"], "refund");
        assert_eq!(events[4]["data"]["order"]["captured"], 1500);
        assert_eq!(events[4]["data"]["entry"]["kind"], "capture");
        assert!(events[1]["data"]["entry"].is_null());
        let ids: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), events.len());
        // The cursor past the end: nothing, and the cursor stays.
        let r = app.get(&format!("/v1/events?after={last}")).await;
        assert_eq!(r.body, json!({"events": [], "next_after": last}));
        // Pages of one: the same events.
        let mut after = 0;
        let mut paged = Vec::new();
        loop {
            let r = app.get(&format!("/v1/events?after={after}&limit=1")).await;
            let page = r.body["events"].as_array().unwrap().clone();
            if page.is_empty() {
                break;
            }
            after = r.body["next_after"].as_i64().unwrap();
            paged.extend(page);
        }
        assert_eq!(paged, events);
        for bad in ["limit=0", "limit=1001", "after=-1", "after=x", "color=red"] {
            let r = app.get(&format!("/v1/events?{bad}")).await;
            assert_eq!(r.status, 422, "{bad}: {:?}", r.body);
        }
        app.stop().await;
        db.drop_db().await;
    }
}

/// Pays `orders` orders with `dup` duplicates of each deduct spread over the
/// apps, all at once.
async fn storm(apps: &[TestApp], prefix: &str, orders: usize, dup: usize) {
    let mut calls = Vec::new();
    for i in 0..orders {
        for d in 0..dup {
            let app = &apps[(i + d) % apps.len()];
            calls.push(async move {
                let r = app
                    .post_empty(&format!("/v1/orders/{prefix}{i}/deduct"))
                    .await;
                assert_eq!(r.status, 200, "{:?}", r.body);
            });
        }
    }
    join_all(calls).await;
}

#[tokio::test]
async fn the_feed_misses_nothing_with_three_instances_on_one_postgres() {
    let Some(_) = payguard_testkit::pg_scratch("the_feed_misses_nothing").await else {
        return;
    };
    let db = TestDb::create(Backend::Postgres).await;
    let TestDb::Postgres(scratch) = &db else {
        unreachable!()
    };
    let redis = std::env::var("PAYGUARD_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let mut apps = Vec::new();
    for i in 0..3 {
        let opts = AppOptions {
            redis: redis.clone(),
            ..AppOptions::instance(&format!("feed-{i}"))
        };
        apps.push(TestApp::spawn(&db, opts).await);
    }
    const ORDERS: usize = 300;
    apps[0].account("a", 1_000_000_000).await;
    for i in 0..ORDERS {
        apps[i % 3].order(&format!("o{i}"), "a", 100).await;
    }
    // A consumer following the feed on one instance while all three write, and
    // beside it the naive reader: `pos > after` on the numbers transactions take.
    let done = Arc::new(AtomicBool::new(false));
    let follower = {
        let app_base = apps[1].base.clone();
        let client = apps[1].client.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let (mut after, mut seen) = (0i64, Vec::<Value>::new());
            loop {
                let finished = done.load(Ordering::SeqCst);
                let r: Value = client
                    .get(format!("{app_base}/v1/events?after={after}&limit=50"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let page = r["events"].as_array().unwrap();
                if page.is_empty() && finished {
                    return seen;
                }
                after = r["next_after"].as_i64().unwrap();
                seen.extend(page.iter().cloned());
            }
        })
    };
    let naive = {
        let config = scratch.config.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let client = connect_raw(&config).await.unwrap();
            let (mut after, mut seen) = (0i64, HashSet::<String>::new());
            loop {
                let finished = done.load(Ordering::SeqCst);
                let rows = client
                    .query(
                        "SELECT pos, id FROM events WHERE pos > $1 ORDER BY pos LIMIT 50",
                        &[&after],
                    )
                    .await
                    .unwrap();
                if rows.is_empty() && finished {
                    return seen;
                }
                for r in &rows {
                    after = r.get(0);
                    seen.insert(r.get(1));
                }
            }
        })
    };
    storm(&apps, "o", ORDERS, 4).await;
    done.store(true, Ordering::SeqCst);
    let seen = follower.await.unwrap();
    let naive_seen = naive.await.unwrap();

    let all = {
        let client = connect_raw(&scratch.config).await.unwrap();
        client
            .query("SELECT id FROM events ORDER BY pos", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        all.len(),
        ORDERS,
        "one order.paid per order, none per replay"
    );
    let seqs: Vec<i64> = seen.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=ORDERS as i64).collect::<Vec<_>>(),
        "every event once, in order, no gap"
    );
    let ids: HashSet<String> = seen
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, all.iter().cloned().collect::<HashSet<_>>());
    let mut per_order: HashMap<&str, usize> = HashMap::new();
    for e in &seen {
        assert_eq!(e["type"], "order.paid");
        *per_order
            .entry(e["data"]["order"]["id"].as_str().unwrap())
            .or_default() += 1;
    }
    assert!(per_order.values().all(|&n| n == 1) && per_order.len() == ORDERS);
    eprintln!(
        "feed follower saw {}/{} events; the naive pos reader saw {}/{}",
        seen.len(),
        all.len(),
        naive_seen.len(),
        all.len()
    );
    for app in apps {
        app.stop().await;
    }
    db.drop_db().await;
}

/// The case the feed exists for, made certain: a transaction that took its
/// insertion number first commits last. The naive reader (`pos > after`) has
/// already moved past it and never sees it; the feed does.
#[tokio::test]
async fn a_transaction_that_commits_late_is_not_skipped() {
    let Some(_) = payguard_testkit::pg_scratch("a_transaction_that_commits_late").await else {
        return;
    };
    let db = TestDb::create(Backend::Postgres).await;
    let TestDb::Postgres(scratch) = &db else {
        unreachable!()
    };
    let app = TestApp::spawn(&db, AppOptions::instance("late-1")).await;
    app.account("a", 100).await;
    app.order("early", "a", 1000).await;
    app.order("late", "a", 1000).await;
    let insert =
        "INSERT INTO events (id, type, order_id, created_at, status, refunded, held, updated_at)
                  VALUES ($1, 'order.payment_failed', $2, 0, 'FAILED', 0, 0, 0) RETURNING pos";
    let mut slow = connect_raw(&scratch.config).await.unwrap();
    let mut fast = connect_raw(&scratch.config).await.unwrap();
    let slow_tx = slow.transaction().await.unwrap();
    let slow_pos: i64 = slow_tx
        .query_one(insert, &[&"evt_slow0", &"early"])
        .await
        .unwrap()
        .get(0);
    let fast_tx = fast.transaction().await.unwrap();
    let fast_pos: i64 = fast_tx
        .query_one(insert, &[&"evt_fast0", &"late"])
        .await
        .unwrap()
        .get(0);
    assert!(slow_pos < fast_pos);
    fast_tx.commit().await.unwrap();

    let reader = connect_raw(&scratch.config).await.unwrap();
    let naive_read = |after: i64| {
        let reader = &reader;
        async move {
            reader
                .query(
                    "SELECT pos, id FROM events WHERE pos > $1 ORDER BY pos",
                    &[&after],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>()
        }
    };
    let first = naive_read(0).await;
    assert_eq!(first, [(fast_pos, "evt_fast0".to_owned())]);
    let (feed_first, after) = read_all(&app, 0).await;
    assert_eq!(feed_first.len(), 1);
    assert_eq!(feed_first[0]["id"], "evt_fast0");

    slow_tx.commit().await.unwrap();
    let naive_next = naive_read(fast_pos).await;
    assert!(
        naive_next.is_empty(),
        "the naive reader skips the late commit for ever"
    );
    let (feed_next, _) = read_all(&app, after).await;
    assert_eq!(feed_next.len(), 1, "the feed gives the late commit");
    assert_eq!(feed_next[0]["id"], "evt_slow0");
    assert_eq!(feed_next[0]["seq"].as_i64().unwrap(), after + 1);
    app.stop().await;
    db.drop_db().await;
}
