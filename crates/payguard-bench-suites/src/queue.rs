//! The queue suite: how fast each channel delivers small messages into one
//! consumer, the "lane owner".
//!
//! payguard's lanes are tokio tasks fed by a bounded tokio mpsc (`try_send`, a full
//! queue is answered 503). The write-up (chapter 5) credits a multi-producer
//! single-consumer lock-free queue with 1.27M msgs/s. This suite measures tokio mpsc
//! against crossbeam-channel and kanal with 1 and 4 producers so a switch can be
//! judged on numbers, and it checks delivery while it measures: the consumer reads
//! until every sender is gone and must have seen exactly N messages, each
//! producer's in order (a lane applies an order's commands in arrival order).

use crate::error::{check_list, check_range, ArgError};
use crate::machine::Machine;
use crate::report::{emit, Chart, Document, Section, Series, Table};
use anyhow::{ensure, Context};
use serde::Serialize;
use std::time::{Duration, Instant};

pub const MESSAGES_MAX: u64 = 100_000_000;
pub const PRODUCERS_MAX: u64 = 64;
pub const CAPACITY_MAX: u64 = 1 << 20;
pub const REPS_MAX: u64 = 20;
/// payguard's default `lane_queue_depth_max`.
pub const LANE_QUEUE_DEPTH_DEFAULT: u64 = 4096;
/// The write-up's MpscUnboundedArrayQueue figure (chapter 5): 127万条/秒.
pub const WRITEUP_MSGS_PER_SEC: f64 = 1_270_000.0;

/// The channels under test, and which side of each is async.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelKind {
    /// tokio::sync::mpsc bounded; tasks `send().await` into a task: the baseline.
    TokioSend,
    /// tokio mpsc with `try_send` (payguard's call); on Full the producer yields
    /// and retries (payguard would answer 503 instead).
    TokioTrySend,
    /// crossbeam-channel bounded; OS threads on both sides.
    Crossbeam,
    /// kanal bounded; OS threads on both sides.
    KanalSync,
    /// kanal bounded_async; tasks on both sides (the drop-in for tokio mpsc).
    KanalAsync,
}

impl ChannelKind {
    pub const ALL: [ChannelKind; 5] = [
        ChannelKind::TokioSend,
        ChannelKind::TokioTrySend,
        ChannelKind::Crossbeam,
        ChannelKind::KanalSync,
        ChannelKind::KanalAsync,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ChannelKind::TokioSend => "tokio mpsc send().await",
            ChannelKind::TokioTrySend => "tokio mpsc try_send",
            ChannelKind::Crossbeam => "crossbeam-channel",
            ChannelKind::KanalSync => "kanal (sync)",
            ChannelKind::KanalAsync => "kanal (async)",
        }
    }

    /// Producer side → consumer side.
    pub fn sides(self) -> &'static str {
        match self {
            ChannelKind::TokioSend | ChannelKind::TokioTrySend | ChannelKind::KanalAsync => {
                "task → task"
            }
            ChannelKind::Crossbeam | ChannelKind::KanalSync => "thread → thread",
        }
    }
}

