//! SQL that breaks a two-phase rule, for the schema tests of both stores
//! (`store.rs`, `pg_store.rs`): the same statements run in both dialects.

/// Statements that break a two-phase rule, written straight to the database as
/// if every layer above it were wrong, with `o1` (1,185) AUTHORIZED on `acct`
/// (10,000) and `o3` (5) PREPARE.
pub const TWO_PHASE_REFUSED: &[&str] = &[
    // Spending held money: available (balance - held) below zero, held below zero.
    "UPDATE accounts SET held = balance + 1 WHERE id = 'acct'",
    "UPDATE accounts SET held = -1 WHERE id = 'acct'",
    "UPDATE accounts SET balance = 1000 WHERE id = 'acct'",
    // A second hold, a hold of another amount, a hold on an order not PREPARE.
    "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at) VALUES ('o1', 'acct', 'hold', 1185, 10000, 3)",
    "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at) VALUES ('o3', 'acct', 'hold', 4, 10000, 3)",
    // A capture or release without a hold, above the hold, or adding up past it.
    "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at) VALUES ('o3', 'acct', 'capture', 5, 9995, 3)",
    "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at) VALUES ('o3', 'acct', 'release', 5, 10000, 3)",
    "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at) VALUES ('o1', 'acct', 'capture', 1186, 8814, 3)",
    "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at) VALUES ('o1', 'acct', 'capture', 1000, 9000, 3), ('o1', 'acct', 'release', 186, 9000, 3)",
    // A one-step debit of an AUTHORIZED order.
    "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at) VALUES ('o1', 'acct', 'debit', 1185, 8815, 3)",
    // The order's two-phase shape: paid without a capture link, back to PREPARE,
    // held while not AUTHORIZED or not held while AUTHORIZED, the expiry moved.
    "UPDATE orders SET status = 'PAID', held = 0, captured = 1185 WHERE id = 'o1'",
    "UPDATE orders SET status = 'PREPARE', held = 0, hold_expires_at = NULL WHERE id = 'o1'",
    "UPDATE orders SET held = 0 WHERE id = 'o1'",
    "UPDATE orders SET status = 'VOIDED' WHERE id = 'o1'",
    "UPDATE orders SET hold_expires_at = hold_expires_at + 1 WHERE id = 'o1'",
    "UPDATE orders SET status = 'AUTHORIZED', held = 5 WHERE id = 'o3'",
    "UPDATE orders SET captured = 5 WHERE id = 'o3'",
];

/// After `o1` was captured for 600 of its 1,185: refunds are bounded by 600.
pub const CAPTURED_REFUSED: &[&str] = &[
    "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, refund_id, created_at) VALUES ('o1', 'acct', 'refund', 601, 10001, 'rf-x', 4)",
    "UPDATE orders SET refunded = 601, status = 'PARTIALLY_REFUNDED' WHERE id = 'o1'",
    "UPDATE orders SET refunded = 1185, status = 'REFUNDED' WHERE id = 'o1'",
    "UPDATE orders SET captured = 700 WHERE id = 'o1'",
    "INSERT INTO entries (order_id, account_id, kind, amount, balance_after, created_at) VALUES ('o1', 'acct', 'capture', 1, 9399, 4)",
];
