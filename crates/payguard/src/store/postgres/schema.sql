-- payguard PostgreSQL schema v1 (guarded): the same tables, columns and rules as
-- sqlite_schema.sql, so one audit query shape judges both stores. Every rule that
-- keeps money exact is enforced here, by the database, so that no bug above it
-- (and no second instance of payguard racing this one) can charge an order twice.
--
-- Timestamps are bigint milliseconds since the Unix epoch, like SQLite's, so the
-- records read back are identical. Trigger errors use SQLSTATE class 23
-- (integrity_constraint_violation), the class of the built-in constraints, so the
-- store treats a trigger's refusal exactly like a CHECK's.

CREATE TABLE payguard_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- A naive database says 'naive' here; guarded modes refuse it. The migration
-- runner keeps 'schema_version' beside it.
INSERT INTO payguard_meta (key, value) VALUES ('schema_kind', 'guarded');

CREATE TABLE accounts (
    id              text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 64),
    currency        text NOT NULL CHECK (length(currency) = 3),
    opening_balance bigint NOT NULL CHECK (opening_balance BETWEEN 0 AND 9007199254740991),
    balance         bigint NOT NULL CHECK (balance >= 0),
    created_at      bigint NOT NULL,
    updated_at      bigint NOT NULL
);

CREATE TABLE orders (
    id             text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 64),
    account_id     text NOT NULL REFERENCES accounts (id),
    amount         bigint NOT NULL CHECK (amount BETWEEN 1 AND 9007199254740991),
    status         text NOT NULL
                   CHECK (status IN ('PREPARE', 'PAID', 'FAILED', 'PARTIALLY_REFUNDED', 'REFUNDED')),
    refunded       bigint NOT NULL DEFAULT 0 CHECK (refunded >= 0 AND refunded <= amount),
    debit_entry_id bigint,
    failure_reason text,
    created_at     bigint NOT NULL,
    updated_at     bigint NOT NULL,
    -- paid exactly when a debit is linked
    CHECK ((status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')) = (debit_entry_id IS NOT NULL)),
    CHECK (status <> 'REFUNDED' OR refunded = amount),
    CHECK (status <> 'PARTIALLY_REFUNDED' OR (refunded > 0 AND refunded < amount)),
    CHECK (status NOT IN ('PREPARE', 'FAILED', 'PAID') OR refunded = 0)
);

CREATE TABLE entries (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id      text NOT NULL REFERENCES orders (id),
    account_id    text NOT NULL REFERENCES accounts (id),
    kind          text NOT NULL CHECK (kind IN ('debit', 'refund', 'reversal')),
    amount        bigint NOT NULL CHECK (amount > 0),
    balance_after bigint NOT NULL CHECK (balance_after >= 0),
    refund_id     text,
    reverses      bigint REFERENCES entries (id),
    created_at    bigint NOT NULL,
    CHECK ((kind = 'refund') = (refund_id IS NOT NULL)),
    CHECK ((kind = 'reversal') = (reverses IS NOT NULL))
);

-- The debit link points at a real ledger row (SQLite cannot add this after the fact).
ALTER TABLE orders ADD CONSTRAINT orders_debit_entry_exists
    FOREIGN KEY (debit_entry_id) REFERENCES entries (id);

-- The heart of it: one debit per order, one entry per refund id, one reversal per entry.
CREATE UNIQUE INDEX entries_one_debit_per_order ON entries (order_id) WHERE kind = 'debit';
CREATE UNIQUE INDEX entries_one_per_refund_id ON entries (refund_id) WHERE refund_id IS NOT NULL;
CREATE UNIQUE INDEX entries_one_reversal_per_entry ON entries (reverses) WHERE reverses IS NOT NULL;
CREATE INDEX entries_by_order ON entries (order_id, id);
CREATE INDEX entries_by_account ON entries (account_id);

-- Status changes only along API.md's transitions, from the expected state.
CREATE FUNCTION payguard_orders_status_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT ((OLD.status = 'PREPARE' AND NEW.status IN ('PAID', 'FAILED'))
         OR (OLD.status IN ('PAID', 'PARTIALLY_REFUNDED')
             AND NEW.status IN ('PARTIALLY_REFUNDED', 'REFUNDED'))) THEN
        RAISE EXCEPTION 'payguard: illegal order status transition % -> % (order %)',
            OLD.status, NEW.status, OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER orders_status_transition BEFORE UPDATE OF status ON orders
FOR EACH ROW EXECUTE FUNCTION payguard_orders_status_transition();

-- What an order charges, to whom, and which debit paid it never change once set.
CREATE FUNCTION payguard_orders_identity_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id IS DISTINCT FROM OLD.id
       OR NEW.account_id IS DISTINCT FROM OLD.account_id
       OR NEW.amount IS DISTINCT FROM OLD.amount
       OR (OLD.debit_entry_id IS NOT NULL AND NEW.debit_entry_id IS DISTINCT FROM OLD.debit_entry_id)
       OR NEW.refunded < OLD.refunded THEN
        RAISE EXCEPTION 'payguard: order identity, debit link and refunded sum are immutable (order %)', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER orders_identity_immutable BEFORE UPDATE ON orders
FOR EACH ROW EXECUTE FUNCTION payguard_orders_identity_immutable();

-- A debit may only be written for an order still in PREPARE, on the order's own
-- account. The order row is locked first, so under READ COMMITTED a racing writer
-- waits here and then sees the committed status rather than an old snapshot.
CREATE FUNCTION payguard_entries_debit_needs_prepare() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM orders WHERE id = NEW.order_id FOR UPDATE;
    IF NOT EXISTS (SELECT 1 FROM orders
                   WHERE id = NEW.order_id AND status = 'PREPARE' AND account_id = NEW.account_id) THEN
        RAISE EXCEPTION 'payguard: debit for an order that is not PREPARE (order %)', NEW.order_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER entries_debit_needs_prepare BEFORE INSERT ON entries
FOR EACH ROW WHEN (NEW.kind = 'debit') EXECUTE FUNCTION payguard_entries_debit_needs_prepare();

-- The refunds of an order never add up to more than its amount. Locking the order
-- row serialises concurrent refund inserts for one order, and rows inserted earlier
-- by the same multi-row INSERT are visible to this per-row check.
CREATE FUNCTION payguard_entries_refund_within_amount() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM orders WHERE id = NEW.order_id FOR UPDATE;
    IF (SELECT COALESCE(SUM(amount), 0) FROM entries WHERE order_id = NEW.order_id AND kind = 'refund')
       + NEW.amount > (SELECT amount FROM orders WHERE id = NEW.order_id) THEN
        RAISE EXCEPTION 'payguard: refunds would exceed the order amount (order %)', NEW.order_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER entries_refund_within_amount BEFORE INSERT ON entries
FOR EACH ROW WHEN (NEW.kind = 'refund') EXECUTE FUNCTION payguard_entries_refund_within_amount();

-- The ledger is append-only: no UPDATE, DELETE or TRUNCATE.
CREATE FUNCTION payguard_entries_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'payguard: ledger entries are append-only'
        USING ERRCODE = 'integrity_constraint_violation';
END
$$;
CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries
FOR EACH ROW EXECUTE FUNCTION payguard_entries_append_only();
CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries
FOR EACH ROW EXECUTE FUNCTION payguard_entries_append_only();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
FOR EACH STATEMENT EXECUTE FUNCTION payguard_entries_append_only();
