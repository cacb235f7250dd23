//! The database is the guarantee: these tests talk to the SQLite store with no
//! lane, lock or cache above it, and show that the schema alone refuses a second
//! charge.

use payguard::domain::{AccountId, Currency, Money, OrderId, RefundId};
use payguard::store::sqlite::{apply_ops, migrate, open_connection, SqliteConfig, SqliteStore};
use payguard::store::{Command, Op, Output, Rejection, StoreError};
use rusqlite::Connection;
use std::path::Path;
use std::sync::{Arc, Barrier};

#[path = "shared/two_phase_sql.rs"]
mod two_phase_sql;

fn fresh(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("store.db");
    let mut conn = open_connection(&path).unwrap();
    migrate(&mut conn).unwrap();
    let ops: Vec<Command> = [
        Op::CreateAccount {
            id: AccountId::parse("acct").unwrap(),
            balance: Money::balance(10_000).unwrap(),
            currency: Currency::CNY,
        },
        Op::CreateOrder {
            id: OrderId::parse("o1").unwrap(),
            account_id: AccountId::parse("acct").unwrap(),
            amount: Money::amount(1_185).unwrap(),
        },
        Op::CreateOrder {
            id: OrderId::parse("o2").unwrap(),
            account_id: AccountId::parse("acct").unwrap(),
            amount: Money::amount(20_000).unwrap(),
        },
        Op::CreateOrder {
            id: OrderId::parse("o3").unwrap(),
            account_id: AccountId::parse("acct").unwrap(),
            amount: Money::amount(5).unwrap(),
        },
    ]
    .into_iter()
    .map(Command::from)
    .collect();
    for r in apply_ops(&mut conn, &ops, 1).unwrap() {
        r.unwrap();
    }
    path
}

fn deduct(o: &str) -> Command {
    Op::Deduct {
        order_id: OrderId::parse(o).unwrap(),
    }
    .into()
}

/// `sql` is refused by the schema (a CHECK, a UNIQUE index or a payguard trigger).
fn assert_refused(conn: &Connection, sql: &str) {
    let err = conn.execute_batch(sql).expect_err(sql);
    let msg = err.to_string();
    assert!(
        msg.contains("payguard") || msg.contains("constraint") || msg.contains("UNIQUE"),
        "{sql}: {err}"
    );
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Two connections, two threads, one order, released at the same instant, no
/// lane or lock: still one debit.
#[test]
fn racing_connections_without_lanes_charge_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(dir.path());
    for round in 0..20 {
        let oid = format!("race-{round}");
        {
            let mut c = open_connection(&path).unwrap();
            apply_ops(
                &mut c,
                &[Op::CreateOrder {
                    id: OrderId::parse(&oid).unwrap(),
                    account_id: AccountId::parse("acct").unwrap(),
                    amount: Money::amount(1).unwrap(),
                }
                .into()],
                1,
            )
            .unwrap()
            .remove(0)
            .unwrap();
        }
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let path = path.clone();
                let barrier = barrier.clone();
                let oid = oid.clone();
                std::thread::spawn(move || {
                    let mut c = open_connection(&path).unwrap();
                    barrier.wait();
                    apply_ops(&mut c, &[deduct(&oid)], 2).unwrap().remove(0)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let fresh_charges = results
            .iter()
            .filter(|r| {
                matches!(
                    r,
                    Ok(Output::Movement {
                        replayed: false,
                        ..
                    })
                )
            })
            .count();
        let replays = results
            .iter()
            .filter(|r| matches!(r, Ok(Output::Movement { replayed: true, .. })))
            .count();
        assert_eq!(
            (fresh_charges, replays),
            (1, 1),
            "round {round}: {results:?}"
        );
        let conn = open_connection(&path).unwrap();
        assert_eq!(
            count(
                &conn,
                &format!(
                    "SELECT COUNT(*) FROM entries WHERE order_id = '{oid}' AND kind = 'debit'"
                )
            ),
            1
        );
    }
    let mut conn = open_connection(&path).unwrap();
    assert!(
        payguard::store::sqlite::audit_connection(&mut conn)
            .unwrap()
            .ok
    );
}

/// What the incident's code did, by hand, against our schema: every step is refused.
#[test]
fn the_schema_refuses_the_incidents_second_debit() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(dir.path());
    let mut conn = open_connection(&path).unwrap();
    apply_ops(&mut conn, &[deduct("o1")], 2)
        .unwrap()
        .remove(0)
        .unwrap();

    let refused = |sql: &str| assert_refused(&conn, sql);
    // A second debit row for a paid order (the unique index and the PREPARE trigger).
    refused("INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at) VALUES ('o1', 'acct', 'debit', 1185, 0, 3)");
    // Marking a paid order paid again, or back to PREPARE.
    refused("UPDATE orders SET status = 'PAID' WHERE id = 'o1'");
    refused("UPDATE orders SET status = 'PREPARE', debit_entry_id = NULL WHERE id = 'o1'");
    // Paying a PREPARE order without a debit.
    refused("UPDATE orders SET status = 'PAID' WHERE id = 'o3'");
    // Overdrawing the account.
    refused("UPDATE accounts SET balance = -1 WHERE id = 'acct'");
    // Refunding more than the amount.
    refused("INSERT INTO entries (order_id, account_id, kind, amount, balance_after, refund_id, created_at) VALUES ('o1', 'acct', 'refund', 1186, 10000, 'rf-x', 3)");
    refused("UPDATE orders SET refunded = 1186, status = 'PARTIALLY_REFUNDED' WHERE id = 'o1'");
    // Rewriting or deleting history.
    refused("UPDATE entries SET amount = 1 WHERE order_id = 'o1'");
    refused("DELETE FROM entries WHERE order_id = 'o1'");
    // Changing what an order charges.
    refused("UPDATE orders SET amount = 1 WHERE id = 'o1'");
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM entries WHERE order_id = 'o1'"),
        1
    );
}

