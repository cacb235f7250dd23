//! The sampling pass: reads the first `clock_sample_bytes_per_file` of every file, in lock-step
//! by bytes (not by time: times are what is in doubt), and turns each order's commits and
//! replays seen on different hosts into bounds on the difference of the hosts' clock offsets;
//! commits' ledger ids of one sequence into weaker bounds of the same kind; and counts events
//! per second per clock domain (the weakest evidence). What it read is kept, parsed, for the
//! merge ([`Sampled`]) so that no byte is read or parsed twice.
//!
//! Why apart: it is I/O and bookkeeping; [`super::solve`] is a pure function of its output.
//! Times here are raw: a zoned time as UTC, a zone-less one as if it were written in `--tz`
//! (UTC when not given), plus the user's `--skew`. Each host has two clock domains (its zoned
//! and its zone-less times), since one file may mix both and only the zone-less ones shift.

use std::collections::HashMap;
use std::sync::Arc;

use crate::clock::{DateRef, RawTime, MS_US};
use crate::engine::{read_parse, ParsedPiece};
use crate::input::{give_back, FileInfo, Origin, Source};
use crate::limits::{
    CLOCK_EVIDENCE_EVENTS_PER_ORDER_MAX, CLOCK_EVIDENCE_IDS_MAX, CLOCK_EVIDENCE_ORDERS_MAX,
    CLOCK_EVIDENCE_ROUNDS, CLOCK_ID_SLACK_MS, CLOCK_RATE_SECONDS_MAX, HOSTS_MAX,
};
use crate::parse::{EntryId, LineParser, Side, Step};

use super::UserClock;

/// Bounds on `d[b] - d[a]` (microseconds) for a pair of clock domains `a < b`, where `d` is what
/// must be added to a domain's raw times to put them on the common clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairBounds {
    /// The largest lower bound, and how many orderings gave a lower bound.
    pub lo: i64,
    pub n_lo: u64,
    /// The smallest upper bound, and how many orderings gave an upper bound.
    pub hi: i64,
    pub n_hi: u64,
}

impl Default for PairBounds {
    fn default() -> Self {
        PairBounds {
            lo: i64::MIN,
            n_lo: 0,
            hi: i64::MAX,
            n_hi: 0,
        }
    }
}

/// Everything sampling found. A domain id is `host * 2 + zone_less`.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// Host names by host id.
    pub hosts: Vec<String>,
    /// Events per domain.
    pub events: Vec<u64>,
    /// Bounds per domain pair `(a, b)`, `a < b`, from orderings of one order's requests.
    pub pairs: HashMap<(u32, u32), PairBounds>,
    /// Bounds per domain pair from ledger entry ids of one sequence (weaker: see `judge_ids`).
    pub id_pairs: HashMap<(u32, u32), PairBounds>,
    /// Per domain: events per second of raw time (at most `clock_rate_seconds_max` seconds).
    pub rate: Vec<HashMap<i64, u32>>,
    /// Per file: zone-less events per host id (to pick the zone its zone-less times are read in).
    pub file_zoneless: Vec<HashMap<u16, u64>>,
    /// Time spent reading and parsing the samples, and on the evidence (for
    /// `PAYGUARD_FORENSICS_TIMING`).
    pub timing: (std::time::Duration, std::time::Duration),
    /// Files that could not be sampled (standard input is read once, by the merge).
    pub unsampled: Vec<String>,
}

impl Evidence {
    /// Records `d[y] - d[x] >= bound` from an ordering.
    pub fn bound(&mut self, x: u32, y: u32, bound: i64) {
        add_bound(&mut self.pairs, x, y, bound);
    }
}

/// Records `d[y] - d[x] >= bound` in `pairs`.
fn add_bound(pairs: &mut HashMap<(u32, u32), PairBounds>, x: u32, y: u32, bound: i64) {
    if x == y {
        return;
    }
    if x < y {
        let p = pairs.entry((x, y)).or_default();
        p.lo = p.lo.max(bound);
        p.n_lo += 1;
    } else {
        let p = pairs.entry((y, x)).or_default();
        p.hi = p.hi.min(-bound);
        p.n_hi += 1;
    }
}

