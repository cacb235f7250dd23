//! One set of money rules: the same random command sequences, through the SQLite
//! store and the PostgreSQL store, give identical answers and identical ledgers,
//! and both agree with a model of API.md written here independently of the
//! stores' shared rules (`store::rules`), so a rule broken for both is caught too.
//!
//! Each run draws sequences of batches from a seeded generator: duplicates
//! (inside a batch and across batches), overdrafts, refund races (many refund ids
//! on one order in one batch), over-refunds, unknown orders and accounts, reused
//! account and order ids with other bodies, refund ids on other orders, fencing
//! tokens (stale ones too), two-phase holds (authorize with TTLs that run out between
//! batches, full and partial captures, voids, the sweeper's expiry, each repeated),
//! Idempotency-Keys (claimed, reused, abandoned by a
//! "dead" instance, expired, and released late with the token of an old claim:
//! a release frees only the in-flight claim its token names), and balances
//! edited by hand next to overflow.
//! Every rejection kind of the stores' rules is reached.
//!
//! `PAYGUARD_RULES_SEED` replays a run (its seed is printed), `PAYGUARD_RULES_CASES`
//! sets how many sequences. The PostgreSQL part needs
//! `PAYGUARD_TEST_POSTGRES_URL` (its own scratch database); without it, it is
//! skipped with a printed reason and SQLite is held to the model alone.