#[test]
fn the_schema_refuses_spending_held_money_and_every_broken_hold() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(dir.path());
    let mut conn = open_connection(&path).unwrap();
    let o1 = OrderId::parse("o1").unwrap();
    let authorize = Command::from(Op::Authorize {
        order_id: o1.clone(),
        hold_ttl_ms: 60_000,
    });
    apply_ops(&mut conn, &[authorize], 2)
        .unwrap()
        .remove(0)
        .unwrap();
    for sql in two_phase_sql::TWO_PHASE_REFUSED {
        assert_refused(&conn, sql);
    }
    assert_eq!(
        count(&conn, "SELECT held FROM accounts WHERE id = 'acct'"),
        1_185
    );
    let capture = Command::from(Op::Capture {
        order_id: o1,
        amount: Some(Money::amount(600).unwrap()),
    });
    apply_ops(&mut conn, &[capture], 3)
        .unwrap()
        .remove(0)
        .unwrap();
    for sql in two_phase_sql::CAPTURED_REFUSED {
        assert_refused(&conn, sql);
    }
    assert_eq!(
        count(
            &conn,
            "SELECT balance * 100000 + held FROM accounts WHERE id = 'acct'"
        ),
        9_400 * 100_000
    );
    assert!(
        payguard::store::sqlite::audit_connection(&mut conn)
            .unwrap()
            .ok
    );
}

/// A rejected op never aborts its batch, and an op the database refuses is undone
/// alone (savepoint) while the rest of the batch commits.
#[test]
fn one_bad_op_never_aborts_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(dir.path());
    let mut conn = open_connection(&path).unwrap();
    // A hand edit puts a rogue debit under o3 while leaving it PREPARE (the kind of
    // state only a broken layer could make); the engine's deduct of o3 then trips
    // the unique index mid-op.
    conn.execute_batch(
        "DROP TRIGGER entries_debit_needs_prepare;
         INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at)
         VALUES ('o3', 'acct', 'debit', 5, 9995, 1);",
    )
    .unwrap();
    let ops = vec![
        deduct("o1"),
        deduct("o2"), // 20_000 > balance: insufficient funds
        deduct("o3"), // refused by the unique debit index
        Op::Refund {
            order_id: OrderId::parse("o1").unwrap(),
            refund_id: RefundId::parse("rf-1").unwrap(),
            amount: Money::amount(185).unwrap(),
        }
        .into(),
    ];
    let results = apply_ops(&mut conn, &ops, 5).unwrap();
    assert!(
        matches!(
            results[0],
            Ok(Output::Movement {
                replayed: false,
                ..
            })
        ),
        "{results:?}"
    );
    assert_eq!(results[1], Err(Rejection::InsufficientFunds));
    assert!(
        matches!(results[2], Err(Rejection::Refused(_))),
        "{results:?}"
    );
    assert!(
        matches!(
            results[3],
            Ok(Output::Movement {
                replayed: false,
                ..
            })
        ),
        "{results:?}"
    );
    assert_eq!(
        count(&conn, "SELECT balance FROM accounts WHERE id = 'acct'"),
        10_000 - 1_185 + 185,
        "the hand-made debit never moved the balance, and the refused deduct was undone"
    );
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM orders WHERE id = 'o2' AND status = 'FAILED'"
        ),
        1
    );
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM orders WHERE id = 'o3' AND status = 'PREPARE'"
        ),
        1,
        "the refused op was rolled back to its savepoint"
    );
}