/// A commit's ledger entry id, on one clock domain, at a raw time.
#[derive(Debug, Clone, Copy)]
struct IdMark {
    id: EntryId,
    dom: u32,
    raw_us: i64,
}

/// Ledger ids of one sequence, handed out by one database to every host: a higher id was
/// taken later, so its commit was logged after the lower id's commit, give or take the time
/// between taking an id and logging the commit (`clock_id_slack_ms`). Each step in id order
/// from one host to another is one ordering: `raw(next) + d[next] >= raw(prev) + d[prev] - slack`,
/// with `raw(prev)` the latest time its host logged any lower id (the tightest such bound).
fn judge_ids(pairs: &mut HashMap<(u32, u32), PairBounds>, marks: &mut [IdMark], ndom: usize) {
    let slack = CLOCK_ID_SLACK_MS * MS_US;
    marks.sort_unstable_by_key(|m| (m.id, m.raw_us));
    // The latest raw time of each domain among the lower ids of the current sequence.
    let mut latest: Vec<Option<i64>> = vec![None; ndom];
    let mut prev: Option<IdMark> = None;
    for &m in marks.iter() {
        if let Some(p) = prev {
            if p.id.seq != m.id.seq {
                latest.iter_mut().for_each(|l| *l = None);
            } else if p.id.n < m.id.n && p.dom / 2 != m.dom / 2 {
                if let Some(t) = latest[p.dom as usize] {
                    add_bound(pairs, p.dom, m.dom, t - m.raw_us - slack);
                }
            }
        }
        let l = &mut latest[m.dom as usize];
        *l = Some(l.map_or(m.raw_us, |t| t.max(m.raw_us)));
        prev = Some(m);
    }
}

/// A commit, replay or lock step of one order, on one clock domain, at a raw time.
#[derive(Debug, Clone, Copy)]
struct Mark {
    dom: u32,
    step: Step,
    side: Option<Side>,
    /// A hash of the request id ([`REQ_NONE`] without one).
    req: u64,
    raw_us: i64,
}

/// A second in microseconds.
const SEC_US: i64 = 1_000_000;

/// Marks most followed orders have (a commit and its lock's two steps, or a replay), kept in
/// place: the sample follows every order, and one allocation each was a fifth of its cost.
const ORDER_MARKS_INLINE: usize = 4;

/// No request id on the line.
const REQ_NONE: u64 = 0;

/// FNV-1a of a request id: marks of one order only need to tell its few requests apart.
fn req_hash(req: Option<&[u8]>) -> u64 {
    let Some(b) = req else { return REQ_NONE };
    let h = b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &c| {
        (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
    });
    h.max(1)
}

/// Events of one clock domain in one second, counted together.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    dom: u32,
    sec: i64,
    n: u32,
}

/// One followed order's marks: the first `ORDER_MARKS_INLINE` in place; past them, all of
/// them in `more` (so they are always one slice).
struct OrderMarks {
    last_round: u32,
    n: usize,
    inline: [Mark; ORDER_MARKS_INLINE],
    more: Vec<Mark>,
}

impl OrderMarks {
    fn new(last_round: u32, first: Mark) -> Self {
        OrderMarks {
            last_round,
            n: 1,
            inline: [first; ORDER_MARKS_INLINE],
            more: Vec::new(),
        }
    }

    fn marks(&self) -> &[Mark] {
        match self.n <= ORDER_MARKS_INLINE {
            true => &self.inline[..self.n],
            false => &self.more,
        }
    }

    /// Adds a mark, unless the order has `clock_evidence_events_per_order_max` already.
    fn push(&mut self, m: Mark) {
        if self.n >= CLOCK_EVIDENCE_EVENTS_PER_ORDER_MAX {
            return;
        }
        if self.n < ORDER_MARKS_INLINE {
            self.inline[self.n] = m;
        } else {
            if self.n == ORDER_MARKS_INLINE {
                self.more.extend_from_slice(&self.inline);
            }
            self.more.push(m);
        }
        self.n += 1;
    }
}

