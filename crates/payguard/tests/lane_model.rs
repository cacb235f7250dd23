//! Model check of the lane's single-flight logic with shuttle: producers, the lane
//! owner and the store run as threads whose interleavings shuttle explores.
//!
//! Properties, under every explored schedule:
//! * at most one execution of an op per batch, and a deduct's money moves once;
//! * every waiter gets an answer (a lost waiter would deadlock, which shuttle reports);
//! * all duplicates of a deduct see the same entry, exactly one as the original;
//! * when everything is answered the lane holds no entry (nothing leaks).

use payguard::domain::{
    AccountId, Entry, EntryKind, Money, Order, OrderId, OrderStatus, RequestId,
};
use payguard::engine::lane::{LaneCore, LaneReply};
use payguard::store::{Command, Op, OpResult, Output, Rejection};
use shuttle::sync::mpsc::{channel, Sender};
use shuttle::thread;
use std::collections::{HashMap, HashSet};

enum Event {
    Submit(Command, RequestId, Sender<LaneReply>),
    Done(Vec<OpResult>),
}

/// A store with real semantics for deduct: the first charges, later ones replay.
#[derive(Default)]
struct ModelStore {
    paid: HashMap<OrderId, i64>,
    next_entry: i64,
    charges: usize,
}

impl ModelStore {
    fn apply(&mut self, ops: &[Command]) -> Vec<OpResult> {
        let distinct: HashSet<&Command> = ops.iter().collect();
        assert_eq!(
            distinct.len(),
            ops.len(),
            "a batch carried the same op twice"
        );
        ops.iter()
            .map(|cmd| match &cmd.op {
                Op::Deduct { order_id } => {
                    let (entry, replayed) = match self.paid.get(order_id) {
                        Some(e) => (*e, true),
                        None => {
                            self.next_entry += 1;
                            self.charges += 1;
                            self.paid.insert(order_id.clone(), self.next_entry);
                            (self.next_entry, false)
                        }
                    };
                    Ok(movement(order_id, entry, replayed))
                }
                _ => Err(Rejection::OrderNotFound),
            })
            .collect()
    }
}

fn movement(order_id: &OrderId, entry: i64, replayed: bool) -> Output {
    let account_id = AccountId::parse("a").unwrap();
    let amount = Money::amount(100).unwrap();
    Output::Movement {
        order: Order {
            id: order_id.clone(),
            account_id: account_id.clone(),
            amount,
            status: OrderStatus::Paid,
            refunded: Money::ZERO,
            debit_entry_id: Some(entry),
            failure_reason: None,
            captured: None,
            held: Money::ZERO,
            hold_expires_at: None,
            created_at: 0,
            updated_at: 0,
        },
        entry: Entry {
            id: entry,
            order_id: order_id.clone(),
            account_id,
            kind: EntryKind::Debit,
            amount,
            balance_after: Money::ZERO,
            refund_id: None,
            reverses: None,
            created_at: 0,
        },
        replayed,
    }
}

fn scenario(producers: usize, orders: &'static [&'static str], batch_max: usize) {
    let (events_tx, events_rx) = channel::<Event>();
    let (store_tx, store_rx) = channel::<Vec<Command>>();

    // The store: one thread applying batches in order, answering on the event queue.
    let store_events = events_tx.clone();
    let store = thread::spawn(move || {
        let mut model = ModelStore::default();
        while let Ok(batch) = store_rx.recv() {
            let results = model.apply(&batch);
            if store_events.send(Event::Done(results)).is_err() {
                break;
            }
        }
        model.charges
    });

    let total = producers;
    let owner = thread::spawn(move || {
        let mut core: LaneCore<Sender<LaneReply>> = LaneCore::new();
        let mut answered = 0;
        while answered < total {
            match events_rx.recv().expect("event queue open") {
                Event::Submit(op, req, reply) => {
                    core.submit(op, req, reply);
                }
                Event::Done(results) => {
                    for d in core.complete(Ok(results)) {
                        let mut waiters = d.waiters.into_iter();
                        if let Some(first) = waiters.next() {
                            first.reply.send(d.reply.clone()).unwrap();
                            answered += 1;
                        }
                        for w in waiters {
                            let replay = match &d.reply {
                                Ok(Ok(out)) => Ok(Ok(out.as_replay())),
                                other => other.clone(),
                            };
                            w.reply.send(replay).unwrap();
                            answered += 1;
                        }
                    }
                }
            }
            if let Some(batch) = core.take_batch(batch_max) {
                store_tx.send(batch).unwrap();
            }
        }
        assert!(
            core.is_idle(),
            "the lane kept entries after answering everyone"
        );
        drop(store_tx);
    });

    let handles: Vec<_> = (0..producers)
        .map(|i| {
            let events = events_tx.clone();
            thread::spawn(move || {
                let order = orders[i % orders.len()];
                let (tx, rx) = channel();
                let op = Command::new(Op::Deduct {
                    order_id: OrderId::parse(order).unwrap(),
                });
                events
                    .send(Event::Submit(
                        op,
                        RequestId::parse(&format!("r{i}")).unwrap(),
                        tx,
                    ))
                    .unwrap();
                let reply = rx.recv().expect("every waiter is answered");
                (order, reply)
            })
        })
        .collect();
    drop(events_tx);

    let mut by_order: HashMap<&str, Vec<(i64, bool)>> = HashMap::new();
    for h in handles {
        let (order, reply) = h.join().unwrap();
        match reply {
            Ok(Ok(Output::Movement {
                entry, replayed, ..
            })) => by_order
                .entry(order)
                .or_default()
                .push((entry.id, replayed)),
            other => panic!("unexpected reply {other:?}"),
        }
    }
    owner.join().unwrap();
    let charges = store.join().unwrap();
    assert_eq!(charges, by_order.len(), "each order charged exactly once");
    for (order, replies) in by_order {
        let ids: HashSet<i64> = replies.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), 1, "{order}: duplicates saw different entries");
        let originals = replies.iter().filter(|(_, replayed)| !replayed).count();
        assert_eq!(
            originals, 1,
            "{order}: {originals} callers were told they charged"
        );
    }
}

#[test]
fn single_flight_one_order_many_duplicates() {
    shuttle::check_random(|| scenario(4, &["o1"], 8), 3_000);
}

#[test]
fn single_flight_two_orders_small_batches() {
    shuttle::check_random(|| scenario(5, &["o1", "o2"], 1), 3_000);
}

#[test]
fn single_flight_exhaustive_pct() {
    shuttle::check_pct(|| scenario(3, &["o1", "o2"], 2), 3_000, 3);
}
