//! Every open connection, so the server can enforce the connection limit by
//! making room, close what passed a deadline, and drain at shutdown.
//!
//! The accept loop admits a connection only while fewer than `connections_max` are
//! live; at the limit it closes the connection first in the eviction order
//! ([`State::eviction_rank`]: the one waiting longest without a complete request,
//! idle or unfinished, then a stuck answer; never one being handled), and only when
//! every connection is being handled does it wait, leaving new clients in the
//! listen backlog as before.
//! A sweeper visits every connection each tick and closes the ones past their
//! deadline; it also updates the connection gauges and writes the rate-limited WARN.

use super::slot::{CloseReason, Closing, Deadlines, Phase, Slot, State};
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// At most one `connections_closed` WARN per reason in this interval; the event
/// carries how many closed since the last one.
pub const CLOSE_WARN_INTERVAL_MS: u64 = 10_000;
/// The sweeper's tick: a tenth of the shortest deadline, within these bounds.
pub const SWEEP_INTERVAL_MS_MIN: u64 = 10;
pub const SWEEP_INTERVAL_MS_MAX: u64 = 100;

pub struct Registry {
    pub deadlines: Deadlines,
    connections_max: usize,
    /// Every connection whose task is running, by id. Invariant: an entry exists
    /// from admission until its task ends ([`SlotGuard`] removes it).
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    /// Connections in `slots` not closing now. Invariant: at most `connections_max`;
    /// only [`Registry::admit`] raises it, and only below the limit or after
    /// closing a victim.
    live: AtomicUsize,
    next_id: AtomicU64,
    /// Rung when a connection ends, starts closing, or leaves `Handling`: the
    /// accept loop may find room, the drain may find the registry empty.
    changed: Notify,
    /// True while the accept loop waits for a connection to leave `Handling`, so
    /// the common case (nobody waiting) costs each answer no lock on `changed`.
    admission_waiting: AtomicBool,
    closes: Closes,
}

/// The closes by reason: counted in `/metrics` at once, logged by the sweeper.
struct Closes {
    metrics: Arc<Metrics>,
    /// Closes per reason (indexed like [`CloseReason::ALL`]) since the last WARN.
    unlogged: [AtomicU64; CloseReason::ALL.len()],
    /// When each reason was last logged. Only the sweeper touches it.
    last_warned: Mutex<[Option<Instant>; CloseReason::ALL.len()]>,
}

