//! What the storm left behind, read after it: every balance (with `held` and
//! `available`) and every ledger entry through the API, every order an
//! authorize was sent for, each target's `/v1/audit`, and with `--db` the
//! database's own audit. Only I/O: the `final` line of the history
//! (`history/mod.rs`), which the one checker (`history/check.rs`) judges.

use super::history::{AuditLine, FinalState, HeldLine, LedgerLine, OrderLine};
use super::load::{unix_ms, Http, OpKind, Run};
use futures::stream::{self, StreamExt};
use serde_json::Value;
use std::time::Duration;

/// Reads in flight at once (entries, balances).
const READS_MAX: usize = 64;
/// Times a read is sent before the storm gives up on the final state.
const READ_ATTEMPTS_MAX: usize = 5;
/// Back-off step between read attempts (ms), times the attempt number.
const READ_RETRY_MS: u64 = 100;

/// One GET through the first target, retried while it does not answer 200.
async fn get(http: &Http, path: &str) -> anyhow::Result<Value> {
    let mut last = 0;
    for attempt in 0..READ_ATTEMPTS_MAX {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(READ_RETRY_MS * attempt as u64)).await;
        }
        let (status, body) = http.call(0, reqwest::Method::GET, path, None).await;
        if status == 200 {
            return Ok(body);
        }
        last = status;
    }
    anyhow::bail!("reading {path} answered {last} (after {READ_ATTEMPTS_MAX} attempts)")
}

/// Every account's balance, in plan order, and its `held` and `available`
/// where the answer has them.
async fn balances(
    http: &Http,
    run: &Run,
    concurrency: usize,
) -> anyhow::Result<Vec<(String, i64, Option<(i64, i64)>)>> {
    // Owned ids, not references, into each read: a future holding a closure over
    // borrowed items is not `Send` for every lifetime, and the tests spawn storms.
    stream::iter(
        run.accounts
            .iter()
            .map(|a| a.id.clone())
            .collect::<Vec<_>>(),
    )
    .map(|id| async move {
        let body = get(http, &format!("/v1/accounts/{id}")).await?;
        let balance = body["balance"]
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("account {id} has no balance: {body}"))?;
        let held = body["held"].as_i64().zip(body["available"].as_i64());
        Ok((id, balance, held))
    })
    .buffered(concurrency.clamp(1, READS_MAX))
    .collect::<Vec<anyhow::Result<_>>>()
    .await
    .into_iter()
    .collect()
}

/// Every order's ledger entries, in plan order.
async fn ledger(http: &Http, run: &Run, concurrency: usize) -> anyhow::Result<Vec<LedgerLine>> {
    let per_order: Vec<anyhow::Result<Vec<LedgerLine>>> =
        stream::iter(run.orders.iter().map(|o| o.id.clone()).collect::<Vec<_>>())
            .map(|id| async move {
                let body = get(http, &format!("/v1/orders/{id}/entries")).await?;
                Ok(body["entries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| LedgerLine {
                        order: id.clone(),
                        kind: e["kind"].as_str().unwrap_or_default().to_owned(),
                        entry: e["id"].as_str().unwrap_or_default().to_owned(),
                        amount: e["amount"].as_i64().unwrap_or(0),
                        balance_after: e["balance_after"].as_i64().unwrap_or(0),
                        refund: e["refund_id"].as_str().map(str::to_owned),
                    })
                    .collect())
            })
            .buffered(concurrency.clamp(1, READS_MAX))
            .collect()
            .await;
    let mut out = Vec::new();
    for entries in per_order {
        out.extend(entries?);
    }
    Ok(out)
}

/// Every order an authorize was sent for, in plan order.
async fn two_phase_orders(
    http: &Http,
    run: &Run,
    concurrency: usize,
) -> anyhow::Result<Vec<OrderLine>> {
    let mut ids: Vec<usize> = run
        .records
        .iter()
        .filter(|r| r.kind == OpKind::Authorize)
        .filter_map(|r| r.order)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let ids: Vec<String> = ids.into_iter().map(|i| run.orders[i].id.clone()).collect();
    stream::iter(ids)
        .map(|id| async move {
            let o = get(http, &format!("/v1/orders/{id}")).await?;
            Ok(OrderLine {
                status: o["status"].as_str().unwrap_or_default().to_owned(),
                captured: o["captured"].as_i64(),
                held: o["held"].as_i64().unwrap_or(0),
                refunded: o["refunded"].as_i64().unwrap_or(0),
                hold_expires_ms: o["hold_expires_at"].as_str().and_then(unix_ms),
                id,
            })
        })
        .buffered(concurrency.clamp(1, READS_MAX))
        .collect::<Vec<anyhow::Result<_>>>()
        .await
        .into_iter()
        .collect()
}

/// Each target's own audit, then the database's (`--db`).
async fn audits(http: &Http, db: Option<&str>) -> anyhow::Result<Vec<AuditLine>> {
    let mut out = Vec::new();
    for (t, url) in http.targets.iter().enumerate() {
        let (status, body) = http.call(t, reqwest::Method::GET, "/v1/audit", None).await;
        let ok = status == 200 && body["ok"] == Value::Bool(true);
        out.push(AuditLine {
            source: "api".into(),
            at: url.clone(),
            ok,
            detail: if ok {
                String::new()
            } else {
                format!("/v1/audit: {status} {body}")
            },
        });
    }
    if let Some(url) = db {
        let report = crate::audit::audit_url(url).await?;
        out.push(AuditLine {
            source: "db".into(),
            at: "database".into(),
            ok: report.ok,
            detail: if report.ok {
                String::new()
            } else {
                serde_json::to_string(&report)?
            },
        });
    }
    Ok(out)
}

/// The state after `run`, for the history's `final` line.
pub async fn final_state(
    http: &Http,
    run: &Run,
    concurrency: usize,
    db: Option<&str>,
) -> anyhow::Result<FinalState> {
    let read_at_ms = chrono::Utc::now().timestamp_millis();
    let orders = two_phase_orders(http, run, concurrency).await?;
    let accounts = balances(http, run, concurrency).await?;
    let held: Vec<HeldLine> = accounts
        .iter()
        .filter_map(|(id, _, h)| h.map(|(held, avail)| (id.clone(), held, avail)))
        .collect();
    Ok(FinalState {
        balances: accounts.into_iter().map(|(id, b, _)| (id, b)).collect(),
        ledger: ledger(http, run, concurrency).await?,
        audits: audits(http, db).await?,
        read_at_ms: (!orders.is_empty()).then_some(read_at_ms),
        orders,
        held,
    })
}