#[derive(Debug, Clone, Default, clap::Args)]
pub struct QueueArgs {
    /// Tiny sizes (20k messages, one rep): a smoke run.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub output: crate::report::OutputArgs,
    /// Messages per run, split across the producers [default: 1000000; quick: 20000].
    #[arg(long)]
    pub messages: Option<u64>,
    /// Producer counts [default: 1,4].
    #[arg(long, value_delimiter = ',')]
    pub producers: Option<Vec<u64>>,
    /// Channel capacity [default: 4096, payguard's lane_queue_depth_max].
    #[arg(long)]
    pub capacity: Option<u64>,
    /// Repetitions; the median is reported [default: 5; quick: 1].
    #[arg(long)]
    pub reps: Option<u64>,
    /// Channels to run [default: all]; tokio send().await is always added.
    #[arg(long, value_delimiter = ',')]
    pub channels: Option<Vec<ChannelKind>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueuePlan {
    pub quick: bool,
    pub messages: u64,
    pub producers: Vec<u64>,
    pub capacity: u64,
    pub reps: u64,
    pub channels: Vec<ChannelKind>,
    /// Tokio worker threads (= CPUs).
    pub runtime_workers: usize,
}

impl QueueArgs {
    pub fn plan(&self) -> Result<QueuePlan, ArgError> {
        let q = self.quick;
        let messages = self.messages.unwrap_or(if q { 20_000 } else { 1_000_000 });
        let producers = self.producers.clone().unwrap_or_else(|| vec![1, 4]);
        let capacity = self.capacity.unwrap_or(LANE_QUEUE_DEPTH_DEFAULT);
        let reps = self.reps.unwrap_or(if q { 1 } else { 5 });
        check_range("messages", messages, 1, MESSAGES_MAX)?;
        check_list("producers", &producers, 1, PRODUCERS_MAX)?;
        check_range("capacity", capacity, 1, CAPACITY_MAX)?;
        check_range("reps", reps, 1, REPS_MAX)?;
        let mut channels = vec![ChannelKind::TokioSend];
        for c in self
            .channels
            .clone()
            .unwrap_or_else(|| ChannelKind::ALL.to_vec())
        {
            if !channels.contains(&c) {
                channels.push(c);
            }
        }
        Ok(QueuePlan {
            quick: q,
            messages,
            producers,
            capacity,
            reps,
            channels,
            runtime_workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        })
    }
}

/// A small command, as a lane receives: who sent it and its sequence number.
#[derive(Debug, Clone, Copy)]
pub struct Msg {
    pub producer: u32,
    pub seq: u64,
}

/// What the consumer saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    pub seq_sum: u64,
    /// False if any producer's messages arrived out of order.
    pub in_order: bool,
    last: Vec<u64>,
}

impl Tally {
    pub fn new(producers: usize) -> Self {
        Tally {
            count: 0,
            seq_sum: 0,
            in_order: true,
            last: vec![0; producers],
        }
    }

    #[inline]
    fn take(&mut self, m: Msg) {
        self.count += 1;
        self.seq_sum = self.seq_sum.wrapping_add(m.seq);
        match self.last.get_mut(m.producer as usize) {
            Some(l) if *l < m.seq => *l = m.seq,
            _ => self.in_order = false,
        }
    }
}

/// Messages producer `p` of `producers` sends (seq 1..=share).
fn share(n: u64, producers: u64, p: u64) -> u64 {
    n / producers + u64::from(p < n % producers)
}

/// The tally a correct delivery of `n` messages from `producers` must produce.
pub fn expected_tally(n: u64, producers: u64) -> (u64, u64) {
    let sum = (0..producers)
        .map(|p| {
            let k = share(n, producers, p);
            k * (k + 1) / 2
        })
        .fold(0_u64, u64::wrapping_add);
    (n, sum)
}

/// One delivery run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub elapsed: Duration,
    pub tally: Tally,
    /// `try_send` calls that found the queue full.
    pub full_events: u64,
}

fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .build()
        .context("building the tokio runtime")
}

/// Delivers `n` messages from `producers` producers through `kind` into one
/// consumer, which reads until every sender is dropped.
pub fn deliver(
    kind: ChannelKind,
    n: u64,
    producers: u64,
    capacity: u64,
    workers: usize,
) -> anyhow::Result<Outcome> {
    let cap = capacity as usize;
    match kind {
        ChannelKind::TokioSend | ChannelKind::TokioTrySend => {
            let rt = runtime(workers)?;
            rt.block_on(tokio_deliver(kind, n, producers, cap))
        }
        ChannelKind::KanalAsync => {
            let rt = runtime(workers)?;
            rt.block_on(kanal_async_deliver(n, producers, cap))
        }
        ChannelKind::Crossbeam => {
            let (tx, rx) = crossbeam_channel::bounded::<Msg>(cap);
            threads_deliver(
                n,
                producers,
                move |m| tx.send(m).is_ok(),
                move |t| {
                    for m in rx.iter() {
                        t.take(m);
                    }
                },
            )
        }
        ChannelKind::KanalSync => {
            let (tx, rx) = kanal::bounded::<Msg>(cap);
            threads_deliver(
                n,
                producers,
                move |m| tx.send(m).is_ok(),
                move |t| {
                    while let Ok(m) = rx.recv() {
                        t.take(m);
                    }
                },
            )
        }
    }
}

