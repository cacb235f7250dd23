//! Unit tests of the money rules, without a database: one per branch of API.md.

use super::*;
use crate::domain::{Currency, OrderStatus};
use crate::store::{ClaimOutcome, ClaimToken, IdemClaim, IdemWrite};

const NOW: i64 = 1_000;

fn oid(s: &str) -> OrderId {
    OrderId::parse(s).unwrap()
}

fn aid(s: &str) -> AccountId {
    AccountId::parse(s).unwrap()
}

fn m(v: i64) -> Money {
    Money::from_stored(v)
}

fn order(status: OrderStatus, amount: i64, refunded: i64, debit: Option<i64>) -> Order {
    Order {
        id: oid("o"),
        account_id: aid("a"),
        amount: m(amount),
        status,
        refunded: m(refunded),
        debit_entry_id: debit,
        failure_reason: None,
        captured: None,
        held: m(0),
        hold_expires_at: None,
        created_at: 1,
        updated_at: 1,
    }
}

fn entry(id: i64, kind: EntryKind, amount: i64, refund_id: Option<&str>) -> Entry {
    Entry {
        id,
        order_id: oid("o"),
        account_id: aid("a"),
        kind,
        amount: m(amount),
        balance_after: m(0),
        refund_id: refund_id.map(|r| RefundId::parse(r).unwrap()),
        reverses: None,
        created_at: 1,
    }
}

fn deduct() -> Command {
    Command::new(Op::Deduct { order_id: oid("o") })
}

fn refund(rid: &str, amount: i64) -> Command {
    Command::new(Op::Refund {
        order_id: oid("o"),
        refund_id: RefundId::parse(rid).unwrap(),
        amount: Money::amount(amount).unwrap(),
    })
}

fn decision(cmd: &Command, seen: Seen<'_>) -> Decision {
    decide(cmd, &seen, NOW).unwrap().decision
}