impl Registry {
    pub fn new(deadlines: Deadlines, connections_max: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Registry {
            deadlines,
            connections_max: connections_max.max(1),
            slots: Mutex::new(HashMap::new()),
            live: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            changed: Notify::new(),
            admission_waiting: AtomicBool::new(false),
            closes: Closes {
                metrics,
                unlogged: Default::default(),
                last_warned: Mutex::new([None; CloseReason::ALL.len()]),
            },
        })
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self) -> Vec<Arc<Slot>> {
        self.slots().values().cloned().collect()
    }

    pub fn open(&self) -> usize {
        self.slots().len()
    }

    /// Waits until a new connection may be served (making room by eviction when at
    /// the limit), then registers it. Called by the accept loop only.
    pub async fn admit(self: &Arc<Self>) -> (Arc<Slot>, SlotGuard) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Set before looking, so a connection leaving `Handling` after the look rings.
            self.admission_waiting.store(true, Ordering::SeqCst);
            if self.live.load(Ordering::Acquire) < self.connections_max || self.evict_one() {
                self.admission_waiting.store(false, Ordering::SeqCst);
                self.live.fetch_add(1, Ordering::AcqRel);
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let slot = Arc::new(Slot::new(id, Instant::now()));
                self.slots().insert(id, slot.clone());
                let guard = SlotGuard {
                    registry: self.clone(),
                    slot: slot.clone(),
                };
                return (slot, guard);
            }
            changed.await;
        }
    }

    /// Closes the connection first in the eviction order; false if every one is
    /// being handled.
    fn evict_one(&self) -> bool {
        loop {
            let victim = self
                .snapshot()
                .into_iter()
                .filter_map(|slot| {
                    let rank = slot.lock().eviction_rank()?;
                    Some((rank, slot))
                })
                .min_by_key(|(rank, _)| *rank);
            let Some((_, slot)) = victim else {
                return false;
            };
            // Its phase may have moved since it was ranked: re-checked under its lock.
            if self.close_now(&slot, CloseReason::Evicted, |st| {
                st.eviction_rank().is_some()
            }) {
                return true;
            }
        }
    }

    /// Marks `slot` closing now for `reason` if `allowed` holds under its lock, and
    /// wakes its task. False if it was already closing or not allowed.
    pub fn close_now(
        &self,
        slot: &Slot,
        reason: CloseReason,
        allowed: impl FnOnce(&State) -> bool,
    ) -> bool {
        let marked = slot.update(|st| {
            if st.is_closing_now() || !allowed(st) {
                return false;
            }
            st.closing = Some(Closing::Now(reason));
            true
        });
        if marked {
            self.live.fetch_sub(1, Ordering::AcqRel);
            self.count_close(reason);
            slot.wake.notify_one();
            self.changed.notify_waiters();
        }
        marked
    }

    /// Counts a close in `/metrics` and for the next WARN.
    pub fn count_close(&self, reason: CloseReason) {
        self.closes.metrics.connection_closed(reason.label());
        self.closes.unlogged[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// A connection left `Handling`: it may now be evicted.
    pub fn left_handling(&self) {
        if self.admission_waiting.load(Ordering::SeqCst) {
            self.changed.notify_waiters();
        }
    }

    /// One sweep: closes what passed its deadline, updates the gauges, logs.
    pub fn sweep(&self, now: Instant) {
        let mut by_phase = [0i64; Phase::ALL.len()];
        let mut write_blocked = 0;
        for slot in self.snapshot() {
            let st = *slot.lock();
            if let Some(reason) = st.overdue(now, &self.deadlines) {
                self.close_now(&slot, reason, |st| {
                    st.overdue(now, &self.deadlines).is_some()
                });
                continue;
            }
            if st.is_closing_now() {
                continue;
            }
            if let Some(i) = Phase::ALL.iter().position(|p| *p == st.phase) {
                by_phase[i] += 1;
            }
            write_blocked += i64::from(st.write_blocked_since.is_some());
        }
        let m = &self.closes.metrics;
        for (phase, n) in Phase::ALL.iter().zip(by_phase) {
            m.set_connections(phase.label(), n);
        }
        m.set_connections_write_blocked(write_blocked);
        self.warn_closes(now, false);
    }

    /// One `connections_closed` WARN per reason with closes since the last, at most
    /// one per [`CLOSE_WARN_INTERVAL_MS`] unless `flush` (the final one at shutdown).
    pub fn warn_closes(&self, now: Instant, flush: bool) {
        let interval = Duration::from_millis(CLOSE_WARN_INTERVAL_MS);
        let mut last = self
            .closes
            .last_warned
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for reason in CloseReason::ALL {
            let i = reason.index();
            if matches!(reason, CloseReason::Shutdown | CloseReason::DrainDeadline) {
                // The drain logs these itself, once.
                continue;
            }
            let due = flush || last[i].is_none_or(|t| now.saturating_duration_since(t) >= interval);
            if !due {
                continue;
            }
            let count = self.closes.unlogged[i].swap(0, Ordering::Relaxed);
            if count == 0 {
                continue;
            }
            last[i] = Some(now);
            tracing::warn!(
                event = "connections_closed",
                reason = reason.label(),
                count,
                open = self.open(),
                limit = self.connections_max,
                "closed slow, idle or unfinished connections (counted in payguard_connections_closed_total)"
            );
        }
    }

    /// Shutdown: closes at once every connection without a complete request, and
    /// lets those handling or answering one finish. Returns (closed, finishing).
    pub fn begin_drain(&self) -> (usize, usize) {
        let (mut closed, mut finishing) = (0, 0);
        for slot in self.snapshot() {
            let unfinished = self.close_now(&slot, CloseReason::Shutdown, |st| {
                !matches!(st.phase, Phase::Handling | Phase::Writing)
            });
            if unfinished {
                closed += 1;
                continue;
            }
            let graceful = slot.update(|st| {
                if st.closing.is_none() {
                    st.closing = Some(Closing::AfterResponse);
                    return true;
                }
                false
            });
            if graceful {
                finishing += 1;
                slot.wake.notify_one();
            }
        }
        (closed, finishing)
    }

    /// The drain deadline passed: closes everything left. Returns how many.
    pub fn close_all(&self, reason: CloseReason) -> usize {
        self.snapshot()
            .iter()
            .filter(|slot| self.close_now(slot, reason, |_| true))
            .count()
    }

    /// Waits until every connection's task has ended.
    pub async fn wait_empty(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            changed.await;
        }
    }

    /// How often to sweep for these deadlines.
    pub fn sweep_interval(&self) -> Duration {
        let d = &self.deadlines;
        let shortest = d.header.min(d.body).min(d.idle).min(d.write);
        (shortest / 10).clamp(
            Duration::from_millis(SWEEP_INTERVAL_MS_MIN),
            Duration::from_millis(SWEEP_INTERVAL_MS_MAX),
        )
    }
}

/// Removes its connection from the registry when the connection's task ends,
/// however it ends (a panic included).
pub struct SlotGuard {
    registry: Arc<Registry>,
    slot: Arc<Slot>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        // Under the slot's lock, so no close can count it out a second time.
        let was_live = self.slot.update(|st| {
            let live = !st.is_closing_now();
            st.closing = Some(Closing::Ended);
            live
        });
        self.registry.slots().remove(&self.slot.id);
        if was_live {
            self.registry.live.fetch_sub(1, Ordering::AcqRel);
        }
        self.registry.changed.notify_waiters();
    }
}
