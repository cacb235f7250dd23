//! One connection's phase, and the pure rules over it: which deadline it is under,
//! whether it has passed it, and where it stands in the eviction order.
//!
//! Every rule here is a function of the state and `now`, so it is tested without a
//! socket (bottom of this file); [`Slot`] only puts the state behind a lock and
//! wakes the connection's task when it must close.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Where a connection is in serving a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the rest of a request's headers: from accept, or from the first
    /// byte of a keep-alive connection's next request. Deadline: header read.
    Headers,
    /// Headers read, the body not complete. Deadline: body read.
    Body,
    /// The whole request is with the handler and the engine. No deadline of this
    /// module (the request timeout is the engine's), never evicted: its answer may
    /// say money moved.
    Handling,
    /// The response is ready and being written. Deadline: write.
    Writing,
    /// Between keep-alive requests: the last response written, no byte of the next.
    /// Deadline: idle.
    Idle,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Headers,
        Phase::Body,
        Phase::Handling,
        Phase::Writing,
        Phase::Idle,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Phase::Headers => "headers",
            Phase::Body => "body",
            Phase::Handling => "handling",
            Phase::Writing => "writing",
            Phase::Idle => "idle",
        }
    }
}

/// Why the server closed a connection (the `reason` of metrics and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    HeaderTimeout,
    BodyTimeout,
    IdleTimeout,
    WriteTimeout,
    /// Closed at the connection limit to make room for a new connection.
    Evicted,
    /// Closed at shutdown because it had not sent a complete request.
    Shutdown,
    /// Still open when the drain deadline passed.
    DrainDeadline,
}

impl CloseReason {
    pub const ALL: [CloseReason; 7] = [
        CloseReason::HeaderTimeout,
        CloseReason::BodyTimeout,
        CloseReason::IdleTimeout,
        CloseReason::WriteTimeout,
        CloseReason::Evicted,
        CloseReason::Shutdown,
        CloseReason::DrainDeadline,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::BodyTimeout => "body_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::Evicted => "evicted",
            CloseReason::Shutdown => "shutdown",
            CloseReason::DrainDeadline => "drain_deadline",
        }
    }

    /// Its place in [`CloseReason::ALL`] (array-indexed counters).
    pub fn index(self) -> usize {
        CloseReason::ALL
            .iter()
            .position(|r| *r == self)
            .expect("every reason is in ALL")
    }
}

/// How a connection is being closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closing {
    /// Drop it now, whatever it is doing (never chosen for `Handling`, except at
    /// the drain deadline).
    Now(CloseReason),
    /// Finish the response in progress, then close (shutdown, for `Handling` and
    /// `Writing`); the write deadline still applies.
    AfterResponse,
    /// Its task has ended (the registry is forgetting it).
    Ended,
}

/// The connection deadlines (from [`crate::Limits`]).
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    pub header: Duration,
    pub body: Duration,
    pub idle: Duration,
    pub write: Duration,
}

/// How long after its body deadline a connection in `Body` is dropped by the
/// sweeper. The request body itself fails at the deadline (408 and close); this
/// only catches a handler that stopped reading its body without answering.
pub const BODY_BACKSTOP_MS: u64 = 1_000;

/// Eviction tiers, closed in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// No complete request: idle between requests (HTTP lets a server close it at
    /// any time) or a request still arriving (nothing reached the engine, so nothing
    /// moved). Within the tier, the one waiting longest goes first: an attacker's
    /// connection has waited since it went slow, a busy client's pooled connection
    /// only since its last answer. Measured against idle-first and unfinished-first
    /// in BENCHMARKS.md.
    Waiting,
    /// An answer being written: its effect is stored (a retry replays it), but
    /// this delivery is lost, so last.
    Answering,
}

#[derive(Clone, Copy, Debug)]
pub struct State {
    pub phase: Phase,
    /// When `phase` began.
    pub since: Instant,
    /// When the current request began: accept, or its first byte on a kept-alive
    /// connection. Orders unfinished requests for eviction (oldest first).
    pub request_started: Instant,
    /// Since when a write to the client has found the socket full with no progress
    /// since; `None` while writes flow.
    pub write_blocked_since: Option<Instant>,
    /// Numbers the requests on this connection, so a late signal from an earlier
    /// response cannot move a later request's phase.
    pub request_seq: u64,
    /// The body deadline passed: the request is refused (408) and the connection
    /// closed after that answer.
    pub body_timed_out: bool,
    /// Set once; the connection's task acts on it.
    pub closing: Option<Closing>,
}

impl State {
    pub fn accepted(now: Instant) -> Self {
        State {
            phase: Phase::Headers,
            since: now,
            request_started: now,
            write_blocked_since: None,
            request_seq: 0,
            body_timed_out: false,
            closing: None,
        }
    }

    /// Closing now or gone: no deadline or eviction applies any more.
    pub fn is_closing_now(&self) -> bool {
        matches!(self.closing, Some(Closing::Now(_) | Closing::Ended))
    }