fn rejected(cmd: &Command, seen: Seen<'_>) -> Rejection {
    match decision(cmd, seen) {
        Decision::Reject(r) => r,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn accounts_open_once_and_replay_by_opening_balance() {
    let cmd = |balance: i64, currency: Currency| {
        Command::new(Op::CreateAccount {
            id: aid("a"),
            balance: m(balance),
            currency,
        })
    };
    let opened = match decision(&cmd(500, Currency::CNY), Seen::default()) {
        Decision::Apply(Effect::OpenAccount(a)) => a,
        other => panic!("{other:?}"),
    };
    assert_eq!((opened.balance, opened.opening_balance), (m(500), m(500)));
    assert_eq!((opened.created_at, opened.updated_at), (NOW, NOW));
    // Money moved since: still the same request, answered with the account now.
    let now = Account {
        balance: m(20),
        ..opened.clone()
    };
    let seen = Seen {
        account: Some(&now),
        ..Seen::default()
    };
    assert_eq!(
        decision(&cmd(500, Currency::CNY), seen),
        Decision::Replay(Output::Account {
            account: now.clone(),
            created: false
        })
    );
    assert_eq!(
        rejected(&cmd(20, Currency::CNY), seen),
        Rejection::AccountExists
    );
    let usd = Currency::parse("USD").unwrap();
    assert_eq!(rejected(&cmd(500, usd), seen), Rejection::AccountExists);
}

#[test]
fn orders_need_their_account_and_replay_by_account_and_amount() {
    let cmd = |account: &str, amount: i64| {
        Command::new(Op::CreateOrder {
            id: oid("o"),
            account_id: aid(account),
            amount: m(amount),
        })
    };
    assert_eq!(
        rejected(&cmd("a", 5), Seen::default()),
        Rejection::AccountNotFound
    );
    let placed = Seen {
        account_exists: true,
        ..Seen::default()
    };
    match decision(&cmd("a", 5), placed) {
        Decision::Apply(Effect::PlaceOrder(o)) => {
            assert_eq!(
                (o.status, o.refunded, o.debit_entry_id),
                (OrderStatus::Prepare, m(0), None)
            )
        }
        other => panic!("{other:?}"),
    }
    let paid = order(OrderStatus::Paid, 5, 0, Some(7));
    let seen = Seen {
        order: Some(&paid),
        ..Seen::default()
    };
    assert!(matches!(
        decision(&cmd("a", 5), seen),
        Decision::Replay(Output::Order { created: false, .. })
    ));
    assert_eq!(rejected(&cmd("a", 6), seen), Rejection::OrderExists);
    assert_eq!(rejected(&cmd("b", 5), seen), Rejection::OrderExists);
}

#[test]
fn a_deduct_charges_a_prepare_order_once() {
    let prepare = order(OrderStatus::Prepare, 300, 0, None);
    let seen = Seen {
        order: Some(&prepare),
        balance: Some(m(1_000)),
        held: Some(m(0)),
        ..Seen::default()
    };
    let Decision::Apply(effect @ Effect::Charge(_)) = decision(&deduct(), seen) else {
        panic!("expected a charge");
    };
    let Effect::Charge(mv) = &effect else {
        unreachable!()
    };
    assert_eq!(mv.balance_before, m(1_000));
    assert_eq!(mv.entry.balance_after, m(700));
    assert_eq!(mv.entry.kind, EntryKind::Debit);
    match effect.answer(42) {
        Ok(Output::Movement {
            order,
            entry,
            replayed: false,
        }) => {
            assert_eq!(order.status, OrderStatus::Paid);
            assert_eq!(order.debit_entry_id, Some(42));
            assert_eq!(order.updated_at, NOW);
            assert_eq!((entry.id, entry.amount), (42, m(300)));
        }
        other => panic!("{other:?}"),
    }
    // Exactly the balance is enough (one unit less: the overdraft test below).
    let exact = Seen {
        balance: Some(m(300)),
        held: Some(m(0)),
        ..seen
    };
    assert!(matches!(
        decision(&deduct(), exact),
        Decision::Apply(Effect::Charge(_))
    ));
}

#[test]
fn an_overdraft_fails_the_order_for_good() {
    let prepare = order(OrderStatus::Prepare, 300, 0, None);
    let seen = Seen {
        order: Some(&prepare),
        balance: Some(m(299)),
        held: Some(m(0)),
        ..Seen::default()
    };
    match decision(&deduct(), seen) {
        Decision::Apply(effect @ Effect::Decline(_)) => {
            let Effect::Decline(failed) = &effect else {
                unreachable!()
            };
            assert_eq!(failed.status, OrderStatus::Failed);
            assert_eq!(failed.failure_reason.as_deref(), Some("insufficient_funds"));
            assert_eq!(effect.answer(0), Err(Rejection::InsufficientFunds));
        }
        other => panic!("{other:?}"),
    }
    let failed = order(OrderStatus::Failed, 300, 0, None);
    let later = Seen {
        order: Some(&failed),
        balance: Some(m(1_000_000)),
        held: Some(m(0)),
        ..Seen::default()
    };
    assert_eq!(rejected(&deduct(), later), Rejection::InsufficientFunds);
}

#[test]
fn a_paid_order_replays_its_debit_with_the_order_as_it_is_now() {
    let debit = entry(7, EntryKind::Debit, 300, None);
    for status in [
        OrderStatus::Paid,
        OrderStatus::PartiallyRefunded,
        OrderStatus::Refunded,
    ] {
        let refunded = match status {
            OrderStatus::Paid => 0,
            OrderStatus::PartiallyRefunded => 100,
            _ => 300,
        };
        let now = order(status, 300, refunded, Some(7));
        let seen = Seen {
            order: Some(&now),
            debit: Some(&debit),
            ..Seen::default()
        };
        assert_eq!(
            decision(&deduct(), seen),
            Decision::Replay(Output::Movement {
                order: now.clone(),
                entry: debit.clone(),
                replayed: true
            })
        );
    }
    assert_eq!(
        rejected(&deduct(), Seen::default()),
        Rejection::OrderNotFound
    );
}

#[test]
fn a_paid_order_without_its_debit_is_inconsistent_not_an_answer() {
    let no_link = order(OrderStatus::Paid, 300, 0, None);
    let seen = Seen {
        order: Some(&no_link),
        ..Seen::default()
    };
    assert!(decide(&deduct(), &seen, NOW).is_err());
    let linked = order(OrderStatus::Paid, 300, 0, Some(7));
    let other_entry = entry(8, EntryKind::Debit, 300, None);
    let seen = Seen {
        order: Some(&linked),
        debit: Some(&other_entry),
        ..Seen::default()
    };
    assert!(decide(&deduct(), &seen, NOW).is_err());
    let prepare = order(OrderStatus::Prepare, 300, 0, None);
    let no_account = Seen {
        order: Some(&prepare),
        ..Seen::default()
    };
    assert!(decide(&deduct(), &no_account, NOW).is_err());
}

#[test]
fn refunds_need_a_paid_order_and_stay_within_its_amount() {
    assert_eq!(
        rejected(&refund("r", 1), Seen::default()),
        Rejection::OrderNotFound
    );
    for status in [OrderStatus::Prepare, OrderStatus::Failed] {
        let o = order(status, 300, 0, None);
        let seen = Seen {
            order: Some(&o),
            balance: Some(m(0)),
            held: Some(m(0)),
            ..Seen::default()
        };
        assert_eq!(rejected(&refund("r", 1), seen), Rejection::OrderNotPaid);
    }
    let refunded = order(OrderStatus::Refunded, 300, 300, Some(7));
    let seen = Seen {
        order: Some(&refunded),
        balance: Some(m(0)),
        held: Some(m(0)),
        ..Seen::default()
    };
    assert_eq!(
        rejected(&refund("r", 1), seen),
        Rejection::RefundExceedsPaid
    );
    let partly = order(OrderStatus::PartiallyRefunded, 300, 200, Some(7));
    let seen = Seen {
        order: Some(&partly),
        balance: Some(m(50)),
        held: Some(m(0)),
        ..Seen::default()
    };
    assert_eq!(
        rejected(&refund("r", 101), seen),
        Rejection::RefundExceedsPaid
    );
    match decision(&refund("r", 100), seen) {
        Decision::Apply(Effect::Refund(mv)) => {
            assert_eq!(mv.after.status, OrderStatus::Refunded);
            assert_eq!(mv.after.refunded, m(300));
            assert_eq!((mv.balance_before, mv.entry.balance_after), (m(50), m(150)));
            assert_eq!(mv.entry.refund_id, Some(RefundId::parse("r").unwrap()));
            // A refund keeps the order's debit link.
            let (order, entry) = mv.settle(9);
            assert_eq!((order.debit_entry_id, entry.id), (Some(7), 9));
        }
        other => panic!("{other:?}"),
    }
    match decision(&refund("r", 99), seen) {
        Decision::Apply(Effect::Refund(mv)) => {
            assert_eq!(mv.after.status, OrderStatus::PartiallyRefunded)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_refund_id_moves_money_once_and_belongs_to_one_order_and_amount() {
    let paid = order(OrderStatus::PartiallyRefunded, 300, 100, Some(7));
    let first = entry(9, EntryKind::Refund, 100, Some("r"));
    let seen = Seen {
        order: Some(&paid),
        balance: Some(m(0)),
        held: Some(m(0)),
        refund: Some(&first),
        ..Seen::default()
    };
    assert_eq!(
        decision(&refund("r", 100), seen),
        Decision::Replay(Output::Movement {
            order: paid.clone(),
            entry: first.clone(),
            replayed: true
        })
    );
    assert_eq!(rejected(&refund("r", 99), seen), Rejection::RefundExists);
    let elsewhere = Entry {
        order_id: oid("other"),
        ..first.clone()
    };
    let seen = Seen {
        refund: Some(&elsewhere),
        ..seen
    };
    assert_eq!(rejected(&refund("r", 100), seen), Rejection::RefundExists);
    // A replay wins over the order's state: a refunded order still replays.
    let refunded = order(OrderStatus::Refunded, 300, 300, Some(7));
    let seen = Seen {
        order: Some(&refunded),
        refund: Some(&first),
        ..Seen::default()
    };
    assert!(matches!(
        decision(&refund("r", 100), seen),
        Decision::Replay(_)
    ));
}

/// The disagreement this module ended: PostgreSQL refused a refund that would
/// overflow the balance, SQLite left it to SQL arithmetic.
#[test]
fn a_refund_that_would_overflow_the_balance_is_refused() {
    let paid = order(OrderStatus::Paid, 300, 0, Some(7));
    let seen = Seen {
        order: Some(&paid),
        balance: Some(m(i64::MAX - 99)),
        held: Some(m(0)),
        ..Seen::default()
    };
    assert!(matches!(
        rejected(&refund("r", 100), seen),
        Rejection::Refused(_)
    ));
    let fits = Seen {
        balance: Some(m(i64::MAX - 100)),
        held: Some(m(0)),
        ..seen
    };
    assert!(matches!(
        decision(&refund("r", 100), fits),
        Decision::Apply(_)
    ));
}

#[test]
fn a_lower_fencing_token_is_stale_and_an_equal_or_higher_one_is_kept() {
    let prepare = order(OrderStatus::Prepare, 300, 0, None);
    let seen = Seen {
        order: Some(&prepare),
        fence: 10,
        balance: Some(m(1_000)),
        held: Some(m(0)),
        ..Seen::default()
    };
    let stale = decide(&deduct().fenced(9), &seen, NOW).unwrap();
    assert_eq!(
        stale,
        Verdict {
            fence: None,
            decision: Decision::Reject(Rejection::StaleFencingToken)
        }
    );
    for token in [10, 11] {
        let v = decide(&deduct().fenced(token), &seen, NOW).unwrap();
        assert_eq!(v.fence, Some(token));
        assert!(matches!(v.decision, Decision::Apply(Effect::Charge(_))));
    }
    // Even a rejected command keeps its (not stale) token.
    let failed = order(OrderStatus::Failed, 300, 0, None);
    let v = decide(
        &deduct().fenced(12),
        &Seen {
            order: Some(&failed),
            fence: 10,
            ..Seen::default()
        },
        NOW,
    )
    .unwrap();
    assert_eq!(v.fence, Some(12));
    // No order yet: nothing to fence (an order is fenced once it exists).
    let v = decide(&deduct().fenced(1), &Seen::default(), NOW).unwrap();
    assert_eq!(v.fence, None);
    assert_eq!(v.decision, Decision::Reject(Rejection::OrderNotFound));
}

fn claim_of(fingerprint: &str, now_ms: i64) -> IdemClaim {
    IdemClaim {
        scope: "s".into(),
        key: "k".into(),
        fingerprint: fingerprint.into(),
        now_ms,
        lease_ms: 30,
        ttl_ms: 100,
    }
}

#[test]
fn an_idempotency_key_is_taken_when_free_and_answered_while_held() {
    assert_eq!(claim(None, &claim_of("f", 0)), ClaimDecision::Take);
    let done = IdemRecord {
        fingerprint: "f".into(),
        done: Some((201, b"{}".to_vec())),
        lease_until: None,
        claim: None,
        expires_at: 100,
    };
    assert_eq!(
        claim(Some(&done), &claim_of("f", 100)),
        ClaimDecision::Answer(ClaimOutcome::Done {
            same_request: true,
            status: 201,
            body: b"{}".to_vec()
        })
    );
    assert!(matches!(
        claim(Some(&done), &claim_of("g", 50)),
        ClaimDecision::Answer(ClaimOutcome::Done {
            same_request: false,
            ..
        })
    ));
    assert_eq!(claim(Some(&done), &claim_of("f", 101)), ClaimDecision::Take);
    let in_flight = IdemRecord {
        fingerprint: "f".into(),
        done: None,
        lease_until: Some(30),
        claim: Some(ClaimToken(1)),
        expires_at: 100,
    };
    assert_eq!(
        claim(Some(&in_flight), &claim_of("g", 30)),
        ClaimDecision::Answer(ClaimOutcome::InFlight {
            same_request: false
        })
    );
    // Its instance died: the lease lapsed, the key is free again.
    assert_eq!(
        claim(Some(&in_flight), &claim_of("f", 31)),
        ClaimDecision::Take
    );
}

#[test]
fn a_key_is_freed_only_by_the_claim_that_holds_it() {
    let held_by = |claim: Option<i64>| IdemRecord {
        fingerprint: "f".into(),
        done: None,
        lease_until: Some(30),
        claim: claim.map(ClaimToken),
        expires_at: 100,
    };
    assert!(releases(&held_by(Some(1)), ClaimToken(1)));
    // Claim 1's lease lapsed (or its transaction freed the key) and claim 2
    // took the key since: claim 1's late release must leave it.
    assert!(!releases(&held_by(Some(2)), ClaimToken(1)));
    // Claimed before tokens: no request holds it; it lapses with its lease.
    assert!(!releases(&held_by(None), ClaimToken(1)));
    let done = IdemRecord {
        done: Some((200, b"x".to_vec())),
        lease_until: None,
        claim: None,
        ..held_by(None)
    };
    assert!(!releases(&done, ClaimToken(1)));
}

#[test]
fn an_answer_is_stored_over_its_own_request_only_and_never_over_an_answer() {
    let idem = IdemWrite {
        scope: "s".into(),
        key: "k".into(),
        fingerprint: "f".into(),
        ttl_ms: 50,
        claim: ClaimToken(1),
        render: std::sync::Arc::new(|_: &OpResult| None),
    };
    let record = |fingerprint: &str, claim: Option<i64>| IdemRecord {
        fingerprint: fingerprint.into(),
        done: None,
        lease_until: Some(30),
        claim: claim.map(ClaimToken),
        expires_at: 100,
    };
    assert!(stores_over(&record("f", Some(1)), &idem));
    // A repeat of this request claimed the key after this one's lease
    // lapsed: it gets this answer (`KeyAnswered`), not a decision of its own.
    assert!(stores_over(&record("f", Some(2)), &idem));
    assert!(stores_over(&record("f", None), &idem));
    // Another request's key now.
    assert!(!stores_over(&record("g", Some(2)), &idem));
    let done = IdemRecord {
        done: Some((409, b"y".to_vec())),
        lease_until: None,
        claim: None,
        ..record("f", None)
    };
    assert!(!stores_over(&done, &idem));
}

#[test]
fn an_answer_is_stored_when_definite_and_the_claim_released_otherwise() {
    let idem = IdemWrite {
        scope: "s".into(),
        key: "k".into(),
        fingerprint: "f".into(),
        ttl_ms: 50,
        claim: ClaimToken(1),
        render: std::sync::Arc::new(|r: &OpResult| match r {
            Err(e) if !e.is_definite() => None,
            _ => Some((200, b"x".to_vec())),
        }),
    };
    assert_eq!(
        completion(&idem, &Err(Rejection::OrderNotFound), NOW),
        IdemCompletion::Store {
            status: 200,
            body: b"x".to_vec(),
            expires_at: NOW + 50
        }
    );
    assert_eq!(
        completion(&idem, &Err(Rejection::StaleFencingToken), NOW),
        IdemCompletion::Release
    );
    let forever = IdemWrite {
        ttl_ms: i64::MAX,
        ..idem
    };
    assert!(matches!(
        completion(&forever, &Err(Rejection::OrderNotFound), NOW),
        IdemCompletion::Store {
            expires_at: i64::MAX,
            ..
        }
    ));
}

#[test]
fn only_replays_and_definite_refusals_are_settled_without_a_write() {
    let debit = entry(7, EntryKind::Debit, 300, None);
    let paid = order(OrderStatus::Paid, 300, 0, Some(7));
    let prepare = order(OrderStatus::Prepare, 300, 0, None);
    let failed = order(OrderStatus::Failed, 300, 0, None);
    let on = |o: &Order| -> Result<Option<OpResult>, Inconsistent> {
        let seen = Seen {
            order: Some(o),
            debit: Some(&debit),
            balance: Some(m(1_000)),
            held: Some(m(0)),
            ..Seen::default()
        };
        settled(&deduct(), &seen, NOW)
    };
    // A paid order: the replay the write path would answer.
    assert_eq!(
        on(&paid).unwrap(),
        Some(Ok(Output::Movement {
            order: paid.clone(),
            entry: debit.clone(),
            replayed: true
        }))
    );
    // A failed order: insufficient_funds for good.
    assert_eq!(
        on(&failed).unwrap(),
        Some(Err(Rejection::InsufficientFunds))
    );
    // A PREPARE order would be charged: only the write path may.
    assert_eq!(on(&prepare).unwrap(), None);
    // A PREPARE order that cannot pay would be declined: a write too.
    let poor = Seen {
        order: Some(&prepare),
        balance: Some(m(1)),
        held: Some(m(0)),
        ..Seen::default()
    };
    assert_eq!(settled(&deduct(), &poor, NOW).unwrap(), None);
    // Unknown order: a definite refusal.
    assert_eq!(
        settled(&deduct(), &Seen::default(), NOW).unwrap(),
        Some(Err(Rejection::OrderNotFound))
    );
    // A fenced command, or one with a key to complete, always writes.
    let seen = Seen {
        order: Some(&paid),
        debit: Some(&debit),
        ..Seen::default()
    };
    assert_eq!(settled(&deduct().fenced(3), &seen, NOW).unwrap(), None);
    let keyed = deduct().with_idempotency(IdemWrite {
        scope: "s".into(),
        key: "k".into(),
        fingerprint: "f".into(),
        ttl_ms: 50,
        claim: ClaimToken(1),
        render: std::sync::Arc::new(|_: &OpResult| None),
    });
    assert_eq!(settled(&keyed, &seen, NOW).unwrap(), None);
    // A refund that would move money is a write; its replay is not.
    let refund_entry = entry(9, EntryKind::Refund, 100, Some("r1"));
    let part = order(OrderStatus::PartiallyRefunded, 300, 100, Some(7));
    let replay = Seen {
        order: Some(&part),
        refund: Some(&refund_entry),
        balance: Some(m(1_000)),
        held: Some(m(0)),
        ..Seen::default()
    };
    assert!(matches!(
        settled(&refund("r1", 100), &replay, NOW).unwrap(),
        Some(Ok(Output::Movement { replayed: true, .. }))
    ));
    let fresh = Seen {
        order: Some(&part),
        balance: Some(m(1_000)),
        held: Some(m(0)),
        ..Seen::default()
    };
    assert_eq!(settled(&refund("r2", 100), &fresh, NOW).unwrap(), None);
    // Inconsistent state is never an answer.
    let no_link = order(OrderStatus::Paid, 300, 0, None);
    let broken = Seen {
        order: Some(&no_link),
        ..Seen::default()
    };
    assert!(settled(&deduct(), &broken, NOW).is_err());
}

#[test]
fn a_capture_or_void_past_the_expiry_writes_the_expiry_it_answers() {
    let held = Order {
        held: m(300),
        hold_expires_at: Some(NOW),
        ..order(OrderStatus::Authorized, 300, 0, None)
    };
    let seen = Seen {
        order: Some(&held),
        balance: Some(m(1_000)),
        held: Some(m(300)),
        ..Seen::default()
    };
    let capture = Command::new(Op::Capture {
        order_id: oid("o"),
        amount: None,
    });
    let void = Command::new(Op::Void { order_id: oid("o") });
    for cmd in [&capture, &void] {
        // At the expiry, with no sweeper's release written yet.
        let Decision::Apply(effect @ Effect::Lapse(_)) = decision(cmd, seen) else {
            panic!("{cmd:?} at the expiry: expected the lapse");
        };
        let movement = effect.movement().unwrap();
        assert_eq!(movement.after.status, OrderStatus::Expired);
        assert_eq!((movement.after.held, movement.held_after), (m(0), m(0)));
        assert_eq!(movement.entry.kind, EntryKind::Release);
        assert_eq!(movement.entry.amount, m(300));
        assert_eq!(movement.entry.balance_after, m(1_000), "no money moves");
        assert_eq!(effect.answer(5), Err(Rejection::HoldLapsed));
        assert_eq!(effect.event(5).unwrap().kind, EventType::OrderHoldExpired);
        // A write: never answered from a read.
        assert_eq!(settled(cmd, &seen, NOW).unwrap(), None);
        assert_eq!(Rejection::HoldLapsed.reason(), "hold_expired");
    }
    // Once written, every later capture or void reads who won.
    let expired = Order {
        status: OrderStatus::Expired,
        held: m(0),
        ..held.clone()
    };
    let after = Seen {
        order: Some(&expired),
        balance: Some(m(1_000)),
        held: Some(m(0)),
        ..Seen::default()
    };
    for cmd in [&capture, &void] {
        assert_eq!(rejected(cmd, after), Rejection::HoldExpired);
        assert_eq!(
            settled(cmd, &after, NOW).unwrap(),
            Some(Err(Rejection::HoldExpired))
        );
    }
    // A millisecond before the expiry the capture still takes the hold.
    let early = decide(&capture, &seen, NOW - 1).unwrap().decision;
    assert!(
        matches!(early, Decision::Apply(Effect::Capture(_))),
        "{early:?}"
    );
}

/// A keyed command whose key already holds a stored answer for the same
/// request was answered by a committed transaction: it is not decided again
/// (seed 4096 of the simulation: a refund refused `order_not_paid`, rerun after
/// its unanswered COMMIT did commit, once the order was paid, was made).
#[test]
fn a_keyed_command_whose_key_holds_its_answer_is_not_decided_again() {
    let keyed = |fingerprint: &str| {
        refund("r1", 100).with_idempotency(IdemWrite {
            scope: "s".into(),
            key: "k".into(),
            fingerprint: fingerprint.into(),
            ttl_ms: 50,
            claim: ClaimToken(1),
            render: std::sync::Arc::new(|_: &OpResult| None),
        })
    };
    let debit = entry(7, EntryKind::Debit, 300, None);
    // Paid since the refusal was stored: decided afresh, the refund would move money.
    let paid = order(OrderStatus::Paid, 300, 0, Some(7));
    let record = |done: Option<(u16, Vec<u8>)>| IdemRecord {
        fingerprint: "f".into(),
        done,
        lease_until: None,
        claim: None,
        expires_at: NOW + 50,
    };
    let done = record(Some((409, b"order_not_paid".to_vec())));
    let in_flight = IdemRecord {
        lease_until: Some(NOW + 10),
        claim: Some(ClaimToken(1)),
        ..record(None)
    };
    let seen = |key: Option<&'static IdemRecord>| Seen {
        order: Some(&paid),
        debit: Some(&debit),
        balance: Some(m(1_000)),
        held: Some(m(0)),
        key,
        ..Seen::default()
    };
    let done: &'static IdemRecord = Box::leak(Box::new(done));
    let in_flight: &'static IdemRecord = Box::leak(Box::new(in_flight));
    // The key answered this very request: read the key, decide nothing.
    assert_eq!(
        decide(&keyed("f"), &seen(Some(done)), NOW).unwrap(),
        Verdict {
            fence: None,
            decision: Decision::Reject(Rejection::KeyAnswered)
        }
    );
    // Before every other rule: a fenced one keeps no fence, even a stale one.
    let fenced = Seen {
        fence: 9,
        ..seen(Some(done))
    };
    assert_eq!(
        decide(&keyed("f").fenced(3), &fenced, NOW).unwrap(),
        Verdict {
            fence: None,
            decision: Decision::Reject(Rejection::KeyAnswered)
        }
    );
    // Its own claim (in flight), no record read, or another request's
    // answer: decided as before.
    for key in [Some(in_flight), None] {
        assert!(matches!(
            decision(&keyed("f"), seen(key)),
            Decision::Apply(Effect::Refund(_))
        ));
    }
    assert!(matches!(
        decision(&keyed("other"), seen(Some(done))),
        Decision::Apply(Effect::Refund(_))
    ));
    // Without a key the record is not looked at.
    assert!(matches!(
        decision(&refund("r1", 100), seen(Some(done))),
        Decision::Apply(Effect::Refund(_))
    ));
    // Never stored under the key, never settled from a read.
    assert!(!Rejection::KeyAnswered.is_definite());
    assert_eq!(settled(&keyed("f"), &seen(Some(done)), NOW).unwrap(), None);
}
