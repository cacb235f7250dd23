-- v5: the outbox of events (API.md, "Events and webhooks") and the webhook
-- endpoints and deliveries that carry them downstream; the same tables as
-- SQLite's v6, but for how `seq` is given.
--
-- Why `seq` is not taken in the transaction: with many instances, a transaction
-- that took sequence value 5 may commit after one that took 6, and a reader that
-- had already read past 6 would never see 5. So the movement's transaction only
-- inserts the row (`pos`, its insertion order, and `seq` NULL); once it has
-- committed, the sequencer (payguard::store::postgres::events, one instance at a
-- time under an advisory lock) numbers committed rows in `pos` order, one pass
-- after the other. A pass commits before the next one starts, so `seq` only ever
-- grows in the order readers can see it: `seq > after` misses nothing.
CREATE TABLE events (
    pos             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seq             bigint UNIQUE CHECK (seq > 0),
    id              text NOT NULL UNIQUE CHECK (length(id) BETWEEN 5 AND 64),
    type            text NOT NULL CHECK (type IN ('order.paid', 'order.payment_failed',
                        'order.authorized', 'order.voided', 'order.hold_expired',
                        'order.refunded', 'order.reversed')),
    order_id        text NOT NULL REFERENCES orders (id),
    entry_id        bigint REFERENCES entries (id),
    created_at      bigint NOT NULL,
    -- The order as the event's transaction left it (see SQLite's v6 for why
    -- columns and not JSON).
    status          text NOT NULL,
    refunded        bigint NOT NULL,
    debit_entry_id  bigint,
    failure_reason  text,
    captured        bigint,
    held            bigint NOT NULL,
    hold_expires_at bigint,
    updated_at      bigint NOT NULL,
    CHECK ((type = 'order.payment_failed') = (entry_id IS NULL))
);
CREATE UNIQUE INDEX events_one_per_entry ON events (entry_id) WHERE entry_id IS NOT NULL;
CREATE UNIQUE INDEX events_one_failure_per_order ON events (order_id) WHERE entry_id IS NULL;
CREATE INDEX events_unsequenced ON events (pos) WHERE seq IS NULL;

-- Append-only, except that the sequencer gives a NULL `seq` its number once.
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.seq IS NULL AND NEW.seq IS NOT NULL
       AND (NEW.pos, NEW.id, NEW.type, NEW.order_id, NEW.entry_id, NEW.created_at, NEW.status,
            NEW.refunded, NEW.debit_entry_id, NEW.failure_reason, NEW.captured, NEW.held,
            NEW.hold_expires_at, NEW.updated_at)
           IS NOT DISTINCT FROM
           (OLD.pos, OLD.id, OLD.type, OLD.order_id, OLD.entry_id, OLD.created_at, OLD.status,
            OLD.refunded, OLD.debit_entry_id, OLD.failure_reason, OLD.captured, OLD.held,
            OLD.hold_expires_at, OLD.updated_at) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'events are append-only' USING ERRCODE = 'check_violation';
END $$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();

CREATE TABLE webhook_endpoints (
    id              text PRIMARY KEY,
    url             text NOT NULL,
    types           text,
    secret          text NOT NULL,
    status          text NOT NULL CHECK (status IN ('enabled', 'disabled', 'deleted')),
    disabled_reason text,
    after_seq       bigint NOT NULL CHECK (after_seq >= 0),
    created_at      bigint NOT NULL,
    updated_at      bigint NOT NULL
);

CREATE TABLE webhook_deliveries (
    endpoint_id     text NOT NULL REFERENCES webhook_endpoints (id),
    event_id        text NOT NULL REFERENCES events (id),
    event_seq       bigint NOT NULL,
    status          text NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at bigint NOT NULL,
    lease_until     bigint NOT NULL DEFAULT 0,
    lease_owner     text,
    updated_at      bigint NOT NULL,
    PRIMARY KEY (endpoint_id, event_id)
);
-- A claim reads one endpoint's due deliveries, oldest first, from this.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (endpoint_id, next_attempt_at, event_seq)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, status, event_seq);

CREATE TABLE webhook_attempts (
    endpoint_id text NOT NULL,
    event_id    text NOT NULL,
    attempt     integer NOT NULL CHECK (attempt >= 1),
    at          bigint NOT NULL,
    status_code integer,
    error       text,
    duration_ms bigint NOT NULL,
    instance    text NOT NULL,
    PRIMARY KEY (endpoint_id, event_id, attempt),
    FOREIGN KEY (endpoint_id, event_id) REFERENCES webhook_deliveries (endpoint_id, event_id)
);