use payguard::domain::{AccountId, Currency, Money, OrderId, OrderStatus, RefundId};
use payguard::store::postgres::{tokio_postgres, PgConfig, PgStore, ScratchDb};
use payguard::store::sqlite::{self, SqliteConfig, SqliteStore};
use payguard::store::{
    ClaimOutcome, ClaimToken, Command, IdemClaim, IdemWrite, Op, OpResult, Output, Store,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;

const URL_ENV: &str = "PAYGUARD_TEST_POSTGRES_URL";
/// Sequences per run, unless `PAYGUARD_RULES_CASES` says otherwise.
const CASES_DEFAULT: usize = 48;
/// Batches per sequence.
const BATCHES_PER_CASE: usize = 24;
/// Commands per batch, at most.
const BATCH_COMMANDS_MAX: usize = 8;
/// Time between batches (ms): leases and key lifetimes below span a few batches.
const BATCH_STEP_MS: i64 = 1_000;
const IDEM_LEASE_MS: i64 = 2_500;
const START_MS: i64 = 1_700_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_commands_give_the_same_answers_and_ledgers_on_both_stores() {
    let seed = std::env::var("PAYGUARD_RULES_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    let cases: usize = std::env::var("PAYGUARD_RULES_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CASES_DEFAULT);
    eprintln!("same_rules: seed {seed} (PAYGUARD_RULES_SEED={seed} replays it), {cases} cases");
    let started = std::time::Instant::now();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("same_rules.db");
    let sqlite_store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let mut conn = sqlite::open_connection(&path).unwrap();
    let mut pg = Pg::start().await;
    let mut model = Model::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut now = START_MS;
    let mut totals = Totals::default();
    // Every claim taken: (key, scope, SQLite's token, PostgreSQL's token).
    let mut claims: Vec<(String, String, ClaimToken, Option<ClaimToken>)> = Vec::new();

    // At least `cases` sequences; more (up to 4×) while some kind of answer has
    // not been reached yet, so that the run proves something about every rule.
    let mut case = 0;
    while case < cases
        || (cases >= CASES_DEFAULT && !totals.missing().is_empty() && case < 4 * cases)
    {
        let mut gen = Gen::new(case);
        let mut history: Vec<String> = Vec::new();
        for b in 0..BATCHES_PER_CASE {
            now += BATCH_STEP_MS;
            if rng.random_bool(0.05) {
                let (account, balance) = gen.hand_edit(&mut rng);
                history.push(format!("hand edit: {account} balance = {balance}"));
                hand_edit(&conn, pg.as_ref(), &account, balance).await;
                model.hand_edit(&account, balance);
            }
            if !claims.is_empty() && rng.random_bool(0.3) {
                // A release that comes late (its request's lease lapsed, or its
                // transaction freed the key and its answer was lost): it frees
                // the key only while the key is still in flight under its claim.
                let (key, scope, sqlite_token, pg_token) =
                    claims[rng.random_range(0..claims.len())].clone();
                history.push(format!("late release of {key} (claim {})", sqlite_token.0));
                let found =
                    late_release(&sqlite_store, &conn, &scope, &key, sqlite_token, &history).await;
                if let (Some(pg), Some(pg_token)) = (&pg, pg_token) {
                    late_release_pg(pg, &scope, &key, pg_token, &history).await;
                }
                *totals.releases.entry(found).or_default() += 1;
            }
            let drafted = gen.batch(&mut rng);
            let mut batch = Vec::with_capacity(drafted.len());
            // The same batch with PostgreSQL's claim tokens (each store makes its own).
            let mut pg_batch = Vec::with_capacity(drafted.len());
            for (cmd, key) in drafted {
                // The HTTP layer claims a key before it runs the command; a key that
                // is held answers from the claim and the command never runs.
                let Some((key, ttl_ms, abandon)) = key else {
                    batch.push(cmd.clone());
                    pg_batch.push(cmd);
                    continue;
                };
                let claim = claim_for(&cmd, &key, ttl_ms, now);
                let from_sqlite = sqlite_store.idem_claim(claim.clone()).await.unwrap();
                let mut pg_token = None;
                if let Some(pg) = &pg {
                    let from_pg = pg.store.idem_claim(claim.clone()).await.unwrap();
                    assert_eq!(
                        without_token(&from_pg),
                        without_token(&from_sqlite),
                        "seed {seed} case {case} batch {b}: claim of {key}\n{}",
                        history.join("\n")
                    );
                    if let ClaimOutcome::Claimed { token } = from_pg {
                        pg_token = Some(token);
                    }
                }
                totals.claims += 1;
                if let ClaimOutcome::Claimed { token } = from_sqlite {
                    claims.push((key.clone(), claim.scope.clone(), token, pg_token));
                    if !abandon {
                        batch.push(
                            cmd.clone()
                                .with_idempotency(idem_write(&key, &claim, ttl_ms, token)),
                        );
                        if let Some(pg_token) = pg_token {
                            pg_batch.push(
                                cmd.with_idempotency(idem_write(&key, &claim, ttl_ms, pg_token)),
                            );
                        }
                    }
                }
            }
            if batch.is_empty() {
                continue;
            }
            history.push(format!(
                "batch {b} at {now}: {:?}",
                batch.iter().map(describe).collect::<Vec<_>>()
            ));
            // What the committed state settles before the batch, read without a
            // write: the same on both stores, and for the batch's first command
            // (nothing before it in the batch changes its state) the very answer
            // the write path then gives it.
            let bare: Vec<Command> = batch.iter().map(|c| Command::new(c.op.clone())).collect();
            let settled = sqlite_store.settled(bare.clone(), now).await.unwrap();
            if let Some(pg) = &pg {
                assert_eq!(
                    pg.store.settled(bare, now).await.unwrap(),
                    settled,
                    "seed {seed} case {case} batch {b}: settled answers differ\n{}",
                    history.join("\n")
                );
            }
            totals.settled += settled.iter().flatten().count();
            let from_sqlite = sqlite::apply_ops(&mut conn, &batch, now).unwrap();
            if let (Some(answer), None, None) =
                (&settled[0], &batch[0].fence, &batch[0].idempotency)
            {
                assert_eq!(
                    answer,
                    &from_sqlite[0],
                    "seed {seed} case {case} batch {b}: settled without a write, then answered otherwise\n{}",
                    history.join("\n")
                );
                totals.settled_checked += 1;
            }
            if let (None, None, None) = (&settled[0], &batch[0].fence, &batch[0].idempotency) {
                // Not settled: the write path must then write (a first execution,
                // or the decline of an order that cannot pay) or refuse in a way
                // a retry may change; never answer a replay or a definite refusal.
                let wrote = match &from_sqlite[0] {
                    Ok(out) => !out.is_replay(),
                    Err(r) => {
                        matches!(
                            r,
                            payguard::store::Rejection::InsufficientFunds
                                | payguard::store::Rejection::HoldLapsed
                        ) || !r.is_definite()
                    }
                };
                assert!(
                    wrote,
                    "seed {seed} case {case} batch {b}: not settled, yet answered {:?} without a write\n{}",
                    from_sqlite[0],
                    history.join("\n")
                );
                totals.settled_checked += 1;
            }
            let expected: Vec<Shape> = batch.iter().map(|c| model.apply(c, now)).collect();
            let got: Vec<Shape> = from_sqlite.iter().map(Shape::of).collect();
            assert_eq!(
                got,
                expected,
                "seed {seed} case {case} batch {b}: SQLite disagrees with the model\n{}",
                history.join("\n")
            );
            let isolated = rng.random_bool(0.2);
            if let Some(pg) = &mut pg {
                let from_pg =
                    payguard::store::postgres::apply_ops(&mut pg.client, &pg_batch, now, isolated)
                        .await
                        .unwrap();
                assert_eq!(
                    from_pg, from_sqlite,
                    "seed {seed} case {case} batch {b} (isolated: {isolated}): PostgreSQL and SQLite answer differently\n{}",
                    history.join("\n")
                );
            }
            totals.count(&from_sqlite, batch.len());
        }
        let ledger = sqlite_ledger(&conn);
        if let Some(pg) = &pg {
            let pg_ledger = pg_ledger(&pg.client).await;
            for (table, rows) in &ledger {
                assert_eq!(
                    pg_ledger.get(table),
                    Some(rows),
                    "seed {seed} case {case}: the {table} tables differ\n{}",
                    history.join("\n")
                );
            }
            let pg_audit = pg.store.audit().await.unwrap();
            let audit = sqlite::audit_connection(&mut conn).unwrap();
            assert_eq!(pg_audit, audit, "seed {seed} case {case}: audits differ");
        }
        let audit = sqlite::audit_connection(&mut conn).unwrap();
        assert_eq!(
            audit.ok, !model.hand_edited,
            "seed {seed} case {case}: audit {audit:?}"
        );
        case += 1;
    }
    if cases >= CASES_DEFAULT {
        assert!(
            totals.settled > 0 && totals.settled_checked > 0,
            "seed {seed}: nothing was settled without a write"
        );
        assert!(
            totals.missing().is_empty(),
            "seed {seed}: {case} sequences never answered {:?}: {:?}",
            totals.missing(),
            totals.kinds
        );
        assert!(
            totals.releases.contains_key("another_claim")
                && totals.releases.contains_key("own_claim"),
            "seed {seed}: no late release met both its own claim and another one: {:?}",
            totals.releases
        );
    }
    eprintln!(
        "same_rules: {} commands in {} batches, {} claims, late releases {:?}, {} settled without a write ({} first commands checked against the write path); answers: {:?}; PostgreSQL {}; {:.1}s",
        totals.commands,
        totals.batches,
        totals.claims,
        totals.releases,
        totals.settled,
        totals.settled_checked,
        totals.kinds,
        if pg.is_some() { "compared" } else { "skipped" },
        started.elapsed().as_secs_f64()
    );
    if let Some(pg) = pg {
        pg.store.close().await.unwrap();
        pg.db.drop_db().await.unwrap();
    }
    sqlite_store.close().await.unwrap();
}

/// What a run answered, to show that every kind of answer was reached.
#[derive(Default)]
struct Totals {
    commands: usize,
    /// Commands the committed state settled before their batch ran.
    settled: usize,
    /// Of those, first commands whose answer was compared with the write path's.
    settled_checked: usize,
    batches: usize,
    claims: usize,
    kinds: std::collections::BTreeMap<&'static str, usize>,
    /// Late releases by what they found under their key (SQLite).
    releases: std::collections::BTreeMap<&'static str, usize>,
}

impl Totals {
    fn count(&mut self, results: &[OpResult], n: usize) {
        self.batches += 1;
        self.commands += n;
        for r in results {
            let kind = match r {
                Ok(Output::Account { created: true, .. }) => "account_created",
                Ok(Output::Order { created: true, .. }) => "order_created",
                Ok(Output::Account { .. } | Output::Order { .. }) => "create_replayed",
                Ok(Output::Movement {
                    replayed: false,
                    entry,
                    ..
                }) => match entry.kind {
                    payguard::EntryKind::Debit => "charged",
                    payguard::EntryKind::Hold => "held",
                    payguard::EntryKind::Capture => "captured",
                    payguard::EntryKind::Release => "released",
                    _ => "refunded",
                },
                Ok(Output::Movement { replayed: true, .. }) => "movement_replayed",
                Err(e) => e.reason(),
            };
            *self.kinds.entry(kind).or_default() += 1;
        }
    }

    /// The kinds of answer not reached yet: a run that never reached a rule
    /// tested nothing about it.
    fn missing(&self) -> Vec<&'static str> {
        [
            "account_created",
            "order_created",
            "create_replayed",
            "charged",
            "refunded",
            "movement_replayed",
            "account_exists",
            "account_not_found",
            "order_exists",
            "order_not_found",
            "insufficient_funds",
            "order_not_paid",
            "refund_exists",
            "refund_exceeds_paid",
            "stale_fencing_token",
            "refused_by_database",
            "held",
            "captured",
            "released",
            "order_not_authorized",
            "order_authorized",
            "capture_exceeds_hold",
            "hold_already_captured",
            "hold_voided",
            "hold_expired",
            "hold_not_expired",
        ]
        .into_iter()
        .filter(|k| !self.kinds.contains_key(k))
        .collect()
    }
}

