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
