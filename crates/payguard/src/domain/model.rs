//! The records of the API (accounts, orders, ledger entries) and the audit report.
//!
//! Their `Serialize` forms are the JSON of `shared/spec/API.md`; changing a field
//! name here is a versioned API change. Timestamps are kept as milliseconds since
//! the Unix epoch and rendered as RFC 3339 with milliseconds, UTC.

use super::{AccountId, Currency, Money, OrderId, RefundId};
use serde::{Serialize, Serializer};

/// Renders a millisecond timestamp as `2026-11-26T02:16:43.882Z`.
pub fn format_ts_ms(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => String::from("1970-01-01T00:00:00.000Z"),
    }
}

fn ser_ts<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_ts_ms(*ms))
}

fn ser_opt_ts<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&format_ts_ms(*ms)),
        None => s.serialize_none(),
    }
}

fn ser_entry_id<S: Serializer>(id: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

fn ser_opt_entry_id<S: Serializer>(id: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.collect_str(id),
        None => s.serialize_none(),
    }
}

/// Where an order is in its life. Transitions (enforced by the database too):
/// `PREPARE → PAID | FAILED | AUTHORIZED`; `AUTHORIZED → PAID | VOIDED | EXPIRED`
/// (two-phase: a capture pays it, a void or the expiry releases the hold);
/// `PAID | PARTIALLY_REFUNDED → PARTIALLY_REFUNDED | REFUNDED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Prepare,
    Paid,
    Failed,
    PartiallyRefunded,
    Refunded,
    /// Its amount is held on the account, waiting for a capture or a void.
    Authorized,
    /// The hold was released by a void (terminal).
    Voided,
    /// The hold was released at `hold_expires_at` (terminal).
    Expired,
}

impl OrderStatus {
    /// Every status, in API.md's order.
    pub const ALL: [OrderStatus; 8] = [
        OrderStatus::Prepare,
        OrderStatus::Paid,
        OrderStatus::Failed,
        OrderStatus::PartiallyRefunded,
        OrderStatus::Refunded,
        OrderStatus::Authorized,
        OrderStatus::Voided,
        OrderStatus::Expired,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Prepare => "PREPARE",
            OrderStatus::Paid => "PAID",
            OrderStatus::Failed => "FAILED",
            OrderStatus::PartiallyRefunded => "PARTIALLY_REFUNDED",
            OrderStatus::Refunded => "REFUNDED",
            OrderStatus::Authorized => "AUTHORIZED",
            OrderStatus::Voided => "VOIDED",
            OrderStatus::Expired => "EXPIRED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "PREPARE" => OrderStatus::Prepare,
            "PAID" => OrderStatus::Paid,
            "FAILED" => OrderStatus::Failed,
            "PARTIALLY_REFUNDED" => OrderStatus::PartiallyRefunded,
            "REFUNDED" => OrderStatus::Refunded,
            "AUTHORIZED" => OrderStatus::Authorized,
            "VOIDED" => OrderStatus::Voided,
            "EXPIRED" => OrderStatus::Expired,
            _ => return None,
        })
    }

    /// Whether the order's money has been taken (it may have been given back since).
    pub const fn is_paid(self) -> bool {
        matches!(
            self,
            OrderStatus::Paid | OrderStatus::PartiallyRefunded | OrderStatus::Refunded
        )
    }

    /// The transition table of API.md; the store's trigger enforces the same.
    pub const fn can_become(self, next: OrderStatus) -> bool {
        use OrderStatus::*;
        matches!(
            (self, next),
            (Prepare, Paid)
                | (Prepare, Failed)
                | (Prepare, Authorized)
                | (Authorized, Paid)
                | (Authorized, Voided)
                | (Authorized, Expired)
                | (Paid, PartiallyRefunded)
                | (Paid, Refunded)
                | (PartiallyRefunded, PartiallyRefunded)
                | (PartiallyRefunded, Refunded)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Debit,
    Refund,
    Reversal,
    /// Two-phase: the order's amount held on the account (the balance does not move).
    Hold,
    /// Two-phase: money taken out of the balance from a hold; the order's debit.
    Capture,
    /// Two-phase: a hold, or what a partial capture left of it, given back to
    /// `available` (the balance does not move).
    Release,
}

impl EntryKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            EntryKind::Debit => "debit",
            EntryKind::Refund => "refund",
            EntryKind::Reversal => "reversal",
            EntryKind::Hold => "hold",
            EntryKind::Capture => "capture",
            EntryKind::Release => "release",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "debit" => EntryKind::Debit,
            "refund" => EntryKind::Refund,
            "reversal" => EntryKind::Reversal,
            "hold" => EntryKind::Hold,
            "capture" => EntryKind::Capture,
            "release" => EntryKind::Release,
            _ => return None,
        })
    }
}