struct Pg {
    db: ScratchDb,
    store: PgStore,
    client: deadpool_postgres::ClientWrapper,
}

impl Pg {
    async fn start() -> Option<Pg> {
        let url = match std::env::var(URL_ENV) {
            Ok(url) if !url.is_empty() => url,
            _ => {
                eprintln!(
                    "SKIP the PostgreSQL part: set {URL_ENV} (e.g. postgres://postgres@127.0.0.1:5432/postgres) to compare it with SQLite"
                );
                return None;
            }
        };
        let db = ScratchDb::create(&url, "pg_test_rules").await.unwrap();
        let store = PgStore::connect(PgConfig {
            pool_connections_max: 2,
            ..PgConfig::new(db.config.clone())
        })
        .await
        .unwrap();
        let (client, conn) = db.config.connect(tokio_postgres::NoTls).await.unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        let client = deadpool_postgres::ClientWrapper::new(client, task);
        Some(Pg { db, store, client })
    }
}

/// One sequence's generator: its ids are its own (`c{case}-…`), so sequences
/// share the two databases without meeting.
struct Gen {
    case: usize,
    /// Batches drawn so far.
    batches: usize,
    /// Commands already sent, to send again (duplicates across batches).
    sent: Vec<Command>,
    next_key: usize,
    /// Orders an authorize was sent for: two-phase steps mostly aim at them.
    authorized: Vec<OrderId>,
}

/// Ids per sequence: few, so that they collide; an order or a refund is often
/// asked for before it exists, and an order before its account.
const ACCOUNTS: usize = 4;
const ORDERS: usize = 6;
const REFUND_IDS: usize = 8;
const KEYS: usize = 4;

/// A drafted batch: each command with its Idempotency-Key, if any (key, ttl,
/// abandoned after the claim).
type Drafted = Vec<(Command, Option<(String, i64, bool)>)>;

impl Gen {
    fn new(case: usize) -> Self {
        Gen {
            case,
            batches: 0,
            sent: Vec::new(),
            next_key: 0,
            authorized: Vec::new(),
        }
    }

    /// An order for a capture, void or expiry: mostly one that was authorized.
    fn held_order(&self, rng: &mut StdRng) -> OrderId {
        if !self.authorized.is_empty() && rng.random_bool(0.8) {
            pick(rng, &self.authorized).clone()
        } else {
            self.order(rng)
        }
    }

    fn capture_amount(rng: &mut StdRng) -> Option<Money> {
        rng.random_bool(0.6)
            .then(|| Money::amount(*pick(rng, &[25, 50, 100, 200, 300])).unwrap())
    }

    fn account(&self, rng: &mut StdRng) -> AccountId {
        let i = rng.random_range(0..ACCOUNTS);
        AccountId::parse(&format!("c{}-a{i}", self.case)).unwrap()
    }

    fn order(&self, rng: &mut StdRng) -> OrderId {
        let i = rng.random_range(0..ORDERS);
        OrderId::parse(&format!("c{}-o{i}", self.case)).unwrap()
    }