/// Task-based delivery through tokio mpsc (`kind` is one of the two tokio kinds).
async fn tokio_deliver(
    kind: ChannelKind,
    n: u64,
    producers: u64,
    cap: usize,
) -> anyhow::Result<Outcome> {
    let np = producers as usize;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Msg>(cap);
    let start = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut t = Tally::new(np);
        while let Some(m) = rx.recv().await {
            t.take(m);
        }
        t
    });
    let mut handles = Vec::new();
    for p in 0..producers {
        let tx = tx.clone();
        let k = share(n, producers, p);
        handles.push(tokio::spawn(tokio_produce(kind, tx, p, k)));
    }
    drop(tx);
    let mut full_events = 0;
    for h in handles {
        full_events += h.await.context("producer task")??;
    }
    let tally = consumer.await.context("consumer task")?;
    Ok(Outcome {
        elapsed: start.elapsed(),
        tally,
        full_events,
    })
}

/// Producer `p` sends seq 1..=k: with `send().await`, or with `try_send` retried
/// after a yield when the queue is full. Returns how often it found it full.
async fn tokio_produce(
    kind: ChannelKind,
    tx: tokio::sync::mpsc::Sender<Msg>,
    p: u64,
    k: u64,
) -> anyhow::Result<u64> {
    let mut full = 0_u64;
    for seq in 1..=k {
        let mut m = Msg {
            producer: p as u32,
            seq,
        };
        if kind == ChannelKind::TokioSend {
            tx.send(m)
                .await
                .map_err(|_| anyhow::anyhow!("consumer gone"))?;
            continue;
        }
        loop {
            match tx.try_send(m) {
                Ok(()) => break,
                Err(tokio::sync::mpsc::error::TrySendError::Full(back)) => {
                    full += 1;
                    m = back;
                    tokio::task::yield_now().await;
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    anyhow::bail!("consumer gone")
                }
            }
        }
    }
    Ok(full)
}

