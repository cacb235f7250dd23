-- v2: Idempotency-Key records, written in the same transaction as the money
-- movement they describe (the same table as sqlite_v2_idempotency.sql).
CREATE TABLE idempotency (
    scope       text NOT NULL,    -- hex SHA-256 of the API key, never the key
    key         text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint text NOT NULL,    -- hex SHA-256 of method, path, canonical body
    state       text NOT NULL CHECK (state IN ('in_flight', 'done')),
    lease_until bigint,           -- in_flight: when a dead instance's claim lapses
    status      integer CHECK (status BETWEEN 100 AND 599), -- done: the first response's status
    body        bytea,            -- done: the first response's bytes
    created_at  bigint NOT NULL,
    expires_at  bigint NOT NULL,
    PRIMARY KEY (scope, key),
    CHECK ((state = 'done') = (status IS NOT NULL AND body IS NOT NULL)),
    CHECK ((state = 'in_flight') = (lease_until IS NOT NULL))
);
CREATE INDEX idempotency_expiry ON idempotency (expires_at);