    fn refund_id(&self, rng: &mut StdRng) -> RefundId {
        let i = rng.random_range(0..REFUND_IDS);
        RefundId::parse(&format!("c{}-r{i}", self.case)).unwrap()
    }

    /// A fresh op. Early in a sequence mostly creates (so that later money
    /// moves find something), later mostly deducts and refunds.
    fn op(&mut self, rng: &mut StdRng) -> Op {
        let roll = if self.batches < 3 {
            rng.random_range(0..8)
        } else {
            rng.random_range(0..21)
        };
        match roll {
            0..=2 => Op::CreateAccount {
                id: self.account(rng),
                balance: Money::balance(*pick(rng, &[0, 100, 250, 600])).unwrap(),
                currency: if rng.random_bool(0.9) {
                    Currency::CNY
                } else {
                    Currency::parse("USD").unwrap()
                },
            },
            3..=6 => Op::CreateOrder {
                id: self.order(rng),
                account_id: self.account(rng),
                amount: Money::amount(*pick(rng, &[50, 100, 200, 300])).unwrap(),
            },
            7..=10 => Op::Deduct {
                order_id: self.order(rng),
            },
            11..=14 => Op::Refund {
                order_id: self.order(rng),
                refund_id: self.refund_id(rng),
                amount: Money::amount(*pick(rng, &[1, 25, 50, 100, 150])).unwrap(),
            },
            // Holds of 0.5 to 8 batches, so some expire between batches.
            15..=16 => {
                let order_id = self.order(rng);
                self.authorized.push(order_id.clone());
                Op::Authorize {
                    order_id,
                    hold_ttl_ms: *pick(rng, &[500, 2_500, 8_000]),
                }
            }
            17..=18 => Op::Capture {
                order_id: self.held_order(rng),
                amount: Self::capture_amount(rng),
            },
            19 => Op::Void {
                order_id: self.held_order(rng),
            },
            _ => Op::Expire {
                order_id: self.held_order(rng),
            },
        }
    }

    /// A batch: fresh commands, duplicates, and now and then a refund race
    /// (several refund ids on one order at once). Each command may carry a
    /// fencing token and an Idempotency-Key (key, ttl, abandoned after the claim).
    fn batch(&mut self, rng: &mut StdRng) -> Drafted {
        self.batches += 1;
        if self.case == 0 && self.batches == 1 {
            return self.directed();
        }
        let n = rng.random_range(1..=BATCH_COMMANDS_MAX);
        let mut out: Drafted = Vec::with_capacity(n);
        if rng.random_bool(0.08) {
            // A two-phase race: captures of several amounts, voids and the
            // sweeper's expiry of one held order, at once.
            let order_id = self.held_order(rng);
            for _ in 0..n {
                let op = match rng.random_range(0..4) {
                    0 | 1 => Op::Capture {
                        order_id: order_id.clone(),
                        amount: Self::capture_amount(rng),
                    },
                    2 => Op::Void {
                        order_id: order_id.clone(),
                    },
                    _ => Op::Expire {
                        order_id: order_id.clone(),
                    },
                };
                out.push((Command::new(op), None));
            }
            return out;
        }
        if rng.random_bool(0.1) {
            let order_id = self.order(rng);
            for _ in 0..n {
                let op = Op::Refund {
                    order_id: order_id.clone(),
                    refund_id: self.refund_id(rng),
                    amount: Money::amount(*pick(rng, &[25, 50, 100])).unwrap(),
                };
                out.push((Command::new(op), None));
            }
            return out;
        }
        for _ in 0..n {
            let mut cmd = match (self.sent.is_empty(), rng.random_range(0..5)) {
                (false, 0) => pick(rng, &self.sent).clone(),
                (_, 1) if !out.is_empty() => out[rng.random_range(0..out.len())].0.clone(),
                _ => Command::new(self.op(rng)),
            };
            if rng.random_bool(0.25) {
                cmd = cmd.fenced(rng.random_range(0..6));
            }
            let key = rng.random_bool(0.2).then(|| {
                if rng.random_bool(0.5) || self.next_key == 0 {
                    self.next_key += 1;
                }
                let key = format!("c{}-k{}", self.case, self.next_key % KEYS);
                let ttl_ms = *pick(rng, &[1_500, 4_000, 60_000]);
                (key, ttl_ms, rng.random_bool(0.1))
            });
            self.sent.push(cmd.clone());
            out.push((cmd, key));
        }
        out
    }

    /// The first batch of the first sequence, not drawn: a capture above its
    /// hold, then one within it. Chance alone reaches `capture_exceeds_hold`
    /// (a capture landing on a live hold with more than it holds) rarely:
    /// seed 1796111911256802673 missed it in all 192 sequences it may run, and
    /// the coverage check failed. Both stores still answer these commands and
    /// are compared like any others.
    fn directed(&mut self) -> Drafted {
        let account_id = AccountId::parse(&format!("c{}-a0", self.case)).unwrap();
        let order_id = OrderId::parse(&format!("c{}-o0", self.case)).unwrap();
        self.authorized.push(order_id.clone());
        let ops = [
            Op::CreateAccount {
                id: account_id.clone(),
                balance: Money::balance(600).unwrap(),
                currency: Currency::CNY,
            },
            Op::CreateOrder {
                id: order_id.clone(),
                account_id,
                amount: Money::amount(50).unwrap(),
            },
            Op::Authorize {
                order_id: order_id.clone(),
                hold_ttl_ms: 8_000,
            },
            Op::Capture {
                order_id: order_id.clone(),
                amount: Some(Money::amount(100).unwrap()),
            },
            Op::Capture {
                order_id,
                amount: Some(Money::amount(25).unwrap()),
            },
        ];
        ops.into_iter()
            .map(|op| {
                let cmd = Command::new(op);
                self.sent.push(cmd.clone());
                (cmd, None)
            })
            .collect()
    }

