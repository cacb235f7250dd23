//! Each target (instance URL) on its own: how many requests, what they were
//! answered, how fast, and all of it over time, so a stall on one instance of
//! three shows at a glance instead of being averaged away.
//!
//! Requests are bucketed by when they *started*: a bucket whose requests took 5 s
//! is the moment the instance stalled, even though the answers came later.

use super::liveness::Rules;
use super::load::Record;
use hdrhistogram::Histogram;
use serde::Serialize;

/// Most buckets per target; longer runs get wider buckets.
const BUCKETS_MAX: usize = 300;
/// Bucket widths tried in turn (ms), the first that fits [`BUCKETS_MAX`] wins.
const BUCKET_WIDTHS_MS: [u64; 6] = [100, 250, 500, 1_000, 5_000, 60_000];

/// What one target's requests were answered.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Statuses {
    pub ok_2xx: usize,
    pub refused_4xx: usize,
    pub unavailable_503: usize,
    pub server_error_500: usize,
    /// Any other status (1xx, 3xx, 5xx other than 500 and 503).
    pub other: usize,
    pub unanswered: usize,
}

impl Statuses {
    fn add(&mut self, status: u16) {
        match status {
            0 => self.unanswered += 1,
            200..=299 => self.ok_2xx += 1,
            400..=499 => self.refused_4xx += 1,
            500 => self.server_error_500 += 1,
            503 => self.unavailable_503 += 1,
            _ => self.other += 1,
        }
    }

    /// Requests that broke liveness by their status alone (503, 500, unanswered).
    pub fn failed(&self) -> usize {
        self.unavailable_503 + self.server_error_500 + self.unanswered
    }
}

/// Requests of one target that started within one bucket.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Bucket {
    pub requests: usize,
    #[serde(flatten)]
    pub statuses: Statuses,
    /// Answered, but slower than `--slow-ms`.
    pub slow: usize,
    pub p50_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TargetStats {
    pub target: String,
    pub requests: usize,
    #[serde(flatten)]
    pub statuses: Statuses,
    pub slow: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Bucket `i` holds the requests that started in `[i, i + 1) × bucket_ms`
    /// after the run began.
    pub buckets: Vec<Bucket>,
}

/// The bucket width for a run that lasted `span_ms`.
pub fn bucket_ms(span_ms: f64) -> u64 {
    BUCKET_WIDTHS_MS
        .iter()
        .copied()
        .find(|w| span_ms / (*w as f64) < BUCKETS_MAX as f64)
        .unwrap_or(BUCKET_WIDTHS_MS[BUCKET_WIDTHS_MS.len() - 1])
}

fn quantile_ms(latencies_us: &mut [u64], q: f64) -> f64 {
    if latencies_us.is_empty() {
        return 0.0;
    }
    latencies_us.sort_unstable();
    let i = ((latencies_us.len() as f64 * q).ceil() as usize).clamp(1, latencies_us.len()) - 1;
    latencies_us[i] as f64 / 1e3
}

fn bucket_of(records: &[&Record], rules: Rules) -> Bucket {
    let mut b = Bucket {
        requests: records.len(),
        ..Bucket::default()
    };
    let mut lat: Vec<u64> = Vec::with_capacity(records.len());
    for r in records {
        b.statuses.add(r.status);
        if r.status != 0 && r.latency_us as f64 / 1e3 > rules.slow_ms as f64 {
            b.slow += 1;
        }
        lat.push(r.latency_us);
    }
    b.p50_ms = quantile_ms(&mut lat, 0.5);
    b.max_ms = lat.last().map_or(0.0, |m| *m as f64 / 1e3);
    b
}

fn target_stats(name: &str, records: &[&Record], rules: Rules, width_ms: u64) -> TargetStats {
    let mut h = Histogram::<u64>::new(3).expect("histogram bounds");
    let mut per_bucket: Vec<Vec<&Record>> = Vec::new();
    for r in records {
        let _ = h.record(r.latency_us.max(1));
        let i = (r.started_ms.max(0.0) / width_ms as f64) as usize;
        if per_bucket.len() <= i {
            per_bucket.resize_with(i + 1, Vec::new);
        }
        per_bucket[i].push(r);
    }
    let all = bucket_of(records, rules);
    let ms = |us: u64| us as f64 / 1e3;
    TargetStats {
        target: name.to_owned(),
        requests: records.len(),
        statuses: all.statuses,
        slow: all.slow,
        p50_ms: if h.is_empty() {
            0.0
        } else {
            ms(h.value_at_quantile(0.5))
        },
        p99_ms: if h.is_empty() {
            0.0
        } else {
            ms(h.value_at_quantile(0.99))
        },
        max_ms: if h.is_empty() { 0.0 } else { ms(h.max()) },
        buckets: per_bucket.iter().map(|rs| bucket_of(rs, rules)).collect(),
    }
}

/// Per target, in `targets` order, with buckets `width_ms` wide. A record's
/// target index wraps around the list, as the storm sends it.
pub(crate) fn per_target(
    targets: &[String],
    records: &[Record],
    rules: Rules,
    width_ms: u64,
) -> Vec<TargetStats> {
    let n = targets.len().max(1);
    let mut by_target: Vec<Vec<&Record>> = vec![Vec::new(); n];
    for r in records {
        by_target[r.target % n].push(r);
    }
    targets
        .iter()
        .zip(&by_target)
        .map(|(t, rs)| target_stats(t, rs, rules, width_ms))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storm::load::OpKind;

    fn rec(target: usize, started_ms: f64, latency_ms: u64, status: u16) -> Record {
        Record {
            kind: OpKind::Deduct,
            order: Some(0),
            refund_id: None,
            amount: 1,
            target,
            started_ms,
            latency_us: latency_ms * 1000,
            status,
            entry_id: None,
            replayed: None,
            code: None,
            error: None,
            expires_at_ms: None,
        }
    }

    #[test]
    fn a_stall_on_one_target_shows_in_its_own_buckets() {
        let rules = Rules {
            faults: false,
            slow_ms: 1000,
        };
        let targets = vec!["a".to_owned(), "b".to_owned()];
        let records = vec![
            rec(0, 10.0, 2, 200),
            rec(1, 20.0, 3, 200),
            rec(2, 150.0, 2, 200), // wraps to a
            rec(3, 160.0, 5003, 503),
            rec(1, 170.0, 5001, 200),
        ];
        let stats = per_target(&targets, &records, rules, 100);
        assert_eq!(stats[0].requests, 2);
        assert_eq!(stats[0].statuses.ok_2xx, 2);
        assert_eq!(stats[0].slow, 0);
        assert_eq!(stats[1].requests, 3);
        assert_eq!(stats[1].statuses.unavailable_503, 1);
        assert_eq!(stats[1].slow, 2);
        assert_eq!(stats[1].buckets.len(), 2);
        assert_eq!(stats[1].buckets[0].max_ms, 3.0);
        assert_eq!(stats[1].buckets[1].slow, 2);
        assert_eq!(stats[1].buckets[1].max_ms, 5003.0);
    }

    #[test]
    fn bucket_width_grows_with_the_run() {
        assert_eq!(bucket_ms(2_000.0), 100);
        assert_eq!(bucket_ms(29_000.0), 100);
        assert_eq!(bucket_ms(120_000.0), 500);
        assert_eq!(bucket_ms(10_000_000.0), 60_000);
    }
}
