//! The engine's answers say what is known, no more (issue #13): a request whose
//! deadline passed while it queued is a timeout (nothing reached the store), not
//! a store failure.

use payguard::domain::{AccountId, Currency, Money, OrderId, RequestId};
use payguard::engine::{Engine, EngineConfig, EngineError};
use payguard::store::sqlite::{SqliteConfig, SqliteStore};
use payguard::store::{Op, Store};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_deadline_that_passed_in_the_lane_queue_is_a_timeout_and_moves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("t.db"))).unwrap());
    let engine = Engine::start(store, EngineConfig::default());
    let req = |r: &str| RequestId::parse(r).unwrap();
    account_and_order(&engine).await;
    let past = Instant::now() - Duration::from_millis(1);
    let got = engine
        .submit_by(
            Op::Deduct {
                order_id: OrderId::parse("o1").unwrap(),
            },
            req("r-late"),
            Some(past),
        )
        .await;
    assert_eq!(got, Err(EngineError::TimedOut));
    assert_eq!(
        engine.stats().committed.get(),
        2,
        "only the setup committed"
    );
    let order = engine
        .order(OrderId::parse("o1").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(order.status.as_str(), "PREPARE", "nothing moved");
    engine.shutdown().await.unwrap();
}

/// Issue #16: a duplicate deduct of an order this process saw paid is answered
/// from the order cache by the rules, without a lane batch or a transaction, and
/// says exactly what the store would: the original entry, `replayed`, and the
/// order as it is now (refunded since).
#[tokio::test]
async fn a_replay_of_a_paid_order_is_answered_without_a_batch_and_as_the_store_would() {
    use payguard::domain::RefundId;
    use payguard::store::Output;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteConfig::new(&path)).unwrap());
    let engine = Engine::start(store.clone(), EngineConfig::default());
    let req = |r: &str| RequestId::parse(r).unwrap();
    let o1 = || OrderId::parse("o1").unwrap();
    account_and_order(&engine).await;
    let first = engine
        .submit(Op::Deduct { order_id: o1() }, req("r-1"))
        .await
        .unwrap();
    let Output::Movement { entry: debit, .. } = &first else {
        panic!("{first:?}")
    };
    engine
        .submit(
            Op::Refund {
                order_id: o1(),
                refund_id: RefundId::parse("rf1").unwrap(),
                amount: Money::amount(30).unwrap(),
            },
            req("r-refund"),
        )
        .await
        .unwrap();
    let batches = engine.stats().batches.get();
    let again = engine
        .submit(Op::Deduct { order_id: o1() }, req("r-2"))
        .await
        .unwrap();
    assert_eq!(
        engine.stats().cached_replays.get(),
        1,
        "answered from the cache"
    );
    assert_eq!(
        engine.stats().batches.get(),
        batches,
        "no batch went to the store"
    );
    assert_eq!(engine.stats().replayed.get(), 1);
    let Output::Movement {
        entry,
        order,
        replayed,
    } = &again
    else {
        panic!("{again:?}")
    };
    assert!(replayed);
    assert_eq!(entry, debit, "the original debit");
    assert_eq!(order.refunded.minor(), 30, "the order as it is now");
    assert_eq!(order.status.as_str(), "PARTIALLY_REFUNDED");
    // The lane and the store, with no cache, give the same answer.
    let uncached = Engine::start(
        store,
        EngineConfig {
            order_cache_entries_max: 0,
            ..EngineConfig::default()
        },
    );
    let from_store = uncached
        .submit(Op::Deduct { order_id: o1() }, req("r-3"))
        .await
        .unwrap();
    assert_eq!(from_store, again);
    assert_eq!(uncached.stats().cached_replays.get(), 0);
    uncached.shutdown().await.unwrap();
    engine.shutdown().await.unwrap();
}

/// Account `acct` with 10,000 and its order `o1` of 100, PREPARE.
async fn account_and_order(engine: &Engine) {
    let req = |r: &str| RequestId::parse(r).unwrap();
    engine
        .submit(
            Op::CreateAccount {
                id: AccountId::parse("acct").unwrap(),
                balance: Money::balance(10_000).unwrap(),
                currency: Currency::CNY,
            },
            req("r-acct"),
        )
        .await
        .unwrap();
    engine
        .submit(
            Op::CreateOrder {
                id: OrderId::parse("o1").unwrap(),
                account_id: AccountId::parse("acct").unwrap(),
                amount: Money::amount(100).unwrap(),
            },
            req("r-order"),
        )
        .await
        .unwrap();
}