    /// A balance set by hand, at or next to where a refund overflows it.
    fn hand_edit(&self, rng: &mut StdRng) -> (String, i64) {
        let i = rng.random_range(0..ACCOUNTS);
        let balance = i64::MAX - *pick(rng, &[0, 24, 99]);
        (format!("c{}-a{i}", self.case), balance)
    }
}

fn pick<'a, T>(rng: &mut StdRng, from: &'a [T]) -> &'a T {
    &from[rng.random_range(0..from.len())]
}

fn describe(cmd: &Command) -> String {
    let op = match &cmd.op {
        Op::CreateAccount {
            id,
            balance,
            currency,
        } => format!("account {id} {} {currency}", balance.minor()),
        Op::CreateOrder {
            id,
            account_id,
            amount,
        } => format!("order {id} on {account_id} {}", amount.minor()),
        Op::Deduct { order_id } => format!("deduct {order_id}"),
        Op::Refund {
            order_id,
            refund_id,
            amount,
        } => format!("refund {order_id} {refund_id} {}", amount.minor()),
        other => format!("{other:?}"),
    };
    let fence = cmd.fence.map(|t| format!(" fence {t}")).unwrap_or_default();
    let key = cmd
        .idempotency
        .as_ref()
        .map(|i| format!(" key {}", i.key))
        .unwrap_or_default();
    format!("{op}{fence}{key}")
}

fn claim_for(cmd: &Command, key: &str, ttl_ms: i64, now: i64) -> IdemClaim {
    IdemClaim {
        scope: "same-rules".into(),
        key: key.into(),
        fingerprint: format!("{:?}", cmd.op),
        now_ms: now,
        lease_ms: IDEM_LEASE_MS,
        ttl_ms,
    }
}

/// Stores every definite answer (its Debug form, entry ids included), releases
/// the key on the others, as the HTTP layer's renderer does.
fn idem_write(key: &str, claim: &IdemClaim, ttl_ms: i64, token: ClaimToken) -> IdemWrite {
    IdemWrite {
        scope: claim.scope.clone(),
        key: key.into(),
        fingerprint: claim.fingerprint.clone(),
        ttl_ms,
        claim: token,
        render: Arc::new(|r: &OpResult| match r {
            Ok(out) => Some((200, format!("{out:?}").into_bytes())),
            Err(e) if e.is_definite() => Some((409, e.reason().as_bytes().to_vec())),
            Err(_) => None,
        }),
    }
}

/// A claim's outcome with its token blanked: each store makes its own tokens.
fn without_token(o: &ClaimOutcome) -> ClaimOutcome {
    match o {
        ClaimOutcome::Claimed { .. } => ClaimOutcome::Claimed {
            token: ClaimToken(0),
        },
        other => other.clone(),
    }
}

/// A late release on SQLite: the key's record is deleted when it is in flight
/// under `token`, and left exactly as it was otherwise; what it found.
async fn late_release(
    store: &SqliteStore,
    conn: &rusqlite::Connection,
    scope: &str,
    key: &str,
    token: ClaimToken,
    history: &[String],
) -> &'static str {
    let read = || -> Option<(String, Option<i64>, String)> {
        conn.query_row(
            "SELECT state, claim, fingerprint || '|' || COALESCE(lease_until, 'null') || '|'
                    || COALESCE(status, 'null') || '|' || created_at || '|' || expires_at
             FROM idempotency WHERE scope = ?1 AND key = ?2",
            rusqlite::params![scope, key],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .ok()
    };
    let before = read();
    store
        .idem_release(scope.into(), key.into(), token)
        .await
        .unwrap();
    let after = read();
    let ours = matches!(&before, Some((state, claim, _)) if state == "in_flight" && *claim == Some(token.0));
    let expected = if ours { None } else { before.clone() };
    assert_eq!(
        after,
        expected,
        "SQLite: release of {key} by claim {} found {before:?}\n{}",
        token.0,
        history.join("\n")
    );
    match &before {
        None => "nothing",
        Some(_) if ours => "own_claim",
        Some((state, _, _)) if state == "done" => "answer",
        Some(_) => "another_claim",
    }
}

/// [`late_release`] on PostgreSQL.
async fn late_release_pg(pg: &Pg, scope: &str, key: &str, token: ClaimToken, history: &[String]) {
    let read = || async {
        pg.client
            .query_opt(
                "SELECT state, claim, fingerprint || '|' || COALESCE(lease_until::text, 'null') || '|'
                        || COALESCE(status::text, 'null') || '|' || created_at || '|' || expires_at
                 FROM idempotency WHERE scope = $1 AND key = $2",
                &[&scope, &key],
            )
            .await
            .unwrap()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    r.get::<_, Option<i64>>(1),
                    r.get::<_, String>(2),
                )
            })
    };
    let before = read().await;
    pg.store
        .idem_release(scope.into(), key.into(), token)
        .await
        .unwrap();
    let after = read().await;
    let ours = matches!(&before, Some((state, claim, _)) if state == "in_flight" && *claim == Some(token.0));
    let expected = if ours { None } else { before.clone() };
    assert_eq!(
        after,
        expected,
        "PostgreSQL: release of {key} by claim {} found {before:?}\n{}",
        token.0,
        history.join("\n")
    );
}

