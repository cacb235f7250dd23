//! Liveness as a checked property: a healthy service under a duplicate storm
//! answers every request, quickly, and never with a 503 or a 500.
//!
//! Pure code: it takes what each request saw (status, latency, target) and the
//! run's rules (`--faults`, `--slow-ms`) and decides; the storm's online check
//! and `check-history` both feed it, so a recorded history is judged exactly as
//! the live run was. Four kinds, each counted in every run:
//! * `server_error`: a 500. Always a violation: the service does not know what it did.
//! * `unavailable`: a 503. A violation unless the run injects faults (`--faults`);
//!   then it is allowed, and the money checks hold it to "nothing moved".
//! * `unanswered`: no answer at all (timeout, refused or reset connection, body cut).
//! * `slow_request`: an answer slower than `--slow-ms`.
//!
//! A request may be in two kinds (a 503 after a 5 s stall is `unavailable` and
//! `slow_request`): each kind is its own property. An unanswered request is never
//! `slow_request`: it has no answer to be slow.

use super::Violation;
use serde::Serialize;
use std::collections::BTreeMap;

/// Default of `--slow-ms`: an answer slower than this, with no fault injected, is a violation.
pub const SLOW_MS_DEFAULT: u64 = 1_000;
/// Examples kept per kind (the earliest ones by start time).
pub const EXAMPLES_MAX: usize = 5;

pub const SERVER_ERROR: &str = "server_error";
pub const UNAVAILABLE: &str = "unavailable";
pub const UNANSWERED: &str = "unanswered";
pub const SLOW_REQUEST: &str = "slow_request";
/// Every liveness kind, in the order reports list them.
pub const KINDS: [&str; 4] = [SERVER_ERROR, UNAVAILABLE, UNANSWERED, SLOW_REQUEST];

/// What a run promises about liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rules {
    /// The run injects faults: 503s, unanswered and slow requests are counted, not violations.
    pub faults: bool,
    /// An answer slower than this (ms) is `slow_request`.
    pub slow_ms: u64,
}

impl Rules {
    /// Whether a request of `kind` breaks the run's promise.
    pub fn is_violation(self, kind: &str) -> bool {
        kind == SERVER_ERROR || !self.faults
    }
}

