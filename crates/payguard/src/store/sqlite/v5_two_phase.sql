-- v5: two-phase payments (authorize a hold, capture part or all of it, void it,
-- let it expire). The CHECKs of the status and kind lists are widened in place by
-- the migration's code (see schema.rs, V5_CHECK_REWRITES); this file adds the
-- columns and the rules that are new.

-- What an account's open holds keep from being spent: `available` = balance - held
-- is never negative, whatever the layers above do.
ALTER TABLE accounts ADD COLUMN held INTEGER NOT NULL DEFAULT 0
    CHECK (held >= 0 AND held <= balance);

-- What a capture took (refunds are bounded by it); null until captured.
ALTER TABLE orders ADD COLUMN captured INTEGER
    CHECK (captured IS NULL OR (captured > 0 AND captured <= amount));
-- The open hold: the amount exactly while AUTHORIZED.
ALTER TABLE orders ADD COLUMN held INTEGER NOT NULL DEFAULT 0
    CHECK ((status = 'AUTHORIZED') = (held > 0) AND (held = 0 OR held = amount));
-- When the hold expires: set exactly on the orders that took the two-phase path,
-- and a captured sum exactly on those of them that were paid.
ALTER TABLE orders ADD COLUMN hold_expires_at INTEGER
    CHECK ((hold_expires_at IS NOT NULL)
               = (status = 'AUTHORIZED' OR status = 'VOIDED' OR status = 'EXPIRED' OR captured IS NOT NULL)
           AND (captured IS NULL
                OR status = 'PAID' OR status = 'PARTIALLY_REFUNDED' OR status = 'REFUNDED'));

-- One hold, one capture and one release per order, ever.
CREATE UNIQUE INDEX entries_one_hold_per_order ON entries (order_id) WHERE kind = 'hold';
CREATE UNIQUE INDEX entries_one_capture_per_order ON entries (order_id) WHERE kind = 'capture';
CREATE UNIQUE INDEX entries_one_release_per_order ON entries (order_id) WHERE kind = 'release';
-- The sweeper's question: which holds are due.
CREATE INDEX orders_open_holds ON orders (hold_expires_at) WHERE status = 'AUTHORIZED';

DROP TRIGGER orders_status_transition;
CREATE TRIGGER orders_status_transition BEFORE UPDATE OF status ON orders
WHEN NOT ((OLD.status = 'PREPARE' AND (NEW.status = 'PAID' OR NEW.status = 'FAILED' OR NEW.status = 'AUTHORIZED'))
       OR (OLD.status = 'AUTHORIZED' AND (NEW.status = 'PAID' OR NEW.status = 'VOIDED' OR NEW.status = 'EXPIRED'))
       OR ((OLD.status = 'PAID' OR OLD.status = 'PARTIALLY_REFUNDED')
           AND (NEW.status = 'PARTIALLY_REFUNDED' OR NEW.status = 'REFUNDED')))
BEGIN
    SELECT RAISE(ABORT, 'payguard: illegal order status transition');
END;

DROP TRIGGER orders_identity_immutable;
CREATE TRIGGER orders_identity_immutable BEFORE UPDATE ON orders
WHEN NEW.id IS NOT OLD.id OR NEW.account_id IS NOT OLD.account_id OR NEW.amount IS NOT OLD.amount
  OR (OLD.debit_entry_id IS NOT NULL AND NEW.debit_entry_id IS NOT OLD.debit_entry_id)
  OR NEW.refunded < OLD.refunded
  OR (OLD.captured IS NOT NULL AND NEW.captured IS NOT OLD.captured)
  OR (OLD.hold_expires_at IS NOT NULL AND NEW.hold_expires_at IS NOT OLD.hold_expires_at)
BEGIN
    SELECT RAISE(ABORT, 'payguard: order identity, debit link, captured sum, hold expiry and refunded sum are immutable');
END;

-- Refunds never add up to more than what was taken: the captured sum, or the amount.
DROP TRIGGER entries_refund_within_amount;
CREATE TRIGGER entries_refund_within_amount BEFORE INSERT ON entries
WHEN NEW.kind = 'refund'
 AND (SELECT COALESCE(SUM(amount), 0) FROM entries WHERE order_id = NEW.order_id AND kind = 'refund')
     + NEW.amount > (SELECT COALESCE(captured, amount) FROM orders WHERE id = NEW.order_id)
BEGIN
    SELECT RAISE(ABORT, 'payguard: refunds would exceed the amount taken');
END;

-- A hold is written for a PREPARE order, on its account, for its whole amount.
CREATE TRIGGER entries_hold_needs_prepare BEFORE INSERT ON entries
WHEN NEW.kind = 'hold'
 AND NOT EXISTS (SELECT 1 FROM orders
                 WHERE id = NEW.order_id AND status = 'PREPARE' AND account_id = NEW.account_id
                   AND amount = NEW.amount)
BEGIN
    SELECT RAISE(ABORT, 'payguard: hold for an order that is not PREPARE');
END;

-- A capture or a release is written only for an AUTHORIZED order with its hold,
-- and together they never exceed the hold. One lookup of the order joined to its
-- hold (the partial unique index), one short scan of the order's entries.
CREATE TRIGGER entries_capture_release_need_hold BEFORE INSERT ON entries
WHEN (NEW.kind = 'capture' OR NEW.kind = 'release')
 AND NOT EXISTS (
     SELECT 1 FROM orders o JOIN entries h ON h.order_id = o.id AND h.kind = 'hold'
     WHERE o.id = NEW.order_id AND o.status = 'AUTHORIZED' AND o.account_id = NEW.account_id
       AND NEW.amount + (SELECT COALESCE(SUM(e.amount), 0) FROM entries e
                         WHERE e.order_id = NEW.order_id AND (e.kind = 'capture' OR e.kind = 'release'))
           <= h.amount)
BEGIN
    SELECT RAISE(ABORT, 'payguard: capture or release without an open hold');
END;