#[test]
fn a_naive_or_foreign_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let naive = dir.path().join("naive.db");
    {
        let conn = Connection::open(&naive).unwrap();
        conn.execute_batch(
            "CREATE TABLE payguard_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO payguard_meta VALUES ('schema_kind', 'naive');
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    match SqliteStore::open(SqliteConfig::new(&naive)) {
        Err(StoreError::Schema(msg)) => assert!(msg.contains("naive"), "{msg}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a naive database was opened in guarded mode"),
    }
    let foreign = dir.path().join("foreign.db");
    Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE stuff (x)")
        .unwrap();
    assert!(matches!(
        SqliteStore::open(SqliteConfig::new(&foreign)),
        Err(StoreError::Schema(_))
    ));
}

#[test]
fn reopening_keeps_the_data_and_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
        use payguard::Store;
        let r = store.apply(vec![deduct("o1")]).await.unwrap();
        assert!(matches!(
            r[0],
            Ok(Output::Movement {
                replayed: false,
                ..
            })
        ));
        store.close().await.unwrap();
        assert_eq!(
            store.apply(vec![deduct("o1")]).await,
            Err(StoreError::Closed)
        );
        let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
        let r = store.apply(vec![deduct("o1")]).await.unwrap();
        assert!(matches!(r[0], Ok(Output::Movement { replayed: true, .. })));
        let order = store
            .order(OrderId::parse("o1").unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(order.debit_entry_id, Some(1));
        store.close().await.unwrap();
    });
}

/// `OpenEphemeral` instructions in `sql`'s program: SQLite builds one table per
/// execution for each (RETURNING, and constant IN lists of three or more).
fn ephemeral_tables(conn: &Connection, sql: &str) -> usize {
    let mut stmt = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
    let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
    let ops: Vec<String> = stmt
        .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(1))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    ops.iter().filter(|op| *op == "OpenEphemeral").count()
}

/// The deduct's and refund's reads and writes build no ephemeral table once the schema is at v4 (the
/// CHECKs' IN lists rewritten), and the rewritten CHECKs still refuse what the
/// old ones refused.
#[test]
fn the_money_path_writes_build_no_ephemeral_tables_and_checks_still_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(dir.path());
    let conn = open_connection(&path).unwrap();
    for sql in [
        "UPDATE orders SET status = 'PAID', debit_entry_id = ?1, updated_at = ?2 WHERE id = ?3 AND status = 'PREPARE'",
        "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at) VALUES (?1, ?2, 'debit', ?3, ?4, ?5)",
        "UPDATE accounts SET balance = ?1, held = ?2, updated_at = ?3 WHERE id = ?4 AND balance = ?5 AND held = ?6",
        "SELECT o.id, o.account_id, o.amount, o.status, o.refunded, o.debit_entry_id, o.failure_reason, o.created_at, o.updated_at, o.captured, o.held, o.hold_expires_at, o.fence, a.balance, a.held FROM orders o LEFT JOIN accounts a ON a.id = o.account_id WHERE o.id = ?1",
        "UPDATE orders SET refunded = ?1, status = ?2, updated_at = ?3 WHERE id = ?4 AND status = ?5 AND refunded = ?6",
        "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, refund_id, created_at) VALUES (?1, ?2, 'refund', ?3, ?4, ?5, ?6)",
    ] {
        assert_eq!(ephemeral_tables(&conn, sql), 0, "{sql}");
    }
    for bad in [
        "UPDATE orders SET status = 'BOGUS' WHERE id = 'o1'",
        "UPDATE orders SET status = 'PAID' WHERE id = 'o1'", // PAID without a debit link
        "UPDATE orders SET refunded = 5 WHERE id = 'o1'",    // refunded while PREPARE
        "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at) VALUES ('o1', 'acct', 'gift', 1, 1, 1)",
    ] {
        let err = conn.execute(bad, []).unwrap_err();
        assert!(
            err.to_string().contains("CHECK") || err.to_string().contains("payguard"),
            "{bad}: {err}"
        );
    }
}

