//! Summary statistics for lane distributions: mean, stddev, chi-square and what a
//! truly random assignment would give.
//!
//! A max bucket of 112 means nothing alone: it is good or bad only against what
//! `n` ids thrown uniformly at `k` lanes would give. So beside each observed number
//! the routing suite prints the binomial expectation (sd, expected max) and the
//! chi-square p-value with `df = k - 1`. Written by hand (ln-gamma, incomplete gamma)
//! because they are a few dozen lines and pulling a statistics crate for them would
//! cost more than it saves.

/// Arithmetic mean; 0 for an empty slice.
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Population standard deviation (divides by `n`): the lanes are the whole
/// population, not a sample of it.
pub fn stddev(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64).sqrt()
}

/// Pearson's chi-square statistic of `counts` against the uniform expectation
/// `total / k` per bucket.
pub fn chi_square_uniform(counts: &[u64]) -> f64 {
    if counts.is_empty() {
        return 0.0;
    }
    let total: u64 = counts.iter().sum();
    let e = total as f64 / counts.len() as f64;
    if e == 0.0 {
        return 0.0;
    }
    counts
        .iter()
        .map(|&o| {
            let d = o as f64 - e;
            d * d / e
        })
        .sum()
}

/// Upper-tail probability P(X >= stat) for a chi-square variable with `df`
/// degrees of freedom. Small p (< 0.01): more uneven than chance; p near 1
/// (> 0.99): more even than chance, i.e. the ids have structure the hash kept.
pub fn chi_square_p_value(stat: f64, df: u64) -> f64 {
    gamma_q(df as f64 / 2.0, stat / 2.0)
}

