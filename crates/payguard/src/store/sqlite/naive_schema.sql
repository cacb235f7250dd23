-- payguard NAIVE schema: the incident's database, for `--guard naive` only.
-- It has the same tables and columns as the guarded schema (so the same audit
-- judges both) but none of the rules that stop a double charge: no unique debit
-- per order, no unique refund id, no CHECKs on money, no transition triggers.
-- Guarded modes refuse to open it (schema_kind = 'naive').

CREATE TABLE payguard_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

INSERT INTO payguard_meta (key, value) VALUES ('schema_kind', 'naive');

CREATE TABLE accounts (
    id              TEXT PRIMARY KEY,
    currency        TEXT NOT NULL,
    opening_balance INTEGER NOT NULL,
    balance         INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
) STRICT;

CREATE TABLE orders (
    id             TEXT PRIMARY KEY,
    account_id     TEXT NOT NULL,
    amount         INTEGER NOT NULL,
    status         TEXT NOT NULL,
    refunded       INTEGER NOT NULL DEFAULT 0,
    debit_entry_id INTEGER,
    failure_reason TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
) STRICT;

CREATE TABLE entries (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id      TEXT NOT NULL,
    account_id    TEXT NOT NULL,
    kind          TEXT NOT NULL,
    amount        INTEGER NOT NULL,
    balance_after INTEGER NOT NULL,
    refund_id     TEXT,
    reverses      INTEGER,
    created_at    INTEGER NOT NULL
) STRICT;

CREATE INDEX entries_by_order ON entries (order_id, id);
CREATE INDEX entries_by_account ON entries (account_id);
CREATE INDEX entries_by_refund_id ON entries (refund_id);
-- The one rule kept: `payguard audit --apply` pays a duplicate back exactly once.
CREATE UNIQUE INDEX entries_one_reversal_per_entry ON entries (reverses) WHERE reverses IS NOT NULL;
