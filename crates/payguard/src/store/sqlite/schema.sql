-- payguard schema v1 (guarded). Every rule that keeps money exact is enforced here,
-- by the database, so that no bug above it can charge an order twice.

CREATE TABLE payguard_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

-- A naive database (see `--guard naive`) says 'naive' here; guarded modes refuse it.
INSERT INTO payguard_meta (key, value) VALUES ('schema_kind', 'guarded');

CREATE TABLE accounts (
    id              TEXT PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 64),
    currency        TEXT NOT NULL CHECK (length(currency) = 3),
    opening_balance INTEGER NOT NULL CHECK (opening_balance BETWEEN 0 AND 9007199254740991),
    balance         INTEGER NOT NULL CHECK (balance >= 0),
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
) STRICT;

CREATE TABLE orders (
    id             TEXT PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 64),
    account_id     TEXT NOT NULL REFERENCES accounts (id),
    amount         INTEGER NOT NULL CHECK (amount BETWEEN 1 AND 9007199254740991),
    status         TEXT NOT NULL
                   CHECK (status IN ('PREPARE', 'PAID', 'FAILED', 'PARTIALLY_REFUNDED', 'REFUNDED')),
    refunded       INTEGER NOT NULL DEFAULT 0 CHECK (refunded >= 0 AND refunded <= amount),
    debit_entry_id INTEGER,
    failure_reason TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    -- paid exactly when a debit is linked
    CHECK ((status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')) = (debit_entry_id IS NOT NULL)),
    CHECK (status <> 'REFUNDED' OR refunded = amount),
    CHECK (status <> 'PARTIALLY_REFUNDED' OR (refunded > 0 AND refunded < amount)),
    CHECK (status NOT IN ('PREPARE', 'FAILED', 'PAID') OR refunded = 0)
) STRICT;

CREATE TABLE entries (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id      TEXT NOT NULL REFERENCES orders (id),
    account_id    TEXT NOT NULL REFERENCES accounts (id),
    kind          TEXT NOT NULL CHECK (kind IN ('debit', 'refund', 'reversal')),
    amount        INTEGER NOT NULL CHECK (amount > 0),
    balance_after INTEGER NOT NULL CHECK (balance_after >= 0),
    refund_id     TEXT,
    reverses      INTEGER REFERENCES entries (id),
    created_at    INTEGER NOT NULL,
    CHECK ((kind = 'refund') = (refund_id IS NOT NULL)),
    CHECK ((kind = 'reversal') = (reverses IS NOT NULL))
) STRICT;

-- The heart of it: one debit per order, one entry per refund id, one reversal per entry.
CREATE UNIQUE INDEX entries_one_debit_per_order ON entries (order_id) WHERE kind = 'debit';
CREATE UNIQUE INDEX entries_one_per_refund_id ON entries (refund_id) WHERE refund_id IS NOT NULL;
CREATE UNIQUE INDEX entries_one_reversal_per_entry ON entries (reverses) WHERE reverses IS NOT NULL;
CREATE INDEX entries_by_order ON entries (order_id, id);
CREATE INDEX entries_by_account ON entries (account_id);

-- Status changes only along API.md's transitions, from the expected state.
CREATE TRIGGER orders_status_transition BEFORE UPDATE OF status ON orders
WHEN NOT ((OLD.status = 'PREPARE' AND NEW.status IN ('PAID', 'FAILED'))
       OR (OLD.status IN ('PAID', 'PARTIALLY_REFUNDED')
           AND NEW.status IN ('PARTIALLY_REFUNDED', 'REFUNDED')))
BEGIN
    SELECT RAISE(ABORT, 'payguard: illegal order status transition');
END;

-- What an order charges, to whom, and which debit paid it never change once set.
CREATE TRIGGER orders_identity_immutable BEFORE UPDATE ON orders
WHEN NEW.id IS NOT OLD.id OR NEW.account_id IS NOT OLD.account_id OR NEW.amount IS NOT OLD.amount
  OR (OLD.debit_entry_id IS NOT NULL AND NEW.debit_entry_id IS NOT OLD.debit_entry_id)
  OR NEW.refunded < OLD.refunded
BEGIN
    SELECT RAISE(ABORT, 'payguard: order identity, debit link and refunded sum are immutable');
END;

-- A debit may only be written for an order still in PREPARE, on the order's own account.
CREATE TRIGGER entries_debit_needs_prepare BEFORE INSERT ON entries
WHEN NEW.kind = 'debit'
 AND NOT EXISTS (SELECT 1 FROM orders
                 WHERE id = NEW.order_id AND status = 'PREPARE' AND account_id = NEW.account_id)
BEGIN
    SELECT RAISE(ABORT, 'payguard: debit for an order that is not PREPARE');
END;

-- The refunds of an order never add up to more than its amount.
CREATE TRIGGER entries_refund_within_amount BEFORE INSERT ON entries
WHEN NEW.kind = 'refund'
 AND (SELECT COALESCE(SUM(amount), 0) FROM entries WHERE order_id = NEW.order_id AND kind = 'refund')
     + NEW.amount > (SELECT amount FROM orders WHERE id = NEW.order_id)
BEGIN
    SELECT RAISE(ABORT, 'payguard: refunds would exceed the order amount');
END;

-- The ledger is append-only.
CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries
BEGIN
    SELECT RAISE(ABORT, 'payguard: ledger entries are append-only');
END;
CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries
BEGIN
    SELECT RAISE(ABORT, 'payguard: ledger entries are append-only');
END;