/// An account. Its JSON adds `available` (`balance - held`), derived here so no
/// store or rule can keep a copy that disagrees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub balance: Money,
    /// The sum of the account's open holds (two-phase payments); part of the
    /// balance no deduct or hold may spend.
    pub held: Money,
    pub currency: Currency,
    /// The balance the account was opened with; compared when a create is
    /// repeated (not rendered).
    pub opening_balance: Money,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Account {
    /// What a deduct or a hold may spend: `balance - held` (never negative: the
    /// store refuses a row where it would be).
    pub fn available(&self) -> Money {
        Money::from_stored(self.balance.minor() - self.held.minor())
    }
}

/// `Account` as API.md renders it.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Account)]
struct AccountJson<'a> {
    id: &'a AccountId,
    balance: Money,
    /// The sum of open holds.
    held: Money,
    /// `balance - held`: what a deduct or a hold may spend.
    available: Money,
    #[schema(value_type = String, pattern = "^[A-Z]{3}$", example = "CNY")]
    currency: &'a Currency,
    #[serde(serialize_with = "ser_ts")]
    #[schema(value_type = String, format = DateTime)]
    created_at: &'a i64,
    #[serde(serialize_with = "ser_ts")]
    #[schema(value_type = String, format = DateTime)]
    updated_at: &'a i64,
}

impl Serialize for Account {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        AccountJson {
            id: &self.id,
            balance: self.balance,
            held: self.held,
            available: self.available(),
            currency: &self.currency,
            created_at: &self.created_at,
            updated_at: &self.updated_at,
        }
        .serialize(s)
    }
}

impl utoipa::PartialSchema for Account {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        <AccountJson<'static> as utoipa::PartialSchema>::schema()
    }
}

impl utoipa::ToSchema for Account {
    fn name() -> std::borrow::Cow<'static, str> {
        "Account".into()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Order {
    pub id: OrderId,
    pub account_id: AccountId,
    pub amount: Money,
    pub status: OrderStatus,
    pub refunded: Money,
    #[serde(serialize_with = "ser_opt_entry_id")]
    #[schema(value_type = Option<String>)]
    pub debit_entry_id: Option<i64>,
    pub failure_reason: Option<String>,
    /// Two-phase: what the capture took (refunds are bounded by it); null until
    /// captured, and for orders paid by deduct.
    pub captured: Option<Money>,
    /// Two-phase: the open hold (the amount while `AUTHORIZED`, else 0).
    pub held: Money,
    /// Two-phase: when the hold expires; null unless the order was authorized.
    /// Set once: it also marks an order that took the two-phase path.
    #[serde(serialize_with = "ser_opt_ts")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub hold_expires_at: Option<i64>,
    #[serde(serialize_with = "ser_ts")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: i64,
    #[serde(serialize_with = "ser_ts")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: i64,
}

impl Order {
    /// Whether the order took the two-phase path (it was authorized once).
    pub fn is_two_phase(&self) -> bool {
        self.hold_expires_at.is_some()
    }

    /// What refunds may give back in total: the captured sum of a two-phase
    /// order, else the amount.
    pub fn refundable(&self) -> Money {
        self.captured.unwrap_or(self.amount)
    }
}

/// One line of the ledger. Entries are never updated or deleted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Entry {
    #[serde(serialize_with = "ser_entry_id")]
    #[schema(value_type = String)]
    pub id: i64,
    pub order_id: OrderId,
    pub account_id: AccountId,
    pub kind: EntryKind,
    pub amount: Money,
    pub balance_after: Money,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund_id: Option<RefundId>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_entry_id"
    )]
    #[schema(value_type = Option<String>)]
    pub reverses: Option<i64>,
    #[serde(serialize_with = "ser_ts")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DuplicateDebit {
    pub order_id: String,
    pub count: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct OverRefund {
    pub order_id: String,
    pub amount: i64,
    pub refunded: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BalanceMismatch {
    pub account_id: String,
    pub expected: i64,
    pub actual: i64,
}

/// An account whose `held` is not the sum of its orders' open holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct HeldMismatch {
    pub account_id: String,
    pub expected: i64,
    pub actual: i64,
}