/// Task-based delivery through kanal's async side.
async fn kanal_async_deliver(n: u64, producers: u64, cap: usize) -> anyhow::Result<Outcome> {
    let np = producers as usize;
    let (tx, rx) = kanal::bounded_async::<Msg>(cap);
    let start = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut t = Tally::new(np);
        while let Ok(m) = rx.recv().await {
            t.take(m);
        }
        t
    });
    let mut handles = Vec::new();
    for p in 0..producers {
        let tx = tx.clone();
        let k = share(n, producers, p);
        handles.push(tokio::spawn(async move {
            for seq in 1..=k {
                tx.send(Msg {
                    producer: p as u32,
                    seq,
                })
                .await
                .map_err(|_| anyhow::anyhow!("consumer gone"))?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    drop(tx);
    for h in handles {
        h.await.context("producer task")??;
    }
    let tally = consumer.await.context("consumer task")?;
    Ok(Outcome {
        elapsed: start.elapsed(),
        tally,
        full_events: 0,
    })
}

/// Thread-based delivery: `send` is cloned into each producer thread and dropped
/// when they finish, which closes the channel for `consume`.
fn threads_deliver<S, C>(n: u64, producers: u64, send: S, consume: C) -> anyhow::Result<Outcome>
where
    S: Fn(Msg) -> bool + Send + Clone,
    C: FnOnce(&mut Tally) + Send,
{
    let start = Instant::now();
    let ok = std::thread::scope(|s| {
        let consumer = s.spawn(move || {
            let mut t = Tally::new(producers as usize);
            consume(&mut t);
            t
        });
        let prods: Vec<_> = (0..producers)
            .map(|p| {
                let send = send.clone();
                s.spawn(move || {
                    (1..=share(n, producers, p)).all(|seq| {
                        send(Msg {
                            producer: p as u32,
                            seq,
                        })
                    })
                })
            })
            .collect();
        drop(send);
        let sent_all = prods.into_iter().all(|h| h.join().unwrap_or(false));
        (sent_all, consumer.join())
    });
    let (sent_all, tally) = ok;
    ensure!(sent_all, "a producer found the consumer gone");
    let tally = tally.map_err(|_| anyhow::anyhow!("consumer thread panicked"))?;
    Ok(Outcome {
        elapsed: start.elapsed(),
        tally,
        full_events: 0,
    })
}

/// Runs `deliver` and fails unless exactly `n` messages arrived, in order.
pub fn deliver_checked(
    kind: ChannelKind,
    n: u64,
    producers: u64,
    capacity: u64,
    workers: usize,
) -> anyhow::Result<Outcome> {
    let o = deliver(kind, n, producers, capacity, workers)?;
    let (count, sum) = expected_tally(n, producers);
    ensure!(
        o.tally.count == count && o.tally.seq_sum == sum && o.tally.in_order,
        "{}: delivered {} (want {count}), seq sum {} (want {sum}), in order: {}",
        kind.name(),
        o.tally.count,
        o.tally.seq_sum,
        o.tally.in_order
    );
    Ok(o)
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueRow {
    pub channel: ChannelKind,
    pub channel_name: &'static str,
    pub sides: &'static str,
    pub producers: u64,
    pub messages: u64,
    pub msgs_per_sec: f64,
    pub msgs_per_sec_min: f64,
    pub msgs_per_sec_max: f64,
    pub ns_per_msg: f64,
    pub ratio_to_tokio: f64,
    /// Summed over reps (try_send only).
    pub full_events: u64,
    pub delivered_exactly: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueResults {
    pub suite: &'static str,
    pub machine: Machine,
    pub plan: QueuePlan,
    pub rows: Vec<QueueRow>,
}

pub fn measure_queue(plan: &QueuePlan) -> anyhow::Result<QueueResults> {
    let mut rows = Vec::new();
    for &p in &plan.producers {
        // Reps interleave the channels so bursts of load from neighbours on this
        // shared machine hit all of them alike.
        let mut acc: Vec<(Vec<f64>, u64)> = plan.channels.iter().map(|_| (Vec::new(), 0)).collect();
        for _ in 0..plan.reps {
            for (i, &c) in plan.channels.iter().enumerate() {
                let o = deliver_checked(c, plan.messages, p, plan.capacity, plan.runtime_workers)?;
                acc[i]
                    .0
                    .push(plan.messages as f64 / o.elapsed.as_secs_f64().max(1e-9));
                acc[i].1 += o.full_events;
            }
        }
        let mut cell = Vec::new();
        for (&c, (mut rates, full)) in plan.channels.iter().zip(acc) {
            let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = rates.iter().copied().fold(0.0, f64::max);
            rates.sort_by(f64::total_cmp);
            let med = rates[rates.len() / 2];
            cell.push(QueueRow {
                channel: c,
                channel_name: c.name(),
                sides: c.sides(),
                producers: p,
                messages: plan.messages,
                msgs_per_sec: med,
                msgs_per_sec_min: lo,
                msgs_per_sec_max: hi,
                ns_per_msg: 1e9 / med,
                ratio_to_tokio: f64::NAN,
                full_events: full,
                delivered_exactly: true,
            });
        }
        let base = cell
            .iter()
            .find(|r| r.channel == ChannelKind::TokioSend)
            .map_or(f64::NAN, |r| r.msgs_per_sec);
        for r in &mut cell {
            r.ratio_to_tokio = r.msgs_per_sec / base;
        }
        eprintln!(
            "queue: {p} producers: {}",
            cell.iter()
                .map(|r| format!("{} {:.2}M/s", r.channel_name, r.msgs_per_sec / 1e6))
                .collect::<Vec<_>>()
                .join(", ")
        );
        rows.extend(cell);
    }
    Ok(QueueResults {
        suite: "queue",
        machine: Machine::detect(),
        plan: plan.clone(),
        rows,
    })
}

pub fn queue_document(r: &QueueResults) -> Document {
    let p = &r.plan;
    let mut sec = Section {
        heading: "Delivery into one consumer".into(),
        notes: vec![
            format!("Machine: {}.", r.machine.summary()),
            format!(
                "{} messages of 16 bytes per run, split over the producers; capacity {}; \
                 tokio runtime with {} workers; median of {} reps. Every run is checked: \
                 exactly N delivered, each producer's in order.",
                p.messages, p.capacity, p.runtime_workers, p.reps
            ),
        ],
        ..Default::default()
    };
    sec.tables.push(delivery_table(r));
    sec.charts.push(delivery_chart(r));
    Document {
        title: "payguard bench queue".into(),
        sections: vec![
            sec,
            Section {
                heading: "Findings (computed)".into(),
                notes: findings(r),
                ..Default::default()
            },
        ],
    }
}

/// One row a (channel, producers) cell.
fn delivery_table(r: &QueueResults) -> Table {
    let mut t = Table::new(
        "",
        &[
            "channel",
            "sides",
            "producers",
            "M msgs/s",
            "ns/msg",
            "× tokio send",
            "min–max M/s",
            "full events",
            "exact",
        ],
    );
    for x in &r.rows {
        t.push(vec![
            x.channel_name.into(),
            x.sides.into(),
            x.producers.to_string(),
            format!("{:.2}", x.msgs_per_sec / 1e6),
            format!("{:.0}", x.ns_per_msg),
            format!("{:.2}×", x.ratio_to_tokio),
            format!(
                "{:.2}–{:.2}",
                x.msgs_per_sec_min / 1e6,
                x.msgs_per_sec_max / 1e6
            ),
            x.full_events.to_string(),
            if x.delivered_exactly { "yes" } else { "NO" }.into(),
        ]);
    }
    t
}

/// Messages per second, one series a producer count.
fn delivery_chart(r: &QueueResults) -> Chart {
    let p = &r.plan;
    Chart {
        title: "messages per second into one consumer".into(),
        unit: "M msgs/s".into(),
        categories: p.channels.iter().map(|c| c.name().to_string()).collect(),
        series: p
            .producers
            .iter()
            .map(|&np| Series {
                name: format!("{np} producer(s)"),
                values: p
                    .channels
                    .iter()
                    .map(|&c| {
                        r.rows
                            .iter()
                            .find(|x| x.channel == c && x.producers == np)
                            .map_or(f64::NAN, |x| x.msgs_per_sec / 1e6)
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// tokio mpsc against kanal async per producer count, beside the write-up's figure.
fn findings(r: &QueueResults) -> Vec<String> {
    let p = &r.plan;
    let mut notes = Vec::new();
    for &np in &p.producers {
        let base = r
            .rows
            .iter()
            .find(|x| x.producers == np && x.channel == ChannelKind::TokioSend);
        let kan = r
            .rows
            .iter()
            .find(|x| x.producers == np && x.channel == ChannelKind::KanalAsync);
        if let (Some(b), Some(k)) = (base, kan) {
            notes.push(format!(
                "{np} producer(s): tokio mpsc {:.0} ns/msg, kanal async {:.0} ns/msg: a switch \
                 {} {:.0} ns per command ({:.2}×). The write-up's queue figure is {:.2}M msgs/s \
                 (chapter 5); tokio here does {:.2}M.",
                b.ns_per_msg,
                k.ns_per_msg,
                if b.ns_per_msg >= k.ns_per_msg {
                    "saves"
                } else {
                    "costs"
                },
                (b.ns_per_msg - k.ns_per_msg).abs(),
                k.ratio_to_tokio,
                WRITEUP_MSGS_PER_SEC / 1e6,
                b.msgs_per_sec / 1e6
            ));
        }
    }
    notes
}

/// `payguard bench queue`.
pub fn run_queue(args: &QueueArgs) -> anyhow::Result<()> {
    let plan = args.plan()?;
    let res = measure_queue(&plan)?;
    emit(&queue_document(&res), &res, &args.output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_channel_delivers_exactly_n_in_order() {
        for kind in ChannelKind::ALL {
            for producers in [1, 3] {
                // Capacity 8 forces the full/backpressure paths.
                let o = deliver_checked(kind, 10_001, producers, 8, 2)
                    .unwrap_or_else(|e| panic!("{e:#}"));
                assert_eq!(o.tally.count, 10_001);
            }
        }
    }

    #[test]
    fn the_tally_catches_loss_duplication_and_reordering() {
        let (count, sum) = expected_tally(10, 2);
        assert_eq!((count, sum), (10, 15 + 15));
        let mut t = Tally::new(2);
        for (p, s) in [(0, 1), (1, 1), (0, 2), (0, 2)] {
            t.take(Msg {
                producer: p,
                seq: s,
            });
        }
        assert!(!t.in_order, "a duplicate must break the order check");
        let mut t = Tally::new(1);
        t.take(Msg {
            producer: 0,
            seq: 2,
        });
        t.take(Msg {
            producer: 0,
            seq: 1,
        });
        assert!(!t.in_order);
        assert_ne!((t.count, t.seq_sum), expected_tally(3, 1));
    }

    #[test]
    fn shares_add_up() {
        for (n, p) in [(10, 3), (1_000_000, 4), (5, 8)] {
            assert_eq!((0..p).map(|i| share(n, p, i)).sum::<u64>(), n);
        }
    }
}