async fn hand_edit(conn: &rusqlite::Connection, pg: Option<&Pg>, account: &str, balance: i64) {
    conn.execute(
        "UPDATE accounts SET balance = ?1 WHERE id = ?2",
        rusqlite::params![balance, account],
    )
    .unwrap();
    if let Some(pg) = pg {
        pg.client
            .execute(
                "UPDATE accounts SET balance = $1 WHERE id = $2",
                &[&balance, &account],
            )
            .await
            .unwrap();
    }
}

/// Every table of the ledger, each row as one line of text, in the same order on
/// both stores (ids sort bytewise).
type Ledger = std::collections::BTreeMap<&'static str, Vec<String>>;

const SQLITE_LEDGER: [(&str, &str); 4] = [
    (
        "accounts",
        "SELECT id || '|' || currency || '|' || opening_balance || '|' || balance || '|' || held || '|' || created_at || '|' || updated_at
         FROM accounts ORDER BY id",
    ),
    (
        "orders",
        "SELECT id || '|' || account_id || '|' || amount || '|' || status || '|' || refunded || '|'
                || COALESCE(debit_entry_id, 'null') || '|' || COALESCE(failure_reason, 'null') || '|'
                || created_at || '|' || updated_at || '|' || fence || '|' || COALESCE(captured, 'null') || '|'
                || held || '|' || COALESCE(hold_expires_at, 'null')
         FROM orders ORDER BY id",
    ),
    (
        "entries",
        "SELECT id || '|' || order_id || '|' || account_id || '|' || kind || '|' || amount || '|'
                || balance_after || '|' || COALESCE(refund_id, 'null') || '|' || COALESCE(reverses, 'null')
                || '|' || created_at
         FROM entries ORDER BY id",
    ),
    (
        "idempotency",
        "SELECT scope || '|' || key || '|' || fingerprint || '|' || state || '|' || COALESCE(lease_until, 'null')
                || '|' || COALESCE(status, 'null') || '|' || CASE WHEN body IS NULL THEN 'null' ELSE lower(hex(body)) END || '|'
                || created_at || '|' || expires_at
         FROM idempotency ORDER BY scope, key",
    ),
];

const PG_LEDGER: [(&str, &str); 4] = [
    (
        "accounts",
        "SELECT id || '|' || currency || '|' || opening_balance || '|' || balance || '|' || held || '|' || created_at || '|' || updated_at
         FROM accounts ORDER BY id COLLATE \"C\"",
    ),
    (
        "orders",
        "SELECT id || '|' || account_id || '|' || amount || '|' || status || '|' || refunded || '|'
                || COALESCE(debit_entry_id::text, 'null') || '|' || COALESCE(failure_reason, 'null') || '|'
                || created_at || '|' || updated_at || '|' || fence || '|' || COALESCE(captured::text, 'null') || '|'
                || held || '|' || COALESCE(hold_expires_at::text, 'null')
         FROM orders ORDER BY id COLLATE \"C\"",
    ),
    (
        "entries",
        "SELECT id || '|' || order_id || '|' || account_id || '|' || kind || '|' || amount || '|'
                || balance_after || '|' || COALESCE(refund_id, 'null') || '|' || COALESCE(reverses::text, 'null')
                || '|' || created_at
         FROM entries ORDER BY id",
    ),
    (
        "idempotency",
        "SELECT scope || '|' || key || '|' || fingerprint || '|' || state || '|' || COALESCE(lease_until::text, 'null')
                || '|' || COALESCE(status::text, 'null') || '|' || COALESCE(encode(body, 'hex'), 'null') || '|'
                || created_at || '|' || expires_at
         FROM idempotency ORDER BY scope COLLATE \"C\", key COLLATE \"C\"",
    ),
];

fn sqlite_ledger(conn: &rusqlite::Connection) -> Ledger {
    SQLITE_LEDGER
        .iter()
        .map(|(table, sql)| {
            let mut stmt = conn.prepare(sql).unwrap();
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            (*table, rows)
        })
        .collect()
}

async fn pg_ledger(client: &tokio_postgres::Client) -> Ledger {
    let mut out = Ledger::new();
    for (table, sql) in PG_LEDGER {
        let rows = client.query(sql, &[]).await.unwrap();
        out.insert(table, rows.iter().map(|r| r.get::<_, String>(0)).collect());
    }
    out
}

/// An answer, as the model can predict it: its kind and the money figures.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Shape {
    Rejected(&'static str),
    Account {
        created: bool,
        balance: i64,
    },
    Order {
        created: bool,
        status: OrderStatus,
        refunded: i64,
    },
    Moved {
        replayed: bool,
        entry: i64,
        amount: i64,
        balance_after: i64,
        status: OrderStatus,
        refunded: i64,
    },
}

impl Shape {
    fn of(r: &OpResult) -> Shape {
        match r {
            Err(e) => Shape::Rejected(e.reason()),
            Ok(Output::Account { account, created }) => Shape::Account {
                created: *created,
                balance: account.balance.minor(),
            },
            Ok(Output::Order { order, created }) => Shape::Order {
                created: *created,
                status: order.status,
                refunded: order.refunded.minor(),
            },
            Ok(Output::Movement {
                order,
                entry,
                replayed,
            }) => Shape::Moved {
                replayed: *replayed,
                entry: entry.id,
                amount: entry.amount.minor(),
                balance_after: entry.balance_after.minor(),
                status: order.status,
                refunded: order.refunded.minor(),
            },
        }
    }
}

/// API.md's rules, written out plainly for this test (not `store::rules`).
#[derive(Default)]
struct Model {
    /// account id → the sum of its open holds
    held: HashMap<String, i64>,
    /// id → (opening balance, currency, balance)
    accounts: HashMap<String, (i64, Currency, i64)>,
    orders: HashMap<String, ModelOrder>,
    /// refund id → (order, amount, entry id, balance after)
    refunds: HashMap<String, (String, i64, i64, i64)>,
    fences: HashMap<String, i64>,
    entries: i64,
    hand_edited: bool,
}

