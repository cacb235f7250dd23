//! A Jepsen-style history of a storm, and the one checker of what it allows.
//!
//! The history is JSON lines: one `plan` (accounts with opening balances, orders
//! with their account and amount, the targets and the liveness rules), an `invoke`
//! and a completion per request (`ok`, `fail` or `unknown`, by the one status
//! table in `status.rs`), then one `final` with every balance, every ledger entry
//! and every audit as read after the storm (`observe.rs`); with `--two-phase`,
//! also every two-phase order as read then, each account's `held` and
//! `available`, and when those reads began.
//!
//! The storm builds these lines in memory from its run and judges them with
//! [`judge`] (`check.rs`); `storm --history FILE` also writes them, and
//! `payguard check-history FILE` reads them back and judges them the same way.
//! One checker, two ways in: a recorded run is held to exactly the rules the live
//! run was.

mod check;

pub use check::{check, check_with, judge, recorded_rules, Verdict};

use super::liveness::Rules;
use super::load::Run;
use super::status::{self, Outcome};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerLine {
    pub order: String,
    pub kind: String,
    pub entry: String,
    pub amount: i64,
    pub balance_after: i64,
    #[serde(default)]
    pub refund: Option<String>,
}

/// One audit run after the storm: a target's `/v1/audit`, or the database's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditLine {
    /// `api` (a target's `/v1/audit`) or `db` (`payguard audit` on `--db`).
    pub source: String,
    /// The target's URL (`api`), or `database`.
    pub at: String,
    pub ok: bool,
    /// What it answered when it failed.
    pub detail: String,
}

/// A two-phase order as read after the storm (`GET /v1/orders/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OrderLine {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub captured: Option<i64>,
    #[serde(default)]
    pub held: i64,
    #[serde(default)]
    pub refunded: i64,
    /// `hold_expires_at` as Unix ms.
    #[serde(default)]
    pub hold_expires_ms: Option<i64>,
}

/// An account's open holds as read after the storm: (account, `held`, `available`).
pub type HeldLine = (String, i64, i64);

/// The state after the storm, as read through the API (and the database).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FinalState {
    pub balances: Vec<(String, i64)>,
    pub ledger: Vec<LedgerLine>,
    /// Absent from histories written before audits were recorded.
    #[serde(default)]
    pub audits: Vec<AuditLine>,
    /// Every order an authorize was sent for (empty without `--two-phase`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orders: Vec<OrderLine>,
    /// Each account's `held` and `available`, when its answer had them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldLine>,
    /// When the reads of `orders` began (Unix ms): a hold still AUTHORIZED
    /// then, past its expiry plus the grace, was left by the sweepers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Plan {
        accounts: Vec<(String, i64)>,
        /// (order id, account id, amount)
        orders: Vec<(String, String, i64)>,
        /// The base URLs an invoke's `target` indexes (wrapping around).
        #[serde(default)]
        targets: Vec<String>,
        /// The run injected faults (`storm --faults`).
        #[serde(default)]
        faults: bool,
        /// `storm --slow-ms`; absent: the default.
        #[serde(default)]
        slow_ms: Option<u64>,
        /// `storm --hold-grace-ms`; absent: the default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hold_grace_ms: Option<u64>,
    },
    Invoke {
        id: usize,
        op: String,
        order: Option<String>,
        refund: Option<String>,
        amount: i64,
        t_ms: f64,
        target: usize,
    },
    Ok {
        id: usize,
        t_ms: f64,
        status: u16,
        entry: Option<String>,
        replayed: Option<bool>,
    },
    Fail {
        id: usize,
        t_ms: f64,
        status: u16,
        code: Option<String>,
    },
    Unknown {
        id: usize,
        t_ms: f64,
        status: u16,
        /// Why no answer came (`timeout`, `connect`, `reset`, `body`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Final(FinalState),
}

/// The history of `run` against `targets` under `rules` (holds judged with
/// `hold_grace_ms`), ending in `fin`.
pub fn lines_of(
    run: &Run,
    targets: &[String],
    rules: Rules,
    hold_grace_ms: u64,
    fin: FinalState,
) -> Vec<Line> {
    let mut lines = Vec::with_capacity(2 * run.records.len() + 2);
    lines.push(Line::Plan {
        accounts: run
            .accounts
            .iter()
            .map(|a| (a.id.clone(), a.opening))
            .collect(),
        orders: run
            .orders
            .iter()
            .map(|o| (o.id.clone(), run.accounts[o.account].id.clone(), o.amount))
            .collect(),
        targets: targets.to_vec(),
        faults: rules.faults,
        slow_ms: Some(rules.slow_ms),
        hold_grace_ms: Some(hold_grace_ms),
    });
    let mut records: Vec<_> = run.records.iter().enumerate().collect();
    records.sort_by(|a, b| a.1.started_ms.total_cmp(&b.1.started_ms));
    for (id, r) in &records {
        lines.push(Line::Invoke {
            id: *id,
            op: r.kind.name().to_owned(),
            order: r.order.map(|i| run.orders[i].id.clone()),
            refund: r.refund_id.clone(),
            amount: r.amount,
            t_ms: r.started_ms,
            target: r.target,
        });
    }
    for (id, r) in records {
        let t_ms = r.started_ms + r.latency_us as f64 / 1e3;
        lines.push(match status::outcome(r.status) {
            Outcome::Ok => Line::Ok {
                id,
                t_ms,
                status: r.status,
                entry: r.entry_id.clone(),
                replayed: r.replayed,
            },
            Outcome::Fail => Line::Fail {
                id,
                t_ms,
                status: r.status,
                code: r.code.clone(),
            },
            Outcome::Unknown => Line::Unknown {
                id,
                t_ms,
                status: r.status,
                error: r.error.map(str::to_owned),
            },
        });
    }
    lines.push(Line::Final(fin));
    lines
}

/// The `final` line of a history, if it has one.
pub fn final_state(lines: &[Line]) -> Option<&FinalState> {
    lines.iter().rev().find_map(|l| match l {
        Line::Final(f) => Some(f),
        _ => None,
    })
}

/// Writes `lines` as JSON lines (`storm --history FILE`).
pub fn write(path: &Path, lines: &[Line]) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for l in lines {
        serde_json::to_writer(&mut out, l)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

pub fn read(path: &Path) -> anyhow::Result<Vec<Line>> {
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let mut lines = Vec::new();
    for (n, l) in std::io::BufReader::new(file).lines().enumerate() {
        let l = l?;
        if l.trim().is_empty() {
            continue;
        }
        lines.push(
            serde_json::from_str(&l)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?,
        );
    }
    Ok(lines)
}