/// A database written by payguard at schema v3 (before the CHECK rewrite) opens,
/// upgrades in place through v4 (the rewrite) and v5 (two-phase payments), keeps
/// every row, and passes the audit.
#[test]
fn a_v3_database_upgrades_to_the_latest_keeping_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v3.db");
    {
        let conn = open_connection(&path).unwrap();
        for sql in [
            include_str!("../src/store/sqlite/schema.sql"),
            include_str!("../src/store/sqlite/v2_idempotency.sql"),
            include_str!("../src/store/sqlite/v3_fencing.sql"),
        ] {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute_batch(
            "PRAGMA user_version = 3;
             INSERT INTO accounts (id, currency, opening_balance, balance, created_at, updated_at)
               VALUES ('acct', 'CNY', 5000, 3815, 1, 1);
             INSERT INTO orders (id, account_id, amount, status, refunded, created_at, updated_at)
               VALUES ('o1', 'acct', 1185, 'PREPARE', 0, 1, 1);
             INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at)
               VALUES ('o1', 'acct', 'debit', 1185, 3815, 1);
             UPDATE orders SET status = 'PAID', debit_entry_id = 1 WHERE id = 'o1';",
        )
        .unwrap();
        assert!(ephemeral_tables(&conn, "UPDATE orders SET status = 'PAID' WHERE id = ?1") > 0);
    }
    let mut conn = open_connection(&path).unwrap();
    migrate(&mut conn).unwrap();
    assert_eq!(count(&conn, "PRAGMA user_version"), 8);
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM events"), 0);
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM orders WHERE captured IS NULL AND held = 0 AND hold_expires_at IS NULL"
        ),
        1,
        "the paid order took no two-phase path"
    );
    assert_eq!(
        count(&conn, "SELECT held FROM accounts WHERE id = 'acct'"),
        0
    );
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM entries"), 1);
    assert_eq!(
        count(&conn, "SELECT balance FROM accounts WHERE id = 'acct'"),
        3815
    );
    assert_eq!(
        ephemeral_tables(&conn, "UPDATE orders SET status = 'PAID' WHERE id = ?1"),
        0
    );
    assert!(
        payguard::store::sqlite::audit_connection(&mut conn)
            .unwrap()
            .ok
    );
    // The upgraded schema still refuses a second debit and an unknown status.
    assert!(conn
        .execute(
            "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at)
             VALUES ('o1', 'acct', 'debit', 1185, 2630, 2)",
            [],
        )
        .is_err());
    assert!(conn
        .execute("UPDATE orders SET status = 'BOGUS' WHERE id = 'o1'", [])
        .is_err());
    drop(conn);
    // A store opened on it again finds v4 and changes nothing.
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    drop(store);
}

/// The incident's path is only ever built over a naive file: a guarded store
/// (real money) is refused when the naive path is made, not per request.
#[test]
fn the_naive_path_refuses_a_guarded_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(dir.path());
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    match payguard::store::sqlite::naive::NaiveSqlite::new(store) {
        Err(StoreError::Schema(msg)) => assert!(msg.contains("guarded"), "{msg}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("the naive path accepted a guarded database"),
    }
}