/// The sampling state: host interning, per-file date rules, and the orders being followed.
struct Sampler<'u> {
    user: &'u UserClock,
    ev: Evidence,
    host_ix: HashMap<Vec<u8>, u16, ahash::RandomState>,
    /// The user's skew per host id (microseconds).
    host_skew: Vec<i64>,
    file_host: Vec<u16>,
    dates: Vec<DateRef>,
    /// Orders being followed, by a 64-bit hash of their id: no key to allocate or compare per
    /// line (two ids sharing a hash, about one chance in 10^8 at `clock_evidence_orders_max`,
    /// would only pool their marks; `judge` needs exactly one commit, so it mostly skips them).
    orders: HashMap<u64, OrderMarks, ahash::RandomState>,
    oid_hash: ahash::RandomState,
    /// Commits' ledger ids (at most `clock_evidence_ids_max`), judged at the end.
    ids: Vec<IdMark>,
    round: u32,
}

/// How much the sampling pass reads, and whether it keeps what it read for the merge.
#[derive(Debug, Clone, Copy)]
pub struct SampleLimits {
    /// Decompressed bytes read from the start of each file (`clock_sample_bytes_per_file`).
    pub bytes_per_file: u64,
    /// Keep the sampled chunks, parsed, for the merge (see [`Sampled`]); the caller decides, so
    /// that the memory this takes stays under `clock_sample_kept_bytes_max`.
    pub keep: bool,
}

/// What the sampling pass read, kept so the merge neither reads nor parses it a second time:
/// the pieces hold raw times, which the merge resolves with the zones and skews alignment chose.
pub struct Sampled {
    /// Every input's source, positioned just after its sample (standard input: not read yet).
    pub sources: Vec<Source>,
    /// The sampled rounds in order, as [`crate::engine::read_round`] gives them: pieces (in file
    /// order) and lines dropped as too long, per file.
    pub rounds: Vec<Round>,
}

/// One reading round: its parsed pieces and its overlong-line counts per file.
pub type Round = (Vec<ParsedPiece>, Vec<(u16, u64)>);

/// Reads a bounded prefix of every file and collects the evidence (see the module docs); with
/// `limits.keep`, also gives back what it read for the merge.
pub fn sample(
    files: &[FileInfo],
    parser: &LineParser,
    user: &UserClock,
    limits: SampleLimits,
) -> (Evidence, Option<Sampled>) {
    let mut s = Sampler {
        user,
        ev: Evidence {
            file_zoneless: vec![HashMap::new(); files.len()],
            ..Evidence::default()
        },
        host_ix: HashMap::default(),
        host_skew: Vec::new(),
        file_host: Vec::new(),
        dates: vec![DateRef::default(); files.len()],
        orders: HashMap::default(),
        oid_hash: ahash::RandomState::with_seeds(1, 2, 3, 4),
        ids: Vec::new(),
        round: 0,
    };
    for f in files {
        let h = s.host_id(f.default_host.as_bytes());
        s.file_host.push(h);
    }
    let mut sources: Vec<Source> = Vec::new();
    let mut sampled = vec![false; files.len()];
    for (i, f) in files.iter().enumerate() {
        match f.origin {
            Origin::Stdin => s.ev.unsampled.push(f.name.clone()),
            Origin::Path(_) => sampled[i] = true,
        }
        let mut src = Source::new(i as u16, f);
        // A short sample reads short chunks, so that it ends near `bytes_per_file`.
        src.set_chunk_bytes(limits.bytes_per_file);
        sources.push(src);
    }
    let mut rounds: Vec<Round> = Vec::new();
    loop {
        let chosen: Vec<&mut Source> = sources
            .iter_mut()
            .filter(|src| sampled[src.file as usize] && !src.done)
            .filter(|src| src.bytes_read < limits.bytes_per_file)
            .collect();
        if chosen.is_empty() {
            break;
        }
        let t = std::time::Instant::now();
        let (parsed, overlong) = read_parse(chosen, parser);
        let t_read = t.elapsed();
        for p in &parsed {
            s.take(p);
        }
        s.round += 1;
        s.judge_idle();
        s.ev.timing.0 += t_read;
        s.ev.timing.1 += t.elapsed() - t_read;
        if limits.keep {
            rounds.push((parsed, overlong));
        } else {
            give_back_all(parsed);
        }
    }
    let rest: Vec<OrderMarks> = s.orders.drain().map(|(_, o)| o).collect();
    for o in rest {
        judge(&mut s.ev, o.marks());
    }
    let t = std::time::Instant::now();
    judge_ids(&mut s.ev.id_pairs, &mut s.ids, s.ev.events.len());
    s.ev.timing.1 += t.elapsed();
    for src in &mut sources {
        src.set_chunk_bytes(u64::MAX);
    }
    let kept = limits.keep.then_some(Sampled { sources, rounds });
    (s.ev, kept)
}