/// The value a chi-square variable with `df` degrees of freedom exceeds with
/// probability `alpha` (e.g. 0.01 for the 99% critical value), by bisection on
/// [`chi_square_p_value`].
pub fn chi_square_critical(df: u64, alpha: f64) -> f64 {
    let (mut lo, mut hi) = (0.0_f64, (df as f64) * 4.0 + 100.0);
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if chi_square_p_value(mid, df) > alpha {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

/// Standard deviation of one bucket's count when `n` ids fall uniformly into `k`
/// buckets: binomial `sqrt(n p (1-p))`, `p = 1/k`.
pub fn binomial_sd(n: u64, k: u64) -> f64 {
    let p = 1.0 / k as f64;
    (n as f64 * p * (1.0 - p)).sqrt()
}

/// The count distribution of one bucket (binomial `n`, `1/k`) as a CDF over a
/// window wide enough that everything outside it is negligible.
struct BucketCdf {
    lo: u64,
    cdf: Vec<f64>,
}

impl BucketCdf {
    fn new(n: u64, k: u64) -> Self {
        let p = 1.0 / k as f64;
        let mu = n as f64 * p;
        let sd = binomial_sd(n, k).max(1.0);
        let lo = (mu - 12.0 * sd - 10.0).max(0.0).floor() as u64;
        let hi = ((mu + 14.0 * sd + 30.0).ceil() as u64).min(n);
        let ln_n_fact = ln_gamma(n as f64 + 1.0);
        let (lp, lq) = (p.ln(), (-p).ln_1p());
        let mut acc = 0.0;
        let cdf = (lo..=hi)
            .map(|m| {
                let ln_pmf = ln_n_fact - ln_gamma(m as f64 + 1.0) - ln_gamma((n - m) as f64 + 1.0)
                    + m as f64 * lp
                    + (n - m) as f64 * lq;
                acc += ln_pmf.exp();
                acc.min(1.0)
            })
            .collect();
        BucketCdf { lo, cdf }
    }

    /// P(count <= m).
    fn at(&self, m: i64) -> f64 {
        if m < self.lo as i64 {
            return 0.0;
        }
        let i = (m - self.lo as i64) as usize;
        self.cdf.get(i).copied().unwrap_or(1.0)
    }
}

/// Expected largest bucket when `n` ids fall uniformly into `k` buckets.
/// Treats buckets as independent (the multinomial's weak negative correlation is
/// ignored), which is accurate to well under one id for the sizes used here.
pub fn expected_max_bucket(n: u64, k: u64) -> f64 {
    let c = BucketCdf::new(n, k);
    let kf = k as f64;
    let tail: f64 = (0..c.cdf.len()).map(|i| 1.0 - c.cdf[i].powf(kf)).sum();
    c.lo as f64 + tail
}

/// P(largest bucket >= `max`) under the same uniform model: how surprising an
/// observed max is. Near 0: worse than random; near 1: better than random.
pub fn p_max_at_least(n: u64, k: u64, max: u64) -> f64 {
    let c = BucketCdf::new(n, k);
    1.0 - c.at(max as i64 - 1).powf(k as f64)
}

/// ln Γ(x), Lanczos approximation (g = 7, 9 terms), ~15 significant digits.
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + G + 0.5;
    let a = C[1..]
        .iter()
        .enumerate()
        .fold(C[0], |a, (i, c)| a + c / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Iterations allowed for the incomplete-gamma series and continued fraction;
/// both converge in O(sqrt(a)) steps, far below this for df <= 65,535.
const GAMMA_ITERATIONS_MAX: usize = 100_000;

/// Regularized upper incomplete gamma Q(a, x) = 1 - P(a, x) (Numerical Recipes:
/// series below a+1, Lentz continued fraction above).
pub fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let gln = ln_gamma(a);
    if x < a + 1.0 {
        let (mut ap, mut del) = (a, 1.0 / a);
        let mut sum = del;
        for _ in 0..GAMMA_ITERATIONS_MAX {
            ap += 1.0;
            del *= x / ap;
            sum += del;
            if del.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        (1.0 - sum * (-x + a * x.ln() - gln).exp()).clamp(0.0, 1.0)
    } else {
        const TINY: f64 = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..GAMMA_ITERATIONS_MAX {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-15 {
                break;
            }
        }
        ((-x + a * x.ln() - gln).exp() * h).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn mean_and_stddev_of_a_known_set() {
        // Classic example: mean 5, population sd 2.
        let xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        assert_eq!(mean(&xs), 5.0);
        assert_eq!(stddev(&xs), 2.0);
    }

    #[test]
    fn chi_square_of_a_known_distribution() {
        // 4 buckets, 100 ids, expectation 25: (5² + 5² + 0 + 0) / 25 = 2.
        assert!(close(chi_square_uniform(&[30, 20, 25, 25]), 2.0, 1e-12));
        assert_eq!(chi_square_uniform(&[25, 25, 25, 25]), 0.0);
    }

    #[test]
    fn chi_square_p_values_match_tables() {
        // df=2: Q = exp(-x/2) exactly.
        assert!(close(chi_square_p_value(2.0, 2), (-1.0f64).exp(), 1e-12));
        // Table values of the 99% critical point.
        assert!(close(chi_square_critical(1, 0.01), 6.635, 0.001));
        assert!(close(chi_square_critical(15, 0.01), 30.578, 0.001));
        assert!(close(chi_square_critical(63, 0.01), 92.010, 0.01));
        // df=1023: Wilson-Hilferty gives ~1131.1.
        assert!(close(chi_square_critical(1023, 0.01), 1131.1, 1.0));
        // Median of chi-square(df) is about df(1 - 2/(9df))^3.
        assert!(close(chi_square_p_value(14.339, 15), 0.5, 0.001));
    }

    #[test]
    fn ln_gamma_matches_factorials() {
        assert!(close(ln_gamma(1.0), 0.0, 1e-12));
        assert!(close(ln_gamma(11.0), 3_628_800f64.ln(), 1e-9));
        assert!(close(
            ln_gamma(0.5),
            std::f64::consts::PI.sqrt().ln(),
            1e-12
        ));
    }

    #[test]
    fn binomial_expectations_are_sane() {
        assert!(close(binomial_sd(100_000, 1024), 9.877, 0.001));
        // 2 balls in 2 bins: max is 1 w.p. 1/2, 2 w.p. 1/2 -> E = 1.5 (independence
        // approximation gives 1.625 for this tiny case, so only check the large ones).
        let e = expected_max_bucket(100_000, 1024);
        assert!(e > 125.0 && e < 133.0, "expected max {e}");
        // One bucket: the max is all of them.
        assert!(close(expected_max_bucket(1000, 1), 1000.0, 1e-6));
        // An observed max of 112 at 100k/1024 is far more even than chance.
        assert!(p_max_at_least(100_000, 1024, 112) > 0.999_999);
        assert!(p_max_at_least(100_000, 1024, 170) < 1e-6);
    }
}
