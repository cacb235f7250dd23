-- v4: two-phase payments (authorize a hold, capture part or all of it, void it,
-- let it expire), with the same columns and rules as SQLite's v5. The CHECKs
-- replaced here are the ones v1 created unnamed (PostgreSQL named them).

-- What an account's open holds keep from being spent: `available` = balance - held
-- is never negative, whatever the layers above do.
ALTER TABLE accounts ADD COLUMN held bigint NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD CONSTRAINT accounts_held_within_balance
    CHECK (held >= 0 AND held <= balance);

ALTER TABLE orders ADD COLUMN captured bigint;
ALTER TABLE orders ADD COLUMN held bigint NOT NULL DEFAULT 0;
ALTER TABLE orders ADD COLUMN hold_expires_at bigint;

ALTER TABLE orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check CHECK (status IN
    ('PREPARE', 'PAID', 'FAILED', 'PARTIALLY_REFUNDED', 'REFUNDED', 'AUTHORIZED', 'VOIDED', 'EXPIRED'));
-- Refunds are bounded by what was taken: the captured sum, or the amount.
ALTER TABLE orders DROP CONSTRAINT orders_check2;
ALTER TABLE orders ADD CONSTRAINT orders_refunded_all
    CHECK (status <> 'REFUNDED' OR refunded = COALESCE(captured, amount));
ALTER TABLE orders DROP CONSTRAINT orders_check3;
ALTER TABLE orders ADD CONSTRAINT orders_refunded_part
    CHECK (status <> 'PARTIALLY_REFUNDED' OR (refunded > 0 AND refunded < COALESCE(captured, amount)));
ALTER TABLE orders DROP CONSTRAINT orders_check4;
ALTER TABLE orders ADD CONSTRAINT orders_refunded_only_when_paid
    CHECK (status NOT IN ('PREPARE', 'FAILED', 'PAID', 'AUTHORIZED', 'VOIDED', 'EXPIRED') OR refunded = 0);
ALTER TABLE orders ADD CONSTRAINT orders_captured_within_amount
    CHECK (captured IS NULL OR (captured > 0 AND captured <= amount));
-- The open hold: the amount exactly while AUTHORIZED.
ALTER TABLE orders ADD CONSTRAINT orders_held_while_authorized
    CHECK ((status = 'AUTHORIZED') = (held > 0) AND (held = 0 OR held = amount));
-- A hold expiry exactly on the orders that took the two-phase path, and a
-- captured sum exactly on those of them that were paid.
ALTER TABLE orders ADD CONSTRAINT orders_two_phase_shape
    CHECK ((hold_expires_at IS NOT NULL)
               = (status IN ('AUTHORIZED', 'VOIDED', 'EXPIRED') OR captured IS NOT NULL)
           AND (captured IS NULL OR status IN ('PAID', 'PARTIALLY_REFUNDED', 'REFUNDED')));

ALTER TABLE entries DROP CONSTRAINT entries_kind_check;
ALTER TABLE entries ADD CONSTRAINT entries_kind_check
    CHECK (kind IN ('debit', 'refund', 'reversal', 'hold', 'capture', 'release'));

-- One hold, one capture and one release per order, ever.
CREATE UNIQUE INDEX entries_one_hold_per_order ON entries (order_id) WHERE kind = 'hold';
CREATE UNIQUE INDEX entries_one_capture_per_order ON entries (order_id) WHERE kind = 'capture';
CREATE UNIQUE INDEX entries_one_release_per_order ON entries (order_id) WHERE kind = 'release';
-- The sweeper's question: which holds are due.
CREATE INDEX orders_open_holds ON orders (hold_expires_at) WHERE status = 'AUTHORIZED';

CREATE OR REPLACE FUNCTION payguard_orders_status_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT ((OLD.status = 'PREPARE' AND NEW.status IN ('PAID', 'FAILED', 'AUTHORIZED'))
         OR (OLD.status = 'AUTHORIZED' AND NEW.status IN ('PAID', 'VOIDED', 'EXPIRED'))
         OR (OLD.status IN ('PAID', 'PARTIALLY_REFUNDED')
             AND NEW.status IN ('PARTIALLY_REFUNDED', 'REFUNDED'))) THEN
        RAISE EXCEPTION 'payguard: illegal order status transition % -> % (order %)',
            OLD.status, NEW.status, OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION payguard_orders_identity_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id IS DISTINCT FROM OLD.id
       OR NEW.account_id IS DISTINCT FROM OLD.account_id
       OR NEW.amount IS DISTINCT FROM OLD.amount
       OR (OLD.debit_entry_id IS NOT NULL AND NEW.debit_entry_id IS DISTINCT FROM OLD.debit_entry_id)
       OR NEW.refunded < OLD.refunded
       OR (OLD.captured IS NOT NULL AND NEW.captured IS DISTINCT FROM OLD.captured)
       OR (OLD.hold_expires_at IS NOT NULL AND NEW.hold_expires_at IS DISTINCT FROM OLD.hold_expires_at) THEN
        RAISE EXCEPTION 'payguard: order identity, debit link, captured sum, hold expiry and refunded sum are immutable (order %)', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION payguard_entries_refund_within_amount() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM orders WHERE id = NEW.order_id FOR UPDATE;
    IF (SELECT COALESCE(SUM(amount), 0) FROM entries WHERE order_id = NEW.order_id AND kind = 'refund')
       + NEW.amount > (SELECT COALESCE(captured, amount) FROM orders WHERE id = NEW.order_id) THEN
        RAISE EXCEPTION 'payguard: refunds would exceed the amount taken (order %)', NEW.order_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;

-- A hold is written for a PREPARE order, on its account, for its whole amount.
CREATE FUNCTION payguard_entries_hold_needs_prepare() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM orders WHERE id = NEW.order_id FOR UPDATE;
    IF NOT EXISTS (SELECT 1 FROM orders
                   WHERE id = NEW.order_id AND status = 'PREPARE' AND account_id = NEW.account_id
                     AND amount = NEW.amount) THEN
        RAISE EXCEPTION 'payguard: hold for an order that is not PREPARE (order %)', NEW.order_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER entries_hold_needs_prepare BEFORE INSERT ON entries
FOR EACH ROW WHEN (NEW.kind = 'hold') EXECUTE FUNCTION payguard_entries_hold_needs_prepare();

-- A capture or a release is written only against the order's hold, while the
-- order is AUTHORIZED (or PREPARE with the hold written earlier by the same
-- statement: a batch inserts its entries before it moves its orders), and
-- together they never exceed the hold.
CREATE FUNCTION payguard_entries_capture_release_need_hold() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM orders WHERE id = NEW.order_id FOR UPDATE;
    IF NOT EXISTS (SELECT 1 FROM orders
                   WHERE id = NEW.order_id AND status IN ('AUTHORIZED', 'PREPARE')
                     AND account_id = NEW.account_id)
       OR NOT EXISTS (SELECT 1 FROM entries WHERE order_id = NEW.order_id AND kind = 'hold')
       OR (SELECT COALESCE(SUM(amount), 0) FROM entries
           WHERE order_id = NEW.order_id AND kind IN ('capture', 'release'))
          + NEW.amount > (SELECT amount FROM entries WHERE order_id = NEW.order_id AND kind = 'hold') THEN
        RAISE EXCEPTION 'payguard: capture or release without an open hold (order %)', NEW.order_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER entries_capture_release_need_hold BEFORE INSERT ON entries
FOR EACH ROW WHEN (NEW.kind IN ('capture', 'release'))
EXECUTE FUNCTION payguard_entries_capture_release_need_hold();