struct ModelOrder {
    account: String,
    amount: i64,
    status: OrderStatus,
    refunded: i64,
    /// (entry id, balance after) of its debit, or of its capture
    debit: Option<(i64, i64)>,
    /// Two-phase: when its hold expires (set once: the order took that path).
    expires: Option<i64>,
    /// Two-phase: (entry id, balance after) of its hold and of its release.
    hold: Option<(i64, i64)>,
    release: Option<(i64, i64)>,
    /// Two-phase: what the capture took.
    captured: Option<i64>,
}

impl Model {
    fn hand_edit(&mut self, account: &str, balance: i64) {
        if let Some(a) = self.accounts.get_mut(account) {
            a.2 = balance;
            self.hand_edited = true;
        }
    }

    fn apply(&mut self, cmd: &Command, now: i64) -> Shape {
        if let (Some(token), Some(order)) = (cmd.fence, cmd.order_id()) {
            if self.orders.contains_key(order.as_str()) {
                let kept = self.fences.entry(order.as_str().to_owned()).or_insert(0);
                if token < *kept {
                    return Shape::Rejected("stale_fencing_token");
                }
                *kept = token;
            }
        }
        match &cmd.op {
            Op::CreateAccount {
                id,
                balance,
                currency,
            } => self.create_account(id.as_str(), balance.minor(), *currency),
            Op::CreateOrder {
                id,
                account_id,
                amount,
            } => self.create_order(id.as_str(), account_id.as_str(), amount.minor()),
            Op::Deduct { order_id } => self.deduct(order_id.as_str()),
            Op::Refund {
                order_id,
                refund_id,
                amount,
            } => self.refund(order_id.as_str(), refund_id.as_str(), amount.minor()),
            Op::Authorize {
                order_id,
                hold_ttl_ms,
            } => self.authorize(order_id.as_str(), now + hold_ttl_ms),
            Op::Capture { order_id, amount } => {
                self.capture(order_id.as_str(), amount.map(Money::minor), now)
            }
            Op::Void { order_id } => self.release(order_id.as_str(), OrderStatus::Voided, now),
            Op::Expire { order_id } => self.release(order_id.as_str(), OrderStatus::Expired, now),
        }
    }

    fn create_account(&mut self, id: &str, balance: i64, currency: Currency) -> Shape {
        match self.accounts.get(id) {
            Some(&(opening, cur, now)) if opening == balance && cur == currency => Shape::Account {
                created: false,
                balance: now,
            },
            Some(_) => Shape::Rejected("account_exists"),
            None => {
                self.accounts
                    .insert(id.into(), (balance, currency, balance));
                Shape::Account {
                    created: true,
                    balance,
                }
            }
        }
    }

    fn create_order(&mut self, id: &str, account: &str, amount: i64) -> Shape {
        if let Some(o) = self.orders.get(id) {
            return if o.account == account && o.amount == amount {
                Shape::Order {
                    created: false,
                    status: o.status,
                    refunded: o.refunded,
                }
            } else {
                Shape::Rejected("order_exists")
            };
        }
        if !self.accounts.contains_key(account) {
            return Shape::Rejected("account_not_found");
        }
        self.orders.insert(
            id.into(),
            ModelOrder {
                account: account.into(),
                amount,
                status: OrderStatus::Prepare,
                refunded: 0,
                debit: None,
                expires: None,
                hold: None,
                release: None,
                captured: None,
            },
        );
        Shape::Order {
            created: true,
            status: OrderStatus::Prepare,
            refunded: 0,
        }
    }

    fn deduct(&mut self, id: &str) -> Shape {
        let Some(o) = self.orders.get_mut(id) else {
            return Shape::Rejected("order_not_found");
        };
        match (o.status, o.debit) {
            (OrderStatus::Failed, _) => Shape::Rejected("insufficient_funds"),
            _ if o.expires.is_some() => Shape::Rejected("order_authorized"),
            (OrderStatus::Prepare, _) => {
                let held = self.held.get(&o.account).copied().unwrap_or(0);
                let balance = &mut self.accounts.get_mut(&o.account).unwrap().2;
                if *balance - held < o.amount {
                    o.status = OrderStatus::Failed;
                    return Shape::Rejected("insufficient_funds");
                }
                *balance -= o.amount;
                self.entries += 1;
                o.status = OrderStatus::Paid;
                o.debit = Some((self.entries, *balance));
                Shape::Moved {
                    replayed: false,
                    entry: self.entries,
                    amount: o.amount,
                    balance_after: *balance,
                    status: o.status,
                    refunded: 0,
                }
            }
            (status, Some((entry, balance_after))) => Shape::Moved {
                replayed: true,
                entry,
                amount: o.amount,
                balance_after,
                status,
                refunded: o.refunded,
            },
            (_, None) => panic!("model: a paid order without its debit"),
        }
    }

