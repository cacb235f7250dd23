//! Shrinking a failing seed: the smallest part of its schedule that still
//! fails the same way.
//!
//! Why: a failing seed is a complete bug report, but a long one (a dozen
//! orders, a hundred requests, several faults); most of it is beside the
//! point. A seed's schedule is drawn whole before it runs (`run::draw`), every
//! request and fault numbered, and a [`Mask`] removes some of it afterwards,
//! so removing one order's requests leaves every other request and fault as
//! drawn (their timing may still move: turmoil's own random choices follow
//! the messages). [`shrink`] greedily removes whole orders' requests, then
//! single requests (a duplicate, a retry's follow-up, a step), then faults,
//! keeping each removal after which the seed still fails as asked. What is
//! left replays with `PAYGUARD_SIM_SEED` and `PAYGUARD_SIM_MASK` ([`Mask`]'s
//! text), deterministically like any seed.

use crate::run::{run_seed_caught, run_seed_masked, schedule, Outcome, Schedule};
use crate::Protocol;
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// What to remove from a seed's schedule: every request of these orders,
/// these requests, these faults (by their numbers in [`schedule`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mask {
    pub orders: BTreeSet<String>,
    pub sends: BTreeSet<usize>,
    pub faults: BTreeSet<usize>,
}

impl Mask {
    pub fn is_empty(&self) -> bool {
        self.orders.is_empty() && self.sends.is_empty() && self.faults.is_empty()
    }
}

/// `orders=order1,tp0;sends=3,17;faults=0` (empty parts left out).
impl fmt::Display for Mask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |v: Vec<String>| v.join(",");
        let mut parts = Vec::new();
        if !self.orders.is_empty() {
            parts.push(format!(
                "orders={}",
                join(self.orders.iter().cloned().collect())
            ));
        }
        if !self.sends.is_empty() {
            parts.push(format!(
                "sends={}",
                join(self.sends.iter().map(usize::to_string).collect())
            ));
        }
        if !self.faults.is_empty() {
            parts.push(format!(
                "faults={}",
                join(self.faults.iter().map(usize::to_string).collect())
            ));
        }
        write!(f, "{}", parts.join(";"))
    }
}

impl FromStr for Mask {
    type Err = String;

    fn from_str(s: &str) -> Result<Mask, String> {
        let mut mask = Mask::default();
        let numbers = |v: &str| -> Result<BTreeSet<usize>, String> {
            v.split(',')
                .filter(|n| !n.is_empty())
                .map(|n| {
                    n.trim()
                        .parse()
                        .map_err(|_| format!("{n:?} is not a number"))
                })
                .collect()
        };
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("orders", v)) => {
                    mask.orders = v
                        .split(',')
                        .filter(|o| !o.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                Some(("sends", v)) => mask.sends = numbers(v)?,
                Some(("faults", v)) => mask.faults = numbers(v)?,
                _ => return Err(format!("{part:?}: expected orders=, sends= or faults=")),
            }
        }
        Ok(mask)
    }
}

/// A seed shrunk: the mask that removes what is not needed, its outcome and
/// schedule, the full schedule's size, and how many runs it took.
#[derive(Debug, Clone)]
pub struct Shrunk {
    pub seed: u64,
    pub mask: Mask,
    pub outcome: Outcome,
    pub schedule: Schedule,
    pub full_size: usize,
    pub runs: u64,
}

/// Runs allowed in one shrink (each one seed's run).
pub const SHRINK_RUNS_MAX: u64 = 400;

/// Shrinks `seed` of `protocol` while `fails` holds of its outcome (see the
/// module docs). `seed` must fail as asked with nothing removed.
pub fn shrink(seed: u64, protocol: Protocol, fails: impl Fn(&Outcome) -> bool) -> Shrunk {
    let full = schedule(seed, protocol, &Mask::default());
    let mut mask = Mask::default();
    let mut runs = 0;
    let mut attempt = |mask: &Mask| {
        runs += 1;
        runs <= SHRINK_RUNS_MAX && fails(&run_seed_caught(seed, protocol, mask))
    };
    for order in &full.orders {
        let mut m = mask.clone();
        m.orders.insert(order.clone());
        if attempt(&m) {
            mask = m;
        }
    }
    for (id, _) in schedule(seed, protocol, &mask).sends {
        let mut m = mask.clone();
        m.sends.insert(id);
        if attempt(&m) {
            mask = m;
        }
    }
    for (f, _) in &full.faults {
        let mut m = mask.clone();
        m.faults.insert(*f);
        if attempt(&m) {
            mask = m;
        }
    }
    Shrunk {
        seed,
        outcome: run_seed_masked(seed, protocol, &mask, true),
        schedule: schedule(seed, protocol, &mask),
        full_size: full.size(),
        mask,
        runs,
    }
}