    /// The deadline this connection has passed at `now`, if any.
    pub fn overdue(&self, now: Instant, d: &Deadlines) -> Option<CloseReason> {
        if self.is_closing_now() || self.phase == Phase::Handling {
            return None;
        }
        if let Some(blocked) = self.write_blocked_since {
            if now.saturating_duration_since(blocked) >= d.write {
                return Some(CloseReason::WriteTimeout);
            }
        }
        let (limit, reason) = match self.phase {
            Phase::Headers => (d.header, CloseReason::HeaderTimeout),
            Phase::Body => (
                d.body + Duration::from_millis(BODY_BACKSTOP_MS),
                CloseReason::BodyTimeout,
            ),
            Phase::Writing => (d.write, CloseReason::WriteTimeout),
            Phase::Idle => (d.idle, CloseReason::IdleTimeout),
            Phase::Handling => return None,
        };
        (now.saturating_duration_since(self.since) >= limit).then_some(reason)
    }

    /// Its place in the eviction order, lowest first; `None`: never evicted
    /// (handling a request, or already closing).
    pub fn eviction_rank(&self) -> Option<(Tier, Instant)> {
        if self.closing.is_some() {
            return None;
        }
        match self.phase {
            Phase::Idle => Some((Tier::Waiting, self.since)),
            Phase::Headers | Phase::Body => Some((Tier::Waiting, self.request_started)),
            Phase::Writing => Some((Tier::Answering, self.since)),
            Phase::Handling => None,
        }
    }

    /// Bytes arrived: on an idle connection, a new request has begun.
    pub fn on_bytes_read(&mut self, now: Instant) {
        if self.phase == Phase::Idle {
            self.phase = Phase::Headers;
            self.since = now;
            self.request_started = now;
        }
    }

    /// The headers are complete (hyper calls the service). Returns the request's number.
    pub fn on_headers(&mut self, now: Instant, has_body: bool) -> u64 {
        if self.phase == Phase::Idle {
            // Its bytes came in with the previous request's (pipelining).
            self.request_started = now;
        }
        self.phase = if has_body {
            Phase::Body
        } else {
            Phase::Handling
        };
        self.since = now;
        self.body_timed_out = false;
        self.request_seq += 1;
        self.request_seq
    }

    /// The body is complete. False when the connection is closing or its body
    /// deadline passed: then the request must not reach the engine.
    pub fn on_body_complete(&mut self, now: Instant) -> bool {
        if self.closing.is_some() || self.body_timed_out {
            return false;
        }
        if self.phase == Phase::Body {
            self.phase = Phase::Handling;
            self.since = now;
        }
        true
    }

    /// The handler answered. True when the connection must close after this
    /// answer (its body deadline passed).
    pub fn on_response(&mut self, now: Instant) -> bool {
        self.phase = Phase::Writing;
        self.since = now;
        self.body_timed_out
    }

    /// Request `seq`'s response body is handed to hyper in full.
    pub fn on_response_sent(&mut self, now: Instant, seq: u64) {
        if seq == self.request_seq && self.phase == Phase::Writing {
            self.phase = Phase::Idle;
            self.since = now;
        }
    }
}

/// One connection's state behind a lock, and the bell its task waits on.
pub struct Slot {
    pub id: u64,
    /// Invariant: `phase` only moves as the `on_*` methods say; `closing` is set
    /// once and never cleared.
    state: Mutex<State>,
    /// Rung when `closing` is set; the connection's task then closes or finishes.
    pub wake: Notify,
    /// Mirrors `state.phase == Idle`, so reads skip the lock unless idle.
    idle: AtomicBool,
    /// Mirrors `state.write_blocked_since.is_some()`, so writes skip the lock
    /// unless that changes.
    write_blocked: AtomicBool,
}

impl Slot {
    pub fn new(id: u64, now: Instant) -> Self {
        Slot {
            id,
            state: Mutex::new(State::accepted(now)),
            wake: Notify::new(),
            idle: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
        }
    }