/// One request as liveness sees it. `status` 0: no answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Example {
    pub op: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    pub target: String,
    pub status: u16,
    /// Until the answer, or until the transport gave up.
    pub latency_ms: f64,
    /// Since the run began.
    pub started_ms: f64,
    /// Why there was no answer (`timeout`, `connect`, `reset`, `body`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Example {
    /// `deduct o7 → http://…:8082: 503 after 5003.2 ms (at +1.20 s)`.
    pub fn describe(&self) -> String {
        let answer = match (self.status, &self.error) {
            (0, Some(e)) => format!("no answer ({e})"),
            (0, None) => "no answer".to_owned(),
            (s, _) => s.to_string(),
        };
        format!(
            "{} {} → {}: {answer} after {:.1} ms (at +{:.2} s)",
            self.op,
            self.order_id.as_deref().unwrap_or("-"),
            self.target,
            self.latency_ms,
            self.started_ms / 1e3
        )
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct KindSummary {
    pub count: usize,
    /// True when this run counts the kind as a violation (then `count > 0` fails it).
    pub violation: bool,
    pub examples: Vec<Example>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Liveness {
    pub faults: bool,
    pub slow_ms: u64,
    /// Every kind of [`KINDS`], with its count (zero included).
    pub kinds: BTreeMap<&'static str, KindSummary>,
}

/// The kinds one request falls in under `rules`.
pub fn kinds_of(rules: Rules, status: u16, latency_ms: f64) -> Vec<&'static str> {
    let mut out = Vec::new();
    match status {
        0 => out.push(UNANSWERED),
        500 => out.push(SERVER_ERROR),
        503 => out.push(UNAVAILABLE),
        _ => {}
    }
    if status != 0 && latency_ms > rules.slow_ms as f64 {
        out.push(SLOW_REQUEST);
    }
    out
}

/// Counts every kind over `requests` and keeps the earliest examples of each.
pub fn assess(rules: Rules, requests: impl IntoIterator<Item = Example>) -> Liveness {
    let mut kinds: BTreeMap<&'static str, KindSummary> = KINDS
        .iter()
        .map(|k| {
            let summary = KindSummary {
                violation: rules.is_violation(k),
                ..KindSummary::default()
            };
            (*k, summary)
        })
        .collect();
    for ex in requests {
        for kind in kinds_of(rules, ex.status, ex.latency_ms) {
            let s = kinds.entry(kind).or_default();
            s.count += 1;
            s.examples.push(ex.clone());
            if s.examples.len() > 4 * EXAMPLES_MAX {
                keep_earliest(&mut s.examples);
            }
        }
    }
    for s in kinds.values_mut() {
        keep_earliest(&mut s.examples);
    }
    Liveness {
        faults: rules.faults,
        slow_ms: rules.slow_ms,
        kinds,
    }
}

fn keep_earliest(examples: &mut Vec<Example>) {
    examples.sort_by(|a, b| a.started_ms.total_cmp(&b.started_ms));
    examples.truncate(EXAMPLES_MAX);
}

impl Liveness {
    /// One violation per broken kind, carrying its count and examples.
    pub fn violations(&self) -> Vec<Violation> {
        self.kinds
            .iter()
            .filter(|(_, s)| s.violation && s.count > 0)
            .map(|(kind, s)| {
                let mut v = Violation::new(
                    kind,
                    s.examples.first().and_then(|e| e.order_id.clone()),
                    None,
                    format!("{} requests {}", s.count, self.meaning(kind)),
                );
                v.count = Some(s.count);
                v.examples = s.examples.clone();
                v
            })
            .collect()
    }

    /// What a kind means, in words, for this run.
    pub fn meaning(&self, kind: &str) -> String {
        let why = if self.faults {
            ""
        } else {
            " with no fault injected"
        };
        match kind {
            SERVER_ERROR => "answered 500 (the service does not know what it did)".to_owned(),
            UNAVAILABLE => format!("answered 503{why}"),
            UNANSWERED => format!("got no answer{why}"),
            SLOW_REQUEST => format!("took longer than {} ms{why}", self.slow_ms),
            other => other.to_owned(),
        }
    }

    pub fn count(&self, kind: &str) -> usize {
        self.kinds.get(kind).map_or(0, |s| s.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(status: u16, latency_ms: f64, started_ms: f64) -> Example {
        Example {
            op: "deduct".into(),
            order_id: Some(format!("o{started_ms}")),
            target: "http://t".into(),
            status,
            latency_ms,
            started_ms,
            error: None,
        }
    }

    #[test]
    fn strict_runs_fail_on_503_unanswered_slow_and_500() {
        let rules = Rules {
            faults: false,
            slow_ms: 1000,
        };
        let l = assess(
            rules,
            [
                ex(200, 3.0, 0.0),
                ex(503, 5003.0, 1.0),
                ex(0, 30_000.0, 2.0),
                ex(500, 2.0, 3.0),
                ex(402, 1500.0, 4.0),
            ],
        );
        assert_eq!(l.count(UNAVAILABLE), 1);
        assert_eq!(l.count(UNANSWERED), 1);
        assert_eq!(l.count(SERVER_ERROR), 1);
        assert_eq!(l.count(SLOW_REQUEST), 2, "the stalled 503 and the slow 402");
        let kinds: Vec<&str> = l.violations().iter().map(|v| v.kind).collect();
        assert_eq!(
            kinds,
            vec![SERVER_ERROR, SLOW_REQUEST, UNANSWERED, UNAVAILABLE]
        );
    }

    #[test]
    fn fault_runs_count_but_allow_all_but_500() {
        let rules = Rules {
            faults: true,
            slow_ms: 1000,
        };
        let l = assess(rules, [ex(503, 5003.0, 1.0), ex(0, 30_000.0, 2.0)]);
        assert_eq!(l.count(UNAVAILABLE), 1);
        assert!(l.violations().is_empty());
        let l = assess(rules, [ex(500, 2.0, 3.0)]);
        let v = l.violations();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].kind, SERVER_ERROR);
        assert_eq!(v[0].count, Some(1));
    }

    #[test]
    fn examples_are_the_earliest_few() {
        let rules = Rules {
            faults: false,
            slow_ms: 10,
        };
        let l = assess(rules, (0..100).rev().map(|i| ex(503, 1.0, i as f64)));
        let s = &l.kinds[UNAVAILABLE];
        assert_eq!(s.count, 100);
        let starts: Vec<f64> = s.examples.iter().map(|e| e.started_ms).collect();
        assert_eq!(starts, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    }
}
