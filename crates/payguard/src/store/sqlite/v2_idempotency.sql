-- v2: Idempotency-Key records, written in the same transaction as the money
-- movement they describe.
CREATE TABLE idempotency (
    scope       TEXT NOT NULL,    -- hex SHA-256 of the API key, never the key
    key         TEXT NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint TEXT NOT NULL,    -- hex SHA-256 of method, path, canonical body
    state       TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    lease_until INTEGER,          -- in_flight: when a dead instance's claim lapses
    status      INTEGER,          -- done: the first response's status
    body        BLOB,             -- done: the first response's bytes
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (scope, key),
    CHECK ((state = 'done') = (status IS NOT NULL AND body IS NOT NULL)),
    CHECK ((state = 'in_flight') = (lease_until IS NOT NULL))
) STRICT;
CREATE INDEX idempotency_expiry ON idempotency (expires_at);