    /// The state, for a rule to read or a transition to apply. A poisoned lock
    /// (a panic while holding it, which no code here can do) still yields the state.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` to the state and keeps the lock-free mirrors in step.
    pub fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut st = self.lock();
        let out = f(&mut st);
        self.idle.store(st.phase == Phase::Idle, Ordering::Release);
        out
    }

    pub fn closing(&self) -> Option<Closing> {
        self.lock().closing
    }

    pub fn on_bytes_read(&self) {
        if self.idle.load(Ordering::Acquire) {
            self.update(|st| st.on_bytes_read(Instant::now()));
        }
    }

    /// A write or flush returned `Pending` (`blocked`) or made progress.
    pub fn on_write(&self, blocked: bool) {
        if self.write_blocked.swap(blocked, Ordering::AcqRel) != blocked {
            let now = Instant::now();
            self.update(|st| st.write_blocked_since = blocked.then_some(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadlines() -> Deadlines {
        Deadlines {
            header: Duration::from_secs(5),
            body: Duration::from_secs(10),
            idle: Duration::from_secs(120),
            write: Duration::from_secs(10),
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn each_phase_is_under_its_own_deadline() {
        let t0 = Instant::now();
        let d = deadlines();
        let mut st = State::accepted(t0);
        assert_eq!(st.overdue(t0 + s(4), &d), None);
        assert_eq!(st.overdue(t0 + s(5), &d), Some(CloseReason::HeaderTimeout));
        st.on_headers(t0 + s(1), true);
        assert_eq!(st.overdue(t0 + s(11), &d), None, "body has 10 s + backstop");
        assert_eq!(st.overdue(t0 + s(12), &d), Some(CloseReason::BodyTimeout));
        assert!(st.on_body_complete(t0 + s(2)));
        assert_eq!(st.overdue(t0 + s(1_000), &d), None, "handling: never");
        st.on_response(t0 + s(3));
        assert_eq!(st.overdue(t0 + s(13), &d), Some(CloseReason::WriteTimeout));
        let seq = st.request_seq;
        st.on_response_sent(t0 + s(4), seq);
        assert_eq!(st.phase, Phase::Idle);
        assert_eq!(st.overdue(t0 + s(123), &d), None);
        assert_eq!(st.overdue(t0 + s(124), &d), Some(CloseReason::IdleTimeout));
        // The next request's first byte: the header deadline starts again.
        st.on_bytes_read(t0 + s(100));
        assert_eq!(st.phase, Phase::Headers);
        assert_eq!(st.overdue(t0 + s(104), &d), None);
        assert_eq!(
            st.overdue(t0 + s(105), &d),
            Some(CloseReason::HeaderTimeout)
        );
    }

    #[test]
    fn a_blocked_write_is_cut_off_in_any_phase_but_handling() {
        let t0 = Instant::now();
        let d = deadlines();
        let mut st = State::accepted(t0);
        st.on_headers(t0, false);
        st.write_blocked_since = Some(t0);
        assert_eq!(st.overdue(t0 + s(60), &d), None, "handling");
        st.on_response(t0 + s(1));
        let seq = st.request_seq;
        st.on_response_sent(t0 + s(1), seq);
        assert_eq!(
            st.overdue(t0 + s(10), &d),
            Some(CloseReason::WriteTimeout),
            "idle, but its last answer still stuck in the socket"
        );
    }

    #[test]
    fn a_body_that_came_too_late_or_on_a_closing_connection_never_reaches_the_engine() {
        let t0 = Instant::now();
        let mut st = State::accepted(t0);
        st.on_headers(t0, true);
        st.body_timed_out = true;
        assert!(!st.on_body_complete(t0));
        assert_eq!(st.phase, Phase::Body);
        let mut st = State::accepted(t0);
        st.on_headers(t0, true);
        st.closing = Some(Closing::Now(CloseReason::Evicted));
        assert!(!st.on_body_complete(t0));
        assert_eq!(st.eviction_rank(), None);
    }

    #[test]
    fn eviction_takes_whatever_waited_longest_then_answers_never_handling() {
        let t0 = Instant::now();
        let mut idle = State::accepted(t0);
        idle.on_headers(t0, false);
        idle.on_response(t0);
        idle.on_response_sent(t0 + s(9), 1);
        let old_headers = State::accepted(t0);
        let mut newer_body = State::accepted(t0 + s(5));
        newer_body.on_headers(t0 + s(6), true);
        let mut long_idle = State::accepted(t0);
        long_idle.on_headers(t0, false);
        long_idle.on_response(t0);
        long_idle.on_response_sent(t0 + s(1), 1);
        let mut answering = State::accepted(t0);
        answering.on_headers(t0, false);
        answering.on_response(t0);
        let mut handling = State::accepted(t0);
        handling.on_headers(t0, false);
        let mut ranks = [
            ("handling", handling.eviction_rank()),
            ("answering", answering.eviction_rank()),
            ("idle", idle.eviction_rank()),
            ("newer_body", newer_body.eviction_rank()),
            ("old_headers", old_headers.eviction_rank()),
            ("long_idle", long_idle.eviction_rank()),
        ];
        ranks.sort_by_key(|(_, r)| r.map_or((1, None), |r| (0, Some(r))));
        let order: Vec<_> = ranks.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            order,
            [
                "old_headers",
                "long_idle",
                "newer_body",
                "idle",
                "answering",
                "handling"
            ]
        );
        assert_eq!(handling.eviction_rank(), None);
    }

    #[test]
    fn a_late_signal_from_an_earlier_response_moves_nothing() {
        let t0 = Instant::now();
        let mut st = State::accepted(t0);
        let first = st.on_headers(t0, false);
        st.on_response(t0);
        st.on_response_sent(t0, first);
        st.on_bytes_read(t0);
        let second = st.on_headers(t0, false);
        st.on_response(t0);
        st.on_response_sent(t0, first);
        assert_eq!(st.phase, Phase::Writing);
        st.on_response_sent(t0, second);
        assert_eq!(st.phase, Phase::Idle);
    }
}