    fn refund(&mut self, id: &str, refund_id: &str, amount: i64) -> Shape {
        let Some(o) = self.orders.get_mut(id) else {
            return Shape::Rejected("order_not_found");
        };
        if let Some((order, first_amount, entry, balance_after)) = self.refunds.get(refund_id) {
            return if order == id && *first_amount == amount {
                Shape::Moved {
                    replayed: true,
                    entry: *entry,
                    amount,
                    balance_after: *balance_after,
                    status: o.status,
                    refunded: o.refunded,
                }
            } else {
                Shape::Rejected("refund_exists")
            };
        }
        match o.status {
            OrderStatus::Paid | OrderStatus::PartiallyRefunded => {}
            OrderStatus::Refunded => return Shape::Rejected("refund_exceeds_paid"),
            _ => return Shape::Rejected("order_not_paid"),
        }
        let taken = o.captured.unwrap_or(o.amount);
        if o.refunded + amount > taken {
            return Shape::Rejected("refund_exceeds_paid");
        }
        let balance = &mut self.accounts.get_mut(&o.account).unwrap().2;
        let Some(after) = balance.checked_add(amount) else {
            return Shape::Rejected("refused_by_database");
        };
        *balance = after;
        o.refunded += amount;
        o.status = if o.refunded == taken {
            OrderStatus::Refunded
        } else {
            OrderStatus::PartiallyRefunded
        };
        self.entries += 1;
        self.refunds
            .insert(refund_id.into(), (id.into(), amount, self.entries, after));
        Shape::Moved {
            replayed: false,
            entry: self.entries,
            amount,
            balance_after: after,
            status: o.status,
            refunded: o.refunded,
        }
    }
}

/// Two-phase payments, as API.md states them.
impl Model {
    fn movement(&self, id: &str, entry: (i64, i64), amount: i64, replayed: bool) -> Shape {
        let o = &self.orders[id];
        Shape::Moved {
            replayed,
            entry: entry.0,
            amount,
            balance_after: entry.1,
            status: o.status,
            refunded: o.refunded,
        }
    }

    fn authorize(&mut self, id: &str, expires: i64) -> Shape {
        let Some(o) = self.orders.get_mut(id) else {
            return Shape::Rejected("order_not_found");
        };
        match o.status {
            OrderStatus::Failed => return Shape::Rejected("insufficient_funds"),
            _ if o.expires.is_some() => {
                let hold = o.hold.expect("model: a two-phase order without its hold");
                let amount = o.amount;
                return self.movement(id, hold, amount, true);
            }
            OrderStatus::Prepare => {}
            _ => return Shape::Rejected("order_not_authorized"),
        }
        let held = self.held.entry(o.account.clone()).or_default();
        let balance = self.accounts[&o.account].2;
        if balance - *held < o.amount {
            o.status = OrderStatus::Failed;
            return Shape::Rejected("insufficient_funds");
        }
        *held += o.amount;
        self.entries += 1;
        o.status = OrderStatus::Authorized;
        o.expires = Some(expires);
        o.hold = Some((self.entries, balance));
        let (hold, amount) = (self.entries, o.amount);
        self.movement(id, (hold, balance), amount, false)
    }

    fn capture(&mut self, id: &str, amount: Option<i64>, now: i64) -> Shape {
        let Some(o) = self.orders.get_mut(id) else {
            return Shape::Rejected("order_not_found");
        };
        let Some(expires) = o.expires else {
            return Shape::Rejected("order_not_authorized");
        };
        let n = amount.unwrap_or(o.amount);
        match o.status {
            OrderStatus::Authorized => {}
            OrderStatus::Voided => return Shape::Rejected("hold_voided"),
            OrderStatus::Expired => return Shape::Rejected("hold_expired"),
            _ if o.captured == Some(n) => {
                let debit = o.debit.expect("model: a capture without its entry");
                return self.movement(id, debit, n, true);
            }
            _ => return Shape::Rejected("hold_already_captured"),
        }
        if now >= expires {
            // The capture writes the expiry it found (`Effect::Lapse`).
            self.release(id, OrderStatus::Expired, now);
            return Shape::Rejected("hold_expired");
        }
        if n > o.amount {
            return Shape::Rejected("capture_exceeds_hold");
        }
        let balance = &mut self.accounts.get_mut(&o.account).unwrap().2;
        *balance -= n;
        *self.held.get_mut(&o.account).unwrap() -= o.amount;
        self.entries += 1;
        let capture = (self.entries, *balance);
        if n < o.amount {
            self.entries += 1;
            o.release = Some((self.entries, *balance));
        }
        o.status = OrderStatus::Paid;
        o.captured = Some(n);
        o.debit = Some(capture);
        self.movement(id, capture, n, false)
    }

    /// A void (`target` VOIDED) or the sweeper's expiry (EXPIRED).
    fn release(&mut self, id: &str, target: OrderStatus, now: i64) -> Shape {
        let Some(o) = self.orders.get_mut(id) else {
            return Shape::Rejected("order_not_found");
        };
        let Some(expires) = o.expires else {
            return Shape::Rejected("order_not_authorized");
        };
        match o.status {
            OrderStatus::Authorized => {}
            s if s == target => {
                let release = o.release.expect("model: a release without its entry");
                let amount = o.amount;
                return self.movement(id, release, amount, true);
            }
            OrderStatus::Voided => return Shape::Rejected("hold_voided"),
            OrderStatus::Expired => return Shape::Rejected("hold_expired"),
            _ => return Shape::Rejected("hold_already_captured"),
        }
        match (target, now >= expires) {
            (OrderStatus::Voided, true) => {
                // The void writes the expiry it found (`Effect::Lapse`).
                self.release(id, OrderStatus::Expired, now);
                return Shape::Rejected("hold_expired");
            }
            (OrderStatus::Expired, false) => return Shape::Rejected("hold_not_expired"),
            _ => {}
        }
        let balance = self.accounts[&o.account].2;
        *self.held.get_mut(&o.account).unwrap() -= o.amount;
        self.entries += 1;
        o.status = target;
        o.release = Some((self.entries, balance));
        let (release, amount) = (self.entries, o.amount);
        self.movement(id, (release, balance), amount, false)
    }
}