/// An account below zero: never allowed, whatever its ledger says (a balance can
/// agree with its ledger and still be negative, when the ledger itself overdrew it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct NegativeBalance {
    pub account_id: String,
    pub balance: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PaidMismatch {
    pub order_id: String,
    pub status: String,
    pub debits: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Resolved {
    pub order_id: String,
    pub reversed: i64,
}

/// The invariant check of `GET /v1/audit` and `payguard audit`.
///
/// Raw integers and strings rather than domain types: the audit must be able to
/// describe a database that breaks every rule, including ids and amounts that our
/// types would refuse to hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AuditReport {
    pub ok: bool,
    pub accounts_checked: i64,
    pub orders_checked: i64,
    pub entries_checked: i64,
    pub duplicate_debits: Vec<DuplicateDebit>,
    pub over_refunded: Vec<OverRefund>,
    /// Accounts whose balance is not what their ledger says.
    pub balance_mismatches: Vec<BalanceMismatch>,
    /// Accounts below zero (agreeing with their ledger or not).
    pub negative_balances: Vec<NegativeBalance>,
    pub paid_without_entry: Vec<PaidMismatch>,
    pub entry_without_paid: Vec<PaidMismatch>,
    /// Accounts whose `held` is not the sum of their orders' open holds.
    pub held_mismatches: Vec<HeldMismatch>,
    pub resolved: Vec<Resolved>,
}

impl AuditReport {
    /// Recomputes `ok` from the findings; `resolved` duplicates are not violations.
    ///
    /// The stores report every account whose balance is off its ledger *or*
    /// below zero as one row; here a negative balance becomes its own finding, and
    /// only a balance the ledger does not explain stays a mismatch (a negative
    /// balance that agrees with its ledger is not "a mismatch of two equal numbers").
    pub fn finish(mut self) -> Self {
        let mut negative = Vec::new();
        self.balance_mismatches.retain(|b| {
            if b.actual < 0 {
                negative.push(NegativeBalance {
                    account_id: b.account_id.clone(),
                    balance: b.actual,
                });
            }
            b.actual != b.expected
        });
        for n in negative {
            if !self.negative_balances.contains(&n) {
                self.negative_balances.push(n);
            }
        }
        self.ok = self.duplicate_debits.is_empty()
            && self.over_refunded.is_empty()
            && self.balance_mismatches.is_empty()
            && self.negative_balances.is_empty()
            && self.paid_without_entry.is_empty()
            && self.entry_without_paid.is_empty()
            && self.held_mismatches.is_empty();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(account: &str, expected: i64, actual: i64) -> BalanceMismatch {
        BalanceMismatch {
            account_id: account.into(),
            expected,
            actual,
        }
    }

    #[test]
    fn a_negative_balance_is_its_own_finding_not_a_mismatch_of_equal_numbers() {
        let r = AuditReport {
            balance_mismatches: vec![
                row("overdrawn", -41_983, -41_983),
                row("edited", 700, 705),
                row("both", 100, -5),
            ],
            ..AuditReport::default()
        }
        .finish();
        assert!(!r.ok);
        assert_eq!(
            r.balance_mismatches,
            vec![row("edited", 700, 705), row("both", 100, -5)]
        );
        assert_eq!(
            r.negative_balances,
            vec![
                NegativeBalance {
                    account_id: "overdrawn".into(),
                    balance: -41_983
                },
                NegativeBalance {
                    account_id: "both".into(),
                    balance: -5
                },
            ]
        );
        let twice = r.clone().finish();
        assert_eq!(twice, r, "finish is idempotent");
    }

    #[test]
    fn transitions_follow_the_api() {
        use OrderStatus::*;
        let all = [Prepare, Paid, Failed, PartiallyRefunded, Refunded];
        let allowed: Vec<_> = all
            .iter()
            .flat_map(|a| all.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.can_become(*b))
            .collect();
        assert_eq!(
            allowed,
            vec![
                (Prepare, Paid),
                (Prepare, Failed),
                (Paid, PartiallyRefunded),
                (Paid, Refunded),
                (PartiallyRefunded, PartiallyRefunded),
                (PartiallyRefunded, Refunded)
            ]
        );
        for s in all {
            assert_eq!(OrderStatus::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn timestamps_render_with_millis_utc() {
        assert_eq!(format_ts_ms(1_764_123_403_882), "2025-11-26T02:16:43.882Z");
    }
}
