-- v6: the outbox of events (API.md, "Events and webhooks") and the webhook
-- endpoints and deliveries that carry them downstream.

-- One row per committed change of an order's money or status, inserted in the
-- same transaction as the change. SQLite has one writer, so `seq` (taken in the
-- transaction) is commit order, and the feed reads `seq > after` safely.
-- No AUTOINCREMENT: events are never deleted (the triggers below), so the rowid
-- only grows, and AUTOINCREMENT's extra write per insert buys nothing.
CREATE TABLE events (
    seq             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE CHECK (length(id) BETWEEN 5 AND 64),
    type            TEXT NOT NULL CHECK (type = 'order.paid' OR type = 'order.payment_failed'
                        OR type = 'order.authorized' OR type = 'order.voided'
                        OR type = 'order.hold_expired' OR type = 'order.refunded'
                        OR type = 'order.reversed'),
    order_id        TEXT NOT NULL REFERENCES orders (id),
    -- The entry the event announces (none for order.payment_failed); entries
    -- never change, so the event shows it as it was written.
    entry_id        INTEGER REFERENCES entries (id),
    created_at      INTEGER NOT NULL,
    -- The order as the event's transaction left it: the columns of `orders`
    -- that change (id, account, amount and creation never do, and are read
    -- from `orders`). Columns, not a JSON text: the event is built at each
    -- reading, the same bytes every time, and the money path writes ~100
    -- bytes instead of ~700 (measured: the JSON cost a deduct 20 %).
    status          TEXT NOT NULL,
    refunded        INTEGER NOT NULL,
    debit_entry_id  INTEGER,
    failure_reason  TEXT,
    captured        INTEGER,
    held            INTEGER NOT NULL,
    hold_expires_at INTEGER,
    updated_at      INTEGER NOT NULL,
    CHECK ((type = 'order.payment_failed') = (entry_id IS NULL))
) STRICT;
-- An entry is announced once, and an order fails once.
CREATE UNIQUE INDEX events_one_per_entry ON events (entry_id) WHERE entry_id IS NOT NULL;
CREATE UNIQUE INDEX events_one_failure_per_order ON events (order_id) WHERE entry_id IS NULL;
CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;

-- Where events are delivered. `secret` is sealed (see payguard-server's
-- webhooks::seal); `after_seq` is how far the fan-out has turned events into
-- deliveries for this endpoint (it starts at the feed's end when created).
CREATE TABLE webhook_endpoints (
    id              TEXT PRIMARY KEY,
    url             TEXT NOT NULL,
    types           TEXT,
    secret          TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status = 'enabled' OR status = 'disabled' OR status = 'deleted'),
    disabled_reason TEXT,
    after_seq       INTEGER NOT NULL CHECK (after_seq >= 0),
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
) STRICT;

-- One delivery per endpoint and event. A claim leases it (`lease_until`,
-- `lease_owner`) so that with several instances one makes each attempt; an
-- attempt's result is written only while its lease is still the claimer's.
CREATE TABLE webhook_deliveries (
    endpoint_id     TEXT NOT NULL REFERENCES webhook_endpoints (id),
    event_id        TEXT NOT NULL REFERENCES events (id),
    event_seq       INTEGER NOT NULL,
    status          TEXT NOT NULL CHECK (status = 'pending' OR status = 'delivered' OR status = 'failed'),
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (endpoint_id, event_id)
) STRICT;
-- A claim reads one endpoint's due deliveries, oldest first, from this.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (endpoint_id, next_attempt_at, event_seq)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, status, event_seq);

-- Every attempt, for the deliveries list.
CREATE TABLE webhook_attempts (
    endpoint_id TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    attempt     INTEGER NOT NULL CHECK (attempt >= 1),
    at          INTEGER NOT NULL,
    status_code INTEGER,
    error       TEXT,
    duration_ms INTEGER NOT NULL,
    instance    TEXT NOT NULL,
    PRIMARY KEY (endpoint_id, event_id, attempt),
    FOREIGN KEY (endpoint_id, event_id) REFERENCES webhook_deliveries (endpoint_id, event_id)
) STRICT;