/// v7 repairs what the swapped binding of `FAIL_PENDING_SQL` left: the pending
/// deliveries of endpoints a 410 disabled or a delete removed become `failed`;
/// an enabled endpoint's pending delivery and a delivered one are untouched.
#[test]
fn v7_fails_what_disabled_and_deleted_endpoints_left_pending() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v7.db");
    let mut conn = open_connection(&path).unwrap();
    migrate(&mut conn).unwrap();
    conn.execute_batch(
        "PRAGMA foreign_keys = OFF; -- the events themselves play no part here
         INSERT INTO webhook_endpoints (id, url, types, secret, status, after_seq, created_at, updated_at)
           VALUES ('gone', 'http://x', NULL, 's', 'disabled', 0, 1, 1),
                  ('removed', 'http://x', NULL, 's', 'deleted', 0, 1, 1),
                  ('live', 'http://x', NULL, 's', 'enabled', 0, 1, 1);
         INSERT INTO webhook_deliveries (endpoint_id, event_id, event_seq, status, next_attempt_at, updated_at)
           VALUES ('gone', 'e1', 1, 'pending', 1, 1), ('removed', 'e1', 1, 'pending', 1, 1),
                  ('live', 'e1', 1, 'pending', 1, 1), ('gone', 'e2', 2, 'delivered', 1, 1);
         -- back to v6: v8's claim tokens undone, so that v7 and v8 run again
         DROP TABLE idempotency_claims;
         ALTER TABLE idempotency DROP COLUMN claim;
         PRAGMA user_version = 6;
         PRAGMA foreign_keys = ON;",
    )
    .unwrap();
    migrate(&mut conn).unwrap();
    assert_eq!(count(&conn, "PRAGMA user_version"), 8);
    let status = |endpoint: &str, event: &str| -> String {
        conn.query_row(
            "SELECT status FROM webhook_deliveries WHERE endpoint_id = ?1 AND event_id = ?2",
            [endpoint, event],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(status("gone", "e1"), "failed");
    assert_eq!(status("removed", "e1"), "failed");
    assert_eq!(status("live", "e1"), "pending");
    assert_eq!(status("gone", "e2"), "delivered");
}

/// v8 (claim tokens) over a v7 file holding an in-flight Idempotency-Key claim
/// made before tokens: the file opens, the record keeps a NULL token, no
/// release frees it (no request holds its token), and it lapses with its
/// lease as before; a claim then gets a token, and only that token frees it.
#[tokio::test]
async fn v8_keeps_a_claim_from_before_tokens_until_its_lease_lapses() {
    use payguard::store::{ClaimOutcome, ClaimToken, IdemClaim, Store};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v7.db");
    {
        let mut conn = open_connection(&path).unwrap();
        migrate(&mut conn).unwrap();
        conn.execute_batch(
            "DROP TABLE idempotency_claims;
             ALTER TABLE idempotency DROP COLUMN claim;
             PRAGMA user_version = 7;
             INSERT INTO idempotency
               (scope, key, fingerprint, state, lease_until, status, body, created_at, expires_at)
               VALUES ('s', 'k', 'f-old', 'in_flight', 1000, NULL, NULL, 1, 100000);",
        )
        .unwrap();
    }
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let conn = open_connection(&path).unwrap();
    assert_eq!(count(&conn, "PRAGMA user_version"), 8);
    assert_eq!(
        count(
            &conn,
            "SELECT COUNT(*) FROM idempotency WHERE claim IS NULL"
        ),
        1
    );
    let claim = |fingerprint: &str, now_ms: i64| IdemClaim {
        scope: "s".into(),
        key: "k".into(),
        fingerprint: fingerprint.into(),
        now_ms,
        lease_ms: 100,
        ttl_ms: 100_000,
    };
    for token in [0, 1, i64::MAX] {
        store
            .idem_release("s".into(), "k".into(), ClaimToken(token))
            .await
            .unwrap();
    }
    assert_eq!(
        store.idem_claim(claim("f-new", 999)).await.unwrap(),
        ClaimOutcome::InFlight {
            same_request: false
        },
        "a claim from before tokens was freed, or lapsed early"
    );
    let ClaimOutcome::Claimed { token } = store.idem_claim(claim("f-new", 1001)).await.unwrap()
    else {
        panic!("the old claim's lease lapsed: the key is free");
    };
    store
        .idem_release("s".into(), "k".into(), ClaimToken(token.0 + 1))
        .await
        .unwrap();
    assert_eq!(
        store.idem_claim(claim("f-new", 1002)).await.unwrap(),
        ClaimOutcome::InFlight { same_request: true }
    );
    store
        .idem_release("s".into(), "k".into(), token)
        .await
        .unwrap();
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM idempotency"), 0);
}