/// The merge reads with the same pool of chunk buffers: hand them back for it.
fn give_back_all(parsed: Vec<ParsedPiece>) {
    let buffers: Vec<Arc<Vec<u8>>> = parsed.into_iter().map(ParsedPiece::into_data).collect();
    for b in buffers {
        if let Ok(buf) = Arc::try_unwrap(b) {
            give_back(buf);
        }
    }
}

impl Sampler<'_> {
    fn host_id(&mut self, name: &[u8]) -> u16 {
        if let Some(&h) = self.host_ix.get(name) {
            return h;
        }
        if self.ev.hosts.len() >= HOSTS_MAX {
            return u16::MAX;
        }
        let id = self.ev.hosts.len() as u16;
        let name = String::from_utf8_lossy(name).into_owned();
        self.host_skew.push(self.user.skew_of(&name).unwrap_or(0));
        self.host_ix.insert(name.as_bytes().to_vec(), id);
        self.ev.hosts.push(name);
        self.ev.events.extend([0, 0]);
        self.ev.rate.extend([HashMap::new(), HashMap::new()]);
        id
    }

    /// One parsed piece, in line order (the date rules need it).
    fn take(&mut self, p: &ParsedPiece) {
        let f = p.file() as usize;
        let user_tz = self.user.tz.map_or(0, |t| t.us());
        // Most lines of a file name the same host, in the same second: look up and count once
        // per run of equal ones, not per line (the pass costs what it does per line).
        let mut last_host: Option<(&[u8], u16)> = None;
        let mut run = Run::default();
        for r in p.views() {
            let (raw, zone_less) = match r.time {
                RawTime::Utc(us) => {
                    self.dates[f].see_local(us);
                    (us, false)
                }
                RawTime::Local(naive) => {
                    self.dates[f].see_local(naive);
                    (naive - user_tz, true)
                }
                RawTime::TimeOfDay(tod) => match self.dates[f].place(tod) {
                    Some(naive) => (naive - user_tz, true),
                    None => continue,
                },
            };
            if r.hint {
                continue;
            }
            let host = match (r.host, last_host) {
                (Some(h), Some((l, id))) if h == l => id,
                (Some(h), _) => {
                    let id = self.host_id(h);
                    last_host = Some((h, id));
                    id
                }
                (None, _) => self.file_host[f],
            };
            if host == u16::MAX {
                continue;
            }
            let dom = host as u32 * 2 + zone_less as u32;
            let sec = (raw + self.host_skew[host as usize]).div_euclid(SEC_US);
            if (run.dom, run.sec) != (dom, sec) {
                self.count(f, run);
                run = Run { dom, sec, n: 0 };
            }
            run.n += 1;
            let step = r.kind.step;
            if let (Step::Commit, Some(id)) = (step, r.entry) {
                if self.ids.len() < CLOCK_EVIDENCE_IDS_MAX {
                    let raw_us = raw + self.host_skew[host as usize];
                    self.ids.push(IdMark { id, dom, raw_us });
                }
            }
            let wanted = match step {
                Step::Commit | Step::Replay => r.kind.side.is_some(),
                Step::LockAcquired | Step::LockReleased => r.req.is_some(),
                _ => false,
            };
            if !wanted {
                continue;
            }
            let mark = Mark {
                dom,
                step,
                side: r.kind.side,
                req: req_hash(r.req),
                raw_us: raw + self.host_skew[host as usize],
            };
            self.follow(r.oid, mark);
        }
        self.count(f, run);
    }

    /// Counts a run of events of one domain in one second of file `f`.
    fn count(&mut self, f: usize, run: Run) {
        if run.n == 0 {
            return;
        }
        let d = run.dom as usize;
        self.ev.events[d] += run.n as u64;
        let rate = &mut self.ev.rate[d];
        if rate.len() < CLOCK_RATE_SECONDS_MAX || rate.contains_key(&run.sec) {
            *rate.entry(run.sec).or_default() += run.n;
        }
        if d % 2 == 1 {
            *self.ev.file_zoneless[f].entry((d / 2) as u16).or_default() += run.n as u64;
        }
    }

    fn follow(&mut self, oid: &[u8], mark: Mark) {
        let round = self.round;
        let oid = self.oid_hash.hash_one(oid);
        if let Some(o) = self.orders.get_mut(&oid) {
            o.last_round = round;
            o.push(mark);
            return;
        }
        if self.orders.len() >= CLOCK_EVIDENCE_ORDERS_MAX {
            return;
        }
        self.orders.insert(oid, OrderMarks::new(round, mark));
    }

    /// Judges and forgets the orders not seen for `clock_evidence_rounds` rounds.
    fn judge_idle(&mut self) {
        let round = self.round;
        let ev = &mut self.ev;
        self.orders.retain(|_, o| {
            if o.last_round + CLOCK_EVIDENCE_ROUNDS > round {
                return true;
            }
            judge(ev, o.marks());
            false
        });
    }
}

/// One order's evidence. With exactly one commit on a side, every replay of that side on
/// another host finished after it: `raw(replay) + d[replay] >= raw(commit) + d[commit]`. And a
/// replayer that logs taking the order's lock took it after the committer released it (the lock
/// is what made it see the commit), a tighter bound of the same direction.
fn judge(ev: &mut Evidence, marks: &[Mark]) {
    let host = |m: &Mark| m.dom / 2;
    for side in [Side::Deduct, Side::Refund] {
        let is = |m: &Mark, step| m.step == step && m.side == Some(side);
        let mut commits = marks.iter().filter(|m| is(m, Step::Commit));
        let (Some(c), None) = (commits.next(), commits.next()) else {
            continue;
        };
        let released = marks
            .iter()
            .filter(|m| m.step == Step::LockReleased && c.req != REQ_NONE && m.req == c.req)
            .filter(|m| host(m) == host(c) && m.raw_us >= c.raw_us)
            .min_by_key(|m| m.raw_us);
        for r in marks
            .iter()
            .filter(|m| is(m, Step::Replay) && host(m) != host(c))
        {
            ev.bound(c.dom, r.dom, c.raw_us - r.raw_us);
            // Its last acquisition before the replay (an earlier one may have been given up).
            let acquired = marks
                .iter()
                .filter(|m| m.step == Step::LockAcquired && r.req != REQ_NONE && m.req == r.req)
                .filter(|m| host(m) == host(r) && m.raw_us <= r.raw_us)
                .max_by_key(|m| m.raw_us);
            if let (Some(rel), Some(acq)) = (released, acquired) {
                ev.bound(rel.dom, acq.dom, rel.raw_us - acq.raw_us);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_bracket_from_both_sides() {
        let mut ev = Evidence::default();
        // Domain 4 replays domain 0's commit: d4 - d0 >= -1000.
        ev.bound(0, 4, -1000);
        ev.bound(0, 4, -800);
        // Domain 0 replays domain 4's commit 1 ms after: d0 - d4 >= -1200, so d4 - d0 <= 1200.
        ev.bound(4, 0, -1200);
        let p = ev.pairs[&(0, 4)];
        assert_eq!((p.lo, p.n_lo, p.hi, p.n_hi), (-800, 2, 1200, 1));
    }

    #[test]
    fn only_orders_with_one_commit_are_evidence() {
        let m = |dom, replay, raw_us| Mark {
            dom,
            step: if replay { Step::Replay } else { Step::Commit },
            side: Some(Side::Deduct),
            req: REQ_NONE,
            raw_us,
        };
        let mut ev = Evidence::default();
        judge(&mut ev, &[m(0, false, 100), m(2, true, 50), m(1, true, 10)]);
        // Same host (domain 1 is host 0 zone-less) gives nothing; domain 2 gives d2 - d0 >= 50.
        assert_eq!(ev.pairs.len(), 1);
        assert_eq!(ev.pairs[&(0, 2)].lo, 50);
        let mut ev = Evidence::default();
        judge(
            &mut ev,
            &[m(0, false, 100), m(2, false, 50), m(4, true, 10)],
        );
        assert!(ev.pairs.is_empty());
    }

    #[test]
    fn a_replayer_took_the_lock_after_the_committer_released_it() {
        let m = |dom, step, side, req: &[u8], raw_us| Mark {
            dom,
            step,
            side,
            req: req_hash(Some(req)),
            raw_us,
        };
        let d = Some(Side::Deduct);
        let mut ev = Evidence::default();
        judge(
            &mut ev,
            &[
                m(0, Step::Commit, d, b"a", 100),
                m(0, Step::LockReleased, None, b"a", 120),
                m(2, Step::LockAcquired, None, b"b", 30),
                m(2, Step::Replay, d, b"b", 80),
            ],
        );
        // Replay: d2 - d0 >= 100 - 80 = 20; lock: d2 - d0 >= 120 - 30 = 90 (the tighter).
        let p = ev.pairs[&(0, 2)];
        assert_eq!((p.lo, p.n_lo), (90, 2));
    }

    #[test]
    fn a_higher_ledger_id_on_another_host_was_committed_later() {
        let m = |n, dom, raw_us| IdMark {
            id: EntryId {
                seq: b'E' as u32,
                n,
            },
            dom,
            raw_us,
        };
        let slack = CLOCK_ID_SLACK_MS * MS_US;
        let mut pairs = HashMap::new();
        // Host 0 (domain 0) logs ids 1 and 2 at 100 and 300; host 1 (domain 2) id 3 at 250.
        // Another sequence (`F`) says nothing about `E`; neither does a step within one host.
        let mut marks = vec![
            m(3, 2, 250),
            m(1, 0, 100),
            m(2, 0, 300),
            m(4, 2, 260),
            IdMark {
                id: EntryId {
                    seq: b'F' as u32,
                    n: 9,
                },
                dom: 0,
                raw_us: 0,
            },
        ];
        judge_ids(&mut pairs, &mut marks, 4);
        // d2 - d0 >= 300 - 250 - slack, from one ordering.
        assert_eq!(pairs.len(), 1);
        let p = pairs[&(0, 2)];
        assert_eq!((p.lo, p.n_lo, p.n_hi), (50 - slack, 1, 0));
        // Back from host 1 to host 0: id 5 at 240 on host 0 bounds from the other side.
        let mut marks = vec![m(3, 2, 250), m(4, 2, 270), m(5, 0, 240)];
        let mut pairs = HashMap::new();
        judge_ids(&mut pairs, &mut marks, 4);
        let p = pairs[&(0, 2)];
        assert_eq!((p.hi, p.n_hi), (240 - 270 + slack, 1));
    }
}
